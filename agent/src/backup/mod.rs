//! Backups of a node's PostgreSQL (Kine's datastore) and restores from them.
//!
//! A backup is a `pg_basebackup` in tar format with the WAL it needs to be
//! consistent (`-X fetch`), streamed through zstd and age into a
//! [`store::Store`], and described by a JSON [`manifest::Manifest`] that is
//! written last: a backup without its manifest is incomplete and never
//! listed, verified or restored. The pieces:
//! - [`manifest`]: the manifest, its schema version and its checks;
//! - [`store`]: where backups live: a local directory, or an S3 bucket ([`s3`]);
//! - [`crypto`]: age recipients, identities and passphrases;
//! - [`stream`]: the writers and readers (compression, encryption, checksums);
//! - [`create`], [`verify`], [`restore`], [`prune`]: the operations the
//!   `gemin_k8s backup` and `gemin_k8s restore` commands run.

pub mod create;
pub mod crypto;
pub mod incremental;
pub mod manifest;
pub mod node;
pub mod prune;
pub mod recover;
pub mod restore;
pub mod s3;
pub mod store;
pub mod stream;
pub mod verify;
pub mod wal;

use std::path::PathBuf;

pub use manifest::Manifest;
pub use store::{LocalDir, Store};

/// Where backups go when no destination is given: the node's state
/// partition (same disk as the data: copy them off the node).
pub const DEFAULT_DESTINATION: &str = "/var/lib/geminik8s/backups";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    // The cause is in the message and not a `source`: errors are printed
    // with their chain, which would say it twice.
    #[error("{action} ({path}): {cause}")]
    Io { action: String, path: PathBuf, cause: std::io::Error },
    #[error("backup {id} not found in {destination}; `gemin_k8s backup list --from {destination}` shows what is there")]
    NotFound { id: String, destination: String },
    #[error("no complete backup in {destination}; take one with `gemin_k8s backup create --output {destination}`")]
    NoBackups { destination: String },
    #[error("the manifest of backup {id} in {destination} cannot be used: {detail}")]
    BadManifest { id: String, destination: String, detail: String },
    #[error("backup {id}: object {object} is damaged: {detail}")]
    Corrupt { id: String, object: String, detail: String },
    #[error("{0}")]
    Key(String),
    #[error("{what}: {detail}")]
    Refused { what: String, detail: String },
    #[error("{0} is not built yet")]
    NotBuilt(String),
    #[error("{action}: {cause}")]
    Tool { action: String, cause: crate::cmd::CmdError },
    #[error("{what}: {detail}")]
    Postgres { what: String, detail: String },
}

pub type Result<T, E = BackupError> = std::result::Result<T, E>;

/// An I/O error naming what was done to which path.
pub(crate) fn io(action: impl Into<String>, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BackupError {
    let (action, path) = (action.into(), path.into());
    move |source| BackupError::Io { action, path, cause: source }
}

/// Now as RFC 3339 UTC with seconds (`2026-08-21T10:15:02Z`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// A backup id from a UTC time: `20260821T101502Z`. Ids sort in time order.
pub fn backup_id(now: time::OffsetDateTime) -> String {
    crate::fsutil::utc_stamp(now)
}

/// Human size: `512 B`, `1.5 KiB`, `23.4 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_utc_stamps_that_sort_in_time_order() {
        let t = time::OffsetDateTime::from_unix_timestamp(1_787_307_302).unwrap();
        assert_eq!(backup_id(t), "20260821T101502Z");
        let later = time::OffsetDateTime::from_unix_timestamp(1_787_307_302 + 3600 * 24 * 40).unwrap();
        assert!(backup_id(later) > backup_id(t));
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(23 * 1024 * 1024 + 400 * 1024), "23.4 MiB");
    }
}
