//! The moat agent protocol, version 1 ([`msg::PROTOCOL_VERSION`]).
//!
//! moat's init (PID 1 inside every sandbox, "the agent") and the host daemon ("the host")
//! talk over one reliable, ordered byte stream: a unix socket today, vsock or virtio-serial
//! later. This crate is the protocol and nothing else: frames ([`frame`]) and the JSON
//! messages they carry ([`msg`]). No I/O beyond [`frame::Decoder::read_from`], no threads,
//! no async runtime: the agent drives it from a `poll` loop, the host from tokio.
//!
//! **Trust.** The host treats everything from the agent as hostile, since a compromised
//! sandbox controls its agent: it decodes with a bounded [`frame::Decoder`], runs
//! [`frame::Frame::check_sender`] on every frame and [`msg::Response::validate`] on every
//! response, and closes the connection (then kills the sandbox) on any violation. The agent
//! checks the host's frames the same way and answers a bad request with an `Error`.
//!
//! # Frames
//!
//! Every frame is a 12-byte header, little endian, then `payload_len` bytes of payload:
//!
//! | offset | size | field | rule |
//! |---|---|---|---|
//! | 0 | 4 | `payload_len` | at most the receiver's limit, 1 MiB by default ([`frame::DEFAULT_MAX_PAYLOAD`]); senders never exceed 1 MiB |
//! | 4 | 1 | `kind` | one of the kinds below |
//! | 5 | 1 | `channel` | 0, 1 or 2 for Data and Eof; 0 for the other kinds |
//! | 6 | 2 | `reserved` | must be 0 |
//! | 8 | 4 | `stream_id` | 0 for Hello and only Hello |
//!
//! | kind | value | payload | direction |
//! |---|---|---|---|
//! | Hello | 1 | JSON [`msg::Hello`] | both, first frame, stream 0 |
//! | Request | 2 | JSON [`msg::Request`] | host → agent, opens a stream |
//! | Response | 3 | JSON [`msg::Response`] | agent → host |
//! | Data | 4 | raw bytes | channel 0 (stdin, file content to the sandbox): host → agent; channels 1 (stdout, file content from the sandbox) and 2 (stderr): agent → host |
//! | Eof | 5 | empty | end of a channel, same directions as Data |
//! | Cancel | 6 | empty | host → agent: abort the stream's request |
//!
//! A frame that breaks these rules (unknown kind, reserved bits set, a length over the
//! limit, a bad channel or stream, a payload on Eof or Cancel, a JSON kind whose payload is
//! not a UTF-8 JSON object) is a [`frame::FrameError`]: the decoder stays failed, and the
//! connection must be closed, since framing can no longer be trusted. The decoder never
//! holds more than one header plus one maximal payload and never allocates what a header
//! merely claims.
//!
//! JSON messages are objects with a snake_case `"type"` (for requests and responses);
//! unknown fields and unknown types are rejected. A Request frame that is well framed but
//! does not parse or fails [`msg::Request::validate`] is answered with
//! `Error { code: invalid_request | too_large }` on its stream; the connection stays up.
//!
//! # Connection start
//!
//! On connect each side sends its [`msg::Hello`] at once (`{"version":1,"role":"host",
//! "features":[]}`), without waiting for the other's, then reads the peer's and checks it
//! with [`msg::Hello::parse_peer`]: same version, the other role. On a mismatch it closes
//! the connection; the error names both versions. A feature is in use only when both
//! Hellos list it ([`msg::Hello::common_features`]); version 1 defines none. Any frame
//! before the peer's Hello, and a second Hello, is a protocol error.
//!
//! # Streams
//!
//! Requests are multiplexed on streams. The host opens a stream by sending a Request on a
//! fresh odd id, strictly above every id it used before on this connection
//! ([`frame::StreamIds`]); ids are never reused, and even ids are kept for streams the
//! agent may open in a later version. One request per stream. The agent answers on the
//! same id; every stream ends with exactly one **final** response: `Exit`, `FileDone`,
//! `Listing`, `StatResult`, `Ok`, `Metrics`, `ProcList` or `Error`. `Started` is not final, except for
//! a background `Exec`.
//!
//! After its final response a stream is closed. The agent silently drops frames for a
//! closed stream (the host may have sent stdin or a Cancel before it saw the end); the
//! host treats any frame from the agent on a closed or never-opened stream as a violation.
//!
//! There is no flow control in version 1. Each side must keep reading the connection at
//! all times (never block on a write while not reading), and bound what it queues per
//! stream: the agent stops reading a process's pipes while that stream's queued output is
//! over its bound, the host stops reading its client's stdin likewise. Output caps
//! (`output_limit`) are the host's: it sends Cancel when a stream goes over.
//!
//! # Flows
//!
//! `→` is host to agent, `←` agent to host; `s` is the stream id.
//!
//! **Exec** (`stdin: true`, pipes):
//!
//! ```text
//! → Request  s  {"type":"exec","argv":["sh","-c","cat; echo done >&2"],"env":{"PATH":"/usr/bin:/bin"},
//!                "cwd":"/work","stdin":true,"pty":null,"timeout_ms":10000,"background":false}
//! ← Response s  {"type":"started","pid":7}
//! → Data     s  channel 0  "hello"          (any number, interleaved with the agent's)
//! → Eof      s  channel 0                   (the process's stdin is closed)
//! ← Data     s  channel 1  "hello"
//! ← Data     s  channel 2  "done\n"
//! ← Eof      s  channel 1
//! ← Eof      s  channel 2
//! ← Response s  {"type":"exit","exit_code":0,"signal":null,"status":"ok"}     (final)
//! ```
//!
//! - If the process cannot start, the only answer is `Error` (`not_found` for a missing
//!   program, `permission_denied`, ...). `stdin: false` gives the process `/dev/null`, and
//!   the host sends nothing on channel 0.
//! - With `pty`, stdin, stdout and stderr are one terminal: all output comes on channel 1,
//!   there is no channel 2 and no Eof on it. `Resize` changes the size. The host's Eof on
//!   channel 0 reaches the terminal as its end-of-file character (Ctrl-D).
//! - The agent sends Eof on channel 1 (and 2) before `Exit`, once the pipe ends or, if a
//!   leftover child keeps it open, once the process has exited and what was readable is
//!   sent. `Exit` is always the last frame.
//! - `timeout_ms`: at the deadline the agent kills the process group; `Exit` has status
//!   `timeout` and the signal.
//! - `Cancel` on `s`: the agent kills the process group (SIGKILL) and ends the stream as
//!   above, with status `killed`.
//! - `background: true`: `Started` is the final frame; the process runs on after the
//!   stream and the connection end (see **Background processes**). `pty` must be off;
//!   `stdin: true` gives it a pipe the host writes with `proc_stdin`, otherwise `/dev/null`.
//! - `Signal { stream: s, signal }` and `Resize { stream: s, .. }` are requests of their
//!   own, on a new stream `t`, answered `Ok` or `Error` (`not_found`: no live process of
//!   `s`) on `t`.
//!
//! **ReadFile**:
//!
//! ```text
//! → Request  s  {"type":"read_file","path":"/work/out.csv"}
//! ← Response s  {"type":"started","pid":0}            (the file is open)
//! ← Data     s  channel 1  ...                        (each at most 1 MiB)
//! ← Eof      s  channel 1
//! ← Response s  {"type":"file_done","bytes":12345}    (final; must equal the bytes sent)
//! ```
//!
//! An error before the file is open is a lone `Error`; an error while reading is an
//! `Error` instead of the Eof and `FileDone`, and the host drops what it received. Symlinks
//! are followed (inside the sandbox: the agent resolves every path in its own mount
//! namespace, as the sandbox's user, so a planted symlink reaches only sandbox files).
//!
//! **WriteFile**: the host sends the content right away, without waiting for an answer:
//!
//! ```text
//! → Request  s  {"type":"write_file","path":"/work/in.txt","mode":420,"create_parents":true}
//! → Data     s  channel 0  ...
//! → Eof      s  channel 0
//! ← Response s  {"type":"file_done","bytes":5}        (final)
//! ```
//!
//! The agent writes a temporary file beside `path` and renames it into place at Eof, so a
//! failed or cancelled write leaves the old file. If it fails early it answers `Error` at
//! once and drops the rest of the stream's frames; the host stops sending when it sees the
//! `Error`. A Cancel ends the stream with `Error { code: cancelled }`.
//!
//! **Background processes**: the agent retains the last 1 MiB of stdout and of stderr of
//! every background process ([`msg::RETAINED_OUTPUT`]; older bytes are dropped) and
//! remembers the 256 most recent finished ones.
//!
//! ```text
//! → Request  s  {"type":"exec","argv":["sh","-c","cat"],"stdin":true,"background":true}
//! ← Response s  {"type":"started","pid":9}                       (final)
//! → Request  t  {"type":"proc_stdin","pid":9,"close":true}
//! → Data     t  channel 0  "hello"
//! → Eof      t  channel 0                   (end of this request's bytes; close: the pipe too)
//! ← Response t  {"type":"ok"}                                    (final)
//! → Request  u  {"type":"proc_output","pid":9,"follow":true}
//! ← Response u  {"type":"started","pid":9}
//! ← Data     u  channel 1  "hello"          (retained output first, then live output)
//! ← Eof      u  channel 1
//! ← Eof      u  channel 2
//! ← Response u  {"type":"exit","exit_code":0,"signal":null,"status":"ok"}   (final)
//! ```
//!
//! - `proc_output` without `follow` sends what is retained, Eof 1, Eof 2, then `Exit` if
//!   the process has ended or `Ok` if it still runs. A Cancel on `u` ends the stream with
//!   `Ok` and leaves the process alone. An unknown pid is `Error { not_found }`.
//! - `proc_stdin` of a pid without an open stdin pipe is `Error { invalid_request }`.
//! - `procs {}` answers `proc_list { procs }`, one [`msg::ProcInfo`] per background
//!   process, running or finished.
//! - When a connection closes, the agent kills (SIGKILL) the process groups of its
//!   foreground execs; background processes keep running, and any later connection can
//!   list them, read their output, write their stdin and signal them. The agent serves
//!   up to 16 connections at once and closes further ones at once.
//!
//! **Other requests** are one request, one final response:
//!
//! | request | answer |
//! |---|---|
//! | `list_dir { path, depth }` | `listing { entries, truncated }`: entries below `path`, sorted, symlinks not followed; `truncated` when the agent stopped to stay under the frame limit |
//! | `stat { path }` | `stat_result` (an [`msg::Entry`], `lstat` semantics) |
//! | `mkdir { path, parents }` | `ok` |
//! | `remove { path, recursive }` | `ok` (never follows symlinks) |
//! | `rename { from, to }` | `ok` |
//! | `metrics` | `metrics { cpu_ms, memory_bytes, pids }` of the whole sandbox (the agent sums its pid namespace from `/proc`) |
//! | `signal { stream, signal }`, `resize { stream, rows, cols }` | `ok` |
//! | `signal_pid { pid, signal }` | `ok`: the signal went to the process group of a running process the agent started |
//! | `procs {}` | `proc_list { procs }` |
//!
//! Any of them may instead be answered `error { code, message }`, with `code` one of
//! [`msg::ErrorCode`]: `not_found`, `permission_denied`, `already_exists`,
//! `not_a_directory`, `is_a_directory`, `not_empty`, `invalid_request`, `too_large`,
//! `busy`, `cancelled`, `internal`.
//!
//! # Limits
//!
//! Payload 1 MiB; argv at most 4096 arguments and 1 MiB; env at most 4096 variables and
//! 1 MiB, names `[A-Za-z_][A-Za-z0-9_]*`; no NUL in any argument, variable or path; paths
//! absolute, non-empty, at most 4096 bytes (`..` is resolved by the agent inside the
//! sandbox); `list_dir` depth at most 16; signals 1 to 64; pids 1 to 2^31-1; modes at
//! most `0o7777`; a `proc_list` at most 1024 processes, each argv cut to 512 bytes;
//! error messages at most 4096 bytes. Paths are UTF-8 in version 1.
//!
//! # Versioning
//!
//! [`msg::PROTOCOL_VERSION`] changes whenever a peer of the old version would misread the
//! new one (a changed field, header or flow). Compatible additions go behind a feature
//! name in the Hello; a peer uses them only when both Hellos list the feature. Since the
//! agent is the moat binary itself, a mismatch means a sandbox outlived an upgrade of the
//! daemon.

pub mod boot;
pub mod frame;
pub mod msg;

pub use frame::{
    Channel, Decoder, Encoder, Frame, FrameError, FrameKind, StreamIds, DEFAULT_MAX_PAYLOAD,
    HEADER_LEN,
};
pub use msg::{
    Entry, EntryKind, ErrorCode, Hello, ProcInfo, ProtoError, PtySize, Request, Response, Role,
    PROTOCOL_VERSION,
};
