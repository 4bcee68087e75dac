//! hostMeta: each node's record of the cluster topology, its role and the
//! election epoch, kept in `hostmeta.json` under the state directory
//! (`/var/lib/geminik8s` on nodes; a parameter everywhere so tests use temp dirs).
//!
//! The record decides elections (epoch first, then the PostgreSQL position), so
//! it is written atomically and never replaced behind the operator's back: a
//! corrupt or foreign file is an error, and the only repair is
//! [`recover_from_peer`], which keeps the old file as `hostmeta.json.corrupt-<unix-ts>`.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// File name of the record inside the state directory.
pub const FILE_NAME: &str = "hostmeta.json";
/// State directory on nodes.
pub const DEFAULT_DIR: &str = "/var/lib/geminik8s";
/// Schema version this agent writes and the newest it reads.
pub const SCHEMA_VERSION: u32 = 1;
/// How far a restore raises the epoch ([`HostMeta::restored`]): more
/// promotions than a cluster makes in its life, so no epoch the other node
/// reached since the backup can be as high.
pub const RESTORE_EPOCH_STEP: u64 = 1_000_000;

/// Mode of the file: readable by everyone, it holds no secrets.
pub const FILE_MODE: u32 = 0o644;

/// A node's role as recorded in hostMeta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    Follower,
    Unknown,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Unknown => "unknown",
        })
    }
}

/// One member of the pair as seen by the node that wrote the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub ip: IpAddr,
    pub role: Role,
}

/// A PostgreSQL write-ahead-log position. Its text form is PostgreSQL's
/// `X/Y` (two hexadecimal halves of the 64-bit value), which is also how it
/// is stored in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// An LSN text that is not PostgreSQL's `X/Y` form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected PostgreSQL's X/Y form with hexadecimal halves, e.g. 0/16B3748")]
pub struct LsnParseError(String);

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |h: &str| {
            if h.is_empty() || h.len() > 8 {
                return Err(err());
            }
            u32::from_str_radix(h, 16).map_err(|_| err())
        };
        Ok(Lsn((u64::from(half(hi)?) << 32) | u64::from(half(lo)?)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The hostMeta record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMeta {
    pub schema_version: u32,
    pub cluster: String,
    /// The node that wrote this record.
    pub node: Member,
    pub peer: Member,
    pub vip: IpAddr,
    /// Incremented by every promotion; the first thing elections compare.
    pub epoch: u64,
    /// Wall-clock time of the last write, unix milliseconds. Recorded for
    /// operators; never used to decide anything (wall clocks jump).
    pub last_modified_unix_ms: u64,
    /// PostgreSQL timeline of this node's data, when known.
    pub timeline: Option<u32>,
    /// PostgreSQL WAL position of this node's data, when known.
    pub lsn: Option<Lsn>,
    pub agent_version: String,
    /// This node fenced itself as leader (released the VIP, stopped
    /// writes). A fenced former leader never resumes on its own after a
    /// restart: it needs the peer's vote.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fenced: bool,
}

impl HostMeta {
    /// A record for a node that has none yet: epoch 0 (no election has
    /// happened), both roles unknown.
    pub fn fresh(cluster: &str, node: (&str, IpAddr), peer: (&str, IpAddr), vip: IpAddr) -> HostMeta {
        HostMeta {
            schema_version: SCHEMA_VERSION,
            cluster: cluster.to_string(),
            node: Member { name: node.0.to_string(), ip: node.1, role: Role::Unknown },
            peer: Member { name: peer.0.to_string(), ip: peer.1, role: Role::Unknown },
            vip,
            epoch: 0,
            last_modified_unix_ms: 0,
            timeline: None,
            lsn: None,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            fenced: false,
        }
    }

    /// This node's record rebuilt from the peer's copy: the two members
    /// swapped, the peer's epoch, and no PostgreSQL position (the local
    /// database reports its own). `own_name` must be the peer's idea of us.
    pub fn derive_from_peer(peer_meta: &HostMeta, own_name: &str) -> Result<HostMeta, HostMetaError> {
        if peer_meta.peer.name != own_name {
            return Err(HostMetaError::PeerMismatch {
                expected: own_name.to_string(),
                found: peer_meta.peer.name.clone(),
            });
        }
        Ok(HostMeta {
            schema_version: SCHEMA_VERSION,
            cluster: peer_meta.cluster.clone(),
            node: peer_meta.peer.clone(),
            peer: peer_meta.node.clone(),
            vip: peer_meta.vip,
            epoch: peer_meta.epoch,
            last_modified_unix_ms: peer_meta.last_modified_unix_ms,
            timeline: None,
            lsn: None,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            fenced: false,
        })
    }

    /// The record of a node whose datastore was just restored from a
    /// backup: it leads (not fenced) at an epoch [`RESTORE_EPOCH_STEP`]
    /// above its own, so its claim beats the other node's in the next
    /// election and the other node's data, newer than the restore, rejoins
    /// it. The position is left for the datastore to report.
    pub fn restored(mut self) -> HostMeta {
        self.epoch = self.epoch.saturating_add(RESTORE_EPOCH_STEP);
        self.node.role = Role::Leader;
        self.peer.role = Role::Follower;
        self.fenced = false;
        self.timeline = None;
        self.lsn = None;
        self.agent_version = env!("CARGO_PKG_VERSION").to_string();
        self.touch();
        self
    }

    /// Set `last_modified_unix_ms` to the current wall-clock time.
    pub fn touch(&mut self) {
        self.last_modified_unix_ms = unix_ms(SystemTime::now());
    }
}

/// What can go wrong reading, writing or recovering hostMeta.
#[derive(Debug, thiserror::Error)]
pub enum HostMetaError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "{path} is corrupt ({reason}); it was left untouched. Start the peer so this node can recover \
         the record from the peer's copy, or move the file aside to start this node as new"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} belongs to cluster {found:?}, but this node is configured for cluster {expected:?}; \
         it was left untouched. Check geminik8s.cluster.name, or move the file aside"
    )]
    Foreign { path: PathBuf, found: String, expected: String },
    #[error(
        "{path} has schema version {found}, this agent reads up to {supported}; it was written by a newer \
         agent. Upgrade the agent (or roll back to the newer image)"
    )]
    NewerSchema { path: PathBuf, found: u32, supported: u32 },
    #[error("the peer's hostMeta names this node {found:?}, but this node is {expected:?}; refusing to copy it")]
    PeerMismatch { expected: String, found: String },
    #[error(
        "the peer's hostMeta belongs to cluster {found:?}, this node is in cluster {expected:?}; refusing to copy it"
    )]
    PeerForeign { found: String, expected: String },
    #[error("moving {from} aside to {to}: {source}")]
    MoveAside { from: PathBuf, to: PathBuf, source: io::Error },
    #[error("writing {path}: {source:#}")]
    Write { path: PathBuf, source: anyhow::Error },
}

/// Path of the record inside `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Read this node's record. `Ok(None)` when there is none yet (first boot).
/// Fails when the file is unreadable, corrupt, from a newer agent, or from
/// another cluster than `cluster`; the file is left as it is in every case.
pub fn load(dir: &Path, cluster: &str) -> Result<Option<HostMeta>, HostMetaError> {
    let path = path(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(HostMetaError::Read { path, source }),
    };
    let meta = parse(&path, &text)?;
    if meta.cluster != cluster {
        return Err(HostMetaError::Foreign { path, found: meta.cluster, expected: cluster.to_string() });
    }
    Ok(Some(meta))
}

/// Parse a record, checking its schema version before its shape so that a
/// newer agent's file is reported as such rather than as corrupt.
pub fn parse(path: &Path, text: &str) -> Result<HostMeta, HostMetaError> {
    let corrupt = |reason: String| HostMetaError::Corrupt { path: path.to_path_buf(), reason };
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
    let version = value
        .get("schema_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| corrupt("no numeric schema_version".to_string()))?;
    if version > u64::from(SCHEMA_VERSION) {
        return Err(HostMetaError::NewerSchema {
            path: path.to_path_buf(),
            found: u32::try_from(version).unwrap_or(u32::MAX),
            supported: SCHEMA_VERSION,
        });
    }
    serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))
}

/// Write the record atomically (temp file, fsync, rename, fsync directory).
pub fn store(dir: &Path, meta: &HostMeta) -> Result<(), HostMetaError> {
    let path = path(dir);
    let mut text = serde_json::to_string_pretty(meta)
        .map_err(|e| HostMetaError::Write { path: path.clone(), source: e.into() })?;
    text.push('\n');
    crate::fsutil::write_atomic(&path, text.as_bytes(), FILE_MODE)
        .map_err(|source| HostMetaError::Write { path, source })
}

/// Replace an unusable local record (corrupt, foreign or missing) with one
/// derived from the peer's copy. The peer must belong to `cluster` and name
/// this node `own_name`. Whatever file was there is kept as
/// `hostmeta.json.corrupt-<unix-ts>`; nothing is deleted. Returns the new record.
pub fn recover_from_peer(
    dir: &Path,
    cluster: &str,
    own_name: &str,
    peer_meta: &HostMeta,
) -> Result<HostMeta, HostMetaError> {
    if peer_meta.cluster != cluster {
        return Err(HostMetaError::PeerForeign { found: peer_meta.cluster.clone(), expected: cluster.to_string() });
    }
    let mut meta = HostMeta::derive_from_peer(peer_meta, own_name)?;
    let from = path(dir);
    if from.exists() {
        let to = aside_path(dir, unix_ms(SystemTime::now()) / 1000);
        std::fs::rename(&from, &to).map_err(|source| HostMetaError::MoveAside {
            from: from.clone(),
            to: to.clone(),
            source,
        })?;
        tracing::warn!(event = "hostmeta_recovered", kept = %to.display(), peer = %peer_meta.node.name,
            "replaced the unusable hostMeta with one derived from the peer's copy");
    }
    meta.touch();
    store(dir, &meta)?;
    Ok(meta)
}

/// `hostmeta.json.corrupt-<ts>`, with a numeric suffix if that name is taken.
fn aside_path(dir: &Path, ts: u64) -> PathBuf {
    let base = dir.join(format!("{FILE_NAME}.corrupt-{ts}"));
    if !base.exists() {
        return base;
    }
    (1..).map(|n| dir.join(format!("{FILE_NAME}.corrupt-{ts}.{n}"))).find(|p| !p.exists()).unwrap_or(base)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sample() -> HostMeta {
        let mut m =
            HostMeta::fresh("shop-17", ("a", [10, 0, 0, 1].into()), ("b", [10, 0, 0, 2].into()), [10, 0, 0, 9].into());
        m.node.role = Role::Leader;
        m.peer.role = Role::Follower;
        m.epoch = 4;
        m.timeline = Some(3);
        m.lsn = Some(Lsn(0x1_0000_00A0));
        m
    }

    #[test]
    fn a_restored_record_wins_over_a_peer_with_newer_data_and_a_higher_epoch() {
        use crate::election::{Claim, compare_claims};
        let mut mine = sample();
        (mine.node.role, mine.peer.role, mine.fenced) = (Role::Follower, Role::Leader, true);
        let mut peer = HostMeta::derive_from_peer(&mine, "b").unwrap();
        (peer.node.role, peer.epoch, peer.timeline, peer.lsn) = (Role::Leader, 9, Some(5), Some(Lsn(u64::MAX / 2)));
        let before = compare_claims(&Claim::of(&mine, "a"), &Claim::of(&peer, "a"));
        assert_eq!(before, std::cmp::Ordering::Less);

        let r = mine.restored();
        assert_eq!(
            (r.epoch, r.node.role, r.peer.role, r.fenced),
            (4 + RESTORE_EPOCH_STEP, Role::Leader, Role::Follower, false)
        );
        assert_eq!((r.timeline, r.lsn), (None, None), "the restored datastore reports its own position");
        assert_eq!(compare_claims(&Claim::of(&r, "a"), &Claim::of(&peer, "a")), std::cmp::Ordering::Greater);
    }

    #[test]
    fn lsn_round_trips_postgres_text() {
        for (text, value) in
            [("0/0", 0), ("0/16B3748", 0x16B3748), ("1/A0", 0x1_0000_00A0), ("FFFFFFFF/FFFFFFFF", u64::MAX)]
        {
            assert_eq!(text.parse::<Lsn>().unwrap(), Lsn(value), "{text}");
            assert_eq!(Lsn(value).to_string(), text);
        }
        assert_eq!("0/16b3748".parse::<Lsn>().unwrap(), Lsn(0x16B3748), "lower case is accepted");
        for bad in ["", "16B3748", "0/", "/1", "0/1/2", "G/1", "100000000/0", "-1/0", "0/ 1"] {
            let err = bad.parse::<Lsn>().unwrap_err();
            assert!(err.to_string().contains("X/Y"), "{bad}: {err}");
        }
        assert!(Lsn(0x1_0000_0000) > Lsn(0xFFFF_FFFF), "orders by the 64-bit value");
    }

    #[test]
    fn missing_file_is_first_boot() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), "shop-17").unwrap(), None);
    }

    #[test]
    fn store_then_load_round_trips_with_mode_0644() {
        let dir = tempfile::tempdir().unwrap();
        let meta = sample();
        store(dir.path(), &meta).unwrap();
        assert_eq!(load(dir.path(), "shop-17").unwrap(), Some(meta));
        let file = path(dir.path());
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o644);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("\"lsn\": \"1/A0\""), "LSN is stored in PostgreSQL's form: {text}");
        assert!(text.contains("\"schema_version\": 1"), "{text}");
    }

    #[test]
    fn corrupt_file_is_an_error_and_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let file = path(dir.path());
        for text in [
            "{\"schema_version\": 1, \"cluster\": ",
            "not json",
            "{\"cluster\": \"shop-17\"}",
            "{\"schema_version\": 1}",
        ] {
            std::fs::write(&file, text).unwrap();
            let err = load(dir.path(), "shop-17").unwrap_err();
            assert!(matches!(err, HostMetaError::Corrupt { .. }), "{text}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&file.display().to_string()) && msg.contains("corrupt"), "{msg}");
            assert_eq!(std::fs::read_to_string(&file).unwrap(), text, "the file must not be touched");
        }
    }

    #[test]
    fn parse_error_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "{\"schema_version\": 1,").unwrap();
        let msg = load(dir.path(), "shop-17").unwrap_err().to_string();
        assert!(msg.contains("EOF while parsing"), "the parser's reason is in the error: {msg}");
    }

    #[test]
    fn foreign_cluster_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path(), &sample()).unwrap();
        let err = load(dir.path(), "factory-2").unwrap_err();
        assert!(
            matches!(&err, HostMetaError::Foreign { found, expected, .. } if found == "shop-17" && expected == "factory-2")
        );
        assert!(err.to_string().contains("shop-17"));
    }

    #[test]
    fn newer_schema_is_an_error_even_when_the_shape_changed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "{\"schema_version\": 2, \"something\": \"new\"}").unwrap();
        let err = load(dir.path(), "shop-17").unwrap_err();
        assert!(matches!(err, HostMetaError::NewerSchema { found: 2, supported: 1, .. }), "{err:?}");
        assert!(err.to_string().contains("Upgrade the agent"));
    }

    fn peer_copy() -> HostMeta {
        let mut m =
            HostMeta::fresh("shop-17", ("b", [10, 0, 0, 2].into()), ("a", [10, 0, 0, 1].into()), [10, 0, 0, 9].into());
        m.node.role = Role::Leader;
        m.peer.role = Role::Follower;
        m.epoch = 7;
        m.timeline = Some(5);
        m.lsn = Some(Lsn(42));
        m
    }

    #[test]
    fn recover_from_peer_keeps_the_corrupt_file_and_swaps_members() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "garbage").unwrap();
        let meta = recover_from_peer(dir.path(), "shop-17", "a", &peer_copy()).unwrap();
        assert_eq!((meta.node.name.as_str(), meta.node.role), ("a", Role::Follower));
        assert_eq!((meta.peer.name.as_str(), meta.peer.role), ("b", Role::Leader));
        assert_eq!(meta.epoch, 7);
        assert_eq!((meta.timeline, meta.lsn), (None, None), "the peer's position is not ours");
        assert_eq!(load(dir.path(), "shop-17").unwrap(), Some(meta));
        let kept: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("hostmeta.json.corrupt-"))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(std::fs::read_to_string(dir.path().join(&kept[0])).unwrap(), "garbage");
    }

    #[test]
    fn recover_twice_in_one_second_keeps_both_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "one").unwrap();
        recover_from_peer(dir.path(), "shop-17", "a", &peer_copy()).unwrap();
        std::fs::write(path(dir.path()), "two").unwrap();
        recover_from_peer(dir.path(), "shop-17", "a", &peer_copy()).unwrap();
        let kept = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".corrupt-"))
            .count();
        assert_eq!(kept, 2);
    }

    #[test]
    fn recover_without_local_file_writes_one() {
        let dir = tempfile::tempdir().unwrap();
        let meta = recover_from_peer(dir.path(), "shop-17", "a", &peer_copy()).unwrap();
        assert_eq!(load(dir.path(), "shop-17").unwrap(), Some(meta));
    }

    #[test]
    fn recover_refuses_a_foreign_or_mismatched_peer_and_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "garbage").unwrap();
        let mut foreign = peer_copy();
        foreign.cluster = "factory-2".into();
        assert!(matches!(
            recover_from_peer(dir.path(), "shop-17", "a", &foreign),
            Err(HostMetaError::PeerForeign { .. })
        ));
        assert!(matches!(
            recover_from_peer(dir.path(), "shop-17", "c", &peer_copy()),
            Err(HostMetaError::PeerMismatch { .. })
        ));
        assert_eq!(std::fs::read_to_string(path(dir.path())).unwrap(), "garbage");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
