//! `qod.v1.QodNode`: the operator's view of this node, behind the scope `qod:admin`.

use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Instant};

use qod_common::FlowRule;
use qod_proto::v1::{self as pb, qod_node_server::QodNode};
use tonic::{Request, Response, Status};

use crate::{
    audit,
    auth::{authorize, scope},
    config::{AttachMode, Side},
    core::{Core, SessionFilter},
    error::CamaraError,
    model::{QosStatus, SessionId, ipv4_key, ipv6_key},
    notify::NotifyStats,
    store::Store,
};

/// Most sessions one ListSessions page holds.
const MAX_PAGE: usize = 1000;

pub struct NodeService {
    pub core: Arc<Core>,
    pub store: Store,
    pub notify: Arc<NotifyStats>,
    pub attach: AttachMode,
    pub state_dir: PathBuf,
    pub started: Instant,
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// The cluster part of a node's status: its own standing and the members as etcd has them.
async fn cluster_status(c: &crate::cluster::Cluster) -> pb::ClusterStatus {
    let standing = c.standing().borrow().clone();
    let (nodes, read_problem) = match c.members().await {
        Ok(m) => (m, None),
        Err(e) => (Vec::new(), Some(crate::anyhow_like(&e))),
    };
    pb::ClusterStatus {
        node_id: c.settings().node_id.clone(),
        role: c.settings().role.as_str().into(),
        lease_up: standing.lease.is_some(),
        lease_id: standing.lease.map(|l| format!("{l:x}")).unwrap_or_default(),
        problem: standing.problem.or(read_problem).unwrap_or_default(),
        nodes: nodes
            .into_iter()
            .map(|m| pb::ClusterNode {
                id: m.record.id,
                role: m.record.role.as_str().into(),
                pools: m.record.pools.iter().map(ToString::to_string).collect(),
                advertise: m.record.advertise,
                lease_ttl_seconds: m.lease_ttl,
                sessions: m.record.sessions,
                version: m.record.version,
                interfaces: m
                    .record
                    .interfaces
                    .into_iter()
                    .map(|i| pb::InterfaceStatus {
                        name: i.name,
                        capacity_bps: i.capacity_bps,
                        ..Default::default()
                    })
                    .collect(),
                started_at: m.record.started_at,
            })
            .collect(),
    }
}

impl NodeService {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Core, &Store) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let (core, store) = (self.core.clone(), self.store.clone());
        super::off_async(move || f(&core, &store)).await
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

/// A tc handle for an `skb->priority` that is one (`major:minor`), else the number.
fn priority(p: u32) -> String {
    if p >> 16 != 0 {
        format!("{:x}:{:x}", p >> 16, p & 0xffff)
    } else {
        p.to_string()
    }
}

fn ports(ranges: &[qod_common::PortRange]) -> String {
    if ranges.is_empty() {
        return "any".into();
    }
    ranges
        .iter()
        .map(|r| {
            if r.from == r.to {
                r.from.to_string()
            } else {
                format!("{}-{}", r.from, r.to)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A policer's rate in bit/s (0: none).
fn police_bps(p: &qod_common::Policer) -> u64 {
    // ns_per_byte in 48.16 fixed point: bytes/s = 1e9 * 65536 / q16.
    (8 * 1_000_000_000u128 * 65536)
        .checked_div(u128::from(p.ns_per_byte_q16))
        .map_or(0, |b| u64::try_from(b).unwrap_or(u64::MAX))
}

fn server_network(r: &FlowRule, family: u32) -> String {
    format!(
        "{}/{}",
        crate::model::words_ip(family, &r.server_addr),
        r.server_prefix_len
    )
}

#[tonic::async_trait]
impl QodNode for NodeService {
    async fn status(
        &self,
        request: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        authorize(&request, scope::ADMIN)?;
        let stats = self.core.node_stats();
        let mut by_status = std::collections::HashMap::new();
        for ((status, _), n) in &stats.sessions {
            *by_status.entry((*status).to_owned()).or_insert(0) += n;
        }
        let attach = match self.attach {
            AttachMode::Auto => "auto",
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
        };
        let interfaces = self
            .core
            .interfaces()
            .iter()
            .map(|i| pb::InterfaceStatus {
                name: i.name.clone(),
                side: match i.side {
                    Side::Device => "device",
                    Side::Server => "server",
                    Side::Both => "both",
                }
                .into(),
                capacity_bps: i.scheduler.map_or(0, |s| s.capacity_bps),
                attach: attach.into(),
                link_up: stats.links.iter().any(|(name, up)| *name == i.name && *up),
            })
            .collect();
        Ok(Response::new(pb::NodeStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: self.started.elapsed().as_secs(),
            interfaces,
            pools: stats
                .pools
                .iter()
                .map(|p| pb::PoolStatus {
                    interface: p.interface.clone(),
                    pool: p.pool.into(),
                    reserved_bps: p.reserved_bps,
                    capacity_bps: p.capacity_bps,
                })
                .collect(),
            sessions_by_status: by_status,
            slots_used: stats.slots_used,
            slots_capacity: stats.slots_capacity,
            store_bytes: std::fs::metadata(self.state_dir.join("sessions.redb"))
                .map_or(0, |m| m.len()),
            pending_notifications: self
                .notify
                .pending
                .load(std::sync::atomic::Ordering::Relaxed),
            cluster: match &self.cluster {
                Some(c) => Some(cluster_status(c).await),
                None => None,
            },
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        authorize(&request, scope::ADMIN)?;
        let r = request.into_inner();
        let status = match r.status.as_str() {
            "" => None,
            "AVAILABLE" => Some(QosStatus::Available),
            "UNAVAILABLE" => Some(QosStatus::Unavailable),
            other => {
                return Err(CamaraError::invalid(
                    "status",
                    format!("{other:?}: expected AVAILABLE or UNAVAILABLE"),
                )
                .into());
            }
        };
        let device = match r.device.as_str() {
            "" => None,
            d => Some(match d.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) => ipv4_key(a),
                Ok(IpAddr::V6(a)) => ipv6_key(a),
                Err(_) => {
                    return Err(CamaraError::invalid(
                        "device",
                        format!("{d:?} is not an IP address"),
                    )
                    .into());
                }
            }),
        };
        let after = match r.page_token.as_str() {
            "" => None,
            t => Some(t.parse::<SessionId>()?),
        };
        let limit = match r.page_size {
            0 => MAX_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let filter = SessionFilter {
            status,
            profile: (!r.profile.is_empty()).then_some(r.profile),
            client: (!r.client.is_empty()).then_some(r.client),
            device,
        };
        let page = self
            .blocking(move |core, _| Ok(core.node_sessions(&filter, after, limit + 1)))
            .await?;
        let more = page.len() > limit;
        let sessions: Vec<pb::NodeSession> = page
            .into_iter()
            .take(limit)
            .map(|(v, client)| pb::NodeSession {
                session: Some(super::convert::session_info(&v)),
                client,
            })
            .collect();
        let next_page_token = if more {
            sessions
                .last()
                .and_then(|s| s.session.as_ref())
                .map(|s| s.session_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListSessionsResponse {
            sessions,
            next_page_token,
        }))
    }

    async fn dump(
        &self,
        request: Request<pb::DumpRequest>,
    ) -> Result<Response<pb::DumpResponse>, Status> {
        authorize(&request, scope::ADMIN)?;
        let view = self
            .blocking(|core, _| {
                core.kernel_view()
                    .map_err(|e| internal("cannot read the kernel state", e))
            })
            .await?;
        let now_ns = crate::dataplane::monotonic_ns();
        let entries = view
            .entries
            .iter()
            .map(|(key, rules)| pb::KernelEntry {
                device: audit::device(key),
                rules: rules
                    .iter()
                    .map(|r| {
                        let (t, profile) = view
                            .profiles
                            .get(&r.profile)
                            .map(|(t, name)| (r.treated(t), name.clone()))
                            .unwrap_or_default();
                        pb::KernelRule {
                            session_id: view
                                .slot_owner
                                .get(&r.slot)
                                .filter(|(_, d)| d == key)
                                .map(|(id, _)| id.to_string())
                                .unwrap_or_default(),
                            slot: r.slot,
                            server_network: server_network(r, key.family),
                            device_ports: ports(&r.device_ports[..usize::from(r.n_device_ports)]),
                            server_ports: ports(&r.server_ports[..usize::from(r.n_server_ports)]),
                            dscp: u32::from(t.dscp),
                            skb_priority_up: priority(t.priority_up),
                            skb_priority_down: priority(t.priority_down),
                            band: crate::profile::Band::label(usize::from(t.band)).to_owned(),
                            police_up_bps: police_bps(&t.police_up),
                            police_down_bps: police_bps(&t.police_down),
                            expires_in_seconds: if r.expires_at_ns == 0 {
                                0
                            } else {
                                r.expires_at_ns.saturating_sub(now_ns) / 1_000_000_000
                            },
                            profile,
                        }
                    })
                    .collect(),
            })
            .collect();
        let classes = view
            .classes
            .iter()
            .map(|(interface, index)| pb::SchedulerClass {
                interface: interface.clone(),
                class_id: format!(
                    "1:{:x}",
                    crate::dataplane::scheduler::SESSION_MINOR_BASE + index
                ),
                session_id: view
                    .class_owner
                    .get(&(interface.clone(), *index))
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                parked: view.parked.contains(&(interface.clone(), *index)),
            })
            .collect();
        Ok(Response::new(pb::DumpResponse { entries, classes }))
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        authorize(&request, scope::ADMIN)?;
        let d = self
            .blocking(|core, store| {
                let stored = store
                    .load()
                    .map_err(|e| internal("cannot read the store", e))?;
                core.verify(&stored)
                    .map_err(|e| internal("cannot read the kernel state", e))
            })
            .await?;
        Ok(Response::new(pb::VerifyResponse {
            store_sessions: d.store_sessions as u64,
            memory_sessions: d.memory_sessions as u64,
            kernel_entries: d.kernel_entries as u64,
            drift: d.drift,
        }))
    }
}
