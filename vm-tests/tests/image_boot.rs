//! Boots the images `gemin-image` builds from the shipped default spec in
//! QEMU (UEFI with OVMF; TCG when KVM does not work): the raw disk with a
//! cloud-config on a CIDATA volume, the A/B fallback with a broken slot B,
//! the live ISO, the live system installing itself to a disk, and the PXE
//! bundle over QEMU's built-in TFTP.
//!
//! Each boot is judged by the line `geminik8s-boot-report.service` prints on
//! the serial console once the agent has started:
//! `geminik8s-boot: slot=a root=read-only persistent=/dev/vda5 ... boots=N ... agent=active`.
//!
//! The image is built once per run into `target/image-boot/` (kept: an
//! unchanged build is skipped). Two VMs run at a time with one vCPU each:
//! the CI machine has two cores, and a guest with two emulated vCPUs on a
//! busy host saw one vCPU stall for minutes (soft lockups), which a
//! single-vCPU guest cannot.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gemin_image::disk::layout;
use gemin_image::spec::{Labels, OutputFormat};
use geminik8s_vm_tests::image::{BuiltImage, agent_binary, build_default_image_blocking, default_image_dir};
use geminik8s_vm_tests::qemu::{self, BootOrder, DiskFormat, Drive, Firmware, Mark, Net, Vm, VmConfig};
use geminik8s_vm_tests::{poll, skip};

/// A boot under TCG on a shared 2-core machine: firmware, kernel, systemd,
/// agent. Measured at about 75 s; generous for a loaded CI machine.
const BOOT: Duration = Duration::from_secs(420);
const REPORT: &str = "geminik8s-boot: ";
/// The raw test's disk: larger than the image, so the first boot grows the
/// persistent partition.
const DISK: u64 = 12 << 30;

const TOOLS: &[&str] =
    &["mmdebstrap", "kine", "qemu-system-x86_64", "qemu-img", "xorriso", "mcopy", "tar2sqfs", "sfdisk"];

fn image() -> Result<&'static BuiltImage, String> {
    static IMAGE: OnceLock<Result<BuiltImage, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build_default_image_blocking(&default_image_dir()).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(Clone::clone)
}

/// How many VMs run at once (one emulated vCPU each).
const PARALLEL_VMS: usize = 2;

/// A place for one VM among [`PARALLEL_VMS`], held until dropped.
struct VmSlot;

static SLOTS: (Mutex<usize>, Condvar) = (Mutex::new(PARALLEL_VMS), Condvar::new());

fn vm_slot() -> VmSlot {
    let (free, freed) = &SLOTS;
    let mut free = free.lock().unwrap_or_else(|e| e.into_inner());
    while *free == 0 {
        free = freed.wait(free).unwrap_or_else(|e| e.into_inner());
    }
    *free -= 1;
    VmSlot
}

impl Drop for VmSlot {
    fn drop(&mut self) {
        let (free, freed) = &SLOTS;
        *free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        freed.notify_one();
    }
}

/// Skips (returning `None`) when the tools, root or the agent binary are missing.
fn prerequisites(test: &str) -> Option<&'static BuiltImage> {
    if let Some(reason) = skip::requires(true, TOOLS) {
        skip::skip(test, &reason);
        return None;
    }
    if qemu::requires(Firmware::Uefi).is_some() {
        skip::skip(test, "OVMF is not installed (Debian package ovmf)");
        return None;
    }
    if agent_binary().is_none() {
        skip::skip(test, "no gemin_k8s in target/: run `cargo build -p geminik8s-agent`");
        return None;
    }
    Some(image().unwrap_or_else(|e| panic!("building the default image: {e}")))
}

/// The fields of a boot report line.
fn report(line: &str) -> BTreeMap<String, String> {
    let at = line.find(REPORT).unwrap_or_else(|| panic!("not a boot report: {line}"));
    line[at + REPORT.len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn run_dir(name: &str) -> PathBuf {
    let dir = default_image_dir().join("runs").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A writable copy of the raw disk (sparse), grown to `size` bytes so the
/// first boot has room to grow the persistent partition.
fn disk_copy(image: &BuiltImage, dir: &Path, size: u64) -> PathBuf {
    let disk = dir.join("disk.raw");
    let status = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(image.path(OutputFormat::Raw))
        .arg(&disk)
        .status()
        .unwrap();
    assert!(status.success());
    fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(size).unwrap();
    disk
}

/// Byte offset and size of a partition, as sfdisk reads the disk's GPT.
fn partition(disk: &Path, label: &str) -> (u64, u64) {
    let out = Command::new("sfdisk").arg("--json").arg(disk).output().unwrap();
    assert!(out.status.success(), "sfdisk --json: {}", String::from_utf8_lossy(&out.stderr));
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let part = table["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == label)
        .unwrap_or_else(|| panic!("no partition {label} in {}", disk.display()));
    (part["start"].as_u64().unwrap() * 512, part["size"].as_u64().unwrap() * 512)
}

fn partition_offset(disk: &Path, label: &str) -> u64 {
    partition(disk, label).0
}

/// `mtools` on the ESP inside `disk`.
fn mtools(disk: &Path, tool: &str, args: &[&str]) -> String {
    let esp = partition_offset(disk, Labels::default().get("esp"));
    let out = Command::new(tool)
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{esp}", disk.display()))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Boot entry file names on the ESP.
fn entries(disk: &Path) -> Vec<String> {
    let mut names: Vec<String> = mtools(disk, "mdir", &["-b", "::/loader/entries"])
        .lines()
        .filter_map(|l| l.rsplit('/').next().map(str::to_string))
        .filter(|n| n.ends_with(".conf"))
        .collect();
    names.sort();
    names
}

/// Replace an entry on the ESP by `name` with `text`.
fn put_entry(disk: &Path, old: &str, name: &str, text: &str, dir: &Path) {
    let local = dir.join(name);
    fs::write(&local, text).unwrap();
    mtools(disk, "mdel", &[&format!("::/loader/entries/{old}")]);
    mtools(disk, "mcopy", &[local.to_str().unwrap(), &format!("::/loader/entries/{name}")]);
}

/// A CIDATA volume holding node1's cloud-config from `gemin_k8s init`, with
/// the node on QEMU's user network (10.0.2.15, from its DHCP).
fn cidata(dir: &Path) -> PathBuf {
    let agent = agent_binary().unwrap();
    let cfg = dir.join("cluster");
    let out = Command::new(&agent)
        .args(["init", "--name", "boot", "--node1-ip", "10.0.2.15", "--node2-ip", "10.0.2.16", "--vip", "10.0.2.100"])
        .args(["--witness", "none"])
        .arg("--config-dir")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "gemin_k8s init: {}", String::from_utf8_lossy(&out.stderr));
    let user_data = fs::read_to_string(cfg.join("node1.yaml")).unwrap();
    qemu::make_cidata_iso(dir, &user_data, "instance-id: node1\nlocal-hostname: node1\n").unwrap()
}

fn vm_config(name: &str, dir: &Path) -> VmConfig {
    let mut cfg = VmConfig::new(name, dir);
    cfg.memory_mib = 2048;
    cfg.cpus = 1;
    cfg
}

/// Wait for the next boot report after `cursor`; fails on a kernel panic or
/// an initramfs failure that does not recover.
fn next_report(vm: &Vm, cursor: &mut Mark, since: Instant) -> BTreeMap<String, String> {
    let (_, line) = vm.wait_after(cursor, &[REPORT], BOOT).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{}: {:.1} s from power-on to the boot report: {line}", vm.name(), since.elapsed().as_secs_f64());
    report(&line)
}

#[test]
fn raw_disk_boots_read_only_grows_persistent_keeps_state_and_marks_the_boot_good() {
    let Some(image) = prerequisites(module_path!()) else { return };
    let _one = vm_slot();
    let dir = run_dir("raw");
    let disk = disk_copy(image, &dir, DISK);
    // Boot counting on slot A: three tries, and the agent must bless the boot.
    let a = layout::Slot::A.entry_id();
    let entry = mtools(&disk, "mtype", &[&format!("::/loader/entries/{a}.conf")]);
    put_entry(&disk, &format!("{a}.conf"), &format!("{a}+3.conf"), &entry, &dir);
    let mut cfg = vm_config("raw", &dir);
    cfg.drives = vec![Drive::disk(&disk, DiskFormat::Raw), Drive::cdrom(cidata(&dir))];
    cfg.nets = vec![Net::user(None, None)];

    let started = Instant::now();
    let vm = Vm::start(cfg.clone()).unwrap();
    let mut cursor = Mark::default();
    let first = next_report(&vm, &mut cursor, started);
    assert_eq!(first["slot"], "a");
    assert_eq!(first["root"], "read-only", "/ must be mounted read-only");
    assert_eq!(first["persistent"], "/dev/vda5");
    assert_eq!(first["boots"], "1");
    assert_eq!(first["hostname"], "node1", "hostname from the CIDATA cloud-config");
    assert_eq!(first["agent"], "active");
    let kib: u64 = first["persistent_kib"].parse().unwrap();
    let (_, built) = partition(&image.path(OutputFormat::Raw), Labels::default().get("persistent"));
    let extra = DISK - image_size(image);
    assert!(
        kib * 1024 > built + extra / 2,
        "the persistent filesystem grew into the {extra} extra bytes of the disk: {kib} KiB (built with {built} bytes)"
    );
    // Blessed once the agent is ready: systemd-bless-boot drops the counter
    // on the ESP (seen from the host: the guest syncs the rename).
    let blessed = format!("{a}.conf");
    poll::until("slot A's entry to be marked good", BOOT, Duration::from_secs(2), || {
        let names = entries(&disk);
        if names.contains(&blessed) { Ok(()) } else { Err(names) }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    vm.shut_down(Duration::from_secs(180)).unwrap_or_else(|e| panic!("{e:#}"));
    drop(vm);
    let names = entries(&disk);
    assert!(names.contains(&format!("{a}.conf")), "slot A marked good (counter removed): {names:?}");

    let started = Instant::now();
    let vm = Vm::start(cfg).unwrap();
    let mut cursor = Mark::default();
    let second = next_report(&vm, &mut cursor, started);
    assert_eq!(second["slot"], "a");
    assert_eq!(second["boots"], "2", "the boot counter on the persistent partition survived the reboot");
    assert_eq!(second["persistent_kib"], first["persistent_kib"], "grown once, kept");
    vm.kill().unwrap();
}

#[test]
fn a_broken_slot_b_marked_next_falls_back_to_slot_a() {
    let Some(image) = prerequisites(module_path!()) else { return };
    let _one = vm_slot();
    let dir = run_dir("fallback");
    let disk = disk_copy(image, &dir, image_size(image));
    // Slot B: unbootable (its squashfs superblock zeroed) and marked as the
    // next boot with two tries, as an upgrade would mark it.
    let b_offset = partition_offset(&disk, Labels::default().get(layout::Slot::B.label_key()));
    let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 1 << 20], b_offset).unwrap();
    drop(f);
    let b = layout::Slot::B.entry_id();
    let entry = mtools(&disk, "mtype", &[&format!("::/loader/entries/{b}.conf")]).replace("version 0", "version 2");
    put_entry(&disk, &format!("{b}.conf"), &format!("{b}+2.conf"), &entry, &dir);
    let mut cfg = vm_config("fallback", &dir);
    cfg.drives = vec![Drive::disk(&disk, DiskFormat::Raw), Drive::cdrom(cidata(&dir))];
    cfg.nets = vec![Net::user(None, None)];

    let started = Instant::now();
    let vm = Vm::start(cfg).unwrap();
    let mut cursor = Mark::default();
    for attempt in 1..=2 {
        let (_, line) = vm
            .wait_after(&mut cursor, &["cannot mount root slot b"], BOOT)
            .unwrap_or_else(|e| panic!("try {attempt} of slot B: {e:#}"));
        eprintln!("slot B, try {attempt}: {line}");
    }
    let report = next_report(&vm, &mut cursor, started);
    assert_eq!(report["slot"], "a", "after slot B's tries ran out the boot loader chose slot A");
    assert_eq!(report["root"], "read-only");
    vm.shut_down(Duration::from_secs(180)).unwrap_or_else(|e| panic!("{e:#}"));
    drop(vm);
    let names = entries(&disk);
    assert!(names.contains(&format!("{b}+0-2.conf")), "slot B used both tries and is marked bad: {names:?}");
}

#[test]
fn the_live_iso_boots_the_same_root() {
    let Some(image) = prerequisites(module_path!()) else { return };
    let _one = vm_slot();
    let dir = run_dir("iso");
    let mut cfg = vm_config("iso", &dir);
    cfg.drives = vec![Drive::cdrom(image.path(OutputFormat::Iso)), Drive::cdrom(cidata(&dir))];
    cfg.nets = vec![Net::user(None, None)];
    cfg.boot = BootOrder::Cdrom;
    let started = Instant::now();
    let vm = Vm::start(cfg).unwrap();
    let report = next_report(&vm, &mut Mark::default(), started);
    assert_eq!(report["slot"], "live");
    assert_eq!(report["root"], "read-only");
    assert_eq!(report["persistent"], "tmpfs", "a live boot keeps state in RAM");
    assert_eq!(report["hostname"], "node1");
    assert_eq!(report["agent"], "active");
    vm.kill().unwrap();
}

#[test]
fn the_live_system_installs_itself_to_a_named_disk_which_then_boots() {
    let Some(image) = prerequisites(module_path!()) else { return };
    let _one = vm_slot();
    let dir = run_dir("install");
    let disk = dir.join("disk.raw");
    fs::File::create(&disk).unwrap().set_len(DISK).unwrap();
    // The ISO's live system, started with the unattended-install parameter
    // (its kernel and initramfs are the PXE bundle's: the same files).
    let pxe = image.path(OutputFormat::Pxe);
    let mut cfg = vm_config("install", &dir);
    cfg.firmware = Firmware::Bios;
    // Drives on the command line as they are: `-kernel` takes boot index 0.
    let append = format!("{} gemin.install=/dev/vda", layout::live_cmdline());
    let args = [
        ("-kernel", pxe.join("vmlinuz").display().to_string()),
        ("-initrd", pxe.join("initrd.img").display().to_string()),
        ("-append", append),
        ("-drive", format!("file={},format=raw,if=virtio", disk.display())),
        ("-drive", format!("file={},format=raw,media=cdrom,readonly=on", image.path(OutputFormat::Iso).display())),
    ];
    cfg.extra_args = args.into_iter().flat_map(|(flag, value)| [flag.to_string(), value]).collect();
    let started = Instant::now();
    let vm = Vm::start(cfg).unwrap();
    let (_, line) = vm
        .wait_for_any(&["geminik8s-install: installed to /dev/vda", "geminik8s-install: error"], BOOT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(line.contains("installed to /dev/vda"), "{line}");
    eprintln!("install: {:.1} s from power-on to installed", started.elapsed().as_secs_f64());
    vm.wait_exit(Duration::from_secs(180)).unwrap_or_else(|e| panic!("the installer powers off when done: {e:#}"));
    drop(vm);

    let mut cfg = vm_config("installed", &dir);
    cfg.drives = vec![Drive::disk(&disk, DiskFormat::Raw), Drive::cdrom(cidata(&dir))];
    cfg.nets = vec![Net::user(None, None)];
    let started = Instant::now();
    let vm = Vm::start(cfg).unwrap();
    let report = next_report(&vm, &mut Mark::default(), started);
    assert_eq!(report["slot"], "a");
    assert_eq!(report["root"], "read-only");
    assert_eq!(report["persistent"], "/dev/vda5");
    assert_eq!(report["boots"], "1");
    assert_eq!(report["agent"], "active");
    let kib: u64 = report["persistent_kib"].parse().unwrap();
    let (_, built) = partition(&image.path(OutputFormat::Raw), Labels::default().get("persistent"));
    assert!(kib * 1024 > built, "the installed persistent partition fills the disk: {kib} KiB");
    vm.kill().unwrap();
}

#[test]
fn the_pxe_bundle_boots_over_tftp() {
    let Some(image) = prerequisites(module_path!()) else { return };
    let _one = vm_slot();
    let dir = run_dir("pxe");
    let mut cfg = vm_config("pxe", &dir);
    cfg.memory_mib = 3072;
    cfg.drives = vec![Drive::cdrom(cidata(&dir))];
    cfg.nets = vec![Net::user(Some(image.path(OutputFormat::Pxe)), Some("boot.ipxe"))];
    cfg.boot = BootOrder::Network;
    cfg.firmware = Firmware::Bios;
    let started = Instant::now();
    let vm = Vm::start(cfg).unwrap();
    let report = next_report(&vm, &mut Mark::default(), started);
    assert_eq!(report["slot"], "pxe");
    assert_eq!(report["root"], "read-only");
    assert_eq!(report["persistent"], "tmpfs");
    assert_eq!(report["agent"], "active");
    vm.kill().unwrap();
}

fn image_size(image: &BuiltImage) -> u64 {
    fs::metadata(image.path(OutputFormat::Raw)).unwrap().len()
}
