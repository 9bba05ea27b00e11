//! Test harness: the real application wired to a fresh database on the
//! shared MongoDB-wire test server and to an in-process CML simulator that
//! it reaches over HTTP.

use labsync_application::domain::Actor;
use labsync_application::domain::BaseUrl;
use std::collections::BTreeMap;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{Document, doc};

use cml_sim::{Faults, LabSpec, SimConfig, Simulator, WorkerHandle, WorkerSpec};
use labsync::wiring::App;
use labsync_application::domain::{LabId, LabRecord, TlsSettings, Worker, WorkerId};
use labsync_application::ports::AuditEntry;
use labsync_application::{
    AppError, DeleteLab, DeleteOutcome, RefreshOptions, RefreshWorkerLabs, RunReport, Services,
    Trigger,
};
use labsync_infrastructure::configuration::Settings;
pub use labsync_test_support::eventually;
use labsync_test_support::{shared_server, unique_database_name};
use secrecy::SecretString;

/// base64 of 32 bytes of 0x07: a test-only key.
pub const TEST_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
pub const ADMIN_PASSWORD: &str = "cml-sim-admin";

pub struct TestApp {
    pub app: App,
    pub sim: Simulator,
    pub settings: Settings,
    pub overrides: Vec<(String, String)>,
}

/// API tokens of each role, for tests only.
pub const VIEWER_TOKEN: &str = "test-viewer-token";
pub const OPERATOR_TOKEN: &str = "test-operator-token";
pub const ADMIN_TOKEN: &str = "test-admin-token";

pub fn tokens_setting() -> String {
    [
        ("viewer", VIEWER_TOKEN),
        ("operator", OPERATOR_TOKEN),
        ("admin", ADMIN_TOKEN),
    ]
    .iter()
    .map(|(role, t)| format!("{role}:{role}:{}", labsync::http::auth::hash_token(t)))
    .collect::<Vec<_>>()
    .join(",")
}

/// Labs in the simulator's default seed for one worker.
pub const SEEDED_LABS: usize = 24;

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(SimConfig::default().workers.len(), &[]).await
    }

    /// `workers` simulated workers of 24 seeded labs each, registered as
    /// cml-1, cml-2, ...; `extra` configuration overrides.
    pub async fn spawn_with(workers: usize, extra: &[(&str, &str)]) -> Self {
        let sim = Simulator::start(SimConfig {
            workers: (1..=workers)
                .map(|n| WorkerSpec::seeded(&format!("cml-{n}"), SEEDED_LABS))
                .collect(),
            transition_delay: Duration::from_millis(50),
            ..SimConfig::default()
        })
        .await
        .expect("simulator starts");
        let mut overrides: Vec<(String, String)> = vec![
            (
                "LABSYNC__MONGODB__URI".into(),
                shared_server().uri().to_owned(),
            ),
            ("LABSYNC__MONGODB__DATABASE".into(), unique_database_name()),
            ("LABSYNC__SECURITY__ENCRYPTION_KEY".into(), TEST_KEY.into()),
            ("LABSYNC__DELETE__CONVERGE_POLL_MS".into(), "20".into()),
            ("LABSYNC__DELETE__CONVERGE_TIMEOUT_SECS".into(), "10".into()),
            ("LABSYNC__CML__REQUEST_TIMEOUT_MS".into(), "5000".into()),
            ("LABSYNC__API__LISTEN".into(), "127.0.0.1:0".into()),
            ("LABSYNC__API__TOKENS".into(), tokens_setting()),
            ("LABSYNC__DELETE__ASYNC_RETRY_BASE_MS".into(), "50".into()),
            ("LABSYNC__DELETE__ASYNC_POLL_MS".into(), "20".into()),
            ("LABSYNC__EVENTS__POLL_INTERVAL_MS".into(), "20".into()),
            ("LABSYNC__EVENTS__MAX_BACKOFF_SECS".into(), "1".into()),
        ];
        for (k, v) in extra {
            overrides.retain(|(key, _)| key != k);
            overrides.push(((*k).to_owned(), (*v).to_owned()));
        }
        let pairs: Vec<(&str, &str)> = overrides
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let settings = Settings::from_overrides(&pairs).expect("test settings");
        let app = App::build(&settings).await.expect("app builds");
        for w in sim.workers() {
            app.services
                .workers
                .add(
                    &Worker {
                        id: WorkerId::parse(&w.name).unwrap(),
                        name: w.name.clone(),
                        base_url: BaseUrl::parse(&w.base_url()).expect("the simulator's URL"),
                        username: "admin".into(),
                        tls: TlsSettings {
                            allow_http: true,
                            ..TlsSettings::default()
                        },
                        enabled: true,
                        lab_tiles: false,
                    },
                    &SecretString::from(ADMIN_PASSWORD),
                )
                .await
                .expect("register worker");
        }
        Self {
            app,
            sim,
            settings,
            overrides,
        }
    }

    pub fn services(&self) -> &Services {
        &self.app.services
    }

    pub fn worker_id(&self) -> WorkerId {
        WorkerId::parse("cml-1").unwrap()
    }

    pub fn sim(&self) -> &WorkerHandle {
        &self.sim.workers()[0]
    }

    pub fn faults(&self, v: serde_json::Value) {
        let f: Faults = serde_json::from_value(v).expect("valid faults");
        self.sim().set_faults(f);
    }

    pub async fn refresh_with(&self, options: RefreshOptions) -> RunReport {
        RefreshWorkerLabs::new(self.services().clone())
            .execute(&self.worker_id(), &Actor::api("admin"), options)
            .await
            .expect("refresh runs")
    }

    pub async fn refresh(&self) -> RunReport {
        self.refresh_with(RefreshOptions::default()).await
    }

    pub async fn records(&self) -> Vec<LabRecord> {
        self.services()
            .labs
            .list(&self.worker_id())
            .await
            .expect("list records")
    }

    pub async fn record(&self, lab: &LabId) -> Option<LabRecord> {
        self.services()
            .labs
            .get(&self.worker_id(), lab)
            .await
            .expect("get record")
    }

    pub async fn delete(&self, lab: &LabId, force: bool) -> Result<DeleteOutcome, AppError> {
        DeleteLab {
            worker_id: self.worker_id(),
            lab_id: *lab,
            force,
            requested_by: Actor::api("operator"),
            owned_by: None,
        }
        .execute(self.services())
        .await
    }

    pub async fn audit(&self, lab: &LabId) -> Vec<AuditEntry> {
        self.services()
            .audit
            .recent(&self.worker_id(), Some(lab), 50)
            .await
            .expect("audit")
    }

    /// A new lab in CML, behind labsync's back.
    pub fn add_lab(&self, state: &str) -> LabId {
        let lab = self
            .sim()
            .add_lab(LabSpec {
                state: Some(state.into()),
                lab_title: Some(format!("{state} lab")),
                ..LabSpec::default()
            })
            .expect("add lab");
        LabId::parse(&lab.id).unwrap()
    }

    /// The ids CML has, sorted: the truth.
    pub fn truth(&self) -> Vec<LabId> {
        let mut ids: Vec<LabId> = self
            .sim()
            .labs()
            .iter()
            .map(|l| LabId::parse(&l.id).unwrap())
            .collect();
        ids.sort();
        ids
    }

    /// Compares every worker's records, read from the raw collection (not
    /// through the repository under test), with what CML holds, field by
    /// field: the same labs, each with every field labsync stores.
    pub async fn compare_with_truth(&self) -> Diff {
        let mut diff = Diff::default();
        for w in self.sim.workers() {
            let raw: Vec<Document> = self
                .app
                .db
                .collection::<Document>("labs")
                .find(doc! {"worker_id": &w.name, "tombstone": {"$exists": false}})
                .await
                .expect("read the labs collection")
                .try_collect()
                .await
                .expect("read the labs collection");
            let stored: BTreeMap<String, Fields> = raw
                .iter()
                .map(|d| {
                    (
                        d.get_str("lab_id").unwrap_or_default().to_owned(),
                        fields_in_mongodb(d),
                    )
                })
                .collect();
            let truth: BTreeMap<String, Fields> = w
                .labs()
                .iter()
                .map(|l| (l.id.clone(), fields_in_cml(l)))
                .collect();
            for (id, fields) in &truth {
                match stored.get(id) {
                    None => diff.problem(
                        Kind::Lost,
                        format!("{}: {id} is in CML, not in MongoDB", w.name),
                    ),
                    Some(seen) if seen != fields => {
                        let differs: Vec<String> = fields
                            .iter()
                            .filter(|(k, v)| seen.get(*k) != Some(v))
                            .map(|(k, v)| format!("{k}: {:?} != CML {v:?}", seen.get(*k)))
                            .collect();
                        diff.problem(
                            Kind::Stale,
                            format!("{}: {id}: {}", w.name, differs.join("; ")),
                        );
                    }
                    Some(_) => {}
                }
            }
            for id in stored.keys().filter(|id| !truth.contains_key(*id)) {
                diff.problem(
                    Kind::Resurrected,
                    format!("{}: {id} is in MongoDB, not in CML", w.name),
                );
            }
            diff.checked += stored.len();
        }
        diff
    }

    /// [`TestApp::compare_with_truth`], panicking naming every difference.
    pub async fn assert_matches_truth(&self, context: &str) -> Diff {
        let diff = self.compare_with_truth().await;
        assert!(
            diff.problems.is_empty(),
            "{context}: MongoDB differs from CML ({diff}):\n{}",
            diff.problems.join("\n")
        );
        diff
    }

    /// A refresh of cml-1 running in the background.
    pub fn spawn_refresh(&self) -> tokio::task::JoinHandle<RunReport> {
        let services = self.services().clone();
        let worker = self.worker_id();
        tokio::spawn(async move {
            RefreshWorkerLabs::new(services)
                .execute(&worker, &Actor::Schedule, RefreshOptions::default())
                .await
                .expect("refresh runs")
        })
    }

    /// How many requests cml-1 has served on `endpoint`.
    pub fn cml_requests(&self, endpoint: cml_sim::Endpoint) -> u64 {
        self.sim()
            .stats()
            .requests
            .get(&endpoint)
            .copied()
            .unwrap_or(0)
    }

    pub fn env(&self) -> Vec<(String, String)> {
        self.overrides.clone()
    }

    /// Every scheduled run's report, oldest first.
    pub async fn scheduled_runs(&self) -> Vec<RunReport> {
        let mut runs: Vec<RunReport> = self
            .services()
            .reports
            .recent(&labsync_application::ports::RunQuery::newest(None, 1000))
            .await
            .expect("run reports")
            .into_iter()
            .filter(|r| r.trigger == Trigger::Schedule)
            .collect();
        runs.sort_by_key(|r| r.started_at);
        runs
    }

    /// Runs the `labsync` binary to completion without blocking the
    /// runtime (the simulator serves on this test's runtime).
    pub async fn cli(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_labsync"))
            .args(args)
            .envs(self.env())
            .env("CML_PASSWORD", ADMIN_PASSWORD)
            .env("RUST_LOG", "warn")
            .output()
            .await
            .expect("labsync runs")
    }
}

/// Every field labsync stores of a lab, as text.
pub type Fields = BTreeMap<&'static str, String>;

fn millis_of_text(t: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(t).map_or_else(
        |_| format!("unparsable {t:?}"),
        |t| t.timestamp_millis().to_string(),
    )
}

/// A lab's stored fields as CML holds them.
pub fn fields_in_cml(l: &cml_sim::Lab) -> Fields {
    let mut groups: Vec<String> = l
        .groups
        .iter()
        .map(|g| {
            format!(
                "{}:{}:{}",
                g.id,
                g.permission,
                g.name.as_deref().unwrap_or("")
            )
        })
        .collect();
    groups.sort();
    groups.dedup();
    BTreeMap::from([
        ("title", l.lab_title.clone()),
        ("description", l.lab_description.clone()),
        ("notes", l.lab_notes.clone()),
        ("owner_id", l.owner.clone()),
        ("owner_username", l.owner_username.clone()),
        ("owner_fullname", l.owner_fullname.clone()),
        ("state", l.state.clone()),
        ("node_count", l.node_count.to_string()),
        ("link_count", l.link_count.to_string()),
        ("groups", groups.join(",")),
        ("created", millis_of_text(&l.created)),
        ("modified", millis_of_text(&l.modified)),
    ])
}

/// A lab's stored fields as the raw MongoDB document holds them.
pub fn fields_in_mongodb(d: &Document) -> Fields {
    let text = |k: &str| d.get_str(k).unwrap_or("(absent)").to_owned();
    let number = |k: &str| {
        d.get_i64(k)
            .map(|n| n.to_string())
            .or_else(|_| d.get_i32(k).map(|n| n.to_string()))
            .unwrap_or_else(|_| "(absent)".to_owned())
    };
    let date = |k: &str| {
        d.get_datetime(k).map_or_else(
            |_| "(absent)".to_owned(),
            |t| t.timestamp_millis().to_string(),
        )
    };
    let mut groups: Vec<String> = d
        .get_array("groups")
        .map(|a| {
            a.iter()
                .filter_map(|g| g.as_document())
                .map(|g| {
                    format!(
                        "{}:{}:{}",
                        g.get_str("id").unwrap_or_default(),
                        g.get_str("permission").unwrap_or_default(),
                        g.get_str("name").unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    groups.sort();
    BTreeMap::from([
        ("title", text("title")),
        ("description", text("description")),
        ("notes", text("notes")),
        ("owner_id", text("owner_id")),
        ("owner_username", text("owner_username")),
        ("owner_fullname", text("owner_fullname")),
        ("state", text("state")),
        ("node_count", number("node_count")),
        ("link_count", number("link_count")),
        ("groups", groups.join(",")),
        ("created", date("created")),
        ("modified", date("modified")),
    ])
}

/// How MongoDB differs from CML, counted.
#[derive(Debug, Default)]
pub struct Diff {
    pub checked: usize,
    pub lost: usize,
    pub resurrected: usize,
    pub stale: usize,
    problems: Vec<String>,
}

enum Kind {
    Lost,
    Resurrected,
    Stale,
}

impl Diff {
    fn problem(&mut self, kind: Kind, text: String) {
        match kind {
            Kind::Lost => self.lost += 1,
            Kind::Resurrected => self.resurrected += 1,
            Kind::Stale => self.stale += 1,
        }
        self.problems.push(format!(
            "{}: {text}",
            match kind {
                Kind::Lost => "lost",
                Kind::Resurrected => "resurrected",
                Kind::Stale => "stale",
            }
        ));
    }
}

impl std::ops::AddAssign for Diff {
    fn add_assign(&mut self, other: Self) {
        self.checked += other.checked;
        self.lost += other.lost;
        self.resurrected += other.resurrected;
        self.stale += other.stale;
        self.problems.extend(other.problems);
    }
}

impl std::fmt::Display for Diff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records compared field by field with CML: {} lost, {} resurrected, {} stale",
            self.checked, self.lost, self.resurrected, self.stale
        )
    }
}

/// A process's stdout and stderr, as text.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A seeded test's seed: the environment variable `var` when set (to replay
/// a sequence), else `default`.
pub fn seed(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Prints a reliability test's figures and keeps them in
/// `target/tmp/reliability/NAME.txt`, where `scripts/test.sh` shows them
/// after the run and docs/RELIABILITY.md takes them from.
pub fn report(name: &str, text: &str) {
    println!("{text}");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("reliability");
    std::fs::create_dir_all(&dir).expect("report directory");
    let text = format!("{}\n", text.trim_end());
    std::fs::write(dir.join(format!("{name}.txt")), text).expect("report written");
}

pub fn ids(records: &[LabRecord]) -> Vec<LabId> {
    records.iter().map(|r| r.lab_id).collect()
}

/// A port nothing listens on now (the OS's choice, released at once): for
/// a process that must be told its port, or an address that refuses.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The HTTP API of a [`TestApp`], served in-process on a free port.
pub struct TestApi {
    pub base: String,
    pub http: reqwest::Client,
    running: Option<labsync::service::Running>,
}

impl TestApi {
    pub async fn start(t: &TestApp) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(t, listener).await
    }

    /// Serves on a listener bound before the app was configured (when its
    /// settings must name its own address).
    pub async fn start_on(t: &TestApp, listener: tokio::net::TcpListener) -> Self {
        let running = labsync::service::start_with(t.settings.clone(), t.app.clone(), listener)
            .await
            .expect("service starts");
        Self {
            base: format!("http://{}", running.addr),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            running: Some(running),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with the token, if any.
    pub fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let r = self.http.request(method, self.url(path));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Sends and returns the status and the JSON body (or the text as a string).
    pub async fn send(
        &self,
        r: reqwest::RequestBuilder,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let resp = r.send().await.expect("request sent");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    /// Deletes a lab of cml-1 as an operator; CML must confirm it (200).
    pub async fn delete_lab(&self, lab: &LabId) {
        let path = format!("/api/v1/workers/cml-1/labs/{lab}");
        let (s, out) = self
            .send(self.req(reqwest::Method::DELETE, &path, Some(OPERATOR_TOKEN)))
            .await;
        assert_eq!(s, reqwest::StatusCode::OK, "{out}");
    }

    pub async fn get(&self, path: &str, token: &str) -> (reqwest::StatusCode, serde_json::Value) {
        self.send(self.req(reqwest::Method::GET, path, Some(token)))
            .await
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("service stops cleanly");
        }
    }
}
