//! PostgreSQL of one node on loopback, as the agent sets it up, for tests
//! and benchmarks that need a real server without the lab's namespaces.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use geminik8s::config::{
    Api, Cluster, Durability, GeminiConfig, Health, K3s, Kine, Member, Postgres, Replication, Tls, Witness,
};
use geminik8s::postgres::Settings;

/// A free TCP port on loopback.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The cloud-config of node `node` of cluster `cluster`, its peer `peer`,
/// both on loopback (it starts the cluster; K3s off).
pub fn loopback_config(
    cluster: &str,
    node: &str,
    peer: &str,
    replication: Replication,
    durability: Durability,
    tls: Tls,
) -> GeminiConfig {
    let lo = IpAddr::from([127, 0, 0, 1]);
    GeminiConfig {
        cluster: Cluster {
            name: cluster.into(),
            vip: lo,
            vip_prefix: 32,
            interface: None,
            bootstrap_leader: node.into(),
            witness: Witness::default(),
        },
        node: Member { name: node.into(), ip: lo, api_port: 7443 },
        peer: Member { name: peer.into(), ip: lo, api_port: 7443 },
        api: Api { token: "t".into() },
        postgres: Postgres {
            replication,
            durability,
            degrade_after: Duration::from_secs(2),
            port: 5432,
            data_dir: PathBuf::new(),
            replication_password: "repl".into(),
            kine_password: "kine".into(),
            archive_keep: 3,
        },
        kine: Kine::default(),
        k3s: K3s { enabled: false, ..K3s::with_token("t") },
        health: Health::default(),
        tls,
        backup: Default::default(),
    }
}

/// The settings of node `name` of cluster `cluster` on loopback (streaming
/// replication, async, its own certificates), its files under `dir`
/// (`data`, `postgres.log`, `sock`), on free ports.
pub fn loopback_settings(cluster: &str, name: &str, dir: &Path) -> anyhow::Result<Settings> {
    let lo = IpAddr::from([127, 0, 0, 1]);
    let pki = geminik8s::pki::generate(cluster, &[("a".into(), lo), ("b".into(), lo)], lo, None)?;
    let tls =
        Tls { ca: pki.ca.cert.clone(), cert: pki.nodes[0].cert.clone(), key: pki.nodes[0].key.clone(), crl: None };
    let cfg = loopback_config(cluster, name, "peer", Replication::Streaming, Durability::Async, tls);
    let mut s = Settings::from_config(&cfg);
    s.data_dir = dir.join("data");
    s.log_file = dir.join("postgres.log");
    s.socket_dir = dir.join("sock");
    s.listen_addresses = vec!["127.0.0.1".into()];
    s.node.port = free_port()?;
    s.peer.port = free_port()?;
    Ok(s)
}
