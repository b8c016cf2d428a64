//! The demo app (`deploykit_demo_app::run`) built as a binary of this crate:
//! Cargo tells a package's tests and benches the path of that package's own
//! binaries only (`CARGO_BIN_EXE_e2e-demo-app`); the name differs from
//! `deploykit-demo-app` so the two files do not collide in `target/`.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    deploykit_demo_app::run()
}
