//! Exit statuses, and the one-line failure that carries one to `main`.

use std::fmt;
use std::time::Duration;

/// Bad arguments: an unknown mode, a bad duration, URL or lock name (as `EX_USAGE`).
pub const USAGE: u8 = 64;
/// The store is unreachable, refused the credentials, or failed (as `EX_UNAVAILABLE`).
pub const UNAVAILABLE: u8 = 69;
/// A bug in dlock (as `EX_SOFTWARE`).
pub const INTERNAL: u8 = 70;
/// `--no-wait` found the lock held or queued in a conflicting mode (as `EX_TEMPFAIL`).
pub const BUSY: u8 = 75;
/// `--timeout` passed before the lock was granted.
pub const TIMEOUT: u8 = 76;
/// The lock was lost while the command ran; the command was stopped.
pub const LOST: u8 = 77;
/// The command exists but could not be executed (as a shell does).
pub const CANNOT_EXECUTE: u8 = 126;
/// The command was not found (as a shell does).
pub const NOT_FOUND: u8 = 127;

/// The table printed by `--help`; the README has the same one.
pub const HELP: &str = "\
Exit status:
  0-255  exec: the command's own status (128+N if it died of signal N)
  64     usage: bad arguments, unknown mode, bad duration, URL or lock name
  69     the store is unreachable, refused the credentials, or failed
  70     internal error (a bug in dlock)
  75     busy: --no-wait and the lock is held or queued in a conflicting mode
  76     timeout: --timeout passed before the lock was granted
  77     lost: the lock was lost while the command ran; the command was stopped
  126    the command could not be executed
  127    the command was not found
  128+N  dlock got signal N (INT, TERM, HUP) while waiting for the lock";

/// Why `dlock` stops, with the status to exit with. Printed as one line: `dlock: <message>`.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Failure::new(USAGE, message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dlock: {}", one_line(&self.message))
    }
}

/// `text` with its line breaks (and the indentation after them) folded into single spaces.
pub fn one_line(text: &str) -> String {
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The status for a dlock error, and its message.
impl From<dlock::Error> for Failure {
    fn from(err: dlock::Error) -> Self {
        use dlock::Error as E;
        let code = match &err {
            E::WouldBlock { .. } => BUSY,
            E::Timeout { .. } => TIMEOUT,
            E::Lost { .. } => LOST,
            E::InvalidName { .. }
            | E::InvalidTtl { .. }
            | E::InvalidMode { .. }
            | E::InvalidUrl { .. }
            | E::Unsupported { .. } => USAGE,
            E::Backend { .. } | E::Connect { .. } => UNAVAILABLE,
            _ => INTERNAL,
        };
        Failure::new(code, err.to_string())
    }
}

/// A duration as the user writes it: `1500ms`, `30s`, `2m`, `1h`, or the largest unit that is exact.
pub fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_print_as_one_prefixed_line() {
        let f = Failure::new(USAGE, "first\n  second\n\nthird");
        assert_eq!(f.to_string(), "dlock: first second third");
    }

    #[test]
    fn dlock_errors_map_to_their_statuses() {
        let busy = Failure::from(dlock::Error::WouldBlock { name: "x".into() });
        assert_eq!(busy.code, BUSY);
        let timeout = Failure::from(dlock::Error::Timeout {
            name: "x".into(),
            waited: Duration::from_secs(1),
        });
        assert_eq!(timeout.code, TIMEOUT);
        let url = Failure::from(dlock::Error::InvalidUrl {
            url: "x".into(),
            reason: "y".into(),
        });
        assert_eq!(url.code, USAGE);
        let store = Failure::from(dlock::Error::backend_msg("redis", "down"));
        assert_eq!(store.code, UNAVAILABLE);
        let refused = Failure::from(dlock::Error::connect(
            "redis",
            "redis://h:1",
            "refused",
            "start it",
        ));
        assert_eq!(refused.code, UNAVAILABLE);
    }

    #[test]
    fn durations_show_in_their_largest_exact_unit() {
        assert_eq!(show(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show(Duration::from_secs(30)), "30s");
        assert_eq!(show(Duration::from_secs(120)), "2m");
        assert_eq!(show(Duration::from_secs(7200)), "2h");
        assert_eq!(show(Duration::ZERO), "0s");
    }
}
