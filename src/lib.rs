//! # dlock
//!
//! Distributed locks with the six lock modes of a classic distributed lock manager (`NL`, `CR`, `CW`,
//! `PR`, `PW`, `EX`), fair FIFO queues, fencing tokens and leases that renew themselves and say loudly
//! when they are lost.
//!
//! This crate is the facade: it re-exports [`dlock_core`] and picks a driver from a URL with
//! [`connect`]. Drivers for Redis, etcd and NATS JetStream are behind the features `redis`, `etcd` and
//! `jetstream` (all three: `full`).
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

pub use dlock_core::*;

mod connect;

pub use connect::connect;
