//! `CONNECT` as a raw tunnel: one upstream connection per CONNECT, dialed
//! through the forward listener's dialer, bytes copied exactly both ways,
//! a FIN in one direction passed on while the other keeps flowing.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::metrics::RawStats;
use crate::relay::Timeouts;
use crate::upstream::RawConn;

/// A tunnel whose `200` is on its way to the client: the client side's
/// upgrade, and the upstream connection already open.
pub struct PendingTunnel {
    pub on_upgrade: OnUpgrade,
    /// Holds the origin busy (its endpoint's in-flight count) while open.
    pub upstream: RawConn,
    pub target: String,
    /// No byte either way for `idle` ends the tunnel
    /// (`forward_defaults.idle_timeout`); after one side's FIN,
    /// `half_closed` (the listener's `half_close_timeout`).
    pub timeouts: Timeouts,
}

/// Runs the tunnel to its end: both directions closed, an error, idle
/// past its timeouts, or `cut` (the drain's deadline).
pub async fn run(t: PendingTunnel, cut: CancellationToken, stats: &RawStats) {
    let PendingTunnel {
        on_upgrade,
        upstream,
        target,
        timeouts,
    } = t;
    let client = match on_upgrade.await {
        Ok(u) => TokioIo::new(u),
        Err(e) => {
            tracing::debug!(%target, error = %e, "CONNECT: the client left before the tunnel opened");
            stats.errors.inc();
            return;
        }
    };
    let RawConn {
        stream,
        local,
        in_flight,
        lease,
        ..
    } = upstream;
    crate::relay::to_end(client, stream, timeouts, &cut, stats, (in_flight, lease), |r| {
        tracing::debug!(%target, %local, to_upstream = r.to_upstream, to_client = r.to_client, end = ?r.end, "CONNECT tunnel ended");
    })
    .await;
}
