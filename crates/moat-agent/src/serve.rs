//! The agent: what a persistent sandbox's init becomes once its root is entered and it has
//! dropped to the sandbox user's credentials (the native tier's init in `moat-backend`, or [`crate::gvisor::main`]). One
//! single-threaded `poll` loop serves up to [`MAX_CONNS`] host connections on the listening
//! socket it inherited, one [`AgentConn`] each, and every request of the protocol
//! ([`moat_proto`]).
//!
//! Every path a request names is resolved by the kernel in the agent's own mount namespace,
//! with the sandbox user's uid, under the sandbox's Landlock ruleset and seccomp filter:
//! there is no host path resolution anywhere, so a symlink planted in the sandbox can only
//! reach the sandbox's own files, and the agent can write only where the workload can.
//!
//! Processes: every exec is forked from the agent and prepared exactly like `moat run`'s
//! workload ([`Workload`]: own session, rlimits, environment, working directory, only fds
//! 0-2, Landlock, seccomp). Foreground execs stream to their stream and die (SIGKILL to the
//! process group) when their connection closes; background ones keep running, their last
//! [`RETAINED_OUTPUT`] bytes of stdout and stderr retained for `proc_output`. Being PID 1 of
//! the pid namespace, the agent reaps every orphan, and the workload cannot kill it.
//!
//! Nothing the host sends can make the agent panic or stop: a protocol violation closes that
//! connection only.

use crate::conn::{pump, AgentConn, Event, OUTPUT_BOUND};
use crate::exec::{read_to_end, ExecEnv, Workload};
use moat_proto::msg::Status;
use moat_proto::msg::{MAX_PATH, MAX_PROCS, MAX_PROC_ARGV_BYTES, RETAINED_OUTPUT};
use moat_proto::{
    Channel, Entry, EntryKind, ErrorCode, ProcInfo, PtySize, Request, Response, DEFAULT_MAX_PAYLOAD,
};
use moat_sys::process::{self as sys, ExitInfo};
use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Most host connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNS: usize = 64;
/// Finished background processes remembered (the most recent ones).
pub const MAX_FINISHED: usize = 256;
/// Most retained output kept for finished background processes together; the oldest are
/// forgotten first beyond it (the agent's memory counts against the sandbox's limit).
pub const MAX_FINISHED_RETAINED: usize = 64 << 20;
/// The loopback port inside the sandbox where workloads reach moat's egress proxy.
pub use moat_proto::boot::EGRESS_PORT;
/// Workload connections to the egress port waiting for the host to take them; more are
/// closed at once (the workload sees a reset).
const MAX_RELAY_BACKLOG: usize = 64;
/// Bytes buffered per direction of one relayed connection.
const RELAY_BUF: usize = 64 << 10;
/// Largest Data payload the agent sends.
const CHUNK: usize = DEFAULT_MAX_PAYLOAD;
/// Most bytes read from one pipe per turn of the loop.
const PIPE_READ: usize = 64 << 10;
/// Most bytes drained from a process's pipes once it has exited (a leftover child may keep
/// writing into them).
const FINAL_DRAIN: usize = 4 << 20;
/// Responses are kept this far under the payload limit.
const RESPONSE_ROOM: usize = DEFAULT_MAX_PAYLOAD - (16 << 10);
/// Most directory entries `list_dir` looks at before it answers `truncated`.
const MAX_VISITED: usize = 200_000;

/// Runs the agent; never returns.
pub fn serve(listener: OwnedFd, sigfd: OwnedFd, env: ExecEnv<'_>) -> ! {
    // Writing to a pipe or socket whose reader is gone must be an error, not our death.
    let _ = sys::ignore_signal(libc::SIGPIPE);
    // Connections and process pipes are fds; the children get the policy's limit anyway.
    let _ = sys::raise_nofile();
    let listener = UnixListener::from(listener);
    let _ = listener.set_nonblocking(true);
    let devnull = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/null");
    let mut agent = Agent {
        env,
        listener,
        sigfd,
        devnull: devnull.ok().map(OwnedFd::from),
        conns: BTreeMap::new(),
        next_conn: 1,
        procs: BTreeMap::new(),
        finished: VecDeque::new(),
        buf: vec![0u8; CHUNK],
        tmp_seq: 0,
        busy: false,
        accept_paused_until: None,
        trim: false,
        egress: None,
        relay_backlog: VecDeque::new(),
        relay_waiters: VecDeque::new(),
        relays: BTreeMap::new(),
        next_relay: 1,
        lifetime_ends_ms: None,
    };
    if agent.env.policy.network.mode == moat_policy::NetworkMode::Allowlist {
        // Bound before the first request: no workload runs yet that could take the port.
        agent.egress = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, EGRESS_PORT))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .ok();
    }
    // What the start left on the heap (the spawner's request, the root's paths) is free
    // now: an idle agent should hold only what it uses.
    sys::release_free_memory();
    loop {
        agent.turn();
    }
}

/// The output retained for one channel of a background process: the last
/// [`RETAINED_OUTPUT`] bytes, and how many came before them.
#[derive(Default)]
struct Ring {
    buf: VecDeque<u8>,
    dropped: u64,
}

impl Ring {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend(bytes);
        if self.buf.len() > RETAINED_OUTPUT {
            let excess = self.buf.len() - RETAINED_OUTPUT;
            self.buf.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    fn end(&self) -> u64 {
        self.dropped + self.buf.len() as u64
    }

    /// Up to `max` bytes from position `pos` (moved up to what is still retained).
    fn read_from(&self, pos: &mut u64, max: usize) -> Vec<u8> {
        if *pos < self.dropped {
            *pos = self.dropped;
        }
        let start = ((*pos - self.dropped) as usize).min(self.buf.len());
        let n = (self.buf.len().saturating_sub(start)).min(max);
        let out: Vec<u8> = self.buf.range(start..start + n).copied().collect();
        *pos += n as u64;
        out
    }
}

/// A `proc_stdin` stream writing to a background process.
struct Waiter {
    conn: u64,
    stream: u32,
    close: bool,
    eof: bool,
}

/// A process the agent started.
struct Proc {
    argv: Vec<String>,
    /// The connection of its `Exec`; `None` once that connection closed.
    conn: Option<u64>,
    stream: u32,
    background: bool,
    pty: bool,
    /// Where its stdin goes: a pipe, or the pty master.
    input: Option<OwnedFd>,
    pending: Vec<u8>,
    /// Close `input` once `pending` is written.
    close_input: bool,
    waiter: Option<Waiter>,
    /// Read ends: stdout and stderr, or the pty master and nothing.
    out: [Option<OwnedFd>; 2],
    /// A foreground exec's Eof sent, per channel.
    eof_sent: [bool; 2],
    rings: [Ring; 2],
    deadline: Option<Instant>,
    timed_out: bool,
    cancelled: bool,
    exit: Option<ExitInfo>,
    started_ms: u64,
    finished_ms: Option<u64>,
}

impl Proc {
    fn status(&self) -> Status {
        if self.timed_out {
            Status::Timeout
        } else if self.cancelled {
            Status::Killed
        } else {
            Status::Ok
        }
    }

    fn exit_response(&self) -> Response {
        let exit = self.exit.unwrap_or_default();
        Response::Exit {
            exit_code: exit.code,
            signal: exit.signal,
            status: self.status(),
        }
    }

    fn retained(&self) -> usize {
        self.rings[0].buf.len() + self.rings[1].buf.len()
    }
}

/// A file transfer in progress on a stream.
enum FileOp {
    Read {
        file: File,
        bytes: u64,
    },
    Write {
        file: File,
        tmp: PathBuf,
        dst: PathBuf,
        mode: u32,
        bytes: u64,
    },
}

/// A `proc_output` stream.
struct Follower {
    pid: i32,
    follow: bool,
    pos: [u64; 2],
}

struct Conn {
    sock: UnixStream,
    proto: AgentConn,
    files: BTreeMap<u32, FileOp>,
    outputs: BTreeMap<u32, Follower>,
    /// Close at the end of this turn (violation, host gone, write error).
    dead: bool,
    /// This connection asked for a relay (`Relay`) on that stream and waits for a
    /// workload connection.
    relay_wait: Option<u32>,
    /// Paired with this workload connection: once `Relayed` is written, the connection
    /// becomes a raw relay.
    relay_to: Option<TcpStream>,
}

/// A workload's TCP connection to the egress port, relayed raw over a host connection.
struct RelayPipe {
    tcp: TcpStream,
    host: UnixStream,
    /// Workload to host, and what of it is written.
    up: Vec<u8>,
    up_off: usize,
    /// Host to workload.
    down: Vec<u8>,
    down_off: usize,
    tcp_eof: bool,
    host_eof: bool,
    up_shut: bool,
    down_shut: bool,
}

impl RelayPipe {
    /// Moves what it can both ways without blocking; false once the relay is over.
    fn pump(&mut self) -> bool {
        loop {
            let mut moved = false;
            match step(
                &mut self.tcp,
                &mut self.host,
                &mut self.up,
                &mut self.up_off,
                &mut self.tcp_eof,
            ) {
                Ok(m) => moved |= m,
                Err(()) => return false,
            }
            match step(
                &mut self.host,
                &mut self.tcp,
                &mut self.down,
                &mut self.down_off,
                &mut self.host_eof,
            ) {
                Ok(m) => moved |= m,
                Err(()) => return false,
            }
            if self.tcp_eof && self.up_off == self.up.len() && !self.up_shut {
                let _ = self.host.shutdown(Shutdown::Write);
                self.up_shut = true;
            }
            if self.host_eof && self.down_off == self.down.len() && !self.down_shut {
                let _ = self.tcp.shutdown(Shutdown::Write);
                self.down_shut = true;
            }
            if self.up_shut && self.down_shut {
                return false;
            }
            if !moved {
                return true;
            }
        }
    }

    fn events(&self) -> (i16, i16) {
        let (mut tcp, mut host) = (0, 0);
        if self.up_off == self.up.len() && !self.tcp_eof {
            tcp |= libc::POLLIN;
        }
        if self.up_off < self.up.len() {
            host |= libc::POLLOUT;
        }
        if self.down_off == self.down.len() && !self.host_eof {
            host |= libc::POLLIN;
        }
        if self.down_off < self.down.len() {
            tcp |= libc::POLLOUT;
        }
        (tcp, host)
    }
}

/// One direction of a relay: refills `buf` from `from` when it is empty, writes it to
/// `to`. Ok(true) when bytes moved or EOF was seen; Err when either side failed.
fn step(
    from: &mut impl Read,
    to: &mut impl Write,
    buf: &mut Vec<u8>,
    off: &mut usize,
    eof: &mut bool,
) -> Result<bool, ()> {
    let mut moved = false;
    if *off == buf.len() && !*eof {
        buf.resize(RELAY_BUF, 0);
        match from.read(buf) {
            Ok(0) => {
                buf.clear();
                *off = 0;
                *eof = true;
                moved = true;
            }
            Ok(n) => {
                buf.truncate(n);
                *off = 0;
                moved = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf.clear();
                *off = 0;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                buf.clear();
                *off = 0;
                moved = true;
            }
            Err(_) => return Err(()),
        }
    }
    while *off < buf.len() {
        match to.write(&buf[*off..]) {
            Ok(0) => return Err(()),
            Ok(n) => {
                *off += n;
                moved = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    if *off == buf.len() && buf.capacity() > 0 && *eof {
        *buf = Vec::new();
        *off = 0;
    }
    Ok(moved)
}

#[derive(Clone, Copy)]
enum Token {
    Listener,
    Signal,
    Conn(u64),
    Out(i32, usize),
    In(i32),
    Egress,
    Relay(u64),
}

struct Agent<'a> {
    env: ExecEnv<'a>,
    listener: UnixListener,
    sigfd: OwnedFd,
    devnull: Option<OwnedFd>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    procs: BTreeMap<i32, Proc>,
    /// Finished background processes, oldest first.
    finished: VecDeque<i32>,
    buf: Vec<u8>,
    tmp_seq: u64,
    /// Work is left that needs no event (a file to read on, output to send).
    busy: bool,
    /// After an accept error (out of fds, memory), the listener rests a little instead of
    /// waking the loop at once again.
    accept_paused_until: Option<Instant>,
    /// A connection or process went, and with it its buffers: give free memory back to the
    /// kernel at the end of this turn (after the answers are written).
    trim: bool,
    /// The egress port's listener (`allowlist` network mode only).
    egress: Option<TcpListener>,
    /// Workload connections to the egress port that no host relay took yet.
    relay_backlog: VecDeque<TcpStream>,
    /// Host connections waiting for a workload connection (`Relay`), oldest first.
    relay_waiters: VecDeque<u64>,
    relays: BTreeMap<u64, RelayPipe>,
    next_relay: u64,
    /// When the sandbox's lifetime ends (ms since the Unix epoch), from `SetDeadline`: then
    /// the agent ends the sandbox ([`Agent::end_of_life`]), daemon or no daemon.
    lifetime_ends_ms: Option<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn io_error(what: &str, path: &str, e: &io::Error) -> Response {
    Response::error(ErrorCode::from_io(e.kind()), format!("{what} {path}: {e}"))
}

impl Agent<'_> {
    fn turn(&mut self) {
        // At the top of a turn: the answer to a `SetDeadline` already past went out at the end
        // of the last one.
        if self.lifetime_ends_ms.is_some_and(|end| now_ms() >= end) {
            self.end_of_life();
        }
        let mut fds: Vec<(RawFd, i16)> = Vec::new();
        let mut tokens: Vec<Token> = Vec::new();
        let now = Instant::now();
        let accepting = self.accept_paused_until.is_none_or(|t| now >= t);
        fds.push((
            if accepting {
                self.listener.as_raw_fd()
            } else {
                -1
            },
            libc::POLLIN,
        ));
        tokens.push(Token::Listener);
        fds.push((self.sigfd.as_raw_fd(), libc::POLLIN));
        tokens.push(Token::Signal);
        if let (Some(l), true) = (&self.egress, self.relay_backlog.len() < MAX_RELAY_BACKLOG) {
            fds.push((l.as_raw_fd(), libc::POLLIN));
            tokens.push(Token::Egress);
        }
        for (&id, r) in &self.relays {
            let (tcp, host) = r.events();
            fds.push((r.tcp.as_raw_fd(), tcp));
            tokens.push(Token::Relay(id));
            fds.push((r.host.as_raw_fd(), host));
            tokens.push(Token::Relay(id));
        }
        for (&id, c) in &self.conns {
            let mut ev = 0;
            // A connection paired with a relay reads nothing more as frames.
            if self.stdin_queued(id) <= OUTPUT_BOUND && c.relay_to.is_none() {
                ev |= libc::POLLIN;
            }
            if !c.proto.output().is_empty() {
                ev |= libc::POLLOUT;
            }
            fds.push((c.sock.as_raw_fd(), ev));
            tokens.push(Token::Conn(id));
        }
        for (&pid, p) in &self.procs {
            // A foreground process's output waits while its connection is backed up; a
            // background one's always goes into its rings.
            let reading = p.background
                || match p.conn.and_then(|c| self.conns.get(&c)) {
                    Some(c) => !c.proto.is_backed_up(),
                    None => true,
                };
            for (i, fd) in p.out.iter().enumerate() {
                if let (Some(fd), true) = (fd, reading) {
                    fds.push((fd.as_raw_fd(), libc::POLLIN));
                    tokens.push(Token::Out(pid, i));
                }
            }
            if let (Some(fd), false) = (&p.input, p.pending.is_empty()) {
                fds.push((fd.as_raw_fd(), libc::POLLOUT));
                tokens.push(Token::In(pid));
            }
        }
        let mut timeout = if self.busy {
            0
        } else {
            self.next_deadline_ms()
        };
        if let Some(t) = self.accept_paused_until {
            let left = t.saturating_duration_since(now).as_millis() as i32 + 1;
            timeout = if timeout < 0 { left } else { timeout.min(left) };
        }
        let rev = match sys::poll(&fds, timeout) {
            Ok(r) => r,
            Err(_) => {
                // ENOMEM or the like: wait a little rather than spin.
                let _ = sys::poll(&[], 10);
                vec![0; fds.len()]
            }
        };
        for (i, tok) in tokens.iter().enumerate() {
            let r = rev.get(i).copied().unwrap_or(0);
            if r == 0 {
                continue;
            }
            match *tok {
                Token::Listener => self.accept(),
                Token::Signal => self.reap(),
                Token::Conn(id) => self.pump_conn(id),
                Token::Out(pid, ch) => {
                    self.read_output(pid, ch, PIPE_READ);
                }
                Token::In(pid) => self.write_input(pid),
                Token::Egress => self.accept_egress(),
                Token::Relay(id) => {
                    if let Some(r) = self.relays.get_mut(&id) {
                        if !r.pump() {
                            self.relays.remove(&id);
                            self.trim = true;
                        }
                    }
                }
            }
        }
        self.pair_relays();
        self.check_deadlines();
        self.busy = false;
        self.progress();
        self.flush_all();
        if std::mem::take(&mut self.trim) {
            sys::release_free_memory();
        }
    }

    /// Stdin bytes queued for processes on behalf of connection `id`.
    fn stdin_queued(&self, id: u64) -> usize {
        self.procs
            .values()
            .filter(|p| p.conn == Some(id) || p.waiter.as_ref().is_some_and(|w| w.conn == id))
            .map(|p| p.pending.len())
            .sum()
    }

    /// The sandbox's lifetime is over: every process in it is killed, then the agent, PID 1,
    /// exits, and the kernel tears the pid namespace down (gVisor ends the sandbox). The host
    /// finds a dead init and cleans up what is left outside (cgroup, socket directory).
    fn end_of_life(&mut self) -> ! {
        // kill(-1): every process this one may signal, itself excepted: the whole sandbox.
        let _ = sys::kill(-1, libc::SIGKILL);
        sys::exit_now(0)
    }

    fn next_deadline_ms(&self) -> i32 {
        let lifetime = self
            .lifetime_ends_ms
            .map(|end| end.saturating_sub(now_ms()).min(i32::MAX as u64 - 1) as i32 + 1);
        let procs = self.next_proc_deadline_ms();
        match (lifetime, procs) {
            (Some(l), p) if p < 0 => l,
            (Some(l), p) => l.min(p),
            (None, p) => p,
        }
    }

    fn next_proc_deadline_ms(&self) -> i32 {
        let now = Instant::now();
        self.procs
            .values()
            .filter(|p| p.exit.is_none() && !p.timed_out)
            .filter_map(|p| p.deadline)
            .map(|d| {
                d.saturating_duration_since(now)
                    .as_millis()
                    .min(i32::MAX as u128 - 1) as i32
                    + 1
            })
            .min()
            .unwrap_or(-1)
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((sock, _)) => {
                    if self.conns.len() >= MAX_CONNS || sock.set_nonblocking(true).is_err() {
                        drop(sock);
                        continue;
                    }
                    let id = self.next_conn;
                    self.next_conn += 1;
                    self.conns.insert(
                        id,
                        Conn {
                            sock,
                            proto: AgentConn::new(),
                            files: BTreeMap::new(),
                            outputs: BTreeMap::new(),
                            dead: false,
                            relay_wait: None,
                            relay_to: None,
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_paused_until = None;
                    return;
                }
                // EMFILE, ENOMEM, a peer gone before accept: try again a little later.
                Err(_) => {
                    self.accept_paused_until =
                        Some(Instant::now() + std::time::Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    fn pump_conn(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.dead {
            return;
        }
        let pumped = match pump(&mut c.proto, &mut c.sock) {
            Ok(p) => p,
            Err(_) => {
                c.dead = true;
                return;
            }
        };
        for event in pumped.events {
            self.event(id, event);
        }
        if pumped.closed {
            if let Some(c) = self.conns.get_mut(&id) {
                c.dead = true;
            }
        }
    }

    fn respond(&mut self, conn: u64, stream: u32, response: &Response) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.proto.respond(stream, response).is_err() {
                c.dead = true;
            }
        }
    }

    fn data(&mut self, conn: u64, stream: u32, channel: Channel, bytes: &[u8]) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.proto.data(stream, channel, bytes).is_err() {
                c.dead = true;
            }
        }
    }

    fn eof(&mut self, conn: u64, stream: u32, channel: Channel) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.proto.eof(stream, channel).is_err() {
                c.dead = true;
            }
        }
    }

    fn event(&mut self, conn: u64, event: Event) {
        match event {
            Event::Request { stream, request } => self.request(conn, stream, request),
            Event::Stdin { stream, data } => self.stdin(conn, stream, &data),
            Event::StdinEof { stream } => self.stdin_eof(conn, stream),
            Event::Cancel { stream } => self.cancel(conn, stream),
        }
    }

    fn request(&mut self, conn: u64, stream: u32, request: Request) {
        let response = Some(match request {
            Request::Exec {
                argv,
                env,
                cwd,
                stdin,
                pty,
                timeout_ms,
                background,
            } => {
                let spec = ExecSpec {
                    argv,
                    env,
                    cwd,
                    stdin,
                    pty,
                    timeout_ms,
                    background,
                };
                self.exec(conn, stream, spec)
            }
            Request::Signal {
                stream: target,
                signal,
            } => {
                let pid = self
                    .procs
                    .iter()
                    .find(|(_, p)| p.conn == Some(conn) && p.stream == target && p.exit.is_none())
                    .map(|(&pid, _)| pid);
                match pid {
                    Some(pid) => signal_group(pid, signal),
                    None => Response::error(
                        ErrorCode::NotFound,
                        format!("no running process was started on stream {target}"),
                    ),
                }
            }
            Request::Resize {
                stream: target,
                rows,
                cols,
            } => self.resize(conn, target, rows, cols),
            Request::ReadFile { path } => self.read_file(conn, stream, &path),
            Request::WriteFile {
                path,
                mode,
                create_parents,
            } => match self.write_file(conn, stream, &path, mode, create_parents) {
                Some(r) => r,
                // FileDone (or Error) comes at the host's Eof.
                None => return,
            },
            Request::ListDir { path, depth } => list_dir(&path, depth),
            Request::Stat { path } => match fs::symlink_metadata(&path) {
                Ok(m) => Response::StatResult(entry(path, &m)),
                Err(e) => io_error("stat", &path, &e),
            },
            Request::Mkdir { path, parents } => {
                let r = fs::DirBuilder::new()
                    .recursive(parents)
                    .mode(0o755)
                    .create(&path);
                match r {
                    Ok(()) => Response::Ok {},
                    Err(e) => io_error("mkdir", &path, &e),
                }
            }
            Request::Remove { path, recursive } => remove(&path, recursive),
            Request::Rename { from, to } => match fs::rename(&from, &to) {
                Ok(()) => Response::Ok {},
                Err(e) => Response::error(
                    ErrorCode::from_io(e.kind()),
                    format!("rename {from} to {to}: {e}"),
                ),
            },
            Request::Metrics {} => metrics(),
            Request::Procs {} => self.proc_list(),
            Request::ProcOutput { pid, follow } => self.proc_output(conn, stream, pid, follow),
            Request::ProcStdin { pid, close } => match self.proc_stdin(conn, stream, pid, close) {
                Some(r) => r,
                // Ok comes once the bytes up to the host's Eof are written.
                None => return,
            },
            Request::Relay {} => match self.relay_request(conn, stream) {
                Some(r) => r,
                // Relayed comes with the next workload connection.
                None => return,
            },
            Request::SetDeadline { expires_at_ms } => {
                self.lifetime_ends_ms = expires_at_ms;
                Response::Ok {}
            }
            Request::SignalPid { pid, signal } => {
                let pid = pid as i32;
                match self.procs.get(&pid) {
                    Some(p) if p.exit.is_none() => signal_group(pid, signal),
                    _ => Response::error(
                        ErrorCode::NotFound,
                        format!("no running process {pid} was started by the agent"),
                    ),
                }
            }
        });
        if let Some(r) = response {
            self.respond(conn, stream, &r);
        }
    }

    fn resize(&mut self, conn: u64, target: u32, rows: u16, cols: u16) -> Response {
        let Some(p) = self
            .procs
            .values()
            .find(|p| p.conn == Some(conn) && p.stream == target && p.exit.is_none())
        else {
            return Response::error(
                ErrorCode::NotFound,
                format!("no running process was started on stream {target}"),
            );
        };
        let fd = match (&p.input, &p.out[0], p.pty) {
            (Some(fd), _, true) | (None, Some(fd), true) => fd.as_raw_fd(),
            _ => {
                return Response::error(
                    ErrorCode::InvalidRequest,
                    format!("the process of stream {target} has no terminal to resize"),
                )
            }
        };
        match sys::set_window_size(fd, rows, cols) {
            Ok(()) => Response::Ok {},
            Err(e) => Response::error(ErrorCode::Internal, format!("resize the terminal: {e}")),
        }
    }

    fn exec(&mut self, conn: u64, stream: u32, spec: ExecSpec) -> Response {
        let plumbing = match self.plumbing(&spec) {
            Ok(p) => p,
            Err(e) => {
                return Response::error(
                    ErrorCode::from_io(e.kind()),
                    format!("set up the process's stdio: {e}"),
                )
            }
        };
        let (xe_r, xe_w) = match sys::pipe() {
            Ok(p) => p,
            Err(e) => return Response::error(ErrorCode::Internal, format!("pipe: {e}")),
        };
        let pid = match sys::fork() {
            Ok(0) => {
                let w = Workload {
                    env: self.env,
                    argv: &spec.argv,
                    extra_env: &spec.env,
                    cwd: spec.cwd.as_deref(),
                    // The agent has no capabilities: its groups were cleared when it dropped
                    // to the sandbox user.
                    set_groups: false,
                    stdin: plumbing.child[0].as_raw_fd(),
                    stdout: plumbing.child[1].as_raw_fd(),
                    stderr: plumbing.child[2].as_raw_fd(),
                    ctty: spec.pty.is_some(),
                    xe_w: xe_w.as_raw_fd(),
                };
                w.exec()
            }
            Ok(pid) => pid,
            Err(e) => {
                return Response::error(
                    if e.raw_os_error() == Some(libc::EAGAIN) {
                        ErrorCode::Busy
                    } else {
                        ErrorCode::Internal
                    },
                    format!("fork: {e} (the sandbox may be at its process limit)"),
                )
            }
        };
        let Plumbing { child, input, out } = plumbing;
        drop((child, xe_w));
        // Closed by a successful exec; a failure is "code\tmessage" (see Workload).
        let exec_error = read_to_end(xe_r.as_raw_fd());
        drop(xe_r);
        if !exec_error.is_empty() {
            let _ = sys::wait4(pid, libc::__WALL);
            let text = String::from_utf8_lossy(&exec_error).into_owned();
            let (code, msg) = text.split_once('\t').unwrap_or(("125", text.as_str()));
            let code = match code {
                "127" => ErrorCode::NotFound,
                "126" => ErrorCode::PermissionDenied,
                _ => ErrorCode::Internal,
            };
            return Response::error(code, msg);
        }
        let proc = Proc {
            argv: spec.argv,
            conn: Some(conn),
            stream,
            background: spec.background,
            pty: spec.pty.is_some(),
            input,
            pending: Vec::new(),
            close_input: false,
            waiter: None,
            out,
            eof_sent: [false, spec.pty.is_some()],
            rings: [Ring::default(), Ring::default()],
            // A deadline past what an Instant can hold is no deadline.
            deadline: spec
                .timeout_ms
                .and_then(|ms| Instant::now().checked_add(std::time::Duration::from_millis(ms))),
            timed_out: false,
            cancelled: false,
            exit: None,
            started_ms: now_ms(),
            finished_ms: None,
        };
        self.procs.insert(pid, proc);
        Response::Started { pid: pid as u32 }
    }

    fn plumbing(&self, spec: &ExecSpec) -> io::Result<Plumbing> {
        let null = || -> io::Result<OwnedFd> {
            match &self.devnull {
                Some(fd) => fd.try_clone(),
                None => Err(io::Error::new(io::ErrorKind::NotFound, "no /dev/null")),
            }
        };
        if let Some(PtySize { rows, cols }) = spec.pty {
            let (master, peer, _) = sys::open_pty("/dev/pts/ptmx")?;
            sys::set_window_size(master.as_raw_fd(), rows, cols)?;
            sys::set_nonblocking(master.as_raw_fd(), true)?;
            let input = if spec.stdin {
                Some(master.try_clone()?)
            } else {
                None
            };
            let child = [peer.try_clone()?, peer.try_clone()?, peer];
            return Ok(Plumbing {
                child,
                input,
                out: [Some(master), None],
            });
        }
        let (child_in, input) = if spec.stdin {
            let (r, w) = sys::pipe()?;
            sys::set_nonblocking(w.as_raw_fd(), true)?;
            (r, Some(w))
        } else {
            (null()?, None)
        };
        let (out_r, out_w) = sys::pipe()?;
        let (err_r, err_w) = sys::pipe()?;
        sys::set_nonblocking(out_r.as_raw_fd(), true)?;
        sys::set_nonblocking(err_r.as_raw_fd(), true)?;
        Ok(Plumbing {
            child: [child_in, out_w, err_w],
            input,
            out: [Some(out_r), Some(err_r)],
        })
    }

    /// Reads up to `max` bytes of channel `ch` of `pid`: to its stream (foreground), into its
    /// rings (background), or nowhere (a foreground process whose connection is gone).
    fn read_output(&mut self, pid: i32, ch: usize, max: usize) -> bool {
        let Some(p) = self.procs.get_mut(&pid) else {
            return false;
        };
        let Some(fd) = p
            .out
            .get(ch)
            .and_then(|f| f.as_ref())
            .map(|f| f.as_raw_fd())
        else {
            return false;
        };
        let mut got = 0usize;
        let mut ended = false;
        let mut chunk = Vec::new();
        while got < max {
            let want = (max - got).min(self.buf.len());
            match sys::read(fd, &mut self.buf[..want]) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => {
                    got += n;
                    chunk.extend_from_slice(&self.buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // EIO: a pty whose terminal side is closed everywhere.
                Err(_) => {
                    ended = true;
                    break;
                }
            }
        }
        let channel = if ch == 0 {
            Channel::Stdout
        } else {
            Channel::Stderr
        };
        let (conn, stream, background) = (p.conn, p.stream, p.background);
        if background {
            p.rings[ch].push(&chunk);
        }
        if ended {
            p.out[ch] = None;
        }
        let send_eof = ended && !background && !p.eof_sent[ch];
        if send_eof {
            p.eof_sent[ch] = true;
        }
        if !background {
            if let Some(conn) = conn {
                if !chunk.is_empty() {
                    self.data(conn, stream, channel, &chunk);
                }
                if send_eof {
                    self.eof(conn, stream, channel);
                }
            }
        }
        ended || got >= max
    }

    fn write_input(&mut self, pid: i32) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        let Some(fd) = p.input.as_ref().map(|f| f.as_raw_fd()) else {
            p.pending.clear();
            return;
        };
        while !p.pending.is_empty() {
            match sys::write(fd, &p.pending) {
                Ok(n) => {
                    p.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // The process closed its stdin (or exited): drop what is left.
                    p.pending.clear();
                    p.input = None;
                    let waiter = p.waiter.take();
                    if let Some(w) = waiter {
                        self.respond(
                            w.conn,
                            w.stream,
                            &Response::error(
                                ErrorCode::InvalidRequest,
                                format!("process {pid} closed its stdin"),
                            ),
                        );
                    }
                    return;
                }
            }
        }
        if p.pending.is_empty() && p.close_input {
            p.input = None;
        }
    }

    fn stdin(&mut self, conn: u64, stream: u32, data: &[u8]) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if let Some(FileOp::Write { file, bytes, .. }) = c.files.get_mut(&stream) {
                if let Err(e) = file.write_all(data) {
                    let path = match c.files.remove(&stream) {
                        Some(FileOp::Write { tmp, dst, .. }) => {
                            let _ = fs::remove_file(&tmp);
                            dst.display().to_string()
                        }
                        _ => String::new(),
                    };
                    self.respond(conn, stream, &io_error("write", &path, &e));
                } else {
                    *bytes += data.len() as u64;
                }
                return;
            }
        }
        let target = self.procs.iter_mut().find(|(_, p)| {
            (p.conn == Some(conn) && p.stream == stream && !p.background)
                || p.waiter
                    .as_ref()
                    .is_some_and(|w| w.conn == conn && w.stream == stream && !w.eof)
        });
        if let Some((&pid, p)) = target {
            if p.input.is_some() && !p.close_input {
                p.pending.extend_from_slice(data);
                self.write_input(pid);
            }
        }
    }

    fn stdin_eof(&mut self, conn: u64, stream: u32) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if let Some(FileOp::Write { .. }) = c.files.get(&stream) {
                if let Some(FileOp::Write {
                    file,
                    tmp,
                    dst,
                    mode,
                    bytes,
                }) = c.files.remove(&stream)
                {
                    let r = finish_write(file, &tmp, &dst, mode, bytes);
                    self.respond(conn, stream, &r);
                }
                return;
            }
        }
        let target = self.procs.iter_mut().find(|(_, p)| {
            (p.conn == Some(conn) && p.stream == stream && !p.background)
                || p.waiter
                    .as_ref()
                    .is_some_and(|w| w.conn == conn && w.stream == stream)
        });
        if let Some((&pid, p)) = target {
            match &mut p.waiter {
                Some(w) if w.conn == conn && w.stream == stream => {
                    w.eof = true;
                    if w.close {
                        p.close_input = true;
                    }
                }
                _ => {
                    if p.pty {
                        // A pty's master stays open (it is also the output): end of stdin is
                        // the terminal's end-of-file character, as typing Ctrl-D.
                        if p.input.is_some() {
                            p.pending.push(0x04);
                        }
                    } else {
                        p.close_input = true;
                    }
                }
            }
            self.write_input(pid);
        }
    }

    fn cancel(&mut self, conn: u64, stream: u32) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if let Some(op) = c.files.remove(&stream) {
                if let FileOp::Write { tmp, .. } = op {
                    let _ = fs::remove_file(tmp);
                }
                self.respond(
                    conn,
                    stream,
                    &Response::error(ErrorCode::Cancelled, "cancelled by the host"),
                );
                return;
            }
            if c.outputs.remove(&stream).is_some() {
                self.respond(conn, stream, &Response::Ok {});
                return;
            }
        }
        let mut cancelled_waiter = false;
        for (&pid, p) in self.procs.iter_mut() {
            if p.conn == Some(conn) && p.stream == stream && !p.background && p.exit.is_none() {
                p.cancelled = true;
                let _ = sys::kill_group(pid, libc::SIGKILL);
                let _ = sys::kill(pid, libc::SIGKILL);
                return;
            }
            if p.waiter
                .as_ref()
                .is_some_and(|w| w.conn == conn && w.stream == stream)
            {
                p.waiter = None;
                cancelled_waiter = true;
                break;
            }
        }
        if cancelled_waiter {
            self.respond(
                conn,
                stream,
                &Response::error(ErrorCode::Cancelled, "cancelled by the host"),
            );
        }
    }

    fn read_file(&mut self, conn: u64, stream: u32, path: &str) -> Response {
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => f,
            Err(e) => return io_error("open", path, &e),
        };
        match file.metadata() {
            Ok(m) if m.is_dir() => {
                return Response::error(
                    ErrorCode::IsADirectory,
                    format!("{path} is a directory: use list_dir"),
                )
            }
            Ok(m) if !m.is_file() => {
                return Response::error(
                    ErrorCode::InvalidRequest,
                    format!("{path} is not a regular file (a device, fifo or socket)"),
                )
            }
            Ok(_) => {}
            Err(e) => return io_error("stat", path, &e),
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.files.insert(stream, FileOp::Read { file, bytes: 0 });
        }
        self.busy = true;
        Response::Started { pid: 0 }
    }

    fn write_file(
        &mut self,
        conn: u64,
        stream: u32,
        path: &str,
        mode: Option<u32>,
        create_parents: bool,
    ) -> Option<Response> {
        let dst = PathBuf::from(path);
        let (Some(parent), Some(_)) = (dst.parent(), dst.file_name()) else {
            return Some(Response::error(
                ErrorCode::InvalidRequest,
                format!("{path} names no file: give a path such as /work/file.txt"),
            ));
        };
        if create_parents {
            if let Err(e) = fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
            {
                return Some(io_error("create the parent directories of", path, &e));
            }
        }
        let mode = match fs::symlink_metadata(&dst) {
            Ok(m) if m.is_dir() => {
                return Some(Response::error(
                    ErrorCode::IsADirectory,
                    format!("{path} is a directory"),
                ))
            }
            Ok(m) if m.is_file() => mode.unwrap_or(m.mode() & 0o7777),
            _ => mode.unwrap_or(0o644),
        };
        self.tmp_seq += 1;
        let tmp = parent.join(format!(
            ".moat-write-{}-{}-{}",
            std::process::id(),
            now_ms(),
            self.tmp_seq
        ));
        let file = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(f) => f,
            Err(e) => return Some(io_error("create a file beside", path, &e)),
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.files.insert(
                stream,
                FileOp::Write {
                    file,
                    tmp,
                    dst,
                    mode,
                    bytes: 0,
                },
            );
        } else {
            let _ = fs::remove_file(&tmp);
        }
        None
    }

    fn proc_list(&self) -> Response {
        let mut procs: Vec<ProcInfo> = self
            .procs
            .iter()
            .filter(|(_, p)| p.background)
            .map(|(&pid, p)| ProcInfo {
                pid: pid as u32,
                argv: cut_argv(&p.argv),
                running: p.exit.is_none(),
                exit_code: p.exit.and_then(|e| e.code),
                signal: p.exit.and_then(|e| e.signal),
                status: p.exit.map(|_| p.status()),
                started_ms: p.started_ms,
                finished_ms: p.finished_ms.filter(|_| p.exit.is_some()),
            })
            .collect();
        // Running ones first, then the finished ones from the most recent: what a cut for
        // size drops is the oldest finished.
        procs.sort_by_key(|p| (!p.running, p.finished_ms.map(std::cmp::Reverse), p.pid));
        procs.truncate(MAX_PROCS);
        loop {
            let response = Response::ProcList {
                procs: procs.clone(),
            };
            let size = serde_json::to_vec(&response).map_or(usize::MAX, |v| v.len());
            if size <= RESPONSE_ROOM || procs.is_empty() {
                let mut procs = procs;
                procs.sort_by_key(|p| p.pid);
                return Response::ProcList { procs };
            }
            let keep = procs.len() * 3 / 4;
            procs.truncate(keep);
        }
    }

    fn proc_output(&mut self, conn: u64, stream: u32, pid: u32, follow: bool) -> Response {
        let key = pid as i32;
        match self.procs.get(&key) {
            Some(p) if p.background => {
                let pos = [p.rings[0].dropped, p.rings[1].dropped];
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.outputs.insert(
                        stream,
                        Follower {
                            pid: key,
                            follow,
                            pos,
                        },
                    );
                }
                self.busy = true;
                Response::Started { pid }
            }
            Some(_) => Response::error(
                ErrorCode::InvalidRequest,
                format!("process {pid} runs in the foreground: its output goes to its stream"),
            ),
            None => Response::error(
                ErrorCode::NotFound,
                format!("no background process {pid} (finished ones are kept: the last 256)"),
            ),
        }
    }

    fn proc_stdin(&mut self, conn: u64, stream: u32, pid: u32, close: bool) -> Option<Response> {
        let key = pid as i32;
        let Some(p) = self.procs.get_mut(&key).filter(|p| p.background) else {
            return Some(Response::error(
                ErrorCode::NotFound,
                format!("no background process {pid}"),
            ));
        };
        if p.input.is_none() || p.close_input || p.exit.is_some() {
            return Some(Response::error(
                ErrorCode::InvalidRequest,
                format!(
                    "process {pid} has no open stdin pipe: start it with stdin: true, and do \
                     not close it before the last write"
                ),
            ));
        }
        if p.waiter.is_some() {
            return Some(Response::error(
                ErrorCode::Busy,
                format!("another proc_stdin is writing to process {pid}: wait for its answer"),
            ));
        }
        p.waiter = Some(Waiter {
            conn,
            stream,
            close,
            eof: false,
        });
        None
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        for (&pid, p) in self.procs.iter_mut() {
            if p.exit.is_none() && !p.timed_out && p.deadline.is_some_and(|d| now >= d) {
                p.timed_out = true;
                let _ = sys::kill_group(pid, libc::SIGKILL);
                let _ = sys::kill(pid, libc::SIGKILL);
            }
        }
    }

    fn reap(&mut self) {
        while let Ok(Some(_)) = sys::read_signalfd(self.sigfd.as_raw_fd()) {}
        while let Ok(Some(info)) = sys::wait4(-1, libc::WNOHANG | libc::__WALL) {
            if self.procs.contains_key(&info.pid) {
                self.exited(info);
            }
        }
    }

    /// A process of ours ended: take what its pipes still hold, then finish its stream
    /// (foreground) or keep it as finished (background).
    fn exited(&mut self, info: ExitInfo) {
        let pid = info.pid;
        for ch in 0..2 {
            let mut drained = 0;
            while drained < FINAL_DRAIN {
                let open = self.procs.get(&pid).is_some_and(|p| p.out[ch].is_some());
                if !open {
                    break;
                }
                let more = self.read_output(pid, ch, PIPE_READ);
                drained += PIPE_READ;
                if !more {
                    break;
                }
            }
        }
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        p.exit = Some(info);
        p.finished_ms = Some(now_ms());
        p.out = [None, None];
        p.input = None;
        // A proc_stdin whose bytes all went in before the exit succeeded.
        let written = p.pending.is_empty();
        p.pending.clear();
        let waiter = p.waiter.take();
        if let Some(w) = waiter {
            let response = if w.eof && written {
                Response::Ok {}
            } else {
                Response::error(
                    ErrorCode::InvalidRequest,
                    format!("process {pid} exited before its stdin was written"),
                )
            };
            self.respond(w.conn, w.stream, &response);
        }
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        if p.background {
            for ring in &mut p.rings {
                ring.buf.shrink_to_fit();
            }
            self.finished.push_back(pid);
            self.forget_old();
            self.busy = true;
            return;
        }
        let Some(p) = self.procs.remove(&pid) else {
            return;
        };
        self.trim = true;
        if let Some(conn) = p.conn {
            for (ch, channel) in [(0, Channel::Stdout), (1, Channel::Stderr)] {
                if !p.eof_sent[ch] {
                    self.eof(conn, p.stream, channel);
                }
            }
            self.respond(conn, p.stream, &p.exit_response());
        }
    }

    /// Forgets the oldest finished background processes beyond [`MAX_FINISHED`] (or the
    /// retained-output budget), except those a `proc_output` is still sending.
    fn forget_old(&mut self) {
        loop {
            let retained: usize = self
                .finished
                .iter()
                .filter_map(|pid| self.procs.get(pid))
                .map(Proc::retained)
                .sum();
            if self.finished.len() <= MAX_FINISHED && retained <= MAX_FINISHED_RETAINED {
                return;
            }
            let followed = |pid: i32| {
                self.conns
                    .values()
                    .any(|c| c.outputs.values().any(|f| f.pid == pid))
            };
            let Some(idx) = self.finished.iter().position(|&pid| !followed(pid)) else {
                return;
            };
            if let Some(pid) = self.finished.remove(idx) {
                self.procs.remove(&pid);
                self.trim = true;
            }
        }
    }

    /// Work that needs no event: file reads, `proc_output` streams, `proc_stdin` answers.
    fn progress(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.progress_files(id);
            self.progress_outputs(id);
        }
        let done: Vec<(i32, u64, u32)> = self
            .procs
            .iter()
            .filter_map(|(&pid, p)| {
                let w = p.waiter.as_ref()?;
                (w.eof && p.pending.is_empty()).then_some((pid, w.conn, w.stream))
            })
            .collect();
        for (pid, conn, stream) in done {
            if let Some(p) = self.procs.get_mut(&pid) {
                p.waiter = None;
                if p.close_input {
                    p.input = None;
                }
            }
            self.respond(conn, stream, &Response::Ok {});
        }
    }

    fn progress_files(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let streams: Vec<u32> = c
            .files
            .iter()
            .filter(|(_, op)| matches!(op, FileOp::Read { .. }))
            .map(|(&s, _)| s)
            .collect();
        for stream in streams {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if c.proto.is_backed_up() || c.dead {
                return;
            }
            let Some(FileOp::Read { file, bytes }) = c.files.get_mut(&stream) else {
                continue;
            };
            match file.read(&mut self.buf) {
                Ok(0) => {
                    let total = *bytes;
                    c.files.remove(&stream);
                    self.eof(id, stream, Channel::Stdout);
                    self.respond(id, stream, &Response::FileDone { bytes: total });
                }
                Ok(n) => {
                    *bytes += n as u64;
                    if c.proto
                        .data(stream, Channel::Stdout, &self.buf[..n])
                        .is_err()
                    {
                        c.dead = true;
                    }
                    self.busy = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.busy = true,
                Err(e) => {
                    c.files.remove(&stream);
                    self.respond(id, stream, &io_error("read", "the file", &e));
                }
            }
        }
    }

    fn progress_outputs(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let streams: Vec<u32> = c.outputs.keys().copied().collect();
        for stream in streams {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if c.proto.is_backed_up() || c.dead {
                return;
            }
            let Some(f) = c.outputs.get_mut(&stream) else {
                continue;
            };
            let Some(p) = self.procs.get(&f.pid) else {
                // Forgotten (never while followed); end the stream plainly.
                c.outputs.remove(&stream);
                let _ = c.proto.eof(stream, Channel::Stdout);
                let _ = c.proto.eof(stream, Channel::Stderr);
                let _ = c.proto.respond(stream, &Response::Ok {});
                continue;
            };
            for (ch, channel) in [(0, Channel::Stdout), (1, Channel::Stderr)] {
                let bytes = p.rings[ch].read_from(&mut f.pos[ch], CHUNK);
                if !bytes.is_empty() {
                    self.busy = true;
                    if c.proto.data(stream, channel, &bytes).is_err() {
                        c.dead = true;
                    }
                }
            }
            let caught_up = f.pos[0] == p.rings[0].end() && f.pos[1] == p.rings[1].end();
            let ended = p.exit.is_some();
            if caught_up && (ended || !f.follow) {
                let final_response = if ended {
                    p.exit_response()
                } else {
                    Response::Ok {}
                };
                c.outputs.remove(&stream);
                let ok = c.proto.eof(stream, Channel::Stdout).is_ok()
                    && c.proto.eof(stream, Channel::Stderr).is_ok()
                    && c.proto.respond(stream, &final_response).is_ok();
                if !ok {
                    c.dead = true;
                }
            }
        }
    }

    /// Writes what is queued to each connection; closes the dead ones.
    fn flush_all(&mut self) {
        let mut dead = Vec::new();
        let mut relayed = Vec::new();
        for (&id, c) in self.conns.iter_mut() {
            let backed_up = c.proto.is_backed_up();
            while !c.dead && !c.proto.output().is_empty() {
                match c.sock.write(c.proto.output()) {
                    Ok(0) => c.dead = true,
                    Ok(n) => c.proto.consume(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => c.dead = true,
                }
            }
            if backed_up && !c.dead && !c.proto.is_backed_up() {
                // A file being read waits while its connection is backed up, and no poll
                // event wakes it: go round again at once rather than sleep with the
                // connection drained (a stalled download).
                self.busy = true;
            }
            if c.dead {
                dead.push(id);
            } else if c.relay_to.is_some() && c.proto.output().is_empty() {
                relayed.push(id);
            }
        }
        for id in dead {
            self.close_conn(id);
        }
        // `Relayed` is out: from here the connection carries the workload's raw bytes.
        for id in relayed {
            let Some(mut c) = self.conns.remove(&id) else {
                continue;
            };
            let Some(tcp) = c.relay_to.take() else {
                continue;
            };
            let rid = self.next_relay;
            self.next_relay += 1;
            let mut pipe = RelayPipe {
                tcp,
                host: c.sock,
                up: Vec::new(),
                up_off: 0,
                down: Vec::new(),
                down_off: 0,
                tcp_eof: false,
                host_eof: false,
                up_shut: false,
                down_shut: false,
            };
            if pipe.pump() {
                self.relays.insert(rid, pipe);
            }
        }
    }

    /// A `Relay` request: the sandbox must have an egress port, and the request must be
    /// the connection's only business.
    fn relay_request(&mut self, conn: u64, stream: u32) -> Option<Response> {
        if self.egress.is_none() {
            return Some(Response::error(
                ErrorCode::InvalidRequest,
                "this sandbox has no egress port: its network mode is not `allowlist`",
            ));
        }
        let busy = self.procs.values().any(|p| p.conn == Some(conn))
            || self.conns.get(&conn).is_some_and(|c| {
                !c.files.is_empty() || !c.outputs.is_empty() || c.relay_wait.is_some()
            });
        if busy {
            return Some(Response::error(
                ErrorCode::InvalidRequest,
                "relay must be the only request of its connection",
            ));
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.relay_wait = Some(stream);
            self.relay_waiters.push_back(conn);
        }
        None
    }

    fn accept_egress(&mut self) {
        let Some(l) = &self.egress else {
            return;
        };
        while self.relay_backlog.len() < MAX_RELAY_BACKLOG {
            match l.accept() {
                Ok((tcp, _)) => {
                    if tcp.set_nonblocking(true).is_ok() {
                        let _ = tcp.set_nodelay(true);
                        self.relay_backlog.push_back(tcp);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Gives waiting workload connections to waiting host connections.
    fn pair_relays(&mut self) {
        while !self.relay_backlog.is_empty() {
            let Some(conn) = self.relay_waiters.pop_front() else {
                return;
            };
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            let Some(stream) = c.relay_wait.take() else {
                continue;
            };
            if c.dead {
                continue;
            }
            let Some(tcp) = self.relay_backlog.pop_front() else {
                return;
            };
            let peer_port = tcp.peer_addr().map(|a| a.port()).unwrap_or(0);
            if c.proto
                .respond(stream, &Response::Relayed { peer_port })
                .is_err()
            {
                c.dead = true;
                self.relay_backlog.push_front(tcp);
                continue;
            }
            c.relay_to = Some(tcp);
        }
    }

    /// The host connection `id` is gone: its foreground processes are killed, its file
    /// writes abandoned (the old files stay), its background processes run on.
    fn close_conn(&mut self, id: u64) {
        let Some(c) = self.conns.remove(&id) else {
            return;
        };
        self.trim = true;
        for op in c.files.into_values() {
            if let FileOp::Write { tmp, .. } = op {
                let _ = fs::remove_file(tmp);
            }
        }
        for (&pid, p) in self.procs.iter_mut() {
            if p.conn == Some(id) {
                p.conn = None;
                if !p.background && p.exit.is_none() {
                    p.cancelled = true;
                    let _ = sys::kill_group(pid, libc::SIGKILL);
                    let _ = sys::kill(pid, libc::SIGKILL);
                    p.input = None;
                    p.pending.clear();
                }
            }
            if p.waiter.as_ref().is_some_and(|w| w.conn == id) {
                p.waiter = None;
            }
        }
        // Foreground processes already reaped but never reported have no one to tell.
        self.procs
            .retain(|_, p| p.background || p.conn.is_some() || p.exit.is_none());
    }
}

/// A validated `Exec` request.
struct ExecSpec {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    stdin: bool,
    pty: Option<PtySize>,
    timeout_ms: Option<u64>,
    background: bool,
}

/// A process's stdio: the child's ends (0, 1, 2) and the agent's.
struct Plumbing {
    child: [OwnedFd; 3],
    input: Option<OwnedFd>,
    out: [Option<OwnedFd>; 2],
}

fn signal_group(pid: i32, signal: i32) -> Response {
    match sys::kill_group(pid, signal) {
        Ok(()) => Response::Ok {},
        Err(_) => match sys::kill(pid, signal) {
            Ok(()) => Response::Ok {},
            Err(e) => Response::error(ErrorCode::NotFound, format!("signal process {pid}: {e}")),
        },
    }
}

fn finish_write(file: File, tmp: &Path, dst: &Path, mode: u32, bytes: u64) -> Response {
    let path = dst.display().to_string();
    let r = file
        .set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| fs::rename(tmp, dst));
    drop(file);
    match r {
        Ok(()) => Response::FileDone { bytes },
        Err(e) => {
            let _ = fs::remove_file(tmp);
            io_error("write", &path, &e)
        }
    }
}

fn remove(path: &str, recursive: bool) -> Response {
    let r = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            if recursive {
                // Never follows symlinks: std removes below an fd opened O_NOFOLLOW.
                fs::remove_dir_all(path)
            } else {
                fs::remove_dir(path)
            }
        }
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => Response::Ok {},
        Err(e) => io_error("remove", path, &e),
    }
}

fn kind(ft: fs::FileType) -> EntryKind {
    if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    }
}

fn entry(path: String, m: &fs::Metadata) -> Entry {
    Entry {
        path,
        kind: kind(m.file_type()),
        size: m.len(),
        mode: m.mode() & 0o7777,
        mtime_ms: m
            .mtime()
            .saturating_mul(1000)
            .saturating_add(m.mtime_nsec() / 1_000_000),
    }
}

fn list_dir(path: &str, depth: u32) -> Response {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Response::error(
                ErrorCode::NotADirectory,
                format!("{path} is not a directory (symlinks are not followed)"),
            )
        }
        Err(e) => return io_error("list", path, &e),
    }
    let base = if path.len() > 1 {
        path.trim_end_matches('/').to_string()
    } else {
        path.to_string()
    };
    let base = if base.is_empty() {
        "/".to_string()
    } else {
        base
    };
    let mut entries = Vec::new();
    let mut size = 64usize;
    let mut visited = 0usize;
    let mut truncated = false;
    // Depth-first, each directory's children sorted; (dir path, level).
    let mut stack: Vec<(String, u32)> = vec![(base, 0)];
    'walk: while let Some((dir, level)) = stack.pop() {
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if level == 0 => return io_error("list", path, &e),
            // A subdirectory we may not read: listed, not descended.
            Err(_) => continue,
        };
        let mut children: Vec<(String, fs::Metadata)> = Vec::new();
        for de in rd.flatten() {
            visited += 1;
            if visited > MAX_VISITED {
                truncated = true;
                break;
            }
            let name = de.file_name().to_string_lossy().into_owned();
            let child = if dir == "/" {
                format!("/{name}")
            } else {
                format!("{dir}/{name}")
            };
            if child.len() > MAX_PATH {
                truncated = true;
                continue;
            }
            if let Ok(m) = fs::symlink_metadata(de.path()) {
                children.push((child, m));
            }
        }
        children.sort_by(|a, b| a.0.cmp(&b.0));
        let mut subdirs = Vec::new();
        for (child, m) in children {
            let e = entry(child.clone(), &m);
            size += serde_json::to_vec(&e).map_or(RESPONSE_ROOM, |v| v.len() + 1);
            if size > RESPONSE_ROOM {
                truncated = true;
                break 'walk;
            }
            entries.push(e);
            if m.is_dir() && level < depth {
                subdirs.push((child, level + 1));
            }
        }
        if truncated {
            break;
        }
        stack.extend(subdirs.into_iter().rev());
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Response::Listing { entries, truncated }
}

/// Resource use of the sandbox, summed over the agent's pid namespace from `/proc`: CPU
/// (utime + stime of the living, and cutime + cstime for the children they reaped), RSS,
/// and tasks.
fn metrics() -> Response {
    let ticks = sys::clock_ticks().max(1);
    let page = sys::page_size();
    let mut cpu_ticks = 0u64;
    let mut rss_pages = 0u64;
    let mut tasks = 0u64;
    let Ok(rd) = fs::read_dir("/proc") else {
        return Response::error(ErrorCode::Internal, "cannot read /proc in the sandbox");
    };
    for de in rd.flatten() {
        let name = de.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = fs::read_to_string(format!("/proc/{name}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        // f[0] is field 4; utime is field 14.
        let field = |n: usize| f.get(n - 4).copied().unwrap_or(0);
        for n in [14, 15, 16, 17] {
            cpu_ticks = cpu_ticks.saturating_add(field(n));
        }
        tasks = tasks.saturating_add(field(20).max(1));
        rss_pages = rss_pages.saturating_add(field(24));
    }
    Response::Metrics {
        cpu_ms: cpu_ticks.saturating_mul(1000) / ticks,
        memory_bytes: rss_pages.saturating_mul(page),
        pids: tasks.min(u32::MAX as u64) as u32,
    }
}

/// An argv cut to [`MAX_PROC_ARGV_BYTES`] (counting a NUL per argument).
fn cut_argv(argv: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut used = 0usize;
    for a in argv {
        let room = MAX_PROC_ARGV_BYTES.saturating_sub(used);
        if room <= 1 {
            break;
        }
        if a.len() < room {
            used += a.len() + 1;
            out.push(a.clone());
        } else {
            let mut end = room - 1;
            while !a.is_char_boundary(end) {
                end -= 1;
            }
            out.push(a[..end].to_string());
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_keep_the_last_bytes() {
        let mut r = Ring::default();
        r.push(&vec![1u8; RETAINED_OUTPUT]);
        r.push(b"abc");
        assert_eq!(r.buf.len(), RETAINED_OUTPUT);
        assert_eq!(r.dropped, 3);
        let mut pos = 0;
        let first = r.read_from(&mut pos, 10);
        assert_eq!(first, vec![1u8; 10]);
        assert_eq!(pos, 13);
        let mut pos = r.end() - 2;
        assert_eq!(r.read_from(&mut pos, 100), b"bc");
        assert_eq!(r.read_from(&mut pos, 100), b"");
    }

    #[test]
    fn argvs_are_cut_to_the_limit() {
        let argv = vec!["sleep".to_string(), "é".repeat(600)];
        let cut = cut_argv(&argv);
        let bytes: usize = cut.iter().map(|a| a.len() + 1).sum();
        assert!(bytes <= MAX_PROC_ARGV_BYTES, "{bytes}");
        assert_eq!(cut[0], "sleep");
        assert!(cut[1].chars().all(|c| c == 'é'));
        assert_eq!(cut_argv(&["a".into(), "b".into()]), ["a", "b"]);
    }
}
