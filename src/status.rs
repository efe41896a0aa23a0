//! What the admin endpoint and the scrape see of the running proxy: the
//! current listeners, readiness, the config generation, and the upstreams
//! as plain views. The views are asked for at read time (`/status`, a
//! scrape) through [`UpstreamViews`], which the way out implements and
//! `app` publishes, so this layer names no upstream or mode and the
//! request path carries nothing but the atomics the views are read from.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ListenerInfo {
    pub name: String,
    pub bind: SocketAddr,
    pub mode: &'static str,
    /// The upstream (mode http); empty for forward listeners, whose
    /// origins are listed among the upstreams as `http://host:port`.
    pub upstream: String,
    pub client_keepalive: bool,
}

/// One upstream as `/status` and the scrape show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamView {
    pub name: String,
    /// As the config spells it (`http1`, `http2`, `auto`).
    pub protocol: &'static str,
    pub tls: bool,
    pub max_connections: usize,
    /// Requests sent a second time.
    pub retries: u64,
    pub endpoints: Vec<EndpointView>,
    pub sources: Vec<SourceView>,
}

/// One resolved endpoint of an upstream and its pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    pub addr: SocketAddr,
    /// Open + opening connections, shared ones included.
    pub open: usize,
    /// Idle exclusive connections.
    pub idle: usize,
    /// Requests waiting for a connection.
    pub pending: usize,
    /// Requests balanced onto this endpoint and not done.
    pub in_flight: usize,
    /// Connections dialed successfully.
    pub connects: u64,
    /// Failed dials by errno name, in name order.
    pub connect_errors: Vec<(String, u64)>,
    pub tls_handshakes: u64,
    /// Failed TLS handshakes by reason, in reason order.
    pub tls_failures: Vec<(&'static str, u64)>,
    /// Requests answered 503: the queue was full, or they waited past
    /// `queue_timeout`.
    pub queue_full: u64,
    pub queue_timeout: u64,
    /// Open shared (HTTP/2) connections and the requests they carry, as
    /// counted with `open` (one reading of the pool).
    pub shared_open: usize,
    pub shared_streams: usize,
    /// The ALPN names `/status` gives exclusive and shared connections.
    pub exclusive_protocol: &'static str,
    pub shared_protocol: &'static str,
    /// The shared connections one by one, oldest first.
    pub shared_connections: Vec<SharedConnView>,
}

/// One shared (HTTP/2) upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedConnView {
    pub id: u64,
    pub streams: usize,
    pub limit: usize,
    /// Takes no new requests.
    pub draining: bool,
}

/// One source address of an upstream's dialer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceView {
    pub ip: IpAddr,
    /// Open connections dialed from it.
    pub active: usize,
    /// `EADDRNOTAVAIL` seen on it.
    pub eaddrnotavail: u64,
}

/// Says what its upstreams look like now: an upstream its one view, a
/// forward listener one per origin. Called only when `/status` or a scrape
/// reads, never on the request path.
pub trait UpstreamViews: Send + Sync {
    fn upstream_views(&self, out: &mut Vec<UpstreamView>);
}

#[derive(Default)]
pub struct Status {
    /// The configured upstreams, then the forward listeners (their
    /// origins), as `app` published them.
    upstreams: RwLock<Arc<Vec<Arc<dyn UpstreamViews>>>>,
    listeners: RwLock<Arc<Vec<ListenerInfo>>>,
    ready: AtomicBool,
    /// Whether the interception rules' last renewal went through.
    intercept_current: RwLock<Option<Arc<AtomicBool>>>,
    /// The interception rules installed (the nftables chain's lines).
    intercept_rules: RwLock<Vec<String>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Status")
            .field("generation", &self.generation())
            .finish()
    }
}

impl Status {
    pub fn listeners(&self) -> Arc<Vec<ListenerInfo>> {
        self.listeners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every upstream as it is now: the configured ones, then the origins
    /// of forward listeners. The published list is cloned out first, so
    /// no lock of ours is held while the sources read their pools.
    pub fn upstreams(&self) -> Vec<UpstreamView> {
        let sources = self
            .upstreams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = Vec::with_capacity(sources.len());
        for s in sources.iter() {
            s.upstream_views(&mut out);
        }
        out
    }

    /// Publishes a new config generation.
    pub fn publish(&self, listeners: Vec<ListenerInfo>, upstreams: Vec<Arc<dyn UpstreamViews>>) {
        *self.upstreams.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(upstreams);
        *self.listeners.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(listeners);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    pub fn set_intercept_rules(&self, rules: Vec<String>) {
        *self
            .intercept_rules
            .write()
            .unwrap_or_else(|p| p.into_inner()) = rules;
    }

    pub fn set_intercept_current(&self, flag: Arc<AtomicBool>) {
        *self
            .intercept_current
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(flag);
    }

    /// `None` without intercept listeners.
    pub fn intercept_current(&self) -> Option<bool> {
        self.intercept_current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|f| f.load(Ordering::Relaxed))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The `/status` document.
    pub fn status_json(&self) -> serde_json::Value {
        let upstreams: Vec<_> = self
            .upstreams()
            .iter()
            .map(|u| {
                let endpoints: Vec<_> = u
                    .endpoints
                    .iter()
                    .map(|e| {
                        // Exclusive (HTTP/1) connections as a count, one
                        // request each; shared ones one by one, with their
                        // streams.
                        let mut conns = vec![serde_json::json!({
                            "protocol": e.exclusive_protocol,
                            "open": e.open - e.shared_open,
                            "idle": e.idle,
                        })];
                        conns.extend(e.shared_connections.iter().map(|c| {
                            serde_json::json!({
                                "protocol": e.shared_protocol,
                                "id": c.id,
                                "streams": c.streams,
                                "limit": c.limit,
                                "draining": c.draining,
                            })
                        }));
                        serde_json::json!({
                            "addr": e.addr.to_string(),
                            "open": e.open,
                            "idle": e.idle,
                            "pending": e.pending,
                            "in_flight": e.in_flight,
                            "connects": e.connects,
                            "tls_handshakes": e.tls_handshakes,
                            "connections": conns,
                        })
                    })
                    .collect();
                let sources: Vec<_> = u
                    .sources
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "ip": s.ip.to_string(),
                            "active": s.active,
                            "eaddrnotavail": s.eaddrnotavail,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": u.name,
                    "protocol": u.protocol,
                    "tls": u.tls,
                    "max_connections": u.max_connections,
                    "endpoints": endpoints,
                    "sources": sources,
                    "retries": u.retries,
                })
            })
            .collect();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "generation": self.generation(),
            "ready": self.is_ready(),
            "listeners": *self.listeners(),
            "intercept": {
                "table": "inet loopmux",
                "current": self.intercept_current(),
                "rules": *self.intercept_rules.read().unwrap_or_else(|p| p.into_inner()),
            },
            "upstreams": upstreams,
        })
    }
}

/// The upstreams' pools, endpoints and sources, and the interception
/// rules' state, read at scrape time. `app` registers it under the
/// metrics prefix ([`crate::metrics::PREFIX`]).
#[derive(Debug)]
pub struct StatusCollector {
    status: Arc<Status>,
}

impl StatusCollector {
    pub fn new(status: Arc<Status>) -> StatusCollector {
        StatusCollector { status }
    }
}

type Labels = Vec<(&'static str, String)>;

struct Sample {
    labels: Labels,
    value: u64,
}

fn emit(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    counter: bool,
    samples: &[Sample],
) -> Result<(), std::fmt::Error> {
    let ty = if counter {
        ConstCounter::new(0u64).metric_type()
    } else {
        ConstGauge::new(0i64).metric_type()
    };
    let mut m = encoder.encode_descriptor(name, help, None, ty)?;
    for s in samples {
        let fam = m.encode_family(&s.labels)?;
        if counter {
            ConstCounter::new(s.value).encode(fam)?;
        } else {
            ConstGauge::new(s.value as i64).encode(fam)?;
        }
    }
    Ok(())
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut conns = Vec::new();
        let mut connects = Vec::new();
        let mut errors = Vec::new();
        let mut rejections = Vec::new();
        let mut retries = Vec::new();
        let mut src_active = Vec::new();
        let mut src_eaddrnotavail = Vec::new();
        let mut h2_conns = Vec::new();
        let mut h2_streams = Vec::new();
        let mut tls_handshakes = Vec::new();
        let mut tls_failures = Vec::new();
        for up in self.status.upstreams() {
            let u = up.name;
            retries.push(Sample {
                labels: vec![("upstream", u.clone())],
                value: up.retries,
            });
            for ep in &up.endpoints {
                let base: Labels = vec![("upstream", u.clone()), ("endpoint", ep.addr.to_string())];
                let in_use = ep.open.saturating_sub(ep.idle);
                for (state, v) in [
                    ("open", ep.open),
                    ("idle", ep.idle),
                    ("in_use", in_use),
                    ("pending", ep.pending),
                ] {
                    let mut l = base.clone();
                    l.push(("state", state.to_string()));
                    conns.push(Sample {
                        labels: l,
                        value: v as u64,
                    });
                }
                connects.push(Sample {
                    labels: base.clone(),
                    value: ep.connects,
                });
                h2_conns.push(Sample {
                    labels: base.clone(),
                    value: ep.shared_open as u64,
                });
                h2_streams.push(Sample {
                    labels: base.clone(),
                    value: ep.shared_streams as u64,
                });
                if up.tls {
                    tls_handshakes.push(Sample {
                        labels: base.clone(),
                        value: ep.tls_handshakes,
                    });
                    for (reason, v) in &ep.tls_failures {
                        let mut l = base.clone();
                        l.push(("reason", reason.to_string()));
                        tls_failures.push(Sample {
                            labels: l,
                            value: *v,
                        });
                    }
                }
                for (errno, v) in &ep.connect_errors {
                    let mut l = base.clone();
                    l.push(("errno", errno.clone()));
                    errors.push(Sample {
                        labels: l,
                        value: *v,
                    });
                }
                for (reason, v) in [("full", ep.queue_full), ("timeout", ep.queue_timeout)] {
                    let mut l = base.clone();
                    l.push(("reason", reason.to_string()));
                    rejections.push(Sample {
                        labels: l,
                        value: v,
                    });
                }
            }
            for s in &up.sources {
                let l: Labels = vec![("upstream", u.clone()), ("source", s.ip.to_string())];
                src_active.push(Sample {
                    labels: l.clone(),
                    value: s.active as u64,
                });
                src_eaddrnotavail.push(Sample {
                    labels: l,
                    value: s.eaddrnotavail,
                });
            }
        }
        emit(
            &mut encoder,
            "upstream_connections",
            "Upstream connections by state (open = open + opening; pending = requests waiting)",
            false,
            &conns,
        )?;
        emit(
            &mut encoder,
            "upstream_connects",
            "Upstream connections dialed successfully",
            true,
            &connects,
        )?;
        emit(
            &mut encoder,
            "upstream_connect_errors",
            "Failed upstream dials by errno",
            true,
            &errors,
        )?;
        emit(
            &mut encoder,
            "upstream_h2_connections",
            "Open HTTP/2 upstream connections",
            false,
            &h2_conns,
        )?;
        emit(
            &mut encoder,
            "upstream_h2_streams",
            "Requests in flight on HTTP/2 upstream connections",
            false,
            &h2_streams,
        )?;
        emit(
            &mut encoder,
            "upstream_tls_handshakes",
            "TLS handshakes started toward upstream endpoints",
            true,
            &tls_handshakes,
        )?;
        emit(
            &mut encoder,
            "upstream_tls_handshake_failures",
            "Failed TLS handshakes by reason (unknown-issuer, name-mismatch, expired, …)",
            true,
            &tls_failures,
        )?;
        emit(
            &mut encoder,
            "upstream_retries",
            "Requests sent again on a fresh connection",
            true,
            &retries,
        )?;
        emit(
            &mut encoder,
            "upstream_queue_rejections",
            "Requests answered 503 because no connection was free",
            true,
            &rejections,
        )?;
        emit(
            &mut encoder,
            "source_connections_active",
            "Open upstream connections per source address",
            false,
            &src_active,
        )?;
        emit(
            &mut encoder,
            "source_eaddrnotavail",
            "EADDRNOTAVAIL seen per source address",
            true,
            &src_eaddrnotavail,
        )?;
        if let Some(current) = self.status.intercept_current() {
            emit(
                &mut encoder,
                "intercept_rules_current",
                "1 while the interception rules' last renewal went through (0: they are expiring, and the apps go direct)",
                false,
                &[Sample {
                    labels: vec![("table", "inet loopmux".to_string())],
                    value: u64::from(current),
                }],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view source with no upstream behind it: what `app` publishes
    /// is all the status view knows.
    struct Fake;

    impl UpstreamViews for Fake {
        fn upstream_views(&self, out: &mut Vec<UpstreamView>) {
            out.push(UpstreamView {
                name: "fake".into(),
                protocol: "http2",
                tls: true,
                max_connections: 4,
                retries: 7,
                endpoints: vec![EndpointView {
                    addr: "192.0.2.1:443".parse().unwrap(),
                    open: 3,
                    idle: 1,
                    pending: 2,
                    in_flight: 5,
                    connects: 11,
                    connect_errors: vec![("ECONNREFUSED".into(), 6)],
                    tls_handshakes: 12,
                    tls_failures: vec![("unknown-issuer", 1)],
                    queue_full: 8,
                    queue_timeout: 9,
                    shared_open: 1,
                    shared_streams: 13,
                    exclusive_protocol: "http/1.1",
                    shared_protocol: "h2",
                    shared_connections: vec![SharedConnView {
                        id: 42,
                        streams: 13,
                        limit: 100,
                        draining: false,
                    }],
                }],
                sources: vec![SourceView {
                    ip: "198.18.0.11".parse().unwrap(),
                    active: 3,
                    eaddrnotavail: 14,
                }],
            });
        }
    }

    #[test]
    fn a_published_view_source_shows_in_status_and_in_the_scrape() {
        let status = Arc::new(Status::default());
        status.publish(Vec::new(), vec![Arc::new(Fake)]);

        let json = status.status_json();
        let u = &json["upstreams"][0];
        assert_eq!(u["name"], "fake");
        assert_eq!(u["protocol"], "http2");
        assert_eq!(u["tls"], true);
        assert_eq!(u["max_connections"], 4);
        assert_eq!(u["retries"], 7);
        assert_eq!(u["sources"][0]["ip"], "198.18.0.11");
        assert_eq!(u["sources"][0]["active"], 3);
        assert_eq!(u["sources"][0]["eaddrnotavail"], 14);
        let e = &u["endpoints"][0];
        for (key, want) in [
            ("open", 3),
            ("idle", 1),
            ("pending", 2),
            ("in_flight", 5),
            ("connects", 11),
            ("tls_handshakes", 12),
        ] {
            assert_eq!(e[key], want, "{key}: {e}");
        }
        assert_eq!(e["addr"], "192.0.2.1:443");
        assert_eq!(
            e["connections"],
            serde_json::json!([
                {"protocol": "http/1.1", "open": 2, "idle": 1},
                {"protocol": "h2", "id": 42, "streams": 13, "limit": 100, "draining": false},
            ])
        );
        assert_eq!(json["generation"], 1);

        let mut registry = prometheus_client::registry::Registry::default();
        registry
            .sub_registry_with_prefix(crate::metrics::PREFIX)
            .register_collector(Box::new(StatusCollector::new(status.clone())));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let ep = r#"upstream="fake",endpoint="192.0.2.1:443""#;
        for line in [
            format!("loopmux_upstream_connections{{{ep},state=\"open\"}} 3"),
            format!("loopmux_upstream_connections{{{ep},state=\"idle\"}} 1"),
            format!("loopmux_upstream_connections{{{ep},state=\"in_use\"}} 2"),
            format!("loopmux_upstream_connections{{{ep},state=\"pending\"}} 2"),
            format!("loopmux_upstream_connects_total{{{ep}}} 11"),
            format!("loopmux_upstream_connect_errors_total{{{ep},errno=\"ECONNREFUSED\"}} 6"),
            format!("loopmux_upstream_h2_connections{{{ep}}} 1"),
            format!("loopmux_upstream_h2_streams{{{ep}}} 13"),
            format!("loopmux_upstream_tls_handshakes_total{{{ep}}} 12"),
            format!(
                "loopmux_upstream_tls_handshake_failures_total{{{ep},reason=\"unknown-issuer\"}} 1"
            ),
            format!("loopmux_upstream_queue_rejections_total{{{ep},reason=\"full\"}} 8"),
            format!("loopmux_upstream_queue_rejections_total{{{ep},reason=\"timeout\"}} 9"),
            "loopmux_upstream_retries_total{upstream=\"fake\"} 7".to_string(),
            "loopmux_source_connections_active{upstream=\"fake\",source=\"198.18.0.11\"} 3"
                .to_string(),
            "loopmux_source_eaddrnotavail_total{upstream=\"fake\",source=\"198.18.0.11\"} 14"
                .to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // No intercept listener: the rules' gauge is absent.
        assert!(!text.contains("intercept_rules_current"), "{text}");
    }
}
