//! ballastd: NBD server and gRPC control plane.
pub mod control;
pub mod daemon;
pub mod engine_control;
pub mod engine_export;
pub mod nbd;
