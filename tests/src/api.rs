use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use qod_proto::v1 as pb;
use tokio_stream::StreamExt as _;
use tonic_types::StatusExt as _;

use super::{EDGE_DEV_IF, EDGE_SRV_IF};

pub fn ip(s: &str) -> std::net::IpAddr {
    s.parse()
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

pub fn sa(s: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(s), port)
}

/// A device by address: IPv6, or IPv4 without NAT (private = public).
pub fn device(addr: &str) -> pb::Device {
    if addr.contains(':') {
        pb::Device {
            ipv6_address: Some(addr.into()),
            ..Default::default()
        }
    } else {
        pb::Device {
            ipv4_address: Some(pb::DeviceIpv4Addr {
                public_address: Some(addr.into()),
                private_address: Some(addr.into()),
                public_port: None,
            }),
            ..Default::default()
        }
    }
}

/// An application server by address or network, IPv4 or IPv6.
pub fn server(addr: &str) -> pb::ApplicationServer {
    if addr.contains(':') {
        pb::ApplicationServer {
            ipv6_address: Some(addr.into()),
            ..Default::default()
        }
    } else {
        pb::ApplicationServer {
            ipv4_address: Some(addr.into()),
            ..Default::default()
        }
    }
}

fn ports(list: &[u32]) -> Option<pb::PortsSpec> {
    (!list.is_empty()).then(|| pb::PortsSpec {
        ports: list.to_vec(),
        ranges: vec![],
    })
}

/// A `CreateSession` for `device_addr` ⇄ `server_addr` with optional port lists.
pub fn session(
    device_addr: &str,
    server_addr: &str,
    profile: &str,
    device_ports: &[u32],
    server_ports: &[u32],
    duration: i32,
) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        device: Some(device(device_addr)),
        application_server: Some(server(server_addr)),
        device_ports: ports(device_ports),
        application_server_ports: ports(server_ports),
        qos_profile: profile.into(),
        duration,
        ..Default::default()
    }
}

/// The CAMARA code of an error (its `google.rpc.ErrorInfo` reason).
pub fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// Fails the test with a clear message unless it runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "these tests create network namespaces and load eBPF: run them as root (cargo xtask test)"
    );
}

/// The next status change on a watch stream (bookmarks skipped), within `within`; `None` when
/// the stream ends first.
pub async fn next_change(
    events: &mut tonic::Streaming<pb::SessionEvent>,
    within: Duration,
) -> anyhow::Result<Option<pb::SessionEvent>> {
    tokio::time::timeout(within, async {
        while let Some(ev) = events.next().await {
            let ev = ev?;
            if !matches!(ev.kind, Some(pb::session_event::Kind::Bookmark(_))) {
                return Ok(Some(ev));
            }
        }
        Ok(None)
    })
    .await
    .context("no event in time")?
}

/// The next status change to UNAVAILABLE on a watch stream, within `within`.
pub async fn next_unavailable(
    events: &mut tonic::Streaming<pb::SessionEvent>,
    within: Duration,
) -> anyhow::Result<pb::QosStatusChanged> {
    tokio::time::timeout(within, async {
        while let Some(ev) = events.next().await {
            if let Some(pb::session_event::Kind::QosStatusChanged(c)) = ev?.kind
                && c.qos_status() == pb::QosStatus::Unavailable
            {
                return Ok(c);
            }
        }
        anyhow::bail!("the watch stream ended")
    })
    .await
    .context("no UNAVAILABLE event in time")?
}

/// The lab's edge interfaces as qodd-scheduled, 100 Mbit/s each way.
pub fn scheduled_interfaces() -> [String; 2] {
    [
        format!("{{ name = \"{EDGE_DEV_IF}\", side = \"device\", capacity_mbit = 100 }}"),
        format!("{{ name = \"{EDGE_SRV_IF}\", side = \"server\", capacity_mbit = 100 }}"),
    ]
}

/// Profiles for congestion experiments: low latency (500 kbit/s cap), 20 Mbit/s guaranteed,
/// 10 Mbit/s capped best effort.
pub const CONGESTION_PROFILES: &str = r#"
[[profiles]]
name = "QOS_E"
status = "ACTIVE"
service_class = "real_time_interactive"
max_downstream_rate = { value = 500, unit = "kbps" }
max_upstream_rate = { value = 500, unit = "kbps" }

[[profiles]]
name = "QOS_G"
status = "ACTIVE"
service_class = "high_throughput_data"
target_min_downstream_rate = { value = 20, unit = "Mbps" }
max_downstream_rate = { value = 20, unit = "Mbps" }
target_min_upstream_rate = { value = 1, unit = "Mbps" }

[[profiles]]
name = "QOS_C"
status = "ACTIVE"
band = "best_effort"
max_downstream_rate = { value = 10, unit = "Mbps" }

[[profiles]]
name = "QOS_GU"
status = "ACTIVE"
service_class = "high_throughput_data"
target_min_downstream_rate = { value = 20, unit = "Mbps" }
"#;
