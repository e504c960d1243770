//! Terminals, for interactive clients (`moat shell`): whether an fd is a terminal, its window
//! size, raw mode that is restored on every way out, and signal flags (SIGWINCH and friends)
//! that a loop can poll.

use crate::cvt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Whether `fd` refers to a terminal.
pub fn is_tty(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: isatty only inspects the fd, which the borrow keeps open.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

/// A terminal's size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// The window size of the terminal `fd` refers to (`TIOCGWINSZ`).
pub fn window_size(fd: BorrowedFd<'_>) -> io::Result<WinSize> {
    // SAFETY: winsize is plain data; zeroed is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one `winsize` into `ws`, which is live and correctly sized;
    // the borrow keeps the fd open.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) })?;
    Ok(WinSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// Whether reading `fd` would not block within `timeout`: input is there, or its end
/// (`poll(2)` for `POLLIN`; a hang-up or error counts, as the read then returns at once).
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: poll reads and writes exactly one pollfd, which is live; the borrow keeps
        // the fd open.
        match cvt(unsafe { libc::poll(&mut p, 1, ms) }) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The terminal settings to put back: the fd and its settings from before raw mode. Kept in a
/// static too so that [`restore_terminal`] (for a panic hook or a signal-driven exit) can put
/// them back when the [`RawMode`] guard cannot run.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// A terminal in raw mode; dropping it restores the settings it found.
///
/// The terminal's fd must stay open while the guard lives (stdin of the process, typically).
#[must_use = "the terminal goes back to normal when the guard is dropped"]
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    /// Puts the terminal `fd` into raw mode (`cfmakeraw`: no echo, no line editing, no
    /// signals from ^C/^Z, no output post-processing).
    pub fn enable(fd: BorrowedFd<'_>) -> io::Result<RawMode> {
        let raw_fd = fd.as_raw_fd();
        // SAFETY: termios is plain data; zeroed is a valid value.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios into `saved`, which is live; the fd is open.
        cvt(unsafe { libc::tcgetattr(raw_fd, &mut saved) })?;
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the termios it is given, which is live.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Remember the old settings before changing anything, so a failure between here and
        // the guard still leaves a way back.
        if let Ok(mut s) = SAVED.lock() {
            *s = Some((raw_fd, saved));
        }
        // SAFETY: tcsetattr reads the termios, which is live; the fd is open.
        if let Err(e) = cvt(unsafe { libc::tcsetattr(raw_fd, libc::TCSAFLUSH, &raw) }) {
            if let Ok(mut s) = SAVED.lock() {
                *s = None;
            }
            return Err(e);
        }
        Ok(RawMode { fd: raw_fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads the saved termios, which is live; the caller keeps the fd
        // open while the guard lives. Failure leaves nothing to undo.
        unsafe { libc::tcsetattr(self.fd, libc::TCSAFLUSH, &self.saved) };
        if let Ok(mut s) = SAVED.lock() {
            *s = None;
        }
    }
}

/// Restores the terminal a live [`RawMode`] changed, if any. For paths where the guard's
/// `Drop` cannot run: a panic hook (the release build aborts on panic) or right before
/// `std::process::exit`. Harmless when nothing is in raw mode.
pub fn restore_terminal() {
    let saved = match SAVED.try_lock() {
        Ok(mut s) => s.take(),
        Err(_) => None,
    };
    if let Some((fd, termios)) = saved {
        // SAFETY: tcsetattr reads `termios`, which is live; on a closed fd it fails with
        // EBADF and changes nothing.
        unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &termios) };
    }
}

/// One flag per signal number, set by [`on_signal`].
static FLAGS: [AtomicBool; 65] = [const { AtomicBool::new(false) }; 65];

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    if let Some(flag) = usize::try_from(sig).ok().and_then(|i| FLAGS.get(i)) {
        flag.store(true, Ordering::Relaxed);
    }
}

/// Installs a handler for each of `sigs` that only raises a flag, read and cleared by
/// [`take_signal`]. `SA_RESTART` is set, so blocking reads elsewhere are not interrupted.
pub fn catch_signals(sigs: &[libc::c_int]) -> io::Result<()> {
    for &sig in sigs {
        if usize::try_from(sig).map_or(true, |i| i >= FLAGS.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("signal {sig} is out of range"),
            ));
        }
        // SAFETY: sigaction is plain data; zeroed is a valid (empty) value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: sigemptyset initialises the mask inside `sa`, which is live.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: `sa` is live and fully initialised; the handler only does an atomic store,
        // which is async-signal-safe; the old action is not needed (null).
        cvt(unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) })?;
    }
    Ok(())
}

/// Whether `sig` arrived since the last call (for a signal set up with [`catch_signals`]);
/// clears the flag.
pub fn take_signal(sig: libc::c_int) -> bool {
    usize::try_from(sig)
        .ok()
        .and_then(|i| FLAGS.get(i))
        .is_some_and(|f| f.swap(false, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_pipe_is_not_a_tty() {
        let (r, _w) = std::io::pipe().unwrap();
        assert!(!is_tty(r.as_fd()));
        assert!(window_size(r.as_fd()).is_err());
        assert!(RawMode::enable(r.as_fd()).is_err());
    }

    #[test]
    fn readable_means_data_or_its_end() {
        use std::io::Write;
        use std::time::Duration;
        let (r, mut w) = std::io::pipe().unwrap();
        assert!(!wait_readable(r.as_fd(), Duration::ZERO).unwrap());
        assert!(!wait_readable(r.as_fd(), Duration::from_millis(5)).unwrap());
        w.write_all(b"x").unwrap();
        assert!(wait_readable(r.as_fd(), Duration::ZERO).unwrap());
        let (r2, w2) = std::io::pipe().unwrap();
        drop(w2);
        assert!(wait_readable(r2.as_fd(), Duration::ZERO).unwrap());
    }

    #[test]
    fn caught_signals_raise_a_flag() {
        catch_signals(&[libc::SIGWINCH]).unwrap();
        assert!(!take_signal(libc::SIGWINCH));
        // SAFETY: raising SIGWINCH in this process runs the flag handler installed above.
        unsafe { libc::raise(libc::SIGWINCH) };
        assert!(take_signal(libc::SIGWINCH));
        assert!(!take_signal(libc::SIGWINCH));
        assert!(catch_signals(&[1000]).is_err());
    }

    #[test]
    fn a_pty_goes_raw_and_back() {
        // SAFETY: posix_openpt returns a fresh fd or -1.
        let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
        if m < 0 {
            eprintln!("SKIP: no /dev/ptmx here");
            return;
        }
        // SAFETY: `m` is the master just opened.
        unsafe {
            libc::grantpt(m);
            libc::unlockpt(m);
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: ptsname_r writes a NUL-terminated name into `name`, whose length is passed.
        let r = unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) };
        assert_eq!(r, 0);
        // SAFETY: `name` holds a NUL-terminated path.
        let s = unsafe { libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        assert!(s >= 0);
        // SAFETY: `s` is the slave just opened and owned here.
        let slave = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(s) };
        let ws = libc::winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize, which is live.
        unsafe { libc::ioctl(s, libc::TIOCSWINSZ, &ws) };
        assert!(is_tty(slave.as_fd()));
        assert_eq!(
            window_size(slave.as_fd()).unwrap(),
            WinSize {
                rows: 33,
                cols: 101
            }
        );
        let lflag = |fd: RawFd| {
            // SAFETY: termios is plain data.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: tcgetattr writes into `t`, which is live.
            unsafe { libc::tcgetattr(fd, &mut t) };
            t.c_lflag
        };
        let before = lflag(s);
        assert!(before & libc::ECHO != 0);
        {
            let _raw = RawMode::enable(slave.as_fd()).unwrap();
            assert_eq!(lflag(s) & (libc::ECHO | libc::ICANON), 0);
        }
        assert_eq!(lflag(s), before);
        let _raw = RawMode::enable(slave.as_fd()).unwrap();
        restore_terminal();
        assert_eq!(lflag(s), before);
        // SAFETY: `m` is owned here and closed once.
        unsafe { libc::close(m) };
    }
}
