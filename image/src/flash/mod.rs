//! `gemin-image flash`: write a raw disk image to a block device.
//!
//! Decisions first, side effects last: [`plan`] runs every check (the image
//! is raw and has a GPT; the device is a whole disk, writable, unused and
//! large enough) without writing; [`flash`] writes every byte of the image
//! (zero blocks too, so no stale signature survives), fsyncs, drops the
//! device's cached pages and reads the range back to compare SHA-256.

pub mod device;
pub mod image;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::progress::{Mode, Progress};
pub use device::{DevNum, DeviceInfo, User};
pub use image::ImageInfo;

/// Bytes per read and write.
pub const CHUNK: usize = 4 << 20;

/// Why a flash was refused or failed. Each message says what, why and how
/// to fix it.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("image {image}: not a regular file; pass the raw disk image file written by `gemin-image build`")]
    ImageNotAFile { image: PathBuf },
    #[error("image {image}: the file is empty; rebuild it with `gemin-image build`")]
    ImageEmpty { image: PathBuf },
    #[error("image {image}: this is a {kind} file, not a raw disk image, and a disk cannot boot from it; {hint}")]
    NotRaw { image: PathBuf, kind: &'static str, hint: String },
    #[error(
        "image {image}: no GPT header (\"EFI PART\" at LBA 1), so this does not look like a disk image built by \
         gemin-image; check the file, or pass --force to write it anyway"
    )]
    NoGpt { image: PathBuf },
    #[error("device {device}: cannot open it ({error}); name an existing whole disk, e.g. /dev/sdb (see `lsblk`)")]
    DeviceMissing { device: PathBuf, error: std::io::Error },
    #[error("device {device}: {kind}, not a block device; name a whole disk, e.g. /dev/sdb (see `lsblk`)")]
    NotABlockDevice { device: PathBuf, kind: &'static str },
    #[error(
        "device {device}: {name} is a partition, and the image holds a whole partition table; \
         name the whole disk instead{}",
        disk.as_ref().map(|d| format!(", e.g. /dev/{d}")).unwrap_or_default()
    )]
    IsPartition { device: PathBuf, name: String, disk: Option<String> },
    #[error("device {device}: read-only; check the write-protect switch, or `blockdev --setrw` it")]
    ReadOnly { device: PathBuf },
    #[error(
        "device {device} is in use: {}; unmount it, `swapoff` it or stop what holds it \
         (`lsblk {}` shows the tree), then run flash again",
        users.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        device.display()
    )]
    InUse { device: PathBuf, users: Vec<User> },
    #[error(
        "device {device}: too small: {device_bytes} bytes ({}), the image {image} needs {image_bytes} bytes ({}); \
         use a larger disk",
        human(*device_bytes), human(*image_bytes)
    )]
    TooSmall { device: PathBuf, device_bytes: u64, image: PathBuf, image_bytes: u64 },
    #[error(
        "device {device} has {device_sector}-byte sectors but the image's GPT was written for \
         {image_sector}-byte sectors, so the disk would not find its partition table; build the image for \
         this sector size, or pass --force"
    )]
    SectorSize { device: PathBuf, device_sector: u64, image_sector: u64 },
    #[error(
        "device {device}: busy (the kernel refused exclusive access: it is mounted, used as swap or held by \
         another device or program); stop that user, then run flash again"
    )]
    Busy { device: PathBuf },
    #[error(
        "not flashing {device}: stdin is not a terminal, so the device name cannot be typed to confirm; \
         pass --yes to flash without confirmation"
    )]
    NoTerminal { device: PathBuf },
    #[error("not flashing {device}: you typed `{typed}`, not `{expected}`; nothing was written")]
    NotConfirmed { device: PathBuf, typed: String, expected: String },
    #[error(
        "verification failed: {device} read back {bytes} bytes with sha256 {device_sha256}, the image has sha256 \
         {image_sha256}; the device may be failing or something else wrote to it: flash again, or use another \
         device"
    )]
    Mismatch { device: PathBuf, bytes: u64, image_sha256: String, device_sha256: String },
    #[error(
        "verification failed: {device} ended after {read} of {bytes} bytes; the device may have been removed \
         or shrunk: check it and flash again"
    )]
    ShortRead { device: PathBuf, read: u64, bytes: u64 },
}

/// What to flash where.
#[derive(Debug, Clone)]
pub struct FlashOptions {
    pub image: PathBuf,
    pub device: PathBuf,
    /// Accept an image without a GPT, or one for another sector size.
    pub force: bool,
}

/// The checked image and device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub image: ImageInfo,
    pub device: DeviceInfo,
}

/// What a flash (or dry run) did. Field names are stable: scripts parse them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub device: PathBuf,
    pub image: PathBuf,
    pub bytes: u64,
    /// SHA-256 of the image (and, when verified, of the bytes read back).
    pub sha256: String,
    pub verified: bool,
    pub seconds: f64,
    pub dry_run: bool,
}

/// Run every check, write nothing: the image first (no privilege needed),
/// then the device, then whether the kernel grants exclusive access.
pub fn plan(opts: &FlashOptions) -> Result<Plan, FlashError> {
    let image = image::inspect(&opts.image, opts.force)?;
    let device = device::inspect(&opts.device)?;
    check_fits(&image, &device)?;
    if let Some(sector) = image.gpt_sector_size
        && sector != device.logical_block_size
        && !opts.force
    {
        return Err(FlashError::SectorSize {
            device: device.path.clone(),
            device_sector: device.logical_block_size,
            image_sector: sector,
        });
    }
    drop(open_exclusive(&device.path, false)?);
    Ok(Plan { image, device })
}

/// The image must fit on the device.
pub fn check_fits(image: &ImageInfo, device: &DeviceInfo) -> Result<(), FlashError> {
    if image.bytes > device.bytes {
        return Err(FlashError::TooSmall {
            device: device.path.clone(),
            device_bytes: device.bytes,
            image: image.path.clone(),
            image_bytes: image.bytes,
        });
    }
    Ok(())
}

/// What will be overwritten, for the operator to read before confirming.
pub fn describe(plan: &Plan) -> String {
    let d = &plan.device;
    let mut text = format!(
        "device {} ({}): {}, {} bytes ({}){}\n",
        d.path.display(),
        d.name,
        d.model.as_deref().unwrap_or("unknown model"),
        d.bytes,
        human(d.bytes),
        if d.removable { ", removable" } else { "" },
    );
    if d.partitions.is_empty() {
        text.push_str("  no partitions\n");
    } else {
        for p in &d.partitions {
            let label = p.label.as_ref().map(|l| format!(" \"{l}\"")).unwrap_or_default();
            text.push_str(&format!("  partition {}{label}: {} bytes ({})\n", p.name, p.bytes, human(p.bytes)));
        }
    }
    text.push_str(&format!(
        "image {}: {} bytes ({}){}\n",
        plan.image.path.display(),
        plan.image.bytes,
        human(plan.image.bytes),
        if plan.image.gpt_sector_size.is_some() { ", GPT" } else { ", no GPT (--force)" },
    ));
    text.push_str(&format!(
        "bytes 0..{} of {} will be overwritten: its partition table and every partition above are lost",
        plan.image.bytes,
        d.path.display()
    ));
    text
}

/// Check the operator's answer: the device's kernel name (`sdb`), or its
/// path as given. `line` is `None` when stdin is not a terminal.
pub fn check_confirmation(plan: &Plan, line: Option<&str>) -> Result<(), FlashError> {
    let device = plan.device.path.clone();
    let Some(line) = line else { return Err(FlashError::NoTerminal { device }) };
    let typed = line.trim();
    if typed == plan.device.name || Path::new(typed) == device {
        Ok(())
    } else {
        Err(FlashError::NotConfirmed { device, typed: typed.to_string(), expected: plan.device.name.clone() })
    }
}

/// Hash the image without writing: what a dry run reports.
pub fn dry_run(plan: &Plan) -> Result<Summary, FlashError> {
    let started = Instant::now();
    let file = File::open(&plan.image.path).map_err(|e| image_io(&plan.image.path, e))?;
    let sha256 = sha256_of(file, plan.image.bytes, &plan.image.path)?;
    Ok(Summary {
        device: plan.device.path.clone(),
        image: plan.image.path.clone(),
        bytes: plan.image.bytes,
        sha256,
        verified: false,
        seconds: started.elapsed().as_secs_f64(),
        dry_run: true,
    })
}

/// Write the image to the device, fsync, then (with `verify`) read the
/// written range back and compare SHA-256.
pub fn flash(plan: &Plan, verify: bool, progress: &Progress) -> Result<Summary, FlashError> {
    let started = Instant::now();
    let image_path = &plan.image.path;
    let device_path = &plan.device.path;
    let dev_io =
        |what: &str, source| FlashError::Io { what: format!("{what} {}", device_path.display()), error: source };
    let mut image = File::open(image_path).map_err(|e| image_io(image_path, e))?;
    let mut dev = open_exclusive(device_path, true)?;

    let step = progress.step("write");
    let mut meter = Meter::new(progress.mode(), "write", plan.image.bytes);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    loop {
        let n = fill(&mut image, &mut buf).map_err(|e| image_io(image_path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dev.write_all(&buf[..n]).map_err(|e| dev_io(&format!("writing at byte {written} of"), e))?;
        written += n as u64;
        meter.advance(n as u64);
    }
    dev.sync_all().map_err(|e| dev_io("flushing (fsync)", e))?;
    meter.finish();
    let sha256 = hex::encode(hasher.finalize());
    if written != plan.image.bytes {
        let source = std::io::Error::other(format!("read {written} bytes, expected {}", plan.image.bytes));
        return Err(image_io(image_path, source));
    }
    step.done(format!("{written} bytes to {}, sha256:{sha256}", device_path.display()));

    if verify {
        let step = progress.step("verify");
        // Read from the device, not from the page cache the write filled.
        drop_cache(&dev, written).map_err(|e| dev_io("dropping cached pages of", e))?;
        dev.seek(SeekFrom::Start(0)).map_err(|e| dev_io("seeking", e))?;
        let mut meter = Meter::new(progress.mode(), "verify", written);
        verify_with(&mut dev, written, &sha256, device_path, &mut meter)?;
        meter.finish();
        step.done(format!("read back {written} bytes, sha256 matches"));
    }
    Ok(Summary {
        device: device_path.clone(),
        image: image_path.clone(),
        bytes: written,
        sha256,
        verified: verify,
        seconds: started.elapsed().as_secs_f64(),
        dry_run: false,
    })
}

/// Read `bytes` bytes from `reader` and compare their SHA-256 with
/// `expected`; `device` names the source in errors.
pub fn verify(reader: impl Read, bytes: u64, expected: &str, device: &Path) -> Result<(), FlashError> {
    verify_with(reader, bytes, expected, device, &mut Meter::new(Mode::Quiet, "verify", bytes))
}

/// Verify the first `bytes` bytes of `device` against `expected`, reading
/// from the device rather than from cached pages.
pub fn verify_device(device: &Path, bytes: u64, expected: &str) -> Result<(), FlashError> {
    let dev = File::open(device)
        .map_err(|source| FlashError::Io { what: format!("opening {} to verify", device.display()), error: source })?;
    drop_cache(&dev, bytes).map_err(|source| FlashError::Io {
        what: format!("dropping cached pages of {}", device.display()),
        error: source,
    })?;
    verify(dev, bytes, expected, device)
}

fn verify_with(
    reader: impl Read,
    bytes: u64,
    expected: &str,
    device: &Path,
    meter: &mut Meter,
) -> Result<(), FlashError> {
    let mut reader = reader.take(bytes);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut read = 0u64;
    loop {
        let n = fill(&mut reader, &mut buf).map_err(|source| FlashError::Io {
            what: format!("reading back {} at byte {read}", device.display()),
            error: source,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        read += n as u64;
        meter.advance(n as u64);
    }
    if read != bytes {
        return Err(FlashError::ShortRead { device: device.into(), read, bytes });
    }
    let got = hex::encode(hasher.finalize());
    if got != expected {
        return Err(FlashError::Mismatch {
            device: device.into(),
            bytes,
            image_sha256: expected.to_string(),
            device_sha256: got,
        });
    }
    Ok(())
}

fn sha256_of(reader: impl Read, bytes: u64, path: &Path) -> Result<String, FlashError> {
    let mut reader = reader.take(bytes);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = fill(&mut reader, &mut buf).map_err(|e| image_io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Read until `buf` is full or the input ends; returns the bytes read.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn image_io(path: &Path, source: std::io::Error) -> FlashError {
    FlashError::Io { what: format!("reading the image {}", path.display()), error: source }
}

/// Open the device with `O_EXCL`: the kernel refuses it (EBUSY) while the
/// device or a partition is mounted, used as swap or held.
fn open_exclusive(path: &Path, write: bool) -> Result<File, FlashError> {
    OpenOptions::new().read(true).write(write).custom_flags(nix::fcntl::OFlag::O_EXCL.bits()).open(path).map_err(
        |source| {
            if source.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) {
                FlashError::Busy { device: path.into() }
            } else {
                FlashError::Io { what: format!("opening {} exclusively", path.display()), error: source }
            }
        },
    )
}

fn drop_cache(file: &File, bytes: u64) -> std::io::Result<()> {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    let len = i64::try_from(bytes).map_err(std::io::Error::other)?;
    posix_fadvise(file.as_fd(), 0, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED).map_err(std::io::Error::from)
}

/// `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} bytes") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// Byte progress: a bar on a terminal, a line every 10% otherwise, nothing
/// for JSON and quiet modes (their step events say when a phase ends).
struct Meter {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    name: &'static str,
    total: u64,
    done: u64,
    next_line: u64,
    last_line: Instant,
}

impl Meter {
    fn new(mode: Mode, name: &'static str, total: u64) -> Meter {
        let bar = (mode == Mode::Tty).then(|| {
            let style = indicatif::ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .expect("template is valid")
            .progress_chars("=> ");
            let bar = indicatif::ProgressBar::new(total).with_style(style).with_prefix(name);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let plain = mode == Mode::Plain;
        Meter { bar, plain, name, total, done: 0, next_line: total / 10, last_line: Instant::now() }
    }

    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
        }
        if self.plain && self.done >= self.next_line && self.done < self.total {
            let percent = self.done * 100 / self.total.max(1);
            eprintln!(
                "    {}: {} of {} ({percent}%, {:.1}s since the last line)",
                self.name,
                human(self.done),
                human(self.total),
                self.last_line.elapsed().as_secs_f64()
            );
            self.last_line = Instant::now();
            self.next_line = self.done + (self.total / 10).max(1);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn info(image_bytes: u64, device_bytes: u64) -> Plan {
        Plan {
            image: ImageInfo { path: "disk.raw".into(), bytes: image_bytes, gpt_sector_size: Some(512) },
            device: DeviceInfo {
                path: "/dev/sdb".into(),
                name: "sdb".into(),
                dev: DevNum { major: 8, minor: 16 },
                bytes: device_bytes,
                model: Some("ATA SAMSUNG SSD".into()),
                logical_block_size: 512,
                removable: false,
                partitions: vec![device::Partition {
                    name: "sdb1".into(),
                    dev: DevNum { major: 8, minor: 17 },
                    bytes: 1 << 30,
                    label: Some("data".into()),
                }],
            },
        }
    }

    #[test]
    fn the_image_must_fit() {
        let plan = info(8 << 30, 8 << 30);
        check_fits(&plan.image, &plan.device).unwrap();
        let plan = info((8 << 30) + 1, 8 << 30);
        let err = check_fits(&plan.image, &plan.device).unwrap_err().to_string();
        assert!(err.contains("device /dev/sdb: too small: 8589934592 bytes (8.0 GiB)"), "{err}");
        assert!(err.contains("needs 8589934593 bytes"), "{err}");
    }

    #[test]
    fn the_description_names_model_size_and_what_is_lost() {
        let text = describe(&info(600 << 20, 8 << 30));
        assert!(text.contains("device /dev/sdb (sdb): ATA SAMSUNG SSD, 8589934592 bytes (8.0 GiB)"), "{text}");
        assert!(text.contains("partition sdb1 \"data\": 1073741824 bytes (1.0 GiB)"), "{text}");
        assert!(text.contains("bytes 0..629145600 of /dev/sdb will be overwritten"), "{text}");
    }

    #[test]
    fn confirmation_needs_the_device_name_on_a_terminal() {
        let plan = info(1, 2);
        check_confirmation(&plan, Some("sdb\n")).unwrap();
        check_confirmation(&plan, Some("/dev/sdb")).unwrap();
        let err = check_confirmation(&plan, Some("y\n")).unwrap_err().to_string();
        assert!(err.contains("you typed `y`, not `sdb`"), "{err}");
        let err = check_confirmation(&plan, None).unwrap_err().to_string();
        assert!(err.contains("stdin is not a terminal") && err.contains("--yes"), "{err}");
    }

    #[test]
    fn verify_detects_a_single_flipped_byte() {
        let data: Vec<u8> = (0..(CHUNK + 1000)).map(|i| (i % 251) as u8).collect();
        let sha = hex::encode(Sha256::digest(&data));
        let len = data.len() as u64;
        verify(Cursor::new(&data), len, &sha, Path::new("/dev/x")).unwrap();
        // Extra bytes past the written range (the rest of the disk) are not read.
        let mut longer = data.clone();
        longer.extend_from_slice(b"junk beyond the image");
        verify(Cursor::new(&longer), len, &sha, Path::new("/dev/x")).unwrap();

        let mut bad = data.clone();
        bad[CHUNK + 7] ^= 0x01;
        let bad_sha = hex::encode(Sha256::digest(&bad));
        let err = verify(Cursor::new(&bad), len, &sha, Path::new("/dev/x")).unwrap_err();
        match &err {
            FlashError::Mismatch { image_sha256, device_sha256, .. } => {
                assert_eq!(image_sha256, &sha);
                assert_eq!(device_sha256, &bad_sha);
            }
            other => panic!("expected a mismatch, got {other}"),
        }
        let text = err.to_string();
        assert!(text.contains(&sha) && text.contains(&bad_sha), "{text}");
    }

    #[test]
    fn verify_detects_a_short_device() {
        let data = vec![7u8; 4096];
        let sha = hex::encode(Sha256::digest(&data));
        let err = verify(Cursor::new(&data[..4000]), 4096, &sha, Path::new("/dev/x")).unwrap_err();
        assert!(matches!(err, FlashError::ShortRead { read: 4000, bytes: 4096, .. }), "{err}");
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(600 << 20), "600.0 MiB");
    }
}
