//! CML's JSON, parsed leniently where servers differ and strictly where it
//! matters: a lab must have a valid `id` (the one asked for) and a `state`;
//! every other field may be missing (CML 2.4 has no `owner_fullname` or
//! `effective_permissions`) and unknown fields are ignored. A field of the
//! wrong type is a protocol error for that lab, never a panic.

use chrono::{DateTime, Utc};
use labsync_application::CmlError;
use labsync_domain::{LabGroup, LabId, LabSnapshot, LabState};
use serde::Deserialize;

/// `GET /labs/{id}` as CML answers it.
#[derive(Debug, Deserialize)]
struct LabResponse {
    id: String,
    state: String,
    #[serde(default)]
    lab_title: Option<String>,
    #[serde(default)]
    lab_description: Option<String>,
    #[serde(default)]
    lab_notes: Option<String>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    owner_username: Option<String>,
    #[serde(default)]
    owner_fullname: Option<String>,
    #[serde(default)]
    node_count: Option<u64>,
    #[serde(default)]
    link_count: Option<u64>,
    #[serde(default)]
    groups: Option<Vec<GroupResponse>>,
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    modified: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GroupResponse {
    id: String,
    permission: String,
    #[serde(default)]
    name: Option<String>,
}

fn timestamp(s: Option<String>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Parses `GET /labs?show_all=true`: a JSON array of lab ids.
///
/// # Errors
/// [`CmlError::Protocol`] for anything but an array of UUID4 strings: a list
/// labsync cannot fully read is not a list it may prune from.
pub fn parse_lab_ids(body: &[u8]) -> Result<Vec<LabId>, CmlError> {
    let raw: Vec<String> = serde_json::from_slice(body)
        .map_err(|e| CmlError::Protocol(format!("lab list is not an array of ids: {e}")))?;
    raw.iter()
        .map(|s| LabId::parse(s).map_err(|e| CmlError::Protocol(format!("lab list: {e}"))))
        .collect()
}

/// Parses `GET /labs/{id}` for the lab `expected`.
///
/// # Errors
/// [`CmlError::Protocol`] when the body does not parse, lacks `id` or
/// `state`, or describes another lab.
pub fn parse_lab_details(expected: &LabId, body: &[u8]) -> Result<LabSnapshot, CmlError> {
    let r: LabResponse = serde_json::from_slice(body)
        .map_err(|e| CmlError::Protocol(format!("lab {expected}: {e}")))?;
    if r.id != expected.as_str() {
        return Err(CmlError::Protocol(format!(
            "asked for lab {expected}, CML answered with lab {:?}",
            r.id.chars().take(64).collect::<String>()
        )));
    }
    if r.state.is_empty() {
        return Err(CmlError::Protocol(format!("lab {expected}: empty state")));
    }
    Ok(LabSnapshot {
        title: r.lab_title.unwrap_or_default(),
        description: r.lab_description.unwrap_or_default(),
        notes: r.lab_notes.unwrap_or_default(),
        owner_id: r.owner,
        owner_username: r.owner_username,
        owner_fullname: r.owner_fullname,
        state: LabState::parse(&r.state),
        node_count: r.node_count.unwrap_or(0),
        link_count: r.link_count.unwrap_or(0),
        groups: r
            .groups
            .unwrap_or_default()
            .into_iter()
            .map(|g| LabGroup {
                id: g.id,
                permission: g.permission,
                name: g.name,
            })
            .collect(),
        created: timestamp(r.created),
        modified: timestamp(r.modified),
    }
    .normalized())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::{Value, json};

    use super::*;

    fn recorded(file: &str) -> Value {
        let shared = std::env::var_os("LABSYNC_SHARED_DIR").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
            PathBuf::from,
        );
        let path = shared.join("reference/cml-recorded").join(file);
        serde_json::from_str(
            &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
        .unwrap()
    }

    fn parse(v: &Value) -> Result<LabSnapshot, CmlError> {
        let id = LabId::parse(v["id"].as_str().unwrap()).unwrap();
        parse_lab_details(&id, v.to_string().as_bytes())
    }

    #[test]
    fn parses_every_recorded_cml_291_lab() {
        let labs = recorded("cml291-lab-details.json");
        let labs = labs.as_array().unwrap();
        assert_eq!(labs.len(), 54);
        for v in labs {
            let s = parse(v).unwrap_or_else(|e| panic!("{}: {e}", v["id"]));
            assert_eq!(s.title, v["lab_title"].as_str().unwrap());
            assert_eq!(s.state.as_str(), v["state"].as_str().unwrap());
            assert_eq!(s.node_count, v["node_count"].as_u64().unwrap());
            assert_eq!(s.owner_username.as_deref(), v["owner_username"].as_str());
            assert_eq!(s.groups.len(), v["groups"].as_array().unwrap().len());
            assert!(s.created.is_some() && s.modified.is_some());
        }
        let one = parse(&recorded("cml291-one-lab.json")).unwrap();
        assert_eq!(one.title, "MCP Test Lab");
        assert_eq!(one.state, LabState::DefinedOnCore);
        assert_eq!(one.owner_fullname.as_deref(), Some(""));
        assert_eq!(
            one.created.unwrap().to_rfc3339(),
            "2025-12-06T11:11:28+00:00"
        );
    }

    #[test]
    fn parses_the_recorded_cml_24_list_and_tiles() {
        let list = recorded("cml24-labs.json");
        let ids = parse_lab_ids(list.to_string().as_bytes()).unwrap();
        assert_eq!(ids.len(), 4);
        let tiles = recorded("cml24-populate-lab-tiles.json");
        for id in &ids {
            // A 2.4 tile: no owner_fullname, no effective_permissions, plus topology.
            let tile = &tiles["lab_tiles"][id.as_str()];
            assert!(tile.get("owner_fullname").is_none() && tile.get("topology").is_some());
            let s = parse(tile).unwrap();
            assert_eq!(s.owner_fullname, None);
            assert_eq!(s.title, tile["lab_title"].as_str().unwrap());
        }
    }

    #[test]
    fn leniency_and_strictness() {
        let id = "a6a334de-b497-47ae-bbff-44a83f890114";
        // Minimal, with a newer server's extra field and an unknown state.
        let s =
            parse(&json!({"id": id, "state": "QUEUED", "autostart": {"enabled": true}})).unwrap();
        assert_eq!(s.state, LabState::Unknown("QUEUED".into()));
        assert_eq!((s.title.as_str(), s.node_count), ("", 0));
        // Missing or wrong state, wrong types, another lab: protocol errors.
        for bad in [
            json!({"id": id}),
            json!({"id": id, "state": 3}),
            json!({"id": id, "state": "STOPPED", "node_count": "7"}),
            json!({"id": id, "state": "STOPPED", "groups": {}}),
            json!({"id": "444a78d1-575c-4746-8469-696e580f17b6", "state": "STOPPED"}),
            json!(["not", "an", "object"]),
        ] {
            assert!(
                matches!(
                    parse_lab_details(&LabId::parse(id).unwrap(), bad.to_string().as_bytes()),
                    Err(CmlError::Protocol(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_lab_details(&LabId::parse(id).unwrap(), b"{\"id\": \"a6a3"),
            Err(CmlError::Protocol(_))
        ));
    }

    #[test]
    fn a_list_is_all_valid_ids_or_an_error() {
        assert_eq!(parse_lab_ids(b"[]").unwrap(), vec![]);
        for bad in [
            &b"{}"[..],
            b"[1, 2]",
            b"[\"../etc\"]",
            b"[\"a6a334de-b497",
            b"null",
        ] {
            assert!(
                matches!(parse_lab_ids(bad), Err(CmlError::Protocol(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
