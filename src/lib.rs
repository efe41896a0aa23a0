//! loopmux: a local egress proxy that carries connection-per-request traffic
//! over a small, bounded set of long-lived upstream connections.
//!
//! See `DESIGN.md` in the shared folder for the contract between modules.

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod diagnose;
pub mod http;
pub mod listener;
pub mod load;
pub mod metrics;
pub mod origin;
pub mod shutdown;
pub mod stall;
pub mod state;
pub mod systemd;
pub mod upstream;
