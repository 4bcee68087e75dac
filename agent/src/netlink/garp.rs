//! Gratuitous ARP: tells every host on the link that an IPv4 address now
//! lives at this interface's MAC, so their neighbour entries move at once
//! instead of when they expire.
//!
//! Frames go out through an `AF_PACKET` raw socket. The link-layer address
//! the socket sends to is the interface's own `sockaddr_ll` as `getifaddrs`
//! reports it (it carries the interface index), so no `sockaddr_ll` is built
//! by hand and no `unsafe` is needed. The announcer's socket has protocol 0:
//! it sends, and never receives.
//!
//! [`held_elsewhere`] asks the link who has an address (an ARP probe in the
//! form of duplicate address detection, RFC 5227: sender address 0.0.0.0)
//! and listens for answers from other machines.

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
    arp_frame(op, mac, ip, target_mac, ip)
}

/// A broadcast ARP probe from `mac` asking who has `ip` (sender address
/// 0.0.0.0, so no neighbour table learns anything from it).
pub fn probe_frame(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    arp_frame(ARPOP_REQUEST, mac, Ipv4Addr::UNSPECIFIED, [0; 6], ip)
}

/// The sender MAC of `frame` when it is an ARP packet (request or reply)
/// whose sender address is `ip`.
pub fn sender_of(frame: &[u8], ip: Ipv4Addr) -> Option<[u8; 6]> {
    if frame.len() < 42 || frame[12..14] != ETH_P_ARP.to_be_bytes() || frame[28..32] != ip.octets() {
        return None;
    }
    frame[22..28].try_into().ok()
}

fn arp_frame(op: u16, mac: [u8; 6], sender_ip: Ipv4Addr, target_mac: [u8; 6], target_ip: Ipv4Addr) -> Vec<u8> {
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
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&target_ip.octets());
    f.resize(MIN_FRAME, 0);
    f
}

/// Whether a machine other than this one answers for `ip` on interface
/// `ifindex` within `timeout`: two probes, the second halfway. The socket is
/// opened in the calling thread's network namespace (then waited on in a
/// blocking thread). Needs CAP_NET_RAW.
pub async fn held_elsewhere(ifindex: u32, ip: Ipv4Addr, timeout: std::time::Duration) -> io::Result<bool> {
    use socket2::{Domain, Protocol, Socket, Type};
    let link = link_addr(ifindex)?;
    let mac: [u8; 6] = link.addr().filter(|_| link.halen() == 6).ok_or_else(|| {
        io::Error::new(io::ErrorKind::Unsupported, format!("interface {ifindex} has no Ethernet address"))
    })?;
    // Receives only ARP, only from this interface once bound (the bind keeps
    // the socket's protocol since the link address carries none).
    let socket = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(i32::from(ETH_P_ARP.to_be()))))?;
    nix::sys::socket::bind(socket.as_raw_fd(), &link)?;
    tokio::task::spawn_blocking(move || {
        let probe = probe_frame(mac, ip);
        let start = std::time::Instant::now();
        let mut sent = 0;
        let mut buf = [0u8; 128];
        loop {
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                return Ok(false);
            }
            if sent < 2 && elapsed >= timeout / 2 * sent {
                nix::sys::socket::sendto(socket.as_raw_fd(), &probe, &link, MsgFlags::empty())?;
                sent += 1;
            }
            let next = if sent < 2 { timeout / 2 } else { timeout };
            let wait = next.saturating_sub(start.elapsed()).max(std::time::Duration::from_millis(1));
            socket.set_read_timeout(Some(wait))?;
            match nix::sys::socket::recv(socket.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) if sender_of(&buf[..n], ip).is_some_and(|m| m != mac) => return Ok(true),
                Ok(_) | Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io::Error::from(e)),
            }
        }
    })
    .await
    .unwrap_or_else(|join| Err(io::Error::other(format!("ARP probe task failed: {join}"))))
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
    fn probe_asks_for_the_address_from_nowhere_and_answers_are_recognised() {
        let f = probe_frame(MAC, IP);
        assert_eq!(&f[20..22], &[0, 1], "a request");
        assert_eq!(&f[28..32], &[0, 0, 0, 0], "sender IP 0.0.0.0");
        assert_eq!(&f[38..42], &[10, 0, 0, 10], "asks for the address");
        assert_eq!(sender_of(&f, IP), None, "our own probe does not claim the address");
        let other = [0x02, 0, 0, 0, 0, 9];
        let answer = frame(Form::Reply, other, IP);
        assert_eq!(sender_of(&answer, IP), Some(other));
        assert_eq!(sender_of(&answer, Ipv4Addr::new(10, 0, 0, 11)), None);
        assert_eq!(sender_of(&answer[..30], IP), None);
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
