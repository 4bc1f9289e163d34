//! One client per member and the failover between them.
//!
//! `etcd-client` balances one channel over all endpoints and keeps sending part of the calls to a
//! member that is dead or frozen (its balancer has no health checks). So the driver builds one client
//! per member instead, sticks to one member while it answers, and moves to the next one when a call
//! fails with a transport error, a "no leader"/timeout status, or no answer within the request timeout.
//! Every operation the driver sends is safe to repeat (guarded transactions, idempotent deletes,
//! keepalives), so a call that may or may not have been applied is simply tried again elsewhere.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dlock_core::Error;
use etcd_client::{Client, ConnectOptions};
use tokio::sync::Mutex;

use crate::DRIVER;

/// Why one call failed, on every member it was tried on.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The store answered, and retrying elsewhere would not change the answer.
    Refused(etcd_client::Error),
    /// No member gave an answer: transport errors, elections, timeouts.
    Unavailable(String),
}

impl CallError {
    /// Whether etcd says the lease does not exist (expired or revoked).
    pub fn is_lease_not_found(&self) -> bool {
        match self {
            CallError::Refused(e) => is_lease_not_found(e),
            CallError::Unavailable(_) => false,
        }
    }
}

pub(crate) fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(msg) => msg.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        _ => false,
    }
}

/// Turns a failed call into the user-facing error, with a plain word for the usual auth mistakes.
pub(crate) fn to_error(err: CallError, user: Option<&str>) -> Error {
    match err {
        CallError::Unavailable(message) => Error::backend_msg(DRIVER, message),
        CallError::Refused(e) => {
            let text = e.to_string();
            let auth = [
                "authentication failed",
                "user name is empty",
                "invalid auth token",
                "user name not found",
            ];
            if auth.iter().any(|a| text.contains(a)) {
                let who = user.map_or_else(
                    || "no user name was given, and the server requires one (etcd://USER:PASSWORD@HOST)".to_owned(),
                    |u| format!("user {u:?}: check the user name and password in the URL"),
                );
                Error::Backend {
                    driver: DRIVER,
                    message: format!("etcd authentication failed for {who} ({text})"),
                    source: Some(Box::new(e)),
                }
            } else if text.contains("permission denied") {
                Error::Backend {
                    driver: DRIVER,
                    message: format!(
                        "etcd permission denied: the user needs read and write access to the key prefix ({text})"
                    ),
                    source: Some(Box::new(e)),
                }
            } else {
                Error::backend(DRIVER, e)
            }
        }
    }
}

/// Whether the same call may succeed on another member (or later).
fn retryable(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    use tonic_code::*;
    match e {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::Internal(_) => true,
        E::LeaseKeepAliveError(msg) => !msg.contains("not found"),
        E::GRpcStatus(s) => {
            let code = s.code() as i32;
            let msg = s.message();
            matches!(
                code,
                UNAVAILABLE | DEADLINE_EXCEEDED | CANCELLED | ABORTED | RESOURCE_EXHAUSTED
            ) || (code == UNKNOWN && !msg.contains("etcdserver: permission denied"))
                || msg.contains("no leader")
                || msg.contains("leader changed")
                || msg.contains("request timed out")
                || msg.contains("not capable")
        }
        _ => false,
    }
}

/// gRPC status codes, by number (`tonic` is not a direct dependency).
mod tonic_code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const ABORTED: i32 = 10;
    pub const UNAVAILABLE: i32 = 14;
}

/// The members' clients, each connected on first use.
pub(crate) struct Pool {
    endpoints: Vec<String>,
    options: ConnectOptions,
    clients: Vec<Mutex<Option<Client>>>,
    /// The member calls go to first.
    current: AtomicUsize,
    timeout: Duration,
}

impl Pool {
    pub fn new(endpoints: Vec<String>, options: ConnectOptions, timeout: Duration) -> Self {
        let clients = endpoints.iter().map(|_| Mutex::new(None)).collect();
        Pool {
            endpoints,
            options,
            clients,
            current: AtomicUsize::new(0),
            timeout,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The client of member `i`, connecting (and authenticating) it if needed.
    async fn client_at(&self, i: usize) -> Result<Client, etcd_client::Error> {
        let mut slot = self.clients[i].lock().await;
        if let Some(client) = &*slot {
            return Ok(client.clone());
        }
        let client = Client::connect([&self.endpoints[i]], Some(self.options.clone())).await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// A client of the member currently preferred, for users' own requests.
    pub async fn any_client(&self) -> Result<Client, CallError> {
        self.call("connect", self.timeout, |c| async move { Ok(c) })
            .await
    }

    /// Moves the preference off member `i` (unless someone else already did).
    fn skip(&self, i: usize) {
        let next = (i + 1) % self.endpoints.len();
        if self
            .current
            .compare_exchange(i, next, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            && self.endpoints.len() > 1
        {
            tracing::debug!(
                from = %self.endpoints[i],
                to = %self.endpoints[next],
                "dlock-etcd: switching member"
            );
        }
    }

    /// Runs `op` against the preferred member, moving on to the next member on failures that another
    /// member (or a moment later) may not have. Each attempt gets `timeout`; every member is tried
    /// twice at most.
    pub async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        timeout: Duration,
        op: F,
    ) -> Result<T, CallError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.endpoints.len();
        let attempts = 2 * n;
        let mut failures = Vec::new();
        for attempt in 0..attempts {
            let i = self.current.load(Ordering::SeqCst) % n;
            let outcome = tokio::time::timeout(timeout, async {
                let client = self.client_at(i).await?;
                op(client).await
            })
            .await;
            match outcome {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if !retryable(&e) => return Err(CallError::Refused(e)),
                Ok(Err(e)) => {
                    tracing::debug!(member = %self.endpoints[i], error = %e, what, "dlock-etcd: call failed");
                    failures.push(format!("{}: {e}", self.endpoints[i]));
                }
                Err(_) => {
                    tracing::debug!(member = %self.endpoints[i], what, "dlock-etcd: call timed out");
                    failures.push(format!(
                        "{}: no answer within {timeout:?}",
                        self.endpoints[i]
                    ));
                }
            }
            self.skip(i);
            // A second round over the same members only helps after a pause (elections take about
            // a second); with one member this is the only pause between its two attempts.
            if attempt + 1 == n {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Err(CallError::Unavailable(format!(
            "{what} failed on every etcd member: {}",
            failures.join("; ")
        )))
    }
}
