//! Tests against real servers and processes: the demo app, nginx, HAProxy.
//! One test binary, a module per area; shared helpers in `harness`.
//!
//! Every server listens on 127.0.0.1 high ports, lives in a temp dir, and is
//! killed when its guard drops. A missing server binary fails the test, in
//! CI or not: `scripts/test` installs every server.

mod harness;

mod blue_green;
mod canary_flag;
mod chaos;
mod cli_dark_launch;
mod cli_experiment;
mod conformance;
mod demo_app;
mod drill;
mod experiment;
mod flag_rollout;
mod haproxy;
mod killed_canary;
mod load;
mod local;
mod nginx;
mod prometheus;
mod ramp_down;
mod regions;
mod routed;
mod routed_haproxy;
mod routing;
mod ssh;
mod sshd;
mod sticky_haproxy;
mod zero_downtime;
