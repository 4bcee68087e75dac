//! The QEMU lab: the cluster of `gemin_k8s init` on two virtual machines
//! booting the shipped default image, as a site would run it.
//!
//! ```text
//!                    gq-sw (bridge br0)
//!        ┌───────────────┬─────┴──────────┐
//!    tap-node1       tap-node2         v-client
//!   QEMU node1      QEMU node2        gq-client (10.77.0.2)
//!  image+CIDATA    image+CIDATA      etcdctl, gemin_k8s status
//! ```
//!
//! Each VM boots its own qcow2 overlay of a private copy of the image (a
//! rebuilt image never changes a running lab's disks), with UEFI variables
//! of its own and a CIDATA seed holding its node file from `gemin_k8s
//! init`, plus a `write_files` entry that gives its NIC the node's static
//! address; or, as the generic image ([`UpOptions::enrol`]), only the
//! site's enrolment token and that address, `gemin_k8s deploy` sending the
//! node files. The agents in the VMs do the rest: PostgreSQL, Kine, the VIP.
//!
//! QEMU runs inside the switch namespace (where the taps are), detached
//! from the command that started it, so the lab outlives `gemini-lab qemu
//! up`. Its serial console is a Unix socket, every byte logged to
//! `RUN_DIR/NODE/NODE-console.log`. `RUN_DIR/lab.json` records what `up`
//! made, so later commands, and `down` after a crash, find everything.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use geminik8s::clusterfile::ClusterFile;
use geminik8s::config::validate::network;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::labstate::{self, ip, run};
use crate::qemu::{self, ConsoleMode, DiskFormat, Drive, Firmware, Net, VmConfig};

pub const SWITCH: &str = "gq-sw";
pub const CLIENT: &str = "gq-client";
const BRIDGE: &str = "br0";
/// This boot's journal of a node's agent (`gemini-lab qemu ssh NODE`'s default).
pub const AGENT_JOURNAL: [&str; 5] = ["journalctl", "-u", "geminik8s-agent", "-b", "--no-pager"];
/// The line `geminik8s-boot-report.service` prints once the agent started.
pub const BOOT_REPORT: &str = "geminik8s-boot: ";

/// What the QEMU lab's tests need on the host (they skip without it).
pub const TEST_TOOLS: &[&str] = &[
    "mmdebstrap",
    "kine",
    "etcdctl",
    "qemu-system-x86_64",
    "qemu-img",
    "xorriso",
    "mcopy",
    "tar2sqfs",
    "bridge",
    "chronyd",
];

/// Where a QEMU lab test keeps its lab, under `target/NAME`.
#[derive(Debug, Clone)]
pub struct TestDirs {
    /// The host's `gemin_k8s`.
    pub agent: PathBuf,
    /// `target/NAME`.
    pub base: PathBuf,
    /// `target/NAME/run`: console logs, disks, journals.
    pub run_dir: PathBuf,
    /// `target/NAME/cluster`: the cluster directory, made afresh.
    pub config_dir: PathBuf,
}

/// A QEMU lab test's start: `None`, with the reason printed as a skip,
/// without root, the lab's tools, UEFI firmware or a built `gemin_k8s`;
/// otherwise its directories, with what an interrupted run left taken down.
pub fn test_start(test: &str, name: &str) -> Option<TestDirs> {
    if let Some(reason) = crate::skip::requires(true, TEST_TOOLS).or_else(|| qemu::requires(Firmware::Uefi)) {
        crate::skip::skip(test, &reason);
        return None;
    }
    let Some(agent) = crate::image::agent_binary() else {
        crate::skip::skip(test, "no gemin_k8s in target/: run `cargo build -p geminik8s-agent`");
        return None;
    };
    let base = crate::image::target_dir().join(name);
    let (run_dir, config_dir) = (base.join("run"), base.join("cluster"));
    QemuLab::down(&run_dir).unwrap_or_else(|e| panic!("taking the lab of an earlier run down: {e:#}"));
    let _ = std::fs::remove_dir_all(&config_dir); // Absent on the first run.
    Some(TestDirs { agent, base, run_dir, config_dir })
}

/// Tears the lab of a run directory down however a test ends.
pub struct Teardown(pub PathBuf);

impl Drop for Teardown {
    fn drop(&mut self) {
        match QemuLab::down(&self.0) {
            Ok(removed) => eprintln!("lab down: removed {removed:?}"),
            Err(e) => eprintln!("lab down failed: {e:#}"),
        }
    }
}

/// A node of the lab.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Node {
    pub name: String,
    pub ip: IpAddr,
    pub mac: String,
    /// The tap device in the switch namespace.
    pub tap: String,
    /// Disk, seed, UEFI variables, console and QEMU logs.
    pub dir: PathBuf,
    /// The running QEMU process, if any.
    pub pid: Option<u32>,
}

/// What `up` made; saved as `RUN_DIR/lab.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QemuLab {
    pub config_dir: PathBuf,
    pub run_dir: PathBuf,
    /// The host's `gemin_k8s` (for `status` from the client namespace).
    pub agent_bin: PathBuf,
    /// The lab's copy of the image the overlays sit on.
    pub base_image: PathBuf,
    pub cluster: String,
    pub vip: IpAddr,
    pub prefix: u8,
    pub client_ip: IpAddr,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Whether the nodes run K3s (the image can serve the Kubernetes API).
    #[serde(default)]
    pub kubernetes: bool,
    /// The private key root on every node accepts (made by `up` when
    /// `ssh-keygen` is there): journals after a failure, a look inside.
    #[serde(default)]
    pub ssh_key: Option<PathBuf>,
    pub nodes: Vec<Node>,
}

/// Options for [`QemuLab::up`].
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The cluster (`gemin_k8s init` output); made here with the lab's
    /// addresses when it holds no `cluster.yaml`.
    pub config_dir: PathBuf,
    pub run_dir: PathBuf,
    /// The host's `gemin_k8s`.
    pub agent_bin: PathBuf,
    /// A qcow2 or raw image to boot; `None` builds the default image into
    /// `image_dir` (cached: an unchanged build is skipped).
    pub image: Option<PathBuf>,
    pub image_dir: PathBuf,
    /// Whether the nodes run K3s: `None` turns it on when the built image
    /// can serve the Kubernetes API ([`crate::image::BuiltImage::runs_kubernetes`]),
    /// off for a given image.
    pub k3s: Option<bool>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// For each VM to print its boot report.
    pub boot_timeout: Duration,
    /// For the cluster to form after both booted.
    pub form_timeout: Duration,
    /// For the Kubernetes API to answer through the VIP once the cluster
    /// formed (where K3s runs): seconds on hardware, minutes under TCG.
    pub kube_timeout: Duration,
    /// Boot the generic image: each VM's CIDATA volume carries only the
    /// site's enrolment token and the machine's address, and `gemin_k8s
    /// deploy` from the client sends the node files (edited as the lab runs
    /// them, in the cluster directory). Otherwise the node files are on the
    /// CIDATA volumes.
    pub enrol: bool,
}

/// What `up` saw.
#[derive(Debug, Clone)]
pub struct UpReport {
    pub lab: QemuLab,
    /// Each node's boot report fields.
    pub reports: BTreeMap<String, BTreeMap<String, String>>,
    pub leader: String,
    /// From starting the VMs to a formed cluster answering through the VIP.
    pub formed_after: Duration,
    /// With K3s on: the kubeconfig for the VIP, fetched once the Kubernetes
    /// API answered through it.
    pub kubeconfig: Option<PathBuf>,
    /// From starting the VMs to that answer (or to the formed cluster).
    pub kubernetes_after: Duration,
}

/// The lab's namespaces that exist now.
pub fn namespaces() -> anyhow::Result<Vec<String>> {
    Ok(labstate::namespaces()?.into_iter().filter(|n| n.starts_with("gq-")).collect())
}

/// The processes in namespace `ns`, if it is among `existing`.
fn netns_pids(existing: &[String], ns: &str) -> Vec<u32> {
    if !existing.iter().any(|n| n == ns) {
        return Vec::new();
    }
    let out = ip(&["netns", "pids", ns]).unwrap_or_default();
    out.lines().filter_map(|l| l.trim().parse::<u32>().ok()).collect()
}

/// Run a command line in the client namespace.
fn client_exec(argv: &[&str]) -> Result<std::process::Output, String> {
    Command::new("ip")
        .args(["netns", "exec", CLIENT])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())
}

/// A tap device on the switch's bridge, up.
fn ip_cmd_tap(tap: &str) -> anyhow::Result<()> {
    ip(&["-n", SWITCH, "tuntap", "add", "dev", tap, "mode", "tap"])?;
    ip(&["-n", SWITCH, "link", "set", tap, "master", BRIDGE])?;
    ip(&["-n", SWITCH, "link", "set", tap, "up"])?;
    Ok(())
}

/// Whether `pid` is a live (not zombie) QEMU.
pub fn qemu_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // `pid (comm) S ...`: the state follows the last `)`.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).unwrap_or("Z");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    state != "Z" && String::from_utf8_lossy(&cmdline).contains("qemu-system")
}

fn sigkill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // It may have exited since we looked; that is what we want anyway.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// The fields of a boot report line (`key=value` words after the tag).
pub fn parse_report(line: &str) -> BTreeMap<String, String> {
    let rest = line.find(BOOT_REPORT).map_or("", |at| &line[at + BOOT_REPORT.len()..]);
    rest.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A node file from `gemin_k8s init` made into the VM's user-data: Kine
/// listening on every address (the VIP reaches the leader's), K3s as
/// `init` wrote it (on) when `k3s`, else off (an image without a K3s that
/// can serve), and a static address on the NIC
/// with `mac` through systemd-networkd, written before networkd starts.
/// `ntp` is the lab's time server, handed to the node's timesyncd through
/// the network file, as a site names its own.
pub fn user_data(
    node_file: &str,
    mac: &str,
    ip: IpAddr,
    prefix: u8,
    ntp: IpAddr,
    k3s: bool,
    ssh_key: Option<&str>,
) -> anyhow::Result<String> {
    let mut text = node_config(node_file, k3s)?;
    if text.lines().any(|l| l.starts_with("write_files:")) {
        bail!("the node file has its own `write_files:`; the lab adds the network file there: remove it");
    }
    if ssh_key.is_some() && text.lines().any(|l| l.starts_with("users:")) {
        bail!("the node file has its own `users:`; the lab adds root's SSH key there: remove it");
    }
    text.push_str(&machine_data(mac, ip, prefix, ntp, ssh_key));
    Ok(text)
}

/// A node file from `gemin_k8s init` as the lab's nodes run it: Kine on
/// every address, K3s on when `k3s`, else off (see [`user_data`]).
pub fn node_config(node_file: &str, k3s: bool) -> anyhow::Result<String> {
    let mut text = node_file.to_string();
    let (k3s_on, k3s_off) = ("  k3s:\n    enabled: true\n", "  k3s:\n    enabled: false\n");
    let k3s_edit = if k3s { (k3s_off, k3s_on) } else { (k3s_on, k3s_off) };
    for (from, to, what) in [
        ("    listen: 127.0.0.1:2379\n", "    listen: 0.0.0.0:2379\n", "geminik8s.kine.listen"),
        (k3s_edit.0, k3s_edit.1, "geminik8s.k3s.enabled"),
    ] {
        if text.contains(from) {
            text = text.replacen(from, to, 1);
        } else if !text.contains(to) {
            bail!("the node file does not set `{what}` as `gemin_k8s init` writes it; set it to `{}`", to.trim());
        }
    }
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

/// What a machine of the lab gets whatever node it becomes (Kairos keys):
/// its static address and time server, and root's SSH key.
fn machine_data(mac: &str, ip: IpAddr, prefix: u8, ntp: IpAddr, ssh_key: Option<&str>) -> String {
    let mut text = format!(
        "write_files:\n  - path: /etc/systemd/network/10-lab.network\n    permissions: \"0644\"\n    content: |\n      # The QEMU lab's static address and time server.\n      [Match]\n      MACAddress={mac}\n\n      [Network]\n      Address={ip}/{prefix}\n      NTP={ntp}\n"
    );
    if let Some(key) = ssh_key {
        text.push_str(&format!("users:\n  - name: root\n    ssh_authorized_keys:\n      - {}\n", key.trim()));
    }
    text
}

/// The user-data of a machine booting the generic image: no node file, the
/// site's enrolment token (it waits for `gemin_k8s deploy`), and its own
/// address, time server and SSH key ([`machine_data`]).
pub fn enrolment_user_data(
    token: &str,
    mac: &str,
    ip: IpAddr,
    prefix: u8,
    ntp: IpAddr,
    ssh_key: Option<&str>,
) -> String {
    format!(
        "#cloud-config\ngeminik8s_enrolment:\n  token: {}\n{}",
        token.trim(),
        machine_data(mac, ip, prefix, ntp, ssh_key)
    )
}

/// `journalctl -o json` made readable: per entry the UTC time of day, the
/// level, the message and, for the agent's own entries, the fields it
/// logged (`event=promoting component=Postgres ...`).
pub fn render_journal(json_lines: &str) -> String {
    const PLUMBING: [&str; 9] = [
        "MESSAGE",
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "SYSLOG_FACILITY",
        "SYSLOG_PID",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "TARGET",
    ];
    let mut out = String::new();
    for line in json_lines.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(Value::Object(entry)) = serde_json::from_str::<Value>(line) else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let text = |k: &str| entry.get(k).and_then(Value::as_str).unwrap_or("");
        let micros: u64 = text("__REALTIME_TIMESTAMP").parse().unwrap_or(0);
        let (secs, frac) = (micros / 1_000_000 % 86_400, micros % 1_000_000);
        let level = match text("PRIORITY") {
            "0" | "1" | "2" | "3" => "ERROR",
            "4" => "WARN",
            "5" | "6" => "INFO",
            _ => "DEBUG",
        };
        out.push_str(&format!(
            "{:02}:{:02}:{:02}.{frac:06} {level:5} {}: {}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            text("SYSLOG_IDENTIFIER"),
            text("MESSAGE")
        ));
        if text("SYSLOG_IDENTIFIER") == "gemin_k8s" {
            for (k, v) in entry.iter().filter(|(k, _)| !k.starts_with('_') && !PLUMBING.contains(&k.as_str())) {
                // The agent's own fields come as `F_NAME` (tracing-journald's prefix).
                let name = k.strip_prefix("F_").unwrap_or(k).to_lowercase();
                out.push_str(&format!(" {name}={}", v.as_str().map_or_else(|| v.to_string(), String::from)));
            }
        }
        out.push('\n');
    }
    out
}

/// A fresh key pair for root on the lab's nodes, `RUN_DIR/ssh/id_ed25519`:
/// the private key's path and the public key. `None` (said on stderr)
/// without `ssh-keygen`: the lab runs, but nobody can look inside a node.
fn lab_ssh_key(run_dir: &Path) -> anyhow::Result<Option<(PathBuf, String)>> {
    if crate::skip::find_tool("ssh-keygen").is_none() {
        eprintln!("no ssh-keygen (openssh-client): the lab's nodes take no SSH key");
        return Ok(None);
    }
    let dir = run_dir.join("ssh");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing the old {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = dir.join("id_ed25519");
    run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "gemini-lab", "-f"]).arg(&key))
        .context("making the lab's SSH key")?;
    let public = key.with_extension("pub");
    let public = std::fs::read_to_string(&public).with_context(|| format!("reading {}", public.display()))?;
    Ok(Some((key, public)))
}

/// The health timings of a VM under software emulation, where the guest
/// runs tens of times slower than on hardware: one probe round (a TLS
/// heartbeat, a ping, a database session) of a debug build takes more than a
/// second there, beyond the product's 500 ms interval. Only the defaults
/// `gemin_k8s init` writes are changed; timings the file sets otherwise stay.
pub fn emulated_timings(user_data: &str) -> String {
    EMULATED_TIMINGS.iter().fold(user_data.to_string(), |text, (from, to)| text.replacen(from, to, 1))
}

const EMULATED_TIMINGS: [(&str, &str); 2] = [
    ("  health:\n    interval: 500ms\n", "  health:\n    interval: 2s\n"),
    ("    fence_timeout: 2s\n", "    fence_timeout: 10s\n"),
];

impl QemuLab {
    /// Fail a test: `what`, with both nodes' status, the last lines of
    /// their agents' journals and where the console logs are.
    pub fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\nstatus:\n{}\n{}console logs: {}/node1/node1-console.log, {}/node2/node2-console.log",
            self.render_status(),
            self.collect_journals("failure", 150),
            self.run_dir.display(),
            self.run_dir.display()
        )
    }

    /// Every key of `acked` is there under `prefix`, read through the VIP
    /// (reads retried for up to `timeout`); fails the test otherwise.
    pub fn assert_kept(&self, prefix: &str, acked: &std::collections::BTreeSet<String>, timeout: Duration) {
        let keys: std::collections::BTreeSet<String> = crate::poll::until(
            &format!("reading {prefix} through the VIP"),
            timeout,
            Duration::from_millis(500),
            || self.keys(prefix),
        )
        .unwrap_or_else(|e| self.fail(&e))
        .into_iter()
        .collect();
        let lost: Vec<&String> = acked.difference(&keys).collect();
        if !lost.is_empty() {
            self.fail(&format!("{} acknowledged writes lost: {lost:?}", lost.len()));
        }
    }

    /// The lab described by a run directory.
    pub fn load(run_dir: &Path) -> anyhow::Result<QemuLab> {
        labstate::load(run_dir, "gemini-lab qemu up")
    }

    fn save(&self) -> anyhow::Result<()> {
        labstate::save(&self.run_dir, self)
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&Node> {
        labstate::find_node(&self.nodes, name, |n| n.name.as_str())
    }

    fn node_mut(&mut self, name: &str) -> anyhow::Result<&mut Node> {
        self.node(name)?;
        Ok(self.nodes.iter_mut().find(|n| n.name == name).expect("checked above"))
    }

    /// Build the image (unless given), the disks, seeds and network, boot
    /// both VMs and wait for the cluster to form.
    pub fn up(opts: &UpOptions) -> anyhow::Result<UpReport> {
        let existing = namespaces()?;
        if !existing.is_empty() {
            bail!("QEMU lab namespaces already exist ({}); run `gemini-lab qemu down` first", existing.join(", "));
        }
        let cluster_path = opts.config_dir.join(geminik8s::clusterfile::FILE_NAME);
        if !cluster_path.exists() {
            run(Command::new(&opts.agent_bin)
                .args(["init", "--name", "lab", "--node1-ip", "10.77.0.11", "--node2-ip", "10.77.0.12"])
                // The client namespace stands in for the site's router.
                .args(["--vip", "10.77.0.10", "--witness", "gateway", "--witness-target", "10.77.0.2", "--config-dir"])
                .arg(&opts.config_dir))
            .context("making the lab cluster with `gemin_k8s init`")?;
        }
        let cluster = ClusterFile::load(&cluster_path)?;
        if cluster.nodes.len() != 2 || !cluster.vip.is_ipv4() {
            bail!("{}: the QEMU lab runs two-node IPv4 clusters", cluster_path.display());
        }
        let IpAddr::V4(net) = network(cluster.vip, cluster.vip_prefix) else { unreachable!("IPv4 checked") };
        let client_ip = IpAddr::V4(Ipv4Addr::from(u32::from(net) + 2));
        if cluster.vip == client_ip || cluster.nodes.iter().any(|n| n.member.ip == client_ip) {
            bail!("the lab's client takes {client_ip}, which the cluster uses; pick other node addresses or VIP");
        }
        let run_dir = std::path::absolute(&opts.run_dir)?;
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let (image, kubernetes) = match &opts.image {
            Some(path) => (path.clone(), opts.k3s.unwrap_or(false)),
            None => {
                let built = crate::image::build_default_image_blocking(&opts.image_dir)
                    .context("building the default image")?;
                (built.path(gemin_image::spec::OutputFormat::Qcow2), opts.k3s.unwrap_or(built.runs_kubernetes()))
            }
        };
        let (ssh_key, public_key) = lab_ssh_key(&run_dir)?.unzip();
        let base_image = run_dir.join("base.qcow2");
        run(Command::new("cp").args(["--sparse=always", "--reflink=auto"]).arg(&image).arg(&base_image))
            .with_context(|| format!("copying the image {}", image.display()))?;

        let mut nodes = Vec::new();
        for (i, entry) in cluster.nodes.iter().enumerate() {
            let name = entry.member.name.clone();
            let dir = run_dir.join(&name);
            if dir.exists() {
                std::fs::remove_dir_all(&dir).with_context(|| format!("removing the old {}", dir.display()))?;
            }
            std::fs::create_dir_all(&dir)?;
            let mac = format!("52:54:00:77:00:{:02x}", i + 1);
            let node_file = opts.config_dir.join(format!("{name}.yaml"));
            let text =
                std::fs::read_to_string(&node_file).with_context(|| format!("reading {}", node_file.display()))?;
            let tcg = qemu::accel_choice().accel == qemu::Accel::Tcg;
            let data = if opts.enrol {
                // The operator's files, as this site runs them; deploy sends them.
                let mut config = node_config(&text, kubernetes)?;
                if tcg {
                    config = emulated_timings(&config);
                }
                std::fs::write(&node_file, config).with_context(|| format!("writing {}", node_file.display()))?;
                let token = std::fs::read_to_string(opts.config_dir.join("enrolment.token"))
                    .context("the cluster directory's enrolment.token")?;
                let ip = entry.member.ip;
                enrolment_user_data(&token, &mac, ip, cluster.vip_prefix, client_ip, public_key.as_deref())
            } else {
                let data = user_data(
                    &text,
                    &mac,
                    entry.member.ip,
                    cluster.vip_prefix,
                    client_ip,
                    kubernetes,
                    public_key.as_deref(),
                )
                .with_context(|| format!("preparing {}", node_file.display()))?;
                if tcg { emulated_timings(&data) } else { data }
            };
            qemu::make_cidata_iso(&dir, &data, &format!("instance-id: lab-{name}\nlocal-hostname: {name}\n"))?;
            qemu::create_overlay(&base_image, &dir.join("disk.qcow2"))?;
            nodes.push(Node { tap: format!("tap-{name}"), name, ip: entry.member.ip, mac, dir, pid: None });
        }
        let mut lab = QemuLab {
            config_dir: std::path::absolute(&opts.config_dir)?,
            run_dir,
            agent_bin: std::path::absolute(&opts.agent_bin)?,
            base_image,
            cluster: cluster.name.clone(),
            vip: cluster.vip,
            prefix: cluster.vip_prefix,
            client_ip,
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            kubernetes,
            ssh_key,
            nodes,
        };
        for n in &lab.nodes {
            let sock = lab.vm_config(n).console_socket_path();
            if sock.as_os_str().len() > 100 {
                bail!("{} is too long for a Unix socket: use a shorter --run-dir", sock.display());
            }
        }
        lab.save()?;
        if let Err(e) = lab.build_network() {
            let cleanup = QemuLab::down(&lab.run_dir);
            return Err(e.context(format!("building the lab network (cleaned up: {cleanup:?})")));
        }
        let started = Instant::now();
        for name in lab.node_names() {
            lab.start(&name)?;
        }
        let mut reports = BTreeMap::new();
        for name in lab.node_names() {
            let report = lab.wait_boot(&name, 0, opts.boot_timeout)?;
            reports.insert(name, report);
        }
        if opts.enrol {
            lab.deploy(opts.form_timeout)?;
        }
        let leader = lab.wait_formed(opts.form_timeout)?;
        let formed_after = started.elapsed();
        let kubeconfig = match lab.kubernetes {
            true => Some(lab.wait_kubernetes(opts.kube_timeout).map_err(|e| {
                anyhow::anyhow!("{e:#}\nstatus:\n{}\n{}", lab.render_status(), lab.collect_journals("kubernetes", 80))
            })?),
            false => None,
        };
        Ok(UpReport { lab, reports, leader, formed_after, kubeconfig, kubernetes_after: started.elapsed() })
    }

    /// Wait until the Kubernetes API answers through the VIP with the
    /// kubeconfig from the agents ([`QemuLab::kubeconfig`]); returns it.
    pub fn wait_kubernetes(&self, timeout: Duration) -> anyhow::Result<PathBuf> {
        let path = crate::poll::until("the Kubernetes API through the VIP", timeout, Duration::from_secs(2), || {
            let path = self.kubeconfig()?;
            self.kubectl(&path, &["get", "namespaces", "-o", "json"])?;
            Ok::<_, String>(path)
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(path)
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    fn build_network(&self) -> anyhow::Result<()> {
        ip(&["netns", "add", SWITCH])?;
        ip(&["-n", SWITCH, "link", "set", "lo", "up"])?;
        ip(&["-n", SWITCH, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", SWITCH, "link", "set", BRIDGE, "up"])?;
        for n in &self.nodes {
            ip_cmd_tap(&n.tap)?;
        }
        ip(&["netns", "add", CLIENT])?;
        ip(&["-n", CLIENT, "link", "set", "lo", "up"])?;
        ip(&["-n", SWITCH, "link", "add", "v-client", "type", "veth", "peer", "name", "eth0", "netns", CLIENT])?;
        ip(&["-n", SWITCH, "link", "set", "v-client", "master", BRIDGE])?;
        ip(&["-n", SWITCH, "link", "set", "v-client", "up"])?;
        ip(&["-n", CLIENT, "addr", "add", &format!("{}/{}", self.client_ip, self.prefix), "dev", "eth0"])?;
        ip(&["-n", CLIENT, "link", "set", "eth0", "up"])?;
        self.start_time_server()
    }

    /// chronyd in the client namespace serves this host's clock to the VMs
    /// (`-x`: it never sets the clock). Without it each VM keeps the time
    /// its emulated RTC gave it at boot, whole seconds apart, and a
    /// switchover refuses on the clock offset, as it should.
    fn start_time_server(&self) -> anyhow::Result<()> {
        if crate::skip::find_tool("chronyd").is_none() {
            bail!("chronyd is missing: install the chrony package (the VMs take their time from it)");
        }
        let conf = self.run_dir.join("chrony.conf");
        let pidfile = self.run_dir.join("chronyd.pid");
        let _ = std::fs::remove_file(&pidfile); // Left by a killed lab; absent is fine.
        std::fs::write(
            &conf,
            format!(
                "# The QEMU lab's time server: this host's clock, for the VMs only.\n\
                 local stratum 8\nallow all\nbindaddress {}\ncmdport 0\npidfile {}\n",
                self.client_ip,
                pidfile.display()
            ),
        )
        .with_context(|| format!("writing {}", conf.display()))?;
        let log_path = self.run_dir.join("chronyd.log");
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        // Foreground (-d) under setsid --fork, like QEMU: it outlives `up`
        // and `down` finds it among the namespace's processes.
        let status = Command::new("setsid")
            .args(["--fork", "ip", "netns", "exec", CLIENT, "chronyd", "-x", "-d", "-f"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .context("starting chronyd")?;
        if !status.success() {
            bail!("starting chronyd failed ({status}); see {}", log_path.display());
        }
        crate::poll::until("chronyd's pid file", Duration::from_secs(10), Duration::from_millis(50), || {
            if pidfile.exists() { Ok(()) } else { Err(std::fs::read_to_string(&log_path).unwrap_or_default()) }
        })
        .map_err(|e| anyhow::anyhow!("chronyd did not start: {e}"))?;
        Ok(())
    }

    /// The QEMU configuration of a node.
    pub fn vm_config(&self, node: &Node) -> VmConfig {
        let mut cfg = VmConfig::new(&node.name, &node.dir);
        cfg.memory_mib = self.memory_mib;
        cfg.cpus = self.cpus;
        cfg.firmware = Firmware::Uefi;
        cfg.drives = vec![
            Drive::disk(node.dir.join("disk.qcow2"), DiskFormat::Qcow2),
            Drive::cdrom(node.dir.join("cidata.iso")),
        ];
        cfg.nets = vec![Net::tap(&node.tap, &node.mac)];
        cfg.console = ConsoleMode::Socket;
        cfg
    }

    pub fn console_log(&self, node: &str) -> anyhow::Result<PathBuf> {
        Ok(self.vm_config(self.node(node)?).console_log_path())
    }

    /// Where the next boot's console output starts in the console log.
    pub fn console_offset(&self, node: &str) -> anyhow::Result<u64> {
        Ok(std::fs::metadata(self.console_log(node)?).map(|m| m.len()).unwrap_or(0))
    }

    /// The live QEMU process of `node`.
    pub fn running(&self, node: &str) -> anyhow::Result<Option<u32>> {
        Ok(self.node(node)?.pid.filter(|p| qemu_alive(*p)))
    }

    /// Boot `node` with its disk and UEFI variables (after `kill`, a
    /// power-off, or from `up`). Returns when QEMU answers on QMP.
    pub fn start(&mut self, node: &str) -> anyhow::Result<u32> {
        if let Some(pid) = self.running(node)? {
            bail!("{node} runs already (QEMU pid {pid}); `gemini-lab qemu kill {node}` first");
        }
        let cfg = self.vm_config(self.node(node)?);
        if !cfg.efivars_path().exists() {
            let fw = qemu::ovmf().context("OVMF is not installed: install the ovmf package")?;
            std::fs::copy(&fw.vars, cfg.efivars_path())
                .with_context(|| format!("copying the UEFI variable template {}", fw.vars.display()))?;
        }
        let pidfile = cfg.run_dir.join(format!("{node}.pid"));
        for stale in [cfg.qmp_path(), cfg.console_socket_path(), pidfile.clone()] {
            let _ = std::fs::remove_file(&stale); // Left by a killed QEMU; absent is fine.
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(cfg.qemu_log_path())
            .with_context(|| format!("opening {}", cfg.qemu_log_path().display()))?;
        // setsid --fork: QEMU leaves this command's session and is not its
        // child, so it runs on after `up` returns and nothing here reaps it.
        let status = Command::new("setsid")
            .args(["--fork", "ip", "netns", "exec", SWITCH, qemu::QEMU])
            .args(cfg.args(qemu::accel())?)
            .arg("-pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("starting QEMU for {node} in {SWITCH}"))?;
        if !status.success() {
            bail!("starting QEMU for {node} failed ({status}); see {}", cfg.qemu_log_path().display());
        }
        let failed = |what: &str| {
            let log = std::fs::read_to_string(cfg.qemu_log_path()).unwrap_or_default();
            anyhow::anyhow!(
                "QEMU for {node} {what}: {}\n(log: {})",
                geminik8s::cmd::tail(&log, 10),
                cfg.qemu_log_path().display()
            )
        };
        let pid =
            crate::poll::until("QEMU's pid file and QMP", Duration::from_secs(20), Duration::from_millis(100), || {
                let pid: u32 = std::fs::read_to_string(&pidfile)
                    .map_err(|e| e.to_string())?
                    .trim()
                    .parse()
                    .map_err(|e: std::num::ParseIntError| e.to_string())?;
                qemu::qmp_call(&cfg.qmp_path(), "query-status", None).map_err(|e| format!("{e:#}"))?;
                Ok::<u32, String>(pid)
            })
            .map_err(|e| failed(&format!("did not come up ({e})")))?;
        self.node_mut(node)?.pid = Some(pid);
        self.save()?;
        Ok(pid)
    }

    /// SIGKILL the QEMU of `node`: the node is lost without warning.
    pub fn kill(&mut self, node: &str) -> anyhow::Result<Option<u32>> {
        let pid = self.running(node)?;
        if let Some(pid) = pid {
            sigkill(pid);
            crate::poll::until("QEMU to die", Duration::from_secs(10), Duration::from_millis(20), || {
                if qemu_alive(pid) { Err("alive") } else { Ok(()) }
            })
            .map_err(|e| anyhow::anyhow!("{node} (pid {pid}): {e}"))?;
        }
        self.node_mut(node)?.pid = None;
        self.save()?;
        Ok(pid)
    }

    /// Press the power button of `node` (ACPI): the guest shuts down cleanly.
    pub fn powerdown(&self, node: &str) -> anyhow::Result<()> {
        let cfg = self.vm_config(self.node(node)?);
        qemu::qmp_call(&cfg.qmp_path(), "system_powerdown", None)
            .map(drop)
            .with_context(|| format!("powering {node} down"))
    }

    /// Wait until the QEMU of `node` has exited.
    pub fn wait_stopped(&mut self, node: &str, timeout: Duration) -> anyhow::Result<()> {
        crate::poll::until(&format!("{node} to power off"), timeout, Duration::from_millis(250), || {
            match self.running(node) {
                Ok(Some(pid)) => Err(format!("QEMU pid {pid} still runs")),
                Ok(None) => Ok(()),
                Err(e) => Err(format!("{e:#}")),
            }
        })
        .map_err(|e| anyhow::anyhow!("{e}; console: {}", self.console_log(node).unwrap_or_default().display()))?;
        self.node_mut(node)?.pid = None;
        self.save()
    }

    /// Wait for the boot report of `node` printed after byte `from` of its
    /// console log; returns its fields.
    pub fn wait_boot(&self, node: &str, from: u64, timeout: Duration) -> anyhow::Result<BTreeMap<String, String>> {
        let log = self.console_log(node)?;
        let read = || {
            let bytes = std::fs::read(&log).unwrap_or_default();
            let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
            qemu::clean_console(&bytes[from..])
        };
        let found =
            crate::poll::until(&format!("the boot report of {node}"), timeout, Duration::from_millis(500), || {
                let text = read();
                if let Some(line) = text.lines().find(|l| l.contains(BOOT_REPORT) && l.contains(" agent=")) {
                    return Ok(line.to_string());
                }
                match self.running(node) {
                    Ok(Some(_)) => Err("booting".to_string()),
                    _ => Ok(String::new()),
                }
            });
        match found {
            Ok(line) if !line.is_empty() => Ok(parse_report(&line)),
            other => {
                let why = match other {
                    Err(e) => e,
                    Ok(_) => format!("QEMU of {node} exited before the boot report"),
                };
                bail!("{why}\n--- last 40 console lines ({}) ---\n{}", log.display(), geminik8s::cmd::tail(&read(), 40))
            }
        }
    }

    /// `gemin_k8s status` of both nodes from the client namespace: each
    /// node's status, or why it did not answer.
    pub fn status(&self) -> BTreeMap<String, Result<Value, String>> {
        let config = self.config_dir.join(geminik8s::clusterfile::FILE_NAME);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", CLIENT]).arg(&self.agent_bin);
        cmd.args(["status", "-o", "json", "--timeout", "2s", "--config"]).arg(&config);
        let answer = cmd.stdin(Stdio::null()).output().map_err(|e| e.to_string()).and_then(|out| {
            serde_json::from_slice::<Value>(&out.stdout)
                .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stderr).trim()))
        });
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let one = match &answer {
                    Err(e) => Err(e.clone()),
                    Ok(v) => match &v["nodes"][i]["status"] {
                        Value::Null => Err(v["nodes"][i]["error"].as_str().unwrap_or("no status").to_string()),
                        s => Ok(s.clone()),
                    },
                };
                (n.name.clone(), one)
            })
            .collect()
    }

    /// `gemin_k8s failover --output json EXTRA` from the client namespace
    /// (see [`crate::probe::failover_with`]).
    pub fn failover(&self, extra: &[&str]) -> Result<(bool, Value), String> {
        crate::probe::failover_with(&self.agent_bin, &self.config_dir, extra, client_exec)
    }

    /// `gemin_k8s upgrade --output json EXTRA` from the client namespace:
    /// whether it succeeded, and its report (or its error output).
    pub fn upgrade(&self, extra: &[&str]) -> Result<(bool, Value), String> {
        let cluster = self.config_dir.join(geminik8s::clusterfile::FILE_NAME);
        let (bin, cluster) = (self.agent_bin.display().to_string(), cluster.display().to_string());
        let argv = [&bin, "--config", &cluster, "upgrade", "--output", "json"];
        let out = client_exec(&[&argv[..], extra].concat())?;
        // Its progress lines.
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        let report = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&out.stderr).to_string()));
        Ok((out.status.success(), report))
    }

    /// `gemin_k8s deploy` from the client namespace: the node files of the
    /// cluster directory to the VMs waiting for enrolment.
    pub fn deploy(&self, timeout: Duration) -> anyhow::Result<Value> {
        let (dir, token) = (self.config_dir.display().to_string(), self.config_dir.join("enrolment.token"));
        let timeout = format!("{}s", timeout.as_secs());
        let bin = self.agent_bin.display().to_string();
        let argv = [&bin, "deploy", "--config-dir", &dir, "--token-file", token.to_str().unwrap_or_default()];
        let out = client_exec(&[&argv[..], &["--timeout", &timeout, "--json"]].concat()).map_err(anyhow::Error::msg)?;
        if !out.status.success() {
            bail!("gemin_k8s deploy failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        serde_json::from_slice(&out.stdout).context("reading deploy's JSON")
    }

    /// `gemin_k8s replace-node --json` from the client namespace: whether it
    /// succeeded, and its report (or its error output).
    pub fn replace_node(&self, extra: &[&str]) -> Result<(bool, Value), String> {
        let (bin, dir) = (self.agent_bin.display().to_string(), self.config_dir.display().to_string());
        let argv = [&bin, "replace-node", "--config-dir", &dir, "--json"];
        let out = client_exec(&[&argv[..], extra].concat())?;
        let report = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&out.stderr).to_string()));
        Ok((out.status.success(), report))
    }

    /// A new machine in place of `node`'s, which is gone for good (killed,
    /// its disk left as it was): a fresh disk from the image, a new MAC and
    /// tap, address `ip`, booting the generic image with only the site's
    /// enrolment token (see [`UpOptions::enrol`]). Start it with
    /// [`QemuLab::start`]; `replace-node` does the rest.
    pub fn replace_vm(&mut self, node: &str, ip: IpAddr) -> anyhow::Result<()> {
        if let Some(pid) = self.running(node)? {
            bail!("{node} runs (QEMU pid {pid}); a replaced machine is gone: kill it first");
        }
        let n = self.nodes.len() + 1;
        let old = self.node(node)?.clone();
        let new = Node {
            name: node.to_string(),
            ip,
            mac: format!("52:54:00:77:01:{n:02x}"),
            tap: format!("tap-{node}-{n}"),
            dir: self.run_dir.join(format!("{node}-{n}")),
            pid: None,
        };
        if new.dir.exists() {
            std::fs::remove_dir_all(&new.dir).with_context(|| format!("removing the old {}", new.dir.display()))?;
        }
        std::fs::create_dir_all(&new.dir)?;
        let token = std::fs::read_to_string(self.config_dir.join("enrolment.token"))
            .context("the cluster directory's enrolment.token")?;
        // The lab's key, as the other nodes have it (a new one would lock them out).
        let public_key =
            self.ssh_key.as_ref().map(|k| k.with_extension("pub")).and_then(|p| std::fs::read_to_string(p).ok());
        let data = enrolment_user_data(&token, &new.mac, ip, self.prefix, self.client_ip, public_key.as_deref());
        qemu::make_cidata_iso(&new.dir, &data, &format!("instance-id: lab-{node}-{n}\nlocal-hostname: {node}\n"))?;
        qemu::create_overlay(&self.base_image, &new.dir.join("disk.qcow2"))?;
        ip_cmd_tap(&new.tap)?;
        eprintln!("{node}: new machine at {ip} (the old one, {}, stays off)", old.ip);
        *self.node_mut(node)? = new;
        self.save()
    }

    /// K3s's kubeconfig for the VIP, fetched from the agents by `gemin_k8s
    /// kubeconfig` in the client namespace into `RUN_DIR/kubeconfig.yaml`.
    pub fn kubeconfig(&self) -> Result<PathBuf, String> {
        let dest = self.run_dir.join("kubeconfig.yaml");
        crate::probe::fetch_kubeconfig(&self.agent_bin, &self.config_dir, &dest, client_exec)
    }

    /// `ssh root@NODE COMMAND` from the client namespace with the lab's key;
    /// the command's output.
    pub fn ssh(&self, node: &str, command: &[&str]) -> Result<String, String> {
        let Some(key) = &self.ssh_key else { return Err("the lab made no SSH key (no ssh-keygen)".into()) };
        let target = format!("root@{}", self.node(node).map_err(|e| format!("{e:#}"))?.ip);
        let key = key.to_string_lossy();
        let mut argv = vec!["ssh", "-i", &key, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"];
        argv.extend(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]);
        argv.push(&target);
        argv.extend(command);
        let out = client_exec(&argv)?;
        if !out.status.success() {
            return Err(format!("ssh {node}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Each running node's agent journal of this boot, with the agent's
    /// structured fields, saved as `RUN_DIR/NODE/agent-journal-LABEL.log`
    /// (after a failure, or to compare with one); returns the last `lines`
    /// lines of each (or why there are none).
    pub fn collect_journals(&self, label: &str, lines: usize) -> String {
        let mut text = String::new();
        for n in &self.nodes {
            let path = n.dir.join(format!("agent-journal-{label}.log"));
            let shown = match self.ssh(&n.name, &[&AGENT_JOURNAL[..], &["-o", "json"]].concat()) {
                Ok(json) => {
                    let journal = render_journal(&json);
                    let saved = match std::fs::write(&path, &journal) {
                        Ok(()) => format!("whole: {}", path.display()),
                        Err(e) => format!("not saved to {}: {e}", path.display()),
                    };
                    format!("({saved})\n{}", geminik8s::cmd::tail(&journal, lines))
                }
                Err(e) => format!("none: {e}"),
            };
            text.push_str(&format!("--- {}'s agent journal, last {lines} lines {shown}\n", n.name));
        }
        text
    }

    /// `kubectl` in the client namespace (see [`crate::probe::kubectl_in`]).
    pub fn kubectl(&self, kubeconfig: &Path, args: &[&str]) -> Result<Value, String> {
        crate::probe::kubectl_in(CLIENT, kubeconfig, args)
    }

    /// `etcdctl` in the client namespace, talking to Kine through the VIP.
    pub fn etcd(&self, args: &[&str]) -> Result<Value, String> {
        let endpoint = format!("http://{}:2379", self.vip);
        let out = Command::new("ip")
            .args(["netns", "exec", CLIENT, "env", "ETCDCTL_API=3", "etcdctl", "--endpoints", &endpoint])
            .args(["--command-timeout=2s", "--dial-timeout=500ms", "-w", "json"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// Write a key through the VIP; returns the revision Kine acknowledged.
    pub fn put(&self, key: &str, value: &str) -> Result<i64, String> {
        let v = self.etcd(&["put", key, value])?;
        v["header"]["revision"].as_i64().ok_or_else(|| format!("no revision in {v}"))
    }

    /// Keys under `prefix` through the VIP, in key order.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>, String> {
        let v = self.etcd(&["get", prefix, "--prefix", "--keys-only"])?;
        let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
        Ok(kvs.iter().filter_map(|kv| kv["key"].as_str()).filter_map(crate::probe::base64_decode).collect())
    }

    /// The MAC address the client has for the VIP (whose NIC answers it).
    pub fn client_vip_mac(&self) -> Option<String> {
        let out = ip(&["-n", CLIENT, "neigh", "show", &self.vip.to_string()]).ok()?;
        let mut words = out.split_whitespace();
        words.by_ref().find(|w| *w == "lladdr")?;
        words.next().map(str::to_string)
    }

    /// Wait until one node leads (VIP held, Kine serving, synchronous
    /// replication), the other streams from it, and the VIP answers etcd
    /// from the client namespace. Returns the leader.
    pub fn wait_formed(&self, timeout: Duration) -> anyhow::Result<String> {
        crate::poll::until("one leader with the VIP, the follower streaming", timeout, Duration::from_secs(1), || {
            let status = self.status();
            let mut seen = Vec::new();
            let mut leader = None;
            let mut follower_ok = false;
            for (name, s) in &status {
                match s {
                    Err(e) => seen.push(format!("{name}: {e}")),
                    Ok(v) => {
                        let kine = v["components"]
                            .as_array()
                            .is_some_and(|c| c.iter().any(|c| c["name"] == "kine" && c["state"] == "ok"));
                        if v["role"] == "leader"
                            && v["vip"]["held_here"] == true
                            && kine
                            && v["replication"]["durability"] == "synchronous"
                        {
                            leader = Some(name.clone());
                        }
                        if v["role"] == "follower" && v["replication"]["streaming"] == true {
                            follower_ok = true;
                        }
                        seen.push(format!(
                            "{name}: {} {} vip_here={} {}",
                            v["role"], v["state"], v["vip"]["held_here"], v["replication"]
                        ));
                    }
                }
            }
            let through_vip = self.etcd(&["get", "/", "--prefix", "--keys-only", "--limit", "1"]);
            match (leader, follower_ok, through_vip) {
                (Some(l), true, Ok(_)) => Ok(l),
                (_, _, vip) => {
                    Err(format!("{}; VIP: {}", seen.join("; "), vip.map(|_| "answers".into()).unwrap_or_else(|e| e)))
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("{e}\nconsole logs: {}", self.run_dir.display()))
    }

    /// The status table: QEMU state and what each agent says.
    pub fn render_status(&self) -> String {
        let status = self.status();
        let mut out = format!(
            "cluster {} VIP {}/{} (client namespace {CLIENT}, {})\n{:<7} {:<12} {:<18} {:<14} {:<9} {:<6} {:<4} {}\n",
            self.cluster,
            self.vip,
            self.prefix,
            self.client_ip,
            "NODE",
            "IP",
            "MAC",
            "QEMU",
            "ROLE",
            "EPOCH",
            "VIP",
            "REPLICATION"
        );
        for n in &self.nodes {
            let qemu = match n.pid.filter(|p| qemu_alive(*p)) {
                Some(pid) => format!("pid {pid}"),
                None => "stopped".into(),
            };
            let line = match status.get(&n.name) {
                Some(Ok(v)) => {
                    let repl = &v["replication"];
                    let repl = if repl.is_null() {
                        "-".to_string()
                    } else {
                        format!("{} streaming={}", repl["durability"].as_str().unwrap_or("?"), repl["streaming"])
                    };
                    format!(
                        "{:<9} {:<6} {:<4} {}",
                        v["role"].as_str().unwrap_or("?"),
                        v["epoch"].to_string(),
                        if v["vip"]["held_here"] == true { "yes" } else { "no" },
                        repl
                    )
                }
                Some(Err(e)) => format!("unreachable: {}", e.lines().next().unwrap_or("")),
                None => String::new(),
            };
            out.push_str(&format!("{:<7} {:<12} {:<18} {:<14} {line}\n", n.name, n.ip.to_string(), n.mac, qemu));
        }
        out
    }

    /// Cut node1 <-> node2 while the client still reaches both: both taps
    /// become isolated bridge ports, which may not talk to each other.
    pub fn partition(&self) -> anyhow::Result<()> {
        self.isolate_ports(true)
    }

    /// Undo [`QemuLab::partition`].
    pub fn heal(&self) -> anyhow::Result<()> {
        self.isolate_ports(false)
    }

    fn isolate_ports(&self, on: bool) -> anyhow::Result<()> {
        for n in &self.nodes {
            run(Command::new("ip")
                .args(["netns", "exec", SWITCH, "bridge", "link", "set", "dev", &n.tap])
                .args(["isolated", if on { "on" } else { "off" }]))?;
        }
        Ok(())
    }

    /// Remove everything a lab made: its QEMU processes, taps, bridge and
    /// namespaces, and the disks (logs stay in the run directory). Works
    /// from the state file, and without one from the `gq-` prefix.
    /// Idempotent; returns what it removed.
    pub fn down(run_dir: &Path) -> anyhow::Result<Vec<String>> {
        let mut removed = Vec::new();
        let lab = QemuLab::load(run_dir).ok();
        let mut pids: Vec<u32> = lab.iter().flat_map(|l| l.nodes.iter().filter_map(|n| n.pid)).collect();
        let existing = namespaces()?;
        // QEMU processes started by a lab whose state file is gone.
        pids.extend(netns_pids(&existing, SWITCH));
        // The time server, and whatever else runs there (a client).
        for pid in netns_pids(&existing, CLIENT) {
            sigkill(pid);
            removed.push(format!("pid {pid} in {CLIENT}"));
        }
        pids.sort_unstable();
        pids.dedup();
        for pid in pids.into_iter().filter(|p| qemu_alive(*p)) {
            sigkill(pid);
            crate::poll::until("QEMU to die", Duration::from_secs(10), Duration::from_millis(20), || {
                if qemu_alive(pid) { Err("alive") } else { Ok(()) }
            })
            .map_err(|e| anyhow::anyhow!("QEMU pid {pid}: {e}"))?;
            removed.push(format!("QEMU pid {pid}"));
        }
        for ns in namespaces()? {
            if ns == SWITCH {
                let links = ip(&["-n", SWITCH, "-o", "link", "show"]).unwrap_or_default();
                for tap in links.split_whitespace().filter(|w| w.starts_with("tap-")).map(|w| w.trim_end_matches(':')) {
                    ip(&["-n", SWITCH, "link", "del", tap])?;
                    removed.push(tap.to_string());
                }
            }
            ip(&["netns", "del", &ns]).with_context(|| format!("deleting the namespace {ns}"))?;
            removed.push(ns);
        }
        if let Some(lab) = &lab {
            let mut files = vec![lab.base_image.clone()];
            for n in &lab.nodes {
                let cfg = lab.vm_config(n);
                files.extend([n.dir.join("disk.qcow2"), cfg.qmp_path(), cfg.console_socket_path()]);
                files.push(n.dir.join(format!("{}.pid", n.name)));
            }
            for file in files.iter().filter(|f| f.exists()) {
                std::fs::remove_file(file).with_context(|| format!("removing {}", file.display()))?;
            }
        }
        let state = labstate::state_path(run_dir);
        if state.exists() {
            std::fs::remove_file(&state).with_context(|| format!("removing {}", state.display()))?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2));
    const NODE_FILE: &str = "#cloud-config\nhostname: node1\ngeminik8s:\n  kine:\n    listen: 127.0.0.1:2379\n  k3s:\n    enabled: true\n    extra_args: []\n";

    #[test]
    fn user_data_opens_kine_turns_k3s_off_and_adds_the_network_file() {
        let text = user_data(NODE_FILE, "52:54:00:77:00:01", "10.77.0.11".parse().unwrap(), 24, CLIENT_IP, false, None)
            .unwrap();
        assert!(text.contains("    listen: 0.0.0.0:2379\n"), "{text}");
        assert!(text.contains("  k3s:\n    enabled: false\n"), "{text}");
        let on = user_data(&text, "52:54:00:77:00:01", "10.77.0.11".parse().unwrap(), 24, CLIENT_IP, true, None);
        assert!(on.is_err(), "a file that already has write_files is refused");
        let on = user_data(NODE_FILE, "52:54:00:77:00:01", "10.77.0.11".parse().unwrap(), 24, CLIENT_IP, true, None)
            .unwrap();
        assert!(on.contains("  k3s:\n    enabled: true\n"), "{on}");
        assert!(text.contains("      MACAddress=52:54:00:77:00:01\n"), "{text}");
        assert!(text.contains("      Address=10.77.0.11/24\n"), "{text}");
        assert!(text.contains("      NTP=10.77.0.2\n"), "{text}");
        assert!(!text.contains("users:"), "no key, no users: {text}");
        let key = "ssh-ed25519 AAAAC3Nza gemini-lab\n";
        let keyed =
            user_data(NODE_FILE, "52:54:00:77:00:01", "10.77.0.11".parse().unwrap(), 24, CLIENT_IP, false, Some(key));
        let keyed = keyed.unwrap();
        assert!(
            keyed.ends_with(
                "users:\n  - name: root\n    ssh_authorized_keys:\n      - ssh-ed25519 AAAAC3Nza gemini-lab\n"
            ),
            "{keyed}"
        );
        let own = format!("{NODE_FILE}users: []\n");
        let again = user_data(&own, "m", "10.77.0.11".parse().unwrap(), 24, CLIENT_IP, false, Some(key));
        assert!(again.is_err(), "a file with its own users: is refused when a key is added");
    }

    /// The node file `gemin_k8s init` writes, adapted, passes the agent's
    /// own validation with the network file in `write_files`.
    #[test]
    fn user_data_of_an_init_node_file_is_a_valid_cloud_config() {
        use geminik8s::config::load::load_files;
        use geminik8s::config::validate::CheckContext;
        let Some(bin) = crate::probe::agent_bin() else {
            crate::skip::skip(module_path!(), "no gemin_k8s next to the test binary: `cargo build -p geminik8s-agent`");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        crate::probe::init_cluster(&bin, &dir.path().join("c"), &[]).unwrap();
        let node = std::fs::read_to_string(dir.path().join("c/node1.yaml")).unwrap();
        let key = "ssh-ed25519 AAAAC3Nza gemini-lab";
        let text =
            user_data(&node, "52:54:00:77:00:01", "10.77.0.11".parse().unwrap(), 24, CLIENT_IP, false, Some(key))
                .unwrap();
        let path = dir.path().join("user-data");
        std::fs::write(&path, &text).unwrap();
        let ctx = CheckContext { check_files: false, ..CheckContext::default() };
        let loaded = load_files(&[path], &ctx).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        let files = geminik8s::config::kairos::write_files(&loaded.document).unwrap();
        assert_eq!(files[0].path, "/etc/systemd/network/10-lab.network");
        assert_eq!(files[0].mode(), Ok(0o644));
        let users = geminik8s::config::kairos::users(&loaded.document).unwrap();
        assert_eq!(users.len(), 1);
        assert_eq!((users[0].name.as_str(), users[0].ssh_authorized_keys.as_slice()), ("root", &[key.to_string()][..]));
        assert!(!loaded.gemini.k3s.enabled);
        assert_eq!(loaded.gemini.kine.listen.to_string(), "0.0.0.0:2379");
    }

    #[test]
    fn a_json_journal_reads_as_lines_with_the_agents_fields() {
        let json = concat!(
            r#"{"__REALTIME_TIMESTAMP":"1796033447090885","PRIORITY":"4","SYSLOG_IDENTIFIER":"gemin_k8s","#,
            r#""MESSAGE":"restarting","F_EVENT":"service_restart","F_COMPONENT":"Postgres","F_ATTEMPT":"1","#,
            r#""CODE_LINE":"1327","_PID":"345"}"#,
            "\n",
            r#"{"__REALTIME_TIMESTAMP":"1796033447000001","PRIORITY":"6","SYSLOG_IDENTIFIER":"systemd","#,
            r#""MESSAGE":"Started x.","UNIT":"x.service"}"#,
            "\nnot json\n"
        );
        assert_eq!(
            render_journal(json),
            "10:10:47.090885 WARN  gemin_k8s: restarting event=service_restart component=Postgres attempt=1\n\
             10:10:47.000001 INFO  systemd: Started x.\n\
             not json\n"
        );
    }

    #[test]
    fn emulation_slows_only_the_default_health_timings() {
        let init = "geminik8s:\n  health:\n    interval: 500ms\n    failure_threshold: 3\n    fence_timeout: 2s\n";
        let slowed = emulated_timings(init);
        assert!(slowed.contains("    interval: 2s\n") && slowed.contains("    fence_timeout: 10s\n"), "{slowed}");
        let own = "geminik8s:\n  health:\n    interval: 1s\n    fence_timeout: 5s\n";
        assert_eq!(emulated_timings(own), own);
    }

    #[test]
    fn user_data_refuses_a_file_it_cannot_adapt() {
        let err =
            user_data("#cloud-config\ngeminik8s: {}\n", "m", "10.77.0.11".parse().unwrap(), 24, CLIENT_IP, false, None)
                .unwrap_err();
        assert!(err.to_string().contains("geminik8s.kine.listen"), "{err}");
    }

    #[test]
    fn boot_report_fields() {
        let r = parse_report("[  OK  ] x\ngeminik8s-boot: slot=a root=read-only hostname=node1 agent=active");
        assert_eq!(r["slot"], "a");
        assert_eq!(r["agent"], "active");
    }
}
