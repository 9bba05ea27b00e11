//! Console sessions: a person signs in once with an API token and the
//! browser then carries an opaque cookie instead of the token.
//!
//! # Expected flow
//! 1. `POST /login` with an API token (configured or stored; not a
//!    provider's JWT, which would be outlived by the session): a session is
//!    stored (the SHA-256 of a new random secret, the token's name, a CSRF
//!    token, an expiry) and the secret goes to the browser in an
//!    `HttpOnly`, `SameSite=Strict` cookie.
//! 2. Every request without an `Authorization` header is the session's:
//!    its role is the token's role as configured *now*.
//! 3. A state-changing request of a session (any method but GET, HEAD,
//!    OPTIONS) must carry the session's CSRF token in `x-csrf-token` (the
//!    console's script reads it from the page); sign-out, a form, carries
//!    it in a `csrf` field. Sign-in is refused from another site
//!    (`Sec-Fetch-Site`, `Origin`), so no page elsewhere can sign a
//!    browser in as someone else.
//! 4. `POST /logout` ends the session for every replica.
//!
//! # Guarantees
//! - The token never reaches the browser's storage or a script: only the
//!   cookie does, and no script can read it.
//! - Another site cannot act with a session: the cookie is not sent on
//!   cross-site requests (`SameSite=Strict`), and a request without the
//!   CSRF token is refused (403) even if it were.
//! - A session belongs to the token itself (its hash), not to its name: a
//!   token removed from the configuration, or rotated under the same name,
//!   ends its sessions once the replica runs with the new configuration; a
//!   stored token revoked or expired ends them at their next request; the
//!   token's role is read on every request.
//! - Bearer tokens work as before, without CSRF (a header is not ambient).
//!
//! # Assumptions
//! labsync is served over HTTPS by a proxy in front of it in production;
//! the cookie is marked `Secure` when `console.secure_cookie` says so.
//!
//! # Caveats
//! A session lasts [`SESSION_TTL`] from sign-in, however active.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, header};
use base64::Engine;
use labsync_application::ports::ConsoleSession;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ApiState;
use super::auth::Caller;
use super::problem::{ApiError, ProblemKind};

/// The cookie that carries the session's secret.
pub const COOKIE: &str = "labsync_session";

/// The header a state-changing request of a session echoes its CSRF
/// token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// How long a session lasts from sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

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
pub fn cookie_secret(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

/// Starts a session for `token`, if it is a configured one. Returns the
/// cookie's secret and the session.
///
/// # Errors
/// 401 for a token that is not configured; the store's errors.
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
    let secret = random_secret();
    let now = s.services.clock.now();
    let ttl = chrono::Duration::from_std(SESSION_TTL).unwrap_or(chrono::Duration::hours(12));
    let session = ConsoleSession {
        key: key_of(&secret),
        // The token itself (its hash): a token rotated under the same name
        // ends the sessions of the old one.
        subject: key_of(token),
        csrf: random_secret(),
        created_at: now,
        expires_at: now + ttl,
    };
    s.sessions
        .create(&session)
        .await
        .map_err(labsync_application::AppError::from)?;
    Ok((secret, session))
}

/// The `Set-Cookie` value that gives the browser its session.
pub fn session_cookie(secret: &str, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let value = format!(
        "{COOKIE}={secret}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The `Set-Cookie` value that removes it.
pub fn cleared_cookie() -> HeaderValue {
    HeaderValue::from_static("labsync_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
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
    let Some(secret) = cookie_secret(headers) else {
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
    let caller = match super::auth::caller_by_hash(s, &session.subject).await {
        Ok(c) => c,
        Err(e) if e.status() == axum::http::StatusCode::UNAUTHORIZED => return Err(expired()),
        Err(e) => return Err(e),
    };
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
        assert_eq!(cookie_secret(&h), Some("s3cret"));
        let mut none = HeaderMap::new();
        none.append(header::COOKIE, HeaderValue::from_static("labsync_session="));
        assert_eq!(cookie_secret(&none), None);
        let c = session_cookie("x", false);
        let c = c.to_str().unwrap();
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"));
        assert!(
            session_cookie("x", true)
                .to_str()
                .unwrap()
                .ends_with("; Secure")
        );
        assert_ne!(random_secret(), random_secret());
        assert_eq!(key_of("a").len(), 64);
    }

    #[test]
    fn only_the_sessions_own_csrf_token_matches() {
        let s = ConsoleSession {
            key: "k".into(),
            subject: "ui".into(),
            csrf: "abc".into(),
            created_at: chrono::Utc::now(),
            expires_at: chrono::Utc::now(),
        };
        assert!(csrf_matches(&s, "abc"));
        for bad in ["", "ab", "abd", "abcd"] {
            assert!(!csrf_matches(&s, bad), "{bad:?}");
        }
        assert!(changes_state(&Method::DELETE) && changes_state(&Method::POST));
        assert!(!changes_state(&Method::GET));
    }
}
