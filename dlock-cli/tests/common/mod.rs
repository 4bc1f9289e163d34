//! What the CLI tests share: running the `dlock` binary, the command it runs under the lock, and
//! bounded waits.
#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// Hang guard for anything that must happen eventually; never a claim about speed.
pub const HANG: Duration = Duration::from_secs(60);

/// The binary under test.
pub fn dlock() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dlock"));
    command
        .env_remove("DLOCK_URL")
        .env_remove("DLOCK_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs `dlock ARGS…` to its end (within [`HANG`]).
pub async fn run(args: &[&str]) -> Result<Output> {
    let child = dlock()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting dlock")?;
    tokio::time::timeout(HANG, child.wait_with_output())
        .await
        .with_context(|| format!("dlock {args:?} did not finish within {HANG:?}"))?
        .context("waiting for dlock")
}

/// The exit status, which must be a plain exit (not a signal).
pub fn code(out: &Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("dlock died of a signal: {out:?}"))
}

/// Checks that stderr is exactly one line, `dlock: …`, with no panic or backtrace, and returns it.
pub fn one_line_error(out: &Output) -> Result<String> {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().collect();
    if lines.len() != 1 || !lines[0].starts_with("dlock: ") {
        bail!("expected one `dlock: …` line on stderr, got {err:?}");
    }
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "stack backtrace"] {
        if err.contains(bad) {
            bail!("stderr mentions {bad:?}: {err:?}");
        }
    }
    Ok(lines[0].to_owned())
}

/// Polls `check` every 20 ms until it holds, for at most [`HANG`].
pub async fn until<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let give_up = tokio::time::Instant::now() + HANG;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > give_up {
            bail!("{what}: still not the case after {HANG:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A scratch directory with the log the commands append to and the file that lets them finish.
pub struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    pub fn new() -> Result<Self> {
        Ok(Scene {
            dir: tempfile::tempdir()?,
        })
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    pub fn go(&self) -> PathBuf {
        self.dir.path().join("go")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Lets every command that waits for it finish.
    pub fn release_commands(&self) -> Result<()> {
        std::fs::write(self.go(), b"")?;
        Ok(())
    }

    /// The log's lines (none before the first command wrote).
    pub fn lines(&self) -> Result<Vec<String>> {
        match std::fs::read_to_string(self.log()) {
            Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Log lines that start with `word` (`start`, `end`, `term`, …).
    pub fn stamps(&self, word: &str) -> Result<Vec<Stamp>> {
        Ok(self
            .lines()?
            .iter()
            .filter_map(|l| Stamp::parse(l))
            .filter(|s| s.word == word)
            .collect())
    }

    /// Waits until the log has `n` lines starting with `word`.
    pub async fn wait_for(&self, word: &str, n: usize) -> Result<()> {
        until(&format!("{n} `{word}` stamps in the log"), || async {
            Ok(self.stamps(word)?.len() >= n)
        })
        .await
    }

    /// `dlock exec ARGS… -- sh -c SCRIPT sh LOG GO TAG`: the command the tests run under the lock.
    ///
    /// It appends `start TAG NAME MODE TOKEN PID` to the log, then waits (polling, at most 60 s)
    /// until the go file exists, appends `end TAG NAME MODE TOKEN PID` and exits 0. `on` sets what it
    /// does on a signal: [`OnSignal`].
    pub fn exec(&self, url: &str, tag: &str, args: &[&str], on: OnSignal) -> Result<Child> {
        let trap = match on {
            OnSignal::Default => String::new(),
            OnSignal::LogAndExit(sig) => {
                format!("trap 'echo \"{} $tag $DLOCK_NAME $DLOCK_MODE $DLOCK_FENCING_TOKEN $$\" >> \"$log\"; exit 143' {sig}\n", sig.to_lowercase())
            }
            OnSignal::LogAndIgnore(sig) => {
                format!("trap 'echo \"{} $tag $DLOCK_NAME $DLOCK_MODE $DLOCK_FENCING_TOKEN $$\" >> \"$log\"' {sig}\n", sig.to_lowercase())
            }
        };
        let script = format!(
            r#"log=$1; go=$2; tag=$3
{trap}echo "start $tag $DLOCK_NAME $DLOCK_MODE $DLOCK_FENCING_TOKEN $$" >> "$log"
i=0
while [ ! -e "$go" ]; do
  i=$((i + 1))
  if [ "$i" -gt 1200 ]; then echo "gaveup $tag $DLOCK_NAME $DLOCK_MODE $DLOCK_FENCING_TOKEN $$" >> "$log"; exit 9; fi
  sleep 0.05
done
echo "end $tag $DLOCK_NAME $DLOCK_MODE $DLOCK_FENCING_TOKEN $$" >> "$log"
"#
        );
        let log = self.log();
        let go = self.go();
        dlock()
            .env("DLOCK_URL", url)
            .arg("exec")
            .args(args)
            .arg("--")
            .args(["sh", "-c", &script, "sh"])
            .arg(&log)
            .arg(&go)
            .arg(tag)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting dlock exec")
    }
}

/// What the test command does when it gets a signal.
#[derive(Clone, Copy, Debug)]
pub enum OnSignal {
    /// Nothing special: the signal's default action.
    Default,
    /// Logs `<sig lower-case> TAG …` and exits 143.
    LogAndExit(&'static str),
    /// Logs `<sig lower-case> TAG …` and keeps waiting.
    LogAndIgnore(&'static str),
}

/// One log line: `WORD TAG NAME MODE TOKEN PID`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub word: String,
    pub tag: String,
    pub name: String,
    pub mode: String,
    pub token: u64,
    pub pid: i32,
}

impl Stamp {
    fn parse(line: &str) -> Option<Stamp> {
        let parts: Vec<&str> = line.split(' ').collect();
        let [word, tag, name, mode, token, pid] = parts[..] else {
            return None;
        };
        Some(Stamp {
            word: word.into(),
            tag: tag.into(),
            name: name.into(),
            mode: mode.into(),
            token: token.parse().ok()?,
            pid: pid.parse().ok()?,
        })
    }
}

/// Waits for a `dlock exec` started by [`Scene::exec`] and collects its output.
pub async fn finish(child: Child) -> Result<Output> {
    tokio::time::timeout(HANG, child.wait_with_output())
        .await
        .context("dlock exec did not finish")?
        .context("waiting for dlock exec")
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet, which runs no more code).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on (it was free a moment ago).
pub fn closed_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

pub fn exists(path: &Path) -> bool {
    path.exists()
}
