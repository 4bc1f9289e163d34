//! A loopback TCP proxy that can drop or stall one client's connections.
//!
//! Every store is reached over TCP, so putting this between one client and its server is a
//! uniform way to simulate "connection dropped" ([`TcpProxy::cut`]) and "this client is
//! partitioned" ([`TcpProxy::set_blackhole`]) without touching the server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// A TCP proxy from a free loopback port to `target`. Stops (closing every connection) when
/// dropped. Must be created inside a tokio runtime, which runs its tasks.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    blackhole: watch::Sender<bool>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct Conn {
    kill: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TcpProxy {
    /// Listens on `127.0.0.1:<free port>` and forwards every accepted connection to `target`.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the proxy listener")?;
        let addr = listener.local_addr()?;
        let (blackhole, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            blackhole,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(listener, target, shared.clone()));
        Ok(TcpProxy {
            addr,
            target,
            shared,
            accept_task,
        })
    }

    /// Where clients connect: `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// How many client connections are open through the proxy right now.
    pub fn connection_count(&self) -> usize {
        self.shared.conns().len()
    }

    /// Drops every open connection at once, with a TCP reset on both sides (the client sees
    /// its connection fail, as when a server or middlebox dies), and returns how many there
    /// were. Returns after they are closed. New connections are accepted as before.
    pub async fn cut(&self) -> usize {
        let conns: Vec<Conn> = self.shared.conns().drain().map(|(_, c)| c).collect();
        let n = conns.len();
        let tasks: Vec<JoinHandle<()>> = conns
            .into_iter()
            .map(|c| {
                let _ = c.kill.send(());
                c.task
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        n
    }

    /// Turns the blackhole on or off.
    ///
    /// While on, nothing passes in either direction: bytes already read are held, not
    /// forwarded (the kernel buffers then fill and the senders stall), and new connections are
    /// accepted but not connected to the target. Nothing is closed, so the client sees a
    /// silent network partition and only its own timeouts fire. Turning it off delivers the
    /// held bytes and connects the waiting connections, like a healed partition.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.send_replace(on);
    }

    /// Whether the blackhole is on.
    pub fn is_blackholed(&self) -> bool {
        *self.shared.blackhole.borrow()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        for (_, c) in self.shared.conns().drain() {
            c.task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((s, _)) => s,
            // Out of file descriptors and the like: back off rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (kill_tx, kill_rx) = oneshot::channel();
        // Registered under the lock before the task can run, so its own removal always finds it.
        let mut conns = shared.conns();
        let task = tokio::spawn(serve(id, client, target, shared.clone(), kill_rx));
        conns.insert(
            id,
            Conn {
                kill: kill_tx,
                task,
            },
        );
    }
}

async fn serve(
    id: u64,
    mut client: TcpStream,
    target: SocketAddr,
    shared: Arc<Shared>,
    mut kill: oneshot::Receiver<()>,
) {
    let blackhole = shared.blackhole.subscribe();
    let mut upstream = tokio::select! {
        _ = &mut kill => None,
        r = async {
            wait_open(blackhole.clone()).await;
            TcpStream::connect(target).await
        } => r.ok(),
    };
    let clean = match upstream.as_mut() {
        // Target down: the client sees a reset, as if it had connected to the target itself.
        None => false,
        Some(up) => {
            let _ = up.set_nodelay(true);
            let (mut cr, mut cw) = client.split();
            let (mut ur, mut uw) = up.split();
            tokio::select! {
                _ = &mut kill => false,
                r = async {
                    tokio::try_join!(
                        pump(&mut cr, &mut uw, blackhole.clone()),
                        pump(&mut ur, &mut cw, blackhole.clone()),
                    )
                } => r.is_ok(),
            }
        }
    };
    if !clean {
        reset(&client);
        if let Some(up) = &upstream {
            reset(up);
        }
    }
    shared.conns().remove(&id);
}

/// Copies until EOF, then half-closes `dst`; holds everything while the blackhole is on.
async fn pump<R, W>(
    src: &mut R,
    dst: &mut W,
    blackhole: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = src.read(&mut buf).await?;
        wait_open(blackhole.clone()).await;
        if n == 0 {
            return dst.shutdown().await;
        }
        dst.write_all(&buf[..n]).await?;
    }
}

async fn wait_open(mut blackhole: watch::Receiver<bool>) {
    // Err means the proxy is gone; its Drop aborts this task anyway.
    let _ = blackhole.wait_for(|on| !*on).await;
}

/// Closes with RST instead of FIN, so the peer sees an abrupt failure.
fn reset(stream: &TcpStream) {
    // Zero linger never blocks, which is what the deprecation warns about.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}
