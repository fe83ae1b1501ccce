//! Shared by `ballastd` and `ballast`: the gRPC control-plane types generated
//! from proto/ballast.proto, and byte-size parsing/formatting ([`size`]).
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
