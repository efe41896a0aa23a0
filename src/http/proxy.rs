//! The `http` mode's request path: one client request in, one upstream
//! request out over a pooled connection, response streamed back.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::header;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;

use super::body::{ClientBodyError, ReqBody, RespStream};
use super::error::ProxyError;
use super::headers;
use super::route::{Refusal, Routed, Router, Tunnels};
use super::{AccessRecord, RespBody};
use crate::config::HttpKeys;
use crate::upstream::client::{Lease, UpstreamError};
use crate::upstream::conn::AppProtocol;
use crate::upstream::Upstream;

/// Where a listener's requests go.
enum Route {
    /// Mode `http`: one upstream, swapped by a reload; each request reads
    /// it once.
    Fixed(RwLock<Arc<Upstream>>),
    /// Modes `forward` and `intercept`: where the router sends each
    /// request.
    Routed(Arc<dyn Router>),
}

/// Forwards requests of one listener to its upstream. Shared by all of the
/// listener's connections.
pub struct Proxy {
    pub listener: Arc<str>,
    route: Route,
    stats: crate::metrics::ListenerStats,
    access_log: AtomicBool,
    /// Listener settings a reload may change.
    request_buffer_bytes: AtomicUsize,
    body_timeout_ms: AtomicU64,
}

/// A response on its way back, and what the access log wants to know.
struct Forwarded {
    parts: http::response::Parts,
    body: Incoming,
    reused: bool,
    /// The length the client is promised, when the response has a body.
    promised: Option<u64>,
    lease: Lease,
    endpoint: std::net::SocketAddr,
    local: std::net::SocketAddr,
    protocol: AppProtocol,
}

impl Proxy {
    /// A proxy to one upstream (mode http).
    pub fn fixed(
        name: &str,
        http: &HttpKeys,
        upstream: Arc<Upstream>,
        stats: crate::metrics::ListenerStats,
    ) -> Self {
        Self::new(name, http, Route::Fixed(RwLock::new(upstream)), stats)
    }

    /// A proxy to wherever `router` sends each request (modes forward and
    /// intercept).
    pub fn routed(
        name: &str,
        http: &HttpKeys,
        router: Arc<dyn Router>,
        stats: crate::metrics::ListenerStats,
    ) -> Self {
        Self::new(name, http, Route::Routed(router), stats)
    }

    fn new(
        name: &str,
        http: &HttpKeys,
        route: Route,
        stats: crate::metrics::ListenerStats,
    ) -> Self {
        Proxy {
            listener: name.into(),
            route,
            stats,
            access_log: AtomicBool::new(http.access_log),
            request_buffer_bytes: AtomicUsize::new(http.request_buffer_bytes),
            body_timeout_ms: AtomicU64::new(http.body_timeout.as_millis() as u64),
        }
    }

    /// The upstream new requests go to (mode http).
    pub fn upstream(&self) -> Option<Arc<Upstream>> {
        match &self.route {
            Route::Fixed(u) => Some(u.read().unwrap_or_else(|p| p.into_inner()).clone()),
            Route::Routed(_) => None,
        }
    }

    /// Whether a router sends the requests (its connections may carry
    /// `CONNECT` tunnels).
    pub fn is_routed(&self) -> bool {
        matches!(self.route, Route::Routed(_))
    }

    /// Reload: new requests (also on open client connections) go to `up`
    /// (mode http; forward routing is reconfigured on its own) under
    /// `http`'s settings; requests in flight finish as they started.
    pub fn reconfigure(&self, up: Option<Arc<Upstream>>, http: &HttpKeys) {
        if let (Route::Fixed(u), Some(up)) = (&self.route, up) {
            *u.write().unwrap_or_else(|p| p.into_inner()) = up;
        }
        self.access_log.store(http.access_log, Ordering::Relaxed);
        self.request_buffer_bytes
            .store(http.request_buffer_bytes, Ordering::Relaxed);
        self.body_timeout_ms
            .store(http.body_timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// An upstream stopped sending its response body.
    pub(crate) fn count_upstream_stall(&self) {
        self.stats.upstream_stalls.inc();
    }

    fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms.load(Ordering::Relaxed))
    }

    /// A client connection ended with an error. The answers hyper writes
    /// itself (400/414/431 for heads it cannot parse) are counted and
    /// logged like loopmux's own; a client that stopped reading is a stall.
    pub fn connection_error(&self, e: &hyper::Error) {
        if crate::stall::is_stall(e) {
            self.stats.client_stalls.inc();
            tracing::warn!(listener = %self.listener, error = %e, "client took no response bytes for body_timeout: connection closed");
            return;
        }
        let status = if e.is_parse_too_large() {
            if e.to_string().starts_with("URI too long") {
                StatusCode::URI_TOO_LONG
            } else {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
        } else if e.is_parse() && !e.to_string().contains("HTTP2 preface") {
            StatusCode::BAD_REQUEST
        } else {
            tracing::debug!(listener = %self.listener, error = %e, "client connection ended with an error");
            return;
        };
        self.stats.record(status.as_u16(), 0.0);
        tracing::debug!(listener = %self.listener, status = status.as_u16(), error = %e, "unparseable request head answered by hyper");
        if self.access_log.load(Ordering::Relaxed) {
            tracing::info!(
                target: "loopmux::access",
                listener = %self.listener,
                status = status.as_u16(),
                bytes = 0u64,
                complete = true,
                cut = "",
                error = %e,
                upstream_conn = "none",
                "access"
            );
        }
    }

    /// Never fails: every error becomes a response.
    /// Takes the `Arc` the service already cloned for this request, so the
    /// response body can count a stall without a clone of its own.
    /// `tunnels`: where a routed connection's `CONNECT` tunnels run.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        tunnels: Option<Tunnels>,
    ) -> Response<RespBody> {
        let method = req.method().clone();
        let started = tokio::time::Instant::now();
        // Only an access log pays for a copy of the path.
        let path = self
            .access_log
            .load(Ordering::Relaxed)
            .then(|| req.uri().path().to_string());
        let (up, req, _hold, via) = match &self.route {
            Route::Fixed(u) => (
                u.read().unwrap_or_else(|p| p.into_inner()).clone(),
                req,
                None,
                false,
            ),
            Route::Routed(r) => match self.route_by(&**r, req, &method, tunnels).await {
                Ok(Routed {
                    upstream,
                    req,
                    hold,
                    via,
                }) => (upstream, req, Some(hold), via),
                Err((resp, label)) => {
                    if let Some(path) = path {
                        let len = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
                        self.access(label, &method, path, resp.status(), None, started)
                            .emit(len, None);
                    }
                    self.stats
                        .record(resp.status().as_u16(), started.elapsed().as_secs_f64());
                    return resp;
                }
            },
        };
        let resp = match self.forward(&up, req, &method).await {
            Ok(mut f) => {
                if via {
                    f.parts.headers.append(header::VIA, headers::via());
                }
                let status = f.parts.status.as_u16();
                tracing::debug!(listener = %self.listener, upstream = %up.cfg.name, %method, status, reused = f.reused, endpoint = %f.endpoint, local = %f.local, protocol = f.protocol.as_str(), elapsed_us = started.elapsed().as_micros() as u64, "request");
                let record = path.map(|path| {
                    Box::new(self.access(
                        up.cfg.name.clone(),
                        &method,
                        path,
                        f.parts.status,
                        Some(f.reused),
                        started,
                    ))
                });
                let timeout = up.cfg.body_timeout;
                let body =
                    RespStream::new(f.body, f.promised, timeout, self.clone(), record, f.lease);
                Response::from_parts(f.parts, Either::Left(body))
            }
            Err(e) => {
                match &e {
                    ProxyError::ClientBody(ClientBodyError::Stalled(_)) => {
                        self.stats.client_stalls.inc();
                        tracing::warn!(listener = %self.listener, error = %e, "client stalled its upload");
                    }
                    ProxyError::Upstream(UpstreamError::Stall { .. }) => {
                        self.stats.upstream_stalls.inc();
                        tracing::warn!(listener = %self.listener, upstream = %up.cfg.name, error = %e, "upstream stalled reading the request");
                    }
                    _ => {}
                }
                tracing::debug!(listener = %self.listener, upstream = %up.cfg.name, %method, status = e.status().as_u16(), side = ?e.side(), error = %e, "request failed");
                let resp = e.into_response(&up.cfg.name);
                if let Some(path) = path {
                    let len = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
                    self.access(
                        up.cfg.name.clone(),
                        &method,
                        path,
                        e.status(),
                        None,
                        started,
                    )
                    .emit(len, None);
                }
                resp
            }
        };
        self.stats
            .record(resp.status().as_u16(), started.elapsed().as_secs_f64());
        resp
    }

    /// The access-log record of one request (`reused`: `None` when
    /// loopmux answered itself).
    fn access(
        &self,
        upstream: String,
        method: &Method,
        path: String,
        status: StatusCode,
        reused: Option<bool>,
        started: tokio::time::Instant,
    ) -> AccessRecord {
        AccessRecord {
            listener: self.listener.clone(),
            upstream,
            method: method.clone(),
            path,
            status: status.as_u16(),
            reused,
            started,
        }
    }

    /// A routed request's way out, or the response that ends it here (a
    /// refusal, or a CONNECT's `200` with its tunnel started) with the
    /// label its access-log line gets.
    async fn route_by(
        &self,
        router: &dyn Router,
        req: Request<Incoming>,
        method: &Method,
        tunnels: Option<Tunnels>,
    ) -> Result<Routed, (Response<RespBody>, String)> {
        let refused = |e: Refusal| {
            tracing::debug!(listener = %self.listener, %method, status = e.status.as_u16(), error = %e, "forward request refused");
            let e = ProxyError::Refused(Box::new(e));
            (e.into_response(""), "forward".to_string())
        };
        if *method != Method::CONNECT {
            return router.route(req).await.map_err(refused);
        }
        // A routed connection's driver always gives its tunnels.
        let Some(tunnels) = tunnels else {
            let e = ProxyError::MethodNotAllowed(Method::CONNECT);
            return Err((e.into_response(""), "forward".to_string()));
        };
        match router.tunnel(req, &tunnels).await {
            Ok(label) => Err((
                Response::new(Either::Right(
                    http_body_util::Full::new(bytes::Bytes::new()),
                )),
                label,
            )),
            Err(e) => Err(refused(e)),
        }
    }

    /// Checks and normalizes the request head for the upstream.
    fn prepare(parts: &mut http::request::Parts) -> Result<(), ProxyError> {
        if parts.method == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed(Method::CONNECT));
        }
        if let Some(coding) = headers::unsupported_coding(&parts.headers) {
            return Err(ProxyError::RequestCoding(coding));
        }
        headers::check_host(parts).map_err(ProxyError::BadRequest)?;
        // Absolute-form targets (`GET http://host/path`) are sent on in
        // origin-form; `check_host` made their authority the Host.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            parts.uri = Uri::try_from(pq)
                .map_err(|_| ProxyError::BadRequest("request target is not a valid URI"))?;
        }
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::strip_expect(&mut parts.headers);
        parts.version = Version::HTTP_11;
        Ok(())
    }

    /// The upstream's response head and streaming body.
    async fn forward(
        &self,
        up: &Arc<Upstream>,
        req: Request<Incoming>,
        method: &Method,
    ) -> Result<Forwarded, ProxyError> {
        let (mut parts, body) = req.into_parts();
        Self::prepare(&mut parts)?;
        // A small body is read whole first: a slow or broken upload then
        // holds no pooled connection (invariant 7).
        let body = if http_body::Body::is_end_stream(&body) {
            ReqBody::empty()
        } else {
            // Boxed: its state would otherwise grow every request's future.
            Box::pin(ReqBody::read(
                body,
                self.request_buffer_bytes.load(Ordering::Relaxed),
                self.body_timeout(),
            ))
            .await?
        };
        let x = up
            .send(Request::from_parts(parts, body))
            .await
            .map_err(|e| ProxyError::from_upstream(e, self.body_timeout()))?;
        let (mut parts, body) = x.response.into_parts();
        if let Some(coding) = headers::unsupported_coding(&parts.headers) {
            // Dropping the unread body closes an HTTP/1 connection (it
            // cannot carry another request) and resets an HTTP/2 stream.
            drop(body);
            return Err(ProxyError::ResponseCoding {
                endpoint: x.endpoint,
                coding,
            });
        }
        if parts.headers.contains_key(header::TRANSFER_ENCODING) {
            // RFC 9112 §6.3: the chunking frames the body; a Content-Length
            // beside it is wrong and would make the client cut the body
            // short.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        headers::strip_hop_by_hop(&mut parts.headers);
        // Our side speaks 1.1 (hyper answers 1.0 clients in 1.0).
        parts.version = Version::HTTP_11;
        let promised = promised_length(method, parts.status, &parts.headers);
        Ok(Forwarded {
            parts,
            body,
            reused: x.reused,
            promised,
            lease: x.lease,
            endpoint: x.endpoint,
            local: x.local,
            protocol: x.protocol,
        })
    }
}

/// The body length a response promises the client: its Content-Length,
/// unless the response has no body (HEAD, 1xx, 204, 304).
fn promised_length(method: &Method, status: StatusCode, h: &http::HeaderMap) -> Option<u64> {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return None;
    }
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}
