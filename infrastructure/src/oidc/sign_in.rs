//! The console's sign-in through the provider: the authorization code
//! flow with PKCE, labsync being a confidential client.
//!
//! # Expected flow
//! 1. [`OidcVerifier::authorization_url`]: where the browser goes (the
//!    discovery document's `authorization_endpoint`), with the sign-in's
//!    `state`, `nonce` and S256 code challenge.
//! 2. The provider sends the browser back to `oidc.redirect_url` with a
//!    code; [`OidcVerifier::finish_sign_in`] exchanges it at the token
//!    endpoint (HTTP Basic with the client's secret, and the PKCE
//!    verifier).
//! 3. The ID token is checked as a bearer JWT is (algorithm, key,
//!    signature, `iss`, `exp`, `nbf`), for the client's own audience, and
//!    must carry the sign-in's nonce. The role and username are read from
//!    its claims, or from the userinfo endpoint when the ID token has no
//!    roles claim (Keycloak's default mappers put roles there, not in the
//!    ID token).
//! 4. At sign-out, [`OidcVerifier::end_session_url`] is where the browser
//!    goes to end the provider's session too, when the provider has one.
//!
//! # Guarantees
//! - The client's secret, the code and the tokens are sent only to
//!   endpoints on the issuer's origin: a discovery document that points
//!   elsewhere cannot collect them.
//! - An ID token made for another client, for another sign-in (nonce), by
//!   another issuer or expired signs no one in; a refusal says which check
//!   failed, never the token.
//!
//! # Assumptions
//! The provider's token and userinfo endpoints are on its issuer's origin,
//! as Keycloak, Entra ID, Okta, Dex and Authentik put them. The
//! authorization and end-session endpoints may be anywhere: only the
//! browser goes there.
//!
//! # Caveats
//! Roles are read at sign-in: a role taken away at the provider holds until
//! the session ends (`api.session_max_secs`, or idle `api.session_idle_secs`).

use base64::Engine;
use secrecy::ExposeSecret;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Endpoints, Identity, OidcVerifier, Refusal, claim_at, origin};

/// A PKCE pair (RFC 7636, S256).
#[derive(Debug, Clone)]
pub struct Pkce {
    /// Kept on the server until the callback.
    pub verifier: String,
    /// Sent to the provider with the browser.
    pub challenge: String,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Pkce {
    /// A new random verifier (32 bytes: 43 characters) and its challenge.
    pub fn new() -> Self {
        let bytes: [u8; 32] = rand::random();
        let verifier = b64(&bytes);
        let challenge = b64(&Sha256::digest(verifier.as_bytes()));
        Self {
            verifier,
            challenge,
        }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a sign-in through the provider failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignInError {
    #[error("the OpenID Connect provider cannot be read (see labsync's logs)")]
    Provider,
    #[error("the OpenID Connect provider does not support this: {0}")]
    Unsupported(&'static str),
    #[error("the OpenID Connect provider refused the sign-in ({0})")]
    Refused(String),
    #[error("the provider's ID token is refused: {0}")]
    Token(Refusal),
    #[error("the ID token was made for another sign-in (its nonce differs)")]
    Nonce,
}

/// A person signed in: who, and the ID token to end the provider's
/// session with.
#[derive(Debug, Clone)]
pub struct SignedIn {
    pub identity: Identity,
    pub id_token: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    id_token: Option<String>,
    access_token: Option<String>,
}

/// An OAuth error code as it may be shown: a few printable ASCII
/// characters (RFC 6749 allows no others).
fn error_code(body: &serde_json::Value) -> String {
    body.get("error")
        .and_then(|e| e.as_str())
        .unwrap_or("no error code")
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(48)
        .collect()
}

impl OidcVerifier {
    /// The provider's endpoints, read now if they never were.
    async fn endpoints(&self) -> Result<Endpoints, SignInError> {
        if !self.keys.read().await.read {
            self.refresh_keys().await;
        }
        let keys = self.keys.read().await;
        if !keys.read {
            return Err(SignInError::Provider);
        }
        Ok(keys.endpoints.clone())
    }

    /// `url` when it is on the issuer's origin: where the secret may go.
    fn on_issuers_origin(&self, url: Option<String>) -> Option<String> {
        url.filter(|u| origin(u) == origin(&self.settings.issuer))
    }

    /// Where to send the browser to sign in.
    ///
    /// # Errors
    /// The provider cannot be read, or names no authorization endpoint.
    pub async fn authorization_url(
        &self,
        state: &str,
        nonce: &str,
        pkce: &Pkce,
    ) -> Result<String, SignInError> {
        let at = self
            .endpoints()
            .await?
            .authorization_endpoint
            .ok_or(SignInError::Unsupported("no authorization_endpoint"))?;
        let mut url = reqwest::Url::parse(&at)
            .map_err(|_| SignInError::Unsupported("authorization_endpoint is not a URL"))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(SignInError::Unsupported(
                "authorization_endpoint is not http(s)",
            ));
        }
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.settings.client_id)
            .append_pair("redirect_uri", &self.settings.redirect_url)
            .append_pair("scope", "openid profile email")
            .append_pair("state", state)
            .append_pair("nonce", nonce)
            .append_pair("code_challenge", &pkce.challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(url.into())
    }

    /// Exchanges the callback's code, checks the ID token, and says who
    /// signed in.
    ///
    /// # Errors
    /// [`SignInError`], naming what failed.
    pub async fn finish_sign_in(
        &self,
        code: &str,
        verifier: &str,
        nonce: &str,
    ) -> Result<SignedIn, SignInError> {
        let endpoints = self.endpoints().await?;
        let token_at =
            self.on_issuers_origin(endpoints.token_endpoint)
                .ok_or(SignInError::Unsupported(
                    "no token_endpoint on the issuer's origin",
                ))?;
        let answer = self
            .http
            .post(&token_at)
            .basic_auth(
                &self.settings.client_id,
                Some(self.settings.client_secret.expose_secret()),
            )
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &self.settings.redirect_url),
                ("code_verifier", verifier),
            ])
            .send()
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "the provider's token endpoint cannot be reached");
                SignInError::Provider
            })?;
        let status = answer.status();
        let body: serde_json::Value = self.json_of(answer, "token answer").await.map_err(|e| {
            tracing::warn!(error = %e, "the provider's token answer cannot be read");
            SignInError::Provider
        })?;
        if !status.is_success() {
            return Err(SignInError::Refused(error_code(&body)));
        }
        let tokens: TokenAnswer = serde_json::from_value(body)
            .map_err(|_| SignInError::Refused("a malformed token answer".into()))?;
        let id_token = tokens
            .id_token
            .ok_or_else(|| SignInError::Refused("no ID token".into()))?;
        let mut claims = self
            .claims_of(&id_token, &self.settings.client_id)
            .await
            .map_err(SignInError::Token)?;
        if claims.get("nonce").and_then(|n| n.as_str()) != Some(nonce) {
            return Err(SignInError::Nonce);
        }
        if claim_at(&claims, &self.settings.roles_claim).is_none()
            && let (Some(at), Some(access)) = (
                self.on_issuers_origin(endpoints.userinfo_endpoint),
                tokens.access_token,
            )
        {
            self.add_userinfo(&mut claims, &at, &access).await;
        }
        let identity = self.identity(&claims).map_err(SignInError::Token)?;
        Ok(SignedIn { identity, id_token })
    }

    /// Adds the userinfo endpoint's claims that the ID token lacks, when
    /// they are about the same `sub` (OpenID Connect Core 5.3.2).
    async fn add_userinfo(&self, claims: &mut serde_json::Value, at: &str, access: &str) {
        let info = match self.http.get(at).bearer_auth(access).send().await {
            Ok(r) if r.status().is_success() => self.json_of(r, "userinfo").await,
            Ok(r) => Err(format!("userinfo: {}", r.status())),
            Err(e) => Err(format!("userinfo: {e}")),
        };
        let info = match info {
            Ok(serde_json::Value::Object(info)) => info,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "the provider's userinfo cannot be read");
                return;
            }
        };
        if info.get("sub") != claims.get("sub") {
            tracing::warn!("the provider's userinfo names another subject: ignored");
            return;
        }
        merge_missing(claims, serde_json::Value::Object(info));
    }

    /// Where to send the browser to end the provider's session too, then
    /// come back to labsync's sign-in page; `None` when the provider has
    /// no end-session endpoint.
    pub async fn end_session_url(&self, id_token: &str) -> Option<String> {
        let at = self.endpoints().await.ok()?.end_session_endpoint?;
        let mut url = reqwest::Url::parse(&at)
            .ok()
            .filter(|u| matches!(u.scheme(), "https" | "http"))?;
        let back = self
            .settings
            .redirect_url
            .strip_suffix("/auth/callback")
            .map(|base| format!("{base}/login"))?;
        url.query_pairs_mut()
            .append_pair("id_token_hint", id_token)
            .append_pair("post_logout_redirect_uri", &back)
            .append_pair("client_id", &self.settings.client_id);
        Some(url.into())
    }
}

/// Adds what `from` has and `into` lacks, object by object: roles in
/// userinfo's `realm_access.roles` reach an ID token whose `realm_access`
/// has other keys only.
fn merge_missing(into: &mut serde_json::Value, from: serde_json::Value) {
    let (Some(into), serde_json::Value::Object(from)) = (into.as_object_mut(), from) else {
        return;
    };
    for (k, v) in from {
        match into.get_mut(&k) {
            Some(existing) if existing.is_object() => merge_missing(existing, v),
            Some(_) => {}
            None => {
                into.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_adds_only_what_the_id_token_lacks_at_any_depth() {
        let mut id = serde_json::json!({"sub": "a", "realm_access": {"other": 1}, "email": "x@y"});
        merge_missing(
            &mut id,
            serde_json::json!({"sub": "b", "realm_access": {"roles": ["r"], "other": 2}, "email": "z@y", "name": "N"}),
        );
        assert_eq!(
            id,
            serde_json::json!({"sub": "a", "realm_access": {"other": 1, "roles": ["r"]}, "email": "x@y", "name": "N"})
        );
    }

    #[test]
    fn a_pkce_challenge_is_the_s256_of_its_verifier_and_each_pair_is_new() {
        let p = Pkce::new();
        assert_eq!(p.verifier.len(), 43);
        assert_eq!(p.challenge, b64(&Sha256::digest(p.verifier.as_bytes())));
        assert_ne!(p.verifier, Pkce::new().verifier);
        // RFC 7636's own example.
        let v = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert_eq!(
            b64(&Sha256::digest(v.as_bytes())),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn a_providers_error_code_is_shown_short_and_printable() {
        let body = serde_json::json!({"error": "invalid_grant\u{1b}[31m<script>", "error_description": "secret stuff"});
        let code = error_code(&body);
        assert!(code.starts_with("invalid_grant"), "{code}");
        assert!(!code.contains('\u{1b}') && code.len() <= 48);
        assert_eq!(error_code(&serde_json::json!({})), "no error code");
    }
}
