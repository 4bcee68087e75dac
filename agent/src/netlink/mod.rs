//! The virtual IP: added to and removed from an interface through rtnetlink,
//! announced with gratuitous ARP (IPv4) or unsolicited neighbour
//! advertisements (IPv6) so that clients' neighbour entries move to this
//! node's MAC at once.
//!
//! [`Vip`] is what the agent calls; [`NetlinkVip`] is the implementation for
//! a real host. Every netlink and packet socket is opened in the network
//! namespace of the thread that runs the call, which is how the labs run one
//! VIP per namespace in one process.

mod addr;
pub mod garp;
pub mod ndisc;
pub mod refuse;

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::config::GeminiConfig;
use addr::{Link, Netlink};

/// The future every [`Vip`] method returns. Boxed so that the trait is
/// object safe: the agent holds an `Arc<dyn Vip>`.
pub type VipFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, VipError>> + Send + 'a>>;

/// Holding and letting go of the cluster's virtual IP.
pub trait Vip: Send + Sync {
    /// Add the address (already there is fine), then announce it: one burst
    /// at once, repeats in the background until [`Vip::release`] or the next
    /// `take`.
    fn take(&self) -> VipFuture<'_, ()>;
    /// Stop announcing and remove the address (already gone is fine). Sends
    /// nothing. When it returns, this node no longer answers for the VIP.
    fn release(&self) -> VipFuture<'_, ()>;
    /// Whether the address is assigned on this host now (on any interface).
    fn held(&self) -> VipFuture<'_, bool>;
    /// Whether another machine answers for the address on the VIP's link
    /// within `timeout` (ARP for IPv4; always `false` for IPv6, which has no
    /// probe here yet).
    fn held_elsewhere(&self, timeout: Duration) -> VipFuture<'_, bool>;
}

#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("opening a route netlink socket")]
    Netlink(#[source] io::Error),
    #[error("asking the kernel for {what}")]
    Query {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface `{name}` does not exist; check `cluster.interface`")]
    NoSuchInterface { name: String },
    #[error(
        "no interface holds {ip}, this node's address, so the VIP has nowhere to go; bring that address up or set `cluster.interface`"
    )]
    NoInterfaceHolds { ip: IpAddr },
    #[error("adding {vip}/{prefix} to {interface}")]
    Add {
        vip: IpAddr,
        prefix: u8,
        interface: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("removing {vip} from interface index {ifindex}")]
    Remove {
        vip: IpAddr,
        ifindex: u32,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("asking {interface} who answers for {vip}")]
    Probe {
        vip: IpAddr,
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{vip} is on {interface} but announcing it failed; clients keep the old MAC until their neighbour entries expire (take again to retry)"
    )]
    Announce {
        vip: IpAddr,
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "not taking {vip}: the nftables rule that refuses it on this node (table netdev {table}) could not be removed, and would reset every connection to it",
        table = refuse::TABLE
    )]
    Unrefuse {
        vip: IpAddr,
        #[source]
        source: crate::cmd::CmdError,
    },
}

/// Which interface the VIP goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceChoice {
    /// This interface, by name.
    Named(String),
    /// Whichever interface holds this address (the node's own IP), looked up
    /// at every `take`.
    Holding(IpAddr),
}

/// How a taken VIP is announced. For IPv4 one announcement is an ARP request
/// and an ARP reply; for IPv6 one neighbour advertisement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    /// Announcements sent at once, before `take` returns.
    pub burst: u32,
    /// Gap between the repeats that follow the burst.
    pub repeat_every: Duration,
    /// How long the repeats go on (`repeat_for / repeat_every` repeats).
    pub repeat_for: Duration,
}

impl Default for Announce {
    fn default() -> Self {
        Announce { burst: 3, repeat_every: Duration::from_secs(1), repeat_for: Duration::from_secs(5) }
    }
}

impl Announce {
    fn repeats(&self) -> u32 {
        if self.repeat_every.is_zero() {
            return 0;
        }
        u32::try_from(self.repeat_for.as_nanos() / self.repeat_every.as_nanos()).unwrap_or(u32::MAX)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipSettings {
    pub address: IpAddr,
    pub prefix: u8,
    pub interface: InterfaceChoice,
    pub announce: Announce,
}

impl VipSettings {
    /// `cluster.vip/vip_prefix` on `cluster.interface`, or on the interface
    /// that holds `node.ip` when that is null; default announcements.
    pub fn from_config(config: &GeminiConfig) -> VipSettings {
        VipSettings {
            address: config.cluster.vip,
            prefix: config.cluster.vip_prefix,
            interface: match &config.cluster.interface {
                Some(name) => InterfaceChoice::Named(name.clone()),
                None => InterfaceChoice::Holding(config.node.ip),
            },
            announce: Announce::default(),
        }
    }
}

/// The VIP on this host, through rtnetlink and raw sockets. Needs
/// CAP_NET_ADMIN and CAP_NET_RAW.
///
/// Calls are serialised: a `release` waits for a `take` in progress (which
/// only sends a few packets) and then stops its repeats, so nothing is
/// announced once `release` has returned.
#[derive(Debug)]
pub struct NetlinkVip {
    settings: VipSettings,
    repeats: Mutex<Option<JoinHandle<()>>>,
}

impl NetlinkVip {
    /// Opens nothing yet: sockets are opened by each call, in the calling
    /// thread's network namespace.
    pub fn new(settings: VipSettings) -> NetlinkVip {
        NetlinkVip { settings, repeats: Mutex::new(None) }
    }

    pub fn settings(&self) -> &VipSettings {
        &self.settings
    }

    async fn take_now(&self) -> Result<(), VipError> {
        let mut repeats = self.repeats.lock().await;
        stop(repeats.take()).await;
        let VipSettings { address: vip, prefix, .. } = self.settings;
        let netlink = Netlink::connect().map_err(VipError::Netlink)?;
        let link = self.resolve(&netlink).await?;
        refuse::lift().await.map_err(|source| VipError::Unrefuse { vip, source })?;
        let added = netlink.add(link.index, vip, prefix).await.map_err(|source| VipError::Add {
            vip,
            prefix,
            interface: link.name.clone(),
            source,
        })?;
        drop(netlink);

        let announce_error = |source| VipError::Announce { vip, interface: link.name.clone(), source };
        let announcer = Announcer::open(&link, vip).map_err(announce_error)?;
        if let Some(announcer) = &announcer {
            for _ in 0..self.settings.announce.burst {
                announcer.send().map_err(announce_error)?;
            }
        }
        tracing::info!(
            event = "vip_taken",
            vip = %vip,
            prefix,
            interface = %link.name,
            newly_added = added,
            announced = announcer.is_some(),
            "VIP {vip}/{prefix} on {}", link.name
        );
        if let Some(announcer) = announcer {
            *repeats = Some(tokio::spawn(repeat(announcer, self.settings.announce.clone(), vip, link.name)));
        }
        Ok(())
    }

    async fn release_now(&self) -> Result<(), VipError> {
        let mut repeats = self.repeats.lock().await;
        stop(repeats.take()).await;
        let vip = self.settings.address;
        let netlink = Netlink::connect().map_err(VipError::Netlink)?;
        let assigned = netlink.addresses_of(vip).await.map_err(|source| query(format!("addresses {vip}"), source))?;
        if !assigned.is_empty() {
            // While the address is still here: the kernel routes the resets
            // only from an address of its own.
            reset_connections(vip).await;
        }
        let mut removed_from = Vec::new();
        for address in assigned {
            let ifindex = address.header.index;
            if netlink.delete(address).await.map_err(|source| VipError::Remove { vip, ifindex, source })? {
                removed_from.push(ifindex);
            }
        }
        // Names only for the log, after the address is gone.
        let mut interfaces = Vec::new();
        for ifindex in &removed_from {
            match netlink.link_by_index(*ifindex).await {
                Ok(Some(link)) => interfaces.push(link.name),
                _ => interfaces.push(format!("index {ifindex}")),
            }
        }
        // Clients that still send here get a reset instead of silence.
        match self.resolve(&netlink).await {
            Ok(link) => refuse::refuse(&link.name, vip).await,
            Err(e) => tracing::warn!(vip = %vip, error = %e, "no interface to refuse the VIP on"),
        }
        tracing::info!(
            event = "vip_released",
            vip = %vip,
            interface = %interfaces.join(","),
            was_held = !removed_from.is_empty(),
            "VIP {vip} released"
        );
        Ok(())
    }

    async fn held_now(&self) -> Result<bool, VipError> {
        let vip = self.settings.address;
        let netlink = Netlink::connect().map_err(VipError::Netlink)?;
        let assigned = netlink.addresses_of(vip).await.map_err(|source| query(format!("addresses {vip}"), source))?;
        Ok(!assigned.is_empty())
    }

    async fn held_elsewhere_now(&self, timeout: Duration) -> Result<bool, VipError> {
        let IpAddr::V4(vip) = self.settings.address else { return Ok(false) };
        let netlink = Netlink::connect().map_err(VipError::Netlink)?;
        let link = self.resolve(&netlink).await?;
        drop(netlink);
        garp::held_elsewhere(link.index, vip, timeout).await.map_err(|source| VipError::Probe {
            vip: self.settings.address,
            interface: link.name,
            source,
        })
    }

    async fn resolve(&self, netlink: &Netlink) -> Result<Link, VipError> {
        match &self.settings.interface {
            InterfaceChoice::Named(name) => netlink
                .link_by_name(name)
                .await
                .map_err(|source| query(format!("interface {name}"), source))?
                .ok_or_else(|| VipError::NoSuchInterface { name: name.clone() }),
            InterfaceChoice::Holding(ip) => {
                let ip = *ip;
                let holders =
                    netlink.addresses_of(ip).await.map_err(|source| query(format!("addresses {ip}"), source))?;
                let ifindex = holders.first().map(|a| a.header.index).ok_or(VipError::NoInterfaceHolds { ip })?;
                netlink
                    .link_by_index(ifindex)
                    .await
                    .map_err(|source| query(format!("interface index {ifindex}"), source))?
                    .ok_or(VipError::NoInterfaceHolds { ip })
            }
        }
    }
}

impl Vip for NetlinkVip {
    fn take(&self) -> VipFuture<'_, ()> {
        Box::pin(self.take_now())
    }

    fn release(&self) -> VipFuture<'_, ()> {
        Box::pin(self.release_now())
    }

    fn held(&self) -> VipFuture<'_, bool> {
        Box::pin(self.held_now())
    }

    fn held_elsewhere(&self, timeout: Duration) -> VipFuture<'_, bool> {
        Box::pin(self.held_elsewhere_now(timeout))
    }
}

impl Drop for NetlinkVip {
    fn drop(&mut self) {
        if let Some(task) = self.repeats.get_mut().take() {
            task.abort();
        }
    }
}

/// How long releasing the VIP waits for [`reset_connections`]: the release
/// of a fencing leader must not wait on it.
const RESET_TIMEOUT: Duration = Duration::from_millis(300);

/// Reset the TCP connections this host has on `vip` (`ss -K`, the kernel's
/// SOCK_DESTROY, which sends each peer an RST): once the address is gone
/// their packets would be dropped in silence, and their clients (a kubectl
/// watch, a Kine on the other node, an etcd client) would wait out their own
/// timeouts. With the reset they reconnect at once, to the VIP's next holder.
async fn reset_connections(vip: IpAddr) {
    let address = match vip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let ss = crate::cmd::Tool::new("ss").args(["-K", "-t", "-n", "-H", "src", &address]).timeout(RESET_TIMEOUT);
    match ss.run().await {
        Ok(out) => {
            let reset = out.stdout.lines().filter(|l| !l.trim().is_empty()).count();
            tracing::info!(event = "vip_connections_reset", vip = %vip, reset, "connections on the VIP reset");
        }
        Err(e) => {
            tracing::warn!(vip = %vip, error = %e, "resetting the connections on the VIP failed: clients of this node wait for their own timeouts")
        }
    }
}

fn query(what: String, source: rtnetlink::Error) -> VipError {
    VipError::Query { what, source }
}

/// Cancel the repeats and wait until the task has really stopped.
async fn stop(task: Option<JoinHandle<()>>) {
    if let Some(task) = task {
        task.abort();
        if let Err(e) = task.await
            && e.is_panic()
        {
            tracing::error!(error = %e, "VIP announcement task panicked");
        }
    }
}

/// The socket announcing one address out of one interface.
#[derive(Debug)]
enum Announcer {
    Arp(garp::Announcer),
    Ndisc(ndisc::Announcer),
}

impl Announcer {
    /// `None` when the link does not use ARP / neighbour discovery with MAC
    /// addresses (nothing to announce there).
    fn open(link: &Link, vip: IpAddr) -> io::Result<Option<Announcer>> {
        let Some(mac) = link.mac else {
            tracing::info!(vip = %vip, interface = %link.name, "interface has no MAC address: VIP not announced");
            return Ok(None);
        };
        Ok(Some(match vip {
            IpAddr::V4(v4) => Announcer::Arp(garp::Announcer::open(link.index, v4)?),
            IpAddr::V6(v6) => Announcer::Ndisc(ndisc::Announcer::open(link.index, v6, mac)?),
        }))
    }

    fn send(&self) -> io::Result<()> {
        match self {
            Announcer::Arp(a) => a.send(),
            Announcer::Ndisc(a) => a.send(),
        }
    }
}

async fn repeat(announcer: Announcer, announce: Announce, vip: IpAddr, interface: String) {
    for _ in 0..announce.repeats() {
        tokio::time::sleep(announce.repeat_every).await;
        if let Err(error) = announcer.send() {
            tracing::warn!(vip = %vip, interface = %interface, error = %error, "repeating the VIP announcement failed");
        }
    }
    tracing::debug!(vip = %vip, interface = %interface, "VIP announcements done");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_announcements_are_a_burst_of_three_then_every_second_for_five_seconds() {
        let a = Announce::default();
        assert_eq!((a.burst, a.repeats(), a.repeat_every), (3, 5, Duration::from_secs(1)));
        assert_eq!(Announce { repeat_every: Duration::ZERO, ..a.clone() }.repeats(), 0);
        assert_eq!(Announce { repeat_for: Duration::ZERO, ..a }.repeats(), 0);
    }

    #[test]
    fn settings_follow_the_cloud_config() {
        let mut config = crate::config::fixture::config(serde_json::json!({"cluster": {"vip_prefix": 16}}));
        let s = VipSettings::from_config(&config);
        assert_eq!((s.address, s.prefix), ("10.77.0.10".parse().unwrap(), 16));
        assert_eq!(s.interface, InterfaceChoice::Holding("10.77.0.11".parse().unwrap()));
        config.cluster.interface = Some("eth1".into());
        assert_eq!(VipSettings::from_config(&config).interface, InterfaceChoice::Named("eth1".into()));
    }

    #[test]
    fn vip_is_object_safe() {
        let vip: std::sync::Arc<dyn Vip> = std::sync::Arc::new(NetlinkVip::new(VipSettings {
            address: "10.0.0.10".parse().unwrap(),
            prefix: 24,
            interface: InterfaceChoice::Named("eth0".into()),
            announce: Announce::default(),
        }));
        drop(vip);
    }
}
