//! Runs the examples of the `dlock` facade (`examples/` at the workspace root) as their README
//! lines show them: every one on the embedded driver, and with `--url` on real servers from the
//! harness — `leader_election` and `read_mostly_cache` on Redis, `fenced_writes` on etcd.
//!
//! Each example checks its own claim and exits non-zero when it fails; these tests check the exit
//! status and a line of the narrative that proves the intended path ran, and print the example's
//! output when either is wrong.
//!
//! The example binaries come from `cargo test --workspace --all-features --no-run`: the very
//! build that `cargo test --workspace --all-features` (CI, `scripts/test-all`) has just made, examples
//! included, so inside that run it finds everything built and compiles nothing. (`cargo run
//! --example` would select the root package alone, which unifies dependency features differently
//! and compiles a second copy of the drivers' dependency tree.) Run on its own, this test builds the
//! workspace's test targets first. Each example then runs with a time limit and is killed past it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use dlock_tests::harness::{self, Backend, EtcdServer, EtcdVersion, RedisServer};

/// Building may compile the workspace from scratch on a cold target directory.
const BUILD_LIMIT: Duration = Duration::from_secs(1800);
/// Each example finishes in a few seconds; this only catches a hang.
const RUN_LIMIT: Duration = Duration::from_secs(120);

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
}

/// The example binaries, by name, built once for every test of this binary.
fn examples() -> Result<&'static HashMap<String, PathBuf>> {
    static BUILT: OnceLock<Result<HashMap<String, PathBuf>, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_examples().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("building the examples failed: {e}"))
}

/// Whether `name` is one of the variables cargo sets for the crate under test (see "Environment
/// variables Cargo sets for crates"). A nested cargo must not inherit them: build scripts that
/// track one (ring tracks `CARGO_MANIFEST_DIR`) would see it change and rebuild, and the next
/// outer build would rebuild them back.
fn set_for_the_test_crate(name: &str) -> bool {
    name == "OUT_DIR"
        || name == "CARGO_MANIFEST_DIR"
        || name == "CARGO_MANIFEST_PATH"
        || name == "CARGO_MANIFEST_LINKS"
        || name == "CARGO_CRATE_NAME"
        || name == "CARGO_BIN_NAME"
        || name == "CARGO_PRIMARY_PACKAGE"
        || name == "CARGO_TARGET_TMPDIR"
        || name == "CARGO_RUSTC_CURRENT_DIR"
        || name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
}

fn build_examples() -> Result<HashMap<String, PathBuf>> {
    let mut command = std::process::Command::new(env!("CARGO"));
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_for_the_test_crate) {
            command.env_remove(name);
        }
    }
    let mut child = command
        .args([
            "test",
            "--workspace",
            "--all-features",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting cargo test --no-run")?;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let stdout = std::thread::spawn(move || read_all(stdout));
    let stderr = std::thread::spawn(move || read_all(stderr));
    let status = wait_bounded(&mut child, BUILD_LIMIT)?;
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    ensure!(
        status.is_some_and(|s| s.success()),
        "cargo test --workspace --all-features --no-run: {}\n{stderr}",
        status.map_or(format!("killed after {BUILD_LIMIT:?}"), |s| s.to_string())
    );
    let mut built = HashMap::new();
    for line in stdout.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_example = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "example"));
        if let (true, Some(name), Some(exe)) = (
            is_example,
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            built.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    Ok(built)
}

fn read_all(pipe: Option<impl std::io::Read>) -> String {
    let mut text = String::new();
    if let Some(mut pipe) = pipe {
        let _ = pipe.read_to_string(&mut text);
    }
    text
}

/// Waits for `child` for at most `limit`; kills it past that and returns `None`. std has no wait
/// with a timeout, so this polls `try_wait`.
fn wait_bounded(
    child: &mut std::process::Child,
    limit: Duration,
) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs example `name` (with `--url url` if given) and checks that it exits with success and
/// prints `expect`. Returns its output.
async fn run_example(name: &str, url: Option<&str>, expect: &str) -> Result<String> {
    let exe = examples()?
        .get(name)
        .with_context(|| format!("cargo built no example named {name}"))?
        .clone();
    let mut command = tokio::process::Command::new(&exe);
    if let Some(url) = url {
        command.args(["--url", url]);
    }
    let shown = format!(
        "{name}{}",
        url.map_or(String::new(), |u| format!(" --url {u}"))
    );
    command
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let started = Instant::now();
    let output = tokio::time::timeout(RUN_LIMIT, command.output())
        .await
        .map_err(|_| anyhow!("{shown}: still running after {RUN_LIMIT:?}; killed"))?
        .with_context(|| format!("starting {}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let shown_output = format!("--- stdout\n{stdout}--- stderr\n{stderr}---");
    if !output.status.success() {
        bail!("{shown}: {}\n{shown_output}", output.status);
    }
    if !stdout.contains(expect) {
        bail!("{shown}: succeeded but did not print {expect:?}\n{shown_output}");
    }
    println!("{shown}: ok in {:?}", started.elapsed());
    Ok(stdout.into_owned())
}

#[tokio::test]
async fn inventory_runs_on_the_embedded_driver() -> Result<()> {
    run_example("inventory", None, "strictly increasing").await?;
    Ok(())
}

#[tokio::test]
async fn leader_election_runs_on_the_embedded_driver() -> Result<()> {
    run_example("leader_election", None, "ok: one leader at a time").await?;
    Ok(())
}

#[tokio::test]
async fn read_mostly_cache_runs_on_the_embedded_driver() -> Result<()> {
    run_example("read_mostly_cache", None, "ok: no reader saw").await?;
    Ok(())
}

#[tokio::test]
async fn fenced_writes_runs_on_the_embedded_driver() -> Result<()> {
    run_example("fenced_writes", None, "late write was refused").await?;
    Ok(())
}

#[tokio::test]
async fn observability_runs_on_the_embedded_driver() -> Result<()> {
    let out = run_example("observability", None, "ok: every outcome counted").await?;
    ensure!(
        out.contains("dlock_acquire_total{driver=\"memory\",outcome=\"granted\"} 6"),
        "the Prometheus text is missing the granted count:\n{out}"
    );
    Ok(())
}

#[tokio::test]
async fn leader_election_runs_on_redis() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let redis = RedisServer::start().await?;
    run_example(
        "leader_election",
        Some(&redis.url()),
        "ok: one leader at a time",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn read_mostly_cache_runs_on_redis() -> Result<()> {
    if !harness::require(Backend::Redis) {
        return Ok(());
    }
    let redis = RedisServer::start().await?;
    run_example("read_mostly_cache", Some(&redis.url()), "ok: no reader saw").await?;
    Ok(())
}

#[tokio::test]
async fn fenced_writes_runs_on_etcd_and_etcd_refuses_the_late_transaction() -> Result<()> {
    if !harness::require(Backend::Etcd) {
        return Ok(());
    }
    let etcd = EtcdServer::start(EtcdVersion::V3_5).await?;
    let url = dlock_tests::suite::etcd::url_of(etcd.as_cluster());
    run_example("fenced_writes", Some(&url), "etcd refused its fenced_txn").await?;
    Ok(())
}
