//! An asynchronous (tokio) NBD client.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ballast_client::nbd::NbdError> {
//! use ballast_client::nbd::NbdClient;
//! use bytes::Bytes;
//!
//! let nbd = NbdClient::connect("nbd://127.0.0.1:10809/vol1").await?;
//! nbd.write(0, Bytes::from(vec![7u8; 4096]), false).await?;
//! nbd.flush().await?;
//! let data = nbd.read(0, 4096).await?;
//! assert_eq!(&data[..], &[7u8; 4096][..]);
//! nbd.disconnect().await?;
//! # Ok(()) }
//! ```
//!
//! Negotiation is fixed newstyle: structured replies and `base:allocation`
//! are requested, then `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME`
//! when the server does not support GO). Requests are pipelined: every method
//! takes `&self`, so many tasks can share one client (or clones of it) and
//! keep many requests in flight.
//!
//! * [`proto`]: the wire format — [`ballast_proto::nbd`], the one codec
//!   shared with `ballastd`'s server, re-exported here.
//! * `handshake`: fixed newstyle negotiation ([`negotiate`]).
//! * `client`: the pipelined [`NbdClient`].
//! * `error`: [`NbdError`]; `uri`: [`NbdUri`] parsing.
//! * [`loopback`]: a small in-memory server for tests and benchmarks.

mod client;
mod error;
mod handshake;
pub mod loopback;
mod uri;

#[cfg(test)]
mod tests;

pub use ballast_proto::nbd as proto;
pub use client::{connect_tcp, Extent, NbdClient};
pub use error::{NbdErrno, NbdError, Result};
pub use handshake::{negotiate, BlockSizes, ConnectOptions, Negotiated};
pub use proto::{server_greeting, TransmissionFlags};
pub use uri::{NbdAddr, NbdUri, DEFAULT_PORT};
