//! `gemin-image check SPEC`: validate a spec.

use std::path::PathBuf;

use crate::spec::ImageSpec;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image spec (YAML).
    pub spec: PathBuf,
    /// Print the validated spec as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let spec = ImageSpec::load(&args.spec)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&spec)?);
    } else {
        println!(
            "{}: valid ({} packages, {} artifacts)",
            args.spec.display(),
            spec.packages.len(),
            spec.artifacts.len()
        );
    }
    Ok(())
}
