//! NATS JetStream driver for [dlock](https://docs.rs/dlock-rs): the six DLM lock modes, fair FIFO queues,
//! fencing tokens from stream sequences and per-entry leases, on a single server (R1 stream) or a
//! cluster (R3), on NATS 2.9 and newer.
//!
//! ```no_run
//! # async fn demo() -> dlock_core::Result<()> {
//! let driver = dlock_jetstream::JetStreamDriver::connect("nats://127.0.0.1:4222").await?;
//! let locks = dlock_core::Locks::new(driver);
//! let guard = locks.lock("stock/42").await?;
//! # drop(guard); Ok(()) }
//! ```
//!
//! With the `dlock` facade, `dlock::connect(url)` picks this driver for `nats://` and `tls://` URLs.
//!
//! # URLs
//!
//! `nats://[USER:PASSWORD@|TOKEN@]HOST[:PORT][,HOST[:PORT]…][?PARAMS]`, or `tls://…` to require TLS.
//! The port defaults to 4222; several hosts are seeds of one cluster. Credentials are
//! percent-encoded (`@` is `%40`); a user-info part without `:` is a token. Parameters:
//!
//! | parameter | default | meaning |
//! |---|---|---|
//! | `stream=NAME` | `DLOCK` | the lock stream |
//! | `prefix=a.b` | `dlock` | its subjects are `PREFIX.>` |
//! | `replicas=N` | 1 (or what the stream has) | replicas when creating the stream; an existing stream with another count is refused |
//! | `lease=auto\|ttl\|clock` | `auto` | lease mode for a new stream (see [Leases](#leases)); `ttl` needs 2.11+ |
//! | `creds=PATH` | | a NATS creds file (JWT + NKey seed) |
//! | `tls=true`, `ca=PATH` | | require TLS; trust the CA certificate(s) in `PATH` (PEM) |
//! | `cert=PATH&key=PATH` | | client certificate and key (PEM) for mutual TLS |
//! | `timeout_ms=N` | 5000 | connect and request timeout |
//! | `clock_skew_ms=N` | 250 | client-clock mode: the largest clock difference assumed between cluster servers |
//! | `recheck_ms=N` | 5000 | a waiter re-reads its queue this often even without a change notification |
//! | `discover=false` | `true` | do not connect to servers the cluster advertises, only to the listed ones |
//!
//! Wrong credentials fail at connect with an error saying that authentication failed; unknown
//! parameters are refused, so a typo cannot silently change behaviour.
//!
//! # Stream layout
//!
//! The driver creates its own stream (plain JetStream API, not the key-value helpers, which fail
//! against 2.9 servers) and checks an existing one: subjects `PREFIX.>`, limits retention with no
//! age, count or size limits, `max_msgs_per_subject` 1 (32 where writes are verified, see below),
//! `allow_direct` off, `deny_purge` off; on 2.11+ also `allow_msg_ttl` and
//! `subject_delete_marker_ttl`. Per lock name, with `T` = [`LockName::encoded`](dlock_core::LockName::encoded)
//! (only `[A-Za-z0-9_%-]`, so `.`, `*`, `>`, spaces or unicode can neither merge names nor leave the
//! namespace):
//!
//! | subject | content |
//! |---|---|
//! | `PREFIX.T._q` | the queue head: every entry's owner, queue position, mode, grant, pending conversion and fencing token, plus the full name (JSON) |
//! | `PREFIX.T.OWNER` | one entry's lease: its TTL and the sequence of its first message (JSON) |
//! | `PREFIX._clock` | client-clock mode only: written to learn the server's time |
//! | `PREFIX.T._fence.r` | the name's *fence register* (names used through a [`Quorum`](dlock_core::Quorum) only): a number that only grows, with the full name (JSON) |
//!
//! The fence register ([`Driver::raise_fence`](dlock_core::Driver::raise_fence)) has one token more
//! than a name's head and entries, so the name's watch (`PREFIX.T.*`) never delivers it and no read
//! of the queue looks at it; the stream's `PREFIX.>` covers it. Its messages carry no `Nats-TTL`
//! and the stream has no age limit, so it never expires, and it is kept across restarts with the
//! stream (file storage) — except on replicated streams on NATS before 2.9.18: their recovery
//! replays a subject-filtered purge (this driver purges an entry's subject on every release) as a
//! purge of the whole stream up to that purge's sequence (nats-io/nats-server#4196, fixed in
//! 2.9.18), so every older message is gone after a restart, registers and queues alike (measured
//! on 2.9.10 R3: after a release and a restart of the cluster every register read 0). It is the one
//! subject an idle name keeps. A raise reads the register through the leader and, when it is
//! lower, writes the new value with `Nats-Expected-Last-Subject-Sequence` on the message read; a
//! lost compare-and-set reads again.
//!
//! Names whose encoding is longer than 192 bytes use `T` = `%H` + the SHA-256 of the name in hex
//! instead (NATS caps a protocol line, and so a subject, at 4 KiB by default). `%H` never starts an
//! encoding, and every read compares the full name stored in the head with the name asked for, so
//! even a digest collision is reported as an error instead of merging two locks.
//!
//! # Operations
//!
//! - **Queue order** is the stream sequence of an entry's first message (`seq` in
//!   [`EntryInfo`](dlock_core::EntryInfo)).
//! - **Every decision** reads the head and the entries it lists through the stream leader
//!   (`$JS.API.STREAM.MSG.GET`, last message by subject; never a direct get, which a lagging follower
//!   may answer), drops entries whose lease ended, applies the operation and
//!   [`dlock_core::grant`], and writes the new head with `Nats-Expected-Last-Subject-Sequence`. Every
//!   grant on a name therefore passes through one compare-and-set on one subject: two clients with
//!   stale views cannot both grant conflicting entries; the loser re-reads and decides again.
//!   Within one client, the operations that change a name's queue (queue, release, convert) take
//!   turns on it, so a crowd of one client's tasks costs each of them one read and one write, not
//!   one lost compare-and-set per rival; waiters only looking run side by side.
//! - **Fencing tokens** are the stream sequence of the head write that made the grant (for a
//!   conversion: that granted the conversion). They increase along every chain of conflicting holders
//!   (`fencing`), but compatible entries granted by one write share a token, so `fencing_total_order`
//!   is not claimed. Deleting the stream restarts sequences, and with them tokens.
//! - **Release** purges the owner's entry subject, then removes the entry from the head. A retried or
//!   stale release only ever touches its own entry.
//! - **Renewal** rewrites the entry with compare-and-set on its last sequence; an entry that was
//!   removed cannot be renewed back to life. `renew` returns the local instant taken just before the
//!   successful renewal was sent.
//! - **Waiting**: waiters of a name share one ordered push consumer per client (filtered to the name's
//!   subjects, headers only, new messages only) and re-check on every head write or delete marker;
//!   renewals do not wake them. Besides, a waiter wakes when the next lease in its queue ends (client-
//!   clock mode), and every `recheck_ms` as a backstop. Dropping `wait` only drops a subscription.
//!
//! # Cost model
//!
//! Round trips (RTT) and JetStream requests per driver operation, as this driver performs them
//! (`k` = entries in the name's queue; reads go through the stream leader):
//!
//! | operation | round trips | JetStream requests |
//! |---|---|---|
//! | acquire, granted at once | 3 (4 when other entries are queued) | publish the entry; read the head, then the `k` entries it lists (all at once); publish the new head with compare-and-set |
//! | acquire that waits | as above, then 1–2 per head change until granted | as above; then per wake-up a read of the head and its entries; waiters share one push consumer per client and name |
//! | release | 3 (4 when other entries are queued) | purge the entry's subject; read the head and its entries; publish the head without it |
//! | handoff (release → next holder runs) | the release + ½ (head change delivered) + 2 | the release's requests, then the waiter's read of the head and its entries |
//! | renewal | 1 per held lock every TTL/3; the client's keeper sends the renewals that fall due together, so they travel in parallel, but JetStream has no write of several subjects in one request | one publish with compare-and-set per held lock |
//! | conversion | 2–3, then as a waiting acquire | read the head and its entries; publish the head |
//! | inspect | 1–2 (+ 1 clock write on 2.9/2.10) | read the head and its entries |
//!
//! A lost compare-and-set (another client wrote the head meanwhile) costs one more read and write.
//! On NATS 2.9/2.10 clusters every write is checked after the fact (one more read).
//!
//! # Leases
//!
//! The mode is picked when the stream is created (by server version, or `lease=`) and read back from
//! the stream by every client, so all clients of a stream agree.
//!
//! **Server TTL (NATS 2.11+).** Every entry message carries `Nats-TTL` (the lease rounded *up* to whole
//! seconds, since the server counts whole seconds), so the server removes an entry whose holder stopped
//! renewing, counting from when it stored the last renewal, and writes a subject delete marker that
//! the waiters' consumers deliver at once. An entry is live while its message exists. No client clock
//! is involved. The shortest TTL is 1 s.
//!
//! **Client clock (NATS 2.9/2.10).** There is no per-message TTL, and a stream-wide `max_age` would
//! also age out the queue head of a lock held longer than it, so no age limit is used. Each entry
//! stores its TTL; it counts as expired once a *server* timestamp later than the entry's last write
//! plus TTL plus `clock_skew_ms` has been seen: the timestamps of the messages read for the decision,
//! and, when a waiter wakes for an expiry, the timestamp of a message it writes to `PREFIX._clock`
//! just then. Local clocks are never compared with server clocks. An expired entry is removed with a
//! purge bounded by the sequence that was judged (a renewal that got in first survives it) before the
//! head forgets it. Assumptions: the servers' wall clocks run at the rate of real time (NTP slewing
//! is fine), do not jump, and differ between cluster members by less than `clock_skew_ms` (the
//! leader that stamps a renewal and the one whose later timestamp judges it may differ after a
//! failover). A holder's validity window ends TTL minus the core's drift margin after it *sent* its
//! last renewal, and the server stamps that renewal later, so the store never frees the lock inside
//! the window under these assumptions. The shortest TTL is 100 ms. Clients that crash between writing
//! their entry and adding it to the head leave a small message that nothing reads; the next release
//! of that name does not remove it (there is no age limit), which is the price of not aging out
//! heads.
//!
//! # Guarantees
//!
//! - **Single server (R1)**: every write is compare-and-set on one server; the guarantees of the
//!   dlock model hold as long as the server's store does (it persists to disk; a server restart keeps
//!   the locks, with leases still counted in its time).
//! - **Cluster (R3)**: the stream survives the loss of one server. While a new stream leader is
//!   elected (a few seconds), operations fail or wait; holders whose renewals fail for longer than
//!   their validity window see `lost()`, waiters keep waiting, and nothing is granted twice, because
//!   every grant is a replicated compare-and-set. A partitioned old leader cannot complete writes, so
//!   it can at most make a client retry.
//! - **NATS 2.9 clusters**: these servers do not enforce `Nats-Expected-Last-Subject-Sequence` between
//!   writes in flight at the same time (measured on 2.9.10 R3: most rounds of four racing writers had
//!   several winners; single servers and 2.11+ clusters had none). On replicated streams before 2.11
//!   the driver therefore keeps 32 messages per subject and checks every write after the fact: a head
//!   write counts only if it is the first message on the subject after the head it replaced (the
//!   stream's order is the same for every reader, so all agree on the winner, and readers skip the
//!   losers); a renewal counts only if it directly follows the entry's previous message and that
//!   message still exists (it was not purged as expired first). This assumes fewer than 32 writers
//!   race on one name within one replication round.
//! - **Fence registers on NATS 2.9/2.10 clusters** are checked the same way: each register message
//!   names the message its writer read (its base), a raise counts only if its message is the first
//!   on the subject after its base (else it reads again and retries), and readers take the value of
//!   the last message that counts. Two raises racing from the same read therefore never lower the
//!   register: the first to land counts. One case remains. A raise whose message is still on its
//!   way to being stored while two or more later raises of the same register *complete* (each
//!   reading the one before) lands after them and does not count — but from then on readers fall
//!   back to the value of the first raise after the message the late writer had read, so the
//!   register reads lower than what the latest completed raise returned, until a raise goes above
//!   it again (the late raise itself, when it retries, writes no more than its own floor). Through a
//!   quorum this takes raises of one member that overlap in time: two grants holding that member at
//!   once (compatible modes), or a grant whose fence call timed out and was given back while its
//!   write was still queued. A later conflicting grant whose majority shares only that member with
//!   the majority of the higher raise may then get a token no higher than the one that raise gave
//!   its holder. JetStream quorum members on NATS 2.11+, or on an R1 stream, are not affected:
//!   there the server enforces the compare-and-set, so a raise never undoes another.
//! - **Atomicity A** (no incompatible holders) holds across failovers as above; **liveness**: a
//!   crashed holder's lock is granted to the next waiter within its TTL (rounded up to whole seconds
//!   on 2.11+) plus the delivery of the delete marker, or plus `clock_skew_ms` and one read on 2.9.
//!
//! # Caveats
//!
//! - NATS 2.9/2.10 has no per-message TTL: leases are judged by server timestamps and rely on the
//!   servers' clocks ([Leases](#leases)); prefer NATS 2.11+.
//! - Replicated streams before NATS 2.9.18 can lose every message on a restart of the cluster
//!   (nats-io/nats-server#4196; [Stream layout](#stream-layout)).
//! - Compatible holders granted by one head write share a fencing token (`fencing_total_order` is
//!   not claimed); deleting the stream restarts tokens.
//! - While a new stream leader is elected, operations stall or fail and are retried
//!   ([Guarantees](#guarantees)).
#![warn(missing_docs)]

mod config;
mod driver;
mod layout;
mod watch;

pub use config::LeaseMode;
pub use driver::JetStreamDriver;
