//! `replication: logical`: Kine's table published by the leader and
//! subscribed by the follower, and the Kine sequence, which logical
//! replication does not carry.

use super::render::{self, KINE_DB, KINE_ROLE, KINE_SCHEMA, KINE_TABLE, PUBLICATION, REPLICATION_ROLE, SUBSCRIPTION};
use super::server::{Manager, Session};
use super::{PgError, Result};
use render::{quote_ident, quote_literal};

impl Manager {
    /// Kine's table as Kine creates it, owned by Kine's role.
    pub(super) async fn ensure_kine_schema(&self, kine: &Session) -> Result<()> {
        kine.batch("creating the Kine table", KINE_SCHEMA).await?;
        let sql = format!("ALTER TABLE {} OWNER TO {}", quote_ident(KINE_TABLE), quote_ident(KINE_ROLE));
        kine.batch("giving the Kine table to the Kine role", &sql).await?;
        // The subscriber's initial copy reads the table as the replication role.
        let sql = format!("GRANT SELECT ON {} TO {}", quote_ident(KINE_TABLE), quote_ident(REPLICATION_ROLE));
        kine.batch("letting the replication role copy the Kine table", &sql).await
    }

    pub(super) async fn ensure_publication(&self, kine: &Session) -> Result<()> {
        let exists = kine
            .query_opt("looking up the publication", "SELECT 1 FROM pg_publication WHERE pubname = $1", &[&PUBLICATION])
            .await?
            .is_some();
        if !exists {
            let sql = format!("CREATE PUBLICATION {} FOR TABLE {}", quote_ident(PUBLICATION), quote_ident(KINE_TABLE));
            kine.batch("creating the publication", &sql).await?;
        }
        Ok(())
    }

    /// Stop applying the old leader's changes: disable the subscription,
    /// detach it from its slot on the (unreachable) old leader, drop it.
    pub(super) async fn drop_subscription(&self, kine: &Session) -> Result<()> {
        let exists = kine
            .query_opt(
                "looking up the subscription",
                "SELECT 1 FROM pg_subscription WHERE subname = $1",
                &[&SUBSCRIPTION],
            )
            .await?
            .is_some();
        if !exists {
            return Ok(());
        }
        let sub = quote_ident(SUBSCRIPTION);
        kine.batch("disabling the subscription", &format!("ALTER SUBSCRIPTION {sub} DISABLE")).await?;
        kine.batch(
            "detaching the subscription from its slot",
            &format!("ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)"),
        )
        .await?;
        kine.batch("dropping the subscription", &format!("DROP SUBSCRIPTION {sub}")).await
    }

    /// Move the Kine id sequence (Kine's revision) to
    /// `max(max(id), last value) + margin`, so the next revision is greater
    /// than any the old leader may have handed out. Returns the new value,
    /// or `None` when Kine's table does not exist yet.
    pub async fn advance_kine_sequence_by(&self, margin: i64) -> Result<Option<i64>> {
        let kine = self.connect(KINE_DB).await?;
        kine.local_commits().await?;
        self.advance_kine_sequence(&kine, margin).await
    }

    /// Move Kine's id sequence `margin` past everything this node holds and
    /// everything its sequence handed out, and fill the skipped ids with
    /// Kine's own gap records (`gap-<id>`, deleted): Kine's watch stream
    /// expects contiguous ids and otherwise fills a gap one id at a time,
    /// holding every watch meanwhile.
    pub(super) async fn advance_kine_sequence(&self, kine: &Session, margin: i64) -> Result<Option<i64>> {
        let table = format!("public.{KINE_TABLE}");
        let exists: bool =
            kine.query_one("looking up the Kine table", "SELECT to_regclass($1) IS NOT NULL", &[&table]).await?.get(0);
        if !exists {
            return Ok(None);
        }
        let t = quote_ident(KINE_TABLE);
        let max_id: i64 = kine
            .query_one("reading the highest Kine revision", &format!("SELECT COALESCE(max(id), 0)::int8 FROM {t}"), &[])
            .await?
            .get(0);
        let sql = "SELECT setval(seq, GREATEST($3::int8, COALESCE(pg_sequence_last_value(seq), 0), 1) + $1, true) \
                   FROM (SELECT pg_get_serial_sequence($2, 'id')::regclass AS seq) s";
        let value: i64 = kine.query_one("advancing the Kine sequence", sql, &[&margin, &table, &max_id]).await?.get(0);
        let fill = format!(
            "INSERT INTO {t} (id, name, created, deleted, create_revision, prev_revision, lease, value, old_value) \
             SELECT g, 'gap-' || g, 0, 1, 0, 0, 0, NULL, NULL FROM generate_series($1::int8 + 1, $2::int8) g \
             ON CONFLICT (id) DO NOTHING"
        );
        let filled = kine.execute("filling the skipped Kine revisions", &fill, &[&max_id, &value]).await?;
        tracing::info!(event = "kine_sequence_advanced", value, margin, filled, "Kine revision sequence advanced");
        Ok(Some(value))
    }

    /// A fresh cluster with the roles, Kine's database and table, subscribed
    /// to the leader's publication (copying what it already holds).
    pub(super) async fn init_logical_follower(&self) -> Result<()> {
        self.initdb().await?;
        self.start_primary_with_roles().await?;
        let kine = self.connect(KINE_DB).await?;
        kine.local_commits().await?;
        self.ensure_kine_schema(&kine).await?;
        let s = &self.settings;
        self.release_slot_on_leader(KINE_DB, true).await?;
        let conninfo = render::peer_conninfo(s, Some(KINE_DB), true);
        let sql = format!(
            "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH (slot_name = {})",
            quote_ident(SUBSCRIPTION),
            quote_literal(&conninfo),
            quote_ident(PUBLICATION),
            quote_literal(&render::slot_name(&s.node.name)),
        );
        kine.batch("creating the subscription", &sql).await.map_err(|e| match e {
            PgError::Sql { target, source, .. } => PgError::Sql {
                what: format!("subscribing to {}:{} (publication {PUBLICATION})", s.peer.ip, s.peer.port),
                target,
                source,
            },
            other => other,
        })
    }
}
