//! Failures of one proxied request and the answer each one gets
//! (DESIGN invariant 5): a status and a short plain-text reason.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use super::body::ClientBodyError;
use crate::upstream::conn::ConnectError;
use crate::upstream::pool::PoolError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no connection to {endpoint}: {source}")]
    Pool {
        endpoint: std::net::SocketAddr,
        source: PoolError,
    },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("request to {endpoint} (from {local}) failed: {source}")]
    Upstream {
        endpoint: std::net::SocketAddr,
        local: std::net::SocketAddr,
        source: hyper::Error,
    },
    #[error("no response from {endpoint} within {}", humantime::format_duration(*timeout))]
    Timeout {
        endpoint: std::net::SocketAddr,
        timeout: Duration,
    },
    #[error("{endpoint} took no request bytes for {}", humantime::format_duration(*timeout))]
    UpstreamStall {
        endpoint: std::net::SocketAddr,
        timeout: Duration,
    },
    #[error("no endpoint address is resolved")]
    NoEndpoint,
    #[error("{0}")]
    BadRequest(&'static str),
    /// The client's body failed while being read or forwarded.
    #[error(transparent)]
    ClientBody(#[from] ClientBodyError),
    /// RFC 9112 §6.1: a transfer coding loopmux does not implement.
    #[error("transfer coding `{0}` is not implemented by loopmux")]
    RequestCoding(String),
    /// Forwarding it without its label would change the bytes' meaning.
    #[error(
        "{endpoint} answered with transfer coding `{coding}`, which loopmux does not implement"
    )]
    ResponseCoding {
        endpoint: std::net::SocketAddr,
        coding: String,
    },
    #[error("{0} is not supported by an http listener")]
    MethodNotAllowed(http::Method),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Pool { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect(_) | ProxyError::Upstream { .. } | ProxyError::NoEndpoint => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Timeout { .. } | ProxyError::UpstreamStall { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::BadRequest(_) | ProxyError::ClientBody(ClientBodyError::Read(_)) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::ClientBody(ClientBodyError::Stalled(_)) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::RequestCoding(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::ResponseCoding { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// `502 Bad Gateway: upstream "partner": connect to 10.0.0.2:80 from
    /// 10.0.0.11 failed: ECONNREFUSED (Connection refused)`.
    pub fn into_response(&self, upstream: &str) -> Response<super::RespBody> {
        let status = self.status();
        let text = format!(
            "{} {}: upstream \"{upstream}\": {self}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        let mut resp = Response::new(super::RespBody::Right(Full::new(Bytes::from(text))));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp.headers_mut()
            .insert("x-loopmux-error", HeaderValue::from_static(self.kind()));
        if let ProxyError::ClientBody(_) = self {
            // The rest of the body is unread or unreadable: the connection
            // cannot carry another request.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// A stable word for the header `x-loopmux-error` and for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Pool {
                source: PoolError::QueueFull(_),
                ..
            } => "queue-full",
            ProxyError::Pool {
                source: PoolError::QueueTimeout(_),
                ..
            } => "queue-timeout",
            ProxyError::Connect(_) => "connect",
            ProxyError::Upstream { .. } => "upstream",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::UpstreamStall { .. } => "upstream-stall",
            ProxyError::NoEndpoint => "no-endpoint",
            ProxyError::BadRequest(_) | ProxyError::ClientBody(ClientBodyError::Read(_)) => {
                "bad-request"
            }
            ProxyError::ClientBody(ClientBodyError::Stalled(_)) => "client-stall",
            ProxyError::RequestCoding(_) | ProxyError::ResponseCoding { .. } => {
                "unsupported-coding"
            }
            ProxyError::MethodNotAllowed(_) => "method",
        }
    }
}
