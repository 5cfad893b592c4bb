//! Test kit for qod's integration tests and the demo: throwaway network namespaces, a
//! device / edge / server lab, packet capture on the wire, traffic generators, and the real
//! `qodd` binary as a child process.
//!
//! Everything created here has a unique name and is removed on drop, also when a test panics.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use qod_daemon::devkit::{DevPki, TokenSpec};
use qod_proto::client::{self, QodChannel};
use qod_proto::v1::{
    qos_profiles_client::QosProfilesClient, quality_on_demand_client::QualityOnDemandClient,
};

mod netns;
pub use netns::*;

mod lab;
pub use lab::*;

mod capture;
pub use capture::*;

mod qodd;
pub use qodd::*;

mod sink;
pub use sink::*;

mod etcd;
pub use etcd::*;

mod calls;
pub use calls::*;

/// `BPF_PROG_TEST_RUN` for tc programs, and builders for the packets it is fed.
pub mod bpf;

/// Traffic for the congestion lab: bulk TCP, a latency probe, a measured single flow.
pub mod traffic;

/// Building requests and reading answers of the qod gRPC API, for tests and the lab.
pub mod api;

/// A gRPC codec of raw bytes, to send what no generated client would.
pub mod raw;

/// An HTTPS client for the REST API, inside a namespace.
pub mod rest;

pub use traffic::{tcp_exchange, udp_send};
