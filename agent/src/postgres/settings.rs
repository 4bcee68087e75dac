//! What the PostgreSQL manager needs to know: the cloud-config's
//! `postgres:` block, this node and its peer, plus runtime paths.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{Durability, GeminiConfig, Replication, Tls};

/// Default directory of the PostgreSQL 15 binaries on Debian.
pub const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// How far the Kine sequence is advanced on every promotion: past any
/// revision the old primary handed out without this node seeing it (commits
/// whose wait for the standby a client cancelled while writes stalled). The
/// skipped ids are filled with Kine's gap records in one statement.
pub const DEFAULT_SEQUENCE_MARGIN: i64 = 1000;

/// File names in [`Settings::tls_dir`]. The node's certificate serves the
/// server and, as a client certificate, the connections to the peer's.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "node.crt";
pub const KEY_FILE: &str = "node.key";

/// A cluster member as PostgreSQL sees it: its name (the replication
/// `application_name`), and the address its server listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub ip: IpAddr,
    pub port: u16,
}

/// Everything the manager needs. Built with [`Settings::from_config`];
/// the fields are public so tests and the lab can adjust paths and ports.
/// `Debug` leaves the passwords and the key out.
#[derive(Clone)]
pub struct Settings {
    /// Directory holding `initdb`, `pg_basebackup`, `pg_rewind`, `postgres`.
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    /// Where the process supervisor appends the server's output (outside the
    /// data directory so base backups do not copy it); under systemd the
    /// output goes to the journal.
    pub log_file: PathBuf,
    /// The server's Unix socket directory. Each node needs its own: two
    /// nodes in two network namespaces share the filesystem and both listen
    /// on the same port, so a shared directory would collide on the lock file.
    pub socket_dir: PathBuf,
    /// `listen_addresses`. `*` by default: the VIP arrives after the server
    /// starts, and `pg_hba.conf` decides who may connect.
    pub listen_addresses: Vec<String>,
    /// OS user owning the data directory and running the server (PostgreSQL refuses root).
    pub os_user: String,
    /// This node; `port` is the port this server listens on.
    pub node: Endpoint,
    /// The peer's server (the replication source when this node follows).
    pub peer: Endpoint,
    pub vip: IpAddr,
    pub replication: Replication,
    pub durability: Durability,
    pub degrade_after: Duration,
    pub replication_password: String,
    pub kine_password: String,
    /// The cluster CA, this node's certificate and its key (inline PEM or
    /// file paths, as in the cloud-config's `tls:` block): the server's TLS
    /// identity, and what the peer's server is verified against. Copied
    /// into [`Settings::tls_dir`] for the server and the tools.
    pub tls: Tls,
    /// See [`DEFAULT_SEQUENCE_MARGIN`].
    pub sequence_margin: i64,
    /// Archive the data directory before `pg_rewind` too (pg_rewind discards
    /// the diverged tail; the archive keeps it).
    pub archive_before_rewind: bool,
    /// How many archives of the data directory are kept (the newest).
    pub archive_keep: usize,
    /// `max_slot_wal_keep_size` in MiB: a slot whose node is gone for good
    /// must not fill the disk.
    pub max_slot_wal_keep_mb: u64,
    /// Limit for starting (until it accepts connections), stopping and `pg_promote`.
    pub start_timeout: Duration,
    /// Limit for `initdb`, `pg_basebackup` and `pg_rewind`.
    pub tool_timeout: Duration,
    /// Continuous WAL archiving into a local spool (`None`: off).
    pub wal_archive: Option<WalArchive>,
}

/// PostgreSQL's `archive_command` copies each finished WAL file into a
/// spool with `gemin_k8s backup wal-spool` (see `backup::wal`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalArchive {
    /// The `gemin_k8s` binary the command runs.
    pub program: PathBuf,
    /// The spool directory (writable by the server's OS user).
    pub spool: PathBuf,
    /// Bytes the spool may hold; past it files are dropped and a gap recorded.
    pub spool_limit: u64,
    /// `archive_timeout`: a WAL file is finished (and archived) at least this often.
    pub timeout: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const HIDDEN: &str = "<hidden>";
        f.debug_struct("Settings")
            .field("bin_dir", &self.bin_dir)
            .field("data_dir", &self.data_dir)
            .field("log_file", &self.log_file)
            .field("socket_dir", &self.socket_dir)
            .field("listen_addresses", &self.listen_addresses)
            .field("os_user", &self.os_user)
            .field("node", &self.node)
            .field("peer", &self.peer)
            .field("vip", &self.vip)
            .field("replication", &self.replication)
            .field("durability", &self.durability)
            .field("degrade_after", &self.degrade_after)
            .field("replication_password", &HIDDEN)
            .field("kine_password", &HIDDEN)
            .field("tls", &HIDDEN)
            .field("sequence_margin", &self.sequence_margin)
            .field("archive_before_rewind", &self.archive_before_rewind)
            .field("archive_keep", &self.archive_keep)
            .field("max_slot_wal_keep_mb", &self.max_slot_wal_keep_mb)
            .field("start_timeout", &self.start_timeout)
            .field("tool_timeout", &self.tool_timeout)
            .field("wal_archive", &self.wal_archive)
            .finish()
    }
}

impl Settings {
    /// Settings for this node from cloud-config. Both servers listen on
    /// `postgres.port`; change `peer.port` when they share an address.
    pub fn from_config(cfg: &GeminiConfig) -> Settings {
        let pg = &cfg.postgres;
        let data_dir = pg.data_dir.clone();
        let mut log_file = data_dir.clone().into_os_string();
        log_file.push(".log");
        Settings {
            bin_dir: PathBuf::from(DEFAULT_BIN_DIR),
            log_file: PathBuf::from(log_file),
            socket_dir: PathBuf::from(format!("/run/geminik8s/postgres-{}", cfg.node.name)),
            data_dir,
            listen_addresses: vec!["*".to_string()],
            os_user: "postgres".to_string(),
            node: Endpoint { name: cfg.node.name.clone(), ip: cfg.node.ip, port: pg.port },
            peer: Endpoint { name: cfg.peer.name.clone(), ip: cfg.peer.ip, port: pg.port },
            vip: cfg.cluster.vip,
            replication: pg.replication,
            durability: pg.durability,
            degrade_after: pg.degrade_after,
            replication_password: pg.replication_password.clone(),
            kine_password: pg.kine_password.clone(),
            tls: cfg.tls.clone(),
            sequence_margin: DEFAULT_SEQUENCE_MARGIN,
            archive_before_rewind: true,
            archive_keep: pg.archive_keep as usize,
            max_slot_wal_keep_mb: 4096,
            start_timeout: Duration::from_secs(60),
            tool_timeout: Duration::from_secs(30 * 60),
            wal_archive: cfg.backup.archiving().then(|| WalArchive {
                program: std::env::current_exe()
                    .unwrap_or_else(|_| PathBuf::from(crate::services::units::AGENT_ARGV[0])),
                spool: cfg.backup.spool_dir.clone(),
                spool_limit: cfg.backup.spool_limit_mb << 20,
                timeout: cfg.backup.archive_timeout,
            }),
        }
    }

    /// Where the server's certificate, key and the cluster CA are copied,
    /// owned by the OS user (mode 0700; the server refuses a key others can
    /// read): a directory of the socket directory, outside the data
    /// directory so base backups and archives never carry the key.
    pub fn tls_dir(&self) -> PathBuf {
        self.socket_dir.join("tls")
    }

    /// The cluster CA in [`Settings::tls_dir`] (`ssl_ca_file`, `sslrootcert=`).
    pub fn ca_file(&self) -> PathBuf {
        self.tls_dir().join(CA_FILE)
    }

    /// Path of a PostgreSQL binary.
    pub fn tool(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_config_takes_the_postgres_block_and_both_members() {
        let cfg: GeminiConfig = serde_json::from_value(serde_json::json!({
            "cluster": { "name": "shop", "vip": "10.0.0.10", "bootstrap_leader": "node-a" },
            "node": { "name": "node-a", "ip": "10.0.0.1" },
            "peer": { "name": "node-b", "ip": "10.0.0.2" },
            "api": { "token": "t" },
            "postgres": {
                "replication": "logical", "durability": "async", "degrade_after": "5s", "port": 6543,
                "data_dir": "/var/lib/postgresql/15/main",
                "replication_password": "r", "kine_password": "k"
            },
            "k3s": { "token": "t" },
            "tls": { "ca": "ca.pem", "cert": "cert.pem", "key": "key.pem" }
        }))
        .unwrap();
        let s = Settings::from_config(&cfg);
        assert_eq!(s.node, Endpoint { name: "node-a".into(), ip: "10.0.0.1".parse().unwrap(), port: 6543 });
        assert_eq!(s.peer, Endpoint { name: "node-b".into(), ip: "10.0.0.2".parse().unwrap(), port: 6543 });
        assert_eq!(s.vip, "10.0.0.10".parse::<IpAddr>().unwrap());
        assert_eq!(
            (s.replication, s.durability, s.degrade_after),
            (Replication::Logical, Durability::Async, Duration::from_secs(5))
        );
        assert_eq!((s.replication_password.as_str(), s.kine_password.as_str()), ("r", "k"));
        assert_eq!(s.log_file, PathBuf::from("/var/lib/postgresql/15/main.log"));
        assert_eq!(s.socket_dir, PathBuf::from("/run/geminik8s/postgres-node-a"), "each node its own socket directory");
        assert_eq!(s.os_user, "postgres");
        assert_eq!(s.tool("pg_rewind"), PathBuf::from("/usr/lib/postgresql/15/bin/pg_rewind"));
    }
}
