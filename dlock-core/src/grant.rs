//! The FIFO grant rule and the conversion rule, as pure functions over a name's queue.
//!
//! Every driver decides grants with these functions (or, for Redis, with a Lua twin that a property
//! test holds against them), so the rule is written once.
//!
//! **Grant rule.** A waiting entry is granted iff its mode is compatible with
//! - the mode of every live entry queued before it (granted or waiting): FIFO, so a reader queued behind
//!   a waiting writer waits and nobody starves;
//! - the mode of every granted entry, wherever it is queued (a holder that converted up is respected);
//! - the target mode of every pending conversion: conversions take priority over new requests.
//!
//! **Conversion rule.** A pending conversion of a granted entry to mode `T` is granted iff `T` is
//! compatible with the mode of every *other granted* entry. Conversions are settled in queue order, one
//! at a time, so two conversions granted together are compatible with each other too. A conversion that
//! only weakens the mode is therefore always granted at once. Two up-conversions that wait on each
//! other's held modes form a cycle: [`conversion_deadlocks`] detects it before it is queued.

use crate::LockMode;

/// One entry of a name's queue, as the grant rule sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueEntry {
    /// Arrival order, assigned by the store; only grows.
    pub seq: u64,
    /// The mode held (when granted) or requested (when waiting).
    pub mode: LockMode,
    /// Whether the entry holds its mode. Grants are sticky: once granted, an entry stays granted until
    /// it leaves the queue.
    pub granted: bool,
    /// A pending conversion of a granted entry to this mode.
    pub converting_to: Option<LockMode>,
}

impl QueueEntry {
    /// A waiting entry.
    pub fn waiting(seq: u64, mode: LockMode) -> Self {
        QueueEntry {
            seq,
            mode,
            granted: false,
            converting_to: None,
        }
    }
}

/// What [`decide`] grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The waiting entry at this index is granted its mode.
    Grant(usize),
    /// The pending conversion of the entry at this index is granted.
    Convert(usize),
}

/// Whether the waiting entry at `index` may be granted now (see the module docs for the rule).
///
/// `queue` must be sorted by `seq`.
pub fn grantable(queue: &[QueueEntry], index: usize) -> bool {
    let me = queue[index];
    debug_assert!(!me.granted);
    queue.iter().enumerate().all(|(j, other)| {
        if j == index {
            return true;
        }
        let constrains = j < index || other.granted;
        (!constrains || me.mode.compatible_with(other.mode))
            && other
                .converting_to
                .is_none_or(|t| me.mode.compatible_with(t))
    })
}

/// Whether the pending conversion of the entry at `index` may be granted now.
pub fn conversion_grantable(queue: &[QueueEntry], index: usize) -> bool {
    let Some(target) = queue[index].converting_to else {
        return false;
    };
    queue
        .iter()
        .enumerate()
        .all(|(j, other)| j == index || !other.granted || target.compatible_with(other.mode))
}

/// Everything that can be granted in `queue` right now: pending conversions first (in queue order, each
/// settled before the next is considered), then waiting entries.
///
/// `queue` must be sorted by `seq`. Applying the decisions with [`apply`] and calling `decide` again
/// yields nothing new.
///
/// ```
/// use dlock_core::grant::{decide, Decision, QueueEntry};
/// use dlock_core::LockMode::*;
/// let queue = [QueueEntry::waiting(1, PR), QueueEntry::waiting(2, PR), QueueEntry::waiting(3, EX)];
/// assert_eq!(decide(&queue), vec![Decision::Grant(0), Decision::Grant(1)]);
/// ```
pub fn decide(queue: &[QueueEntry]) -> Vec<Decision> {
    let mut sim = queue.to_vec();
    let mut decisions = Vec::new();
    // A granted down-conversion can unblock an earlier conversion, hence the loop; each pass settles at
    // least one conversion or stops, so it runs at most `len + 1` times.
    loop {
        let settled = (0..sim.len()).find(|&i| sim[i].granted && conversion_grantable(&sim, i));
        match settled {
            Some(i) => {
                apply_one(&mut sim, Decision::Convert(i));
                decisions.push(Decision::Convert(i));
            }
            None => break,
        }
    }
    let grants: Vec<usize> = (0..sim.len())
        .filter(|&i| !sim[i].granted && grantable(&sim, i))
        .collect();
    decisions.extend(grants.into_iter().map(Decision::Grant));
    decisions
}

/// Applies decisions from [`decide`] to the queue they were made for.
pub fn apply(queue: &mut [QueueEntry], decisions: &[Decision]) {
    for &d in decisions {
        apply_one(queue, d);
    }
}

fn apply_one(queue: &mut [QueueEntry], decision: Decision) {
    match decision {
        Decision::Grant(i) => queue[i].granted = true,
        Decision::Convert(i) => {
            let entry = &mut queue[i];
            entry.mode = entry.converting_to.take().expect("a pending conversion");
        }
    }
}

/// Whether asking the granted entry at `index` to convert to `target` would deadlock: it would wait on
/// the held mode of an entry whose own pending conversion waits (directly or through others) on this
/// entry's held mode.
///
/// ```
/// use dlock_core::grant::{conversion_deadlocks, QueueEntry};
/// use dlock_core::LockMode::*;
/// let mut a = QueueEntry::waiting(1, PR);
/// a.granted = true;
/// let mut b = QueueEntry::waiting(2, PR);
/// b.granted = true;
/// b.converting_to = Some(EX); // b waits for a to leave PR
/// assert!(conversion_deadlocks(&[a, b], 0, EX)); // a waiting for b too would never end
/// assert!(!conversion_deadlocks(&[a, b], 0, NL));
/// ```
pub fn conversion_deadlocks(queue: &[QueueEntry], index: usize, target: LockMode) -> bool {
    let mut sim = queue.to_vec();
    sim[index].converting_to = Some(target);
    // Edges go from a converting entry to each converting entry whose held mode blocks its target.
    let blocks = |from: usize, to: usize| {
        to != from
            && sim[to].granted
            && sim[to].converting_to.is_some()
            && !sim[from]
                .converting_to
                .expect("only converting entries have edges")
                .compatible_with(sim[to].mode)
    };
    let mut seen = vec![false; sim.len()];
    let mut stack = vec![index];
    while let Some(at) = stack.pop() {
        for next in (0..sim.len()).filter(|&next| blocks(at, next)) {
            if next == index {
                return true;
            }
            if !std::mem::replace(&mut seen[next], true) {
                stack.push(next);
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LockMode::{self, *};
    use proptest::prelude::*;

    fn granted(seq: u64, mode: LockMode) -> QueueEntry {
        QueueEntry {
            seq,
            mode,
            granted: true,
            converting_to: None,
        }
    }

    fn settle(queue: &mut [QueueEntry]) -> Vec<u64> {
        let d = decide(queue);
        apply(queue, &d);
        let mut seqs: Vec<u64> = d
            .iter()
            .map(|d| match d {
                Decision::Grant(i) | Decision::Convert(i) => queue[*i].seq,
            })
            .collect();
        seqs.sort_unstable();
        seqs
    }

    fn assert_no_conflict(queue: &[QueueEntry]) {
        for (i, a) in queue.iter().enumerate() {
            for b in &queue[i + 1..] {
                if a.granted && b.granted {
                    assert!(
                        a.mode.compatible_with(b.mode),
                        "{a:?} and {b:?} both granted"
                    );
                }
            }
        }
    }

    #[test]
    fn readers_and_writers_are_granted_in_fifo_steps() {
        let modes = [EX, PR, PR, PR, EX, EX, PR, PR];
        let mut queue: Vec<QueueEntry> = modes
            .iter()
            .enumerate()
            .map(|(i, &m)| QueueEntry::waiting(i as u64, m))
            .collect();
        let mut steps = Vec::new();
        while !queue.is_empty() {
            let step = settle(&mut queue);
            assert!(!step.is_empty(), "no progress with {queue:?}");
            assert_no_conflict(&queue);
            steps.push(step.clone());
            queue.retain(|e| !step.contains(&e.seq));
        }
        assert_eq!(
            steps,
            vec![vec![0], vec![1, 2, 3], vec![4], vec![5], vec![6, 7]]
        );
    }

    #[test]
    fn reader_behind_waiting_writer_waits() {
        let mut q = vec![
            granted(1, PR),
            QueueEntry::waiting(2, PW),
            QueueEntry::waiting(3, PR),
        ];
        assert_eq!(settle(&mut q), Vec::<u64>::new());
    }

    #[test]
    fn concurrent_read_passes_waiting_protected_write() {
        let mut q = vec![
            granted(1, PR),
            QueueEntry::waiting(2, PW),
            QueueEntry::waiting(3, CR),
        ];
        assert_eq!(settle(&mut q), vec![3]);
    }

    #[test]
    fn down_conversion_is_granted_at_once() {
        let mut q = vec![granted(1, EX), QueueEntry::waiting(2, PR)];
        q[0].converting_to = Some(PR);
        assert_eq!(settle(&mut q), vec![1, 2]);
        assert_eq!(q[0].mode, PR);
    }

    #[test]
    fn up_conversion_waits_for_other_holders_and_beats_new_requests() {
        let mut q = vec![granted(1, PR), granted(2, PR)];
        q[0].converting_to = Some(EX);
        assert_eq!(settle(&mut q), Vec::<u64>::new());
        q.push(QueueEntry::waiting(3, CR));
        assert_eq!(
            settle(&mut q),
            Vec::<u64>::new(),
            "a new CR must not pass the pending EX"
        );
        q.remove(1);
        assert_eq!(settle(&mut q), vec![1]);
        assert_eq!(q[0].mode, EX);
        assert!(!q[1].granted);
    }

    #[test]
    fn waiting_entry_respects_a_later_holder_that_converted_up() {
        let mut q = vec![granted(1, PR), QueueEntry::waiting(2, PW), granted(3, CR)];
        q[2].converting_to = Some(EX);
        assert_eq!(settle(&mut q), Vec::<u64>::new());
        q.remove(0);
        assert_eq!(
            settle(&mut q),
            vec![3],
            "the conversion goes before the waiting PW"
        );
        assert_eq!(settle(&mut q), Vec::<u64>::new());
        assert_no_conflict(&q);
    }

    #[test]
    fn two_conversions_granted_together_stay_compatible() {
        let mut q = vec![granted(1, CR), granted(2, CR)];
        q[0].converting_to = Some(PW);
        q[1].converting_to = Some(CW);
        assert_eq!(settle(&mut q), vec![1]);
        assert_no_conflict(&q);
        assert_eq!(q[1].converting_to, Some(CW));
    }

    #[test]
    fn mutual_up_conversions_deadlock_and_others_do_not() {
        let mut q = vec![granted(1, PR), granted(2, PR), granted(3, PR)];
        assert!(!conversion_deadlocks(&q, 0, EX));
        q[0].converting_to = Some(EX);
        assert!(conversion_deadlocks(&q, 1, PW));
        assert!(conversion_deadlocks(&q, 2, EX));
        assert!(!conversion_deadlocks(&q, 1, CR));
        assert!(!conversion_deadlocks(&q, 1, PR));
    }

    #[test]
    fn conversion_waiting_on_a_plain_holder_is_no_deadlock() {
        let mut q = vec![granted(1, CR), granted(2, CW), granted(3, CW)];
        q[0].converting_to = Some(EX);
        // PR waits for entry 3's CW, but entry 3 is not converting: it will release some day.
        assert!(!conversion_deadlocks(&q, 1, PR));
        q[1].converting_to = Some(PR);
        // Now entry 3 asking for PR would wait on entry 2, which waits on entry 3.
        assert!(conversion_deadlocks(&q, 2, PR));
    }

    fn arb_mode() -> impl Strategy<Value = LockMode> {
        prop::sample::select(LockMode::ALL.to_vec())
    }

    #[derive(Clone, Debug)]
    enum Op {
        Enqueue(LockMode),
        Release(usize),
        Convert(usize, LockMode),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => arb_mode().prop_map(Op::Enqueue),
            2 => any::<usize>().prop_map(Op::Release),
            1 => (any::<usize>(), arb_mode()).prop_map(|(i, m)| Op::Convert(i, m)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random histories of enqueues, releases and conversions never grant two incompatible modes,
        /// and a settled queue stays settled.
        #[test]
        fn never_two_incompatible_holders(ops in prop::collection::vec(arb_op(), 1..60)) {
            let mut q: Vec<QueueEntry> = Vec::new();
            let mut next_seq = 0;
            for op in ops {
                match op {
                    Op::Enqueue(m) => { q.push(QueueEntry::waiting(next_seq, m)); next_seq += 1; }
                    Op::Release(i) if !q.is_empty() => { q.remove(i % q.len()); }
                    Op::Convert(i, m) if !q.is_empty() => {
                        let i = i % q.len();
                        if q[i].granted && q[i].converting_to.is_none() && !conversion_deadlocks(&q, i, m) {
                            q[i].converting_to = Some(m);
                        }
                    }
                    _ => {}
                }
                let d = decide(&q);
                apply(&mut q, &d);
                assert_no_conflict(&q);
                prop_assert!(decide(&q).is_empty());
            }
        }

        /// Incompatible entries are granted in arrival order; in particular EX entries are.
        #[test]
        fn incompatible_entries_granted_in_arrival_order(
            modes in prop::collection::vec(arb_mode(), 1..16),
            releases in prop::collection::vec(any::<usize>(), 0..40),
        ) {
            let mut q: Vec<QueueEntry> = modes.iter().enumerate().map(|(i, &m)| QueueEntry::waiting(i as u64, m)).collect();
            let mut grant_order: Vec<(u64, LockMode)> = Vec::new();
            let step = |q: &mut Vec<QueueEntry>, order: &mut Vec<(u64, LockMode)>| {
                let d = decide(q);
                apply(q, &d);
                for d in d { if let Decision::Grant(i) = d { order.push((q[i].seq, q[i].mode)); } }
            };
            step(&mut q, &mut grant_order);
            for r in releases {
                let holders: Vec<usize> = (0..q.len()).filter(|&i| q[i].granted).collect();
                if holders.is_empty() { break; }
                q.remove(holders[r % holders.len()]);
                step(&mut q, &mut grant_order);
            }
            for (a, (sa, ma)) in grant_order.iter().enumerate() {
                for (sb, mb) in &grant_order[a + 1..] {
                    if !ma.compatible_with(*mb) {
                        prop_assert!(sa < sb, "{:?} granted before {:?}", (sa, ma), (sb, mb));
                    }
                }
            }
        }

        /// No starvation: once every entry queued before an entry has left, it is granted.
        #[test]
        fn entry_granted_once_predecessors_leave(
            modes in prop::collection::vec(arb_mode(), 1..16),
            pick in any::<usize>(),
        ) {
            let q: Vec<QueueEntry> = modes.iter().enumerate().map(|(i, &m)| QueueEntry::waiting(i as u64, m)).collect();
            let target = pick % q.len();
            let mut rest: Vec<QueueEntry> = q[target..].to_vec();
            let d = decide(&rest);
            apply(&mut rest, &d);
            prop_assert!(rest[0].granted);
        }

        /// NL never waits and never makes anyone wait.
        #[test]
        fn nl_never_waits_nor_blocks(modes in prop::collection::vec(arb_mode(), 0..12), at in any::<usize>()) {
            let mut q: Vec<QueueEntry> = modes.iter().enumerate().map(|(i, &m)| QueueEntry::waiting(i as u64, m)).collect();
            let d = decide(&q);
            apply(&mut q, &d);
            let without: Vec<bool> = q.iter().map(|e| e.granted).collect();
            let pos = if q.is_empty() { 0 } else { at % (q.len() + 1) };
            let mut with: Vec<QueueEntry> = q.iter().map(|e| QueueEntry::waiting(e.seq * 2 + 2, e.mode)).collect();
            with.insert(pos, QueueEntry::waiting(pos as u64 * 2 + 1, NL));
            with.sort_by_key(|e| e.seq);
            let d = decide(&with);
            apply(&mut with, &d);
            prop_assert!(with.iter().find(|e| e.mode == NL && e.seq % 2 == 1).unwrap().granted);
            let others: Vec<bool> = with.iter().filter(|e| e.seq % 2 == 0).map(|e| e.granted).collect();
            prop_assert_eq!(others, without);
        }
    }
}
