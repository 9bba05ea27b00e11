//! The simulated fleet: a `cml-sim` process (built beside this binary) with
//! one listener per worker, driven through its control API.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use labsync_application::domain::{LabId, WorkerId};
use serde::Deserialize;
use serde_json::json;
use tokio::process::{Child, Command};

pub const ADMIN_PASSWORD: &str = "cml-sim-admin";

#[derive(Debug, Clone, Deserialize)]
pub struct SimWorker {
    pub name: String,
    pub url: String,
}

impl SimWorker {
    /// Registers this simulated server with `app` as an enabled worker of
    /// its name, over plain http, with the simulator's admin account.
    pub async fn register(&self, app: &labsync::wiring::App) -> anyhow::Result<()> {
        use labsync_application::domain::{BaseUrl, TlsSettings, Worker};
        app.services
            .workers
            .add(
                &Worker {
                    id: WorkerId::parse(&self.name)?,
                    name: self.name.clone(),
                    base_url: BaseUrl::parse(&self.url).map_err(|e| anyhow::anyhow!(e))?,
                    username: "admin".into(),
                    tls: TlsSettings {
                        allow_http: true,
                        ..TlsSettings::default()
                    },
                    enabled: true,
                    lab_tiles: false,
                },
                &secrecy::SecretString::from(ADMIN_PASSWORD),
            )
            .await?;
        Ok(())
    }
}

pub struct SimFleet {
    pub workers: Vec<SimWorker>,
    http: reqwest::Client,
    child: Child,
    _dir: tempfile_dir::Dir,
}

mod tempfile_dir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `cml-sim` next to this executable (both are built into the same target
/// directory), or `$CML_SIM`.
fn sim_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CML_SIM") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let candidate = exe.with_file_name("cml-sim");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        bail!(
            "{} not found: build it with the benchmark (cargo build -p cml-sim -p labsync-bench)",
            candidate.display()
        )
    }
}

impl SimFleet {
    pub async fn start(workers: usize, labs: usize, seed: u64) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "labsync-bench-{}-{}",
            std::process::id(),
            seed + workers as u64
        ));
        std::fs::create_dir_all(&dir)?;
        let addresses = dir.join("workers.json");
        let child = Command::new(sim_binary()?)
            .args([
                "--workers",
                &workers.to_string(),
                "--labs-per-worker",
                &labs.to_string(),
            ])
            .args([
                "--seed",
                &seed.to_string(),
                "--transition-delay-ms",
                "0",
                "--name-prefix",
                "bench",
            ])
            .arg("--addresses-file")
            .arg(&addresses)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting cml-sim")?;
        let mut workers: Option<Vec<SimWorker>> = None;
        labsync_test_support::poll_until(
            Duration::from_millis(20),
            Duration::from_secs(60),
            || {
                workers = std::fs::read_to_string(&addresses)
                    .ok()
                    .and_then(|text| serde_json::from_str(&text).ok());
                std::future::ready(workers.is_some())
            },
        )
        .await
        .map_err(|_| anyhow::anyhow!("cml-sim did not start within 60 s"))?;
        let workers = workers.context("cml-sim's addresses")?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(4)
            .build()?;
        Ok(Self {
            workers,
            http,
            child,
            _dir: tempfile_dir::Dir(dir),
        })
    }

    async fn each<F, Fut>(&self, f: F) -> anyhow::Result<Vec<serde_json::Value>>
    where
        F: Fn(reqwest::Client, SimWorker) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<serde_json::Value>>,
    {
        futures::stream::iter(self.workers.iter().cloned())
            .map(|w| f(self.http.clone(), w))
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// Sends one control request to every worker.
    async fn control(
        &self,
        method: reqwest::Method,
        path: &'static str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<()> {
        self.each(|http, w| {
            let (method, body) = (method.clone(), body.clone());
            async move {
                let mut req = http.request(method, format!("{}{path}", w.url));
                if let Some(b) = body {
                    req = req.json(&b);
                }
                req.send().await?.error_for_status()?;
                Ok(json!(null))
            }
        })
        .await?;
        Ok(())
    }

    /// The simulator's process id (one process serves every worker).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn set_latency(&self, ms: u64) -> anyhow::Result<()> {
        let faults = json!({"latency_ms": {"all": ms}});
        self.control(reqwest::Method::PUT, "/_sim/faults", Some(faults))
            .await
    }

    pub async fn reset_stats(&self) -> anyhow::Result<()> {
        self.control(reqwest::Method::DELETE, "/_sim/stats", None)
            .await
    }

    /// Back to the seeded labs on every worker (faults and tokens cleared).
    pub async fn reset_all(&self) -> anyhow::Result<()> {
        self.control(reqwest::Method::POST, "/_sim/reset", None)
            .await
    }

    pub async fn total_requests(&self) -> anyhow::Result<u64> {
        let stats = self
            .each(|http, w| async move {
                Ok(http
                    .get(format!("{}/_sim/stats", w.url))
                    .send()
                    .await?
                    .json()
                    .await?)
            })
            .await?;
        Ok(stats.iter().filter_map(|s| s["total"].as_u64()).sum())
    }

    /// Changes `changed` of the labs, deletes `deleted` and adds `added`
    /// (shares of each worker's labs) behind labsync's back.
    pub async fn churn(
        &self,
        changed: f64,
        deleted: f64,
        added: f64,
        seed: u64,
    ) -> anyhow::Result<String> {
        let counts = self
            .each(|http, w| async move {
                let labs: Vec<serde_json::Value> = http
                    .get(format!("{}/_sim/labs", w.url))
                    .send()
                    .await?
                    .json()
                    .await?;
                let n = labs.len() as f64;
                let (c, d, a) = (
                    (n * changed).round() as usize,
                    (n * deleted).round() as usize,
                    (n * added).round() as usize,
                );
                // Deterministic picks: every k-th lab from an offset.
                let ids: Vec<String> = labs
                    .iter()
                    .filter_map(|l| l["id"].as_str().map(str::to_owned))
                    .collect();
                for (i, id) in ids
                    .iter()
                    .enumerate()
                    .skip(seed as usize % 3)
                    .step_by(ids.len().max(1) / c.max(1))
                    .take(c)
                {
                    http.patch(format!("{}/_sim/labs/{id}", w.url))
                        .json(&json!({"lab_title": format!("Changed {i}")}))
                        .send()
                        .await?
                        .error_for_status()?;
                }
                for id in ids.iter().rev().take(d) {
                    http.delete(format!("{}/_sim/labs/{id}", w.url))
                        .send()
                        .await?
                        .error_for_status()?;
                }
                for _ in 0..a {
                    http.post(format!("{}/_sim/labs", w.url))
                        .json(&json!({"state": "STOPPED"}))
                        .send()
                        .await?
                        .error_for_status()?;
                }
                Ok(json!([c, d, a]))
            })
            .await?;
        let sum = |i: usize| counts.iter().filter_map(|c| c[i].as_u64()).sum::<u64>();
        Ok(format!(
            "{} changed, {} deleted, {} added",
            sum(0),
            sum(1),
            sum(2)
        ))
    }

    /// Adds `n` stopped-and-wiped labs spread over the workers, listed
    /// round robin.
    pub async fn add_wiped_labs(&self, n: usize) -> anyhow::Result<Vec<(WorkerId, LabId)>> {
        let per = n.div_ceil(self.workers.len().max(1));
        let lists = self
            .each(|http, w| async move {
                let mut ids = Vec::new();
                for _ in 0..per {
                    let lab: serde_json::Value = http
                        .post(format!("{}/_sim/labs", w.url))
                        .json(&json!({"state": "DEFINED_ON_CORE"}))
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    ids.push(json!([w.name, lab["id"]]));
                }
                Ok(json!(ids))
            })
            .await?;
        // Round robin over the workers, so that deletes in this order reach
        // every worker at once rather than one worker after another.
        let mut out = Vec::with_capacity(n);
        for i in 0..per {
            for list in &lists {
                if let Some(pair) = list.as_array().and_then(|l| l.get(i)) {
                    out.push((
                        WorkerId::parse(pair[0].as_str().unwrap_or_default())?,
                        LabId::parse(pair[1].as_str().unwrap_or_default())?,
                    ));
                }
            }
        }
        out.truncate(n);
        Ok(out)
    }
}
