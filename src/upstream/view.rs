//! What `/status` and the scrape see of an upstream: its pools, endpoints
//! and sources read into plain views, only when they ask.

use std::sync::atomic::Ordering::Relaxed;

use crate::status::{EndpointView, SharedConnView, SourceView, UpstreamView, UpstreamViews};

use super::conn::AppProtocol;
use super::{Endpoint, Upstream};

impl Upstream {
    /// The upstream as it is now. Takes each endpoint's pool lock briefly,
    /// as a scrape always did.
    pub fn view(&self) -> UpstreamView {
        UpstreamView {
            name: self.cfg.name.clone(),
            protocol: self.cfg.protocol.as_str(),
            tls: self.cfg.tls.is_some(),
            max_connections: self.cfg.max_connections,
            retries: self.retries.load(Relaxed),
            endpoints: self.endpoints().iter().map(|e| e.view()).collect(),
            sources: self
                .dialer
                .sources()
                .iter()
                .map(|s| SourceView {
                    ip: s.ip,
                    active: s.active.load(Relaxed),
                    eaddrnotavail: s.addr_not_avail.load(Relaxed),
                })
                .collect(),
        }
    }
}

impl UpstreamViews for Upstream {
    fn upstream_views(&self, out: &mut Vec<UpstreamView>) {
        out.push(self.view());
    }
}

impl Endpoint {
    fn view(&self) -> EndpointView {
        let snap = self.pool.snapshot();
        let stats = self.pool.stats();
        EndpointView {
            addr: self.addr,
            open: snap.open,
            idle: snap.idle,
            pending: snap.waiting,
            in_flight: self.in_flight(),
            connects: self.connects.load(Relaxed),
            connect_errors: self
                .connect_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(errno, n)| (errno.clone(), *n))
                .collect(),
            tls_handshakes: self.tls_handshakes.load(Relaxed),
            tls_failures: self
                .tls_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(reason, n)| (*reason, *n))
                .collect(),
            queue_full: stats.queue_full.load(Relaxed),
            queue_timeout: stats.queue_timeout.load(Relaxed),
            shared_open: snap.shared,
            shared_streams: snap.streams,
            exclusive_protocol: AppProtocol::Http1.as_str(),
            shared_protocol: AppProtocol::Http2.as_str(),
            shared_connections: self
                .pool
                .shared_connections()
                .iter()
                .map(|c| SharedConnView {
                    id: c.id,
                    streams: c.streams,
                    limit: c.limit,
                    draining: c.draining,
                })
                .collect(),
        }
    }
}
