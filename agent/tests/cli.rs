//! The operator CLI as a user runs it: the real `gemin_k8s` binary.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use geminik8s::clusterfile::ClusterFile;
use geminik8s::config::{CheckContext, Durability, load_files};

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gemin_k8s"));
    cmd.env_remove("GEMINIK8S_UPDATE_URL").env_remove("GEMINIK8S_CONFIG");
    cmd
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("gemin_k8s runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const LAB: &[&str] = &[
    "init",
    "--name",
    "lab",
    "--node1-ip",
    "10.77.0.11",
    "--node2-ip",
    "10.77.0.12",
    "--vip",
    "10.77.0.10",
    "--witness",
    "gateway",
    "--witness-target",
    "10.77.0.254",
];

fn init_into(dir: &Path, extra: &[&str]) -> Output {
    let mut args = LAB.to_vec();
    let d = dir.to_str().unwrap();
    args.extend(["--config-dir", d]);
    args.extend(extra);
    run(&args)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_writes_a_cluster_the_agent_loader_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let out = init_into(&dir, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let ctx = CheckContext { check_files: false, ..Default::default() };
    let n1 = load_files(&[dir.join("node1.yaml")], &ctx).unwrap_or_else(|d| panic!("{d}"));
    let n2 = load_files(&[dir.join("node2.yaml")], &ctx).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!((n1.gemini.node.name.as_str(), n1.gemini.peer.name.as_str()), ("node1", "node2"));
    assert_eq!(
        (n2.gemini.node.ip.to_string(), n2.gemini.peer.ip.to_string()),
        ("10.77.0.12".into(), "10.77.0.11".into())
    );
    assert_eq!(n1.gemini.cluster.vip.to_string(), "10.77.0.10");
    assert_eq!(n1.gemini.cluster.bootstrap_leader, "node1");
    assert_eq!(n1.hostname(), Some("node1"));
    // Shared secrets agree; private keys do not travel.
    assert_eq!(n1.gemini.api.token, n2.gemini.api.token);
    assert_eq!(n1.gemini.postgres.replication_password, n2.gemini.postgres.replication_password);
    assert_eq!(n1.gemini.k3s.token, n2.gemini.k3s.token);
    assert_eq!(n1.gemini.tls.ca, n2.gemini.tls.ca);
    assert_ne!(n1.gemini.tls.key, n2.gemini.tls.key);
    let f1 = std::fs::read_to_string(dir.join("node1.yaml")).unwrap();
    let f2 = std::fs::read_to_string(dir.join("node2.yaml")).unwrap();
    let ca_key = std::fs::read_to_string(dir.join("pki/ca.key")).unwrap();
    assert!(
        !f1.contains(n2.gemini.tls.key.trim()) && !f2.contains(n1.gemini.tls.key.trim()),
        "a node file holds the other node's key"
    );
    for (name, f) in [("node1", &f1), ("node2", &f2)] {
        assert!(!f.contains(ca_key.lines().nth(1).unwrap()), "{name}.yaml holds the CA key");
        assert_eq!(f.matches("PRIVATE KEY-----").count(), 2, "{name}.yaml should hold exactly one private key");
    }

    let cluster = ClusterFile::load(&dir.join("cluster.yaml")).unwrap();
    assert_eq!(cluster.api_token, n1.gemini.api.token);
    assert_eq!(cluster.nodes.len(), 2);
    for secret in ["cluster.yaml", "node1.yaml", "node2.yaml", "pki/ca.key", "pki/operator.key"] {
        assert_eq!(mode(&dir.join(secret)), 0o600, "{secret}");
    }
    assert_eq!(mode(&dir), 0o700);

    // Two clusters never share secrets.
    let other = tmp.path().join("other");
    assert!(init_into(&other, &[]).status.success());
    let o1 = load_files(&[other.join("node1.yaml")], &ctx).unwrap();
    assert_ne!(o1.gemini.api.token, n1.gemini.api.token);
    assert_ne!(o1.gemini.tls.ca, n1.gemini.tls.ca);
}

#[test]
fn dry_run_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let out = init_into(&dir, &["--dry-run"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("nothing was written"), "{}", text(&out.stdout));
    assert!(!dir.exists(), "dry run created {}", dir.display());
    let json = init_into(&dir, &["--dry-run", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["dry_run"], true);
    let files: Vec<String> = v["files"].as_array().unwrap().iter().map(|f| f.to_string()).collect();
    assert_eq!(files.len(), 9, "{files:?}");
    assert!(files.iter().any(|f| f.contains("enrolment.token")) && files.iter().any(|f| f.contains("enrolment.yaml")));
    assert!(!text(&json.stdout).contains("PRIVATE KEY"), "the plan must not print secrets");
    assert!(!dir.exists());
}

#[test]
fn init_refuses_to_overwrite_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    assert!(init_into(&dir, &[]).status.success());
    let before = std::fs::read(dir.join("node1.yaml")).unwrap();
    let again = init_into(&dir, &[]);
    assert!(!again.status.success());
    let err = text(&again.stderr);
    assert!(err.contains("refusing to overwrite") && err.contains("--force") && err.contains("node1.yaml"), "{err}");
    assert_eq!(std::fs::read(dir.join("node1.yaml")).unwrap(), before, "a refused init changed node1.yaml");
    assert!(init_into(&dir, &["--force"]).status.success());
    assert_ne!(std::fs::read(dir.join("node1.yaml")).unwrap(), before, "--force should write new secrets");
}

#[test]
fn init_names_the_missing_flags_and_bad_values() {
    let out = run(&["init", "--name", "lab", "--node1-ip", "10.77.0.11"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("--node2-ip") && err.contains("--vip") && err.contains("--interactive"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("x");
    let out = run(&[
        "init",
        "--name",
        "lab",
        "--node1-ip",
        "10.77.0.11",
        "--node2-ip",
        "10.78.0.12",
        "--vip",
        "10.77.0.10",
        "--witness",
        "none",
        "--config-dir",
        d.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("geminik8s.peer.ip") && err.contains("not in 10.77.0.0/24"), "{err}");
    assert!(!d.exists());
}

/// A new cluster never gets the mode that can lose data by default: without
/// `--witness` (and no default gateway of this machine in the nodes' subnet)
/// `init` explains the choices; `none` must be chosen and says what it risks.
#[test]
fn init_makes_the_witness_an_explicit_choice() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("w");
    let base = ["init", "--name", "lab", "--node1-ip", "198.51.100.11", "--node2-ip", "198.51.100.12"];
    let mut args = base.to_vec();
    args.extend(["--vip", "198.51.100.10", "--config-dir", d.to_str().unwrap()]);
    let out = run(&args);
    assert!(!out.status.success(), "no witness chosen: {}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains("--witness gateway") && err.contains("--witness arbiter") && err.contains("--witness none"),
        "{err}"
    );
    assert!(!d.exists(), "nothing written");

    args.extend(["--witness", "none"]);
    let out = run(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("warning: witness `none`"), "{}", text(&out.stderr));
    let loaded =
        load_files(&[d.join("node1.yaml")], &CheckContext { check_files: false, ..Default::default() }).unwrap();
    assert_eq!(loaded.gemini.cluster.witness.mode, geminik8s::config::WitnessMode::None);

    let d2 = tmp.path().join("g");
    let mut args = base.to_vec();
    args.extend(["--vip", "198.51.100.10", "--config-dir", d2.to_str().unwrap(), "--witness", "gateway"]);
    let out = run(&args);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--witness gateway needs --witness-target"), "{}", text(&out.stderr));
}

#[test]
fn interactive_answers_from_a_pipe_are_validated_as_they_come() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    // name, node1 ip (bad, then good), node2 ip (same as node1, then good), prefix (default),
    // VIP (outside the subnet, then good), interface, witness mode, targets.
    let answers = "shop-17\n10.0.0\n192.168.50.11\n192.168.50.11\n192.168.50.12\n\n192.168.51.10\n192.168.50.10\neth1\ngateway\n192.168.50.1\n";
    let mut child = bin()
        .args(["init", "--interactive", "--config-dir", dir.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(answers.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("`10.0.0` is not an IP address"), "{err}");
    assert!(err.contains("already node1's address"), "{err}");
    assert!(err.contains("not in the nodes' /24 subnet"), "{err}");
    let loaded =
        load_files(&[dir.join("node2.yaml")], &CheckContext { check_files: false, ..Default::default() }).unwrap();
    let c = &loaded.gemini.cluster;
    assert_eq!(
        (c.name.as_str(), c.vip.to_string(), c.interface.as_deref()),
        ("shop-17", "192.168.50.10".into(), Some("eth1"))
    );
    assert_eq!(c.witness.targets, vec!["192.168.50.1".to_string()]);

    // Input that ends early is an error, not a half-written cluster.
    let dir2 = tmp.path().join("short");
    let mut child = bin()
        .args(["init", "--interactive", "--config-dir", dir2.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"lab\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("input ended"), "{}", text(&out.stderr));
    assert!(!dir2.exists());
}

#[test]
fn template_settings_and_kairos_keys_reach_both_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let template = tmp.path().join("site.yaml");
    std::fs::write(
        &template,
        "#cloud-config\nusers:\n- name: ops\n  ssh_authorized_keys: [\"ssh-ed25519 AAAA ops\"]\ngeminik8s:\n  postgres:\n    durability: async\n  health:\n    interval: 2s\n    fence_timeout: 8s\n",
    )
    .unwrap();
    let dir = tmp.path().join("lab");
    let out = init_into(&dir, &["--template", template.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for n in ["node1.yaml", "node2.yaml"] {
        let l = load_files(&[dir.join(n)], &CheckContext { check_files: false, ..Default::default() }).unwrap();
        assert_eq!(l.gemini.postgres.durability, Durability::Async, "{n}");
        assert_eq!(l.gemini.health.interval.as_secs(), 2, "{n}");
        assert_eq!(l.document["users"][0]["name"], "ops", "{n}");
    }

    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, "#cloud-config\ngeminik8s:\n  postgres:\n    durabilty: async\n").unwrap();
    let out = init_into(&tmp.path().join("x"), &["--template", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("bad.yaml:4:5") && err.contains("did you mean `durability`?"), "{err}");
}

#[test]
fn config_validate_reports_every_error_with_position() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    assert!(init_into(&dir, &[]).status.success());
    let good = dir.join("node1.yaml");
    let out = run(&["config", "validate", "--no-file-checks", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("ok:"), "{}", text(&out.stdout));

    let src = std::fs::read_to_string(&good).unwrap();
    let broken =
        src.replace("vip: 10.77.0.10", "vip: 10.77.0.300").replace("durability: synchronous", "durability: eventually");
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, &broken).unwrap();
    let line_of = |needle: &str| broken.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let out = run(&["config", "validate", "--no-file-checks", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let b = bad.display();
    assert!(
        err.contains(&format!("{b}:{}:", line_of("10.77.0.300"))) && err.contains("geminik8s.cluster.vip"),
        "{err}"
    );
    assert!(
        err.contains(&format!("{b}:{}:", line_of("eventually"))) && err.contains("geminik8s.postgres.durability"),
        "{err}"
    );
    assert!(err.contains("2 errors"), "{err}");

    let out = run(&["config", "validate", "--no-file-checks", "-o", "json", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["diagnostics"].as_array().unwrap().len(), 2);

    let out = run(&["config", "validate", tmp.path().join("nope.yaml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read the file"), "{}", text(&out.stderr));
}

/// Serve one HTTP response on loopback; returns the URL.
fn serve_once(body: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    format!("http://{addr}/stable.json")
}

#[test]
fn version_formats_and_update_check() {
    let out = run(&["version", "--short"]);
    assert_eq!(text(&out.stdout).trim(), env!("CARGO_PKG_VERSION"));
    let out = run(&["version", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["components"]["kine"], "v0.17.5");
    let out = run(&["version", "-o", "yaml"]);
    assert!(text(&out.stdout).contains("version: "), "{}", text(&out.stdout));

    let url = serve_once(r#"{"version": "99.0.0", "url": "https://example.invalid/r"}"#);
    let out = run(&["version", "--check-update", "--update-url", &url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("update available: 99.0.0"), "{}", text(&out.stdout));

    let url = serve_once(&*Box::leak(format!(r#"{{"version": "{}"}}"#, env!("CARGO_PKG_VERSION")).into_boxed_str()));
    let out = run(&["version", "--check-update", "--update-url", &url, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["update"]["status"], "up-to-date");

    // A closed loopback port stands in for an offline site.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = run(&[
        "version",
        "--check-update",
        "--update-url",
        &format!("http://{closed}/x.json"),
        "--update-timeout",
        "2s",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(err.contains("could not check for updates") && err.contains("GEMINIK8S_UPDATE_URL"), "{err}");
}

#[test]
fn completions_are_generated() {
    let out = run(&["completion", "bash"]);
    assert!(out.status.success());
    let s = text(&out.stdout);
    assert!(s.contains("gemin_k8s") && s.contains("--node1-ip"), "bash completion lacks init flags");
}

#[test]
fn the_shipped_site_template_works_with_init() {
    let tmp = tempfile::tempdir().unwrap();
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cloud-config/site-template.yaml");
    let dir = tmp.path().join("site");
    let out = init_into(&dir, &["--template", template.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let l = load_files(&[dir.join("node1.yaml")], &CheckContext { check_files: false, ..Default::default() }).unwrap();
    assert_eq!(l.document["users"][0]["name"], "ops");
}
