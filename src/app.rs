//! The running proxy: upstreams, listeners, and their orderly stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::config::Config;
use crate::http::proxy::Proxy;
use crate::http::HttpServer;
use crate::listener;
use crate::metrics::Metrics;
use crate::state::{ListenerInfo, Shared};
use crate::upstream::Upstream;

/// How long in-flight requests may take to finish after a stop signal.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] listener::BindError),
    #[error("{key}: {source}")]
    Register { key: String, source: std::io::Error },
}

/// Sockets bound before anything runs: one per listener, plus the admin
/// endpoint's.
pub struct Bound {
    pub listeners: Vec<std::net::TcpListener>,
    pub admin: Option<std::net::TcpListener>,
}

/// A started loopmux: listeners accepting, upstream pools ready.
pub struct App {
    pub upstreams: Vec<Arc<Upstream>>,
    /// Where each listener is bound, in config order (port 0 resolved).
    pub local_addrs: Vec<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    shutdown: CancellationToken,
    accept_loops: TaskTracker,
    graceful: Arc<GracefulShutdown>,
}

/// Binds every listener of `cfg`. Separate from [`App::start`] so that
/// `main` can fail before anything runs, and tests can bind port 0.
///
/// # Errors
/// The first listener that cannot be bound.
pub fn bind_all(cfg: &Config) -> Result<Bound, listener::BindError> {
    let listeners = cfg
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| listener::bind(i, l))
        .collect::<Result<Vec<_>, _>>()?;
    let admin = match &cfg.admin {
        Some(a) => Some(
            listener::bind_addr(a.bind).map_err(|source| listener::BindError {
                key: "admin.bind".into(),
                addr: a.bind,
                source,
            })?,
        ),
        None => None,
    };
    Ok(Bound { listeners, admin })
}

impl App {
    /// Starts serving on already-bound listeners (one per config listener).
    ///
    /// # Errors
    /// When a listener cannot be registered with the runtime.
    pub async fn start(cfg: Config, bound: Bound) -> Result<App, StartError> {
        let mut upstreams = Vec::with_capacity(cfg.upstreams.len());
        for u in &cfg.upstreams {
            upstreams.push(Upstream::start(u.clone()).await);
        }
        let shutdown = CancellationToken::new();
        let accept_loops = TaskTracker::new();
        let graceful = Arc::new(GracefulShutdown::new());
        let shared = Arc::new(Shared::default());
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut registry, shared.clone());
        let mut local_addrs = Vec::with_capacity(bound.listeners.len());
        let mut infos = Vec::with_capacity(bound.listeners.len());
        for (index, (lc, std_l)) in cfg.listeners.iter().zip(bound.listeners).enumerate() {
            let reg = |source| StartError::Register {
                key: format!("listener[{index}].bind ({})", lc.name),
                source,
            };
            let l = TcpListener::from_std(std_l).map_err(reg)?;
            let addr = l.local_addr().map_err(reg)?;
            local_addrs.push(addr);
            let up = upstreams[lc.upstream].clone();
            tracing::info!(listener = %lc.name, bind = %addr, mode = "http", upstream = %up.cfg.name, max_connections = up.cfg.max_connections, client_keepalive = lc.client_keepalive, "listening");
            infos.push(ListenerInfo {
                name: lc.name.clone(),
                bind: addr,
                mode: "http",
                upstream: up.cfg.name.clone(),
                client_keepalive: lc.client_keepalive,
            });
            let stats = metrics.listener(&lc.name);
            let proxy = Arc::new(Proxy::new(
                lc.name.as_str().into(),
                up,
                stats.clone(),
                lc.access_log,
            ));
            let server = Arc::new(HttpServer::new(lc, proxy));
            accept_loops.spawn(listener::accept_loop(
                l,
                lc.name.clone(),
                lc.max_clients,
                server,
                graceful.clone(),
                shutdown.clone(),
                stats,
            ));
        }
        let admin_addr = match bound.admin {
            Some(std_l) => {
                let reg = |source| StartError::Register {
                    key: "admin.bind".into(),
                    source,
                };
                let l = TcpListener::from_std(std_l).map_err(reg)?;
                let addr = l.local_addr().map_err(reg)?;
                tracing::info!(bind = %addr, "admin endpoint listening (/metrics /healthz /readyz /status)");
                let admin = Arc::new(Admin {
                    registry,
                    shared: shared.clone(),
                });
                tokio::spawn(crate::admin::serve(l, admin, shutdown.child_token()));
                Some(addr)
            }
            None => None,
        };
        accept_loops.close();
        shared.publish(upstreams.clone(), infos);
        shared.set_ready(true);
        Ok(App {
            upstreams,
            local_addrs,
            admin_addr,
            shared,
            shutdown,
            accept_loops,
            graceful,
        })
    }

    /// Stops accepting, lets in-flight requests finish for up to `drain`,
    /// then cuts the rest. Returns `true` if everything finished in time.
    pub async fn stop(self, drain: Duration) -> bool {
        self.shared.set_ready(false);
        self.shutdown.cancel();
        self.accept_loops.wait().await;
        // The accept loops held the other references; they have ended.
        let clean = match Arc::try_unwrap(self.graceful) {
            Ok(graceful) => match tokio::time::timeout(drain, graceful.shutdown()).await {
                Ok(()) => true,
                Err(_) => {
                    tracing::warn!(drain = %humantime::format_duration(drain), "drain timeout: cutting remaining client connections");
                    false
                }
            },
            Err(_) => false,
        };
        // Idle upstream connections close now; nothing will use them.
        for up in &self.upstreams {
            for ep in up.endpoints().iter() {
                ep.pool.retire();
            }
        }
        clean
    }
}
