//! The host side of the agent protocol ([`moat_proto`]) over tokio, on a unix socket.
//!
//! One [`AgentClient`] is one connection to one sandbox's agent. It is cheap to clone (an
//! `Arc`), and every clone and every handle it gives out ([`Exec`], [`ExecInput`],
//! [`FileRead`], [`FileWrite`]) keeps the connection open; it closes when the last of them
//! is dropped, when the agent closes it, or on the first protocol violation.
//!
//! # Tasks
//!
//! [`AgentClient::connect`] sends the host's Hello, reads and checks the agent's (within
//! [`HELLO_TIMEOUT`]), then spawns two tasks:
//!
//! - a **writer** that owns the write half and takes whole frames from one queue, so frames
//!   never interleave; Data is split into frames of at most 1 MiB. What waits in the queue
//!   is bounded by [`WRITE_BUDGET`] bytes: a write waits while the agent does not read.
//! - a **reader** that owns the read half and a bounded [`Decoder`], and hands each frame
//!   to the stream it belongs to through a per-stream channel of [`STREAM_QUEUE`] items.
//!
//! # Trust
//!
//! Everything from the agent is hostile (a compromised sandbox controls its agent). Every
//! frame goes through [`moat_proto::Frame::check_sender`], every response through
//! [`Response::validate`], and through a per-stream state machine: the response types each
//! request allows, `Started` before output, no output after an Eof, `FileDone` equal to the
//! bytes received, nothing after the final response, nothing on a stream the host never
//! opened. On any violation the connection is closed and every open stream fails with
//! [`ClientError::Protocol`]; nothing the agent sends can panic the host.
//!
//! A stream whose handle is dropped before its final response is **closed by the host**:
//! its Exec, ReadFile, WriteFile, ProcOutput or ProcStdin gets a Cancel, and the frames the
//! agent still sends for it (which it may, having sent them before it saw the Cancel) are
//! checked and dropped until its final response. At most [`MAX_ABANDONED`] such streams
//! are remembered; past that the oldest is forgotten, and a frame for it then counts as a
//! violation (a working agent answers a Cancel at once, so only a stuck or hostile one
//! gets there).
//!
//! # Backpressure, and why big transfers get their own connection
//!
//! Version 1 of the protocol has no flow control. Data that arrived for a stream waits in
//! its channel until the stream's consumer takes it; all streams of a connection together
//! hold at most [`READ_BUDGET`] bytes of it, and each at most [`STREAM_QUEUE`] items.
//! When a consumer is slow the reader waits for it instead of buffering more, so the agent
//! stops getting its frames read, its queue fills and it stops reading the process's pipes:
//! backpressure reaches the process. The price: **a slow consumer stalls every other
//! stream of that connection**. Callers therefore open a separate
//! [`AgentClient::connect`] for each large streamed transfer (a big file, an exec whose
//! output goes to a slow client) and keep a shared connection for small requests. A
//! consumer that drops its handle never stalls anything: the reader then discards the
//! stream's frames.
//!
//! There is no timeout on exec (the agent enforces `timeout_ms`) nor on other requests;
//! wrap a call in `tokio::time::timeout` when a deadline is needed (dropping the future
//! closes its stream as above).
//!
//! # Errors from this side
//!
//! A request that fails [`Request::validate`] here is not sent: it fails with
//! [`ClientError::Agent`] carrying the code and message the agent would have answered.
//! Misuse of a handle (writing stdin of an exec started without stdin, or after closing it;
//! resizing a process of `proc_output`) fails the same way with
//! [`ErrorCode::InvalidRequest`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use moat_api::Status;
use moat_proto::msg::ProcInfo;
use moat_proto::{
    Channel, Decoder, Encoder, Entry, ErrorCode, Frame, FrameKind, Hello, PtySize, Request,
    Response, Role, StreamIds, DEFAULT_MAX_PAYLOAD, HEADER_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

/// How long [`AgentClient::connect`] waits for the socket and the agent's Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Items (Data frames, Eofs, responses) waiting for one stream's consumer.
pub const STREAM_QUEUE: usize = 64;
/// Bytes of Data from the agent waiting for consumers, all streams of a connection together.
pub const READ_BUDGET: usize = 8 << 20;
/// Bytes of frames waiting for the writer, all streams of a connection together.
pub const WRITE_BUDGET: usize = 4 << 20;
/// Streams closed by the host whose late frames are still recognised (see the module docs).
pub const MAX_ABANDONED: usize = 4096;
/// Bytes asked for in one read from the socket.
const READ_CHUNK: usize = 64 << 10;

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent answered the request with an `Error` (or this side refused to send a
    /// request the agent would refuse, with the same code and message).
    #[error("the sandbox's agent refused the request ({code}): {message}")]
    Agent { code: ErrorCode, message: String },
    /// The connection is closed: the agent closed it (the sandbox stopped, or its agent
    /// exited), or this side did.
    #[error(
        "the connection to the sandbox's agent is closed: check that the sandbox still runs, \
         and connect again"
    )]
    Closed,
    /// The agent broke the protocol; the connection was closed.
    #[error(
        "the sandbox's agent broke the protocol, so the connection was closed ({0}); treat \
         the sandbox as broken or compromised: stop it, or recreate it"
    )]
    Protocol(String),
    /// The socket failed.
    #[error("I/O error on the connection to the sandbox's agent: {0}")]
    Io(#[source] io::Error),
    /// The agent did not complete the handshake in time.
    #[error(
        "the sandbox's agent did not answer within {} s: check that the sandbox runs and its \
         agent is up",
        HELLO_TIMEOUT.as_secs()
    )]
    Timeout,
}

impl ClientError {
    fn invalid(message: impl Into<String>) -> ClientError {
        ClientError::Agent {
            code: ErrorCode::InvalidRequest,
            message: message.into(),
        }
    }

    fn from_agent(response: Response) -> ClientError {
        match response {
            Response::Error { code, message } => ClientError::Agent { code, message },
            other => ClientError::Protocol(format!(
                "unexpected {} response from the agent",
                other.type_name()
            )),
        }
    }
}

/// Why a connection closed, kept so that every stream can report it.
#[derive(Clone, Debug)]
enum Reason {
    Closed,
    Protocol(String),
    Io(io::ErrorKind, String),
}

impl Reason {
    fn error(&self) -> ClientError {
        match self {
            Reason::Closed => ClientError::Closed,
            Reason::Protocol(why) => ClientError::Protocol(why.clone()),
            Reason::Io(kind, message) => ClientError::Io(io::Error::new(*kind, message.clone())),
        }
    }

    /// The agent's end going away mid-write or mid-read is a close, not an I/O fault.
    fn io(err: &io::Error) -> Reason {
        match err.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => Reason::Closed,
            kind => Reason::Io(kind, err.to_string()),
        }
    }
}

/// A process to start in the sandbox; the fields of [`Request::Exec`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program and arguments; `argv[0]` without a `/` is looked up in `PATH` from `env`.
    pub argv: Vec<String>,
    /// The complete environment (nothing is inherited).
    pub env: BTreeMap<String, String>,
    /// Absolute working directory; `None`: the sandbox's own.
    pub cwd: Option<String>,
    /// Give the process a stdin pipe: written through [`Exec::stdin`] in the foreground,
    /// through [`AgentClient::proc_stdin`] in the background.
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size (all output then comes as stdout).
    pub pty: Option<PtySize>,
    /// The agent kills the process group this long after start (status `timeout`).
    pub timeout_ms: Option<u64>,
    /// Detach: `Started` is the only event; the process outlives the connection.
    pub background: bool,
}

impl ExecSpec {
    /// `argv` with every other field at its default.
    pub fn new<I, S>(argv: I) -> ExecSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ExecSpec::default()
        }
    }

    fn into_request(self) -> Request {
        Request::Exec {
            argv: self.argv,
            env: self.env,
            cwd: self.cwd,
            stdin: self.stdin,
            pty: self.pty,
            timeout_ms: self.timeout_ms,
            background: self.background,
        }
    }
}

/// What happens to a process of [`AgentClient::exec`] or [`AgentClient::proc_output`].
#[derive(Debug)]
pub enum ExecEvent {
    /// The process started (for `proc_output`: the stream of that process began).
    Started { pid: u32 },
    /// Bytes from its stdout (or its terminal).
    Stdout(Bytes),
    /// Bytes from its stderr.
    Stderr(Bytes),
    /// It ended; the last event.
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        status: Status,
    },
    /// The request failed (an agent `Error`) or the connection closed; the last event.
    Failed(ClientError),
}

/// Resource use of a whole sandbox, as its agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metrics {
    /// CPU time used so far, user plus system.
    pub cpu_ms: u64,
    /// Memory in use now.
    pub memory_bytes: u64,
    /// Processes alive now, the agent included.
    pub pids: u32,
}

/// A connection to one sandbox's agent. See the module docs.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentClient")
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// What the user-facing handles share; dropping the last one closes the connection.
struct Inner {
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<Outgoing>,
    encoder: Encoder,
    /// The features both Hellos listed.
    features: Vec<String>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.fail(Reason::Closed);
    }
}

/// What the tasks and the handles share.
struct Shared {
    state: Mutex<State>,
    /// Bytes of Data queued for consumers.
    read_budget: Arc<Semaphore>,
    /// Bytes of frames queued for the writer.
    write_budget: Arc<Semaphore>,
    tasks: Mutex<Vec<AbortHandle>>,
}

struct State {
    ids: StreamIds,
    /// Streams opened and not yet ended by their final response.
    streams: HashMap<u32, Slot>,
    /// Streams of `streams` closed by the host (no consumer), oldest first.
    abandoned: BTreeSet<u32>,
    /// Set once the connection is closed.
    closed: Option<Reason>,
}

/// One frame's worth of bytes for the writer, holding its share of [`WRITE_BUDGET`].
struct Outgoing {
    bytes: Vec<u8>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// What the reader hands a stream's consumer.
enum Item {
    Response { response: Response, last: bool },
    Data(Channel, Bytes, Option<OwnedSemaphorePermit>),
    Eof,
}

/// What a request allows the agent to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Exec {
        background: bool,
    },
    ProcOutput {
        pid: u32,
    },
    ReadFile,
    WriteFile,
    /// One final response of this type (or `Error`).
    Unary(&'static str),
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Exec { .. } => "exec",
            Kind::ProcOutput { .. } => "proc_output",
            Kind::ReadFile => "read_file",
            Kind::WriteFile => "write_file",
            Kind::Unary(_) => "request",
        }
    }

    fn has_output(self) -> bool {
        matches!(
            self,
            Kind::Exec { background: false } | Kind::ProcOutput { .. } | Kind::ReadFile
        )
    }
}

/// The reader's view of one open stream.
struct Slot {
    kind: Kind,
    /// `None` once the host closed the stream.
    tx: Option<mpsc::Sender<Item>>,
    started: bool,
    /// Eof seen on channels 1 and 2.
    eof: [bool; 2],
    /// Data bytes received (checked against `FileDone` of a `ReadFile`).
    received: u64,
}

impl Slot {
    fn new(kind: Kind, tx: mpsc::Sender<Item>) -> Slot {
        Slot {
            kind,
            tx: Some(tx),
            started: false,
            eof: [false; 2],
            received: 0,
        }
    }

    /// Checks a response against the stream's state; whether it is the final one.
    fn response(&mut self, response: &Response) -> Result<bool, String> {
        let kind = self.kind;
        let unexpected = || {
            format!(
                "{} response on a {} stream{}",
                response.type_name(),
                kind.name(),
                if self.started { "" } else { " before started" }
            )
        };
        match (kind, response) {
            (_, Response::Error { .. }) => Ok(true),
            (Kind::Exec { background }, Response::Started { pid }) if !self.started => {
                if *pid == 0 {
                    return Err("started with pid 0 for a process".into());
                }
                self.started = true;
                Ok(background)
            }
            (Kind::ProcOutput { pid: want }, Response::Started { pid }) if !self.started => {
                if *pid != want {
                    return Err(format!("proc_output of pid {want} started with pid {pid}"));
                }
                self.started = true;
                Ok(false)
            }
            (Kind::ReadFile, Response::Started { pid }) if !self.started => {
                if *pid != 0 {
                    return Err(format!("read_file started with pid {pid}, not 0"));
                }
                self.started = true;
                Ok(false)
            }
            (Kind::Exec { background: false }, Response::Exit { .. }) if self.started => Ok(true),
            (Kind::ProcOutput { .. }, Response::Exit { .. } | Response::Ok {}) if self.started => {
                Ok(true)
            }
            (Kind::ReadFile, Response::FileDone { bytes }) if self.started => {
                if *bytes != self.received {
                    return Err(format!(
                        "read_file ended with file_done of {bytes} bytes, but {} bytes came",
                        self.received
                    ));
                }
                Ok(true)
            }
            (Kind::WriteFile, Response::FileDone { .. }) => Ok(true),
            (Kind::Unary(want), response) if response.type_name() == want => Ok(true),
            _ => Err(unexpected()),
        }
    }

    /// Checks a Data or Eof frame against the stream's state.
    fn data(&mut self, kind: FrameKind, channel: Channel, len: usize) -> Result<(), String> {
        let index = match channel {
            Channel::Stdout => 0,
            Channel::Stderr if self.kind != Kind::ReadFile => 1,
            _ => {
                return Err(format!(
                    "{kind} on {channel} of a {} stream",
                    self.kind.name()
                ))
            }
        };
        if !self.kind.has_output() {
            return Err(format!("{kind} frame on a {} stream", self.kind.name()));
        }
        if !self.started {
            return Err(format!("{kind} frame on {channel} before started"));
        }
        if self.eof[index] {
            return Err(format!("{kind} frame on {channel} after its eof"));
        }
        if kind == FrameKind::Eof {
            self.eof[index] = true;
        } else {
            self.received = self.received.saturating_add(len as u64);
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Closes the connection (once): records why, drops every stream's channel (their
    /// consumers then see the reason), and stops both tasks, which closes the socket.
    fn fail(&self, reason: Reason) {
        {
            let mut state = lock(&self.state);
            if state.closed.is_none() {
                state.closed = Some(reason);
            }
            state.streams.clear();
            state.abandoned.clear();
        }
        self.read_budget.close();
        self.write_budget.close();
        for task in lock(&self.tasks).iter() {
            task.abort();
        }
    }

    fn close_error(&self) -> ClientError {
        match &lock(&self.state).closed {
            Some(reason) => reason.error(),
            None => ClientError::Closed,
        }
    }

    /// Hands one frame from the agent to its stream. An `Err` is a violation.
    async fn dispatch(&self, frame: Frame) -> Result<(), String> {
        frame.check_sender(Role::Agent).map_err(|e| e.to_string())?;
        let stream = frame.stream;
        let kind = frame.kind;
        let channel = frame.channel;
        // Parsed and validated before taking the lock: a listing can be 1 MiB of JSON.
        let mut item = match kind {
            FrameKind::Response => {
                let response = frame.response().map_err(|e| e.to_string())?;
                response
                    .validate()
                    .map_err(|e| format!("invalid {} response: {e}", response.type_name()))?;
                Item::Response {
                    response,
                    last: false,
                }
            }
            FrameKind::Data => Item::Data(channel, Bytes::from(frame.payload), None),
            FrameKind::Eof => Item::Eof,
            FrameKind::Hello => return Err("a second hello".into()),
            FrameKind::Request | FrameKind::Cancel => {
                return Err(format!("{kind} frame from the agent"))
            }
        };
        let tx = {
            let mut state = lock(&self.state);
            if state.closed.is_some() {
                return Ok(());
            }
            let opened = state.ids.is_opened(stream);
            let Some(slot) = state.streams.get_mut(&stream) else {
                return Err(if opened {
                    format!("{kind} frame on stream {stream}, which had already ended")
                } else {
                    format!("{kind} frame on stream {stream}, which the host never opened")
                });
            };
            match &mut item {
                Item::Response { response, last } => *last = slot.response(response)?,
                Item::Data(_, bytes, _) => slot.data(kind, channel, bytes.len())?,
                Item::Eof => slot.data(kind, channel, 0)?,
            }
            let tx = slot.tx.clone();
            if let Item::Response { last: true, .. } = item {
                state.streams.remove(&stream);
                state.abandoned.remove(&stream);
            }
            tx
        };
        let Some(tx) = tx else {
            return Ok(()); // closed by the host: checked, dropped
        };
        let item = match item {
            Item::Data(channel, bytes, None) => {
                let want = bytes.len().min(READ_BUDGET) as u32;
                match self.read_budget.clone().acquire_many_owned(want).await {
                    Ok(permit) => Item::Data(channel, bytes, Some(permit)),
                    Err(_) => return Ok(()), // the connection is closing
                }
            }
            other => other,
        };
        // An error means the consumer went away meanwhile; its drop closed the stream.
        let _ = tx.send(item).await;
        Ok(())
    }
}

/// Reads frames from the socket through a bounded decoder.
struct FrameReader {
    decoder: Decoder,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl FrameReader {
    fn new() -> FrameReader {
        FrameReader {
            decoder: Decoder::new(),
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The next frame; `None` when the agent closed the connection between frames.
    async fn next(&mut self, read: &mut OwnedReadHalf) -> Result<Option<Frame>, Reason> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(err) => return Err(Reason::Protocol(err.to_string())),
            }
            if self.start < self.end {
                let taken = self.decoder.feed(&self.buf[self.start..self.end]);
                if taken == 0 {
                    // Cannot happen (the decoder has room after Ok(None)); never spin.
                    return Err(Reason::Protocol("frame decoder is stuck".into()));
                }
                self.start += taken;
                continue;
            }
            let n = read.read(&mut self.buf).await.map_err(|e| Reason::io(&e))?;
            if n == 0 {
                return match self.decoder.finish() {
                    Ok(()) => Ok(None),
                    Err(err) => Err(Reason::Protocol(err.to_string())),
                };
            }
            self.start = 0;
            self.end = n;
        }
    }
}

async fn reader_task(shared: Arc<Shared>, mut read: OwnedReadHalf, mut frames: FrameReader) {
    let reason = loop {
        match frames.next(&mut read).await {
            Ok(Some(frame)) => {
                if let Err(violation) = shared.dispatch(frame).await {
                    break Reason::Protocol(violation);
                }
            }
            Ok(None) => break Reason::Closed,
            Err(reason) => break reason,
        }
    };
    shared.fail(reason);
}

async fn writer_task(
    shared: Arc<Shared>,
    write: OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut out = BufWriter::with_capacity(READ_CHUNK, write);
    while let Some(message) = queue.recv().await {
        let mut result = out.write_all(&message.bytes).await;
        drop(message);
        if result.is_ok() && queue.is_empty() {
            result = out.flush().await;
        }
        if let Err(err) = result {
            shared.fail(Reason::io(&err));
            return;
        }
    }
    let _ = out.shutdown().await;
}

/// Reads the agent's Hello: the first frame, checked with [`Hello::parse_peer`].
async fn read_hello(
    read: &mut OwnedReadHalf,
    frames: &mut FrameReader,
) -> Result<Hello, ClientError> {
    let frame = match frames.next(read).await {
        Ok(Some(frame)) => frame,
        Ok(None) => return Err(ClientError::Closed),
        Err(reason) => return Err(reason.error()),
    };
    if frame.kind != FrameKind::Hello {
        return Err(ClientError::Protocol(format!(
            "the agent sent a {} frame before its hello",
            frame.kind
        )));
    }
    Hello::parse_peer(&frame.payload, Role::Agent).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Most bytes of a Hello or `Relayed` frame's payload [`relay`] accepts.
const RELAY_FRAME_MAX: usize = 4096;

/// Reads exactly one frame (header and payload) and nothing after it: the bytes that follow
/// a `Relayed` belong to the relayed connection.
async fn read_one_frame(read: &mut UnixStream) -> Result<Frame, ClientError> {
    let mut header = [0u8; moat_proto::frame::HEADER_LEN];
    read.read_exact(&mut header)
        .await
        .map_err(ClientError::Io)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > RELAY_FRAME_MAX {
        return Err(ClientError::Protocol(format!(
            "the agent sent a {len}-byte frame while a relay was set up"
        )));
    }
    let mut whole = header.to_vec();
    whole.resize(header.len() + len, 0);
    read.read_exact(&mut whole[header.len()..])
        .await
        .map_err(ClientError::Io)?;
    let mut decoder = Decoder::new();
    if decoder.feed(&whole) != whole.len() {
        return Err(ClientError::Protocol(
            "the agent's frame does not fit".into(),
        ));
    }
    match decoder.next_frame() {
        Ok(Some(frame)) => Ok(frame),
        Ok(None) => Err(ClientError::Protocol(
            "incomplete frame from the agent".into(),
        )),
        Err(e) => Err(ClientError::Protocol(e.to_string())),
    }
}

/// Asks the agent at `path` for the next workload connection to its egress port
/// ([`Request::Relay`]) and returns the unix connection, which from then on carries that
/// connection's raw bytes both ways, and the workload's source port. Waits as long as no
/// workload connects (the caller keeps a few of these pending).
pub async fn relay(path: &Path) -> Result<(UnixStream, u16), ClientError> {
    let mut stream = tokio::time::timeout(HELLO_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| ClientError::Timeout)?
        .map_err(ClientError::Io)?;
    let encoder = Encoder::new();
    let mut out = Vec::new();
    encoder
        .hello(&mut out, &Hello::new(Role::Host))
        .and_then(|()| encoder.request(&mut out, 1, &Request::Relay {}))
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let hello = async {
        stream.write_all(&out).await.map_err(ClientError::Io)?;
        read_one_frame(&mut stream).await
    };
    let frame = tokio::time::timeout(HELLO_TIMEOUT, hello)
        .await
        .map_err(|_| ClientError::Timeout)??;
    if frame.kind != FrameKind::Hello {
        return Err(ClientError::Protocol(format!(
            "the agent sent a {} frame before its hello",
            frame.kind
        )));
    }
    Hello::parse_peer(&frame.payload, Role::Agent)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let frame = read_one_frame(&mut stream).await?;
    if frame.kind != FrameKind::Response || frame.stream != 1 {
        return Err(ClientError::Protocol(format!(
            "the agent answered a relay with a {} frame on stream {}",
            frame.kind, frame.stream
        )));
    }
    let response = frame
        .response()
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    match response {
        Response::Relayed { peer_port } => Ok((stream, peer_port)),
        Response::Error { code, message } => Err(ClientError::Agent { code, message }),
        other => Err(ClientError::Protocol(format!(
            "the agent answered a relay with {}",
            other.type_name()
        ))),
    }
}

impl AgentClient {
    /// Connects to the agent's socket at `path` and does the handshake (see
    /// [`AgentClient::from_stream`]); fails with [`ClientError::Timeout`] when that takes
    /// over [`HELLO_TIMEOUT`].
    pub async fn connect(path: &Path) -> Result<AgentClient, ClientError> {
        let stream = tokio::time::timeout(HELLO_TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(ClientError::Io)?;
        AgentClient::from_stream(stream).await
    }

    /// Runs the protocol on a connected socket: sends the host's Hello, reads and checks
    /// the agent's (same version, role agent) within [`HELLO_TIMEOUT`], and starts the
    /// reader and writer tasks. Must be called inside a tokio runtime.
    pub async fn from_stream(stream: UnixStream) -> Result<AgentClient, ClientError> {
        let encoder = Encoder::new();
        let (mut read, mut write) = stream.into_split();
        let mut frames = FrameReader::new();
        let mut hello = Vec::new();
        encoder
            .hello(&mut hello, &Hello::new(Role::Host))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let handshake = async {
            write.write_all(&hello).await.map_err(ClientError::Io)?;
            read_hello(&mut read, &mut frames).await
        };
        let peer = tokio::time::timeout(HELLO_TIMEOUT, handshake)
            .await
            .map_err(|_| ClientError::Timeout)??;
        let features = Hello::new(Role::Host).common_features(&peer);

        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ids: StreamIds::new(),
                streams: HashMap::new(),
                abandoned: BTreeSet::new(),
                closed: None,
            }),
            read_budget: Arc::new(Semaphore::new(READ_BUDGET)),
            write_budget: Arc::new(Semaphore::new(WRITE_BUDGET)),
            tasks: Mutex::new(Vec::new()),
        });
        let (writer, queue) = mpsc::unbounded_channel();
        let reader = tokio::spawn(reader_task(shared.clone(), read, frames));
        let writer_handle = tokio::spawn(writer_task(shared.clone(), write, queue));
        lock(&shared.tasks).extend([reader.abort_handle(), writer_handle.abort_handle()]);
        if lock(&shared.state).closed.is_some() {
            // A task failed before its handle was stored: stop the other one too.
            shared.fail(Reason::Closed);
        }
        Ok(AgentClient {
            inner: Arc::new(Inner {
                shared,
                writer,
                encoder,
                features,
            }),
        })
    }

    /// Whether the connection is closed (then every call fails).
    pub fn is_closed(&self) -> bool {
        lock(&self.inner.shared.state).closed.is_some()
    }

    /// Closes the connection now, for every clone and handle: open streams fail with
    /// [`ClientError::Closed`], and the agent kills this connection's foreground processes.
    pub fn close(&self) {
        self.inner.shared.fail(Reason::Closed);
    }

    /// Starts a process. Returns once the request is queued; [`Exec::next`] then gives
    /// `Started` (or `Failed` when it cannot start), the output, and `Exit`.
    pub async fn exec(&self, spec: ExecSpec) -> Result<Exec, ClientError> {
        let background = spec.background;
        let request = spec.into_request();
        let stdin = request.takes_stdin();
        let handle = self
            .inner
            .open(&request, Kind::Exec { background }, true)
            .await?;
        Ok(Exec::new(handle, stdin, Target::Stream))
    }

    /// Streams the retained and (with `follow`) the live output of a background process.
    /// Events as for [`AgentClient::exec`], except that the stream ends without `Exit`
    /// when the process still runs and `follow` is off. Dropping the [`Exec`] ends the
    /// stream and leaves the process alone; its [`ExecInput::signal`] signals the process.
    pub async fn proc_output(&self, pid: u32, follow: bool) -> Result<Exec, ClientError> {
        let request = Request::ProcOutput { pid, follow };
        let handle = self
            .inner
            .open(&request, Kind::ProcOutput { pid }, true)
            .await?;
        Ok(Exec::new(handle, false, Target::Pid(pid)))
    }

    /// Opens a file for reading; returns once the agent opened it (or refused).
    pub async fn read_file(&self, path: &str) -> Result<FileRead, ClientError> {
        let request = Request::ReadFile { path: path.into() };
        let mut handle = self.inner.open(&request, Kind::ReadFile, true).await?;
        match handle.recv().await? {
            Item::Response {
                response: Response::Started { .. },
                last: false,
            } => Ok(FileRead {
                handle,
                done: false,
                failed: false,
            }),
            Item::Response { response, .. } => Err(ClientError::from_agent(response)),
            // The reader lets nothing else come before Started.
            _ => Err(ClientError::Protocol(
                "read_file output before started".into(),
            )),
        }
    }

    /// Starts writing a file: the agent writes a temporary file beside `path` and renames
    /// it into place at [`FileWrite::finish`]. `mode` defaults to 0o644 for a new file.
    pub async fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        create_parents: bool,
    ) -> Result<FileWrite, ClientError> {
        let request = Request::WriteFile {
            path: path.into(),
            mode,
            create_parents,
        };
        let handle = self.inner.open(&request, Kind::WriteFile, true).await?;
        Ok(FileWrite { handle, sent: 0 })
    }

    /// Lists the entries below a directory (`depth` 0: its children only); `true` when the
    /// agent stopped early to stay under the frame limit.
    pub async fn list_dir(
        &self,
        path: &str,
        depth: u32,
    ) -> Result<(Vec<Entry>, bool), ClientError> {
        let request = Request::ListDir {
            path: path.into(),
            depth,
        };
        match self.inner.unary(&request, "listing").await? {
            Response::Listing { entries, truncated } => Ok((entries, truncated)),
            other => Err(ClientError::from_agent(other)),
        }
    }

    /// Describes one path (`lstat` semantics).
    pub async fn stat(&self, path: &str) -> Result<Entry, ClientError> {
        let request = Request::Stat { path: path.into() };
        match self.inner.unary(&request, "stat_result").await? {
            Response::StatResult(entry) => Ok(entry),
            other => Err(ClientError::from_agent(other)),
        }
    }

    /// Creates a directory (`parents`: `mkdir -p`).
    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<(), ClientError> {
        let request = Request::Mkdir {
            path: path.into(),
            parents,
        };
        self.inner.unary_ok(&request).await
    }

    /// Removes a file, a symlink or an (empty, unless `recursive`) directory.
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), ClientError> {
        let request = Request::Remove {
            path: path.into(),
            recursive,
        };
        self.inner.unary_ok(&request).await
    }

    /// Renames a path, replacing a file at `to`.
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), ClientError> {
        let request = Request::Rename {
            from: from.into(),
            to: to.into(),
        };
        self.inner.unary_ok(&request).await
    }

    /// Resource use of the whole sandbox, as its agent sees it.
    pub async fn metrics(&self) -> Result<Metrics, ClientError> {
        match self.inner.unary(&Request::Metrics {}, "metrics").await? {
            Response::Metrics {
                cpu_ms,
                memory_bytes,
                pids,
            } => Ok(Metrics {
                cpu_ms,
                memory_bytes,
                pids,
            }),
            other => Err(ClientError::from_agent(other)),
        }
    }

    /// The background processes the agent started, running or finished.
    pub async fn procs(&self) -> Result<Vec<ProcInfo>, ClientError> {
        match self.inner.unary(&Request::Procs {}, "proc_list").await? {
            Response::ProcList { procs } => Ok(procs),
            other => Err(ClientError::from_agent(other)),
        }
    }

    /// Writes `data` to the stdin pipe of a background process started with `stdin`, and
    /// closes the pipe afterwards when `close`.
    pub async fn proc_stdin(&self, pid: u32, data: Bytes, close: bool) -> Result<(), ClientError> {
        let request = Request::ProcStdin { pid, close };
        let mut handle = self.inner.open(&request, Kind::Unary("ok"), true).await?;
        for chunk in chunks(&data) {
            if let Some(item) = handle.try_recv()? {
                // The agent answered before the end of the bytes: a refusal.
                return Err(item_error(item));
            }
            self.inner.send_data(handle.id, chunk).await?;
        }
        self.inner.send_eof(handle.id).await?;
        match handle.recv().await? {
            Item::Response {
                response: Response::Ok {},
                ..
            } => Ok(()),
            item => Err(item_error(item)),
        }
    }

    /// Whether both ends of this connection speak `feature`.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.inner.features.iter().any(|f| f == feature)
    }

    /// Tells the agent when the sandbox's lifetime ends (ms since the Unix epoch; `None`:
    /// never): then it ends the sandbox itself, whether or not a daemon runs. An agent
    /// without the `deadline` feature (one that outlived an upgrade) gets nothing, and the
    /// answer is `Ok(false)`: only a daemon ends that sandbox.
    pub async fn set_deadline(&self, expires_at_ms: Option<u64>) -> Result<bool, ClientError> {
        if !self.has_feature(moat_proto::msg::FEATURE_DEADLINE) {
            return Ok(false);
        }
        self.inner
            .unary_ok(&Request::SetDeadline { expires_at_ms })
            .await
            .map(|()| true)
    }

    /// Sends `signal` to the process group of a process the agent started (by pid).
    pub async fn signal_pid(&self, pid: u32, signal: i32) -> Result<(), ClientError> {
        self.inner
            .unary_ok(&Request::SignalPid { pid, signal })
            .await
    }
}

fn item_error(item: Item) -> ClientError {
    match item {
        Item::Response { response, .. } => ClientError::from_agent(response),
        _ => ClientError::Protocol("unexpected output from the agent".into()),
    }
}

/// `data` as pieces of at most one frame's payload (one empty piece for empty data is
/// skipped: only Eof ends a channel).
fn chunks(data: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    (0..data.len())
        .step_by(DEFAULT_MAX_PAYLOAD)
        .map(move |at| data.slice(at..(at + DEFAULT_MAX_PAYLOAD).min(data.len())))
}

impl Inner {
    fn closed(&self) -> ClientError {
        self.shared.close_error()
    }

    async fn budget(&self, bytes: usize) -> Result<OwnedSemaphorePermit, ClientError> {
        let want = bytes.min(WRITE_BUDGET) as u32;
        self.shared
            .write_budget
            .clone()
            .acquire_many_owned(want)
            .await
            .map_err(|_| self.closed())
    }

    fn queue(
        &self,
        bytes: Vec<u8>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<(), ClientError> {
        self.writer
            .send(Outgoing {
                bytes,
                _permit: permit,
            })
            .map_err(|_| self.closed())
    }

    /// Validates and sends `request` on a fresh stream, ready for the agent's answer.
    async fn open(
        self: &Arc<Self>,
        request: &Request,
        kind: Kind,
        cancel_on_drop: bool,
    ) -> Result<StreamHandle, ClientError> {
        request.validate().map_err(|e| ClientError::Agent {
            code: e.code(),
            message: e.to_string(),
        })?;
        let mut frame = Vec::new();
        // Encoded with a stand-in id; the real one is patched in under the lock below.
        self.encoder
            .request(&mut frame, 1, request)
            .map_err(|e| ClientError::Agent {
                code: ErrorCode::TooLarge,
                message: format!("{} request cannot be sent: {e}", request.type_name()),
            })?;
        let permit = self.budget(frame.len()).await?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        // Allocating the id and queueing the frame under one lock keeps requests in id
        // order on the wire, as the agent requires.
        let mut state = lock(&self.shared.state);
        if let Some(reason) = &state.closed {
            return Err(reason.error());
        }
        let id = state.ids.allocate().ok_or_else(|| ClientError::Agent {
            code: ErrorCode::Busy,
            message: "this connection has used up its stream ids: connect again".into(),
        })?;
        if let Some(field) = frame.get_mut(8..HEADER_LEN) {
            field.copy_from_slice(&id.to_le_bytes());
        }
        state.streams.insert(id, Slot::new(kind, tx));
        if let Err(err) = self.queue(frame, Some(permit)) {
            state.streams.remove(&id);
            return Err(err);
        }
        drop(state);
        Ok(StreamHandle {
            inner: self.clone(),
            id,
            rx,
            cancel_on_drop,
            finished: false,
        })
    }

    /// A request answered by one final response of type `want` (or `Error`).
    async fn unary(
        self: &Arc<Self>,
        request: &Request,
        want: &'static str,
    ) -> Result<Response, ClientError> {
        let mut handle = self.open(request, Kind::Unary(want), false).await?;
        match handle.recv().await? {
            Item::Response {
                response: Response::Error { code, message },
                ..
            } => Err(ClientError::Agent { code, message }),
            Item::Response { response, .. } => Ok(response),
            _ => Err(ClientError::Protocol(
                "unexpected output from the agent".into(),
            )),
        }
    }

    async fn unary_ok(self: &Arc<Self>, request: &Request) -> Result<(), ClientError> {
        match self.unary(request, "ok").await? {
            Response::Ok {} => Ok(()),
            other => Err(ClientError::from_agent(other)),
        }
    }

    /// Queues one chunk (at most one frame's payload) of channel 0 Data.
    async fn send_data(&self, stream: u32, chunk: Bytes) -> Result<(), ClientError> {
        let permit = self.budget(chunk.len() + HEADER_LEN).await?;
        let mut frame = Vec::with_capacity(chunk.len() + HEADER_LEN);
        self.encoder
            .data(&mut frame, stream, Channel::Stdin, &chunk)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.queue(frame, Some(permit))
    }

    async fn send_eof(&self, stream: u32) -> Result<(), ClientError> {
        let permit = self.budget(HEADER_LEN).await?;
        let mut frame = Vec::with_capacity(HEADER_LEN);
        self.encoder
            .eof(&mut frame, stream, Channel::Stdin)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.queue(frame, Some(permit))
    }

    /// Queues a Cancel without waiting (also from `Drop`).
    fn send_cancel(&self, stream: u32) -> Result<(), ClientError> {
        let mut frame = Vec::with_capacity(HEADER_LEN);
        self.encoder
            .cancel(&mut frame, stream)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.queue(frame, None)
    }

    /// The host closes `stream` before its final response: its frames are dropped from now
    /// on, and the agent is told to stop (`cancel`).
    fn abandon(&self, stream: u32, cancel: bool) {
        let mut state = lock(&self.shared.state);
        let Some(slot) = state.streams.get_mut(&stream) else {
            return; // already ended
        };
        slot.tx = None;
        state.abandoned.insert(stream);
        if state.abandoned.len() > MAX_ABANDONED {
            if let Some(oldest) = state.abandoned.pop_first() {
                state.streams.remove(&oldest);
            }
        }
        drop(state);
        if cancel {
            let _ = self.send_cancel(stream);
        }
    }
}

/// A consumer's end of one stream. Dropped before the final response, it closes the
/// stream (see the module docs).
struct StreamHandle {
    inner: Arc<Inner>,
    id: u32,
    rx: mpsc::Receiver<Item>,
    cancel_on_drop: bool,
    finished: bool,
}

impl StreamHandle {
    /// The next item; an error when the connection closed first.
    async fn recv(&mut self) -> Result<Item, ClientError> {
        match self.rx.recv().await {
            Some(item) => {
                self.note(&item);
                Ok(item)
            }
            None => {
                self.finished = true;
                Err(self.inner.closed())
            }
        }
    }

    /// The next item if one is waiting.
    fn try_recv(&mut self) -> Result<Option<Item>, ClientError> {
        match self.rx.try_recv() {
            Ok(item) => {
                self.note(&item);
                Ok(Some(item))
            }
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => {
                self.finished = true;
                Err(self.inner.closed())
            }
        }
    }

    fn note(&mut self, item: &Item) {
        if let Item::Response { last: true, .. } = item {
            self.finished = true;
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        if !self.finished {
            self.inner.abandon(self.id, self.cancel_on_drop);
        }
    }
}

/// What signals and resizes go to.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// The process of the exec on this stream (`Signal`, `Resize`).
    Stream,
    /// A pid (`SignalPid`), for `proc_output`.
    Pid(u32),
}

/// A running request of [`AgentClient::exec`] or [`AgentClient::proc_output`]. Dropping
/// it before the end sends Cancel: the agent kills an exec's process group (a
/// `proc_output` only stops streaming).
pub struct Exec {
    handle: StreamHandle,
    input: ExecInput,
    pid: Option<u32>,
    done: bool,
}

impl fmt::Debug for Exec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exec")
            .field("stream", &self.handle.id)
            .field("pid", &self.pid)
            .field("done", &self.done)
            .finish()
    }
}

impl Exec {
    fn new(handle: StreamHandle, stdin: bool, target: Target) -> Exec {
        let input = ExecInput {
            inner: handle.inner.clone(),
            stream: handle.id,
            target,
            stdin: Arc::new(tokio::sync::Mutex::new(if stdin {
                StdinState::Open
            } else {
                StdinState::None
            })),
        };
        Exec {
            handle,
            input,
            pid: None,
            done: false,
        }
    }

    /// The next event; `None` after the last (`Exit` or `Failed`, or the end of a
    /// background exec's or a non-following `proc_output`'s stream).
    pub async fn next(&mut self) -> Option<ExecEvent> {
        if self.done {
            return None;
        }
        loop {
            let item = match self.handle.recv().await {
                Ok(item) => item,
                Err(err) => {
                    self.done = true;
                    return Some(ExecEvent::Failed(err));
                }
            };
            match item {
                Item::Data(Channel::Stderr, bytes, _) => return Some(ExecEvent::Stderr(bytes)),
                Item::Data(_, bytes, _) => return Some(ExecEvent::Stdout(bytes)),
                Item::Eof => continue,
                Item::Response { response, last } => {
                    self.done = last;
                    return match response {
                        Response::Started { pid } => {
                            self.pid = Some(pid);
                            Some(ExecEvent::Started { pid })
                        }
                        Response::Exit {
                            exit_code,
                            signal,
                            status,
                        } => Some(ExecEvent::Exit {
                            exit_code,
                            signal,
                            status,
                        }),
                        Response::Ok {} => None,
                        other => Some(ExecEvent::Failed(ClientError::from_agent(other))),
                    };
                }
            }
        }
    }

    /// The pid, once `Started` came.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// A handle for stdin, Cancel, signals and resizes, usable while [`Exec::next`] waits.
    pub fn stdin(&self) -> ExecInput {
        self.input.clone()
    }
}

#[derive(Debug, PartialEq, Eq)]
enum StdinState {
    /// The request has no stdin on this stream.
    None,
    Open,
    Closed,
}

/// Input to a running [`Exec`]; clones share one stdin. Writes of different clones never
/// interleave within one call, and none goes after [`ExecInput::close`].
#[derive(Clone)]
pub struct ExecInput {
    inner: Arc<Inner>,
    stream: u32,
    target: Target,
    stdin: Arc<tokio::sync::Mutex<StdinState>>,
}

impl fmt::Debug for ExecInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecInput")
            .field("stream", &self.stream)
            .finish()
    }
}

impl ExecInput {
    /// Writes `data` to the process's stdin (waits while the writer's queue is full).
    pub async fn write(&self, data: Bytes) -> Result<(), ClientError> {
        let state = self.stdin.lock().await;
        match *state {
            StdinState::Open => {}
            StdinState::None => {
                return Err(ClientError::invalid(
                    "this process has no stdin on this stream: start it with stdin: true \
                     (in the background, write with proc_stdin)",
                ))
            }
            StdinState::Closed => {
                return Err(ClientError::invalid(
                    "stdin of this process is already closed",
                ))
            }
        }
        for chunk in chunks(&data) {
            self.inner.send_data(self.stream, chunk).await?;
        }
        Ok(())
    }

    /// Closes the process's stdin (Eof); closing twice is fine.
    pub async fn close(&self) -> Result<(), ClientError> {
        let mut state = self.stdin.lock().await;
        match *state {
            StdinState::Open => {
                *state = StdinState::Closed;
                self.inner.send_eof(self.stream).await
            }
            StdinState::Closed => Ok(()),
            StdinState::None => Err(ClientError::invalid(
                "this process has no stdin on this stream to close",
            )),
        }
    }

    /// Sends Cancel: the agent kills the exec's process group (status `killed`), or ends a
    /// `proc_output` stream.
    pub fn cancel(&self) -> Result<(), ClientError> {
        self.inner.send_cancel(self.stream)
    }

    /// Sends `signal` (1 to 64) to the process group; waits for the agent's answer.
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        let request = match self.target {
            Target::Stream => Request::Signal {
                stream: self.stream,
                signal,
            },
            Target::Pid(pid) => Request::SignalPid { pid, signal },
        };
        self.inner.unary_ok(&request).await
    }

    /// Changes the terminal size of a process started on a pty.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        match self.target {
            Target::Stream => {
                let request = Request::Resize {
                    stream: self.stream,
                    rows,
                    cols,
                };
                self.inner.unary_ok(&request).await
            }
            Target::Pid(_) => Err(ClientError::invalid(
                "a proc_output stream cannot resize its process's terminal",
            )),
        }
    }
}

/// A file being read ([`AgentClient::read_file`]). Dropping it before the end sends Cancel.
pub struct FileRead {
    handle: StreamHandle,
    done: bool,
    failed: bool,
}

impl fmt::Debug for FileRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileRead")
            .field("stream", &self.handle.id)
            .finish()
    }
}

impl FileRead {
    /// The next piece of the file (at most 1 MiB); `Ok(None)` at its end, once the agent's
    /// byte count matched what came. After an error the content so far must be discarded;
    /// later calls return [`ClientError::Closed`].
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        if self.failed {
            return Err(ClientError::Closed);
        }
        if self.done {
            return Ok(None);
        }
        loop {
            let item = match self.handle.recv().await {
                Ok(item) => item,
                Err(err) => {
                    self.failed = true;
                    return Err(err);
                }
            };
            match item {
                Item::Data(_, bytes, _) => return Ok(Some(bytes)),
                Item::Eof => continue,
                Item::Response {
                    response: Response::FileDone { .. },
                    ..
                } => {
                    self.done = true;
                    return Ok(None);
                }
                Item::Response { response, .. } => {
                    self.failed = true;
                    return Err(ClientError::from_agent(response));
                }
            }
        }
    }

    /// Reads the rest of the file into memory (at most `limit` bytes, else
    /// [`ErrorCode::TooLarge`]; the stream is then cancelled).
    pub async fn read_to_end(mut self, limit: usize) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.next_chunk().await? {
            if out.len() + chunk.len() > limit {
                return Err(ClientError::Agent {
                    code: ErrorCode::TooLarge,
                    message: format!("the file is over the limit of {limit} bytes"),
                });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

/// A file being written ([`AgentClient::write_file`]). Dropping it without
/// [`FileWrite::finish`] sends Cancel: the agent drops the temporary file and the old file
/// stays.
pub struct FileWrite {
    handle: StreamHandle,
    sent: u64,
}

impl fmt::Debug for FileWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileWrite")
            .field("stream", &self.handle.id)
            .field("sent", &self.sent)
            .finish()
    }
}

impl FileWrite {
    /// Sends more content. Fails at once when the agent already refused the write.
    pub async fn write(&mut self, data: Bytes) -> Result<(), ClientError> {
        for chunk in chunks(&data) {
            if let Some(item) = self.handle.try_recv()? {
                return Err(match item {
                    Item::Response {
                        response: Response::FileDone { .. },
                        ..
                    } => ClientError::Protocol(
                        "the agent answered file_done before the end of the content".into(),
                    ),
                    item => item_error(item),
                });
            }
            let len = chunk.len() as u64;
            self.inner().send_data(self.handle.id, chunk).await?;
            self.sent += len;
        }
        Ok(())
    }

    /// Ends the content and waits for the agent to put the file in place; the bytes
    /// written.
    pub async fn finish(mut self) -> Result<u64, ClientError> {
        if let Some(item) = self.handle.try_recv()? {
            return Err(item_error(item));
        }
        self.inner().send_eof(self.handle.id).await?;
        match self.handle.recv().await? {
            Item::Response {
                response: Response::FileDone { bytes },
                ..
            } if bytes == self.sent => Ok(bytes),
            Item::Response {
                response: Response::FileDone { bytes },
                ..
            } => Err(ClientError::Protocol(format!(
                "the agent wrote {bytes} bytes, but {} were sent",
                self.sent
            ))),
            item => Err(item_error(item)),
        }
    }

    fn inner(&self) -> Arc<Inner> {
        self.handle.inner.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_proto::EntryKind;

    /// The agent's side of a socket pair, scripted by each test.
    struct FakeAgent {
        read: OwnedReadHalf,
        write: OwnedWriteHalf,
        frames: FrameReader,
        enc: Encoder,
    }

    impl FakeAgent {
        /// The next frame from the host, checked like the real agent checks it.
        async fn recv(&mut self) -> Option<Frame> {
            let frame = match self.frames.next(&mut self.read).await {
                Ok(frame) => frame?,
                // The host closed with our frames unread.
                Err(Reason::Closed) => return None,
                Err(err) => panic!("{err:?}"),
            };
            frame.check_sender(Role::Host).unwrap();
            Some(frame)
        }

        /// The next request: its stream and the request.
        async fn request(&mut self) -> (u32, Request) {
            let frame = self.recv().await.expect("a request");
            assert_eq!(frame.kind, FrameKind::Request, "{frame:?}");
            let request = frame.request().unwrap();
            request.validate().unwrap();
            (frame.stream, request)
        }

        async fn raw(&mut self, bytes: &[u8]) {
            self.write.write_all(bytes).await.unwrap();
        }

        async fn respond(&mut self, stream: u32, response: &Response) {
            let mut out = Vec::new();
            self.enc.response(&mut out, stream, response).unwrap();
            self.raw(&out).await;
        }

        async fn data(&mut self, stream: u32, channel: Channel, bytes: &[u8]) {
            let mut out = Vec::new();
            self.enc.data(&mut out, stream, channel, bytes).unwrap();
            self.raw(&out).await;
        }

        async fn eof(&mut self, stream: u32, channel: Channel) {
            let mut out = Vec::new();
            self.enc.eof(&mut out, stream, channel).unwrap();
            self.raw(&out).await;
        }
    }

    fn hello_bytes(hello: &Hello) -> Vec<u8> {
        let mut out = Vec::new();
        Encoder::new().hello(&mut out, hello).unwrap();
        out
    }

    /// A fake agent whose first bytes are `first`, and the host's result of connecting.
    async fn connect_with(first: Vec<u8>) -> (Result<AgentClient, ClientError>, FakeAgent) {
        let (host, agent) = UnixStream::pair().unwrap();
        let (read, mut write) = agent.into_split();
        write.write_all(&first).await.unwrap();
        let client = AgentClient::from_stream(host).await;
        let mut agent = FakeAgent {
            read,
            write,
            frames: FrameReader::new(),
            enc: Encoder::new(),
        };
        if client.is_ok() {
            let hello = agent.recv().await.unwrap();
            assert_eq!(hello.kind, FrameKind::Hello);
            Hello::parse_peer(&hello.payload, Role::Host).unwrap();
        }
        (client, agent)
    }

    async fn pair() -> (AgentClient, FakeAgent) {
        let (client, agent) = connect_with(hello_bytes(&Hello::new(Role::Agent))).await;
        (client.unwrap(), agent)
    }

    fn exit(code: i32) -> Response {
        Response::Exit {
            exit_code: Some(code),
            signal: None,
            status: Status::Ok,
        }
    }

    fn entry(path: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::File,
            size: 3,
            mode: 0o644,
            mtime_ms: 0,
        }
    }

    fn protocol(err: ClientError) -> String {
        match err {
            ClientError::Protocol(why) => why,
            other => panic!("not a protocol error: {other:?}"),
        }
    }

    /// Everything a finished exec gave: stdout, stderr, the exit (or failure).
    async fn collect(exec: &mut Exec) -> (Vec<u8>, Vec<u8>, Option<ExecEvent>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut last = None;
        while let Some(event) = exec.next().await {
            match event {
                ExecEvent::Started { .. } => {}
                ExecEvent::Stdout(b) => out.extend_from_slice(&b),
                ExecEvent::Stderr(b) => err.extend_from_slice(&b),
                other => last = Some(other),
            }
        }
        (out, err, last)
    }

    #[tokio::test]
    async fn hello_mismatches_are_refused() {
        let newer = Hello {
            version: 2,
            ..Hello::new(Role::Agent)
        };
        let (client, _agent) = connect_with(hello_bytes(&newer)).await;
        let why = protocol(client.unwrap_err());
        assert!(
            why.contains("version 1") && why.contains("version 2"),
            "{why}"
        );

        let (client, _agent) = connect_with(hello_bytes(&Hello::new(Role::Host))).await;
        assert!(protocol(client.unwrap_err()).contains("host"));

        let mut ok = Vec::new();
        Encoder::new()
            .response(&mut ok, 1, &Response::Ok {})
            .unwrap();
        let (client, _agent) = connect_with(ok).await;
        assert!(protocol(client.unwrap_err()).contains("before its hello"));

        let (client, agent) = connect_with(b"\xff\xff\xff\xff garbage".to_vec()).await;
        assert!(matches!(client, Err(ClientError::Protocol(_))));
        drop(agent);

        // The agent closes at once (over its connection limit).
        let (host, agent) = UnixStream::pair().unwrap();
        drop(agent);
        assert!(matches!(
            AgentClient::from_stream(host).await,
            Err(ClientError::Closed | ClientError::Io(_))
        ));
    }

    #[tokio::test]
    async fn a_silent_agent_times_out() {
        let (host, _agent) = UnixStream::pair().unwrap();
        let started = std::time::Instant::now();
        let err = AgentClient::from_stream(host).await.unwrap_err();
        assert!(matches!(err, ClientError::Timeout), "{err:?}");
        assert!(started.elapsed() >= HELLO_TIMEOUT);
        let missing = Path::new("/nonexistent/moat-agent.sock");
        assert!(matches!(
            AgentClient::connect(missing).await,
            Err(ClientError::Io(_))
        ));
    }

    #[tokio::test]
    async fn exec_with_stdin_stdout_stderr_and_exit() {
        let (client, mut agent) = pair().await;
        let mut spec = ExecSpec::new(["sh", "-c", "cat; echo done >&2"]);
        spec.stdin = true;
        spec.cwd = Some("/work".into());
        spec.timeout_ms = Some(10_000);
        let mut exec = client.exec(spec).await.unwrap();
        let input = exec.stdin();

        let (s, request) = agent.request().await;
        assert_eq!(s, 1);
        assert!(
            matches!(request, Request::Exec { stdin: true, background: false, ref cwd, .. } if cwd.as_deref() == Some("/work"))
        );
        agent.respond(s, &Response::Started { pid: 7 }).await;
        assert!(matches!(
            exec.next().await,
            Some(ExecEvent::Started { pid: 7 })
        ));
        assert_eq!(exec.pid(), Some(7));

        input.write(Bytes::from_static(b"hello")).await.unwrap();
        input.close().await.unwrap();
        input.close().await.unwrap(); // twice is fine, one Eof
        let err = input.write(Bytes::from_static(b"late")).await.unwrap_err();
        assert!(matches!(
            err,
            ClientError::Agent {
                code: ErrorCode::InvalidRequest,
                ..
            }
        ));
        let data = agent.recv().await.unwrap();
        assert_eq!(
            (data.kind, data.channel, data.stream),
            (FrameKind::Data, Channel::Stdin, 1)
        );
        assert_eq!(data.payload, b"hello");
        let eof = agent.recv().await.unwrap();
        assert_eq!((eof.kind, eof.channel), (FrameKind::Eof, Channel::Stdin));

        agent.data(s, Channel::Stdout, b"hel").await;
        agent.data(s, Channel::Stderr, b"done\n").await;
        agent.data(s, Channel::Stdout, b"lo").await;
        agent.eof(s, Channel::Stdout).await;
        agent.eof(s, Channel::Stderr).await;
        agent.respond(s, &exit(3)).await;
        let (out, err, last) = collect(&mut exec).await;
        assert_eq!((&out[..], &err[..]), (&b"hello"[..], &b"done\n"[..]));
        assert!(matches!(
            last,
            Some(ExecEvent::Exit {
                exit_code: Some(3),
                signal: None,
                status: Status::Ok
            })
        ));
        assert!(exec.next().await.is_none());

        // Signal and resize go on streams of their own.
        let signal = tokio::spawn(async move { input.signal(15).await });
        let (t, request) = agent.request().await;
        assert_eq!(
            request,
            Request::Signal {
                stream: 1,
                signal: 15
            }
        );
        agent.respond(t, &Response::Ok {}).await;
        signal.await.unwrap().unwrap();
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn large_stdin_is_split_into_frames() {
        let (client, mut agent) = pair().await;
        let mut spec = ExecSpec::new(["cat"]);
        spec.stdin = true;
        let exec = client.exec(spec).await.unwrap();
        let big: Vec<u8> = (0..DEFAULT_MAX_PAYLOAD * 2 + 5).map(|i| i as u8).collect();
        let input = exec.stdin();
        let sent = big.clone();
        let writer = tokio::spawn(async move { input.write(Bytes::from(sent)).await });
        agent.request().await;
        let mut got = Vec::new();
        while got.len() < big.len() {
            let frame = agent.recv().await.unwrap();
            assert_eq!(frame.kind, FrameKind::Data);
            assert!(frame.payload.len() <= DEFAULT_MAX_PAYLOAD);
            got.extend_from_slice(&frame.payload);
        }
        assert_eq!(got, big);
        writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn agent_errors_are_agent_errors() {
        let (client, mut agent) = pair().await;
        let mut exec = client.exec(ExecSpec::new(["nope"])).await.unwrap();
        let (s, _) = agent.request().await;
        agent
            .respond(
                s,
                &Response::error(ErrorCode::NotFound, "nope: no such program"),
            )
            .await;
        match exec.next().await {
            Some(ExecEvent::Failed(ClientError::Agent { code, message })) => {
                assert_eq!(code, ErrorCode::NotFound);
                assert!(message.contains("nope"));
            }
            other => panic!("{other:?}"),
        }
        assert!(exec.next().await.is_none());

        let stat = tokio::spawn({
            let client = client.clone();
            async move { client.stat("/work/x").await }
        });
        let (s, request) = agent.request().await;
        assert_eq!(
            request,
            Request::Stat {
                path: "/work/x".into()
            }
        );
        agent
            .respond(s, &Response::error(ErrorCode::PermissionDenied, "no"))
            .await;
        assert!(matches!(
            stat.await.unwrap(),
            Err(ClientError::Agent {
                code: ErrorCode::PermissionDenied,
                ..
            })
        ));

        // A request the agent would refuse is refused here, and never sent.
        let err = client
            .exec(ExecSpec::new(Vec::<String>::new()))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            ClientError::Agent {
                code: ErrorCode::InvalidRequest,
                ..
            }
        ));
        let err = client.stat("relative").await.unwrap_err();
        assert!(matches!(
            err,
            ClientError::Agent {
                code: ErrorCode::InvalidRequest,
                ..
            }
        ));
        let err = client.signal_pid(3, 99).await.unwrap_err();
        assert!(matches!(
            err,
            ClientError::Agent {
                code: ErrorCode::InvalidRequest,
                ..
            }
        ));
        // The connection is fine, and the next stream id is the next odd one.
        let mkdir = tokio::spawn({
            let client = client.clone();
            async move { client.mkdir("/work/d", true).await }
        });
        let (s, _) = agent.request().await;
        assert_eq!(s, 5);
        agent.respond(s, &Response::Ok {}).await;
        mkdir.await.unwrap().unwrap();
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn unary_requests() {
        let (client, mut agent) = pair().await;
        let c = client.clone();
        let calls = tokio::spawn(async move {
            let listing = c.list_dir("/work", 2).await.unwrap();
            let stat = c.stat("/work/a").await.unwrap();
            c.mkdir("/work/d", false).await.unwrap();
            c.remove("/work/d", true).await.unwrap();
            c.rename("/work/a", "/work/b").await.unwrap();
            let metrics = c.metrics().await.unwrap();
            let procs = c.procs().await.unwrap();
            c.signal_pid(12, 9).await.unwrap();
            (listing, stat, metrics, procs)
        });
        let proc = ProcInfo {
            pid: 12,
            argv: vec!["sleep".into(), "9".into()],
            running: true,
            exit_code: None,
            signal: None,
            status: None,
            started_ms: 1,
            finished_ms: None,
        };
        let answers = [
            Response::Listing {
                entries: vec![entry("/work/a")],
                truncated: true,
            },
            Response::StatResult(entry("/work/a")),
            Response::Ok {},
            Response::Ok {},
            Response::Ok {},
            Response::Metrics {
                cpu_ms: 1,
                memory_bytes: 2,
                pids: 3,
            },
            Response::ProcList {
                procs: vec![proc.clone()],
            },
            Response::Ok {},
        ];
        let mut requests = Vec::new();
        for answer in &answers {
            let (s, request) = agent.request().await;
            requests.push(request.type_name());
            agent.respond(s, answer).await;
        }
        assert_eq!(
            requests,
            [
                "list_dir",
                "stat",
                "mkdir",
                "remove",
                "rename",
                "metrics",
                "procs",
                "signal_pid"
            ]
        );
        let (listing, stat, metrics, procs) = calls.await.unwrap();
        assert_eq!(listing, (vec![entry("/work/a")], true));
        assert_eq!(stat, entry("/work/a"));
        assert_eq!(
            metrics,
            Metrics {
                cpu_ms: 1,
                memory_bytes: 2,
                pids: 3
            }
        );
        assert_eq!(procs, [proc]);
    }

    /// One hostile move of the agent, given the stream of a pending `stat`.
    type Hostile = fn(u32) -> Vec<u8>;

    fn response_bytes(stream: u32, response: &Response) -> Vec<u8> {
        let mut out = Vec::new();
        Encoder::new().response(&mut out, stream, response).unwrap();
        out
    }

    fn raw_frame(len: u32, kind: u8, channel: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&[kind, channel, 0, 0]);
        out.extend_from_slice(&stream.to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[tokio::test]
    async fn a_hostile_agent_closes_the_connection() {
        let cases: Vec<(&str, Hostile)> = vec![
            ("unopened stream", |_| response_bytes(99, &Response::Ok {})),
            ("even stream", |_| response_bytes(2, &Response::Ok {})),
            ("bad json", |s| raw_frame(5, 3, 0, s, b"{\"typ")),
            ("not an object", |s| raw_frame(2, 3, 0, s, b"[]")),
            ("unknown response", |s| {
                raw_frame(15, 3, 0, s, b"{\"type\":\"boom\"}")
            }),
            ("oversize header", |s| raw_frame(u32::MAX, 4, 1, s, b"")),
            ("unknown kind", |s| raw_frame(0, 77, 0, s, b"")),
            ("a request", |s| {
                let mut out = Vec::new();
                Encoder::new()
                    .request(&mut out, s, &Request::Metrics {})
                    .unwrap();
                out
            }),
            ("stdin data", |s| raw_frame(1, 4, 0, s, b"x")),
            ("data on a stat", |s| raw_frame(1, 4, 1, s, b"x")),
            ("wrong type", |s| {
                response_bytes(
                    s,
                    &Response::Listing {
                        entries: vec![],
                        truncated: false,
                    },
                )
            }),
            ("started on a stat", |s| {
                response_bytes(s, &Response::Started { pid: 3 })
            }),
            ("invalid entry", |s| {
                response_bytes(s, &Response::StatResult(entry("relative")))
            }),
            ("second hello", |_| hello_bytes(&Hello::new(Role::Agent))),
            ("after the final", |s| {
                let mut out = response_bytes(s, &Response::StatResult(entry("/a")));
                out.extend(response_bytes(s, &Response::Ok {}));
                out
            }),
        ];
        for (name, hostile) in cases {
            let (client, mut agent) = pair().await;
            let exec = client.exec(ExecSpec::new(["sleep", "9"])).await.unwrap();
            let c = client.clone();
            let stat = tokio::spawn(async move { c.stat("/a").await });
            let (e, _) = agent.request().await;
            let (s, _) = agent.request().await;
            agent.respond(e, &Response::Started { pid: 5 }).await;
            agent.raw(&hostile(s)).await;
            let result = stat.await.unwrap();
            let mut exec = exec;
            let mut last = None;
            while let Some(event) = exec.next().await {
                last = Some(event);
            }
            if name == "after the final" {
                result.unwrap();
            } else {
                let why = protocol(result.unwrap_err());
                assert!(!why.is_empty(), "{name}");
            }
            match last {
                Some(ExecEvent::Failed(ClientError::Protocol(_))) => {}
                other => panic!("{name}: {other:?}"),
            }
            assert!(client.is_closed(), "{name}");
            // The host closed the socket: the agent reads its end.
            while agent.recv().await.is_some() {}
            let err = client.metrics().await.unwrap_err();
            assert!(matches!(err, ClientError::Protocol(_)), "{name}: {err:?}");
        }
    }

    #[tokio::test]
    async fn exec_state_violations() {
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("data before started", vec![raw_frame(1, 4, 1, 1, b"x")]),
            ("exit before started", vec![response_bytes(1, &exit(0))]),
            (
                "pid 0",
                vec![response_bytes(1, &Response::Started { pid: 0 })],
            ),
            (
                "twice started",
                vec![
                    response_bytes(1, &Response::Started { pid: 4 }),
                    response_bytes(1, &Response::Started { pid: 4 }),
                ],
            ),
            (
                "data after eof",
                vec![
                    response_bytes(1, &Response::Started { pid: 4 }),
                    raw_frame(0, 5, 2, 1, b""),
                    raw_frame(1, 4, 2, 1, b"x"),
                ],
            ),
            (
                "exit code 300",
                vec![
                    response_bytes(1, &Response::Started { pid: 4 }),
                    raw_frame(
                        58,
                        3,
                        0,
                        1,
                        br#"{"type":"exit","exit_code":300,"signal":null,"status":"ok"}"#,
                    ),
                ],
            ),
        ];
        for (name, frames) in cases {
            let (client, mut agent) = pair().await;
            let mut exec = client.exec(ExecSpec::new(["true"])).await.unwrap();
            agent.request().await;
            for frame in frames {
                agent.raw(&frame).await;
            }
            let mut last = None;
            while let Some(event) = exec.next().await {
                last = Some(event);
            }
            assert!(
                matches!(last, Some(ExecEvent::Failed(ClientError::Protocol(_)))),
                "{name}: {last:?}"
            );
            assert!(client.is_closed(), "{name}");
        }
    }

    #[tokio::test]
    async fn the_agent_closing_fails_what_is_pending() {
        let (client, mut agent) = pair().await;
        let mut exec = client.exec(ExecSpec::new(["sleep", "9"])).await.unwrap();
        agent.request().await;
        drop(agent);
        match exec.next().await {
            Some(ExecEvent::Failed(ClientError::Closed)) => {}
            other => panic!("{other:?}"),
        }
        assert!(client.is_closed());
        assert!(matches!(client.metrics().await, Err(ClientError::Closed)));
        assert!(matches!(
            client.exec(ExecSpec::new(["ls"])).await,
            Err(ClientError::Closed)
        ));
    }

    #[tokio::test]
    async fn read_file_assembles_chunks_and_checks_the_count() {
        let (client, mut agent) = pair().await;
        let c = client.clone();
        let read = tokio::spawn(async move {
            let file = c.read_file("/work/out.csv").await?;
            file.read_to_end(1 << 30).await
        });
        let (s, request) = agent.request().await;
        assert_eq!(
            request,
            Request::ReadFile {
                path: "/work/out.csv".into()
            }
        );
        let big: Vec<u8> = (0..DEFAULT_MAX_PAYLOAD * 3 + 7)
            .map(|i| (i % 251) as u8)
            .collect();
        agent.respond(s, &Response::Started { pid: 0 }).await;
        agent.data(s, Channel::Stdout, &big).await;
        agent.eof(s, Channel::Stdout).await;
        agent
            .respond(
                s,
                &Response::FileDone {
                    bytes: big.len() as u64,
                },
            )
            .await;
        assert_eq!(read.await.unwrap().unwrap(), big);

        // A count that does not match what came is a violation.
        let c = client.clone();
        let read = tokio::spawn(async move {
            let mut file = c.read_file("/work/x").await.unwrap();
            let mut got = Vec::new();
            loop {
                match file.next_chunk().await {
                    Ok(Some(chunk)) => got.extend_from_slice(&chunk),
                    Ok(None) => panic!("a clean end"),
                    Err(err) => {
                        assert!(matches!(file.next_chunk().await, Err(ClientError::Closed)));
                        return (got, err);
                    }
                }
            }
        });
        let (s, _) = agent.request().await;
        agent.respond(s, &Response::Started { pid: 0 }).await;
        agent.data(s, Channel::Stdout, b"abc").await;
        agent.eof(s, Channel::Stdout).await;
        agent.respond(s, &Response::FileDone { bytes: 4 }).await;
        let (got, err) = read.await.unwrap();
        assert_eq!(got, b"abc");
        assert!(protocol(err).contains("4 bytes"));
        assert!(client.is_closed());
    }

    #[tokio::test]
    async fn read_file_errors() {
        let (client, mut agent) = pair().await;
        let c = client.clone();
        let open = tokio::spawn(async move { c.read_file("/missing").await.map(|_| ()) });
        let (s, _) = agent.request().await;
        agent
            .respond(s, &Response::error(ErrorCode::NotFound, "no such file"))
            .await;
        assert!(matches!(
            open.await.unwrap(),
            Err(ClientError::Agent {
                code: ErrorCode::NotFound,
                ..
            })
        ));

        // An error in the middle: the content so far is reported as failed.
        let c = client.clone();
        let read = tokio::spawn(async move { c.read_file("/f").await?.read_to_end(100).await });
        let (s, _) = agent.request().await;
        agent.respond(s, &Response::Started { pid: 0 }).await;
        agent.data(s, Channel::Stdout, b"part").await;
        agent
            .respond(s, &Response::error(ErrorCode::Internal, "read failed"))
            .await;
        assert!(matches!(
            read.await.unwrap(),
            Err(ClientError::Agent {
                code: ErrorCode::Internal,
                ..
            })
        ));

        // Over the caller's limit: cancelled.
        let c = client.clone();
        let read = tokio::spawn(async move { c.read_file("/f").await?.read_to_end(2).await });
        let (s, _) = agent.request().await;
        agent.respond(s, &Response::Started { pid: 0 }).await;
        agent.data(s, Channel::Stdout, b"abc").await;
        assert!(matches!(
            read.await.unwrap(),
            Err(ClientError::Agent {
                code: ErrorCode::TooLarge,
                ..
            })
        ));
        let cancel = agent.recv().await.unwrap();
        assert_eq!((cancel.kind, cancel.stream), (FrameKind::Cancel, s));
        // Late frames for it are dropped, not violations.
        agent.eof(s, Channel::Stdout).await;
        agent
            .respond(s, &Response::error(ErrorCode::Cancelled, "cancelled"))
            .await;
        let c = client.clone();
        let metrics = tokio::spawn(async move { c.metrics().await });
        let (m, _) = agent.request().await;
        agent
            .respond(
                m,
                &Response::Metrics {
                    cpu_ms: 0,
                    memory_bytes: 0,
                    pids: 1,
                },
            )
            .await;
        metrics.await.unwrap().unwrap();
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn write_file_round_trip_and_early_error() {
        let (client, mut agent) = pair().await;
        let mut file = client
            .write_file("/work/in.txt", Some(0o600), true)
            .await
            .unwrap();
        file.write(Bytes::from_static(b"hel")).await.unwrap();
        file.write(Bytes::from_static(b"lo")).await.unwrap();
        let finish = tokio::spawn(file.finish());
        let (s, request) = agent.request().await;
        assert_eq!(
            request,
            Request::WriteFile {
                path: "/work/in.txt".into(),
                mode: Some(0o600),
                create_parents: true
            }
        );
        let mut got = Vec::new();
        loop {
            let frame = agent.recv().await.unwrap();
            assert_eq!(frame.stream, s);
            match frame.kind {
                FrameKind::Data => got.extend_from_slice(&frame.payload),
                FrameKind::Eof => break,
                other => panic!("{other}"),
            }
        }
        assert_eq!(got, b"hello");
        agent.respond(s, &Response::FileDone { bytes: 5 }).await;
        assert_eq!(finish.await.unwrap().unwrap(), 5);

        // The agent refuses at once: writes fail fast.
        let mut file = client.write_file("/ro/x", None, false).await.unwrap();
        let (s, _) = agent.request().await;
        agent
            .respond(
                s,
                &Response::error(ErrorCode::PermissionDenied, "read-only"),
            )
            .await;
        let err = loop {
            match file.write(Bytes::from_static(b"data")).await {
                Ok(()) => tokio::task::yield_now().await,
                Err(err) => break err,
            }
        };
        assert!(matches!(
            err,
            ClientError::Agent {
                code: ErrorCode::PermissionDenied,
                ..
            }
        ));
        drop(file); // ended: no Cancel
                    // A wrong count at the end is caught.
        let mut file = client.write_file("/w", None, false).await.unwrap();
        file.write(Bytes::from_static(b"abc")).await.unwrap();
        let finish = tokio::spawn(file.finish());
        loop {
            let frame = agent.recv().await.unwrap();
            if frame.kind == FrameKind::Eof {
                agent
                    .respond(frame.stream, &Response::FileDone { bytes: 2 })
                    .await;
                break;
            }
        }
        assert!(matches!(
            finish.await.unwrap(),
            Err(ClientError::Protocol(_))
        ));

        // Dropped without finish: Cancel.
        let mut file = client.write_file("/w2", None, false).await.unwrap();
        file.write(Bytes::from_static(b"x")).await.unwrap();
        drop(file);
        let (s, _) = agent.request().await;
        let data = agent.recv().await.unwrap();
        assert_eq!(data.kind, FrameKind::Data);
        let cancel = agent.recv().await.unwrap();
        assert_eq!((cancel.kind, cancel.stream), (FrameKind::Cancel, s));
        agent
            .respond(s, &Response::error(ErrorCode::Cancelled, "cancelled"))
            .await;
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn dropping_an_exec_cancels_it_and_its_late_frames_are_dropped() {
        let (client, mut agent) = pair().await;
        let exec = client.exec(ExecSpec::new(["yes"])).await.unwrap();
        let (s, _) = agent.request().await;
        agent.respond(s, &Response::Started { pid: 9 }).await;
        // More output than the stream queue and the read budget hold: nobody reads it.
        let chunk = vec![b'y'; DEFAULT_MAX_PAYLOAD];
        for _ in 0..(READ_BUDGET / DEFAULT_MAX_PAYLOAD + STREAM_QUEUE + 4) {
            agent.data(s, Channel::Stdout, &chunk[..1000]).await;
        }
        drop(exec);
        let cancel = agent.recv().await.unwrap();
        assert_eq!((cancel.kind, cancel.stream), (FrameKind::Cancel, s));
        for _ in 0..20 {
            agent.data(s, Channel::Stdout, &chunk).await;
        }
        agent.eof(s, Channel::Stdout).await;
        agent.eof(s, Channel::Stderr).await;
        agent
            .respond(
                s,
                &Response::Exit {
                    exit_code: None,
                    signal: Some(9),
                    status: Status::Killed,
                },
            )
            .await;
        // The connection was not wedged and is still good.
        let c = client.clone();
        let stat = tokio::spawn(async move { c.stat("/a").await });
        let (t, _) = agent.request().await;
        agent.respond(t, &Response::StatResult(entry("/a"))).await;
        stat.await.unwrap().unwrap();
        // But the stream has ended now: a frame for it is a violation.
        agent.eof(s, Channel::Stdout).await;
        while agent.recv().await.is_some() {}
        assert!(client.is_closed());
    }

    #[tokio::test]
    async fn a_dropped_request_future_discards_its_answer() {
        let (client, mut agent) = pair().await;
        let c = client.clone();
        let stat = tokio::spawn(async move { c.stat("/slow").await });
        let (s, _) = agent.request().await;
        stat.abort();
        let _ = stat.await;
        agent
            .respond(s, &Response::StatResult(entry("/slow")))
            .await;
        let c = client.clone();
        let mkdir = tokio::spawn(async move { c.mkdir("/d", false).await });
        let (t, _) = agent.request().await;
        agent.respond(t, &Response::Ok {}).await;
        mkdir.await.unwrap().unwrap();
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn background_exec_and_procs() {
        let (client, mut agent) = pair().await;
        let mut spec = ExecSpec::new(["server"]);
        spec.background = true;
        spec.stdin = true;
        let mut exec = client.exec(spec).await.unwrap();
        let (s, request) = agent.request().await;
        assert!(matches!(
            request,
            Request::Exec {
                background: true,
                stdin: true,
                ..
            }
        ));
        agent.respond(s, &Response::Started { pid: 40 }).await;
        assert!(matches!(
            exec.next().await,
            Some(ExecEvent::Started { pid: 40 })
        ));
        assert!(exec.next().await.is_none());
        // Its stdin goes through proc_stdin, not this stream.
        assert!(exec.stdin().write(Bytes::from_static(b"x")).await.is_err());
        drop(exec);

        // proc_stdin: data, eof, ok.
        let c = client.clone();
        let stdin =
            tokio::spawn(async move { c.proc_stdin(40, Bytes::from_static(b"input"), true).await });
        let (t, request) = agent.request().await;
        assert_eq!(
            request,
            Request::ProcStdin {
                pid: 40,
                close: true
            }
        );
        let data = agent.recv().await.unwrap();
        assert_eq!(
            (data.kind, &data.payload[..]),
            (FrameKind::Data, &b"input"[..])
        );
        assert_eq!(agent.recv().await.unwrap().kind, FrameKind::Eof);
        agent.respond(t, &Response::Ok {}).await;
        stdin.await.unwrap().unwrap();

        // proc_output, not following, still running: ends without Exit.
        let mut out = client.proc_output(40, false).await.unwrap();
        let (u, request) = agent.request().await;
        assert_eq!(
            request,
            Request::ProcOutput {
                pid: 40,
                follow: false
            }
        );
        agent.respond(u, &Response::Started { pid: 40 }).await;
        agent.data(u, Channel::Stdout, b"log").await;
        agent.data(u, Channel::Stderr, b"warn").await;
        agent.eof(u, Channel::Stdout).await;
        agent.eof(u, Channel::Stderr).await;
        agent.respond(u, &Response::Ok {}).await;
        let (o, e, last) = collect(&mut out).await;
        assert_eq!((&o[..], &e[..]), (&b"log"[..], &b"warn"[..]));
        assert!(last.is_none());

        // Its signal is by pid; a resize is refused.
        let input = out.stdin();
        assert!(input.resize(10, 10).await.is_err());
        let signal = tokio::spawn(async move { input.signal(2).await });
        let (v, request) = agent.request().await;
        assert_eq!(request, Request::SignalPid { pid: 40, signal: 2 });
        agent
            .respond(v, &Response::error(ErrorCode::NotFound, "gone"))
            .await;
        assert!(matches!(
            signal.await.unwrap(),
            Err(ClientError::Agent {
                code: ErrorCode::NotFound,
                ..
            })
        ));

        // proc_output that follows to the exit.
        let mut out = client.proc_output(40, true).await.unwrap();
        let (w, _) = agent.request().await;
        agent.respond(w, &Response::Started { pid: 40 }).await;
        agent.data(w, Channel::Stdout, b"x").await;
        agent.respond(w, &exit(0)).await;
        let (o, _, last) = collect(&mut out).await;
        assert_eq!(o, b"x");
        assert!(matches!(
            last,
            Some(ExecEvent::Exit {
                exit_code: Some(0),
                ..
            })
        ));

        // proc_output of the wrong pid is a violation.
        let mut out = client.proc_output(40, true).await.unwrap();
        let (x, _) = agent.request().await;
        agent.respond(x, &Response::Started { pid: 41 }).await;
        assert!(matches!(
            out.next().await,
            Some(ExecEvent::Failed(ClientError::Protocol(_)))
        ));
    }

    #[tokio::test]
    async fn proc_stdin_refused_early() {
        let (client, mut agent) = pair().await;
        let c = client.clone();
        let big = Bytes::from(vec![0u8; DEFAULT_MAX_PAYLOAD * 6]);
        let stdin = tokio::spawn(async move { c.proc_stdin(77, big, false).await });
        let (s, _) = agent.request().await;
        agent
            .respond(s, &Response::error(ErrorCode::NotFound, "no pid 77"))
            .await;
        // Whatever was already sent is read and ignored.
        let result = loop {
            if stdin.is_finished() {
                break stdin.await.unwrap();
            }
            match tokio::time::timeout(Duration::from_millis(50), agent.recv()).await {
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => panic!("closed"),
            }
        };
        assert!(matches!(
            result,
            Err(ClientError::Agent {
                code: ErrorCode::NotFound,
                ..
            })
        ));
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn a_thousand_concurrent_execs_on_one_connection() {
        const N: usize = 1000;
        let (client, mut agent) = pair().await;
        let fake = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..N {
                let (s, request) = agent.request().await;
                let Request::Exec { argv, .. } = request else {
                    panic!("{request:?}")
                };
                seen.push(s);
                let i: i32 = argv[1].parse().unwrap();
                agent
                    .respond(
                        s,
                        &Response::Started {
                            pid: 1000 + i as u32,
                        },
                    )
                    .await;
                agent.data(s, Channel::Stdout, argv[1].as_bytes()).await;
                agent.data(s, Channel::Stderr, b"e").await;
                agent.eof(s, Channel::Stdout).await;
                agent.eof(s, Channel::Stderr).await;
                agent.respond(s, &exit(i % 256)).await;
            }
            // Ids strictly increase.
            assert!(seen.windows(2).all(|w| w[0] < w[1] && w[1] % 2 == 1));
            agent
        });
        let mut tasks = Vec::new();
        for i in 0..N {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut exec = client
                    .exec(ExecSpec::new(["echo".to_string(), i.to_string()]))
                    .await
                    .unwrap();
                let (out, err, last) = collect(&mut exec).await;
                assert_eq!(out, i.to_string().as_bytes());
                assert_eq!(err, b"e");
                match last {
                    Some(ExecEvent::Exit {
                        exit_code: Some(code),
                        ..
                    }) => assert_eq!(code, (i % 256) as i32),
                    other => panic!("{other:?}"),
                }
                assert_eq!(exec.pid(), Some(1000 + i as u32));
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let _agent = fake.await.unwrap();
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn a_slow_consumer_stalls_its_connection_without_losing_data() {
        let (client, mut agent) = pair().await;
        let mut exec = client.exec(ExecSpec::new(["yes"])).await.unwrap();
        let c = client.clone();
        let stat = tokio::spawn(async move { c.stat("/a").await });
        let (e, _) = agent.request().await;
        let (s, _) = agent.request().await;
        let chunk = vec![b'y'; 64 << 10];
        let frames = READ_BUDGET / chunk.len() + 8;
        let fake = tokio::spawn(async move {
            agent.respond(e, &Response::Started { pid: 2 }).await;
            for _ in 0..frames {
                agent.data(e, Channel::Stdout, &chunk).await;
            }
            agent.respond(s, &Response::StatResult(entry("/a"))).await;
            agent.respond(e, &exit(0)).await;
            agent
        });
        // Nobody reads the exec: the stat's answer is stuck behind its output.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!stat.is_finished());
        let (out, _, last) = collect(&mut exec).await;
        assert_eq!(out.len(), frames * (64 << 10));
        assert!(matches!(last, Some(ExecEvent::Exit { .. })));
        stat.await.unwrap().unwrap();
        let _agent = fake.await.unwrap();
    }

    #[tokio::test]
    async fn abandoned_streams_are_remembered_up_to_a_bound() {
        let (client, mut agent) = pair().await;
        for _ in 0..=MAX_ABANDONED {
            drop(client.exec(ExecSpec::new(["sleep", "9"])).await.unwrap());
        }
        for _ in 0..=MAX_ABANDONED {
            assert_eq!(agent.request().await.1.type_name(), "exec");
            assert_eq!(agent.recv().await.unwrap().kind, FrameKind::Cancel);
        }
        // The newest abandoned stream's late answer is dropped.
        let newest = 2 * MAX_ABANDONED as u32 + 1;
        agent
            .respond(newest, &Response::error(ErrorCode::Cancelled, "x"))
            .await;
        let c = client.clone();
        let ok = tokio::spawn(async move { c.mkdir("/d", false).await });
        let (t, _) = agent.request().await;
        agent.respond(t, &Response::Ok {}).await;
        ok.await.unwrap().unwrap();
        // The oldest was forgotten: a frame for it is now a violation.
        agent.respond(1, &Response::Started { pid: 3 }).await;
        while agent.recv().await.is_some() {}
        assert!(client.is_closed());
    }

    #[tokio::test]
    async fn dropping_every_handle_closes_the_socket() {
        let (client, mut agent) = pair().await;
        let exec = client.exec(ExecSpec::new(["sleep", "9"])).await.unwrap();
        agent.request().await;
        drop(client);
        // The exec still holds the connection.
        agent.respond(1, &Response::Started { pid: 3 }).await;
        drop(exec);
        // Cancel may or may not make it out before the close; then the end.
        while let Some(frame) = agent.recv().await {
            assert_eq!(frame.kind, FrameKind::Cancel);
        }
    }
}
