//! The spawner: a single-threaded child process that starts persistent sandboxes
//! ([`crate::native::spawn`]) for a multi-threaded daemon, which must never fork from its
//! runtime (only the forking thread would exist in the child; locks other threads held would
//! stay held forever).
//!
//! The daemon calls [`Spawner::start`] first thing, before it starts any thread. The child
//! gets `PR_SET_PDEATHSIG(SIGKILL)` (it dies with the daemon; the sandboxes it started do
//! not: their inits have no parent-death signal), ignores `SIGCHLD` (the kernel reaps its
//! inits when they exit), and serves requests over a unix socket pair, one at a time.
//!
//! Wire format, both directions: a 4-byte little-endian length, then that many bytes of JSON
//! (at most [`MAX_MESSAGE`]).
//! - request: `{"policy": <policy>, "socket": "/run/moat/sandboxes/ID/agent.sock"}`, where
//!   `<policy>` has the schema of the TOML policy (deserialized into
//!   [`moat_policy::Policy`] and validated in the spawner);
//! - reply: `{"ok": <Spawned>}` or `{"error": "what went wrong and what to do"}`.

use crate::native::{SpawnRequest, Spawned};
use moat_policy::Policy;
use moat_sys::process as sys;
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Largest request or reply, in bytes.
pub const MAX_MESSAGE: usize = 4 << 20;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest {
    policy: serde_json::Value,
    socket: PathBuf,
    /// The sandbox proxy's CA certificate for the sandbox to trust (`network.ca_pem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_pem: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum WireReply {
    Ok(Spawned),
    Error(String),
}

/// The daemon's handle to its spawner process.
#[derive(Debug)]
pub struct Spawner {
    sock: UnixStream,
    pid: u32,
}

impl Spawner {
    /// Forks the spawner process now. Call it while the process is still single-threaded
    /// (before starting an async runtime); it fails with `Unsupported` otherwise. The
    /// spawner dies with the thread that called this (parent-death signal), so call it from
    /// the main thread.
    pub fn start() -> io::Result<Spawner> {
        let (ours, theirs) = UnixStream::pair()?;
        let parent = std::process::id();
        match sys::fork()? {
            0 => {
                drop(ours);
                let _ = sys::set_parent_death_signal(libc::SIGKILL);
                // The daemon may have died before the line above: then we were reparented.
                if std::os::unix::process::parent_id() != parent {
                    sys::exit_now(0);
                }
                serve(theirs)
            }
            pid => {
                drop(theirs);
                Ok(Spawner {
                    sock: ours,
                    pid: pid as u32,
                })
            }
        }
    }

    /// A handle to a spawner already serving on `sock` (one started with [`serve`] in a
    /// process of its own, e.g. an executed helper), whose pid is `pid`.
    pub fn from_socket(sock: UnixStream, pid: u32) -> Spawner {
        Spawner { sock, pid }
    }

    /// The spawner process's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Starts a persistent sandbox with `policy_json` (the policy's schema, as JSON) whose
    /// agent listens on `socket`; blocks until the agent listens or the start failed. Errors
    /// are messages for a person.
    pub fn spawn(
        &mut self,
        policy_json: &serde_json::Value,
        socket: &Path,
    ) -> Result<Spawned, String> {
        self.spawn_with_ca(policy_json, socket, None)
    }

    /// [`Spawner::spawn`], with the PEM certificate of the sandbox proxy's CA, which the
    /// sandbox then trusts (see `moat_policy::Network::ca_pem`).
    pub fn spawn_with_ca(
        &mut self,
        policy_json: &serde_json::Value,
        socket: &Path,
        ca_pem: Option<&str>,
    ) -> Result<Spawned, String> {
        let request = WireRequest {
            policy: policy_json.clone(),
            socket: socket.to_path_buf(),
            ca_pem: ca_pem.map(str::to_string),
        };
        let gone = |e: io::Error| {
            format!(
                "the sandbox spawner process (pid {}) is not answering ({e}): restart the \
                 daemon",
                self.pid
            )
        };
        let bytes = serde_json::to_vec(&request).map_err(|e| format!("encode the request: {e}"))?;
        write_message(&mut self.sock, &bytes).map_err(gone)?;
        let reply = read_message(&mut self.sock).map_err(gone)?;
        match serde_json::from_slice::<WireReply>(&reply) {
            Ok(WireReply::Ok(spawned)) => Ok(spawned),
            Ok(WireReply::Error(e)) => Err(e),
            Err(e) => Err(format!(
                "the spawner's reply does not parse ({e}): restart the daemon"
            )),
        }
    }
}

/// Serves spawn requests on `sock` until it closes, then exits; never returns. For the
/// spawner process: [`Spawner::start`] calls it in its child, and a helper executable may
/// call it with an inherited socket. The caller must be single-threaded.
pub fn serve(mut sock: UnixStream) -> ! {
    let _ = sys::ignore_signal(libc::SIGCHLD);
    let _ = sys::ignore_signal(libc::SIGPIPE);
    // Keep stdio (for diagnostics) and the socket; the daemon's other fds are not ours.
    let _ = sys::close_fds_except(&[sock.as_raw_fd()]);
    loop {
        let request = match read_message(&mut sock) {
            Ok(r) => r,
            Err(_) => sys::exit_now(0),
        };
        let reply = match handle(&request) {
            Ok(spawned) => WireReply::Ok(spawned),
            Err(e) => WireReply::Error(e),
        };
        let bytes = match serde_json::to_vec(&reply) {
            Ok(b) => b,
            Err(e) => format!(r#"{{"error":"encode the reply: {e}"}}"#).into_bytes(),
        };
        if write_message(&mut sock, &bytes).is_err() {
            sys::exit_now(0);
        }
    }
}

fn handle(request: &[u8]) -> Result<Spawned, String> {
    let request: WireRequest =
        serde_json::from_slice(request).map_err(|e| format!("invalid spawn request: {e}"))?;
    let mut policy: Policy = serde_json::from_value(request.policy)
        .map_err(|e| format!("invalid policy: {e}: use the schema of moat's TOML policy"))?;
    policy.network.ca_pem = request.ca_pem;
    policy.validate().map_err(|e| e.to_string())?;
    crate::spawn_any(&SpawnRequest {
        policy,
        socket: request.socket,
    })
    .map_err(|e| e.to_string())
}

fn write_message(sock: &mut UnixStream, bytes: &[u8]) -> io::Result<()> {
    if bytes.len() > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message of {} bytes is over {MAX_MESSAGE}", bytes.len()),
        ));
    }
    let mut frame = (bytes.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(bytes);
    sock.write_all(&frame)
}

fn read_message(sock: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    sock.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes is over {MAX_MESSAGE}"),
        ));
    }
    let mut buf = vec![0u8; len];
    sock.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_are_bounded() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        write_message(&mut a, b"{\"x\":1}").unwrap();
        assert_eq!(read_message(&mut b).unwrap(), b"{\"x\":1}");
        a.write_all(&(MAX_MESSAGE as u32 + 1).to_le_bytes())
            .unwrap();
        assert!(read_message(&mut b).is_err());
        assert!(write_message(&mut a, &vec![b' '; MAX_MESSAGE + 1]).is_err());
    }

    #[test]
    fn start_refuses_a_multi_threaded_process() {
        // The test harness runs tests on threads of their own.
        let err = Spawner::start().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{err}");
    }

    #[test]
    fn bad_requests_are_errors() {
        assert!(handle(b"not json")
            .unwrap_err()
            .contains("invalid spawn request"));
        let r = br#"{"policy": {"limits": {"bogus": 1}}, "socket": "/x"}"#;
        assert!(handle(r).unwrap_err().contains("invalid policy"));
        let r = br#"{"policy": {}, "socket": "/x", "extra": 1}"#;
        assert!(handle(r).is_err());
    }
}
