//! The CML HTTP client: [`CmlHttpGateway`] implements the application's
//! [`CmlGateway`] port over reqwest (rustls).
//!
//! One pooled, authenticated client per worker, created on first use and
//! reused until the worker's URL, user or TLS settings change, or until a
//! refresh of the worker ends ([`CmlGateway::release`]). The token is
//! cached until CML answers 401; then the client logs in once more and
//! retries once. Lab ids go into URL paths as they are: they are validated
//! [`LabId`]s (lowercase hex and dashes), so nothing needs escaping.

mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use labsync_application::CmlError;
use labsync_application::ports::{CmlGateway, WorkerAccess};
use labsync_domain::{LabId, LabSnapshot, LabState, WorkerId};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use tracing::warn;

use crate::configuration::CmlSettings;
use crate::metrics::Metrics;

pub use wire::{parse_lab_details, parse_lab_ids, parse_lab_tiles};

/// CML clients for every worker, keyed by worker id.
#[derive(Debug)]
pub struct CmlHttpGateway {
    settings: CmlSettings,
    clients: Mutex<HashMap<WorkerId, Arc<CmlClient>>>,
    /// Tokens of released clients, so that a new client of the same worker
    /// (same settings) does not log in again.
    saved_tokens: Mutex<HashMap<WorkerId, (Fingerprint, String)>>,
    metrics: Metrics,
}

fn http_builder(settings: &CmlSettings) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(settings.connect_timeout())
        .timeout(settings.request_timeout())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .user_agent(concat!("labsync/", env!("CARGO_PKG_VERSION")))
}

fn build(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, CmlError> {
    builder
        .build()
        .map_err(|e| CmlError::Unreachable(format!("cannot build the HTTP client: {e}")))
}

impl CmlHttpGateway {
    pub fn new(settings: CmlSettings, metrics: Metrics) -> Self {
        Self {
            settings,
            clients: Mutex::new(HashMap::new()),
            saved_tokens: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The HTTP client for a worker's TLS settings.
    fn http_for(&self, access: &WorkerAccess) -> Result<reqwest::Client, CmlError> {
        let w = &access.worker;
        let mut builder = http_builder(&self.settings);
        if let Some(pem) = &w.tls.ca_cert_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
                CmlError::Unreachable(format!("worker {}: invalid CA bundle: {e}", w.id))
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if w.tls.insecure {
            warn!(
                worker_id = %w.id,
                base_url = %w.base_url,
                "TLS certificate verification is DISABLED for this worker (insecure = true): \
                 anyone on the path can impersonate it and read its password"
            );
            builder = builder.danger_accept_invalid_certs(true);
        }
        build(builder)
    }

    fn client(&self, access: &WorkerAccess) -> Result<Arc<CmlClient>, CmlError> {
        let fingerprint = Fingerprint::of(access);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&access.worker.id)
            && c.fingerprint == fingerprint
        {
            return Ok(c.clone());
        }
        let saved = self
            .saved_tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&access.worker.id)
            .filter(|(f, _)| *f == fingerprint)
            .map(|(_, t)| t);
        let client = Arc::new(CmlClient::new(
            access,
            fingerprint,
            self.http_for(access)?,
            self.metrics.clone(),
            saved,
        ));
        clients.insert(access.worker.id.clone(), client.clone());
        Ok(client)
    }
}

/// What a client was built from; a change means a new client.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    base_url: String,
    username: String,
    password: SecretBytesEq,
    ca_cert_pem: Option<String>,
    insecure: bool,
}

/// Compares passwords without ever printing them.
#[derive(Clone, PartialEq, Eq)]
struct SecretBytesEq(Vec<u8>);

impl std::fmt::Debug for SecretBytesEq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl Fingerprint {
    fn of(a: &WorkerAccess) -> Self {
        Self {
            base_url: a.worker.base_url.clone(),
            username: a.worker.username.clone(),
            password: SecretBytesEq(a.password.expose_secret().as_bytes().to_vec()),
            ca_cert_pem: a.worker.tls.ca_cert_pem.clone(),
            insecure: a.worker.tls.insecure,
        }
    }
}

/// One worker's connection pool and token.
struct CmlClient {
    fingerprint: Fingerprint,
    http: reqwest::Client,
    api: String,
    worker: WorkerId,
    username: String,
    password: SecretString,
    /// Held across a login so that concurrent requests log in once.
    token: tokio::sync::Mutex<Option<String>>,
    metrics: Metrics,
}

impl std::fmt::Debug for CmlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmlClient")
            .field("api", &self.api)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

/// An answer: status and body.
struct Answer {
    status: StatusCode,
    body: bytes::Bytes,
}

fn transport_error(e: &reqwest::Error) -> CmlError {
    // reqwest's message names the URL, never credentials (they travel in
    // the body and the Authorization header).
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_timeout() {
        CmlError::Unreachable(format!("timed out: {text}"))
    } else if e.is_decode() || e.is_body() {
        CmlError::Protocol(text)
    } else {
        CmlError::Unreachable(text)
    }
}

/// CML's `{code, description}`, or the raw body (shortened) when the body is
/// something else, such as a reverse proxy's HTML page.
fn describe(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        description: String,
    }
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        return e.description;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        text[..end].to_owned()
    }
}

/// A bounded metric label for a CML call.
fn endpoint_label(method: &Method, path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        (_, ["authenticate"]) => "authenticate",
        ("GET", ["labs"]) => "list_labs",
        ("GET", ["labs", _]) => "lab_details",
        ("DELETE", ["labs", _]) => "delete_lab",
        ("GET", ["labs", _, "state"]) => "lab_state",
        ("GET", ["labs", _, "check_if_converged"]) => "converged",
        ("GET", ["populate_lab_tiles"]) => "lab_tiles",
        ("PUT", ["labs", _, _]) => "lab_action",
        _ => "other",
    }
}

fn status_error(a: &Answer) -> CmlError {
    let description = describe(&a.body);
    let status = a.status.as_u16();
    match a.status {
        StatusCode::NOT_FOUND => CmlError::NotFound,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
            CmlError::Unreachable(format!("HTTP {status}: {description}"))
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => CmlError::Auth(description),
        s if s.is_client_error() => CmlError::Refused {
            status,
            description,
        },
        _ => CmlError::Server {
            status,
            description,
        },
    }
}

impl CmlClient {
    fn new(
        access: &WorkerAccess,
        fingerprint: Fingerprint,
        http: reqwest::Client,
        metrics: Metrics,
        token: Option<String>,
    ) -> Self {
        let w = &access.worker;
        Self {
            fingerprint,
            http,
            api: format!("{}/api/v0", w.base_url.trim_end_matches('/')),
            worker: w.id.clone(),
            username: w.username.clone(),
            password: access.password.clone(),
            token: tokio::sync::Mutex::new(token),
            metrics,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        json: Option<serde_json::Value>,
    ) -> Result<Answer, CmlError> {
        let mut timer = self.metrics.cml_request(endpoint_label(&method, path));
        let mut req = self.http.request(method, format!("{}{path}", self.api));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(body) = json {
            req = req.json(&body);
        }
        let resp = req.send().await.map_err(|e| transport_error(&e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| transport_error(&e))?;
        timer.status(status.as_u16());
        Ok(Answer { status, body })
    }

    /// Logs in and returns the new token.
    async fn login(&self) -> Result<String, CmlError> {
        let creds = serde_json::json!({
            "username": self.username,
            "password": self.password.expose_secret(),
        });
        let a = self
            .send(Method::POST, "/authenticate", None, Some(creds))
            .await?;
        if a.status == StatusCode::FORBIDDEN || a.status == StatusCode::UNAUTHORIZED {
            return Err(CmlError::Auth(format!(
                "CML refused the credentials of user {:?}: {}",
                self.username,
                describe(&a.body)
            )));
        }
        if !a.status.is_success() {
            return Err(status_error(&a));
        }
        let token: String = serde_json::from_slice(&a.body).map_err(|e| {
            CmlError::Protocol(format!("authenticate did not return a token string: {e}"))
        })?;
        if token.split('.').count() != 3 {
            return Err(CmlError::Protocol(
                "authenticate returned something that is not a JWT".into(),
            ));
        }
        Ok(token)
    }

    /// The cached token, logging in if there is none.
    async fn token(&self) -> Result<String, CmlError> {
        let mut guard = self.token.lock().await;
        if let Some(t) = guard.as_ref() {
            return Ok(t.clone());
        }
        let t = self.login().await?;
        *guard = Some(t.clone());
        Ok(t)
    }

    /// Forgets `stale` unless another request already replaced it.
    async fn forget(&self, stale: &str) {
        let mut guard = self.token.lock().await;
        if guard.as_deref() == Some(stale) {
            *guard = None;
        }
    }

    /// An authenticated call: on 401, log in again once and retry once.
    async fn call(&self, method: Method, path: &str) -> Result<Answer, CmlError> {
        let token = self.token().await?;
        let first = self.send(method.clone(), path, Some(&token), None).await?;
        let answer = if first.status == StatusCode::UNAUTHORIZED {
            self.forget(&token).await;
            let token = self.token().await?;
            self.send(method, path, Some(&token), None).await?
        } else {
            first
        };
        if answer.status.is_success() {
            Ok(answer)
        } else {
            Err(status_error(&answer))
        }
    }
}

fn json<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, CmlError> {
    serde_json::from_slice(body).map_err(|e| CmlError::Protocol(format!("{what}: {e}")))
}

#[async_trait]
impl CmlGateway for CmlHttpGateway {
    fn release(&self, access: &WorkerAccess) {
        // Dropping the client closes its idle connections (once requests in
        // flight finish): a fleet of hundreds of workers would otherwise
        // keep every worker's connections open between refreshes.
        let removed = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&access.worker.id);
        // Keep the token: it is good for a day, a connection is cheap.
        if let Some(client) = removed
            && let Ok(guard) = client.token.try_lock()
            && let Some(token) = guard.clone()
        {
            self.saved_tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    access.worker.id.clone(),
                    (client.fingerprint.clone(), token),
                );
        }
    }

    async fn list_lab_ids(&self, access: &WorkerAccess) -> Result<Vec<LabId>, CmlError> {
        let a = self
            .client(access)?
            .call(Method::GET, "/labs?show_all=true")
            .await?;
        parse_lab_ids(&a.body)
    }

    async fn lab_details(
        &self,
        access: &WorkerAccess,
        lab: &LabId,
    ) -> Result<LabSnapshot, CmlError> {
        let a = self
            .client(access)?
            .call(Method::GET, &format!("/labs/{lab}"))
            .await?;
        parse_lab_details(lab, &a.body)
    }

    async fn lab_tiles(
        &self,
        access: &WorkerAccess,
    ) -> Result<std::collections::HashMap<LabId, LabSnapshot>, CmlError> {
        let a = self
            .client(access)?
            .call(Method::GET, "/populate_lab_tiles")
            .await?;
        parse_lab_tiles(&a.body)
    }

    async fn lab_state(&self, access: &WorkerAccess, lab: &LabId) -> Result<LabState, CmlError> {
        let a = self
            .client(access)?
            .call(Method::GET, &format!("/labs/{lab}/state"))
            .await?;
        Ok(LabState::parse(&json::<String>("lab state", &a.body)?))
    }

    async fn stop_lab(&self, access: &WorkerAccess, lab: &LabId) -> Result<(), CmlError> {
        self.client(access)?
            .call(Method::PUT, &format!("/labs/{lab}/stop"))
            .await?;
        Ok(())
    }

    async fn wipe_lab(&self, access: &WorkerAccess, lab: &LabId) -> Result<(), CmlError> {
        self.client(access)?
            .call(Method::PUT, &format!("/labs/{lab}/wipe"))
            .await?;
        Ok(())
    }

    async fn is_converged(&self, access: &WorkerAccess, lab: &LabId) -> Result<bool, CmlError> {
        let a = self
            .client(access)?
            .call(Method::GET, &format!("/labs/{lab}/check_if_converged"))
            .await?;
        json("check_if_converged", &a.body)
    }

    async fn delete_lab(&self, access: &WorkerAccess, lab: &LabId) -> Result<(), CmlError> {
        self.client(access)?
            .call(Method::DELETE, &format!("/labs/{lab}"))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_cmls_description_or_a_short_raw_body() {
        let a = |status: u16, body: &str| Answer {
            status: StatusCode::from_u16(status).unwrap(),
            body: bytes::Bytes::from(body.to_owned()),
        };
        assert_eq!(
            status_error(&a(400, r#"{"code": 400, "description": "Lab is running"}"#)),
            CmlError::Refused {
                status: 400,
                description: "Lab is running".into()
            }
        );
        assert_eq!(status_error(&a(404, "{}")), CmlError::NotFound);
        assert!(
            matches!(status_error(&a(502, "<html>502 Bad Gateway</html>")), CmlError::Unreachable(m) if m.contains("502"))
        );
        assert!(
            matches!(status_error(&a(500, &"x".repeat(5000))), CmlError::Server { description, .. } if description.len() == 200)
        );
        assert!(
            matches!(status_error(&a(500, "")), CmlError::Server { description, .. } if description == "(empty body)")
        );
    }
}
