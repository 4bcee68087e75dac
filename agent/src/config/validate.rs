//! Validation of a merged cloud-config document against [`schema::KEYS`],
//! then of the typed values against each other.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::diag::{Diagnostic, Severity, did_you_mean};
use super::schema::{self, Kind};
use super::types::{GeminiConfig, WitnessMode, is_inline_pem};
use super::yaml::{Kind as NodeKind, Node, Pos};

/// Where referenced files are looked up. Production uses `/`; tests and
/// `config validate --root` use another directory.
#[derive(Debug, Clone)]
pub struct CheckContext {
    pub root: PathBuf,
    /// Whether to check that referenced files exist (off when validating on
    /// a workstation for a node whose files are not there).
    pub check_files: bool,
}

impl Default for CheckContext {
    fn default() -> Self {
        CheckContext { root: PathBuf::from("/"), check_files: true }
    }
}

pub const BLOCK: &str = "geminik8s";

/// `k3s server` flags geminik8s sets itself.
const MANAGED_K3S_FLAGS: &[&str] = &[
    "--datastore-endpoint",
    "--token",
    "--token-file",
    "--node-ip",
    "--cluster-init",
    "--server",
    "--data-dir",
    "-d",
    "--write-kubeconfig",
    "-o",
];

struct Checker<'a> {
    names: &'a [String],
    out: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn push(&mut self, severity: Severity, pos: Option<Pos>, key: &str, message: String, hint: Option<String>) {
        let (source, line, col) = match pos {
            Some(p) => (self.names.get(p.source).cloned().unwrap_or_default(), p.line, p.col),
            None => (self.names.join(", "), 0, 0),
        };
        self.out.push(Diagnostic { severity, source, line, col, key: key.to_string(), message, hint });
    }

    fn error(&mut self, pos: Option<Pos>, key: &str, message: impl Into<String>, hint: Option<String>) {
        self.push(Severity::Error, pos, key, message.into(), hint);
    }

    fn has_errors(&self) -> bool {
        self.out.iter().any(Diagnostic::is_error)
    }
}

fn full(path: &str) -> String {
    if path.is_empty() { BLOCK.to_string() } else { format!("{BLOCK}.{path}") }
}

/// Validate a merged document. `names[i]` is the display name of source `i`.
/// Returns the typed block (when there are no errors) and every finding.
pub fn validate(doc: &Node, names: &[String], ctx: &CheckContext) -> (Option<GeminiConfig>, Vec<Diagnostic>) {
    let mut c = Checker { names, out: Vec::new() };
    let NodeKind::Map(entries) = &doc.kind else {
        c.error(Some(doc.pos), "", format!("the document is {}, not a mapping of keys", doc.type_name()), None);
        return (None, c.out);
    };
    for (key, pos, _) in entries {
        if key == BLOCK || key == crate::enrol::KEY || schema::KAIROS_KEYS.contains(&key.as_str()) {
            continue;
        }
        if strsim::damerau_levenshtein(key, BLOCK) <= 2 {
            c.error(
                Some(*pos),
                key,
                format!("unknown top-level key `{key}`"),
                Some(format!("did you mean `{BLOCK}`?")),
            );
        } else {
            let hint = did_you_mean(key, schema::KAIROS_KEYS.iter().copied())
                .map(|k| format!("did you mean `{k}`?"))
                .unwrap_or_else(|| "Kairos may not know it either; it is kept but not used by geminik8s".into());
            c.push(Severity::Warning, Some(*pos), key, format!("unknown top-level key `{key}`"), Some(hint));
        }
    }
    for f in super::kairos::check(doc) {
        c.error(Some(f.pos), &f.key, f.message, f.hint);
    }
    let Some(block) = doc.get(BLOCK) else {
        c.error(
            Some(doc.pos),
            BLOCK,
            "no `geminik8s:` block in any source",
            Some("generate node files with `gemin_k8s init`, or add the block by hand (docs/cloud-config.md)".into()),
        );
        return (None, c.out);
    };
    let written = written_files(doc);
    walk(&mut c, block, "", ctx, &written);
    required(&mut c, block, doc.key_pos(BLOCK));
    if c.has_errors() {
        return (None, c.out);
    }
    let config: GeminiConfig = match serde_json::from_value(block.to_json()) {
        Ok(config) => config,
        Err(e) => {
            c.error(doc.key_pos(BLOCK), BLOCK, format!("cannot read the block: {e}"), None);
            return (None, c.out);
        }
    };
    relations(&mut c, block, &config);
    if c.has_errors() { (None, c.out) } else { (Some(config), c.out) }
}

/// Paths created by the document's own `write_files`.
fn written_files(doc: &Node) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Some(Value::Array(files)) = doc.get("write_files").map(Node::to_json) {
        for file in files {
            if let Some(path) = file.get("path").and_then(Value::as_str) {
                out.insert(path.to_string());
            }
        }
    }
    out
}

fn walk(c: &mut Checker, node: &Node, parent: &str, ctx: &CheckContext, written: &BTreeSet<String>) {
    let entries = match &node.kind {
        NodeKind::Map(entries) => entries,
        NodeKind::Scalar { .. } if node.to_json().is_null() => return,
        _ => {
            let hint = Some(format!("`{}` holds keys: {}", full(parent), schema::children(parent).join(", ")));
            c.error(Some(node.pos), &full(parent), format!("expected a mapping, found {}", node.type_name()), hint);
            return;
        }
    };
    for (name, key_pos, value) in entries {
        let path = if parent.is_empty() { name.clone() } else { format!("{parent}.{name}") };
        let Some(key) = schema::key(&path) else {
            unknown_key(c, *key_pos, parent, name);
            continue;
        };
        if key.kind == Kind::Section {
            walk(c, value, &path, ctx, written);
            continue;
        }
        if let Err((message, hint)) = check_leaf(key.kind, value, !key.required) {
            c.error(Some(value.pos), &full(&path), message, hint);
            continue;
        }
        if ctx.check_files {
            check_file_exists(c, key.kind, value, &path, ctx, written);
        }
    }
}

fn unknown_key(c: &mut Checker, pos: Pos, parent: &str, name: &str) {
    let siblings = schema::children(parent);
    let hint = if let Some(close) = did_you_mean(name, siblings.iter().copied()) {
        format!("did you mean `{close}`?")
    } else if let Some(elsewhere) = schema::KEYS.iter().find(|k| k.path.rsplit('.').next() == Some(name)) {
        format!("`{name}` belongs at `{}`", full(elsewhere.path))
    } else if siblings.is_empty() {
        format!("`{}` takes no keys", full(parent))
    } else {
        format!("keys here: {}", siblings.join(", "))
    };
    c.error(Some(pos), &full(&format_path(parent, name)), format!("unknown key `{name}`"), Some(hint));
}

fn format_path(parent: &str, name: &str) -> String {
    if parent.is_empty() { name.to_string() } else { format!("{parent}.{name}") }
}

pub(super) type LeafError = (String, Option<String>);

pub(super) fn check_leaf(kind: Kind, node: &Node, nullable: bool) -> Result<(), LeafError> {
    let value = node.to_json();
    if value.is_null() {
        return if nullable { Ok(()) } else { Err(("a value is required here".into(), None)) };
    }
    let quoted_hint = |what: &str| Some(format!("write {what}"));
    match kind {
        Kind::Section => Ok(()),
        Kind::Bool => match &value {
            Value::Bool(_) => Ok(()),
            Value::String(s) if ["yes", "no", "on", "off", "y", "n"].contains(&s.to_lowercase().as_str()) => {
                Err((format!("`{s}` is not a boolean"), quoted_hint("`true` or `false` (YAML 1.2)")))
            }
            other => Err((format!("expected a boolean, found {}", describe(other)), quoted_hint("`true` or `false`"))),
        },
        Kind::Int { min, max } => match value.as_i64() {
            Some(n) if (min..=max).contains(&n) => Ok(()),
            Some(n) => Err((format!("{n} is out of range"), Some(format!("use a value from {min} to {max}")))),
            None => Err((format!("expected an integer, found {}", describe(&value)), integer_hint(&value))),
        },
        Kind::Port => match value.as_i64() {
            Some(n) if (1..=65535).contains(&n) => Ok(()),
            Some(n) => Err((format!("port {n} is out of range"), Some("ports are 1 to 65535".into()))),
            None => Err((format!("expected a port number, found {}", describe(&value)), integer_hint(&value))),
        },
        Kind::Duration => {
            let text = match &value {
                Value::String(s) => s.clone(),
                Value::Number(n) => {
                    return Err((format!("`{n}` has no unit"), Some(format!("write `{n}s` or `{n}ms`"))));
                }
                other => return Err((format!("expected a duration, found {}", describe(other)), None)),
            };
            match humantime::parse_duration(&text) {
                Ok(d) if d.is_zero() => Err(("the duration must be longer than zero".into(), None)),
                Ok(_) => Ok(()),
                Err(e) => Err((
                    format!("`{text}` is not a duration ({e})"),
                    quoted_hint("a number and a unit: `500ms`, `3s`, `5m`, `1h`"),
                )),
            }
        }
        _ => {
            let text = match (&value, kind) {
                (Value::Array(items), Kind::StrList | Kind::AddrList) => {
                    for (i, item) in items.iter().enumerate() {
                        let Some(s) = item.as_str() else {
                            let hint = Some("quote the entry".to_string());
                            return Err((format!("entry {} is {}, expected a string", i + 1, describe(item)), hint));
                        };
                        if kind == Kind::AddrList && parse_target(s).is_none() {
                            let hint = quoted_hint("an IP address (`10.77.0.1`) or `IP:PORT` (`10.77.0.1:7440`)");
                            return Err((format!("entry {}: `{s}` is not an IP or IP:PORT", i + 1), hint));
                        }
                    }
                    return Ok(());
                }
                (Value::String(s), Kind::StrList | Kind::AddrList) => {
                    let hint = format!("write a list: `[\"{s}\"]`");
                    return Err((format!("expected a list, found the string `{s}`"), Some(hint)));
                }
                (Value::String(s), _) => s.clone(),
                (other, Kind::StrList | Kind::AddrList) => {
                    return Err((
                        format!("expected a list, found {}", describe(other)),
                        quoted_hint("`[a, b]` or one `- item` per line"),
                    ));
                }
                (other, _) => {
                    return Err((
                        format!("expected a string, found {}", describe(other)),
                        Some("quote the value".into()),
                    ));
                }
            };
            check_text(kind, &text)
        }
    }
}

fn check_text(kind: Kind, text: &str) -> Result<(), LeafError> {
    match kind {
        Kind::Str => Ok(()),
        Kind::Name => {
            let ok = !text.is_empty()
                && text.len() <= 63
                && text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !text.starts_with('-')
                && !text.ends_with('-');
            if ok {
                Ok(())
            } else {
                Err((
                    format!("`{text}` is not a valid name"),
                    Some("use lowercase letters, digits and `-` (at most 63), not starting or ending with `-`".into()),
                ))
            }
        }
        Kind::Ip => match text.parse::<IpAddr>() {
            Ok(_) => Ok(()),
            Err(_) if text.contains('/') => Err((
                format!("`{text}` is not a plain IP address"),
                Some("give the prefix length in `cluster.vip_prefix` and only the address here".into()),
            )),
            Err(_) => Err((
                format!("`{text}` is not an IP address"),
                Some("write an IPv4 or IPv6 address, e.g. `10.77.0.10`".into()),
            )),
        },
        Kind::SocketAddr => match text.parse::<SocketAddr>() {
            Ok(_) => Ok(()),
            Err(_) => Err((format!("`{text}` is not an IP:PORT address"), Some("for example `127.0.0.1:2379`".into()))),
        },
        Kind::Enum(values) => {
            if values.contains(&text) {
                Ok(())
            } else {
                let hint = match did_you_mean(text, values.iter().copied()) {
                    Some(v) => format!("did you mean `{v}`?"),
                    None => format!("one of: {}", values.join(", ")),
                };
                Err((format!("`{text}` is not a valid choice"), Some(hint)))
            }
        }
        Kind::File | Kind::Dir => {
            if Path::new(text).is_absolute() {
                Ok(())
            } else {
                Err((format!("`{text}` is not an absolute path"), Some("paths on the node start with `/`".into())))
            }
        }
        Kind::Pem => {
            if is_inline_pem(text) {
                if text.contains("-----END ") {
                    Ok(())
                } else {
                    Err((
                        "the inline PEM has no `-----END` line".into(),
                        Some("paste the whole PEM block, or give a file path".into()),
                    ))
                }
            } else {
                check_text(Kind::File, text)
            }
        }
        Kind::Secret => {
            if text.chars().count() >= 16 {
                Ok(())
            } else {
                Err((
                    "the secret is shorter than 16 characters".into(),
                    Some("let `gemin_k8s init` generate secrets, or use a long random string".into()),
                ))
            }
        }
        _ => Ok(()),
    }
}

fn integer_hint(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if s.trim().parse::<i64>().is_ok() => Some("remove the quotes".into()),
        _ => None,
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing".into(),
        Value::Bool(b) => format!("the boolean `{b}`"),
        Value::Number(n) => format!("the number `{n}`"),
        Value::String(s) => format!("the string `{s}`"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

/// A witness target: `IP` or `IP:PORT`.
pub fn parse_target(text: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some((ip, None));
    }
    text.parse::<SocketAddr>().ok().map(|sa| (sa.ip(), Some(sa.port())))
}

fn check_file_exists(
    c: &mut Checker,
    kind: Kind,
    node: &Node,
    path: &str,
    ctx: &CheckContext,
    written: &BTreeSet<String>,
) {
    let Some(text) = node.to_json().as_str().map(str::to_string) else { return };
    let is_file_ref = match kind {
        Kind::File => true,
        Kind::Pem => !is_inline_pem(&text),
        _ => false,
    };
    if !is_file_ref || written.contains(&text) {
        return;
    }
    let on_disk = ctx.root.join(text.trim_start_matches('/'));
    if !on_disk.is_file() {
        let hint = if ctx.root == Path::new("/") {
            "create it on the node, add it to `write_files`, or (on a workstation) validate with `--no-file-checks`"
                .to_string()
        } else {
            format!("looked for {}", on_disk.display())
        };
        c.error(Some(node.pos), &full(path), format!("file `{text}` does not exist"), Some(hint));
    }
}

fn required(c: &mut Checker, block: &Node, block_pos: Option<Pos>) {
    for key in schema::KEYS.iter().filter(|k| k.required) {
        if block.lookup(key.path).is_some_and(|n| !n.to_json().is_null()) {
            continue;
        }
        // Point at the deepest ancestor that exists (`cluster:` when
        // `cluster.vip` is missing), else at `geminik8s:` itself.
        let parts: Vec<&str> = key.path.split('.').collect();
        let mut pos = block_pos;
        for i in 1..parts.len() {
            let parent = if i == 1 { Some(block) } else { block.lookup(&parts[..i - 1].join(".")) };
            match parent.and_then(|p| p.key_pos(parts[i - 1])) {
                Some(p) => pos = Some(p),
                None => break,
            }
        }
        c.error(
            pos,
            &full(key.path),
            "required key is missing".to_string(),
            Some(format!("{} ({})", key.doc, key.kind.describe())),
        );
    }
}

/// Checks between keys, once every key has the right type.
fn relations(c: &mut Checker, block: &Node, cfg: &GeminiConfig) {
    // Position of the first of `paths` present, else of the block itself.
    let at_any = |paths: &[&str]| paths.iter().find_map(|p| block.lookup(p)).map(|n| n.pos).or(Some(block.pos));
    let at = |path: &str| at_any(&[path]);
    let (node, peer, cluster) = (&cfg.node, &cfg.peer, &cfg.cluster);

    if node.name == peer.name {
        c.error(
            at("peer.name"),
            &full("peer.name"),
            format!("`{}` is also `node.name`", peer.name),
            Some("the two nodes need different names".into()),
        );
    }
    for (path, name) in [("node.name", &node.name), ("peer.name", &peer.name)] {
        if crate::peer::identity::RESERVED.contains(&name.as_str()) {
            c.error(
                at(path),
                &full(path),
                format!("`{name}` is reserved: it is the name in the {name}'s certificate"),
                Some(format!(
                    "choose another node name; `{}` identify the operator's and the witness's certificates",
                    crate::peer::identity::RESERVED.join("` and `")
                )),
            );
        }
    }
    if cluster.bootstrap_leader != node.name && cluster.bootstrap_leader != peer.name {
        c.error(
            at("cluster.bootstrap_leader"),
            &full("cluster.bootstrap_leader"),
            format!("`{}` is neither node", cluster.bootstrap_leader),
            Some(format!("use `{}` or `{}`", node.name, peer.name)),
        );
    }
    if node.ip == peer.ip {
        c.error(
            at("peer.ip"),
            &full("peer.ip"),
            format!("{} is also `node.ip`", peer.ip),
            Some("the two nodes need different addresses".into()),
        );
    }
    for (path, ip) in [("node.ip", node.ip), ("peer.ip", peer.ip)] {
        if ip == cluster.vip {
            c.error(
                at("cluster.vip"),
                &full("cluster.vip"),
                format!("the VIP {} is also `{path}`", cluster.vip),
                Some("the VIP must be a free address in the nodes' subnet".into()),
            );
        }
    }
    let max_prefix = if cluster.vip.is_ipv4() { 32 } else { 128 };
    if cluster.vip_prefix > max_prefix {
        c.error(
            at("cluster.vip_prefix"),
            &full("cluster.vip_prefix"),
            format!("/{} is too long for {}", cluster.vip_prefix, cluster.vip),
            Some(format!("use at most {max_prefix}")),
        );
    } else {
        for (path, ip) in [("node.ip", node.ip), ("peer.ip", peer.ip)] {
            if ip.is_ipv4() != cluster.vip.is_ipv4() {
                c.error(
                    at(path),
                    &full(path),
                    format!("{ip} and the VIP {} are of different IP families", cluster.vip),
                    Some("use IPv4 or IPv6 for all three".into()),
                );
            } else if !same_subnet(ip, cluster.vip, cluster.vip_prefix) {
                c.error(
                    at(path),
                    &full(path),
                    format!("{ip} is not in {}/{}, the VIP's subnet", network(cluster.vip, cluster.vip_prefix), cluster.vip_prefix),
                    Some("the VIP moves between the nodes by gratuitous ARP, so it must sit in their subnet; check `cluster.vip` and `cluster.vip_prefix`".into()),
                );
            }
        }
        if let IpAddr::V4(v4) = cluster.vip
            && cluster.vip_prefix < 31
        {
            let net = network(cluster.vip, cluster.vip_prefix);
            let bits = u32::from(v4);
            let host_mask = u32::MAX >> cluster.vip_prefix;
            if cluster.vip == net || bits & host_mask == host_mask {
                c.error(
                    at("cluster.vip"),
                    &full("cluster.vip"),
                    format!("{} is the network or broadcast address of /{}", cluster.vip, cluster.vip_prefix),
                    Some("pick a host address".into()),
                );
            }
        }
    }

    let witness = &cluster.witness;
    let targets_at = at_any(&["cluster.witness.targets", "cluster.witness.mode"]);
    match witness.mode {
        WitnessMode::None => {}
        WitnessMode::Gateway if witness.targets.is_empty() => c.error(
            targets_at,
            &full("cluster.witness.targets"),
            "mode `gateway` needs at least one target",
            Some("list addresses both nodes should always reach, e.g. the default gateway".into()),
        ),
        WitnessMode::Gateway => {}
        WitnessMode::Arbiter => {
            let ok =
                witness.targets.len() == 1 && parse_target(&witness.targets[0]).is_some_and(|(_, port)| port.is_some());
            if !ok {
                c.error(
                    targets_at,
                    &full("cluster.witness.targets"),
                    "mode `arbiter` needs exactly one `IP:PORT` target",
                    Some("the address of `gemin_k8s witness serve` on a third machine".into()),
                );
            }
        }
    }
    for target in &witness.targets {
        if let Some((ip, _)) = parse_target(target)
            && (ip == node.ip || ip == peer.ip || ip == cluster.vip)
        {
            c.error(
                targets_at,
                &full("cluster.witness.targets"),
                format!("{ip} is a cluster address"),
                Some("a witness must be a third machine".into()),
            );
        }
    }
    if witness.mode == WitnessMode::Arbiter && witness.lease_renew >= witness.lease_ttl.mul_f64(0.8) {
        c.error(
            at("cluster.witness.lease_renew"),
            &full("cluster.witness.lease_renew"),
            "must be shorter than 80% of `lease_ttl` (the holder trusts its lease that long)",
            Some("renew at most a third of the TTL".into()),
        );
    }
    let health = &cfg.health;
    if witness.mode == WitnessMode::Arbiter && witness.lease_ttl <= health.fence_timeout {
        c.error(
            at("cluster.witness.lease_ttl"),
            &full("cluster.witness.lease_ttl"),
            "must be longer than `health.fence_timeout`",
            Some("a leader that loses the witness must fence before its lease can pass to the peer".into()),
        );
    }
    if health.fence_timeout <= health.interval {
        c.error(
            at("health.fence_timeout"),
            &full("health.fence_timeout"),
            "must be longer than `health.interval`",
            Some("the default is 2s with a 500ms interval".into()),
        );
    }
    let backup = &cfg.backup;
    if let Some(dest) = &backup.destination {
        if backup.encryption_keys.is_empty() && !backup.no_encryption {
            c.error(
                at_any(&["backup.encryption_keys", "backup.destination"]),
                &full("backup.encryption_keys"),
                "archived WAL holds every write, Secrets included: give the keys to encrypt it to",
                Some("`gemin_k8s backup keygen --out FILE` on a machine you trust prints a public key (age1...) to list here; or set `backup.no_encryption: true`".into()),
            );
        }
        if let Err(e) = crate::backup::store::check_destination(dest) {
            c.error(at("backup.destination"), &full("backup.destination"), e.to_string(), None);
        }
        if let Some(Err(e)) = backup.schedule() {
            c.error(
                at("backup.schedule"),
                &full("backup.schedule"),
                format!("{:?} is not a cron expression: {e}", backup.schedule),
                Some(
                    "five fields, minute hour day month weekday (UTC): `0 */12 * * *` is twice a day; `off` takes none"
                        .into(),
                ),
            );
        }
    }
    if let Some(NodeKind::Seq(items)) = block.lookup("k3s.extra_args").map(|n| &n.kind) {
        for (item, text) in items.iter().zip(&cfg.k3s.extra_args) {
            let flag = text.split('=').next().unwrap_or_default();
            if MANAGED_K3S_FLAGS.contains(&flag) {
                c.error(
                    Some(item.pos),
                    &full("k3s.extra_args"),
                    format!("`{flag}` is managed by geminik8s"),
                    Some("remove it; the agent sets it from the rest of this block".into()),
                );
            }
        }
    }
}

pub fn network(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix.min(128))) };
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

pub fn same_subnet(a: IpAddr, b: IpAddr, prefix: u8) -> bool {
    a.is_ipv4() == b.is_ipv4() && network(a, prefix) == network(b, prefix)
}
