//! The operator console: server-rendered pages (maud escapes every value
//! it writes, so a lab title from CML is text, never markup) and one small
//! script, all embedded in the binary and served by labsync itself.
//!
//! The pages read through the same use cases as the API, as the signed-in
//! person's role; the script acts through the API (with the session's CSRF
//! token), so that the server decides what each role may do.

mod audit;
mod fleet;
mod labs;
mod sign_in;
mod workers;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use labsync_application::ports::ConsoleSession;
use maud::{DOCTYPE, Markup, html};

pub use audit::audit;
pub use fleet::{fleet, runs};
pub use labs::{lab, labs};
pub use sign_in::{callback, login, login_page, logout, start_sign_in};
pub use workers::{edit_worker, new_worker};

use super::ApiState;
use super::auth::Caller;
use super::session;

/// The console's script, served at `/assets/console.js`.
pub const SCRIPT: &str = include_str!("../assets/console.js");
/// The console's style sheet, served at `/assets/console.css`.
pub const STYLE: &str = include_str!("../assets/console.css");

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
                            a href="/runs" { "Runs" }
                            a href="/audit" { "Audit" }
                        }
                        span.who { (p.caller.name()) " · " (p.caller.role.as_str()) }
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

/// Who did something, as a person reads it: a person by name (their
/// provider's `sub` on hover and beside it), a machine by its token, and a
/// command-line user marked as not authenticated (the name is the OS
/// login's, which labsync cannot check).
fn who(actor: &labsync_application::domain::Actor) -> Markup {
    use labsync_application::domain::Actor;
    html! {
        @match actor {
            Actor::Person { subject, display } => span.person title=(format!("sub {subject}")) {
                (display) " " small { "(" (subject) ")" }
            },
            Actor::Api(name) => span.machine { "API token " (name) },
            Actor::Cli(user) => span.cli title="the OS login name; not authenticated by labsync" {
                (user) " " small { "(command line, not authenticated)" }
            },
            Actor::Schedule => span { "the schedule" },
            Actor::Recorded(text) => span { (text) },
        }
    }
}

/// A time as the console shows it: UTC, to the second.
fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// A filter form's worker picker, named `name`, with `selected` chosen.
fn worker_picker(
    name: &str,
    workers: &[labsync_application::domain::Worker],
    selected: Option<&str>,
) -> Markup {
    html! {
        label { "Worker "
            select name=(name) {
                option value="" { "all" }
                @for w in workers {
                    option value=(w.id.as_str()) selected[selected == Some(w.id.as_str())] { (w.name) }
                }
            }
        }
    }
}

/// A filter's value, or none when the form left it empty.
fn given(v: Option<&String>) -> Option<String> {
    v.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// `v` as a URL query value.
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
