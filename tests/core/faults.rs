//! The fault matrix: every operation that talks to CML (refresh, delete,
//! forced delete, asynchronous delete) against every fault the simulator can
//! inject, each with exactly one documented outcome ([`expected`]); and
//! after each, once the fault clears, one refresh makes MongoDB equal to
//! CML again.
//!
//! The faults include those that strike after CML acted (the operation is
//! carried out, then its answer is lost: a 500, no answer, a dropped
//! connection), a reverse proxy's 404, and an account that lost its admin
//! rights while its token lives on.
//!
//! The invariant checked after every operation, whatever the fault: a lab
//! labsync says is gone is gone from CML and from MongoDB, and a lab it did
//! not delete is still in both. Nothing is lost, nothing comes back.

use std::fmt::Write as _;

use labsync_application::domain::LabId;
use labsync_application::{DeleteOutcomeKind, RunReport, RunStatus};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{OPERATOR_TOKEN, TestApi, TestApp, VIEWER_TOKEN, eventually};

/// One fault as the simulator injects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Hang,
    ServerError,
    Booting,
    TokenExpired,
    TruncatedJson,
    WrongTypes,
    EmptyList,
    ListMissingLabs,
    SlowDetails,
    Proxy404,
    AdminLost,
    LostAnswer500,
    LostAnswerHang,
    LostAnswerReset,
    HugeNotes,
}

const FAULTS: [Fault; 15] = [
    Fault::Hang,
    Fault::ServerError,
    Fault::Booting,
    Fault::TokenExpired,
    Fault::TruncatedJson,
    Fault::WrongTypes,
    Fault::EmptyList,
    Fault::ListMissingLabs,
    Fault::SlowDetails,
    Fault::Proxy404,
    Fault::AdminLost,
    Fault::LostAnswer500,
    Fault::LostAnswerHang,
    Fault::LostAnswerReset,
    Fault::HugeNotes,
];

/// The one outcome each cell must have: a run's status, a delete's word,
/// an async delete's end and attempts.
fn expected(op: &str, fault: Fault) -> &'static str {
    use Fault::*;
    match (op, fault) {
        // A refresh changes nothing in CML: an answer lost after the fact
        // is only ever a DELETE's or a stop's.
        (
            "refresh",
            TokenExpired | EmptyList | ListMissingLabs | SlowDetails | LostAnswer500
            | LostAnswerHang | LostAnswerReset | HugeNotes,
        ) => "succeeded",
        ("refresh", _) => "failed",
        (_, TokenExpired | EmptyList | ListMissingLabs | SlowDetails | HugeNotes)
            if op != "async delete" =>
        {
            "deleted"
        }
        ("async delete", TokenExpired | EmptyList | ListMissingLabs | SlowDetails | HugeNotes) => {
            "done after 1 attempts: deleted"
        }
        // CML carried out the DELETE and the answer was lost: one look
        // at the lab finds it gone.
        ("delete", LostAnswer500 | LostAnswerHang | LostAnswerReset) => "already_absent",
        ("async delete", LostAnswer500 | LostAnswerHang | LostAnswerReset) => {
            "done after 1 attempts: already_absent"
        }
        // A forced delete loses the answer to its stop: the lab is
        // stopped, not deleted, and the retry finishes the job.
        ("force delete", LostAnswer500) => "cml_refused",
        // The connection drops before any of the answer arrives.
        ("force delete", LostAnswerHang | LostAnswerReset) => "cml_unreachable",
        (_, AdminLost) if op == "async delete" => "failed after 1 attempts: account_not_admin",
        (_, AdminLost) => "account_not_admin",
        ("async delete", _) => "done after 3 attempts: deleted",
        (_, Hang | Booting | Proxy404) => "cml_unreachable",
        (_, ServerError | TruncatedJson | WrongTypes) => "cml_refused",
        (other, f) => unreachable!("no operation {other:?} under {f:?}"),
    }
}

impl Fault {
    /// Injects the fault; `hidden` are the labs a list leaves out.
    fn inject(self, t: &TestApp, hidden: &[LabId]) {
        let faults = match self {
            Self::Hang => json!({"hang": ["all"]}),
            Self::ServerError => json!({"error_rate": {"all": 1.0}}),
            Self::Booting => json!({"booting": true}),
            Self::TokenExpired => {
                t.sim().expire_tokens();
                json!({})
            }
            Self::TruncatedJson => json!({"truncate_json": ["all"]}),
            Self::WrongTypes => json!({"wrong_types": ["all"]}),
            Self::EmptyList => json!({"empty_list": true}),
            Self::ListMissingLabs => json!({"hide_from_list": hidden}),
            // Slow, but within the client's timeout (300 ms here).
            Self::SlowDetails => json!({"latency_ms": {"lab_details": 120}, "jitter_ms": 60}),
            Self::Proxy404 => json!({"proxy_404": ["all"]}),
            Self::AdminLost => {
                t.sim().set_admin("admin", false).unwrap();
                json!({})
            }
            Self::LostAnswer500 => lost_answer("error_500"),
            Self::LostAnswerHang => lost_answer("hang"),
            Self::LostAnswerReset => lost_answer("reset"),
            // Every lab's notes at 64 KB (the client's 300 ms timeout
            // here bounds what one answer may take to build and read).
            Self::HugeNotes => json!({"huge_notes_bytes": 65_536}),
        };
        t.faults(faults);
    }

    /// Whether the fault lasts until it is cleared (an async delete is
    /// retried through it).
    fn lasting(self) -> bool {
        matches!(
            self,
            Self::Hang
                | Self::ServerError
                | Self::Booting
                | Self::TruncatedJson
                | Self::WrongTypes
                | Self::Proxy404
        )
    }

    fn clear(self, t: &TestApp) {
        t.faults(json!({}));
        if self == Self::AdminLost {
            t.sim().set_admin("admin", true).unwrap();
        }
    }
}

/// Every request that changes a lab in CML is carried out, then its answer
/// is lost.
fn lost_answer(how: &str) -> Value {
    json!({"after_the_fact": {"delete_lab": how, "lab_action": how}})
}

/// What the matrix saw, for its summary line.
#[derive(Default)]
struct Tally {
    scenarios: usize,
    diff: crate::helpers::Diff,
    table: String,
}

impl Tally {
    /// Asserts the cell's one outcome and records it.
    fn cell(&mut self, op: &str, fault: Fault, outcome: &str, context: &str) {
        assert_eq!(
            outcome,
            expected(op, fault),
            "{op} under {fault:?}: {context}"
        );
        self.scenarios += 1;
        let _ = writeln!(self.table, "{op:<13} {fault:<16?} -> {outcome}");
    }
}

/// Clears the faults; one refresh brings MongoDB back to CML's truth.
async fn converge(t: &TestApp, tally: &mut Tally, context: &str) {
    t.faults(json!({}));
    t.sim().set_admin("admin", true).unwrap();
    // A stop carried out before its answer was lost is still under way.
    eventually("CML's labs to settle", || async {
        t.sim().labs().iter().all(cml_sim::Lab::converged)
    })
    .await;
    let r = t.refresh().await;
    assert_eq!(r.status, RunStatus::Succeeded, "{context}: {r:?}");
    tally.diff += t.assert_matches_truth(context).await;
}

fn settings() -> [(&'static str, &'static str); 3] {
    [
        ("LABSYNC__CML__REQUEST_TIMEOUT_MS", "300"),
        ("LABSYNC__CML__CONNECT_TIMEOUT_MS", "300"),
        // Long enough between attempts for the test to clear a fault after
        // exactly two.
        ("LABSYNC__DELETE__ASYNC_RETRY_BASE_MS", "400"),
    ]
}

async fn refresh_cell(t: &TestApp, fault: Fault, tally: &mut Tally) {
    // Something for the refresh to do: a new lab, a removed one, a changed one.
    let records = t.records().await;
    let added = t.add_lab("DEFINED_ON_CORE");
    let removed = records[0].lab_id;
    assert!(t.sim().remove_lab(removed.as_str()));
    let changed = records[1].lab_id;
    t.sim()
        .update_lab(
            changed.as_str(),
            cml_sim::LabSpec {
                lab_title: Some(format!("renamed under {fault:?}")),
                ..Default::default()
            },
        )
        .unwrap();
    let hidden = [records[2].lab_id, records[3].lab_id];
    fault.inject(t, &hidden);
    let r: RunReport = t.refresh().await;
    let context = format!("refresh under {fault:?}: {r:?}");
    match fault {
        Fault::TokenExpired
        | Fault::SlowDetails
        | Fault::LostAnswer500
        | Fault::LostAnswerHang
        | Fault::LostAnswerReset => {
            assert_eq!(
                (r.created, r.updated, r.pruned, r.failed),
                (1, 1, 1, 0),
                "{context}"
            );
            tally.diff += t.assert_matches_truth(&context).await;
        }
        Fault::HugeNotes => {
            // Every lab changes (its notes): all written, in commands
            // below MongoDB's limit, and the prune still applies.
            assert_eq!(
                (r.created, r.updated, r.pruned, r.failed),
                (1, records.len() as u64 - 1, 1, 0),
                "{context}"
            );
        }
        Fault::EmptyList => {
            assert_eq!((r.pruned, r.held), (0, records.len() as u64), "{context}");
            assert_eq!(t.records().await, records, "an empty list changes nothing");
        }
        Fault::ListMissingLabs => {
            // CML's list is what CML says it has: labs left out of it are
            // pruned, and the next list that has them brings them back.
            assert_eq!((r.created, r.pruned), (1, 3), "{context}");
            let now = t.records().await;
            assert!(hidden.iter().all(|h| now.iter().all(|r| r.lab_id != *h)));
        }
        _ => {
            assert!(
                r.error.as_deref().is_some_and(|e| !e.is_empty()),
                "{context}"
            );
            if fault == Fault::AdminLost {
                assert!(
                    r.error.as_deref().unwrap().contains("not an administrator"),
                    "{context}"
                );
            }
            assert_eq!(t.records().await, records, "a failed run changes nothing");
        }
    }
    tally.cell(
        "refresh",
        fault,
        &format!("{:?}", r.status).to_lowercase(),
        &context,
    );
    converge(t, tally, &format!("after refresh under {fault:?}")).await;
    // The lab the list left out is back, and the one CML lost stays gone.
    let after = t.records().await;
    assert!(after.iter().any(|r| r.lab_id == added));
    assert!(after.iter().all(|r| r.lab_id != removed));
    assert!(hidden.iter().all(|h| after.iter().any(|r| r.lab_id == *h)));
}

/// Checks that a delete's answer matches both stores.
async fn assert_delete_invariant(t: &TestApp, lab: &LabId, gone: bool, context: &str) {
    let in_cml = t.sim().lab(lab.as_str()).is_some();
    let recorded = t.record(lab).await.is_some();
    assert_eq!(
        (in_cml, recorded),
        (!gone, !gone),
        "{context}: lab_gone={gone} but CML has it: {in_cml}, MongoDB has it: {recorded}"
    );
}

/// A lab to delete: wiped or running, and, when the account is about to
/// lose its admin rights, one only an admin can see (the student's own).
async fn victim(t: &TestApp, fault: Fault, force: bool) -> LabId {
    let lab = t
        .sim()
        .add_lab(cml_sim::LabSpec {
            state: Some(if force { "STARTED" } else { "DEFINED_ON_CORE" }.into()),
            owner_username: (fault == Fault::AdminLost).then(|| "student".to_owned()),
            ..cml_sim::LabSpec::default()
        })
        .unwrap();
    let id = LabId::parse(&lab.id).unwrap();
    t.refresh().await;
    assert!(t.record(&id).await.is_some());
    id
}

async fn delete_cell(t: &TestApp, fault: Fault, force: bool, tally: &mut Tally) {
    let victim = victim(t, fault, force).await;
    fault.inject(t, &[victim]);
    let out = t.delete(&victim, force).await.expect("delete runs");
    let context = format!("delete (force={force}) under {fault:?}: {out:?}");
    assert_delete_invariant(t, &victim, out.lab_gone, &context).await;
    if !out.lab_gone {
        let audit = t.audit(&victim).await;
        assert_eq!(audit[0].outcome, out.kind.word(), "{context}");
        assert_eq!(
            out.kind.is_retryable(),
            fault != Fault::AdminLost,
            "{context}"
        );
    }
    let op = if force { "force delete" } else { "delete" };
    tally.cell(op, fault, out.kind.word(), &context);
    fault.clear(t);
    converge(t, tally, &format!("after {context}")).await;
    if !out.lab_gone {
        // Once CML answers again the same delete succeeds.
        let again = t.delete(&victim, force).await.unwrap();
        assert_eq!(again.kind, DeleteOutcomeKind::Deleted, "{context}");
        assert_delete_invariant(t, &victim, true, &context).await;
    }
}

async fn async_delete_cell(t: &TestApp, api: &TestApi, fault: Fault, tally: &mut Tally) {
    let victim = victim(t, fault, false).await;
    fault.inject(t, &[victim]);
    let (s, accepted) = api
        .send(api.req(
            Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{victim}?mode=async"),
            Some(OPERATOR_TOKEN),
        ))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{accepted}");
    let href = accepted["href"].as_str().unwrap().to_owned();
    let status = |v: &Value| v["status"].as_str().unwrap_or_default().to_owned();
    if fault.lasting() {
        // Exactly two attempts under the fault, then it clears.
        eventually("two attempts of the async delete", || async {
            api.get(&href, VIEWER_TOKEN).await.1["attempts"]
                .as_u64()
                .unwrap_or(0)
                >= 2
        })
        .await;
        let (_, pending) = api.get(&href, VIEWER_TOKEN).await;
        assert_eq!(status(&pending), "pending", "{fault:?}: {pending}");
        assert_delete_invariant(t, &victim, false, &format!("async under {fault:?}")).await;
        fault.clear(t);
    }
    eventually("the async delete to end", || async {
        matches!(
            status(&api.get(&href, VIEWER_TOKEN).await.1).as_str(),
            "done" | "failed"
        )
    })
    .await;
    let (_, end) = api.get(&href, VIEWER_TOKEN).await;
    let gone = status(&end) == "done";
    assert_delete_invariant(t, &victim, gone, &format!("async under {fault:?}: {end}")).await;
    tally.cell(
        "async delete",
        fault,
        &format!(
            "{} after {} attempts: {}",
            status(&end),
            end["attempts"],
            end["outcome"]["kind"].as_str().unwrap_or("-")
        ),
        &end.to_string(),
    );
    fault.clear(t);
    converge(t, tally, &format!("after async delete under {fault:?}")).await;
}

#[tokio::test]
async fn every_operation_under_every_fault_keeps_mongodb_true_to_cml() {
    let mut tally = Tally::default();
    for op in ["refresh", "delete", "force delete", "async delete"] {
        let t = TestApp::spawn_with(1, &settings()).await;
        t.refresh().await;
        let api = TestApi::start(&t).await;
        for fault in FAULTS {
            match op {
                "refresh" => refresh_cell(&t, fault, &mut tally).await,
                "delete" => delete_cell(&t, fault, false, &mut tally).await,
                "force delete" => delete_cell(&t, fault, true, &mut tally).await,
                _ => async_delete_cell(&t, &api, fault, &mut tally).await,
            }
        }
        api.stop().await;
    }
    assert_eq!(tally.scenarios, 4 * FAULTS.len());
    let summary = format!(
        "fault matrix: {} scenarios (4 operations x {} faults), each with its one documented outcome; {}",
        tally.scenarios,
        FAULTS.len(),
        tally.diff
    );
    crate::helpers::report("fault-matrix", &format!("{}{summary}\n", tally.table));
}
