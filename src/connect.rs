//! Picking a driver from a URL.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use dlock_core::{Error, Locks, MemoryDriver, Result};

/// Connects to the lock store named by `url` and returns a client.
///
/// | scheme | driver | feature |
/// |--------|--------|---------|
/// | `mem://` | a new in-process store, private to this client | (always) |
/// | `mem://NAME` | the in-process store `NAME`, shared by every `connect` to it in this process | (always) |
/// | `redis://`, `rediss://`, `redis+cluster://`, `rediss+cluster://` | Redis (see `dlock_redis`) | `redis` |
/// | `etcd://h1:p1,h2:p2`, `etcds://…` | etcd v3 (see `dlock_etcd`) | `etcd` |
/// | `nats://…`, `tls://…` | NATS JetStream (see `dlock_jetstream`) | `jetstream` |
/// | `quorum:URL1;URL2;URL3` | a majority [`Quorum`](dlock_core::Quorum) over the member stores, each given by its own URL (an odd number, at least three; any of the schemes above) | those of the members |
///
/// A scheme whose driver is not compiled in is refused with an error that names the feature to enable.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dlock::Result<()> {
/// let a = dlock::connect("mem://shop").await?;
/// let b = dlock::connect("mem://shop").await?;
/// let held = a.lock("stock/42").await?;
/// assert!(b.lock("stock/42").try_acquire().await.unwrap_err().is_would_block());
/// # drop(held); Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<Locks> {
    if let Some(members) = url.strip_prefix("quorum:") {
        return connect_quorum(url, members).await;
    }
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        Error::invalid_url(
            url,
            "expected SCHEME://…, for example mem:// or redis://127.0.0.1:6379",
        )
    })?;
    match scheme {
        "mem" => Ok(Locks::new(memory_store(rest)?)),
        #[cfg(feature = "redis")]
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => {
            Ok(Locks::new(dlock_redis::RedisDriver::connect(url).await?))
        }
        #[cfg(not(feature = "redis"))]
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => missing_feature(scheme, "redis"),
        #[cfg(feature = "etcd")]
        "etcd" | "etcds" => Ok(Locks::new(dlock_etcd::EtcdDriver::connect(url).await?)),
        #[cfg(not(feature = "etcd"))]
        "etcd" | "etcds" => missing_feature(scheme, "etcd"),
        #[cfg(feature = "jetstream")]
        "nats" | "tls" => Ok(Locks::new(
            dlock_jetstream::JetStreamDriver::connect(url).await?,
        )),
        #[cfg(not(feature = "jetstream"))]
        "nats" | "tls" => missing_feature(scheme, "jetstream"),
        _ => Err(Error::invalid_url(
            url,
            format!(
                "unknown scheme {scheme:?}; use mem://, redis://, rediss://, redis+cluster://, \
                 rediss+cluster://, etcd://, etcds://, nats://, tls:// or quorum:URL;URL;URL"
            ),
        )),
    }
}

async fn connect_quorum(url: &str, members: &str) -> Result<Locks> {
    let members: Vec<&str> = members.split(';').collect();
    let n = members.len();
    if members
        .iter()
        .any(|m| m.is_empty() || m.starts_with("quorum:"))
    {
        return Err(Error::invalid_url(
            url,
            "a quorum lists its member stores' URLs separated by ';', e.g. \
             quorum:redis://10.0.0.1:6379;redis://10.0.0.2:6379;redis://10.0.0.3:6379 \
             (a member cannot itself be a quorum)",
        ));
    }
    // Checked before connecting, so that a quorum of two does not first wait for both stores.
    if n < 3 || n.is_multiple_of(2) {
        return Err(Error::invalid_url(
            url,
            format!(
                "a quorum of {n} members; list an odd number of stores, at least three, so that \
                 any two majorities share a member"
            ),
        ));
    }
    let mut drivers = Vec::new();
    for (i, member) in members.into_iter().enumerate() {
        let member = Box::pin(connect(member))
            .await
            .map_err(|e| of_member(e, i + 1, n))?;
        drivers.push(std::sync::Arc::clone(member.driver()));
    }
    Ok(Locks::from_arc(std::sync::Arc::new(
        dlock_core::Quorum::from_arcs(drivers)?,
    )))
}

/// A member's error, saying which member it is; the URL in it is already the member's.
fn of_member(err: Error, i: usize, n: usize) -> Error {
    let which = format!("quorum member {i} of {n}");
    match err {
        Error::InvalidUrl { url, reason } => Error::InvalidUrl {
            url,
            reason: format!("{which}: {reason}"),
        },
        Error::Connect {
            driver,
            url,
            reason,
            hint,
        } => Error::Connect {
            driver,
            url,
            reason: format!("{which}: {reason}"),
            hint: format!("{hint} (a quorum connects to every member before it returns)"),
        },
        other => other,
    }
}

fn memory_store(name: &str) -> Result<MemoryDriver> {
    if name.is_empty() {
        return Ok(MemoryDriver::new());
    }
    if name.contains(['/', '?', '#', '@', ':']) {
        return Err(Error::invalid_url(
            &format!("mem://{name}"),
            format!(
                "in-memory store name {name:?}: a name is one word without '/', '?', '#', '@' or ':', \
                 as in mem://NAME (or mem:// for a store of this client's own)"
            ),
        ));
    }
    static STORES: OnceLock<Mutex<HashMap<String, MemoryDriver>>> = OnceLock::new();
    let mut stores = STORES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Ok(stores.entry(name.to_owned()).or_default().clone())
}

#[cfg(not(all(feature = "redis", feature = "etcd", feature = "jetstream")))]
fn missing_feature(scheme: &str, feature: &str) -> Result<Locks> {
    Err(Error::Unsupported {
        driver: "connect",
        what: format!(
            "{scheme}:// URLs need the `{feature}` feature of dlock: `cargo add dlock --features {feature}` (or enable `full`)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_scheme_is_a_clear_error() {
        let msg = connect("zookeeper://127.0.0.1:2181")
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("unknown scheme \"zookeeper\""), "{msg}");
        let msg = connect("127.0.0.1:6379").await.unwrap_err().to_string();
        assert!(msg.contains("SCHEME://"), "{msg}");
        for url in ["zk://u:s3cret@h:1", "u:s3cret@h:1"] {
            let msg = connect(url).await.unwrap_err().to_string();
            assert!(!msg.contains("s3cret"), "the secret leaked: {msg}");
        }
    }

    #[cfg(not(feature = "redis"))]
    #[tokio::test]
    async fn scheme_without_its_feature_names_the_feature() {
        let msg = connect("redis://127.0.0.1:6379")
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`redis` feature"), "{msg}");
    }

    #[tokio::test]
    async fn named_memory_stores_are_shared_and_unnamed_ones_are_not() {
        let a = connect("mem://facade-test").await.unwrap();
        let b = connect("mem://facade-test").await.unwrap();
        let held = a.lock("x").await.unwrap();
        assert!(b
            .lock("x")
            .try_acquire()
            .await
            .unwrap_err()
            .is_would_block());
        let c = connect("mem://").await.unwrap();
        c.lock("x").try_acquire().await.unwrap();
        drop(held);
    }
}
