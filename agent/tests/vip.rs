//! The VIP in network namespaces: three nodes on one bridge. `a` and `c`
//! take turns holding the VIP; `b` plays the client whose neighbour entry must
//! follow the VIP to the new holder's MAC without sending anything itself,
//! which is what failover relies on, and whose connection to the old holder
//! is reset when it lets the VIP go.
//!
//! Needs root and `ip`; skips with a printed reason otherwise. Each test
//! creates its own uniquely named namespaces and deletes them, also when it
//! fails.

use std::future::Future;
use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use geminik8s::netlink::{Announce, InterfaceChoice, NetlinkVip, Vip, VipSettings};
use geminik8s_vm_tests::{poll, require};
use serde_json::Value;

const NEIGH_TIMEOUT: Duration = Duration::from_secs(10);
const EVERY: Duration = Duration::from_millis(50);
/// What `b` believes before the test: the VIP at a MAC nobody has, as after
/// an earlier holder.
const OLD_MAC: &str = "02:00:00:00:00:99";

/// Run `ip ARGS` and return stdout; panic with stderr on failure.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    String::from_utf8(out.stdout).expect("ip prints UTF-8")
}

fn ip_json(args: &[&str]) -> Value {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    serde_json::from_str(&ip(&all)).expect("ip -j prints JSON")
}

/// Namespaces `a`, `b`, `c`: `a` and `c` each have `eth0`, a veth whose peer
/// is a port of bridge `br0` in `b`. Deleted on drop.
struct Lab {
    a: String,
    b: String,
    c: String,
}

impl Lab {
    /// `net` picks the subnets: 10.199.NET.0/24 and fd00:199:NET::/64; the
    /// nodes are .1 (a), .2 (b), .3 (c).
    fn new(tag: &str, net: u8) -> Lab {
        let name = |n: &str| format!("gkt-vip-{}-{tag}-{n}", std::process::id());
        let lab = Lab { a: name("a"), b: name("b"), c: name("c") };
        for ns in [&lab.a, &lab.b, &lab.c] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let b = lab.b.as_str();
        ip(&["-n", b, "link", "add", "br0", "type", "bridge", "forward_delay", "0"]);
        for (ns, port, host) in [(&lab.a, "to-a", 1), (&lab.c, "to-c", 3)] {
            ip(&["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", b]);
            ip(&["-n", b, "link", "set", port, "master", "br0"]);
            ip(&["-n", b, "link", "set", port, "up"]);
            lab.address(ns, "eth0", net, host);
        }
        lab.address(b, "br0", net, 2);
        for port in ["to-a", "to-c"] {
            poll::until(&format!("{port} forwarding on br0"), NEIGH_TIMEOUT, EVERY, || {
                let link = ip_json(&["-n", b, "-d", "link", "show", "dev", port]);
                let state = link[0]["linkinfo"]["info_slave_data"]["state"].clone();
                if state == "forwarding" { Ok(()) } else { Err(state) }
            })
            .unwrap();
        }
        lab
    }

    fn address(&self, ns: &str, dev: &str, net: u8, host: u8) {
        ip(&["-n", ns, "addr", "add", &format!("10.199.{net}.{host}/24"), "dev", dev]);
        // No duplicate address detection: a tentative address cannot be used yet.
        ip(&["-n", ns, "addr", "add", &format!("fd00:199:{net}::{host}/64"), "dev", dev, "nodad"]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b, &self.c] {
            let out = Command::new("ip").args(["netns", "del", ns]).output();
            if let Ok(out) = out
                && !out.status.success()
            {
                eprintln!("ip netns del {ns}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
    }
}

fn mac(ns: &str, dev: &str) -> String {
    ip_json(&["-n", ns, "link", "show", "dev", dev])[0]["address"].as_str().expect("link has a MAC").to_string()
}

/// `address/prefix` of every address on `dev`, sorted.
fn addresses(ns: &str, dev: &str) -> Vec<String> {
    let mut all: Vec<String> = ip_json(&["-n", ns, "addr", "show", "dev", dev])[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    all.sort();
    all
}

fn address_info(ns: &str, dev: &str, addr: IpAddr) -> Option<Value> {
    let shown = ip_json(&["-n", ns, "addr", "show", "dev", dev]);
    shown[0]["addr_info"].as_array()?.iter().find(|a| a["local"].as_str() == Some(&addr.to_string())).cloned()
}

/// The MAC in `ns`'s neighbour entry for `addr` on br0, if any.
fn neighbour(ns: &str, addr: IpAddr) -> Option<String> {
    let family = if addr.is_ipv4() { "-4" } else { "-6" };
    let shown = ip_json(&["-n", ns, family, "neigh", "show", "to", &addr.to_string(), "dev", "br0"]);
    shown.as_array()?.first()?["lladdr"].as_str().map(str::to_string)
}

fn wait_for_neighbour(ns: &str, addr: IpAddr, want: &str) {
    poll::until(&format!("{ns} to see {addr} at {want}"), NEIGH_TIMEOUT, EVERY, || match neighbour(ns, addr) {
        Some(mac) if mac == want => Ok(()),
        other => Err(other),
    })
    .unwrap();
}

/// A thread inside a network namespace running a current-thread tokio
/// runtime: sockets opened by futures given to [`InNetns::run`] belong to
/// that namespace, and tasks they spawn (the VIP's repeated announcements)
/// keep running there between calls.
struct InNetns {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InNetns {
    fn enter(ns: &str) -> InNetns {
        let path = format!("/run/netns/{ns}");
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            handle_tx.send(rt.handle().clone()).expect("test thread waits for the handle");
            rt.block_on(async {
                // Err only when the sender is dropped, which also means stop.
                stopped.await.ok();
            });
        });
        let handle = handle_rx.recv().expect("namespace thread failed to start");
        InNetns { handle, stop: Some(stop), thread: Some(thread) }
    }

    fn run<T: Send + 'static>(&self, future: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move { tx.send(future.await).expect("test thread waits for the result") });
        rx.recv().expect("the task in the namespace panicked")
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
            && !std::thread::panicking()
        {
            panic!("namespace thread panicked");
        }
    }
}

fn vip(address: IpAddr, prefix: u8, interface: InterfaceChoice) -> Arc<NetlinkVip> {
    Arc::new(NetlinkVip::new(VipSettings { address, prefix, interface, announce: Announce::default() }))
}

fn take(ns: &InNetns, vip: &Arc<NetlinkVip>) {
    let vip = vip.clone();
    ns.run(async move { vip.take().await }).unwrap_or_else(|e| panic!("take: {:#}", anyhow::Error::from(e)));
}

fn release(ns: &InNetns, vip: &Arc<NetlinkVip>) {
    let vip = vip.clone();
    ns.run(async move { vip.release().await }).unwrap_or_else(|e| panic!("release: {:#}", anyhow::Error::from(e)));
}

fn held(ns: &InNetns, vip: &Arc<NetlinkVip>) -> bool {
    let vip = vip.clone();
    ns.run(async move { vip.held().await }).unwrap_or_else(|e| panic!("held: {:#}", anyhow::Error::from(e)))
}

/// A TCP connection from `client` to a listener of `server` on `vip`,
/// accepted and held open by the server.
fn connected_client(server: &InNetns, client: &InNetns, vip: IpAddr, port: u16) -> std::net::TcpStream {
    server.run(async move {
        let listener = tokio::net::TcpListener::bind((vip, port)).await.expect("listening on the VIP");
        tokio::spawn(async move {
            let (_held, _) = listener.accept().await.expect("accepting the client");
            std::future::pending::<()>().await
        });
    });
    let stream = connect(client, vip, port).expect("connecting through the VIP");
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream
}

/// Take the VIP on `a`, see `b` learn a's MAC from the announcement, release
/// it, take it on `c`, see `b` move to c's MAC.
fn moves_between_nodes(tag: &str, net: u8, vip_addr: IpAddr, prefix: u8) {
    // `b` has the addresses it needs, and no namespaces hold the VIP yet.
    let lab = Lab::new(tag, net);
    let node_a: IpAddr = if vip_addr.is_ipv4() {
        format!("10.199.{net}.1").parse().unwrap()
    } else {
        format!("fd00:199:{net}::1").parse().unwrap()
    };
    let (mac_a, mac_c) = (mac(&lab.a, "eth0"), mac(&lab.c, "eth0"));
    let before_a = addresses(&lab.a, "eth0");
    let family = if vip_addr.is_ipv4() { "-4" } else { "-6" };
    let vip_s = vip_addr.to_string();
    ip(&["-n", &lab.b, family, "neigh", "replace", &vip_s, "lladdr", OLD_MAC, "dev", "br0", "nud", "stale"]);
    assert_eq!(neighbour(&lab.b, vip_addr).as_deref(), Some(OLD_MAC));

    let in_a = InNetns::enter(&lab.a);
    let in_c = InNetns::enter(&lab.c);
    // a finds its interface through its own address, c by name.
    let on_a = vip(vip_addr, prefix, InterfaceChoice::Holding(node_a));
    let on_c = vip(vip_addr, prefix, InterfaceChoice::Named("eth0".into()));
    assert!(!held(&in_a, &on_a));

    take(&in_a, &on_a);
    take(&in_a, &on_a);
    let mut want = before_a.clone();
    want.push(format!("{vip_addr}/{prefix}"));
    want.sort();
    assert_eq!(addresses(&lab.a, "eth0"), want, "take adds the VIP once and leaves the other addresses alone");
    assert!(held(&in_a, &on_a));
    if vip_addr.is_ipv6() {
        let info = address_info(&lab.a, "eth0", vip_addr).expect("VIP on eth0");
        assert!(info.get("tentative").is_none(), "the IPv6 VIP is usable at once (no DAD): {info}");
    }
    wait_for_neighbour(&lab.b, vip_addr, &mac_a);

    // A client on `b` connected to `a` through the VIP: the release resets
    // it instead of leaving it waiting on an address that went silent.
    let in_b = InNetns::enter(&lab.b);
    let port = 7400 + u16::from(net);
    let client = connected_client(&in_a, &in_b, vip_addr, port);

    release(&in_a, &on_a);
    let read = std::io::Read::read(&mut &client, &mut [0u8; 1]);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client's connection to the released VIP was not reset: {read:?}"
    );
    // `b` still sends to a's MAC: a refuses at once instead of dropping in
    // silence (which would hold the client for TCP's SYN retransmission).
    assert_eq!(neighbour(&lab.b, vip_addr).as_deref(), Some(mac_a.as_str()));
    let refused = connect(&in_b, vip_addr, port);
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a node without the VIP did not refuse a connection to it: {refused:?}"
    );
    release(&in_a, &on_a);
    assert_eq!(addresses(&lab.a, "eth0"), before_a, "release removes the VIP and nothing else");
    assert!(!held(&in_a, &on_a));

    // c refuses the VIP (released without holding it) until it takes it.
    release(&in_c, &on_c);
    take(&in_c, &on_c);
    assert!(held(&in_c, &on_c));
    wait_for_neighbour(&lab.b, vip_addr, &mac_c);
    let _accepted = connected_client(&in_c, &in_b, vip_addr, port + 100);
    release(&in_c, &on_c);
    assert!(!held(&in_c, &on_c));
}

/// Connect from `client` to `vip` within a few seconds (the SYN
/// retransmission a silent drop causes comes after one).
fn connect(client: &InNetns, vip: IpAddr, port: u16) -> std::io::Result<std::net::TcpStream> {
    client.run(async move {
        match tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect((vip, port))).await {
            Ok(result) => result?.into_std(),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 3 s")),
        }
    })
}

#[test]
fn ipv4_vip_moves_between_nodes_by_gratuitous_arp() {
    require!(root: true, tools: ["ip", "ss", "nft"]);
    moves_between_nodes("v4", 1, "10.199.1.100".parse().unwrap(), 24);
}

#[test]
fn ipv6_vip_moves_between_nodes_by_neighbour_advertisement() {
    require!(root: true, tools: ["ip", "ss", "nft"]);
    moves_between_nodes("v6", 2, "fd00:199:2::100".parse().unwrap(), 64);
}

#[test]
fn take_names_a_missing_interface_and_a_missing_node_address() {
    require!(root: true, tools: ["ip"]);
    let lab = Lab::new("err", 3);
    let in_a = InNetns::enter(&lab.a);
    let before = addresses(&lab.a, "eth0");
    let run = |interface| {
        let v = vip("10.199.3.100".parse().unwrap(), 24, interface);
        in_a.run(async move { v.take().await.map_err(|e| format!("{:#}", anyhow::Error::from(e))) })
    };
    let err = run(InterfaceChoice::Named("nope0".into())).unwrap_err();
    assert!(err.contains("nope0") && err.contains("cluster.interface"), "{err}");
    let err = run(InterfaceChoice::Holding("10.199.3.77".parse().unwrap())).unwrap_err();
    assert!(err.contains("10.199.3.77"), "{err}");
    assert_eq!(addresses(&lab.a, "eth0"), before);
}
