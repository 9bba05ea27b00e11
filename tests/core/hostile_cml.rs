//! A hostile CML (issue "Hostile edges"): a server that answers labsync's
//! calls as CML does until a test scripts it to redirect them elsewhere, to
//! send texts of megabytes full of terminal escapes, or to list one lab
//! thousands of times. Whatever it sends, labsync talks to no other server,
//! takes nothing but CML's own answers for a delete or a list, and stores,
//! logs and returns only short, escaped texts.

use labsync_application::domain::Actor;
use labsync_application::domain::BaseUrl;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use labsync_application::domain::{LabId, TlsSettings, Worker, WorkerId};
use labsync_application::{
    DeleteLab, DeleteOutcome, DeleteOutcomeKind, RefreshOptions, RefreshWorkerLabs, RunReport,
    RunStatus, SyncState,
};
use mongodb::bson::{Document, doc};
use secrecy::SecretString;
use serde_json::json;

use crate::helpers::{ADMIN_PASSWORD, ADMIN_TOKEN, TestApi, TestApp, output_text};

/// What a scripted answer is made from: the request's method and path.
type Script = Arc<dyn Fn() -> Response + Send + Sync>;

/// A request the hostile CML received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub body: String,
}

#[derive(Default)]
struct Inner {
    /// Lab id -> state.
    labs: BTreeMap<String, String>,
    /// Answers that replace the default one, by method and path.
    scripts: Vec<(Method, String, Script)>,
    seen: Vec<Seen>,
}

/// A CML server of a test's own on 127.0.0.1:0, serving until dropped.
pub struct HostileCml {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HostileCml {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A JWT-shaped token, as `auth_extended` answers one.
const TOKEN: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJob3N0aWxlIn0.c2lnbmF0dXJl";

pub fn cml_error(status: StatusCode, description: &str) -> Response {
    (
        status,
        axum::Json(json!({"code": status.as_u16(), "description": description})),
    )
        .into_response()
}

/// Terminal escapes: retitle the terminal, clear the screen, turn red.
pub const ESCAPES: &str = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{1b}[31m";

/// `n` bytes of text that starts with terminal escapes.
fn huge(n: usize) -> String {
    format!("{ESCAPES}{}", "z".repeat(n))
}

/// An answer that points elsewhere.
pub fn redirect(status: u16, location: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [(header::LOCATION, location.to_owned())],
    )
        .into_response()
}

impl HostileCml {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let state = inner.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
            let inner = state.clone();
            async move { answer(&inner, method, &uri, &body) }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, inner, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The same server under another host name, as a redirect names it.
    pub fn elsewhere(&self, path: &str) -> String {
        format!("http://localhost:{}{path}", self.addr.port())
    }

    /// Adds a lab in `state`; returns its id.
    pub fn add_lab(&self, state: &str) -> LabId {
        let id = LabId::parse(&uuid::Uuid::new_v4().to_string()).unwrap();
        self.lock().labs.insert(id.to_string(), state.to_owned());
        id
    }

    pub fn has_lab(&self, lab: &LabId) -> bool {
        self.lock().labs.contains_key(lab.as_str())
    }

    /// From now on, `method path` is answered by `script`.
    pub fn on(
        &self,
        method: Method,
        path: &str,
        script: impl Fn() -> Response + Send + Sync + 'static,
    ) {
        let mut g = self.lock();
        g.scripts.retain(|(m, p, _)| !(*m == method && p == path));
        g.scripts.push((method, path.to_owned(), Arc::new(script)));
    }

    /// Back to CML's own answers.
    pub fn behave(&self) {
        self.lock().scripts.clear();
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }
}

/// CML's own answer, unless a script replaces it.
fn answer(inner: &Mutex<Inner>, method: Method, uri: &Uri, body: &[u8]) -> Response {
    let path = uri.path().to_owned();
    let mut g = inner.lock().unwrap();
    g.seen.push(Seen {
        method: method.clone(),
        path: path.clone(),
        body: String::from_utf8_lossy(body).into_owned(),
    });
    if let Some((_, _, script)) = g
        .scripts
        .iter()
        .find(|(m, p, _)| *m == method && *p == path)
    {
        let script = script.clone();
        drop(g);
        return script();
    }
    let parts: Vec<&str> = path.trim_start_matches("/api/v0/").split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("POST", ["auth_extended"]) => {
            axum::Json(json!({"token": TOKEN, "username": "admin", "admin": true})).into_response()
        }
        ("GET", ["labs"]) => axum::Json(g.labs.keys().cloned().collect::<Vec<_>>()).into_response(),
        (_, ["labs", id, ..]) if !g.labs.contains_key(*id) => {
            cml_error(StatusCode::NOT_FOUND, &format!("Lab not found: {id}"))
        }
        ("GET", ["labs", id]) => axum::Json(json!({
            "id": id,
            "state": g.labs[*id],
            "lab_title": "a lab",
            "owner_username": "admin",
            "node_count": 2,
        }))
        .into_response(),
        ("GET", ["labs", id, "state"]) => axum::Json(g.labs[*id].clone()).into_response(),
        ("GET", ["labs", _, "check_if_converged"]) => axum::Json(true).into_response(),
        ("PUT", ["labs", id, "stop"]) => {
            let id = (*id).to_owned();
            g.labs.insert(id, "STOPPED".into());
            StatusCode::NO_CONTENT.into_response()
        }
        ("PUT", ["labs", id, "wipe"]) => {
            let id = (*id).to_owned();
            g.labs.insert(id, "DEFINED_ON_CORE".into());
            StatusCode::NO_CONTENT.into_response()
        }
        ("DELETE", ["labs", id]) => {
            if g.labs[*id] != "DEFINED_ON_CORE" {
                return cml_error(StatusCode::BAD_REQUEST, "Lab is not wiped.");
            }
            let id = (*id).to_owned();
            g.labs.remove(&id);
            StatusCode::NO_CONTENT.into_response()
        }
        _ => cml_error(
            StatusCode::NOT_FOUND,
            "The requested URL was not found on the server.",
        ),
    }
}

pub const HOSTILE: &str = "hostile";

fn hostile_id() -> WorkerId {
    WorkerId::parse(HOSTILE).unwrap()
}

/// Registers `cml` as worker `hostile` of `t`.
pub async fn register(t: &TestApp, cml: &HostileCml) {
    t.services()
        .workers
        .add(
            &Worker {
                id: hostile_id(),
                name: HOSTILE.into(),
                base_url: BaseUrl::parse(&cml.base_url()).expect("the simulator's URL"),
                username: "admin".into(),
                tls: TlsSettings {
                    allow_http: true,
                    ..TlsSettings::default()
                },
                enabled: true,
                lab_tiles: false,
            },
            &SecretString::from(ADMIN_PASSWORD),
        )
        .await
        .expect("register the hostile worker");
}

async fn refresh(t: &TestApp) -> RunReport {
    RefreshWorkerLabs::new(t.services().clone())
        .execute(
            &hostile_id(),
            &Actor::api("admin"),
            RefreshOptions::default(),
        )
        .await
        .expect("refresh runs")
}

async fn delete(t: &TestApp, lab: &LabId, force: bool) -> DeleteOutcome {
    DeleteLab {
        worker_id: hostile_id(),
        lab_id: *lab,
        force,
        requested_by: Actor::api("operator"),
        owned_by: None,
    }
    .execute(t.services())
    .await
    .expect("the delete runs")
}

async fn record_ids(t: &TestApp) -> Vec<LabId> {
    t.services()
        .labs
        .list(&hostile_id())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.lab_id)
        .collect()
}

/// The raw documents of a collection about the hostile worker.
async fn raw(t: &TestApp, collection: &str) -> Vec<Document> {
    use futures::TryStreamExt;
    t.app
        .db
        .collection::<Document>(collection)
        .find(doc! {"worker_id": HOSTILE})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

fn bson_len(d: &Document) -> usize {
    mongodb::bson::to_vec(d).unwrap().len()
}

/// Short and escaped: at most `max` bytes, no control character.
#[track_caller]
fn assert_short_and_escaped(what: &str, text: &str, max: usize) {
    assert!(
        text.len() <= max,
        "{what}: {} bytes, more than {max}: {:.300}",
        text.len(),
        text
    );
    assert!(
        !text.chars().any(char::is_control),
        "{what} holds a control character: {text:.300?}"
    );
}

#[tokio::test]
async fn a_login_redirected_to_another_host_sends_the_password_nowhere() {
    let t = TestApp::spawn_with(1, &[]).await;
    let cml = HostileCml::start().await;
    let other = HostileCml::start().await;
    register(&t, &cml).await;
    let lab = cml.add_lab("DEFINED_ON_CORE");
    let location = other.elsewhere("/api/v0/auth_extended");
    let to = location.clone();
    cml.on(Method::POST, "/api/v0/auth_extended", move || {
        redirect(307, &to)
    });

    let r = refresh(&t).await;
    assert_eq!(r.status, RunStatus::Failed, "{r:?}");
    let error = r.error.unwrap();
    assert!(
        error.contains("307") && error.contains(&location) && error.contains("not followed"),
        "{error}"
    );
    let logins: Vec<Seen> = cml
        .seen()
        .into_iter()
        .filter(|s| s.method == Method::POST && s.path == "/api/v0/auth_extended")
        .collect();
    assert!(
        !logins.is_empty() && logins.iter().all(|s| s.body.contains(ADMIN_PASSWORD)),
        "the worker itself was asked to log in: {logins:?}"
    );
    let out = delete(&t, &lab, false).await;
    assert!(!out.lab_gone, "{out:?}");
    assert!(out.message.contains(&location), "{}", out.message);
    assert!(
        other.seen().is_empty(),
        "the other host received {:?}",
        other.seen()
    );
    assert!(cml.has_lab(&lab));
}

#[tokio::test]
async fn a_delete_redirected_anywhere_or_answered_with_another_success_is_no_deleted_lab() {
    let t = TestApp::spawn_with(1, &[]).await;
    let cml = HostileCml::start().await;
    let other = HostileCml::start().await;
    register(&t, &cml).await;
    let lab = cml.add_lab("DEFINED_ON_CORE");
    // The other server has the lab too, and deletes it on any request.
    other
        .lock()
        .labs
        .insert(lab.to_string(), "DEFINED_ON_CORE".into());
    assert_eq!(refresh(&t).await.status, RunStatus::Succeeded);
    let path = format!("/api/v0/labs/{lab}");

    // 303: a client turns it into GET /labs/{id}, which CML answers 200.
    // 302 and 307 elsewhere: a DELETE there that answers 204.
    let answers: Vec<(&str, Response)> = vec![
        ("303 to the lab itself", redirect(303, &path)),
        ("302 elsewhere", redirect(302, &other.elsewhere(&path))),
        ("307 elsewhere", redirect(307, &other.elsewhere(&path))),
        (
            "200 instead of 204",
            axum::Json(json!({"deleted": true})).into_response(),
        ),
    ];
    for (what, response) in answers {
        let response = Arc::new(Mutex::new(Some(response)));
        cml.on(Method::DELETE, &path, move || {
            response
                .lock()
                .unwrap()
                .take()
                .expect("one DELETE per case")
        });
        let out = delete(&t, &lab, false).await;
        assert!(
            matches!(
                out.kind,
                DeleteOutcomeKind::CmlRefused {
                    retryable: true,
                    ..
                }
            ),
            "{what}: {out:?}"
        );
        assert!(!out.lab_gone, "{what}: {out:?}");
        assert!(cml.has_lab(&lab), "{what}");
        assert_eq!(
            record_ids(&t).await,
            [lab],
            "{what}: the record stays, no tombstone"
        );
    }
    let deletes = cml
        .seen()
        .iter()
        .filter(|s| s.method == Method::DELETE && s.path == path)
        .count();
    assert_eq!(deletes, 4, "one DELETE per case, none repeated");
    assert!(
        other.seen().is_empty(),
        "the other server received {:?}",
        other.seen()
    );

    // CML's own 204 deletes it.
    cml.behave();
    let out = delete(&t, &lab, false).await;
    assert_eq!(out.kind, DeleteOutcomeKind::Deleted, "{out:?}");
    assert!(!cml.has_lab(&lab) && record_ids(&t).await.is_empty());
}

#[tokio::test]
async fn a_lab_list_redirected_to_another_server_is_no_list_and_prunes_nothing() {
    let t = TestApp::spawn_with(1, &[]).await;
    let cml = HostileCml::start().await;
    let other = HostileCml::start().await;
    register(&t, &cml).await;
    let mut real: Vec<LabId> = (0..3).map(|_| cml.add_lab("STOPPED")).collect();
    real.sort();
    assert_eq!(refresh(&t).await.status, RunStatus::Succeeded);
    assert_eq!(record_ids(&t).await, real);
    // The other server lists labs of its own, which CML does not have.
    for _ in 0..3 {
        other.add_lab("STOPPED");
    }
    let location = other.elsewhere("/api/v0/labs");
    let to = location.clone();
    cml.on(Method::GET, "/api/v0/labs", move || redirect(302, &to));

    let r = refresh(&t).await;
    assert_eq!(r.status, RunStatus::Failed, "{r:?}");
    assert!(
        r.error.as_deref().unwrap().contains(&location),
        "{:?}",
        r.error
    );
    assert_eq!((r.listed, r.pruned, r.created), (0, 0, 0));
    assert_eq!(record_ids(&t).await, real, "every real record kept");
    assert!(other.seen().is_empty(), "{:?}", other.seen());
}

#[tokio::test]
async fn texts_of_megabytes_full_of_escapes_are_stored_logged_and_returned_short_and_escaped() {
    // Read limit raised so that a 17 MB description is read at all.
    let t = TestApp::spawn_with(1, &[("LABSYNC__CML__MAX_RESPONSE_BYTES", "33554432")]).await;
    let cml = HostileCml::start().await;
    register(&t, &cml).await;
    let lab = cml.add_lab("STARTED");
    assert_eq!(refresh(&t).await.status, RunStatus::Succeeded);
    let api = TestApi::start(&t).await;

    // A refresh whose list fails with a 17 MB description: the answer,
    // the stored report and the worker's state all say so, briefly.
    cml.on(Method::GET, "/api/v0/labs", || {
        cml_error(StatusCode::INTERNAL_SERVER_ERROR, &huge(17_000_000))
    });
    let (status, body) = api
        .send(api.req(
            Method::POST,
            &format!("/api/v1/workers/{HOSTILE}/labs/refresh"),
            Some(ADMIN_TOKEN),
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let detail = body["detail"].as_str().expect("a problem with a detail");
    assert_short_and_escaped("the problem's detail", detail, 1024);
    assert!(detail.contains("500"), "{detail}");
    let stored = t
        .services()
        .reports
        .recent(&labsync_application::ports::RunQuery::newest(
            Some(&hostile_id()),
            1,
        ))
        .await
        .unwrap();
    assert_eq!(stored[0].status, RunStatus::Failed, "the run is stored");
    assert_short_and_escaped(
        "the stored error",
        stored[0].error.as_deref().unwrap(),
        1024,
    );
    let overview = t.app.inventory.worker(&hostile_id()).await.unwrap();
    assert_eq!(overview.sync_state, SyncState::Failing);
    cml.behave();

    // Deletes: a state of 3 MB, a convergence check answering 3 MB, a
    // DELETE refused with 3 MB; each attempt is written to the lab's
    // history, the audit log and the outbox.
    let state = format!("/api/v0/labs/{lab}/state");
    cml.on(Method::GET, &state, || {
        axum::Json(huge(3 << 20)).into_response()
    });
    for _ in 0..3 {
        let out = delete(&t, &lab, false).await;
        assert!(
            matches!(out.kind, DeleteOutcomeKind::RefusedRunning { .. }),
            "{}",
            out.kind.word()
        );
        assert_short_and_escaped("the refusal", &out.message, 1024);
    }
    // Forced: the state goes into the `started` audit entry, then the
    // stop's convergence check answers 3 MB.
    cml.on(
        Method::GET,
        &format!("/api/v0/labs/{lab}/check_if_converged"),
        || axum::Json(huge(3 << 20)).into_response(),
    );
    let out = delete(&t, &lab, true).await;
    assert!(
        matches!(out.kind, DeleteOutcomeKind::CmlRefused { .. }),
        "{}",
        out.kind.word()
    );
    assert_short_and_escaped("the convergence failure", &out.message, 1024);
    cml.behave();
    cml.on(Method::DELETE, &format!("/api/v0/labs/{lab}"), || {
        cml_error(StatusCode::BAD_REQUEST, &huge(3 << 20))
    });
    let out = delete(&t, &lab, true).await;
    assert!(
        matches!(out.kind, DeleteOutcomeKind::CmlRefused { .. }),
        "{}",
        out.kind.word()
    );
    assert_short_and_escaped("the refused DELETE", &out.message, 1024);
    assert!(cml.has_lab(&lab));

    // What was written about the worker is small.
    let audit = raw(&t, "audit").await;
    assert!(audit.len() >= 6, "{} audit entries", audit.len());
    for d in &audit {
        assert_short_and_escaped("an audit entry", d.get_str("detail").unwrap(), 1024);
    }
    let outbox = raw(&t, "outbox").await;
    assert!(outbox.len() >= 6, "{} events", outbox.len());
    for d in &outbox {
        assert!(bson_len(d) <= 4096, "an event of {} bytes", bson_len(d));
    }
    let records = raw(&t, "labs").await;
    assert_eq!(records.len(), 1);
    assert!(
        bson_len(&records[0]) <= 32 * 1024,
        "a record of {} bytes",
        bson_len(&records[0])
    );
    let history = t
        .services()
        .labs
        .get(&hostile_id(), &lab)
        .await
        .unwrap()
        .expect("the record stays")
        .history;
    let attempts: Vec<String> = history
        .iter()
        .filter_map(|h| match &h.event {
            labsync_application::domain::HistoryEvent::DeleteAttempt { detail, .. } => {
                Some(detail.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(attempts.len(), 5, "every attempt in the history");
    for detail in &attempts {
        assert_short_and_escaped("a history entry", detail, 1024);
    }

    // And what the process prints and logs.
    cml.on(Method::GET, &state, || {
        axum::Json(huge(3 << 20)).into_response()
    });
    let o = t
        .cli(&["delete-lab", "--worker", HOSTILE, "--lab", lab.as_str()])
        .await;
    assert_eq!(o.status.code(), Some(1), "{:.2000}", output_text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_short_and_escaped("the CLI's answer", out.trim_end(), 1024);
    let longest = String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(longest <= 4096, "a log line of {longest} bytes");
    api.stop().await;
}

#[tokio::test]
async fn a_lab_listed_twenty_thousand_times_is_fetched_and_counted_once() {
    let t = TestApp::spawn_with(1, &[]).await;
    let cml = HostileCml::start().await;
    register(&t, &cml).await;
    let (twice, once) = (cml.add_lab("STOPPED"), cml.add_lab("STARTED"));
    let mut list = vec![twice.to_string(); 20_000];
    list.push(once.to_string());
    list.push(twice.to_string());
    cml.on(Method::GET, "/api/v0/labs", move || {
        axum::Json(list.clone()).into_response()
    });

    let r = refresh(&t).await;
    assert_eq!(r.status, RunStatus::Succeeded, "{:?}", r.error);
    assert_eq!((r.listed, r.created, r.failed), (2, 2, 0), "{r:?}");
    let mut expected = vec![twice, once];
    expected.sort();
    assert_eq!(record_ids(&t).await, expected);
    let fetched = |lab: LabId| {
        cml.seen()
            .iter()
            .filter(|s| s.method == Method::GET && s.path == format!("/api/v0/labs/{lab}"))
            .count()
    };
    assert_eq!(
        (fetched(twice), fetched(once)),
        (1, 1),
        "each lab fetched once"
    );
}
