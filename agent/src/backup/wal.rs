//! Continuous WAL archiving, in two steps so that PostgreSQL never waits
//! for a slow uplink and never holds a key or a credential:
//!
//! 1. PostgreSQL's `archive_command` runs [`spool`] (as the server's OS
//!    user): it copies the finished WAL file into a bounded local spool
//!    directory and returns. When the spool is full the file is not kept,
//!    a gap is recorded ([`Gap`]), and PostgreSQL carries on: the cluster
//!    keeps serving and point-in-time recovery has a gap from then until
//!    the next base backup.
//! 2. [`upload`] (the agent, as root) compresses, encrypts and stores the
//!    spooled files in the destination's `wal/` and removes them from the
//!    spool.
//!
//! A restore fetches the archived WAL after the base backup's start
//! ([`fetch_for_restore`]) into a directory PostgreSQL's `restore_command`
//! copies from.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::crypto::{Identities, Keys};
use super::manifest::{Compression, Encryption, EncryptionKind};
use super::store::Store;
use super::stream::{ObjectSink, ObjectSource};
use super::{BackupError, Result, io};

/// The record of WAL the spool could not keep, in the spool directory.
pub const GAP_FILE: &str = "gap.json";

/// Where the spool is by default (on the node's state partition).
pub const DEFAULT_SPOOL: &str = "/var/lib/geminik8s/wal-spool";

/// The default bound of the spool: 64 segments of 16 MiB.
pub const DEFAULT_SPOOL_LIMIT: u64 = 1 << 30;

/// What PostgreSQL archives: a segment (`000000010000000000000003`), a
/// segment cut short at a promotion (`...03.partial`), a timeline history
/// file (`00000002.history`) or a backup history file (`...03.00000028.backup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalName {
    pub timeline: u32,
    /// The 16 hex digits after the timeline (log and segment); `None` for a history file.
    pub position: Option<String>,
}

impl WalName {
    /// Parse a WAL file name as PostgreSQL names them, with or without the
    /// stored suffixes (`.zst`, `.age`).
    pub fn parse(name: &str) -> Option<WalName> {
        let base = strip_stored_suffixes(name);
        let hex = |s: &str| s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase());
        if let Some(tl) = base.strip_suffix(".history") {
            return hex(tl).then(|| WalName { timeline: u32::from_str_radix(tl, 16).unwrap_or(0), position: None });
        }
        let segment = base.get(..24)?;
        let rest = &base[24..];
        if !(rest.is_empty() || rest == ".partial" || (rest.ends_with(".backup") && rest.len() == 16)) {
            return None;
        }
        let (tl, log, seg) = (&segment[..8], &segment[8..16], &segment[16..]);
        (hex(tl) && hex(log) && hex(seg)).then(|| WalName {
            timeline: u32::from_str_radix(tl, 16).unwrap_or(0),
            position: Some(segment[8..].to_string()),
        })
    }
}

/// `name` without the suffixes compression and encryption add when stored.
pub fn strip_stored_suffixes(name: &str) -> &str {
    let name = name.strip_suffix(".age").unwrap_or(name);
    name.strip_suffix(".zst").unwrap_or(name)
}

/// WAL not archived because the spool was full: point-in-time recovery
/// cannot cross it until a base backup is taken after it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Gap {
    /// When the first file was dropped (RFC 3339).
    pub since: String,
    /// The first file not archived.
    pub first: String,
    /// How many files were dropped.
    pub files: u64,
}

/// What [`spool`] did with one WAL file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spooled {
    Copied,
    /// The same file was already spooled (PostgreSQL retries after a crash).
    AlreadyThere,
    /// The spool was full: the file was dropped and the gap recorded.
    Dropped,
}

/// Bytes held by the spool's finished files.
fn spool_usage(spool: &Path) -> Result<u64> {
    Ok(spooled(spool)?.iter().map(|(_, size, _)| size).sum())
}

/// The spool's finished WAL files: (name, size, modified), sorted by name
/// (history files sort before their timeline's segments).
pub fn spooled(spool: &Path) -> Result<Vec<(String, u64, SystemTime)>> {
    let entries = match fs::read_dir(spool) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("reading the WAL spool", spool)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("reading the WAL spool", spool))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || WalName::parse(&name).is_none() {
            continue;
        }
        let meta = entry.metadata().map_err(io("reading", entry.path()))?;
        if meta.is_file() {
            out.push((name, meta.len(), meta.modified().map_err(io("reading", entry.path()))?));
        }
    }
    out.sort();
    Ok(out)
}

/// The recorded gap of `spool`, if any.
pub fn read_gap(spool: &Path) -> Result<Option<Gap>> {
    let path = spool.join(GAP_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| BackupError::Refused { what: format!("reading {}", path.display()), detail: e.to_string() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("reading", &path)(e)),
    }
}

/// Forget the recorded gap (a base backup taken after it closes it).
pub fn clear_gap(spool: &Path) -> Result<()> {
    let path = spool.join(GAP_FILE);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", &path)(e)),
    }
}

fn record_gap(spool: &Path, name: &str) -> Result<()> {
    let gap = match read_gap(spool)? {
        Some(mut gap) => {
            gap.files += 1;
            gap
        }
        None => Gap { since: super::now_rfc3339(), first: name.to_string(), files: 1 },
    };
    let bytes = serde_json::to_vec_pretty(&gap).expect("a gap serializes");
    crate::fsutil::write_atomic(&spool.join(GAP_FILE), &bytes, 0o600).map_err(|e| BackupError::Io {
        action: "recording the archiving gap".into(),
        path: spool.join(GAP_FILE),
        cause: io::Error::other(format!("{e:#}")),
    })
}

/// Copy WAL file `source` (PostgreSQL's `%p`) into `spool` as `name`
/// (`%f`), durably, unless that would take the spool past `limit` bytes.
/// Runs as PostgreSQL's `archive_command`: success tells PostgreSQL it may
/// recycle the file.
pub fn spool(source: &Path, name: &str, spool: &Path, limit: u64) -> Result<Spooled> {
    if WalName::parse(name).is_none() {
        return Err(BackupError::Refused {
            what: format!("archiving {name:?}"),
            detail: "not a WAL file name; archive_command passes %p %f".into(),
        });
    }
    fs::create_dir_all(spool).map_err(io("creating the WAL spool", spool))?;
    let target = spool.join(name);
    let size = fs::metadata(source).map_err(io("reading", source))?.len();
    if let Ok(existing) = fs::metadata(&target) {
        if existing.len() == size && same_content(source, &target)? {
            return Ok(Spooled::AlreadyThere);
        }
        // A different file under the name (a crash mid-copy leaves only
        // `.partial` files, so this is a timeline's segment written again):
        // the newest is what PostgreSQL asks to keep.
    }
    if spool_usage(spool)? + size > limit {
        record_gap(spool, name)?;
        return Ok(Spooled::Dropped);
    }
    let mut input = File::open(source).map_err(io("opening", source))?;
    let mut out = super::store::local_object(target)?;
    io::copy(&mut input, &mut out).map_err(io("copying into the WAL spool", spool.join(name)))?;
    out.commit()?;
    Ok(Spooled::Copied)
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let (ha, hb) = (hash_file(a)?, hash_file(b)?);
    Ok(ha == hb)
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let file = File::open(path).map_err(io("opening", path))?;
    super::stream::hash_all(file).map_err(io("reading", path))
}

/// What one [`upload`] pass did, and what is left.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Uploaded {
    /// Files stored in the destination by this pass.
    pub files: Vec<String>,
    /// Their bytes before compression.
    pub bytes: u64,
    /// Spooled files removed because the destination already had them.
    pub already_archived: usize,
    /// Files still in the spool.
    pub pending: usize,
    /// When the oldest file still in the spool was written (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_pending: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap: Option<Gap>,
}

/// Whether this node stores its spooled WAL or only tidies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Store what the destination lacks.
    Archive,
    /// Only remove what the destination already has (the other node archives).
    Tidy,
}

/// Store the spooled WAL files the destination lacks (with `Role::Archive`),
/// compressed and encrypted, oldest first; remove from the spool each file
/// the destination holds. Stops at the first failure, leaving the rest
/// spooled for the next pass.
pub fn upload(spool: &Path, store: &dyn Store, keys: &Keys, compression: Compression, role: Role) -> Result<Uploaded> {
    let archived: std::collections::HashSet<String> =
        store.list_wal()?.into_iter().map(|e| strip_stored_suffixes(&e.name).to_string()).collect();
    let mut report = Uploaded::default();
    let encryption = keys.describe();
    let mut failure = None;
    for (name, size, _) in spooled(spool)? {
        let path = spool.join(&name);
        if archived.contains(&name) {
            remove_spooled(&path)?;
            report.already_archived += 1;
            continue;
        }
        if role == Role::Tidy || failure.is_some() {
            continue;
        }
        let stored = format!("{name}{}{}", compression.suffix(), encryption.kind.suffix());
        let result = (|| {
            let mut input = File::open(&path).map_err(io("opening", &path))?;
            let mut sink = ObjectSink::new(store.put_wal(&stored)?, &stored, compression, keys)?;
            io::copy(&mut input, &mut sink).map_err(io(format!("archiving {name}"), &path))?;
            let (object, _) = sink.finish().map_err(io(format!("finishing {stored}"), &path))?;
            object.commit()
        })();
        match result {
            Ok(()) => {
                remove_spooled(&path)?;
                report.files.push(name);
                report.bytes += size;
            }
            Err(e) => failure = Some(e),
        }
    }
    let left = spooled(spool)?;
    report.pending = left.len();
    report.oldest_pending =
        left.iter().map(|(_, _, t)| *t).min().map(|t| humantime::format_rfc3339_seconds(t).to_string());
    report.gap = read_gap(spool)?;
    match failure {
        Some(e) if report.files.is_empty() => Err(e),
        Some(e) => {
            tracing::warn!(error = %e, uploaded = report.files.len(), "archiving stopped at a failure; the rest stays spooled");
            Ok(report)
        }
        None => Ok(report),
    }
}

fn remove_spooled(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing from the WAL spool", path)(e)),
    }
}

/// The WAL file a base backup starts in, from its `backup_label`
/// (`START WAL LOCATION: 0/2000028 (file 000000010000000000000002)`).
pub fn start_file(backup_label: &str) -> Option<String> {
    let line = backup_label.lines().find(|l| l.starts_with("START WAL LOCATION:"))?;
    let file = line.split("(file ").nth(1)?.strip_suffix(')')?;
    WalName::parse(file).filter(|w| w.position.is_some()).map(|_| file.to_string())
}

/// Whether archived file `name` can be needed to recover a backup that
/// starts in `start` (a segment name): history files, and every segment
/// of its timeline or a later one from its start on.
fn needed_after(name: &WalName, start: &WalName) -> bool {
    match &name.position {
        None => true,
        Some(pos) => {
            name.timeline > start.timeline
                || (name.timeline == start.timeline && pos.as_str() >= start.position.as_deref().unwrap_or(""))
        }
    }
}

/// Whether archived file `name` (stored name) is of no use to a recovery
/// from a backup starting in segment `start`: a segment, cut-short segment
/// or backup history file before it. History files are always of use.
pub fn older_than(name: &str, start: &str) -> bool {
    let base = strip_stored_suffixes(name);
    match (WalName::parse(base), WalName::parse(start)) {
        (Some(w), Some(s)) if w.position.is_some() => !needed_after(&w, &s),
        _ => false,
    }
}

/// Decrypt and decompress into `dir` every archived WAL file a recovery
/// from a backup starting in segment `start` can ask for; with no `start`,
/// only the timeline history files (a recovery to the end of a backup
/// reads them to choose a timeline no other server has used). Returns
/// (files, bytes).
pub fn fetch_for_restore(
    store: &dyn Store,
    identities: &Identities,
    start: Option<&str>,
    dir: &Path,
) -> Result<(usize, u64)> {
    let start_name = match start {
        Some(start) => Some(WalName::parse(start).ok_or_else(|| BackupError::Refused {
            what: format!("recovering from WAL file {start}"),
            detail: "not a WAL segment name".into(),
        })?),
        None => None,
    };
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let (mut files, mut bytes) = (0, 0);
    for entry in store.list_wal()? {
        let base = strip_stored_suffixes(&entry.name);
        if base.ends_with(".partial") || base.ends_with(".backup") {
            continue;
        }
        let Some(wal) = WalName::parse(base) else { continue };
        let wanted = match &start_name {
            Some(start) => needed_after(&wal, start),
            None => wal.position.is_none(),
        };
        if !wanted {
            continue;
        }
        let reader = store.get_wal(&entry.name)?.ok_or_else(|| BackupError::Corrupt {
            id: super::store::WAL_PREFIX.into(),
            object: entry.name.clone(),
            detail: "listed but gone when read".into(),
        })?;
        let compression = if entry.name.contains(".zst") { Compression::Zstd { level: 0 } } else { Compression::None };
        let kind = if entry.name.ends_with(".age") { EncryptionKind::AgeX25519 } else { EncryptionKind::None };
        let encryption = Encryption { kind, recipients: Vec::new() };
        let mut source =
            ObjectSource::new(reader, compression, &encryption, identities, super::store::WAL_PREFIX, &entry.name)?;
        let target = dir.join(base);
        let mut out = File::create(&target).map_err(io("creating", &target))?;
        let n = io::copy(&mut source, &mut out).map_err(|e| BackupError::Corrupt {
            id: super::store::WAL_PREFIX.into(),
            object: entry.name.clone(),
            detail: format!("reading: {e}"),
        })?;
        out.flush().map_err(io("writing", &target))?;
        files += 1;
        bytes += n;
    }
    Ok((files, bytes))
}

/// The segment name holding `lsn` (`0/3000028`) on `timeline`, with
/// PostgreSQL's default 16 MiB segments.
pub fn segment_of(timeline: u32, lsn: &str) -> Option<String> {
    let (hi, lo) = lsn.split_once('/')?;
    let lsn = (u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?;
    let segno = lsn >> 24;
    Some(format!("{timeline:08X}{:08X}{:08X}", segno >> 8, segno & 0xFF))
}

/// The segment after `position` (16 hex digits: log, segment) with
/// PostgreSQL's default 16 MiB segments (256 to a log).
fn next_position(position: &str) -> Option<String> {
    let log = u32::from_str_radix(position.get(..8)?, 16).ok()?;
    let seg = u32::from_str_radix(position.get(8..)?, 16).ok()?;
    let (log, seg) = if seg >= 0xFF { (log.checked_add(1)?, 0) } else { (log, seg + 1) };
    Some(format!("{log:08X}{seg:08X}"))
}

/// The archived WAL from segment `start` on: each timeline's segments must
/// follow one another (the backup's own timeline from `start`; a later
/// timeline from its first segment). Returns the missing stretches as
/// `FIRST..LAST` (or one name), empty when continuous.
pub fn missing_segments(names: &[String], start: &str) -> Vec<String> {
    let Some(start) = WalName::parse(start).filter(|w| w.position.is_some()) else {
        return vec![format!("{start} (not a segment name)")];
    };
    let mut by_timeline: std::collections::BTreeMap<u32, Vec<String>> = std::collections::BTreeMap::new();
    for name in names {
        let base = strip_stored_suffixes(name);
        if base.len() != 24 {
            continue; // history, .partial and .backup files
        }
        if let Some(w) = WalName::parse(base)
            && needed_after(&w, &start)
            && let Some(p) = w.position
        {
            by_timeline.entry(w.timeline).or_default().push(p);
        }
    }
    let mut missing = Vec::new();
    let name = |tl: u32, p: &str| format!("{tl:08X}{p}");
    for (tl, mut positions) in by_timeline {
        positions.sort();
        positions.dedup();
        let mut expected = if tl == start.timeline { start.position.clone() } else { positions.first().cloned() };
        for p in positions {
            if let Some(e) = &expected
                && *e < p
            {
                // e .. the one before p are missing.
                let mut last = e.clone();
                while let Some(n) = next_position(&last).filter(|n| *n < p) {
                    last = n;
                }
                missing.push(if last == *e { name(tl, e) } else { format!("{}..{}", name(tl, e), name(tl, &last)) });
            }
            expected = next_position(&p);
        }
    }
    missing
}

/// Where a restore puts the fetched WAL inside the data directory it
/// builds (removed once recovery ended).
pub fn restore_wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("geminik8s-restore-wal")
}

/// Read `path` whole (small files: labels).
pub fn read_text(path: &Path) -> Result<String> {
    let mut s = String::new();
    File::open(path).and_then(|mut f| f.read_to_string(&mut s)).map_err(io("reading", path))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::store::LocalDir;

    #[test]
    fn wal_names_are_parsed_as_postgres_writes_them() {
        let seg = WalName::parse("000000020000000A000000FF").unwrap();
        assert_eq!((seg.timeline, seg.position.as_deref()), (2, Some("0000000A000000FF")));
        assert_eq!(WalName::parse("00000003.history").unwrap(), WalName { timeline: 3, position: None });
        assert!(WalName::parse("000000010000000000000003.partial").is_some());
        assert!(WalName::parse("000000010000000000000003.00000028.backup").is_some());
        assert!(WalName::parse("000000010000000000000003.zst.age").is_some(), "stored names too");
        for bad in ["", "00000001", "0000000100000000000000", "000000010000000000000003x", "../etc/passwd", "gap.json"]
        {
            assert!(WalName::parse(bad).is_none(), "{bad}");
        }
        assert!(WalName::parse("00000001000000000000000a").is_none(), "PostgreSQL writes upper case");
    }

    #[test]
    fn the_start_file_comes_from_the_backup_label() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\n";
        assert_eq!(start_file(label).as_deref(), Some("000000010000000000000002"));
        assert_eq!(start_file("LABEL: x\n"), None);
    }

    #[test]
    fn a_restore_needs_history_and_what_follows_the_start() {
        let start = WalName::parse("000000020000000000000005").unwrap();
        let needed = |n: &str| needed_after(&WalName::parse(n).unwrap(), &start);
        assert!(needed("00000001.history") && needed("00000002.history"));
        assert!(needed("000000020000000000000005") && needed("000000020000000100000000"));
        assert!(needed("000000030000000000000004"), "a later timeline forks from before or after");
        assert!(!needed("000000020000000000000004") && !needed("000000010000000000000009"));
    }

    #[test]
    fn only_what_no_kept_backup_needs_is_older() {
        let start = "000000020000000000000005";
        assert!(older_than("000000020000000000000004.zst.age", start));
        assert!(older_than("000000010000000000000009.partial.zst", start));
        assert!(!older_than("000000020000000000000005.zst.age", start));
        assert!(!older_than("00000001.history.zst.age", start));
        assert!(!older_than("000000030000000000000001", start));
        assert!(!older_than("gap.json", start));
    }

    #[test]
    fn an_lsn_is_in_the_segment_postgres_names() {
        assert_eq!(segment_of(1, "0/3000028").as_deref(), Some("000000010000000000000003"));
        assert_eq!(segment_of(2, "1/FF000000").as_deref(), Some("0000000200000001000000FF"));
        assert_eq!(segment_of(1, "nonsense"), None);
    }

    #[test]
    fn gaps_in_the_archive_are_named() {
        let names: Vec<String> = [
            "00000001.history",
            "000000010000000000000003.zst.age",
            "0000000100000000000000FE",
            "0000000100000000000000FF",
            "000000010000000100000000",
            "000000010000000100000003",
            "000000020000000100000003.partial",
            "000000020000000100000004",
            "000000020000000100000006",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            missing_segments(&names, "000000010000000000000003"),
            [
                "000000010000000000000004..0000000100000000000000FD",
                "000000010000000100000001..000000010000000100000002",
                "000000020000000100000005",
            ]
        );
        assert_eq!(missing_segments(&names[..5], "0000000100000000000000FE"), Vec::<String>::new());
        assert_eq!(missing_segments(&names[..2], "000000010000000000000002"), ["000000010000000000000002"]);
    }

    fn write(path: &Path, bytes: &[u8]) {
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_full_spool_drops_the_file_and_records_the_gap() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, spool_dir) = (tmp.path().join("pg_wal"), tmp.path().join("spool"));
        fs::create_dir(&wal).unwrap();
        let names = ["000000010000000000000001", "000000010000000000000002", "000000010000000000000003"];
        for (i, n) in names.iter().enumerate() {
            write(&wal.join(n), &[i as u8; 100]);
        }
        assert_eq!(spool(&wal.join(names[0]), names[0], &spool_dir, 250).unwrap(), Spooled::Copied);
        assert_eq!(spool(&wal.join(names[0]), names[0], &spool_dir, 250).unwrap(), Spooled::AlreadyThere);
        assert_eq!(spool(&wal.join(names[1]), names[1], &spool_dir, 250).unwrap(), Spooled::Copied);
        assert_eq!(read_gap(&spool_dir).unwrap(), None);
        assert_eq!(spool(&wal.join(names[2]), names[2], &spool_dir, 250).unwrap(), Spooled::Dropped);
        assert_eq!(spool(&wal.join(names[2]), names[2], &spool_dir, 250).unwrap(), Spooled::Dropped);
        let gap = read_gap(&spool_dir).unwrap().unwrap();
        assert_eq!((gap.first.as_str(), gap.files), (names[2], 2));
        let listed: Vec<String> = spooled(&spool_dir).unwrap().into_iter().map(|(n, ..)| n).collect();
        assert_eq!(listed, names[..2]);
        assert!(spool(&wal.join(names[0]), "../x", &spool_dir, 250).is_err());
    }

    #[test]
    fn upload_stores_encrypted_files_once_and_empties_the_spool() {
        let tmp = tempfile::tempdir().unwrap();
        let (spool_dir, dest) = (tmp.path().join("spool"), tmp.path().join("dest"));
        fs::create_dir(&spool_dir).unwrap();
        let content: Vec<u8> = (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect();
        for n in ["00000002.history", "000000020000000000000007", "000000020000000000000008"] {
            write(&spool_dir.join(n), &content);
        }
        let store = LocalDir::new(&dest);
        let (secret, public) = crate::backup::crypto::generate_identity();
        let keys = Keys::parse(&[public]).unwrap();
        let zstd = Compression::Zstd { level: 3 };

        // Tidy only: nothing stored, nothing removed.
        let tidy = upload(&spool_dir, &store, &keys, zstd, Role::Tidy).unwrap();
        assert_eq!((tidy.files.len(), tidy.pending), (0, 3));

        let done = upload(&spool_dir, &store, &keys, zstd, Role::Archive).unwrap();
        assert_eq!(done.files, ["00000002.history", "000000020000000000000007", "000000020000000000000008"]);
        assert_eq!((done.pending, done.oldest_pending.clone()), (0, None));
        let stored: Vec<String> = store.list_wal().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(stored[1], "000000020000000000000007.zst.age");
        let raw = fs::read(dest.join("wal").join(&stored[1])).unwrap();
        assert!(raw.starts_with(b"age-encryption.org/v1\n"));

        // The other node spooled the same file: it is tidied, not stored again.
        write(&spool_dir.join("000000020000000000000008"), &content);
        let again = upload(&spool_dir, &store, &keys, zstd, Role::Tidy).unwrap();
        assert_eq!((again.already_archived, again.pending), (1, 0));

        // A restore reads them back from the start segment on.
        let id_file = tmp.path().join("id.txt");
        write(&id_file, age::secrecy::ExposeSecret::expose_secret(&secret).as_bytes());
        let identities = Identities::load(&[id_file.display().to_string()]).unwrap();
        let out = tmp.path().join("fetched");
        let (files, bytes) = fetch_for_restore(&store, &identities, Some("000000020000000000000008"), &out).unwrap();
        assert_eq!((files, bytes), (2, 2 * content.len() as u64));
        assert_eq!(fs::read(out.join("000000020000000000000008")).unwrap(), content);
        assert!(out.join("00000002.history").is_file() && !out.join("000000020000000000000007").exists());
        // To the end of a backup: the history files only.
        let histories = tmp.path().join("histories");
        assert_eq!(fetch_for_restore(&store, &identities, None, &histories).unwrap().0, 1);
        assert!(histories.join("00000002.history").is_file());
        let err = fetch_for_restore(&store, &Identities::load(&[]).unwrap(), Some("000000020000000000000007"), &out);
        assert!(err.err().unwrap().to_string().contains("--identity"));
    }
}
