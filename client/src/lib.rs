//! The `ballast` client: CLI commands, typed control-plane client, NBD client and benchmark harness.
pub mod api;
pub mod bench;
pub mod cli;
pub mod nbd;
