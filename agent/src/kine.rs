//! Kine: the etcd v3 API over PostgreSQL that K3s uses as its datastore.
//!
//! Each node runs one Kine talking to the primary PostgreSQL through the VIP;
//! the local K3s talks to the local Kine. This module renders Kine's command
//! line and environment ([`KineSettings::spec`]), probes its health through its
//! etcd endpoint ([`probe`]) and decides when to restart it ([`KineRecovery`]).
//!
//! The database password never appears on the command line (where every user
//! can read it in `/proc`): the endpoint goes in `KINE_ENDPOINT`, which Kine
//! reads itself. The database connection is TLS, the server's certificate
//! verified against the cluster CA and the VIP (`sslmode=verify-full`; node
//! certificates carry the VIP): the agent writes the CA to
//! [`KineSettings::ca_file`], readable by Kine's unprivileged user, before
//! Kine starts ([`KineSettings::write_ca`]).
//!
//! Health is a real etcd `Range` call over gRPC (HTTP/2 without TLS, which is
//! what Kine serves when it has no server certificate) made with reqwest, so
//! the agent needs no etcd client tool on the node. A Range reaches the
//! database, so the probe fails while PostgreSQL is unreachable.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::GeminiConfig;
use crate::services::{ServiceError, ServiceSpec, Services};

/// Where the image installs Kine.
pub const KINE_BINARY: &str = "/usr/local/bin/kine";
/// The database and role Kine uses.
pub const KINE_DATABASE: &str = "kine";
pub const KINE_USER: &str = "kine";
/// The service name (`geminik8s-kine.service` under systemd).
pub const SERVICE: &str = "kine";
/// The cluster CA as Kine reads it, in the runtime directory.
pub const CA_FILE: &str = "kine-ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum KineError {
    #[error("kine at {endpoint} is unreachable: {source}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("kine at {endpoint} answered HTTP {status}")]
    Http { endpoint: String, status: u16 },
    #[error("kine at {endpoint} failed the call: gRPC status {code}: {message}")]
    Grpc { endpoint: String, code: String, message: String },
    #[error("kine at {endpoint} sent no response message")]
    NoMessage { endpoint: String },
    #[error("kine at {endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("building the HTTP/2 client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Everything Kine's command line is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct KineSettings {
    pub binary: PathBuf,
    /// Where PostgreSQL is reached: the VIP in production.
    pub db_host: IpAddr,
    pub db_port: u16,
    pub password: String,
    /// Kine's etcd listen address.
    pub listen: SocketAddr,
    /// Kine's own compaction (`--compact-interval`); zero leaves it to K3s.
    pub compaction_interval: Duration,
    /// Where the supervisor writes Kine's output.
    pub log_file: Option<PathBuf>,
    /// The cluster CA (the cloud-config's `tls.ca`: inline PEM or a path).
    pub ca: String,
    /// Where [`KineSettings::write_ca`] puts it for Kine (`sslrootcert=`).
    pub ca_file: PathBuf,
}

impl KineSettings {
    /// The settings for this node; the supervisor writes Kine's output to
    /// `log_dir/kine.log` (give each node its own directory when nodes share a
    /// filesystem, as in the network-namespace lab).
    pub fn from_config(config: &GeminiConfig, log_dir: &Path) -> Self {
        KineSettings {
            binary: PathBuf::from(KINE_BINARY),
            db_host: config.cluster.vip,
            db_port: config.postgres.port,
            password: config.postgres.kine_password.clone(),
            listen: config.kine.listen,
            compaction_interval: config.kine.compaction_interval,
            log_file: Some(log_dir.join("kine.log")),
            ca: config.tls.ca.clone(),
            ca_file: Path::new(crate::services::ENV_DIR).join(CA_FILE),
        }
    }

    /// `postgres://kine:PASSWORD@HOST:PORT/kine?sslmode=verify-full&sslrootcert=CA_FILE`,
    /// password and path percent-encoded.
    pub fn endpoint(&self) -> String {
        let host = match self.db_host {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        format!(
            "postgres://{KINE_USER}:{}@{host}:{}/{KINE_DATABASE}?sslmode=verify-full&sslrootcert={}",
            percent_encode(&self.password),
            self.db_port,
            percent_encode(&self.ca_file.to_string_lossy())
        )
    }

    /// Write the cluster CA to [`KineSettings::ca_file`] (mode 0644: it is
    /// public, and Kine runs as an unprivileged user); before Kine starts.
    pub fn write_ca(&self) -> anyhow::Result<()> {
        use anyhow::Context;
        let pem = crate::config::Tls::resolve(&self.ca)
            .context("reading `tls.ca` (inline PEM or a readable PEM file) for Kine's database connection")?;
        if let Some(dir) = self.ca_file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        crate::fsutil::write_atomic(&self.ca_file, pem.as_bytes(), 0o644)
            .with_context(|| format!("writing the cluster CA for Kine to {}", self.ca_file.display()))
    }

    /// The etcd endpoint Kine serves, for K3s and for health probes (loopback
    /// when Kine listens on all addresses).
    pub fn etcd_endpoint(&self) -> String {
        etcd_endpoint(self.listen)
    }

    /// The fixed shape of Kine's command line (the unit file's `ExecStart=`).
    pub fn argv(&self) -> Vec<String> {
        vec![
            self.binary.display().to_string(),
            "--listen-address".into(),
            "${KINE_LISTEN_ADDRESS}".into(),
            "--compact-interval".into(),
            "${KINE_COMPACT_INTERVAL}".into(),
            // The metrics listener (default :8080) is not used and would only collide.
            "--metrics-bind-address".into(),
            "0".into(),
        ]
    }

    /// The service the agent runs.
    pub fn spec(&self) -> ServiceSpec {
        let mut spec = ServiceSpec::new(SERVICE, self.argv());
        spec.env.insert("KINE_ENDPOINT".into(), self.endpoint());
        spec.env.insert("KINE_LISTEN_ADDRESS".into(), self.listen.to_string());
        spec.env.insert("KINE_COMPACT_INTERVAL".into(), go_duration(self.compaction_interval));
        spec.log_file = self.log_file.clone();
        spec.stop_grace = Duration::from_secs(10);
        spec
    }
}

/// Percent-encode everything but RFC 3986 unreserved characters.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A duration as Go's `time.ParseDuration` reads it ("300s", "1500ms").
pub fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

/// One etcd `Range` of a single key through Kine's gRPC endpoint
/// (`http://HOST:PORT`). `Ok` means Kine answered with data from the database.
pub async fn probe(endpoint: &str, timeout: Duration) -> Result<(), KineError> {
    call(endpoint, "etcdserverpb.KV/Range", &range_request(b"/geminik8s/health", 1), timeout).await.map(drop)
}

/// One unary call of Kine's etcd gRPC API: `method` such as
/// `etcdserverpb.KV/Range`, `request` the protobuf-encoded message. Returns
/// the protobuf-encoded response message.
pub async fn call(endpoint: &str, method: &str, request: &[u8], timeout: Duration) -> Result<Vec<u8>, KineError> {
    let endpoint = endpoint.trim_end_matches('/').to_string();
    let client = grpc_client()?;
    let call = async {
        let response = client
            .post(format!("{endpoint}/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(grpc_frame(request))
            .send()
            .await
            .map_err(|source| KineError::Unreachable { endpoint: endpoint.clone(), source })?;
        if !response.status().is_success() {
            return Err(KineError::Http { endpoint: endpoint.clone(), status: response.status().as_u16() });
        }
        // An error without a message comes back "trailers-only": status in the headers.
        if let Some(code) = response.headers().get("grpc-status").and_then(|v| v.to_str().ok())
            && code != "0"
        {
            let message =
                response.headers().get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            return Err(KineError::Grpc { endpoint: endpoint.clone(), code: code.to_string(), message });
        }
        let body =
            response.bytes().await.map_err(|source| KineError::Unreachable { endpoint: endpoint.clone(), source })?;
        if body.len() >= 5 && body[0] == 0 {
            let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
            if body.len() >= 5 + len {
                return Ok(body[5..5 + len].to_vec());
            }
        }
        Err(KineError::NoMessage { endpoint: endpoint.clone() })
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(KineError::Timeout { endpoint, timeout }),
    }
}

/// The client for Kine's gRPC endpoint, one per process: building a client
/// reads the system's trust store (every certificate under /etc/ssl/certs
/// parsed), which done per probe was most of an idle agent's CPU. It keeps
/// no idle connection: every call connects afresh, so a restarted Kine is
/// never first met through a dead connection. The caller bounds each call.
fn grpc_client() -> Result<reqwest::Client, KineError> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    if let Some(client) = CLIENT.get() {
        return Ok(client.clone());
    }
    crate::tls::install_crypto_provider();
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .pool_max_idle_per_host(0)
        .build()
        .map_err(KineError::Client)?;
    Ok(CLIENT.get_or_init(|| client).clone())
}

/// `etcdserverpb.RangeRequest { key, limit }` in protobuf wire format.
pub fn range_request(key: &[u8], limit: u64) -> Vec<u8> {
    let mut msg = vec![0x0a]; // field 1 (key), length-delimited
    put_varint(&mut msg, key.len() as u64);
    msg.extend_from_slice(key);
    msg.push(0x18); // field 3 (limit), varint
    put_varint(&mut msg, limit);
    msg
}

/// A protobuf varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A gRPC length-prefixed message (not compressed).
fn grpc_frame(msg: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(msg.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(msg);
    frame
}

/// The etcd endpoint of a Kine listening on `listen`, as local clients
/// (K3s, the health probe) reach it: loopback when it listens on all
/// addresses.
pub fn etcd_endpoint(listen: std::net::SocketAddr) -> String {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    format!("http://{addr}")
}

/// When a failing Kine is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryPolicy {
    /// Consecutive failed probes before a restart.
    pub failures: u32,
    /// After the primary moved, or after a restart, how long Kine gets to
    /// reconnect on its own before it is restarted (again).
    pub grace: Duration,
}

impl Default for RecoveryPolicy {
    fn default() -> Self {
        RecoveryPolicy { failures: 3, grace: Duration::from_secs(5) }
    }
}

/// What to do after a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// Failing, but give it time (too few failures, or within the grace period).
    Waiting,
    Restart,
}

/// Decides when a failing Kine is restarted. Kine usually reconnects by itself
/// when the primary moves under the VIP; when it does not within the grace
/// period and keeps failing, it is restarted. Each restart that did not give
/// a Kine healthy for [`KineRecovery::STABLE`] doubles the grace before the
/// next one (up to [`KineRecovery::MAX_BACKOFF`] times): on a machine too
/// loaded for the probe to answer in time, restarting Kine every few seconds
/// only adds load and keeps it from ever serving. Pure: time comes in as `now`.
#[derive(Debug, Clone)]
pub struct KineRecovery {
    policy: RecoveryPolicy,
    failures: u32,
    primary_moved_at: Option<Instant>,
    restarted_at: Option<Instant>,
    /// Restarts since Kine was last healthy for [`KineRecovery::STABLE`].
    restarts: u32,
    healthy_since: Option<Instant>,
}

impl KineRecovery {
    /// Healthy this long, Kine's restart back-off starts over.
    pub const STABLE: Duration = Duration::from_secs(30);
    /// The longest grace after a restart, in multiples of the policy's.
    pub const MAX_BACKOFF: u32 = 16;

    pub fn new(policy: RecoveryPolicy) -> Self {
        KineRecovery {
            policy,
            failures: 0,
            primary_moved_at: None,
            restarted_at: None,
            restarts: 0,
            healthy_since: None,
        }
    }

    /// The primary PostgreSQL moved (promotion, switchover).
    pub fn primary_moved(&mut self, now: Instant) {
        self.primary_moved_at = Some(now);
    }

    /// Feed one probe result.
    pub fn observe(&mut self, healthy: bool, now: Instant) -> Verdict {
        if healthy {
            self.failures = 0;
            self.primary_moved_at = None;
            let since = *self.healthy_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= Self::STABLE {
                self.restarts = 0;
            }
            return Verdict::Healthy;
        }
        self.healthy_since = None;
        self.failures += 1;
        let within = |t: Option<Instant>, grace: Duration| t.is_some_and(|t| now.saturating_duration_since(t) < grace);
        let backoff = 2u32.saturating_pow(self.restarts.saturating_sub(1)).min(Self::MAX_BACKOFF);
        if self.failures < self.policy.failures
            || within(self.primary_moved_at, self.policy.grace)
            || within(self.restarted_at, self.policy.grace * backoff)
        {
            return Verdict::Waiting;
        }
        self.failures = 0;
        self.restarted_at = Some(now);
        self.restarts = self.restarts.saturating_add(1);
        Verdict::Restart
    }
}

/// Probe Kine at `endpoint`, and restart it through `services` when
/// `recovery` says so. Returns the verdict.
pub async fn check_and_recover(
    services: &dyn Services,
    recovery: &mut KineRecovery,
    endpoint: &str,
    timeout: Duration,
) -> Result<Verdict, ServiceError> {
    let result = probe(endpoint, timeout).await;
    if let Err(e) = &result {
        tracing::debug!(error = %e, "kine health probe failed");
    }
    let verdict = recovery.observe(result.is_ok(), Instant::now());
    if verdict == Verdict::Restart {
        tracing::warn!(service = SERVICE, endpoint, "kine does not recover by itself: restarting it");
        services.restart(SERVICE, timeout.max(Duration::from_secs(30))).await?;
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> KineSettings {
        KineSettings {
            binary: PathBuf::from(KINE_BINARY),
            db_host: "10.0.0.100".parse().unwrap(),
            db_port: 5432,
            password: "p@ss:w/rd?#%é".into(),
            listen: "127.0.0.1:2379".parse().unwrap(),
            compaction_interval: Duration::from_secs(300),
            log_file: None,
            ca: "/etc/geminik8s/ca.crt".into(),
            ca_file: PathBuf::from("/run/geminik8s/kine-ca.crt"),
        }
    }

    fn config() -> GeminiConfig {
        crate::config::fixture::services()
    }

    #[test]
    fn settings_from_config_reach_kine_through_the_vip() {
        let settings = KineSettings::from_config(&config(), Path::new("/var/log/geminik8s/a"));
        assert_eq!(
            settings.endpoint(),
            "postgres://kine:k%20p@10.77.0.10:5433/kine?sslmode=verify-full&sslrootcert=%2Frun%2Fgeminik8s%2Fkine-ca.crt"
        );
        let spec = settings.spec();
        assert_eq!(
            spec.expanded_argv().unwrap()[1..5],
            ["--listen-address", "127.0.0.1:12379", "--compact-interval", "600s"]
        );
        assert_eq!(spec.log_file.as_deref(), Some(Path::new("/var/log/geminik8s/a/kine.log")));
        assert_eq!(settings.etcd_endpoint(), "http://127.0.0.1:12379");
    }

    #[test]
    fn endpoint_encodes_the_password_and_brackets_ipv6() {
        let mut s = settings();
        let tls = "sslmode=verify-full&sslrootcert=%2Frun%2Fgeminik8s%2Fkine-ca.crt";
        assert_eq!(s.endpoint(), format!("postgres://kine:p%40ss%3Aw%2Frd%3F%23%25%C3%A9@10.0.0.100:5432/kine?{tls}"));
        s.db_host = "fd00::100".parse().unwrap();
        s.password = "plain".into();
        assert_eq!(s.endpoint(), format!("postgres://kine:plain@[fd00::100]:5432/kine?{tls}"));
    }

    #[test]
    fn spec_keeps_the_password_off_the_command_line() {
        let spec = settings().spec();
        assert_eq!(spec.unit(), "geminik8s-kine.service");
        let argv = spec.expanded_argv().unwrap();
        assert_eq!(
            argv,
            [
                KINE_BINARY,
                "--listen-address",
                "127.0.0.1:2379",
                "--compact-interval",
                "300s",
                "--metrics-bind-address",
                "0"
            ]
        );
        assert!(!argv.iter().any(|a| a.contains("p%40ss")));
        assert_eq!(spec.env["KINE_ENDPOINT"], settings().endpoint());
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_secs(0)), "0s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn range_request_wire_format() {
        assert_eq!(range_request(b"ab", 1), [0x0a, 2, b'a', b'b', 0x18, 1]);
        assert_eq!(grpc_frame(&[7]), [0, 0, 0, 0, 1, 7]);
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
    }

    #[test]
    fn recovery_restarts_after_consecutive_failures_past_the_grace() {
        let policy = RecoveryPolicy { failures: 3, grace: Duration::from_secs(5) };
        let mut r = KineRecovery::new(policy);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // A failure or two, then healthy: nothing to do.
        assert_eq!(r.observe(false, at(0)), Verdict::Waiting);
        assert_eq!(r.observe(false, at(1)), Verdict::Waiting);
        assert_eq!(r.observe(true, at(2)), Verdict::Healthy);
        // The primary moves; failures within the grace period wait for Kine to reconnect.
        r.primary_moved(at(10));
        for s in 10..15 {
            assert_eq!(r.observe(false, at(s)), Verdict::Waiting, "at {s}s");
        }
        // Past the grace, still failing: restart, once.
        assert_eq!(r.observe(false, at(15)), Verdict::Restart);
        use Verdict::{Healthy, Restart, Waiting};
        let script = [
            // The restarted Kine gets its own grace period and failure count.
            (16, false, Waiting),
            (17, false, Waiting),
            (18, false, Waiting),
            (21, false, Restart),
            (22, true, Healthy),
            // Healthy only briefly: the next restart waits twice as long
            // (10 s), then four times (20 s): a loaded machine is not
            // restarted into the ground.
            (23, false, Waiting),
            (24, false, Waiting),
            (30, false, Waiting),
            (31, false, Restart),
            (32, false, Waiting),
            (33, false, Waiting),
            (34, false, Waiting),
            (50, false, Waiting),
            (51, false, Restart),
            // Healthy for 30 s: the back-off starts over, the threshold only, as at first.
            (52, true, Healthy),
            (82, true, Healthy),
            (83, false, Waiting),
            (84, false, Waiting),
            (85, false, Restart),
        ];
        for (s, healthy, verdict) in script {
            assert_eq!(r.observe(healthy, at(s)), verdict, "at {s}s");
        }
    }

    #[test]
    fn recovery_back_off_is_bounded() {
        let mut r = KineRecovery::new(RecoveryPolicy { failures: 1, grace: Duration::from_secs(1) });
        let t0 = Instant::now();
        let restarts: Vec<u64> =
            (0..200).filter(|s| r.observe(false, t0 + Duration::from_secs(*s)) == Verdict::Restart).collect();
        assert_eq!(restarts[..7], [0, 1, 3, 7, 15, 31, 47], "{restarts:?}");
    }

    #[test]
    fn recovery_without_a_primary_move_restarts_after_the_threshold() {
        let mut r = KineRecovery::new(RecoveryPolicy { failures: 2, grace: Duration::from_secs(5) });
        let t0 = Instant::now();
        assert_eq!(r.observe(false, t0), Verdict::Waiting);
        assert_eq!(r.observe(false, t0 + Duration::from_secs(1)), Verdict::Restart);
    }
}
