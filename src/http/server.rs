//! The HTTP server: labsync's own accept loop over hyper's HTTP/1.1
//! connections, so that clients who do not play along cannot take the API
//! away from everyone else.
//!
//! # Limits
//! - **Header read timeout**: a request's header must be complete within
//!   `api.header_read_timeout_secs` of its connection being ready for it
//!   (new, or kept alive after an answer); hyper closes the connection
//!   otherwise. A client trickling one header line every few seconds, or
//!   keeping a connection open without a request, is cut off.
//! - **Idle timeout**: a connection with no request running on which no
//!   byte moves for `api.idle_timeout_secs` is closed (a client that stops
//!   reading its answer).
//! - **Connections**: at most `api.max_connections` are open. At the limit
//!   a new connection closes the one that has been idle (no request
//!   running) the longest; when every connection is running a request, the
//!   new one is closed at once. Idle and slow clients therefore never hold
//!   every slot, and `/healthz` finds one. File descriptors stay bounded:
//!   a refused connection is closed as soon as it is accepted, and an
//!   accept that fails for lack of descriptors is retried after a pause.
//! - Requests in flight are limited in the router (a 503 problem).
//!
//! # Shutdown
//! When `shutdown` resolves, the listener is closed, every connection is
//! asked to stop after the request it is running (idle ones close at
//! once), and [`serve`] returns when the last one has; the caller bounds
//! that wait by its grace period.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use labsync_infrastructure::configuration::ApiSettings;
use labsync_infrastructure::metrics::Metrics;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tower_service::Service;
use tracing::{debug, warn};

/// How the server guards itself against its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    pub fn from_settings(api: &ApiSettings) -> Self {
        Self {
            header_read_timeout: api.header_read_timeout(),
            idle_timeout: api.idle_timeout(),
            max_connections: api.max_connections,
        }
    }
}

/// One open connection, as the accept loop sees it.
#[derive(Debug)]
struct Slot {
    /// Requests running on it.
    busy: AtomicUsize,
    /// When (ms since the server started) it was accepted or its last
    /// request ended.
    idle_since: AtomicU64,
    /// When (ms since the server started) a byte last moved either way.
    last_io: AtomicU64,
    /// Told when the accept loop takes the slot for a newer connection.
    evict: Notify,
}

/// The open connections by number, and the server's start, which the
/// slots' times count from.
#[derive(Debug)]
struct Connections {
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    next: AtomicU64,
    epoch: Instant,
}

impl Connections {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for a new connection, making room at the limit by evicting
    /// the connection idle the longest; `None` when every connection is
    /// running a request.
    fn admit(&self, max: usize, metrics: &Metrics) -> Option<(u64, Arc<Slot>)> {
        let now = self.now_ms();
        let mut slots = self.lock();
        if slots.len() >= max {
            let victim = slots
                .iter()
                .filter(|(_, s)| s.busy.load(Ordering::SeqCst) == 0)
                .min_by_key(|(_, s)| s.idle_since.load(Ordering::SeqCst))
                .map(|(id, _)| *id)?;
            if let Some(slot) = slots.remove(&victim) {
                slot.evict.notify_one();
            }
            debug!(
                connection = victim,
                "connection limit: closing the longest idle connection"
            );
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now),
            last_io: AtomicU64::new(now),
            evict: Notify::new(),
        });
        slots.insert(id, slot.clone());
        metrics.http_connection_opened();
        Some((id, slot))
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown`
/// resolves and the connections open then have finished.
///
/// # Errors
/// None yet: accept errors are logged and retried; kept for callers that
/// treat the server as fallible.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let connections = Arc::new(Connections {
        slots: Mutex::default(),
        next: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let (stop, stopping) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
        };
        let Some((id, slot)) = connections.admit(limits.max_connections, &metrics) else {
            metrics.http_connection_closed("refused");
            debug!("connection limit: every connection is running a request; closing the new one");
            drop(stream);
            continue;
        };
        tasks.spawn(connection(
            stream,
            id,
            slot,
            connections.clone(),
            router.clone(),
            limits,
            metrics.clone(),
            stopping.clone(),
        ));
    }
    drop(listener);
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// An accept that failed: a connection that went away before it was
/// accepted is nothing; anything else (no file descriptors left) is
/// logged and retried after a pause, instead of spinning or stopping.
async fn accept_failed(e: &io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    ) {
        return;
    }
    warn!(error = %e, "accepting an API connection failed; retrying shortly");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Serves one connection until it ends, is evicted, goes idle for too
/// long, or finishes its request after a shutdown.
#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: TcpStream,
    id: u64,
    slot: Arc<Slot>,
    connections: Arc<Connections>,
    router: Router,
    limits: Limits,
    metrics: Metrics,
    mut stopping: watch::Receiver<bool>,
) {
    let io = TokioIo::new(Tracked {
        inner: stream,
        slot: slot.clone(),
        connections: connections.clone(),
    });
    let service = {
        let slot = slot.clone();
        let connections = connections.clone();
        service_fn(move |request: hyper::Request<Incoming>| {
            let mut router = router.clone();
            let running = Running::start(slot.clone(), connections.clone());
            async move {
                let _running = running;
                let response: Result<Response, Infallible> =
                    router.call(request.map(Body::new)).await;
                response
            }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .serve_connection(io, service);
    let mut conn = pin!(conn);
    let mut draining = false;
    let closed_by = loop {
        tokio::select! {
            ended = conn.as_mut() => break match ended {
                Err(e) if e.is_timeout() => Some("header_timeout"),
                _ => None,
            },
            () = slot.evict.notified() => break Some("evicted"),
            () = idle(&slot, &connections, limits.idle_timeout) => break Some("idle_timeout"),
            _ = stopping.changed(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    };
    connections.lock().remove(&id);
    metrics.http_connection_ended(closed_by);
}

/// Resolves once the connection has had no request running and no byte
/// moving for `timeout`.
async fn idle(slot: &Slot, connections: &Connections, timeout: Duration) {
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    loop {
        let last = slot
            .last_io
            .load(Ordering::SeqCst)
            .max(slot.idle_since.load(Ordering::SeqCst));
        let due = last.saturating_add(timeout_ms);
        let now = connections.now_ms();
        let wait = if slot.busy.load(Ordering::SeqCst) > 0 {
            timeout_ms
        } else if now >= due {
            return;
        } else {
            due - now
        };
        tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
    }
}

/// A request running on a connection: counted from the moment its header
/// is read until its handler answered (or was dropped).
struct Running {
    slot: Arc<Slot>,
    connections: Arc<Connections>,
}

impl Running {
    fn start(slot: Arc<Slot>, connections: Arc<Connections>) -> Self {
        slot.busy.fetch_add(1, Ordering::SeqCst);
        Self { slot, connections }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.slot
            .idle_since
            .store(self.connections.now_ms(), Ordering::SeqCst);
        self.slot.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connection's stream, noting when a byte last moved.
struct Tracked {
    inner: TcpStream,
    slot: Arc<Slot>,
    connections: Arc<Connections>,
}

impl Tracked {
    fn moved(&self) {
        self.slot
            .last_io
            .store(self.connections.now_ms(), Ordering::SeqCst);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.moved();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.moved();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.moved();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    #[test]
    fn at_the_limit_the_longest_idle_connection_makes_room_and_a_busy_one_never() {
        let connections = Connections {
            slots: Mutex::default(),
            next: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        let metrics = Metrics::new();
        let (running, busy) = connections.admit(3, &metrics).unwrap();
        let (idle_longest, oldest) = connections.admit(3, &metrics).unwrap();
        let (idle_recently, recent) = connections.admit(3, &metrics).unwrap();
        busy.busy.store(1, Ordering::SeqCst);
        busy.idle_since.store(0, Ordering::SeqCst);
        oldest.idle_since.store(5, Ordering::SeqCst);
        recent.idle_since.store(10, Ordering::SeqCst);

        let (newest, _) = connections
            .admit(3, &metrics)
            .expect("room made at the limit");
        let open: Vec<u64> = {
            let mut ids: Vec<u64> = connections.lock().keys().copied().collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(open, vec![running, idle_recently, newest]);
        assert!(!open.contains(&idle_longest));
        assert!(
            oldest.evict.notified().now_or_never().is_some(),
            "the evicted connection is told"
        );
        assert!(recent.evict.notified().now_or_never().is_none());
        assert!(busy.evict.notified().now_or_never().is_none());

        // Every connection running a request: the new one is not admitted.
        for slot in connections.lock().values() {
            slot.busy.store(1, Ordering::SeqCst);
        }
        assert!(connections.admit(3, &metrics).is_none());
        assert_eq!(connections.lock().len(), 3);
    }
}
