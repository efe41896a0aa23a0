//! The `http` mode: hyper's HTTP/1 server on the client side, forwarding
//! through [`proxy::Proxy`].

pub mod error;
pub mod headers;
pub mod proxy;

use std::convert::Infallible;
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
pub type RespBody = Either<Incoming, Full<Bytes>>;

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
