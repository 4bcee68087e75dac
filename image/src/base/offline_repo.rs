//! A flat apt repository over the apt cache directory, so a Debian base can
//! be built without a mirror from packages downloaded by an earlier build.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use anyhow::Context;
use geminik8s::cmd::Tool;

use crate::cache::sha256_file;

/// Where package priorities are kept in the apt cache.
const PRIORITIES: &str = "priorities";
/// `Package:` and `Priority:` lines of the mirror's index, written by a
/// build's customize hook.
pub const ARCHIVE_PRIORITIES: &str = "archive-priorities";

fn read_priorities(apt_cache: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let path = apt_cache.join(PRIORITIES);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(text.lines().filter_map(|l| l.split_once(' ')).map(|(n, p)| (n.to_string(), p.to_string())).collect())
}

/// Merge the archive priorities a build left in the apt cache into the
/// cache's `priorities` file, for the packages whose .deb is there.
pub fn record_priorities(apt_cache: &Path) -> anyhow::Result<()> {
    let status = apt_cache.join(ARCHIVE_PRIORITIES);
    let text = match fs::read_to_string(&status) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", status.display())),
    };
    let cached: std::collections::HashSet<String> = fs::read_dir(apt_cache)
        .with_context(|| format!("reading {}", apt_cache.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".deb"))
        .filter_map(|n| n.split('_').next().map(str::to_string))
        .collect();
    let mut priorities = read_priorities(apt_cache)?;
    let mut package = None;
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("Package:") {
            package = Some(p.trim());
        } else if let (Some(p), Some(priority)) = (package.take(), line.strip_prefix("Priority:"))
            && cached.contains(p)
        {
            priorities.insert(p.to_string(), priority.trim().to_string());
        }
    }
    let text: String = priorities.iter().map(|(n, p)| format!("{n} {p}\n")).collect();
    geminik8s::fsutil::write_atomic(&apt_cache.join(PRIORITIES), text.as_bytes(), 0o644)?;
    fs::remove_file(&status).with_context(|| format!("removing {}", status.display()))
}

/// Write `Packages` and `Release` in `repo` (with links to the `.deb` files
/// of `apt_cache`); returns how many packages it lists. The release carries
/// `suite` as suite and codename: mmdebstrap selects the essential and
/// required packages by it.
pub async fn write_flat_repo(apt_cache: &Path, repo: &Path, suite: &str) -> anyhow::Result<usize> {
    let mut debs: Vec<_> = fs::read_dir(apt_cache)
        .with_context(|| format!("reading the apt cache {}", apt_cache.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb") && p.is_file())
        .collect();
    debs.sort();
    let priorities = read_priorities(apt_cache)?;
    let mut index = String::new();
    for (i, deb) in debs.iter().enumerate() {
        let name = format!("{i:05}.deb");
        symlink(deb, repo.join(&name)).with_context(|| format!("linking {}", deb.display()))?;
        let control = Tool::new("dpkg-deb").arg("--field").arg(deb).run().await?.stdout;
        let size = fs::metadata(deb).with_context(|| format!("reading {}", deb.display()))?.len();
        let sha256 = sha256_file(deb).with_context(|| format!("reading {}", deb.display()))?;
        // The archive's priority wins over the one in the .deb.
        let package = control.lines().find_map(|l| l.strip_prefix("Package:")).unwrap_or_default().trim();
        let own = control.lines().find_map(|l| l.strip_prefix("Priority:"));
        let control: Vec<&str> = control.lines().filter(|l| !l.starts_with("Priority:")).collect();
        let priority = priorities.get(package).map(String::as_str).or(own).unwrap_or("optional");
        index.push_str(&control.join("\n"));
        index.push_str(&format!("\nPriority: {}", priority.trim()));
        index.push_str(&format!("\nFilename: ./{name}\nSize: {size}\nSHA256: {sha256}\n\n"));
    }
    let packages = repo.join("Packages");
    fs::write(&packages, &index).with_context(|| format!("writing {}", packages.display()))?;
    let arch = crate::spec::Platform::host().architecture;
    let release = format!(
        "Origin: gemin-image\nLabel: apt cache\nSuite: {suite}\nCodename: {suite}\nArchitectures: {arch} all\nSHA256:\n {} {} Packages\n",
        crate::cache::sha256_bytes(index.as_bytes()),
        index.len()
    );
    fs::write(repo.join("Release"), release).with_context(|| format!("writing {}/Release", repo.display()))?;
    Ok(debs.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_flat_repo_lists_cached_debs_with_their_priorities() {
        if geminik8s_vm_tests::skip::find_tool("dpkg-deb").is_none() {
            geminik8s_vm_tests::skip::skip(module_path!(), "missing tools: dpkg-deb");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("pkg");
        fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
        fs::write(
            pkg.join("DEBIAN/control"),
            "Package: tiny\nVersion: 1.0\nArchitecture: all\nPriority: optional\nMaintainer: t <t@t>\nDescription: tiny\n",
        )
        .unwrap();
        let cache = dir.path().join("apt");
        fs::create_dir(&cache).unwrap();
        let deb = cache.join("tiny_1.0_all.deb");
        Tool::new("dpkg-deb").arg("--build").arg(&pkg).arg(&deb).run().await.unwrap();
        // What the customize hook leaves behind after an online build.
        let lines = "Package: other\nPriority: optional\nPackage: tiny\nPriority: required\n";
        fs::write(cache.join(ARCHIVE_PRIORITIES), lines).unwrap();
        record_priorities(&cache).unwrap();
        assert!(!cache.join(ARCHIVE_PRIORITIES).exists());
        assert_eq!(fs::read_to_string(cache.join(PRIORITIES)).unwrap(), "tiny required\n");

        let repo = dir.path().join("repo");
        fs::create_dir(&repo).unwrap();
        assert_eq!(write_flat_repo(&cache, &repo, "bookworm").await.unwrap(), 1);
        let packages = fs::read_to_string(repo.join("Packages")).unwrap();
        assert!(packages.starts_with("Package: tiny\n"), "{packages}");
        assert!(packages.contains("\nPriority: required\nFilename: ./00000.deb\n"), "{packages}");
        assert!(packages.contains(&format!("SHA256: {}", sha256_file(&deb).unwrap())), "{packages}");
        assert_eq!(sha256_file(&repo.join("00000.deb")).unwrap(), sha256_file(&deb).unwrap());
        let release = fs::read_to_string(repo.join("Release")).unwrap();
        assert!(release.contains("Suite: bookworm\nCodename: bookworm\n"), "{release}");
    }
}
