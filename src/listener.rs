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
use crate::upstream::dialer::errno_text;

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

/// Accepts until `shutdown` is cancelled, handing each connection to
/// `server` in its own task.
pub async fn accept_loop(
    listener: Arc<TcpListener>,
    name: String,
    max_clients: usize,
    server: Arc<HttpServer>,
    graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
    shutdown: CancellationToken,
    stats: crate::metrics::ListenerStats,
) {
    let limit = Arc::new(Semaphore::new(max_clients));
    loop {
        // At the limit, stop accepting: the kernel's backlog holds the rest.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.cancelled() => return,
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
