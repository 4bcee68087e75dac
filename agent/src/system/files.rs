//! Files from `write_files:`: written atomically below the root, only when
//! contents, mode or owner differ, so a second run changes nothing.
//!
//! An entry with `append: true` adds its content unless the file already
//! ends with it: `/etc` is reset at every boot, so each boot appends once.
//! Owners are looked up in the root's `/etc/passwd` and `/etc/group` when
//! the file is written (after `users:` for `defer: true` entries).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::users::Accounts;
use super::{Change, Options};
use crate::cmd::Tool;
use crate::config::kairos::{WriteFile, file_path_problem};
use crate::fsutil::write_atomic;

/// Directories whose files systemd-networkd reads.
pub const NETWORKD_DIRS: &[&str] = &["/etc/systemd/network/", "/run/systemd/network/"];

/// A user or group given by name or number, resolved in the root's account files.
fn resolve(name: &str, what: &str, lookup: impl Fn(&str) -> Option<u32>, path: &str) -> anyhow::Result<Option<u32>> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(Some(id));
    }
    match lookup(name) {
        Some(id) => Ok(Some(id)),
        None => Err(anyhow::anyhow!(
            "owner of {path}: {what} `{name}` is not in the node's /etc/{}; \
             create it with `users:` and set `defer: true` on this file, or use an existing {what}",
            if what == "user" { "passwd" } else { "group" }
        )),
    }
}

/// Create the missing parent directories of `path` (0755, root-owned).
fn create_parents(path: &Path, node_path: &str, opts: &Options, changes: &mut Vec<Change>) -> anyhow::Result<()> {
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut dir = path.parent();
    while let Some(d) = dir {
        match std::fs::symlink_metadata(d) {
            Ok(m) if m.is_dir() || (m.file_type().is_symlink() && d.is_dir()) => break,
            Ok(_) => anyhow::bail!("{} exists and is not a directory; remove it to write {node_path}", d.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(d.to_path_buf()),
            Err(e) => return Err(e).with_context(|| format!("inspecting {}", d.display())),
        }
        dir = d.parent();
    }
    for d in missing.iter().rev() {
        let shown = Path::new("/").join(d.strip_prefix(&opts.root).unwrap_or(d));
        changes.push(Change::new("directory", shown.display().to_string(), "create, 0755 root:root"));
        if !opts.dry_run {
            std::fs::DirBuilder::new().mode(0o755).create(d).with_context(|| format!("creating {}", d.display()))?;
            // Not subject to the umask. Owned by whoever creates it: root,
            // for the setup unit.
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("setting the mode of {}", d.display()))?;
        }
    }
    Ok(())
}

fn chown(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    use nix::unistd::{Gid, Uid};
    nix::unistd::chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .with_context(|| format!("changing the owner of {} to {uid}:{gid}", path.display()))
}

/// The bytes `file` should hold given what it holds now (`None`: missing).
pub fn wanted_contents(file: &WriteFile, data: &[u8], current: Option<&[u8]>) -> Vec<u8> {
    match current {
        Some(now) if file.append && (data.is_empty() || now.ends_with(data)) => now.to_vec(),
        Some(now) if file.append => [now, data].concat(),
        _ => data.to_vec(),
    }
}

/// Write one file below the root.
pub fn apply(file: &WriteFile, opts: &Options) -> anyhow::Result<Vec<Change>> {
    let node_path = file.path.as_str();
    // Validation has checked all of these; they guard the writes all the same.
    if let Some(problem) = file_path_problem(node_path) {
        anyhow::bail!("{problem}");
    }
    let data = file.bytes().map_err(|e| anyhow::anyhow!("decoding the content of {node_path}: {e}"))?;
    let mode = file.mode().map_err(|e| anyhow::anyhow!("{node_path}: {e}"))?;
    let (user, group) = file.owner().map_err(|e| anyhow::anyhow!("{node_path}: {e}"))?;

    let target = opts.path(node_path);
    let mut changes = Vec::new();
    create_parents(&target, node_path, opts, &mut changes)?;

    let db = Accounts::read(opts)?;
    let uid = resolve(&user, "user", |n| db.user(n).map(|a| a.uid), node_path);
    let gid = resolve(&group, "group", |n| db.group(n).map(|g| g.gid), node_path);
    // A dry run may name an owner that `users:` would create first.
    let (uid, gid) = match (uid, gid) {
        (Ok(u), Ok(g)) => (u, g),
        (Err(e), _) | (_, Err(e)) if !opts.dry_run => return Err(e),
        _ => (None, None),
    };
    let owner = format!("{user}:{group}");

    let meta = match std::fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => anyhow::bail!("{} is a directory; remove it or choose another path", target.display()),
        Ok(m) if m.file_type().is_symlink() => None, // replaced by a file
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", target.display())),
    };
    let current = match &meta {
        Some(_) => Some(std::fs::read(&target).with_context(|| format!("reading {}", target.display()))?),
        None => None,
    };
    let contents = wanted_contents(file, &data, current.as_deref());
    let mode_text = format!("{mode:04o}");

    if current.as_deref() != Some(&contents[..]) {
        let what = match &current {
            Some(now) if file.append => format!("append {} bytes", contents.len() - now.len()),
            Some(_) => format!("replace, {} bytes", contents.len()),
            None => format!("create, {} bytes", contents.len()),
        };
        changes.push(Change::new("file", node_path, format!("{what}, {mode_text} {owner}")));
        if !opts.dry_run {
            write_atomic(&target, &contents, mode & 0o777)?;
            set_owner_and_mode(&target, uid, gid, mode)?;
        }
        return Ok(changes);
    }
    let meta = meta.expect("an existing file has metadata");
    let mut what = Vec::new();
    if meta.permissions().mode() & 0o7777 != mode {
        what.push(format!("mode {mode_text} (was {:04o})", meta.permissions().mode() & 0o7777));
    }
    let owner_differs = match (uid, gid) {
        (Some(u), Some(g)) => (meta.uid(), meta.gid()) != (u, g),
        _ => true,
    };
    if owner_differs {
        what.push(format!("owner {owner} (was {}:{})", meta.uid(), meta.gid()));
    }
    if !what.is_empty() {
        changes.push(Change::new("file", node_path, what.join(", ")));
        if !opts.dry_run {
            set_owner_and_mode(&target, uid, gid, mode)?;
        }
    }
    Ok(changes)
}

/// Owner first: chown clears set-user-ID and set-group-ID bits.
fn set_owner_and_mode(path: &Path, uid: Option<u32>, gid: Option<u32>, mode: u32) -> anyhow::Result<()> {
    if let (Some(uid), Some(gid)) = (uid, gid) {
        chown(path, uid, gid)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {} to {mode:04o}", path.display()))
}

/// Whether any change touched a file systemd-networkd reads.
pub fn touches_networkd(changes: &[Change]) -> bool {
    changes.iter().any(|c| c.kind == "file" && NETWORKD_DIRS.iter().any(|d| c.target.starts_with(d)))
}

/// After network files changed on the live system: `networkctl reload`,
/// when systemd-networkd is running. At boot the setup unit runs before
/// networkd, which then reads the files itself; asking networkctl then
/// would start networkd through D-Bus activation and wait on this unit.
pub async fn reload_networkd(opts: &Options) -> Option<Change> {
    if !opts.live() {
        return None;
    }
    let active = Tool::new("systemctl")
        .args(["is-active", "--quiet", "systemd-networkd.service"])
        .timeout(Duration::from_secs(10))
        .run()
        .await;
    if let Err(e) = active {
        tracing::info!(reason = %e, "systemd-networkd is not running; it reads the network files when it starts");
        return None;
    }
    let change = Change::new("networkd-reload", "systemd-networkd", "networkctl reload");
    if opts.dry_run {
        return Some(change);
    }
    match Tool::new("networkctl").arg("reload").timeout(Duration::from_secs(30)).run().await {
        Ok(_) => Some(change),
        Err(e) => {
            tracing::warn!(error = %e, "`networkctl reload` failed; the new network files apply at the next boot or `networkctl reload`");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(yaml_path: &str, content: &str) -> WriteFile {
        WriteFile { path: yaml_path.into(), content: Some(content.into()), ..WriteFile::default() }
    }

    #[test]
    fn appending_happens_once() {
        let f = WriteFile { append: true, ..entry("/etc/motd", "two\n") };
        assert_eq!(wanted_contents(&f, b"two\n", None), b"two\n");
        assert_eq!(wanted_contents(&f, b"two\n", Some(b"one\n")), b"one\ntwo\n");
        assert_eq!(wanted_contents(&f, b"two\n", Some(b"one\ntwo\n")), b"one\ntwo\n");
        let replace = entry("/etc/motd", "two\n");
        assert_eq!(wanted_contents(&replace, b"two\n", Some(b"one\n")), b"two\n");
    }

    #[test]
    fn network_paths_are_recognised() {
        let c = |t: &str| vec![Change::new("file", t, "")];
        assert!(touches_networkd(&c("/etc/systemd/network/10-lan.network")));
        assert!(!touches_networkd(&c("/etc/systemd/networkd.conf")));
        assert!(!touches_networkd(&[Change::new("directory", "/etc/systemd/network/x", "")]));
    }

    #[test]
    fn a_file_is_written_below_a_root_then_left_alone() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let f = WriteFile {
            permissions: Some("0600".into()),
            owner: Some(format!("{uid}:{gid}")),
            ..entry("/etc/a/b/c.conf", "x=1\n")
        };
        let opts = Options { root: root.path().to_path_buf(), dry_run: true };
        let planned = apply(&f, &opts).unwrap();
        assert_eq!(planned.iter().map(|c| c.kind).collect::<Vec<_>>(), ["directory", "directory", "file"]);
        assert!(!root.path().join("etc/a").exists(), "a dry run created a directory");
        let opts = Options { dry_run: false, ..opts };
        assert_eq!(apply(&f, &opts).unwrap(), planned);
        let path = root.path().join("etc/a/b/c.conf");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "x=1\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o600);
        assert_eq!(std::fs::metadata(root.path().join("etc/a")).unwrap().permissions().mode() & 0o7777, 0o755);
        assert_eq!(apply(&f, &opts).unwrap(), []);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let fixed = apply(&f, &opts).unwrap();
        assert_eq!(fixed.len(), 1, "{fixed:?}");
        assert!(fixed[0].detail.starts_with("mode 0600 (was 0644)"), "{fixed:?}");
    }
}
