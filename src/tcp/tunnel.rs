//! The `tunnel` mode's way out: one HTTP/2 `CONNECT` stream (RFC 9113
//! §8.5) per client connection, on the upstream's pooled h2 connections
//! (at most `max_connections` per endpoint, a new one only when every open
//! one is at its stream limit). The stream is a byte pipe: END_STREAM is
//! a half-close, RST_STREAM a reset.

use http::{Method, Request, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

use crate::upstream::body::ReqBody;
use crate::upstream::client::{Lease, UpstreamError};
use crate::upstream::Upstream;

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("CONNECT {target} refused by {endpoint} with {status}")]
    Refused {
        target: http::uri::Authority,
        endpoint: std::net::SocketAddr,
        status: StatusCode,
    },
    #[error(
        "CONNECT {target} accepted by {endpoint}, but the stream could not be taken over: {source}"
    )]
    Upgrade {
        target: http::uri::Authority,
        endpoint: std::net::SocketAddr,
        source: hyper::Error,
    },
}

/// An open CONNECT stream, and what must live as long as it does.
pub struct Opened {
    pub io: TokioIo<Upgraded>,
    pub endpoint: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    /// Holds the stream's place on its connection.
    pub lease: Lease,
}

/// Opens a CONNECT stream to `target` through `up`; a refused stream or a
/// failed dial is retried by the upstream client as for any request.
///
/// # Errors
/// The upstream's failure, a non-2xx answer, or a stream hyper could not
/// hand over.
pub async fn open(
    up: &std::sync::Arc<Upstream>,
    target: &http::uri::Authority,
) -> Result<Opened, OpenError> {
    let uri = http::Uri::from(target.clone());
    let mut req = Request::new(ReqBody::empty());
    *req.method_mut() = Method::CONNECT;
    *req.uri_mut() = uri;
    let x = up.send(req).await?;
    if !x.response.status().is_success() {
        return Err(OpenError::Refused {
            target: target.clone(),
            endpoint: x.endpoint,
            status: x.response.status(),
        });
    }
    let (endpoint, local, lease) = (x.endpoint, x.local, x.lease);
    match hyper::upgrade::on(x.response).await {
        Ok(u) => Ok(Opened {
            io: TokioIo::new(u),
            endpoint,
            local,
            lease,
        }),
        Err(source) => Err(OpenError::Upgrade {
            target: target.clone(),
            endpoint,
            source,
        }),
    }
}
