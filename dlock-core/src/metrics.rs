//! Names of the metrics dlock records through the [`metrics`] facade. Every metric carries a `driver`
//! label; install any `metrics` recorder (Prometheus, StatsD, …) to collect them.

/// Counter of acquire attempts, labelled `outcome`: `granted`, `would_block`, `timeout`, `lost`,
/// `error` or `cancelled`.
pub const ACQUIRE_TOTAL: &str = "dlock_acquire_total";
/// Histogram of seconds from asking for a lock to holding it (granted acquires only).
pub const ACQUIRE_WAIT_SECONDS: &str = "dlock_acquire_wait_seconds";
/// Histogram of seconds a lock was held, from grant to release or loss.
pub const HOLD_SECONDS: &str = "dlock_hold_seconds";
/// Counter of lease renewals, labelled `outcome`: `ok`, `error`, or `timeout` (unanswered in time and
/// retried).
pub const RENEWALS_TOTAL: &str = "dlock_renewals_total";
/// Counter of store errors met while waiting in a queue (each is followed by waiting again while the
/// lease lives).
pub const WAIT_ERRORS_TOTAL: &str = "dlock_wait_errors_total";
/// Counter of locks lost because their lease could not be renewed in time.
pub const LOST_TOTAL: &str = "dlock_lost_total";
/// Counter of releases that failed after every retry (the lease TTL frees the entry then).
pub const RELEASE_FAILURES_TOTAL: &str = "dlock_release_failures_total";
