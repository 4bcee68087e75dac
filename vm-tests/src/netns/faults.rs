//! Faults of the network-namespace lab, shaped like the real ones they stand
//! for. Packet loss is always a silent drop (nftables in the hosts'
//! namespaces): a sender learns nothing and waits for its timeouts, as
//! behind a pulled cable or a dead switch port. Each fault has an undo, and
//! [`Lab::heal`] undoes them all.
//!
//! | fault | physically | undo |
//! |---|---|---|
//! | [`Lab::cut`] | the path between two hosts' own addresses is broken; both still reach the LAN (ARP, the VIP) | [`Lab::uncut`] |
//! | [`Lab::isolate`] | a host's cable is pulled: it reaches nobody, nobody reaches it | [`Lab::unisolate`] |
//! | [`Lab::kill`] | a node's power is cut: its processes die, its port goes dark, nothing is tidied | [`Lab::start`] |
//! | [`Lab::kill_agent`] | the node agent crashes; PostgreSQL, Kine and the VIP stay | [`Lab::start`] |
//! | [`Lab::pause_agent`] | the node agent hangs (SIGSTOP) | [`Lab::resume_agent`] |
//! | [`Lab::witness_down`] | the witness host (gateway or arbiter) is unreachable | [`Lab::witness_up`] |

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{GATEWAY, Host, Lab, SWITCH, kill_all, pids};
use crate::labstate::{ip, run};
use crate::poll;

/// Every table the lab adds starts with this; [`Lab::heal`] removes them all.
const TABLE_PREFIX: &str = "gk_";
const ISOLATE_TABLE: &str = "gk_isolate";
const WITNESS_TABLE: &str = "gk_witness";

/// Which way a filter chain looks at packets.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Hook {
    Input,
    Output,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Input => "input",
            Hook::Output => "output",
        }
    }
}

/// An nftables script that replaces `family table` with one filter chain per
/// `(hook, rule)`. Declaring the table empty and deleting it first makes the
/// script idempotent in one transaction.
fn table_script(family: &str, table: &str, chains: &[(Hook, String)]) -> String {
    let mut script = delete_script(family, table);
    script.push_str(&format!("table {family} {table} {{\n"));
    for (hook, rule) in chains {
        let hook = hook.name();
        script.push_str(&format!(
            "  chain {hook} {{\n    type filter hook {hook} priority 0; policy accept;\n    {rule}\n  }}\n"
        ));
    }
    script.push_str("}\n");
    script
}

/// Remove `family table` whether or not it exists.
fn delete_script(family: &str, table: &str) -> String {
    format!("table {family} {table} {{}}\ndelete table {family} {table}\n")
}

/// Drop packets from (`Input`) or to (`Output`) `addr`.
fn address_rule(hook: Hook, addr: IpAddr) -> String {
    let (family, field) = match (addr, hook) {
        (IpAddr::V4(_), Hook::Input) => ("ip", "saddr"),
        (IpAddr::V4(_), Hook::Output) => ("ip", "daddr"),
        (IpAddr::V6(_), Hook::Input) => ("ip6", "saddr"),
        (IpAddr::V6(_), Hook::Output) => ("ip6", "daddr"),
    };
    format!("{family} {field} {addr} drop")
}

/// Drop every packet in and out of `dev`: IP in an `inet` table, ARP in an
/// `arp` table (a host behind a pulled cable answers no ARP either).
fn drop_all_script(table: &str, dev: &str) -> String {
    let chains = [(Hook::Input, format!("iifname \"{dev}\" drop")), (Hook::Output, format!("oifname \"{dev}\" drop"))];
    table_script("inet", table, &chains) + &table_script("arp", table, &chains)
}

/// The table in a host that drops traffic to (`Output`) or from (`Input`) `peer`.
fn cut_table(hook: Hook, peer: &Host) -> String {
    let name: String = peer.name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    match hook {
        Hook::Output => format!("{TABLE_PREFIX}to_{name}"),
        Hook::Input => format!("{TABLE_PREFIX}from_{name}"),
    }
}

/// `nft SCRIPT` in `netns`.
fn nft(netns: &str, script: &str) -> anyhow::Result<()> {
    run(Command::new("ip").args(["netns", "exec", netns, "nft", script]))
        .with_context(|| format!("applying nftables rules in {netns} (is nftables installed? `just deps`)"))?;
    Ok(())
}

/// The lab's tables in `netns`, as `(family, name)`.
fn lab_tables(netns: &str) -> anyhow::Result<Vec<(String, String)>> {
    let out = run(Command::new("ip").args(["netns", "exec", netns, "nft", "list", "tables"]))?;
    Ok(parse_tables(&out).into_iter().filter(|(_, name)| name.starts_with(TABLE_PREFIX)).collect())
}

/// `nft list tables` lines: `table inet gk_isolate`.
fn parse_tables(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            ["table", family, name] => Some((family.to_string(), name.to_string())),
            _ => None,
        })
        .collect()
}

/// Whether a `/proc/PID/cmdline` is the node agent's (`gemin_k8s agent ...`,
/// not its `--release-vip` stop hook).
fn is_agent(cmdline: &[u8]) -> bool {
    let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let program = words.first().map(|w| w.rsplit(|b| *b == b'/').next().unwrap_or(w));
    program == Some(b"gemin_k8s".as_slice())
        && words.get(1) == Some(&b"agent".as_slice())
        && !words.contains(&b"--release-vip".as_slice())
}

/// Whether a process is stopped (SIGSTOP): state `T` in `/proc/PID/stat`.
fn stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').and_then(|i| s[i + 1..].split_whitespace().next().map(|st| st == "T")))
        .unwrap_or(false)
}

fn signal(pid: i32, sig: Signal) -> anyhow::Result<()> {
    kill(Pid::from_raw(pid), sig).with_context(|| format!("sending {sig} to {pid}"))
}

/// The flags of `ip -o link show` (`<BROADCAST,MULTICAST,UP,LOWER_UP>`) say the link is up.
fn link_up(ip_link: &str) -> bool {
    ip_link
        .split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .is_some_and(|(flags, _)| flags.split(',').any(|f| f == "UP"))
}

impl Lab {
    /// The host's switch port: named after its namespace (a replaced
    /// node's new machine has a namespace of its own).
    pub(crate) fn port(host: &Host) -> String {
        format!("v-{}", host.netns.trim_start_matches("gk-"))
    }

    /// Whether a node is powered on: its switch port is up.
    pub fn powered(&self, node: &str) -> bool {
        self.node(node)
            .ok()
            .and_then(|h| ip(&["-n", SWITCH, "-o", "link", "show", "dev", &Self::port(h)]).ok())
            .is_some_and(|out| link_up(&out))
    }

    /// Drop all IPv4 traffic between the own addresses of hosts `a` and `b`
    /// (nodes, `client` or `gw`), silently, in both directions (`one_way`:
    /// only from `a` to `b`). ARP and traffic to the VIP still pass: the path
    /// between the two is broken while both still reach the LAN.
    pub fn cut(&self, a: &str, b: &str, one_way: bool) -> anyhow::Result<()> {
        let (ha, hb) = (self.host(a)?, self.host(b)?);
        if ha.name == hb.name {
            bail!("cannot cut {a} from itself: name two different hosts");
        }
        self.cut_direction(ha, hb)?;
        if !one_way {
            self.cut_direction(hb, ha)?;
        }
        Ok(())
    }

    /// `from` drops what it sends to `to`, and `to` drops what it receives from `from`.
    fn cut_direction(&self, from: &Host, to: &Host) -> anyhow::Result<()> {
        let out = Hook::Output;
        nft(&from.netns, &table_script("inet", &cut_table(out, to), &[(out, address_rule(out, to.ip))]))?;
        let inp = Hook::Input;
        nft(&to.netns, &table_script("inet", &cut_table(inp, from), &[(inp, address_rule(inp, from.ip))]))
    }

    /// Undo [`Lab::cut`] between `a` and `b`, both directions.
    pub fn uncut(&self, a: &str, b: &str) -> anyhow::Result<()> {
        let (ha, hb) = (self.host(a)?, self.host(b)?);
        for (host, peer) in [(ha, hb), (hb, ha)] {
            for hook in [Hook::Input, Hook::Output] {
                nft(&host.netns, &delete_script("inet", &cut_table(hook, peer)))?;
            }
        }
        Ok(())
    }

    /// Cut `host` off from everyone: every packet in and out of its
    /// interface is dropped silently (loopback still works).
    pub fn isolate(&self, host: &str) -> anyhow::Result<()> {
        let h = self.host(host)?;
        nft(&h.netns, &drop_all_script(ISOLATE_TABLE, &h.dev))
    }

    /// Undo [`Lab::isolate`].
    pub fn unisolate(&self, host: &str) -> anyhow::Result<()> {
        let h = self.host(host)?;
        nft(&h.netns, &(delete_script("inet", ISOLATE_TABLE) + &delete_script("arp", ISOLATE_TABLE)))
    }

    /// The witness host (the gateway, and `witness serve` in arbiter mode)
    /// becomes unreachable from both nodes: everything on its interface is
    /// dropped silently.
    pub fn witness_down(&self) -> anyhow::Result<()> {
        nft(GATEWAY, &drop_all_script(WITNESS_TABLE, &self.gateway.dev))
    }

    /// Undo [`Lab::witness_down`].
    pub fn witness_up(&self) -> anyhow::Result<()> {
        nft(GATEWAY, &(delete_script("inet", WITNESS_TABLE) + &delete_script("arp", WITNESS_TABLE)))
    }

    /// Cut `node`'s power: its switch port goes down first (a dead machine
    /// sends nothing, not even the FIN or RST of its dying sockets), then
    /// every process in its namespace is killed with SIGKILL. Nothing is
    /// tidied: the VIP stays configured in the namespace, files stay as they
    /// were. Returns how many processes were killed.
    pub fn kill(&self, node: &str) -> anyhow::Result<usize> {
        let host = self.node(node)?;
        ip(&["-n", SWITCH, "link", "set", &Self::port(host), "down"])?;
        Ok(kill_all(&host.netns))
    }

    /// Power `node` on and start its agent, as its boot would. After
    /// [`Lab::kill`] the node boots without what a reboot loses: the VIP
    /// and its runtime directory (`/run`) are removed before its port comes
    /// up. After [`Lab::kill_agent`] (the node still powered) only the agent
    /// starts, as systemd's `Restart=` would. Returns the agent's pid.
    pub fn start(&self, node: &str) -> anyhow::Result<u32> {
        let host = self.node(node)?;
        if let Some(pid) = self.agent_pid(node) {
            bail!("the agent of {node} is already running (pid {pid}); `kill-agent` or `kill` it first");
        }
        if !self.powered(node) {
            // Whatever was left running in the dead machine is gone.
            kill_all(&host.netns);
            poll::until(
                &format!("the processes of {node} to exit"),
                Duration::from_secs(10),
                Duration::from_millis(20),
                || {
                    let left = pids(&host.netns);
                    if left.is_empty() {
                        Ok(())
                    } else {
                        kill_all(&host.netns);
                        Err(left)
                    }
                },
            )
            .map_err(anyhow::Error::msg)?;
            if self.has_vip(host) {
                ip(&["-n", &host.netns, "addr", "del", &format!("{}/{}", self.vip, self.prefix), "dev", &host.dev])?;
            }
            let runtime = self.node_dir(node).join("runtime");
            if runtime.exists() {
                std::fs::remove_dir_all(&runtime).with_context(|| format!("clearing {}", runtime.display()))?;
            }
            ip(&["-n", SWITCH, "link", "set", &Self::port(host), "up"])?;
        }
        self.start_agent(node)
    }

    /// Kill both nodes, leave them off for `off`, then power `first` on,
    /// and `second` after `delay`.
    pub fn power_cycle(&self, first: &str, second: &str, off: Duration, delay: Duration) -> anyhow::Result<()> {
        self.kill(first)?;
        self.kill(second)?;
        std::thread::sleep(off);
        self.start(first)?;
        std::thread::sleep(delay);
        self.start(second)?;
        Ok(())
    }

    /// The pid of `node`'s agent process, found by its command line among
    /// the processes of the node's namespace.
    pub fn agent_pid(&self, node: &str) -> Option<i32> {
        let host = self.node(node).ok()?;
        pids(&host.netns)
            .into_iter()
            .find(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| is_agent(&c)))
    }

    fn require_agent(&self, node: &str) -> anyhow::Result<i32> {
        self.agent_pid(node).with_context(|| format!("the agent of {node} is not running (`start {node}` starts it)"))
    }

    /// SIGKILL `node`'s agent only: PostgreSQL and Kine keep running, the
    /// VIP stays where it is. Returns the agent's pid once it is gone.
    pub fn kill_agent(&self, node: &str) -> anyhow::Result<i32> {
        let pid = self.require_agent(node)?;
        signal(pid, Signal::SIGKILL)?;
        poll::until(
            &format!("the agent of {node} (pid {pid}) to exit"),
            Duration::from_secs(10),
            Duration::from_millis(20),
            || if self.agent_pid(node) == Some(pid) { Err(pid) } else { Ok(()) },
        )
        .map_err(anyhow::Error::msg)?;
        Ok(pid)
    }

    /// SIGSTOP `node`'s agent: it hangs, everything else runs.
    pub fn pause_agent(&self, node: &str) -> anyhow::Result<i32> {
        let pid = self.require_agent(node)?;
        signal(pid, Signal::SIGSTOP)?;
        Ok(pid)
    }

    /// SIGCONT `node`'s agent.
    pub fn resume_agent(&self, node: &str) -> anyhow::Result<i32> {
        let pid = self.require_agent(node)?;
        signal(pid, Signal::SIGCONT)?;
        Ok(pid)
    }

    /// Undo every fault: the lab's nftables tables go, powered-off nodes
    /// boot ([`Lab::start`]), stopped agents continue, and a node without an
    /// agent gets it started again. Returns what it did to processes, for
    /// the record (an agent that exited on its own shows up here).
    pub fn heal(&self) -> anyhow::Result<Vec<String>> {
        for h in self.all_hosts() {
            let tables = lab_tables(&h.netns)?;
            let script: String = tables.iter().map(|(family, name)| delete_script(family, name)).collect();
            if !script.is_empty() {
                nft(&h.netns, &script)?;
            }
        }
        let mut done = Vec::new();
        for node in self.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>() {
            if !self.powered(&node) {
                self.start(&node)?;
                done.push(format!("powered {node} on"));
                continue;
            }
            match self.agent_pid(&node) {
                Some(pid) if stopped(pid) => {
                    signal(pid, Signal::SIGCONT)?;
                    done.push(format!("resumed the agent of {node}"));
                }
                Some(_) => {}
                None => {
                    self.start_agent(&node)?;
                    done.push(format!("started the agent of {node} (it was not running)"));
                }
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_drops_by_the_peer_address_in_an_idempotent_table() {
        let peer = Host {
            name: "node-2".into(),
            netns: "gk-node-2".into(),
            ip: "10.77.0.12".parse().unwrap(),
            dev: "eth0".into(),
        };
        let table = cut_table(Hook::Output, &peer);
        assert_eq!(table, "gk_to_node_2");
        let script = table_script("inet", &table, &[(Hook::Output, address_rule(Hook::Output, peer.ip))]);
        assert!(script.starts_with("table inet gk_to_node_2 {}\ndelete table inet gk_to_node_2\n"), "{script}");
        assert!(script.contains("type filter hook output priority 0; policy accept;\n    ip daddr 10.77.0.12 drop"));
        assert!(!script.contains("hook input"));
        assert_eq!(address_rule(Hook::Input, "fd00::1".parse().unwrap()), "ip6 saddr fd00::1 drop");
    }

    #[test]
    fn isolation_drops_ip_and_arp_on_the_interface_only() {
        let script = drop_all_script("gk_isolate", "eth0");
        for family in ["inet", "arp"] {
            assert!(script.contains(&format!("table {family} gk_isolate {{\n")), "{script}");
        }
        assert_eq!(script.matches("iifname \"eth0\" drop").count(), 2);
        assert_eq!(script.matches("oifname \"eth0\" drop").count(), 2);
        assert!(!script.contains("\"lo\""));
    }

    #[test]
    fn tables_are_parsed_from_nft_list() {
        let out = "table inet gk_isolate\ntable arp gk_isolate\ntable ip nat\n";
        let tables = parse_tables(out);
        assert_eq!(tables.len(), 3);
        assert_eq!(tables[1], ("arp".to_string(), "gk_isolate".to_string()));
    }

    #[test]
    fn the_agent_is_found_by_its_command_line() {
        assert!(is_agent(b"/work/target/debug/gemin_k8s\0agent\0--cloud-config\0x.yaml\0"));
        assert!(!is_agent(b"/usr/bin/gemin_k8s\0agent\0--release-vip\0"));
        assert!(!is_agent(b"/usr/bin/gemin_k8s\0witness\0serve\0"));
        assert!(!is_agent(b"/usr/local/bin/kine\0--endpoint\0"));
        assert!(!is_agent(b""));
    }

    #[test]
    fn link_flags_say_whether_a_port_is_up() {
        assert!(link_up("7: v-node1@if6: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500"));
        assert!(!link_up("7: v-node1@if6: <BROADCAST,MULTICAST> mtu 1500 state DOWN"));
        assert!(!link_up("7: v-node1@if6: <BROADCAST,MULTICAST,LOWER_UP> mtu 1500 state UP"));
    }
}
