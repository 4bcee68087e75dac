//! What is laid on top of the base: artifacts, overlays, the default
//! cloud-config, users, and the immutable layout (persistent mount points).
//! Every function works on a root directory passed in.

mod units;
mod users;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::spec::{ArtifactSource, ArtifactSpec, CloudConfigSpec};
pub use units::{disable_units, enable_units, install_targets};
pub use users::add_users;

/// Directories the node writes to. At runtime each is bind-mounted from the
/// persistent partition; everything else is read-only.
pub const PERSISTENT_DIRS: &[&str] =
    &["/var/lib/postgresql", "/var/lib/rancher", "/etc/rancher", "/var/lib/geminik8s", "/var/log"];

/// Where the layout description for the boot side is written.
pub const LAYOUT_FILE: &str = "/usr/lib/geminik8s/layout.json";

/// `path` (absolute, inside the image) below `root`.
pub fn in_root(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn is_root_user() -> bool {
    nix::unistd::geteuid().is_root()
}

fn chown(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    if !is_root_user() {
        return Ok(());
    }
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .with_context(|| format!("changing the owner of {}", path.display()))
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))
}

/// Create the parents of `path` (mode 0755, root-owned) inside the image.
fn make_parents(path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

/// An artifact as placed in the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacedArtifact {
    pub name: String,
    pub dest: String,
    pub sha256: String,
    pub bytes: u64,
    pub mode: String,
    pub source: String,
}

/// The path inside the image an artifact goes to (a `dest` ending in `/`
/// takes the source's file name).
pub fn artifact_dest(artifact: &ArtifactSpec) -> String {
    if !artifact.dest.ends_with('/') {
        return artifact.dest.clone();
    }
    let file_name = match &artifact.source {
        ArtifactSource::Url { url, .. } => {
            url.split(['?', '#']).next().unwrap_or(url).rsplit('/').next().unwrap_or(&artifact.name).to_string()
        }
        ArtifactSource::Path { path, .. } => {
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| artifact.name.clone())
        }
    };
    let file_name = if file_name.is_empty() { artifact.name.clone() } else { file_name };
    format!("{}{file_name}", artifact.dest)
}

/// Copy a verified artifact file to its place, root-owned with its mode.
pub fn place_artifact(
    root: &Path,
    artifact: &ArtifactSpec,
    file: &Path,
    sha256: &str,
) -> anyhow::Result<PlacedArtifact> {
    let dest_in_image = artifact_dest(artifact);
    let dest = in_root(root, &dest_in_image);
    make_parents(&dest)?;
    if fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
        anyhow::bail!(
            "artifact {}: {} is a directory in the image; end `dest` with `/` to place it inside",
            artifact.name,
            dest_in_image
        );
    }
    if fs::symlink_metadata(&dest).is_ok() {
        fs::remove_file(&dest).with_context(|| format!("replacing {}", dest.display()))?;
    }
    let bytes = fs::copy(file, &dest)
        .with_context(|| format!("copying artifact {} from {} to {}", artifact.name, file.display(), dest.display()))?;
    chown(&dest, 0, 0)?;
    set_mode(&dest, artifact.mode)?;
    let source = match &artifact.source {
        ArtifactSource::Url { url, .. } => url.clone(),
        ArtifactSource::Path { path, .. } => path.display().to_string(),
    };
    Ok(PlacedArtifact {
        name: artifact.name.clone(),
        dest: dest_in_image,
        sha256: sha256.to_string(),
        bytes,
        mode: format!("{:04o}", artifact.mode),
        source,
    })
}

/// Lay the tree `overlay` over `root`: files and symlinks replace what is
/// there, directories merge; everything becomes root-owned, modes are kept.
/// Returns the number of files and links written.
pub fn apply_overlay(root: &Path, overlay: &Path) -> anyhow::Result<u64> {
    anyhow::ensure!(overlay.is_dir(), "overlay directory {} does not exist", overlay.display());
    copy_tree(overlay, root)
}

fn copy_tree(src: &Path, dst: &Path) -> anyhow::Result<u64> {
    let mut count = 0;
    let mut children = fs::read_dir(src)
        .with_context(|| format!("reading {}", src.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", src.display()))?;
    children.sort_by_key(|e| e.file_name());
    for child in children {
        if child.file_name() == ".gitkeep" {
            continue;
        }
        let from = child.path();
        let to = dst.join(child.file_name());
        let meta = fs::symlink_metadata(&from).with_context(|| format!("reading {}", from.display()))?;
        let existing = fs::symlink_metadata(&to).ok();
        if meta.is_dir() {
            match existing {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    fs::remove_file(&to).with_context(|| format!("replacing {}", to.display()))?;
                    fs::create_dir(&to).with_context(|| format!("creating {}", to.display()))?;
                    set_mode(&to, meta.permissions().mode() & 0o7777)?;
                }
                None => {
                    fs::create_dir(&to).with_context(|| format!("creating {}", to.display()))?;
                    set_mode(&to, meta.permissions().mode() & 0o7777)?;
                    chown(&to, 0, 0)?;
                }
            }
            count += copy_tree(&from, &to)?;
            continue;
        }
        if let Some(m) = existing {
            if m.is_dir() { fs::remove_dir_all(&to) } else { fs::remove_file(&to) }
                .with_context(|| format!("replacing {}", to.display()))?;
        }
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&from)?;
            symlink(&target, &to).with_context(|| format!("creating symlink {}", to.display()))?;
        } else {
            fs::copy(&from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
            set_mode(&to, meta.permissions().mode() & 0o7777)?;
        }
        chown(&to, 0, 0)?;
        count += 1;
    }
    Ok(count)
}

/// Validate the default cloud-config against the image root and install it.
/// Keys that must come per node (a missing `cluster.vip`, say) are reported
/// as notes, not errors: a default cannot know them. Any other problem fails
/// the build, positioned in the file.
pub fn install_cloud_config(root: &Path, spec: &CloudConfigSpec) -> anyhow::Result<Vec<String>> {
    use geminik8s::config::{CheckContext, Source, load_sources};
    let text = fs::read_to_string(&spec.path)
        .with_context(|| format!("reading the default cloud-config {}", spec.path.display()))?;
    let source = Source { name: spec.path.display().to_string(), text: text.clone() };
    let ctx = CheckContext { root: root.to_path_buf(), check_files: true };
    let mut notes = Vec::new();
    if let Err(diagnostics) = load_sources(&[source], &ctx) {
        let (per_node, real): (Vec<_>, Vec<_>) =
            diagnostics.0.into_iter().filter(|d| d.is_error()).partition(|d| d.message == "required key is missing");
        if !real.is_empty() {
            let text: Vec<String> = real.iter().map(|d| format!("  {d}")).collect();
            anyhow::bail!("the default cloud-config is invalid:\n{}", text.join("\n"));
        }
        notes.extend(per_node.iter().map(|d| format!("{} must be given per node", d.key)));
    }
    let dest = in_root(root, &spec.dest);
    make_parents(&dest)?;
    fs::write(&dest, text).with_context(|| format!("writing {}", dest.display()))?;
    set_mode(&dest, 0o600)?;
    chown(&dest, 0, 0)?;
    Ok(notes)
}

fn passwd_ids(root: &Path, user: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string(root.join("etc/passwd")).ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?))).flatten()
    })
}

/// Record the image's release in the tree, where the agent reads it
/// ([`geminik8s::upgrade::bundle::RELEASE_FILE`]).
pub fn write_release(root: &Path, release: &geminik8s::upgrade::bundle::Release) -> anyhow::Result<()> {
    let path = root.join(geminik8s::upgrade::bundle::RELEASE_FILE);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut text = serde_json::to_vec_pretty(release).expect("a release serialises");
    text.push(b'\n');
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// Prepare the tree for a read-only root: persistent mount points, files
/// that must not be baked in, and the layout description the boot side uses.
pub fn immutable_layout(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut notes = Vec::new();
    // Debian's postgresql package creates a `main` cluster; geminik8s
    // initialises its own data directory on the persistent partition.
    for dir in ["etc/postgresql", "var/lib/postgresql"] {
        let base = root.join(dir);
        if let Ok(versions) = fs::read_dir(&base) {
            for version in versions {
                let main = version?.path().join("main");
                if main.is_dir() {
                    fs::remove_dir_all(&main).with_context(|| format!("removing {}", main.display()))?;
                    notes.push(format!("removed the packaged cluster /{dir}/.../main"));
                }
            }
        }
    }
    for dir in PERSISTENT_DIRS {
        let path = in_root(root, dir);
        fs::create_dir_all(&path).with_context(|| format!("creating mount point {}", path.display()))?;
        let (uid, gid) = match *dir {
            "/var/lib/postgresql" => passwd_ids(root, "postgres").unwrap_or((0, 0)),
            _ => (0, 0),
        };
        chown(&path, uid, gid)?;
        set_mode(&path, if *dir == "/var/lib/geminik8s" { 0o700 } else { 0o755 })?;
    }
    // mmdebstrap copies the build host's name and resolver; a node gets its
    // own from cloud-config (`gemin_k8s config apply`) and DHCP.
    let hostname = root.join("etc/hostname");
    make_parents(&hostname)?;
    fs::write(&hostname, "geminik8s\n").with_context(|| format!("writing {}", hostname.display()))?;
    set_mode(&hostname, 0o644)?;
    let resolv = root.join("etc/resolv.conf");
    if fs::symlink_metadata(&resolv).is_ok_and(|m| m.is_file()) {
        fs::write(&resolv, "").with_context(|| format!("emptying {}", resolv.display()))?;
        set_mode(&resolv, 0o644)?;
    }
    // The EFI system partition is mounted here (see /etc/fstab) so
    // systemd-bless-boot can mark a boot good.
    let efi = root.join("efi");
    fs::create_dir_all(&efi).with_context(|| format!("creating {}", efi.display()))?;
    set_mode(&efi, 0o700)?;
    // An empty machine-id makes systemd mount a transient one on a read-only
    // root (and commit it once the ID lives on writable storage).
    let machine_id = root.join("etc/machine-id");
    make_parents(&machine_id)?;
    fs::write(&machine_id, b"").with_context(|| format!("writing {}", machine_id.display()))?;
    set_mode(&machine_id, 0o444)?;
    // Per-host keys must not be shared by every node flashed from the image
    // (they are random, so they would also make builds differ).
    for snakeoil in ["etc/ssl/certs/ssl-cert-snakeoil.pem", "etc/ssl/private/ssl-cert-snakeoil.key"] {
        let path = root.join(snakeoil);
        if fs::symlink_metadata(&path).is_ok() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    if let Ok(entries) = fs::read_dir(root.join("etc/ssh")) {
        for entry in entries {
            let path = entry?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with("ssh_host_") {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    let layout = json!({
        "schema": 1,
        "read_only_root": true,
        "persistent": PERSISTENT_DIRS.iter().map(|d| json!({"path": d, "seed_from_image": true})).collect::<Vec<_>>(),
        "etc": {"overlay": "tmpfs", "note": "/etc is an overlay with a tmpfs upper layer: writable at runtime, reset at boot; /etc/rancher is persistent"},
        "machine_id": "kept on the persistent partition, copied into /etc at boot",
        "boot_script": "/usr/share/initramfs-tools/scripts/gemin",
    });
    let path = in_root(root, LAYOUT_FILE);
    make_parents(&path)?;
    let mut text = serde_json::to_string_pretty(&layout).expect("layout serialises");
    text.push('\n');
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    set_mode(&path, 0o644)?;
    Ok(notes)
}
