//! The serve role (`[serve]`): the far end of `tunnel` mode. Terminates TLS
//! (mTLS unless explicitly allowed otherwise) in each connection's own
//! task, accepts HTTP/2 `CONNECT` streams, checks each target against the
//! allow list (the same matcher as forward mode), dials it through the
//! dialer and relays bytes. A denied target gets `403` on its stream, an
//! unreachable one `502`; the connection and its other streams carry on.
//!
//! Connections in their TLS handshake and connections past it are counted
//! apart (`max_handshakes`, `max_connections`): peers that never finish a
//! handshake cannot take the places of tunnel clients that did. Every
//! stage has an end: the handshake and the HTTP/2 preface within
//! `handshake_timeout`, a connection with no open stream within
//! `idle_timeout`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::allow::target::of_connect;
use crate::allow::Denial;
use crate::config::ServeConfig;
use crate::listener::{ClientLimit, Drain, LIMIT_WARN_EVERY};
use crate::metrics::ServeStats;
use crate::prefixed::Prefixed;
use crate::upstream::dialer::Dialer;
use crate::upstream::{raw, Veto, Vetoed};

/// What a client sends first on an HTTP/2 connection (RFC 9113 §3.4): the
/// magic, then a SETTINGS frame, of which we wait for the 9-byte header.
const PREFACE_MAGIC: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const PREFACE_LEN: usize = PREFACE_MAGIC.len() + 9;
const FRAME_SETTINGS: u8 = 0x4;

/// Settings a reload swaps as one.
struct Settings {
    cfg: Arc<ServeConfig>,
    acceptor: tokio_rustls::TlsAcceptor,
    dialer: Arc<Dialer>,
}

/// The `[serve]` listener's handler.
pub struct ServeServer {
    settings: RwLock<Settings>,
    /// Where `[serve]` listens: a CONNECT to it would loop.
    local: SocketAddr,
    /// Connections in their TLS handshake. The accept loop's own limit is
    /// the sum of both, so it never waits while either has room.
    handshakes: Limit,
    /// Connections past their handshake, until they end.
    connections: Limit,
    pub stats: ServeStats,
}

/// One of the serve role's limits on connections. A connection over it is
/// closed at once rather than queued: a queue would hold a socket for
/// every peer that a stalled one keeps waiting.
struct Limit {
    places: ClientLimit,
    /// The config key, for the warning.
    key: &'static str,
    /// The `loopmux_serve_refused_total` reason.
    reason: &'static str,
    /// A flood of refusals must not flood the log too.
    last_warn: Mutex<Option<Instant>>,
}

/// Why a connection ended before its HTTP/2 preface.
#[derive(Debug, thiserror::Error)]
enum PrefaceError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the client did not start HTTP/2 (no connection preface)")]
    NotHttp2,
}

/// A connection's open streams, and since when it has had none: one with
/// none for `idle_timeout` is closed. (Each stream's relay has its own idle
/// timer, over its bytes.)
struct Streams {
    open: AtomicUsize,
    /// Milliseconds from `epoch` to the moment `open` last fell to zero.
    none_since_ms: AtomicU64,
    epoch: Instant,
}

/// One open stream, from its request to the end of its relay.
struct OpenStream(Arc<Streams>);

fn settings(cfg: &ServeConfig) -> Settings {
    if !cfg.tls.mutual {
        tracing::warn!("serve.allow_unauthenticated = true: tunnel clients are NOT authenticated; anyone who reaches serve.bind can open connections to every allowed target");
    }
    Settings {
        acceptor: tokio_rustls::TlsAcceptor::from(cfg.tls.config.clone()),
        dialer: Arc::new(Dialer::new(
            &cfg.source_addresses,
            cfg.connect_timeout,
            cfg.failure_backoff,
        )),
        cfg: Arc::new(cfg.clone()),
    }
}

fn text(status: StatusCode, kind: &'static str, body: String) -> Response<Full<Bytes>> {
    crate::http::error::answer(status, kind, "loopmux serve", &body)
}

impl Limit {
    fn new(max: usize, key: &'static str, reason: &'static str) -> Self {
        Limit {
            places: ClientLimit::new(max),
            key,
            reason,
            last_warn: Mutex::new(None),
        }
    }

    /// A place, or `None` (counted, and warned about at most once a
    /// minute) at the limit.
    fn take(&self, stats: &ServeStats, peer: Option<SocketAddr>) -> Option<OwnedSemaphorePermit> {
        let place = self.places.try_acquire();
        if place.is_none() {
            stats.refused(self.reason);
            let now = Instant::now();
            let mut last = self.last_warn.lock().unwrap_or_else(|p| p.into_inner());
            if last.map_or(true, |t| now.duration_since(t) >= LIMIT_WARN_EVERY) {
                *last = Some(now);
                tracing::warn!(client = ?peer, limit = self.key, max = self.places.max(), "serve: at serve.{}: new connections are closed at once", self.key);
            } else {
                tracing::debug!(client = ?peer, limit = self.key, "serve: connection refused at its limit");
            }
        }
        place
    }
}

impl Streams {
    fn new() -> Arc<Self> {
        Arc::new(Streams {
            open: AtomicUsize::new(0),
            none_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    fn open(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenStream(self.clone())
    }

    /// Resolves once the connection has had no open stream for `idle`
    /// (from its start, or from its last stream's end). Wakes at most once
    /// per `idle` while streams are open.
    async fn idle_for(&self, idle: Duration) {
        let mut at = self.epoch + idle;
        loop {
            tokio::time::sleep_until(at).await;
            let now = Instant::now();
            if self.open.load(Ordering::Acquire) > 0 {
                at = now + idle;
                continue;
            }
            let since =
                self.epoch + Duration::from_millis(self.none_since_ms.load(Ordering::Acquire));
            if since + idle <= now {
                return;
            }
            at = since + idle;
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Before the count falls: whoever then sees no stream open also
        // sees when the last one ended.
        self.0.none_since_ms.fetch_max(ms, Ordering::AcqRel);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads the client's connection preface (the magic and its SETTINGS
/// frame's header) for hyper to read again.
///
/// # Cancel safety
/// Not cancel safe: bytes read so far are lost (the caller then drops the
/// connection).
async fn preface<S: AsyncRead + Unpin>(io: &mut S) -> Result<Bytes, PrefaceError> {
    let mut buf = [0u8; PREFACE_LEN];
    io.read_exact(&mut buf).await?;
    if buf[..PREFACE_MAGIC.len()] != PREFACE_MAGIC[..]
        || buf[PREFACE_MAGIC.len() + 3] != FRAME_SETTINGS
    {
        return Err(PrefaceError::NotHttp2);
    }
    Ok(Bytes::copy_from_slice(&buf))
}

impl ServeServer {
    pub fn new(cfg: &ServeConfig, local: SocketAddr, stats: ServeStats) -> Arc<ServeServer> {
        Arc::new(ServeServer {
            settings: RwLock::new(settings(cfg)),
            local,
            handshakes: Limit::new(cfg.max_handshakes, "max_handshakes", "handshakes"),
            connections: Limit::new(cfg.max_connections, "max_connections", "connections"),
            stats,
        })
    }

    /// A reload: new connections and streams use the new settings; open
    /// ones carry on. Lower limits apply as connections leave.
    pub fn reconfigure(&self, cfg: &ServeConfig) {
        self.handshakes.places.resize(cfg.max_handshakes);
        self.connections.places.resize(cfg.max_connections);
        let mut s = self.settings.write().unwrap_or_else(|p| p.into_inner());
        if *s.cfg != *cfg {
            *s = settings(cfg);
        }
    }

    fn current(&self) -> (Arc<ServeConfig>, tokio_rustls::TlsAcceptor, Arc<Dialer>) {
        let s = self.settings.read().unwrap_or_else(|p| p.into_inner());
        (s.cfg.clone(), s.acceptor.clone(), s.dialer.clone())
    }

    /// One tunnel client connection: TLS, then HTTP/2 until it ends, has no
    /// stream for `idle_timeout`, or the drain ends it; its streams' relays
    /// are tracked by the drain too.
    pub async fn serve(self: &Arc<Self>, stream: TcpStream, drain: &Arc<Drain>) {
        let peer = stream.peer_addr().ok();
        let Some(handshake) = self.handshakes.take(&self.stats, peer) else {
            return;
        };
        // Stream openings and their answers are small frames that must not
        // wait for Nagle.
        let _ = stream.set_nodelay(true);
        let (cfg, acceptor, dialer) = self.current();
        // One deadline for the TLS handshake and the preface after it: a
        // client that stops between them gains no time.
        let deadline = Instant::now() + cfg.handshake_timeout;
        let tls = tokio::select! {
            r = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => r,
            _ = drain.begun.cancelled() => return,
        };
        let mut tls = match tls {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                self.stats.handshake_failures.inc();
                tracing::warn!(client = ?peer, error = %e, "serve: TLS handshake failed");
                return;
            }
            Err(_) => {
                self.stats.handshake_failures.inc();
                tracing::warn!(client = ?peer, timeout = %humantime::format_duration(cfg.handshake_timeout), "serve: TLS handshake did not finish in time");
                return;
            }
        };
        drop(handshake);
        let Some(_place) = self.connections.take(&self.stats, peer) else {
            return;
        };
        let first = tokio::select! {
            r = tokio::time::timeout_at(deadline, preface(&mut tls)) => r,
            _ = drain.begun.cancelled() => return,
        };
        let first = match first {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                self.stats.handshake_failures.inc();
                tracing::warn!(client = ?peer, error = %e, "serve: the connection ended before its HTTP/2 preface");
                return;
            }
            Err(_) => {
                self.stats.handshake_failures.inc();
                tracing::warn!(client = ?peer, timeout = %humantime::format_duration(cfg.handshake_timeout), "serve: no HTTP/2 preface within handshake_timeout");
                return;
            }
        };
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(cfg.max_streams_per_connection)
            .initial_stream_window_size(cfg.stream_window_bytes)
            .max_frame_size(crate::upstream::connect::H2_MAX_FRAME)
            .initial_connection_window_size(cfg.connection_window_bytes)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10));
        let this = self.clone();
        let streams_drain = drain.clone();
        let streams = Streams::new();
        let idle = cfg.idle_timeout;
        let grace = cfg.handshake_timeout;
        let svc_streams = streams.clone();
        let svc = hyper::service::service_fn(move |req| {
            let open = svc_streams.open();
            let this = this.clone();
            let cfg = cfg.clone();
            let dialer = dialer.clone();
            let drain = streams_drain.clone();
            async move {
                Ok::<_, std::convert::Infallible>(
                    this.stream(req, &cfg, &dialer, &drain, open).await,
                )
            }
        });
        let conn = builder.serve_connection(TokioIo::new(Prefixed::new(first, tls)), svc);
        tokio::pin!(conn);
        let done = tokio::select! {
            r = drain.until_drained(conn.as_mut(), |c| c.graceful_shutdown()) => r,
            () = streams.idle_for(idle) => {
                tracing::debug!(client = ?peer, idle_timeout = %humantime::format_duration(idle), "serve: no open stream for idle_timeout: closing the connection");
                conn.as_mut().graceful_shutdown();
                // The GOAWAY waits for the answer to a PING; a client that
                // does not answer is not waited for longer than a handshake.
                tokio::select! {
                    r = conn.as_mut() => Some(r),
                    _ = tokio::time::sleep(grace) => None,
                    _ = drain.deadline.cancelled() => None,
                }
            }
        };
        if let Some(Err(e)) = done {
            tracing::debug!(client = ?peer, error = %e, "serve: connection ended with an error");
        }
    }

    /// One CONNECT stream: checked, dialed, then relayed in a task of its
    /// own (tracked by the drain) once the `200` is on its way. `open`
    /// counts it as open until its answer, or its relay, ends.
    async fn stream(
        &self,
        mut req: Request<Incoming>,
        cfg: &ServeConfig,
        dialer: &Arc<Dialer>,
        drain: &Arc<Drain>,
        open: OpenStream,
    ) -> Response<Full<Bytes>> {
        if req.method() != Method::CONNECT {
            self.stats.refused("bad-request");
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method",
                format!(
                    "{} is not served here: only CONNECT host:port",
                    req.method()
                ),
            );
        }
        let target = match of_connect(req.uri()) {
            Ok(t) => t,
            Err(e) => {
                self.stats.refused("bad-request");
                return text(StatusCode::BAD_REQUEST, "bad-request", e.to_string());
            }
        };
        let shown = target.to_string();
        if let Err(d) = cfg.allow.check(&target.host, target.port) {
            self.stats.refused("denied");
            tracing::info!(target = %shown, reason = %d, "serve: CONNECT denied");
            return text(
                StatusCode::FORBIDDEN,
                "denied",
                format!("`{shown}` is not allowed: {d}"),
            );
        }
        let veto = |a: SocketAddr| {
            let why = if crate::allow::is_self(a, self.local) {
                Veto::Loop(format!("`{shown}` is this serve listener ({a})"))
            } else {
                Veto::Denied(cfg.allow.check_resolved(a.ip(), a.port()).err()?)
            };
            Some(Vetoed { addr: a, why })
        };
        let dialed =
            raw::dial_target(dialer, &target.host, target.port, cfg.connect_timeout, veto).await;
        let up = match dialed {
            Ok(up) => up,
            Err(e) => return self.not_dialed(&shown, e),
        };
        self.stats.relays.opened.inc();
        self.stats.stream_to(&shown);
        let on_upgrade = hyper::upgrade::on(&mut req);
        let stats = self.stats.relays.clone();
        let timeouts = crate::relay::Timeouts {
            idle: cfg.idle_timeout,
            half_closed: cfg.half_close_timeout,
        };
        let cut = drain.deadline.clone();
        drain.spawn(async move {
            let raw::Leased {
                stream,
                local,
                lease,
            } = up;
            match on_upgrade.await {
                Ok(u) => {
                    crate::relay::to_end(TokioIo::new(u), stream, timeouts, &cut, &stats, (open, lease), |r| {
                        tracing::debug!(target = %shown, %local, to_target = r.to_upstream, to_client = r.to_client, end = ?r.end, "serve: stream ended");
                    })
                    .await;
                }
                Err(e) => {
                    stats.errors.inc();
                    tracing::debug!(target = %shown, error = %e, "serve: the stream ended before it opened");
                }
            }
        });
        Response::new(Full::new(Bytes::new()))
    }

    /// The answer to a CONNECT whose target was not dialed, counted.
    fn not_dialed(&self, shown: &str, e: raw::TargetError) -> Response<Full<Bytes>> {
        match e {
            raw::TargetError::Resolve(e) => {
                self.stats.refused("unreachable");
                text(StatusCode::BAD_GATEWAY, "resolve", e.to_string())
            }
            raw::TargetError::Vetoed(Vetoed {
                why: Veto::Loop(why),
                ..
            }) => {
                self.stats.refused("denied");
                text(StatusCode::LOOP_DETECTED, "loop", why)
            }
            raw::TargetError::Vetoed(Vetoed {
                addr,
                why: Veto::Denied(d),
            }) => {
                self.stats.refused("denied");
                let why = match d {
                    Denial::Rule { rule, .. } => {
                        format!("resolves to {addr}, denied by rule `{rule}`")
                    }
                    other => other.to_string(),
                };
                text(StatusCode::FORBIDDEN, "denied", format!("`{shown}` {why}"))
            }
            e @ raw::TargetError::Unreachable(_) => {
                self.stats.refused("unreachable");
                self.stats.relays.connect_failures.inc();
                tracing::info!(target = %shown, error = %e, "serve: CONNECT target unreachable");
                text(
                    StatusCode::BAD_GATEWAY,
                    "connect",
                    format!("`{shown}`: {e}"),
                )
            }
        }
    }
}

impl crate::listener::Serve for ServeServer {
    async fn serve_connection(
        self: &Arc<Self>,
        stream: tokio::net::TcpStream,
        drain: &Arc<crate::listener::Drain>,
    ) {
        Box::pin(self.serve(stream, drain)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(10);

    /// Whether `idle_for` has resolved by `after` from now.
    async fn idle_by(streams: &Streams, after: Duration) -> bool {
        tokio::time::timeout(after, streams.idle_for(IDLE))
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_opens_a_stream_is_idle_after_idle_timeout() {
        let streams = Streams::new();
        assert!(!idle_by(&streams, IDLE - Duration::from_millis(1)).await);
        let streams = Streams::new();
        assert!(idle_by(&streams, IDLE + Duration::from_millis(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_stream_keeps_the_connection_and_its_end_restarts_the_clock() {
        let streams = Streams::new();
        let open = streams.open();
        assert!(
            !idle_by(&streams, IDLE * 3).await,
            "idle under an open stream"
        );
        let second = streams.open();
        drop(open);
        assert!(
            !idle_by(&streams, IDLE * 2).await,
            "idle with one of two open"
        );
        drop(second);
        assert!(!idle_by(&streams, IDLE - Duration::from_millis(1)).await);
        // The clock runs from the last stream's end, not from the start.
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(idle_by(&streams, Duration::from_millis(1)).await);
    }

    #[tokio::test]
    async fn the_preface_is_read_whole_and_given_back() {
        let mut ok = PREFACE_MAGIC.to_vec();
        ok.extend_from_slice(&[0, 0, 6, FRAME_SETTINGS, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        let mut r: &[u8] = &ok;
        assert_eq!(&preface(&mut r).await.unwrap()[..], &ok[..PREFACE_LEN]);
        assert_eq!(r, &ok[PREFACE_LEN..], "read past the frame header");

        let mut http1: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n";
        assert!(matches!(
            preface(&mut http1).await,
            Err(PrefaceError::NotHttp2)
        ));
        let mut ping = PREFACE_MAGIC.to_vec();
        ping.extend_from_slice(&[0, 0, 8, 0x6, 0, 0, 0, 0, 0]);
        assert!(matches!(
            preface(&mut &ping[..]).await,
            Err(PrefaceError::NotHttp2)
        ));
        let mut short: &[u8] = &PREFACE_MAGIC[..10];
        assert!(matches!(
            preface(&mut short).await,
            Err(PrefaceError::Io(_))
        ));
    }
}
