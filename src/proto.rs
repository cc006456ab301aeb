//! The generated gRPC code for `prism.kv.v1`.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("prism.kv.v1");

/// The encoded file descriptor set, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("prism_kv_v1_descriptor");
