//! Hostile input against the running API: several hundred generated
//! requests, from a fixed seed so that a failure can be replayed: path
//! segments with `..`, `%2F`, `%00`, invalid UTF-8, unicode and oversized
//! ids; bad, unknown and repeated query parameters; JSON bodies of the wrong
//! shape, too deep, too large or of the wrong media type. Every request must
//! be answered (never a dropped connection, never a 5xx), with the status an
//! oracle written from the API's rules expects, and every 4xx as
//! problem+json.
//!
//! Requests go over a plain TCP connection rather than through an HTTP
//! client: a client parses the URL first and removes `..` and `%2e%2e`
//! segments (URL parsing requires it), and those are exactly what must
//! reach the server.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use labsync_application::domain::BaseUrl;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{ADMIN_TOKEN, TestApi, TestApp};

/// The seed and the number of cases of each kind; `LABSYNC_HOSTILE_SEED`
/// and `LABSYNC_HOSTILE_CASES` override them to explore further. A failure
/// names the request it sent.
const SEED: u64 = 0x1ab5_0006;
const CASES_PER_KIND: u64 = 150;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A lab id that is valid and that no worker has.
const LAB: &str = "a6a334de-b497-47ae-bbff-44a83f890114";

// ----- the wire: one request per connection, read to the end -----

#[derive(Debug)]
struct Request {
    method: &'static str,
    /// The request target exactly as sent, escapes and all.
    target: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

impl Request {
    fn get(target: String) -> Self {
        Self::new("GET", target)
    }

    fn new(method: &'static str, target: String) -> Self {
        Self {
            method,
            target,
            content_type: None,
            body: Vec::new(),
        }
    }

    fn wire(&self) -> Vec<u8> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n",
            self.method, self.target
        );
        if let Some(ct) = self.content_type {
            head.push_str(&format!("content-type: {ct}\r\n"));
        }
        if self.method != "GET" {
            head.push_str(&format!("content-length: {}\r\n", self.body.len()));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }

    /// What a failure message shows of the request.
    fn describe(&self) -> String {
        let body = String::from_utf8_lossy(&self.body);
        format!(
            "{} {:.200} [{} {} bytes: {:.120}]",
            self.method,
            self.target,
            self.content_type.unwrap_or("no content-type"),
            self.body.len(),
            body
        )
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

async fn exchange(addr: SocketAddr, request: &Request, wait: Duration) -> Result<Answer, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // The server may answer (413) and close before it has read all of a
    // large body: a failed write is not yet a failure, no answer is.
    let _ = stream.write_all(&request.wire()).await;
    let mut raw = Vec::new();
    let read = async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                // A reset after the answer (the unread body) is fine.
                Err(_) if !raw.is_empty() => return Ok(()),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    };
    tokio::time::timeout(wait, read)
        .await
        .map_err(|_| format!("no answer within {wait:?}"))??;
    parse_answer(&raw)
}

fn parse_answer(raw: &[u8]) -> Result<Answer, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no complete answer: {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line: {head:?}"))?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(rest)?
    } else if let Some(n) = headers.get("content-length") {
        let n: usize = n.parse().map_err(|_| format!("content-length {n:?}"))?;
        rest.get(..n)
            .ok_or("a body shorter than its content-length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Answer {
        status,
        content_type: headers.get("content-type").cloned().unwrap_or_default(),
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk without a size line")?;
        let size = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("chunk size {size:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(rest.get(..size).ok_or("a short chunk")?);
        rest = rest.get(size + 2..).ok_or("a short chunk")?;
    }
}

/// An answer is a problem+json when it is an error: the RFC 9457 members,
/// the status repeated, and labsync's problem URN.
fn check_problem(a: &Answer) -> Result<(), String> {
    if a.status < 400 {
        return Ok(());
    }
    if !a.content_type.starts_with("application/problem+json") {
        return Err(format!("content-type {:?}", a.content_type));
    }
    let p: Value = serde_json::from_slice(&a.body).map_err(|e| format!("not JSON: {e}"))?;
    let text = |k: &str| p[k].as_str().filter(|s| !s.is_empty());
    if !text("type").is_some_and(|t| t.starts_with("urn:labsync:problem:"))
        || text("title").is_none()
        || text("detail").is_none()
        || p["status"] != a.status
    {
        return Err(format!("not a problem: {p}"));
    }
    Ok(())
}

// ----- the rules, written independently of the code -----

fn is_worker_id(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b[0] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn is_lab_id(s: &str) -> bool {
    let hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
    s.len() == 36
        && s.bytes().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            14 => c == b'4',
            19 => matches!(c, b'8' | b'9' | b'a' | b'b'),
            _ => hex(c),
        })
}

/// `%XX` decoded where `XX` is hex, anything else kept as it is; `+` is a
/// space only in a query (form encoding).
fn percent_decode(s: &str, plus_is_space: bool) -> Vec<u8> {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(u8::try_from(h * 16 + l).unwrap());
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' && plus_is_space {
            b' '
        } else {
            b[i]
        });
        i += 1;
    }
    out
}

/// A query string as form decoding reads it: pairs split on `&`, empty
/// pairs skipped, a pair without `=` has an empty value, invalid UTF-8
/// replaced.
fn form_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let d = |s: &str| String::from_utf8_lossy(&percent_decode(s, true)).into_owned();
            (d(k), d(v))
        })
        .collect()
}

// ----- generators -----

/// Pieces of a path segment, as sent (escaped where they are escaped).
const SEGMENT_PIECES: &[&str] = &[
    "..",
    "../",
    "..%2F",
    "%2e%2e",
    "%2E%2E%2F",
    ".",
    "%2F",
    "%2f",
    "%5C",
    "%00",
    "%0A",
    "%0d%0a",
    "%20",
    "%FF",
    "%C0%AF",
    "%C3%A9",
    "%E2%98%83",
    "%F0%9F%92%A5",
    "%EF%BC%A1",
    "%E2%80%AE",
    "%EF%BB%BF",
    "%25",
    "%",
    "%2",
    "%zz",
    ";",
    ":",
    "@",
    "!",
    "$",
    "'",
    "(",
    "*",
    "+",
    ",",
    "=",
    "~",
    "_",
    "-",
    "cml-1",
    "CML-1",
    "a",
    "z",
    "0",
    "4",
    "8",
    "labs",
    "refresh",
    LAB,
    "A6A334DE-B497-47AE-BBFF-44A83F890114",
];

fn segment(rng: &mut StdRng) -> String {
    match rng.random_range(0..10) {
        // Oversized, and around the worker id's 63-character limit.
        0 => "a".repeat(rng.random_range(60..4096)),
        1 => "%41".repeat(rng.random_range(1..512)),
        2 => ["cml-1", LAB, "refresh", "x".repeat(63).leak()]
            .choose(rng)
            .unwrap()
            .to_string(),
        _ => (0..rng.random_range(1..6))
            .map(|_| *SEGMENT_PIECES.choose(rng).unwrap())
            .collect(),
    }
}

/// A segment the router sees as one (no raw `/`), and its decoded text,
/// or `None` when it is not valid UTF-8 once decoded.
fn single(seg: &str) -> Option<Option<String>> {
    (!seg.is_empty() && !seg.contains('/'))
        .then(|| String::from_utf8(percent_decode(seg, false)).ok())
}

fn path_case(rng: &mut StdRng) -> (Request, Vec<u16>) {
    let seg = segment(rng);
    let any_route: Vec<u16> = vec![200, 400, 404, 405];
    match rng.random_range(0..6) {
        0 | 1 => {
            let target = if rng.random_bool(0.5) {
                format!("/api/v1/workers/{seg}")
            } else {
                format!("/api/v1/workers/{seg}/labs")
            };
            let expect = match single(&seg) {
                Some(Some(id)) if is_worker_id(&id) => vec![if id == "cml-1" { 200 } else { 404 }],
                Some(_) => vec![400],
                None => any_route,
            };
            (Request::get(target), expect)
        }
        2 | 3 => {
            let target = format!("/api/v1/workers/cml-1/labs/{seg}");
            let expect = match single(&seg) {
                // The static route wins over the parameter.
                _ if seg == "refresh" => vec![405],
                Some(Some(id)) if is_lab_id(&id) => vec![404],
                Some(_) => vec![400],
                None => any_route,
            };
            (Request::get(target), expect)
        }
        4 => {
            let target = format!("/api/v1/delete-requests/{seg}");
            let expect = match single(&seg) {
                Some(None) => vec![400],
                Some(Some(_)) => vec![404],
                None => vec![404],
            };
            (Request::get(target), expect)
        }
        _ => {
            // A method no route has: 405 where a route matches, else 404.
            let target = format!("/api/v1/workers/{seg}");
            let expect = if single(&seg).is_some() {
                vec![405]
            } else {
                vec![404, 405]
            };
            (Request::new("PUT", target), expect)
        }
    }
}

/// Bytes a client should have escaped, sent raw. Some pass the HTTP
/// parser and reach labsync (UTF-8, `{`, `|`); the others (controls,
/// space, `<`, a line break that would inject a header) are refused by the
/// parser itself, with a bare 400, before any of labsync's code runs.
const RAW_PIECES: &[&str] = &[
    "é",
    "☃",
    "💥",
    "\u{feff}",
    "\0",
    " ",
    "\t",
    "\u{7f}",
    "<",
    ">",
    "`",
    "\"",
    "{",
    "}",
    "|",
    "^",
    "\\",
    "\r\nx-evil: 1",
    "\n",
];

fn raw_case(rng: &mut StdRng) -> (Request, Vec<u16>) {
    let around = ["cml-1", "a", "%2F", "..", "%00", ""];
    let seg = format!(
        "{}{}{}",
        around.choose(rng).unwrap(),
        RAW_PIECES.choose(rng).unwrap(),
        around.choose(rng).unwrap()
    );
    let target = if rng.random_bool(0.5) {
        format!("/api/v1/workers/{seg}/labs")
    } else {
        format!("/api/v1/workers/cml-1/labs/{seg}")
    };
    (Request::get(target), vec![400])
}

#[derive(Debug, Clone, Copy)]
enum Params {
    Labs,
    Runs,
    Refresh,
    Delete,
}

impl Params {
    fn keys(self) -> &'static [&'static str] {
        match self {
            Self::Labs => &["state", "owner", "q", "limit", "cursor"],
            Self::Runs => &["worker_id", "limit"],
            Self::Refresh => &["dry_run", "force_prune"],
            Self::Delete => &["force", "mode"],
        }
    }
}

const NUMBERS: &[&str] = &[
    "0",
    "1",
    "50",
    "1000",
    "1001",
    "-1",
    "+5",
    "%2B5",
    "",
    "ten",
    "1e3",
    "0x10",
    "%205",
    "5%00",
    "%D9%A1",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
];
const BOOLS: &[&str] = &[
    "true", "false", "TRUE", "1", "0", "yes", "", "%74rue", "true%00", "t",
];
const MODES: &[&str] = &["sync", "async", "SYNC", "", "%00", "sync%00", "delete"];
const IDS: &[&str] = &[
    LAB,
    "A6A334DE-B497-47AE-BBFF-44A83F890114",
    "../x",
    "%2e%2e%2Fx",
    "cml-1",
    "CML-1",
    "nope",
    "%E2%98%83",
];
const OTHER_KEYS: &[&str] = &[
    "sort",
    "",
    "%00",
    "limit%5B%5D",
    "LIMIT",
    "%6Cimit",
    "li+mit",
    "q%00",
    "mode",
    "dry_run",
    "worker_id",
    "cursor",
];

fn value(rng: &mut StdRng, key: &str) -> String {
    let pick = |rng: &mut StdRng, from: &[&str]| from.choose(rng).unwrap().to_string();
    match (key, rng.random_range(0..4)) {
        (_, 0) => segment(rng),
        ("limit", _) => pick(rng, NUMBERS),
        ("dry_run" | "force_prune" | "force", _) => pick(rng, BOOLS),
        ("mode", _) => pick(rng, MODES),
        ("cursor" | "worker_id", _) => pick(rng, IDS),
        _ => (0..rng.random_range(0..4))
            .map(|_| *SEGMENT_PIECES.choose(rng).unwrap())
            .collect(),
    }
}

fn query_case(rng: &mut StdRng) -> (Request, Vec<u16>) {
    let params = *[Params::Labs, Params::Runs, Params::Refresh, Params::Delete]
        .choose(rng)
        .unwrap();
    let mut pairs: Vec<String> = Vec::new();
    for _ in 0..rng.random_range(0..5) {
        let key = if rng.random_bool(0.8) {
            params.keys().choose(rng).unwrap()
        } else {
            OTHER_KEYS.choose(rng).unwrap()
        };
        pairs.push(match rng.random_range(0..12) {
            0 => (*key).to_owned(),
            1 => String::new(),
            _ => format!("{key}={}", value(rng, key)),
        });
    }
    let q = pairs.join("&");
    let expect = expected_for_query(params, &form_pairs(&q));
    let request = match params {
        Params::Labs => Request::get(format!("/api/v1/workers/cml-1/labs?{q}")),
        Params::Runs => Request::get(format!("/api/v1/refresh-runs?{q}")),
        // An unknown worker: valid parameters get as far as a 404, and
        // nothing is refreshed or deleted.
        Params::Refresh => Request::new("POST", format!("/api/v1/workers/nope/labs/refresh?{q}")),
        Params::Delete => Request::new("DELETE", format!("/api/v1/workers/nope/labs/{LAB}?{q}")),
    };
    (request, vec![expect])
}

fn expected_for_query(params: Params, pairs: &[(String, String)]) -> u16 {
    let mut seen = HashSet::new();
    // Unknown and repeated parameters are refused, not ignored.
    if pairs
        .iter()
        .any(|(k, _)| !params.keys().contains(&k.as_str()) || !seen.insert(k))
    {
        return 400;
    }
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let limit_ok = |default: usize| {
        get("limit")
            .map_or(Ok(default), str::parse::<usize>)
            .is_ok_and(|n| (1..=1000).contains(&n))
    };
    let bool_ok = |k: &str| get(k).is_none_or(|v| v.parse::<bool>().is_ok());
    // Text filters: no control characters, at most 200 characters.
    let text_ok = |k: &str| {
        get(k).is_none_or(|v| !v.chars().any(char::is_control) && v.chars().count() <= 200)
    };
    let ok = match params {
        Params::Labs => {
            limit_ok(100)
                && get("cursor").is_none_or(is_lab_id)
                && ["q", "state", "owner"].into_iter().all(text_ok)
        }
        Params::Runs => limit_ok(50) && get("worker_id").is_none_or(is_worker_id),
        Params::Refresh => bool_ok("dry_run") && bool_ok("force_prune"),
        Params::Delete => bool_ok("force") && matches!(get("mode"), None | Some("sync" | "async")),
    };
    match (ok, params) {
        (false, _) => 400,
        (true, Params::Labs | Params::Runs) => 200,
        (true, Params::Refresh | Params::Delete) => 404,
    }
}

const CREATE_FIELDS: &[&str] = &[
    "id",
    "name",
    "base_url",
    "username",
    "password",
    "ca_cert_pem",
    "insecure",
    "enabled",
    "allow_http",
];

const STRINGS: &[&str] = &[
    "hostile-1",
    "cml-1",
    "Bad Id",
    "../x",
    "",
    "x",
    "\0",
    "é☃💥",
    "%2F",
];
const URLS: &[&str] = &[
    "http://127.0.0.1:9",
    "https://127.0.0.1:9/",
    "ftp://x",
    "http://",
    "http://h/../x",
    "http://h?x",
    "",
];
const PEMS: &[&str] = &[
    "-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----",
    "not a certificate",
    "",
];

fn wrong_type(rng: &mut StdRng) -> Value {
    match rng.random_range(0..6) {
        0 => Value::Null,
        1 => json!(7),
        2 => json!(-1.5),
        3 => json!(["x"]),
        4 => json!({"a": "b"}),
        _ => json!(true),
    }
}

fn field_value(rng: &mut StdRng, field: &str) -> Value {
    if rng.random_bool(0.15) {
        return wrong_type(rng);
    }
    let pick = |rng: &mut StdRng, from: &[&str]| json!(from.choose(rng).unwrap());
    match field {
        "insecure" | "enabled" | "allow_http" => json!(rng.random_bool(0.5)),
        "id" if rng.random_bool(0.6) => json!(format!("hostile-{}", rng.random_range(0..1000))),
        "base_url" => pick(rng, URLS),
        "ca_cert_pem" => pick(rng, PEMS),
        _ => pick(rng, STRINGS),
    }
}

/// How often a member is in a generated body: a create mostly has what it
/// needs, so that some get through to the handler.
fn presence(create: bool, field: &str) -> f64 {
    match (create, field) {
        (true, "ca_cert_pem" | "insecure") => 0.2,
        (true, "allow_http") => 0.5,
        (true, _) => 0.9,
        (false, _) => 0.4,
    }
}

/// What a body must be to be read at all: an object of known members of
/// their types; `create` needs its four strings, `insecure` and `enabled`
/// may be absent but not null.
fn body_shape_ok(create: bool, v: &Value) -> bool {
    let Some(o) = v.as_object() else {
        return false;
    };
    o.keys()
        .all(|k| CREATE_FIELDS[1..].contains(&k.as_str()) || (create && k == "id"))
        && o.iter().all(|(k, v)| match k.as_str() {
            "insecure" | "enabled" | "allow_http" => v.is_boolean() || (!create && v.is_null()),
            "name" | "ca_cert_pem" => v.is_string() || v.is_null(),
            _ => v.is_string() || (!create && v.is_null()),
        })
        && (!create
            || ["id", "base_url", "username", "password"]
                .iter()
                .all(|k| o.contains_key(*k)))
}

/// What the handler then says about a body of the right shape.
fn expected_for_body(create: bool, v: &Value, created: &mut HashSet<String>) -> u16 {
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    if !create {
        // The edge parses (the password, a URL) before the worker lookup.
        let bad_url = s("base_url").is_some_and(|u| BaseUrl::parse(u).is_err());
        return if s("password") == Some("") || bad_url {
            400
        } else {
            404
        };
    }
    let id = s("id").unwrap_or_default();
    let pem = s("ca_cert_pem");
    // A name or username: 1 to 200 characters, none of them a control character.
    let bad_text =
        |t: &str| t.is_empty() || t.chars().count() > 200 || t.chars().any(char::is_control);
    let invalid = !is_worker_id(id)
        || BaseUrl::parse(s("base_url").unwrap_or_default()).is_err()
        || s("password") == Some("")
        || s("username").is_some_and(bad_text)
        || s("name").is_some_and(bad_text)
        || (v.get("insecure") == Some(&json!(true)) && pem.is_some())
        || pem.is_some_and(|p| !p.contains("-----BEGIN CERTIFICATE-----"))
        // Plain http:// only with an explicit yes.
        || (s("base_url").is_some_and(|u| u.trim().starts_with("http://"))
            && v.get("allow_http") != Some(&json!(true)));
    if invalid {
        400
    } else if id == "cml-1" || !created.insert(id.to_owned()) {
        409
    } else {
        201
    }
}

fn body_case(rng: &mut StdRng, limit: usize, created: &mut HashSet<String>) -> (Request, Vec<u16>) {
    let create = rng.random_bool(0.5);
    let mut request = if create {
        Request::new("POST", "/api/v1/workers".into())
    } else {
        Request::new("PATCH", "/api/v1/workers/nope".into())
    };
    let (content_type, json_type) = *[
        (Some("application/json"), true),
        (Some("application/json"), true),
        (Some("application/json"), true),
        (Some("application/json; charset=utf-8"), true),
        (Some("application/vnd.labsync+json"), true),
        (Some("text/plain"), false),
        (Some("application/x-www-form-urlencoded"), false),
        (Some("application/jsonx"), false),
        (None, false),
    ]
    .choose(rng)
    .unwrap();
    request.content_type = content_type;
    let mut value: Option<Value> = None;
    request.body = match rng.random_range(0..10) {
        // Bytes, mostly not JSON.
        0 => (0..rng.random_range(0..512))
            .map(|_| rng.random())
            .collect(),
        // Nested beyond any reasonable depth, in a known or unknown member.
        1 => {
            let depth = rng.random_range(100..5000);
            let key = ["name", "colour"].choose(rng).unwrap();
            format!("{{\"{key}\": {}{}}}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
        }
        // Around the body limit, with a valid shape.
        2 => {
            let target = limit + rng.random_range(0..3) - 1 + rng.random_range(0..2) * limit / 2;
            let frame = json!({"password": ""}).to_string().len();
            let v = json!({"password": "p".repeat(target.saturating_sub(frame))});
            value = Some(v.clone());
            serde_json::to_vec(&v).unwrap()
        }
        // Not an object at all.
        3 => {
            let v = [
                json!(["hostile-2", null, "http://127.0.0.1:9", "admin", "pw", null]),
                json!("x"),
                json!(null),
                json!(7),
            ]
            .choose(rng)
            .unwrap()
            .clone();
            value = Some(v.clone());
            serde_json::to_vec(&v).unwrap()
        }
        // Objects of known and unknown members, mostly of their types.
        _ => {
            let mut o = Map::new();
            for f in CREATE_FIELDS {
                if rng.random_bool(presence(create, f)) {
                    o.insert((*f).into(), field_value(rng, f));
                }
            }
            if rng.random_bool(0.2) {
                let k = ["colour", "", "\0", "ID", "id ", "__proto__"]
                    .choose(rng)
                    .unwrap();
                o.insert((*k).into(), json!("x"));
            }
            let v = Value::Object(o);
            value = Some(v.clone());
            serde_json::to_vec(&v).unwrap()
        }
    };
    let value = value.or_else(|| serde_json::from_slice(&request.body).ok());
    // The declared length is checked before anything else about the body.
    let expect = if request.body.len() > limit {
        413
    } else if !json_type {
        415
    } else {
        match value {
            Some(v) if body_shape_ok(create, &v) => expected_for_body(create, &v, created),
            _ => 400,
        }
    };
    (request, vec![expect])
}

#[tokio::test]
async fn hostile_requests_get_4xx_problems_never_a_5xx_or_silence() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let addr: SocketAddr = api.base.trim_start_matches("http://").parse().unwrap();
    let limit = t.settings.api.body_limit_bytes;
    let seed = setting("LABSYNC_HOSTILE_SEED", SEED);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut created = HashSet::new();
    let mut cases: Vec<(&str, Request, Vec<u16>)> = Vec::new();
    for i in 0..setting("LABSYNC_HOSTILE_CASES", CASES_PER_KIND) {
        let (r, e) = path_case(&mut rng);
        cases.push(("path", r, e));
        let (r, e) = query_case(&mut rng);
        cases.push(("query", r, e));
        let (r, e) = body_case(&mut rng, limit, &mut created);
        cases.push(("body", r, e));
        if i % 5 == 0 {
            let (r, e) = raw_case(&mut rng);
            cases.push(("raw", r, e));
        }
    }
    let mut failures = Vec::new();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut refused_by_the_parser = 0;
    for (kind, request, expect) in &cases {
        let answer = exchange(addr, request, Duration::from_secs(20)).await;
        let verdict = answer.and_then(|a| {
            *statuses.entry(a.status).or_default() += 1;
            if !expect.contains(&a.status) {
                return Err(format!(
                    "status {} where {expect:?}: {:.300}",
                    a.status,
                    String::from_utf8_lossy(&a.body)
                ));
            }
            // The HTTP parser's own refusal has no body; labsync never
            // sees the request, so it cannot make it a problem.
            if *kind == "raw" && a.status == 400 && a.body.is_empty() {
                refused_by_the_parser += 1;
                return Ok(());
            }
            check_problem(&a)
        });
        if let Err(e) = verdict {
            failures.push(format!("{kind}: {}: {e}", request.describe()));
        }
    }
    // Still serving.
    let (s, _) = api.get("/api/v1/workers/cml-1", ADMIN_TOKEN).await;
    assert_eq!(s, reqwest::StatusCode::OK);
    crate::helpers::report(
        "hostile",
        &format!(
            "hostile API input: {} requests (seed {seed:#x}), statuses {statuses:?}, \
             {refused_by_the_parser} refused by the HTTP parser, {} failures",
            cases.len(),
            failures.len()
        ),
    );
    assert!(
        failures.is_empty(),
        "{} of {} hostile requests were mishandled:\n{}",
        failures.len(),
        cases.len(),
        failures
            .iter()
            .take(25)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    api.stop().await;
}

/// A body declared larger than the limit is refused at once, before any of
/// it is sent; text filters the database would choke on are refused too.
#[tokio::test]
async fn a_declared_oversized_body_and_unusable_filters_are_refused_at_once() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let addr: SocketAddr = api.base.trim_start_matches("http://").parse().unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/workers HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: 1099511627776\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut raw))
        .await
        .expect("an answer without waiting for the body")
        .unwrap();
    let answer = parse_answer(&raw[..n]).unwrap();
    assert_eq!(answer.status, 413, "{answer:?}");
    check_problem(&answer).unwrap();

    let long = "x".repeat(201);
    for q in ["%00", "a%0Ab", long.as_str()] {
        let (s, body) = api
            .get(&format!("/api/v1/workers/cml-1/labs?q={q}"), ADMIN_TOKEN)
            .await;
        assert_eq!(s.as_u16(), 400, "q={q}: {body}");
        assert!(body["detail"].as_str().unwrap().starts_with("q "), "{body}");
    }
    let (s, _) = api
        .get(
            &format!("/api/v1/workers/cml-1/labs?q={}", "x".repeat(200)),
            ADMIN_TOKEN,
        )
        .await;
    assert_eq!(s.as_u16(), 200);
    api.stop().await;
}
