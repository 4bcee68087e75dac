//! geminik8s: two-node highly available K3s on PostgreSQL through Kine.
//!
//! This crate is both the node daemon (`gemin_k8s agent`) and the operator CLI.
//! `main.rs` is a thin wrapper around [`cli::main`].

pub mod backup;
pub mod cli;
pub mod clusterfile;
pub mod cmd;
pub mod config;
pub mod daemon;
pub mod election;
pub mod enrol;
pub mod fsutil;
pub mod hostmeta;
pub mod k3s;
pub mod kine;
pub mod logging;
pub mod netlink;
pub mod peer;
pub mod pki;
pub mod postgres;
pub mod secrets;
pub mod services;
pub mod system;
pub mod tls;
pub mod upgrade;
pub mod witness;
