//! A real HTTP(S) notification sink that records what it receives.

#[allow(unused_imports)]
use super::*;

/// What a [`SinkServer`] answers on a path.
#[derive(Clone, Debug)]
pub enum Reply {
    /// This HTTP status.
    Status(u16),
    /// Hold the request this long, then 204 (recorded on arrival).
    Hang(Duration),
    /// 200 with this JSON body (a document to serve, such as a JWKS).
    Json(String),
}

/// One request a [`SinkServer`] received.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: serde_json::Value,
    /// What it was answered.
    pub status: u16,
}

type Script = std::collections::HashMap<String, std::collections::VecDeque<Reply>>;
/// What the sink's handler shares with [`SinkServer`].
type SinkState = (
    Arc<std::sync::Mutex<Vec<Received>>>,
    Arc<std::sync::Mutex<Script>>,
);

/// A real HTTP server in a namespace, standing in for a notification sink. Each path answers
/// from its script (the last reply repeats; unscripted paths answer 204) and every request is
/// recorded.
pub struct SinkServer {
    pub port: u16,
    /// The address it listens on.
    pub host: String,
    received: Arc<std::sync::Mutex<Vec<Received>>>,
    script: Arc<std::sync::Mutex<Script>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SinkServer {
    /// Listens on 127.0.0.1 inside `ns`.
    pub fn start(ns: &Netns) -> anyhow::Result<Self> {
        Self::start_on(ns, "127.0.0.1")
    }

    /// As [`SinkServer::start`], listening on `host` in `ns` (reached from other namespaces
    /// wired to it).
    pub fn start_on(ns: &Netns, host: &str) -> anyhow::Result<Self> {
        let bind = format!("{host}:0");
        use axum::{extract::State, http::HeaderMap, http::StatusCode, http::Uri};
        let received: Arc<std::sync::Mutex<Vec<Received>>> = Arc::default();
        let script: Arc<std::sync::Mutex<Script>> = Arc::default();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let state = (received.clone(), script.clone());
        ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(bind.as_str()).await?;
                let _ = port_tx.send(listener.local_addr()?.port());
                let app = axum::Router::new().fallback(
                    |State((received, script)): State<SinkState>,
                     uri: Uri,
                     headers: HeaderMap,
                     body: String| async move {
                        let path = uri.path().to_owned();
                        let reply = {
                            let mut script = script.lock().unwrap_or_else(|p| p.into_inner());
                            match script.get_mut(&path) {
                                Some(q) if q.len() > 1 => q.pop_front(),
                                Some(q) => q.front().cloned(),
                                None => None,
                            }
                        };
                        let (status, hang, answer) = match reply {
                            Some(Reply::Status(s)) => (s, None, String::new()),
                            Some(Reply::Hang(d)) => (204, Some(d), String::new()),
                            Some(Reply::Json(b)) => (200, None, b),
                            None => (204, None, String::new()),
                        };
                        let header = |h: &str| {
                            headers
                                .get(h)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        // Recorded on arrival, so a request the sender gave up on still counts.
                        received
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(Received {
                                path,
                                content_type: header("content-type"),
                                authorization: header("authorization"),
                                body: serde_json::from_str(&body)
                                    .unwrap_or(serde_json::Value::Null),
                                status,
                            });
                        if let Some(d) = hang {
                            tokio::time::sleep(d).await;
                        }
                        (
                            StatusCode::from_u16(status)
                                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                            [(axum::http::header::CONTENT_TYPE, "application/json")],
                            answer,
                        )
                    },
                );
                axum::serve(listener, app.with_state(state))
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await?;
                anyhow::Ok(())
            })
        });
        let port = port_rx
            .recv_timeout(Duration::from_secs(10))
            .context("sink server did not start")?;
        Ok(Self {
            port,
            host: host.to_owned(),
            received,
            script,
            stop: Some(stop_tx),
        })
    }

    /// `http://<host>:<port><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.host, self.port)
    }

    /// Answers on `path` from `replies` in order, the last one repeating.
    pub fn script(&self, path: &str, replies: &[Reply]) {
        self.script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_owned(), replies.iter().cloned().collect());
    }

    /// Requests received on `path` so far.
    pub fn received(&self, path: &str) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits until `path` has received at least `n` requests; returns them.
    pub async fn wait_for(
        &self,
        path: &str,
        n: usize,
        within: Duration,
    ) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.received(path);
            if got.len() >= n {
                return Ok(got);
            }
            ensure!(
                Instant::now() < deadline,
                "{path}: {} of {n} requests within {within:?}: {got:#?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SinkServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
