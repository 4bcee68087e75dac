//! The `geminik8s:` block, key by key.
//!
//! This table is the single description of every key: the validator walks it
//! (unknown keys, types, required keys) and `docs/cloud-config.md` is rendered
//! from it. A test checks that it matches the typed structs in `types.rs`.

/// What a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A mapping of further keys.
    Section,
    Str,
    /// A DNS label: lowercase letters, digits and `-`, at most 63 characters.
    Name,
    Bool,
    Int {
        min: i64,
        max: i64,
    },
    Port,
    Ip,
    /// `humantime` duration such as `500ms`, `3s`, `5m`.
    Duration,
    Enum(&'static [&'static str]),
    StrList,
    /// `IP` or `IP:PORT` entries.
    AddrList,
    /// `IP:PORT`.
    SocketAddr,
    /// An absolute path to a file that must exist on the node.
    File,
    /// An absolute path to a directory (created if missing).
    Dir,
    /// Inline PEM text, or an absolute path to a PEM file.
    Pem,
    /// A generated secret (at least 16 characters).
    Secret,
}

impl Kind {
    pub fn describe(&self) -> String {
        match self {
            Kind::Section => "mapping".into(),
            Kind::Str => "string".into(),
            Kind::Name => "name (DNS label)".into(),
            Kind::Bool => "boolean".into(),
            Kind::Int { min, max } => format!("integer {min}..={max}"),
            Kind::Port => "port 1..=65535".into(),
            Kind::Ip => "IP address".into(),
            Kind::Duration => "duration (`500ms`, `3s`, `5m`)".into(),
            Kind::Enum(values) => values.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(" \\| "),
            Kind::StrList => "list of strings".into(),
            Kind::AddrList => "list of `IP` or `IP:PORT`".into(),
            Kind::SocketAddr => "`IP:PORT`".into(),
            Kind::File => "absolute file path".into(),
            Kind::Dir => "absolute directory path".into(),
            Kind::Pem => "inline PEM or absolute file path".into(),
            Kind::Secret => "secret string (16+ characters)".into(),
        }
    }
}

/// One key of the `geminik8s:` block. `path` is relative to `geminik8s`.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub path: &'static str,
    pub kind: Kind,
    /// The default in YAML syntax; `None` for required keys and for optional
    /// keys that are simply absent by default (see `required`).
    pub default: Option<&'static str>,
    pub required: bool,
    pub doc: &'static str,
}

const fn section(path: &'static str, doc: &'static str) -> Key {
    Key { path, kind: Kind::Section, default: None, required: false, doc }
}
const fn required(path: &'static str, kind: Kind, doc: &'static str) -> Key {
    Key { path, kind, default: None, required: true, doc }
}
const fn optional(path: &'static str, kind: Kind, default: &'static str, doc: &'static str) -> Key {
    Key { path, kind, default: Some(default), required: false, doc }
}

pub const WITNESS_MODES: &[&str] = &["none", "gateway", "arbiter"];
pub const REPLICATION_MODES: &[&str] = &["streaming", "logical"];
pub const DURABILITY_MODES: &[&str] = &["synchronous", "async"];

pub const KEYS: &[Key] = &[
    section("cluster", "The cluster as a whole; identical on both nodes."),
    required("cluster.name", Kind::Name, "Cluster name. Both nodes must agree; hostMeta records it."),
    required("cluster.vip", Kind::Ip, "Virtual IP that clients, Kine and kubectl use. Held by the leader only."),
    optional(
        "cluster.vip_prefix",
        Kind::Int { min: 1, max: 128 },
        "24",
        "Prefix length of the VIP; node IPs and VIP must share this subnet.",
    ),
    optional(
        "cluster.interface",
        Kind::Str,
        "null",
        "Interface the VIP is added to. `null`: the interface that holds `node.ip`.",
    ),
    required(
        "cluster.bootstrap_leader",
        Kind::Name,
        "Node that leads a fresh cluster; also the last tie-breaker in arbitration.",
    ),
    section("cluster.witness", "Split-brain protection: who may lead when the peer is unreachable."),
    optional(
        "cluster.witness.mode",
        Kind::Enum(WITNESS_MODES),
        "none",
        "`none`: peer loss alone decides (a partition can give two leaders). `gateway`: a node must reach one of `targets` to lead. `arbiter`: a node must hold the lease from `gemin_k8s witness serve`.",
    ),
    optional(
        "cluster.witness.targets",
        Kind::AddrList,
        "[]",
        "`gateway`: addresses probed (ICMP, or TCP when a port is given). `arbiter`: exactly one `IP:PORT` of the witness.",
    ),
    optional(
        "cluster.witness.lease_ttl",
        Kind::Duration,
        "3s",
        "`arbiter`: how long a granted lease lasts; a failover waits for the dead leader's lease to run out.",
    ),
    optional(
        "cluster.witness.lease_renew",
        Kind::Duration,
        "1s",
        "`arbiter`: how often the holder renews; less than `lease_ttl` (the holder trusts 80% of it).",
    ),
    section("node", "This node."),
    required("node.name", Kind::Name, "This node's name (also its hostname unless `hostname:` says otherwise)."),
    required("node.ip", Kind::Ip, "This node's address on the cluster network."),
    optional("node.api_port", Kind::Port, "7443", "Port of this node's agent API (mutual TLS)."),
    section("peer", "The other node."),
    required("peer.name", Kind::Name, "The peer's name."),
    required("peer.ip", Kind::Ip, "The peer's address on the cluster network."),
    optional("peer.api_port", Kind::Port, "7443", "Port of the peer's agent API."),
    section("api", "Operator access to the agent API."),
    required(
        "api.token",
        Kind::Secret,
        "Bearer token for operator calls to the agent API (`status --endpoint`, `failover`).",
    ),
    section("postgres", "The PostgreSQL datastore behind Kine."),
    optional(
        "postgres.replication",
        Kind::Enum(REPLICATION_MODES),
        "streaming",
        "`streaming`: physical streaming replication. `logical`: publication/subscription of the Kine table; the Kine sequence is advanced on promotion.",
    ),
    optional(
        "postgres.durability",
        Kind::Enum(DURABILITY_MODES),
        "synchronous",
        "`synchronous`: a commit waits for the follower (RPO 0 while both are healthy). `async`: it does not.",
    ),
    optional(
        "postgres.degrade_after",
        Kind::Duration,
        "10s",
        "`synchronous`: how long the follower may be gone before the leader stops waiting for it, and only once \
         the follower cannot take over on its own (it says so; or the arbiter records no synchronous standby; or \
         it has been silent longer than its eligibility window). Writes stall that long when the follower fails.",
    ),
    optional("postgres.port", Kind::Port, "5432", "PostgreSQL port on both nodes."),
    optional(
        "postgres.data_dir",
        Kind::Dir,
        "/var/lib/postgresql/15/main",
        "PostgreSQL data directory (on the persistent partition in the image).",
    ),
    required("postgres.replication_password", Kind::Secret, "Password of the `replicator` role (SCRAM)."),
    required("postgres.kine_password", Kind::Secret, "Password of the `kine` role that Kine connects with."),
    optional(
        "postgres.archive_keep",
        Kind::Int { min: 1, max: 100 },
        "3",
        "How many archives of old data directories (`<data_dir>-<time>.tar.gz`, taken before a rejoin discards anything) are kept; older ones are deleted, oldest first, after each new one.",
    ),
    section(
        "backup",
        "Continuous WAL archiving for point-in-time recovery (docs/backup.md). Off while `backup.destination` is absent.",
    ),
    optional(
        "backup.destination",
        Kind::Str,
        "null",
        "Where archived WAL goes (under `wal/`): a directory (a path or `file:///path`) or `s3://BUCKET/PREFIX`; the same destination `gemin_k8s backup create --output` writes full backups to.",
    ),
    optional(
        "backup.encryption_keys",
        Kind::StrList,
        "[]",
        "What archived WAL is encrypted to: age recipients (`age1...`, from `gemin_k8s backup keygen`), files of recipients, or one `passphrase:FILE`. Required unless `backup.no_encryption`.",
    ),
    optional(
        "backup.no_encryption",
        Kind::Bool,
        "false",
        "Store the WAL unencrypted (it holds every write, Secrets included).",
    ),
    optional(
        "backup.s3_endpoint",
        Kind::Str,
        "null",
        "S3-compatible server (`http://` or `https://`); absent: `$AWS_ENDPOINT_URL`, else AWS.",
    ),
    optional("backup.s3_region", Kind::Str, "null", "S3 region; absent: `$AWS_REGION`, else `us-east-1`."),
    optional(
        "backup.s3_credentials",
        Kind::File,
        "null",
        "File with `access_key_id = ...` and `secret_access_key = ...` (or an AWS credentials file's `[default]`); absent: `$AWS_ACCESS_KEY_ID` and `$AWS_SECRET_ACCESS_KEY`.",
    ),
    optional(
        "backup.archive_wal",
        Kind::Bool,
        "true",
        "Archive WAL continuously while `backup.destination` is set (PostgreSQL's `archive_mode = always`). The follower uploads while it streams; the leader when it is alone.",
    ),
    optional(
        "backup.spool_dir",
        Kind::Dir,
        "/var/lib/geminik8s/wal-spool",
        "Local spool PostgreSQL's `archive_command` copies finished WAL files into before the agent uploads them.",
    ),
    optional(
        "backup.spool_limit_mb",
        Kind::Int { min: 64, max: 1048576 },
        "1024",
        "Bound of the spool in MiB. When the destination is unreachable long enough to fill it, further WAL is not archived (the cluster keeps serving) and `status` shows the point-in-time recovery gap until the next full backup.",
    ),
    optional(
        "backup.archive_timeout",
        Kind::Duration,
        "1m",
        "PostgreSQL's `archive_timeout`: a WAL file is finished, so archived, at least this often (the most a point-in-time recovery can lose on a quiet cluster).",
    ),
    optional(
        "backup.schedule",
        Kind::Str,
        "0 */12 * * *",
        "When the agent takes full backups into `backup.destination`: a cron expression (minute hour day month weekday, UTC), as K3s's `etcd-snapshot-schedule-cron`; `off` takes none. The streaming follower takes them, the leader when it is alone.",
    ),
    optional(
        "backup.retention",
        Kind::Int { min: 1, max: 1000 },
        "5",
        "How many full backups are kept after each scheduled one (the newest; older ones and the archived WAL only they could use are removed).",
    ),
    section("kine", "Kine, the etcd API over PostgreSQL."),
    optional(
        "kine.listen",
        Kind::SocketAddr,
        "127.0.0.1:2379",
        "Address Kine's etcd endpoint listens on; K3s on this node connects here.",
    ),
    optional("kine.compaction_interval", Kind::Duration, "5m", "How often Kine compacts old revisions."),
    section("k3s", "K3s server on this node."),
    optional(
        "k3s.enabled",
        Kind::Bool,
        "true",
        "Start K3s. `false` runs only PostgreSQL and Kine (datastore-only nodes, labs without K3s).",
    ),
    optional(
        "k3s.extra_args",
        Kind::StrList,
        "[]",
        "Extra `k3s server` arguments. The datastore, token, node IP, data directory and kubeconfig flags are managed and may not appear here.",
    ),
    optional(
        "k3s.data_dir",
        Kind::Dir,
        "/var/lib/rancher/k3s",
        "K3s's state (`--data-dir`); the agent reads K3s's server certificates from `server/tls` below it.",
    ),
    optional(
        "k3s.config_dir",
        Kind::Dir,
        "/etc/rancher/k3s",
        "Where K3s writes its kubeconfig (`k3s.yaml`, `--write-kubeconfig`) and the agent writes `geminik8s.yaml`, the kubeconfig for the VIP.",
    ),
    required("k3s.token", Kind::Secret, "K3s server token shared by both nodes."),
    section("health", "Heartbeats, health checks and fencing."),
    optional("health.interval", Kind::Duration, "500ms", "Heartbeat and health-check interval."),
    optional(
        "health.failure_threshold",
        Kind::Int { min: 1, max: 100 },
        "3",
        "Missed heartbeats (or failed checks) before the peer (or a service) counts as failed.",
    ),
    optional(
        "health.fence_timeout",
        Kind::Duration,
        "2s",
        "A leader that reaches neither peer nor witness for this long fences itself. The follower waits this plus a margin before promoting.",
    ),
    section("health.checks", "Health levels from the design: network, Kubernetes API, PostgreSQL, custom script."),
    optional(
        "health.checks.network",
        Kind::Bool,
        "true",
        "Confirm missed heartbeats over the peer's PostgreSQL and API ports (false: heartbeats alone decide).",
    ),
    optional(
        "health.checks.kubernetes_api",
        Kind::Bool,
        "true",
        "Check the local K3s `/readyz` (ignored when `k3s.enabled` is false).",
    ),
    optional("health.checks.postgres", Kind::Bool, "true", "Run `SELECT 1` on the local PostgreSQL."),
    optional("health.checks.script", Kind::File, "null", "Custom check: an executable; exit 0 means healthy."),
    optional("health.checks.script_timeout", Kind::Duration, "5s", "Time limit of the custom check."),
    section(
        "tls",
        "Mutual TLS between the agents and with the witness, and TLS for PostgreSQL (replication, Kine) (`gemin_k8s init` generates all three).",
    ),
    required(
        "tls.ca",
        Kind::Pem,
        "CA certificate that every certificate of the cluster is signed by; PostgreSQL clients (the peer, Kine) verify the server against it.",
    ),
    required(
        "tls.cert",
        Kind::Pem,
        "This node's certificate (client and server; its common name is `node.name`, its addresses the node's IP and the VIP). PostgreSQL serves it too.",
    ),
    required("tls.key", Kind::Pem, "This node's private key. Only this node's file holds it."),
    optional(
        "tls.crl",
        Kind::Pem,
        "null",
        "Certificates the cluster CA revoked (a PEM certificate revocation list, written by `gemin_k8s replace-node`): the agent refuses them from any caller and as its peer. `null`: none revoked.",
    ),
];

/// Doc of the Kairos `hostname:` key, which geminik8s applies itself.
pub const HOSTNAME_DOC: &str = "The node's hostname (`gemin_k8s config apply` writes `/etc/hostname`, maps `127.0.1.1` to it in `/etc/hosts` and sets the kernel hostname). Letters, digits, `-` and `.`, at most 64 characters; Kairos templates (`{{ ... }}`) are not expanded. Absent: `geminik8s.node.name`.";

/// The keys of one entry of the Kairos `users:` list that geminik8s applies
/// (`gemin_k8s config apply`, at every boot). `path` is the key inside the entry.
pub const USER_KEYS: &[Key] = &[
    required(
        "name",
        Kind::Str,
        "Login name: lowercase letters, digits, `_` and `-`, starting with a letter or `_`, at most 32 characters. An existing user (`root` too) is updated.",
    ),
    optional(
        "passwd",
        Kind::Str,
        "null",
        "Password: plain text (stored as a SHA-512 crypt hash) or a crypt hash starting with `$` (used as is). Absent: the password is left alone (new users get none: key login only).",
    ),
    optional(
        "lock_passwd",
        Kind::Bool,
        "false",
        "Lock the password (`usermod -L`): password login is refused, SSH keys still work.",
    ),
    optional(
        "ssh_authorized_keys",
        Kind::StrList,
        "[]",
        "Public keys written to `~/.ssh/authorized_keys` (the file then holds exactly these). `github:USER` and `gitlab:USER` fetch that account's keys. Empty: the file is left alone.",
    ),
    optional(
        "groups",
        Kind::StrList,
        "[]",
        "Supplementary groups; missing groups are created. Memberships are added, never removed.",
    ),
    optional(
        "primary_group",
        Kind::Str,
        "null",
        "Primary group (created if missing). Absent: a group named after the user.",
    ),
    optional(
        "shell",
        Kind::File,
        "null",
        "Login shell. Absent: the system default for new users (`/etc/default/useradd`).",
    ),
    optional("homedir", Kind::Dir, "null", "Home directory. Absent: `/home/NAME` for new users."),
    optional(
        "uid",
        Kind::Int { min: 0, max: 4_294_967_294 },
        "null",
        "Numeric user ID. Absent: the next free one for new users.",
    ),
];

/// Encodings of `write_files[].content` (cloud-init's names).
pub const FILE_ENCODINGS: &[&str] =
    &["text/plain", "b64", "base64", "gz", "gzip", "gz+b64", "gz+base64", "gzip+b64", "gzip+base64"];

/// The keys of one entry of the Kairos `write_files:` list that geminik8s
/// applies (`gemin_k8s config apply`, at every boot). `path` is the key inside the entry.
pub const WRITE_FILE_KEYS: &[Key] = &[
    required(
        "path",
        Kind::File,
        "Absolute path of the file on the node (no `..`). Missing parent directories are created (0755, root-owned).",
    ),
    optional("content", Kind::Str, "\"\"", "The file's contents, decoded as `encoding` says."),
    optional(
        "encoding",
        Kind::Enum(FILE_ENCODINGS),
        "text/plain",
        "How `content` is encoded: `b64`/`base64`, `gz`/`gzip` (gzip bytes, e.g. with `!!binary`), `gz+b64`/`gzip+base64` (base64 of gzip).",
    ),
    optional(
        "permissions",
        Kind::Str,
        "\"0644\"",
        "Mode as a quoted octal string, e.g. `\"0600\"` (unquoted `0644` is the decimal number 644 in YAML 1.2).",
    ),
    optional(
        "owner",
        Kind::Str,
        "root:root",
        "`USER:GROUP` (or `USER`, group `root`), names or numeric IDs, looked up in the node's `/etc/passwd` and `/etc/group` when the file is written.",
    ),
    optional(
        "append",
        Kind::Bool,
        "false",
        "Append `content` to the file instead of replacing it; skipped when the file already ends with it, so runs at every boot append once.",
    ),
    optional(
        "defer",
        Kind::Bool,
        "false",
        "Write the file after `users:` are applied, so `owner` can name a user created there.",
    ),
];

pub fn key(path: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.path == path)
}

/// Names of the keys directly under `parent` ("" for the top of the block).
pub fn children(parent: &str) -> Vec<&'static str> {
    KEYS.iter()
        .filter_map(|k| match k.path.rsplit_once('.') {
            Some((p, name)) if p == parent => Some(name),
            None if parent.is_empty() => Some(k.path),
            _ => None,
        })
        .collect()
}

/// Kairos keys geminik8s knows about; other top-level keys are kept but
/// reported as warnings, since a typo there is silently ignored by Kairos too.
pub const KAIROS_KEYS: &[&str] = &[
    "hostname",
    "users",
    "write_files",
    "runcmd",
    "bootcmd",
    "stages",
    "k3s",
    "k3s-agent",
    "install",
    "bind_mounts",
    "ephemeral_mounts",
    "name",
    "ssh_authorized_keys",
    "kairos",
    "p2p",
    "reset",
    "upgrade",
    "bundles",
    "debug",
    "strict",
    "fail_on_bundles_errors",
    "config_url",
    "options",
    "env",
    "environment_file",
    "growpart",
    "timesyncd",
    "dns",
    "modules",
    "sysctl",
    "systemctl",
    "layout",
    "files",
    "directories",
    "ensure_entities",
    "delete_entities",
    "datasource",
    "git",
    "unpack_images",
    "commands",
    "if",
    "only_os",
    "only_arch",
    "only_service_manager",
    "environment",
    "entities",
    "downloads",
    "cloud-init-paths",
    "pre-install",
    "post-install",
];

/// The reference page `docs/cloud-config.md`, rendered from [`KEYS`].
pub fn reference_markdown() -> String {
    let mut out = String::from(
        "# Cloud-config reference\n\n\
         <!-- Generated from agent/src/config/schema.rs by `just docs`; a test fails when this file drifts. -->\n\n\
         geminik8s reads Kairos-compatible `#cloud-config` YAML. Kairos keys (`hostname`, `users`,\n\
         `write_files`, `runcmd`, `stages`, `k3s`, `install`, `bind_mounts`, ...) are accepted and kept;\n\
         geminik8s's own settings live under `geminik8s:`. An unknown key inside `geminik8s:` is an\n\
         error (with the closest known key suggested); an unknown top-level key is a warning.\n\n\
         ## Sources\n\n\
         The agent merges, in this order (later wins; mappings merge key by key, lists are replaced):\n\n\
         1. `*.yaml` / `*.yml` files in `/oem`, in name order;\n\
         2. `*.yaml` / `*.yml` files in `/var/lib/geminik8s/cloud-config`, in name order: where an\n\
            \x20  unconfigured node keeps the configuration `gemin_k8s deploy` sent it (below);\n\
         3. `*.yaml` / `*.yml` files in `/etc/geminik8s`, in name order;\n\
         4. `user-data` on a NoCloud volume labelled `CIDATA` (or `cidata`), which the image's initramfs\n\
            \x20  mounts read-only at `/run/geminik8s-boot/cidata`;\n\
         5. the URL given as `geminik8s.config_url=` on the kernel command line (10 s timeout, 3 tries).\n\n\
         Every source must start with the line `#cloud-config`; files in the three directories that do\n\
         not are skipped with a warning. Check files before flashing them with\n\
         `gemin_k8s config validate FILE...`, which merges and validates them exactly as the agent does.\n\n\
         ## Unconfigured nodes (enrolment)\n\n\
         Sources without `geminik8s.node` but with a top-level `geminik8s_enrolment:` block make the agent\n\
         wait for its configuration instead of failing: it serves HTTPS on `listen` (default\n\
         `0.0.0.0:7444`) with a self-signed certificate whose fingerprint it logs, and takes exactly one\n\
         node configuration from `gemin_k8s deploy` that knows the site token, which it writes to\n\
         `config_dir` (default `/var/lib/geminik8s/cloud-config`) as `90_geminik8s.yaml`, then starts as\n\
         that node. `gemin_k8s init` writes the block as `enrolment.yaml`:\n\n\
         ```yaml\n\
         #cloud-config\n\
         geminik8s_enrolment:\n\
         \x20 token: ...            # or token_file: FILE (its first line); at least 16 characters\n\
         \x20 listen: 0.0.0.0:7444\n\
         \x20 config_dir: /var/lib/geminik8s/cloud-config\n\
         ```\n\n\
         See docs/operations.md, \"Provisioning a site\".\n\n\
         ## Checks beyond types\n\n\
         - `node.ip` and `peer.ip` differ; `cluster.vip` differs from both and all three share the `cluster.vip_prefix` subnet;\n\
         - `node.name` and `peer.name` differ; `cluster.bootstrap_leader` is one of them;\n\
         - `cluster.witness.targets` is non-empty for `gateway` and is exactly one `IP:PORT` for `arbiter`;\n\
         - `health.fence_timeout` is longer than `health.interval`; `lease_renew` is shorter than `lease_ttl`, which is longer than `health.fence_timeout`;\n\
         - files named by `health.checks.script` and by `tls.*` paths exist on the node (or are written by this cloud-config's `write_files`);\n\
         - `k3s.extra_args` does not set the flags geminik8s manages.\n\n\
         ## Kairos keys applied by geminik8s\n\n\
         Other Kairos keys are kept for Kairos tooling but not acted on. These three are applied by\n\
         `gemin_k8s config apply` (`geminik8s-setup.service`, at every boot, before systemd-networkd,\n\
         the agent and SSH start; `/etc` is reset at boot, so it runs each time and gives the same result\n\
         each time), in this order: `hostname`, `write_files` (entries without `defer`), `users`,\n\
         `write_files` entries with `defer: true`. All are validated with the rest of the file.\n\
         A box of the generic image waiting for enrolment (no `geminik8s.node`, a `geminik8s_enrolment`\n\
         block) gets them too, so that its address, users and keys are there for `gemin_k8s deploy`;\n\
         those of the configuration `deploy` sends apply from the next boot.\n\n",
    );
    out.push_str(&format!("### `hostname`\n\n{HOSTNAME_DOC}\n\n"));
    out.push_str(
        "### `users`\n\n\
         A list of users, created or updated with the shadow tools (`useradd`, `usermod`, `chpasswd`).\n\n\
         ```yaml\n\
         users:\n\
         - name: ops\n\
         \x20 passwd: \"$6$...\"          # or plain text\n\
         \x20 groups: [sudo]\n\
         \x20 ssh_authorized_keys:\n\
         \x20 - ssh-ed25519 AAAA... ops@site\n\
         \x20 - github:octocat\n\
         ```\n\n\
         | key | type | default | description |\n|---|---|---|---|\n",
    );
    for key in USER_KEYS {
        out.push_str(&key_row(key));
    }
    out.push_str(
        "\n### `write_files`\n\n\
         A list of files written into the node's root filesystem, e.g. a static address for\n\
         systemd-networkd. Each file is written atomically and only when its contents, mode or owner\n\
         differ. Since the setup unit runs before systemd-networkd, `.network` files are in place\n\
         when networkd starts; when `gemin_k8s config apply` is run by hand on a running node and\n\
         changes a file under `/etc/systemd/network`, it runs `networkctl reload`.\n\n\
         ```yaml\n\
         write_files:\n\
         - path: /etc/systemd/network/10-lab.network\n\
         \x20 permissions: \"0644\"\n\
         \x20 owner: root:root\n\
         \x20 content: |\n\
         \x20   [Match]\n\
         \x20   MACAddress=52:54:00:77:00:11\n\
         \x20   [Network]\n\
         \x20   Address=10.77.0.11/24\n\
         ```\n\n\
         | key | type | default | description |\n|---|---|---|---|\n",
    );
    for key in WRITE_FILE_KEYS {
        out.push_str(&key_row(key));
    }
    out.push_str("\n## Keys under `geminik8s:`\n");
    for key in KEYS {
        if key.kind == Kind::Section {
            out.push_str(&format!("\n### `{}`\n\n{}\n\n", key.path, key.doc));
            out.push_str("| key | type | default | description |\n|---|---|---|---|\n");
            continue;
        }
        out.push_str(&key_row(key));
    }
    out
}

fn key_row(key: &Key) -> String {
    let default = match (key.required, key.default) {
        (true, _) => "**required**".to_string(),
        (false, Some(d)) => format!("`{d}`"),
        (false, None) => String::new(),
    };
    format!("| `{}` | {} | {} | {} |\n", key.path, key.kind.describe(), default, key.doc)
}
