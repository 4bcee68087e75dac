//! Pure rendering of PostgreSQL configuration: the geminik8s include file,
//! `pg_hba.conf`, `pg_ident.conf`, connection strings, SQL quoting and the
//! Kine schema. Writing them is [`super::files`]'s job.

use std::net::IpAddr;

use super::settings::Settings;
use crate::config::Replication;

/// Role used by standbys, `pg_rewind` and logical subscriptions.
pub const REPLICATION_ROLE: &str = "replicator";
/// Role and database Kine uses.
pub const KINE_ROLE: &str = "kine";
pub const KINE_DB: &str = "kine";
/// Kine's table (its `id` is the revision).
pub const KINE_TABLE: &str = "kine";
/// Publication (leader) and subscription (follower) of `replication: logical`.
pub const PUBLICATION: &str = "geminik8s_kine";
pub const SUBSCRIPTION: &str = "geminik8s_kine";
/// The include file holding every setting geminik8s owns.
pub const INCLUDE_FILE: &str = "geminik8s.conf";
/// The `pg_ident.conf` map letting root and the server's OS user in as the superuser.
pub const IDENT_MAP: &str = "geminik8s";
/// The database superuser the agent connects as over the Unix socket.
pub const SUPERUSER: &str = "postgres";

/// Settings geminik8s owns that may also appear in `postgresql.auto.conf`
/// (copied from the other node by `pg_basebackup` or `pg_rewind`).
pub const OWNED_AUTO_SETTINGS: &[&str] = &["primary_conninfo", "primary_slot_name", "synchronous_standby_names"];

/// Kine's PostgreSQL schema as Kine v0.17.5 creates it. Created up front in
/// logical mode: the publication and the follower's subscription need the
/// table before Kine first runs (Kine's own statements are `IF NOT EXISTS`).
pub const KINE_SCHEMA: &str = "\
CREATE TABLE IF NOT EXISTS kine (
    id BIGSERIAL PRIMARY KEY,
    name text COLLATE \"C\",
    created INTEGER,
    deleted INTEGER,
    create_revision BIGINT,
    prev_revision BIGINT,
    lease INTEGER,
    value bytea,
    old_value bytea
);
CREATE INDEX IF NOT EXISTS kine_name_index ON kine (name);
CREATE INDEX IF NOT EXISTS kine_name_id_index ON kine (name, id);
CREATE INDEX IF NOT EXISTS kine_id_deleted_index ON kine (id, deleted);
CREATE INDEX IF NOT EXISTS kine_prev_revision_index ON kine (prev_revision);
CREATE UNIQUE INDEX IF NOT EXISTS kine_name_prev_revision_uindex ON kine (name, prev_revision);
CREATE INDEX IF NOT EXISTS kine_list_query_index ON kine (name, id DESC, deleted);
";

/// Whether a server runs read-write or follows the peer by streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerRole {
    Primary,
    Standby,
}

/// The physical replication slot that keeps WAL for `node_name`: lowercase
/// letters, digits and underscores, as PostgreSQL requires.
pub fn slot_name(node_name: &str) -> String {
    let clean: String =
        node_name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    let mut name = format!("gk8s_{clean}");
    name.truncate(63);
    name
}

/// An SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// An SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A value in a PostgreSQL configuration file (where a backslash escapes).
pub fn conf_value(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// A libpq connection string from key/value pairs, quoting values that need it.
pub fn conninfo(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let plain = !v.is_empty() && !v.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\');
            if plain { format!("{k}={v}") } else { format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")) }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// How this node connects to the peer as the replication role, optionally
/// with the password (left out where it goes through `PGPASSWORD`): over
/// TLS, the server's certificate verified against the cluster CA and its
/// address (`sslmode=verify-full`; node certificates carry their IP), this
/// node's certificate presented as the client's.
pub fn peer_conninfo(settings: &Settings, dbname: Option<&str>, with_password: bool) -> String {
    let host = settings.peer.ip.to_string();
    let port = settings.peer.port.to_string();
    let file = |name: &str| settings.tls_dir().join(name).to_string_lossy().into_owned();
    let (ca, cert, key) =
        (file(super::settings::CA_FILE), file(super::settings::CERT_FILE), file(super::settings::KEY_FILE));
    let mut pairs = vec![("host", host.as_str()), ("port", port.as_str()), ("user", REPLICATION_ROLE)];
    if with_password {
        pairs.push(("password", settings.replication_password.as_str()));
    }
    if let Some(db) = dbname {
        pairs.push(("dbname", db));
    }
    pairs.push(("application_name", settings.node.name.as_str()));
    pairs.push(("sslmode", "verify-full"));
    pairs.push(("sslrootcert", ca.as_str()));
    pairs.push(("sslcert", cert.as_str()));
    pairs.push(("sslkey", key.as_str()));
    conninfo(&pairs)
}

/// The value of `synchronous_standby_names`: the peer's application name
/// when commits must wait for it, empty otherwise.
pub fn synchronous_standby_names(synchronous: bool, peer_name: &str) -> String {
    if synchronous { quote_ident(peer_name) } else { String::new() }
}

/// The geminik8s include file (`geminik8s.conf`), loaded from `postgresql.conf`.
/// `synchronous_standby_names` is not here: it changes at run time through
/// `ALTER SYSTEM` (see [`super::durability`]).
pub fn render_conf(settings: &Settings, role: ServerRole) -> String {
    let wal_level = match settings.replication {
        Replication::Streaming => "replica",
        Replication::Logical => "logical",
    };
    let mut out = String::from("# Managed by geminik8s; rewritten on every role change.\n");
    let mut set = |key: &str, value: String| out.push_str(&format!("{key} = {value}\n"));
    set("listen_addresses", conf_value(&settings.listen_addresses.join(",")));
    set("port", settings.node.port.to_string());
    set("unix_socket_directories", conf_value(&settings.socket_dir.to_string_lossy()));
    set("password_encryption", conf_value("scram-sha-256"));
    set("wal_level", wal_level.to_string());
    set("max_wal_senders", "10".to_string());
    set("max_replication_slots", "10".to_string());
    set("max_slot_wal_keep_size", conf_value(&format!("{}MB", settings.max_slot_wal_keep_mb)));
    set("wal_log_hints", "on".to_string());
    set("hot_standby", "on".to_string());
    set("hot_standby_feedback", "on".to_string());
    set("synchronous_commit", "on".to_string());
    // Bounded, not PostgreSQL's 60 s: a silent standby or primary is noticed
    // (and its connection retried) within seconds of a cut healing. The
    // agent's own heartbeats decide everything else.
    set("wal_sender_timeout", conf_value("10s"));
    set("wal_receiver_timeout", conf_value("10s"));
    // A standby whose primary went away (restarted, fenced and resumed)
    // tries again after 1 s, not PostgreSQL's 5 s: synchronous commits wait
    // for it meanwhile.
    set("wal_retrieve_retry_interval", conf_value("1s"));
    // TLS with the node's certificate; pg_hba.conf takes the network roles
    // only over TLS.
    let tls = |file: &str| conf_value(&settings.tls_dir().join(file).to_string_lossy());
    set("ssl", "on".to_string());
    set("ssl_cert_file", tls(super::settings::CERT_FILE));
    set("ssl_key_file", tls(super::settings::KEY_FILE));
    set("ssl_ca_file", tls(super::settings::CA_FILE));
    set("ssl_min_protocol_version", conf_value("TLSv1.2"));
    if let Some(a) = &settings.wal_archive {
        // `always`: a standby archives what it receives, so the follower can
        // be the node that uploads while the leader only spools.
        set("archive_mode", "always".to_string());
        set("archive_command", conf_value(&archive_command(a)));
        set("archive_timeout", conf_value(&format!("{}s", a.timeout.as_secs().max(1))));
    }
    if role == ServerRole::Standby {
        set("primary_conninfo", conf_value(&peer_conninfo(settings, None, true)));
        set("primary_slot_name", conf_value(&slot_name(&settings.node.name)));
        set("recovery_target_timeline", conf_value("latest"));
    }
    out
}

/// The shell command PostgreSQL runs for each finished WAL file (`%p` its
/// path, `%f` its name).
pub fn archive_command(a: &super::settings::WalArchive) -> String {
    let quote = |p: &std::path::Path| format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"));
    format!("{} backup wal-spool --spool {} --limit {} %p %f", quote(&a.program), quote(&a.spool), a.spool_limit)
}

/// `pg_hba.conf`: the superuser over the Unix socket (root and the OS user
/// through [`IDENT_MAP`]), also for replication (local base backups); the
/// replication role only from the peer; Kine's role from the node addresses,
/// the VIP and loopback. Over the network only TLS (`hostssl`), and
/// everything by SCRAM; the replication role also
/// needs a client certificate signed by the cluster CA (a node's), which
/// Kine, running without the node's key, does not present.
pub fn render_hba(settings: &Settings) -> String {
    let peer = host_cidr(settings.peer.ip);
    let mut out = String::from("# Managed by geminik8s; rewritten on every role change.\n");
    out.push_str(&format!("local all {SUPERUSER} peer map={IDENT_MAP}\n"));
    // `gemin_k8s backup` runs pg_basebackup on the node over the socket.
    out.push_str(&format!("local replication {SUPERUSER} peer map={IDENT_MAP}\n"));
    // Streaming replication and pg_basebackup.
    out.push_str(&format!("hostssl replication {REPLICATION_ROLE} {peer} scram-sha-256 {NODE_CERT}\n"));
    // pg_rewind reads the source through ordinary functions.
    out.push_str(&format!("hostssl postgres {REPLICATION_ROLE} {peer} scram-sha-256 {NODE_CERT}\n"));
    if settings.replication == Replication::Logical {
        out.push_str(&format!("hostssl {KINE_DB} {REPLICATION_ROLE} {peer} scram-sha-256 {NODE_CERT}\n"));
    }
    let mut kine_sources: Vec<IpAddr> = Vec::new();
    for ip in [settings.node.ip, settings.peer.ip, settings.vip, IpAddr::from([127, 0, 0, 1]), "::1".parse().unwrap()] {
        if !kine_sources.contains(&ip) {
            kine_sources.push(ip);
        }
    }
    for ip in kine_sources {
        out.push_str(&format!("hostssl {KINE_DB} {KINE_ROLE} {} scram-sha-256\n", host_cidr(ip)));
    }
    out
}

/// The `pg_hba.conf` option requiring a client certificate signed by `ssl_ca_file`.
const NODE_CERT: &str = "clientcert=verify-ca";

/// `pg_ident.conf`: root (the agent) and the server's OS user may connect as the superuser.
pub fn render_ident(os_user: &str) -> String {
    format!("# Managed by geminik8s.\n{IDENT_MAP} root {SUPERUSER}\n{IDENT_MAP} {os_user} {SUPERUSER}\n")
}

fn host_cidr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// The line that loads [`INCLUDE_FILE`] from `postgresql.conf`.
pub fn include_line() -> String {
    format!("include_if_exists = {}", conf_value(INCLUDE_FILE))
}

/// `postgresql.conf` with the include line appended, or `None` when it is already there.
pub fn ensure_include(postgresql_conf: &str) -> Option<String> {
    let line = include_line();
    if postgresql_conf.lines().any(|l| l.trim() == line) {
        return None;
    }
    let mut out = postgresql_conf.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&line);
    out.push('\n');
    Some(out)
}

/// A configuration file without the lines that set any of `keys`.
pub fn strip_settings(conf: &str, keys: &[&str]) -> String {
    conf.lines()
        .filter(|line| {
            let key = line.trim_start().split(|c: char| c == '=' || c.is_whitespace()).next().unwrap_or("");
            !keys.iter().any(|k| k.eq_ignore_ascii_case(key))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use crate::postgres::settings::Endpoint;
    use std::path::PathBuf;
    use std::time::Duration;

    fn settings(replication: Replication) -> Settings {
        Settings {
            bin_dir: PathBuf::from("/pg/bin"),
            data_dir: PathBuf::from("/var/lib/postgresql/15/main"),
            log_file: PathBuf::from("/var/lib/postgresql/15/main.log"),
            socket_dir: PathBuf::from("/run/geminik8s/postgres-node-a"),
            listen_addresses: vec!["*".into()],
            os_user: "postgres".into(),
            node: Endpoint { name: "node-a".into(), ip: "10.0.0.1".parse().unwrap(), port: 5432 },
            peer: Endpoint { name: "node-b".into(), ip: "10.0.0.2".parse().unwrap(), port: 5433 },
            vip: "10.0.0.10".parse().unwrap(),
            replication,
            durability: Durability::Synchronous,
            degrade_after: Duration::from_secs(30),
            replication_password: "s3cr'et word".into(),
            kine_password: "kinepw".into(),
            tls: crate::config::Tls {
                ca: "/etc/ca.crt".into(),
                cert: "/etc/node.crt".into(),
                key: "/etc/node.key".into(),
                crl: None,
            },
            sequence_margin: 1000,
            archive_before_rewind: true,
            archive_keep: 3,
            max_slot_wal_keep_mb: 4096,
            start_timeout: Duration::from_secs(60),
            tool_timeout: Duration::from_secs(600),
            wal_archive: None,
        }
    }

    #[test]
    fn archiving_spools_each_file_through_the_agent_binary() {
        let mut s = settings(Replication::Streaming);
        s.wal_archive = Some(crate::postgres::settings::WalArchive {
            program: PathBuf::from("/usr/bin/gemin_k8s"),
            spool: PathBuf::from("/var/lib/geminik8s/wal spool"),
            spool_limit: 1 << 30,
            timeout: Duration::from_secs(60),
        });
        let conf = render_conf(&s, ServerRole::Standby);
        assert!(conf.contains("archive_mode = always\n"), "{conf}");
        let command = "archive_command = '''/usr/bin/gemin_k8s'' backup wal-spool --spool \
                       ''/var/lib/geminik8s/wal spool'' --limit 1073741824 %p %f'\n";
        assert!(conf.contains(command), "{conf}");
        assert!(conf.contains("archive_timeout = '60s'\n"), "{conf}");
        assert!(!render_conf(&settings(Replication::Streaming), ServerRole::Primary).contains("archive"));
    }

    #[test]
    fn primary_conf_for_streaming() {
        let conf = render_conf(&settings(Replication::Streaming), ServerRole::Primary);
        let expected = "\
# Managed by geminik8s; rewritten on every role change.
listen_addresses = '*'
port = 5432
unix_socket_directories = '/run/geminik8s/postgres-node-a'
password_encryption = 'scram-sha-256'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
max_slot_wal_keep_size = '4096MB'
wal_log_hints = on
hot_standby = on
hot_standby_feedback = on
synchronous_commit = on
wal_sender_timeout = '10s'
wal_receiver_timeout = '10s'
wal_retrieve_retry_interval = '1s'
ssl = on
ssl_cert_file = '/run/geminik8s/postgres-node-a/tls/node.crt'
ssl_key_file = '/run/geminik8s/postgres-node-a/tls/node.key'
ssl_ca_file = '/run/geminik8s/postgres-node-a/tls/ca.crt'
ssl_min_protocol_version = 'TLSv1.2'
";
        assert_eq!(conf, expected);
    }

    #[test]
    fn standby_conf_follows_the_peer_through_its_own_slot() {
        let conf = render_conf(&settings(Replication::Streaming), ServerRole::Standby);
        assert!(conf.contains(
            "primary_conninfo = 'host=10.0.0.2 port=5433 user=replicator password=''s3cr\\\\''et word'' application_name=node-a \
             sslmode=verify-full sslrootcert=/run/geminik8s/postgres-node-a/tls/ca.crt \
             sslcert=/run/geminik8s/postgres-node-a/tls/node.crt sslkey=/run/geminik8s/postgres-node-a/tls/node.key'\n"
        ), "{conf}");
        assert!(conf.contains("primary_slot_name = 'gk8s_node_a'\n"), "{conf}");
        assert!(conf.contains("recovery_target_timeline = 'latest'\n"), "{conf}");
        assert!(conf.contains("hot_standby = on\n"));
    }

    #[test]
    fn logical_mode_sets_wal_level_logical() {
        let conf = render_conf(&settings(Replication::Logical), ServerRole::Primary);
        assert!(conf.contains("wal_level = logical\n"), "{conf}");
    }

    #[test]
    fn synchronous_standby_names_names_the_peer_only_when_synchronous() {
        assert_eq!(synchronous_standby_names(true, "node-b"), "\"node-b\"");
        assert_eq!(synchronous_standby_names(false, "node-b"), "");
    }

    #[test]
    fn hba_allows_replication_only_from_the_peer_over_tls() {
        let hba = render_hba(&settings(Replication::Streaming));
        let expected = "\
# Managed by geminik8s; rewritten on every role change.
local all postgres peer map=geminik8s
local replication postgres peer map=geminik8s
hostssl replication replicator 10.0.0.2/32 scram-sha-256 clientcert=verify-ca
hostssl postgres replicator 10.0.0.2/32 scram-sha-256 clientcert=verify-ca
hostssl kine kine 10.0.0.1/32 scram-sha-256
hostssl kine kine 10.0.0.2/32 scram-sha-256
hostssl kine kine 10.0.0.10/32 scram-sha-256
hostssl kine kine 127.0.0.1/32 scram-sha-256
hostssl kine kine ::1/128 scram-sha-256
";
        assert_eq!(hba, expected);
    }

    #[test]
    fn hba_in_logical_mode_lets_the_peer_subscribe_and_dedups_addresses() {
        let mut s = settings(Replication::Logical);
        s.peer.ip = "127.0.0.1".parse().unwrap();
        s.node.ip = "127.0.0.1".parse().unwrap();
        let hba = render_hba(&s);
        assert!(hba.contains("hostssl kine replicator 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n"), "{hba}");
        assert_eq!(hba.matches("hostssl kine kine 127.0.0.1/32").count(), 1, "{hba}");
    }

    #[test]
    fn hba_uses_host_prefix_for_ipv6_peers() {
        let mut s = settings(Replication::Streaming);
        s.peer.ip = "fd00::2".parse().unwrap();
        assert!(
            render_hba(&s).contains("hostssl replication replicator fd00::2/128 scram-sha-256 clientcert=verify-ca\n")
        );
    }

    #[test]
    fn ident_maps_root_and_the_os_user_to_the_superuser() {
        assert_eq!(
            render_ident("postgres"),
            "# Managed by geminik8s.\ngeminik8s root postgres\ngeminik8s postgres postgres\n"
        );
    }

    #[test]
    fn include_is_appended_once() {
        let once = ensure_include("port = 5432").unwrap();
        assert_eq!(once, "port = 5432\ninclude_if_exists = 'geminik8s.conf'\n");
        assert_eq!(ensure_include(&once), None);
    }

    #[test]
    fn strip_removes_owned_settings_only() {
        let auto = "# Do not edit this file manually!\nsynchronous_standby_names = '\"node-b\"'\n\
                    primary_conninfo = 'host=x'\nwork_mem = '8MB'\n";
        assert_eq!(strip_settings(auto, OWNED_AUTO_SETTINGS), "# Do not edit this file manually!\nwork_mem = '8MB'\n");
    }

    #[test]
    fn slot_names_are_valid_identifiers() {
        assert_eq!(slot_name("Node-B.edge"), "gk8s_node_b_edge");
        assert_eq!(slot_name(&"x".repeat(100)).len(), 63);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(conninfo(&[("host", "h"), ("password", ""), ("x", "a b\\")]), "host=h password='' x='a b\\\\'");
    }

    #[test]
    fn peer_conninfo_without_password_for_tools() {
        let s = settings(Replication::Streaming);
        assert_eq!(
            peer_conninfo(&s, Some("postgres"), false),
            "host=10.0.0.2 port=5433 user=replicator dbname=postgres application_name=node-a \
             sslmode=verify-full sslrootcert=/run/geminik8s/postgres-node-a/tls/ca.crt \
             sslcert=/run/geminik8s/postgres-node-a/tls/node.crt sslkey=/run/geminik8s/postgres-node-a/tls/node.key"
        );
    }

    #[test]
    fn kine_schema_matches_kine() {
        // The statements Kine v0.17.5 runs, as dumped from a database Kine created.
        for needle in [
            "id BIGSERIAL PRIMARY KEY",
            "name text COLLATE \"C\"",
            "CREATE UNIQUE INDEX IF NOT EXISTS kine_name_prev_revision_uindex ON kine (name, prev_revision)",
            "kine_list_query_index ON kine (name, id DESC, deleted)",
        ] {
            assert!(KINE_SCHEMA.contains(needle), "{needle}");
        }
    }
}
