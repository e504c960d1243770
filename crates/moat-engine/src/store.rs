//! The registry and audit store: API keys, scoped tokens, sandbox records and the append-only
//! audit log, in one SQLite database. See the crate documentation for the schema and the
//! guarantees.
//!
//! A [`Store`] is one SQLite connection: `Send`, not `Sync`. The daemon keeps it on a dedicated
//! thread; a second process (or a second handle in tests) opens its own [`Store`] on the same
//! directory.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The schema version this build creates and understands.
pub const SCHEMA_VERSION: u32 = 1;

/// The database file's name inside the state directory.
pub const DB_FILE: &str = "moat.db";

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of randomness in a key or token secret.
const SECRET_BYTES: usize = 32;

/// Bytes of randomness in a key, token or sandbox id.
const ID_BYTES: usize = 8;

/// Everything that can go wrong in the store. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be created or the database file prepared.
    #[error(
        "cannot prepare the state database at {path}: check that the directory exists or can be \
         created, and that this user owns it"
    )]
    Prepare {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// SQLite could not open or configure the database.
    #[error(
        "cannot open the state database {path}: check its permissions and free disk space, or \
         point --state-dir at another directory"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// SQLite refused WAL mode (e.g. a network file system without shared memory).
    #[error(
        "the state database {path} cannot use WAL mode (journal mode is {mode}): put the state \
         directory on a local file system"
    )]
    NoWal { path: PathBuf, mode: String },
    /// The database was written by a newer moat.
    #[error(
        "the state database {path} has schema version {found}, newer than version {supported} \
         that this moat understands: upgrade moat, or point --state-dir at another directory"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: u32,
    },
    /// A statement failed.
    #[error(
        "state database error while {what}: if it repeats, check free disk space and that no \
         other program holds the database locked"
    )]
    Sql {
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    /// A stored value could not be decoded.
    #[error(
        "the state database holds an unreadable {what} ({value:?}): it was changed outside moat; \
         restore it from a backup or start with a fresh --state-dir"
    )]
    Corrupt { what: &'static str, value: String },
    /// A stored JSON value could not be decoded.
    #[error(
        "the state database holds an unreadable {what}: it was changed outside moat; restore it \
         from a backup or start with a fresh --state-dir"
    )]
    CorruptJson {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A value could not be encoded as JSON (e.g. a path that is not UTF-8).
    #[error("cannot encode the {what} as JSON: use UTF-8 paths and values")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// The operating system gave no random bytes.
    #[error("cannot read random bytes from the operating system: check that /dev/urandom or getrandom(2) is available")]
    Random {
        #[source]
        source: getrandom::Error,
    },
    /// `insert_sandbox` with an id that is or was in use.
    #[error("sandbox id {id} is already taken: generate a fresh one with new_sandbox_id()")]
    SandboxExists { id: String },
    /// A sandbox the caller may not see or that does not exist.
    #[error("no sandbox {id}: list the sandboxes this key can see")]
    SandboxNotFound { id: String },
    /// A key that does not exist or is revoked was used to create something.
    #[error("API key {id} does not exist or is revoked: use a valid key")]
    KeyNotUsable { id: String },
    /// `ensure_admin_key` found no key in the database but a key file already present.
    #[error(
        "{path} exists but the state database has no API key: that file belongs to an older \
         state database; move it away and start again to get a new admin key"
    )]
    AdminKeyFileExists { path: PathBuf },
    /// `ensure_admin_key` could not write the key file.
    #[error(
        "cannot write the admin key to {path}: check that its directory is writable by this user"
    )]
    AdminKeyFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

fn sql(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sql { what, source }
}

// ---------------------------------------------------------------------------------------------
// Identifiers and records
// ---------------------------------------------------------------------------------------------

/// The id of an API key, `key_<16 hex>`. Not secret: it is part of the key's secret and shown
/// by `moat key ls`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(String);

/// The id of a scoped token, `tok_<16 hex>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TokenId(String);

macro_rules! string_id {
    ($t:ident) => {
        impl $t {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl From<String> for $t {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
        impl From<&str> for $t {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}
string_id!(KeyId);
string_id!(TokenId);

/// An API key as stored (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: KeyId,
    pub name: String,
    /// Admin keys see every sandbox.
    pub admin: bool,
    pub created_at: u64,
    pub revoked_at: Option<u64>,
}

/// What a scoped token may do with its one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Run commands and processes.
    Exec,
    /// Read and list files.
    FilesRead,
    /// Write, create, move and delete files.
    FilesWrite,
    /// Get the sandbox, list it, read its events and metrics.
    Read,
}

/// A scoped token as stored (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: TokenId,
    /// The key that created the token; the token dies when that key is revoked.
    pub parent_key: KeyId,
    /// The only sandbox the token is good for.
    pub sandbox_id: String,
    pub scopes: Vec<Scope>,
    pub created_at: u64,
    /// The token is valid while `now < expires_at`.
    pub expires_at: u64,
}

impl TokenRecord {
    /// Whether the token grants `scope`.
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// Who a bearer secret belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Key(KeyRecord),
    Token(TokenRecord),
}

/// The lifecycle state of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Creating,
    Running,
    Paused,
    Stopping,
    Stopped,
    Failed,
}

/// How the daemon finds a running sandbox again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    /// The host PID of the sandbox's init (the agent).
    pub init_pid: u32,
    /// Field 22 (`starttime`) of `/proc/PID/stat` when the sandbox started: a PID whose start
    /// time differs is a reused PID, not the sandbox.
    pub init_start_time: u64,
    /// The agent's socket on the host.
    pub agent_socket: PathBuf,
    /// The sandbox's cgroup directories (one on v2, one per controller on v1).
    pub cgroup_paths: Vec<PathBuf>,
    /// What the sandbox's tier needs besides (the gvisor tier's runsc state), opaque here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_state: Option<serde_json::Value>,
    /// The sandbox's isolation layers as reported at its start (the API's `sandbox`), opaque
    /// here: a re-attaching daemon reports them again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<serde_json::Value>,
}

/// A sandbox as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub owner_key: KeyId,
    pub tier: String,
    pub state: SandboxState,
    pub created_at: u64,
    pub expires_at: u64,
    pub metadata: BTreeMap<String, String>,
    /// The effective policy, opaque to the store.
    pub policy_json: String,
    pub runtime: Option<RuntimeInfo>,
    /// Why the sandbox failed, when it did.
    pub error: Option<String>,
}

/// Which sandboxes `list_sandboxes` returns: all of the given conditions hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxFilter {
    pub state: Option<SandboxState>,
    /// Every pair must be present in the sandbox's metadata.
    pub metadata: BTreeMap<String, String>,
}

/// What an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    ApiCall,
    SandboxCreated,
    SandboxState,
    SandboxExpired,
    SandboxDestroyed,
    ExecStarted,
    ExecFinished,
    FileRead,
    FileWrite,
    FileOp,
    KeyCreated,
    KeyRevoked,
    TokenCreated,
    AuthFailed,
    /// One connection through the egress proxy, allowed or denied.
    Egress,
}

/// One audit event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub ts: u64,
    /// The key behind the action (a token's parent key), when there is one.
    pub key_id: Option<KeyId>,
    pub sandbox_id: Option<String>,
    pub kind: EventKind,
    /// The kind's details (argv, path, status, ...).
    pub data: serde_json::Value,
}

/// Which events `events` returns: all of the given conditions hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub sandbox_id: Option<String>,
    /// Only events with `seq > since_seq` (pass the last seq seen to follow the log).
    pub since_seq: Option<u64>,
    /// Only these kinds; empty means all.
    pub kinds: Vec<EventKind>,
    /// Only events made with this key or about a sandbox this key created (also after the
    /// sandbox was deleted). No admin widening here: pass `None` for an admin.
    pub owner_key: Option<KeyId>,
    /// At most this many events, the oldest first; `None` for all.
    pub limit: Option<u32>,
}

macro_rules! text_enum {
    ($t:ident, $what:literal, { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $t {
            /// Every value, in declaration order.
            pub const ALL: &'static [$t] = &[$($t::$v),+];

            /// The snake_case name, as in JSON and in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($t::$v => $s),+
                }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = StoreError;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($s => Ok($t::$v),)+
                    _ => Err(StoreError::Corrupt { what: $what, value: s.to_owned() }),
                }
            }
        }
    };
}

text_enum!(Scope, "token scope", {
    Exec => "exec",
    FilesRead => "files_read",
    FilesWrite => "files_write",
    Read => "read",
});

text_enum!(SandboxState, "sandbox state", {
    Creating => "creating",
    Running => "running",
    Paused => "paused",
    Stopping => "stopping",
    Stopped => "stopped",
    Failed => "failed",
});

text_enum!(EventKind, "event kind", {
    ApiCall => "api_call",
    SandboxCreated => "sandbox_created",
    SandboxState => "sandbox_state",
    SandboxExpired => "sandbox_expired",
    SandboxDestroyed => "sandbox_destroyed",
    ExecStarted => "exec_started",
    ExecFinished => "exec_finished",
    FileRead => "file_read",
    FileWrite => "file_write",
    FileOp => "file_op",
    KeyCreated => "key_created",
    KeyRevoked => "key_revoked",
    TokenCreated => "token_created",
    AuthFailed => "auth_failed",
    Egress => "egress",
});

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

fn random_hex(n: usize) -> Result<String> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|source| StoreError::Random { source })?;
    Ok(hex::encode(buf))
}

/// A fresh sandbox id, `sbx_<16 hex>` (64 random bits).
pub fn new_sandbox_id() -> Result<String> {
    Ok(format!("sbx_{}", random_hex(ID_BYTES)?))
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Compares two hashes in time independent of where they differ.
fn hashes_equal(a: &[u8; 32], b: &[u8]) -> bool {
    if b.len() != a.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The id inside a secret `moat_<prefix>_<16 hex>_<64 hex>`, if it is well formed.
fn secret_id<'a>(secret: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = secret.strip_prefix("moat_")?;
    let (id, random) = rest.rsplit_once('_')?;
    let id_hex = id.strip_prefix(prefix)?.strip_prefix('_')?;
    let is_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (is_hex(id_hex, 2 * ID_BYTES) && is_hex(random, 2 * SECRET_BYTES)).then_some(id)
}

fn new_secret(prefix: &str) -> Result<(String, String)> {
    let id = format!("{prefix}_{}", random_hex(ID_BYTES)?);
    let secret = format!("moat_{id}_{}", random_hex(SECRET_BYTES)?);
    Ok((id, secret))
}

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

/// A timestamp or count as SQLite stores it; saturates at `i64::MAX`.
fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored integer back as `u64`; negative values (only from outside edits) read as 0.
fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn to_json<T: Serialize + ?Sized>(what: &'static str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|source| StoreError::Encode { what, source })
}

fn from_json<T: for<'de> Deserialize<'de>>(what: &'static str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|source| StoreError::CorruptJson { what, source })
}

// ---------------------------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------------------------

/// Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    "
    CREATE TABLE keys (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        admin      INTEGER NOT NULL CHECK (admin IN (0, 1)),
        hash       BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    ) STRICT;

    CREATE TABLE sandboxes (
        id          TEXT PRIMARY KEY,
        owner_key   TEXT NOT NULL REFERENCES keys(id),
        tier        TEXT NOT NULL,
        state       TEXT NOT NULL CHECK (state IN
                        ('creating', 'running', 'paused', 'stopping', 'stopped', 'failed')),
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        metadata    TEXT NOT NULL,
        policy_json TEXT NOT NULL,
        runtime     TEXT,
        error       TEXT
    ) STRICT;
    CREATE INDEX sandboxes_owner ON sandboxes(owner_key, created_at);
    CREATE INDEX sandboxes_expiry ON sandboxes(state, expires_at);

    CREATE TABLE sandbox_owners (
        sandbox_id TEXT PRIMARY KEY,
        owner_key  TEXT NOT NULL
    ) STRICT;

    CREATE TABLE tokens (
        id         TEXT PRIMARY KEY,
        parent_key TEXT NOT NULL REFERENCES keys(id),
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        scopes     TEXT NOT NULL,
        hash       BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        revoked_at INTEGER
    ) STRICT;
    CREATE INDEX tokens_sandbox ON tokens(sandbox_id);

    CREATE TABLE events (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        ts            INTEGER NOT NULL,
        key_id        TEXT,
        sandbox_id    TEXT,
        sandbox_owner TEXT,
        kind          TEXT NOT NULL,
        data          TEXT NOT NULL
    ) STRICT;
    CREATE INDEX events_sandbox ON events(sandbox_id, seq);
    CREATE INDEX events_key ON events(key_id, seq);
    CREATE INDEX events_owner ON events(sandbox_owner, seq);
    CREATE TRIGGER events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'moat audit events are append-only: UPDATE refused'); END;
    CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'moat audit events are append-only: DELETE refused'); END;
    ",
];

const _: () = assert!(MIGRATIONS.len() == SCHEMA_VERSION as usize);

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

/// A handle on the state database. See the crate documentation.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

const SANDBOX_COLUMNS: &str = "s.id, s.owner_key, s.tier, s.state, s.created_at, s.expires_at, \
                               s.metadata, s.policy_json, s.runtime, s.error";

/// A sandbox row as read, before decoding.
struct SandboxRow {
    id: String,
    owner_key: String,
    tier: String,
    state: String,
    created_at: i64,
    expires_at: i64,
    metadata: String,
    policy_json: String,
    runtime: Option<String>,
    error: Option<String>,
}

impl SandboxRow {
    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(SandboxRow {
            id: r.get(0)?,
            owner_key: r.get(1)?,
            tier: r.get(2)?,
            state: r.get(3)?,
            created_at: r.get(4)?,
            expires_at: r.get(5)?,
            metadata: r.get(6)?,
            policy_json: r.get(7)?,
            runtime: r.get(8)?,
            error: r.get(9)?,
        })
    }

    fn decode(self) -> Result<SandboxRecord> {
        Ok(SandboxRecord {
            id: self.id,
            owner_key: KeyId(self.owner_key),
            tier: self.tier,
            state: self.state.parse()?,
            created_at: to_u64(self.created_at),
            expires_at: to_u64(self.expires_at),
            metadata: from_json("sandbox metadata", &self.metadata)?,
            policy_json: self.policy_json,
            runtime: self
                .runtime
                .as_deref()
                .map(|r| from_json("sandbox runtime info", r))
                .transpose()?,
            error: self.error,
        })
    }
}

fn read_key(r: &rusqlite::Row<'_>) -> rusqlite::Result<(KeyRecord, Vec<u8>)> {
    Ok((
        KeyRecord {
            id: KeyId(r.get(0)?),
            name: r.get(1)?,
            admin: r.get(2)?,
            created_at: to_u64(r.get(3)?),
            revoked_at: r.get::<_, Option<i64>>(4)?.map(to_u64),
        },
        r.get(5)?,
    ))
}

const KEY_COLUMNS: &str = "id, name, admin, created_at, revoked_at, hash";

impl Store {
    /// Opens `dir/moat.db`, creating the directory (mode 0700) and the database (mode 0600)
    /// when missing, and migrates it to [`SCHEMA_VERSION`]. Refuses a database written by a
    /// newer moat.
    pub fn open(dir: &Path) -> Result<Store> {
        let path = dir.join(DB_FILE);
        let prepare = |source| StoreError::Prepare {
            path: path.clone(),
            source,
        };
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(prepare)?;
        }
        // Create the file ourselves so that it never exists with a wider mode; SQLite gives
        // the -wal and -shm files the database file's mode.
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(prepare)?;
        let meta = file.metadata().map_err(prepare)?;
        if meta.permissions().mode() & 0o077 != 0 {
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(prepare)?;
        }
        drop(file);

        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(open_err)?;
        conn.set_prepared_statement_cache_capacity(64);
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal { path, mode });
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .map_err(open_err)?;
        let store = Store { conn, path };
        store.migrate()?;
        Ok(store)
    }

    /// Stops fsyncing this connection's commits (`synchronous=NORMAL`): each commit still
    /// survives `kill -9` of the process (it is in the WAL, in the OS's page cache), but the
    /// last ones may be lost at a power cut. For the daemon's registry writes (sandbox
    /// records, tokens), which describe sandboxes that a power cut kills anyway; the audit
    /// log keeps a connection of its own at `FULL`.
    pub fn relax_durability(&self) -> Result<()> {
        self.conn
            .execute_batch("PRAGMA synchronous = NORMAL;")
            .map_err(sql("relaxing the registry connection's durability"))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn migrate(&self) -> Result<()> {
        let what = "migrating the schema";
        let tx = self.immediate(what)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_version (
                 id      INTEGER PRIMARY KEY CHECK (id = 1),
                 version INTEGER NOT NULL
             )",
        )
        .map_err(sql(what))?;
        let found: i64 = tx
            .query_row("SELECT version FROM schema_version WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql(what))?
            .unwrap_or(0);
        if found > i64::from(SCHEMA_VERSION) {
            return Err(StoreError::SchemaTooNew {
                path: self.path.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found < 0 {
            return Err(StoreError::Corrupt {
                what: "schema version",
                value: found.to_string(),
            });
        }
        if found == i64::from(SCHEMA_VERSION) {
            return Ok(());
        }
        for step in MIGRATIONS.iter().skip(usize::try_from(found).unwrap_or(0)) {
            tx.execute_batch(step).map_err(sql(what))?;
        }
        tx.execute(
            "INSERT INTO schema_version (id, version) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            [SCHEMA_VERSION],
        )
        .map_err(sql(what))?;
        tx.commit().map_err(sql(what))
    }

    /// A write transaction that takes the write lock at once, so that a read-modify-write
    /// cannot deadlock against another connection (and waits the busy timeout instead).
    fn immediate(&self, what: &'static str) -> Result<rusqlite::Transaction<'_>> {
        rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
            .map_err(sql(what))
    }

    // -----------------------------------------------------------------------------------------
    // API keys
    // -----------------------------------------------------------------------------------------

    /// Creates an API key and returns it with its secret, which is shown once and never
    /// stored.
    pub fn create_key(&self, name: &str, admin: bool, now: u64) -> Result<(KeyRecord, String)> {
        Self::insert_key(&self.conn, name, admin, now)
    }

    fn insert_key(
        conn: &Connection,
        name: &str,
        admin: bool,
        now: u64,
    ) -> Result<(KeyRecord, String)> {
        let (id, secret) = new_secret("key")?;
        conn.prepare_cached(
            "INSERT INTO keys (id, name, admin, hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .and_then(|mut s| s.execute(params![id, name, admin, sha256(&secret), to_i64(now)]))
        .map_err(sql("creating an API key"))?;
        let record = KeyRecord {
            id: KeyId(id),
            name: name.to_owned(),
            admin,
            created_at: now,
            revoked_at: None,
        };
        Ok((record, secret))
    }

    /// The key a secret belongs to, if the secret is right and the key not revoked.
    pub fn verify_key(&self, secret: &str) -> Result<Option<KeyRecord>> {
        let Some(id) = secret_id(secret, "key") else {
            return Ok(None);
        };
        let found = self
            .conn
            .prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1"))
            .and_then(|mut s| s.query_row([id], read_key).optional())
            .map_err(sql("verifying an API key"))?;
        Ok(found.and_then(|(record, hash)| {
            (hashes_equal(&sha256(secret), &hash) && record.revoked_at.is_none()).then_some(record)
        }))
    }

    /// One key by id, revoked or not.
    pub fn key(&self, id: &KeyId) -> Result<Option<KeyRecord>> {
        self.conn
            .prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1"))
            .and_then(|mut s| s.query_row([id.as_str()], read_key).optional())
            .map(|k| k.map(|(record, _)| record))
            .map_err(sql("reading an API key"))
    }

    /// Every key, revoked ones included, oldest first.
    pub fn list_keys(&self) -> Result<Vec<KeyRecord>> {
        let what = "listing API keys";
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {KEY_COLUMNS} FROM keys ORDER BY created_at, id"
            ))
            .map_err(sql(what))?;
        let rows = stmt
            .query_map([], read_key)
            .map_err(sql(what))?
            .map(|r| r.map(|(record, _)| record))
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(sql(what))?;
        Ok(rows)
    }

    /// Revokes a key (and so every token it made). False when there is no such key or it was
    /// already revoked.
    pub fn revoke_key(&self, id: &KeyId, now: u64) -> Result<bool> {
        let n = self
            .conn
            .prepare_cached("UPDATE keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL")
            .and_then(|mut s| s.execute(params![id.as_str(), to_i64(now)]))
            .map_err(sql("revoking an API key"))?;
        Ok(n == 1)
    }

    /// First run: when the database has no key at all, creates an admin key named `admin`,
    /// writes its secret and a newline to `file` (mode 0600, never overwriting a file) and
    /// returns the secret. Returns `None` when a key exists (revoked or not). Safe against a
    /// second process doing the same at once: one of them creates the key.
    pub fn ensure_admin_key(&self, file: &Path, now: u64) -> Result<Option<String>> {
        let what = "creating the first admin key";
        let tx = self.immediate(what)?;
        let count: i64 = tx
            .query_row("SELECT count(*) FROM keys", [], |r| r.get(0))
            .map_err(sql(what))?;
        if count > 0 {
            return Ok(None);
        }
        let key_file_err = |source: io::Error| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                StoreError::AdminKeyFileExists {
                    path: file.to_owned(),
                }
            } else {
                StoreError::AdminKeyFile {
                    path: file.to_owned(),
                    source,
                }
            }
        };
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(file)
            .map_err(key_file_err)?;
        let written = (|| {
            let (_, secret) = Self::insert_key(&tx, "admin", true, now)?;
            out.write_all(format!("{secret}\n").as_bytes())
                .and_then(|()| out.sync_all())
                .map_err(key_file_err)?;
            tx.commit().map_err(sql(what))?;
            Ok(secret)
        })();
        if written.is_err() {
            // The key was not committed: leave no file with a secret that opens nothing.
            drop(out);
            let _ = fs::remove_file(file);
        }
        written.map(Some)
    }

    // -----------------------------------------------------------------------------------------
    // Scoped tokens
    // -----------------------------------------------------------------------------------------

    /// Issues a token for one sandbox that `parent_key` can see (its own, or any for an admin
    /// key), valid for `ttl` from `now`. Fails with [`StoreError::KeyNotUsable`] for a missing or
    /// revoked key and [`StoreError::SandboxNotFound`] for a sandbox the key cannot see.
    pub fn create_token(
        &self,
        parent_key: &KeyId,
        sandbox_id: &str,
        scopes: &[Scope],
        ttl: Duration,
        now: u64,
    ) -> Result<(TokenRecord, String)> {
        let what = "creating a token";
        let tx = self.immediate(what)?;
        let usable: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM keys WHERE id = ?1 AND revoked_at IS NULL)",
                [parent_key.as_str()],
                |r| r.get(0),
            )
            .map_err(sql(what))?;
        if !usable {
            return Err(StoreError::KeyNotUsable {
                id: parent_key.to_string(),
            });
        }
        if Self::visible_sandbox(&tx, sandbox_id, Some(parent_key))?.is_none() {
            return Err(StoreError::SandboxNotFound {
                id: sandbox_id.to_owned(),
            });
        }
        let mut scopes = scopes.to_vec();
        scopes.sort_unstable();
        scopes.dedup();
        let (id, secret) = new_secret("tok")?;
        let expires_at = now.saturating_add(duration_ms(ttl));
        tx.execute(
            "INSERT INTO tokens (id, parent_key, sandbox_id, scopes, hash, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                id,
                parent_key.as_str(),
                sandbox_id,
                to_json("token scopes", &scopes)?,
                sha256(&secret),
                to_i64(now),
                to_i64(expires_at),
            ],
        )
        .map_err(sql(what))?;
        tx.commit().map_err(sql(what))?;
        let record = TokenRecord {
            id: TokenId(id),
            parent_key: parent_key.clone(),
            sandbox_id: sandbox_id.to_owned(),
            scopes,
            created_at: now,
            expires_at: to_u64(to_i64(expires_at)),
        };
        Ok((record, secret))
    }

    /// The token a secret belongs to, if the secret is right, `now < expires_at`, neither the
    /// token nor its parent key is revoked and its sandbox still exists.
    pub fn verify_token(&self, secret: &str, now: u64) -> Result<Option<TokenRecord>> {
        let what = "verifying a token";
        let Some(id) = secret_id(secret, "tok") else {
            return Ok(None);
        };
        let row = self
            .conn
            .prepare_cached(
                "SELECT t.id, t.parent_key, t.sandbox_id, t.scopes, t.created_at, t.expires_at,
                        t.hash
                 FROM tokens t
                 JOIN keys k ON k.id = t.parent_key
                 JOIN sandboxes s ON s.id = t.sandbox_id
                 WHERE t.id = ?1 AND t.revoked_at IS NULL AND k.revoked_at IS NULL
                   AND ?2 < t.expires_at",
            )
            .and_then(|mut s| {
                s.query_row(params![id, to_i64(now)], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, Vec<u8>>(6)?,
                    ))
                })
                .optional()
            })
            .map_err(sql(what))?;
        let Some((id, parent, sandbox_id, scopes, created_at, expires_at, hash)) = row else {
            return Ok(None);
        };
        if !hashes_equal(&sha256(secret), &hash) {
            return Ok(None);
        }
        Ok(Some(TokenRecord {
            id: TokenId(id),
            parent_key: KeyId(parent),
            sandbox_id,
            scopes: from_json("token scopes", &scopes)?,
            created_at: to_u64(created_at),
            expires_at: to_u64(expires_at),
        }))
    }

    /// Revokes a token. False when there is no such token or it was already revoked.
    pub fn revoke_token(&self, id: &TokenId, now: u64) -> Result<bool> {
        let n = self
            .conn
            .prepare_cached(
                "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            )
            .and_then(|mut s| s.execute(params![id.as_str(), to_i64(now)]))
            .map_err(sql("revoking a token"))?;
        Ok(n == 1)
    }

    /// Whoever a bearer secret belongs to: a key (`moat_key_…`) or a token (`moat_tok_…`).
    pub fn authenticate(&self, secret: &str, now: u64) -> Result<Option<Principal>> {
        if secret.starts_with("moat_key_") {
            Ok(self.verify_key(secret)?.map(Principal::Key))
        } else if secret.starts_with("moat_tok_") {
            Ok(self.verify_token(secret, now)?.map(Principal::Token))
        } else {
            Ok(None)
        }
    }

    // -----------------------------------------------------------------------------------------
    // Sandboxes
    // -----------------------------------------------------------------------------------------

    /// Records a new sandbox. Fails with [`StoreError::SandboxExists`] when the id is or ever
    /// was in use, and [`StoreError::KeyNotUsable`] when the owner key does not exist.
    pub fn insert_sandbox(&self, sandbox: &SandboxRecord) -> Result<()> {
        let what = "recording a new sandbox";
        let tx = self.immediate(what)?;
        let taken: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sandbox_owners WHERE sandbox_id = ?1)",
                [&sandbox.id],
                |r| r.get(0),
            )
            .map_err(sql(what))?;
        if taken {
            return Err(StoreError::SandboxExists {
                id: sandbox.id.clone(),
            });
        }
        let owner_exists: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM keys WHERE id = ?1)",
                [sandbox.owner_key.as_str()],
                |r| r.get(0),
            )
            .map_err(sql(what))?;
        if !owner_exists {
            return Err(StoreError::KeyNotUsable {
                id: sandbox.owner_key.to_string(),
            });
        }
        let runtime = sandbox
            .runtime
            .as_ref()
            .map(|r| to_json("sandbox runtime info", r))
            .transpose()?;
        tx.execute(
            "INSERT INTO sandboxes (id, owner_key, tier, state, created_at, expires_at, metadata,
                                    policy_json, runtime, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                sandbox.id,
                sandbox.owner_key.as_str(),
                sandbox.tier,
                sandbox.state.as_str(),
                to_i64(sandbox.created_at),
                to_i64(sandbox.expires_at),
                to_json("sandbox metadata", &sandbox.metadata)?,
                sandbox.policy_json,
                runtime,
                sandbox.error,
            ],
        )
        .map_err(sql(what))?;
        tx.execute(
            "INSERT INTO sandbox_owners (sandbox_id, owner_key) VALUES (?1, ?2)",
            params![sandbox.id, sandbox.owner_key.as_str()],
        )
        .map_err(sql(what))?;
        tx.commit().map_err(sql(what))
    }

    /// The sandbox, if `key` may see it: its owner, or an admin key; revoked keys see nothing.
    /// Another key's sandbox is `None`, exactly like a missing one.
    pub fn get_sandbox(&self, id: &str, key: &KeyId) -> Result<Option<SandboxRecord>> {
        Self::visible_sandbox(&self.conn, id, Some(key))
    }

    /// The sandbox regardless of owner: for the daemon's own work (expiry, re-attach), never
    /// for answering a client.
    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>> {
        Self::visible_sandbox(&self.conn, id, None)
    }

    fn visible_sandbox(
        conn: &Connection,
        id: &str,
        key: Option<&KeyId>,
    ) -> Result<Option<SandboxRecord>> {
        let row = conn
            .prepare_cached(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes s WHERE s.id = ?1 AND {VISIBLE_TO_2}"
            ))
            .and_then(|mut s| {
                s.query_row(params![id, key.map(KeyId::as_str)], SandboxRow::read)
                    .optional()
            })
            .map_err(sql("reading a sandbox"))?;
        row.map(SandboxRow::decode).transpose()
    }

    /// The sandboxes `key` may see (all for an admin key) that match `filter`, oldest first.
    pub fn list_sandboxes(
        &self,
        key: &KeyId,
        filter: &SandboxFilter,
    ) -> Result<Vec<SandboxRecord>> {
        self.query_sandboxes(Some(key), filter)
    }

    /// Every sandbox that matches `filter`, oldest first: for the daemon's re-attach on start.
    pub fn all_sandboxes(&self, filter: &SandboxFilter) -> Result<Vec<SandboxRecord>> {
        self.query_sandboxes(None, filter)
    }

    fn query_sandboxes(
        &self,
        key: Option<&KeyId>,
        filter: &SandboxFilter,
    ) -> Result<Vec<SandboxRecord>> {
        let what = "listing sandboxes";
        // ?3: every (key, value) of the filter object is among the sandbox's metadata.
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes s
                 WHERE {VISIBLE_TO_2}
                   AND (?1 IS NULL OR s.state = ?1)
                   AND NOT EXISTS (
                       SELECT 1 FROM json_each(?3) f
                       WHERE NOT EXISTS (
                           SELECT 1 FROM json_each(s.metadata) m
                           WHERE m.key = f.key AND m.value = f.value))
                 ORDER BY s.created_at, s.id"
            ))
            .map_err(sql(what))?;
        let rows = stmt
            .query_map(
                params![
                    filter.state.map(SandboxState::as_str),
                    key.map(KeyId::as_str),
                    to_json("metadata filter", &filter.metadata)?,
                ],
                SandboxRow::read,
            )
            .map_err(sql(what))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(sql(what))?;
        rows.into_iter().map(SandboxRow::decode).collect()
    }

    /// Compare-and-set of the state: moves the sandbox to `to` only if its state is one of
    /// `from`. Returns whether it changed (false also for a missing sandbox).
    pub fn set_state(&self, id: &str, from: &[SandboxState], to: SandboxState) -> Result<bool> {
        self.cas_state(id, from, to, None)
    }

    /// Like [`Store::set_state`] to `failed`, recording why.
    pub fn set_failed(&self, id: &str, from: &[SandboxState], error: &str) -> Result<bool> {
        self.cas_state(id, from, SandboxState::Failed, Some(error))
    }

    fn cas_state(
        &self,
        id: &str,
        from: &[SandboxState],
        to: SandboxState,
        error: Option<&str>,
    ) -> Result<bool> {
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let n = self
            .conn
            .prepare_cached(
                "UPDATE sandboxes SET state = ?2, error = coalesce(?4, error)
                 WHERE id = ?1 AND state IN (SELECT value FROM json_each(?3))",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id,
                    to.as_str(),
                    serde_json::Value::from(from).to_string(),
                    error
                ])
            })
            .map_err(sql("changing a sandbox's state"))?;
        Ok(n == 1)
    }

    /// Records (or with `None` clears) how to reach the running sandbox. False for a missing
    /// sandbox.
    pub fn set_runtime(&self, id: &str, runtime: Option<&RuntimeInfo>) -> Result<bool> {
        let runtime = runtime
            .map(|r| to_json("sandbox runtime info", r))
            .transpose()?;
        let n = self
            .conn
            .prepare_cached("UPDATE sandboxes SET runtime = ?2 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![id, runtime]))
            .map_err(sql("recording a sandbox's runtime"))?;
        Ok(n == 1)
    }

    /// Sets a live (creating, running or paused) sandbox's expiry to `new_expires_at`, but
    /// never past `created_at + max_lifetime` (the server-wide maximum); shortening is allowed.
    /// Returns the expiry now in force, or `None` when the sandbox is missing or not live.
    pub fn extend_expiry(
        &self,
        id: &str,
        new_expires_at: u64,
        max_lifetime: Duration,
    ) -> Result<Option<u64>> {
        let what = "changing a sandbox's expiry";
        let tx = self.immediate(what)?;
        let created: Option<i64> = tx
            .query_row(
                "SELECT created_at FROM sandboxes
                 WHERE id = ?1 AND state IN ('creating', 'running', 'paused')",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql(what))?;
        let Some(created) = created else {
            return Ok(None);
        };
        let limit = to_u64(created).saturating_add(duration_ms(max_lifetime));
        let expires_at = to_i64(new_expires_at.min(limit));
        tx.execute(
            "UPDATE sandboxes SET expires_at = ?2 WHERE id = ?1",
            params![id, expires_at],
        )
        .map_err(sql(what))?;
        tx.commit().map_err(sql(what))?;
        Ok(Some(to_u64(expires_at)))
    }

    /// The running or paused sandboxes with `expires_at <= now`, soonest expired first,
    /// including those that expired while no daemon ran.
    pub fn expired(&self, now: u64) -> Result<Vec<String>> {
        let what = "listing expired sandboxes";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id FROM sandboxes
                 WHERE state IN ('running', 'paused') AND expires_at <= ?1
                 ORDER BY expires_at, id",
            )
            .map_err(sql(what))?;
        let ids = stmt
            .query_map([to_i64(now)], |r| r.get(0))
            .map_err(sql(what))?
            .collect::<rusqlite::Result<Vec<String>>>()
            .map_err(sql(what))?;
        Ok(ids)
    }

    /// Forgets a sandbox and its tokens; its events stay, and its id is never reused. False
    /// when there was no such sandbox.
    pub fn delete_sandbox(&self, id: &str) -> Result<bool> {
        let n = self
            .conn
            .prepare_cached("DELETE FROM sandboxes WHERE id = ?1")
            .and_then(|mut s| s.execute([id]))
            .map_err(sql("deleting a sandbox"))?;
        Ok(n == 1)
    }

    // -----------------------------------------------------------------------------------------
    // Audit events
    // -----------------------------------------------------------------------------------------

    /// Appends an event and returns its seq once it is committed and fsynced.
    pub fn append_event(&self, event: &Event) -> Result<u64> {
        Self::insert_event(&self.conn, event)
    }

    /// Appends several events in one transaction (one fsync: the daemon's group commit) and
    /// returns their seqs, in order, once they are committed. All or none are stored.
    pub fn append_events(&self, events: &[Event]) -> Result<Vec<u64>> {
        let tx = self.immediate("appending audit events")?;
        let seqs = events
            .iter()
            .map(|e| Self::insert_event(&tx, e))
            .collect::<Result<Vec<u64>>>()?;
        tx.commit().map_err(sql("appending audit events"))?;
        Ok(seqs)
    }

    fn insert_event(conn: &rusqlite::Connection, event: &Event) -> Result<u64> {
        let seq: i64 = conn
            .prepare_cached(
                "INSERT INTO events (ts, key_id, sandbox_id, sandbox_owner, kind, data)
                 VALUES (?1, ?2, ?3,
                         (SELECT owner_key FROM sandbox_owners WHERE sandbox_id = ?3), ?4, ?5)
                 RETURNING seq",
            )
            .and_then(|mut s| {
                s.query_row(
                    params![
                        to_i64(event.ts),
                        event.key_id.as_ref().map(KeyId::as_str),
                        event.sandbox_id,
                        event.kind.as_str(),
                        event.data.to_string(),
                    ],
                    |r| r.get(0),
                )
            })
            .map_err(sql("appending an audit event"))?;
        Ok(to_u64(seq))
    }

    /// The highest seq appended so far (0 for none).
    pub fn last_seq(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))
            .map(to_u64)
            .map_err(sql("reading the last event seq"))
    }

    /// The events that match `filter`, in seq order.
    pub fn events(&self, filter: &EventFilter) -> Result<Vec<(u64, Event)>> {
        let what = "reading audit events";
        let mut sql_text = String::from(
            "SELECT seq, ts, key_id, sandbox_id, kind, data FROM events WHERE seq > ?",
        );
        let mut args = vec![SqlValue::Integer(to_i64(filter.since_seq.unwrap_or(0)))];
        if let Some(id) = &filter.sandbox_id {
            sql_text.push_str(" AND sandbox_id = ?");
            args.push(SqlValue::Text(id.clone()));
        }
        if !filter.kinds.is_empty() {
            let marks = vec!["?"; filter.kinds.len()].join(", ");
            sql_text.push_str(&format!(" AND kind IN ({marks})"));
            args.extend(
                filter
                    .kinds
                    .iter()
                    .map(|k| SqlValue::Text(k.as_str().to_owned())),
            );
        }
        if let Some(key) = &filter.owner_key {
            sql_text.push_str(" AND (key_id = ? OR sandbox_owner = ?)");
            args.push(SqlValue::Text(key.to_string()));
            args.push(SqlValue::Text(key.to_string()));
        }
        sql_text.push_str(" ORDER BY seq LIMIT ?");
        args.push(SqlValue::Integer(filter.limit.map_or(-1, i64::from)));

        let mut stmt = self.conn.prepare_cached(&sql_text).map_err(sql(what))?;
        let rows = stmt
            .query_map(params_from_iter(args), |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(sql(what))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(sql(what))?;
        rows.into_iter()
            .map(|(seq, ts, key_id, sandbox_id, kind, data)| {
                Ok((
                    to_u64(seq),
                    Event {
                        ts: to_u64(ts),
                        key_id: key_id.map(KeyId),
                        sandbox_id,
                        kind: kind.parse()?,
                        data: from_json("event data", &data)?,
                    },
                ))
            })
            .collect()
    }
}

/// The visibility condition on `sandboxes s` for the key in parameter `?2` (NULL: no
/// restriction): its owner or an admin, and not revoked.
const VISIBLE_TO_2: &str = "(?2 IS NULL OR EXISTS (
        SELECT 1 FROM keys k
        WHERE k.id = ?2 AND k.revoked_at IS NULL AND (k.admin = 1 OR k.id = s.owner_key)))";

#[cfg(test)]
mod tests;
