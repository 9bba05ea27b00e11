//! The deployment files against the labsync they deploy: every metric the
//! alerts and the dashboard name is exported by a running service (a
//! renamed metric cannot silently break an alert), the Kubernetes manifests
//! probe the paths labsync serves and set only settings it reads, and the
//! systemd unit hands it only credentials it reads. (The rules' own tests
//! and the unit's syntax are checked by scripts/check-deploy.sh.)

use std::collections::BTreeSet;
use std::path::Path;

use labsync_infrastructure::configuration::{CREDENTIAL_KEYS, Settings};
use reqwest::{Method, StatusCode};

use labsync_test_support::poll_until;

use crate::helpers::{TestApi, TestApp, VIEWER_TOKEN};

/// How often, and how long, a scrape is retried until the gauges' first
/// reading shows.
const POLL: std::time::Duration = std::time::Duration::from_millis(200);
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `labsync_...` metric name a text mentions.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("labsync_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// The sample names of a Prometheus text exposition.
fn exported(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_metric_the_rules_and_the_dashboard_name_is_exported() {
    let t = TestApp::spawn().await;
    let lab = t.add_lab("DEFINED_ON_CORE");
    t.refresh().await;
    let api = TestApi::start(&t).await;
    let (s, body) = api
        .send(api.req(
            Method::POST,
            "/api/v1/workers/cml-1/labs/refresh",
            Some(crate::helpers::ADMIN_TOKEN),
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    api.delete_lab(&lab).await;
    let (s, _) = api.get("/api/v1/workers", "not-a-token").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let mut wanted = metric_names(&repo_file("deploy/prometheus/labsync.rules.yml"));
    let dashboard = repo_file("deploy/grafana/labsync.json");
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    wanted.extend(metric_names(&dashboard));
    assert!(
        wanted.len() > 20,
        "the rules and the dashboard name labsync's metrics: {wanted:?}"
    );
    let missing = || async {
        let (s, text) = api.get("/metrics", VIEWER_TOKEN).await;
        assert_eq!(s, StatusCode::OK);
        let have = exported(text.as_str().unwrap_or_default());
        wanted.difference(&have).cloned().collect::<BTreeSet<_>>()
    };
    // The gauges are read from MongoDB at start: polled, with a deadline;
    // what is still missing then is named.
    let _ = poll_until(POLL, PATIENCE, || async { missing().await.is_empty() }).await;
    let left = missing().await;
    assert!(left.is_empty(), "not exported: {left:?}");
    let (_, text) = api.get("/metrics", VIEWER_TOKEN).await;
    let text = text.as_str().unwrap_or_default().to_owned();
    for line in [
        "labsync_worker_labs{state=\"DEFINED_ON_CORE\",worker_id=\"cml-1\"}",
        "labsync_worker_sync_state{state=\"synced\",worker_id=\"cml-1\"} 1",
        "labsync_worker_consecutive_failed_runs{worker_id=\"cml-1\"} 0",
        "labsync_deletes_total{outcome=\"deleted\"} 1",
        "labsync_token_rejections_total{reason=\"unknown_token\"} 1",
        "labsync_ready 1",
        "route=\"/api/v1/workers/{worker_id}/labs/{lab_id}\"",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    api.stop().await;
}

/// The YAML documents of the Kubernetes manifests, as JSON values.
fn manifests() -> Vec<serde_json::Value> {
    let text = repo_file("deploy/kubernetes/labsync.yaml");
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).expect("YAML");
        if !v.is_null() {
            docs.push(v);
        }
    }
    docs
}

fn kind<'a>(docs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("a {kind}"))
}

#[tokio::test]
async fn the_kubernetes_manifests_probe_and_configure_what_labsync_serves_and_reads() {
    let docs = manifests();
    let deployment = kind(&docs, "Deployment");
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let port = &container["ports"][0];
    assert_eq!(port["name"], "http");
    // Every LABSYNC__ variable is a setting labsync reads: the defaults
    // with them applied must load (unknown keys are refused).
    let secret = kind(&docs, "Secret");
    let mut pairs = Vec::new();
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_owned();
        let value = match e["value"].as_str() {
            Some(v) => v.to_owned(),
            None => {
                let key = e["valueFrom"]["secretKeyRef"]["key"].as_str().unwrap();
                assert!(
                    secret["stringData"].get(key).is_some(),
                    "{name} names the Secret's {key}"
                );
                if name.ends_with("ENCRYPTION_KEY") {
                    crate::helpers::TEST_KEY.to_owned()
                } else {
                    "mongodb://127.0.0.1:1".to_owned()
                }
            }
        };
        pairs.push((name, value));
    }
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let settings = Settings::from_overrides(&refs).expect("the manifest's settings load");
    let listen: std::net::SocketAddr = settings.api.listen.parse().unwrap();
    assert_eq!(
        u64::from(listen.port()),
        port["containerPort"].as_u64().unwrap()
    );
    assert!(
        listen.ip().is_unspecified(),
        "reachable from the pod network"
    );

    // The probes ask what labsync answers, on the port it listens on.
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let p = &container[probe]["httpGet"];
        assert_eq!(p["path"], path, "{probe}");
        assert_eq!(p["port"], "http", "{probe}");
        let r = api.http.get(api.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    let monitor = kind(&docs, "ServiceMonitor");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["port"], "http");
    let service = kind(&docs, "Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    let pdb = kind(&docs, "PodDisruptionBudget");
    assert!(
        pdb["spec"]["minAvailable"].as_u64().unwrap()
            < deployment["spec"]["replicas"].as_u64().unwrap()
    );
    // A pod is given the time labsync's own grace needs.
    assert!(
        pod["terminationGracePeriodSeconds"].as_u64().unwrap() > settings.api.shutdown_grace_secs
    );
    api.stop().await;
}

#[test]
fn the_systemd_unit_hands_labsync_only_credentials_it_reads() {
    let unit = repo_file("deploy/systemd/labsync.service");
    let names: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("LoadCredential="))
        .filter_map(|l| l.split(':').next())
        .collect();
    assert!(names.contains(&"mongodb.uri") && names.contains(&"security.encryption_key"));
    for n in names {
        assert!(
            CREDENTIAL_KEYS.contains(&n),
            "{n} is not a credential labsync reads"
        );
    }
    assert!(!unit.contains("LABSYNC__MONGODB__URI") && !unit.contains("ENCRYPTION_KEY="));
}

#[tokio::test]
async fn the_gauges_tell_a_failing_worker_from_a_disabled_one_whatever_replica_ran_them() {
    use labsync_application::domain::{WorkerChanges, WorkerId};
    let t = TestApp::spawn_with(2, &[]).await;
    let success = t.refresh().await;
    assert_eq!(success.status, labsync_application::RunStatus::Succeeded);
    t.faults(serde_json::json!({"booting": true}));
    for _ in 0..3 {
        assert!(t.refresh().await.is_failure());
    }
    let cml2 = WorkerId::parse("cml-2").unwrap();
    labsync_application::RefreshWorkerLabs::new(t.services().clone())
        .execute(
            &cml2,
            &labsync_application::domain::Actor::api("admin"),
            labsync_application::RefreshOptions::default(),
        )
        .await
        .unwrap();
    t.app
        .inventory
        .update(
            &cml2,
            WorkerChanges {
                enabled: Some(false),
                ..WorkerChanges::default()
            },
            None,
            &labsync_application::domain::Actor::cli("ops"),
        )
        .await
        .unwrap();
    let api = TestApi::start(&t).await;
    let expected = [
        "labsync_worker_consecutive_failed_runs{worker_id=\"cml-1\"} 3".to_owned(),
        // The success, not the failures after it.
        format!(
            "labsync_last_successful_refresh_timestamp_seconds{{worker_id=\"cml-1\"}} {}",
            success.finished_at.timestamp()
        ),
        "labsync_worker_sync_state{state=\"failing\",worker_id=\"cml-1\"} 1".to_owned(),
        "labsync_worker_sync_state{state=\"disabled\",worker_id=\"cml-2\"} 1".to_owned(),
    ];
    let scrape = || async {
        let (_, text) = api.get("/metrics", VIEWER_TOKEN).await;
        text.as_str().unwrap_or_default().to_owned()
    };
    let _ = poll_until(POLL, PATIENCE, || async {
        let text = scrape().await;
        expected.iter().all(|e| text.contains(e))
    })
    .await;
    let text = scrape().await;
    for e in &expected {
        assert!(text.contains(e), "{e} in:\n{text}");
    }
    // A disabled worker is handed off: nothing an alert would watch.
    for gone in [
        "labsync_worker_consecutive_failed_runs{worker_id=\"cml-2\"}",
        "labsync_last_successful_refresh_timestamp_seconds{worker_id=\"cml-2\"}",
    ] {
        assert!(!text.contains(gone), "{gone} in:\n{text}");
    }
    api.stop().await;
}
