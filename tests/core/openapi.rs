//! The OpenAPI document: served, complete, and true to what the handlers
//! return.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::{ADMIN_TOKEN, OPERATOR_TOKEN, TestApi, TestApp, VIEWER_TOKEN};

/// Checks `v` against `schema` (the subset of JSON Schema utoipa emits):
/// types, required properties, no undocumented properties, items, refs.
fn check(doc: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        return check(doc, &doc["components"]["schemas"][name], v, at, errors);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema.get(key).and_then(Value::as_array) {
            let ok = options.iter().any(|o| {
                let mut e = Vec::new();
                check(doc, o, v, at, &mut e);
                e.is_empty()
            });
            if !ok {
                errors.push(format!("{at}: matches none of {key}"));
            }
            return;
        }
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check(doc, s, v, at, errors);
        }
        return;
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let allowed = types.is_empty()
        || types.contains(&kind)
        || (kind == "integer" && types.contains(&"number"));
    if !allowed {
        errors.push(format!("{at}: {kind} where the schema says {types:?}"));
        return;
    }
    if let (Value::Object(obj), Some(props)) =
        (v, schema.get("properties").and_then(Value::as_object))
    {
        for req in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let req = req.as_str().unwrap_or_default();
            if !obj.contains_key(req) {
                errors.push(format!("{at}: required {req} missing"));
            }
        }
        let open = schema
            .get("additionalProperties")
            .is_some_and(|a| a != &Value::Bool(false));
        for (k, x) in obj {
            match props.get(k) {
                Some(s) => check(doc, s, x, &format!("{at}.{k}"), errors),
                None if open => {}
                None => errors.push(format!("{at}: {k} is not in the schema")),
            }
        }
    }
    if let (Value::Array(items), Some(s)) = (v, schema.get("items")) {
        for (i, x) in items.iter().enumerate() {
            check(doc, s, x, &format!("{at}[{i}]"), errors);
        }
    }
}

fn response_schema<'a>(doc: &'a Value, path: &str, method: &str, status: u16) -> &'a Value {
    let op = &doc["paths"][path][method];
    let r = &op["responses"][status.to_string()];
    let content = &r["content"];
    let media = content
        .get("application/json")
        .or_else(|| content.as_object().and_then(|m| m.values().next()))
        .unwrap_or_else(|| panic!("{method} {path} {status}: no content in {r}"));
    &media["schema"]
}

fn assert_matches(doc: &Value, path: &str, method: &str, status: u16, body: &Value) {
    let mut errors = Vec::new();
    check(
        doc,
        response_schema(doc, path, method, status),
        body,
        &format!("{method} {path} {status}"),
        &mut errors,
    );
    assert!(errors.is_empty(), "{errors:#?}\n{body:#}");
}

#[tokio::test]
async fn the_document_lists_every_route_and_its_schemas_match_the_responses() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let doc: Value = api
        .http
        .get(api.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let want = [
        ("/api/v1/workers", "get"),
        ("/api/v1/workers", "post"),
        ("/api/v1/workers/{worker_id}", "get"),
        ("/api/v1/workers/{worker_id}", "patch"),
        ("/api/v1/workers/{worker_id}", "delete"),
        ("/api/v1/workers/{worker_id}/labs", "get"),
        ("/api/v1/workers/{worker_id}/labs/{lab_id}", "get"),
        ("/api/v1/workers/{worker_id}/labs/{lab_id}", "delete"),
        ("/api/v1/delete-requests/{id}", "get"),
        ("/api/v1/delete-requests/{id}", "delete"),
        ("/api/v1/workers/{worker_id}/labs/refresh", "post"),
        ("/api/v1/labs/refresh", "post"),
        ("/api/v1/refresh-runs", "get"),
        ("/api/v1/refresh-runs/{run_id}", "get"),
        ("/api/v1/connection-checks", "post"),
        ("/api/v1/workers/{worker_id}/connection-check", "post"),
        ("/api/v1/audit", "get"),
        ("/api/v1/events/stream", "get"),
        ("/api/v1/healthz", "get"),
        ("/api/v1/readyz", "get"),
        ("/api/v1/metrics", "get"),
        ("/api/v1/openapi.json", "get"),
    ];
    for (path, method) in want {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from the document"
        );
    }
    let documented: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    assert_eq!(
        documented,
        want.len(),
        "every documented route is a real one"
    );
    assert!(doc["components"]["securitySchemes"]["token"].is_object());

    // Real responses against their schemas.
    let (s, report) = api
        .send(api.req(
            Method::POST,
            "/api/v1/workers/cml-1/labs/refresh",
            Some(ADMIN_TOKEN),
        ))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_matches(
        &doc,
        "/api/v1/workers/{worker_id}/labs/refresh",
        "post",
        200,
        &report,
    );
    let (_, workers) = api.get("/api/v1/workers", VIEWER_TOKEN).await;
    assert_matches(&doc, "/api/v1/workers", "get", 200, &workers);
    let (_, page) = api
        .get("/api/v1/workers/cml-1/labs?limit=3", VIEWER_TOKEN)
        .await;
    assert_matches(&doc, "/api/v1/workers/{worker_id}/labs", "get", 200, &page);
    let lab = page["items"][0]["lab_id"].as_str().unwrap().to_owned();
    let (_, detail) = api
        .get(&format!("/api/v1/workers/cml-1/labs/{lab}"), VIEWER_TOKEN)
        .await;
    assert_matches(
        &doc,
        "/api/v1/workers/{worker_id}/labs/{lab_id}",
        "get",
        200,
        &detail,
    );
    let wiped = t.add_lab("DEFINED_ON_CORE");
    let (s, out) = api
        .send(api.req(
            Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{wiped}"),
            Some(OPERATOR_TOKEN),
        ))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_matches(
        &doc,
        "/api/v1/workers/{worker_id}/labs/{lab_id}",
        "delete",
        200,
        &out,
    );
    let (s, problem) = api.get("/api/v1/workers/nope", VIEWER_TOKEN).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_matches(&doc, "/api/v1/workers/{worker_id}", "get", 404, &problem);
    let (_, runs) = api.get("/api/v1/refresh-runs", VIEWER_TOKEN).await;
    assert_matches(&doc, "/api/v1/refresh-runs", "get", 200, &runs);
    let (_, audit) = api.get("/api/v1/audit?limit=5", VIEWER_TOKEN).await;
    assert_matches(&doc, "/api/v1/audit", "get", 200, &audit);
    let run_id = runs[0]["run_id"].as_str().unwrap();
    let (_, run) = api
        .get(&format!("/api/v1/refresh-runs/{run_id}"), VIEWER_TOKEN)
        .await;
    assert_matches(&doc, "/api/v1/refresh-runs/{run_id}", "get", 200, &run);
    let (s, started) = api
        .send(api.req(Method::POST, "/api/v1/labs/refresh", Some(ADMIN_TOKEN)))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_matches(&doc, "/api/v1/labs/refresh", "post", 202, &started);
    let (s, check) = api
        .send(
            api.req(
                Method::POST,
                "/api/v1/workers/cml-1/connection-check",
                Some(ADMIN_TOKEN),
            )
            .json(&serde_json::json!({})),
        )
        .await;
    assert_eq!(
        (s, check["ok"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{check}"
    );
    assert_matches(
        &doc,
        "/api/v1/workers/{worker_id}/connection-check",
        "post",
        200,
        &check,
    );
    api.stop().await;
}
