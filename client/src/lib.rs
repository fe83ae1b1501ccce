//! The `ballast` client: CLI commands, typed control-plane client, NBD client and benchmark harness.
//!
//! The NBD client ([`nbd`]) uses the wire codec `ballast_proto::nbd`, the
//! same one `ballastd`'s server uses (re-exported as [`nbd::proto`]).
pub mod api;
pub mod bench;
pub mod cli;
pub mod nbd;
