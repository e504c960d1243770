//! Length-prefixed frames over one byte stream.
//!
//! [`Encoder`] appends frames to a `Vec<u8>`; [`Decoder`] takes bytes as they arrive and hands
//! back whole, checked [`Frame`]s. Both apply the same header rules, so an encoder never
//! produces a frame that a decoder with the same limit rejects.

use std::fmt;
use std::io;
use std::sync::Arc;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;

use crate::msg::{Hello, Request, Response, Role};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;

/// The default (and the protocol's minimum) payload limit: every sender keeps each payload
/// at or under it, and every receiver accepts at least that much.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// Smallest buffer a decoder allocates once bytes arrive.
const MIN_BUFFER: usize = 4096;

/// Most bytes [`Decoder::read_from`] asks for in one read.
const READ_CHUNK: usize = 64 * 1024;

/// The type of a frame (header byte 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// JSON [`Hello`]; stream 0 only.
    Hello = 1,
    /// JSON [`Request`], host to agent.
    Request = 2,
    /// JSON [`Response`], agent to host.
    Response = 3,
    /// Raw bytes on a [`Channel`].
    Data = 4,
    /// End of a [`Channel`]; empty payload.
    Eof = 5,
    /// Abort the stream's request, host to agent; empty payload.
    Cancel = 6,
}

impl FrameKind {
    /// The kind for a header byte, if it is one.
    pub fn from_u8(byte: u8) -> Option<FrameKind> {
        Some(match byte {
            1 => FrameKind::Hello,
            2 => FrameKind::Request,
            3 => FrameKind::Response,
            4 => FrameKind::Data,
            5 => FrameKind::Eof,
            6 => FrameKind::Cancel,
            _ => return None,
        })
    }

    /// The header byte.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Whether the payload is a JSON object.
    pub fn is_json(self) -> bool {
        matches!(
            self,
            FrameKind::Hello | FrameKind::Request | FrameKind::Response
        )
    }

    /// Whether the header's channel byte means something (Data and Eof).
    pub fn has_channel(self) -> bool {
        matches!(self, FrameKind::Data | FrameKind::Eof)
    }

    /// A lower-case name for messages.
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Hello => "hello",
            FrameKind::Request => "request",
            FrameKind::Response => "response",
            FrameKind::Data => "data",
            FrameKind::Eof => "eof",
            FrameKind::Cancel => "cancel",
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which byte stream of a request a Data or Eof frame belongs to (header byte 5). Other kinds
/// carry 0, decoded as [`Channel::Stdin`] and meaning nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    /// Data to the sandbox: a process's stdin, a `WriteFile`'s content. Host to agent.
    #[default]
    Stdin = 0,
    /// Data from the sandbox: a process's stdout (or its pty), a `ReadFile`'s content.
    Stdout = 1,
    /// A process's stderr.
    Stderr = 2,
}

impl Channel {
    /// The channel for a header byte, if it is one.
    pub fn from_u8(byte: u8) -> Option<Channel> {
        Some(match byte {
            0 => Channel::Stdin,
            1 => Channel::Stdout,
            2 => Channel::Stderr,
            _ => return None,
        })
    }

    /// The header byte.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// A lower-case name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Stdin => "stdin",
            Channel::Stdout => "stdout",
            Channel::Stderr => "stderr",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A frame that broke the framing rules, or a payload that is not the expected message.
///
/// Every error from [`Decoder::next_frame`] is fatal: the decoder stays failed and the
/// connection must be closed. An error from [`Frame::parse_json`] is not: the frame was
/// whole, so the agent can answer a bad request with an `Error` response and go on (the host
/// closes the connection on a bad response, since only a broken agent sends one).
#[derive(Clone, Debug, thiserror::Error)]
pub enum FrameError {
    #[error("unknown frame kind {0}: the peer speaks another protocol or the stream is corrupt")]
    UnknownKind(u8),
    #[error("frame header has reserved field {0:#06x}, which must be 0: the stream is corrupt")]
    Reserved(u16),
    #[error(
        "frame payload of {len} bytes is over the limit of {max} bytes: the peer must split \
         data into smaller frames"
    )]
    TooLarge { len: u64, max: usize },
    #[error("{kind} frame has channel {channel}: {}", channel_rule(*kind))]
    BadChannel { kind: FrameKind, channel: u8 },
    #[error("{kind} frame on stream {stream}: stream 0 carries Hello frames and nothing else")]
    BadStream { kind: FrameKind, stream: u32 },
    #[error("{kind} frame has a payload of {len} bytes, but must have none")]
    NonEmptyPayload { kind: FrameKind, len: usize },
    #[error("{kind} frame payload is not UTF-8, so not JSON")]
    NotUtf8 {
        kind: FrameKind,
        #[source]
        source: std::str::Utf8Error,
    },
    #[error("{kind} frame payload is not valid JSON")]
    InvalidJson {
        kind: FrameKind,
        #[source]
        source: Arc<serde_json::Error>,
    },
    #[error("{kind} frame payload is JSON but not an object")]
    NotAnObject { kind: FrameKind },
    #[error("{kind} frame does not hold a valid message of the expected type")]
    Message {
        kind: FrameKind,
        #[source]
        source: Arc<serde_json::Error>,
    },
    #[error("{kind} frames carry no JSON message")]
    NotJson { kind: FrameKind },
    #[error("expected a {expected} frame, got a {got} frame")]
    UnexpectedKind { expected: FrameKind, got: FrameKind },
    #[error(
        "a {kind} frame on {channel}, stream {stream}, may not come from the {sender}: {rule}"
    )]
    Misdirected {
        kind: FrameKind,
        channel: Channel,
        stream: u32,
        sender: Role,
        rule: &'static str,
    },
    #[error("the connection ended in the middle of a frame ({buffered} bytes of it arrived)")]
    Truncated { buffered: usize },
    #[error("could not encode the message as JSON")]
    Encode(#[source] Arc<serde_json::Error>),
}

fn channel_rule(kind: FrameKind) -> &'static str {
    if kind.has_channel() {
        "channels are 0 (stdin), 1 (stdout) and 2 (stderr)"
    } else {
        "only data and eof frames have a channel; others carry 0"
    }
}

/// One whole, checked frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    /// Meaningful for Data and Eof only; [`Channel::Stdin`] (byte 0) for the other kinds.
    pub channel: Channel,
    /// 0 for Hello, non-zero for everything else.
    pub stream: u32,
    /// JSON for Hello, Request and Response (checked to be a JSON object when decoded), raw bytes
    /// for Data, empty for Eof and Cancel.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame, without checking it (the encoder and the decoder check).
    pub fn new(kind: FrameKind, channel: Channel, stream: u32, payload: Vec<u8>) -> Frame {
        Frame {
            kind,
            channel,
            stream,
            payload,
        }
    }

    /// Bytes this frame takes on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Parses the JSON payload into `T` (strictly: the message types reject unknown fields).
    pub fn parse_json<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        if !self.kind.is_json() {
            return Err(FrameError::NotJson { kind: self.kind });
        }
        serde_json::from_slice(&self.payload).map_err(|e| FrameError::Message {
            kind: self.kind,
            source: Arc::new(e),
        })
    }

    /// The [`Request`] in a Request frame (not yet validated: call [`Request::validate`]).
    pub fn request(&self) -> Result<Request, FrameError> {
        self.expect_kind(FrameKind::Request)?;
        self.parse_json()
    }

    /// The [`Response`] in a Response frame (not yet validated: call [`Response::validate`]).
    pub fn response(&self) -> Result<Response, FrameError> {
        self.expect_kind(FrameKind::Response)?;
        self.parse_json()
    }

    fn expect_kind(&self, expected: FrameKind) -> Result<(), FrameError> {
        if self.kind == expected {
            Ok(())
        } else {
            Err(FrameError::UnexpectedKind {
                expected,
                got: self.kind,
            })
        }
    }

    /// Checks that `sender` may send this frame in version 1: requests and cancels come from
    /// the host, responses from the agent, data to the sandbox (channel 0) from the host and
    /// data from it (channels 1 and 2) from the agent, and every stream but 0 was opened by
    /// the host, so has an odd id. Each side runs this on every frame it receives.
    pub fn check_sender(&self, sender: Role) -> Result<(), FrameError> {
        let rule = match self.kind {
            FrameKind::Hello => return Ok(()),
            _ if self.stream & 1 == 0 => "streams are opened by the host and have odd ids",
            FrameKind::Request | FrameKind::Cancel if sender != Role::Host => {
                "only the host sends requests and cancels"
            }
            FrameKind::Response if sender != Role::Agent => "only the agent sends responses",
            FrameKind::Data | FrameKind::Eof => match (sender, self.channel) {
                (Role::Host, Channel::Stdin) => return Ok(()),
                (Role::Agent, Channel::Stdout | Channel::Stderr) => return Ok(()),
                (Role::Host, _) => "the host sends data on channel 0 only",
                (Role::Agent, _) => "the agent sends data on channels 1 and 2 only",
            },
            _ => return Ok(()),
        };
        Err(FrameError::Misdirected {
            kind: self.kind,
            channel: self.channel,
            stream: self.stream,
            sender,
            rule,
        })
    }
}

/// The header fields, checked against the rules that do not depend on the payload.
fn check_header(
    kind: u8,
    channel: u8,
    reserved: u16,
    stream: u32,
    len: u64,
    max: usize,
) -> Result<(FrameKind, Channel), FrameError> {
    let kind = FrameKind::from_u8(kind).ok_or(FrameError::UnknownKind(kind))?;
    if reserved != 0 {
        return Err(FrameError::Reserved(reserved));
    }
    if len > max as u64 {
        return Err(FrameError::TooLarge { len, max });
    }
    let channel = match Channel::from_u8(channel) {
        Some(c) if kind.has_channel() || c == Channel::Stdin => c,
        _ => return Err(FrameError::BadChannel { kind, channel }),
    };
    if (kind == FrameKind::Hello) != (stream == 0) {
        return Err(FrameError::BadStream { kind, stream });
    }
    Ok((kind, channel))
}

/// The payload rules: empty for Eof and Cancel, a JSON object for the JSON kinds.
fn check_payload(kind: FrameKind, payload: &[u8]) -> Result<(), FrameError> {
    match kind {
        FrameKind::Eof | FrameKind::Cancel if !payload.is_empty() => {
            Err(FrameError::NonEmptyPayload {
                kind,
                len: payload.len(),
            })
        }
        FrameKind::Hello | FrameKind::Request | FrameKind::Response => {
            let text = std::str::from_utf8(payload)
                .map_err(|source| FrameError::NotUtf8 { kind, source })?;
            // Syntax only, building nothing; serde_json's recursion limit bounds the depth.
            serde_json::from_str::<IgnoredAny>(text).map_err(|e| FrameError::InvalidJson {
                kind,
                source: Arc::new(e),
            })?;
            if text.trim_start().starts_with('{') {
                Ok(())
            } else {
                Err(FrameError::NotAnObject { kind })
            }
        }
        _ => Ok(()),
    }
}

fn clamp_max(max: usize) -> usize {
    max.min(u32::MAX as usize)
}

fn write_header(out: &mut [u8], kind: FrameKind, channel: Channel, stream: u32, len: u32) {
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[4] = kind.as_u8();
    out[5] = channel.as_u8();
    out[6..8].copy_from_slice(&0u16.to_le_bytes());
    out[8..12].copy_from_slice(&stream.to_le_bytes());
}

/// Appends frames to a `Vec<u8>`. On error the vector is left as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoder {
    max_payload: usize,
}

impl Default for Encoder {
    fn default() -> Encoder {
        Encoder::new()
    }
}

impl Encoder {
    /// An encoder that keeps payloads at or under [`DEFAULT_MAX_PAYLOAD`].
    pub fn new() -> Encoder {
        Encoder::with_max_payload(DEFAULT_MAX_PAYLOAD)
    }

    /// An encoder with another payload limit (at most `u32::MAX`). Do not go over the
    /// peer's limit: [`DEFAULT_MAX_PAYLOAD`] unless it was agreed otherwise.
    pub fn with_max_payload(max_payload: usize) -> Encoder {
        Encoder {
            max_payload: clamp_max(max_payload),
        }
    }

    /// The payload limit.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Appends one frame, checked by the decoder's rules.
    pub fn frame(
        &self,
        out: &mut Vec<u8>,
        kind: FrameKind,
        channel: Channel,
        stream: u32,
        payload: &[u8],
    ) -> Result<(), FrameError> {
        check_header(
            kind.as_u8(),
            channel.as_u8(),
            0,
            stream,
            payload.len() as u64,
            self.max_payload,
        )?;
        check_payload(kind, payload)?;
        let start = out.len();
        out.resize(start + HEADER_LEN, 0);
        // Fits: check_header held it to max_payload, which is at most u32::MAX.
        write_header(
            &mut out[start..],
            kind,
            channel,
            stream,
            payload.len() as u32,
        );
        out.extend_from_slice(payload);
        Ok(())
    }

    /// Appends an existing frame.
    pub fn encode(&self, out: &mut Vec<u8>, frame: &Frame) -> Result<(), FrameError> {
        self.frame(out, frame.kind, frame.channel, frame.stream, &frame.payload)
    }

    /// Appends a JSON frame of kind `kind` (Hello, Request or Response) holding `value`,
    /// serialized straight into `out`. `value` must serialize to a JSON object.
    pub fn json<T: Serialize + ?Sized>(
        &self,
        out: &mut Vec<u8>,
        kind: FrameKind,
        stream: u32,
        value: &T,
    ) -> Result<(), FrameError> {
        if !kind.is_json() {
            return Err(FrameError::NotJson { kind });
        }
        check_header(kind.as_u8(), 0, 0, stream, 0, self.max_payload)?;
        let start = out.len();
        out.resize(start + HEADER_LEN, 0);
        if let Err(e) = serde_json::to_writer(&mut *out, value) {
            out.truncate(start);
            return Err(FrameError::Encode(Arc::new(e)));
        }
        let len = out.len() - start - HEADER_LEN;
        if len > self.max_payload {
            out.truncate(start);
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_payload,
            });
        }
        if out.get(start + HEADER_LEN) != Some(&b'{') {
            out.truncate(start);
            return Err(FrameError::NotAnObject { kind });
        }
        write_header(&mut out[start..], kind, Channel::Stdin, stream, len as u32);
        Ok(())
    }

    /// Appends this side's Hello (stream 0).
    pub fn hello(&self, out: &mut Vec<u8>, hello: &Hello) -> Result<(), FrameError> {
        self.json(out, FrameKind::Hello, 0, hello)
    }

    /// Appends a request opening `stream`.
    pub fn request(
        &self,
        out: &mut Vec<u8>,
        stream: u32,
        request: &Request,
    ) -> Result<(), FrameError> {
        self.json(out, FrameKind::Request, stream, request)
    }

    /// Appends a response on `stream`.
    pub fn response(
        &self,
        out: &mut Vec<u8>,
        stream: u32,
        response: &Response,
    ) -> Result<(), FrameError> {
        self.json(out, FrameKind::Response, stream, response)
    }

    /// Appends `bytes` as Data frames on `channel`, split at the payload limit. Nothing is
    /// appended for empty `bytes`: only Eof ends a channel.
    pub fn data(
        &self,
        out: &mut Vec<u8>,
        stream: u32,
        channel: Channel,
        bytes: &[u8],
    ) -> Result<(), FrameError> {
        if bytes.is_empty() {
            return Ok(());
        }
        check_header(FrameKind::Data.as_u8(), channel.as_u8(), 0, stream, 0, 0)?;
        if self.max_payload == 0 {
            return Err(FrameError::TooLarge {
                len: bytes.len() as u64,
                max: 0,
            });
        }
        out.reserve(bytes.len() + HEADER_LEN * bytes.len().div_ceil(self.max_payload));
        for chunk in bytes.chunks(self.max_payload) {
            self.frame(out, FrameKind::Data, channel, stream, chunk)?;
        }
        Ok(())
    }

    /// Appends the end of `channel` on `stream`.
    pub fn eof(&self, out: &mut Vec<u8>, stream: u32, channel: Channel) -> Result<(), FrameError> {
        self.frame(out, FrameKind::Eof, channel, stream, &[])
    }

    /// Appends a Cancel of the request on `stream`.
    pub fn cancel(&self, out: &mut Vec<u8>, stream: u32) -> Result<(), FrameError> {
        self.frame(out, FrameKind::Cancel, Channel::Stdin, stream, &[])
    }
}

/// Turns bytes from the connection into frames, holding at most one maximal frame.
///
/// The buffer never holds more than [`Decoder::capacity`] bytes (header plus payload limit),
/// and grows only as bytes arrive, never to a size a header claims. Use it like this:
///
/// ```
/// # use moat_proto::frame::{Decoder, Encoder, Channel};
/// # let mut wire = Vec::new();
/// # Encoder::new().data(&mut wire, 1, Channel::Stdout, b"hi").unwrap();
/// let mut decoder = Decoder::new();
/// let mut rest: &[u8] = &wire; // what one read() returned
/// while !rest.is_empty() {
///     let taken = decoder.feed(rest);
///     rest = &rest[taken..];
///     while let Some(frame) = decoder.next_frame()? {
///         assert_eq!(frame.payload, b"hi");
///     }
/// }
/// # Ok::<(), moat_proto::frame::FrameError>(())
/// ```
///
/// or let [`Decoder::read_from`] read straight into the buffer.
#[derive(Clone, Debug)]
pub struct Decoder {
    /// Bytes `start..end` are buffered; the rest is spare room. `buf.len() <= capacity()`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_payload: usize,
    error: Option<FrameError>,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder that accepts payloads up to [`DEFAULT_MAX_PAYLOAD`].
    pub fn new() -> Decoder {
        Decoder::with_max_payload(DEFAULT_MAX_PAYLOAD)
    }

    /// A decoder with another payload limit (at most `u32::MAX`; the protocol requires at
    /// least [`DEFAULT_MAX_PAYLOAD`] on a real connection).
    pub fn with_max_payload(max_payload: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_payload: clamp_max(max_payload),
            error: None,
        }
    }

    /// The payload limit.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// The most bytes the decoder ever holds: one header plus one maximal payload.
    pub fn capacity(&self) -> usize {
        HEADER_LEN.saturating_add(self.max_payload)
    }

    /// Bytes held that are not yet part of a returned frame.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// How many bytes [`Decoder::feed`] would take now. After [`Decoder::next_frame`]
    /// returned `Ok(None)` this is at least 1.
    pub fn space(&self) -> usize {
        self.capacity() - self.buffered()
    }

    /// The error the decoder failed with, if it did.
    pub fn error(&self) -> Option<&FrameError> {
        self.error.as_ref()
    }

    /// Buffers as much of `bytes` as fits (see [`Decoder::space`]) and returns how many it
    /// took; feed the rest after taking frames out with [`Decoder::next_frame`]. Once the
    /// decoder has failed it takes (and drops) everything.
    #[must_use = "the decoder may take only part of the bytes; feed the rest later"]
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        if self.error.is_some() {
            return bytes.len();
        }
        let take = bytes.len().min(self.space());
        if take == 0 {
            return 0;
        }
        self.make_room(take);
        self.buf[self.end..self.end + take].copy_from_slice(&bytes[..take]);
        self.end += take;
        take
    }

    /// Reads once from `reader` straight into the buffer, at most 64 KiB and never more
    /// than [`Decoder::space`]. Returns what `read` returned: `Ok(0)` is the end of the
    /// connection (check [`Decoder::finish`]), and `WouldBlock` passes through for a
    /// non-blocking reader. Fails with `InvalidData` once the decoder has failed, and with
    /// `Other` when the buffer is full because frames were not taken out first.
    pub fn read_from<R: io::Read + ?Sized>(&mut self, reader: &mut R) -> io::Result<usize> {
        if let Some(err) = &self.error {
            return Err(io::Error::new(io::ErrorKind::InvalidData, err.clone()));
        }
        let want = self.space().min(READ_CHUNK);
        if want == 0 {
            return Err(io::Error::other(
                "frame decoder buffer is full: take frames out with next_frame before reading",
            ));
        }
        self.make_room(want);
        let n = reader.read(&mut self.buf[self.end..self.end + want])?;
        // A reader that claims more than it was given is broken; do not trust it.
        let n = n.min(want);
        self.end += n;
        Ok(n)
    }

    /// Makes `buf[end..end + n]` exist, moving buffered bytes to the front and growing the
    /// buffer (never past `capacity()`) as needed. `n <= space()`.
    fn make_room(&mut self, n: usize) {
        if self.end + n <= self.buf.len() {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let need = self.end + n;
        if need > self.buf.len() {
            let len = need
                .max(self.buf.len().saturating_mul(2))
                .max(MIN_BUFFER)
                .min(self.capacity());
            self.buf.resize(len, 0);
        }
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed, or the error that broke
    /// the stream. After an error every call returns that error again: close the connection.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        match self.parse() {
            Ok(frame) => Ok(frame),
            Err(err) => {
                self.error = Some(err.clone());
                // Nothing buffered is of use any more.
                self.buf = Vec::new();
                self.start = 0;
                self.end = 0;
                Err(err)
            }
        }
    }

    fn parse(&mut self) -> Result<Option<Frame>, FrameError> {
        let held = &self.buf[self.start..self.end];
        let Some(header) = held.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let reserved = u16::from_le_bytes([header[6], header[7]]);
        let stream = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        let (kind, channel) = check_header(
            header[4],
            header[5],
            reserved,
            stream,
            u64::from(len),
            self.max_payload,
        )?;
        // len <= max_payload <= u32::MAX, so this fits a usize.
        let total = HEADER_LEN + len as usize;
        if held.len() < total {
            return Ok(None);
        }
        let payload = &held[HEADER_LEN..total];
        check_payload(kind, payload)?;
        let frame = Frame {
            kind,
            channel,
            stream,
            payload: payload.to_vec(),
        };
        self.start += total;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(frame))
    }

    /// Call when the connection ended: an error if it ended inside a frame (or the decoder
    /// had failed).
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        match self.buffered() {
            0 => Ok(()),
            buffered => Err(FrameError::Truncated { buffered }),
        }
    }
}

/// Stream ids of one connection: the host allocates them, the agent checks them. Ids are
/// odd (even ids are kept for streams the agent may open in a later version) and strictly
/// increasing, so an id is never reused and "is this a new stream" is one comparison.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamIds {
    last: u32,
}

impl StreamIds {
    /// No stream opened yet.
    pub fn new() -> StreamIds {
        StreamIds { last: 0 }
    }

    /// The highest id allocated or accepted; 0 before the first.
    pub fn last(&self) -> u32 {
        self.last
    }

    /// Host side: the id for the next request; `None` after 2^31 streams (open a new
    /// connection).
    pub fn allocate(&mut self) -> Option<u32> {
        let next = if self.last == 0 {
            1
        } else {
            self.last.checked_add(2)?
        };
        self.last = next;
        Some(next)
    }

    /// Agent side: whether a Request on `id` opens a new stream (odd, above every earlier
    /// one), recording it if so. A Request on any other id is a host bug: close the
    /// connection.
    pub fn accept(&mut self, id: u32) -> bool {
        if id & 1 == 1 && id > self.last {
            self.last = id;
            true
        } else {
            false
        }
    }

    /// Whether `id` belongs to a stream opened so far (for frames other than Request: a
    /// frame on a later id is a protocol error, on an earlier one it may be a late frame
    /// of a finished stream).
    pub fn is_opened(&self, id: u32) -> bool {
        id & 1 == 1 && id <= self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::samples::{requests, responses};
    use crate::msg::Hello;

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        /// Uniform-ish in `0..n` (`n > 0`).
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn chance(&mut self, one_in: usize) -> bool {
            self.below(one_in) == 0
        }
    }

    /// What decoding a byte stream gave: the frames, then the error if one came.
    type Outcome = (Vec<Frame>, Option<String>);

    /// Feeds `input` in chunks of `chunk()` bytes, taking frames out after every feed, and
    /// checks the decoder's invariants on the way.
    fn decode_with(
        decoder: &mut Decoder,
        input: &[u8],
        mut chunk: impl FnMut() -> usize,
    ) -> Outcome {
        let mut frames = Vec::new();
        let mut rest = input;
        loop {
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        assert!(frame.payload.len() <= decoder.max_payload());
                        frames.push(frame);
                    }
                    Ok(None) => break,
                    Err(err) => {
                        // Failed for good.
                        let again = decoder.next_frame().unwrap_err();
                        assert_eq!(again.to_string(), err.to_string());
                        assert!(decoder.finish().is_err());
                        assert_eq!(decoder.feed(rest), rest.len());
                        assert!(decoder.next_frame().is_err());
                        return (frames, Some(err.to_string()));
                    }
                }
            }
            assert!(decoder.buffered() <= decoder.capacity());
            assert!(decoder.buf.len() <= decoder.capacity());
            if rest.is_empty() {
                return (frames, None);
            }
            assert!(decoder.space() > 0, "no progress possible");
            let n = chunk().clamp(1, rest.len());
            let taken = decoder.feed(&rest[..n]);
            assert!(taken > 0 && taken <= n);
            rest = &rest[taken..];
        }
    }

    fn decode_all(input: &[u8]) -> Outcome {
        decode_with(&mut Decoder::new(), input, || usize::MAX)
    }

    fn frames_of(input: &[u8]) -> Vec<Frame> {
        let (frames, err) = decode_all(input);
        assert_eq!(err, None);
        frames
    }

    fn header(len: u32, kind: u8, channel: u8, reserved: u16, stream: u32) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(&len.to_le_bytes());
        h.push(kind);
        h.push(channel);
        h.extend_from_slice(&reserved.to_le_bytes());
        h.extend_from_slice(&stream.to_le_bytes());
        h
    }

    fn raw(kind: u8, channel: u8, reserved: u16, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = header(payload.len() as u32, kind, channel, reserved, stream);
        out.extend_from_slice(payload);
        out
    }

    /// A stream with every kind of frame and every sample message.
    fn sample_stream() -> (Vec<u8>, Vec<Frame>) {
        let enc = Encoder::new();
        let mut out = Vec::new();
        let mut expected = Vec::new();
        let mut push = |out: &mut Vec<u8>, frame: Frame| {
            enc.encode(out, &frame).unwrap();
            expected.push(frame);
        };
        let hello = serde_json::to_vec(&Hello::new(Role::Host)).unwrap();
        push(
            &mut out,
            Frame::new(FrameKind::Hello, Channel::Stdin, 0, hello),
        );
        for (i, request) in requests().iter().enumerate() {
            let json = serde_json::to_vec(request).unwrap();
            let stream = 2 * i as u32 + 1;
            push(
                &mut out,
                Frame::new(FrameKind::Request, Channel::Stdin, stream, json),
            );
        }
        for response in responses() {
            let json = serde_json::to_vec(&response).unwrap();
            push(
                &mut out,
                Frame::new(FrameKind::Response, Channel::Stdin, 5, json),
            );
        }
        for channel in [Channel::Stdin, Channel::Stdout, Channel::Stderr] {
            push(
                &mut out,
                Frame::new(FrameKind::Data, channel, 7, b"\x00\xffbytes\n".to_vec()),
            );
            push(
                &mut out,
                Frame::new(FrameKind::Data, channel, 7, Vec::new()),
            );
            push(&mut out, Frame::new(FrameKind::Eof, channel, 7, Vec::new()));
        }
        push(
            &mut out,
            Frame::new(FrameKind::Cancel, Channel::Stdin, u32::MAX, Vec::new()),
        );
        (out, expected)
    }

    #[test]
    fn every_frame_kind_round_trips() {
        let (wire, expected) = sample_stream();
        let frames = frames_of(&wire);
        assert_eq!(frames, expected);
        let kinds: Vec<FrameKind> = frames.iter().map(|f| f.kind).collect();
        for kind in 1..=6 {
            assert!(kinds.contains(&FrameKind::from_u8(kind).unwrap()));
        }
        assert_eq!(
            wire.len(),
            frames.iter().map(Frame::encoded_len).sum::<usize>()
        );
    }

    #[test]
    fn typed_encoders_round_trip_every_message() {
        let enc = Encoder::new();
        let mut wire = Vec::new();
        let hello = Hello {
            features: vec!["x".into()],
            ..Hello::new(Role::Agent)
        };
        enc.hello(&mut wire, &hello).unwrap();
        let mut ids = StreamIds::new();
        for request in requests() {
            enc.request(&mut wire, ids.allocate().unwrap(), &request)
                .unwrap();
        }
        for response in responses() {
            enc.response(&mut wire, 9, &response).unwrap();
        }
        enc.data(&mut wire, 11, Channel::Stdout, b"out").unwrap();
        enc.eof(&mut wire, 11, Channel::Stderr).unwrap();
        enc.cancel(&mut wire, 13).unwrap();

        let mut frames = frames_of(&wire).into_iter();
        let first = frames.next().unwrap();
        assert_eq!(first.kind, FrameKind::Hello);
        assert_eq!(
            Hello::parse_peer(&first.payload, Role::Agent).unwrap(),
            hello
        );
        assert_eq!(first.parse_json::<Hello>().unwrap(), hello);
        let mut ids = StreamIds::new();
        for request in requests() {
            let frame = frames.next().unwrap();
            assert!(ids.accept(frame.stream));
            frame.check_sender(Role::Host).unwrap();
            assert_eq!(frame.request().unwrap(), request);
        }
        for response in responses() {
            let frame = frames.next().unwrap();
            frame.check_sender(Role::Agent).unwrap();
            assert_eq!(frame.response().unwrap(), response);
        }
        assert_eq!(
            frames.next().unwrap(),
            Frame::new(FrameKind::Data, Channel::Stdout, 11, b"out".to_vec())
        );
        assert_eq!(
            frames.next().unwrap(),
            Frame::new(FrameKind::Eof, Channel::Stderr, 11, vec![])
        );
        assert_eq!(
            frames.next().unwrap(),
            Frame::new(FrameKind::Cancel, Channel::Stdin, 13, vec![])
        );
        assert!(frames.next().is_none());
    }

    #[test]
    fn header_layout_is_little_endian() {
        let mut wire = Vec::new();
        Encoder::new()
            .frame(
                &mut wire,
                FrameKind::Data,
                Channel::Stderr,
                0x0403_0201,
                b"abc",
            )
            .unwrap();
        assert_eq!(wire, [3, 0, 0, 0, 4, 2, 0, 0, 1, 2, 3, 4, b'a', b'b', b'c']);
        let mut wire = Vec::new();
        Encoder::new()
            .response(&mut wire, 1, &Response::Ok {})
            .unwrap();
        assert_eq!(&wire[..HEADER_LEN], &header(13, 3, 0, 0, 1)[..]);
        assert_eq!(&wire[HEADER_LEN..], br#"{"type":"ok"}"#);
    }

    #[test]
    fn byte_by_byte_and_random_chunks_give_the_same_frames() {
        let (wire, expected) = sample_stream();
        let one = decode_with(&mut Decoder::new(), &wire, || 1);
        assert_eq!(one, (expected.clone(), None));
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..50 {
            let limit = [2, 7, 13, 64, 1000, 100_000][round % 6];
            let got = decode_with(&mut Decoder::new(), &wire, || 1 + rng.below(limit));
            assert_eq!(got, (expected.clone(), None), "round {round}");
        }
    }

    #[test]
    fn frame_split_across_feeds() {
        let mut wire = Vec::new();
        Encoder::new()
            .data(&mut wire, 3, Channel::Stdout, b"hello, world")
            .unwrap();
        let mut decoder = Decoder::new();
        assert_eq!(decoder.feed(&wire[..5]), 5); // part of the header
        assert_eq!(decoder.next_frame().unwrap(), None);
        assert_eq!(decoder.feed(&wire[5..HEADER_LEN + 3]), HEADER_LEN - 2);
        assert_eq!(decoder.next_frame().unwrap(), None); // header, part of the payload
        assert_eq!(decoder.buffered(), HEADER_LEN + 3);
        assert!(decoder.finish().is_err());
        assert_eq!(decoder.feed(&wire[HEADER_LEN + 3..]), 9);
        let frame = decoder.next_frame().unwrap().unwrap();
        assert_eq!(frame.payload, b"hello, world");
        assert_eq!((frame.stream, frame.channel), (3, Channel::Stdout));
        assert_eq!(decoder.next_frame().unwrap(), None);
        assert_eq!(decoder.buffered(), 0);
        decoder.finish().unwrap();
    }

    #[test]
    fn oversize_length_is_rejected_before_buffering() {
        // A header claiming 4 GiB: rejected as soon as the header is in, nothing allocated
        // beyond the first small buffer.
        let mut decoder = Decoder::new();
        assert_eq!(decoder.feed(&header(u32::MAX, 4, 1, 0, 1)), HEADER_LEN);
        match decoder.next_frame() {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!((len, max), (u64::from(u32::MAX), DEFAULT_MAX_PAYLOAD));
            }
            other => panic!("{other:?}"),
        }
        assert!(decoder.buf.capacity() <= MIN_BUFFER);
        assert!(decoder.error().is_some());

        // One over a configured limit is rejected, the limit itself accepted.
        let mut decoder = Decoder::with_max_payload(100);
        let mut wire = raw(4, 0, 0, 1, &[7; 100]);
        wire.extend(header(101, 4, 0, 0, 1));
        wire.extend([0; 101]);
        let (frames, err) = decode_with(&mut decoder, &wire, || 3);
        assert_eq!(frames.len(), 1);
        assert!(err.unwrap().contains("101 bytes is over the limit of 100"));
        assert!(decoder.buf.len() <= decoder.capacity());

        // The encoder keeps to its own limit and leaves the output alone.
        let enc = Encoder::with_max_payload(100);
        let mut out = vec![1, 2, 3];
        assert!(matches!(
            enc.frame(&mut out, FrameKind::Data, Channel::Stdin, 1, &[0; 101]),
            Err(FrameError::TooLarge { len: 101, max: 100 })
        ));
        let big = Request::exec(["x".repeat(200)]);
        assert!(matches!(
            enc.request(&mut out, 1, &big),
            Err(FrameError::TooLarge { max: 100, .. })
        ));
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn feed_never_holds_more_than_one_frame() {
        let mut decoder = Decoder::with_max_payload(64);
        let mut wire = Vec::new();
        let enc = Encoder::with_max_payload(64);
        for i in 0..500u32 {
            let len = (i as usize * 7) % 65;
            enc.frame(
                &mut wire,
                FrameKind::Data,
                Channel::Stdout,
                1,
                &vec![i as u8; len],
            )
            .unwrap();
        }
        // One big slice: the decoder takes only what fits, then waits for frames to go.
        let capacity = decoder.capacity();
        assert_eq!(capacity, HEADER_LEN + 64);
        assert_eq!(decoder.feed(&wire), capacity);
        assert_eq!(decoder.feed(&wire), 0);
        let mut frames = 0;
        let mut rest = &wire[capacity..];
        loop {
            while let Some(frame) = decoder.next_frame().unwrap() {
                assert_eq!(frame.payload.len(), (frames * 7) % 65);
                frames += 1;
            }
            assert!(decoder.buffered() < capacity);
            assert!(decoder.buf.len() <= capacity);
            if rest.is_empty() {
                break;
            }
            let taken = decoder.feed(rest);
            assert!(taken > 0);
            rest = &rest[taken..];
        }
        assert_eq!(frames, 500);
        decoder.finish().unwrap();
    }

    #[test]
    fn header_and_payload_errors() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (raw(0, 0, 0, 1, b""), "unknown frame kind 0"),
            (raw(7, 0, 0, 1, b""), "unknown frame kind 7"),
            (raw(255, 0, 0, 1, b""), "unknown frame kind 255"),
            (raw(4, 1, 1, 1, b"x"), "reserved field 0x0001"),
            (raw(5, 0, 0x8000, 1, b""), "reserved field 0x8000"),
            (raw(4, 3, 0, 1, b"x"), "data frame has channel 3"),
            (raw(5, 255, 0, 1, b""), "eof frame has channel 255"),
            (raw(2, 1, 0, 1, b"{}"), "request frame has channel 1"),
            (raw(6, 2, 0, 1, b""), "cancel frame has channel 2"),
            (raw(1, 0, 0, 1, b"{}"), "hello frame on stream 1"),
            (raw(2, 0, 0, 0, b"{}"), "request frame on stream 0"),
            (raw(4, 0, 0, 0, b"x"), "data frame on stream 0"),
            (raw(5, 1, 0, 1, b"x"), "eof frame has a payload of 1 bytes"),
            (raw(6, 0, 0, 1, b"xyz"), "cancel frame has a payload of 3"),
            (
                raw(2, 0, 0, 1, b""),
                "request frame payload is not valid JSON",
            ),
            (raw(2, 0, 0, 1, b"{"), "not valid JSON"),
            (raw(3, 0, 0, 1, br#"{"a":1} {}"#), "not valid JSON"),
            (raw(3, 0, 0, 1, b"{\"a\":\"\xff\"}"), "not UTF-8"),
            (
                raw(1, 0, 0, 0, b"[1,2]"),
                "hello frame payload is JSON but not an object",
            ),
            (raw(2, 0, 0, 1, b" 42 "), "not an object"),
            (raw(2, 0, 0, 1, b"null"), "not an object"),
        ];
        for (wire, want) in cases {
            let (frames, err) = decode_all(&wire);
            assert!(frames.is_empty());
            let err = err.unwrap_or_default();
            assert!(err.contains(want), "{wire:?}: got {err:?}, want {want:?}");
        }
        // Deep nesting is valid JSON; checking it does not recurse, and parsing it into a
        // message hits serde_json's recursion limit, not the end of the stack.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let payload = format!(r#"{{"type":"exec","argv":{deep}}}"#);
        let frames = frames_of(&raw(2, 0, 0, 1, payload.as_bytes()));
        let err = frames[0].request().unwrap_err();
        assert!(matches!(err, FrameError::Message { .. }), "{err}");
        let payload = format!(r#"{{"type":"ok","x":{deep}}}"#);
        let frames = frames_of(&raw(3, 0, 0, 1, payload.as_bytes()));
        assert!(frames[0].response().is_err());
        // Whitespace around an object is fine.
        let frames = frames_of(&raw(2, 0, 0, 1, b" \n{\"type\":\"metrics\"}\t"));
        assert_eq!(frames[0].request().unwrap(), Request::Metrics {});
    }

    #[test]
    fn decoder_stays_failed() {
        let mut decoder = Decoder::new();
        let mut wire = raw(9, 0, 0, 1, b"");
        Encoder::new().cancel(&mut wire, 1).unwrap();
        assert_eq!(decoder.feed(&wire), wire.len());
        assert!(matches!(
            decoder.next_frame(),
            Err(FrameError::UnknownKind(9))
        ));
        for _ in 0..3 {
            assert!(matches!(
                decoder.next_frame(),
                Err(FrameError::UnknownKind(9))
            ));
            let mut good = Vec::new();
            Encoder::new().cancel(&mut good, 1).unwrap();
            assert_eq!(decoder.feed(&good), good.len());
        }
        assert_eq!(decoder.buffered(), 0);
        assert!(matches!(decoder.finish(), Err(FrameError::UnknownKind(9))));
        let err = decoder
            .read_from(&mut std::io::Cursor::new(good_bytes()))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    fn good_bytes() -> Vec<u8> {
        let mut out = Vec::new();
        Encoder::new()
            .response(&mut out, 1, &Response::Ok {})
            .unwrap();
        out
    }

    #[test]
    fn read_from_fills_the_buffer_directly() {
        let enc = Encoder::new();
        let mut wire = Vec::new();
        let big: Vec<u8> = (0..DEFAULT_MAX_PAYLOAD + 10).map(|i| i as u8).collect();
        enc.data(&mut wire, 1, Channel::Stdout, &big).unwrap();
        enc.eof(&mut wire, 1, Channel::Stdout).unwrap();
        enc.response(
            &mut wire,
            1,
            &Response::FileDone {
                bytes: big.len() as u64,
            },
        )
        .unwrap();
        let mut reader = std::io::Cursor::new(wire);
        let mut decoder = Decoder::new();
        let mut frames = Vec::new();
        loop {
            let n = decoder.read_from(&mut reader).unwrap();
            assert!(n <= READ_CHUNK);
            while let Some(frame) = decoder.next_frame().unwrap() {
                frames.push(frame);
            }
            if n == 0 {
                break;
            }
        }
        decoder.finish().unwrap();
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[0].payload.len(), DEFAULT_MAX_PAYLOAD);
        assert_eq!(frames[1].payload.len(), 10);
        let received: Vec<u8> = frames[..2].iter().flat_map(|f| f.payload.clone()).collect();
        assert_eq!(received, big);
        assert_eq!(frames[2].kind, FrameKind::Eof);
        assert_eq!(
            frames[3].response().unwrap(),
            Response::FileDone {
                bytes: big.len() as u64
            }
        );
        assert_eq!(decoder.buf.len(), decoder.capacity());

        // WouldBlock passes through, and a full buffer is reported, not read into.
        struct Blocked;
        impl io::Read for Blocked {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        let mut decoder = Decoder::with_max_payload(4);
        assert_eq!(
            decoder.read_from(&mut Blocked).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let mut wire = Vec::new();
        Encoder::new()
            .data(&mut wire, 1, Channel::Stdout, b"abcd")
            .unwrap();
        assert_eq!(decoder.feed(&wire), 16);
        assert_eq!(
            decoder.read_from(&mut Blocked).unwrap_err().kind(),
            io::ErrorKind::Other
        );
        assert_eq!(decoder.next_frame().unwrap().unwrap().payload, b"abcd");
    }

    #[test]
    fn finish_reports_a_truncated_frame() {
        let wire = good_bytes();
        let mut decoder = Decoder::new();
        assert_eq!(decoder.feed(&wire[..wire.len() - 1]), wire.len() - 1);
        assert_eq!(decoder.next_frame().unwrap(), None);
        assert!(matches!(
            decoder.finish(),
            Err(FrameError::Truncated { buffered }) if buffered == wire.len() - 1
        ));
    }

    #[test]
    fn encoder_splits_data_and_checks_its_input() {
        let enc = Encoder::with_max_payload(4);
        let mut out = Vec::new();
        enc.data(&mut out, 1, Channel::Stdin, b"0123456789")
            .unwrap();
        enc.data(&mut out, 1, Channel::Stdin, b"").unwrap();
        let frames = decode_with(&mut Decoder::with_max_payload(4), &out, || 5).0;
        let payloads: Vec<&[u8]> = frames.iter().map(|f| &f.payload[..]).collect();
        assert_eq!(payloads, [&b"0123"[..], b"4567", b"89"]);

        let enc = Encoder::new();
        let mut out = vec![9];
        let bad: Vec<Result<(), FrameError>> = vec![
            enc.data(&mut out, 0, Channel::Stdout, b"x"),
            enc.eof(&mut out, 0, Channel::Stdout),
            enc.cancel(&mut out, 0),
            enc.request(&mut out, 0, &Request::Metrics {}),
            enc.json(&mut out, FrameKind::Hello, 1, &Hello::new(Role::Host)),
            enc.json(&mut out, FrameKind::Data, 1, &Hello::new(Role::Host)),
            enc.json(&mut out, FrameKind::Response, 1, "a string"),
            enc.json(
                &mut out,
                FrameKind::Response,
                1,
                &std::collections::HashMap::from([((1, 2), 3)]),
            ),
            enc.frame(&mut out, FrameKind::Request, Channel::Stdout, 1, b"{}"),
            enc.frame(&mut out, FrameKind::Request, Channel::Stdin, 1, b"[]"),
            enc.frame(&mut out, FrameKind::Eof, Channel::Stdin, 1, b"x"),
        ];
        for result in bad {
            assert!(result.is_err());
        }
        assert_eq!(out, [9], "a failed encode leaves the output as it was");
        assert!(Encoder::with_max_payload(0)
            .data(&mut out, 1, Channel::Stdin, b"x")
            .is_err());
        assert_eq!(
            Encoder::with_max_payload(usize::MAX).max_payload(),
            u32::MAX as usize
        );
    }

    #[test]
    fn parse_json_checks_the_kind() {
        let frame = Frame::new(FrameKind::Data, Channel::Stdout, 1, b"{}".to_vec());
        assert!(matches!(
            frame.parse_json::<Response>(),
            Err(FrameError::NotJson { .. })
        ));
        let frame = Frame::new(
            FrameKind::Request,
            Channel::Stdin,
            1,
            br#"{"type":"ok"}"#.to_vec(),
        );
        assert!(matches!(
            frame.response(),
            Err(FrameError::UnexpectedKind {
                expected: FrameKind::Response,
                got: FrameKind::Request
            })
        ));
        assert!(matches!(frame.request(), Err(FrameError::Message { .. })));
        let frame = Frame::new(
            FrameKind::Response,
            Channel::Stdin,
            1,
            br#"{"type":"ok"}"#.to_vec(),
        );
        assert_eq!(frame.response().unwrap(), Response::Ok {});
    }

    #[test]
    fn check_sender_enforces_directions() {
        let f = |kind, channel, stream| Frame::new(kind, channel, stream, Vec::new());
        use Channel::*;
        use FrameKind::*;
        let host_ok = [
            f(Hello, Stdin, 0),
            f(Request, Stdin, 1),
            f(Cancel, Stdin, 3),
            f(Data, Stdin, 5),
            f(Eof, Stdin, 5),
        ];
        let agent_ok = [
            f(Hello, Stdin, 0),
            f(Response, Stdin, 1),
            f(Data, Stdout, 1),
            f(Data, Stderr, 1),
            f(Eof, Stdout, 1),
            f(Eof, Stderr, u32::MAX),
        ];
        for frame in &host_ok {
            frame.check_sender(Role::Host).unwrap();
        }
        for frame in &agent_ok {
            frame.check_sender(Role::Agent).unwrap();
        }
        let host_bad = [
            f(Response, Stdin, 1),
            f(Data, Stdout, 1),
            f(Eof, Stderr, 1),
            f(Request, Stdin, 2),
        ];
        let agent_bad = [
            f(Request, Stdin, 1),
            f(Cancel, Stdin, 1),
            f(Data, Stdin, 1),
            f(Eof, Stdin, 1),
            f(Response, Stdin, 2),
            f(Data, Stdout, 4),
        ];
        for frame in &host_bad {
            assert!(frame.check_sender(Role::Host).is_err(), "{frame:?}");
        }
        for frame in &agent_bad {
            let err = frame.check_sender(Role::Agent).unwrap_err();
            assert!(err.to_string().contains("from the agent"), "{err}");
        }
    }

    #[test]
    fn stream_ids_are_odd_and_increasing() {
        let mut host = StreamIds::new();
        let mut agent = StreamIds::new();
        assert!(!agent.is_opened(1));
        for want in [1, 3, 5] {
            let id = host.allocate().unwrap();
            assert_eq!(id, want);
            assert!(agent.accept(id));
            assert!(agent.is_opened(id));
        }
        assert!(!agent.accept(5), "reuse");
        assert!(!agent.accept(3), "going back");
        assert!(!agent.accept(8), "even");
        assert!(!agent.accept(0));
        assert!(!agent.is_opened(7));
        assert!(!agent.is_opened(2));
        assert!(agent.accept(101), "gaps are fine");
        let mut near_end = StreamIds { last: u32::MAX - 2 };
        assert_eq!(near_end.allocate(), Some(u32::MAX));
        assert_eq!(near_end.allocate(), None);
        assert_eq!(near_end.allocate(), None);
    }

    /// A random frame, often valid, sometimes not, to reach deep into the decoder.
    fn random_frame(rng: &mut Rng, out: &mut Vec<u8>) {
        let messages: [&[u8]; 6] = [
            br#"{"type":"exec","argv":["ls"]}"#,
            br#"{"type":"ok"}"#,
            br#"{"version":1,"role":"agent","features":[]}"#,
            br#"{"type":"listing","entries":[{"path":"/a","kind":"dir","size":1,"mode":493,"mtime_ms":0}]}"#,
            br#"{"type":"signal","stream":1,"signal":99}"#,
            b"{}",
        ];
        let kind = if rng.chance(8) {
            rng.below(256) as u8
        } else {
            1 + rng.below(6) as u8
        };
        let channel = if rng.chance(8) {
            rng.below(256) as u8
        } else {
            rng.below(3) as u8
        };
        let reserved = if rng.chance(16) { rng.next() as u16 } else { 0 };
        let stream = match rng.below(4) {
            0 => 0,
            1 => rng.next() as u32,
            _ => 1 + 2 * rng.below(8) as u32,
        };
        let payload: Vec<u8> = match rng.below(3) {
            0 => messages[rng.below(messages.len())].to_vec(),
            1 => Vec::new(),
            _ => (0..rng.below(40)).map(|_| rng.next() as u8).collect(),
        };
        let len = if rng.chance(16) {
            rng.next() as u32
        } else {
            payload.len() as u32
        };
        out.extend(header(len, kind, channel, reserved, stream));
        out.extend(payload);
    }

    /// Mutates a valid stream: byte flips, insertions, deletions, truncation, splices.
    fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
        for _ in 0..1 + rng.below(4) {
            if input.is_empty() {
                input.push(rng.next() as u8);
            }
            let at = rng.below(input.len());
            match rng.below(6) {
                0 => input[at] ^= 1 << rng.below(8),
                1 => input[at] = rng.next() as u8,
                2 => input.insert(at, rng.next() as u8),
                3 => {
                    input.remove(at);
                }
                4 => input.truncate(at),
                _ => {
                    let len = rng.below(16).min(input.len() - at);
                    let piece = input[at..at + len].to_vec();
                    let to = rng.below(input.len());
                    input.splice(to..to, piece);
                }
            }
        }
    }

    /// Exercises everything a receiver does with a decoded frame.
    fn use_frame(frame: &Frame) {
        let _ = frame.check_sender(Role::Host);
        let _ = frame.check_sender(Role::Agent);
        match frame.kind {
            FrameKind::Hello => {
                let _ = Hello::parse_peer(&frame.payload, Role::Agent);
            }
            FrameKind::Request => {
                if let Ok(request) = frame.request() {
                    if let Err(err) = request.validate() {
                        let _ = Response::from_proto_error(&err);
                    }
                }
            }
            FrameKind::Response => {
                if let Ok(response) = frame.response() {
                    let _ = response.validate();
                }
            }
            _ => {}
        }
    }

    #[test]
    fn random_input_never_panics_and_chunking_never_matters() {
        let mut rng = Rng(0xDEAD_BEEF_CAFE_F00D);
        let (valid, valid_frames) = sample_stream();
        // Where each frame of the valid stream starts, and where the last one ends.
        let mut bounds = vec![0];
        for frame in &valid_frames {
            bounds.push(bounds[bounds.len() - 1] + frame.encoded_len());
        }
        let (mut frames_seen, mut errors_seen) = (0usize, 0usize);
        for iteration in 0..20_000 {
            let mut input = Vec::new();
            match iteration % 4 {
                // Pure noise.
                0 => input.extend((0..rng.below(300)).map(|_| rng.next() as u8)),
                // Random, often well-formed headers.
                1 => {
                    for _ in 0..1 + rng.below(6) {
                        random_frame(&mut rng, &mut input);
                    }
                }
                // A mutated run of whole frames of a valid stream.
                _ => {
                    let first = rng.below(bounds.len() - 1);
                    let last = (first + 1 + rng.below(8)).min(bounds.len() - 1);
                    input.extend_from_slice(&valid[bounds[first]..bounds[last]]);
                    mutate(&mut rng, &mut input);
                }
            }
            let max = [16, 64, 256, DEFAULT_MAX_PAYLOAD][rng.below(4)];
            let whole = decode_with(&mut Decoder::with_max_payload(max), &input, || usize::MAX);
            let chunked = if iteration % 16 == 0 {
                decode_with(&mut Decoder::with_max_payload(max), &input, || 1)
            } else {
                let limit = 1 + rng.below(64);
                decode_with(&mut Decoder::with_max_payload(max), &input, || {
                    1 + rng.below(limit)
                })
            };
            assert_eq!(whole, chunked, "iteration {iteration}: {input:?}");
            for frame in &whole.0 {
                use_frame(frame);
            }
            frames_seen += whole.0.len();
            errors_seen += usize::from(whole.1.is_some());
        }
        // The generator reaches both outcomes often.
        assert!(frames_seen > 5_000, "{frames_seen}");
        assert!(errors_seen > 5_000, "{errors_seen}");
    }
}
