//! Lab events: written to the outbox with the change, delivered as
//! CloudEvents to an HTTP sink at least once, retried when the sink fails.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use labsync_infrastructure::mongo::outbox;
use mongodb::bson::doc;
use reqwest::Method;
use serde_json::Value;

use crate::helpers::{OPERATOR_TOKEN, SEEDED_LABS, TestApi, TestApp, eventually};

/// An HTTP sink that records what it receives and fails the first
/// `failures` deliveries with 503.
#[derive(Clone, Default)]
struct Sink {
    received: Arc<Mutex<Vec<Value>>>,
    failures: Arc<AtomicUsize>,
    attempts: Arc<AtomicUsize>,
}

impl Sink {
    async fn start(failures: usize) -> (Self, String) {
        let sink = Self {
            failures: Arc::new(AtomicUsize::new(failures)),
            ..Self::default()
        };
        let s = sink.clone();
        let app = axum::Router::new().route(
            "/events",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let s = s.clone();
                    async move {
                        s.attempts.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(headers["content-type"], "application/cloudevents+json");
                        if s.failures.load(Ordering::SeqCst) > 0 {
                            s.failures.fetch_sub(1, Ordering::SeqCst);
                            return StatusCode::SERVICE_UNAVAILABLE;
                        }
                        s.received
                            .lock()
                            .unwrap()
                            .push(serde_json::from_slice(&body).unwrap());
                        StatusCode::ACCEPTED
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (sink, url)
    }

    fn of_type(&self, t: &str) -> Vec<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == t)
            .cloned()
            .collect()
    }
}

#[tokio::test]
async fn refreshes_and_deletes_write_their_events_in_the_outbox() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let events = outbox::list(&t.app.db, doc! {}).await.unwrap();
    assert_eq!(events.len(), SEEDED_LABS, "one discovered event per lab");
    assert!(
        events
            .iter()
            .all(|e| e.get_str("kind") == Ok("discovered") && e.get_str("status") == Ok("pending"))
    );
    assert!(
        events.iter().all(|e| e.get_datetime("expires_at").is_ok()),
        "no sink: they expire"
    );

    let records = t.records().await;
    let changed = records
        .iter()
        .find(|r| r.snapshot.state.as_str() != "STARTED")
        .unwrap()
        .lab_id;
    t.sim()
        .update_lab(
            changed.as_str(),
            cml_sim::LabSpec {
                state: Some("STARTED".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let gone = records.iter().find(|r| r.lab_id != changed).unwrap().lab_id;
    t.sim().remove_lab(gone.as_str());
    t.refresh().await;
    let changed_events = outbox::list(&t.app.db, doc! {"lab_id": changed.as_str()})
        .await
        .unwrap();
    let k: Vec<&str> = changed_events
        .iter()
        .map(|e| e.get_str("kind").unwrap())
        .collect();
    assert_eq!(k, ["discovered", "changed", "state_changed"]);
    let ce = changed_events[2].get_document("cloudevent").unwrap();
    assert_eq!(ce.get_str("type"), Ok("io.labsync.lab.state_changed"));
    assert_eq!(
        ce.get_document("data").unwrap().get_str("to"),
        Ok("STARTED")
    );
    let pruned = outbox::list(&t.app.db, doc! {"lab_id": gone.as_str(), "kind": "pruned"})
        .await
        .unwrap();
    assert_eq!(pruned.len(), 1);

    let wiped = t.add_lab("DEFINED_ON_CORE");
    t.refresh().await;
    t.delete(&wiped, false).await.unwrap();
    let deleted = outbox::list(
        &t.app.db,
        doc! {"lab_id": wiped.as_str(), "kind": "deleted"},
    )
    .await
    .unwrap();
    assert_eq!(deleted.len(), 1, "a delete writes exactly one event");
    let ce = deleted[0].get_document("cloudevent").unwrap();
    assert_eq!(ce.get_str("specversion"), Ok("1.0"));
    assert_eq!(ce.get_str("subject"), Ok(wiped.as_str()));
    assert_eq!(ce.get_str("source"), Ok("/labsync/workers/cml-1"));
    assert_eq!(
        ce.get_document("data").unwrap().get_str("requested_by"),
        Ok("api:operator")
    );

    let running = t.add_lab("STARTED");
    t.delete(&running, false).await.unwrap();
    let failed = outbox::list(
        &t.app.db,
        doc! {"lab_id": running.as_str(), "kind": "delete_failed"},
    )
    .await
    .unwrap();
    assert_eq!(failed.len(), 1);
}

#[tokio::test]
async fn a_sink_receives_a_delete_event_once() {
    let (sink, url) = Sink::start(0).await;
    let t = TestApp::spawn_with(1, &[("LABSYNC__EVENTS__SINK_URL", &url)]).await;
    let wiped = t.add_lab("DEFINED_ON_CORE");
    let api = TestApi::start(&t).await;
    let (s, body) = api
        .send(api.req(
            Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{wiped}"),
            Some(OPERATOR_TOKEN),
        ))
        .await;
    assert_eq!(s.as_u16(), 200, "{body}");
    eventually("the sink to receive the event", || async {
        !sink.of_type("io.labsync.lab.deleted").is_empty()
    })
    .await;
    // More relay cycles deliver nothing new.
    let before = sink.attempts.load(Ordering::SeqCst);
    eventually("a few more relay cycles", || async {
        outbox::list(&t.app.db, doc! {"status": "pending"})
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    let got = sink.of_type("io.labsync.lab.deleted");
    assert_eq!(got.len(), 1, "delivered once");
    assert_eq!(got[0]["subject"], wiped.as_str());
    assert_eq!(got[0]["data"]["requested_by"], "api:operator");
    assert_eq!(sink.attempts.load(Ordering::SeqCst), before);
    let stored = outbox::list(&t.app.db, doc! {"kind": "deleted"})
        .await
        .unwrap();
    assert_eq!(stored[0].get_str("status"), Ok("delivered"));
    api.stop().await;
}

#[tokio::test]
async fn a_failing_sink_is_retried_until_it_accepts() {
    let (sink, url) = Sink::start(2).await;
    let t = TestApp::spawn_with(1, &[("LABSYNC__EVENTS__SINK_URL", &url)]).await;
    let wiped = t.add_lab("DEFINED_ON_CORE");
    let api = TestApi::start(&t).await;
    t.delete(&wiped, false).await.unwrap();
    // The relay marks it delivered after the sink has answered.
    eventually("the event to be delivered and marked so", || async {
        outbox::list(&t.app.db, doc! {"kind": "deleted", "status": "delivered"})
            .await
            .unwrap()
            .len()
            == 1
    })
    .await;
    assert_eq!(sink.of_type("io.labsync.lab.deleted").len(), 1);
    let stored = outbox::list(&t.app.db, doc! {"kind": "deleted"})
        .await
        .unwrap();
    assert_eq!(stored[0].get_str("status"), Ok("delivered"));
    assert_eq!(
        stored[0].get_i64("attempts"),
        Ok(3),
        "two failures, then success"
    );
    assert!(stored[0].get_str("last_error").unwrap().contains("503"));
    api.stop().await;
}

/// One request a [`ScriptedSink`] received, and what it answered.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    referer: Option<String>,
    body: Value,
    status: u16,
}

type Script = Arc<dyn Fn(usize, &Value) -> axum::response::Response + Send + Sync>;

/// A sink that answers as its script says (by the request's number and
/// body), optionally slowly, and records every request on any path and
/// method, with how many were in flight at once.
#[derive(Clone)]
struct ScriptedSink {
    seen: Arc<Mutex<Vec<Seen>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl ScriptedSink {
    async fn start(delay: std::time::Duration, script: Script) -> (Self, String) {
        let sink = Self {
            seen: Arc::default(),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
        };
        let s = sink.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (s, script) = (s.clone(), script.clone());
                async move {
                    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
                    // A slow sink, as a peer would be: not a wait in the test.
                    tokio::time::sleep(delay).await;
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let n = s.seen.lock().unwrap().len();
                    let answer = script(n, &body);
                    s.seen.lock().unwrap().push(Seen {
                        method: method.to_string(),
                        referer: headers
                            .get("referer")
                            .map(|v| v.to_str().unwrap_or("?").to_owned()),
                        body,
                        status: answer.status().as_u16(),
                    });
                    s.in_flight.fetch_sub(1, Ordering::SeqCst);
                    answer
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/events?token=sink-secret",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (sink, url)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The event types the sink accepted for `subject`, in the order it
    /// accepted them.
    fn accepted_for(&self, subject: &str) -> Vec<String> {
        self.seen()
            .iter()
            .filter(|s| s.status < 300 && s.body["subject"] == subject)
            .map(|s| s.body["type"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

fn answer(status: u16, location: Option<&str>) -> axum::response::Response {
    let mut r = axum::response::Response::new(axum::body::Body::empty());
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    if let Some(l) = location {
        r.headers_mut().insert("location", l.parse().unwrap());
    }
    r
}

#[tokio::test]
async fn a_sink_that_redirects_has_not_received_the_event_and_its_target_gets_nothing() {
    let (elsewhere, elsewhere_url) = ScriptedSink::start(
        std::time::Duration::ZERO,
        Arc::new(|_, _| answer(200, None)),
    )
    .await;
    let target = elsewhere_url.clone();
    let (sink, url) = ScriptedSink::start(
        std::time::Duration::ZERO,
        Arc::new(move |n, _| match n {
            0 => answer(307, Some(&target)),
            1 => answer(302, Some(&target)),
            2 => answer(303, Some(&target)),
            _ => answer(202, None),
        }),
    )
    .await;
    let t = TestApp::spawn_with(1, &[("LABSYNC__EVENTS__SINK_URL", &url)]).await;
    let wiped = t.add_lab("DEFINED_ON_CORE");
    t.delete(&wiped, false).await.unwrap();
    let api = TestApi::start(&t).await;
    eventually("the event to be delivered", || async {
        outbox::list(&t.app.db, doc! {"kind": "deleted", "status": "delivered"})
            .await
            .unwrap()
            .len()
            == 1
    })
    .await;
    let stored = outbox::list(&t.app.db, doc! {"kind": "deleted"})
        .await
        .unwrap();
    assert_eq!(
        stored[0].get_i64("attempts"),
        Ok(4),
        "three redirects are three failed deliveries"
    );
    let why = stored[0].get_str("last_error").unwrap();
    assert!(why.contains("303") && why.contains("no redirects"), "{why}");
    assert!(!why.contains("sink-secret"), "{why}");
    assert!(elsewhere.seen().is_empty(), "{:?}", elsewhere.seen());
    for s in sink.seen() {
        assert_eq!(s.method, "POST", "{s:?}");
        assert_eq!(s.referer, None, "{s:?}");
        assert_eq!(s.body["subject"], wiped.as_str());
    }
    api.stop().await;
}

#[tokio::test]
async fn a_labs_events_reach_the_sink_in_the_order_they_were_made_though_the_first_is_retried() {
    // The first delivery of every lab's first event fails.
    let (sink, url) = ScriptedSink::start(
        std::time::Duration::ZERO,
        Arc::new({
            let failed = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
            move |_, body| {
                let subject = body["subject"].as_str().unwrap_or_default().to_owned();
                if failed.lock().unwrap().insert(subject) {
                    answer(503, None)
                } else {
                    answer(202, None)
                }
            }
        }),
    )
    .await;
    let t = TestApp::spawn_with(
        1,
        &[
            ("LABSYNC__EVENTS__SINK_URL", &url),
            ("LABSYNC__EVENTS__MAX_BACKOFF_SECS", "2"),
        ],
    )
    .await;
    t.refresh().await;
    let labs: Vec<String> = t
        .records()
        .await
        .iter()
        .map(|r| r.lab_id.to_string())
        .collect();
    for (n, lab) in labs.iter().enumerate() {
        t.sim()
            .update_lab(
                lab,
                cml_sim::LabSpec {
                    lab_title: Some(format!("renamed {n}")),
                    ..Default::default()
                },
            )
            .unwrap();
    }
    t.refresh().await;
    // Each lab now has two undelivered events: discovered, then changed.
    let api = TestApi::start(&t).await;
    eventually("every event to be delivered", || async {
        outbox::list(&t.app.db, doc! {"status": {"$ne": "delivered"}})
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    for lab in &labs {
        assert_eq!(
            sink.accepted_for(lab),
            ["io.labsync.lab.discovered", "io.labsync.lab.changed"],
            "lab {lab}"
        );
    }
    api.stop().await;
}

#[tokio::test]
async fn a_slow_sink_receives_the_events_of_different_labs_in_parallel_within_the_bound() {
    let (sink, url) = ScriptedSink::start(
        std::time::Duration::from_millis(200),
        Arc::new(|_, _| answer(202, None)),
    )
    .await;
    let t = TestApp::spawn_with(
        1,
        &[
            ("LABSYNC__EVENTS__SINK_URL", &url),
            ("LABSYNC__EVENTS__MAX_IN_FLIGHT", "4"),
        ],
    )
    .await;
    t.refresh().await;
    let api = TestApi::start(&t).await;
    eventually("every event to be delivered", || async {
        outbox::list(&t.app.db, doc! {"status": {"$ne": "delivered"}})
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    assert_eq!(sink.seen().len(), SEEDED_LABS);
    assert_eq!(
        sink.max_in_flight.load(Ordering::SeqCst),
        4,
        "parallel, and bounded"
    );
    api.stop().await;
}

#[tokio::test]
async fn undelivered_events_are_measured_even_without_a_sink() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let api = TestApi::start(&t).await;
    let expected = format!(
        "labsync_outbox_undelivered_events {}",
        t.records().await.len()
    );
    eventually("the backlog to be measured", || async {
        t.app.metrics.render().contains(&expected)
    })
    .await;
    assert!(
        t.app
            .metrics
            .render()
            .contains("labsync_outbox_oldest_undelivered_age_seconds")
    );
    api.stop().await;
}
