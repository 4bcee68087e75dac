//! Unsolicited neighbour advertisements: the IPv6 counterpart of gratuitous
//! ARP (RFC 4861 section 7.2.6). Hosts that have a neighbour entry for the
//! address replace its MAC because the override flag is set.
//!
//! Sent from a raw ICMPv6 socket bound to the address itself; the kernel
//! fills in the ICMPv6 checksum.

use std::io;
use std::net::{Ipv6Addr, SocketAddrV6};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const NEIGHBOR_ADVERTISEMENT: u8 = 136;
const FLAG_OVERRIDE: u8 = 0x20;
const OPT_TARGET_LINK_ADDR: u8 = 2;
/// RFC 4861: receivers drop neighbour discovery packets with any other hop limit.
const HOP_LIMIT: u32 = 255;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The ICMPv6 message (checksum left zero for the kernel): an unsolicited
/// advertisement for `target` with the override flag and the target
/// link-layer address option carrying `mac`.
pub fn advertisement(target: Ipv6Addr, mac: [u8; 6]) -> Vec<u8> {
    let mut m = Vec::with_capacity(32);
    m.extend_from_slice(&[NEIGHBOR_ADVERTISEMENT, 0, 0, 0]);
    m.extend_from_slice(&[FLAG_OVERRIDE, 0, 0, 0]);
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&[OPT_TARGET_LINK_ADDR, 1]);
    m.extend_from_slice(&mac);
    m
}

/// A raw ICMPv6 socket that advertises one address to all nodes on one link.
#[derive(Debug)]
pub struct Announcer {
    socket: Socket,
    to: SockAddr,
    message: Vec<u8>,
}

impl Announcer {
    /// Open the socket in the calling thread's network namespace. `target`
    /// must already be on the interface (it is the source address). Needs
    /// CAP_NET_RAW.
    pub fn open(ifindex: u32, target: Ipv6Addr, mac: [u8; 6]) -> io::Result<Announcer> {
        let socket = Socket::new(Domain::IPV6, Type::RAW.nonblocking().cloexec(), Some(Protocol::ICMPV6))?;
        socket.set_multicast_if_v6(ifindex)?;
        socket.set_multicast_hops_v6(HOP_LIMIT)?;
        socket.set_unicast_hops_v6(HOP_LIMIT)?;
        socket.set_multicast_loop_v6(false)?;
        socket.bind(&SockAddr::from(SocketAddrV6::new(target, 0, 0, 0)))?;
        let to = SockAddr::from(SocketAddrV6::new(ALL_NODES, 0, 0, ifindex));
        Ok(Announcer { socket, to, message: advertisement(target, mac) })
    }

    /// Send one advertisement.
    pub fn send(&self) -> io::Result<()> {
        self.socket.send_to(&self.message, &self.to).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_is_unsolicited_with_override_and_target_link_address() {
        let target: Ipv6Addr = "fd00::10".parse().unwrap();
        let mac = [0x02, 0, 0, 0, 0, 0x0a];
        let m = advertisement(target, mac);
        assert_eq!(m.len(), 32);
        assert_eq!(&m[0..4], &[136, 0, 0, 0], "type 136, code 0, checksum left to the kernel");
        assert_eq!(m[4], 0x20, "override set, solicited and router clear");
        assert_eq!(&m[8..24], &target.octets());
        assert_eq!(&m[24..26], &[2, 1], "target link-layer address option, 8 bytes");
        assert_eq!(&m[26..32], &mac);
    }
}
