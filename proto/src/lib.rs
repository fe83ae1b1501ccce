//! Shared by `ballastd` and `ballast`: the gRPC control-plane types generated
//! from proto/ballast.proto, byte-size parsing/formatting ([`size`]), and the
//! NBD wire protocol ([`nbd`]) that `ballastd`'s server and the client's NBD
//! client both speak, so the two ends cannot drift apart, and the TCP
//! congestion control both ends choose for connections within one host
//! ([`congestion`]).
//!
//! Package `ballast.v1`: [`v1::volume_service_client`], [`v1::volume_service_server`],
//! [`v1::node_service_client`], [`v1::node_service_server`] and the messages.

/// Generated code for the `ballast.v1` package.
pub mod v1 {
    tonic::include_proto!("ballast.v1");
}

pub use v1::*;

/// Byte sizes as people type them (`10G`, `4K`) and as tables show them.
pub mod size;

pub mod nbd;

pub mod congestion;
