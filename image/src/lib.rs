//! gemin-image: builds geminik8s images.
//!
//! Assembles the immutable root filesystem into a target directory and
//! writes it out as a reproducible rootfs tarball, an OCI image archive and
//! bootable images (raw and qcow2 disks with A/B root slots, a live ISO, a
//! PXE bundle), with a manifest beside them:
//!
//! - [`spec`]: the image spec (YAML) and its validation;
//! - [`cache`]: the download cache (sha256-keyed, resumable, offline);
//! - [`base`]: the base root filesystem (mmdebstrap, OCI image, tarball);
//! - [`oci`]: OCI registries, layouts, `docker save` archives, layers;
//! - [`rootfs`]: what is laid on top (artifacts, overlays, cloud-config,
//!   users, the persistent mount points);
//! - [`output`]: reproducible tarball and OCI archive writers;
//! - [`disk`]: the bootable formats (GPT layout, ESP, squashfs, ISO, PXE);
//! - [`flash`]: writing a raw image to a block device;
//! - [`manifest`]: the build manifest (packages, artifacts, sizes, inputs);
//! - [`build`]: the steps in order, with warm-cache skipping;
//! - [`progress`]: bars, plain lines or JSON events.

pub mod base;
pub mod build;
pub mod cache;
pub mod cli;
pub mod disk;
pub mod flash;
pub mod manifest;
pub mod oci;
pub mod output;
pub mod progress;
pub mod rootfs;
pub mod spec;
