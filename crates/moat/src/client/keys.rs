//! `moat key`: API keys, straight from the state directory's database (where `moat serve`
//! runs, as the user it runs as). A running daemon sees the change at its next request.

use super::{default_state_dir, print_json, text, Error, Result};
use moat_engine::store::{Event, EventKind, KeyId, KeyRecord, Store};
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum KeyCmd {
    /// Create an API key and print its secret (shown once).
    Create {
        /// A name for the key (who or what uses it).
        #[arg(long)]
        name: String,
        /// An admin key sees every key's sandboxes.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        dir: StateDir,
        /// Print `{"id","name","admin","created_at","secret"}`.
        #[arg(long)]
        json: bool,
    },
    /// List API keys, revoked ones too.
    Ls {
        #[command(flatten)]
        dir: StateDir,
        /// Print the keys as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API key (and every token it made).
    Revoke {
        /// The key's id, `key_...` (see `moat key ls`).
        #[arg(value_name = "KEY_ID")]
        id: String,
        #[command(flatten)]
        dir: StateDir,
        /// Print `{"id","revoked_at"}`.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct StateDir {
    /// State directory of `moat serve` (default: /var/lib/moat as root, else
    /// $XDG_STATE_HOME/moat or ~/.local/state/moat).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

fn open(dir: &StateDir) -> Result<Store> {
    let d = dir.state_dir.clone().unwrap_or_else(default_state_dir);
    if !has_state(&d) {
        return Err(Error::Msg(format!(
            "no moat state in {}: start `moat serve --state-dir {}` once to create it, or pass \
             --state-dir DIR of the daemon (run this where the daemon runs, as its user)",
            d.display(),
            d.display()
        )));
    }
    Store::open(&d).map_err(store_err)
}

fn store_err(e: moat_engine::store::StoreError) -> Error {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    Error::Msg(msg)
}

fn audit(store: &Store, kind: EventKind, key: &KeyId, data: serde_json::Value) {
    let event = Event {
        ts: text::now_ms(),
        key_id: Some(key.clone()),
        sandbox_id: None,
        kind,
        data,
    };
    if let Err(e) = store.append_event(&event) {
        eprintln!(
            "moat: warning: the audit event was not recorded: {}",
            store_err(e)
        );
    }
}

pub fn main(cmd: KeyCmd) -> Result<i32> {
    match cmd {
        KeyCmd::Create {
            name,
            admin,
            dir,
            json,
        } => {
            if name.trim().is_empty() {
                return Err(Error::Msg("--name must not be empty".into()));
            }
            let store = open(&dir)?;
            let (rec, secret) = store
                .create_key(&name, admin, text::now_ms())
                .map_err(store_err)?;
            audit(
                &store,
                EventKind::KeyCreated,
                &rec.id,
                json!({"name": rec.name, "admin": rec.admin, "via": "moat key create"}),
            );
            if json {
                print_json(&json!({
                    "id": rec.id, "name": rec.name, "admin": rec.admin,
                    "created_at": rec.created_at, "secret": secret,
                }));
            } else {
                println!("{secret}");
                eprintln!(
                    "created {}key {} ({}); the secret above is shown once: give it to the \
                     client as MOAT_API_KEY",
                    if rec.admin { "admin " } else { "" },
                    rec.id,
                    rec.name
                );
            }
            Ok(0)
        }
        KeyCmd::Ls { dir, json } => {
            let store = open(&dir)?;
            let keys = store.list_keys().map_err(store_err)?;
            if json {
                print_json(&serde_json::to_value(&keys).unwrap_or_default());
            } else {
                print!("{}", keys_table(&keys));
            }
            Ok(0)
        }
        KeyCmd::Revoke { id, dir, json } => {
            let store = open(&dir)?;
            let kid = KeyId::from(id.as_str());
            let now = text::now_ms();
            if !store.revoke_key(&kid, now).map_err(store_err)? {
                let why = match store.key(&kid).map_err(store_err)? {
                    Some(k) if k.revoked_at.is_some() => "it is already revoked",
                    _ => "there is no such key (see `moat key ls`)",
                };
                return Err(Error::Msg(format!("cannot revoke {id}: {why}")));
            }
            audit(
                &store,
                EventKind::KeyRevoked,
                &kid,
                json!({"via": "moat key revoke"}),
            );
            if json {
                print_json(&json!({"id": id, "revoked_at": now}));
            } else {
                println!("revoked {id}");
            }
            Ok(0)
        }
    }
}

/// The `key ls` table.
pub fn keys_table(keys: &[KeyRecord]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.id.to_string(),
                k.name.clone(),
                if k.admin { "yes" } else { "no" }.to_string(),
                text::utc(k.created_at),
                k.revoked_at.map_or_else(|| "-".to_string(), text::utc),
            ]
        })
        .collect();
    text::table(&["ID", "NAME", "ADMIN", "CREATED", "REVOKED"], &rows)
}

/// Whether `dir` holds a state database (for messages elsewhere).
pub fn has_state(dir: &Path) -> bool {
    dir.join("moat.db").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_table_shows_revocation() {
        let keys = vec![
            KeyRecord {
                id: KeyId::from("key_0123456789abcdef"),
                name: "admin".into(),
                admin: true,
                created_at: 0,
                revoked_at: None,
            },
            KeyRecord {
                id: KeyId::from("key_1"),
                name: "ci".into(),
                admin: false,
                created_at: 1000,
                revoked_at: Some(61_000),
            },
        ];
        let t = keys_table(&keys);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("ID "), "{t}");
        assert!(lines[1].contains("admin  yes"), "{t}");
        assert!(lines[1].ends_with('-'), "{t}");
        assert!(lines[2].ends_with("1970-01-01T00:01:01Z"), "{t}");
    }

    #[test]
    fn key_commands_work_on_a_state_dir() {
        let dir = std::env::temp_dir().join(format!("moat-key-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sd = || StateDir {
            state_dir: Some(dir.clone()),
        };
        // No state yet: a clear refusal, and nothing created.
        let e = main(KeyCmd::Ls {
            dir: sd(),
            json: false,
        })
        .unwrap_err();
        assert!(e.to_string().contains("moat serve --state-dir"), "{e}");
        assert!(!dir.exists());
        drop(Store::open(&dir).unwrap());
        assert!(has_state(&dir));
        assert_eq!(
            main(KeyCmd::Create {
                name: "ci".into(),
                admin: false,
                dir: sd(),
                json: true
            })
            .unwrap(),
            0
        );
        let store = Store::open(&dir).unwrap();
        let keys = store.list_keys().unwrap();
        assert_eq!(keys.len(), 1);
        let id = keys[0].id.to_string();
        assert_eq!(
            main(KeyCmd::Revoke {
                id: id.clone(),
                dir: sd(),
                json: false
            })
            .unwrap(),
            0
        );
        assert!(store.list_keys().unwrap()[0].revoked_at.is_some());
        let e = main(KeyCmd::Revoke {
            id,
            dir: sd(),
            json: false,
        })
        .unwrap_err();
        assert!(e.to_string().contains("already revoked"), "{e}");
        let e = main(KeyCmd::Revoke {
            id: "key_nope".into(),
            dir: sd(),
            json: false,
        })
        .unwrap_err();
        assert!(e.to_string().contains("no such key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
