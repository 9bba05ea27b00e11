//! The fleet page (every worker, its runs and its labs by state; an
//! admin's refresh and worker actions) and the runs page.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use labsync_application::{RunReport, RunStatus, SyncState, WorkerOverview};
use labsync_infrastructure::configuration::Role;
use labsync_infrastructure::scheduler::next_refresh;
use maud::{Markup, html};

use super::{Person, html_response, page, when, worker_picker};
use crate::http::ApiState;
use crate::http::dto::RunsParams;
use crate::http::routes::runs_query;

fn sync_badge(state: SyncState) -> Markup {
    let (class, word) = match state {
        SyncState::Disabled => ("muted", "disabled"),
        SyncState::NeverSynced => ("muted", "never synced"),
        SyncState::Synced => ("ok", "synced"),
        SyncState::Failing => ("bad", "failing"),
    };
    html! { span class={"badge " (class)} data-sync=(word) { (word) } }
}

fn status_badge(status: RunStatus) -> Markup {
    let class = match status {
        RunStatus::Succeeded => "ok",
        RunStatus::Failed => "bad",
        RunStatus::Running => "warn",
        RunStatus::Skipped => "muted",
    };
    html! { span class={"badge " (class)} data-status=(status.word()) { (status.word()) } }
}

/// A run's counts in one line.
fn counts(r: &RunReport) -> Markup {
    html! {
        small.counts {
            "listed " (r.listed) ", created " (r.created) ", updated " (r.updated)
            ", pruned " (r.pruned) ", held " (r.held) ", failed " (r.failed)
        }
    }
}

/// What a worker's card says and offers.
struct Card<'a> {
    o: &'a WorkerOverview,
    states: Vec<(String, u64)>,
    next: Option<DateTime<Utc>>,
    details: bool,
    admin: bool,
}

fn worker_row(c: &Card<'_>) -> Markup {
    let w = &c.o.worker;
    let total: u64 = c.states.iter().map(|(_, n)| n).sum();
    html! {
        tr data-worker=(w.id.as_str()) data-name=(w.name) data-enabled=(w.enabled) {
            td {
                strong { (w.name) } br;
                code { (w.id.as_str()) } br;
                code.url { (w.base_url.as_str()) }
            }
            td {
                (sync_badge(c.o.sync_state)) br;
                @if w.enabled {
                    small.next { "next scheduled: " (c.next.map_or_else(|| "none".to_owned(), when)) }
                } @else {
                    small.next { "not refreshed while disabled" }
                }
                @if let Some(r) = &c.o.running {
                    br; span.running data-run=(r.run_id) { "refresh running since " (when(r.started_at)) }
                }
            }
            td.counts {
                a href={"/labs?worker=" (w.id.as_str())} { (total) " labs" }
                @if !c.states.is_empty() {
                    ul.states {
                        @for (state, n) in &c.states {
                            li { span class={"badge state " (state)} { (state) } " " (n) }
                        }
                    }
                }
            }
            td.last-run data-run=(c.o.last_run.as_ref().map(|r| r.run_id.as_str()).unwrap_or_default()) {
                @match &c.o.last_run {
                    Some(r) => {
                        (status_badge(r.status)) " " (when(r.finished_at)) " · " (r.duration_ms) " ms"
                        br; (counts(r))
                        @if let Some(h) = &r.hold_reason {
                            div.held role="alert" {
                                span.warn { (r.held) " prunes held: " (h) }
                                details {
                                    summary { "Labs that would go" }
                                    ul.held-labs { @for lab in &r.held_labs { li { code { (lab.as_str()) } } } }
                                }
                                @if c.admin {
                                    button.apply-prune type="button" data-worker=(w.id.as_str()) { "Apply the held prune" }
                                }
                            }
                        }
                        @if c.details { @if let Some(e) = &r.error { div.error.run-error { (e) } } }
                    }
                    None => { "no run yet" }
                }
                div.run-outcome role="status" {}
            }
            @if c.admin {
                td.actions {
                    button.refresh type="button" data-worker=(w.id.as_str()) disabled[!w.enabled] { "Refresh now" }
                    button.check type="button" data-worker=(w.id.as_str()) { "Test connection" }
                    a.edit href={"/workers/" (w.id.as_str()) "/edit"} { "Edit" }
                    button.toggle type="button" data-worker=(w.id.as_str()) data-enable=(!w.enabled) {
                        @if w.enabled { "Disable" } @else { "Enable" }
                    }
                    button.remove type="button" data-worker=(w.id.as_str()) { "Remove" }
                }
            }
        }
    }
}

/// `/fleet`: every worker at a glance.
pub async fn fleet(State(s): State<ApiState>, person: Person) -> Response {
    let details = person.caller.may_read_worker_details();
    let admin = person.caller.role >= Role::Admin;
    let next = next_refresh(&s.cron, s.services.clock.now());
    let body = match s.inventory.workers().await {
        Ok(workers) => {
            let mut cards = Vec::with_capacity(workers.len());
            for o in &workers {
                // A worker whose counts cannot be read still shows.
                let states = s
                    .inventory
                    .lab_counts(&o.worker.id)
                    .await
                    .unwrap_or_default();
                cards.push(Card {
                    o,
                    states,
                    next,
                    details,
                    admin,
                });
            }
            html! {
                h1 { "Fleet" }
                p.schedule {
                    "Scheduled refresh: " code { (s.cron) } " (UTC); next "
                    (next.map_or_else(|| "never".to_owned(), when)) "."
                }
                @if admin {
                    p.bulk {
                        button #refresh-all type="button" { "Refresh all workers" }
                        " "
                        a.button href="/workers/new" { "Add a worker" }
                    }
                }
                p #fleet-message role="status" {}
                table.fleet {
                    thead { tr { th { "Worker" } th { "Sync" } th { "Labs" } th { "Last run" } @if admin { th { "Actions" } } } }
                    tbody {
                        @for c in &cards { (worker_row(c)) }
                    }
                }
                @if workers.is_empty() { p.empty { "No worker is registered." } }
                dialog #confirm-remove {
                    h2 { "Remove worker?" }
                    p { "Worker " strong #r-name {} " and every record of its labs leave labsync. Its labs in CML are not touched." }
                    p #r-message role="status" {}
                    menu {
                        button #r-cancel type="button" { "Cancel" }
                        button #r-remove type="button" { "Remove" }
                    }
                }
            }
        }
        Err(e) => html! { h1 { "Fleet" } p.error role="alert" { (e.to_string()) } },
    };
    html_response(StatusCode::OK, page("Fleet", Some(&person), body))
}

const STATUSES: [RunStatus; 4] = [
    RunStatus::Running,
    RunStatus::Succeeded,
    RunStatus::Failed,
    RunStatus::Skipped,
];

/// `/runs`: refresh runs, newest first, by worker and status.
pub async fn runs(
    State(s): State<ApiState>,
    person: Person,
    Query(p): Query<RunsParams>,
) -> Response {
    let details = person.caller.may_read_worker_details();
    let workers = s.inventory.registered().await.unwrap_or_default();
    let result = match runs_query(&p) {
        Ok(q) => s.inventory.runs(q).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.detail),
    };
    let body = html! {
        h1 { "Refresh runs" }
        form.filters method="get" action="/runs" {
            (worker_picker("worker_id", &workers, p.worker_id.as_deref()))
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for st in STATUSES {
                        option value=(st.word()) selected[p.status.as_deref() == Some(st.word())] { (st.word()) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        @match &result {
            Ok(runs) => {
                table.runs {
                    thead { tr { th { "Started" } th { "Worker" } th { "Trigger" } th { "Status" } th { "What it did" } th { "Took" } } }
                    tbody {
                        @for r in runs {
                            tr data-run=(r.run_id) data-worker=(r.worker_id.as_str()) {
                                td { (when(r.started_at)) br; small { code { (r.run_id) } } }
                                td { (r.worker_id.as_str()) }
                                td { (format!("{:?}", r.trigger).to_lowercase())
                                    @if r.dry_run { br; small { "dry run" } }
                                    @if r.force_prune { br; small { "force prune" } } }
                                td { (status_badge(r.status))
                                    @if let Some(why) = r.skip_reason { br; small { (why.as_str()) } } }
                                td {
                                    (counts(r))
                                    @if let Some(h) = &r.hold_reason { br; span.warn { (h) } }
                                    @if let Some(e) = &r.error {
                                        br; span.error.run-error { @if details { (e) } @else { "failed; admins see why" } }
                                    }
                                    @if let Some(n) = &r.note { br; small { (n) } }
                                }
                                td { @if r.status == RunStatus::Running { "…" } @else { (r.duration_ms) " ms" } }
                            }
                        }
                    }
                }
                @if runs.is_empty() { p.empty { "No run matches." } }
            }
            Err(e) => { p.error role="alert" { (e) } }
        }
    };
    html_response(StatusCode::OK, page("Runs", Some(&person), body))
}
