//! Pulling an image over the OCI distribution API with reqwest.
//!
//! Manifest lists are resolved for the wanted platform, anonymous access and
//! bearer tokens (the `WWW-Authenticate: Bearer realm=...` dance) are
//! supported, every manifest and blob is checked against its digest, and
//! blobs land in the download cache (so a second pull of the same image
//! downloads nothing).

use anyhow::Context;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};

use super::*;
use crate::cache::{Cache, Request, sha256_bytes};
use crate::progress::Progress;
use crate::spec::Platform;

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

pub struct Registry<'a> {
    cache: &'a Cache,
    base: String,
    repository: String,
    authorization: Option<String>,
}

/// The parameters of a `WWW-Authenticate: Bearer ...` challenge.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Challenge {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
}

/// Parse `Bearer realm="...",service="...",scope="..."`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let rest = header.trim().strip_prefix("Bearer ").or_else(|| header.trim().strip_prefix("bearer "))?;
    let mut challenge = Challenge::default();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().trim_start_matches(',').trim();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        match key {
            "realm" => challenge.realm = value.to_string(),
            "service" => challenge.service = Some(value.to_string()),
            "scope" => challenge.scope = Some(value.to_string()),
            _ => {}
        }
        s = tail.trim_start_matches(',').trim();
    }
    (!challenge.realm.is_empty()).then_some(challenge)
}

impl<'a> Registry<'a> {
    pub fn new(cache: &'a Cache, reference: &Reference, plain_http: bool) -> Registry<'a> {
        let scheme = if plain_http { "http" } else { "https" };
        Registry {
            cache,
            base: format!("{scheme}://{}", reference.registry),
            repository: reference.repository.clone(),
            authorization: None,
        }
    }

    async fn get(&mut self, url: &str, accept: &str) -> anyhow::Result<reqwest::Response> {
        for _ in 0..2 {
            let mut req = self.cache.client().get(url).header(ACCEPT, accept);
            if let Some(auth) = &self.authorization {
                req = req.header(AUTHORIZATION, auth);
            }
            let response = req.send().await.with_context(|| format!("GET {url}"))?;
            if response.status() == StatusCode::UNAUTHORIZED && self.authorization.is_none() {
                let header = response.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or_default();
                let challenge = parse_challenge(header).with_context(|| {
                    format!("GET {url}: 401 with an authentication challenge this builder cannot answer: `{header}`")
                })?;
                self.authorization = Some(self.token(&challenge).await?);
                continue;
            }
            let status = response.status();
            if !status.is_success() {
                let body = response.text().await.unwrap_or_default();
                anyhow::bail!("GET {url}: {status}: {}", body.trim());
            }
            return Ok(response);
        }
        anyhow::bail!("GET {url}: still unauthorized after fetching a token; the image may need credentials")
    }

    /// Fetch an anonymous bearer token for pulling this repository.
    async fn token(&self, challenge: &Challenge) -> anyhow::Result<String> {
        let scope = challenge.scope.clone().unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        let mut url = reqwest::Url::parse(&challenge.realm)
            .with_context(|| format!("the registry's token realm `{}` is not a URL", challenge.realm))?;
        url.query_pairs_mut().append_pair("scope", &scope);
        if let Some(service) = &challenge.service {
            url.query_pairs_mut().append_pair("service", service);
        }
        let response = self
            .cache
            .client()
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("fetching a registry token from {}", challenge.realm))?;
        let body: serde_json::Value = response.json().await.context("parsing the registry token")?;
        let token = body
            .get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|t| t.as_str())
            .with_context(|| format!("the token answer from {} has no token", challenge.realm))?;
        Ok(format!("Bearer {token}"))
    }

    /// Fetch a manifest or index by tag or digest; returns its media type,
    /// body and digest (verified against a digest reference, or against the
    /// registry's `Docker-Content-Digest`).
    async fn manifest(&mut self, reference: &str) -> anyhow::Result<(Option<String>, Vec<u8>, String)> {
        let url = format!("{}/v2/{}/manifests/{reference}", self.base, self.repository);
        let response = self.get(&url, MANIFEST_ACCEPT).await?;
        let media_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        let claimed = response.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = response.bytes().await.with_context(|| format!("reading {url}"))?.to_vec();
        let actual = sha256_bytes(&body);
        let expected = if reference.starts_with("sha256:") { Some(reference.to_string()) } else { claimed };
        if let Some(expected) = expected
            && expected != format!("sha256:{actual}")
        {
            return Err(OciError::Digest { what: url, expected, actual }.into());
        }
        self.cache.insert_bytes(&body)?;
        Ok((media_type, body, format!("sha256:{actual}")))
    }

    /// Resolve `reference` for `platform` and download its layers into the
    /// cache (skipping those already there).
    pub async fn pull(
        &mut self,
        reference: &str,
        platform: &Platform,
        progress: &Progress,
    ) -> anyhow::Result<ResolvedImage> {
        let mut reference = reference.to_string();
        for _ in 0..4 {
            let (media_type, body, digest) = self.manifest(&reference).await?;
            let what = format!("{}/{}@{digest}", self.base, self.repository);
            let json: serde_json::Value = serde_json::from_slice(&body).with_context(|| format!("parsing {what}"))?;
            if is_index(media_type.as_deref(), &json) {
                let index: ImageIndex = serde_json::from_value(json).with_context(|| format!("parsing {what}"))?;
                reference = select_platform(&what, &index, platform)?.digest.clone();
                continue;
            }
            let manifest: ImageManifest = serde_json::from_value(json).with_context(|| format!("parsing {what}"))?;
            let mut layers = Vec::new();
            for (i, layer) in manifest.layers.iter().enumerate() {
                let sha256 = layer.sha256()?.to_string();
                let request = Request {
                    name: format!("layer {}/{}", i + 1, manifest.layers.len()),
                    url: format!("{}/v2/{}/blobs/{}", self.base, self.repository, layer.digest),
                    sha256,
                    authorization: self.authorization.clone(),
                };
                layers.push(self.cache.fetch(&request, progress).await?);
            }
            return Ok(ResolvedImage { manifest_digest: digest, layers });
        }
        anyhow::bail!("{}/{}: manifest lists nested too deeply", self.base, self.repository)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_parse() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://auth.docker.io/token");
        assert_eq!(c.service.as_deref(), Some("registry.docker.io"));
        assert_eq!(c.scope.as_deref(), Some("repository:library/debian:pull"));
        assert_eq!(parse_challenge(r#"Basic realm="x""#), None);
    }
}
