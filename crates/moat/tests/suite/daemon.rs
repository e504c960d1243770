//! A real `moat serve` for end-to-end tests: a fresh state directory and port, inside a
//! fence (its sandboxes' cgroups nest under it), torn down with everything it started.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::harness::{moat_bin, scratch_dir, Fence};

pub struct Daemon {
    pub url: String,
    pub port: u16,
    pub key: String,
    pub state: PathBuf,
    child: Option<Child>,
    fence: Fence,
    agent: ureq::Agent,
    /// Extra `moat serve` arguments (egress settings, say).
    extra: Vec<String>,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("addr").port()
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// An HTTP answer: status and body.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The API error code.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {}", self.text()))
            .to_string()
    }
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// A daemon started with these extra `moat serve` arguments.
    pub fn start_with(extra: &[&str]) -> Daemon {
        let state = scratch_dir("serve");
        let mut d = Daemon {
            url: String::new(),
            port: free_port(),
            key: String::new(),
            state,
            child: None,
            fence: Fence::new(),
            agent: agent(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.url = format!("http://127.0.0.1:{}", d.port);
        d.launch();
        d.key = std::fs::read_to_string(d.state.join("admin.key"))
            .expect("moat serve writes STATE_DIR/admin.key")
            .trim()
            .to_string();
        d
    }

    fn launch(&mut self) {
        let mut script = self.fence.prefix();
        script.push_str("exec \"$0\" \"$@\"");
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg(moat_bin())
            .args(["serve", "--listen"])
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--state-dir")
            .arg(&self.state)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log_file())
            .spawn()
            .expect("spawn moat serve");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(r) = self.agent.get(format!("{}/v1/health", self.url)).call() {
                if r.status() == 200 {
                    return;
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("moat serve exited at start ({st}): {}", self.log());
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "moat serve did not answer /v1/health within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's stderr goes to a file (a pipe nobody reads would block it).
    fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the daemon's log file")
    }

    fn log_path(&self) -> PathBuf {
        let mut p = self.state.clone().into_os_string();
        p.push(".log");
        PathBuf::from(p)
    }

    /// What the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `kill -9` of the daemon (its sandboxes keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and the daemon's exit status once it has stopped.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("the daemon runs");
        let _ = moat_sys::process::kill(c.id() as i32, libc::SIGTERM);
        c.wait().expect("wait for moat serve")
    }

    /// Prometheus `/metrics` sample `name` (with its labels), when there is one.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = self.api("GET", "/metrics", None).text();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// A new daemon on the same state directory and port.
    pub fn restart(&mut self) {
        self.kill9();
        self.launch();
    }

    pub fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let url = format!("{}{}", self.url, path);
        let auth = key.map(|k| format!("Bearer {k}"));
        let resp = match body {
            Some(b) => {
                let mut r = match method {
                    "POST" => self.agent.post(&url),
                    "PUT" => self.agent.put(&url),
                    "PATCH" => self.agent.patch(&url),
                    m => panic!("method {m} with a body"),
                };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                r.send(b)
            }
            None => {
                let mut r = match method {
                    "GET" => self.agent.get(&url),
                    "DELETE" => self.agent.delete(&url),
                    "POST" => {
                        let mut r = self.agent.post(&url);
                        if let Some(a) = &auth {
                            r = r.header("Authorization", a);
                        }
                        for (k, v) in headers {
                            r = r.header(*k, *v);
                        }
                        return answer(r.send_empty());
                    }
                    m => panic!("method {m}"),
                };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                r.call()
            }
        };
        answer(resp)
    }

    /// A JSON call with the admin key.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.api_as(&self.key.clone(), method, path, body)
    }

    pub fn api_as(&self, key: &str, method: &str, path: &str, body: Option<Value>) -> Answer {
        let b = body.map(|v| v.to_string().into_bytes());
        self.call(
            method,
            path,
            Some(key),
            b.as_deref(),
            &[("Content-Type", "application/json")],
        )
    }

    /// Creates a sandbox and returns its id.
    pub fn create(&self, body: Value) -> String {
        let a = self.api("POST", "/v1/sandboxes", Some(body));
        assert_eq!(a.status, 201, "create: {}", a.text());
        a.json()["id"].as_str().expect("id").to_string()
    }

    /// Runs a shell command line, returns the result object.
    pub fn sh(&self, id: &str, line: &str) -> Value {
        let a = self.api(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(serde_json::json!({"shell": line})),
        );
        assert_eq!(a.status, 200, "exec: {}", a.text());
        a.json()
    }

    /// A new API key (not admin) made with `moat key create`.
    pub fn new_key(&self, name: &str) -> String {
        let out = Command::new(moat_bin())
            .args(["key", "create", "--name", name, "--state-dir"])
            .arg(&self.state)
            .output()
            .expect("moat key create");
        assert!(
            out.status.success(),
            "moat key create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .find(|w| w.starts_with("moat_key_"))
            .unwrap_or_else(|| panic!("no key secret in `moat key create` output: {text}"))
            .to_string()
    }

    /// Revokes the key named `name` with `moat key ls` and `moat key revoke`.
    pub fn revoke_key(&self, name: &str) {
        let out = Command::new(moat_bin())
            .args(["key", "ls", "--json", "--state-dir"])
            .arg(&self.state)
            .output()
            .expect("moat key ls");
        let keys: Value = serde_json::from_slice(&out.stdout).expect("moat key ls --json");
        let id = keys
            .as_array()
            .or_else(|| keys["keys"].as_array())
            .and_then(|ks| ks.iter().find(|k| k["name"] == name))
            .and_then(|k| k["id"].as_str())
            .unwrap_or_else(|| panic!("no key named {name}: {keys}"))
            .to_string();
        let st = Command::new(moat_bin())
            .args(["key", "revoke", &id, "--state-dir"])
            .arg(&self.state)
            .status()
            .expect("moat key revoke");
        assert!(st.success(), "moat key revoke {id}");
    }

    pub fn fence_dirs(&self) -> Vec<PathBuf> {
        self.fence.paths()
    }

    /// Sandbox cgroups still under the fence, once the daemon's off-path cleanup had up to
    /// `within` to remove them.
    pub fn cgroups_left(&self, within: Duration) -> Vec<PathBuf> {
        let start = Instant::now();
        loop {
            let mut left = Vec::new();
            for dir in self.fence.paths() {
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for e in rd.flatten() {
                        if e.path().is_dir() {
                            left.push(e.path());
                        }
                    }
                }
            }
            if left.is_empty() || start.elapsed() > within {
                return left;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn answer(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut resp = resp.unwrap_or_else(|e| panic!("HTTP call failed: {e}"));
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(2 << 30)
        .read_to_vec()
        .unwrap_or_default();
    Answer { status, body }
}

/// Every process and cgroup under `dir` (a fence), killed and removed, deepest first.
fn sweep(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                sweep(&e.path());
            }
        }
    }
    let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
    let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
    for f in ["cgroup.procs", "tasks"] {
        if let Ok(s) = std::fs::read_to_string(dir.join(f)) {
            for pid in s.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = moat_sys::process::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn rmdirs(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                rmdirs(&e.path());
                let start = Instant::now();
                while std::fs::remove_dir(e.path()).is_err()
                    && start.elapsed() < Duration::from_secs(3)
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Sandboxes outlive the daemon by design: delete them through the API first, then
        // kill whatever is left in the fence.
        // Without panicking: a panic here, while a failed test unwinds, would abort the run
        // and hide the test's own message.
        let running = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if running {
            let auth = format!("Bearer {}", self.key);
            let list = self
                .agent
                .get(format!("{}/v1/sandboxes", self.url))
                .header("Authorization", &auth)
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .and_then(|t| serde_json::from_str::<Value>(&t).ok());
            let ids: Vec<String> = list
                .as_ref()
                .and_then(|l| l["sandboxes"].as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s["id"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            for id in ids {
                let _ = self
                    .agent
                    .delete(format!("{}/v1/sandboxes/{id}", self.url))
                    .header("Authorization", &auth)
                    .call();
            }
        }
        self.kill9();
        for d in self.fence.paths() {
            // Thaw a frozen (paused) sandbox so that its processes can die.
            sweep(&d);
            rmdirs(&d);
        }
        let _ = std::fs::remove_dir_all(&self.state);
        let _ = std::fs::remove_file(self.log_path());
    }
}
