//! The labs (network namespaces, QEMU) and the helpers the tests share.
//!
//! Tests never sleep for a fixed time: they poll a condition until a
//! deadline and, on timeout, report what they saw last.

pub mod chaos;
pub mod image;
pub mod k3s_standin;
pub mod labstate;
pub mod netns;
pub mod pg;
pub mod poll;
pub mod probe;
pub mod qemu;
pub mod qemu_lab;
pub mod s3;
pub mod skip;
