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
    /// Print progress as JSON events, one per line, on stdout.
    #[arg(long)]
    pub json: bool,
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
        assert!(help.contains("rootfs-tar, oci-archive, raw, qcow2, iso, pxe"), "{help}");
    }
}
