//! Bearer API tokens with roles. Tokens are configured as SHA-256 hashes;
//! a presented token is hashed and compared with every configured hash in
//! constant time, so neither the match nor its position leaks through
//! timing. A token not in the configuration is looked up among the stored
//! ones (`labsync token new`, see `labsync_infrastructure::mongo`'s
//! tokens), by its hash: added or revoked without a restart.

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use labsync_application::domain::Actor;
use labsync_infrastructure::configuration::{ApiToken, Role};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ApiState;
use super::problem::{ApiError, ProblemKind};

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who it is, as the audit log, the lab history, the events and the
    /// delete requests name it: a person by the provider's `sub` and
    /// display name, a machine by its token's name.
    pub actor: Actor,
    pub role: Role,
    /// A person's CML username (the `oidc.username_claim`): what a
    /// self-service person may delete is judged by it.
    pub username: Option<String>,
}

impl Caller {
    /// A machine, by its API token's name.
    pub fn token(name: &str, role: Role) -> Self {
        Self {
            actor: Actor::api(name),
            role,
            username: None,
        }
    }

    /// A person the provider vouches for.
    pub fn person(subject: &str, display: &str, username: Option<&str>, role: Role) -> Self {
        Self {
            // The subject whole (to the actor's own limit): two people
            // whose subs share a long prefix stay two.
            actor: Actor::person(
                &printable(subject, labsync_application::domain::MAX_ACTOR_NAME),
                &printable(display, 48),
            ),
            role,
            // Refused rather than cleaned up: a cleaned-up name could be
            // someone else's.
            username: username
                .filter(|u| labsync_infrastructure::oidc::usable_username(u))
                .map(str::to_owned),
        }
    }

    /// How the caller appears in the audit log.
    pub fn actor(&self) -> Actor {
        self.actor.clone()
    }

    /// A name to show: a person's display name, a token's name.
    pub fn name(&self) -> String {
        match &self.actor {
            Actor::Person { display, .. } => display.clone(),
            Actor::Api(name) => name.clone(),
            other => other.to_string(),
        }
    }

    /// Whether the caller may read what labsync knows about a worker's
    /// CML beyond the inventory: the texts of run errors, which name its
    /// account, addresses and what it said. Admins, who manage workers.
    pub fn may_read_worker_details(&self) -> bool {
        self.role >= Role::Admin
    }

    /// Whether the caller may delete a lab whose owner is `owner`, as far
    /// as labsync can tell before asking CML (the delete asks CML again).
    pub fn may_delete(&self, owner: Option<&str>) -> bool {
        self.role >= Role::Operator
            || (self.role == Role::SelfService
                && self
                    .username
                    .as_deref()
                    .is_some_and(|u| labsync_application::delete::owns(owner, u)))
    }

    /// The CML username the caller's deletes are limited to: none for
    /// operators and admins, a self-service person's own.
    ///
    /// # Errors
    /// 403 below self-service, or for a self-service caller without a CML
    /// username.
    pub fn delete_scope(&self) -> Result<Option<String>, ApiError> {
        if self.role >= Role::Operator {
            return Ok(None);
        }
        self.require(Role::SelfService)?;
        self.username.clone().map(Some).ok_or_else(|| {
            ApiError::new(
                ProblemKind::Forbidden,
                format!(
                    "{} is self-service but their sign-in names no CML username \
                     (oidc.username_claim): they may delete nothing",
                    self.actor
                ),
            )
        })
    }

    /// # Errors
    /// 403 when the caller's role is below `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::new(
                ProblemKind::Forbidden,
                format!(
                    "{} has role {}; this needs {}",
                    self.actor,
                    self.role.as_str(),
                    role.as_str()
                ),
            ))
        }
    }
}

/// Finds the token whose hash matches, looking at every one.
pub fn authenticate(tokens: &[ApiToken], presented: &str) -> Option<Caller> {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut found: Option<&ApiToken> = None;
    for t in tokens {
        if bool::from(t.sha256.ct_eq(&digest)) {
            found = Some(t);
        }
    }
    found.map(|t| Caller::token(&t.name, t.role))
}

/// The SHA-256 of a token as 64 hex digits, as configuration wants it.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token of an `Authorization` header's value: the scheme `Bearer`
/// in any case (RFC 9110 says auth schemes are case-insensitive), one or
/// more spaces, then the token.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A stored token's use is noted at most this often.
const USE_NOTED_EVERY: chrono::Duration = chrono::Duration::minutes(1);

/// The caller a token's hash names: a configured token, else a stored one
/// that has not expired.
///
/// # Errors
/// 401 for an unknown or expired token; 503 when the store cannot say.
pub async fn caller_by_hash(s: &ApiState, sha256: &str) -> Result<Caller, ApiError> {
    let unauthorized = |detail: &str| ApiError::new(ProblemKind::Unauthorized, detail);
    if let Some(t) = s.tokens.iter().find(|t| hex::encode(t.sha256) == sha256) {
        return Ok(Caller::token(&t.name, t.role));
    }
    let stored = s
        .machine_tokens
        .find(sha256)
        .await
        .map_err(labsync_application::AppError::from)?
        .ok_or_else(|| unauthorized("unknown API token"))?;
    let now = s.services.clock.now();
    if stored.expires_at.is_some_and(|at| at <= now) {
        return Err(unauthorized("this API token has expired"));
    }
    let role = Role::parse(&stored.role).ok_or_else(|| unauthorized("unknown API token"))?;
    // Noted at most once a minute: no write at all in between.
    if stored
        .last_used_at
        .is_none_or(|at| at < now - USE_NOTED_EVERY)
        && let Err(e) = s
            .machine_tokens
            .used(sha256, now, now - USE_NOTED_EVERY)
            .await
    {
        tracing::warn!(error = %e, "could not note an API token's use");
    }
    Ok(Caller::token(&stored.name, role))
}

/// The caller a presented token names.
///
/// # Errors
/// As [`caller_by_hash`].
pub async fn caller_of_token(s: &ApiState, token: &str) -> Result<Caller, ApiError> {
    // Configured tokens first, in constant time and without a read.
    if let Some(c) = authenticate(&s.tokens, token) {
        return Ok(c);
    }
    if let Some(oidc) = &s.oidc
        && labsync_infrastructure::oidc::looks_like_jwt(token)
    {
        return caller_of_jwt(oidc, token).await.map_err(|(e, reason)| {
            s.metrics.token_rejected(reason);
            e
        });
    }
    let found = caller_by_hash(s, &hash_token(token)).await;
    if found
        .as_ref()
        .is_err_and(|e| e.status() == axum::http::StatusCode::UNAUTHORIZED)
    {
        s.metrics.token_rejected("unknown_token");
    }
    found
}

/// The person (or machine) a provider's JWT names; a refusal comes with
/// its word for the metrics.
async fn caller_of_jwt(
    oidc: &labsync_infrastructure::oidc::OidcVerifier,
    token: &str,
) -> Result<Caller, (ApiError, &'static str)> {
    use labsync_infrastructure::oidc::Refusal;
    match oidc.verify(token).await {
        Ok(who) => Ok(Caller::person(
            &who.subject,
            &who.display,
            who.username.as_deref(),
            who.role,
        )),
        Err(e) => {
            let kind = match e {
                Refusal::NoRole(_) => ProblemKind::Forbidden,
                Refusal::Provider => ProblemKind::IdentityProviderUnavailable,
                _ => ProblemKind::Unauthorized,
            };
            Err((ApiError::new(kind, e.to_string()), e.word()))
        }
    }
}

/// A text from a token's claims as the audit log keeps it: no control,
/// bidirectional or zero-width characters, at most `max` of them.
pub fn printable(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| !labsync_application::domain::text::is_invisible(*c))
        .take(max)
        .collect()
}

/// The caller that the request's `Authorization` header names.
///
/// # Errors
/// 401 without a header, with one of another form, or with an unknown or
/// expired token.
pub async fn caller(headers: &HeaderMap, s: &ApiState) -> Result<Caller, ApiError> {
    let unauthorized = |detail: &str| ApiError::new(ProblemKind::Unauthorized, detail);
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("send an API token: Authorization: Bearer <token>"))?;
    let token = header
        .to_str()
        .ok()
        .and_then(bearer_token)
        .ok_or_else(|| unauthorized("the Authorization header must be: Bearer <token>"))?;
    caller_of_token(s, token).await
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    /// A bearer token when the request has an `Authorization` header;
    /// otherwise the console session its cookie names (see
    /// [`super::session`]).
    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        if parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION)
        {
            return caller(&parts.headers, state).await;
        }
        match super::session::session_caller(state, &parts.method, &parts.headers).await? {
            Some((caller, session)) => {
                parts.extensions.insert(session);
                Ok(caller)
            }
            None => caller(&parts.headers, state).await,
        }
    }
}

/// Callers with at least a given role, checked while extracting, before
/// the body is read: a caller without the role learns nothing about what
/// the body should have been.
macro_rules! role_extractor {
    ($name:ident, $role:expr) => {
        #[derive(Debug, Clone)]
        pub struct $name(pub Caller);

        impl FromRequestParts<ApiState> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut Parts,
                state: &ApiState,
            ) -> Result<Self, ApiError> {
                let caller = Caller::from_request_parts(parts, state).await?;
                caller.require($role)?;
                Ok(Self(caller))
            }
        }
    };
}

role_extractor!(Viewer, Role::Viewer);
role_extractor!(Deleter, Role::SelfService);
role_extractor!(Operator, Role::Operator);
role_extractor!(Admin, Role::Admin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_is_audited_by_its_token_name_and_only_admins_read_worker_details() {
        let caller = |role| Caller::token("ui", role);
        assert_eq!(caller(Role::Operator).actor().to_string(), "api:ui");
        assert!(caller(Role::Admin).may_read_worker_details());
        assert!(!caller(Role::Operator).may_read_worker_details());
        assert!(!caller(Role::Viewer).may_read_worker_details());
        assert!(caller(Role::Operator).require(Role::Operator).is_ok());
        assert!(caller(Role::Viewer).require(Role::Operator).is_err());
    }

    #[test]
    fn a_self_service_person_may_delete_only_what_cml_says_they_own() {
        let sam = Caller::person("s-1", "sam", Some("sam"), Role::SelfService);
        assert!(sam.may_delete(Some("sam")));
        assert!(!sam.may_delete(Some("alex")) && !sam.may_delete(None));
        assert!(!sam.may_delete(Some("Sam")), "exactly");
        assert_eq!(sam.delete_scope().unwrap(), Some("sam".into()));
        let nameless = Caller::person("s-2", "x", None, Role::SelfService);
        assert!(!nameless.may_delete(Some("")) && nameless.delete_scope().is_err());
        let op = Caller::token("ui", Role::Operator);
        assert!(op.may_delete(None) && op.delete_scope().unwrap().is_none());
        let viewer = Caller::person("v", "v", Some("v"), Role::Viewer);
        assert!(!viewer.may_delete(Some("v")) && viewer.delete_scope().is_err());
        assert_eq!(
            sam.actor().to_string(),
            "person:s-1 (sam)",
            "a person is audited by sub and name"
        );
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_exact() {
        for (value, token) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER abc", Some("abc")),
            ("bEaReR   abc ", Some("abc")),
            ("Bearer a.b-c_d~e+f/g=", Some("a.b-c_d~e+f/g=")),
            ("Bearer", None),
            ("Bearer ", None),
            ("Bearerabc", None),
            ("Bearers abc", None),
            ("Basic abc", None),
            (" Bearer abc", None),
            ("", None),
        ] {
            assert_eq!(bearer_token(value), token, "{value:?}");
        }
    }

    #[test]
    fn only_the_exact_token_authenticates_with_its_role() {
        let tokens: Vec<ApiToken> = [
            ("ui", "operator", "token-one"),
            ("ops", "admin", "token-two"),
        ]
        .iter()
        .map(|(n, r, t)| ApiToken::parse(&format!("{n}:{r}:{}", hash_token(t))).unwrap())
        .collect();
        let c = authenticate(&tokens, "token-two").unwrap();
        assert_eq!((c.name().as_str(), c.role), ("ops", Role::Admin));
        assert!(authenticate(&tokens, "token-twO").is_none());
        assert!(authenticate(&tokens, "").is_none());
        assert!(c.require(Role::Admin).is_ok());
        let ui = authenticate(&tokens, "token-one").unwrap();
        assert_eq!(
            ui.require(Role::Admin).unwrap_err().status(),
            axum::http::StatusCode::FORBIDDEN
        );
        assert!(ui.require(Role::Viewer).is_ok());
    }
}
