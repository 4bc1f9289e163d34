//! The dlock conformance suite and the harness that runs real Redis, etcd and NATS servers.
//!
//! - [`suite`]: cases every driver must pass, stamped per driver by [`conformance_suite!`].
//! - [`history`]: random operations under faults, checked for overlap and fencing order.
//! - [`harness`]: real servers on loopback ports, with faults (kill, pause, restart, cut links).

pub mod harness;
pub mod history;
pub mod suite;
