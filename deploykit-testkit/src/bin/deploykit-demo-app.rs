//! `deploykit-demo-app`: a small HTTP application for deploykit's
//! real-server tests, examples and benchmarks. See
//! `deploykit_testkit::demo_app` for routes and flags.

#![forbid(unsafe_code)]

use clap::Parser;
use deploykit_testkit::demo_app::{serve, DemoConfig};

fn main() -> std::process::ExitCode {
    let config = DemoConfig::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("deploykit-demo-app: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deploykit-demo-app: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
