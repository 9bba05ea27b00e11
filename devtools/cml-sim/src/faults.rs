//! Fault injection: what a flaky CML server does to its clients.
//!
//! Faults are set per worker through `PUT /_sim/faults` and apply to the CML
//! API only, never to `/_sim/`. Each fault names the endpoints it affects;
//! `all` affects every endpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::server::WorkerState;

/// The CML endpoints the simulator tells apart, for faults and statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// Matches every endpoint in a fault definition.
    All,
    Authenticate,
    Logout,
    SystemInformation,
    ListLabs,
    LabDetails,
    LabState,
    Converged,
    LabAction,
    DeleteLab,
    LabTiles,
    Other,
}

impl Endpoint {
    /// Classifies a request; `None` for the control API.
    pub fn classify(method: &Method, path: &str) -> Option<Self> {
        if path.starts_with("/_sim/") || path == "/_sim" {
            return None;
        }
        let Some(rest) = path.strip_prefix("/api/v0/") else {
            return Some(Self::Other);
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let m = method.as_str();
        Some(match (m, parts.as_slice()) {
            ("POST", ["authenticate" | "auth_extended"]) | ("GET", ["authok"]) => {
                Self::Authenticate
            }
            ("DELETE", ["logout"]) => Self::Logout,
            ("GET", ["system_information"]) => Self::SystemInformation,
            ("GET", ["labs"]) => Self::ListLabs,
            ("GET", ["labs", _]) => Self::LabDetails,
            ("DELETE", ["labs", _]) => Self::DeleteLab,
            ("GET", ["labs", _, "state"]) => Self::LabState,
            ("GET", ["labs", _, "check_if_converged"]) => Self::Converged,
            ("PUT", ["labs", _, "start" | "stop" | "wipe"]) => Self::LabAction,
            ("GET", ["populate_lab_tiles"]) => Self::LabTiles,
            _ => Self::Other,
        })
    }
}

/// The faults in force on one worker. Every field defaults to "no fault".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Added latency per endpoint, in milliseconds.
    pub latency_ms: HashMap<Endpoint, u64>,
    /// Extra random latency, uniform in `0..=jitter_ms`, on every delayed call.
    pub jitter_ms: u64,
    /// Share (0..=1) of calls answered with CML's 500 body.
    pub error_rate: HashMap<Endpoint, f64>,
    /// While true, every CML call gets the 502 page of the reverse proxy in
    /// front of a CML controller that is still starting.
    pub booting: bool,
    /// Endpoints that never answer (the connection stays open).
    pub hang: Vec<Endpoint>,
    /// Endpoints whose JSON body is cut in half.
    pub truncate_json: Vec<Endpoint>,
    /// Endpoints whose JSON body has the wrong types (numbers as strings,
    /// strings as numbers, arrays as objects).
    pub wrong_types: Vec<Endpoint>,
    /// `GET /labs` answers `[]` whatever the server holds.
    pub empty_list: bool,
    /// Lab ids left out of `GET /labs` although they exist.
    pub hide_from_list: Vec<String>,
    /// Endpoints answered with the HTML 404 page of a reverse proxy that
    /// does not route to CML (a wrong base path, a misconfigured proxy).
    pub proxy_404: Vec<Endpoint>,
    /// Endpoints whose request CML carries out, and whose answer is then
    /// lost: `error_500` (a 500 after the fact), `hang` (no answer) or
    /// `reset` (the connection drops mid-answer).
    pub after_the_fact: HashMap<Endpoint, AfterTheFact>,
    /// Entries added to `GET /labs` that are not lab ids.
    pub invalid_list_entries: Vec<serde_json::Value>,
    /// When set, every lab's details (and tiles) carry this many bytes of
    /// `lab_notes`, whatever the lab holds: a server with huge fields.
    pub huge_notes_bytes: Option<usize>,
}

/// How an answer is lost after CML acted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterTheFact {
    #[serde(rename = "error_500")]
    Error500,
    Hang,
    Reset,
}

fn applies(list: &[Endpoint], e: Endpoint) -> bool {
    list.iter().any(|x| *x == e || *x == Endpoint::All)
}

fn lookup<T: Copy>(map: &HashMap<Endpoint, T>, e: Endpoint) -> Option<T> {
    map.get(&e).or_else(|| map.get(&Endpoint::All)).copied()
}

impl Faults {
    pub fn latency(&self, e: Endpoint, jitter_draw: f64) -> Duration {
        let base = lookup(&self.latency_ms, e).unwrap_or(0);
        let jitter = if base > 0 || self.jitter_ms > 0 {
            (self.jitter_ms as f64 * jitter_draw) as u64
        } else {
            0
        };
        Duration::from_millis(base + jitter)
    }
    pub fn error_rate(&self, e: Endpoint) -> f64 {
        lookup(&self.error_rate, e).unwrap_or(0.0)
    }
    pub fn hangs(&self, e: Endpoint) -> bool {
        applies(&self.hang, e)
    }
    pub fn truncates(&self, e: Endpoint) -> bool {
        applies(&self.truncate_json, e)
    }
    pub fn mistypes(&self, e: Endpoint) -> bool {
        applies(&self.wrong_types, e)
    }
    pub fn proxy_404s(&self, e: Endpoint) -> bool {
        applies(&self.proxy_404, e)
    }
    pub fn after_the_fact(&self, e: Endpoint) -> Option<AfterTheFact> {
        lookup(&self.after_the_fact, e)
    }
}

/// The page nginx serves for a path it does not route.
pub const PROXY_NOT_FOUND_PAGE: &str = "<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/// The page nginx in front of a CML controller serves while the controller
/// is not up yet.
pub const BAD_GATEWAY_PAGE: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/// Turns a JSON value into one of the same shape with the wrong types.
pub fn mistype(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Array(items) => Value::Object(
            items
                .into_iter()
                .enumerate()
                .map(|(i, x)| (i.to_string(), x))
                .collect(),
        ),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, x)| {
                    let x = match x {
                        Value::Number(n) => Value::String(n.to_string()),
                        Value::String(s) => Value::from(s.len()),
                        Value::Bool(b) => Value::String(b.to_string()),
                        Value::Array(_) => Value::Object(Default::default()),
                        other => other,
                    };
                    (k, x)
                })
                .collect(),
        ),
        Value::String(s) => Value::from(s.len()),
        Value::Bool(b) => Value::String(b.to_string()),
        other => Value::Array(vec![other]),
    }
}

/// Applies the worker's faults to CML API calls and counts them.
pub(crate) async fn middleware(
    State(worker): State<Arc<WorkerState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(endpoint) = Endpoint::classify(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    let (faults, jitter_draw, error_draw) = worker.begin_request(endpoint);
    let delay = faults.latency(endpoint, jitter_draw);
    if !delay.is_zero() {
        // The simulated network and server time is the point of this wait.
        tokio::time::sleep(delay).await;
    }
    let response = if faults.booting {
        (
            StatusCode::BAD_GATEWAY,
            [(header::CONTENT_TYPE, "text/html")],
            BAD_GATEWAY_PAGE,
        )
            .into_response()
    } else if faults.hangs(endpoint) {
        // Never answers; the client's timeout is what is being tested.
        std::future::pending::<()>().await;
        unreachable!("a pending future never completes")
    } else if faults.proxy_404s(endpoint) {
        (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/html")],
            PROXY_NOT_FOUND_PAGE,
        )
            .into_response()
    } else if error_draw < faults.error_rate(endpoint) {
        crate::api::CmlError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error.")
            .into_response()
    } else {
        let response = next.run(request).await;
        match faults.after_the_fact(endpoint) {
            // The handler has run: CML acted, and now the answer is lost.
            Some(AfterTheFact::Error500) => {
                worker.count_after_the_fact(endpoint);
                crate::api::CmlError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal server error.",
                )
                .into_response()
            }
            Some(AfterTheFact::Hang) => {
                worker.count_after_the_fact(endpoint);
                std::future::pending::<()>().await;
                unreachable!("a pending future never completes")
            }
            Some(AfterTheFact::Reset) => {
                worker.count_after_the_fact(endpoint);
                // Headers go out, then the body fails: the server drops the
                // connection mid-answer.
                let broken = futures::stream::once(async {
                    Err::<axum::body::Bytes, std::io::Error>(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "cml-sim: connection reset after the fact",
                    ))
                });
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    Body::from_stream(broken),
                )
                    .into_response()
            }
            None if faults.truncates(endpoint) || faults.mistypes(endpoint) => {
                corrupt(response, faults.truncates(endpoint)).await
            }
            None => match faults.huge_notes_bytes {
                Some(n) if endpoint == Endpoint::LabDetails => pad_notes(response, n).await,
                _ => response,
            },
        }
    };
    worker.record(endpoint, response.status().as_u16());
    response
}

/// Replaces a lab's `lab_notes` with `n` bytes of text.
async fn pad_notes(response: Response, n: usize) -> Response {
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "body read failed").into_response();
    };
    let new_body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(mut v) if v.get("lab_notes").is_some() => {
            v["lab_notes"] = "n".repeat(n).into();
            serde_json::to_vec(&v).unwrap_or_default().into()
        }
        _ => bytes,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(new_body))
}

/// Cuts a JSON body in half, or rewrites it with the wrong types.
async fn corrupt(response: Response, truncate: bool) -> Response {
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "body read failed").into_response();
    };
    let new_body = if truncate {
        bytes.slice(..bytes.len() / 2)
    } else {
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(v) => serde_json::to_vec(&mistype(v)).unwrap_or_default().into(),
            Err(_) => bytes,
        }
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(new_body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_endpoints_labsync_uses() {
        let id = "a6a334de-b497-47ae-bbff-44a83f890114";
        let c = |m: Method, p: &str| Endpoint::classify(&m, p);
        assert_eq!(
            c(Method::POST, "/api/v0/authenticate"),
            Some(Endpoint::Authenticate)
        );
        assert_eq!(c(Method::GET, "/api/v0/labs"), Some(Endpoint::ListLabs));
        assert_eq!(
            c(Method::GET, &format!("/api/v0/labs/{id}")),
            Some(Endpoint::LabDetails)
        );
        assert_eq!(
            c(Method::DELETE, &format!("/api/v0/labs/{id}")),
            Some(Endpoint::DeleteLab)
        );
        assert_eq!(
            c(Method::PUT, &format!("/api/v0/labs/{id}/wipe")),
            Some(Endpoint::LabAction)
        );
        assert_eq!(
            c(
                Method::GET,
                &format!("/api/v0/labs/{id}/check_if_converged")
            ),
            Some(Endpoint::Converged)
        );
        assert_eq!(c(Method::GET, "/_sim/labs"), None);
        assert_eq!(c(Method::GET, "/elsewhere"), Some(Endpoint::Other));
    }

    #[test]
    fn all_matches_every_endpoint_and_specific_entries_win() {
        let f: Faults =
            serde_json::from_str(r#"{"latency_ms": {"all": 5, "list_labs": 50}, "hang": ["all"]}"#)
                .unwrap();
        assert_eq!(
            f.latency(Endpoint::ListLabs, 0.0),
            Duration::from_millis(50)
        );
        assert_eq!(
            f.latency(Endpoint::LabDetails, 0.0),
            Duration::from_millis(5)
        );
        assert!(f.hangs(Endpoint::DeleteLab));
        assert!(serde_json::from_str::<Faults>(r#"{"hnag": []}"#).is_err());
    }

    #[test]
    fn mistyped_json_keeps_keys_and_changes_types() {
        let v = mistype(serde_json::json!({"id": "x", "node_count": 3, "groups": []}));
        assert_eq!(
            v,
            serde_json::json!({"id": 1, "node_count": "3", "groups": {}})
        );
        assert!(mistype(serde_json::json!(["a"])).is_object());
    }
}
