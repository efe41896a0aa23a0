//! The `tcp` and `tunnel` modes: any TCP protocol. `tcp` cannot multiplex
//! (the bytes are opaque), so each client connection gets one upstream
//! connection; what loopmux adds is the source-IP pool (more 4-tuples
//! toward one destination), `IP_BIND_ADDRESS_NO_PORT`, failover between
//! sources and endpoints, and an exact, half-close-aware relay. `tunnel`
//! multiplexes for real: each client connection is one HTTP/2 CONNECT
//! stream on a few long-lived connections to a peer.

pub mod tunnel;

use crate::relay;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::{OnConnectError, RelayKeys};
use crate::listener::Drain;
use crate::metrics::RawStats;
use crate::upstream::{RawConn, Upstream};

/// How much of what a refused client sent is read and dropped before the
/// close, and for how long after loopmux's FIN.
const DISCARD_MAX: usize = 64 * 1024;
const DISCARD_WAIT: Duration = Duration::from_secs(1);

/// Closes `client` so that it reads EOF: a close with unread bytes in the
/// receive queue is an RST (RFC 2525 §2.17), which a client that spoke
/// first would see instead of the FIN. So: FIN first, then read and drop
/// what it sent until its own close, up to [`DISCARD_MAX`] bytes and
/// [`DISCARD_WAIT`]; past those bounds the close is a reset after all.
async fn close_cleanly(mut client: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = client.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut dropped = 0;
    let _ = tokio::time::timeout(DISCARD_WAIT, async {
        while dropped < DISCARD_MAX {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => dropped += n,
            }
        }
    })
    .await;
}

/// One `tcp` listener's handler; shared by its connections.
pub struct TcpServer {
    listener: Arc<str>,
    /// Swapped by a reload; each connection reads it once.
    upstream: RwLock<Arc<Upstream>>,
    idle_timeout_ms: AtomicU64,
    half_close_timeout_ms: AtomicU64,
    /// 0: close, 1: reset.
    on_connect_error: AtomicU8,
    /// `tunnel`: the CONNECT authority; `None` for `tcp`.
    target: RwLock<Option<http::uri::Authority>>,
    pub stats: RawStats,
}

fn action_code(a: OnConnectError) -> u8 {
    match a {
        OnConnectError::Close => 0,
        OnConnectError::Reset => 1,
    }
}

impl TcpServer {
    /// `target`: a tunnel listener's CONNECT authority (none: mode tcp).
    pub fn new(
        name: &str,
        lc: &RelayKeys,
        target: Option<http::uri::Authority>,
        upstream: Arc<Upstream>,
        stats: RawStats,
    ) -> Self {
        TcpServer {
            listener: name.into(),
            upstream: RwLock::new(upstream),
            idle_timeout_ms: AtomicU64::new(lc.idle_timeout.as_millis() as u64),
            half_close_timeout_ms: AtomicU64::new(lc.half_close_timeout.as_millis() as u64),
            on_connect_error: AtomicU8::new(action_code(lc.on_connect_error)),
            target: RwLock::new(target),
            stats,
        }
    }

    pub fn upstream(&self) -> Arc<Upstream> {
        self.upstream
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reload: new connections use `up` and `lc`'s settings; open ones
    /// carry on as they started.
    pub fn reconfigure(
        &self,
        up: Arc<Upstream>,
        lc: &RelayKeys,
        target: Option<http::uri::Authority>,
    ) {
        *self.upstream.write().unwrap_or_else(|p| p.into_inner()) = up;
        self.idle_timeout_ms
            .store(lc.idle_timeout.as_millis() as u64, Ordering::Relaxed);
        self.half_close_timeout_ms
            .store(lc.half_close_timeout.as_millis() as u64, Ordering::Relaxed);
        self.on_connect_error
            .store(action_code(lc.on_connect_error), Ordering::Relaxed);
        *self.target.write().unwrap_or_else(|p| p.into_inner()) = target;
    }

    fn timeouts(&self) -> relay::Timeouts {
        relay::Timeouts {
            idle: Duration::from_millis(self.idle_timeout_ms.load(Ordering::Relaxed)),
            half_closed: Duration::from_millis(self.half_close_timeout_ms.load(Ordering::Relaxed)),
        }
    }

    /// Closes a client whose upstream could not be opened: a FIN, or an
    /// RST with `on_connect_error = "reset"`.
    async fn refuse(
        &self,
        client: TcpStream,
        up: &Upstream,
        error: &(dyn std::fmt::Display + Sync),
    ) {
        self.stats.connect_failures.inc();
        let reset = self.on_connect_error.load(Ordering::Relaxed) == 1;
        tracing::warn!(listener = %self.listener, upstream = %up.cfg.name, %error, action = if reset { "reset" } else { "close" }, "no upstream connection; client connection closed");
        if reset {
            // SO_LINGER 0: the close sends an RST, so the client fails at
            // once instead of reading a clean EOF.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return;
        }
        close_cleanly(client).await;
    }

    /// Serves one client connection: dial, relay, close. A drain gives it
    /// the drain time, then cuts it.
    pub async fn serve(&self, client: TcpStream, drain: &Drain) {
        let target = self
            .target
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(target) = target {
            // Boxed: the stream's opening state is the tunnel mode's alone.
            return Box::pin(self.serve_tunnel(client, target, drain)).await;
        }
        let up = self.upstream();
        let dialed = tokio::select! {
            r = up.dial_raw() => r,
            _ = drain.deadline.cancelled() => return,
        };
        let raw = match dialed {
            Ok(raw) => raw,
            Err(e) => {
                self.refuse(client, &up, &e).await;
                return;
            }
        };
        self.stats.opened.inc();
        let RawConn {
            stream,
            local,
            endpoint,
            in_flight,
            lease,
        } = raw;
        let _ = client.set_nodelay(true);
        let hold = (in_flight, lease);
        relay::to_end(client, stream, self.timeouts(), &drain.deadline, &self.stats, hold, |r| {
            tracing::debug!(listener = %self.listener, upstream = %up.cfg.name, %endpoint, %local, to_upstream = r.to_upstream, to_client = r.to_client, end = ?r.end, "tcp connection ended");
        })
        .await;
    }

    /// `tunnel`: one CONNECT stream for this client connection.
    async fn serve_tunnel(&self, client: TcpStream, target: http::uri::Authority, drain: &Drain) {
        let up = self.upstream();
        let opened = tokio::select! {
            r = tunnel::open(&up, &target) => r,
            _ = drain.deadline.cancelled() => return,
        };
        let t = match opened {
            Ok(t) => t,
            Err(e) => {
                self.refuse(client, &up, &e).await;
                return;
            }
        };
        self.stats.opened.inc();
        let _ = client.set_nodelay(true);
        let (endpoint, local) = (t.endpoint, t.local);
        relay::to_end(client, t.io, self.timeouts(), &drain.deadline, &self.stats, t.lease, |r| {
            tracing::debug!(listener = %self.listener, upstream = %up.cfg.name, %target, %endpoint, %local, to_upstream = r.to_upstream, to_client = r.to_client, end = ?r.end, "tunnel stream ended");
        })
        .await;
    }
}

impl crate::listener::Serve for TcpServer {
    async fn serve_connection(
        self: &Arc<Self>,
        stream: tokio::net::TcpStream,
        drain: &Arc<crate::listener::Drain>,
    ) {
        Box::pin(self.serve(stream, drain)).await
    }
}
