//! Enrolment: a node that boots the generic image without a node
//! configuration waits for one.
//!
//! Its cloud-config has no `geminik8s.node`, only a site enrolment token:
//!
//! ```yaml
//! #cloud-config
//! geminik8s_enrolment:
//!   token_file: /oem/enrolment.token   # or token: ...
//!   listen: 0.0.0.0:7444               # the default
//!   config_dir: /var/lib/geminik8s/cloud-config   # the default: where it is written
//! ```
//!
//! The agent then serves HTTPS on `listen` with a self-signed certificate
//! kept in the state directory (so its fingerprint, printed on the console
//! and in the journal, stays the same across reboots) and accepts exactly
//! one node configuration from `gemin_k8s deploy`:
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/enrolment?nonce=N` | the node's facts, and its proof that it knows the token |
//! | `POST /v1/enrolment` | the node's cloud-config; written to `config_dir/90_geminik8s.yaml` |
//! | `POST /v1/enrolment/release` | only on a configured node (below): give its configuration up |
//!
//! The token never travels before the node has proven it knows it. The
//! `GET` carries `Authorization: Enrolment HMAC` (HMAC-SHA256 keyed by the
//! token over the operator's nonce: the node checks it, a listener learns
//! nothing); the node answers with its own proof, HMAC-SHA256 keyed by the
//! token over the nonce and the SHA-256 of the certificate the operator
//! sees, so a host in between (with a certificate of its own) cannot pass
//! the node's proof on. `deploy` then pins that certificate, and only over
//! it sends the `POST` with `Authorization: Bearer TOKEN` and the
//! configuration.
//!
//! A node configured this way keeps the endpoint (same certificate) while it
//! runs: its facts name the cluster and node it runs, and `deploy --force`
//! can ask it, with the token and the names it runs (`{"cluster", "node"}`),
//! to give them up: the agent stops as on a planned stop (a leader hands
//! over first), stops its datastore and Kubernetes, sets its configuration
//! and data aside (renamed, never deleted: [`crate::daemon::release`]) and
//! starts again waiting for enrolment. A node whose configuration is on its
//! boot media has no such endpoint: it is reinstalled instead.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The top-level cloud-config key of an unconfigured node.
pub const KEY: &str = "geminik8s_enrolment";
/// Where `deploy` finds an unconfigured node.
pub const DEFAULT_PORT: u16 = 7444;
/// The file the configuration is written to in `config_dir` (read after
/// the image's `/oem`, so it wins the merge).
pub const FILE_NAME: &str = "90_geminik8s.yaml";
/// The shortest token accepted (as for the other secrets).
const MIN_TOKEN: usize = 16;
const PROOF_CONTEXT: &[u8] = b"geminik8s enrolment v1\0";
const OPERATOR_CONTEXT: &[u8] = b"geminik8s enrolment operator v1\0";

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))
}

fn default_config_dir() -> PathBuf {
    PathBuf::from(crate::config::load::ENROLLED_DIR)
}

/// `geminik8s_enrolment:` of the cloud-config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_config_dir")]
    pub config_dir: PathBuf,
}

impl Settings {
    /// The enrolment settings of `document` (the merged cloud-config), when
    /// the node is not configured: no `geminik8s.node` in it.
    pub fn of_unconfigured(document: &Value) -> anyhow::Result<Option<Settings>> {
        if document.pointer("/geminik8s/node").is_some() {
            return Ok(None);
        }
        Settings::of_document(document)
    }

    /// The enrolment settings of `document`, configured or not.
    pub fn of_document(document: &Value) -> anyhow::Result<Option<Settings>> {
        let Some(block) = document.get(KEY) else { return Ok(None) };
        let settings: Settings =
            serde_json::from_value(block.clone()).with_context(|| format!("reading `{KEY}:` of the cloud-config"))?;
        settings.token()?;
        Ok(Some(settings))
    }

    /// The site token, from `token` or the first line of `token_file`.
    pub fn token(&self) -> anyhow::Result<String> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), None) => t.trim().to_string(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .with_context(|| format!("reading {KEY}.token_file {}", file.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string(),
            _ => bail!("`{KEY}:` needs exactly one of `token` and `token_file`"),
        };
        if token.len() < MIN_TOKEN {
            bail!("the enrolment token is shorter than {MIN_TOKEN} characters; `gemin_k8s init` makes one");
        }
        Ok(token)
    }
}

/// What an unconfigured node tells `deploy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Facts {
    pub hostname: String,
    pub agent_version: String,
    pub interfaces: Vec<Interface>,
    /// The node's wall clock, unix milliseconds (for the clock check).
    pub unix_ms: u64,
    /// SHA-256 of the node's enrolment certificate, hex.
    pub fingerprint: String,
    /// [`proof`] of the token for the caller's nonce and this certificate.
    pub proof: String,
    /// Set once a configuration was accepted: its cluster and node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled: Option<Enrolled>,
    /// The file system the datastore will live on (PostgreSQL's default
    /// data directory, or the nearest directory of it that exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskFacts>,
    /// The node runs `enrolled` (configured, its agent loop up), rather than
    /// waiting for a configuration or starting with the one it took.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub running: bool,
}

impl Facts {
    /// How the node holds `enrolled`, for messages: "runs" or "took the configuration of".
    pub fn holds(&self) -> &'static str {
        if self.running { "runs" } else { "took the configuration of" }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskFacts {
    pub path: PathBuf,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// [`DiskFacts`] of the file system holding `path` (or its nearest existing ancestor).
pub fn disk_facts(path: &Path) -> Option<DiskFacts> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let st = nix::sys::statvfs::statvfs(existing).ok()?;
    let bytes = |blocks: u64| blocks.saturating_mul(st.fragment_size());
    Some(DiskFacts {
        path: existing.to_path_buf(),
        free_bytes: bytes(st.blocks_available()),
        total_bytes: bytes(st.blocks()),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub cluster: String,
    pub node: String,
}

/// The release path's route, next to [`PATH`].
pub const RELEASE_PATH: &str = "/v1/enrolment/release";
/// The enrolment route.
pub const PATH: &str = "/v1/enrolment";

/// What a release asked of the agent loop: its answer is the role the node
/// had (the loop then stops, hands over first when it can).
pub type ReleaseRequest = tokio::sync::oneshot::Sender<Result<String, String>>;

/// What a configured node's endpoint answers to a release.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseAnswer {
    pub cluster: String,
    pub node: String,
    /// The node's state when it was asked (e.g. `Leader`, `Follower`).
    pub was: String,
}

/// The node's proof that it knows `token`: HMAC-SHA256 over the caller's
/// `nonce` and the certificate's `fingerprint`, hex.
pub fn proof(token: &str, nonce: &str, fingerprint: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    for part in [PROOF_CONTEXT, nonce.as_bytes(), b"\0", fingerprint.as_bytes()] {
        ctx.update(part);
    }
    hex::encode(ctx.sign().as_ref())
}

/// The operator's proof that it knows `token`, for `nonce`: what the
/// enrolment `GET` carries instead of the token, hex.
pub fn operator_proof(token: &str, nonce: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(OPERATOR_CONTEXT);
    ctx.update(nonce.as_bytes());
    hex::encode(ctx.sign().as_ref())
}

/// Whether `given` (hex) is [`operator_proof`] of `token` for `nonce`, in
/// constant time.
fn operator_proven(token: &str, nonce: &str, given: &str) -> bool {
    let Ok(tag) = hex::decode(given) else { return false };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    let message = [OPERATOR_CONTEXT, nonce.as_bytes()].concat();
    ring::hmac::verify(&key, &message, &tag).is_ok()
}

/// Whether `given` is `token`, in time independent of where they differ.
fn same_token(token: &str, given: &str) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"geminik8s enrolment token check");
    let tag = ring::hmac::sign(&key, token.as_bytes());
    ring::hmac::verify(&key, given.as_bytes(), tag.as_ref()).is_ok()
}

/// SHA-256 of a DER certificate, hex.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

/// The node's enrolment certificate and key (PEM), made on first use and
/// kept in `state_dir` (key 0600).
fn identity(state_dir: &Path) -> anyhow::Result<(String, String)> {
    let (cert_path, key_path) = (state_dir.join("enrolment.crt"), state_dir.join("enrolment.key"));
    if let (Ok(cert), Ok(key)) = (std::fs::read_to_string(&cert_path), std::fs::read_to_string(&key_path)) {
        return Ok((cert, key));
    }
    let host = hostname();
    let mut params = rcgen::CertificateParams::new(vec![host.clone()]).context("certificate parameters")?;
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("geminik8s enrolment {host}"));
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(crate::pki::VALIDITY_DAYS);
    let key = rcgen::KeyPair::generate().context("generating the enrolment key")?;
    let cert = params.self_signed(&key).context("signing the enrolment certificate")?;
    std::fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    crate::fsutil::write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    crate::fsutil::write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn hostname() -> String {
    crate::system::hosts::current("localhost")
}

/// This host's interfaces with their MAC and addresses (not loopback).
pub fn interfaces() -> Vec<Interface> {
    let mut out: Vec<Interface> = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return out };
    for a in addrs {
        if a.interface_name == "lo" {
            continue;
        }
        let i = match out.iter().position(|i| i.name == a.interface_name) {
            Some(i) => i,
            None => {
                out.push(Interface { name: a.interface_name.clone(), mac: None, addresses: Vec::new() });
                out.len() - 1
            }
        };
        let Some(addr) = a.address else { continue };
        if let Some(link) = addr.as_link_addr()
            && let Some(mac) = link.addr()
        {
            out[i].mac = Some(mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"));
        } else if let Some(v4) = addr.as_sockaddr_in() {
            out[i].addresses.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out[i].addresses.push(IpAddr::V6(v6.ip()));
        }
    }
    out
}

struct Served {
    token: String,
    /// The root the agent checks referenced files under (`--root`).
    root: PathBuf,
    fingerprint: String,
    config_dir: PathBuf,
    /// The accepted configuration, once there is one.
    accepted: Mutex<Option<Enrolled>>,
    done: tokio::sync::watch::Sender<Option<PathBuf>>,
    /// On a configured node: what it runs, and the agent loop to ask.
    running: Option<(Enrolled, tokio::sync::mpsc::Sender<ReleaseRequest>)>,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// The `Authorization` header's value after `scheme `.
fn credential<'a>(headers: &'a HeaderMap, scheme: &str) -> Option<&'a str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix(scheme)?.strip_prefix(' ')
}

/// Whether the call proves the token (`GET`: [`operator_proof`] for
/// `nonce`) or carries it (`POST`: `nonce` is `None`); a refusal is logged.
fn authorised(s: &Served, headers: &HeaderMap, nonce: Option<&str>) -> bool {
    let ok = match nonce {
        Some(nonce) => credential(headers, "Enrolment").is_some_and(|p| operator_proven(&s.token, nonce, p)),
        None => credential(headers, "Bearer").is_some_and(|t| same_token(&s.token, t)),
    };
    if !ok {
        tracing::warn!(event = "enrolment_refused", "a call with a wrong or missing enrolment token");
    }
    ok
}

fn unauthorised() -> Response {
    refuse(StatusCode::UNAUTHORIZED, "wrong or missing enrolment token")
}

#[derive(Deserialize)]
struct Nonce {
    nonce: String,
}

async fn facts(State(s): State<Arc<Served>>, headers: HeaderMap, Query(q): Query<Nonce>) -> Response {
    if !authorised(&s, &headers, Some(&q.nonce)) {
        return unauthorised();
    }
    let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Json(Facts {
        hostname: hostname(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        interfaces: interfaces(),
        unix_ms: unix_ms.as_millis() as u64,
        fingerprint: s.fingerprint.clone(),
        proof: proof(&s.token, &q.nonce, &s.fingerprint),
        enrolled: match &s.running {
            Some((running, _)) => Some(running.clone()),
            None => s.accepted.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        },
        running: s.running.is_some(),
        disk: disk_facts(
            &s.root.join(crate::config::Postgres::default().data_dir.strip_prefix("/").unwrap_or(Path::new(""))),
        ),
    })
    .into_response()
}

async fn enrol(State(s): State<Arc<Served>>, headers: HeaderMap, body: String) -> Response {
    if !authorised(&s, &headers, None) {
        return unauthorised();
    }
    if let Some((e, _)) = &s.running {
        return refuse(
            StatusCode::CONFLICT,
            format!(
                "this node runs node {} of cluster {}; `gemin_k8s deploy --force` releases it first",
                e.node, e.cluster
            ),
        );
    }
    let mut accepted = s.accepted.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = accepted.as_ref() {
        return refuse(
            StatusCode::CONFLICT,
            format!("this node took a configuration already: node {} of cluster {}", e.node, e.cluster),
        );
    }
    // Checked as the agent will load it, files it names included.
    let ctx = crate::config::CheckContext { root: s.root.clone(), check_files: true };
    let source = crate::config::Source { name: "the configuration sent".into(), text: body.clone() };
    let cfg = match crate::config::load_sources(&[source], &ctx) {
        Ok(loaded) => loaded.gemini,
        Err(d) => return refuse(StatusCode::UNPROCESSABLE_ENTITY, d.to_string()),
    };
    let mine: Vec<IpAddr> = interfaces().into_iter().flat_map(|i| i.addresses).collect();
    if !mine.contains(&cfg.node.ip) {
        let list: Vec<String> = mine.iter().map(IpAddr::to_string).collect();
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "this configuration is for node {} at {}, and this host has {}; send it to that address",
                cfg.node.name,
                cfg.node.ip,
                list.join(", ")
            ),
        );
    }
    let path = s.config_dir.join(FILE_NAME);
    let written = std::fs::create_dir_all(&s.config_dir)
        .with_context(|| format!("creating {}", s.config_dir.display()))
        .and_then(|()| crate::fsutil::write_atomic(&path, body.as_bytes(), 0o600));
    if let Err(e) = written {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"));
    }
    let enrolled = Enrolled { cluster: cfg.cluster.name.clone(), node: cfg.node.name.clone() };
    tracing::info!(event = "enrolled", cluster = %enrolled.cluster, node = %enrolled.node, path = %path.display(),
        "took the node configuration; starting as this node");
    *accepted = Some(enrolled.clone());
    s.done.send_replace(Some(path.clone()));
    Json(serde_json::json!({ "written": path, "cluster": enrolled.cluster, "node": enrolled.node })).into_response()
}

/// `POST /v1/enrolment/release` on a configured node: the body names what
/// the caller means to release (`{"cluster", "node"}`), so a call meant for
/// another node changes nothing here.
async fn release(State(s): State<Arc<Served>>, headers: HeaderMap, Json(asked): Json<Enrolled>) -> Response {
    if !authorised(&s, &headers, None) {
        return unauthorised();
    }
    let Some((running, agent)) = &s.running else {
        return refuse(StatusCode::CONFLICT, "this node runs no configuration: nothing to release");
    };
    if asked != *running {
        return refuse(
            StatusCode::CONFLICT,
            format!(
                "this node runs node {} of cluster {}, not node {} of cluster {}; nothing was released",
                running.node, running.cluster, asked.node, asked.cluster
            ),
        );
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    if agent.send(reply).await.is_err() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping");
    }
    match answer.await {
        Ok(Ok(was)) => {
            tracing::warn!(event = "releasing", cluster = %running.cluster, node = %running.node, was = %was,
                "releasing this node's configuration (deploy --force): its configuration and data are set aside");
            Json(ReleaseAnswer { cluster: running.cluster.clone(), node: running.node.clone(), was }).into_response()
        }
        Ok(Err(why)) => refuse(StatusCode::CONFLICT, why),
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping"),
    }
}

/// Stops the task it holds when dropped.
pub(crate) struct AbortOnDrop(pub(crate) Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// The enrolment listener: its TLS acceptor (the node's enrolment
/// certificate, kept in `state_dir`), its socket and the certificate's
/// fingerprint.
async fn listen(
    settings: &Settings,
    state_dir: &Path,
) -> anyhow::Result<(tokio_rustls::TlsAcceptor, tokio::net::TcpListener, String)> {
    crate::tls::install_crypto_provider();
    let (cert_pem, key_pem) = identity(state_dir)?;
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .context("reading the enrolment certificate")?;
    let key: rustls::pki_types::PrivateKeyDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(key_pem.as_bytes()).context("reading the enrolment key")?;
    let fingerprint = fingerprint(chain.first().context("no enrolment certificate")?.as_ref());
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the enrolment TLS configuration")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding the enrolment endpoint on {}", settings.listen))?;
    Ok((acceptor, listener, fingerprint))
}

/// Accept one connection and serve `app` on it in a task of its own.
async fn accept(listener: &tokio::net::TcpListener, acceptor: &tokio_rustls::TlsAcceptor, app: &Router) {
    let (tcp, peer) = match listener.accept().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "accepting an enrolment connection failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
    };
    let (acceptor, app) = (acceptor.clone(), app.clone());
    tokio::spawn(async move {
        let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await else {
            tracing::debug!(%peer, "enrolment TLS handshake failed");
            return;
        };
        let service = hyper_util::service::TowerToHyperService::new(app);
        let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        if let Err(e) = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await {
            tracing::debug!(%peer, error = %e, "enrolment connection ended with an error");
        }
    });
}

fn served(
    settings: &Settings,
    root: &Path,
    fingerprint: String,
    running: Option<(Enrolled, tokio::sync::mpsc::Sender<ReleaseRequest>)>,
) -> anyhow::Result<(Arc<Served>, tokio::sync::watch::Receiver<Option<PathBuf>>)> {
    let (done, finished) = tokio::sync::watch::channel(None);
    let served = Arc::new(Served {
        token: settings.token()?,
        root: root.to_path_buf(),
        fingerprint,
        config_dir: settings.config_dir.clone(),
        accepted: Mutex::new(None),
        done,
        running,
    });
    Ok((served, finished))
}

/// Serve the enrolment endpoint until one configuration is accepted;
/// returns the file it was written to. Files the configuration names are
/// looked for under `root`.
pub async fn serve(settings: &Settings, state_dir: &Path, root: &Path) -> anyhow::Result<PathBuf> {
    let (acceptor, listener, fingerprint) = listen(settings, state_dir).await?;
    let (served, mut finished) = served(settings, root, fingerprint.clone(), None)?;
    let app = Router::new().route(PATH, get(facts).post(enrol)).with_state(served);
    for i in interfaces() {
        let addresses: Vec<String> = i.addresses.iter().map(IpAddr::to_string).collect();
        tracing::warn!(event = "waiting_for_enrolment", interface = %i.name, mac = i.mac.as_deref().unwrap_or("-"),
            addresses = %addresses.join(" "), "no node configuration: waiting for `gemin_k8s deploy`");
    }
    tracing::warn!(event = "enrolment_endpoint", listen = %settings.listen, fingerprint = %format!("SHA256:{fingerprint}"),
        "enrolment endpoint up; check this certificate fingerprint against what deploy shows");
    // Under systemd the unit is started (not stuck "activating" until its
    // start timeout restarts it) and its watchdog is pinged while it waits;
    // the agent loop takes the watchdog over once it runs.
    let watchdog = crate::services::notify::announce_ready("waiting for enrolment").context("notifying systemd")?;
    let _watchdog = AbortOnDrop(watchdog);
    loop {
        tokio::select! {
            () = accept(&listener, &acceptor, &app) => {}
            changed = finished.changed() => {
                changed.context("the enrolment endpoint stopped")?;
                if let Some(path) = finished.borrow().clone() {
                    // Let the answer reach deploy before the listener goes.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return Ok(path);
                }
            }
        }
    }
}

/// On a node that runs the configuration it took at enrolment: the same
/// endpoint (same certificate), whose facts say what the node runs and
/// which takes a release (`deploy --force`), passed to `agent`. Runs
/// until the task is dropped.
pub async fn serve_running(
    settings: Settings,
    state_dir: PathBuf,
    root: PathBuf,
    running: Enrolled,
    agent: tokio::sync::mpsc::Sender<ReleaseRequest>,
) -> anyhow::Result<()> {
    let (acceptor, listener, fingerprint) = listen(&settings, &state_dir).await?;
    let (served, _finished) = served(&settings, &root, fingerprint, Some((running, agent)))?;
    let app = Router::new()
        .route(PATH, get(facts).post(enrol))
        .route(RELEASE_PATH, axum::routing::post(release))
        .with_state(served);
    loop {
        accept(&listener, &acceptor, &app).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unconfigured_node_with_a_token_enrols() {
        let doc = serde_json::json!({ KEY: { "token": "0123456789abcdef0123" }, "geminik8s": { "postgres": {} } });
        let s = Settings::of_unconfigured(&doc).unwrap().expect("no geminik8s.node: enrolment");
        assert_eq!(
            (s.listen.port(), s.config_dir.as_path()),
            (DEFAULT_PORT, Path::new("/var/lib/geminik8s/cloud-config"))
        );
        let configured = serde_json::json!({ KEY: { "token": "0123456789abcdef0123" }, "geminik8s": { "node": {} } });
        assert!(Settings::of_unconfigured(&configured).unwrap().is_none());
        assert!(Settings::of_unconfigured(&serde_json::json!({})).unwrap().is_none());
        let short = serde_json::json!({ KEY: { "token": "short" } });
        assert!(Settings::of_unconfigured(&short).unwrap_err().to_string().contains("shorter than 16"));
        let both = serde_json::json!({ KEY: { "token": "0123456789abcdef0123", "token_file": "/x" } });
        assert!(format!("{:#}", Settings::of_unconfigured(&both).unwrap_err()).contains("exactly one"));
    }

    #[test]
    fn the_disk_facts_are_of_the_nearest_directory_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        let facts = disk_facts(&dir.path().join("var/lib/postgresql/15/main")).unwrap();
        assert_eq!(facts.path, dir.path());
        assert!(facts.total_bytes > 0 && facts.free_bytes <= facts.total_bytes, "{facts:?}");
    }

    #[test]
    fn the_proof_binds_the_token_the_nonce_and_the_certificate() {
        let p = proof("token-0123456789abcdef", "n1", "ab");
        assert_eq!(p, proof("token-0123456789abcdef", "n1", "ab"));
        assert_ne!(p, proof("token-0123456789abcdeX", "n1", "ab"));
        assert_ne!(p, proof("token-0123456789abcdef", "n2", "ab"));
        assert_ne!(p, proof("token-0123456789abcdef", "n1", "ac"));
        let op = operator_proof("token-0123456789abcdef", "n1");
        assert!(operator_proven("token-0123456789abcdef", "n1", &op));
        assert!(!operator_proven("token-0123456789abcdef", "n2", &op), "bound to the nonce");
        assert!(!operator_proven("token-0123456789abcdeX", "n1", &op));
        assert!(!operator_proven("token-0123456789abcdef", "n1", "not hex"));
        assert!(!op.contains("token"), "the token is not in it");
        assert!(same_token("token-0123456789abcdef", "token-0123456789abcdef"));
        assert!(!same_token("token-0123456789abcdef", "token-0123456789abcdeg"));
    }
}
