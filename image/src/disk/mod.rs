//! Bootable outputs built from the assembled root filesystem, without root
//! and without loop devices: every filesystem is made in a file by its own
//! tool (`tar2sqfs`, `mkfs.fat` + `mcopy`, `mkfs.ext4 -d`) and the GPT disk
//! by `sfdisk` on a file.
//!
//! - raw: GPT with an EFI system partition (systemd-boot, one kernel and
//!   initramfs per slot), OEM (ext4, the image's `/oem`), root slots A and
//!   B (the same squashfs), persistent (ext4, grown to the disk at first boot);
//! - qcow2: the raw disk converted by `qemu-img`;
//! - iso: a hybrid (CD or USB) UEFI ISO booting the same squashfs live;
//! - pxe: kernel, initramfs, the squashfs wrapped as a second initrd, and an
//!   iPXE script.

pub mod cpio;
pub mod layout;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use geminik8s::cmd::Tool;
use geminik8s::upgrade::bundle::{self, Bundle, Release};

use crate::cache::sha256_file;
use crate::output::OutputFile;
use crate::progress::Progress;
use crate::spec::{Labels, OutputFormat, Sizes};
use layout::{Layout, MIB, Role, Slot};

/// Where the kernel, the initramfs and the boot loader are in the tree.
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub kernel_version: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub systemd_boot: PathBuf,
}

pub const SYSTEMD_BOOT: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// Find the one kernel, its initramfs and systemd-boot in `tree`.
pub fn boot_files(tree: &Path) -> anyhow::Result<BootFiles> {
    let boot = tree.join("boot");
    let mut versions: Vec<String> = fs::read_dir(&boot)
        .with_context(|| format!("reading {} (a bootable image needs a kernel)", boot.display()))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("vmlinuz-").map(str::to_string))
        .collect();
    versions.sort();
    let version = match versions.as_slice() {
        [one] => one.clone(),
        [] => anyhow::bail!(
            "no kernel in {}: add `linux-image-amd64` and `initramfs-tools` to the spec's packages",
            boot.display()
        ),
        many => anyhow::bail!("more than one kernel in {} ({}): keep one", boot.display(), many.join(", ")),
    };
    let initrd = boot.join(format!("initrd.img-{version}"));
    anyhow::ensure!(initrd.is_file(), "no initramfs {} for kernel {version}: add `initramfs-tools`", initrd.display());
    let systemd_boot = tree.join(SYSTEMD_BOOT);
    anyhow::ensure!(
        systemd_boot.is_file(),
        "no boot loader at /{SYSTEMD_BOOT}: add `systemd-boot` (boot loader and boot counting) to the spec's packages"
    );
    Ok(BootFiles { kernel: boot.join(format!("vmlinuz-{version}")), kernel_version: version, initrd, systemd_boot })
}

/// Rebuild the initramfs inside the tree, so it carries the geminik8s boot
/// script and hook that came in with the overlays. Runs `update-initramfs`
/// in a chroot (root only); reproducible through `SOURCE_DATE_EPOCH`.
/// Returns `false` when the tree has no geminik8s boot script.
pub async fn regenerate_initramfs(tree: &Path, epoch: u64) -> anyhow::Result<bool> {
    if !tree.join("usr/share/initramfs-tools/scripts/gemin").is_file() {
        return Ok(false);
    }
    let files = boot_files(tree)?;
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "rebuilding the initramfs of {} needs root (it runs update-initramfs in a chroot)",
        tree.display()
    );
    let proc = tree.join("proc");
    fs::create_dir_all(&proc).with_context(|| format!("creating {}", proc.display()))?;
    nix::mount::mount(Some("proc"), &proc, Some("proc"), nix::mount::MsFlags::empty(), None::<&str>)
        .with_context(|| format!("mounting proc on {}", proc.display()))?;
    let result = Tool::new("chroot")
        .arg(tree)
        .args(["update-initramfs", "-u", "-k", &files.kernel_version])
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .run()
        .await;
    let unmounted = nix::mount::umount2(&proc, nix::mount::MntFlags::MNT_DETACH);
    result.with_context(|| format!("rebuilding the initramfs in {}", tree.display()))?;
    unmounted.with_context(|| format!("unmounting {}", proc.display()))?;
    Ok(true)
}

/// What the disk builder needs from the build.
pub struct DiskJob<'a> {
    pub tree: &'a Path,
    pub rootfs_tar: &'a Path,
    pub out_dir: &'a Path,
    pub name: &'a str,
    pub epoch: u64,
    pub sizes: &'a Sizes,
    pub labels: &'a Labels,
    /// Seed for the disk and filesystem UUIDs (the build's inputs key).
    pub seed: &'a str,
    pub formats: Vec<OutputFormat>,
    /// The image's release, which the upgrade bundle's manifest records.
    pub release: &'a Release,
}

impl DiskJob<'_> {
    pub fn path(&self, format: OutputFormat) -> PathBuf {
        output_path(self.out_dir, self.name, format)
    }
}

/// The output path of a disk format.
pub fn output_path(out_dir: &Path, name: &str, format: OutputFormat) -> PathBuf {
    match format {
        OutputFormat::Raw => out_dir.join(format!("{name}.raw")),
        OutputFormat::Qcow2 => out_dir.join(format!("{name}.qcow2")),
        OutputFormat::Iso => out_dir.join(format!("{name}.iso")),
        OutputFormat::Pxe => out_dir.join(format!("{name}-pxe")),
        OutputFormat::Upgrade => out_dir.join(format!("{name}-upgrade")),
        OutputFormat::RootfsTar | OutputFormat::OciArchive => unreachable!("not a disk format"),
    }
}

/// Set the mtime of everything under `dir` (and `dir`) to `epoch`, so the
/// tools that copy it record the same times on every build.
fn clamp_mtimes(dir: &Path, epoch: u64) -> anyhow::Result<()> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(epoch as i64, 0);
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            clamp_mtimes(&path, epoch)?;
        } else {
            utimensat(nix::fcntl::AT_FDCWD, &path, &t, &t, UtimensatFlags::NoFollowSymlink)
                .with_context(|| format!("setting the time of {}", path.display()))?;
        }
    }
    utimensat(nix::fcntl::AT_FDCWD, dir, &t, &t, UtimensatFlags::NoFollowSymlink)
        .with_context(|| format!("setting the time of {}", dir.display()))?;
    Ok(())
}

fn copy_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn write_text(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { dir_bytes(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}

/// The root filesystem as a squashfs (zstd), from the reproducible tarball.
async fn squashfs(tar: &Path, out: &Path) -> anyhow::Result<()> {
    Tool::new("tar2sqfs")
        .args(["--quiet", "--force", "--no-skip", "--compressor", "zstd"])
        .arg("--num-jobs")
        .arg(std::thread::available_parallelism().map_or(1, usize::from).to_string())
        .arg(out)
        .stdin_file(tar)
        .run()
        .await
        .context("making the root squashfs (tar2sqfs comes from the Debian package squashfs-tools-ng)")?;
    Ok(())
}

/// A FAT filesystem image of `size` bytes holding `stage`.
async fn fat_image(stage: &Path, out: &Path, size: u64, label: &str, seed: &str, epoch: u64) -> anyhow::Result<()> {
    clamp_mtimes(stage, epoch)?;
    let _ = fs::remove_file(out);
    let volume_id = &layout::stable_uuid(seed, label).replace('-', "")[..8];
    Tool::new("mkfs.fat")
        .args(["-C", "--invariant", "-n", label, "-i", volume_id])
        .arg(out)
        .arg((size / 1024).to_string())
        .run()
        .await
        .context("making a FAT filesystem (mkfs.fat comes from the Debian package dosfstools)")?;
    let mut entries: Vec<PathBuf> = fs::read_dir(stage)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    entries.sort();
    Tool::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-m", "-Q", "-i"])
        .arg(out)
        .args(entries)
        .arg("::/")
        .run()
        .await
        .with_context(|| {
            format!(
                "copying {} into the FAT image (mcopy comes from mtools); the files need {} MiB of {} MiB",
                stage.display(),
                dir_bytes(stage).unwrap_or(0) / MIB,
                size / MIB
            )
        })?;
    Ok(())
}

/// An ext4 image of `size` bytes, holding `stage` when given.
async fn ext4_image(
    stage: Option<&Path>,
    out: &Path,
    size: u64,
    label: &str,
    seed: &str,
    epoch: u64,
) -> anyhow::Result<()> {
    let uuid = layout::stable_uuid(seed, label).to_lowercase();
    let _ = fs::remove_file(out);
    File::create(out).and_then(|f| f.set_len(size)).with_context(|| format!("creating {}", out.display()))?;
    let mut tool = Tool::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label, "-U", &uuid, "-E"])
        .arg(format!("hash_seed={uuid},root_owner=0:0,lazy_itable_init=1"))
        .args(["-m", "1"])
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string());
    if let Some(stage) = stage {
        clamp_mtimes(stage, epoch)?;
        tool = tool.arg("-d").arg(stage);
    }
    tool.arg(out).run().await.with_context(|| format!("making the ext4 filesystem {label}"))?;
    if let Some(stage) = stage {
        // `mkfs.ext4 -d` copies each file's ctime, which no one can set on
        // the staged copies: clamp it in the filesystem.
        let mut commands = String::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            for entry in fs::read_dir(stage.join(&rel))? {
                let entry = entry?;
                let child = rel.join(entry.file_name());
                commands.push_str(&format!("set_inode_field \"/{}\" ctime @{epoch}\n", child.display()));
                if entry.file_type()?.is_dir() {
                    stack.push(child);
                }
            }
        }
        Tool::new("debugfs")
            .args(["-w", "-f", "-"])
            .arg(out)
            .stdin(commands)
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
            .run()
            .await
            .with_context(|| format!("setting the times in the ext4 filesystem {label}"))?;
    }
    Ok(())
}

/// Copy `src` into `dst` at `offset`, leaving all-zero blocks as holes
/// (`dst` starts sparse). Fails when `src` is larger than `room`.
fn write_sparse(dst: &File, src: &Path, offset: u64, room: u64, what: &str) -> anyhow::Result<()> {
    let mut input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let len = input.metadata()?.len();
    anyhow::ensure!(
        len <= room,
        "{what} is {} MiB and does not fit its {} MiB partition: raise it under `sizes:` in the spec",
        len.div_ceil(MIB),
        room / MIB
    );
    let mut buf = vec![0u8; MIB as usize];
    let mut at = 0u64;
    loop {
        let n = input.read(&mut buf).with_context(|| format!("reading {}", src.display()))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            dst.write_all_at(&buf[..n], offset + at).context("writing the disk image")?;
        }
        at += n as u64;
    }
    Ok(())
}

/// The boot entries and files of the ESP of an installed disk.
fn stage_esp(stage: &Path, boot: &BootFiles, layout: &Layout) -> anyhow::Result<()> {
    copy_file(&boot.systemd_boot, &stage.join("EFI/BOOT/BOOTX64.EFI"))?;
    copy_file(&boot.systemd_boot, &stage.join("EFI/systemd/systemd-bootx64.efi"))?;
    write_text(&stage.join("loader/loader.conf"), layout::LOADER_CONF)?;
    for slot in Slot::BOTH {
        let dir = slot.esp_dir();
        copy_file(&boot.kernel, &stage.join(&dir).join("vmlinuz"))?;
        copy_file(&boot.initrd, &stage.join(&dir).join("initrd.img"))?;
        // Slot A boots first; B is the spare an upgrade writes and marks next.
        let version = if slot == Slot::A { 1 } else { 0 };
        let entry = layout::boot_entry(
            &format!("geminik8s (slot {})", slot.letter().to_uppercase()),
            version,
            &format!("/{dir}/vmlinuz"),
            &format!("/{dir}/initrd.img"),
            &layout.slot_cmdline(slot),
        );
        write_text(&stage.join(format!("loader/entries/{}.conf", slot.entry_id())), &entry)?;
    }
    Ok(())
}

async fn write_raw(job: &DiskJob<'_>, work: &Path, boot: &BootFiles, root: &Path, out: &Path) -> anyhow::Result<()> {
    let layout = Layout::new(job.sizes, job.labels, job.seed);
    let esp = work.join("esp.img");
    let stage = work.join("esp");
    stage_esp(&stage, boot, &layout)?;
    fat_image(&stage, &esp, layout.part(Role::Esp).size, layout::ESP_FS_LABEL, job.seed, job.epoch).await?;

    let oem_stage = work.join("oem");
    stage_oem(job.tree, &oem_stage)?;
    let oem = work.join("oem.img");
    ext4_image(Some(&oem_stage), &oem, layout.part(Role::Oem).size, layout::OEM_FS_LABEL, job.seed, job.epoch).await?;
    let persistent = work.join("persistent.img");
    let p = layout.part(Role::Persistent);
    ext4_image(None, &persistent, p.size, layout::PERSISTENT_FS_LABEL, job.seed, job.epoch).await?;

    let tmp = work.join("disk.raw");
    let _ = fs::remove_file(&tmp);
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.set_len(layout.size)?;
    Tool::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&tmp)
        .stdin(layout.sfdisk_script())
        .run()
        .await
        .context("writing the partition table (sfdisk comes from the Debian package fdisk)")?;
    for (image, role, what) in [(&esp, Role::Esp, "the ESP"), (&oem, Role::Oem, "OEM")] {
        write_sparse(&file, image, layout.part(role).start, layout.part(role).size, what)?;
    }
    for slot in Slot::BOTH {
        let part = layout.slot(slot);
        write_sparse(&file, root, part.start, part.size, "the root filesystem (squashfs)")?;
    }
    write_sparse(&file, &persistent, p.start, p.size, "the persistent filesystem")?;
    file.sync_all()?;
    fs::rename(&tmp, out).with_context(|| format!("moving the disk image to {}", out.display()))?;
    Ok(())
}

async fn write_qcow2(raw: &Path, out: &Path) -> anyhow::Result<()> {
    let tmp = out.with_extension("qcow2.partial");
    Tool::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(&tmp)
        .run()
        .await
        .context("converting to qcow2 (qemu-img comes from the Debian package qemu-utils)")?;
    fs::rename(&tmp, out).with_context(|| format!("moving {} into place", out.display()))?;
    Ok(())
}

/// The FAT image El Torito boots on the ISO: systemd-boot, one live entry.
fn stage_live_esp(stage: &Path, boot: &BootFiles) -> anyhow::Result<()> {
    copy_file(&boot.systemd_boot, &stage.join("EFI/BOOT/BOOTX64.EFI"))?;
    write_text(&stage.join("loader/loader.conf"), layout::LOADER_CONF)?;
    copy_file(&boot.kernel, &stage.join("gemin/live/vmlinuz"))?;
    copy_file(&boot.initrd, &stage.join("gemin/live/initrd.img"))?;
    let entry = layout::boot_entry(
        "geminik8s (live)",
        1,
        "/gemin/live/vmlinuz",
        "/gemin/live/initrd.img",
        &layout::live_cmdline(),
    );
    write_text(&stage.join("loader/entries/gemin-live.conf"), &entry)
}

async fn write_iso(job: &DiskJob<'_>, work: &Path, boot: &BootFiles, root: &Path, out: &Path) -> anyhow::Result<()> {
    let iso = work.join("iso");
    let esp_stage = work.join("live-esp");
    stage_live_esp(&esp_stage, boot)?;
    let esp_size = (dir_bytes(&esp_stage)? * 11 / 10 + 4 * MIB).div_ceil(MIB) * MIB;
    let efiboot = iso.join("boot/efiboot.img");
    fs::create_dir_all(iso.join("boot"))?;
    fat_image(&esp_stage, &efiboot, esp_size, layout::ESP_FS_LABEL, job.seed, job.epoch).await?;
    let dest = iso.join(layout::LIVE_ROOT.trim_start_matches('/'));
    fs::create_dir_all(dest.parent().expect("has a parent"))?;
    fs::hard_link(root, &dest).or_else(|_| fs::copy(root, &dest).map(|_| ()))?;
    stage_install(job, &iso.join(INSTALL_DIR.trim_start_matches('/')), boot)?;
    clamp_mtimes(&iso, job.epoch)?;
    let tmp = out.with_extension("iso.partial");
    Tool::new("xorriso")
        .env("SOURCE_DATE_EPOCH", job.epoch.to_string())
        .args(["-as", "mkisofs", "-quiet", "-iso-level", "3", "-r", "-J", "-joliet-long"])
        .args(["-V", layout::LIVE_LABEL, "--set_all_file_dates", "set_to_mtime"])
        .args(["-e", "boot/efiboot.img", "-no-emul-boot", "-isohybrid-gpt-basdat", "-o"])
        .arg(&tmp)
        .arg(&iso)
        .run()
        .await
        .context("making the ISO (xorriso comes from the Debian package of that name)")?;
    fs::rename(&tmp, out).with_context(|| format!("moving {} into place", out.display()))?;
    Ok(())
}

/// Where the live ISO keeps what `/usr/lib/geminik8s/install` writes to a
/// disk (with the root image at [`layout::LIVE_ROOT`]).
pub const INSTALL_DIR: &str = "/gemin/install";

/// The installer's inputs on the ISO: the GPT (persistent partition filling
/// the disk), the ESP's files (slot B's kernel and initramfs left out: the
/// installer copies slot A's) and the OEM partition's files.
fn stage_install(job: &DiskJob<'_>, dir: &Path, boot: &BootFiles) -> anyhow::Result<()> {
    let layout = Layout::new(job.sizes, job.labels, job.seed);
    write_text(&dir.join("layout.sfdisk"), &layout.sfdisk_install_script())?;
    write_text(&dir.join("labels.env"), &layout.labels_env())?;
    let esp = dir.join("esp");
    stage_esp(&esp, boot, &layout)?;
    let b = esp.join(Slot::B.esp_dir());
    fs::remove_dir_all(&b).with_context(|| format!("removing {}", b.display()))?;
    stage_oem(job.tree, &dir.join("oem"))
}

/// The OEM partition's files: the image's `/oem`.
fn stage_oem(tree: &Path, stage: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(stage).with_context(|| format!("creating {}", stage.display()))?;
    let tree_oem = tree.join("oem");
    if tree_oem.is_dir() {
        for entry in fs::read_dir(&tree_oem)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                copy_file(&entry.path(), &stage.join(entry.file_name()))?;
            }
        }
    }
    Ok(())
}

/// The iPXE script of the PXE bundle. `${gemin_args}` lets a chaining
/// script add parameters (`geminik8s.config_url=...`).
pub fn ipxe_script() -> String {
    format!(
        "#!ipxe\n\
         # geminik8s PXE boot: the files next to this script, over TFTP or HTTP.\n\
         # Set gemin_args in a chaining script for per-node parameters.\n\
         kernel vmlinuz initrd=initrd.img initrd=root.cpio {} ${{gemin_args}}\n\
         initrd initrd.img\n\
         initrd root.cpio\n\
         boot\n",
        layout::pxe_cmdline()
    )
}

const PXE_README: &str = "\
geminik8s PXE bundle
====================

vmlinuz      the kernel
initrd.img   the initramfs (with the geminik8s boot script)
root.cpio    the read-only root filesystem (squashfs) as a second initrd
boot.ipxe    the iPXE script that boots the three

Serve this directory over TFTP or HTTP and point the DHCP boot file at
boot.ipxe (iPXE firmware or a chained ipxe.efi / undionly.kpxe). HTTP is much
faster for root.cpio than TFTP. The node keeps its root in RAM (give it at
least 1 GiB more than the root image) and its state in RAM too, unless
gemin.persistent=PARTLABEL=gemin-persistent names a disk partition.

Per-node cloud-config: set gemin_args before chaining boot.ipxe, e.g.

  #!ipxe
  set gemin_args geminik8s.config_url=http://10.0.0.1/node1.yaml
  chain boot.ipxe
";

fn write_pxe(job: &DiskJob<'_>, boot: &BootFiles, root: &Path, out: &Path) -> anyhow::Result<Vec<OutputFile>> {
    let tmp = out.with_extension("partial");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    copy_file(&boot.kernel, &tmp.join("vmlinuz"))?;
    copy_file(&boot.initrd, &tmp.join("initrd.img"))?;
    cpio::write_single_file(&tmp.join("root.cpio"), layout::LIVE_ROOT, root, job.epoch)?;
    write_text(&tmp.join("boot.ipxe"), &ipxe_script())?;
    write_text(&tmp.join("README.txt"), PXE_README)?;
    clamp_mtimes(&tmp, job.epoch)?;
    let _ = fs::remove_dir_all(out);
    fs::rename(&tmp, out).with_context(|| format!("moving {} into place", out.display()))?;
    let mut files = Vec::new();
    for name in ["vmlinuz", "initrd.img", "root.cpio", "boot.ipxe", "README.txt"] {
        files.push(output_file("pxe", &out.join(name))?);
    }
    Ok(files)
}

/// The upgrade bundle: the kernel, the initramfs and the root squashfs a
/// node writes into its passive slot, sealed by a manifest with their
/// digests and the image's release.
fn write_upgrade(job: &DiskJob<'_>, boot: &BootFiles, root: &Path, out: &Path) -> anyhow::Result<Vec<OutputFile>> {
    let tmp = out.with_extension("partial");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    copy_file(&boot.kernel, &tmp.join(bundle::KERNEL))?;
    copy_file(&boot.initrd, &tmp.join(bundle::INITRD))?;
    copy_file(root, &tmp.join(bundle::ROOT))?;
    Bundle::seal(&tmp, job.release)?;
    clamp_mtimes(&tmp, job.epoch)?;
    let _ = fs::remove_dir_all(out);
    fs::rename(&tmp, out).with_context(|| format!("moving {} into place", out.display()))?;
    let mut files = Vec::new();
    for name in [bundle::MANIFEST].iter().chain(bundle::FILES.iter()) {
        files.push(output_file("upgrade", &out.join(name))?);
    }
    Ok(files)
}

fn output_file(format: &str, path: &Path) -> anyhow::Result<OutputFile> {
    let sha256 = sha256_file(path)?;
    let bytes = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    Ok(OutputFile { format: format.into(), path: path.to_path_buf(), sha256, bytes })
}

/// Build the disk formats of `job`, in `work` (emptied first, removed after).
pub async fn write(job: &DiskJob<'_>, work: &Path, progress: &Progress) -> anyhow::Result<Vec<OutputFile>> {
    let boot = boot_files(job.tree)?;
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let result = async {
        let step = progress.step("root squashfs");
        let root = work.join("root.squashfs");
        squashfs(job.rootfs_tar, &root).await?;
        step.done(format!("({} MiB)", fs::metadata(&root)?.len().div_ceil(MIB)));

        let mut outputs = Vec::new();
        let wants = |f| job.formats.contains(&f);
        if wants(OutputFormat::Raw) || wants(OutputFormat::Qcow2) {
            let step = progress.step("raw disk (GPT, A/B slots)");
            let raw = job.path(OutputFormat::Raw);
            write_raw(job, work, &boot, &root, &raw).await?;
            step.done(format!("({} MiB)", fs::metadata(&raw)?.len() / MIB));
            if wants(OutputFormat::Qcow2) {
                let step = progress.step("qcow2");
                let qcow2 = job.path(OutputFormat::Qcow2);
                write_qcow2(&raw, &qcow2).await?;
                outputs.push(output_file("qcow2", &qcow2)?);
                step.done("");
            }
            if wants(OutputFormat::Raw) {
                outputs.insert(0, output_file("raw", &raw)?);
            } else {
                fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()))?;
            }
        }
        if wants(OutputFormat::Iso) {
            let step = progress.step("ISO (UEFI, hybrid)");
            let iso = job.path(OutputFormat::Iso);
            write_iso(job, work, &boot, &root, &iso).await?;
            outputs.push(output_file("iso", &iso)?);
            step.done("");
        }
        if wants(OutputFormat::Pxe) {
            let step = progress.step("PXE bundle");
            outputs.extend(write_pxe(job, &boot, &root, &job.path(OutputFormat::Pxe))?);
            step.done("");
        }
        if wants(OutputFormat::Upgrade) {
            let step = progress.step("upgrade bundle");
            outputs.extend(write_upgrade(job, &boot, &root, &job.path(OutputFormat::Upgrade))?);
            step.done(format!("(version {})", job.release.version));
        }
        anyhow::Ok(outputs)
    }
    .await;
    if let Err(e) = fs::remove_dir_all(work) {
        tracing::warn!(path = %work.display(), error = %e, "could not remove the disk work directory");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipxe_script_boots_kernel_with_both_initrds() {
        let s = ipxe_script();
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("initrd initrd.img\ninitrd root.cpio\nboot\n"));
        assert!(s.contains("gemin.root=ram:/gemin/root.squashfs"));
    }

    #[test]
    fn write_sparse_keeps_holes_and_refuses_what_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut data = vec![0u8; 3 * MIB as usize];
        data[MIB as usize * 2 + 5] = 7;
        fs::write(&src, &data).unwrap();
        let dst_path = dir.path().join("dst");
        let dst = File::create(&dst_path).unwrap();
        dst.set_len(8 * MIB).unwrap();
        write_sparse(&dst, &src, MIB, 4 * MIB, "src").unwrap();
        let out = fs::read(&dst_path).unwrap();
        assert_eq!(out[MIB as usize * 3 + 5], 7);
        assert_eq!(out.iter().filter(|b| **b != 0).count(), 1);
        let err = write_sparse(&dst, &src, 0, 2 * MIB, "the root").unwrap_err().to_string();
        assert!(err.contains("does not fit") && err.contains("sizes:"), "{err}");
    }
}
