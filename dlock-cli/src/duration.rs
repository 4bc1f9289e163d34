//! Durations on the command line: a whole number and a unit, `1500ms`, `30s`, `2m` or `1h`.
//!
//! Deliberately this small: `humantime` would also take `1h 30m`, `2days` or `1.5s`, forms this tool
//! does not document, so a typo could silently mean something else.

use std::time::Duration;

/// What the error message offers.
pub const FORMS: &str = "a whole number and a unit: 1500ms, 30s, 2m or 1h";

/// Parses `1500ms`, `30s`, `2m` or `1h` (a whole number of milliseconds, seconds, minutes or hours).
pub fn parse(text: &str) -> Result<Duration, String> {
    let bad = || format!("expected {FORMS}");
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return Err(bad());
    }
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{number} is too large; expected {FORMS}"))?;
    let per_unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    n.checked_mul(per_unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text} is too long; expected {FORMS}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_four_units() {
        assert_eq!(parse("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_everything_else_naming_the_forms() {
        for bad in [
            "",
            "30",
            "s",
            "30x",
            "1.5s",
            "-1s",
            "+1s",
            " 30s",
            "30s ",
            "30 s",
            "30S",
            "1h30m",
            "2d",
            "30sec",
            "1e3ms",
            "99999999999999999999s",
            "18446744073709551615h",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains("1500ms, 30s, 2m or 1h"), "{bad:?}: {err}");
            assert!(!err.contains('\n'), "{bad:?}: {err}");
        }
    }
}
