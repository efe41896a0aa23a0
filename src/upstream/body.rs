//! The request body on its way upstream: a small body is read whole
//! before a pooled connection is taken, so a slow or malformed upload
//! holds nothing (DESIGN invariant 7); a larger one streams, with a
//! deadline on client progress and a [`Watch`] that tells the proxy when
//! the upload ended and whose fault a failure was. Part of the way out, so
//! that the upstream side imports no mode.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::stall::Progress;

/// Why the client's request body could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// Bad framing (a chunk size that is not hex, a missing CRLF) or a
    /// client that went away mid-body.
    #[error("malformed or incomplete request body: {0}")]
    Read(#[source] hyper::Error),
    #[error("client sent no body bytes for {}", humantime::format_duration(*.0))]
    Stalled(Duration),
}

/// Where a streaming upload is; shared between the body (inside hyper's
/// client) and the proxy (which times the response from the upload's end
/// and blames the right side when the exchange fails).
#[derive(Default)]
pub struct Watch {
    state: AtomicU8,
    ended: Notify,
    /// Set by [`Watch::upstream_stall`] (HTTP/2 only): the zero of
    /// `upstream_turn`. Unset, the body records nothing.
    epoch: OnceLock<Instant>,
    /// Milliseconds after `epoch` since which the upstream has had a frame
    /// and not asked for the next, or [`CLIENT_TURN`] while the body waits
    /// for the client (whose stalls the body times itself).
    upstream_turn: AtomicU64,
}

const CLIENT_TURN: u64 = u64::MAX;

const RUNNING: u8 = 0;
const ENDED: u8 = 1;
const CLIENT_ERROR: u8 = 2;
const CLIENT_STALL: u8 = 3;

/// What a [`Watch`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    Running,
    Ended,
    ClientError,
    ClientStalled,
}

impl Watch {
    fn set(&self, state: u8) {
        if self
            .state
            .compare_exchange(RUNNING, state, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // A stored permit: the proxy may start waiting after this.
            self.ended.notify_one();
        }
    }

    pub fn upload(&self) -> Upload {
        match self.state.load(Ordering::Acquire) {
            RUNNING => Upload::Running,
            ENDED => Upload::Ended,
            CLIENT_ERROR => Upload::ClientError,
            _ => Upload::ClientStalled,
        }
    }

    /// Resolves when the upload has ended, one way or another.
    pub async fn finished(&self) {
        if self.upload() == Upload::Running {
            self.ended.notified().await;
        }
    }

    /// Resolves once the upstream has left this upload's next frame
    /// untaken for `timeout`. Over HTTP/2, flow control holds the frame
    /// (a window that never opens) with no socket write pending, so
    /// [`StallIo`](crate::stall::StallIo) sees nothing, and hyper stops
    /// polling the body, so its own deadline never runs. The clock starts
    /// when this is called, before the request is sent (the first frame
    /// waits for the window too); time spent waiting for the client does
    /// not count. Call it once per upload; the future is cancel-safe.
    pub fn upstream_stall(&self, timeout: Duration) -> impl Future<Output = ()> + '_ {
        let epoch = *self.epoch.get_or_init(Instant::now);
        async move {
            loop {
                let since = self.upstream_turn.load(Ordering::Relaxed);
                let wake = if since == CLIENT_TURN {
                    Instant::now() + timeout
                } else {
                    let deadline = epoch + Duration::from_millis(since) + timeout;
                    if Instant::now() >= deadline {
                        return;
                    }
                    deadline
                };
                tokio::time::sleep_until(wake).await;
            }
        }
    }

    /// The upstream's turn: it has a frame and must ask for the next.
    fn handed(&self) {
        if let Some(epoch) = self.epoch.get() {
            let ms = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(CLIENT_TURN - 1);
            self.upstream_turn.store(ms, Ordering::Relaxed);
        }
    }

    /// The client's turn: the body waits for its bytes.
    fn awaiting_client(&self) {
        if self.epoch.get().is_some() {
            self.upstream_turn.store(CLIENT_TURN, Ordering::Relaxed);
        }
    }
}

/// A request body on its way upstream.
pub struct ReqBody {
    kind: ReqKind,
}

enum ReqKind {
    Empty,
    /// Read whole before the upstream connection was taken.
    Full {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Stream(Box<Streaming>),
}

struct Streaming {
    /// What was read while deciding whether to buffer.
    prefix: Option<Bytes>,
    inner: Incoming,
    progress: Progress,
    watch: Arc<Watch>,
}

impl ReqBody {
    pub fn empty() -> Self {
        ReqBody {
            kind: ReqKind::Empty,
        }
    }

    /// A copy for a replay, when the body is in memory.
    pub fn try_clone(&self) -> Option<ReqBody> {
        let kind = match &self.kind {
            ReqKind::Empty => ReqKind::Empty,
            ReqKind::Full { data, trailers } => ReqKind::Full {
                data: data.clone(),
                trailers: trailers.clone(),
            },
            ReqKind::Stream(_) => return None,
        };
        Some(ReqBody { kind })
    }

    /// The upload's watch, for a streaming body.
    pub fn watch(&self) -> Option<Arc<Watch>> {
        match &self.kind {
            ReqKind::Stream(s) => Some(s.watch.clone()),
            _ => None,
        }
    }

    /// Reads up to `limit` bytes of `body`, each frame within `timeout`.
    /// A body that ends within the limit comes back whole; a longer one
    /// streams on, the bytes read so far first.
    ///
    /// # Errors
    /// The client's fault: bad framing, an aborted body, or a stall.
    pub async fn read(
        mut body: Incoming,
        limit: usize,
        timeout: Duration,
    ) -> Result<ReqBody, ClientBodyError> {
        if body.is_end_stream() {
            return Ok(ReqBody::empty());
        }
        let stream = |prefix: Option<Bytes>, inner: Incoming| ReqBody {
            kind: ReqKind::Stream(Box::new(Streaming {
                prefix,
                inner,
                progress: Progress::new(timeout),
                watch: Arc::default(),
            })),
        };
        if limit == 0 || body.size_hint().lower() > limit as u64 {
            return Ok(stream(None, body));
        }
        let mut first: Option<Bytes> = None;
        let mut more: Option<BytesMut> = None;
        let mut len = 0usize;
        let mut trailers = None;
        loop {
            let frame = match tokio::time::timeout(timeout, body.frame()).await {
                Err(_) => return Err(ClientBodyError::Stalled(timeout)),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(ClientBodyError::Read(e)),
                Ok(Some(Ok(f))) => f,
            };
            match frame.into_data() {
                Ok(d) => {
                    len += d.len();
                    // One chunk needs no copy; more are joined once.
                    match (&mut first, &mut more) {
                        (None, _) => first = Some(d),
                        (Some(f), None) => {
                            let mut m = BytesMut::with_capacity((f.len() + d.len()).max(4096));
                            m.extend_from_slice(f);
                            m.extend_from_slice(&d);
                            more = Some(m);
                        }
                        (Some(_), Some(m)) => m.extend_from_slice(&d),
                    }
                    if len > limit {
                        let prefix = match more {
                            Some(m) => m.freeze(),
                            None => first.unwrap_or_default(),
                        };
                        return Ok(stream(Some(prefix), body));
                    }
                }
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
            if body.is_end_stream() {
                break;
            }
        }
        let data = match more {
            Some(m) => Some(m.freeze()),
            None => first,
        };
        Ok(ReqBody {
            kind: ReqKind::Full { data, trailers },
        })
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match &mut self.kind {
            ReqKind::Empty => Poll::Ready(None),
            ReqKind::Full { data, trailers } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            ReqKind::Stream(s) => s.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ReqKind::Empty => true,
            ReqKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            ReqKind::Stream(s) => s.prefix.is_none() && s.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ReqKind::Empty => SizeHint::with_exact(0),
            ReqKind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ReqKind::Stream(s) => {
                let pre = s.prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = s.inner.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(inner.lower() + pre);
                if let Some(u) = inner.upper() {
                    h.set_upper(u + pre);
                }
                h
            }
        }
    }
}

impl Streaming {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        if let Some(p) = self.prefix.take() {
            self.progress.moved();
            self.watch.handed();
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                self.progress.moved();
                self.watch.handed();
                if self.inner.is_end_stream() {
                    self.watch.set(ENDED);
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(None) => {
                self.watch.set(ENDED);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.watch.set(CLIENT_ERROR);
                Poll::Ready(Some(Err(ClientBodyError::Read(e))))
            }
            Poll::Pending => {
                self.watch.awaiting_client();
                match self.progress.poll_stalled(cx) {
                    Poll::Ready(()) => {
                        self.watch.set(CLIENT_STALL);
                        Poll::Ready(Some(Err(ClientBodyError::Stalled(self.progress.timeout()))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    /// The upstream has the first frame from the start (a window of 0
    /// from the first byte): a stall `T` after the clock started.
    #[tokio::test(start_paused = true)]
    async fn a_frame_never_taken_is_a_stall_after_the_timeout() {
        let w = Watch::default();
        let began = Instant::now();
        w.upstream_stall(T).await;
        assert_eq!(began.elapsed(), T);
    }

    /// Frames taken every 3 s never make a 5 s stall; the last one left
    /// untaken does, 5 s after it was handed.
    #[tokio::test(start_paused = true)]
    async fn the_deadline_runs_from_the_last_frame_taken() {
        let w = Watch::default();
        let stall = w.upstream_stall(T);
        tokio::pin!(stall);
        for _ in 0..4 {
            let quiet = tokio::time::timeout(Duration::from_secs(3), stall.as_mut()).await;
            assert!(quiet.is_err(), "a stall while frames were taken");
            w.handed();
        }
        let last = Instant::now();
        stall.await;
        assert_eq!(last.elapsed(), T);
    }

    /// Waiting for the client is not the upstream's stall, however long;
    /// the upstream's turn starts again with the client's next frame.
    #[tokio::test(start_paused = true)]
    async fn time_waiting_for_the_client_does_not_count() {
        let w = Watch::default();
        let stall = w.upstream_stall(T);
        tokio::pin!(stall);
        w.handed();
        w.awaiting_client();
        let quiet = tokio::time::timeout(Duration::from_secs(60), stall.as_mut()).await;
        assert!(quiet.is_err(), "a stall while the client was slow");
        w.handed();
        let handed = Instant::now();
        stall.await;
        assert!(handed.elapsed() >= T && handed.elapsed() < T * 2);
    }

    /// On HTTP/1 (never armed) the body records nothing: no clock reads.
    #[test]
    fn an_unarmed_watch_records_nothing() {
        let w = Watch::default();
        w.handed();
        w.awaiting_client();
        assert!(w.epoch.get().is_none());
        assert_eq!(w.upstream_turn.load(Ordering::Relaxed), 0);
    }
}
