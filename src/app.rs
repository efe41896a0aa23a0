//! The running proxy: upstreams, listeners, reload, and the orderly stop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::config::{Config, ListenerConfig};
use crate::http::proxy::Proxy;
use crate::http::HttpServer;
use crate::listener;
use crate::metrics::Metrics;
use crate::state::{ListenerInfo, Shared};
use crate::upstream::Upstream;

/// How long in-flight requests may take to finish after a stop signal, when
/// the config does not say.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = crate::config::defaults::DRAIN_TIMEOUT;

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

/// Binds every listener of `cfg`. Separate from [`App::start`] so that
/// `main` can fail before anything runs, and tests can bind port 0.
///
/// # Errors
/// The first socket that cannot be bound, naming its config key.
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

/// One serving listener.
struct Running {
    cfg: ListenerConfig,
    socket: Arc<TcpListener>,
    addr: SocketAddr,
    proxy: Arc<Proxy>,
    /// Tracks this listener's client connections, for its drain.
    graceful: Arc<GracefulShutdown>,
    /// Stops the current accept loop (a reload starts a new one).
    accepting: CancellationToken,
}

/// A started loopmux: listeners accepting, upstream pools ready.
pub struct App {
    pub admin_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    metrics: Metrics,
    cfg: Config,
    listeners: Vec<Running>,
    upstreams: Vec<Arc<Upstream>>,
    /// Stops every accept loop.
    shutdown: CancellationToken,
    /// Stops the admin endpoint, after the drain (so `/readyz` says 503
    /// while draining).
    admin_stop: CancellationToken,
    accept_loops: TaskTracker,
    /// Drains of listeners removed by a reload.
    retired: TaskTracker,
}

/// A reload fails the same ways a start does (binding, registering).
pub type ReloadError = StartError;

fn register(
    key: String,
    std_l: std::net::TcpListener,
) -> Result<(Arc<TcpListener>, SocketAddr), StartError> {
    let reg = |source| StartError::Register {
        key: key.clone(),
        source,
    };
    let l = TcpListener::from_std(std_l).map_err(reg)?;
    let addr = l.local_addr().map_err(reg)?;
    Ok((Arc::new(l), addr))
}

impl App {
    /// Starts serving on already-bound listeners (one per config listener).
    ///
    /// # Errors
    /// When a listener cannot be registered with the runtime.
    pub async fn start(cfg: Config, bound: Bound) -> Result<App, StartError> {
        let shared = Arc::new(Shared::default());
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut registry, shared.clone());
        let shutdown = CancellationToken::new();
        let admin_stop = CancellationToken::new();
        let mut upstreams = Vec::with_capacity(cfg.upstreams.len());
        for u in &cfg.upstreams {
            upstreams.push(Upstream::start(u.clone()).await);
        }
        let admin_addr = match bound.admin {
            Some(std_l) => {
                let (l, addr) = register("admin.bind".into(), std_l)?;
                tracing::info!(bind = %addr, "admin endpoint listening (/metrics /healthz /readyz /status)");
                let admin = Arc::new(Admin {
                    registry,
                    shared: shared.clone(),
                });
                let l = Arc::try_unwrap(l).unwrap_or_else(|_| unreachable!("just created"));
                tokio::spawn(crate::admin::serve(l, admin, admin_stop.clone()));
                Some(addr)
            }
            None => None,
        };
        let mut app = App {
            admin_addr,
            shared,
            metrics,
            listeners: Vec::new(),
            upstreams,
            shutdown,
            admin_stop,
            accept_loops: TaskTracker::new(),
            retired: TaskTracker::new(),
            cfg: cfg.clone(),
        };
        for (index, (lc, std_l)) in cfg.listeners.iter().zip(bound.listeners).enumerate() {
            let (socket, addr) = register(format!("listener[{index}].bind ({})", lc.name), std_l)?;
            let up = app.upstreams[lc.upstream].clone();
            let proxy = Arc::new(Proxy::new(
                lc.name.as_str().into(),
                up,
                app.metrics.listener(&lc.name),
                lc.access_log,
            ));
            let mut r = Running {
                cfg: lc.clone(),
                socket,
                addr,
                proxy,
                graceful: Arc::new(GracefulShutdown::new()),
                accepting: CancellationToken::new(),
            };
            app.spawn_accept(&mut r);
            app.listeners.push(r);
        }
        app.publish();
        app.shared.set_ready(true);
        Ok(app)
    }

    /// Starts (or restarts, after a reload) a listener's accept loop with
    /// its current settings. Open client connections are not touched.
    fn spawn_accept(&self, r: &mut Running) {
        r.accepting.cancel();
        r.accepting = self.shutdown.child_token();
        let up = r.proxy.upstream();
        tracing::info!(listener = %r.cfg.name, bind = %r.addr, mode = "http", upstream = %up.cfg.name, max_connections = up.cfg.max_connections, client_keepalive = r.cfg.client_keepalive, "listening");
        let server = Arc::new(HttpServer::new(&r.cfg, r.proxy.clone()));
        self.accept_loops.spawn(listener::accept_loop(
            r.socket.clone(),
            r.cfg.name.clone(),
            r.cfg.max_clients,
            server,
            r.graceful.clone(),
            r.accepting.clone(),
            self.metrics.listener(&r.cfg.name),
        ));
    }

    fn publish(&self) {
        let infos = self
            .listeners
            .iter()
            .map(|r| ListenerInfo {
                name: r.cfg.name.clone(),
                bind: r.addr,
                mode: "http",
                upstream: r.proxy.upstream().cfg.name.clone(),
                client_keepalive: r.cfg.client_keepalive,
            })
            .collect();
        self.shared.publish(self.upstreams.clone(), infos);
    }

    /// Where each listener is bound, in config order (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|r| r.addr).collect()
    }

    /// The upstreams, in config order.
    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        self.upstreams.clone()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Swaps in `cfg`: new listeners are bound, removed ones stop accepting
    /// and drain, changed upstreams get new pools while requests in flight
    /// finish on the old ones. On error nothing has changed.
    ///
    /// # Errors
    /// A new listener that cannot be bound; the running config stays.
    pub async fn reload(&mut self, cfg: Config) -> Result<(), ReloadError> {
        // Bind first: the only step that can fail.
        let key = |l: &ListenerConfig| (l.name.clone(), l.bind);
        let mut fresh_sockets = HashMap::new();
        for (i, lc) in cfg.listeners.iter().enumerate() {
            if !self.listeners.iter().any(|r| key(&r.cfg) == key(lc)) {
                let std_l = listener::bind(i, lc)?;
                let reg = |source| StartError::Register {
                    key: format!("listener[{i}].bind ({})", lc.name),
                    source,
                };
                let l = TcpListener::from_std(std_l).map_err(reg)?;
                let addr = l.local_addr().map_err(reg)?;
                fresh_sockets.insert(i, (Arc::new(l), addr));
            }
        }

        // Upstreams: keep the unchanged ones (their pools and connections).
        let mut upstreams = Vec::with_capacity(cfg.upstreams.len());
        for uc in &cfg.upstreams {
            match self.upstreams.iter().find(|u| u.cfg == *uc) {
                Some(u) => upstreams.push(u.clone()),
                None => {
                    tracing::info!(upstream = %uc.name, "upstream new or changed: new pools");
                    upstreams.push(Upstream::start(uc.clone()).await);
                }
            }
        }

        // Listeners: keep sockets of unchanged binds, point their proxies at
        // the new upstreams, restart their accept loops with new settings.
        let mut old = std::mem::take(&mut self.listeners);
        let mut next = Vec::with_capacity(cfg.listeners.len());
        for (i, lc) in cfg.listeners.iter().enumerate() {
            let up = upstreams[lc.upstream].clone();
            let mut r = match old.iter().position(|r| key(&r.cfg) == key(lc)) {
                Some(pos) => {
                    let mut r = old.swap_remove(pos);
                    r.proxy.set_upstream(up, lc.access_log);
                    r.cfg = lc.clone();
                    r
                }
                None => {
                    let (socket, addr) = fresh_sockets.remove(&i).expect("bound above");
                    Running {
                        cfg: lc.clone(),
                        socket,
                        addr,
                        proxy: Arc::new(Proxy::new(
                            lc.name.as_str().into(),
                            up,
                            self.metrics.listener(&lc.name),
                            lc.access_log,
                        )),
                        graceful: Arc::new(GracefulShutdown::new()),
                        accepting: CancellationToken::new(),
                    }
                }
            };
            self.spawn_accept(&mut r);
            next.push(r);
        }
        self.listeners = next;

        // Removed listeners: stop accepting (the socket closes with its
        // accept loop), then drain their connections in the background.
        for r in old {
            tracing::info!(listener = %r.cfg.name, bind = %r.addr, "listener removed: draining");
            r.accepting.cancel();
            let drain = cfg.drain_timeout;
            let graceful = r.graceful;
            self.retired.spawn(async move {
                // The accept loop holds a reference until it sees the cancel.
                let mut g = graceful;
                let shutdown = loop {
                    match Arc::try_unwrap(g) {
                        Ok(s) => break s,
                        Err(back) => {
                            g = back;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                };
                let _ = tokio::time::timeout(drain, shutdown.shutdown()).await;
            });
        }

        // Upstreams no longer used: idle connections close now, busy ones
        // when their request is done.
        for u in &self.upstreams {
            if !upstreams.iter().any(|n| Arc::ptr_eq(n, u)) {
                for ep in u.endpoints().iter() {
                    ep.pool.retire();
                }
            }
        }
        self.upstreams = upstreams;
        self.cfg = cfg;
        self.publish();
        tracing::info!(generation = self.shared.generation(), "config reloaded");
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish for up to `drain`,
    /// then cuts the rest. Returns `true` if everything finished in time.
    pub async fn stop(self, drain: Duration) -> bool {
        self.shared.set_ready(false);
        self.shutdown.cancel();
        self.accept_loops.close();
        self.accept_loops.wait().await;
        let drains = TaskTracker::new();
        for r in self.listeners {
            // The accept loops have ended; theirs were the other references.
            if let Ok(g) = Arc::try_unwrap(r.graceful) {
                drains.spawn(g.shutdown());
            }
        }
        drains.close();
        let clean = tokio::time::timeout(drain, drains.wait()).await.is_ok();
        if !clean {
            tracing::warn!(drain = %humantime::format_duration(drain), "drain timeout: cutting remaining client connections");
        }
        self.retired.close();
        let _ = tokio::time::timeout(drain, self.retired.wait()).await;
        // Idle upstream connections close now; nothing will use them.
        for up in &self.upstreams {
            for ep in up.endpoints().iter() {
                ep.pool.retire();
            }
        }
        self.admin_stop.cancel();
        clean
    }
}
