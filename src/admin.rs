//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz`,
//! `/readyz` (ready once every listener is bound and not draining),
//! `/status` (JSON).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::status::Status;

pub struct Admin {
    pub registry: Registry,
    pub status: Arc<Status>,
}

fn reply(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

impl Admin {
    fn route(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let mut out = String::with_capacity(16 * 1024);
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) => reply(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        out,
                    ),
                    Err(_) => reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        "encoding failed\n",
                    ),
                }
            }
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" => {
                if self.status.is_ready() {
                    reply(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready (starting or draining)\n",
                    )
                }
            }
            "/status" => reply(
                StatusCode::OK,
                "application/json",
                self.status.status_json().to_string() + "\n",
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /metrics, /healthz, /readyz, /status\n",
            ),
        }
    }
}

/// Serves the admin endpoint until `stop`.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let admin = admin.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = admin.route(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
