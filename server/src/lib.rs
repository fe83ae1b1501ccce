//! ballastd: NBD server and gRPC control plane.
//!
//! * [`nbd`]: the NBD server (handshake, transmission, the [`nbd::Export`]
//!   seam); its wire format is `ballast_proto::nbd`, shared with the client.
//! * [`engine_export`]: engine volumes as NBD exports.
//! * [`control`]: the gRPC control plane; [`engine_control`] backs it with
//!   the engine.
//! * [`daemon`]: the command line and the start-up / shutdown sequence.
//! * [`allocator`]: the process allocator and its settings.
pub mod allocator;
pub mod control;
pub mod daemon;
pub mod engine_control;
pub mod engine_export;
pub mod nbd;
