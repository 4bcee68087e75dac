//! A node that does not hold the VIP refuses TCP sent to it with a reset.
//!
//! Right after the VIP moves, clients still send to the old holder's MAC
//! until the new holder's gratuitous ARP (or neighbour advertisement)
//! reaches them. Without an address to deliver them to, the old holder's
//! kernel drops those packets in silence: a client that connects in that
//! window waits out TCP's first SYN retransmission (one second), longer
//! than the whole switchover. An nftables rule at the interface's ingress
//! answers them with an RST instead, so the client fails at once and its
//! retry reaches the new holder. Only packets addressed to this host's own
//! MAC are refused: frames for the real holder that a switch floods (or a
//! promiscuous interface sees) are left alone.
//!
//! The rule lives in its own table, `netdev geminik8s_vip`, replaced as a
//! whole in one nft transaction: installed after the address is removed,
//! removed before it is added. Refusing is best effort: without `nft` the
//! node only falls back to the silent drop.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::cmd::{CmdError, Tool};

/// The table this module owns.
pub const TABLE: &str = "geminik8s_vip";

/// How long one nft call may take: the release of a fencing leader runs
/// this after the address is gone and must not wait long on it.
const NFT_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether "nft is not installed" was said already (once per process).
static MISSING_SAID: AtomicBool = AtomicBool::new(false);

/// The nft script that replaces the table with one refusing TCP to `vip`
/// arriving on `interface`.
pub fn refusing(interface: &str, vip: IpAddr) -> String {
    let family = match vip {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    };
    format!(
        "{}table netdev {TABLE} {{\n\tchain refuse {{\n\t\ttype filter hook ingress device \"{interface}\" priority 0; policy accept;\n\t\tmeta pkttype host {family} daddr {vip} meta l4proto tcp reject with tcp reset\n\t}}\n}}\n",
        removing()
    )
}

/// The nft script that removes the table (absent is fine).
pub fn removing() -> String {
    format!("table netdev {TABLE} {{}}\ndelete table netdev {TABLE}\n")
}

/// Refuse TCP to `vip` on `interface` from now on. Failures are logged, not
/// returned: the VIP is already gone, which is what the caller needs.
pub async fn refuse(interface: &str, vip: IpAddr) {
    if interface.contains(['"', '\\']) {
        tracing::warn!(interface, "interface name not usable in an nft rule: the VIP is not refused here");
        return;
    }
    match nft(refusing(interface, vip)).await {
        Ok(()) => tracing::debug!(vip = %vip, interface, "TCP to the VIP is refused here"),
        Err(e) if not_installed(&e) => say_missing(),
        Err(e) => tracing::warn!(vip = %vip, interface, error = %e,
            "refusing the VIP here failed: clients that still send to this node wait for their own timeouts"),
    }
}

/// Stop refusing the VIP (before taking it). Without `nft` there can be no
/// rule; any other failure is returned, since taking the VIP with the rule
/// still in place would reset every connection to it.
pub async fn lift() -> Result<(), CmdError> {
    match nft(removing()).await {
        Err(e) if not_installed(&e) => Ok(()),
        other => other,
    }
}

async fn nft(script: String) -> Result<(), CmdError> {
    Tool::new("nft").args(["-f", "-"]).stdin(script).timeout(NFT_TIMEOUT).run().await.map(|_| ())
}

fn not_installed(e: &CmdError) -> bool {
    matches!(e, CmdError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

fn say_missing() {
    if !MISSING_SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "`nft` is not installed: a node without the VIP drops what clients still send to it instead of refusing it, so they reconnect only after their own timeouts"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_names_the_family_the_interface_and_only_this_hosts_frames() {
        let v4 = refusing("eth0", "10.0.0.10".parse().unwrap());
        assert!(v4.starts_with(&removing()), "not replaced as a whole:\n{v4}");
        assert!(v4.contains("hook ingress device \"eth0\""), "{v4}");
        assert!(v4.contains("meta pkttype host ip daddr 10.0.0.10 meta l4proto tcp reject with tcp reset"), "{v4}");
        let v6 = refusing("br0", "fd00::10".parse().unwrap());
        assert!(v6.contains("ip6 daddr fd00::10 "), "{v6}");
    }
}
