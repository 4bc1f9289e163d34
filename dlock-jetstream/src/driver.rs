//! The driver: the five lock operations over one KV-style stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::stream::{
    Config as StreamConfig, DiscardPolicy, LastRawMessageErrorKind, RetentionPolicy, StorageType,
    Stream,
};
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, context::GetStreamErrorKind};
use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};
use async_trait::async_trait;
use dlock_core::grant::{self, Decision, QueueEntry};
use dlock_core::{
    Capabilities, Driver, Enqueued, EntryInfo, EntryKey, EntryRequest, Error, Grant, LockMode,
    LockName, OwnerId, Queued, Result,
};
use tokio::time::Instant;

use crate::config::{Auth, LeaseMode, Settings};
use crate::layout::{clock_subject, Entry, EntryDoc, FenceDoc, HeadDoc, NameSubjects};
use crate::watch::Watches;

pub(crate) const DRIVER: &str = "jetstream";

/// Head updates that lose a compare-and-set are retried this often before giving up.
const MAX_ATTEMPTS: u32 = 100;
/// How long subject delete markers stay (server TTL mode); waiters only need to see them once.
const MARKER_TTL: Duration = Duration::from_secs(60);
/// The header of a subject delete marker (NATS 2.11+).
const MARKER_HEADER: &str = "Nats-Marker-Reason";
/// A waiter without a working watch re-reads the queue this often.
const BLIND_POLL: Duration = Duration::from_millis(250);
/// How long a write answered with "no responders" is sent again before the error is returned.
const NO_RESPONDERS_BUDGET: Duration = Duration::from_secs(5);

/// Locks in a NATS JetStream stream. Cheap to clone: clones share the connection.
///
/// See the [crate docs](crate) for the URL format, the stream layout and the guarantees.
#[derive(Clone)]
pub struct JetStreamDriver {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: Stream<()>,
    stream_name: String,
    prefix: String,
    mode: LeaseMode,
    replicas: usize,
    server_version: String,
    /// Check every compare-and-set after the fact (see [`verify_writes`]).
    verify: bool,
    clock_skew: Duration,
    timeout: Duration,
    recheck: Duration,
    capabilities: Capabilities,
    /// The last known stream sequence of each own entry's message, for compare-and-set renewals.
    entries: Mutex<HashMap<EntryKey, Cached>>,
    watches: Watches,
    head_writers: HeadWriters,
}

/// Takes this client's writes of one name's head in turn. Its own tasks racing each other for the
/// head would cost each of them a lost compare-and-set per rival (so the cost of a crowd grows with
/// its square), and where writes are verified, more racers in one replication round than the
/// subject keeps history would leave nobody able to tell which write won.
#[derive(Default)]
struct HeadWriters(Mutex<HashMap<LockName, Arc<tokio::sync::Mutex<()>>>>);

impl HeadWriters {
    fn gates(&self) -> std::sync::MutexGuard<'_, HashMap<LockName, Arc<tokio::sync::Mutex<()>>>> {
        // Each update is one insert or removal: a poisoned map is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn turn(&self, name: &LockName) -> HeadTurn<'_> {
        let gate = Arc::clone(self.gates().entry(name.clone()).or_default());
        let turn = Arc::clone(&gate).lock_owned().await;
        HeadTurn {
            writers: self,
            name: name.clone(),
            gate,
            turn: Some(turn),
        }
    }
}

/// One writer's turn on a name's head; the name's gate goes when its last user does.
struct HeadTurn<'a> {
    writers: &'a HeadWriters,
    name: LockName,
    gate: Arc<tokio::sync::Mutex<()>>,
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for HeadTurn<'_> {
    fn drop(&mut self) {
        self.turn = None;
        let mut gates = self.writers.gates();
        // The map's reference and this one: nobody else waits for the gate.
        if Arc::strong_count(&self.gate) == 2 {
            gates.remove(&self.name);
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Cached {
    /// Sequence of the entry's last message.
    last: u64,
    /// Sequence of its first message: its place in the queue.
    created: u64,
}

fn backend(source: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::backend(DRIVER, source)
}

fn backend_msg(message: impl Into<String>) -> Error {
    Error::backend_msg(DRIVER, message)
}

fn lost(name: &LockName) -> Error {
    Error::Lost {
        name: name.to_string(),
    }
}

/// A lost compare-and-set. Servers answer it with 10071 (naming the sequence found) or, when another
/// write to the same subject is still in flight, 10164; the client maps only the first to its own kind.
fn is_wrong_last_sequence(err: &PublishError) -> bool {
    if matches!(err.kind(), PublishErrorKind::WrongLastSequence) {
        return true;
    }
    std::error::Error::source(err)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|e| {
            e.error_code() == ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                || e.error_code() == ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
        })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `Nats-TTL` counts whole seconds and the server truncates; rounding up keeps the store's expiry at or
/// after the holder's validity window.
fn ttl_header(ttl: Duration) -> String {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.max(1).to_string()
}

fn nanos(msg: &StreamMessage) -> i128 {
    msg.time.unix_timestamp_nanos()
}

fn is_marker(msg: &StreamMessage) -> bool {
    msg.headers.get(MARKER_HEADER).is_some()
}

fn parse_version(v: &str) -> (u32, u32) {
    let mut parts = v
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// What a queue read found about one entry listed in the head.
#[derive(Clone, Copy, Debug)]
enum Liveness {
    /// The entry's lease runs; in client-clock mode, until this server time (ns).
    Alive { expires: Option<i128> },
    /// Gone. `purge` names the message that must be removed (compare-and-delete) before the head may
    /// forget the entry: an expired entry whose holder could still renew it.
    Dead {
        purge: Option<u64>,
        why: &'static str,
    },
}

/// One linearizable read of a name's queue.
struct Snapshot {
    /// Sequence of the last message on the head subject (0 when there is none): what the next head
    /// write expects.
    head_last: u64,
    entries: Vec<Entry>,
    liveness: Vec<Liveness>,
    /// The latest server timestamp seen in this read (ns): a lower bound of the server's clock now.
    server_now: Option<i128>,
    /// When the read completed, locally.
    read_at: Instant,
}

/// What to do to the queue while settling it.
#[derive(Clone, Copy)]
enum Op<'a> {
    /// Only prune and grant.
    Settle,
    Add {
        owner: &'a OwnerId,
        seq: u64,
        mode: LockMode,
        wait: bool,
    },
    Remove(&'a OwnerId),
    Convert(&'a OwnerId, LockMode),
}

/// The queue after settling.
struct Settled {
    entries: Vec<Entry>,
    /// In client-clock mode: how long until the next live entry's lease ends by the server's clock,
    /// counted from `read_at`.
    next_expiry: Option<Duration>,
    read_at: Instant,
}

impl Settled {
    fn find(&self, owner: &OwnerId) -> Option<&Entry> {
        self.entries.iter().find(|e| &e.owner == owner)
    }

    fn answer(&self, owner: &OwnerId) -> Option<Queued> {
        self.find(owner).map(|e| match granted(e) {
            Some(g) => Queued::Granted(g),
            None => Queued::Waiting,
        })
    }
}

fn granted(e: &Entry) -> Option<Grant> {
    (e.queue.granted && e.queue.converting_to.is_none()).then_some(Grant {
        mode: e.queue.mode,
        token: e.token,
    })
}

fn view(entries: &[Entry]) -> Vec<QueueEntry> {
    entries.iter().map(|e| e.queue).collect()
}

/// Applies the grant rule; grants made here get token 0, "the sequence of the head write that records
/// them", resolved once the write is acknowledged.
fn decide(entries: &mut [Entry]) -> bool {
    let mut q = view(entries);
    let decisions = grant::decide(&q);
    grant::apply(&mut q, &decisions);
    for (e, q) in entries.iter_mut().zip(q) {
        e.queue = q;
    }
    for d in &decisions {
        let (Decision::Grant(i) | Decision::Convert(i)) = *d;
        entries[i].token = 0;
    }
    !decisions.is_empty()
}

enum HeadWrite {
    Written(u64),
    Conflict,
}

impl JetStreamDriver {
    /// Connects to NATS, makes sure the lock stream exists with a compatible configuration (creating it
    /// if needed), and picks the lease mode by server version.
    ///
    /// `url` is `nats://[USER:PASSWORD@|TOKEN@]HOST[:PORT][,HOST[:PORT]…][?PARAMS]`, or `tls://…` for
    /// TLS; see the [crate docs](crate#urls) for the parameters. Wrong credentials fail with an error
    /// that says authentication failed.
    ///
    /// ```no_run
    /// use dlock_core::{Locks, LockMode};
    /// use dlock_jetstream::JetStreamDriver;
    /// # async fn demo() -> dlock_core::Result<()> {
    /// let driver = JetStreamDriver::connect("nats://127.0.0.1:4222?replicas=3").await?;
    /// let locks = Locks::new(driver);
    /// let guard = locks.lock("stock/42").mode(LockMode::PW).await?;
    /// println!("fencing token {}", guard.fencing_token());
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self> {
        let settings = Settings::parse(url)?;
        let client = connect_client(&settings).await?;
        let info = client.server_info();
        if !info.jetstream {
            return Err(Error::connect(
                DRIVER,
                &settings.redacted,
                "JetStream is not enabled on the server",
                "start nats-server with -js (or a jetstream {} block in its configuration)",
            ));
        }
        let version = info.version.clone();
        let js = jetstream::ContextBuilder::new()
            .timeout(settings.timeout)
            .build(client.clone());
        let (mode, replicas) = ensure_stream(&js, &settings, &version)
            .await
            .map_err(|e| stream_error(&settings, e))?;
        let verify = verify_writes(&version, replicas);
        let stream = js
            .get_stream_no_info(&settings.stream)
            .await
            .map_err(|e| stream_error(&settings, backend(e)))?;
        let mut caps = Capabilities::new(DRIVER);
        caps.modes = LockMode::ALL.to_vec();
        caps.fencing = true;
        // Compatible entries granted by one head write share that write's sequence as their token.
        caps.fencing_total_order = false;
        caps.fair = true;
        caps.per_request_ttl = true;
        caps.conversion = true;
        caps.shared_between_processes = true;
        caps.min_ttl = match mode {
            // `Nats-TTL` has whole seconds, one at least.
            LeaseMode::ServerTtl => Duration::from_secs(1),
            LeaseMode::ClientClock => Duration::from_millis(100),
        };
        tracing::debug!(
            server = %settings.redacted, version, stream = %settings.stream, lease = mode.as_str(), replicas,
            "dlock-jetstream: connected"
        );
        Ok(JetStreamDriver {
            inner: Arc::new(Inner {
                watches: Watches::new(client.clone()),
                head_writers: HeadWriters::default(),
                client,
                js,
                stream,
                stream_name: settings.stream.clone(),
                prefix: settings.prefix.clone(),
                mode,
                replicas,
                server_version: version,
                verify,
                clock_skew: settings.clock_skew,
                timeout: settings.timeout,
                recheck: settings.recheck,
                capabilities: caps,
                entries: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// How leases are kept on this stream.
    pub fn lease_mode(&self) -> LeaseMode {
        self.inner.mode
    }

    /// The name of the lock stream.
    pub fn stream_name(&self) -> &str {
        &self.inner.stream_name
    }

    /// The replica count of the lock stream.
    pub fn replicas(&self) -> usize {
        self.inner.replicas
    }

    /// The version of the NATS server this client connected to, as it reported it.
    pub fn server_version(&self) -> &str {
        &self.inner.server_version
    }

    /// The underlying NATS client (for metrics, or to share the connection).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }
}

/// A store failure while setting up the lock stream, as an [`Error::Connect`]; other errors (a
/// stream that cannot hold locks, a lease mode the server lacks) already say what to do.
fn stream_error(settings: &Settings, err: Error) -> Error {
    match err {
        Error::Backend { message, .. } => Error::connect(
            DRIVER,
            &settings.redacted,
            format!("setting up the lock stream {:?} failed: {message}", settings.stream),
            "check that the account may use JetStream and create streams, and that the server has room for a file stream (its log says more)",
        ),
        other => other,
    }
}

/// Maps a failed NATS connect to [`Error::Connect`]: what went wrong, in the fewest words the
/// client's error allows (its innermost cause), and what to check.
fn connect_error(settings: &Settings, err: &async_nats::ConnectError) -> Error {
    let servers = settings.servers.join(", ");
    let cause = std::error::Error::source(err).map_or_else(|| err.to_string(), |c| c.to_string());
    let tls_words = ["certificate", "corrupt message", "handshake", "tls", "TLS"];
    let (reason, hint) = match err.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            let (what, hint) = match &settings.auth {
                Auth::None => (
                    "the server requires credentials and the URL gives none".to_owned(),
                    "put them in the URL: nats://USER:PASSWORD@HOST:PORT, nats://TOKEN@HOST:PORT, or ?creds=PATH",
                ),
                Auth::UserPassword(user, _) => (
                    format!("the server refused user {user:?} with this password"),
                    "check the user name and password in the URL (nats://USER:PASSWORD@HOST:PORT, percent-encoded)",
                ),
                Auth::Token(_) => (
                    "the server refused the token".to_owned(),
                    "check the token in the URL (nats://TOKEN@HOST:PORT, percent-encoded)",
                ),
                Auth::Creds(path) => (
                    format!("the server refused the credentials in {}", path.display()),
                    "check that the creds file belongs to a user of this server's account",
                ),
            };
            (
                format!("authentication failed: {what} ({cause})"),
                hint.to_owned(),
            )
        }
        ConnectErrorKind::TimedOut => (
            format!("no answer from {servers} within {:?}", settings.timeout),
            format!(
                "check that nats-server is running there, that no firewall drops the connection, and that the server {}; ?timeout_ms=N waits longer",
                if settings.tls {
                    "speaks TLS (for one without, use nats://)"
                } else {
                    "does not require TLS (for one that does, use tls://)"
                }
            ),
        ),
        ConnectErrorKind::Dns => (
            format!("the host name does not resolve ({cause})"),
            "check the host names in the URL".to_owned(),
        ),
        ConnectErrorKind::Io
            if std::error::Error::source(err)
                .and_then(|c| c.downcast_ref::<std::io::Error>())
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused) =>
        {
            (
                format!("connection refused at {servers}"),
                "check that nats-server is running there and that the URL's hosts and ports are right"
                    .to_owned(),
            )
        }
        // rustls reports a certificate it does not trust, or a server that answers in plain text,
        // as an I/O error.
        kind if kind == ConnectErrorKind::Tls
            || (settings.tls && tls_words.iter().any(|w| cause.contains(w))) =>
        {
            (
                format!("the TLS handshake with {servers} failed ({cause})"),
                "check ca=, cert= and key=, and that the server has TLS (for one without, use nats://)"
                    .to_owned(),
            )
        }
        _ => (
            format!("{cause} (servers tried: {servers})"),
            "check that the URL names nats-server client ports (4222 by default)".to_owned(),
        ),
    };
    Error::connect(DRIVER, &settings.redacted, reason, hint)
}

async fn connect_client(settings: &Settings) -> Result<async_nats::Client> {
    let mut opts = ConnectOptions::new()
        .name("dlock")
        .connection_timeout(settings.timeout)
        .request_timeout(Some(settings.timeout));
    opts = match &settings.auth {
        Auth::None => opts,
        Auth::UserPassword(u, p) => opts.user_and_password(u.clone(), p.clone()),
        Auth::Token(t) => opts.token(t.clone()),
        Auth::Creds(path) => opts.credentials_file(path).await.map_err(|e| {
            Error::invalid_url(
                &settings.redacted,
                format!("creds={}: cannot read it: {e}", path.display()),
            )
        })?,
    };
    if settings.tls {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &settings.ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &settings.client_cert {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if !settings.discover {
        opts = opts.ignore_discovered_servers();
    }
    let addrs = settings
        .servers
        .iter()
        .map(|s| {
            format!("nats://{s}").parse::<ServerAddr>().map_err(|e| {
                Error::invalid_url(
                    &settings.redacted,
                    format!("bad server address {s:?} ({e}); write nats://HOST:PORT,HOST:PORT"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    opts.connect(addrs)
        .await
        .map_err(|err| connect_error(settings, &err))
}

/// How many messages each subject keeps where writes are verified: enough to see every write that
/// raced with a given one (racers are the clients writing one name within one replication round).
const VERIFY_HISTORY: i64 = 32;

/// Whether the server's compare-and-set can be trusted. NATS 2.9 clusters do not enforce
/// `Nats-Expected-Last-Subject-Sequence` (nor expected last sequence or message-id dedupe) between
/// writes that are in flight at the same time: measured on 2.9.10 with R3, most rounds of four racing
/// writers had several winners. Single servers and 2.11+ clusters had none. Where it cannot be trusted,
/// every head write and renewal is checked after the fact against the subject's history, which the
/// stream's total order makes the same for every reader (see the crate docs).
fn verify_writes(version: &str, replicas: usize) -> bool {
    replicas > 1 && parse_version(version) < (2, 11)
}

fn wanted_config(settings: &Settings, mode: LeaseMode, replicas: usize) -> StreamConfig {
    StreamConfig {
        name: settings.stream.clone(),
        description: Some("dlock lock queues (dlock-jetstream)".into()),
        subjects: vec![format!("{}.>", settings.prefix)],
        retention: RetentionPolicy::Limits,
        max_messages_per_subject: if verify_writes_for(mode, replicas) {
            VERIFY_HISTORY
        } else {
            1
        },
        max_messages: -1,
        max_bytes: -1,
        max_age: Duration::ZERO,
        discard: DiscardPolicy::Old,
        storage: StorageType::File,
        num_replicas: replicas,
        // Direct gets may be served by followers that lag; every read here goes to the leader.
        allow_direct: false,
        deny_delete: true,
        deny_purge: false,
        allow_message_ttl: mode == LeaseMode::ServerTtl,
        subject_delete_marker_ttl: (mode == LeaseMode::ServerTtl).then_some(MARKER_TTL),
        ..Default::default()
    }
}

/// [`verify_writes`] for a stream this client creates: client-clock mode means a pre-2.11 server.
fn verify_writes_for(mode: LeaseMode, replicas: usize) -> bool {
    mode == LeaseMode::ClientClock && replicas > 1
}

/// Why an existing stream cannot hold locks, if it cannot.
fn incompatibility(cfg: &StreamConfig, settings: &Settings, version: &str) -> Option<String> {
    let subject = format!("{}.>", settings.prefix);
    if !cfg.subjects.contains(&subject) {
        return Some(format!(
            "its subjects {:?} do not include {subject:?}",
            cfg.subjects
        ));
    }
    let history = if verify_writes(version, cfg.num_replicas) {
        VERIFY_HISTORY
    } else {
        1
    };
    if cfg.max_messages_per_subject < history || cfg.max_messages_per_subject > VERIFY_HISTORY {
        return Some(format!(
            "max_msgs_per_subject is {}, not {history}",
            cfg.max_messages_per_subject
        ));
    }
    if cfg.retention != RetentionPolicy::Limits {
        return Some("its retention is not limits".into());
    }
    if cfg.discard_new_per_subject {
        return Some("discard_new_per_subject would refuse every update".into());
    }
    if !cfg.max_age.is_zero() || cfg.max_messages > 0 || cfg.max_bytes > 0 {
        return Some(
            "it has max_age, max_msgs or max_bytes limits, which would drop queue heads of held locks"
                .into(),
        );
    }
    if cfg.allow_direct || cfg.mirror_direct {
        return Some("allow_direct is on: follower reads could be stale".into());
    }
    if cfg.deny_purge {
        return Some("deny_purge is on".into());
    }
    if cfg.sealed || cfg.mirror.is_some() {
        return Some("it is sealed or a mirror".into());
    }
    if cfg.allow_message_ttl && cfg.subject_delete_marker_ttl.is_none() {
        return Some("it allows message TTLs but has no subject delete markers".into());
    }
    if let Some(r) = settings.replicas {
        if cfg.num_replicas.max(1) != r {
            return Some(format!(
                "it has {} replicas, the URL asks for {r}",
                cfg.num_replicas
            ));
        }
    }
    if let Some(mode) = settings.lease {
        let has = if cfg.allow_message_ttl {
            LeaseMode::ServerTtl
        } else {
            LeaseMode::ClientClock
        };
        if has != mode {
            return Some(format!(
                "its lease mode is {} (allow_msg_ttl {}), the URL asks for lease={}",
                has.as_str(),
                cfg.allow_message_ttl,
                mode.as_str()
            ));
        }
    }
    None
}

/// Makes sure the stream exists and fits; returns its lease mode and replica count.
async fn ensure_stream(
    js: &jetstream::Context,
    settings: &Settings,
    version: &str,
) -> Result<(LeaseMode, usize)> {
    let has_ttl = parse_version(version) >= (2, 11);
    let mode = match settings.lease {
        Some(LeaseMode::ServerTtl) if !has_ttl => {
            return Err(Error::Unsupported {
                driver: DRIVER,
                what: format!(
                    "lease=ttl needs NATS 2.11 or newer (per-message TTL); the server at {} is {version}",
                    settings.redacted
                ),
            })
        }
        Some(m) => m,
        None if has_ttl => LeaseMode::ServerTtl,
        None => LeaseMode::ClientClock,
    };
    let replicas = settings.replicas.unwrap_or(1);
    // Right after a cluster starts (or during an election) the API may answer "not available" for a
    // moment; keep trying for a while before giving up.
    let give_up = Instant::now() + settings.timeout * 3;
    let mut backoff = Duration::from_millis(50);
    loop {
        let attempt: Result<Option<(LeaseMode, usize)>> = async {
            match js.get_stream(&settings.stream).await {
                Ok(stream) => {
                    let cfg = &stream.cached_info().config;
                    if let Some(why) = incompatibility(cfg, settings, version) {
                        return Err(Error::connect(
                            DRIVER,
                            &settings.redacted,
                            format!("the stream {:?} exists but cannot hold locks: {why}", settings.stream),
                            "use another stream= (and prefix=), or delete that stream",
                        ));
                    }
                    let mode = if cfg.allow_message_ttl {
                        LeaseMode::ServerTtl
                    } else {
                        LeaseMode::ClientClock
                    };
                    Ok(Some((mode, cfg.num_replicas.max(1))))
                }
                Err(err) => match err.kind() {
                    GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                        match js.create_stream(wanted_config(settings, mode, replicas)).await {
                            Ok(_) => {
                                tracing::info!(stream = %settings.stream, lease = mode.as_str(), replicas, "dlock-jetstream: created the lock stream");
                                Ok(None)
                            }
                            Err(err) => Err(backend(err)),
                        }
                    }
                    _ => Err(backend(err)),
                },
            }
        }
        .await;
        match attempt {
            Ok(Some(found)) => return Ok(found),
            // Created: read it back and check it like any other.
            Ok(None) => continue,
            Err(err @ Error::Backend { .. }) if Instant::now() + backoff < give_up => {
                tracing::debug!(error = %err, "dlock-jetstream: stream not ready; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(err) => return Err(err),
        }
    }
}

impl Inner {
    fn subjects(&self, name: &LockName) -> NameSubjects {
        NameSubjects::new(&self.prefix, name)
    }

    /// The last message on `subject`, read through the stream leader (`STREAM.MSG.GET`, never a direct
    /// get, which a lagging follower may answer).
    async fn last(&self, subject: &str) -> Result<Option<StreamMessage>> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(msg) => Ok(Some(msg)),
            Err(err) if matches!(err.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(err) => Err(backend(err)),
        }
    }

    /// The first message on `subject` at or after sequence `from`, through the leader.
    async fn first_from(&self, subject: &str, from: u64) -> Result<Option<StreamMessage>> {
        match self
            .stream
            .get_first_raw_message_by_subject(subject, from)
            .await
        {
            Ok(msg) => Ok(Some(msg)),
            Err(err) if matches!(err.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(err) => Err(backend(err)),
        }
    }

    /// The head that counts, given the last message on the head subject: with verified writes, a head
    /// counts only if no other message came between its base and it; otherwise the first message after
    /// that base is the one that won, and is checked the same way.
    async fn resolve_head(&self, subject: &str, msg: StreamMessage) -> Result<StreamMessage> {
        self.resolve(subject, msg, |payload| {
            serde_json::from_slice::<HeadDoc>(payload)
                .ok()
                .map(|doc| doc.base)
        })
        .await
    }

    /// The write that counts, given the last message on a subject whose messages name their base
    /// (`base_of`; `None`: the message counts as it is): see [`Inner::resolve_head`].
    async fn resolve(
        &self,
        subject: &str,
        mut msg: StreamMessage,
        base_of: impl Fn(&[u8]) -> Option<u64>,
    ) -> Result<StreamMessage> {
        if !self.verify {
            return Ok(msg);
        }
        for _ in 0..VERIFY_HISTORY {
            let Some(base) = base_of(&msg.payload) else {
                return Ok(msg);
            };
            match self.first_from(subject, base + 1).await? {
                Some(first) if first.sequence == msg.sequence => return Ok(msg),
                Some(first) if first.sequence < msg.sequence => msg = first,
                _ => break,
            }
        }
        Err(backend_msg(format!(
            "cannot tell which write to {subject} won: its history is shorter than the writes that raced"
        )))
    }

    async fn publish(
        &self,
        subject: String,
        message: PublishMessage,
    ) -> std::result::Result<u64, PublishError> {
        // "No responders" (reported as no stream for the subject) means no server stored the
        // message: in a cluster it is seen for a moment while the stream's interest moves between
        // servers (an election, a restart, a loaded node). Sending it again is safe.
        // An R3 election on a loaded machine takes seconds, hence the budget.
        let give_up = tokio::time::Instant::now() + NO_RESPONDERS_BUDGET;
        let mut pause = Duration::from_millis(20);
        loop {
            match self
                .js
                .send_publish(subject.clone(), message.clone())
                .await?
                .await
            {
                Err(err)
                    if err.kind() == PublishErrorKind::StreamNotFound
                        && tokio::time::Instant::now() + pause < give_up =>
                {
                    tracing::debug!(%subject, "dlock-jetstream: no responders; publishing again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                other => return Ok(other?.sequence),
            }
        }
    }

    /// A lower bound of the server's clock now: the timestamp of a message written just now.
    async fn server_clock(&self) -> Result<Option<i128>> {
        let subject = clock_subject(&self.prefix);
        self.publish(
            subject.clone(),
            PublishMessage::build().payload(Default::default()),
        )
        .await
        .map_err(backend)?;
        Ok(self.last(&subject).await?.map(|m| nanos(&m)))
    }

    /// Removes the messages of `subject` up to and including `seq`: a compare-and-delete, since a
    /// newer message (a renewal) survives it. Returns how many were removed.
    async fn purge_upto(&self, subject: &str, seq: u64) -> Result<u64> {
        let resp = self
            .stream
            .purge()
            .filter(subject)
            .sequence(seq + 1)
            .await
            .map_err(backend)?;
        Ok(resp.purged)
    }

    async fn purge_all(&self, subject: &str) -> Result<()> {
        self.stream.purge().filter(subject).await.map_err(backend)?;
        Ok(())
    }

    fn entry_doc(&self, created: u64, ttl: Duration) -> PublishMessage {
        let doc = EntryDoc {
            v: 1,
            created,
            ttl_ms: millis(ttl),
        };
        let payload = serde_json::to_vec(&doc).expect("entry docs serialize");
        let mut msg = PublishMessage::build().payload(payload.into());
        if self.mode == LeaseMode::ServerTtl {
            msg = msg.header("Nats-TTL", ttl_header(ttl).as_str());
        }
        msg
    }

    /// Reads the name's queue: the head, then every listed entry (in parallel), all from the leader.
    async fn load(
        &self,
        name: &LockName,
        subjects: &NameSubjects,
        probe: bool,
        extra: Option<&str>,
    ) -> Result<Snapshot> {
        let head_subject = subjects.head();
        let clock = async {
            if probe && self.mode == LeaseMode::ClientClock {
                self.server_clock().await
            } else {
                Ok(None)
            }
        };
        let fresh = async {
            match extra {
                Some(s) => Ok(self.last(s).await?.map(|m| nanos(&m))),
                None => Ok(None),
            }
        };
        let (head, clock, fresh) = tokio::join!(self.last(&head_subject), clock, fresh);
        let (head, clock, fresh): (_, Option<i128>, Option<i128>) = (head?, clock?, fresh?);
        let mut server_now = clock.max(fresh);
        let head_last = head.as_ref().map_or(0, |m| m.sequence);
        let head = match head {
            Some(msg) if !is_marker(&msg) && !msg.payload.is_empty() => {
                Some(self.resolve_head(&head_subject, msg).await?)
            }
            other => other,
        };
        let mut entries = match head {
            None => Vec::new(),
            Some(msg) => {
                server_now = server_now.max(Some(nanos(&msg)));
                if is_marker(&msg) || msg.payload.is_empty() {
                    Vec::new()
                } else {
                    let doc: HeadDoc = serde_json::from_slice(&msg.payload).map_err(|e| {
                        backend_msg(format!(
                            "the queue head {head_subject} is not a dlock head: {e}"
                        ))
                    })?;
                    if doc.name != name.as_str() {
                        return Err(backend_msg(format!(
                            "the lock names {:?} and {:?} hash to the same subject token (SHA-256 collision); refusing to merge them",
                            doc.name.chars().take(64).collect::<String>(),
                            name.as_str().chars().take(64).collect::<String>()
                        )));
                    }
                    doc.entries
                        .iter()
                        .map(|e| Entry::decode(e, msg.sequence))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            backend_msg(format!("the queue head {head_subject} has a bad entry"))
                        })?
                }
            }
        };
        entries.sort_by_key(|e| e.queue.seq);
        let reads = entries
            .iter()
            .map(|e| self.last_owned(subjects.entry(&e.owner)));
        let messages = futures::future::try_join_all(reads).await?;
        for m in messages.iter().flatten() {
            server_now = server_now.max(Some(nanos(m)));
        }
        let liveness = entries
            .iter()
            .zip(&messages)
            .map(|(e, m)| self.liveness(e, m.as_ref(), server_now))
            .collect();
        Ok(Snapshot {
            head_last,
            entries,
            liveness,
            server_now,
            read_at: Instant::now(),
        })
    }

    async fn last_owned(&self, subject: String) -> Result<Option<StreamMessage>> {
        self.last(&subject).await
    }

    fn liveness(&self, e: &Entry, msg: Option<&StreamMessage>, now: Option<i128>) -> Liveness {
        let Some(msg) = msg else {
            return Liveness::Dead {
                purge: None,
                why: "its entry is gone",
            };
        };
        if is_marker(msg) {
            return Liveness::Dead {
                purge: None,
                why: "its lease ran out",
            };
        }
        let Ok(doc) = serde_json::from_slice::<EntryDoc>(&msg.payload) else {
            tracing::warn!(subject = %msg.subject, "dlock-jetstream: unreadable entry; treating it as gone");
            return Liveness::Dead {
                purge: Some(msg.sequence),
                why: "its entry is unreadable",
            };
        };
        let created = if doc.created == 0 {
            msg.sequence
        } else {
            doc.created
        };
        if created != e.queue.seq {
            // A later incarnation of the same owner's entry: the one the head lists is gone.
            return Liveness::Dead {
                purge: None,
                why: "its entry was replaced",
            };
        }
        match self.mode {
            LeaseMode::ServerTtl => Liveness::Alive { expires: None },
            LeaseMode::ClientClock => {
                let lease = i128::from(doc.ttl_ms) * 1_000_000;
                let skew = i128::try_from(self.clock_skew.as_nanos()).unwrap_or(i128::MAX / 4);
                let expires = nanos(msg) + lease + skew;
                if now.is_some_and(|now| now > expires) {
                    Liveness::Dead {
                        purge: Some(msg.sequence),
                        why: "its lease ran out by the server's clock",
                    }
                } else {
                    Liveness::Alive {
                        expires: Some(expires),
                    }
                }
            }
        }
    }

    /// Rewrites the head with compare-and-set on its last sequence; an empty queue removes the head.
    async fn write_head(
        &self,
        name: &LockName,
        subjects: &NameSubjects,
        entries: &[Entry],
        head_seq: u64,
    ) -> Result<HeadWrite> {
        let subject = subjects.head();
        // With verified writes the chain of heads must not restart, so an empty queue keeps its head.
        if entries.is_empty() && !self.verify {
            if head_seq == 0 {
                return Ok(HeadWrite::Written(0));
            }
            return Ok(match self.purge_upto(&subject, head_seq).await? {
                0 => HeadWrite::Conflict,
                _ => HeadWrite::Written(0),
            });
        }
        let doc = HeadDoc {
            v: 1,
            name: name.as_str().to_owned(),
            base: head_seq,
            entries: entries.iter().map(Entry::encode).collect(),
        };
        let payload = serde_json::to_vec(&doc).expect("head docs serialize");
        let msg = PublishMessage::build()
            .payload(payload.into())
            .expected_last_subject_sequence(head_seq);
        match self.publish(subject.clone(), msg).await {
            Ok(seq) if self.verify => {
                // Won only if nothing else landed between the base and this write.
                let first = self.first_from(&subject, head_seq + 1).await?;
                Ok(if first.is_some_and(|f| f.sequence == seq) {
                    HeadWrite::Written(seq)
                } else {
                    HeadWrite::Conflict
                })
            }
            Ok(seq) => Ok(HeadWrite::Written(seq)),
            Err(err) if is_wrong_last_sequence(&err) => Ok(HeadWrite::Conflict),
            Err(err) => Err(backend(err)),
        }
    }

    /// Reads the queue, drops dead entries, applies `op` and the grant rule, and writes the result back
    /// if anything changed; retried from the read whenever another client changed the queue first.
    async fn settle(
        &self,
        name: &LockName,
        subjects: &NameSubjects,
        op: Op<'_>,
        probe: bool,
        extra: Option<&str>,
    ) -> Result<Settled> {
        // Waiters only looking run side by side; changes of this client's own take turns.
        let _turn = match op {
            Op::Settle => None,
            _ => Some(self.head_writers.turn(name).await),
        };
        for attempt in 0..MAX_ATTEMPTS {
            if attempt >= 3 {
                // Many clients racing on one head: spread the retries out.
                let spread = rand_millis(u64::from(attempt).min(40));
                tokio::time::sleep(Duration::from_millis(spread)).await;
            }
            let snap = self
                .load(name, subjects, probe && attempt == 0, extra)
                .await?;
            let mut entries = Vec::with_capacity(snap.entries.len() + 1);
            let mut purges = Vec::new();
            let mut next_expiry: Option<i128> = None;
            for (e, l) in snap.entries.iter().zip(&snap.liveness) {
                match *l {
                    Liveness::Alive { expires } => {
                        if let Some(x) = expires {
                            next_expiry = Some(next_expiry.map_or(x, |n| n.min(x)));
                        }
                        entries.push(e.clone());
                    }
                    Liveness::Dead { purge, why } => {
                        let own = match op {
                            Op::Remove(owner) => owner == &e.owner,
                            _ => false,
                        };
                        if !own {
                            tracing::debug!(name = %name, owner = %e.owner, seq = e.queue.seq, granted = e.queue.granted, why, "dlock-jetstream: dropping an entry from the queue");
                        }
                        if let Some(seq) = purge {
                            purges.push((subjects.entry(&e.owner), seq));
                        }
                    }
                }
            }
            let mut changed = entries.len() != snap.entries.len();
            changed |= decide(&mut entries);
            match op {
                Op::Settle => {}
                Op::Add {
                    owner,
                    seq,
                    mode,
                    wait,
                } => {
                    if !entries.iter().any(|e| &e.owner == owner) {
                        let at = entries.partition_point(|e| e.queue.seq < seq);
                        entries.insert(
                            at,
                            Entry {
                                owner: owner.clone(),
                                queue: QueueEntry::waiting(seq, mode),
                                token: 0,
                            },
                        );
                        if !wait && !grant::grantable(&view(&entries), at) {
                            return Err(Error::WouldBlock {
                                name: name.to_string(),
                            });
                        }
                        changed = true;
                        decide(&mut entries);
                    }
                }
                Op::Remove(owner) => {
                    if let Some(at) = entries.iter().position(|e| &e.owner == owner) {
                        entries.remove(at);
                        changed = true;
                        decide(&mut entries);
                    }
                }
                Op::Convert(owner, mode) => {
                    let at = entries
                        .iter()
                        .position(|e| &e.owner == owner)
                        .ok_or_else(|| lost(name))?;
                    let me = entries[at].queue;
                    if !me.granted {
                        return Err(backend_msg(format!(
                            "cannot convert lock {name:?}: it is not granted yet"
                        )));
                    }
                    if mode == me.mode {
                        if me.converting_to.is_some() {
                            entries[at].queue.converting_to = None;
                            changed = true;
                        }
                    } else if me.converting_to != Some(mode) {
                        if grant::conversion_deadlocks(&view(&entries), at, mode) {
                            return Err(Error::ConversionDeadlock {
                                name: name.to_string(),
                                from: me.mode,
                                to: mode,
                            });
                        }
                        entries[at].queue.converting_to = Some(mode);
                        changed = true;
                    }
                    changed |= decide(&mut entries);
                }
            }
            let next_expiry = match (next_expiry, snap.server_now) {
                (Some(x), Some(now)) => Some(Duration::from_nanos(
                    u64::try_from((x - now).max(0)).unwrap_or(u64::MAX),
                )),
                (Some(_), None) => Some(Duration::ZERO),
                _ => None,
            };
            if !changed {
                return Ok(Settled {
                    entries,
                    next_expiry,
                    read_at: snap.read_at,
                });
            }
            // An expired entry leaves the store before the head forgets it, and only if its holder has
            // not renewed it since the read: otherwise a late renewal could revive a forgotten entry.
            let mut renewed = false;
            for (subject, seq) in &purges {
                if self.purge_upto(subject, *seq).await? == 0 {
                    renewed = true;
                } else if self.verify && self.last(subject).await?.is_some() {
                    // A renewal proposed before the purge applied landed after it; its holder will
                    // find its base gone and give up, but until then the entry counts as live.
                    renewed = true;
                }
            }
            if renewed {
                continue;
            }
            match self
                .write_head(name, subjects, &entries, snap.head_last)
                .await?
            {
                HeadWrite::Conflict => continue,
                HeadWrite::Written(seq) => {
                    for e in &mut entries {
                        if e.queue.granted && e.token == 0 {
                            e.token = seq;
                        }
                    }
                    return Ok(Settled {
                        entries,
                        next_expiry,
                        read_at: snap.read_at,
                    });
                }
            }
        }
        Err(backend_msg(format!(
            "gave up updating the queue of lock {name:?} after {MAX_ATTEMPTS} attempts lost to concurrent updates"
        )))
    }

    fn cached(&self, key: &EntryKey) -> Option<Cached> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }

    fn cache(&self, key: &EntryKey, c: Option<Cached>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match c {
            Some(c) => {
                entries.insert(key.clone(), c);
            }
            None => {
                entries.remove(key);
            }
        }
    }

    /// Reads a fence register through the leader: its value (0 when never raised) and the sequence
    /// of the last message on its subject (0: none), which the next write expects. With verified
    /// writes, the value is that of the write that counts (see [`Inner::resolve`]).
    async fn read_fence(&self, name: &LockName, subject: &str) -> Result<(u64, u64)> {
        let Some(msg) = self.last(subject).await? else {
            return Ok((0, 0));
        };
        let last = msg.sequence;
        let msg = self
            .resolve(subject, msg, |payload| {
                serde_json::from_slice::<FenceDoc>(payload)
                    .ok()
                    .map(|doc| doc.base)
            })
            .await?;
        if is_marker(&msg) {
            // Only an operator's purge or delete can leave one: the register is gone.
            return Ok((0, last));
        }
        let doc: FenceDoc = serde_json::from_slice(&msg.payload).map_err(|e| {
            backend_msg(format!(
                "the fence register {subject} (sequence {}) is not a dlock fence register: {e}",
                msg.sequence
            ))
        })?;
        if doc.name != name.as_str() {
            return Err(backend_msg(format!(
                "the lock names {:?} and {:?} hash to the same subject token (SHA-256 collision); refusing to merge their fence registers",
                doc.name.chars().take(64).collect::<String>(),
                name.as_str().chars().take(64).collect::<String>()
            )));
        }
        Ok((doc.value, last))
    }

    /// Raises a fence register: read it, and if it is below `floor`, write `floor` with
    /// compare-and-set on the last message read; a lost compare-and-set reads again. With verified
    /// writes, a write that the server took counts only if it is the first message after the one its
    /// writer read (the register then never reads lower because of a racing write of a lower value,
    /// see the crate docs for the one exception); one that does not count reads again.
    async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64> {
        let subject = self.subjects(name).fence();
        for attempt in 0..MAX_ATTEMPTS {
            if attempt >= 3 {
                // Many clients raising one register at once: spread the retries out.
                let spread = rand_millis(u64::from(attempt).min(40));
                tokio::time::sleep(Duration::from_millis(spread)).await;
            }
            let (value, last) = self.read_fence(name, &subject).await?;
            if value >= floor {
                return Ok(value);
            }
            let doc = FenceDoc {
                v: 1,
                name: name.as_str().to_owned(),
                value: floor,
                base: last,
            };
            let payload = serde_json::to_vec(&doc).expect("fence docs serialize");
            // No `Nats-TTL`, and the stream has no age limit: the register never expires.
            let msg = PublishMessage::build()
                .payload(payload.into())
                .expected_last_subject_sequence(last);
            match self.publish(subject.clone(), msg).await {
                Ok(seq) if self.verify => {
                    let first = self.first_from(&subject, last + 1).await?;
                    if first.is_some_and(|f| f.sequence == seq) {
                        return Ok(floor);
                    }
                    // Another write landed between our base and ours: it counts, ours does not.
                    tracing::debug!(name = %name, floor, "dlock-jetstream: a fence register write raced with another and does not count; reading again");
                }
                Ok(_) => return Ok(floor),
                Err(err) if is_wrong_last_sequence(&err) => {}
                Err(err) => return Err(backend(err)),
            }
        }
        Err(backend_msg(format!(
            "gave up raising the fence register of lock {name:?} after {MAX_ATTEMPTS} attempts lost to concurrent raises"
        )))
    }

    /// The own entry as the store has it now, if it is live.
    async fn read_entry(&self, subject: &str) -> Result<Option<Cached>> {
        let Some(msg) = self.last(subject).await? else {
            return Ok(None);
        };
        if is_marker(&msg) {
            return Ok(None);
        }
        let Ok(doc) = serde_json::from_slice::<EntryDoc>(&msg.payload) else {
            return Ok(None);
        };
        Ok(Some(Cached {
            last: msg.sequence,
            created: if doc.created == 0 {
                msg.sequence
            } else {
                doc.created
            },
        }))
    }
}

/// A small pseudo-random number below `bound` (jitter only; no quality needed).
fn rand_millis(bound: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(bound);
    h.finish() % bound.max(1)
}

#[async_trait]
impl Driver for JetStreamDriver {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities.clone()
    }

    async fn enqueue(&self, request: &EntryRequest) -> Result<Enqueued> {
        let inner = &*self.inner;
        let key = &request.key;
        let subjects = inner.subjects(&key.name);
        let entry_subject = subjects.entry(&key.owner);
        let created = inner
            .publish(
                entry_subject.clone(),
                inner
                    .entry_doc(0, request.ttl)
                    .expected_last_subject_sequence(0),
            )
            .await;
        let cached = match created {
            Ok(seq) => Cached {
                last: seq,
                created: seq,
            },
            // A retried enqueue: the entry is there already.
            Err(err) if is_wrong_last_sequence(&err) => inner
                .read_entry(&entry_subject)
                .await?
                .ok_or_else(|| lost(&key.name))?,
            Err(err) => return Err(backend(err)),
        };
        inner.cache(key, Some(cached));
        let settled = inner
            .settle(
                &key.name,
                &subjects,
                Op::Add {
                    owner: &key.owner,
                    seq: cached.created,
                    mode: request.mode,
                    wait: request.wait,
                },
                false,
                Some(&entry_subject),
            )
            .await;
        match settled {
            Ok(s) => s
                .answer(&key.owner)
                .map(Enqueued::from)
                .ok_or_else(|| lost(&key.name)),
            Err(err) => {
                if err.is_would_block() {
                    inner.cache(key, None);
                    // Leaves no trace; if this fails the entry, which no head lists, just runs out.
                    if let Err(e) = inner.purge_all(&entry_subject).await {
                        tracing::debug!(error = %e, "dlock-jetstream: could not remove a refused entry");
                    }
                }
                Err(err)
            }
        }
    }

    async fn wait(&self, key: &EntryKey) -> Result<Grant> {
        let inner = &*self.inner;
        let subjects = inner.subjects(&key.name);
        let mut sub = inner.watches.subscribe(&inner.stream, &subjects);
        sub.ready(inner.timeout).await;
        let mut probe = false;
        let mut backoff = Duration::from_millis(50);
        loop {
            sub.changes.borrow_and_update();
            let settled = match inner
                .settle(&key.name, &subjects, Op::Settle, probe, None)
                .await
            {
                Ok(s) => s,
                Err(err) if err.is_transient() => {
                    // The store is unreachable or electing a leader; the lease (and the caller's
                    // timeout) bound how long this goes on.
                    tracing::debug!(name = %key.name, error = %err, "dlock-jetstream: queue read failed while waiting; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                Err(err) => return Err(err),
            };
            backoff = Duration::from_millis(50);
            let Some(me) = settled.find(&key.owner) else {
                tracing::debug!(name = %key.name, owner = %key.owner, "dlock-jetstream: the queue no longer lists this waiter");
                return Err(lost(&key.name));
            };
            if let Some(g) = granted(me) {
                return Ok(g);
            }
            // Wake on a change of the head, a delete marker, or when the next lease runs out by the
            // server's clock (client-clock mode), whichever comes first.
            let mut nap = inner.recheck;
            if !sub.is_ready() {
                nap = nap.min(BLIND_POLL);
            }
            let mut expiry_first = false;
            if let Some(x) = settled.next_expiry {
                let x = x + Duration::from_millis(1);
                if x < nap {
                    nap = x;
                    expiry_first = true;
                }
            }
            let wake = settled.read_at + nap;
            tokio::select! {
                changed = sub.changes.changed() => {
                    probe = false;
                    if changed.is_err() {
                        sub = inner.watches.subscribe(&inner.stream, &subjects);
                    }
                }
                _ = tokio::time::sleep_until(wake) => probe = expiry_first,
            }
        }
    }

    async fn renew(&self, key: &EntryKey, ttl: Duration) -> Result<Instant> {
        let inner = &*self.inner;
        let subject = inner.subjects(&key.name).entry(&key.owner);
        let mut cached = match inner.cached(key) {
            Some(c) => c,
            None => inner
                .read_entry(&subject)
                .await?
                .ok_or_else(|| lost(&key.name))?,
        };
        for _ in 0..3 {
            let sent = Instant::now();
            let msg = inner
                .entry_doc(cached.created, ttl)
                .expected_last_subject_sequence(cached.last);
            match inner.publish(subject.clone(), msg).await {
                Ok(seq) => {
                    if inner.verify {
                        // Counts only if it directly followed its base and the base was not purged
                        // first (an expired entry is purged before the queue forgets it).
                        let (base, first) = tokio::join!(
                            inner.first_from(&subject, cached.last),
                            inner.first_from(&subject, cached.last + 1)
                        );
                        let valid = base?.is_some_and(|m| m.sequence == cached.last)
                            && first?.is_some_and(|m| m.sequence == seq);
                        if !valid {
                            inner.cache(key, None);
                            return Err(lost(&key.name));
                        }
                    }
                    cached.last = seq;
                    inner.cache(key, Some(cached));
                    return Ok(sent);
                }
                Err(err) if is_wrong_last_sequence(&err) => {
                    // Either an earlier renewal landed but its ack was lost, or the entry is gone.
                    match inner.read_entry(&subject).await? {
                        Some(now) if now.created == cached.created && now.last != cached.last => {
                            cached = now;
                        }
                        _ => {
                            inner.cache(key, None);
                            return Err(lost(&key.name));
                        }
                    }
                }
                Err(err) => return Err(backend(err)),
            }
        }
        Err(lost(&key.name))
    }

    async fn release(&self, key: &EntryKey) -> Result<()> {
        let inner = &*self.inner;
        let subjects = inner.subjects(&key.name);
        // The lease goes first: from here on no renewal can succeed, so whatever happens to the head
        // update below, the entry is dead and the next reader drops it.
        inner.purge_all(&subjects.entry(&key.owner)).await?;
        inner.cache(key, None);
        inner
            .settle(&key.name, &subjects, Op::Remove(&key.owner), false, None)
            .await?;
        Ok(())
    }

    async fn convert(&self, key: &EntryKey, mode: LockMode) -> Result<Queued> {
        let inner = &*self.inner;
        let subjects = inner.subjects(&key.name);
        let settled = inner
            .settle(
                &key.name,
                &subjects,
                Op::Convert(&key.owner, mode),
                false,
                None,
            )
            .await?;
        settled.answer(&key.owner).ok_or_else(|| lost(&key.name))
    }

    async fn inspect(&self, name: &LockName) -> Result<Vec<EntryInfo>> {
        let inner = &*self.inner;
        let subjects = inner.subjects(name);
        // Probing the server's clock (one write, client-clock mode only) is what tells an expired
        // entry from a live one when nothing else wrote to the name since it expired.
        let snap = inner.load(name, &subjects, true, None).await?;
        Ok(snap
            .entries
            .iter()
            .zip(&snap.liveness)
            .filter(|(_, l)| matches!(l, Liveness::Alive { .. }))
            .map(|(e, _)| EntryInfo {
                owner: e.owner.clone(),
                seq: e.queue.seq,
                mode: e.queue.mode,
                granted: e.queue.granted,
                converting_to: e.queue.converting_to,
                token: e.queue.granted.then_some(e.token),
            })
            .collect())
    }

    async fn raise_fence(&self, name: &LockName, floor: u64) -> Result<u64> {
        self.inner.raise_fence(name, floor).await
    }
}

impl std::fmt::Debug for JetStreamDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamDriver")
            .field("stream", &self.inner.stream_name)
            .field("lease_mode", &self.inner.mode)
            .field("replicas", &self.inner.replicas)
            .field("server_version", &self.inner.server_version)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_header_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_header(Duration::from_millis(1)), "1");
        assert_eq!(ttl_header(Duration::from_secs(1)), "1");
        assert_eq!(ttl_header(Duration::from_millis(1001)), "2");
        assert_eq!(ttl_header(Duration::from_secs(30)), "30");
    }

    #[test]
    fn versions_parse_from_server_info() {
        assert_eq!(parse_version("2.9.25"), (2, 9));
        assert_eq!(parse_version("2.11.0-beta.1"), (2, 11));
        assert_eq!(parse_version("v2.15.1"), (2, 15));
        assert!(parse_version("2.10.3") < (2, 11));
    }
}
