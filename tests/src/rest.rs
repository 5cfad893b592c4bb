//! A real HTTPS client (reqwest) for qodd's CAMARA REST API, whose sockets live in a test's
//! namespace: it runs on a thread of its own that entered the namespace, with a runtime of its
//! own, and takes requests over a channel.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::Netns;

/// One request: method, path (appended to the base URL), headers, body.
#[derive(Clone, Debug, Default)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

/// What came back.
#[derive(Clone, Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Lower-case names; the last value of a repeated header.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// The HTTP version spoken.
    pub version: String,
}

impl HttpReply {
    /// The body as JSON (`Value::Null` when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// CAMARA `ErrorInfo.code` of an error body.
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

type Job = (HttpRequest, oneshot::Sender<anyhow::Result<HttpReply>>);

/// An HTTPS client inside a namespace.
pub struct RestClient {
    base: String,
    jobs: mpsc::Sender<Job>,
    /// Sent with every request unless the request sets its own `authorization`.
    pub token: Option<String>,
}

/// How the client connects.
#[derive(Clone, Debug, Default)]
pub struct RestTls {
    /// PEM CA the server's certificate must chain to; `None`: plain HTTP.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate and key (concatenated) to offer for mutual TLS.
    pub identity_pem: Option<Vec<u8>>,
    /// Speak HTTP/2 only (prior knowledge over TLS: ALPN h2).
    pub http2_only: bool,
}

impl RestClient {
    /// A client for `base` (e.g. `https://10.0.0.1:9443`) whose connections are made in `ns`.
    pub fn new(ns: &Netns, base: &str, tls: RestTls) -> anyhow::Result<Self> {
        let (jobs, mut rx) = mpsc::channel::<Job>(64);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let base_url = base.trim_end_matches('/').to_owned();
        let _thread = ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut builder = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .tls_built_in_root_certs(false)
                .no_proxy();
            if let Some(ca) = &tls.ca_pem {
                builder = builder.add_root_certificate(reqwest::Certificate::from_pem(ca)?);
            }
            if let Some(id) = &tls.identity_pem {
                builder = builder.identity(reqwest::Identity::from_pem(id)?);
            }
            if tls.http2_only {
                builder = builder.http2_prior_knowledge();
            }
            let client = match builder.build() {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return Ok(());
                }
            };
            let _ = ready_tx.send(Ok(()));
            rt.block_on(async move {
                while let Some((req, reply)) = rx.recv().await {
                    let client = client.clone();
                    let base = base_url.clone();
                    // A current-thread runtime: the task, and the sockets it opens, stay on
                    // this thread, in the namespace.
                    tokio::spawn(async move {
                        let _ = reply.send(send(&client, &base, req).await);
                    });
                }
            });
            Ok(())
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the REST client thread did not start")??;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            jobs,
            token: None,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends `req` (with the client's token unless it names its own `authorization`).
    pub async fn send(&self, mut req: HttpRequest) -> anyhow::Result<HttpReply> {
        if let Some(t) = &self.token
            && !req
                .headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("authorization"))
        {
            req.headers
                .push(("authorization".into(), format!("Bearer {t}")));
        }
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send((req, tx))
            .await
            .map_err(|_| anyhow::anyhow!("the REST client thread ended"))?;
        rx.await.context("the REST client dropped the request")?
    }

    /// A JSON request.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<HttpReply> {
        let mut req = HttpRequest {
            method: method.into(),
            path: path.into(),
            ..Default::default()
        };
        if let Some(b) = body {
            req.headers
                .push(("content-type".into(), "application/json".into()));
            req.body = Some(serde_json::to_vec(b)?);
        }
        self.send(req).await
    }

    /// As [`RestClient::call`] with extra headers.
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<HttpReply> {
        let mut req = HttpRequest {
            method: method.into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        };
        if let Some(b) = body {
            if !headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
            {
                req.headers
                    .push(("content-type".into(), "application/json".into()));
            }
            req.body = Some(serde_json::to_vec(b)?);
        }
        self.send(req).await
    }
}

async fn send(client: &reqwest::Client, base: &str, req: HttpRequest) -> anyhow::Result<HttpReply> {
    let method = reqwest::Method::from_bytes(req.method.as_bytes())?;
    let mut r = client.request(method, format!("{base}{}", req.path));
    for (n, v) in &req.headers {
        r = r.header(n, v);
    }
    if let Some(b) = req.body {
        r = r.body(b);
    }
    let resp = r.send().await?;
    let status = resp.status().as_u16();
    let version = format!("{:?}", resp.version());
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                v.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let body = resp.bytes().await?.to_vec();
    Ok(HttpReply {
        status,
        headers,
        body,
        version,
    })
}
