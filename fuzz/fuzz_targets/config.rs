//! `deploykit.toml` through the CLI's whole loading path.
#![no_main]

// The CLI has no library target: its sources are compiled here as a module,
// and its `crate::` paths resolve through these re-exports.
#[allow(dead_code, unused_imports, unreachable_pub)]
#[path = "../../deploykit-cli/src/main.rs"]
mod cli;
#[allow(unused_imports)]
use cli::*;

libfuzzer_sys::fuzz_target!(|data: &[u8]| cli::fuzzing::config(data));
