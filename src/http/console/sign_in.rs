//! Signing in and out of the console: through the organisation's OpenID
//! Connect provider when `oidc.client_id` is set, with an API token
//! otherwise (and as a fallback). The mechanism is in [`super::session`].

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::{cross_site, html_response, page};
use crate::http::ApiState;
use crate::http::session;

fn login_form(s: &ApiState, error: Option<&str>) -> Markup {
    let token_form = html! {
        form method="post" action="/login" {
            label for="token" { "API token" }
            input #token type="password" name="token" autocomplete="off" required autofocus[!s.console_sign_in];
            button type="submit" { "Sign in" }
        }
    };
    page(
        "Sign in",
        None,
        html! {
            section.signin {
                h1 { "Sign in to labsync" }
                @if let Some(e) = error {
                    p.error role="alert" { (e) }
                }
                @if s.console_sign_in {
                    p { "Sign in with your organisation's account." }
                    a.button #provider-sign-in href="/auth/start" { "Sign in with your organisation" }
                    details {
                        summary { "Sign in with an API token instead" }
                        (token_form)
                    }
                } @else {
                    p { "Paste the API token you were given. It is checked once; the browser keeps only a session cookie." }
                    (token_form)
                }
            }
        },
    )
}

pub async fn login_page(State(s): State<ApiState>) -> Response {
    html_response(StatusCode::OK, login_form(&s, None))
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
            &s,
            StatusCode::FORBIDDEN,
            "sign-in is accepted from this site's own form only",
        );
    }
    match session::sign_in(&s, &f.token).await {
        Ok((secret, _)) => {
            let mut r = Redirect::to("/labs").into_response();
            r.headers_mut().insert(
                header::SET_COOKIE,
                session::session_cookie(&secret, s.session_policy),
            );
            r
        }
        Err(e) => not_signed_in(&s, e.status(), &e.detail),
    }
}

fn not_signed_in(s: &ApiState, status: StatusCode, why: &str) -> Response {
    html_response(
        status,
        login_form(s, Some(&format!("Not signed in: {why}."))),
    )
}

/// `GET /auth/start`: off to the provider, with this browser bound to the
/// sign-in.
pub async fn start_sign_in(State(s): State<ApiState>) -> Response {
    match session::start_sign_in(&s).await {
        Ok((url, browser)) => {
            let mut r = Redirect::to(&url).into_response();
            r.headers_mut().insert(
                header::SET_COOKIE,
                session::sign_in_cookie(&browser, s.session_policy),
            );
            r
        }
        Err(e) => not_signed_in(&s, e.status(), &e.detail),
    }
}

/// What the provider sends the browser back with.
#[derive(Debug, Deserialize)]
pub struct Callback {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
    /// The answering provider (RFC 9207), when it says.
    iss: Option<String>,
}

/// `GET /auth/callback`: the provider's answer. A session on success,
/// then the fleet page.
pub async fn callback(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Response {
    let (Some(state), Some(code)) = (q.state.as_deref(), q.code.as_deref()) else {
        let why = match q.error.as_deref() {
            // The provider's code word only (RFC 6749: printable ASCII),
            // short: it is shown back to the person.
            Some(e) => format!(
                "the provider did not sign you in ({})",
                crate::http::auth::printable(e, 48)
            ),
            None => "the provider's answer has no code".to_owned(),
        };
        return not_signed_in(&s, StatusCode::BAD_REQUEST, &why);
    };
    // An answer from another provider (a mix-up): its code is not for us.
    if let (Some(iss), Some(provider)) = (q.iss.as_deref(), s.oidc.as_deref())
        && iss != provider.issuer()
    {
        return not_signed_in(
            &s,
            StatusCode::BAD_REQUEST,
            "the answer comes from another provider than oidc.issuer",
        );
    }
    match session::finish_sign_in(&s, &headers, state, code).await {
        Ok((secret, _)) => {
            // A page of this site's own that moves on: the provider's
            // redirect was a cross-site navigation, and a `SameSite=Strict`
            // cookie set by it would not be sent on a redirect from it.
            let mut r = html_response(
                StatusCode::OK,
                page(
                    "Signed in",
                    None,
                    html! {
                        meta http-equiv="refresh" content="0;url=/fleet";
                        p { "Signed in. " a href="/fleet" { "Continue to the fleet" } "." }
                    },
                ),
            );
            let h = r.headers_mut();
            h.append(
                header::SET_COOKIE,
                session::session_cookie(&secret, s.session_policy),
            );
            h.append(
                header::SET_COOKIE,
                session::cleared_sign_in_cookie(s.session_policy),
            );
            r
        }
        Err(e) => not_signed_in(&s, e.status(), &e.detail),
    }
}

#[derive(Debug, Deserialize)]
pub struct LogoutForm {
    csrf: String,
}

/// `POST /logout`: ends the session for every replica, then at the
/// provider when the session is a person's and it can.
pub async fn logout(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Form(f): Form<LogoutForm>,
) -> Response {
    let mut then = None;
    if let Some(secret) = session::cookie_secret(&headers, s.session_policy) {
        let key = session::key_of(secret);
        let now = s.services.clock.now();
        let ended = match s.sessions.find(&key, now).await {
            Ok(Some(found)) if !session::csrf_matches(&found, &f.csrf) => {
                return html_response(
                    StatusCode::FORBIDDEN,
                    login_form(
                        &s,
                        Some("Sign-out refused: the form was not this session's."),
                    ),
                );
            }
            Ok(Some(found)) => {
                let ended = s.sessions.end(&key).await;
                if ended.is_ok()
                    && let Some(url) = session::provider_sign_out(&s, &found).await
                {
                    then = Some(url);
                }
                ended
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = ended {
            // Clearing the cookie alone would leave the session valid.
            return html_response(
                StatusCode::SERVICE_UNAVAILABLE,
                login_form(
                    &s,
                    Some(&format!(
                        "Sign-out failed, the session is still open: {e}. Try again."
                    )),
                ),
            );
        }
    }
    let mut r = match then {
        // A page that moves on rather than a redirect: the console's
        // `form-action 'self'` would stop a form's redirect to the provider.
        Some(url) => html_response(
            StatusCode::OK,
            page(
                "Signed out",
                None,
                html! {
                    meta http-equiv="refresh" content={"0;url=" (url)};
                    p { "Signed out of labsync. "
                        a #provider-sign-out href=(url) { "Sign out at your organisation's provider too" } "." }
                },
            ),
        ),
        None => Redirect::to("/login").into_response(),
    };
    r.headers_mut().insert(
        header::SET_COOKIE,
        session::cleared_cookie(s.session_policy),
    );
    r
}
