//! The five operations on etcd.

use std::sync::Arc;
use std::time::Duration;

use dlock_core::grant::{self, Decision, QueueEntry};
use dlock_core::{
    Enqueued, EntryInfo, EntryKey, EntryRequest, Error, Grant, LockMode, LockName, Queued, Result,
};
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
    TxnResponse, WatchOptions,
};
use tokio::time::Instant;

use crate::entry::{blocks, entry_key, fence_key, name_prefix, Entry, Value, View};
use crate::lease::{Lease, Leases, RefreshError, Why};
use crate::pool::{to_error, CallError, Pool};
use crate::tracked::Table;
use crate::DRIVER;

/// How many times an operation re-reads the queue after its guarded transaction lost a race before
/// it gives up. Each lost race means another client's change went through, so this only runs out
/// under extreme contention on one name.
const MAX_ROUNDS: usize = 64;

pub(crate) struct Inner {
    pub pool: Arc<Pool>,
    pub leases: Leases,
    pub prefix: String,
    pub min_ttl: Duration,
    pub user: Option<String>,
    /// The entries this driver created, and when their own guards last renewed them.
    pub entries: Arc<Table>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.leases.revoke_all_in_background();
    }
}

fn lost(key: &EntryKey) -> Error {
    Error::Lost {
        name: key.name.to_string(),
    }
}

/// The state an entry reports to `enqueue` and `wait`: granted only once no conversion is pending.
fn queued(entry: &Entry) -> Queued {
    match entry.value {
        Value {
            granted: true,
            converting_to: None,
            mode,
            ..
        } => Queued::Granted(Grant {
            mode,
            token: entry.token(),
        }),
        _ => Queued::Waiting,
    }
}

/// The mode a [`queued`] answer grants.
fn granted(queued: Queued) -> Option<LockMode> {
    match queued {
        Queued::Granted(grant) => Some(grant.mode),
        Queued::Waiting => None,
    }
}

/// An answer for an entry on `lease`: the store keeps it from the lease's last confirmed keepalive,
/// which may be earlier than the enqueue (no keepalive is sent when one went out recently).
fn kept_on(lease: &Lease, queued: Queued) -> Enqueued {
    Enqueued {
        queued,
        kept_from: Some(lease.confirmed()),
    }
}

/// The revision a transaction was applied at: the fencing token of a grant it made.
fn revision_of(resp: &TxnResponse) -> Result<i64> {
    // etcd always sends the header; without it there is no token, and a made-up one could break
    // fencing, so this is an error rather than a default.
    resp.header()
        .map(|h| h.revision())
        .filter(|&r| r > 0)
        .ok_or_else(|| {
            Error::backend_msg(DRIVER, "etcd answered a transaction without its revision")
        })
}

impl Inner {
    pub fn new(
        pool: Arc<Pool>,
        leases: Leases,
        prefix: String,
        min_ttl: Duration,
        user: Option<String>,
    ) -> Self {
        Inner {
            entries: Table::new(Arc::clone(&pool), prefix.clone()),
            pool,
            leases,
            prefix,
            min_ttl,
            user,
        }
    }

    fn error(&self, err: CallError) -> Error {
        to_error(err, self.user.as_deref())
    }

    pub fn key_of(&self, key: &EntryKey) -> String {
        entry_key(&self.prefix, key)
    }

    /// Reads a name's queue with a linearizable range read.
    async fn read_view(&self, name: &LockName) -> Result<View, CallError> {
        let prefix = name_prefix(&self.prefix, name);
        let resp = self
            .pool
            .call("read the queue", self.pool.timeout(), |client| {
                let prefix = prefix.clone();
                async move {
                    client
                        .kv_client()
                        .get(prefix, Some(GetOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok(self.view_of(name, revision, resp.kvs()))
    }

    /// The queue in the key-value pairs of a range read of the name's prefix at `revision`.
    fn view_of(&self, name: &LockName, revision: i64, kvs: &[KeyValue]) -> View {
        let prefix = name_prefix(&self.prefix, name);
        let mut entries = Vec::with_capacity(kvs.len());
        for kv in kvs {
            match Entry::from_kv(&prefix, kv) {
                Some(entry) => entries.push(entry),
                None => tracing::debug!(
                    key = %String::from_utf8_lossy(kv.key()),
                    "dlock-etcd: ignoring a key this driver did not write"
                ),
            }
        }
        entries.sort_by_key(|e| e.create_revision);
        self.remove_leftovers(name, &entries);
        View { revision, entries }
    }

    /// Deletes entries on this driver's leases that belong to no guard: a creating transaction that
    /// landed after its caller gave up and released (a delayed request), or a release that never got
    /// through. The reaper would delete them a TTL after their last renewal; this is sooner.
    fn remove_leftovers(&self, name: &LockName, entries: &[Entry]) {
        let leftovers: Vec<(String, i64)> = entries
            .iter()
            .filter(|e| self.leases.is_ours(e.lease))
            .filter(|e| {
                self.entries.is_leftover(&EntryKey {
                    name: name.clone(),
                    owner: e.owner.clone(),
                })
            })
            .map(|e| (e.key.clone(), e.create_revision))
            .collect();
        if leftovers.is_empty() {
            return;
        }
        let pool = Arc::clone(&self.pool);
        tokio::spawn(async move {
            for (key, create_revision) in leftovers {
                tracing::info!(%key, "dlock-etcd: deleting a leftover entry of this client");
                let _ = delete_guarded(&pool, key, create_revision).await;
            }
        });
    }

    async fn txn(&self, what: &'static str, txn: Txn) -> Result<TxnResponse, CallError> {
        self.pool
            .call(what, self.pool.timeout(), |client| {
                let txn = txn.clone();
                async move { client.kv_client().txn(txn).await }
            })
            .await
    }

    /// Holds only while nothing in the name's queue was created or modified since `view` was read.
    /// Deletions pass unnoticed, which is safe: removing entries never makes a granted decision wrong.
    fn unchanged_since(&self, name: &LockName, view: &View) -> Compare {
        Compare::mod_revision(
            name_prefix(&self.prefix, name),
            CompareOp::Less,
            view.revision + 1,
        )
        .with_prefix()
    }

    pub async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued> {
        let started = Instant::now();
        let key = &request.key;
        // The client's lease needs no keepalive of its own here when one was confirmed recently:
        // the answer says the entry is kept from that keepalive on ([`Enqueued::kept_from`]).
        let recent = started.checked_sub(request.ttl / 6).unwrap_or(started);
        let mut lease = self
            .leases
            .acquire(request.ttl, recent)
            .await
            .map_err(|e| self.error(e))?;
        // Tracked before the entry can exist, so it is never mistaken for a leftover.
        self.entries.track(key, &lease, request.ttl);
        let path = self.key_of(key);
        let prefix = name_prefix(&self.prefix, &key.name);
        // On a name nobody holds or waits for, one transaction queues the entry granted; otherwise
        // the same round trip reads the queue the rules below decide on.
        let free = Txn::new()
            .when([Compare::create_revision(prefix.clone(), CompareOp::Equal, 0).with_prefix()])
            .and_then([TxnOp::put(
                path.clone(),
                Value::fresh_grant(request.mode).encode(),
                Some(PutOptions::new().with_lease(lease.id)),
            )])
            .or_else([TxnOp::get(prefix, Some(GetOptions::new().with_prefix()))]);
        let mut first_view = None;
        match self.txn("queue on a free name", free).await {
            Ok(resp) if resp.succeeded() => {
                return self.queued_granted(key, request.mode, &resp, &lease)
            }
            Ok(resp) => {
                let revision = revision_of(&resp)?;
                if let Some(TxnOpResponse::Get(range)) = resp.op_responses().into_iter().next() {
                    first_view = Some(Ok(self.view_of(&key.name, revision, range.kvs())));
                }
            }
            Err(e) if e.is_lease_not_found() => {
                lease = self
                    .replace_lease(key, &lease, request.ttl, started)
                    .await?;
            }
            Err(e) => return Err(self.error(e)),
        }
        for _ in 0..MAX_ROUNDS {
            let view = match first_view.take() {
                Some(view) => view,
                None => self.read_view(&key.name).await,
            }
            .map_err(|e| self.error(e))?;
            if let Some(i) = view.position(&key.owner) {
                // A repeated enqueue (the first answer was lost): report the entry as it is.
                let queued = queued(&view.entries[i]);
                self.entries
                    .created(key, view.entries[i].create_revision, granted(queued));
                return Ok(kept_on(&lease, queued));
            }
            let mut queue = view.queue();
            queue.push(QueueEntry::waiting(u64::MAX, request.mode));
            let absent = Compare::create_revision(path.clone(), CompareOp::Equal, 0);
            let put = |value: Value, lease: &Lease| {
                TxnOp::put(
                    path.clone(),
                    value.encode(),
                    Some(PutOptions::new().with_lease(lease.id)),
                )
            };
            let mut try_waiting = request.wait;
            if grant::grantable(&queue, queue.len() - 1) {
                let txn = Txn::new()
                    .when([self.unchanged_since(&key.name, &view), absent.clone()])
                    .and_then([put(Value::fresh_grant(request.mode), &lease)]);
                match self.txn("queue a granted entry", txn).await {
                    Ok(resp) if resp.succeeded() => {
                        return self.queued_granted(key, request.mode, &resp, &lease)
                    }
                    // The queue changed under us. A blocking request just queues (its `wait` will
                    // grant it); `try_acquire` looks again.
                    Ok(_) => {}
                    Err(e) if e.is_lease_not_found() => {
                        lease = self
                            .replace_lease(key, &lease, request.ttl, started)
                            .await?;
                        continue;
                    }
                    Err(e) => return Err(self.error(e)),
                }
            } else if !request.wait {
                self.entries.forget(key);
                return Err(Error::WouldBlock {
                    name: key.name.to_string(),
                });
            } else {
                try_waiting = true;
            }
            if try_waiting {
                let txn = Txn::new()
                    .when([absent])
                    .and_then([put(Value::waiting(request.mode), &lease)]);
                match self.txn("queue a waiting entry", txn).await {
                    Ok(resp) if resp.succeeded() => {
                        self.entries.created(key, revision_of(&resp)?, None);
                        return Ok(kept_on(&lease, Queued::Waiting));
                    }
                    // The entry exists already (an earlier attempt landed): the next read finds it.
                    Ok(_) => {}
                    Err(e) if e.is_lease_not_found() => {
                        lease = self
                            .replace_lease(key, &lease, request.ttl, started)
                            .await?;
                    }
                    Err(e) => return Err(self.error(e)),
                }
            }
        }
        if !request.wait {
            self.entries.forget(key);
        }
        Err(Error::backend_msg(
            DRIVER,
            format!(
                "gave up queueing for lock {:?} after {MAX_ROUNDS} attempts: its queue kept changing",
                key.name
            ),
        ))
    }

    /// The answer to a transaction that put `key`'s entry granted in `mode` on `lease`: its revision
    /// is the fencing token.
    fn queued_granted(
        &self,
        key: &EntryKey,
        mode: LockMode,
        resp: &TxnResponse,
        lease: &Lease,
    ) -> Result<Enqueued> {
        let revision = revision_of(resp)?;
        self.entries.created(key, revision, Some(mode));
        Ok(kept_on(
            lease,
            Queued::Granted(Grant {
                mode,
                token: revision as u64,
            }),
        ))
    }

    /// The lease expired between its renewal and the write that attaches an entry to it: a rare race,
    /// answered with a fresh lease.
    async fn replace_lease(
        &self,
        key: &EntryKey,
        old: &Arc<Lease>,
        ttl: Duration,
        started: Instant,
    ) -> Result<Arc<Lease>> {
        old.mark_lost(Why::Gone);
        let lease = self
            .leases
            .acquire(ttl, started)
            .await
            .map_err(|e| self.error(e))?;
        self.entries.moved(key, &lease);
        Ok(lease)
    }

    pub async fn wait(&self, key: &EntryKey) -> Result<Grant> {
        let mut backoff = Duration::from_millis(20);
        loop {
            match self.wait_step(key).await {
                Ok(Some(grant)) => {
                    self.entries.granted(key, grant.mode);
                    return Ok(grant);
                }
                Ok(None) => backoff = Duration::from_millis(20),
                Err(Step::Final(err)) => return Err(err),
                Err(Step::Retry(err)) => {
                    // The store is unreachable or in an election; core ends the wait when the lease
                    // runs out, so keep trying until then.
                    tracing::debug!(name = %key.name, error = %err, "dlock-etcd: waiting: store unavailable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// One look at the queue: grant the entry if the rule allows, else watch one key whose change can
    /// unblock it. `Ok(None)` means "look again".
    async fn wait_step(&self, key: &EntryKey) -> Result<Option<Grant>, Step> {
        let lease = self
            .entries
            .live_lease(key)
            .ok_or_else(|| Step::Final(lost(key)))?;
        let view = self.read_view(&key.name).await.map_err(Step::retry)?;
        let Some(i) = view.position(&key.owner) else {
            self.entries.forget(key);
            return Err(Step::Final(lost(key)));
        };
        let me = &view.entries[i];
        if let Queued::Granted(grant) = queued(me) {
            return Ok(Some(grant));
        }
        if lease.is_lost() {
            // Granting an entry nobody renews would only block the name until it expires.
            return Err(Step::Final(lost(key)));
        }
        let queue = view.queue();
        let grant_now = match me.value.converting_to {
            None => grant::grantable(&queue, i).then_some(me.value.mode),
            // Conversions settle one at a time in queue order: this one goes when it is the next.
            Some(target) => {
                (grant::decide(&queue).first() == Some(&Decision::Convert(i))).then_some(target)
            }
        };
        if let Some(mode) = grant_now {
            let txn = Txn::new()
                .when([
                    self.unchanged_since(&key.name, &view),
                    Compare::create_revision(me.key.clone(), CompareOp::Equal, me.create_revision),
                ])
                .and_then([TxnOp::put(
                    me.key.clone(),
                    Value::fresh_grant(mode).encode(),
                    Some(PutOptions::new().with_ignore_lease()),
                )]);
            let resp = self.txn("grant", txn).await.map_err(Step::retry)?;
            if resp.succeeded() {
                return Ok(Some(Grant {
                    mode,
                    token: revision_of(&resp).map_err(Step::Final)? as u64,
                }));
            }
            return Ok(None);
        }
        let (watched, filter) = match blocker(&view, i) {
            Some((j, filter)) => (
                Some((view.entries[j].key.clone(), view.entries[j].create_revision)),
                filter.then_some((me.value, i, j)),
            ),
            None => (None, None),
        };
        self.watch_for_change(&key.name, watched, view.revision, filter)
            .await
            .map_err(Step::retry)?;
        Ok(None)
    }

    /// Waits until `watched` (or, if `None`, anything in the name's queue) changes after `revision`.
    /// With a `filter` `(me, i, j)`, puts after which the watched entry (at index `j`) still blocks
    /// `me` (at index `i`) are skipped: a predecessor being granted changes nothing for its
    /// successor, and waking it would only cost a read.
    ///
    /// A watched entry (given with its create revision) is watched from the store's current revision
    /// rather than from `revision + 1`. etcd delivers events to a watch that starts in the past only
    /// from a catch-up loop that runs every 100 ms, so whenever anything in the store was written
    /// between the read and the watch, a release would reach the waiter up to 100 ms late. The
    /// revisions in between are covered by reading the entry once the watch is in place.
    async fn watch_for_change(
        &self,
        name: &LockName,
        watched: Option<(String, i64)>,
        revision: i64,
        filter: Option<(Value, usize, usize)>,
    ) -> Result<(), CallError> {
        let (key, options) = match &watched {
            Some((key, _)) => (key.clone(), WatchOptions::new()),
            None => (
                name_prefix(&self.prefix, name),
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        };
        let mut stream = self
            .pool
            .call("watch", self.pool.timeout(), |client| {
                let (key, options) = (key.clone(), options.clone());
                async move { client.watch_client().watch(key, Some(options)).await }
            })
            .await?;
        // Whether a put of `value` leaves `me` blocked, so that waking would change nothing.
        let still_blocks = |value: &[u8]| {
            filter.is_some_and(|(me, i, j)| {
                Value::decode(value).is_some_and(|other| blocks(&me, i, &other, j))
            })
        };
        loop {
            let Some(resp) = stream.message().await.map_err(CallError::Refused)? else {
                return Ok(());
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    // History up to our revision is gone: a fresh read has a newer revision.
                    return Ok(());
                }
                // The member lost its leader, or refuses the watch: look again after a pause
                // rather than in a tight loop.
                return Err(CallError::Unavailable(format!(
                    "etcd cancelled the watch: {}",
                    resp.cancel_reason()
                )));
            }
            if let (true, Some((key, create_revision))) = (resp.created(), &watched) {
                // The watch reports every change after the revision in this header; changes
                // between the read and that revision are looked for with a read made after it.
                // Without a header, assume there may be some.
                let from = resp.header().map_or(i64::MAX, |h| h.revision());
                if from > revision {
                    let now = self
                        .pool
                        .call("read the watched entry", self.pool.timeout(), |client| {
                            let key = key.clone();
                            async move { client.kv_client().get(key, None).await }
                        })
                        .await?;
                    let changed = match now.kvs().first() {
                        None => true,
                        Some(kv) if kv.create_revision() != *create_revision => true,
                        Some(kv) => kv.mod_revision() > revision && !still_blocks(kv.value()),
                    };
                    if changed {
                        return Ok(());
                    }
                }
            }
            for event in resp.events() {
                let still_blocked = event.event_type() == EventType::Put
                    && event.kv().is_some_and(|kv| still_blocks(kv.value()));
                if !still_blocked {
                    return Ok(());
                }
            }
        }
    }

    pub async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant> {
        let lease = self.entries.live_lease(key).ok_or_else(|| lost(key))?;
        // A keepalive sent in the last sixth of the TTL is fresh enough: the keeper asks again a
        // third of the TTL after the instant returned, so keepalives stay 1/6 to 1/3 TTL apart
        // however many locks share the lease.
        let window = lease.ttl.min(ttl) / 6;
        let now = Instant::now();
        let min_sent = now.checked_sub(window).unwrap_or(now);
        match lease.refresh(min_sent).await {
            Ok(sent) => {
                // Recorded as the entry's own renewal only now, later than the `sent` its guard
                // counts from, so the reaper's deadline (this instant + TTL) is past the guard's
                // validity window. Refused when the reaper took the entry while the keepalive was out.
                if self.entries.renewed(key, ttl) {
                    Ok(sent)
                } else {
                    Err(lost(key))
                }
            }
            Err(RefreshError::Lost) => {
                self.entries.forget(key);
                Err(lost(key))
            }
            Err(RefreshError::Unavailable(message)) => Err(Error::backend_msg(DRIVER, message)),
        }
    }

    pub async fn release(&self, key: &EntryKey) -> Result<()> {
        // The entry stays known until etcd confirms the delete: if this release gives up, the
        // reaper deletes it a TTL after its last renewal, although other locks renew the lease.
        let known = self.entries.release(key);
        delete_entry(&self.pool, self.key_of(key), known)
            .await
            .map_err(|e| self.error(e))?;
        self.entries.forget(key);
        Ok(())
    }

    pub async fn convert(&self, key: &EntryKey, mode: LockMode) -> Result<Queued> {
        let (queued, held) = self.convert_in_store(key, mode).await?;
        // A fence of this entry compares the mode held from now on.
        let held = match queued {
            Queued::Granted(grant) => grant.mode,
            Queued::Waiting => held,
        };
        self.entries.granted(key, held);
        Ok(queued)
    }

    /// Converts the entry in etcd; returns the answer for core and the mode held meanwhile.
    async fn convert_in_store(&self, key: &EntryKey, mode: LockMode) -> Result<(Queued, LockMode)> {
        for _ in 0..MAX_ROUNDS {
            let view = self.read_view(&key.name).await.map_err(|e| self.error(e))?;
            let Some(i) = view.position(&key.owner) else {
                self.entries.forget(key);
                return Err(lost(key));
            };
            let me = &view.entries[i];
            if !me.value.granted {
                return Err(Error::backend_msg(
                    DRIVER,
                    format!("cannot convert lock {:?}: it is not granted yet", key.name),
                ));
            }
            let mine =
                Compare::create_revision(me.key.clone(), CompareOp::Equal, me.create_revision);
            let held = Grant {
                mode: me.value.mode,
                token: me.token(),
            };
            let write = |value: Value| {
                TxnOp::put(
                    me.key.clone(),
                    value.encode(),
                    Some(PutOptions::new().with_ignore_lease()),
                )
            };
            if mode == held.mode {
                if me.value.converting_to.is_none() {
                    return Ok((Queued::Granted(held), held.mode));
                }
                // Withdrawing a pending conversion only relaxes others' constraints: no queue guard,
                // but the entry must still be the one read, so its token is carried over correctly.
                let unchanged =
                    Compare::mod_revision(me.key.clone(), CompareOp::Equal, me.mod_revision);
                let value = Value {
                    mode: held.mode,
                    granted: true,
                    token: Some(held.token),
                    converting_to: None,
                };
                let txn = Txn::new().when([mine, unchanged]).and_then([write(value)]);
                if self
                    .txn("withdraw a conversion", txn)
                    .await
                    .map_err(|e| self.error(e))?
                    .succeeded()
                {
                    return Ok((Queued::Granted(held), held.mode));
                }
                continue;
            }
            let queue = view.queue();
            if grant::conversion_deadlocks(&queue, i, mode) {
                return Err(Error::ConversionDeadlock {
                    name: key.name.to_string(),
                    from: held.mode,
                    to: mode,
                });
            }
            let mut asked = queue;
            asked[i].converting_to = Some(mode);
            let now = grant::decide(&asked).first() == Some(&Decision::Convert(i));
            let value = if now {
                Value::fresh_grant(mode)
            } else {
                Value {
                    mode: held.mode,
                    granted: true,
                    token: Some(held.token),
                    converting_to: Some(mode),
                }
            };
            // Guarded on the whole queue: the deadlock check and the grant decision hold only for the
            // queue they were made on.
            let txn = Txn::new()
                .when([self.unchanged_since(&key.name, &view), mine])
                .and_then([write(value)]);
            let resp = self.txn("convert", txn).await.map_err(|e| self.error(e))?;
            if resp.succeeded() {
                let queued = if now {
                    Queued::Granted(Grant {
                        mode,
                        token: revision_of(&resp)? as u64,
                    })
                } else {
                    Queued::Waiting
                };
                return Ok((queued, held.mode));
            }
        }
        Err(Error::backend_msg(
            DRIVER,
            format!(
                "gave up converting lock {:?} after {MAX_ROUNDS} attempts: its queue kept changing",
                key.name
            ),
        ))
    }

    pub async fn inspect(&self, name: &LockName) -> Result<Vec<EntryInfo>> {
        let view = self.read_view(name).await.map_err(|e| self.error(e))?;
        Ok(view.entries.iter().map(Entry::info).collect())
    }

    /// Raises the name's fence register (`<prefix>/<encoded name>.fence`, a decimal number with no
    /// lease) to at least `floor`: a linearizable read, then, if it is lower, a put guarded on the
    /// key's mod revision (version 0 while it is absent), so a concurrent raise is never undone; a
    /// lost race reads the winner's value from the same transaction and goes again.
    pub async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64> {
        let key = fence_key(&self.prefix, name);
        let resp = self
            .pool
            .call("read the fence register", self.pool.timeout(), |client| {
                let key = key.clone();
                async move { client.kv_client().get(key, None).await }
            })
            .await
            .map_err(|e| self.error(e))?;
        let mut current = fence_value(name, resp.kvs().first())?;
        for _ in 0..MAX_ROUNDS {
            let (value, mod_revision) = current;
            if value >= floor {
                return Ok(value);
            }
            // A put repeated on another member after a lost answer fails this guard, and the
            // re-read below then finds the value it wrote.
            let guard = if mod_revision == 0 {
                Compare::version(key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key.clone(), CompareOp::Equal, mod_revision)
            };
            let txn = Txn::new()
                .when([guard])
                .and_then([TxnOp::put(key.clone(), floor.to_string(), None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = self
                .txn("raise the fence register", txn)
                .await
                .map_err(|e| self.error(e))?;
            if resp.succeeded() {
                return Ok(floor);
            }
            let found = resp.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => Some(get),
                _ => None,
            });
            current = match found {
                Some(get) => fence_value(name, get.kvs().first())?,
                None => {
                    return Err(Error::backend_msg(
                        DRIVER,
                        "etcd answered a failed transaction without its read",
                    ))
                }
            };
        }
        Err(Error::backend_msg(
            DRIVER,
            format!(
                "gave up raising the fence register of lock {name:?} after {MAX_ROUNDS} attempts: it kept changing"
            ),
        ))
    }
}

/// A fence register's value and mod revision (`(0, 0)` when absent).
fn fence_value(name: &LockName, kv: Option<&etcd_client::KeyValue>) -> Result<(u64, i64)> {
    let Some(kv) = kv else {
        return Ok((0, 0));
    };
    let value = std::str::from_utf8(kv.value())
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Error::backend_msg(
                DRIVER,
                format!(
                    "the fence register of lock {name:?} holds {:?}, not a number",
                    String::from_utf8_lossy(kv.value())
                ),
            )
        })?;
    Ok((value, kv.mod_revision()))
}

/// How one wait step failed.
enum Step {
    /// The answer (`Lost`).
    Final(Error),
    /// Store trouble; look again after a pause.
    Retry(String),
}

impl Step {
    fn retry(err: CallError) -> Self {
        Step::Retry(format!("{err:?}"))
    }
}

/// Deletes the entry at `key`: the one created at `create_revision`, or, when that is unknown (the
/// creating transaction never answered, or this is a repeated release), whichever entry the key
/// holds now (keys are unique per acquire, so it can only be this one). Succeeds when it is gone.
pub(crate) async fn delete_entry(
    pool: &Pool,
    key: String,
    create_revision: Option<i64>,
) -> Result<(), CallError> {
    let create_revision = match create_revision {
        Some(revision) => revision,
        None => {
            let resp = pool
                .call("read an entry", pool.timeout(), |client| {
                    let key = key.clone();
                    async move { client.kv_client().get(key, None).await }
                })
                .await?;
            match resp.kvs().first() {
                Some(kv) => kv.create_revision(),
                None => return Ok(()),
            }
        }
    };
    delete_guarded(pool, key, create_revision).await
}

/// Deletes `key` only if it is still the entry created at `create_revision`: a repeated or late
/// release can never remove a newer entry that happens to have the same key.
async fn delete_guarded(pool: &Pool, key: String, create_revision: i64) -> Result<(), CallError> {
    let txn = Txn::new()
        .when([Compare::create_revision(
            key.clone(),
            CompareOp::Equal,
            create_revision,
        )])
        .and_then([TxnOp::delete(key, None)]);
    pool.call("release", pool.timeout(), |client| {
        let txn = txn.clone();
        async move { client.kv_client().txn(txn).await }
    })
    .await
    .map(|_| ())
}

/// The entry whose change can unblock the entry at `i`, and whether puts that leave it blocking can
/// be skipped. `None` only if nothing blocks it (then anything in the queue is watched).
///
/// A waiting entry watches its newest conflicting predecessor (or, failing that, a later holder that
/// converted up): when a holder leaves, only the next conflicting waiter wakes, not the whole queue.
/// A pending conversion watches the newest conflicting holder, or the earlier conversion that must
/// settle first.
fn blocker(view: &View, i: usize) -> Option<(usize, bool)> {
    let entries = &view.entries;
    let me = &entries[i].value;
    let blocking = |j: &usize| *j != i && blocks(me, i, &entries[*j].value, *j);
    if me.granted {
        if let Some(j) = (0..entries.len()).rev().find(blocking) {
            return Some((j, true));
        }
        return match grant::decide(&view.queue()).first() {
            Some(&Decision::Convert(j)) if j != i => Some((j, false)),
            _ => None,
        };
    }
    (0..i)
        .rev()
        .find(blocking)
        .or_else(|| (i + 1..entries.len()).find(blocking))
        .map(|j| (j, true))
}
