//! The bootable formats built from a small tarball base (a stand-in kernel,
//! initramfs and boot loader: the disk builder only places them): the GPT
//! layout, the ESP's boot entries, both root slots holding the squashfs of
//! the tree, the ISO and PXE bundle carrying the same squashfs, byte-identical
//! rebuilds, and a root that does not fit its slot. No root, no QEMU (the
//! boots are in vm-tests/tests/image_boot.rs).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use gemin_image::build::{BuildOptions, build};
use gemin_image::cache::{Cache, sha256_file};
use gemin_image::disk::layout::{self, Layout, Role, Slot};
use gemin_image::output::write_rootfs_tar;
use gemin_image::progress::Progress;
use gemin_image::spec::ImageSpec;
use geminik8s::upgrade::bundle::{self, Bundle, Release};
use geminik8s_vm_tests::skip;

const TOOLS: &[&str] =
    &["tar2sqfs", "rdsquashfs", "mkfs.fat", "mcopy", "mkfs.ext4", "sfdisk", "xorriso", "qemu-img", "cpio"];
const KERNEL: &str = "6.1.0-test-amd64";

fn base_tarball(dir: &Path) -> PathBuf {
    let base = dir.join("base");
    for d in ["boot", "usr/lib/systemd/boot/efi", "etc", "usr/bin"] {
        fs::create_dir_all(base.join(d)).unwrap();
    }
    fs::write(base.join(format!("boot/vmlinuz-{KERNEL}")), "a kernel").unwrap();
    fs::write(base.join(format!("boot/initrd.img-{KERNEL}")), "an initramfs").unwrap();
    fs::write(base.join(gemin_image::disk::SYSTEMD_BOOT), "a boot loader").unwrap();
    fs::write(base.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(base.join("etc/group"), "root:x:0:\n").unwrap();
    fs::write(base.join("usr/bin/hello"), "#!/bin/sh\necho hello\n").unwrap();
    let tar = dir.join("base.tar");
    write_rootfs_tar(&base, 1, &tar).unwrap();
    tar
}

fn spec(dir: &Path, root_size: &str) -> ImageSpec {
    fs::write(dir.join("cc.yaml"), "#cloud-config\ngeminik8s:\n  health:\n    interval: 1s\n").unwrap();
    let text = format!(
        "name: t\nversion: 2.0.0\nbase:\n  tarball:\n    path: {}\ncloud_config: cc.yaml\n\
         outputs: [rootfs-tar, raw, qcow2, iso, pxe, upgrade]\n\
         sizes: {{esp: 32M, oem: 8M, root: {root_size}, persistent: 64M}}\n\
         labels: {{esp: site-esp, root_b: site-root-b}}\n",
        base_tarball(dir).display()
    );
    let path = dir.join("spec.yaml");
    fs::write(&path, text).unwrap();
    ImageSpec::load(&path).unwrap()
}

fn options(spec: ImageSpec, out: PathBuf) -> BuildOptions {
    BuildOptions {
        spec,
        target: out.join("rootfs"),
        out_dir: out,
        source_date_epoch: 1_700_000_000,
        replace_target: true,
        refresh_base: false,
        force: false,
        tag: None,
    }
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(&fs::File::open(path).unwrap(), &mut buf, offset).unwrap();
    buf
}

#[tokio::test]
async fn disk_iso_and_pxe_carry_the_same_root_and_rebuild_byte_identical() {
    if let Some(reason) = skip::requires(false, TOOLS) {
        skip::skip(module_path!(), &reason);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = spec(d, "16M");

    let cache = Cache::new(d.join("cache")).unwrap();
    let opts = options(spec.clone(), d.join("out1"));
    let first = build(&opts, &cache, &Progress::quiet()).await.unwrap_or_else(|e| panic!("{e:#}"));
    let formats: Vec<&str> = first.outputs.iter().map(|o| o.format.as_str()).collect();
    let mut expected = vec!["rootfs-tar", "raw", "qcow2", "iso"];
    expected.extend(["pxe"; 5]);
    expected.extend(["upgrade"; 4]);
    assert_eq!(formats, expected);
    let out = &opts.out_dir;
    let raw = out.join("t.raw");

    // The GPT as the layout says, read back by sfdisk.
    let built = Layout::new(&spec.sizes, &spec.labels, &first.inputs_key);
    let names: Vec<&str> = built.partitions.iter().map(|p| p.label.as_str()).collect();
    assert_eq!(
        names,
        ["site-esp", "gemin-oem", "gemin-root-a", "site-root-b", "gemin-persistent"],
        "labels from the spec"
    );
    let table: serde_json::Value =
        serde_json::from_slice(&run(Command::new("sfdisk").arg("--json").arg(&raw))).unwrap();
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 5);
    for (p, want) in parts.iter().zip(&built.partitions) {
        assert_eq!(p["name"], want.label.as_str());
        assert_eq!(p["start"].as_u64().unwrap() * 512, want.start);
        assert_eq!(p["size"].as_u64().unwrap() * 512, want.size);
        assert_eq!(p["type"].as_str().unwrap(), want.type_guid);
    }
    assert_eq!(fs::metadata(&raw).unwrap().len(), built.size);

    // The ESP: the loader, a kernel and initramfs per slot, slot A first.
    let esp = format!("{}@@{}", raw.display(), built.part(Role::Esp).start);
    let mtype = |path: &str| {
        String::from_utf8(run(Command::new("mtype").env("MTOOLS_SKIP_CHECK", "1").args(["-i", &esp, path]))).unwrap()
    };
    assert_eq!(mtype("::/EFI/BOOT/BOOTX64.EFI"), "a boot loader");
    for slot in Slot::BOTH {
        assert_eq!(mtype(&format!("::/gemin/{}/vmlinuz", slot.letter())), "a kernel");
        assert_eq!(mtype(&format!("::/gemin/{}/initrd.img", slot.letter())), "an initramfs");
        let entry = mtype(&format!("::/loader/entries/{}.conf", slot.entry_id()));
        assert!(entry.contains(&format!("options {}\n", built.slot_cmdline(slot))), "{entry}");
        let version = if slot == Slot::A { "version 1\n" } else { "version 0\n" };
        assert!(entry.contains(version), "slot A sorts first: {entry}");
    }
    assert!(mtype("::/loader/loader.conf").contains("editor no"));
    let b_entry = mtype("::/loader/entries/gemin-b.conf");
    assert!(
        b_entry.contains("gemin.root=PARTLABEL=site-root-b ") && b_entry.contains("gemin.esp=PARTLABEL=site-esp"),
        "{b_entry}"
    );

    // Both slots hold the same squashfs of the tree.
    let slot_a = built.slot(Slot::A);
    let slot_b = built.slot(Slot::B);
    assert_eq!(&read_at(&raw, slot_a.start, 4), b"hsqs", "squashfs magic in slot A");
    let sqfs = d.join("slot-a.sqfs");
    fs::write(&sqfs, read_at(&raw, slot_a.start, slot_a.size as usize)).unwrap();
    assert_eq!(read_at(&raw, slot_a.start, slot_a.size as usize), read_at(&raw, slot_b.start, slot_b.size as usize));
    let listing = String::from_utf8(run(Command::new("rdsquashfs").args(["-l", "/usr/bin"]).arg(&sqfs))).unwrap();
    assert!(listing.contains("hello"), "{listing}");
    let hello = run(Command::new("rdsquashfs").args(["-c", "/usr/bin/hello"]).arg(&sqfs));
    assert_eq!(hello, b"#!/bin/sh\necho hello\n");

    // The PXE root initrd unpacks to the same squashfs (up to its length).
    let unpacked = d.join("cpio");
    fs::create_dir(&unpacked).unwrap();
    run(Command::new("cpio")
        .args(["-i", "-d", "--quiet", "-F"])
        .arg(out.join("t-pxe/root.cpio"))
        .current_dir(&unpacked));
    let from_pxe = fs::read(unpacked.join("gemin/root.squashfs")).unwrap();
    assert_eq!(&read_at(&raw, slot_a.start, from_pxe.len()), &from_pxe);
    let ipxe = fs::read_to_string(out.join("t-pxe/boot.ipxe")).unwrap();
    assert!(ipxe.contains("initrd root.cpio"), "{ipxe}");

    // The ISO: volume GEMIN_LIVE with the same root image and the installer's inputs.
    let iso = out.join("t.iso");
    let info = String::from_utf8(run(Command::new("xorriso").args(["-indev"]).arg(&iso).args(["-pvd_info"])))
        .unwrap_or_default();
    assert!(info.contains("GEMIN_LIVE"), "{info}");
    let from_iso = |path: &str| {
        let out = d.join(path.rsplit('/').next().unwrap());
        run(Command::new("xorriso").args(["-osirrox", "on", "-indev"]).arg(&iso).args(["-extract", path]).arg(&out));
        fs::read(out).unwrap()
    };
    assert_eq!(from_iso(layout::LIVE_ROOT), from_pxe);
    let script = String::from_utf8(from_iso("/gemin/install/layout.sfdisk")).unwrap();
    assert_eq!(script, built.sfdisk_install_script());
    let labels = String::from_utf8(from_iso("/gemin/install/labels.env")).unwrap();
    assert!(labels.contains("ESP=site-esp\n"), "the installer uses the spec's labels: {labels}");

    // The upgrade bundle: the same kernel, initramfs and root, pinned by
    // the manifest, with the release the image records in itself.
    let upgrade = Bundle::open(&out.join("t-upgrade")).unwrap();
    upgrade.verify().unwrap();
    let release = upgrade.release().clone();
    assert_eq!((release.name.as_str(), release.version.as_str()), ("t", "2.0.0"));
    assert_eq!(release.components.postgresql_major, 0, "the test tree has no PostgreSQL");
    assert_eq!(release.components.agent, "none", "nor an agent artifact");
    assert_eq!(fs::read(upgrade.path(bundle::ROOT)).unwrap(), from_pxe);
    assert_eq!(mtype("::/gemin/a/vmlinuz").as_bytes(), fs::read(upgrade.path(bundle::KERNEL)).unwrap());
    let recorded = run(Command::new("rdsquashfs").args(["-c", "/usr/lib/geminik8s/image.json"]).arg(&sqfs));
    assert_eq!(serde_json::from_slice::<Release>(&recorded).unwrap(), release, "the image records its release");

    // Rebuilt from scratch into another directory: the same bytes.
    let second_opts = options(spec, d.join("out2"));
    let second = build(&second_opts, &cache, &Progress::quiet()).await.unwrap();
    for (a, b) in first.outputs.iter().zip(&second.outputs) {
        assert_eq!(a.sha256, b.sha256, "{} differs between two builds", a.path.display());
        assert_eq!(sha256_file(&b.path).unwrap(), b.sha256);
    }
}

#[tokio::test]
async fn a_root_larger_than_its_slot_is_refused_naming_the_setting() {
    if let Some(reason) = skip::requires(false, TOOLS) {
        skip::skip(module_path!(), &reason);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Incompressible content larger than a 1 MiB slot.
    let spec = spec(d, "1M");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let big: Vec<u8> = (0..3_000_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let overlay = d.join("overlay");
    fs::create_dir_all(overlay.join("usr/share")).unwrap();
    fs::write(overlay.join("usr/share/big"), big).unwrap();
    let mut spec = spec;
    spec.overlays = vec![overlay];
    let cache = Cache::new(d.join("cache")).unwrap();
    let err = build(&options(spec, d.join("out")), &cache, &Progress::quiet()).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("does not fit its 1 MiB partition") && text.contains("sizes:"), "{text}");
}
