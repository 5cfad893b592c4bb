//! Generated gRPC code for the qod API (`qod.v1`).

/// `qod.v1`: sessions, QoS profiles and their shared types.
pub mod v1 {
    tonic::include_proto!("qod.v1");
}

/// Encoded `FileDescriptorSet` of `qod.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("qod_descriptor");
