//! `dlock status`: who holds each lock and who waits, in queue order.

use dlock::EntryInfo;
use serde_json::{json, Value};

use crate::exit::Failure;
use crate::store::Store;

/// The queues of `names`, as a table or as JSON.
pub async fn run(store: &Store, names: &[String], as_json: bool) -> Result<String, Failure> {
    let mut queues = Vec::with_capacity(names.len());
    for name in names {
        let entries = store.locks.inspect(name).await.map_err(Failure::from)?;
        queues.push((name.as_str(), entries));
    }
    let driver = store.locks.capabilities().driver;
    Ok(if as_json {
        let mut text = serde_json::to_string_pretty(&to_json(driver, &queues))
            .expect("JSON values always serialize");
        text.push('\n');
        text
    } else {
        table(&queues)
    })
}

fn state(entry: &EntryInfo) -> &'static str {
    if entry.granted {
        "granted"
    } else {
        "waiting"
    }
}

/// `{"driver": …, "locks": [{"name": …, "entries": [{"position", "state", "mode", "converting_to",
/// "fencing_token", "owner", "seq"}, …]}, …]}`; `converting_to` and `fencing_token` are `null` when
/// there is none (a waiter has no token).
fn to_json(driver: &str, queues: &[(&str, Vec<EntryInfo>)]) -> Value {
    let locks: Vec<Value> = queues
        .iter()
        .map(|(name, entries)| {
            let entries: Vec<Value> = entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    json!({
                        "position": i + 1,
                        "state": state(e),
                        "mode": e.mode.short_name(),
                        "converting_to": e.converting_to.map(|m| m.short_name()),
                        "fencing_token": e.token,
                        "owner": e.owner.as_str(),
                        "seq": e.seq,
                    })
                })
                .collect();
            json!({ "name": name, "entries": entries })
        })
        .collect();
    json!({ "driver": driver, "locks": locks })
}

fn table(queues: &[(&str, Vec<EntryInfo>)]) -> String {
    let mut rows: Vec<[String; 7]> =
        vec![["NAME", "#", "STATE", "MODE", "CONVERTING", "TOKEN", "OWNER"].map(String::from)];
    for (name, entries) in queues {
        if entries.is_empty() {
            rows.push([
                name.to_string(),
                "-".into(),
                "free".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for (i, e) in entries.iter().enumerate() {
            rows.push([
                name.to_string(),
                (i + 1).to_string(),
                state(e).into(),
                e.mode.short_name().into(),
                e.converting_to
                    .map_or_else(|| "-".into(), |m| format!("-> {m}")),
                e.token.map_or_else(|| "-".into(), |t| t.to_string()),
                e.owner.to_string(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlock::{LockMode, OwnerId};

    fn entry(owner: &str, granted: bool, mode: LockMode, token: Option<u64>) -> EntryInfo {
        EntryInfo {
            owner: OwnerId::parse(owner).unwrap(),
            seq: 1,
            mode,
            granted,
            converting_to: None,
            token,
        }
    }

    #[test]
    fn table_lists_entries_in_order_and_free_names() {
        let mut holder = entry("a-1", true, LockMode::PR, Some(41));
        holder.converting_to = Some(LockMode::EX);
        let queues = vec![
            (
                "jobs",
                vec![holder, entry("b-1", false, LockMode::CW, None)],
            ),
            ("idle", vec![]),
        ];
        let text = table(&queues);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("NAME"));
        let cols = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            cols(lines[1]),
            ["jobs", "1", "granted", "PR", "->", "EX", "41", "a-1"]
        );
        assert_eq!(
            cols(lines[2]),
            ["jobs", "2", "waiting", "CW", "-", "-", "b-1"]
        );
        assert_eq!(cols(lines[3]), ["idle", "-", "free", "-", "-", "-", "-"]);
    }

    #[test]
    fn json_has_nulls_for_what_is_not_there() {
        let queues = vec![(
            "jobs",
            vec![
                entry("a-1", true, LockMode::PW, Some(7)),
                entry("b-1", false, LockMode::PR, None),
            ],
        )];
        let v = to_json("memory", &queues);
        let e = &v["locks"][0]["entries"];
        assert_eq!(e[0]["state"], "granted");
        assert_eq!(e[0]["fencing_token"], 7);
        assert_eq!(e[1]["fencing_token"], Value::Null);
        assert_eq!(e[1]["converting_to"], Value::Null);
        assert_eq!(e[1]["position"], 2);
    }
}
