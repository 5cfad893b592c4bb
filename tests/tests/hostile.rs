//! Hostile and careless clients at the connection level: idle connections, silent TLS
//! handshakes, one peer opening hundreds of connections, all under systemd's default
//! 1024-descriptor limit. None of it may starve other clients or touch a session.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use qod_proto::v1 as pb;
use qod_testkit::{Launch, Mode, addr, in_every_mode, raw::Raw};

/// Where qodd listens inside the lab's edge namespace.
const API: &str = "127.0.0.1:50051";
/// The attacker's own loopback address, so its connections count against a peer of their own.
const ATTACKER: &str = "127.0.0.2";
const PER_PEER: usize = 64;
const HANDSHAKE_MS: u64 = 2000;

/// Whether the server has closed `s`: a read sees EOF or a reset (not a timeout).
fn closed_by_server(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // A TLS alert or HTTP/2 GOAWAY before the close.
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// 1,100 idle connections (no ClientHello) from one peer, 40 that send half a ClientHello
/// and stall, against a qodd whose descriptor limit is 1024 (soft and hard): the peer gets its
/// 64 places and no more, the silent ones are closed after the handshake timeout, the stalled
/// TLS handshakes too; meanwhile another client creates and reads sessions, the session held
/// before is still AVAILABLE and still marked on the wire, and no descriptor ran out.
async fn idle_connections_neither_starve_the_api_nor_end_sessions(mode: Mode) {
    let api_addr: SocketAddr = API.parse().expect("addr");
    let launch = Launch {
        wrapper: ["prlimit", "--nofile=1024:1024", "--"]
            .map(str::to_owned)
            .to_vec(),
        tcp_listen: Some(api_addr),
        ..Launch::default()
    };
    let (lab, qodd) = qod_testkit::lab_launched(
        mode,
        &format!(
            "metrics_listen = \"127.0.0.1:9466\"\n[limits]\nmax_connections_per_peer = {PER_PEER}\nhandshake_timeout_ms = {HANDSHAKE_MS}\n"
        ),
        launch,
    )
    .await;
    let mut api = qodd.sessions().await.expect("client");
    let marked = qod_testkit::marked_flow(&mut api).await;

    // The crowd: every connection from the attacker's address, held open.
    let from = |port: u16| Some(SocketAddr::new(ATTACKER.parse().expect("ip"), port));
    let mut idle = Vec::new();
    for _ in 0..1100 {
        match lab.edge.tcp_connect(api_addr, from(0)) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("the kernel refused a connection ({e}): the backlog must not fill"),
        }
    }
    let opened = Instant::now();
    // Places beyond the peer's are closed at once.
    let refused = idle
        .iter_mut()
        .filter_map(|s| closed_by_server(s, Duration::from_millis(20)).then_some(()))
        .count();
    assert!(
        refused >= 1100 - PER_PEER,
        "{refused} of 1,100 connections closed at once; the peer may hold {PER_PEER}"
    );

    // Another client, during the crowd: a new connection, a create, a read.
    let mut other = match qodd.sessions().await {
        Ok(c) => c,
        Err(e) => panic!("a client must get through the crowd: {e:?}\n{}", qodd.log()),
    };
    let created = other
        .create_session(qod_testkit::api::session(
            addr::OTHER_DEVICE_V4,
            addr::SERVER_V4,
            "QOS_E",
            &[],
            &[],
            600,
        ))
        .await
        .expect("create during the crowd")
        .into_inner();
    assert_eq!(created.qos_status(), pb::QosStatus::Available);

    // The crowd's held places are closed once the handshake timeout passes.
    let wait = Duration::from_millis(HANDSHAKE_MS * 3).saturating_sub(opened.elapsed());
    let still_open = idle
        .iter_mut()
        .filter_map(|s| (!closed_by_server(s, wait.max(Duration::from_millis(50)))).then_some(()))
        .count();
    assert_eq!(
        still_open, 0,
        "silent connections outlived the handshake timeout"
    );
    drop(idle);

    // Half a ClientHello, then silence: the TLS handshake times out too.
    let mut stalled = Vec::new();
    for _ in 0..40 {
        let mut s = lab.edge.tcp_connect(api_addr, from(0)).expect("connect");
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .expect("a partial record");
        stalled.push(s);
    }
    for s in &mut stalled {
        assert!(
            closed_by_server(s, Duration::from_millis(HANDSHAKE_MS * 3)),
            "a stalled TLS handshake outlived the handshake timeout"
        );
    }

    let got = qod_testkit::session_info(&mut api, &marked.session_id).await;
    assert_eq!(got.qos_status(), pb::QosStatus::Available, "{}", qodd.log());
    assert_eq!(
        lab.uplink_dscp(addr::DEVICE_V4, 46610, addr::SERVER_V4, 5000)
            .expect("traffic"),
        [32; 5]
    );
    let log = qodd.log();
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(!log.contains("NETWORK_TERMINATED"), "{log}");
    // The refusals are counted by reason.
    let metrics = lab
        .edge
        .run(|| {
            let mut s = TcpStream::connect("127.0.0.1:9466")?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })
        .expect("scrape");
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} not served:\n{metrics}"))
    };
    assert!(
        value("qod_api_connections_refused_total{reason=\"max_connections_per_peer\"}")
            >= (1100 - PER_PEER) as f64
    );
    assert!(
        value("qod_api_connections_refused_total{reason=\"handshake_timeout\"}") >= PER_PEER as f64,
        "{metrics}"
    );
}

in_every_mode!(
    idle_connections,
    idle_connections_neither_starve_the_api_nor_end_sessions
);

/// Errors echo bounded, clean input: a 60 KB session id and a device address full of control
/// characters get INVALID_ARGUMENT with an ErrorInfo, a message of at most 512 bytes and no
/// control character, which a standard client reads (instead of failing on trailers over its
/// 16 KiB metadata limit).
#[tokio::test(flavor = "multi_thread")]
async fn error_echoes_are_capped_and_sanitised() {
    use tonic_types::StatusExt as _;
    let (_lab, qodd) = qod_testkit::lab_with_qodd("").await;
    let mut api = qodd.sessions().await.expect("client");
    let huge = "f".repeat(60_000);
    let err = api
        .get_session(pb::GetSessionRequest { session_id: huge })
        .await
        .expect_err("not a session id");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().len() <= 512, "{} bytes", err.message().len());
    assert_eq!(
        err.get_details_error_info().expect("ErrorInfo").reason,
        "INVALID_ARGUMENT"
    );
    let forged = format!("10.0.1.2\r\nlevel=ERROR{}", "\u{7}".repeat(20_000));
    let err = api
        .create_session(qod_testkit::api::session(
            &forged,
            addr::SERVER_V4,
            "QOS_E",
            &[],
            &[],
            60,
        ))
        .await
        .expect_err("not an address");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().len() <= 512, "{} bytes", err.message().len());
    assert!(
        !err.message().chars().any(char::is_control),
        "{:?}",
        err.message()
    );
}

/// Garbage for a request message, and a unary call with no message at all, are the client's
/// fault: INVALID_ARGUMENT with an ErrorInfo on every method tried, never INTERNAL, and nothing
/// is created.
#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_missing_messages_are_invalid_arguments() {
    use tonic_types::StatusExt as _;
    let (_lab, qodd) = qod_testkit::lab_with_qodd("").await;
    let mut grpc = tonic::client::Grpc::new(qodd.channel().await.expect("channel"));
    let methods = [
        "/qod.v1.QualityOnDemand/CreateSession",
        "/qod.v1.QualityOnDemand/GetSession",
        "/qod.v1.QualityOnDemand/WatchSessionEvents",
        "/qod.v1.QosProfiles/RetrieveQosProfiles",
    ];
    let check = |what: &str, method: &str, err: tonic::Status| {
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{what} to {method}: {err:?}"
        );
        assert_eq!(
            err.get_details_error_info()
                .unwrap_or_else(|| panic!("{what} to {method}: no ErrorInfo"))
                .reason,
            "INVALID_ARGUMENT"
        );
    };
    for method in methods {
        let path: tonic::codegen::http::uri::PathAndQuery = method.parse().expect("path");
        // Field 1 with wire type 7, which does not exist.
        for garbage in [vec![0x0f, 0x01], vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0xff]] {
            grpc.ready().await.expect("ready");
            let err = grpc
                .unary(tonic::Request::new(garbage), path.clone(), Raw)
                .await
                .expect_err("garbage");
            check("garbage", method, err);
        }
        grpc.ready().await.expect("ready");
        let err = grpc
            .client_streaming(
                tonic::Request::new(futures::stream::empty::<Vec<u8>>()),
                path.clone(),
                Raw,
            )
            .await
            .expect_err("no message");
        check("no message", method, err);
    }
    let mut api = qodd.sessions().await.expect("client");
    let listed = api
        .retrieve_sessions_by_device(pb::RetrieveSessionsByDeviceRequest {
            device: Some(qod_testkit::api::device(addr::DEVICE_V4)),
        })
        .await
        .expect("retrieve")
        .into_inner();
    assert!(listed.sessions.is_empty(), "nothing was created");
}
