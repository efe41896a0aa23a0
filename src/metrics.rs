//! Prometheus metric families. One [`Registry`] is created at start and
//! passed down; hot-path counters are pre-resolved per listener (an atomic
//! add per request). Pool and source state is read at scrape time by the
//! status collector (`status`), which `app` registers under [`PREFIX`], so
//! the upstream code carries only plain atomics and this module knows none
//! of it.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// What every loopmux metric's name starts with (`loopmux_`), families and
/// scrape-time collectors alike.
pub const PREFIX: &str = "loopmux";

type Labels = Vec<(&'static str, String)>;

fn new_histogram() -> Histogram {
    // 0.25 ms … ~16 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

/// Metric families owned by the listeners.
pub struct Metrics {
    accepted: Family<Labels, Counter>,
    active: Family<Labels, Gauge>,
    at_limit: Family<Labels, Gauge>,
    at_limit_seconds: Family<Labels, Counter<f64, AtomicU64>>,
    stalls: Family<Labels, Counter>,
    responses: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    fwd_origins: Family<Labels, Gauge>,
    fwd_refused: Family<Labels, Counter>,
    fwd_tunnels: RawFamilies,
    tcp: RawFamilies,
    serve_streams: RawFamilies,
    serve_refused: Family<Labels, Counter>,
    serve_targets: Family<Labels, Counter>,
    serve_handshake_failures: Counter,
    intercept_connections: Family<Labels, Counter>,
}

/// A forward listener's own handles.
#[derive(Clone)]
pub struct ForwardStats {
    /// Origins with pools now.
    pub origins: Gauge,
    /// Requests and CONNECTs refused by the allow list…
    pub denied: Counter,
    /// … and because they would loop back into the proxy.
    pub loops: Counter,
    /// CONNECT tunnels.
    pub tunnels: RawStats,
}

/// The serve role's handles.
#[derive(Clone)]
pub struct ServeStats {
    /// The streams' relays to their targets.
    pub relays: RawStats,
    pub handshake_failures: Counter,
    refused: Family<Labels, Counter>,
    targets: Family<Labels, Counter>,
    labelled: Bounded,
}

/// Label values of their own for at most [`MAX_TARGET_LABELS`] distinct
/// destinations; the rest count as `other` (a wildcard or a range could
/// otherwise grow the metrics without bound).
#[derive(Clone, Default)]
pub struct Bounded(Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

impl Bounded {
    pub fn label(&self, value: &str) -> String {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(value) || seen.len() < MAX_TARGET_LABELS {
            seen.insert(value.to_string());
            value.to_string()
        } else {
            "other".to_string()
        }
    }
}

/// An intercept listener's connections, by destination and kind.
#[derive(Clone)]
pub struct InterceptStats {
    listener: String,
    connections: Family<Labels, Counter>,
    labelled: Bounded,
}

impl InterceptStats {
    /// A redirected connection to `destination`: `http`, `opaque`, or
    /// `refused` (outside `destinations`).
    pub fn connection(&self, destination: &str, kind: &'static str) {
        let l = vec![
            ("listener", self.listener.clone()),
            ("destination", self.labelled.label(destination)),
            ("kind", kind.to_string()),
        ];
        self.connections.get_or_create(&l).inc();
    }
}

/// Distinct targets with a label of their own in
/// `loopmux_serve_streams_total`; beyond, they count as `other` (a
/// wildcard rule could otherwise grow the metrics without bound).
pub const MAX_TARGET_LABELS: usize = 1000;

impl ServeStats {
    /// A stream refused (`denied`, `unreachable`, `bad-request`), or a
    /// connection at a limit (`handshakes`, `connections`).
    pub fn refused(&self, reason: &str) {
        self.refused
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    /// A stream opened to `target`.
    pub fn stream_to(&self, target: &str) {
        let label = self.labelled.label(target);
        self.targets.get_or_create(&vec![("target", label)]).inc();
    }
}

/// Raw byte relays of one listener: `tcp` connections, or CONNECT tunnels.
#[derive(Clone)]
pub struct RawStats {
    /// Upstream connections opened for a client.
    pub opened: Counter,
    pub active: Gauge,
    /// Upstream dials that failed (the client was closed or reset).
    pub connect_failures: Counter,
    /// Relays that ended in a read or write error (a reset).
    pub errors: Counter,
    /// Bytes read from the client (sent on upstream), and from the upstream.
    pub bytes_upstream: Counter,
    pub bytes_client: Counter,
    /// Relays loopmux ended: idle for `idle_timeout`, or cut by a drain.
    pub closed_by_loopmux: Counter,
}

impl crate::relay::Counters for RawStats {
    fn started(&self) {
        self.active.inc();
    }

    fn ended(&self, to_upstream: u64, to_client: u64, end: &crate::relay::End) {
        use crate::relay::End;
        self.active.dec();
        self.bytes_upstream.inc_by(to_upstream);
        self.bytes_client.inc_by(to_client);
        match end {
            End::Closed => {}
            End::Error(_) => {
                self.errors.inc();
            }
            End::Idle | End::Cut => {
                self.closed_by_loopmux.inc();
            }
        }
    }
}

/// The metric families behind [`RawStats`], under one prefix.
struct RawFamilies {
    opened: Family<Labels, Counter>,
    active: Family<Labels, Gauge>,
    connect_failures: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    closed: Family<Labels, Counter>,
}

impl RawFamilies {
    /// `what`: the relays in help texts ("CONNECT tunnels").
    fn register(r: &mut Registry, prefix: &str, what: &str) -> RawFamilies {
        let f = RawFamilies {
            opened: Family::default(),
            active: Family::default(),
            connect_failures: Family::default(),
            errors: Family::default(),
            bytes: Family::default(),
            closed: Family::default(),
        };
        r.register(
            format!("{prefix}_connections"),
            format!("{what}: upstream connections opened"),
            f.opened.clone(),
        );
        r.register(
            format!("{prefix}_connections_active"),
            format!("{what} open now"),
            f.active.clone(),
        );
        r.register(
            format!("{prefix}_connect_failures"),
            format!("{what}: upstream dials that failed"),
            f.connect_failures.clone(),
        );
        r.register(
            format!("{prefix}_errors"),
            format!("{what} that ended in a read or write error"),
            f.errors.clone(),
        );
        r.register(
            format!("{prefix}_bytes"),
            format!("Bytes carried by {what}, by direction (upstream: from the client)"),
            f.bytes.clone(),
        );
        r.register(
            format!("{prefix}_closed_by_loopmux"),
            format!("{what} loopmux closed: idle for idle_timeout, or cut at the end of a drain"),
            f.closed.clone(),
        );
        f
    }

    fn get(&self, listener: &str) -> RawStats {
        let l: Labels = vec![("listener", listener.to_string())];
        let dir = |d: &str| {
            let mut l = l.clone();
            l.push(("direction", d.to_string()));
            l
        };
        // One statement per handle: a family's read guard lives to the end
        // of its statement, and a second get_or_create in the same one
        // would wait for its write lock forever.
        let opened = self.opened.get_or_create(&l).clone();
        let active = self.active.get_or_create(&l).clone();
        let connect_failures = self.connect_failures.get_or_create(&l).clone();
        let errors = self.errors.get_or_create(&l).clone();
        let bytes_upstream = self.bytes.get_or_create(&dir("upstream")).clone();
        let bytes_client = self.bytes.get_or_create(&dir("client")).clone();
        let closed_by_loopmux = self.closed.get_or_create(&l).clone();
        RawStats {
            opened,
            active,
            connect_failures,
            errors,
            bytes_upstream,
            bytes_client,
            closed_by_loopmux,
        }
    }
}

/// One listener's handles: cloned `Arc`s, so recording is an atomic op.
#[derive(Clone)]
pub struct ListenerStats {
    pub accepted: Counter,
    pub active: Gauge,
    /// 1 while the listener is at `max_clients` (new clients wait in the
    /// kernel's backlog).
    pub at_limit: Gauge,
    pub at_limit_seconds: Counter<f64, AtomicU64>,
    /// Exchanges ended because the client moved no body bytes for the
    /// listener's `body_timeout`.
    pub client_stalls: Counter,
    /// … because the upstream moved none for its `body_timeout`.
    pub upstream_stalls: Counter,
    /// Index `status / 100 - 1`: 1xx … 5xx.
    pub responses: [Counter; 5],
    pub duration: Histogram,
}

impl ListenerStats {
    pub fn record(&self, status: u16, seconds: f64) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].inc();
        self.duration.observe(seconds);
    }
}

impl Metrics {
    /// Registers every family under [`PREFIX`].
    pub fn new(registry: &mut Registry) -> Metrics {
        let r = registry.sub_registry_with_prefix(PREFIX);
        let m = Metrics {
            accepted: Family::default(),
            active: Family::default(),
            at_limit: Family::default(),
            at_limit_seconds: Family::default(),
            stalls: Family::default(),
            responses: Family::default(),
            duration: Family::new_with_constructor(new_histogram),
            fwd_origins: Family::default(),
            fwd_refused: Family::default(),
            fwd_tunnels: RawFamilies::register(r, "forward_tunnel", "CONNECT tunnels"),
            tcp: RawFamilies::register(r, "tcp", "tcp listener connections"),
            serve_streams: RawFamilies::register(r, "serve_stream", "serve role streams"),
            serve_refused: Family::default(),
            serve_targets: Family::default(),
            serve_handshake_failures: Counter::default(),
            intercept_connections: Family::default(),
        };
        r.register(
            "listener_connections_accepted",
            "Client connections accepted",
            m.accepted.clone(),
        );
        r.register(
            "listener_connections_active",
            "Client connections open now",
            m.active.clone(),
        );
        r.register(
            "listener_at_limit",
            "1 while the listener is at max_clients and new clients wait in the kernel backlog",
            m.at_limit.clone(),
        );
        r.register(
            "listener_at_limit_seconds",
            "Time spent at max_clients",
            m.at_limit_seconds.clone(),
        );
        r.register(
            "body_stalls",
            "Exchanges ended because a body moved no bytes for body_timeout, by the side that stalled",
            m.stalls.clone(),
        );
        r.register(
            "listener_responses",
            "Responses sent by loopmux's proxy, by status class",
            m.responses.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from request head to response head",
            m.duration.clone(),
        );
        r.register(
            "forward_origins",
            "Origins a forward listener has pools for now",
            m.fwd_origins.clone(),
        );
        r.register(
            "forward_refused",
            "Forward requests and CONNECTs refused, by reason (denied: the allow list; loop: the proxy's own address)",
            m.fwd_refused.clone(),
        );
        r.register(
            "serve_refused",
            "CONNECT streams (denied, unreachable, bad-request) and tunnel client connections (handshakes: at max_handshakes; connections: at max_connections) the serve role refused, by reason",
            m.serve_refused.clone(),
        );
        r.register(
            "serve_streams",
            "CONNECT streams the serve role opened, by target",
            m.serve_targets.clone(),
        );
        r.register(
            "serve_handshake_failures",
            "Tunnel client connections whose TLS handshake or HTTP/2 preface failed or did not arrive within handshake_timeout",
            m.serve_handshake_failures.clone(),
        );
        r.register(
            "intercept_connections",
            "Redirected connections, by destination and kind (http, opaque, refused)",
            m.intercept_connections.clone(),
        );
        m
    }

    pub fn forward(&self, name: &str) -> ForwardStats {
        let reason = |r: &str| vec![("listener", name.to_string()), ("reason", r.to_string())];
        let denied = self.fwd_refused.get_or_create(&reason("denied")).clone();
        let loops = self.fwd_refused.get_or_create(&reason("loop")).clone();
        let origins = self
            .fwd_origins
            .get_or_create(&vec![("listener", name.to_string())])
            .clone();
        ForwardStats {
            origins,
            denied,
            loops,
            tunnels: self.fwd_tunnels.get(name),
        }
    }

    pub fn tcp(&self, name: &str) -> RawStats {
        self.tcp.get(name)
    }

    pub fn serve(&self) -> ServeStats {
        ServeStats {
            relays: self.serve_streams.get("serve"),
            handshake_failures: self.serve_handshake_failures.clone(),
            refused: self.serve_refused.clone(),
            targets: self.serve_targets.clone(),
            labelled: Bounded::default(),
        }
    }

    pub fn intercept(&self, name: &str) -> InterceptStats {
        InterceptStats {
            listener: name.to_string(),
            connections: self.intercept_connections.clone(),
            labelled: Bounded::default(),
        }
    }

    pub fn listener(&self, name: &str) -> ListenerStats {
        let l: Labels = vec![("listener", name.to_string())];
        let class = |c: &str| {
            let mut l = l.clone();
            l.push(("class", c.to_string()));
            self.responses.get_or_create(&l).clone()
        };
        let side = |side: &str| {
            let mut l = l.clone();
            l.push(("side", side.to_string()));
            self.stalls.get_or_create(&l).clone()
        };
        ListenerStats {
            accepted: self.accepted.get_or_create(&l).clone(),
            active: self.active.get_or_create(&l).clone(),
            at_limit: self.at_limit.get_or_create(&l).clone(),
            at_limit_seconds: self.at_limit_seconds.get_or_create(&l).clone(),
            client_stalls: side("client"),
            upstream_stalls: side("upstream"),
            responses: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: self.duration.get_or_create(&l).clone(),
        }
    }
}
