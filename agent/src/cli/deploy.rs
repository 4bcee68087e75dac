//! `gemin_k8s deploy`: from two freshly booted, unconfigured nodes (the
//! generic image, waiting for enrolment: see [`crate::enrol`]) to a cluster.
//!
//! For each node of `cluster.yaml` in `--config-dir`: ask its enrolment
//! endpoint for its facts and its proof of the site token (checked against
//! the certificate this connection saw, which is then pinned), check them
//! (preflight), send the node its cloud-config, then follow the cluster
//! forming through the agents' API until one node leads and the other
//! streams synchronously from it. A node that already runs this cluster's
//! configuration is left as it is, so running `deploy` again is harmless.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;

use super::GlobalArgs;
use crate::clusterfile::{self, ClusterFile};
use crate::enrol::{self, Facts};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The cluster directory written by `gemin_k8s init` (cluster.yaml, the node files, pki/).
    #[arg(long, value_name = "DIR")]
    pub config_dir: PathBuf,
    /// File holding the site enrolment token (its first line), as the nodes' image carries it.
    #[arg(long, value_name = "FILE", env = "GEMINIK8S_ENROLMENT_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Port of the nodes' enrolment endpoint.
    #[arg(long, default_value_t = enrol::DEFAULT_PORT, value_name = "PORT")]
    pub port: u16,
    /// How long the whole deployment may take, the cluster forming included.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Send the configurations without the checks (reachability and the token are still needed).
    #[arg(long)]
    pub skip_preflight: bool,
    /// The largest clock difference between this machine and a node that preflight accepts.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub max_clock_offset: Duration,
    /// The node that starts the cluster (creates the datastore) [default: cluster.yaml's
    /// `bootstrap_leader`]; both nodes' files are sent with it.
    #[arg(long, value_name = "NODE")]
    pub bootstrap_leader: Option<String>,
    /// Send both nodes their files at once rather than one after the other.
    #[arg(long)]
    pub parallel: bool,
    /// Print each step of each node while the cluster forms (otherwise only the result).
    #[arg(long)]
    pub watch: bool,
    /// Release a node that runs another cluster (or another node of this one) and was configured
    /// by enrolment, then deploy it: its agent stops (a leader hands over first), its datastore and
    /// Kubernetes stop, its configuration and data are set aside on it (renamed, never deleted), and
    /// it waits for enrolment again. A node configured from its boot media must be reinstalled.
    #[arg(long)]
    pub force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `deploy` found and did on one node.
#[derive(Debug, Serialize)]
struct NodeReport {
    name: String,
    ip: IpAddr,
    /// `unconfigured`, `enrolled` (took this configuration, starting) or
    /// `configured` (already runs this cluster).
    found: &'static str,
    sent: bool,
    /// What `--force` released on it first: node and cluster, and the state it was in.
    #[serde(skip_serializing_if = "Option::is_none")]
    released: Option<enrol::ReleaseAnswer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clock_offset_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_version: Option<String>,
    /// Size and free space of the file system the datastore goes on.
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_total_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_free_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Report {
    cluster: String,
    nodes: Vec<NodeReport>,
    leader: String,
    follower: String,
    elapsed_seconds: f64,
}

/// A server certificate verifier that accepts the first certificate it
/// sees and records its fingerprint; once [`Pinning::pin`] is called, only
/// that certificate. The handshake signatures are verified as usual.
#[derive(Debug)]
struct Pinning {
    seen: Mutex<Option<String>>,
    pinned: Mutex<Option<String>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Pinning {
    fn seen(&self) -> Option<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn pin(&self, fingerprint: &str) {
        *self.pinned.lock().unwrap_or_else(|p| p.into_inner()) = Some(fingerprint.to_string());
    }
}

impl ServerCertVerifier for Pinning {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = enrol::fingerprint(end_entity.as_ref());
        if let Some(pinned) = self.pinned.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
            && *pinned != fp
        {
            return Err(rustls::Error::General(format!("the node's certificate changed: SHA256:{fp}")));
        }
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// One node's enrolment endpoint.
pub(super) struct Endpoint {
    name: String,
    ip: IpAddr,
    url: String,
    release_url: String,
    http: reqwest::Client,
    verifier: Arc<Pinning>,
    token: String,
}

/// What a node's enrolment endpoint said, or that none answers.
pub(super) enum Found {
    Waiting(Box<Facts>),
    /// Nothing listens on the enrolment port (a configured node, or no node).
    NoEndpoint(String),
}

impl Endpoint {
    pub(super) fn new(name: &str, ip: IpAddr, port: u16, token: &str) -> anyhow::Result<Endpoint> {
        crate::tls::install_crypto_provider();
        let provider = rustls::crypto::CryptoProvider::get_default().cloned().context("no TLS crypto provider")?;
        let verifier = Arc::new(Pinning { seen: Mutex::new(None), pinned: Mutex::new(None), provider });
        let mut config = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("the enrolment HTTP client")?;
        let base = format!("https://{}", SocketAddr::new(ip, port));
        let (url, release_url) = (format!("{base}{}", enrol::PATH), format!("{base}{}", enrol::RELEASE_PATH));
        Ok(Endpoint { name: name.into(), ip, url, release_url, http, verifier, token: token.into() })
    }

    /// The node's facts, its proof checked against the certificate seen,
    /// which is pinned from then on.
    pub(super) async fn facts(&self) -> anyhow::Result<Found> {
        let nonce = crate::secrets::generate(32);
        // The token itself goes only over a certificate proven below.
        let proof = enrol::operator_proof(&self.token, &nonce);
        let sent = self
            .http
            .get(format!("{}?nonce={nonce}", self.url))
            .header(reqwest::header::AUTHORIZATION, format!("Enrolment {proof}"))
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Ok(Found::NoEndpoint(format!("{e}"))),
            Err(e) => bail!("asking {} at {} for its enrolment facts: {e}", self.name, self.url),
        };
        match response.status() {
            reqwest::StatusCode::OK => {}
            reqwest::StatusCode::UNAUTHORIZED => bail!(
                "{} at {} refuses the enrolment token: the token file does not hold the token its image was built \
                 with (or given on its boot media)",
                self.name,
                self.ip
            ),
            status => bail!("{} at {} answered {status}: {}", self.name, self.url, response.text().await?),
        }
        let facts: Facts = response.json().await.with_context(|| format!("reading {}'s enrolment facts", self.name))?;
        let seen = self.verifier.seen().context("no certificate was seen")?;
        if facts.fingerprint != seen || facts.proof != enrol::proof(&self.token, &nonce, &seen) {
            bail!(
                "{} at {} did not prove that it knows the enrolment token for the certificate this machine saw \
                 (SHA256:{seen}); another host may be answering for it. Nothing was sent",
                self.name,
                self.ip
            );
        }
        self.verifier.pin(&seen);
        Ok(Found::Waiting(Box::new(facts)))
    }

    /// Send the configuration, with the token, over the pinned certificate.
    pub(super) async fn send(&self, config: String) -> anyhow::Result<()> {
        let request = self.http.post(&self.url).body(config);
        self.call(request, "its configuration").await.map(drop)
    }

    /// Ask a node that runs `running` to give it up (`--force`), with the
    /// token, over the pinned certificate.
    async fn release(&self, running: &enrol::Enrolled) -> anyhow::Result<enrol::ReleaseAnswer> {
        let request = self.http.post(&self.release_url).json(running);
        let answer = self.call(request, "the release of what it runs").await?;
        answer.json().await.with_context(|| format!("reading {}'s answer to the release", self.name))
    }

    /// `request` with the token, once a proven certificate is pinned; a
    /// refusal is an error saying why.
    async fn call(&self, request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<reqwest::Response> {
        anyhow::ensure!(
            self.verifier.pinned.lock().unwrap_or_else(|p| p.into_inner()).is_some(),
            "{}: no proven certificate to send {what} over",
            self.name
        );
        let response =
            request.bearer_auth(&self.token).send().await.with_context(|| format!("sending {} {what}", self.name))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let error = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(body);
            bail!("{} refused {what} ({status}): {error}", self.name);
        }
        Ok(response)
    }
}

/// The site enrolment token: the first line of `file`.
pub(super) fn read_token(file: &std::path::Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(file)
        .with_context(|| format!("reading the enrolment token from {}", file.display()))?
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}

pub async fn run(a: Args, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let deadline = started + a.timeout;
    let path = a.config_dir.join(clusterfile::FILE_NAME);
    let cluster = ClusterFile::load(&path)?;
    let token = read_token(&a.token_file)?;
    let say = |line: String| {
        if !a.json && !global.quiet {
            eprintln!("{line}");
        }
    };
    if let Some(leader) = &a.bootstrap_leader
        && !cluster.nodes.iter().any(|n| n.member.name == *leader)
    {
        let names: Vec<&str> = cluster.nodes.iter().map(|n| n.member.name.as_str()).collect();
        bail!("--bootstrap-leader {leader}: cluster {} has the nodes {}", cluster.name, names.join(" and "));
    }
    let (_, clients) = super::status::node_clients(&path, Duration::from_secs(5))?;

    // Preflight: every node answers, with the facts it gives.
    let mut plan = Vec::new();
    for n in &cluster.nodes {
        let (name, ip) = (n.member.name.clone(), n.member.ip);
        let config = std::fs::read_to_string(a.config_dir.join(&n.cloud_config))
            .with_context(|| format!("reading {}'s cloud-config {}", name, n.cloud_config.display()))?;
        let config = match &a.bootstrap_leader {
            Some(leader) => with_bootstrap_leader(&config, leader, &n.cloud_config)?,
            None => config,
        };
        let endpoint = Endpoint::new(&name, ip, a.port, &token)?;
        let client = &clients.iter().find(|(c, _)| *c == name).context("a client for every node")?.1;
        let mut report = NodeReport {
            name: name.clone(),
            ip,
            found: "unconfigured",
            sent: false,
            fingerprint: None,
            clock_offset_ms: None,
            agent_version: None,
            disk_total_bytes: None,
            disk_free_bytes: None,
            released: None,
        };
        let mut waited = false;
        // With no enrolment endpoint, what the agent API said (asked once per round).
        let (found, agent) = loop {
            let found = match endpoint.facts().await {
                Ok(found) => found,
                // A released node restarts: its listener may go mid-call.
                Err(e) if report.released.is_some() && Instant::now() < deadline => {
                    tracing::debug!(node = %name, error = %format!("{e:#}"), "the released node is restarting");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Found::Waiting(facts) = &found
                && let Some(other) = facts.enrolled.as_ref().filter(|e| e.cluster != cluster.name || e.node != name)
            {
                if !a.force {
                    bail!(
                        "{name} at {ip} {} node {} of cluster {}; `--force` releases it (its configuration and data \
                         are set aside on it, not deleted) and deploys it as {name} of {}",
                        facts.holds(),
                        other.node,
                        other.cluster,
                        cluster.name
                    );
                }
                if facts.running && report.released.is_none() {
                    let answer = endpoint.release(other).await?;
                    say(format!(
                        "{name} {ip}: released node {} of cluster {} (it was {}); its configuration and data are set \
                         aside on it; waiting for it to start again",
                        answer.node, answer.cluster, answer.was
                    ));
                    report.released = Some(answer);
                }
                if Instant::now() >= deadline {
                    bail!(
                        "{name} at {ip} still {} node {} of cluster {} after {} (--timeout)",
                        if facts.running { "runs" } else { "starts" },
                        other.node,
                        other.cluster,
                        humantime::format_duration(a.timeout)
                    );
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            let Found::NoEndpoint(why) = &found else { break (found, None) };
            let agent = client.status().await;
            if agent.is_ok() || Instant::now() >= deadline {
                break (found, Some(agent));
            }
            // Still booting (or its agent still starting): wait, within --timeout.
            if !waited {
                say(format!("{name} {ip}: not answering yet ({why}); waiting for it to boot"));
                waited = true;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        };
        match found {
            Found::Waiting(facts) => {
                report.fingerprint = Some(format!("SHA256:{}", facts.fingerprint));
                report.clock_offset_ms = Some(facts.unix_ms as i64 - now_ms());
                report.agent_version = Some(facts.agent_version.clone());
                report.disk_total_bytes = facts.disk.as_ref().map(|d| d.total_bytes);
                report.disk_free_bytes = facts.disk.as_ref().map(|d| d.free_bytes);
                if facts.running {
                    // Configured by enrolment, and this cluster's (the loop above).
                    report.found = "configured";
                    say(format!("{name} {ip}: already runs node {name} of cluster {} (left as it is)", cluster.name));
                    plan.push((endpoint, report, None));
                    continue;
                }
                if facts.enrolled.is_some() {
                    report.found = "enrolled";
                }
                say(format!(
                    "{name} {ip}: {}, agent {}, clock {:+.1} s, certificate {}",
                    if report.found == "enrolled" {
                        "took this configuration, starting"
                    } else {
                        "waiting for enrolment"
                    },
                    facts.agent_version,
                    report.clock_offset_ms.unwrap_or(0) as f64 / 1000.0,
                    report.fingerprint.as_deref().unwrap_or("-")
                ));
                if !a.skip_preflight {
                    preflight(a.max_clock_offset, &name, ip, &facts)?;
                }
                plan.push((endpoint, report, Some(config)));
            }
            Found::NoEndpoint(why) => match agent.context("the agent API's answer")? {
                Ok(status) if status.cluster == cluster.name && status.node == name => {
                    report.found = "configured";
                    report.agent_version = Some(status.agent_version.clone());
                    say(format!("{name} {ip}: already runs node {name} of cluster {} (left as it is)", cluster.name));
                    plan.push((endpoint, report, None));
                }
                Ok(status) => bail!(
                    "{name} at {ip} runs node {} of cluster {} with the configuration of its boot media (it has no \
                     enrolment endpoint, so --force cannot release it); reinstall it to deploy it as {name} of {}",
                    status.node,
                    status.cluster,
                    cluster.name
                ),
                Err(e) => bail!(
                    "{name} at {ip} answers neither on its enrolment port {} ({why}) nor as an agent of this \
                     cluster ({e:#}) within {} (--timeout); is it booted, with the generic image, on this network?",
                    a.port,
                    humantime::format_duration(a.timeout)
                ),
            },
        }
    }
    let forming = plan.iter().any(|(_, r, _)| r.found == "unconfigured");
    if !a.skip_preflight && forming {
        let versions: Vec<&str> = plan.iter().filter_map(|(_, r, _)| r.agent_version.as_deref()).collect();
        if versions.windows(2).any(|w| w[0] != w[1]) {
            bail!("the nodes run different agent versions ({}); boot both from the same image", versions.join(", "));
        }
        let disks: Vec<(&str, u64)> =
            plan.iter().filter_map(|(_, r, _)| Some((r.name.as_str(), r.disk_total_bytes?))).collect();
        if let [(a_name, a_size), (b_name, b_size)] = disks[..]
            && a_size.min(b_size).saturating_mul(2) < a_size.max(b_size)
        {
            bail!(
                "{a_name}'s data disk holds {}, {b_name}'s {}: each node must hold everything the other has, and the \
                 smaller fills first; give them disks of about the same size (--skip-preflight to deploy anyway)",
                gib(a_size),
                gib(b_size)
            );
        }
        // With a node of this cluster running, the VIP is the cluster's own.
        let fresh = plan.iter().all(|(_, r, _)| r.found == "unconfigured");
        cluster_preflight(&cluster, fresh).await?;
    }

    // Send each waiting node its configuration: in turn, or at once.
    let sends = plan.iter_mut().filter(|(_, r, _)| r.found == "unconfigured").map(|(endpoint, report, config)| {
        let config = config.take().unwrap_or_default();
        async move {
            endpoint.send(config).await?;
            report.sent = true;
            Ok::<_, anyhow::Error>(format!("{} {}: configuration sent", report.name, report.ip))
        }
    });
    if a.parallel {
        for line in futures_util::future::try_join_all(sends).await? {
            say(line);
        }
    } else {
        for send in sends {
            say(send.await?);
        }
    }

    // Follow the cluster forming.
    let mut last: Vec<String> = vec![String::new(); clients.len()];
    let (leader, follower) = loop {
        let mut views = Vec::new();
        for (i, (name, client)) in clients.iter().enumerate() {
            let line = match client.status().await {
                Ok(s) => {
                    let streaming = s.replication.as_ref().is_some_and(|r| r.streaming);
                    let durability = s.replication.as_ref().map(|r| r.durability.clone()).unwrap_or_default();
                    views.push((name.clone(), s.role.clone(), streaming, durability.clone()));
                    format!("{name}: {} ({}){}", s.role, s.state, if streaming { ", streaming" } else { "" })
                }
                Err(e) => format!("{name}: not answering yet ({})", crate::cmd::tail(&format!("{e:#}"), 1)),
            };
            if a.watch && line != last[i] {
                say(line.clone());
            }
            last[i] = line;
        }
        let leader = views.iter().find(|v| v.1 == "leader" && v.3 == "synchronous");
        let follower = views.iter().find(|v| v.1 == "follower" && v.2);
        if let (Some(l), Some(f)) = (leader, follower) {
            break (l.0.clone(), f.0.clone());
        }
        if Instant::now() >= deadline {
            bail!(
                "the cluster did not form within {} (--timeout); last seen: {}",
                humantime::format_duration(a.timeout),
                last.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let elapsed = started.elapsed();
    let report = Report {
        cluster: cluster.name.clone(),
        nodes: plan.into_iter().map(|(_, r, _)| r).collect(),
        leader: leader.clone(),
        follower: follower.clone(),
        elapsed_seconds: elapsed.as_millis() as f64 / 1000.0,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "cluster {} formed in {:.1} s: {leader} leads, {follower} streams synchronously from it",
            cluster.name,
            elapsed.as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `text` (a node's cloud-config) with `cluster.bootstrap_leader` set to `leader`.
fn with_bootstrap_leader(text: &str, leader: &str, name: &std::path::Path) -> anyhow::Result<String> {
    edit_cloud_config(text, name, &[("/geminik8s/cluster/bootstrap_leader", leader.into())])
}

/// `text` (a node's cloud-config, from the file `name`) with each JSON
/// pointer set to its value (made where it is missing), rendered again.
pub(super) fn edit_cloud_config(
    text: &str,
    name: &std::path::Path,
    edits: &[(&str, serde_json::Value)],
) -> anyhow::Result<String> {
    let source = crate::config::Source { name: name.display().to_string(), text: text.to_string() };
    let mut document = crate::config::load::merged_document(std::slice::from_ref(&source))
        .with_context(|| format!("{} does not parse as a cloud-config", name.display()))?;
    if document.pointer("/geminik8s/cluster").is_none() {
        bail!("{} has no geminik8s.cluster block: not a node file of `gemin_k8s init`", name.display());
    }
    for (pointer, value) in edits {
        let mut at = &mut document;
        for key in pointer.trim_start_matches('/').split('/') {
            let map = at.as_object_mut().with_context(|| format!("{}: {pointer} is not a mapping", name.display()))?;
            at = map.entry(key.to_string()).or_insert(serde_json::Value::Object(Default::default()));
        }
        *at = value.clone();
    }
    Ok(format!("{}\n{}", crate::config::load::HEADER, crate::config::yaml::to_yaml(&document)))
}

/// Whether something accepts TCP connections at `addr` within a second.
async fn answers(addr: SocketAddr) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
}

/// The checks of the cluster's own addresses before a node is configured:
/// for a new cluster (`fresh`) nothing answers at the VIP yet, and an
/// arbiter witness answers.
async fn cluster_preflight(cluster: &ClusterFile, fresh: bool) -> anyhow::Result<()> {
    let port = cluster.nodes.first().map_or(7443, |n| n.member.api_port);
    let vip = SocketAddr::new(cluster.vip, port);
    if fresh && answers(vip).await {
        bail!(
            "something answers at the cluster's VIP {vip} already: another host uses {}, or a cluster is running \
             there; give the cluster a free address (--skip-preflight to send anyway)",
            cluster.vip
        );
    }
    if cluster.witness.mode == crate::config::WitnessMode::Arbiter
        && let Some(target) = cluster.witness.targets.first()
    {
        let addr: SocketAddr =
            target.parse().with_context(|| format!("cluster.yaml: the witness target {target:?} is not IP:PORT"))?;
        if !answers(addr).await {
            bail!(
                "the witness at {target} does not answer: start `gemin_k8s witness serve` there first (the nodes \
                 need it to elect a leader), or --skip-preflight"
            );
        }
    }
    Ok(())
}

/// The least free space on a waiting node's data disk that preflight accepts.
pub(super) const MIN_FREE_DISK: u64 = 2 << 30;

pub(super) fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// The checks on one waiting node before anything is sent.
pub(super) fn preflight(max_clock_offset: Duration, name: &str, ip: IpAddr, facts: &Facts) -> anyhow::Result<()> {
    let addresses: Vec<IpAddr> = facts.interfaces.iter().flat_map(|i| i.addresses.iter().copied()).collect();
    if !addresses.contains(&ip) {
        bail!(
            "{name} answered at {ip} but lists the addresses {:?}; check cluster.yaml (--skip-preflight to send anyway)",
            addresses
        );
    }
    if let Some(disk) = &facts.disk
        && disk.free_bytes < MIN_FREE_DISK
    {
        bail!(
            "{name} has {} free on {} (of {}), less than the {} a node needs for the datastore, its WAL and K3s; \
             give it a bigger disk (--skip-preflight to send anyway)",
            gib(disk.free_bytes),
            disk.path.display(),
            gib(disk.total_bytes),
            gib(MIN_FREE_DISK)
        );
    }
    let offset = Duration::from_millis((facts.unix_ms as i64 - now_ms()).unsigned_abs());
    if offset > max_clock_offset {
        bail!(
            "{name}'s clock is {:.1} s off this machine's (more than --max-clock-offset {}); set its time (NTP) \
             first: certificates and the witness lease depend on it",
            offset.as_secs_f64(),
            humantime::format_duration(max_clock_offset)
        );
    }
    Ok(())
}
