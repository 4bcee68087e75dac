//! The witness's routes and its state file.
//!
//! | route | who |
//! |---|---|
//! | `POST /v1/lease` | a node, for itself (`node` = its certificate's name) |
//! | `POST /v1/lease/release` | a node, for itself |
//! | `POST /v1/sync` | the lease holder, for itself |
//! | `GET /v1/lease/{cluster}` | a node or the operator |
//! | `POST /v1/crl` | the operator: a revocation list of the cluster CA (`replace-node`) |
//!
//! The witness's own certificate gets nothing. Every change of a holder, a
//! release or a sync record is written to the state file (atomically, with
//! fsync) while the table is locked, before the request is answered; when
//! the write fails the change is undone and the request fails with 500, so
//! no answer is ever given that a restart would forget.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};

use super::table::{Grant, LeaseTable, Persisted};
use super::{LeaseRequest, ReleaseRequest, SyncRequest};
use crate::fsutil;
use crate::peer::identity::{Caller, Role};
use crate::peer::server::ApiHooks;

/// Version of the state file format.
const STATE_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    clusters: BTreeMap<String, Persisted>,
}

/// The state file as written by this version, or by earlier ones (a map of
/// cluster to current holder).
#[derive(Deserialize)]
#[serde(untagged)]
enum AnyStateFile {
    Current(StateFile),
    Holders(BTreeMap<String, String>),
}

/// Read the state file; a missing file is an empty table.
pub fn load_state(path: &Path) -> anyhow::Result<BTreeMap<String, Persisted>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let parsed: AnyStateFile = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow::anyhow!("{} is not a witness state file ({e}); move it away to start fresh", path.display())
    })?;
    match parsed {
        AnyStateFile::Current(state) if state.version == STATE_VERSION => Ok(state.clusters),
        AnyStateFile::Current(state) => anyhow::bail!(
            "{} has format version {}, this witness reads version {STATE_VERSION}; run the witness version that wrote it",
            path.display(),
            state.version
        ),
        AnyStateFile::Holders(holders) => Ok(holders
            .into_iter()
            .map(|(cluster, holder)| (cluster, Persisted { last_holder: holder, held: true, sync_standby: None }))
            .collect()),
    }
}

async fn store_state(path: &Path, clusters: &BTreeMap<String, Persisted>) -> anyhow::Result<()> {
    let file = StateFile { version: STATE_VERSION, clusters: clusters.clone() };
    let bytes = serde_json::to_vec_pretty(&file).context("serialising the lease records")?;
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || fsutil::write_atomic(&path, &bytes, 0o600))
        .await
        .context("the state file writer panicked")?
}

struct WitnessState {
    table: tokio::sync::Mutex<LeaseTable>,
    state_file: PathBuf,
    hooks: Arc<ApiHooks>,
    revocation: Option<Revocation>,
}

/// Where a revocation list from the operator goes: kept in `file` (read
/// again at start), and the listener's TLS configuration rebuilt with it,
/// so a replaced machine's certificate takes no lease.
pub struct Revocation {
    pub file: PathBuf,
    /// The witness's CA, certificate and key (PEM).
    pub ca: String,
    pub cert: String,
    pub key: String,
    pub tls: tokio::sync::watch::Sender<Arc<rustls::ServerConfig>>,
}

impl Revocation {
    /// The listener's configuration with `crl` (PEM) refusing what it names;
    /// a list of another CA, or revoking the witness's own certificate, is refused.
    pub fn server_config(&self, crl: Option<&str>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        Self::config_for(&self.ca, &self.cert, &self.key, crl)
    }

    /// [`Self::server_config`] from the PEM texts.
    pub fn config_for(ca: &str, cert: &str, key: &str, crl: Option<&str>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let material = crate::peer::tls::TlsMaterial::from_pem(ca, cert, key)?.with_crl(crl)?;
        material.check_own_certificate()?;
        Ok(material.server_config()?)
    }
}

type Shared = Arc<WitnessState>;

impl WitnessState {
    /// Apply `change` to the table and persist the result before anything is
    /// answered; undo it when the state file cannot be written.
    async fn change<T>(&self, change: impl FnOnce(&mut LeaseTable, Instant) -> T) -> Result<T, Response> {
        let mut table = self.table.lock().await;
        let undo = table.clone();
        let before = table.persisted();
        let out = change(&mut table, Instant::now());
        let after = table.persisted();
        if before != after
            && let Err(e) = store_state(&self.state_file, &after).await
        {
            *table = undo;
            tracing::error!(event = "witness_state_write_failed", file = %self.state_file.display(), error = %format!("{e:#}"), "could not persist the lease records; the request fails");
            let body = format!("the witness could not record this change in {}: {e:#}\n", self.state_file.display());
            return Err((StatusCode::INTERNAL_SERVER_ERROR, body).into_response());
        }
        Ok(out)
    }
}

/// Requests that change a lease: only a node's certificate, for that node.
fn caller_is(caller: &Option<Extension<Caller>>, node: &str) -> Result<(), String> {
    match caller.as_ref().map(|Extension(c)| c) {
        Some(Caller::Certificate(id)) => match id.role() {
            Some(Role::Node(name)) if name == node => Ok(()),
            Some(Role::Node(name)) => Err(format!("the certificate of `{name}` cannot act for the node `{node}`")),
            Some(Role::Operator) => Err("the operator's certificate may only read leases".into()),
            Some(Role::Witness) | None => Err(format!("the certificate `{id}` may not use the witness")),
        },
        _ => Err("a node's client certificate is required".into()),
    }
}

/// Refuse the witness's own certificate and anonymous callers outright.
async fn require_caller(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let allowed = match request.extensions().get::<Caller>() {
        Some(Caller::Certificate(id)) => matches!(id.role(), Some(Role::Node(_) | Role::Operator)),
        _ => false,
    };
    if allowed {
        return next.run(request).await;
    }
    let reason = "only the nodes' and the operator's certificates may use the witness";
    state.hooks.refuse(None, request.extensions().get::<Caller>(), request.uri().path(), StatusCode::FORBIDDEN, reason)
}

fn forbidden(state: &WitnessState, caller: &Option<Extension<Caller>>, path: &str, why: String) -> Response {
    state.hooks.refuse(None, caller.as_ref().map(|Extension(c)| c), path, StatusCode::FORBIDDEN, &why)
}

fn bad_request(what: &str) -> Response {
    (StatusCode::BAD_REQUEST, format!("{what}\n")).into_response()
}

async fn acquire(
    State(state): State<Shared>,
    caller: Option<Extension<Caller>>,
    Json(req): Json<LeaseRequest>,
) -> Response {
    if req.cluster.is_empty() || req.node.is_empty() {
        return bad_request("`cluster` and `node` must not be empty");
    }
    if let Err(why) = caller_is(&caller, &req.node) {
        return forbidden(&state, &caller, "/v1/lease", why);
    }
    let (answer, grant) = match state.change(|table, now| table.acquire(&req, now)).await {
        Ok(out) => out,
        Err(response) => return response,
    };
    match &grant {
        Grant::New { previous, forced: true } => tracing::warn!(
            event = "lease_forced", cluster = %req.cluster, node = %req.node, previous = ?previous,
            "lease forced to a node that is neither the last holder nor the synchronous standby"
        ),
        Grant::New { previous, forced: false } => tracing::info!(
            event = "lease_granted", cluster = %req.cluster, node = %req.node, previous = ?previous,
            "lease holder changed"
        ),
        Grant::NotEligible => tracing::debug!(
            cluster = %req.cluster, node = %req.node, last_holder = ?answer.last_holder,
            sync_standby = ?answer.sync_standby, "free lease refused: neither the last holder nor the synchronous standby"
        ),
        Grant::Renewed | Grant::Held => {}
    }
    Json(answer).into_response()
}

async fn release(
    State(state): State<Shared>,
    caller: Option<Extension<Caller>>,
    Json(req): Json<ReleaseRequest>,
) -> Response {
    if let Err(why) = caller_is(&caller, &req.node) {
        return forbidden(&state, &caller, "/v1/lease/release", why);
    }
    match state.change(|table, now| table.release(&req, now)).await {
        Ok(answer) => Json(answer).into_response(),
        Err(response) => response,
    }
}

async fn record_sync(
    State(state): State<Shared>,
    caller: Option<Extension<Caller>>,
    Json(req): Json<SyncRequest>,
) -> Response {
    if let Err(why) = caller_is(&caller, &req.node) {
        return forbidden(&state, &caller, "/v1/sync", why);
    }
    if req.sync_standby.as_deref() == Some(req.node.as_str()) {
        return bad_request("a node cannot be its own synchronous standby");
    }
    let answer = match state.change(|table, now| table.record_sync(&req, now)).await {
        Ok(answer) => answer,
        Err(response) => return response,
    };
    if answer.accepted {
        tracing::info!(event = "sync_standby_recorded", cluster = %req.cluster, node = %req.node, sync_standby = ?req.sync_standby, "synchronous standby recorded");
    } else {
        tracing::warn!(cluster = %req.cluster, node = %req.node, holder = ?answer.holder, "sync record refused: the caller does not hold the lease");
    }
    Json(answer).into_response()
}

async fn show(State(state): State<Shared>, axum::extract::Path(cluster): axum::extract::Path<String>) -> Response {
    Json(state.table.lock().await.holder(&cluster, Instant::now())).into_response()
}

/// A newer revocation list from the operator: refuses the certificates it
/// names from the next connection on.
async fn take_crl(State(state): State<Shared>, caller: Option<Extension<Caller>>, body: String) -> Response {
    let operator = matches!(caller.as_ref().map(|Extension(c)| c), Some(Caller::Certificate(id)) if id.is_operator());
    if !operator {
        return forbidden(
            &state,
            &caller,
            "/v1/crl",
            "only the operator's certificate may send a revocation list".into(),
        );
    }
    let Some(revocation) = &state.revocation else {
        return (StatusCode::NOT_FOUND, "this witness takes no revocation list\n").into_response();
    };
    let number = match crate::pki::revoked(&body) {
        Ok((_, number)) => number,
        Err(e) => return bad_request(&format!("not a revocation list: {e:#}")),
    };
    let current =
        std::fs::read_to_string(&revocation.file).ok().and_then(|t| crate::pki::revoked(&t).ok()).map(|r| r.1);
    if current.is_some_and(|c| c > number) {
        let why = format!("the witness has list number {} already; this is number {number}", current.unwrap_or(0));
        return (StatusCode::CONFLICT, format!("{why}\n")).into_response();
    }
    let config = match revocation.server_config(Some(&body)) {
        Ok(config) => config,
        Err(e) => return bad_request(&format!("{e:#}")),
    };
    if let Err(e) = crate::fsutil::write_atomic(&revocation.file, body.as_bytes(), 0o644) {
        let why = format!("keeping the revocation list in {}: {e:#}\n", revocation.file.display());
        return (StatusCode::INTERNAL_SERVER_ERROR, why).into_response();
    }
    revocation.tls.send_replace(config);
    tracing::info!(event = "witness_crl_updated", number, "revocation list taken: its certificates are refused");
    Json(serde_json::json!({ "number": number })).into_response()
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "unknown witness route\n").into_response()
}

/// The witness routes; records persisted in `state_file` (read now, in the
/// current or the earlier format). `hooks` counts refusals.
pub fn router(
    max_ttl: Duration,
    state_file: &Path,
    hooks: Arc<ApiHooks>,
    revocation: Option<Revocation>,
) -> anyhow::Result<Router> {
    let restored = load_state(state_file)?;
    if !restored.is_empty() {
        tracing::info!(records = ?restored, grace = ?max_ttl, "honouring lease records from before the restart");
    }
    let state = Arc::new(WitnessState {
        table: tokio::sync::Mutex::new(LeaseTable::new(max_ttl, restored, Instant::now())),
        state_file: state_file.to_path_buf(),
        hooks,
        revocation,
    });
    Ok(Router::new()
        .route("/v1/lease", post(acquire))
        .route("/v1/lease/release", post(release))
        .route("/v1/sync", post(record_sync))
        .route("/v1/lease/{cluster}", get(show))
        .route("/v1/crl", post(take_crl))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_caller))
        .fallback(not_found)
        .with_state(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_earlier_format_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        assert!(load_state(&path).unwrap().is_empty(), "missing is empty");
        std::fs::write(&path, r#"{"lab": "node1"}"#).unwrap();
        assert_eq!(
            load_state(&path).unwrap(),
            BTreeMap::from([(
                "lab".to_string(),
                Persisted { last_holder: "node1".into(), held: true, sync_standby: None }
            )])
        );
        std::fs::write(&path, r#"{"version": 9, "clusters": {}}"#).unwrap();
        assert!(format!("{:#}", load_state(&path).unwrap_err()).contains("format version 9"));
        std::fs::write(&path, "[1, 2]").unwrap();
        assert!(format!("{:#}", load_state(&path).unwrap_err()).contains("move it away"));
    }

    #[tokio::test]
    async fn a_failed_write_undoes_the_change() {
        let dir = tempfile::tempdir().unwrap();
        // The state file's directory is missing: every write fails.
        let state = WitnessState {
            table: tokio::sync::Mutex::new(LeaseTable::new(Duration::from_secs(30), BTreeMap::new(), Instant::now())),
            state_file: dir.path().join("missing/leases.json"),
            hooks: Arc::default(),
            revocation: None,
        };
        let req = LeaseRequest { cluster: "lab".into(), node: "a".into(), ttl_ms: 10_000, force: false };
        let failed = state.change(|t, now| t.acquire(&req, now)).await.unwrap_err();
        assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let answer = state.table.lock().await.holder("lab", Instant::now());
        assert_eq!((answer.holder, answer.last_holder), (None, None), "the grant was undone");
    }
}
