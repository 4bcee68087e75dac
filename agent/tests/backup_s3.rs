//! Backups to an `s3://` destination against a real S3-compatible server
//! (s3s-fs, installed by `just deps`) on loopback with its own data
//! directory: the store's semantics (ids, multipart objects, the manifest
//! last, archived WAL), credentials, and `gemin_k8s backup`/`restore`
//! through a real PostgreSQL 15 as in `backup.rs` (root and the PostgreSQL
//! tools needed for that one).

use std::io::{Read, Write};
use std::process::{Command, Output};
use std::time::Instant;

use geminik8s::backup::BackupError;
use geminik8s::backup::store;
use geminik8s::postgres::Manager;
use geminik8s::postgres::render::ServerRole;
use geminik8s_vm_tests::require;
use geminik8s_vm_tests::s3::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY, SERVER};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

#[path = "common/backup.rs"]
mod lab;
use lab::{Lab, failed, gemin, keygen, keys, leader, names, node, ok, put, text};

/// The keys in the bucket under `prefix/`.
async fn keys_under(server: &S3Server, prefix: &str) -> Vec<String> {
    let client = server.client().unwrap();
    let listed: Vec<_> = futures_util::TryStreamExt::try_collect(client.list(Some(&Key::from(prefix)))).await.unwrap();
    let mut keys: Vec<String> = listed.into_iter().map(|o| o.location.to_string()).collect();
    keys.sort();
    keys
}

/// `len` bytes that differ from one part to the next.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i / 7 + i / 4099) % 251) as u8).collect()
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    out
}

/// `gemin_k8s ARGS` without the AWS variables of the environment, with `env` set.
fn gemin_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gemin_k8s"));
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"] {
        cmd.env_remove(var);
    }
    cmd.args(args).envs(env.iter().copied()).output().unwrap()
}

const ID: &str = "20260821T101502Z";
const MIB: usize = 1024 * 1024;

// A current-thread runtime: the store's blocking calls must not need it.
#[tokio::test]
async fn an_s3_destination_keeps_backups_and_wal_as_a_directory_does() {
    require!(root: false, tools: [SERVER]);
    let server = S3Server::start().await.unwrap();
    let store = store::open(&format!("s3://{BUCKET}/site/a/"), &server.options()).unwrap();
    assert_eq!(store.url(), "s3://backups/site/a");
    assert_eq!(store.list().unwrap(), vec![], "an empty prefix is an empty destination");

    store.begin(ID).unwrap();
    match store.begin(ID) {
        Err(BackupError::Io { cause, .. }) if cause.kind() == std::io::ErrorKind::AlreadyExists => {}
        other => panic!("an id is never reused: {other:?}"),
    }
    let listed = store.list().unwrap();
    assert_eq!((listed.len(), listed[0].id.as_str(), listed[0].complete), (1, ID, false));

    // Abandoned after its first 8 MiB part went up: nothing under the name.
    let data = pattern(20 * MIB + 123);
    let mut w = store.put_object(ID, "base.tar").unwrap();
    w.write_all(&data[..9 * MIB]).unwrap();
    drop(w);
    let err = store.get_object(ID, "base.tar").err().unwrap();
    assert!(matches!(&err, BackupError::Io { cause, .. } if cause.kind() == std::io::ErrorKind::NotFound), "{err}");
    assert_eq!(keys_under(&server, "site/a").await, ["site/a/20260821T101502Z/.started"]);

    // Three parts, committed, read back whole; a small object is one PUT.
    let mut w = store.put_object(ID, "base.tar").unwrap();
    for chunk in data.chunks(100_000) {
        w.write_all(chunk).unwrap();
    }
    w.commit().unwrap();
    assert!(read_all(store.get_object(ID, "base.tar").unwrap()) == data, "the object reads back as written");
    let mut w = store.put_object(ID, "small").unwrap();
    w.write_all(b"a few bytes").unwrap();
    w.commit().unwrap();
    assert_eq!(read_all(store.get_object(ID, "small").unwrap()), b"a few bytes");
    assert!(!store.list().unwrap()[0].complete, "objects alone do not make a backup");
    assert_eq!(store.get_manifest(ID).unwrap(), None);

    store.put_manifest(ID, b"{\"id\": 1}").unwrap();
    assert!(store.list().unwrap()[0].complete);
    assert_eq!(store.get_manifest(ID).unwrap().as_deref(), Some(&b"{\"id\": 1}"[..]));
    assert_eq!(store.get_manifest("20990101T000000Z").unwrap(), None);

    // Names cannot leave the prefix.
    assert!(store.put_object(ID, "../x").is_err());
    assert!(store.put_object(ID, ".started").is_err());
    assert!(store.get_manifest("../a").is_err());
    assert!(store.begin("wal/x").is_err());

    // Archived WAL, under wal/ and never a backup.
    let segment = "000000010000000000000003";
    assert_eq!(store.list_wal().unwrap(), vec![]);
    assert!(store.get_wal(segment).unwrap().is_none());
    let wal = pattern(16 * MIB);
    let mut w = store.put_wal(segment).unwrap();
    w.write_all(&wal).unwrap();
    assert_eq!(store.list_wal().unwrap(), vec![], "an uncommitted file is not listed");
    w.commit().unwrap();
    let mut w = store.put_wal("00000002.history").unwrap();
    let history = b"1\t0/3000000\tno recovery target specified\n";
    w.write_all(history).unwrap();
    w.commit().unwrap();
    let listed = store.list_wal().unwrap();
    let names: Vec<(&str, u64)> = listed.iter().map(|w| (w.name.as_str(), w.size)).collect();
    assert_eq!(names, [("000000010000000000000003", 16 * MIB as u64), ("00000002.history", history.len() as u64)]);
    assert_eq!(store.list().unwrap().len(), 1, "wal/ is not a backup");
    assert!(read_all(store.get_wal(segment).unwrap().unwrap()) == wal);
    assert!(store.put_wal("../x").is_err());
    store.delete_wal(segment).unwrap();
    store.delete_wal(segment).unwrap();
    let listed: Vec<String> = store.list_wal().unwrap().into_iter().map(|w| w.name).collect();
    assert_eq!(listed, ["00000002.history"]);

    // Delete: the backup and all its objects go; the WAL stays.
    store.delete(ID).unwrap();
    assert_eq!(store.list().unwrap(), vec![]);
    assert_eq!(keys_under(&server, "site/a").await, ["site/a/wal/00000002.history"]);

    // A whole bucket is a destination too; other data in it is not a backup.
    let whole = store::open(&format!("s3://{BUCKET}"), &server.options()).unwrap();
    assert_eq!(whole.list().unwrap(), vec![], "site/ holds no backup at the bucket's root");
    whole.begin(ID).unwrap();
    whole.put_manifest(ID, b"{}").unwrap();
    let listed: Vec<(String, bool)> = whole.list().unwrap().into_iter().map(|e| (e.id, e.complete)).collect();
    assert_eq!(listed, [(ID.to_string(), true)]);
}

#[tokio::test]
async fn credentials_come_from_a_file_or_the_environment_and_a_wrong_one_is_named() {
    require!(root: false, tools: [SERVER]);
    let server = S3Server::start().await.unwrap();
    let dest = format!("s3://{BUCKET}/site");
    let endpoint = server.endpoint.as_str();
    let list = ["backup", "list", "--from", &dest, "--s3-endpoint", endpoint];

    let err = failed(gemin_env(&list, &[]));
    assert!(err.contains("S3 credentials") && err.contains("--s3-credentials FILE"), "{err}");
    let out = ok(gemin_env(&list, &[("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY)]));
    assert_eq!(out, "no backups in s3://backups/site\n");
    let vars =
        [("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY), ("AWS_ENDPOINT_URL", endpoint)];
    ok(gemin_env(&["backup", "list", "--from", &dest], &vars));
    let creds = server.credentials.to_str().unwrap();
    ok(gemin_env(&[&list[..], &["--s3-credentials", creds]].concat(), &[]));

    let half = server.credentials.with_file_name("half.credentials");
    std::fs::write(&half, format!("[default]\naws_access_key_id = {ACCESS_KEY}\n")).unwrap();
    let err = failed(gemin_env(&[&list[..], &["--s3-credentials", half.to_str().unwrap()]].concat(), &[]));
    assert!(err.contains("half.credentials") && err.contains("no secret_access_key line"), "{err}");

    let wrong = server.credentials.with_file_name("wrong.credentials");
    std::fs::write(&wrong, format!("access_key_id = {ACCESS_KEY}\nsecret_access_key = not-the-secret\n")).unwrap();
    let err = failed(gemin_env(&[&list[..], &["--s3-credentials", wrong.to_str().unwrap()]].concat(), &[]));
    assert!(err.contains("refused the credentials from the file") && err.contains("wrong.credentials"), "{err}");
    let err = failed(gemin_env(&["backup", "list", "--from", &dest, "--s3-endpoint", "127.0.0.1:9000"], &[]));
    assert!(err.contains("not an http:// or https:// URL"), "{err}");
}

macro_rules! require_postgres_and_s3 {
    () => {
        require!(root: true, tools: ["initdb", "pg_basebackup", "pg_verifybackup", "pg_waldump", "postgres", SERVER]);
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_in_s3_restores_exactly_the_rows_written_before_it() {
    require_postgres_and_s3!();
    let server = S3Server::start().await.unwrap();
    let lab = Lab::new();
    let a = node(&lab, "a");
    leader(&a).await;
    let before = names("before", 2000);
    put(&a, &before).await;
    let (key, public) = keygen(&lab, "key.txt");
    let dest = format!("s3://{BUCKET}/lab/a");
    let s3 = server.flags();
    let s3: Vec<&str> = s3.iter().map(String::as_str).collect();
    let s = a.settings();
    let (host, port) = (s.socket_dir.display().to_string(), s.node.port.to_string());
    let create = ["backup", "create", "--output", &dest, "--pg-host", &host, "--pg-port", &port, "--cluster", "lab"];
    let create = [&create[..], &s3].concat();

    // Never in the clear unless asked.
    let err = failed(gemin(&create));
    assert!(err.contains("no encryption key") && err.contains("--no-encryption"), "{err}");
    assert_eq!(keys_under(&server, "lab").await, Vec::<String>::new());

    // Uncompressed, so that the object goes up in several parts.
    let started = Instant::now();
    let out = ok(gemin(&[&create[..], &["--encryption-key", &public, "--compress", "none", "--verify"]].concat()));
    let took = started.elapsed();
    assert!(out.contains("complete in s3://backups/lab/a") && out.contains("verified: checksums"), "{out}");
    put(&a, &names("after", 10)).await;

    let from = [&["--from", dest.as_str()][..], &s3].concat();
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&ok(gemin(&[&["backup", "list", "-o", "json"][..], &from].concat()))).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let id = listed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(listed[0]["encryption"]["recipients"], serde_json::json!([public]));
    let object = &listed[0]["objects"][0];
    assert_eq!(object["name"], "base.tar.age");
    let size = object["size"].as_u64().unwrap();
    assert!(size > 16 * 1024 * 1024, "more than two parts: {size}");
    eprintln!("backup of {} rows to S3: {size} bytes stored in {:.2} s", before.len(), took.as_secs_f64());
    let table = ok(gemin(&[&["backup", "list"][..], &from].concat()));
    assert!(table.contains(&id) && !table.contains("incomplete"), "{table}");
    let stored = keys_under(&server, "lab/a").await;
    assert_eq!(
        stored,
        [format!("lab/a/{id}/.started"), format!("lab/a/{id}/base.tar.age"), format!("lab/a/{id}/manifest.json")]
    );

    let out = ok(gemin(&[&["backup", "verify", "--identity", key.to_str().unwrap()][..], &from].concat()));
    assert!(out.contains(&id) && out.contains("ok (full)"), "{out}");

    // Restored from the bucket into a new data directory: exactly the rows before the backup.
    let target = lab.path("restored").join("data");
    let restore = ["restore", "--data-dir", target.to_str().unwrap(), "--identity", key.to_str().unwrap()];
    let out = ok(gemin(&[&restore[..], &from].concat()));
    assert!(out.contains(&format!("restored backup {id}")), "{out}");
    let mut r = node(&lab, "restored");
    let mut settings = r.settings().clone();
    settings.data_dir = target.clone();
    r.mgr = Manager::new(settings, r._supervisor.clone()).unwrap();
    r.write_config(ServerRole::Primary).unwrap();
    r.start().await.unwrap();
    assert_eq!(keys(&r).await, before, "exactly the rows written before the backup");

    // One byte flipped in the stored object, through the S3 API: verify names it.
    let client = server.client().unwrap();
    let key_path = Key::from(format!("lab/a/{id}/base.tar.age"));
    let mut bytes = client.get(&key_path).await.unwrap().bytes().await.unwrap().to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    client.put(&key_path, PutPayload::from(bytes)).await.unwrap();
    let out = gemin(&[&["backup", "verify", "-o", "json"][..], &from].concat());
    let report = failed(out.clone());
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((rows[0]["backup"].as_str(), rows[0]["ok"].as_bool()), (Some(id.as_str()), Some(false)), "{report}");
    let error = rows[0]["error"].as_str().unwrap();
    assert!(error.contains(&format!("backup {id}: object base.tar.age is damaged")), "{error}");
    let out = gemin(&[&["backup", "verify", "--identity", key.to_str().unwrap()][..], &from].concat());
    assert!(text(&out).contains("object base.tar.age is damaged"), "{}", text(&out));
}

/// The scenario end to end against the bucket: keys, a full backup
/// to S3, more keys and deletions, the time T, a bad deletion after it; the
/// WAL archived to the bucket (incremental backup); `restore --target-time T`
/// from the bucket brings back exactly the keys live at T.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_recovery_from_s3_brings_back_exactly_the_keys_at_the_target_time() {
    require_postgres_and_s3!();
    let server = S3Server::start().await.unwrap();
    let lab = Lab::new();
    let (a, spool) = lab::archiving_node(&lab, "a");
    leader(&a).await;
    let (key, public) = keygen(&lab, "key.txt");
    let dest = format!("s3://{BUCKET}/lab/pitr");
    let s3 = server.flags();
    let s3: Vec<&str> = s3.iter().map(String::as_str).collect();
    let s = a.settings();
    let (host, port) = (s.socket_dir.display().to_string(), s.node.port.to_string());

    let before = names("before", 200);
    put(&a, &before).await;
    let create = ["backup", "--output", &dest, "--pg-host", &host, "--pg-port", &port, "--cluster", "lab"];
    ok(gemin(&[&create[..], &["--encryption-key", &public], &s3].concat()));
    put(&a, &names("after", 50)).await;
    lab::delete(&a, &before[..20]).await;
    let at_target = lab::live_keys(&a).await;
    let sql = "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";
    let target = lab::scalar_text(&a, "postgres", sql).await;
    lab::delete(&a, &before[20..]).await;
    put(&a, &names("late", 10)).await;

    let inc = lab::incremental(&a, &dest, &spool, &public, &s3).await;
    assert!(inc["restorable_to"].as_str() > Some(target.as_str()), "{inc}");
    let archived = keys_under(&server, "lab/pitr/wal").await;
    assert!(!archived.is_empty() && archived.iter().all(|k| k.ends_with(".zst.age")), "{archived:?}");
    a.stop(geminik8s::postgres::StopMode::Fast).await.unwrap();

    let target_dir = lab.path("restored").join("data");
    let restore = ["restore", "--from", &dest, "--data-dir", target_dir.to_str().unwrap(), "--target-time", &target];
    let out = ok(gemin(&[&restore[..], &["--identity", key.to_str().unwrap()], &s3].concat()));
    assert!(out.contains("recovered to"), "{out}");
    let mut r = node(&lab, "restored");
    let mut settings = r.settings().clone();
    settings.data_dir = target_dir;
    r.mgr = Manager::new(settings, r._supervisor.clone()).unwrap();
    r.write_config(ServerRole::Primary).unwrap();
    r.start().await.unwrap();
    assert_eq!(lab::live_keys(&r).await, at_target, "exactly the keys live at {target}");
    eprintln!("restored from S3 to {target}: {} keys through {} archived files", at_target.len(), archived.len());
}
