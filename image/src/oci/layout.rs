//! Images on disk: an OCI image layout (directory or tar) or a `docker save`
//! archive.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use super::*;
use crate::cache::sha256_file;
use crate::spec::Platform;

/// A `docker save` manifest.json entry.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Make an archive readable as a directory: a directory is used in place, a
/// tar file is extracted into `scratch`.
pub fn open_archive(path: &Path, scratch: &Path) -> anyhow::Result<PathBuf> {
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let file = fs::File::open(path).with_context(|| format!("opening image archive {}", path.display()))?;
    let mut archive = tar::Archive::new(file);
    archive.unpack(scratch).with_context(|| format!("extracting image archive {}", path.display()))?;
    Ok(scratch.to_path_buf())
}

fn verify(what: &str, file: &Path, digest: &str) -> anyhow::Result<()> {
    let expected = sha256_hex(digest)?;
    let actual = sha256_file(file).with_context(|| format!("reading {}", file.display()))?;
    if actual != expected {
        return Err(OciError::Digest { what: what.into(), expected: digest.into(), actual }.into());
    }
    Ok(())
}

fn blob(dir: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("blobs/sha256").join(sha256_hex(digest)?);
    anyhow::ensure!(path.is_file(), "blob {digest} is missing from {}", dir.display());
    Ok(path)
}

/// Resolve the image in an extracted archive to its layer files (digests
/// verified), for `platform`.
pub fn resolve(dir: &Path, platform: &Platform) -> anyhow::Result<ResolvedImage> {
    let index_path = dir.join("index.json");
    if index_path.is_file() {
        let what = index_path.display().to_string();
        let text = fs::read(&index_path).with_context(|| format!("reading {what}"))?;
        let mut index: ImageIndex = serde_json::from_slice(&text).with_context(|| format!("parsing {what}"))?;
        // Follow nested indexes (multi-platform images) down to a manifest.
        for _ in 0..4 {
            let desc = select_platform(&what, &index, platform)?.clone();
            let path = blob(dir, &desc.digest)?;
            verify(&desc.digest, &path, &desc.digest)?;
            let body: serde_json::Value =
                serde_json::from_slice(&fs::read(&path)?).with_context(|| format!("parsing {}", desc.digest))?;
            if is_index(Some(&desc.media_type), &body) {
                index = serde_json::from_value(body).with_context(|| format!("parsing index {}", desc.digest))?;
                continue;
            }
            let manifest: ImageManifest =
                serde_json::from_value(body).with_context(|| format!("parsing manifest {}", desc.digest))?;
            let mut layers = Vec::new();
            for layer in &manifest.layers {
                let path = blob(dir, &layer.digest)?;
                verify(&format!("layer {}", layer.digest), &path, &layer.digest)?;
                layers.push(path);
            }
            return Ok(ResolvedImage { manifest_digest: desc.digest, layers });
        }
        anyhow::bail!("{what}: indexes nested too deeply");
    }
    let manifest_path = dir.join("manifest.json");
    if manifest_path.is_file() {
        let what = manifest_path.display().to_string();
        let entries: Vec<DockerSaveEntry> =
            serde_json::from_slice(&fs::read(&manifest_path)?).with_context(|| format!("parsing {what}"))?;
        let entry = match entries.as_slice() {
            [one] => one,
            [] => anyhow::bail!("{what} lists no image"),
            many => anyhow::bail!(
                "{what} holds {} images ({}); save one image per archive",
                many.len(),
                many.iter().flat_map(|e| e.repo_tags.clone().unwrap_or_default()).collect::<Vec<_>>().join(", ")
            ),
        };
        let layers = entry
            .layers
            .iter()
            .map(|l| {
                let path = dir.join(l);
                anyhow::ensure!(path.is_file() && !l.contains(".."), "layer {l} is missing from {}", dir.display());
                Ok(path)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let digest = format!("sha256:{}", sha256_file(&manifest_path)?);
        return Ok(ResolvedImage { manifest_digest: digest, layers });
    }
    anyhow::bail!(
        "{} is neither an OCI image layout (index.json) nor a `docker save` archive (manifest.json)",
        dir.display()
    )
}
