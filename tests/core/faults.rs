//! The fault matrix: every operation that talks to CML (refresh, delete,
//! forced delete, asynchronous delete) against every fault the simulator can
//! inject, each with its documented outcome; and after each, once the fault
//! clears, one refresh makes MongoDB equal to CML again.
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
}

const FAULTS: [Fault; 9] = [
    Fault::Hang,
    Fault::ServerError,
    Fault::Booting,
    Fault::TokenExpired,
    Fault::TruncatedJson,
    Fault::WrongTypes,
    Fault::EmptyList,
    Fault::ListMissingLabs,
    Fault::SlowDetails,
];

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
        };
        t.faults(faults);
    }

    /// Whether CML can still do its work under this fault.
    fn cml_works(self) -> bool {
        matches!(
            self,
            Self::TokenExpired | Self::EmptyList | Self::ListMissingLabs | Self::SlowDetails
        )
    }
}

/// What the matrix saw, for its summary line.
#[derive(Default)]
struct Tally {
    scenarios: usize,
    records_checked: usize,
    table: String,
}

impl Tally {
    fn cell(&mut self, op: &str, fault: Fault, outcome: &str) {
        self.scenarios += 1;
        let _ = writeln!(self.table, "{op:<13} {fault:<16?} -> {outcome}");
    }
}

/// Clears the faults; one refresh brings MongoDB back to CML's truth.
async fn converge(t: &TestApp, tally: &mut Tally, context: &str) {
    t.faults(json!({}));
    let r = t.refresh().await;
    assert_eq!(r.status, RunStatus::Succeeded, "{context}: {r:?}");
    tally.records_checked += t.assert_matches_truth(context).await;
}

fn settings() -> [(&'static str, &'static str); 2] {
    [
        ("LABSYNC__CML__REQUEST_TIMEOUT_MS", "300"),
        ("LABSYNC__CML__CONNECT_TIMEOUT_MS", "300"),
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
        Fault::TokenExpired | Fault::SlowDetails => {
            assert_eq!(
                (r.status, r.created, r.updated, r.pruned, r.failed),
                (RunStatus::Succeeded, 1, 1, 1, 0),
                "{context}"
            );
            tally.records_checked += t.assert_matches_truth(&context).await;
        }
        Fault::EmptyList => {
            assert_eq!(r.status, RunStatus::Succeeded, "{context}");
            assert_eq!((r.pruned, r.held), (0, records.len() as u64), "{context}");
            assert_eq!(t.records().await, records, "an empty list changes nothing");
        }
        Fault::ListMissingLabs => {
            // CML's list is what CML says it has: labs left out of it are
            // pruned, and the next list that has them brings them back.
            assert_eq!(r.status, RunStatus::Succeeded, "{context}");
            assert_eq!((r.created, r.pruned), (1, 3), "{context}");
            let now = t.records().await;
            assert!(hidden.iter().all(|h| now.iter().all(|r| r.lab_id != *h)));
        }
        Fault::Hang
        | Fault::ServerError
        | Fault::Booting
        | Fault::TruncatedJson
        | Fault::WrongTypes => {
            assert_eq!(r.status, RunStatus::Failed, "{context}");
            assert!(
                r.error.as_deref().is_some_and(|e| !e.is_empty()),
                "{context}"
            );
            assert_eq!(t.records().await, records, "a failed run changes nothing");
        }
    }
    tally.cell("refresh", fault, &format!("{:?}", r.status).to_lowercase());
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

async fn delete_cell(t: &TestApp, fault: Fault, force: bool, tally: &mut Tally) {
    let victim = t.add_lab(if force { "STARTED" } else { "DEFINED_ON_CORE" });
    t.refresh().await;
    assert!(t.record(&victim).await.is_some());
    fault.inject(t, &[victim]);
    let out = t.delete(&victim, force).await.expect("delete runs");
    let context = format!("delete (force={force}) under {fault:?}: {out:?}");
    assert_delete_invariant(t, &victim, out.lab_gone, &context).await;
    if fault.cml_works() {
        assert_eq!(out.kind, DeleteOutcomeKind::Deleted, "{context}");
    } else {
        assert!(
            matches!(
                out.kind,
                DeleteOutcomeKind::CmlUnreachable { .. }
                    | DeleteOutcomeKind::CmlRefused { .. }
                    | DeleteOutcomeKind::NotConverged { .. }
            ),
            "{context}"
        );
        assert!(out.kind.is_retryable(), "a transient fault: {context}");
        let audit = t.audit(&victim).await;
        assert_eq!(audit[0].outcome, out.kind.word(), "{context}");
    }
    let op = if force { "force delete" } else { "delete" };
    tally.cell(op, fault, out.kind.word());
    converge(t, tally, &format!("after {context}")).await;
    if !out.lab_gone {
        // Once CML answers again the same delete succeeds.
        let again = t.delete(&victim, force).await.unwrap();
        assert_eq!(again.kind, DeleteOutcomeKind::Deleted, "{context}");
        assert_delete_invariant(t, &victim, true, &context).await;
    }
}

async fn async_delete_cell(t: &TestApp, api: &TestApi, fault: Fault, tally: &mut Tally) {
    let victim = t.add_lab("DEFINED_ON_CORE");
    t.refresh().await;
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
    if !fault.cml_works() {
        eventually("the async delete to be retried", || async {
            api.get(&href, VIEWER_TOKEN).await.1["attempts"]
                .as_u64()
                .unwrap_or(0)
                >= 2
        })
        .await;
        let (_, pending) = api.get(&href, VIEWER_TOKEN).await;
        assert!(
            matches!(status(&pending).as_str(), "pending" | "running"),
            "{fault:?}: {pending}"
        );
        assert_delete_invariant(t, &victim, false, &format!("async under {fault:?}")).await;
        t.faults(json!({}));
    }
    eventually("the async delete to finish", || async {
        status(&api.get(&href, VIEWER_TOKEN).await.1) == "done"
    })
    .await;
    let (_, done) = api.get(&href, VIEWER_TOKEN).await;
    assert_eq!(done["outcome"]["kind"], "deleted", "{fault:?}: {done}");
    assert_delete_invariant(t, &victim, true, &format!("async under {fault:?}")).await;
    tally.cell(
        "async delete",
        fault,
        &format!("done after {} attempts", done["attempts"]),
    );
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
        "fault matrix: {} scenarios (4 operations x {} faults), {} records checked against CML: 0 lost, 0 resurrected",
        tally.scenarios,
        FAULTS.len(),
        tally.records_checked
    );
    crate::helpers::report("fault-matrix", &format!("{}{summary}\n", tally.table));
}
