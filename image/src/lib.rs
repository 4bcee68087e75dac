//! gemin-image: builds geminik8s images.
//!
//! Part one assembles the immutable root filesystem into a target directory
//! and writes it out as a reproducible rootfs tarball and an OCI image
//! archive, with a manifest beside them:
//!
//! - [`spec`]: the image spec (YAML) and its validation;
//! - [`cache`]: the download cache (sha256-keyed, resumable, offline);
//! - [`base`]: the base root filesystem (mmdebstrap, OCI image, tarball);
//! - [`oci`]: OCI registries, layouts, `docker save` archives, layers;
//! - [`rootfs`]: what is laid on top (artifacts, overlays, cloud-config,
//!   users, the persistent mount points);
//! - [`output`]: reproducible tarball and OCI archive writers;
//! - [`manifest`]: the build manifest (packages, artifacts, sizes, inputs);
//! - [`build`]: the steps in order, with warm-cache skipping;
//! - [`progress`]: bars, plain lines or JSON events.

pub mod base;
pub mod build;
pub mod cache;
pub mod cli;
pub mod manifest;
pub mod oci;
pub mod output;
pub mod progress;
pub mod rootfs;
pub mod spec;
