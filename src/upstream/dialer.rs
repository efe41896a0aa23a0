//! Outbound TCP dialing, shared by every mode: a round-robin pool of source
//! addresses, bind-before-connect with `IP_BIND_ADDRESS_NO_PORT` and
//! `SO_REUSEADDR`, and failover to the next source when one runs out of
//! ports (`EADDRNOTAVAIL`) or is not assigned to the host.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::sockopt::{errno_text, set_bind_address_no_port};

/// Keepalive probes find upstreams that vanished without a FIN (a rebooted
/// NAT, a dead host) long before `idle_timeout` would.
const KEEPALIVE_TIME: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// One source address and what this dialer (or view) did with it.
#[derive(Debug)]
pub struct Source {
    pub ip: IpAddr,
    /// How often this source hit `EADDRNOTAVAIL` (ports exhausted or address
    /// not assigned).
    pub addr_not_avail: AtomicU64,
    /// Connections dialed from this source that are still open (see
    /// [`SourceLease`]).
    pub active: AtomicUsize,
}

/// Counts one open connection against its source until dropped.
pub struct SourceLease {
    dialer: std::sync::Arc<Dialer>,
    index: usize,
}

impl Drop for SourceLease {
    fn drop(&mut self) {
        self.dialer.sources[self.index]
            .active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every view of one dialer shares: the sources' back-off and the
/// round-robin position.
#[derive(Debug)]
struct Common {
    /// Per source: milliseconds since `epoch` before which it is tried
    /// only after the healthy ones.
    failed_until_ms: Vec<AtomicU64>,
    next: AtomicUsize,
    epoch: Instant,
}

/// Dials upstream connections. Cheap to share behind an `Arc`. A
/// [`view`](Self::view) dials through the same sources (their back-off and
/// round-robin) but counts its own connections and `EADDRNOTAVAIL`: each
/// forward origin has one, so its figures are its own.
#[derive(Debug)]
pub struct Dialer {
    sources: Vec<Source>,
    common: std::sync::Arc<Common>,
    connect_timeout: Duration,
    failure_backoff: Duration,
}

/// A connected stream and the source address it left from.
#[derive(Debug)]
pub struct Dialed {
    pub stream: TcpStream,
    pub local: SocketAddr,
    /// Index into [`Dialer::sources`], when a source was bound.
    pub source: Option<usize>,
}

/// A dial that failed: where to, from where, and why.
#[derive(Debug, thiserror::Error)]
pub struct DialError {
    pub dest: SocketAddr,
    /// `None`: the kernel chose (no `source_addresses`).
    pub from: Option<IpAddr>,
    pub kind: DialErrorKind,
}

#[derive(Debug)]
pub enum DialErrorKind {
    Timeout(Duration),
    Io(io::Error),
    /// Sources are configured, but none of the destination's family.
    NoSourceForFamily,
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connect to {} from ", self.dest)?;
        match self.from {
            Some(ip) => write!(f, "{ip}")?,
            None => f.write_str("kernel-chosen source")?,
        }
        match &self.kind {
            DialErrorKind::Timeout(d) => {
                write!(f, " timed out after {}", humantime::format_duration(*d))
            }
            DialErrorKind::Io(e) => write!(f, " failed: {}", errno_text(e)),
            DialErrorKind::NoSourceForFamily => f.write_str(
                " failed: no source address of the destination's IP family is configured",
            ),
        }
    }
}

impl DialError {
    /// The errno, when the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        match &self.kind {
            DialErrorKind::Io(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// Whether trying another source address could help.
fn source_exhausted(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE)
    )
}

impl Dialer {
    pub fn new(sources: &[IpAddr], connect_timeout: Duration, failure_backoff: Duration) -> Self {
        Dialer {
            sources: fresh_sources(sources.iter().copied()),
            common: std::sync::Arc::new(Common {
                failed_until_ms: sources.iter().map(|_| AtomicU64::new(0)).collect(),
                next: AtomicUsize::new(0),
                epoch: Instant::now(),
            }),
            connect_timeout,
            failure_backoff,
        }
    }

    /// A dialer over the same sources, with counts of its own.
    pub fn view(&self) -> Dialer {
        Dialer {
            sources: fresh_sources(self.sources.iter().map(|s| s.ip)),
            common: self.common.clone(),
            connect_timeout: self.connect_timeout,
            failure_backoff: self.failure_backoff,
        }
    }

    /// Whether `self` and `other` are views of one dialer.
    pub fn same_sources(&self, other: &Dialer) -> bool {
        std::sync::Arc::ptr_eq(&self.common, &other.common)
    }

    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Starts counting a dialed connection against its source; keep the
    /// lease as long as the connection lives.
    pub fn lease(self: &std::sync::Arc<Self>, source: Option<usize>) -> Option<SourceLease> {
        let index = source?;
        self.sources
            .get(index)?
            .active
            .fetch_add(1, Ordering::Relaxed);
        Some(SourceLease {
            dialer: self.clone(),
            index,
        })
    }

    fn now_ms(&self) -> u64 {
        self.common.epoch.elapsed().as_millis() as u64
    }

    /// The order to try sources in: round-robin start, sources of the
    /// destination's family only, recently failed ones last.
    fn order(&self, dest: SocketAddr) -> Vec<usize> {
        let n = self.sources.len();
        let start = self.common.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let mut healthy = Vec::with_capacity(n);
        let mut failed = Vec::new();
        for k in 0..n {
            let i = (start + k) % n;
            let s = &self.sources[i];
            if s.ip.is_ipv4() != dest.is_ipv4() {
                continue;
            }
            if self.common.failed_until_ms[i].load(Ordering::Relaxed) > now {
                failed.push(i);
            } else {
                healthy.push(i);
            }
        }
        healthy.extend(failed);
        healthy
    }

    /// Connects to `dest`, trying each source address in turn on
    /// `EADDRNOTAVAIL`/`EADDRINUSE`, all within `connect_timeout`.
    ///
    /// # Errors
    /// The last failure, naming destination, source and errno. Cancel-safe:
    /// dropping the future closes the half-open socket.
    pub async fn dial(&self, dest: SocketAddr) -> Result<Dialed, DialError> {
        let mut last_source = None;
        match tokio::time::timeout(
            self.connect_timeout,
            self.dial_inner(dest, &mut last_source),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(DialError {
                dest,
                from: last_source,
                kind: DialErrorKind::Timeout(self.connect_timeout),
            }),
        }
    }

    async fn dial_inner(
        &self,
        dest: SocketAddr,
        last_source: &mut Option<IpAddr>,
    ) -> Result<Dialed, DialError> {
        if self.sources.is_empty() {
            return match connect_from(None, dest).await {
                Ok(stream) => Ok(finish(stream, None)),
                Err(e) => Err(DialError {
                    dest,
                    from: None,
                    kind: DialErrorKind::Io(e),
                }),
            };
        }
        let order = self.order(dest);
        let mut last_err = None;
        for i in order {
            let src = &self.sources[i];
            *last_source = Some(src.ip);
            match connect_from(Some(src.ip), dest).await {
                Ok(stream) => {
                    self.common.failed_until_ms[i].store(0, Ordering::Relaxed);
                    return Ok(finish(stream, Some(i)));
                }
                Err(e) if source_exhausted(&e) => {
                    if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                        src.addr_not_avail.fetch_add(1, Ordering::Relaxed);
                    }
                    let until = self.now_ms() + self.failure_backoff.as_millis() as u64;
                    self.common.failed_until_ms[i].store(until, Ordering::Relaxed);
                    tracing::warn!(source = %src.ip, dest = %dest, error = %errno_text(&e), "source address failed, trying the next one");
                    last_err = Some(DialError {
                        dest,
                        from: Some(src.ip),
                        kind: DialErrorKind::Io(e),
                    });
                }
                // Refused, unreachable and friends are about the destination:
                // another source would fail the same way.
                Err(e) => {
                    return Err(DialError {
                        dest,
                        from: Some(src.ip),
                        kind: DialErrorKind::Io(e),
                    })
                }
            }
        }
        Err(last_err.unwrap_or(DialError {
            dest,
            from: None,
            kind: DialErrorKind::NoSourceForFamily,
        }))
    }
}

fn fresh_sources(ips: impl Iterator<Item = IpAddr>) -> Vec<Source> {
    ips.map(|ip| Source {
        ip,
        addr_not_avail: AtomicU64::new(0),
        active: AtomicUsize::new(0),
    })
    .collect()
}

fn finish(stream: TcpStream, source: Option<usize>) -> Dialed {
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
    Dialed {
        stream,
        local,
        source,
    }
}

async fn connect_from(source: Option<IpAddr>, dest: SocketAddr) -> io::Result<TcpStream> {
    let sock = Socket::new(
        Domain::for_address(dest),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    if let Some(ip) = source {
        set_bind_address_no_port(&sock)?;
        sock.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    if let Err(e) = sock.set_tcp_nodelay(true) {
        tracing::warn!(error = %e, "TCP_NODELAY not set");
    }
    let ka = TcpKeepalive::new()
        .with_time(KEEPALIVE_TIME)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::warn!(error = %e, "TCP keepalive not set");
    }
    TcpSocket::from_std_stream(sock.into()).connect(dest).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    async fn listener(ip: &str) -> (tokio::net::TcpListener, SocketAddr) {
        let l = tokio::net::TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
            .await
            .unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    fn no_port_option(s: &TcpStream) -> libc::c_int {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid fd, buffer and length for an int option.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        v
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn round_robins_sources_and_sets_options() {
        let (l, dest) = listener("127.0.0.1").await;
        let d = Dialer::new(
            &ips(&["127.0.0.2", "127.0.0.3"]),
            Duration::from_secs(2),
            Duration::from_secs(5),
        );
        let mut seen = Vec::new();
        for _ in 0..4 {
            let c = d.dial(dest).await.unwrap();
            let (_, peer) = l.accept().await.unwrap();
            assert_eq!(peer, c.local);
            assert!(c.stream.nodelay().unwrap());
            let sref = socket2::SockRef::from(&c.stream);
            assert!(sref.reuse_address().unwrap());
            assert!(sref.keepalive().unwrap());
            assert_eq!(no_port_option(&c.stream), 1);
            seen.push(c.local.ip().to_string());
        }
        assert_eq!(seen, ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"]);
    }

    #[tokio::test]
    async fn unassigned_source_fails_over_and_is_skipped_after() {
        let (l, dest) = listener("127.0.0.1").await;
        // 198.18.0.1 is not on any interface here: bind gives EADDRNOTAVAIL.
        let d = Dialer::new(
            &ips(&["198.18.0.1", "127.0.0.4"]),
            Duration::from_secs(2),
            Duration::from_secs(60),
        );
        for _ in 0..3 {
            let c = d.dial(dest).await.unwrap();
            l.accept().await.unwrap();
            assert_eq!(c.local.ip().to_string(), "127.0.0.4");
        }
        // Failed once, then skipped while in back-off.
        assert_eq!(d.sources()[0].addr_not_avail.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn every_source_failing_names_source_and_errno() {
        let (_l, dest) = listener("127.0.0.1").await;
        let d = Dialer::new(
            &ips(&["198.18.0.1"]),
            Duration::from_secs(2),
            Duration::from_secs(5),
        );
        let e = d.dial(dest).await.unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.errno(), Some(libc::EADDRNOTAVAIL));
        assert!(
            msg.contains(&dest.to_string())
                && msg.contains("198.18.0.1")
                && msg.contains("EADDRNOTAVAIL"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn refused_is_reported_without_trying_other_sources() {
        // Bound but not listening: refuses, and no other test can take it.
        let guard = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        guard
            .bind(&SockAddr::from(
                "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
            ))
            .unwrap();
        let dest = guard.local_addr().unwrap().as_socket().unwrap();
        let d = Dialer::new(
            &ips(&["127.0.0.2", "127.0.0.3"]),
            Duration::from_secs(2),
            Duration::from_secs(5),
        );
        let e = d.dial(dest).await.unwrap_err();
        assert_eq!(e.errno(), Some(libc::ECONNREFUSED));
        assert!(e.to_string().contains("ECONNREFUSED"), "{e}");
    }

    #[tokio::test]
    async fn ipv6_source_and_destination() {
        let Ok(l) = tokio::net::TcpListener::bind("[::1]:0").await else {
            eprintln!("skipped: no IPv6 loopback on this host");
            return;
        };
        let dest = l.local_addr().unwrap();
        let d = Dialer::new(
            &ips(&["127.0.0.2", "::1"]),
            Duration::from_secs(2),
            Duration::from_secs(5),
        );
        let c = d.dial(dest).await.unwrap();
        assert_eq!(c.local.ip().to_string(), "::1");
        assert_eq!(c.source, Some(1));
    }

    #[tokio::test]
    async fn family_mismatch_is_explained() {
        let (_l, dest) = listener("127.0.0.1").await;
        let d = Dialer::new(
            &ips(&["::1"]),
            Duration::from_secs(2),
            Duration::from_secs(5),
        );
        let e = d.dial(dest).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("no source address of the destination's IP family"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn kernel_chosen_source_works() {
        let (l, dest) = listener("127.0.0.1").await;
        let d = Dialer::new(&[], Duration::from_secs(2), Duration::from_secs(5));
        let c = d.dial(dest).await.unwrap();
        l.accept().await.unwrap();
        assert_eq!(c.source, None);
    }
}
