//! Bootstrap, follower initialisation, promotion, durability and rejoin.

use super::archive;
use super::files;
use super::render::{self, KINE_DB, KINE_ROLE, REPLICATION_ROLE, ServerRole, quote_ident, quote_literal};
use super::server::{Manager, Session, StopMode};
use super::status::PgRole;
use super::{PgError, Rejoin, Result};
use crate::config::Replication;

/// How long an old primary started as the new primary's standby may take
/// to stream on the new timeline before it is rewound instead.
const FOLLOW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Functions `pg_rewind` calls on its source, granted to the replication role.
const REWIND_FUNCTIONS: &[&str] = &[
    "pg_catalog.pg_ls_dir(text, boolean, boolean)",
    "pg_catalog.pg_stat_file(text, boolean)",
    "pg_catalog.pg_read_binary_file(text)",
    "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
];

impl Manager {
    fn require_passwords(&self, what: &str) -> Result<()> {
        for (key, value) in [
            ("postgres.replication_password", &self.settings.replication_password),
            ("postgres.kine_password", &self.settings.kine_password),
        ] {
            if value.is_empty() {
                return Err(PgError::Unexpected {
                    what: what.to_string(),
                    detail: format!("{key} is empty; set it in the cloud-config"),
                });
            }
        }
        Ok(())
    }

    /// `initdb` into the (empty or missing) data directory, as the OS user.
    pub(super) async fn initdb(&self) -> Result<()> {
        let data = &self.settings.data_dir;
        files::ensure_dir(data, 0o700, self.owner)?;
        if !files::is_empty_or_missing(data)? {
            return Err(PgError::Unexpected {
                what: format!("initialising {}", data.display()),
                detail: "the directory is not empty but holds no PostgreSQL cluster; move its contents away first"
                    .into(),
            });
        }
        self.tool("initdb")
            .arg("-D")
            .arg(data)
            .args(["-U", render::SUPERUSER, "--auth-local=peer", "--auth-host=scram-sha-256"])
            .args(["--encoding=UTF8", "--locale=C", "--data-checksums"])
            .timeout(self.settings.tool_timeout)
            .run()
            .await
            .map_err(|source| PgError::Tool { action: format!("initdb into {}", data.display()), source })?;
        Ok(())
    }

    /// Leader bootstrap: `initdb` when the data directory holds no cluster
    /// yet, configuration, start, the replication and Kine roles, the Kine
    /// database, and what the follower will need (its physical slot, or in
    /// logical mode the Kine table and its publication). Idempotent: on a
    /// data directory that already holds a cluster it only converges.
    /// Commits do not wait for the follower until the agent asks for it
    /// ([`Manager::apply_durability`]).
    pub async fn bootstrap_leader(&self) -> Result<()> {
        self.require_passwords("bootstrapping the leader")?;
        if !files::has_cluster(&self.settings.data_dir) {
            self.initdb().await?;
        }
        let db = self.start_primary_with_roles().await?;
        match self.settings.replication {
            Replication::Streaming => self.ensure_peer_slot(&db).await?,
            Replication::Logical => {
                let kine = self.connect(KINE_DB).await?;
                kine.local_commits().await?;
                self.ensure_kine_schema(&kine).await?;
                self.ensure_publication(&kine).await?;
            }
        }
        tracing::info!(event = "postgres_leader_ready", node = %self.settings.node.name, "PostgreSQL bootstrapped as leader");
        Ok(())
    }

    /// Follower initialisation: in streaming mode a `pg_basebackup` of the
    /// leader started as a standby; in logical mode a fresh cluster with the
    /// Kine schema subscribed to the leader's publication. A data directory
    /// that is not empty is archived first (returned), so this is for a new
    /// or broken follower; an intact one is simply [`Manager::start`]ed.
    pub async fn init_follower(&self) -> Result<Option<std::path::PathBuf>> {
        self.require_passwords("initialising the follower")?;
        self.stop(StopMode::Fast).await?;
        let archive = self.archive_and_clear_if_needed().await?;
        match self.settings.replication {
            Replication::Streaming => {
                self.base_backup().await?;
                self.write_config(ServerRole::Standby)?;
                self.start().await?;
            }
            Replication::Logical => self.init_logical_follower().await?,
        }
        tracing::info!(event = "postgres_follower_ready", node = %self.settings.node.name, leader = %self.settings.peer.ip, "PostgreSQL initialised as follower");
        Ok(archive)
    }

    /// Archive a data directory that is not empty, then empty it.
    async fn archive_and_clear_if_needed(&self) -> Result<Option<std::path::PathBuf>> {
        let data = &self.settings.data_dir;
        if files::is_empty_or_missing(data)? {
            files::ensure_dir(data, 0o700, self.owner)?;
            return Ok(None);
        }
        let archive = archive::archive_data_dir(data, self.settings.archive_keep).await?;
        archive::clear_dir(data)?;
        files::ensure_dir(data, 0o700, self.owner)?;
        Ok(Some(archive))
    }

    async fn base_backup(&self) -> Result<()> {
        let s = &self.settings;
        // The CA file the connection string's `sslrootcert=` names.
        files::write_tls(s, self.owner)?;
        self.release_slot_on_leader("postgres", false).await?;
        self.tool("pg_basebackup")
            .arg("-D")
            .arg(&s.data_dir)
            .arg("-d")
            .arg(render::peer_conninfo(s, None, false))
            .args(["-X", "stream", "-c", "fast", "-w", "-S"])
            .arg(render::slot_name(&s.node.name))
            .env("PGPASSWORD", &s.replication_password)
            .timeout(s.tool_timeout)
            .run()
            .await
            .map_err(|source| PgError::Tool {
                action: format!("pg_basebackup from {}:{} into {}", s.peer.ip, s.peer.port, s.data_dir.display()),
                source,
            })?;
        Ok(())
    }

    /// Configure as a primary, start, and make sure the replication and
    /// Kine roles and Kine's database exist; returns a session on `postgres`
    /// with local commits (never waiting for a standby).
    pub(super) async fn start_primary_with_roles(&self) -> Result<Session> {
        self.write_config(ServerRole::Primary)?;
        self.start().await?;
        let db = self.connect("postgres").await?;
        db.local_commits().await?;
        self.ensure_roles_and_database(&db).await?;
        Ok(db)
    }

    pub(super) async fn ensure_roles_and_database(&self, db: &Session) -> Result<()> {
        let s = &self.settings;
        for (role, attributes, password) in
            [(REPLICATION_ROLE, "LOGIN REPLICATION", &s.replication_password), (KINE_ROLE, "LOGIN", &s.kine_password)]
        {
            let exists = db
                .query_opt("looking up a role", "SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
                .await?
                .is_some();
            let verb = if exists { "ALTER" } else { "CREATE" };
            let sql =
                format!("{verb} ROLE {} WITH {attributes} PASSWORD {}", quote_ident(role), quote_literal(password));
            db.batch(&format!("{verb} ROLE {role}"), &sql).await?;
        }
        // pg_rewind needs the source's control file current: the rejoining
        // node asks for a checkpoint first.
        let sql = format!("GRANT pg_checkpoint TO {}", quote_ident(REPLICATION_ROLE));
        db.batch("granting pg_checkpoint to the replication role", &sql).await?;
        for function in REWIND_FUNCTIONS {
            let sql = format!("GRANT EXECUTE ON FUNCTION {function} TO {}", quote_ident(REPLICATION_ROLE));
            db.batch(&format!("granting {function} to {REPLICATION_ROLE}"), &sql).await?;
        }
        let has_db = db
            .query_opt("looking up the Kine database", "SELECT 1 FROM pg_database WHERE datname = $1", &[&KINE_DB])
            .await?;
        if has_db.is_none() {
            let sql = format!("CREATE DATABASE {} OWNER {}", quote_ident(KINE_DB), quote_ident(KINE_ROLE));
            db.batch("creating the Kine database", &sql).await?;
        }
        Ok(())
    }

    /// On the primary in streaming mode: make sure the peer's physical slot
    /// exists and is usable, before the peer (re)joins. Bootstrap and
    /// promotion do this too.
    pub async fn ensure_follower_slot(&self) -> Result<()> {
        let db = self.connect("postgres").await?;
        self.ensure_peer_slot(&db).await
    }

    /// The physical slot keeping WAL for the peer while it is away. A slot
    /// invalidated by `max_slot_wal_keep_size` (the peer was gone too long)
    /// is recreated: the peer then needs a fresh base backup anyway.
    pub(super) async fn ensure_peer_slot(&self, db: &Session) -> Result<()> {
        let slot = render::slot_name(&self.settings.peer.name);
        db.execute(
            &format!("dropping invalidated replication slot {slot}"),
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND wal_status = 'lost' AND NOT active",
            &[&slot],
        )
        .await?;
        db.execute(
            &format!("creating replication slot {slot}"),
            "SELECT pg_create_physical_replication_slot($1, true) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await?;
        Ok(())
    }

    /// Promote this node. Streaming: `pg_promote()`; logical: stop applying
    /// the old leader's changes. Then the peer gets a slot or publication to
    /// rejoin with, and the Kine sequence moves past every revision the old
    /// leader may have handed out: always by the safety margin, because a
    /// commit whose wait for this standby was cancelled (a client timeout)
    /// stays visible on the old primary without reaching this node, and its
    /// revision must never be handed out twice. Commits do not wait for any
    /// standby afterwards until the agent asks for it. Idempotent.
    pub async fn promote(&self) -> Result<()> {
        let s = &self.settings;
        let db = self.connect("postgres").await?;
        db.local_commits().await?;
        if s.replication == Replication::Streaming {
            let in_recovery: bool = db.query_one("checking recovery", "SELECT pg_is_in_recovery()", &[]).await?.get(0);
            if in_recovery {
                let wait = i32::try_from(s.start_timeout.as_secs()).unwrap_or(i32::MAX).max(1);
                let done: bool = db.query_one("pg_promote()", "SELECT pg_promote(true, $1)", &[&wait]).await?.get(0);
                if !done {
                    return Err(PgError::Timeout {
                        what: "promotion".into(),
                        target: self.target(),
                        timeout: s.start_timeout,
                    });
                }
                // The control file shows the new timeline only after a
                // checkpoint; pg_rewind of the old primary reads it there.
                db.batch("checkpoint after promotion", "CHECKPOINT").await?;
            }
        }
        // Primary configuration (without the standby's settings, so commits
        // wait for nobody until the agent asks).
        self.write_config(ServerRole::Primary)?;
        self.apply_durability(false).await?;

        let kine = self.connect(KINE_DB).await?;
        kine.local_commits().await?;
        match s.replication {
            Replication::Streaming => {
                self.ensure_peer_slot(&db).await?;
                self.advance_kine_sequence(&kine, s.sequence_margin).await?;
            }
            Replication::Logical => {
                self.drop_subscription(&kine).await?;
                self.ensure_kine_schema(&kine).await?;
                // Sequences are not replicated logically: move past max(id) too.
                self.advance_kine_sequence(&kine, s.sequence_margin).await?;
                self.ensure_publication(&kine).await?;
            }
        }
        tracing::info!(event = "postgres_promoted", node = %s.node.name, "PostgreSQL promoted");
        Ok(())
    }

    /// Make commits wait for the peer (`synchronous_standby_names` names it)
    /// or not (empty), through `ALTER SYSTEM` and a reload. Waiting commits
    /// are released when it becomes empty.
    pub async fn apply_durability(&self, synchronous: bool) -> Result<()> {
        let value = render::synchronous_standby_names(synchronous, &self.settings.peer.name);
        let db = self.connect("postgres").await?;
        db.batch(
            "setting synchronous_standby_names",
            &format!("ALTER SYSTEM SET synchronous_standby_names = {}", quote_literal(&value)),
        )
        .await?;
        db.execute("reloading the configuration", "SELECT pg_reload_conf()", &[]).await?;
        tracing::info!(event = "postgres_durability", synchronous, "PostgreSQL durability set");
        Ok(())
    }

    /// Whether `synchronous_standby_names` (as the server applies it now)
    /// names the peer.
    pub fn waits_for_peer(&self, synchronous_standby_names: &str) -> bool {
        synchronous_standby_names == render::synchronous_standby_names(true, &self.settings.peer.name)
    }

    /// Rejoin after a failover as the follower of the peer (the new
    /// primary). Streaming: `follow_first` (a planned hand-over whose peer
    /// replayed past this node's shutdown checkpoint) starts a cleanly shut
    /// down data directory as the standby it can be, without `pg_rewind`;
    /// otherwise (or when it does not stream on the new timeline in time)
    /// stop, archive (if configured), `pg_rewind`; if that fails, archive
    /// (if not done yet), then a fresh `pg_basebackup`. Logical: archive and
    /// re-initialise as a subscriber. Nothing in the data directory is
    /// discarded without an archive.
    pub async fn rejoin(&self, follow_first: bool) -> Result<Rejoin> {
        self.require_passwords("rejoining as follower")?;
        let s = &self.settings;
        self.stop(StopMode::Fast).await?;
        if s.replication == Replication::Logical || !files::has_cluster(&s.data_dir) {
            let archive = self.init_follower().await?;
            return Ok(Rejoin::Recloned { archive, rewind_error: None });
        }
        if follow_first {
            match self.follow().await {
                Ok(true) => return Ok(Rejoin::Followed),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "following the new primary without pg_rewind failed"),
            }
            self.stop(StopMode::Fast).await?;
        }
        let mut archive = None;
        self.checkpoint_leader().await?;
        if s.archive_before_rewind {
            archive = Some(archive::archive_data_dir(&s.data_dir, s.archive_keep).await?);
        }
        match self.rewind().await {
            Ok(()) => {
                self.write_config(ServerRole::Standby)?;
                self.release_slot_on_leader("postgres", false).await?;
                self.start().await?;
                tracing::info!(event = "postgres_rewound", node = %s.node.name, primary = %s.peer.ip, "PostgreSQL rewound onto the new primary");
                Ok(Rejoin::Rewound { archive })
            }
            Err(rewind_error) => {
                tracing::warn!(event = "postgres_rewind_failed", error = %rewind_error, "pg_rewind failed; taking a fresh base backup");
                let archive = match archive {
                    Some(a) => a,
                    None => archive::archive_data_dir(&s.data_dir, s.archive_keep).await?,
                };
                archive::clear_dir(&s.data_dir)?;
                files::ensure_dir(&s.data_dir, 0o700, self.owner)?;
                self.base_backup().await?;
                self.write_config(ServerRole::Standby)?;
                self.start().await?;
                tracing::info!(event = "postgres_recloned", node = %s.node.name, archive = %archive.display(), "PostgreSQL re-cloned from the new primary");
                Ok(Rejoin::Recloned { archive: Some(archive), rewind_error: Some(rewind_error.to_string()) })
            }
        }
    }

    /// Start a cleanly shut down old primary as the peer's standby, as it
    /// is, and wait until it streams on a later timeline. PostgreSQL itself
    /// refuses a timeline that forked off before this node's WAL ends (it
    /// then never streams), so a wrong start costs time, never data.
    /// Returns whether it streams.
    async fn follow(&self) -> Result<bool> {
        let s = &self.settings;
        let Some(control) = self.control_position().await? else { return Ok(false) };
        if !control.clean_shutdown {
            return Ok(false);
        }
        files::write_tls(s, self.owner)?;
        self.write_config(ServerRole::Standby)?;
        self.start().await?;
        let deadline = std::time::Instant::now() + FOLLOW_TIMEOUT;
        loop {
            let st = self.status().await?;
            let on_new_timeline =
                st.receiver.as_ref().and_then(|r| r.received_timeline).unwrap_or(0) > i64::from(control.timeline);
            if st.role == PgRole::Standby && st.streaming() && on_new_timeline {
                tracing::info!(event = "postgres_followed", node = %s.node.name, primary = %s.peer.ip,
                    timeline = st.timeline, "PostgreSQL follows the new primary's timeline without pg_rewind");
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!(event = "postgres_follow_failed", node = %s.node.name, waited = ?FOLLOW_TIMEOUT,
                    receiver = ?st.receiver, "the old primary does not stream on the new timeline; rewinding instead");
                return Ok(false);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    async fn rewind(&self) -> Result<()> {
        let s = &self.settings;
        // The CA file the connection string's `sslrootcert=` names.
        files::write_tls(s, self.owner)?;
        // pg_rewind itself runs crash recovery in single-user mode first
        // when the server was not shut down cleanly.
        self.tool("pg_rewind")
            .arg("--target-pgdata")
            .arg(&s.data_dir)
            .arg("--source-server")
            .arg(render::peer_conninfo(s, Some("postgres"), false))
            .env("PGPASSWORD", &s.replication_password)
            .timeout(s.tool_timeout)
            .run()
            .await
            .map_err(|source| PgError::Tool {
                action: format!("pg_rewind of {} from {}:{}", s.data_dir.display(), s.peer.ip, s.peer.port),
                source,
            })?;
        Ok(())
    }
}
