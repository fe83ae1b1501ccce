//! The `ballast` client: CLI commands, typed control-plane client, NBD client,
//! host attachment (kernel nbd / FUSE), Docker volume plugin and benchmark
//! harness.
//!
//! * [`api`]: typed gRPC control-plane client.
//! * [`attach`]: `ballast attach` / `detach` — kernel nbd over generic
//!   netlink, or a FUSE file served over NBD (docs/attach.md).
//! * [`nbd`]: asynchronous pipelined NBD client. It uses the wire codec
//!   `ballast_proto::nbd`, the same one `ballastd`'s server uses
//!   (re-exported as [`nbd::proto`]).
//! * [`mountinfo`]: what is mounted where (attach and the plugin).
//! * [`cli`]: the command line; [`bench`]: load generator and suites.
//! * [`plugin`]: `ballast plugin docker`, the Docker volume plugin
//!   (docs/docker.md).
pub mod api;
pub mod attach;
pub mod bench;
pub mod cli;
pub mod mountinfo;
pub mod nbd;
pub mod plugin;
