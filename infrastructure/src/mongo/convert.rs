//! The stored shapes of labsync's documents, and their conversion to and
//! from domain types. Dates are BSON dates; counters are i64 (BSON has no
//! unsigned integers).

use chrono::{DateTime, Utc};
use labsync_application::RepoError;
use labsync_domain::{
    ContentHash, HistoryEntry, HistoryEvent, LabGroup, LabId, LabRecord, LabSnapshot, LabState,
    WorkerId,
};
use mongodb::bson::{self, Bson, Document, doc};
use serde::{Deserialize, Serialize};

pub fn date(t: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_chrono(t)
}

pub fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> RepoError {
    RepoError::Corrupt(format!("{what}: {e}"))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupDoc {
    pub id: String,
    pub permission: String,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryDoc {
    pub at: bson::DateTime,
    #[serde(flatten)]
    pub event: HistoryEvent,
}

/// A live lab record. Tombstones share the collection but have only
/// `worker_id`, `lab_id` and `tombstone`; reads of records filter them out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabDoc {
    pub worker_id: String,
    pub lab_id: String,
    pub title: String,
    pub description: String,
    pub notes: String,
    pub owner_id: Option<String>,
    pub owner_username: Option<String>,
    pub owner_fullname: Option<String>,
    pub state: String,
    pub node_count: i64,
    pub link_count: i64,
    pub groups: Vec<GroupDoc>,
    pub created: Option<bson::DateTime>,
    pub modified: Option<bson::DateTime>,
    pub first_seen_at: bson::DateTime,
    pub last_seen_at: bson::DateTime,
    pub last_changed_at: bson::DateTime,
    pub revision: i64,
    pub content_hash: String,
    #[serde(default)]
    pub history: Vec<HistoryDoc>,
}

pub fn history_doc(e: &HistoryEntry) -> HistoryDoc {
    HistoryDoc {
        at: date(e.at),
        event: e.event.clone(),
    }
}

pub fn history_bson(e: &HistoryEntry) -> Result<Bson, RepoError> {
    bson::to_bson(&history_doc(e)).map_err(|e| RepoError::Other(e.to_string()))
}

/// The snapshot fields, as `$set` wants them.
pub fn snapshot_fields(s: &LabSnapshot) -> Document {
    let groups: Vec<Document> = s
        .groups
        .iter()
        .map(|g| doc! {"id": &g.id, "permission": &g.permission, "name": g.name.clone()})
        .collect();
    doc! {
        "title": &s.title,
        "description": &s.description,
        "notes": &s.notes,
        "owner_id": s.owner_id.clone(),
        "owner_username": s.owner_username.clone(),
        "owner_fullname": s.owner_fullname.clone(),
        "state": s.state.as_str(),
        "node_count": to_i64(s.node_count),
        "link_count": to_i64(s.link_count),
        "groups": groups,
        "created": s.created.map(date),
        "modified": s.modified.map(date),
    }
}

impl LabDoc {
    pub fn from_record(r: &LabRecord) -> Self {
        let s = &r.snapshot;
        Self {
            worker_id: r.worker_id.to_string(),
            lab_id: r.lab_id.to_string(),
            title: s.title.clone(),
            description: s.description.clone(),
            notes: s.notes.clone(),
            owner_id: s.owner_id.clone(),
            owner_username: s.owner_username.clone(),
            owner_fullname: s.owner_fullname.clone(),
            state: s.state.as_str().to_owned(),
            node_count: to_i64(s.node_count),
            link_count: to_i64(s.link_count),
            groups: s
                .groups
                .iter()
                .map(|g| GroupDoc {
                    id: g.id.clone(),
                    permission: g.permission.clone(),
                    name: g.name.clone(),
                })
                .collect(),
            created: s.created.map(date),
            modified: s.modified.map(date),
            first_seen_at: date(r.first_seen_at),
            last_seen_at: date(r.last_seen_at),
            last_changed_at: date(r.last_changed_at),
            revision: to_i64(r.revision),
            content_hash: r.content_hash.to_string(),
            history: r.history.iter().map(history_doc).collect(),
        }
    }

    /// # Errors
    /// [`RepoError::Corrupt`] when an id or the hash does not parse.
    pub fn into_record(self) -> Result<LabRecord, RepoError> {
        Ok(LabRecord {
            worker_id: WorkerId::parse(&self.worker_id).map_err(|e| corrupt("worker_id", e))?,
            lab_id: LabId::parse(&self.lab_id).map_err(|e| corrupt("lab_id", e))?,
            snapshot: LabSnapshot {
                title: self.title,
                description: self.description,
                notes: self.notes,
                owner_id: self.owner_id,
                owner_username: self.owner_username,
                owner_fullname: self.owner_fullname,
                state: LabState::parse(&self.state),
                node_count: to_u64(self.node_count),
                link_count: to_u64(self.link_count),
                groups: self
                    .groups
                    .into_iter()
                    .map(|g| LabGroup {
                        id: g.id,
                        permission: g.permission,
                        name: g.name,
                    })
                    .collect(),
                created: self.created.map(bson::DateTime::to_chrono),
                modified: self.modified.map(bson::DateTime::to_chrono),
            },
            first_seen_at: self.first_seen_at.to_chrono(),
            last_seen_at: self.last_seen_at.to_chrono(),
            last_changed_at: self.last_changed_at.to_chrono(),
            revision: to_u64(self.revision),
            content_hash: parse_hash(&self.content_hash)?,
            history: self
                .history
                .into_iter()
                .map(|h| HistoryEntry {
                    at: h.at.to_chrono(),
                    event: h.event,
                })
                .collect(),
        })
    }
}

pub fn parse_hash(s: &str) -> Result<ContentHash, RepoError> {
    u64::from_str_radix(s, 16)
        .map(ContentHash)
        .map_err(|e| corrupt("content_hash", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_the_round_trip_with_bson_dates() {
        let now = Utc::now();
        let snapshot = LabSnapshot {
            title: "t".into(),
            description: "d".into(),
            notes: "n".into(),
            owner_id: Some("o".into()),
            owner_username: None,
            owner_fullname: Some(String::new()),
            state: LabState::Started,
            node_count: 3,
            link_count: 4,
            groups: vec![LabGroup {
                id: "g".into(),
                permission: "read_only".into(),
                name: None,
            }],
            created: Some(DateTime::from_timestamp(1_700_000_000, 0).unwrap()),
            modified: None,
        };
        let mut record = LabRecord::discovered(
            WorkerId::parse("cml-1").unwrap(),
            LabId::parse("a6a334de-b497-47ae-bbff-44a83f890114").unwrap(),
            snapshot,
            DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap(),
        );
        record.push_history(
            HistoryEntry {
                at: record.first_seen_at,
                event: HistoryEvent::DeleteAttempt {
                    requested_by: labsync_domain::Actor::cli("ops"),
                    force: false,
                    outcome: "refused_running".into(),
                    detail: "running".into(),
                },
            },
            50,
        );
        let doc = bson::to_document(&LabDoc::from_record(&record)).unwrap();
        assert!(matches!(doc.get("first_seen_at"), Some(Bson::DateTime(_))));
        assert!(matches!(doc.get("created"), Some(Bson::DateTime(_))));
        let history = doc.get_array("history").unwrap();
        assert!(matches!(
            history[0].as_document().unwrap().get("at"),
            Some(Bson::DateTime(_))
        ));
        let back: LabDoc = bson::from_document(doc).unwrap();
        assert_eq!(back.into_record().unwrap(), record);
    }
}
