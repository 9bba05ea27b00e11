//! Console sessions: a person signs in once (through the organisation's
//! OpenID Connect provider, or with an API token) and the browser then
//! carries an opaque cookie instead.
//!
//! # Expected flow
//! 1. Sign-in makes a session: the SHA-256 of a new random secret, whom it
//!    speaks for, a CSRF token, an absolute and an idle end. The secret
//!    goes to the browser in an `HttpOnly`, `SameSite=Strict` cookie
//!    (`__Host-` and `Secure` under HTTPS).
//!    - Through the provider ([`start_sign_in`], [`finish_sign_in`]): the
//!      authorization code flow with PKCE; the pending sign-in is stored
//!      (any replica may take the callback) and bound to the browser by a
//!      short `SameSite=Lax` cookie: a callback URL sent to someone else
//!      neither signs them in nor spends the sign-in. A replica starts at most
//!      [`MAX_SIGN_INS_PER_MINUTE`] of them a minute.
//!    - With an API token (`POST /login`; not a provider's JWT, which the
//!      session would outlive): the session names the token's hash.
//! 2. Every request without an `Authorization` header is the session's. A
//!    token's session has the token's role as configured *now*; a
//!    person's, the role their roles claim's values (kept from sign-in) map
//!    to *now*. A person's requests move the idle end on, writing at most
//!    once per [`TOUCH_EVERY`]; a script's own fetches (`Sec-Fetch-Mode`
//!    other than `navigate`, such as the live redraws) do not. A session's
//!    event stream ends at the session's end and at least every
//!    [`STREAM_RECHECK`], to be checked again on reconnect.
//! 3. A state-changing request of a session (any method but GET, HEAD,
//!    OPTIONS) must carry the session's CSRF token in `x-csrf-token` (the
//!    console's script reads it from the page); sign-out, a form, carries
//!    it in a `csrf` field. Token sign-in is refused from another site
//!    (`Sec-Fetch-Site`, `Origin`), so no page elsewhere can sign a
//!    browser in as someone else.
//! 4. `POST /logout` ends the session for every replica, then sends a
//!    person's browser to the provider's end-session endpoint when it has
//!    one.
//!
//! # Guarantees
//! - No token reaches the browser's storage or a script: only the cookie
//!   does, and no script can read it. A person's ID token stays on the
//!   server until sign-out hands it to the provider as `id_token_hint`.
//! - Another site cannot act with a session: the cookie is not sent on
//!   cross-site requests (`SameSite=Strict`), and a request without the
//!   CSRF token is refused (403) even if it were.
//! - A session ends at its absolute end however active, and after
//!   `api.session_idle_secs` without a request (to within
//!   [`TOUCH_EVERY`], or a quarter of the idle time when that is less).
//! - A token's session belongs to the token itself (its hash): a token
//!   removed from the configuration or rotated ends its sessions once the
//!   replica runs with the new configuration; a stored token revoked or
//!   expired ends them at their next request.
//! - Bearer tokens work as before, without CSRF (a header is not ambient).
//!
//! # Assumptions
//! labsync is served over HTTPS by a proxy in front of it in production;
//! the cookies are marked `Secure` when `api.secure_cookie` says so.
//!
//! # Caveats
//! The sign-in budget is per replica, not per client: one client starting
//! sign-ins in a loop can make others wait for the next minute.
//! A person's claims are read at sign-in: a role taken away at the
//! provider holds until the session ends (a changed `oidc.roles` applies
//! at once). Sessions stored before sessions had an idle end have ended:
//! their people sign in again, once.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, header};
use base64::Engine;
use labsync_application::ports::{ConsoleSession, PendingSignIn, SessionOf, SignedInPerson};
use labsync_infrastructure::oidc::{Pkce, SignInError};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ApiState;
use super::auth::Caller;
use super::problem::{ApiError, ProblemKind};

/// The cookie that carries the session's secret (over plain HTTP: the
/// demo, tests).
pub const COOKIE: &str = "labsync_session";

/// Its name under HTTPS: `__Host-` cookies are set by this host only, for
/// `/`, `Secure`, so that a sibling subdomain cannot plant one (a session
/// of its choosing).
pub const SECURE_COOKIE: &str = "__Host-labsync_session";

/// The header a state-changing request of a session echoes its CSRF
/// token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The cookie that binds a sign-in through the provider to the browser
/// that started it.
pub const SIGN_IN_COOKIE: &str = "labsync_sign_in";

/// Its name under HTTPS (see [`SECURE_COOKIE`]).
pub const SECURE_SIGN_IN_COOKIE: &str = "__Host-labsync_sign_in";

/// How long a sign-in through the provider may take.
pub const SIGN_IN_TTL: Duration = Duration::from_secs(600);

/// A session's idle end is written at most this often.
pub const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Sign-ins started per replica per minute, at most: each stores a pending
/// sign-in for [`SIGN_IN_TTL`], and anyone may start one, so a flood of
/// `/auth/start` must not fill the store.
pub const MAX_SIGN_INS_PER_MINUTE: u32 = 600;

/// The sign-ins a replica may still start this minute.
#[derive(Debug, Default)]
pub struct SignInBudget {
    /// The minute's start and the sign-ins started in it.
    window: std::sync::Mutex<Option<(std::time::Instant, u32)>>,
}

/// Whether one more sign-in fits the minute that began at `start` with
/// `used` of them; the window after it.
fn admits(
    window: Option<(std::time::Instant, u32)>,
    now: std::time::Instant,
) -> (bool, (std::time::Instant, u32)) {
    match window {
        Some((start, used)) if now.duration_since(start) < Duration::from_secs(60) => {
            let ok = used < MAX_SIGN_INS_PER_MINUTE;
            (ok, (start, used + u32::from(ok)))
        }
        _ => (true, (now, 1)),
    }
}

impl SignInBudget {
    /// Takes one sign-in from the budget, if any is left.
    pub fn take(&self) -> bool {
        let mut w = self
            .window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (ok, next) = admits(*w, std::time::Instant::now());
        *w = Some(next);
        ok
    }
}

/// A session's event stream ends at least this often, and at the
/// session's end, so that its browser reconnects and is checked again: a
/// stream outlives neither a sign-out nor an idle or absolute end.
pub const STREAM_RECHECK: Duration = Duration::from_secs(60);

/// When a session's event stream must end (see [`STREAM_RECHECK`]).
pub fn stream_deadline(session: &ConsoleSession, now: chrono::DateTime<chrono::Utc>) -> Duration {
    let recheck =
        chrono::Duration::from_std(STREAM_RECHECK).unwrap_or(chrono::Duration::minutes(1));
    let end = session
        .expires_at
        .min(session.idle_until)
        .min(now + recheck);
    (end - now).to_std().unwrap_or_default()
}

/// How long sessions last, and how their cookies are marked.
#[derive(Debug, Clone, Copy)]
pub struct SessionPolicy {
    pub secure_cookie: bool,
    /// Without a request.
    pub idle: Duration,
    /// From sign-in, however active.
    pub max: Duration,
}

impl SessionPolicy {
    /// The session cookie's name.
    pub fn cookie(&self) -> &'static str {
        if self.secure_cookie {
            SECURE_COOKIE
        } else {
            COOKIE
        }
    }

    /// The sign-in cookie's name and path (a `__Host-` cookie must be for
    /// `/`).
    fn sign_in_cookie(&self) -> (&'static str, &'static str) {
        if self.secure_cookie {
            (SECURE_SIGN_IN_COOKIE, "/")
        } else {
            (SIGN_IN_COOKIE, "/auth/callback")
        }
    }

    fn idle(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.idle).unwrap_or(chrono::Duration::hours(1))
    }

    fn max(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.max).unwrap_or(chrono::Duration::hours(12))
    }
}

/// A new random secret: 32 bytes, URL-safe base64.
fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// What a session is stored under: the secret's SHA-256, hex.
pub fn key_of(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The session secret a request's cookies carry, if any.
pub fn cookie_secret(headers: &HeaderMap, policy: SessionPolicy) -> Option<&str> {
    cookie(headers, policy.cookie())
}

/// The value of the cookie `name`, if the request carries it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

/// Stores a new session for `who`; returns the cookie's secret and the
/// session.
async fn open(s: &ApiState, who: SessionOf) -> Result<(String, ConsoleSession), ApiError> {
    let secret = random_secret();
    let now = s.services.clock.now();
    let policy = s.session_policy;
    let session = ConsoleSession {
        key: key_of(&secret),
        who,
        csrf: random_secret(),
        created_at: now,
        expires_at: now + policy.max(),
        idle_until: now + policy.idle(),
    };
    s.sessions
        .create(&session)
        .await
        .map_err(labsync_application::AppError::from)?;
    Ok((secret, session))
}

/// Starts a session for `token`, if it is a configured or stored one.
/// Returns the cookie's secret and the session.
///
/// # Errors
/// 401 for a token that is unknown or a JWT; the store's errors.
pub async fn sign_in(s: &ApiState, token: &str) -> Result<(String, ConsoleSession), ApiError> {
    let token = token.trim();
    // An API token only: a session made with a provider's JWT would
    // outlive the JWT (people sign in through the provider itself).
    if labsync_infrastructure::oidc::looks_like_jwt(token) {
        return Err(ApiError::new(
            ProblemKind::Unauthorized,
            "the sign-in form takes an API token, not a JWT",
        ));
    }
    super::auth::caller_of_token(s, token).await?;
    // The token itself (its hash): a token rotated under the same name
    // ends the sessions of the old one.
    open(
        s,
        SessionOf::Token {
            sha256: key_of(token),
        },
    )
    .await
}

fn provider_of(s: &ApiState) -> Result<&labsync_infrastructure::oidc::OidcVerifier, ApiError> {
    s.oidc
        .as_deref()
        .filter(|_| s.console_sign_in)
        .ok_or_else(|| {
            ApiError::new(
                ProblemKind::NotFound,
                "sign-in through an OpenID Connect provider is not configured",
            )
        })
}

fn sign_in_failed(e: &SignInError) -> ApiError {
    let kind = match e {
        SignInError::Provider => ProblemKind::IdentityProviderUnavailable,
        SignInError::Token(labsync_infrastructure::oidc::Refusal::NoRole(_)) => {
            ProblemKind::Forbidden
        }
        _ => ProblemKind::Unauthorized,
    };
    ApiError::new(kind, e.to_string())
}

/// Starts a sign-in through the provider: returns where to send the
/// browser, and the secret of the cookie that binds the sign-in to it.
///
/// # Errors
/// 404 without console sign-in; 503 when the provider cannot be read.
pub async fn start_sign_in(s: &ApiState) -> Result<(String, String), ApiError> {
    let provider = provider_of(s)?;
    if !s.sign_in_budget.take() {
        return Err(ApiError::new(
            ProblemKind::Overloaded,
            "too many sign-ins were started on this replica in the last minute: try again shortly",
        ));
    }
    let (state, nonce, browser, pkce) = (
        random_secret(),
        random_secret(),
        random_secret(),
        Pkce::new(),
    );
    let url = provider
        .authorization_url(&state, &nonce, &pkce)
        .await
        .map_err(|e| sign_in_failed(&e))?;
    let ttl = chrono::Duration::from_std(SIGN_IN_TTL).unwrap_or(chrono::Duration::minutes(10));
    s.sessions
        .begin_sign_in(&PendingSignIn {
            key: key_of(&state),
            browser: key_of(&browser),
            verifier: pkce.verifier,
            nonce,
            expires_at: s.services.clock.now() + ttl,
        })
        .await
        .map_err(labsync_application::AppError::from)?;
    Ok((url, browser))
}

/// Ends a sign-in through the provider: the callback's `state` must be a
/// pending sign-in of this browser; its code is exchanged and the ID
/// token checked. Returns the new session's secret.
///
/// # Errors
/// 400 for a callback that is not a pending sign-in of this browser (or
/// one the provider refused: `error`); 401/403 as the provider's answer
/// or the ID token's claims say; 503 when the provider cannot be read.
pub async fn finish_sign_in(
    s: &ApiState,
    headers: &HeaderMap,
    state: &str,
    code: &str,
) -> Result<(String, ConsoleSession), ApiError> {
    let provider = provider_of(s)?;
    let stale = || {
        ApiError::bad_request(
            "this sign-in is not one this browser started, or it took too long: sign in again",
        )
    };
    // Taken only with the browser's own cookie: a callback URL carried
    // elsewhere neither signs anyone in nor spends the sign-in.
    let browser = cookie(headers, s.session_policy.sign_in_cookie().0)
        .map(key_of)
        .ok_or_else(stale)?;
    let pending = s
        .sessions
        .take_sign_in(&key_of(state), &browser, s.services.clock.now())
        .await
        .map_err(labsync_application::AppError::from)?
        .ok_or_else(stale)?;
    let signed_in = provider
        .finish_sign_in(code, &pending.verifier, &pending.nonce)
        .await
        .map_err(|e| sign_in_failed(&e))?;
    let who = signed_in.identity;
    let caller = Caller::person(
        &who.subject,
        &who.display,
        who.username.as_deref(),
        who.role,
    );
    tracing::info!(actor = %caller.actor, role = who.role.as_str(), "signed in through the provider");
    open(
        s,
        SessionOf::Person(SignedInPerson {
            subject: who.subject,
            display: who.display,
            username: who.username,
            roles: who.role_values,
            id_token: signed_in.id_token,
        }),
    )
    .await
}

/// The `Set-Cookie` value that binds a sign-in to the browser. `Lax`, not
/// `Strict`: the provider's redirect back is a cross-site navigation.
pub fn sign_in_cookie(secret: &str, policy: SessionPolicy) -> HeaderValue {
    let (name, path) = policy.sign_in_cookie();
    let secure = if policy.secure_cookie { "; Secure" } else { "" };
    let value = format!(
        "{name}={secret}; Path={path}; HttpOnly; SameSite=Lax; Max-Age={}{secure}",
        SIGN_IN_TTL.as_secs()
    );
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The `Set-Cookie` value that removes the sign-in cookie.
pub fn cleared_sign_in_cookie(policy: SessionPolicy) -> HeaderValue {
    let (name, path) = policy.sign_in_cookie();
    let secure = if policy.secure_cookie { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}=; Path={path}; HttpOnly; SameSite=Lax; Max-Age=0{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The `Set-Cookie` value that gives the browser its session.
pub fn session_cookie(secret: &str, policy: SessionPolicy) -> HeaderValue {
    let secure = if policy.secure_cookie { "; Secure" } else { "" };
    let value = format!(
        "{}={secret}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        policy.cookie(),
        policy.max.as_secs()
    );
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Where the provider ends a person's session, when the session is a
/// person's and the provider has an end-session endpoint.
pub async fn provider_sign_out(s: &ApiState, session: &ConsoleSession) -> Option<String> {
    let SessionOf::Person(p) = &session.who else {
        return None;
    };
    s.oidc.as_ref()?.end_session_url(&p.id_token).await
}

/// The `Set-Cookie` value that removes it.
pub fn cleared_cookie(policy: SessionPolicy) -> HeaderValue {
    let secure = if policy.secure_cookie { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}",
        policy.cookie()
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Moves the session's idle end on, writing only when the stored one is
/// more than [`TOUCH_EVERY`] (or a quarter of the idle time) behind; a failed write is logged (the session
/// stays valid until its stored idle end).
async fn touch(s: &ApiState, session: &ConsoleSession) {
    let now = s.services.clock.now();
    let idle_until = now + s.session_policy.idle();
    // A short idle time (tests, strict sites) is kept to within a quarter
    // of itself.
    let every = chrono::Duration::from_std(TOUCH_EVERY.min(s.session_policy.idle / 4))
        .unwrap_or(chrono::Duration::minutes(1));
    if idle_until - session.idle_until < every {
        return;
    }
    if let Err(e) = s.sessions.touch(&session.key, idle_until).await {
        tracing::warn!(error = %e, "could not move a session's idle end on");
    }
}

/// Whether a browser says a script made the request (`Sec-Fetch-Mode`
/// other than `navigate`); clients that do not say count as people.
fn script_fetch(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-mode")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m != "navigate")
}

/// Whether a method changes state, and so needs the CSRF token.
fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether `given` is the session's CSRF token, compared in constant time.
pub fn csrf_matches(session: &ConsoleSession, given: &str) -> bool {
    session.csrf.len() == given.len() && bool::from(session.csrf.as_bytes().ct_eq(given.as_bytes()))
}

/// The caller a session cookie names, with its session: `None` without a
/// cookie.
///
/// # Errors
/// 401 for a session that is unknown, expired, or whose token is no longer
/// configured; 403 for a state-changing request without the session's
/// CSRF token in its header.
pub async fn session_caller(
    s: &ApiState,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Option<(Caller, ConsoleSession)>, ApiError> {
    let Some(secret) = cookie_secret(headers, s.session_policy) else {
        return Ok(None);
    };
    let expired = || {
        ApiError::new(
            ProblemKind::Unauthorized,
            "the session has ended: sign in again",
        )
    };
    let session = s
        .sessions
        .find(&key_of(secret), s.services.clock.now())
        .await
        .map_err(labsync_application::AppError::from)?
        .ok_or_else(expired)?;
    // The token it was made with, still valid: a revoked or expired one
    // ends its sessions too.
    let caller = match &session.who {
        // The token it was made with, still valid: a revoked or expired
        // one ends its sessions too.
        SessionOf::Token { sha256 } => match super::auth::caller_by_hash(s, sha256).await {
            Ok(c) => c,
            Err(e) if e.status() == axum::http::StatusCode::UNAUTHORIZED => return Err(expired()),
            Err(e) => return Err(e),
        },
        // Mapped again now: a changed role map applies at once, and with
        // the provider's sign-in turned off a person's session is over.
        SessionOf::Person(p) => Caller::person(
            &p.subject,
            &p.display,
            p.username.as_deref(),
            s.oidc
                .as_deref()
                .filter(|_| s.console_sign_in)
                .and_then(|o| o.role_for(&p.roles))
                .ok_or_else(expired)?,
        ),
    };
    // A script's own fetches (the console's live redraws) are not a
    // person's activity: an open tab left alone still goes idle.
    if changes_state(method) || !script_fetch(headers) {
        touch(s, &session).await;
    }
    if changes_state(method) {
        let given = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !csrf_matches(&session, given) {
            return Err(ApiError::new(
                ProblemKind::Forbidden,
                "a change from the console must carry the session's CSRF token (x-csrf-token)",
            ));
        }
    }
    Ok(Some((caller, session)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others_and_never_readable_by_scripts() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; labsync_session=s3cret; b=2"),
        );
        let plain = SessionPolicy {
            secure_cookie: false,
            idle: Duration::from_secs(60),
            max: Duration::from_secs(3600),
        };
        assert_eq!(cookie_secret(&h, plain), Some("s3cret"));
        let mut none = HeaderMap::new();
        none.append(header::COOKIE, HeaderValue::from_static("labsync_session="));
        assert_eq!(cookie_secret(&none, plain), None);
        let policy = |secure_cookie| SessionPolicy {
            secure_cookie,
            idle: Duration::from_secs(60),
            max: Duration::from_secs(3600),
        };
        let c = session_cookie("x", policy(false));
        let c = c.to_str().unwrap();
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"));
        assert!(c.contains("Max-Age=3600"), "the absolute end: {c}");
        let bind = sign_in_cookie("y", policy(false));
        let bind = bind.to_str().unwrap();
        assert!(
            bind.contains("SameSite=Lax") && bind.contains("Path=/auth/callback"),
            "sent on the provider's redirect back, to the callback only: {bind}"
        );
        let secure = session_cookie("x", policy(true));
        let secure = secure.to_str().unwrap();
        assert!(
            secure.starts_with("__Host-labsync_session=x;") && secure.ends_with("; Secure"),
            "under HTTPS no sibling host can plant it: {secure}"
        );
        let bind = sign_in_cookie("y", policy(true));
        assert!(
            bind.to_str()
                .unwrap()
                .starts_with("__Host-labsync_sign_in=y; Path=/;")
        );
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("labsync_session=planted"),
        );
        assert_eq!(
            cookie_secret(&h, policy(true)),
            None,
            "a cookie without the prefix is not the session's under HTTPS"
        );
        assert_ne!(random_secret(), random_secret());
        assert_eq!(key_of("a").len(), 64);
    }

    #[test]
    fn a_replica_starts_at_most_its_budget_of_sign_ins_a_minute() {
        let t0 = std::time::Instant::now();
        let mut w = None;
        for _ in 0..MAX_SIGN_INS_PER_MINUTE {
            let (ok, next) = admits(w, t0 + Duration::from_secs(30));
            assert!(ok);
            w = Some(next);
        }
        let (ok, full) = admits(w, t0 + Duration::from_secs(59));
        assert!(!ok, "one more within the minute is refused");
        let (ok, next) = admits(Some(full), t0 + Duration::from_secs(91));
        assert!(ok && next.1 == 1, "the next minute starts afresh");
    }

    #[test]
    fn only_the_sessions_own_csrf_token_matches() {
        let s = ConsoleSession {
            key: "k".into(),
            who: SessionOf::Token {
                sha256: "ui".into(),
            },
            csrf: "abc".into(),
            created_at: chrono::Utc::now(),
            expires_at: chrono::Utc::now(),
            idle_until: chrono::Utc::now(),
        };
        assert!(csrf_matches(&s, "abc"));
        for bad in ["", "ab", "abd", "abcd"] {
            assert!(!csrf_matches(&s, bad), "{bad:?}");
        }
        assert!(changes_state(&Method::DELETE) && changes_state(&Method::POST));
        assert!(!changes_state(&Method::GET));
    }
}
