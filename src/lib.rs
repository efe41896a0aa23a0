//! loopmux: a local egress proxy that carries connection-per-request traffic
//! over a small, bounded set of long-lived upstream connections.
//!
//! See `DESIGN.md` in the shared folder for the contract between modules.

pub mod admin;
pub mod allow;
pub mod app;
pub mod config;
pub mod diagnose;
pub mod forward;
pub mod http;
pub mod intercept;
pub mod listener;
pub mod metrics;
pub mod prefixed;
pub mod relay;
pub mod serve;
pub mod shutdown;
pub mod sockopt;
pub mod stall;
pub mod status;
pub mod systemd;
pub mod tcp;
pub mod tls;
pub mod upstream;

/// Not the proxy: the demo, with its origin server and load driver (also
/// used by the lab and the tests).
pub mod demo;
