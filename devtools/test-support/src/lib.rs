//! Test support: a MongoDB-wire server for labsync's tests, benchmarks and
//! demo, run as a separate process.
//!
//! What lives here: [`MongoServer`], which starts `secantusd-rs` (SecantusDB,
//! GPL-2.0, installed by `scripts/install-tools.sh`; it is only ever executed,
//! never linked) on a free port with its storage in a temporary directory,
//! and [`shared_server`], one such server per test binary, handing each test
//! its own database, and [`eventually`], how tests wait for a condition.
//! `LABSYNC_TEST_MONGODB_URI` points everything at an
//! external server (a real mongod) instead.
//!
//! What it may depend on: the MongoDB driver and std. Only tests, benchmarks
//! and devtools depend on it.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Names the `secantusd-rs` binary explicitly.
pub const SERVER_BIN_ENV: &str = "LABSYNC_SECANTUSD";
/// Uses an already running server instead of starting one.
pub const EXTERNAL_URI_ENV: &str = "LABSYNC_TEST_MONGODB_URI";
/// Where `scripts/install-tools.sh` installs tools.
pub const TOOLS_DIR_ENV: &str = "LABSYNC_TOOLS_DIR";

/// Finds `secantusd-rs`: `$LABSYNC_SECANTUSD`, then the tools directory, then `PATH`.
///
/// # Errors
/// When it is in none of them (`scripts/install-tools.sh` puts it there).
pub fn server_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(SERVER_BIN_ENV) {
        return Ok(PathBuf::from(p));
    }
    let tools = std::env::var_os(TOOLS_DIR_ENV)
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/labsync-tools"))
        });
    if let Some(candidate) = tools.map(|t| t.join("bin/secantusd-rs"))
        && candidate.is_file()
    {
        return Ok(candidate);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("secantusd-rs");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "secantusd-rs not found: run scripts/install-tools.sh (or set {SERVER_BIN_ENV}, \
         or {EXTERNAL_URI_ENV} to use a running MongoDB)"
    )
}

/// A `secantusd-rs` child process. Dropping it stops the server.
///
/// The server runs under a small shell guard that reads our end of a pipe: if
/// this process dies without running `Drop` (a panic in a static, SIGKILL),
/// the pipe closes and the guard kills the server, so it never outlives the
/// test run.
#[derive(Debug)]
pub struct MongoServer {
    uri: String,
    addr: String,
    /// None while stopped.
    running: Option<(Child, ChildStdin)>,
    storage: tempfile::TempDir,
}

impl MongoServer {
    /// Starts a server on a free port and waits until it accepts connections.
    ///
    /// # Errors
    /// When the binary is missing or the server does not report its address
    /// within 60 seconds.
    pub fn start() -> anyhow::Result<Self> {
        sweep_storage_left_by_dead_processes(&std::env::temp_dir());
        let storage = tempfile::Builder::new()
            .prefix(&format!("{STORAGE_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("creating the server's storage directory")?;
        let (child, guard, addr) = spawn(storage.path(), "0")?;
        Ok(Self {
            uri: format!("mongodb://{addr}/?directConnection=true"),
            addr,
            running: Some((child, guard)),
            storage,
        })
    }

    /// A connection string for the server.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The server's own process id while it runs (a benchmark reads its
    /// CPU time from `/proc`): the child of the guard shell, read from
    /// Linux's `/proc/<pid>/task/<pid>/children`.
    pub fn pid(&self) -> Option<u32> {
        let guard = self.running.as_ref()?.0.id();
        std::fs::read_to_string(format!("/proc/{guard}/task/{guard}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Stops the server, as an outage would; its data stays on disk.
    pub fn stop(&mut self) {
        if let Some((mut child, guard)) = self.running.take() {
            // Closing the pipe makes the guard stop the server; then reap it.
            drop(guard);
            let _ = child.wait();
        }
    }

    /// Starts a stopped server again on the same address and storage, so
    /// that clients connected before the outage find it where it was.
    ///
    /// # Errors
    /// As [`MongoServer::start`], or when the port was taken meanwhile.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let port = self.addr.rsplit_once(':').map_or("0", |(_, p)| p);
        let (child, guard, addr) = spawn(self.storage.path(), port)?;
        anyhow::ensure!(addr == self.addr, "restarted on {addr}, not {}", self.addr);
        self.running = Some((child, guard));
        Ok(())
    }
}

/// What a server's storage directory is named after: the prefix, then the
/// id of the process that owns it.
const STORAGE_PREFIX: &str = "labsync-mongo-";

/// Removes the storage directories of test processes that are gone. A
/// test binary's shared server lives in a static, which is never dropped,
/// so its directory outlives the run; without this they fill the disk run
/// after run. A directory whose name carries no process id is left alone.
pub fn sweep_storage_left_by_dead_processes(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(STORAGE_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Starts `secantusd-rs` on `port` (0: a free one) under the guard, and
/// waits for the address it reports.
fn spawn(storage: &std::path::Path, port: &str) -> anyhow::Result<(Child, ChildStdin, String)> {
    let bin = server_binary()?;
    {
        // The guard: start the server in the background, print its output,
        // and kill it when stdin (our pipe) reaches end of file.
        let script = r#""$0" "$@" & server=$!
trap 'kill $server 2>/dev/null' EXIT
read -r _ignored
kill $server 2>/dev/null
wait $server 2>/dev/null"#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(&bin)
            // A small WAL and cache: test stores hold kilobytes, and every
            // test binary has its own store.
            .args([
                "--port",
                port,
                "--log-file-max",
                "16MB",
                "--cache-size",
                "256M",
            ])
            .args(["--log-level", "WARNING", "--storage-path"])
            .arg(storage)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let guard = child.stdin.take().context("server stdin")?;
        let stdout = child.stdout.take().context("server stdout")?;
        let stderr = child.stderr.take().context("server stderr")?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        for stream in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                // Keep draining after the address is found so the server never
                // blocks on a full pipe.
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = parse_listening(&line) {
                        break addr;
                    }
                    seen.push(line);
                }
                Err(_) => {
                    // Closing the pipe makes the guard stop the server.
                    drop(guard);
                    let _ = child.wait();
                    bail!(
                        "{} did not report its address within 60 s; it said:\n{}",
                        bin.display(),
                        seen.join("\n")
                    );
                }
            }
        };
        Ok((child, guard, addr))
    }
}

/// Finds `HOST:PORT` in a line such as `listening on 127.0.0.1:40123`.
fn parse_listening(line: &str) -> Option<String> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let addr = rest.split_whitespace().next()?;
    let addr = addr.trim_start_matches("mongodb://").trim_end_matches('/');
    addr.rsplit_once(':')
        .filter(|(_, port)| port.parse::<u16>().is_ok_and(|p| p != 0))
        .map(|_| addr.to_owned())
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the tests of one binary get their databases.
#[derive(Debug)]
pub enum TestMongo {
    Owned(MongoServer),
    External(String),
}

impl TestMongo {
    pub fn uri(&self) -> &str {
        match self {
            Self::Owned(s) => s.uri(),
            Self::External(uri) => uri,
        }
    }
}

/// The server shared by every test in this binary, started on first use.
///
/// # Panics
/// When no server can be started: the tests cannot run without one, and the
/// message says how to install it.
pub fn shared_server() -> &'static TestMongo {
    static SERVER: OnceLock<TestMongo> = OnceLock::new();
    SERVER.get_or_init(|| match std::env::var(EXTERNAL_URI_ENV) {
        Ok(uri) if !uri.is_empty() => TestMongo::External(uri),
        _ => TestMongo::Owned(MongoServer::start().unwrap_or_else(|e| panic!("{e:#}"))),
    })
}

/// A fresh, uniquely named database for one test, on the shared server.
pub async fn test_database() -> mongodb::Database {
    let client = mongodb::Client::with_uri_str(shared_server().uri())
        .await
        .unwrap_or_else(|e| panic!("connecting to the test MongoDB: {e}"));
    client.database(&unique_database_name())
}

/// Polls `f` every 10 ms until it is true; panics naming `what` after
/// 15 s. Tests wait for conditions with this, never with a fixed sleep.
///
/// # Panics
/// When the deadline passes.
pub async fn eventually<F, Fut>(what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(Duration::from_secs(15), what, f).await;
}

/// [`eventually`] with a deadline of its own, for conditions that take
/// several ticks of a schedule.
///
/// # Panics
/// When the deadline passes.
pub async fn eventually_within<F, Fut>(within: Duration, what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if poll_until(Duration::from_millis(10), within, f)
        .await
        .is_err()
    {
        panic!("timed out waiting for {what}");
    }
}

/// The deadline of [`poll_until`] passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the condition did not hold within the deadline")
    }
}

impl std::error::Error for TimedOut {}

/// Checks `f` every `every` until it is true or `within` has passed: the one
/// place where tests, the benchmark and the devtools wait. For callers that
/// need another pace than [`eventually`] (a crash test that must kill a
/// process within a millisecond of a request) or an error instead of a
/// panic (the benchmark).
///
/// # Errors
/// [`TimedOut`] when the deadline passes first.
pub async fn poll_until<F, Fut>(every: Duration, within: Duration, mut f: F) -> Result<(), TimedOut>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        if Instant::now() >= deadline {
            return Err(TimedOut);
        }
        tokio::time::sleep(every).await;
    }
    Ok(())
}

/// `test_` and 32 hex digits: unique per call, valid on every MongoDB.
pub fn unique_database_name() -> String {
    format!("test_{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_storage_of_a_process_that_is_gone_is_swept() {
        let base = tempfile::tempdir().unwrap();
        let gone = base.path().join(format!("{STORAGE_PREFIX}4294967295-abc"));
        let mine = base
            .path()
            .join(format!("{STORAGE_PREFIX}{}-abc", std::process::id()));
        let unnamed = base.path().join(format!("{STORAGE_PREFIX}abc"));
        for d in [&gone, &mine, &unnamed] {
            std::fs::create_dir(d).unwrap();
        }
        sweep_storage_left_by_dead_processes(base.path());
        assert!(!gone.exists(), "its process is gone");
        assert!(mine.exists() && unnamed.exists());
    }

    #[test]
    fn parses_the_listening_line() {
        assert_eq!(
            parse_listening("[INFO] listening on 127.0.0.1:40123").as_deref(),
            Some("127.0.0.1:40123")
        );
        assert_eq!(parse_listening("listening on 127.0.0.1:0"), None);
        assert_eq!(parse_listening("starting up"), None);
    }
}
