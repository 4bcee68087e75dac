//! Upgrades of a node's operating system image, A/B: the bundle a new
//! version comes as ([`bundle`]), writing it into the root slot the node
//! did not boot from ([`slot`]), and the health gate a new boot must pass
//! before it is kept ([`gate`]).

pub mod bundle;
pub mod gate;
pub mod slot;
