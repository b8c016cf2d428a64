//! The `deploykit` command-line tool: parses arguments, wires library
//! objects together, runs, and maps the outcome to an exit code — in one
//! place.

#![forbid(unsafe_code)]

mod demo;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit codes, documented in the README.
pub(crate) mod exit {
    /// The deployment succeeded.
    pub(crate) const SUCCESS: u8 = 0;
    /// The deployment failed and was rolled back cleanly (or finished
    /// degraded, within its failure budget).
    pub(crate) const FAILED_ROLLED_BACK: u8 = 1;
    /// Bad input or configuration; nothing was touched.
    pub(crate) const BAD_INPUT: u8 = 2;
    /// Rollback failed or the fleet is in an unknown state.
    pub(crate) const UNKNOWN_STATE: u8 = 3;
}

/// Zero-downtime deployments: rolling, blue-green, canary and recreate.
#[derive(Debug, Parser)]
#[command(name = "deploykit", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a full deployment on a simulated fleet, with progress.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match try_main(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("deploykit: error: {err:#}");
            let code = match err.downcast_ref::<deploykit::Error>() {
                Some(e) if e.is_invalid_input() => exit::BAD_INPUT,
                _ => exit::UNKNOWN_STATE,
            };
            ExitCode::from(code)
        }
    }
}

fn try_main(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Demo(args) => demo::run(args),
    }
}
