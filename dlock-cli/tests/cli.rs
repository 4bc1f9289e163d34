//! The `dlock` binary without a store server: the mode matrix, help and exit statuses, argument,
//! duration and URL errors, `exec` on the in-process store, and unreachable stores.

mod common;

use std::os::unix::fs::PermissionsExt;

use anyhow::{ensure, Context, Result};
use dlock::LockMode;

use common::*;

#[tokio::test]
async fn modes_prints_the_compatibility_matrix_of_dlock_core() -> Result<()> {
    let out = run(&["modes"]).await?;
    ensure!(code(&out) == 0, "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    let mut rows = 0;
    for line in text.lines() {
        let cells: Vec<&str> = line.split_whitespace().collect();
        let Some(a) = LockMode::ALL
            .iter()
            .find(|m| cells.first() == Some(&m.short_name()))
        else {
            continue;
        };
        ensure!(cells.len() > 7, "{line}");
        for (b, cell) in LockMode::ALL.iter().zip(&cells[1..7]) {
            let expected = if a.compatible_with(*b) { "✓" } else { "·" };
            ensure!(*cell == expected, "{a} vs {b}: {cell} in {line:?}");
        }
        ensure!(cells[7] == a.long_name(), "{line}");
        rows += 1;
    }
    ensure!(rows == 6, "{text}");
    Ok(())
}

#[tokio::test]
async fn help_documents_the_exit_statuses() -> Result<()> {
    for args in [&["--help"][..], &["exec", "--help"], &["help", "exec"]] {
        let out = run(args).await?;
        ensure!(code(&out) == 0, "{args:?}: {out:?}");
        let text = String::from_utf8(out.stdout)?;
        for status in ["64 ", "69 ", "75 ", "76 ", "77 ", "126 ", "127 ", "128+N "] {
            ensure!(
                text.lines().any(|l| l.trim_start().starts_with(status)),
                "{args:?} does not document exit status {status}: {text}"
            );
        }
    }
    let out = run(&["exec", "--help"]).await?;
    let text = String::from_utf8(out.stdout)?;
    for word in [
        "DLOCK_FENCING_TOKEN",
        "--no-wait",
        "--timeout",
        "--grace",
        "--signal",
    ] {
        ensure!(text.contains(word), "exec --help lacks {word}");
    }
    Ok(())
}

#[tokio::test]
async fn bad_arguments_are_one_line_usage_errors() -> Result<()> {
    let cases: &[(&[&str], &str)] = &[
        (
            &["exec", "x", "--ttl", "30", "--", "true"],
            "1500ms, 30s, 2m or 1h",
        ),
        (&["exec", "x", "--ttl", "1.5s", "--", "true"], "'1.5s'"),
        (&["exec", "x", "--ttl", "30x", "--", "true"], "'30x'"),
        (
            &["exec", "x", "--timeout", "2days", "--", "true"],
            "1500ms, 30s, 2m or 1h",
        ),
        (&["exec", "x", "--grace=-1s", "--", "true"], "--grace"),
        (
            &["--connect-timeout", "soon", "check"],
            "1500ms, 30s, 2m or 1h",
        ),
        (
            &["exec", "x", "--mode", "WRITE", "--", "true"],
            "unknown lock mode",
        ),
        (
            &["exec", "x", "-m", "shared", "--", "true"],
            "NL, CR, CW, PR, PW or EX",
        ),
        (
            &["exec", "x", "--signal", "STOP", "--", "true"],
            "unknown signal",
        ),
        (
            &["exec", "x", "--no-wait", "--timeout", "1s", "--", "true"],
            "cannot be used with",
        ),
        (&["exec", "x"], "CMD"),
        (&["exec", "--", "true"], "NAME"),
        (&["status"], "NAME"),
        (&["frobnicate"], "frobnicate"),
        (&["exec", "x", "--", "true"], "--url URL or set DLOCK_URL"),
        (&["--url", "", "check"], "invalid lock store url"),
    ];
    for (args, expected) in cases {
        let out = run(args).await?;
        ensure!(code(&out) == 64, "{args:?}: {out:?}");
        let line = one_line_error(&out).with_context(|| format!("{args:?}"))?;
        ensure!(
            line.contains(expected),
            "{args:?}: {line:?} lacks {expected:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn bad_urls_and_names_are_one_line_usage_errors() -> Result<()> {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--url", "zk://127.0.0.1:2181", "check"],
            "unknown scheme \"zk\"",
        ),
        (&["--url", "127.0.0.1:6379", "status", "x"], "SCHEME://"),
        (
            &["--url", "redis://h:notaport", "check"],
            "invalid lock store url",
        ),
        (&["--url", "etcd://127.0.0.1:1?bogus=1", "check"], "bogus"),
        (
            &["--url", "nats://127.0.0.1:1?replicas=x", "check"],
            "replicas",
        ),
        (&["--url", "mem://a/b", "check"], "mem://NAME"),
        (
            &["--url", "mem://", "exec", "", "--", "true"],
            "invalid lock name",
        ),
        (&["--url", "mem://", "status", ""], "invalid lock name"),
        (
            &["--url", "mem://", "exec", "x", "--ttl", "0s", "--", "true"],
            "ttl",
        ),
    ];
    for (args, expected) in cases {
        let out = run(args).await?;
        ensure!(code(&out) == 64, "{args:?}: {out:?}");
        let line = one_line_error(&out).with_context(|| format!("{args:?}"))?;
        ensure!(
            line.contains(expected),
            "{args:?}: {line:?} lacks {expected:?}"
        );
    }
    Ok(())
}

/// On the in-process store: the accepted duration forms, the environment of the command, and the
/// command's exit status passed through.
#[tokio::test]
async fn exec_runs_the_command_with_the_lock_in_its_environment() -> Result<()> {
    for ttl in ["30s", "1500ms", "2m", "1h"] {
        let out = run(&[
            "--url",
            "mem://",
            "exec",
            "jobs/x y",
            "--mode",
            "PW",
            "--ttl",
            ttl,
            "--timeout",
            "2m",
            "--",
            "sh",
            "-c",
            "echo \"$DLOCK_NAME|$DLOCK_MODE|$DLOCK_FENCING_TOKEN\"; exit 3",
        ])
        .await?;
        ensure!(code(&out) == 3, "--ttl {ttl}: {out:?}");
        ensure!(out.stderr.is_empty(), "{out:?}");
        let line = String::from_utf8(out.stdout)?;
        let parts: Vec<&str> = line.trim_end().split('|').collect();
        ensure!(parts[..2] == ["jobs/x y", "PW"], "{line:?}");
        ensure!(parts[2].parse::<u64>().is_ok_and(|t| t > 0), "{line:?}");
    }
    Ok(())
}

#[tokio::test]
async fn exec_reports_how_the_command_ended() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let not_executable = dir.path().join("script");
    std::fs::write(&not_executable, "#!/bin/sh\ntrue\n")?;
    std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644))?;
    let not_executable = not_executable.to_str().context("temp path")?;
    let cases: &[(&[&str], i32, Option<&str>)] = &[
        (&["true"], 0, None),
        (&["sh", "-c", "exit 42"], 42, None),
        (&["sh", "-c", "kill -TERM $$"], 128 + 15, None),
        (&["sh", "-c", "kill -KILL $$"], 128 + 9, None),
        (
            &["dlock-no-such-command"],
            127,
            Some("command not found: dlock-no-such-command"),
        ),
        (&[not_executable], 126, Some("cannot execute")),
    ];
    for (command, status, error) in cases {
        let mut args = vec!["--url", "mem://", "exec", "x", "--"];
        args.extend_from_slice(command);
        let out = run(&args).await?;
        ensure!(code(&out) == *status, "{command:?}: {out:?}");
        match error {
            Some(expected) => {
                let line = one_line_error(&out)?;
                ensure!(line.contains(expected), "{line}");
            }
            None => ensure!(out.stderr.is_empty(), "{command:?}: {out:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn the_url_comes_from_dlock_url_unless_given() -> Result<()> {
    let out = dlock()
        .env("DLOCK_URL", "mem://")
        .args(["check"])
        .output()
        .await?;
    ensure!(code(&out) == 0, "{out:?}");
    ensure!(String::from_utf8(out.stdout)?.contains("memory"));
    let out = dlock()
        .env("DLOCK_URL", "mem://")
        .args(["--url", "zk://x", "check"])
        .output()
        .await?;
    ensure!(code(&out) == 64, "--url wins over DLOCK_URL: {out:?}");
    Ok(())
}

/// Nothing listens on the port: every subcommand that needs the store fails with 69 and one line,
/// and `exec` does not run its command.
#[tokio::test]
async fn unreachable_stores_fail_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ran = dir.path().join("ran");
    let ran = ran.to_str().context("temp path")?;
    for scheme in ["redis", "etcd", "nats"] {
        let url = format!("{scheme}://127.0.0.1:{}", closed_port()?);
        for args in [
            vec!["--url", &url, "check"],
            vec!["--url", &url, "status", "x"],
            vec!["--url", &url, "exec", "x", "--", "touch", ran],
        ] {
            let out = run(&args).await?;
            ensure!(code(&out) == 69, "{args:?}: {out:?}");
            let line = one_line_error(&out).with_context(|| format!("{args:?}"))?;
            ensure!(line.contains("cannot connect to"), "{line}");
            ensure!(out.stdout.is_empty(), "{args:?}: {out:?}");
        }
    }
    ensure!(!std::path::Path::new(ran).exists());
    Ok(())
}

#[tokio::test]
async fn completions_are_generated_for_the_common_shells() -> Result<()> {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell]).await?;
        ensure!(code(&out) == 0, "{shell}: {out:?}");
        let text = String::from_utf8(out.stdout)?;
        ensure!(
            text.contains("dlock") && text.contains("exec") && text.contains("no-wait"),
            "{shell}"
        );
    }
    let out = run(&["completions", "tcsh"]).await?;
    ensure!(code(&out) == 64, "{out:?}");
    one_line_error(&out)?;
    Ok(())
}
