//! `moat serve`: the daemon. HTTP API under `/v1`, the sandbox lifecycle, and the host side of
//! the agent protocol.

pub mod agent_client;
