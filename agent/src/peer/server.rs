//! Routes and listeners of the agent API.
//!
//! | route | who | auth |
//! |---|---|---|
//! | `GET /v1/health` | the peer's heartbeat | mutual TLS |
//! | `GET /v1/hostmeta` | the peer (arbitration, recovery) | mutual TLS |
//! | `GET /v1/status` | operators | mutual TLS + API token |
//! | `GET /metrics` | Prometheus | mutual TLS + API token |
//! | `POST /v1/switchover` | operators: planned handover by the leader | mutual TLS + API token |
//!
//! The local Unix socket (mode 0600, root) serves the same routes without
//! TLS or token: whoever can open it is root on the node.

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
use tokio_rustls::TlsAcceptor;

use super::{Shared, metrics};

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the API records for the agent: refusals and when the peer last
/// called, plus where operator requests go.
#[derive(Debug, Default)]
pub struct ApiHooks {
    pub refused: AtomicU64,
    /// When `/v1/health` was last called (the peer's heartbeat reaching us).
    pub last_health_call: Mutex<Option<Instant>>,
    /// The agent's control channel (planned switchover); `None` serves 503.
    pub control: Option<tokio::sync::mpsc::Sender<Control>>,
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
}

/// Requests from operators to the agent loop.
#[derive(Debug)]
pub enum Control {
    /// Hand leadership to the peer; the answer says whether it was accepted.
    Switchover(tokio::sync::oneshot::Sender<Result<(), String>>),
}

#[derive(Clone)]
struct AppState {
    shared: Shared,
    /// `None` on the local socket.
    token: Option<Arc<str>>,
    hooks: Arc<ApiHooks>,
}

/// Remote address of the connection, for logs.
#[derive(Clone, Copy, Debug)]
struct Remote(Option<SocketAddr>);

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else { return next.run(request).await };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
        return next.run(request).await;
    }
    let remote = request.extensions().get::<Remote>().and_then(|r| r.0);
    tracing::warn!(
        event = "api_refused",
        peer = ?remote,
        path = %request.uri().path(),
        reason = if presented.is_some() { "wrong API token" } else { "no API token" },
        "refused an operator call"
    );
    state.hooks.refused.fetch_add(1, Ordering::Relaxed);
    (StatusCode::UNAUTHORIZED, "missing or wrong API token (Authorization: Bearer <api.token>)\n").into_response()
}

fn read(shared: &Shared) -> std::sync::RwLockReadGuard<'_, super::Published> {
    shared.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn health(State(state): State<AppState>) -> Response {
    *state.hooks.last_health_call.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    Json(read(&state.shared).health()).into_response()
}

async fn switchover(State(state): State<AppState>) -> Response {
    let Some(control) = &state.hooks.control else {
        return (StatusCode::SERVICE_UNAVAILABLE, "this process does not run the agent loop\n").into_response();
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if control.send(Control::Switchover(tx)).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the agent loop is not running\n").into_response();
    }
    match rx.await {
        Ok(Ok(())) => (StatusCode::ACCEPTED, "switchover started\n").into_response(),
        Ok(Err(why)) => (StatusCode::CONFLICT, format!("{why}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the agent loop stopped\n").into_response(),
    }
}

async fn hostmeta(State(state): State<AppState>) -> Response {
    match &read(&state.shared).hostmeta {
        Some(meta) => Json(meta.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, "no hostMeta yet\n").into_response(),
    }
}

async fn status(State(state): State<AppState>) -> Response {
    Json(read(&state.shared).status.clone()).into_response()
}

async fn prometheus(State(state): State<AppState>) -> Response {
    let text = metrics::render(&read(&state.shared), state.hooks.refused());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The API routes. `token: None` serves operator routes without a token
/// (the local socket).
pub fn router(shared: Shared, token: Option<&str>, hooks: Arc<ApiHooks>) -> Router {
    let state = AppState { shared, token: token.map(Arc::from), hooks };
    let operator = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/switchover", post(switchover))
        .route("/metrics", get(prometheus))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/hostmeta", get(hostmeta))
        .merge(operator)
        .with_state(state)
}

async fn serve_connection<S>(io: S, app: Router, remote: Remote)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app.layer(Extension(remote)));
    if let Err(e) = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(peer = ?remote.0, error = %e, "API connection ended with an error");
    }
}

/// Serve `app` over mutual TLS until the task is dropped. Connections whose
/// client certificate is not signed by the cluster CA are refused and logged.
pub async fn serve_tls(listener: TcpListener, config: Arc<rustls::ServerConfig>, app: Router, hooks: Arc<ApiHooks>) {
    let acceptor = TlsAcceptor::from(config);
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting an API connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, app, hooks) = (acceptor.clone(), app.clone(), hooks.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => serve_connection(tls, app, Remote(Some(addr))).await,
                Ok(Err(e)) => {
                    tracing::warn!(event = "api_refused", peer = %addr, error = %e, "refused a TLS connection");
                    hooks.refused.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => tracing::warn!(event = "api_refused", peer = %addr, "TLS handshake timed out"),
            }
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
                tokio::spawn(serve_connection(stream, app.clone(), Remote(None)));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a local status connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
