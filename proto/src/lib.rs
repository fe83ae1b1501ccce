//! gRPC control-plane types generated from proto/ballast.proto.
