//! Lab lifecycle events. The repositories write them to an outbox just
//! before the change they describe (a refresh's stay staged until the
//! change is written), and a relay delivers them later, at least once and
//! in order per lab, to whoever listens.

use chrono::{DateTime, Utc};
use labsync_domain::{LabId, WorkerId};
use serde::{Deserialize, Serialize};

/// What happened to a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabEventKind {
    Discovered,
    Changed,
    StateChanged,
    Deleted,
    Pruned,
    DeleteFailed,
}

impl LabEventKind {
    /// The CloudEvents `type`.
    pub fn cloudevent_type(self) -> &'static str {
        match self {
            Self::Discovered => "io.labsync.lab.discovered",
            Self::Changed => "io.labsync.lab.changed",
            Self::StateChanged => "io.labsync.lab.state_changed",
            Self::Deleted => "io.labsync.lab.deleted",
            Self::Pruned => "io.labsync.lab.pruned",
            Self::DeleteFailed => "io.labsync.lab.delete_failed",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Discovered => "discovered",
            Self::Changed => "changed",
            Self::StateChanged => "state_changed",
            Self::Deleted => "deleted",
            Self::Pruned => "pruned",
            Self::DeleteFailed => "delete_failed",
        }
    }
}

/// One event, before it is framed as a CloudEvent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabEvent {
    /// Unique; a consumer deduplicates on it (delivery is at least once).
    pub id: String,
    pub kind: LabEventKind,
    pub worker_id: WorkerId,
    pub lab_id: LabId,
    pub at: DateTime<Utc>,
    /// Details for the consumer (e.g. the changed fields, the outcome).
    pub data: serde_json::Value,
}

impl LabEvent {
    pub fn new(
        kind: LabEventKind,
        worker_id: &WorkerId,
        lab_id: LabId,
        at: DateTime<Utc>,
        data: serde_json::Value,
    ) -> Self {
        Self {
            // Time-ordered: the relay sends a lab's events in this order.
            id: uuid::Uuid::now_v7().to_string(),
            kind,
            worker_id: worker_id.clone(),
            lab_id,
            at,
            data,
        }
    }

    /// The event as CloudEvents 1.0 JSON (structured mode).
    pub fn to_cloudevent(&self) -> serde_json::Value {
        serde_json::json!({
            "specversion": "1.0",
            "id": self.id,
            "source": format!("/labsync/workers/{}", self.worker_id),
            "type": self.kind.cloudevent_type(),
            "subject": self.lab_id.as_str(),
            "time": self.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "datacontenttype": "application/json",
            "data": self.data,
        })
    }
}

/// Watches what the use cases do, for metrics. Implementations MUST be
/// cheap and MUST NOT fail: observing is never a reason to fail a use case.
pub trait Observer: Send + Sync {
    fn refresh_finished(&self, _report: &crate::RunReport) {}
    fn delete_finished(&self, _end: crate::delete::DeleteEnd<'_>) {}
}

/// Observes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observer for NoObserver {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cloudevent_has_the_required_attributes() {
        let e = LabEvent::new(
            LabEventKind::Deleted,
            &WorkerId::parse("cml-1").unwrap(),
            LabId::parse("a6a334de-b497-47ae-bbff-44a83f890114").unwrap(),
            Utc::now(),
            serde_json::json!({"by": "api:ui"}),
        );
        let ce = e.to_cloudevent();
        for key in ["specversion", "id", "source", "type"] {
            assert!(ce[key].as_str().is_some_and(|s| !s.is_empty()), "{key}");
        }
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["type"], "io.labsync.lab.deleted");
        assert_eq!(ce["subject"], "a6a334de-b497-47ae-bbff-44a83f890114");
        assert_eq!(ce["data"]["by"], "api:ui");
    }
}
