use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::json;

use super::*;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "moat-engine-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn raw(dir: &TempDir) -> Connection {
    Connection::open(dir.path().join(DB_FILE)).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn sandbox(id: &str, owner: &KeyId, state: SandboxState, expires_at: u64) -> SandboxRecord {
    SandboxRecord {
        id: id.to_owned(),
        owner_key: owner.clone(),
        tier: "native".to_owned(),
        state,
        created_at: 1_000,
        expires_at,
        metadata: BTreeMap::new(),
        policy_json: r#"{"network":"none"}"#.to_owned(),
        runtime: None,
        error: None,
    }
}

fn event(ts: u64, key: Option<&KeyId>, sandbox: Option<&str>, kind: EventKind) -> Event {
    Event {
        ts,
        key_id: key.cloned(),
        sandbox_id: sandbox.map(str::to_owned),
        kind,
        data: json!({ "ts": ts }),
    }
}

fn ids(list: &[SandboxRecord]) -> Vec<&str> {
    list.iter().map(|s| s.id.as_str()).collect()
}

fn seqs(list: &[(u64, Event)]) -> Vec<u64> {
    list.iter().map(|(seq, _)| *seq).collect()
}

/// A store with keys A and B (not admin) and an admin key.
fn three_keys(dir: &TempDir) -> (Store, KeyId, KeyId, KeyId) {
    let store = Store::open(dir.path()).unwrap();
    let (a, _) = store.create_key("a", false, 1).unwrap();
    let (b, _) = store.create_key("b", false, 2).unwrap();
    let (admin, _) = store.create_key("root", true, 3).unwrap();
    (store, a.id, b.id, admin.id)
}

// --- opening ---------------------------------------------------------------------------------

#[test]
fn open_creates_a_private_wal_database_at_the_current_version() {
    let tmp = TempDir::new("open");
    let dir = tmp.path().join("state/nested");
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.path(), dir.join(DB_FILE));
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(DB_FILE)), 0o600);

    let journal: String = store
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    let sync: i64 = store
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    let fk: i64 = store
        .conn
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
    assert_eq!(sync, 2, "synchronous must be FULL");
    assert_eq!(fk, 1);

    store
        .append_event(&event(1, None, None, EventKind::ApiCall))
        .unwrap();
    let wal = dir.join(format!("{DB_FILE}-wal"));
    assert!(wal.exists());
    assert_eq!(mode(&wal), 0o600);

    drop(store);
    // Reopening runs no migration again and keeps the data.
    let store = Store::open(&dir).unwrap();
    let version: i64 = store
        .conn
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, i64::from(SCHEMA_VERSION));
    assert_eq!(store.last_seq().unwrap(), 1);
}

#[test]
fn open_tightens_a_database_file_with_a_wide_mode() {
    let tmp = TempDir::new("widemode");
    drop(Store::open(tmp.path()).unwrap());
    let db = tmp.path().join(DB_FILE);
    fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).unwrap();
    drop(Store::open(tmp.path()).unwrap());
    assert_eq!(mode(&db), 0o600);
}

#[test]
fn a_newer_schema_is_refused_with_a_clear_error() {
    let tmp = TempDir::new("newer");
    drop(Store::open(tmp.path()).unwrap());
    raw(&tmp)
        .execute(
            "UPDATE schema_version SET version = ?1",
            [SCHEMA_VERSION + 1],
        )
        .unwrap();
    let err = Store::open(tmp.path()).unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found, supported, .. }
            if found == i64::from(SCHEMA_VERSION) + 1 && supported == SCHEMA_VERSION),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("schema version 2"), "{msg}");
    assert!(msg.contains("upgrade moat"), "{msg}");
    assert!(
        msg.contains(&tmp.path().join(DB_FILE).display().to_string()),
        "{msg}"
    );
}

#[test]
fn errors_carry_their_cause() {
    let tmp = TempDir::new("cause");
    // A file where the state directory should be.
    let file = tmp.path().join("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let err = Store::open(&file).unwrap_err();
    assert!(matches!(err, StoreError::Prepare { .. }), "{err:?}");
    assert!(std::error::Error::source(&err).is_some());
}

// --- API keys --------------------------------------------------------------------------------

#[test]
fn keys_round_trip_and_verify() {
    let tmp = TempDir::new("keys");
    let store = Store::open(tmp.path()).unwrap();
    let (k1, s1) = store.create_key("ci", false, 100).unwrap();
    let (k2, s2) = store.create_key("ops", true, 200).unwrap();

    // Secret format: moat_key_<16 hex>_<64 hex>, the id embedded, 32 random bytes.
    assert!(k1.id.as_str().starts_with("key_") && k1.id.as_str().len() == 20);
    assert!(s1.starts_with(&format!("moat_{}_", k1.id)));
    assert_eq!(s1.len(), "moat_".len() + 20 + 1 + 64);
    assert_ne!(s1, s2);
    assert_ne!(k1.id, k2.id);

    assert_eq!(
        k1,
        KeyRecord {
            id: k1.id.clone(),
            name: "ci".into(),
            admin: false,
            created_at: 100,
            revoked_at: None
        }
    );
    assert_eq!(store.verify_key(&s1).unwrap(), Some(k1.clone()));
    assert_eq!(store.verify_key(&s2).unwrap(), Some(k2.clone()));
    assert_eq!(store.key(&k2.id).unwrap(), Some(k2.clone()));
    assert_eq!(
        store.key(&KeyId::from("key_0000000000000000")).unwrap(),
        None
    );
    assert_eq!(store.list_keys().unwrap(), vec![k1.clone(), k2.clone()]);

    // Wrong secrets: another key's random part under k1's id, a flipped character, garbage.
    let (_, r2) = s2.rsplit_once('_').unwrap();
    let forged = format!("moat_{}_{r2}", k1.id);
    assert_eq!(store.verify_key(&forged).unwrap(), None);
    let mut flipped = s1.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    assert_eq!(store.verify_key(&flipped).unwrap(), None);
    for bad in [
        "",
        "moat_",
        "moat_key_",
        &s1[..s1.len() - 1],
        &format!("{s1}0"),
        &s1.to_uppercase(),
        &s1.replace("moat_key_", "moat_tok_"),
        "Bearer x",
    ] {
        assert_eq!(store.verify_key(bad).unwrap(), None, "{bad:?}");
    }

    // Revocation.
    assert!(store.revoke_key(&k1.id, 300).unwrap());
    assert!(!store.revoke_key(&k1.id, 301).unwrap());
    assert!(!store
        .revoke_key(&KeyId::from("key_ffffffffffffffff"), 301)
        .unwrap());
    assert_eq!(store.verify_key(&s1).unwrap(), None);
    assert_eq!(store.verify_key(&s2).unwrap(), Some(k2.clone()));
    assert_eq!(store.key(&k1.id).unwrap().unwrap().revoked_at, Some(300));
    assert_eq!(store.list_keys().unwrap().len(), 2);
}

#[test]
fn the_keys_table_holds_no_secret() {
    let tmp = TempDir::new("nosecret");
    let store = Store::open(tmp.path()).unwrap();
    let (key, secret) = store.create_key("x", false, 1).unwrap();
    let (_, random) = secret.rsplit_once('_').unwrap();

    let conn = raw(&tmp);
    let mut stmt = conn.prepare("SELECT * FROM keys").unwrap();
    let columns = stmt.column_count();
    let mut rows = stmt.query([]).unwrap();
    let row = rows.next().unwrap().unwrap();
    for i in 0..columns {
        let text = match row.get_ref(i).unwrap() {
            rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
            rusqlite::types::ValueRef::Blob(b) => hex::encode(b),
            other => format!("{other:?}"),
        };
        assert!(!text.contains(random), "column {i} holds the secret");
        assert!(!text.contains(&secret), "column {i} holds the secret");
    }
    let hash: Vec<u8> = conn
        .query_row(
            "SELECT hash FROM keys WHERE id = ?1",
            [key.id.as_str()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(hash, Sha256::digest(secret.as_bytes()).to_vec());
    assert!(rows.next().unwrap().is_none());
}

#[test]
fn ensure_admin_key_writes_a_private_file_once() {
    let tmp = TempDir::new("adminkey");
    let store = Store::open(tmp.path()).unwrap();
    let file = tmp.path().join("admin.key");

    let secret = store.ensure_admin_key(&file, 42).unwrap().unwrap();
    assert_eq!(fs::read_to_string(&file).unwrap(), format!("{secret}\n"));
    assert_eq!(mode(&file), 0o600);
    let key = store.verify_key(&secret).unwrap().unwrap();
    assert!(key.admin);
    assert_eq!(key.name, "admin");
    assert_eq!(key.created_at, 42);

    // Not again: a key exists. The file is untouched even when it has been removed.
    assert_eq!(store.ensure_admin_key(&file, 43).unwrap(), None);
    assert_eq!(fs::read_to_string(&file).unwrap(), format!("{secret}\n"));
    fs::remove_file(&file).unwrap();
    assert_eq!(store.ensure_admin_key(&file, 44).unwrap(), None);
    assert!(!file.exists());
    // A reopened store agrees, and revoking the key does not mint a new one.
    drop(store);
    let store = Store::open(tmp.path()).unwrap();
    store.revoke_key(&key.id, 45).unwrap();
    assert_eq!(store.ensure_admin_key(&file, 46).unwrap(), None);
    assert_eq!(store.list_keys().unwrap().len(), 1);
}

#[test]
fn ensure_admin_key_never_overwrites_a_file() {
    let tmp = TempDir::new("adminkeyexists");
    let store = Store::open(tmp.path()).unwrap();
    let file = tmp.path().join("admin.key");
    fs::write(&file, "old\n").unwrap();
    let err = store.ensure_admin_key(&file, 1).unwrap_err();
    assert!(
        matches!(err, StoreError::AdminKeyFileExists { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("move it away"), "{err}");
    assert_eq!(fs::read_to_string(&file).unwrap(), "old\n");
    // The failed attempt left no key behind.
    assert!(store.list_keys().unwrap().is_empty());

    // A file that cannot be created (missing directory) also leaves no key.
    let missing = tmp.path().join("missing/admin.key");
    let err = store.ensure_admin_key(&missing, 1).unwrap_err();
    assert!(matches!(err, StoreError::AdminKeyFile { .. }), "{err:?}");
    assert!(store.list_keys().unwrap().is_empty());
}

// --- tokens ----------------------------------------------------------------------------------

#[test]
fn tokens_expire_at_exactly_their_ttl() {
    let tmp = TempDir::new("tokttl");
    let (store, a, _, _) = three_keys(&tmp);
    store
        .insert_sandbox(&sandbox("sbx_1", &a, SandboxState::Running, 1_000_000))
        .unwrap();
    let (tok, secret) = store
        .create_token(
            &a,
            "sbx_1",
            &[Scope::FilesWrite, Scope::Exec, Scope::Exec],
            Duration::from_secs(60),
            10_000,
        )
        .unwrap();
    assert!(secret.starts_with(&format!("moat_{}_", tok.id)));
    assert!(tok.id.as_str().starts_with("tok_"));
    assert_eq!(tok.expires_at, 70_000);
    assert_eq!(
        tok.scopes,
        vec![Scope::Exec, Scope::FilesWrite],
        "sorted, no duplicates"
    );
    assert!(tok.allows(Scope::Exec) && !tok.allows(Scope::FilesRead));
    assert_eq!(tok.parent_key, a);
    assert_eq!(tok.sandbox_id, "sbx_1");

    assert_eq!(
        store.verify_token(&secret, 10_000).unwrap(),
        Some(tok.clone())
    );
    assert_eq!(
        store.verify_token(&secret, 69_999).unwrap(),
        Some(tok.clone())
    );
    assert_eq!(store.verify_token(&secret, 70_000).unwrap(), None);
    assert_eq!(store.verify_token(&secret, 70_001).unwrap(), None);

    // A token is not a key, a key is not a token.
    assert_eq!(store.verify_key(&secret).unwrap(), None);
    let (_, key_secret) = store.create_key("c", false, 1).unwrap();
    assert_eq!(store.verify_token(&key_secret, 10_000).unwrap(), None);
    // A wrong random part under a real token id.
    let forged = format!("moat_{}_{}", tok.id, "0".repeat(64));
    assert_eq!(store.verify_token(&forged, 10_000).unwrap(), None);
}

#[test]
fn tokens_are_bound_to_a_sandbox_their_key_can_see() {
    let tmp = TempDir::new("tokbind");
    let (store, a, b, admin) = three_keys(&tmp);
    store
        .insert_sandbox(&sandbox("sbx_a", &a, SandboxState::Running, 1_000_000))
        .unwrap();
    let ttl = Duration::from_secs(60);

    let err = store
        .create_token(&b, "sbx_a", &[Scope::Read], ttl, 1)
        .unwrap_err();
    assert!(matches!(err, StoreError::SandboxNotFound { .. }), "{err:?}");
    let err = store
        .create_token(&a, "sbx_missing", &[Scope::Read], ttl, 1)
        .unwrap_err();
    assert!(matches!(err, StoreError::SandboxNotFound { .. }), "{err:?}");
    let err = store
        .create_token(&KeyId::from("key_nope"), "sbx_a", &[Scope::Read], ttl, 1)
        .unwrap_err();
    assert!(matches!(err, StoreError::KeyNotUsable { .. }), "{err:?}");

    // An admin may issue one for anybody's sandbox.
    let (tok, secret) = store
        .create_token(&admin, "sbx_a", &[Scope::Read], ttl, 1)
        .unwrap();
    assert_eq!(
        store.verify_token(&secret, 2).unwrap().unwrap().sandbox_id,
        "sbx_a"
    );
    assert_eq!(tok.parent_key, admin);

    // A revoked key issues none.
    store.revoke_key(&b, 5).unwrap();
    store
        .insert_sandbox(&sandbox("sbx_b", &b, SandboxState::Running, 1_000_000))
        .unwrap();
    let err = store
        .create_token(&b, "sbx_b", &[Scope::Read], ttl, 6)
        .unwrap_err();
    assert!(matches!(err, StoreError::KeyNotUsable { .. }), "{err:?}");
}

#[test]
fn tokens_die_with_their_sandbox_their_key_and_revocation() {
    let tmp = TempDir::new("tokdie");
    let (store, a, b, _) = three_keys(&tmp);
    for id in ["sbx_1", "sbx_2", "sbx_3"] {
        store
            .insert_sandbox(&sandbox(id, &a, SandboxState::Running, 1_000_000))
            .unwrap();
    }
    store
        .insert_sandbox(&sandbox("sbx_b", &b, SandboxState::Running, 1_000_000))
        .unwrap();
    let ttl = Duration::from_secs(3600);
    let (_, t1) = store
        .create_token(&a, "sbx_1", &[Scope::Exec], ttl, 1)
        .unwrap();
    let (t2rec, t2) = store
        .create_token(&a, "sbx_2", &[Scope::Exec], ttl, 1)
        .unwrap();
    let (_, t3) = store
        .create_token(&a, "sbx_3", &[Scope::Exec], ttl, 1)
        .unwrap();
    let (_, tb) = store
        .create_token(&b, "sbx_b", &[Scope::Exec], ttl, 1)
        .unwrap();
    for t in [&t1, &t2, &t3, &tb] {
        assert!(store.verify_token(t, 2).unwrap().is_some());
    }

    // The sandbox goes: the token goes (the row is deleted with it).
    assert!(store.delete_sandbox("sbx_1").unwrap());
    assert_eq!(store.verify_token(&t1, 2).unwrap(), None);
    let left: i64 = raw(&tmp)
        .query_row(
            "SELECT count(*) FROM tokens WHERE sandbox_id = 'sbx_1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0);

    // Revoked token.
    assert!(store.revoke_token(&t2rec.id, 3).unwrap());
    assert!(!store.revoke_token(&t2rec.id, 3).unwrap());
    assert_eq!(store.verify_token(&t2, 4).unwrap(), None);

    // Revoked parent key: its tokens stop, other keys' tokens keep working.
    store.revoke_key(&a, 5).unwrap();
    assert_eq!(store.verify_token(&t3, 6).unwrap(), None);
    assert!(store.verify_token(&tb, 6).unwrap().is_some());
}

#[test]
fn authenticate_tells_keys_from_tokens() {
    let tmp = TempDir::new("auth");
    let store = Store::open(tmp.path()).unwrap();
    let (key, key_secret) = store.create_key("a", false, 1).unwrap();
    store
        .insert_sandbox(&sandbox("sbx_1", &key.id, SandboxState::Running, 1_000_000))
        .unwrap();
    let (tok, tok_secret) = store
        .create_token(&key.id, "sbx_1", &[Scope::Read], Duration::from_secs(1), 1)
        .unwrap();
    assert_eq!(
        store.authenticate(&key_secret, 1).unwrap(),
        Some(Principal::Key(key))
    );
    assert_eq!(
        store.authenticate(&tok_secret, 1).unwrap(),
        Some(Principal::Token(tok))
    );
    assert_eq!(store.authenticate(&tok_secret, 1_001).unwrap(), None);
    assert_eq!(store.authenticate("nonsense", 1).unwrap(), None);
}

// --- sandboxes -------------------------------------------------------------------------------

#[test]
fn sandboxes_round_trip() {
    let tmp = TempDir::new("sbxrt");
    let (store, a, _, _) = three_keys(&tmp);
    let id = new_sandbox_id().unwrap();
    assert!(id.starts_with("sbx_") && id.len() == 20);
    assert_ne!(id, new_sandbox_id().unwrap());
    let record = SandboxRecord {
        id: id.clone(),
        owner_key: a.clone(),
        tier: "gvisor".into(),
        state: SandboxState::Creating,
        created_at: 1_700_000_000_000,
        expires_at: 1_700_000_300_000,
        metadata: BTreeMap::from([
            ("user".to_owned(), "ada".to_owned()),
            ("odd \"key\".$[0]".to_owned(), "välue\n".to_owned()),
        ]),
        policy_json: r#"{"limits":{"memory":"512M"}}"#.into(),
        runtime: Some(RuntimeInfo {
            init_pid: 4242,
            init_start_time: 987_654_321,
            agent_socket: "/run/moat/sbx/agent.sock".into(),
            cgroup_paths: vec!["/sys/fs/cgroup/moat/sbx".into()],
            tier_state: None,
            layers: None,
        }),
        error: Some("nothing yet".into()),
    };
    store.insert_sandbox(&record).unwrap();
    assert_eq!(store.get_sandbox(&id, &a).unwrap(), Some(record.clone()));
    assert_eq!(store.sandbox(&id).unwrap(), Some(record.clone()));
    drop(store);
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.sandbox(&id).unwrap(), Some(record.clone()));
    assert_eq!(
        store.all_sandboxes(&SandboxFilter::default()).unwrap(),
        vec![record.clone()]
    );

    // Duplicate id, unknown owner.
    let err = store.insert_sandbox(&record).unwrap_err();
    assert!(matches!(err, StoreError::SandboxExists { .. }), "{err:?}");
    let orphan = sandbox(
        "sbx_orphan",
        &KeyId::from("key_nobody"),
        SandboxState::Running,
        9,
    );
    let err = store.insert_sandbox(&orphan).unwrap_err();
    assert!(matches!(err, StoreError::KeyNotUsable { .. }), "{err:?}");

    // Deleted: gone, and its id is never handed out again.
    assert!(store.delete_sandbox(&id).unwrap());
    assert!(!store.delete_sandbox(&id).unwrap());
    assert_eq!(store.sandbox(&id).unwrap(), None);
    let err = store.insert_sandbox(&record).unwrap_err();
    assert!(matches!(err, StoreError::SandboxExists { .. }), "{err:?}");
}

#[test]
fn a_key_sees_only_its_own_sandboxes_and_an_admin_sees_all() {
    let tmp = TempDir::new("tenancy");
    let (store, a, b, admin) = three_keys(&tmp);
    let sa = sandbox("sbx_a", &a, SandboxState::Running, 1_000_000);
    let mut sb = sandbox("sbx_b", &b, SandboxState::Running, 1_000_000);
    sb.created_at = 2_000;
    store.insert_sandbox(&sa).unwrap();
    store.insert_sandbox(&sb).unwrap();
    let all = SandboxFilter::default();

    assert_eq!(store.get_sandbox("sbx_a", &a).unwrap(), Some(sa.clone()));
    assert_eq!(store.get_sandbox("sbx_a", &b).unwrap(), None);
    assert_eq!(store.get_sandbox("sbx_b", &a).unwrap(), None);
    // Another key's sandbox reads exactly like a missing one.
    assert_eq!(
        store.get_sandbox("sbx_a", &b).unwrap(),
        store.get_sandbox("sbx_missing", &b).unwrap()
    );
    assert_eq!(
        store.get_sandbox("sbx_a", &admin).unwrap(),
        Some(sa.clone())
    );
    assert_eq!(
        store.get_sandbox("sbx_b", &admin).unwrap(),
        Some(sb.clone())
    );

    assert_eq!(ids(&store.list_sandboxes(&a, &all).unwrap()), ["sbx_a"]);
    assert_eq!(ids(&store.list_sandboxes(&b, &all).unwrap()), ["sbx_b"]);
    assert_eq!(
        ids(&store.list_sandboxes(&admin, &all).unwrap()),
        ["sbx_a", "sbx_b"]
    );

    // A fresh key sees nothing; a revoked key sees nothing, admin or not; an unknown key too.
    let (c, _) = store.create_key("c", false, 4).unwrap();
    assert!(store.list_sandboxes(&c.id, &all).unwrap().is_empty());
    assert_eq!(store.get_sandbox("sbx_a", &c.id).unwrap(), None);
    store.revoke_key(&a, 5).unwrap();
    store.revoke_key(&admin, 5).unwrap();
    assert_eq!(store.get_sandbox("sbx_a", &a).unwrap(), None);
    assert!(store.list_sandboxes(&a, &all).unwrap().is_empty());
    assert!(store.list_sandboxes(&admin, &all).unwrap().is_empty());
    assert!(store
        .list_sandboxes(&KeyId::from("key_ghost"), &all)
        .unwrap()
        .is_empty());
}

#[test]
fn list_filters_by_state_and_metadata() {
    let tmp = TempDir::new("filter");
    let (store, a, b, _) = three_keys(&tmp);
    let meta = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let mut s1 = sandbox("sbx_1", &a, SandboxState::Running, 9_000);
    s1.metadata = meta(&[("env", "ci"), ("team", "x")]);
    let mut s2 = sandbox("sbx_2", &a, SandboxState::Paused, 9_000);
    s2.metadata = meta(&[("env", "ci"), ("team", "y")]);
    let mut s3 = sandbox("sbx_3", &a, SandboxState::Running, 9_000);
    s3.metadata = meta(&[("env", "dev"), ("a.b", "1"), ("q\"k", "v")]);
    let mut s4 = sandbox("sbx_4", &b, SandboxState::Running, 9_000);
    s4.metadata = meta(&[("env", "ci")]);
    for s in [&s1, &s2, &s3, &s4] {
        store.insert_sandbox(s).unwrap();
    }
    let list = |state: Option<SandboxState>, pairs: &[(&str, &str)]| {
        let filter = SandboxFilter {
            state,
            metadata: meta(pairs),
        };
        store
            .list_sandboxes(&a, &filter)
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(list(None, &[]), ["sbx_1", "sbx_2", "sbx_3"]);
    assert_eq!(list(Some(SandboxState::Running), &[]), ["sbx_1", "sbx_3"]);
    assert_eq!(list(Some(SandboxState::Stopped), &[]), Vec::<String>::new());
    assert_eq!(list(None, &[("env", "ci")]), ["sbx_1", "sbx_2"]);
    assert_eq!(list(None, &[("env", "ci"), ("team", "y")]), ["sbx_2"]);
    assert_eq!(
        list(None, &[("env", "ci"), ("team", "z")]),
        Vec::<String>::new()
    );
    assert_eq!(
        list(Some(SandboxState::Running), &[("env", "ci")]),
        ["sbx_1"]
    );
    assert_eq!(list(None, &[("a.b", "1")]), ["sbx_3"]);
    assert_eq!(list(None, &[("q\"k", "v")]), ["sbx_3"]);
    assert_eq!(list(None, &[("ENV", "ci")]), Vec::<String>::new());
    assert_eq!(list(None, &[("env", "CI")]), Vec::<String>::new());
    assert_eq!(list(None, &[("missing", "")]), Vec::<String>::new());
}

#[test]
fn set_state_is_a_compare_and_set() {
    use SandboxState::*;
    let tmp = TempDir::new("cas");
    let (store, a, _, _) = three_keys(&tmp);
    store
        .insert_sandbox(&sandbox("sbx_1", &a, Creating, 9_000))
        .unwrap();
    let state = || store.sandbox("sbx_1").unwrap().unwrap().state;

    assert!(!store.set_state("sbx_1", &[Running], Paused).unwrap());
    assert_eq!(state(), Creating);
    assert!(store.set_state("sbx_1", &[Creating], Running).unwrap());
    assert_eq!(state(), Running);
    // The second of two racing callers loses.
    assert!(store
        .set_state("sbx_1", &[Running, Paused], Stopping)
        .unwrap());
    assert!(!store
        .set_state("sbx_1", &[Running, Paused], Stopping)
        .unwrap());
    assert!(!store.set_state("sbx_1", &[], Stopped).unwrap());
    assert_eq!(state(), Stopping);
    assert!(!store
        .set_state("sbx_missing", &[Stopping], Stopped)
        .unwrap());

    assert!(!store.set_failed("sbx_1", &[Creating], "boom").unwrap());
    assert_eq!(store.sandbox("sbx_1").unwrap().unwrap().error, None);
    assert!(store
        .set_failed("sbx_1", &[Stopping], "cgroup gone")
        .unwrap());
    let s = store.sandbox("sbx_1").unwrap().unwrap();
    assert_eq!((s.state, s.error.as_deref()), (Failed, Some("cgroup gone")));
    // A plain state change keeps the recorded error.
    assert!(store.set_state("sbx_1", &[Failed], Stopped).unwrap());
    assert_eq!(
        store.sandbox("sbx_1").unwrap().unwrap().error.as_deref(),
        Some("cgroup gone")
    );
}

#[test]
fn runtime_info_is_set_and_cleared() {
    let tmp = TempDir::new("runtime");
    let (store, a, _, _) = three_keys(&tmp);
    store
        .insert_sandbox(&sandbox("sbx_1", &a, SandboxState::Creating, 9_000))
        .unwrap();
    let info = RuntimeInfo {
        init_pid: 77,
        init_start_time: 123_456,
        agent_socket: "/tmp/a.sock".into(),
        cgroup_paths: vec![
            "/sys/fs/cgroup/cpu/x".into(),
            "/sys/fs/cgroup/memory/x".into(),
        ],
        tier_state: Some(serde_json::json!({"id": "g1"})),
        layers: Some(serde_json::json!({"tier": "gvisor", "seccomp": true})),
    };
    assert!(store.set_runtime("sbx_1", Some(&info)).unwrap());
    assert_eq!(store.sandbox("sbx_1").unwrap().unwrap().runtime, Some(info));
    assert!(store.set_runtime("sbx_1", None).unwrap());
    assert_eq!(store.sandbox("sbx_1").unwrap().unwrap().runtime, None);
    assert!(!store.set_runtime("sbx_missing", None).unwrap());
}

#[test]
fn expiry_is_extended_up_to_the_server_maximum() {
    let tmp = TempDir::new("extend");
    let (store, a, _, _) = three_keys(&tmp);
    // created_at = 1_000
    store
        .insert_sandbox(&sandbox("sbx_1", &a, SandboxState::Running, 301_000))
        .unwrap();
    store
        .insert_sandbox(&sandbox("sbx_stopped", &a, SandboxState::Stopped, 301_000))
        .unwrap();
    let max = Duration::from_secs(3600);
    assert_eq!(
        store.extend_expiry("sbx_1", 601_000, max).unwrap(),
        Some(601_000)
    );
    assert_eq!(store.sandbox("sbx_1").unwrap().unwrap().expires_at, 601_000);
    // Past the maximum: clamped to created_at + max.
    assert_eq!(
        store.extend_expiry("sbx_1", 99_999_999, max).unwrap(),
        Some(3_601_000)
    );
    assert_eq!(
        store.sandbox("sbx_1").unwrap().unwrap().expires_at,
        3_601_000
    );
    // Shortening is allowed; huge values do not overflow.
    assert_eq!(
        store.extend_expiry("sbx_1", 5_000, max).unwrap(),
        Some(5_000)
    );
    assert_eq!(
        store
            .extend_expiry("sbx_1", u64::MAX, Duration::MAX)
            .unwrap(),
        Some(i64::MAX as u64)
    );
    // Not live, or missing: nothing changes.
    assert_eq!(
        store.extend_expiry("sbx_stopped", 601_000, max).unwrap(),
        None
    );
    assert_eq!(
        store.sandbox("sbx_stopped").unwrap().unwrap().expires_at,
        301_000
    );
    assert_eq!(
        store.extend_expiry("sbx_missing", 601_000, max).unwrap(),
        None
    );
}

#[test]
fn expired_finds_sandboxes_that_expired_while_the_daemon_was_down() {
    use SandboxState::*;
    let tmp = TempDir::new("expired");
    {
        let (store, a, b, _) = three_keys(&tmp);
        for (id, owner, state, expires_at) in [
            ("sbx_run_old", &a, Running, 2_000),
            ("sbx_paused_old", &b, Paused, 1_500),
            ("sbx_run_edge", &a, Running, 5_000),
            ("sbx_run_new", &a, Running, 5_001),
            ("sbx_stopped_old", &a, Stopped, 1_000),
            ("sbx_failed_old", &a, Failed, 1_000),
            ("sbx_creating_old", &a, Creating, 1_000),
            ("sbx_stopping_old", &a, Stopping, 1_000),
        ] {
            store
                .insert_sandbox(&sandbox(id, owner, state, expires_at))
                .unwrap();
        }
        assert!(store.expired(1_000).unwrap().is_empty());
    } // the "daemon" goes down

    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(
        store.expired(5_000).unwrap(),
        ["sbx_paused_old", "sbx_run_old", "sbx_run_edge"]
    );
    assert_eq!(store.expired(5_001).unwrap().len(), 4);
    // Once the daemon moves them on, they are no longer listed.
    assert!(store
        .set_state("sbx_run_old", &[Running, Paused], Stopping)
        .unwrap());
    assert_eq!(
        store.expired(5_000).unwrap(),
        ["sbx_paused_old", "sbx_run_edge"]
    );
}

// --- events ----------------------------------------------------------------------------------

#[test]
fn events_round_trip_in_strictly_increasing_seq() {
    let tmp = TempDir::new("events");
    let store = Store::open(tmp.path()).unwrap();
    let (k, _) = store.create_key("a", false, 1).unwrap();
    assert_eq!(store.last_seq().unwrap(), 0);
    let mut appended = Vec::new();
    for (i, kind) in EventKind::ALL.iter().enumerate() {
        let mut e = event(i as u64, Some(&k.id), Some("sbx_x"), *kind);
        e.data = json!({ "argv": ["sh", "-c", "echo ü"], "exit": i, "nested": { "ok": true } });
        let seq = store.append_event(&e).unwrap();
        appended.push((seq, e));
    }
    let anonymous = event(99, None, None, EventKind::AuthFailed);
    appended.push((store.append_event(&anonymous).unwrap(), anonymous));

    let all = store.events(&EventFilter::default()).unwrap();
    assert_eq!(all, appended);
    assert!(
        all.windows(2).all(|w| w[0].0 < w[1].0),
        "strictly increasing"
    );
    assert_eq!(store.last_seq().unwrap(), all.last().unwrap().0);

    // Survives reopening, and seq keeps increasing afterwards.
    drop(store);
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.events(&EventFilter::default()).unwrap(), appended);
    let next = store
        .append_event(&event(100, None, None, EventKind::ApiCall))
        .unwrap();
    assert!(next > appended.last().unwrap().0);
}

#[test]
fn events_filter_by_sandbox_seq_kind_owner_and_limit() {
    use EventKind::{
        ApiCall, AuthFailed, ExecFinished, ExecStarted, FileWrite, SandboxCreated, SandboxExpired,
    };
    let tmp = TempDir::new("evfilter");
    let (store, a, b, admin) = three_keys(&tmp);
    store
        .insert_sandbox(&sandbox("sbx_a", &a, SandboxState::Running, 9_000))
        .unwrap();
    store
        .insert_sandbox(&sandbox("sbx_b", &b, SandboxState::Running, 9_000))
        .unwrap();
    let e1 = store
        .append_event(&event(1, Some(&a), Some("sbx_a"), SandboxCreated))
        .unwrap();
    let e2 = store
        .append_event(&event(2, Some(&b), Some("sbx_b"), SandboxCreated))
        .unwrap();
    let e3 = store
        .append_event(&event(3, Some(&a), Some("sbx_a"), ExecStarted))
        .unwrap();
    let e4 = store
        .append_event(&event(4, Some(&a), Some("sbx_a"), ExecFinished))
        .unwrap();
    // The daemon (no key) expires A's sandbox; an admin looks at it; A lists (no sandbox).
    let e5 = store
        .append_event(&event(5, None, Some("sbx_a"), SandboxExpired))
        .unwrap();
    let e6 = store
        .append_event(&event(6, Some(&admin), Some("sbx_a"), ApiCall))
        .unwrap();
    let e7 = store
        .append_event(&event(7, Some(&a), None, ApiCall))
        .unwrap();
    let e8 = store
        .append_event(&event(8, None, None, AuthFailed))
        .unwrap();
    let e9 = store
        .append_event(&event(9, Some(&b), Some("sbx_b"), FileWrite))
        .unwrap();

    let q = |f: EventFilter| seqs(&store.events(&f).unwrap());
    assert_eq!(
        q(EventFilter::default()),
        [e1, e2, e3, e4, e5, e6, e7, e8, e9]
    );
    assert_eq!(
        q(EventFilter {
            sandbox_id: Some("sbx_a".into()),
            ..Default::default()
        }),
        [e1, e3, e4, e5, e6]
    );
    assert_eq!(
        q(EventFilter {
            since_seq: Some(e4),
            ..Default::default()
        }),
        [e5, e6, e7, e8, e9]
    );
    assert_eq!(
        q(EventFilter {
            kinds: vec![SandboxCreated, FileWrite],
            ..Default::default()
        }),
        [e1, e2, e9]
    );
    // Owner: events made with the key, and events about its sandboxes made by others.
    assert_eq!(
        q(EventFilter {
            owner_key: Some(a.clone()),
            ..Default::default()
        }),
        [e1, e3, e4, e5, e6, e7]
    );
    assert_eq!(
        q(EventFilter {
            owner_key: Some(b.clone()),
            ..Default::default()
        }),
        [e2, e9]
    );
    assert_eq!(
        q(EventFilter {
            limit: Some(2),
            since_seq: Some(e2),
            ..Default::default()
        }),
        [e3, e4]
    );
    assert_eq!(
        q(EventFilter {
            limit: Some(0),
            ..Default::default()
        }),
        Vec::<u64>::new()
    );
    // All together.
    assert_eq!(
        q(EventFilter {
            sandbox_id: Some("sbx_a".into()),
            since_seq: Some(e1),
            kinds: vec![ExecStarted, ExecFinished, SandboxExpired],
            owner_key: Some(a.clone()),
            limit: Some(2),
        }),
        [e3, e4]
    );
    // B filtering on A's sandbox gets nothing.
    assert_eq!(
        q(EventFilter {
            sandbox_id: Some("sbx_a".into()),
            owner_key: Some(b.clone()),
            ..Default::default()
        }),
        Vec::<u64>::new()
    );
}

#[test]
fn deleting_a_sandbox_keeps_its_events_and_their_owner() {
    let tmp = TempDir::new("evdelete");
    let (store, a, b, _) = three_keys(&tmp);
    store
        .insert_sandbox(&sandbox("sbx_a", &a, SandboxState::Running, 9_000))
        .unwrap();
    let e1 = store
        .append_event(&event(1, Some(&a), Some("sbx_a"), EventKind::ExecStarted))
        .unwrap();
    assert!(store.delete_sandbox("sbx_a").unwrap());
    // Appended after the row is gone: still A's.
    let e2 = store
        .append_event(&event(2, None, Some("sbx_a"), EventKind::SandboxDestroyed))
        .unwrap();
    let by_owner = |k: &KeyId| {
        seqs(
            &store
                .events(&EventFilter {
                    owner_key: Some(k.clone()),
                    ..Default::default()
                })
                .unwrap(),
        )
    };
    assert_eq!(by_owner(&a), [e1, e2]);
    assert!(by_owner(&b).is_empty());
    let for_sandbox = store
        .events(&EventFilter {
            sandbox_id: Some("sbx_a".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(seqs(&for_sandbox), [e1, e2]);
}

#[test]
fn events_cannot_be_updated_or_deleted_even_with_raw_sql() {
    let tmp = TempDir::new("appendonly");
    let store = Store::open(tmp.path()).unwrap();
    let seq = store
        .append_event(&event(1, None, None, EventKind::ApiCall))
        .unwrap();
    let before = store.events(&EventFilter::default()).unwrap();

    let conn = raw(&tmp);
    for stmt in [
        "UPDATE events SET data = '{}'",
        "UPDATE events SET seq = seq + 100",
        "DELETE FROM events",
        "DELETE FROM events WHERE seq = 1",
    ] {
        let err = conn.execute(stmt, []).unwrap_err();
        assert!(err.to_string().contains("append-only"), "{stmt}: {err}");
    }
    // The store's own connection is refused just the same.
    let err = store.conn.execute("DELETE FROM events", []).unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    assert_eq!(store.events(&EventFilter::default()).unwrap(), before);
    assert_eq!(before[0].0, seq);
}

#[test]
fn two_handles_append_concurrently_without_loss() {
    const PER_THREAD: u64 = 500;
    let tmp = TempDir::new("concurrent");
    let dir = tmp.path().to_owned();
    drop(Store::open(&dir).unwrap());
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                // Each thread opens its own handle, like a second process would.
                let store = Store::open(&dir).unwrap();
                (0..PER_THREAD)
                    .map(|i| {
                        let mut e = event(i, None, None, EventKind::ApiCall);
                        e.data = json!({ "thread": t, "i": i });
                        store.append_event(&e).unwrap()
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut all = BTreeSet::new();
    for t in threads {
        let seqs = t.join().unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        all.extend(seqs);
    }
    assert_eq!(all.len(), 2 * PER_THREAD as usize);

    let store = Store::open(&dir).unwrap();
    let events = store.events(&EventFilter::default()).unwrap();
    assert_eq!(events.len(), 2 * PER_THREAD as usize);
    assert_eq!(seqs(&events).into_iter().collect::<BTreeSet<_>>(), all);
    for t in 0..2u64 {
        let mine: Vec<u64> = events
            .iter()
            .filter(|(_, e)| e.data["thread"] == t)
            .map(|(_, e)| e.data["i"].as_u64().unwrap())
            .collect();
        assert_eq!(
            mine,
            (0..PER_THREAD).collect::<Vec<_>>(),
            "thread {t} in order"
        );
    }
}

#[test]
fn two_handles_race_for_the_first_admin_key_and_one_wins() {
    let tmp = TempDir::new("adminrace");
    let dir = tmp.path().to_owned();
    drop(Store::open(&dir).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let store = Store::open(&dir).unwrap();
                store.ensure_admin_key(&dir.join("admin.key"), 1).unwrap()
            })
        })
        .collect();
    let won: Vec<String> = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(won.len(), 1);
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.list_keys().unwrap().len(), 1);
    assert_eq!(
        fs::read_to_string(dir.join("admin.key")).unwrap(),
        format!("{}\n", won[0])
    );
}

const KILL9_DIR: &str = "MOAT_ENGINE_TEST_KILL9_DIR";

/// Run by `acknowledged_events_survive_kill_9` in a child process: appends events forever,
/// printing each seq once `append_event` has returned.
#[test]
#[ignore = "helper: run in a child process by acknowledged_events_survive_kill_9"]
fn kill9_child() {
    let Some(dir) = std::env::var_os(KILL9_DIR) else {
        return;
    };
    let store = Store::open(Path::new(&dir)).unwrap();
    let mut out = io::stdout().lock();
    for i in 0..1_000_000u64 {
        let seq = store
            .append_event(&event(i, None, Some("sbx_child"), EventKind::ExecFinished))
            .unwrap();
        writeln!(out, "acked {seq}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn acknowledged_events_survive_kill_9() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let tmp = TempDir::new("kill9");
    let store = Store::open(tmp.path()).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::tests::kill9_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(KILL9_DIR, tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = BTreeSet::new();
    let mut mine = BTreeSet::new();
    // Both processes write at once; kill the child in the middle of its stream of appends.
    while acked.len() < 300 {
        let line = lines.next().expect("the child stopped early").unwrap();
        if let Some(seq) = line.strip_prefix("acked ") {
            acked.insert(seq.parse::<u64>().unwrap());
            if acked.len() % 3 == 0 {
                mine.insert(
                    store
                        .append_event(&event(0, None, Some("sbx_parent"), EventKind::ApiCall))
                        .unwrap(),
                );
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Whatever the child printed before it died was acknowledged; read the rest too.
    for line in lines {
        if let Some(seq) = line.unwrap().strip_prefix("acked ") {
            acked.insert(seq.parse::<u64>().unwrap());
        }
    }
    drop(store);

    let store = Store::open(tmp.path()).unwrap();
    let stored: BTreeSet<u64> = seqs(&store.events(&EventFilter::default()).unwrap())
        .into_iter()
        .collect();
    assert!(acked.len() >= 300);
    assert!(acked.is_subset(&stored), "an acknowledged event was lost");
    assert!(mine.is_subset(&stored));
    assert!(acked.is_disjoint(&mine));
    // The store still works after the crash.
    store
        .append_event(&event(1, None, None, EventKind::ApiCall))
        .unwrap();
}

#[test]
fn store_can_move_to_a_dedicated_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Store>();
}

// --- names -----------------------------------------------------------------------------------

#[test]
fn enum_names_are_snake_case_in_json_and_in_the_database() {
    for s in Scope::ALL {
        assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        assert_eq!(s.as_str().parse::<Scope>().unwrap(), *s);
    }
    for s in SandboxState::ALL {
        assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        assert_eq!(s.as_str().parse::<SandboxState>().unwrap(), *s);
    }
    for k in EventKind::ALL {
        assert_eq!(serde_json::to_value(k).unwrap(), json!(k.as_str()));
        assert_eq!(k.as_str().parse::<EventKind>().unwrap(), *k);
    }
    assert_eq!(EventKind::ALL.len(), 15);
    assert_eq!(EventKind::Egress.as_str(), "egress");
    assert_eq!(Scope::FilesRead.as_str(), "files_read");
    assert_eq!(EventKind::SandboxExpired.as_str(), "sandbox_expired");
    assert_eq!(
        serde_json::from_str::<Vec<Scope>>(r#"["exec","files_read","files_write","read"]"#)
            .unwrap(),
        Scope::ALL
    );
    assert!(serde_json::from_str::<Scope>(r#""files:read""#).is_err());
    assert!(matches!(
        "nope".parse::<EventKind>(),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn an_unknown_stored_value_is_reported_not_ignored() {
    let tmp = TempDir::new("corrupt");
    let store = Store::open(tmp.path()).unwrap();
    store
        .append_event(&event(1, None, None, EventKind::ApiCall))
        .unwrap();
    // Only possible by going around the triggers, as someone editing the file would.
    let conn = raw(&tmp);
    conn.execute_batch(
        "DROP TRIGGER events_no_update; UPDATE events SET kind = 'from_the_future';",
    )
    .unwrap();
    let err = store.events(&EventFilter::default()).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("from_the_future"), "{err}");
}

#[test]
fn append_events_commits_a_batch_in_order() {
    let dir = TempDir::new("batch");
    let store = Store::open(dir.path()).unwrap();
    let before = store.last_seq().unwrap();
    let batch: Vec<Event> = (0..5)
        .map(|i| event(10 + i, None, None, EventKind::ApiCall))
        .collect();
    let seqs = store.append_events(&batch).unwrap();
    assert_eq!(seqs, (before + 1..=before + 5).collect::<Vec<u64>>());
    let got = store.events(&EventFilter::default()).unwrap();
    let ts: Vec<u64> = got.iter().map(|(_, e)| e.ts).collect();
    assert_eq!(ts, vec![10, 11, 12, 13, 14]);
    assert!(store.append_events(&[]).unwrap().is_empty());
}

#[test]
fn relax_durability_sets_synchronous_normal_on_that_connection_only() {
    let dir = TempDir::new("relax");
    let relaxed = Store::open(dir.path()).unwrap();
    let strict = Store::open(dir.path()).unwrap();
    relaxed.relax_durability().unwrap();
    let level = |s: &Store| -> i64 {
        s.conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(level(&relaxed), 1, "NORMAL");
    assert_eq!(level(&strict), 2, "FULL");
}
