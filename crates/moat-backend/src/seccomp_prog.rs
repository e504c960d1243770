//! The default seccomp program, compiled at build time (see `build.rs`).

include!(concat!(env!("OUT_DIR"), "/seccomp_program.rs"));

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_program_matches_the_profile() {
        let fresh = moat_policy::seccomp::default_program();
        assert_eq!(fresh.len(), super::DEFAULT_PROGRAM.len());
        for (a, b) in fresh.iter().zip(super::DEFAULT_PROGRAM) {
            assert_eq!((a.code, a.jt, a.jf, a.k), (b.code, b.jt, b.jf, b.k));
        }
    }
}
