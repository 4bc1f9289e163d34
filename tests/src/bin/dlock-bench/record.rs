//! What a scenario produces: per-round pairs of (dlock, baseline) folded into medians, printed as a
//! table row and written as one JSON object per line.

use std::fs::File;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;

/// Which way is better for a measure: rates go up, latencies and costs go down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One scenario's rounds: dlock's figure, the baseline's, and the advantage within each round.
#[derive(Debug, Default)]
pub struct Series {
    ours: Vec<f64>,
    theirs: Vec<f64>,
    advantage: Vec<f64>,
}

impl Series {
    /// Adds one round. The advantage is taken inside the round, so noise that hits both runs of the
    /// round cancels; the median of those is reported, not the ratio of the medians.
    pub fn push(&mut self, ours: f64, theirs: f64, better: Better) {
        // Capped, so a cost of zero still gives a number JSON can carry.
        let advantage = match better {
            Better::Higher => ours / theirs,
            Better::Lower => theirs / ours,
        }
        .min(1e9);
        self.ours.push(ours);
        self.theirs.push(theirs);
        self.advantage.push(advantage);
    }

    pub fn is_empty(&self) -> bool {
        self.ours.is_empty()
    }
}

pub fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// The `p` quantile (0..=1) by nearest rank; `samples` must not be empty.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// One line of `--json` output.
#[derive(Clone, Debug)]
pub struct Record {
    pub driver: String,
    pub scenario: String,
    pub baseline: String,
    pub ours: f64,
    pub theirs: f64,
    pub unit: String,
    pub advantage: f64,
    /// The lowest and highest per-round advantage: how far one round can be from the median on this
    /// machine. Extra keys `advantage_min`/`advantage_max` in JSON.
    pub spread: Option<(f64, f64)>,
    /// Why the scenario produced no figure (then `ours`, `theirs` and `advantage` are NaN, `null` in
    /// JSON).
    pub error: Option<String>,
}

impl Record {
    pub fn to_json(&self) -> String {
        let mut v = json!({
            "driver": self.driver,
            "scenario": self.scenario,
            "baseline": self.baseline,
            "ours": round(self.ours),
            "theirs": round(self.theirs),
            "unit": self.unit,
            "advantage": round(self.advantage),
        });
        if let Some((lo, hi)) = self.spread {
            v["advantage_min"] = round(lo);
            v["advantage_max"] = round(hi);
        }
        if let Some(error) = &self.error {
            v["error"] = json!(error);
        }
        v.to_string()
    }

    pub fn from_json(line: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let text = |k: &str| {
            v[k].as_str()
                .map(str::to_owned)
                .with_context(|| format!("{k:?} is not a string in {line}"))
        };
        let number = |k: &str| match &v[k] {
            serde_json::Value::Null => Ok(f64::NAN),
            n => n
                .as_f64()
                .with_context(|| format!("{k:?} is not a number in {line}")),
        };
        Ok(Record {
            driver: text("driver")?,
            scenario: text("scenario")?,
            baseline: text("baseline")?,
            ours: number("ours")?,
            theirs: number("theirs")?,
            unit: text("unit")?,
            advantage: number("advantage")?,
            spread: v["advantage_min"].as_f64().zip(v["advantage_max"].as_f64()),
            error: v["error"].as_str().map(str::to_owned),
        })
    }
}

/// Four significant digits (more would only be noise); `null` for no figure, as JSON has no NaN.
fn round(x: f64) -> serde_json::Value {
    if !x.is_finite() {
        return serde_json::Value::Null;
    }
    if x == 0.0 {
        return json!(0.0);
    }
    let digits = 4 - x.abs().log10().ceil() as i32;
    let scale = 10f64.powi(digits);
    json!((x * scale).round() / scale)
}

/// Where finished scenarios go: a table row on stdout and, with `--json`, a line in the file, written
/// as each scenario finishes so an interrupted run keeps what it measured.
pub struct Report {
    driver: &'static str,
    json: Option<File>,
}

impl Report {
    pub fn new(driver: &'static str, json: Option<&str>) -> Result<Self> {
        let json = json
            .map(|path| File::create(path).with_context(|| format!("creating {path}")))
            .transpose()?;
        println!(
            "| scenario | dlock | baseline (same round) | advantage: median (range of rounds) |"
        );
        println!("|----------|-------|-----------------------|--------------------|");
        Ok(Report { driver, json })
    }

    pub fn add(
        &mut self,
        scenario: &str,
        baseline: &str,
        unit: &str,
        series: &Series,
    ) -> Result<()> {
        if series.is_empty() {
            return Ok(());
        }
        let record = Record {
            driver: self.driver.to_owned(),
            scenario: scenario.to_owned(),
            baseline: baseline.to_owned(),
            ours: median(&series.ours),
            theirs: median(&series.theirs),
            unit: unit.to_owned(),
            advantage: median(&series.advantage),
            spread: (series.advantage.len() > 1).then(|| {
                let lo = series
                    .advantage
                    .iter()
                    .copied()
                    .fold(f64::INFINITY, f64::min);
                let hi = series
                    .advantage
                    .iter()
                    .copied()
                    .fold(f64::NEG_INFINITY, f64::max);
                (lo, hi)
            }),
            error: None,
        };
        self.write(&record)
    }

    /// A scenario that could not be measured, with the reason, so the failure is a result too.
    pub fn fail(
        &mut self,
        scenario: &str,
        baseline: &str,
        unit: &str,
        error: &anyhow::Error,
    ) -> Result<()> {
        let record = Record {
            driver: self.driver.to_owned(),
            scenario: scenario.to_owned(),
            baseline: baseline.to_owned(),
            ours: f64::NAN,
            theirs: f64::NAN,
            unit: unit.to_owned(),
            advantage: f64::NAN,
            spread: None,
            error: Some(format!("{error:#}")),
        };
        self.write(&record)
    }

    fn write(&mut self, record: &Record) -> Result<()> {
        match &record.error {
            Some(error) => println!(
                "| {} | failed: {error} | {} | — |",
                record.scenario, record.baseline
            ),
            None => println!(
                "| {} | {} | {}: {} | {} |",
                record.scenario,
                format_value(record.ours, &record.unit),
                record.baseline,
                format_value(record.theirs, &record.unit),
                advantage(record)
            ),
        }
        if let Some(file) = &mut self.json {
            writeln!(file, "{}", record.to_json())?;
            file.flush()?;
        }
        Ok(())
    }
}

/// `0.58× (0.41–0.77)`: the median and, when there were several rounds, the range.
pub fn advantage(r: &Record) -> String {
    match r.spread {
        Some((lo, hi)) => format!("{} ({}–{})", times(r.advantage), bare(lo), bare(hi)),
        None => times(r.advantage),
    }
}

pub fn times(x: f64) -> String {
    format!("{}×", bare(x))
}

fn bare(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// A figure with its unit, in the magnitude people read: `5.9 k cycles/s`, `241 µs`, `1.44 ms`.
pub fn format_value(x: f64, unit: &str) -> String {
    match unit {
        "µs" if x >= 1000.0 => format!("{} ms", sig(x / 1000.0)),
        "µs" => format!("{} µs", sig(x)),
        "bytes" if x >= 1024.0 => format!("{} KiB", sig(x / 1024.0)),
        _ if x >= 1e6 => format!("{} M {unit}", sig(x / 1e6)),
        _ if x >= 1e3 => format!("{} k {unit}", sig(x / 1e3)),
        _ => format!("{} {unit}", sig(x)),
    }
}

/// Three significant digits, without a trailing `.0` on whole numbers of three digits or more.
fn sig(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else if a >= 0.1 {
        format!("{x:.3}")
    } else {
        format!("{x:.2e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantage_is_above_one_when_dlock_is_better() {
        let mut s = Series::default();
        s.push(200.0, 100.0, Better::Higher);
        s.push(50.0, 100.0, Better::Lower);
        assert_eq!(s.advantage, vec![2.0, 2.0]);
    }

    #[test]
    fn records_round_trip_through_json() {
        let r = Record {
            driver: "redis".into(),
            scenario: "s".into(),
            baseline: "b".into(),
            ours: 1234.5678,
            theirs: 0.0123456,
            unit: "µs".into(),
            advantage: 3.0,
            spread: Some((2.0, 4.0)),
            error: None,
        };
        let back = Record::from_json(&r.to_json()).unwrap();
        assert_eq!(back.ours, 1235.0);
        assert_eq!(back.theirs, 0.01235);
        assert_eq!(advantage(&back), "3.00× (2.00–4.00)");
        assert_eq!(format_value(1234.0, "µs"), "1.23 ms");
        assert_eq!(format_value(5900.0, "cycles/s"), "5.90 k cycles/s");
        assert_eq!(format_value(17_800.0, "cycles/s"), "17.8 k cycles/s");
    }
}
