//! The build manifest written beside the outputs: what is in the image and
//! what it was built from.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::base::BaseInfo;
use crate::output::OutputFile;
use crate::rootfs::PlacedArtifact;

pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildManifest {
    pub schema: u32,
    pub name: String,
    pub builder: String,
    /// sha256 over every input; equal keys mean an unchanged build.
    pub inputs_key: String,
    pub source_date_epoch: u64,
    pub spec: serde_json::Value,
    pub base: BaseInfo,
    pub packages: Vec<Package>,
    pub artifacts: Vec<PlacedArtifact>,
    pub rootfs: RootfsSize,
    pub outputs: Vec<OutputFile>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsSize {
    pub entries: u64,
    /// Bytes of file contents in the tree.
    pub content_bytes: u64,
}

/// Installed packages from a dpkg status file, sorted by name.
pub fn parse_dpkg_status(text: &str) -> Vec<Package> {
    let mut packages = Vec::new();
    for stanza in text.split("\n\n") {
        let mut name = None;
        let mut version = None;
        let mut arch = None;
        let mut installed = false;
        for line in stanza.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Architecture: ") {
                arch = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Status: ") {
                installed = v.trim().ends_with(" installed");
            }
        }
        if let (Some(name), Some(version), true) = (name, version, installed) {
            packages.push(Package {
                name: name.into(),
                version: version.into(),
                architecture: arch.unwrap_or_default().into(),
            });
        }
    }
    packages.sort_by(|a, b| a.name.cmp(&b.name).then(a.architecture.cmp(&b.architecture)));
    packages
}

/// Packages installed in the tree at `root` (none when it has no dpkg).
pub fn installed_packages(root: &Path) -> anyhow::Result<Vec<Package>> {
    let status = root.join("var/lib/dpkg/status");
    match std::fs::read_to_string(&status) {
        Ok(text) => Ok(parse_dpkg_status(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", status.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_lists_installed_packages_only() {
        let text = "Package: zlib1g\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1:1.2.13\n\n\
                    Package: removed\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                    Package: bash\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5.2.15-2+b7\nDescription: x\n y\n";
        let p = parse_dpkg_status(text);
        assert_eq!(p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["bash", "zlib1g"]);
        assert_eq!(p[0].version, "5.2.15-2+b7");
    }
}
