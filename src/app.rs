//! The running proxy: upstreams, listeners, and their orderly stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::http::proxy::Proxy;
use crate::http::HttpServer;
use crate::listener;
use crate::upstream::Upstream;

/// How long in-flight requests may take to finish after a stop signal.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] listener::BindError),
    #[error("listener[{index}] ({name}): {source}")]
    Register {
        index: usize,
        name: String,
        source: std::io::Error,
    },
}

/// A started loopmux: listeners accepting, upstream pools ready.
pub struct App {
    pub upstreams: Vec<Arc<Upstream>>,
    /// Where each listener is bound, in config order (port 0 resolved).
    pub local_addrs: Vec<SocketAddr>,
    shutdown: CancellationToken,
    accept_loops: TaskTracker,
    graceful: Arc<GracefulShutdown>,
}

/// Binds every listener of `cfg`. Separate from [`App::start`] so that
/// `main` can fail before anything runs, and tests can bind port 0.
///
/// # Errors
/// The first listener that cannot be bound.
pub fn bind_all(cfg: &Config) -> Result<Vec<std::net::TcpListener>, listener::BindError> {
    cfg.listeners
        .iter()
        .enumerate()
        .map(|(i, l)| listener::bind(i, l))
        .collect()
}

impl App {
    /// Starts serving on already-bound listeners (one per config listener).
    ///
    /// # Errors
    /// When a listener cannot be registered with the runtime.
    pub async fn start(cfg: Config, bound: Vec<std::net::TcpListener>) -> Result<App, StartError> {
        let mut upstreams = Vec::with_capacity(cfg.upstreams.len());
        for u in &cfg.upstreams {
            upstreams.push(Upstream::start(u.clone()).await);
        }
        let shutdown = CancellationToken::new();
        let accept_loops = TaskTracker::new();
        let graceful = Arc::new(GracefulShutdown::new());
        let mut local_addrs = Vec::with_capacity(bound.len());
        for (index, (lc, std_l)) in cfg.listeners.iter().zip(bound).enumerate() {
            let reg = |source| StartError::Register {
                index,
                name: lc.name.clone(),
                source,
            };
            let l = TcpListener::from_std(std_l).map_err(reg)?;
            let addr = l.local_addr().map_err(reg)?;
            local_addrs.push(addr);
            let up = upstreams[lc.upstream].clone();
            tracing::info!(listener = %lc.name, bind = %addr, mode = "http", upstream = %up.cfg.name, max_connections = up.cfg.max_connections, client_keepalive = lc.client_keepalive, "listening");
            let proxy = Arc::new(Proxy::new(lc.name.clone(), up));
            let server = Arc::new(HttpServer::new(lc, proxy));
            accept_loops.spawn(listener::accept_loop(
                l,
                lc.name.clone(),
                lc.max_clients,
                server,
                graceful.clone(),
                shutdown.clone(),
            ));
        }
        accept_loops.close();
        Ok(App {
            upstreams,
            local_addrs,
            shutdown,
            accept_loops,
            graceful,
        })
    }

    /// Stops accepting, lets in-flight requests finish for up to `drain`,
    /// then cuts the rest. Returns `true` if everything finished in time.
    pub async fn stop(self, drain: Duration) -> bool {
        self.shutdown.cancel();
        self.accept_loops.wait().await;
        // The accept loops held the other references; they have ended.
        let Ok(graceful) = Arc::try_unwrap(self.graceful) else {
            return false;
        };
        match tokio::time::timeout(drain, graceful.shutdown()).await {
            Ok(()) => true,
            Err(_) => {
                tracing::warn!(drain = %humantime::format_duration(drain), "drain timeout: cutting remaining client connections");
                false
            }
        }
    }
}
