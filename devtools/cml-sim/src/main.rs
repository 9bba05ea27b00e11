//! `cml-sim`: runs simulated CML servers until interrupted.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use cml_sim::{Lab, SimConfig, Simulator, WorkerSpec};

/// Simulates one or more Cisco Modeling Labs 2.x servers ("workers"), each on
/// its own port, answering the /api/v0 calls labsync uses in the shapes of
/// CML 2.9. Users: `admin` (administrator) and `student` (group member).
///
/// A control API per worker, without authentication, changes labs behind a
/// client's back and injects faults:
///   GET|POST /_sim/labs, GET|PATCH|DELETE /_sim/labs/{id},
///   GET|PUT|DELETE /_sim/faults (latency_ms, jitter_ms, error_rate, booting,
///   hang, truncate_json, wrong_types, empty_list, hide_from_list,
///   proxy_404, after_the_fact {endpoint: error_500|hang|reset},
///   invalid_list_entries, huge_notes_bytes),
///   POST /_sim/expire_tokens, GET|DELETE /_sim/stats, GET /_sim/users,
///   PATCH /_sim/users/{username} {"admin": bool}, POST /_sim/reset.
///
/// With --tls both are served over HTTPS; clients trust the generated CA
/// (--ca-cert-file) or skip verification.
#[derive(Debug, Parser)]
#[command(name = "cml-sim", version, verbatim_doc_comment)]
struct Args {
    /// Number of workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Seeded labs per worker.
    #[arg(long, default_value_t = 24)]
    labs_per_worker: usize,
    /// Worker names are PREFIX-1, PREFIX-2, ...
    #[arg(long, default_value = "cml")]
    name_prefix: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// First port; worker N listens on BASE_PORT+N-1. 0 picks free ports.
    #[arg(long, default_value_t = 0)]
    base_port: u16,
    /// Seed for users, lab ids and contents.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Token lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    token_ttl_secs: u64,
    /// How long start, stop and wipe take, in milliseconds.
    #[arg(long, default_value_t = 200)]
    transition_delay_ms: u64,
    /// Version reported by /api/v0/system_information.
    #[arg(long, default_value = "2.9.1+build.7")]
    cml_version: String,
    /// Password of the `admin` user.
    #[arg(long, env = "CML_SIM_ADMIN_PASSWORD", default_value = "cml-sim-admin")]
    admin_password: String,
    /// Password of the `student` user.
    #[arg(long, env = "CML_SIM_USER_PASSWORD", default_value = "cml-sim-student")]
    user_password: String,
    /// Serve the labs in this JSON file (an array of GET /labs/{id} bodies)
    /// on the first worker instead of seeded ones.
    #[arg(long)]
    labs_from: Option<PathBuf>,
    /// Also write the workers' names and URLs as JSON to this file.
    #[arg(long)]
    addresses_file: Option<PathBuf>,
    /// Serve HTTPS, API and control API alike, with a certificate for
    /// localhost, 127.0.0.1, ::1 and --host signed by a CA generated at start.
    #[arg(long)]
    tls: bool,
    /// With --tls, write the CA certificate (PEM) here, for clients to
    /// trust (default: cml-sim-ca.pem beside --addresses-file, else printed).
    #[arg(long, requires = "tls")]
    ca_cert_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    let recorded: Option<Vec<Lab>> = match &args.labs_from {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?,
            )
        }
        None => None,
    };
    let workers = (1..=args.workers)
        .map(|n| {
            let port = if args.base_port == 0 {
                0
            } else {
                u16::try_from(usize::from(args.base_port) + n - 1).context("port out of range")?
            };
            Ok(WorkerSpec {
                name: format!("{}-{n}", args.name_prefix),
                port,
                labs: args.labs_per_worker,
                recorded_labs: if n == 1 { recorded.clone() } else { None },
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sim = Simulator::start(SimConfig {
        host: args.host,
        workers,
        seed: args.seed,
        token_ttl: Duration::from_secs(args.token_ttl_secs),
        transition_delay: Duration::from_millis(args.transition_delay_ms),
        version: args.cml_version,
        admin_password: args.admin_password,
        user_password: args.user_password,
        tls: args.tls,
    })
    .await?;
    let mut addresses = Vec::new();
    for w in sim.workers() {
        println!(
            "cml-sim: worker {} listening on {} ({} labs)",
            w.name,
            w.base_url(),
            w.labs().len()
        );
        addresses.push(serde_json::json!({"name": w.name, "url": w.base_url()}));
    }
    if let Some(path) = &args.addresses_file {
        std::fs::write(path, serde_json::to_vec_pretty(&addresses)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(pem) = sim.ca_cert_pem() {
        let beside_addresses = args
            .addresses_file
            .as_ref()
            .map(|a| a.with_file_name("cml-sim-ca.pem"));
        match args.ca_cert_file.or(beside_addresses) {
            Some(path) => {
                std::fs::write(&path, pem)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("cml-sim: CA certificate written to {}", path.display());
            }
            None => println!("cml-sim: CA certificate:\n{pem}"),
        }
    }
    println!("cml-sim: users admin (administrator) and student; Ctrl-C stops");
    shutdown_signal().await?;
    println!("cml-sim: stopping");
    sim.shutdown().await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM, whichever comes first: scripts stop the
/// simulator with SIGTERM, people with Ctrl-C.
async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
