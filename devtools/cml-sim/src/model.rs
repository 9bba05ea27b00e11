//! The simulated server's state: users, labs and the asynchronous lab state
//! machine (start/stop/wipe take effect after a delay, as on real CML).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// The permission list CML returns to an admin, in the order a CML 2.9.1
/// server returned it (the order is not stable on real servers).
pub const ALL_PERMISSIONS: [&str; 4] = ["lab_view", "lab_admin", "lab_exec", "lab_edit"];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimUser {
    pub id: String,
    pub username: String,
    pub password: String,
    pub fullname: String,
    pub admin: bool,
    /// Ids of the groups the user belongs to.
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabGroup {
    pub id: String,
    /// `read_only` or `read_write` (CML's `OldPermission`).
    pub permission: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One lab as the server holds it. Serializes in the field order of a real
/// `GET /api/v0/labs/{id}` answer, minus `effective_permissions`, which depends
/// on who asks. Fields older servers omit default to empty.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Lab {
    pub id: String,
    pub created: String,
    pub modified: String,
    pub lab_description: String,
    pub lab_notes: String,
    pub lab_title: String,
    pub owner: String,
    pub owner_username: String,
    pub owner_fullname: String,
    pub state: String,
    pub node_count: u32,
    pub link_count: u32,
    pub groups: Vec<LabGroup>,
    /// A transition in progress: (target state, when it completes).
    #[serde(skip)]
    pub pending: Option<(String, Instant)>,
}

/// Fields of a lab to create or change through the control API; absent
/// fields keep their value (or a default on create).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabSpec {
    pub id: Option<String>,
    pub lab_title: Option<String>,
    pub lab_description: Option<String>,
    pub lab_notes: Option<String>,
    /// Username of an existing simulated user (default: the first admin).
    pub owner_username: Option<String>,
    pub state: Option<String>,
    pub node_count: Option<u32>,
    pub link_count: Option<u32>,
    pub groups: Option<Vec<LabGroup>>,
}

pub const STATES: [&str; 3] = ["DEFINED_ON_CORE", "STOPPED", "STARTED"];

pub fn timestamp(t: DateTime<Utc>) -> String {
    // CML writes whole seconds with an explicit +00:00 offset.
    t.to_rfc3339_opts(SecondsFormat::Secs, false)
}

impl Lab {
    /// Completes a pending transition whose time has come.
    pub fn settle(&mut self, now: Instant) {
        if let Some((target, at)) = &self.pending
            && *at <= now
        {
            self.state = target.clone();
            self.pending = None;
        }
    }

    pub fn converged(&self) -> bool {
        self.pending.is_none()
    }

    /// What `user` may do with this lab, or `None` if they cannot see it.
    pub fn permissions_for(&self, user: &SimUser) -> Option<Vec<&'static str>> {
        if user.admin || self.owner == user.id {
            return Some(ALL_PERMISSIONS.to_vec());
        }
        let mut perms: Vec<&'static str> = Vec::new();
        for g in self.groups.iter().filter(|g| user.groups.contains(&g.id)) {
            let granted: &[&'static str] = if g.permission == "read_write" {
                &["lab_view", "lab_edit", "lab_exec"]
            } else {
                &["lab_view"]
            };
            for p in granted {
                if !perms.contains(p) {
                    perms.push(p);
                }
            }
        }
        (!perms.is_empty()).then_some(perms)
    }

    /// The JSON body of `GET /api/v0/labs/{id}` for `user`.
    pub fn to_response(&self, perms: &[&str]) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("effective_permissions".into(), perms.into());
        }
        v
    }
}

/// The labs of one simulated server, keyed by id (ordered, so listings are
/// stable like CML's).
#[derive(Debug, Default, Clone)]
pub struct Inventory {
    pub labs: BTreeMap<String, Lab>,
}

impl Inventory {
    pub fn settle_all(&mut self, now: Instant) {
        for lab in self.labs.values_mut() {
            lab.settle(now);
        }
    }

    /// Starts an asynchronous transition, or applies it at once when the
    /// configured delay is zero.
    pub fn begin_transition(lab: &mut Lab, target: &str, delay: Duration, now: Instant) {
        if delay.is_zero() {
            target.clone_into(&mut lab.state);
            lab.pending = None;
        } else {
            lab.pending = Some((target.to_owned(), now + delay));
        }
    }
}
