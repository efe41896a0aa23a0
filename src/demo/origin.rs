//! A small HTTP/1.1 origin server, in-process: the upstream for the demo,
//! the exhaustion lab and the tests. It counts the connections it accepts,
//! which is how the lab proves the cap held.
//!
//! Paths:
//! - `/echo`: the request body streamed back, with its framing.
//! - `/headers`: the request head as text (`name: value` lines).
//! - `/slow/<ms>`: answers after `ms` milliseconds.
//! - `/bytes/<n>`: `n` bytes in a chunked body.
//! - `/flaky`: drops the connection without answering when the request is
//!   not the first on its connection (an upstream that closed a keep-alive
//!   connection just as a request arrived).
//! - anything else: `200 ok`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
pub struct OriginStats {
    /// TCP connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections open now.
    pub active: AtomicUsize,
    /// Most connections open at once.
    pub peak_active: AtomicUsize,
    pub requests: AtomicU64,
    /// Requests that reached `/flaky` (answered or dropped).
    pub flaky_seen: AtomicU64,
    /// HTTP/2 connections accepted (a subset of `accepted`).
    pub h2_accepted: AtomicU64,
    /// Most requests in flight at once on one connection.
    pub peak_streams: AtomicUsize,
}

/// How an origin speaks: HTTP/1.1 by default; HTTP/2 by prior knowledge
/// (`h2`), or with TLS, whatever ALPN chose (h2 or http/1.1).
#[derive(Clone, Default)]
pub struct OriginOptions {
    pub h2: bool,
    /// SETTINGS_MAX_CONCURRENT_STREAMS for HTTP/2 connections.
    pub max_streams: Option<u32>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A running origin; stops when dropped.
pub struct Origin {
    pub addr: SocketAddr,
    pub stats: Arc<OriginStats>,
    stop: CancellationToken,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Debug, thiserror::Error)]
#[error("dropped on purpose")]
struct Dropped;

type OriginBody = Either<Either<Incoming, Full<Bytes>>, Chunks>;

/// `n` bytes of `x` in 16 KiB frames, with no length: sent chunked.
pub struct Chunks {
    left: usize,
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(16 * 1024);
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n])))))
    }
}

impl Origin {
    /// Binds `addr` (port 0 for any) and serves until dropped.
    ///
    /// # Errors
    /// When `addr` cannot be bound.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Origin> {
        Self::start_with(addr, OriginOptions::default()).await
    }

    /// Like [`start`](Self::start), speaking as `opts` says.
    ///
    /// # Errors
    /// When `addr` cannot be bound.
    pub async fn start_with(addr: SocketAddr, opts: OriginOptions) -> std::io::Result<Origin> {
        let listener = TcpListener::from_std(crate::listener::bind_addr(addr)?)?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(OriginStats::default());
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, stats.clone(), stop.clone(), opts));
        Ok(Origin { addr, stats, stop })
    }
}

/// Serves one connection over `io` in HTTP/1.1 or HTTP/2.
async fn serve<I>(io: I, h2: bool, opts: &OriginOptions, stats: Arc<OriginStats>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let on_conn = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let st = stats.clone();
    let svc = service_fn(move |req| {
        let n = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        st.peak_streams.fetch_max(n, Ordering::Relaxed);
        let in_flight = in_flight.clone();
        let fut = respond(req, st.clone(), on_conn.fetch_add(1, Ordering::Relaxed));
        async move {
            let r = fut.await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            r
        }
    });
    if h2 {
        stats.h2_accepted.fetch_add(1, Ordering::Relaxed);
        let mut b = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        b.max_concurrent_streams(opts.max_streams);
        let _ = b.serve_connection(TokioIo::new(io), svc).await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), svc)
            .await;
    }
}

async fn accept(
    listener: TcpListener,
    stats: Arc<OriginStats>,
    stop: CancellationToken,
    opts: OriginOptions,
) {
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => { tokio::time::sleep(Duration::from_millis(10)).await; continue } },
            _ = stop.cancelled() => return,
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let now = stats.active.fetch_add(1, Ordering::Relaxed) + 1;
        stats.peak_active.fetch_max(now, Ordering::Relaxed);
        let stats = stats.clone();
        let stop = stop.clone();
        let opts = opts.clone();
        tokio::spawn(async move {
            let conn = async {
                match &opts.tls {
                    None => serve(stream, opts.h2, &opts, stats.clone()).await,
                    Some(cfg) => {
                        let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg.clone())
                            .accept(stream)
                            .await
                        else {
                            return;
                        };
                        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                        serve(tls, h2, &opts, stats.clone()).await
                    }
                }
            };
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
            stats.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<OriginBody> {
    let mut r = Response::new(Either::Left(Either::Right(Full::new(body.into()))));
    *r.status_mut() = status;
    r
}

async fn respond(
    req: Request<Incoming>,
    stats: Arc<OriginStats>,
    nth_on_conn: u64,
) -> Result<Response<OriginBody>, Dropped> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    if path == "/echo" {
        let mut r = Response::new(Either::Left(Either::Left(req.into_body())));
        r.headers_mut()
            .insert("x-origin", http::HeaderValue::from_static("echo"));
        return Ok(r);
    }
    if path == "/headers" {
        let mut out = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
        for (k, v) in req.headers() {
            out.push_str(&format!(
                "{}: {}\n",
                k,
                String::from_utf8_lossy(v.as_bytes())
            ));
        }
        return Ok(text(StatusCode::OK, out));
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        let ms: u64 = ms.parse().unwrap_or(100);
        // Drain the body first so a POST can be slow too.
        let _ = req.into_body().collect().await;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Ok(text(StatusCode::OK, "slow ok\n"));
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0);
        return Ok(Response::new(Either::Right(Chunks { left: n })));
    }
    if path == "/flaky" {
        stats.flaky_seen.fetch_add(1, Ordering::Relaxed);
        if nth_on_conn > 0 {
            return Err(Dropped);
        }
        let _ = req.into_body().collect().await;
        return Ok(text(StatusCode::OK, "flaky ok\n"));
    }
    let _ = req.into_body().collect().await;
    Ok(text(StatusCode::OK, "ok\n"))
}
