//! Gratuitous ARP: tells every host on the link that an IPv4 address now
//! lives at this interface's MAC, so their neighbour entries move at once
//! instead of when they expire.
//!
//! Frames go out through an `AF_PACKET` raw socket. The link-layer address
//! the socket sends to is the interface's own `sockaddr_ll` as `getifaddrs`
//! reports it (it carries the interface index), so no `sockaddr_ll` is built
//! by hand and no `unsafe` is needed. The socket's protocol is 0: it sends,
//! and never receives.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARPHRD_ETHER: u16 = 1;
const ARPOP_REQUEST: u16 = 1;
const ARPOP_REPLY: u16 = 2;
const BROADCAST: [u8; 6] = [0xff; 6];
/// Shortest Ethernet frame without the FCS; shorter frames are padded.
const MIN_FRAME: usize = 60;

/// The two forms of gratuitous ARP. Hosts differ in which one they honour
/// (Linux takes both for an existing entry), so both are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// ARP request with sender = target = the address, target MAC zero (RFC 5227 announcement).
    Request,
    /// ARP reply with sender = target = the address and target MAC = sender MAC.
    Reply,
}

/// One broadcast Ethernet frame carrying a gratuitous ARP for `ip` at `mac`.
pub fn frame(form: Form, mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let (op, target_mac) = match form {
        Form::Request => (ARPOP_REQUEST, [0u8; 6]),
        Form::Reply => (ARPOP_REPLY, mac),
    };
    let mut f = Vec::with_capacity(MIN_FRAME);
    // Ethernet header.
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    // ARP for IPv4 over Ethernet.
    f.extend_from_slice(&ARPHRD_ETHER.to_be_bytes());
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    f.push(6);
    f.push(4);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&ip.octets());
    f.resize(MIN_FRAME, 0);
    f
}

/// A raw link-layer socket that sends gratuitous ARP for one address out of
/// one interface.
#[derive(Debug)]
pub struct Announcer {
    fd: OwnedFd,
    link: LinkAddr,
    frames: [Vec<u8>; 2],
}

impl Announcer {
    /// Open the socket for interface `ifindex` in the calling thread's network
    /// namespace. Needs CAP_NET_RAW.
    pub fn open(ifindex: u32, ip: Ipv4Addr) -> io::Result<Announcer> {
        let link = link_addr(ifindex)?;
        let mac = link.addr().filter(|_| link.halen() == 6).ok_or_else(|| {
            io::Error::new(io::ErrorKind::Unsupported, format!("interface {ifindex} has no Ethernet address"))
        })?;
        let fd = nix::sys::socket::socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        Ok(Announcer { fd, link, frames: [frame(Form::Request, mac, ip), frame(Form::Reply, mac, ip)] })
    }

    /// Send one announcement: the request form, then the reply form.
    pub fn send(&self) -> io::Result<()> {
        for f in &self.frames {
            nix::sys::socket::sendto(self.fd.as_raw_fd(), f, &self.link, MsgFlags::empty())?;
        }
        Ok(())
    }
}

/// The interface's own `AF_PACKET` address (index, hardware type, MAC).
fn link_addr(ifindex: u32) -> io::Result<LinkAddr> {
    nix::ifaddrs::getifaddrs()?
        .filter_map(|a| a.address.and_then(|s| s.as_link_addr().copied()))
        .find(|l| l.ifindex() == ifindex as usize)
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no link-layer address for interface {ifindex}"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);

    #[test]
    fn request_form_is_a_broadcast_announcement_with_zero_target_mac() {
        let f = frame(Form::Request, MAC, IP);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &BROADCAST);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..22], &[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        assert_eq!(&f[22..28], &MAC, "sender MAC");
        assert_eq!(&f[28..32], &[10, 0, 0, 10], "sender IP");
        assert_eq!(&f[32..38], &[0; 6], "target MAC");
        assert_eq!(&f[38..42], &[10, 0, 0, 10], "target IP");
        assert!(f[42..].iter().all(|&b| b == 0), "padding");
    }

    #[test]
    fn reply_form_repeats_the_sender_mac_as_target() {
        // Linux only treats a reply as gratuitous when target MAC == sender MAC.
        let f = frame(Form::Reply, MAC, IP);
        assert_eq!(&f[20..22], &[0, 2]);
        assert_eq!(&f[22..28], &MAC);
        assert_eq!(&f[32..38], &MAC);
        assert_eq!(&f[28..32], &f[38..42]);
    }
}
