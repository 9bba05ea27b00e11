//! The operator console: server-rendered pages (maud escapes every value
//! it writes, so a lab title from CML is text, never markup) and one small
//! script, all embedded in the binary and served by labsync itself.
//!
//! The pages read through the same use cases as the API, as the signed-in
//! person's role; the script acts through the API (with the session's CSRF
//! token), so that the server decides what each role may do.

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use labsync_application::domain::{LabId, WorkerId};
use labsync_application::inventory::DEFAULT_PAGE;
use labsync_application::ports::{AuditAction, ConsoleSession, FleetLabQuery, LabQuery};
use labsync_application::{SyncState, WorkerOverview};
use labsync_infrastructure::configuration::Role;
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::ApiState;
use super::auth::Caller;
use super::dto::AuditParams;
use super::session;

/// The console's script, served at `/assets/console.js`.
pub const SCRIPT: &str = include_str!("assets/console.js");
/// The console's style sheet, served at `/assets/console.css`.
pub const STYLE: &str = include_str!("assets/console.css");

/// The person signed in to the console; a page without one sends the
/// browser to the sign-in form.
#[derive(Debug, Clone)]
pub struct Person {
    pub caller: Caller,
    pub session: ConsoleSession,
}

impl axum::extract::FromRequestParts<ApiState> for Person {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &ApiState,
    ) -> Result<Self, Response> {
        match session::session_caller(state, &parts.method, &parts.headers).await {
            Ok(Some((caller, session))) => Ok(Self { caller, session }),
            Ok(None) => Err(Redirect::to("/login").into_response()),
            // Signed out, expired, or its token gone: sign in again.
            Err(e) if e.status() == StatusCode::UNAUTHORIZED => {
                Err(Redirect::to("/login").into_response())
            }
            // The database, most likely: say so, not "sign in".
            Err(e) => Err(html_response(
                e.status(),
                page(
                    "Unavailable",
                    None,
                    html! { h1 { "labsync cannot answer" } p.error role="alert" { (e.detail) } },
                ),
            )),
        }
    }
}

fn page(title: &str, person: Option<&Person>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(p) = person {
                    meta name="csrf-token" content=(p.session.csrf);
                    meta name="role" content=(p.caller.role.as_str());
                }
                title { (title) " · labsync" }
                link rel="stylesheet" href="/assets/console.css";
                script type="module" src="/assets/console.js" {}
            }
            body {
                header {
                    a.brand href="/" { "labsync" }
                    @if let Some(p) = person {
                        nav {
                            a href="/fleet" { "Fleet" }
                            a href="/labs" { "Labs" }
                            a href="/audit" { "Audit" }
                        }
                        span.who { (p.caller.name) " · " (p.caller.role.as_str()) }
                        form.signout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(p.session.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn html_response(status: StatusCode, markup: Markup) -> Response {
    let mut r = (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // A page names its person and carries their CSRF token: no
            // cache may keep it.
            (header::CACHE_CONTROL, "no-store"),
        ],
        markup.into_string(),
    )
        .into_response();
    // An error page is the console's own answer, not a problem to rewrite.
    r.extensions_mut().insert(super::problem::Finished);
    r
}

/// Whether a request comes from another site: browsers say so in
/// `Sec-Fetch-Site`, and in `Origin` on a form post.
fn cross_site(headers: &HeaderMap) -> bool {
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if matches!(fetch_site, Some("cross-site" | "same-site")) {
        return true;
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match (origin, host) {
        // What browsers send under `Referrer-Policy: no-referrer`, for
        // this site's own forms too: `Sec-Fetch-Site` decides then.
        (Some("null"), _) => false,
        (Some(origin), Some(host)) => {
            let bare = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .unwrap_or(origin);
            bare != host
        }
        _ => false,
    }
}

/// `/`: the labs for a signed-in person, the sign-in form otherwise.
pub async fn home(person: Option<Person>) -> Redirect {
    Redirect::to(if person.is_some() { "/labs" } else { "/login" })
}

impl axum::extract::OptionalFromRequestParts<ApiState> for Person {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &ApiState,
    ) -> Result<Option<Self>, std::convert::Infallible> {
        Ok(
            <Self as axum::extract::FromRequestParts<ApiState>>::from_request_parts(parts, state)
                .await
                .ok(),
        )
    }
}

fn login_form(error: Option<&str>) -> Markup {
    page(
        "Sign in",
        None,
        html! {
            section.signin {
                h1 { "Sign in to labsync" }
                p { "Paste the API token you were given. It is checked once; the browser keeps only a session cookie." }
                @if let Some(e) = error {
                    p.error role="alert" { (e) }
                }
                form method="post" action="/login" {
                    label for="token" { "API token" }
                    input #token type="password" name="token" autocomplete="off" required autofocus;
                    button type="submit" { "Sign in" }
                }
            }
        },
    )
}

pub async fn login_page() -> Response {
    html_response(StatusCode::OK, login_form(None))
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    token: String,
}

pub async fn login(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if cross_site(&headers) {
        return not_signed_in(
            StatusCode::FORBIDDEN,
            "sign-in is accepted from this site's own form only",
        );
    }
    match session::sign_in(&s, &f.token).await {
        Ok((secret, _)) => {
            let mut r = Redirect::to("/labs").into_response();
            r.headers_mut().insert(
                header::SET_COOKIE,
                session::session_cookie(&secret, s.secure_cookie),
            );
            r
        }
        Err(e) => not_signed_in(e.status(), &e.detail),
    }
}

fn not_signed_in(status: StatusCode, why: &str) -> Response {
    html_response(status, login_form(Some(&format!("Not signed in: {why}."))))
}

#[derive(Debug, Deserialize)]
pub struct LogoutForm {
    csrf: String,
}

pub async fn logout(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Form(f): Form<LogoutForm>,
) -> Response {
    if let Some(secret) = session::cookie_secret(&headers) {
        let key = session::key_of(secret);
        let now = s.services.clock.now();
        let ended = match s.sessions.find(&key, now).await {
            Ok(Some(found)) if !session::csrf_matches(&found, &f.csrf) => {
                return html_response(
                    StatusCode::FORBIDDEN,
                    login_form(Some("Sign-out refused: the form was not this session's.")),
                );
            }
            Ok(Some(_)) => s.sessions.end(&key).await,
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = ended {
            // Clearing the cookie alone would leave the session valid.
            return html_response(
                StatusCode::SERVICE_UNAVAILABLE,
                login_form(Some(&format!(
                    "Sign-out failed, the session is still open: {e}. Try again."
                ))),
            );
        }
    }
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, session::cleared_cookie());
    r
}

fn sync_badge(state: SyncState) -> Markup {
    let (class, word) = match state {
        SyncState::Disabled => ("muted", "disabled"),
        SyncState::NeverSynced => ("muted", "never synced"),
        SyncState::Synced => ("ok", "synced"),
        SyncState::Failing => ("bad", "failing"),
    };
    html! { span class={"badge " (class)} data-sync=(word) { (word) } }
}

fn worker_row(o: &WorkerOverview, details: bool, admin: bool) -> Markup {
    let w = &o.worker;
    html! {
        tr data-worker=(w.id.as_str()) {
            td { strong { (w.name) } br; code { (w.id.as_str()) } }
            td { code { (w.base_url.as_str()) } }
            td { (sync_badge(o.sync_state)) }
            @match &o.last_run {
                Some(r) => {
                    td {
                        (r.status.word()) " · " (r.finished_at.format("%Y-%m-%d %H:%M:%S UTC")) " · " (r.duration_ms) " ms"
                        br;
                        small { "listed " (r.listed) ", created " (r.created) ", updated " (r.updated) ", pruned " (r.pruned) ", held " (r.held) ", failed " (r.failed) }
                        @if let Some(h) = &r.hold_reason {
                            div.held {
                                span.warn { (r.held) " prunes held: " (h) }
                                details {
                                    summary { "Labs that would go" }
                                    ul.held-labs { @for lab in &r.held_labs { li { code { (lab.as_str()) } } } }
                                }
                                @if admin {
                                    button.apply-prune type="button" data-worker=(w.id.as_str()) { "Apply the held prune" }
                                }
                            }
                        }
                        @if details { @if let Some(e) = &r.error { br; span.error { (e) } } }
                    }
                }
                None => { td { "no run yet" } }
            }
        }
    }
}

pub async fn fleet(State(s): State<ApiState>, person: Person) -> Response {
    let details = person.caller.may_read_worker_details();
    let admin = person.caller.role >= Role::Admin;
    let body = match s.inventory.workers().await {
        Ok(workers) => html! {
            h1 { "Fleet" }
            table.fleet {
                thead { tr { th { "Worker" } th { "URL" } th { "Sync" } th { "Last run" } } }
                tbody {
                    @for o in &workers { (worker_row(o, details, admin)) }
                }
            }
        },
        Err(e) => html! { h1 { "Fleet" } p.error role="alert" { (e.to_string()) } },
    };
    html_response(StatusCode::OK, page("Fleet", Some(&person), body))
}

#[derive(Debug, Default, Deserialize)]
pub struct LabsParams {
    worker: Option<String>,
    state: Option<String>,
    q: Option<String>,
    owner: Option<String>,
    /// `worker/lab` of the last lab of the previous page.
    after: Option<String>,
}

/// A filter's value, or none when the form left it empty.
fn given(v: Option<&String>) -> Option<String> {
    v.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

fn cursor_of(after: Option<&String>) -> Option<(WorkerId, LabId)> {
    let (w, l) = after?.split_once('/')?;
    Some((WorkerId::parse(w).ok()?, LabId::parse(l).ok()?))
}

/// The page's address with the filters kept and `after` set.
fn next_href(p: &LabsParams, after: &(WorkerId, LabId)) -> String {
    let mut q = url_query(p);
    q.push(("after", format!("{}/{}", after.0, after.1)));
    let pairs: Vec<String> = q
        .iter()
        .map(|(k, v)| format!("{k}={}", percent(v)))
        .collect();
    format!("/labs?{}", pairs.join("&"))
}

fn url_query(p: &LabsParams) -> Vec<(&'static str, String)> {
    [
        ("worker", &p.worker),
        ("state", &p.state),
        ("q", &p.q),
        ("owner", &p.owner),
    ]
    .into_iter()
    .filter_map(|(k, v)| given(v.as_ref()).map(|v| (k, v)))
    .collect()
}

fn percent(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

const STATES: [&str; 5] = ["DEFINED_ON_CORE", "STOPPED", "QUEUED", "BOOTED", "STARTED"];

pub async fn labs(
    State(s): State<ApiState>,
    person: Person,
    Query(p): Query<LabsParams>,
) -> Response {
    let may_delete = person.caller.role >= Role::Operator;
    let worker = given(p.worker.as_ref()).and_then(|w| WorkerId::parse(&w).ok());
    let query = FleetLabQuery {
        worker,
        filter: LabQuery {
            state: given(p.state.as_ref()),
            owner: given(p.owner.as_ref()),
            title_contains: given(p.q.as_ref()).map(|q| q.chars().take(200).collect()),
            after: None,
            limit: DEFAULT_PAGE,
        },
        after_in: cursor_of(p.after.as_ref()),
    };
    let workers = s.inventory.workers().await.unwrap_or_default();
    let page_result = s.inventory.fleet_labs(query).await;
    let body = html! {
        h1 { "Labs" }
        form.filters method="get" action="/labs" {
            label { "Worker "
                select name="worker" {
                    option value="" { "all" }
                    @for o in &workers {
                        option value=(o.worker.id.as_str()) selected[p.worker.as_deref() == Some(o.worker.id.as_str())] { (o.worker.name) }
                    }
                }
            }
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
                                @if may_delete { td { input type="checkbox" data-select="" aria-label="select"; } }
                                td.title { (r.snapshot.title) }
                                td { (r.worker_id.as_str()) }
                                td { (r.snapshot.owner_username.clone().unwrap_or_default()) }
                                td { span class={"badge state " (r.snapshot.state.as_str())} { (r.snapshot.state.as_str()) } }
                                td { (r.snapshot.node_count) " / " (r.snapshot.link_count) }
                                td { (r.snapshot.modified.map(|t| t.format("%Y-%m-%d %H:%M").to_string()).unwrap_or_default()) }
                                td { (r.last_seen_at.format("%Y-%m-%d %H:%M").to_string()) }
                                @if may_delete {
                                    td { button.delete type="button" data-delete="" { "Delete" } }
                                    td.outcome role="status" {}
                                }
                            }
                        }
                    }
                }
                @if page.items.is_empty() { p.empty { "No lab matches." } }
                @if let Some(next) = &page.next_cursor {
                    p { a.next href=(next_href(&p, next)) { "Next page" } }
                }
            }
            Err(e) => { p.error role="alert" { (e.to_string()) } }
        }
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
    };
    html_response(StatusCode::OK, page("Labs", Some(&person), body))
}

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
    let entries = match super::routes::audit_query(p) {
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
                                td { (a.entry.at.format("%Y-%m-%d %H:%M:%S UTC")) }
                                td.actor { (a.entry.actor.to_string()) }
                                td.action { (a.entry.action.as_str()) }
                                td { (a.entry.worker_id.as_str()) }
                                td { code { (a.entry.lab_id.map(|l| l.to_string()).unwrap_or_default()) } }
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

pub async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

pub async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// The headers every answer carries: no script but labsync's own, no
/// framing, no sniffing, no referrer.
pub async fn security_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut r = next.run(request).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
             frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Answers to a session's cookie are that person's: no shared cache may
    // keep them (the assets say otherwise for themselves).
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}
