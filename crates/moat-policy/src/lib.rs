//! The sandbox policy: a TOML document with secure defaults, validated once into typed values.
//!
//! Pure logic, no I/O beyond parsing a string the caller read.

pub mod egress;
pub mod policy;
pub mod seccomp;
pub mod units;

pub use policy::{ImageRoot, Layer, Mount, Network, NetworkMode, Policy, PolicyError, Tier};
pub use units::{parse_bytes, parse_duration};
