//! The outputs of a build: the rootfs tarball and an OCI image archive made
//! from it. Both are reproducible.

pub mod tarball;

use std::fs;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cache::sha256_bytes;
use crate::oci::{Descriptor, ImageIndex, ImageManifest, MEDIA_OCI_CONFIG, MEDIA_OCI_LAYER_TAR, MEDIA_OCI_MANIFEST};
use crate::spec::Platform;
pub use tarball::{HashingWriter, TarStats, write_tree};

/// One written output file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    pub format: String,
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
}

fn temp_beside(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Write `root` as a reproducible tarball at `path` (atomically: a
/// temporary file renamed into place).
pub fn write_rootfs_tar(root: &Path, epoch: u64, path: &Path) -> anyhow::Result<(OutputFile, TarStats)> {
    let tmp = temp_beside(path);
    let result = (|| {
        let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let writer = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        let (writer, stats) = write_tree(root, epoch, writer)
            .with_context(|| format!("archiving {} into {}", root.display(), tmp.display()))?;
        let (buffered, sha256, bytes) = writer.finish();
        let file = buffered.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok((OutputFile { format: "rootfs-tar".into(), path: path.to_path_buf(), sha256, bytes }, stats))
    })();
    if result.is_err()
        && let Err(e) = fs::remove_file(&tmp)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %tmp.display(), error = %e, "could not remove a partial output");
    }
    result
}

/// RFC 3339 UTC time of a Unix timestamp.
pub fn rfc3339(epoch: u64) -> String {
    // Days to civil date (Howard Hinnant's algorithm).
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// The documents of a one-layer OCI image whose layer is `layer`.
pub struct OciDocs {
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    pub index: Vec<u8>,
}

pub fn oci_docs(layer: &OutputFile, platform: &Platform, epoch: u64, tag: &str, labels: &serde_json::Value) -> OciDocs {
    let created = rfc3339(epoch);
    let config = json!({
        "created": created,
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/sbin/init"],
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", layer.sha256)]},
        "history": [{"created": created, "created_by": "gemin-image build"}],
    });
    let config = serde_json::to_vec(&config).expect("config serialises");
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MEDIA_OCI_MANIFEST.into()),
        config: Descriptor {
            media_type: MEDIA_OCI_CONFIG.into(),
            digest: format!("sha256:{}", sha256_bytes(&config)),
            size: config.len() as u64,
            platform: None,
            annotations: None,
        },
        layers: vec![Descriptor {
            media_type: MEDIA_OCI_LAYER_TAR.into(),
            digest: format!("sha256:{}", layer.sha256),
            size: layer.bytes,
            platform: None,
            annotations: None,
        }],
    };
    let manifest = serde_json::to_vec(&manifest).expect("manifest serialises");
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(crate::oci::MEDIA_OCI_INDEX.into()),
        manifests: vec![Descriptor {
            media_type: MEDIA_OCI_MANIFEST.into(),
            digest: format!("sha256:{}", sha256_bytes(&manifest)),
            size: manifest.len() as u64,
            platform: Some(crate::oci::PlatformJson {
                architecture: platform.architecture.clone(),
                os: platform.os.clone(),
                variant: platform.variant.clone(),
            }),
            annotations: Some([("org.opencontainers.image.ref.name".to_string(), tag.to_string())].into()),
        }],
    };
    let index = serde_json::to_vec(&index).expect("index serialises");
    OciDocs { config, manifest, index }
}

/// Write an OCI image archive (a tar of an OCI image layout) at `path` whose
/// single layer is the rootfs tarball `layer`.
pub fn write_oci_archive(
    layer: &OutputFile,
    platform: &Platform,
    epoch: u64,
    tag: &str,
    labels: &serde_json::Value,
    path: &Path,
) -> anyhow::Result<OutputFile> {
    let docs = oci_docs(layer, platform, epoch, tag, labels);
    let tmp = temp_beside(path);
    let result = (|| {
        let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut builder = tar::Builder::new(HashingWriter::new(BufWriter::with_capacity(1 << 20, file)));
        let mut add = |name: &str, size: u64, data: &mut dyn io::Read, dir: bool| -> io::Result<()> {
            let mut header = tar::Header::new_gnu();
            header.set_mode(if dir { 0o755 } else { 0o644 });
            header.set_mtime(epoch);
            header.set_size(size);
            header.set_entry_type(if dir { tar::EntryType::Directory } else { tar::EntryType::Regular });
            builder.append_data(&mut header, name, data)
        };
        let blob = |bytes: &[u8]| format!("blobs/sha256/{}", sha256_bytes(bytes));
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
        add("blobs", 0, &mut io::empty(), true)?;
        add("blobs/sha256", 0, &mut io::empty(), true)?;
        let mut blobs: Vec<(String, Option<&[u8]>)> = vec![
            (blob(&docs.config), Some(&docs.config)),
            (blob(&docs.manifest), Some(&docs.manifest)),
            (format!("blobs/sha256/{}", layer.sha256), None),
        ];
        blobs.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, bytes) in blobs {
            match bytes {
                Some(bytes) => add(&name, bytes.len() as u64, &mut &bytes[..], false)?,
                None => {
                    let mut file = fs::File::open(&layer.path)
                        .with_context(|| format!("opening the layer {}", layer.path.display()))?;
                    add(&name, layer.bytes, &mut file, false)?;
                }
            }
        }
        add("index.json", docs.index.len() as u64, &mut &docs.index[..], false)?;
        add("oci-layout", layout.len() as u64, &mut &layout[..], false)?;
        let (buffered, sha256, bytes) = builder.into_inner()?.finish();
        let file = buffered.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(OutputFile { format: "oci-archive".into(), path: path.to_path_buf(), sha256, bytes })
    })();
    if result.is_err()
        && let Err(e) = fs::remove_file(&tmp)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %tmp.display(), error = %e, "could not remove a partial output");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
