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

/// What went wrong with one attempt on one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Nothing listens on the member's port.
    Refused,
    /// No answer within the request timeout.
    NoAnswer(Duration),
    /// The TLS handshake failed (for a plaintext server behind `etcds://`, among others).
    Tls(String),
    /// Anything else, in as few words as the client's error allows.
    Other(String),
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Refused => f.write_str("connection refused"),
            Cause::NoAnswer(d) => write!(f, "no answer within {d:?}"),
            Cause::Tls(why) => write!(f, "TLS handshake failed ({why})"),
            Cause::Other(why) => f.write_str(why),
        }
    }
}

impl Cause {
    /// The cause of a failed attempt: the client's errors wrap the socket's own error several
    /// layers deep (`tonic` status → transport error → connect error → I/O error), and each layer
    /// prints the ones below it, so the innermost I/O error is what says it in the fewest words.
    fn of(e: &etcd_client::Error, tls: bool) -> Cause {
        // `etcd_client::Error` has no `source()`; its variants hold the next layer.
        let mut layer: Option<&(dyn std::error::Error + 'static)> = match e {
            etcd_client::Error::GRpcStatus(status) => Some(status),
            etcd_client::Error::TransportError(transport) => Some(transport),
            etcd_client::Error::IoError(io) => Some(io),
            _ => None,
        };
        while let Some(err) = layer {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                let text = io.to_string();
                return match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => Cause::Refused,
                    // A server without TLS drops the connection on the first bytes of a handshake.
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                        if tls =>
                    {
                        Cause::Tls("the server closed the connection".into())
                    }
                    // rustls, inside an I/O error (this crate does not link rustls to look).
                    _ if [
                        "certificate",
                        "tls",
                        "alert",
                        "handshake",
                        "corrupt message",
                    ]
                    .iter()
                    .any(|w| text.to_lowercase().contains(w)) =>
                    {
                        Cause::Tls(text)
                    }
                    _ => Cause::Other(text),
                };
            }
            layer = err.source();
        }
        match e {
            etcd_client::Error::GRpcStatus(status) => Cause::Other(status.message().to_owned()),
            other => Cause::Other(other.to_string()),
        }
    }
}

/// One failed attempt.
#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    /// The member, as `host:port`.
    pub member: String,
    pub cause: Cause,
}

/// The attempts of one call, each member and each distinct cause once: "connection refused at
/// 127.0.0.1:1", "connection refused at every member (a:1, b:2)", or "a:1: connection refused;
/// b:2: no answer within 3s".
pub(crate) fn summary(attempts: &[Attempt]) -> String {
    let mut members: Vec<(&str, Vec<&Cause>)> = Vec::new();
    for a in attempts {
        match members.iter_mut().find(|(m, _)| *m == a.member) {
            Some((_, causes)) if causes.contains(&&a.cause) => {}
            Some((_, causes)) => causes.push(&a.cause),
            None => members.push((&a.member, vec![&a.cause])),
        }
    }
    let first = members.first().map(|(_, c)| c.clone()).unwrap_or_default();
    if first.len() == 1 && members.iter().all(|(_, c)| *c == first) {
        let names: Vec<&str> = members.iter().map(|(m, _)| *m).collect();
        return match names.as_slice() {
            [one] => format!("{} at {one}", first[0]),
            _ => format!("{} at every member ({})", first[0], names.join(", ")),
        };
    }
    members
        .iter()
        .map(|(m, causes)| {
            let causes: Vec<String> = causes.iter().map(|c| c.to_string()).collect();
            format!("{m}: {}", causes.join(", then "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// How a call failed, before it is worded for the caller.
#[derive(Debug)]
pub(crate) enum Failed {
    /// The store answered, and retrying elsewhere would not change the answer.
    Refused(etcd_client::Error),
    /// No member gave an answer.
    Unreachable(Vec<Attempt>),
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

/// Maps a failure of the first calls of a connect to [`Error::Connect`], with what to check.
pub(crate) fn connect_error(failed: Failed, url: &str, user: Option<&str>, prefix: &str) -> Error {
    let (reason, hint) = match failed {
        Failed::Unreachable(attempts) => {
            let has = |f: fn(&Cause) -> bool| attempts.iter().any(|a| f(&a.cause));
            let hint = if has(|c| matches!(c, Cause::Tls(_))) {
                "check ?tls_ca=PATH (for a private CA), ?tls_cert=PATH&tls_key=PATH (for a server that asks for a client certificate), and that the server speaks TLS (for one without, write etcd://)"
            } else if has(|c| matches!(c, Cause::Refused)) {
                "check that etcd is running there and that the URL's hosts and ports are right"
            } else if has(|c| matches!(c, Cause::NoAnswer(_))) {
                "check that etcd is running there and that no firewall drops the connection; ?timeout_ms=N waits longer for each member"
            } else {
                "check that the URL names etcd client ports (2379 by default); for a TLS server write etcds://"
            };
            (summary(&attempts), hint.to_owned())
        }
        Failed::Refused(e) => {
            let text = match &e {
                etcd_client::Error::GRpcStatus(status) => status.message().to_owned(),
                other => other.to_string(),
            };
            let said = text.trim_start_matches("etcdserver: ");
            let anonymous = ["user name is empty", "invalid auth token"];
            let refused = [
                "authentication failed",
                "user name not found",
                "invalid user ID or password",
            ];
            match user {
                None if anonymous.iter().any(|a| text.contains(a)) => (
                    "authentication failed: the server requires a user name and password, and the URL gives none".to_owned(),
                    "put them in the URL: etcd://USER:PASSWORD@HOST:PORT, with ':', '@' and '%' percent-encoded".to_owned(),
                ),
                Some(u) if refused.iter().any(|a| text.contains(a)) => (
                    format!("etcd refused user {u:?}: {said}"),
                    "check the user name and password in the URL (etcd://USER:PASSWORD@HOST:PORT, with ':', '@' and '%' percent-encoded)".to_owned(),
                ),
                _ if text.contains("permission denied") => (
                    format!(
                        "{} may not read the keys under {prefix:?} ({said})",
                        user.map_or_else(|| "this client".to_owned(), |u| format!("user {u:?}"))
                    ),
                    format!("grant one of the user's roles readwrite access to that prefix (etcdctl role grant-permission ROLE readwrite --prefix {prefix}), or pick another ?prefix="),
                ),
                _ => (
                    said.to_owned(),
                    "check that the URL names an etcd v3 server (3.4 or later)".to_owned(),
                ),
            }
        }
    };
    Error::connect(DRIVER, url, reason, hint)
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

    /// The member `host:port` of endpoint `i`, for messages.
    fn member(&self, i: usize) -> String {
        let endpoint = &self.endpoints[i];
        endpoint
            .split_once("://")
            .map_or(endpoint.as_str(), |(_, m)| m)
            .to_owned()
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
        self.try_members(what, timeout, true, op)
            .await
            .map_err(|failed| match failed {
                Failed::Refused(e) => CallError::Refused(e),
                Failed::Unreachable(attempts) => CallError::Unavailable(format!(
                    "{what} failed on every etcd member: {}",
                    summary(&attempts)
                )),
            })
    }

    /// [`Pool::call`] for the first calls of a connect, which tries a member that did not answer
    /// only once: so a connect to members that never answer gives up after one `timeout` per
    /// member, while one refused (a member still starting, say) is tried again.
    pub async fn first_call<T, F, Fut>(
        &self,
        what: &'static str,
        timeout: Duration,
        op: F,
    ) -> Result<T, Failed>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.try_members(what, timeout, false, op).await
    }

    async fn try_members<T, F, Fut>(
        &self,
        what: &'static str,
        timeout: Duration,
        retry_silent: bool,
        op: F,
    ) -> Result<T, Failed>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.endpoints.len();
        let mut attempts: Vec<Attempt> = Vec::new();
        for attempt in 0..2 * n {
            let i = self.current.load(Ordering::SeqCst) % n;
            let silent_before = attempts
                .iter()
                .any(|a| a.member == self.member(i) && matches!(a.cause, Cause::NoAnswer(_)));
            if retry_silent || !silent_before {
                let outcome = tokio::time::timeout(timeout, async {
                    let client = self.client_at(i).await?;
                    op(client).await
                })
                .await;
                let cause = match outcome {
                    Ok(Ok(value)) => return Ok(value),
                    Ok(Err(e)) if !retryable(&e) => return Err(Failed::Refused(e)),
                    Ok(Err(e)) => {
                        tracing::debug!(member = %self.endpoints[i], error = %e, what, "dlock-etcd: call failed");
                        Cause::of(&e, self.endpoints[i].starts_with("https://"))
                    }
                    Err(_) => {
                        tracing::debug!(member = %self.endpoints[i], what, "dlock-etcd: call timed out");
                        Cause::NoAnswer(timeout)
                    }
                };
                attempts.push(Attempt {
                    member: self.member(i),
                    cause,
                });
            }
            self.skip(i);
            // A second round over the same members only helps after a pause (elections take about
            // a second); with one member this is the only pause between its two attempts.
            if attempt + 1 == n {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Err(Failed::Unreachable(attempts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(member: &str, cause: Cause) -> Attempt {
        Attempt {
            member: member.into(),
            cause,
        }
    }

    #[test]
    fn summaries_name_each_member_and_cause_once() {
        let refused = |m| at(m, Cause::Refused);
        assert_eq!(
            summary(&[refused("a:1"), refused("a:1")]),
            "connection refused at a:1"
        );
        assert_eq!(
            summary(&[
                refused("a:1"),
                refused("b:2"),
                refused("a:1"),
                refused("b:2")
            ]),
            "connection refused at every member (a:1, b:2)"
        );
        let slow = at("b:2", Cause::NoAnswer(Duration::from_secs(3)));
        assert_eq!(
            summary(&[
                refused("a:1"),
                slow.clone(),
                at("a:1", Cause::Other("reset".into())),
                slow
            ]),
            "a:1: connection refused, then reset; b:2: no answer within 3s"
        );
    }
}
