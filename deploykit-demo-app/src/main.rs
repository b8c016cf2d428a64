//! `deploykit-demo-app`: a small HTTP application for deploykit's
//! real-server tests, examples and benchmarks. See the `deploykit_demo_app`
//! library for routes and flags.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    deploykit_demo_app::run()
}
