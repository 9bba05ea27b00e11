//! Tokens as CML issues them: HS256 JWTs with `iss`, `sub` (the user id),
//! `iat`, `exp` and `jti`. A token is valid while it is unexpired and its
//! `jti` is still active: logout and the `expire_tokens` fault deactivate it,
//! which is how a server restart or a revoked session looks to a client.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const ISSUER: &str = "com.cisco.virl";

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
}

/// Why a bearer token was refused; the text goes into CML's 401 body.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("No authorization token provided.")]
    Missing,
    #[error("Invalid authorization token.")]
    Invalid,
    #[error("Authorization token has expired.")]
    Expired,
    #[error("Authorization token has been revoked.")]
    Revoked,
}

pub struct TokenIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl_secs: i64,
    /// Active token ids and the user each belongs to.
    active: HashMap<String, String>,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("ttl_secs", &self.ttl_secs)
            .field("active", &self.active.len())
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    pub fn new(secret: &[u8], ttl_secs: i64) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            ttl_secs,
            active: HashMap::new(),
        }
    }

    pub fn issue(&mut self, user_id: &str) -> String {
        let iat = chrono::Utc::now().timestamp();
        let claims = Claims {
            iss: ISSUER.to_owned(),
            sub: user_id.to_owned(),
            iat,
            exp: iat + self.ttl_secs,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        self.active.insert(claims.jti.clone(), user_id.to_owned());
        // HS256 with an in-memory key cannot fail to encode.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }

    /// Returns the token's claims if it may be used now.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            },
        )?;
        if self.active.contains_key(&data.claims.jti) {
            Ok(data.claims)
        } else {
            Err(TokenError::Revoked)
        }
    }

    pub fn revoke(&mut self, jti: &str) {
        self.active.remove(jti);
    }

    pub fn revoke_user(&mut self, user_id: &str) {
        self.active.retain(|_, u| u != user_id);
    }

    pub fn revoke_all(&mut self) {
        self.active.clear();
    }
}
