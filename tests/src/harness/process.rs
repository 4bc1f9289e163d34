//! One server process: spawn, signal, restart, and the readiness loop shared by all servers.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom, Write as _};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// How long a single server may take to answer after spawn (2 cores, tests in parallel).
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a cluster may take to form (elections, gossip, slot propagation).
pub(crate) const CLUSTER_TIMEOUT: Duration = Duration::from_secs(60);
/// One readiness probe; a paused server must not stall the loop past this, and a server
/// slowed by a loaded machine (fsync behind a parallel build) should still make it.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// One request/reply on the harness's own HTTP and RESP clients: generous, only there so that
/// nothing waits forever on a paused or wedged server.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Gap between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// How long the kernel may take to show a signalled process as stopped or continued.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times a start is retried when a port picked as free was taken meanwhile.
pub(crate) const PORT_CLASH_RETRIES: usize = 3;

/// A server process the harness started. Killed (SIGKILL) and reaped when dropped.
///
/// All methods take `&self` so a server can be shared (e.g. in an `Arc`) between the code
/// under test and the code injecting faults.
#[derive(Debug)]
pub struct ServerProcess {
    label: String,
    program: PathBuf,
    args: Vec<OsString>,
    workdir: PathBuf,
    log_path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    child: Option<Child>,
    paused: bool,
    /// Log length at the last spawn, so errors can quote only this run's output.
    log_offset: u64,
    /// How it ended, when it exited by itself (not killed by the harness).
    exited: Option<std::process::ExitStatus>,
}

impl ServerProcess {
    /// Spawns `program args` in `workdir`, appending stdout and stderr to `log_path`.
    ///
    /// Inherited `ETCD_*` and `NATS_*` variables are removed: etcd reads its flags from the
    /// environment too, and a developer's settings must not change the server under test.
    pub(crate) fn spawn(
        label: impl Into<String>,
        program: &Path,
        args: Vec<OsString>,
        workdir: &Path,
        log_path: &Path,
    ) -> Result<Self> {
        let p = ServerProcess {
            label: label.into(),
            program: program.to_path_buf(),
            args,
            workdir: workdir.to_path_buf(),
            log_path: log_path.to_path_buf(),
            state: Mutex::new(State::default()),
        };
        p.start_locked(&mut p.lock())?;
        Ok(p)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent State; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start_locked(&self, st: &mut State) -> Result<()> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        st.log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        writeln!(
            log,
            "=== dlock harness: starting {} ===",
            self.command_line()
        )?;
        let stderr = log.try_clone()?;

        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .current_dir(&self.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("ETCD_") || k.starts_with("ETCDCTL_") || k.starts_with("NATS_") {
                cmd.env_remove(&key);
            }
        }
        let parent = std::process::id();
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = spawn_on_harness_thread(cmd)
            .with_context(|| format!("spawning {}", self.command_line()))?;
        st.child = Some(child);
        st.paused = false;
        st.exited = None;
        Ok(())
    }

    fn command_line(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            let _ = write!(s, " {}", a.to_string_lossy());
        }
        s
    }

    /// A short name for messages, e.g. `etcd 3.5.1 member 1 (client port 21234)`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The OS process id, while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.lock().child.as_ref().map(Child::id)
    }

    /// Where stdout and stderr go (appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the process exists (running or paused); reaps it if it exited on its own.
    pub fn is_running(&self) -> bool {
        let mut st = self.lock();
        match st.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(status) => {
                st.child = None;
                st.paused = false;
                st.exited = status.ok().flatten();
                false
            }
            None => false,
        }
    }

    /// Whether [`pause`](Self::pause) stopped it and it was not resumed since.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Whether it is running and not paused, i.e. expected to answer.
    pub fn is_serving(&self) -> bool {
        self.is_running() && !self.is_paused()
    }

    /// SIGKILL and reap. A no-op when it is not running.
    pub fn kill(&self) -> Result<()> {
        let mut st = self.lock();
        st.exited = None;
        if let Some(mut child) = st.child.take() {
            st.paused = false;
            // SIGKILL also ends a stopped process; no SIGCONT needed.
            send_signal(&child, libc::SIGKILL);
            child
                .wait()
                .with_context(|| format!("reaping {}", self.label))?;
        }
        Ok(())
    }

    /// SIGSTOP, and wait until the kernel shows the process stopped.
    pub fn pause(&self) -> Result<()> {
        let mut st = self.lock();
        let child = st
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("cannot pause {}: not running", self.label))?;
        send_signal(child, libc::SIGSTOP);
        let pid = child.id();
        wait_proc_state(pid, SIGNAL_TIMEOUT, |s| s == 'T')
            .with_context(|| format!("pausing {}", self.label))?;
        st.paused = true;
        Ok(())
    }

    /// SIGCONT, and wait until the kernel shows the process no longer stopped.
    pub fn resume(&self) -> Result<()> {
        let mut st = self.lock();
        let child = st
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("cannot resume {}: not running", self.label))?;
        send_signal(child, libc::SIGCONT);
        let pid = child.id();
        wait_proc_state(pid, SIGNAL_TIMEOUT, |s| s != 'T')
            .with_context(|| format!("resuming {}", self.label))?;
        st.paused = false;
        Ok(())
    }

    /// Kills the process if it runs, then starts it again with the same arguments (so the
    /// same ports and data directory). Does not wait for readiness; the servers' own
    /// `restart` methods do.
    pub(crate) fn respawn(&self) -> Result<()> {
        self.kill()?;
        self.start_locked(&mut self.lock())
    }

    /// `Err` with the exit status and log tail if the process is not running.
    pub(crate) fn ensure_running(&self) -> Result<()> {
        let mut st = self.lock();
        let exited = st.exited;
        let status = match (st.child.as_mut(), exited) {
            (Some(c), _) => c.try_wait(),
            (None, Some(status)) => Ok(Some(status)),
            (None, None) => bail!("{} is not running (killed)", self.label),
        };
        match status {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                st.child = None;
                st.exited = Some(status);
                let offset = st.log_offset;
                drop(st);
                bail!(
                    "{} exited with {status}\n{}",
                    self.label,
                    self.log_since(offset)
                )
            }
            Err(e) => Err(e).with_context(|| format!("checking {}", self.label)),
        }
    }

    /// The last `lines` lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = read_tail(&self.log_path, 64 * 1024);
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!(
            "--- last {} lines of {} ({}) ---\n{}",
            all.len() - start,
            self.log_path.display(),
            self.label,
            all[start..].join("\n")
        )
    }

    /// The log written since `offset` (bounded), for "why did it exit" messages.
    fn log_since(&self, offset: u64) -> String {
        let len = std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0);
        if len.saturating_sub(offset) > 64 * 1024 {
            return self.log_tail(60);
        }
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.seek(SeekFrom::Start(offset));
            let _ = f.read_to_string(&mut text);
        }
        format!(
            "--- {} ({}) ---\n{}",
            self.log_path.display(),
            self.label,
            text.trim_end()
        )
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn send_signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own unreaped child's pid, which cannot have been reused.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// The state letter from `/proc/<pid>/stat` (`R`, `S`, `T`, `Z`, ...).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; the state follows the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

fn wait_proc_state(pid: u32, timeout: Duration, ok: impl Fn(char) -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match proc_state(pid) {
            Some(s) if ok(s) => return Ok(()),
            Some('Z') | None => bail!("process {pid} exited"),
            Some(s) if Instant::now() >= deadline => {
                bail!("process {pid} still in state {s:?} after {timeout:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn read_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns on a thread that lives as long as the test process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits. Test threads end
/// with their test and tokio retires idle blocking threads, either of which would kill a
/// server that is still in use; this thread never exits, so the signal fires only when the
/// whole process dies.
fn spawn_on_harness_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("dlock-harness-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the harness spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("harness spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("harness spawner thread is gone"))?
}

/// Ports handed out by this process, never reused within it; each holds an flock'd file so
/// other harness processes leave it alone for as long as this process lives.
static TAKEN: OnceLock<Mutex<HashMap<u16, File>>> = OnceLock::new();
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// First and one-past-last port the harness hands out. Below Linux's default ephemeral range
/// (32768–60999), so a client's outgoing connection cannot grab a port between the moment it
/// is picked and the moment the server binds it.
const PORT_RANGE: (u32, u32) = (20000, 32000);

/// A loopback TCP port that is free now and reserved for this process.
///
/// Reserved means: never handed out twice by this process, and locked (an `flock` on
/// `$TMPDIR/dlock-harness-ports/<port>`) against every other process using this harness, so
/// a server restarted on its old port cannot find it taken by a parallel test binary. The
/// lock dies with the process. Programs outside the harness can still take the port before
/// the server binds it; server starts detect "address already in use" and retry with fresh
/// ports.
pub fn free_port() -> Result<u16> {
    let taken = TAKEN.get_or_init(|| Mutex::new(HashMap::new()));
    let lock_dir = std::env::temp_dir().join("dlock-harness-ports");
    std::fs::create_dir_all(&lock_dir)
        .with_context(|| format!("creating {}", lock_dir.display()))?;
    let span = PORT_RANGE.1 - PORT_RANGE.0;
    // Start at a per-process offset so concurrent test processes rarely even contend.
    let _ = NEXT_PORT.compare_exchange(
        0,
        1 + (std::process::id().wrapping_mul(7919) ^ nanos()) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let n = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        let port = (PORT_RANGE.0 + n % span) as u16;
        let mut t = taken.lock().unwrap_or_else(|e| e.into_inner());
        if t.contains_key(&port) {
            continue;
        }
        let Some(lock) = lock_port(&lock_dir, port) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            t.insert(port, lock);
            return Ok(port);
        }
    }
    bail!("no free loopback port in {PORT_RANGE:?}")
}

/// An exclusive, non-blocking `flock` on the port's lock file, or `None` if another process
/// holds it.
fn lock_port(dir: &Path, port: u16) -> Option<File> {
    use std::os::fd::AsRawFd;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))
        .ok()?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (rc == 0).then_some(file)
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// Whether a start failed because a port picked as free was taken by someone else before
/// the server bound it; such starts are retried with fresh ports.
pub(crate) fn port_clash(e: &anyhow::Error) -> bool {
    format!("{e:#}")
        .to_ascii_lowercase()
        .contains("address already in use")
}

/// Polls `probe` until it succeeds, `timeout` passes, or one of `procs` exits.
///
/// Every error names `what`, the last probe failure, and the log tails of `procs`.
pub(crate) async fn wait_until<F, Fut>(
    what: &str,
    procs: &[&ServerProcess],
    timeout: Duration,
    mut probe: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = anyhow!("no probe finished");
    loop {
        for p in procs {
            p.ensure_running()
                .with_context(|| format!("while waiting until {what}"))?;
        }
        match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(_) => last = anyhow!("probe timed out after {PROBE_TIMEOUT:?}"),
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = procs.iter().map(|p| p.log_tail(30)).collect();
            bail!(
                "gave up after {timeout:?} waiting until {what}; last probe: {last:#}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Runs a short-lived helper command (e.g. `redis-cli --cluster create`) with a deadline,
/// returning its combined output. Killed if it overruns.
pub(crate) async fn run_helper(
    mut cmd: tokio::process::Command,
    timeout: Duration,
) -> Result<String> {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("running {shown}"))?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("{shown} did not finish within {timeout:?}"))?
        .with_context(|| format!("running {shown}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{shown} failed with {}:\n{text}", out.status);
    }
    Ok(text)
}
