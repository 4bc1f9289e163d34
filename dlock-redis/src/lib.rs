//! Redis driver for [dlock](https://docs.rs/dlock-rs): the six DLM lock modes, fair FIFO queues, fencing
//! tokens and per-entry leases, on standalone Redis (6.0+) and Redis Cluster (7.0+).
//!
//! ```no_run
//! # async fn demo() -> dlock_core::Result<()> {
//! let locks = dlock_core::Locks::new(dlock_redis::RedisDriver::connect("redis://127.0.0.1:6379").await?);
//! let guard = locks.lock("stock/42").await?;
//! # drop(guard); Ok(()) }
//! ```
//!
//! With the `dlock` facade, `dlock::connect(url)` picks this driver for the URLs below.
//!
//! # URLs
//!
//! | form | meaning |
//! |------|---------|
//! | `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]` | one server; `USER:PASSWORD` for an ACL user, `:PASSWORD` for `requirepass` |
//! | `rediss://…` | the same over TLS, verified against the system's trust store |
//! | `redis+cluster://[[USER]:PASSWORD@]HOST:PORT,HOST:PORT,…` | Redis Cluster; the hosts are seeds, the rest is discovered |
//! | `rediss+cluster://…` | Redis Cluster over TLS |
//!
//! Credentials must be percent-encoded (`@` is `%40`). Query parameters:
//! - `tls_ca=PATH`: trust the CA certificate(s) in this PEM file instead of the system's store (for
//!   private or self-signed CAs).
//! - `tls_cert=PATH&tls_key=PATH`: a client certificate and key (PEM) for mutual TLS.
//! - `key_prefix=NAME`: the first part of every key (default `dlock`), to separate applications.
//! - `protocol=resp2|resp3`: the command connection's protocol (the subscriber always uses RESP3).
//!
//! Any other parameter is refused with [`Error::InvalidUrl`](dlock_core::Error::InvalidUrl).
//!
//! The fragment `#insecure` (`rediss://host:6380/#insecure`) turns certificate verification **off**.
//! It exists for throwaway test setups only: anyone on the path can then impersonate the server.
//!
//! # Storage
//!
//! Per lock name, one hash `{dlock:<name>}:q` and one pub/sub channel `{dlock:<name>}:w`, where `<name>`
//! is [`LockName::encoded`](dlock_core::LockName::encoded) and `dlock` the key prefix. The braces are a
//! hash tag: everything about a name lives in one cluster slot, so every operation is a single-slot
//! script and the same scripts run on a cluster unchanged. The hash maps each owner id to its entry
//! (`seq`, mode, granted, pending conversion, lease expiry, fencing token) and holds two bookkeeping
//! fields (`.seq`, `.tok`); see the `lua` module source for the exact format.
//!
//! A name whose queue empties is deleted by the script that empties it (see
//! [Fencing tokens](#fencing-tokens) for the sub-millisecond exception), and the hash always carries a
//! `PEXPIREAT` of its longest-living lease, so the names of crashed holders vanish by themselves too: an
//! idle lock leaves no queue behind.
//!
//! The one key that stays is the name's *fence register* `{dlock:<name>}:f`
//! ([`Driver::raise_fence`](dlock_core::Driver::raise_fence); [`RedisDriver::fence_key`]): a decimal
//! number, written by a script of its own that only ever raises it (compared as a string of digits,
//! so every `u64` is exact), with no expiry, in the name's hash tag. Only names used through a
//! [`Quorum`](dlock_core::Quorum) have it — the quorum keeps its fencing tokens there — and nothing
//! else reads it: the lock operations never look at it, so it neither blocks nor changes a grant. It
//! is as durable as the server's data (see [Restarts and persistence](#restarts-and-persistence)); a
//! quorum member that comes back without it must stay down for one TTL, as the quorum's docs say.
//! Nothing else is stored.
//!
//! # Operations
//!
//! Each driver operation is one Lua script, run atomically in one round trip (`EVALSHA`; the script is
//! loaded on first use): enqueue, wait-check, renew, release, convert, inspect. Every script first drops
//! expired entries (by the server's `TIME`), then applies the grant rule, assigns fencing tokens and
//! announces new grants. The rule is a Lua twin of [`dlock_core::grant`] kept in one prelude shared by
//! all scripts; a property test runs random queues through it on a real Redis and through the Rust
//! functions and requires identical answers.
//!
//! Entries are addressed by (name, owner id) only: a client can renew, convert or release no entry but
//! its own, and releasing an entry that is gone succeeds.
//!
//! # Waiting
//!
//! Scripts that grant publish the new holders on the name's channel, each as `owner:mode:token`
//! (`PUBLISH`; on a cluster the sharded `SPUBLISH`, so a wake-up stays on the shard that owns the name
//! instead of crossing the whole cluster bus). Each driver has one subscriber connection (RESP3)
//! shared by all its waiters; a message wakes only the waiters it names, and carries their grant: a
//! waiter takes it as its answer when its token is above the token its entry held at the waiter's
//! last check (so a late message about an earlier grant is never mistaken for the one awaited), and
//! runs no script of its own. A release therefore costs one script and one message, however many
//! wait.
//!
//! Pub/sub may drop messages. So each wait-check also returns how long until the earliest lease among
//! the entries blocking the waiter runs out, and the waiter re-checks then: when a holder crashed, the
//! next waiter is granted as soon as its lease lapses. A poll interval (default 1 s,
//! [`RedisDriverBuilder::poll_interval`]) bounds the sleep in any case, so a lost message costs latency,
//! never a hang. A waiter behind a live holder re-checks about once per renewal of that holder. While
//! the subscriber connection is down (it reconnects and resubscribes by itself; waiters re-check when it
//! drops) or the ACL user may not subscribe, waiters poll, backing off up to that interval.
//!
//! # Cost model
//!
//! Round trips (RTT) and store operations per driver operation, as this driver performs them:
//!
//! | operation | round trips | store operations |
//! |---|---|---|
//! | acquire, granted at once | 1 | one script (`EVALSHA`) |
//! | acquire that waits | 2 (enqueue, the first check), then 1 per wake-up that carries no grant | one script, one wait-check script, then one wait-check per wake-up without a grant (the next lease end in its way, the poll interval, a lost subscriber connection) |
//! | release | 1 | one script, which grants the next entries and publishes one message naming them |
//! | handoff (release → next holder runs) | 1 (release) + ½ (the message, which carries the grant) | one script and one `PUBLISH` |
//! | renewal | the client's keeper renews every lock due within a quarter of the renewal interval together: on a stand-alone server one round trip per batch of up to 1,000 locks, a few batches per TTL/3 however many locks are held; on a cluster, one script per lock, all of a batch sent at once | one script per batch (stand-alone), one per lock (cluster) |
//! | conversion | 1 (granted at once) or 1 + the wait | one script, then as a waiting acquire |
//! | inspect | 1 | one script |
//!
//! A script's work is proportional to the entries queued on its name (it reads the name's hash).
//! Waiters share one subscriber connection per driver; a message wakes only the waiters it names.
//!
//! # Fencing tokens
//!
//! Each grant (and each granted conversion) takes the token `max(last token + 1, server time in µs)`,
//! read with `TIME` inside the script. While a name has entries, the last token is kept in its hash, so
//! tokens strictly increase with every grant on the name, conflicting or not.
//!
//! An idle name must leave no queue behind, so there is no counter key that outlives the lock (a
//! [fence register](#storage), where a name has one, is the quorum's and plays no part in these
//! tokens). Instead,
//! the hash is deleted when its queue empties only if the server clock has already passed the last
//! token — the normal case, as a grant and the release that ends it are separate scripts, microseconds
//! apart. If a burst of grants ran the counter ahead of the clock, the hash keeps just its two counter
//! fields, with a `PEXPIREAT` just past them, until the clock catches up (well under a millisecond).
//! The next grant after the idle period then starts from the clock, above every earlier token, as long
//! as **the Redis host's clock does not step back** across the idle period (see [Clocks](#clocks) for
//! what a step does) — and, after a failover, the new primary's clock is not behind the old one's by
//! more than the time since the last grant. Keep the servers' clocks NTP-slewed, not stepped. Under
//! that assumption the driver declares `fencing_total_order`.
//!
//! Tokens are microseconds since the Unix epoch (about 1.8 × 10^15 in 2026): they fit an `i64`, and
//! stay exact in Lua's doubles until the year 2255.
//!
//! # Guarantees
//!
//! **On one primary** (a standalone server, or the shard owning a name's slot): operations are atomic
//! scripts, so the grant rule holds exactly — no two incompatible modes are granted at once, waiters are
//! served in FIFO order, conversions and deadlock detection follow [`dlock_core::grant`]. Leases expire
//! by the server clock counting from when the request arrived, never before the client's validity
//! deadline (given clock *rates* within core's drift margin, and no clock *steps*: see
//! [Clocks](#clocks)). A crashed holder's entry is dropped when its lease lapses, and the next waiter
//! is granted then (Liveness A); a holder cut off from Redis turns Lost within its TTL and its entry
//! expires by itself (Liveness B). All of this across restarts of the server only if it persists every
//! write before replying: see [Restarts and persistence](#restarts-and-persistence).
//!
//! **Failover with asynchronous replication** (Sentinel, or cluster replicas) can break exclusion: a
//! grant acknowledged by the old primary may not have reached the replica that is promoted, which then
//! grants the same lock again — two holders. Releases and renewals can be lost the same way (harmless:
//! the lease covers them, or the holder turns Lost). Fencing tokens survive this better than the lock
//! itself: the new primary's tokens come from its clock floor, so a resource that rejects stale tokens
//! still rejects the older holder's writes, under the clock assumption above.
//!
//! `WAIT n timeout` after each grant would narrow that window — the client would not use a grant until
//! `n` replicas had it — but it would not close it: Redis's failover may still promote a replica that
//! missed the write, `WAIT` cannot run inside a script (so it costs a second round trip per operation),
//! and a timed-out `WAIT` cannot undo the grant. This driver does not issue `WAIT`; use a
//! consensus-backed store (etcd, or JetStream with three replicas) when a failover must never yield
//! two holders.
//!
//! **Eviction**: run the lock store with `maxmemory-policy noeviction`. Every queue key has a TTL, so a
//! `volatile-*` (or `allkeys-*`) policy may evict held locks under memory pressure, and an `allkeys-*`
//! policy may also evict fence registers, which have none.
//!
//! **In short**, run a Redis that holds locks with:
//!
//! ```text
//! appendonly yes
//! appendfsync always
//! maxmemory-policy noeviction
//! ```
//!
//! and keep its host's clock slewed, never stepped.
//!
//! **Cluster**: each name lives on one shard, with that shard's guarantees; a shard that is down makes
//! its names unavailable (operations fail, holders turn Lost), other names are unaffected. This is not
//! Redlock: there is no majority across shards.
//!
//! # Restarts and persistence
//!
//! Locks are only as durable as the server's data. What a restart (a crash, `kill -9`, a reboot, a
//! deploy) does depends on how the server persists:
//!
//! - **No append-only file** (`appendonly no`, Redis's default; with or without RDB snapshots): the
//!   server comes back empty, or as of its last snapshot. Every grant made since is forgotten while its
//!   holder's guard still reports the lock valid, so the next client is granted at once — two holders
//!   of incompatible modes — until the first holder's next renewal (within a third of its TTL) finds
//!   its entry gone and turns the guard Lost. A snapshot does not help: it brings back leases as they
//!   were when it was taken, which can run out before their holders' validity deadlines. Fencing
//!   tokens do survive: they restart from the server clock, above every earlier token (under the clock
//!   assumption of [Fencing tokens](#fencing-tokens)), so a resource that checks tokens rejects the
//!   old holder's writes — but the lock itself does not hold. The driver does not try to detect this.
//! - **`appendonly yes` with `appendfsync always`**: every script's effects are written and fsynced
//!   to the append-only file before the reply leaves, so whatever a client was told survives a crash
//!   of the process or of the host. After the restart each entry has the lease it had (expiry is kept
//!   as absolute server time) and the downtime counts against it: a holder whose renewals resume
//!   before its validity deadline keeps the lock, one that could not renew in time has turned Lost by
//!   its deadline, before the store can drop its entry. Waiters keep their places. These are the
//!   settings the driver's conformance suite runs with.
//! - **`appendonly yes` with `appendfsync everysec`** (the default once the file is on): the file is
//!   still written before each reply, so a crash of the Redis *process* loses nothing; a crash of the
//!   *host* (kernel panic, power loss, VM killed) loses the writes of up to about the last second (two
//!   when the disk stalls) — grants, renewals and releases — with the effect described above for
//!   those grants. `appendfsync no` leaves flushing to the OS: up to ~30 s on Linux.
//!
//! A restart also drops every connection: operations in flight fail with a retryable
//! [`Error::Backend`](dlock_core::Error::Backend) and the driver reconnects by itself; waiters
//! re-check and keep waiting.
//!
//! # Clocks
//!
//! The scripts read the server's wall clock (`TIME`, which Redis 7 takes from `gettimeofday`, i.e.
//! `CLOCK_REALTIME`), and Redis expires the queue hashes' `PEXPIREAT`s by the same clock, on access
//! and in its background expiry cycle; only the server's internal timers use `CLOCK_MONOTONIC`. The
//! client measures its validity deadline with its own monotonic clock, so a step of the *client's*
//! wall clock changes nothing, while the server's clock must run at the right *rate* (within core's
//! drift margin, 1 % of the TTL plus 2 ms) and must not *step*. What a step of the Redis host's clock
//! does (each found by stepping a real `redis-server`'s clock under libfaketime, and held by a test):
//!
//! - **Forward by D**: every lease on that server loses D at once. An entry with less than D left is
//!   expired by the next script that touches its name (or by Redis expiring the key); the next waiter
//!   is granted at its next check, a new request at once, while the holder's guard still reports the
//!   lock valid: two holders, until the holder's next renewal finds its entry gone and turns the guard
//!   Lost. A live holder renews every TTL/3, so it has about two thirds of its TTL left at the least
//!   (less a round trip, and less again while renewals fail): a smaller step — to be safe, one below
//!   half the TTL — is absorbed by the next renewal, which counts from the new time; a step of a whole
//!   TTL or more breaks every lock held on the server. Tokens keep increasing.
//! - **Back by D**: exclusion holds (leases get longer, not shorter), and tokens keep increasing on
//!   every name that has entries, or whose counters the clock has not passed yet (the hash keeps them
//!   until it does). Two things break. A crashed holder's entry lives D longer by the server's clock,
//!   so the next waiter waits up to TTL + D instead of TTL (Liveness A stretched by D). And a name that
//!   was idle when the clock stepped back has nothing left that remembers its last token, so its next
//!   grant takes its token from the earlier clock: up to D *lower* than tokens issued before the step —
//!   tokens can repeat or go backwards until the clock catches up. A resource that keeps the highest
//!   token it saw then rejects the new holder's writes; one that only compares with the previous
//!   writer's token can accept writes out of order.
//!
//! A clock that ran ahead and is then corrected is a step back by as much as it was ahead. Keep lock
//! servers' clocks slewed (chrony or ntpd, with `makestep` confined to boot), never set by `date -s`
//! or `ntpdate` while the server runs; a VM that is resumed or migrated may also have its clock
//! stepped.
//!
//! # Caveats
//!
//! - A failover with asynchronous replication can grant a lock twice ([Guarantees](#guarantees));
//!   use etcd or JetStream R3 where that must never happen, and fencing tokens in any case.
//! - Locks survive a server restart only with `appendonly yes` and `appendfsync always`
//!   ([Restarts and persistence](#restarts-and-persistence)).
//! - The server's clock must be slewed, never stepped ([Clocks](#clocks)).
//! - Run the server with `maxmemory-policy noeviction`.
//! - A Redis Cluster is not a majority quorum: each name lives on one shard. For a lock that
//!   outlives the loss of a store, use [`Quorum`](dlock_core::Quorum) over independent servers.
#![warn(missing_docs)]

mod conn;
mod driver;
mod lua;
mod pubsub;

pub use driver::{RedisDriver, RedisDriverBuilder};
