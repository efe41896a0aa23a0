//! The origins a forward listener has pools for: created on first use,
//! capped in number (the least recently used idle one makes room), dropped
//! when idle. Each origin is an [`Upstream`] of its own, so it gets the
//! same pool, cap, queue, timeouts and retries as an `http` listener's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::allow::target::Target;
use crate::status::{UpstreamView, UpstreamViews};
use crate::upstream::Upstream;

/// One origin: its upstream, started by the first request that needs it,
/// and replaced in place by a reload (the successor takes over its pools).
pub struct Origin {
    pub target: Target,
    pub upstream: OnceCell<RwLock<Arc<Upstream>>>,
    /// Requests and tunnels holding this origin now ([`OriginGuard`]).
    users: AtomicUsize,
    last_used_ms: AtomicU64,
}

impl Origin {
    /// The upstream requests use now, once started.
    pub fn current(&self) -> Option<Arc<Upstream>> {
        self.upstream
            .get()
            .map(|u| u.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// A reload's successor for a started origin (it took over the pools,
    /// so the cap holds across the swap).
    pub fn replace(&self, up: Arc<Upstream>) {
        if let Some(u) = self.upstream.get() {
            *u.write().unwrap_or_else(|p| p.into_inner()) = up;
        }
    }

    /// Whether anything uses the origin: a request being routed, or a
    /// request or tunnel on one of its endpoints.
    fn busy(&self) -> bool {
        self.users.load(Ordering::Relaxed) > 0
            || self
                .current()
                .is_some_and(|u| u.endpoints().iter().any(|e| e.in_flight() > 0))
    }

    fn retire(&self) {
        if let Some(u) = self.current() {
            for ep in u.endpoints().iter() {
                ep.pool.retire();
            }
        }
    }
}

/// Holds an origin in the table while a request uses it.
pub struct OriginGuard(Arc<Origin>);

impl OriginGuard {
    pub fn origin(&self) -> &Arc<Origin> {
        &self.0
    }
}

impl Drop for OriginGuard {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The table is full of origins in use.
#[derive(Debug, Clone, Copy)]
pub struct Full(pub usize);

pub struct Origins {
    map: Mutex<HashMap<Target, Arc<Origin>>>,
    epoch: Instant,
}

impl Default for Origins {
    fn default() -> Self {
        Origins {
            map: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }
}

impl Origins {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The origin for `target`, created if new. At `max` origins the least
    /// recently used idle one is dropped first.
    ///
    /// # Errors
    /// [`Full`] when every origin is in use.
    pub fn get(&self, target: &Target, max: usize) -> Result<OriginGuard, Full> {
        let now = self.now_ms();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = map.get(target) {
            o.last_used_ms.store(now, Ordering::Relaxed);
            o.users.fetch_add(1, Ordering::Relaxed);
            return Ok(OriginGuard(o.clone()));
        }
        while map.len() >= max {
            // Linear, but only when a new origin meets a full table.
            let victim = map
                .iter()
                .filter(|(_, o)| !o.busy())
                .min_by_key(|(_, o)| o.last_used_ms.load(Ordering::Relaxed))
                .map(|(k, _)| k.clone());
            let Some(k) = victim else {
                return Err(Full(max));
            };
            if let Some(o) = map.remove(&k) {
                tracing::debug!(origin = %o.target, "max_origins reached: least recently used idle origin dropped");
                o.retire();
            }
        }
        let o = Arc::new(Origin {
            target: target.clone(),
            upstream: OnceCell::new(),
            users: AtomicUsize::new(1),
            last_used_ms: AtomicU64::new(now),
        });
        map.insert(target.clone(), o.clone());
        Ok(OriginGuard(o))
    }

    /// Drops origins unused for `idle`; returns how many are left.
    pub fn reap(&self, idle: Duration) -> usize {
        let cutoff = self.now_ms().saturating_sub(idle.as_millis() as u64);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, o| {
            let keep = o.busy() || o.last_used_ms.load(Ordering::Relaxed) > cutoff;
            if !keep {
                tracing::debug!(origin = %o.target, "origin idle: dropped");
                o.retire();
            }
            keep
        });
        map.len()
    }

    /// The origins whose upstreams have started.
    pub fn started(&self) -> Vec<Arc<Origin>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.values()
            .filter(|o| o.upstream.initialized())
            .cloned()
            .collect()
    }

    /// Drops `origin` (a reload changed what its connections are: TLS or
    /// protocol); requests in flight finish on its pools.
    pub fn drop_origin(&self, origin: &Arc<Origin>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&origin.target)
            .is_some_and(|o| Arc::ptr_eq(o, origin))
        {
            map.remove(&origin.target);
        }
        origin.retire();
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The origins with started upstreams, for `/status`.
    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.values().filter_map(|o| o.current()).collect()
    }
}

/// A forward listener's origins, for `/status` and the scrape. The table's
/// lock is let go before any pool is read: requests route through it.
impl UpstreamViews for super::Forward {
    fn upstream_views(&self, out: &mut Vec<UpstreamView>) {
        for u in self.origins.upstreams() {
            u.upstream_views(out);
        }
    }
}

/// Reaps `origins` every `period` until they are dropped; `gauge` follows
/// how many there are.
pub fn spawn_reaper(
    origins: Weak<Origins>,
    idle: impl Fn() -> Duration + Send + 'static,
    gauge: prometheus_client::metrics::gauge::Gauge,
) {
    tokio::spawn(async move {
        loop {
            let idle_now = idle();
            let period = (idle_now / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
            tokio::time::sleep(period).await;
            let Some(o) = origins.upgrade() else { return };
            gauge.set(o.reap(idle_now) as i64);
        }
    });
}
