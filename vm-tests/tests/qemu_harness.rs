//! The QEMU harness on real QEMU: OVMF reaches its shell over the serial
//! console and takes input, reset and kill work, PXE through QEMU's TFTP
//! runs an iPXE script under BIOS and UEFI, and the NoCloud seed ISO and
//! qcow2 overlays come out right. Skips with a printed reason when QEMU,
//! OVMF, the iPXE ROMs or xorriso are missing.
//!
//! Guests run on TCG when KVM does not really work (see `qemu::accel`),
//! so the deadlines are generous.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use geminik8s_vm_tests::qemu::{
    self, BootOrder, Firmware, Net, NicModel, Vm, VmConfig, create_overlay, make_cidata_iso,
};
use geminik8s_vm_tests::skip::{requires, skip};

/// Firmware under TCG on a busy two-core host takes a minute or two.
const BOOT: Duration = Duration::from_secs(400);

const MARKER: &str = "GEMIN-PXE-MARKER";

fn report(test: &str, started: Instant) {
    let a = qemu::accel_choice();
    eprintln!("{test}: {:?} in {:.1?} ({})", a.accel, started.elapsed(), a.reason);
}

#[test]
fn uefi_reaches_the_shell_takes_input_resets_and_dies_on_kill() {
    if let Some(reason) = qemu::requires(Firmware::Uefi) {
        return skip("uefi_reaches_the_shell", &reason);
    }
    let started = Instant::now();
    let run = tempfile::tempdir().unwrap();
    let cfg = VmConfig::new("uefi", run.path());
    let vm = Vm::start(cfg).unwrap();
    assert!(run.path().join("uefi-OVMF_VARS.fd").is_file(), "each UEFI VM has its own variable store");

    // No bootable device: OVMF falls through to its built-in shell.
    let mut cursor = vm.mark();
    vm.wait_after(&mut cursor, &["Shell>"], BOOT).unwrap();
    let booted = started.elapsed();

    // Typing reaches the guest: `ver` prints the shell banner again.
    vm.send_line("ver").unwrap();
    vm.wait_after(&mut cursor, &["UEFI Interactive Shell"], Duration::from_secs(120)).unwrap();

    // A reset boots the firmware again: the cursor only sees the new boot
    // (the boot manager's line, then a fresh prompt after it).
    vm.wait_after(&mut cursor, &["Shell>"], Duration::from_secs(60)).unwrap();
    vm.reset().unwrap();
    let line = vm.wait_after(&mut cursor, &["BdsDxe: starting"], BOOT).unwrap().1;
    assert!(line.contains("EFI Internal Shell"), "{line}");
    vm.wait_after(&mut cursor, &["Shell>"], BOOT).unwrap();

    let pid = vm.pid();
    let status = vm.kill().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{status}");
    assert!(!vm.is_running());
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "QEMU {pid} is gone");
    let log = std::fs::read_to_string(vm.console_log_path()).unwrap();
    assert!(log.contains("Shell>"), "the raw console log has the shell prompt");
    eprintln!("first boot to the shell took {booted:.1?}");
    report("uefi_reaches_the_shell", started);
}

/// PXE with QEMU's DHCP and TFTP: the NIC's iPXE ROM fetches `boot.ipxe`
/// and runs it.
fn pxe_runs_the_ipxe_script(firmware: Firmware, test: &str) {
    if let Some(reason) = qemu::requires(firmware) {
        return skip(test, &reason);
    }
    if !qemu::nic_rom_installed(NicModel::VirtioNet, firmware) {
        return skip(test, "the iPXE option ROMs for QEMU are not installed (install ipxe-qemu)");
    }
    let started = Instant::now();
    let run = tempfile::tempdir().unwrap();
    let tftp = run.path().join("tftp");
    std::fs::create_dir(&tftp).unwrap();
    std::fs::write(tftp.join("boot.ipxe"), format!("#!ipxe\necho {MARKER}\nshell\n")).unwrap();
    let mut cfg = VmConfig::new("pxe", run.path());
    cfg.firmware = firmware;
    cfg.nets.push(Net::user(Some(tftp), Some("boot.ipxe")));
    cfg.boot = BootOrder::Network;
    let vm = Vm::start(cfg).unwrap();
    let line = vm.wait_for(MARKER, BOOT).unwrap();
    assert_eq!(line.trim(), MARKER, "the script's echo, not the script's text");
    assert!(vm.console().contains("boot.ipxe"), "iPXE names the file it fetched");
    // The cable of the two-node lab's link faults.
    vm.set_link(0, false).unwrap();
    vm.set_link(0, true).unwrap();
    vm.quit().unwrap();
    assert!(vm.wait_exit(Duration::from_secs(30)).unwrap().success());
    report(test, started);
}

#[test]
fn bios_pxe_boots_an_ipxe_script_over_qemu_tftp() {
    pxe_runs_the_ipxe_script(Firmware::Bios, "bios_pxe");
}

#[test]
fn uefi_pxe_boots_an_ipxe_script_over_qemu_tftp() {
    pxe_runs_the_ipxe_script(Firmware::Uefi, "uefi_pxe");
}

#[test]
fn cidata_iso_is_a_nocloud_seed() {
    if let Some(reason) = requires(false, &["xorriso"]) {
        return skip("cidata_iso", &reason);
    }
    let dir = tempfile::tempdir().unwrap();
    let user = "#cloud-config\nhostname: node1\n";
    let meta = "instance-id: node1\nlocal-hostname: node1\n";
    let iso = make_cidata_iso(dir.path(), user, meta).unwrap();

    let out = Command::new("xorriso").arg("-indev").arg(&iso).arg("-pvd_info").output().unwrap();
    let pvd = String::from_utf8_lossy(&out.stdout);
    let volume = pvd.lines().find_map(|l| l.strip_prefix("Volume Id")).map(|v| v.trim_start_matches([' ', ':']));
    assert_eq!(volume, Some("CIDATA"), "{pvd}");

    let out_dir = dir.path().join("extracted");
    let st = Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(&iso)
        .args(["-extract", "/"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    assert_eq!(std::fs::read_to_string(out_dir.join("user-data")).unwrap(), user);
    assert_eq!(std::fs::read_to_string(out_dir.join("meta-data")).unwrap(), meta);
}

#[test]
fn overlay_is_qcow2_backed_by_the_shared_image() {
    if let Some(reason) = requires(false, &["qemu-img"]) {
        return skip("overlay", &reason);
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let overlay = dir.path().join("node1.qcow2");
    create_overlay(&base, &overlay).unwrap();
    let out = Command::new("qemu-img").args(["info", "--output=json"]).arg(&overlay).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["backing-filename"], base.to_str().unwrap(), "{info}");
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
    assert_eq!(info["virtual-size"], 1 << 20, "{info}");
}

#[test]
fn a_timeout_shows_the_console_tail_and_the_log_path() {
    if let Some(reason) = qemu::requires(Firmware::Bios) {
        return skip("timeout_report", &reason);
    }
    let run = tempfile::tempdir().unwrap();
    let vm = Vm::start(VmConfig { firmware: Firmware::Bios, ..VmConfig::new("empty", run.path()) }).unwrap();
    vm.wait_for("No bootable device", BOOT).unwrap();
    let err = format!("{:#}", vm.wait_for("GEMIN-NEVER-PRINTED", Duration::from_secs(1)).unwrap_err());
    assert!(err.contains("GEMIN-NEVER-PRINTED"), "names what it waited for: {err}");
    assert!(err.contains("No bootable device"), "shows the console tail: {err}");
    assert!(err.contains(&vm.console_log_path().display().to_string()), "names the log: {err}");
}
