//! Carries bytes between a client and an upstream connection, both ways,
//! exactly: a FIN one way is passed on while the other way keeps flowing,
//! backpressure holds (a side that does not read stops the other's reads),
//! and the relay ends when both ways have ended, on an error, after
//! `idle_timeout` without a byte either way, or when `cut` fires (a drain's
//! deadline). Shared by `tcp` listeners and forward-mode CONNECT tunnels.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::RawStats;

/// Counts the bytes read from a side and stamps the time of the last byte
/// moved either way, for the idle watchdog.
struct Touch<S> {
    inner: S,
    read: u64,
    last_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl<S> Touch<S> {
    fn new(inner: S, last_ms: Arc<AtomicU64>, epoch: Instant) -> Self {
        Touch {
            inner,
            read: 0,
            last_ms,
            epoch,
        }
    }

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
        let n = buf.filled().len() - before;
        if matches!(r, Poll::Ready(Ok(()))) && n > 0 {
            self.read += n as u64;
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

/// Per direction, allocated for each relay's life: tokio's default (8
/// KiB) made an HTTP/2 frame of every 8 KiB and held one tunnelled stream
/// to 0.38 GiB/s; 16 KiB (a TLS record) gave 0.56, and 32 or 64 KiB no
/// more than the bench's noise while costing 2-4x the memory per
/// connection.
const COPY_BUF: usize = 16 * 1024;

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

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both ways ended with a FIN.
    Closed,
    /// A read or write failed (a reset, a broken pipe).
    Error(io::Error),
    /// No byte either way for `idle_timeout`.
    Idle,
    /// The drain's deadline.
    Cut,
}

/// What a relay carried, and how it ended.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes read from the client (and so sent on, unless the relay ended
    /// in between).
    pub to_upstream: u64,
    pub to_client: u64,
    pub end: End,
}

/// Relays until one of the ends in [`End`]; records the result in `stats`.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    idle_timeout: Duration,
    cut: &CancellationToken,
    stats: &RawStats,
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last_ms = Arc::new(AtomicU64::new(0));
    let mut c = Touch::new(client, last_ms.clone(), epoch);
    let mut u = Touch::new(upstream, last_ms.clone(), epoch);
    stats.active.inc();
    let end = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, COPY_BUF, COPY_BUF) => match r {
            Ok(_) => End::Closed,
            Err(e) => End::Error(e),
        },
        _ = cut.cancelled() => End::Cut,
        _ = idle_for(&last_ms, epoch, idle_timeout) => End::Idle,
    };
    stats.active.dec();
    stats.bytes_upstream.inc_by(c.read);
    stats.bytes_client.inc_by(u.read);
    match end {
        End::Closed => {}
        End::Error(_) => {
            stats.errors.inc();
        }
        End::Idle | End::Cut => {
            stats.closed_by_loopmux.inc();
        }
    }
    Relayed {
        to_upstream: c.read,
        to_client: u.read,
        end,
    }
}
