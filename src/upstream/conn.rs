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

pub use super::body::ReqBody;

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
    /// For TLS connections: whether TLS ended it, and why.
    pub tls_end: Option<Arc<TlsEnd>>,
}

/// Why TLS ended a connection after its handshake. A server rejects a
/// missing or untrusted client certificate with an alert after the
/// client's side of a TLS 1.3 handshake is done, so the request only sees
/// its connection vanish (and h2 keeps only the text of the I/O error). The
/// connection's I/O records the typed rustls error here the moment it
/// sees it, before any request on the connection is told.
pub struct TlsEnd {
    pub server_name: String,
    reason: std::sync::OnceLock<(&'static str, String)>,
}

impl TlsEnd {
    pub fn new(server_name: String) -> Self {
        TlsEnd {
            server_name,
            reason: std::sync::OnceLock::new(),
        }
    }

    /// Records `e` if it is the first TLS error: returns its reason then.
    pub fn record(&self, e: &std::io::Error) -> Option<&'static str> {
        let r = crate::tls::client::rustls_error(e)?;
        let reason = crate::tls::client::failure_reason(r);
        self.reason
            .set((reason, r.to_string()))
            .ok()
            .map(|()| reason)
    }

    /// The TLS reason the connection ended with, if TLS ended it.
    pub fn reason(&self) -> Option<&(&'static str, String)> {
        self.reason.get()
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

    /// HTTP/1: whether the connection can take the next request now (it
    /// has sent the whole request and read the whole response). HTTP/2:
    /// always.
    pub fn is_ready(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(..) => true,
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
