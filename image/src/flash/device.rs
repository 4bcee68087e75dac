//! The target block device: what it is (from `/sys/class/block`) and who
//! uses it (`/proc/self/mountinfo`, `/proc/swaps`, holders). Parsers are
//! pure; [`inspect`] is the thin step that reads the host.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::FlashError;

/// Where the kernel describes block devices.
pub const SYS_CLASS_BLOCK: &str = "/sys/class/block";

/// A `major:minor` device number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl DevNum {
    /// From `st_rdev`.
    pub fn from_rdev(rdev: u64) -> DevNum {
        // Linux's encoding (glibc gnu_dev_major/minor).
        let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0x0000_0fff);
        let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0x0000_00ff);
        DevNum { major: major as u32, minor: minor as u32 }
    }

    /// Parse `8:16`.
    pub fn parse(text: &str) -> Option<DevNum> {
        let (major, minor) = text.trim().split_once(':')?;
        Some(DevNum { major: major.parse().ok()?, minor: minor.parse().ok()? })
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// One mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub dev: DevNum,
    pub mount_point: PathBuf,
    pub source: String,
}

/// Parse `/proc/self/mountinfo` (proc(5)); lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dev = DevNum::parse(fields.get(2)?)?;
            let mount_point = PathBuf::from(unescape(fields.get(4)?));
            // After the optional fields: `-`, fstype, source.
            let dash = fields.iter().position(|f| *f == "-")?;
            let source = unescape(fields.get(dash + 2)?);
            Some(Mount { dev, mount_point, source })
        })
        .collect()
}

/// Parse `/proc/swaps`: the file or device of each active swap area.
pub fn parse_swaps(text: &str) -> Vec<PathBuf> {
    text.lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .map(|name| PathBuf::from(unescape(name)))
        .collect()
}

/// Undo the kernel's octal escapes (`\040` for a space) in mount tables.
pub fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A partition of the target device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Partition {
    pub name: String,
    pub dev: DevNum,
    pub bytes: u64,
    /// GPT partition name, when the kernel knows it.
    pub label: Option<String>,
}

/// The target device, checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    /// As given on the command line.
    pub path: PathBuf,
    /// Kernel name, e.g. `sdb`: what the operator types to confirm.
    pub name: String,
    pub dev: DevNum,
    pub bytes: u64,
    /// Vendor and model, or the backing file of a loop device.
    pub model: Option<String>,
    pub logical_block_size: u64,
    pub removable: bool,
    pub partitions: Vec<Partition>,
}

/// Something that holds the device or one of its partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum User {
    Mounted { device: String, mount_point: PathBuf },
    Swap { device: String },
    Held { device: String, holder: String },
}

impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            User::Mounted { device, mount_point } => write!(f, "{device} is mounted on {}", mount_point.display()),
            User::Swap { device } => write!(f, "{device} is in use as swap"),
            User::Held { device, holder } => write!(f, "{device} is held by {holder} (device mapper, LVM, RAID...)"),
        }
    }
}

/// Who uses any of `devices` (name, number): pure over the parsed tables.
/// `swaps` are the device numbers of active swap devices; `holders` lists
/// (device, holder) pairs.
pub fn users(
    devices: &[(String, DevNum)],
    mounts: &[Mount],
    swaps: &[DevNum],
    holders: &[(String, String)],
) -> Vec<User> {
    let mut found = Vec::new();
    for (name, dev) in devices {
        let dev_path = format!("/dev/{name}");
        for m in mounts.iter().filter(|m| m.dev == *dev || m.source == dev_path) {
            found.push(User::Mounted { device: name.clone(), mount_point: m.mount_point.clone() });
        }
        if swaps.contains(dev) {
            found.push(User::Swap { device: name.clone() });
        }
        for (held, holder) in holders.iter().filter(|(held, _)| held == name) {
            found.push(User::Held { device: held.clone(), holder: holder.clone() });
        }
    }
    found
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn read_number(path: &Path) -> Result<u64, FlashError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| FlashError::Io { what: format!("reading {}", path.display()), error: source })?;
    text.trim().parse().map_err(|_| FlashError::Io {
        what: format!("reading {}", path.display()),
        error: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("`{}` is not a number", text.trim())),
    })
}

fn partitions(sys: &Path) -> Result<Vec<Partition>, FlashError> {
    let entries = std::fs::read_dir(sys)
        .map_err(|source| FlashError::Io { what: format!("listing {}", sys.display()), error: source })?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join("partition").is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(dev) = read_trimmed(&dir.join("dev")).and_then(|d| DevNum::parse(&d)) else { continue };
        let label = read_trimmed(&dir.join("uevent"))
            .and_then(|u| u.lines().find_map(|l| l.strip_prefix("PARTNAME=").map(str::to_string)));
        found.push(Partition { name, dev, bytes: read_number(&dir.join("size"))? * 512, label });
    }
    found.sort_by_key(|p| p.dev.minor);
    Ok(found)
}

fn model(sys: &Path) -> Option<String> {
    if let Some(backing) = read_trimmed(&sys.join("loop/backing_file")) {
        return Some(format!("loop device backed by {backing}"));
    }
    let parts: Vec<String> =
        ["device/vendor", "device/model"].iter().filter_map(|f| read_trimmed(&sys.join(f))).collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// Inspect `path`: a whole-disk block device, not in use. Reads the host's
/// `/sys/class/block`, `/proc/self/mountinfo` and `/proc/swaps`.
pub fn inspect(path: &Path) -> Result<DeviceInfo, FlashError> {
    let meta = std::fs::metadata(path).map_err(|error| FlashError::DeviceMissing { device: path.into(), error })?;
    if !meta.file_type().is_block_device() {
        return Err(FlashError::NotABlockDevice { device: path.into(), kind: file_kind(&meta) });
    }
    let dev = DevNum::from_rdev(meta.rdev());
    let sys_link = PathBuf::from(format!("/sys/dev/block/{dev}"));
    let sys_real = std::fs::canonicalize(&sys_link)
        .map_err(|source| FlashError::Io { what: format!("resolving {}", sys_link.display()), error: source })?;
    let name = sys_real.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let sys = Path::new(SYS_CLASS_BLOCK).join(&name);
    if sys.join("partition").is_file() {
        let disk = sys_real.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
        return Err(FlashError::IsPartition { device: path.into(), name, disk });
    }
    if read_trimmed(&sys.join("ro")).as_deref() == Some("1") {
        return Err(FlashError::ReadOnly { device: path.into() });
    }
    let partitions = partitions(&sys)?;

    let mut devices = vec![(name.clone(), dev)];
    devices.extend(partitions.iter().map(|p| (p.name.clone(), p.dev)));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| FlashError::Io { what: "reading /proc/self/mountinfo".into(), error: source })?;
    let swaps = std::fs::read_to_string("/proc/swaps")
        .map_err(|source| FlashError::Io { what: "reading /proc/swaps".into(), error: source })?;
    let swap_devs: Vec<DevNum> = parse_swaps(&swaps)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .filter(|m| m.file_type().is_block_device())
        .map(|m| DevNum::from_rdev(m.rdev()))
        .collect();
    let mut holders = Vec::new();
    for (held, _) in &devices {
        let dir = Path::new(SYS_CLASS_BLOCK).join(held).join("holders");
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            holders.push((held.clone(), entry.file_name().to_string_lossy().into_owned()));
        }
    }
    let users = users(&devices, &parse_mountinfo(&mounts), &swap_devs, &holders);
    if !users.is_empty() {
        return Err(FlashError::InUse { device: path.into(), users });
    }

    Ok(DeviceInfo {
        path: path.into(),
        name,
        dev,
        bytes: read_number(&sys.join("size"))? * 512,
        model: model(&sys),
        logical_block_size: read_trimmed(&sys.join("queue/logical_block_size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(512),
        removable: read_trimmed(&sys.join("removable")).as_deref() == Some("1"),
        partitions,
    })
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else {
        "not a block device"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw
30 22 8:17 / /mnt/usb\\040stick rw,relatime shared:5 - vfat /dev/sdb1 rw
31 22 0:45 / /data rw - btrfs /dev/sdc rw,space_cache
40 22 0:5 / /dev rw,nosuid - devtmpfs udev rw
";

    #[test]
    fn mountinfo_gives_numbers_mount_points_and_sources() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 4);
        assert_eq!(
            mounts[1],
            Mount {
                dev: DevNum { major: 8, minor: 17 },
                mount_point: "/mnt/usb stick".into(),
                source: "/dev/sdb1".into()
            }
        );
        assert_eq!(mounts[2].source, "/dev/sdc");
    }

    #[test]
    fn swaps_are_listed_by_file() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                    /dev/sdb2                               partition\t1048572\t\t0\t\t-2\n\
                    /swap\\040file                           file\t\t1024\t\t0\t\t-3\n";
        assert_eq!(parse_swaps(text), vec![PathBuf::from("/dev/sdb2"), PathBuf::from("/swap file")]);
        assert!(parse_swaps("Filename Type Size Used Priority\n").is_empty());
    }

    #[test]
    fn device_numbers_parse_and_decode() {
        assert_eq!(DevNum::parse("259:3\n"), Some(DevNum { major: 259, minor: 3 }));
        assert_eq!(DevNum::parse("8"), None);
        // makedev(8, 17) and makedev(259, 300) as glibc encodes them.
        assert_eq!(DevNum::from_rdev(0x811), DevNum { major: 8, minor: 17 });
        let rdev = ((259u64 & 0xfff) << 8) | (300 & 0xff) | ((300u64 & !0xff) << 12);
        assert_eq!(DevNum::from_rdev(rdev), DevNum { major: 259, minor: 300 });
    }

    #[test]
    fn a_partition_in_use_makes_the_disk_in_use() {
        let devices = vec![
            ("sdb".to_string(), DevNum { major: 8, minor: 16 }),
            ("sdb1".to_string(), DevNum { major: 8, minor: 17 }),
            ("sdb2".to_string(), DevNum { major: 8, minor: 18 }),
            ("sdb3".to_string(), DevNum { major: 8, minor: 19 }),
        ];
        let mounts = parse_mountinfo(MOUNTINFO);
        let holders = vec![("sdb3".to_string(), "dm-0".to_string())];
        let found = users(&devices, &mounts, &[DevNum { major: 8, minor: 18 }], &holders);
        assert_eq!(
            found,
            vec![
                User::Mounted { device: "sdb1".into(), mount_point: "/mnt/usb stick".into() },
                User::Swap { device: "sdb2".into() },
                User::Held { device: "sdb3".into(), holder: "dm-0".into() },
            ]
        );
        assert_eq!(found[0].to_string(), "sdb1 is mounted on /mnt/usb stick");
    }

    #[test]
    fn a_btrfs_mount_is_found_by_its_source() {
        // btrfs reports an anonymous device number: the source names the disk.
        let devices = vec![("sdc".to_string(), DevNum { major: 8, minor: 32 })];
        let found = users(&devices, &parse_mountinfo(MOUNTINFO), &[], &[]);
        assert_eq!(found, vec![User::Mounted { device: "sdc".into(), mount_point: "/data".into() }]);
    }

    #[test]
    fn an_unused_disk_has_no_users() {
        let devices = vec![("sdd".to_string(), DevNum { major: 8, minor: 48 })];
        assert!(users(&devices, &parse_mountinfo(MOUNTINFO), &[], &[]).is_empty());
    }

    #[test]
    fn octal_escapes_are_undone() {
        assert_eq!(unescape("a\\040b\\011c\\134"), "a b\tc\\");
        assert_eq!(unescape("tail\\04"), "tail\\04");
    }
}
