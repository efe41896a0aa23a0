//! The one way out for HTTP requests, whatever the mode: pick an endpoint →
//! check out a connection (or a stream on one) → connect if needed → send →
//! retry when that is safe. A mode hands in a normalized request and gets
//! back the response head with what it needs to know, or an error that says
//! which side failed.
//!
//! Retries are decided in one place ([`decide`]), from the rule each
//! failure carries (pingora's errors carry theirs the same way):
//! - a dial failed: nothing was sent; another endpoint may be tried (at
//!   most 2 more; the failed one is in back-off);
//! - a reused HTTP/1 connection failed: if hyper says the request was not
//!   written, or the request is idempotent and its body is in memory, once
//!   more on a fresh connection (DESIGN invariant 4);
//! - an HTTP/2 stream was refused (`REFUSED_STREAM`, or above a graceful
//!   `GOAWAY`'s last stream): the server processed nothing, so once more on
//!   another connection when the body is in memory.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;

use super::body::Upload;
use super::conn::{AppProtocol, ReqBody, UpConn};
use super::connect::ConnectError;
use super::pool::{Acquired, PoolError, Pooled, Reusable};
use super::{InFlight, Upstream};
use crate::config::HostHeader;

/// Which side a failure belongs to: what the operator should look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The application on loopback (its body stalled or was malformed).
    Client,
    /// The upstream (refused, reset, slow, bad TLS).
    Upstream,
    /// loopmux's own limits (the cap held and the queue was full or slow).
    Loopmux,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no connection to {endpoint}: {source}")]
    Pool {
        endpoint: SocketAddr,
        source: PoolError,
    },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("request to {endpoint} (from {local}) failed: {source}")]
    Send {
        endpoint: SocketAddr,
        local: SocketAddr,
        source: hyper::Error,
    },
    #[error("no response from {endpoint} within {}", humantime::format_duration(*timeout))]
    Timeout {
        endpoint: SocketAddr,
        timeout: Duration,
    },
    #[error("{endpoint} took no request bytes for {}", humantime::format_duration(*timeout))]
    Stall {
        endpoint: SocketAddr,
        timeout: Duration,
    },
    /// The server ended TLS after the handshake (an alert: for example
    /// the client certificate it requires is missing or not trusted).
    #[error("TLS with {endpoint} (server name {server_name}) failed after the handshake: {reason}: {detail}")]
    TlsRejected {
        endpoint: SocketAddr,
        server_name: String,
        reason: &'static str,
        detail: String,
    },
    #[error("no endpoint address is resolved")]
    NoEndpoint,
    #[error("the client's request body stopped moving")]
    ClientStalled,
    #[error("malformed or incomplete request body")]
    ClientBody,
}

impl UpstreamError {
    pub fn side(&self) -> Side {
        match self {
            UpstreamError::Pool { .. } => Side::Loopmux,
            UpstreamError::ClientStalled | UpstreamError::ClientBody => Side::Client,
            _ => Side::Upstream,
        }
    }

    /// Whether TLS is what failed (the handshake, ALPN, or an alert the
    /// server sent after it, such as a missing client certificate).
    pub fn is_tls(&self) -> bool {
        match self {
            UpstreamError::Connect(c) => c.is_tls(),
            UpstreamError::TlsRejected { .. } => true,
            _ => false,
        }
    }
}

/// What a failed attempt allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Never,
    /// Nothing was sent (the dial failed).
    OtherEndpoint,
    /// A reused HTTP/1 connection was closed under the request.
    FreshConnection,
    /// The HTTP/2 server refused the stream.
    OtherConnection(u64),
}

struct Failure {
    error: UpstreamError,
    rule: Rule,
}

/// How a retry is to be made.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Endpoint,
    Fresh,
    Avoiding(u64),
}

/// What is left of the retry budget for one request.
struct Budget {
    /// Other endpoints after a dial failure; counted only once one fails.
    dials: Option<usize>,
    /// The one resend on another connection.
    resend: bool,
}

/// One place for every retry decision. `have_request`: the request can be
/// sent again (it was not written at all, or a copy of it is in memory);
/// `endpoints`: how many the upstream has (read only for a dial failure).
fn decide(
    rule: Rule,
    have_request: bool,
    b: &mut Budget,
    endpoints: impl FnOnce() -> usize,
) -> Option<Next> {
    match rule {
        Rule::Never => None,
        Rule::OtherEndpoint => {
            let left = b
                .dials
                .get_or_insert_with(|| super::raw::other_candidates(endpoints()));
            (*left > 0).then(|| {
                *left -= 1;
                Next::Endpoint
            })
        }
        Rule::FreshConnection if b.resend && have_request => {
            b.resend = false;
            Some(Next::Fresh)
        }
        Rule::OtherConnection(id) if b.resend && have_request => {
            b.resend = false;
            Some(Next::Avoiding(id))
        }
        _ => None,
    }
}

/// A response head from the upstream, and what the mode needs to know.
pub struct Exchange {
    pub response: Response<Incoming>,
    pub reused: bool,
    pub endpoint: SocketAddr,
    pub local: SocketAddr,
    pub protocol: AppProtocol,
    /// Keep until the response body has ended: it holds the HTTP/2 stream's
    /// place and the endpoint's in-flight count.
    pub lease: Lease,
}

/// See [`Exchange::lease`]. Boxed, so that every response body is not
/// made larger by it. An HTTP/1 connection goes back to the pool only
/// through [`Lease::release`] with a body read to its end: dropped
/// otherwise, it is in the middle of a response and is closed.
#[derive(Default)]
pub struct Lease {
    held: Option<Box<(InFlight, Pooled<UpConn>)>>,
}

impl Lease {
    /// The response body is over; `whole`: read to its end. An HTTP/1
    /// connection that hyper already calls ready (it has sent the whole
    /// request and read the whole response: nearly always by now) goes
    /// straight back to the pool. One that is not yet, say an upload still
    /// being sent after an early response, stays out of the pool, in its
    /// place under the cap, until it is ready or fails, as every request
    /// once did in a task of its own.
    pub fn release(&mut self, whole: bool) {
        let Some(held) = self.held.take() else {
            return;
        };
        let (in_flight, mut conn) = *held;
        if conn.protocol() != AppProtocol::Http1 || (whole && conn.is_ready()) {
            return;
        }
        // Outside a runtime (a task dropped as the runtime shuts down) there
        // is nothing to wait in.
        let rt = tokio::runtime::Handle::try_current();
        let Some(rt) = rt.ok().filter(|_| whole) else {
            conn.discard();
            return;
        };
        rt.spawn(async move {
            let _in_flight = in_flight;
            if !conn.ready().await {
                conn.discard();
            }
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release(false);
    }
}

/// RFC 9110 §9.2.2: safe to repeat.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// An h2 error that guarantees the server did nothing with the stream:
/// `REFUSED_STREAM` (RFC 9113 §8.7), or a graceful GOAWAY the stream was
/// above. The second is trusted for idempotent requests only.
fn refused(e: &hyper::Error, idempotent: bool) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2e) = err.downcast_ref::<h2::Error>() {
            return h2e.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (idempotent
                    && h2e.is_go_away()
                    && h2e.is_remote()
                    && h2e.reason() == Some(h2::Reason::NO_ERROR));
        }
        cur = err.source();
    }
    false
}

fn copy(r: &Request<ReqBody>) -> Option<Request<ReqBody>> {
    r.body().try_clone().map(|b| {
        let mut again = Request::new(b);
        *again.method_mut() = r.method().clone();
        *again.uri_mut() = r.uri().clone();
        *again.headers_mut() = r.headers().clone();
        again
    })
}

impl Upstream {
    /// Sends `req` (origin-form, hop-by-hop headers removed) to one of the
    /// endpoints and returns the response head.
    ///
    /// # Errors
    /// [`UpstreamError`]; its [`side`](UpstreamError::side) says whose
    /// fault it was.
    /// Not an `async fn`: its argument would stay in the future beside
    /// the slot it moves into.
    pub fn send(
        self: &Arc<Self>,
        req: Request<ReqBody>,
    ) -> impl std::future::Future<Output = Result<Exchange, UpstreamError>> + Send + '_ {
        let watch = req.body().watch();
        // The one place the request lives: an attempt takes it when it
        // sends, and leaves here what may be sent again. One copy in the
        // request's future, however many attempts.
        let slot = Some(req);
        self.send_from(slot, watch)
    }

    async fn send_from(
        &self,
        mut slot: Option<Request<ReqBody>>,
        watch: Option<Arc<super::body::Watch>>,
    ) -> Result<Exchange, UpstreamError> {
        let mut budget = Budget {
            dials: None,
            resend: true,
        };
        let mut next: Option<Next> = None;
        loop {
            let failure = match self.attempt(&mut slot, next.take(), watch.as_deref()).await {
                Ok(x) => return Ok(x),
                Err(f) => f,
            };
            match decide(failure.rule, slot.is_some(), &mut budget, || {
                self.endpoints().len()
            }) {
                Some(n) => {
                    tracing::debug!(upstream = %self.cfg.name, error = %failure.error, "retrying");
                    if !matches!(n, Next::Endpoint) {
                        self.retries.fetch_add(1, Ordering::Relaxed);
                    }
                    next = Some(n);
                }
                None => return Err(failure.error),
            }
        }
    }

    /// One try: the request is in `slot` and stays there until it is
    /// sent (a failed dial leaves it for the next endpoint).
    async fn attempt(
        &self,
        slot: &mut Option<Request<ReqBody>>,
        how: Option<Next>,
        watch: Option<&super::body::Watch>,
    ) -> Result<Exchange, Failure> {
        let fail = |error: UpstreamError| Failure {
            error,
            rule: Rule::Never,
        };
        let in_flight = self.pick().ok_or_else(|| fail(UpstreamError::NoEndpoint))?;
        let ep = in_flight.endpoint().clone();
        let acquired = loop {
            let acquired = match how {
                Some(Next::Fresh) => ep.pool.checkout_fresh().await,
                Some(Next::Avoiding(id)) => ep.pool.checkout_avoiding(id).await,
                _ => ep.pool.checkout().await,
            };
            // An HTTP/1 connection is given back only once hyper called it
            // ready (see `Lease::release`), so this resolves at once; one
            // that closed since is dropped before anything was written to
            // it, and another one taken (each round drops one, so this
            // ends).
            match acquired {
                Ok(Acquired::Reused(mut c)) if c.protocol() == AppProtocol::Http1 => {
                    if c.ready().await {
                        break Ok(Acquired::Reused(c));
                    }
                    c.discard();
                }
                other => break other,
            }
        };
        let mut conn = match acquired.map_err(|source| {
            fail(UpstreamError::Pool {
                endpoint: ep.addr,
                source,
            })
        })? {
            Acquired::Reused(c) => c,
            // Boxed: dialing (TLS, handshakes) is rare, and its state would
            // otherwise grow every request's future.
            Acquired::Dial(slot) => match Box::pin(self.connector.connect(&ep, slot)).await {
                Ok(c) => {
                    self.mark_ok(&ep);
                    c
                }
                Err(e) => {
                    self.mark_failed(&ep);
                    return Err(Failure {
                        error: e.into(),
                        rule: Rule::OtherEndpoint,
                    });
                }
            },
        };
        // `send` only calls with a request in the slot (`decide` retries
        // only then), and nothing before this point takes it.
        let mut r = slot.take().expect("the request is in the slot");
        let protocol = conn.protocol();
        let fixed = match &self.cfg.host_header {
            HostHeader::Keep => None,
            HostHeader::Fixed(v) => Some(v),
        };
        // A tunnel's CONNECT (RFC 9113 §8.5) is only :method and
        // :authority: no Host, no :scheme, no :path.
        if r.method() != Method::CONNECT {
            set_host(r.headers_mut(), fixed, || {
                HeaderValue::from_str(&ep.addr.to_string()).ok()
            });
            if protocol == AppProtocol::Http2 {
                to_h2(&mut r, self.connector.is_tls(), ep.addr);
            }
        }
        let reused = conn.is_reused();
        let first_try = how.is_none();
        let local = conn.local;
        let replayable = idempotent(r.method());
        // A copy only when this attempt may be replayed: a reused HTTP/1
        // connection and an idempotent request, or any HTTP/2 stream (a
        // refused one was not processed), with the body in memory.
        *slot = match protocol {
            AppProtocol::Http1 if reused && first_try && replayable => copy(&r),
            AppProtocol::Http2 if first_try => copy(&r),
            _ => None,
        };
        let timeout = self.cfg.request_timeout;
        // An HTTP/2 upload's stalls are timed here: flow control holds its
        // bytes where neither the socket nor the body can see them (see
        // `Watch::upstream_stall`); HTTP/1 has `StallIo` on the socket.
        // Boxed, and armed before the request goes: only HTTP/2 uploads
        // pay for the timer, not every request's future.
        let mut stalled = match watch {
            Some(w) if protocol == AppProtocol::Http2 => {
                Some(Box::pin(w.upstream_stall(self.cfg.body_timeout)))
            }
            _ => None,
        };
        // Pinned once for both paths, so the request's future holds one
        // send future, not one per path.
        let send = conn.send(r);
        tokio::pin!(send);
        // `request_timeout` runs from the request fully sent to the
        // response head: a long upload that keeps moving is not late (its
        // stalls are `body_timeout`'s business).
        let sent = match watch {
            None => tokio::time::timeout(timeout, &mut send).await,
            Some(w) => {
                let stall = std::future::poll_fn(|cx| match &mut stalled {
                    Some(s) => std::future::Future::poll(s.as_mut(), cx),
                    None => std::task::Poll::Pending,
                });
                tokio::select! {
                    biased;
                    r = &mut send => Ok(r),
                    _ = w.finished() => tokio::time::timeout(timeout, &mut send).await,
                    () = stall => {
                        // Dropping the send resets the stream (hyper sends
                        // RST_STREAM and drops the body); a connection
                        // that holds a window shut is not used again.
                        conn.discard();
                        return Err(fail(UpstreamError::Stall {
                            endpoint: ep.addr,
                            timeout: self.cfg.body_timeout,
                        }));
                    }
                }
            }
        };
        match sent {
            Err(_) => {
                // hyper closes an HTTP/1 connection whose request future is
                // dropped; for HTTP/2 only the stream is reset.
                conn.discard();
                Err(fail(UpstreamError::Timeout {
                    endpoint: ep.addr,
                    timeout,
                }))
            }
            Ok(Ok(response)) => {
                // HTTP/1: the connection is busy until hyper has read the
                // whole response body. HTTP/2: the stream holds a place.
                let lease = Lease {
                    held: Some(Box::new((in_flight, conn))),
                };
                Ok(Exchange {
                    response,
                    reused,
                    endpoint: ep.addr,
                    local,
                    protocol,
                    lease,
                })
            }
            Ok(Err(mut e)) => {
                let shared = conn.is_shared();
                let id = conn.id();
                // The client's fault, whatever hyper saw of it.
                match watch.map(|w| w.upload()) {
                    Some(Upload::ClientStalled) => {
                        conn.discard();
                        return Err(fail(UpstreamError::ClientStalled));
                    }
                    Some(Upload::ClientError) => {
                        conn.discard();
                        return Err(fail(UpstreamError::ClientBody));
                    }
                    _ => {}
                }
                if crate::stall::is_stall(e.error()) {
                    conn.discard();
                    return Err(fail(UpstreamError::Stall {
                        endpoint: ep.addr,
                        timeout: self.cfg.body_timeout,
                    }));
                }
                // TLS ended the connection under this request (its I/O
                // recorded why before the request was told).
                if let Some(end) = conn.tls_end.clone() {
                    if let Some(&(reason, ref detail)) = end.reason() {
                        conn.discard();
                        return Err(fail(UpstreamError::TlsRejected {
                            endpoint: ep.addr,
                            server_name: end.server_name.clone(),
                            reason,
                            detail: detail.clone(),
                        }));
                    }
                }
                let rule = if shared {
                    if refused(e.error(), replayable) {
                        Rule::OtherConnection(id)
                    } else {
                        Rule::Never
                    }
                } else if reused && first_try {
                    Rule::FreshConnection
                } else {
                    Rule::Never
                };
                // Not written at all: always safe to send again, and better
                // than the copy. Possibly written: only the copy (already
                // in the slot).
                if let Some(unsent) = e.take_message() {
                    *slot = Some(unsent);
                }
                // A failed stream ends only itself, unless the connection is
                // gone or refused it (a server going away): then no new
                // streams go there.
                if !shared || !conn.is_usable() || matches!(rule, Rule::OtherConnection(_)) {
                    conn.discard();
                }
                Err(Failure {
                    error: UpstreamError::Send {
                        endpoint: ep.addr,
                        local,
                        source: e.into_error(),
                    },
                    rule,
                })
            }
        }
    }
}

/// HTTP/1 head → HTTP/2 head: the Host becomes `:authority` (RFC 9113
/// §8.3.1) and the target absolute; framing headers go (DATA frames frame
/// the body).
fn to_h2(r: &mut Request<ReqBody>, tls: bool, endpoint: SocketAddr) {
    let authority = r
        .headers_mut()
        .remove(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .or_else(|| Authority::try_from(endpoint.to_string()).ok());
    r.headers_mut().remove(header::TRANSFER_ENCODING);
    let mut parts = std::mem::take(r.uri_mut()).into_parts();
    parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = authority;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *r.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
}
/// Sets `Host` for the upstream request: the fixed value if configured,
/// else the client's, else (HTTP/1.0 without `Host`) the fallback.
pub fn set_host(
    headers: &mut http::HeaderMap,
    fixed: Option<&http::HeaderValue>,
    fallback: impl FnOnce() -> Option<http::HeaderValue>,
) {
    if let Some(v) = fixed {
        headers.insert(http::header::HOST, v.clone());
    } else if !headers.contains_key(http::header::HOST) {
        if let Some(v) = fallback() {
            headers.insert(http::header::HOST, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Budget {
        Budget {
            dials: None,
            resend: true,
        }
    }

    /// The retry rules as a table: a dial failure tries up to two other
    /// endpoints (none when there is only one); a reused connection closed
    /// under the request, or a refused stream, is retried once, and only
    /// while the request can be sent again; `Never` never is.
    #[test]
    fn retry_decisions() {
        // (rule, request still in hand, endpoints, decisions in a row)
        let table: &[(Rule, bool, usize, &[Option<Next>])] = &[
            (Rule::Never, true, 3, &[None]),
            (Rule::OtherEndpoint, true, 1, &[None]),
            (Rule::OtherEndpoint, true, 2, &[Some(Next::Endpoint), None]),
            (
                Rule::OtherEndpoint,
                false,
                9,
                &[Some(Next::Endpoint), Some(Next::Endpoint), None],
            ),
            (Rule::FreshConnection, true, 1, &[Some(Next::Fresh), None]),
            (Rule::FreshConnection, false, 1, &[None]),
            (
                Rule::OtherConnection(7),
                true,
                1,
                &[Some(Next::Avoiding(7)), None],
            ),
            (Rule::OtherConnection(7), false, 1, &[None]),
        ];
        for (rule, have, endpoints, want) in table {
            let mut b = budget();
            for (i, w) in want.iter().enumerate() {
                let got = decide(*rule, *have, &mut b, || *endpoints);
                assert_eq!(
                    &got, w,
                    "{rule:?}, have_request {have}, {endpoints} endpoints, try {i}"
                );
            }
        }
    }

    /// One budget for the whole request: the resend spent on a closed
    /// connection is not there for a refused stream after it, and dial
    /// failovers do not spend it.
    #[test]
    fn one_resend_per_request_and_dials_apart() {
        let mut b = budget();
        assert_eq!(
            decide(Rule::OtherEndpoint, true, &mut b, || 3),
            Some(Next::Endpoint)
        );
        assert_eq!(
            decide(Rule::FreshConnection, true, &mut b, || 3),
            Some(Next::Fresh)
        );
        assert_eq!(decide(Rule::OtherConnection(1), true, &mut b, || 3), None);
        assert_eq!(
            decide(Rule::OtherEndpoint, true, &mut b, || 3),
            Some(Next::Endpoint)
        );
        assert_eq!(decide(Rule::OtherEndpoint, true, &mut b, || 3), None);
    }
}
