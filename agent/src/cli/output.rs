//! Machine-readable and human output.

use serde::Serialize;

use crate::config::yaml;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
    Yaml,
}

/// Render `value` as JSON or YAML (`Text` is the caller's own rendering).
pub fn render<T: Serialize>(value: &T, format: OutputFormat) -> anyhow::Result<Option<String>> {
    let json = serde_json::to_value(value)?;
    Ok(match format {
        OutputFormat::Text => None,
        OutputFormat::Json => Some(serde_json::to_string_pretty(&json)? + "\n"),
        OutputFormat::Yaml => Some(yaml::to_yaml(&json)),
    })
}
