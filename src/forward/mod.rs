//! The `forward` mode's routing: which origin a proxy request goes to,
//! whether it may, and the pools behind it. The HTTP exchange itself is
//! `http::proxy`'s, the same as for an `http` listener.

pub mod origins;
mod router;
pub mod tunnel;

/// Where a proxy request wants to go: the policy layer's.
pub use crate::allow::target;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use http::StatusCode;

use crate::allow::{Denial, Host};
use crate::config::{EndpointAddr, ForwardConfig, Protocol, UpstreamConfig};
use crate::metrics::ForwardStats;
use crate::upstream::dialer::{DialError, Dialer};
use crate::upstream::{AddressVeto, StartWith, Upstream, Veto, Vetoed};
use origins::{OriginGuard, Origins};
use target::{Target, TargetError};

/// Why a forward request was not sent: each has its status and its
/// `x-loopmux-error` word.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("`{target}` is not allowed: {denial}")]
    Denied { target: String, denial: Denial },
    #[error("`{target}` is this proxy's own listener ({reason}): the request would loop")]
    Loop { target: String, reason: String },
    #[error("`{target}`: all {0} origins (max_origins) are in use", .max)]
    OriginsFull { target: String, max: usize },
    #[error("`{target}`: {reason}")]
    Unresolved { target: String, reason: String },
    #[error("`{target}` needs TLS toward the origin, which this listener does not originate: send HTTPS through CONNECT, or add [forward_defaults.tls] / originate_tls")]
    NoTls { target: String },
    #[error("CONNECT `{target}`: {source}")]
    Connect { target: String, source: DialError },
}

impl ForwardError {
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardError::Target(_) => StatusCode::BAD_REQUEST,
            ForwardError::Denied { .. } => StatusCode::FORBIDDEN,
            ForwardError::Loop { .. } => StatusCode::LOOP_DETECTED,
            ForwardError::OriginsFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ForwardError::Unresolved { .. } | ForwardError::Connect { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ForwardError::NoTls { .. } => StatusCode::NOT_IMPLEMENTED,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ForwardError::Target(_) => "bad-request",
            ForwardError::Denied { .. } => "denied",
            ForwardError::Loop { .. } => "loop",
            ForwardError::OriginsFull { .. } => "max-origins",
            ForwardError::Unresolved { .. } => "resolve",
            ForwardError::NoTls { .. } => "tls-not-configured",
            ForwardError::Connect { .. } => "connect",
        }
    }
}

/// Settings a reload swaps as one.
struct Settings {
    cfg: Arc<ForwardConfig>,
    dialer: Arc<Dialer>,
    /// The listener's `half_close_timeout`: CONNECT tunnels and
    /// intercepted opaque relays.
    half_close: std::time::Duration,
}

/// One forward listener's routing state.
pub struct Forward {
    settings: RwLock<Settings>,
    origins: Arc<Origins>,
    /// The listener's own address: a request to it would loop.
    local: SocketAddr,
    pub stats: ForwardStats,
}

/// The way to an origin for one request.
pub struct Route {
    pub upstream: Arc<Upstream>,
    pub guard: OriginGuard,
    /// `Via` goes on the request and the response (`via = true`).
    pub via: bool,
}

fn dialer_for(cfg: &ForwardConfig) -> Arc<Dialer> {
    let o = &cfg.origin;
    Arc::new(Dialer::new(
        &o.source_addresses,
        o.connect_timeout,
        o.failure_backoff,
    ))
}

use crate::allow::is_self;

impl Forward {
    /// `half_close`: the listener's `half_close_timeout`, for the raw
    /// relays of CONNECT and opaque interception.
    pub fn new(
        cfg: &ForwardConfig,
        half_close: std::time::Duration,
        local: SocketAddr,
        stats: ForwardStats,
    ) -> Arc<Forward> {
        let cfg = Arc::new(cfg.clone());
        let f = Arc::new(Forward {
            settings: RwLock::new(Settings {
                dialer: dialer_for(&cfg),
                cfg,
                half_close,
            }),
            origins: Arc::new(Origins::default()),
            local,
            stats,
        });
        let weak = Arc::downgrade(&f);
        origins::spawn_reaper(
            Arc::downgrade(&f.origins),
            move || {
                weak.upgrade()
                    .map_or(std::time::Duration::from_secs(60), |f| {
                        f.config().origin.idle_timeout
                    })
            },
            f.stats.origins.clone(),
        );
        f
    }

    pub fn config(&self) -> Arc<ForwardConfig> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .cfg
            .clone()
    }

    /// The listener's `half_close_timeout`, for raw relays it carries.
    pub fn half_close(&self) -> std::time::Duration {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .half_close
    }

    fn dialer(&self) -> Arc<Dialer> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .dialer
            .clone()
    }

    /// A reload. Every started origin gets a successor under the new
    /// settings that takes over its pools, reconfigured in place (cap,
    /// queue, timeouts, source addresses, the allow list's veto on its
    /// addresses), as `[[upstream]]` pools are: one pool per origin at
    /// every moment, so `max_connections` holds through the reload
    /// (invariants 1 and 8). Only an origin whose connections themselves
    /// change (TLS, protocol) is dropped; its requests in flight finish
    /// on the old pools.
    pub async fn reconfigure(&self, new: &ForwardConfig, half_close: std::time::Duration) {
        let cfg = {
            let mut s = self.settings.write().unwrap_or_else(|p| p.into_inner());
            s.half_close = half_close;
            if *s.cfg == *new {
                return;
            }
            let o = &s.cfg.origin;
            if o.source_addresses != new.origin.source_addresses
                || o.connect_timeout != new.origin.connect_timeout
                || o.failure_backoff != new.origin.failure_backoff
            {
                s.dialer = dialer_for(new);
            }
            s.cfg = Arc::new(new.clone());
            s.cfg.clone()
        };
        for origin in self.origins.started() {
            let Some(prev) = origin.current() else {
                continue;
            };
            let (uc, mut with) = self.origin_template(&cfg, &origin.target);
            // The same sources: the origin keeps its own counts (its open
            // connections are leased from them).
            if with
                .dialer
                .as_ref()
                .is_some_and(|d| d.same_sources(&prev.dialer))
            {
                with.dialer = Some(prev.dialer.clone());
            }
            if prev.can_reconfigure(&uc) {
                let next = Upstream::start_after_with(uc, &prev, with).await;
                origin.replace(next);
            } else {
                tracing::debug!(origin = %uc.name, "reload changed the origin's TLS or protocol: new pools");
                self.origins.drop_origin(&origin);
            }
        }
        self.stats.origins.set(self.origins.len() as i64);
    }

    /// Checks `target` (as asked) against the loop guard and the allow
    /// list; a plain `http://` target listed in `originate_tls` becomes
    /// TLS (port 80 → 443) before the check, since that is where it goes.
    fn admit(&self, cfg: &ForwardConfig, mut target: Target) -> Result<Target, ForwardError> {
        if !target.tls && cfg.originate_tls.check(&target.host, target.port).is_ok() {
            target.tls = true;
            if target.port == 80 {
                target.port = 443;
            }
        }
        if let Host::Ip(ip) = target.host {
            let addr = SocketAddr::new(ip, target.port);
            if is_self(addr, self.local) {
                self.stats.loops.inc();
                return Err(ForwardError::Loop {
                    target: target.to_string(),
                    reason: format!("listening on {}", self.local),
                });
            }
        }
        if let Err(denial) = cfg.allow.check(&target.host, target.port) {
            self.stats.denied.inc();
            return Err(ForwardError::Denied {
                target: target.to_string(),
                denial,
            });
        }
        if target.tls && cfg.origin.tls.is_none() {
            return Err(ForwardError::NoTls {
                target: target.to_string(),
            });
        }
        Ok(target)
    }

    /// The origin's upstream, started on first use; a vetoed resolution
    /// (a denied address, a loop) or none at all is the request's error.
    async fn origin(
        &self,
        cfg: &Arc<ForwardConfig>,
        target: &Target,
    ) -> Result<Route, ForwardError> {
        let guard = self.origins.get(target, cfg.max_origins).map_err(|full| {
            ForwardError::OriginsFull {
                target: target.to_string(),
                max: full.0,
            }
        })?;
        // The first request resolves the name; a resolver that does not
        // answer must not hold it longer than a connect would. Cancelled,
        // the origin stays unstarted and the next request tries again.
        let start = guard
            .origin()
            .upstream
            .get_or_init(|| async { std::sync::RwLock::new(self.start_origin(cfg, target).await) });
        let up = match tokio::time::timeout(cfg.origin.connect_timeout, start).await {
            Ok(up) => up.read().unwrap_or_else(|p| p.into_inner()).clone(),
            Err(_) => {
                return Err(ForwardError::Unresolved {
                    target: target.to_string(),
                    reason: format!(
                        "no answer from the resolver within connect_timeout ({})",
                        humantime::format_duration(cfg.origin.connect_timeout)
                    ),
                })
            }
        };
        self.stats.origins.set(self.origins.len() as i64);
        if let Some(v) = up.vetoed() {
            return Err(self.vetoed(target, v));
        }
        if up.endpoints().is_empty() {
            return Err(ForwardError::Unresolved {
                target: target.to_string(),
                reason: up
                    .resolve_error()
                    .unwrap_or_else(|| "resolves to no address".into()),
            });
        }
        Ok(Route {
            upstream: up,
            guard,
            via: cfg.via,
        })
    }

    fn vetoed(&self, target: &Target, v: Vetoed) -> ForwardError {
        match v.why {
            Veto::Loop(reason) => {
                self.stats.loops.inc();
                ForwardError::Loop {
                    target: target.to_string(),
                    reason,
                }
            }
            Veto::Denied(denial) => {
                self.stats.denied.inc();
                ForwardError::Denied {
                    target: target.to_string(),
                    denial,
                }
            }
        }
    }

    async fn start_origin(&self, cfg: &Arc<ForwardConfig>, target: &Target) -> Arc<Upstream> {
        let (uc, with) = self.origin_template(cfg, target);
        tracing::debug!(origin = %uc.name, "new origin");
        Upstream::start_with(uc, with).await
    }

    /// An origin's upstream config under `cfg`, with the listener's dialer
    /// and the veto on its resolved addresses.
    fn origin_template(
        &self,
        cfg: &Arc<ForwardConfig>,
        target: &Target,
    ) -> (UpstreamConfig, StartWith) {
        let mut uc = cfg.origin.clone();
        uc.name = format!("{}://{target}", if target.tls { "https" } else { "http" });
        uc.endpoints = vec![match &target.host {
            Host::Ip(ip) => EndpointAddr::Ip(SocketAddr::new(*ip, target.port)),
            Host::Name(n) => EndpointAddr::Name {
                host: n.clone(),
                port: target.port,
            },
        }];
        if !target.tls {
            uc.tls = None;
            if uc.protocol == Protocol::Auto {
                uc.protocol = Protocol::Http1;
            }
        }
        let rules = cfg.clone();
        let local = self.local;
        let veto: AddressVeto = Arc::new(move |addr: SocketAddr| {
            if is_self(addr, local) {
                return Some(Vetoed {
                    addr,
                    why: Veto::Loop(format!("resolves to {addr}, where this listener is")),
                });
            }
            rules
                .allow
                .check_resolved(addr.ip(), addr.port())
                .err()
                .map(|d| Vetoed {
                    addr,
                    why: Veto::Denied(d),
                })
        });
        (
            uc,
            StartWith {
                // A view: the listener's sources, this origin's counts.
                dialer: Some(Arc::new(self.dialer().view())),
                veto: Some(veto),
            },
        )
    }

    /// Routes a plain proxy request: checks its target and returns the
    /// origin's upstream. Adds `Via` when configured.
    ///
    /// # Errors
    /// [`ForwardError`] with the status the client gets.
    pub async fn route(&self, parts: &mut http::request::Parts) -> Result<Route, ForwardError> {
        let cfg = self.config();
        let target = self.admit(&cfg, target::of_request(&parts.uri)?)?;
        let route = self.origin(&cfg, &target).await?;
        if route.via {
            parts
                .headers
                .append(http::header::VIA, crate::http::headers::via());
        }
        Ok(route)
    }

    /// Routes a request whose destination is known already (intercepted:
    /// `SO_ORIGINAL_DST`), in origin-form.
    ///
    /// # Errors
    /// [`ForwardError`] with the status the client gets.
    pub async fn route_to(&self, target: Target) -> Result<Route, ForwardError> {
        let cfg = self.config();
        let target = self.admit(&cfg, target)?;
        self.origin(&cfg, &target).await
    }

    /// `CONNECT`: checks the target, dials it (another address of the
    /// origin after a failure, as for requests), and returns the tunnel to
    /// start once the client has its `200`.
    ///
    /// # Errors
    /// [`ForwardError`] with the status the client gets.
    pub async fn connect(
        &self,
        uri: &http::Uri,
        on_upgrade: hyper::upgrade::OnUpgrade,
    ) -> Result<tunnel::PendingTunnel, ForwardError> {
        let cfg = self.config();
        let target = self.admit(&cfg, target::of_connect(uri)?)?;
        let route = self.origin(&cfg, &target).await?;
        match route.upstream.dial_raw().await {
            Ok(raw) => {
                self.stats.tunnels.opened.inc();
                Ok(tunnel::PendingTunnel {
                    on_upgrade,
                    upstream: raw,
                    target: target.to_string(),
                    timeouts: crate::relay::Timeouts {
                        idle: cfg.origin.idle_timeout,
                        half_closed: self.half_close(),
                    },
                })
            }
            Err(e) => {
                self.stats.tunnels.connect_failures.inc();
                Err(ForwardError::of_dial(&target, e))
            }
        }
    }
}
