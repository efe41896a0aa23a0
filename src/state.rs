//! What the admin endpoint and metrics see of the running proxy: the
//! current upstreams and listeners, readiness, and the config generation.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::upstream::conn::AppProtocol;
use crate::upstream::Upstream;

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

#[derive(Default)]
pub struct Shared {
    upstreams: RwLock<Arc<Vec<Arc<Upstream>>>>,
    listeners: RwLock<Arc<Vec<ListenerInfo>>>,
    forwards: RwLock<Arc<Vec<Arc<crate::forward::Forward>>>>,
    ready: AtomicBool,
    /// Whether the interception rules' last renewal went through.
    intercept_current: RwLock<Option<Arc<AtomicBool>>>,
    /// The interception rules installed (the nftables chain's lines).
    intercept_rules: RwLock<Vec<String>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("generation", &self.generation())
            .finish()
    }
}

impl Shared {
    pub fn upstreams(&self) -> Arc<Vec<Arc<Upstream>>> {
        self.upstreams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn listeners(&self) -> Arc<Vec<ListenerInfo>> {
        self.listeners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The configured upstreams, then the origins of forward listeners.
    pub fn all_upstreams(&self) -> Vec<Arc<Upstream>> {
        let mut all = self.upstreams().to_vec();
        for f in self
            .forwards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            all.extend(f.origin_upstreams());
        }
        all
    }

    /// Publishes a new config generation.
    pub fn publish(
        &self,
        upstreams: Vec<Arc<Upstream>>,
        listeners: Vec<ListenerInfo>,
        forwards: Vec<Arc<crate::forward::Forward>>,
    ) {
        *self.forwards.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(forwards);
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
        use std::sync::atomic::Ordering::Relaxed;
        let upstreams: Vec<_> = self
            .all_upstreams()
            .iter()
            .map(|u| {
                let endpoints: Vec<_> = u
                    .endpoints()
                    .iter()
                    .map(|e| {
                        let s = e.pool.snapshot();
                        // HTTP/1 connections as a count (one request each);
                        // HTTP/2 ones one by one, with their streams.
                        let mut conns = vec![serde_json::json!({
                            "protocol": AppProtocol::Http1.as_str(),
                            "open": s.open - s.shared,
                            "idle": s.idle,
                        })];
                        conns.extend(e.pool.shared_connections().iter().map(|c| {
                            serde_json::json!({
                                "protocol": AppProtocol::Http2.as_str(),
                                "id": c.id,
                                "streams": c.streams,
                                "limit": c.limit,
                                "draining": c.draining,
                            })
                        }));
                        serde_json::json!({
                            "addr": e.addr.to_string(),
                            "open": s.open,
                            "idle": s.idle,
                            "pending": s.waiting,
                            "in_flight": e.in_flight(),
                            "connects": e.connects.load(Relaxed),
                            "tls_handshakes": e.tls_handshakes.load(Relaxed),
                            "connections": conns,
                        })
                    })
                    .collect();
                let sources: Vec<_> = u
                    .dialer
                    .sources()
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "ip": s.ip.to_string(),
                            "active": s.active.load(Relaxed),
                            "eaddrnotavail": s.addr_not_avail.load(Relaxed),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": u.cfg.name,
                    "protocol": u.cfg.protocol.as_str(),
                    "tls": u.cfg.tls.is_some(),
                    "max_connections": u.cfg.max_connections,
                    "endpoints": endpoints,
                    "sources": sources,
                    "retries": u.retries.load(Relaxed),
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
