//! `gemin_k8s version`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::OutputFormat;
use super::output::render;

/// Where `--check-update` looks unless told otherwise: a JSON document
/// `{"version": "X.Y.Z", "url": "..."}`.
pub const DEFAULT_UPDATE_URL: &str = "https://releases.geminik8s.io/stable.json";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Print only the version number.
    #[arg(long)]
    pub short: bool,
    /// Ask the release feed whether a newer version exists.
    #[arg(long)]
    pub check_update: bool,
    /// Release feed for --check-update.
    #[arg(long, env = "GEMINIK8S_UPDATE_URL", default_value = DEFAULT_UPDATE_URL, value_name = "URL")]
    pub update_url: String,
    /// Time limit for --check-update.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub update_timeout: Duration,
}

/// What this build is and what it was built to run with.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    pub version: &'static str,
    pub git_commit: &'static str,
    pub target: String,
    pub components: Components,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateCheck>,
}

/// Versions of the components the agent is built and tested against.
#[derive(Debug, Clone, Serialize)]
pub struct Components {
    pub postgresql: &'static str,
    pub kine: &'static str,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum UpdateCheck {
    UpToDate { latest: String },
    Available { latest: String, url: Option<String> },
    Unreachable { url: String, error: String },
}

#[derive(Debug, Deserialize)]
struct Release {
    version: String,
    url: Option<String>,
}

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_COMMIT: &str = match option_env!("GEMINIK8S_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

pub fn info() -> VersionInfo {
    VersionInfo {
        version: VERSION,
        git_commit: GIT_COMMIT,
        target: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
        components: Components { postgresql: "15", kine: "v0.17.5" },
        update: None,
    }
}

/// Numeric comparison of dotted versions (`1.10.0` > `1.9.3`); a leading
/// `v` is ignored, as is anything after `-` or `+`.
pub fn newer(candidate: &str, current: &str) -> bool {
    fn parts(v: &str) -> Vec<u64> {
        let core = v.trim_start_matches('v').split(['-', '+']).next().unwrap_or_default();
        core.split('.').map(|p| p.parse().unwrap_or(0)).collect()
    }
    let (a, b) = (parts(candidate), parts(current));
    let n = a.len().max(b.len());
    let pad = |v: &Vec<u64>, i: usize| v.get(i).copied().unwrap_or(0);
    (0..n).map(|i| pad(&a, i).cmp(&pad(&b, i))).find(|o| o.is_ne()) == Some(std::cmp::Ordering::Greater)
}

pub async fn check_update(url: &str, timeout: Duration) -> UpdateCheck {
    crate::tls::install_crypto_provider();
    let result = async {
        let client = reqwest::Client::builder().timeout(timeout).build().context("building the HTTP client")?;
        let response = client.get(url).send().await?.error_for_status()?;
        let release: Release =
            response.json().await.context("reading the release feed (expected JSON with `version`)")?;
        anyhow::Ok(release)
    }
    .await;
    match result {
        Ok(r) if newer(&r.version, VERSION) => UpdateCheck::Available { latest: r.version, url: r.url },
        Ok(r) => UpdateCheck::UpToDate { latest: r.version },
        Err(e) => UpdateCheck::Unreachable { url: url.to_string(), error: format!("{e:#}") },
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut info = info();
    if args.check_update {
        info.update = Some(check_update(&args.update_url, args.update_timeout).await);
    }
    let unreachable = matches!(info.update, Some(UpdateCheck::Unreachable { .. }));
    if let Some(text) = render(&info, args.output)? {
        print!("{text}");
    } else if args.short {
        println!("{}", info.version);
    } else {
        println!("gemin_k8s {} (commit {}, {})", info.version, info.git_commit, info.target);
        println!("built for PostgreSQL {} and Kine {}", info.components.postgresql, info.components.kine);
    }
    match (&info.update, args.output) {
        (Some(UpdateCheck::UpToDate { latest }), OutputFormat::Text) => {
            println!("up to date (latest release: {latest})")
        }
        (Some(UpdateCheck::Available { latest, url }), OutputFormat::Text) => {
            println!("update available: {latest} (running {VERSION})");
            if let Some(url) = url {
                println!("  {url}");
            }
        }
        _ => {}
    }
    if let Some(UpdateCheck::Unreachable { url, error }) = &info.update {
        eprintln!("could not check for updates: {url} is not reachable ({error})");
        eprintln!("  offline sites can set GEMINIK8S_UPDATE_URL or --update-url to a local mirror of the release feed");
    }
    Ok(if unreachable { ExitCode::from(3) } else { ExitCode::SUCCESS })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_comparison_is_numeric() {
        assert!(newer("1.10.0", "1.9.3"));
        assert!(newer("v0.2.0", "0.1.9"));
        assert!(newer("0.1.1", "0.1"));
        assert!(!newer("0.1.0", "0.1.0"));
        assert!(!newer("0.1.0-rc1", "0.1.0"));
        assert!(!newer("0.0.9", "0.1.0"));
    }
}
