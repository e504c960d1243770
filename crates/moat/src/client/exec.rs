//! `moat exec` (the ndjson stream of the exec API) and `moat shell` (its WebSocket).

use super::{api_error, print_json, sandbox_path, text, Client, Conn, Error, Result};
use moat_api::{ExecResult, Status};
use moat_sys::tty;
use serde_json::{json, Map, Value};
use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// How long `shell` waits for output before it looks at its input again.
const SLOW_TICK: Duration = Duration::from_millis(20);
/// The same, for a while after input went out.
const FAST_TICK: Duration = Duration::from_millis(1);
const FAST_FOR: Duration = Duration::from_millis(100);

/// The exit code of `exec`/`shell` when the call itself failed.
const CALL_FAILED: i32 = 125;

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Sandbox id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Working directory inside the sandbox.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Environment variable for the command. Repeatable.
    #[arg(long, short = 'e', value_name = "K=V")]
    pub env: Vec<String>,
    /// Wall-clock timeout of the command, e.g. 500ms, 30s, 2m.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Run this shell command line (`sh -c`) instead of CMD.
    #[arg(long, value_name = "LINE", conflicts_with = "cmd")]
    pub shell: Option<String>,
    /// Wait for the end and print the result as JSON (as `moat run --json`).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
    /// The command and its arguments.
    #[arg(last = true, value_name = "CMD", required_unless_present = "shell")]
    pub cmd: Vec<String>,
}

#[derive(clap::Args)]
pub struct ShellArgs {
    /// Sandbox id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Working directory inside the sandbox.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Environment variable for the command. Repeatable.
    #[arg(long, short = 'e', value_name = "K=V")]
    pub env: Vec<String>,
    #[command(flatten)]
    pub conn: Conn,
    /// The command to run (default: /bin/sh).
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

fn env_map(env: &[String]) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    for kv in env {
        let (k, v) = text::parse_kv(kv, "--env")?;
        m.insert(k, Value::String(v));
    }
    Ok(m)
}

/// The body of `POST .../exec`, without stdin.
pub fn exec_body(a: &ExecArgs) -> Result<Map<String, Value>> {
    let mut b = Map::new();
    match &a.shell {
        Some(line) => b.insert("shell".into(), json!(line)),
        None => b.insert("cmd".into(), json!(a.cmd)),
    };
    if let Some(c) = &a.cwd {
        b.insert("cwd".into(), json!(c));
    }
    let env = env_map(&a.env)?;
    if !env.is_empty() {
        b.insert("env".into(), Value::Object(env));
    }
    if let Some(t) = &a.timeout {
        b.insert("timeout_s".into(), json!(text::parse_secs(t, "--timeout")?));
    }
    Ok(b)
}

/// An [`ExecResult`] from an `exit` event or message, which lacks stdout and stderr (and may
/// lack more, for the WebSocket's short exit message).
pub fn result_of_exit(v: &Value) -> Option<ExecResult> {
    let mut obj = v.as_object()?.clone();
    obj.remove("type");
    for (k, d) in [
        ("stdout", json!("")),
        ("stderr", json!("")),
        ("wall_ms", json!(0)),
        ("cpu_ms", json!(0)),
        ("max_rss_kb", json!(0)),
        ("truncated", json!({"stdout": false, "stderr": false})),
        (
            "sandbox",
            json!({"tier": "", "landlock_abi": 0, "seccomp": false, "cgroup": ""}),
        ),
        ("exit_code", Value::Null),
        ("signal", Value::Null),
    ] {
        obj.entry(k).or_insert(d);
    }
    serde_json::from_value(Value::Object(obj)).ok()
}

/// Says why a command did not end normally, as `moat run` does.
fn report(r: &ExecResult) {
    if r.status != Status::Ok {
        match &r.message {
            Some(m) => eprintln!("moat: {}: {m}", r.status),
            None => eprintln!("moat: {}", r.status),
        }
    }
}

fn fail(e: &Error) -> i32 {
    eprintln!("moat: {e}");
    CALL_FAILED
}

/// Writes one stream event's bytes (`data` or `data_b64`) to `out`.
fn write_chunk(ev: &Value, out: &mut dyn Write) -> std::io::Result<()> {
    if let Some(d) = ev["data"].as_str() {
        out.write_all(d.as_bytes())?;
    } else if let Some(b) = ev["data_b64"].as_str().and_then(moat_server::b64::decode) {
        out.write_all(&b)?;
    }
    out.flush()
}

/// Reads an exec ndjson stream, passing output through; returns the exit code.
pub fn follow_stream(
    r: impl BufRead,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> std::result::Result<i32, Error> {
    for line in r.lines() {
        let line = line.map_err(|e| Error::Msg(format!("reading the exec stream: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let ev: Value = serde_json::from_str(&line).map_err(|e| {
            Error::Msg(format!(
                "the exec stream has a line that is not JSON ({e}): {}",
                text::cut(&line, 200)
            ))
        })?;
        match ev["type"].as_str() {
            Some("stdout") => {
                // A closed stdout (`| head -1`) ends this side as SIGPIPE would (141); dropping
                // the stream cancels the command.
                if let Err(e) = write_chunk(&ev, stdout) {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(128 + libc::SIGPIPE);
                    }
                }
            }
            Some("stderr") => {
                let _ = write_chunk(&ev, stderr);
            }
            Some("exit") => {
                let r = result_of_exit(&ev).ok_or_else(|| {
                    Error::Msg(format!(
                        "the exec stream ended with an exit event moat cannot read: {}",
                        text::cut(&line, 300)
                    ))
                })?;
                report(&r);
                return Ok(r.cli_exit_code());
            }
            Some("error") => {
                return Err(Error::Stream {
                    code: ev["code"].as_str().unwrap_or("error").to_string(),
                    message: ev["message"].as_str().unwrap_or("").to_string(),
                });
            }
            _ => {}
        }
    }
    Err(Error::Msg(
        "the exec stream ended before the command's exit: the daemon may have stopped; see \
         `moat logs`"
            .into(),
    ))
}

pub fn exec(a: ExecArgs) -> i32 {
    match exec_inner(&a) {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

fn exec_inner(a: &ExecArgs) -> Result<i32> {
    let mut body = exec_body(a)?;
    let c = Client::new(&a.conn)?;
    let stdin = std::io::stdin();
    if !tty::is_tty(stdin.as_fd()) {
        let mut buf = Vec::new();
        stdin
            .lock()
            .read_to_end(&mut buf)
            .map_err(|e| Error::Msg(format!("reading stdin to send it: {e}")))?;
        body.insert("stdin_b64".into(), json!(moat_server::b64::encode(&buf)));
    }
    let body = Value::Object(body).to_string();
    let path = sandbox_path(&a.id, "/exec");
    if a.json {
        let resp = c.check(c.post(&path).content_type("application/json").send(body))?;
        let v = super::read_json(resp)?;
        print_json(&v);
        return Ok(serde_json::from_value::<ExecResult>(v)
            .map(|r| r.cli_exit_code())
            .unwrap_or(CALL_FAILED));
    }
    let resp = c.check(
        c.post(&path)
            .content_type("application/json")
            .header("Accept", "application/x-ndjson")
            .send(body),
    )?;
    let reader = std::io::BufReader::new(resp.into_body().into_reader());
    follow_stream(
        reader,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )
}

// ---------------------------------------------------------------------------------------------
// shell
// ---------------------------------------------------------------------------------------------

/// `host:port` and the path prefix of an `http://` base URL.
pub fn split_base(base: &str) -> Result<(String, String)> {
    let rest = base
        .strip_prefix("http://")
        .ok_or_else(|| Error::Msg(format!("{base}: moat shell needs an http:// URL")))?;
    let (host, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let host = if host.contains(':') && !host.ends_with(']') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    Ok((host, prefix.to_string()))
}

/// The first message of the WebSocket: what to run, and the pty's size if any.
pub fn start_message(
    a: &ShellArgs,
    pty: Option<tty::WinSize>,
    term: Option<String>,
) -> Result<Value> {
    let mut m = Map::new();
    m.insert("type".into(), json!("start"));
    let cmd = if a.cmd.is_empty() {
        vec!["/bin/sh".to_string()]
    } else {
        a.cmd.clone()
    };
    m.insert("cmd".into(), json!(cmd));
    if let Some(c) = &a.cwd {
        m.insert("cwd".into(), json!(c));
    }
    let mut env = env_map(&a.env)?;
    if let (Some(t), Some(_)) = (term, pty) {
        env.entry("TERM").or_insert(json!(t));
    }
    if !env.is_empty() {
        m.insert("env".into(), Value::Object(env));
    }
    if let Some(ws) = pty {
        m.insert("pty".into(), json!({"rows": ws.rows, "cols": ws.cols}));
    }
    Ok(Value::Object(m))
}

enum Input {
    Data(Vec<u8>),
    Eof,
}

pub fn shell(a: ShellArgs) -> i32 {
    let stdin = std::io::stdin();
    let is_tty = tty::is_tty(stdin.as_fd());
    // The release build aborts on panic, so Drop would not restore the terminal: a hook does.
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tty::restore_terminal();
        prev(info);
    }));
    let code = match shell_inner(&a, is_tty) {
        Ok(code) => code,
        Err(e) => {
            tty::restore_terminal();
            fail(&e)
        }
    };
    tty::restore_terminal();
    code
}

fn shell_inner(a: &ShellArgs, is_tty: bool) -> Result<i32> {
    let c = Client::new(&a.conn)?;
    let (host, prefix) = split_base(c.base())?;
    let stdin = std::io::stdin();
    let size = if is_tty {
        Some(tty::window_size(stdin.as_fd()).unwrap_or(tty::WinSize { rows: 24, cols: 80 }))
    } else {
        None
    };
    let start = start_message(a, size, std::env::var("TERM").ok())?;

    let stream = TcpStream::connect(&host).map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound => {
            Error::Unreachable {
                url: c.base().to_string(),
            }
        }
        _ => Error::Msg(format!("connecting to {host}: {e}")),
    })?;
    let _ = stream.set_nodelay(true);
    let url = format!("ws://{host}{prefix}{}", sandbox_path(&a.id, "/exec/ws"));
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(url.as_str())
        .map_err(|e| Error::Msg(format!("{url}: {e}")))?;
    let auth = tungstenite::http::HeaderValue::from_str(&format!("Bearer {}", c.secret()))
        .map_err(|_| Error::Msg("the API key has characters a header cannot carry".into()))?;
    req.headers_mut().insert("Authorization", auth);
    let (mut ws, _) = tungstenite::client(req, stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            api_error(status, &body)
        }
        other => Error::Msg(format!("opening the WebSocket {url}: {other}")),
    })?;
    ws.send(Message::text(start.to_string()))
        .map_err(|e| Error::Msg(format!("starting the command: {e}")))?;
    ws.get_mut()
        .set_read_timeout(Some(SLOW_TICK))
        .map_err(|e| Error::Msg(format!("setting up the socket: {e}")))?;

    tty::catch_signals(&[libc::SIGWINCH, libc::SIGTERM, libc::SIGHUP])
        .map_err(|e| Error::Msg(format!("setting up signal handlers: {e}")))?;
    let _raw = if is_tty {
        Some(
            tty::RawMode::enable(stdin.as_fd())
                .map_err(|e| Error::Msg(format!("putting the terminal into raw mode: {e}")))?,
        )
    } else {
        None
    };

    // Read stdin unbuffered (a dup of fd 0), so that `wait_readable` sees what `read` would.
    let mut input = std::fs::File::from(
        stdin
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::Msg(format!("reading stdin: {e}")))?,
    );
    let (tx, rx) = mpsc::channel::<Input>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        let cap = buf.len() - 1;
        loop {
            match input.read(&mut buf[..cap]) {
                Ok(0) => {
                    let _ = tx.send(Input::Eof);
                    return;
                }
                Ok(mut n) => {
                    // When the end follows at once (a pipe or a file), send both together, so
                    // the end reaches the sandbox before a quick command's exit does.
                    let mut ends = false;
                    if tty::wait_readable(input.as_fd(), Duration::ZERO).unwrap_or(false) {
                        match input.read(&mut buf[n..n + 1]) {
                            Ok(0) => ends = true,
                            Ok(k) => n += k,
                            Err(_) => {}
                        }
                    }
                    if tx.send(Input::Data(buf[..n].to_vec())).is_err() {
                        return;
                    }
                    if ends {
                        let _ = tx.send(Input::Eof);
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    let _ = tx.send(Input::Eof);
                    return;
                }
            }
        }
    });

    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let mut stdin_open = true;
    let mut exit: Option<i32> = None;
    let mut exit_at: Option<Instant> = None;
    // When the last input went out; right after it, poll faster, so that the stdin's end,
    // which usually follows at once, is sent before a quick command's exit.
    let mut last_input: Option<Instant> = None;
    let mut tick = SLOW_TICK;
    // A failed send is not the end: the exit status may still be on its way, and the read
    // below decides. Input after that is dropped.
    let mut can_send = true;
    let send = |ws: &mut tungstenite::WebSocket<TcpStream>, m: Message, can: &mut bool| {
        if *can && ws.send(m).is_err() {
            *can = false;
        }
    };
    loop {
        // The server closes right after the exit message; do not hang if it does not.
        if exit_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            break;
        }
        if is_tty && tty::take_signal(libc::SIGWINCH) {
            if let Ok(s) = tty::window_size(stdin.as_fd()) {
                let m = json!({"type": "resize", "rows": s.rows, "cols": s.cols});
                send(&mut ws, Message::text(m.to_string()), &mut can_send);
            }
        }
        for sig in [libc::SIGTERM, libc::SIGHUP] {
            if tty::take_signal(sig) {
                // Stop the remote command too, then go; the terminal is restored on return.
                let m = json!({"type": "signal", "signal": sig});
                send(&mut ws, Message::text(m.to_string()), &mut can_send);
                return Ok(128 + sig);
            }
        }
        while stdin_open {
            match rx.try_recv() {
                Ok(Input::Data(d)) => {
                    send(&mut ws, Message::binary(d), &mut can_send);
                    last_input = Some(Instant::now());
                }
                Ok(Input::Eof) | Err(mpsc::TryRecvError::Disconnected) => {
                    stdin_open = false;
                    let m = json!({"type": "eof"});
                    send(&mut ws, Message::text(m.to_string()), &mut can_send);
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        let want = if stdin_open && last_input.is_some_and(|t| t.elapsed() < FAST_FOR) {
            FAST_TICK
        } else {
            SLOW_TICK
        };
        if want != tick && ws.get_mut().set_read_timeout(Some(want)).is_ok() {
            tick = want;
        }
        match ws.read() {
            Ok(Message::Binary(b)) => {
                let _ = stdout.write_all(&b);
                let _ = stdout.flush();
            }
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                match v["type"].as_str() {
                    Some("stderr") => {
                        let _ = write_chunk(&v, &mut stderr);
                    }
                    Some("stdout") => {
                        let _ = write_chunk(&v, &mut stdout);
                    }
                    Some("exit") => {
                        let code = result_of_exit(&v).map_or(CALL_FAILED, |r| {
                            if r.status != Status::Ok {
                                tty::restore_terminal();
                                report(&r);
                            }
                            r.cli_exit_code()
                        });
                        exit = Some(code);
                        exit_at = Some(Instant::now());
                    }
                    Some("error") => {
                        return Err(Error::Stream {
                            code: v["code"].as_str().unwrap_or("error").to_string(),
                            message: v["message"].as_str().unwrap_or("").to_string(),
                        })
                    }
                    _ => {}
                }
            }
            Ok(Message::Close(_)) => {}
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        // A socket read with a timeout is not restarted after a signal
                        // (SIGWINCH), even with SA_RESTART.
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
            Err(e) => {
                if exit.is_some() {
                    break;
                }
                return Err(Error::Msg(format!(
                    "the connection to the sandbox broke: {e}"
                )));
            }
        }
    }
    exit.ok_or_else(|| Error::Msg("the sandbox closed the session without an exit status".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(subcommand)]
        cmd: super::super::Command,
    }

    fn exec_args(args: &[&str]) -> ExecArgs {
        let mut v = vec!["moat", "exec"];
        v.extend_from_slice(args);
        match T::try_parse_from(v).unwrap().cmd {
            super::super::Command::Exec(a) => *a,
            _ => panic!(),
        }
    }

    #[test]
    fn exec_body_from_flags() {
        let a = exec_args(&[
            "sbx_1",
            "--cwd",
            "/tmp",
            "-e",
            "A=1",
            "--timeout",
            "1500ms",
            "--",
            "ls",
            "-l",
        ]);
        assert_eq!(a.id, "sbx_1");
        assert_eq!(
            Value::Object(exec_body(&a).unwrap()),
            json!({"cmd":["ls","-l"],"cwd":"/tmp","env":{"A":"1"},"timeout_s":1.5})
        );
        let a = exec_args(&["sbx_1", "--shell", "ls | wc -l"]);
        assert_eq!(
            Value::Object(exec_body(&a).unwrap()),
            json!({"shell":"ls | wc -l"})
        );
        assert!(T::try_parse_from(["moat", "exec", "sbx_1"]).is_err());
        assert!(T::try_parse_from(["moat", "exec", "sbx_1", "--shell", "x", "--", "ls"]).is_err());
    }

    #[test]
    fn exit_events_map_to_exit_codes() {
        let ev = |v: Value| result_of_exit(&v).unwrap().cli_exit_code();
        assert_eq!(
            ev(
                json!({"type":"exit","exit_code":3,"signal":null,"status":"ok","wall_ms":5,
                      "cpu_ms":1,"max_rss_kb":100,"truncated":{"stdout":false,"stderr":false},
                      "sandbox":{"tier":"native","landlock_abi":6,"seccomp":true,"cgroup":"v1"}})
            ),
            3
        );
        assert_eq!(
            ev(json!({"type":"exit","exit_code":null,"signal":9,"status":"ok"})),
            137
        );
        assert_eq!(
            ev(json!({"type":"exit","exit_code":null,"signal":9,"status":"timeout"})),
            124
        );
        assert!(result_of_exit(&json!({"type":"exit","status":"weird"})).is_none());
    }

    #[test]
    fn streams_are_passed_through() {
        let s = concat!(
            "{\"type\":\"start\",\"pid\":4}\n",
            "{\"type\":\"stdout\",\"data\":\"hello \"}\n",
            "{\"type\":\"stderr\",\"data\":\"warn\\n\"}\n",
            "\n",
            "{\"type\":\"stdout\",\"data_b64\":\"/wA=\"}\n",
            "{\"type\":\"exit\",\"exit_code\":7,\"signal\":null,\"status\":\"ok\"}\n",
        );
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = follow_stream(s.as_bytes(), &mut out, &mut err).unwrap();
        assert_eq!(code, 7);
        assert_eq!(out, b"hello \xff\x00");
        assert_eq!(err, b"warn\n");

        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let s = "{\"type\":\"stdout\",\"data\":\"x\"}\n";
        assert_eq!(
            follow_stream(s.as_bytes(), &mut Closed, &mut Vec::new()).unwrap(),
            141
        );
        let e = follow_stream(s.as_bytes(), &mut Vec::new(), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("ended before"), "{e}");
        let s = "{\"type\":\"error\",\"code\":\"internal\",\"message\":\"agent died\"}\n";
        let e = follow_stream(s.as_bytes(), &mut Vec::new(), &mut Vec::new()).unwrap_err();
        assert_eq!(e.to_string(), "agent died (internal)");
        let e = follow_stream("nope\n".as_bytes(), &mut Vec::new(), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("not JSON"), "{e}");
    }

    #[test]
    fn base_urls_split_into_host_and_prefix() {
        assert_eq!(
            split_base("http://127.0.0.1:7070").unwrap(),
            ("127.0.0.1:7070".to_string(), String::new())
        );
        assert_eq!(
            split_base("http://localhost/moat/").unwrap(),
            ("localhost:80".to_string(), "/moat".to_string())
        );
        assert!(split_base("https://x").is_err());
    }

    #[test]
    fn shell_start_message() {
        let T {
            cmd: super::super::Command::Shell(a),
        } = T::try_parse_from(["moat", "shell", "sbx_1", "-e", "A=1"]).unwrap()
        else {
            panic!()
        };
        let m = start_message(
            &a,
            Some(tty::WinSize {
                rows: 40,
                cols: 120,
            }),
            Some("xterm".into()),
        )
        .unwrap();
        assert_eq!(
            m,
            json!({"type":"start","cmd":["/bin/sh"],"env":{"A":"1","TERM":"xterm"},
                   "pty":{"rows":40,"cols":120}})
        );
        let T {
            cmd: super::super::Command::Shell(a),
        } = T::try_parse_from(["moat", "shell", "sbx_1", "--", "python3", "-i"]).unwrap()
        else {
            panic!()
        };
        let m = start_message(&a, None, Some("xterm".into())).unwrap();
        assert_eq!(m, json!({"type":"start","cmd":["python3","-i"]}));
    }
}
