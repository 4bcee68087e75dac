//! The node bundle: the cloud-config of the node a backup was taken on,
//! made self-contained (its TLS files inlined), stored next to the base
//! backup as one more object, compressed and encrypted like it.
//!
//! It is what a restore on new hardware needs besides the data: the
//! cluster's name, addresses and VIP, the K3s token (K3s keeps its
//! certificates in the datastore, encrypted with it), the passwords of the
//! replication and Kine roles, the agents' API token, and the node's
//! certificate and key with the cluster CA. `restore --node-config FILE`
//! writes it back.

use std::io::{Read, Write};

use serde_json::json;

use super::crypto::{Identities, Keys};
use super::manifest::{Compression, Manifest, Object};
use super::store::Store;
use super::stream::{ObjectSink, ObjectSource};
use super::{BackupError, Result};
use crate::config::{CheckContext, GeminiConfig, Source, Tls};

/// The bundle's object name, before its suffixes.
pub const NODE_OBJECT: &str = "node.yaml";

/// The manifest's `content` of the bundle.
pub const CONTENT: &str = "cloud-config";

/// The bundle of `cfg`: a cloud-config with the node's `hostname` and its
/// `geminik8s:` block, the TLS files it names read in as PEM text.
pub fn render(cfg: &GeminiConfig) -> std::result::Result<String, String> {
    let mut cfg = cfg.clone();
    let Tls { ca, cert, key, crl } = &mut cfg.tls;
    for (field, value) in
        [("tls.ca", ca), ("tls.cert", cert), ("tls.key", key)].into_iter().chain(crl.as_mut().map(|c| ("tls.crl", c)))
    {
        *value = Tls::resolve(value).map_err(|e| format!("reading {field} ({value}): {e}"))?;
    }
    let block = serde_json::to_value(&cfg).map_err(|e| format!("serialising the cloud-config: {e}"))?;
    let document = json!({ "hostname": cfg.node.name, "geminik8s": block });
    Ok(format!(
        "{}\n# geminik8s node `{}` of cluster `{}`, from a backup. Holds this node's private key and the\n\
         # cluster's secrets: keep it private. Reference: docs/cloud-config.md.\n{}",
        crate::config::load::HEADER,
        cfg.node.name,
        cfg.cluster.name,
        crate::config::yaml::to_yaml(&document)
    ))
}

/// Read `text` (the bundle of backup `id`) as a cloud-config.
pub fn parse(text: &str, id: &str) -> std::result::Result<GeminiConfig, String> {
    let ctx = CheckContext { root: "/".into(), check_files: false };
    let source = Source { name: format!("the node bundle of backup {id}"), text: text.to_string() };
    crate::config::load_sources(&[source], &ctx).map(|l| l.gemini).map_err(|d| d.to_string())
}

/// Store `text` as the bundle of backup `id`; returns its manifest entry.
pub fn store(store: &dyn Store, id: &str, text: &str, compression: Compression, keys: &Keys) -> Result<Object> {
    let name = format!("{NODE_OBJECT}{}{}", compression.suffix(), keys.describe().kind.suffix());
    let mut sink = ObjectSink::new(store.put_object(id, &name)?, &name, compression, keys)?;
    let wrote = format!("writing object {name} of backup {id}");
    sink.write_all(text.as_bytes()).map_err(super::io(wrote.clone(), &name))?;
    let (object, written) = sink.finish().map_err(super::io(wrote, &name))?;
    object.commit()?;
    Ok(Object {
        name,
        size: written.size,
        sha256: written.sha256,
        content: CONTENT.into(),
        content_size: written.content_size,
        content_sha256: written.content_sha256,
    })
}

/// The bundle of backup `m`, decrypted and checked against the manifest;
/// `None` when the backup has none (taken without a cloud-config).
pub fn read(store: &dyn Store, m: &Manifest, identities: &Identities) -> Result<Option<String>> {
    let Some(o) = m.objects.iter().find(|o| o.content == CONTENT) else { return Ok(None) };
    let corrupt = |detail: String| BackupError::Corrupt { id: m.id.clone(), object: o.name.clone(), detail };
    let mut source =
        ObjectSource::new(store.get_object(&m.id, &o.name)?, m.compression, &m.encryption, identities, &m.id, &o.name)?;
    let mut text = String::new();
    source.read_to_string(&mut text).map_err(|e| corrupt(format!("reading it: {e}")))?;
    super::verify::check_read(o, &source.finish()).map_err(corrupt)?;
    parse(&text, &m.id).map_err(|e| corrupt(format!("it is not a usable cloud-config: {e}")))?;
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundle_inlines_the_tls_files_and_reads_back_as_the_same_config() {
        let tmp = tempfile::tempdir().unwrap();
        let pem = |what: &str| format!("-----BEGIN {what}-----\nMIIB\n-----END {what}-----\n");
        let secret = "0123456789abcdef-secret";
        let cfg = crate::config::fixture::config(serde_json::json!({
            "api": {"token": secret},
            "postgres": {"replication_password": secret, "kine_password": secret},
            "k3s": {"token": "k3s-token-0123456789abcdef"},
            "tls": {"ca": pem("CERTIFICATE"), "cert": pem("CERTIFICATE"), "key": pem("PRIVATE KEY")},
        }));
        let mut with_files = cfg.clone();
        let Tls { ca, cert, key, .. } = &mut with_files.tls;
        for (name, value) in [("ca.crt", ca), ("node.crt", cert), ("node.key", key)] {
            let path = tmp.path().join(name);
            std::fs::write(&path, value.as_bytes()).unwrap();
            *value = path.display().to_string();
        }
        let bundle = render(&with_files).unwrap();
        assert!(!bundle.contains(&tmp.path().display().to_string()), "no file names left:\n{bundle}");
        assert_eq!(parse(&bundle, "x").unwrap(), cfg);

        with_files.tls.cert = tmp.path().join("gone.crt").display().to_string();
        let err = render(&with_files).unwrap_err();
        assert!(err.contains("tls.cert") && err.contains("gone.crt"), "{err}");
    }
}
