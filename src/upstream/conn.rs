//! An upstream connection as the pool holds it: an HTTP/1.1 sender
//! (exclusive, one request at a time) or an HTTP/2 sender (shared, up to
//! the server's stream limit), each driven by its own task.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use tokio_util::either::Either;

pub use crate::http::body::ReqBody;

use super::pool::Reusable;

/// The application protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    Http1,
    Http2,
}

impl AppProtocol {
    /// As ALPN spells it (and `/status` shows it).
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http1 => "http/1.1",
            AppProtocol::Http2 => "h2",
        }
    }
}

pub enum Sender {
    H1(http1::SendRequest<ReqBody>),
    /// With the server's current stream limit, which only the connection
    /// knows: its driver task publishes it here each time it runs.
    H2(http2::SendRequest<ReqBody>, Arc<AtomicUsize>),
}

pub struct UpConn {
    pub sender: Sender,
    pub local: SocketAddr,
    /// `max_streams_per_connection`, when lower than the server's limit.
    pub max_streams: usize,
    /// For TLS connections: how the connection ended, told by its driver.
    pub tls_end: Option<Arc<ConnEnd>>,
}

/// Why a TLS connection ended, when TLS is the reason: a server that
/// rejects our client certificate (or its absence) says so with an alert
/// after the client's side of a TLS 1.3 handshake is done, so the request
/// only sees its connection vanish.
pub struct ConnEnd {
    pub server_name: String,
    reason: std::sync::OnceLock<(&'static str, String)>,
    done: tokio_util::sync::CancellationToken,
}

impl ConnEnd {
    pub fn new(server_name: String) -> Self {
        ConnEnd {
            server_name,
            reason: std::sync::OnceLock::new(),
            done: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Called by the driver task when the connection has ended.
    pub fn ended(&self, e: Option<&hyper::Error>) {
        if let Some(found) = e.and_then(|e| super::tls::failure_of(e)) {
            let _ = self.reason.set(found);
        }
        self.done.cancel();
    }

    /// The TLS reason the connection ended with, waiting up to `wait` for
    /// its driver to finish.
    pub async fn tls_reason(&self, wait: std::time::Duration) -> Option<(&'static str, String)> {
        let _ = tokio::time::timeout(wait, self.done.cancelled()).await;
        self.reason.get().cloned()
    }
}

impl UpConn {
    pub fn protocol(&self) -> AppProtocol {
        match self.sender {
            Sender::H1(_) => AppProtocol::Http1,
            Sender::H2(..) => AppProtocol::Http2,
        }
    }

    /// Sends `req`; a request that was not sent at all comes back in the
    /// error (`TrySendError::take_message`), always safe to send again.
    pub fn send(
        &mut self,
        req: Request<ReqBody>,
    ) -> impl std::future::Future<Output = Result<Response<Incoming>, TrySendError<Request<ReqBody>>>>
    {
        match &mut self.sender {
            Sender::H1(s) => Either::Left(s.try_send_request(req)),
            Sender::H2(s, _) => Either::Right(s.try_send_request(req)),
        }
    }

    /// HTTP/1: resolves when the connection can take the next request
    /// (hyper has read the whole response body), or fails when it cannot.
    pub async fn ready(&mut self) -> bool {
        match &mut self.sender {
            Sender::H1(s) => s.ready().await.is_ok(),
            Sender::H2(s, _) => s.ready().await.is_ok(),
        }
    }
}

impl Reusable for UpConn {
    fn is_usable(&self) -> bool {
        // The driver task ends (and closes the sender) when the peer closes
        // the connection, sends bytes nobody asked for (HTTP/1), or a
        // GOAWAY's last stream ends (HTTP/2).
        match &self.sender {
            Sender::H1(s) => !s.is_closed(),
            Sender::H2(s, _) => !s.is_closed(),
        }
    }

    fn share(&self) -> Option<Self> {
        match &self.sender {
            Sender::H1(_) => None,
            Sender::H2(s, limit) => Some(UpConn {
                sender: Sender::H2(s.clone(), limit.clone()),
                local: self.local,
                max_streams: self.max_streams,
                tls_end: self.tls_end.clone(),
            }),
        }
    }

    fn stream_limit(&self) -> usize {
        match &self.sender {
            Sender::H1(_) => 1,
            // The server's SETTINGS_MAX_CONCURRENT_STREAMS once it arrived
            // (hyper assumes 100 before), or ours if lower.
            Sender::H2(_, limit) => limit.load(Ordering::Relaxed).min(self.max_streams).max(1),
        }
    }
}
