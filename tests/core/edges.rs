//! The API's hostile edges: what rough clients did to the release binary,
//! one test each, through the real server over TCP. Floods are bounded,
//! stay on the loopback interface and stop by themselves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use labsync_test_support::poll_until;
use mongodb::bson::{Document, doc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{
    ADMIN_PASSWORD, ADMIN_TOKEN, OPERATOR_TOKEN, TestApi, TestApp, VIEWER_TOKEN, eventually,
};

fn addr(api: &TestApi) -> SocketAddr {
    api.base.trim_start_matches("http://").parse().unwrap()
}

/// A client without a connection pool: every request opens a connection
/// of its own, as a probe does.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Checks the RFC 9457 shape and the problem's type.
fn assert_problem(status: StatusCode, body: &Value, want: u16, kind: &str) {
    assert_eq!(status.as_u16(), want, "{body}");
    assert_eq!(body["status"], want, "{body}");
    assert_eq!(
        body["type"],
        format!("urn:labsync:problem:{kind}").as_str(),
        "{body}"
    );
    for key in ["title", "detail", "request_id"] {
        assert!(
            body[key].as_str().is_some_and(|s| !s.is_empty()),
            "{key} missing: {body}"
        );
    }
}

/// How a slow client's connection ended.
#[derive(Debug, Clone, Copy)]
struct SlowEnd {
    opened: Instant,
    /// When the server closed it; `None` if it was still open when the
    /// client gave up.
    closed: Option<Instant>,
    /// Bytes the server sent before closing.
    answered: usize,
}

/// A client that starts a request and then sends one more header line
/// every 200 ms, never ending the header; it gives up by itself after
/// `give_up`. `open` counts the connections still open.
async fn slow_client(
    addr: SocketAddr,
    n: usize,
    open: Arc<AtomicUsize>,
    give_up: Duration,
) -> tokio::task::JoinHandle<SlowEnd> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let opened = Instant::now();
    open.fetch_add(1, Ordering::SeqCst);
    stream
        .write_all(b"GET /api/v1/workers HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        .await
        .expect("the first line");
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        let mut answered = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let deadline = tokio::time::sleep(give_up);
        tokio::pin!(deadline);
        let closed = loop {
            tokio::select! {
                r = stream.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break Some(Instant::now()),
                    Ok(k) => answered += k,
                },
                _ = tick.tick() => {
                    if stream.write_all(format!("x-slow-{n}: y\r\n").as_bytes()).await.is_err() {
                        break Some(Instant::now());
                    }
                }
                () = &mut deadline => break None,
            }
        };
        open.fetch_sub(1, Ordering::SeqCst);
        SlowEnd {
            opened,
            closed,
            answered,
        }
    })
}

#[tokio::test]
async fn slow_clients_beyond_the_connection_limit_are_closed_and_healthz_answers_meanwhile() {
    const LIMIT: usize = 6;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
    let t = TestApp::spawn_with(
        1,
        &[
            ("LABSYNC__API__MAX_CONNECTIONS", "6"),
            ("LABSYNC__API__MAX_REQUESTS_IN_FLIGHT", "4"),
            ("LABSYNC__API__HEADER_READ_TIMEOUT_SECS", "3"),
        ],
    )
    .await;
    let api = TestApi::start(&t).await;
    let open = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    // Three times the limit, each trickling its header for up to 15 s.
    let mut slow = Vec::new();
    for n in 0..3 * LIMIT {
        slow.push(slow_client(addr(&api), n, open.clone(), Duration::from_secs(15)).await);
    }
    // The oldest idle connections make room: the server never holds more
    // than its limit, long before any header timeout.
    let bounded = poll_until(Duration::from_millis(10), HEADER_TIMEOUT / 2, || async {
        open.load(Ordering::SeqCst) <= LIMIT
    })
    .await;
    assert!(
        bounded.is_ok(),
        "{} of {} slow connections still open: no connection limit",
        open.load(Ordering::SeqCst),
        3 * LIMIT
    );

    // /healthz and the API answer while the slow clients fill the rest.
    let probe = fresh_client();
    let r = probe.get(api.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = probe
        .get(api.url("/api/v1/workers"))
        .bearer_auth(VIEWER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        started.elapsed() < HEADER_TIMEOUT && open.load(Ordering::SeqCst) >= LIMIT - 2,
        "the probes were answered during the flood ({:?} after it began, {} slow connections open)",
        started.elapsed(),
        open.load(Ordering::SeqCst)
    );

    // The rest are closed at the header timeout, though they keep sending.
    let ends: Vec<SlowEnd> = join_all(slow)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut evicted = 0;
    for end in &ends {
        let closed = end
            .closed
            .expect("every slow connection is closed by the server");
        let lived = closed - end.opened;
        assert!(
            lived < HEADER_TIMEOUT + Duration::from_secs(3),
            "a slow connection lived {lived:?}"
        );
        if lived
            < HEADER_TIMEOUT
                .checked_sub(Duration::from_millis(300))
                .unwrap()
        {
            evicted += 1;
        }
        assert_eq!(end.answered, 0, "no slow request was answered");
    }
    assert!(
        evicted >= 2 * LIMIT,
        "{evicted} slow connections made room for newer ones"
    );
    assert!(evicted < ends.len(), "some were left to the header timeout");
    let r = probe.get(api.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    api.stop().await;
}

#[tokio::test]
async fn a_connection_on_which_nothing_moves_is_closed_after_the_idle_timeout_unless_it_runs_a_request()
 {
    let t = TestApp::spawn_with(
        1,
        &[
            ("LABSYNC__API__IDLE_TIMEOUT_SECS", "1"),
            ("LABSYNC__API__HEADER_READ_TIMEOUT_SECS", "30"),
        ],
    )
    .await;
    let api = TestApi::start(&t).await;
    let open = Arc::new(AtomicUsize::new(0));
    // One client that keeps sending, one silent, one waiting on a delete
    // that CML takes two seconds over.
    let sending = slow_client(addr(&api), 0, open.clone(), Duration::from_secs(3)).await;
    let mut silent = TcpStream::connect(addr(&api)).await.unwrap();
    let connected = Instant::now();
    let lab = t.add_lab("DEFINED_ON_CORE");
    t.faults(json!({"latency_ms": {"delete_lab": 2000}}));
    let delete = tokio::spawn(
        api.req(
            Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{lab}"),
            Some(OPERATOR_TOKEN),
        )
        .send(),
    );

    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the silent connection is closed by the server");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed without an answer: {read:?}"
    );
    let lived = connected.elapsed();
    assert!(
        lived >= Duration::from_millis(900) && lived < Duration::from_secs(5),
        "closed after the idle timeout, not at once nor at the header timeout: {lived:?}"
    );
    let delete = delete
        .await
        .unwrap()
        .expect("the request running longer than the idle timeout is answered");
    assert_eq!(delete.status(), StatusCode::OK);
    let end = sending.await.unwrap();
    assert!(
        end.closed.is_none(),
        "a connection that keeps sending is not idle: {end:?}"
    );
    api.stop().await;
}

#[tokio::test]
async fn requests_beyond_the_in_flight_limit_get_a_503_problem_and_healthz_still_answers() {
    let t = TestApp::spawn_with(
        1,
        &[
            ("LABSYNC__API__MAX_CONNECTIONS", "16"),
            ("LABSYNC__API__MAX_REQUESTS_IN_FLIGHT", "2"),
        ],
    )
    .await;
    let api = TestApi::start(&t).await;
    // Two requests whose body never comes: both are in flight until the
    // body timeout.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr(&api)).await.unwrap();
        s.write_all(
            format!(
                "POST /api/v1/workers HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\
                 content-type: application/json\r\ncontent-length: 64\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        held.push(s);
    }
    let probe = fresh_client();
    let workers = || {
        probe
            .get(api.url("/api/v1/workers"))
            .bearer_auth(VIEWER_TOKEN)
            .send()
    };
    eventually("a request beyond the limit to be refused", || async {
        workers().await.unwrap().status() == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    // Refused at once, as long as the two are held.
    let r = workers().await.unwrap();
    let status = r.status();
    assert!(
        r.headers().contains_key("retry-after"),
        "a Retry-After header"
    );
    let body: Value = r.json().await.unwrap();
    assert_problem(status, &body, 503, "overloaded");
    let r = probe.get(api.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "probes are not shed");

    drop(held);
    eventually("requests to be served again", || async {
        workers().await.unwrap().status() == StatusCode::OK
    })
    .await;
    api.stop().await;
}

/// The stored worker document, read from the raw collection (not through
/// the repository and its cache).
async fn stored_worker(t: &TestApp, id: &str) -> Document {
    t.app
        .db
        .collection::<Document>("workers")
        .find_one(doc! {"_id": id})
        .await
        .unwrap()
        .expect("the worker document")
}

#[tokio::test]
async fn concurrent_patches_of_a_worker_keep_every_change() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let patch = |body: Value| {
        api.req(Method::PATCH, "/api/v1/workers/cml-1", Some(ADMIN_TOKEN))
            .json(&body)
    };
    let rounds = 30;
    let mut lost = Vec::new();
    for round in 0..rounds {
        let name = format!("round {round}");
        let (disable, rename) = tokio::join!(
            api.send(patch(json!({"enabled": false}))),
            api.send(patch(json!({"name": name})))
        );
        assert_eq!(disable.0, StatusCode::OK, "{}", disable.1);
        assert_eq!(rename.0, StatusCode::OK, "{}", rename.1);
        let stored = stored_worker(&t, "cml-1").await;
        let (_, shown) = api.get("/api/v1/workers/cml-1", VIEWER_TOKEN).await;
        if stored.get_bool("enabled") != Ok(false)
            || stored.get_str("name") != Ok(name.as_str())
            || shown["enabled"] != false
            || shown["name"] != name.as_str()
        {
            lost.push(format!(
                "round {round}: stored {stored}, shown {} {}",
                shown["enabled"], shown["name"]
            ));
        }
        let (s, body) = api.send(patch(json!({"enabled": true}))).await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    assert!(
        lost.is_empty(),
        "{} of {rounds} rounds lost a change:\n{}",
        lost.len(),
        lost.join("\n")
    );
    api.stop().await;
}

#[tokio::test]
async fn an_error_larger_than_a_mebibyte_stays_a_problem_document() {
    // A body limit above the size the problem middleware reads, and a
    // member name of 1.5 MB that the JSON error repeats.
    let t = TestApp::spawn_with(1, &[("LABSYNC__API__BODY_LIMIT_BYTES", "4194304")]).await;
    let api = TestApi::start(&t).await;
    let member = "x".repeat(1_500_000);
    let body = format!(r#"{{"{member}": 1}}"#);
    let r = api
        .req(Method::POST, "/api/v1/workers", Some(ADMIN_TOKEN))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(
        r.headers()["content-type"],
        "application/problem+json",
        "{status}"
    );
    let text = r.text().await.unwrap();
    assert!(text.len() < 16 * 1024, "the answer is {} bytes", text.len());
    let problem: Value = serde_json::from_str(&text).expect("a JSON document");
    assert_problem(status, &problem, 400, "invalid-body");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("Failed to deserialize the JSON body")
            && detail.ends_with("characters cut)"),
        "the detail keeps its beginning and says it was cut: {problem}"
    );
    api.stop().await;
}

#[tokio::test]
async fn the_bearer_scheme_is_read_in_any_case() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    for header in [
        format!("Bearer {VIEWER_TOKEN}"),
        format!("bearer {VIEWER_TOKEN}"),
        format!("BEARER {VIEWER_TOKEN}"),
        format!("bEaReR   {VIEWER_TOKEN}"),
    ] {
        let (s, body) = api
            .send(
                api.http
                    .get(api.url("/api/v1/workers"))
                    .header("authorization", &header),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{header:.12}: {body}");
    }
    for header in [
        format!("Basic {VIEWER_TOKEN}"),
        format!("Bearer{VIEWER_TOKEN}"),
        format!("Bearers {VIEWER_TOKEN}"),
    ] {
        let (s, body) = api
            .send(
                api.http
                    .get(api.url("/api/v1/workers"))
                    .header("authorization", &header),
            )
            .await;
        assert_problem(s, &body, 401, "unauthorized");
    }
    api.stop().await;
}

#[tokio::test]
async fn patch_refuses_what_post_refuses_and_changes_nothing() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let before = stored_worker(&t, "cml-1").await;
    for bad in [
        json!({"username": "", "password": ADMIN_PASSWORD}),
        json!({"username": "ad\u{0}min", "password": ADMIN_PASSWORD}),
        json!({"ca_cert_pem": "not a certificate", "password": ADMIN_PASSWORD}),
        json!({"name": "evil\u{0}name"}),
        json!({"name": "bell\u{7}"}),
        json!({"name": "two\nlines"}),
        json!({"name": ""}),
        json!({"name": "n".repeat(201)}),
    ] {
        let (s, body) = api
            .send(
                api.req(Method::PATCH, "/api/v1/workers/cml-1", Some(ADMIN_TOKEN))
                    .json(&bad),
            )
            .await;
        assert_problem(s, &body, 400, "invalid-request");
        assert_eq!(
            stored_worker(&t, "cml-1").await,
            before,
            "{bad} changed nothing"
        );
    }
    let url = t.sim().base_url();
    for bad in [
        json!({"id": "w-name", "name": "evil\u{0}name"}),
        json!({"id": "w-user", "username": "ad\u{7}min"}),
        json!({"id": "w-pem", "ca_cert_pem": "not a certificate"}),
    ] {
        let mut create = json!({"base_url": url, "username": "admin", "password": ADMIN_PASSWORD, "allow_http": true});
        for (k, v) in bad.as_object().unwrap() {
            create[k] = v.clone();
        }
        let (s, body) = api
            .send(
                api.req(Method::POST, "/api/v1/workers", Some(ADMIN_TOKEN))
                    .json(&create),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{create}: {body}");
    }
    let (s, body) = api
        .send(
            api.req(Method::PATCH, "/api/v1/workers/cml-1", Some(ADMIN_TOKEN))
                .json(&json!({"name": "Lab server 1 (Zürich)"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "a good name still goes through: {body}");
    api.stop().await;
}

#[tokio::test]
async fn a_request_id_is_echoed_only_when_short_and_plain() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let ask = |id: &str| {
        api.http
            .get(api.url("/api/v1/workers/cml-9"))
            .bearer_auth(VIEWER_TOKEN)
            .header("x-request-id", id)
            .send()
    };
    for good in ["abc-123_X.9", "0b3c1f1e-4d7a-4c59-9f0a-3e1d2c4b5a69"] {
        let r = ask(good).await.unwrap();
        assert_eq!(r.headers()["x-request-id"], good);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["request_id"], good, "{body}");
    }
    let long = "a".repeat(65);
    for bad in [
        "<script>alert(1)</script>",
        "\"}, \"admin\": true, \"x\": {\"",
        "two words",
        "%0d%0ainjected",
        long.as_str(),
    ] {
        let r = ask(bad).await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let echoed = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_ne!(echoed, bad);
        assert!(
            uuid::Uuid::parse_str(&echoed).is_ok(),
            "a new id instead of {bad:?}: {echoed:?}"
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["request_id"], echoed.as_str(), "{body}");
        assert!(!body.to_string().contains(bad), "{body}");
    }
    api.stop().await;
}

#[tokio::test]
async fn metrics_need_a_viewer_token_by_default_and_follow_the_setting() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let (s, body) = api.send(api.http.get(api.url("/metrics"))).await;
    assert_problem(s, &body, 401, "unauthorized");
    for path in ["/metrics", "/api/v1/metrics"] {
        let r = api
            .http
            .get(api.url(path))
            .bearer_auth(VIEWER_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert!(
            r.text()
                .await
                .unwrap()
                .contains("labsync_http_requests_total")
        );
    }
    api.stop().await;

    for (setting, token, want) in [
        ("open", None, 200),
        ("admin", Some(OPERATOR_TOKEN), 403),
        ("admin", Some(ADMIN_TOKEN), 200),
        ("off", Some(ADMIN_TOKEN), 404),
    ] {
        let t = TestApp::spawn_with(1, &[("LABSYNC__API__METRICS_AUTH", setting)]).await;
        let api = TestApi::start(&t).await;
        let (s, body) = api.send(api.req(Method::GET, "/metrics", token)).await;
        assert_eq!(s.as_u16(), want, "metrics_auth={setting}: {body}");
        api.stop().await;
    }
    let refused = labsync_infrastructure::configuration::Settings::from_overrides(&[(
        "LABSYNC__API__METRICS_AUTH",
        "everyone",
    )])
    .unwrap_err();
    assert!(refused.to_string().contains("metrics_auth"), "{refused}");
}

#[tokio::test]
async fn only_admins_read_why_a_workers_run_failed() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    // A worker nothing listens for: its error names the URL.
    let port = crate::helpers::free_port();
    let (s, body) = api
        .send(
            api.req(Method::POST, "/api/v1/workers", Some(ADMIN_TOKEN))
                .json(
                    &json!({"id": "down", "base_url": format!("http://127.0.0.1:{port}"),
                    "username": "admin", "password": ADMIN_PASSWORD, "allow_http": true}),
                ),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = api
        .send(api.req(
            Method::POST,
            "/api/v1/workers/down/labs/refresh",
            Some(ADMIN_TOKEN),
        ))
        .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{body}");
    let internal = format!("127.0.0.1:{port}");
    // A run with failed labs on cml-1.
    t.faults(json!({"error_rate": {"lab_details": 1.0}}));
    let (_, report) = api
        .send(api.req(
            Method::POST,
            "/api/v1/workers/cml-1/labs/refresh",
            Some(ADMIN_TOKEN),
        ))
        .await;
    let admin_failures = report["report"]["failures"]
        .as_array()
        .or(report["failures"].as_array())
        .cloned()
        .unwrap_or_default();
    assert!(!admin_failures.is_empty(), "labs failed: {report}");

    let (_, admin_view) = api.get("/api/v1/workers/down", ADMIN_TOKEN).await;
    let admin_error = admin_view["last_run"]["error"].as_str().unwrap().to_owned();
    assert!(admin_error.contains(&internal), "{admin_error}");
    for token in [VIEWER_TOKEN, OPERATOR_TOKEN] {
        let (_, one) = api.get("/api/v1/workers/down", token).await;
        let (_, all) = api.get("/api/v1/workers", token).await;
        let (_, runs) = api.get("/api/v1/refresh-runs?limit=100", token).await;
        // Every error text of every run this caller is shown.
        let mut reports = vec![one["last_run"].clone()];
        reports.extend(
            all.as_array()
                .unwrap()
                .iter()
                .map(|w| w["last_run"].clone()),
        );
        reports.extend(runs.as_array().unwrap().iter().cloned());
        let mut errors = Vec::new();
        for r in &reports {
            errors.extend(r["error"].as_str().map(str::to_owned));
            for f in r["failures"].as_array().into_iter().flatten() {
                errors.push(f["error"].as_str().unwrap().to_owned());
            }
        }
        assert!(errors.len() > admin_failures.len(), "{errors:?}");
        for e in &errors {
            assert!(
                e.contains("admins only") && !e.contains(&internal) && !e.contains("/api/v0"),
                "a caller below admin reads {e:?}"
            );
        }
        let error = one["last_run"]["error"].as_str().unwrap();
        assert!(
            error.contains("admin"),
            "a sentence saying who may read it: {error}"
        );
        assert_eq!(one["sync_state"], "failing");
        let cml1 = all
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == "cml-1")
            .unwrap();
        let failures = cml1["last_run"]["failures"].as_array().unwrap();
        assert_eq!(failures.len(), admin_failures.len());
        for (shown, full) in failures.iter().zip(&admin_failures) {
            assert_eq!(shown["lab_id"], full["lab_id"]);
            assert_ne!(shown["error"], full["error"]);
        }
    }
    api.stop().await;
}
