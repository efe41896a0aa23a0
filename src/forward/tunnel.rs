//! `CONNECT` as a raw tunnel: one upstream connection per CONNECT, dialed
//! through the forward listener's dialer, bytes copied exactly both ways,
//! a FIN in one direction passed on while the other keeps flowing.

use std::sync::{Arc, Mutex};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::metrics::ForwardStats;
use crate::upstream::dialer::{Dialed, SourceLease};
use crate::upstream::InFlight;

/// A tunnel whose `200` is on its way to the client: the client side's
/// upgrade, and the upstream connection already open.
pub struct PendingTunnel {
    pub on_upgrade: OnUpgrade,
    pub upstream: Dialed,
    pub target: String,
    /// Keeps the origin (and its endpoint's in-flight count) busy.
    pub in_flight: InFlight,
    pub lease: Option<SourceLease>,
}

/// Carries a [`PendingTunnel`] from the request handler to the connection
/// that runs it (response extensions must be `Clone`).
#[derive(Clone)]
pub struct Handoff(pub Arc<Mutex<Option<PendingTunnel>>>);

impl Handoff {
    pub fn take(&self) -> Option<PendingTunnel> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Runs the tunnel to its end: both directions closed, an error, or `cut`
/// (the drain's deadline).
pub async fn run(t: PendingTunnel, cut: CancellationToken, stats: &ForwardStats) {
    let PendingTunnel {
        on_upgrade,
        upstream,
        target,
        in_flight,
        lease,
    } = t;
    let mut client = match on_upgrade.await {
        Ok(u) => TokioIo::new(u),
        Err(e) => {
            tracing::debug!(%target, error = %e, "CONNECT: the client left before the tunnel opened");
            stats.tunnel_failures.inc();
            return;
        }
    };
    let mut up = upstream.stream;
    stats.tunnels_active.inc();
    let copied = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut up) => Some(r),
        _ = cut.cancelled() => None,
    };
    stats.tunnels_active.dec();
    match copied {
        Some(Ok((to_up, to_client))) => {
            stats.tunnel_bytes_upstream.inc_by(to_up);
            stats.tunnel_bytes_client.inc_by(to_client);
            tracing::debug!(%target, local = %upstream.local, to_upstream = to_up, to_client, "CONNECT tunnel closed");
        }
        Some(Err(e)) => {
            stats.tunnel_failures.inc();
            tracing::debug!(%target, local = %upstream.local, error = %e, "CONNECT tunnel ended with an error");
        }
        None => {
            tracing::info!(%target, "CONNECT tunnel cut at the end of the drain");
        }
    }
    drop(in_flight);
    drop(lease);
}
