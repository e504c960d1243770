//! The agent side of the moat agent protocol ([`moat_proto`]), as a pure state machine:
//! bytes in, bytes and [`Event`]s out, no I/O, no threads. The agent's `poll` loop (init of a
//! persistent sandbox, `serve.rs`) owns the sockets and the processes and drives one
//! [`AgentConn`] per host connection.
//!
//! What it does today:
//! - sends the agent's Hello at once, checks the host's with [`Hello::parse_peer`]; any
//!   other frame before it, or a second Hello, is a protocol violation;
//! - decodes with a bounded [`Decoder`], runs [`moat_proto::Frame::check_sender`] on every
//!   frame and [`Request::validate`] on every request; a framing or sender violation fails
//!   the connection (the caller closes it, and only it); a request that does not parse or
//!   validate is answered `Error` on its stream and the connection stays up;
//! - turns every valid request into an [`Event::Request`], and the host's Data and Eof on
//!   channel 0 and its Cancel into [`Event::Stdin`], [`Event::StdinEof`] and
//!   [`Event::Cancel`] for the streams that take them: Data and Eof for a foreground
//!   `Exec` with `stdin`, a `WriteFile` and a `ProcStdin`; Cancel for every open stream
//!   (an `Exec`, a `ReadFile`, a `WriteFile`, a `ProcOutput`, a `ProcStdin`). The caller
//!   (the agent's loop) answers through [`AgentConn::respond`], [`AgentConn::data`] and
//!   [`AgentConn::eof`];
//! - drops frames for closed streams silently, as the protocol says, and Data or Eof on a
//!   stream whose request takes none.
//!
//! An exec error (a missing program) is answered with a lone `Error` (`not_found`), as the
//! protocol documents; that is the caller's job.

use std::collections::BTreeSet;

use moat_proto::{
    Channel, Decoder, Encoder, ErrorCode, FrameError, FrameKind, Hello, ProtoError, Request,
    Response, Role, StreamIds,
};

/// Something the caller must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A validated request; answer on `stream` (see the protocol's flows).
    Request { stream: u32, request: Request },
    /// Channel 0 bytes for `stream`: stdin of its process, content of its file.
    Stdin { stream: u32, data: Vec<u8> },
    /// The end of channel 0 of `stream`.
    StdinEof { stream: u32 },
    /// The host cancelled `stream`: an `Exec` is killed (status `killed`), a `WriteFile`
    /// or `ReadFile` ends with `Error { cancelled }`, a `ProcOutput` with `Ok`.
    Cancel { stream: u32 },
}

/// Why a connection must be closed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("agent protocol: {0}")]
    Frame(#[from] FrameError),
    #[error("agent protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("agent protocol: {0}")]
    Violation(String),
}

/// Queued output above which the caller stops reading the processes' pipes (the protocol
/// has no flow control; the agent bounds what it queues). One maximal frame may still be
/// added past it.
pub const OUTPUT_BOUND: usize = 4 << 20;

/// Most output buffer capacity a connection keeps once its output is all written.
const KEPT_OUTPUT_CAPACITY: usize = 64 << 10;

/// One host connection, agent side.
#[derive(Debug)]
pub struct AgentConn {
    decoder: Decoder,
    encoder: Encoder,
    out: Vec<u8>,
    peer_hello: bool,
    ids: StreamIds,
    /// Streams opened and not yet ended by a final response.
    open: BTreeSet<u32>,
    /// Open streams whose request takes Data and Eof on channel 0.
    stdin: BTreeSet<u32>,
    /// Open streams whose request was a background `Exec` (`Started` ends them).
    background: BTreeSet<u32>,
}

impl Default for AgentConn {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentConn {
    /// A new connection with the agent's Hello already queued.
    pub fn new() -> AgentConn {
        let encoder = Encoder::new();
        let mut out = Vec::new();
        // A Hello with no features is always within the payload limit.
        let _ = encoder.hello(&mut out, &Hello::new(Role::Agent));
        AgentConn {
            decoder: Decoder::new(),
            encoder,
            out,
            peer_hello: false,
            ids: StreamIds::new(),
            open: BTreeSet::new(),
            stdin: BTreeSet::new(),
            background: BTreeSet::new(),
        }
    }

    /// Bytes waiting to be written to the host.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Whether queued output is over [`OUTPUT_BOUND`]: stop reading pipes until it drains.
    pub fn is_backed_up(&self) -> bool {
        self.out.len() > OUTPUT_BOUND
    }

    /// Drops the first `n` bytes of [`AgentConn::output`] (they were written).
    pub fn consume(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
        // A burst of output (up to OUTPUT_BOUND and a frame) leaves no buffer that size
        // behind on a connection that may then idle for hours.
        if self.out.is_empty() && self.out.capacity() > KEPT_OUTPUT_CAPACITY {
            self.out = Vec::new();
        }
    }

    /// Whether the host's Hello arrived.
    pub fn is_ready(&self) -> bool {
        self.peer_hello
    }

    /// Whether `stream` is open (no final response sent yet).
    pub fn is_open(&self, stream: u32) -> bool {
        self.open.contains(&stream)
    }

    /// Whether `stream` still takes channel 0 (its Eof has not come yet).
    pub fn takes_stdin(&self, stream: u32) -> bool {
        self.stdin.contains(&stream)
    }

    /// Takes bytes read from the host, returns what the caller must do. An error means
    /// the connection must be closed.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Vec<Event>, ConnError> {
        let mut events = Vec::new();
        loop {
            let taken = self.decoder.feed(bytes);
            bytes = &bytes[taken..];
            while let Some(frame) = self.decoder.next_frame()? {
                self.frame(frame, &mut events)?;
            }
            if bytes.is_empty() {
                return Ok(events);
            }
        }
    }

    /// The host closed its side: an error if it did so inside a frame.
    pub fn finish(&self) -> Result<(), ConnError> {
        Ok(self.decoder.finish()?)
    }

    fn frame(
        &mut self,
        frame: moat_proto::Frame,
        events: &mut Vec<Event>,
    ) -> Result<(), ConnError> {
        frame.check_sender(Role::Host)?;
        if frame.kind == FrameKind::Hello {
            if self.peer_hello {
                return Err(ConnError::Violation("a second hello".into()));
            }
            Hello::parse_peer(&frame.payload, Role::Host)?;
            self.peer_hello = true;
            return Ok(());
        }
        if !self.peer_hello {
            return Err(ConnError::Violation(format!(
                "a {} frame before the host's hello",
                frame.kind
            )));
        }
        let stream = frame.stream;
        if frame.kind == FrameKind::Request {
            if !self.ids.accept(stream) {
                return Err(ConnError::Violation(format!(
                    "a request on stream {stream}, which is not a fresh odd id"
                )));
            }
            self.open.insert(stream);
            let request = match frame.request() {
                Ok(request) => request,
                Err(err) => {
                    let response = Response::error(ErrorCode::InvalidRequest, err.to_string());
                    return self.respond(stream, &response);
                }
            };
            if let Err(err) = request.validate() {
                return self.respond(stream, &Response::from_proto_error(&err));
            }
            if matches!(
                request,
                Request::Exec {
                    background: true,
                    ..
                }
            ) {
                self.background.insert(stream);
            }
            if request.takes_stdin() {
                self.stdin.insert(stream);
            }
            events.push(Event::Request { stream, request });
            return Ok(());
        }
        if !self.ids.is_opened(stream) {
            return Err(ConnError::Violation(format!(
                "a {} frame on stream {stream}, which was never opened",
                frame.kind
            )));
        }
        if !self.open.contains(&stream) {
            // A late frame for a closed stream.
            return Ok(());
        }
        match frame.kind {
            FrameKind::Data if self.stdin.contains(&stream) => events.push(Event::Stdin {
                stream,
                data: frame.payload,
            }),
            FrameKind::Eof if self.stdin.contains(&stream) => {
                // One Eof per stream: later Data and Eof are dropped.
                self.stdin.remove(&stream);
                events.push(Event::StdinEof { stream });
            }
            FrameKind::Cancel => events.push(Event::Cancel { stream }),
            _ => {}
        }
        Ok(())
    }

    /// Queues `response` on `stream`; a final one closes the stream. Responses for a
    /// stream that is not open are dropped.
    pub fn respond(&mut self, stream: u32, response: &Response) -> Result<(), ConnError> {
        if !self.open.contains(&stream) {
            return Ok(());
        }
        let background = self.background.contains(&stream);
        self.encoder.response(&mut self.out, stream, response)?;
        if response.is_final(background) {
            self.open.remove(&stream);
            self.stdin.remove(&stream);
            self.background.remove(&stream);
        }
        Ok(())
    }

    /// Queues output of `stream` (channel 1 or 2), split to the payload limit.
    pub fn data(&mut self, stream: u32, channel: Channel, bytes: &[u8]) -> Result<(), ConnError> {
        if !self.open.contains(&stream) {
            return Ok(());
        }
        Ok(self.encoder.data(&mut self.out, stream, channel, bytes)?)
    }

    /// Queues the end of `channel` of `stream`.
    pub fn eof(&mut self, stream: u32, channel: Channel) -> Result<(), ConnError> {
        if !self.open.contains(&stream) {
            return Ok(());
        }
        Ok(self.encoder.eof(&mut self.out, stream, channel)?)
    }
}

/// What [`pump`] saw on the socket.
#[derive(Debug, Default)]
pub struct Pumped {
    /// What the caller must do.
    pub events: Vec<Event>,
    /// The host closed its side (read returned 0); close the connection once the output
    /// is written or cannot be.
    pub closed: bool,
}

/// Moves bytes between a non-blocking `socket` and `conn`: writes what is queued (as much
/// as the socket takes), then reads what is there (until it would block or closes). For a
/// `poll` loop: call it when the socket is readable, or writable while output is queued.
/// An error means the connection must be closed.
pub fn pump<S: std::io::Read + std::io::Write>(
    conn: &mut AgentConn,
    socket: &mut S,
) -> Result<Pumped, ConnError> {
    use std::io::ErrorKind;
    let mut pumped = Pumped::default();
    while !conn.output().is_empty() {
        match socket.write(conn.output()) {
            Ok(0) => break,
            Ok(n) => conn.consume(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(ConnError::Violation(format!("write: {e}"))),
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match socket.read(&mut buf) {
            Ok(0) => {
                conn.finish()?;
                pumped.closed = true;
                break;
            }
            Ok(n) => pumped.events.extend(conn.feed(&buf[..n])?),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(ConnError::Violation(format!("read: {e}"))),
        }
    }
    Ok(pumped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_proto::Frame;

    /// Decodes everything the agent queued, as the host would, checking each frame.
    fn drain(conn: &mut AgentConn, host: &mut Decoder) -> Vec<Frame> {
        let bytes = conn.output().to_vec();
        conn.consume(bytes.len());
        let mut frames = Vec::new();
        let mut rest: &[u8] = &bytes;
        loop {
            let taken = host.feed(rest);
            rest = &rest[taken..];
            while let Some(frame) = host.next_frame().expect("agent frames are well formed") {
                frame
                    .check_sender(Role::Agent)
                    .expect("agent sends agent frames");
                frames.push(frame);
            }
            if rest.is_empty() {
                return frames;
            }
        }
    }

    fn hello() -> Vec<u8> {
        let mut out = Vec::new();
        Encoder::new()
            .hello(&mut out, &Hello::new(Role::Host))
            .expect("hello encodes");
        out
    }

    fn ready() -> (AgentConn, Decoder) {
        let mut conn = AgentConn::new();
        let mut host = Decoder::new();
        let frames = drain(&mut conn, &mut host);
        assert_eq!(frames.len(), 1);
        Hello::parse_peer(&frames[0].payload, Role::Agent).expect("agent hello");
        let events = conn.feed(&hello()).expect("host hello accepted");
        assert!(events.is_empty());
        assert!(conn.is_ready());
        (conn, host)
    }

    fn request(stream: u32, request: &Request) -> Vec<u8> {
        let mut out = Vec::new();
        Encoder::new()
            .request(&mut out, stream, request)
            .expect("request encodes");
        out
    }

    #[test]
    fn frames_before_hello_and_second_hello_are_violations() {
        let mut conn = AgentConn::new();
        assert!(conn.feed(&request(1, &Request::exec(["true"]))).is_err());
        let (mut conn, _) = ready();
        assert!(conn.feed(&hello()).is_err());
    }

    #[test]
    fn exec_flow() {
        let (mut conn, mut host) = ready();
        let exec = Request::Exec {
            argv: vec!["cat".into()],
            env: Default::default(),
            cwd: None,
            stdin: true,
            pty: None,
            timeout_ms: None,
            background: false,
        };
        let events = conn.feed(&request(1, &exec)).expect("exec accepted");
        assert_eq!(
            events,
            vec![Event::Request {
                stream: 1,
                request: exec
            }]
        );
        let mut wire = Vec::new();
        let enc = Encoder::new();
        enc.data(&mut wire, 1, Channel::Stdin, b"hello")
            .expect("data");
        enc.eof(&mut wire, 1, Channel::Stdin).expect("eof");
        enc.cancel(&mut wire, 1).expect("cancel");
        let events = conn.feed(&wire).expect("stdin accepted");
        assert_eq!(
            events,
            vec![
                Event::Stdin {
                    stream: 1,
                    data: b"hello".to_vec()
                },
                Event::StdinEof { stream: 1 },
                Event::Cancel { stream: 1 },
            ]
        );
        conn.respond(1, &Response::Started { pid: 7 })
            .expect("started");
        conn.data(1, Channel::Stdout, b"hello").expect("data");
        conn.eof(1, Channel::Stdout).expect("eof");
        conn.eof(1, Channel::Stderr).expect("eof");
        let exit = Response::Exit {
            exit_code: Some(0),
            signal: None,
            status: moat_proto::msg::Status::Ok,
        };
        conn.respond(1, &exit).expect("exit");
        assert!(!conn.is_open(1));
        assert!(!conn.is_backed_up());
        let frames = drain(&mut conn, &mut host);
        let kinds: Vec<FrameKind> = frames.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            vec![
                FrameKind::Response,
                FrameKind::Data,
                FrameKind::Eof,
                FrameKind::Eof,
                FrameKind::Response
            ]
        );
        assert_eq!(frames[4].response().expect("exit parses"), exit);
        // Late frames for the closed stream are dropped silently.
        assert_eq!(conn.feed(&wire).expect("late frames dropped"), vec![]);
    }

    #[test]
    fn invalid_requests_get_errors_and_the_connection_stays_up() {
        let (mut conn, mut host) = ready();
        let bad = Request::exec(Vec::<String>::new());
        assert!(conn
            .feed(&request(3, &bad))
            .expect("bad exec answered")
            .is_empty());
        let mut wire = Vec::new();
        Encoder::new()
            .frame(
                &mut wire,
                FrameKind::Request,
                Channel::Stdin,
                5,
                br#"{"type":"chmod","path":"/a"}"#,
            )
            .expect("raw request");
        assert!(conn.feed(&wire).expect("unknown type answered").is_empty());
        let frames = drain(&mut conn, &mut host);
        assert_eq!(frames.len(), 2);
        for frame in &frames {
            assert!(matches!(
                frame.response().expect("response"),
                Response::Error {
                    code: ErrorCode::InvalidRequest,
                    ..
                }
            ));
        }
        assert!(!conn.is_open(3) && !conn.is_open(5));
        let events = conn
            .feed(&request(
                7,
                &Request::Signal {
                    stream: 1,
                    signal: 15,
                },
            ))
            .expect("signal accepted");
        assert_eq!(
            events,
            vec![Event::Request {
                stream: 7,
                request: Request::Signal {
                    stream: 1,
                    signal: 15
                }
            }]
        );
    }

    #[test]
    fn channel_zero_goes_to_the_requests_that_take_it() {
        let (mut conn, _) = ready();
        let enc = Encoder::new();
        let mut wire = Vec::new();
        enc.request(
            &mut wire,
            1,
            &Request::ProcStdin {
                pid: 4,
                close: true,
            },
        )
        .expect("proc_stdin");
        enc.data(&mut wire, 1, Channel::Stdin, b"abc")
            .expect("data");
        enc.eof(&mut wire, 1, Channel::Stdin).expect("eof");
        enc.data(&mut wire, 1, Channel::Stdin, b"late")
            .expect("data");
        enc.request(
            &mut wire,
            3,
            &Request::ProcOutput {
                pid: 4,
                follow: true,
            },
        )
        .expect("proc_output");
        enc.data(&mut wire, 3, Channel::Stdin, b"ignored")
            .expect("data");
        enc.cancel(&mut wire, 3).expect("cancel");
        enc.request(&mut wire, 5, &Request::exec(["true"]))
            .expect("exec without stdin");
        enc.data(&mut wire, 5, Channel::Stdin, b"ignored")
            .expect("data");
        let events = conn.feed(&wire).expect("accepted");
        assert_eq!(
            events,
            vec![
                Event::Request {
                    stream: 1,
                    request: Request::ProcStdin {
                        pid: 4,
                        close: true
                    }
                },
                Event::Stdin {
                    stream: 1,
                    data: b"abc".to_vec()
                },
                Event::StdinEof { stream: 1 },
                Event::Request {
                    stream: 3,
                    request: Request::ProcOutput {
                        pid: 4,
                        follow: true
                    }
                },
                Event::Cancel { stream: 3 },
                Event::Request {
                    stream: 5,
                    request: Request::exec(["true"])
                },
            ]
        );
        assert!(!conn.takes_stdin(1));
    }

    #[test]
    fn reused_or_unopened_stream_ids_fail_the_connection() {
        let (mut conn, _) = ready();
        conn.feed(&request(3, &Request::exec(["true"])))
            .expect("exec");
        assert!(conn.feed(&request(1, &Request::exec(["true"]))).is_err());
        let (mut conn, _) = ready();
        let mut wire = Vec::new();
        Encoder::new().cancel(&mut wire, 9).expect("cancel");
        assert!(conn.feed(&wire).is_err());
    }

    #[test]
    fn background_exec_ends_with_started() {
        let (mut conn, _) = ready();
        let exec = Request::Exec {
            argv: vec!["sleep".into(), "1".into()],
            env: Default::default(),
            cwd: None,
            stdin: false,
            pty: None,
            timeout_ms: None,
            background: true,
        };
        conn.feed(&request(1, &exec)).expect("exec");
        conn.respond(1, &Response::Started { pid: 3 })
            .expect("started");
        assert!(!conn.is_open(1));
    }

    #[test]
    fn pump_over_a_socket_pair() {
        use std::io::{Read, Write};
        let (mut agent_side, mut host_side) =
            std::os::unix::net::UnixStream::pair().expect("socketpair");
        agent_side.set_nonblocking(true).expect("nonblocking");
        let mut conn = AgentConn::new();
        let pumped = pump(&mut conn, &mut agent_side).expect("first pump");
        assert!(pumped.events.is_empty() && !pumped.closed);
        assert!(conn.output().is_empty());
        host_side.write_all(&hello()).expect("hello");
        host_side
            .write_all(&request(1, &Request::exec(["true"])))
            .expect("request");
        let pumped = pump(&mut conn, &mut agent_side).expect("second pump");
        assert_eq!(pumped.events.len(), 1);
        conn.respond(1, &Response::Started { pid: 2 })
            .expect("started");
        pump(&mut conn, &mut agent_side).expect("third pump");
        drop(host_side.shutdown(std::net::Shutdown::Write));
        let pumped = pump(&mut conn, &mut agent_side).expect("last pump");
        assert!(pumped.closed);
        let mut got = Vec::new();
        drop(agent_side);
        host_side.read_to_end(&mut got).expect("read");
        let mut host = Decoder::new();
        assert_eq!(host.feed(&got), got.len());
        let first = host.next_frame().expect("frame").expect("hello frame");
        assert_eq!(first.kind, FrameKind::Hello);
        let second = host.next_frame().expect("frame").expect("started frame");
        assert_eq!(
            second.response().expect("response"),
            Response::Started { pid: 2 }
        );
    }
}
