//! The response body on its way to the client: [`RespStream`] streams the
//! upstream's body and ends the client connection without a clean end when
//! the bytes cannot match what the head promised (invariant 9). The
//! request side is the upstream's (`upstream::body`).

use super::AccessRecord;
use crate::stall::Progress;
use crate::upstream::client::Lease;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

pub use crate::upstream::body::{ClientBodyError, ReqBody, Upload, Watch};

/// Why a response body was cut short on its way to the client.
#[derive(Debug, thiserror::Error)]
pub enum RespBodyError {
    #[error("upstream body failed: {0}")]
    Upstream(#[source] hyper::Error),
    #[error("upstream sent no body bytes for {}", humantime::format_duration(*.0))]
    Stalled(Duration),
    #[error("upstream body ended after {got} of the {promised} bytes its Content-Length promised")]
    Short { promised: u64, got: u64 },
    #[error("upstream body is longer than the {promised} bytes its Content-Length promised")]
    Long { promised: u64 },
}

impl RespBodyError {
    fn reason(&self) -> &'static str {
        match self {
            RespBodyError::Upstream(_) => "upstream-error",
            RespBodyError::Stalled(_) => "upstream-stall",
            RespBodyError::Short { .. } => "upstream-short",
            RespBodyError::Long { .. } => "upstream-long",
        }
    }
}

/// The upstream's response body, streamed through unchanged. It counts
/// bytes against the promised length, ends the exchange when the upstream
/// stalls, and writes the access-log line when it ends (or is dropped
/// unfinished: the client went away).
pub struct RespStream {
    inner: Incoming,
    bytes: u64,
    /// The `Content-Length` sent to the client, when there is a body.
    promised: Option<u64>,
    progress: Progress,
    /// Counts a stall in the listener's metrics.
    proxy: Arc<super::proxy::Proxy>,
    record: Option<Box<AccessRecord>>,
    failed: bool,
    /// The upstream connection (HTTP/1) or stream's place (HTTP/2),
    /// released when the body is dropped.
    lease: Lease,
    /// The upstream's body was read to its end.
    ended: bool,
}

impl RespStream {
    pub fn new(
        inner: Incoming,
        promised: Option<u64>,
        timeout: Duration,
        proxy: Arc<super::proxy::Proxy>,
        record: Option<Box<AccessRecord>>,
        lease: Lease,
    ) -> Self {
        RespStream {
            inner,
            bytes: 0,
            promised,
            progress: Progress::new(timeout),
            proxy,
            record,
            failed: false,
            lease,
            ended: false,
        }
    }

    fn fail(&mut self, e: RespBodyError) -> Poll<Option<Result<Frame<Bytes>, RespBodyError>>> {
        self.failed = true;
        if let RespBodyError::Stalled(_) = e {
            self.proxy.count_upstream_stall();
        }
        let record = self.record.take();
        tracing::warn!(
            listener = %self.proxy.listener,
            upstream = record.as_ref().map_or("", |r| r.upstream.as_str()),
            bytes = self.bytes,
            error = %e,
            "response cut: the client connection is closed without a clean end"
        );
        if let Some(r) = record {
            r.emit(self.bytes, Some(e.reason()));
        }
        Poll::Ready(Some(Err(e)))
    }

    fn finish(&mut self) {
        self.ended = true;
        if let Some(r) = self.record.take() {
            r.emit(self.bytes, None);
        }
    }
}

impl Body for RespStream {
    type Data = Bytes;
    type Error = RespBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RespBodyError>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                    this.progress.moved();
                    if let Some(promised) = this.promised {
                        if this.bytes > promised {
                            return this.fail(RespBodyError::Long { promised });
                        }
                    }
                }
                // hyper stops polling once a sized body says it has ended.
                if this.inner.is_end_stream() {
                    if let Some(promised) = this.promised.filter(|p| this.bytes < *p) {
                        return this.fail(RespBodyError::Short {
                            promised,
                            got: this.bytes,
                        });
                    }
                    this.finish();
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(None) => {
                if let Some(promised) = this.promised.filter(|p| this.bytes < *p) {
                    return this.fail(RespBodyError::Short {
                        promised,
                        got: this.bytes,
                    });
                }
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => this.fail(RespBodyError::Upstream(e)),
            Poll::Pending => match this.progress.poll_stalled(cx) {
                Poll::Ready(()) => {
                    let t = this.progress.timeout();
                    this.fail(RespBodyError::Stalled(t))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RespStream {
    fn drop(&mut self) {
        if let Some(r) = self.record.take() {
            r.emit(self.bytes, Some("client-gone"));
        }
        // A body with nothing to read (HEAD, 204, 304) is never polled.
        let whole = !self.failed && (self.ended || self.inner.is_end_stream());
        self.lease.release(whole);
    }
}
