//! A lab stand-in for K3s: `k3s server` as the agent runs it, served by the
//! real `kube-apiserver` (built from the `k8s.io/kubernetes` Go module by
//! `vm-tests/k3s-standin/build-kube-apiserver.sh`, installed by `just deps`).
//!
//! This is a test fixture, not product code. K3s itself cannot be downloaded on
//! every build host; the stand-in lets the agent's real K3s path (the rendered
//! command line and environment, the unit or the process supervisor,
//! `Type=notify` readiness, `/readyz` with the admin certificate from the
//! server TLS directory, the kubeconfig) run against a real Kubernetes API
//! server on the real datastore. It runs no kubelet, controllers or scheduler:
//! objects are stored and served, Pods are never started.
//!
//! What it does, in K3s's place:
//!
//! - reads the arguments the agent renders for `k3s server` (see
//!   [`ServerArgs::parse`]); flags it has no use for are ignored with a note on
//!   stderr;
//! - fetches the cluster's bootstrap material (two CAs and the service-account
//!   key) from the datastore, or creates it there if it is the first server
//!   ([`bootstrap`]), and writes K3s's files into `<data-dir>/server/tls`
//!   ([`tls`]);
//! - runs `kube-apiserver` with `--etcd-servers` at the datastore, the serving
//!   certificate, client-certificate and static-token authentication (the K3s
//!   token, user `system:admin` in `system:masters`), `Node,RBAC` authorization
//!   and the service-account flags ([`apiserver_args`]);
//! - once `/readyz` answers (checked with the agent's own
//!   [`geminik8s::k3s::ready`]), writes the kubeconfig (`--write-kubeconfig`)
//!   and sends `READY=1` to `NOTIFY_SOCKET` when there is one;
//! - forwards SIGTERM and SIGINT to the API server and exits with its status.
//!
//! ## Why the bootstrap material lives in the datastore
//!
//! Both nodes' API servers serve the same datastore, so they must trust the
//! same client CA (the admin kubeconfig works through the VIP whichever node
//! holds it), chain their serving certificates to the same server CA, and
//! verify each other's service-account tokens (the same signing key). Real K3s
//! stores this bootstrap data in the datastore, encrypted with a key derived
//! from the token, and the stand-in does the same: the first server creates
//! the record with an etcd create-if-absent transaction through Kine, the
//! other reads it. Deriving the keys from the token instead would need seeded
//! ECDSA or RSA key generation, which the crypto library at hand (ring) does
//! not offer, and would make anyone with the token able to mint keys without
//! datastore access.

pub mod bootstrap;
pub mod tls;

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context;
use geminik8s::k3s::{self, ClusterCredentials};
use geminik8s::services::notify::Notifier;

/// The variable that names the `kube-apiserver` binary (else it is looked up on `PATH`).
pub const APISERVER_ENV: &str = "GEMINIK8S_KUBE_APISERVER";
/// The Kubernetes version the stand-in is built and tested with (K3s v1.34.2+k3s1).
pub const KUBERNETES_VERSION: &str = "v1.34.2";
/// util-linux's `setpriv`, which runs the API server with a parent-death signal.
const SETPRIV: &str = "setpriv";
/// K3s's defaults.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/rancher/k3s";
pub const DEFAULT_KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";
pub const DEFAULT_SERVICE_CIDR: &str = "10.43.0.0/16";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// The static-token user that the K3s token authenticates as.
pub const TOKEN_USER: &str = "system:admin";

/// `k3s server`'s arguments, as far as the stand-in uses them.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerArgs {
    pub datastore_endpoint: String,
    pub token: String,
    pub node_name: Option<String>,
    pub node_ip: Option<IpAddr>,
    pub advertise_address: Option<IpAddr>,
    /// Extra names and addresses for the serving certificate (`--tls-san`).
    pub tls_sans: Vec<String>,
    pub data_dir: PathBuf,
    pub write_kubeconfig: PathBuf,
    /// `--write-kubeconfig-mode` (octal), else K3s's 0600.
    pub write_kubeconfig_mode: u32,
    pub bind_address: IpAddr,
    pub https_listen_port: u16,
    pub service_cidr: String,
    pub cluster_domain: String,
    /// Flags given but not used, for the note on stderr.
    pub ignored: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArgsError {
    #[error("the K3s stand-in runs only `k3s server`, not `{0}`")]
    Subcommand(String),
    #[error("`{flag}` needs a value")]
    MissingValue { flag: String },
    #[error("`{flag} {value}`: {reason}")]
    Invalid { flag: String, value: String, reason: String },
    #[error("no {what}: {hint}")]
    Missing { what: &'static str, hint: &'static str },
    #[error("reading the token file {path}: {reason}")]
    TokenFile { path: String, reason: String },
}

/// Flags that take a value, with their short forms.
const VALUE_FLAGS: &[(&str, &str)] = &[
    ("--datastore-endpoint", ""),
    ("--token", "-t"),
    ("--token-file", ""),
    ("--node-name", ""),
    ("--node-ip", "-i"),
    ("--advertise-address", ""),
    ("--tls-san", ""),
    ("--data-dir", "-d"),
    ("--write-kubeconfig", "-o"),
    ("--write-kubeconfig-mode", ""),
    ("--bind-address", ""),
    ("--https-listen-port", ""),
    ("--service-cidr", ""),
    ("--cluster-domain", ""),
];

impl ServerArgs {
    /// Parse `k3s server ARGS...` (`args` starts at `server`). `--flag value`
    /// and `--flag=value` both work; K3s's environment variables
    /// (`K3S_TOKEN`, `K3S_TOKEN_FILE`, `K3S_DATASTORE_ENDPOINT`) come from `env`.
    /// An unknown flag is recorded in [`ServerArgs::ignored`] and takes the
    /// next word as its value unless that word is a flag.
    pub fn parse(args: &[String], env: impl Fn(&str) -> Option<String>) -> Result<ServerArgs, ArgsError> {
        let (command, rest) = args
            .split_first()
            .ok_or(ArgsError::Missing { what: "subcommand", hint: "run `k3s server [flags]` as the agent does" })?;
        if command != "server" {
            return Err(ArgsError::Subcommand(command.clone()));
        }
        let mut values: Vec<(&'static str, String)> = Vec::new();
        let mut ignored = Vec::new();
        let mut words = rest.iter().peekable();
        while let Some(word) = words.next() {
            let (flag, inline) = match word.split_once('=') {
                Some((f, v)) if f.starts_with('-') => (f, Some(v.to_string())),
                _ => (word.as_str(), None),
            };
            let known = VALUE_FLAGS.iter().find(|(long, short)| flag == *long || (!short.is_empty() && flag == *short));
            match known {
                Some((long, _)) => {
                    let value = match inline {
                        Some(v) => v,
                        None => words.next().cloned().ok_or_else(|| ArgsError::MissingValue { flag: flag.into() })?,
                    };
                    values.push((long, value));
                }
                None => {
                    let mut note = word.clone();
                    if inline.is_none()
                        && let Some(next) = words.next_if(|w| !w.starts_with('-'))
                    {
                        note = format!("{word} {next}");
                    }
                    ignored.push(note);
                }
            }
        }
        let last = |flag: &str| values.iter().rev().find(|(f, _)| *f == flag).map(|(_, v)| v.clone());
        let all = |flag: &str| values.iter().filter(|(f, _)| *f == flag).map(|(_, v)| v.clone()).collect::<Vec<_>>();
        let ip = |flag: &'static str| -> Result<Option<IpAddr>, ArgsError> {
            last(flag)
                .map(|v| {
                    v.parse().map_err(|e: std::net::AddrParseError| ArgsError::Invalid {
                        flag: flag.into(),
                        value: v.clone(),
                        reason: e.to_string(),
                    })
                })
                .transpose()
        };

        let token = match last("--token").or_else(|| env("K3S_TOKEN")).filter(|t| !t.is_empty()) {
            Some(token) => token,
            None => match last("--token-file").or_else(|| env("K3S_TOKEN_FILE")) {
                Some(path) => std::fs::read_to_string(&path)
                    .map_err(|e| ArgsError::TokenFile { path: path.clone(), reason: e.to_string() })?
                    .trim()
                    .to_string(),
                None => String::new(),
            },
        };
        if token.is_empty() {
            return Err(ArgsError::Missing {
                what: "token",
                hint: "set K3S_TOKEN (the agent does, from k3s.token) or pass --token",
            });
        }
        let datastore_endpoint =
            last("--datastore-endpoint").or_else(|| env("K3S_DATASTORE_ENDPOINT")).ok_or(ArgsError::Missing {
                what: "datastore endpoint",
                hint: "pass --datastore-endpoint http://127.0.0.1:2379 (the local Kine)",
            })?;
        if !(datastore_endpoint.starts_with("http://") || datastore_endpoint.starts_with("https://")) {
            return Err(ArgsError::Invalid {
                flag: "--datastore-endpoint".into(),
                value: datastore_endpoint,
                reason: "the stand-in speaks only to an etcd endpoint (an external Kine at http://HOST:PORT)".into(),
            });
        }
        let mode_text = last("--write-kubeconfig-mode").unwrap_or_else(|| "0600".into());
        let write_kubeconfig_mode = u32::from_str_radix(&mode_text, 8).map_err(|e| ArgsError::Invalid {
            flag: "--write-kubeconfig-mode".into(),
            value: mode_text.clone(),
            reason: format!("not an octal mode: {e}"),
        })?;
        let port_text = last("--https-listen-port").unwrap_or_else(|| k3s::API_PORT.to_string());
        let https_listen_port = port_text.parse().map_err(|e: std::num::ParseIntError| ArgsError::Invalid {
            flag: "--https-listen-port".into(),
            value: port_text.clone(),
            reason: e.to_string(),
        })?;
        Ok(ServerArgs {
            datastore_endpoint,
            token,
            node_name: last("--node-name"),
            node_ip: ip("--node-ip")?,
            advertise_address: ip("--advertise-address")?,
            tls_sans: all("--tls-san"),
            data_dir: last("--data-dir").map(PathBuf::from).unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            write_kubeconfig: last("--write-kubeconfig")
                .map(PathBuf::from)
                .unwrap_or_else(|| DEFAULT_KUBECONFIG.into()),
            write_kubeconfig_mode,
            bind_address: ip("--bind-address")?.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            https_listen_port,
            service_cidr: last("--service-cidr").unwrap_or_else(|| DEFAULT_SERVICE_CIDR.into()),
            cluster_domain: last("--cluster-domain").unwrap_or_else(|| DEFAULT_CLUSTER_DOMAIN.into()),
            ignored,
        })
    }

    /// `<data-dir>/server/tls`, where K3s keeps its certificates.
    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("server/tls")
    }

    /// Where clients on this host reach the API server: loopback when it
    /// listens on every address (as K3s's own kubeconfig does), else the
    /// address it is bound to.
    pub fn local_url(&self) -> String {
        let host = if self.bind_address.is_unspecified() { IpAddr::from([127, 0, 0, 1]) } else { self.bind_address };
        match host {
            IpAddr::V4(ip) => format!("https://{ip}:{}", self.https_listen_port),
            IpAddr::V6(ip) => format!("https://[{ip}]:{}", self.https_listen_port),
        }
    }

    /// The service-account issuer K3s uses.
    pub fn issuer(&self) -> String {
        format!("https://kubernetes.default.svc.{}", self.cluster_domain)
    }
}

/// The `kube-apiserver` command line (without the program) for `args`, with
/// the files written by [`tls::write`] in `files`.
pub fn apiserver_args(args: &ServerArgs, files: &tls::Files) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    let mut out = vec![
        format!("--etcd-servers={}", args.datastore_endpoint),
        format!("--bind-address={}", args.bind_address),
        format!("--secure-port={}", args.https_listen_port),
        format!("--tls-cert-file={}", path(&files.serving_cert)),
        format!("--tls-private-key-file={}", path(&files.serving_key)),
        format!("--client-ca-file={}", path(&files.client_ca)),
        format!("--token-auth-file={}", path(&files.token_auth)),
        format!("--service-account-key-file={}", path(&files.service_account_public)),
        format!("--service-account-signing-key-file={}", path(&files.service_account_key)),
        format!("--service-account-issuer={}", args.issuer()),
        format!("--api-audiences={},k3s", args.issuer()),
        format!("--service-cluster-ip-range={}", args.service_cidr),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        "--anonymous-auth=false".into(),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
    ];
    // The `kubernetes` Endpoints may not hold a loopback address: on loopback
    // (the single-host tests) the API server picks the host's own address.
    if let Some(ip) = args.advertise_address.or(args.node_ip).filter(|ip| !ip.is_loopback()) {
        out.push(format!("--advertise-address={ip}"));
    }
    out
}

/// The K3s binary a lab runs: `GEMINIK8S_K3S_BINARY` when it names one,
/// else the stand-in when it is built and `kube-apiserver` is there.
pub fn lab_k3s() -> Option<PathBuf> {
    if let Some(real) = geminik8s::k3s::binary_from_env() {
        return Some(real);
    }
    let standin = crate::image::k3s_standin_binary()?;
    apiserver_binary().ok()?;
    std::fs::canonicalize(standin).ok()
}

/// The `kube-apiserver` to run: [`APISERVER_ENV`], else the one on `PATH`.
pub fn apiserver_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(APISERVER_ENV) {
        return Ok(PathBuf::from(path));
    }
    crate::skip::find_tool("kube-apiserver").with_context(|| {
        format!(
            "no kube-apiserver on PATH: build it with `just deps` \
             (vm-tests/k3s-standin/build-kube-apiserver.sh) or name it in {APISERVER_ENV}"
        )
    })
}

/// An exit code for `status`: the code, or 128 + the signal, as a shell reports it.
pub fn exit_code(status: ExitStatus) -> i32 {
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1)
}

/// Run `k3s server` (`argv` without the program name) until the API server
/// exits; returns its exit code.
pub async fn run(argv: &[String]) -> anyhow::Result<i32> {
    use tokio::signal::unix::{SignalKind, signal};

    let args = ServerArgs::parse(argv, |name| std::env::var(name).ok()).context("reading the k3s server arguments")?;
    for flag in &args.ignored {
        eprintln!("k3s-standin: ignoring `{flag}` (the stand-in runs the API server only)");
    }
    let apiserver = apiserver_binary()?;
    let material = bootstrap::fetch_or_create(&args.datastore_endpoint, &args.token).await?;
    let files = tls::write(&args, &material).context("writing the server certificates")?;
    // The API server runs in its own process group, so a stop signal sent to
    // the stand-in's group (the process supervisor does that) reaches it once,
    // forwarded: a second SIGTERM makes it exit at once with status 1. It dies
    // with the stand-in (`setpriv --pdeathsig`), so a SIGKILL leaves nothing.
    let mut child = tokio::process::Command::new(SETPRIV)
        .args(["--pdeathsig", "KILL", "--"])
        .arg(&apiserver)
        .args(apiserver_args(&args, &files))
        .stdin(std::process::Stdio::null())
        // The API server notifies systemd itself as soon as it serves, long
        // before it is ready: readiness is the stand-in's to tell.
        .env_remove("NOTIFY_SOCKET")
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} through {SETPRIV}", apiserver.display()))?;
    let pid = child.id().context("kube-apiserver exited at once")?;
    eprintln!(
        "k3s-standin: kube-apiserver (pid {pid}) on {} for node {}",
        args.local_url(),
        args.node_name.as_deref().unwrap_or("(unnamed)")
    );

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let notifier = Notifier::from_env();
    let mut ready = false;
    let mut checks = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.context("waiting for kube-apiserver")?;
                eprintln!("k3s-standin: kube-apiserver exited: {}", geminik8s::cmd::describe_status(status));
                return Ok(exit_code(status));
            }
            _ = term.recv() => forward(pid, nix::sys::signal::Signal::SIGTERM, notifier.as_ref()),
            _ = int.recv() => forward(pid, nix::sys::signal::Signal::SIGINT, notifier.as_ref()),
            _ = tick.tick(), if !ready => {
                if let Err(e) = check_ready(&args, &files.dir).await {
                    // Every 30 s: what the API server is waiting for.
                    if checks % 60 == 59 {
                        eprintln!("k3s-standin: API server not ready yet: {e:#}");
                    }
                    checks += 1;
                    continue;
                }
                ready = true;
                write_kubeconfig(&args, &files.dir).context("writing the kubeconfig")?;
                eprintln!("k3s-standin: API server ready; kubeconfig {}", args.write_kubeconfig.display());
                if let Some(n) = &notifier {
                    n.ready("kube-apiserver ready").context("sending READY=1 to NOTIFY_SOCKET")?;
                }
            }
        }
    }
}

fn forward(pid: u32, signal: nix::sys::signal::Signal, notifier: Option<&Notifier>) {
    eprintln!("k3s-standin: {signal}: stopping kube-apiserver");
    if let Some(n) = notifier
        && let Err(e) = n.stopping()
    {
        eprintln!("k3s-standin: sending STOPPING=1: {e}");
    }
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal) {
        eprintln!("k3s-standin: signalling kube-apiserver (pid {pid}): {e}");
    }
}

async fn check_ready(args: &ServerArgs, tls_dir: &Path) -> anyhow::Result<()> {
    let creds = ClusterCredentials::from_server_tls(tls_dir)?;
    k3s::ready(&args.local_url(), &creds, Duration::from_secs(2)).await?;
    Ok(())
}

/// K3s's kubeconfig for local use: the admin certificate, the API server on
/// this host, cluster `default`.
fn write_kubeconfig(args: &ServerArgs, tls_dir: &Path) -> anyhow::Result<()> {
    let creds = ClusterCredentials::from_server_tls(tls_dir)?;
    let text = k3s::render_kubeconfig("default", &args.local_url(), &creds);
    k3s::write_kubeconfig(&args.write_kubeconfig, &text)?;
    let path = &args.write_kubeconfig;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(args.write_kubeconfig_mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_string).collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn parses_what_the_agent_renders() {
        let argv = words(
            "server --datastore-endpoint http://127.0.0.1:12379 --node-name edge-a --node-ip 10.0.0.11 \
             --advertise-address 10.0.0.11 --tls-san 10.0.0.100 --tls-san 10.0.0.11 --data-dir /d \
             --write-kubeconfig /c/k3s.yaml --disable=traefik --disable servicelb --disable-agent \
             --write-kubeconfig-mode=0644",
        );
        let env = |name: &str| (name == "K3S_TOKEN").then(|| "s3cret".to_string());
        let args = ServerArgs::parse(&argv, env).unwrap();
        assert_eq!(args.datastore_endpoint, "http://127.0.0.1:12379");
        assert_eq!(args.token, "s3cret");
        assert_eq!(args.node_name.as_deref(), Some("edge-a"));
        assert_eq!(args.node_ip, Some("10.0.0.11".parse().unwrap()));
        assert_eq!(args.tls_sans, ["10.0.0.100", "10.0.0.11"]);
        assert_eq!(args.tls_dir(), Path::new("/d/server/tls"));
        assert_eq!(args.write_kubeconfig, Path::new("/c/k3s.yaml"));
        assert_eq!(args.write_kubeconfig_mode, 0o644);
        assert_eq!(args.ignored, ["--disable=traefik", "--disable servicelb", "--disable-agent"]);
        assert_eq!(args.local_url(), "https://127.0.0.1:6443");
        let files = tls::Files::in_dir(Path::new("/t"), Path::new("/c"));
        assert!(apiserver_args(&args, &files).contains(&"--advertise-address=10.0.0.11".to_string()));
        let loopback = ServerArgs { node_ip: Some("127.0.0.2".parse().unwrap()), advertise_address: None, ..args };
        assert!(!apiserver_args(&loopback, &files).iter().any(|a| a.starts_with("--advertise-address")));
    }

    #[test]
    fn flags_win_over_the_environment_and_defaults_are_k3s_defaults() {
        let env = |name: &str| match name {
            "K3S_TOKEN" => Some("from-env".to_string()),
            "K3S_DATASTORE_ENDPOINT" => Some("http://127.0.0.1:2379".to_string()),
            _ => None,
        };
        let args = ServerArgs::parse(&words("server -t from-flag"), env).unwrap();
        assert_eq!(args.token, "from-flag");
        assert_eq!(args.data_dir, Path::new(DEFAULT_DATA_DIR));
        assert_eq!(args.write_kubeconfig, Path::new(DEFAULT_KUBECONFIG));
        assert_eq!(args.write_kubeconfig_mode, 0o600);
        assert_eq!(args.issuer(), "https://kubernetes.default.svc.cluster.local");
        let bound =
            ServerArgs::parse(&words("server --bind-address 127.0.0.2 --https-listen-port 16443"), env).unwrap();
        assert_eq!(bound.local_url(), "https://127.0.0.2:16443");
    }

    #[test]
    fn errors_say_what_is_missing() {
        let err = ServerArgs::parse(&words("agent"), no_env).unwrap_err();
        assert_eq!(err, ArgsError::Subcommand("agent".into()));
        let err = ServerArgs::parse(&words("server --datastore-endpoint http://x:1"), no_env).unwrap_err();
        assert!(err.to_string().contains("K3S_TOKEN"), "{err}");
        let err = ServerArgs::parse(&words("server --token t"), no_env).unwrap_err();
        assert!(err.to_string().contains("--datastore-endpoint"), "{err}");
        let err = ServerArgs::parse(&words("server --token t --datastore-endpoint postgres://db/kine"), no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("external Kine"), "{err}");
        let err = ServerArgs::parse(&words("server --token"), no_env).unwrap_err();
        assert_eq!(err, ArgsError::MissingValue { flag: "--token".into() });
    }

    #[test]
    fn apiserver_flags_point_at_the_datastore_and_the_written_files() {
        let args = ServerArgs::parse(
            &words("server --token t --datastore-endpoint http://127.0.0.1:2379 --node-ip 10.0.0.11"),
            no_env,
        )
        .unwrap();
        let files = tls::Files::in_dir(Path::new("/d/server/tls"), Path::new("/d/server/cred"));
        let flags = apiserver_args(&args, &files);
        for expected in [
            "--etcd-servers=http://127.0.0.1:2379",
            "--secure-port=6443",
            "--bind-address=0.0.0.0",
            "--advertise-address=10.0.0.11",
            "--client-ca-file=/d/server/tls/client-ca.crt",
            "--tls-cert-file=/d/server/tls/serving-kube-apiserver.crt",
            "--token-auth-file=/d/server/cred/token-auth.csv",
            "--service-account-signing-key-file=/d/server/tls/service.key",
            "--service-account-key-file=/d/server/tls/service.pub",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC",
            "--anonymous-auth=false",
        ] {
            assert!(flags.iter().any(|f| f == expected), "{expected} missing from {flags:?}");
        }
    }
}
