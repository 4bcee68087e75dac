//! Calls to an agent: over mutual TLS to a peer or a remote node, or over
//! the local Unix socket.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::tls::{HttpClient, TlsMaterial};
use super::{HealthReport, NodeStatus};
use crate::hostmeta::HostMeta;

/// Where an agent is reached.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// `https://IP:PORT` with mutual TLS (and the API token for operator routes).
    Https { base: String, http: HttpClient, token: Option<String> },
    /// The node-local socket.
    Unix(PathBuf),
}

#[derive(Debug, Clone)]
pub struct AgentClient {
    endpoint: Endpoint,
    timeout: Duration,
}

impl AgentClient {
    pub fn https(base: &str, tls: &TlsMaterial, token: Option<String>, timeout: Duration) -> anyhow::Result<Self> {
        let http = tls.http_client(timeout)?;
        let base = base.trim_end_matches('/').to_string();
        Ok(AgentClient { endpoint: Endpoint::Https { base, http, token }, timeout })
    }

    pub fn unix(path: &Path, timeout: Duration) -> Self {
        AgentClient { endpoint: Endpoint::Unix(path.to_path_buf()), timeout }
    }

    pub fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Https { base, .. } => base.clone(),
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
        }
    }

    async fn get_text(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.request(hyper::Method::GET, path).await
    }

    async fn request(&self, method: hyper::Method, path: &str) -> anyhow::Result<(u16, String)> {
        self.request_with(method, path, None).await
    }

    /// A request with a JSON `body`.
    async fn request_with(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(u16, String)> {
        match &self.endpoint {
            Endpoint::Https { base, http, token } => {
                let mut req = http.get().request(method, format!("{base}{path}"));
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                if let Some(body) = body {
                    req = req.header(hyper::header::CONTENT_TYPE, "application/json").body(body);
                }
                let result = async {
                    let resp = req.send().await?;
                    let status = resp.status().as_u16();
                    anyhow::Ok((status, resp.text().await?))
                }
                .await;
                http.answered(result.is_ok());
                result
            }
            Endpoint::Unix(socket) => {
                let fut = async {
                    let stream = tokio::net::UnixStream::connect(socket)
                        .await
                        .with_context(|| format!("connecting to {} (is the agent running?)", socket.display()))?;
                    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                    let driver = tokio::spawn(conn);
                    let req = hyper::Request::builder()
                        .method(method)
                        .uri(path)
                        .header("host", "localhost")
                        .header(hyper::header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
                    let resp = sender.send_request(req).await?;
                    let status = resp.status().as_u16();
                    let body = resp.into_body().collect().await?.to_bytes();
                    driver.abort();
                    anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
                };
                tokio::time::timeout(self.timeout, fut)
                    .await
                    .with_context(|| format!("{} did not answer within {:?}", socket.display(), self.timeout))?
            }
        }
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<Option<T>> {
        let (status, body) = self.get_text(path).await.with_context(|| format!("GET {path} on {}", self.describe()))?;
        match status {
            200 => serde_json::from_str(&body).map(Some).with_context(|| format!("reading the answer to {path}")),
            404 => Ok(None),
            401 | 403 => bail!("{} refused the call (HTTP {status}): {}", self.describe(), body.trim()),
            other => bail!("{} answered {path} with HTTP {other}: {}", self.describe(), body.trim()),
        }
    }

    /// The heartbeat, and how long it took.
    pub async fn health(&self) -> anyhow::Result<(HealthReport, Duration)> {
        let start = Instant::now();
        let report = self.get_json("/v1/health").await?.context("the agent has no /v1/health")?;
        Ok((report, start.elapsed()))
    }

    /// The peer's hostMeta, `None` before it has one.
    pub async fn hostmeta(&self) -> anyhow::Result<Option<HostMeta>> {
        self.get_json("/v1/hostmeta").await
    }

    /// Tell the peer to look at this node now (its next tick would be late).
    pub async fn wake(&self) -> anyhow::Result<()> {
        let (status, body) = self.request(hyper::Method::POST, "/v1/wake").await?;
        match status {
            204 => Ok(()),
            _ => bail!("{} refused the wake-up (HTTP {status}): {}", self.describe(), body.trim()),
        }
    }

    pub async fn status(&self) -> anyhow::Result<NodeStatus> {
        self.get_json("/v1/status").await?.context("the agent has no /v1/status")
    }

    /// Ask this node (the leader) to hand leadership to its peer.
    /// A refusal is a [`Refused`] error (nothing was changed).
    pub async fn switchover(&self) -> anyhow::Result<()> {
        let (status, body) = self.request(hyper::Method::POST, "/v1/switchover").await?;
        match status {
            202 => Ok(()),
            _ => Err(self.refused("the switchover", status, &body)),
        }
    }

    fn refused(&self, what: &'static str, status: u16, body: &str) -> anyhow::Error {
        Refused { what, agent: self.describe(), status, reason: body.trim().into() }.into()
    }

    /// Force this node (the follower of a leader that is gone) to take over.
    /// A refusal is a [`Refused`] error (nothing was changed).
    pub async fn force_takeover(&self) -> anyhow::Result<()> {
        let (status, body) = self.request(hyper::Method::POST, "/v1/force-takeover").await?;
        match status {
            202 => Ok(()),
            _ => Err(self.refused("the forced takeover", status, &body)),
        }
    }

    /// Ask this node to write once through the VIP; how long the commit took.
    pub async fn probe_write(&self) -> anyhow::Result<Duration> {
        let (status, body) = self.request(hyper::Method::POST, "/v1/probe-write").await?;
        if status != 200 {
            bail!("{} could not write through the VIP (HTTP {status}): {}", self.describe(), body.trim());
        }
        let v: serde_json::Value = serde_json::from_str(&body).context("reading the probe write's answer")?;
        let ms = v["commit_ms"].as_f64().context("no commit_ms in the probe write's answer")?;
        Ok(Duration::from_secs_f64(ms / 1000.0))
    }

    /// K3s's admin kubeconfig for the VIP, as the agent wrote it.
    pub async fn kubeconfig(&self) -> anyhow::Result<String> {
        let (status, body) = self
            .get_text("/v1/kubeconfig")
            .await
            .with_context(|| format!("GET /v1/kubeconfig on {}", self.describe()))?;
        match status {
            200 => Ok(body),
            other => bail!("{} has no kubeconfig (HTTP {other}): {}", self.describe(), body.trim()),
        }
    }

    /// Tell this node (the leader) that its peer is a new machine
    /// (`replace-node`). A refusal is a [`Refused`] error (nothing was changed).
    pub async fn replace_peer(&self, change: &crate::peer::PeerChange) -> anyhow::Result<crate::peer::PeerChanged> {
        let body = serde_json::to_vec(change)?;
        let (status, body) = self.request_with(hyper::Method::POST, "/v1/peer", Some(body)).await?;
        match status {
            200 => serde_json::from_str(&body).context("reading the answer to POST /v1/peer"),
            _ => Err(self.refused("the new peer", status, &body)),
        }
    }

    /// Send one file of an upgrade bundle (streamed from disk); the node's
    /// answer: its size and SHA-256 as received.
    pub async fn upgrade_send(&self, name: &str, path: &Path) -> anyhow::Result<(u64, String)> {
        let Endpoint::Https { base, http, token } = &self.endpoint else {
            bail!("an upgrade bundle is sent over the API, not the local socket");
        };
        let file = tokio::fs::File::open(path).await.with_context(|| format!("opening {}", path.display()))?;
        // Read in large pieces (a file body would go in 8 KiB reads).
        let chunks = futures_util::stream::try_unfold(file, |mut file| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 1 << 20];
            let n = file.read(&mut buf).await?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((n > 0).then_some((Bytes::from(buf), file)))
        });
        let body = reqwest::Body::wrap_stream(chunks);
        let mut req = http.get().put(format!("{base}/v1/upgrade/bundle/{name}")).body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.with_context(|| format!("sending {name} to {base}"))?;
        let status = resp.status().as_u16();
        let body = resp.text().await?;
        if status != 200 {
            return Err(self.refused("the bundle file", status, &body));
        }
        let v: serde_json::Value = serde_json::from_str(&body).context("reading the answer to the bundle file")?;
        let bytes = v["bytes"].as_u64().context("no bytes in the answer")?;
        let sha256 = v["sha256"].as_str().context("no sha256 in the answer")?.to_string();
        Ok((bytes, sha256))
    }

    /// Stage the bundle this node received. A refusal is a [`Refused`] error.
    pub async fn upgrade_stage(
        &self,
        req: &crate::upgrade::node::StageRequest,
    ) -> anyhow::Result<crate::upgrade::node::StageReport> {
        let body = serde_json::to_vec(req)?;
        let (status, body) = self.request_with(hyper::Method::POST, "/v1/upgrade/stage", Some(body)).await?;
        match status {
            200 => serde_json::from_str(&body).context("reading the answer to POST /v1/upgrade/stage"),
            _ => Err(self.refused("staging the upgrade", status, &body)),
        }
    }

    /// A full backup of this node's datastore to its `backup.destination`,
    /// now. A refusal (no destination) is a [`Refused`] error.
    pub async fn backup_now(&self) -> anyhow::Result<super::BackupTaken> {
        let (status, body) = self.request(hyper::Method::POST, "/v1/backup").await?;
        match status {
            200 => serde_json::from_str(&body).context("reading the answer to POST /v1/backup"),
            _ => Err(self.refused("the backup", status, &body)),
        }
    }

    /// Make the slot this node ran before its next boot. A refusal is a [`Refused`] error.
    pub async fn upgrade_rollback(&self) -> anyhow::Result<crate::upgrade::node::RollbackReport> {
        let (status, body) = self.request(hyper::Method::POST, "/v1/upgrade/rollback").await?;
        match status {
            200 => serde_json::from_str(&body).context("reading the answer to POST /v1/upgrade/rollback"),
            _ => Err(self.refused("the rollback", status, &body)),
        }
    }

    /// Tell this follower it is about to reboot: its leader stops counting
    /// on it. `Ok(false)` from an agent that predates the route (it is
    /// rebooted without it: commits wait until its leader gives up on it).
    pub async fn upgrade_leave(&self) -> anyhow::Result<bool> {
        let (status, body) = self.request(hyper::Method::POST, "/v1/upgrade/leave").await?;
        match status {
            202 => Ok(true),
            404 => Ok(false),
            _ => Err(self.refused("the leave", status, &body)),
        }
    }

    /// Reboot this node into its next boot entry.
    pub async fn upgrade_reboot(&self) -> anyhow::Result<()> {
        let (status, body) = self.request(hyper::Method::POST, "/v1/upgrade/reboot").await?;
        match status {
            202 => Ok(()),
            _ => Err(self.refused("the reboot", status, &body)),
        }
    }

    pub async fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = self.get_text("/metrics").await?;
        if status != 200 {
            bail!("{} answered /metrics with HTTP {status}: {}", self.describe(), body.trim());
        }
        Ok(body)
    }
}

/// An agent answered, and said no: the call changed nothing.
#[derive(Debug, thiserror::Error)]
#[error("{agent} refused {what} (HTTP {status}): {reason}")]
pub struct Refused {
    pub what: &'static str,
    pub agent: String,
    pub status: u16,
    pub reason: String,
}
