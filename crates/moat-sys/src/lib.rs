//! Thin, checked wrappers over the Linux system calls moat needs. This is the only crate of
//! moat with `unsafe` code; every block says why it is sound. Wrappers return
//! `std::io::Result` with the errno of the failed call.

#![cfg(target_os = "linux")]

pub mod caps;
pub mod fs;
pub mod landlock;
pub mod net;
pub mod process;
pub mod seccomp;
pub mod tty;

use std::ffi::CString;
use std::io;

/// Turns a libc return value into an `io::Result`, reading errno on -1.
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub(crate) fn cvt_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A C string from a Rust string; a NUL byte inside is an `InvalidInput` error.
pub fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in string"))
}
