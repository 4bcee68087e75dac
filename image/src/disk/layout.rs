//! The GPT layout of a geminik8s disk and the kernel command lines that
//! boot it. Pure functions: the tools that write the layout are in
//! [`super`].

use sha2::{Digest, Sha256};

use crate::spec::{Labels, Sizes};

pub const MIB: u64 = 1 << 20;
/// Partitions start on 1 MiB boundaries; the first one at 1 MiB, and 1 MiB
/// is left at the end for the backup GPT.
pub const ALIGN: u64 = MIB;

pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const LINUX_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// Filesystem labels.
pub const ESP_FS_LABEL: &str = "GEMIN-ESP";
pub const OEM_FS_LABEL: &str = "GEMIN_OEM";
pub const PERSISTENT_FS_LABEL: &str = "GEMIN_PERSIST";
/// The ISO9660 volume id of the live image.
pub const LIVE_LABEL: &str = "GEMIN_LIVE";
/// Where the root image sits on the live medium and in the PXE root initrd.
pub const LIVE_ROOT: &str = "/gemin/root.squashfs";

/// The root slots (the agent writes the passive one in an upgrade).
pub use geminik8s::upgrade::slot::Slot;

/// Default sizes when the spec leaves one out.
pub const DEFAULT_ESP: u64 = 256 * MIB;
pub const DEFAULT_OEM: u64 = 64 * MIB;
pub const DEFAULT_ROOT: u64 = 2048 * MIB;
pub const DEFAULT_PERSISTENT: u64 = 4096 * MIB;

/// What a partition is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Esp,
    Oem,
    Root(Slot),
    Persistent,
}

impl Role {
    fn label_key(self) -> &'static str {
        match self {
            Role::Esp => "esp",
            Role::Oem => "oem",
            Role::Root(slot) => slot.label_key(),
            Role::Persistent => "persistent",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based GPT index.
    pub number: u32,
    pub role: Role,
    pub label: String,
    pub type_guid: &'static str,
    pub uuid: String,
    /// Bytes from the start of the disk.
    pub start: u64,
    pub size: u64,
}

impl Partition {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub disk_uuid: String,
    pub partitions: Vec<Partition>,
    /// Size of the whole disk image.
    pub size: u64,
}

fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// A UUID derived from `seed` and `what`: stable across builds of the same
/// image, different between images.
pub fn stable_uuid(seed: &str, what: &str) -> String {
    let digest = Sha256::digest(format!("{seed}\0{what}").as_bytes());
    let mut b: [u8; 16] = digest[..16].try_into().expect("16 bytes");
    b[6] = (b[6] & 0x0f) | 0x40; // version 4 layout
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h = hex::encode(b).to_uppercase();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

impl Layout {
    /// ESP, OEM, root A, root B, persistent; in that order on the disk, so
    /// the persistent partition is last and can grow to the end.
    pub fn new(sizes: &Sizes, labels: &Labels, seed: &str) -> Layout {
        let wanted = [
            (Role::Esp, ESP_TYPE, sizes.esp.unwrap_or(DEFAULT_ESP)),
            (Role::Oem, LINUX_TYPE, sizes.oem.unwrap_or(DEFAULT_OEM)),
            (Role::Root(Slot::A), LINUX_TYPE, sizes.root.unwrap_or(DEFAULT_ROOT)),
            (Role::Root(Slot::B), LINUX_TYPE, sizes.root.unwrap_or(DEFAULT_ROOT)),
            (Role::Persistent, LINUX_TYPE, sizes.persistent.unwrap_or(DEFAULT_PERSISTENT)),
        ];
        let mut start = ALIGN;
        let mut partitions = Vec::new();
        for (i, (role, type_guid, size)) in wanted.into_iter().enumerate() {
            let size = align_up(size);
            let label = labels.get(role.label_key()).to_string();
            partitions.push(Partition {
                number: i as u32 + 1,
                role,
                uuid: stable_uuid(seed, role.label_key()),
                label,
                type_guid,
                start,
                size,
            });
            start += size;
        }
        Layout { disk_uuid: stable_uuid(seed, "disk"), partitions, size: start + ALIGN }
    }

    pub fn part(&self, role: Role) -> &Partition {
        self.partitions.iter().find(|p| p.role == role).expect("every role has its partition")
    }

    pub fn slot(&self, slot: Slot) -> &Partition {
        self.part(Role::Root(slot))
    }

    /// The kernel command line of a root slot on this disk.
    pub fn slot_cmdline(&self, slot: Slot) -> String {
        format!(
            "{COMMON_ARGS} gemin.slot={} gemin.root=PARTLABEL={} gemin.persistent=PARTLABEL={} gemin.oem=PARTLABEL={} gemin.esp=PARTLABEL={}",
            slot.letter(),
            self.slot(slot).label,
            self.part(Role::Persistent).label,
            self.part(Role::Oem).label,
            self.part(Role::Esp).label,
        )
    }

    /// `KEY=label` lines for the installer (`/gemin/install/labels.env`).
    pub fn labels_env(&self) -> String {
        self.partitions.iter().map(|p| format!("{}={}\n", p.role.label_key().to_uppercase(), p.label)).collect()
    }

    /// The layout as an `sfdisk` script (512-byte sectors).
    pub fn sfdisk_script(&self) -> String {
        self.script(false)
    }

    /// The same, with the last (persistent) partition filling the disk: for
    /// installing onto a disk of any size.
    pub fn sfdisk_install_script(&self) -> String {
        self.script(true)
    }

    fn script(&self, fill_last: bool) -> String {
        let mut s = format!("label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: 2048\n", self.disk_uuid);
        for (i, p) in self.partitions.iter().enumerate() {
            let size =
                if fill_last && i + 1 == self.partitions.len() { "+".to_string() } else { (p.size / 512).to_string() };
            s.push_str(&format!(
                "start={}, size={size}, type={}, uuid={}, name=\"{}\"\n",
                p.start / 512,
                p.type_guid,
                p.uuid,
                p.label
            ));
        }
        s
    }
}

/// Parameters every geminik8s boot gets. `panic=10`: a boot that fails in
/// the initramfs reboots after 10 s, so boot counting can fall back.
const COMMON_ARGS: &str = "boot=gemin console=tty0 console=ttyS0,115200 panic=10";

/// The kernel command line of the live ISO: root from the medium, state in RAM.
pub fn live_cmdline() -> String {
    format!("{COMMON_ARGS} gemin.slot=live gemin.root=live:LABEL={LIVE_LABEL}:{LIVE_ROOT}")
}

/// The kernel command line of a PXE boot: the root image comes as a second
/// initrd, state in RAM.
pub fn pxe_cmdline() -> String {
    format!("{COMMON_ARGS} gemin.slot=pxe gemin.root=ram:{LIVE_ROOT}")
}

/// A systemd-boot entry (Boot Loader Specification type #1). Higher
/// `version` sorts first, so the default entry is the newest slot with tries
/// left; an entry whose tries ran out sorts last.
pub fn boot_entry(title: &str, version: u32, kernel: &str, initrd: &str, options: &str) -> String {
    format!(
        "title {title}\nsort-key geminik8s\nversion {version}\nlinux {kernel}\ninitrd {initrd}\noptions {options}\n"
    )
}

/// `loader.conf`: no menu unless a key is held, no editor (the command
/// line is the root of trust of the slot choice).
pub const LOADER_CONF: &str = "timeout 0\neditor no\nauto-entries no\nauto-firmware no\nconsole-mode keep\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes() -> Sizes {
        Sizes { esp: Some(100 * MIB), root: Some(500 * MIB + 1), oem: Some(MIB), persistent: Some(MIB * 3 / 2) }
    }

    #[test]
    fn partitions_are_aligned_contiguous_and_in_order() {
        let l = Layout::new(&sizes(), &Labels::default(), "x");
        let labels: Vec<&str> = l.partitions.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(labels, ["gemin-esp", "gemin-oem", "gemin-root-a", "gemin-root-b", "gemin-persistent"]);
        assert_eq!(l.partitions[0].start, MIB);
        for w in l.partitions.windows(2) {
            assert_eq!(w[0].end(), w[1].start, "no gaps");
        }
        assert!(l.partitions.iter().all(|p| p.start % ALIGN == 0 && p.size % ALIGN == 0));
        assert_eq!(l.slot(Slot::A).size, 501 * MIB, "rounded up, never down");
        assert_eq!(l.slot(Slot::A).size, l.slot(Slot::B).size);
        assert_eq!(l.size, l.partitions.last().unwrap().end() + MIB, "room for the backup GPT");
    }

    #[test]
    fn uuids_are_stable_per_seed_and_distinct() {
        let a = Layout::new(&sizes(), &Labels::default(), "image-1");
        assert_eq!(a, Layout::new(&sizes(), &Labels::default(), "image-1"));
        let b = Layout::new(&sizes(), &Labels::default(), "image-2");
        assert_ne!(a.disk_uuid, b.disk_uuid);
        let mut all: Vec<&str> = a.partitions.iter().map(|p| p.uuid.as_str()).collect();
        all.push(&a.disk_uuid);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 6);
        assert!(a.disk_uuid.chars().nth(14) == Some('4'), "{}", a.disk_uuid);
    }

    #[test]
    fn sfdisk_script_uses_sectors() {
        let l = Layout::new(&sizes(), &Labels::default(), "x");
        let script = l.sfdisk_script();
        assert!(script.starts_with("label: gpt\n"));
        assert!(script.contains(&format!("start=2048, size={}, type={ESP_TYPE}", 100 * 2048)), "{script}");
        assert!(script.contains("name=\"gemin-persistent\""));
        let install = l.sfdisk_install_script();
        assert_eq!(install.lines().count(), script.lines().count());
        assert!(install.lines().last().unwrap().contains("size=+,"), "{install}");
        assert_eq!(install.lines().nth(4), script.lines().nth(4), "all but the last partition as built");
    }

    #[test]
    fn command_lines_name_their_partitions() {
        let b = Layout::new(&sizes(), &Labels::default(), "x").slot_cmdline(Slot::B);
        assert!(b.contains("gemin.root=PARTLABEL=gemin-root-b") && b.contains("gemin.slot=b"), "{b}");
        assert!(
            b.contains("gemin.esp=PARTLABEL=gemin-esp gemin") || b.ends_with("gemin.esp=PARTLABEL=gemin-esp"),
            "{b}"
        );
        assert!(b.contains("panic=10"), "failed boots must reboot for the fallback");
        let mut labels = Labels::default();
        labels.set("root_b", "site-b".into());
        labels.set("esp", "site-esp".into());
        let custom = Layout::new(&sizes(), &labels, "x");
        let b = custom.slot_cmdline(Slot::B);
        assert!(b.contains("gemin.root=PARTLABEL=site-b") && b.contains("gemin.esp=PARTLABEL=site-esp"), "{b}");
        assert!(custom.labels_env().contains("ESP=site-esp\nOEM=gemin-oem\n"), "{}", custom.labels_env());
        assert_eq!(custom.slot(Slot::B).uuid, Layout::new(&sizes(), &Labels::default(), "x").slot(Slot::B).uuid);
        assert!(live_cmdline().contains("gemin.root=live:LABEL=GEMIN_LIVE:/gemin/root.squashfs"));
        assert!(!live_cmdline().contains("gemin.persistent"));
        assert!(pxe_cmdline().contains("gemin.root=ram:/gemin/root.squashfs"));
    }
}
