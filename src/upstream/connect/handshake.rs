//! The top of the connect stack: hyper's HTTP/1 or HTTP/2 client handshake
//! over the layer below's stream (for HTTP/2, until the server's SETTINGS
//! came), and the driver task that runs the connection and frees its pool
//! place when it ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::tls::Secured;
use super::{BoxConnecting, ConnectError, Link, Target};
use crate::config::UpstreamConfig;
use crate::stall::StallIo;
use crate::upstream::conn::{AppProtocol, ReqBody, Sender, UpConn};

/// The largest HTTP/2 frame loopmux accepts (SETTINGS_MAX_FRAME_SIZE). The
/// default, 16 KiB, splits a tunnel's bulk bytes into many small frames;
/// larger ones cost nothing for small messages.
pub const H2_MAX_FRAME: u32 = 256 * 1024;

/// What the handshake takes from the upstream's config.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub body_timeout: Duration,
    pub max_streams: usize,
    pub stream_window: u32,
    pub connection_window: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Settings {
    pub fn of(cfg: &UpstreamConfig) -> Self {
        Settings {
            body_timeout: cfg.body_timeout,
            max_streams: cfg.max_streams_per_connection.unwrap_or(usize::MAX),
            stream_window: cfg.stream_window_bytes,
            connection_window: cfg.connection_window_bytes,
            keepalive_interval: cfg.keepalive_interval,
            keepalive_timeout: cfg.keepalive_timeout,
        }
    }
}

/// Makes [`Handshake`] services.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLayer(pub Settings);

impl<S> tower::Layer<S> for HandshakeLayer {
    type Service = Handshake<S>;

    fn layer(&self, inner: S) -> Handshake<S> {
        Handshake {
            inner,
            settings: self.0,
        }
    }
}

/// The protocol handshake over the inner service's stream, within the
/// target's deadline; answers with a connection ready for requests.
#[derive(Clone)]
pub struct Handshake<S> {
    inner: S,
    settings: Settings,
}

impl<S, IO> tower::Service<Target> for Handshake<S>
where
    S: tower::Service<Target, Response = Secured<IO>, Error = ConnectError>,
    S::Future: Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Response = UpConn;
    type Error = ConnectError;
    type Future = BoxConnecting<UpConn>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, t: Target) -> Self::Future {
        let securing = self.inner.call(t.clone());
        let settings = self.settings;
        Box::pin(async move { handshake(settings, &t, securing.await?).await })
    }
}

async fn handshake<IO>(
    s: Settings,
    t: &Target,
    secured: Secured<IO>,
) -> Result<UpConn, ConnectError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Secured {
        link: Link { io, local, lease },
        protocol,
        tls_end,
    } = secured;
    t.ep.connects.fetch_add(1, Ordering::Relaxed);
    // An upstream that stops taking our request bytes fails the write
    // after `body_timeout` instead of holding the connection forever.
    let io = StallIo::new(io, s.body_timeout);
    let weak = t.ep.pool.downgrade();
    let id = t.id;
    let addr = t.ep.addr;
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
                let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(s.stream_window)
                    .max_frame_size(H2_MAX_FRAME)
                    .initial_connection_window_size(s.connection_window)
                    .keep_alive_interval(s.keepalive_interval)
                    .keep_alive_timeout(s.keepalive_timeout)
                    .keep_alive_while_idle(true)
                    .handshake::<_, ReqBody>(TokioIo::new(io))
                    .await
                    .map_err(failed)?;
                // hyper's handshake returns once our preface is written,
                // and reads in a task of its own from then on. A server
                // that accepts and never speaks must fail here, within
                // the deadline, not take requests until request_timeout.
                waiting = "no HTTP/2 SETTINGS frame from the server yet (its connection preface)";
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
    let sender = match tokio::time::timeout_at(t.deadline, handshake).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(ConnectError::Timeout {
                addr,
                waiting,
                timeout: t.timeout,
            })
        }
    };
    Ok(UpConn {
        sender,
        local,
        max_streams: s.max_streams,
        tls_end,
    })
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
