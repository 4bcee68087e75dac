//! The rtnetlink requests the VIP needs: find an interface, list, add and
//! remove one address.

use std::io;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use nix::errno::Errno;
use rtnetlink::Handle;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};

/// A route netlink socket in the calling thread's network namespace, with
/// its connection task. Dropping it closes both.
pub(super) struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An interface as the VIP needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Link {
    pub index: u32,
    pub name: String,
    /// The MAC, for Ethernet-like links only (those that do ARP).
    pub mac: Option<[u8; 6]>,
}

impl Netlink {
    /// Must be called inside a tokio runtime: the connection runs as a task.
    pub fn connect() -> io::Result<Netlink> {
        let (connection, handle, _unsolicited) = rtnetlink::new_connection()?;
        let task = tokio::spawn(connection);
        Ok(Netlink { handle, task })
    }

    /// Every assignment of exactly `ip`, on any interface.
    pub async fn addresses_of(&self, ip: IpAddr) -> Result<Vec<AddressMessage>, rtnetlink::Error> {
        self.handle.address().get().set_address_filter(ip).execute().try_collect().await
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, rtnetlink::Error> {
        not_found_is_none(self.handle.link().get().match_name(name).execute().try_next().await)
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, rtnetlink::Error> {
        not_found_is_none(self.handle.link().get().match_index(index).execute().try_next().await)
    }

    /// Add `ip/prefix` to interface `index`. IPv6 addresses skip duplicate
    /// address detection so they are usable at once. Returns false when the
    /// address was already there.
    pub async fn add(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<bool, rtnetlink::Error> {
        let mut request = self.handle.address().add(index, ip, prefix);
        if ip.is_ipv6() {
            let message = request.message_mut();
            message.header.flags |= AddressHeaderFlags::Nodad;
            message.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match request.execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, Errno::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Remove one address as listed by [`Netlink::addresses_of`]. Returns
    /// false when it was already gone.
    pub async fn delete(&self, address: AddressMessage) -> Result<bool, rtnetlink::Error> {
        match self.handle.address().del(address).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, Errno::EADDRNOTAVAIL) || is_errno(&e, Errno::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn is_errno(e: &rtnetlink::Error, errno: Errno) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.to_io().raw_os_error() == Some(errno as i32))
}

fn not_found_is_none(found: Result<Option<LinkMessage>, rtnetlink::Error>) -> Result<Option<Link>, rtnetlink::Error> {
    match found {
        Ok(message) => Ok(message.map(|m| link(&m))),
        Err(e) if is_errno(&e, Errno::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

fn link(m: &LinkMessage) -> Link {
    let mut name = String::new();
    let mut mac = None;
    for attribute in &m.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name.clone_from(n),
            LinkAttribute::Address(a) if m.header.link_layer_type == LinkLayerType::Ether => {
                mac = <[u8; 6]>::try_from(a.as_slice()).ok();
            }
            _ => {}
        }
    }
    Link { index: m.header.index, name, mac }
}
