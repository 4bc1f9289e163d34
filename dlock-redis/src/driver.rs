//! The driver: the six operations as script calls, and the waiting loop.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dlock_core::{
    Capabilities, Driver, Enqueued, EntryInfo, EntryKey, EntryRequest, Error, Grant, LockMode,
    LockName, OwnerId, Queued, Renewal, Result,
};
use redis::Value;
use tokio::time::Instant;

use crate::conn::{self, Commands, Timeouts, DRIVER};
use crate::lua::Scripts;
use crate::pubsub::{Registry, Wakeups};

const DEFAULT_PREFIX: &str = "dlock";

/// Locks kept in Redis (standalone or Redis Cluster). Cheap to clone: clones share the connections.
///
/// See the [crate docs](crate) for URLs, the key layout and the guarantees.
#[derive(Clone)]
pub struct RedisDriver {
    inner: Arc<Inner>,
}

struct Inner {
    commands: Commands,
    wakeups: Arc<Wakeups>,
    scripts: Scripts,
    prefix: String,
    poll_interval: Duration,
    /// Also bounds how long a waiter waits for its subscription before it checks anyway.
    response_timeout: Duration,
    cluster: bool,
    capabilities: Capabilities,
    server_version: Option<String>,
}

impl fmt::Debug for RedisDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDriver")
            .field("key_prefix", &self.inner.prefix)
            .field("cluster", &self.inner.cluster)
            .field("poll_interval", &self.inner.poll_interval)
            .finish_non_exhaustive()
    }
}

/// Options for [`RedisDriver`]; obtained from [`RedisDriver::builder`].
#[derive(Clone, Debug)]
pub struct RedisDriverBuilder {
    url: String,
    key_prefix: Option<String>,
    poll_interval: Duration,
    timeouts: Timeouts,
}

impl RedisDriverBuilder {
    /// The first part of every key and channel (default `dlock`, or the URL's `key_prefix`), so that
    /// several applications can share one Redis. ASCII letters, digits, `-`, `_`, `.` and `:` only.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = Some(prefix.into());
        self
    }

    /// The longest a waiter sleeps between checks when no wake-up message arrives (default 1 s).
    ///
    /// Wake-ups normally come by pub/sub, or when the lease of what blocks the waiter runs out; this
    /// bound only matters when a message was lost.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How long one request may go unanswered before it fails (default 2 s).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.response = timeout;
        self
    }

    /// How long establishing a connection may take (default 2 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.connect = timeout;
        self
    }

    /// Connects: checks the credentials and the server version, then opens the command connection and
    /// the subscriber connection.
    pub async fn connect(self) -> Result<RedisDriver> {
        let target = conn::parse(&self.url)?;
        let prefix = self
            .key_prefix
            .or_else(|| target.key_prefix.clone())
            .unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        check_prefix(&self.url, &prefix)?;
        let registry = Arc::new(Registry::default());
        let weak = Arc::downgrade(&registry);
        let connected = conn::connect(&target, self.timeouts, move |push| {
            if let Some(registry) = weak.upgrade() {
                registry.dispatch(push);
            }
        })
        .await?;
        let scripts = Scripts::new(if target.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        });
        Ok(RedisDriver {
            inner: Arc::new(Inner {
                commands: connected.commands,
                wakeups: Wakeups::new(registry, connected.subscriber),
                scripts,
                prefix,
                poll_interval: self.poll_interval,
                response_timeout: self.timeouts.response,
                cluster: target.cluster,
                capabilities: capabilities(),
                server_version: connected.server_version,
            }),
        })
    }
}

fn check_prefix(url: &str, prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_url(
            url,
            format!(
                "key prefix {prefix:?}: use ASCII letters, digits, '-', '_', '.' and ':' only (it sits inside the keys' hash tag)"
            ),
        ))
    }
}

impl RedisDriver {
    /// Connects with default options to the Redis named by `url` (see the [crate docs](crate) for the
    /// URL forms): `redis://`, `rediss://` (TLS), `redis+cluster://` and `rediss+cluster://`.
    ///
    /// Wrong credentials fail here, with an error that says authentication failed.
    ///
    /// ```no_run
    /// use dlock_core::{Locks, LockMode};
    /// use dlock_redis::RedisDriver;
    /// # async fn demo() -> dlock_core::Result<()> {
    /// let driver = RedisDriver::connect("redis://app:secret@127.0.0.1:6379").await?;
    /// let locks = Locks::new(driver);
    /// let guard = locks.lock("stock/42").mode(LockMode::PW).await?;
    /// println!("fencing token {}", guard.fencing_token());
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder(url).connect().await
    }

    /// Options beyond the URL: key prefix, poll interval, timeouts.
    ///
    /// ```no_run
    /// # async fn demo() -> dlock_core::Result<()> {
    /// use std::time::Duration;
    /// let driver = dlock_redis::RedisDriver::builder("redis+cluster://10.0.0.1:7000,10.0.0.2:7000")
    ///     .key_prefix("billing")
    ///     .poll_interval(Duration::from_millis(500))
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder(url: impl Into<String>) -> RedisDriverBuilder {
        RedisDriverBuilder {
            url: url.into(),
            key_prefix: None,
            poll_interval: Duration::from_secs(1),
            timeouts: Timeouts {
                connect: Duration::from_secs(2),
                response: Duration::from_secs(2),
            },
        }
    }

    /// The version of the Redis server, as its `INFO server` reported it when the driver connected
    /// (`redis_version`; for a cluster, that of the first node in the URL). `None` when the URL's
    /// ACL user may not run `INFO`.
    pub fn server_version(&self) -> Option<&str> {
        self.inner.server_version.as_deref()
    }

    /// The Redis key holding `name`'s queue: `{<prefix>:<encoded name>}:q`.
    pub fn queue_key(&self, name: &LockName) -> String {
        format!("{}:q", self.hash_tag(name))
    }

    /// The channel on which `name`'s grants are announced: `{<prefix>:<encoded name>}:w`.
    pub fn channel(&self, name: &LockName) -> String {
        format!("{}:w", self.hash_tag(name))
    }

    /// The Redis key holding `name`'s fence register ([`Driver::raise_fence`]):
    /// `{<prefix>:<encoded name>}:f`, a decimal number without expiry. Only names used through a
    /// [`Quorum`](dlock_core::Quorum) have it.
    pub fn fence_key(&self, name: &LockName) -> String {
        format!("{}:f", self.hash_tag(name))
    }

    fn hash_tag(&self, name: &LockName) -> String {
        format!("{{{}:{}}}", self.inner.prefix, name.encoded())
    }

    async fn call(
        &self,
        script: &redis::Script,
        name: &LockName,
        args: &[&str],
    ) -> Result<Vec<Value>> {
        let mut call = script.key(self.queue_key(name));
        call.arg(self.channel(name));
        for a in args {
            call.arg(*a);
        }
        match self.inner.commands.invoke(&call).await? {
            Value::Array(items) => Ok(items),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(value: &Value) -> Error {
    Error::backend_msg(
        DRIVER,
        format!("unexpected reply from a dlock script: {value:?}"),
    )
}

fn int(value: Option<&Value>) -> Result<i64> {
    match value {
        Some(Value::Int(i)) => Ok(*i),
        other => Err(unexpected(other.unwrap_or(&Value::Nil))),
    }
}

fn string(value: Option<&Value>) -> Result<String> {
    match value {
        Some(Value::BulkString(b)) => {
            String::from_utf8(b.clone()).map_err(|_| unexpected(&Value::Nil))
        }
        Some(Value::SimpleString(s)) => Ok(s.clone()),
        other => Err(unexpected(other.unwrap_or(&Value::Nil))),
    }
}

fn mode(index: i64) -> Result<LockMode> {
    usize::try_from(index)
        .ok()
        .and_then(|i| LockMode::ALL.get(i).copied())
        .ok_or_else(|| {
            Error::backend_msg(DRIVER, format!("unknown lock mode {index} in the store"))
        })
}

/// An entry's state as the scripts report it.
enum State {
    Granted(Grant),
    /// Waiting; the earliest lease among its blockers runs out in this many milliseconds, if known,
    /// and the token the entry holds (0 before its first grant).
    Waiting(Option<u64>, u64),
    Lost,
    WouldBlock,
    NotGranted,
    /// Refused as a deadlock; the mode still held.
    Deadlock(LockMode),
    Ok,
}

fn parse_state(reply: &[Value]) -> Result<State> {
    let tag = string(reply.first())?;
    Ok(match tag.as_str() {
        "G" => State::Granted(Grant {
            mode: mode(int(reply.get(1))?)?,
            token: u64::try_from(int(reply.get(2))?).map_err(|_| unexpected(&reply[2]))?,
        }),
        "W" => State::Waiting(
            u64::try_from(int(reply.get(1))?).ok(),
            reply.get(2).map_or(Ok(0), |t| int(Some(t)))?.max(0) as u64,
        ),
        "L" => State::Lost,
        "WB" => State::WouldBlock,
        "NG" => State::NotGranted,
        "D" => State::Deadlock(mode(int(reply.get(1))?)?),
        "OK" => State::Ok,
        _ => return Err(unexpected(&Value::Array(reply.to_vec()))),
    })
}

/// The answers to a batch that failed as a whole: the error for the first renewal, its text for the
/// others (an [`Error`] cannot be cloned).
fn every_one_failed(n: usize, err: Error) -> Vec<Result<Instant>> {
    let message = match &err {
        Error::Backend { message, .. } => message.clone(),
        other => other.to_string(),
    };
    let mut answers = Vec::with_capacity(n);
    answers.push(Err(err));
    answers.extend((1..n).map(|_| Err(Error::backend_msg(DRIVER, message.clone()))));
    answers
}

fn lost(key: &EntryKey) -> Error {
    Error::Lost {
        name: key.name.to_string(),
    }
}

fn millis(d: Duration) -> String {
    // Sub-millisecond TTLs round up: the store must never drop an entry early.
    d.as_micros().div_ceil(1000).to_string()
}

fn capabilities() -> Capabilities {
    let mut caps = Capabilities::new(DRIVER);
    caps.modes = LockMode::ALL.to_vec();
    caps.fencing = true;
    caps.fencing_total_order = true;
    caps.fair = true;
    caps.per_request_ttl = true;
    caps.conversion = true;
    caps.shared_between_processes = true;
    caps.min_ttl = Duration::from_millis(50);
    caps
}

#[async_trait]
impl Driver for RedisDriver {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities.clone()
    }

    async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued> {
        let key = &request.key;
        let reply = self
            .call(
                &self.inner.scripts.enqueue,
                &key.name,
                &[
                    key.owner.as_str(),
                    &request.mode.index().to_string(),
                    &millis(request.ttl),
                    if request.wait { "1" } else { "0" },
                ],
            )
            .await?;
        match parse_state(&reply)? {
            State::Granted(grant) => Ok(Queued::Granted(grant).into()),
            State::Waiting(..) => Ok(Queued::Waiting.into()),
            State::WouldBlock => Err(Error::WouldBlock {
                name: key.name.to_string(),
            }),
            _ => Err(unexpected(&Value::Array(reply))),
        }
    }

    async fn wait(&self, key: &EntryKey) -> Result<Grant> {
        let poll = self.inner.poll_interval;
        let mut registration = self
            .inner
            .wakeups
            .register(&self.channel(&key.name), key.owner.as_str());
        let mut backoff = Duration::from_millis(20);
        let mut unsubscribed_backoff = Duration::from_millis(50);
        // The token the entry held at the last check, once a check has said it waits.
        let mut held = None;
        loop {
            // Subscribed before checking: a grant after the check is announced to us.
            let subscribed = registration
                .ensure_subscribed(self.inner.response_timeout)
                .await;
            // A wake-up that carries a grant made after the last check is the answer itself.
            if let Some(grant) = held.and_then(|held| registration.grant_above(held)) {
                return Ok(grant);
            }
            let pause = match self
                .call(
                    &self.inner.scripts.wait_check,
                    &key.name,
                    &[key.owner.as_str()],
                )
                .await
                .and_then(|reply| parse_state(&reply))
            {
                Ok(State::Granted(grant)) => return Ok(grant),
                Ok(State::Lost) => return Err(lost(key)),
                Ok(State::Waiting(expiry, token)) => {
                    held = Some(token);
                    backoff = Duration::from_millis(20);
                    // One extra millisecond so we look just after the blocker's lease ran out.
                    expiry.map_or(poll, |ms| Duration::from_millis(ms + 1).min(poll))
                }
                Ok(_) => {
                    return Err(Error::backend_msg(
                        DRIVER,
                        "unexpected reply to a wait check",
                    ))
                }
                Err(err) if err.is_transient() => {
                    // The lease keeper turns the acquire Lost if the store stays away; until then, retry.
                    tracing::debug!(name = %key.name, error = %err, "dlock-redis: wait check failed; retrying");
                    let pause = backoff.min(poll);
                    backoff = (backoff * 2).min(poll);
                    pause
                }
                Err(err) => return Err(err),
            };
            // Without a subscription nobody tells us about a grant: poll, backing off to the bound.
            let pause = if subscribed {
                unsubscribed_backoff = Duration::from_millis(50);
                pause
            } else {
                let short = pause.min(unsubscribed_backoff);
                unsubscribed_backoff = (unsubscribed_backoff * 2).min(poll);
                short
            };
            tokio::select! {
                _ = registration.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant> {
        let sent = Instant::now();
        let reply = self
            .call(
                &self.inner.scripts.renew,
                &key.name,
                &[key.owner.as_str(), &millis(ttl)],
            )
            .await?;
        match parse_state(&reply)? {
            State::Ok => Ok(sent),
            State::Lost => Err(lost(key)),
            _ => Err(unexpected(&Value::Array(reply))),
        }
    }

    /// One script renews the whole batch on a stand-alone server: one round trip per batch. A
    /// cluster keeps a name's keys in the name's own slot, and a script may not span slots, so there
    /// every renewal is its own script, all sent at once.
    async fn renew_many(&self, renewals: &[Renewal<'_>]) -> Vec<Result<Instant>> {
        if self.inner.cluster || renewals.len() < 2 {
            return futures::future::join_all(renewals.iter().map(|r| self.renew(r.key, r.ttl)))
                .await;
        }
        let sent = Instant::now();
        let mut call = self.inner.scripts.renew_many.prepare_invoke();
        for r in renewals {
            call.key(self.queue_key(&r.key.name))
                .arg(self.channel(&r.key.name))
                .arg(r.key.owner.as_str())
                .arg(millis(r.ttl));
        }
        let replies = match self.inner.commands.invoke(&call).await {
            Ok(Value::Array(replies)) if replies.len() == renewals.len() => replies,
            Ok(other) => return every_one_failed(renewals.len(), unexpected(&other)),
            Err(err) => return every_one_failed(renewals.len(), err),
        };
        renewals
            .iter()
            .zip(&replies)
            .map(|(r, reply)| match string(Some(reply))?.as_str() {
                "OK" => Ok(sent),
                "L" => Err(lost(r.key)),
                _ => Err(unexpected(reply)),
            })
            .collect()
    }

    async fn release(&self, key: &EntryKey) -> Result<()> {
        let reply = self
            .call(
                &self.inner.scripts.release,
                &key.name,
                &[key.owner.as_str()],
            )
            .await?;
        match parse_state(&reply)? {
            State::Ok => Ok(()),
            _ => Err(unexpected(&Value::Array(reply))),
        }
    }

    async fn convert(&self, key: &EntryKey, to: LockMode) -> Result<Queued> {
        let reply = self
            .call(
                &self.inner.scripts.convert,
                &key.name,
                &[key.owner.as_str(), &to.index().to_string()],
            )
            .await?;
        match parse_state(&reply)? {
            State::Granted(grant) => Ok(Queued::Granted(grant)),
            State::Waiting(..) => Ok(Queued::Waiting),
            State::Lost => Err(lost(key)),
            State::NotGranted => Err(Error::backend_msg(
                DRIVER,
                format!("cannot convert lock {:?}: it is not granted yet", key.name),
            )),
            State::Deadlock(from) => Err(Error::ConversionDeadlock {
                name: key.name.to_string(),
                from,
                to,
            }),
            _ => Err(unexpected(&Value::Array(reply))),
        }
    }

    async fn inspect(&self, name: &LockName) -> Result<Vec<EntryInfo>> {
        let reply = self.call(&self.inner.scripts.inspect, name, &[]).await?;
        reply
            .chunks(6)
            .map(|e| {
                let owner = string(e.first())?;
                Ok(EntryInfo {
                    owner: OwnerId::parse(&owner).ok_or_else(|| {
                        Error::backend_msg(
                            DRIVER,
                            format!("malformed owner id {owner:?} in the store"),
                        )
                    })?,
                    seq: u64::try_from(int(e.get(1))?).map_err(|_| unexpected(&e[1]))?,
                    mode: mode(int(e.get(2))?)?,
                    granted: int(e.get(3))? == 1,
                    converting_to: match int(e.get(4))? {
                        -1 => None,
                        m => Some(mode(m)?),
                    },
                    token: match int(e.get(5))? {
                        0 => None,
                        t => Some(u64::try_from(t).map_err(|_| unexpected(&e[5]))?),
                    },
                })
            })
            .collect()
    }

    async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64> {
        let mut call = self.inner.scripts.fence.key(self.fence_key(name));
        call.arg(floor.to_string());
        let reply = self.inner.commands.invoke(&call).await?;
        let value = string(Some(&reply))?;
        let value: u64 = value.parse().map_err(|_| {
            Error::backend_msg(
                DRIVER,
                format!("the fence register of lock {name:?} holds {value:?}, not a number"),
            )
        })?;
        if value < floor {
            return Err(unexpected(&reply));
        }
        Ok(value)
    }
}

#[cfg(feature = "test-support")]
impl RedisDriver {
    /// Runs the Lua twin of [`dlock_core::grant::decide`] on `queue` (test support, not API).
    #[doc(hidden)]
    pub async fn lua_decide(
        &self,
        queue: &[dlock_core::grant::QueueEntry],
    ) -> Result<Vec<dlock_core::grant::Decision>> {
        use dlock_core::grant::Decision;
        let mut call = self.inner.scripts.twin.arg("decide");
        push_queue(&mut call, queue);
        let reply = match self.inner.commands.invoke(&call).await? {
            Value::Array(items) => items,
            other => return Err(unexpected(&other)),
        };
        reply
            .chunks(2)
            .map(|d| {
                let index = usize::try_from(int(d.get(1))?).map_err(|_| unexpected(&d[1]))?;
                match int(d.first())? {
                    1 => Ok(Decision::Grant(index)),
                    2 => Ok(Decision::Convert(index)),
                    _ => Err(unexpected(&d[0])),
                }
            })
            .collect()
    }

    /// Runs the Lua twin of [`dlock_core::grant::conversion_deadlocks`] (test support, not API).
    #[doc(hidden)]
    pub async fn lua_conversion_deadlocks(
        &self,
        queue: &[dlock_core::grant::QueueEntry],
        index: usize,
        target: LockMode,
    ) -> Result<bool> {
        let mut call = self.inner.scripts.twin.arg("deadlocks");
        call.arg(index).arg(target.index());
        push_queue(&mut call, queue);
        match self.inner.commands.invoke(&call).await? {
            Value::Int(i) => Ok(i == 1),
            other => Err(unexpected(&other)),
        }
    }
}

#[cfg(feature = "test-support")]
fn push_queue(call: &mut redis::ScriptInvocation<'_>, queue: &[dlock_core::grant::QueueEntry]) {
    call.arg(queue.len());
    for e in queue {
        call.arg(e.mode.index())
            .arg(u8::from(e.granted))
            .arg(e.converting_to.map_or(-1, |m| m.index() as i64));
    }
}
