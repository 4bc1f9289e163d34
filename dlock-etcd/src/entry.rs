//! Entry keys and values, and a name's queue as read from etcd.

use dlock_core::grant::QueueEntry;
use dlock_core::{EntryInfo, EntryKey, LockMode, LockName, OwnerId};
use etcd_client::{Compare, CompareOp, KeyValue};

/// `<prefix>/<encoded name>/`: every entry of one name, and nothing else (encoded names contain no
/// `/`, so no name's range covers another's).
pub(crate) fn name_prefix(prefix: &str, name: &LockName) -> String {
    format!("{prefix}/{}/", name.encoded())
}

/// `<prefix>/<encoded name>.fence`: the name's fence register. Encoded names contain neither `.` nor
/// `/`, so this key lies outside every name's range `<prefix>/<encoded name>/` (and no other name's
/// register can be it): no queue read or grant guard ever sees it.
pub(crate) fn fence_key(prefix: &str, name: &LockName) -> String {
    format!("{prefix}/{}.fence", name.encoded())
}

/// `<prefix>/<encoded name>/<owner>`.
pub(crate) fn entry_key(prefix: &str, key: &EntryKey) -> String {
    format!("{}{}", name_prefix(prefix, &key.name), key.owner)
}

/// What an entry's value says.
///
/// The encoding is `MODE` for a waiting entry and `MODE!TOKEN>TARGET` for a granted one, where
/// `TOKEN` (the fencing token of the current grant) is left out while it equals the key's
/// `mod_revision` — the revision of the transaction that made the grant — and `>TARGET` is there only
/// while a conversion to `TARGET` is pending. Examples: `EX`, `PR!`, `PR!1207>EX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Value {
    pub mode: LockMode,
    pub granted: bool,
    /// The token when it is not the key's `mod_revision`.
    pub token: Option<u64>,
    pub converting_to: Option<LockMode>,
}

impl Value {
    pub fn waiting(mode: LockMode) -> Self {
        Value {
            mode,
            granted: false,
            token: None,
            converting_to: None,
        }
    }

    /// A grant made by the transaction that writes this value: its token is that revision.
    pub fn fresh_grant(mode: LockMode) -> Self {
        Value {
            mode,
            granted: true,
            token: None,
            converting_to: None,
        }
    }

    pub fn encode(&self) -> String {
        let mut s = self.mode.to_string();
        if self.granted {
            s.push('!');
            if let Some(token) = self.token {
                s.push_str(&token.to_string());
            }
            if let Some(target) = self.converting_to {
                s.push('>');
                s.push_str(&target.to_string());
            }
        }
        s
    }

    /// `None` for anything this driver did not write.
    pub fn decode(raw: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(raw).ok()?;
        let mode_of = |s: &str| -> Option<LockMode> {
            // Only the exact two-letter names this driver writes; `FromStr` is more lenient.
            LockMode::ALL.into_iter().find(|m| m.short_name() == s)
        };
        let Some((mode, rest)) = text.split_once('!') else {
            return Some(Value::waiting(mode_of(text)?));
        };
        let (token, target) = match rest.split_once('>') {
            Some((t, target)) => (t, Some(mode_of(target)?)),
            None => (rest, None),
        };
        let token = match token {
            "" => None,
            t if t.bytes().all(|b| b.is_ascii_digit()) && !t.starts_with('0') => {
                Some(t.parse().ok()?)
            }
            _ => return None,
        };
        Some(Value {
            mode: mode_of(mode)?,
            granted: true,
            token,
            converting_to: target,
        })
    }
}

/// Holds while the value of `key` says "granted in `mode`" (`MODE!…`, whatever its token and pending
/// conversion): see [`granted_bounds`].
pub(crate) fn granted_in(key: &str, mode: LockMode) -> [Compare; 2] {
    let (above, below) = granted_bounds(mode);
    [
        Compare::value(key, CompareOp::Greater, above),
        Compare::value(key, CompareOp::Less, below),
    ]
}

/// The values strictly between these two bytes strings are, among the values this driver writes,
/// exactly those of an entry granted in `mode`: `MODE!…` sorts between `MODE ` and `MODE"` (`!` is
/// the byte between the space and `"`), a waiting `MODE` sorts before both, and every other mode's
/// values sort outside (mode names are two letters). etcd compares values byte by byte, as here.
fn granted_bounds(mode: LockMode) -> (Vec<u8>, Vec<u8>) {
    let granted = Value::fresh_grant(mode).encode().into_bytes();
    let stem = granted
        .strip_suffix(b"!")
        .expect("a grant's value ends in '!'");
    ([stem, b" "].concat(), [stem, b"\""].concat())
}

/// One live entry of a name's queue.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub owner: OwnerId,
    pub key: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
    pub value: Value,
}

impl Entry {
    /// Reads an entry from a key-value pair under `name_prefix`; `None` for foreign keys (a deeper
    /// path, an invalid owner id, a value this driver did not write, or no lease — an entry without a
    /// lease would never go away and could block the name forever).
    pub fn from_kv(name_prefix: &str, kv: &KeyValue) -> Option<Self> {
        let key = std::str::from_utf8(kv.key()).ok()?;
        let owner = OwnerId::parse(key.strip_prefix(name_prefix)?)?;
        let value = Value::decode(kv.value())?;
        if kv.lease() == 0 {
            return None;
        }
        Some(Entry {
            owner,
            key: key.to_owned(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
            value,
        })
    }

    /// The fencing token of the entry's current grant.
    pub fn token(&self) -> u64 {
        self.value.token.unwrap_or(self.mod_revision as u64)
    }

    pub fn queue_entry(&self) -> QueueEntry {
        QueueEntry {
            seq: self.create_revision as u64,
            mode: self.value.mode,
            granted: self.value.granted,
            converting_to: self.value.converting_to,
        }
    }

    pub fn info(&self) -> EntryInfo {
        EntryInfo {
            owner: self.owner.clone(),
            seq: self.create_revision as u64,
            mode: self.value.mode,
            granted: self.value.granted,
            converting_to: self.value.converting_to,
            token: self.value.granted.then(|| self.token()),
        }
    }
}

/// A name's queue at one revision, in queue (create revision) order.
#[derive(Clone, Debug)]
pub(crate) struct View {
    /// The store revision the read saw; nothing in the name's range changed after it when a
    /// transaction's `mod_revision < revision + 1` guard holds.
    pub revision: i64,
    pub entries: Vec<Entry>,
}

impl View {
    pub fn queue(&self) -> Vec<QueueEntry> {
        self.entries.iter().map(Entry::queue_entry).collect()
    }

    pub fn position(&self, owner: &OwnerId) -> Option<usize> {
        self.entries.iter().position(|e| &e.owner == owner)
    }
}

/// Whether entry `other` (at queue index `j`) keeps the entry at index `me` waiting — for a waiting
/// entry, the constraints of [`dlock_core::grant::grantable`]; for a pending conversion, a granted
/// entry whose held mode conflicts with the target. Used only to pick what to watch and to skip
/// events that change nothing; the grant itself is always decided by `dlock_core::grant`.
pub(crate) fn blocks(me: &Value, i: usize, other: &Value, j: usize) -> bool {
    match me.converting_to {
        Some(target) if me.granted => other.granted && !target.compatible_with(other.mode),
        _ => {
            let held_constrains = (j < i || other.granted) && !me.mode.compatible_with(other.mode);
            let target_constrains = other
                .converting_to
                .is_some_and(|t| !me.mode.compatible_with(t));
            held_constrains || target_constrains
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LockMode::*;

    #[test]
    fn values_round_trip() {
        let cases = [
            Value::waiting(EX),
            Value::fresh_grant(NL),
            Value {
                mode: PR,
                granted: true,
                token: Some(1207),
                converting_to: Some(EX),
            },
            Value {
                mode: CW,
                granted: true,
                token: None,
                converting_to: Some(PW),
            },
        ];
        for v in cases {
            assert_eq!(
                Value::decode(v.encode().as_bytes()),
                Some(v),
                "{}",
                v.encode()
            );
        }
        assert_eq!(Value::waiting(EX).encode(), "EX");
        assert_eq!(cases[2].encode(), "PR!1207>EX");
    }

    #[test]
    fn foreign_values_are_refused() {
        for raw in [
            "",
            "ex",
            "EXCLUSIVE",
            "EX!x",
            "EX!01",
            "EX!>",
            "EX!>XX",
            "EX!1>EX>EX",
            "{}",
            "EX!-1",
        ] {
            assert_eq!(Value::decode(raw.as_bytes()), None, "{raw:?}");
        }
        assert_eq!(Value::decode(&[0xff, 0xfe]), None);
    }

    #[test]
    fn granted_bounds_take_exactly_the_grants_of_one_mode() {
        let mut values = Vec::new();
        for mode in LockMode::ALL {
            values.push(Value::waiting(mode));
            values.push(Value::fresh_grant(mode));
            for token in [Some(7), Some(1207), None] {
                for converting_to in LockMode::ALL.map(Some).into_iter().chain([None]) {
                    values.push(Value {
                        mode,
                        granted: true,
                        token,
                        converting_to,
                    });
                }
            }
        }
        for mode in LockMode::ALL {
            let (above, below) = granted_bounds(mode);
            for v in &values {
                let raw = v.encode().into_bytes();
                let inside = above < raw && raw < below;
                assert_eq!(
                    inside,
                    v.granted && v.mode == mode,
                    "{mode}: {}",
                    v.encode()
                );
            }
        }
    }

    #[test]
    fn keys_keep_names_apart() {
        let a = EntryKey {
            name: LockName::new("a/b").unwrap(),
            owner: OwnerId::parse("c-1").unwrap(),
        };
        assert_eq!(entry_key("dlock", &a), "dlock/a%2Fb/c-1");
        assert_eq!(name_prefix("dlock", &a.name), "dlock/a%2Fb/");
    }
}
