//! What a follower does on the leader before (re)joining it: ask for a
//! checkpoint before `pg_rewind`, and free its slot there, which a stale
//! session of its previous incarnation may still hold.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::render::{self, KINE_DB, KINE_ROLE, REPLICATION_ROLE};
use super::server::{Manager, open_tls_session};
use super::{PgError, Result};

/// How long a stale session may take to let go of the slot.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(15);

impl Manager {
    /// A session with the leader (the peer) as the replication role, over
    /// TLS verified against the cluster CA, with this node's certificate.
    /// Returns the client and a description of it for errors.
    pub(super) async fn connect_leader(&self, dbname: &str) -> Result<(Client, String)> {
        let s = &self.settings;
        let target = format!("{}:{} database {dbname} as {REPLICATION_ROLE}", s.peer.ip, s.peer.port);
        let mut config = tokio_postgres::Config::new();
        config
            .host(s.peer.ip.to_string())
            .port(s.peer.port)
            .user(REPLICATION_ROLE)
            .password(s.replication_password.as_bytes())
            .dbname(dbname);
        let client = open_tls_session(config, &target, &s.tls).await?;
        Ok((client, target))
    }

    /// One write through `host` (the VIP) as Kine writes: a transaction
    /// that takes a transaction id commits a WAL record, and its commit
    /// waits for the synchronous standby when commits wait for one. Kine's
    /// data is not touched. Returns how long the commit took.
    pub async fn probe_write(&self, host: std::net::IpAddr) -> Result<Duration> {
        let s = &self.settings;
        let target = format!("{host}:{} database {KINE_DB} as {KINE_ROLE}", s.node.port);
        let mut config = tokio_postgres::Config::new();
        config
            .host(host.to_string())
            .port(s.node.port)
            .user(KINE_ROLE)
            .password(s.kine_password.as_bytes())
            .dbname(KINE_DB)
            .connect_timeout(Duration::from_secs(3));
        let client = open_tls_session(config, &target, &s.tls).await?;
        let started = Instant::now();
        client.batch_execute("BEGIN; SELECT pg_current_xact_id(); COMMIT").await.map_err(|source| PgError::Sql {
            what: "a probe write".into(),
            target,
            source,
        })?;
        Ok(started.elapsed())
    }

    /// Make the leader write a checkpoint, so its control file shows the
    /// timeline it was promoted to: `pg_rewind` reads the timeline from
    /// there, and right after a promotion it may still show the old one
    /// ("no rewind required", and the rewound node cannot follow).
    pub(super) async fn checkpoint_leader(&self) -> Result<()> {
        let (client, target) = self.connect_leader("postgres").await?;
        client.batch_execute("CHECKPOINT").await.map_err(|source| PgError::Sql {
            what: "CHECKPOINT".into(),
            target,
            source,
        })
    }

    /// Make this node's slot on the leader free: end a leftover walsender
    /// still holding it (the replication role may end its own sessions), and
    /// with `drop` remove the slot so a new subscription can create it. Used
    /// when this node re-initialises; `dbname` must be one `pg_hba.conf` lets
    /// the replication role into.
    pub(super) async fn release_slot_on_leader(&self, dbname: &str, drop: bool) -> Result<()> {
        let s = &self.settings;
        let (client, target) = self.connect_leader(dbname).await?;
        let slot = render::slot_name(&s.node.name);
        let sql_err = |what: &str| {
            let (what, target) = (format!("{what} {slot}"), target.clone());
            move |source| PgError::Sql { what, target, source }
        };
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        loop {
            let row = client
                .query_opt("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
                .await
                .map_err(sql_err("looking up replication slot"))?;
            let Some(row) = row else { return Ok(()) };
            let active_pid: Option<i32> = row.get(0);
            match active_pid {
                None => break,
                Some(pid) if Instant::now() < deadline => {
                    tracing::info!(slot = %slot, pid, leader = %s.peer.ip, "ending a stale session holding this node's slot on the leader");
                    client
                        .execute("SELECT pg_terminate_backend($1)", &[&pid])
                        .await
                        .map_err(sql_err("ending the stale session on replication slot"))?;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Some(pid) => {
                    return Err(PgError::Timeout {
                        what: format!("releasing replication slot {slot} (held by pid {pid})"),
                        target,
                        timeout: RELEASE_TIMEOUT,
                    });
                }
            }
        }
        if drop {
            client
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE slot_name = $1 AND NOT active",
                    &[&slot],
                )
                .await
                .map_err(sql_err("dropping replication slot"))?;
            tracing::info!(slot = %slot, leader = %s.peer.ip, "dropped this node's old slot on the leader");
        }
        Ok(())
    }
}
