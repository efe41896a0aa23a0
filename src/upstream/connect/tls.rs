//! The middle of the connect stack: TLS over whatever the layer below
//! dialed (tokio-rustls, ALPN), or the stream passed through for a
//! plaintext upstream; either way it settles the application protocol.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use super::{BoxConnecting, ConnectError, Link, Target};
use crate::config::Protocol;
use crate::tls::client as tls;
use crate::upstream::conn::{AppProtocol, TlsEnd};
use crate::upstream::Endpoint;

/// The stream the handshake layer speaks over.
pub type MaybeTls<IO> = Either<IO, TlsWatch<IO>>;

/// What the TLS layer hands up: the stream and what was agreed on it.
pub struct Secured<IO> {
    pub link: Link<MaybeTls<IO>>,
    pub protocol: AppProtocol,
    /// For TLS connections: where the connection's I/O records a TLS
    /// error that ends it after the handshake.
    pub tls_end: Option<Arc<TlsEnd>>,
}

/// Makes [`Tls`] services.
#[derive(Clone)]
pub struct TlsLayer {
    side: Option<Arc<ClientSide>>,
    protocol: Protocol,
}

struct ClientSide {
    connector: tokio_rustls::TlsConnector,
    /// The configured name; `None`: the endpoint's (see [`server_name`]).
    server_name: Option<ServerName<'static>>,
}

impl TlsLayer {
    /// `config`: the client config and the configured server name; `None`
    /// for a plaintext upstream, whose streams pass through.
    pub fn new(
        config: Option<(Arc<rustls::ClientConfig>, Option<ServerName<'static>>)>,
        protocol: Protocol,
    ) -> Self {
        TlsLayer {
            side: config.map(|(c, server_name)| {
                Arc::new(ClientSide {
                    connector: tokio_rustls::TlsConnector::from(c),
                    server_name,
                })
            }),
            protocol,
        }
    }
}

impl<S> tower::Layer<S> for TlsLayer {
    type Service = Tls<S>;

    fn layer(&self, inner: S) -> Tls<S> {
        Tls {
            inner,
            side: self.side.clone(),
            protocol: self.protocol,
        }
    }
}

/// TLS over the inner service's stream, within the target's deadline.
#[derive(Clone)]
pub struct Tls<S> {
    inner: S,
    side: Option<Arc<ClientSide>>,
    protocol: Protocol,
}

impl<S, IO> tower::Service<Target> for Tls<S>
where
    S: tower::Service<Target, Response = Link<IO>, Error = ConnectError>,
    S::Future: Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Response = Secured<IO>;
    type Error = ConnectError;
    type Future = BoxConnecting<Secured<IO>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, t: Target) -> Self::Future {
        let dialing = self.inner.call(t.clone());
        let side = self.side.clone();
        let wanted = self.protocol;
        Box::pin(async move {
            let link = dialing.await?;
            match side {
                None => Ok(Secured {
                    link: link.map(Either::Left),
                    protocol: match wanted {
                        Protocol::Http2 => AppProtocol::Http2,
                        _ => AppProtocol::Http1,
                    },
                    tls_end: None,
                }),
                Some(side) => secure(&side, wanted, &t, link).await,
            }
        })
    }
}

async fn secure<IO>(
    side: &ClientSide,
    wanted: Protocol,
    t: &Target,
    link: Link<IO>,
) -> Result<Secured<IO>, ConnectError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let ep = &t.ep;
    let name = server_name(side.server_name.as_ref(), ep);
    let shown = name_text(&name);
    ep.tls_handshakes.fetch_add(1, Ordering::Relaxed);
    let Link { io, local, lease } = link;
    let stream = match tokio::time::timeout_at(t.deadline, side.connector.connect(name, io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            let reason = tls::rustls_error(&source).map_or("io", tls::failure_reason);
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
                timeout: t.timeout,
            });
        }
    };
    let protocol = match (wanted, stream.get_ref().1.alpn_protocol()) {
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
    let watched = TlsWatch {
        inner: stream,
        end: end.clone(),
        ep: ep.clone(),
    };
    Ok(Secured {
        link: Link {
            io: Either::Right(watched),
            local,
            lease,
        },
        protocol,
        tls_end: Some(end),
    })
}

/// A TLS stream that records the first TLS error it carries (an alert
/// after the handshake) in its [`TlsEnd`] and the endpoint's failure
/// counts, while the error is still typed.
pub struct TlsWatch<IO> {
    inner: TlsStream<IO>,
    end: Arc<TlsEnd>,
    ep: Arc<Endpoint>,
}

impl<IO> TlsWatch<IO> {
    fn seen<T>(&self, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r {
            if let Some(reason) = self.end.record(e) {
                self.ep.record_tls_failure(reason);
            }
        }
        r
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsWatch<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.seen(r)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsWatch<IO> {
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

/// The configured server name, else the endpoint's DNS name, else its IP.
fn server_name(configured: Option<&ServerName<'static>>, ep: &Endpoint) -> ServerName<'static> {
    if let Some(n) = configured {
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
