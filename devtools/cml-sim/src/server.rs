//! Starting and stopping simulated workers, and the per-worker state they
//! share with the control API and with in-process tests.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::serve::Listener;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use regex::Regex;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::auth::TokenIssuer;
use crate::faults::{Endpoint, Faults};
use crate::model::{Inventory, Lab, LabSpec, STATES, SimUser, timestamp};
use crate::tls::{Certificates, TlsListener};
use crate::{UUID4_PATTERN, api, control, faults, seed};

/// How to run the simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub host: IpAddr,
    pub workers: Vec<WorkerSpec>,
    /// Seeds users, lab ids and contents; the same seed gives the same data.
    pub seed: u64,
    pub token_ttl: Duration,
    /// How long start, stop and wipe take before the lab converges.
    pub transition_delay: Duration,
    /// What `GET /system_information` reports.
    pub version: String,
    pub admin_password: String,
    pub user_password: String,
    /// Serve HTTPS (API and control API alike) with a certificate signed by
    /// a CA generated at start; see [`Simulator::ca_cert_pem`].
    pub tls: bool,
}

/// One simulated CML server.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub name: String,
    /// 0 picks a free port.
    pub port: u16,
    /// How many seeded labs it starts with.
    pub labs: usize,
    /// Labs to serve instead of seeded ones (e.g. recorded from a real server).
    pub recorded_labs: Option<Vec<Lab>>,
}

impl WorkerSpec {
    pub fn seeded(name: &str, labs: usize) -> Self {
        Self {
            name: name.to_owned(),
            port: 0,
            labs,
            recorded_labs: None,
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            workers: vec![WorkerSpec::seeded("cml-1", 24)],
            seed: 42,
            token_ttl: Duration::from_secs(86_400),
            transition_delay: Duration::from_millis(200),
            version: "2.9.1+build.7".to_owned(),
            admin_password: "cml-sim-admin".to_owned(),
            user_password: "cml-sim-student".to_owned(),
            tls: false,
        }
    }
}

/// Request counters, for tests and benchmarks that count round trips.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub total: u64,
    pub requests: BTreeMap<Endpoint, u64>,
    pub statuses: BTreeMap<String, u64>,
    pub logins: u64,
    /// Requests carried out whose answer an `after_the_fact` fault lost.
    pub lost_answers: BTreeMap<Endpoint, u64>,
    /// Labs deleted through the API (`DELETE /labs/{id}` that removed one).
    pub deleted: u64,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub users: Vec<SimUser>,
    pub initial_users: Vec<SimUser>,
    pub inventory: Inventory,
    pub initial: Vec<Lab>,
    pub tokens: TokenIssuer,
    pub faults: Faults,
    pub stats: Stats,
    pub rng: ChaCha8Rng,
}

/// The state of one simulated worker.
#[derive(Debug)]
pub struct WorkerState {
    pub name: String,
    pub version: String,
    pub transition_delay: Duration,
    pub(crate) lab_id: Regex,
    inner: Mutex<Inner>,
}

impl WorkerState {
    /// Locks the worker's state, settling due lab transitions first. A
    /// poisoned lock is taken over: the state stays consistent because every
    /// mutation is a single assignment.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.inventory.settle_all(Instant::now());
        g
    }

    pub(crate) fn record(&self, endpoint: Endpoint, status: u16) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *g.stats
            .statuses
            .entry(format!("{}xx", status / 100))
            .or_default() += 1;
        if endpoint == Endpoint::Authenticate && status == 200 {
            g.stats.logins += 1;
        }
    }

    pub(crate) fn count_after_the_fact(&self, endpoint: Endpoint) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *g.stats.lost_answers.entry(endpoint).or_default() += 1;
    }

    /// Makes a user an admin or takes it away, as a CML admin would in the
    /// user settings; tokens already issued stay valid, with the new rights.
    ///
    /// # Errors
    /// A message when there is no such user.
    pub fn set_admin(&self, username: &str, admin: bool) -> Result<(), String> {
        let mut g = self.lock();
        let user = g
            .users
            .iter_mut()
            .find(|u| u.username == username)
            .ok_or_else(|| format!("no such user {username:?}"))?;
        user.admin = admin;
        Ok(())
    }

    /// Adds a user who is not an admin (a person who owns labs), unless
    /// one of that name exists.
    pub fn add_user(&self, username: &str) {
        let mut g = self.lock();
        if g.users.iter().any(|u| u.username == username) {
            return;
        }
        g.users.push(crate::model::SimUser {
            id: uuid::Uuid::new_v4().to_string(),
            username: username.to_owned(),
            password: format!("{username}-cml"),
            fullname: String::new(),
            admin: false,
            groups: vec![],
        });
    }

    /// Counts a request and draws the random numbers its faults need.
    pub(crate) fn begin_request(&self, endpoint: Endpoint) -> (Faults, f64, f64) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.stats.total += 1;
        *g.stats.requests.entry(endpoint).or_default() += 1;
        let jitter: f64 = g.rng.random();
        let error: f64 = g.rng.random();
        (g.faults.clone(), jitter, error)
    }

    pub fn labs(&self) -> Vec<Lab> {
        self.lock().inventory.labs.values().cloned().collect()
    }

    pub fn lab(&self, id: &str) -> Option<Lab> {
        self.lock().inventory.labs.get(id).cloned()
    }

    pub fn users(&self) -> Vec<SimUser> {
        self.lock().users.clone()
    }

    /// Creates a lab behind the clients' back.
    ///
    /// # Errors
    /// A message when the spec is invalid or the id is taken.
    pub fn add_lab(&self, spec: LabSpec) -> Result<Lab, String> {
        let mut g = self.lock();
        let id = match spec.id.clone() {
            Some(id) => id,
            None => seed::uuid4(&mut g.rng),
        };
        if !self.lab_id.is_match(&id) {
            return Err(format!("lab id {id:?} is not a UUID4"));
        }
        if g.inventory.labs.contains_key(&id) {
            return Err(format!("lab {id} already exists"));
        }
        let owner = match &spec.owner_username {
            Some(name) => g.users.iter().find(|u| &u.username == name).cloned(),
            None => g.users.iter().find(|u| u.admin).cloned(),
        }
        .ok_or_else(|| format!("no such user {:?}", spec.owner_username))?;
        let now = timestamp(chrono::Utc::now());
        let mut lab = Lab {
            id: id.clone(),
            created: now.clone(),
            modified: now,
            lab_description: String::new(),
            lab_notes: String::new(),
            lab_title: format!("Lab {}", &id[..8]),
            owner: owner.id,
            owner_username: owner.username,
            owner_fullname: owner.fullname,
            state: "DEFINED_ON_CORE".into(),
            node_count: 0,
            link_count: 0,
            groups: vec![],
            pending: None,
        };
        apply(&mut lab, spec)?;
        g.inventory.labs.insert(id, lab.clone());
        Ok(lab)
    }

    /// Changes a lab behind the clients' back; bumps `modified`.
    ///
    /// # Errors
    /// A message when the lab does not exist or the spec is invalid.
    pub fn update_lab(&self, id: &str, spec: LabSpec) -> Result<Lab, String> {
        if spec.id.as_deref().is_some_and(|new| new != id) {
            return Err("a lab's id cannot change".into());
        }
        let mut g = self.lock();
        let users = g.users.clone();
        let lab = g
            .inventory
            .labs
            .get_mut(id)
            .ok_or_else(|| format!("no lab {id}"))?;
        if let Some(name) = &spec.owner_username {
            let owner = users
                .iter()
                .find(|u| &u.username == name)
                .ok_or_else(|| format!("no such user {name:?}"))?;
            lab.owner.clone_from(&owner.id);
            lab.owner_fullname.clone_from(&owner.fullname);
        }
        apply(lab, spec)?;
        lab.modified = timestamp(chrono::Utc::now());
        Ok(lab.clone())
    }

    /// Deletes a lab behind the clients' back; true if it existed.
    pub fn remove_lab(&self, id: &str) -> bool {
        self.lock().inventory.labs.remove(id).is_some()
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Invalidates every token issued so far, as a controller restart does.
    pub fn expire_tokens(&self) {
        self.lock().tokens.revoke_all();
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub fn reset_stats(&self) {
        self.lock().stats = Stats::default();
    }

    /// Back to the labs and users the worker started with, no faults, no
    /// tokens, no stats.
    pub fn reset(&self) {
        let mut g = self.lock();
        let initial = g.initial.clone();
        g.inventory.labs = initial.into_iter().map(|l| (l.id.clone(), l)).collect();
        let users = g.initial_users.clone();
        g.users = users;
        g.faults = Faults::default();
        g.stats = Stats::default();
        g.tokens.revoke_all();
    }
}

fn apply(lab: &mut Lab, spec: LabSpec) -> Result<(), String> {
    if let Some(state) = spec.state {
        if !STATES.contains(&state.as_str()) {
            return Err(format!("state must be one of {STATES:?}"));
        }
        lab.state = state;
        lab.pending = None;
    }
    if let Some(v) = spec.lab_title {
        if v.is_empty() || v.chars().count() > 64 {
            return Err("lab_title must be 1 to 64 characters".into());
        }
        lab.lab_title = v;
    }
    if let Some(v) = spec.lab_description {
        lab.lab_description = v;
    }
    if let Some(v) = spec.lab_notes {
        lab.lab_notes = v;
    }
    if let Some(v) = spec.owner_username {
        lab.owner_username = v;
    }
    if let Some(v) = spec.node_count {
        lab.node_count = v;
    }
    if let Some(v) = spec.link_count {
        lab.link_count = v;
    }
    if let Some(v) = spec.groups {
        lab.groups = v;
    }
    Ok(())
}

/// A running worker: where it listens and its state.
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    pub name: String,
    pub addr: SocketAddr,
    /// Whether it serves HTTPS.
    pub https: bool,
    pub state: Arc<WorkerState>,
}

impl WorkerHandle {
    /// `http://host:port` or `https://host:port`, without the `/api/v0`
    /// suffix.
    pub fn base_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }
}

impl std::ops::Deref for WorkerHandle {
    type Target = WorkerState;
    fn deref(&self) -> &WorkerState {
        &self.state
    }
}

/// The running simulator. Dropping it stops every listener.
#[derive(Debug)]
pub struct Simulator {
    workers: Vec<WorkerHandle>,
    ca_cert_pem: Option<String>,
    shutdown: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Simulator {
    /// Binds every worker's listener and starts serving.
    ///
    /// # Errors
    /// When a port cannot be bound or a recorded lab has an invalid id.
    pub async fn start(config: SimConfig) -> anyhow::Result<Self> {
        let users = seed::users(config.seed, &config.admin_password, &config.user_password);
        let lab_id = Regex::new(UUID4_PATTERN)?;
        let certificates = if config.tls {
            Some(Certificates::generate(config.host)?)
        } else {
            None
        };
        let mut sim = Self {
            workers: Vec::new(),
            ca_cert_pem: certificates.as_ref().map(|c| c.ca_cert_pem.clone()),
            shutdown: Vec::new(),
            tasks: Vec::new(),
        };
        for (index, spec) in config.workers.iter().enumerate() {
            let labs = match &spec.recorded_labs {
                Some(labs) => labs.clone(),
                None => seed::labs(config.seed, index as u64, spec.labs, &users),
            };
            if let Some(bad) = labs.iter().find(|l| !lab_id.is_match(&l.id)) {
                anyhow::bail!("worker {}: lab id {:?} is not a UUID4", spec.name, bad.id);
            }
            let secret = format!("cml-sim:{}:{}", config.seed, spec.name);
            let state = Arc::new(WorkerState {
                name: spec.name.clone(),
                version: config.version.clone(),
                transition_delay: config.transition_delay,
                lab_id: lab_id.clone(),
                inner: Mutex::new(Inner {
                    users: users.clone(),
                    initial_users: users.clone(),
                    inventory: Inventory {
                        labs: labs.iter().map(|l| (l.id.clone(), l.clone())).collect(),
                    },
                    initial: labs,
                    tokens: TokenIssuer::new(
                        secret.as_bytes(),
                        i64::try_from(config.token_ttl.as_secs()).unwrap_or(i64::MAX / 2),
                    ),
                    faults: Faults::default(),
                    stats: Stats::default(),
                    rng: seed::rng_for(config.seed, 1_000_000 + index as u64),
                }),
            });
            let listener = TcpListener::bind((config.host, spec.port)).await?;
            let addr = listener.local_addr()?;
            let app = router(state.clone());
            let (tx, rx) = oneshot::channel::<()>();
            let task = match &certificates {
                Some(c) => spawn_serve(TlsListener::new(listener, c.acceptor.clone()), app, rx),
                None => spawn_serve(listener, app, rx),
            };
            sim.workers.push(WorkerHandle {
                name: spec.name.clone(),
                addr,
                https: certificates.is_some(),
                state,
            });
            sim.shutdown.push(tx);
            sim.tasks.push(task);
        }
        Ok(sim)
    }

    /// The PEM certificate of the CA that signed the workers' certificate,
    /// when they serve HTTPS: what a client needs to trust them.
    pub fn ca_cert_pem(&self) -> Option<&str> {
        self.ca_cert_pem.as_deref()
    }

    pub fn workers(&self) -> &[WorkerHandle] {
        &self.workers
    }

    /// The worker with this name.
    pub fn worker(&self, name: &str) -> Option<&WorkerHandle> {
        self.workers.iter().find(|w| w.name == name)
    }

    /// Stops accepting connections and lets open requests finish.
    pub async fn shutdown(mut self) {
        for tx in self.shutdown.drain(..) {
            let _ = tx.send(());
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Serves `app` on `listener` until `stop` fires or is dropped.
fn spawn_serve<L>(listener: L, app: Router, stop: oneshot::Receiver<()>) -> JoinHandle<()>
where
    L: Listener,
    L::Addr: std::fmt::Debug,
{
    tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stop.await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "cml-sim listener failed");
        }
    })
}

fn router(state: Arc<WorkerState>) -> Router {
    api::routes()
        .merge(control::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            faults::middleware,
        ))
        .with_state(state)
}
