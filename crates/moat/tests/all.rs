//! moat's integration tests: one binary, modules under `suite/`.
//!
//! Every sandbox a test starts runs inside a "fence": a cgroup of the test's own with memory
//! and pids limits, plus a wall-clock kill, so a broken sandbox fails a test instead of taking
//! the machine down. A missing tool or kernel feature fails the test when `CI` is set, and is
//! skipped with a printed reason otherwise.

#![allow(clippy::unwrap_used)]

mod suite;
