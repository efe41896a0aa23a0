//! Opening one upstream connection, in layers: TCP dial (the source-IP
//! dialer) → optional TLS (rustls, ALPN) → the protocol's handshake (hyper's
//! HTTP/1 or HTTP/2 client; for HTTP/2 until the server's SETTINGS came),
//! all inside one `connect_timeout`. The driver task that runs the
//! connection frees its pool place when it ends.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use super::conn::{AppProtocol, ReqBody, Sender, TlsEnd, UpConn};
use super::dialer::{DialError, Dialer};
use super::pool::{Pooled, Slot};
use super::Endpoint;
use crate::config::{Protocol, UpstreamConfig};
use crate::stall::StallIo;
use crate::tls::client::{self as tls, TlsClient};

type Io = StallIo<Either<TcpStream, TlsWatch>>;

/// The largest HTTP/2 frame loopmux accepts (SETTINGS_MAX_FRAME_SIZE). The
/// default, 16 KiB, splits a tunnel's bulk bytes into many small frames;
/// larger ones cost nothing for small messages.
pub const H2_MAX_FRAME: u32 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The verifier's or the server's reason comes first: it is what the
    /// operator has to fix.
    #[error("TLS handshake with {addr} (server name {server_name}) failed: {reason}: {source}")]
    Tls {
        addr: SocketAddr,
        server_name: String,
        reason: &'static str,
        source: std::io::Error,
    },
    /// The README's TLS failure `timeout`: a server that took the
    /// ClientHello and never answered is a TLS problem to the operator,
    /// not a dial one.
    #[error("TLS handshake with {addr} (server name {server_name}) failed: timeout: not done when connect_timeout ({}) ran out", humantime::format_duration(*timeout))]
    TlsTimeout {
        addr: SocketAddr,
        server_name: String,
        timeout: Duration,
    },
    /// `protocol = "http2"` and the server chose no ALPN protocol (or one
    /// that is not h2): the reason word the metric counts it under.
    #[error("TLS handshake with {addr} (server name {server_name}) failed: no-application-protocol: the server did not agree to HTTP/2 (ALPN gave {offered})")]
    NoH2 {
        addr: SocketAddr,
        server_name: String,
        offered: String,
    },
    #[error("{protocol} handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        protocol: &'static str,
        source: hyper::Error,
    },
    /// `waiting`: what had not happened yet when the deadline passed.
    #[error("connect to {addr} did not finish within {}: {waiting}", humantime::format_duration(*timeout))]
    Timeout {
        addr: SocketAddr,
        waiting: &'static str,
        timeout: Duration,
    },
    /// The server's HTTP/2 connection preface (RFC 9113 §3.4) never came
    /// or was not a SETTINGS frame.
    #[error("HTTP/2 handshake with {addr} failed: {detail}")]
    Preface { addr: SocketAddr, detail: String },
    /// The server ended TLS with an alert after its side of the handshake
    /// (TLS 1.3: a client certificate it requires is missing or not
    /// trusted), seen while waiting for its HTTP/2 preface.
    #[error("TLS with {addr} (server name {server_name}) failed after the handshake: {reason}: {detail}")]
    TlsAlert {
        addr: SocketAddr,
        server_name: String,
        reason: &'static str,
        detail: String,
    },
}

impl ConnectError {
    /// Whether TLS failed (the handshake, its deadline, or ALPN): the
    /// `x-loopmux-error: tls` answer, with the reason in its text.
    pub fn is_tls(&self) -> bool {
        matches!(
            self,
            ConnectError::Tls { .. }
                | ConnectError::TlsTimeout { .. }
                | ConnectError::NoH2 { .. }
                | ConnectError::TlsAlert { .. }
        )
    }
}

/// What every connection of one upstream is opened with.
pub struct Connector {
    pub dialer: Arc<Dialer>,
    tls: Option<(tokio_rustls::TlsConnector, TlsClient)>,
    protocol: Protocol,
    connect_timeout: Duration,
    body_timeout: Duration,
    max_streams: usize,
    stream_window: u32,
    connection_window: u32,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
}

impl Connector {
    pub fn new(cfg: &UpstreamConfig, dialer: Arc<Dialer>) -> Self {
        Connector {
            dialer,
            tls: cfg.tls.as_ref().map(|t| {
                (
                    tokio_rustls::TlsConnector::from(t.config.clone()),
                    t.clone(),
                )
            }),
            protocol: cfg.protocol,
            connect_timeout: cfg.connect_timeout,
            body_timeout: cfg.body_timeout,
            max_streams: cfg.max_streams_per_connection.unwrap_or(usize::MAX),
            stream_window: cfg.stream_window_bytes,
            connection_window: cfg.connection_window_bytes,
            keepalive_interval: cfg.keepalive_interval,
            keepalive_timeout: cfg.keepalive_timeout,
        }
    }

    /// Whether requests go out as `https`.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Dials `ep` into `slot`. The returned connection is checked out.
    ///
    /// # Errors
    /// The dial error (destination, source, errno), the TLS failure with
    /// its reason, a protocol the server would not speak, the handshake's
    /// error, or the deadline. The slot is released either way.
    pub async fn connect(
        &self,
        ep: &Arc<Endpoint>,
        slot: Slot<UpConn>,
    ) -> Result<Pooled<UpConn>, ConnectError> {
        let deadline = Instant::now() + self.connect_timeout;
        let dialed = match self.dialer.dial(ep.addr).await {
            Ok(d) => d,
            Err(e) => {
                ep.record_connect_error(&e);
                return Err(e.into());
            }
        };
        let lease = self.dialer.lease(dialed.source);
        let local = dialed.local;
        let mut tls_end = None;
        let (io, protocol) = match &self.tls {
            None => (
                Either::Left(dialed.stream),
                match self.protocol {
                    Protocol::Http2 => AppProtocol::Http2,
                    _ => AppProtocol::Http1,
                },
            ),
            Some((connector, client)) => {
                let name = server_name(client, ep);
                let shown = name_text(&name);
                ep.tls_handshakes.fetch_add(1, Ordering::Relaxed);
                let stream =
                    match tokio::time::timeout_at(deadline, connector.connect(name, dialed.stream))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(source)) => {
                            let reason =
                                tls::rustls_error(&source).map_or("io", tls::failure_reason);
                            ep.record_tls_failure(reason);
                            return Err(ConnectError::Tls {
                                addr: ep.addr,
                                server_name: shown,
                                reason,
                                source,
                            });
                        }
                        Err(_) => {
                            ep.record_tls_failure("timeout");
                            return Err(ConnectError::TlsTimeout {
                                addr: ep.addr,
                                server_name: shown,
                                timeout: self.connect_timeout,
                            });
                        }
                    };
                let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                let protocol = match (self.protocol, alpn.as_deref()) {
                    (_, Some(b"h2")) => AppProtocol::Http2,
                    (Protocol::Http2, other) => {
                        ep.record_tls_failure("no-application-protocol");
                        return Err(ConnectError::NoH2 {
                            addr: ep.addr,
                            server_name: shown,
                            offered: other.map_or("nothing".into(), |p| {
                                format!("`{}`", String::from_utf8_lossy(p))
                            }),
                        });
                    }
                    _ => AppProtocol::Http1,
                };
                let end = Arc::new(TlsEnd::new(shown));
                tls_end = Some(end.clone());
                let watched = TlsWatch {
                    inner: stream,
                    end,
                    ep: ep.clone(),
                };
                (Either::Right(watched), protocol)
            }
        };
        ep.connects.fetch_add(1, Ordering::Relaxed);
        // An upstream that stops taking our request bytes fails the write
        // after `body_timeout` instead of holding the connection forever.
        let io: Io = StallIo::new(io, self.body_timeout);
        let weak = ep.pool.downgrade();
        let id = slot.id();
        let addr = ep.addr;
        let failed = |source| ConnectError::Handshake {
            addr,
            protocol: protocol.as_str(),
            source,
        };
        let mut waiting = "the protocol handshake was still running";
        let handshake = async {
            match protocol {
                AppProtocol::Http1 => {
                    let (send, conn) = hyper::client::conn::http1::Builder::new()
                        .handshake::<_, ReqBody>(TokioIo::new(io))
                        .await
                        .map_err(failed)?;
                    tokio::spawn(async move {
                        let _lease = lease;
                        if let Err(e) = conn.await {
                            tracing::debug!(endpoint = %addr, local = %local, error = %e, "upstream connection ended with an error");
                        }
                        weak.evict(id);
                    });
                    Ok(Sender::H1(send))
                }
                AppProtocol::Http2 => {
                    let (seen, preface) = tokio::sync::oneshot::channel();
                    let io = PrefaceWatch::new(io, seen);
                    let (send, conn) =
                        hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                            .timer(TokioTimer::new())
                            .initial_stream_window_size(self.stream_window)
                            .max_frame_size(H2_MAX_FRAME)
                            .initial_connection_window_size(self.connection_window)
                            .keep_alive_interval(self.keepalive_interval)
                            .keep_alive_timeout(self.keepalive_timeout)
                            .keep_alive_while_idle(true)
                            .handshake::<_, ReqBody>(TokioIo::new(io))
                            .await
                            .map_err(failed)?;
                    // hyper's handshake returns once our preface is written,
                    // and reads in a task of its own from then on. A server
                    // that accepts and never speaks must fail here, within
                    // the deadline, not take requests until request_timeout.
                    waiting =
                        "no HTTP/2 SETTINGS frame from the server yet (its connection preface)";
                    let detail = match preface.await {
                        Ok(FirstFrame::Settings) => None,
                        Ok(FirstFrame::Other) => Some("its first frame was not SETTINGS".into()),
                        Ok(FirstFrame::Failed(e)) => {
                            Some(format!("reading the server's SETTINGS failed: {e}"))
                        }
                        Err(_) => Some("the connection ended before the server's SETTINGS".into()),
                    };
                    if let Some(detail) = detail {
                        // A TLS alert is what ended it: that is what to fix.
                        let tls = tls_end.as_ref().and_then(|e| Some((e, e.reason()?)));
                        return Err(match tls {
                            Some((end, &(reason, ref text))) => ConnectError::TlsAlert {
                                addr,
                                server_name: end.server_name.clone(),
                                reason,
                                detail: text.clone(),
                            },
                            None => ConnectError::Preface { addr, detail },
                        });
                    }
                    let limit = Arc::new(AtomicUsize::new(conn.current_max_send_streams()));
                    let published = limit.clone();
                    tokio::spawn(async move {
                        let _lease = lease;
                        tokio::pin!(conn);
                        let ended = std::future::poll_fn(|cx| {
                            let r = conn.as_mut().poll(cx);
                            published.store(conn.current_max_send_streams(), Ordering::Relaxed);
                            r
                        })
                        .await;
                        if let Err(e) = ended {
                            tracing::debug!(endpoint = %addr, local = %local, error = %e, "upstream HTTP/2 connection ended with an error");
                        }
                        weak.evict(id);
                    });
                    Ok(Sender::H2(send, limit))
                }
            }
        };
        let sender = match tokio::time::timeout_at(deadline, handshake).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(ConnectError::Timeout {
                    addr,
                    waiting,
                    timeout: self.connect_timeout,
                })
            }
        };
        Ok(slot.fill(UpConn {
            sender,
            local,
            max_streams: self.max_streams,
            tls_end,
        }))
    }
}

/// A TLS stream that records the first TLS error it carries (an alert
/// after the handshake) in its [`TlsEnd`] and the endpoint's failure
/// counts, while the error is still typed.
pub struct TlsWatch {
    inner: TlsStream<TcpStream>,
    end: Arc<TlsEnd>,
    ep: Arc<Endpoint>,
}

impl TlsWatch {
    fn seen<T>(&self, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r {
            if let Some(reason) = self.end.record(e) {
                self.ep.record_tls_failure(reason);
            }
        }
        r
    }
}

impl AsyncRead for TlsWatch {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.seen(r)
    }
}

impl AsyncWrite for TlsWatch {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.seen(r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.seen(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the server's first HTTP/2 frame was.
enum FirstFrame {
    Settings,
    Other,
    /// The read failed first (a copy of the error: hyper gets the
    /// original).
    Failed(std::io::Error),
}

/// Reads watched until the header of the server's first frame is in,
/// which RFC 9113 §3.4 requires to be a SETTINGS frame; then it only
/// passes reads on. A read error first is sent as such; EOF first drops
/// `seen` unsent, which tells the waiter the preface never came.
struct PrefaceWatch<S> {
    inner: S,
    head: [u8; 9],
    have: usize,
    seen: Option<tokio::sync::oneshot::Sender<FirstFrame>>,
}

impl<S> PrefaceWatch<S> {
    fn new(inner: S, seen: tokio::sync::oneshot::Sender<FirstFrame>) -> Self {
        PrefaceWatch {
            inner,
            head: [0; 9],
            have: 0,
            seen: Some(seen),
        }
    }

    fn saw(&mut self, new: &[u8]) {
        if new.is_empty() {
            self.seen = None;
            return;
        }
        let take = (self.head.len() - self.have).min(new.len());
        self.head[self.have..self.have + take].copy_from_slice(&new[..take]);
        self.have += take;
        if self.have == self.head.len() {
            // Type 0x4 is SETTINGS; flag 0x1 would make it an ACK, which
            // cannot come before we have heard the server's own.
            let first = if self.head[3] == 0x4 && self.head[4] & 0x1 == 0 {
                FirstFrame::Settings
            } else {
                FirstFrame::Other
            };
            if let Some(seen) = self.seen.take() {
                // The waiter may have given up (its deadline passed).
                let _ = seen.send(first);
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefaceWatch<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.seen.is_some() {
            match &r {
                Poll::Ready(Ok(())) => this.saw(&buf.filled()[before..]),
                Poll::Ready(Err(e)) => {
                    if let Some(seen) = this.seen.take() {
                        let _ = seen.send(FirstFrame::Failed(std::io::Error::new(
                            e.kind(),
                            e.to_string(),
                        )));
                    }
                }
                Poll::Pending => {}
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefaceWatch<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The configured server name, else the endpoint's DNS name, else its IP.
fn server_name(client: &TlsClient, ep: &Endpoint) -> ServerName<'static> {
    if let Some(n) = &client.server_name {
        return n.clone();
    }
    if let Some(host) = &ep.host {
        if let Ok(n) = ServerName::try_from(host.to_string()) {
            return n;
        }
    }
    ServerName::IpAddress(ep.addr.ip().into())
}

fn name_text(n: &ServerName<'_>) -> String {
    match n {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads through a [`PrefaceWatch`] what `server` writes, in the pieces
    /// it writes them, and returns what the watch said.
    async fn first_frame(pieces: &[&[u8]]) -> Option<bool> {
        let (ours, mut server) = tokio::io::duplex(64);
        let (seen, said) = tokio::sync::oneshot::channel();
        let mut io = PrefaceWatch::new(ours, seen);
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for p in pieces {
                server.write_all(&p).await.unwrap();
                server.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut buf = [0u8; 64];
        while io.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        writer.await.unwrap();
        said.await.ok().map(|f| matches!(f, FirstFrame::Settings))
    }

    #[tokio::test]
    async fn the_first_frame_header_is_recognised_across_reads() {
        // An empty SETTINGS frame, then a PING, split mid-header.
        let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
        assert_eq!(first_frame(&[&settings]).await, Some(true));
        assert_eq!(
            first_frame(&[&settings[..2], &settings[2..7], &settings[7..], b"more"]).await,
            Some(true)
        );
        // A PING first, and a SETTINGS ACK first, are not a preface.
        assert_eq!(
            first_frame(&[&[0, 0, 8, 6, 0, 0, 0, 0, 0]]).await,
            Some(false)
        );
        assert_eq!(
            first_frame(&[&[0, 0, 0, 4, 1, 0, 0, 0, 0]]).await,
            Some(false)
        );
        // The server closed after part of a header: no preface, and no
        // answer (the waiter sees the sender dropped).
        assert_eq!(first_frame(&[&settings[..5]]).await, None);
        assert_eq!(first_frame(&[]).await, None);
    }
}
