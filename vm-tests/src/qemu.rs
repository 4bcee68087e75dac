//! QEMU virtual machines for the image boot tests and the two-node QEMU lab.
//!
//! [`Vm::start`] runs `qemu-system-x86_64` (q35) headless. The first serial
//! port is the console: every byte goes to `RUN_DIR/NAME-console.log` (raw)
//! and to an in-memory buffer that [`Vm::wait_for`] and friends search. The
//! buffer is cleaned for matching: ANSI escape sequences, carriage returns
//! and backspaces are dropped, so firmware that paints its screen with
//! escape codes (OVMF, iPXE) still matches plain text. QEMU's own stderr
//! goes to `RUN_DIR/NAME-qemu.log`, and a QMP socket `RUN_DIR/NAME-qmp.sock`
//! drives resets, ACPI power-off and link faults.
//!
//! Guests may reboot themselves (boot counting and A/B fallback rely on it);
//! set [`VmConfig::no_reboot`] to make a reboot end QEMU instead.
//!
//! Networks never reach beyond the host: user-mode networks run with
//! `restrict=on` (only QEMU's built-in DHCP, DNS and TFTP, plus forwards
//! bound to 127.0.0.1), socket networks use loopback, and taps are whatever
//! the caller bridged them to.
//!
//! Acceleration: [`accel`] uses KVM only when a probe guest really runs on
//! it. Some hosts expose `/dev/kvm` but cannot run firmware on it (nested
//! virtualisation without the needed features); there every guest would
//! hang, so the probe falls back to TCG. `GEMIN_QEMU_ACCEL=kvm|tcg`
//! overrides the probe.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use geminik8s::cmd::tail;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::labstate::run;

/// The QEMU binary every VM runs.
pub const QEMU: &str = "qemu-system-x86_64";

/// How many console lines a timeout error shows.
const TAIL_LINES: usize = 40;

/// How long a wait lets the rest of a matched line arrive.
const LINE_GRACE: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------- accel

/// The accelerator guests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation: slow but works everywhere.
    Tcg,
}

impl Accel {
    /// The value of QEMU's `-accel` option.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The accelerator chosen for this process and why.
#[derive(Clone, Debug)]
pub struct AccelChoice {
    pub accel: Accel,
    /// One sentence for test output: the override, or what the probe saw.
    pub reason: String,
}

/// The accelerator for every VM of this process: `GEMIN_QEMU_ACCEL` when
/// set, otherwise the result of [`probe_kvm`] (run once, then cached).
pub fn accel() -> Accel {
    accel_choice().accel
}

/// [`accel`] with the reason, for test output.
pub fn accel_choice() -> &'static AccelChoice {
    static CHOICE: OnceLock<AccelChoice> = OnceLock::new();
    CHOICE.get_or_init(|| match std::env::var("GEMIN_QEMU_ACCEL").as_deref() {
        Ok("kvm") => AccelChoice { accel: Accel::Kvm, reason: "GEMIN_QEMU_ACCEL=kvm".into() },
        Ok("tcg") => AccelChoice { accel: Accel::Tcg, reason: "GEMIN_QEMU_ACCEL=tcg".into() },
        Ok(other) => AccelChoice {
            accel: Accel::Tcg,
            reason: format!("GEMIN_QEMU_ACCEL={other:?} is neither kvm nor tcg; using tcg"),
        },
        Err(_) => match probe_kvm() {
            Ok(()) => AccelChoice { accel: Accel::Kvm, reason: "a probe guest ran on KVM".into() },
            Err(e) => AccelChoice { accel: Accel::Tcg, reason: format!("KVM unusable, using TCG: {e:#}") },
        },
    })
}

/// Boot firmware under `-accel kvm` and wait for it to print on the serial
/// console. OVMF is the probe guest when installed (it exercises more of the
/// CPU than SeaBIOS, and is what hangs on broken nested KVM); SeaBIOS
/// otherwise. `Err` says why KVM is not usable.
pub fn probe_kvm() -> Result<()> {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").context("opening /dev/kvm")?;
    let dir = tempfile::tempdir().context("creating a temporary directory for the KVM probe")?;
    let serial = dir.path().join("serial.log");
    let mut cmd = Command::new(QEMU);
    cmd.args(["-accel", "kvm", "-machine", "q35", "-m", "128", "-nodefaults", "-nographic", "-monitor", "none"]);
    cmd.arg("-serial").arg(format!("file:{}", serial.display()));
    if let Some(fw) = ovmf() {
        let vars = dir.path().join("vars.fd");
        std::fs::copy(&fw.vars, &vars).with_context(|| format!("copying {}", fw.vars.display()))?;
        cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={}", fw.code.display()));
        cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
    }
    let stderr = dir.path().join("qemu.log");
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(File::create(&stderr)?);
    let mut child = cmd.spawn().with_context(|| format!("starting {QEMU} (is QEMU installed?)"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let verdict = loop {
        let printed = std::fs::metadata(&serial).map(|m| m.len() > 0).unwrap_or(false);
        let log = std::fs::read_to_string(&stderr).unwrap_or_default();
        if printed {
            break Ok(());
        }
        if let Some(line) = log.lines().find(|l| l.contains("KVM internal error")) {
            let detail = if log.contains("emulation failure") { " (emulation failure)" } else { "" };
            break Err(anyhow!("the probe guest (firmware under -accel kvm) stopped: {line}{detail}"));
        }
        if let Some(status) = child.try_wait()? {
            break Err(anyhow!("the probe guest exited ({status}): {}", tail(&log, 3)));
        }
        if Instant::now() >= deadline {
            break Err(anyhow!("the probe guest printed nothing on its serial console within 20s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill(); // It may have exited already; either way it is reaped below.
    child.wait()?;
    verdict
}

// ---------------------------------------------------------------- firmware

/// Boot firmware of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// OVMF (EDK II). Each VM gets its own copy of the variable store in
    /// its run directory, made on the first start and kept afterwards, so
    /// boot entries and EFI boot counting survive reboots and restarts of
    /// the same VM.
    Uefi,
    /// SeaBIOS, QEMU's default.
    Bios,
}

/// An OVMF build: the read-only code and the template of its variables.
#[derive(Clone, Debug)]
pub struct Ovmf {
    pub code: PathBuf,
    pub vars: PathBuf,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "interface-types")]
    interface_types: Vec<String>,
    mapping: Mapping,
    #[serde(default)]
    features: Vec<String>,
    targets: Vec<Target>,
}

#[derive(Deserialize)]
struct Mapping {
    device: String,
    executable: Option<FileRef>,
    #[serde(rename = "nvram-template")]
    nvram_template: Option<FileRef>,
}

#[derive(Deserialize)]
struct FileRef {
    filename: PathBuf,
    format: Option<String>,
}

#[derive(Deserialize)]
struct Target {
    architecture: String,
    machines: Vec<String>,
}

/// Find OVMF without Secure Boot: `GEMIN_OVMF_CODE`/`GEMIN_OVMF_VARS` when
/// set, else QEMU's firmware descriptors (`/usr/share/qemu/firmware/*.json`),
/// else the usual install paths.
pub fn ovmf() -> Option<Ovmf> {
    if let (Some(code), Some(vars)) = (std::env::var_os("GEMIN_OVMF_CODE"), std::env::var_os("GEMIN_OVMF_VARS")) {
        return Some(Ovmf { code: code.into(), vars: vars.into() });
    }
    for dir in ["/etc/qemu/firmware", "/usr/share/qemu/firmware"] {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let Some(d) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Descriptor>(&b).ok()) else {
                continue;
            };
            let q35 =
                d.targets.iter().any(|t| t.architecture == "x86_64" && t.machines.iter().any(|m| m.contains("q35")));
            let plain = !d.features.iter().any(|f| f == "secure-boot" || f == "requires-smm" || f == "enrolled-keys");
            let raw = |f: &FileRef| f.format.as_deref().unwrap_or("raw") == "raw";
            if let (true, true, true, Some(code), Some(vars)) = (
                d.interface_types.iter().any(|t| t == "uefi"),
                q35 && plain,
                d.mapping.device == "flash",
                d.mapping.executable.filter(raw),
                d.mapping.nvram_template.filter(raw),
            ) && code.filename.is_file()
                && vars.filename.is_file()
            {
                return Some(Ovmf { code: code.filename, vars: vars.filename });
            }
        }
    }
    [
        ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
        ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
        ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
        ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),
    ]
    .into_iter()
    .map(|(c, v)| Ovmf { code: c.into(), vars: v.into() })
    .find(|o| o.code.is_file() && o.vars.is_file())
}

/// Directories where QEMU looks for NIC option ROMs (iPXE) on common hosts.
const ROM_DIRS: &[&str] = &["/usr/share/qemu", "/usr/lib/ipxe/qemu", "/usr/share/ipxe/qemu"];

/// Whether the iPXE option ROM that network boot needs for `model` is
/// installed (`pxe-*.rom` for BIOS, `efi-*.rom` for UEFI).
pub fn nic_rom_installed(model: NicModel, firmware: Firmware) -> bool {
    let base = match model {
        NicModel::VirtioNet => "virtio",
        NicModel::E1000 => "e1000",
    };
    let file = match firmware {
        Firmware::Bios => format!("pxe-{base}.rom"),
        Firmware::Uefi => format!("efi-{base}.rom"),
    };
    ROM_DIRS.iter().any(|d| Path::new(d).join(&file).is_file())
}

/// `Some(reason)` when a VM with `firmware` cannot start here (QEMU or
/// OVMF missing), for tests to skip with.
pub fn requires(firmware: Firmware) -> Option<String> {
    if crate::skip::find_tool(QEMU).is_none() {
        return Some(format!("{QEMU} is not installed (install QEMU, e.g. the qemu-system-x86 package)"));
    }
    if firmware == Firmware::Uefi && ovmf().is_none() {
        return Some(
            "OVMF is not installed (install the ovmf package, or set GEMIN_OVMF_CODE and GEMIN_OVMF_VARS)".into(),
        );
    }
    None
}

// ---------------------------------------------------------------- config

/// Disk image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// How a drive is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriveInterface {
    /// virtio-blk: `/dev/vdX` in the guest.
    Virtio,
    /// A SATA (AHCI) disk: `/dev/sdX`.
    Sata,
    /// A SATA CD-ROM: `/dev/srN`, for ISO images (boot media, CIDATA).
    Cdrom,
}

/// A disk or CD-ROM.
#[derive(Clone, Debug)]
pub struct Drive {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub interface: DriveInterface,
    pub read_only: bool,
    /// Serial number the guest sees (`/dev/disk/by-id/...`).
    pub serial: Option<String>,
}

impl Drive {
    /// A writable virtio disk.
    pub fn disk(path: impl Into<PathBuf>, format: DiskFormat) -> Drive {
        Drive { path: path.into(), format, interface: DriveInterface::Virtio, read_only: false, serial: None }
    }

    /// A read-only CD-ROM holding an ISO image.
    pub fn cdrom(path: impl Into<PathBuf>) -> Drive {
        Drive {
            path: path.into(),
            format: DiskFormat::Raw,
            interface: DriveInterface::Cdrom,
            read_only: true,
            serial: None,
        }
    }
}

/// NIC model the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicModel {
    VirtioNet,
    E1000,
}

/// A port forward from 127.0.0.1 on the host into a user-mode network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostForward {
    pub host_port: u16,
    pub guest_port: u16,
}

/// Where a NIC's frames go.
#[derive(Clone, Debug)]
pub enum NetBackend {
    /// QEMU's user-mode network (10.0.2.0/24, guest 10.0.2.15, host
    /// 10.0.2.2), isolated with `restrict=on`. With `tftp_dir` QEMU serves
    /// that directory over TFTP and DHCP hands out `bootfile`: the PXE path.
    User {
        tftp_dir: Option<PathBuf>,
        bootfile: Option<String>,
        host_forwards: Vec<HostForward>,
    },
    /// A tap device the caller created (and usually put in a bridge).
    Tap {
        ifname: String,
    },
    /// A point-to-point link over 127.0.0.1: one VM listens on `port`,
    /// the other connects to it. No root needed.
    SocketListen {
        port: u16,
    },
    SocketConnect {
        port: u16,
    },
}

/// A network interface: backend, model and MAC address.
#[derive(Clone, Debug)]
pub struct Net {
    pub backend: NetBackend,
    pub model: NicModel,
    /// `52:54:00:xx:xx:xx`; QEMU picks one when `None`.
    pub mac: Option<String>,
}

impl Net {
    /// A user-mode network, optionally serving `tftp_dir` with DHCP
    /// bootfile `bootfile`.
    pub fn user(tftp_dir: Option<PathBuf>, bootfile: Option<&str>) -> Net {
        Net {
            backend: NetBackend::User { tftp_dir, bootfile: bootfile.map(str::to_string), host_forwards: Vec::new() },
            model: NicModel::VirtioNet,
            mac: None,
        }
    }

    /// A NIC on the caller's tap device `ifname`, with address `mac`.
    pub fn tap(ifname: &str, mac: &str) -> Net {
        Net {
            backend: NetBackend::Tap { ifname: ifname.to_string() },
            model: NicModel::VirtioNet,
            mac: Some(mac.to_string()),
        }
    }
}

/// What the firmware tries first. The other devices follow, disks before
/// CD-ROMs before networks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootOrder {
    Disk,
    Cdrom,
    Network,
}

/// Everything [`Vm::start`] needs. Build with [`VmConfig::new`] and set
/// fields.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Names the files in `run_dir` and the QEMU process.
    pub name: String,
    /// Console log, QEMU log, QMP socket and UEFI variables live here.
    pub run_dir: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub firmware: Firmware,
    pub drives: Vec<Drive>,
    pub nets: Vec<Net>,
    pub boot: BootOrder,
    /// End QEMU when the guest reboots (`-no-reboot`). Off by default:
    /// boot fallback relies on guests rebooting themselves.
    pub no_reboot: bool,
    /// Appended to the command line as they are.
    pub extra_args: Vec<String>,
    /// Where the serial console goes.
    pub console: ConsoleMode,
}

/// Where a VM's serial console goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConsoleMode {
    /// QEMU's stdin and stdout, which [`Vm`] reads and writes. QEMU ends
    /// with the process that started it.
    #[default]
    Stdio,
    /// A Unix socket server `RUN_DIR/NAME-console.sock` (connect to type on
    /// the console), every byte also appended to the console log. For VMs
    /// that outlive the process that started them (the QEMU lab); [`Vm`]
    /// cannot drive them.
    Socket,
}

impl VmConfig {
    /// 1 GiB, one CPU, UEFI, boot from disk, no drives, no NICs.
    pub fn new(name: &str, run_dir: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            name: name.to_string(),
            run_dir: run_dir.into(),
            memory_mib: 1024,
            cpus: 1,
            firmware: Firmware::Uefi,
            drives: Vec::new(),
            nets: Vec::new(),
            boot: BootOrder::Disk,
            no_reboot: false,
            extra_args: Vec::new(),
            console: ConsoleMode::Stdio,
        }
    }

    pub fn console_log_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}-console.log", self.name))
    }

    pub fn qemu_log_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}-qemu.log", self.name))
    }

    /// The console socket of [`ConsoleMode::Socket`].
    pub fn console_socket_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}-console.sock", self.name))
    }

    pub fn qmp_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}-qmp.sock", self.name))
    }

    /// This VM's copy of the UEFI variable store.
    pub fn efivars_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}-OVMF_VARS.fd", self.name))
    }

    /// The QEMU arguments (without the binary), for `accel`. Prepares
    /// nothing on disk; [`Vm::start`] copies the UEFI variables first.
    pub fn args(&self, accel: Accel) -> Result<Vec<String>> {
        let mut a: Vec<String> = Vec::new();
        fn push(a: &mut Vec<String>, items: &[&str]) {
            a.extend(items.iter().map(|s| s.to_string()));
        }
        push(&mut a, &["-name", &self.name, "-machine", "q35", "-accel", accel.as_str()]);
        push(&mut a, &["-m", &self.memory_mib.to_string(), "-smp", &self.cpus.to_string()]);
        // No default devices; -nographic makes SeaBIOS and OVMF use the serial console.
        push(&mut a, &["-nodefaults", "-nographic", "-monitor", "none"]);
        let chardev = match self.console {
            ConsoleMode::Stdio => "stdio,id=console,signal=off".to_string(),
            ConsoleMode::Socket => format!(
                "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
                self.console_socket_path().display(),
                self.console_log_path().display()
            ),
        };
        push(&mut a, &["-chardev", &chardev, "-serial", "chardev:console"]);
        let qmp = self.qmp_path();
        push(&mut a, &["-qmp", &format!("unix:{},server=on,wait=off", qmp.display())]);
        if self.no_reboot {
            push(&mut a, &["-no-reboot"]);
        }
        if self.firmware == Firmware::Uefi {
            let fw = ovmf().ok_or_else(|| {
                anyhow!("OVMF is not installed: install the ovmf package or set GEMIN_OVMF_CODE and GEMIN_OVMF_VARS")
            })?;
            push(&mut a, &["-drive", &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", fw.code.display())]);
            push(&mut a, &["-drive", &format!("if=pflash,format=raw,unit=1,file={}", self.efivars_path().display())]);
        }

        // Boot priority: the chosen kind first, then disks, CD-ROMs, networks.
        let rank = |kind: BootOrder| {
            let base = match kind {
                BootOrder::Disk => 1,
                BootOrder::Cdrom => 2,
                BootOrder::Network => 3,
            };
            if kind == self.boot { 0 } else { base }
        };
        let mut bootindex = Vec::new(); // (rank, position, device arg index)
        let mut sata_port = 0;
        for (i, d) in self.drives.iter().enumerate() {
            let format = match d.format {
                DiskFormat::Raw => "raw",
                DiskFormat::Qcow2 => "qcow2",
            };
            let path = d.path.to_str().ok_or_else(|| anyhow!("drive path {} is not UTF-8", d.path.display()))?;
            if path.contains(',') {
                bail!("drive path {path} contains a comma, which QEMU's option syntax cannot take; rename it");
            }
            let ro = if d.read_only { ",readonly=on" } else { "" };
            let media = if d.interface == DriveInterface::Cdrom { ",media=cdrom" } else { "" };
            push(&mut a, &["-drive", &format!("if=none,id=drive{i},file={path},format={format}{ro}{media}")]);
            let serial = d.serial.as_deref().map(|s| format!(",serial={s}")).unwrap_or_default();
            let (device, kind) = match d.interface {
                DriveInterface::Virtio => (format!("virtio-blk-pci,drive=drive{i}{serial}"), BootOrder::Disk),
                DriveInterface::Sata | DriveInterface::Cdrom => {
                    if sata_port > 5 {
                        bail!("VM {} has more than 6 SATA drives and CD-ROMs; use virtio disks", self.name);
                    }
                    let dev = if d.interface == DriveInterface::Cdrom { "ide-cd" } else { "ide-hd" };
                    sata_port += 1;
                    let kind = if d.interface == DriveInterface::Cdrom { BootOrder::Cdrom } else { BootOrder::Disk };
                    (format!("{dev},drive=drive{i},bus=ide.{}{serial}", sata_port - 1), kind)
                }
            };
            bootindex.push((rank(kind), bootindex.len(), a.len() + 1));
            push(&mut a, &["-device", &device]);
        }
        for (i, n) in self.nets.iter().enumerate() {
            let netdev = match &n.backend {
                NetBackend::User { tftp_dir, bootfile, host_forwards } => {
                    let mut s = format!("user,id=net{i},restrict=on");
                    if let Some(dir) = tftp_dir {
                        let dir = std::path::absolute(dir)?;
                        write!(s, ",tftp={}", dir.display())?;
                    }
                    if let Some(file) = bootfile {
                        write!(s, ",bootfile={file}")?;
                    }
                    for f in host_forwards {
                        write!(s, ",hostfwd=tcp:127.0.0.1:{}-:{}", f.host_port, f.guest_port)?;
                    }
                    s
                }
                NetBackend::Tap { ifname } => format!("tap,id=net{i},ifname={ifname},script=no,downscript=no"),
                NetBackend::SocketListen { port } => format!("socket,id=net{i},listen=127.0.0.1:{port}"),
                NetBackend::SocketConnect { port } => format!("socket,id=net{i},connect=127.0.0.1:{port}"),
            };
            push(&mut a, &["-netdev", &netdev]);
            let model = match n.model {
                NicModel::VirtioNet => "virtio-net-pci",
                NicModel::E1000 => "e1000",
            };
            let mac = n.mac.as_deref().map(|m| format!(",mac={m}")).unwrap_or_default();
            bootindex.push((rank(BootOrder::Network), bootindex.len(), a.len() + 1));
            push(&mut a, &["-device", &format!("{model},netdev=net{i},id=nic{i}{mac}")]);
        }
        bootindex.sort();
        for (index, (_, _, arg)) in bootindex.into_iter().enumerate() {
            write!(a[arg], ",bootindex={index}")?;
        }
        a.extend(self.extra_args.iter().cloned());
        Ok(a)
    }
}

// ---------------------------------------------------------------- console

/// A position in the console output; see [`Vm::mark`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark(usize);

#[derive(Default)]
struct Console {
    /// Cleaned text (see the module docs).
    text: String,
    /// The reader saw end of file: QEMU exited.
    closed: bool,
    /// Escape-sequence state carried across reads.
    esc: Esc,
    /// Bytes of an incomplete UTF-8 character carried across reads.
    partial: Vec<u8>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Esc {
    #[default]
    None,
    Start,
    Csi,
}

impl Console {
    fn push(&mut self, bytes: &[u8]) {
        let mut buf = std::mem::take(&mut self.partial);
        buf.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&buf) {
            Ok(_) => buf.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => buf.len(),
        };
        self.partial = buf.split_off(valid);
        for c in String::from_utf8_lossy(&buf).chars() {
            self.esc = match (self.esc, c) {
                (Esc::None, '\u{1b}') => Esc::Start,
                (Esc::None, '\r' | '\u{8}' | '\0') => Esc::None,
                (Esc::None, c) => {
                    self.text.push(c);
                    Esc::None
                }
                (Esc::Start, '[') => Esc::Csi,
                (Esc::Start, _) => Esc::None,
                (Esc::Csi, '\u{40}'..='\u{7e}') => Esc::None,
                (Esc::Csi, _) => Esc::Csi,
            };
        }
    }
}

/// Console bytes (a console log file) cleaned as [`Vm`] cleans what it
/// matches: no escape sequences, carriage returns or backspaces.
pub fn clean_console(bytes: &[u8]) -> String {
    let mut c = Console::default();
    c.push(bytes);
    c.text
}

type Shared = Arc<(Mutex<Console>, Condvar)>;

fn reader(mut out: impl Read, log: PathBuf, shared: Shared) {
    let mut file = File::create(&log).ok();
    let mut buf = [0u8; 4096];
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        if n > 0
            && let Some(f) = file.as_mut()
        {
            // A full disk must not stop the in-memory console the tests wait on.
            let _ = f.write_all(&buf[..n]);
        }
        let (lock, cond) = &*shared;
        let mut c = lock.lock().unwrap_or_else(|e| e.into_inner());
        if n == 0 {
            c.closed = true;
            cond.notify_all();
            return;
        }
        c.push(&buf[..n]);
        cond.notify_all();
    }
}

// ---------------------------------------------------------------- qmp

/// Run one QMP command on the socket at `path` and return its `return`
/// value. QEMU serves one QMP client at a time: callers sharing a socket
/// take turns.
pub fn qmp_call(path: &Path, command: &str, arguments: Option<Value>) -> Result<Value> {
    let stream = UnixStream::connect(path).with_context(|| format!("connecting to QMP at {}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let mut next = || -> Result<Value> {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("QMP closed the connection");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))
    };
    next()?; // greeting
    let mut call = |execute: &str, args: Option<Value>| -> Result<Value> {
        let mut msg = json!({ "execute": execute });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        writeln!(w, "{msg}")?;
        loop {
            let v = next()?;
            if let Some(ret) = v.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = v.get("error") {
                bail!("QMP {execute} failed: {err}");
            }
            // An asynchronous event: skip it.
        }
    };
    call("qmp_capabilities", None)?;
    call(command, arguments).with_context(|| format!("QMP {command}"))
}

// ---------------------------------------------------------------- vm

/// A running QEMU virtual machine. Dropping it kills QEMU.
pub struct Vm {
    cfg: VmConfig,
    child: Mutex<Child>,
    stdin: Mutex<Option<ChildStdin>>,
    console: Shared,
    reader: Option<JoinHandle<()>>,
    accel: Accel,
    /// QEMU serves one QMP client at a time.
    qmp_lock: Mutex<()>,
}

impl Vm {
    /// Start QEMU for `cfg` on [`accel`] and wait until its QMP socket
    /// answers.
    pub fn start(cfg: VmConfig) -> Result<Vm> {
        if cfg.console != ConsoleMode::Stdio {
            bail!("VM {}: Vm::start drives the console over stdio; ConsoleMode::Socket is for detached VMs", cfg.name);
        }
        std::fs::create_dir_all(&cfg.run_dir).with_context(|| format!("creating {}", cfg.run_dir.display()))?;
        if cfg.firmware == Firmware::Uefi && !cfg.efivars_path().exists() {
            let fw = ovmf().ok_or_else(|| anyhow!("OVMF is not installed: install the ovmf package"))?;
            std::fs::copy(&fw.vars, cfg.efivars_path())
                .with_context(|| format!("copying the UEFI variable template {}", fw.vars.display()))?;
        }
        let qmp = cfg.qmp_path();
        if qmp.as_os_str().len() > 100 {
            bail!("QMP socket path {} is too long for a Unix socket; use a shorter run_dir", qmp.display());
        }
        let _ = std::fs::remove_file(&qmp); // A stale socket of an earlier run; absent is fine.
        let accel = accel();
        let args = cfg.args(accel)?;
        let log =
            File::create(cfg.qemu_log_path()).with_context(|| format!("creating {}", cfg.qemu_log_path().display()))?;
        let mut child = Command::new(QEMU)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {QEMU} for VM {} (is QEMU installed?)", cfg.name))?;
        let out = child.stdout.take().expect("stdout is piped");
        let stdin = child.stdin.take();
        let console: Shared = Arc::default();
        let reader = {
            let (log, shared) = (cfg.console_log_path(), console.clone());
            std::thread::Builder::new()
                .name(format!("{}-console", cfg.name))
                .spawn(move || reader(out, log, shared))
                .context("starting the console reader thread")?
        };
        let vm = Vm {
            cfg,
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
            console,
            reader: Some(reader),
            accel,
            qmp_lock: Mutex::default(),
        };
        let ready = crate::poll::until("the QMP socket", Duration::from_secs(15), Duration::from_millis(50), || {
            if let Some(status) = vm.child.lock().unwrap().try_wait().map_err(|e| e.to_string())? {
                return Ok(Err(status));
            }
            vm.qmp("query-status", None).map(Ok).map_err(|e| format!("{e:#}"))
        });
        match ready {
            Ok(Ok(_)) => Ok(vm),
            Ok(Err(status)) => Err(vm.failure(&format!("QEMU exited at start ({status})"))),
            Err(e) => Err(vm.failure(&e)),
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// The accelerator this VM runs on.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// The raw serial console log.
    pub fn console_log_path(&self) -> PathBuf {
        self.cfg.console_log_path()
    }

    /// The cleaned console output so far.
    pub fn console(&self) -> String {
        self.console.0.lock().unwrap().text.clone()
    }

    /// The end of the console output so far: pass it to
    /// [`Vm::wait_after`] to wait for something printed later (after a
    /// reset, a command, a reboot).
    pub fn mark(&self) -> Mark {
        Mark(self.console.0.lock().unwrap().text.len())
    }

    /// The cleaned console output after `mark`.
    pub fn console_since(&self, mark: Mark) -> String {
        let c = self.console.0.lock().unwrap();
        c.text.get(mark.0..).unwrap_or_default().to_string()
    }

    /// Wait until `needle` appears anywhere in the console output; returns
    /// the line holding it.
    pub fn wait_for(&self, needle: &str, deadline: Duration) -> Result<String> {
        self.wait_for_any(&[needle], deadline).map(|(_, line)| line)
    }

    /// Wait until one of `needles` appears anywhere in the console output;
    /// returns which one (the earliest in the output) and its line.
    pub fn wait_for_any(&self, needles: &[&str], deadline: Duration) -> Result<(usize, String)> {
        self.wait_after(&mut Mark(0), needles, deadline)
    }

    /// Wait until one of `needles` appears after `cursor`; returns which
    /// one and its line (whole, or as far as printed when it does not end
    /// within half a second, as with prompts), and moves `cursor` past the match so the next
    /// call waits for later output. Fails early when QEMU exits.
    pub fn wait_after(&self, cursor: &mut Mark, needles: &[&str], deadline: Duration) -> Result<(usize, String)> {
        let until = Instant::now() + deadline;
        let (lock, cond) = &*self.console;
        let mut c = lock.lock().unwrap();
        loop {
            let text = c.text.get(cursor.0..).unwrap_or_default();
            let hit = needles.iter().enumerate().filter_map(|(i, n)| text.find(n).map(|at| (at, i))).min();
            if let Some((at, i)) = hit {
                let at = cursor.0 + at;
                // Give the rest of the line a moment to arrive; prompts never end theirs.
                let grace = Instant::now() + LINE_GRACE;
                while !c.text[at..].contains('\n') && !c.closed && Instant::now() < grace.min(until) {
                    c = cond.wait_timeout(c, grace.min(until) - Instant::now()).unwrap().0;
                }
                let start = c.text[..at].rfind('\n').map_or(0, |p| p + 1);
                let end = at + c.text[at..].find('\n').unwrap_or(c.text.len() - at);
                let line = c.text[start..end].to_string();
                // Past the needle, not the line: a prompt line grows while we look at it.
                *cursor = Mark(at + needles[i].len());
                return Ok((i, line));
            }
            let now = Instant::now();
            if c.closed || now >= until {
                let why = if c.closed { "QEMU exited".to_string() } else { format!("timed out after {deadline:?}") };
                drop(c);
                return Err(
                    self.failure(&format!("{why} waiting for {needles:?} on the console of VM {}", self.cfg.name))
                );
            }
            c = cond.wait_timeout(c, until - now).unwrap().0;
        }
    }

    /// Type `line` and Enter on the serial console.
    pub fn send_line(&self, line: &str) -> Result<()> {
        let mut stdin = self.stdin.lock().unwrap();
        let pipe = stdin.as_mut().ok_or_else(|| anyhow!("the console of VM {} is closed", self.cfg.name))?;
        pipe.write_all(format!("{line}\r").as_bytes())
            .and_then(|()| pipe.flush())
            .with_context(|| format!("writing to the console of VM {} (has QEMU exited?)", self.cfg.name))
    }

    /// Run a QMP command and return its `return` value.
    pub fn qmp(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let _one = self.qmp_lock.lock().unwrap();
        qmp_call(&self.cfg.qmp_path(), command, arguments).with_context(|| format!("VM {}", self.cfg.name))
    }

    /// Hard reset, like the reset button.
    pub fn reset(&self) -> Result<()> {
        self.qmp("system_reset", None).map(drop)
    }

    /// ACPI power button: the guest shuts down if it listens.
    pub fn powerdown(&self) -> Result<()> {
        self.qmp("system_powerdown", None).map(drop)
    }

    /// Shut the guest down as an operator would: press the power button,
    /// press it again every 30 s while the machine runs (a guest still
    /// starting its services may not act on the first press yet), and wait
    /// up to `deadline` for QEMU to exit.
    pub fn shut_down(&self, deadline: Duration) -> Result<ExitStatus> {
        const AGAIN: Duration = Duration::from_secs(30);
        self.powerdown()?;
        let mut pressed = Instant::now();
        let res = crate::poll::until("the guest to power off", deadline, Duration::from_millis(200), || {
            match self.child.lock().unwrap().try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            if pressed.elapsed() >= AGAIN {
                // QEMU may be exiting by now: a failed press is not an error.
                let _ = self.powerdown();
                pressed = Instant::now();
                return Err("still running; the power button pressed again".to_string());
            }
            Err("still running".to_string())
        });
        res.map_err(|e| self.failure(&format!("VM {}: {e}", self.cfg.name)))
    }

    /// Ask QEMU to exit now (no guest shutdown).
    pub fn quit(&self) -> Result<()> {
        self.qmp("quit", None).map(drop)
    }

    /// Pull or plug the cable of NIC number `index` (in [`VmConfig::nets`]).
    pub fn set_link(&self, index: usize, up: bool) -> Result<()> {
        self.qmp("set_link", Some(json!({ "name": format!("nic{index}"), "up": up }))).map(drop)
    }

    /// SIGKILL QEMU (a node lost without warning) and reap it.
    pub fn kill(&self) -> Result<ExitStatus> {
        let mut child = self.child.lock().unwrap();
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        child.kill().with_context(|| format!("killing QEMU of VM {}", self.cfg.name))?;
        Ok(child.wait()?)
    }

    /// Wait for QEMU to exit (guest power-off, `-no-reboot` reboot, quit).
    pub fn wait_exit(&self, deadline: Duration) -> Result<ExitStatus> {
        let res = crate::poll::until("QEMU to exit", deadline, Duration::from_millis(50), || {
            match self.child.lock().unwrap().try_wait() {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("still running".to_string()),
                Err(e) => Err(e.to_string()),
            }
        });
        res.map_err(|e| self.failure(&format!("VM {}: {e}", self.cfg.name)))
    }

    /// Whether QEMU still runs.
    pub fn is_running(&self) -> bool {
        matches!(self.child.lock().unwrap().try_wait(), Ok(None))
    }

    /// An error with `what`, the console tail and where the logs are.
    fn failure(&self, what: &str) -> anyhow::Error {
        let console = self.console();
        let qemu_log = std::fs::read_to_string(self.cfg.qemu_log_path()).unwrap_or_default();
        let mut msg = format!(
            "{what}\n--- last {TAIL_LINES} console lines ({}) ---\n{}",
            self.cfg.console_log_path().display(),
            tail(&console, TAIL_LINES)
        );
        if !qemu_log.trim().is_empty() {
            write!(msg, "\n--- QEMU log ({}) ---\n{}", self.cfg.qemu_log_path().display(), tail(&qemu_log, 10)).ok();
        }
        anyhow!(msg)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("VM {}: {e:#}", self.cfg.name);
        }
        self.stdin.lock().unwrap().take();
        if let Some(r) = self.reader.take() {
            let _ = r.join(); // The reader only panics if the console lock was poisoned.
        }
    }
}

// ---------------------------------------------------------------- images

/// Write a NoCloud seed ISO `dir/cidata.iso` (volume id `CIDATA`, Joliet
/// and Rock Ridge) holding `user-data` and `meta-data`; the files also stay
/// in `dir/cidata/`. Needs xorriso.
pub fn make_cidata_iso(dir: &Path, user_data: &str, meta_data: &str) -> Result<PathBuf> {
    let src = dir.join("cidata");
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    for (name, body) in [("user-data", user_data), ("meta-data", meta_data)] {
        std::fs::write(src.join(name), body).with_context(|| format!("writing {}", src.join(name).display()))?;
    }
    let iso = dir.join("cidata.iso");
    let _ = std::fs::remove_file(&iso); // xorriso refuses to overwrite; absent is fine.
    run(Command::new("xorriso")
        .args(["-as", "genisoimage", "-output"])
        .arg(&iso)
        .args(["-volid", "CIDATA", "-joliet", "-rock"])
        .arg(&src))
    .context("building the CIDATA seed ISO (install xorriso)")?;
    Ok(iso)
}

#[derive(Deserialize)]
struct ImgInfo {
    format: String,
}

/// Create `path`, a qcow2 overlay whose backing file is `base` (any format
/// qemu-img detects): each VM writes to its own overlay, the shared image
/// stays untouched.
pub fn create_overlay(base: &Path, path: &Path) -> Result<()> {
    let base = std::path::absolute(base)?;
    let out = run(Command::new("qemu-img").args(["info", "--output=json"]).arg(&base))
        .with_context(|| format!("inspecting the base image {}", base.display()))?;
    let info: ImgInfo = serde_json::from_str(&out).context("parsing qemu-img info")?;
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", &info.format, "-b"]).arg(&base).arg(path))
        .with_context(|| format!("creating the overlay {} on {}", path.display(), base.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_drops_escapes_and_carriage_returns_across_reads() {
        let mut c = Console::default();
        c.push(b"\x1b[1m\x1b[33mShell> \x1b[0m\r\nPress \x1b[1");
        c.push(b"mESC\x1b[0m in 5 s\xc3");
        c.push(b"\xa9c\x08\n");
        assert_eq!(c.text, "Shell> \nPress ESC in 5 s\u{e9}c\n");
    }

    #[test]
    fn boot_order_puts_the_chosen_device_first() {
        let mut cfg = VmConfig::new("t", "/run");
        cfg.firmware = Firmware::Bios;
        cfg.drives.push(Drive::disk("/d.qcow2", DiskFormat::Qcow2));
        cfg.drives.push(Drive::cdrom("/c.iso"));
        cfg.nets.push(Net::user(Some("/tftp".into()), Some("boot.ipxe")));
        cfg.boot = BootOrder::Network;
        let args = cfg.args(Accel::Tcg).unwrap().join(" ");
        assert!(args.contains("virtio-net-pci,netdev=net0,id=nic0,bootindex=0"), "{args}");
        assert!(args.contains("virtio-blk-pci,drive=drive0,bootindex=1"), "{args}");
        assert!(args.contains("ide-cd,drive=drive1,bus=ide.0,bootindex=2"), "{args}");
        assert!(args.contains("user,id=net0,restrict=on,tftp=/tftp,bootfile=boot.ipxe"), "{args}");
    }
}
