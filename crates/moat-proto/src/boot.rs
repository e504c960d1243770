//! What host and sandbox share besides the agent protocol's frames: the fixed paths and ports
//! inside a sandbox, and the typed boot channels that a sandbox's start uses before the agent
//! protocol runs. Every such channel is documented here, once.
//!
//! | channel | direction | carries |
//! |---|---|---|
//! | the gvisor tier's control file ([`GvisorConfig`], at [`GVISOR_CONTROL_DIR`]/[`GVISOR_CONFIG_FILE`]) | host → agent, once, before it starts | the policy and the sandbox CA |
//! | the status line ([`InitReport`]) | init or agent → host, once, one line | `ready` (with the seccomp outcome in the gvisor tier), `error MESSAGE`, or a one-shot workload's `exit ...` / `execfail ...` |
//! | the sync pipe ([`InitSync`]) | host → native init, while it starts | `G` (id maps written), then `C` and the cgroup files to join |

use serde::{Deserialize, Serialize};

/// The loopback port inside the sandbox where workloads reach moat's egress proxy
/// (`allowlist` network mode): HTTP CONNECT, plain HTTP and SOCKS5, relayed to the host.
pub const EGRESS_PORT: u16 = 3128;

/// The sandbox CA's certificate inside the sandbox (network mode `allowlist` with TLS
/// interception).
pub const CA_FILE: &str = "/etc/ssl/moat-ca.crt";
/// The system roots plus the sandbox CA, inside the sandbox.
pub const BUNDLE_FILE: &str = "/etc/ssl/moat-bundle.crt";

/// The environment every process in a sandbox starts with, whoever starts it (`moat run`'s
/// workload, an agent exec, a daemon exec): moat's clean defaults, the proxy variables for
/// network mode `allowlist` (and the CA bundle variables when the sandbox has its own CA),
/// then the policy's `env`, which wins. Nothing of the host's environment.
pub fn base_env(p: &moat_policy::Policy) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), p.fs.workdir.clone()),
        ("USER".into(), "user".into()),
        ("LOGNAME".into(), "user".into()),
        ("HOSTNAME".into(), p.process.hostname.clone()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TMPDIR".into(), "/tmp".into()),
    ];
    if p.network.mode == moat_policy::NetworkMode::Allowlist {
        // Every common client finds the proxy: curl, pip, npm, git, requests, urllib,
        // Node (with a proxy agent), and SOCKS-speaking tools through ALL_PROXY.
        let http = format!("http://127.0.0.1:{EGRESS_PORT}");
        let socks = format!("socks5h://127.0.0.1:{EGRESS_PORT}");
        for (k, v) in [
            ("HTTP_PROXY", &http),
            ("HTTPS_PROXY", &http),
            ("ALL_PROXY", &socks),
        ] {
            env.push((k.into(), v.clone()));
            env.push((k.to_ascii_lowercase(), v.clone()));
        }
        env.push(("NO_PROXY".into(), "localhost,127.0.0.1".into()));
        env.push(("no_proxy".into(), "localhost,127.0.0.1".into()));
        if p.network.ca_pem.is_some() {
            for k in [
                "SSL_CERT_FILE",
                "REQUESTS_CA_BUNDLE",
                "CURL_CA_BUNDLE",
                "PIP_CERT",
            ] {
                env.push((k.into(), BUNDLE_FILE.into()));
            }
            env.push(("NODE_EXTRA_CA_CERTS".into(), CA_FILE.into()));
        }
    }
    for (k, v) in &p.env {
        if let Some(slot) = env.iter_mut().find(|(x, _)| x == k) {
            slot.1 = v.clone();
        } else {
            env.push((k.clone(), v.clone()));
        }
    }
    env
}

/// The hidden first argument that makes the moat binary the gvisor tier's agent.
pub const GVISOR_AGENT_ARG: &str = "__moat-gvisor-agent";
/// Where the agent binary is bound (read-only) inside a gvisor sandbox.
pub const GVISOR_AGENT_PATH: &str = "/.moat-agent";
/// Where a gvisor sandbox's control directory is bound (read-write, root's and 0700: for
/// the agent before it drops to the sandbox user).
pub const GVISOR_CONTROL_DIR: &str = "/.moat";
/// The control file in [`GVISOR_CONTROL_DIR`]: a [`GvisorConfig`] as JSON.
pub const GVISOR_CONFIG_FILE: &str = "policy.json";
/// The agent's listening socket in [`GVISOR_CONTROL_DIR`].
pub const GVISOR_SOCKET_FILE: &str = "agent.sock";
/// Largest control file the agent reads.
pub const GVISOR_CONFIG_MAX: u64 = 4 << 20;

/// What the gvisor tier's agent reads from its control directory: the policy (in the schema
/// of moat's TOML policy, as JSON), and the sandbox CA it must trust, which a policy
/// document never carries (`network.ca_pem`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GvisorConfig {
    pub policy: serde_json::Value,
    pub ca_pem: Option<String>,
}

/// The one line a sandbox's init (native) or agent (gvisor) writes to the host on its
/// status pipe: once when a persistent sandbox's start ends (`Ready` or `Error`), or once when
/// a one-shot run's workload ended (`Exit`, `ExecFail`, or `Error` when setup failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitReport {
    /// The agent listens. `seccomp`: `None` when the tier does not report it (native, where
    /// a refused filter is a start error), `Some(Ok)` when installed, `Some(Err(why))` when
    /// the kernel refused it (gVisor).
    Ready { seccomp: Option<Result<(), String>> },
    /// Setup failed; the message says why.
    Error(String),
    /// The one-shot workload ended: its exit code or signal, CPU time and peak RSS.
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        utime_us: u64,
        stime_us: u64,
        maxrss_kb: u64,
    },
    /// The one-shot workload could not be executed: 127 not found, 126 not executable, 125
    /// anything else, and why.
    ExecFail { code: i32, message: String },
}

impl InitReport {
    /// The line, without its newline (newlines in a message become spaces).
    pub fn encode(&self) -> String {
        let line = match self {
            InitReport::Ready { seccomp: None } => "ready".to_string(),
            InitReport::Ready {
                seccomp: Some(Ok(())),
            } => "ready seccomp".to_string(),
            InitReport::Ready {
                seccomp: Some(Err(e)),
            } => format!("ready noseccomp {e}"),
            InitReport::Error(e) => format!("error {e}"),
            InitReport::Exit {
                code,
                signal,
                utime_us,
                stime_us,
                maxrss_kb,
            } => format!(
                "exit {} {} {utime_us} {stime_us} {maxrss_kb}",
                code.unwrap_or(-1),
                signal.unwrap_or(-1)
            ),
            InitReport::ExecFail { code, message } => format!("execfail {code} {message}"),
        };
        line.replace('\n', " ")
    }

    /// Reads a line as [`InitReport::encode`] writes it; `None` for an empty line (the
    /// process died before it wrote one) or one that is not a report.
    pub fn parse(line: &str) -> Option<InitReport> {
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        match kind {
            "ready" => Some(InitReport::Ready {
                seccomp: match rest {
                    "" => None,
                    "seccomp" => Some(Ok(())),
                    _ => Some(Err(rest.strip_prefix("noseccomp ")?.to_string())),
                },
            }),
            "error" => Some(InitReport::Error(rest.to_string())),
            "exit" => {
                let n: Vec<i64> = rest
                    .split(' ')
                    .map(|w| w.parse().ok())
                    .collect::<Option<_>>()?;
                let [code, signal, utime_us, stime_us, maxrss_kb] = n[..] else {
                    return None;
                };
                let opt = |v: i64| (v >= 0).then_some(v as i32);
                let us = |v: i64| u64::try_from(v).ok();
                Some(InitReport::Exit {
                    code: opt(code),
                    signal: opt(signal),
                    utime_us: us(utime_us)?,
                    stime_us: us(stime_us)?,
                    maxrss_kb: us(maxrss_kb)?,
                })
            }
            "execfail" => {
                let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
                Some(InitReport::ExecFail {
                    code: code.parse().ok()?,
                    message: message.to_string(),
                })
            }
            _ => None,
        }
    }
}

/// What the host writes to a native sandbox's init on its sync pipe while it starts, in this
/// order: `Go` once the id maps are written (init may build its root), then `Cgroup` once the
/// sandbox's cgroup exists (init joins it and enters its root).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitSync {
    /// One byte, `G`.
    Go,
    /// `C`, then the cgroup files init writes `0` to itself to join (cgroup v1; empty when
    /// the host placed it already, or without cgroups) separated by newlines, then a NUL.
    Cgroup { join: Vec<String> },
}

impl InitSync {
    /// The bytes on the pipe.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            InitSync::Go => b"G".to_vec(),
            InitSync::Cgroup { join } => {
                let mut msg = b"C".to_vec();
                msg.extend_from_slice(join.join("\n").as_bytes());
                msg.push(0);
                msg
            }
        }
    }

    /// The `Cgroup` message from the bytes before its NUL; `None` when it is not one.
    pub fn parse_cgroup(bytes: &[u8]) -> Option<InitSync> {
        let files = bytes.strip_prefix(b"C")?;
        let files = std::str::from_utf8(files).ok()?;
        Some(InitSync::Cgroup {
            join: files
                .split('\n')
                .filter(|f| !f.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_reports_round_trip() {
        for r in [
            InitReport::Ready { seccomp: None },
            InitReport::Ready {
                seccomp: Some(Ok(())),
            },
            InitReport::Ready {
                seccomp: Some(Err("invalid argument".into())),
            },
            InitReport::Error("mount /proc: permission denied".into()),
            InitReport::Exit {
                code: Some(3),
                signal: None,
                utime_us: 10,
                stime_us: 20,
                maxrss_kb: 1024,
            },
            InitReport::Exit {
                code: None,
                signal: Some(9),
                utime_us: 0,
                stime_us: 0,
                maxrss_kb: 0,
            },
            InitReport::ExecFail {
                code: 127,
                message: "command not found in the sandbox: nope".into(),
            },
        ] {
            assert_eq!(InitReport::parse(&r.encode()), Some(r));
        }
    }

    #[test]
    fn a_report_is_one_line() {
        assert_eq!(
            InitReport::Error("two\nlines".into()).encode(),
            "error two lines"
        );
    }

    #[test]
    fn a_missing_or_odd_line_is_no_report() {
        for line in [
            "",
            "readyish",
            "ready nonsense",
            "exit 1 2",
            "exit a b c d e",
            "execfail x y",
        ] {
            assert_eq!(InitReport::parse(line), None, "{line}");
        }
    }

    #[test]
    fn init_sync_messages() {
        assert_eq!(InitSync::Go.encode(), b"G");
        let c = InitSync::Cgroup {
            join: vec!["/sys/fs/cgroup/pids/moat/x/tasks".into(), "/b".into()],
        };
        let bytes = c.encode();
        assert_eq!(bytes.last(), Some(&0));
        assert_eq!(InitSync::parse_cgroup(&bytes[..bytes.len() - 1]), Some(c));
        assert_eq!(
            InitSync::parse_cgroup(b"C"),
            Some(InitSync::Cgroup { join: vec![] })
        );
        assert_eq!(InitSync::parse_cgroup(b"X"), None);
    }
}
