//! The daemon's OpenAPI 3.1 document, served at `/v1/openapi.json`: every route, its
//! parameters, bodies and answers, from one table.

use serde_json::{json, Map, Value};

/// (method, path, summary, request body schema, success status, success schema)
type Route = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    u16,
    &'static str,
);

const ROUTES: &[Route] = &[
    ("post", "/v1/sandboxes", "Create and start a sandbox", Some("CreateSandbox"), 201, "Sandbox"),
    ("get", "/v1/sandboxes", "List your sandboxes (filter ?state= and ?metadata.K=V)", None, 200, "SandboxList"),
    ("get", "/v1/sandboxes/{id}", "Get a sandbox", None, 200, "Sandbox"),
    ("delete", "/v1/sandboxes/{id}", "Destroy a sandbox", None, 204, ""),
    ("post", "/v1/sandboxes/{id}/timeout", "Set the sandbox's expiry to now + timeout_s", Some("Timeout"), 200, "Sandbox"),
    ("post", "/v1/sandboxes/{id}/pause", "Freeze every process of the sandbox", None, 200, "Sandbox"),
    ("post", "/v1/sandboxes/{id}/resume", "Thaw a paused sandbox", None, 200, "Sandbox"),
    ("get", "/v1/sandboxes/{id}/metrics", "CPU, memory, pids and disk of the sandbox", None, 200, "Metrics"),
    ("get", "/v1/sandboxes/{id}/events", "The sandbox's audit events (?since=&limit=&kind=egress,exec_finished&follow=1 for server-sent events)", None, 200, "EventList"),
    ("post", "/v1/sandboxes/{id}/exec", "Run a command and wait (Accept: application/x-ndjson streams start/stdout/stderr/exit events)", Some("Exec"), 200, "ExecResult"),
    ("get", "/v1/sandboxes/{id}/exec/ws", "Interactive command over a WebSocket (pty, stdin, resize, signals)", None, 101, ""),
    ("post", "/v1/sandboxes/{id}/processes", "Start a background process", Some("Process"), 201, "ProcessInfo"),
    ("get", "/v1/sandboxes/{id}/processes", "List background processes", None, 200, "ProcessList"),
    ("post", "/v1/sandboxes/{id}/processes/{pid}/signal", "Signal a process's group", Some("Signal"), 200, "Empty"),
    ("get", "/v1/sandboxes/{id}/processes/{pid}/output", "A background process's output as NDJSON (?follow=1 until it exits)", None, 200, ""),
    ("post", "/v1/sandboxes/{id}/processes/{pid}/stdin", "Write the raw body to a background process's stdin (?close=1 closes it)", None, 200, "Bytes"),
    ("get", "/v1/sandboxes/{id}/files", "Download a file (?path=), streamed raw bytes", None, 200, ""),
    ("put", "/v1/sandboxes/{id}/files", "Upload a file (?path=&mode=), raw body streamed; parents are created", None, 200, "Written"),
    ("delete", "/v1/sandboxes/{id}/files", "Delete a file or directory (?path=&recursive=1)", None, 204, ""),
    ("get", "/v1/sandboxes/{id}/files/list", "List a directory (?path=&depth=)", None, 200, "Listing"),
    ("get", "/v1/sandboxes/{id}/files/stat", "Stat a path, not following a final symlink (?path=)", None, 200, "Entry"),
    ("post", "/v1/sandboxes/{id}/files/mkdir", "Make a directory", Some("Mkdir"), 200, "Empty"),
    ("post", "/v1/sandboxes/{id}/files/move", "Rename a file or directory", Some("Move"), 200, "Empty"),
    ("get", "/v1/events", "Audit events your key may see (?since=&limit=&kind=&follow=1)", None, 200, "EventList"),
    ("post", "/v1/tokens", "Issue a short-lived token for one sandbox and some scopes", Some("CreateToken"), 201, "Token"),
    ("get", "/v1/health", "Liveness (no authentication)", None, 200, "Health"),
    ("get", "/v1/openapi.json", "This document", None, 200, ""),
    ("post", "/mcp", "MCP over streamable HTTP (JSON-RPC messages; the tools act as the bearer key)", None, 200, ""),
    ("get", "/mcp", "MCP over streamable HTTP: the server-to-client event stream of a session", None, 200, ""),
    ("delete", "/mcp", "MCP over streamable HTTP: end a session", None, 200, ""),
];

fn schemas() -> Value {
    let obj = |props: Value, required: &[&str]| {
        json!({"type": "object", "additionalProperties": false, "properties": props,
               "required": required})
    };
    let map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    json!({
        "Error": obj(json!({"error": obj(json!({"code": {"type": "string"}, "message": {"type": "string"}}), &["code", "message"])}), &["error"]),
        "CreateSandbox": obj(json!({"policy": {"type": "object", "description": "the TOML policy's fields as JSON"}, "env": map, "metadata": map, "timeout_s": {"type": "integer", "minimum": 1}, "tier": {"type": "string", "enum": ["native", "gvisor"]}, "secrets": {"type": "object", "additionalProperties": {"type": "string"}, "description": "values of the secrets the policy binds to hosts (network.secrets); the sandbox sees placeholders"}}), &[]),
        "Sandbox": obj(json!({"id": {"type": "string"}, "state": {"type": "string", "enum": ["creating", "running", "paused", "stopping", "stopped", "failed"]}, "tier": {"type": "string"}, "created_at": {"type": "integer", "description": "ms since the epoch"}, "expires_at": {"type": "integer"}, "metadata": map, "error": {"type": ["string", "null"]}, "sandbox": {"type": "object"}}), &["id", "state", "tier", "created_at", "expires_at", "metadata"]),
        "SandboxList": obj(json!({"sandboxes": {"type": "array", "items": {"$ref": "#/components/schemas/Sandbox"}}}), &["sandboxes"]),
        "Timeout": obj(json!({"timeout_s": {"type": "integer", "minimum": 1}}), &["timeout_s"]),
        "Exec": obj(json!({"cmd": {"type": "array", "items": {"type": "string"}}, "shell": {"type": "string"}, "cwd": {"type": "string"}, "env": map, "stdin": {"type": "string"}, "stdin_b64": {"type": "string"}, "timeout_s": {"type": "number"}}), &[]),
        "ExecResult": obj(json!({"stdout": {"type": "string"}, "stderr": {"type": "string"}, "exit_code": {"type": ["integer", "null"]}, "signal": {"type": ["integer", "null"]}, "status": {"type": "string", "enum": ["ok", "timeout", "oom", "output_limit", "killed", "policy_denied", "error"]}, "wall_ms": {"type": "integer"}, "cpu_ms": {"type": "integer"}, "max_rss_kb": {"type": "integer"}, "truncated": {"type": "object"}, "message": {"type": "string"}, "sandbox": {"type": "object"}}), &["status"]),
        "Process": obj(json!({"cmd": {"type": "array", "items": {"type": "string"}}, "shell": {"type": "string"}, "cwd": {"type": "string"}, "env": map, "stdin": {"type": "boolean"}}), &[]),
        "ProcessInfo": obj(json!({"pid": {"type": "integer"}, "argv": {"type": "array", "items": {"type": "string"}}, "running": {"type": "boolean"}, "exit_code": {"type": ["integer", "null"]}, "signal": {"type": ["integer", "null"]}, "status": {"type": ["string", "null"]}, "started_at": {"type": "integer"}, "finished_at": {"type": ["integer", "null"]}}), &["pid", "argv", "running"]),
        "ProcessList": obj(json!({"processes": {"type": "array", "items": {"$ref": "#/components/schemas/ProcessInfo"}}}), &["processes"]),
        "Signal": obj(json!({"signal": {"type": "integer", "minimum": 1, "maximum": 64}}), &["signal"]),
        "Bytes": obj(json!({"bytes": {"type": "integer"}}), &["bytes"]),
        "Written": obj(json!({"path": {"type": "string"}, "bytes": {"type": "integer"}}), &["path", "bytes"]),
        "Entry": obj(json!({"path": {"type": "string"}, "kind": {"type": "string", "enum": ["file", "dir", "symlink", "other"]}, "size": {"type": "integer"}, "mode": {"type": "integer"}, "mtime_ms": {"type": "integer"}}), &["path", "kind", "size", "mode", "mtime_ms"]),
        "Listing": obj(json!({"entries": {"type": "array", "items": {"$ref": "#/components/schemas/Entry"}}, "truncated": {"type": "boolean"}}), &["entries", "truncated"]),
        "Mkdir": obj(json!({"path": {"type": "string"}, "parents": {"type": "boolean"}}), &["path"]),
        "Move": obj(json!({"from": {"type": "string"}, "to": {"type": "string"}}), &["from", "to"]),
        "Metrics": obj(json!({"cpu_ms": {"type": ["integer", "null"]}, "memory_bytes": {"type": ["integer", "null"]}, "pids": {"type": ["integer", "null"]}, "disk_bytes": {"type": ["integer", "null"]}}), &[]),
        "Event": obj(json!({"seq": {"type": "integer"}, "ts": {"type": "integer"}, "key_id": {"type": ["string", "null"]}, "sandbox_id": {"type": ["string", "null"]}, "kind": {"type": "string"}, "data": {"type": "object"}}), &["seq", "ts", "kind", "data"]),
        "EventList": obj(json!({"events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}}), &["events"]),
        "CreateToken": obj(json!({"sandbox_id": {"type": "string"}, "scopes": {"type": "array", "items": {"type": "string", "enum": ["exec", "files:read", "files:write", "read"]}}, "ttl_s": {"type": "integer", "minimum": 1, "maximum": 86400}}), &["sandbox_id", "scopes"]),
        "Token": obj(json!({"id": {"type": "string"}, "token": {"type": "string"}, "sandbox_id": {"type": "string"}, "scopes": {"type": "array", "items": {"type": "string"}}, "expires_at": {"type": "integer"}}), &["id", "token", "sandbox_id", "scopes", "expires_at"]),
        "Health": obj(json!({"status": {"type": "string"}, "version": {"type": "string"}}), &["status", "version"]),
        "Empty": obj(json!({}), &[]),
    })
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for (method, path, summary, body, status, schema) in ROUTES {
        let mut op = Map::new();
        op.insert("summary".into(), json!(summary));
        let mut params = Vec::new();
        for name in ["id", "pid"] {
            if path.contains(&format!("{{{name}}}")) {
                params.push(json!({"name": name, "in": "path", "required": true,
                                   "schema": {"type": "string"}}));
            }
        }
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(b) = body {
            op.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{b}")}}}}),
            );
        }
        let mut ok = json!({"description": "success"});
        if !schema.is_empty() {
            ok["content"] = json!({"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}});
        }
        let err = json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
        op.insert(
            "responses".into(),
            json!({ status.to_string(): ok, "default": err }),
        );
        if *path != "/v1/health" {
            op.insert("security".into(), json!([{"bearer": []}]));
        }
        let entry = paths
            .entry(path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(e) = entry.as_object_mut() {
            e.insert(method.to_string(), Value::Object(op));
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "moat", "version": env!("CARGO_PKG_VERSION"),
                 "description": "A self-hosted sandbox for code that AI agents write."},
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_is_documented_once_and_refs_resolve() {
        let doc = super::document();
        let paths = doc["paths"].as_object().unwrap();
        let n: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(n, super::ROUTES.len());
        let text = doc.to_string();
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert!(doc["components"]["schemas"].get(&name).is_some(), "{name}");
        }
    }
}
