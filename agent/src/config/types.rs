//! Typed view of the `geminik8s:` block. Keys and defaults mirror
//! `schema::KEYS`; a test keeps the two in step.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeminiConfig {
    pub cluster: Cluster,
    pub node: Member,
    pub peer: Member,
    pub api: Api,
    #[serde(default)]
    pub postgres: Postgres,
    #[serde(default)]
    pub kine: Kine,
    pub k3s: K3s,
    #[serde(default)]
    pub health: Health,
    pub tls: Tls,
    #[serde(default)]
    pub backup: Backup,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    pub vip: IpAddr,
    #[serde(default = "defaults::vip_prefix")]
    pub vip_prefix: u8,
    #[serde(default)]
    pub interface: Option<String>,
    pub bootstrap_leader: String,
    #[serde(default)]
    pub witness: Witness,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WitnessMode {
    #[default]
    None,
    Gateway,
    Arbiter,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Witness {
    #[serde(default)]
    pub mode: WitnessMode,
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default = "defaults::lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    #[serde(default = "defaults::lease_renew", with = "humantime_serde")]
    pub lease_renew: Duration,
}

impl Default for Witness {
    fn default() -> Self {
        Witness {
            mode: WitnessMode::None,
            targets: Vec::new(),
            lease_ttl: defaults::lease_ttl(),
            lease_renew: defaults::lease_renew(),
        }
    }
}

/// A cluster member: this node (`node:`) or the peer (`peer:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub name: String,
    pub ip: IpAddr,
    #[serde(default = "defaults::api_port")]
    pub api_port: u16,
}

impl Member {
    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.api_port)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Api {
    pub token: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Replication {
    #[default]
    Streaming,
    Logical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    #[default]
    Synchronous,
    Async,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postgres {
    #[serde(default)]
    pub replication: Replication,
    #[serde(default)]
    pub durability: Durability,
    #[serde(default = "defaults::degrade_after", with = "humantime_serde")]
    pub degrade_after: Duration,
    #[serde(default = "defaults::pg_port")]
    pub port: u16,
    #[serde(default = "defaults::data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub replication_password: String,
    #[serde(default)]
    pub kine_password: String,
    #[serde(default = "defaults::archive_keep")]
    pub archive_keep: u32,
}

impl Default for Postgres {
    fn default() -> Self {
        Postgres {
            replication: Replication::default(),
            durability: Durability::default(),
            degrade_after: defaults::degrade_after(),
            port: defaults::pg_port(),
            data_dir: defaults::data_dir(),
            replication_password: String::new(),
            kine_password: String::new(),
            archive_keep: defaults::archive_keep(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kine {
    #[serde(default = "defaults::kine_listen")]
    pub listen: SocketAddr,
    #[serde(default = "defaults::compaction", with = "humantime_serde")]
    pub compaction_interval: Duration,
}

impl Default for Kine {
    fn default() -> Self {
        Kine { listen: defaults::kine_listen(), compaction_interval: defaults::compaction() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K3s {
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// K3s's state (`--data-dir`); its server certificates are in `server/tls` below it.
    #[serde(default = "defaults::k3s_data_dir")]
    pub data_dir: PathBuf,
    /// Where K3s writes its kubeconfig (`k3s.yaml`) and the agent the one for the VIP.
    #[serde(default = "defaults::k3s_config_dir")]
    pub config_dir: PathBuf,
    pub token: String,
}

impl K3s {
    /// K3s enabled with `token` and every other setting at its default.
    pub fn with_token(token: impl Into<String>) -> Self {
        K3s {
            enabled: true,
            extra_args: Vec::new(),
            data_dir: defaults::k3s_data_dir(),
            config_dir: defaults::k3s_config_dir(),
            token: token.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default = "defaults::interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "defaults::failure_threshold")]
    pub failure_threshold: u32,
    #[serde(default = "defaults::fence_timeout", with = "humantime_serde")]
    pub fence_timeout: Duration,
    #[serde(default)]
    pub checks: Checks,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            interval: defaults::interval(),
            failure_threshold: defaults::failure_threshold(),
            fence_timeout: defaults::fence_timeout(),
            checks: Checks::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    #[serde(default = "defaults::yes")]
    pub network: bool,
    #[serde(default = "defaults::yes")]
    pub kubernetes_api: bool,
    #[serde(default = "defaults::yes")]
    pub postgres: bool,
    #[serde(default)]
    pub script: Option<PathBuf>,
    #[serde(default = "defaults::script_timeout", with = "humantime_serde")]
    pub script_timeout: Duration,
}

impl Default for Checks {
    fn default() -> Self {
        Checks {
            network: true,
            kubernetes_api: true,
            postgres: true,
            script: None,
            script_timeout: defaults::script_timeout(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub ca: String,
    pub cert: String,
    pub key: String,
    /// Revoked certificates (a CRL signed by the CA), when any.
    #[serde(default)]
    pub crl: Option<String>,
}

impl Tls {
    /// The PEM text of `value`: inline PEM as is, otherwise the file it names.
    pub fn resolve(value: &str) -> std::io::Result<String> {
        if is_inline_pem(value) { Ok(value.to_string()) } else { std::fs::read_to_string(value) }
    }
}

pub fn is_inline_pem(value: &str) -> bool {
    value.trim_start().starts_with("-----BEGIN ")
}

/// Continuous WAL archiving (docs/backup.md). Off while `destination` is absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// A directory or `s3://BUCKET/PREFIX`.
    #[serde(default)]
    pub destination: Option<String>,
    /// age recipients (`age1...`), files of recipients, or `passphrase:FILE`.
    #[serde(default)]
    pub encryption_keys: Vec<String>,
    #[serde(default)]
    pub no_encryption: bool,
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    #[serde(default)]
    pub s3_region: Option<String>,
    #[serde(default)]
    pub s3_credentials: Option<PathBuf>,
    #[serde(default = "defaults::yes")]
    pub archive_wal: bool,
    #[serde(default = "defaults::spool_dir")]
    pub spool_dir: PathBuf,
    #[serde(default = "defaults::spool_limit_mb")]
    pub spool_limit_mb: u64,
    #[serde(default = "defaults::archive_timeout", with = "humantime_serde")]
    pub archive_timeout: Duration,
    /// When full backups run (cron, UTC), or `off`.
    #[serde(default = "defaults::backup_schedule")]
    pub schedule: String,
    /// How many scheduled full backups are kept.
    #[serde(default = "defaults::backup_retention")]
    pub retention: u32,
}

impl Default for Backup {
    fn default() -> Self {
        Backup {
            destination: None,
            encryption_keys: Vec::new(),
            no_encryption: false,
            s3_endpoint: None,
            s3_region: None,
            s3_credentials: None,
            archive_wal: true,
            spool_dir: defaults::spool_dir(),
            spool_limit_mb: defaults::spool_limit_mb(),
            archive_timeout: defaults::archive_timeout(),
            schedule: defaults::backup_schedule(),
            retention: defaults::backup_retention(),
        }
    }
}

impl Backup {
    /// Whether the agent archives WAL.
    pub fn archiving(&self) -> bool {
        self.archive_wal && self.destination.is_some()
    }

    /// The schedule of full backups, when there is a destination and a schedule.
    pub fn schedule(&self) -> Option<Result<croner::Cron, String>> {
        if self.destination.is_none() || self.schedule.trim() == "off" {
            return None;
        }
        Some(self.schedule.parse::<croner::Cron>().map_err(|e| format!("{e}")))
    }
}

pub(crate) mod defaults {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    pub fn vip_prefix() -> u8 {
        24
    }
    pub fn lease_ttl() -> Duration {
        Duration::from_secs(3)
    }
    pub fn lease_renew() -> Duration {
        Duration::from_secs(1)
    }
    pub fn api_port() -> u16 {
        7443
    }
    pub fn degrade_after() -> Duration {
        Duration::from_secs(10)
    }
    pub fn pg_port() -> u16 {
        5432
    }
    pub fn data_dir() -> PathBuf {
        PathBuf::from("/var/lib/postgresql/15/main")
    }
    pub fn k3s_data_dir() -> PathBuf {
        PathBuf::from("/var/lib/rancher/k3s")
    }
    pub fn k3s_config_dir() -> PathBuf {
        PathBuf::from("/etc/rancher/k3s")
    }
    pub fn archive_keep() -> u32 {
        3
    }
    pub fn kine_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 2379))
    }
    pub fn compaction() -> Duration {
        Duration::from_secs(300)
    }
    pub fn yes() -> bool {
        true
    }
    pub fn spool_dir() -> PathBuf {
        PathBuf::from(crate::backup::wal::DEFAULT_SPOOL)
    }
    pub fn spool_limit_mb() -> u64 {
        crate::backup::wal::DEFAULT_SPOOL_LIMIT >> 20
    }
    pub fn archive_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn backup_schedule() -> String {
        "0 */12 * * *".into()
    }
    pub fn backup_retention() -> u32 {
        5
    }
    pub fn interval() -> Duration {
        Duration::from_millis(500)
    }
    pub fn failure_threshold() -> u32 {
        3
    }
    pub fn fence_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn script_timeout() -> Duration {
        Duration::from_secs(5)
    }
}

/// `humantime` (de)serialisation for `Duration` fields.
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}
