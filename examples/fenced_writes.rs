//! Fenced writes: a holder paused past its lease wakes up and writes, and the storage refuses the
//! late write because its fencing token is older than one it has already seen.
//!
//! Checking `guard.is_valid()` before a write is not enough: a process can be paused between the
//! check and the write (a GC pause, a swapped-out VM, SIGSTOP) for longer than its lease. Here
//! client A takes the lock, writes, checks that its lock is valid, and is paused — its whole
//! process: thread, runtime and lease keeper — right before its second write. Its lease runs out,
//! client B is granted the lock with a greater fencing token and writes. When A resumes it sends
//! the write it had prepared; the storage, which remembers the highest token it has seen, refuses
//! it. A register without the check would have let it overwrite B's value.
//!
//! With `--url etcd://…` and the `etcd` feature, both clients also write a key in etcd itself with
//! `EtcdDriver::fenced_txn`: a transaction that applies only while the writer's entry still holds
//! the lock in etcd, checked by etcd atomically with the write. A's late transaction is refused
//! there as well.
//!
//! The program checks that A's late write is refused (in etcd too, where used), that B's value is
//! the one that stays, and that A's guard reports the loss. It exits non-zero otherwise.
//!
//! ```text
//! cargo run --example fenced_writes                                     # in-memory driver
//! cargo run --example fenced_writes --features redis -- --url redis://127.0.0.1:6379
//! cargo run --example fenced_writes --features etcd -- --url etcd://127.0.0.1:2379
//! ```

mod common;

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use dlock::{Guard, LockMode, Locks};
use tokio::sync::oneshot;

const NAME: &str = "reports/daily";
/// Short, so that A's lease runs out quickly while it is paused.
const SHORT_TTL: Duration = Duration::from_millis(500);
/// Hang guard for every wait: far above what any step needs.
const LIMIT: Duration = Duration::from_secs(30);

/// Storage that remembers the highest fencing token it has seen and refuses writes with a lower
/// one: the check that makes a stale holder harmless.
#[derive(Default)]
struct FencedRegister {
    inner: Mutex<Register>,
}

#[derive(Default)]
struct Register {
    highest_token: u64,
    value: String,
}

#[derive(Debug)]
struct Refused {
    token: u64,
    highest: u64,
}

impl FencedRegister {
    fn write(&self, token: u64, value: &str) -> Result<(), Refused> {
        let mut r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if token < r.highest_token {
            return Err(Refused {
                token,
                highest: r.highest_token,
            });
        }
        r.highest_token = token;
        r.value = value.to_owned();
        Ok(())
    }

    fn value(&self) -> String {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .value
            .clone()
    }
}

/// The same storage without the check, to show what the late write would have done.
#[derive(Default)]
struct PlainRegister(Mutex<String>);

impl PlainRegister {
    fn write(&self, value: &str) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = value.to_owned();
    }

    fn value(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Storage {
    fenced: FencedRegister,
    plain: PlainRegister,
}

/// A client: its lock client and, on etcd, the driver for fenced transactions.
struct Client {
    locks: Locks,
    #[cfg(feature = "etcd")]
    etcd: Option<dlock::etcd::EtcdDriver>,
}

/// The etcd key both clients write with `fenced_txn`.
#[cfg(feature = "etcd")]
const ETCD_KEY: &str = "fenced_writes/reports/daily";

impl Client {
    async fn connect(url: &str) -> anyhow::Result<Self> {
        #[cfg(feature = "etcd")]
        if url.starts_with("etcd://") || url.starts_with("etcds://") {
            // dlock::connect hides the driver behind `Locks`; fenced_txn needs the driver itself.
            let driver = dlock::etcd::EtcdDriver::connect(url)
                .await
                .with_context(|| format!("connecting to {url}"))?;
            return Ok(Client {
                locks: Locks::new(driver.clone()),
                etcd: Some(driver),
            });
        }
        Ok(Client {
            locks: dlock::connect(url)
                .await
                .with_context(|| format!("connecting to {url}"))?,
            #[cfg(feature = "etcd")]
            etcd: None,
        })
    }

    /// An etcd transaction that puts `value` only while `fence` holds; `Ok(false)` when etcd refused
    /// it because the lock is no longer held. `None` when not on etcd.
    #[cfg(feature = "etcd")]
    async fn etcd_write(
        &self,
        fence: Option<&dlock::etcd::Fence>,
        value: &str,
    ) -> anyhow::Result<Option<bool>> {
        use dlock::etcd::etcd_client::TxnOp;
        let (Some(driver), Some(fence)) = (&self.etcd, fence) else {
            return Ok(None);
        };
        match driver
            .fenced_txn(fence, [TxnOp::put(ETCD_KEY, value, None)])
            .await
        {
            Ok(_) => Ok(Some(true)),
            Err(err) if err.is_lost() => Ok(Some(false)),
            Err(err) => Err(err.into()),
        }
    }

    #[cfg(feature = "etcd")]
    fn etcd_fence(&self, guard: &Guard) -> anyhow::Result<Option<dlock::etcd::Fence>> {
        match &self.etcd {
            Some(driver) => Ok(Some(driver.fence(guard.entry_key())?)),
            None => Ok(None),
        }
    }
}

/// What A's late write met.
struct Late {
    refused: Result<(), Refused>,
    etcd_applied: Option<bool>,
    lost_fired: bool,
}

/// Client A, on a thread and runtime of its own so that blocking the thread pauses all of it.
fn client_a(
    url: String,
    ttl: Duration,
    storage: Arc<Storage>,
    holding: oneshot::Sender<u64>,
    resume: mpsc::Receiver<()>,
) -> anyhow::Result<Late> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = Client::connect(&url).await?;
        let guard = client
            .locks
            .lock(NAME)
            .mode(LockMode::EX)
            .ttl(ttl)
            .timeout(LIMIT)
            .await
            .context("A: taking the lock")?;
        let token = guard.fencing_token();
        println!("A: holds {NAME:?} with token {token} (lease TTL {ttl:?})");
        storage
            .fenced
            .write(token, "A: draft")
            .map_err(|r| anyhow::anyhow!("A's first write was refused: {r:?}"))?;
        storage.plain.write("A: draft");
        println!("A: writes \"A: draft\" with token {token}: accepted");
        #[cfg(feature = "etcd")]
        let fence = client.etcd_fence(&guard)?;
        #[cfg(feature = "etcd")]
        if let Some(applied) = client.etcd_write(fence.as_ref(), "A: draft").await? {
            ensure!(applied, "A's first fenced transaction was refused");
            println!("A: etcd fenced_txn put {ETCD_KEY:?} = \"A: draft\": applied");
        }
        ensure!(guard.is_valid(), "A's lock is not valid before the pause");
        println!("A: is_valid() is true; prepares its final write ... and is paused");
        let _ = holding.send(token);
        // Blocking the thread on purpose: this stops A's runtime, lease keeper included, until B
        // has written.
        resume
            .recv_timeout(LIMIT)
            .context("A: nobody resumed it (B never wrote)")?;
        println!("A: resumes and sends the write it had prepared, with token {token}");
        let refused = storage.fenced.write(token, "A: final");
        storage.plain.write("A: final");
        match &refused {
            Err(r) => println!(
                "A: refused by the storage: token {} is older than {}",
                r.token, r.highest
            ),
            Ok(()) => println!("A: the storage ACCEPTED the stale write"),
        }
        #[cfg(feature = "etcd")]
        let etcd_applied = client.etcd_write(fence.as_ref(), "A: final").await?;
        #[cfg(not(feature = "etcd"))]
        let etcd_applied = None;
        match etcd_applied {
            Some(false) => println!("A: etcd refused its fenced_txn: the lock is no longer A's"),
            Some(true) => println!("A: etcd APPLIED its stale fenced_txn"),
            None => {}
        }
        let lost_fired = observe_loss(&guard, ttl).await;
        Ok(Late {
            refused,
            etcd_applied,
            lost_fired,
        })
    })
}

async fn observe_loss(guard: &Guard, ttl: Duration) -> bool {
    let valid = guard.is_valid();
    let fired = tokio::time::timeout(ttl, guard.lost()).await.is_ok();
    println!("A: is_valid() is {valid} now; lost() fired: {fired}");
    !valid && fired
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = common::store_url("fenced_writes")?;
    let b = Client::connect(&url).await?;
    let ttl = SHORT_TTL.max(b.locks.capabilities().min_ttl);
    let storage = Arc::new(Storage {
        fenced: FencedRegister::default(),
        plain: PlainRegister::default(),
    });

    let (holding_tx, holding) = oneshot::channel();
    let (resume, resume_rx) = mpsc::channel();
    let a = {
        let (url, storage) = (url.clone(), Arc::clone(&storage));
        std::thread::Builder::new()
            .name("client-a".into())
            .spawn(move || client_a(url, ttl, storage, holding_tx, resume_rx))?
    };
    let a_token = match tokio::time::timeout(LIMIT, holding).await {
        Ok(Ok(token)) => token,
        // A failed before holding the lock: its own error says why.
        _ => match a.join() {
            Ok(Err(err)) => return Err(err.context("client A failed")),
            _ => bail!("client A stopped before holding the lock"),
        },
    };

    let guard = b
        .locks
        .lock(NAME)
        .mode(LockMode::EX)
        .ttl(ttl)
        .timeout(LIMIT)
        .await
        .context("B: taking the lock")?;
    let b_token = guard.fencing_token();
    println!("B: granted {NAME:?} with token {b_token}: A's lease ran out while A was paused");
    ensure!(
        b_token > a_token,
        "B's token {b_token} is not above A's {a_token}"
    );
    storage
        .fenced
        .write(b_token, "B: final")
        .map_err(|r| anyhow::anyhow!("B's write was refused: {r:?}"))?;
    storage.plain.write("B: final");
    println!("B: writes \"B: final\" with token {b_token}: accepted");
    #[cfg(feature = "etcd")]
    let b_fence = b.etcd_fence(&guard)?;
    #[cfg(feature = "etcd")]
    if let Some(applied) = b.etcd_write(b_fence.as_ref(), "B: final").await? {
        ensure!(applied, "B's fenced transaction was refused");
        println!("B: etcd fenced_txn put {ETCD_KEY:?} = \"B: final\": applied");
    }

    resume.send(()).context("A is gone")?;
    let late = tokio::task::spawn_blocking(move || a.join())
        .await?
        .map_err(|_| anyhow::anyhow!("client A panicked"))??;

    let fenced = storage.fenced.value();
    let plain = storage.plain.value();
    println!(
        "the fenced register holds {fenced:?}; a register without the check would hold {plain:?}"
    );
    let mut failures = Vec::new();
    if late.refused.is_ok() {
        failures.push("the fenced register accepted A's stale write".to_owned());
    }
    if fenced != "B: final" {
        failures.push(format!(
            "the fenced register holds {fenced:?}, not B's value"
        ));
    }
    if !late.lost_fired {
        failures.push("A's guard did not report the loss (is_valid() false, lost() fired)".into());
    }
    #[cfg(feature = "etcd")]
    if let Some(driver) = &b.etcd {
        if late.etcd_applied != Some(false) {
            failures.push(format!(
                "etcd did not refuse A's late fenced transaction: {:?}",
                late.etcd_applied
            ));
        }
        let mut kv = driver.client().await?.kv_client();
        let got = kv.get(ETCD_KEY, None).await?;
        let value = got
            .kvs()
            .first()
            .map(|kv| kv.value_str().map(str::to_owned))
            .transpose()?;
        println!("etcd holds {ETCD_KEY:?} = {value:?}");
        if value.as_deref() != Some("B: final") {
            failures.push(format!("etcd holds {value:?}, not B's value"));
        }
        kv.delete(ETCD_KEY, None).await?;
    }
    #[cfg(not(feature = "etcd"))]
    let _ = late.etcd_applied;
    guard.release().await?;
    if !failures.is_empty() {
        bail!("fencing failed:\n  {}", failures.join("\n  "));
    }
    println!("ok: the paused holder's late write was refused by its fencing token");
    Ok(())
}
