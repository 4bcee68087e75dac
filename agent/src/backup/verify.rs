//! Reading backups back: the list of complete backups, and `verify`, which
//! checks every object against the manifest (stored checksums without a
//! key; with an identity, also decrypted and decompressed end to end, and
//! the tar read to its end with PostgreSQL's files in it).

use std::io::{self, Read};

use super::crypto::Identities;
use super::manifest::{Manifest, Object, Verified, VerifyLevel};
use super::store::Store;
use super::stream::{ObjectSource, Written, hash_all};
use super::{BackupError, Result};

/// The manifest of backup `id`; an error when it is missing or unusable.
pub fn manifest(store: &dyn Store, id: &str) -> Result<Manifest> {
    let bytes =
        store.get_manifest(id)?.ok_or_else(|| BackupError::NotFound { id: id.into(), destination: store.url() })?;
    Manifest::parse(&bytes, id).map_err(|detail| BackupError::BadManifest {
        id: id.into(),
        destination: store.url(),
        detail,
    })
}

/// A complete backup as listed, or one whose manifest cannot be read
/// (serialised as the manifest, or as `{"id", "error"}`).
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum Listed {
    Ok(Box<Manifest>),
    Unreadable { id: String, error: String },
}

/// Every complete backup in `store`, oldest first (by id, which is the
/// UTC start time).
pub fn list(store: &dyn Store) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    for entry in store.list()?.into_iter().filter(|e| e.complete) {
        match manifest(store, &entry.id) {
            Ok(m) => out.push(Listed::Ok(Box::new(m))),
            Err(e) => out.push(Listed::Unreadable { id: entry.id, error: e.to_string() }),
        }
    }
    Ok(out)
}

/// The newest complete backup with a readable manifest.
pub fn latest(store: &dyn Store) -> Result<Manifest> {
    latest_ending_by(store, None)
}

/// The newest complete backup with a readable manifest that ended by
/// `target` (all of them without one): a recovery to `target` starts there.
pub fn latest_ending_by(store: &dyn Store, target: Option<std::time::SystemTime>) -> Result<Manifest> {
    let ended_by = |m: &Manifest| match target {
        None => true,
        Some(t) => humantime::parse_rfc3339_weak(&m.stop_time).is_ok_and(|stop| stop <= t),
    };
    list(store)?
        .into_iter()
        .rev()
        .find_map(|l| match l {
            Listed::Ok(m) if ended_by(&m) => Some(*m),
            _ => None,
        })
        .ok_or_else(|| match target {
            None => BackupError::NoBackups { destination: store.url() },
            Some(t) => BackupError::Refused {
                what: format!("recovering to {}", humantime::format_rfc3339_seconds(t)),
                detail: format!(
                    "no complete backup in {} ended by then; `gemin_k8s backup list --from {}` shows when each ended",
                    store.url(),
                    store.url()
                ),
            },
        })
}

/// The files a base backup's tar must hold to be restorable.
const REQUIRED_FILES: &[&str] = &["PG_VERSION", "backup_label", "backup_manifest", "global/pg_control"];

/// Check every object of `m` in `store`: its stored size and checksum;
/// with `identities` (not empty, or the backup is not encrypted and
/// `full` is asked) also its content. Returns the level reached; the error
/// names the damaged object.
pub fn verify(store: &dyn Store, m: &Manifest, identities: &Identities, full: bool) -> Result<VerifyLevel> {
    let level = if full { VerifyLevel::Full } else { VerifyLevel::Checksums };
    for o in &m.objects {
        let corrupt = |detail: String| BackupError::Corrupt { id: m.id.clone(), object: o.name.clone(), detail };
        let reader = store.get_object(&m.id, &o.name)?;
        if level == VerifyLevel::Checksums {
            let (size, sha) = hash_all(reader).map_err(|e| corrupt(format!("reading it: {e}")))?;
            check_stored(o, size, &sha).map_err(corrupt)?;
            continue;
        }
        let mut source = ObjectSource::new(reader, m.compression, &m.encryption, identities, &m.id, &o.name)?;
        let problem = match o.content.as_str() {
            super::node::CONTENT => {
                let mut text = String::new();
                source.read_to_string(&mut text).map_err(|e| corrupt(format!("reading its content: {e}")))?;
                super::node::parse(&text, &m.id).err().map(|e| format!("it is not a usable cloud-config: {e}"))
            }
            _ => {
                let missing = check_tar(&mut source).map_err(|e| corrupt(format!("reading its content: {e}")))?;
                (!missing.is_empty()).then(|| format!("the base backup lacks {}", missing.join(", ")))
            }
        };
        check_read(o, &source.finish()).map_err(corrupt)?;
        if let Some(problem) = problem {
            return Err(corrupt(problem));
        }
    }
    Ok(level)
}

/// Whether an object read to its end (`got`) is the one the manifest
/// describes, at both ends.
pub fn check_read(o: &Object, got: &Written) -> std::result::Result<(), String> {
    check_stored(o, got.size, &got.sha256)?;
    if (got.content_size, got.content_sha256.as_str()) != (o.content_size, o.content_sha256.as_str()) {
        return Err(format!(
            "its content is {} bytes with SHA-256 {}, the manifest says {} bytes with {}",
            got.content_size, got.content_sha256, o.content_size, o.content_sha256
        ));
    }
    Ok(())
}

fn check_stored(o: &Object, size: u64, sha256: &str) -> std::result::Result<(), String> {
    if size != o.size || sha256 != o.sha256 {
        return Err(format!(
            "it is {size} bytes with SHA-256 {sha256}, the manifest says {} bytes with {}",
            o.size, o.sha256
        ));
    }
    Ok(())
}

/// Read a tar to its end; returns the [`REQUIRED_FILES`] it lacks.
fn check_tar(input: impl Read) -> io::Result<Vec<String>> {
    let mut archive = tar::Archive::new(input);
    let mut seen = Vec::new();
    for entry in archive.entries()? {
        let entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        if REQUIRED_FILES.contains(&path.as_str()) {
            seen.push(path);
        }
    }
    io::copy(&mut archive.into_inner(), &mut io::sink())?;
    Ok(REQUIRED_FILES.iter().filter(|f| !seen.iter().any(|s| s == *f)).map(|f| f.to_string()).collect())
}

/// Record a successful verification in the manifest.
pub fn record(store: &dyn Store, m: &mut Manifest, level: VerifyLevel) -> Result<()> {
    m.verified = Some(Verified { at: super::now_rfc3339(), level });
    store.put_manifest(&m.id, &m.to_json())
}
