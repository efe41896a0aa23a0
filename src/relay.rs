//! Carries bytes between a client and an upstream connection, both ways,
//! exactly: a FIN one way is passed on while the other way keeps flowing,
//! backpressure holds (a side that does not read stops the other's reads),
//! and the relay ends when both ways have ended, on an error, after
//! `idle_timeout` without a byte either way, or when `cut` fires (a drain's
//! deadline). Shared by every raw relay: `tcp` and `tunnel` listeners,
//! forward-mode CONNECT, intercepted opaque connections and the serve
//! role's streams. It counts through [`Counters`], which the metrics layer
//! implements, so it imports no metrics.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a relay reports: one open relay while it runs, then how it ended
/// and the bytes it carried each way.
pub trait Counters {
    fn started(&self);
    /// `to_upstream`: bytes read from the client; `to_client`: from the
    /// upstream.
    fn ended(&self, to_upstream: u64, to_client: u64, end: &End);
}

/// Counts the bytes read from a side and stamps the time of the last byte
/// moved either way, for the idle watchdog.
struct Touch<S> {
    inner: S,
    read: u64,
    last_ms: Arc<AtomicU64>,
    epoch: Instant,
    /// Set when this side's read ends (its FIN): the relay is half-closed.
    eof: Arc<std::sync::atomic::AtomicBool>,
}

impl<S> Touch<S> {
    fn new(
        inner: S,
        last_ms: Arc<AtomicU64>,
        epoch: Instant,
        eof: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Touch {
            inner,
            read: 0,
            last_ms,
            epoch,
            eof,
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
        if matches!(r, Poll::Ready(Ok(()))) {
            if n > 0 {
                self.read += n as u64;
                self.touch();
            } else if buf.remaining() > 0 {
                self.eof.store(true, Ordering::Relaxed);
            }
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

/// How long a relay may stay silent: `idle` both ways, and once one side
/// has sent its FIN at most `half_closed` (the listener's
/// `half_close_timeout`, HAProxy's `timeout client-fin` idea): a peer that
/// never passes a half-close on (tinyproxy, behind nghttpx) would
/// otherwise hold a relay whose client is long gone for `idle_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub idle: Duration,
    pub half_closed: Duration,
}

/// Resolves once no byte has moved for `t.idle` (for `t.half_closed` once
/// a side has ended).
async fn idle_for(
    last_ms: &AtomicU64,
    epoch: Instant,
    t: Timeouts,
    half_closed: &std::sync::atomic::AtomicBool,
) {
    let idle = t.idle;
    loop {
        let limit = if half_closed.load(Ordering::Relaxed) {
            idle.min(t.half_closed)
        } else {
            idle
        };
        let last = epoch + Duration::from_millis(last_ms.load(Ordering::Relaxed));
        let now = Instant::now();
        if now >= last + limit {
            return;
        }
        // Wakes at least every `half_closed`: a FIN since the last look
        // shortens the limit.
        tokio::time::sleep_until((last + limit).min(now + t.half_closed)).await;
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

/// Relays until one of the ends in [`End`]; reports to `stats`.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    timeouts: Timeouts,
    cut: &CancellationToken,
    stats: &impl Counters,
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last_ms = Arc::new(AtomicU64::new(0));
    let half_closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut c = Touch::new(client, last_ms.clone(), epoch, half_closed.clone());
    let mut u = Touch::new(upstream, last_ms.clone(), epoch, half_closed.clone());
    stats.started();
    let end = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, COPY_BUF, COPY_BUF) => match r {
            Ok(_) => End::Closed,
            Err(e) => End::Error(e),
        },
        _ = cut.cancelled() => End::Cut,
        _ = idle_for(&last_ms, epoch, timeouts, &half_closed) => End::Idle,
    };
    stats.ended(c.read, u.read, &end);
    Relayed {
        to_upstream: c.read,
        to_client: u.read,
        end,
    }
}

/// The one ending of every raw relay: [`relay`] to its end, then `ended`
/// with what it carried (the mode's log line, written in the mode so that
/// its fields and target stay its own), then `hold` dropped. `hold` is
/// what must last as long as the relay (in-flight counts, source leases,
/// a stream's place): taken here, it cannot be dropped early by a mode.
pub async fn to_end<C, U, H>(
    client: C,
    upstream: U,
    timeouts: Timeouts,
    cut: &CancellationToken,
    stats: &impl Counters,
    hold: H,
    ended: impl FnOnce(&Relayed),
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let r = relay(client, upstream, timeouts, cut, stats).await;
    ended(&r);
    drop(hold);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct NoCounts;

    impl Counters for NoCounts {
        fn started(&self) {}
        fn ended(&self, _: u64, _: u64, _: &End) {}
    }

    fn stats() -> NoCounts {
        NoCounts
    }

    fn timeouts(idle: u64, half_closed: u64) -> Timeouts {
        Timeouts {
            idle: Duration::from_secs(idle),
            half_closed: Duration::from_secs(half_closed),
        }
    }

    /// The client sends its request and its FIN; the upstream neither
    /// answers nor closes. The relay ends after half_close_timeout (the
    /// default 60 s, and a configured 5 s), not after the hour of
    /// idle_timeout.
    #[tokio::test(start_paused = true)]
    async fn a_half_closed_relay_ends_after_the_half_closed_limit() {
        for half in [60, 5] {
            half_closed_relay_ends_after(half).await;
        }
    }

    async fn half_closed_relay_ends_after(half: u64) {
        let limit = Duration::from_secs(half);
        let (client, mut app) = tokio::io::duplex(1024);
        let (upstream, mut server) = tokio::io::duplex(1024);
        app.write_all(b"request").await.unwrap();
        app.shutdown().await.unwrap();
        let started = Instant::now();
        let relay = tokio::spawn(async move {
            let cut = CancellationToken::new();
            relay(client, upstream, timeouts(3600, half), &cut, &stats()).await
        });
        let mut got = [0u8; 7];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"request");
        let r = relay.await.unwrap();
        assert!(matches!(r.end, End::Idle), "{:?}", r.end);
        let took = started.elapsed();
        assert!(took >= limit && took < limit * 2, "ended after {took:?}");
        drop(server);
    }

    /// `ended` sees what the relay carried while `hold` still stands;
    /// `hold` goes only after it.
    #[tokio::test]
    async fn to_end_logs_then_lets_go() {
        struct Hold(Arc<std::sync::Mutex<Vec<&'static str>>>);
        impl Drop for Hold {
            fn drop(&mut self) {
                self.0.lock().unwrap().push("dropped");
            }
        }
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (client, mut app) = tokio::io::duplex(1024);
        let (upstream, mut server) = tokio::io::duplex(1024);
        app.write_all(b"ping").await.unwrap();
        app.shutdown().await.unwrap();
        server.write_all(b"pong!").await.unwrap();
        server.shutdown().await.unwrap();
        let cut = CancellationToken::new();
        let (hold, log) = (Hold(seen.clone()), seen.clone());
        to_end(
            client,
            upstream,
            timeouts(60, 60),
            &cut,
            &stats(),
            hold,
            |r| {
                assert!(matches!(r.end, End::Closed), "{:?}", r.end);
                assert_eq!((r.to_upstream, r.to_client), (4, 5));
                log.lock().unwrap().push("ended");
            },
        )
        .await;
        assert_eq!(*seen.lock().unwrap(), ["ended", "dropped"]);
    }

    /// Both directions open and silent: idle_timeout applies, not the
    /// half-closed limit.
    #[tokio::test(start_paused = true)]
    async fn an_open_silent_relay_waits_for_idle_timeout() {
        let (client, _app) = tokio::io::duplex(1024);
        let (upstream, _server) = tokio::io::duplex(1024);
        let started = Instant::now();
        let cut = CancellationToken::new();
        let r = relay(client, upstream, timeouts(300, 60), &cut, &stats()).await;
        assert!(matches!(r.end, End::Idle));
        assert!(started.elapsed() >= Duration::from_secs(300));
    }
}
