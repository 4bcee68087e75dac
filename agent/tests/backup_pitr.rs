//! Continuous WAL archiving and point-in-time recovery against real
//! PostgreSQL 15: the server's `archive_command` spools each WAL file
//! through `gemin_k8s backup wal-spool`, `gemin_k8s backup wal-push` stores
//! them encrypted next to a full backup, and `gemin_k8s restore
//! --target-time` brings back exactly the keys that existed at that time,
//! with Kine's revision moved past every revision seen before. Needs root
//! and the PostgreSQL tools.

use std::path::PathBuf;

use geminik8s::postgres::render::ServerRole;
use geminik8s::postgres::{Manager, StopMode};
use geminik8s_vm_tests::require;

#[path = "common/backup.rs"]
mod lab;
use lab::{
    Lab, archiving_node, backup, delete, failed, gemin, incremental, keygen, leader, live_keys, names, node, ok, put,
    scalar_i64, scalar_text,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_recovery_brings_back_exactly_the_keys_at_the_target_time() {
    require!(root: true, tools: ["initdb", "pg_basebackup", "pg_verifybackup", "pg_waldump", "postgres", "psql"]);
    let lab = Lab::new();
    let (a, spool) = archiving_node(&lab, "a");
    leader(&a).await;

    let dest = lab.path("backups");
    let dest_s = dest.to_str().unwrap().to_string();
    let (key, public) = keygen(&lab, "key.txt");
    let before = names("before", 300);
    put(&a, &before).await;
    backup(&a, &dest, &["--encryption-key", &public]);
    let id = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.ends_with('Z'))
        .expect("the backup's directory");

    // After the backup: more keys, some deleted. The target time is the
    // server's clock once they committed.
    let after = names("after", 100);
    put(&a, &after).await;
    delete(&a, &before[..50]).await;
    let at_target = live_keys(&a).await;
    let target = scalar_text(
        &a,
        "postgres",
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .await;
    // After the target: a bad `kubectl delete` and more writes.
    delete(&a, &after).await;
    put(&a, &names("late", 20)).await;
    let newest_seen = scalar_i64(&a, "SELECT max(id) FROM kine").await;
    assert_eq!(at_target.len(), before.len() - 50 + after.len());

    // An incremental backup needs a full one in its destination, and is
    // nothing to verify or prune.
    let empty = lab.path("empty");
    let s = a.settings();
    let (host, port) = (s.socket_dir.display().to_string(), s.node.port.to_string());
    let err = failed(gemin(&[
        "backup",
        "--type",
        "incremental",
        "--output",
        empty.to_str().unwrap(),
        "--pg-host",
        &host,
        "--pg-port",
        &port,
        "--cluster",
        "lab",
    ]));
    assert!(err.contains("no full backup") && err.contains("--type full"), "{err}");
    let err =
        failed(gemin(&["backup", "--type", "incremental", "--retention", "3", "--pg-host", &host, "--cluster", "lab"]));
    assert!(err.contains("go with --type full"), "{err}");

    // The incremental backup closes the WAL file and returns once the
    // archive holds it: everything up to then is restorable.
    let inc = incremental(&a, &dest_s, &spool, &public, &[]).await;
    assert_eq!(inc["kind"], "incremental", "{inc}");
    assert_eq!(inc["base"], id.as_str(), "{inc}");
    let last = inc["through_segment"].as_str().unwrap().to_string();
    let restorable_to = inc["restorable_to"].as_str().unwrap();
    assert!(restorable_to > target.as_str(), "restorable to {restorable_to}, target {target}: {inc}");
    assert!(inc["wal_files"].as_u64() >= Some(1), "{inc}");
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&ok(gemin(&["backup", "list", "--from", &dest_s, "-o", "json"]))).unwrap();
    let window = &listed[0]["restorable"];
    assert!(window["through_segment"].as_str() >= Some(last.as_str()), "{window}");
    assert!(window["to"].as_str() > window["from"].as_str() && window["gap"].is_null(), "{window}");
    let stored = std::fs::read(dest.join("wal").join(format!("{last}.zst.age"))).unwrap();
    assert!(stored.starts_with(b"age-encryption.org/v1\n"), "archived WAL is encrypted");
    a.stop(StopMode::Fast).await.unwrap();
    let verify = |dest: &str| {
        let out = gemin(&["backup", "verify", "--from", dest, "-o", "json"]);
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        rows.into_iter().find(|r| r["backup"] == "wal/ (archived WAL)").expect("a row for the archived WAL")
    };
    let row = verify(&dest_s);
    assert_eq!(row["ok"], true, "{row}");
    assert!(row["checked"].as_str().unwrap().contains(&format!("to {last}")), "{row}");

    // Without the identity nothing is restored.
    let target_dir = lab.path("restored").join("data");
    let target_s = target_dir.to_str().unwrap();
    let err = failed(gemin(&["restore", "--from", &dest_s, "--data-dir", target_s, "--target-time", &target]));
    assert!(err.contains("--identity"), "{err}");
    let err = failed(gemin(&["restore", "--from", &dest_s, "--data-dir", target_s, "--target-time", "yesterday"]));
    assert!(err.contains("RFC 3339"), "{err}");

    let out = ok(gemin(&[
        "restore",
        "--from",
        &dest_s,
        "--data-dir",
        target_s,
        "--target-time",
        &target,
        "--identity",
        key.to_str().unwrap(),
        "--verify",
    ]));
    assert!(out.contains("recovered to") && out.contains("Kine's revision moved"), "{out}");
    // --verify: PostgreSQL's own check of every table and index, and the keys counted.
    let verified = format!(
        "verified: pg_amcheck found no corruption in kine, postgres, template1; Kine holds {} live keys",
        at_target.len()
    );
    assert!(out.contains(&verified), "{out}");
    assert!(!target_dir.join("geminik8s-restore-wal").exists(), "the fetched WAL is removed");

    // PostgreSQL starts on it as the agent configures it.
    let mut r = node(&lab, "restored");
    let mut s = r.settings().clone();
    s.data_dir = target_dir.clone();
    r.mgr = Manager::new(s, r._supervisor.clone()).unwrap();
    r.write_config(ServerRole::Primary).unwrap();
    r.start().await.unwrap();
    assert_eq!(live_keys(&r).await, at_target, "exactly the keys that existed at {target}");
    let left = scalar_i64(&r, "SELECT count(*) FROM pg_extension WHERE extname = 'amcheck'").await;
    assert_eq!(left, 0, "the check leaves no extension behind");
    let revision = scalar_i64(&r, "SELECT max(id) FROM kine").await;
    let compacted = scalar_i64(&r, "SELECT max(prev_revision) FROM kine WHERE name = 'compact_rev_key'").await;
    assert!(revision > newest_seen, "revision after the restore {revision} <= {newest_seen} seen before it");
    assert_eq!(compacted, revision, "every revision before the jump reads as compacted");
    // The next write gets the revision after the jump.
    put(&r, &names("new", 1)).await;
    assert_eq!(scalar_i64(&r, "SELECT max(id) FROM kine").await, revision + 1);
    r.stop(StopMode::Fast).await.unwrap();

    // A segment lost from the archive: verify names it.
    let segments: Vec<String> = std::fs::read_dir(dest.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.len() == "000000010000000000000003.zst.age".len())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(segments.len() >= 3, "{segments:?}");
    std::fs::remove_file(dest.join("wal").join(&segments[1])).unwrap();
    let row = verify(&dest_s);
    let lost = geminik8s::backup::wal::strip_stored_suffixes(&segments[1]).to_string();
    assert_eq!(row["ok"], false, "{row}");
    assert!(row["error"].as_str().unwrap().contains(&format!("WAL missing after backup {id}: {lost}")), "{row}");
    eprintln!("restored to {target}: {} keys; revision {newest_seen} seen before, {revision} after", at_target.len());
}

/// A target before the oldest backup's end cannot be reached: said so, nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_before_every_backup_is_refused() {
    require!(root: true, tools: ["initdb", "pg_basebackup", "postgres"]);
    let lab = Lab::new();
    let a = node(&lab, "a");
    leader(&a).await;
    let dest = lab.path("backups");
    backup(&a, &dest, &["--no-encryption"]);
    let target: PathBuf = lab.path("restored");
    let err = failed(gemin(&[
        "restore",
        "--from",
        dest.to_str().unwrap(),
        "--data-dir",
        target.to_str().unwrap(),
        "--target-time",
        "2020-01-01T00:00:00Z",
    ]));
    assert!(err.contains("no complete backup") && err.contains("ended by then"), "{err}");
    assert!(!target.exists());
}
