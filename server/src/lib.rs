//! ballastd: NBD server and gRPC control plane.
pub mod nbd;
