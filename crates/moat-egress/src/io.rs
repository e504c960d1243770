//! Byte plumbing: the buffered client, a reader that replays what was read past a request
//! head, and a meter on the upstream side that counts bytes, enforces the sandbox's byte
//! budget and feeds the idle watchdog.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Relay buffer size, each direction.
pub(crate) const BUF: usize = 64 * 1024;

/// The client stream with what has been read from it but not yet consumed.
pub(crate) struct Conn<S> {
    s: S,
    buf: Vec<u8>,
    timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(s: S, timeout: Duration) -> Conn<S> {
        Conn {
            s,
            buf: Vec::with_capacity(4096),
            timeout,
        }
    }

    pub fn buf(&self) -> &[u8] {
        &self.buf
    }

    /// Reads until at least `n` bytes are buffered. `Ok(false)`: the client closed first.
    pub async fn fill(&mut self, n: usize) -> io::Result<bool> {
        while self.buf.len() < n {
            if self.read_more().await? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// One read (bounded by the handshake timeout) appended to the buffer; 0 at EOF.
    pub async fn read_more(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(self.timeout, self.s.read(&mut chunk))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client sent nothing"))??;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    pub fn consume(&mut self, n: usize) {
        self.buf.drain(..n.min(self.buf.len()));
    }

    pub async fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.s.write_all(b).await?;
        self.s.flush().await
    }

    /// The stream, replaying the unconsumed bytes first.
    pub fn into_prefixed(self) -> Prefixed<S> {
        Prefixed {
            prefix: self.buf,
            pos: 0,
            inner: self.s,
        }
    }
}

/// A stream that yields `prefix` before reading `inner`.
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// One connection's counters.
pub(crate) struct Stats {
    up: AtomicU64,
    down: AtomicU64,
    start: Instant,
    last_ms: AtomicU64,
    budget_hit: AtomicBool,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            budget_hit: AtomicBool::new(false),
        }
    }
    pub fn up(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }
    pub fn down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }
    fn touch(&self) {
        self.last_ms
            .store(crate::ms(self.start.elapsed()), Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let now = crate::ms(self.start.elapsed());
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
    /// The reason to give when the byte budget cut this connection.
    pub fn cut_reason(&self, max_bytes: u64) -> Option<String> {
        self.budget_hit.load(Ordering::Relaxed).then(|| {
            format!(
                "the sandbox's egress byte budget is spent (max_bytes {max_bytes}); connection cut"
            )
        })
    }
}

/// The upstream side of a connection: counts bytes into the connection's and the sandbox's
/// totals, and fails once the sandbox's total has reached `max` (0: no limit).
pub(crate) struct Metered<'a, S> {
    inner: S,
    stats: &'a Stats,
    total: &'a AtomicU64,
    max: u64,
}

impl<'a, S> Metered<'a, S> {
    pub fn new(inner: S, stats: &'a Stats, total: &'a AtomicU64, max: u64) -> Metered<'a, S> {
        Metered {
            inner,
            stats,
            total,
            max,
        }
    }

    fn over(&self) -> Option<io::Error> {
        if self.max != 0 && self.total.load(Ordering::Relaxed) >= self.max {
            self.stats.budget_hit.store(true, Ordering::Relaxed);
            return Some(io::Error::other("egress byte budget spent (max_bytes)"));
        }
        None
    }

    fn count(&self, n: usize, up: bool) {
        if n == 0 {
            return;
        }
        let n = n as u64;
        if up {
            self.stats.up.fetch_add(n, Ordering::Relaxed);
        } else {
            self.stats.down.fetch_add(n, Ordering::Relaxed);
        }
        self.total.fetch_add(n, Ordering::Relaxed);
        self.stats.touch();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.over() {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = buf.filled().len() - before;
            self.count(n, false);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.over() {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.count(n, true);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs `fut` until it ends or the connection has been idle (no byte through the meter)
/// for `idle` (zero: never). Returns the output, or the reason it was cut.
pub(crate) async fn with_idle<F: Future>(
    fut: F,
    stats: &Stats,
    idle: Duration,
) -> (Option<F::Output>, Option<String>) {
    if idle.is_zero() {
        return (Some(fut.await), None);
    }
    stats.touch();
    let watch = async {
        loop {
            let quiet = stats.idle_for();
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        r = fut => (Some(r), None),
        _ = watch => (None, Some(format!("idle for {}s (idle_timeout); connection closed", idle.as_secs_f64()))),
    }
}
