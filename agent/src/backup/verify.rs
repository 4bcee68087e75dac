//! Reading backups back: the list of complete backups, and `verify`, which
//! checks every object against the manifest (stored checksums without a
//! key; with an identity, also decrypted and decompressed end to end, and
//! the tar read to its end with PostgreSQL's files in it).

use std::io::{self, Read};

use super::crypto::Identities;
use super::manifest::{Manifest, Object, Verified, VerifyLevel};
use super::store::{Store, WalEntry};
use super::stream::{ObjectSource, Written, hash_all};
use super::{BackupError, Result, wal};

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

/// The times backup `m` restores to: from its end to about when the last
/// WAL file of the archive's continuous run from its start was stored (a
/// transaction committed up to a few seconds before that is in the archive).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    /// The backup's end (RFC 3339 UTC): nothing earlier can be restored from it.
    pub from: String,
    /// When the last WAL file of the run was stored; `None` when no archived
    /// WAL follows the backup (only its end can be restored).
    pub to: Option<String>,
    /// That file.
    pub through_segment: Option<String>,
    /// The first missing stretch, which ends the run early.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap: Option<String>,
}

/// [`Window`] of `m` given the archive's listing `archived`.
pub fn window(m: &Manifest, archived: &[WalEntry]) -> Window {
    let mut w = Window { from: m.stop_time.clone(), to: None, through_segment: None, gap: None };
    let Some(start) = wal::segment_of(m.postgres.timeline, &m.postgres.start_lsn) else { return w };
    let names: Vec<String> = archived.iter().map(|e| e.name.clone()).collect();
    w.gap = wal::missing_segments(&names, &start).into_iter().next();
    let limit = w.gap.as_deref().and_then(|g| g.split("..").next());
    let last = archived
        .iter()
        .map(|e| (wal::strip_stored_suffixes(&e.name), e.modified))
        .filter(|(name, _)| name.len() == 24 && !wal::older_than(name, &start) && limit.is_none_or(|l| *name < l))
        .max_by(|a, b| a.0.cmp(b.0));
    let from = humantime::parse_rfc3339_weak(&m.stop_time).ok();
    if let Some((name, stored)) = last
        && from.is_none_or(|f| stored > f)
    {
        w.to = Some(humantime::format_rfc3339_seconds(stored).to_string());
        w.through_segment = Some(name.to_string());
    }
    w
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(name: &str, at: &str) -> WalEntry {
        WalEntry { name: format!("{name}.zst.age"), size: 1, modified: humantime::parse_rfc3339(at).unwrap() }
    }

    #[test]
    fn a_backup_restores_from_its_end_to_its_last_continuous_wal() {
        // The backup starts in segment 3 and ends at 10:00:05.
        let mut m = super::super::manifest::tests::sample("20260821T100000Z", "2026-08-21T10:00:00Z");
        m.stop_time = "2026-08-21T10:00:05Z".into();
        m.postgres.start_lsn = "0/3000028".into();
        let seg = |n: u32| format!("00000001000000000000000{n:X}");
        let at = |s: u32| format!("2026-08-21T10:{s:02}:00Z");

        let none = window(&m, &[]);
        assert_eq!((none.from.as_str(), none.to, none.gap), ("2026-08-21T10:00:05Z", None, None));

        let mut archived = vec![stored(&seg(2), &at(0)), stored(&seg(3), &at(1)), stored(&seg(4), &at(2))];
        archived.push(stored("00000002.history", &at(2)));
        let w = window(&m, &archived);
        assert_eq!((w.to.as_deref(), w.through_segment.as_deref()), (Some("2026-08-21T10:02:00Z"), Some(&*seg(4))));
        assert_eq!(w.gap, None);

        // Segment 5 is missing: the window ends at 4 whatever follows.
        archived.extend([stored(&seg(6), &at(5)), stored(&seg(7), &at(6))]);
        let w = window(&m, &archived);
        assert_eq!((w.to.as_deref(), w.gap.as_deref()), (Some("2026-08-21T10:02:00Z"), Some(&*seg(5))));

        // WAL stored before the backup ended adds nothing.
        let early = [stored(&seg(3), "2026-08-21T10:00:02Z")];
        assert_eq!(window(&m, &early).to, None);
    }
}
