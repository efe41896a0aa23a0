//! Failures of one proxied request and the answer each one gets
//! (DESIGN invariant 5): a status and a short plain-text reason.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use super::body::ClientBodyError;
use crate::upstream::client::{Side, UpstreamError};
use crate::upstream::pool::PoolError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Anything the upstream client reports.
    #[error(transparent)]
    Upstream(UpstreamError),
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
    /// The listener's router refused the request.
    /// Boxed: every request's result is as large as its largest error.
    #[error(transparent)]
    Refused(Box<super::route::Refusal>),
}

impl ProxyError {
    /// The client's part of an upstream failure becomes the client's
    /// error: `client_body_timeout` is the listener's, which the upstream
    /// client does not know.
    pub fn from_upstream(e: UpstreamError, client_body_timeout: Duration) -> Self {
        match e {
            UpstreamError::ClientStalled => {
                ProxyError::ClientBody(ClientBodyError::Stalled(client_body_timeout))
            }
            UpstreamError::ClientBody => {
                ProxyError::BadRequest("malformed or incomplete request body")
            }
            e => ProxyError::Upstream(e),
        }
    }

    /// Whose fault it was, for logs: the operator's first question.
    pub fn side(&self) -> Side {
        match self {
            ProxyError::Upstream(e) => e.side(),
            ProxyError::ResponseCoding { .. } => Side::Upstream,
            ProxyError::Refused(r) => r.side,
            _ => Side::Client,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Upstream(e) => match e {
                UpstreamError::Pool { .. } => StatusCode::SERVICE_UNAVAILABLE,
                UpstreamError::Timeout { .. } | UpstreamError::Stall { .. } => {
                    StatusCode::GATEWAY_TIMEOUT
                }
                UpstreamError::ClientStalled => StatusCode::REQUEST_TIMEOUT,
                UpstreamError::ClientBody => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            },
            ProxyError::BadRequest(_) | ProxyError::ClientBody(ClientBodyError::Read(_)) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::ClientBody(ClientBodyError::Stalled(_)) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::RequestCoding(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::ResponseCoding { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Refused(r) => r.status,
        }
    }
    /// `502 Bad Gateway: upstream "partner": connect to 10.0.0.2:80 from
    /// 10.0.0.11 failed: ECONNREFUSED (Connection refused)`.
    pub fn into_response(&self, upstream: &str) -> Response<super::RespBody> {
        let who = match self {
            ProxyError::Refused(r) => r.by.to_string(),
            _ => format!("upstream \"{upstream}\""),
        };
        let mut resp = answer(self.status(), self.kind(), &who, self).map(super::RespBody::Right);
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
            ProxyError::Upstream(e) if e.is_tls() => "tls",
            ProxyError::Upstream(e) => match e {
                UpstreamError::Pool {
                    source: PoolError::QueueFull(_),
                    ..
                } => "queue-full",
                UpstreamError::Pool {
                    source: PoolError::QueueTimeout(_),
                    ..
                } => "queue-timeout",
                UpstreamError::Connect(_) => "connect",
                UpstreamError::Send { .. } => "upstream",
                UpstreamError::Timeout { .. } => "timeout",
                UpstreamError::Stall { .. } => "upstream-stall",
                UpstreamError::TlsRejected { .. } => "tls",
                UpstreamError::NoEndpoint => "no-endpoint",
                UpstreamError::ClientStalled => "client-stall",
                UpstreamError::ClientBody => "bad-request",
            },
            ProxyError::BadRequest(_) | ProxyError::ClientBody(ClientBodyError::Read(_)) => {
                "bad-request"
            }
            ProxyError::ClientBody(ClientBodyError::Stalled(_)) => "client-stall",
            ProxyError::RequestCoding(_) | ProxyError::ResponseCoding { .. } => {
                "unsupported-coding"
            }
            ProxyError::MethodNotAllowed(_) => "method",
            ProxyError::Refused(r) => r.kind,
        }
    }
}

/// loopmux's own answer, the one shape for every mode:
/// `502 Bad Gateway: <who>: <reason>` as plain text, with the reason's
/// word in `x-loopmux-error`.
pub fn answer(
    status: StatusCode,
    kind: &'static str,
    who: &str,
    reason: &dyn std::fmt::Display,
) -> Response<Full<Bytes>> {
    let text = format!(
        "{} {}: {who}: {reason}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert("x-loopmux-error", HeaderValue::from_static(kind));
    resp
}
