//! The CML HTTP client: [`CmlHttpGateway`] implements the application's
//! [`CmlGateway`] port over reqwest (rustls).
//!
//! One pooled, authenticated client per worker, created on first use and
//! reused until the worker's URL, user or TLS settings change, or until a
//! refresh of the worker ends ([`CmlGateway::release`]). The session (token
//! and whether the account is a CML admin, from `POST /auth_extended`) is
//! cached until CML answers 401; then the client logs in once more and
//! retries once. Lab ids go into URL paths as they are: they are validated
//! [`LabId`]s (lowercase hex and dashes), so nothing needs escaping.
//!
//! Everything CML sends is untrusted: bodies are read up to
//! `cml.max_response_bytes`; every text from CML that reaches an error (a
//! description, a state, a parser's quote, a redirect's location) is
//! clipped and escaped; and a 404 is "the lab is gone" only when it is
//! CML's own JSON error naming a lab (see [`is_lab_not_found`]); a proxy's
//! page or a wrong base path is an unreachable CML, never a deleted lab.
//!
//! Requests go to the worker's URL and nowhere else: no redirect is
//! followed (a 3xx is a protocol error naming where it pointed), so the
//! password of a login, a `DELETE` or the list cannot be sent to, or be
//! answered by, another server, and an `https://` worker's client refuses
//! plain HTTP altogether. A `DELETE` succeeds only on CML's own `204`: any
//! other answer, 2xx included, is not taken as a deleted lab.

mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use labsync_application::CmlError;
use labsync_application::ports::{CmlAccount, CmlGateway, LabList, WorkerAccess};
use labsync_domain::{BaseUrl, LabId, LabSnapshot, LabState, TlsSettings, WorkerId};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use tracing::warn;

use crate::configuration::CmlSettings;
use crate::metrics::Metrics;

pub use wire::{clip_text, parse_lab_details, parse_lab_ids, parse_lab_tiles};

/// CML clients for every worker, keyed by worker id.
#[derive(Debug)]
pub struct CmlHttpGateway {
    settings: CmlSettings,
    clients: Mutex<HashMap<WorkerId, Arc<CmlClient>>>,
    /// Sessions of released clients, so that a new client of the same
    /// worker (same settings) does not log in again.
    saved_tokens: Mutex<HashMap<WorkerId, (Fingerprint, Session)>>,
    metrics: Metrics,
}

fn http_builder(settings: &CmlSettings) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        // A redirect would send the login's password, or a DELETE, to
        // wherever CML (or whatever answers in its place) points, and take
        // that server's answer as CML's.
        .redirect(reqwest::redirect::Policy::none())
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
        let mut builder = http_builder(&self.settings).https_only(!w.base_url.is_plain_http());
        if let Some(pem) = w.tls.ca_cert_pem() {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
                CmlError::Unreachable(format!("worker {}: invalid CA bundle: {e}", w.id))
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if w.tls.insecure() {
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
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = clients.get(&access.worker.id)
            && c.fingerprint == fingerprint
        {
            return Ok(c.clone());
        }
        let saved = self
            .saved_tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&access.worker.id)
            .filter(|(f, _)| *f == fingerprint)
            .map(|(_, t)| t);
        let client = Arc::new(CmlClient::new(
            access,
            fingerprint,
            self.http_for(access)?,
            self.metrics.clone(),
            saved,
            self.settings.max_response_bytes,
        ));
        clients.insert(access.worker.id.clone(), client.clone());
        Ok(client)
    }
}

/// What a client was built from; a change means a new client.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    base_url: BaseUrl,
    username: String,
    password: SecretBytesEq,
    tls: TlsSettings,
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
            tls: a.worker.tls.clone(),
        }
    }
}

/// A login: the token and who it belongs to.
#[derive(Clone)]
struct Session {
    token: String,
    account: CmlAccount,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("token", &"[REDACTED]")
            .field("account", &self.account)
            .finish()
    }
}

/// One worker's connection pool and session.
struct CmlClient {
    fingerprint: Fingerprint,
    http: reqwest::Client,
    api: String,
    /// `api` parsed once: a request only sets its path and query, rather
    /// than parsing (and IDNA-mapping) the whole URL again, which was a
    /// twentieth of labsync's CPU time in a refresh (docs/BENCHMARKS.md).
    api_url: Option<reqwest::Url>,
    worker: WorkerId,
    username: String,
    password: SecretString,
    /// Held across a login so that concurrent requests log in once.
    session: tokio::sync::Mutex<Option<Session>>,
    metrics: Metrics,
    max_body: usize,
}

impl std::fmt::Debug for CmlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmlClient")
            .field("api", &self.api)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

/// An answer: status, body, and where a redirect pointed (never followed).
struct Answer {
    status: StatusCode,
    body: bytes::Bytes,
    location: Option<String>,
}

fn transport_error(e: &reqwest::Error) -> CmlError {
    // reqwest's message names the URL, never credentials (they travel in
    // the body and the Authorization header).
    let mut text = e.to_string();
    // What the connection said, without reqwest's own words (which name
    // the URL, whose host may well contain "tls").
    let mut causes = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        causes.push_str(&s.to_string());
        causes.push('\n');
        source = s.source();
    }
    // What a TLS or HTTP error quotes (a certificate's names, a header)
    // came from the other end.
    let text = clip_text(&text, MAX_TRANSPORT_ERROR);
    if e.is_timeout() {
        CmlError::Unreachable(format!("timed out: {text}"))
    } else if e.is_connect() && tls_refused(&causes) {
        CmlError::Tls(text)
    } else if e.is_decode() || e.is_body() {
        CmlError::Protocol(text)
    } else {
        CmlError::Unreachable(text)
    }
}

/// Whether a connection failed on TLS, by the causes of its error: the
/// server's certificate refused, or no TLS handshake (rustls and hyper
/// name both so).
fn tls_refused(chain: &str) -> bool {
    let chain = chain.to_ascii_lowercase();
    ["certificate", "handshake", "tls"]
        .iter()
        .any(|w| chain.contains(w))
}

/// The most of CML's error description that reports and logs keep.
const MAX_DESCRIPTION: usize = 200;

/// The most of a transport error's text (reqwest's chain of causes).
const MAX_TRANSPORT_ERROR: usize = 600;

/// The most of a lab state that labsync keeps from `GET /labs/{id}/state`:
/// CML's states are short words; a longer answer is clipped, and can never
/// read as a known state.
const MAX_STATE: usize = 64;

/// CML's `{code, description}`, or the raw body when the body is something
/// else, such as a reverse proxy's HTML page; clipped and escaped either way.
fn describe(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        description: String,
    }
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        return clip_text(&e.description, MAX_DESCRIPTION);
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        clip_text(text, MAX_DESCRIPTION)
    }
}

/// Whether a 404's body is CML's own answer that a lab does not exist:
/// CML's error shape (`{"code": 404, "description": ...}`) saying "lab not
/// found" (CML's words, `Lab not found: <id>`). Anything else that answers
/// 404 (a reverse proxy's page, a wrong base path, a route CML does not
/// have, a gateway echoing the path with the lab's id in it) says nothing
/// about the lab.
pub fn is_lab_not_found(body: &[u8], lab: &LabId) -> bool {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        code: u16,
        description: String,
    }
    serde_json::from_slice::<ErrorBody>(body).is_ok_and(|e| {
        let d = e.description.to_ascii_lowercase();
        // A description that names another lab is not about this one.
        let other_lab = d.contains("lab not found:") && !d.contains(lab.as_str());
        e.code == 404 && d.contains("lab not found") && !other_lab
    })
}

/// A bounded metric label for a CML call.
fn endpoint_label(method: &Method, path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        (_, ["authenticate" | "auth_extended"]) => "authenticate",
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

/// The error for a non-success answer to a request about `lab` (none for
/// requests about no lab, such as the list).
fn status_error(a: &Answer, lab: Option<&LabId>) -> CmlError {
    let status = a.status.as_u16();
    if a.status.is_redirection() {
        return redirect_error(a);
    }
    let description = describe(&a.body);
    match a.status {
        StatusCode::NOT_FOUND => match lab {
            Some(lab) if is_lab_not_found(&a.body, lab) => CmlError::NotFound,
            _ => CmlError::Unreachable(format!(
                "HTTP 404 that is not CML's answer about a lab (a proxy or a wrong URL?): {description}"
            )),
        },
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

/// A redirect, which labsync never follows: CML answers its API calls
/// itself, and whatever points elsewhere (a proxy, a moved server, a
/// hostile one) must not receive the login or the delete, nor answer for
/// CML.
fn redirect_error(a: &Answer) -> CmlError {
    let location = a
        .location
        .as_deref()
        .map_or_else(|| "nowhere".to_owned(), |l| clip_text(l, MAX_DESCRIPTION));
    CmlError::Protocol(format!(
        "HTTP {} redirect to {location}, not followed: labsync talks only to the worker's \
         own URL (check the worker's base_url)",
        a.status.as_u16()
    ))
}

/// Reads a body of at most `max` bytes.
async fn read_body(mut resp: reqwest::Response, max: usize) -> Result<bytes::Bytes, CmlError> {
    let too_large = |n: u64| {
        CmlError::Protocol(format!(
            "answer of {n} bytes or more is larger than cml.max_response_bytes ({max})"
        ))
    };
    if let Some(n) = resp.content_length()
        && n > max as u64
    {
        return Err(too_large(n));
    }
    let mut next = async || resp.chunk().await.map_err(|e| transport_error(&e));
    let Some(first) = next().await? else {
        return Ok(bytes::Bytes::new());
    };
    if first.len() > max {
        return Err(too_large(first.len() as u64));
    }
    // Most answers come in one chunk: kept as it is, never copied.
    let Some(second) = next().await? else {
        return Ok(first);
    };
    let mut body = bytes::BytesMut::from(&first[..]);
    let mut chunk = Some(second);
    while let Some(c) = chunk {
        if body.len() + c.len() > max {
            return Err(too_large((body.len() + c.len()) as u64));
        }
        body.extend_from_slice(&c);
        chunk = next().await?;
    }
    Ok(body.freeze())
}

/// `path` (which may carry a query) under `api`, as
/// `format!("{api}{path}")` would parse, without parsing `api` again.
fn under(api: &reqwest::Url, path: &str) -> reqwest::Url {
    let mut url = api.clone();
    let (p, query) = path
        .split_once('?')
        .map_or((path, None), |(p, q)| (p, Some(q)));
    let joined = format!("{}{p}", api.path().trim_end_matches('/'));
    url.set_path(&joined);
    url.set_query(query);
    url
}

/// `POST /auth_extended` as CML 2.9 answers it.
#[derive(serde::Deserialize)]
struct AuthExtended {
    token: String,
    #[serde(default)]
    username: Option<String>,
    admin: bool,
}

impl CmlClient {
    fn new(
        access: &WorkerAccess,
        fingerprint: Fingerprint,
        http: reqwest::Client,
        metrics: Metrics,
        session: Option<Session>,
        max_body: usize,
    ) -> Self {
        let w = &access.worker;
        let api = format!("{}/api/v0", w.base_url);
        Self {
            fingerprint,
            http,
            api_url: reqwest::Url::parse(&api).ok(),
            api,
            worker: w.id.clone(),
            username: w.username.clone(),
            password: access.password.clone(),
            session: tokio::sync::Mutex::new(session),
            metrics,
            max_body,
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
        let mut req = match self.url(path) {
            Some(url) => self.http.request(method, url),
            // Not a URL: reqwest says why, as it did before.
            None => self.http.request(method, format!("{}{path}", self.api)),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(body) = json {
            req = req.json(&body);
        }
        let resp = req.send().await.map_err(|e| transport_error(&e))?;
        let status = resp.status();
        timer.status(status.as_u16());
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
        let body = read_body(resp, self.max_body).await?;
        Ok(Answer {
            status,
            body,
            location,
        })
    }

    /// The URL of `path` (and its query) under the API, from the parsed
    /// base; `None` when the base did not parse.
    fn url(&self, path: &str) -> Option<reqwest::Url> {
        self.api_url.as_ref().map(|api| under(api, path))
    }

    /// Logs in and returns the new session. `/auth_extended` rather than
    /// `/authenticate`: it also says whether the account is an admin,
    /// which decides whether CML's list and 404s can be trusted.
    async fn login(&self) -> Result<Session, CmlError> {
        let creds = serde_json::json!({
            "username": self.username,
            "password": self.password.expose_secret(),
        });
        let a = self
            .send(Method::POST, "/auth_extended", None, Some(creds))
            .await?;
        if a.status == StatusCode::FORBIDDEN || a.status == StatusCode::UNAUTHORIZED {
            return Err(CmlError::Auth(format!(
                "CML refused the credentials of user {:?}: {}",
                self.username,
                describe(&a.body)
            )));
        }
        if !a.status.is_success() {
            return Err(status_error(&a, None));
        }
        let auth: AuthExtended = serde_json::from_slice(&a.body).map_err(|e| {
            CmlError::Protocol(format!(
                "auth_extended did not return a token and an admin flag: {}",
                clip_text(&e.to_string(), MAX_DESCRIPTION)
            ))
        })?;
        if auth.token.split('.').count() != 3 {
            return Err(CmlError::Protocol(
                "auth_extended returned a token that is not a JWT".into(),
            ));
        }
        Ok(Session {
            token: auth.token,
            account: CmlAccount {
                username: clip_text(
                    auth.username.as_deref().unwrap_or(&self.username),
                    MAX_DESCRIPTION,
                ),
                admin: auth.admin,
            },
        })
    }

    /// The cached session, logging in if there is none.
    async fn session(&self) -> Result<Session, CmlError> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        let s = self.login().await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// A new session, whatever is cached.
    async fn relogin(&self) -> Result<Session, CmlError> {
        let mut guard = self.session.lock().await;
        *guard = None;
        let s = self.login().await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// Forgets `stale` unless another request already replaced it.
    async fn forget(&self, stale: &str) {
        let mut guard = self.session.lock().await;
        if guard.as_ref().is_some_and(|s| s.token == stale) {
            *guard = None;
        }
    }

    /// An authenticated call about `lab` (if any): on 401, log in again
    /// once and retry once.
    async fn call(
        &self,
        method: Method,
        path: &str,
        lab: Option<&LabId>,
    ) -> Result<Answer, CmlError> {
        let token = self.session().await?.token;
        let first = self.send(method.clone(), path, Some(&token), None).await?;
        let answer = if first.status == StatusCode::UNAUTHORIZED {
            self.forget(&token).await;
            let token = self.session().await?.token;
            self.send(method, path, Some(&token), None).await?
        } else {
            first
        };
        if answer.status.is_success() {
            Ok(answer)
        } else {
            Err(status_error(&answer, lab))
        }
    }
}

/// Parses a small answer; the parser's message is clipped and escaped, as
/// it quotes what CML sent (`invalid type: string "...", expected a boolean`).
fn json<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, CmlError> {
    serde_json::from_slice(body).map_err(|e| {
        CmlError::Protocol(format!(
            "{what}: {}",
            clip_text(&e.to_string(), MAX_DESCRIPTION)
        ))
    })
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
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&access.worker.id);
        // Keep the session: its token is good for a day, a connection is
        // cheap. (A refresh logs in afresh anyway, see `relogin`.)
        if let Some(client) = removed
            && let Ok(guard) = client.session.try_lock()
            && let Some(session) = guard.clone()
        {
            self.saved_tokens
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(
                    access.worker.id.clone(),
                    (client.fingerprint.clone(), session),
                );
        }
    }

    async fn check(&self, access: &WorkerAccess) -> Result<(CmlAccount, LabList), CmlError> {
        // A client of its own, never cached: settings not yet saved must
        // not replace, or be taken for, the worker's own client.
        let client = CmlClient::new(
            access,
            Fingerprint::of(access),
            self.http_for(access)?,
            self.metrics.clone(),
            None,
            self.settings.max_response_bytes,
        );
        let account = client.relogin().await?.account;
        if !account.admin {
            return Ok((account, LabList::default()));
        }
        let a = client
            .call(Method::GET, "/labs?show_all=true", None)
            .await?;
        Ok((account, parse_lab_ids(&a.body)?))
    }

    async fn account(&self, access: &WorkerAccess) -> Result<CmlAccount, CmlError> {
        Ok(self.client(access)?.session().await?.account)
    }

    async fn relogin(&self, access: &WorkerAccess) -> Result<CmlAccount, CmlError> {
        Ok(self.client(access)?.relogin().await?.account)
    }

    async fn list_lab_ids(&self, access: &WorkerAccess) -> Result<LabList, CmlError> {
        let a = self
            .client(access)?
            .call(Method::GET, "/labs?show_all=true", None)
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
            .call(Method::GET, &format!("/labs/{lab}"), Some(lab))
            .await?;
        parse_lab_details(lab, &a.body)
    }

    async fn lab_tiles(
        &self,
        access: &WorkerAccess,
    ) -> Result<std::collections::HashMap<LabId, LabSnapshot>, CmlError> {
        let a = self
            .client(access)?
            .call(Method::GET, "/populate_lab_tiles", None)
            .await?;
        parse_lab_tiles(&a.body)
    }

    async fn lab_state(&self, access: &WorkerAccess, lab: &LabId) -> Result<LabState, CmlError> {
        let a = self
            .client(access)?
            .call(Method::GET, &format!("/labs/{lab}/state"), Some(lab))
            .await?;
        let state = json::<String>("lab state", &a.body)?;
        // It ends up in refusals, history, audit entries, events and logs.
        Ok(LabState::parse(&clip_text(&state, MAX_STATE)))
    }

    async fn stop_lab(&self, access: &WorkerAccess, lab: &LabId) -> Result<(), CmlError> {
        self.client(access)?
            .call(Method::PUT, &format!("/labs/{lab}/stop"), Some(lab))
            .await?;
        Ok(())
    }

    async fn wipe_lab(&self, access: &WorkerAccess, lab: &LabId) -> Result<(), CmlError> {
        self.client(access)?
            .call(Method::PUT, &format!("/labs/{lab}/wipe"), Some(lab))
            .await?;
        Ok(())
    }

    async fn is_converged(&self, access: &WorkerAccess, lab: &LabId) -> Result<bool, CmlError> {
        let a = self
            .client(access)?
            .call(
                Method::GET,
                &format!("/labs/{lab}/check_if_converged"),
                Some(lab),
            )
            .await?;
        json("check_if_converged", &a.body)
    }

    async fn delete_lab(&self, access: &WorkerAccess, lab: &LabId) -> Result<(), CmlError> {
        let a = self
            .client(access)?
            .call(Method::DELETE, &format!("/labs/{lab}"), Some(lab))
            .await?;
        // CML answers 204 "Lab successfully deleted" (the 2.9 spec, and
        // the simulator). Any other success is not CML saying so.
        if a.status != StatusCode::NO_CONTENT {
            return Err(CmlError::Protocol(format!(
                "DELETE of lab {lab} answered HTTP {}, not CML's 204: not taken as deleted",
                a.status.as_u16()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_path_under_the_parsed_api_is_the_url_the_joined_text_would_parse_to() {
        for base in [
            "https://cml.example.org/api/v0",
            "https://cml.example.org:8443/behind/a/proxy/api/v0",
            "http://[::1]:19399/api/v0",
        ] {
            let api = reqwest::Url::parse(base).unwrap();
            for path in [
                "/labs?show_all=true",
                "/labs/3f1b2a4c-0000-4000-8000-000000000001/state",
                "/auth_extended",
                "/populate_lab_tiles",
            ] {
                assert_eq!(
                    super::under(&api, path),
                    reqwest::Url::parse(&format!("{base}{path}")).unwrap(),
                    "{base} {path}"
                );
            }
        }
    }

    #[test]
    fn a_refused_certificate_is_tls_and_a_refused_connection_is_not() {
        assert!(tls_refused("invalid peer certificate: UnknownIssuer\n"));
        assert!(tls_refused(
            "received corrupt message of type InvalidContentType\ntls handshake eof\n"
        ));
        assert!(!tls_refused(
            "tcp connect error\nConnection refused (os error 111)\n"
        ));
    }

    use super::*;

    #[test]
    fn errors_keep_cmls_description_or_a_short_raw_body() {
        let a = |status: u16, body: &str| Answer {
            status: StatusCode::from_u16(status).unwrap(),
            body: bytes::Bytes::from(body.to_owned()),
            location: None,
        };
        assert_eq!(
            status_error(
                &a(400, r#"{"code": 400, "description": "Lab is running"}"#),
                None
            ),
            CmlError::Refused {
                status: 400,
                description: "Lab is running".into()
            }
        );
        assert!(
            matches!(status_error(&a(502, "<html>502 Bad Gateway</html>"), None), CmlError::Unreachable(m) if m.contains("502"))
        );
        for body in [
            &"x".repeat(5000),
            &format!(r#"{{"code": 500, "description": "{}"}}"#, "y".repeat(5000)),
        ] {
            assert!(
                matches!(status_error(&a(500, body), None), CmlError::Server { description, .. } if description.len() <= MAX_DESCRIPTION + 3)
            );
        }
        assert!(
            matches!(status_error(&a(500, ""), None), CmlError::Server { description, .. } if description == "(empty body)")
        );
        let Some(CmlError::Server { description, .. }) = Some(status_error(
            &a(500, r#"{"code": 500, "description": "\u001b[2Jgone"}"#),
            None,
        )) else {
            unreachable!()
        };
        assert!(!description.chars().any(char::is_control), "{description}");
    }

    #[test]
    fn a_redirect_is_a_protocol_error_naming_where_it_pointed_clipped_and_escaped() {
        let lab = LabId::parse("a6a334de-b497-47ae-bbff-44a83f890114").unwrap();
        let far = format!("http://elsewhere.example/\u{1b}[2J{}", "x".repeat(5000));
        for status in [301, 302, 303, 307, 308] {
            for location in [Some(far.clone()), None] {
                let a = Answer {
                    status: StatusCode::from_u16(status).unwrap(),
                    body: bytes::Bytes::new(),
                    location: location.clone(),
                };
                for about in [None, Some(&lab)] {
                    let CmlError::Protocol(m) = status_error(&a, about) else {
                        panic!("{status} {location:?}: {:?}", status_error(&a, about))
                    };
                    assert!(m.contains(&format!("HTTP {status} redirect to ")), "{m}");
                    assert!(m.contains("not followed"), "{m}");
                    if location.is_some() {
                        assert!(m.contains("http://elsewhere.example/\\u{1b}[2J"), "{m}");
                    }
                    assert!(m.len() <= 400, "{} bytes", m.len());
                    assert!(!m.chars().any(char::is_control), "{m}");
                }
            }
        }
    }

    #[test]
    fn what_a_parser_quotes_from_cml_is_clipped_and_escaped() {
        let huge = serde_json::to_vec(&format!("\u{1b}[2J{}", "y".repeat(3 << 20))).unwrap();
        let Err(CmlError::Protocol(m)) = json::<bool>("check_if_converged", &huge) else {
            unreachable!()
        };
        assert!(
            m.starts_with("check_if_converged: invalid type: string"),
            "{m:.300}"
        );
        assert!(m.len() <= 300, "{} bytes", m.len());
        assert!(!m.chars().any(char::is_control), "{m}");
    }

    #[test]
    fn only_cmls_own_404_about_a_lab_means_the_lab_is_gone() {
        let lab = LabId::parse("a6a334de-b497-47ae-bbff-44a83f890114").unwrap();
        let a = |body: &str| Answer {
            status: StatusCode::NOT_FOUND,
            body: bytes::Bytes::from(body.to_owned()),
            location: None,
        };
        for gone in [
            format!(r#"{{"code": 404, "description": "Lab not found: {lab}"}}"#),
            r#"{"code": 404, "description": "Lab not found"}"#.to_owned(),
        ] {
            assert_eq!(status_error(&a(&gone), Some(&lab)), CmlError::NotFound);
            assert!(
                matches!(status_error(&a(&gone), None), CmlError::Unreachable(_)),
                "a 404 about no lab (the list) is never a gone lab"
            );
        }
        for not_cml in [
            "<html><center><h1>404 Not Found</h1></center><hr><center>nginx</center></html>",
            r#"{"detail": "Not Found"}"#,
            r#"{"code": 404, "description": "The requested URL was not found on the server."}"#,
            r#"{"code": 400, "description": "Lab not found"}"#,
            &format!(r#"{{"code": 404, "description": "No route for /api/v0/labs/{lab}/state"}}"#),
            r#"{"code": 404, "description": "Lab not found: a6a334de-b497-47ae-bbff-000000000000"}"#,
            "",
        ] {
            assert!(
                matches!(status_error(&a(not_cml), Some(&lab)), CmlError::Unreachable(ref m) if m.contains("404")),
                "{not_cml}"
            );
        }
    }
}
