//! The `labsync` binary: parses the command line, loads the configuration,
//! installs logging, and runs the command (see [`labsync::cli`]).

use std::process::ExitCode;

use clap::Parser;
use labsync::cli::{self, Cli, EXIT_FAILED, EXIT_USAGE};
use labsync_infrastructure::configuration::Settings;
use labsync_infrastructure::telemetry;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Completions and the manual need no configuration: a broken one must
    // not stop them.
    if let Some(code) = cli::without_configuration(&cli) {
        return code;
    }
    let settings = match Settings::load_with(cli.config.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("labsync: {}", cli::shown(&e.to_string()));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    telemetry::init(&settings.log, std::io::stderr);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("labsync: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(cli::run(cli, settings.clone())) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("labsync: {}", cli::shown(&cli::explain(&e, &settings)));
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
