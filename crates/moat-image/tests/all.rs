//! moat-image's integration tests: one binary (see DESIGN.md), the suites under `suite/`.

#![allow(clippy::unwrap_used)]

mod suite;
