//! Bearer JWTs from an OpenID Connect provider: who a token names and
//! with which role, checked against the provider's published keys.
//!
//! # Expected flow
//! 1. At the first token (or readiness check), read the provider's
//!    `/.well-known/openid-configuration` and the key set at its
//!    `jwks_uri`, and keep them.
//! 2. For each token: its header's algorithm must be RS256 or ES256 (`none`
//!    and HMAC are refused before any key is looked at); its key id must
//!    be in the kept set, or in the set read again, at most once per
//!    [`REFETCH_EVERY`], so that a key rotated in at the provider works
//!    without a restart and a flood of unknown key ids costs one read.
//! 3. `jsonwebtoken` checks the signature, `iss`, `aud`, `exp` and `nbf`
//!    (with `oidc.leeway_secs`); the role is the highest that the claim
//!    at `oidc.roles_claim` maps to.
//!
//! # Guarantees
//! - A refusal says which check failed ([`Refusal`]), never the token.
//! - A provider that cannot be reached refuses only the tokens whose keys
//!   are not kept; configured and stored API tokens do not depend on it,
//!   and no request waits on a read another request has started.
//! - Keys come only from the issuer's origin (discovery's `jwks_uri` is
//!   checked), are signing keys, verify only the algorithm they name, and
//!   documents larger than [`MAX_DOCUMENT`] are refused.
//!
//! # Assumptions
//! The provider publishes its keys before it signs with them (as the
//! providers labsync targets do).
//!
//! # Caveats
//! A key removed at the provider is trusted until the next read of the
//! set: one is made for an unknown key id, and before using keys older
//! than [`MAX_KEY_AGE`], at most once per [`REFETCH_EVERY`].

use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::RwLock;

use crate::configuration::{OidcSettings, Role};

mod sign_in;
pub use sign_in::{Pkce, SignInError, SignedIn};

/// The least time between two reads of the key set.
pub const REFETCH_EVERY: Duration = Duration::from_secs(10);

/// How long a read of the provider may take.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(5);

/// Who a valid token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`.
    pub subject: String,
    /// `preferred_username`, else `email`, else the subject.
    pub display: String,
    /// Their CML username: the claim `oidc.username_claim` names.
    pub username: Option<String>,
    pub role: Role,
    /// The values of the roles claim that the role map names (at most
    /// [`MAX_ROLE_VALUES`]), which a console session keeps to map again on
    /// every request.
    pub role_values: Vec<String>,
}

/// The most values of a roles claim that are read.
pub const MAX_ROLE_VALUES: usize = 64;

/// Why a token was refused: each names the check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the token is not a JWT")]
    Malformed,
    #[error("the token's algorithm {0:?} is refused: only RS256 and ES256 are accepted")]
    Algorithm(String),
    #[error("the token is signed with a key the provider does not publish")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token was issued by another issuer")]
    Issuer,
    #[error("the token is for another audience")]
    Audience,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token lacks a required claim or a claim is malformed")]
    Claims,
    #[error("the token is an ID token, not an access token")]
    IdToken,
    #[error("the token carries no labsync role in its {0} claim")]
    NoRole(String),
    #[error("the OpenID Connect provider cannot be read (see labsync's logs)")]
    Provider,
}

impl Refusal {
    /// A short, stable word (a metric label).
    pub const fn word(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Algorithm(_) => "algorithm",
            Self::UnknownKey => "unknown_key",
            Self::Signature => "signature",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Claims => "claims",
            Self::IdToken => "id_token",
            Self::NoRole(_) => "no_role",
            Self::Provider => "provider",
        }
    }
}

#[derive(Debug, Default)]
struct Keys {
    /// Signing keys only (`use` sig or absent), by what they may verify.
    set: Vec<Jwk>,
    /// Where the provider signs people in and out, as discovery said.
    endpoints: Endpoints,
    read: bool,
    read_at: Option<Instant>,
    last_error: Option<String>,
}

/// Checks bearer JWTs; cheap to share.
#[derive(Debug)]
pub struct OidcVerifier {
    settings: OidcSettings,
    roles: Vec<(String, Role)>,
    http: reqwest::Client,
    keys: RwLock<Keys>,
    /// One read of the provider at a time; the keys stay readable while it
    /// runs.
    reading: tokio::sync::Mutex<()>,
    metrics: Option<crate::metrics::Metrics>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
    #[serde(flatten)]
    endpoints: Endpoints,
}

/// The provider's endpoints for the console's sign-in, from discovery.
#[derive(Debug, Clone, Default, Deserialize)]
struct Endpoints {
    authorization_endpoint: Option<String>,
    token_endpoint: Option<String>,
    userinfo_endpoint: Option<String>,
    end_session_endpoint: Option<String>,
}

/// The most of a discovery document or key set that is read.
const MAX_DOCUMENT: usize = 1 << 20;

/// Keys older than this are read again before use: a key removed at the
/// provider stops being trusted within it.
pub const MAX_KEY_AGE: Duration = Duration::from_secs(600);

/// Scheme, host and port of `url`.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    Some(format!(
        "{}://{}",
        scheme.to_ascii_lowercase(),
        authority.to_ascii_lowercase()
    ))
}

impl OidcVerifier {
    /// # Errors
    /// A bad role map (checked with the configuration already).
    pub fn new(settings: OidcSettings) -> Result<Self, String> {
        let roles = settings.role_map()?;
        let http = reqwest::Client::builder()
            .timeout(PROVIDER_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            settings,
            roles,
            http,
            keys: RwLock::new(Keys::default()),
            reading: tokio::sync::Mutex::new(()),
            metrics: None,
        })
    }

    /// Counts the reads of the provider in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A JSON document of at most [`MAX_DOCUMENT`] bytes.
    async fn document<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        what: &str,
    ) -> Result<T, String> {
        let r = self
            .http
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("{what}: {e}"))?;
        self.json_of(r, what).await
    }

    /// An answer's JSON body, of at most [`MAX_DOCUMENT`] bytes.
    async fn json_of<T: serde::de::DeserializeOwned>(
        &self,
        mut r: reqwest::Response,
        what: &str,
    ) -> Result<T, String> {
        let mut body = Vec::new();
        while let Some(chunk) = r.chunk().await.map_err(|e| format!("{what}: {e}"))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_DOCUMENT {
                return Err(format!("{what}: larger than {MAX_DOCUMENT} bytes"));
            }
        }
        serde_json::from_slice(&body).map_err(|e| format!("{what}: {e}"))
    }

    async fn read_keys(&self) -> Result<(Vec<Jwk>, Endpoints), String> {
        let base = self.settings.issuer.trim_end_matches('/');
        let discovery: Discovery = self
            .document(
                &format!("{base}/.well-known/openid-configuration"),
                "discovery",
            )
            .await?;
        if discovery.issuer != self.settings.issuer {
            return Err(format!(
                "discovery names issuer {:?}, not oidc.issuer",
                discovery.issuer
            ));
        }
        // The keys come from where the issuer is, never from wherever the
        // document points.
        if origin(&discovery.jwks_uri) != origin(&self.settings.issuer) {
            return Err("discovery's jwks_uri is not on the issuer's origin".into());
        }
        let set: serde_json::Value = self.document(&discovery.jwks_uri, "key set").await?;
        // Key by key: one the library does not know (another curve, an
        // encryption key) is left out, not a reason to trust none.
        let keys = set
            .get("keys")
            .and_then(|k| k.as_array())
            .map(|keys| {
                keys.iter()
                    .filter(|k| k.get("use").is_none_or(|u| u == "sig"))
                    .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
                    .collect()
            })
            .unwrap_or_default();
        Ok((keys, discovery.endpoints))
    }

    /// Reads the key set again unless that was done within
    /// [`REFETCH_EVERY`] (one read at a time; the kept keys stay usable
    /// while it runs).
    async fn refresh_keys(&self) {
        let _one = self.reading.lock().await;
        if self
            .keys
            .read()
            .await
            .read_at
            .is_some_and(|t| t.elapsed() < REFETCH_EVERY)
        {
            return;
        }
        let result = self.read_keys().await;
        if let Some(m) = &self.metrics {
            m.key_set_read(result.is_ok());
        }
        let mut keys = self.keys.write().await;
        keys.read_at = Some(Instant::now());
        match result {
            Ok((set, endpoints)) => {
                keys.set = set;
                keys.endpoints = endpoints;
                keys.read = true;
                keys.last_error = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the OpenID Connect provider's keys cannot be read");
                keys.last_error = Some(e);
            }
        }
    }

    async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, Refusal> {
        // A key verifies only what it says it is for.
        let fits = |k: &&Jwk| {
            k.common
                .key_algorithm
                .is_none_or(|a| format!("{a:?}") == format!("{alg:?}"))
        };
        let find = |set: &[Jwk]| -> Option<Jwk> {
            match kid {
                Some(kid) => set
                    .iter()
                    .filter(fits)
                    .find(|k| k.common.key_id.as_deref() == Some(kid))
                    .cloned(),
                None => {
                    let fitting: Vec<&Jwk> = set.iter().filter(fits).collect();
                    (fitting.len() == 1).then(|| fitting[0].clone())
                }
            }
        };
        let stale = {
            let keys = self.keys.read().await;
            !keys.read || keys.read_at.is_none_or(|t| t.elapsed() > MAX_KEY_AGE)
        };
        if !stale && let Some(jwk) = find(&self.keys.read().await.set) {
            return DecodingKey::from_jwk(&jwk).map_err(|_| Refusal::UnknownKey);
        }
        self.refresh_keys().await;
        let keys = self.keys.read().await;
        match find(&keys.set) {
            Some(jwk) => DecodingKey::from_jwk(&jwk).map_err(|_| Refusal::UnknownKey),
            None if !keys.read => Err(Refusal::Provider),
            None => Err(Refusal::UnknownKey),
        }
    }

    /// The provider's issuer URL, as configured.
    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// Who `token` names, or why it is refused.
    ///
    /// # Errors
    /// The [`Refusal`] of the first check that failed.
    pub async fn verify(&self, token: &str) -> Result<Identity, Refusal> {
        let claims = self.claims_of(token, &self.settings.audience).await?;
        // An ID token says who signed in to a client, not that its bearer
        // may call labsync: the console's own (stored for sign-out) must
        // never open the API, whatever `audience` and the client id are.
        if claims.get("nonce").is_some() || claims.get("typ").and_then(|t| t.as_str()) == Some("ID")
        {
            return Err(Refusal::IdToken);
        }
        self.identity(&claims)
    }

    /// The claims of a token signed by the provider for `audience`, or why
    /// it is refused.
    async fn claims_of(&self, token: &str, audience: &str) -> Result<serde_json::Value, Refusal> {
        // The algorithm is read first, and judged before any key: `none`
        // and HMAC (which would take the public key as a secret) never
        // reach the library.
        let alg = header_alg(token)?;
        let algorithm = match alg.as_str() {
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            _ => return Err(Refusal::Algorithm(alg)),
        };
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        let key = self.key(header.kid.as_deref(), algorithm).await?;
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.settings.leeway_secs;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Ok(
            jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
                .map_err(|e| refusal_of(&e))?
                .claims,
        )
    }

    /// Who verified claims name, with the role they map to.
    fn identity(&self, claims: &serde_json::Value) -> Result<Identity, Refusal> {
        let role_values = self.role_values(claims);
        let role = self
            .role_for(&role_values)
            .ok_or_else(|| Refusal::NoRole(self.settings.roles_claim.clone()))?;
        let text = |k: &str| claims.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let subject = text("sub")
            .filter(|s| !s.is_empty())
            .ok_or(Refusal::Claims)?;
        let display = text("preferred_username")
            .or_else(|| text("email"))
            .unwrap_or_else(|| subject.clone());
        // An email address is someone's only once the provider has checked it.
        let verified = self.settings.username_claim != "email"
            || claims
                .get("email_verified")
                .and_then(serde_json::Value::as_bool)
                == Some(true);
        Ok(Identity {
            display,
            username: claim_at(claims, &self.settings.username_claim)
                .and_then(|v| v.as_str())
                .filter(|u| verified && usable_username(u))
                .map(str::to_owned),
            subject,
            role,
            role_values,
        })
    }

    /// The highest role the roles claim maps to.
    #[cfg(test)]
    fn role_of(&self, claims: &serde_json::Value) -> Option<Role> {
        self.role_for(&self.role_values(claims))
    }

    /// The values of the roles claim: an array of strings, or one string
    /// of space-separated values.
    fn role_values(&self, claims: &serde_json::Value) -> Vec<String> {
        let values: Vec<&str> = match claim_at(claims, &self.settings.roles_claim) {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            Some(serde_json::Value::String(s)) => s.split_whitespace().collect(),
            _ => Vec::new(),
        };
        // Only the values the role map knows: however many groups a person
        // has (Entra ID sends up to 200), the one that maps is never cut
        // off, and a session keeps no more than the map names.
        values
            .into_iter()
            .filter(|v| self.roles.iter().any(|(mapped, _)| mapped == v))
            .take(MAX_ROLE_VALUES)
            .map(str::to_owned)
            .collect()
    }

    /// The highest role that the roles claim's values map to.
    pub fn role_for(&self, values: &[String]) -> Option<Role> {
        self.roles
            .iter()
            .filter(|(value, _)| values.iter().any(|v| v == value))
            .map(|(_, role)| *role)
            .max()
    }

    /// What the last read of the provider said, for readiness: `None`
    /// when it worked. Starts a read in the background when one is due,
    /// so that a probe never waits on the provider.
    pub async fn last_problem(self: &std::sync::Arc<Self>) -> Option<String> {
        let due = self
            .keys
            .read()
            .await
            .read_at
            .is_none_or(|t| t.elapsed() >= REFETCH_EVERY);
        if due {
            let me = self.clone();
            tokio::spawn(async move { me.refresh_keys().await });
        }
        let keys = self.keys.read().await;
        match (&keys.last_error, keys.read) {
            (Some(_), _) => {
                Some("its keys could not be read at the last try (see the logs)".into())
            }
            (None, false) => Some("its keys have not been read yet".into()),
            (None, true) => None,
        }
    }
}

/// Whether a claimed CML username may be compared with CML's owners: a
/// name with control, bidirectional, zero-width or other invisible
/// characters, or an overlong one, is no one's (cleaning it up could turn
/// `olivia` + U+200B into `olivia`).
pub fn usable_username(u: &str) -> bool {
    !u.is_empty()
        && u.chars().count() <= 128
        && u.chars()
            .all(|c| !(c.is_whitespace() || labsync_domain::text::is_invisible(c)))
}

/// The claim at a dotted path (`realm_access.roles`).
fn claim_at<'a>(claims: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(claims, |at, part| at.get(part))
}

/// The `alg` of a JWT's header, as written.
fn header_alg(token: &str) -> Result<String, Refusal> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| Refusal::Malformed)?;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| Refusal::Malformed)?;
    header
        .get("alg")
        .and_then(|a| a.as_str())
        .map(|a| a.chars().take(16).collect())
        .ok_or(Refusal::Malformed)
}

fn refusal_of(e: &jsonwebtoken::errors::Error) -> Refusal {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => Refusal::Signature,
        ErrorKind::InvalidIssuer => Refusal::Issuer,
        ErrorKind::InvalidAudience => Refusal::Audience,
        ErrorKind::ExpiredSignature => Refusal::Expired,
        ErrorKind::ImmatureSignature => Refusal::NotYetValid,
        ErrorKind::InvalidAlgorithm => Refusal::Algorithm("other".into()),
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => Refusal::Claims,
        _ => Refusal::Malformed,
    }
}

/// Whether a bearer token is shaped as a JWT (three dot-separated parts):
/// such tokens go to the provider's check, others to the API tokens.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn keys_come_only_from_the_issuers_origin() {
        assert_eq!(
            origin("https://SSO.example.net/realms/lab"),
            origin("https://sso.example.net/realms/lab/protocol/openid-connect/certs")
        );
        assert_ne!(
            origin("https://sso.example.net/realms/lab"),
            origin("https://sso.example.net.evil.test/certs")
        );
        assert_ne!(
            origin("https://sso.example.net"),
            origin("http://sso.example.net/certs")
        );
        assert_ne!(
            origin("https://sso.example.net"),
            origin("https://sso.example.net:8443/x")
        );
    }

    #[test]
    fn the_highest_mapped_role_wins_and_an_empty_or_unmapped_claim_gives_none() {
        let settings = OidcSettings {
            issuer: "https://sso.example.net".into(),
            audience: "labsync".into(),
            roles_claim: "realm_access.roles".into(),
            roles: vec!["v=viewer".into(), "a=admin".into(), "o=operator".into()],
            leeway_secs: 0,
            username_claim: "preferred_username".into(),
            client_id: String::new(),
            client_secret: secrecy::SecretString::from(""),
            redirect_url: String::new(),
        };
        let v = OidcVerifier::new(settings).unwrap();
        let claims =
            |roles: serde_json::Value| serde_json::json!({"realm_access": {"roles": roles}});
        assert_eq!(
            v.role_of(&claims(serde_json::json!(["v", "a", "o"]))),
            Some(Role::Admin)
        );
        assert_eq!(
            v.role_of(&claims(serde_json::json!("v  o"))),
            Some(Role::Operator)
        );
        assert_eq!(v.role_of(&claims(serde_json::json!(""))), None);
        assert_eq!(v.role_of(&claims(serde_json::json!(["x"]))), None);
        assert_eq!(v.role_of(&serde_json::json!({})), None);
        let mut many: Vec<String> = (0..200).map(|i| format!("group-{i}")).collect();
        many.push("a".into());
        assert_eq!(
            v.role_of(&claims(serde_json::json!(many))),
            Some(Role::Admin),
            "the mapped value after 200 others still counts"
        );
    }

    #[test]
    fn a_username_with_hidden_characters_is_no_ones() {
        assert!(usable_username("olivia") && usable_username("o.livia@example.net"));
        for bad in [
            "",
            "olivia\u{200B}",
            "oli\u{202E}via",
            "olivia ",
            "a\nb",
            "\u{FEFF}olivia",
        ] {
            assert!(!usable_username(bad), "{bad:?}");
        }
        assert!(!usable_username(&"u".repeat(129)));
    }

    #[test]
    fn none_and_hmac_are_refused_by_their_header_before_any_key() {
        let token = |alg: &str| {
            format!(
                "{}.{}.",
                b64(&serde_json::json!({"alg": alg})),
                b64(&serde_json::json!({}))
            )
        };
        assert_eq!(header_alg(&token("none")), Ok("none".into()));
        assert_eq!(header_alg(&token("HS256")), Ok("HS256".into()));
        assert_eq!(header_alg("not-a-jwt"), Err(Refusal::Malformed));
        assert_eq!(header_alg("a.b.c.d"), Err(Refusal::Malformed));
        assert!(looks_like_jwt("a.b.c") && !looks_like_jwt("opaque-token"));
    }
}
