//! Kine rows whose values look like the Kubernetes objects K3s stores: JSON
//! with repeated field names and words, random identifiers and hashes, and
//! base64 of random bytes (Secrets, certificates), so that compression finds
//! what it would find in a real datastore and not a run of one byte.

use std::fmt::Write;
use std::time::{Duration, Instant};

use base64::Engine;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use geminik8s::postgres::Session;

use crate::lab::Node;

/// One multi-row insert, as Kine writes a create (a new name, revision 0 before it).
const INSERT_MANY: &str = "INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, value) \
     SELECT n, 1, 0, 0, 0, 0, v FROM unnest($1::text[], $2::bytea[]) AS t(n, v)";

/// One row, as Kine writes a create.
pub const INSERT_ONE: &str = "INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, value) \
     VALUES ($1, 1, 0, 0, 0, 0, $2)";

const ROWS_PER_BATCH: u64 = 1500;

/// The words names and configuration are made of.
const WORDS: &str = "app api server worker cache proxy ingress metrics controller scheduler node volume config \
     secret token service account default system kube monitoring logging frontend backend database queue batch cron \
     job replica deployment daemon stateful endpoint network policy storage class claim limit range quota role \
     binding cluster webhook admission lease";

/// Kinds of objects, with how often each is drawn.
#[derive(Clone, Copy)]
enum Kind {
    ConfigMap,
    Secret,
    Pod,
    Event,
}

impl Kind {
    fn draw(rng: &mut StdRng) -> Kind {
        match rng.random_range(0..100) {
            0..35 => Kind::ConfigMap,
            35..55 => Kind::Secret,
            55..85 => Kind::Pod,
            _ => Kind::Event,
        }
    }

    fn names(self) -> (&'static str, &'static str) {
        match self {
            Kind::ConfigMap => ("configmaps", "ConfigMap"),
            Kind::Secret => ("secrets", "Secret"),
            Kind::Pod => ("pods", "Pod"),
            Kind::Event => ("events", "Event"),
        }
    }
}

struct Gen {
    rng: StdRng,
    words: Vec<&'static str>,
}

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen { rng: StdRng::seed_from_u64(seed), words: WORDS.split_whitespace().collect() }
    }

    fn word(&mut self) -> &'static str {
        self.words[self.rng.random_range(0..self.words.len())]
    }

    fn hex(&mut self, digits: usize) -> String {
        let mut bytes = vec![0u8; digits.div_ceil(2)];
        self.rng.fill_bytes(&mut bytes);
        let mut s: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.truncate(digits);
        s
    }

    fn base64(&mut self, bytes: usize) -> String {
        let mut raw = vec![0u8; bytes];
        self.rng.fill_bytes(&mut raw);
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    fn uuid(&mut self) -> String {
        let h = self.hex(32);
        format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
    }

    fn time(&mut self) -> String {
        let r = &mut self.rng;
        format!(
            "2026-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            r.random_range(1..=12),
            r.random_range(1..=28),
            r.random_range(0..24),
            r.random_range(0..60),
            r.random_range(0..60)
        )
    }

    /// Kine's key and an object of about `len` bytes for row `seq`.
    fn object(&mut self, seq: u64, len: usize) -> (String, Vec<u8>) {
        let kind = Kind::draw(&mut self.rng);
        let (resource, kind_name) = kind.names();
        let ns = format!("{}-{}", self.word(), self.rng.random_range(0..40));
        let name = format!("{}-{}-{seq:x}-{}", self.word(), self.word(), self.hex(5));
        let key = format!("/registry/{resource}/{ns}/{name}");
        let (uid, created, rv) = (self.uuid(), self.time(), 1_000_000 + seq);
        let (app, hash) = (self.word(), self.hex(10));
        let mut s = String::with_capacity(len + 512);
        write!(
            s,
            "{{\"apiVersion\":\"v1\",\"kind\":\"{kind_name}\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"{ns}\",\
             \"uid\":\"{uid}\",\"resourceVersion\":\"{rv}\",\"creationTimestamp\":\"{created}\",\
             \"labels\":{{\"app.kubernetes.io/name\":\"{app}\",\"pod-template-hash\":\"{hash}\"}},\
             \"managedFields\":[{{\"manager\":\"k3s\",\"operation\":\"Update\",\"apiVersion\":\"v1\",\
             \"time\":\"{created}\",\"fieldsType\":\"FieldsV1\"}}]}},"
        )
        .expect("writing to a String");
        match kind {
            Kind::ConfigMap | Kind::Secret => s.push_str("\"data\":{"),
            Kind::Pod => s.push_str("\"spec\":{\"containers\":["),
            Kind::Event => s.push_str("\"series\":["),
        }
        let mut n = 0;
        while s.len() + 4 < len {
            if n > 0 {
                s.push(',');
            }
            self.entry(kind, n, &mut s);
            n += 1;
        }
        match kind {
            Kind::ConfigMap | Kind::Secret => s.push_str("}}"),
            Kind::Pod => s.push_str("]}}"),
            Kind::Event => s.push_str("]}"),
        }
        (key, s.into_bytes())
    }

    fn entry(&mut self, kind: Kind, n: usize, s: &mut String) {
        let (a, b) = (self.word(), self.word());
        match kind {
            // Configuration files: lines of words, now and then an id or a hash.
            Kind::ConfigMap => {
                write!(s, "\"{a}-{n}.yaml\":\"").expect("writing to a String");
                for _ in 0..self.rng.random_range(3..8) {
                    let (k, v) = (self.word(), self.word());
                    match self.rng.random_range(0..4) {
                        0 => write!(s, "{k}_{v}: {}\\n", self.hex(12)),
                        1 => write!(s, "{k}: {}\\n", self.rng.random_range(1..65536)),
                        _ => write!(s, "{k}.{v}: {}-{}\\n", self.word(), self.word()),
                    }
                    .expect("writing to a String");
                }
                s.push('"');
            }
            // Keys, tokens and certificates: random bytes in base64.
            Kind::Secret => {
                let bytes = self.rng.random_range(32..384);
                write!(s, "\"{a}.{b}-{n}\":\"{}\"", self.base64(bytes)).expect("writing to a String");
            }
            Kind::Pod => {
                let (digest, port) = (self.hex(64), self.rng.random_range(1024..65535));
                write!(
                    s,
                    "{{\"name\":\"{a}-{n}\",\"image\":\"registry.example.net/{a}/{b}:v1.{n}.{port}@sha256:{digest}\",\
                     \"ports\":[{{\"containerPort\":{port},\"protocol\":\"TCP\"}}],\
                     \"env\":[{{\"name\":\"{}_{}\",\"value\":\"{}\"}}],\
                     \"resources\":{{\"requests\":{{\"cpu\":\"{}m\",\"memory\":\"{}Mi\"}}}}}}",
                    a.to_uppercase(),
                    b.to_uppercase(),
                    self.hex(16),
                    self.rng.random_range(10..2000),
                    self.rng.random_range(16..4096),
                )
                .expect("writing to a String");
            }
            Kind::Event => {
                let (uid, time) = (self.uuid(), self.time());
                write!(
                    s,
                    "{{\"reason\":\"{a}{b}\",\"message\":\"{a} {b} {} for {}/{} ({uid})\",\"count\":{},\"lastTimestamp\":\"{time}\"}}",
                    self.word(),
                    self.word(),
                    self.hex(8),
                    self.rng.random_range(1..500),
                )
                .expect("writing to a String");
            }
        }
    }
}

/// Row `seq`'s key and a value of about `len` bytes (a fresh generator seeded by `seq`).
pub fn row(seq: u64, len: usize) -> (String, Vec<u8>) {
    Gen::new(seq).object(seq, len)
}

/// Batch `batch`: rows of 1-4 KB.
fn batch_rows(batch: u64) -> (Vec<String>, Vec<Vec<u8>>) {
    let mut g = Gen::new(batch ^ 0x6b69_6e65);
    let first = batch * ROWS_PER_BATCH;
    (first..first + ROWS_PER_BATCH)
        .map(|seq| {
            let len = g.rng.random_range(1024..=4096);
            g.object(seq, len)
        })
        .unzip()
}

/// What [`fill`] built.
pub struct Filled {
    pub rows: u64,
    /// The values' bytes as inserted.
    pub value_bytes: u64,
    /// `pg_database_size` of Kine's database at the end.
    pub db_bytes: u64,
    pub took: Duration,
}

/// Insert rows into Kine's table until its database holds `target` bytes
/// (as `pg_database_size` counts them: the table, its TOAST and its
/// indexes), then vacuum and checkpoint, as a datastore at rest would be.
pub async fn fill(node: &Node, target: u64) -> anyhow::Result<Filled> {
    let started = Instant::now();
    let db = node.connect("kine").await?;
    let mut db_bytes = database_size(&db).await?;
    let (mut rows, mut value_bytes, mut batch, mut said) = (0u64, 0u64, 0u64, 0u64);
    let mut next = tokio::task::spawn_blocking(move || batch_rows(0));
    while db_bytes < target {
        let (names, values) = next.await?;
        batch += 1;
        next = tokio::task::spawn_blocking(move || batch_rows(batch));
        db.execute("inserting Kine rows", INSERT_MANY, &[&names, &values]).await?;
        rows += names.len() as u64;
        value_bytes += values.iter().map(|v| v.len() as u64).sum::<u64>();
        db_bytes = database_size(&db).await?;
        let tenth = db_bytes * 10 / target.max(1);
        if tenth > said && db_bytes < target {
            said = tenth;
            eprintln!("filling: {} of {} MB", db_bytes / 1_000_000, target / 1_000_000);
        }
    }
    db.batch("vacuuming Kine's table", "VACUUM (ANALYZE) kine").await?;
    db.batch("checkpointing", "CHECKPOINT").await?;
    let db_bytes = database_size(&db).await?;
    Ok(Filled { rows, value_bytes, db_bytes, took: started.elapsed() })
}

/// `pg_database_size` of the session's database.
async fn database_size(db: &Session) -> anyhow::Result<u64> {
    let row = db.query_one("sizing the database", "SELECT pg_database_size(current_database())", &[]).await?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_json_objects_of_1_to_4_kb_with_distinct_keys() {
        let (names, values) = batch_rows(3);
        assert_eq!(names.len() as u64, ROWS_PER_BATCH);
        let distinct: std::collections::HashSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "Kine's (name, prev_revision) index is unique");
        for (name, value) in names.iter().zip(&values) {
            assert!(name.starts_with("/registry/"), "{name}");
            assert!((1020..=4096 + 1024).contains(&value.len()), "{name}: {} bytes", value.len());
            let object: serde_json::Value = serde_json::from_slice(value).unwrap();
            assert!(object["metadata"]["uid"].is_string(), "{object}");
        }
        assert_eq!(batch_rows(3), (names, values), "the same batch every run");
    }

    #[test]
    fn the_writer_rows_are_about_1_kb() {
        let (key, value) = row(1 << 40, 1024);
        assert!(key.contains(&format!("-{:x}-", 1u64 << 40)), "{key}");
        assert!((1020..=2048).contains(&value.len()), "{} bytes", value.len());
    }
}
