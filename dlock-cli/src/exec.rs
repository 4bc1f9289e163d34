//! `dlock exec`: take a lock, run a command under it, release it.

use std::ffi::OsString;
use std::io;
use std::process::ExitStatus;
use std::time::Duration;

use dlock::{Guard, LockMode};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;

use crate::exit::{self, show, Failure};
use crate::store::Store;

/// What `dlock exec` was asked to do.
pub struct Exec {
    pub name: String,
    pub mode: LockMode,
    pub ttl: Duration,
    /// `None`: wait without limit.
    pub timeout: Option<Duration>,
    pub no_wait: bool,
    /// Sent to the command when the lock is lost.
    pub lost_signal: StopSignal,
    /// How long after `lost_signal` the command is killed.
    pub grace: Duration,
    pub command: Vec<OsString>,
}

/// A signal `--signal` may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopSignal {
    pub number: i32,
    pub name: &'static str,
}

const SIGNALS: [(&str, i32); 7] = [
    ("TERM", libc::SIGTERM),
    ("INT", libc::SIGINT),
    ("HUP", libc::SIGHUP),
    ("QUIT", libc::SIGQUIT),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("KILL", libc::SIGKILL),
];

/// Parses `TERM`, `SIGTERM`, `term`, … (the signals of [`SIGNALS`]).
pub fn parse_signal(text: &str) -> Result<StopSignal, String> {
    let upper = text.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(name, _)| *name == bare)
        .map(|&(name, number)| StopSignal { number, name })
        .ok_or_else(|| {
            let names: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
            format!("unknown signal; use one of {}", names.join(", "))
        })
}

fn signal_name(number: i32) -> String {
    SIGNALS.iter().find(|(_, n)| *n == number).map_or_else(
        || format!("signal {number}"),
        |(name, _)| format!("SIG{name}"),
    )
}

/// The signals `dlock exec` catches: forwarded to the command while it runs, and a reason to stop
/// waiting before it starts.
struct Caught {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Caught {
    fn install() -> Result<Self, Failure> {
        let install = |kind: SignalKind| {
            signal(kind).map_err(|e| {
                Failure::new(
                    exit::INTERNAL,
                    format!("cannot install a signal handler: {e}"),
                )
            })
        };
        Ok(Caught {
            int: install(SignalKind::interrupt())?,
            term: install(SignalKind::terminate())?,
            hup: install(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// Takes the lock, runs the command under it and returns the command's exit status.
pub async fn run(store: &Store, exec: Exec) -> Result<u8, Failure> {
    // Installed first: from here on these signals no longer end dlock at once.
    let mut caught = Caught::install()?;
    let guard = tokio::select! {
        acquired = acquire(store, &exec) => acquired?,
        signal = caught.next() => {
            return Err(Failure::new(
                128 + signal as u8,
                format!(
                    "got {} while waiting for lock {:?}; not running the command",
                    signal_name(signal),
                    exec.name
                ),
            ));
        }
    };
    let child = match spawn(&exec, &guard) {
        Ok(child) => child,
        Err(failure) => {
            let _ = guard.release().await;
            return Err(failure);
        }
    };
    supervise(store, exec, guard, child, caught).await
}

async fn acquire(store: &Store, exec: &Exec) -> Result<Guard, Failure> {
    let request = store
        .locks
        .lock(exec.name.clone())
        .mode(exec.mode)
        .ttl(exec.ttl);
    let acquired = if exec.no_wait {
        request.try_acquire().await
    } else if let Some(timeout) = exec.timeout {
        request.timeout(timeout).await
    } else {
        request.await
    };
    acquired.map_err(|err| match err {
        dlock::Error::WouldBlock { .. } => Failure::new(
            exit::BUSY,
            format!(
                "lock {:?} is busy: held or queued in a mode that conflicts with {}; not waiting (--no-wait)",
                exec.name, exec.mode
            ),
        ),
        dlock::Error::Timeout { waited, .. } => Failure::new(
            exit::TIMEOUT,
            format!(
                "timed out after {} waiting for lock {:?} in {} (--timeout {})",
                show(Duration::from_millis(waited.as_millis() as u64)),
                exec.name,
                exec.mode,
                show(exec.timeout.unwrap_or_default())
            ),
        ),
        dlock::Error::Lost { .. } => Failure::new(
            exit::UNAVAILABLE,
            format!(
                "lost the place in the queue of lock {:?}: its lease could not be renewed while waiting; is the store reachable?",
                exec.name
            ),
        ),
        other => Failure::from(other),
    })
}

fn spawn(exec: &Exec, guard: &Guard) -> Result<Child, Failure> {
    let (program, args) = exec
        .command
        .split_first()
        .ok_or_else(|| Failure::usage("no command given: dlock exec NAME -- CMD [ARGS…]"))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env("DLOCK_NAME", &exec.name)
        .env("DLOCK_MODE", guard.mode().short_name())
        .env("DLOCK_FENCING_TOKEN", guard.fencing_token().to_string());
    die_with_parent(&mut command);
    command.spawn().map_err(|e| {
        let shown = program.to_string_lossy();
        match e.kind() {
            io::ErrorKind::NotFound => {
                Failure::new(exit::NOT_FOUND, format!("command not found: {shown}"))
            }
            _ => Failure::new(exit::CANNOT_EXECUTE, format!("cannot execute {shown}: {e}")),
        }
    })
}

/// The command must not outlive dlock: once dlock is gone nobody renews the lease, so the lock ends
/// within a TTL while the command would go on as if it held it. On Linux the kernel kills the
/// command (SIGKILL) when dlock dies, even by `kill -9`. The death signal is tied to the thread
/// that spawned the command, which is the main thread (the runtime is single-threaded).
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (prctl, getppid).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // dlock died between the fork and the prctl: do not run unguarded.
            if libc::getppid() != parent {
                return Err(io::Error::other("dlock exited before the command started"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// Runs the command to its end: forwards caught signals, stops it when the lock is lost, then
/// releases the lock.
async fn supervise(
    store: &Store,
    exec: Exec,
    guard: Guard,
    mut child: Child,
    mut caught: Caught,
) -> Result<u8, Failure> {
    let pid = child.id().map(|id| id as libc::pid_t);
    let send = |signal: i32| {
        if let Some(pid) = pid {
            // SAFETY: kill has no memory-safety preconditions. The child is not reaped before
            // `wait` returns, so its pid cannot have been reused.
            unsafe { libc::kill(pid, signal) };
        }
    };
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    let status = loop {
        let kill_due = async {
            match kill_at {
                Some(at) if !killed => tokio::time::sleep_until(at).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            status = child.wait() => break status,
            signal = caught.next() => send(signal),
            _ = guard.lost(), if kill_at.is_none() => {
                eprintln!(
                    "dlock: lost lock {:?}: its lease could not be renewed in time; sending SIG{} to the command (SIGKILL after {})",
                    exec.name, exec.lost_signal.name, show(exec.grace)
                );
                send(exec.lost_signal.number);
                kill_at = Some(Instant::now() + exec.grace);
            }
            _ = kill_due => {
                eprintln!(
                    "dlock: the command did not exit within {} of SIG{}; sending SIGKILL",
                    show(exec.grace), exec.lost_signal.name
                );
                send(libc::SIGKILL);
                killed = true;
            }
        }
    };
    let status = status
        .map_err(|e| Failure::new(exit::INTERNAL, format!("lost track of the command: {e}")))?;
    let key = guard.entry_key().clone();
    if kill_at.is_some() {
        // Lost already; a release only spares others the wait for the store to expire the entry,
        // and the store is likely unreachable: one short try, then leave it to the lease.
        let _ = tokio::time::timeout(Duration::from_secs(1), guard.release()).await;
        store.tracking.abandon(&key);
        return Err(Failure::new(exit::LOST, String::new()));
    }
    if let Err(e) = guard.release().await {
        // Retried for a whole TTL already.
        store.tracking.abandon(&key);
        eprintln!(
            "dlock: could not confirm the release of lock {:?} ({e}); it ends with its lease within {}",
            exec.name,
            show(exec.ttl)
        );
    }
    Ok(status_code(status))
}

/// The status a shell would report: the exit code, or 128 + the signal that ended the command.
fn status_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.wrapping_add(signal as u8),
        (None, None) => exit::INTERNAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_with_or_without_sig_in_any_case() {
        assert_eq!(parse_signal("TERM").unwrap().number, libc::SIGTERM);
        assert_eq!(parse_signal("sigint").unwrap().number, libc::SIGINT);
        assert_eq!(parse_signal("Kill").unwrap().number, libc::SIGKILL);
        let err = parse_signal("STOP").unwrap_err();
        assert!(err.contains("TERM, INT"), "{err}");
    }
}
