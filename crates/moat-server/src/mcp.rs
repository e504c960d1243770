//! The MCP server: moat's sandbox tools for models (create a sandbox, run a command or code,
//! write, read and list files, destroy it). The tools are written once, over a [`Backend`]
//! that does the work: [`EngineBackend`] calls the daemon's own [`Engine`] (the streamable HTTP
//! endpoint at `/mcp` on `moat serve`, see [`router`]), and `moat mcp` (stdio) has one that
//! calls a running daemon's HTTP API.
//!
//! Results are small JSON texts: output is cut to [`OUTPUT_KEEP`] bytes per stream with a
//! note saying how much was cut, and failures come back as tool errors
//! (`{"error":{"code","message"}}`, `isError: true`) that say what to do.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequestParts, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Extensions, Implementation, ServerCapabilities, ServerConfig,
};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{tool, tool_handler, tool_router, ErrorData, ServerHandler};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::b64;
use crate::error::ApiError;
use crate::exec::CommandBody;
use moat_engine::lifecycle::{Caller, Engine};

/// A boxed future, for [`Backend`]'s methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Bytes of stdout (and of stderr) a command's result keeps: the start and the end, with the
/// middle cut.
pub const OUTPUT_KEEP: usize = 8 << 10;
/// Of [`OUTPUT_KEEP`], how much comes from the start of the output (the rest is its end,
/// where errors usually are).
const OUTPUT_HEAD: usize = 2 << 10;
/// The most of a text file `read_file` returns.
pub const READ_TEXT_MAX: usize = 64 << 10;
/// The most of a binary file `read_file` returns (base64 encoded).
pub const READ_BINARY_MAX: usize = 48 << 10;
/// The most entries `list_directory` returns.
pub const LIST_MAX: usize = 500;
/// The most bytes `write_file` and `run_code` take.
pub const WRITE_MAX: usize = 8 << 20;

/// A failed operation, as the tool reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    pub code: String,
    pub message: String,
}

impl ToolError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> ToolError {
        ToolError {
            code: code.into(),
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> ToolError {
        ToolError::new("invalid_request", message)
    }
}

impl From<ApiError> for ToolError {
    fn from(e: ApiError) -> ToolError {
        ToolError::new(e.code, e.message)
    }
}

impl From<moat_engine::EngineError> for ToolError {
    fn from(e: moat_engine::EngineError) -> ToolError {
        ToolError::new(e.code, e.message)
    }
}

/// A command to run, as the tools take it (exactly one of `argv` and `shell`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecRequest {
    pub argv: Option<Vec<String>>,
    pub shell: Option<String>,
    pub cwd: Option<String>,
    pub timeout_s: Option<f64>,
}

/// The first bytes of a file and its whole size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilePrefix {
    pub data: Vec<u8>,
    pub size: u64,
}

/// What the tools act through. `cx` holds what the transport knows about the call (for the
/// HTTP endpoint, the request's parts, with the authenticated [`Caller`]).
pub trait Backend: Send + Sync + 'static {
    /// Creates a sandbox: its API object (`id`, `state`, `expires_at`...).
    fn create(
        &self,
        cx: &Extensions,
        timeout_s: Option<u64>,
        metadata: BTreeMap<String, String>,
    ) -> BoxFuture<'_, Result<Value, ToolError>>;
    /// Runs a command to its end: the API's exec result object.
    fn exec(
        &self,
        cx: &Extensions,
        id: String,
        req: ExecRequest,
    ) -> BoxFuture<'_, Result<Value, ToolError>>;
    /// Writes a whole file (parents created); the bytes written.
    fn write_file(
        &self,
        cx: &Extensions,
        id: String,
        path: String,
        data: Vec<u8>,
    ) -> BoxFuture<'_, Result<u64, ToolError>>;
    /// Reads at most `max` bytes of a file.
    fn read_file(
        &self,
        cx: &Extensions,
        id: String,
        path: String,
        max: usize,
    ) -> BoxFuture<'_, Result<FilePrefix, ToolError>>;
    /// Lists a directory: the API's `{"entries":[..],"truncated":bool}`.
    fn list(
        &self,
        cx: &Extensions,
        id: String,
        path: String,
        depth: u32,
    ) -> BoxFuture<'_, Result<Value, ToolError>>;
    /// Removes a file.
    fn remove(
        &self,
        cx: &Extensions,
        id: String,
        path: String,
    ) -> BoxFuture<'_, Result<(), ToolError>>;
    /// Destroys a sandbox.
    fn destroy(&self, cx: &Extensions, id: String) -> BoxFuture<'_, Result<(), ToolError>>;
}

// ---------------------------------------------------------------------------------------------
// The tools
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    /// Seconds the sandbox lives before it is destroyed automatically (default: the
    /// server's, usually 300; capped by the server's maximum).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Labels to find the sandbox by later (string keys and values).
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCommandParams {
    /// The sandbox's id (from create_sandbox), e.g. "sbx_...".
    pub sandbox_id: String,
    /// A shell command line, run with /bin/sh -c (pipes, &&, redirections work). Give this
    /// or `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// The program and its arguments, run without a shell, e.g. ["ls", "-la", "/work"].
    /// Give this or `command`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Absolute working directory inside the sandbox (default: /work, the home directory).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Seconds before the command is killed (default: the sandbox's limit).
    #[serde(default)]
    pub timeout_s: Option<f64>,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Node,
    Bash,
}

impl Language {
    fn interpreter(self) -> &'static str {
        match self {
            Language::Python => "python3",
            Language::Node => "node",
            Language::Bash => "bash",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Node => "node",
            Language::Bash => "bash",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Language::Python => "py",
            Language::Node => "js",
            Language::Bash => "sh",
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCodeParams {
    /// The sandbox's id (from create_sandbox).
    pub sandbox_id: String,
    /// python (python3), node (Node.js, CommonJS) or bash.
    pub language: Language,
    /// The whole program. Print what you want to see: only stdout and stderr come back.
    pub code: String,
    /// Seconds before the program is killed (default: the sandbox's limit).
    #[serde(default)]
    pub timeout_s: Option<f64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileParams {
    /// The sandbox's id (from create_sandbox).
    pub sandbox_id: String,
    /// Absolute path inside the sandbox, e.g. /work/main.py (parent directories are
    /// created; an existing file is replaced).
    pub path: String,
    /// The file's whole content, as text (UTF-8).
    pub content: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathParams {
    /// The sandbox's id (from create_sandbox).
    pub sandbox_id: String,
    /// Absolute path inside the sandbox, e.g. /work/main.py.
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// The sandbox's id (from create_sandbox).
    pub sandbox_id: String,
    /// Absolute path of a directory inside the sandbox, e.g. /work.
    pub path: String,
    /// How many levels deep to list: 1 (default) is the directory's own entries, at most 5.
    #[serde(default)]
    pub depth: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxParams {
    /// The sandbox's id (from create_sandbox).
    pub sandbox_id: String,
}

/// The MCP server: the tools over a [`Backend`].
#[derive(Clone)]
pub struct MoatTools {
    backend: Arc<dyn Backend>,
    #[allow(dead_code, reason = "the #[tool_handler] macro's router")]
    tool_router: ToolRouter<MoatTools>,
}

impl MoatTools {
    pub fn new(backend: Arc<dyn Backend>) -> MoatTools {
        MoatTools {
            backend,
            tool_router: Self::tool_router(),
        }
    }
}

/// A tool's answer: the JSON text of `v`.
fn ok(v: Value) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(v.to_string())])
}

/// A tool's failure, for the model to read and act on.
fn fail(e: ToolError) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(
        json!({"error": {"code": e.code, "message": e.message}}).to_string(),
    )])
}

fn answer(r: Result<Value, ToolError>) -> Result<CallToolResult, ErrorData> {
    Ok(match r {
        Ok(v) => ok(v),
        Err(e) => fail(e),
    })
}

#[tool_router]
impl MoatTools {
    #[tool(
        name = "create_sandbox",
        description = "Create a new isolated Linux sandbox and return its sandbox_id. Use it for \
                       every other tool. The sandbox has its own filesystem (work in /work; /tmp \
                       is writable), no network, and limits on memory, processes and time. It is \
                       destroyed automatically after timeout_s seconds (default ~300); call \
                       destroy_sandbox when you are done. Files and installed state persist \
                       between calls on the same sandbox.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            open_world_hint = false
        )
    )]
    async fn create_sandbox(
        &self,
        Parameters(p): Parameters<CreateParams>,
        cx: Extensions,
    ) -> Result<CallToolResult, ErrorData> {
        let r = self
            .backend
            .create(&cx, p.timeout_s, p.metadata.unwrap_or_default())
            .await
            .map(|s| {
                json!({
                    "sandbox_id": s.get("id"),
                    "state": s.get("state"),
                    "expires_at": s.get("expires_at"),
                    "expires_in_s": s.get("expires_at").and_then(Value::as_u64)
                        .map(|t| t.saturating_sub(now_ms()) / 1000),
                })
            });
        answer(r)
    }

    #[tool(
        name = "run_command",
        description = "Run a command in a sandbox and wait for it to finish. Give `command` (a \
                       shell line for /bin/sh -c, e.g. \"pip list | head\") or `argv` (e.g. \
                       [\"ls\", \"-la\"]). Returns exit_code, status (ok, timeout, oom, \
                       output_limit, killed, error), stdout and stderr. Each stream is cut to \
                       8 KiB (its start and end) with a note saying how much was cut: redirect \
                       big output to a file and read parts of it. A non-zero exit code is a \
                       normal result, not a tool error. Not for interactive programs (no stdin).",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            open_world_hint = false
        )
    )]
    async fn run_command(
        &self,
        Parameters(p): Parameters<RunCommandParams>,
        cx: Extensions,
    ) -> Result<CallToolResult, ErrorData> {
        let req = ExecRequest {
            argv: p.argv,
            shell: p.command,
            cwd: p.cwd,
            timeout_s: p.timeout_s,
        };
        match (&req.argv, &req.shell) {
            (Some(_), Some(_)) => {
                return answer(Err(ToolError::invalid(
                    "give either `command` (a shell line) or `argv` (an array), not both",
                )))
            }
            (None, None) => {
                return answer(Err(ToolError::invalid(
                    "give `command` (a shell line, e.g. \"ls -la /work\") or `argv` (e.g. \
                     [\"ls\", \"-la\", \"/work\"])",
                )))
            }
            _ => {}
        }
        let r = self.backend.exec(&cx, p.sandbox_id, req).await;
        answer(r.map(|v| exec_summary(&v, None)))
    }

    #[tool(
        name = "run_code",
        description = "Run a program in a sandbox: python (python3), node (Node.js) or bash. \
                       The code is written to a temporary file in the sandbox and run with the \
                       interpreter; the working directory is /work. Returns exit_code, status, \
                       stdout and stderr (each cut to 8 KiB with a note). Print the values you \
                       want to see. Only what the sandbox has installed is available (no network \
                       to install packages).",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            open_world_hint = false
        )
    )]
    async fn run_code(
        &self,
        Parameters(p): Parameters<RunCodeParams>,
        cx: Extensions,
    ) -> Result<CallToolResult, ErrorData> {
        if p.code.len() > WRITE_MAX {
            return answer(Err(ToolError::invalid(format!(
                "the code is {} bytes; the most is {WRITE_MAX}: write it with write_file in parts",
                p.code.len()
            ))));
        }
        let path = format!(
            "/tmp/moat-code-{}.{}",
            unique_suffix(),
            p.language.extension()
        );
        if let Err(e) = self
            .backend
            .write_file(&cx, p.sandbox_id.clone(), path.clone(), p.code.into_bytes())
            .await
        {
            return answer(Err(e));
        }
        let interpreter = p.language.interpreter();
        let req = ExecRequest {
            argv: Some(vec![interpreter.to_string(), path.clone()]),
            shell: None,
            cwd: None,
            timeout_s: p.timeout_s,
        };
        let r = self.backend.exec(&cx, p.sandbox_id.clone(), req).await;
        let _ = self.backend.remove(&cx, p.sandbox_id, path).await;
        let r = r.and_then(|v| {
            if missing_program(&v) {
                Err(ToolError::new(
                    "interpreter_missing",
                    format!(
                        "`{interpreter}` is not installed in this sandbox, so {} code cannot \
                         run here: pick another language, or check what is installed with \
                         run_command (e.g. `ls /usr/bin /usr/local/bin`)",
                        p.language.name()
                    ),
                ))
            } else {
                Ok(exec_summary(&v, Some(p.language)))
            }
        });
        answer(r)
    }

    #[tool(
        name = "write_file",
        description = "Write a text file in a sandbox (parent directories are created, an \
                       existing file is replaced). `path` is absolute, e.g. /work/app.py. \
                       Returns the bytes written.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            open_world_hint = false
        )
    )]
    async fn write_file(
        &self,
        Parameters(p): Parameters<WriteFileParams>,
        cx: Extensions,
    ) -> Result<CallToolResult, ErrorData> {
        if p.content.len() > WRITE_MAX {
            return answer(Err(ToolError::invalid(format!(
                "the content is {} bytes; the most in one call is {WRITE_MAX}",
                p.content.len()
            ))));
        }
        let path = p.path.clone();
        let r = self
            .backend
            .write_file(&cx, p.sandbox_id, p.path, p.content.into_bytes())
            .await
            .map(|bytes| json!({"path": path, "bytes": bytes}));
        answer(r)
    }

    #[tool(
        name = "read_file",
        description = "Read a file from a sandbox. `path` is absolute, e.g. /work/out.txt. A \
                       text (UTF-8) file comes back as `content` (at most 64 KiB: a note says \
                       when the rest was left out; read other parts with run_command, e.g. \
                       `sed -n 100,200p FILE`). A binary file comes back as `content_base64` \
                       (at most 48 KiB) with a note.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn read_file(
        &self,
        Parameters(p): Parameters<PathParams>,
        cx: Extensions,
    ) -> Result<CallToolResult, ErrorData> {
        let path = p.path.clone();
        let r = self
            .backend
            .read_file(&cx, p.sandbox_id, p.path, READ_TEXT_MAX)
            .await
            .map(|f| file_summary(&path, f));
        answer(r)
    }

    #[tool(
        name = "list_directory",
        description = "List a directory in a sandbox: each entry's path, kind (file, dir, \
                       symlink, other) and size in bytes. `path` is absolute, e.g. /work; \
                       `depth` 1 (default) lists only its own entries, up to 5 lists deeper. At \
                       most 500 entries come back (a note says when there were more).",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_directory(
        &self,
        Parameters(p): Parameters<ListParams>,
        cx: Extensions,
    ) -> Result<CallToolResult, ErrorData> {
        let depth = p.depth.unwrap_or(1);
        if !(1..=5).contains(&depth) {
            return answer(Err(ToolError::invalid("depth must be between 1 and 5")));
        }
        let path = p.path.clone();
        let r = self
            .backend
            .list(&cx, p.sandbox_id, p.path, depth)
            .await
            .map(|v| list_summary(&path, depth, &v));
        answer(r)
    }

    #[tool(
        name = "destroy_sandbox",
        description = "Destroy a sandbox: every process in it is killed and its files are \
                       deleted. Call it when you are done with a sandbox.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false
        )
    )]
    async fn destroy_sandbox(
        &self,
        Parameters(p): Parameters<SandboxParams>,
        cx: Extensions,
    ) -> Result<CallToolResult, ErrorData> {
        let id = p.sandbox_id.clone();
        let r = self
            .backend
            .destroy(&cx, p.sandbox_id)
            .await
            .map(|()| json!({"sandbox_id": id, "destroyed": true}));
        answer(r)
    }
}

#[tool_handler]
impl ServerHandler for MoatTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("moat", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "moat runs code in isolated Linux sandboxes. Create a sandbox with \
                 create_sandbox, then run commands or code, write and read files in it with \
                 its sandbox_id, and destroy it with destroy_sandbox when done. Sandboxes have \
                 no network access.",
            )
    }
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A name no other call uses at the same time.
fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether an exec result says the program was not found (it could not start).
fn missing_program(v: &Value) -> bool {
    v.get("status").and_then(Value::as_str) == Some("error")
        && v.get("exit_code").and_then(Value::as_i64) == Some(127)
}

/// Cuts `s` to [`OUTPUT_KEEP`] bytes: its start and its end, the middle replaced by a marker;
/// the note says how much was cut.
pub fn cut_output(name: &str, s: &str) -> (String, Option<String>) {
    if s.len() <= OUTPUT_KEEP {
        return (s.to_string(), None);
    }
    let head_end = floor_char(s, OUTPUT_HEAD);
    let tail_start = ceil_char(s, s.len() - (OUTPUT_KEEP - OUTPUT_HEAD));
    let cut = tail_start - head_end;
    let text = format!(
        "{}\n[... {cut} bytes cut by moat ...]\n{}",
        &s[..head_end],
        &s[tail_start..]
    );
    let note = format!(
        "{name} was {} bytes: kept the first {head_end} and the last {}, cut {cut} in the \
         middle (write the output to a file and read parts of it to see more)",
        s.len(),
        s.len() - tail_start
    );
    (text, Some(note))
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// The small result of a command from the API's exec result.
pub fn exec_summary(v: &Value, language: Option<Language>) -> Value {
    let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let (stdout, out_note) = cut_output("stdout", &text("stdout"));
    let (stderr, err_note) = cut_output("stderr", &text("stderr"));
    let mut notes: Vec<String> = out_note.into_iter().chain(err_note).collect();
    for stream in ["stdout", "stderr"] {
        if v.pointer(&format!("/truncated/{stream}")) == Some(&Value::Bool(true)) {
            notes.push(format!(
                "{stream} went over the sandbox's output cap and the command was killed"
            ));
        }
    }
    let mut out = json!({
        "exit_code": v.get("exit_code").cloned().unwrap_or(Value::Null),
        "status": v.get("status").cloned().unwrap_or(Value::Null),
        "stdout": stdout,
        "stderr": stderr,
        "wall_ms": v.get("wall_ms").cloned().unwrap_or(Value::Null),
    });
    if let Some(o) = out.as_object_mut() {
        if let Some(sig) = v.get("signal").filter(|s| !s.is_null()) {
            o.insert("signal".into(), sig.clone());
        }
        if let Some(m) = v.get("message").filter(|s| !s.is_null()) {
            o.insert("message".into(), m.clone());
        }
        if let Some(l) = language {
            o.insert("language".into(), json!(l.name()));
        }
        if !notes.is_empty() {
            o.insert("notes".into(), json!(notes));
        }
    }
    out
}

/// `read_file`'s result: text when the bytes are UTF-8, else base64.
pub fn file_summary(path: &str, f: FilePrefix) -> Value {
    let partial = (f.data.len() as u64) < f.size;
    // A prefix may end inside a character: that is still text.
    let text_len = match std::str::from_utf8(&f.data) {
        Ok(_) => Some(f.data.len()),
        Err(e) if partial && e.error_len().is_none() => Some(e.valid_up_to()),
        Err(_) => None,
    };
    match text_len {
        Some(n) => {
            let content = String::from_utf8_lossy(&f.data[..n]).into_owned();
            let mut v = json!({"path": path, "size": f.size, "encoding": "utf-8",
                               "content": content});
            if partial {
                v["truncated"] = json!(true);
                v["note"] = json!(format!(
                    "showing the first {n} of {} bytes; read other parts with run_command, \
                     e.g. `tail -c 20000 {path}` or `sed -n 1000,1200p {path}`",
                    f.size
                ));
            }
            v
        }
        None => {
            let keep = f.data.len().min(READ_BINARY_MAX);
            let mut note = format!(
                "{path} is not UTF-8 text ({} bytes): content_base64 holds ",
                f.size
            );
            if (keep as u64) < f.size {
                note.push_str(&format!(
                    "its first {keep} bytes; inspect it with run_command (e.g. `file {path}`, \
                     `xxd {path} | head`)"
                ));
            } else {
                note.push_str("all of it");
            }
            json!({"path": path, "size": f.size, "encoding": "base64",
                   "content_base64": b64::encode(&f.data[..keep]),
                   "truncated": (keep as u64) < f.size, "note": note})
        }
    }
}

/// How many levels below `base` an entry's path is (1: a direct child); `None` when it is
/// not under `base`.
fn level_below(base: &str, path: &str) -> Option<usize> {
    let base = base.trim_end_matches('/');
    let rest = path.strip_prefix(base)?.strip_prefix('/')?;
    Some(rest.split('/').filter(|c| !c.is_empty()).count())
}

/// `list_directory`'s result from the API's listing, `depth` levels deep (entries deeper
/// than asked are dropped, whatever depth the listing went to).
pub fn list_summary(path: &str, depth: u32, v: &Value) -> Value {
    let entries: Vec<Value> = v
        .get("entries")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.get("path")
                .and_then(Value::as_str)
                .and_then(|p| level_below(path, p))
                .is_none_or(|l| l <= depth as usize)
        })
        .collect();
    let total = entries.len();
    let small: Vec<Value> = entries
        .iter()
        .take(LIST_MAX)
        .map(|e| {
            let mut o = json!({"path": e.get("path"), "kind": e.get("kind")});
            if e.get("kind").and_then(Value::as_str) == Some("file") {
                o["size"] = e.get("size").cloned().unwrap_or(Value::Null);
            }
            o
        })
        .collect();
    let agent_cut = v.get("truncated").and_then(Value::as_bool).unwrap_or(false);
    let mut out = json!({"path": path, "entries": small});
    if total > LIST_MAX || agent_cut {
        out["truncated"] = json!(true);
        out["note"] = json!(format!(
            "only the first {} entries are shown; list a subdirectory, use a smaller depth, \
             or run_command with `find {path} -name PATTERN`",
            small.len()
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// In the daemon: the backend over Engine, and the /mcp endpoint
// ---------------------------------------------------------------------------------------------

/// The tools acting through the daemon's own [`Engine`], as the caller that the `/mcp`
/// endpoint authenticated.
pub struct EngineBackend {
    pub app: Arc<Engine>,
}

/// The authenticated caller of the HTTP request that carried this call.
fn caller_of(cx: &Extensions) -> Result<Caller, ToolError> {
    cx.get::<axum::http::request::Parts>()
        .and_then(|p| p.extensions.get::<Caller>())
        .cloned()
        .ok_or_else(|| {
            ToolError::new(
                "unauthorized",
                "this call carries no authenticated caller: send `Authorization: Bearer <key>` \
                 with every request to /mcp",
            )
        })
}

impl Backend for EngineBackend {
    fn create(
        &self,
        cx: &Extensions,
        timeout_s: Option<u64>,
        metadata: BTreeMap<String, String>,
    ) -> BoxFuture<'_, Result<Value, ToolError>> {
        let caller = caller_of(cx);
        Box::pin(async move {
            let caller = caller?;
            if caller.is_token() {
                return Err(ToolError::new(
                    "forbidden",
                    "a scoped token cannot create sandboxes: connect with an API key",
                ));
            }
            crate::http::check_metadata(&metadata)?;
            let sbx = self
                .app
                .create(
                    &caller,
                    json!({}),
                    metadata,
                    timeout_s,
                    None,
                    BTreeMap::new(),
                )
                .await?;
            Ok(sbx.json())
        })
    }

    fn exec(
        &self,
        cx: &Extensions,
        id: String,
        req: ExecRequest,
    ) -> BoxFuture<'_, Result<Value, ToolError>> {
        let caller = caller_of(cx);
        Box::pin(async move {
            let caller = caller?;
            let body = CommandBody {
                cmd: req.argv,
                shell: req.shell,
                cwd: req.cwd,
                timeout_s: req.timeout_s,
                ..CommandBody::default()
            };
            let r = crate::exec::run_to_end(&self.app, &caller, &id, body).await?;
            serde_json::to_value(r).map_err(|e| ToolError::new("internal", e.to_string()))
        })
    }

    fn write_file(
        &self,
        cx: &Extensions,
        id: String,
        path: String,
        data: Vec<u8>,
    ) -> BoxFuture<'_, Result<u64, ToolError>> {
        let caller = caller_of(cx);
        Box::pin(async move {
            let caller = caller?;
            Ok(crate::files::write_all(&self.app, &caller, &id, &path, data).await?)
        })
    }

    fn read_file(
        &self,
        cx: &Extensions,
        id: String,
        path: String,
        max: usize,
    ) -> BoxFuture<'_, Result<FilePrefix, ToolError>> {
        let caller = caller_of(cx);
        Box::pin(async move {
            let caller = caller?;
            let (data, entry) =
                crate::files::read_prefix(&self.app, &caller, &id, &path, max).await?;
            Ok(FilePrefix {
                data,
                size: entry.size,
            })
        })
    }

    fn list(
        &self,
        cx: &Extensions,
        id: String,
        path: String,
        depth: u32,
    ) -> BoxFuture<'_, Result<Value, ToolError>> {
        let caller = caller_of(cx);
        Box::pin(async move {
            let caller = caller?;
            let (entries, truncated) =
                crate::files::list_entries(&self.app, &caller, &id, &path, depth).await?;
            Ok(json!({
                "entries": entries.iter().map(crate::files::entry_json).collect::<Vec<_>>(),
                "truncated": truncated,
            }))
        })
    }

    fn remove(
        &self,
        cx: &Extensions,
        id: String,
        path: String,
    ) -> BoxFuture<'_, Result<(), ToolError>> {
        let caller = caller_of(cx);
        Box::pin(async move {
            let caller = caller?;
            Ok(crate::files::remove_path(&self.app, &caller, &id, &path, false).await?)
        })
    }

    fn destroy(&self, cx: &Extensions, id: String) -> BoxFuture<'_, Result<(), ToolError>> {
        let caller = caller_of(cx);
        Box::pin(async move {
            let caller = caller?;
            if caller.is_token() {
                return Err(ToolError::new(
                    "forbidden",
                    "a scoped token cannot destroy its sandbox: connect with an API key",
                ));
            }
            let sbx = self
                .app
                .visible(&caller, &id, moat_engine::store::Scope::Read)?;
            self.app
                .destroy(&sbx, Some(caller.key_id()), "deleted")
                .await?;
            Ok(())
        })
    }
}

/// The streamable HTTP MCP endpoint, to mount at `/mcp`: every request must carry the API's
/// Bearer key or token (401 otherwise), and each tool call acts as that caller.
pub fn router(app: Arc<Engine>) -> Router {
    let backend: Arc<dyn Backend> = Arc::new(EngineBackend { app: app.clone() });
    // The Host check guards unauthenticated local servers against DNS rebinding; every
    // request here is authenticated, and the daemon may be reached by any name.
    let config = StreamableHttpServerConfig::default().disable_allowed_hosts();
    let service = StreamableHttpService::new(
        move || Ok(MoatTools::new(backend.clone())),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    Router::new()
        .fallback_service(service)
        .layer(middleware::from_fn_with_state(app, authenticate))
}

/// Authenticates a request to `/mcp` like any API request, and hands the caller on.
async fn authenticate(State(app): State<Arc<Engine>>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let delete = parts.method == axum::http::Method::DELETE;
    match crate::http::Auth::from_request_parts(&mut parts, &app).await {
        Ok(crate::http::Auth(caller)) => {
            parts.extensions.insert(caller);
            let mut resp = next.run(Request::from_parts(parts, body)).await;
            // Ending a session is answered 202 by rmcp; clients (the Python SDK) expect 200
            // or 204 and warn otherwise.
            if delete && resp.status() == axum::http::StatusCode::ACCEPTED {
                *resp.status_mut() = axum::http::StatusCode::OK;
            }
            resp
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_cut_in_the_middle_with_a_note() {
        let s = "a".repeat(3000) + &"b".repeat(20_000) + &"c".repeat(6000);
        let (text, note) = cut_output("stdout", &s);
        assert!(text.len() < OUTPUT_KEEP + 100);
        assert!(text.starts_with(&"a".repeat(2048)));
        assert!(text.ends_with(&"c".repeat(6000)));
        let note = note.unwrap();
        assert!(note.contains("29000 bytes"), "{note}");
        assert!(
            note.contains(&format!("cut {}", 29000 - OUTPUT_KEEP)),
            "{note}"
        );
        assert_eq!(cut_output("stderr", "short"), ("short".into(), None));
    }

    #[test]
    fn cutting_respects_characters() {
        let s = "é".repeat(10_000);
        let (text, _) = cut_output("stdout", &s);
        assert!(text.contains("bytes cut by moat"));
    }

    #[test]
    fn files_are_text_or_base64() {
        let v = file_summary(
            "/work/a",
            FilePrefix {
                data: b"hello".to_vec(),
                size: 5,
            },
        );
        assert_eq!(v["content"], "hello");
        assert!(v.get("truncated").is_none());
        // A prefix ending inside a character is text.
        let mut data = "x".repeat(10).into_bytes();
        data.push(0xc3);
        let v = file_summary("/work/a", FilePrefix { data, size: 100 });
        assert_eq!(v["encoding"], "utf-8");
        assert_eq!(v["truncated"], true);
        let v = file_summary(
            "/work/b",
            FilePrefix {
                data: vec![0, 159, 146, 150],
                size: 4,
            },
        );
        assert_eq!(v["encoding"], "base64");
        assert_eq!(v["content_base64"], b64::encode(&[0, 159, 146, 150]));
    }

    #[test]
    fn listings_keep_the_depth_asked_for() {
        let v = json!({"entries": [
            {"path": "/work/a", "kind": "dir", "size": 0},
            {"path": "/work/a/b.txt", "kind": "file", "size": 3},
            {"path": "/work/c.txt", "kind": "file", "size": 5},
        ], "truncated": false});
        let one = list_summary("/work", 1, &v);
        let paths: Vec<&str> = one["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap())
            .collect();
        assert_eq!(paths, ["/work/a", "/work/c.txt"]);
        assert_eq!(one["entries"][1]["size"], 5);
        assert!(one["entries"][0].get("size").is_none());
        assert_eq!(
            list_summary("/work/", 2, &v)["entries"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            list_summary("/", 1, &v)["entries"]
                .as_array()
                .unwrap()
                .len(),
            0
        );
        assert_eq!(level_below("/", "/work"), Some(1));
        assert_eq!(level_below("/work", "/workshop"), None);
    }

    #[test]
    fn exec_results_are_small() {
        let v = json!({"stdout": "hi\n", "stderr": "", "exit_code": 0, "signal": null,
                       "status": "ok", "wall_ms": 3, "cpu_ms": 0, "max_rss_kb": 0,
                       "truncated": {"stdout": false, "stderr": false}, "sandbox": {}});
        let s = exec_summary(&v, Some(Language::Python));
        assert_eq!(s["stdout"], "hi\n");
        assert_eq!(s["exit_code"], 0);
        assert_eq!(s["language"], "python");
        assert!(s.get("notes").is_none());
        assert!(s.get("sandbox").is_none());
        assert!(!missing_program(&v));
        let missing = json!({"status": "error", "exit_code": 127});
        assert!(missing_program(&missing));
    }
}
