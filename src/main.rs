//! The `labsync` binary: command-line parsing and wiring, nothing else.
//! Behaviour lives in the application layer; adapters in infrastructure.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use labsync_infrastructure::configuration::Settings;
use labsync_infrastructure::telemetry;

/// Keeps the inventory of labs on a fleet of Cisco Modeling Labs servers in
/// MongoDB.
///
/// Configuration: config/default.toml (built in), the file named by
/// LABSYNC_CONFIG, then LABSYNC__SECTION__KEY environment variables.
#[derive(Debug, Parser)]
#[command(name = "labsync", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Loads and checks the configuration, then prints it with secrets redacted.
    Config,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("labsync: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings.log, std::io::stderr);
    match cli.command {
        Command::Config => {
            println!("{settings:#?}");
            ExitCode::SUCCESS
        }
    }
}
