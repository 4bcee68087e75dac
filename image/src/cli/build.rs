//! `gemin-image build`: assemble the root filesystem and write the outputs.

use std::path::PathBuf;

use anyhow::Context;
use clap::builder::TypedValueParser;

use crate::build::{BuildOptions, build, resolve_epoch};
use crate::cache::Cache;
use crate::progress::{Mode, Progress};
use crate::spec::{ArtifactSource, ImageSpec, OutputFormat};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image spec (YAML).
    #[arg(long, short = 's', default_value = "image/specs/default.yaml")]
    pub spec: PathBuf,
    /// Directory for the outputs and the manifest.
    #[arg(long, short = 'o', default_value = "out")]
    pub out: PathBuf,
    /// Directory the root filesystem is assembled in [default: OUT/rootfs].
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// Empty a non-empty --target first (always done for the default target).
    #[arg(long)]
    pub replace_target: bool,
    /// Download cache (artifacts, OCI blobs, Debian bases).
    #[arg(long, env = "GEMIN_IMAGE_CACHE", default_value = "/var/cache/gemin-image")]
    pub cache: PathBuf,
    /// Use only what is in the cache; fail instead of downloading.
    #[arg(long)]
    pub offline: bool,
    /// Clamp every mtime to this Unix time [default: $SOURCE_DATE_EPOCH, then the spec].
    #[arg(long)]
    pub source_date_epoch: Option<u64>,
    /// Rebuild the Debian base even when it is cached.
    #[arg(long)]
    pub refresh_base: bool,
    /// Rebuild even when the outputs are up to date.
    #[arg(long)]
    pub force: bool,
    /// Name and tag recorded in the OCI archive [default: NAME:latest].
    #[arg(long)]
    pub tag: Option<String>,
    /// Take artifact NAME from a local file instead of the spec's source
    /// (repeatable), e.g. `--artifact gemin_k8s=target/release/gemin_k8s`.
    #[arg(long = "artifact", value_name = "NAME=PATH", value_parser = parse_override)]
    pub artifacts: Vec<(String, PathBuf)>,
    /// The outputs to write, instead of the spec's `outputs:` (comma-separated
    /// or repeated), e.g. `--format iso,raw`.
    #[arg(long = "format", value_name = "FORMAT", value_delimiter = ',', value_parser = format_parser())]
    pub formats: Vec<OutputFormat>,
    /// Carry the site enrolment token of `gemin_k8s init` (its `enrolment.token`): the image's
    /// /oem gets it as a cloud-config, so a node booted without a configuration waits for
    /// `gemin_k8s deploy`.
    #[arg(long, value_name = "FILE")]
    pub enrolment_token: Option<PathBuf>,
    /// Print progress as JSON events, one per line, on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Where `--enrolment-token` puts the token in the image: read before a
/// node's own configuration in /oem.
pub const ENROLMENT_DEST: &str = "oem/10_geminik8s-enrolment.yaml";

/// An overlay directory holding the enrolment cloud-config for the token in
/// `file` (checked as the agent checks it).
fn enrolment_overlay(file: &std::path::Path) -> anyhow::Result<tempfile::TempDir> {
    use geminik8s::enrol::{KEY, Settings};
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading --enrolment-token {}", file.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    Settings::of_unconfigured(&serde_json::json!({ KEY: { "token": token } }))
        .with_context(|| format!("--enrolment-token {}", file.display()))?;
    let dir = tempfile::Builder::new().prefix("gemin-image-enrolment-").tempdir()?;
    let dest = dir.path().join(ENROLMENT_DEST);
    std::fs::create_dir_all(dest.parent().expect("a directory"))?;
    let yaml = format!(
        "#cloud-config\n# The site enrolment token: without a node configuration, wait for `gemin_k8s deploy`.\n\
         {KEY}:\n  token: {token}\n"
    );
    std::fs::write(&dest, yaml).with_context(|| format!("writing {}", dest.display()))?;
    std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(dir)
}

/// Every output the builder can write, by the names the spec uses.
fn format_parser() -> impl TypedValueParser<Value = OutputFormat> {
    clap::builder::PossibleValuesParser::new(OutputFormat::ALL.map(|(name, _)| name))
        .map(|name| OutputFormat::named(&name).expect("one of the possible values"))
}

fn parse_override(text: &str) -> Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.to_string(), PathBuf::from(path))),
        _ => Err(format!("`{text}` is not NAME=PATH")),
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut spec = ImageSpec::load(&args.spec)?;
    let names: Vec<String> = spec.artifacts.iter().map(|a| a.name.clone()).collect();
    for (name, path) in &args.artifacts {
        let artifact = spec.artifacts.iter_mut().find(|a| &a.name == name).with_context(|| {
            format!("--artifact {name}=...: the spec has no artifact `{name}` (it has: {})", names.join(", "))
        })?;
        artifact.source = ArtifactSource::Path { path: path.clone(), sha256: None };
    }
    if !args.formats.is_empty() {
        spec.outputs = unique(&args.formats);
    }
    // Laid over the others; part of the inputs, so a new token rebuilds.
    let enrolment = args.enrolment_token.as_deref().map(enrolment_overlay).transpose()?;
    if let Some(dir) = &enrolment {
        spec.overlays.push(dir.path().to_path_buf());
    }
    let epoch = resolve_epoch(args.source_date_epoch, &spec)?;
    let (target, replace_target) = match &args.target {
        Some(t) => (t.clone(), args.replace_target),
        None => (args.out.join("rootfs"), true),
    };
    let opts = BuildOptions {
        spec,
        target,
        out_dir: args.out.clone(),
        source_date_epoch: epoch,
        replace_target,
        refresh_base: args.refresh_base,
        force: args.force,
        tag: args.tag.clone(),
    };
    let cache = Cache::new(&args.cache)?.offline(args.offline);
    let progress = Progress::new(Mode::detect(args.json));
    let manifest =
        build(&opts, &cache, &progress).await.with_context(|| format!("building {}", args.spec.display()))?;
    if !args.json {
        eprintln!(
            "built {}: {} packages, {} artifacts, rootfs {} bytes; manifest {}",
            manifest.name,
            manifest.packages.len(),
            manifest.artifacts.len(),
            manifest.rootfs.content_bytes,
            opts.manifest_path().display()
        );
    }
    Ok(())
}

/// `--format raw,iso,raw` writes each output once, in the order given.
fn unique(formats: &[OutputFormat]) -> Vec<OutputFormat> {
    formats.iter().fold(Vec::new(), |mut out, f| {
        if !out.contains(f) {
            out.push(*f);
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn the_enrolment_token_becomes_an_oem_cloud_config_the_agent_accepts() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("enrolment.token");
        std::fs::write(&file, "site-token-0123456789abcdef\n").unwrap();
        let overlay = enrolment_overlay(&file).unwrap();
        let text = std::fs::read_to_string(overlay.path().join(ENROLMENT_DEST)).unwrap();
        let source = geminik8s::config::Source { name: "x".into(), text };
        let doc = geminik8s::config::load::merged_document(&[source]).unwrap();
        let settings = geminik8s::enrol::Settings::of_unconfigured(&doc).unwrap().expect("an enrolment block");
        assert_eq!(settings.token().unwrap(), "site-token-0123456789abcdef");
        std::fs::write(&file, "short\n").unwrap();
        let err = format!("{:#}", enrolment_overlay(&file).unwrap_err());
        assert!(err.contains("shorter than 16"), "{err}");
        let cli = Cli::try_parse_from(["gemin-image", "--enrolment-token", "t"]).unwrap();
        assert_eq!(cli.args.enrolment_token.as_deref(), Some(std::path::Path::new("t")));
    }

    #[test]
    fn formats_on_the_command_line_replace_the_specs_and_are_named_in_the_help() {
        let cli = Cli::try_parse_from(["gemin-image", "--format", "iso,raw", "--format", "iso"]).unwrap();
        assert_eq!(unique(&cli.args.formats), vec![OutputFormat::Iso, OutputFormat::Raw]);
        let err = Cli::try_parse_from(["gemin-image", "--format", "vmdk"]).unwrap_err().to_string();
        for (name, _) in OutputFormat::ALL {
            assert!(err.contains(name), "{name} missing from: {err}");
        }
        let mut help = Vec::new();
        <Cli as clap::CommandFactory>::command().write_long_help(&mut help).unwrap();
        let help = String::from_utf8(help).unwrap();
        assert!(help.contains("rootfs-tar, oci-archive, raw, qcow2, iso, pxe, upgrade"), "{help}");
    }
}
