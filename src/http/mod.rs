//! The `http` mode: hyper's HTTP/1 server on the client side, forwarding
//! through [`proxy::Proxy`].

pub mod body;
pub mod error;
pub mod headers;
pub mod proxy;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::Watcher;
use tokio::net::TcpStream;

use crate::config::ListenerConfig;
use crate::stall::StallIo;
use body::RespStream;
use proxy::Proxy;

/// Response bodies: the upstream's, streamed, or loopmux's own text.
pub type RespBody = Either<RespStream, Full<Bytes>>;

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
    /// `cut`: why the response did not end cleanly (the client connection
    /// was closed without a clean end), or `None`.
    pub fn emit(&self, bytes: u64, cut: Option<&str>) {
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
            complete = cut.is_none(),
            cut = cut.unwrap_or(""),
            duration_ms = self.started.elapsed().as_secs_f64() * 1e3,
            upstream_conn = conn,
            "access"
        );
    }
}

/// Per-listener HTTP server settings, built once.
pub struct HttpServer {
    builder: hyper::server::conn::http1::Builder,
    proxy: Arc<Proxy>,
    /// A client that takes no response bytes for this long is cut.
    body_timeout: std::time::Duration,
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
        HttpServer {
            builder,
            proxy,
            body_timeout: cfg.body_timeout,
        }
    }

    /// Serves one client connection to its end.
    pub async fn serve(&self, stream: TcpStream, watcher: Watcher) {
        let proxy = self.proxy.clone();
        // hyper's own `service_fn`, no tower stack: a tower layer for the
        // response metrics (ServiceBuilder, and an adapter to hyper) moved
        // the request's few-KiB future into wrappers of its own and cost
        // about 1,100 instructions per request under callgrind (2 %);
        // `Proxy::handle` records the metrics itself.
        let svc = hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(req).await) }
        });
        let io = TokioIo::new(StallIo::new(stream, self.body_timeout));
        let conn = self.builder.serve_connection(io, svc);
        if let Err(e) = watcher.watch(conn).await {
            self.proxy.connection_error(&e);
        }
    }
}
