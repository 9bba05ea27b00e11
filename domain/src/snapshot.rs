//! What CML says about one lab at one moment, and its content hash.
//!
//! The hash covers exactly the fields labsync stores, in a fixed encoding
//! (FNV-1a, 64 bit, over length-prefixed fields), so that it is the same on
//! every machine and release: a refresh compares hashes to decide that a lab
//! is unchanged and needs no write.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::LabState;

/// A group the lab is shared with, and at which level (`read_only`,
/// `read_write`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LabGroup {
    pub id: String,
    pub permission: String,
    pub name: Option<String>,
}

/// The stored description of a lab. Older CML servers omit some fields;
/// those are empty or `None` rather than invented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabSnapshot {
    pub title: String,
    pub description: String,
    pub notes: String,
    pub owner_id: Option<String>,
    pub owner_username: Option<String>,
    pub owner_fullname: Option<String>,
    pub state: LabState,
    pub node_count: u64,
    pub link_count: u64,
    /// Sorted by id: CML's order carries no meaning and must not make an
    /// unchanged lab look changed.
    pub groups: Vec<LabGroup>,
    pub created: Option<DateTime<Utc>>,
    pub modified: Option<DateTime<Utc>>,
}

/// A 64-bit content hash, shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ContentHash(pub u64);

impl std::fmt::Display for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

struct Fnv(u64);

impl Fnv {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    /// Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
    fn field(&mut self, b: &[u8]) {
        self.bytes(&(b.len() as u64).to_le_bytes());
        self.bytes(b);
    }
    fn opt(&mut self, s: Option<&str>) {
        match s {
            None => self.bytes(&[0]),
            Some(s) => {
                self.bytes(&[1]);
                self.field(s.as_bytes());
            }
        }
    }
    fn time(&mut self, t: Option<DateTime<Utc>>) {
        match t {
            None => self.bytes(&[0]),
            Some(t) => {
                self.bytes(&[1]);
                self.bytes(&t.timestamp_micros().to_le_bytes());
            }
        }
    }
}

impl LabSnapshot {
    /// Puts the snapshot in its canonical form: groups sorted, timestamps
    /// at millisecond precision (what a BSON date keeps).
    #[must_use]
    pub fn normalized(mut self) -> Self {
        self.groups.sort();
        self.groups.dedup();
        let millis = |t: Option<DateTime<Utc>>| {
            t.and_then(|t| DateTime::from_timestamp_millis(t.timestamp_millis()))
        };
        self.created = millis(self.created);
        self.modified = millis(self.modified);
        self
    }

    pub fn content_hash(&self) -> ContentHash {
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        h.field(self.title.as_bytes());
        h.field(self.description.as_bytes());
        h.field(self.notes.as_bytes());
        h.opt(self.owner_id.as_deref());
        h.opt(self.owner_username.as_deref());
        h.opt(self.owner_fullname.as_deref());
        h.field(self.state.as_str().as_bytes());
        h.bytes(&self.node_count.to_le_bytes());
        h.bytes(&self.link_count.to_le_bytes());
        h.bytes(&(self.groups.len() as u64).to_le_bytes());
        for g in &self.groups {
            h.field(g.id.as_bytes());
            h.field(g.permission.as_bytes());
            h.opt(g.name.as_deref());
        }
        h.time(self.created);
        h.time(self.modified);
        ContentHash(h.0)
    }

    /// The fields that differ from `old`, with their old and new values as
    /// text, in a fixed order.
    pub fn changes_from(&self, old: &LabSnapshot) -> Vec<FieldChange> {
        let mut out = Vec::new();
        let mut cmp = |field: LabField, old: String, new: String| {
            if old != new {
                out.push(FieldChange {
                    field,
                    old: excerpt(&old),
                    new: excerpt(&new),
                });
            }
        };
        // An absent field and an empty one hash differently, so they must
        // also differ here: otherwise a lab would look changed forever.
        let opt = |s: &Option<String>| s.clone().unwrap_or_else(|| "(unset)".to_owned());
        let time =
            |t: &Option<DateTime<Utc>>| t.map_or_else(|| "(unset)".to_owned(), |t| t.to_rfc3339());
        cmp(LabField::Title, old.title.clone(), self.title.clone());
        cmp(
            LabField::Description,
            old.description.clone(),
            self.description.clone(),
        );
        cmp(LabField::Notes, old.notes.clone(), self.notes.clone());
        cmp(LabField::OwnerId, opt(&old.owner_id), opt(&self.owner_id));
        cmp(
            LabField::OwnerUsername,
            opt(&old.owner_username),
            opt(&self.owner_username),
        );
        cmp(
            LabField::OwnerFullname,
            opt(&old.owner_fullname),
            opt(&self.owner_fullname),
        );
        cmp(
            LabField::State,
            old.state.to_string(),
            self.state.to_string(),
        );
        cmp(
            LabField::NodeCount,
            old.node_count.to_string(),
            self.node_count.to_string(),
        );
        cmp(
            LabField::LinkCount,
            old.link_count.to_string(),
            self.link_count.to_string(),
        );
        let groups = |g: &[LabGroup]| {
            g.iter()
                .map(|g| {
                    format!(
                        "{}:{}:{}",
                        g.id,
                        g.name.as_deref().unwrap_or(""),
                        g.permission
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        cmp(LabField::Groups, groups(&old.groups), groups(&self.groups));
        cmp(LabField::Created, time(&old.created), time(&self.created));
        cmp(
            LabField::Modified,
            time(&old.modified),
            time(&self.modified),
        );
        out
    }
}

/// A field of a lab that labsync keeps, named in its history as in CML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabField {
    Title,
    Description,
    Notes,
    OwnerId,
    OwnerUsername,
    OwnerFullname,
    State,
    NodeCount,
    LinkCount,
    Groups,
    Created,
    Modified,
}

impl LabField {
    /// The field's name, as stored and shown.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Title => "title",
            Self::Description => "description",
            Self::Notes => "notes",
            Self::OwnerId => "owner_id",
            Self::OwnerUsername => "owner_username",
            Self::OwnerFullname => "owner_fullname",
            Self::State => "state",
            Self::NodeCount => "node_count",
            Self::LinkCount => "link_count",
            Self::Groups => "groups",
            Self::Created => "created",
            Self::Modified => "modified",
        }
    }
}

impl std::fmt::Display for LabField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One field of a lab that changed between two refreshes. A long value
/// (a lab's notes can be megabytes) is kept as an [`excerpt`]: the history
/// keeps 50 entries of two values each, and a record must stay far below
/// MongoDB's 16 MiB document limit whatever CML sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    pub field: LabField,
    pub old: String,
    pub new: String,
}

/// The longest value a [`FieldChange`] keeps whole, in bytes.
pub const MAX_CHANGE_TEXT: usize = 512;

/// `text` itself when it is at most [`MAX_CHANGE_TEXT`] bytes; otherwise
/// its first 256 bytes (at a character boundary), its length and its
/// FNV-1a hash, so that two long values still differ when they differ.
pub fn excerpt(text: &str) -> String {
    if text.len() <= MAX_CHANGE_TEXT {
        return text.to_owned();
    }
    let mut end = 256;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.bytes(text.as_bytes());
    format!(
        "{}... ({} bytes, fnv1a {:016x})",
        &text[..end],
        text.len(),
        h.0
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_field_is_stored_by_the_name_it_shows() {
        let old = snapshot("a");
        let mut new = old.clone();
        new.title = "t".into();
        new.notes = "n".into();
        new.node_count = 3;
        for c in new.changes_from(&old) {
            assert_eq!(
                serde_json::to_value(c.field).unwrap(),
                serde_json::json!(c.field.as_str())
            );
        }
        assert_eq!(
            serde_json::from_str::<LabField>("\"owner_username\"").unwrap(),
            LabField::OwnerUsername
        );
    }

    pub fn snapshot(title: &str) -> LabSnapshot {
        LabSnapshot {
            title: title.into(),
            description: "d".into(),
            notes: String::new(),
            owner_id: Some("4cfc3696-4df0-49a3-a0dd-7bbd9271fe67".into()),
            owner_username: Some("admin".into()),
            owner_fullname: None,
            state: LabState::Stopped,
            node_count: 3,
            link_count: 2,
            groups: vec![],
            created: None,
            modified: None,
        }
    }

    #[test]
    fn the_hash_is_stable_and_sees_every_field() {
        let a = snapshot("OSPF");
        // Pinned: a change of encoding would make every stored lab look
        // changed at the next refresh, so it must be deliberate.
        assert_eq!(a.content_hash().to_string(), "52fe099616de5aeb");
        assert_eq!(a.content_hash(), snapshot("OSPF").content_hash());
        let variants: [fn(&mut LabSnapshot); 12] = [
            |s| s.title.push('!'),
            |s| s.description.push('!'),
            |s| s.notes.push('!'),
            |s| s.owner_id = None,
            |s| s.owner_username = Some("student".into()),
            |s| s.owner_fullname = Some(String::new()),
            |s| s.state = LabState::Started,
            |s| s.node_count += 1,
            |s| s.link_count += 1,
            |s| {
                s.groups.push(LabGroup {
                    id: "g".into(),
                    permission: "read_only".into(),
                    name: None,
                });
            },
            |s| s.created = Some(DateTime::UNIX_EPOCH),
            |s| s.modified = Some(DateTime::UNIX_EPOCH),
        ];
        for (i, change) in variants.iter().enumerate() {
            let mut b = snapshot("OSPF");
            change(&mut b);
            assert_ne!(a.content_hash(), b.content_hash(), "variant {i}");
            assert_eq!(b.changes_from(&a).len(), 1, "variant {i}");
        }
    }

    #[test]
    fn field_boundaries_matter() {
        let mut a = snapshot("ab");
        a.description = "c".into();
        let mut b = snapshot("a");
        b.description = "bc".into();
        assert_ne!(a.content_hash(), b.content_hash());
    }

    #[test]
    fn group_order_does_not_change_the_normalized_hash() {
        let g = |id: &str| LabGroup {
            id: id.into(),
            permission: "read_only".into(),
            name: None,
        };
        let mut a = snapshot("x");
        a.groups = vec![g("1"), g("2")];
        let mut b = snapshot("x");
        b.groups = vec![g("2"), g("1")];
        assert_eq!(a.normalized().content_hash(), b.normalized().content_hash());
    }

    #[test]
    fn long_values_are_kept_as_bounded_excerpts_that_still_differ() {
        let old = {
            let mut s = snapshot("x");
            s.notes = "é".repeat(1_000_000);
            s
        };
        let mut new = old.clone();
        new.notes.push('!');
        let changes = new.changes_from(&old);
        assert_eq!(changes.len(), 1);
        let c = &changes[0];
        assert!(
            c.old.len() < 400 && c.new.len() < 400,
            "{} {}",
            c.old.len(),
            c.new.len()
        );
        assert_ne!(c.old, c.new);
        assert!(c.old.contains("2000000 bytes"), "{}", c.old);
        assert_eq!(excerpt("short"), "short");
        assert_eq!(excerpt(&"a".repeat(MAX_CHANGE_TEXT)).len(), MAX_CHANGE_TEXT);
    }

    #[test]
    fn changes_name_fields_with_old_and_new_values() {
        let old = snapshot("Old");
        let mut new = snapshot("New");
        new.state = LabState::Started;
        let changes = new.changes_from(&old);
        assert_eq!(
            changes,
            vec![
                FieldChange {
                    field: LabField::Title,
                    old: "Old".into(),
                    new: "New".into()
                },
                FieldChange {
                    field: LabField::State,
                    old: "STOPPED".into(),
                    new: "STARTED".into()
                },
            ]
        );
    }
}
