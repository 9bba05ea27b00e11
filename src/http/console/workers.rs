//! The worker form: an admin adds or edits a worker, and tests the
//! connection before saving. The form is sent by the script, through the
//! API, which checks and saves; the page only draws it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use labsync_application::domain::{Worker, WorkerId};
use labsync_infrastructure::configuration::Role;
use maud::{Markup, html};

use super::{Person, html_response, page};
use crate::http::ApiState;

fn refused(person: &Person) -> Response {
    html_response(
        StatusCode::FORBIDDEN,
        page(
            "Forbidden",
            Some(person),
            html! { h1 { "Workers" } p.error role="alert" { "Only an admin manages workers." } },
        ),
    )
}

fn form(worker: Option<&Worker>) -> Markup {
    let editing = worker.is_some();
    let text = |f: fn(&Worker) -> String| worker.map(f).unwrap_or_default();
    html! {
        form #worker-form data-mode=(if editing { "edit" } else { "new" })
            data-worker=(text(|w| w.id.to_string())) {
            @if !editing {
                label { "Id " small { "(a slug: a-z, 0-9 and -)" }
                    input name="id" type="text" required pattern="[a-z0-9][a-z0-9-]{0,62}" autocomplete="off"; }
            }
            label { "Name " input name="name" type="text" value=(text(|w| w.name.clone())); }
            label { "URL " small { "(https://host[:port])" }
                input name="base_url" type="url" required value=(text(|w| w.base_url.as_str().to_owned())); }
            label { "Username " small { "(a CML administrator)" }
                input name="username" type="text" required autocomplete="off" value=(text(|w| w.username.clone())); }
            label { "Password "
                @if editing { small { "(leave empty to keep it; needed again to change the URL, the username or TLS)" } }
                input name="password" type="password" required[!editing] autocomplete="new-password"; }
            label { "CA bundle (PEM) "
                @if editing { small { "(leave empty to keep the current one)" } }
                textarea name="ca_cert_pem" rows="4" {} }
            label.check { input name="insecure" type="checkbox" checked[worker.is_some_and(|w| w.tls.insecure())];
                " Do not verify the certificate (anyone on the path can read the password)" }
            label.check { input name="allow_http" type="checkbox" checked[worker.is_some_and(Worker::plain_http)];
                " Allow plain http (the password crosses the network unencrypted)" }
            label.check { input name="enabled" type="checkbox" checked[worker.is_none_or(|w| w.enabled)]; " Enabled" }
            label.check { input name="lab_tiles" type="checkbox" checked[worker.is_some_and(|w| w.lab_tiles)];
                " Fetch details with one lab-tiles request" }
            menu {
                button #w-test type="button" { "Test connection" }
                button #w-save type="submit" { "Save" }
            }
            p #w-message role="status" {}
        }
    }
}

/// `/workers/new`.
pub async fn new_worker(person: Person) -> Response {
    if person.caller.role < Role::Admin {
        return refused(&person);
    }
    let body = html! { h1 { "Add a worker" } (form(None)) };
    html_response(StatusCode::OK, page("Add a worker", Some(&person), body))
}

/// `/workers/{id}/edit`.
pub async fn edit_worker(
    State(s): State<ApiState>,
    person: Person,
    Path(id): Path<String>,
) -> Response {
    if person.caller.role < Role::Admin {
        return refused(&person);
    }
    let found = match WorkerId::parse(&id) {
        Ok(id) => s.inventory.worker(&id).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let (status, body) = match found {
        Ok(o) => (
            StatusCode::OK,
            html! { h1 { "Edit " (o.worker.name) } (form(Some(&o.worker))) },
        ),
        Err(e) => (
            StatusCode::NOT_FOUND,
            html! { h1 { "Edit a worker" } p.error role="alert" { (e) } },
        ),
    };
    html_response(status, page("Edit a worker", Some(&person), body))
}
