//! Cloud-config: Kairos-compatible `#cloud-config` YAML with geminik8s's
//! settings under `geminik8s:`. Shared by the agent and the image builder.
//!
//! - [`yaml`]: parsing with positions, merging, emitting;
//! - [`schema`]: every key of the `geminik8s:` block, and the reference page;
//! - [`types`]: the typed block the rest of the code uses;
//! - [`validate`]: types, unknown keys, required keys, relations between keys;
//! - [`load`]: sources (`/oem`, `/etc/geminik8s`, CIDATA, kernel command line).

pub mod diag;
pub mod load;
pub mod schema;
pub mod types;
pub mod validate;
pub mod yaml;

pub use diag::{Diagnostic, Diagnostics, Severity};
pub use load::{Loaded, Source, SourcePaths, load, load_files, load_sources};
pub use types::*;
pub use validate::CheckContext;
