//! The six lock modes of a classic distributed lock manager and their compatibility matrix.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A lock mode, from the weakest (`NL`) to the strongest (`EX`).
///
/// Two holders can share a name only when their modes are [compatible](LockMode::compatible_with).
///
/// | mode | long name | typical use |
/// |------|-----------|-------------|
/// | `NL` | null | interest only: never waits, never blocks anyone |
/// | `CR` | concurrent-read | read while others may write (unprotected read) |
/// | `CW` | concurrent-write | write alongside other concurrent writers |
/// | `PR` | protected-read | shared read lock: readers only |
/// | `PW` | protected-write | update lock: one writer, concurrent readers (`CR`) allowed |
/// | `EX` | exclusive | nobody else except `NL` |
///
/// Modes parse from and print as the short name; the long name parses too:
///
/// ```
/// use dlock_core::LockMode;
/// assert_eq!("PW".parse::<LockMode>().unwrap(), LockMode::PW);
/// assert_eq!("protected-write".parse::<LockMode>().unwrap(), LockMode::PW);
/// assert_eq!(LockMode::PW.to_string(), "PW");
/// assert_eq!(LockMode::PW.long_name(), "protected-write");
/// assert!(LockMode::PR.compatible_with(LockMode::CR));
/// assert!(!LockMode::PR.compatible_with(LockMode::PW));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LockMode {
    /// Null: compatible with everything.
    NL,
    /// Concurrent read.
    CR,
    /// Concurrent write.
    CW,
    /// Protected read (shared).
    PR,
    /// Protected write (update).
    PW,
    /// Exclusive.
    EX,
}

/// The DLM compatibility matrix, indexed by [`LockMode::index`]; symmetric. Everything else asks this table.
const COMPATIBLE: [[bool; 6]; 6] = [
    //   NL    CR     CW     PR     PW     EX
    [true, true, true, true, true, true],      // NL
    [true, true, true, true, true, false],     // CR
    [true, true, true, false, false, false],   // CW
    [true, true, false, true, false, false],   // PR
    [true, true, false, false, false, false],  // PW
    [true, false, false, false, false, false], // EX
];

impl LockMode {
    /// All six modes, weakest first.
    pub const ALL: [LockMode; 6] = [
        LockMode::NL,
        LockMode::CR,
        LockMode::CW,
        LockMode::PR,
        LockMode::PW,
        LockMode::EX,
    ];

    /// The position of this mode in [`LockMode::ALL`] (0 for `NL` … 5 for `EX`).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Whether a holder in `self` and a holder in `other` may hold the same name at once.
    pub const fn compatible_with(self, other: LockMode) -> bool {
        COMPATIBLE[self.index()][other.index()]
    }

    /// Whether converting from `self` to `to` only weakens the lock: every mode compatible with `self`
    /// is also compatible with `to`. Such a conversion is granted at once.
    ///
    /// ```
    /// use dlock_core::LockMode;
    /// assert!(LockMode::EX.is_weaker_or_equal(LockMode::PR) == false);
    /// assert!(LockMode::PR.is_weaker_or_equal(LockMode::EX));
    /// ```
    pub fn is_weaker_or_equal(self, than: LockMode) -> bool {
        LockMode::ALL
            .iter()
            .all(|&m| !than.compatible_with(m) || self.compatible_with(m))
    }

    /// The meet of two modes in the strength lattice: the strongest mode that is weaker than or equal
    /// to both (NL < CR < CW < PW < EX and CR < PR < PW; `CW` and `PR` are incomparable).
    ///
    /// When a client cannot know which of two modes the store settled on — a conversion whose reply
    /// was lost — it may rely on the meet only: every mode compatible with either is compatible with
    /// the meet, so claiming it never claims more than the store grants.
    ///
    /// ```
    /// use dlock_core::LockMode::*;
    /// assert_eq!(PR.meet(CW), CR);
    /// assert_eq!(PW.meet(CW), CW);
    /// assert_eq!(EX.meet(PR), PR);
    /// ```
    pub fn meet(self, other: LockMode) -> LockMode {
        extreme(
            |m| m.is_weaker_or_equal(self) && m.is_weaker_or_equal(other),
            |lower, m| lower.is_weaker_or_equal(m),
        )
        .expect("the modes form a lattice: any two have a greatest lower bound")
    }

    /// The join of two modes in the strength lattice: the weakest mode that is stronger than or equal
    /// to both, e.g. `PW` for `PR` and `CW`. Holding it allows everything either mode allows; a name
    /// asked for twice in one request is taken once in the join.
    ///
    /// ```
    /// use dlock_core::LockMode::*;
    /// assert_eq!(PR.join(CW), PW);
    /// assert_eq!(CR.join(PR), PR);
    /// assert_eq!(NL.join(EX), EX);
    /// ```
    pub fn join(self, other: LockMode) -> LockMode {
        extreme(
            |m| self.is_weaker_or_equal(m) && other.is_weaker_or_equal(m),
            |upper, m| m.is_weaker_or_equal(upper),
        )
        .expect("the modes form a lattice: any two have a least upper bound")
    }

    /// The short name: `NL`, `CR`, `CW`, `PR`, `PW` or `EX`.
    pub const fn short_name(self) -> &'static str {
        match self {
            LockMode::NL => "NL",
            LockMode::CR => "CR",
            LockMode::CW => "CW",
            LockMode::PR => "PR",
            LockMode::PW => "PW",
            LockMode::EX => "EX",
        }
    }

    /// The long name, e.g. `protected-write`.
    pub const fn long_name(self) -> &'static str {
        match self {
            LockMode::NL => "null",
            LockMode::CR => "concurrent-read",
            LockMode::CW => "concurrent-write",
            LockMode::PR => "protected-read",
            LockMode::PW => "protected-write",
            LockMode::EX => "exclusive",
        }
    }
}

/// Among the modes `admitted` accepts, the one `m` with `within(c, m)` for every accepted `c`: the
/// greatest of them when `within` is "weaker or equal", the least when it is "stronger or equal".
fn extreme(
    admitted: impl Fn(LockMode) -> bool,
    within: impl Fn(LockMode, LockMode) -> bool,
) -> Option<LockMode> {
    let candidates = LockMode::ALL.map(|m| admitted(m).then_some(m));
    candidates
        .into_iter()
        .flatten()
        .find(|&m| candidates.into_iter().flatten().all(|c| within(c, m)))
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

impl FromStr for LockMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LockMode::ALL
            .into_iter()
            .find(|m| {
                s.eq_ignore_ascii_case(m.short_name()) || s.eq_ignore_ascii_case(m.long_name())
            })
            .ok_or_else(|| Error::InvalidMode {
                given: s.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LockMode::*;

    /// The classic DLM table written out cell by cell, independent of the const table's layout.
    fn expected(a: LockMode, b: LockMode) -> bool {
        let table = [
            (NL, NL, true),
            (NL, CR, true),
            (NL, CW, true),
            (NL, PR, true),
            (NL, PW, true),
            (NL, EX, true),
            (CR, NL, true),
            (CR, CR, true),
            (CR, CW, true),
            (CR, PR, true),
            (CR, PW, true),
            (CR, EX, false),
            (CW, NL, true),
            (CW, CR, true),
            (CW, CW, true),
            (CW, PR, false),
            (CW, PW, false),
            (CW, EX, false),
            (PR, NL, true),
            (PR, CR, true),
            (PR, CW, false),
            (PR, PR, true),
            (PR, PW, false),
            (PR, EX, false),
            (PW, NL, true),
            (PW, CR, true),
            (PW, CW, false),
            (PW, PR, false),
            (PW, PW, false),
            (PW, EX, false),
            (EX, NL, true),
            (EX, CR, false),
            (EX, CW, false),
            (EX, PR, false),
            (EX, PW, false),
            (EX, EX, false),
        ];
        table
            .iter()
            .find(|(x, y, _)| *x == a && *y == b)
            .map(|(_, _, c)| *c)
            .expect("every pair is listed")
    }

    #[test]
    fn matrix_matches_dlm_table_cell_by_cell() {
        let mut cells = 0;
        for a in LockMode::ALL {
            for b in LockMode::ALL {
                assert_eq!(a.compatible_with(b), expected(a, b), "{a} vs {b}");
                cells += 1;
            }
        }
        assert_eq!(cells, 36);
    }

    #[test]
    fn matrix_is_symmetric() {
        for a in LockMode::ALL {
            for b in LockMode::ALL {
                assert_eq!(a.compatible_with(b), b.compatible_with(a), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn weaker_modes_form_the_dlm_lattice() {
        assert!(NL.is_weaker_or_equal(EX));
        assert!(CR.is_weaker_or_equal(PW));
        assert!(PR.is_weaker_or_equal(PW));
        assert!(CW.is_weaker_or_equal(PW));
        assert!(!PR.is_weaker_or_equal(CW));
        assert!(!CW.is_weaker_or_equal(PR));
        assert!(!EX.is_weaker_or_equal(PW));
        for m in LockMode::ALL {
            assert!(m.is_weaker_or_equal(m));
            assert!(m.is_weaker_or_equal(EX));
            assert!(NL.is_weaker_or_equal(m));
        }
    }

    #[test]
    fn meet_is_the_greatest_lower_bound_of_every_pair() {
        for a in LockMode::ALL {
            for b in LockMode::ALL {
                let m = a.meet(b);
                assert!(
                    m.is_weaker_or_equal(a) && m.is_weaker_or_equal(b),
                    "{a}∧{b} = {m}"
                );
                assert_eq!(m, b.meet(a), "{a}∧{b} is commutative");
                for l in LockMode::ALL {
                    if l.is_weaker_or_equal(a) && l.is_weaker_or_equal(b) {
                        assert!(
                            l.is_weaker_or_equal(m),
                            "{l} is below {a} and {b} but not {m}"
                        );
                    }
                }
                // What matters for safety: whoever is compatible with the store's mode, either one,
                // is compatible with the mode the client relies on.
                for other in LockMode::ALL {
                    if other.compatible_with(a) || other.compatible_with(b) {
                        assert!(other.compatible_with(m), "{other} vs {a}∧{b} = {m}");
                    }
                }
            }
        }
    }

    #[test]
    fn join_is_the_least_upper_bound_of_every_pair() {
        for a in LockMode::ALL {
            for b in LockMode::ALL {
                let j = a.join(b);
                assert!(
                    a.is_weaker_or_equal(j) && b.is_weaker_or_equal(j),
                    "{a}∨{b} = {j}"
                );
                assert_eq!(j, b.join(a));
                for u in LockMode::ALL {
                    if a.is_weaker_or_equal(u) && b.is_weaker_or_equal(u) {
                        assert!(
                            j.is_weaker_or_equal(u),
                            "{u} is above {a} and {b} but not {j}"
                        );
                    }
                }
                // Whoever the join admits, both modes admit.
                for other in LockMode::ALL {
                    if other.compatible_with(j) {
                        assert!(other.compatible_with(a) && other.compatible_with(b));
                    }
                }
            }
        }
        assert_eq!(PR.join(CW), PW);
        assert_eq!(CW.join(PR), PW);
    }

    #[test]
    fn meet_of_incomparable_and_comparable_pairs() {
        assert_eq!(PR.meet(CW), CR);
        assert_eq!(CW.meet(PR), CR);
        assert_eq!(PW.meet(CW), CW);
        assert_eq!(PW.meet(PR), PR);
        assert_eq!(EX.meet(CW), CW);
        assert_eq!(CR.meet(EX), CR);
        for m in LockMode::ALL {
            assert_eq!(m.meet(m), m);
            assert_eq!(m.meet(EX), m);
            assert_eq!(m.meet(NL), NL);
        }
    }

    #[test]
    fn parses_short_and_long_names_and_prints_short() {
        for m in LockMode::ALL {
            assert_eq!(m.short_name().parse::<LockMode>().unwrap(), m);
            assert_eq!(m.long_name().parse::<LockMode>().unwrap(), m);
            assert_eq!(m.to_string().parse::<LockMode>().unwrap(), m);
        }
        assert_eq!("pw".parse::<LockMode>().unwrap(), PW);
    }

    #[test]
    fn unknown_mode_string_names_the_valid_ones() {
        let err = "WRITE".parse::<LockMode>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("WRITE"), "{msg}");
        assert!(msg.contains("protected-write"), "{msg}");
    }
}
