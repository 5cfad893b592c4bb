//! Bad input at volume against the real qodd (secured, in a namespace lab): random requests of
//! valid shape and garbage messages on every method. What must hold for all of them:
//! - no INTERNAL or UNKNOWN status;
//! - every error carries a `google.rpc.ErrorInfo`;
//! - no refusal changes state (the sessions qodd holds are exactly those the accepted calls made);
//! - qodd's RSS stays flat.
//!
//! CI runs it with a fixed seed and the sizes below. A longer run is a benchmark-style command:
//! `QOD_FUZZ_SEED=7 QOD_FUZZ_REQUESTS=200000 QOD_FUZZ_GARBAGE=20000 cargo xtask test --test fuzz`.

use std::{collections::HashSet, time::Duration};

use prost::Message as _;
use qod_proto::v1 as pb;
use qod_testkit::raw::Raw;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

const PORT: u16 = 9469;

const CONFIG: &str = concat!(
    "metrics_listen = \"127.0.0.1:9469\"\nunavailable_retention_secs = 3600\n",
    qod_testkit::lab_directory!(),
    r#"
[limits]
requests_per_second = 1000000
request_burst = 1000000
"#
);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Random values of the right type, drawn from the interesting and the arbitrary.
struct Gen(fastrand::Rng);

impl Gen {
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.0.usize(..from.len())]
    }

    fn junk(&mut self) -> String {
        let len = match self.0.u8(..10) {
            0 => self.0.usize(..5000),
            _ => self.0.usize(..24),
        };
        (0..len)
            .map(|_| match self.0.u8(..8) {
                0 => self.0.char(..),
                1 => char::from(self.0.u8(..32)),
                _ => char::from(self.0.u8(32..127)),
            })
            .collect()
    }

    fn maybe<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        self.0.bool().then(|| f(self))
    }

    fn text(&mut self, interesting: &[&str]) -> String {
        if self.0.u8(..4) == 0 {
            self.junk()
        } else {
            self.pick(interesting).to_owned()
        }
    }

    fn ipv4(&mut self) -> String {
        match self.0.u8(..3) {
            0 => format!("10.0.1.{}", self.0.u8(..)),
            _ => self.text(&[
                "10.0.1.2",
                "10.0.1.3",
                "192.0.2.7",
                "0.0.0.0",
                "127.0.0.1",
                "224.0.0.1",
                "255.255.255.255",
                "10.0.1",
                "10.0.1.256",
                "010.000.001.002",
                "::1",
                "10.0.1.2/32",
                "",
            ]),
        }
    }

    fn ipv6(&mut self) -> String {
        self.text(&[
            "fd00:1::2",
            "FD00:1:0:0:0:0:0:2",
            "fd00:11::3",
            "fd00:99::1",
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
            "fd00:1::2%eth0",
            "10.0.1.2",
            "",
        ])
    }

    fn device(&mut self) -> pb::Device {
        let mut d = pb::Device::default();
        if self.0.u8(..3) != 0 {
            d.ipv4_address = Some(pb::DeviceIpv4Addr {
                public_address: self.maybe(Gen::ipv4),
                private_address: self.maybe(Gen::ipv4),
                public_port: self.maybe(|g| g.0.u32(..70_000)),
            });
        }
        if self.0.u8(..3) == 0 {
            d.ipv6_address = Some(self.ipv6());
        }
        if self.0.u8(..4) == 0 {
            d.phone_number = Some(self.text(&[
                "+34600000001",
                "+34600000002",
                "+34600000999",
                "0034600",
                "+",
                "",
            ]));
        }
        if self.0.u8(..8) == 0 {
            d.network_access_identifier = Some(self.text(&["u@example.com", ""]));
        }
        d
    }

    fn server(&mut self) -> pb::ApplicationServer {
        let v4 = [
            "10.0.2.2",
            "10.0.2.0/24",
            "0.0.0.0/0",
            "10.0.2.0/255.255.255.0",
            "10.0.2.0/33",
            "10.0.2.0/-1",
            "fd00:2::2",
            "",
        ];
        let v6 = [
            "fd00:2::2",
            "fd00:2::/64",
            "::/0",
            "fd00:2::/129",
            "10.0.2.2",
            "",
        ];
        pb::ApplicationServer {
            ipv4_address: self.maybe(|g| g.text(&v4)),
            ipv6_address: self.maybe(|g| g.text(&v6)),
        }
    }

    fn port(&mut self) -> u32 {
        match self.0.u8(..6) {
            0 => self.0.u32(..),
            1 => 0,
            2 => 65_536,
            _ => self.0.u32(1..65_536),
        }
    }

    fn ports(&mut self) -> pb::PortsSpec {
        let n = self.0.usize(..12);
        let ranges = (0..self.0.usize(..12))
            .map(|_| pb::PortRange {
                from: self.port(),
                to: self.port(),
            })
            .collect();
        pb::PortsSpec {
            ranges,
            ports: (0..n).map(|_| self.port()).collect(),
        }
    }

    fn int(&mut self) -> i32 {
        match self.0.u8(..6) {
            0 => self.0.i32(..),
            1 => 0,
            2 => -1,
            3 => i32::MAX,
            _ => self.0.i32(1..7200),
        }
    }

    fn timestamp(&mut self) -> prost_types::Timestamp {
        let now = qod_daemon::devkit::unix_now() as i64;
        match self.0.u8(..5) {
            0 => prost_types::Timestamp {
                seconds: self.0.i64(..),
                nanos: self.0.i32(..),
            },
            1 => prost_types::Timestamp {
                seconds: now - 60,
                nanos: 0,
            },
            2 => prost_types::Timestamp {
                seconds: 253_402_300_800,
                nanos: 0,
            },
            _ => prost_types::Timestamp {
                seconds: now + 3600,
                nanos: self.0.i32(0..1_000_000_000),
            },
        }
    }

    /// A request qodd should accept (unless its device is busy), then up to two fields replaced
    /// by random ones.
    fn create(&mut self) -> pb::CreateSessionRequest {
        let ip = format!("10.0.1.{}", self.0.u8(2..250));
        let mut r = pb::CreateSessionRequest {
            device: Some(pb::Device {
                ipv4_address: Some(pb::DeviceIpv4Addr {
                    public_address: Some(ip.clone()),
                    private_address: Some(ip),
                    public_port: None,
                }),
                ..Default::default()
            }),
            application_server: Some(pb::ApplicationServer {
                ipv4_address: Some("10.0.2.2".into()),
                ipv6_address: None,
            }),
            application_server_ports: Some(pb::PortsSpec {
                ports: vec![self.0.u32(1..65_536)],
                ranges: vec![],
            }),
            qos_profile: self.pick(&["QOS_E", "QOS_L", "QOS_M", "QOS_S"]).into(),
            duration: self.0.i32(1..3600),
            ..Default::default()
        };
        let random = self.any_create();
        for _ in 0..self.0.usize(..3) {
            match self.0.u8(..8) {
                0 => r.device = random.device.clone(),
                1 => r.application_server = random.application_server.clone(),
                2 => r.device_ports = random.device_ports.clone(),
                3 => r.application_server_ports = random.application_server_ports.clone(),
                4 => r.qos_profile = random.qos_profile.clone(),
                5 => r.sink = random.sink.clone(),
                6 => r.sink_credential = random.sink_credential.clone(),
                _ => r.duration = random.duration,
            }
        }
        r
    }

    fn any_create(&mut self) -> pb::CreateSessionRequest {
        pb::CreateSessionRequest {
            device: self.maybe(Gen::device),
            application_server: (self.0.u8(..8) != 0).then(|| self.server()),
            device_ports: self.maybe(Gen::ports),
            application_server_ports: self.maybe(Gen::ports),
            qos_profile: self.text(&["QOS_E", "QOS_L", "QOS_M", "QOS_S", "QOS_X", "ab", ""]),
            sink: self.maybe(|g| {
                g.text(&[
                    "https://sink.example/cb",
                    "https://169.254.169.254/",
                    "http://sink.example/cb",
                    "https://u:p@sink.example/",
                    "https//x",
                    "",
                ])
            }),
            sink_credential: self.maybe(|g| pb::SinkCredential {
                credential_type: g.0.i32(-1..5),
                access_token: g.maybe(|g| g.text(&["token", ""])),
                access_token_expires_utc: g.maybe(Gen::timestamp),
                access_token_type: g.0.i32(-1..3),
            }),
            duration: self.int(),
        }
    }

    fn session_id(&mut self, known: &[String]) -> String {
        match self.0.u8(..4) {
            0 | 1 if !known.is_empty() => known[self.0.usize(..known.len())].clone(),
            2 => uuid::Uuid::from_u128(self.0.u128(..)).to_string(),
            _ => self.text(&["", "not-a-uuid", "00000000-0000-0000-0000-000000000000"]),
        }
    }
}

/// The refusal must be the client's fault or a stated limit, carrying a CAMARA reason.
fn check(what: &str, s: &Status) {
    assert!(
        !matches!(s.code(), Code::Internal | Code::Unknown),
        "{what}: {s:?}"
    );
    let info = s
        .get_details_error_info()
        .unwrap_or_else(|| panic!("{what}: no ErrorInfo in {s:?}"));
    assert!(!info.reason.is_empty(), "{what}: {s:?}");
    assert!(s.message().len() <= 512, "{what}: a long message");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Every session qodd holds, whatever its status, from its metrics.
fn sessions_held(lab: &qod_testkit::Lab) -> u64 {
    let (_, _, body) = qod_testkit::http_get(&lab.edge, PORT, "/metrics");
    body.lines()
        .filter(|l| l.starts_with("qod_sessions{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

qod_testkit::in_every_mode!(
    random_and_garbage_requests_never_fail_inside_nor_change_state,
    fuzz
);

/// In every mode: a scheduled qodd also plans classes and admission for what it accepts.
async fn fuzz(mode: qod_testkit::Mode) {
    let seed = env_or("QOD_FUZZ_SEED", 0x5eed_2026);
    let requests = env_or("QOD_FUZZ_REQUESTS", 10_000);
    let garbage = env_or("QOD_FUZZ_GARBAGE", 1_000);
    let (lab, qodd) = qod_testkit::lab_in(mode, CONFIG).await;
    let pid = qodd.pid().expect("pid");
    let mut g = Gen(fastrand::Rng::with_seed(seed));
    let mut api = qodd.sessions().await.expect("client");
    let mut profiles = qodd.profiles().await.expect("client");
    // The sessions the accepted calls hold.
    let mut held: HashSet<String> = HashSet::new();
    let mut known: Vec<String> = Vec::new();
    let mut accepted = 0u64;
    let mut warm_rss = 0;
    for n in 0..requests {
        if n == requests / 10 {
            warm_rss = rss_kib(pid);
        }
        let op = g.0.u8(..8);
        let what = format!("request {n} (seed {seed}, op {op})");
        let result: Result<(), Status> = match op {
            0..=2 => api.create_session(g.create()).await.map(|r| {
                let id = r.into_inner().session_id;
                held.insert(id.clone());
                known.push(id);
            }),
            3 => api
                .get_session(pb::GetSessionRequest {
                    session_id: g.session_id(&known),
                })
                .await
                .map(drop),
            4 => {
                let id = g.session_id(&known);
                api.delete_session(pb::DeleteSessionRequest {
                    session_id: id.clone(),
                })
                .await
                .map(|_| {
                    held.remove(&id);
                })
            }
            5 => api
                .extend_qos_session_duration(pb::ExtendQosSessionDurationRequest {
                    session_id: g.session_id(&known),
                    requested_additional_duration: g.int(),
                })
                .await
                .map(drop),
            6 => api
                .retrieve_sessions_by_device(pb::RetrieveSessionsByDeviceRequest {
                    device: g.maybe(Gen::device),
                })
                .await
                .map(drop),
            _ => {
                if g.0.bool() {
                    profiles
                        .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest {
                            device: g.maybe(Gen::device),
                            name: g.maybe(|g| g.text(&["QOS_E", "QOS_X", ""])),
                            status: g.0.i32(-1..5),
                        })
                        .await
                        .map(drop)
                } else {
                    profiles
                        .get_qos_profile(pb::GetQosProfileRequest {
                            name: g.text(&["QOS_E", "QOS_L", "QOS_X", ""]),
                        })
                        .await
                        .map(drop)
                }
            }
        };
        match result {
            Ok(()) => accepted += 1,
            Err(s) => check(&what, &s),
        }
        if n % 2_000 == 1_999 {
            assert_eq!(
                sessions_held(&lab),
                held.len() as u64,
                "after {what}: qodd holds other sessions than the accepted calls made"
            );
        }
    }

    // Garbage: random bytes and mutated valid messages, on every method.
    let mut grpc = tonic::client::Grpc::new(qodd.channel().await.expect("channel"));
    let methods = [
        "/qod.v1.QualityOnDemand/CreateSession",
        "/qod.v1.QualityOnDemand/GetSession",
        "/qod.v1.QualityOnDemand/DeleteSession",
        "/qod.v1.QualityOnDemand/ExtendQosSessionDuration",
        "/qod.v1.QualityOnDemand/RetrieveSessionsByDevice",
        "/qod.v1.QualityOnDemand/WatchSessionEvents",
        "/qod.v1.QosProfiles/RetrieveQosProfiles",
        "/qod.v1.QosProfiles/GetQosProfile",
    ];
    for method in methods {
        let path: tonic::codegen::http::uri::PathAndQuery = method.parse().expect("path");
        for n in 0..garbage {
            let bytes = if g.0.bool() {
                (0..g.0.usize(..300))
                    .map(|_| g.0.u8(..))
                    .collect::<Vec<u8>>()
            } else {
                let mut b = g.create().encode_to_vec();
                for _ in 0..=g.0.usize(..4) {
                    if !b.is_empty() {
                        let i = g.0.usize(..b.len());
                        b[i] = g.0.u8(..);
                    }
                }
                b
            };
            let what = format!("garbage {n} to {method} (seed {seed})");
            grpc.ready().await.expect("ready");
            if method.ends_with("WatchSessionEvents") {
                // A stream that opens is fine; only its refusal is judged.
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    grpc.server_streaming(tonic::Request::new(bytes), path.clone(), Raw),
                )
                .await
                .expect("a watch answers at once");
                if let Err(s) = r {
                    check(&what, &s);
                }
                continue;
            }
            match grpc
                .unary(tonic::Request::new(bytes), path.clone(), Raw)
                .await
            {
                Ok(reply) if method.ends_with("CreateSession") => {
                    let info = pb::SessionInfo::decode(reply.into_inner().as_slice())
                        .expect("a SessionInfo");
                    held.insert(info.session_id.clone());
                    known.push(info.session_id);
                }
                Ok(_) => {}
                Err(s) => check(&what, &s),
            }
        }
    }
    assert_eq!(
        sessions_held(&lab),
        held.len() as u64,
        "qodd holds other sessions than the accepted calls made"
    );
    for id in &held {
        qod_testkit::session_info(&mut api, id).await;
    }
    let end_rss = rss_kib(pid);
    assert!(
        end_rss < warm_rss + 64 * 1024,
        "RSS grew from {warm_rss} KiB to {end_rss} KiB"
    );
    println!(
        "{requests} requests ({accepted} accepted), {} garbage messages, {} sessions held, RSS {warm_rss} → {end_rss} KiB",
        garbage * methods.len() as u64,
        held.len()
    );
}
