//! Opening one upstream connection, as a stack of tower services composed
//! once per upstream: [`Dial`] (the source-IP dialer) under [`Tls`]
//! (rustls and ALPN, or the stream passed through) under [`Handshake`]
//! (hyper's HTTP/1 or HTTP/2 client; for HTTP/2 until the server's
//! SETTINGS came). One deadline, `connect_timeout` from the start of the
//! dial, bounds all three: each layer maps running out of it to what it
//! was waiting for. The driver task that runs the connection frees its
//! pool place when it ends.
//!
//! Per connection only: the request path holds what the stack made (an
//! [`UpConn`] over concrete I/O), never the stack.

mod dial;
mod handshake;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tower::{Service, ServiceBuilder};

use super::conn::UpConn;
use super::dialer::{DialError, Dialer, SourceLease};
use super::pool::{Pooled, Slot};
use super::Endpoint;
use crate::config::UpstreamConfig;
pub use dial::Dial;
pub use handshake::{Handshake, HandshakeLayer, Settings, H2_MAX_FRAME};
pub use tls::{Tls, TlsLayer};

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

/// One connection to open: where, the pool place it will fill, and the
/// deadline every layer works within.
#[derive(Clone)]
pub struct Target {
    pub ep: Arc<Endpoint>,
    /// The slot's id, for the driver task's [`WeakPool::evict`].
    ///
    /// [`WeakPool::evict`]: super::pool::WeakPool::evict
    pub id: u64,
    pub deadline: Instant,
    /// `connect_timeout`, for the messages.
    pub timeout: Duration,
}

/// A connected byte stream, what it left from, and the source lease it
/// holds for as long as it lives.
pub struct Link<IO> {
    pub io: IO,
    pub local: SocketAddr,
    pub lease: Option<SourceLease>,
}

impl<IO> Link<IO> {
    pub fn map<T>(self, f: impl FnOnce(IO) -> T) -> Link<T> {
        Link {
            io: f(self.io),
            local: self.local,
            lease: self.lease,
        }
    }
}

/// A layer's future: boxed, once per connection.
pub type BoxConnecting<T> = Pin<Box<dyn Future<Output = Result<T, ConnectError>> + Send>>;

/// The one composition of the stack, over any dial service: the
/// upstream's [`Dial`], or a test's pipe.
fn layers<D>(settings: Settings, tls: TlsLayer, dial: D) -> Handshake<Tls<D>> {
    ServiceBuilder::new()
        .layer(HandshakeLayer(settings))
        .layer(tls)
        .service(dial)
}

/// What every connection of one upstream is opened with.
pub struct Connector {
    stack: Handshake<Tls<Dial>>,
    tls: bool,
    connect_timeout: Duration,
}

impl Connector {
    pub fn new(cfg: &UpstreamConfig, dialer: Arc<Dialer>) -> Self {
        Connector {
            stack: layers(
                Settings::of(cfg),
                TlsLayer::new(
                    cfg.tls
                        .as_ref()
                        .map(|t| (t.config.clone(), t.server_name.clone())),
                    cfg.protocol,
                ),
                Dial(dialer),
            ),
            tls: cfg.tls.is_some(),
            connect_timeout: cfg.connect_timeout,
        }
    }

    /// Whether requests go out as `https`.
    pub fn is_tls(&self) -> bool {
        self.tls
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
        let target = Target {
            ep: ep.clone(),
            id: slot.id(),
            deadline: Instant::now() + self.connect_timeout,
            timeout: self.connect_timeout,
        };
        let conn = open(self.stack.clone(), target).await?;
        Ok(slot.fill(conn))
    }
}

/// Runs one connection through `svc`.
async fn open<S>(mut svc: S, target: Target) -> Result<UpConn, ConnectError>
where
    S: Service<Target, Response = UpConn, Error = ConnectError>,
{
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
    svc.call(target).await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Mutex;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;
    use crate::config::Protocol;
    use crate::upstream::conn::{AppProtocol, ReqBody};
    use crate::upstream::dialer::DialErrorKind;
    use crate::upstream::pool::{Pool, PoolConfig};

    const TIMEOUT: Duration = Duration::from_secs(2);

    fn endpoint(addr: SocketAddr) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            addr,
            host: Some("localhost".into()),
            pool: Pool::new(PoolConfig {
                max_connections: 1,
                max_pending: 1,
                queue_timeout: TIMEOUT,
                idle_timeout: Duration::from_secs(60),
                max_lifetime: Duration::from_secs(600),
                multiplexed: false,
            }),
            in_flight: AtomicUsize::new(0),
            failed_until_ms: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            connect_errors: Mutex::new(BTreeMap::new()),
            tls_handshakes: AtomicU64::new(0),
            tls_failures: Mutex::new(BTreeMap::new()),
        })
    }

    fn target(ep: &Arc<Endpoint>) -> Target {
        Target {
            ep: ep.clone(),
            id: 1,
            deadline: Instant::now() + TIMEOUT,
            timeout: TIMEOUT,
        }
    }

    fn settings() -> Settings {
        Settings {
            body_timeout: Duration::from_secs(30),
            max_streams: usize::MAX,
            stream_window: 1 << 20,
            connection_window: 1 << 20,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }

    /// The test seam: hands out its one end of a duplex pipe, or, without
    /// one, fails as a refused dial does.
    #[derive(Clone)]
    struct FakeDial(Arc<Mutex<Option<DuplexStream>>>);

    impl Service<Target> for FakeDial {
        type Response = Link<DuplexStream>;
        type Error = ConnectError;
        type Future = BoxConnecting<Link<DuplexStream>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), ConnectError>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, t: Target) -> Self::Future {
            let io = self.0.lock().unwrap().take();
            Box::pin(async move {
                match io {
                    Some(io) => Ok(Link {
                        io,
                        local: "127.0.0.1:40000".parse().unwrap(),
                        lease: None,
                    }),
                    None => Err(ConnectError::Dial(DialError {
                        dest: t.ep.addr,
                        from: None,
                        kind: DialErrorKind::Io(std::io::Error::from_raw_os_error(
                            libc::ECONNREFUSED,
                        )),
                    })),
                }
            })
        }
    }

    /// Opens a connection through the whole stack over a duplex pipe
    /// whose other end `peer` gets.
    async fn open_with<F, Fut>(
        protocol: Protocol,
        tls: Option<Arc<rustls::ClientConfig>>,
        peer: F,
    ) -> (Arc<Endpoint>, Result<UpConn, ConnectError>)
    where
        F: FnOnce(DuplexStream) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(peer(theirs));
        let ep = endpoint("127.0.0.1:443".parse().unwrap());
        let svc = layers(
            settings(),
            TlsLayer::new(tls.map(|c| (c, None)), protocol),
            FakeDial(Arc::new(Mutex::new(Some(ours)))),
        );
        let r = open(svc, target(&ep)).await;
        (ep, r)
    }

    fn failed(r: Result<UpConn, ConnectError>) -> ConnectError {
        match r {
            Ok(_) => panic!("the connect succeeded"),
            Err(e) => e,
        }
    }

    fn tls_failures(ep: &Endpoint) -> Vec<(&'static str, u64)> {
        let m = ep.tls_failures.lock().unwrap();
        m.iter().map(|(k, v)| (*k, *v)).collect()
    }

    struct Identity {
        cert: CertificateDer<'static>,
        key: Vec<u8>,
    }

    /// A self-signed certificate for `localhost`; `issuer` is its
    /// distinguished name, so that a certificate under another name has
    /// an issuer the client does not know (under the same name it would
    /// be a bad signature).
    fn identity(issuer: &str) -> Identity {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, issuer);
        let key = rcgen::KeyPair::generate().unwrap();
        Identity {
            cert: p.self_signed(&key).unwrap().der().clone(),
            key: key.serialize_der(),
        }
    }

    fn roots(trusted: &Identity) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trusted.cert.clone()).unwrap();
        roots
    }

    fn client(
        trusted: &Identity,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        let mut c = rustls::ClientConfig::builder_with_provider(crate::tls::client::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots(trusted))
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }

    /// A server config for `id`; with `client_ca`, a client certificate
    /// it signed is required.
    fn server(
        id: &Identity,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
        client_ca: Option<&Identity>,
    ) -> Arc<rustls::ServerConfig> {
        let b = rustls::ServerConfig::builder_with_provider(crate::tls::client::provider())
            .with_protocol_versions(versions)
            .unwrap();
        let b = match client_ca {
            None => b.with_no_client_auth(),
            Some(ca) => b.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca)),
                    crate::tls::client::provider(),
                )
                .build()
                .unwrap(),
            ),
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone()));
        let mut s = b.with_single_cert(vec![id.cert.clone()], key).unwrap();
        s.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(s)
    }

    const ALL: &[&rustls::SupportedProtocolVersion] = rustls::ALL_VERSIONS;
    const BOTH: &[&[u8]] = &[b"h2", b"http/1.1"];

    /// A TLS server that then answers every request with `hello`, over
    /// the protocol ALPN chose.
    async fn tls_hello(cfg: Arc<rustls::ServerConfig>, io: DuplexStream) {
        let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(io).await else {
            return;
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        hello(tls, h2).await;
    }

    async fn hello<IO>(io: IO, h2: bool)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from("hello"))))
        });
        let io = TokioIo::new(io);
        let _ = if h2 {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, svc)
                .await
        } else {
            hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
        };
    }

    /// Sends one GET on `conn` and returns the response body.
    async fn get(conn: &mut UpConn, uri: &str) -> String {
        let req = http::Request::builder()
            .uri(uri)
            .header(http::header::HOST, "localhost")
            .body(ReqBody::empty())
            .unwrap();
        let Ok(resp) = conn.send(req).await else {
            panic!("the request failed");
        };
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Reads what the client sends first (its ClientHello, or its HTTP/2
    /// preface) and then says nothing, holding the connection open.
    async fn read_then_stall(mut io: DuplexStream) {
        let mut buf = [0u8; 4096];
        let _ = io.read(&mut buf).await;
        std::future::pending::<()>().await;
    }

    /// The deadline passed, and not much later (the timer's resolution is
    /// a millisecond).
    fn assert_near_timeout(start: Instant) {
        let took = start.elapsed();
        assert!(
            took >= TIMEOUT && took <= TIMEOUT + Duration::from_millis(5),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_refused_dial_is_a_dial_error_with_its_errno() {
        // The real dial layer, against a loopback port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = port.local_addr().unwrap();
        drop(port);
        let ep = endpoint(addr);
        let cfg = layers(
            settings(),
            TlsLayer::new(None, Protocol::Http1),
            Dial(Arc::new(Dialer::new(&[], TIMEOUT, TIMEOUT))),
        );
        let e = failed(open(cfg, target(&ep)).await);
        assert!(
            matches!(&e, ConnectError::Dial(d) if d.errno() == Some(libc::ECONNREFUSED)),
            "{e}"
        );
        assert!(e.to_string().contains("ECONNREFUSED"), "{e}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
        let counted = ep.connect_errors.lock().unwrap().clone();
        assert_eq!(counted.get("ECONNREFUSED"), Some(&1), "{counted:?}");
        assert_eq!(ep.connects.load(Ordering::Relaxed), 0);

        // A dial error from below passes the TLS and handshake layers as
        // it is.
        let ep = endpoint(addr);
        let svc = layers(
            settings(),
            TlsLayer::new(
                Some((client(&identity("server"), ALL, BOTH), None)),
                Protocol::Http2,
            ),
            FakeDial(Arc::new(Mutex::new(None))),
        );
        let e = failed(open(svc, target(&ep)).await);
        assert!(matches!(&e, ConnectError::Dial(_)), "{e}");
        assert!(!e.is_tls());
        assert!(e.to_string().contains("ECONNREFUSED"), "{e}");
        assert_eq!(ep.tls_handshakes.load(Ordering::Relaxed), 0);
    }

    /// A TLS connect that must fail: the endpoint and the error, checked
    /// for what every TLS failure shows (`x-loopmux-error: tls`, the
    /// reason word in the text, counted once under it).
    async fn tls_fails<F, Fut>(
        protocol: Protocol,
        client: Arc<rustls::ClientConfig>,
        peer: F,
        word: &str,
    ) -> ConnectError
    where
        F: FnOnce(DuplexStream) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (ep, r) = open_with(protocol, Some(client), peer).await;
        let e = failed(r);
        assert!(e.is_tls(), "{e}");
        assert!(e.to_string().contains(&format!(": {word}: ")), "{e}");
        assert_eq!(tls_failures(&ep), [(word, 1)]);
        assert_eq!(ep.tls_handshakes.load(Ordering::Relaxed), 1);
        e
    }

    #[tokio::test]
    async fn an_untrusted_server_certificate_is_a_tls_error_naming_the_reason() {
        let srv = server(&identity("theirs"), ALL, BOTH, None);
        let trusted = client(&identity("trusted"), ALL, BOTH);
        let peer = |io| tls_hello(srv, io);
        let e = tls_fails(Protocol::Auto, trusted, peer, "unknown-issuer").await;
        assert!(
            matches!(&e, ConnectError::Tls { reason: "unknown-issuer", server_name, .. }
                if server_name == "localhost"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_server_alert_during_the_handshake_is_a_tls_error_naming_the_reason() {
        // The server speaks only TLS 1.2, the client only TLS 1.3: the
        // server answers the ClientHello with a protocol_version alert.
        let id = identity("server");
        let srv = server(&id, &[&rustls::version::TLS12], BOTH, None);
        let tls13 = client(&id, &[&rustls::version::TLS13], BOTH);
        let peer = |io| tls_hello(srv, io);
        let e = tls_fails(Protocol::Auto, tls13, peer, "protocol-version").await;
        assert!(
            matches!(
                &e,
                ConnectError::Tls {
                    reason: "protocol-version",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_server_that_closes_mid_handshake_is_a_tls_io_error() {
        let peer = |mut io: DuplexStream| async move {
            let mut buf = [0u8; 4096];
            let _ = io.read(&mut buf).await;
        };
        let c = client(&identity("server"), ALL, BOTH);
        let e = tls_fails(Protocol::Http1, c, peer, "io").await;
        assert!(matches!(&e, ConnectError::Tls { reason: "io", .. }), "{e}");
    }

    #[tokio::test]
    async fn an_alert_after_the_handshake_is_a_tls_alert_not_a_preface_error() {
        // TLS 1.3: the client's side of the handshake is done before the
        // server checks for the client certificate it requires; its alert
        // comes while HTTP/2 waits for the server's SETTINGS.
        let id = identity("server");
        let tls13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let srv = server(&id, tls13, BOTH, Some(&identity("client ca")));
        let peer = |io| tls_hello(srv, io);
        let word = "client-certificate-required";
        let e = tls_fails(Protocol::Http2, client(&id, tls13, BOTH), peer, word).await;
        assert!(
            matches!(&e, ConnectError::TlsAlert { reason, .. } if *reason == word),
            "{e}"
        );
    }

    #[tokio::test]
    async fn http2_required_and_alpn_without_h2_is_no_h2() {
        for (server_alpn, offered) in [
            (&[b"http/1.1".as_slice()][..], "`http/1.1`"),
            (&[][..], "nothing"),
        ] {
            let id = identity("server");
            let srv = server(&id, ALL, server_alpn, None);
            let peer = |io| tls_hello(srv, io);
            let c = client(&id, ALL, BOTH);
            let e = tls_fails(Protocol::Http2, c, peer, "no-application-protocol").await;
            assert!(
                matches!(&e, ConnectError::NoH2 { offered: o, .. } if o == offered),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn a_tls_handshake_that_never_ends_is_a_tls_timeout() {
        tokio::time::pause();
        let start = Instant::now();
        let c = client(&identity("server"), ALL, BOTH);
        let e = tls_fails(Protocol::Auto, c, read_then_stall, "timeout").await;
        assert!(
            matches!(&e, ConnectError::TlsTimeout { timeout, .. } if *timeout == TIMEOUT),
            "{e}"
        );
        assert_near_timeout(start);
    }

    #[tokio::test]
    async fn an_http2_server_that_never_sends_settings_times_out_waiting_for_them() {
        tokio::time::pause();
        let start = Instant::now();
        let (_, r) = open_with(Protocol::Http2, None, read_then_stall).await;
        let e = failed(r);
        assert!(
            matches!(&e, ConnectError::Timeout { waiting, timeout, .. }
                if waiting.contains("SETTINGS") && *timeout == TIMEOUT),
            "{e}"
        );
        assert!(e.to_string().contains("did not finish within 2s"), "{e}");
        assert_near_timeout(start);
    }

    #[tokio::test]
    async fn an_http2_server_whose_first_frame_is_not_settings_is_a_preface_error() {
        let (_, r) = open_with(Protocol::Http2, None, |mut io| async move {
            use tokio::io::AsyncWriteExt;
            let mut buf = [0u8; 4096];
            let _ = io.read(&mut buf).await;
            // A PING.
            let _ = io
                .write_all(&[0, 0, 8, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
                .await;
            std::future::pending::<()>().await;
        })
        .await;
        let e = failed(r);
        assert!(
            matches!(&e, ConnectError::Preface { detail, .. } if detail.contains("not SETTINGS")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn http1_over_plaintext_carries_a_request() {
        let (ep, r) = open_with(Protocol::Http1, None, |io| hello(io, false)).await;
        let Ok(mut conn) = r else {
            panic!("connect failed: {}", failed(r));
        };
        assert_eq!(conn.protocol(), AppProtocol::Http1);
        assert!(conn.tls_end.is_none());
        assert_eq!(get(&mut conn, "/").await, "hello");
        assert_eq!(ep.connects.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn http2_chosen_by_alpn_over_tls_carries_a_request() {
        let id = identity("server");
        let srv = server(&id, ALL, BOTH, None);
        let (ep, r) = open_with(Protocol::Auto, Some(client(&id, ALL, BOTH)), |io| {
            tls_hello(srv, io)
        })
        .await;
        let Ok(mut conn) = r else {
            panic!("connect failed: {}", failed(r));
        };
        assert_eq!(conn.protocol(), AppProtocol::Http2);
        assert_eq!(
            conn.tls_end.as_ref().map(|e| e.server_name.as_str()),
            Some("localhost")
        );
        assert_eq!(get(&mut conn, "https://localhost/").await, "hello");
        assert_eq!(ep.tls_handshakes.load(Ordering::Relaxed), 1);
        assert!(tls_failures(&ep).is_empty());
    }
}
