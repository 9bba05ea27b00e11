//! The labs page (one table across the fleet: filters, sorts, cursor
//! paging, delete) and a lab's own page (its fields, its change history
//! and its audit trail, which outlives it).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use labsync_application::AppError;
use labsync_application::domain::{HistoryEvent, LabId, LabRecord, WorkerId};
use labsync_application::inventory::DEFAULT_PAGE;
use labsync_application::ports::{
    AuditAction, AuditEntry, AuditQuery, FleetCursor, FleetLabQuery, LabQuery, LabSort,
};
use labsync_infrastructure::configuration::Role;
use maud::{Markup, html};
use serde::Deserialize;

use super::{Person, given, html_response, page, percent, when, worker_picker};
use crate::http::ApiState;

#[derive(Debug, Default, Deserialize)]
pub struct LabsParams {
    worker: Option<String>,
    state: Option<String>,
    q: Option<String>,
    owner: Option<String>,
    /// `worker`, `title`, `state` or `modified`.
    sort: Option<String>,
    /// The last lab of the previous page, in the sort's order.
    after: Option<String>,
}

impl LabsParams {
    fn sort(&self) -> LabSort {
        given(self.sort.as_ref())
            .and_then(|s| LabSort::parse(&s))
            .unwrap_or_default()
    }

    /// The page's address with the filters and the sort kept and `after`
    /// set.
    fn next_href(&self, after: &FleetCursor) -> String {
        let mut q: Vec<(&str, String)> = [
            ("worker", &self.worker),
            ("state", &self.state),
            ("q", &self.q),
            ("owner", &self.owner),
            ("sort", &self.sort),
        ]
        .into_iter()
        .filter_map(|(k, v)| given(v.as_ref()).map(|v| (k, v)))
        .collect();
        q.push(("after", after.to_param()));
        let pairs: Vec<String> = q
            .iter()
            .map(|(k, v)| format!("{k}={}", percent(v)))
            .collect();
        format!("/labs?{}", pairs.join("&"))
    }
}

const STATES: [&str; 5] = ["DEFINED_ON_CORE", "STOPPED", "QUEUED", "BOOTED", "STARTED"];

fn sort_label(s: LabSort) -> &'static str {
    match s {
        LabSort::Worker => "worker",
        LabSort::Title => "title",
        LabSort::State => "state",
        LabSort::Modified => "modified, newest first",
    }
}

fn lab_href(r: &LabRecord) -> String {
    format!("/labs/{}/{}", r.worker_id, r.lab_id)
}

/// The confirm dialog of a delete, shared by the labs page and a lab's.
fn confirm_dialog() -> Markup {
    html! {
        dialog #confirm {
            h2 { "Delete lab?" }
            p { "Lab " strong #c-title {} " on " strong #c-worker {} " is " strong #c-state {} "." }
            p #c-message role="status" {}
            menu {
                button #c-cancel type="button" { "Cancel" }
                button #c-force type="button" hidden { "Stop, wipe and delete" }
                button #c-delete type="button" { "Delete" }
            }
        }
    }
}

/// `/labs`: every worker's labs in one table.
pub async fn labs(
    State(s): State<ApiState>,
    person: Person,
    Query(p): Query<LabsParams>,
) -> Response {
    let may_delete = person.caller.role >= Role::SelfService;
    let worker = given(p.worker.as_ref()).and_then(|w| WorkerId::parse(&w).ok());
    let sort = p.sort();
    let after = match p.after.as_deref() {
        None => None,
        Some(a) => match FleetCursor::parse(sort, a) {
            Some(c) => Some(c),
            // Not a page labsync made (or made for another order): say so
            // rather than show the first page as if it were the next.
            None => {
                return html_response(
                    StatusCode::BAD_REQUEST,
                    page(
                        "Labs",
                        Some(&person),
                        html! {
                            h1 { "Labs" }
                            p.error role="alert" { "This page's address does not name a place in the list (its \"after\" is not one labsync made for this order)." }
                            p { a href="/labs" { "The first page" } }
                        },
                    ),
                );
            }
        },
    };
    let query = FleetLabQuery {
        worker,
        filter: LabQuery {
            state: given(p.state.as_ref()),
            owner: given(p.owner.as_ref()),
            title_contains: given(p.q.as_ref()).map(|q| q.chars().take(200).collect()),
            after: None,
            limit: DEFAULT_PAGE,
        },
        sort,
        after,
    };
    let workers = s.inventory.registered().await.unwrap_or_default();
    let page_result = s.inventory.fleet_labs(query).await;
    let body = html! {
        h1 { "Labs" }
        form.filters method="get" action="/labs" {
            (worker_picker("worker", &workers, p.worker.as_deref()))
            label { "State "
                select name="state" {
                    option value="" { "any" }
                    @for st in STATES {
                        option value=(st) selected[p.state.as_deref() == Some(st)] { (st) }
                    }
                }
            }
            label { "Owner " input type="text" name="owner" value=(p.owner.clone().unwrap_or_default()); }
            label { "Title " input type="search" name="q" value=(p.q.clone().unwrap_or_default()); }
            label { "Sort by "
                select name="sort" {
                    @for so in LabSort::ALL {
                        option value=(so.word()) selected[so == sort] { (sort_label(so)) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        @match &page_result {
            Ok(page) => {
                @if may_delete {
                    p.bulk { button #delete-selected type="button" { "Delete selected" } }
                }
                table.labs {
                    thead { tr { @if may_delete { th {} } th { "Title" } th { "Worker" } th { "Owner" } th { "State" } th { "Nodes / links" } th { "Modified" } th { "Last seen" } @if may_delete { th {} th { "Outcome" } } } }
                    tbody {
                        @for r in &page.items {
                            tr data-worker=(r.worker_id.as_str()) data-lab=(r.lab_id.as_str()) data-title=(r.snapshot.title) data-state=(r.snapshot.state.as_str()) {
                                @if may_delete {
                                    td { @if person.caller.may_delete(r.snapshot.owner_username.as_deref()) { input type="checkbox" data-select="" aria-label="select"; } }
                                }
                                td.title { a href=(lab_href(r)) { (r.snapshot.title) } }
                                td { (r.worker_id.as_str()) }
                                td { (r.snapshot.owner_username.clone().unwrap_or_default()) }
                                td { span class={"badge state " (r.snapshot.state.as_str())} { (r.snapshot.state.as_str()) } }
                                td { (r.snapshot.node_count) " / " (r.snapshot.link_count) }
                                td.modified { (r.snapshot.modified.map(|t| t.format("%Y-%m-%d %H:%M").to_string()).unwrap_or_default()) }
                                td { (r.last_seen_at.format("%Y-%m-%d %H:%M").to_string()) }
                                @if may_delete {
                                    td { @if person.caller.may_delete(r.snapshot.owner_username.as_deref()) { button.delete type="button" data-delete="" { "Delete" } } }
                                    td.outcome role="status" {}
                                }
                            }
                        }
                    }
                }
                @if page.items.is_empty() { p.empty { "No lab matches." } }
                @if let Some(next) = &page.next_cursor {
                    p { a.next href=(p.next_href(next)) { "Next page" } }
                }
            }
            Err(e) => { p.error role="alert" { (e.to_string()) } }
        }
        (confirm_dialog())
    };
    html_response(StatusCode::OK, page("Labs", Some(&person), body))
}

fn history_text(e: &HistoryEvent, details: bool) -> Markup {
    match e {
        HistoryEvent::Created { state } => html! { "first seen, " (state.as_str()) },
        HistoryEvent::Changed { changes } => html! {
            ul.changes { @for c in changes {
                li { (c.field.as_str()) ": " q { (c.old) } " → " q { (c.new) } }
            } }
        },
        HistoryEvent::DeleteAttempt {
            requested_by,
            force,
            outcome,
            detail,
        } => html! {
            "delete by " (super::who(requested_by)) @if *force { " (stop, wipe and delete)" } ": " (outcome)
            @if details { br; small { (detail) } }
        },
    }
}

fn audit_table(entries: &[AuditEntry], details: bool) -> Markup {
    html! {
        table.audit {
            thead { tr { th { "When" } th { "Who" } th { "Action" } th { "Outcome" } th { "Detail" } } }
            tbody {
                @for a in entries {
                    tr {
                        td { (when(a.at)) }
                        td.actor { (super::who(&a.actor)) }
                        td.action { (a.action.as_str()) }
                        td.outcome { (a.outcome) }
                        td.detail { @if details || a.action != AuditAction::Delete { (a.detail) } }
                    }
                }
            }
        }
        @if entries.is_empty() { p.empty { "No audit entry." } }
    }
}

fn lab_fields(r: &LabRecord) -> Markup {
    let s = &r.snapshot;
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map_or_else(String::new, when);
    html! {
        dl.fields {
            dt { "Title" } dd.title { (s.title) }
            dt { "Lab id" } dd { code { (r.lab_id.as_str()) } }
            dt { "Worker" } dd { a href={"/labs?worker=" (r.worker_id.as_str())} { (r.worker_id.as_str()) } }
            dt { "State" } dd { span class={"badge state " (s.state.as_str())} { (s.state.as_str()) } }
            dt { "Owner" } dd { (s.owner_username.clone().unwrap_or_default())
                @if let Some(f) = s.owner_fullname.as_deref().filter(|f| !f.is_empty()) { " (" (f) ")" } }
            dt { "Nodes / links" } dd { (s.node_count) " / " (s.link_count) }
            dt { "Groups" } dd { @for g in &s.groups { span.group { (g.name.clone().unwrap_or_else(|| g.id.clone())) " (" (g.permission) ")" } " " } }
            dt { "Created in CML" } dd { (time(s.created)) }
            dt { "Modified in CML" } dd { (time(s.modified)) }
            dt { "First seen" } dd { (when(r.first_seen_at)) }
            dt { "Last written" } dd { (when(r.last_seen_at)) }
            dt { "Last changed" } dd { (when(r.last_changed_at)) " (revision " (r.revision) ")" }
            dt { "Description" } dd { pre.text { (s.description) } }
            dt { "Notes" } dd { pre.text { (s.notes) } }
        }
    }
}

/// `/labs/{worker}/{lab}`: one lab, and its trail once it is gone.
pub async fn lab(
    State(s): State<ApiState>,
    person: Person,
    Path((worker, lab)): Path<(String, String)>,
) -> Response {
    let (Ok(worker), Ok(lab)) = (WorkerId::parse(&worker), LabId::parse(&lab)) else {
        return html_response(
            StatusCode::NOT_FOUND,
            page(
                "Not found",
                Some(&person),
                html! { h1 { "No such lab" } p.error role="alert" { "A lab's address is /labs/<worker id>/<lab id>." } },
            ),
        );
    };
    let details = person.caller.role >= Role::Operator;
    let found = s.inventory.lab(&worker, &lab).await;
    // The trail outlives the lab: read it from the audit log either way.
    let trail = s
        .inventory
        .audit(AuditQuery {
            worker: Some(worker.clone()),
            lab: Some(lab),
            actor: None,
            action: None,
            since: None,
            before: None,
            limit: DEFAULT_PAGE,
        })
        .await
        .map(|p| p.items.into_iter().map(|a| a.entry).collect::<Vec<_>>());
    let (status, body) = match &found {
        Ok(d) => {
            let r = &d.record;
            (
                StatusCode::OK,
                html! {
                    article.lab data-worker=(r.worker_id.as_str()) data-lab=(r.lab_id.as_str()) data-title=(r.snapshot.title) data-state=(r.snapshot.state.as_str()) {
                        h1 { (r.snapshot.title) }
                        @if person.caller.may_delete(r.snapshot.owner_username.as_deref()) {
                            p { button.delete type="button" data-delete="" { "Delete" } span.outcome role="status" {} }
                        }
                        (lab_fields(r))
                        h2 { "Change history" }
                        table.history {
                            thead { tr { th { "When" } th { "What" } } }
                            tbody { @for h in r.history.iter().rev() {
                                tr { td { (when(h.at)) } td { (history_text(&h.event, details)) } }
                            } }
                        }
                    }
                    (confirm_dialog())
                },
            )
        }
        Err(AppError::UnknownLab(..) | AppError::UnknownWorker(_)) => (
            StatusCode::NOT_FOUND,
            html! {
                h1 { "Lab " code { (lab.as_str()) } }
                p.gone role="status" { "This lab is not in the inventory of " (worker.as_str()) ": deleted, pruned, or never seen. Its audit trail is below." }
            },
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            html! { h1 { "Lab" } p.error role="alert" { (e.to_string()) } },
        ),
    };
    let body = html! {
        (body)
        h2 { "Audit trail" }
        @match &trail {
            Ok(entries) => { (audit_table(entries, details)) }
            Err(e) => { p.error role="alert" { (e.to_string()) } }
        }
    };
    html_response(status, page("Lab", Some(&person), body))
}
