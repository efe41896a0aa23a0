//! The `http` mode's request path: one client request in, one upstream
//! request out over a pooled connection, response streamed back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use http::header::HeaderValue;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;

use super::error::ProxyError;
use super::headers;
use super::{AccessRecord, Metered, RespBody};
use crate::config::HostHeader;
use crate::upstream::conn::{self, ReqBody};
use crate::upstream::pool::Acquired;
use crate::upstream::Upstream;

/// Forwards requests of one listener to its upstream. Shared by all of the
/// listener's connections.
pub struct Proxy {
    pub listener: Arc<str>,
    /// Swapped by a reload; each request reads it once.
    upstream: RwLock<Arc<Upstream>>,
    stats: crate::metrics::ListenerStats,
    access_log: AtomicBool,
}

/// RFC 9110 §9.2.2: safe to repeat.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl Proxy {
    pub fn new(
        listener: Arc<str>,
        upstream: Arc<Upstream>,
        stats: crate::metrics::ListenerStats,
        access_log: bool,
    ) -> Self {
        Proxy {
            listener,
            upstream: RwLock::new(upstream),
            stats,
            access_log: AtomicBool::new(access_log),
        }
    }

    /// The upstream new requests go to.
    pub fn upstream(&self) -> Arc<Upstream> {
        self.upstream
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reload: new requests (also on open client connections) go to `up`;
    /// requests in flight finish on the old one.
    pub fn set_upstream(&self, up: Arc<Upstream>, access_log: bool) {
        *self.upstream.write().unwrap_or_else(|p| p.into_inner()) = up;
        self.access_log.store(access_log, Ordering::Relaxed);
    }

    /// Never fails: every error becomes a response.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<RespBody> {
        let started = tokio::time::Instant::now();
        let method = req.method().clone();
        let up = self.upstream();
        // Only an access log pays for a copy of the path.
        let path = self
            .access_log
            .load(Ordering::Relaxed)
            .then(|| req.uri().path().to_string());
        let resp = match self.forward(&up, req).await {
            Ok((parts, body, reused)) => {
                let status = parts.status.as_u16();
                tracing::debug!(listener = %self.listener, upstream = %up.cfg.name, %method, status, reused, elapsed_us = started.elapsed().as_micros() as u64, "request");
                let record = path.map(|path| {
                    Box::new(AccessRecord {
                        listener: self.listener.clone(),
                        upstream: up.cfg.name.clone(),
                        method: method.clone(),
                        path,
                        status,
                        reused: Some(reused),
                        started,
                    })
                });
                Response::from_parts(parts, Either::Left(Metered::new(body, record)))
            }
            Err(e) => {
                tracing::debug!(listener = %self.listener, upstream = %up.cfg.name, %method, status = e.status().as_u16(), error = %e, "request failed");
                let resp = e.into_response(&up.cfg.name);
                if let Some(path) = path {
                    let len = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
                    AccessRecord {
                        listener: self.listener.clone(),
                        upstream: up.cfg.name.clone(),
                        method: method.clone(),
                        path,
                        status: e.status().as_u16(),
                        reused: None,
                        started,
                    }
                    .emit(len, true);
                }
                resp
            }
        };
        self.stats
            .record(resp.status().as_u16(), started.elapsed().as_secs_f64());
        resp
    }

    /// The upstream's response head and streaming body, and whether the
    /// connection was reused.
    async fn forward(
        &self,
        up: &Upstream,
        req: Request<Incoming>,
    ) -> Result<(http::response::Parts, Incoming, bool), ProxyError> {
        let (mut parts, body) = req.into_parts();
        if parts.method == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed(Method::CONNECT));
        }
        // Absolute-form targets (`GET http://host/path`) are sent on in
        // origin-form; their authority becomes the Host if none is given.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            if let Some(auth) = parts.uri.authority() {
                if !parts.headers.contains_key(http::header::HOST) {
                    if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                        parts.headers.insert(http::header::HOST, v);
                    }
                }
            }
            let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            parts.uri = Uri::try_from(pq)
                .map_err(|_| ProxyError::BadRequest("request target is not a valid URI"))?;
        }
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::strip_expect(&mut parts.headers);
        parts.version = Version::HTTP_11;

        let replayable = idempotent(&parts.method) && body.is_end_stream();
        let mut req = Some(Request::from_parts(parts, Either::Left(body)));
        let mut fresh = false;
        // Nothing was sent when a dial fails, so another endpoint may be
        // tried; the failed one is in back-off and will not be picked again.
        // Counted only once a dial fails: the common path never reads it.
        let mut dial_retries: Option<usize> = None;

        loop {
            let in_flight = up.pick().ok_or(ProxyError::NoEndpoint)?;
            let ep = in_flight.endpoint().clone();
            let acquired = if fresh {
                ep.pool.checkout_fresh().await
            } else {
                ep.pool.checkout().await
            };
            let mut conn = match acquired.map_err(|source| ProxyError::Pool {
                endpoint: ep.addr,
                source,
            })? {
                Acquired::Reused(c) => c,
                Acquired::Dial(slot) => match conn::open(&ep, &up.dialer, slot).await {
                    Ok(c) => {
                        up.mark_ok(&ep);
                        c
                    }
                    Err(e) => {
                        up.mark_failed(&ep);
                        let left = dial_retries
                            .get_or_insert_with(|| up.endpoints().len().saturating_sub(1).min(2));
                        if *left > 0 {
                            *left -= 1;
                            tracing::debug!(endpoint = %ep.addr, error = %e, "dial failed; trying another endpoint");
                            continue;
                        }
                        return Err(e.into());
                    }
                },
            };
            let mut r = req.take().expect("a request is present at each attempt");
            let fixed = match &up.cfg.host_header {
                HostHeader::Keep => None,
                HostHeader::Fixed(v) => Some(v),
            };
            headers::set_host(r.headers_mut(), fixed, || {
                HeaderValue::from_str(&ep.addr.to_string()).ok()
            });
            let reused = conn.is_reused();
            let local = conn.local;
            // A copy of the head, only when this attempt may be replayed:
            // a bodiless idempotent request on a reused connection.
            let replay = (reused && !fresh && replayable)
                .then(|| (r.method().clone(), r.uri().clone(), r.headers().clone()));
            let sent =
                tokio::time::timeout(up.cfg.request_timeout, conn.send.try_send_request(r)).await;
            match sent {
                Err(_) => {
                    // hyper closes a connection whose request future is dropped.
                    conn.discard();
                    return Err(ProxyError::Timeout {
                        endpoint: ep.addr,
                        timeout: up.cfg.request_timeout,
                    });
                }
                Ok(Ok(resp)) => {
                    // The connection is busy until hyper has read the whole
                    // response body; it goes back to the pool when ready.
                    tokio::spawn(async move {
                        let _in_flight = in_flight;
                        if conn.send.ready().await.is_err() {
                            conn.discard();
                        }
                    });
                    let (mut parts, body) = resp.into_parts();
                    headers::strip_hop_by_hop(&mut parts.headers);
                    // Our side speaks 1.1 (hyper answers 1.0 clients in 1.0).
                    parts.version = Version::HTTP_11;
                    return Ok((parts, body, reused));
                }
                Ok(Err(mut e)) => {
                    conn.discard();
                    if reused && !fresh {
                        // Not written at all: always safe to send again.
                        // Possibly written: only the copy of an idempotent,
                        // bodiless request (`replay`).
                        let again = e.take_message().or_else(|| {
                            replay.map(|(m, u, h)| {
                                let mut again = Request::new(ReqBody::Right(Empty::new()));
                                *again.method_mut() = m;
                                *again.uri_mut() = u;
                                *again.headers_mut() = h;
                                again
                            })
                        });
                        if let Some(again) = again {
                            tracing::debug!(endpoint = %ep.addr, error = %e.error(), "reused connection failed; retrying once on a fresh one");
                            req = Some(again);
                            fresh = true;
                            up.retries
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            continue;
                        }
                    }
                    return Err(ProxyError::Upstream {
                        endpoint: ep.addr,
                        local,
                        source: e.into_error(),
                    });
                }
            }
        }
    }
}
