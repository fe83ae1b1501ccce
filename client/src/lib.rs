//! The `ballast` client: CLI commands, typed control-plane client, NBD client, benchmark harness and Docker volume plugin.
pub mod api;
pub mod bench;
pub mod cli;
pub mod nbd;
pub mod plugin;
