//! What the persistent-sandbox tests of both tiers share: a small blocking client of the
//! agent protocol and its helpers.

#![allow(dead_code)]

use moat_api::Status;
use moat_proto::{
    Channel, Decoder, Encoder, ErrorCode, Frame, FrameKind, Hello, ProcInfo, Request, Response,
    Role, StreamIds,
};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// What one stream produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub started: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub eofs: Vec<Channel>,
    pub last: Option<Response>,
}

impl Outcome {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn exit(&self) -> (Option<i32>, Option<i32>, Status) {
        match &self.last {
            Some(Response::Exit {
                exit_code,
                signal,
                status,
            }) => (*exit_code, *signal, *status),
            other => panic!("expected an exit, got {other:?} ({self:?})"),
        }
    }

    pub fn error(&self) -> ErrorCode {
        match &self.last {
            Some(Response::Error { code, .. }) => *code,
            other => panic!("expected an error, got {other:?}"),
        }
    }
}

pub struct Client {
    pub sock: UnixStream,
    pub dec: Decoder,
    pub enc: Encoder,
    pub ids: StreamIds,
    pub stash: VecDeque<Frame>,
    /// Background execs: Started ends them.
    pub background: Vec<u32>,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let sock = UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut c = Client {
            sock,
            dec: Decoder::new(),
            enc: Encoder::new(),
            ids: StreamIds::new(),
            stash: VecDeque::new(),
            background: Vec::new(),
        };
        let mut out = Vec::new();
        c.enc.hello(&mut out, &Hello::new(Role::Host)).unwrap();
        c.sock.write_all(&out).unwrap();
        let hello = c.read_frame();
        assert_eq!(hello.kind, FrameKind::Hello);
        Hello::parse_peer(&hello.payload, Role::Agent).unwrap();
        c
    }

    pub fn read_frame(&mut self) -> Frame {
        loop {
            if let Some(f) = self.dec.next_frame().unwrap() {
                f.check_sender(Role::Agent).unwrap();
                return f;
            }
            let n = self
                .dec
                .read_from(&mut self.sock)
                .expect("read from the agent");
            assert!(n > 0, "the agent closed the connection");
        }
    }

    /// The next frame of `stream` up to its final response, or None when the agent closed
    /// the connection first (its sandbox died).
    pub fn try_final(&mut self, stream: u32) -> Option<Response> {
        loop {
            while let Some(f) = self.dec.next_frame().unwrap() {
                if f.stream == stream && f.kind == FrameKind::Response {
                    let r = f.response().unwrap();
                    if !matches!(r, Response::Started { .. }) {
                        return Some(r);
                    }
                }
            }
            match self.dec.read_from(&mut self.sock) {
                Ok(n) if n > 0 => {}
                _ => return None,
            }
        }
    }

    pub fn send(&mut self, out: Vec<u8>) {
        self.sock.write_all(&out).unwrap();
    }

    pub fn request(&mut self, request: &Request) -> u32 {
        let id = self.ids.allocate().unwrap();
        if matches!(
            request,
            Request::Exec {
                background: true,
                ..
            }
        ) {
            self.background.push(id);
        }
        let mut out = Vec::new();
        self.enc.request(&mut out, id, request).unwrap();
        self.send(out);
        id
    }

    pub fn stdin(&mut self, stream: u32, bytes: &[u8]) {
        let mut out = Vec::new();
        self.enc
            .data(&mut out, stream, Channel::Stdin, bytes)
            .unwrap();
        self.send(out);
    }

    pub fn eof(&mut self, stream: u32) {
        let mut out = Vec::new();
        self.enc.eof(&mut out, stream, Channel::Stdin).unwrap();
        self.send(out);
    }

    pub fn cancel(&mut self, stream: u32) {
        let mut out = Vec::new();
        self.enc.cancel(&mut out, stream).unwrap();
        self.send(out);
    }

    /// The next frame of `stream` (frames of other streams are kept for later).
    pub fn next_of(&mut self, stream: u32) -> Frame {
        if let Some(i) = self.stash.iter().position(|f| f.stream == stream) {
            return self.stash.remove(i).unwrap();
        }
        loop {
            let f = self.read_frame();
            if f.stream == stream {
                return f;
            }
            self.stash.push_back(f);
        }
    }

    /// Reads `stream` up to its first response (Started or final).
    pub fn first_response(&mut self, stream: u32) -> Response {
        loop {
            let f = self.next_of(stream);
            if f.kind == FrameKind::Response {
                let r = f.response().unwrap();
                r.validate().unwrap();
                return r;
            }
        }
    }

    /// Reads `stream` to its final response.
    pub fn finish(&mut self, stream: u32) -> Outcome {
        let mut o = Outcome::default();
        let background = self.background.contains(&stream);
        loop {
            let f = self.next_of(stream);
            match f.kind {
                FrameKind::Data => match f.channel {
                    Channel::Stdout => o.stdout.extend_from_slice(&f.payload),
                    Channel::Stderr => o.stderr.extend_from_slice(&f.payload),
                    Channel::Stdin => panic!("data on channel 0 from the agent"),
                },
                FrameKind::Eof => o.eofs.push(f.channel),
                FrameKind::Response => {
                    let r = f.response().unwrap();
                    r.validate().unwrap();
                    if let Response::Started { pid } = r {
                        assert!(o.started.is_none(), "two Started");
                        o.started = Some(pid);
                        if !background {
                            continue;
                        }
                    }
                    o.last = Some(r);
                    return o;
                }
                other => panic!("unexpected {other:?} frame"),
            }
        }
    }

    pub fn call(&mut self, request: &Request) -> Outcome {
        let s = self.request(request);
        self.finish(s)
    }

    pub fn run(&mut self, argv: &[&str]) -> Outcome {
        self.call(&Request::exec(argv.iter().copied()))
    }

    pub fn sh(&mut self, script: &str) -> Outcome {
        self.run(&["sh", "-c", script])
    }

    pub fn ok(&mut self, request: &Request) {
        let o = self.call(request);
        assert_eq!(o.last, Some(Response::Ok {}), "{request:?}");
    }

    pub fn procs(&mut self) -> Vec<ProcInfo> {
        match self.call(&Request::Procs {}).last {
            Some(Response::ProcList { procs }) => procs,
            other => panic!("{other:?}"),
        }
    }

    pub fn read_file(&mut self, path: &str) -> Outcome {
        self.call(&Request::ReadFile { path: path.into() })
    }

    pub fn write_file(&mut self, path: &str, bytes: &[u8]) -> Outcome {
        let s = self.request(&Request::WriteFile {
            path: path.into(),
            mode: None,
            create_parents: true,
        });
        for chunk in bytes.chunks(1 << 20) {
            self.stdin(s, chunk);
        }
        self.eof(s);
        self.finish(s)
    }
}

pub fn exec(argv: &[&str]) -> Request {
    Request::exec(argv.iter().copied())
}

pub fn with(request: Request, f: impl FnOnce(&mut Request)) -> Request {
    let mut r = request;
    f(&mut r);
    r
}

pub fn set_stdin(r: &mut Request) {
    if let Request::Exec { stdin, .. } = r {
        *stdin = true;
    }
}

/// Reads exactly one frame off `sock` (the bytes after a `Relayed` are raw).
pub fn read_exact_frame(sock: &mut UnixStream) -> Frame {
    let mut header = [0u8; moat_proto::frame::HEADER_LEN];
    sock.read_exact(&mut header).unwrap();
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let mut whole = header.to_vec();
    whole.resize(header.len() + len, 0);
    sock.read_exact(&mut whole[header.len()..]).unwrap();
    let mut dec = Decoder::new();
    assert_eq!(dec.feed(&whole), whole.len());
    dec.next_frame().unwrap().unwrap()
}

/// A host connection that asked for a relay, before the agent answered.
pub fn ask_relay(socket: &Path) -> UnixStream {
    let mut sock = UnixStream::connect(socket).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let enc = Encoder::new();
    let mut out = Vec::new();
    enc.hello(&mut out, &Hello::new(Role::Host)).unwrap();
    enc.request(&mut out, 1, &Request::Relay {}).unwrap();
    sock.write_all(&out).unwrap();
    let hello = read_exact_frame(&mut sock);
    assert_eq!(hello.kind, FrameKind::Hello);
    sock
}
