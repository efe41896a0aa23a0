//! `CONNECT` as a raw tunnel: one upstream connection per CONNECT, dialed
//! through the forward listener's dialer, bytes copied exactly both ways,
//! a FIN in one direction passed on while the other keeps flowing.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
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
    /// No byte either way for this long ends the tunnel
    /// (`forward_defaults.idle_timeout`).
    pub idle_timeout: Duration,
}

/// Stamps the time of the last byte moved, for the idle watchdog.
struct Touch<S> {
    inner: S,
    last_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl<S> Touch<S> {
    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Touch<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Touch<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves once no byte has moved for `idle`.
async fn idle_for(last_ms: &AtomicU64, epoch: Instant, idle: Duration) {
    loop {
        let last = epoch + Duration::from_millis(last_ms.load(Ordering::Relaxed));
        let deadline = last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
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
        idle_timeout,
    } = t;
    let epoch = Instant::now();
    let last_ms = Arc::new(AtomicU64::new(0));
    let mut client = match on_upgrade.await {
        Ok(u) => Touch {
            inner: TokioIo::new(u),
            last_ms: last_ms.clone(),
            epoch,
        },
        Err(e) => {
            tracing::debug!(%target, error = %e, "CONNECT: the client left before the tunnel opened");
            stats.tunnel_failures.inc();
            return;
        }
    };
    let mut up = Touch {
        inner: upstream.stream,
        last_ms: last_ms.clone(),
        epoch,
    };
    stats.tunnels_active.inc();
    let copied = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut up) => Ok(r),
        _ = cut.cancelled() => Err("cut at the end of the drain"),
        _ = idle_for(&last_ms, epoch, idle_timeout) => Err("idle for idle_timeout"),
    };
    stats.tunnels_active.dec();
    match copied {
        Ok(Ok((to_up, to_client))) => {
            stats.tunnel_bytes_upstream.inc_by(to_up);
            stats.tunnel_bytes_client.inc_by(to_client);
            tracing::debug!(%target, local = %upstream.local, to_upstream = to_up, to_client, "CONNECT tunnel closed");
        }
        Ok(Err(e)) => {
            stats.tunnel_failures.inc();
            tracing::debug!(%target, local = %upstream.local, error = %e, "CONNECT tunnel ended with an error");
        }
        Err(why) => {
            stats.tunnel_closed_idle_or_cut.inc();
            tracing::debug!(%target, why, "CONNECT tunnel closed by loopmux");
        }
    }
    drop(in_flight);
    drop(lease);
}
