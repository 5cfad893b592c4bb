//! `qodctl`: the command-line client of `qodd`'s gRPC API.
//!
//! Tables for people by default; `--json` prints CAMARA-shaped JSON (camelCase fields, status
//! enums as CAMARA spells them) for scripts.

mod top;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt as _;
use qod_proto::v1::{
    self as pb, qos_profiles_client::QosProfilesClient,
    quality_on_demand_client::QualityOnDemandClient,
};
use serde_json::{Value, json};
use tonic_types::StatusExt as _;

#[derive(Parser)]
#[command(
    name = "qodctl",
    version,
    about = "Client for the qodd CAMARA Quality-on-Demand daemon"
)]
struct Cli {
    /// qodd address: host:port, http://host:port or unix:/path.
    #[arg(
        long,
        env = "QODCTL_ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    addr: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Access token (JWT) sent as `authorization: Bearer`.
    #[arg(long, env = "QODCTL_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// File holding the access token.
    #[arg(
        long,
        env = "QODCTL_TOKEN_FILE",
        global = true,
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    /// PEM CA certificate(s) that verify qodd's certificate: connect with TLS.
    #[arg(long, env = "QODCTL_CA", global = true)]
    ca: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS (with --key).
    #[arg(long, env = "QODCTL_CERT", global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "QODCTL_KEY", global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// The name qodd's certificate must carry (default: the address's host, or localhost).
    #[arg(long, global = true)]
    server_name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    fn options(&self) -> anyhow::Result<qod_proto::client::Options> {
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("read {}", p.display()));
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(String::from_utf8(read(f)?).context("token file is not text")?),
            (None, None) => None,
        };
        Ok(qod_proto::client::Options {
            token: token.map(|t| t.trim().to_owned()),
            ca_pem: self.ca.as_ref().map(read).transpose()?,
            identity: match (&self.cert, &self.key) {
                (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                _ => None,
            },
            server_name: self.server_name.clone(),
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create a QoS session.
    Create(CreateArgs),
    /// Show one session.
    Get { session_id: String },
    /// Delete a session.
    Delete { session_id: String },
    /// Extend a session by some seconds (capped at the profile's maximum).
    Extend { session_id: String, seconds: i32 },
    /// List the sessions of a device.
    List(DeviceArgs),
    /// Stream session events until interrupted. Each line starts with the event's revision;
    /// `--from REV` resumes after it (every later event the node's log still holds).
    Watch {
        /// Only this session's events.
        #[arg(long)]
        session: Option<String>,
        /// Resume after this revision (the last one seen).
        #[arg(long = "from", value_name = "REV")]
        from: Option<u64>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// List QoS profiles.
    Profiles {
        #[arg(long)]
        name: Option<String>,
        /// ACTIVE, INACTIVE or DEPRECATED.
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one QoS profile.
    Profile { name: String },
    /// Operator (scope qod:admin): version, uptime, interfaces, pools, sessions, map pressure,
    /// store size, pending notifications.
    Status,
    /// Operator (scope qod:admin): every session on the node, filtered, paged.
    Sessions {
        /// AVAILABLE or UNAVAILABLE.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        profile: Option<String>,
        /// The API client that created them.
        #[arg(long)]
        client: Option<String>,
        /// The device's IPv4 address, or an address in its IPv6 /64.
        #[arg(long)]
        device: Option<String>,
        /// Sessions per page (at most 1000).
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        /// Start after this page token (printed after a full page).
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Operator (scope qod:admin): the kernel maps and scheduler classes, named by session.
    Dump,
    /// Operator (scope qod:admin): compare store, memory and kernel; exit 1 on drift.
    Verify,
    /// Operator (scope qod:admin, and qos-profiles:read for granted rates): a live view of the
    /// AVAILABLE sessions, their rate per direction against the profile's maximum, and drops.
    Top {
        /// Seconds between reads.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// DEV ONLY: a throwaway CA, TLS certificates and a token signing key for labs and demos.
    #[command(subcommand)]
    Dev(DevCommand),
}

/// `verify` found drift (already printed): exit 1 without another message.
#[derive(Debug)]
struct DriftFound;

impl std::fmt::Display for DriftFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("drift found")
    }
}

impl std::error::Error for DriftFound {}

#[derive(Subcommand)]
enum DevCommand {
    /// Create the dev PKI in --dir unless it is there; print the qodd config that trusts it.
    Init(DevDir),
    /// Mint an access token signed with the dev key.
    Token {
        #[command(flatten)]
        dir: DevDir,
        /// The client id (`client_id` claim).
        #[arg(long, default_value = qod_daemon::devkit::DEV_CLIENT)]
        client: String,
        /// Scopes to grant (repeat); default: all of them.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Make a three-legged token for this device: tel:+E164, ipv4:ADDR or ipv6:ADDR.
        #[arg(long)]
        device: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Issue a client certificate from the dev CA (writes PREFIX.crt and PREFIX.key).
    ClientCert {
        #[command(flatten)]
        dir: DevDir,
        /// Subject CN: the client id when qodd takes it from the certificate.
        #[arg(long)]
        cn: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct DevDir {
    /// Where the dev PKI lives.
    #[arg(long = "dir", env = "QOD_DEV_DIR", default_value = "qod-dev")]
    path: PathBuf,
}

fn dev(command: DevCommand) -> anyhow::Result<()> {
    use qod_daemon::devkit::{DevPki, TokenSpec};
    match command {
        DevCommand::Init(d) => {
            let pki = DevPki::ensure(&d.path)?;
            eprintln!(
                "qodctl: DEV-ONLY PKI in {} (never use these keys in production)",
                pki.dir.display()
            );
            println!("{}", pki.config_toml());
        }
        DevCommand::Token {
            dir,
            client,
            scopes,
            device,
            ttl,
        } => {
            let pki = DevPki::ensure(&dir.path)?;
            let mut spec = TokenSpec::full(&client);
            if !scopes.is_empty() {
                spec.scopes = scopes;
            }
            spec.device = device.map(Value::from);
            spec.ttl = std::time::Duration::from_secs(ttl);
            println!("{}", pki.mint(&spec)?);
        }
        DevCommand::ClientCert { dir, cn, out } => {
            let pki = DevPki::ensure(&dir.path)?;
            let (cert, key) = pki.client_cert(&cn)?;
            let path = |ext: &str| {
                let mut p = out.clone().into_os_string();
                p.push(ext);
                PathBuf::from(p)
            };
            std::fs::write(path(".crt"), cert)?;
            std::fs::write(path(".key"), key)?;
            println!("{}", path(".crt").display());
        }
    }
    Ok(())
}

#[derive(Args, Default)]
struct DeviceArgs {
    /// Device public IPv4 address.
    #[arg(long)]
    device_ipv4: Option<String>,
    /// Device private IPv4 address (defaults to the public one: no NAT).
    #[arg(long)]
    device_private_ipv4: Option<String>,
    /// Device public port (NAT).
    #[arg(long)]
    device_public_port: Option<u32>,
    /// Device IPv6 address (any address of its prefix).
    #[arg(long)]
    device_ipv6: Option<String>,
    /// Device phone number (E.164).
    #[arg(long)]
    phone_number: Option<String>,
}

impl DeviceArgs {
    fn device(&self) -> Option<pb::Device> {
        let ipv4_address = self.device_ipv4.as_ref().map(|public| pb::DeviceIpv4Addr {
            public_address: Some(public.clone()),
            private_address: self
                .device_private_ipv4
                .clone()
                .or_else(|| self.device_public_port.is_none().then(|| public.clone())),
            public_port: self.device_public_port,
        });
        let d = pb::Device {
            phone_number: self.phone_number.clone(),
            network_access_identifier: None,
            ipv4_address,
            ipv6_address: self.device_ipv6.clone(),
        };
        (d != pb::Device::default()).then_some(d)
    }
}

#[derive(Args)]
struct CreateArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Application server IPv4 address or network.
    #[arg(long)]
    server_ipv4: Option<String>,
    /// Application server IPv6 address or network.
    #[arg(long)]
    server_ipv6: Option<String>,
    /// Device ports: a list like 5000,6000-6010.
    #[arg(long)]
    device_ports: Option<String>,
    /// Application server ports: a list like 443,8000-8100.
    #[arg(long)]
    server_ports: Option<String>,
    /// QoS profile name.
    #[arg(long, default_value = "QOS_E")]
    profile: String,
    /// Duration in seconds.
    #[arg(long, default_value_t = 3600)]
    duration: i32,
    /// Notification sink URL.
    #[arg(long)]
    sink: Option<String>,
}

fn ports(spec: &str) -> anyhow::Result<pb::PortsSpec> {
    let mut out = pb::PortsSpec::default();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => out.ranges.push(pb::PortRange {
                from: a
                    .trim()
                    .parse()
                    .with_context(|| format!("port range {part:?}"))?,
                to: b
                    .trim()
                    .parse()
                    .with_context(|| format!("port range {part:?}"))?,
            }),
            None => out
                .ports
                .push(part.parse().with_context(|| format!("port {part:?}"))?),
        }
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Plain text against qodd's default TLS fails at the transport, which says little.
    let plain = cli.ca.is_none() && !cli.addr.starts_with("https://");
    let (json, addr) = (cli.json, cli.addr.clone());
    let Err(e) = run(cli).await else {
        return std::process::ExitCode::SUCCESS;
    };
    if e.downcast_ref::<DriftFound>().is_some() {
        return std::process::ExitCode::FAILURE;
    }
    let (code, reason, message, transport) = match e.downcast_ref::<tonic::Status>() {
        Some(status) => {
            let reason = status
                .get_details_error_info()
                .map(|i| i.reason)
                .unwrap_or_default();
            let transport = reason.is_empty()
                && matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                        | tonic::Code::Internal
                );
            (
                format!("{:?}", status.code()),
                reason,
                status.message().to_owned(),
                transport,
            )
        }
        None => (String::new(), String::new(), format!("{e:#}"), true),
    };
    let in_words = plain && transport;
    let message = if in_words {
        format!(
            "cannot talk to qodd at {addr} in plain text: qodd serves TLS by default, so pass --ca (and --token or --token-file). The transport said: {message}"
        )
    } else {
        message
    };
    if json {
        // With --json, errors are JSON too (on stdout, where the answer would have been).
        println!(
            "{}",
            json!({ "error": { "code": code, "reason": reason, "message": message } })
        );
    } else if code.is_empty() || in_words {
        eprintln!("qodctl: {message}");
    } else {
        eprintln!("qodctl: {code} {reason}: {message}");
    }
    std::process::ExitCode::FAILURE
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Dev(d) = cli.command {
        return dev(d);
    }
    let channel = qod_proto::client::connect(&cli.addr, &cli.options()?)
        .await
        .map_err(|e| anyhow::anyhow!(e))
        .with_context(|| format!("cannot connect to qodd at {}", cli.addr))?;
    let mut sessions = QualityOnDemandClient::new(channel.clone());
    if let Command::Top { interval } = cli.command {
        return top::run(
            channel,
            Duration::from_secs_f64(interval.clamp(0.1, 3600.0)),
        )
        .await;
    }
    let mut node = qod_proto::v1::qod_node_client::QodNodeClient::new(channel.clone());
    let mut profiles = QosProfilesClient::new(channel);
    let json = cli.json;
    match cli.command {
        Command::Create(a) => {
            let req = pb::CreateSessionRequest {
                device: a.device.device(),
                application_server: Some(pb::ApplicationServer {
                    ipv4_address: a.server_ipv4,
                    ipv6_address: a.server_ipv6,
                }),
                device_ports: a.device_ports.as_deref().map(ports).transpose()?,
                application_server_ports: a.server_ports.as_deref().map(ports).transpose()?,
                qos_profile: a.profile,
                sink: a.sink,
                sink_credential: None,
                duration: a.duration,
            };
            let s = sessions.create_session(req).await?.into_inner();
            print_session(&s, json);
        }
        Command::Get { session_id } => {
            let s = sessions
                .get_session(pb::GetSessionRequest { session_id })
                .await?
                .into_inner();
            print_session(&s, json);
        }
        Command::Delete { session_id } => {
            sessions
                .delete_session(pb::DeleteSessionRequest {
                    session_id: session_id.clone(),
                })
                .await?;
            if json {
                println!("{}", json!({ "deleted": session_id }));
            } else {
                println!("deleted {session_id}");
            }
        }
        Command::Extend {
            session_id,
            seconds,
        } => {
            let s = sessions
                .extend_qos_session_duration(pb::ExtendQosSessionDurationRequest {
                    session_id,
                    requested_additional_duration: seconds,
                })
                .await?
                .into_inner();
            print_session(&s, json);
        }
        Command::List(d) => {
            let Some(device) = d.device() else {
                bail!("give the device: --device-ipv4, --device-ipv6 or --phone-number")
            };
            let r = sessions
                .retrieve_sessions_by_device(pb::RetrieveSessionsByDeviceRequest {
                    device: Some(device),
                })
                .await?
                .into_inner();
            print_sessions(&r.sessions, json);
        }
        Command::Watch {
            session,
            from,
            device,
        } => {
            let mut stream = sessions
                .watch_session_events(pb::WatchSessionEventsRequest {
                    session_id: session,
                    device: device.device(),
                    after_revision: from,
                })
                .await?
                .into_inner();
            while let Some(ev) = stream.next().await {
                let ev = ev?;
                let v = event_json(&ev);
                if json {
                    println!("{v}");
                    continue;
                }
                match &ev.kind {
                    Some(pb::session_event::Kind::QosStatusChanged(_)) => println!(
                        "{}  {}  {}  {}  {}",
                        ev.revision,
                        v["time"].as_str().unwrap_or("-"),
                        v["data"]["sessionId"].as_str().unwrap_or("-"),
                        v["data"]["qosStatus"].as_str().unwrap_or("-"),
                        v["data"]["statusInfo"].as_str().unwrap_or(""),
                    ),
                    Some(pb::session_event::Kind::ResyncNeeded(r)) => eprintln!(
                        "resync needed: the log no longer holds every event after the revision asked for (it keeps {} onwards); re-read the sessions, the stream goes on after {}",
                        r.oldest_revision, ev.revision
                    ),
                    // Bookmarks only move the resume point (shown with --json).
                    Some(pb::session_event::Kind::Bookmark(_)) | None => {}
                }
            }
        }
        Command::Profiles { name, status } => {
            let status = match status.as_deref() {
                None => pb::QosProfileStatus::Unspecified,
                Some(s) => pb::QosProfileStatus::from_str_name(&format!(
                    "QOS_PROFILE_STATUS_{}",
                    s.to_uppercase()
                ))
                .with_context(|| format!("unknown status {s:?}: ACTIVE, INACTIVE or DEPRECATED"))?,
            };
            let r = profiles
                .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest {
                    device: None,
                    name,
                    status: status.into(),
                })
                .await?
                .into_inner();
            print_profiles(&r.profiles, json);
        }
        Command::Profile { name } => {
            let p = profiles
                .get_qos_profile(pb::GetQosProfileRequest { name })
                .await?
                .into_inner();
            print_profiles(&[p], json);
        }
        Command::Status => {
            let s = node.status(pb::NodeStatusRequest {}).await?.into_inner();
            print_status(&s, json);
        }
        Command::Sessions {
            status,
            profile,
            client,
            device,
            page_size,
            page_token,
        } => {
            let r = node
                .list_sessions(pb::ListSessionsRequest {
                    status: status.unwrap_or_default(),
                    profile: profile.unwrap_or_default(),
                    client: client.unwrap_or_default(),
                    device: device.unwrap_or_default(),
                    page_size,
                    page_token: page_token.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                let list: Vec<Value> = r
                    .sessions
                    .iter()
                    .map(|n| {
                        let mut v = n.session.as_ref().map(session_json).unwrap_or_default();
                        v["client"] = json!(n.client);
                        v
                    })
                    .collect();
                println!(
                    "{}",
                    json!({ "sessions": list, "nextPageToken": r.next_page_token })
                );
            } else {
                let rows: Vec<Vec<String>> = r
                    .sessions
                    .iter()
                    .filter_map(|n| {
                        let s = n.session.as_ref()?;
                        let v = session_json(s);
                        Some(vec![
                            s.session_id.clone(),
                            n.client.clone(),
                            s.qos_profile.clone(),
                            v["qosStatus"].as_str().unwrap_or_default().to_owned(),
                            v["expiresAt"].as_str().unwrap_or_default().to_owned(),
                        ])
                    })
                    .collect();
                table(
                    &["SESSION", "CLIENT", "PROFILE", "STATUS", "EXPIRES/ENDED"],
                    &rows,
                );
                if !r.next_page_token.is_empty() {
                    println!("more: --page-token {}", r.next_page_token);
                }
            }
        }
        Command::Dump => {
            let d = node.dump(pb::DumpRequest {}).await?.into_inner();
            print_dump(&d, json);
        }
        Command::Verify => {
            let v = node.verify(pb::VerifyRequest {}).await?.into_inner();
            if json {
                println!(
                    "{}",
                    json!({
                        "storeSessions": v.store_sessions,
                        "memorySessions": v.memory_sessions,
                        "kernelEntries": v.kernel_entries,
                        "drift": v.drift,
                    })
                );
            } else {
                println!(
                    "store {} sessions, memory {}, kernel {} device entries",
                    v.store_sessions, v.memory_sessions, v.kernel_entries
                );
                if v.drift.is_empty() {
                    println!("no drift");
                }
                for d in &v.drift {
                    println!("DRIFT: {d}");
                }
            }
            if !v.drift.is_empty() {
                return Err(DriftFound.into());
            }
        }
        Command::Dev(_) => unreachable!("handled before connecting"),
        Command::Top { .. } => unreachable!("handled before the other clients"),
    }
    Ok(())
}

fn print_status(s: &pb::NodeStatus, json: bool) {
    let interfaces: Vec<Value> = s
        .interfaces
        .iter()
        .map(|i| {
            json!({
                "name": i.name, "side": i.side, "capacityBps": i.capacity_bps,
                "attach": i.attach, "linkUp": i.link_up,
            })
        })
        .collect();
    let pools: Vec<Value> = s
        .pools
        .iter()
        .map(|p| {
            json!({
                "interface": p.interface, "pool": p.pool,
                "reservedBps": p.reserved_bps, "capacityBps": p.capacity_bps,
            })
        })
        .collect();
    let cluster = s.cluster.as_ref().map(|c| {
        json!({
            "nodeId": c.node_id, "role": c.role, "leaseUp": c.lease_up, "leaseId": c.lease_id,
            "problem": c.problem,
            "nodes": c.nodes.iter().map(|n| json!({
                "id": n.id, "role": n.role, "pools": n.pools, "advertise": n.advertise,
                "leaseTtlSeconds": n.lease_ttl_seconds, "sessions": n.sessions,
                "version": n.version, "startedAt": n.started_at,
                "interfaces": n.interfaces.iter().map(|i| json!({
                    "name": i.name, "capacityBps": i.capacity_bps,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    });
    if json {
        println!(
            "{}",
            json!({
                "version": s.version, "uptimeSeconds": s.uptime_seconds,
                "interfaces": interfaces, "pools": pools,
                "sessionsByStatus": s.sessions_by_status,
                "slotsUsed": s.slots_used, "slotsCapacity": s.slots_capacity,
                "storeBytes": s.store_bytes, "pendingNotifications": s.pending_notifications,
                "cluster": cluster,
            })
        );
        return;
    }
    println!("qodd {} up {} s", s.version, s.uptime_seconds);
    let rows: Vec<Vec<String>> = s
        .interfaces
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.side.clone(),
                if i.capacity_bps == 0 {
                    "-".into()
                } else {
                    format!("{} Mbit/s", i.capacity_bps / 1_000_000)
                },
                i.attach.clone(),
                if i.link_up { "up" } else { "DOWN" }.into(),
            ]
        })
        .collect();
    table(&["INTERFACE", "SIDE", "CAPACITY", "ATTACH", "LINK"], &rows);
    let rows: Vec<Vec<String>> = s
        .pools
        .iter()
        .map(|p| {
            vec![
                p.interface.clone(),
                p.pool.clone(),
                format!("{} kbit/s", p.reserved_bps / 1000),
                format!(
                    "{} kbit/s",
                    p.capacity_bps.saturating_sub(p.reserved_bps) / 1000
                ),
            ]
        })
        .collect();
    if !rows.is_empty() {
        table(&["INTERFACE", "POOL", "RESERVED", "FREE"], &rows);
    }
    let mut by: Vec<_> = s.sessions_by_status.iter().collect();
    by.sort();
    let by: Vec<String> = by.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "sessions: {}; kernel slots {} of {}; store {} bytes; pending notifications {}",
        if by.is_empty() {
            "none".into()
        } else {
            by.join(", ")
        },
        s.slots_used,
        s.slots_capacity,
        s.store_bytes,
        s.pending_notifications
    );
    if let Some(c) = &s.cluster {
        println!(
            "cluster: node {} ({}), {}{}",
            c.node_id,
            c.role,
            if c.lease_up {
                format!("registered, lease {}", c.lease_id)
            } else {
                "NOT registered".into()
            },
            if c.problem.is_empty() {
                String::new()
            } else {
                format!(": {}", c.problem)
            }
        );
        let rows: Vec<Vec<String>> = c
            .nodes
            .iter()
            .map(|n| {
                vec![
                    n.id.clone(),
                    n.role.clone(),
                    n.pools.join(","),
                    n.advertise.join(","),
                    if n.lease_ttl_seconds < 0 {
                        "?".into()
                    } else {
                        format!("{} s", n.lease_ttl_seconds)
                    },
                    n.sessions.to_string(),
                    n.version.clone(),
                ]
            })
            .collect();
        table(
            &[
                "NODE", "ROLE", "POOLS", "API", "LEASE", "SESSIONS", "VERSION",
            ],
            &rows,
        );
    }
}

fn print_dump(d: &pb::DumpResponse, json: bool) {
    if json {
        let entries: Vec<Value> = d
            .entries
            .iter()
            .map(|e| {
                json!({
                    "device": e.device,
                    "rules": e.rules.iter().map(|r| json!({
                        "sessionId": r.session_id, "slot": r.slot,
                        "serverNetwork": r.server_network, "devicePorts": r.device_ports,
                        "serverPorts": r.server_ports, "profile": r.profile, "dscp": r.dscp,
                        "skbPriorityUp": r.skb_priority_up,
                        "skbPriorityDown": r.skb_priority_down, "band": r.band,
                        "policeUpBps": r.police_up_bps,
                        "policeDownBps": r.police_down_bps,
                        "expiresInSeconds": r.expires_in_seconds,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let classes: Vec<Value> = d
            .classes
            .iter()
            .map(|c| {
                json!({
                    "interface": c.interface, "classId": c.class_id, "sessionId": c.session_id,
                    "parked": c.parked,
                })
            })
            .collect();
        println!("{}", json!({ "entries": entries, "classes": classes }));
        return;
    }
    let none = |s: &str| {
        if s.is_empty() {
            "(none)".to_owned()
        } else {
            s.to_owned()
        }
    };
    let rows: Vec<Vec<String>> = d
        .entries
        .iter()
        .flat_map(|e| {
            e.rules.iter().map(move |r| {
                vec![
                    e.device.clone(),
                    none(&r.session_id),
                    r.slot.to_string(),
                    r.server_network.clone(),
                    format!("{} -> {}", r.device_ports, r.server_ports),
                    none(&r.profile),
                    r.dscp.to_string(),
                    format!("{}/{}", r.skb_priority_up, r.skb_priority_down),
                    r.band.clone(),
                    format!("{}/{}", r.police_up_bps, r.police_down_bps),
                    r.expires_in_seconds.to_string(),
                ]
            })
        })
        .collect();
    table(
        &[
            "DEVICE",
            "SESSION",
            "SLOT",
            "SERVER",
            "PORTS",
            "PROFILE",
            "DSCP",
            "PRIORITY UP/DOWN",
            "BAND",
            "POLICE UP/DOWN",
            "EXPIRES IN",
        ],
        &rows,
    );
    let rows: Vec<Vec<String>> = d
        .classes
        .iter()
        .map(|c| {
            let holder = if c.parked {
                "(parked)".to_owned()
            } else {
                none(&c.session_id)
            };
            vec![c.interface.clone(), c.class_id.clone(), holder]
        })
        .collect();
    if !rows.is_empty() {
        table(&["INTERFACE", "CLASS", "SESSION"], &rows);
    }
}

/// The CAMARA spelling of a proto enum value: its name without the type prefix.
fn camara_enum(full: &str, prefix: &str) -> Value {
    match full.strip_prefix(prefix) {
        Some("UNSPECIFIED") | None => Value::Null,
        Some(v) => json!(v),
    }
}

fn time(t: Option<&prost_types::Timestamp>) -> Value {
    t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(Value::Null, Value::from)
}

fn ports_json(p: Option<&pb::PortsSpec>) -> Value {
    p.map_or(Value::Null, |p| {
        json!({
            "ranges": p.ranges.iter().map(|r| json!({"from": r.from, "to": r.to})).collect::<Vec<_>>(),
            "ports": p.ports,
        })
    })
}

fn device_json(d: Option<&pb::Device>) -> Value {
    d.map_or(Value::Null, |d| {
        let mut m = serde_json::Map::new();
        if let Some(p) = &d.phone_number {
            m.insert("phoneNumber".into(), json!(p));
        }
        if let Some(v4) = &d.ipv4_address {
            m.insert(
                "ipv4Address".into(),
                json!({"publicAddress": v4.public_address, "privateAddress": v4.private_address, "publicPort": v4.public_port}),
            );
        }
        if let Some(v6) = &d.ipv6_address {
            m.insert("ipv6Address".into(), json!(v6));
        }
        Value::Object(m)
    })
}

fn session_json(s: &pb::SessionInfo) -> Value {
    let c = s.counters.unwrap_or_default();
    let mut v = json!({
        "sessionId": s.session_id,
        "device": device_json(s.device.as_ref()),
        "applicationServer": s.application_server.as_ref().map(|a| json!({"ipv4Address": a.ipv4_address, "ipv6Address": a.ipv6_address})),
        "devicePorts": ports_json(s.device_ports.as_ref()),
        "applicationServerPorts": ports_json(s.application_server_ports.as_ref()),
        "qosProfile": s.qos_profile,
        "sink": s.sink,
        "duration": s.duration,
        "startedAt": time(s.started_at.as_ref()),
        "expiresAt": time(s.expires_at.as_ref()),
        "qosStatus": camara_enum(s.qos_status().as_str_name(), "QOS_STATUS_"),
        "statusInfo": camara_enum(s.status_info().as_str_name(), "STATUS_INFO_"),
        "counters": {
            "uplinkPackets": c.uplink_packets, "uplinkBytes": c.uplink_bytes,
            "downlinkPackets": c.downlink_packets, "downlinkBytes": c.downlink_bytes,
            "uplinkDropped": c.uplink_dropped, "downlinkDropped": c.downlink_dropped,
            "uplink": c.uplink.as_ref().map(direction_json),
            "downlink": c.downlink.as_ref().map(direction_json),
        },
    });
    strip_nulls(&mut v);
    v
}

fn direction_json(d: &pb::DirectionReport) -> Value {
    json!({
        "matchedPackets": d.matched_packets, "matchedBytes": d.matched_bytes,
        "policerDroppedPackets": d.policer_dropped_packets,
        "policerDroppedBytes": d.policer_dropped_bytes,
        "class": d.class.as_ref().map(|c| json!({
            "deliveredPackets": c.delivered_packets, "deliveredBytes": c.delivered_bytes,
            "queueDroppedPackets": c.queue_dropped_packets,
            "backlogPackets": c.backlog_packets, "backlogBytes": c.backlog_bytes,
        })),
        "achievedBps": d.achieved_bps, "achievedIntervalMs": d.achieved_interval_ms,
        "grantedMinBps": d.granted_min_bps, "grantedMaxBps": d.granted_max_bps,
    })
}

/// A rate in bit/s for people: `19.8 Mbit/s`.
fn human_bps(bps: u64) -> String {
    match bps {
        b if b >= 1_000_000_000 => format!("{:.2} Gbit/s", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{:.2} Mbit/s", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} kbit/s", b as f64 / 1e3),
        b => format!("{b} bit/s"),
    }
}

/// Each direction's delivery against what was granted (GetSession of a live session).
fn print_delivery(c: &pb::SessionCounters) {
    let rows: Vec<Vec<String>> = [("up", c.uplink.as_ref()), ("down", c.downlink.as_ref())]
        .into_iter()
        .filter_map(|(name, d)| {
            let d = d?;
            let class = d.class.as_ref();
            let granted = match (d.granted_min_bps, d.granted_max_bps) {
                (Some(min), Some(max)) => format!("{} – {}", human_bps(min), human_bps(max)),
                (Some(min), None) => format!("≥ {}", human_bps(min)),
                (None, Some(max)) => format!("≤ {}", human_bps(max)),
                (None, None) => "best effort".to_owned(),
            };
            Some(vec![
                name.to_owned(),
                format!("{}/{}", d.matched_packets, d.matched_bytes),
                d.policer_dropped_packets.to_string(),
                class.map_or("-".into(), |c| {
                    format!("{}/{}", c.delivered_packets, c.delivered_bytes)
                }),
                class.map_or("-".into(), |c| c.queue_dropped_packets.to_string()),
                class.map_or("-".into(), |c| {
                    format!("{}/{}", c.backlog_packets, c.backlog_bytes)
                }),
                d.achieved_bps.map_or("-".into(), human_bps),
                granted,
            ])
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    println!();
    table(
        &[
            "DIRECTION",
            "MATCHED PKTS/BYTES",
            "POLICED PKTS",
            "DELIVERED PKTS/BYTES",
            "QUEUE DROPS",
            "BACKLOG PKTS/BYTES",
            "ACHIEVED",
            "GRANTED",
        ],
        &rows,
    );
}

fn strip_nulls(v: &mut Value) {
    if let Value::Object(m) = v {
        m.retain(|_, x| !x.is_null());
        m.values_mut().for_each(strip_nulls);
    }
}

fn event_json(ev: &pb::SessionEvent) -> Value {
    match &ev.kind {
        Some(pb::session_event::Kind::QosStatusChanged(c)) => json!({
            "id": ev.event_id,
            "revision": ev.revision,
            "time": time(ev.time.as_ref()),
            "observedTime": time(ev.observed_time.as_ref()),
            "type": "org.camaraproject.quality-on-demand.v1.qos-status-changed",
            "data": {
                "sessionId": c.session_id,
                "qosStatus": camara_enum(c.qos_status().as_str_name(), "QOS_STATUS_"),
                "statusInfo": camara_enum(c.status_info().as_str_name(), "STATUS_INFO_"),
            },
        }),
        Some(pb::session_event::Kind::ResyncNeeded(r)) => json!({
            "type": "resync-needed", "revision": ev.revision, "oldestRevision": r.oldest_revision,
        }),
        Some(pb::session_event::Kind::Bookmark(_)) => json!({
            "type": "bookmark", "revision": ev.revision,
        }),
        None => json!({ "id": ev.event_id }),
    }
}

/// One session: with `--json` one object (not a list).
fn print_session(s: &pb::SessionInfo, json: bool) {
    if json {
        println!("{}", session_json(s));
    } else {
        print_sessions(std::slice::from_ref(s), false);
        if let Some(c) = &s.counters {
            print_delivery(c);
        }
    }
}

fn print_sessions(list: &[pb::SessionInfo], json: bool) {
    if json {
        println!("{}", Value::Array(list.iter().map(session_json).collect()));
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            let v = session_json(s);
            let device = s.device.as_ref().map_or(String::new(), |d| {
                d.ipv4_address
                    .as_ref()
                    .and_then(|a| a.private_address.clone().or(a.public_address.clone()))
                    .or(d.ipv6_address.clone())
                    .or(d.phone_number.clone())
                    .unwrap_or_default()
            });
            let server = s.application_server.as_ref().map_or(String::new(), |a| {
                [a.ipv4_address.clone(), a.ipv6_address.clone()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(",")
            });
            let c = s.counters.unwrap_or_default();
            let text = |k: &str| v[k].as_str().unwrap_or("").to_owned();
            vec![
                s.session_id.clone(),
                device,
                server,
                s.qos_profile.clone(),
                text("qosStatus"),
                text("statusInfo"),
                s.duration.to_string(),
                text("expiresAt"),
                format!("{}/{}", c.uplink_packets, c.uplink_bytes),
                format!("{}/{}", c.downlink_packets, c.downlink_bytes),
            ]
        })
        .collect();
    table(
        &[
            "SESSION",
            "DEVICE",
            "SERVER",
            "PROFILE",
            "STATUS",
            "INFO",
            "DURATION",
            "EXPIRES/ENDED",
            "UP PKTS/BYTES",
            "DOWN PKTS/BYTES",
        ],
        &rows,
    );
}

fn rate(r: Option<&pb::Rate>) -> String {
    r.map_or_else(String::new, |r| {
        let unit = r
            .unit()
            .as_str_name()
            .strip_prefix("RATE_UNIT_")
            .unwrap_or("")
            .to_lowercase();
        let unit = unit
            .replace("mbps", "Mbps")
            .replace("gbps", "Gbps")
            .replace("tbps", "Tbps");
        format!("{} {unit}", r.value)
    })
}

fn dur(d: Option<&pb::Duration>) -> String {
    d.map_or_else(String::new, |d| {
        format!(
            "{} {}",
            d.value,
            d.unit()
                .as_str_name()
                .strip_prefix("TIME_UNIT_")
                .unwrap_or("")
                .to_lowercase()
        )
    })
}

fn print_profiles(list: &[pb::QosProfile], json: bool) {
    if json {
        let v: Vec<Value> = list
            .iter()
            .map(|p| {
                let mut v = json!({
                    "name": p.name,
                    "description": p.description,
                    "status": camara_enum(p.status().as_str_name(), "QOS_PROFILE_STATUS_"),
                    "maxUpstreamRate": rate(p.max_upstream_rate.as_ref()),
                    "maxDownstreamRate": rate(p.max_downstream_rate.as_ref()),
                    "targetMinUpstreamRate": rate(p.target_min_upstream_rate.as_ref()),
                    "targetMinDownstreamRate": rate(p.target_min_downstream_rate.as_ref()),
                    "minDuration": dur(p.min_duration.as_ref()),
                    "maxDuration": dur(p.max_duration.as_ref()),
                    "priority": p.priority,
                    "packetDelayBudget": dur(p.packet_delay_budget.as_ref()),
                    "jitter": dur(p.jitter.as_ref()),
                    "serviceClass": p.service_class,
                });
                if let Value::Object(m) = &mut v {
                    m.retain(|_, x| !(x.is_null() || x.as_str() == Some("")));
                }
                v
            })
            .collect();
        println!("{}", Value::Array(v));
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                camara_enum(p.status().as_str_name(), "QOS_PROFILE_STATUS_")
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
                p.service_class.clone(),
                p.priority.map(|x| x.to_string()).unwrap_or_default(),
                rate(p.max_downstream_rate.as_ref()),
                rate(p.max_upstream_rate.as_ref()),
                dur(p.packet_delay_budget.as_ref()),
                format!(
                    "{} .. {}",
                    dur(p.min_duration.as_ref()),
                    dur(p.max_duration.as_ref())
                ),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATUS",
            "SERVICE CLASS",
            "PRIO",
            "MAX DOWN",
            "MAX UP",
            "DELAY BUDGET",
            "DURATION",
        ],
        &rows,
    );
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}
