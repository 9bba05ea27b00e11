//! The reconcile plan: what a refresh must do to make the stored inventory
//! of one worker match what its CML server said, as a pure function.
//!
//! Rules (docs/DESIGN.md, invariants 1 and 4):
//! - an unchanged lab (same content hash) produces no work;
//! - a lab whose detail fetch found it gone (404 between list and detail) is
//!   gone: pruned if recorded, never created;
//! - a lab deleted through labsync (tombstoned) is never brought back;
//! - a lab whose detail fetch failed otherwise keeps its record untouched;
//! - prunes are held, not applied, when the list is incomplete, when CML
//!   answered an empty list while records exist, or when they would remove
//!   more than `max_prune_share` of the worker's records while more than
//!   `prune_floor` exist. `force` releases the last one only: an empty
//!   answer is far more often a broken CML than an empty one, and a lab
//!   that really is gone can still be deleted through labsync one by one.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::{ContentHash, LabId, LabSnapshot};

/// What the store holds for one lab id of the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Live(ContentHash),
    /// Deleted through labsync; kept as a tombstone until it expires.
    Tombstoned,
}

/// The outcome of fetching one listed lab's details.
#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    Found(Box<LabSnapshot>),
    /// CML answered 404: deleted between the list and the detail request.
    Gone,
    /// Any other failure; the message is for the run report.
    Failed(String),
}

/// What CML said: the listed labs, in list order, with their details.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetched {
    /// False when the list is known to be partial; then nothing is pruned.
    pub list_complete: bool,
    pub labs: Vec<(LabId, Detail)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrunePolicy {
    pub max_prune_share: f64,
    pub prune_floor: usize,
    pub force: bool,
}

/// Why prunes were held.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum HoldReason {
    IncompleteList,
    EmptyList {
        records: usize,
    },
    TooManyPrunes {
        would_prune: usize,
        records: usize,
        max_share: f64,
    },
}

impl std::fmt::Display for HoldReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::IncompleteList => f.write_str(
                "CML's lab list had entries that are not lab ids, so it may be incomplete; nothing is pruned",
            ),
            Self::EmptyList { records } => write!(
                f,
                "CML listed no labs while {records} are recorded; an empty list is never pruned from, \
                 even forced (delete the labs through labsync if they really are gone)"
            ),
            Self::TooManyPrunes {
                would_prune,
                records,
                max_share,
            } => write!(
                f,
                "would prune {would_prune} of {records} records, more than {:.0}%; force to prune",
                max_share * 100.0
            ),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReconcilePlan {
    pub create: Vec<(LabId, LabSnapshot)>,
    pub update: Vec<(LabId, LabSnapshot)>,
    pub unchanged: Vec<LabId>,
    pub prune: Vec<LabId>,
    pub held: Vec<LabId>,
    pub hold_reason: Option<HoldReason>,
    pub failed: Vec<(LabId, String)>,
    /// Listed by CML but deleted through labsync: not brought back.
    pub suppressed: Vec<LabId>,
}

impl ReconcilePlan {
    /// True when applying the plan writes nothing.
    pub fn is_noop(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.prune.is_empty()
    }
}

/// Plans the reconciliation of one worker.
pub fn plan(
    existing: &HashMap<LabId, Existing>,
    fetched: Fetched,
    policy: PrunePolicy,
) -> ReconcilePlan {
    let mut out = ReconcilePlan::default();
    let mut seen: HashSet<LabId> = HashSet::with_capacity(fetched.labs.len());
    let mut candidates: Vec<LabId> = Vec::new();
    let listed = fetched.labs.len();
    for (id, detail) in fetched.labs {
        if !seen.insert(id) {
            continue; // a duplicate in CML's list counts once
        }
        let current = existing.get(&id).copied();
        if current == Some(Existing::Tombstoned) {
            out.suppressed.push(id);
            continue;
        }
        match detail {
            Detail::Found(snapshot) => match current {
                Some(Existing::Live(hash)) if hash == snapshot.content_hash() => {
                    out.unchanged.push(id);
                }
                Some(_) => out.update.push((id, *snapshot)),
                None => out.create.push((id, *snapshot)),
            },
            Detail::Gone => {
                if current.is_some() {
                    candidates.push(id);
                }
            }
            Detail::Failed(e) => out.failed.push((id, e)),
        }
    }
    let live = existing
        .values()
        .filter(|e| matches!(e, Existing::Live(_)))
        .count();
    let mut orphans: Vec<LabId> = existing
        .iter()
        .filter(|(id, e)| matches!(e, Existing::Live(_)) && !seen.contains(id))
        .map(|(id, _)| *id)
        .collect();
    orphans.sort();
    candidates.extend(orphans);

    let hold = if candidates.is_empty() {
        None
    } else if !fetched.list_complete {
        Some(HoldReason::IncompleteList)
    } else if listed == 0 {
        Some(HoldReason::EmptyList { records: live })
    } else if policy.force {
        None
    } else if live > policy.prune_floor
        && candidates.len() as f64 > policy.max_prune_share * live as f64
    {
        Some(HoldReason::TooManyPrunes {
            would_prune: candidates.len(),
            records: live,
            max_share: policy.max_prune_share,
        })
    } else {
        None
    };
    if hold.is_some() {
        out.held = candidates;
    } else {
        out.prune = candidates;
    }
    out.hold_reason = hold;
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The shipped prune guard (config/default.toml's values).
    fn policy() -> PrunePolicy {
        PrunePolicy {
            max_prune_share: 0.5,
            prune_floor: 10,
            force: false,
        }
    }
    use crate::snapshot::tests::snapshot;

    fn lab(n: u128) -> LabId {
        let hex = format!("{n:032x}");
        let s = format!(
            "{}-{}-4{}-8{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[13..16],
            &hex[17..20],
            &hex[20..32]
        );
        LabId::parse(&s).unwrap()
    }

    fn found(title: &str) -> Detail {
        Detail::Found(Box::new(snapshot(title)))
    }

    fn live(title: &str) -> Existing {
        Existing::Live(snapshot(title).content_hash())
    }

    fn complete(labs: Vec<(LabId, Detail)>) -> Fetched {
        Fetched {
            list_complete: true,
            labs,
        }
    }

    #[test]
    fn sorts_labs_into_create_update_unchanged_and_prune() {
        let existing = HashMap::from([
            (lab(1), live("same")),
            (lab(2), live("old")),
            (lab(3), live("gone")),
        ]);
        let p = plan(
            &existing,
            complete(vec![
                (lab(1), found("same")),
                (lab(2), found("new")),
                (lab(4), found("fresh")),
            ]),
            policy(),
        );
        assert_eq!(p.unchanged, vec![lab(1)]);
        assert_eq!(
            p.update.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![lab(2)]
        );
        assert_eq!(
            p.create.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![lab(4)]
        );
        assert_eq!(p.prune, vec![lab(3)]);
        assert!(p.held.is_empty() && p.hold_reason.is_none());
    }

    #[test]
    fn a_plan_with_any_write_is_not_a_noop() {
        let id = lab(1);
        let one = |f: fn(&mut ReconcilePlan, LabId)| {
            let mut p = ReconcilePlan::default();
            f(&mut p, id);
            p.is_noop()
        };
        assert!(ReconcilePlan::default().is_noop());
        assert!(!one(|p, id| p.create.push((id, snapshot("a")))));
        assert!(!one(|p, id| p.update.push((id, snapshot("a")))));
        assert!(!one(|p, id| p.prune.push(id)));
        // Held, failed, suppressed and unchanged labs write nothing.
        assert!(one(|p, id| {
            p.held.push(id);
            p.unchanged.push(id);
            p.suppressed.push(id);
            p.failed.push((id, "x".into()));
        }));
    }

    #[test]
    fn hold_reasons_say_what_held_the_prune_and_what_to_do() {
        let text = |r: HoldReason| r.to_string();
        assert!(text(HoldReason::IncompleteList).contains("not lab ids"));
        let empty = text(HoldReason::EmptyList { records: 7 });
        assert!(
            empty.contains("7 are recorded") && empty.contains("even forced"),
            "{empty}"
        );
        let many = text(HoldReason::TooManyPrunes {
            would_prune: 11,
            records: 20,
            max_share: 0.5,
        });
        assert!(
            many.contains("11 of 20") && many.contains("50%") && many.contains("force"),
            "{many}"
        );
    }

    #[test]
    fn nothing_changed_means_nothing_to_do() {
        let existing = HashMap::from([(lab(1), live("a")), (lab(2), live("b"))]);
        let p = plan(
            &existing,
            complete(vec![(lab(1), found("a")), (lab(2), found("b"))]),
            policy(),
        );
        assert!(p.is_noop());
        assert_eq!(p.unchanged.len(), 2);
    }

    #[test]
    fn a_lab_gone_between_list_and_detail_is_pruned_not_created() {
        let existing = HashMap::from([
            (lab(1), live("a")),
            (lab(2), live("b")),
            (lab(3), live("c")),
        ]);
        let p = plan(
            &existing,
            complete(vec![
                (lab(1), Detail::Gone),
                (lab(2), found("b")),
                (lab(3), found("c")),
                (lab(9), Detail::Gone),
            ]),
            policy(),
        );
        assert_eq!(p.prune, vec![lab(1)]);
        assert!(p.create.is_empty());
    }

    #[test]
    fn a_failed_detail_leaves_the_record_alone() {
        let existing = HashMap::from([(lab(1), live("a"))]);
        let p = plan(
            &existing,
            complete(vec![(lab(1), Detail::Failed("500".into()))]),
            policy(),
        );
        assert_eq!(p.failed.len(), 1);
        assert!(p.is_noop());
    }

    #[test]
    fn tombstoned_labs_are_never_brought_back() {
        let existing = HashMap::from([(lab(1), Existing::Tombstoned)]);
        let p = plan(
            &existing,
            complete(vec![(lab(1), found("a"))]),
            PrunePolicy {
                force: true,
                ..policy()
            },
        );
        assert_eq!(p.suppressed, vec![lab(1)]);
        assert!(p.is_noop());
    }

    #[test]
    fn an_empty_list_never_prunes_not_even_forced() {
        let existing = HashMap::from([(lab(1), live("a")), (lab(2), live("b"))]);
        for force in [false, true] {
            let p = plan(
                &existing,
                complete(vec![]),
                PrunePolicy { force, ..policy() },
            );
            assert!(p.prune.is_empty(), "force {force}");
            assert_eq!(p.held.len(), 2);
            assert_eq!(p.hold_reason, Some(HoldReason::EmptyList { records: 2 }));
        }
    }

    #[test]
    fn an_incomplete_list_never_prunes_even_forced() {
        let existing = HashMap::from([(lab(1), live("a")), (lab(2), live("b"))]);
        let p = plan(
            &existing,
            Fetched {
                list_complete: false,
                labs: vec![(lab(1), found("a"))],
            },
            PrunePolicy {
                force: true,
                ..policy()
            },
        );
        assert!(p.prune.is_empty());
        assert_eq!(p.hold_reason, Some(HoldReason::IncompleteList));
    }

    #[test]
    fn a_mass_prune_is_held_above_the_floor_and_applied_when_forced() {
        let existing: HashMap<LabId, Existing> = (0..20).map(|i| (lab(i), live("x"))).collect();
        let keep: Vec<(LabId, Detail)> = (0..9).map(|i| (lab(i), found("x"))).collect();
        let p = plan(&existing, complete(keep.clone()), policy());
        assert_eq!((p.prune.len(), p.held.len()), (0, 11));
        assert!(matches!(
            p.hold_reason,
            Some(HoldReason::TooManyPrunes {
                would_prune: 11,
                records: 20,
                ..
            })
        ));
        let p = plan(
            &existing,
            complete(keep),
            PrunePolicy {
                force: true,
                ..policy()
            },
        );
        assert_eq!(p.prune.len(), 11);
        // Exactly half is allowed.
        let half: Vec<(LabId, Detail)> = (0..10).map(|i| (lab(i), found("x"))).collect();
        assert_eq!(plan(&existing, complete(half), policy()).prune.len(), 10);
        // At or below the floor, a worker may lose most of its labs.
        let small: HashMap<LabId, Existing> = (0..10).map(|i| (lab(i), live("x"))).collect();
        let p = plan(&small, complete(vec![(lab(0), found("x"))]), policy());
        assert_eq!(p.prune.len(), 9);
    }

    fn arb_existing() -> impl Strategy<Value = Existing> {
        prop_oneof![
            4 => (0u8..3).prop_map(|t| live(&t.to_string())),
            1 => Just(Existing::Tombstoned),
        ]
    }

    fn arb_detail() -> impl Strategy<Value = Detail> {
        prop_oneof![
            6 => (0u8..3).prop_map(|t| found(&t.to_string())),
            1 => Just(Detail::Gone),
            1 => Just(Detail::Failed("boom".into())),
        ]
    }

    proptest! {
        #[test]
        fn plans_partition_the_labs_and_respect_the_prune_guards(
            existing in prop::collection::hash_map((0u128..40).prop_map(lab), arb_existing(), 0..30),
            listed in prop::collection::vec(((0u128..40).prop_map(lab), arb_detail()), 0..30),
            complete_list in prop::bool::weighted(0.8),
            share in 0.1f64..=1.0,
            floor in 0usize..15,
            force in any::<bool>(),
        ) {
            let policy = PrunePolicy { max_prune_share: share, prune_floor: floor, force };
            let fetched = Fetched { list_complete: complete_list, labs: listed.clone() };
            let p = plan(&existing, fetched, policy);
            let live: HashSet<LabId> = existing.iter().filter(|(_, e)| matches!(e, Existing::Live(_))).map(|(id, _)| *id).collect();

            // Every listed lab lands in at most one bucket; none twice.
            let mut buckets: Vec<LabId> = Vec::new();
            buckets.extend(p.create.iter().map(|x| x.0));
            buckets.extend(p.update.iter().map(|x| x.0));
            buckets.extend(p.unchanged.iter().copied());
            buckets.extend(p.failed.iter().map(|x| x.0));
            buckets.extend(p.suppressed.iter().copied());
            buckets.extend(p.prune.iter().copied());
            buckets.extend(p.held.iter().copied());
            let unique: HashSet<LabId> = buckets.iter().copied().collect();
            prop_assert_eq!(unique.len(), buckets.len());

            // Creates are new labs; updates and unchanged are live records;
            // tombstones are never written.
            for (id, s) in &p.create { prop_assert!(!existing.contains_key(id)); prop_assert!(listed.iter().any(|(l, d)| l == id && *d == Detail::Found(Box::new(s.clone())))); }
            for (id, s) in &p.update { prop_assert!(live.contains(id)); prop_assert_ne!(existing[id], Existing::Live(s.content_hash())); }
            for id in &p.unchanged { prop_assert!(live.contains(id)); }
            for id in &p.suppressed { prop_assert_eq!(existing[id], Existing::Tombstoned); }

            // Prune candidates are exactly the live records not found in the list.
            let found_ids: HashSet<LabId> = {
                let mut first: HashMap<LabId, &Detail> = HashMap::new();
                for (id, d) in &listed { first.entry(*id).or_insert(d); }
                first.into_iter().filter(|(_, d)| !matches!(d, Detail::Gone)).map(|(id, _)| id).collect()
            };
            let expected: HashSet<LabId> = live.difference(&found_ids).copied().collect();
            let got: HashSet<LabId> = p.prune.iter().chain(&p.held).copied().collect();
            prop_assert_eq!(&got, &expected);

            // The guards.
            prop_assert!(p.prune.is_empty() || p.held.is_empty());
            if !complete_list { prop_assert!(p.prune.is_empty()); }
            if listed.is_empty() { prop_assert!(p.prune.is_empty()); }
            if !force {
                prop_assert!(live.len() <= floor || p.prune.len() as f64 <= share * live.len() as f64);
            }
            prop_assert_eq!(p.hold_reason.is_some(), !p.held.is_empty());
        }
    }
}
