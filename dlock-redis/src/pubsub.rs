//! Wake-ups: every waiter of a driver shares one subscriber connection.
//!
//! The scripts publish, on a name's channel, the owners they just granted with the mode and token of
//! each grant (`owner:mode:token`, space-separated). Only the waiters named are woken, and a waiter
//! whose wake-up carries a grant newer than what it last saw needs no script of its own, so a
//! release costs one script run and one message for the next holder, not one per waiter.
//! Messages can be lost (pub/sub is fire-and-forget, and a reconnect drops what was in flight); waiters
//! therefore also wake at the earliest expiry of what blocks them and at a bounded poll interval, so a
//! lost message costs latency, never a hang.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dlock_core::{Grant, LockMode};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::Notify;

use crate::conn::Subscriber;

/// Who waits on which channel. Written by waiters, read by the connection's push callback.
#[derive(Default)]
pub(crate) struct Registry {
    state: Mutex<State>,
    /// Bumped on every lost subscriber connection: subscriptions confirmed before are suspect.
    generation: AtomicU64,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, Channel>,
    next_id: u64,
}

#[derive(Default)]
struct Channel {
    waiters: Vec<Slot>,
    /// The connection generation on which the subscription was last confirmed.
    subscribed_at: Option<u64>,
}

struct Slot {
    id: u64,
    owner: String,
    notify: Arc<Notify>,
    /// The newest grant a message carried for this owner.
    grant: Arc<Mutex<Option<Grant>>>,
}

/// One item of a wake-up message: `owner:mode:token`, or a bare `owner` (look for yourself).
fn parse_item(item: &[u8]) -> (&[u8], Option<Grant>) {
    let mut parts = item.splitn(3, |b| *b == b':');
    let owner = parts.next().unwrap_or_default();
    let grant = (|| {
        let mode = std::str::from_utf8(parts.next()?)
            .ok()?
            .parse::<usize>()
            .ok()?;
        let token = std::str::from_utf8(parts.next()?)
            .ok()?
            .parse::<u64>()
            .ok()?;
        Some(Grant {
            mode: *LockMode::ALL.get(mode)?,
            token,
        })
    })();
    (owner, grant)
}

fn text(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a single insert or removal, so a poisoned map is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the subscriber connection for every push; must not block.
    pub(crate) fn dispatch(&self, push: PushInfo) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let (Some(channel), Some(payload)) = (
                    push.data.first().and_then(text),
                    push.data.get(1).and_then(text),
                ) else {
                    return;
                };
                let Ok(channel) = std::str::from_utf8(channel) else {
                    return;
                };
                let state = self.lock();
                let Some(ch) = state.channels.get(channel) else {
                    return;
                };
                for item in payload.split(|b| *b == b' ') {
                    let (owner, grant) = parse_item(item);
                    for slot in ch.waiters.iter().filter(|s| s.owner.as_bytes() == owner) {
                        if let Some(grant) = grant {
                            let mut newest = slot.grant.lock().unwrap_or_else(|p| p.into_inner());
                            if newest.is_none_or(|seen| seen.token < grant.token) {
                                *newest = Some(grant);
                            }
                        }
                        slot.notify.notify_one();
                    }
                }
            }
            PushKind::Disconnection => {
                self.generation.fetch_add(1, Ordering::SeqCst);
                let state = self.lock();
                let waiting: usize = state.channels.values().map(|c| c.waiters.len()).sum();
                tracing::warn!(
                    waiting,
                    "dlock-redis: pub/sub connection lost; reconnecting and resubscribing (waiters re-check now and poll meanwhile)"
                );
                // Grants published while the connection was down are lost: everyone re-checks.
                for slot in state.channels.values().flat_map(|c| &c.waiters) {
                    slot.notify.notify_one();
                }
            }
            _ => {}
        }
    }
}

/// The subscriber connection and its registry.
pub(crate) struct Wakeups {
    registry: Arc<Registry>,
    subscriber: Subscriber,
    /// Serialises subscribe and unsubscribe commands, so that the UNSUBSCRIBE of a channel whose last
    /// waiter left can never overtake the SUBSCRIBE of a waiter that arrived meanwhile.
    order: tokio::sync::Mutex<()>,
}

impl Wakeups {
    pub(crate) fn new(registry: Arc<Registry>, subscriber: Subscriber) -> Arc<Self> {
        Arc::new(Wakeups {
            registry,
            subscriber,
            order: tokio::sync::Mutex::new(()),
        })
    }

    /// Registers interest in `owner`'s grant on `channel` until the registration is dropped.
    pub(crate) fn register(self: &Arc<Self>, channel: &str, owner: &str) -> Registration {
        let notify = Arc::new(Notify::new());
        let grant = Arc::default();
        let id = {
            let mut state = self.registry.lock();
            state.next_id += 1;
            let id = state.next_id;
            state
                .channels
                .entry(channel.to_owned())
                .or_default()
                .waiters
                .push(Slot {
                    id,
                    owner: owner.to_owned(),
                    notify: Arc::clone(&notify),
                    grant: Arc::clone(&grant),
                });
            id
        };
        Registration {
            wakeups: Arc::clone(self),
            channel: channel.to_owned(),
            id,
            notify,
            grant,
            subscribed_at: None,
        }
    }
}

/// One waiter's interest in a channel. Dropping it (a cancelled wait included) unregisters it and, for
/// the channel's last waiter, unsubscribes in the background.
pub(crate) struct Registration {
    wakeups: Arc<Wakeups>,
    channel: String,
    id: u64,
    notify: Arc<Notify>,
    grant: Arc<Mutex<Option<Grant>>>,
    subscribed_at: Option<u64>,
}

impl Registration {
    /// Makes sure the channel is subscribed on the current subscriber connection, so that every grant
    /// published after this returns `true` reaches [`Registration::notified`]. Gives up after `limit`
    /// (the subscriber connection may be down while commands still work); `false` then, and the waiter
    /// polls until a later call succeeds.
    pub(crate) async fn ensure_subscribed(&mut self, limit: Duration) -> bool {
        let generation = self.wakeups.registry.generation.load(Ordering::SeqCst);
        if self.subscribed_at == Some(generation) {
            return true;
        }
        tokio::time::timeout(limit, self.subscribe())
            .await
            .unwrap_or(false)
    }

    async fn subscribe(&mut self) -> bool {
        let registry = &self.wakeups.registry;
        let _order = self.wakeups.order.lock().await;
        let generation = registry.generation.load(Ordering::SeqCst);
        let confirmed = registry
            .lock()
            .channels
            .get(&self.channel)
            .and_then(|c| c.subscribed_at);
        if confirmed != Some(generation) {
            if let Err(err) = self.wakeups.subscriber.subscribe(&self.channel).await {
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) {
                    // A configuration problem, not a blip: say so, waiters only poll until it is fixed.
                    tracing::warn!(channel = %self.channel, error = %err, "dlock-redis: the ACL user may not subscribe; waiters fall back to polling");
                } else {
                    tracing::debug!(channel = %self.channel, error = %err, "dlock-redis: subscribe failed; polling");
                }
                return false;
            }
            if let Some(ch) = registry.lock().channels.get_mut(&self.channel) {
                ch.subscribed_at = Some(generation);
            }
        }
        self.subscribed_at = Some(generation);
        true
    }

    /// Resolves when a message names this waiter's owner, or the subscriber connection was lost, since
    /// the last call (a wake-up in between is kept, not lost).
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }

    /// The newest grant a wake-up carried for this owner, if its token is above `held` (the token
    /// the entry held when the waiter last looked; older grants are stale news).
    pub(crate) fn grant_above(&self, held: u64) -> Option<Grant> {
        let newest = *self.grant.lock().unwrap_or_else(|p| p.into_inner());
        newest.filter(|grant| grant.token > held)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let last = {
            let mut state = self.wakeups.registry.lock();
            let Some(ch) = state.channels.get_mut(&self.channel) else {
                return;
            };
            ch.waiters.retain(|s| s.id != self.id);
            let last = ch.waiters.is_empty();
            if last {
                state.channels.remove(&self.channel);
            }
            last
        };
        if !last {
            return;
        }
        // Without a runtime the subscription lingers until the connection closes; harmless.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let wakeups = Arc::clone(&self.wakeups);
            let channel = std::mem::take(&mut self.channel);
            handle.spawn(async move {
                let _order = wakeups.order.lock().await;
                if wakeups.registry.lock().channels.contains_key(&channel) {
                    return; // a new waiter arrived and relies on the subscription
                }
                if let Err(err) = wakeups.subscriber.unsubscribe(&channel).await {
                    tracing::debug!(%channel, error = %err, "dlock-redis: unsubscribe failed");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_up_items_carry_the_grant_or_name_the_owner_alone() {
        let (owner, grant) = parse_item(b"0123abcd-7:5:1733000000000001");
        assert_eq!(owner, b"0123abcd-7");
        assert_eq!(
            grant,
            Some(Grant {
                mode: LockMode::EX,
                token: 1_733_000_000_000_001
            })
        );
        assert_eq!(parse_item(b"0123abcd-7"), (&b"0123abcd-7"[..], None));
        // Unreadable grants wake the owner without an answer: it checks for itself.
        assert_eq!(parse_item(b"a-1:6:10").1, None);
        assert_eq!(parse_item(b"a-1:2:x").1, None);
    }
}
