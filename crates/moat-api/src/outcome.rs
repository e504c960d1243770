//! The one outcome classifier: how every path that runs a command (`moat run`'s forked
//! workload, `moat run` through the agent, an exec through the daemon) turns what it saw into
//! a [`Status`], an exit code, a signal and a message, with the same words everywhere.

use crate::Status;

/// SIGKILL (9 on every Linux architecture).
pub const SIGKILL: i32 = 9;

/// What a runner saw when a command ended. Every field defaults to "did not happen".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ending {
    /// The command's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// The timeout that fired, in milliseconds.
    pub timed_out_ms: Option<u64>,
    /// The output cap (bytes per stream) that a stream went over.
    pub output_over: Option<u64>,
    /// The egress proxy ended the sandbox for too many denied connections.
    pub egress_killed: bool,
    /// The sandbox's OOM count rose while the command ran; its memory limit in bytes.
    pub oom_with_limit: Option<u64>,
    /// The runner (init or agent) went away without reporting: what the OOM killer taking
    /// it looks like.
    pub runner_lost: bool,
    /// moat itself got this signal and stopped the sandbox.
    pub moat_signal: Option<i32>,
    /// A client cancelled the command.
    pub cancelled: bool,
}

/// What a user sees of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Why, whenever the status is not `ok`.
    pub message: Option<String>,
}

/// What a limit's firing kills: the whole sandbox (a one-shot `moat run`) or the command
/// alone (an exec in a persistent sandbox).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Sandbox,
    Command,
}

impl Scope {
    fn killed(self) -> &'static str {
        match self {
            Scope::Sandbox => "the sandbox was killed",
            Scope::Command => "the command was killed",
        }
    }
}

/// Decides how a command ended, in this order: timeout, output cap, egress denials, out of
/// memory (the OOM count rose and the command died by SIGKILL or its runner went away), moat
/// stopped by a signal, a client's cancel; otherwise `ok` with the command's own exit code or
/// signal.
pub fn classify(e: &Ending, scope: Scope) -> Outcome {
    let mut o = Outcome {
        status: Status::Ok,
        exit_code: e.exit_code,
        signal: e.signal,
        message: None,
    };
    let (status, message) = if let Some(ms) = e.timed_out_ms {
        (
            Status::Timeout,
            format!(
                "the command ran past its {ms} ms timeout; {}",
                scope.killed()
            ),
        )
    } else if let Some(cap) = e.output_over {
        (
            Status::OutputLimit,
            format!("output went over the {cap} byte cap; {}", scope.killed()),
        )
    } else if e.egress_killed {
        (
            Status::PolicyDenied,
            "the sandbox was killed after too many denied connections".to_string(),
        )
    } else if let (Some(limit), true) =
        (e.oom_with_limit, e.signal == Some(SIGKILL) || e.runner_lost)
    {
        o.exit_code = None;
        o.signal = Some(SIGKILL);
        (
            Status::Oom,
            format!(
                "the sandbox ran out of its {} MiB memory limit and the kernel killed the command",
                limit >> 20
            ),
        )
    } else if let Some(sig) = e.moat_signal {
        (
            Status::Killed,
            format!("moat got signal {sig} and stopped the sandbox"),
        )
    } else if e.cancelled {
        (Status::Killed, "the command was killed".to_string())
    } else {
        return o;
    };
    o.status = status;
    o.message = Some(message);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_exit_is_ok() {
        let o = classify(
            &Ending {
                exit_code: Some(3),
                ..Ending::default()
            },
            Scope::Sandbox,
        );
        assert_eq!(
            o,
            Outcome {
                status: Status::Ok,
                exit_code: Some(3),
                signal: None,
                message: None
            }
        );
        // A signal from inside the sandbox is still the command's own ending.
        let o = classify(
            &Ending {
                signal: Some(15),
                ..Ending::default()
            },
            Scope::Command,
        );
        assert_eq!((o.status, o.signal), (Status::Ok, Some(15)));
    }

    #[test]
    fn the_order_of_causes() {
        let all = Ending {
            signal: Some(SIGKILL),
            timed_out_ms: Some(2000),
            output_over: Some(1 << 20),
            egress_killed: true,
            oom_with_limit: Some(64 << 20),
            moat_signal: Some(2),
            cancelled: true,
            ..Ending::default()
        };
        let o = classify(&all, Scope::Sandbox);
        assert_eq!(o.status, Status::Timeout);
        assert_eq!(
            o.message.as_deref(),
            Some("the command ran past its 2000 ms timeout; the sandbox was killed")
        );
        let o = classify(
            &Ending {
                timed_out_ms: None,
                ..all.clone()
            },
            Scope::Command,
        );
        assert_eq!(
            (o.status, o.message.as_deref()),
            (
                Status::OutputLimit,
                Some("output went over the 1048576 byte cap; the command was killed")
            )
        );
        let rest = Ending {
            timed_out_ms: None,
            output_over: None,
            ..all.clone()
        };
        assert_eq!(classify(&rest, Scope::Sandbox).status, Status::PolicyDenied);
        let rest = Ending {
            egress_killed: false,
            ..rest
        };
        let o = classify(&rest, Scope::Sandbox);
        assert_eq!(
            (o.status, o.exit_code, o.signal),
            (Status::Oom, None, Some(SIGKILL))
        );
        assert_eq!(
            o.message.as_deref(),
            Some(
                "the sandbox ran out of its 64 MiB memory limit and the kernel killed the command"
            )
        );
        let rest = Ending {
            oom_with_limit: None,
            ..rest
        };
        assert_eq!(
            classify(&rest, Scope::Sandbox).message.as_deref(),
            Some("moat got signal 2 and stopped the sandbox")
        );
        let rest = Ending {
            moat_signal: None,
            ..rest
        };
        assert_eq!(classify(&rest, Scope::Command).status, Status::Killed);
    }

    #[test]
    fn an_oom_count_alone_is_not_an_oom() {
        // The OOM killer took some other process; the command exited by itself.
        let o = classify(
            &Ending {
                exit_code: Some(0),
                oom_with_limit: Some(64 << 20),
                ..Ending::default()
            },
            Scope::Command,
        );
        assert_eq!(o.status, Status::Ok);
        // Its runner lost: that is the OOM killer's work.
        let o = classify(
            &Ending {
                oom_with_limit: Some(64 << 20),
                runner_lost: true,
                ..Ending::default()
            },
            Scope::Sandbox,
        );
        assert_eq!(o.status, Status::Oom);
    }
}
