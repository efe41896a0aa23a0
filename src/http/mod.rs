//! The `http` mode: hyper's HTTP/1 server on the client side, forwarding
//! through [`proxy::Proxy`].

pub mod body;
pub mod error;
pub mod first;
pub mod headers;
pub mod proxy;
pub mod route;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::HttpKeys;
use crate::listener::Drain;
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
    /// The whole request head, from the connection's start.
    header_timeout: std::time::Duration,
}

/// A client that sends its first byte after this long gets the rest of
/// `header_timeout` for its head, not a fresh one.
const FIRST_BYTE_SLACK: std::time::Duration = std::time::Duration::from_secs(1);

impl HttpServer {
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    pub fn new(cfg: &HttpKeys, proxy: Arc<Proxy>) -> Self {
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
            header_timeout: cfg.header_timeout,
        }
    }

    /// The client's first bytes (see [`first`]), within `header_timeout`:
    /// until they come, the connection's task holds only this wait.
    pub async fn first_bytes(&self, stream: &TcpStream, drain: &Drain) -> Option<first::First> {
        first::read(stream, drain, self.header_timeout).await
    }

    /// Serves one client connection to its end: after its current
    /// exchange once the drain has begun, at once at its deadline, and
    /// after the `CONNECT` tunnels it started. `first`: what the client
    /// sent first, which hyper reads first. `original`: an intercepted
    /// connection's destination, given to each of its requests.
    pub async fn serve(
        &self,
        stream: first::Prefixed<TcpStream>,
        first_waited: std::time::Duration,
        drain: &Arc<Drain>,
        original: Option<std::net::SocketAddr>,
    ) {
        // A slow first byte is not a fresh header timeout.
        let late = (first_waited >= FIRST_BYTE_SLACK).then(|| FirstHead {
            at: tokio::time::Instant::now() + self.header_timeout.saturating_sub(first_waited),
            seen: Arc::default(),
        });
        let routed = self.proxy.is_routed();
        let tunnels = routed.then(|| route::Tunnels::new(drain.clone()));
        let proxy = self.proxy.clone();
        let seen = FirstHead::marker(&late);
        let conn_tunnels = tunnels.clone();
        // hyper's own `service_fn`, no tower stack: a tower layer for the
        // response metrics (ServiceBuilder, and an adapter to hyper) moved
        // the request's few-KiB future into wrappers of its own and cost
        // about 1,100 instructions per request under callgrind (2 %);
        // `Proxy::handle` records the metrics itself.
        let svc =
            hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                FirstHead::mark(&seen);
                if let Some(dst) = original {
                    req.extensions_mut().insert(crate::allow::OriginalDst(dst));
                }
                // Only a CONNECT starts a tunnel.
                let tunnels = match &conn_tunnels {
                    Some(t) if req.method() == http::Method::CONNECT => Some(t.clone()),
                    _ => None,
                };
                let proxy = proxy.clone();
                async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, tunnels).await) }
            });
        let io = TokioIo::new(StallIo::new(stream, self.body_timeout));
        let conn = self.builder.serve_connection(io, svc);
        let done = if routed {
            // Boxed: a connection with upgrades would otherwise grow every
            // http-mode connection's task too.
            let conn = conn.with_upgrades();
            tokio::pin!(conn);
            Box::pin(within_first_head(
                drain.until_drained(conn.as_mut(), |c| c.graceful_shutdown()),
                late,
            ))
            .await
        } else {
            tokio::pin!(conn);
            within_first_head(
                drain.until_drained(conn.as_mut(), |c| c.graceful_shutdown()),
                late,
            )
            .await
        };
        if let Some(Err(e)) = done.flatten() {
            self.proxy.connection_error(&e);
        }
        if let Some(t) = tunnels {
            t.wait().await;
        }
    }
}

/// The first request head's deadline for a client whose first byte came
/// late. hyper's own header timer restarts for every head, keep-alive idle
/// included, so it keeps the whole `header_timeout`, and this covers the
/// first head only.
pub(crate) struct FirstHead {
    at: tokio::time::Instant,
    /// Set when hyper hands the service a request (its head is complete).
    seen: Arc<std::sync::atomic::AtomicBool>,
}

impl FirstHead {
    /// What a connection's service keeps to say that a head arrived.
    fn marker(late: &Option<FirstHead>) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        late.as_ref().map(|l| l.seen.clone())
    }

    /// Called by the service with each request (nothing for a client that
    /// was not late).
    fn mark(marker: &Option<Arc<std::sync::atomic::AtomicBool>>) {
        if let Some(s) = marker {
            s.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Runs `conn` to its end, unless `late` is set and no request head has
/// come by its deadline: the connection then closes (`None`).
async fn within_first_head<F: std::future::Future>(
    conn: F,
    late: Option<FirstHead>,
) -> Option<F::Output> {
    let Some(late) = late else {
        return Some(conn.await);
    };
    tokio::pin!(conn);
    tokio::select! {
        biased;
        r = &mut conn => return Some(r),
        _ = tokio::time::sleep_until(late.at) => {}
    }
    if late.seen.load(std::sync::atomic::Ordering::Relaxed) {
        Some(conn.await)
    } else {
        None
    }
}

impl crate::listener::Serve for HttpServer {
    async fn serve_connection(self: &Arc<Self>, stream: TcpStream, drain: &Arc<Drain>) {
        let Some(first) = self.first_bytes(&stream, drain).await else {
            return;
        };
        let waited = first.waited;
        let stream = first::Prefixed::new(first.bytes, stream);
        Box::pin(self.serve(stream, waited, drain, None)).await
    }
}
