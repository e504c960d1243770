//! `moat mcp`: the MCP server over stdio, for MCP clients that start a command (Claude
//! Desktop, editors, agent frameworks). The tools are `moat_server::mcp`'s; here they act
//! through a running `moat serve`'s HTTP API (MOAT_URL, MOAT_API_KEY), with the client
//! commands' HTTP helpers (blocking, so each call runs on tokio's blocking pool).

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use moat_server::mcp::{Backend, BoxFuture, ExecRequest, FilePrefix, MoatTools, ToolError};
use rmcp::model::Extensions;
use rmcp::ServiceExt;
use serde_json::{json, Value};

use crate::client::{read_json, sandbox_path, Client, Conn, Error};

/// `moat mcp`'s flags.
#[derive(clap::Args)]
pub struct McpArgs {
    #[command(flatten)]
    pub conn: Conn,
}

/// The tools' backend: a running `moat serve`, over its HTTP API.
struct HttpBackend {
    client: Arc<Client>,
}

fn tool_error(e: Error) -> ToolError {
    match e {
        Error::Api { code, message, .. } => ToolError::new(code, message),
        Error::Stream { code, message } => ToolError::new(code, message),
        e @ Error::Unreachable { .. } => ToolError::new("unreachable", e.to_string()),
        Error::Msg(m) => ToolError::new("client_error", m),
    }
}

impl HttpBackend {
    /// Runs a blocking call on the blocking pool.
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Client) -> Result<T, Error> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, ToolError>> {
        let client = self.client.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&client))
                .await
                .map_err(|e| ToolError::new("internal", format!("the call panicked: {e}")))?
                .map_err(tool_error)
        })
    }
}

impl Backend for HttpBackend {
    fn create(
        &self,
        _cx: &Extensions,
        timeout_s: Option<u64>,
        metadata: BTreeMap<String, String>,
    ) -> BoxFuture<'_, Result<Value, ToolError>> {
        let mut body = json!({ "metadata": metadata });
        if let Some(t) = timeout_s {
            body["timeout_s"] = json!(t);
        }
        self.blocking(move |c| c.call("POST", "/v1/sandboxes", Some(&body)))
    }

    fn exec(
        &self,
        _cx: &Extensions,
        id: String,
        req: ExecRequest,
    ) -> BoxFuture<'_, Result<Value, ToolError>> {
        let mut body = json!({});
        if let Some(argv) = req.argv {
            body["cmd"] = json!(argv);
        }
        if let Some(sh) = req.shell {
            body["shell"] = json!(sh);
        }
        if let Some(cwd) = req.cwd {
            body["cwd"] = json!(cwd);
        }
        if let Some(t) = req.timeout_s {
            body["timeout_s"] = json!(t);
        }
        self.blocking(move |c| c.call("POST", &sandbox_path(&id, "/exec"), Some(&body)))
    }

    fn write_file(
        &self,
        _cx: &Extensions,
        id: String,
        path: String,
        data: Vec<u8>,
    ) -> BoxFuture<'_, Result<u64, ToolError>> {
        self.blocking(move |c| {
            let resp = c.check(
                c.put(&sandbox_path(&id, "/files"))
                    .query("path", &path)
                    .content_type("application/octet-stream")
                    .send(&data[..]),
            )?;
            let v = read_json(resp)?;
            Ok(v.get("bytes")
                .and_then(Value::as_u64)
                .unwrap_or(data.len() as u64))
        })
    }

    fn read_file(
        &self,
        _cx: &Extensions,
        id: String,
        path: String,
        max: usize,
    ) -> BoxFuture<'_, Result<FilePrefix, ToolError>> {
        self.blocking(move |c| {
            let q = [("path".to_string(), path.clone())];
            let entry = c.get_query(&sandbox_path(&id, "/files/stat"), &q)?;
            if entry.get("kind").and_then(Value::as_str) == Some("dir") {
                return Err(Error::Api {
                    status: 400,
                    code: "invalid_request".into(),
                    message: format!("{path} is a directory: list it instead"),
                });
            }
            let resp = c.check(
                c.get(&sandbox_path(&id, "/files"))
                    .query("path", &path)
                    .call(),
            )?;
            let mut data = Vec::new();
            resp.into_body()
                .into_reader()
                .take(max as u64)
                .read_to_end(&mut data)
                .map_err(|e| Error::Msg(format!("reading {id}:{path}: {e}")))?;
            let size = entry
                .get("size")
                .and_then(Value::as_u64)
                .unwrap_or(data.len() as u64);
            Ok(FilePrefix { data, size })
        })
    }

    fn list(
        &self,
        _cx: &Extensions,
        id: String,
        path: String,
        depth: u32,
    ) -> BoxFuture<'_, Result<Value, ToolError>> {
        self.blocking(move |c| {
            let q = [
                ("path".to_string(), path),
                ("depth".to_string(), depth.to_string()),
            ];
            c.get_query(&sandbox_path(&id, "/files/list"), &q)
        })
    }

    fn remove(
        &self,
        _cx: &Extensions,
        id: String,
        path: String,
    ) -> BoxFuture<'_, Result<(), ToolError>> {
        self.blocking(move |c| {
            c.check(
                c.delete(&sandbox_path(&id, "/files"))
                    .query("path", &path)
                    .call(),
            )?;
            Ok(())
        })
    }

    fn destroy(&self, _cx: &Extensions, id: String) -> BoxFuture<'_, Result<(), ToolError>> {
        self.blocking(move |c| c.call("DELETE", &sandbox_path(&id, ""), None).map(|_| ()))
    }
}

/// Serves the tools on stdin/stdout until the client closes stdin. Diagnostics go to stderr
/// (stdout carries only the protocol).
pub fn main(a: McpArgs) -> i32 {
    let client = match Client::new(&a.conn) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("moat mcp: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moat mcp: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let backend = HttpBackend {
        client: Arc::new(client),
    };
    let code = rt.block_on(async move {
        let tools = MoatTools::new(Arc::new(backend));
        let running = match tools.serve(rmcp::transport::stdio()).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("moat mcp: the MCP handshake on stdin/stdout failed: {e}");
                return 1;
            }
        };
        match running.waiting().await {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("moat mcp: the server stopped: {e}");
                1
            }
        }
    });
    // A read of stdin may still be pending: do not wait for it.
    rt.shutdown_background();
    code
}
