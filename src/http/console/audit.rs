//! The audit page: who deleted, pruned or refreshed what, and how it ended.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use labsync_application::ports::AuditAction;
use labsync_infrastructure::configuration::Role;
use maud::html;

use super::{Person, html_response, page, when};
use crate::http::ApiState;
use crate::http::dto::AuditParams;

/// `/audit`: who deleted, pruned or refreshed what, and how it ended, labs
/// that are gone included.
pub async fn audit(
    State(s): State<ApiState>,
    person: Person,
    Query(p): Query<AuditParams>,
) -> Response {
    let filters = [
        ("worker_id", "Worker", p.worker_id.clone()),
        ("lab_id", "Lab id", p.lab_id.clone()),
        ("actor", "Who", p.actor.clone()),
        ("action", "Action", p.action.clone()),
    ];
    // What CML said about a delete is for those who may delete.
    let details = person.caller.role >= Role::Operator;
    let entries = match crate::http::routes::audit_query(p) {
        Ok(q) => s.inventory.audit(q).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.detail),
    };
    let body = html! {
        h1 { "Audit" }
        form.filters method="get" action="/audit" {
            @for (name, label, value) in &filters {
                label { (label) " " input type="text" name=(name) value=(value.clone().unwrap_or_default()); }
            }
            button type="submit" { "Filter" }
        }
        @match &entries {
            Ok(page) => {
                table.audit {
                    thead { tr { th { "When" } th { "Who" } th { "Action" } th { "Worker" } th { "Lab" } th { "Outcome" } th { "Detail" } } }
                    tbody {
                        @for a in &page.items {
                            tr data-id=(a.id) {
                                td { (when(a.entry.at)) }
                                td.actor { (super::who(&a.entry.actor)) }
                                td.action { (a.entry.action.as_str()) }
                                td { (a.entry.worker_id.as_str()) }
                                td { @if let Some(l) = a.entry.lab_id { a href={"/labs/" (a.entry.worker_id.as_str()) "/" (l.as_str())} { code { (l.as_str()) } } } }
                                td.outcome { (a.entry.outcome) }
                                td.detail { @if details || a.entry.action != AuditAction::Delete { (a.entry.detail) } }
                            }
                        }
                    }
                }
                @if page.items.is_empty() { p.empty { "No entry matches." } }
            }
            Err(e) => { p.error role="alert" { (e) } }
        }
    };
    html_response(StatusCode::OK, page("Audit", Some(&person), body))
}
