//! K3s: the `k3s server` command line, a kubeconfig that points at the VIP, and
//! readiness through the API server's `/readyz`.
//!
//! Each K3s server talks to its local Kine (`--datastore-endpoint`); both serve
//! the API, and clients reach whichever holds the VIP. The cluster token goes in
//! `K3S_TOKEN`, which K3s reads itself, so it stays off the command line.
//!
//! K3s keeps its state in `k3s.data_dir` (server certificates in
//! [`K3sSettings::tls_dir`]) and writes its kubeconfig into `k3s.config_dir`,
//! where the agent also writes the one for the VIP
//! ([`K3sSettings::kubeconfig_path`]): two nodes sharing a filesystem (the
//! network-namespace lab) each get their own.
//!
//! K3s cannot be obtained on every build host: the tests run this path
//! against a binary named by `GEMINIK8S_K3S_BINARY` ([`binary_from_env`]),
//! a real K3s or the lab's stand-in (`k3s-standin` in `vm-tests`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::config::GeminiConfig;
use crate::services::{RestartPolicy, ServiceSpec};

pub const K3S_BINARY: &str = "/usr/local/bin/k3s";
/// The service name (`geminik8s-k3s.service` under systemd).
pub const SERVICE: &str = "k3s";
pub const API_PORT: u16 = 6443;
/// The kubeconfig K3s writes for local use (`https://127.0.0.1:6443`), in `k3s.config_dir`.
pub const LOCAL_KUBECONFIG: &str = "k3s.yaml";
/// The kubeconfig the agent writes for the VIP, in `k3s.config_dir`.
pub const VIP_KUBECONFIG: &str = "geminik8s.yaml";
/// The variable that points the tests and the lab at a K3s binary.
pub const BINARY_ENV: &str = "GEMINIK8S_K3S_BINARY";

#[derive(Debug, thiserror::Error)]
pub enum K3sError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what} PEM: {source}")]
    Pem {
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("building the HTTPS client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("the API server at {url} is unreachable: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the API server at {url} is not ready (HTTP {status}): {body}")]
    NotReady { url: String, status: u16, body: String },
    #[error("the API server refused DELETE {url} (HTTP {status}): {body}")]
    Refused { url: String, status: u16, body: String },
}

/// Everything `k3s server`'s command line is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct K3sSettings {
    pub binary: PathBuf,
    pub node_name: String,
    pub node_ip: IpAddr,
    pub vip: IpAddr,
    pub token: String,
    /// The local Kine's etcd endpoint (`http://127.0.0.1:2379`).
    pub datastore_endpoint: String,
    /// K3s's `--data-dir`.
    pub data_dir: PathBuf,
    /// Where the kubeconfigs go (K3s's own and the agent's).
    pub config_dir: PathBuf,
    /// More `k3s server` arguments from the cloud-config, split at whitespace.
    pub extra_args: Vec<String>,
    pub log_file: Option<PathBuf>,
}

impl K3sSettings {
    /// The settings for this node; the supervisor writes K3s's output to
    /// `log_dir/k3s.log`.
    pub fn from_config(config: &GeminiConfig, log_dir: &Path) -> Self {
        K3sSettings {
            binary: binary_from_env().unwrap_or_else(|| PathBuf::from(K3S_BINARY)),
            node_name: config.node.name.clone(),
            node_ip: config.node.ip,
            vip: config.cluster.vip,
            token: config.k3s.token.clone(),
            datastore_endpoint: crate::kine::etcd_endpoint(config.kine.listen),
            data_dir: config.k3s.data_dir.clone(),
            config_dir: config.k3s.config_dir.clone(),
            extra_args: config.k3s.extra_args.clone(),
            log_file: Some(log_dir.join("k3s.log")),
        }
    }

    /// K3s's server certificates: the CA the API server's certificate is
    /// signed by (`server-ca.crt`) and the admin client certificate
    /// (`client-admin.crt`, `client-admin.key`), see [`ClusterCredentials`].
    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("server/tls")
    }

    /// The kubeconfig the agent writes, pointing at the VIP ([`render_kubeconfig`]).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.config_dir.join(VIP_KUBECONFIG)
    }

    /// The kubeconfig K3s writes itself (`--write-kubeconfig`), for the local API server.
    pub fn local_kubeconfig_path(&self) -> PathBuf {
        self.config_dir.join(LOCAL_KUBECONFIG)
    }

    /// Whether the K3s binary is there. Where it is not (build hosts, the
    /// network-namespace lab without `GEMINIK8S_K3S_BINARY`), the agent runs
    /// PostgreSQL and Kine only.
    pub fn available(&self) -> bool {
        self.binary.is_file()
    }

    /// The fixed shape of the command line (the unit file's `ExecStart=`);
    /// values come from the environment ([`K3sSettings::spec`]).
    pub fn argv(&self) -> Vec<String> {
        [
            &self.binary.display().to_string(),
            "server",
            "--datastore-endpoint",
            "${GEMINIK8S_DATASTORE_ENDPOINT}",
            "--node-name",
            "${GEMINIK8S_NODE_NAME}",
            "--node-ip",
            "${GEMINIK8S_NODE_IP}",
            "--advertise-address",
            "${GEMINIK8S_NODE_IP}",
            "--tls-san",
            "${GEMINIK8S_VIP}",
            "--tls-san",
            "${GEMINIK8S_NODE_IP}",
            "--data-dir",
            "${GEMINIK8S_K3S_DATA_DIR}",
            "--write-kubeconfig",
            "${GEMINIK8S_K3S_KUBECONFIG}",
            "$GEMINIK8S_EXTRA_ARGS",
        ]
        .into_iter()
        .map(str::to_string)
        .collect()
    }

    pub fn spec(&self) -> ServiceSpec {
        let mut spec = ServiceSpec::new(SERVICE, self.argv());
        spec.env.insert("GEMINIK8S_DATASTORE_ENDPOINT".into(), self.datastore_endpoint.clone());
        spec.env.insert("GEMINIK8S_NODE_NAME".into(), self.node_name.clone());
        spec.env.insert("GEMINIK8S_NODE_IP".into(), self.node_ip.to_string());
        spec.env.insert("GEMINIK8S_VIP".into(), self.vip.to_string());
        spec.env.insert("GEMINIK8S_K3S_DATA_DIR".into(), self.data_dir.display().to_string());
        spec.env.insert("GEMINIK8S_K3S_KUBECONFIG".into(), self.local_kubeconfig_path().display().to_string());
        spec.env.insert("GEMINIK8S_EXTRA_ARGS".into(), self.extra_args.join(" "));
        spec.env.insert("K3S_TOKEN".into(), self.token.clone());
        spec.log_file = self.log_file.clone();
        spec.stop_grace = Duration::from_secs(30);
        spec.restart = RestartPolicy { backoff: Duration::from_secs(5), ..RestartPolicy::default() };
        spec
    }
}

/// `https://VIP:6443`.
pub fn api_url(host: IpAddr) -> String {
    match host {
        IpAddr::V4(ip) => format!("https://{ip}:{API_PORT}"),
        IpAddr::V6(ip) => format!("https://[{ip}]:{API_PORT}"),
    }
}

/// The PEM material a kubeconfig carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterCredentials {
    pub ca_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl ClusterCredentials {
    /// Read K3s's admin credentials from its server TLS directory
    /// (`server-ca.crt`, `client-admin.crt`, `client-admin.key`).
    pub fn from_server_tls(dir: &Path) -> Result<Self, K3sError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| K3sError::Read { path, source })
        };
        Ok(ClusterCredentials {
            ca_pem: read("server-ca.crt")?,
            client_cert_pem: read("client-admin.crt")?,
            client_key_pem: read("client-admin.key")?,
        })
    }
}

/// A kubeconfig for `cluster` that reaches the API at `server` (see [`api_url`]).
pub fn render_kubeconfig(cluster: &str, server: &str, creds: &ClusterCredentials) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: {cluster}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n\
         - name: {cluster}-admin\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\n\
         contexts:\n\
         - name: {cluster}\n  context:\n    cluster: {cluster}\n    user: {cluster}-admin\n\
         current-context: {cluster}\n",
        cluster = yaml_quote(cluster),
        ca = STANDARD.encode(creds.ca_pem.as_bytes()),
        cert = STANDARD.encode(creds.client_cert_pem.as_bytes()),
        key = STANDARD.encode(creds.client_key_pem.as_bytes()),
    )
}

fn yaml_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// Write a kubeconfig (see [`render_kubeconfig`]) readable by root only.
pub fn write_kubeconfig(path: &Path, kubeconfig: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::fsutil::write_atomic(path, kubeconfig.as_bytes(), 0o600)
}

/// The readiness K3s is judged by: `/readyz` without its datastore checks.
/// A failing K3s gets restarted, and restarting an API server does nothing
/// for a datastore that moved or paused (a switchover, a failover); it only
/// adds minutes of start-up to the pause. The datastore path has its own
/// checks (Kine, PostgreSQL).
pub const READYZ: &str = "/readyz?exclude=etcd&exclude=etcd-readiness";

/// GET `{base}` [`READYZ`], trusting only the cluster CA and authenticating
/// with the admin client certificate (K3s refuses anonymous requests). `Ok`
/// when the API server answers 200.
pub async fn ready(base: &str, creds: &ClusterCredentials, timeout: Duration) -> Result<(), K3sError> {
    let client = admin_client(creds, timeout)?;
    let url = format!("{}{READYZ}", base.trim_end_matches('/'));
    let response =
        client.get(&url).send().await.map_err(|source| K3sError::Unreachable { url: url.clone(), source })?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_else(|e| format!("(body unreadable: {e})"));
    Err(K3sError::NotReady { url, status: status.as_u16(), body: crate::cmd::tail(&body, 10) })
}

/// An HTTPS client for the API server: trusts only the cluster CA,
/// authenticates with the admin client certificate.
fn admin_client(creds: &ClusterCredentials, timeout: Duration) -> Result<reqwest::Client, K3sError> {
    crate::tls::install_crypto_provider();
    let ca = reqwest::Certificate::from_pem(creds.ca_pem.as_bytes())
        .map_err(|source| K3sError::Pem { what: "CA", source })?;
    let identity =
        reqwest::Identity::from_pem(format!("{}\n{}", creds.client_cert_pem, creds.client_key_pem).as_bytes())
            .map_err(|source| K3sError::Pem { what: "client certificate and key", source })?;
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .identity(identity)
        .timeout(timeout)
        .build()
        .map_err(K3sError::Client)
}

/// Forget the Kubernetes identity of `node`, replaced by new hardware under
/// the same name: its Node object and the `<node>.node-password.k3s` secret
/// (K3s refuses a new machine under a name whose password it holds). What
/// was there to delete is returned; what was not is no error.
pub async fn forget_node(
    base: &str,
    creds: &ClusterCredentials,
    node: &str,
    timeout: Duration,
) -> Result<Vec<String>, K3sError> {
    let client = admin_client(creds, timeout)?;
    let base = base.trim_end_matches('/');
    let mut removed = Vec::new();
    for (what, path) in [
        (format!("node {node}"), format!("/api/v1/nodes/{node}")),
        (
            format!("secret kube-system/{node}.node-password.k3s"),
            format!("/api/v1/namespaces/kube-system/secrets/{node}.node-password.k3s"),
        ),
    ] {
        let url = format!("{base}{path}");
        let response =
            client.delete(&url).send().await.map_err(|source| K3sError::Unreachable { url: url.clone(), source })?;
        match response.status().as_u16() {
            200 | 202 => removed.push(what),
            404 => {}
            status => {
                let body = response.text().await.unwrap_or_default();
                return Err(K3sError::Refused { url, status, body: crate::cmd::tail(&body, 5) });
            }
        }
    }
    Ok(removed)
}

/// The K3s binary named by `GEMINIK8S_K3S_BINARY`, when it is set and exists.
/// [`K3sSettings::from_config`] prefers it to the image's binary (the unit file
/// under systemd always runs the image's).
pub fn binary_from_env() -> Option<PathBuf> {
    std::env::var_os(BINARY_ENV).map(PathBuf::from).filter(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> K3sSettings {
        K3sSettings {
            binary: PathBuf::from(K3S_BINARY),
            node_name: "edge-a".into(),
            node_ip: "10.0.0.11".parse().unwrap(),
            vip: "10.0.0.100".parse().unwrap(),
            token: "s3cret".into(),
            datastore_endpoint: "http://127.0.0.1:2379".into(),
            data_dir: PathBuf::from("/var/lib/rancher/k3s"),
            config_dir: PathBuf::from("/etc/rancher/k3s"),
            extra_args: vec!["--disable=traefik".into(), "--write-kubeconfig-mode=0600".into()],
            log_file: None,
        }
    }

    fn config() -> GeminiConfig {
        crate::config::fixture::services()
    }

    #[test]
    fn settings_from_config_use_the_local_kine_and_the_vip() {
        let spec = K3sSettings::from_config(&config(), Path::new("/logs")).spec();
        let argv = spec.expanded_argv().unwrap();
        assert_eq!(argv[2..4], ["--datastore-endpoint", "http://127.0.0.1:12379"]);
        assert_eq!(argv[10..14], ["--tls-san", "10.77.0.10", "--tls-san", "10.77.0.11"]);
        assert_eq!(
            argv[14..],
            [
                "--data-dir",
                "/var/lib/rancher/k3s",
                "--write-kubeconfig",
                "/etc/rancher/k3s/k3s.yaml",
                "--disable=traefik"
            ]
        );
        assert_eq!(spec.env["K3S_TOKEN"], "k3s-token");
        assert_eq!(spec.log_file.as_deref(), Some(Path::new("/logs/k3s.log")));
    }

    #[test]
    fn paths_follow_the_data_and_config_dirs() {
        let default = K3sSettings::from_config(&config(), Path::new("/logs"));
        assert_eq!(default.tls_dir(), Path::new("/var/lib/rancher/k3s/server/tls"));
        assert_eq!(default.kubeconfig_path(), Path::new("/etc/rancher/k3s/geminik8s.yaml"));
        let lab = crate::config::fixture::config(serde_json::json!({
            "k3s": {"token": "k3s-token", "data_dir": "/run/lab/a/k3s", "config_dir": "/run/lab/a/etc"},
        }));
        let settings = K3sSettings::from_config(&lab, Path::new("/logs"));
        assert_eq!(settings.tls_dir(), Path::new("/run/lab/a/k3s/server/tls"));
        assert_eq!(settings.kubeconfig_path(), Path::new("/run/lab/a/etc/geminik8s.yaml"));
        let argv = settings.spec().expanded_argv().unwrap();
        assert_eq!(argv[14..18], ["--data-dir", "/run/lab/a/k3s", "--write-kubeconfig", "/run/lab/a/etc/k3s.yaml"]);
    }

    #[test]
    fn a_kine_on_every_address_is_reached_on_loopback() {
        let open = crate::config::fixture::config(serde_json::json!({
            "k3s": {"token": "k3s-token"}, "kine": {"listen": "0.0.0.0:2379"},
        }));
        assert_eq!(K3sSettings::from_config(&open, Path::new("/logs")).datastore_endpoint, "http://127.0.0.1:2379");
    }

    #[test]
    fn server_arguments() {
        let spec = settings().spec();
        assert_eq!(spec.unit(), "geminik8s-k3s.service");
        assert_eq!(
            spec.expanded_argv().unwrap(),
            [
                K3S_BINARY,
                "server",
                "--datastore-endpoint",
                "http://127.0.0.1:2379",
                "--node-name",
                "edge-a",
                "--node-ip",
                "10.0.0.11",
                "--advertise-address",
                "10.0.0.11",
                "--tls-san",
                "10.0.0.100",
                "--tls-san",
                "10.0.0.11",
                "--data-dir",
                "/var/lib/rancher/k3s",
                "--write-kubeconfig",
                "/etc/rancher/k3s/k3s.yaml",
                "--disable=traefik",
                "--write-kubeconfig-mode=0600",
            ]
        );
        assert_eq!(spec.env["K3S_TOKEN"], "s3cret");
        assert!(!spec.expanded_argv().unwrap().iter().any(|a| a.contains("s3cret")));
    }

    #[test]
    fn no_extra_args_adds_no_words() {
        let mut s = settings();
        s.extra_args.clear();
        assert_eq!(s.spec().expanded_argv().unwrap().last().unwrap(), "/etc/rancher/k3s/k3s.yaml");
    }

    #[test]
    fn api_url_brackets_ipv6() {
        assert_eq!(api_url("10.0.0.100".parse().unwrap()), "https://10.0.0.100:6443");
        assert_eq!(api_url("fd00::1".parse().unwrap()), "https://[fd00::1]:6443");
    }

    #[test]
    fn kubeconfig_points_at_the_vip() {
        let creds =
            ClusterCredentials { ca_pem: "CA".into(), client_cert_pem: "CERT".into(), client_key_pem: "KEY".into() };
        let text = render_kubeconfig("edge", &api_url("10.0.0.100".parse().unwrap()), &creds);
        assert_eq!(
            text,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: edge\n  cluster:\n    server: https://10.0.0.100:6443\n    \
             certificate-authority-data: Q0E=\nusers:\n- name: edge-admin\n  user:\n    client-certificate-data: Q0VSVA==\n    \
             client-key-data: S0VZ\ncontexts:\n- name: edge\n  context:\n    cluster: edge\n    user: edge-admin\n\
             current-context: edge\n"
        );
    }

    #[test]
    fn kubeconfig_is_written_for_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rancher/k3s/vip.yaml");
        write_kubeconfig(&path, "apiVersion: v1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "apiVersion: v1\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn credentials_are_read_from_the_server_tls_dir() {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in [("server-ca.crt", "ca"), ("client-admin.crt", "cert"), ("client-admin.key", "key")] {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        let creds = ClusterCredentials::from_server_tls(dir.path()).unwrap();
        assert_eq!((creds.ca_pem.as_str(), creds.client_key_pem.as_str()), ("ca", "key"));
        std::fs::remove_file(dir.path().join("client-admin.key")).unwrap();
        let err = ClusterCredentials::from_server_tls(dir.path()).unwrap_err().to_string();
        assert!(err.contains("client-admin.key"), "{err}");
    }

    /// A one-connection-at-a-time HTTPS server that requires a client
    /// certificate from `ca` and answers every request with `status` and `body`.
    fn https_server(pki: &TestPki, status: &'static str, body: &'static str) -> std::net::SocketAddr {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::io::{Read, Write};
        use std::sync::Arc;

        crate::tls::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(pki.ca_cert.as_bytes()).unwrap()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().unwrap();
        let certs = vec![CertificateDer::from_pem_slice(pki.server.cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(pki.server.key.as_bytes()).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder().with_client_cert_verifier(verifier).with_single_cert(certs, key).unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                if request.starts_with(format!("GET {READYZ} ").as_bytes()) {
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    if tls.write_all(response.as_bytes()).is_ok() {
                        tls.conn.send_close_notify();
                        tls.flush().ok();
                    }
                }
            }
        });
        addr
    }

    fn creds(pki: &TestPki) -> ClusterCredentials {
        ClusterCredentials {
            ca_pem: pki.ca_cert.clone(),
            client_cert_pem: pki.client.cert.clone(),
            client_key_pem: pki.client.key.clone(),
        }
    }

    /// A CA with a server certificate for 127.0.0.1 and a client certificate,
    /// as K3s's `server-ca` and `client-admin` are.
    struct TestPki {
        ca_cert: String,
        server: CertKey,
        client: CertKey,
    }

    struct CertKey {
        cert: String,
        key: String,
    }

    fn test_pki() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = sans;
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).unwrap();
            CertKey { cert: cert.pem(), key: key.serialize_pem() }
        };
        TestPki {
            server: leaf(vec![SanType::IpAddress("127.0.0.1".parse().unwrap())], ExtendedKeyUsagePurpose::ServerAuth),
            client: leaf(vec![], ExtendedKeyUsagePurpose::ClientAuth),
            ca_cert: ca_cert.pem(),
        }
    }

    #[tokio::test]
    async fn readyz_trusts_the_cluster_ca_and_presents_the_client_certificate() {
        let pki = test_pki();
        let addr = https_server(&pki, "200 OK", "ok");
        ready(&format!("https://{addr}"), &creds(&pki), Duration::from_secs(10)).await.unwrap();
    }

    #[tokio::test]
    async fn readyz_failure_reports_status_and_body() {
        let pki = test_pki();
        let addr = https_server(&pki, "500 Internal Server Error", "[-]etcd failed: reason withheld");
        let err = ready(&format!("https://{addr}"), &creds(&pki), Duration::from_secs(10)).await.unwrap_err();
        assert!(
            matches!(&err, K3sError::NotReady { status: 500, body, .. } if body.contains("[-]etcd failed")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn readyz_refuses_a_server_from_another_ca() {
        let pki = test_pki();
        let addr = https_server(&pki, "200 OK", "ok");
        let other = test_pki();
        let mut wrong = creds(&other);
        wrong.client_cert_pem = pki.client.cert.clone();
        wrong.client_key_pem = pki.client.key.clone();
        let err = ready(&format!("https://{addr}"), &wrong, Duration::from_secs(10)).await.unwrap_err();
        assert!(matches!(err, K3sError::Unreachable { .. }), "{err}");
    }
}
