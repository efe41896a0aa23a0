//! The running proxy: upstreams, listeners, reload, and the orderly stop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::config::{Config, HttpKeys, InterceptConfig, ListenerConfig, ModeConfig};
use crate::forward::Forward;
use crate::http::proxy::Proxy;
use crate::http::HttpServer;
use crate::intercept::ports::{self, PortKey, RedirectPort};
use crate::listener;
use crate::listener::{Drain, Drained};
use crate::metrics::Metrics;
use crate::serve::ServeServer;
use crate::status::{ListenerInfo, Status, StatusCollector, UpstreamViews};
use crate::tcp::TcpServer;
use crate::upstream::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] listener::BindError),
    #[error("{key}: {source}")]
    Register { key: String, source: std::io::Error },
    #[error("interception: {0}")]
    Intercept(String),
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

/// What a listener's connections are served by, kept across reloads,
/// with the keys the next accept loop starts with.
enum Serving {
    Http {
        proxy: Arc<Proxy>,
        http: HttpKeys,
    },
    /// The proxy's router is `forward`.
    Forward {
        proxy: Arc<Proxy>,
        forward: Arc<Forward>,
        http: HttpKeys,
    },
    /// `tcp` and `tunnel`.
    Tcp(Arc<TcpServer>),
    Serve(Arc<ServeServer>),
    /// Forward routing behind SO_ORIGINAL_DST.
    Intercept {
        proxy: Arc<Proxy>,
        forward: Arc<Forward>,
        http: HttpKeys,
        intercept: Box<InterceptConfig>,
        stats: crate::metrics::RawStats,
        kinds: crate::metrics::InterceptStats,
    },
}

impl Serving {
    fn upstream(&self) -> Option<Arc<Upstream>> {
        match self {
            Serving::Http { proxy, .. } => proxy.upstream(),
            Serving::Tcp(t) => Some(t.upstream()),
            Serving::Forward { .. } | Serving::Serve(_) | Serving::Intercept { .. } => None,
        }
    }

    fn forward(&self) -> Option<&Arc<Forward>> {
        match self {
            Serving::Forward { forward, .. } | Serving::Intercept { forward, .. } => Some(forward),
            Serving::Http { .. } | Serving::Tcp(_) | Serving::Serve(_) => None,
        }
    }

    /// A reload of a listener that keeps its mode (one that changes mode
    /// is built anew, so the other pairs do not occur).
    async fn reconfigure(&mut self, upstreams: &[Arc<Upstream>], mode: &ModeConfig) {
        // Validation checked every upstream index against this list.
        let up = mode.upstream().map(|i| upstreams[i].clone());
        match (self, mode) {
            (Serving::Http { proxy, http: keys }, ModeConfig::Http { http, .. }) => {
                proxy.reconfigure(up, http);
                keys.clone_from(http);
            }
            (
                Serving::Forward {
                    proxy,
                    forward: f,
                    http: keys,
                },
                ModeConfig::Forward {
                    forward,
                    http,
                    half_close_timeout,
                },
            ) => {
                proxy.reconfigure(None, http);
                keys.clone_from(http);
                f.reconfigure(forward, *half_close_timeout).await;
            }
            (
                Serving::Intercept {
                    proxy,
                    forward: f,
                    http: keys,
                    intercept: ic,
                    ..
                },
                ModeConfig::Intercept {
                    intercept,
                    forward,
                    http,
                    half_close_timeout,
                },
            ) => {
                proxy.reconfigure(None, http);
                keys.clone_from(http);
                ic.clone_from(intercept);
                f.reconfigure(forward, *half_close_timeout).await;
            }
            (Serving::Tcp(t), ModeConfig::Tcp(relay)) => {
                if let Some(up) = up {
                    t.reconfigure(up, relay, None);
                }
            }
            (Serving::Tcp(t), ModeConfig::Tunnel { relay, target }) => {
                if let Some(up) = up {
                    t.reconfigure(up, relay, Some(target.clone()));
                }
            }
            (Serving::Serve(s), ModeConfig::Serve(cfg)) => s.reconfigure(cfg),
            _ => {}
        }
    }

    /// Starts the accept loop for new connections with the mode's
    /// [`listener::Serve`]; `locals` are the listener's own addresses, all
    /// of its sockets.
    fn spawn_accept_loop(&self, locals: Vec<SocketAddr>, a: AcceptArgs) -> JoinHandle<()> {
        match self {
            Serving::Http { proxy, http } | Serving::Forward { proxy, http, .. } => {
                a.spawn(Arc::new(HttpServer::new(http, proxy.clone())))
            }
            Serving::Tcp(t) => a.spawn(t.clone()),
            Serving::Serve(s) => a.spawn(s.clone()),
            Serving::Intercept {
                proxy,
                forward,
                http,
                intercept,
                stats,
                kinds,
            } => a.spawn(Arc::new(crate::intercept::InterceptServer::new(
                Arc::new(HttpServer::new(http, proxy.clone())),
                forward.clone(),
                intercept,
                locals,
                stats.clone(),
                kinds.clone(),
            ))),
        }
    }
}

/// What every accept loop gets besides its mode's server.
struct AcceptArgs {
    sockets: Vec<Arc<TcpListener>>,
    name: String,
    limit: Arc<listener::ClientLimit>,
    drain: Arc<Drain>,
    shutdown: CancellationToken,
    stats: crate::metrics::ListenerStats,
}

impl AcceptArgs {
    fn spawn<S: listener::Serve>(self, server: Arc<S>) -> JoinHandle<()> {
        tokio::spawn(listener::accept_loop(
            self.sockets,
            self.name,
            self.limit,
            server,
            self.drain,
            self.shutdown,
            self.stats,
        ))
    }
}

/// One serving listener.
struct Running {
    cfg: ListenerConfig,
    socket: Arc<TcpListener>,
    addr: SocketAddr,
    serving: Serving,
    /// An intercept listener's redirect ports, one per destination rule
    /// (the first may be `socket` itself); empty in other modes.
    redirects: Vec<RedirectPort>,
    /// `max_clients`, kept across reloads.
    limit: Arc<listener::ClientLimit>,
    /// Every open client connection of this listener, whatever its mode,
    /// and the signals that end them.
    drain: Arc<Drain>,
    /// Stops the current accept loop (a reload starts a new one).
    accepting: CancellationToken,
    accept: Option<JoinHandle<()>>,
}

impl Running {
    /// Every socket the listener accepts on: its own, then the redirect
    /// ports that are not it.
    fn sockets(&self) -> Vec<Arc<TcpListener>> {
        let mut all = vec![self.socket.clone()];
        all.extend(
            self.redirects
                .iter()
                .filter(|p| !Arc::ptr_eq(&p.socket, &self.socket))
                .map(|p| p.socket.clone()),
        );
        all
    }

    /// The addresses of [`Self::sockets`].
    fn locals(&self) -> Vec<SocketAddr> {
        let mut all = vec![self.addr];
        all.extend(
            self.redirects
                .iter()
                .filter(|p| !Arc::ptr_eq(&p.socket, &self.socket))
                .map(|p| p.addr),
        );
        all
    }

    /// Stops accepting and waits for the accept loop to end, so that no
    /// connection starts after the drain has begun.
    async fn stop_accepting(&mut self) {
        self.accepting.cancel();
        if let Some(h) = self.accept.take() {
            let _ = h.await;
        }
    }

    /// Stops accepting, then lets open connections finish for up to `drain`
    /// and cuts the rest.
    async fn drain(mut self, drain: Duration) -> Drained {
        self.stop_accepting().await;
        // Close the listening socket now: new clients are refused at once
        // (and fail over) instead of waiting in a backlog nobody reads.
        let Running {
            socket,
            redirects,
            drain: signals,
            cfg,
            ..
        } = self;
        drop(socket);
        drop(redirects);
        let open = signals.open();
        let drained = signals.run(drain).await;
        if drained.clean() {
            tracing::info!(listener = %cfg.name, connections = open, "listener drained");
        } else {
            tracing::warn!(listener = %cfg.name, connections = open, cut = drained.cut, drain = %humantime::format_duration(drain), "drain timeout: connections still open were cut");
        }
        drained
    }
}

/// A started loopmux: listeners accepting, upstream pools ready.
pub struct App {
    pub admin_addr: Option<SocketAddr>,
    /// The current upstreams and listeners, as the admin endpoint sees them.
    pub shared: Arc<Status>,
    metrics: Metrics,
    /// The configured upstreams, in config order.
    upstreams: Vec<Arc<Upstream>>,
    cfg: Config,
    listeners: Vec<Running>,
    /// Stops the admin endpoint, after the drain (so `/readyz` says 503
    /// while draining).
    admin_stop: CancellationToken,
    /// Drains of listeners removed by a reload.
    retired: TaskTracker,
    /// The kernel rules of the intercept listeners, while any exist.
    rules: Option<crate::intercept::rules::Keeper>,
}

/// A reload fails the same ways a start does (binding, registering).
pub type ReloadError = StartError;

/// Hands a bound socket to the runtime.
fn register(
    key: String,
    std_l: std::net::TcpListener,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let reg = |source| StartError::Register {
        key: key.clone(),
        source,
    };
    let l = TcpListener::from_std(std_l).map_err(reg)?;
    let addr = l.local_addr().map_err(reg)?;
    Ok((l, addr))
}

fn listener_key(index: usize, lc: &ListenerConfig) -> String {
    format!("listener[{index}].bind ({})", lc.name)
}

/// An intercept listener's redirect ports, planned before anything
/// changes: each rule's key and the sockets bound for keys not served yet.
struct RedirectPlan {
    keys: Vec<PortKey>,
    fresh: Vec<RedirectPort>,
    /// The listener stays an intercept listener: its redirect ports are
    /// kept for the rules that stay. Otherwise its own socket serves the
    /// first rule.
    keeps: bool,
}

impl RedirectPlan {
    /// Binds the redirect ports `lc` needs besides those in `have` (the
    /// listener's now, when it stays an intercept listener); without
    /// `have`, the listener's own socket serves the first rule.
    fn bind(
        index: usize,
        lc: &ListenerConfig,
        have: Option<&[RedirectPort]>,
    ) -> Result<Option<RedirectPlan>, StartError> {
        let Some(ic) = lc.mode.intercept() else {
            return Ok(None);
        };
        let keys = ports::keys(ic).map_err(StartError::Intercept)?;
        let served: Vec<PortKey> = match have {
            Some(h) => h.iter().map(|p| p.key.clone()).collect(),
            None => keys.first().cloned().into_iter().collect(),
        };
        let fresh =
            ports::bind(lc.bind, ports::missing(&keys, &served)).map_err(|(key, addr, source)| {
                let rule = match &key {
                    PortKey::Rule(m) => format!("`{}`", ports::shown(m)),
                    PortKey::Rest => format!("the rules after the first {}", ports::MAX_OWN_PORTS),
                };
                listener::BindError {
                    key: format!(
                        "listener[{index}].intercept.destinations ({}): the redirect port for {rule}",
                        lc.name
                    ),
                    addr,
                    source,
                }
            })?;
        Ok(Some(RedirectPlan {
            keys,
            fresh,
            keeps: have.is_some(),
        }))
    }

    /// The `(key, port)` pairs [`apply`](Self::apply) will give the
    /// listener, known before it runs: for the rules a reload installs
    /// before anything is swapped. `own`: the listener's socket address;
    /// `kept`: its redirect ports now, when it stays an intercept listener.
    fn ports(&self, own: SocketAddr, kept: Option<&[RedirectPort]>) -> Vec<(PortKey, u16)> {
        let have: Vec<(PortKey, u16)> = match (self.keeps, kept) {
            (true, Some(k)) => k.iter().map(|p| (p.key.clone(), p.addr.port())).collect(),
            _ => self
                .keys
                .first()
                .map(|k| (k.clone(), own.port()))
                .into_iter()
                .collect(),
        };
        let fresh = self
            .fresh
            .iter()
            .map(|p| (p.key.clone(), p.addr.port()))
            .collect();
        ports::assemble_by(&self.keys, have, fresh, |(k, _)| k)
    }

    /// The listener's redirect ports: `r`'s own that stay, and the fresh.
    fn apply(self, r: &mut Running) {
        let have = if self.keeps {
            std::mem::take(&mut r.redirects)
        } else {
            self.keys
                .first()
                .map(|k| RedirectPort {
                    key: k.clone(),
                    socket: r.socket.clone(),
                    addr: r.addr,
                })
                .into_iter()
                .collect()
        };
        r.redirects = ports::assemble(&self.keys, have, self.fresh);
    }
}

impl App {
    /// Starts serving on already-bound listeners (one per config listener).
    ///
    /// # Errors
    /// When a listener cannot be registered with the runtime, or an
    /// intercept listener's redirect port cannot be bound.
    pub async fn start(cfg: Config, bound: Bound) -> Result<App, StartError> {
        // Every socket first, redirect ports included: one that cannot be
        // bound stops the start before anything runs.
        let mut sockets = Vec::with_capacity(cfg.listeners.len());
        for (index, (lc, std_l)) in cfg.listeners.iter().zip(bound.listeners).enumerate() {
            let (socket, addr) = register(listener_key(index, lc), std_l)?;
            sockets.push((socket, addr, RedirectPlan::bind(index, lc, None)?));
        }
        let shared = Arc::new(Status::default());
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut registry);
        registry
            .sub_registry_with_prefix(crate::metrics::PREFIX)
            .register_collector(Box::new(StatusCollector::new(shared.clone())));
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
                    status: shared.clone(),
                });
                tokio::spawn(crate::admin::serve(l, admin, admin_stop.clone()));
                Some(addr)
            }
            None => None,
        };
        let mut app = App {
            admin_addr,
            shared,
            metrics,
            upstreams: Vec::new(),
            listeners: Vec::with_capacity(cfg.listeners.len()),
            admin_stop,
            retired: TaskTracker::new(),
            rules: None,
            cfg: cfg.clone(),
        };
        for (lc, (socket, addr, plan)) in cfg.listeners.iter().zip(sockets) {
            let mut r = app.running(lc, Arc::new(socket), addr, &upstreams);
            if let Some(plan) = plan {
                plan.apply(&mut r);
            }
            app.spawn_accept(&mut r).await;
            app.listeners.push(r);
        }
        app.publish(upstreams);
        let (wanted, dns_refresh) = Self::intercepted(app.listeners.iter().map(|r| {
            let ports = r
                .redirects
                .iter()
                .map(|p| (p.key.clone(), p.addr.port()))
                .collect();
            (&r.cfg, ports)
        }))?;
        app.rules = app
            .install_rules(None, wanted, dns_refresh)
            .await
            .map_err(|(e, _)| e)?;
        app.shared.set_ready(true);
        Ok(app)
    }

    fn running(
        &self,
        lc: &ListenerConfig,
        socket: Arc<TcpListener>,
        addr: SocketAddr,
        upstreams: &[Arc<Upstream>],
    ) -> Running {
        let name = lc.name.as_str();
        // Validation checked every upstream index against this list.
        let up = |i: usize| upstreams[i].clone();
        let routed = |forward, http, half_close| {
            let f = Forward::new(forward, half_close, addr, self.metrics.forward(name));
            let router: Arc<dyn crate::http::route::Router> = f.clone();
            let proxy = Proxy::routed(name, http, router, self.metrics.listener(name));
            (Arc::new(proxy), f)
        };
        let serving = match &lc.mode {
            ModeConfig::Serve(cfg) => {
                Serving::Serve(ServeServer::new(cfg, addr, self.metrics.serve()))
            }
            ModeConfig::Intercept {
                intercept,
                forward,
                http,
                half_close_timeout,
            } => {
                let (proxy, forward) = routed(forward, http, *half_close_timeout);
                Serving::Intercept {
                    proxy,
                    forward,
                    http: http.clone(),
                    intercept: intercept.clone(),
                    stats: self.metrics.tcp(name),
                    kinds: self.metrics.intercept(name),
                }
            }
            ModeConfig::Forward {
                forward,
                http,
                half_close_timeout,
            } => {
                let (proxy, forward) = routed(forward, http, *half_close_timeout);
                Serving::Forward {
                    proxy,
                    forward,
                    http: http.clone(),
                }
            }
            ModeConfig::Http { upstream, http } => Serving::Http {
                proxy: Arc::new(Proxy::fixed(
                    name,
                    http,
                    up(*upstream),
                    self.metrics.listener(name),
                )),
                http: http.clone(),
            },
            ModeConfig::Tcp(relay) => Serving::Tcp(Arc::new(TcpServer::new(
                name,
                relay,
                None,
                up(relay.upstream),
                self.metrics.tcp(name),
            ))),
            ModeConfig::Tunnel { relay, target } => Serving::Tcp(Arc::new(TcpServer::new(
                name,
                relay,
                Some(target.clone()),
                up(relay.upstream),
                self.metrics.tcp(name),
            ))),
        };
        Running {
            cfg: lc.clone(),
            socket,
            addr,
            serving,
            redirects: Vec::new(),
            limit: Arc::new(listener::ClientLimit::new(lc.max_clients)),
            drain: Arc::default(),
            accepting: CancellationToken::new(),
            accept: None,
        }
    }

    /// Starts (or restarts, after a reload) a listener's accept loop with
    /// its current settings. Open client connections are not touched; new
    /// ones wait in the kernel's backlog during the switch.
    async fn spawn_accept(&self, r: &mut Running) {
        r.stop_accepting().await;
        r.accepting = CancellationToken::new();
        let (name, bind) = (&r.cfg.name, r.addr);
        match (&r.cfg.mode, r.serving.upstream(), r.serving.forward()) {
            (ModeConfig::Tcp(relay), Some(up), _) => {
                tracing::info!(listener = %name, %bind, mode = "tcp", upstream = %up.cfg.name, sources = up.cfg.source_addresses.len(), idle_timeout = %humantime::format_duration(relay.idle_timeout), "listening");
            }
            (ModeConfig::Tunnel { target, .. }, Some(up), _) => {
                tracing::info!(listener = %name, %bind, mode = "tunnel", upstream = %up.cfg.name, %target, max_connections = up.cfg.max_connections, tls = up.cfg.tls.is_some(), "listening");
            }
            (ModeConfig::Http { http, .. }, Some(up), _) => {
                tracing::info!(listener = %name, %bind, mode = "http", upstream = %up.cfg.name, max_connections = up.cfg.max_connections, client_keepalive = http.client_keepalive, "listening");
            }
            (mode, None, Some(f)) => {
                let c = f.config();
                let client_keepalive = mode.http().is_some_and(|h| h.client_keepalive);
                tracing::info!(listener = %name, %bind, mode = mode.kind().as_str(), allow_rules = c.allow.len(), max_origins = c.max_origins, max_connections_per_origin = c.origin.max_connections, client_keepalive, "listening");
            }
            _ => {}
        }
        let args = AcceptArgs {
            sockets: r.sockets(),
            name: r.cfg.name.clone(),
            limit: r.limit.clone(),
            drain: r.drain.clone(),
            shutdown: r.accepting.clone(),
            stats: self.metrics.listener(&r.cfg.name),
        };
        r.accept = Some(r.serving.spawn_accept_loop(r.locals(), args));
    }

    fn publish(&mut self, upstreams: Vec<Arc<Upstream>>) {
        let infos = self
            .listeners
            .iter()
            .map(|r| ListenerInfo {
                name: r.cfg.name.clone(),
                bind: r.addr,
                mode: r.cfg.mode.kind().as_str(),
                upstream: r
                    .serving
                    .upstream()
                    .map(|u| u.cfg.name.clone())
                    .unwrap_or_default(),
                client_keepalive: r.cfg.mode.http().map_or(true, |h| h.client_keepalive),
            })
            .collect();
        // Configured upstreams first, then the forward listeners' origins.
        let views = upstreams
            .iter()
            .map(|u| u.clone() as Arc<dyn UpstreamViews>)
            .chain(
                self.listeners
                    .iter()
                    .filter_map(|r| r.serving.forward().cloned())
                    .map(|f| f as Arc<dyn UpstreamViews>),
            )
            .collect();
        self.shared.publish(infos, views);
        self.upstreams = upstreams;
    }

    /// The interception table's part for each intercept listener, from
    /// its config and the ports of its rules (`(key, port)` as the
    /// listener has them, or will once a reload is applied), and the
    /// resolver period for names.
    fn intercepted<'a>(
        items: impl IntoIterator<Item = (&'a ListenerConfig, Vec<(PortKey, u16)>)>,
    ) -> Result<(Vec<crate::intercept::rules::Intercepted>, Duration), StartError> {
        let mut wanted = Vec::new();
        let mut dns_refresh = crate::config::defaults::DNS_REFRESH;
        for (lc, ports) in items {
            let Some(ic) = lc.mode.intercept() else {
                continue;
            };
            let l = crate::intercept::rules::Intercepted::new(&lc.name, ic, &ports)
                .map_err(StartError::Intercept)?;
            for d in &l.redirects {
                let shared = d.matches.len() > 1 || !d.matches.iter().all(ports::is_exact);
                let rules: Vec<String> = d.matches.iter().map(ports::shown).collect();
                tracing::info!(listener = %lc.name, destinations = %rules.join(", "), port = d.port, shared, "interception: redirect port");
            }
            wanted.push(l);
            if let Some(f) = lc.mode.forward() {
                dns_refresh = f.origin.dns_refresh;
            }
        }
        Ok((wanted, dns_refresh))
    }

    /// Installs the kernel rules for `wanted` (replacing `previous`'s
    /// table in one transaction), or removes the table when nothing is
    /// wanted. On failure `previous`'s table is back in place and is
    /// returned with the error, so the caller keeps what it had.
    async fn install_rules(
        &self,
        previous: Option<crate::intercept::rules::Keeper>,
        wanted: Vec<crate::intercept::rules::Intercepted>,
        dns_refresh: Duration,
    ) -> Result<
        Option<crate::intercept::rules::Keeper>,
        (StartError, Option<crate::intercept::rules::Keeper>),
    > {
        use crate::intercept::rules::Keeper;
        let lines: Vec<String> = crate::intercept::rules::table_script(&wanted)
            .lines()
            .filter(|l| l.contains("redirect to"))
            .map(|l| l.trim().to_string())
            .collect();
        let keeper = match (previous, wanted.is_empty()) {
            (None, true) => None,
            (Some(p), true) => {
                p.remove().await;
                None
            }
            (None, false) => Some(
                Keeper::start(wanted, dns_refresh)
                    .await
                    .map_err(|e| (StartError::Intercept(e.to_string()), None))?,
            ),
            (Some(p), false) => Some(
                p.replace(wanted, dns_refresh)
                    .await
                    .map_err(|(e, back)| (StartError::Intercept(e.to_string()), back))?,
            ),
        };
        self.shared.set_intercept_rules(lines);
        if let Some(k) = &keeper {
            self.shared.set_intercept_current(k.current.clone());
        }
        Ok(keeper)
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
        // Listeners are the same when name and configured bind are.
        let same = |a: &ListenerConfig, b: &ListenerConfig| a.name == b.name && a.bind == b.bind;

        // Bind first: the only step that can fail.
        let mut fresh_sockets = HashMap::new();
        for (i, lc) in cfg.listeners.iter().enumerate() {
            if !self.listeners.iter().any(|r| same(&r.cfg, lc)) {
                fresh_sockets.insert(i, register(listener_key(i, lc), listener::bind(i, lc)?)?);
            }
        }
        // Redirect ports too: an intercept listener that stays one keeps
        // those of the rules that stay.
        let mut redirect_plans = HashMap::new();
        for (i, lc) in cfg.listeners.iter().enumerate() {
            let kept = self
                .listeners
                .iter()
                .find(|r| {
                    same(&r.cfg, lc)
                        && r.cfg.mode.kind() == lc.mode.kind()
                        && r.cfg.mode.intercept().is_some()
                })
                .map(|r| r.redirects.as_slice());
            if let Some(plan) = RedirectPlan::bind(i, lc, kept)? {
                redirect_plans.insert(i, plan);
            }
        }

        // The interception rules, the last step that can fail, before
        // anything is swapped (upstream pools are reconfigured in place
        // below): the new table goes in with the ports the listeners will
        // have; if nft refuses it, the old table is put back and the
        // running config stays, all of it.
        let mut rule_ports = Vec::new();
        for (i, lc) in cfg.listeners.iter().enumerate() {
            let Some(plan) = redirect_plans.get(&i) else {
                continue;
            };
            let existing = self.listeners.iter().find(|r| same(&r.cfg, lc));
            let own = match (existing, fresh_sockets.get(&i)) {
                (Some(r), _) => r.addr,
                (None, Some((_, addr))) => *addr,
                // Every listener is kept or freshly bound above.
                (None, None) => continue,
            };
            let kept = existing
                .filter(|r| r.cfg.mode.kind() == lc.mode.kind() && r.cfg.mode.intercept().is_some())
                .map(|r| r.redirects.as_slice());
            rule_ports.push((lc, plan.ports(own, kept)));
        }
        let (wanted, dns_refresh) = Self::intercepted(rule_ports)?;
        let previous = self.rules.take();
        let rules = match self.install_rules(previous, wanted, dns_refresh).await {
            Ok(k) => k,
            Err((e, back)) => {
                self.rules = back;
                return Err(e);
            }
        };

        // Upstreams: keep the unchanged ones (their pools and connections).
        // A changed one whose connections can stay (same name and protocol)
        // takes over the old pools, reconfigured in place: one pool per
        // endpoint at every moment, so the cap holds through the reload.
        let current = self.upstreams.clone();
        let mut upstreams = Vec::with_capacity(cfg.upstreams.len());
        let mut inherited: Vec<Arc<Upstream>> = Vec::new();
        for uc in &cfg.upstreams {
            if let Some(u) = current.iter().find(|u| u.cfg == *uc) {
                // Kept as it is, so `start_after` does not warn: say it on
                // every reload all the same.
                if uc
                    .tls
                    .as_ref()
                    .is_some_and(|t| t.settings.insecure_skip_verify)
                {
                    tracing::warn!(upstream = %uc.name, "tls.insecure_skip_verify = true: upstream certificates are NOT verified (labs only)");
                }
                upstreams.push(u.clone());
            } else if let Some(prev) = current.iter().find(|u| u.can_reconfigure(uc)) {
                tracing::info!(upstream = %uc.name, "upstream changed: pools reconfigured in place");
                upstreams.push(Upstream::start_after(uc.clone(), Some(prev)).await);
                inherited.push(prev.clone());
            } else {
                tracing::info!(upstream = %uc.name, "upstream new: new pools");
                upstreams.push(Upstream::start(uc.clone()).await);
            }
        }

        // Listeners: keep sockets of unchanged binds, point their proxies at
        // the new upstreams, restart their accept loops with new settings.
        let mut old = std::mem::take(&mut self.listeners);
        let mut next = Vec::with_capacity(cfg.listeners.len());
        for (i, lc) in cfg.listeners.iter().enumerate() {
            // A listener that changes mode is a new listener on the same
            // socket: its routing is built anew.
            let pos = old
                .iter()
                .position(|r| same(&r.cfg, lc) && r.cfg.mode.kind() == lc.mode.kind());
            let mut r = match pos {
                Some(pos) => {
                    let mut r = old.swap_remove(pos);
                    r.serving.reconfigure(&upstreams, &lc.mode).await;
                    r.limit.resize(lc.max_clients);
                    r.cfg = lc.clone();
                    r
                }
                None => match old.iter().position(|r| same(&r.cfg, lc)) {
                    Some(pos) => {
                        // Same socket, new mode: the old routing drains. Its
                        // accept loop stops first, so that every connection
                        // from now on reaches the new mode.
                        let mut prev = old.swap_remove(pos);
                        prev.stop_accepting().await;
                        let mut r = self.running(lc, prev.socket.clone(), prev.addr, &upstreams);
                        r.limit = prev.limit.clone();
                        r.limit.resize(lc.max_clients);
                        self.retired.spawn(prev.drain(cfg.drain_timeout));
                        r
                    }
                    None => {
                        let (socket, addr) = fresh_sockets.remove(&i).expect("bound above");
                        self.running(lc, Arc::new(socket), addr, &upstreams)
                    }
                },
            };
            if let Some(plan) = redirect_plans.remove(&i) {
                plan.apply(&mut r);
            }
            self.spawn_accept(&mut r).await;
            next.push(r);
        }
        self.listeners = next;

        // Removed listeners: stop accepting (the socket closes with its
        // accept loop), then drain their connections in the background.
        for r in old {
            tracing::info!(listener = %r.cfg.name, bind = %r.addr, "listener removed: draining");
            self.retired.spawn(r.drain(cfg.drain_timeout));
        }

        // Upstreams no longer used: idle connections close now, busy ones
        // when their request is done.
        for u in current.iter().filter(|u| {
            !upstreams.iter().any(|n| Arc::ptr_eq(n, u))
                && !inherited.iter().any(|n| Arc::ptr_eq(n, u))
        }) {
            retire(u);
        }
        self.cfg = cfg;
        self.publish(upstreams);
        self.rules = rules;
        tracing::info!(generation = self.shared.generation(), "config reloaded");
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish for up to `drain`,
    /// then cuts the rest. Returns `true` if everything finished in time.
    pub async fn stop(self, drain: Duration) -> bool {
        self.shared.set_ready(false);
        // All listeners drain at once, each in its own task.
        let results: Vec<_> = self
            .listeners
            .into_iter()
            .map(|r| tokio::spawn(r.drain(drain)))
            .collect();
        let mut clean = true;
        for r in results {
            clean &= r.await.is_ok_and(|d| d.clean());
        }
        self.retired.close();
        let _ = tokio::time::timeout(drain, self.retired.wait()).await;
        // Idle upstream connections close now; nothing will use them.
        for up in self.upstreams.iter() {
            retire(up);
        }
        if let Some(k) = self.rules {
            k.remove().await;
        }
        self.admin_stop.cancel();
        clean
    }
}

/// Closes an upstream's idle connections now and the busy ones when their
/// request is done.
fn retire(up: &Upstream) {
    for ep in up.endpoints().iter() {
        ep.pool.retire();
    }
}
