//! The manifest: what a backup holds, written last, as `manifest.json`.
//!
//! It is plain JSON so that `backup list` works without a key: it carries
//! checksums, LSNs and the recipients' public keys, never a secret. Its
//! `version` is the schema version; an agent refuses a manifest newer than
//! it knows.

use serde::{Deserialize, Serialize};

/// The schema version this agent writes and the newest it reads. Version 2
/// added the node bundle, an object that is not a tar.
pub const MANIFEST_VERSION: u32 = 2;

/// The `content` of a base backup's object: PostgreSQL's files as a tar.
pub const TAR: &str = "tar";

/// The manifest's object name in a backup.
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// UTC timestamp of the start: `20260821T101502Z` (see [`super::backup_id`]).
    pub id: String,
    /// `full` (incremental backups are not built yet).
    pub kind: String,
    pub cluster: String,
    pub node: String,
    pub agent_version: String,
    pub postgres: PostgresInfo,
    /// RFC 3339 UTC.
    pub start_time: String,
    pub stop_time: String,
    pub compression: Compression,
    pub encryption: Encryption,
    pub objects: Vec<Object>,
    /// The last successful `backup verify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<Verified>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostgresInfo {
    /// Major version (`15`); a backup restores only with the same major.
    pub major: u32,
    /// `server_version` as the server reported it.
    pub server_version: String,
    /// The cluster's system identifier (a string: it does not fit a JSON double).
    pub system_identifier: String,
    /// Timeline the backup ends on.
    pub timeline: u32,
    /// WAL range a restore replays to be consistent (`0/2000028`).
    pub start_lsn: String,
    pub stop_lsn: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Compression {
    None,
    Zstd { level: i32 },
}

impl Compression {
    /// The suffix of stored objects: `.zst` or nothing.
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Zstd { .. } => ".zst",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd { level } => write!(f, "zstd level {level}"),
        }
    }
}

/// How the objects are encrypted; public information only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    pub kind: EncryptionKind,
    /// age X25519 recipients (`age1...`) the objects are encrypted to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EncryptionKind {
    None,
    /// age to X25519 recipients: the node holds only public keys.
    AgeX25519,
    /// age with a passphrase (scrypt).
    AgePassphrase,
}

impl EncryptionKind {
    /// The suffix of stored objects: `.age` or nothing.
    pub fn suffix(self) -> &'static str {
        match self {
            EncryptionKind::None => "",
            EncryptionKind::AgeX25519 | EncryptionKind::AgePassphrase => ".age",
        }
    }
}

impl std::fmt::Display for EncryptionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EncryptionKind::None => "none",
            EncryptionKind::AgeX25519 => "age-x25519",
            EncryptionKind::AgePassphrase => "age-passphrase",
        })
    }
}

/// One stored object: its size and checksum as stored (what `verify`
/// checks without a key), and of its content once decrypted and
/// decompressed (what `verify --identity` and `restore` check).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// What the object holds: `tar` (PostgreSQL's base backup with its WAL) or
    /// `cloud-config` (the node bundle, [`super::node`]).
    pub content: String,
    pub content_size: u64,
    pub content_sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyLevel {
    /// Stored checksums only (no key).
    Checksums,
    /// Decrypted and decompressed end to end.
    Full,
}

impl std::fmt::Display for VerifyLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VerifyLevel::Checksums => "checksums",
            VerifyLevel::Full => "full",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// RFC 3339 UTC.
    pub at: String,
    pub level: VerifyLevel,
}

impl Manifest {
    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a manifest always serialises");
        bytes.push(b'\n');
        bytes
    }

    /// Parse and check a manifest: a known schema version, the id it is
    /// stored under, object names that stay inside the backup.
    pub fn parse(bytes: &[u8], expected_id: &str) -> Result<Manifest, String> {
        let probe: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let version = probe.get("version").and_then(serde_json::Value::as_u64);
        match version {
            Some(v) if v > u64::from(MANIFEST_VERSION) => {
                return Err(format!(
                    "manifest version {v} is newer than this gemin_k8s reads ({MANIFEST_VERSION}); use a newer gemin_k8s"
                ));
            }
            Some(_) => {}
            None => return Err("no `version` field: not a geminik8s backup manifest".into()),
        }
        let m: Manifest = serde_json::from_value(probe).map_err(|e| format!("invalid manifest: {e}"))?;
        if m.id != expected_id {
            return Err(format!("it names backup {} but is stored as {expected_id}", m.id));
        }
        if m.objects.is_empty() {
            return Err("it lists no objects".into());
        }
        for o in &m.objects {
            if !is_plain_name(&o.name) || o.name == MANIFEST_FILE {
                return Err(format!("object name {:?} is not a plain file name", o.name));
            }
        }
        Ok(m)
    }

    /// Size of all stored objects.
    pub fn stored_size(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }

    /// When the backup started, for ordering and retention.
    pub fn start(&self) -> Option<std::time::SystemTime> {
        humantime::parse_rfc3339(&self.start_time).ok()
    }
}

/// A name without directories, `.` or `..`, usable as a file name.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(id: &str, start_time: &str) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            id: id.into(),
            kind: "full".into(),
            cluster: "shop".into(),
            node: "node-a".into(),
            agent_version: "0.1.0".into(),
            postgres: PostgresInfo {
                major: 15,
                server_version: "15.14".into(),
                system_identifier: "7412345678901234567".into(),
                timeline: 1,
                start_lsn: "0/2000028".into(),
                stop_lsn: "0/2000138".into(),
            },
            start_time: start_time.into(),
            stop_time: start_time.into(),
            compression: Compression::Zstd { level: 3 },
            encryption: Encryption {
                kind: EncryptionKind::AgeX25519,
                recipients: vec!["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p".into()],
            },
            objects: vec![Object {
                name: "base.tar.zst.age".into(),
                size: 10,
                sha256: "ab".repeat(32),
                content: "tar".into(),
                content_size: 100,
                content_sha256: "cd".repeat(32),
            }],
            verified: None,
        }
    }

    #[test]
    fn round_trips_and_keeps_the_system_identifier_exact() {
        let m = sample("20260821T101502Z", "2026-08-21T10:15:02Z");
        let json = m.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains("\"system_identifier\": \"7412345678901234567\""), "{text}");
        assert!(text.contains("\"kind\": \"age-x25519\""), "{text}");
        assert!(!text.contains("verified"), "never verified: no field\n{text}");
        assert_eq!(Manifest::parse(&json, "20260821T101502Z").unwrap(), m);
    }

    #[test]
    fn refuses_newer_versions_foreign_files_and_escaping_names() {
        let m = sample("20260821T101502Z", "2026-08-21T10:15:02Z");
        let mut newer = serde_json::to_value(&m).unwrap();
        newer["version"] = (MANIFEST_VERSION + 1).into();
        let err = Manifest::parse(&serde_json::to_vec(&newer).unwrap(), &m.id).unwrap_err();
        assert!(err.contains("newer than this gemin_k8s reads"), "{err}");

        let err = Manifest::parse(b"{\"hello\": 1}", &m.id).unwrap_err();
        assert!(err.contains("not a geminik8s backup manifest"), "{err}");

        let err = Manifest::parse(&m.to_json(), "20990101T000000Z").unwrap_err();
        assert!(err.contains("stored as 20990101T000000Z"), "{err}");

        let mut escaping = m.clone();
        escaping.objects[0].name = "../../etc/passwd".into();
        let err = Manifest::parse(&escaping.to_json(), &m.id).unwrap_err();
        assert!(err.contains("not a plain file name"), "{err}");
    }

    #[test]
    fn verified_is_recorded_and_read_back() {
        let mut m = sample("20260821T101502Z", "2026-08-21T10:15:02Z");
        m.verified = Some(Verified { at: "2026-08-22T00:00:00Z".into(), level: VerifyLevel::Full });
        let back = Manifest::parse(&m.to_json(), &m.id).unwrap();
        assert_eq!(back.verified.unwrap().level, VerifyLevel::Full);
        assert_eq!(m.stored_size(), 10);
        assert!(m.start().is_some());
    }
}
