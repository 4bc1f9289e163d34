//! Lock names: the rules they follow and the one way drivers encode them into store keys.

use std::fmt;
use std::sync::Arc;

use crate::{Error, Result};

/// A validated lock name: any non-empty UTF-8 string of at most [`LockName::MAX_LEN`] bytes.
///
/// Every character is allowed, including `/`, `.`, `*`, `>`, spaces and non-ASCII letters; drivers use
/// [`LockName::encoded`] so that no name can break a store's key syntax or escape its namespace, and two
/// different names never map to the same key.
///
/// ```
/// use dlock_core::LockName;
/// let name = LockName::new("stock/42").unwrap();
/// assert_eq!(name.as_str(), "stock/42");
/// assert_eq!(name.encoded(), "stock%2F42");
/// assert!(LockName::new("").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockName(Arc<str>);

impl LockName {
    /// The longest name accepted, in bytes of UTF-8.
    pub const MAX_LEN: usize = 4096;

    /// Checks `name` against the rules.
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        if name.is_empty() {
            return Err(Error::InvalidName {
                name: String::new(),
                reason: "a lock name must not be empty".into(),
            });
        }
        if name.len() > Self::MAX_LEN {
            return Err(Error::InvalidName {
                name: name.chars().take(64).collect(),
                reason: format!(
                    "it is {} bytes long; the limit is {} bytes (hash long names yourself if you need more)",
                    name.len(),
                    Self::MAX_LEN
                ),
            });
        }
        Ok(LockName(Arc::from(name)))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as one store-safe key segment: ASCII letters, digits, `-` and `_` stay as they are,
    /// every other byte becomes `%XX` (upper-case hex). The result never contains `/`, `.`, `*`, `>`,
    /// `{`, `}`, `:` or whitespace, and different names always give different segments.
    pub fn encoded(&self) -> String {
        encode_segment(self.as_str())
    }

    /// Reverses [`LockName::encoded`]; `None` when `segment` is not an encoding of a valid name.
    ///
    /// ```
    /// use dlock_core::LockName;
    /// let name = LockName::new("a.> ü").unwrap();
    /// assert_eq!(LockName::decode(&name.encoded()), Some(name));
    /// ```
    pub fn decode(segment: &str) -> Option<Self> {
        let bytes = segment.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' => {
                    let hex = segment.get(i + 1..i + 3)?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 3;
                }
                b if is_plain(b) => {
                    out.push(b);
                    i += 1;
                }
                _ => return None,
            }
        }
        LockName::new(String::from_utf8(out).ok()?).ok()
    }
}

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn encode_segment(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if is_plain(b) {
            out.push(b as char);
        } else {
            write!(out, "%{b:02X}").expect("writing to a String cannot fail");
        }
    }
    out
}

impl fmt::Display for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for LockName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_name_is_rejected_with_reason() {
        let msg = LockName::new("").unwrap_err().to_string();
        assert!(msg.contains("must not be empty"), "{msg}");
    }

    #[test]
    fn over_long_name_is_rejected_not_truncated() {
        assert!(LockName::new("x".repeat(LockName::MAX_LEN)).is_ok());
        let msg = LockName::new("x".repeat(LockName::MAX_LEN + 1))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("4097 bytes"), "{msg}");
        assert!(msg.contains("4096"), "{msg}");
    }

    #[test]
    fn encoding_keeps_store_syntax_out() {
        for raw in ["a", "a*", "a.>", "a/b", "a b", "ü", "{tag}:x", "%41"] {
            let enc = LockName::new(raw).unwrap().encoded();
            assert!(
                !enc.contains(['/', '.', '*', '>', ' ', '{', '}', ':']),
                "{raw} -> {enc}"
            );
            assert!(enc.is_ascii());
        }
        assert_ne!(
            LockName::new("%41").unwrap().encoded(),
            LockName::new("A").unwrap().encoded()
        );
    }

    proptest! {
        #[test]
        fn encoding_is_injective_and_reversible(a in "\\PC{1,40}", b in "\\PC{1,40}") {
            let (na, nb) = (LockName::new(&a).unwrap(), LockName::new(&b).unwrap());
            prop_assert_eq!(na.encoded() == nb.encoded(), a == b);
            prop_assert_eq!(LockName::decode(&na.encoded()), Some(na));
        }
    }
}
