//! An OCI base pulled from a registry on 127.0.0.1 (Debian's
//! `docker-registry`) gives the same tree as the same image read from an OCI
//! layout on disk. The test pushes a two-layer image (the whiteout fixture
//! layers) under a multi-platform index with the distribution push API.
//! Also: a `docker save` archive and an OCI layout give the same tree, a
//! tampered layer is refused, and bearer-token auth against a fake registry.

mod common;
use common::describe;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use gemin_image::base;
use gemin_image::cache::{Cache, sha256_bytes};
use gemin_image::oci::{MEDIA_OCI_CONFIG, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST};
use gemin_image::progress::Progress;
use gemin_image::spec::ImageSpec;
use geminik8s_vm_tests::{poll, require};
use serde_json::json;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/layers").join(name)
}

struct Blob {
    media_type: &'static str,
    bytes: Vec<u8>,
}

impl Blob {
    fn digest(&self) -> String {
        format!("sha256:{}", sha256_bytes(&self.bytes))
    }
    fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest(), "size": self.bytes.len()})
    }
}

/// The image: config, two layers, a manifest, and an index that also lists a
/// manifest for another platform (which must not be picked).
struct Image {
    layers: Vec<Blob>,
    config: Blob,
    manifest: Blob,
    other_manifest: Blob,
    index: Blob,
}

fn image() -> Image {
    let layers = vec![
        Blob { media_type: "application/vnd.oci.image.layer.v1.tar", bytes: fs::read(fixture("layer1.tar")).unwrap() },
        Blob {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            bytes: fs::read(fixture("layer2.tar.gz")).unwrap(),
        },
    ];
    let arch = gemin_image::spec::Platform::host().architecture;
    let config = Blob {
        media_type: MEDIA_OCI_CONFIG,
        bytes: serde_json::to_vec(
            &json!({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}),
        )
        .unwrap(),
    };
    let manifest = Blob {
        media_type: MEDIA_OCI_MANIFEST,
        bytes: serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        }))
        .unwrap(),
    };
    // A manifest for another platform whose only layer is just layer 1.
    let other_manifest = Blob {
        media_type: MEDIA_OCI_MANIFEST,
        bytes: serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
            "config": config.descriptor(), "layers": [layers[0].descriptor()],
        }))
        .unwrap(),
    };
    let mut other = other_manifest.descriptor();
    other["platform"] = json!({"os": "linux", "architecture": "s390x"});
    let mut mine = manifest.descriptor();
    mine["platform"] = json!({"os": "linux", "architecture": arch});
    let index = Blob {
        media_type: MEDIA_OCI_INDEX,
        bytes: serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": [other, mine]}),
        )
        .unwrap(),
    };
    Image { layers, config, manifest, other_manifest, index }
}

/// The same image as an OCI layout directory.
fn write_layout(dir: &Path, image: &Image) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    for blob in image.layers.iter().chain([&image.config, &image.manifest, &image.other_manifest, &image.index]) {
        fs::write(blobs.join(blob.digest().trim_start_matches("sha256:")), &blob.bytes).unwrap();
    }
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let top = json!({"schemaVersion": 2, "manifests": [image.index.descriptor()]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
}

async fn push_blob(client: &reqwest::Client, base: &str, repo: &str, blob: &Blob) {
    let start = client.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().await.unwrap();
    assert_eq!(start.status(), 202, "starting an upload");
    let location = start.headers()["location"].to_str().unwrap().to_string();
    let location = if location.starts_with("http") { location } else { format!("{base}{location}") };
    let sep = if location.contains('?') { '&' } else { '?' };
    let done = client
        .put(format!("{location}{sep}digest={}", blob.digest()))
        .header("content-type", "application/octet-stream")
        .body(blob.bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 201, "finishing the upload of {}", blob.digest());
}

async fn push_manifest(client: &reqwest::Client, base: &str, repo: &str, reference: &str, blob: &Blob) {
    let response = client
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", blob.media_type)
        .body(blob.bytes.clone())
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert_eq!(status, 201, "pushing manifest {reference}: {}", response.text().await.unwrap_or_default());
}

#[tokio::test]
async fn a_registry_base_equals_the_archive_base() {
    require!(root: false, tools: ["docker-registry"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
        d.join("registry").display()
    );
    fs::write(d.join("config.yml"), config).unwrap();
    let _registry = tokio::process::Command::new(geminik8s_vm_tests::skip::find_tool("docker-registry").unwrap())
        .arg("serve")
        .arg(d.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base_url = format!("http://127.0.0.1:{port}");
    geminik8s::tls::install_crypto_provider();
    let client = reqwest::Client::new();
    poll::until_async("the registry to answer /v2/", Duration::from_secs(20), Duration::from_millis(100), || {
        let request = client.get(format!("{base_url}/v2/")).send();
        async move {
            match request.await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("status {}", r.status())),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap();

    let image = image();
    let repo = "geminik8s/base";
    for blob in image.layers.iter().chain([&image.config]) {
        push_blob(&client, &base_url, repo, blob).await;
    }
    push_manifest(&client, &base_url, repo, &image.manifest.digest(), &image.manifest).await;
    push_manifest(&client, &base_url, repo, &image.other_manifest.digest(), &image.other_manifest).await;
    push_manifest(&client, &base_url, repo, "1.0", &image.index).await;

    // Pull through the builder.
    let spec_text = format!("base:\n  oci:\n    ref: 127.0.0.1:{port}/{repo}:1.0\n    plain_http: true\n");
    let spec = ImageSpec::parse(&spec_text, "registry.yaml", d).unwrap();
    let cache = Cache::new(d.join("cache")).unwrap();
    let pulled = base::prepare(&spec, &cache, 0, false, &Progress::quiet()).await.unwrap();
    assert_eq!(pulled.info.key, image.manifest.digest(), "the manifest for this platform was picked");
    let from_registry = d.join("from-registry");
    base::apply(&pulled, &from_registry).unwrap();

    // The same image from an OCI layout on disk.
    write_layout(&d.join("layout"), &image);
    let spec_text = format!("base:\n  oci:\n    archive: {}\n", d.join("layout").display());
    let spec = ImageSpec::parse(&spec_text, "archive.yaml", d).unwrap();
    let local = base::prepare(&spec, &cache, 0, false, &Progress::quiet()).await.unwrap();
    let from_archive = d.join("from-archive");
    base::apply(&local, &from_archive).unwrap();

    let tree = describe(&from_registry);
    assert_eq!(tree, describe(&from_archive));
    assert!(tree.iter().any(|l| l.0 == "opt/app/new"), "{tree:#?}");
    assert!(!tree.iter().any(|l| l.0 == "etc/gone.conf"), "whiteouts applied: {tree:#?}");

    // A second pull downloads no layer: they are cached by digest.
    let blobs_before = fs::read_dir(d.join("cache/blobs/sha256")).unwrap().count();
    base::prepare(
        &ImageSpec::parse(
            &format!(
                "base:\n  oci:\n    ref: 127.0.0.1:{port}/{repo}@{}\n    plain_http: true\n",
                image.index.digest()
            ),
            "by-digest.yaml",
            d,
        )
        .unwrap(),
        &cache,
        0,
        false,
        &Progress::quiet(),
    )
    .await
    .unwrap();
    assert_eq!(fs::read_dir(d.join("cache/blobs/sha256")).unwrap().count(), blobs_before);
}

#[tokio::test]
async fn a_tampered_layer_in_an_archive_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = image();
    write_layout(&d.join("layout"), &image);
    let victim = d.join("layout/blobs/sha256").join(image.layers[0].digest().trim_start_matches("sha256:"));
    let mut bytes = fs::read(&victim).unwrap();
    bytes[600] ^= 0xff;
    fs::write(&victim, bytes).unwrap();
    let spec = ImageSpec::parse(&format!("base: {{oci: {{archive: {}}}}}\n", d.join("layout").display()), "x.yaml", d)
        .unwrap();
    let cache = Cache::new(d.join("cache")).unwrap();
    let err = base::prepare(&spec, &cache, 0, false, &Progress::quiet()).await.err().expect("tampered layer refused");
    let text = format!("{err:#}");
    assert!(text.contains("digest mismatch") && text.contains(&image.layers[0].digest()), "{text}");
}

/// A fake registry (not a registry implementation: a handful of canned
/// answers) that demands a bearer token, to check the token dance the
/// real registry above does not exercise without an auth server.
mod fake_token_registry {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const TOKEN: &str = "tok-123";

    fn answer(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
        for (k, v) in headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(body);
        out
    }

    /// Serves `manifest` at tags `1.0` (correct digest header) and `bad`
    /// (wrong digest header), and `blobs`; records each request line.
    async fn serve(manifest: Vec<u8>, blobs: Vec<(String, Vec<u8>)>) -> (u16, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 2048];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let line = head.lines().next().unwrap_or_default().to_string();
                let path = line.split_whitespace().nth(1).unwrap_or_default().to_string();
                let authorized =
                    head.lines().any(|l| l.eq_ignore_ascii_case(&format!("authorization: Bearer {TOKEN}")));
                log.lock().unwrap().push(format!("{line} auth={authorized}"));
                let digest = format!("sha256:{}", sha256_bytes(&manifest));
                let reply = if path.starts_with("/token?") {
                    answer(
                        "200 OK",
                        &[("Content-Type", "application/json".into())],
                        format!(r#"{{"token":"{TOKEN}"}}"#).as_bytes(),
                    )
                } else if !authorized {
                    let challenge = format!(
                        r#"Bearer realm="http://127.0.0.1:{port}/token",service="fake",scope="repository:geminik8s/base:pull""#
                    );
                    answer("401 Unauthorized", &[("WWW-Authenticate", challenge)], b"{}")
                } else if path == "/v2/geminik8s/base/manifests/1.0" || path == "/v2/geminik8s/base/manifests/bad" {
                    let claimed = if path.ends_with("/bad") { format!("sha256:{}", "0".repeat(64)) } else { digest };
                    let headers =
                        [("Content-Type", MEDIA_OCI_MANIFEST.to_string()), ("Docker-Content-Digest", claimed)];
                    answer("200 OK", &headers, &manifest)
                } else if let Some((_, bytes)) =
                    blobs.iter().find(|(d, _)| path == format!("/v2/geminik8s/base/blobs/{d}"))
                {
                    answer("200 OK", &[], bytes)
                } else {
                    answer("404 Not Found", &[], b"{}")
                };
                sock.write_all(&reply).await.unwrap();
            }
        });
        (port, seen)
    }

    #[tokio::test]
    async fn a_bearer_token_is_fetched_and_digests_are_checked() {
        let image = image();
        let blobs = image.layers.iter().map(|b| (b.digest(), b.bytes.clone())).collect();
        let (port, seen) = serve(image.manifest.bytes.clone(), blobs).await;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cache = Cache::new(d.join("cache")).unwrap();

        let spec = format!("base:\n  oci:\n    ref: 127.0.0.1:{port}/geminik8s/base:1.0\n    plain_http: true\n");
        let spec = ImageSpec::parse(&spec, "token.yaml", d).unwrap();
        let pulled = base::prepare(&spec, &cache, 0, false, &Progress::quiet()).await.unwrap();
        assert_eq!(pulled.info.key, image.manifest.digest());
        let root = d.join("root");
        base::apply(&pulled, &root).unwrap();
        assert!(root.join("opt/app/new").is_file() && !root.join("etc/gone.conf").exists());
        let seen = seen.lock().unwrap().clone();
        assert!(seen[0].ends_with("auth=false") && seen[1].starts_with("GET /token?"), "{seen:#?}");
        assert!(seen[1].contains("scope=repository%3Ageminik8s%2Fbase%3Apull"), "{seen:#?}");
        assert!(seen[2..].iter().all(|l| l.ends_with("auth=true")), "every later request carries the token: {seen:#?}");

        let spec = format!("base:\n  oci:\n    ref: 127.0.0.1:{port}/geminik8s/base:bad\n    plain_http: true\n");
        let spec = ImageSpec::parse(&spec, "bad.yaml", d).unwrap();
        let err = base::prepare(&spec, &cache, 0, false, &Progress::quiet()).await.err().expect("digest mismatch");
        let text = format!("{err:#}");
        assert!(text.contains("digest mismatch") && text.contains(&"0".repeat(64)), "{text}");
    }
}

#[tokio::test]
async fn a_docker_save_archive_gives_the_same_tree_as_the_oci_layout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = image();
    write_layout(&d.join("layout"), &image);
    // `docker save` layout: manifest.json naming layer tars by path.
    let saved = d.join("saved");
    fs::create_dir_all(saved.join("l1")).unwrap();
    fs::create_dir_all(saved.join("l2")).unwrap();
    fs::write(saved.join("l1/layer.tar"), &image.layers[0].bytes).unwrap();
    fs::write(saved.join("l2/layer.tar"), &image.layers[1].bytes).unwrap();
    fs::write(saved.join("config.json"), &image.config.bytes).unwrap();
    let manifest =
        json!([{"Config": "config.json", "RepoTags": ["base:1"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}]);
    fs::write(saved.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
    let status = std::process::Command::new("tar")
        .arg("-cf")
        .arg(d.join("saved.tar"))
        .arg("-C")
        .arg(&saved)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());

    let cache = Cache::new(d.join("cache")).unwrap();
    let mut trees = Vec::new();
    for archive in [d.join("layout"), d.join("saved.tar")] {
        let spec =
            ImageSpec::parse(&format!("base: {{oci: {{archive: {}}}}}\n", archive.display()), "x.yaml", d).unwrap();
        let prepared = base::prepare(&spec, &cache, 0, false, &Progress::quiet()).await.unwrap();
        let root = d.join(format!("root-{}", trees.len()));
        base::apply(&prepared, &root).unwrap();
        trees.push(describe(&root));
    }
    assert_eq!(trees[0], trees[1]);
}
