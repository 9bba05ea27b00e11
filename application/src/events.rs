//! Lab lifecycle events. The repositories write them to an outbox just
//! before the change they describe (a refresh's stay staged until the
//! change is written), and a relay delivers them later, at least once and
//! in order per lab, to whoever listens.

use chrono::{DateTime, Utc};
use labsync_domain::{Actor, FieldChange, LabId, WorkerId};
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

/// What an event says, typed by its kind; it becomes JSON (the
/// CloudEvent's `data`) only when the event is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum EventData {
    Discovered {
        title: String,
        state: String,
    },
    Changed {
        changes: Vec<FieldChange>,
    },
    StateChanged {
        from: String,
        to: String,
    },
    Pruned {
        reason: &'static str,
    },
    Deleted {
        requested_by: Actor,
        outcome: &'static str,
        force: bool,
    },
    DeleteFailed {
        requested_by: Actor,
        outcome: &'static str,
        detail: String,
    },
}

impl EventData {
    /// A payload of `kind` with empty values, for tests and tools that
    /// need an event of a kind and nothing more.
    pub fn placeholder(kind: LabEventKind) -> Self {
        match kind {
            LabEventKind::Discovered => Self::Discovered {
                title: String::new(),
                state: String::new(),
            },
            LabEventKind::Changed => Self::Changed {
                changes: Vec::new(),
            },
            LabEventKind::StateChanged => Self::StateChanged {
                from: String::new(),
                to: String::new(),
            },
            LabEventKind::Pruned => Self::Pruned { reason: "" },
            LabEventKind::Deleted => Self::Deleted {
                requested_by: Actor::Schedule,
                outcome: "",
                force: false,
            },
            LabEventKind::DeleteFailed => Self::DeleteFailed {
                requested_by: Actor::Schedule,
                outcome: "",
                detail: String::new(),
            },
        }
    }

    pub const fn kind(&self) -> LabEventKind {
        match self {
            Self::Discovered { .. } => LabEventKind::Discovered,
            Self::Changed { .. } => LabEventKind::Changed,
            Self::StateChanged { .. } => LabEventKind::StateChanged,
            Self::Pruned { .. } => LabEventKind::Pruned,
            Self::Deleted { .. } => LabEventKind::Deleted,
            Self::DeleteFailed { .. } => LabEventKind::DeleteFailed,
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
    pub fn new(worker_id: &WorkerId, lab_id: LabId, at: DateTime<Utc>, data: &EventData) -> Self {
        Self {
            // Time-ordered: the relay sends a lab's events in this order.
            id: uuid::Uuid::now_v7().to_string(),
            kind: data.kind(),
            worker_id: worker_id.clone(),
            lab_id,
            at,
            // Strings, numbers and field lists: it serializes.
            data: serde_json::to_value(data).unwrap_or_default(),
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
    /// How long a delete took, by its outcome's word (`error` for a
    /// delete that ended in an error before any outcome).
    fn delete_took(&self, _outcome: &'static str, _elapsed: std::time::Duration) {}
}

/// Observes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observer for NoObserver {}

#[cfg(test)]
mod tests {
    use labsync_domain::LabField;

    use super::*;

    #[test]
    fn a_cloudevent_has_the_required_attributes() {
        let e = LabEvent::new(
            &WorkerId::parse("cml-1").unwrap(),
            LabId::parse("a6a334de-b497-47ae-bbff-44a83f890114").unwrap(),
            Utc::now(),
            &EventData::Deleted {
                requested_by: Actor::api("ui"),
                outcome: "deleted",
                force: false,
            },
        );
        let ce = e.to_cloudevent();
        for key in ["specversion", "id", "source", "type"] {
            assert!(ce[key].as_str().is_some_and(|s| !s.is_empty()), "{key}");
        }
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["type"], "io.labsync.lab.deleted");
        assert_eq!(ce["subject"], "a6a334de-b497-47ae-bbff-44a83f890114");
        assert_eq!(
            ce["data"],
            serde_json::json!({"requested_by": "api:ui", "outcome": "deleted", "force": false})
        );
        let changed = EventData::Changed {
            changes: vec![FieldChange {
                field: LabField::State,
                old: "STOPPED".into(),
                new: "STARTED".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(&changed).unwrap(),
            serde_json::json!({"changes": [{"field": "state", "old": "STOPPED", "new": "STARTED"}]})
        );
        assert_eq!(changed.kind(), LabEventKind::Changed);
    }
}
