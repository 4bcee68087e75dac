//! `gemin_k8s replace-node`: bring a new machine in for a node that is gone
//! for good, under the same name, at a new address (or the same).
//!
//! The steps, each safe to run again (a second run after an interruption
//! continues; `replace-<node>.json` in the cluster directory remembers the
//! new address and what is done):
//!
//! 1. **Fence**: the other node (the survivor) leads, the old machine's agent
//!    answers nowhere, and the witness lease is the survivor's (arbiter), or
//!    the operator confirms that the old machine is off.
//! 2. **Identity**: a new certificate for the node at its new address, and a
//!    revocation list naming the old one (`pki/crl.pem`); both node files and
//!    `cluster.yaml` are rewritten (the old node file is kept beside them).
//! 3. **Survivor**: the arbiter witness takes the revocation list (so the
//!    old certificate cannot take the lease), then `POST /v1/peer`: it drops the old machine's replication
//!    slot (unless `--preserve-data`) and Kubernetes identity, lets
//!    replication in from the new address (PostgreSQL re-reads its files, no
//!    restart), refuses the old certificate from then on, and keeps all that
//!    in its state directory.
//! 4. **Deploy**: the new machine, booted from the generic image and waiting
//!    for enrolment, gets its file (as `gemin_k8s deploy` sends it).
//! 5. **Catch up**: done when the survivor leads with synchronous commits
//!    waiting for the new node, which streams; `--verify` then runs the
//!    switchover checks and proves the old certificate refused.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::GlobalArgs;
use super::deploy::{self, Endpoint, Found};
use crate::clusterfile::{self, ClusterFile};
use crate::config::WitnessMode;
use crate::peer::client::AgentClient;
use crate::peer::{NodeStatus, PeerChange, PeerChanged};
use crate::pki::{self, CaSigner};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster name: reads ./NAME/cluster.yaml (or give --config-dir, or --config).
    #[arg(long)]
    pub cluster: Option<String>,
    /// The cluster directory written by `gemin_k8s init` (cluster.yaml, the node files, pki/).
    #[arg(long, value_name = "DIR", conflicts_with = "cluster")]
    pub config_dir: Option<PathBuf>,
    /// The node whose machine is gone; the new machine takes its name.
    #[arg(long, value_name = "NODE")]
    pub old_node: String,
    /// The new machine's address (booted from the generic image, waiting for enrolment).
    #[arg(long, value_name = "IP")]
    pub new_node_ip: IpAddr,
    /// The new machine holds the old one's disk: keep the old replication slot
    /// so it catches up from where it stopped instead of copying everything.
    #[arg(long)]
    pub preserve_data: bool,
    /// The old node is the leader (its follower has not taken over): make
    /// the follower take over first. Writes only the old leader had are given up.
    #[arg(long)]
    pub force: bool,
    /// Do not ask for confirmation that the old machine is powered off
    /// (needed without an arbiter witness, which proves it otherwise).
    #[arg(long, short)]
    pub yes: bool,
    /// How long the whole replacement may take, the copy of the data included.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// How long to wait for the survivor to lead after the old node is gone
    /// (the old machine holds no workload to drain once it is powered off).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub drain_timeout: Duration,
    /// Afterwards, run the switchover checks (a dry run) and prove that the
    /// survivor refuses the old certificate.
    #[arg(long)]
    pub verify: bool,
    /// Check and print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// File holding the site enrolment token [default: DIR/enrolment.token].
    #[arg(long, value_name = "FILE", env = "GEMINIK8S_ENROLMENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Port of the new machine's enrolment endpoint.
    #[arg(long, default_value_t = crate::enrol::DEFAULT_PORT, value_name = "PORT")]
    pub port: u16,
    /// The largest clock difference between this machine and the new one.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub max_clock_offset: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What is done of a replacement, kept in `replace-<node>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Progress {
    old_node: String,
    old_ip: IpAddr,
    new_ip: IpAddr,
    started: String,
    /// The certificate, revocation list and files are written.
    identity: bool,
    /// The survivor took the new peer.
    survivor: bool,
    /// The new machine has its configuration.
    deployed: bool,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    cluster: String,
    node: String,
    old_ip: String,
    new_ip: String,
    survivor: String,
    fenced_by: String,
    dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    survivor_changes: Option<PeerChanged>,
    /// The number of the revocation list the arbiter witness took.
    #[serde(skip_serializing_if = "Option::is_none")]
    witness_crl_number: Option<u64>,
    revoked_serial: String,
    /// The node file as it was before, with the revoked certificate's key.
    old_node_file: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    checks: Vec<super::failover::Check>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old_certificate_refused: Option<bool>,
    elapsed_seconds: f64,
}

fn progress_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("replace-{node}.json"))
}

fn save_progress(dir: &Path, p: &Progress) -> anyhow::Result<()> {
    let path = progress_path(dir, &p.old_node);
    crate::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(p)?, 0o600)
        .with_context(|| format!("writing {}", path.display()))
}

const POLL: Duration = Duration::from_secs(1);

pub async fn run(a: Args, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let deadline = started + a.timeout;
    let path = match (&a.config_dir, super::status::cluster_file(a.cluster.as_deref(), global)) {
        (Some(dir), _) => dir.join(clusterfile::FILE_NAME),
        (None, Some(path)) => path,
        (None, None) => bail!("replace-node needs the cluster directory: give --config-dir DIR or --cluster NAME"),
    };
    let dir = path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let say = |line: String| {
        if !a.json && !global.quiet {
            eprintln!("{line}");
        }
    };
    let cluster = ClusterFile::load(&path)?;
    let Some(old) = cluster.nodes.iter().find(|n| n.member.name == a.old_node).cloned() else {
        let names: Vec<&str> = cluster.nodes.iter().map(|n| n.member.name.as_str()).collect();
        bail!("--old-node {}: cluster {} has the nodes {}", a.old_node, cluster.name, names.join(" and "));
    };
    let survivor = cluster.nodes.iter().find(|n| n.member.name != a.old_node).cloned().context("a second node")?;
    let mut progress = match std::fs::read(progress_path(&dir, &a.old_node)) {
        Ok(bytes) => {
            let p: Progress = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", progress_path(&dir, &a.old_node).display()))?;
            if p.new_ip != a.new_node_ip {
                bail!(
                    "a replacement of {} by a machine at {} is under way (started {}): run it again with \
                     --new-node-ip {}, or delete {} to start over",
                    p.old_node,
                    p.new_ip,
                    p.started,
                    p.new_ip,
                    progress_path(&dir, &a.old_node).display()
                );
            }
            say(format!("continuing the replacement of {} started {}", p.old_node, p.started));
            p
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Progress {
            old_node: a.old_node.clone(),
            old_ip: old.member.ip,
            new_ip: a.new_node_ip,
            started: crate::backup::now_rfc3339(),
            identity: false,
            survivor: false,
            deployed: false,
        },
        Err(e) => return Err(e).context(format!("reading {}", progress_path(&dir, &a.old_node).display())),
    };
    check_new_address(&cluster, &survivor.member.name, survivor.member.ip, a.new_node_ip)?;

    let tls = cluster.operator_tls(&dir).context("loading the operator certificate")?;
    let client = |ip: IpAddr, port: u16, timeout: Duration| {
        AgentClient::https(
            &format!("https://{}", std::net::SocketAddr::new(ip, port)),
            &tls,
            Some(cluster.api_token.clone()),
            timeout,
        )
    };
    let survivor_client = client(survivor.member.ip, survivor.member.api_port, Duration::from_secs(5))?;
    let mut report = Report {
        cluster: cluster.name.clone(),
        node: a.old_node.clone(),
        old_ip: progress.old_ip.to_string(),
        new_ip: a.new_node_ip.to_string(),
        survivor: survivor.member.name.clone(),
        dry_run: a.dry_run,
        ..Report::default()
    };

    // 1. Fence: the old machine is gone and the survivor leads.
    if !progress.survivor {
        let status = survivor_client.status().await.with_context(|| {
            format!(
                "{} at {} must answer: it is the node that keeps the data",
                survivor.member.name, survivor.member.ip
            )
        })?;
        let old_client = client(progress.old_ip, old.member.api_port, Duration::from_secs(3))?;
        let old_status = old_client.status().await.ok();
        if status.role != "leader" && !a.force {
            bail!(
                "{} is the leader ({} is {}): replace the follower, or give --force to make {} take over first \
                 (writes only {} had are given up)",
                a.old_node,
                survivor.member.name,
                status.role,
                survivor.member.name,
                a.old_node
            );
        }
        if let Some(s) = old_status {
            bail!(
                "{} at {} still answers (it is the {}): replace-node replaces a machine that is gone; power it off \
                 (or stop its agent and PostgreSQL) first",
                a.old_node,
                progress.old_ip,
                s.role
            );
        }
        if status.role != "leader" {
            if a.dry_run {
                say(format!("would make {} take over (--force)", survivor.member.name));
            } else {
                take_over(&survivor_client, &survivor.member.name, a.drain_timeout, &say).await?;
            }
        }
        report.fenced_by = fence(&a, &cluster, &survivor_client, &survivor.member.name).await?;
        say(format!("fenced: {}", report.fenced_by));
    } else {
        report.fenced_by = "done in an earlier run".into();
    }

    // 2. Identity: a certificate for the new machine, the old one revoked.
    // The old node file is kept first, under this replacement's start: a
    // run cut short takes the old certificate from there, not from the file
    // it may have rewritten already.
    let old_file = dir.join(&old.cloud_config);
    let kept = kept_file(&old_file, &progress.started);
    let original = if kept.exists() { &kept } else { &old_file };
    let old_text = std::fs::read_to_string(original).with_context(|| format!("reading {}", original.display()))?;
    report.revoked_serial = hex(&pki::serial(&inline_pem(&old_text, original, "/geminik8s/tls/cert")?)?);
    report.old_node_file = kept.display().to_string();
    let crl_path = dir.join(CRL_FILE);
    if a.dry_run {
        say(format!(
            "plan: new certificate for {} at {}, revoke serial {}; {} takes the new peer{}; deploy {}; wait for it to \
             stream synchronously",
            a.old_node,
            a.new_node_ip,
            report.revoked_serial,
            survivor.member.name,
            if a.preserve_data { " (its slot kept)" } else { " (its slot renewed)" },
            a.new_node_ip
        ));
        return finish(&a, report, started);
    }
    if !progress.identity {
        if !kept.exists() {
            crate::fsutil::write_atomic(&kept, old_text.as_bytes(), 0o600)
                .with_context(|| format!("writing {}", kept.display()))?;
        }
        write_identity(&dir, &cluster, &old, &survivor, a.new_node_ip, &old_text)?;
        progress.identity = true;
        save_progress(&dir, &progress)?;
        say(format!(
            "new certificate for {}; serial {} revoked in {} (the old file kept as {})",
            a.old_node,
            report.revoked_serial,
            CRL_FILE,
            kept.display()
        ));
    }
    let crl = std::fs::read_to_string(&crl_path).with_context(|| format!("reading {}", crl_path.display()))?;

    // 3. The witness refuses the old certificate (it could take the lease
    // under the node's name otherwise), then the survivor takes the new peer.
    if cluster.witness.mode == WitnessMode::Arbiter
        && let Some(target) = cluster.witness.targets.first()
    {
        let url = format!("https://{target}/v1/crl");
        let http = tls.http_client(Duration::from_secs(10))?;
        let answer = http.get().post(&url).body(crl.clone()).send().await;
        let refused = |why: String| {
            anyhow::anyhow!(
                "the witness at {target} did not take the revocation list ({why}); it must, or the old machine's \
                 certificate could still take the lease. Run the same command again once it answers"
            )
        };
        match answer {
            Ok(r) if r.status().is_success() => {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                report.witness_crl_number = v["number"].as_u64();
                say(format!("the witness at {target} refuses the old certificate"));
            }
            Ok(r) => {
                let status = r.status();
                return Err(refused(format!("HTTP {status}: {}", r.text().await.unwrap_or_default().trim())));
            }
            Err(e) => return Err(refused(format!("{e}"))),
        }
    }

    // The survivor takes the new peer.
    let change = PeerChange {
        name: a.old_node.clone(),
        ip: a.new_node_ip,
        api_port: old.member.api_port,
        crl: crl.clone(),
        keep_slot: a.preserve_data,
    };
    // The survivor drops a slot, removes Kubernetes objects and re-reads
    // its PostgreSQL files before it answers.
    let asked = Instant::now();
    let changed =
        client(survivor.member.ip, survivor.member.api_port, Duration::from_secs(300))?.replace_peer(&change).await?;
    say(format!(
        "{}: peer {} at {} ({:.1} s){}{}",
        survivor.member.name,
        a.old_node,
        a.new_node_ip,
        asked.elapsed().as_secs_f64(),
        match changed.slot_held_bytes {
            Some(b) => format!(", old slot dropped ({b} bytes of WAL it held)"),
            None => String::new(),
        },
        if changed.kubernetes_removed.is_empty() {
            String::new()
        } else {
            format!(", removed {}", changed.kubernetes_removed.join(" and "))
        }
    ));
    report.survivor_changes = Some(changed);
    progress.survivor = true;
    save_progress(&dir, &progress)?;

    // 4. The new machine gets its file.
    if !progress.deployed {
        let file = dir.join(&old.cloud_config);
        let config = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let token_file = a.token_file.clone().unwrap_or_else(|| dir.join("enrolment.token"));
        let token = deploy::read_token(&token_file)?;
        let endpoint = Endpoint::new(&a.old_node, a.new_node_ip, a.port, &token)?;
        let new_client = client(a.new_node_ip, old.member.api_port, Duration::from_secs(3))?;
        let mut said = false;
        loop {
            match endpoint.facts().await? {
                Found::Waiting(facts) => {
                    match &facts.enrolled {
                        Some(e) if e.cluster == cluster.name && e.node == a.old_node => {}
                        Some(e) => bail!(
                            "the machine at {} {} node {} of cluster {}; reinstall it with the generic image",
                            a.new_node_ip,
                            facts.holds(),
                            e.node,
                            e.cluster
                        ),
                        None => {
                            deploy::preflight(a.max_clock_offset, &a.old_node, a.new_node_ip, &facts)?;
                            endpoint.send(config.clone()).await?;
                            say(format!(
                                "{} {}: configuration sent (certificate SHA256:{})",
                                a.old_node, a.new_node_ip, facts.fingerprint
                            ));
                        }
                    }
                    break;
                }
                Found::NoEndpoint(why) => match new_client.status().await {
                    Ok(s) if s.cluster == cluster.name && s.node == a.old_node => break,
                    Ok(s) => bail!(
                        "the machine at {} runs node {} of cluster {}; reinstall it with the generic image",
                        a.new_node_ip,
                        s.node,
                        s.cluster
                    ),
                    Err(_) if Instant::now() < deadline => {
                        if !said {
                            say(format!("waiting for the new machine at {} to boot ({why})", a.new_node_ip));
                            said = true;
                        }
                        tokio::time::sleep(POLL).await;
                    }
                    Err(e) => bail!(
                        "the new machine at {} answers neither on its enrolment port {} ({why}) nor as an agent \
                         ({e:#}); is it booted, with the generic image, on this network?",
                        a.new_node_ip,
                        a.port
                    ),
                },
            }
        }
        progress.deployed = true;
        save_progress(&dir, &progress)?;
    }

    // 5. Done when the new node streams and commits wait for it.
    let new_client = client(a.new_node_ip, old.member.api_port, Duration::from_secs(5))?;
    let mut last = String::new();
    loop {
        let (s, n) = (survivor_client.status().await, new_client.status().await);
        let line = format!("{}; {}", describe(&survivor.member.name, &s), describe(&a.old_node, &n));
        if let (Ok(s), Ok(n)) = (&s, &n)
            && caught_up(s, n)
        {
            break;
        }
        if line != last {
            say(line.clone());
            last = line.clone();
        }
        if Instant::now() >= deadline {
            bail!(
                "the new {} did not catch up within {} (--timeout); last seen: {line}. Run the same command again \
                 to go on waiting",
                a.old_node,
                humantime::format_duration(a.timeout)
            );
        }
        tokio::time::sleep(POLL).await;
    }
    say(format!("{} leads with synchronous commits; the new {} streams", survivor.member.name, a.old_node));

    if a.verify {
        let clients = [(survivor.member.name.clone(), survivor_client.clone()), (a.old_node.clone(), new_client)];
        let answers = super::failover::ask(&clients).await;
        let (leader, follower) = (&answers[0], &answers[1]);
        report.checks = super::failover::checks(leader, follower);
        report.old_certificate_refused = Some(old_certificate_refused(&cluster, &dir, &kept, &survivor).await?);
    }
    std::fs::remove_file(progress_path(&dir, &a.old_node)).ok();
    let failed: Vec<String> = report.checks.iter().filter(|c| !c.pass).map(|c| c.name.clone()).collect();
    let refused = report.old_certificate_refused;
    let code = finish(&a, report, started)?;
    if !failed.is_empty() || refused == Some(false) {
        bail!(
            "the replacement is done but --verify found problems: {}{}",
            failed.join(", "),
            if refused == Some(false) { " (the survivor accepts the old certificate)" } else { "" }
        );
    }
    Ok(code)
}

/// Where the revocation list is kept in the cluster directory.
pub const CRL_FILE: &str = "pki/crl.pem";

/// The old node file, kept beside the new one under the replacement's start.
fn kept_file(file: &Path, started: &str) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".replaced-{started}"));
    file.with_file_name(name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The new address must be free of the cluster's own: not the survivor's,
/// not the VIP, in the VIP's subnet.
fn check_new_address(cluster: &ClusterFile, survivor: &str, survivor_ip: IpAddr, ip: IpAddr) -> anyhow::Result<()> {
    if ip == survivor_ip {
        bail!("--new-node-ip {ip} is {survivor}'s address");
    }
    if ip == cluster.vip {
        bail!("--new-node-ip {ip} is the cluster's VIP");
    }
    if !crate::config::validate::same_subnet(ip, cluster.vip, cluster.vip_prefix) {
        bail!(
            "--new-node-ip {ip} is outside the cluster's subnet {}/{} (the VIP moves between the nodes there)",
            crate::config::validate::network(cluster.vip, cluster.vip_prefix),
            cluster.vip_prefix
        );
    }
    Ok(())
}

/// Make the survivor (the follower of a leader that is gone) take over.
async fn take_over(client: &AgentClient, name: &str, limit: Duration, say: &impl Fn(String)) -> anyhow::Result<()> {
    client.force_takeover().await?;
    say(format!("{name} takes over (--force)"));
    let until = Instant::now() + limit;
    loop {
        match client.status().await {
            Ok(s) if s.role == "leader" && s.vip.held_here => return Ok(()),
            other if Instant::now() >= until => bail!(
                "{name} did not lead within {} (--drain-timeout); last seen: {}",
                humantime::format_duration(limit),
                match other {
                    Ok(s) => format!("{} ({})", s.role, s.state),
                    Err(e) => format!("{e:#}"),
                }
            ),
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// The old machine cannot come back as a writer: the arbiter's lease is the
/// survivor's, or the operator says the machine is off.
async fn fence(a: &Args, cluster: &ClusterFile, survivor: &AgentClient, name: &str) -> anyhow::Result<String> {
    if cluster.witness.mode == WitnessMode::Arbiter {
        let until = Instant::now() + a.drain_timeout;
        loop {
            let s = survivor.status().await?;
            if s.witness.state == "lease held here" {
                return Ok(format!("the witness lease is {name}'s"));
            }
            if Instant::now() >= until {
                bail!(
                    "the witness lease is not {name}'s within {} (--drain-timeout): the witness says `{}`",
                    humantime::format_duration(a.drain_timeout),
                    s.witness.state
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
    if a.yes {
        return Ok("the operator confirmed the old machine is off (--yes)".into());
    }
    if a.dry_run {
        return Ok("to be confirmed by the operator (or --yes)".into());
    }
    eprint!(
        "Without an arbiter nothing proves that {} is off. A machine that comes back with its old disk must not \
         lead. Is it powered off for good? Type `yes` to go on: ",
        a.old_node
    );
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::stdin().lock(), &mut line).context("reading the confirmation")?;
    if line.trim() != "yes" {
        bail!("not confirmed; nothing was changed");
    }
    Ok("the operator confirmed the old machine is off".into())
}

/// The PEM text at `pointer` of a node file, which `init` writes inline.
fn inline_pem(text: &str, file: &Path, pointer: &str) -> anyhow::Result<String> {
    let source = crate::config::Source { name: file.display().to_string(), text: text.to_string() };
    let document = crate::config::load::merged_document(std::slice::from_ref(&source))
        .with_context(|| format!("{} does not parse as a cloud-config", file.display()))?;
    let value = document.pointer(pointer).and_then(|v| v.as_str()).unwrap_or_default();
    if !crate::config::types::is_inline_pem(value) {
        bail!("{}: {pointer} is not inline PEM (replace-node rewrites the files `init` wrote)", file.display());
    }
    Ok(value.to_string())
}

/// Issue the new certificate, extend the revocation list with the one in
/// `old_text` (the node file before the replacement), rewrite both node
/// files and cluster.yaml.
fn write_identity(
    dir: &Path,
    cluster: &ClusterFile,
    old: &clusterfile::NodeEntry,
    survivor: &clusterfile::NodeEntry,
    new_ip: IpAddr,
    old_text: &str,
) -> anyhow::Result<()> {
    let old_file = dir.join(&old.cloud_config);
    let serial = pki::serial(&inline_pem(old_text, &old_file, "/geminik8s/tls/cert")?)?;
    let ca_key_path = dir.join(&cluster.pki.ca_key);
    let ca_key = std::fs::read_to_string(&ca_key_path).with_context(|| format!("reading {}", ca_key_path.display()))?;
    let signer = CaSigner::new(&cluster.name, &ca_key)?;
    let crl_path = dir.join(CRL_FILE);
    let (mut serials, number) = match std::fs::read_to_string(&crl_path) {
        Ok(text) => pki::revoked(&text).with_context(|| format!("reading {}", crl_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
        Err(e) => return Err(e).context(format!("reading {}", crl_path.display())),
    };
    if !serials.contains(&serial) {
        serials.push(serial.clone());
    }
    let crl = signer.revocation_list(&serials, number + 1)?;
    let cert = signer.node(&old.member.name, new_ip, cluster.vip)?;

    let new_text = deploy::edit_cloud_config(
        old_text,
        &old_file,
        &[
            ("/geminik8s/node/ip", new_ip.to_string().into()),
            ("/geminik8s/tls/cert", cert.cert.clone().into()),
            ("/geminik8s/tls/key", cert.key.clone().into()),
            ("/geminik8s/tls/crl", crl.clone().into()),
        ],
    )?;
    let survivor_file = dir.join(&survivor.cloud_config);
    let survivor_text =
        std::fs::read_to_string(&survivor_file).with_context(|| format!("reading {}", survivor_file.display()))?;
    let survivor_text = deploy::edit_cloud_config(
        &survivor_text,
        &survivor_file,
        &[("/geminik8s/peer/ip", new_ip.to_string().into()), ("/geminik8s/tls/crl", crl.clone().into())],
    )?;
    let mut updated = cluster.clone();
    for n in &mut updated.nodes {
        if n.member.name == old.member.name {
            n.member.ip = new_ip;
        }
    }
    updated.pki.crl = Some(PathBuf::from(CRL_FILE));

    // The list, the node files, the cluster file (the old file is kept
    // already): a run cut short redoes them from the kept file.
    let write = |path: &Path, text: &str, mode: u32| {
        crate::fsutil::write_atomic(path, text.as_bytes(), mode).with_context(|| format!("writing {}", path.display()))
    };
    write(&crl_path, &crl, 0o644)?;
    write(&old_file, &new_text, 0o600)?;
    write(&survivor_file, &survivor_text, 0o600)?;
    write(&dir.join(clusterfile::FILE_NAME), &updated.render()?, 0o600)?;
    Ok(())
}

fn describe(name: &str, s: &anyhow::Result<NodeStatus>) -> String {
    match s {
        Ok(s) => format!(
            "{name}: {} ({}){}",
            s.role,
            s.state,
            s.replication
                .as_ref()
                .map(|r| format!(", {}{}", r.durability, if r.streaming { ", streaming" } else { "" }))
                .unwrap_or_default()
        ),
        Err(e) => format!("{name}: not answering yet ({})", crate::cmd::tail(&format!("{e:#}"), 1)),
    }
}

/// The survivor leads with commits waiting for the new node, which streams.
fn caught_up(survivor: &NodeStatus, new: &NodeStatus) -> bool {
    let sync = survivor.replication.as_ref().is_some_and(|r| r.durability == "synchronous" && r.streaming);
    let streaming = new.replication.as_ref().is_some_and(|r| r.streaming);
    survivor.role == "leader" && sync && new.role == "follower" && streaming
}

/// Call the survivor with the old machine's certificate: it must refuse.
async fn old_certificate_refused(
    cluster: &ClusterFile,
    dir: &Path,
    kept: &Path,
    survivor: &clusterfile::NodeEntry,
) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(kept).with_context(|| format!("reading {}", kept.display()))?;
    let ca = std::fs::read_to_string(dir.join(&cluster.pki.ca_cert))?;
    let old = crate::peer::tls::TlsMaterial::from_pem(
        &ca,
        &inline_pem(&text, kept, "/geminik8s/tls/cert")?,
        &inline_pem(&text, kept, "/geminik8s/tls/key")?,
    )?;
    let as_old =
        AgentClient::https(&format!("https://{}", survivor.member.api_addr()), &old, None, Duration::from_secs(5))?;
    Ok(as_old.health().await.is_err())
}

fn finish(a: &Args, report: Report, started: Instant) -> anyhow::Result<ExitCode> {
    let report = Report { elapsed_seconds: started.elapsed().as_millis() as f64 / 1000.0, ..report };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    if report.dry_run {
        println!("dry run: nothing was changed ({}; fence: {})", report.survivor, report.fenced_by);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} replaced in {:.1} s: now at {} (was {}), certificate serial {} revoked; {} leads, the new {} streams \
         synchronously",
        report.node,
        report.elapsed_seconds,
        report.new_ip,
        report.old_ip,
        report.revoked_serial,
        report.survivor,
        report.node
    );
    for c in &report.checks {
        println!("  {} {}: {}", if c.pass { "ok  " } else { "FAIL" }, c.name, c.value);
    }
    if let Some(refused) = report.old_certificate_refused {
        println!("  {} the old certificate is refused by {}", if refused { "ok  " } else { "FAIL" }, report.survivor);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_address_must_be_free_and_in_the_subnet() {
        let yaml = "schema_version: 1\nname: shop\nvip: 10.0.0.10\nvip_prefix: 24\ninterface: null\n\
                    bootstrap_leader: a\nwitness: {mode: none, targets: []}\nnodes: []\napi_token: t\n\
                    pki: {ca_cert: c, ca_key: k, operator_cert: o, operator_key: ok}\ncreated: x\n";
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster.yaml"), yaml).unwrap();
        let cluster = ClusterFile::load(&dir.path().join("cluster.yaml")).unwrap();
        let survivor: IpAddr = "10.0.0.11".parse().unwrap();
        let check =
            |ip: &str| check_new_address(&cluster, "a", survivor, ip.parse().unwrap()).map_err(|e| e.to_string());
        assert!(check("10.0.0.21").is_ok());
        assert!(check("10.0.0.11").unwrap_err().contains("a's address"));
        assert!(check("10.0.0.10").unwrap_err().contains("VIP"));
        assert!(check("10.0.1.21").unwrap_err().contains("outside the cluster's subnet 10.0.0.0/24"));
    }

    #[test]
    fn the_kept_file_sits_beside_the_node_file() {
        assert_eq!(
            kept_file(Path::new("/c/node2.yaml"), "2026-11-30T22:00:00Z"),
            Path::new("/c/node2.yaml.replaced-2026-11-30T22:00:00Z")
        );
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
    }
}
