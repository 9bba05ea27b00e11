//! The event stream: lab events and finished refresh runs as Server-Sent
//! Events at `GET /api/v1/events/stream`, for live views (the console).
//!
//! # Expected flow
//! 1. One poller per process reads the events that became visible since
//!    its last read (every replica writes them to the same outbox), every
//!    [`POLL_EVERY`], and hands each new one to every open stream.
//! 2. A client opens a stream (role viewer); one that reconnects with
//!    `Last-Event-ID` first gets what became visible since that event,
//!    read from the outbox, then the live events.
//! 3. A stream that falls behind the poller by more than [`BUFFER`] events
//!    is ended; the client reconnects with its `Last-Event-ID` and reads
//!    what it missed from the outbox.
//!
//! # Guarantees
//! - Every replica's events reach every replica's streams, the CLI's too:
//!   the stream is fed from the database, not from this process.
//! - At least once: a reconnecting client misses nothing within the
//!   outbox's retention; it may see an event twice (a few seconds around
//!   the reconnect), and tells by the event's `id`.
//! - At most `api.max_event_streams` streams per process; one more is a
//!   503 `overloaded` problem with `Retry-After`, and the client's
//!   `EventSource` tries again.
//!
//! # Assumptions
//! The replicas' clocks agree to within [`OVERLAP`]: events are read by the
//! time they became visible, by the clock of the replica that wrote them,
//! and every read looks back that far.
//!
//! # Caveats
//! - An event reaches streams up to [`POLL_EVERY`] after it became visible.
//! - A stream is authorised when it opens: signing out or removing the
//!   token ends it only at its next reconnect.
//! - A client that stops reading keeps its slot until its connection
//!   breaks; `api.max_event_streams` bounds how many such there can be.
//! - `visible_at` is each replica's clock at the write: a replica more than
//!   [`OVERLAP`] ahead of the others, or a write slower than that, can
//!   make an event reach the streams late or, for a live stream, not at
//!   all (a reconnect, or the console's redraw, still shows the truth).

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use labsync_application::ports::{EventFeed, VisibleEvent};
use labsync_application::retry::next_pass;
use tokio::sync::{Semaphore, broadcast, watch};
use tracing::warn;

use super::ApiState;
use super::auth::Viewer;
use super::problem::{ApiError, ProblemKind};

/// How often the poller reads new events.
pub const POLL_EVERY: Duration = Duration::from_millis(250);

/// How far back every read looks, for clocks that disagree a little and
/// writes that land late.
pub const OVERLAP: Duration = Duration::from_secs(5);

/// Events a stream may fall behind by before it is ended.
pub const BUFFER: usize = 4096;

/// Events read at most per poll.
const READ_AT_MOST: usize = 1000;

/// Event ids remembered, so that the overlap sends nothing twice.
const REMEMBERED: usize = 20_000;

/// The poller's output and the streams' permits.
#[derive(Clone)]
pub struct EventHub {
    events: broadcast::Sender<Arc<VisibleEvent>>,
    permits: Arc<Semaphore>,
    feed: Arc<dyn EventFeed>,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub")
            .field("streams_left", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

impl EventHub {
    /// A hub for at most `max_streams` streams; [`EventHub::run`] feeds it.
    pub fn new(feed: Arc<dyn EventFeed>, max_streams: usize) -> Self {
        let (events, _) = broadcast::channel(BUFFER);
        Self {
            events,
            permits: Arc::new(Semaphore::new(max_streams)),
            feed,
        }
    }

    /// Polls the outbox until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut seen = Seen::default();
        let mut since = Utc::now();
        loop {
            let from = since - chrono::Duration::from_std(OVERLAP).unwrap_or_default();
            match read_all_since(self.feed.as_ref(), from).await {
                Ok(events) => {
                    for e in events {
                        since = since.max(e.visible_at);
                        if seen.first_time(&e.id) {
                            // No stream open is no error.
                            let _ = self.events.send(Arc::new(e));
                        }
                    }
                }
                Err(e) => warn!(error = %e, "the event stream could not read the outbox"),
            }
            if !next_pass(POLL_EVERY, &mut stop, std::future::pending()).await {
                return;
            }
        }
    }
}

/// Every event visible since `from`, page by page: a burst of any size
/// that shares one time is read whole, never the same first page again.
async fn read_all_since(
    feed: &dyn EventFeed,
    from: DateTime<Utc>,
) -> Result<Vec<VisibleEvent>, labsync_application::RepoError> {
    let mut out: Vec<VisibleEvent> = Vec::new();
    loop {
        let page = match out.last() {
            Some(last) => {
                feed.visible_since(last.visible_at, Some(&last.id), READ_AT_MOST)
                    .await?
            }
            None => feed.visible_since(from, None, READ_AT_MOST).await?,
        };
        let full = page.len() >= READ_AT_MOST;
        out.extend(page);
        if !full {
            return Ok(out);
        }
    }
}

/// Ids sent recently, oldest forgotten first.
#[derive(Default)]
struct Seen {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    fn first_time(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        self.set.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        if self.order.len() > REMEMBERED
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

fn sse_event(e: &VisibleEvent, details: bool) -> Event {
    let mut cloudevent = e.cloudevent.clone();
    if !details && let Some(data) = cloudevent.get_mut("data").and_then(|d| d.as_object_mut()) {
        // What CML said about a failed delete is for those who may delete.
        data.remove("detail");
    }
    let data = serde_json::json!({
        "kind": e.kind,
        "worker_id": e.worker_id,
        "lab_id": e.lab_id,
        "cloudevent": cloudevent,
    });
    Event::default()
        .id(e.id.clone())
        .event(e.kind.clone())
        .data(data.to_string())
}

#[utoipa::path(get, path = "/api/v1/events/stream", tag = "events",
    description = "Lab events and finished refresh runs as Server-Sent Events (`text/event-stream`), as every \
        replica stores them: each has the event's id, its kind as the SSE event name (`run_finished` for a run, \
        whose id is the run's), and JSON data (`kind`, `worker_id`, `lab_id` (null for a run), `cloudevent`). Reconnect with `Last-Event-ID` to get what was missed, within the outbox's retention; \
        an event may come twice around a reconnect. At most `api.max_event_streams` streams per process: \
        one more is a 503.",
    responses((status = 200, description = "The stream", content_type = "text/event-stream"),
        (status = 401, body = super::problem::Problem), (status = 503, body = super::problem::Problem)),
    security(("token" = [])))]
pub async fn stream(
    State(s): State<ApiState>,
    Viewer(caller): Viewer,
    session: Option<axum::Extension<labsync_application::ports::ConsoleSession>>,
    headers: HeaderMap,
) -> Response {
    let details = caller.role >= labsync_infrastructure::configuration::Role::Operator;
    let Ok(permit) = s.events.permits.clone().try_acquire_owned() else {
        let mut r = ApiError::new(
            ProblemKind::Overloaded,
            "this replica serves as many event streams as it may (api.max_event_streams); \
             try again shortly",
        )
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return r;
    };
    // Subscribe before reading what was missed, so that nothing falls
    // between the two.
    let live = s.events.events.subscribe();
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(64).collect::<String>());
    let missed = match last {
        Some(id) => missed_since(s.events.feed.as_ref(), &id).await,
        None => Vec::new(),
    };
    let end: futures::future::BoxFuture<'static, ()> = match session {
        Some(axum::Extension(session)) => Box::pin(tokio::time::sleep(
            super::session::stream_deadline(&session, s.services.clock.now()),
        )),
        None => Box::pin(futures::future::pending()),
    };
    Sse::new(events(missed, live, permit, details).take_until(end))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// What became visible since the event `id` (and a little before), or
/// nothing when the id is unknown or expired.
async fn missed_since(feed: &dyn EventFeed, id: &str) -> Vec<VisibleEvent> {
    let Ok(Some(at)) = feed.visible_at(id).await else {
        return Vec::new();
    };
    let from: DateTime<Utc> = at - chrono::Duration::from_std(OVERLAP).unwrap_or_default();
    match read_all_since(feed, from).await {
        Ok(events) => events.into_iter().filter(|e| e.id != id).collect(),
        Err(e) => {
            warn!(error = %e, "could not read the events a stream missed");
            Vec::new()
        }
    }
}

fn events(
    missed: Vec<VisibleEvent>,
    live: broadcast::Receiver<Arc<VisibleEvent>>,
    permit: tokio::sync::OwnedSemaphorePermit,
    details: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let sent: HashSet<String> = missed.iter().map(|e| e.id.clone()).collect();
    let first = futures::stream::iter(missed.into_iter().map(move |e| Ok(sse_event(&e, details))));
    let rest = futures::stream::unfold(
        (live, sent, permit),
        move |(mut live, sent, permit)| async move {
            loop {
                match live.recv().await {
                    Ok(e) if sent.contains(&e.id) => {}
                    Ok(e) => return Some((Ok(sse_event(&e, details)), (live, sent, permit))),
                    // Behind, or the hub is gone: end; the client reconnects
                    // with its Last-Event-ID and reads what it missed.
                    Err(_) => return None,
                }
            }
        },
    );
    first.chain(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A feed of events that all became visible at one instant.
    struct Burst(Vec<VisibleEvent>);

    #[async_trait::async_trait]
    impl EventFeed for Burst {
        async fn visible_since(
            &self,
            since: DateTime<Utc>,
            after_id: Option<&str>,
            limit: usize,
        ) -> Result<Vec<VisibleEvent>, labsync_application::RepoError> {
            Ok(self
                .0
                .iter()
                .filter(|e| {
                    e.visible_at > since
                        || (e.visible_at == since && after_id.is_none_or(|a| e.id.as_str() > a))
                })
                .take(limit)
                .cloned()
                .collect())
        }
        async fn visible_at(
            &self,
            id: &str,
        ) -> Result<Option<DateTime<Utc>>, labsync_application::RepoError> {
            Ok(self.0.iter().find(|e| e.id == id).map(|e| e.visible_at))
        }
    }

    #[tokio::test]
    async fn a_burst_larger_than_a_read_is_read_whole_and_a_reconnect_misses_none_of_it() {
        let at = Utc::now();
        let event = |n: usize| VisibleEvent {
            id: format!("{n:06}"),
            visible_at: at,
            kind: "pruned".into(),
            worker_id: "cml-1".into(),
            lab_id: Some(n.to_string()),
            cloudevent: serde_json::Value::Null,
        };
        let feed = Burst((0..READ_AT_MOST * 2 + 5).map(event).collect());
        let all = read_all_since(&feed, at).await.unwrap();
        assert_eq!(all.len(), READ_AT_MOST * 2 + 5);
        let missed = missed_since(&feed, "000000").await;
        assert_eq!(
            missed.len(),
            READ_AT_MOST * 2 + 4,
            "all but the last one seen"
        );
    }

    #[test]
    fn an_id_is_sent_once_and_the_oldest_are_forgotten_first() {
        let mut seen = Seen::default();
        assert!(seen.first_time("a"));
        assert!(!seen.first_time("a"));
        for n in 0..REMEMBERED {
            assert!(seen.first_time(&n.to_string()));
        }
        assert!(seen.first_time("a"), "forgotten after REMEMBERED others");
        assert_eq!((seen.order.len(), seen.set.len()), (REMEMBERED, REMEMBERED));
    }
}
