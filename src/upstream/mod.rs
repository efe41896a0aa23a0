//! Everything on the upstream side: dialing, pooling, balancing.
//!
//! An [`Upstream`] owns one pool per resolved endpoint address, a shared
//! [`Dialer`], and the balancing state. Endpoint sets are swapped whole
//! (DNS refresh), so a request never holds a lock while it waits.

pub mod body;
pub mod client;
pub mod conn;
pub mod connect;
pub mod dialer;
pub mod pool;
pub mod raw;
mod view;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Instant;

use crate::config::{EndpointAddr, UpstreamConfig};
use conn::UpConn;
use connect::Connector;
use dialer::Dialer;
use pool::{Pool, PoolConfig};

/// One resolved address of an upstream, with its pool.
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The DNS name it was resolved from: the TLS server name by default.
    pub host: Option<Arc<str>>,
    pub pool: Pool<UpConn>,
    in_flight: AtomicUsize,
    failed_until_ms: AtomicU64,
    /// Connections dialed successfully.
    pub connects: AtomicU64,
    /// Failed dials by errno name (`EADDRNOTAVAIL`, `timeout`, …). Rare, so
    /// a mutex is fine.
    pub connect_errors: Mutex<BTreeMap<String, u64>>,
    /// TLS handshakes started, and failures by reason
    /// ([`crate::tls::client::failure_reason`]).
    pub tls_handshakes: AtomicU64,
    pub tls_failures: Mutex<BTreeMap<&'static str, u64>>,
}

impl Endpoint {
    pub fn record_connect_error(&self, e: &dialer::DialError) {
        let key = match (&e.kind, e.errno()) {
            (dialer::DialErrorKind::Timeout(_), _) => "timeout".to_string(),
            (_, Some(errno)) => {
                crate::sockopt::errno_text(&std::io::Error::from_raw_os_error(errno))
                    .split(' ')
                    .next()
                    .unwrap_or("other")
                    .to_string()
            }
            _ => "other".to_string(),
        };
        let mut m = self
            .connect_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry(key).or_default() += 1;
    }

    pub fn record_tls_failure(&self, reason: &'static str) {
        let mut m = self.tls_failures.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(reason).or_default() += 1;
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts a request against its endpoint until dropped (least in-flight
/// balancing).
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a resolved address may not be dialed (forward mode and the serve
/// role: a deny rule on addresses, or the proxy's own listener, a loop).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vetoed {
    pub addr: SocketAddr,
    pub why: Veto,
}

/// What a vetoed address is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Veto {
    /// This proxy's own listener (the text says where).
    Loop(String),
    /// A rule of the allow list refuses it.
    Denied(crate::allow::Denial),
}

impl std::fmt::Display for Veto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Veto::Loop(s) => f.write_str(s),
            Veto::Denied(d) => write!(f, "{d}"),
        }
    }
}

/// Decides every address a refresh resolves, before any is dialed.
pub type AddressVeto = Arc<dyn Fn(SocketAddr) -> Option<Vetoed> + Send + Sync>;

/// What a started upstream shares with others, beyond its config.
#[derive(Default)]
pub struct StartWith {
    /// Dial through this dialer (its source addresses and their state)
    /// instead of one of its own.
    pub dialer: Option<Arc<Dialer>>,
    pub veto: Option<AddressVeto>,
}

pub struct Upstream {
    pub cfg: UpstreamConfig,
    pub dialer: Arc<Dialer>,
    /// Dial → TLS → handshake, for every connection of this upstream.
    pub connector: Connector,
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    rr: AtomicUsize,
    epoch: Instant,
    /// Requests sent a second time (the retry rules: `client::decide`).
    pub retries: AtomicU64,
    /// Set when a reload handed this upstream's pools to its successor: its
    /// DNS refresh stops, so only one owner ever swaps or retires them.
    superseded: AtomicBool,
    veto: Option<AddressVeto>,
    /// Set by a refresh that resolved a vetoed address: then no address of
    /// this upstream is used at all.
    vetoed: RwLock<Option<Vetoed>>,
    /// The last resolution failure, while no address is known.
    resolve_error: RwLock<Option<String>>,
}

impl Upstream {
    /// Resolves the endpoints once and starts the pools' reapers and, for
    /// DNS names, the refresh task. A name that does not resolve now is
    /// logged and retried every `dns_refresh`.
    pub async fn start(cfg: UpstreamConfig) -> Arc<Self> {
        Self::start_after(cfg, None).await
    }

    /// Whether a reload from `self` to `cfg` can keep the pools (and their
    /// connections). Only what changes the connections themselves (the
    /// protocol, TLS) needs new ones; the cap, the timeouts, the endpoints
    /// list and the source addresses are applied in place, so that two
    /// pools never hold connections to one endpoint at once (invariant 8).
    pub fn can_reconfigure(&self, cfg: &UpstreamConfig) -> bool {
        self.cfg.name == cfg.name && self.cfg.protocol == cfg.protocol && self.cfg.tls == cfg.tls
    }

    /// Starts `cfg`; with `previous` (see [`can_reconfigure`]) it takes over
    /// its endpoints and pools, reconfigured in place, and `previous` stops
    /// refreshing. Requests in flight on `previous` finish under its
    /// settings.
    ///
    /// [`can_reconfigure`]: Self::can_reconfigure
    pub async fn start_after(cfg: UpstreamConfig, previous: Option<&Upstream>) -> Arc<Self> {
        Self::start_inner(cfg, previous, StartWith::default()).await
    }

    /// Starts `cfg` sharing what `with` holds (forward mode's origins
    /// share one dialer and one address veto).
    pub async fn start_with(cfg: UpstreamConfig, with: StartWith) -> Arc<Self> {
        Self::start_inner(cfg, None, with).await
    }

    /// [`start_after`] and [`start_with`] at once: a forward origin's
    /// successor after a reload.
    ///
    /// [`start_after`]: Self::start_after
    /// [`start_with`]: Self::start_with
    pub async fn start_after_with(
        cfg: UpstreamConfig,
        previous: &Upstream,
        with: StartWith,
    ) -> Arc<Self> {
        Self::start_inner(cfg, Some(previous), with).await
    }

    async fn start_inner(
        cfg: UpstreamConfig,
        previous: Option<&Upstream>,
        with: StartWith,
    ) -> Arc<Self> {
        let dialer = match (previous, with.dialer) {
            (_, Some(d)) => d,
            (Some(p), None)
                if p.cfg.source_addresses == cfg.source_addresses
                    && p.cfg.connect_timeout == cfg.connect_timeout
                    && p.cfg.failure_backoff == cfg.failure_backoff =>
            {
                p.dialer.clone()
            }
            _ => Arc::new(Dialer::new(
                &cfg.source_addresses,
                cfg.connect_timeout,
                cfg.failure_backoff,
            )),
        };
        let inherited = match previous {
            Some(p) => {
                p.superseded.store(true, Ordering::Relaxed);
                p.endpoints()
            }
            None => Arc::new(Vec::new()),
        };
        if cfg
            .tls
            .as_ref()
            .is_some_and(|t| t.settings.insecure_skip_verify)
        {
            tracing::warn!(upstream = %cfg.name, "tls.insecure_skip_verify = true: upstream certificates are NOT verified; anyone on the path can read and change this traffic (labs only)");
        }
        let up = Arc::new(Upstream {
            connector: Connector::new(&cfg, dialer.clone()),
            dialer,
            endpoints: RwLock::new(inherited.clone()),
            rr: AtomicUsize::new(0),
            epoch: Instant::now(),
            retries: AtomicU64::new(0),
            superseded: AtomicBool::new(false),
            veto: with.veto,
            vetoed: RwLock::new(None),
            resolve_error: RwLock::new(None),
            cfg,
        });
        let pool_cfg = up.pool_config();
        for ep in inherited.iter() {
            ep.pool.reconfigure(pool_cfg);
        }
        up.refresh().await;
        if up
            .cfg
            .endpoints
            .iter()
            .any(|e| matches!(e, EndpointAddr::Name { .. }))
        {
            let weak = Arc::downgrade(&up);
            let period = up.cfg.dns_refresh;
            tokio::spawn(refresh_loop(weak, period));
        }
        up
    }

    fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            max_connections: self.cfg.max_connections,
            max_pending: self.cfg.max_pending,
            queue_timeout: self.cfg.queue_timeout,
            idle_timeout: self.cfg.idle_timeout,
            max_lifetime: self.cfg.max_lifetime,
            multiplexed: self.cfg.protocol == crate::config::Protocol::Http2,
        }
    }

    /// The current endpoint set.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why no address of this upstream may be used, if one was vetoed.
    pub fn vetoed(&self) -> Option<Vetoed> {
        self.vetoed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The last resolution failure, while no address is known.
    pub fn resolve_error(&self) -> Option<String> {
        self.resolve_error
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-resolves every endpoint: new addresses get pools, vanished ones
    /// are retired (their connections close as they come back).
    pub async fn refresh(&self) {
        let mut addrs: Vec<(SocketAddr, Option<Arc<str>>)> = Vec::new();
        let mut failed = None;
        for ep in &self.cfg.endpoints {
            match ep {
                EndpointAddr::Ip(a) => addrs.push((*a, None)),
                EndpointAddr::Name { host, port } => {
                    match tokio::net::lookup_host((host.as_str(), *port)).await {
                        Ok(found) => {
                            let name: Arc<str> = host.as_str().into();
                            addrs.extend(found.map(|a| (a, Some(name.clone()))));
                        }
                        Err(e) => {
                            tracing::warn!(upstream = %self.cfg.name, endpoint = %ep, error = %e, "cannot resolve endpoint; keeping its previous addresses");
                            failed = Some(format!("cannot resolve `{host}`: {e}"));
                            let current = self.endpoints();
                            addrs.extend(
                                current
                                    .iter()
                                    .filter(|e| {
                                        e.addr.port() == *port
                                            && e.host.as_deref() == Some(host.as_str())
                                    })
                                    .map(|e| (e.addr, e.host.clone())),
                            );
                        }
                    }
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        addrs.retain(|(a, _)| seen.insert(*a));
        *self
            .resolve_error
            .write()
            .unwrap_or_else(|p| p.into_inner()) = if addrs.is_empty() { failed } else { None };
        if let Some(veto) = &self.veto {
            // One vetoed address vetoes the name: a resolver that mixes a
            // denied address into an allowed name's answers is an attack.
            let verdict = addrs.iter().find_map(|(a, _)| veto(*a));
            if let Some(v) = &verdict {
                tracing::warn!(upstream = %self.cfg.name, addr = %v.addr, reason = %v.why, "resolved address refused: no address of this origin is used");
                addrs.clear();
            }
            *self.vetoed.write().unwrap_or_else(|p| p.into_inner()) = verdict;
        }

        let old = self.endpoints();
        let mut next = Vec::with_capacity(addrs.len());
        for (a, host) in &addrs {
            match old.iter().find(|e| e.addr == *a) {
                Some(e) => next.push(e.clone()),
                None => {
                    let pool = Pool::new(self.pool_config());
                    pool.spawn_reaper();
                    tracing::debug!(upstream = %self.cfg.name, endpoint = %a, "endpoint added");
                    next.push(Arc::new(Endpoint {
                        addr: *a,
                        host: host.clone(),
                        pool,
                        in_flight: AtomicUsize::new(0),
                        failed_until_ms: AtomicU64::new(0),
                        connects: AtomicU64::new(0),
                        connect_errors: Mutex::new(BTreeMap::new()),
                        tls_handshakes: AtomicU64::new(0),
                        tls_failures: Mutex::new(BTreeMap::new()),
                    }));
                }
            }
        }
        for e in old
            .iter()
            .filter(|e| !addrs.iter().any(|(a, _)| *a == e.addr))
        {
            tracing::info!(upstream = %self.cfg.name, endpoint = %e.addr, "endpoint vanished from DNS; draining it");
            e.pool.retire();
        }
        *self.endpoints.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Least in-flight among endpoints not in back-off (round-robin among
    /// equals); if all are backing off, least in-flight of all.
    pub fn pick(&self) -> Option<InFlight> {
        let eps = self.endpoints();
        let n = eps.len();
        if n == 0 {
            return None;
        }
        let start = if n > 1 {
            self.rr.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        let now = self.now_ms();
        let mut best: Option<(bool, usize, usize)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let e = &eps[i];
            let healthy = e.failed_until_ms.load(Ordering::Relaxed) <= now;
            let load = e.in_flight();
            let better = match best {
                None => true,
                Some((bh, bl, _)) => (healthy && !bh) || (healthy == bh && load < bl),
            };
            if better {
                best = Some((healthy, load, i));
            }
        }
        let (_, _, i) = best?;
        let e = eps[i].clone();
        e.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(InFlight(e))
    }

    /// Avoid `ep` for `failure_backoff` (it refused, timed out or reset).
    pub fn mark_failed(&self, ep: &Endpoint) {
        let until = self.now_ms() + self.cfg.failure_backoff.as_millis() as u64;
        ep.failed_until_ms.store(until, Ordering::Relaxed);
    }

    pub fn mark_ok(&self, ep: &Endpoint) {
        if ep.failed_until_ms.load(Ordering::Relaxed) != 0 {
            ep.failed_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// A raw connection to one of an upstream's endpoints (`tcp` mode,
/// CONNECT tunnels): no pool, one per client connection.
pub struct RawConn {
    pub stream: tokio::net::TcpStream,
    pub local: SocketAddr,
    pub endpoint: SocketAddr,
    /// Counts the connection against its endpoint (balancing; a forward
    /// origin with one is busy) and its source, until dropped.
    pub in_flight: InFlight,
    pub lease: Option<dialer::SourceLease>,
}

/// Why no raw connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum RawDialError {
    #[error("no endpoint address is resolved")]
    NoEndpoint,
    #[error(transparent)]
    Dial(#[from] dialer::DialError),
}

impl Upstream {
    /// Dials one endpoint (least in flight, not backing off) through the
    /// dialer; after a failure, other endpoints as [`raw::failover`]
    /// allows, the failed one in back-off.
    ///
    /// # Errors
    /// The last dial's failure (destination, source, errno).
    pub async fn dial_raw(&self) -> Result<RawConn, RawDialError> {
        let dialer = &*self.dialer;
        let dialed = raw::failover(
            || self.endpoints().len(),
            || self.pick(),
            |f: &InFlight| dialer.dial(f.endpoint().addr),
            |f, e| {
                f.endpoint().record_connect_error(e);
                self.mark_failed(f.endpoint());
            },
        )
        .await;
        match dialed {
            Ok((in_flight, d)) => {
                let ep = in_flight.endpoint();
                self.mark_ok(ep);
                ep.connects.fetch_add(1, Ordering::Relaxed);
                Ok(RawConn {
                    lease: self.dialer.lease(d.source),
                    local: d.local,
                    endpoint: ep.addr,
                    stream: d.stream,
                    in_flight,
                })
            }
            Err(last) => Err(last.map_or(RawDialError::NoEndpoint, RawDialError::Dial)),
        }
    }
}

async fn refresh_loop(weak: Weak<Upstream>, period: std::time::Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(up) = weak.upgrade() else { return };
        if up.superseded.load(Ordering::Relaxed) {
            return;
        }
        up.refresh().await;
    }
}
