//! `gemin_k8s init`: generate a cluster directory.
//!
//! ```text
//! DIR/cluster.yaml        operator's record (API token), 0600
//! DIR/node1.yaml          cloud-config for node 1 (its key only), 0600
//! DIR/node2.yaml          cloud-config for node 2, 0600
//! DIR/pki/ca.crt          cluster CA, 0644; ca.key 0600
//! DIR/pki/operator.crt    operator client certificate, 0644; operator.key 0600
//! DIR/pki/witness.crt     arbiter witness certificate (arbiter mode), 0644; witness.key 0600
//! ```
//!
//! Values come from flags, then `--template`, then `--interactive` answers;
//! secrets and certificates are always freshly generated. Every node file is
//! read back through the agent's own loader before anything is written.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};

use super::output::render;
use super::prompt::Prompter;
use super::{GlobalArgs, OutputFormat};
use crate::clusterfile::{self, ClusterFile, NodeEntry, PkiPaths, WitnessSummary};
use crate::config::load::HEADER;
use crate::config::validate::{parse_target, same_subnet};
use crate::config::{
    CheckContext, Diagnostics, GeminiConfig, Health, Kine, Member, Postgres, Source, WitnessMode, load_sources,
};
use crate::config::{merge_json, yaml};
use crate::{fsutil, pki, secrets};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster name (lowercase letters, digits, `-`).
    #[arg(long)]
    pub name: Option<String>,
    /// Address of the first node (the default bootstrap leader).
    #[arg(long, value_name = "IP")]
    pub node1_ip: Option<IpAddr>,
    /// Address of the second node.
    #[arg(long, value_name = "IP")]
    pub node2_ip: Option<IpAddr>,
    /// Virtual IP held by the leader; must be free and in the nodes' subnet.
    #[arg(long, value_name = "IP")]
    pub vip: Option<IpAddr>,
    /// Prefix length of the VIP's subnet [default: 24].
    #[arg(long, value_name = "BITS")]
    pub vip_prefix: Option<u8>,
    /// Name of the first node.
    #[arg(long, default_value = "node1")]
    pub node1_name: String,
    /// Name of the second node.
    #[arg(long, default_value = "node2")]
    pub node2_name: String,
    /// Node that leads a fresh cluster [default: the first node].
    #[arg(long, value_name = "NAME")]
    pub bootstrap_leader: Option<String>,
    /// Directory to write the cluster into [default: ./NAME].
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// A #cloud-config file to start from: its Kairos keys and `geminik8s:` settings go into both nodes' files.
    #[arg(long, value_name = "FILE")]
    pub template: Option<PathBuf>,
    /// Ask for each value (with defaults), validating as it goes; reads answers from a terminal or a pipe.
    #[arg(long)]
    pub interactive: bool,
    /// Validate and print the plan; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Network interface for the VIP [default: the one holding the node's IP].
    #[arg(long, value_name = "IFACE")]
    pub interface: Option<String>,
    /// Split-brain witness. `gateway` (the default, with this machine's default gateway when it is in the
    /// nodes' subnet): a leader that reaches neither its peer nor a target fences itself, and a follower
    /// takes over only while it reaches one. `arbiter`: a lease from `gemin_k8s witness serve` on a third
    /// box, which also remembers which node holds every acknowledged write. `none`: the peer alone decides;
    /// an isolated node can then cost acknowledged writes (must be chosen explicitly).
    #[arg(long, value_enum)]
    pub witness: Option<WitnessMode>,
    /// Witness target (repeatable): `IP` or `IP:PORT` for gateway, one `IP:PORT` for arbiter.
    #[arg(long = "witness-target", value_name = "ADDR")]
    pub witness_targets: Vec<String>,
    /// Overwrite an existing cluster directory's files.
    #[arg(long)]
    pub force: bool,
    /// Output format of the summary.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// The settings everything else is derived from.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub name: String,
    pub nodes: [(String, IpAddr); 2],
    pub vip: IpAddr,
    pub vip_prefix: u8,
    pub interface: Option<String>,
    pub bootstrap_leader: String,
    pub witness: WitnessMode,
    pub witness_targets: Vec<String>,
}

/// One file `init` writes.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedFile {
    pub path: PathBuf,
    pub mode: String,
    pub bytes: usize,
    pub exists: bool,
    #[serde(skip)]
    pub contents: Vec<u8>,
    #[serde(skip)]
    pub mode_bits: u32,
}

#[derive(Debug, Serialize)]
struct Summary<'a> {
    dry_run: bool,
    config_dir: &'a Path,
    cluster: &'a Plan,
    files: &'a [PlannedFile],
}

/// A template's contribution: top-level Kairos keys and a partial block.
#[derive(Debug, Default)]
struct Template {
    document: serde_json::Map<String, Value>,
    block: Value,
}

fn load_template(path: &Path) -> anyhow::Result<Template> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading template {}", path.display()))?;
    let source = Source { name: path.display().to_string(), text };
    // Validate what the template says, ignoring what it leaves to init.
    if let Err(diags) =
        load_sources(std::slice::from_ref(&source), &CheckContext { check_files: false, ..Default::default() })
    {
        let real: Vec<_> = diags
            .0
            .into_iter()
            .filter(|d| d.is_error() && d.message != "required key is missing" && d.key != "geminik8s")
            .collect();
        if !real.is_empty() {
            return Err(Diagnostics(real)).context("the template is not valid");
        }
    }
    let node = yaml::parse(&source.text, 0)
        .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid YAML: {}", source.name, e.line, e.col, e.message))?;
    let Value::Object(mut document) = node.to_json() else { bail!("{}: not a mapping", source.name) };
    let block = document.remove("geminik8s").unwrap_or(Value::Null);
    Ok(Template { document, block })
}

fn template_str(t: &Template, path: &str) -> Option<String> {
    path.split('.').try_fold(&t.block, |v, k| v.get(k)).and_then(|v| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

fn check_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("`{s}` is not a valid name: use lowercase letters, digits and `-`"))
    }
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| format!("`{s}` is not an IP address (e.g. 10.77.0.11)"))
}

/// Resolve every value from flags, template and (if asked) prompts.
fn resolve(args: &Args, template: &Template) -> anyhow::Result<Plan> {
    let t = |p: &str| template_str(template, p);
    let mut name = args.name.clone().or_else(|| t("cluster.name"));
    let mut ip1 = args.node1_ip;
    let mut ip2 = args.node2_ip;
    let mut vip = args.vip.or_else(|| t("cluster.vip").and_then(|s| s.parse().ok()));
    let mut prefix = args.vip_prefix.or_else(|| t("cluster.vip_prefix").and_then(|s| s.parse().ok())).unwrap_or(24);
    let mut interface = args.interface.clone().or_else(|| t("cluster.interface"));
    let chosen =
        args.witness.or_else(|| t("cluster.witness.mode").and_then(|s| clap::ValueEnum::from_str(&s, true).ok()));
    let mut witness = chosen.unwrap_or(WitnessMode::Gateway);
    let mut targets = if args.witness_targets.is_empty() {
        template
            .block
            .pointer("/cluster/witness/targets")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    } else {
        args.witness_targets.clone()
    };
    let names = [args.node1_name.clone(), args.node2_name.clone()];

    if args.interactive {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            eprintln!("Press Enter to accept the value in [brackets].");
        }
        let mut p = Prompter::new(stdin.lock(), std::io::stderr());
        name = Some(p.ask("Cluster name", Some(name.as_deref().unwrap_or("lab")), check_name)?);
        let first = p.ask(&format!("IP address of {}", names[0]), ip1.map(|i| i.to_string()).as_deref(), parse_ip)?;
        ip1 = Some(first);
        ip2 = Some(p.ask(&format!("IP address of {}", names[1]), ip2.map(|i| i.to_string()).as_deref(), |s| {
            let ip = parse_ip(s)?;
            if ip == first { Err(format!("{ip} is already {}'s address", names[0])) } else { Ok(ip) }
        })?);
        prefix = p.ask("Subnet prefix length", Some(&prefix.to_string()), |s| match s.parse::<u8>() {
            Ok(n) if (1..=if first.is_ipv4() { 32 } else { 128 }).contains(&n) => Ok(n),
            _ => Err(format!("`{s}` is not a prefix length for {first}")),
        })?;
        let (a, b) = (first, ip2.expect("asked above"));
        if !same_subnet(a, b, prefix) {
            eprintln!(
                "  note: {a} and {b} are not in one /{prefix}; the VIP check below will fail unless you fix the addresses"
            );
        }
        vip = Some(p.ask("Virtual IP (VIP)", vip.map(|v| v.to_string()).as_deref(), |s| {
            let v = parse_ip(s)?;
            if v == a || v == b {
                Err(format!("{v} is a node address; the VIP must be a free address"))
            } else if !same_subnet(v, a, prefix) || !same_subnet(v, b, prefix) {
                Err(format!("{v} is not in the nodes' /{prefix} subnet"))
            } else {
                Ok(v)
            }
        })?);
        let iface = p.ask("Interface for the VIP (empty: the one holding the node IP)", interface.as_deref(), |s| {
            Ok::<_, String>(s.to_string())
        })?;
        interface = Some(iface).filter(|s| !s.is_empty());
        let current = clap::ValueEnum::to_possible_value(&witness).map(|v| v.get_name().to_string());
        eprintln!("{WITNESS_CHOICES}");
        witness = p.ask("Witness mode (gateway, arbiter, none)", current.as_deref(), |s| {
            <WitnessMode as clap::ValueEnum>::from_str(s, true)
                .map_err(|_| format!("`{s}` is not one of gateway, arbiter, none"))
        })?;
        if witness == WitnessMode::Gateway && targets.is_empty() {
            targets = default_gateway_in(a, prefix).map(|g| vec![g.to_string()]).unwrap_or_default();
        }
        if witness != WitnessMode::None {
            let joined = targets.join(",");
            targets = p.ask("Witness targets (comma-separated IP or IP:PORT)", Some(&joined), |s| {
                let list: Vec<String> = s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect();
                if list.is_empty() {
                    return Err("give at least one target".to_string());
                }
                match list.iter().find(|x| parse_target(x).is_none()) {
                    Some(bad) => Err(format!("`{bad}` is not an IP or IP:PORT")),
                    None => Ok(list),
                }
            })?;
        }
    }

    let mut missing = Vec::new();
    if name.is_none() {
        missing.push("--name");
    }
    if ip1.is_none() {
        missing.push("--node1-ip");
    }
    if ip2.is_none() {
        missing.push("--node2-ip");
    }
    if vip.is_none() {
        missing.push("--vip");
    }
    if !missing.is_empty() {
        bail!("missing {} (give the flags, put them in --template, or run with --interactive)", missing.join(", "));
    }
    let name = check_name(&name.expect("checked")).map_err(anyhow::Error::msg).context("--name")?;
    if witness == WitnessMode::Gateway && targets.is_empty() {
        let node = ip1.expect("checked");
        match default_gateway_in(node, prefix) {
            Some(gateway) if chosen.is_none() => {
                eprintln!(
                    "witness: gateway {gateway} (this machine's default gateway, in the nodes' subnet); check that \
                     it is the nodes' router, or choose with --witness"
                );
                targets.push(gateway.to_string());
            }
            _ => bail!(
                "choose how the cluster tells a dead peer from a cut link: {}\n{WITNESS_CHOICES}",
                if chosen.is_none() {
                    "no --witness given and this machine's default gateway is not in the nodes' subnet"
                } else {
                    "--witness gateway needs --witness-target"
                }
            ),
        }
    }
    if witness == WitnessMode::None {
        eprintln!("warning: {NONE_RISK}");
    }
    let bootstrap_leader =
        args.bootstrap_leader.clone().or_else(|| t("cluster.bootstrap_leader")).unwrap_or_else(|| names[0].clone());
    Ok(Plan {
        name,
        nodes: [(names[0].clone(), ip1.expect("checked")), (names[1].clone(), ip2.expect("checked"))],
        vip: vip.expect("checked"),
        vip_prefix: prefix,
        interface,
        bootstrap_leader,
        witness,
        witness_targets: targets,
    })
}

const WITNESS_CHOICES: &str = "  --witness gateway --witness-target ROUTER_IP   (recommended) the nodes' router: a leader cut off \
from peer and router fences itself, a follower takes over only while it reaches the router
  --witness arbiter --witness-target IP:PORT     `gemin_k8s witness serve` on a third box: a lease, and a record of which \
node holds every acknowledged write (safest; survives a second fault)
  --witness none                                 the peer alone decides (risk printed)";

const NONE_RISK: &str = "witness `none`: a node cut off from everyone cannot tell that from a dead peer; both may lead, \
and writes the cut-off leader acknowledges once it stops waiting for its peer (postgres.degrade_after) are discarded when \
the network heals. Use `gateway` or `arbiter` unless the two nodes share a cable that cannot fail alone";

/// This machine's IPv4 default gateway, when it lies in `node`'s subnet
/// (`init` is often run from a machine on the nodes' LAN).
fn default_gateway_in(node: IpAddr, prefix: u8) -> Option<IpAddr> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    let gateway = parse_default_gateway(&routes)?;
    same_subnet(gateway, node, prefix).then_some(gateway)
}

/// The default route's gateway in `/proc/net/route` (hexadecimal, little-endian).
fn parse_default_gateway(routes: &str) -> Option<IpAddr> {
    routes.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (destination, gateway) = (fields.get(1)?, fields.get(2)?);
        if *destination != "00000000" {
            return None;
        }
        let raw = u32::from_str_radix(gateway, 16).ok()?;
        (raw != 0).then(|| IpAddr::from(raw.to_le_bytes()))
    })
}

struct Secrets {
    api_token: String,
    replication_password: String,
    kine_password: String,
    k3s_token: String,
}

/// The cloud-config text of node `i` (0 or 1).
fn node_file(
    plan: &Plan,
    template: &Template,
    secrets: &Secrets,
    pki: &pki::ClusterPki,
    i: usize,
) -> anyhow::Result<String> {
    let (me, peer) = (&plan.nodes[i], &plan.nodes[1 - i]);
    let member = |(name, ip): &(String, IpAddr)| Member { name: name.clone(), ip: *ip, api_port: 7443 };
    let defaults = GeminiConfig {
        cluster: crate::config::Cluster {
            name: plan.name.clone(),
            vip: plan.vip,
            vip_prefix: plan.vip_prefix,
            interface: None,
            bootstrap_leader: plan.bootstrap_leader.clone(),
            witness: Default::default(),
        },
        node: member(me),
        peer: member(peer),
        api: crate::config::Api { token: String::new() },
        postgres: Postgres::default(),
        kine: Kine::default(),
        k3s: crate::config::K3s::with_token(""),
        health: Health::default(),
        tls: crate::config::Tls { ca: String::new(), cert: String::new(), key: String::new(), crl: None },
        backup: crate::config::Backup::default(),
    };
    let mut block = serde_json::to_value(&defaults).context("serialising defaults")?;
    merge_json(&mut block, &template.block);
    merge_json(
        &mut block,
        &json!({
            "cluster": {
                "name": plan.name, "vip": plan.vip.to_string(), "vip_prefix": plan.vip_prefix,
                "bootstrap_leader": plan.bootstrap_leader,
                "witness": {"mode": plan.witness, "targets": plan.witness_targets},
            },
            "node": {"name": me.0, "ip": me.1.to_string()},
            "peer": {"name": peer.0, "ip": peer.1.to_string()},
            "api": {"token": secrets.api_token},
            "postgres": {"replication_password": secrets.replication_password, "kine_password": secrets.kine_password},
            "k3s": {"token": secrets.k3s_token},
            "tls": {"ca": pki.ca.cert, "cert": pki.nodes[i].cert, "key": pki.nodes[i].key},
        }),
    );
    if let Some(iface) = &plan.interface {
        block["cluster"]["interface"] = json!(iface);
    }
    let mut document = serde_json::Map::new();
    document.insert("hostname".into(), json!(me.0));
    for (k, v) in &template.document {
        document.insert(k.clone(), v.clone());
    }
    document.insert("geminik8s".into(), block);
    Ok(format!(
        "{HEADER}\n# geminik8s node `{}` of cluster `{}`, written by `gemin_k8s init`.\n\
         # Holds this node's private key and the cluster's secrets: keep it private.\n\
         # Reference: docs/cloud-config.md. Check edits with `gemin_k8s config validate`.\n{}",
        me.0,
        plan.name,
        yaml::to_yaml(&Value::Object(document))
    ))
}

fn planned(dir: &Path, rel: &str, contents: Vec<u8>, mode: u32) -> PlannedFile {
    let path = dir.join(rel);
    PlannedFile {
        exists: path.exists(),
        bytes: contents.len(),
        mode: format!("{mode:04o}"),
        mode_bits: mode,
        path,
        contents,
    }
}

/// The site enrolment token in the cluster directory.
pub const ENROLMENT_TOKEN: &str = "enrolment.token";
/// The same token as a cloud-config for unconfigured nodes.
pub const ENROLMENT_CONFIG: &str = "enrolment.yaml";

/// Build every file in memory and validate the node files with the agent's loader.
pub fn build(plan: &Plan, dir: &Path, template_path: Option<&Path>) -> anyhow::Result<Vec<PlannedFile>> {
    let template = match template_path {
        Some(p) => load_template(p)?,
        None => Template::default(),
    };
    build_with(plan, dir, &template)
}

fn build_with(plan: &Plan, dir: &Path, template: &Template) -> anyhow::Result<Vec<PlannedFile>> {
    let secrets = Secrets {
        api_token: secrets::generate(40),
        replication_password: secrets::generate(32),
        kine_password: secrets::generate(32),
        k3s_token: secrets::generate(48),
    };
    let witness_ip = match plan.witness {
        WitnessMode::Arbiter => plan.witness_targets.first().and_then(|t| parse_target(t)).map(|(ip, _)| ip),
        _ => None,
    };
    let pki = pki::generate(&plan.name, &plan.nodes, plan.vip, witness_ip).context("generating certificates")?;
    let mut files = Vec::new();
    let mut entries = Vec::new();
    for i in 0..2 {
        let text = node_file(plan, template, &secrets, &pki, i)?;
        let rel = format!("{}.yaml", plan.nodes[i].0);
        let source = Source { name: dir.join(&rel).display().to_string(), text };
        let loaded =
            load_sources(std::slice::from_ref(&source), &CheckContext { check_files: false, ..Default::default() })
                .with_context(|| format!("the generated {rel} does not validate"))?;
        entries.push(NodeEntry { member: loaded.gemini.node.clone(), cloud_config: PathBuf::from(&rel) });
        files.push(planned(dir, &rel, source.text.into_bytes(), 0o600));
    }
    let cluster = ClusterFile {
        schema_version: clusterfile::SCHEMA_VERSION,
        name: plan.name.clone(),
        vip: plan.vip,
        vip_prefix: plan.vip_prefix,
        interface: plan.interface.clone(),
        bootstrap_leader: plan.bootstrap_leader.clone(),
        witness: WitnessSummary { mode: plan.witness, targets: plan.witness_targets.clone() },
        nodes: entries,
        api_token: secrets.api_token.clone(),
        pki: PkiPaths {
            ca_cert: "pki/ca.crt".into(),
            ca_key: "pki/ca.key".into(),
            operator_cert: "pki/operator.crt".into(),
            operator_key: "pki/operator.key".into(),
            witness_cert: pki.witness.as_ref().map(|_| "pki/witness.crt".into()),
            witness_key: pki.witness.as_ref().map(|_| "pki/witness.key".into()),
            crl: None,
        },
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    files.insert(0, planned(dir, clusterfile::FILE_NAME, cluster.render()?.into_bytes(), 0o600));
    files.push(planned(dir, "pki/ca.crt", pki.ca.cert.into_bytes(), 0o644));
    files.push(planned(dir, "pki/ca.key", pki.ca.key.into_bytes(), 0o600));
    files.push(planned(dir, "pki/operator.crt", pki.operator.cert.into_bytes(), 0o644));
    files.push(planned(dir, "pki/operator.key", pki.operator.key.into_bytes(), 0o600));
    if let Some(w) = pki.witness {
        files.push(planned(dir, "pki/witness.crt", w.cert.into_bytes(), 0o644));
        files.push(planned(dir, "pki/witness.key", w.key.into_bytes(), 0o600));
    }
    // The site enrolment token: for `deploy`, and as a cloud-config for the
    // generic image's /oem or boot media (nodes without a configuration
    // wait for `deploy` with it).
    let token = secrets::generate(40);
    files.push(planned(dir, ENROLMENT_TOKEN, format!("{token}\n").into_bytes(), 0o600));
    let enrolment = format!(
        "{HEADER}\n# The site enrolment token of cluster `{}`: on the generic image's /oem or boot media, a node\n\
         # without a configuration waits for `gemin_k8s deploy --token-file {ENROLMENT_TOKEN}`. Keep it private.\n\
         {}:\n  token: {token}\n",
        plan.name,
        crate::enrol::KEY
    );
    files.push(planned(dir, ENROLMENT_CONFIG, enrolment.into_bytes(), 0o600));
    Ok(files)
}

/// Write the planned files (directories 0700), each atomically.
pub fn write(dir: &Path, files: &[PlannedFile]) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    for file in files {
        if let Some(parent) = file.path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        fsutil::write_atomic(&file.path, &file.contents, file.mode_bits)?;
    }
    tracing::debug!(dir = %dir.display(), files = files.len(), "cluster written");
    Ok(())
}

pub async fn run(args: Args, _global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let template = match &args.template {
        Some(p) => load_template(p)?,
        None => Template::default(),
    };
    let plan = resolve(&args, &template)?;
    let dir = args.config_dir.clone().unwrap_or_else(|| PathBuf::from(&plan.name));
    let files = build_with(&plan, &dir, &template)?;
    let existing: Vec<String> = files.iter().filter(|f| f.exists).map(|f| f.path.display().to_string()).collect();
    if !existing.is_empty() && !args.force && !args.dry_run {
        bail!(
            "refusing to overwrite existing files: {}\n  nothing was written; pass --force to replace them (this makes new secrets and a new CA)",
            existing.join(", ")
        );
    }
    if !args.dry_run {
        write(&dir, &files)?;
    }
    let summary = Summary { dry_run: args.dry_run, config_dir: &dir, cluster: &plan, files: &files };
    if let Some(text) = render(&summary, args.output)? {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if args.dry_run { "would write" } else { "wrote" };
    println!(
        "cluster `{}`: {} ({}) and {} ({}), VIP {}/{}, bootstrap leader {}, witness {}",
        plan.name,
        plan.nodes[0].0,
        plan.nodes[0].1,
        plan.nodes[1].0,
        plan.nodes[1].1,
        plan.vip,
        plan.vip_prefix,
        plan.bootstrap_leader,
        serde_json::to_value(plan.witness)?.as_str().unwrap_or_default()
    );
    for f in &files {
        let note = if f.exists { if args.dry_run { " (exists: needs --force)" } else { " (replaced)" } } else { "" };
        println!("  {verb} {} (mode {}, {} bytes){note}", f.path.display(), f.mode, f.bytes);
    }
    if args.dry_run {
        println!("dry run: both node files validated; nothing was written");
    } else {
        println!(
            "next: check with `gemin_k8s config validate --no-file-checks {}`",
            dir.join(format!("{}.yaml", plan.nodes[0].0)).display()
        );
        println!("      then give each node its file as CIDATA user-data, or place it in /oem on the node's image");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_gateway_from_proc_net_route() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                      eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
                      eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(parse_default_gateway(routes), Some("192.168.0.1".parse().unwrap()));
        assert_eq!(parse_default_gateway("Iface\tDestination\tGateway\n"), None);
    }
}
