//! Snapshot driver with containerd's semantics and its gRPC proxy server (being written).

pub mod cli;
