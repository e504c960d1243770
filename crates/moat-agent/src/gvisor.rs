//! The gvisor tier's agent: what `moat __moat-gvisor-agent` runs as PID 1 inside gVisor. It
//! reads its [`boot::GvisorConfig`] from the control directory, listens on the agent socket
//! there, drops to the sandbox user (keeping a real and saved uid of its own, see
//! [`agent_real_uid`]), installs the seccomp filter and serves the agent protocol.

use crate::exec::ExecEnv;
use moat_policy::Policy;
use moat_proto::boot::{self, InitReport};
use moat_sys::process as sys;
use moat_sys::seccomp::SockFilter;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

fn report(status: &InitReport) {
    let mut l = status.encode();
    l.push('\n');
    let _ = sys::write_all(1, l.as_bytes());
}

/// The agent of a gvisor sandbox: what `moat __moat-gvisor-agent` runs, as PID 1 inside
/// gVisor (moat starts it; run by hand it refuses). Reports `ready` or `error ...` on its
/// stdout, then serves the agent protocol forever.
pub fn main(prog: &'static [SockFilter]) -> ! {
    match agent_setup(prog) {
        Ok((listener, sigfd, env, seccomp_err)) => {
            report(&InitReport::Ready {
                seccomp: Some(seccomp_err.map_or(Ok(()), Err)),
            });
            if let Ok(null) = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                for fd in 0..3 {
                    let _ = sys::dup2(null.as_raw_fd(), fd);
                }
            }
            crate::serve::serve(listener, sigfd, env)
        }
        Err(e) => {
            report(&InitReport::Error(e));
            sys::exit_now(125)
        }
    }
}

/// The agent's real and saved uid inside gVisor: one no workload runs as (65533, or 65532
/// when the workload is 65533).
pub fn agent_real_uid(workload_uid: u32) -> u32 {
    if workload_uid == 65533 {
        65532
    } else {
        65533
    }
}

type AgentParts = (OwnedFd, OwnedFd, ExecEnv<'static>, Option<String>);

fn agent_setup(prog: &'static [SockFilter]) -> Result<AgentParts, String> {
    if std::process::id() != 1
        || !Path::new(boot::GVISOR_CONTROL_DIR)
            .join(boot::GVISOR_CONFIG_FILE)
            .is_file()
    {
        return Err(format!(
            "`{}` is the gvisor tier's agent: moat starts it as PID 1 of a gVisor \
             sandbox; it is not for running by hand",
            boot::GVISOR_AGENT_ARG
        ));
    }
    let ctx = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
    let _ = sys::setsid();
    let policy_path = Path::new(boot::GVISOR_CONTROL_DIR).join(boot::GVISOR_CONFIG_FILE);
    let meta = fs::metadata(&policy_path).map_err(ctx("read the policy"))?;
    if meta.len() > boot::GVISOR_CONFIG_MAX {
        return Err("the policy file is too large".into());
    }
    let text = fs::read(&policy_path).map_err(ctx("read the policy"))?;
    let config: boot::GvisorConfig =
        serde_json::from_slice(&text).map_err(|e| format!("parse the policy: {e}"))?;
    let mut policy: Policy =
        serde_json::from_value(config.policy).map_err(|e| format!("parse the policy: {e}"))?;
    policy.network.ca_pem = config.ca_pem;
    policy.validate().map_err(|e| e.to_string())?;
    let policy: &'static Policy = Box::leak(Box::new(policy));

    // The socket: a real host socket made by the gofer (--host-uds=create), 0600 from the
    // umask (gVisor refuses chmod on it).
    let sock = Path::new(boot::GVISOR_CONTROL_DIR).join(boot::GVISOR_SOCKET_FILE);
    let _ = fs::remove_file(&sock);
    let old = moat_sys::fs::umask(0o177);
    let listener = UnixListener::bind(&sock).map_err(ctx("listen on the agent socket"));
    moat_sys::fs::umask(old);
    let listener = listener?;
    listener
        .set_nonblocking(true)
        .map_err(ctx("listen on the agent socket"))?;
    // The control directory stays mounted (detaching it would disconnect the gofer's host
    // socket from the listener); it is root's and 0700, so once the agent is the sandbox
    // user neither it nor the workload can enter it.
    moat_sys::fs::umask(0o022);

    sys::block_signals(&crate::INIT_SIGNALS).map_err(ctx("block signals"))?;
    let sigfd = sys::signalfd(&crate::INIT_SIGNALS).map_err(ctx("signalfd"))?;

    // Become the sandbox user, as the native tier's agent does: no capabilities (bounding set
    // emptied first), no new privileges, not dumpable, the seccomp filter. gVisor does not
    // shield PID 1 from its own namespace's signals as Linux does, so the agent keeps a real
    // and saved uid of its own ([`agent_real_uid`]): it acts on files as the sandbox user,
    // and the workload cannot kill or stop it.
    moat_sys::caps::drop_bounding_and_ambient().map_err(ctx("drop the bounding set"))?;
    moat_sys::caps::clear_ambient().map_err(ctx("clear ambient capabilities"))?;
    let (uid, gid) = (policy.process.uid, policy.process.gid);
    sys::set_ids_apart(agent_real_uid(uid), uid, gid).map_err(ctx("set uid/gid"))?;
    moat_sys::caps::clear_all().map_err(ctx("clear capabilities"))?;
    sys::set_no_new_privs().map_err(ctx("no_new_privs"))?;
    sys::set_not_dumpable().map_err(ctx("not dumpable"))?;
    let seccomp_err = moat_sys::seccomp::install(prog)
        .err()
        .map(|e| e.to_string());
    let env = ExecEnv {
        policy,
        landlock_abi: 0,
        prog,
        ruleset: None,
        // The agent runs under the filter and its processes inherit it (or, when gVisor
        // refused it, no process can install it either: the layers say so).
        seccomp_inherited: true,
    };
    Ok((OwnedFd::from(listener), sigfd, env, seccomp_err))
}
