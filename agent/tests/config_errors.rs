//! Bad cloud-config input: every case must name the file, the line and the
//! key, say what is wrong, and (where one helps) give a hint.

use std::path::Path;

use geminik8s::config::{CheckContext, Diagnostic, Source, load_sources};

const BASE: &str = r#"#cloud-config
hostname: node1
geminik8s:
  cluster:
    name: lab
    vip: 10.77.0.10
    vip_prefix: 24
    bootstrap_leader: node1
    witness:
      mode: none
  node:
    name: node1
    ip: 10.77.0.11
  peer:
    name: node2
    ip: 10.77.0.12
    api_port: 7443
  api:
    token: 0123456789abcdef0123
  postgres:
    durability: synchronous
    degrade_after: 30s
    port: 5432
    replication_password: 0123456789abcdef0123
    kine_password: 0123456789abcdef0123
  k3s:
    token: 0123456789abcdef0123
    extra_args: []
  health:
    interval: 1s
    fence_timeout: 5s
    checks:
      script: /usr/local/bin/check.sh
  tls:
    ca: "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"
    cert: /etc/geminik8s/tls/node.crt
    key: /etc/geminik8s/tls/node.key
"#;

/// A node root where the files BASE references exist.
fn root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["usr/local/bin/check.sh", "etc/geminik8s/tls/node.crt", "etc/geminik8s/tls/node.key"] {
        let p = dir.path().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "x").unwrap();
    }
    dir
}

/// BASE with line `n` (1-based) replaced by `with` (which may hold several lines, or none).
fn edit(n: usize, with: &str) -> String {
    let mut lines: Vec<&str> = BASE.lines().collect();
    lines[n - 1] = with;
    lines.join("\n") + "\n"
}

fn check_in(root: &Path, texts: &[&str]) -> Result<(), Vec<Diagnostic>> {
    let sources: Vec<Source> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| Source { name: format!("node{}.yaml", i + 1), text: t.to_string() })
        .collect();
    let ctx = CheckContext { root: root.to_path_buf(), check_files: true };
    match load_sources(&sources, &ctx) {
        Ok(_) => Ok(()),
        Err(d) => Err(d.0.into_iter().filter(|d| d.is_error()).collect()),
    }
}

fn errors(text: &str) -> Vec<Diagnostic> {
    let dir = root();
    check_in(dir.path(), &[text]).expect_err("the config should be rejected")
}

#[test]
fn the_base_config_is_valid() {
    let dir = root();
    check_in(dir.path(), &[BASE]).unwrap();
}

struct Case {
    name: &'static str,
    text: String,
    line: usize,
    key: &'static str,
    message: &'static str,
    hint: Option<&'static str>,
}

fn case(
    name: &'static str,
    text: String,
    line: usize,
    key: &'static str,
    message: &'static str,
    hint: Option<&'static str>,
) -> Case {
    Case { name, text, line, key, message, hint }
}

#[test]
fn each_bad_input_gets_a_specific_positioned_error() {
    let backup = |block: &str| edit(37, &format!("    key: /etc/geminik8s/tls/node.key\n  backup:\n{block}"));
    let cases = vec![
        case(
            "archiving without a key",
            backup("    destination: /mnt/usb/backups"),
            39,
            "geminik8s.backup.encryption_keys",
            "archived WAL holds every write",
            Some("gemin_k8s backup keygen"),
        ),
        case(
            "a relative destination",
            backup("    destination: backups\n    no_encryption: true"),
            39,
            "geminik8s.backup.destination",
            "a local destination is an absolute path",
            None,
        ),
        case(
            "an S3 destination without a bucket",
            backup("    destination: s3:///x\n    no_encryption: true"),
            39,
            "geminik8s.backup.destination",
            "is not a bucket name",
            None,
        ),
        case("broken YAML", edit(6, "    vip: [10.77.0.10"), 0, "", "invalid YAML", Some("indentation")),
        case("tab indentation", edit(7, "\tvip_prefix: 24"), 0, "", "invalid YAML", None),
        case("missing header", edit(1, "# config"), 1, "", "first line is not `#cloud-config`", Some("#cloud-config")),
        case("duplicate key", edit(7, "    vip: 10.77.0.9"), 7, "", "duplicate key `vip`", None),
        case(
            "bad IP",
            edit(6, "    vip: 10.77.0"),
            6,
            "geminik8s.cluster.vip",
            "is not an IP address",
            Some("10.77.0.10"),
        ),
        case(
            "CIDR instead of IP",
            edit(6, "    vip: 10.77.0.10/24"),
            6,
            "geminik8s.cluster.vip",
            "not a plain IP address",
            Some("vip_prefix"),
        ),
        case(
            "VIP outside the subnet",
            edit(6, "    vip: 10.78.0.10"),
            13,
            "geminik8s.node.ip",
            "is not in 10.78.0.0/24",
            Some("gratuitous ARP"),
        ),
        case("VIP is a node IP", edit(6, "    vip: 10.77.0.11"), 6, "geminik8s.cluster.vip", "is also `node.ip`", None),
        case(
            "equal node IPs",
            edit(16, "    ip: 10.77.0.11"),
            16,
            "geminik8s.peer.ip",
            "is also `node.ip`",
            Some("different addresses"),
        ),
        case(
            "IP families differ",
            edit(6, "    vip: fd00::10"),
            13,
            "geminik8s.node.ip",
            "different IP families",
            None,
        ),
        case(
            "VIP is the broadcast address",
            edit(6, "    vip: 10.77.0.255"),
            6,
            "geminik8s.cluster.vip",
            "broadcast",
            None,
        ),
        case(
            "unknown key",
            edit(7, "    vip_prefx: 24"),
            7,
            "geminik8s.cluster.vip_prefx",
            "unknown key `vip_prefx`",
            Some("did you mean `vip_prefix`?"),
        ),
        case(
            "key in the wrong section",
            edit(13, "    ip: 10.77.0.11\n    bootstrap_leader: node1"),
            14,
            "geminik8s.node.bootstrap_leader",
            "unknown key",
            Some("belongs at `geminik8s.cluster.bootstrap_leader`"),
        ),
        case(
            "misspelt top-level block",
            edit(2, "hostname: node1\ngeminik8z: {}"),
            3,
            "geminik8z",
            "unknown top-level key",
            Some("did you mean `geminik8s`?"),
        ),
        case(
            "quoted port",
            edit(23, "    port: \"5432\""),
            23,
            "geminik8s.postgres.port",
            "expected a port number",
            Some("remove the quotes"),
        ),
        case(
            "port out of range",
            edit(17, "    api_port: 70000"),
            17,
            "geminik8s.peer.api_port",
            "out of range",
            Some("1 to 65535"),
        ),
        case(
            "bad duration",
            edit(30, "    interval: fast"),
            30,
            "geminik8s.health.interval",
            "is not a duration",
            Some("500ms"),
        ),
        case(
            "duration without unit",
            edit(22, "    degrade_after: 30"),
            22,
            "geminik8s.postgres.degrade_after",
            "has no unit",
            Some("`30s`"),
        ),
        case(
            "zero duration",
            edit(22, "    degrade_after: 0s"),
            22,
            "geminik8s.postgres.degrade_after",
            "longer than zero",
            None,
        ),
        case(
            "bootstrap leader not a node",
            edit(8, "    bootstrap_leader: node3"),
            8,
            "geminik8s.cluster.bootstrap_leader",
            "is neither node",
            Some("`node1` or `node2`"),
        ),
        case("same node names", edit(15, "    name: node1"), 15, "geminik8s.peer.name", "is also `node.name`", None),
        case(
            "a certificate name as node name",
            edit(15, "    name: witness"),
            15,
            "geminik8s.peer.name",
            "`witness` is reserved",
            Some("choose another node name"),
        ),
        case(
            "invalid name",
            edit(5, "    name: Lab_1"),
            5,
            "geminik8s.cluster.name",
            "not a valid name",
            Some("lowercase"),
        ),
        case(
            "enum typo",
            edit(21, "    durability: synchronus"),
            21,
            "geminik8s.postgres.durability",
            "not a valid choice",
            Some("did you mean `synchronous`?"),
        ),
        case(
            "yes is not a boolean",
            edit(28, "    extra_args: []\n    enabled: yes"),
            29,
            "geminik8s.k3s.enabled",
            "is not a boolean",
            Some("`true` or `false`"),
        ),
        case(
            "list expected",
            edit(28, "    extra_args: --debug"),
            28,
            "geminik8s.k3s.extra_args",
            "expected a list",
            None,
        ),
        case(
            "managed K3s flag",
            edit(28, "    extra_args: [\"--token=abc\"]"),
            28,
            "geminik8s.k3s.extra_args",
            "`--token` is managed",
            None,
        ),
        case("short secret", edit(19, "    token: short"), 19, "geminik8s.api.token", "shorter than 16", Some("init")),
        case(
            "missing required key",
            edit(27, ""),
            26,
            "geminik8s.k3s.token",
            "required key is missing",
            Some("K3s server token"),
        ),
        case(
            "missing referenced file",
            edit(33, "      script: /usr/local/bin/missing.sh"),
            33,
            "geminik8s.health.checks.script",
            "does not exist",
            None,
        ),
        case("relative path", edit(36, "    cert: node.crt"), 36, "geminik8s.tls.cert", "not an absolute path", None),
        case(
            "truncated inline PEM",
            edit(35, "    ca: \"-----BEGIN CERTIFICATE-----\\nabc\""),
            35,
            "geminik8s.tls.ca",
            "no `-----END` line",
            None,
        ),
        case(
            "section given a scalar",
            BASE.replace("    witness:\n      mode: none\n", "    witness: gateway\n"),
            9,
            "geminik8s.cluster.witness",
            "expected a mapping",
            Some("mode"),
        ),
        case(
            "gateway without targets",
            edit(10, "      mode: gateway"),
            10,
            "geminik8s.cluster.witness.targets",
            "needs at least one target",
            None,
        ),
        case(
            "arbiter without a port",
            edit(10, "      mode: arbiter\n      targets: [10.77.0.5]"),
            11,
            "geminik8s.cluster.witness.targets",
            "exactly one `IP:PORT`",
            None,
        ),
        case(
            "witness is a cluster node",
            edit(10, "      mode: gateway\n      targets: [10.77.0.12]"),
            11,
            "geminik8s.cluster.witness.targets",
            "is a cluster address",
            Some("third machine"),
        ),
        case(
            "bad witness target",
            edit(10, "      mode: gateway\n      targets: [gateway.local]"),
            11,
            "geminik8s.cluster.witness.targets",
            "is not an IP or IP:PORT",
            None,
        ),
        case(
            "fence timeout not above interval",
            edit(31, "    fence_timeout: 500ms"),
            31,
            "geminik8s.health.fence_timeout",
            "longer than `health.interval`",
            None,
        ),
        case(
            "prefix too long for IPv4",
            edit(7, "    vip_prefix: 40"),
            7,
            "geminik8s.cluster.vip_prefix",
            "too long",
            Some("at most 32"),
        ),
    ];
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for c in &cases {
        let errs = errors(&c.text);
        let found = errs.iter().find(|d| {
            d.message.contains(c.message)
                && d.key == c.key
                && (c.line == 0 || d.line == c.line)
                && d.source == "node1.yaml"
                && c.hint.is_none_or(|h| d.hint.as_deref().is_some_and(|dh| dh.contains(h)))
        });
        match found {
            Some(d) => assert!(d.line > 0 && d.col > 0, "{}: no position in {d}", c.name),
            None => failures.push(format!(
                "{}: wanted line {} key `{}` message `{}` hint {:?}; got:\n    {}",
                c.name,
                c.line,
                c.key,
                c.message,
                c.hint,
                errs.iter().map(|d| format!("{d} [key {}]", d.key)).collect::<Vec<_>>().join("\n    ")
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let text = BASE
        .replace("vip: 10.77.0.10", "vip: nope")
        .replace("port: 5432", "port: 0")
        .replace("interval: 1s", "interval: x");
    let errs = errors(&text);
    let keys: Vec<&str> = errs.iter().map(|d| d.key.as_str()).collect();
    for k in ["geminik8s.cluster.vip", "geminik8s.postgres.port", "geminik8s.health.interval"] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
}

#[test]
fn later_sources_win_and_errors_name_the_file_that_set_the_value() {
    let dir = root();
    let override_ok = "#cloud-config\ngeminik8s:\n  postgres:\n    durability: async\n";
    check_in(dir.path(), &[BASE, override_ok]).unwrap();
    let override_bad = "#cloud-config\ngeminik8s:\n  postgres:\n    durability: sometimes\n";
    let errs = check_in(dir.path(), &[BASE, override_bad]).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!((errs[0].source.as_str(), errs[0].line), ("node2.yaml", 4), "{}", errs[0]);
}

#[test]
fn write_files_count_as_existing() {
    let dir = tempfile::tempdir().unwrap();
    let text = BASE.replace(
        "hostname: node1\n",
        "hostname: node1\nwrite_files:\n- path: /usr/local/bin/check.sh\n  content: exit 0\n- path: /etc/geminik8s/tls/node.crt\n- path: /etc/geminik8s/tls/node.key\n",
    );
    check_in(dir.path(), &[&text]).unwrap();
}

#[test]
fn missing_block_and_empty_input_are_explained() {
    let errs = errors("#cloud-config\nhostname: x\n");
    assert!(
        errs.iter().any(|d| d.message.contains("no `geminik8s:` block")
            && d.hint.as_deref().is_some_and(|h| h.contains("gemin_k8s init"))),
        "{errs:?}"
    );
    let dir = root();
    let errs = check_in(dir.path(), &[]).unwrap_err();
    assert!(errs[0].message.contains("no cloud-config found"), "{errs:?}");
}

#[test]
fn unknown_kairos_keys_warn_but_do_not_fail() {
    let dir = root();
    let text = BASE.replace("hostname: node1\n", "hostname: node1\nstages:\n  boot: []\nsomething_else: 1\n");
    let sources = [Source { name: "n.yaml".into(), text }];
    let loaded = load_sources(&sources, &CheckContext { root: dir.path().to_path_buf(), check_files: true }).unwrap();
    assert_eq!(loaded.document["stages"]["boot"], serde_json::json!([]));
    assert!(loaded.warnings.iter().any(|w| w.key == "something_else"), "{:?}", loaded.warnings);
    assert_eq!(loaded.hostname(), Some("node1"));
}
