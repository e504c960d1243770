//! The host side of the agent protocol over tokio.
