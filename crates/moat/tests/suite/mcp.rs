//! `moat mcp` (stdio) and `/mcp` on `moat serve` (streamable HTTP), driven by the official
//! Python `mcp` package's clients (installed with pip into a venv made by the test) against a
//! real daemon: list the tools, create a sandbox, run code and commands, write and read files
//! back, list a directory, destroy the sandbox. And `/mcp` refuses a request without the key.
//!
//! Needs python3 with venv and pip, and PyPI (or a pip mirror) reachable. Set
//! MOAT_TEST_MCP_VENV to a venv that already has `mcp` installed to skip the install.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;

use super::daemon::{agent, Daemon};
use super::harness::{gvisor, have, moat_bin, require, scratch_dir};

/// The version range of the Python SDK the client script is written for.
const MCP_PIP: &str = "mcp>=2.3,<3";

/// The venv's python3, with `mcp` installed (made once per test process), or why not.
fn venv_python() -> Result<PathBuf, String> {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    VENV.get_or_init(|| {
        if let Some(v) = std::env::var_os("MOAT_TEST_MCP_VENV") {
            let py = PathBuf::from(v).join("bin/python3");
            return if py.is_file() {
                Ok(py)
            } else {
                Err(format!("MOAT_TEST_MCP_VENV has no {}", py.display()))
            };
        }
        if !have("python3") {
            return Err("python3 (apt-get install python3 python3-venv)".into());
        }
        let dir = scratch_dir("mcp-venv");
        let venv = dir.join("venv");
        let out = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .map_err(|e| format!("python3 -m venv: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "python3 -m venv (apt-get install python3-venv): {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let py = venv.join("bin/python3");
        let out = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                MCP_PIP,
            ])
            .output()
            .map_err(|e| format!("pip install: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pip install '{MCP_PIP}' (PyPI reachable?): {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(py)
    })
    .clone()
}

const CLIENT: &str = r#"
import asyncio, json, os, sys

from mcp import ClientSession

EXPECTED = {"create_sandbox", "run_command", "run_code", "write_file", "read_file",
            "list_directory", "destroy_sandbox"}


def payload(result):
    assert not result.is_error, f"tool error: {result.content}"
    assert len(result.content) == 1 and result.content[0].type == "text", result
    return json.loads(result.content[0].text)


def error_of(result):
    assert result.is_error, f"expected a tool error, got {result.content}"
    return json.loads(result.content[0].text)["error"]


async def flow(session):
    init = await session.initialize()
    assert init.server_info.name == "moat", init.server_info
    tools = (await session.list_tools()).tools
    names = {t.name for t in tools}
    assert names == EXPECTED, names
    for t in tools:
        assert t.description and len(t.description) > 60, (t.name, t.description)
        assert t.input_schema["type"] == "object", t.input_schema
    schema = {t.name: t.input_schema for t in tools}
    assert set(schema["run_code"]["properties"]["language"].get("enum", [])) >= {"python", "node", "bash"} \
        or "python" in json.dumps(schema["run_code"]), schema["run_code"]
    assert "sandbox_id" in schema["run_command"]["required"], schema["run_command"]

    created = payload(await session.call_tool(
        "create_sandbox", {"timeout_s": 300, "metadata": {"by": "mcp-test"}}))
    sid = created["sandbox_id"]
    assert sid.startswith("sbx_"), created
    assert created["state"] == "running", created
    try:
        r = payload(await session.call_tool("run_code", {
            "sandbox_id": sid, "language": "python",
            "code": "import sys\nprint('hello from python', sys.version_info[0])\n"
                    "print('to stderr', file=sys.stderr)\nsys.exit(4)\n"}))
        assert r["stdout"] == "hello from python 3\n", r
        assert r["stderr"] == "to stderr\n", r
        assert r["exit_code"] == 4 and r["status"] == "ok", r
        assert r["language"] == "python", r

        r = payload(await session.call_tool("run_code", {
            "sandbox_id": sid, "language": "bash", "code": "x=$((6*7)); echo \"bash says $x\""}))
        assert r["stdout"] == "bash says 42\n" and r["exit_code"] == 0, r

        r = await session.call_tool("run_code", {
            "sandbox_id": sid, "language": "node", "code": "console.log('node', 1 + 1)"})
        if r.is_error:
            # Node is not in every sandbox: then the error says so.
            assert error_of(r)["code"] == "interpreter_missing", r.content
        else:
            assert payload(r)["stdout"] == "node 2\n", r.content

        r = payload(await session.call_tool("run_command", {
            "sandbox_id": sid, "command": "echo out; echo err >&2; pwd; exit 3"}))
        assert r["exit_code"] == 3, r
        assert r["stdout"] == "out\n/work\n" and r["stderr"] == "err\n", r

        r = payload(await session.call_tool("run_command", {
            "sandbox_id": sid, "argv": ["ls", "-d", "/tmp"], "cwd": "/tmp"}))
        assert r["stdout"] == "/tmp\n" and r["exit_code"] == 0, r

        # Big output is cut, with a note.
        r = payload(await session.call_tool("run_command", {
            "sandbox_id": sid, "command": "seq 1 50000"}))
        assert r["exit_code"] == 0, r
        assert len(r["stdout"]) < 9000, len(r["stdout"])
        assert r["stdout"].startswith("1\n2\n3\n") and r["stdout"].endswith("49999\n50000\n"), r["stdout"][-50:]
        assert "bytes cut by moat" in r["stdout"], r["stdout"][:3000]
        assert any("stdout was" in n and "cut" in n for n in r["notes"]), r["notes"]

        # The timeout is the tool's.
        r = payload(await session.call_tool("run_command", {
            "sandbox_id": sid, "command": "sleep 30", "timeout_s": 1}))
        assert r["status"] == "timeout", r

        text = "héllo, moat\nline two\n"
        w = payload(await session.call_tool("write_file", {
            "sandbox_id": sid, "path": "/work/notes/hello.txt", "content": text}))
        assert w["bytes"] == len(text.encode()), w
        f = payload(await session.call_tool("read_file", {
            "sandbox_id": sid, "path": "/work/notes/hello.txt"}))
        assert f["content"] == text and f["encoding"] == "utf-8", f
        assert f["size"] == len(text.encode()), f

        # What a command wrote is read back too; a binary file comes back as base64.
        payload(await session.call_tool("run_command", {
            "sandbox_id": sid, "command": "printf '\\000\\001\\377' > /work/notes/bin.dat"}))
        f = payload(await session.call_tool("read_file", {
            "sandbox_id": sid, "path": "/work/notes/bin.dat"}))
        assert f["encoding"] == "base64" and f["content_base64"] == "AAH/", f
        assert "not UTF-8" in f["note"], f

        ls = payload(await session.call_tool("list_directory", {
            "sandbox_id": sid, "path": "/work/notes"}))
        paths = {e["path"]: e for e in ls["entries"]}
        assert "/work/notes/hello.txt" in paths, ls
        assert paths["/work/notes/hello.txt"]["kind"] == "file", ls
        assert paths["/work/notes/hello.txt"]["size"] == len(text.encode()), ls
        ls = payload(await session.call_tool("list_directory", {
            "sandbox_id": sid, "path": "/work", "depth": 2}))
        assert "/work/notes/bin.dat" in {e["path"] for e in ls["entries"]}, ls
        ls = payload(await session.call_tool("list_directory", {"sandbox_id": sid, "path": "/work"}))
        assert "/work/notes" in {e["path"] for e in ls["entries"]}, ls
        assert "/work/notes/bin.dat" not in {e["path"] for e in ls["entries"]}, ls

        # Mistakes come back as tool errors the model can act on.
        e = error_of(await session.call_tool("read_file", {
            "sandbox_id": sid, "path": "/work/nope.txt"}))
        assert e["code"] == "not_found", e
        e = error_of(await session.call_tool("read_file", {
            "sandbox_id": sid, "path": "relative.txt"}))
        assert e["code"] == "invalid_request" and "absolute" in e["message"], e
        e = error_of(await session.call_tool("run_command", {"sandbox_id": sid}))
        assert e["code"] == "invalid_request", e
        e = error_of(await session.call_tool("run_command", {
            "sandbox_id": "sbx_doesnotexist", "command": "true"}))
        assert e["code"] == "not_found", e
    finally:
        d = payload(await session.call_tool("destroy_sandbox", {"sandbox_id": sid}))
        assert d["destroyed"] is True, d
    e = error_of(await session.call_tool("run_command", {"sandbox_id": sid, "command": "true"}))
    assert e["code"] == "not_found", e


async def tenancy(session):
    """The credential may use MOAT_OWN only; MOAT_FOREIGN is as unknown as a missing one."""
    await session.initialize()
    own, foreign = os.environ["MOAT_OWN"], os.environ["MOAT_FOREIGN"]
    r = payload(await session.call_tool("run_command", {"sandbox_id": own, "command": "echo mine"}))
    assert r["stdout"] == "mine\n", r
    for name, args in [("run_command", {"command": "echo theirs"}), ("read_file", {"path": "/etc/hostname"}),
                       ("list_directory", {"path": "/work"})]:
        e = error_of(await session.call_tool(name, {"sandbox_id": foreign, **args}))
        assert e["code"] == "not_found", (name, e)
    r = await session.call_tool("create_sandbox", {})
    if os.environ["MOAT_CAN_CREATE"] == "1":
        e = error_of(await session.call_tool("destroy_sandbox", {"sandbox_id": foreign}))
        assert e["code"] == "not_found", e
        sid = payload(r)["sandbox_id"]
        payload(await session.call_tool("destroy_sandbox", {"sandbox_id": sid}))
    else:
        assert error_of(r)["code"] == "forbidden", r.content
        e = error_of(await session.call_tool("destroy_sandbox", {"sandbox_id": own}))
        assert e["code"] == "forbidden", e
        # The token has only the exec scope.
        e = error_of(await session.call_tool("read_file", {"sandbox_id": own, "path": "/etc/hostname"}))
        assert e["code"] == "forbidden", e


async def main():
    mode = sys.argv[1]
    if mode == "stdio":
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client
        params = StdioServerParameters(
            command=os.environ["MOAT_BIN"], args=["mcp"],
            env={"MOAT_URL": os.environ["MOAT_URL"], "MOAT_API_KEY": os.environ["MOAT_API_KEY"]})
        async with stdio_client(params) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                await flow(session)
    else:
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client
        http = create_mcp_http_client(
            headers={"Authorization": "Bearer " + os.environ["MOAT_API_KEY"]})
        async with http:
            async with streamable_http_client(os.environ["MOAT_URL"] + "/mcp",
                                              http_client=http) as streams:
                async with ClientSession(streams[0], streams[1]) as session:
                    await (tenancy(session) if mode == "tenancy" else flow(session))
    print("MCP-FLOW-OK", flush=True)


asyncio.run(main())
"#;

/// Runs the client script in `mode` (stdio, http or tenancy) against `d` with the admin key;
/// panics with its output unless the whole flow passed.
fn run_client(d: &Daemon, py: &Path, mode: &str) {
    run_client_as(d, py, mode, &d.key, &[]);
    // Nothing is left running.
    let left = d.api("GET", "/v1/sandboxes", None).json();
    assert_eq!(
        left["sandboxes"].as_array().map(Vec::len),
        Some(0),
        "sandboxes left: {left}"
    );
}

fn run_client_as(d: &Daemon, py: &Path, mode: &str, key: &str, env: &[(&str, &str)]) {
    let dir = scratch_dir("mcp-client");
    let script = dir.join("client.py");
    let client = if gvisor() {
        // runsc 20221219's statx refuses coreutils' `ls -d` (EINVAL) in the gvisor tier:
        // find prints the same path from the same argv-and-cwd call.
        CLIENT.replace(
            r#""argv": ["ls", "-d", "/tmp"]"#,
            r#""argv": ["find", "/tmp", "-maxdepth", "0"]"#,
        )
    } else {
        CLIENT.to_string()
    };
    assert!(client.contains(r#""cwd": "/tmp""#));
    std::fs::write(&script, client).unwrap();
    let mut child = Command::new(py)
        .arg(&script)
        .arg(mode)
        .env("MOAT_BIN", moat_bin())
        .env("MOAT_URL", &d.url)
        .env("MOAT_API_KEY", key)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A hung client fails the test rather than the suite.
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        for _ in 0..1800 {
            std::thread::sleep(Duration::from_millis(100));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        // Our own child, by its pid (it has not been waited for, so the pid is still its).
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
    });
    let out = std::mem::take(&mut child.stdout);
    let err = std::mem::take(&mut child.stderr);
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut o) = out {
            let _ = std::io::Read::read_to_string(&mut o, &mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = err {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    });
    let status = child.wait().unwrap();
    let stdout = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    let _ = killer.join();
    assert!(
        status.success()
            && stdout.contains("MCP-FLOW-OK")
            && !stderr.contains("Session termination failed"),
        "the MCP client ({mode}) failed ({status}):\nstdout:\n{stdout}\nstderr:\n{stderr}\n\
         daemon log:\n{}",
        d.log()
    );
}

#[test]
fn mcp_stdio_with_the_official_python_client() {
    let py = venv_python();
    if !require(py.is_ok(), &format!("{:?}", py.as_ref().err())) {
        return;
    }
    let d = Daemon::start();
    run_client(&d, &py.unwrap(), "stdio");
}

#[test]
fn mcp_streamable_http_with_the_official_python_client() {
    let py = venv_python();
    if !require(py.is_ok(), &format!("{:?}", py.as_ref().err())) {
        return;
    }
    let d = Daemon::start();
    run_client(&d, &py.unwrap(), "http");
}

#[test]
fn mcp_http_tools_act_as_the_caller() {
    let py = venv_python();
    if !require(py.is_ok(), &format!("{:?}", py.as_ref().err())) {
        return;
    }
    let py = py.unwrap();
    let d = Daemon::start();
    let mine = d.create(json!({}));
    let other_key = d.new_key("other");
    let a = d.api_as(&other_key, "POST", "/v1/sandboxes", Some(json!({})));
    assert_eq!(a.status, 201, "{}", a.text());
    let theirs = a.json()["id"].as_str().unwrap().to_string();
    // Another key sees only its own sandboxes, and may create.
    run_client_as(
        &d,
        &py,
        "tenancy",
        &other_key,
        &[
            ("MOAT_OWN", &theirs),
            ("MOAT_FOREIGN", &mine),
            ("MOAT_CAN_CREATE", "1"),
        ],
    );
    // A token for one sandbox with the exec scope: that sandbox, exec only, no create or destroy.
    let t = d.api(
        "POST",
        "/v1/tokens",
        Some(json!({"sandbox_id": mine, "scopes": ["exec"], "ttl_s": 600})),
    );
    assert_eq!(t.status, 201, "{}", t.text());
    let token = t.json()["token"].as_str().unwrap().to_string();
    run_client_as(
        &d,
        &py,
        "tenancy",
        &token,
        &[
            ("MOAT_OWN", &mine),
            ("MOAT_FOREIGN", &theirs),
            ("MOAT_CAN_CREATE", "0"),
        ],
    );
    // Both sandboxes are still there: nothing the others did reached them.
    for id in [&mine, &theirs] {
        let key = if id == &mine { &d.key } else { &other_key };
        let a = d.api_as(key, "GET", &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(a.json()["state"], "running", "{}", a.text());
        d.api_as(key, "DELETE", &format!("/v1/sandboxes/{id}"), None);
    }
}

#[test]
fn mcp_http_refuses_requests_without_the_key() {
    let d = Daemon::start();
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let a = agent();
    for auth in [None, Some("Bearer not-a-key"), Some("Basic abc")] {
        let mut req = a
            .post(format!("{}/mcp", d.url))
            .header("Content-Type", "application/json")
            .header("Accept", "application/json, text/event-stream");
        if let Some(h) = auth {
            req = req.header("Authorization", h);
        }
        let mut resp = req.send(init).unwrap();
        assert_eq!(resp.status().as_u16(), 401, "auth {auth:?}");
        let text = resp.body_mut().read_to_string().unwrap();
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    }
    // GET and DELETE too, and paths under /mcp.
    for (method, path) in [("GET", "/mcp"), ("DELETE", "/mcp"), ("GET", "/mcp/x")] {
        let resp = match method {
            "GET" => a.get(format!("{}{path}", d.url)).call(),
            _ => a.delete(format!("{}{path}", d.url)).call(),
        }
        .unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{method} {path}");
    }
    // With the key, the same initialize is answered.
    let resp = a
        .post(format!("{}/mcp", d.url))
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, text/event-stream")
        .header("Authorization", format!("Bearer {}", d.key))
        .send(init)
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

#[test]
fn mcp_stdio_without_a_key_says_how_to_give_one() {
    let out = Command::new(moat_bin())
        .arg("mcp")
        .env_remove("MOAT_API_KEY")
        .env("MOAT_URL", "http://127.0.0.1:9")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "stdout is the protocol's");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MOAT_API_KEY"), "{err}");
}
