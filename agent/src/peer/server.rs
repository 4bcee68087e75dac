//! Routes and listeners of the agent API.
//!
//! | route | who | auth |
//! |---|---|---|
//! | `GET /v1/health` | the peer's heartbeat | the peer's certificate |
//! | `GET /v1/hostmeta` | the peer (arbitration, recovery) | the peer's certificate |
//! | `POST /v1/wake` | the peer: something it waits on changed, look now | the peer's certificate |
//! | `GET /v1/status` | operators | the operator's or the peer's certificate + API token |
//! | `GET /metrics` | Prometheus | the operator's or the peer's certificate + API token |
//! | `POST /v1/switchover` | operators: planned handover by the leader | the operator's or the peer's certificate + API token |
//! | `POST /v1/force-takeover` | operators: forced failover on the follower | the operator's or the peer's certificate + API token |
//! | `POST /v1/probe-write` | operators: one write through the VIP | the operator's or the peer's certificate + API token |
//! | `GET /v1/kubeconfig` | operators: K3s's admin kubeconfig for the VIP | the operator's or the peer's certificate + API token |
//! | `POST /v1/peer` | `replace-node`: the peer is a new machine (address, revocation list) | the operator's or the peer's certificate + API token |
//! | `PUT /v1/upgrade/bundle/{file}` | `upgrade`: one file of an upgrade bundle | the operator's or the peer's certificate + API token |
//! | `POST /v1/upgrade/stage` | `upgrade`: write the received bundle into the passive slot, on trial | the operator's or the peer's certificate + API token |
//! | `POST /v1/upgrade/rollback` | `upgrade --rollback`: the slot the node ran before boots next | the operator's or the peer's certificate + API token |
//! | `POST /v1/upgrade/leave` | `upgrade`: this follower is about to reboot; its leader stops counting on it | the operator's or the peer's certificate + API token |
//! | `POST /v1/upgrade/reboot` | `upgrade`: reboot the node into its next boot entry (refused on a leader) | the operator's or the peer's certificate + API token |
//! | `POST /v1/backup` | `upgrade --backup`: a full backup of this node's datastore to `backup.destination` now | the operator's or the peer's certificate + API token |
//!
//! Every TLS client must present a certificate signed by the cluster CA; its
//! name ([`Identity`]) then decides the routes. Only the peer's heartbeat
//! counts as the peer calling ([`ApiHooks::last_health_call`]), which delays
//! the follower's promotion: an operator's or the witness's certificate gets
//! 403 there. The local Unix socket (mode 0600, root) serves the same routes
//! without TLS or token: whoever can open it is root on the node; its calls
//! to `/v1/health` are answered but never count as the peer.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::identity::{Caller, Identity};
use super::{Shared, metrics};

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many TLS handshakes (clients not yet authenticated) run at once; more
/// wait in the listen backlog, so a host on the LAN cannot use up the
/// agent's file descriptors by opening connections and never finishing them.
pub const MAX_HANDSHAKES: usize = 64;

/// What the API records for the agent: refusals and when the peer last
/// called, plus where operator requests go.
#[derive(Debug, Default)]
pub struct ApiHooks {
    pub refused: AtomicU64,
    /// When the peer last called `/v1/health` with its own certificate (its
    /// heartbeat reaching us).
    pub last_health_call: Mutex<Option<Instant>>,
    /// The agent's control channel (planned switchover); `None` serves 503.
    pub control: Option<tokio::sync::mpsc::Sender<Control>>,
    /// Asks the agent loop for a tick now instead of at the next interval:
    /// the peer changed something this node waits on (its hand-over's
    /// shutdown checkpoint).
    pub wake: tokio::sync::Notify,
    /// The kubeconfig for the VIP the agent writes once K3s serves
    /// (`/v1/kubeconfig`); `None` when K3s is off on this node.
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Where the upgrade routes find the node's slots and state.
    pub upgrade: UpgradeHooks,
    /// What `POST /v1/backup` takes a backup with: set once the backup
    /// destination is set up (never without `backup.destination`).
    pub backups: std::sync::OnceLock<Arc<crate::daemon::scheduler::Taker>>,
}

/// The node's boot and upgrade files for the upgrade routes and the status.
#[derive(Debug)]
pub struct UpgradeHooks {
    pub files: crate::upgrade::NodeFiles,
    /// What `POST /v1/upgrade/reboot` runs.
    pub reboot: Vec<String>,
    /// One upgrade step at a time.
    busy: tokio::sync::Mutex<()>,
}

impl UpgradeHooks {
    pub fn new(files: crate::upgrade::NodeFiles, reboot: Vec<String>) -> Self {
        UpgradeHooks { files, reboot, busy: tokio::sync::Mutex::new(()) }
    }
}

impl Default for UpgradeHooks {
    fn default() -> Self {
        UpgradeHooks::new(crate::upgrade::NodeFiles::default(), vec!["systemctl".into(), "reboot".into()])
    }
}

impl ApiHooks {
    pub fn with_control(control: tokio::sync::mpsc::Sender<Control>) -> Self {
        ApiHooks { control: Some(control), ..Default::default() }
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn last_health_call(&self) -> Option<Instant> {
        *self.last_health_call.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Log (`event=api_refused`, with the caller's identity) and count a
    /// refused call, and answer it with `status` and `reason`.
    pub fn refuse(
        &self,
        remote: Option<SocketAddr>,
        caller: Option<&Caller>,
        path: &str,
        status: StatusCode,
        reason: &str,
    ) -> Response {
        let identity = caller.map(ToString::to_string).unwrap_or_else(|| "unknown".into());
        tracing::warn!(event = "api_refused", peer = ?remote, identity, path, reason, "refused an API call");
        self.refused.fetch_add(1, Ordering::Relaxed);
        (status, format!("{reason}\n")).into_response()
    }
}

/// Requests from operators to the agent loop.
#[derive(Debug)]
pub enum Control {
    /// Hand leadership to the peer; the answer says whether it was accepted.
    Switchover(tokio::sync::oneshot::Sender<Result<(), String>>),
    /// Take over although not entitled to (the leader is gone); the answer
    /// says whether the machine accepted it.
    ForceTakeOver(tokio::sync::oneshot::Sender<Result<(), String>>),
    /// This follower leaves on purpose (an upgrade's reboot): the leader
    /// stops counting on it; refused on a leader.
    Leave(tokio::sync::oneshot::Sender<Result<(), String>>),
    /// Write once through the VIP; the answer is how long the commit took.
    ProbeWrite(tokio::sync::oneshot::Sender<Result<Duration, String>>),
    /// The peer is a new machine (`replace-node`).
    ReplacePeer(super::PeerChange, tokio::sync::oneshot::Sender<Result<super::PeerChanged, String>>),
    /// The agent's own: a replacement's slow part is done, take the peer.
    ApplyPeer(
        Box<(super::PeerChange, super::PeerChanged)>,
        tokio::sync::oneshot::Sender<Result<super::PeerChanged, String>>,
    ),
}

/// Who may call what on a listener.
#[derive(Debug, Clone)]
pub enum Auth {
    /// The local Unix socket: every route, no token.
    Local,
    /// Mutual TLS: the peer routes for the peer's certificate only; the
    /// operator routes for the operator's or the peer's certificate with the
    /// API token.
    Tls { peer: String, token: String },
}

impl Auth {
    pub fn tls(peer: &str, token: &str) -> Auth {
        Auth::Tls { peer: peer.to_string(), token: token.to_string() }
    }
}

#[derive(Clone)]
struct AppState {
    shared: Shared,
    auth: Arc<Auth>,
    hooks: Arc<ApiHooks>,
}

/// Remote address of the connection, for logs.
#[derive(Clone, Copy, Debug)]
struct Remote(Option<SocketAddr>);

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Log and count a refused request, and answer it with `status`.
fn refuse(hooks: &ApiHooks, request: &Request, status: StatusCode, reason: &str) -> Response {
    let remote = request.extensions().get::<Remote>().and_then(|r| r.0);
    hooks.refuse(remote, request.extensions().get::<Caller>(), request.uri().path(), status, reason)
}

fn certificate(request: &Request) -> Option<&Identity> {
    match request.extensions().get::<Caller>() {
        Some(Caller::Certificate(id)) => Some(id),
        _ => None,
    }
}

/// The peer routes: the peer's own certificate (or the local socket).
async fn require_peer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Auth::Tls { peer, .. } = &*state.auth else { return next.run(request).await };
    match certificate(&request) {
        Some(id) if id.is_node(peer) => next.run(request).await,
        Some(id) => {
            let reason = format!("only the peer node `{peer}` may call this route, not the certificate `{id}`");
            refuse(&state.hooks, &request, StatusCode::FORBIDDEN, &reason)
        }
        None => refuse(&state.hooks, &request, StatusCode::FORBIDDEN, "a client certificate is required"),
    }
}

/// The operator routes: the operator's or the peer's certificate, and the API token.
async fn require_operator(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Auth::Tls { peer, token } = &*state.auth else { return next.run(request).await };
    match certificate(&request) {
        Some(id) if id.is_operator() || id.is_node(peer) => {}
        Some(id) => {
            let reason =
                format!("operator routes take the operator's or the peer's certificate, not the certificate `{id}`");
            return refuse(&state.hooks, &request, StatusCode::FORBIDDEN, &reason);
        }
        None => return refuse(&state.hooks, &request, StatusCode::FORBIDDEN, "a client certificate is required"),
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
        return next.run(request).await;
    }
    let reason = if presented.is_some() {
        "wrong API token (Authorization: Bearer <api.token>)"
    } else {
        "missing API token (Authorization: Bearer <api.token>)"
    };
    refuse(&state.hooks, &request, StatusCode::UNAUTHORIZED, reason)
}

fn read(shared: &Shared) -> std::sync::RwLockReadGuard<'_, super::Published> {
    shared.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn health(State(state): State<AppState>, caller: Option<Extension<Caller>>) -> Response {
    // Only the peer's own call is its heartbeat; the local socket's is not.
    let from_peer = match (&*state.auth, caller) {
        (Auth::Tls { peer, .. }, Some(Extension(Caller::Certificate(id)))) => id.is_node(peer),
        _ => false,
    };
    if from_peer {
        *state.hooks.last_health_call.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }
    Json(read(&state.shared).health()).into_response()
}

/// Hand a request to the agent loop and wait for its answer.
async fn ask_loop<T>(
    state: &AppState,
    request: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, String>>) -> Control,
) -> Result<T, Response> {
    let Some(control) = &state.hooks.control else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "this process does not run the agent loop\n").into_response());
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if control.send(request(tx)).await.is_err() {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "the agent loop is not running\n").into_response());
    }
    match rx.await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(why)) => Err((StatusCode::CONFLICT, format!("{why}\n")).into_response()),
        Err(_) => Err((StatusCode::SERVICE_UNAVAILABLE, "the agent loop stopped\n").into_response()),
    }
}

async fn switchover(State(state): State<AppState>) -> Response {
    match ask_loop(&state, Control::Switchover).await {
        Ok(()) => (StatusCode::ACCEPTED, "switchover started\n").into_response(),
        Err(refused) => refused,
    }
}

async fn force_takeover(State(state): State<AppState>) -> Response {
    match ask_loop(&state, Control::ForceTakeOver).await {
        Ok(()) => (StatusCode::ACCEPTED, "forced takeover started\n").into_response(),
        Err(refused) => refused,
    }
}

async fn probe_write(State(state): State<AppState>) -> Response {
    match ask_loop(&state, Control::ProbeWrite).await {
        Ok(took) => Json(serde_json::json!({ "commit_ms": took.as_secs_f64() * 1000.0 })).into_response(),
        Err(refused) => refused,
    }
}

async fn replace_peer(State(state): State<AppState>, Json(change): Json<super::PeerChange>) -> Response {
    match ask_loop(&state, |reply| Control::ReplacePeer(change, reply)).await {
        Ok(done) => Json(done).into_response(),
        Err(refused) => refused,
    }
}

/// The kubeconfig for the VIP with K3s's admin credentials, as the agent
/// wrote it: what an operator would otherwise copy off the node by hand.
/// The operator certificate already rules the cluster (switchover, forced
/// failover), and the peer holds the same credentials.
async fn kubeconfig(State(state): State<AppState>) -> Response {
    let Some(path) = &state.hooks.kubeconfig else {
        return (StatusCode::NOT_FOUND, "K3s is off on this node (geminik8s.k3s.enabled)\n").into_response();
    };
    match tokio::fs::read_to_string(path).await {
        Ok(text) => ([(header::CONTENT_TYPE, "application/yaml")], text).into_response(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("K3s has not served here yet: the agent writes {} once K3s is ready\n", path.display()),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("reading {}: {e}\n", path.display())).into_response(),
    }
}

/// The upgrade routes' guard: one step at a time.
fn upgrade_step(state: &AppState) -> Option<tokio::sync::MutexGuard<'_, ()>> {
    state.hooks.upgrade.busy.try_lock().ok()
}

fn upgrade_busy() -> Response {
    (StatusCode::CONFLICT, "another upgrade step runs on this node; try again when it is done\n").into_response()
}

fn refused_with(status: StatusCode, e: &anyhow::Error) -> Response {
    (status, format!("{e:#}\n")).into_response()
}

/// One file of an upgrade bundle, streamed to the state directory
/// (`incoming/FILE.part`, synced, then renamed); answers its size and
/// SHA-256 so the sender can compare them with the manifest at once.
async fn upgrade_receive(
    State(state): State<AppState>,
    axum::extract::Path(file): axum::extract::Path<String>,
    body: axum::body::Body,
) -> Response {
    let name = match crate::upgrade::node::bundle_file_name(&file) {
        Ok(name) => name.to_string(),
        Err(e) => return refused_with(StatusCode::BAD_REQUEST, &e),
    };
    let Some(_step) = upgrade_step(&state) else { return upgrade_busy() };
    let dir = state.hooks.upgrade.files.incoming();
    match receive(&dir, &name, body).await {
        Ok((bytes, sha256)) => {
            Json(serde_json::json!({ "file": name, "bytes": bytes, "sha256": sha256 })).into_response()
        }
        Err(e) => refused_with(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

async fn receive(dir: &Path, name: &str, body: axum::body::Body) -> anyhow::Result<(u64, String)> {
    use http_body_util::BodyExt;
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    tokio::fs::create_dir_all(dir).await.with_context(|| format!("creating {}", dir.display()))?;
    let part = dir.join(format!("{name}.part"));
    let file = tokio::fs::File::create(&part).await.with_context(|| format!("creating {}", part.display()))?;
    // Frames are small (16 KiB): write in large pieces.
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let (mut bytes, mut hasher) = (0u64, sha2::Sha256::new());
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.context("receiving the file")?;
        if let Ok(data) = frame.into_data() {
            hasher.update(&data);
            bytes += data.len() as u64;
            out.write_all(&data).await.with_context(|| format!("writing {}", part.display()))?;
        }
    }
    out.flush().await.with_context(|| format!("writing {}", part.display()))?;
    let file = out.into_inner();
    file.sync_all().await.with_context(|| format!("syncing {}", part.display()))?;
    drop(file);
    tokio::fs::rename(&part, dir.join(name)).await.with_context(|| format!("renaming {}", part.display()))?;
    Ok((bytes, hex::encode(hasher.finalize())))
}

/// Stage the received bundle; a staged bundle's files are removed (the
/// slot holds them now).
async fn upgrade_stage(State(state): State<AppState>, Json(req): Json<crate::upgrade::node::StageRequest>) -> Response {
    let Some(_step) = upgrade_step(&state) else { return upgrade_busy() };
    let files = state.hooks.upgrade.files.clone();
    let staged = tokio::task::spawn_blocking(move || {
        let dir = files.incoming();
        let report = crate::upgrade::node::stage(&files, &dir, &req, |_, _| {})?;
        if !req.dry_run {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        anyhow::Ok(report)
    })
    .await;
    match staged {
        Ok(Ok(report)) => {
            tracing::info!(event = "upgrade_staged", slot = %report.slot, version = %report.version, dry_run = report.dry_run, "upgrade staged");
            Json(report).into_response()
        }
        Ok(Err(e)) => refused_with(StatusCode::CONFLICT, &e),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("staging stopped: {e}\n")).into_response(),
    }
}

async fn upgrade_rollback(State(state): State<AppState>) -> Response {
    let Some(_step) = upgrade_step(&state) else { return upgrade_busy() };
    let files = state.hooks.upgrade.files.clone();
    match tokio::task::spawn_blocking(move || crate::upgrade::node::rollback(&files)).await {
        Ok(Ok(report)) => {
            tracing::info!(event = "upgrade_rollback", slot = %report.slot, version = %report.version, "the slot run before boots next");
            Json(report).into_response()
        }
        Ok(Err(e)) => refused_with(StatusCode::CONFLICT, &e),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("the rollback stopped: {e}\n")).into_response(),
    }
}

async fn upgrade_leave(State(state): State<AppState>) -> Response {
    match ask_loop(&state, Control::Leave).await {
        Ok(()) => (StatusCode::ACCEPTED, "leaving: the leader stops counting on this node\n").into_response(),
        Err(refused) => refused,
    }
}

/// Reboot for an upgrade; never the leader (it hands over first: a reboot
/// of the leader would stop writes for the whole boot).
async fn upgrade_reboot(State(state): State<AppState>) -> Response {
    let Some(_step) = upgrade_step(&state) else { return upgrade_busy() };
    if read(&state.shared).status.role == "leader" {
        return (StatusCode::CONFLICT, "this node leads: switch over to its peer before it reboots\n").into_response();
    }
    let Some((program, args)) = state.hooks.upgrade.reboot.split_first() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "this agent has no reboot command\n").into_response();
    };
    tracing::warn!(event = "upgrade_reboot", "rebooting for an upgrade");
    match crate::cmd::Tool::new(program).args(args).run().await {
        Ok(_) => (StatusCode::ACCEPTED, "rebooting\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("rebooting: {e}\n")).into_response(),
    }
}

/// A full backup now, to the node's `backup.destination`; answers its
/// manifest. It runs to its end even if the caller goes away.
async fn backup_now(State(state): State<AppState>) -> Response {
    let Some(taker) = state.hooks.backups.get().cloned() else {
        return (
            StatusCode::CONFLICT,
            "this node takes no backups: its cloud-config sets no backup.destination (or backup.archive_wal is off, \
             or the destination could not be set up: see its status)\n",
        )
            .into_response();
    };
    let (shared, destination) = (state.shared.clone(), taker.destination());
    tracing::info!(event = "backup_requested", destination, "a full backup asked through the API");
    match tokio::spawn(async move { taker.take(&shared).await }).await {
        Ok(Ok(created)) => {
            tracing::info!(event = "backup_taken", id = %created.manifest.id, seconds = created.elapsed.as_secs_f64(), "full backup taken");
            let node = read(&state.shared).status.node.clone();
            let seconds = created.elapsed.as_secs_f64();
            Json(super::BackupTaken { node, id: created.manifest.id, destination, seconds }).into_response()
        }
        Ok(Err(e)) => refused_with(StatusCode::INTERNAL_SERVER_ERROR, &e),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("the backup stopped: {e}\n")).into_response(),
    }
}

async fn wake(State(state): State<AppState>) -> Response {
    state.hooks.wake.notify_one();
    StatusCode::NO_CONTENT.into_response()
}

async fn hostmeta(State(state): State<AppState>) -> Response {
    match &read(&state.shared).hostmeta {
        Some(meta) => Json(meta.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, "no hostMeta yet\n").into_response(),
    }
}

async fn status(State(state): State<AppState>) -> Response {
    let mut status = {
        let p = read(&state.shared);
        let mut status = p.status.clone();
        if let Some(archive) = &p.archive {
            status.degraded.extend(archive.problems());
            status.archive = Some(archive.clone());
        }
        status
    };
    // Read when asked: the slots change only at an upgrade or a boot.
    let files = state.hooks.upgrade.files.clone();
    match tokio::task::spawn_blocking(move || crate::upgrade::BootState::of_node(&files)).await {
        Ok(Some(Ok(boot))) => status.boot = Some(boot),
        Ok(Some(Err(e))) => status.degraded.push(format!("the root slots cannot be read: {e:#}")),
        Ok(None) | Err(_) => {}
    }
    status.served_at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Json(status).into_response()
}

async fn prometheus(State(state): State<AppState>) -> Response {
    let text = metrics::render(&read(&state.shared), state.hooks.refused());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The API routes, guarded as `auth` says.
pub fn router(shared: Shared, auth: Auth, hooks: Arc<ApiHooks>) -> Router {
    let state = AppState { shared, auth: Arc::new(auth), hooks };
    let operator = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/switchover", post(switchover))
        .route("/v1/force-takeover", post(force_takeover))
        .route("/v1/probe-write", post(probe_write))
        .route("/v1/peer", post(replace_peer))
        .route("/v1/kubeconfig", get(kubeconfig))
        .route("/v1/upgrade/bundle/{file}", axum::routing::put(upgrade_receive))
        .route("/v1/upgrade/stage", post(upgrade_stage))
        .route("/v1/upgrade/rollback", post(upgrade_rollback))
        .route("/v1/upgrade/leave", post(upgrade_leave))
        .route("/v1/upgrade/reboot", post(upgrade_reboot))
        .route("/v1/backup", post(backup_now))
        .route("/metrics", get(prometheus))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_operator));
    let peer = Router::new()
        .route("/v1/health", get(health))
        .route("/v1/hostmeta", get(hostmeta))
        .route("/v1/wake", post(wake))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_peer));
    Router::new().merge(peer).merge(operator).with_state(state)
}

async fn serve_connection<S>(io: S, app: Router, remote: Remote, caller: Caller)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app.layer(Extension(remote)).layer(Extension(caller)));
    if let Err(e) = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(peer = ?remote.0, error = %e, "API connection ended with an error");
    }
}

/// Serve `app` over mutual TLS until the task is dropped. Connections whose
/// client certificate is not signed by the cluster CA are refused and
/// logged; the others carry the certificate's [`Identity`] as a [`Caller`]
/// request extension. At most [`MAX_HANDSHAKES`] handshakes run at once.
/// Each connection is accepted with the configuration `config` holds then
/// (a revocation list can arrive while serving).
pub async fn serve_tls(
    listener: TcpListener,
    config: tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>,
    app: Router,
    hooks: Arc<ApiHooks>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
        let (tcp, addr) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting an API connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = TlsAcceptor::from(config.borrow().clone());
        let (app, hooks) = (app.clone(), hooks.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop(permit);
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::warn!(event = "api_refused", peer = %addr, error = %e, "refused a TLS connection");
                    hooks.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => {
                    tracing::warn!(event = "api_refused", peer = %addr, "TLS handshake timed out");
                    hooks.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let leaf = tls.get_ref().1.peer_certificates().and_then(|chain| chain.first());
            let identity = match leaf.map(Identity::from_der) {
                Some(Ok(identity)) => identity,
                Some(Err(e)) => {
                    tracing::warn!(event = "api_refused", peer = %addr, error = %e, "refused a TLS connection");
                    hooks.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                None => {
                    // The verifier requires a certificate; this is only a guard.
                    tracing::warn!(event = "api_refused", peer = %addr, "refused a TLS connection without a client certificate");
                    hooks.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            tracing::debug!(peer = %addr, identity = %identity, "API connection");
            serve_connection(tls, app, Remote(Some(addr)), Caller::Certificate(identity)).await
        });
    }
}

/// Bind the local status socket (replacing a stale one), mode 0600.
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale socket {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// Serve `app` on the local socket until the task is dropped.
pub async fn serve_unix(listener: UnixListener, app: Router) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, app.clone(), Remote(None), Caller::Local));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a local status connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
