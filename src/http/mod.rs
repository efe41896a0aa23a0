//! The `http` mode: hyper's HTTP/1 server on the client side, forwarding
//! through [`proxy::Proxy`].

pub mod error;
pub mod headers;
pub mod proxy;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::Watcher;
use tokio::net::TcpStream;

use crate::config::ListenerConfig;
use proxy::Proxy;

/// Response bodies: the upstream's, streamed, or loopmux's own error text.
pub type RespBody = Either<Metered<Incoming>, Full<Bytes>>;

/// What one access-log line says. Built only when the listener has
/// `access_log = true`.
pub struct AccessRecord {
    pub listener: Arc<str>,
    pub upstream: String,
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    /// Whether the upstream connection was reused; `None` when loopmux
    /// answered itself.
    pub reused: Option<bool>,
    pub started: tokio::time::Instant,
}

impl AccessRecord {
    pub fn emit(&self, bytes: u64, complete: bool) {
        let conn = match self.reused {
            Some(true) => "reused",
            Some(false) => "new",
            None => "none",
        };
        tracing::info!(
            target: "loopmux::access",
            listener = %self.listener,
            upstream = %self.upstream,
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes,
            complete,
            duration_ms = self.started.elapsed().as_secs_f64() * 1e3,
            upstream_conn = conn,
            "access"
        );
    }
}

pin_project_lite::pin_project! {
    /// The upstream's response body, streamed through unchanged; counts its
    /// bytes and writes the access-log line when it ends (or is dropped
    /// unfinished).
    pub struct Metered<B> {
        #[pin]
        inner: B,
        bytes: u64,
        record: Option<Box<AccessRecord>>,
    }

    impl<B> PinnedDrop for Metered<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(r) = this.record.take() {
                r.emit(*this.bytes, false);
            }
        }
    }
}

impl<B> Metered<B> {
    pub fn new(inner: B, record: Option<Box<AccessRecord>>) -> Self {
        Metered {
            inner,
            bytes: 0,
            record,
        }
    }
}

impl<B: hyper::body::Body<Data = Bytes>> hyper::body::Body for Metered<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    *this.bytes += d.len() as u64;
                }
                // hyper stops polling once a sized body says it has ended.
                if this.inner.is_end_stream() {
                    if let Some(r) = this.record.take() {
                        r.emit(*this.bytes, true);
                    }
                }
            }
            std::task::Poll::Ready(None) => {
                if let Some(r) = this.record.take() {
                    r.emit(*this.bytes, true);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Per-listener HTTP server settings, built once.
pub struct HttpServer {
    builder: hyper::server::conn::http1::Builder,
    proxy: Arc<Proxy>,
}

impl HttpServer {
    pub fn new(cfg: &ListenerConfig, proxy: Arc<Proxy>) -> Self {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            // A client that never finishes its headers is cut (slowloris).
            .header_read_timeout(cfg.header_timeout)
            // Over this, hyper answers 431 itself.
            .max_header_size(cfg.max_header_bytes)
            // false: every response says `Connection: close` and loopmux
            // closes first, so TIME_WAIT lands on loopmux's side of loopback.
            .keep_alive(cfg.client_keepalive);
        HttpServer { builder, proxy }
    }

    /// Serves one client connection to its end.
    pub async fn serve(&self, stream: TcpStream, watcher: Watcher) {
        let proxy = self.proxy.clone();
        let svc = service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req).await) }
        });
        let conn = self.builder.serve_connection(TokioIo::new(stream), svc);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(error = %e, "client connection ended with an error");
        }
    }
}
