//! The moat engine. For now it holds one building block of `moat serve`: [`store`], the
//! registry and audit store on SQLite. Plain synchronous code: the daemon owns a [`store::Store`]
//! on one dedicated thread and sends it requests.
//!
//! # The state database
//!
//! One file, `STATE_DIR/moat.db` (mode 0600, its directory created 0700 when missing), in WAL
//! mode with `synchronous=FULL` and foreign keys on. Schema version 1:
//!
//! | table | one row per | notes |
//! |---|---|---|
//! | `schema_version` | the database (one row) | the version the migrations reached; a database newer than this build is refused |
//! | `keys` | API key | `id` (`key_<16 hex>`), `name`, `admin`, `hash` (SHA-256 of the secret), `created_at`, `revoked_at`; keys are revoked, never deleted |
//! | `tokens` | scoped token | `id` (`tok_<16 hex>`), `parent_key`, `sandbox_id` (foreign key, `ON DELETE CASCADE`), `scopes` (JSON array), `hash`, `created_at`, `expires_at`, `revoked_at` |
//! | `sandboxes` | live sandbox record | `id`, `owner_key`, `tier`, `state`, `created_at`, `expires_at`, `metadata` (JSON object), `policy_json`, `runtime` (JSON), `error` |
//! | `sandbox_owners` | sandbox ever created | `sandbox_id` → `owner_key`; never deleted, so a deleted sandbox's events keep their owner and its id is never handed out again |
//! | `events` | audit event | `seq` (`INTEGER PRIMARY KEY AUTOINCREMENT`), `ts`, `key_id`, `sandbox_id`, `sandbox_owner` (copied from `sandbox_owners` when appended), `kind`, `data` (JSON); triggers abort every `UPDATE` and `DELETE` |
//!
//! Every timestamp is milliseconds since the Unix epoch, passed in by the caller (so tests and
//! the daemon control time); values above `i64::MAX` are stored as `i64::MAX`.
//!
//! # Guarantees
//!
//! - **Durable audit.** [`store::Store::append_event`] returns only after the event's
//!   transaction is committed and, with `synchronous=FULL` in WAL mode, the WAL is fsynced: an
//!   acknowledged event survives `kill -9` of the daemon and a power cut.
//! - **Append-only audit.** The API has no way to change or remove an event, and SQL triggers
//!   abort any `UPDATE` or `DELETE` on `events` (a guard against bugs; whoever can write the
//!   file can drop the triggers). `seq` strictly increases and is never reused.
//! - **Secrets are never stored.** A key or token secret is `moat_<id>_<64 hex>` (32 random bytes
//!   from the OS); the database holds its id and the SHA-256 of the whole secret. Verification
//!   looks the row up by the id (which is not secret) and compares hashes in constant time.
//! - **Tenancy.** A key sees only the sandboxes it created; an admin key sees all. Another key's
//!   sandbox reads exactly like a missing one (`None`), so there is no existence oracle.
//! - **Tokens** are valid while `now < expires_at`, their parent key is not revoked, they are not
//!   revoked, and their sandbox still exists (deleting the sandbox deletes its tokens).
//! - **Expiry survives downtime.** [`store::Store::expired`] is a query on stored `expires_at`,
//!   so sandboxes that expired while the daemon was down are found on the next start.
//! - **Several handles, several processes.** Each [`store::Store`] is one SQLite connection with
//!   a busy timeout; read-modify-write steps run in `BEGIN IMMEDIATE` transactions, so two
//!   processes on one state directory serialise their writes instead of corrupting or losing
//!   them.

pub mod store;
