//! The console's figures: how fast the labs page answers over a large
//! inventory, and how long an event takes to reach many open streams.
//!
//! The inventory is written straight into the store (records of workers
//! that are never contacted), plus one simulated worker whose labs the
//! fan-out deletes. labsync serves on a loopback port in this process, as
//! `labsync serve` does; times are taken at the client, so they are an
//! upper bound of the server's time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use labsync::wiring::App;
use labsync_application::DeleteLab;
use labsync_application::domain::{
    Actor, BaseUrl, LabId, LabRecord, LabSnapshot, LabState, TlsSettings, Worker, WorkerId,
};
use labsync_application::ports::RecordChanges;
use labsync_infrastructure::configuration::Settings;
use secrecy::SecretString;
use tokio::sync::mpsc;

use crate::fleet::SimFleet;
use crate::{Row, percentile};

const VIEWER: &str = "bench-viewer-token";
const LABS_PER_WORKER: usize = 200;
const OWNERS: [&str; 20] = [
    "admin", "ana", "bo", "chen", "dee", "eli", "fay", "gus", "hal", "ivy", "jon", "kai", "lee",
    "max", "ned", "oli", "pam", "quinn", "ray", "sam",
];
const STATES: [LabState; 3] = [
    LabState::DefinedOnCore,
    LabState::Stopped,
    LabState::Started,
];
const WORDS: [&str; 12] = [
    "ccna", "ospf", "bgp", "mpls", "campus", "wan", "lab", "demo", "test", "core", "edge", "dmz",
];

/// How big, and how often.
pub struct Sizes {
    pub labs: usize,
    pub streams: usize,
    pub requests: usize,
    pub deletes: usize,
}

fn snapshot(n: usize) -> LabSnapshot {
    let word = |k: usize| WORDS[(n / k) % WORDS.len()];
    LabSnapshot {
        title: format!("{} {} {} {n}", word(1), word(7), word(13)),
        description: "a lab for the console benchmark".into(),
        notes: String::new(),
        owner_id: None,
        owner_username: Some(OWNERS[n % OWNERS.len()].into()),
        owner_fullname: None,
        state: STATES[(n / 3) % STATES.len()].clone(),
        node_count: (n % 17) as u64,
        link_count: (n % 11) as u64,
        groups: vec![],
        created: None,
        modified: Some(Utc::now() - chrono::Duration::minutes((n * 7 % 100_000) as i64)),
    }
}

/// `labs` records over workers that are never contacted.
async fn fill(app: &App, labs: usize) -> anyhow::Result<()> {
    let workers = labs.div_ceil(LABS_PER_WORKER);
    for w in 0..workers {
        let id = WorkerId::parse(&format!("stored-{w:04}"))?;
        app.services
            .workers
            .add(
                &Worker {
                    id: id.clone(),
                    name: id.to_string(),
                    base_url: BaseUrl::parse("http://127.0.0.1:9")
                        .map_err(|e| anyhow::anyhow!(e))?,
                    username: "admin".into(),
                    tls: TlsSettings {
                        allow_http: true,
                        ..TlsSettings::default()
                    },
                    // Never refreshed: the schedule leaves it alone.
                    enabled: false,
                    lab_tiles: false,
                },
                &SecretString::from("unused"),
            )
            .await?;
        let now = Utc::now();
        let create = (0..LABS_PER_WORKER.min(labs - w * LABS_PER_WORKER))
            .map(|i| {
                let n = w * LABS_PER_WORKER + i;
                let lab = LabId::parse(&uuid::Uuid::new_v4().to_string())?;
                Ok(LabRecord::discovered(id.clone(), lab, snapshot(n), now))
            })
            .collect::<anyhow::Result<Vec<LabRecord>>>()?;
        app.services
            .labs
            .apply(
                &id,
                RecordChanges {
                    fence: 1,
                    create,
                    ..RecordChanges::default()
                },
                1,
            )
            .await?;
    }
    Ok(())
}

/// Signs in as the viewer and returns the session cookie.
async fn sign_in(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let r = http
        .post(format!("{base}/login"))
        .form(&[("token", VIEWER)])
        .send()
        .await?;
    let cookie = r
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .context("sign-in sets a cookie")?
        .to_str()?;
    Ok(cookie.split(';').next().context("a cookie")?.to_owned())
}

/// p50 and p99 of `n` GETs of `path`, one at a time, in milliseconds.
async fn page_times(
    http: &reqwest::Client,
    base: &str,
    cookie: &str,
    path: &str,
    n: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let get = || async {
        let t = Instant::now();
        let r = http
            .get(format!("{base}{path}"))
            .header(reqwest::header::COOKIE, cookie)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "{path}: {}", r.status());
        let body = r.text().await?;
        anyhow::ensure!(
            body.contains("table class=\"labs\""),
            "{path}: not the labs page"
        );
        Ok::<f64, anyhow::Error>(t.elapsed().as_secs_f64() * 1000.0)
    };
    for _ in 0..5 {
        get().await?;
    }
    let started = Instant::now();
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        times.push(get().await?);
    }
    times.sort_by(f64::total_cmp);
    Ok((
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        started.elapsed().as_secs_f64(),
    ))
}

/// A cursor from the middle of the title order: a deep page.
async fn deep_cursor(app: &App, labs: usize) -> anyhow::Result<String> {
    use labsync_application::ports::{FleetLabQuery, LabQuery, LabSort};
    let mut after = None;
    // Jump by whole pages of the largest size to the middle.
    for _ in 0..(labs / 2 / 1000).max(1) {
        let page = app
            .inventory
            .fleet_labs(FleetLabQuery {
                worker: None,
                filter: LabQuery {
                    limit: 1000,
                    ..LabQuery::default()
                },
                sort: LabSort::Title,
                after,
            })
            .await?;
        after = page.next_cursor;
    }
    let cursor = after.context("a cursor in the middle")?.to_param();
    let escaped: String = cursor
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    Ok(format!("/labs?sort=title&after={escaped}"))
}

/// One open event stream: sends (stream, lab id, arrival) for each
/// `deleted` event.
async fn stream(
    http: reqwest::Client,
    url: String,
    index: usize,
    opened: mpsc::Sender<usize>,
    arrivals: mpsc::UnboundedSender<(usize, String, Instant)>,
) -> anyhow::Result<()> {
    let mut r = http.get(url).bearer_auth(VIEWER).send().await?;
    anyhow::ensure!(r.status().is_success(), "stream {index}: {}", r.status());
    opened.send(index).await.ok();
    let mut buffer = String::new();
    while let Some(chunk) = r.chunk().await? {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if !event.contains("event: deleted") {
                continue;
            }
            let at = Instant::now();
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: "))
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(data)
                && let Some(lab) = v["lab_id"].as_str()
            {
                arrivals.send((index, lab.to_owned(), at)).ok();
            }
        }
    }
    Ok(())
}

/// The labs page at `sizes.labs` labs, and the fan-out to `sizes.streams`.
pub async fn run(mongo_uri: &str, sizes: &Sizes) -> anyhow::Result<Vec<Row>> {
    let db_name = labsync_test_support::unique_database_name();
    let tokens = format!("viewer:viewer:{}", labsync::http::auth::hash_token(VIEWER));
    let streams_max = (sizes.streams + 16).to_string();
    let connections = (sizes.streams + 128).to_string();
    let settings = Settings::from_overrides(&[
        ("LABSYNC__MONGODB__URI", mongo_uri),
        ("LABSYNC__MONGODB__DATABASE", &db_name),
        (
            "LABSYNC__SECURITY__ENCRYPTION_KEY",
            "YmVuY2htYXJrLW9ubHkta2V5LWJlbmNobWFyay1vbmw=",
        ),
        ("LABSYNC__API__TOKENS", &tokens),
        ("LABSYNC__API__MAX_EVENT_STREAMS", &streams_max),
        ("LABSYNC__API__MAX_CONNECTIONS", &connections),
        ("LABSYNC__LOG__FILTER", "error"),
    ])?;
    let app = App::build(&settings).await?;
    let filled = Instant::now();
    fill(&app, sizes.labs).await?;
    eprintln!(
        "bench: {} lab records written in {:.1} s",
        sizes.labs,
        filled.elapsed().as_secs_f64()
    );

    // One simulated worker whose wiped labs the fan-out deletes.
    let sim = SimFleet::start(1, 0, 5).await?;
    let w = &sim.workers[0];
    w.register(&app).await?;
    let targets = sim.add_wiped_labs(sizes.deletes).await?;
    labsync_application::RefreshWorkerLabs::new(app.services.clone())
        .execute(
            &WorkerId::parse(&w.name)?,
            &Actor::cli("bench"),
            labsync_application::RefreshOptions::default(),
        )
        .await?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = labsync::service::start_with(settings, app.clone(), listener).await?;
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let cookie = sign_in(&http, &base).await?;

    let mut rows = Vec::new();
    let deep = deep_cursor(&app, sizes.labs).await?;
    let mut page_p99 = 0.0_f64;
    for (name, path) in [
        ("labs page: first", "/labs".to_owned()),
        (
            "labs page: filtered",
            "/labs?state=STARTED&q=ospf".to_owned(),
        ),
        ("labs page: by title", "/labs?sort=title".to_owned()),
        ("labs page: newest", "/labs?sort=modified".to_owned()),
        ("labs page: deep", deep),
    ] {
        let (p50, p99, wall) = page_times(&http, &base, &cookie, &path, sizes.requests).await?;
        page_p99 = page_p99.max(p99);
        rows.push(Row {
            scenario: name.to_owned(),
            labs: sizes.labs,
            workers: sizes.labs.div_ceil(LABS_PER_WORKER) + 1,
            latency_ms: 0,
            wall_s: wall,
            notes: format!(
                "{} requests, one at a time: p50 {p50:.1} ms, p99 {p99:.1} ms (target < 50 ms); {path}",
                sizes.requests
            ),
            ..Row::default()
        });
    }

    // The fan-out: every stream open, then deletes one at a time.
    let (opened_tx, mut opened) = mpsc::channel(sizes.streams);
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let stream_http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let mut tasks = Vec::with_capacity(sizes.streams);
    for i in 0..sizes.streams {
        tasks.push(tokio::spawn(stream(
            stream_http.clone(),
            format!("{base}/api/v1/events/stream"),
            i,
            opened_tx.clone(),
            arrivals_tx.clone(),
        )));
    }
    for _ in 0..sizes.streams {
        tokio::time::timeout(Duration::from_secs(30), opened.recv())
            .await
            .context("every stream opens")?;
    }
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(sizes.streams * targets.len());
    let mut slowest = Vec::with_capacity(targets.len());
    for (worker, lab) in targets {
        let out = DeleteLab {
            worker_id: worker,
            lab_id: lab,
            force: false,
            requested_by: Actor::cli("bench"),
            owned_by: None,
        }
        .execute(&app.services)
        .await?;
        anyhow::ensure!(out.lab_gone, "delete failed: {out:?}");
        // The delete has committed when it answers.
        let committed = Instant::now();
        let mut reached: HashMap<usize, f64> = HashMap::new();
        while reached.len() < sizes.streams {
            let (index, id, at) = tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
                .await
                .context("every stream gets the delete's event")?
                .context("streams ended")?;
            if id == lab.as_str() {
                let ms = at.saturating_duration_since(committed).as_secs_f64() * 1000.0;
                reached.insert(index, ms);
            }
        }
        let mut these: Vec<f64> = reached.into_values().collect();
        these.sort_by(f64::total_cmp);
        slowest.push(these.last().copied().unwrap_or_default());
        latencies.extend(these);
    }
    for t in tasks {
        t.abort();
    }
    latencies.sort_by(f64::total_cmp);
    slowest.sort_by(f64::total_cmp);
    rows.push(Row {
        scenario: "event fan-out".into(),
        labs: sizes.labs,
        workers: 1,
        latency_ms: 0,
        wall_s: started.elapsed().as_secs_f64(),
        notes: format!(
            "{} streams x {} deletes: commit to arrival p50 {:.0} ms, p99 {:.0} ms; to the last stream p99 {:.0} ms (target p99 < 1 s)",
            sizes.streams,
            slowest.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            percentile(&slowest, 0.99),
        ),
        ..Row::default()
    });
    running.stop().await?;
    eprintln!("bench: labs page p99 at most {page_p99:.1} ms");
    Ok(rows)
}
