//! The A/B root slots of an installed node and their systemd-boot entries
//! on the EFI system partition (mounted at `/efi`).
//!
//! Each slot has an entry `gemin-a.conf` / `gemin-b.conf`; the boot loader
//! starts the entry with the highest `version` that has tries left. Boot
//! counting (Boot Loader Specification) puts the tries in the file name:
//! `gemin-b+2.conf` has two tries, systemd-boot renames it to
//! `gemin-b+1-1.conf` when it starts it, `systemd-bless-boot` to
//! `gemin-b.conf` once the boot is good, and an entry at `+0` is sorted
//! last, so the other slot boots.
//!
//! [`stage`] writes a bundle into the slot the node did not boot from,
//! ordered so that a power cut at any point leaves the booted slot the one
//! that starts next, until the very last step makes the new slot the next
//! boot with its tries.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, ensure};

use super::bundle::{self, Bundle};
use super::node::remove;
use crate::fsutil::write_atomic;

/// A root slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub const BOTH: [Slot; 2] = [Slot::A, Slot::B];

    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// The key of the slot's partition label in an image spec's `labels:`.
    pub fn label_key(self) -> &'static str {
        match self {
            Slot::A => "root_a",
            Slot::B => "root_b",
        }
    }

    /// The boot entry id (file name without counter and `.conf`) on the ESP.
    pub fn entry_id(self) -> String {
        format!("gemin-{}", self.letter())
    }

    /// Where the slot's kernel and initramfs are on the ESP.
    pub fn esp_dir(self) -> String {
        format!("gemin/{}", self.letter())
    }

    fn parse(letter: &str) -> Option<Slot> {
        match letter {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.letter())
    }
}

/// Where a node's boot state is.
#[derive(Debug, Clone)]
pub struct BootPaths {
    /// The EFI system partition.
    pub esp: PathBuf,
    /// The boot script's report of the boot (`GEMIN_SLOT=a`).
    pub boot_env: PathBuf,
    /// Where the partitions are found by their GPT names.
    pub partlabels: PathBuf,
}

impl Default for BootPaths {
    fn default() -> Self {
        BootPaths {
            esp: PathBuf::from("/efi"),
            boot_env: PathBuf::from("/run/geminik8s-boot/boot.env"),
            partlabels: PathBuf::from("/dev/disk/by-partlabel"),
        }
    }
}

impl BootPaths {
    fn entries_dir(&self) -> PathBuf {
        self.esp.join("loader/entries")
    }
}

/// The slot this boot runs from.
pub fn booted_slot(paths: &BootPaths) -> anyhow::Result<Slot> {
    let text = fs::read_to_string(&paths.boot_env).with_context(|| {
        format!("reading {}: was this node booted from a geminik8s image?", paths.boot_env.display())
    })?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("GEMIN_SLOT="))
        .ok_or_else(|| anyhow!("{} names no GEMIN_SLOT", paths.boot_env.display()))?
        .trim();
    Slot::parse(value).ok_or_else(|| {
        anyhow!(
            "this node booted {value:?} (a live or PXE boot), which has no root slots to upgrade: install it to a disk first"
        )
    })
}

/// Boot counting state of an entry, from its file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Counter {
    /// No counter: the entry was blessed (or never counted).
    Good,
    /// Tries left; `done` counts the tries started and not blessed.
    Trying { left: u32, done: u32 },
    /// No tries left: sorted last, not chosen while the other slot boots.
    Bad { done: u32 },
}

/// A slot's boot entry on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub slot: Slot,
    /// The file name in `loader/entries/`.
    pub file: String,
    pub counter: Counter,
    /// Its `version` line: the highest with tries left boots.
    pub version: u64,
    pub text: String,
}

impl Entry {
    fn line(&self, key: &str) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' '))).map(str::trim)
    }

    /// Its `title` line.
    pub fn title(&self) -> &str {
        self.line("title").unwrap_or("")
    }

    /// The GPT name of the slot's root partition (`gemin.root=PARTLABEL=...`).
    pub fn root_partlabel(&self) -> anyhow::Result<&str> {
        root_partlabel(&self.text)
            .ok_or_else(|| anyhow!("boot entry {} names no gemin.root=PARTLABEL= in its options", self.file))
    }

    /// The entry's text with another `version` and `title`.
    fn with(&self, version: u64, title: &str) -> String {
        let mut out = String::new();
        for line in self.text.lines() {
            if line.starts_with("version ") {
                out.push_str(&format!("version {version}\n"));
            } else if line.starts_with("title ") {
                out.push_str(&format!("title {title}\n"));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// The root partition's GPT name in an entry's `options` line.
fn root_partlabel(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("options "))
        .and_then(|o| o.split_whitespace().find_map(|w| w.strip_prefix("gemin.root=PARTLABEL=")))
}

/// `gemin-b+1-2.conf` -> (slot b, tries left 1, done 2); `.conf.staging`
/// is an entry [`stage`] took away.
fn parse_entry_name(file: &str) -> Option<(Slot, Counter)> {
    let stem = file.strip_suffix(".conf")?.strip_prefix("gemin-")?;
    let (letter, counter) = match stem.split_once('+') {
        None => (stem, Counter::Good),
        Some((letter, count)) => {
            let (left, done) = match count.split_once('-') {
                Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
                None => (count.parse().ok()?, 0),
            };
            (letter, if left == 0 { Counter::Bad { done } } else { Counter::Trying { left, done } })
        }
    };
    Some((Slot::parse(letter)?, counter))
}

/// The entries of both slots on the ESP (an entry [`stage`] took away is
/// not among them).
pub fn entries(paths: &BootPaths) -> anyhow::Result<Vec<Entry>> {
    let dir = paths.entries_dir();
    let mut out = Vec::new();
    for item in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let file = item?.file_name().to_string_lossy().into_owned();
        let Some((slot, counter)) = parse_entry_name(&file) else { continue };
        let text = fs::read_to_string(dir.join(&file)).with_context(|| format!("reading {}/{file}", dir.display()))?;
        let version =
            text.lines().find_map(|l| l.strip_prefix("version ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        out.push(Entry { slot, file, counter, version, text });
    }
    out.sort_by_key(|e| e.slot);
    for slot in Slot::BOTH {
        let n = out.iter().filter(|e| e.slot == slot).count();
        ensure!(n <= 1, "{} holds {n} entries for slot {slot}: remove all but one", dir.display());
    }
    Ok(out)
}

/// The slot the boot loader starts next: the highest version with tries left.
pub fn next_boot(entries: &[Entry]) -> Option<Slot> {
    entries.iter().filter(|e| !matches!(e.counter, Counter::Bad { .. })).max_by_key(|e| e.version).map(|e| e.slot)
}

/// What [`stage`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub slot: Slot,
    /// The new entry's file name.
    pub entry: String,
    pub version: String,
    pub root_bytes: u64,
}

fn staging_name(slot: Slot) -> String {
    format!("{}.conf.staging", slot.entry_id())
}

/// The copy of `slot`'s entry [`stage`] keeps in `state_dir` while the entry
/// is away. The ESP is FAT, which has no journal: a power cut just after the
/// rename can leave the renamed file without its text.
fn kept_entry(state_dir: &Path, slot: Slot) -> PathBuf {
    state_dir.join(format!("{}.conf.kept", slot.entry_id()))
}

/// Write `bundle` into the slot this node did not boot from and make it the
/// next boot with `tries` tries. `progress` is told the root filesystem's
/// bytes written and its size.
///
/// The order is what keeps a power cut harmless: the passive slot's entry
/// is first renamed away (`.conf.staging`, which the boot loader ignores),
/// then the root filesystem is written, synced and read back, then the
/// kernel and initramfs are replaced on the ESP (each by a rename), and only
/// then the entry comes back with a version above the booted one's and the
/// try counter. Until that last rename the booted slot is the only one the
/// boot loader can start; a second `stage` after a cut starts over, with the
/// entry's text from the copy kept in `state_dir` ([`kept_entry`]) before
/// it was taken away.
pub fn stage(
    bundle: &Bundle,
    paths: &BootPaths,
    state_dir: &Path,
    tries: u32,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<Staged> {
    ensure!(tries > 0, "a staged slot needs at least one try");
    let booted = booted_slot(paths)?;
    let target = booted.other();
    bundle.verify()?;
    let dir = paths.entries_dir();
    let all = entries(paths)?;
    let current = all
        .iter()
        .find(|e| e.slot == booted)
        .ok_or_else(|| anyhow!("{} holds no entry for the booted slot {booted}", dir.display()))?;
    ensure!(
        current.counter == Counter::Good,
        "the booted slot {booted} is still on trial ({}): writing slot {target} now would leave no known-good slot; wait until this boot passes its gate",
        current.file
    );
    // The passive slot's entry; after an interrupted stage, the copy kept
    // of it, or what is left of the renamed file.
    let staging = dir.join(staging_name(target));
    let kept = kept_entry(state_dir, target);
    let present = all.iter().find(|e| e.slot == target);
    let text = [present.map(|e| e.text.clone()), fs::read_to_string(&kept).ok(), fs::read_to_string(&staging).ok()]
        .into_iter()
        .flatten()
        .find(|text| root_partlabel(text).is_some())
        .ok_or_else(|| {
            anyhow!(
                "{} holds no boot entry for slot {target} that names its root partition (gemin.root=PARTLABEL=), nor does {}: was this disk made by gemin-image?",
                dir.display(),
                kept.display()
            )
        })?;
    let passive = Entry { slot: target, file: staging_name(target), counter: Counter::Good, version: 0, text };
    let label = passive.root_partlabel()?;
    ensure!(
        label != current.root_partlabel()?,
        "the entries of slot {target} and of the booted slot {booted} both name the partition {label}: writing it would overwrite the running system; fix the boot entries on the ESP"
    );
    let device = paths.partlabels.join(label);
    let root = bundle.file(bundle::ROOT);
    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&device)
        .with_context(|| format!("opening slot {target}'s root partition {}", device.display()))?;
    let room = dev.seek(SeekFrom::End(0)).with_context(|| format!("sizing {}", device.display()))?;
    ensure!(
        root.bytes <= room,
        "the bundle's root filesystem is {} bytes, slot {target}'s partition {} holds {room}: build the image with a smaller root or a disk with larger slots",
        root.bytes,
        device.display()
    );

    // 1. The passive slot can no longer be chosen; its entry's text is kept.
    write_atomic(&kept, passive.text.as_bytes(), 0o644)?;
    if let Some(e) = present {
        fs::rename(dir.join(&e.file), &staging).with_context(|| format!("renaming {} away", e.file))?;
        sync_dir(&dir)?;
    }

    // 2. The root filesystem, synced, then read back from the device.
    dev.seek(SeekFrom::Start(0))?;
    let mut src = File::open(bundle.path(bundle::ROOT))
        .with_context(|| format!("opening {}", bundle.path(bundle::ROOT).display()))?;
    let mut buf = vec![0u8; 4 << 20];
    let mut written = 0u64;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        dev.write_all(&buf[..n]).with_context(|| format!("writing {}", device.display()))?;
        written += n as u64;
        progress(written, root.bytes);
    }
    dev.sync_all().with_context(|| format!("syncing {}", device.display()))?;
    // Drop the cached pages, so the check reads what is on the disk.
    nix::fcntl::posix_fadvise(dev.as_fd(), 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .with_context(|| format!("dropping the cache of {}", device.display()))?;
    dev.seek(SeekFrom::Start(0))?;
    let (_, sha256) = bundle::sha256_reader((&mut dev).take(root.bytes))?;
    ensure!(
        sha256 == root.sha256,
        "slot {target}'s partition {} reads back with SHA-256 {sha256} after writing {}: the disk may be failing; slot {booted} stays the boot",
        device.display(),
        root.sha256
    );

    // 3. Kernel and initramfs, each replaced by a rename.
    let esp_dir = paths.esp.join(target.esp_dir());
    fs::create_dir_all(&esp_dir).with_context(|| format!("creating {}", esp_dir.display()))?;
    for name in [bundle::KERNEL, bundle::INITRD] {
        let bytes = fs::read(bundle.path(name)).with_context(|| format!("reading {}", bundle.path(name).display()))?;
        write_atomic(&esp_dir.join(name), &bytes, 0o644)?;
    }

    // 4. The entry, back, above the booted slot, with its tries.
    let release = bundle.release();
    let version = all.iter().map(|e| e.version).max().unwrap_or(0).max(current.version) + 1;
    let title = format!("{} {} (slot {})", release.name, release.version, target.letter().to_uppercase());
    let entry = format!("{}+{tries}.conf", target.entry_id());
    write_atomic(&dir.join(&entry), passive.with(version, &title).as_bytes(), 0o644)?;
    remove(&staging)?;
    sync_dir(&dir)?;
    remove(&kept)?;
    Ok(Staged { slot: target, entry, version: release.version.clone(), root_bytes: root.bytes })
}

/// Make `slot` the next boot (a rollback to the slot the node ran before):
/// its entry gets a version above every other and loses its try counter.
pub fn make_next(paths: &BootPaths, slot: Slot) -> anyhow::Result<Entry> {
    let dir = paths.entries_dir();
    let all = entries(paths)?;
    let entry = all
        .iter()
        .find(|e| e.slot == slot)
        .ok_or_else(|| anyhow!("{} holds no entry for slot {slot}", dir.display()))?;
    let version = all.iter().map(|e| e.version).max().unwrap_or(0) + 1;
    let title = entry.title().to_string();
    let file = format!("{}.conf", slot.entry_id());
    let text = entry.with(version, &title);
    write_atomic(&dir.join(&file), text.as_bytes(), 0o644)?;
    if entry.file != file {
        fs::remove_file(dir.join(&entry.file)).with_context(|| format!("removing {}", entry.file))?;
    }
    sync_dir(&dir)?;
    Ok(Entry { slot, file, counter: Counter::Good, version, text })
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::bundle::tests::bundle;

    /// A node's boot state in files: an ESP with both slots' entries as
    /// gemin-image writes them, booted from A, and the partitions as files.
    struct Node {
        _dir: tempfile::TempDir,
        paths: BootPaths,
        /// The agent's upgrade state directory.
        state: PathBuf,
    }

    fn entry_text(slot: Slot, version: u64) -> String {
        format!(
            "title geminik8s (slot {s})\nsort-key geminik8s\nversion {version}\nlinux /gemin/{l}/vmlinuz\ninitrd /gemin/{l}/initrd.img\noptions boot=gemin gemin.slot={l} gemin.root=PARTLABEL=gemin-root-{l} gemin.esp=PARTLABEL=gemin-esp\n",
            s = slot.letter().to_uppercase(),
            l = slot.letter()
        )
    }

    fn node(booted: &str, partition_bytes: u64) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let paths = BootPaths {
            esp: dir.path().join("efi"),
            boot_env: dir.path().join("boot.env"),
            partlabels: dir.path().join("by-partlabel"),
        };
        fs::create_dir_all(paths.entries_dir()).unwrap();
        fs::create_dir_all(&paths.partlabels).unwrap();
        fs::write(paths.entries_dir().join("gemin-a.conf"), entry_text(Slot::A, 1)).unwrap();
        fs::write(paths.entries_dir().join("gemin-b.conf"), entry_text(Slot::B, 0)).unwrap();
        for slot in Slot::BOTH {
            let part = File::create(paths.partlabels.join(format!("gemin-root-{slot}"))).unwrap();
            part.set_len(partition_bytes).unwrap();
        }
        fs::write(&paths.boot_env, format!("GEMIN_SLOT={booted}\nGEMIN_ROOT=read-only\n")).unwrap();
        let state = dir.path().join("state");
        fs::create_dir_all(&state).unwrap();
        Node { _dir: dir, paths, state }
    }

    fn files(paths: &BootPaths) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(paths.entries_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn entry_names_carry_the_boot_counter() {
        assert_eq!(parse_entry_name("gemin-a.conf"), Some((Slot::A, Counter::Good)));
        assert_eq!(parse_entry_name("gemin-b+3.conf"), Some((Slot::B, Counter::Trying { left: 3, done: 0 })));
        assert_eq!(parse_entry_name("gemin-b+1-2.conf"), Some((Slot::B, Counter::Trying { left: 1, done: 2 })));
        assert_eq!(parse_entry_name("gemin-b+0-3.conf"), Some((Slot::B, Counter::Bad { done: 3 })));
        for other in ["gemin-live.conf", "gemin-a.conf.staging", "gemin-c.conf", "gemin-a+x.conf", "other.conf"] {
            assert_eq!(parse_entry_name(other), None, "{other}");
        }
    }

    #[test]
    fn stage_writes_the_passive_slot_and_makes_it_the_next_boot_with_its_tries() {
        let node = node("a", 1 << 20);
        let b = tempfile::tempdir().unwrap();
        let root: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let bundle = bundle(b.path(), "2", &root);
        let mut seen = Vec::new();
        let staged = stage(&bundle, &node.paths, &node.state, 2, |done, total| seen.push((done, total))).unwrap();
        assert_eq!(staged.slot, Slot::B);
        assert_eq!(staged.entry, "gemin-b+2.conf");
        assert_eq!(seen.last(), Some(&(300_000, 300_000)));
        let part = fs::read(node.paths.partlabels.join("gemin-root-b")).unwrap();
        assert_eq!(part.len(), 1 << 20, "the partition keeps its size");
        assert_eq!(&part[..root.len()], &root[..]);
        assert!(
            fs::read(node.paths.partlabels.join("gemin-root-a")).unwrap().iter().all(|b| *b == 0),
            "slot A untouched"
        );
        assert_eq!(
            fs::read(node.paths.esp.join("gemin/b/vmlinuz")).unwrap(),
            fs::read(b.path().join("vmlinuz")).unwrap()
        );
        assert_eq!(files(&node.paths), ["gemin-a.conf", "gemin-b+2.conf"]);
        let all = entries(&node.paths).unwrap();
        assert_eq!(next_boot(&all), Some(Slot::B));
        let new = all.iter().find(|e| e.slot == Slot::B).unwrap();
        assert_eq!(new.version, 2, "above slot A's 1");
        assert_eq!(new.counter, Counter::Trying { left: 2, done: 0 });
        assert!(new.text.contains("title geminik8s 2 (slot B)"), "{}", new.text);
        assert!(new.text.contains("gemin.root=PARTLABEL=gemin-root-b"), "{}", new.text);
    }

    #[test]
    fn a_stage_cut_short_leaves_the_booted_slot_the_only_choice_and_a_second_stage_completes() {
        let node = node("a", 1 << 20);
        let b = tempfile::tempdir().unwrap();
        let bundle = bundle(b.path(), "2", &[9u8; 200_000]);
        // A power cut while the root filesystem was being written: the
        // entry was already taken away, half the bytes are on the disk.
        fs::rename(
            node.paths.entries_dir().join("gemin-b.conf"),
            node.paths.entries_dir().join("gemin-b.conf.staging"),
        )
        .unwrap();
        let all = entries(&node.paths).unwrap();
        assert_eq!(next_boot(&all), Some(Slot::A), "only slot A can boot");
        let staged = stage(&bundle, &node.paths, &node.state, 1, |_, _| {}).unwrap();
        assert_eq!(staged.entry, "gemin-b+1.conf");
        assert_eq!(files(&node.paths), ["gemin-a.conf", "gemin-b+1.conf"]);
        assert_eq!(next_boot(&entries(&node.paths).unwrap()), Some(Slot::B));
    }

    #[test]
    fn a_power_cut_that_empties_the_renamed_entry_is_recovered_from_the_kept_copy() {
        let node = node("a", 1 << 20);
        let b = tempfile::tempdir().unwrap();
        let bundle = bundle(b.path(), "2", &[7u8; 200_000]);
        // The cut while the root filesystem is written (the progress
        // callback stops the stage there), and FAT lost the renamed file's text.
        let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            stage(&bundle, &node.paths, &node.state, 1, |_, _| panic!("power cut"))
        }));
        assert!(cut.is_err());
        let staging = node.paths.entries_dir().join("gemin-b.conf.staging");
        fs::write(&staging, "").unwrap();
        assert_eq!(next_boot(&entries(&node.paths).unwrap()), Some(Slot::A), "only slot A can boot");

        let staged = stage(&bundle, &node.paths, &node.state, 1, |_, _| {}).unwrap();
        assert_eq!(files(&node.paths), ["gemin-a.conf", "gemin-b+1.conf"]);
        let new = entries(&node.paths).unwrap().into_iter().find(|e| e.slot == Slot::B).unwrap();
        assert_eq!(new.root_partlabel().unwrap(), "gemin-root-b", "{}", new.text);
        assert_eq!(staged.entry, new.file);
        assert!(!kept_entry(&node.state, Slot::B).exists(), "the kept copy goes once the entry is back");
        let root = fs::read(node.paths.partlabels.join("gemin-root-b")).unwrap();
        assert_eq!(&root[..200_000], &[7u8; 200_000][..]);
    }

    #[test]
    fn stage_refuses_a_damaged_bundle_a_small_partition_a_live_boot_and_the_running_partition_before_touching_anything()
    {
        let b = tempfile::tempdir().unwrap();
        let bundle = bundle(b.path(), "2", &[1u8; 100_000]);

        let small = node("a", 50_000);
        let err = format!("{:#}", stage(&bundle, &small.paths, &small.state, 1, |_, _| {}).unwrap_err());
        assert!(err.contains("100000 bytes") && err.contains("holds 50000"), "{err}");
        assert_eq!(files(&small.paths), ["gemin-a.conf", "gemin-b.conf"]);

        let live = node("live", 1 << 20);
        let err = format!("{:#}", stage(&bundle, &live.paths, &live.state, 1, |_, _| {}).unwrap_err());
        assert!(err.contains("live or PXE"), "{err}");

        let same = node("a", 1 << 20);
        let b_entry = same.paths.entries_dir().join("gemin-b.conf");
        fs::write(&b_entry, fs::read_to_string(&b_entry).unwrap().replace("gemin-root-b", "gemin-root-a")).unwrap();
        let err = format!("{:#}", stage(&bundle, &same.paths, &same.state, 1, |_, _| {}).unwrap_err());
        assert!(err.contains("both name the partition gemin-root-a"), "{err}");
        assert_eq!(files(&same.paths), ["gemin-a.conf", "gemin-b.conf"]);

        let trying = node("a", 1 << 20);
        let a_entry = trying.paths.entries_dir().join("gemin-a.conf");
        fs::rename(&a_entry, trying.paths.entries_dir().join("gemin-a+0-1.conf")).unwrap();
        let err = format!("{:#}", stage(&bundle, &trying.paths, &trying.state, 1, |_, _| {}).unwrap_err());
        assert!(err.contains("still on trial (gemin-a+0-1.conf)"), "{err}");

        let ok = node("b", 1 << 20);
        fs::write(b.path().join("vmlinuz"), b"another kernel").unwrap();
        let err = format!("{:#}", stage(&bundle, &ok.paths, &ok.state, 1, |_, _| {}).unwrap_err());
        assert!(err.contains("damaged"), "{err}");
        assert_eq!(files(&ok.paths), ["gemin-a.conf", "gemin-b.conf"]);
    }

    #[test]
    fn a_bad_new_slot_sorts_last_and_make_next_rolls_back_to_the_old_one() {
        let node = node("b", 1 << 20);
        let b = tempfile::tempdir().unwrap();
        let staged = stage(&bundle(b.path(), "2", &[3u8; 1000]), &node.paths, &node.state, 1, |_, _| {}).unwrap();
        assert_eq!(staged.slot, Slot::A);
        // Its one try used and not blessed: systemd-boot renamed it.
        let dir = node.paths.entries_dir();
        fs::rename(dir.join("gemin-a+1.conf"), dir.join("gemin-a+0-1.conf")).unwrap();
        assert_eq!(next_boot(&entries(&node.paths).unwrap()), Some(Slot::B), "the bad slot is passed over");
        // A manual rollback from a good new slot: the old slot comes first again.
        fs::rename(dir.join("gemin-a+0-1.conf"), dir.join("gemin-a.conf")).unwrap();
        assert_eq!(next_boot(&entries(&node.paths).unwrap()), Some(Slot::A));
        let entry = make_next(&node.paths, Slot::B).unwrap();
        assert_eq!(entry.version, 3);
        assert_eq!(next_boot(&entries(&node.paths).unwrap()), Some(Slot::B));
        assert_eq!(files(&node.paths), ["gemin-a.conf", "gemin-b.conf"]);
    }
}
