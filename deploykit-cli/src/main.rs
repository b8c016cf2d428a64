//! The `deploykit` command-line tool: parses arguments, wires library
//! objects together, runs, and maps the outcome to an exit code — in one
//! place.

#![forbid(unsafe_code)]

/// `println!` that never panics: stdout closed by the reader
/// (`deploykit status | head`) drops the rest of the output, so a
/// read-only command ends quietly and a deployment never stops for it.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that never panics, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!($($arg)*))
    };
}

// The modules are `pub(crate)` so that the fuzz targets in `fuzz/`, which
// compile this file as a module of their own crate, reach them at `crate::`.
pub(crate) mod cmd;
pub(crate) mod config;
pub(crate) mod dashboard;
#[cfg(feature = "demo")]
pub(crate) mod demo;
pub(crate) mod flags;
#[cfg(any(test, fuzzing))]
pub(crate) mod fuzzing;
pub(crate) mod gitops;
pub(crate) mod gitops_webhook;
pub(crate) mod metrics_http;
pub(crate) mod notify;
pub(crate) mod ofrep;
pub(crate) mod output;
pub(crate) mod recommend;
pub(crate) mod sim;
#[cfg(test)]
mod sim_conformance;
pub(crate) mod sim_log;
pub(crate) mod stats;
pub(crate) mod top;
pub(crate) mod wire;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use deploykit::state::ControlCommand;

/// Exit codes, documented in the README and docs/cli.md.
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
    /// Another deployment holds the lock.
    pub(crate) const LOCKED: u8 = 4;
    /// A chaos entry's expectation did not hold (the gate did not fire, or
    /// not in time, or fired when it should not), or a drill's gate can
    /// never fire.
    pub(crate) const CHAOS_FAILED: u8 = 5;
}

/// Zero-downtime deployments: rolling, blue-green, canary and recreate.
///
/// Exit codes: 0 success; 1 the deployment failed and was rolled back
/// cleanly; 2 bad input or configuration (nothing touched); 3 rollback
/// failed or the fleet is in an unknown state; 4 another deployment holds
/// the lock; 5 a chaos expectation did not hold or a drill's gate can never
/// fire (`drill`, `deploy --drill`, or a deployment with chaos entries).
#[derive(Debug, Parser)]
#[command(name = "deploykit", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    global: cmd::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Deploy a release to the fleet of deploykit.toml (or --resume an
    /// interrupted deployment).
    Deploy(cmd::DeployArgs),
    /// A rollback drill: deploy the release the fleet runs (or RELEASE) as
    /// a canary, break it on purpose (the [[strategy.canary.chaos]]
    /// entries, or a kill of the canary), and check that the analysis fails
    /// and the rollback completes within budget (see docs/chaos.md). Exits
    /// 0 when every expectation holds, 5 when one does not or the gate can
    /// never fire.
    Drill(cmd::DrillArgs),
    /// Dry run: the exact steps, batch sizes and projected duration.
    /// Touches nothing.
    Plan(cmd::PlanArgs),
    /// What each instance runs, and any deployment in progress or
    /// interrupted.
    Status,
    /// Return the fleet to the releases it ran before the last deployment
    /// (`--region NAME` one region, `--all` every region).
    Rollback(cmd::RollbackArgs),
    /// Promote the canary stage waiting for a manual promotion (in another
    /// terminal or process).
    Promote,
    /// Abort the running deployment; it rolls back.
    Abort,
    /// Past deployments: id, strategy, release, outcome, duration, reason.
    History,
    /// DORA figures (deployment frequency, lead time, change failure rate,
    /// recovery time) and charts of the deployments in the journals.
    Stats(stats::StatsArgs),
    /// A Markdown post-mortem of a failed or rolled-back deployment:
    /// timeline, the decision and its values, recovery, instances.
    Postmortem(stats::PostmortemArgs),
    /// A live, read-only terminal view of the running deployment: stages,
    /// instances, weights, last analysis values; q quits.
    Top(top::TopArgs),
    /// Recommend a strategy (the decision tree and comparison table).
    Recommend(recommend::RecommendArgs),
    /// Check deploykit.toml without touching anything.
    Validate,
    /// Prepare and check the load balancer: create the nginx upstream
    /// include file if it is missing, then check the balancer can be driven
    /// (the check every deployment runs first). Touches no instance.
    Setup,
    /// Run a full deployment on a simulated in-memory fleet, with progress.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// Deploy on push: follow a git repository and deploy each new commit
    /// of a branch that a [[gitops.branches]] rule matches (docs/gitops.md).
    Watch(gitops::WatchArgs),
    /// Feature flags in a flagd flag file: list, get, set, validate,
    /// evaluate, kill, serve (OFREP). See docs/flags.md.
    Flags(flags::FlagsArgs),
    /// The web dashboard: deployments (live), fleet, history and flags;
    /// promote, abort and flag changes with the token (docs/dashboard.md).
    Dashboard(dashboard::DashboardArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn init_logging(g: &cmd::Global) {
    let level = match (g.quiet, g.verbose) {
        // kube logs each failed API request as an error, which the
        // Kubernetes driver's own error already carries to the user.
        (true, _) => "error,kube_client=off",
        // The executor's own warnings mirror events that the progress lines
        // (or the --json stream) already show; -v brings them back.
        (false, 0) => "warn,deploykit::executor=error,kube_client=off",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.global);
    match try_main(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("deploykit: error: {}", error_text(&err));
            ExitCode::from(error_code(&err))
        }
    }
}

/// `err` and its causes, each once: the library's errors already write
/// their source into their own message, so anyhow's `{:#}` would repeat
/// it (a host-key mismatch came out three times).
pub(crate) fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let s = cause.to_string();
        if text.contains(&s) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&s);
    }
    text
}

/// The exit code of an error: bad input and configuration are 2, anything
/// else (a fleet that could not be read, state that disagrees) is 3.
fn error_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<config::ConfigError>().is_some() {
        return exit::BAD_INPUT;
    }
    if let Some(e) = err.downcast_ref::<stats::StatsError>() {
        return e.code();
    }
    if let Some(e) = err.downcast_ref::<deploykit::flags::FlagError>() {
        return flags::error_code(e);
    }
    match err.downcast_ref::<deploykit::Error>() {
        Some(e) if e.is_invalid_input() => exit::BAD_INPUT,
        _ => exit::UNKNOWN_STATE,
    }
}

fn try_main(cli: Cli) -> anyhow::Result<u8> {
    let g = cli.global;
    match cli.command {
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(args, g.json),
        Command::Recommend(args) => recommend::run(args),
        Command::Validate => cmd::validate(g),
        Command::Flags(args) => flags::run(g, args),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "deploykit", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            Ok(exit::SUCCESS)
        }
        Command::Deploy(args) => cmd::deploy(cmd::Ctx::load(g)?, args),
        Command::Drill(args) => cmd::drill(cmd::Ctx::load(g)?, args),
        Command::Plan(args) => cmd::plan(cmd::Ctx::load(g)?, args),
        Command::Status => cmd::status(cmd::Ctx::load_read_only(g)?),
        Command::Rollback(args) => cmd::rollback_cmd(cmd::Ctx::load(g)?, args),
        Command::Promote => cmd::control(cmd::Ctx::load_one(g)?, ControlCommand::Promote),
        Command::Abort => cmd::control(cmd::Ctx::load_one(g)?, ControlCommand::Abort),
        Command::History => cmd::history(cmd::Ctx::load_one(g)?),
        Command::Top(args) => top::top(cmd::Ctx::load_one(g)?, args),
        Command::Stats(args) => stats::stats(cmd::Ctx::load_one(g)?, args),
        Command::Postmortem(args) => stats::postmortem(cmd::Ctx::load_one(g)?, args),
        Command::Setup => cmd::setup(cmd::Ctx::load_one(g)?),
        Command::Watch(args) => gitops::watch(g, args),
        Command::Dashboard(args) => dashboard::run(g, args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
