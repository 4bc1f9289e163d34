//! `dlock`: distributed locks from the shell, on every store dlock supports.
//!
//! - `dlock exec NAME -- CMD…` runs a command under a lock (six modes, fencing token in its
//!   environment, lease kept alive while it runs, stopped if the lock is lost);
//! - `dlock status NAME…` shows holders and waiters; `dlock check` tests a store;
//! - `dlock modes` prints the compatibility matrix; `dlock completions SHELL` prints completions.
//!
//! Every failure is one line on stderr, `dlock: …`, and a documented exit status ([`exit::HELP`]).

mod check;
mod duration;
mod exec;
mod exit;
mod status;
mod store;

use std::ffi::OsString;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use dlock::LockMode;
use tokio::time::Instant;

use exit::{show, Failure};

const ABOUT: &str = "Distributed locks from the shell: run a command under a lock, see who holds \
and waits, check a store. Works on Redis, etcd and NATS JetStream, with the six DLM lock modes and \
fencing tokens.";

const URL_HELP: &str = "The lock store: redis://[USER:PASS@]HOST:PORT, rediss://… (TLS), \
redis+cluster://H1:P1,H2:P2, etcd://[USER:PASS@]H1:P1,H2:P2, etcds://…, \
nats://[USER:PASS@|TOKEN@]H1:P1,H2:P2, tls://…, or mem:// (in this process only)";

#[derive(Parser, Debug)]
#[command(name = "dlock", version, about = ABOUT, after_help = exit::HELP)]
struct Cli {
    #[arg(long, env = "DLOCK_URL", global = true, value_name = "URL", help = URL_HELP,
          hide_env_values = true)]
    url: Option<String>,

    /// How long connecting to the store may take
    #[arg(long, global = true, value_name = "DURATION", default_value = "10s",
          value_parser = duration::parse)]
    connect_timeout: Duration,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Take a lock, run a command while holding it, release it, exit with the command's status
    ///
    /// The command gets DLOCK_NAME, DLOCK_MODE and DLOCK_FENCING_TOKEN in its environment. The
    /// lease is renewed while it runs. SIGINT, SIGTERM and SIGHUP sent to dlock are passed on to
    /// it. If the lock is lost (the lease could not be renewed in time), the command gets --signal,
    /// then SIGKILL after --grace, and dlock exits with status 77. If dlock itself dies, the
    /// command is killed with it (Linux).
    #[command(after_help = exit::HELP)]
    Exec {
        /// The lock name
        name: String,
        /// Lock mode: NL, CR, CW, PR, PW or EX (or null, concurrent-read, concurrent-write,
        /// protected-read, protected-write, exclusive); see `dlock modes`
        #[arg(long, short, default_value = "EX", value_parser = parse_mode)]
        mode: LockMode,
        /// Lease TTL: how long the lock outlives dlock if it dies; renewed every TTL/3
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration::parse)]
        ttl: Duration,
        /// Give up waiting for the lock after this long (status 76); default: wait as long as it takes
        #[arg(long, value_name = "DURATION", value_parser = duration::parse,
              conflicts_with = "no_wait")]
        timeout: Option<Duration>,
        /// Do not wait: if the lock cannot be had at once, exit with status 75
        #[arg(long)]
        no_wait: bool,
        /// Signal sent to the command when the lock is lost: TERM, INT, HUP, QUIT, USR1, USR2, KILL
        #[arg(long, value_name = "SIGNAL", default_value = "TERM", value_parser = exec::parse_signal)]
        signal: exec::StopSignal,
        /// After the lock is lost and --signal sent, how long the command may take to exit before
        /// it is killed with SIGKILL
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration::parse)]
        grace: Duration,
        /// The command and its arguments, after `--`
        #[arg(last = true, required = true, value_name = "CMD",
              value_parser = clap::value_parser!(OsString))]
        command: Vec<OsString>,
    },
    /// Show the holders and waiters of locks, in queue order
    ///
    /// For each entry: position, granted or waiting, mode, pending conversion, fencing token (of a
    /// granted entry) and owner. A name nobody holds or waits for shows as free.
    Status {
        /// Lock names
        #[arg(required = true)]
        names: Vec<String>,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Connect to the store, print the driver, server version and capabilities, and time one
    /// acquire and release
    ///
    /// Exits with 69 and the reason when the store is unreachable or refuses the credentials.
    Check {
        /// Lock name for the test acquire (default: a fresh dlock-check/… name)
        #[arg(long)]
        name: Option<String>,
    },
    /// Print the lock-mode compatibility matrix
    Modes,
    /// Print a shell completion script: `dlock completions bash > /etc/bash_completion.d/dlock`
    Completions {
        /// bash, elvish, fish, powershell or zsh
        shell: clap_complete::Shell,
    },
}

fn parse_mode(text: &str) -> Result<LockMode, String> {
    text.parse::<LockMode>().map_err(|e| match e {
        dlock::Error::InvalidMode { .. } => "unknown lock mode; use NL, CR, CW, PR, PW or EX (or null, concurrent-read, concurrent-write, protected-read, protected-write, exclusive)".to_owned(),
        other => other.to_string(),
    })
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_owned());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let _ = writeln!(
            io::stderr(),
            "dlock: internal error: {}{at}; please report it",
            exit::one_line(&what)
        );
        std::process::exit(exit::INTERNAL.into());
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return ExitCode::from(usage_error(err)),
    };
    init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dlock: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(failure) => {
            if !failure.message.is_empty() {
                let _ = writeln!(io::stderr(), "{failure}");
            }
            failure.code
        }
    };
    ExitCode::from(code)
}

/// Help and version go to stdout with status 0; every other parse error is one line and status 64.
fn usage_error(err: clap::Error) -> u8 {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            0
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            exit::USAGE
        }
        _ => {
            let rendered = err.render().to_string();
            let body: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .collect();
            let text = exit::one_line(&body.join("\n"));
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            let _ = writeln!(io::stderr(), "dlock: {text} (see dlock --help)");
            exit::USAGE
        }
    }
}

/// `DLOCK_LOG=debug` (or any `tracing` filter) logs the drivers' events to stderr.
fn init_logging() {
    if let Ok(filter) = std::env::var("DLOCK_LOG") {
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_new(filter) {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(io::stderr)
                .try_init();
        }
    }
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    match cli.command {
        Cmd::Modes => emit(&modes_table()).map(|()| 0),
        Cmd::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "dlock", &mut out);
            emit(&String::from_utf8_lossy(&out)).map(|()| 0)
        }
        Cmd::Exec {
            name,
            mode,
            ttl,
            timeout,
            no_wait,
            signal,
            grace,
            command,
        } => {
            let (store, _) = connect(cli.url, cli.connect_timeout).await?;
            let exec = exec::Exec {
                name,
                mode,
                ttl,
                timeout,
                no_wait,
                lost_signal: signal,
                grace,
                command,
            };
            let outcome = exec::run(&store, exec).await;
            store.tracking.remove_leftovers(LEFTOVERS).await;
            outcome
        }
        Cmd::Status { names, json } => {
            let (store, _) = connect(cli.url, cli.connect_timeout).await?;
            let text = status::run(&store, &names, json).await?;
            emit(&text).map(|()| 0)
        }
        Cmd::Check { name } => {
            let url = cli.url.clone();
            let (store, took) = connect(cli.url, cli.connect_timeout).await?;
            let report = check::run(&store, url.as_deref().unwrap_or_default(), took, name).await;
            store.tracking.remove_leftovers(LEFTOVERS).await;
            emit(&report?).map(|()| 0)
        }
    }
}

/// How long dlock may spend removing queue entries it leaves behind (a timed-out acquire's).
const LEFTOVERS: Duration = Duration::from_secs(5);

async fn connect(
    url: Option<String>,
    within: Duration,
) -> Result<(store::Store, Duration), Failure> {
    let url = url.ok_or_else(|| {
        Failure::usage(
            "no lock store given: pass --url URL or set DLOCK_URL (for example redis://127.0.0.1:6379)",
        )
    })?;
    let shown = store::redact(&url);
    let started = Instant::now();
    match tokio::time::timeout(within, store::connect(&url)).await {
        Ok(Ok(store)) => Ok((store, started.elapsed())),
        Ok(Err(err @ dlock::Error::Backend { .. })) => Err(Failure::new(
            exit::UNAVAILABLE,
            format!("cannot connect to {shown}: {err}"),
        )),
        Ok(Err(err)) => Err(Failure::from(err)),
        Err(_) => Err(Failure::new(
            exit::UNAVAILABLE,
            format!(
                "cannot connect to {shown}: no answer within {} (--connect-timeout)",
                show(within)
            ),
        )),
    }
}

/// Writes to stdout; a closed pipe (`dlock status x | head -1`) is not an error.
fn emit(text: &str) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(Failure::new(
            exit::INTERNAL,
            format!("cannot write to stdout: {e}"),
        )),
        _ => Ok(()),
    }
}

/// The compatibility matrix, as `dlock modes` prints it.
fn modes_table() -> String {
    let mut out =
        String::from("Which modes may hold one lock at once (✓ compatible, · conflicts):\n\n");
    out.push_str("mode  NL CR CW PR PW EX  name              use it for\n");
    for a in LockMode::ALL {
        let cells: Vec<&str> = LockMode::ALL
            .iter()
            .map(|&b| if a.compatible_with(b) { "✓ " } else { "· " })
            .collect();
        out.push_str(&format!(
            "{:<4}  {} {:<16}  {}\n",
            a.short_name(),
            cells.join(" "),
            a.long_name(),
            use_of(a)
        ));
    }
    out.push_str(
        "\nRequests are granted in arrival order (FIFO): a request waits for every earlier\n\
         conflicting request, so writers do not starve behind a stream of readers.\n",
    );
    out
}

fn use_of(mode: LockMode) -> &'static str {
    match mode {
        LockMode::NL => "interest only: never waits, never blocks",
        LockMode::CR => "reading while others may write",
        LockMode::CW => "writers that coordinate among themselves",
        LockMode::PR => "shared read lock",
        LockMode::PW => "update lock: one writer, unprotected readers allowed",
        LockMode::EX => "nobody else",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
