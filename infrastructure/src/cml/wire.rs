//! CML's JSON, parsed leniently where servers differ and strictly where it
//! matters: a lab must have a valid `id` (the one asked for) and a `state`;
//! every other field may be missing (CML 2.4 has no `owner_fullname` or
//! `effective_permissions`) and unknown fields are ignored. A field of the
//! wrong type is a protocol error for that lab, never a panic.

use chrono::{DateTime, Utc};
use labsync_application::CmlError;
use labsync_application::ports::LabList;
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

/// The most of a parser message an error keeps. serde quotes a string of
/// the wrong type in full (`invalid type: string "...", expected u64`), and
/// a CML body is as large as the server likes: unclipped, one hostile field
/// would make the lab's failure in the run report, and every log line that
/// names it, as large as the body.
const MAX_DETAIL: usize = 300;

/// The parser's message, its head and tail kept (the tail says what was
/// expected, and where) when it is longer than [`MAX_DETAIL`].
fn clipped(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if text.len() <= MAX_DETAIL {
        return text;
    }
    let mut head = MAX_DETAIL * 2 / 3;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - (MAX_DETAIL - head);
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{} ... {}", &text[..head], &text[tail..])
}

fn timestamp(s: Option<String>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Parses `GET /labs?show_all=true`: a JSON array of lab ids.
///
/// An entry that is not a UUID4 string is left out and counted, never
/// fatal: one odd entry must not stop a worker's refresh, and the caller
/// treats a list with any such entry as incomplete (nothing is pruned).
///
/// # Errors
/// [`CmlError::Protocol`] when the body is not a JSON array: a list
/// labsync cannot read is not a list it may prune from.
pub fn parse_lab_ids(body: &[u8]) -> Result<LabList, CmlError> {
    let raw: Vec<serde_json::Value> = serde_json::from_slice(body).map_err(|e| {
        CmlError::Protocol(format!("lab list is not an array of ids: {}", clipped(&e)))
    })?;
    let mut list = LabList {
        ids: Vec::with_capacity(raw.len()),
        ..LabList::default()
    };
    for entry in &raw {
        match entry.as_str().map(LabId::parse) {
            Some(Ok(id)) => list.ids.push(id),
            _ => {
                list.invalid += 1;
                if list.first_invalid.is_none() {
                    list.first_invalid = Some(clip_text(&entry.to_string(), 80));
                }
            }
        }
    }
    Ok(list)
}

/// At most `max` bytes of `text` (cut at a character boundary), with
/// control characters escaped, so that what CML sent is safe in a log line,
/// a report and a terminal.
pub fn clip_text(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 3);
    for c in text.chars() {
        let piece: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > max {
            out.push_str("...");
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// Parses `GET /labs/{id}` for the lab `expected`.
///
/// # Errors
/// [`CmlError::Protocol`] when the body does not parse, lacks `id` or
/// `state`, or describes another lab.
pub fn parse_lab_details(expected: &LabId, body: &[u8]) -> Result<LabSnapshot, CmlError> {
    let r: LabResponse = serde_json::from_slice(body)
        .map_err(|e| CmlError::Protocol(format!("lab {expected}: {}", clipped(&e))))?;
    snapshot(expected, r)
}

/// `GET /populate_lab_tiles`: `{"lab_tiles": {lab id: tile}}`.
#[derive(Debug, Deserialize)]
struct LabTilesResponse {
    lab_tiles: std::collections::HashMap<String, serde_json::Value>,
}

/// Parses `GET /populate_lab_tiles`: each tile that is a complete lab (as
/// [`parse_lab_details`] requires, under its own key) becomes a snapshot;
/// any other tile is left out, for the caller to fetch on its own (CML 2.9
/// documents tiles without the lab's fields).
///
/// # Errors
/// [`CmlError::Protocol`] when the body is not `{"lab_tiles": {...}}`.
pub fn parse_lab_tiles(
    body: &[u8],
) -> Result<std::collections::HashMap<LabId, LabSnapshot>, CmlError> {
    let r: LabTilesResponse = serde_json::from_slice(body)
        .map_err(|e| CmlError::Protocol(format!("lab tiles: {}", clipped(&e))))?;
    Ok(r.lab_tiles
        .into_iter()
        .filter_map(|(key, tile)| {
            let id = LabId::parse(&key).ok()?;
            let lab = serde_json::from_value::<LabResponse>(tile).ok()?;
            Some((id, snapshot(&id, lab).ok()?))
        })
        .collect())
}

fn snapshot(expected: &LabId, r: LabResponse) -> Result<LabSnapshot, CmlError> {
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
    use std::sync::OnceLock;

    use proptest::prelude::*;
    use proptest::sample::Index;
    use proptest::test_runner::TestCaseError;
    use serde_json::{Map, Value, json};

    use super::*;

    fn recorded(file: &str) -> Value {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/cml/cml-recorded")
            .join(file);
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
        let ids = parse_lab_ids(list.to_string().as_bytes()).unwrap().ids;
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
    fn tiles_give_the_same_snapshots_as_details_and_leave_out_what_is_not_a_lab() {
        let tiles = recorded("cml24-populate-lab-tiles.json");
        let parsed = parse_lab_tiles(tiles.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.len(), 4);
        for (id, snapshot) in &parsed {
            let one = parse(&tiles["lab_tiles"][id.as_str()]).unwrap();
            assert_eq!(snapshot, &one, "{id}");
        }
        let id = "a6a334de-b497-47ae-bbff-44a83f890114";
        let other = "b6a334de-b497-47ae-bbff-44a83f890114";
        let mixed = json!({"lab_tiles": {
            id: {"id": id, "state": "STARTED", "lab_title": "kept"},
            // A 2.9-style tile without the lab's fields, a tile under
            // another lab's key, and a key that is not a lab id.
            other: {"health": {}, "effective_permissions": []},
            "c6a334de-b497-47ae-bbff-44a83f890114": {"id": id, "state": "STARTED"},
            "../x": {"id": "../x", "state": "STARTED"},
        }});
        let parsed = parse_lab_tiles(mixed.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[&LabId::parse(id).unwrap()].title, "kept");
        for bad in [json!([]), json!({"tiles": {}}), json!({"lab_tiles": []})] {
            assert!(matches!(
                parse_lab_tiles(bad.to_string().as_bytes()),
                Err(CmlError::Protocol(_))
            ));
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
    fn a_list_is_an_array_and_entries_that_are_not_lab_ids_are_counted_not_fatal() {
        assert_eq!(parse_lab_ids(b"[]").unwrap(), LabList::default());
        for bad in [&b"{}"[..], b"[\"a6a334de-b497", b"null", b"\"x\""] {
            assert!(
                matches!(parse_lab_ids(bad), Err(CmlError::Protocol(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let list =
            parse_lab_ids(format!(r#"["{ID}", 1, "../etc", "\u001b[31mred", "{ID}"]"#).as_bytes())
                .unwrap();
        assert_eq!(list.ids.len(), 2);
        assert_eq!(list.invalid, 3);
        assert_eq!(list.first_invalid.as_deref(), Some("1"));
        let escaped = clip_text("\u{1b}[31mred\n", 80);
        assert!(!escaped.chars().any(char::is_control), "{escaped}");
        assert!(clip_text(&"x".repeat(1000), 80).len() <= 83);
    }

    // Hostile input. Whatever a CML server (or whatever answers in its
    // place) sends, parsing ends in a lab or a protocol error of bounded
    // size, and never in a panic. Where the rules say what must be accepted,
    // an oracle written from the module's rules, not from its code, says
    // which of the two it must be.

    const ID: &str = "a6a334de-b497-47ae-bbff-44a83f890114";

    /// The longest error: the clipped parser message, or an id's error
    /// with its quoted excerpt (80 bytes, up to six characters each once
    /// escaped), plus our words. What matters is that it does not grow
    /// with the input.
    const MAX_ERROR: usize = 1024;

    /// `LabResponse`'s fields in declaration order (serde reads a struct
    /// from an array too, by position; see [`fields`]).
    const LAB_FIELDS: [&str; 13] = [
        "id",
        "state",
        "lab_title",
        "lab_description",
        "lab_notes",
        "owner",
        "owner_username",
        "owner_fullname",
        "node_count",
        "link_count",
        "groups",
        "created",
        "modified",
    ];
    const GROUP_FIELDS: [&str; 3] = ["id", "permission", "name"];
    const OPTIONAL_STRINGS: [&str; 8] = [
        "lab_title",
        "lab_description",
        "lab_notes",
        "owner",
        "owner_username",
        "owner_fullname",
        "created",
        "modified",
    ];

    /// A parse result is acceptable as an outcome at all: a value, or a
    /// protocol error whose message does not grow with the input.
    fn bounded<T>(r: &Result<T, CmlError>) -> Result<(), TestCaseError> {
        match r {
            Ok(_) => {}
            Err(CmlError::Protocol(m)) => {
                prop_assert!(m.len() <= MAX_ERROR, "{} bytes: {:.400}", m.len(), m);
            }
            Err(other) => prop_assert!(false, "not a protocol error: {:?}", other),
        }
        Ok(())
    }

    /// The members of a struct-shaped value: an object's, or an array's
    /// read by position, which serde's derived structs also accept. CML
    /// never sends a lab as an array, and one would still have to name the
    /// lab asked for first, so that leniency is harmless; the oracle knows
    /// it only to stay exact.
    fn fields(v: &Value, names: &[&str], required: usize) -> Option<Map<String, Value>> {
        match v {
            Value::Object(o) => Some(o.clone()),
            Value::Array(a) if (required..=names.len()).contains(&a.len()) => Some(
                names
                    .iter()
                    .zip(a)
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect(),
            ),
            _ => None,
        }
    }

    fn absent_null_or(o: &Map<String, Value>, k: &str, ok: fn(&Value) -> bool) -> bool {
        o.get(k).is_none_or(|v| v.is_null() || ok(v))
    }

    fn group_ok(g: &Value) -> bool {
        fields(g, &GROUP_FIELDS, 2).is_some_and(|o| {
            o.get("id").is_some_and(Value::is_string)
                && o.get("permission").is_some_and(Value::is_string)
                && absent_null_or(&o, "name", Value::is_string)
        })
    }

    /// The module's rules: the lab asked for, a non-empty `state`, every
    /// other known field absent, null or of its type, unknown fields anything.
    fn acceptable(v: &Value, expected: &str) -> bool {
        fields(v, &LAB_FIELDS, 2).is_some_and(|o| {
            o.get("id").and_then(Value::as_str) == Some(expected)
                && o.get("state")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
                && OPTIONAL_STRINGS
                    .iter()
                    .all(|k| absent_null_or(&o, k, Value::is_string))
                && ["node_count", "link_count"]
                    .iter()
                    .all(|k| absent_null_or(&o, k, Value::is_u64))
                && absent_null_or(&o, "groups", |g| {
                    g.as_array().is_some_and(|a| a.iter().all(group_ok))
                })
        })
    }

    /// A list is any JSON array; how many of its entries are lab ids.
    fn list_acceptable(v: &Value) -> bool {
        v.is_array()
    }

    fn entries_len(v: &Value) -> usize {
        v.as_array().map_or(0, Vec::len)
    }

    fn valid_entries(v: &Value) -> usize {
        v.as_array().map_or(0, |a| {
            a.iter()
                .filter(|x| {
                    x.as_str()
                        .is_some_and(|s| labsync_domain::is_uuid4(s.as_bytes()))
                })
                .count()
        })
    }

    /// Strings CML sends, and strings it should not.
    fn arb_string() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => any::<String>(),
            1 => prop::sample::select(vec![
                ID, "444a78d1-575c-4746-8469-696e580f17b6", "STARTED", "DEFINED_ON_CORE", "",
                "2025-12-06T11:11:28+00:00", "9999-99-99T99:99:99Z", "../etc", "%2F", "\0", "💥",
            ])
            .prop_map(str::to_owned),
        ]
    }

    fn arb_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            // Non-finite floats become null, as serde_json writes them.
            any::<f64>().prop_map(Value::from),
            arb_string().prop_map(Value::from),
        ]
    }

    /// Any JSON value, nested up to six deep, at most 8 members a level.
    fn arb_json() -> impl Strategy<Value = Value> {
        arb_leaf().prop_recursive(6, 256, 8, |inner| {
            let key = prop_oneof![
                prop::sample::select(&LAB_FIELDS[..]).prop_map(str::to_owned),
                arb_string(),
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::vec((key, inner), 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A group, mostly well formed.
    fn arb_group() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => (arb_string(), arb_string(), prop::option::of(arb_string()))
                .prop_map(|(id, permission, name)| json!({"id": id, "permission": permission, "name": name})),
            1 => arb_json(),
        ]
    }

    /// A value of a known field's type.
    fn typed(field: &str) -> BoxedStrategy<Value> {
        match field {
            "node_count" | "link_count" => any::<u32>().prop_map(Value::from).boxed(),
            "groups" => prop::collection::vec(arb_group(), 0..4)
                .prop_map(Value::Array)
                .boxed(),
            _ => arb_string().prop_map(Value::from).boxed(),
        }
    }

    /// Something shaped like a lab: mostly the lab asked for, each known
    /// field present or not and mostly of its type, some unknown fields.
    /// About a third of these are acceptable, so both outcomes are tested.
    fn arb_lab() -> impl Strategy<Value = Value> {
        let known: Vec<_> = LAB_FIELDS[2..]
            .iter()
            .map(|&f| {
                prop::option::of(prop_oneof![6 => typed(f), 1 => arb_json()])
                    .prop_map(move |v| v.map(|v| (f.to_owned(), v)))
            })
            .collect();
        (
            prop_oneof![9 => Just(Value::from(ID)), 1 => arb_leaf()],
            prop_oneof![9 => arb_string().prop_map(Value::from), 1 => arb_leaf()],
            known,
            prop::collection::vec(("[a-z_]{1,12}", arb_json()), 0..4),
        )
            .prop_map(|(id, state, known, unknown)| {
                let mut o = Map::new();
                o.insert("id".into(), id);
                o.insert("state".into(), state);
                o.extend(known.into_iter().flatten());
                // An unknown name may turn out to be a known one; the
                // oracle judges whatever the object ends up holding.
                o.extend(unknown);
                Value::Object(o)
            })
    }

    /// Every recorded lab body: CML 2.9.1 details, and CML 2.4 tiles.
    fn recorded_labs() -> &'static [Value] {
        static LABS: OnceLock<Vec<Value>> = OnceLock::new();
        LABS.get_or_init(|| {
            let mut labs = recorded("cml291-lab-details.json")
                .as_array()
                .unwrap()
                .clone();
            labs.push(recorded("cml291-one-lab.json"));
            labs.extend(
                recorded("cml24-populate-lab-tiles.json")["lab_tiles"]
                    .as_object()
                    .unwrap()
                    .values()
                    .cloned(),
            );
            labs
        })
    }

    /// Parses `v` as the lab it claims to be, checking the outcome's shape
    /// and that it is what the rules say.
    fn judged(expected: &str, v: &Value) -> Result<Option<LabSnapshot>, TestCaseError> {
        let id = LabId::parse(expected).unwrap();
        let r = parse_lab_details(&id, &serde_json::to_vec(v).unwrap());
        bounded(&r)?;
        prop_assert_eq!(
            r.is_ok(),
            acceptable(v, expected),
            "{:.2000}",
            v.to_string()
        );
        Ok(r.ok())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_are_a_list_or_a_protocol_error(
            body in prop::collection::vec(any::<u8>(), 0..4096),
        ) {
            let r = parse_lab_ids(&body);
            bounded(&r)?;
            if let Ok(list) = r {
                let v: Value = serde_json::from_slice(&body).unwrap();
                prop_assert!(list_acceptable(&v));
                prop_assert_eq!(list.ids.len(), valid_entries(&v));
                prop_assert_eq!(list.ids.len() + list.invalid, v.as_array().unwrap().len());
                prop_assert!(list.first_invalid.as_ref().is_none_or(|t| t.len() <= 83));
            }
            bounded(&parse_lab_details(&LabId::parse(ID).unwrap(), &body))?;
        }

        #[test]
        fn arbitrary_json_is_read_by_the_rules(v in arb_json()) {
            judged(ID, &v)?;
            let r = parse_lab_ids(&serde_json::to_vec(&v).unwrap());
            bounded(&r)?;
            prop_assert_eq!(r.is_ok(), list_acceptable(&v), "{}", v);
            if let Ok(list) = r {
                prop_assert_eq!(list.ids.len(), valid_entries(&v));
            }
        }

        #[test]
        fn lab_shaped_json_is_read_by_the_rules(v in arb_lab()) {
            if let Some(s) = judged(ID, &v)? {
                let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
                prop_assert_eq!(&s.title, &text("lab_title"));
                prop_assert_eq!(&s.notes, &text("lab_notes"));
                prop_assert_eq!(s.state.as_str(), text("state"));
                prop_assert_eq!(s.node_count, v.get("node_count").and_then(Value::as_u64).unwrap_or(0));
                let groups = v.get("groups").and_then(Value::as_array).map_or(0, Vec::len);
                prop_assert!(s.groups.len() <= groups);
            }
        }

        #[test]
        fn a_recorded_lab_cut_short_is_an_error(lab: Index, cut: Index) {
            let v = lab.get(recorded_labs());
            let body = serde_json::to_vec(v).unwrap();
            let id = LabId::parse(v["id"].as_str().unwrap()).unwrap();
            let r = parse_lab_details(&id, &body[..cut.index(body.len())]);
            bounded(&r)?;
            prop_assert!(r.is_err());
        }

        #[test]
        fn a_recorded_lab_with_a_field_replaced_or_removed_is_read_by_the_rules(
            lab: Index,
            field: Index,
            new in prop::option::weighted(0.8, arb_json()),
        ) {
            let mut v = lab.get(recorded_labs()).clone();
            let expected = v["id"].as_str().unwrap().to_owned();
            let original = parse(&v).unwrap();
            let o = v.as_object_mut().unwrap();
            let key = field.get(&o.keys().cloned().collect::<Vec<_>>()).clone();
            match new {
                Some(new) => o.insert(key.clone(), new),
                None => o.remove(&key),
            };
            let s = judged(&expected, &v)?;
            if !LAB_FIELDS.contains(&key.as_str()) {
                // Unknown to labsync (topology, effective_permissions...): ignored.
                prop_assert_eq!(s, Some(original));
            }
        }

        #[test]
        fn a_recorded_lab_with_a_byte_changed_is_a_lab_or_a_protocol_error(
            lab: Index,
            at: Index,
            byte: u8,
        ) {
            let v = lab.get(recorded_labs());
            let mut body = serde_json::to_vec(v).unwrap();
            let i = at.index(body.len());
            body[i] = byte;
            let id = LabId::parse(v["id"].as_str().unwrap()).unwrap();
            bounded(&parse_lab_details(&id, &body))?;
            bounded(&parse_lab_ids(&body))?;
        }

        #[test]
        fn the_recorded_list_cut_short_or_with_an_entry_replaced_is_read_by_the_rules(
            cut: Index,
            entry: Index,
            new in arb_json(),
        ) {
            let mut list = recorded("cml24-labs.json");
            let body = serde_json::to_vec(&list).unwrap();
            let r = parse_lab_ids(&body[..cut.index(body.len())]);
            bounded(&r)?;
            prop_assert!(r.is_err());
            let entries = list.as_array_mut().unwrap();
            let i = entry.index(entries.len());
            entries[i] = new;
            let r = parse_lab_ids(&serde_json::to_vec(&list).unwrap());
            bounded(&r)?;
            prop_assert_eq!(r.is_ok(), list_acceptable(&list));
            let r = r.unwrap();
            prop_assert_eq!((r.ids.len(), r.ids.len() + r.invalid), (valid_entries(&list), entries_len(&list)));
        }
    }

    #[test]
    fn a_lab_sent_as_an_array_is_read_by_position() {
        // serde's leniency, which the oracle above mirrors: harmless, since
        // the first element must still be the lab asked for.
        let id = LabId::parse(ID).unwrap();
        let s = parse_lab_details(&id, json!([ID, "STOPPED", "t"]).to_string().as_bytes()).unwrap();
        assert_eq!((s.state, s.title.as_str()), (LabState::Stopped, "t"));
        let other = json!(["444a78d1-575c-4746-8469-696e580f17b6", "STOPPED"]);
        assert!(parse_lab_details(&id, other.to_string().as_bytes()).is_err());
    }

    #[test]
    fn deep_nesting_is_an_error_or_skipped_never_a_stack_overflow() {
        let id = LabId::parse(ID).unwrap();
        let deep = |open: &str, close: &str| {
            let n = 64 * 1024 / open.len();
            format!("{}{}", open.repeat(n), close.repeat(n))
        };
        // Where labsync reads the value, serde_json's depth limit makes
        // nesting an error.
        for body in [
            deep("[", "]"),
            deep("{\"a\":", "}"),
            format!(
                r#"{{"id": "{ID}", "state": "STOPPED", "groups": {}}}"#,
                deep("[", "]")
            ),
        ] {
            let r = parse_lab_details(&id, body.as_bytes());
            assert!(
                matches!(r, Err(CmlError::Protocol(_))),
                "{body:.100}: {r:?}"
            );
            let r = parse_lab_ids(body.as_bytes());
            assert!(
                matches!(r, Err(CmlError::Protocol(_))),
                "{body:.100}: {r:?}"
            );
        }
        // An unknown field is skipped without recursion, however deep.
        let body = format!(
            r#"{{"id": "{ID}", "state": "STOPPED", "topology": {}}}"#,
            deep("[", "]")
        );
        assert_eq!(
            parse_lab_details(&id, body.as_bytes()).unwrap().state,
            LabState::Stopped
        );
    }

    #[test]
    fn an_oversized_field_is_read_or_refused_in_a_short_message() {
        let id = LabId::parse(ID).unwrap();
        let big = "é".repeat(32 * 1024);
        let ok = json!({"id": ID, "state": "STOPPED", "lab_title": big});
        assert_eq!(
            parse_lab_details(&id, ok.to_string().as_bytes())
                .unwrap()
                .title,
            big
        );
        for bad in [
            json!({"id": ID, "state": "STOPPED", "node_count": big}),
            json!({"id": big, "state": "STOPPED"}),
            json!([big]),
            json!(["\u{1}".repeat(1000)]),
        ] {
            let r = parse_lab_details(&id, bad.to_string().as_bytes()).map(|_| ());
            let Err(CmlError::Protocol(m)) = r else {
                panic!("{r:?}")
            };
            assert!(m.len() <= MAX_ERROR, "{} bytes", m.len());
        }
        // In a list, such entries are counted and clipped.
        for bad in [json!([big]), json!(["\u{1}".repeat(1000)])] {
            let list = parse_lab_ids(bad.to_string().as_bytes()).unwrap();
            assert_eq!(list.invalid, 1);
            assert!(list.first_invalid.unwrap().len() <= 83);
        }
        // The clipped message still says what was expected, and where.
        let Err(CmlError::Protocol(m)) = parse_lab_details(
            &id,
            json!({"id": ID, "state": "STOPPED", "node_count": big})
                .to_string()
                .as_bytes(),
        ) else {
            unreachable!()
        };
        assert!(m.contains("expected u64 at line 1"), "{m}");
    }
}
