//! NBD server: exports volumes over the Network Block Device protocol.
//!
//! * [`export`]: the [`Export`] / [`ExportCatalog`] seam to the storage engine
//!   (and its call-ordering contract).
//! * [`proto`]: the wire format — `ballast_proto::nbd`, the codec shared
//!   with the client — plus the flat constant names the server uses.
//! * `handshake`: fixed newstyle option haggling.
//! * `busy_poll`: waiting for a connection's next request without sleeping.
//! * `socket_hints`: socket options the request loop reads and sets (where
//!   the client's packets arrive, a low-water mark for large payloads).
//! * `transmission`: the pipelined request loop and reply writer.
//! * [`server`]: [`NbdServer`] (accept loop, graceful shutdown) and
//!   [`NbdConfig`].
//! * [`memory_export`]: an in-memory export for tests.

mod busy_poll;
pub mod export;
mod handshake;
pub mod memory_export;
pub mod proto;
pub mod server;
mod socket_hints;
mod transmission;

pub use export::{Export, ExportCatalog, ExportError, ExportFuture, Extent, Payload};
pub use server::{NbdConfig, NbdServer};
