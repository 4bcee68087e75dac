//! OCI images as a base: pulled from a registry, or read from an OCI layout
//! or a `docker save` archive; layers applied with whiteouts honoured.

pub mod layout;
pub mod registry;
pub mod unpack;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::Platform;

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{what}: no image for platform {platform}; the image offers: {offered}")]
    NoPlatform { what: String, platform: String, offered: String },
    #[error("{what}: digest mismatch: expected {expected}, got sha256:{actual}")]
    Digest { what: String, expected: String, actual: String },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error("{what}: unsupported media type {media_type}")]
    MediaType { what: String, media_type: String },
}

/// A content descriptor (OCI image spec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    /// The hex part of a `sha256:` digest.
    pub fn sha256(&self) -> Result<&str, OciError> {
        sha256_hex(&self.digest)
    }
}

pub fn sha256_hex(digest: &str) -> Result<&str, OciError> {
    digest.strip_prefix("sha256:").filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).ok_or_else(
        || OciError::Invalid { what: digest.to_string(), message: "only sha256 digests are supported".into() },
    )
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlatformJson {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// An image resolved to files on disk, ready to unpack.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// `sha256:...` of the manifest that was picked.
    pub manifest_digest: String,
    /// Layer blobs, lowest first.
    pub layers: Vec<PathBuf>,
}

/// Whether a JSON document (by media type or shape) is an index.
pub fn is_index(media_type: Option<&str>, body: &serde_json::Value) -> bool {
    match media_type {
        Some(MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST) => true,
        Some(MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST) => false,
        _ => body.get("manifests").is_some(),
    }
}

/// Pick the manifest for `platform` from an index.
pub fn select_platform<'a>(what: &str, index: &'a ImageIndex, platform: &Platform) -> Result<&'a Descriptor, OciError> {
    let matches = |p: &PlatformJson| {
        p.os == platform.os
            && p.architecture == platform.architecture
            && (platform.variant.is_none() || p.variant == platform.variant)
    };
    let candidates: Vec<&Descriptor> =
        index.manifests.iter().filter(|d| d.platform.as_ref().is_some_and(matches)).collect();
    if let Some(first) = candidates.first() {
        return Ok(first);
    }
    // A single-entry index without platform (common in OCI layouts) is taken as is.
    if let [only] = index.manifests.as_slice()
        && only.platform.is_none()
    {
        return Ok(only);
    }
    let offered: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect();
    Err(OciError::NoPlatform { what: what.into(), platform: platform.to_string(), offered: offered.join(", ") })
}

/// `registry/repository:tag` or `registry/repository@sha256:...`, Docker Hub
/// names (`debian:bookworm`) included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Host (and port) to talk to.
    pub registry: String,
    pub repository: String,
    /// A tag or a `sha256:` digest.
    pub reference: String,
}

impl Reference {
    pub fn parse(text: &str) -> Result<Reference, String> {
        let (rest, reference) = match text.split_once('@') {
            Some((rest, digest)) => {
                sha256_hex(digest).map_err(|e| e.to_string())?;
                (rest, digest.to_string())
            }
            None => {
                let slash = text.rfind('/').map_or(0, |i| i + 1);
                match text[slash..].rsplit_once(':') {
                    Some((name, tag)) => (&text[..slash + name.len()], tag.to_string()),
                    None => (text, "latest".to_string()),
                }
            }
        };
        let (first, remainder) = match rest.split_once('/') {
            Some((first, remainder)) => (first, Some(remainder)),
            None => (rest, None),
        };
        let is_host = first.contains('.') || first.contains(':') || first == "localhost";
        let (registry, repository) = match (is_host, remainder) {
            (true, Some(repo)) => (first.to_string(), repo.to_string()),
            (_, Some(_)) => ("registry-1.docker.io".to_string(), rest.to_string()),
            (_, None) => ("registry-1.docker.io".to_string(), format!("library/{rest}")),
        };
        let valid_repo = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch))
            });
        if !valid_repo {
            return Err(format!("`{text}` is not an image reference (repository `{repository}`)"));
        }
        if reference.is_empty() {
            return Err(format!("`{text}` has an empty tag"));
        }
        let registry = if registry == "docker.io" { "registry-1.docker.io".into() } else { registry };
        Ok(Reference { registry, repository, reference })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_like_docker() {
        let r = Reference::parse("debian:bookworm").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("registry-1.docker.io", "library/debian", "bookworm")
        );
        let r = Reference::parse("127.0.0.1:5000/geminik8s/base").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("127.0.0.1:5000", "geminik8s/base", "latest")
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("ghcr.io/x/y@{digest}")).unwrap();
        assert_eq!(r.reference, digest);
        assert!(Reference::parse("Upper/Case:1").is_err());
        assert!(Reference::parse("x@sha256:short").is_err());
    }

    #[test]
    fn platform_selection_names_what_is_offered() {
        let index: ImageIndex = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": format!("sha256:{}", "1".repeat(64)), "size": 1,
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": format!("sha256:{}", "2".repeat(64)), "size": 1,
                 "platform": {"os": "linux", "architecture": "amd64"}},
            ]
        }))
        .unwrap();
        let amd64 = Platform { os: "linux".into(), architecture: "amd64".into(), variant: None };
        assert!(select_platform("x", &index, &amd64).unwrap().digest.contains("2222"));
        let s390 = Platform { os: "linux".into(), architecture: "s390x".into(), variant: None };
        let err = select_platform("x", &index, &s390).unwrap_err().to_string();
        assert!(err.contains("linux/arm64/v8, linux/amd64"), "{err}");
    }
}
