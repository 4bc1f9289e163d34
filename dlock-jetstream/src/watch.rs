//! Change notifications per lock name: one ordered push consumer per name and driver, shared by every
//! waiter on that name, kept a while after the last waiter leaves so that busy names do not churn
//! consumers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::layout::NameSubjects;

/// How long a name's consumer outlives its last waiter.
const LINGER: Duration = Duration::from_secs(30);

/// The header the server puts on subject delete markers (NATS 2.11+).
const MARKER_HEADER: &str = "Nats-Marker-Reason";

/// What a waiter holds: bumps when the name's queue may have changed.
pub(crate) struct Subscription {
    pub(crate) changes: watch::Receiver<u64>,
    ready: watch::Receiver<bool>,
}

impl Subscription {
    /// Waits (at most `limit`) until the consumer exists, so that every change stored from now on is
    /// delivered. Returns whether it does.
    pub(crate) async fn ready(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.ready.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub(crate) fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }
}

struct NameWatch {
    changes: watch::Sender<u64>,
    ready: watch::Sender<bool>,
}

#[derive(Clone)]
pub(crate) struct Watches {
    client: async_nats::Client,
    names: Arc<Mutex<HashMap<String, Arc<NameWatch>>>>,
}

impl Watches {
    pub(crate) fn new(client: async_nats::Client) -> Self {
        Watches {
            client,
            names: Arc::default(),
        }
    }

    /// Subscribes to changes of the name whose subjects are `subjects`, starting its consumer if needed.
    pub(crate) fn subscribe(&self, stream: &Stream<()>, subjects: &NameSubjects) -> Subscription {
        let filter = subjects.all();
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = names.get(&filter) {
            return Subscription {
                changes: w.changes.subscribe(),
                ready: w.ready.subscribe(),
            };
        }
        let (changes, changes_rx) = watch::channel(0u64);
        let (ready, ready_rx) = watch::channel(false);
        let w = Arc::new(NameWatch { changes, ready });
        names.insert(filter.clone(), w.clone());
        tokio::spawn(run(self.clone(), stream.clone(), filter, w));
        Subscription {
            changes: changes_rx,
            ready: ready_rx,
        }
    }

    /// Drops the name's watch if nobody subscribed again; under the map lock, so a subscriber either
    /// gets the old watch before this check or starts a new one after.
    fn retire(&self, filter: &str, w: &Arc<NameWatch>) -> bool {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if w.changes.receiver_count() == 0 {
            if names.get(filter).is_some_and(|cur| Arc::ptr_eq(cur, w)) {
                names.remove(filter);
            }
            true
        } else {
            false
        }
    }
}

fn bump(w: &NameWatch) {
    w.changes.send_modify(|n| *n = n.wrapping_add(1));
}

/// Whether a delivered message can change what waiters decide. Renewals of entries (plain entry
/// messages) cannot: only head writes and delete markers (an entry's lease ran out) can.
fn relevant(msg: &async_nats::Message) -> bool {
    if NameSubjects::is_head(msg.subject.as_str()) {
        return true;
    }
    msg.headers
        .as_ref()
        .is_some_and(|h| h.get(MARKER_HEADER).is_some())
}

async fn run(watches: Watches, stream: Stream<()>, filter: String, w: Arc<NameWatch>) {
    let mut backoff = Duration::from_millis(50);
    let mut idle_since: Option<Instant> = None;
    loop {
        if w.changes.receiver_count() == 0 && watches.retire(&filter, &w) {
            return;
        }
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_subject: watches.client.new_inbox(),
                filter_subject: filter.clone(),
                deliver_policy: DeliverPolicy::New,
                headers_only: true,
                ..Default::default()
            })
            .await;
        let mut messages = match consumer {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(err) => {
                    retry_later(&filter, &w, &err, &mut backoff).await;
                    continue;
                }
            },
            Err(err) => {
                retry_later(&filter, &w, &err, &mut backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        w.ready.send_replace(true);
        // Changes between the previous consumer's end and this one's start were not seen.
        bump(&w);
        loop {
            // With no waiter left, keep the consumer for LINGER in case another comes, then retire.
            let linger_until = if w.changes.receiver_count() == 0 {
                Some(*idle_since.get_or_insert_with(Instant::now) + LINGER)
            } else {
                idle_since = None;
                None
            };
            tokio::select! {
                next = messages.next() => match next {
                    Some(Ok(msg)) => {
                        if relevant(&msg.message) {
                            bump(&w);
                        }
                    }
                    Some(Err(err)) => {
                        // The ordered consumer recreates itself; anything may have happened meanwhile.
                        tracing::debug!(%filter, error = %err, "dlock-jetstream: watch interrupted");
                        bump(&w);
                    }
                    None => {
                        w.ready.send_replace(false);
                        bump(&w);
                        break;
                    }
                },
                _ = w.changes.closed(), if linger_until.is_none() => {}
                _ = sleep_until_opt(linger_until), if linger_until.is_some() => {
                    if watches.retire(&filter, &w) {
                        return;
                    }
                    idle_since = None;
                }
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

async fn retry_later(
    filter: &str,
    w: &NameWatch,
    err: &(dyn std::fmt::Display + Sync),
    backoff: &mut Duration,
) {
    tracing::debug!(%filter, error = %err, "dlock-jetstream: watch consumer not created; retrying");
    w.ready.send_replace(false);
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
}
