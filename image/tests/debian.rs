//! Building the default image's Debian rootfs (`image/specs/default.yaml`)
//! with mmdebstrap (root only), with the locally built kine and gemin_k8s, and
//! the K3s stand-in in place of the K3s download, as artifacts, the
//! repository's overlays and default cloud-config. Checks the tree, the
//! manifest, that a rebuild from the cached base gives a byte-identical
//! tarball, and that an offline build (a second mmdebstrap run, from the apt
//! cache without a mirror) gives the same tarball but for the mirror it
//! names.
//!
//! The mirror is the one apt on the build host uses (override with
//! `GEMIN_IMAGE_TEST_MIRROR`); downloaded packages are kept in
//! `$TMPDIR/gemin-image-test-apt` between runs. The base goes into the
//! cache of the tests' bootable image (`target/image-boot/cache`), whose
//! build in vm-tests then starts from it.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use gemin_image::build::{BuildOptions, build};
use gemin_image::cache::{Cache, sha256_bytes, sha256_file};
use gemin_image::progress::{Mode, Progress};
use gemin_image::spec::OutputFormat;
use geminik8s_vm_tests::image::{
    agent_binary, default_image_dir, default_spec, host_mirror, image_cache_dir, k3s_artifact, test_apt_cache,
    workspace,
};
use geminik8s_vm_tests::{require, skip};

fn files_below(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n != ".gitkeep") {
                out.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    out
}

/// Each entry of a tarball, in order: its path, and its header fields with
/// a digest of its content.
fn tar_entries(path: &Path) -> Vec<(String, String)> {
    let file = fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().trim_start_matches("./").to_string();
        let h = entry.header();
        let fields = format!(
            "{:?} mode {:o} owner {}:{} mtime {} size {} link {:?}",
            h.entry_type(),
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            h.mtime().unwrap(),
            h.size().unwrap(),
            entry.link_name().unwrap()
        );
        let mut content = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
        out.push((name, format!("{fields} sha256 {}", sha256_bytes(&content))));
    }
    out
}

/// Removes a build's outputs once compared: each is close to 3 GB (a rootfs,
/// its tarball and its OCI archive), and test machines' disks are not large.
fn discard(out_dir: &Path) {
    fs::remove_dir_all(out_dir).unwrap_or_else(|e| panic!("removing {}: {e}", out_dir.display()));
}

#[tokio::test]
async fn a_debian_rootfs_is_assembled_and_reproducible() {
    require!(root: true, tools: ["mmdebstrap", "kine"]);
    let Some(agent) = agent_binary() else {
        skip::skip(module_path!(), "no gemin_k8s binary in target/; build it with `cargo build -p geminik8s-agent`");
        return;
    };
    let kine = skip::find_tool("kine").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A snapshot: target/ may be rebuilt while this test runs, and both
    // builds below must see the same artifact.
    let snapshot = d.join("gemin_k8s");
    fs::copy(&agent, &snapshot).unwrap();
    let agent = snapshot;
    let k3s = k3s_artifact(d).unwrap();
    let apt = test_apt_cache();
    let mirror = host_mirror();
    let mut spec = default_spec(&mirror, &kine, &agent, &k3s, &apt).unwrap();
    // The root filesystem is what this test is about; the bootable formats
    // are built and booted by vm-tests/tests/image_boot.rs.
    spec.outputs = vec![OutputFormat::RootfsTar, OutputFormat::OciArchive];
    // The bootable image's cache: its build (image_boot, the QEMU lab) then
    // finds the base this one makes. `refresh_base` keeps this build cold.
    let cache = Cache::new(image_cache_dir(&default_image_dir())).unwrap();
    let progress = Progress::new(Mode::Plain);
    let opts = BuildOptions {
        spec,
        target: d.join("out1/rootfs"),
        out_dir: d.join("out1"),
        source_date_epoch: 1_735_689_600,
        replace_target: true,
        refresh_base: true,
        force: false,
        tag: None,
    };

    let started = Instant::now();
    let first = build(&opts, &cache, &progress).await.unwrap_or_else(|e| panic!("{e:#}"));
    let cold = started.elapsed();

    // Rebuild from the cached base into another directory: same bytes.
    let started = Instant::now();
    let opts = BuildOptions { refresh_base: false, ..opts };
    let second_opts = BuildOptions { target: d.join("out2/rootfs"), out_dir: d.join("out2"), ..opts.clone() };
    let second = build(&second_opts, &cache, &progress).await.unwrap_or_else(|e| panic!("{e:#}"));
    let warm = started.elapsed();
    assert!(second.base.cached, "the second build reuses the cached base");
    assert_eq!(second.outputs[0].sha256, first.outputs[0].sha256, "rootfs tarballs are byte-identical");
    assert_eq!(second.outputs[1].sha256, first.outputs[1].sha256, "OCI archives are byte-identical");
    discard(&second_opts.out_dir);

    // Nothing changed: the third build is skipped.
    let started = Instant::now();
    build(&opts, &cache, &progress).await.unwrap();
    let unchanged = started.elapsed();
    eprintln!(
        "timings: cold {cold:.1?}, warm (cached base) {warm:.1?}, unchanged {unchanged:.1?}; rootfs {} bytes in {} entries, tarball {} bytes, {} packages",
        first.rootfs.content_bytes,
        first.rootfs.entries,
        first.outputs[0].bytes,
        first.packages.len()
    );

    let root = &opts.target;
    assert_eq!(sha256_file(&root.join("usr/local/bin/kine")).unwrap(), sha256_file(&kine).unwrap());
    assert_eq!(sha256_file(&root.join("usr/bin/gemin_k8s")).unwrap(), sha256_file(&agent).unwrap());
    assert_eq!(sha256_file(&root.join("usr/local/bin/k3s")).unwrap(), sha256_file(&k3s).unwrap());
    let overlays = workspace().join("overlays");
    for file in files_below(&overlays) {
        let (ours, theirs) = (overlays.join(&file), root.join(&file));
        if ours.is_symlink() {
            // An enablement link: the image may hold it as an absolute link
            // (as `systemctl enable` writes it), which only resolves inside the image.
            let name = |p: &Path| fs::read_link(p).ok().and_then(|t| t.file_name().map(|n| n.to_os_string()));
            assert!(theirs.is_symlink(), "overlay link {} is in the image", file.display());
            assert_eq!(name(&theirs), name(&ours), "overlay link {} points at the same unit", file.display());
            continue;
        }
        assert_eq!(
            fs::read(&theirs).unwrap_or_default(),
            fs::read(&ours).unwrap(),
            "overlay file {} is in the image",
            file.display()
        );
    }
    assert!(root.join("oem/00_geminik8s-default.yaml").is_file());
    for dir in gemin_image::rootfs::PERSISTENT_DIRS {
        assert!(root.join(dir.trim_start_matches('/')).is_dir(), "mount point {dir}");
    }
    assert!(root.join("usr/bin/ip").exists() || root.join("bin/ip").exists());
    assert!(root.join("sbin/init").exists(), "systemd-sysv provides /sbin/init");
    assert!(root.join("usr/lib/postgresql/15/bin/postgres").is_file(), "PostgreSQL 15 is in the image");
    let boot: Vec<String> = fs::read_dir(root.join("boot"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(boot.iter().any(|f| f.starts_with("vmlinuz-")), "a kernel in /boot: {boot:?}");
    assert!(boot.iter().any(|f| f.starts_with("initrd.img-")), "an initramfs in /boot: {boot:?}");
    let man = root.join("usr/share/man");
    // Excluded paths hold no files (update-alternatives may still leave links there).
    let man_files: Vec<PathBuf> = if man.exists() { files_below(&man) } else { Vec::new() };
    let real: Vec<&PathBuf> =
        man_files.iter().filter(|f| fs::symlink_metadata(man.join(f)).is_ok_and(|m| m.is_file())).collect();
    assert!(real.is_empty(), "excluded paths are not installed: {real:?}");
    let iproute2 = first.packages.iter().find(|p| p.name == "iproute2").expect("iproute2 in the manifest");
    assert!(!iproute2.version.is_empty());
    assert!(first.artifacts.iter().any(|a| a.dest == "/usr/bin/gemin_k8s"));

    // Offline and without a mirror (an address nothing listens on): the apt
    // cache filled by the first build stands in for it.
    let no_mirror = "http://127.0.0.1:9/debian";
    let mut offline_spec = default_spec(no_mirror, &kine, &agent, &k3s, &apt).unwrap();
    offline_spec.outputs = vec![OutputFormat::RootfsTar, OutputFormat::OciArchive];
    let offline_cache = Cache::new(d.join("cache-offline")).unwrap().offline(true);
    let offline_opts =
        BuildOptions { spec: offline_spec, target: d.join("out3/rootfs"), out_dir: d.join("out3"), ..opts.clone() };
    let started = Instant::now();
    let offline = build(&offline_opts, &offline_cache, &progress).await.unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("offline build from the apt cache: {:.1?}", started.elapsed());
    assert!(!offline.base.cached);
    assert_eq!(offline.packages, first.packages, "the same packages and versions without a mirror");
    // A second mmdebstrap run gives the same tree, entry for entry, but for
    // the mirror the image names.
    let (ours, theirs) = (tar_entries(&first.outputs[0].path), tar_entries(&offline.outputs[0].path));
    let names = |entries: &[(String, String)]| entries.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&theirs), names(&ours), "the same entries in the same order");
    let differing: Vec<&str> =
        ours.iter().zip(&theirs).filter(|(a, b)| a.1 != b.1).map(|(a, _)| a.0.as_str()).collect();
    assert_eq!(differing, ["etc/apt/sources.list"], "two cold builds differ only in the mirror named");
    let sources = fs::read_to_string(offline_opts.target.join("etc/apt/sources.list")).unwrap();
    assert_eq!(sources.trim(), format!("deb {no_mirror} bookworm main"), "the image names the mirror, not the cache");
    discard(&offline_opts.out_dir);

    // The agent binary runs against the image's own libraries.
    let out = geminik8s::cmd::Tool::new("chroot").arg(root).arg("/usr/bin/gemin_k8s").arg("--help").run().await;
    assert!(out.is_ok(), "gemin_k8s does not run inside the image: {}", out.unwrap_err());
}
