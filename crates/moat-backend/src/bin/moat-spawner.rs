//! `moat-spawner`: the sandbox spawner ([`moat_backend::spawner`]) as a program of its own,
//! serving on its stdin, which must be one end of a unix socket pair. For a daemon that
//! cannot fork before its threads start (it executes this instead and wraps its end in
//! `Spawner::from_socket`), and for moat-backend's tests, whose harness is multi-threaded.
//! It exits when the socket closes.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

fn main() {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == moat_backend::gvisor::AGENT_ARG)
    {
        moat_agent::gvisor::main(moat_backend::seccomp_prog::DEFAULT_PROGRAM)
    }
    let fd = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("moat-spawner: stdin: {e}: run it with a unix socket as stdin");
            std::process::exit(2);
        }
    };
    moat_backend::spawner::serve(UnixStream::from(fd))
}
