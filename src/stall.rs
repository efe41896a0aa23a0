//! Stall detection: a peer that moves no bytes for a configured time ends
//! its exchange (DESIGN invariant 7). Two shapes of the same rule:
//! [`Progress`] for bodies (polled frame by frame) and [`StallIo`] for a
//! socket whose peer stops reading (the writer is then never polled by its
//! body, so only the socket can tell).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The marker inside the `io::Error` (kind `TimedOut`) that [`StallIo`]
/// returns, so that callers can tell a stall from other failures through
/// hyper's error chain (see [`is_stall`]).
#[derive(Debug, thiserror::Error)]
#[error("peer took no bytes for {}", humantime::format_duration(*.0))]
pub struct Stalled(pub Duration);

/// Whether `e`, or any error in its source chain, is a [`Stalled`].
pub fn is_stall(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<Stalled>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<Stalled>()) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// The deadline of one body. The clock is read only when the peer first
/// makes us wait after moving bytes (not per frame), and the timer is
/// created only then and reset only when it fires early: a body that
/// never waits costs neither.
pub struct Progress {
    timeout: Duration,
    /// When the current wait began: the last moment bytes had moved.
    since: Option<Instant>,
    moved: bool,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Progress {
    pub fn new(timeout: Duration) -> Self {
        Progress {
            timeout,
            since: None,
            moved: false,
            sleep: None,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Bytes moved: the deadline starts again at the next wait.
    pub fn moved(&mut self) {
        self.moved = true;
    }

    /// Call while the peer is pending. Ready once nothing has moved for the
    /// timeout; registers the waker otherwise.
    pub fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let since = match self.since {
            Some(t) if !self.moved => t,
            _ => {
                let now = Instant::now();
                self.since = Some(now);
                self.moved = false;
                now
            }
        };
        let deadline = since + self.timeout;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() < deadline {
            sleep.as_mut().reset(deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A socket whose writes fail with [`Stalled`] once the peer has taken no
/// bytes for `timeout` while we had bytes to send. Reads pass through: an
/// idle keep-alive connection is not stalled, and body reads have their
/// own [`Progress`]. Nothing is timed until a write is pending.
pub struct StallIo<S> {
    inner: S,
    timeout: Duration,
    /// Armed while a write is pending; `None` after any write progress.
    pending: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<S> StallIo<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        StallIo {
            inner,
            timeout,
            pending: None,
            armed: false,
        }
    }

    /// `moved`: whether a Ready result means bytes went out (a write) or
    /// not (a flush, which must not restart the deadline).
    fn on_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
        moved: bool,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(r) => {
                if moved {
                    self.armed = false;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let deadline = Instant::now() + self.timeout;
                let sleep = match &mut self.pending {
                    Some(s) => {
                        if !self.armed {
                            s.as_mut().reset(deadline);
                        }
                        s
                    }
                    None => self
                        .pending
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                self.armed = true;
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.armed = false;
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            Stalled(self.timeout),
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.on_write(cx, polled, true)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.on_write(cx, polled, true)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.on_write(cx, polled, false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_fails_the_write_after_the_timeout() {
        let (a, _b) = tokio::io::duplex(1024);
        let mut io = StallIo::new(a, Duration::from_secs(5));
        // Fills the pipe, then waits for a reader that never comes.
        let err = io.write_all(&[0u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(is_stall(&err));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_not_a_stall() {
        let (a, mut b) = tokio::io::duplex(16);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut total = 0;
            while total < 256 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                total += tokio::io::AsyncReadExt::read(&mut b, &mut buf)
                    .await
                    .unwrap();
            }
        });
        let mut io = StallIo::new(a, Duration::from_secs(5));
        // 256 bytes at 16 per 3 s: 48 s in all, never 5 s without progress.
        io.write_all(&[0u8; 256]).await.unwrap();
        reader.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn progress_fires_only_after_a_quiet_timeout() {
        let mut p = Progress::new(Duration::from_secs(5));
        let waited = Instant::now();
        // Waits 4 s, then bytes move: the deadline starts again.
        let first = tokio::time::timeout(
            Duration::from_secs(4),
            std::future::poll_fn(|cx| p.poll_stalled(cx)),
        )
        .await;
        assert!(first.is_err());
        p.moved();
        std::future::poll_fn(|cx| p.poll_stalled(cx)).await;
        assert_eq!(waited.elapsed(), Duration::from_secs(9));
    }
}
