//! Binding and accepting: one task per client connection, spawned before
//! any I/O on it; a semaphore bounds how many are open at once. Each
//! connection goes to the mode's [`Serve`] (the accept loop names no
//! mode); one [`Drain`] ends them all.
//! A listener may accept on several sockets (an intercept listener's
//! redirect ports): one loop, one limit, one drain for all of them.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::ListenerConfig;
use crate::sockopt::errno_text;

/// Bursts of connection-per-request clients arrive together; a short accept
/// queue turns them into SYN retries (1 s each).
const BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
#[error("{key}: cannot bind {addr}: {}", errno_text(source))]
pub struct BindError {
    /// The config key, e.g. `listener[0].bind (partner)` or `admin.bind`.
    pub key: String,
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// Binds a listener's address (SO_REUSEADDR, large backlog).
///
/// # Errors
/// [`BindError`] naming the listener, address and errno.
pub fn bind(index: usize, cfg: &ListenerConfig) -> Result<std::net::TcpListener, BindError> {
    bind_addr(cfg.bind).map_err(|source| BindError {
        key: format!("listener[{index}].bind ({})", cfg.name),
        addr: cfg.bind,
        source,
    })
}

pub fn bind_addr(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// How many client connections a listener may have open. Lives as long as
/// the listener (not its accept loop), so a reload cannot reset it.
pub struct ClientLimit {
    sem: Arc<Semaphore>,
    max: std::sync::Mutex<usize>,
}

impl ClientLimit {
    pub fn new(max: usize) -> Self {
        ClientLimit {
            sem: Arc::new(Semaphore::new(max)),
            max: std::sync::Mutex::new(max),
        }
    }

    /// Applies a reloaded `max_clients`. A lower limit takes free places
    /// at once and the rest as clients leave; until then nobody new is
    /// accepted (the semaphore is fair, so the shrinking claim goes first).
    pub fn resize(&self, max: usize) {
        let mut cur = self.max.lock().unwrap_or_else(|p| p.into_inner());
        if max > *cur {
            self.sem.add_permits(max - *cur);
        } else if max < *cur {
            let want = *cur - max;
            let left = want - self.sem.forget_permits(want);
            if left > 0 {
                let sem = self.sem.clone();
                // `left` < max_clients ≤ 1,000,000: fits u32.
                let n = u32::try_from(left).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(p) = sem.acquire_many_owned(n).await {
                        p.forget();
                    }
                });
            }
        }
        *cur = max;
    }

    /// A place now, or `None` at the limit: for a caller that refuses
    /// rather than waits (the serve role's handshakes and connections).
    pub fn try_acquire(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.sem.clone().try_acquire_owned().ok()
    }

    pub fn max(&self) -> usize {
        *self.max.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A listener's drain, as every connection of every mode sees it.
#[derive(Clone, Default)]
pub struct Drain {
    /// Cancelled when the drain starts: an HTTP connection closes after its
    /// current exchange; a raw connection goes on until the deadline.
    pub begun: CancellationToken,
    /// Cancelled at the drain's deadline: what is still open is cut.
    pub deadline: CancellationToken,
    /// Every open connection, of every mode.
    open: TaskTracker,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections still open at the deadline (and then cut).
    pub cut: usize,
}

impl Drained {
    pub fn clean(&self) -> bool {
        self.cut == 0
    }
}

/// After the deadline, how long cut connections get to close (their
/// tasks only have to notice the cancellation).
const CUT_GRACE: Duration = Duration::from_secs(1);

impl Drain {
    /// Signals every open connection, waits up to `timeout` for them, then
    /// cuts the rest. The accept loop must have stopped first.
    pub async fn run(&self, timeout: Duration) -> Drained {
        self.begun.cancel();
        self.open.close();
        if tokio::time::timeout(timeout, self.open.wait())
            .await
            .is_ok()
        {
            return Drained { cut: 0 };
        }
        let cut = self.open.len();
        self.deadline.cancel();
        let _ = tokio::time::timeout(CUT_GRACE, self.open.wait()).await;
        Drained { cut }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// Runs a connection future (hyper's) to its end; once the drain has
    /// begun it is asked to close after its current exchange (`shutdown`),
    /// and at the deadline it is cut (`None`).
    pub async fn until_drained<C: std::future::Future>(
        &self,
        mut conn: std::pin::Pin<&mut C>,
        shutdown: impl FnOnce(std::pin::Pin<&mut C>),
    ) -> Option<C::Output> {
        tokio::select! {
            biased;
            r = conn.as_mut() => Some(r),
            _ = self.begun.cancelled() => {
                shutdown(conn.as_mut());
                tokio::select! {
                    r = conn.as_mut() => Some(r),
                    _ = self.deadline.cancelled() => None,
                }
            }
        }
    }

    /// Runs `task` as part of this listener's connections (a serve-role
    /// stream's relay): the drain waits for it, then cuts it.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.open.spawn(task);
    }
}

/// What a mode does with each accepted connection: all the accept loop
/// knows of it. The loop is generic over it (one per mode, no dynamic
/// dispatch and no box of its own per connection).
///
/// An implementation should box its connection state (`Box::pin`) once
/// it has work to do: the task spawned per client connection then stays
/// small (it was 4.5 KiB, copied on every spawn), and an idle client
/// holds no more than it.
pub trait Serve: Send + Sync + 'static {
    /// Serves one client connection to its end; `drain` signals and then
    /// cuts it.
    fn serve_connection(
        self: &Arc<Self>,
        stream: tokio::net::TcpStream,
        drain: &Arc<Drain>,
    ) -> impl std::future::Future<Output = ()> + Send;
}

/// A warning at most this often while a listener sits at its limit.
pub(crate) const LIMIT_WARN_EVERY: Duration = Duration::from_secs(60);

/// Waits for a place under `max_clients`. At the limit it says so: the
/// gauge, the time counter, and a rate-limited warning.
async fn admit(
    limit: &ClientLimit,
    name: &str,
    stats: &crate::metrics::ListenerStats,
    last_warn: &mut Option<tokio::time::Instant>,
    shutdown: &CancellationToken,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match limit.sem.clone().try_acquire_owned() {
        Ok(p) => return Some(p),
        Err(tokio::sync::TryAcquireError::Closed) => return None,
        Err(tokio::sync::TryAcquireError::NoPermits) => {}
    }
    let now = tokio::time::Instant::now();
    if last_warn.map_or(true, |t| now.duration_since(t) >= LIMIT_WARN_EVERY) {
        *last_warn = Some(now);
        let max = limit.max();
        tracing::warn!(listener = %name, max_clients = max, "listener at max_clients: new clients wait in the kernel backlog");
    }
    stats.at_limit.set(1);
    let wait = limit.sem.clone().acquire_owned();
    tokio::pin!(wait);
    let mut since = now;
    let mut tick = tokio::time::interval_at(now + Duration::from_secs(1), Duration::from_secs(1));
    let permit = loop {
        tokio::select! {
            p = &mut wait => break p.ok(),
            _ = tick.tick() => {
                let t = tokio::time::Instant::now();
                stats.at_limit_seconds.inc_by(t.duration_since(since).as_secs_f64());
                since = t;
            }
            _ = shutdown.cancelled() => break None,
        }
    };
    stats.at_limit_seconds.inc_by(since.elapsed().as_secs_f64());
    stats.at_limit.set(0);
    permit
}

/// The next connection on any of `sockets`. The scan starts at `first`
/// (below `sockets.len()`): moving it on each time keeps a busy socket
/// from starving the others.
///
/// Cancel-safe: a connection is taken off a socket only when returned.
fn accept_any(
    sockets: &[Arc<TcpListener>],
    first: usize,
) -> impl std::future::Future<Output = io::Result<(tokio::net::TcpStream, SocketAddr)>> + '_ {
    std::future::poll_fn(move |cx| {
        let n = sockets.len();
        for k in 0..n {
            if let std::task::Poll::Ready(r) = sockets[(first + k) % n].poll_accept(cx) {
                return std::task::Poll::Ready(r);
            }
        }
        std::task::Poll::Pending
    })
}

/// Accepts on `sockets` until `shutdown` is cancelled, handing each
/// connection to `handler` in its own task, tracked by `drain`. One permit
/// under `max_clients` is taken before accepting on any socket, so several
/// sockets never hold more than one place in waiting.
pub async fn accept_loop<S: Serve>(
    sockets: Vec<Arc<TcpListener>>,
    name: String,
    limit: Arc<ClientLimit>,
    handler: Arc<S>,
    drain: Arc<Drain>,
    shutdown: CancellationToken,
    stats: crate::metrics::ListenerStats,
) {
    let mut last_warn = None;
    let mut first = 0usize;
    loop {
        // At the limit, stop accepting: the kernel's backlog holds the rest.
        let Some(permit) = admit(&limit, &name, &stats, &mut last_warn, &shutdown).await else {
            return;
        };
        first = (first + 1) % sockets.len().max(1);
        let accepted = tokio::select! {
            a = accept_any(&sockets, first) => a,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                stats.accepted.inc();
                let active = stats.active.clone();
                let handler = handler.clone();
                let conn_drain = drain.clone();
                let span = tracing::debug_span!("conn", listener = %name, client.addr = %peer);
                drain.open.spawn(
                    async move {
                        let _permit = permit;
                        active.inc();
                        handler.serve_connection(stream, &conn_drain).await;
                        active.dec();
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                let fd_limit = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE)
                        | Some(libc::ENFILE)
                        | Some(libc::ENOBUFS)
                        | Some(libc::ENOMEM)
                );
                tracing::warn!(listener = %name, error = %errno_text(&e), "accept failed");
                if fd_limit {
                    // Spinning on EMFILE burns a core and helps nobody.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every socket is served, and one that is always ready does not
    /// starve another.
    #[tokio::test]
    async fn accept_any_takes_from_every_socket() {
        let mut sockets = Vec::new();
        for _ in 0..2 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            sockets.push(Arc::new(l));
        }
        let addrs: Vec<SocketAddr> = sockets.iter().map(|l| l.local_addr().unwrap()).collect();
        // Both sockets have connections waiting at every accept.
        let mut clients = Vec::new();
        for _ in 0..4 {
            for a in &addrs {
                clients.push(tokio::net::TcpStream::connect(a).await.unwrap());
            }
        }
        let mut by_socket = [0usize; 2];
        for first in 0..4 {
            let (s, _) = accept_any(&sockets, first % 2).await.unwrap();
            let local = s.local_addr().unwrap();
            by_socket[addrs.iter().position(|a| *a == local).unwrap()] += 1;
        }
        assert_eq!(by_socket, [2, 2]);
    }
}
