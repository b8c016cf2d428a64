//! The `deploykit` binary, end to end: configuration errors, every command
//! on simulated, local and SSH instances and through real nginx and
//! HAProxy, lock contention, notifications, and the crash matrix (the CLI
//! killed after journal records, then resumed or rolled back).

mod canary_flag;
mod chaos;
mod commands;
mod config;
mod crash;
mod dashboard;
mod dashboard_browser;
mod etcd;
mod flags;
mod gitops;
mod haproxy;
#[cfg(feature = "kubernetes")]
mod kubernetes;
mod nginx;
mod notify;
mod refusals;
mod regions;
mod ssh;
mod stats;
mod top;
mod util;
