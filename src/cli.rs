//! The command line: `serve`, `refresh`, `delete-lab`, `workers`, `labs`,
//! `config`. Each command parses its input into domain types first, runs one
//! use case, prints the result (human or `--json`), and says through its
//! exit code whether it did what was asked.
//!
//! Human output goes to a terminal, and much of it came from CML (titles,
//! states, messages): every text is printed through [`shown`], which
//! escapes control characters and bidirectional overrides, so that no lab
//! title can retitle the terminal, clear it or reorder what it shows.
//! `--json` output is JSON, escaped by its encoder, and keeps every text as
//! it is stored.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use labsync_application::domain::{
    Actor, BaseUrl, CertificateTrust, LabId, TlsSettings, Worker, WorkerChanges, WorkerId,
};
use labsync_application::inventory::MAX_PAGE;
use labsync_application::ports::LabQuery;
use labsync_application::{
    AppError, DeleteLab, RefreshAll, RefreshOptions, RefreshWorkerLabs, RunReport, RunStatus,
};
use labsync_infrastructure::configuration::Settings;
use secrecy::SecretString;

use crate::http::dto::WorkerView;
use crate::wiring::App;

/// Exit code when a command ran but did not achieve what was asked (a
/// refresh failed, a lab is not gone).
pub const EXIT_FAILED: u8 = 1;
/// Exit code for bad input or configuration.
pub const EXIT_USAGE: u8 = 2;

/// The exit code of a command that ended in an error: the one place an
/// error becomes an exit code. Naming what does not exist or cannot be is
/// bad input; everything else is a failure to do what was asked.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<AppError>() {
        Some(
            AppError::UnknownWorker(_)
            | AppError::UnknownLab(..)
            | AppError::UnknownRun(_)
            | AppError::WorkerExists(_)
            | AppError::InvalidId(_)
            | AppError::Invalid(_),
        ) => EXIT_USAGE,
        _ => EXIT_FAILED,
    }
}

/// Keeps the inventory of labs on a fleet of Cisco Modeling Labs servers in
/// MongoDB.
///
/// Configuration: config/default.toml (built in), the file named by
/// --config or LABSYNC_CONFIG, then LABSYNC__SECTION__KEY environment
/// variables, then systemd credentials ($CREDENTIALS_DIRECTORY).
#[derive(Debug, Parser)]
#[command(name = "labsync", version)]
pub struct Cli {
    /// A configuration file (TOML or YAML); instead of LABSYNC_CONFIG.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the HTTP API and the scheduled refresh until SIGINT or SIGTERM.
    Serve,
    /// Refreshes one worker, or every enabled worker, now.
    Refresh(RefreshArgs),
    /// Deletes a lab in CML and its record (the two-phase delete).
    DeleteLab(DeleteArgs),
    /// Registers, lists and removes workers (CML servers).
    #[command(subcommand)]
    Workers(WorkersCommand),
    /// Shows the stored inventory.
    #[command(subcommand)]
    Labs(LabsCommand),
    /// Who deleted, pruned or refreshed what, and how it ended, newest
    /// first; labs that are gone included.
    Audit(AuditArgs),
    /// Refresh runs, newest first: what each did and how it ended.
    Runs(RunsArgs),
    /// Checks the configuration and prints it, as TOML, with secrets
    /// redacted.
    Config,
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Async delete requests (`?mode=async`).
    #[command(subcommand)]
    DeleteRequests(DeleteRequestsCommand),
    /// The encryption key of the workers' CML passwords.
    #[command(subcommand)]
    Security(SecurityCommand),
    /// Prints the completions of a shell:
    /// `labsync completions bash > /etc/bash_completion.d/labsync`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Prints the manual page (roff): `labsync man | man -l -`.
    Man,
}

#[derive(Debug, Subcommand)]
pub enum SecurityCommand {
    /// Re-seals every worker's password under the configured
    /// security.encryption_key, opening it with the old key (read from the
    /// environment variable named here). Each worker is changed atomically;
    /// run it again after an interruption: finished workers are skipped.
    /// Replicas running with the old key cannot read the passwords any
    /// more: restart them with the new key.
    RotateKey {
        /// The environment variable holding the old key (default:
        /// security.previous_encryption_key).
        #[arg(long)]
        old_key_env: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeleteRequestsCommand {
    /// One request: its status, attempts, last error and outcome.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// The newest requests, optionally of one status (pending, running,
    /// done, failed, cancelled).
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    #[arg(long)]
    pub worker: Option<String>,
    /// running, succeeded, failed or skipped.
    #[arg(long)]
    pub status: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[arg(long)]
    pub worker: Option<String>,
    #[arg(long)]
    pub lab: Option<String>,
    /// Exactly: api:<token>, cli:<user> or schedule.
    #[arg(long)]
    pub actor: Option<String>,
    /// delete, prune, refresh, worker_added, worker_updated or worker_removed.
    #[arg(long)]
    pub action: Option<String>,
    /// RFC 3339: entries at or after this time.
    #[arg(long)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Makes a random API token, stores its SHA-256 in MongoDB (every
    /// replica accepts it at once, no restart) and prints the token once.
    /// With --config-entry, stores nothing and prints the configuration
    /// entry instead.
    New {
        #[arg(long, value_parser = token_name)]
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// Refused from this many days on.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650), conflicts_with = "config_entry")]
        expires_in_days: Option<u32>,
        #[arg(long)]
        config_entry: bool,
    },
    /// The stored tokens: name, role, made, last used, expiry (never the
    /// token).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Removes a stored token: refused from its next request on, on every
    /// replica, with the console sessions made with it.
    Revoke { name: String },
}

fn token_name(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        Ok(s.to_owned())
    } else {
        Err("1 to 64 of letters, digits, - _ .".into())
    }
}

/// 32 random bytes, URL-safe base64.
fn new_token() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `labsync token new|list|revoke` on the stored tokens.
async fn token_command(
    settings: &Settings,
    app: &App,
    command: TokenCommand,
) -> anyhow::Result<ExitCode> {
    use labsync_application::ports::{MachineToken, MachineTokens};
    let store = labsync_infrastructure::mongo::MongoMachineTokens::new(&app.db);
    match command {
        TokenCommand::New {
            name,
            role,
            expires_in_days,
            ..
        } => {
            if settings.api.parsed_tokens().iter().any(|t| t.name == name) {
                return Err(AppError::Invalid(format!(
                    "a token named {name:?} is in the configuration: choose another name"
                ))
                .into());
            }
            let token = new_token();
            let now = app.services.clock.now();
            let stored = MachineToken {
                name: name.clone(),
                role,
                sha256: crate::http::auth::hash_token(&token),
                created_at: now,
                expires_at: expires_in_days.map(|d| now + chrono::Duration::days(i64::from(d))),
                last_used_at: None,
            };
            match store.add(&stored).await {
                Ok(()) => {}
                Err(labsync_application::RepoError::Duplicate(_)) => {
                    return Err(AppError::Invalid(format!(
                        "a stored token is named {name:?}: revoke it first, or choose another name"
                    ))
                    .into());
                }
                Err(e) => return Err(AppError::from(e).into()),
            }
            println!("token:  {token}");
            println!(
                "stored as {name:?} ({}{}): accepted now by every replica; shown only this once",
                stored.role,
                stored
                    .expires_at
                    .map_or_else(String::new, |t| format!(", expires {}", t.to_rfc3339()))
            );
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::List { json } => {
            let tokens = store.list().await.map_err(AppError::from)?;
            let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.to_rfc3339());
            if json {
                let views: Vec<serde_json::Value> = tokens
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "name": t.name, "role": t.role,
                            "created_at": t.created_at.to_rfc3339(),
                            "last_used_at": time(t.last_used_at),
                            "expires_at": time(t.expires_at),
                        })
                    })
                    .collect();
                print_json(&views)?;
            } else {
                for t in &tokens {
                    println!(
                        "{:<24} {:<8} made {} last used {} expires {}",
                        t.name,
                        t.role,
                        t.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
                        time(t.last_used_at).unwrap_or_else(|| "never".into()),
                        time(t.expires_at).unwrap_or_else(|| "never".into())
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Revoke { name } => {
            if store.revoke(&name).await.map_err(AppError::from)? {
                println!("revoked {name:?}: refused from its next request on");
                Ok(ExitCode::SUCCESS)
            } else {
                Err(AppError::Invalid(format!("no stored token is named {name:?}")).into())
            }
        }
    }
}

fn worker_id(s: &str) -> Result<WorkerId, String> {
    WorkerId::parse(s).map_err(|e| e.to_string())
}

fn lab_id(s: &str) -> Result<LabId, String> {
    LabId::parse(s).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub struct RefreshArgs {
    /// Only this worker (default: every enabled worker).
    #[arg(long, value_parser = worker_id)]
    pub worker: Option<WorkerId>,
    /// Plan and report, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Apply prunes that the safety limits would hold.
    #[arg(long)]
    pub force_prune: bool,
    /// Print the run reports as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[arg(long, value_parser = worker_id)]
    pub worker: WorkerId,
    #[arg(long, value_parser = lab_id)]
    pub lab: LabId,
    /// Stop and wipe a running lab first instead of refusing.
    #[arg(long)]
    pub force: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum WorkersCommand {
    /// Registers a worker. The password is read from an environment variable
    /// so that it never appears in the shell history or the process list.
    Add(AddWorkerArgs),
    /// Lists registered workers (never their passwords).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Removes a worker and every record of its labs.
    Remove {
        #[arg(value_parser = worker_id)]
        id: WorkerId,
    },
    /// Changes a worker's settings; what is not given stays. A new URL or
    /// username needs the password again.
    Update(UpdateWorkerArgs),
    /// Lets refreshes and deletes touch the worker again.
    Enable {
        #[arg(value_parser = worker_id)]
        id: WorkerId,
    },
    /// Hands off: refreshes skip the worker and deletes are refused.
    Disable {
        #[arg(value_parser = worker_id)]
        id: WorkerId,
    },
    /// Logs in with the stored settings, checks admin rights and lists the
    /// labs, changing nothing; says how long it took.
    Test {
        #[arg(value_parser = worker_id)]
        id: WorkerId,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct UpdateWorkerArgs {
    #[arg(value_parser = worker_id)]
    pub id: WorkerId,
    #[arg(long)]
    pub url: Option<String>,
    #[arg(long)]
    pub username: Option<String>,
    /// Name of the environment variable that holds the new password.
    #[arg(long)]
    pub password_env: Option<String>,
    #[arg(long)]
    pub name: Option<String>,
    /// PEM file of the CA(s) that signed the server's certificate.
    #[arg(long, conflicts_with = "system_roots")]
    pub ca_cert: Option<PathBuf>,
    /// Trust the system's roots again (drops the CA file).
    #[arg(long)]
    pub system_roots: bool,
    /// true: do not verify the server's certificate; false: verify it.
    #[arg(long)]
    pub insecure: Option<bool>,
    /// true: accept a plain http:// URL.
    #[arg(long)]
    pub allow_http: Option<bool>,
    /// true: fetch lab details with one `populate_lab_tiles` request.
    #[arg(long)]
    pub lab_tiles: Option<bool>,
}

#[derive(Debug, Args)]
pub struct AddWorkerArgs {
    #[arg(long, value_parser = worker_id)]
    pub id: WorkerId,
    /// https://host[:port] of the CML server.
    #[arg(long)]
    pub url: String,
    /// An admin account: labsync lists every user's labs.
    #[arg(long)]
    pub username: String,
    /// Name of the environment variable that holds the password.
    #[arg(long)]
    pub password_env: String,
    /// Display name (default: the id).
    #[arg(long)]
    pub name: Option<String>,
    /// PEM file of the CA(s) that signed the server's certificate.
    #[arg(long, conflicts_with = "insecure")]
    pub ca_cert: Option<PathBuf>,
    /// Do not verify the server's certificate (logged as a warning).
    #[arg(long)]
    pub insecure: bool,
    /// Accept a plain http:// URL: the password then crosses the network
    /// unencrypted (shown as a warning in `workers list`).
    #[arg(long)]
    pub allow_http: bool,
    /// Register it disabled: refreshes skip it.
    #[arg(long)]
    pub disabled: bool,
    /// Fetch lab details with CML's one `populate_lab_tiles` request
    /// (labs it misses, or its failure, fall back to one request per lab).
    #[arg(long)]
    pub lab_tiles: bool,
}

#[derive(Debug, Subcommand)]
pub enum LabsCommand {
    /// Lists a worker's lab records, ordered by lab id.
    List {
        #[arg(long, value_parser = worker_id)]
        worker: WorkerId,
        #[arg(long)]
        json: bool,
    },
    /// One lab: its fields, its change history and its audit trail.
    Show {
        #[arg(long, value_parser = worker_id)]
        worker: WorkerId,
        #[arg(long, value_parser = lab_id)]
        lab: LabId,
        #[arg(long)]
        json: bool,
    },
}

/// `text` safe to print on a terminal: control characters (escape
/// sequences, bells, carriage returns, newlines) and bidirectional
/// formatting characters are written as Rust escapes (`\u{1b}`), the
/// rest as it is.
pub fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        labsync_application::domain::text::is_invisible(c)
    }
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn report_line(r: &RunReport) -> String {
    let status = match r.status {
        RunStatus::Failed => "FAILED",
        other => other.word(),
    };
    let mut line = format!(
        "{:<20} {:<9} listed={} created={} updated={} unchanged={} pruned={} held={} failed={} ({} ms){}",
        r.worker_id.as_str(),
        status,
        r.listed,
        r.created,
        r.updated,
        r.unchanged,
        r.pruned,
        r.held,
        r.failed,
        r.duration_ms,
        if r.dry_run { " [dry run]" } else { "" },
    );
    let skip = r.skip_reason.map(|s| s.as_str().to_owned());
    for extra in [&r.hold_reason, &skip, &r.error, &r.note]
        .into_iter()
        .flatten()
    {
        line.push_str("\n    ");
        line.push_str(&shown(extra));
    }
    line
}

/// The OS login that ran the command, as it says (not authenticated:
/// anyone who can run the CLI with the database's credentials can say
/// anything; the audit log shows it as such).
fn cli_actor() -> Actor {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.trim().is_empty()))
        .unwrap_or_default();
    Actor::cli(&user)
}

/// Runs a parsed command.
///
/// # Errors
/// Anything that keeps the command from running at all; its message is
/// printed and the process exits with [`EXIT_USAGE`] or [`EXIT_FAILED`].
pub async fn run(cli: Cli, settings: Settings) -> anyhow::Result<ExitCode> {
    let command = match cli.command {
        Command::Config => {
            print!(
                "{}",
                settings
                    .to_redacted_toml()
                    .map_err(|e| anyhow::anyhow!("printing the configuration: {e}"))?
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Completions { shell } => {
            print_completions(shell);
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man => {
            print_man()?;
            return Ok(ExitCode::SUCCESS);
        }
        other => other,
    };
    if let Command::Serve = command {
        crate::service::serve(settings).await?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Token(TokenCommand::New {
        name,
        role,
        config_entry: true,
        ..
    }) = &command
    {
        let token = new_token();
        let hash = crate::http::auth::hash_token(&token);
        println!("token:  {token}");
        println!(
            "config: tokens = [\"{name}:{role}:{hash}\"]   (or LABSYNC__API__TOKENS={name}:{role}:{hash})"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let app = App::build(&settings).await?;
    let s = &app.services;
    match command {
        Command::Config | Command::Serve | Command::Completions { .. } | Command::Man => {
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(t) => token_command(&settings, &app, t).await,
        Command::Refresh(a) => {
            let options = RefreshOptions {
                dry_run: a.dry_run,
                force_prune: a.force_prune,
            };
            let on_terminal = {
                use std::io::IsTerminal;
                std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
            };
            let reports = match &a.worker {
                Some(w) => vec![
                    RefreshWorkerLabs::new(s.clone())
                        .execute(w, &cli_actor(), options)
                        .await?,
                ],
                // On a terminal, each worker's run as it goes; its line
                // printed as it ends.
                None if on_terminal && !a.json => {
                    let reports = refresh_fleet_with_progress(&app, options).await?;
                    if reports.is_empty() {
                        println!("no enabled workers");
                    }
                    return Ok(if reports.iter().any(RunReport::is_failure) {
                        ExitCode::from(EXIT_FAILED)
                    } else {
                        ExitCode::SUCCESS
                    });
                }
                None => {
                    RefreshAll::new(s.clone())
                        .execute(&cli_actor(), options)
                        .await?
                }
            };
            if a.json {
                print_json(&reports)?;
            } else if reports.is_empty() {
                println!("no enabled workers");
            } else {
                for r in &reports {
                    println!("{}", report_line(r));
                }
            }
            Ok(if reports.iter().any(RunReport::is_failure) {
                ExitCode::from(EXIT_FAILED)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::DeleteLab(a) => {
            let outcome = DeleteLab {
                worker_id: a.worker,
                lab_id: a.lab,
                force: a.force,
                requested_by: cli_actor(),
                owned_by: None,
            }
            .execute(s)
            .await?;
            if a.json {
                print_json(&outcome)?;
            } else {
                println!(
                    "{} {}: {}",
                    outcome.worker_id,
                    outcome.lab_id,
                    shown(&outcome.message)
                );
            }
            Ok(if outcome.lab_gone {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            })
        }
        Command::Workers(WorkersCommand::Add(a)) => add_worker(&app, a).await,
        Command::Workers(WorkersCommand::List { json }) => {
            let workers = app.inventory.workers().await?;
            if json {
                let views: Vec<WorkerView> = workers.into_iter().map(WorkerView::from).collect();
                print_json(&views)?;
            } else {
                for w in workers.iter().map(|o| &o.worker) {
                    let tls = match (w.plain_http(), &w.tls.trust) {
                        (true, _) => {
                            "tls=NONE (plain http: the password crosses the network unencrypted)"
                        }
                        (_, CertificateTrust::Insecure) => "tls=INSECURE",
                        (_, CertificateTrust::CaBundle(_)) => "tls=ca-bundle",
                        (_, CertificateTrust::SystemRoots) => "tls=system",
                    };
                    println!(
                        "{:<20} {:<8} {} user={} {}",
                        w.id.as_str(),
                        if w.enabled { "enabled" } else { "disabled" },
                        shown(w.base_url.as_str()),
                        shown(&w.username),
                        tls
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Workers(WorkersCommand::Remove { id }) => {
            match app.inventory.remove(&id, &cli_actor()).await {
                Ok(records) => {
                    println!("removed worker {id} and {records} lab records");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Runs(a) => {
            let query = crate::http::routes::runs_query(&crate::http::dto::RunsParams {
                worker_id: a.worker,
                status: a.status,
                limit: Some(a.limit),
            })
            .map_err(|e| AppError::Invalid(e.detail))?;
            let runs = app.inventory.runs(query).await?;
            if a.json {
                let views: Vec<crate::http::dto::RunReportView> = runs
                    .into_iter()
                    .map(crate::http::dto::RunReportView::from)
                    .collect();
                print_json(&views)?;
            } else {
                for r in &runs {
                    println!(
                        "{} {} {:<8} {}",
                        r.started_at.format("%Y-%m-%dT%H:%M:%SZ"),
                        r.run_id,
                        format!("{:?}", r.trigger).to_lowercase(),
                        report_line(r)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(a) => {
            let query = crate::http::routes::audit_query(crate::http::dto::AuditParams {
                worker_id: a.worker,
                lab_id: a.lab,
                actor: a.actor,
                action: a.action,
                since: a.since,
                cursor: None,
                limit: Some(a.limit),
            })
            .map_err(|e| AppError::Invalid(e.detail))?;
            let page = app.inventory.audit(query).await?;
            if a.json {
                let views: Vec<crate::http::dto::AuditItemView> = page
                    .items
                    .into_iter()
                    .map(crate::http::dto::AuditItemView::from)
                    .collect();
                print_json(&views)?;
            } else {
                for s in &page.items {
                    let e = &s.entry;
                    println!(
                        "{} {:<16} {:<14} {} {} {} {}",
                        e.at.format("%Y-%m-%dT%H:%M:%SZ"),
                        shown(&e.actor.to_string()),
                        e.action.as_str(),
                        e.worker_id,
                        e.lab_id.map_or_else(|| "-".into(), |l| l.to_string()),
                        shown(&e.outcome),
                        shown(&e.detail)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Labs(LabsCommand::List { worker, json }) => {
            let mut records = Vec::new();
            let mut after = None;
            loop {
                let query = LabQuery {
                    after,
                    limit: MAX_PAGE,
                    ..LabQuery::default()
                };
                let page = app.inventory.labs(&worker, query).await?;
                records.extend(page.items);
                match page.next_cursor {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            if json {
                print_json(&records)?;
            } else {
                for r in &records {
                    println!(
                        "{} {:<15} rev={} {}",
                        r.lab_id,
                        shown(r.snapshot.state.as_str()),
                        r.revision,
                        shown(&r.snapshot.title)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Security(SecurityCommand::RotateKey { old_key_env }) => {
            let (old, from) = match &old_key_env {
                Some(var) => (
                    std::env::var(var)
                        .ok()
                        .filter(|k| !k.is_empty())
                        .with_context(|| {
                            format!("environment variable {var} is not set or empty")
                        })?,
                    var.clone(),
                ),
                None => (
                    secrecy::ExposeSecret::expose_secret(
                        &settings.security.previous_encryption_key,
                    )
                    .to_owned(),
                    "security.previous_encryption_key".to_owned(),
                ),
            };
            let old = labsync_infrastructure::crypto::PasswordCipher::from_setting(
                &SecretString::from(old),
            )
            .map_err(|e| anyhow::anyhow!("the old key ({from}): {e}"))?
            .with_context(|| {
                format!("no old key: set security.previous_encryption_key or pass --old-key-env ({from} is empty)")
            })?;
            let report = app.workers.reseal_with(&old).await?;
            println!(
                "resealed {} worker password(s) under the new key; {} already were",
                report.resealed, report.already
            );
            for (id, why) in &report.failed {
                println!("  NOT resealed: {}: {}", shown(id), shown(why));
            }
            Ok(if report.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            })
        }
        Command::Labs(LabsCommand::Show { worker, lab, json }) => {
            let detail = app.inventory.lab(&worker, &lab).await?;
            if json {
                print_json(&crate::http::dto::LabDetailView::from(detail))?;
                return Ok(ExitCode::SUCCESS);
            }
            print_lab(&detail);
            Ok(ExitCode::SUCCESS)
        }
        Command::Workers(WorkersCommand::Update(a)) => update_worker(&app, a).await,
        Command::Workers(WorkersCommand::Enable { id }) => set_enabled(&app, &id, true).await,
        Command::Workers(WorkersCommand::Disable { id }) => set_enabled(&app, &id, false).await,
        Command::Workers(WorkersCommand::Test { id, json }) => {
            let started = std::time::Instant::now();
            let check = app
                .inventory
                .check_worker(&id, &WorkerChanges::default(), None)
                .await?;
            let took = started.elapsed();
            if json {
                let mut v = serde_json::to_value(crate::http::dto::ConnectionCheckView::from(
                    check.clone(),
                ))?;
                v["took_ms"] = serde_json::json!(took.as_millis());
                print_json(&v)?;
            } else if check.ok {
                println!(
                    "{id}: ok in {} ms: logged in as {}, an admin; {} labs listed",
                    took.as_millis(),
                    shown(check.username.as_deref().unwrap_or("?")),
                    check.labs.unwrap_or(0)
                );
            } else {
                println!(
                    "{id}: FAILED after {} ms: {}",
                    took.as_millis(),
                    shown(&check.detail)
                );
            }
            Ok(if check.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            })
        }
        Command::DeleteRequests(DeleteRequestsCommand::Show { id, json }) => {
            let request = app
                .delete_queue
                .get(&id)
                .await?
                .ok_or_else(|| AppError::Invalid(format!("no delete request {id:?}")))?;
            if json {
                print_json(&crate::http::dto::DeleteRequestView::from(request))?;
            } else {
                print_delete_request(&request);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::DeleteRequests(DeleteRequestsCommand::List {
            status,
            limit,
            json,
        }) => {
            let status = status
                .map(|s| {
                    labsync_application::DeleteRequestStatus::parse(&s).ok_or_else(|| {
                        AppError::Invalid(format!(
                            "status must be pending, running, done, failed or cancelled, not {s:?}"
                        ))
                    })
                })
                .transpose()?;
            let requests = app
                .delete_queue
                .recent(status, limit.clamp(1, MAX_PAGE))
                .await?;
            if json {
                let views: Vec<crate::http::dto::DeleteRequestView> = requests
                    .into_iter()
                    .map(crate::http::dto::DeleteRequestView::from)
                    .collect();
                print_json(&views)?;
            } else {
                for r in &requests {
                    print_delete_request(r);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What went wrong, in one line a person can act on. A database that does
/// not answer is said so, with where labsync looked (credentials left
/// out); the driver's own account goes to the debug log.
pub fn explain(e: &anyhow::Error, settings: &Settings) -> String {
    use labsync_application::RepoError;
    let unavailable = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<RepoError>(),
            Some(RepoError::Unavailable(_))
        ) || matches!(
            c.downcast_ref::<AppError>(),
            Some(AppError::Repository(RepoError::Unavailable(_)))
        )
    });
    if unavailable {
        tracing::debug!(error = %format!("{e:#}"), "the database did not answer");
        let uri = labsync_infrastructure::configuration::uri_without_credentials(
            secrecy::ExposeSecret::expose_secret(&settings.mongodb.uri),
        );
        return format!(
            "MongoDB did not answer at {uri} (mongodb.uri): is it running and reachable? \
             (RUST_LOG=debug shows the driver's detail)"
        );
    }
    format!("{e:#}")
}

/// Runs a command that needs no configuration (completions, the manual);
/// `None` for every other.
pub fn without_configuration(cli: &Cli) -> Option<ExitCode> {
    match &cli.command {
        Command::Completions { shell } => {
            print_completions(*shell);
            Some(ExitCode::SUCCESS)
        }
        Command::Man => Some(match print_man() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("labsync: {e}");
                ExitCode::from(EXIT_FAILED)
            }
        }),
        _ => None,
    }
}

/// Starts a run of every enabled worker and follows each on the terminal
/// (a spinner per worker on standard error), printing each report's line
/// as its run ends.
async fn refresh_fleet_with_progress(
    app: &App,
    options: RefreshOptions,
) -> anyhow::Result<Vec<RunReport>> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let started = RefreshAll::new(app.services.clone())
        .start(&cli_actor(), options)
        .await?;
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{spinner} {prefix:<20} {msg} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let mut pending: Vec<(RunReport, ProgressBar)> = started
        .into_iter()
        .map(|r| {
            let bar = bars.add(ProgressBar::new_spinner());
            bar.set_style(style.clone());
            bar.set_prefix(r.worker_id.to_string());
            bar.set_message("running");
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            (r, bar)
        })
        .collect();
    let mut done = Vec::new();
    while !pending.is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let mut still = Vec::new();
        for (r, bar) in pending {
            // A run whose process went silent reads as failed: this ends.
            // A read that fails is tried again: returning would end this
            // process, and the runs it carries with it.
            let now = match app.inventory.run(&r.run_id).await {
                Ok(now) => now,
                Err(e) => {
                    bar.set_message(format!("running (its report cannot be read now: {e})"));
                    still.push((r, bar));
                    continue;
                }
            };
            if now.status == RunStatus::Running {
                still.push((r, bar));
            } else {
                bar.finish_and_clear();
                bars.suspend(|| println!("{}", report_line(&now)));
                done.push(now);
            }
        }
        pending = still;
    }
    Ok(done)
}

/// The completions of `shell`, on standard output.
fn print_completions(shell: clap_complete::Shell) {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "labsync", &mut std::io::stdout());
}

/// The manual page, on standard output.
fn print_man() -> anyhow::Result<()> {
    use clap::CommandFactory;
    clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
    Ok(())
}

fn print_lab(d: &labsync_application::inventory::LabDetail) {
    let r = &d.record;
    let l = &r.snapshot;
    println!("{} {}", r.lab_id, shown(&l.title));
    println!("  worker     {}", r.worker_id);
    println!("  state      {}", shown(l.state.as_str()));
    println!(
        "  owner      {}",
        shown(l.owner_username.as_deref().unwrap_or("-"))
    );
    println!("  nodes      {} / links {}", l.node_count, l.link_count);
    println!(
        "  first seen {}",
        r.first_seen_at.format("%Y-%m-%d %H:%M:%S UTC")
    );
    println!(
        "  changed    {} (revision {})",
        r.last_changed_at.format("%Y-%m-%d %H:%M:%S UTC"),
        r.revision
    );
    if !r.history.is_empty() {
        println!("history, newest first:");
        for h in r.history.iter().rev() {
            println!(
                "  {} {}",
                h.at.format("%Y-%m-%d %H:%M:%S UTC"),
                shown(&format!("{:?}", h.event))
            );
        }
    }
    if !d.audit.is_empty() {
        println!("audit, newest first:");
        for a in &d.audit {
            println!(
                "  {} {} {} {} {}",
                a.at.format("%Y-%m-%d %H:%M:%S UTC"),
                shown(&a.actor.to_string()),
                a.action.as_str(),
                shown(&a.outcome),
                shown(&a.detail)
            );
        }
    }
}

fn print_delete_request(r: &labsync_application::DeleteRequest) {
    println!(
        "{} {:<9} {}/{} by {} attempts={} created={}{}",
        r.id,
        r.status.as_str(),
        r.worker_id,
        r.lab_id,
        shown(&r.requested_by.to_string()),
        r.attempts,
        r.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
        r.last_error
            .as_deref()
            .map_or_else(String::new, |e| format!("\n    last error: {}", shown(e)))
    );
}

/// `workers enable|disable`: the same change as the console's toggle.
async fn set_enabled(app: &App, id: &WorkerId, enabled: bool) -> anyhow::Result<ExitCode> {
    let changes = WorkerChanges {
        enabled: Some(enabled),
        ..WorkerChanges::default()
    };
    app.inventory
        .update(id, changes, None, &cli_actor())
        .await?;
    println!(
        "worker {id} {}",
        if enabled {
            "enabled"
        } else {
            "disabled: refreshes skip it and deletes are refused"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `workers update`: only what is given changes.
async fn update_worker(app: &App, a: UpdateWorkerArgs) -> anyhow::Result<ExitCode> {
    let password = match &a.password_env {
        Some(var) => Some(SecretString::from(
            std::env::var(var)
                .ok()
                .filter(|p| !p.is_empty())
                .with_context(|| format!("environment variable {var} is not set or empty"))?,
        )),
        None => None,
    };
    let ca_cert_pem = match (&a.ca_cert, a.system_roots) {
        (Some(path), _) => {
            Some(Some(std::fs::read_to_string(path).with_context(|| {
                format!("reading CA bundle {}", path.display())
            })?))
        }
        (None, true) => Some(None),
        (None, false) => None,
    };
    let changes = WorkerChanges {
        name: a.name,
        base_url: a
            .url
            .as_deref()
            .map(BaseUrl::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!(e))?,
        username: a.username,
        ca_cert_pem,
        insecure: a.insecure,
        allow_http: a.allow_http,
        enabled: None,
        lab_tiles: a.lab_tiles,
    };
    let updated = app
        .inventory
        .update(&a.id, changes, password, &cli_actor())
        .await?;
    println!(
        "updated worker {} at {}",
        updated.worker.id,
        shown(updated.worker.base_url.as_str())
    );
    Ok(ExitCode::SUCCESS)
}

async fn add_worker(app: &App, a: AddWorkerArgs) -> anyhow::Result<ExitCode> {
    let base_url = BaseUrl::parse(&a.url).map_err(|e| anyhow::anyhow!(e))?;
    let password = std::env::var(&a.password_env)
        .ok()
        .filter(|p| !p.is_empty())
        .with_context(|| {
            format!(
                "environment variable {} is not set or empty",
                a.password_env
            )
        })?;
    let ca_cert_pem = match &a.ca_cert {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading CA bundle {}", path.display()))?,
        ),
        None => None,
    };
    let tls = TlsSettings::from_parts(ca_cert_pem, a.insecure, a.allow_http).map_err(|e| {
        anyhow::anyhow!(
            "{e} ({})",
            a.ca_cert
                .as_deref()
                .map_or_else(String::new, |p| p.display().to_string())
        )
    })?;
    let mut worker = Worker::new(
        a.id.clone(),
        a.name.unwrap_or_else(|| a.id.to_string()),
        base_url,
        a.username,
        tls,
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    worker.enabled = !a.disabled;
    worker.lab_tiles = a.lab_tiles;
    app.inventory
        .register(worker.clone(), SecretString::from(password), &cli_actor())
        .await?;
    println!(
        "registered worker {} at {}",
        worker.id,
        shown(worker.base_url.as_str())
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVIL: &str = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{1b}[31mEVIL TITLE\r\n\u{202e}txt.exe";

    #[test]
    fn shown_text_has_no_control_or_bidi_character_and_says_what_was_there() {
        let s = shown(EVIL);
        assert_eq!(
            s,
            "\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{1b}[31mEVIL TITLE\\u{d}\\u{a}\\u{202e}txt.exe"
        );
        assert!(matches!(
            shown("Lab 1 · café"),
            std::borrow::Cow::Borrowed("Lab 1 · café")
        ));
    }

    #[test]
    fn report_lines_escape_what_a_run_report_carries() {
        let mut r: RunReport = serde_json::from_value(serde_json::json!({
            "run_id": "r", "worker_id": "cml-1", "trigger": "cli", "status": "failed",
            "dry_run": false, "force_prune": false,
            "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:00Z",
            "duration_ms": 1, "listed": 0, "created": 0, "updated": 0, "unchanged": 0,
            "pruned": 0, "held": 0, "failed": 0, "suppressed": 0,
            "hold_reason": null, "skip_reason": null, "error": null, "failures": [],
        }))
        .unwrap();
        r.error = Some(EVIL.into());
        r.hold_reason = Some(EVIL.into());
        r.note = Some(EVIL.into());
        let line = report_line(&r);
        assert_eq!(line.matches("EVIL TITLE").count(), 3, "{line}");
        assert!(
            !line
                .chars()
                .any(|c| c != '\n' && shown(&c.to_string()) != c.to_string()),
            "{line:?}"
        );
        assert_eq!(line.lines().count(), 4, "one line per text: {line}");
    }
}
