//! The event stream (`GET /api/v1/events/stream`) from outside: fed from
//! the database, so that every replica's changes reach every replica's
//! streams, resumable with `Last-Event-ID`, and bounded per process.

use std::time::Duration;

use futures::StreamExt;
use labsync_application::domain::LabId;
use reqwest::{Method, StatusCode};

use crate::helpers::{TestApi, TestApp, VIEWER_TOKEN};

/// One Server-Sent Event: its id, its name and its data as JSON.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    event: String,
    data: serde_json::Value,
}

/// An open stream, read frame by frame.
struct Stream {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl Stream {
    async fn open(api: &TestApi, last_event_id: Option<&str>) -> Self {
        let mut r = api.req(Method::GET, "/api/v1/events/stream", Some(VIEWER_TOKEN));
        if let Some(id) = last_event_id {
            r = r.header("last-event-id", id);
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Self {
            body: resp.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The first event named `event` about `lab`, within a deadline.
    async fn until(&mut self, event: &str, lab: &LabId) -> Sent {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let mut sent = Sent {
                    id: String::new(),
                    event: String::new(),
                    data: serde_json::Value::Null,
                };
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        v.trim().clone_into(&mut sent.id);
                    } else if let Some(v) = line.strip_prefix("event:") {
                        v.trim().clone_into(&mut sent.event);
                    } else if let Some(v) = line.strip_prefix("data:") {
                        sent.data = serde_json::from_str(v.trim()).unwrap_or_default();
                    }
                }
                if sent.event == event && sent.data["lab_id"] == lab.as_str() {
                    return sent;
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .unwrap_or_else(|_| panic!("no {event} event for {lab} in time"))
                .expect("the stream stays open")
                .unwrap();
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test]
async fn a_delete_through_one_replica_reaches_the_other_and_a_reconnect_gets_what_it_missed() {
    let t = TestApp::spawn().await;
    let (a, b) = (t.add_lab("DEFINED_ON_CORE"), t.add_lab("DEFINED_ON_CORE"));
    t.refresh().await;
    let first = TestApi::start(&t).await;
    let second = TestApi::start(&t).await;

    let mut stream = Stream::open(&first, None).await;
    second.delete_lab(&a).await;
    let seen = stream.until("deleted", &a).await;
    assert_eq!(seen.data["worker_id"], "cml-1");
    assert_eq!(seen.data["cloudevent"]["type"], "io.labsync.lab.deleted");
    drop(stream);

    // Gone while no stream was open: the reconnect reads it from the outbox.
    second.delete_lab(&b).await;
    let mut resumed = Stream::open(&first, Some(&seen.id)).await;
    let missed = resumed.until("deleted", &b).await;
    assert_ne!(missed.id, seen.id);

    // A lab pruned by a refresh (here, the CLI's) reaches the stream too.
    let c = t.add_lab("STOPPED");
    t.refresh().await;
    t.sim().remove_lab(c.as_str());
    let o = t.cli(&["refresh", "--worker", "cml-1"]).await;
    assert!(o.status.success());
    resumed.until("pruned", &c).await;
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_stream_past_the_limit_is_refused_with_a_503_and_a_retry_after() {
    let t = TestApp::spawn_with(1, &[("LABSYNC__API__MAX_EVENT_STREAMS", "1")]).await;
    let api = TestApi::start(&t).await;
    let open = Stream::open(&api, None).await;
    let resp = api
        .req(Method::GET, "/api/v1/events/stream", Some(VIEWER_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    drop(open);
    // Its slot is free again once it closes.
    labsync_test_support::eventually("the slot comes back", || async {
        api.req(Method::GET, "/api/v1/events/stream", Some(VIEWER_TOKEN))
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
    let (s, _) = api
        .send(api.req(Method::GET, "/api/v1/events/stream", None))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    api.stop().await;
}
