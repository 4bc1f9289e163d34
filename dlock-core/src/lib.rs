//! The core of [dlock](https://docs.rs/dlock-rs): the lock model, the client API, the driver trait and the
//! in-memory driver.
//!
//! - [`LockMode`]: the six modes of a classic distributed lock manager and their compatibility matrix.
//! - [`grant`]: the FIFO grant rule and the conversion rule, as pure functions every driver shares.
//! - [`Locks`], [`LockRequest`], [`Guard`]: what users touch — acquire (blocking in FIFO order, or
//!   `try_acquire`), fencing tokens, self-renewing leases that say when they are lost, conversion.
//! - [`Driver`]: what a store implements; [`MemoryDriver`] is the in-process one.
//!
//! ```
//! use std::time::Duration;
//! use dlock_core::{Locks, LockMode, MemoryDriver};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> dlock_core::Result<()> {
//! let locks = Locks::new(MemoryDriver::new());
//! let guard = locks.lock("stock/42").mode(LockMode::PW).ttl(Duration::from_secs(10)).await?;
//! let token = guard.fencing_token();
//! guard.release().await?;
//! let next = locks.lock("stock/42").try_acquire().await?;
//! assert!(next.fencing_token() > token);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod client;
pub mod driver;
mod error;
pub mod grant;
mod guard;
mod keeper;
pub mod lease;
mod memory;
pub mod metrics;
mod mode;
mod name;
pub mod quorum;
mod session;
pub mod url;

pub use client::{Guards, LockAllRequest, LockRequest, LockSpec, Locks, DEFAULT_TTL};
pub use driver::{
    Capabilities, Driver, Enqueued, EntryInfo, EntryKey, EntryRequest, Grant, OwnerId, Queued,
    Renewal,
};
pub use error::{Error, Result};
pub use guard::Guard;
pub use lease::{LeaseState, LeaseStatus};
pub use memory::MemoryDriver;
pub use mode::LockMode;
pub use name::LockName;
pub use quorum::Quorum;
pub use session::{LockOrder, Session, SessionLockRequest};
