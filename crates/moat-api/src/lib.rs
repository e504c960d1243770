//! Wire types shared by every front end of moat (`moat run --json`, the HTTP API, the SDKs).
//!
//! Only data lives here, and the one rule that decides a command's [`Status`]
//! ([`outcome::classify`]): no I/O, no policy logic.

pub mod outcome;

use serde::{Deserialize, Serialize};

/// How a command in a sandbox ended. Never a bare exit code a user must decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The command ran to its end (whatever its exit code) or was killed by a signal it got
    /// from inside the sandbox.
    Ok,
    /// The wall-clock timeout fired; the whole sandbox was killed.
    Timeout,
    /// The sandbox ran out of its memory limit and the kernel's OOM killer fired.
    Oom,
    /// stdout or stderr went over its cap; the whole sandbox was killed.
    OutputLimit,
    /// The sandbox was killed from outside (a signal to `moat run`, a client's request).
    Killed,
    /// A policy check refused the command before or while it ran.
    PolicyDenied,
    /// moat itself could not run the command (bad policy, missing binary, host problem).
    Error,
}

impl Status {
    /// The snake_case name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Timeout => "timeout",
            Status::Oom => "oom",
            Status::OutputLimit => "output_limit",
            Status::Killed => "killed",
            Status::PolicyDenied => "policy_denied",
            Status::Error => "error",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which streams went over their cap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncated {
    pub stdout: bool,
    pub stderr: bool,
}

/// What the sandbox had in force while the command ran: the layers actually reached.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layers {
    /// Isolation tier (`native`).
    pub tier: String,
    /// Landlock ABI version enforced, 0 when Landlock was not in force.
    pub landlock_abi: u32,
    /// Whether the seccomp filter was installed.
    pub seccomp: bool,
    /// `v1`, `v2` or `none` (rootless without delegation, allowed by policy).
    pub cgroup: String,
    /// Limits that were asked for but could not be enforced (allowed by policy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

/// The result of one command: what `moat run --json` prints and the exec API returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Captured stdout, UTF-8 (invalid sequences replaced). Empty when streamed.
    pub stdout: String,
    /// Captured stderr, UTF-8 (invalid sequences replaced). Empty when streamed.
    pub stderr: String,
    /// Exit code when the command exited; `None` when it was killed by a signal.
    pub exit_code: Option<i32>,
    /// The signal that killed the command, if one did.
    pub signal: Option<i32>,
    pub status: Status,
    /// Wall-clock time from sandbox creation to the end of the command.
    pub wall_ms: u64,
    /// User plus system CPU time of the command and the children it waited for.
    pub cpu_ms: u64,
    /// Peak resident set size of the command or its largest waited-for child.
    pub max_rss_kb: u64,
    pub truncated: Truncated,
    /// A human-readable explanation when `status` is not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub sandbox: Layers,
}

impl ExecResult {
    /// The exit code a CLI should exit with: the command's own, 128+N for signal N, and
    /// fixed codes for sandbox-level outcomes (see the README).
    pub fn cli_exit_code(&self) -> i32 {
        match self.status {
            Status::Timeout => 124,
            Status::Error | Status::PolicyDenied => self.exit_code.unwrap_or(125),
            Status::Oom => 137,
            Status::OutputLimit => 141,
            Status::Ok | Status::Killed => match (self.exit_code, self.signal) {
                (Some(c), _) => c,
                (None, Some(s)) => 128 + s,
                (None, None) => 125,
            },
        }
    }
}

/// The error body of every API error: `{"error":{"code":"snake_case","message":"..."}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: Status, exit_code: Option<i32>, signal: Option<i32>) -> ExecResult {
        ExecResult {
            stdout: String::new(),
            stderr: String::new(),
            exit_code,
            signal,
            status,
            wall_ms: 0,
            cpu_ms: 0,
            max_rss_kb: 0,
            truncated: Truncated::default(),
            message: None,
            sandbox: Layers::default(),
        }
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(result(Status::Ok, Some(3), None).cli_exit_code(), 3);
        assert_eq!(result(Status::Ok, None, Some(15)).cli_exit_code(), 143);
        assert_eq!(result(Status::Timeout, None, Some(9)).cli_exit_code(), 124);
        assert_eq!(result(Status::Oom, None, Some(9)).cli_exit_code(), 137);
        assert_eq!(result(Status::Error, Some(127), None).cli_exit_code(), 127);
        assert_eq!(result(Status::Error, None, None).cli_exit_code(), 125);
    }

    #[test]
    fn status_serializes_snake_case() {
        let s = serde_json::to_string(&Status::OutputLimit).unwrap();
        assert_eq!(s, "\"output_limit\"");
        assert_eq!(Status::OutputLimit.as_str(), "output_limit");
    }
}
