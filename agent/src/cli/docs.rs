//! Generated documentation: man pages from the clap tree and the
//! cloud-config reference from the schema. `just docs` writes them; a test
//! fails when the committed files drift from the code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use crate::config::schema;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The repository's docs/ directory.
    #[arg(long, default_value = "docs")]
    pub out: PathBuf,
}

/// Every generated file, as (path relative to docs/, contents).
pub fn generated() -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = vec![(PathBuf::from("cloud-config.md"), schema::reference_markdown().into_bytes())];
    let root = super::command();
    man_pages(&root, "gemin_k8s", &mut files)?;
    Ok(files)
}

fn man_pages(cmd: &clap::Command, name: &str, files: &mut Vec<(PathBuf, Vec<u8>)>) -> anyhow::Result<()> {
    if cmd.is_hide_set() {
        return Ok(());
    }
    let cmd = cmd.clone().name(name.to_string());
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .with_context(|| format!("rendering the man page of {name}"))?;
    files.push((Path::new("man").join(format!("{name}.1")), page));
    for sub in cmd.get_subcommands() {
        if sub.get_name() != "help" {
            man_pages(sub, &format!("{name}-{}", sub.get_name()), files)?;
        }
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    for (rel, contents) in generated()? {
        let path = args.out.join(&rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
