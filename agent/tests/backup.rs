//! `gemin_k8s backup` and `gemin_k8s restore` against real PostgreSQL 15:
//! a node's server configured and run as the agent runs it, backed up
//! through the binary, restored into a new data directory and started
//! there. Needs root (the servers run as the `postgres` user) and the
//! PostgreSQL tools.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use geminik8s::postgres::render::ServerRole;
use geminik8s::postgres::{Manager, StopMode};
use geminik8s_vm_tests::require;

#[path = "common/backup.rs"]
mod lab;
use lab::{Lab, backup, failed, gemin, keygen, keys, leader, names, node, ok, postgres_user, put};

macro_rules! require_postgres {
    () => {
        require!(root: true, tools: ["initdb", "pg_basebackup", "pg_verifybackup", "pg_waldump", "postgres"]);
    };
}

fn list(dest: &Path) -> Vec<serde_json::Value> {
    let out = ok(gemin(&["backup", "list", "--from", dest.to_str().unwrap(), "-o", "json"]));
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_holds_exactly_the_rows_written_before_it() {
    require_postgres!();
    let lab = Lab::new();
    let a = node(&lab, "a");
    leader(&a).await;
    let before = names("before", 2000);
    put(&a, &before).await;
    let dest = lab.path("backups");
    let (key, public) = keygen(&lab, "key.txt");
    let (other_key, _) = keygen(&lab, "other.txt");

    let started = Instant::now();
    let out = backup(&a, &dest, &["--encryption-key", &public, "--verify", "--json"]);
    let took = started.elapsed();
    let created: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(created["manifest"]["verified"]["level"], "checksums", "{out}");
    put(&a, &names("after", 10)).await;

    let listed = list(&dest);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let m = &listed[0];
    let id = m["id"].as_str().unwrap().to_string();
    // --json prints the manifest as stored, its sizes, and the throughput;
    // the list adds the restorable window: with no archived WAL, the backup's end.
    let mut stored_manifest = m.clone();
    let window = stored_manifest.as_object_mut().unwrap().remove("restorable").unwrap();
    assert_eq!(created["manifest"], stored_manifest, "{out}");
    assert_eq!((&window["from"], &window["to"]), (&m["stop_time"], &serde_json::Value::Null), "{window}");
    assert_eq!(created["stored_bytes"], m["objects"][0]["size"], "{out}");
    assert_eq!(created["content_bytes"], m["objects"][0]["content_size"], "{out}");
    let seconds = created["elapsed_seconds"].as_f64().unwrap();
    let rate = created["content_bytes_per_second"].as_u64().unwrap() as f64;
    assert!(seconds > 0.0 && seconds <= took.as_secs_f64(), "{out}");
    let content = created["content_bytes"].as_f64().unwrap();
    assert!(rate > 0.0 && (rate - content / seconds).abs() <= content / seconds * 0.01 + 1.0, "{out}");
    assert_eq!((m["cluster"].as_str(), m["node"].as_str(), m["kind"].as_str()), (Some("lab"), Some("a"), Some("full")));
    assert_eq!(m["encryption"]["kind"], "age-x25519");
    assert_eq!(m["encryption"]["recipients"], serde_json::json!([public]));
    assert_eq!(m["postgres"]["major"], 15);
    assert_eq!(m["verified"]["level"], "checksums");
    let sysid: String = a
        .connect("postgres")
        .await
        .unwrap()
        .query_one("system id", "SELECT system_identifier::text FROM pg_control_system()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(m["postgres"]["system_identifier"], sysid.as_str());
    let object = &m["objects"][0];
    assert_eq!(object["name"], "base.tar.zst.age");
    let stored = std::fs::read(dest.join(&id).join("base.tar.zst.age")).unwrap();
    assert!(stored.starts_with(b"age-encryption.org/v1\n"), "the stored object is an age file");
    assert!(
        !stored.windows(b"/registry/before".len()).any(|w| w == b"/registry/before"),
        "no row is readable in the stored object"
    );
    eprintln!(
        "backup of {} rows: {} bytes of base backup stored as {} bytes in {:.2} s",
        before.len(),
        object["content_size"],
        object["size"],
        took.as_secs_f64()
    );

    // Without the identity, or with another one: refused, nothing written.
    let target = lab.path("restored").join("data");
    let target_s = target.to_str().unwrap();
    let from = dest.to_str().unwrap();
    let err = failed(gemin(&["restore", "--from", from, "--data-dir", target_s]));
    assert!(err.contains("give --identity"), "{err}");
    let err =
        failed(gemin(&["restore", "--from", from, "--data-dir", target_s, "--identity", other_key.to_str().unwrap()]));
    assert!(err.contains("cannot decrypt backup") && err.contains(&public), "{err}");
    assert!(!target.exists(), "a failed restore leaves nothing behind");

    let out = ok(gemin(&["restore", "--from", from, "--data-dir", target_s, "--identity", key.to_str().unwrap()]));
    assert!(out.contains(&format!("restored backup {id}")) && out.contains("/s)"), "{out}");
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (postgres_user().uid.as_raw(), 0o700));

    // PostgreSQL starts on it, configured for this node as the agent does.
    let mut r = node(&lab, "restored");
    let mut s = r.settings().clone();
    s.data_dir = target.clone();
    r.mgr = Manager::new(s, r._supervisor.clone()).unwrap();
    r.write_config(ServerRole::Primary).unwrap();
    r.start().await.unwrap();
    assert_eq!(keys(&r).await, before, "exactly the rows written before the backup");

    // The data directory now holds data: refused without --force, kept as it is.
    let id_flag = ["--identity", key.to_str().unwrap()];
    let err = failed(gemin(&[&["restore", "--from", from, "--data-dir", target_s][..], &id_flag].concat()));
    assert!(err.contains("a PostgreSQL server runs on this data directory"), "{err}");
    r.stop(StopMode::Fast).await.unwrap();
    let err = failed(gemin(&[&["restore", "--from", from, "--data-dir", target_s][..], &id_flag].concat()));
    assert!(err.contains("not empty; give --force"), "{err}");
    let out = ok(gemin(
        &[&["restore", "--from", from, "--data-dir", target_s, "--dry-run", "--force"][..], &id_flag].concat(),
    ));
    assert!(out.contains("intact end to end") && out.contains("would move"), "{out}");

    // --force moves it aside; the restore is the backup again.
    r.start().await.unwrap();
    put(&r, &names("on-the-restored-copy", 3)).await;
    r.stop(StopMode::Fast).await.unwrap();
    let started = Instant::now();
    let out =
        ok(gemin(&[&["restore", "--from", from, "--data-dir", target_s, "--force", "--json"][..], &id_flag].concat()));
    let took = started.elapsed();
    let aside: Vec<PathBuf> = std::fs::read_dir(target.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("data.pre-restore-"))
        .collect();
    assert_eq!(aside.len(), 1, "{out}");
    assert!(aside[0].join("PG_VERSION").is_file(), "the old data directory is kept whole");
    // --json: what was restored, as much data as the manifest says, and the throughput.
    let restored: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(restored["backup"], id.as_str(), "{out}");
    assert_eq!(restored["data_dir"], target_s, "{out}");
    assert_eq!(restored["moved_aside"], aside[0].to_str().unwrap(), "{out}");
    assert_eq!(restored["content_bytes"], m["objects"][0]["content_size"], "{out}");
    assert_eq!((restored["dry_run"].as_bool(), restored["wal_files"].as_u64()), (Some(false), Some(0)), "{out}");
    assert!(restored["recovered"]["kine"]["revision"].as_i64() > restored["recovered"]["kine"]["newest"].as_i64());
    // A new timeline: the restored server never continues the one it was backed up on.
    let backed_up_on = m["postgres"]["timeline"].as_u64().unwrap();
    assert_eq!(restored["recovered"]["timeline"].as_u64(), Some(backed_up_on + 1), "{out}");
    let seconds = restored["elapsed_seconds"].as_f64().unwrap();
    let rate = restored["content_bytes_per_second"].as_u64().unwrap() as f64;
    assert!(seconds > 0.0 && seconds <= took.as_secs_f64(), "{out}");
    let content = restored["content_bytes"].as_f64().unwrap();
    assert!(rate > 0.0 && (rate - content / seconds).abs() <= content / seconds * 0.01 + 1.0, "{out}");
    r.write_config(ServerRole::Primary).unwrap();
    r.start().await.unwrap();
    assert_eq!(keys(&r).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_a_damaged_object_and_prune_keeps_the_newest() {
    require_postgres!();
    let lab = Lab::new();
    let a = node(&lab, "a");
    leader(&a).await;
    put(&a, &names("x", 50)).await;
    let dest = lab.path("backups");
    let from = dest.to_str().unwrap();
    let (key, public) = keygen(&lab, "key.txt");
    let passphrase = lab.path("passphrase");
    std::fs::write(&passphrase, "correct horse battery staple\n").unwrap();
    let pass_flag = format!("passphrase:{}", passphrase.display());

    // No key and no --no-encryption: refused with what to do.
    let s = a.settings();
    let err = failed(gemin(&[
        "backup",
        "--output",
        from,
        "--pg-host",
        s.socket_dir.to_str().unwrap(),
        "--pg-port",
        &s.node.port.to_string(),
        "--cluster",
        "lab",
    ]));
    assert!(err.contains("no encryption key") && err.contains("backup keygen"), "{err}");
    assert!(list(&dest).is_empty());

    let out = backup(&a, &dest, &["--encryption-key", &public]);
    assert!(out.contains(" complete in ") && out.contains("/s); timeline "), "the throughput is said: {out}");
    backup(&a, &dest, &["--encryption-key", &pass_flag]);
    let listed = list(&dest);
    assert_eq!(listed.len(), 2);
    let (first, second) =
        (listed[0]["id"].as_str().unwrap().to_string(), listed[1]["id"].as_str().unwrap().to_string());
    assert_eq!(listed[1]["encryption"]["kind"], "age-passphrase");

    // Intact: checksums without a key, end to end with the key and the passphrase.
    let out = ok(gemin(&["backup", "verify", "--from", from]));
    assert_eq!(out.matches("ok (checksums)").count(), 2, "{out}");
    let out =
        ok(gemin(&["backup", "verify", "--from", from, "--identity", key.to_str().unwrap(), "--identity", &pass_flag]));
    assert_eq!(out.matches("ok (full)").count(), 2, "{out}");
    assert_eq!(list(&dest)[0]["verified"]["level"], "full");

    // One flipped byte in the first backup's object.
    let object = dest.join(&first).join("base.tar.zst.age");
    let mut bytes = std::fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&object, &bytes).unwrap();
    let out = gemin(&["backup", "verify", "--from", from, "-o", "json"]);
    let report = failed(out.clone());
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((rows[0]["backup"].as_str(), rows[0]["ok"].as_bool()), (Some(first.as_str()), Some(false)), "{report}");
    let error = rows[0]["error"].as_str().unwrap();
    assert!(error.contains(&format!("backup {first}: object base.tar.zst.age is damaged")), "{error}");
    assert_eq!(rows[1]["ok"], true, "the other backup is intact: {report}");
    // End to end the damage is found too (age authenticates every chunk).
    let err =
        failed(gemin(&["backup", "verify", "--from", from, "--backup", &first, "--identity", key.to_str().unwrap()]));
    assert!(err.contains("object base.tar.zst.age is damaged"), "{err}");
    // And restore refuses it, leaving nothing behind.
    let target = lab.path("restored");
    let err = failed(gemin(&[
        "restore",
        "--from",
        from,
        "--backup",
        &first,
        "--identity",
        key.to_str().unwrap(),
        "--data-dir",
        target.to_str().unwrap(),
    ]));
    assert!(err.contains("damaged"), "{err}");
    assert!(!target.exists());

    // Retention 0 removes everything but the newest complete backup; an
    // interrupted backup (no manifest) that is recent is left alone.
    std::fs::create_dir(dest.join("29990101T000000Z")).unwrap();
    let out = ok(gemin(&["backup", "prune", "--from", from, "--retention", "0", "--dry-run"]));
    assert!(out.contains(&format!("would remove: {first}")), "{out}");
    assert_eq!(list(&dest).len(), 2, "a dry run removes nothing");
    let out = ok(gemin(&["backup", "prune", "--from", from, "--retention", "0"]));
    assert!(out.contains(&format!("removed: {first}")), "{out}");
    let left: Vec<String> = list(&dest).iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(left, [second]);
    assert!(dest.join("29990101T000000Z").is_dir());
    assert!(!dest.join(&first).exists());
}

/// A cloud-config for node `a` of cluster `lab` whose TLS files are on disk,
/// as on a node.
fn node_cloud_config(lab: &Lab, port: u16) -> PathBuf {
    let pem = |what: &str, body: &str| format!("-----BEGIN {what}-----\n{body}\n-----END {what}-----\n");
    let tls = lab.path("tls");
    std::fs::create_dir_all(&tls).unwrap();
    for (name, text) in [
        ("ca.crt", pem("CERTIFICATE", "Y2E=")),
        ("a.crt", pem("CERTIFICATE", "YQ==")),
        ("a.key", pem("PRIVATE KEY", "bm9kZS1hLXByaXZhdGUta2V5")),
    ] {
        std::fs::write(tls.join(name), text).unwrap();
    }
    let secret = "lab-secret-0123456789abcdef";
    let mut block = geminik8s::config::fixture::required();
    geminik8s::config::merge_json(
        &mut block,
        &serde_json::json!({
            "api": {"token": secret},
            "postgres": {"replication_password": secret, "kine_password": secret, "port": port},
            "k3s": {"token": "lab-k3s-token-0123456789abcdef"},
            "tls": {
                "ca": tls.join("ca.crt").to_str().unwrap(),
                "cert": tls.join("a.crt").to_str().unwrap(),
                "key": tls.join("a.key").to_str().unwrap(),
            },
        }),
    );
    let text = format!(
        "#cloud-config\n{}",
        geminik8s::config::yaml::to_yaml(&serde_json::json!({ "hostname": "a", "geminik8s": block }))
    );
    let path = lab.path("node-a.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_carries_the_node_config_that_new_hardware_restores_with() {
    require_postgres!();
    let lab = Lab::new();
    let a = node(&lab, "a");
    leader(&a).await;
    let rows = names("row", 20);
    put(&a, &rows).await;
    let dest = lab.path("backups");
    let from = dest.to_str().unwrap();
    let (key, public) = keygen(&lab, "key.txt");
    let config = node_cloud_config(&lab, 15999);
    let s = a.settings();
    let (host, port) = (s.socket_dir.display().to_string(), s.node.port.to_string());
    let config_s = config.to_str().unwrap();
    ok(gemin(&[
        "--config",
        config_s,
        "backup",
        "create",
        "--output",
        from,
        "--pg-host",
        &host,
        "--pg-port",
        &port,
        "--encryption-key",
        &public,
    ]));

    // The manifest lists the bundle; stored, it is encrypted like the data.
    let listed = list(&dest);
    let m = &listed[0];
    let id = m["id"].as_str().unwrap();
    let names_of: Vec<&str> = m["objects"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names_of, ["base.tar.zst.age", "node.yaml.zst.age"], "{m}");
    assert_eq!(m["objects"][1]["content"], "cloud-config");
    let stored = std::fs::read(dest.join(id).join("node.yaml.zst.age")).unwrap();
    assert!(stored.starts_with(b"age-encryption.org/v1\n"));
    assert!(!stored.windows(b"lab-k3s-token".len()).any(|w| w == b"lab-k3s-token"), "the token is not in the clear");
    let out = ok(gemin(&["backup", "verify", "--from", from, "--identity", key.to_str().unwrap()]));
    assert!(out.contains("ok (full)"), "{out}");

    // New hardware: no cloud-config, an empty disk. The bundle comes back
    // with the data: the K3s token, the key inline, this node's settings.
    let target = lab.path("new").join("data");
    let written = lab.path("new").join("oem").join("90_geminik8s.yaml");
    let (target_s, written_s) = (target.to_str().unwrap(), written.to_str().unwrap());
    let restore = |extra: &[&str]| {
        let mut args = vec!["restore", "--from", from, "--data-dir", target_s, "--node-config", written_s];
        args.extend(["--identity", key.to_str().unwrap(), "--runtime-dir", "/run/lab-new"]);
        args.extend(extra);
        gemin(&args)
    };
    let out = ok(restore(&["--json"]));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["node_config"]["path"], written_s, "{out}");
    assert_eq!(
        (report["node_config"]["node"].as_str(), report["node_config"]["cluster"].as_str()),
        (Some("a"), Some("lab"))
    );
    let text = std::fs::read_to_string(&written).unwrap();
    assert!(text.contains("lab-k3s-token-0123456789abcdef"), "{text}");
    assert!(text.contains("bm9kZS1hLXByaXZhdGUta2V5"), "the key is inline:\n{text}");
    assert!(!text.contains(lab.path("tls").to_str().unwrap()), "no file names of the old node:\n{text}");
    assert_eq!(std::fs::metadata(&written).unwrap().mode() & 0o777, 0o600);
    let out = ok(gemin(&["config", "validate", "--no-file-checks", written_s]));
    assert!(out.contains("lab"), "{out}");
    let confs: String = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "conf"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(confs.contains("15999") && confs.contains("/run/lab-new/postgres-a"), "the bundle's settings:\n{confs}");

    // PostgreSQL starts on the restored data with the rows of the backup.
    let mut r = node(&lab, "restored");
    let mut rs = r.settings().clone();
    rs.data_dir = target.clone();
    r.mgr = Manager::new(rs, r._supervisor.clone()).unwrap();
    r.write_config(ServerRole::Primary).unwrap();
    r.start().await.unwrap();
    assert_eq!(keys(&r).await, rows);
    r.stop(StopMode::Fast).await.unwrap();

    // An existing file is refused without --force before anything is touched.
    let err = failed(restore(&[]));
    assert!(err.contains("--node-config") && err.contains("the file exists; give --force"), "{err}");
    assert!(target.join("PG_VERSION").is_file());

    // A damaged bundle is named by verify.
    let object = dest.join(id).join("node.yaml.zst.age");
    let mut bytes = stored.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&object, &bytes).unwrap();
    let err = failed(gemin(&["backup", "verify", "--from", from, "--identity", key.to_str().unwrap()]));
    assert!(err.contains("object node.yaml.zst.age is damaged"), "{err}");
}
