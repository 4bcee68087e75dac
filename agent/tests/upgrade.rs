//! `gemin_k8s upgrade stage`, `slots` and `gate` on a node laid out in
//! files: an ESP with both slots' boot entries as gemin-image writes them,
//! the root partitions as files, the boot script's report, the running
//! image's release. The gate asks a stand-in for the agent's status socket
//! (a fixed answer over HTTP on a Unix socket), so what it judges is set by
//! the test.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use geminik8s::upgrade::bundle::{self, Bundle, Components, Release};
use geminik8s::upgrade::node::StageRequest;
use geminik8s::upgrade::slot::BootPaths;
use geminik8s::upgrade::{BootState, NodeFiles};

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new(booted: &str) -> Node {
        let node = Node { dir: tempfile::tempdir().unwrap() };
        let entries = node.path("efi/loader/entries");
        fs::create_dir_all(&entries).unwrap();
        for (slot, version) in [("a", 1), ("b", 0)] {
            let entry = format!(
                "title geminik8s (slot {})\nsort-key geminik8s\nversion {version}\nlinux /gemin/{slot}/vmlinuz\ninitrd /gemin/{slot}/initrd.img\noptions boot=gemin gemin.slot={slot} gemin.root=PARTLABEL=gemin-root-{slot}\n",
                slot.to_uppercase()
            );
            fs::write(entries.join(format!("gemin-{slot}.conf")), entry).unwrap();
            fs::create_dir_all(node.path("parts")).unwrap();
            fs::File::create(node.path(&format!("parts/gemin-root-{slot}"))).unwrap().set_len(4 << 20).unwrap();
        }
        node.boot(booted);
        let release = node.path("root").join(bundle::RELEASE_FILE);
        fs::create_dir_all(release.parent().unwrap()).unwrap();
        fs::write(&release, serde_json::to_string(&release_of("1.0.0", 15)).unwrap()).unwrap();
        node
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The boot script's report of a boot from `slot`.
    fn boot(&self, slot: &str) {
        fs::write(self.path("boot.env"), format!("GEMIN_SLOT={slot}\n")).unwrap();
    }

    /// What the boot loader does when it starts a counted entry.
    fn loader_starts(&self, from: &str, to: &str) {
        let entries = self.path("efi/loader/entries");
        fs::rename(entries.join(from), entries.join(to)).unwrap();
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gemin_k8s"));
        cmd.arg("upgrade").args(args);
        for (flag, rel) in [
            ("--esp", "efi"),
            ("--boot-env", "boot.env"),
            ("--partlabels", "parts"),
            ("--root", "root"),
            ("--state-dir", "state"),
        ] {
            cmd.arg(flag).arg(self.path(rel));
        }
        cmd.output().unwrap()
    }

    fn slots(&self) -> serde_json::Value {
        let out = self.run(&["slots", "--output", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn entry_files(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.path("efi/loader/entries"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn release_of(version: &str, postgresql_major: u32) -> Release {
    Release {
        name: "geminik8s".into(),
        version: version.into(),
        components: Components {
            postgresql_major,
            agent: "sha256:11".into(),
            kine: "sha256:22".into(),
            k3s: "sha256:33".into(),
        },
    }
}

fn make_bundle(dir: &Path, version: &str, postgresql_major: u32) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(bundle::KERNEL), format!("kernel {version}")).unwrap();
    fs::write(dir.join(bundle::INITRD), format!("initrd {version}")).unwrap();
    let root: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(dir.join(bundle::ROOT), root).unwrap();
    Bundle::seal(dir, &release_of(version, postgresql_major)).unwrap();
    dir.to_path_buf()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A stand-in for the agent's status socket: every request gets `status`
/// (the current value) as the body of `GET /v1/status`.
fn fake_agent(socket: &Path, status: Arc<Mutex<serde_json::Value>>) {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            // The request line and headers, up to the blank line.
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line == "\r\n" {
                    break;
                }
                line.clear();
            }
            let body = serde_json::to_vec(&*status.lock().unwrap()).unwrap();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(&body));
            let _ = reader.read(&mut [0u8; 1]);
        }
    });
}

fn status(role: &str, healthy: bool) -> serde_json::Value {
    serde_json::json!({
        "cluster": "c", "node": "node1", "address": "10.0.0.1", "agent_version": "0", "role": role,
        "state": "steady", "epoch": 2,
        "peer": {"name": "node2", "address": "10.0.0.2", "reachable": true},
        "witness": {"mode": "arbiter", "state": "reachable"},
        "vip": {"address": "10.0.0.10", "held_here": false},
        "replication": {"durability": "standby", "streaming": healthy},
        "takeover": {"eligible": healthy},
        "components": [{"name": "postgresql", "state": "ok"}, {"name": "kine", "state": if healthy { "ok" } else { "failed" }}],
        "degraded": [],
    })
}

#[test]
fn stage_checks_the_release_writes_the_passive_slot_and_puts_it_on_trial() {
    let node = Node::new("a");
    let bundles = tempfile::tempdir().unwrap();

    let same = make_bundle(&bundles.path().join("same"), "1.0.0", 15);
    let out = node.run(&["stage", same.to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("already runs version 1.0.0"), "{}", text(&out));
    let pg16 = make_bundle(&bundles.path().join("pg16"), "2.0.0", 16);
    let out = node.run(&["stage", pg16.to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("15 -> 16"), "{}", text(&out));

    let v2 = make_bundle(&bundles.path().join("v2"), "2.0.0", 15);
    let out = node.run(&["stage", v2.to_str().unwrap(), "--dry-run", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["slot"].as_str(), report["version"].as_str()), (Some("b"), Some("2.0.0")));
    assert_eq!(node.entry_files(), ["gemin-a.conf", "gemin-b.conf"], "a dry run writes nothing");
    assert!(!node.path("state/trial.json").exists());

    let out = node.run(&["stage", v2.to_str().unwrap(), "--rollback-timeout", "90s"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("slot b holds version 2.0.0 and boots next"), "{}", text(&out));
    assert_eq!(node.entry_files(), ["gemin-a.conf", "gemin-b+1.conf"]);
    let root = fs::read(node.path("parts/gemin-root-b")).unwrap();
    assert_eq!(&root[..1_500_000], &fs::read(v2.join(bundle::ROOT)).unwrap()[..]);
    assert_eq!(fs::read_to_string(node.path("efi/gemin/b/vmlinuz")).unwrap(), "kernel 2.0.0");
    let slots = node.slots();
    assert_eq!((slots["booted"].as_str(), slots["next_boot"].as_str()), (Some("a"), Some("b")));
    assert_eq!(slots["trial"]["version"], "2.0.0");
    assert_eq!(slots["trial"]["from_version"], "1.0.0");
    assert_eq!(slots["trial"]["deadline_secs"], 90);
    let b = slots["entries"].as_array().unwrap().iter().find(|e| e["slot"] == "b").unwrap().clone();
    assert_eq!(b["counter"], serde_json::json!({"state": "trying", "left": 1, "done": 0}));
}

#[test]
fn the_gate_blesses_a_healthy_member_and_keeps_the_reasons_of_one_that_is_not() {
    let node = Node::new("a");
    let bundles = tempfile::tempdir().unwrap();
    let v2 = make_bundle(&bundles.path().join("v2"), "2.0.0", 15);
    let out = node.run(&["stage", v2.to_str().unwrap(), "--rollback-timeout", "2s"]);
    assert!(out.status.success(), "{}", text(&out));
    // The reboot into slot B: the boot loader takes its try.
    node.loader_starts("gemin-b+1.conf", "gemin-b+0-1.conf");
    node.boot("b");
    let socket = node.path("agent.sock");
    let answer = Arc::new(Mutex::new(status("follower", false)));
    fake_agent(&socket, answer.clone());

    let out = node.run(&["gate", "--socket", socket.to_str().unwrap(), "--interval", "200ms"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("kine is failed"), "{}", text(&out));
    let failed = node.slots()["last_failed_gate"].clone();
    assert_eq!(failed["version"], "2.0.0");
    let reasons: Vec<&str> = failed["reasons"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert!(reasons.iter().any(|r| r.contains("kine is failed")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("does not stream")), "{reasons:?}");

    *answer.lock().unwrap() = status("follower", true);
    let out = node.run(&["gate", "--socket", socket.to_str().unwrap(), "--interval", "200ms"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("passed the gate"), "{}", text(&out));
    assert!(node.slots()["trial"].is_null(), "the trial is over");
    // A later boot (blessed, no trial) passes without asking the agent.
    let out = node.run(&["gate", "--socket", "/nonexistent.sock"]);
    assert!(out.status.success() && text(&out).contains("no upgrade on trial"), "{}", text(&out));
}

#[test]
fn a_slot_whose_tries_ran_out_is_recorded_failed_and_the_old_slot_runs() {
    let node = Node::new("a");
    let bundles = tempfile::tempdir().unwrap();
    let v2 = make_bundle(&bundles.path().join("v2"), "2.0.0", 15);
    assert!(node.run(&["stage", v2.to_str().unwrap()]).status.success());
    // Slot B never got to the gate; its try is used, the boot loader went back to A.
    node.loader_starts("gemin-b+1.conf", "gemin-b+0-1.conf");
    let slots = node.slots();
    assert_eq!(slots["next_boot"], "a", "slot B is passed over");
    let out = node.run(&["gate", "--socket", "/nonexistent.sock"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("version 2.0.0 in slot b is not running: slot b (version 2.0.0) used up its tries"),
        "{}",
        text(&out)
    );
    let slots = node.slots();
    assert!(slots["trial"].is_null());
    let reasons = slots["last_failed_gate"]["reasons"].to_string();
    assert!(reasons.contains("used up its tries"), "{reasons}");
    // What `status` shows of it, from the same JSON the agent sends.
    let state: BootState = serde_json::from_value(slots).unwrap();
    assert_eq!(state.summary(), "slot a (geminik8s 1.0.0, good), next boot slot a; the other slot holds 2.0.0");
    let lines = state.failure_lines();
    assert!(lines[0].starts_with("last failed upgrade gate: version 2.0.0 in slot b at "), "{lines:?}");
    assert!(lines[1].contains("used up its tries"), "{lines:?}");
}

impl Node {
    fn files(&self) -> NodeFiles {
        NodeFiles {
            boot: BootPaths { esp: self.path("efi"), boot_env: self.path("boot.env"), partlabels: self.path("parts") },
            root: self.path("root"),
            state_dir: self.path("state"),
        }
    }

    /// The boot of the new slot passed its gate: `systemd-bless-boot`
    /// drops the entry's counter; the running root is the new release's.
    fn blessed(&self, from: &str, to: &str, version: &str) {
        self.loader_starts(from, to);
        let release = self.path("root").join(bundle::RELEASE_FILE);
        fs::write(&release, serde_json::to_string(&release_of(version, 15)).unwrap()).unwrap();
    }
}

/// The agent API's upgrade routes over mutual TLS with the operator's
/// certificate, on a node laid out in files; the reboot command only
/// leaves a mark.
#[tokio::test]
async fn the_agent_api_receives_a_bundle_stages_it_reboots_and_rolls_back() {
    use geminik8s::peer::client::AgentClient;
    use geminik8s::peer::server::{ApiHooks, Auth, UpgradeHooks, router, serve_tls};
    use geminik8s::peer::tls::TlsMaterial;
    use geminik8s::peer::{NodeStatus, Published};

    let node = Node::new("a");
    let bundles = tempfile::tempdir().unwrap();
    let v2 = make_bundle(&bundles.path().join("v2"), "2.0.0", 15);
    let nodes =
        vec![("node1".to_string(), "127.0.0.1".parse().unwrap()), ("node2".to_string(), "127.0.0.2".parse().unwrap())];
    let pki = geminik8s::pki::generate("lab", &nodes, "127.0.0.3".parse().unwrap(), None).unwrap();
    let tls = TlsMaterial::from_pem(&pki.ca.cert, &pki.nodes[0].cert, &pki.nodes[0].key).unwrap();
    let rebooted = node.path("rebooted");
    let hooks = Arc::new(ApiHooks {
        upgrade: UpgradeHooks::new(node.files(), vec!["touch".into(), rebooted.display().to_string()]),
        ..ApiHooks::default()
    });
    let shared = Arc::new(std::sync::RwLock::new(Published {
        hostmeta: None,
        status: NodeStatus { node: "node1".into(), ..NodeStatus::default() },
        counters: Default::default(),
        election: None,
        archive: None,
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let app = router(shared.clone(), Auth::tls("node2", "operator-token-0123456789"), hooks.clone());
    let server =
        tokio::spawn(serve_tls(listener, tokio::sync::watch::channel(tls.server_config().unwrap()).1, app, hooks));
    let operator = TlsMaterial::from_pem(&pki.ca.cert, &pki.operator.cert, &pki.operator.key).unwrap();
    let op = AgentClient::https(
        &url,
        &operator,
        Some("operator-token-0123456789".into()),
        std::time::Duration::from_secs(20),
    )
    .unwrap();

    // What status shows before: slot A, version 1.0.0, nothing recorded for B.
    let boot = op.status().await.unwrap().boot.expect("a node booted from a slot reports its slots");
    assert_eq!((boot.version(), boot.is_good(), boot.other_release.as_ref()), (Some("1.0.0"), true, None));
    let err = op.upgrade_rollback().await.unwrap_err();
    assert!(format!("{err:#}").contains("slot b holds no release this node recorded"), "{err:#}");

    let err = op.upgrade_send("passwd", &v2.join(bundle::ROOT)).await.unwrap_err();
    assert!(format!("{err:#}").contains("not a file of an upgrade bundle"), "{err:#}");
    let manifest = Bundle::open(&v2).unwrap();
    for name in [bundle::MANIFEST].into_iter().chain(bundle::FILES) {
        let (bytes, sha256) = op.upgrade_send(name, &v2.join(name)).await.unwrap();
        assert_eq!((bytes, sha256), bundle::sha256_file(&v2.join(name)).unwrap(), "{name} arrived changed");
        if name != bundle::MANIFEST {
            assert_eq!(bytes, manifest.file(name).bytes);
        }
    }
    let req = StageRequest { tries: 2, rollback_timeout_secs: 300, dry_run: false };
    let staged = op.upgrade_stage(&req).await.unwrap();
    assert_eq!(
        (staged.slot.letter(), staged.version.as_str(), staged.from_version.as_deref()),
        ("b", "2.0.0", Some("1.0.0"))
    );
    assert_eq!(node.entry_files(), ["gemin-a.conf", "gemin-b+2.conf"]);
    assert!(!node.path("state/incoming").exists(), "the received bundle is removed once staged");
    let root = fs::read(node.path("parts/gemin-root-b")).unwrap();
    assert_eq!(&root[..1_500_000], &fs::read(v2.join(bundle::ROOT)).unwrap()[..]);
    let boot = op.status().await.unwrap().boot.unwrap();
    assert_eq!(boot.next_boot.map(|s| s.letter()), Some("b"));
    assert_eq!(boot.trial.as_ref().map(|t| t.version.as_str()), Some("2.0.0"));
    // Staging again without a bundle is refused and changes nothing.
    let err = op.upgrade_stage(&req).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("is this an upgrade bundle") || format!("{err:#}").contains("upgrade.json"),
        "{err:#}"
    );

    // Without the agent loop (this API alone) a leave cannot be asked.
    let err = op.upgrade_leave().await.unwrap_err();
    assert!(format!("{err:#}").contains("does not run the agent loop"), "{err:#}");
    // A leader is never rebooted: it hands over first.
    shared.write().unwrap().status.role = "leader".into();
    let err = op.upgrade_reboot().await.unwrap_err();
    assert!(format!("{err:#}").contains("switch over to its peer before it reboots"), "{err:#}");
    assert!(!rebooted.exists());
    shared.write().unwrap().status.role = "follower".into();
    op.upgrade_reboot().await.unwrap();
    assert!(rebooted.exists(), "the reboot command did not run");

    // The node came back on B and passed its gate.
    node.boot("b");
    node.blessed("gemin-b+2.conf", "gemin-b.conf", "2.0.0");
    fs::remove_file(node.path("state/trial.json")).unwrap();
    let boot = op.status().await.unwrap().boot.unwrap();
    assert_eq!((boot.version(), boot.is_good()), (Some("2.0.0"), true));
    assert_eq!(boot.other_release.as_ref().map(|r| r.version.as_str()), Some("1.0.0"), "slot A's release was recorded");

    let back = op.upgrade_rollback().await.unwrap();
    assert_eq!((back.slot.letter(), back.version.as_str()), ("a", "1.0.0"));
    let boot = op.status().await.unwrap().boot.unwrap();
    assert_eq!(boot.next_boot.map(|s| s.letter()), Some("a"), "slot A boots next");
    assert!(boot.trial.is_none());
    server.abort();
}
