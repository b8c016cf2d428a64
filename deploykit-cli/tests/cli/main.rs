//! The `deploykit` binary, end to end: configuration errors, every command
//! on simulated and on local instances, lock contention, notifications,
//! and the crash matrix (the CLI killed after every journal record).

mod commands;
mod config;
mod crash;
mod haproxy;
mod nginx;
mod notify;
mod util;
