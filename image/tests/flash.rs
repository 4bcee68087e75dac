//! `gemin-image flash` against real loop devices: the device ends up equal
//! to the image, verification reads the device (not cached pages), and every
//! refusal leaves the device's bytes as they were.
//!
//! The loop-device tests need root and `losetup`; they print `SKIPPED` with
//! the reason otherwise. Loop devices are always detached and mounts always
//! unmounted by drop guards, also when an assertion fails.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use geminik8s_vm_tests::{poll, skip};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn gemin_image() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gemin-image"))
}

/// Run `gemin-image flash ARGS...` with stdin not a terminal.
fn flash(args: &[&str], image: &Path, device: &Path) -> Output {
    gemin_image().arg("flash").arg(image).arg(device).args(args).stdin(Stdio::null()).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn sha256(path: &Path) -> String {
    let mut data = Vec::new();
    File::open(path).unwrap().read_to_end(&mut data).unwrap();
    hex::encode(Sha256::digest(&data))
}

/// Skip unless root with `tools`; returns whether to go on.
fn required(test: &str, tools: &[&str]) -> bool {
    let mut all = vec!["losetup"];
    all.extend_from_slice(tools);
    match skip::requires(true, &all) {
        Some(reason) => {
            skip::skip(test, &reason);
            false
        }
        None => true,
    }
}

/// A GPT disk image of `size` bytes made by sfdisk: partition 1 filled with
/// a pattern, partition 2 left as zeros (which must overwrite junk too).
fn gpt_image(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(path)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let p1_sectors = (size / 2 - MIB) / 512;
    let p2_start = 2048 + p1_sectors;
    let script =
        format!("label: gpt\nstart=2048, size={p1_sectors}, type=L, name=one\nstart={p2_start}, type=L, name=two\n");
    sfdisk.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = sfdisk.wait_with_output().unwrap();
    assert!(out.status.success(), "sfdisk: {}", String::from_utf8_lossy(&out.stderr));
    let pattern: Vec<u8> = (0..p1_sectors * 512).map(|i| (i % 253) as u8 + 1).collect();
    File::options().write(true).open(path).unwrap().write_all_at(&pattern, MIB).unwrap();
}

/// `size` bytes of non-zero junk, as a used disk would hold.
fn junk(size: u64) -> Vec<u8> {
    (0..size).map(|i| 0xa5 ^ (i % 7) as u8).collect()
}

fn junk_file(path: &Path, size: u64) {
    fs::write(path, junk(size)).unwrap();
}

/// An attached loop device, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    /// Attach `file`; `None` (with the reason printed) when loop devices
    /// cannot be had here.
    fn attach(test: &str, file: &Path, partscan: bool) -> Option<Loop> {
        let mut cmd = Command::new("losetup");
        if partscan {
            cmd.arg("--partscan");
        }
        let out = cmd.args(["--find", "--show"]).arg(file).output().unwrap();
        if !out.status.success() {
            skip::skip(test, &format!("no loop device: losetup failed: {}", stderr(&out).trim()));
            return None;
        }
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Some(Loop { dev })
    }

    fn name(&self) -> String {
        self.dev.file_name().unwrap().to_string_lossy().into_owned()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let out = Command::new("losetup").arg("--detach").arg(&self.dev).output().unwrap();
        if !out.status.success() {
            eprintln!("warning: detaching {}: {}", self.dev.display(), stderr(&out).trim());
        }
    }
}

/// What backs the loop device of a [`Fixture`].
enum Backing {
    /// `size` bytes of junk, attached without a partition scan.
    Junk(u64),
    /// A GPT disk of `size` bytes (see [`gpt_image`]), attached with `--partscan`.
    Gpt(u64),
}

/// A temp dir with a GPT image (`disk.raw`) and a loop device over a
/// backing file (`device`), whose digest is taken before it is attached.
struct Fixture {
    /// Declared first: dropped, so detached, before the temp dir goes.
    lo: Loop,
    dir: tempfile::TempDir,
    image: PathBuf,
    backing: PathBuf,
    /// The backing file's sha256 before anything ran.
    before: String,
}

impl Fixture {
    /// `None` (with the reason printed) unless root with `losetup`, `sfdisk`
    /// and `tools`, and a loop device can be attached.
    fn new(test: &str, tools: &[&str], image_size: u64, backing: Backing) -> Option<Fixture> {
        let mut all = vec!["sfdisk"];
        all.extend_from_slice(tools);
        if !required(test, &all) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        let backing_path = dir.path().join("device");
        gpt_image(&image, image_size);
        let partscan = match backing {
            Backing::Junk(size) => {
                junk_file(&backing_path, size);
                false
            }
            Backing::Gpt(size) => {
                gpt_image(&backing_path, size);
                true
            }
        };
        let before = sha256(&backing_path);
        let lo = Loop::attach(test, &backing_path, partscan)?;
        Some(Fixture { lo, dir, image, backing: backing_path, before })
    }
}

/// A mount, unmounted on drop.
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    fn new(dev: &Path, dir: &Path) -> Mounted {
        let out = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(dev).output().unwrap();
        assert!(out.status.success(), "mkfs.ext4: {}", stderr(&out));
        let out = Command::new("mount").arg(dev).arg(dir).output().unwrap();
        assert!(out.status.success(), "mount: {}", stderr(&out));
        Mounted { dir: dir.to_path_buf() }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let out = Command::new("umount").arg(&self.dir).output().unwrap();
        if !out.status.success() {
            eprintln!("warning: unmounting {}: {}", self.dir.display(), stderr(&out).trim());
        }
    }
}

#[test]
fn flash_makes_the_device_equal_the_image_over_junk() {
    let Some(fx) =
        Fixture::new("flash_makes_the_device_equal_the_image_over_junk", &[], 6 * MIB, Backing::Junk(8 * MIB))
    else {
        return;
    };

    let out = flash(&["--yes", "--output", "json"], &fx.image, &fx.lo.dev);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["device"], fx.lo.dev.display().to_string());
    assert_eq!(summary["bytes"], 6 * MIB);
    assert_eq!(summary["sha256"], sha256(&fx.image));
    assert_eq!(summary["verified"], true);
    assert_eq!(summary["dry_run"], false);
    assert!(summary["seconds"].is_number());

    // The bytes landed in the backing file: the image, zeros included, then
    // the junk beyond it untouched.
    let image_bytes = fs::read(&fx.image).unwrap();
    let device_bytes = fs::read(&fx.backing).unwrap();
    assert!(device_bytes[..image_bytes.len()] == image_bytes[..], "device differs from the image");
    assert!(device_bytes[image_bytes.len()..] == junk(8 * MIB)[image_bytes.len()..], "junk beyond the image changed");
    let text = stderr(&out);
    assert!(text.contains(&format!("loop device backed by {}", fx.backing.display())), "{text}");
}

#[test]
fn verification_reads_the_device_not_cached_pages() {
    let Some(fx) = Fixture::new("verification_reads_the_device_not_cached_pages", &[], 4 * MIB, Backing::Junk(4 * MIB))
    else {
        return;
    };
    let out = flash(&["--yes"], &fx.image, &fx.lo.dev);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = sha256(&fx.image);
    // The kernel drops a block device's cached pages on its last close: keep
    // it open so the pages read by this first verification stay cached.
    let _holder = File::open(&fx.lo.dev).unwrap();
    gemin_image::flash::verify_device(&fx.lo.dev, 4 * MIB, &expected).unwrap();

    // Change one byte under the loop device, in its backing file: the loop
    // device's own cached pages still hold the good byte, so only a
    // verification that goes to the device sees the change.
    let mut f = OpenOptions::new().read(true).write(true).open(&fx.backing).unwrap();
    f.seek(SeekFrom::Start(MIB + 4097)).unwrap();
    let mut byte = [0u8];
    f.read_exact(&mut byte).unwrap();
    f.write_all_at(&[byte[0] ^ 0xff], MIB + 4097).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let err = gemin_image::flash::verify_device(&fx.lo.dev, 4 * MIB, &expected).unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("verification failed"), "{text}");
    assert!(text.contains(&expected), "the image digest is reported: {text}");
    let mut corrupted = fs::read(&fx.backing).unwrap();
    corrupted.truncate((4 * MIB) as usize);
    assert!(text.contains(&hex::encode(Sha256::digest(&corrupted))), "the device digest is reported: {text}");
}

#[test]
fn a_regular_file_is_not_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let target = dir.path().join("sdb.img");
    // A GPT signature by hand: no tools, no root needed.
    let mut bytes = vec![0u8; MIB as usize];
    bytes[512..520].copy_from_slice(b"EFI PART");
    fs::write(&image, &bytes).unwrap();
    fs::write(&target, b"keep me").unwrap();
    let out = flash(&["--yes"], &image, &target);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains(&format!("device {}: a regular file, not a block device", target.display())), "{text}");
    assert!(text.contains("e.g. /dev/sdb"), "{text}");
    assert_eq!(fs::read(&target).unwrap(), b"keep me");
}

#[test]
fn images_that_are_not_raw_or_have_no_gpt_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The image is checked before the device: no device is needed here.
    let device = Path::new("/dev/null");
    let junk = dir.path().join("junk.raw");
    fs::write(&junk, vec![0x5au8; 64 * 1024]).unwrap();
    let out = flash(&["--yes"], &junk, device);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains("no GPT header") && text.contains("--force"), "{text}");
    // With --force the image passes and the device check speaks instead.
    let out = flash(&["--yes", "--force"], &junk, device);
    assert!(stderr(&out).contains("a character device, not a block device"), "{}", stderr(&out));

    if let Some(reason) = skip::requires(false, &["qemu-img"]) {
        skip::skip("images_that_are_not_raw_or_have_no_gpt_are_refused (qcow2 part)", &reason);
        return;
    }
    let qcow2 = dir.path().join("disk.qcow2");
    let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&qcow2).arg("16M").output().unwrap();
    assert!(out.status.success(), "qemu-img: {}", stderr(&out));
    let out = flash(&["--yes"], &qcow2, device);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains("this is a qcow2 file, not a raw disk image"), "{text}");
    assert!(text.contains(&format!("qemu-img convert -f qcow2 -O raw {}", qcow2.display())), "{text}");
}

#[test]
fn a_mounted_device_is_refused() {
    let Some(fx) =
        Fixture::new("a_mounted_device_is_refused", &["mkfs.ext4", "mount", "umount"], 4 * MIB, Backing::Junk(8 * MIB))
    else {
        return;
    };
    let mnt = fx.dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mounted = Mounted::new(&fx.lo.dev, &mnt);
    fs::write(mnt.join("data"), b"precious").unwrap();
    // ext4 itself writes to the device (journal, superblock on unmount), but
    // never to its first KiB, where the image's MBR and GPT header would go.
    let boot_area = fs::read(&fx.backing).unwrap()[..1024].to_vec();

    for extra in [&["--yes"][..], &["--dry-run"][..]] {
        let out = flash(extra, &fx.image, &fx.lo.dev);
        assert!(!out.status.success());
        let text = stderr(&out);
        assert!(text.contains(&format!("device {} is in use", fx.lo.dev.display())), "{text}");
        assert!(text.contains(&format!("{} is mounted on {}", fx.lo.name(), mnt.display())), "{text}");
    }
    assert_eq!(fs::read(mnt.join("data")).unwrap(), b"precious");
    drop(mounted);
    let after = fs::read(&fx.backing).unwrap();
    assert!(after[..1024] == boot_area[..], "the refused device's first KiB was changed");
    assert_eq!(after[1024 + 0x38..1024 + 0x3a], [0x53, 0xef], "the ext4 superblock is gone");
}

#[test]
fn a_partition_and_a_disk_with_a_mounted_partition_are_refused() {
    let test = "a_partition_and_a_disk_with_a_mounted_partition_are_refused";
    let Some(fx) = Fixture::new(test, &["partx", "mkfs.ext4", "mount", "umount"], 4 * MIB, Backing::Gpt(16 * MIB))
    else {
        return;
    };
    let mnt = fx.dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let p1 = PathBuf::from(format!("{}p1", fx.lo.dev.display()));
    // The kernel may not have scanned the table yet: ask it, then wait for the node.
    if !p1.exists() {
        let out = Command::new("partx").arg("--add").arg(&fx.lo.dev).output().unwrap();
        assert!(out.status.success() || p1.exists(), "partx: {}", stderr(&out));
    }
    let found = poll::until("the partition's device node", Duration::from_secs(10), Duration::from_millis(50), || {
        if p1.exists() { Ok(()) } else { Err(format!("{} does not exist", p1.display())) }
    });
    if let Err(e) = found {
        skip::skip(test, &format!("loop partitions are not available here: {e}"));
        return;
    }

    let out = flash(&["--yes"], &fx.image, &p1);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains(&format!("{}p1 is a partition", fx.lo.name())), "{text}");
    assert!(text.contains(&format!("name the whole disk instead, e.g. {}", fx.lo.dev.display())), "{text}");
    assert_eq!(sha256(&fx.backing), fx.before);

    // mkfs and mount touch partition 1 only; the partition table in the
    // first MiB must survive the refused flash.
    let table = fs::read(&fx.backing).unwrap()[..MIB as usize].to_vec();
    let mounted = Mounted::new(&p1, &mnt);
    let out = flash(&["--yes"], &fx.image, &fx.lo.dev);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains(&format!("{}p1 is mounted on {}", fx.lo.name(), mnt.display())), "{text}");
    drop(mounted);
    assert!(fs::read(&fx.backing).unwrap()[..MIB as usize] == table[..], "the partition table changed");
}

#[test]
fn a_device_smaller_than_the_image_is_refused() {
    let Some(fx) = Fixture::new("a_device_smaller_than_the_image_is_refused", &[], 6 * MIB, Backing::Junk(4 * MIB))
    else {
        return;
    };
    let out = flash(&["--yes"], &fx.image, &fx.lo.dev);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains(&format!("device {}: too small: 4194304 bytes (4.0 MiB)", fx.lo.dev.display())), "{text}");
    assert!(text.contains("needs 6291456 bytes (6.0 MiB)"), "{text}");
    assert_eq!(sha256(&fx.backing), fx.before);
}

#[test]
fn dry_run_checks_everything_and_writes_nothing() {
    let Some(fx) = Fixture::new("dry_run_checks_everything_and_writes_nothing", &[], 4 * MIB, Backing::Junk(8 * MIB))
    else {
        return;
    };
    // No --yes and no terminal: a dry run needs no confirmation.
    let out = flash(&["--dry-run", "--output", "json"], &fx.image, &fx.lo.dev);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains(&format!("dry run: would write 4194304 bytes (sha256:{})", sha256(&fx.image))), "{text}");
    assert!(text.contains("nothing was written"), "{text}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["dry_run"], true);
    assert_eq!(summary["verified"], false);
    assert_eq!(sha256(&fx.backing), fx.before, "a dry run changed the device");
}

#[test]
fn without_yes_and_without_a_terminal_nothing_is_written() {
    let Some(fx) =
        Fixture::new("without_yes_and_without_a_terminal_nothing_is_written", &[], 4 * MIB, Backing::Junk(8 * MIB))
    else {
        return;
    };
    let out = flash(&[], &fx.image, &fx.lo.dev);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains("stdin is not a terminal"), "{text}");
    assert!(text.contains("pass --yes"), "{text}");
    // The operator was shown what would have been overwritten.
    assert!(text.contains(&format!("bytes 0..4194304 of {} will be overwritten", fx.lo.dev.display())), "{text}");
    assert_eq!(sha256(&fx.backing), fx.before);
}

#[test]
fn a_device_another_program_holds_exclusively_is_refused() {
    let Some(fx) =
        Fixture::new("a_device_another_program_holds_exclusively_is_refused", &[], 4 * MIB, Backing::Junk(8 * MIB))
    else {
        return;
    };
    // Not mounted, no swap, no holder: only the kernel's exclusive claim
    // (what a partitioning tool or a running flash holds) tells.
    let _claim = {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new().read(true).custom_flags(nix::fcntl::OFlag::O_EXCL.bits()).open(&fx.lo.dev).unwrap()
    };
    let out = flash(&["--yes"], &fx.image, &fx.lo.dev);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains(&format!("device {}: busy", fx.lo.dev.display())), "{text}");
    assert_eq!(sha256(&fx.backing), fx.before);
}

/// Run `gemin-image flash IMAGE DEVICE` on a terminal (a pty from util-linux
/// `script`), typing `answer`; returns the exit status and what the terminal showed.
fn flash_on_a_terminal(image: &Path, device: &Path, answer: &str) -> (bool, String) {
    let cmd = format!("{} flash {} {}", env!("CARGO_BIN_EXE_gemin-image"), image.display(), device.display());
    let mut script = Command::new("script")
        .args(["--quiet", "--return", "--command", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    script.stdin.take().unwrap().write_all(format!("{answer}\n").as_bytes()).unwrap();
    let out = script.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out)))
}

#[test]
fn on_a_terminal_the_device_name_must_be_typed() {
    let Some(fx) =
        Fixture::new("on_a_terminal_the_device_name_must_be_typed", &["script"], 4 * MIB, Backing::Junk(8 * MIB))
    else {
        return;
    };

    let (ok, shown) = flash_on_a_terminal(&fx.image, &fx.lo.dev, "sdz");
    assert!(!ok, "{shown}");
    assert!(shown.contains(&format!("Type the device name ({}) to overwrite it", fx.lo.name())), "{shown}");
    assert!(shown.contains(&format!("you typed `sdz`, not `{}`", fx.lo.name())), "{shown}");
    assert_eq!(sha256(&fx.backing), fx.before);

    let (ok, shown) = flash_on_a_terminal(&fx.image, &fx.lo.dev, &fx.lo.name());
    assert!(ok, "{shown}");
    assert!(shown.contains("verified"), "{shown}");
    let image_bytes = fs::read(&fx.image).unwrap();
    assert!(fs::read(&fx.backing).unwrap()[..image_bytes.len()] == image_bytes[..], "device differs from the image");
}
