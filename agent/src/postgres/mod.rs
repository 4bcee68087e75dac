//! PostgreSQL on a node: configuration, bootstrap, streaming or logical
//! replication, promotion, durability and rejoin after a failover.
//!
//! The agent's role state machine decides (including durability: whether
//! commits wait for the follower); [`Manager`] carries out. The
//! pieces:
//! - [`settings`]: what the manager needs, built from cloud-config;
//! - [`render`]: pure rendering of the configuration files and SQL quoting;
//! - [`files`]: writing the rendered files into a data directory;
//! - [`archive`]: timestamped tarballs of a data directory before anything is discarded;
//! - [`status`]: role, timeline, LSN, replication lag;
//! - the [`Manager`] operations in `server`, `lifecycle` and `logical`; the
//!   server runs as a service of the node's [`crate::services::Services`].

pub mod archive;
pub mod files;
mod leader;
mod lifecycle;
mod logical;
pub mod render;
mod server;
pub mod settings;
pub mod status;

use std::path::PathBuf;
use std::time::Duration;

use crate::cmd::CmdError;

pub use render::ServerRole;
pub use server::{Manager, Session, StopMode, is_running};
pub use settings::{Endpoint, Settings};
pub use status::{
    ControlPosition, HOT_STANDBY_SETTINGS, PgRole, PgStatus, ReceiverStatus, ReplicaStatus, SubscriptionStatus,
};

/// How a rejoin ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejoin {
    /// A cleanly shut-down old primary whose WAL ends where the new
    /// primary's timeline forks off: started as its standby, no `pg_rewind`.
    Followed,
    /// `pg_rewind` brought the data directory onto the new primary's timeline.
    Rewound { archive: Option<PathBuf> },
    /// `pg_rewind` was impossible (or the mode is logical): the old data
    /// directory was archived and replaced by a fresh copy of the primary.
    /// `archive` is `None` only when the data directory was empty.
    Recloned { archive: Option<PathBuf>, rewind_error: Option<String> },
}

impl Rejoin {
    /// The tarball holding the data directory as it was before the rejoin.
    pub fn archive(&self) -> Option<&PathBuf> {
        match self {
            Rejoin::Followed => None,
            Rejoin::Rewound { archive } => archive.as_ref(),
            Rejoin::Recloned { archive, .. } => archive.as_ref(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "the replication slot {slot} stays in use: a node keeps streaming from it (is the replaced node still running?)"
    )]
    SlotBusy { slot: String },
    #[error("OS user `{user}` for PostgreSQL does not exist; install the postgresql package or set the user")]
    NoUser { user: String },
    #[error("looking up OS user `{user}`: {source}")]
    UserLookup {
        user: String,
        #[source]
        source: nix::Error,
    },
    #[error("{action}: {source}")]
    Tool {
        action: String,
        #[source]
        source: CmdError,
    },
    #[error("{action} ({path}): {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} ({path}): {source}")]
    Os {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("connecting to PostgreSQL ({target}): {}", describe(source))]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{what} on {target}: {}", describe(source))]
    Sql {
        what: String,
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("reading `{key}` for PostgreSQL's TLS: {source}; give inline PEM or the path of a readable PEM file")]
    TlsMaterial {
        key: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS for the session with {target}: {detail}")]
    TlsConfig { target: String, detail: String },
    #[error("archiving {data_dir} to {archive}: {source}; nothing was removed")]
    Archive {
        data_dir: PathBuf,
        archive: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} on {target} did not finish within {timeout:?}")]
    Timeout { what: String, target: String, timeout: Duration },
    #[error("{what}: {detail}")]
    Unexpected { what: String, detail: String },
    #[error("{action}: {source}")]
    Service {
        action: String,
        #[source]
        source: crate::services::ServiceError,
    },
}

pub type Result<T, E = PgError> = std::result::Result<T, E>;

/// A client error with the server's message, detail and hint (the
/// client's own `Display` says only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            text
        }
    }
}
