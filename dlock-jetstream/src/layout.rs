//! Subjects and payloads: how a lock name's queue is laid out in the stream.

use dlock_core::grant::QueueEntry;
use dlock_core::{LockMode, LockName, OwnerId};
use serde::{Deserialize, Serialize};

/// Longest encoded name used as a subject token as it is. NATS caps a protocol line (4 KiB by default),
/// and a subject travels in one, together with a reply inbox and headers sizes; longer names use a
/// digest token instead.
pub(crate) const MAX_PLAIN_TOKEN: usize = 192;

/// The subject token of a lock name: [`LockName::encoded`] when short enough, else `%H` and the SHA-256
/// of the name in hex. `%H` never starts a valid encoding (`%` is always followed by two hex digits), so
/// a digest token cannot equal any plain one; the full name is stored in the queue head and checked on
/// every read, so even a digest collision would be reported rather than merge two locks.
pub(crate) fn name_token(name: &LockName) -> String {
    let encoded = name.encoded();
    if encoded.len() <= MAX_PLAIN_TOKEN {
        return encoded;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_str().as_bytes());
    let mut token = String::with_capacity(2 + 64);
    token.push_str("%H");
    for b in digest.as_ref() {
        token.push_str(&format!("{b:02x}"));
    }
    token
}

/// The subjects of one lock name.
#[derive(Clone, Debug)]
pub(crate) struct NameSubjects {
    /// `<prefix>.<token>`.
    base: String,
}

/// The last token of the queue head's subject. Owner ids never contain `_`, so it cannot be an owner.
const HEAD_TOKEN: &str = "_q";

/// The last two tokens of the fence register's subject: one token more than a name's head and
/// entries, so the name's watch (`<prefix>.<token>.*`) never matches it.
const FENCE_TOKENS: &str = "_fence.r";

impl NameSubjects {
    pub(crate) fn new(prefix: &str, name: &LockName) -> Self {
        NameSubjects {
            base: format!("{prefix}.{}", name_token(name)),
        }
    }

    /// `<prefix>.<token>._q`: the queue head, rewritten (compare-and-set) by every queue change.
    pub(crate) fn head(&self) -> String {
        format!("{}.{HEAD_TOKEN}", self.base)
    }

    /// `<prefix>.<token>.<owner>`: one owner's entry, which carries its lease.
    pub(crate) fn entry(&self, owner: &OwnerId) -> String {
        format!("{}.{}", self.base, owner.as_str())
    }

    /// `<prefix>.<token>._fence.r`: the name's fence register (`Driver::raise_fence`), apart from its
    /// queue. Inside the stream's `<prefix>.>`, but outside the name's watch (one token more than
    /// `<prefix>.<token>.*` matches) and distinct from `<prefix>._clock` (two tokens).
    pub(crate) fn fence(&self) -> String {
        format!("{}.{FENCE_TOKENS}", self.base)
    }

    /// `<prefix>.<token>.*`: everything about the name's queue, for the watch.
    pub(crate) fn all(&self) -> String {
        format!("{}.*", self.base)
    }

    pub(crate) fn is_head(subject: &str) -> bool {
        subject
            .rsplit_once('.')
            .is_some_and(|(_, last)| last == HEAD_TOKEN)
    }
}

/// `<prefix>._clock`: written to learn the server's current time (client-clock lease mode). It has two
/// tokens, so no lock name's subjects (three tokens) can be it.
pub(crate) fn clock_subject(prefix: &str) -> String {
    format!("{prefix}._clock")
}

/// The queue head: every live entry of the name with its grant state, in one message. Compare-and-set on
/// this one subject serialises every grant, so two clients can never both grant conflicting entries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct HeadDoc {
    /// Format version.
    pub v: u32,
    /// The full lock name, so that a digest collision is detected.
    pub name: String,
    /// The sequence of the head message this one replaces (0: none), as read by its writer. Where the
    /// server's compare-and-set cannot be trusted (see `verify` in the driver), a head counts only if
    /// it is the first message on the subject after its base.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub base: u64,
    pub entries: Vec<HeadEntry>,
}

/// One entry as the head stores it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct HeadEntry {
    /// Owner id.
    pub o: String,
    /// Queue position: the stream sequence of the entry message's creation.
    pub s: u64,
    /// Mode held (granted) or requested.
    pub m: String,
    /// Granted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub g: bool,
    /// Pending conversion target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c: Option<String>,
    /// Fencing token of the grant; `0` in a stored head means "the sequence of this head message", so a
    /// grant's token is the stream sequence of the write that made it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub t: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A fence register message's payload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct FenceDoc {
    /// Format version.
    pub v: u32,
    /// The full lock name, so that a digest collision is detected.
    pub name: String,
    /// The register's value from this write on.
    pub value: u64,
    /// The sequence of the register message this one follows (0: none), as read by its writer. Where
    /// the server's compare-and-set cannot be trusted, a write counts only if it is the first message
    /// on the subject after its base, as for heads.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub base: u64,
}

/// An entry message's payload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct EntryDoc {
    pub v: u32,
    /// The stream sequence of the entry's first message; `0` in that first message itself.
    #[serde(default)]
    pub created: u64,
    /// The lease TTL asked for with this write, in milliseconds.
    pub ttl_ms: u64,
}

/// A head entry decoded for the grant rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub owner: OwnerId,
    pub queue: QueueEntry,
    pub token: u64,
}

impl Entry {
    pub(crate) fn decode(e: &HeadEntry, head_seq: u64) -> Option<Entry> {
        let mode: LockMode = e.m.parse().ok()?;
        let converting_to = match &e.c {
            Some(c) => Some(c.parse().ok()?),
            None => None,
        };
        Some(Entry {
            owner: OwnerId::parse(&e.o)?,
            queue: QueueEntry {
                seq: e.s,
                mode,
                granted: e.g,
                converting_to,
            },
            token: if e.g && e.t == 0 { head_seq } else { e.t },
        })
    }

    pub(crate) fn encode(&self) -> HeadEntry {
        HeadEntry {
            o: self.owner.as_str().to_owned(),
            s: self.queue.seq,
            m: self.queue.mode.to_string(),
            g: self.queue.granted,
            c: self.queue.converting_to.map(|m| m.to_string()),
            t: self.token,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_get_a_digest_token_that_no_plain_name_has() {
        let long = LockName::new("k".repeat(LockName::MAX_LEN)).unwrap();
        let token = name_token(&long);
        assert!(token.starts_with("%H") && token.len() == 66, "{token}");
        let other = LockName::new("k".repeat(LockName::MAX_LEN - 1)).unwrap();
        assert_ne!(name_token(&other), token);
        let short = LockName::new("a.b c*>ü").unwrap();
        assert_eq!(name_token(&short), short.encoded());
        let at_limit = LockName::new("x".repeat(MAX_PLAIN_TOKEN)).unwrap();
        assert_eq!(name_token(&at_limit), at_limit.encoded());
        // No encoding contains "%H": '%' is always followed by two upper-case hex digits.
        assert!(!LockName::new("%H").unwrap().encoded().contains("%H"));
    }

    #[test]
    fn subjects_keep_heads_apart_from_owners() {
        let s = NameSubjects::new("dlock", &LockName::new("a.b").unwrap());
        assert_eq!(s.head(), "dlock.a%2Eb._q");
        assert!(NameSubjects::is_head(&s.head()));
        let owner = OwnerId::parse("abc-1").unwrap();
        assert_eq!(s.entry(&owner), "dlock.a%2Eb.abc-1");
        assert!(!NameSubjects::is_head(&s.entry(&owner)));
        assert_eq!(s.all(), "dlock.a%2Eb.*");
    }

    /// NATS subject matching, enough for the wildcards this crate uses (`*` one token, `>` the rest).
    fn matches(filter: &str, subject: &str) -> bool {
        let (mut f, mut s) = (filter.split('.'), subject.split('.'));
        loop {
            match (f.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    #[test]
    fn fence_registers_are_in_the_stream_but_outside_every_queue() {
        let prefix = "app.locks";
        let names = ["a", "_fence", "a.fence", "a/b", "r", "_q", "_clock"];
        let mut fences = Vec::new();
        for name in names {
            let s = NameSubjects::new(prefix, &LockName::new(name).unwrap());
            let fence = s.fence();
            assert!(matches(&format!("{prefix}.>"), &fence), "{fence}");
            assert!(!NameSubjects::is_head(&fence));
            assert_ne!(fence, clock_subject(prefix));
            for other in names {
                let o = NameSubjects::new(prefix, &LockName::new(other).unwrap());
                assert!(!matches(&o.all(), &fence), "{} watches {fence}", o.all());
                assert_ne!(o.head(), fence);
                assert!(!matches(&o.all(), &clock_subject(prefix)));
            }
            fences.push(fence);
        }
        assert_eq!(
            NameSubjects::new("dlock", &LockName::new("a.b").unwrap()).fence(),
            "dlock.a%2Eb._fence.r"
        );
        fences.sort();
        fences.dedup();
        assert_eq!(fences.len(), names.len());
    }

    #[test]
    fn head_entries_round_trip_and_resolve_this_write_tokens() {
        let e = HeadEntry {
            o: "c-1".into(),
            s: 7,
            m: "PR".into(),
            g: true,
            c: Some("EX".into()),
            t: 0,
        };
        let d = Entry::decode(&e, 42).unwrap();
        assert_eq!(d.token, 42);
        assert_eq!(d.queue.converting_to, Some(LockMode::EX));
        let again = d.encode();
        assert_eq!(again.t, 42);
        assert_eq!(
            serde_json::to_string(&HeadEntry {
                g: false,
                c: None,
                t: 0,
                ..e
            })
            .unwrap(),
            r#"{"o":"c-1","s":7,"m":"PR"}"#
        );
    }
}
