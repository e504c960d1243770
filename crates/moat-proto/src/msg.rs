//! The JSON messages carried by `Hello`, `Request` and `Response` frames.
//!
//! Every type rejects unknown fields, and the two enums reject unknown `type`s, so a peer that
//! speaks another dialect fails loudly instead of being half understood. [`Request::validate`]
//! and [`Response::validate`] check the limits that serde cannot express; run them on
//! everything that comes off the wire (the host runs `Response::validate` on every response,
//! since a compromised sandbox controls its agent).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use moat_api::Status;

/// The protocol version this crate speaks. Both sides must speak the same one; compatible
/// additions within a version are negotiated with [`Hello::features`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Most arguments in an `Exec` argv.
pub const MAX_ARGS: usize = 4096;
/// Most bytes in an `Exec` argv, counting one terminating NUL per argument.
pub const MAX_ARGV_BYTES: usize = 1 << 20;
/// Most variables in an `Exec` env.
pub const MAX_ENV: usize = 4096;
/// Most bytes in an `Exec` env, counting `=` and a terminating NUL per variable.
pub const MAX_ENV_BYTES: usize = 1 << 20;
/// Most bytes in a path (Linux `PATH_MAX`, terminating NUL included there, not here).
pub const MAX_PATH: usize = 4096;
/// Deepest `ListDir` recursion.
pub const MAX_DEPTH: u32 = 16;
/// Highest signal number (`SIGRTMAX` on Linux).
pub const MAX_SIGNAL: i32 = 64;
/// Permission bits a `mode` may carry (setuid, setgid, sticky and rwx for all three).
pub const MAX_MODE: u32 = 0o7777;
/// Most bytes in the message of a `Response::Error`; the agent cuts longer ones.
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// The feature that adds [`Request::SetDeadline`]: the agent ends the sandbox at its
/// deadline by itself.
pub const FEATURE_DEADLINE: &str = "deadline";
/// The features this build speaks, listed in its Hello (as host and as agent).
pub const FEATURES: &[&str] = &[FEATURE_DEADLINE];

/// Most features a `Hello` may list.
pub const MAX_FEATURES: usize = 64;
/// Most bytes in one feature name.
pub const MAX_FEATURE_LEN: usize = 64;
/// Most processes in a `ProcList`: the agent keeps the 256 most recent finished background
/// processes, and at most this many in all.
pub const MAX_PROCS: usize = 1024;
/// Most bytes of one process's argv in a [`ProcInfo`] (counting a NUL per argument); the
/// agent cuts longer ones, so that a `ProcList` of [`MAX_PROCS`] fits in one frame.
pub const MAX_PROC_ARGV_BYTES: usize = 512;
/// Output the agent retains per channel (stdout, stderr) of a background process: the last
/// 1 MiB; older bytes are dropped.
pub const RETAINED_OUTPUT: usize = 1 << 20;

/// Which end of the connection a peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The host daemon (or `moat run`): sends requests.
    Host,
    /// moat's init inside the sandbox: answers them.
    Agent,
}

impl Role {
    /// The snake_case name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Agent => "agent",
        }
    }

    /// The role of the other end.
    pub fn peer(self) -> Role {
        match self {
            Role::Host => Role::Agent,
            Role::Agent => Role::Host,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first frame each side sends (kind `Hello`, stream 0), without waiting for the other's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The protocol version the sender speaks; must equal the receiver's
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// What the sender is.
    pub role: Role,
    /// Optional capabilities the sender supports. A feature is in use on a connection only
    /// when both Hellos list it ([`Hello::common_features`]); names are 1 to 64 bytes of
    /// `[a-z0-9._-]`, at most 64 of them. Version 1 defines `deadline`
    /// ([`FEATURE_DEADLINE`]). Default: empty.
    #[serde(default)]
    pub features: Vec<String>,
}

/// Only the version, read before anything else so that a peer of another version gets a
/// version error rather than an "unknown field" error about a field its version added.
#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

impl Hello {
    /// This side's Hello: the current version and every feature of [`FEATURES`].
    pub fn new(role: Role) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            role,
            features: FEATURES.iter().map(|f| f.to_string()).collect(),
        }
    }

    /// Checks a Hello received from the peer: same version, the expected role, sane features.
    pub fn check_peer(&self, expected: Role) -> Result<(), ProtoError> {
        if self.version != PROTOCOL_VERSION {
            return Err(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: self.version,
            });
        }
        if self.role != expected {
            return Err(ProtoError::UnexpectedRole {
                expected,
                got: self.role,
            });
        }
        if self.features.len() > MAX_FEATURES {
            return Err(ProtoError::TooManyFeatures {
                count: self.features.len(),
                max: MAX_FEATURES,
            });
        }
        for name in &self.features {
            let ok = !name.is_empty()
                && name.len() <= MAX_FEATURE_LEN
                && name
                    .bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'));
            if !ok {
                return Err(ProtoError::InvalidFeature { name: clip(name) });
            }
        }
        Ok(())
    }

    /// Parses and checks the payload of the peer's `Hello` frame. The version is read first,
    /// so a peer of another version is reported as [`ProtoError::VersionMismatch`] whatever
    /// else its Hello holds.
    pub fn parse_peer(payload: &[u8], expected: Role) -> Result<Hello, ProtoError> {
        let version: VersionOnly = serde_json::from_slice(payload).map_err(ProtoError::BadHello)?;
        if version.version != PROTOCOL_VERSION {
            return Err(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version.version,
            });
        }
        let hello: Hello = serde_json::from_slice(payload).map_err(ProtoError::BadHello)?;
        hello.check_peer(expected)?;
        Ok(hello)
    }

    /// The features both Hellos list, in this Hello's order.
    pub fn common_features(&self, peer: &Hello) -> Vec<String> {
        self.features
            .iter()
            .filter(|f| peer.features.contains(f))
            .cloned()
            .collect()
    }
}

/// A terminal size, in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    /// Lines, at least 1.
    pub rows: u16,
    /// Columns, at least 1.
    pub cols: u16,
}

/// What the host asks of the agent. Each request is the first frame of a fresh stream whose
/// odd id the host chose (see the crate docs for the flows); one request per stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Start a process. Answer: `Started`, output on channels 1 and 2, `Exit`; or `Error`.
    Exec {
        /// Program and arguments; `argv[0]` without a `/` is looked up in `PATH` from `env`.
        /// Non-empty, at most [`MAX_ARGS`] arguments and [`MAX_ARGV_BYTES`] bytes.
        argv: Vec<String>,
        /// Variables on top of the sandbox's base environment (moat's `PATH`, `HOME`,
        /// `USER`, `LOGNAME`, `HOSTNAME`, `LANG`, `TMPDIR`, then the policy's `env`), which
        /// they override; nothing comes from the agent's own environment or the host's.
        /// Names match `[A-Za-z_][A-Za-z0-9_]*`. Default: empty.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Absolute working directory inside the sandbox. Default: the sandbox's own.
        #[serde(default)]
        cwd: Option<String>,
        /// Whether the process gets a stdin pipe. In the foreground the host sends stdin as
        /// Data and Eof on channel 0 of this stream; in the background the agent keeps the
        /// pipe open for `ProcStdin`. When false the process reads `/dev/null`.
        /// Default: false.
        #[serde(default)]
        stdin: bool,
        /// Run on a new pseudo-terminal of this size: stdin, stdout and stderr are the
        /// terminal, and all output comes on channel 1. Default: pipes.
        #[serde(default)]
        pty: Option<PtySize>,
        /// Kill the process's group this many milliseconds after start; `Exit` then has
        /// status `timeout`. At least 1. Default: none.
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// Detach: the agent answers `Started` as the last frame of the stream and keeps the
        /// process running after the stream and the connection end. It retains the last
        /// [`RETAINED_OUTPUT`] bytes of stdout and of stderr for `ProcOutput`; `stdin`
        /// gives a pipe for `ProcStdin`. `Signal` can still name the stream, `SignalPid`
        /// the pid. Incompatible with `pty`. Default: false.
        #[serde(default)]
        background: bool,
    },
    /// Send `signal` to the process that the `Exec` on `stream` started. Answer: `Ok`, or
    /// `Error` (`not_found` when no such process runs).
    Signal {
        /// The stream of the `Exec` (odd, non-zero).
        stream: u32,
        /// Signal number, 1 to 64.
        signal: i32,
    },
    /// Change the terminal size of the process that the `Exec` on `stream` started on a pty.
    /// Answer: `Ok`, or `Error`.
    Resize {
        /// The stream of the `Exec` (odd, non-zero).
        stream: u32,
        /// Lines, at least 1.
        rows: u16,
        /// Columns, at least 1.
        cols: u16,
    },
    /// Read a file (symlinks followed, inside the sandbox). Answer: `Started { pid: 0 }`,
    /// Data on channel 1, Eof on channel 1, `FileDone`; or `Error`.
    ReadFile {
        /// Absolute path inside the sandbox.
        path: String,
    },
    /// Write a file from the Data the host sends on channel 0 up to its Eof, without
    /// waiting for an answer first. The agent writes a temporary file beside `path` and
    /// renames it into place at Eof. Answer: `FileDone`, or `Error`.
    WriteFile {
        /// Absolute path inside the sandbox.
        path: String,
        /// Permission bits (at most `0o7777`). Default: `0o644` for a new file, the old
        /// file's bits for a replaced one.
        #[serde(default)]
        mode: Option<u32>,
        /// Create missing parent directories (`0o755`). Default: false.
        #[serde(default)]
        create_parents: bool,
    },
    /// List a directory, never following symlinks. Answer: `Listing`, or `Error`.
    ListDir {
        /// Absolute path of the directory inside the sandbox.
        path: String,
        /// 0: the directory's children only; each step more descends one level further.
        /// At most 16.
        #[serde(default)]
        depth: u32,
    },
    /// Describe one path without following a final symlink. Answer: `StatResult`, or
    /// `Error`.
    Stat {
        /// Absolute path inside the sandbox.
        path: String,
    },
    /// Create a directory (`0o755`). Answer: `Ok`, or `Error`.
    Mkdir {
        /// Absolute path inside the sandbox.
        path: String,
        /// Create missing parents too, and succeed when the directory exists (`mkdir -p`).
        /// Default: false.
        #[serde(default)]
        parents: bool,
    },
    /// Remove a file, a symlink or an empty directory. Answer: `Ok`, or `Error`.
    Remove {
        /// Absolute path inside the sandbox.
        path: String,
        /// Remove a directory and everything below it, never following symlinks.
        /// Default: false.
        #[serde(default)]
        recursive: bool,
    },
    /// Rename a path (`rename(2)`: replaces an existing file at `to`). Answer: `Ok`, or
    /// `Error`.
    Rename {
        /// Absolute path inside the sandbox.
        from: String,
        /// Absolute path inside the sandbox.
        to: String,
    },
    /// Resource use of the whole sandbox. Answer: `Metrics`, or `Error`. (An empty struct
    /// variant, not a unit one, so that serde rejects unknown fields in it.)
    Metrics {},
    /// The background processes the agent started, running or finished (the 256 most
    /// recent finished ones). Answer: `ProcList`.
    Procs {},
    /// The retained output of a background process, from the start of what is retained.
    /// Answer: `Started { pid }`, Data on channels 1 and 2, then (with `follow`) live output
    /// until the process exits, Eof 1, Eof 2, then `Exit` when the process has ended or
    /// `Ok` when it still runs; `Error { not_found }` for an unknown pid. A Cancel ends the
    /// stream (final `Ok`) and leaves the process alone.
    ProcOutput {
        /// A pid from `Started` of a background `Exec`.
        pid: u32,
        /// Keep streaming live output until the process exits. Default: false.
        #[serde(default)]
        follow: bool,
    },
    /// Write to the stdin pipe of a background process: the host sends Data on channel 0
    /// and one Eof on channel 0 (the end of this request's bytes, not necessarily of the
    /// pipe). Answer: `Ok` after the Eof; `Error` (`not_found` for an unknown pid,
    /// `invalid_request` when the process has no open stdin pipe).
    ProcStdin {
        /// A pid from `Started` of a background `Exec` with `stdin`.
        pid: u32,
        /// Close the pipe at the Eof (the process then reads end of file). Default: false.
        #[serde(default)]
        close: bool,
    },
    /// Send `signal` to the process group of a process the agent started (foreground or
    /// background, still running). Answer: `Ok`, or `Error { not_found }`.
    SignalPid {
        /// The pid from `Started`.
        pid: u32,
        /// Signal number, 1 to 64.
        signal: i32,
    },
    /// Egress relay (sandboxes whose network mode is `allowlist`): the agent waits for the
    /// next connection a workload makes to its loopback proxy port, answers `Relayed`, and
    /// from then on this whole unix connection carries that TCP connection's raw bytes both
    /// ways (no more frames). The host sends it as the only request of a fresh connection
    /// and sends nothing after it until `Relayed`. Answer: `Relayed`, or `Error`
    /// (`invalid_request` when the sandbox has no egress port).
    Relay {},
    /// The sandbox's lifetime ends at `expires_at_ms` (milliseconds since the Unix epoch, on
    /// the host's clock): then the agent kills every process of the sandbox and exits, which
    /// ends the sandbox whether or not a daemon is running. `None` clears the deadline. Each
    /// one replaces the one before; one already past ends the sandbox at once (after the
    /// answer). Needs the `deadline` feature. Answer: `Ok`.
    SetDeadline { expires_at_ms: Option<u64> },
}

impl Request {
    /// An `Exec` of `argv` with every other field at its default.
    pub fn exec<I, S>(argv: I) -> Request
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Request::Exec {
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            cwd: None,
            stdin: false,
            pty: None,
            timeout_ms: None,
            background: false,
        }
    }

    /// The snake_case `type` of this request, as on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            Request::Exec { .. } => "exec",
            Request::Signal { .. } => "signal",
            Request::Resize { .. } => "resize",
            Request::ReadFile { .. } => "read_file",
            Request::WriteFile { .. } => "write_file",
            Request::ListDir { .. } => "list_dir",
            Request::Stat { .. } => "stat",
            Request::Mkdir { .. } => "mkdir",
            Request::Remove { .. } => "remove",
            Request::Rename { .. } => "rename",
            Request::Metrics {} => "metrics",
            Request::Procs {} => "procs",
            Request::ProcOutput { .. } => "proc_output",
            Request::ProcStdin { .. } => "proc_stdin",
            Request::SignalPid { .. } => "signal_pid",
            Request::Relay {} => "relay",
            Request::SetDeadline { .. } => "set_deadline",
        }
    }

    /// Whether the host sends Data and Eof on channel 0 of this request's stream: a
    /// foreground `Exec` with `stdin`, a `WriteFile`, a `ProcStdin`.
    pub fn takes_stdin(&self) -> bool {
        match self {
            Request::Exec {
                stdin, background, ..
            } => *stdin && !*background,
            Request::WriteFile { .. } | Request::ProcStdin { .. } => true,
            _ => false,
        }
    }

    /// Checks the limits serde cannot express. The agent answers a request that fails with
    /// `Error { code: err.code(), .. }` and keeps the connection.
    pub fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Request::Exec {
                argv,
                env,
                cwd,
                stdin: _,
                pty,
                timeout_ms,
                background,
            } => {
                validate_argv(argv)?;
                validate_env(env)?;
                if let Some(cwd) = cwd {
                    validate_path("cwd", cwd)?;
                }
                if let Some(size) = pty {
                    validate_size(size.rows, size.cols)?;
                }
                if *timeout_ms == Some(0) {
                    return Err(ProtoError::ZeroTimeout);
                }
                if *background && pty.is_some() {
                    return Err(ProtoError::BackgroundConflict { what: "a pty" });
                }
                Ok(())
            }
            Request::Signal { stream, signal } => {
                validate_stream(*stream)?;
                validate_signal(*signal)
            }
            Request::Resize { stream, rows, cols } => {
                validate_stream(*stream)?;
                validate_size(*rows, *cols)
            }
            Request::ReadFile { path } | Request::Stat { path } => validate_path("path", path),
            Request::Mkdir { path, .. } | Request::Remove { path, .. } => {
                validate_path("path", path)
            }
            Request::WriteFile { path, mode, .. } => {
                validate_path("path", path)?;
                match mode {
                    Some(mode) if *mode > MAX_MODE => Err(ProtoError::InvalidMode { mode: *mode }),
                    _ => Ok(()),
                }
            }
            Request::ListDir { path, depth } => {
                validate_path("path", path)?;
                if *depth > MAX_DEPTH {
                    return Err(ProtoError::DepthTooLarge {
                        depth: *depth,
                        max: MAX_DEPTH,
                    });
                }
                Ok(())
            }
            Request::Rename { from, to } => {
                validate_path("from", from)?;
                validate_path("to", to)
            }
            Request::Metrics {}
            | Request::Procs {}
            | Request::Relay {}
            | Request::SetDeadline { .. } => Ok(()),
            Request::ProcOutput { pid, .. } | Request::ProcStdin { pid, .. } => validate_pid(*pid),
            Request::SignalPid { pid, signal } => {
                validate_pid(*pid)?;
                validate_signal(*signal)
            }
        }
    }
}

/// One background process in a `ProcList`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcInfo {
    /// The pid from `Started`, inside the sandbox's pid namespace.
    pub pid: u32,
    /// The argv it was started with; cut by the agent to [`MAX_PROC_ARGV_BYTES`].
    pub argv: Vec<String>,
    /// Whether it still runs.
    pub running: bool,
    /// Its exit code (0 to 255), once it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, once one did.
    pub signal: Option<i32>,
    /// How it ended, once it ended.
    pub status: Option<Status>,
    /// When it started, milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// When it ended, milliseconds since the Unix epoch.
    pub finished_ms: Option<u64>,
}

impl ProcInfo {
    /// Checks a process description that came from the agent. `field` names it in errors.
    pub fn validate(&self, field: &str) -> Result<(), ProtoError> {
        validate_pid(self.pid)?;
        let bytes = self
            .argv
            .iter()
            .fold(0usize, |n, a| n.saturating_add(a.len() + 1));
        if bytes > MAX_PROC_ARGV_BYTES {
            return Err(ProtoError::ArgvTooLarge {
                bytes,
                max: MAX_PROC_ARGV_BYTES,
            });
        }
        validate_exit(self.exit_code, self.signal)?;
        let ended = self.exit_code.is_some()
            || self.signal.is_some()
            || self.status.is_some()
            || self.finished_ms.is_some();
        if self.running && ended {
            return Err(ProtoError::InconsistentProc {
                field: field.to_owned(),
                why: "it is running but has an exit",
            });
        }
        if !self.running && (self.status.is_none() || self.finished_ms.is_none()) {
            return Err(ProtoError::InconsistentProc {
                field: field.to_owned(),
                why: "it is not running but has no status or finish time",
            });
        }
        Ok(())
    }
}

/// What a directory entry is (`lstat` semantics: a symlink is a symlink).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// Sockets, fifos, devices.
    Other,
}

/// One file system entry inside the sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Absolute path inside the sandbox. Version 1 carries UTF-8 only: the agent replaces
    /// invalid bytes in names with U+FFFD.
    pub path: String,
    pub kind: EntryKind,
    /// Size in bytes (`st_size`; for a symlink, the length of its target).
    pub size: u64,
    /// Permission bits only (`st_mode & 0o7777`); the type is in `kind`.
    pub mode: u32,
    /// Last modification, milliseconds since the Unix epoch (negative before 1970).
    pub mtime_ms: i64,
}

impl Entry {
    /// Checks an entry that came from the agent. `field` names it in errors.
    pub fn validate(&self, field: &str) -> Result<(), ProtoError> {
        validate_path(&format!("{field}.path"), &self.path)?;
        if self.mode > MAX_MODE {
            return Err(ProtoError::InvalidMode { mode: self.mode });
        }
        Ok(())
    }
}

/// Why a request failed, as a stable snake_case code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    PermissionDenied,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    /// A directory to remove without `recursive` is not empty.
    NotEmpty,
    /// The request failed [`Request::validate`], or makes no sense in the agent's state
    /// (a `Resize` of a process without a pty).
    InvalidRequest,
    /// Over a size limit: of the protocol, of the file system, of the sandbox's disk.
    TooLarge,
    Busy,
    /// The host cancelled the request (a `Cancel` frame) before it finished.
    Cancelled,
    Internal,
}

impl ErrorCode {
    /// The snake_case name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::NotADirectory => "not_a_directory",
            ErrorCode::IsADirectory => "is_a_directory",
            ErrorCode::NotEmpty => "not_empty",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Busy => "busy",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code for an I/O error the agent got doing a request.
    pub fn from_io(kind: std::io::ErrorKind) -> ErrorCode {
        use std::io::ErrorKind as K;
        match kind {
            K::NotFound => ErrorCode::NotFound,
            K::PermissionDenied | K::ReadOnlyFilesystem => ErrorCode::PermissionDenied,
            K::AlreadyExists => ErrorCode::AlreadyExists,
            K::NotADirectory => ErrorCode::NotADirectory,
            K::IsADirectory => ErrorCode::IsADirectory,
            K::DirectoryNotEmpty => ErrorCode::NotEmpty,
            K::InvalidInput => ErrorCode::InvalidRequest,
            K::FileTooLarge | K::StorageFull | K::QuotaExceeded => ErrorCode::TooLarge,
            K::ResourceBusy | K::ExecutableFileBusy | K::WouldBlock => ErrorCode::Busy,
            _ => ErrorCode::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the agent answers on a request's stream. Every stream ends with exactly one final
/// response; `Started` is the only one that is not final (except for a background `Exec`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// The process started (`Exec`), or the file opened (`ReadFile`, `pid` 0).
    Started {
        /// The process id inside the sandbox's pid namespace; 0 for a file.
        pid: u32,
    },
    /// The process of an `Exec` ended; final.
    Exit {
        /// Its exit code (0 to 255) when it exited.
        exit_code: Option<i32>,
        /// The signal that killed it, when one did.
        signal: Option<i32>,
        /// How it ended, as `moat run` reports it.
        status: Status,
    },
    /// A `ReadFile` or `WriteFile` finished; final.
    FileDone {
        /// Bytes read or written. For `ReadFile`, the host checks it equals the bytes it
        /// received.
        bytes: u64,
    },
    /// The answer to `ListDir`; final.
    Listing {
        /// Entries below the directory (not the directory itself), sorted by path.
        entries: Vec<Entry>,
        /// Whether the agent stopped early to keep the response under the frame limit.
        /// Default: false.
        #[serde(default)]
        truncated: bool,
    },
    /// The answer to `Stat`; final.
    StatResult(Entry),
    /// The request succeeded and has nothing to say; final. (An empty struct variant, not a
    /// unit one, so that serde rejects unknown fields in it.)
    Ok {},
    /// The answer to `Procs`; final.
    ProcList {
        /// Every background process the agent knows, by pid.
        procs: Vec<ProcInfo>,
    },
    /// The answer to `Metrics`; final.
    Metrics {
        /// CPU time used by the sandbox so far, user plus system.
        cpu_ms: u64,
        /// Memory in use now.
        memory_bytes: u64,
        /// Processes (tasks) alive now, the agent included.
        pids: u32,
    },
    /// A workload connected to the egress port (`Relay`); final: raw bytes follow.
    Relayed {
        /// The workload's source port on the sandbox's loopback.
        peer_port: u16,
    },
    /// The request failed; final.
    Error {
        code: ErrorCode,
        /// What went wrong and what to do, for a person; at most [`MAX_ERROR_MESSAGE`]
        /// bytes.
        message: String,
    },
}

impl Response {
    /// An `Error` response; `message` is cut to [`MAX_ERROR_MESSAGE`] bytes (at a char
    /// boundary).
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut end = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Response::Error { code, message }
    }

    /// The `Error` response for a request that failed validation.
    pub fn from_proto_error(err: &ProtoError) -> Response {
        Response::error(err.code(), err.to_string())
    }

    /// The snake_case `type` of this response, as on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            Response::Started { .. } => "started",
            Response::Exit { .. } => "exit",
            Response::FileDone { .. } => "file_done",
            Response::Listing { .. } => "listing",
            Response::StatResult(_) => "stat_result",
            Response::Ok {} => "ok",
            Response::Metrics { .. } => "metrics",
            Response::ProcList { .. } => "proc_list",
            Response::Relayed { .. } => "relayed",
            Response::Error { .. } => "error",
        }
    }

    /// Whether this response ends its stream. `Started` ends only a background `Exec`.
    pub fn is_final(&self, background_exec: bool) -> bool {
        !matches!(self, Response::Started { .. }) || background_exec
    }

    /// Checks a response that came from the agent. The host treats a failure like a broken
    /// frame: the agent is misbehaving, and the connection is closed.
    pub fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Response::Exit {
                exit_code, signal, ..
            } => validate_exit(*exit_code, *signal),
            Response::ProcList { procs } => {
                if procs.len() > MAX_PROCS {
                    return Err(ProtoError::TooManyProcs {
                        count: procs.len(),
                        max: MAX_PROCS,
                    });
                }
                for (i, proc) in procs.iter().enumerate() {
                    proc.validate(&format!("procs[{i}]"))?;
                }
                Ok(())
            }
            Response::Listing { entries, .. } => {
                for (i, entry) in entries.iter().enumerate() {
                    entry.validate(&format!("entries[{i}]"))?;
                }
                Ok(())
            }
            Response::StatResult(entry) => entry.validate("stat_result"),
            Response::Error { message, .. } => {
                if message.len() > MAX_ERROR_MESSAGE {
                    return Err(ProtoError::MessageTooLong {
                        len: message.len(),
                        max: MAX_ERROR_MESSAGE,
                    });
                }
                Ok(())
            }
            Response::Started { .. }
            | Response::FileDone { .. }
            | Response::Ok {}
            | Response::Relayed { .. }
            | Response::Metrics { .. } => Ok(()),
        }
    }
}

/// A message that breaks the protocol's rules: a request or response over a limit, or a
/// Hello that does not match.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("argv is empty or argv[0] is empty: name the program to run as argv[0]")]
    EmptyArgv,
    #[error("argv has {count} arguments; the limit is {max}: pass long lists in a file")]
    TooManyArgs { count: usize, max: usize },
    #[error("argv is {bytes} bytes in total; the limit is {max}: pass large data in a file")]
    ArgvTooLarge { bytes: usize, max: usize },
    #[error("env has {count} variables; the limit is {max}")]
    TooManyEnv { count: usize, max: usize },
    #[error("env is {bytes} bytes in total; the limit is {max}: pass large data in a file")]
    EnvTooLarge { bytes: usize, max: usize },
    #[error(
        "invalid environment variable name {name:?}: use ASCII letters, digits and '_', \
         not starting with a digit"
    )]
    InvalidEnvName { name: String },
    #[error("{field} contains a NUL byte, which no Linux path, argument or variable can hold")]
    Nul { field: String },
    #[error("{field} is empty: give an absolute path such as /work/file.txt")]
    EmptyPath { field: String },
    #[error("{field} {path:?} is not absolute: give a path that starts with '/'")]
    RelativePath { field: String, path: String },
    #[error("{field} is {len} bytes long; the limit is {max}")]
    PathTooLong {
        field: String,
        len: usize,
        max: usize,
    },
    #[error("depth {depth} is over the limit of {max}: list deeper directories separately")]
    DepthTooLarge { depth: u32, max: u32 },
    #[error("signal {signal} is not a Linux signal number: use 1 to 64")]
    InvalidSignal { signal: i32 },
    #[error("mode {mode:#o} has bits beyond 0o7777: give permission bits only")]
    InvalidMode { mode: u32 },
    #[error("stream {stream} is not a stream the host opened: those ids are odd")]
    InvalidStream { stream: u32 },
    #[error("terminal size {rows}x{cols} is invalid: rows and cols must be at least 1")]
    InvalidSize { rows: u16, cols: u16 },
    #[error("timeout_ms is 0: leave it out for no timeout, or give at least 1")]
    ZeroTimeout,
    #[error("a background process cannot have {what}: run it in the foreground instead")]
    BackgroundConflict { what: &'static str },
    #[error("pid {pid} is not a process id: use a pid from a Started response")]
    InvalidPid { pid: u32 },
    #[error("{field} is inconsistent: {why}")]
    InconsistentProc { field: String, why: &'static str },
    #[error("the process list has {count} entries; the limit is {max}")]
    TooManyProcs { count: usize, max: usize },
    #[error("exit code {code} is outside 0..=255")]
    InvalidExitCode { code: i32 },
    #[error("an exit has both an exit code and a signal; a process ends in one way only")]
    ExitCodeAndSignal,
    #[error("error message is {len} bytes; the limit is {max}")]
    MessageTooLong { len: usize, max: usize },
    #[error(
        "agent protocol version mismatch: this side speaks version {ours}, the peer speaks \
         version {theirs}; run the same moat binary on both sides (recreate the sandbox, or \
         restart the daemon with the moat that created it)"
    )]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error("the peer says it is the {got}, but the {expected} was expected on this connection")]
    UnexpectedRole { expected: Role, got: Role },
    #[error("invalid Hello from the peer; it does not speak this protocol")]
    BadHello(#[source] serde_json::Error),
    #[error("the peer's Hello lists {count} features; the limit is {max}")]
    TooManyFeatures { count: usize, max: usize },
    #[error("invalid feature name {name:?} in the peer's Hello: use 1 to 64 of [a-z0-9._-]")]
    InvalidFeature { name: String },
}

impl ProtoError {
    /// The code to answer a request that failed with this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::TooManyArgs { .. }
            | ProtoError::ArgvTooLarge { .. }
            | ProtoError::TooManyEnv { .. }
            | ProtoError::EnvTooLarge { .. }
            | ProtoError::PathTooLong { .. }
            | ProtoError::MessageTooLong { .. }
            | ProtoError::TooManyProcs { .. }
            | ProtoError::TooManyFeatures { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::InvalidRequest,
        }
    }
}

/// At most 64 characters of a string the peer sent, for an error message.
fn clip(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s.to_owned(),
    }
}

fn validate_path(field: &str, path: &str) -> Result<(), ProtoError> {
    if path.is_empty() {
        return Err(ProtoError::EmptyPath {
            field: field.to_owned(),
        });
    }
    if path.contains('\0') {
        return Err(ProtoError::Nul {
            field: field.to_owned(),
        });
    }
    if path.len() > MAX_PATH {
        return Err(ProtoError::PathTooLong {
            field: field.to_owned(),
            len: path.len(),
            max: MAX_PATH,
        });
    }
    if !path.starts_with('/') {
        return Err(ProtoError::RelativePath {
            field: field.to_owned(),
            path: clip(path),
        });
    }
    Ok(())
}

fn validate_argv(argv: &[String]) -> Result<(), ProtoError> {
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(ProtoError::EmptyArgv);
    }
    if argv.len() > MAX_ARGS {
        return Err(ProtoError::TooManyArgs {
            count: argv.len(),
            max: MAX_ARGS,
        });
    }
    let mut bytes = 0usize;
    for (i, arg) in argv.iter().enumerate() {
        if arg.contains('\0') {
            return Err(ProtoError::Nul {
                field: format!("argv[{i}]"),
            });
        }
        bytes = bytes.saturating_add(arg.len() + 1);
    }
    if bytes > MAX_ARGV_BYTES {
        return Err(ProtoError::ArgvTooLarge {
            bytes,
            max: MAX_ARGV_BYTES,
        });
    }
    Ok(())
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'A'..=b'Z' | b'a'..=b'z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn validate_env(env: &BTreeMap<String, String>) -> Result<(), ProtoError> {
    if env.len() > MAX_ENV {
        return Err(ProtoError::TooManyEnv {
            count: env.len(),
            max: MAX_ENV,
        });
    }
    let mut bytes = 0usize;
    for (name, value) in env {
        if !is_env_name(name) {
            return Err(ProtoError::InvalidEnvName { name: clip(name) });
        }
        if value.contains('\0') {
            return Err(ProtoError::Nul {
                field: format!("env[{name}]"),
            });
        }
        bytes = bytes.saturating_add(name.len() + value.len() + 2);
    }
    if bytes > MAX_ENV_BYTES {
        return Err(ProtoError::EnvTooLarge {
            bytes,
            max: MAX_ENV_BYTES,
        });
    }
    Ok(())
}

fn validate_pid(pid: u32) -> Result<(), ProtoError> {
    if pid == 0 || pid > i32::MAX as u32 {
        return Err(ProtoError::InvalidPid { pid });
    }
    Ok(())
}

fn validate_signal(signal: i32) -> Result<(), ProtoError> {
    if !(1..=MAX_SIGNAL).contains(&signal) {
        return Err(ProtoError::InvalidSignal { signal });
    }
    Ok(())
}

fn validate_exit(exit_code: Option<i32>, signal: Option<i32>) -> Result<(), ProtoError> {
    if exit_code.is_some() && signal.is_some() {
        return Err(ProtoError::ExitCodeAndSignal);
    }
    if let Some(code) = exit_code {
        if !(0..=255).contains(&code) {
            return Err(ProtoError::InvalidExitCode { code });
        }
    }
    if let Some(signal) = signal {
        validate_signal(signal)?;
    }
    Ok(())
}

fn validate_stream(stream: u32) -> Result<(), ProtoError> {
    if stream & 1 == 1 {
        Ok(())
    } else {
        Err(ProtoError::InvalidStream { stream })
    }
}

fn validate_size(rows: u16, cols: u16) -> Result<(), ProtoError> {
    if rows == 0 || cols == 0 {
        return Err(ProtoError::InvalidSize { rows, cols });
    }
    Ok(())
}

/// Examples of every message, for the tests of this crate.
#[cfg(test)]
pub(crate) mod samples {
    use super::*;

    pub(crate) fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.to_owned(),
            kind,
            size: 42,
            mode: 0o644,
            mtime_ms: -1_000,
        }
    }

    /// One of each request, all valid.
    pub(crate) fn requests() -> Vec<Request> {
        vec![
            Request::Exec {
                argv: vec!["sh".into(), "-c".into(), "echo hi; cat".into()],
                env: BTreeMap::from([
                    ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
                    ("_x1".to_owned(), "ünïcode = ok".to_owned()),
                ]),
                cwd: Some("/work".into()),
                stdin: true,
                pty: Some(PtySize { rows: 24, cols: 80 }),
                timeout_ms: Some(10_000),
                background: false,
            },
            Request::exec(["true"]),
            Request::Exec {
                argv: vec!["sleep".into(), "100".into()],
                env: BTreeMap::new(),
                cwd: None,
                stdin: false,
                pty: None,
                timeout_ms: None,
                background: true,
            },
            Request::Signal {
                stream: 1,
                signal: 15,
            },
            Request::Resize {
                stream: 3,
                rows: 50,
                cols: 200,
            },
            Request::ReadFile {
                path: "/etc/hostname".into(),
            },
            Request::WriteFile {
                path: "/work/a b/c.txt".into(),
                mode: Some(0o7777),
                create_parents: true,
            },
            Request::WriteFile {
                path: "/x".into(),
                mode: None,
                create_parents: false,
            },
            Request::ListDir {
                path: "/".into(),
                depth: MAX_DEPTH,
            },
            Request::Stat {
                path: "/work/link".into(),
            },
            Request::Mkdir {
                path: "/work/new/dir".into(),
                parents: true,
            },
            Request::Remove {
                path: "/work/tree".into(),
                recursive: true,
            },
            Request::Rename {
                from: "/work/a".into(),
                to: "/work/b".into(),
            },
            Request::Metrics {},
            Request::Procs {},
            Request::SetDeadline {
                expires_at_ms: Some(1_700_000_000_000),
            },
            Request::SetDeadline {
                expires_at_ms: None,
            },
            Request::ProcOutput {
                pid: 12,
                follow: true,
            },
            Request::ProcStdin {
                pid: 12,
                close: true,
            },
            Request::SignalPid { pid: 12, signal: 9 },
        ]
    }

    pub(crate) fn proc_info(pid: u32, running: bool) -> ProcInfo {
        ProcInfo {
            pid,
            argv: vec!["sleep".into(), "100".into()],
            running,
            exit_code: if running { None } else { Some(0) },
            signal: None,
            status: if running { None } else { Some(Status::Ok) },
            started_ms: 1_700_000_000_000,
            finished_ms: if running {
                None
            } else {
                Some(1_700_000_001_000)
            },
        }
    }

    /// One of each response, all valid.
    pub(crate) fn responses() -> Vec<Response> {
        vec![
            Response::Started { pid: 7 },
            Response::Started { pid: 0 },
            Response::Exit {
                exit_code: Some(3),
                signal: None,
                status: Status::Ok,
            },
            Response::Exit {
                exit_code: None,
                signal: Some(9),
                status: Status::Timeout,
            },
            Response::Exit {
                exit_code: None,
                signal: None,
                status: Status::Error,
            },
            Response::FileDone { bytes: u64::MAX },
            Response::Listing {
                entries: vec![
                    entry("/work/a", EntryKind::File),
                    entry("/work/d", EntryKind::Dir),
                    entry("/work/l", EntryKind::Symlink),
                    entry("/work/p", EntryKind::Other),
                ],
                truncated: true,
            },
            Response::Listing {
                entries: vec![],
                truncated: false,
            },
            Response::StatResult(entry("/work/a", EntryKind::File)),
            Response::Ok {},
            Response::Metrics {
                cpu_ms: 1,
                memory_bytes: 2,
                pids: 3,
            },
            Response::ProcList {
                procs: vec![proc_info(5, true), proc_info(6, false)],
            },
            Response::error(ErrorCode::NotFound, "no such file: /work/x"),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::samples::{entry, requests, responses};
    use super::*;

    use serde_json::json;

    fn parse_request(value: serde_json::Value) -> Result<Request, serde_json::Error> {
        serde_json::from_value(value)
    }

    fn parse_response(value: serde_json::Value) -> Result<Response, serde_json::Error> {
        serde_json::from_value(value)
    }

    #[test]
    fn every_request_round_trips_and_validates() {
        let all = requests();
        let mut types: Vec<&str> = all.iter().map(Request::type_name).collect();
        types.dedup();
        assert_eq!(types.len(), 16, "a sample of every request type");
        for request in all {
            let text = serde_json::to_string(&request).unwrap();
            let back: Request = serde_json::from_str(&text).unwrap();
            assert_eq!(back, request, "{text}");
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(value["type"], request.type_name(), "{text}");
            request.validate().unwrap();
        }
    }

    #[test]
    fn every_response_round_trips_and_validates() {
        let all = responses();
        let mut types: Vec<&str> = all.iter().map(Response::type_name).collect();
        types.dedup();
        assert_eq!(types.len(), 9, "a sample of every response type");
        for response in all {
            let text = serde_json::to_string(&response).unwrap();
            let back: Response = serde_json::from_str(&text).unwrap();
            assert_eq!(back, response, "{text}");
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(value["type"], response.type_name(), "{text}");
            response.validate().unwrap();
        }
    }

    #[test]
    fn hello_round_trips() {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            role: Role::Agent,
            features: vec!["a".into(), "b.c-d_1".into()],
        };
        let text = serde_json::to_string(&hello).unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"role":"agent","features":["a","b.c-d_1"]}"#
        );
        assert_eq!(serde_json::from_str::<Hello>(&text).unwrap(), hello);
        assert_eq!(
            Hello::parse_peer(text.as_bytes(), Role::Agent).unwrap(),
            hello
        );
    }

    #[test]
    fn wire_shapes_are_as_documented() {
        assert_eq!(
            serde_json::to_value(Request::Metrics {}).unwrap(),
            json!({"type": "metrics"})
        );
        assert_eq!(
            serde_json::to_value(Response::Ok {}).unwrap(),
            json!({"type": "ok"})
        );
        assert_eq!(
            serde_json::to_value(Response::StatResult(entry("/a", EntryKind::Symlink))).unwrap(),
            json!({"type": "stat_result", "path": "/a", "kind": "symlink", "size": 42,
                   "mode": 0o644, "mtime_ms": -1000})
        );
        assert_eq!(
            serde_json::to_value(Response::error(ErrorCode::IsADirectory, "m")).unwrap(),
            json!({"type": "error", "code": "is_a_directory", "message": "m"})
        );
        assert_eq!(
            serde_json::to_value(Response::Exit {
                exit_code: Some(0),
                signal: None,
                status: Status::OutputLimit
            })
            .unwrap(),
            json!({"type": "exit", "exit_code": 0, "signal": null, "status": "output_limit"})
        );
        // Defaults: the smallest exec is a type and an argv.
        assert_eq!(
            parse_request(json!({"type": "exec", "argv": ["ls"]})).unwrap(),
            Request::exec(["ls"])
        );
        assert_eq!(
            parse_request(json!({"type": "list_dir", "path": "/"})).unwrap(),
            Request::ListDir {
                path: "/".into(),
                depth: 0
            }
        );
        assert_eq!(
            parse_response(json!({"type": "listing", "entries": []})).unwrap(),
            Response::Listing {
                entries: vec![],
                truncated: false
            }
        );
        assert_eq!(
            serde_json::from_value::<Hello>(json!({"version": 1, "role": "host"})).unwrap(),
            Hello {
                features: vec![],
                ..Hello::new(Role::Host)
            }
        );
        assert_eq!(
            serde_json::to_value(Hello::new(Role::Agent)).unwrap(),
            json!({"version": 1, "role": "agent", "features": ["deadline"]})
        );
        assert_eq!(
            serde_json::to_value(Request::SetDeadline {
                expires_at_ms: Some(5)
            })
            .unwrap(),
            json!({"type": "set_deadline", "expires_at_ms": 5})
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let requests = [
            json!({"type": "exec", "argv": ["ls"], "uid": 0}),
            json!({"type": "exec", "argv": ["ls"], "pty": {"rows": 1, "cols": 1, "x": 1}}),
            json!({"type": "metrics", "all": true}),
            json!({"type": "read_file", "path": "/a", "offset": 3}),
            json!({"type": "signal", "stream": 1, "signal": 9, "group": true}),
        ];
        for value in requests {
            let err = parse_request(value.clone()).unwrap_err();
            assert!(err.to_string().contains("unknown field"), "{value}: {err}");
        }
        let responses = [
            json!({"type": "ok", "detail": 1}),
            json!({"type": "error", "code": "busy", "message": "m", "errno": 16}),
            json!({"type": "stat_result", "path": "/a", "kind": "file", "size": 1, "mode": 0,
                   "mtime_ms": 0, "owner": "root"}),
            json!({"type": "listing", "entries": [{"path": "/a", "kind": "file", "size": 1,
                   "mode": 0, "mtime_ms": 0, "inode": 1}]}),
        ];
        for value in responses {
            let err = parse_response(value.clone()).unwrap_err();
            assert!(err.to_string().contains("unknown field"), "{value}: {err}");
        }
        let err = serde_json::from_value::<Hello>(json!({"version": 1, "role": "host", "x": 1}))
            .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn unknown_or_missing_types_are_rejected() {
        for value in [
            json!({"type": "chmod", "path": "/a"}),
            json!({"type": "Exec", "argv": ["ls"]}),
            json!({"argv": ["ls"]}),
            json!({"type": 2}),
            json!(["exec"]),
        ] {
            assert!(parse_request(value.clone()).is_err(), "{value}");
        }
        for value in [
            json!({"type": "killed"}),
            json!({"type": "error", "code": "eperm", "message": "m"}),
            json!({"type": "stat_result", "path": "/a", "kind": "fifo", "size": 1, "mode": 0,
                   "mtime_ms": 0}),
            json!({"type": "exit", "exit_code": 0, "signal": null, "status": "fine"}),
            json!({}),
        ] {
            assert!(parse_response(value.clone()).is_err(), "{value}");
        }
        assert!(serde_json::from_value::<Hello>(json!({"version": 1, "role": "guest"})).is_err());
    }

    /// Replaces `field` of a valid exec.
    fn exec_with(field: &str, value: serde_json::Value) -> Request {
        let mut base = serde_json::to_value(Request::exec(["ls"])).unwrap();
        base[field] = value;
        parse_request(base).unwrap()
    }

    fn invalid(request: Request) -> ProtoError {
        match request.validate() {
            Ok(()) => panic!("accepted {request:?}"),
            Err(err) => err,
        }
    }

    #[test]
    fn validation_rejects_bad_exec() {
        assert!(matches!(
            invalid(exec_with("argv", json!([]))),
            ProtoError::EmptyArgv
        ));
        assert!(matches!(
            invalid(exec_with("argv", json!([""]))),
            ProtoError::EmptyArgv
        ));
        let many: Vec<&str> = vec!["x"; MAX_ARGS + 1];
        assert!(matches!(
            invalid(Request::exec(many)),
            ProtoError::TooManyArgs {
                count: 4097,
                max: 4096
            }
        ));
        let big = "y".repeat(MAX_ARGV_BYTES / 2);
        assert!(matches!(
            invalid(Request::exec(["a", big.as_str(), big.as_str()])),
            ProtoError::ArgvTooLarge { .. }
        ));
        // Exactly at the limits is fine.
        Request::exec(vec!["x"; MAX_ARGS]).validate().unwrap();
        let fits = "y".repeat(MAX_ARGV_BYTES - 2 - 2);
        Request::exec(["a", fits.as_str()]).validate().unwrap();
        match invalid(exec_with("argv", json!(["ls", "a\u{0}b"]))) {
            ProtoError::Nul { field } => assert_eq!(field, "argv[1]"),
            other => panic!("{other}"),
        }

        for name in ["", "1A", "A-B", "A=B", "A B", "Ä", "A\u{0}"] {
            let err = invalid(exec_with("env", json!({ name: "v" })));
            assert!(
                matches!(err, ProtoError::InvalidEnvName { .. }),
                "{name:?}: {err}"
            );
        }
        for name in ["A", "_", "_1", "path", "A_B_9"] {
            exec_with("env", json!({ name: "v" })).validate().unwrap();
        }
        match invalid(exec_with("env", json!({"A": "x\u{0}"}))) {
            ProtoError::Nul { field } => assert_eq!(field, "env[A]"),
            other => panic!("{other}"),
        }
        let many: serde_json::Map<String, serde_json::Value> = (0..=MAX_ENV)
            .map(|i| (format!("V{i}"), json!("")))
            .collect();
        assert!(matches!(
            invalid(exec_with("env", serde_json::Value::Object(many))),
            ProtoError::TooManyEnv { .. }
        ));
        let big = "z".repeat(MAX_ENV_BYTES / 2);
        assert!(matches!(
            invalid(exec_with("env", json!({"A": big, "B": big}))),
            ProtoError::EnvTooLarge { .. }
        ));

        assert!(matches!(
            invalid(exec_with("cwd", json!("work"))),
            ProtoError::RelativePath { .. }
        ));
        assert!(matches!(
            invalid(exec_with("cwd", json!(""))),
            ProtoError::EmptyPath { .. }
        ));
        assert!(matches!(
            invalid(exec_with("pty", json!({"rows": 0, "cols": 80}))),
            ProtoError::InvalidSize { rows: 0, cols: 80 }
        ));
        assert!(matches!(
            invalid(exec_with("timeout_ms", json!(0))),
            ProtoError::ZeroTimeout
        ));
        let mut background = serde_json::to_value(Request::exec(["ls"])).unwrap();
        background["background"] = json!(true);
        background["stdin"] = json!(true);
        // A background process may have a stdin pipe (for proc_stdin).
        parse_request(background.clone())
            .unwrap()
            .validate()
            .unwrap();
        background["stdin"] = json!(false);
        background["pty"] = json!({"rows": 1, "cols": 1});
        assert!(matches!(
            invalid(parse_request(background).unwrap()),
            ProtoError::BackgroundConflict { what: "a pty" }
        ));
    }

    #[test]
    fn validation_rejects_bad_paths_everywhere() {
        type MakeRequest = fn(String) -> Request;
        let makers: Vec<(&str, MakeRequest)> = vec![
            ("path", |p| Request::ReadFile { path: p }),
            ("path", |p| Request::Stat { path: p }),
            ("path", |p| Request::ListDir { path: p, depth: 1 }),
            ("path", |p| Request::Mkdir {
                path: p,
                parents: false,
            }),
            ("path", |p| Request::Remove {
                path: p,
                recursive: false,
            }),
            ("path", |p| Request::WriteFile {
                path: p,
                mode: None,
                create_parents: false,
            }),
            ("from", |p| Request::Rename {
                from: p,
                to: "/ok".into(),
            }),
            ("to", |p| Request::Rename {
                from: "/ok".into(),
                to: p,
            }),
            ("cwd", |p| Request::Exec {
                argv: vec!["ls".into()],
                env: BTreeMap::new(),
                cwd: Some(p),
                stdin: false,
                pty: None,
                timeout_ms: None,
                background: false,
            }),
        ];
        let long = format!("/{}", "a".repeat(MAX_PATH));
        for (field, make) in makers {
            let check = |path: &str, ok: fn(&ProtoError) -> bool| {
                let err = invalid(make(path.to_owned()));
                assert!(ok(&err), "{field} {path:?}: {err}");
                assert!(err.to_string().contains(field), "{err}");
                let Response::Error { code, message } = Response::from_proto_error(&err) else {
                    panic!("not an error response");
                };
                assert_eq!((code, message), (err.code(), err.to_string()));
            };
            check("", |e| matches!(e, ProtoError::EmptyPath { .. }));
            check("/a\u{0}b", |e| matches!(e, ProtoError::Nul { .. }));
            check("relative/x", |e| {
                matches!(e, ProtoError::RelativePath { .. })
            });
            check(&long, |e| {
                matches!(
                    e,
                    ProtoError::PathTooLong {
                        len: 4097,
                        max: 4096,
                        ..
                    }
                )
            });
            // `..` is the agent's to resolve, inside the sandbox.
            make("/work/../etc/passwd".into()).validate().unwrap();
            make(format!("/{}", "a".repeat(MAX_PATH - 1)))
                .validate()
                .unwrap();
        }
    }

    #[test]
    fn background_process_requests() {
        assert_eq!(
            parse_request(json!({"type": "procs"})).unwrap(),
            Request::Procs {}
        );
        assert_eq!(
            parse_request(json!({"type": "proc_output", "pid": 3})).unwrap(),
            Request::ProcOutput {
                pid: 3,
                follow: false
            }
        );
        assert_eq!(
            parse_request(json!({"type": "proc_stdin", "pid": 3, "close": true})).unwrap(),
            Request::ProcStdin {
                pid: 3,
                close: true
            }
        );
        assert_eq!(
            serde_json::to_value(Request::SignalPid { pid: 3, signal: 15 }).unwrap(),
            json!({"type": "signal_pid", "pid": 3, "signal": 15})
        );
        for bad in [
            json!({"type": "procs", "all": true}),
            json!({"type": "proc_output", "pid": 3, "tail": 10}),
            json!({"type": "proc_stdin", "pid": 3, "data": "x"}),
            json!({"type": "signal_pid", "pid": 3}),
            json!({"type": "signal_pid", "pid": -3, "signal": 9}),
        ] {
            assert!(parse_request(bad.clone()).is_err(), "{bad}");
        }
        for pid in [0, 1 << 31, u32::MAX] {
            for request in [
                Request::ProcOutput { pid, follow: true },
                Request::ProcStdin { pid, close: false },
                Request::SignalPid { pid, signal: 9 },
            ] {
                assert!(
                    matches!(invalid(request), ProtoError::InvalidPid { .. }),
                    "{pid}"
                );
            }
        }
        for signal in [0, 65, -9] {
            assert!(matches!(
                invalid(Request::SignalPid { pid: 1, signal }),
                ProtoError::InvalidSignal { .. }
            ));
        }
        assert!(Request::ProcStdin {
            pid: 1,
            close: false
        }
        .takes_stdin());
        assert!(!Request::ProcOutput {
            pid: 1,
            follow: true
        }
        .takes_stdin());
        let mut exec = Request::exec(["cat"]);
        if let Request::Exec { stdin, .. } = &mut exec {
            *stdin = true;
            assert!(exec.takes_stdin());
        }
        if let Request::Exec { background, .. } = &mut exec {
            *background = true;
        }
        assert!(
            !exec.takes_stdin(),
            "a background exec's stdin is proc_stdin's"
        );
    }

    #[test]
    fn proc_lists_are_checked() {
        use super::samples::proc_info;
        let ok = Response::ProcList {
            procs: vec![proc_info(2, true), proc_info(3, false)],
        };
        ok.validate().unwrap();
        assert_eq!(
            serde_json::to_value(&ok).unwrap()["procs"][0],
            json!({"pid": 2, "argv": ["sleep", "100"], "running": true, "exit_code": null,
                   "signal": null, "status": null, "started_ms": 1_700_000_000_000u64,
                   "finished_ms": null})
        );
        let bad = [
            ProcInfo {
                pid: 0,
                ..proc_info(1, true)
            },
            ProcInfo {
                exit_code: Some(1),
                ..proc_info(1, true)
            },
            ProcInfo {
                status: None,
                ..proc_info(1, false)
            },
            ProcInfo {
                finished_ms: None,
                ..proc_info(1, false)
            },
            ProcInfo {
                exit_code: Some(300),
                ..proc_info(1, false)
            },
            ProcInfo {
                signal: Some(9),
                ..proc_info(1, false)
            },
            ProcInfo {
                argv: vec!["x".repeat(MAX_PROC_ARGV_BYTES)],
                ..proc_info(1, true)
            },
        ];
        for proc in bad {
            let list = Response::ProcList {
                procs: vec![proc_info(9, true), proc.clone()],
            };
            assert!(list.validate().is_err(), "accepted {proc:?}");
        }
        let many = Response::ProcList {
            procs: (1..=MAX_PROCS as u32 + 1)
                .map(|pid| proc_info(pid, true))
                .collect(),
        };
        assert!(matches!(
            many.validate(),
            Err(ProtoError::TooManyProcs { .. })
        ));
        // The largest valid list of printable argvs fits in one frame (the agent checks
        // the encoded size of what it sends, since JSON escapes can grow a string).
        let largest = Response::ProcList {
            procs: (1..=MAX_PROCS as u32)
                .map(|pid| ProcInfo {
                    argv: vec!["x".repeat(MAX_PROC_ARGV_BYTES - 1)],
                    exit_code: Some(255),
                    status: Some(Status::OutputLimit),
                    started_ms: u64::MAX,
                    finished_ms: Some(u64::MAX),
                    pid: i32::MAX as u32,
                    ..proc_info(pid, false)
                })
                .collect(),
        };
        largest.validate().unwrap();
        let bytes = serde_json::to_vec(&largest).unwrap().len();
        assert!(bytes <= crate::DEFAULT_MAX_PAYLOAD, "{bytes}");
        assert!(parse_response(json!({"type": "proc_list", "procs": [{"pid": 1}]})).is_err());
    }

    #[test]
    fn validation_rejects_bad_numbers() {
        for signal in [0, -1, 65, i32::MAX, i32::MIN] {
            assert!(matches!(
                invalid(Request::Signal { stream: 1, signal }),
                ProtoError::InvalidSignal { .. }
            ));
        }
        for signal in [1, 9, 64] {
            Request::Signal { stream: 1, signal }.validate().unwrap();
        }
        for stream in [0, 2, 1 << 31] {
            assert!(matches!(
                invalid(Request::Signal { stream, signal: 9 }),
                ProtoError::InvalidStream { .. }
            ));
            assert!(matches!(
                invalid(Request::Resize {
                    stream,
                    rows: 1,
                    cols: 1
                }),
                ProtoError::InvalidStream { .. }
            ));
        }
        assert!(matches!(
            invalid(Request::Resize {
                stream: 1,
                rows: 1,
                cols: 0
            }),
            ProtoError::InvalidSize { .. }
        ));
        assert!(matches!(
            invalid(Request::ListDir {
                path: "/".into(),
                depth: 17
            }),
            ProtoError::DepthTooLarge { depth: 17, max: 16 }
        ));
        for mode in [0o10000, u32::MAX] {
            assert!(matches!(
                invalid(Request::WriteFile {
                    path: "/a".into(),
                    mode: Some(mode),
                    create_parents: false
                }),
                ProtoError::InvalidMode { .. }
            ));
        }
    }

    #[test]
    fn validation_rejects_bad_responses() {
        let bad = [
            Response::Exit {
                exit_code: Some(0),
                signal: Some(9),
                status: Status::Ok,
            },
            Response::Exit {
                exit_code: Some(256),
                signal: None,
                status: Status::Ok,
            },
            Response::Exit {
                exit_code: Some(-1),
                signal: None,
                status: Status::Ok,
            },
            Response::Exit {
                exit_code: None,
                signal: Some(0),
                status: Status::Killed,
            },
            Response::StatResult(entry("relative", EntryKind::File)),
            Response::StatResult(Entry {
                mode: 0o170755,
                ..entry("/a", EntryKind::File)
            }),
            Response::Listing {
                entries: vec![entry("/ok", EntryKind::File), entry("", EntryKind::Dir)],
                truncated: false,
            },
            Response::Listing {
                entries: vec![entry("/a\u{0}", EntryKind::File)],
                truncated: false,
            },
            Response::Error {
                code: ErrorCode::Internal,
                message: "x".repeat(MAX_ERROR_MESSAGE + 1),
            },
        ];
        for response in bad {
            assert!(response.validate().is_err(), "accepted {response:?}");
        }
        match (Response::Listing {
            entries: vec![entry("/ok", EntryKind::File), entry("", EntryKind::Dir)],
            truncated: false,
        })
        .validate()
        {
            Err(ProtoError::EmptyPath { field }) => assert_eq!(field, "entries[1].path"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn error_responses_are_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let Response::Error { message, .. } = Response::error(ErrorCode::Internal, long) else {
            panic!("not an error");
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE);
        assert!(message.len() > MAX_ERROR_MESSAGE - 2);
        assert!(message.chars().all(|c| c == 'é'));
        Response::error(ErrorCode::Internal, "x".repeat(MAX_ERROR_MESSAGE * 3))
            .validate()
            .unwrap();
    }

    #[test]
    fn hello_version_mismatch_names_both_versions() {
        let theirs = Hello {
            version: 7,
            role: Role::Agent,
            features: vec![],
        };
        let err = theirs.check_peer(Role::Agent).unwrap_err();
        assert!(
            matches!(err, ProtoError::VersionMismatch { ours: 1, theirs: 7 }),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("version 1") && text.contains("version 7"),
            "{text}"
        );

        // A newer peer's Hello may carry fields this version does not know: the version is
        // still what gets reported.
        let newer = br#"{"version":2,"role":"agent","features":[],"compression":"zstd"}"#;
        let err = Hello::parse_peer(newer, Role::Agent).unwrap_err();
        assert!(
            matches!(err, ProtoError::VersionMismatch { ours: 1, theirs: 2 }),
            "{err}"
        );
        let err = Hello::parse_peer(br#"{"version":0}"#, Role::Agent).unwrap_err();
        assert!(
            matches!(err, ProtoError::VersionMismatch { theirs: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn hello_checks_role_and_features() {
        let agent = Hello::new(Role::Agent);
        agent.check_peer(Role::Agent).unwrap();
        let err = agent.check_peer(Role::Host).unwrap_err();
        assert!(matches!(
            err,
            ProtoError::UnexpectedRole {
                expected: Role::Host,
                got: Role::Agent
            }
        ));
        assert!(err.to_string().contains("agent"), "{err}");

        for name in ["", "Caps", "a b", "é", &"f".repeat(MAX_FEATURE_LEN + 1)] {
            let hello = Hello {
                features: vec![name.to_owned()],
                ..Hello::new(Role::Host)
            };
            assert!(
                matches!(
                    hello.check_peer(Role::Host),
                    Err(ProtoError::InvalidFeature { .. })
                ),
                "{name:?}"
            );
        }
        let hello = Hello {
            features: vec!["f".to_owned(); MAX_FEATURES + 1],
            ..Hello::new(Role::Host)
        };
        assert!(matches!(
            hello.check_peer(Role::Host),
            Err(ProtoError::TooManyFeatures { .. })
        ));

        for bad in [&b"not json"[..], br#"{"version":1}"#, br#"{"role":"host"}"#] {
            assert!(matches!(
                Hello::parse_peer(bad, Role::Host),
                Err(ProtoError::BadHello(_))
            ));
        }

        let ours = Hello {
            features: vec!["a".into(), "b".into(), "c".into()],
            ..Hello::new(Role::Host)
        };
        let theirs = Hello {
            features: vec!["c".into(), "a".into(), "z".into()],
            ..Hello::new(Role::Agent)
        };
        assert_eq!(ours.common_features(&theirs), ["a", "c"]);
        assert_eq!(Role::Host.peer(), Role::Agent);
        assert_eq!(Role::Agent.peer(), Role::Host);
    }

    #[test]
    fn error_codes_match_their_wire_names() {
        use std::io::ErrorKind as K;
        let all = [
            ErrorCode::NotFound,
            ErrorCode::PermissionDenied,
            ErrorCode::AlreadyExists,
            ErrorCode::NotADirectory,
            ErrorCode::IsADirectory,
            ErrorCode::NotEmpty,
            ErrorCode::InvalidRequest,
            ErrorCode::TooLarge,
            ErrorCode::Busy,
            ErrorCode::Cancelled,
            ErrorCode::Internal,
        ];
        for code in all {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
            assert_eq!(code.to_string(), code.as_str());
        }
        assert_eq!(ErrorCode::from_io(K::NotFound), ErrorCode::NotFound);
        assert_eq!(
            ErrorCode::from_io(K::PermissionDenied),
            ErrorCode::PermissionDenied
        );
        assert_eq!(
            ErrorCode::from_io(K::DirectoryNotEmpty),
            ErrorCode::NotEmpty
        );
        assert_eq!(ErrorCode::from_io(K::StorageFull), ErrorCode::TooLarge);
        assert_eq!(ErrorCode::from_io(K::Other), ErrorCode::Internal);

        assert_eq!(
            ProtoError::PathTooLong {
                field: "path".into(),
                len: 1,
                max: 0
            }
            .code(),
            ErrorCode::TooLarge
        );
        assert_eq!(ProtoError::EmptyArgv.code(), ErrorCode::InvalidRequest);
    }

    #[test]
    fn hostile_strings_are_clipped_in_errors() {
        let name = "N-".repeat(10_000);
        let err = invalid(exec_with("env", json!({ name: "v" })));
        assert!(err.to_string().len() < 300, "{err}");
        let err = invalid(Request::Stat {
            path: "x".repeat(MAX_PATH),
        });
        assert!(err.to_string().len() < 300, "{err}");
    }
}
