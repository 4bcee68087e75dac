//! `gemin_k8s completion <shell>`.

use std::process::ExitCode;

use clap_complete::Shell;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Shell to generate for.
    #[arg(value_enum)]
    pub shell: Shell,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut cmd = super::command();
    clap_complete::generate(args.shell, &mut cmd, "gemin_k8s", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}
