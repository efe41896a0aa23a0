//! Binding and accepting: one task per client connection, spawned before
//! any I/O on it; a semaphore bounds how many are open at once.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::ListenerConfig;
use crate::http::HttpServer;
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
}

/// A warning at most this often while a listener sits at its limit.
const LIMIT_WARN_EVERY: Duration = Duration::from_secs(60);

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
        let max = *limit.max.lock().unwrap_or_else(|p| p.into_inner());
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

/// Accepts until `shutdown` is cancelled, handing each connection to
/// `server` in its own task.
pub async fn accept_loop(
    listener: Arc<TcpListener>,
    name: String,
    limit: Arc<ClientLimit>,
    server: Arc<HttpServer>,
    graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
    shutdown: CancellationToken,
    stats: crate::metrics::ListenerStats,
) {
    let mut last_warn = None;
    loop {
        // At the limit, stop accepting: the kernel's backlog holds the rest.
        let Some(permit) = admit(&limit, &name, &stats, &mut last_warn, &shutdown).await else {
            return;
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                stats.accepted.inc();
                let active = stats.active.clone();
                let server = server.clone();
                let watcher = graceful.watcher();
                let span = tracing::debug_span!("conn", listener = %name, client.addr = %peer);
                tokio::spawn(
                    async move {
                        let _permit = permit;
                        active.inc();
                        server.serve(stream, watcher).await;
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
