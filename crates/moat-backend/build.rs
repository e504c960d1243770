//! Compiles the default seccomp profile to BPF once, at build time, so a sandbox start does not
//! pay for it. A unit test checks the embedded program equals a fresh compile.

use std::fmt::Write;

fn main() {
    println!("cargo:rerun-if-changed=../moat-policy/src/seccomp.rs");
    let prog = moat_policy::seccomp::default_program();
    let mut s = String::from(
        "/// The default seccomp program, compiled by build.rs from `moat_policy::seccomp`.\n\
         pub static DEFAULT_PROGRAM: &[moat_sys::seccomp::SockFilter] = &[\n",
    );
    for i in &prog {
        let _ = writeln!(
            s,
            "    moat_sys::seccomp::SockFilter {{ code: {:#06x}, jt: {}, jf: {}, k: {:#010x} }},",
            i.code, i.jt, i.jf, i.k
        );
    }
    s.push_str("];\n");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"))
        .join("seccomp_program.rs");
    std::fs::write(out, s).expect("write seccomp_program.rs");
}
