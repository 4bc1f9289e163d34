//! # dlock
//!
//! Distributed locks with the six lock modes of a classic distributed lock manager (`NL`, `CR`, `CW`,
//! `PR`, `PW`, `EX`), fair FIFO queues, fencing tokens and leases that renew themselves and say loudly
//! when they are lost.
//!
//! This crate is the facade: it re-exports [`dlock_core`] and picks a driver from a URL with
//! [`connect`]. Drivers for Redis, etcd and NATS JetStream are behind the features `redis`, `etcd` and
//! `jetstream` (all three: `full`), and re-exported as [`redis`], [`etcd`] and [`jetstream`] for what
//! only a driver offers (its own configuration, or etcd's fenced transactions).
//!
//! The package is published as `dlock-rs` (the name `dlock` on crates.io belongs to an unrelated
//! crate); its library is named `dlock`:
//!
//! ```toml
//! [dependencies]
//! dlock-rs = { version = "0.1", features = ["redis"] }
//! ```
//!
//! ```
//! use std::time::Duration;
//! use dlock::LockMode;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> dlock::Result<()> {
//! let locks = dlock::connect("mem://").await?;
//! let guard = locks
//!     .lock("stock/42")
//!     .mode(LockMode::PW)
//!     .ttl(Duration::from_secs(10))
//!     .timeout(Duration::from_secs(3))
//!     .await?;
//! let token = guard.fencing_token(); // hand it to the storage you protect
//! guard.release().await?;
//! # let _ = token;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use dlock_core::*;

mod connect;

pub use connect::connect;

/// The Redis driver ([`dlock_redis`]): standalone Redis and Redis Cluster.
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use dlock_redis as redis;

/// The etcd v3 driver ([`dlock_etcd`]), with fenced transactions.
#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub use dlock_etcd as etcd;

/// The NATS JetStream driver ([`dlock_jetstream`]).
#[cfg(feature = "jetstream")]
#[cfg_attr(docsrs, doc(cfg(feature = "jetstream")))]
pub use dlock_jetstream as jetstream;
