//! A bounded pool of long-lived connections to one upstream endpoint.
//!
//! The hard rule (DESIGN invariant 1): open + opening connections never
//! exceed `max_connections`, counted once for the whole process. A caller
//! gets a stream on a shared connection (HTTP/2, up to its stream limit),
//! an idle exclusive connection (HTTP/1, most recently used first), a
//! [`Slot`] that allows exactly one dial, or waits in a bounded FIFO queue.
//! Nothing else can create a connection, so the cap cannot be bypassed.
//!
//! A connection is exclusive or shared by what it says of itself
//! ([`Reusable::share`]), so one pool serves `protocol = "auto"`, where ALPN
//! decides per connection. For shared connections the pool opens another
//! only when every open one is at its stream limit, and while one is being
//! opened a burst waits for it instead of opening more (istio's ztunnel
//! does the same per key).
//!
//! The pool is generic over the connection type so that its logic can be
//! tested and benchmarked without sockets.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// What the pool needs to know about a connection.
pub trait Reusable: Send + 'static {
    /// `false` once the connection can carry no more requests (closed by
    /// the peer, GOAWAY, protocol error). Must be cheap and must not block.
    fn is_usable(&self) -> bool;

    /// For a connection that carries several requests at once (HTTP/2): a
    /// handle for one more request. `None` (the default): exclusive, one
    /// request at a time.
    fn share(&self) -> Option<Self>
    where
        Self: Sized,
    {
        None
    }

    /// How many requests a shared connection may carry at once now (the
    /// peer may change its limit at any time). Read under the pool's lock:
    /// must be cheap.
    fn stream_limit(&self) -> usize {
        1
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    pub max_connections: usize,
    pub max_pending: usize,
    pub queue_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    /// Connections are expected to be shared (`protocol = "http2"`): while
    /// one is being opened, a burst waits for it rather than opening more.
    /// The pool also learns this from the first shared connection.
    pub multiplexed: bool,
}

/// Why no connection could be had. Both map to 503: the cap held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("wait queue full ({0} requests already waiting)")]
    QueueFull(usize),
    #[error("no connection became free within {}", humantime::format_duration(*.0))]
    QueueTimeout(Duration),
}

/// Requests turned away with 503, read by metrics. Both only move when
/// the cap is reached, so they cost nothing on the normal path.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub queue_full: AtomicU64,
    pub queue_timeout: AtomicU64,
}

/// A point-in-time view, for `/status`, metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolSnapshot {
    /// Open + opening.
    pub open: usize,
    /// Idle exclusive connections.
    pub idle: usize,
    pub waiting: usize,
    /// Open shared (HTTP/2) connections, and the requests they carry.
    pub shared: usize,
    pub streams: usize,
}

/// One shared connection, for `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedView {
    pub id: u64,
    pub streams: usize,
    pub limit: usize,
    /// Takes no new requests (GOAWAY, too old, over a lowered cap).
    pub draining: bool,
}

struct Entry<T> {
    id: u64,
    created: Instant,
    conn: T,
}

struct Idle<T> {
    entry: Entry<T>,
    since: Instant,
}

struct SharedConn<T> {
    entry: Entry<T>,
    active: usize,
    /// When `active` last dropped to 0.
    since: Instant,
    draining: bool,
}

/// Handed to a waiter: a connection (or a stream on one), or the right to
/// dial one.
enum Grant<T: Reusable> {
    Conn(Pooled<T>),
    Slot(Slot<T>),
}

struct State<T: Reusable> {
    /// Under the lock so that a reload can change the cap and timeouts in
    /// place (DESIGN invariant 8) without a second pool to the endpoint.
    cfg: PoolConfig,
    /// Oldest first: checkout takes from the end (most recently used).
    idle: Vec<Idle<T>>,
    /// Oldest first: requests fill the oldest connection with room, so a
    /// newer one is used only when the older ones are full.
    shared: Vec<SharedConn<T>>,
    /// Open + opening, exclusive and shared, in use or idle.
    open: usize,
    /// Slots handed out and not yet filled or dropped.
    opening: usize,
    multiplexed: bool,
    waiters: VecDeque<oneshot::Sender<Grant<T>>>,
    next_id: u64,
    retired: bool,
}

struct Inner<T: Reusable> {
    state: Mutex<State<T>>,
    stats: PoolStats,
}

/// A pool for one endpoint. Cloning shares it.
pub struct Pool<T: Reusable> {
    inner: Arc<Inner<T>>,
}

impl<T: Reusable> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

/// A handle that does not keep the pool alive: for connection driver tasks.
pub struct WeakPool<T: Reusable>(Weak<Inner<T>>);

/// The right to open exactly one connection. Counted as "opening" until it
/// is filled or dropped; dropping it frees the place for the next waiter.
pub struct Slot<T: Reusable> {
    inner: Option<Arc<Inner<T>>>,
    id: u64,
}

/// A checked-out connection, or a stream on a shared one. Dropping it
/// returns it to the pool (or closes it if it is no longer usable, too old,
/// or the pool is retired).
pub struct Pooled<T: Reusable> {
    inner: Arc<Inner<T>>,
    entry: Option<Entry<T>>,
    reused: bool,
    discard: bool,
    shared: bool,
}

/// What [`Pool::checkout`] gives.
pub enum Acquired<T: Reusable> {
    /// A connection (or a stream on one) that was already open.
    Reused(Pooled<T>),
    /// Dial a new connection and [`Slot::fill`] it.
    Dial(Slot<T>),
}

impl<T: Reusable> State<T> {
    fn expired(&self, created: Instant, now: Instant) -> bool {
        now.duration_since(created) >= self.cfg.max_lifetime
    }

    fn is_stale(&self, idle: &Idle<T>, now: Instant) -> bool {
        now.duration_since(idle.since) >= self.cfg.idle_timeout
            || self.expired(idle.entry.created, now)
            || !idle.entry.conn.is_usable()
    }

    /// Marks shared connections that may take no new requests as draining,
    /// and removes those that carry none (their places are freed: the
    /// caller gives them out). Returns the removed ones, to be dropped
    /// outside the lock. `idle_too`: also those idle past `idle_timeout`.
    fn prune_shared(&mut self, now: Instant, idle_too: bool) -> Vec<SharedConn<T>> {
        let mut doomed = Vec::new();
        let mut i = 0;
        while i < self.shared.len() {
            let s = &self.shared[i];
            let unfit =
                self.retired || !s.entry.conn.is_usable() || self.expired(s.entry.created, now);
            let idle = s.active == 0 && now.duration_since(s.since) >= self.cfg.idle_timeout;
            if s.active == 0 && (unfit || s.draining || (idle_too && idle)) {
                doomed.push(self.shared.remove(i));
                self.open -= 1;
                continue;
            }
            if unfit {
                self.shared[i].draining = true;
            }
            i += 1;
        }
        doomed
    }

    /// The oldest shared connection with room for one more request.
    fn shared_with_room(&self, avoid: Option<u64>) -> Option<usize> {
        self.shared.iter().position(|s| {
            !s.draining
                && Some(s.entry.id) != avoid
                && s.active < s.entry.conn.stream_limit()
                && s.entry.conn.is_usable()
        })
    }

    /// Whether a new dial may start: below the cap, and for shared
    /// connections, not while another is being opened. A retired pool
    /// still dials for the requests already waiting in it.
    fn may_dial(&self) -> bool {
        self.open < self.cfg.max_connections && !(self.multiplexed && self.opening > 0)
    }

    /// A place for a dial, counted as open and opening.
    fn take_slot(&mut self, inner: &Arc<Inner<T>>) -> Slot<T> {
        self.open += 1;
        self.opening += 1;
        self.next_id += 1;
        Slot {
            inner: Some(inner.clone()),
            id: self.next_id,
        }
    }

    /// A handle for one more request on shared connection `i`.
    fn take_stream(&mut self, inner: &Arc<Inner<T>>, i: usize) -> Option<Pooled<T>> {
        let s = &mut self.shared[i];
        let conn = s.entry.conn.share()?;
        s.active += 1;
        Some(Pooled {
            inner: inner.clone(),
            entry: Some(Entry {
                id: s.entry.id,
                created: s.entry.created,
                conn,
            }),
            reused: true,
            discard: false,
            shared: true,
        })
    }

    /// One request on shared connection `id` ended; `drain`: the
    /// connection takes no new ones.
    fn stream_done(&mut self, id: u64, now: Instant, drain: bool) -> Option<SharedConn<T>> {
        let i = self.shared.iter().position(|s| s.entry.id == id)?;
        let s = &mut self.shared[i];
        s.active -= 1;
        s.draining |= drain;
        if s.active > 0 {
            return None;
        }
        s.since = now;
        let over_cap = self.open > self.cfg.max_connections;
        let s = &self.shared[i];
        if s.draining
            || over_cap
            || self.retired
            || !s.entry.conn.is_usable()
            || self.expired(s.entry.created, now)
        {
            self.open -= 1;
            return Some(self.shared.remove(i));
        }
        None
    }
}

impl<T: Reusable> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock would be a bug in this module;
        // the state is still consistent counters, so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives what is free now (streams on shared connections with room,
    /// places to dial) to waiters, first come first served. Called with
    /// the lock held after anything that may have freed something; sending
    /// never runs user code. After a reload lowered the cap, no place is
    /// given out until `open` is below it.
    fn serve_waiters(self: &Arc<Self>, st: &mut State<T>) {
        while let Some(front) = st.waiters.front() {
            if front.is_closed() {
                st.waiters.pop_front();
                continue;
            }
            if let Some(i) = st.shared_with_room(None) {
                let Some(p) = st.take_stream(self, i) else {
                    st.shared[i].draining = true;
                    continue;
                };
                let tx = st.waiters.pop_front().expect("front exists");
                if let Err(Grant::Conn(mut p)) = tx.send(Grant::Conn(p)) {
                    // Waiter gave up: undo by hand, its drop would re-lock.
                    p.entry = None;
                    st.shared[i].active -= 1;
                }
                continue;
            }
            if st.may_dial() {
                let slot = st.take_slot(self);
                let tx = st.waiters.pop_front().expect("front exists");
                if let Err(Grant::Slot(mut s)) = tx.send(Grant::Slot(slot)) {
                    s.inner = None;
                    st.open -= 1;
                    st.opening -= 1;
                }
                continue;
            }
            return;
        }
    }

    /// A connection closed: its place is free.
    fn release_place(self: &Arc<Self>, st: &mut State<T>) {
        st.open -= 1;
        self.serve_waiters(st);
    }

    /// Returns a usable exclusive connection: to the first live waiter,
    /// else to idle. `Some` when it must be closed instead.
    fn put_back(self: &Arc<Self>, st: &mut State<T>, mut entry: Entry<T>) -> Option<Entry<T>> {
        // Over a cap lowered by a reload: close, so the count comes down.
        if st.retired || st.open > st.cfg.max_connections {
            return Some(entry);
        }
        while let Some(tx) = st.waiters.pop_front() {
            let p = Pooled {
                inner: self.clone(),
                entry: Some(entry),
                reused: true,
                discard: false,
                shared: false,
            };
            match tx.send(Grant::Conn(p)) {
                Ok(()) => return None,
                Err(Grant::Conn(mut p)) => {
                    entry = p.entry.take().expect("just put there");
                }
                Err(Grant::Slot(_)) => unreachable!("sent a connection"),
            }
        }
        st.idle.push(Idle {
            entry,
            since: Instant::now(),
        });
        None
    }
}

impl<T: Reusable> Pool<T> {
    pub fn new(cfg: PoolConfig) -> Self {
        Pool {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    cfg,
                    idle: Vec::new(),
                    shared: Vec::new(),
                    open: 0,
                    opening: 0,
                    multiplexed: cfg.multiplexed,
                    waiters: VecDeque::new(),
                    next_id: 0,
                    retired: false,
                }),
                stats: PoolStats::default(),
            }),
        }
    }

    pub fn stats(&self) -> &PoolStats {
        &self.inner.stats
    }

    pub fn downgrade(&self) -> WeakPool<T> {
        WeakPool(Arc::downgrade(&self.inner))
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        let st = self.inner.lock();
        PoolSnapshot {
            open: st.open,
            idle: st.idle.len(),
            waiting: st.waiters.iter().filter(|w| !w.is_closed()).count(),
            shared: st.shared.len(),
            streams: st.shared.iter().map(|s| s.active).sum(),
        }
    }

    /// Every shared connection, oldest first.
    pub fn shared_connections(&self) -> Vec<SharedView> {
        let st = self.inner.lock();
        st.shared
            .iter()
            .map(|s| SharedView {
                id: s.entry.id,
                streams: s.active,
                limit: s.entry.conn.stream_limit(),
                draining: s.draining,
            })
            .collect()
    }

    /// A stream on a shared connection, an idle connection, a slot to dial,
    /// or a place in the queue.
    ///
    /// # Errors
    /// [`PoolError`] when the queue is full or the wait timed out; no socket
    /// is opened in either case. Cancel-safe: a grant that arrives after the
    /// caller gave up goes back to the pool when the receiver drops.
    pub async fn checkout(&self) -> Result<Acquired<T>, PoolError> {
        self.checkout_inner(false, None).await
    }

    /// Like [`checkout`](Self::checkout), but never hands out an idle
    /// exclusive connection that has been sitting in the pool: for the one
    /// retry after a reused connection turned out to be closed. At the cap,
    /// an idle connection is closed to make room.
    pub async fn checkout_fresh(&self) -> Result<Acquired<T>, PoolError> {
        self.checkout_inner(true, None).await
    }

    /// Like [`checkout`](Self::checkout), but not on shared connection
    /// `id`: for the retry of a request that connection refused.
    pub async fn checkout_avoiding(&self, id: u64) -> Result<Acquired<T>, PoolError> {
        self.checkout_inner(false, Some(id)).await
    }

    async fn checkout_inner(
        &self,
        fresh: bool,
        avoid: Option<u64>,
    ) -> Result<Acquired<T>, PoolError> {
        let inner = &self.inner;
        let (rx, queue_timeout) = {
            let now = Instant::now();
            let mut st = inner.lock();
            let mut doomed = Vec::new();
            let mut doomed_shared = Vec::new();
            if !st.shared.is_empty() {
                doomed_shared = st.prune_shared(now, false);
                if let Some(i) = st.shared_with_room(avoid) {
                    if let Some(p) = st.take_stream(inner, i) {
                        if !doomed_shared.is_empty() {
                            inner.serve_waiters(&mut st);
                        }
                        drop(st);
                        drop(doomed_shared);
                        return Ok(Acquired::Reused(p));
                    }
                }
            }
            if !fresh {
                while let Some(idle) = st.idle.pop() {
                    if st.is_stale(&idle, now) {
                        doomed.push(idle);
                        continue;
                    }
                    st.open -= doomed.len();
                    if !doomed.is_empty() || !doomed_shared.is_empty() {
                        inner.serve_waiters(&mut st);
                    }
                    drop(st);
                    drop(doomed);
                    drop(doomed_shared);
                    return Ok(Acquired::Reused(Pooled {
                        inner: inner.clone(),
                        entry: Some(idle.entry),
                        reused: true,
                        discard: false,
                        shared: false,
                    }));
                }
            } else if st.open >= st.cfg.max_connections && !st.idle.is_empty() {
                // At the cap, close one idle connection (the least recently
                // used) to make room; the others stay open (invariant 2).
                doomed.push(st.idle.remove(0));
            }
            // Each doomed connection frees its place; it becomes our slot
            // (or a waiter's) below.
            st.open -= doomed.len();
            if st.may_dial() && st.waiters.is_empty() {
                let slot = st.take_slot(inner);
                drop(st);
                drop(doomed);
                drop(doomed_shared);
                return Ok(Acquired::Dial(slot));
            }
            if st.waiters.len() >= st.cfg.max_pending {
                st.waiters.retain(|w| !w.is_closed());
                if st.waiters.len() >= st.cfg.max_pending {
                    inner.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                    return Err(PoolError::QueueFull(st.waiters.len()));
                }
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(tx);
            // Places freed above, if any, go to the queue in order (we are
            // last in it).
            inner.serve_waiters(&mut st);
            let queue_timeout = st.cfg.queue_timeout;
            drop(st);
            drop(doomed);
            drop(doomed_shared);
            (rx, queue_timeout)
        };
        match tokio::time::timeout(queue_timeout, rx).await {
            Ok(Ok(Grant::Conn(p))) => Ok(Acquired::Reused(p)),
            Ok(Ok(Grant::Slot(s))) => Ok(Acquired::Dial(s)),
            // The sender is only dropped by `retire` draining waiters, or
            // with the pool; either way no place became free in time.
            Ok(Err(_)) | Err(_) => {
                inner.stats.queue_timeout.fetch_add(1, Ordering::Relaxed);
                Err(PoolError::QueueTimeout(queue_timeout))
            }
        }
    }

    /// Applies a reloaded config in place: the pool keeps its connections.
    /// A lower cap closes idle connections at once and busy ones as they
    /// come back, until `open` is within it; no new place is given out
    /// before then. A higher cap gives the new places to waiters now.
    pub fn reconfigure(&self, cfg: PoolConfig) {
        let inner = &self.inner;
        let (doomed, doomed_shared) = {
            let mut st = inner.lock();
            st.cfg = cfg;
            st.multiplexed = cfg.multiplexed || !st.shared.is_empty();
            let mut doomed = Vec::new();
            while st.open > st.cfg.max_connections && !st.idle.is_empty() {
                doomed.push(st.idle.remove(0));
                st.open -= 1;
            }
            let mut doomed_shared = Vec::new();
            // Shared connections over the cap: newest first take no new
            // requests and close when their last one ends.
            let mut over = st.open.saturating_sub(st.cfg.max_connections);
            let mut i = st.shared.len();
            while over > 0 && i > 0 {
                i -= 1;
                if st.shared[i].active == 0 {
                    doomed_shared.push(st.shared.remove(i));
                    st.open -= 1;
                } else {
                    st.shared[i].draining = true;
                }
                over -= 1;
            }
            inner.serve_waiters(&mut st);
            (doomed, doomed_shared)
        };
        drop(doomed);
        drop(doomed_shared);
    }

    /// Closes idle connections past `idle_timeout` or `max_lifetime`, or
    /// closed by the peer. Returns how many were closed.
    pub fn reap(&self) -> usize {
        let now = Instant::now();
        let inner = &self.inner;
        let (doomed, doomed_shared) = {
            let mut st = inner.lock();
            let mut doomed = Vec::new();
            let mut i = 0;
            while i < st.idle.len() {
                if st.is_stale(&st.idle[i], now) {
                    doomed.push(st.idle.remove(i));
                } else {
                    i += 1;
                }
            }
            st.open -= doomed.len();
            let doomed_shared = st.prune_shared(now, true);
            if !doomed.is_empty() || !doomed_shared.is_empty() {
                inner.serve_waiters(&mut st);
            }
            (doomed, doomed_shared)
        };
        doomed.len() + doomed_shared.len()
    }

    /// Stops keeping connections: idle ones close now, in-use ones close when
    /// returned (after any waiter is served). For endpoints that vanished
    /// from DNS.
    pub fn retire(&self) {
        let (doomed, doomed_shared) = {
            let mut st = self.inner.lock();
            st.retired = true;
            let doomed: Vec<_> = st.idle.drain(..).collect();
            st.open -= doomed.len();
            let doomed_shared = st.prune_shared(Instant::now(), false);
            (doomed, doomed_shared)
        };
        drop(doomed);
        drop(doomed_shared);
    }

    /// Spawns a task that reaps this pool until the pool is dropped. The
    /// period follows the current config (a reload may change it).
    pub fn spawn_reaper(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let period = {
                    let Some(inner) = weak.upgrade() else { return };
                    let cfg = inner.lock().cfg;
                    (cfg.idle_timeout.min(cfg.max_lifetime) / 4)
                        .clamp(Duration::from_millis(50), Duration::from_secs(5))
                };
                tokio::time::sleep(period).await;
                let Some(inner) = weak.upgrade() else { return };
                Pool { inner }.reap();
            }
        });
    }
}

impl<T: Reusable> WeakPool<T> {
    /// Forgets connection `id` if the pool holds it (idle, or shared):
    /// called by a connection's driver task when the connection ends, so a
    /// dead connection frees its place at once.
    pub fn evict(&self, id: u64) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        let mut st = inner.lock();
        if let Some(pos) = st.idle.iter().position(|i| i.entry.id == id) {
            let doomed = st.idle.remove(pos);
            inner.release_place(&mut st);
            drop(st);
            drop(doomed);
        } else if let Some(pos) = st.shared.iter().position(|s| s.entry.id == id) {
            let doomed = st.shared.remove(pos);
            inner.release_place(&mut st);
            drop(st);
            drop(doomed);
        }
    }
}

impl<T: Reusable> Slot<T> {
    /// The id the connection will have; give it to the driver task for
    /// [`WeakPool::evict`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Turns the slot into a checked-out connection. A shared connection
    /// joins the pool at once, and waiters get streams on it.
    pub fn fill(mut self, conn: T) -> Pooled<T> {
        let inner = self.inner.take().expect("a slot is filled once");
        let now = Instant::now();
        let mut st = inner.lock();
        st.opening -= 1;
        let handle = conn.share();
        let Some(handle) = handle else {
            // Exclusive: the waiters' turn comes when it is returned.
            drop(st);
            return Pooled {
                inner,
                entry: Some(Entry {
                    id: self.id,
                    created: now,
                    conn,
                }),
                reused: false,
                discard: false,
                shared: false,
            };
        };
        st.multiplexed = true;
        st.shared.push(SharedConn {
            entry: Entry {
                id: self.id,
                created: now,
                conn,
            },
            active: 1,
            since: now,
            draining: false,
        });
        inner.serve_waiters(&mut st);
        drop(st);
        Pooled {
            inner,
            entry: Some(Entry {
                id: self.id,
                created: now,
                conn: handle,
            }),
            reused: false,
            discard: false,
            shared: true,
        }
    }
}

impl<T: Reusable> Drop for Slot<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            let mut st = inner.lock();
            st.opening -= 1;
            inner.release_place(&mut st);
        }
    }
}

impl<T: Reusable> Pooled<T> {
    /// Whether this connection was open before this checkout. Only failures
    /// on reused connections are retried (the peer may have closed an idle
    /// connection; a fresh one failing means the upstream is down).
    pub fn is_reused(&self) -> bool {
        self.reused
    }

    /// Whether this is one stream on a shared connection.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    pub fn id(&self) -> u64 {
        self.entry.as_ref().map_or(0, |e| e.id)
    }

    /// Close instead of returning to the pool. For a stream on a shared
    /// connection: the connection takes no new requests and closes when
    /// its last one ends.
    pub fn discard(mut self) {
        self.discard = true;
    }
}

impl<T: Reusable> Deref for Pooled<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // `entry` is Some until drop.
        &self.entry.as_ref().expect("live pooled connection").conn
    }
}

impl<T: Reusable> DerefMut for Pooled<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.entry.as_mut().expect("live pooled connection").conn
    }
}

impl<T: Reusable> Drop for Pooled<T> {
    fn drop(&mut self) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        let inner = &self.inner;
        let now = Instant::now();
        if self.shared {
            let closed = {
                let mut st = inner.lock();
                let closed = st.stream_done(entry.id, now, self.discard);
                inner.serve_waiters(&mut st);
                closed
            };
            // The handle, and a connection closed for good, drop here,
            // outside the lock.
            drop(entry);
            drop(closed);
            return;
        }
        let usable = !self.discard && entry.conn.is_usable();
        let _closed = {
            let mut st = inner.lock();
            if usable && !st.expired(entry.created, now) {
                let back = inner.put_back(&mut st, entry);
                if back.is_some() {
                    inner.release_place(&mut st);
                }
                back
            } else {
                inner.release_place(&mut st);
                Some(entry)
            }
        };
        // `_closed` drops here, outside the lock.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    #[derive(Clone)]
    struct Fake {
        alive: Arc<AtomicBool>,
    }

    impl Fake {
        fn new() -> Self {
            Fake {
                alive: Arc::new(AtomicBool::new(true)),
            }
        }
    }

    impl Reusable for Fake {
        fn is_usable(&self) -> bool {
            self.alive.load(Ordering::Relaxed)
        }
    }

    fn cfg(max: usize, pending: usize) -> PoolConfig {
        PoolConfig {
            max_connections: max,
            max_pending: pending,
            queue_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(600),
            multiplexed: false,
        }
    }

    async fn get(pool: &Pool<Fake>) -> Pooled<Fake> {
        match pool.checkout().await.unwrap() {
            Acquired::Reused(p) => p,
            Acquired::Dial(s) => s.fill(Fake::new()),
        }
    }

    const EMPTY: PoolSnapshot = PoolSnapshot {
        open: 0,
        idle: 0,
        waiting: 0,
        shared: 0,
        streams: 0,
    };

    #[tokio::test]
    async fn reuses_most_recently_used_first() {
        let pool = Pool::new(cfg(4, 10));
        let a = get(&pool).await;
        let b = get(&pool).await;
        let (ida, idb) = (a.id(), b.id());
        drop(a);
        drop(b);
        let c = get(&pool).await;
        assert!(c.is_reused());
        assert_eq!(c.id(), idb, "MRU: the last returned comes out first");
        assert_ne!(c.id(), ida);
        assert_eq!(pool.snapshot().open, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn cap_holds_and_queue_timeout_answers() {
        let pool = Pool::new(cfg(2, 10));
        let _a = get(&pool).await;
        let _b = get(&pool).await;
        let e = pool.checkout().await.err().unwrap();
        assert_eq!(e, PoolError::QueueTimeout(Duration::from_secs(1)));
        assert_eq!(pool.snapshot().open, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_full_is_rejected_without_waiting() {
        let pool = Pool::new(cfg(1, 1));
        let _a = get(&pool).await;
        let p2 = pool.clone();
        let waiter = tokio::spawn(async move { p2.checkout().await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(pool.snapshot().waiting, 1);
        assert!(matches!(
            pool.checkout().await,
            Err(PoolError::QueueFull(1))
        ));
        drop(_a);
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn waiter_gets_returned_connection() {
        let pool = Pool::new(cfg(1, 10));
        let a = get(&pool).await;
        let id = a.id();
        let p2 = pool.clone();
        let waiter = tokio::spawn(async move { get(&p2).await.id() });
        tokio::task::yield_now().await;
        drop(a);
        assert_eq!(waiter.await.unwrap(), id);
    }

    #[tokio::test]
    async fn broken_connection_frees_place_for_waiter() {
        let pool = Pool::new(cfg(1, 10));
        let a = get(&pool).await;
        let p2 = pool.clone();
        let waiter =
            tokio::spawn(async move { matches!(p2.checkout().await, Ok(Acquired::Dial(_))) });
        tokio::task::yield_now().await;
        a.alive.store(false, Ordering::Relaxed);
        drop(a);
        assert!(waiter.await.unwrap(), "waiter gets a slot to dial anew");
    }

    #[tokio::test]
    async fn dropped_slot_frees_place() {
        let pool: Pool<Fake> = Pool::new(cfg(1, 10));
        let Acquired::Dial(slot) = pool.checkout().await.unwrap() else {
            panic!()
        };
        assert_eq!(pool.snapshot().open, 1);
        drop(slot); // dial failed
        assert_eq!(pool.snapshot().open, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_and_lifetime_close_connections() {
        let mut c = cfg(2, 10);
        c.idle_timeout = Duration::from_secs(10);
        c.max_lifetime = Duration::from_secs(25);
        let pool = Pool::new(c);
        drop(get(&pool).await);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(pool.reap(), 0);
        let p = get(&pool).await;
        assert!(p.is_reused());
        drop(p);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(pool.reap(), 1, "idle past idle_timeout");
        assert_eq!(pool.snapshot().open, 0);

        let p = get(&pool).await;
        tokio::time::advance(Duration::from_secs(26)).await;
        drop(p); // too old: closed on return
        assert_eq!(pool.snapshot(), EMPTY);
    }

    #[tokio::test]
    async fn evict_removes_dead_idle_connection() {
        let pool = Pool::new(cfg(1, 10));
        let a = get(&pool).await;
        let id = a.id();
        drop(a);
        assert_eq!(pool.snapshot().idle, 1);
        pool.downgrade().evict(id);
        assert_eq!(pool.snapshot(), EMPTY);
    }

    #[tokio::test]
    async fn fresh_checkout_never_reuses_idle() {
        let pool = Pool::new(cfg(1, 10));
        drop(get(&pool).await);
        assert!(matches!(pool.checkout_fresh().await, Ok(Acquired::Dial(_))));
    }

    #[tokio::test]
    async fn fresh_checkout_below_the_cap_keeps_idle_connections() {
        let pool = Pool::new(cfg(4, 10));
        let a = get(&pool).await;
        let b = get(&pool).await;
        drop(a);
        drop(b);
        assert!(matches!(pool.checkout_fresh().await, Ok(Acquired::Dial(_))));
        let s = pool.snapshot();
        assert_eq!((s.open, s.idle), (2, 2), "no idle connection was closed");
    }

    #[tokio::test]
    async fn fresh_checkout_at_the_cap_closes_only_one_idle() {
        let pool = Pool::new(cfg(3, 10));
        let conns = [get(&pool).await, get(&pool).await, get(&pool).await];
        let first = conns[0].id();
        drop(conns);
        let Ok(Acquired::Dial(slot)) = pool.checkout_fresh().await else {
            panic!("a slot")
        };
        let s = pool.snapshot();
        assert_eq!((s.open, s.idle), (3, 2), "one idle closed to make room");
        drop(slot);
        // The least recently used one went; the other two remain.
        let ids: Vec<u64> = pool.inner.lock().idle.iter().map(|i| i.entry.id).collect();
        assert!(!ids.contains(&first), "{ids:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn lowering_the_cap_closes_idle_and_returning_connections() {
        let pool = Pool::new(cfg(4, 10));
        let busy = [get(&pool).await, get(&pool).await];
        drop([get(&pool).await, get(&pool).await]);
        assert_eq!(pool.snapshot().open, 4);
        pool.reconfigure(cfg(1, 10));
        assert_eq!(
            pool.snapshot(),
            PoolSnapshot {
                open: 2,
                idle: 0,
                waiting: 0,
                ..Default::default()
            }
        );
        // No place is given out while over the cap.
        assert!(pool.checkout().await.is_err());
        let [a, b] = busy;
        drop(a);
        assert_eq!(pool.snapshot().open, 1, "returned over the cap: closed");
        drop(b);
        assert_eq!(
            pool.snapshot(),
            PoolSnapshot {
                open: 1,
                idle: 1,
                waiting: 0,
                ..Default::default()
            }
        );
    }

    #[tokio::test]
    async fn raising_the_cap_serves_waiters() {
        let pool = Pool::new(cfg(1, 10));
        let _a = get(&pool).await;
        let p2 = pool.clone();
        let waiter =
            tokio::spawn(async move { matches!(p2.checkout().await, Ok(Acquired::Dial(_))) });
        tokio::task::yield_now().await;
        assert_eq!(pool.snapshot().waiting, 1);
        pool.reconfigure(cfg(2, 10));
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn retired_pool_closes_idle_and_returns() {
        let pool = Pool::new(cfg(2, 10));
        let a = get(&pool).await;
        drop(get(&pool).await);
        pool.retire();
        assert_eq!(pool.snapshot().open, 1);
        drop(a);
        assert_eq!(pool.snapshot().open, 0);
    }

    /// A shared connection (HTTP/2-like): clones are streams on it.
    #[derive(Clone)]
    struct Mux {
        alive: Arc<AtomicBool>,
        limit: Arc<AtomicUsize>,
    }

    impl Reusable for Mux {
        fn is_usable(&self) -> bool {
            self.alive.load(Ordering::Relaxed)
        }
        fn share(&self) -> Option<Self> {
            Some(self.clone())
        }
        fn stream_limit(&self) -> usize {
            self.limit.load(Ordering::Relaxed)
        }
    }

    fn mux(limit: usize) -> Mux {
        Mux {
            alive: Arc::new(AtomicBool::new(true)),
            limit: Arc::new(AtomicUsize::new(limit)),
        }
    }

    fn mcfg(max: usize) -> PoolConfig {
        PoolConfig {
            multiplexed: true,
            ..cfg(max, 100)
        }
    }

    #[tokio::test]
    async fn shared_connection_fills_to_its_limit_before_a_second_opens() {
        let pool = Pool::new(mcfg(2));
        let Ok(Acquired::Dial(slot)) = pool.checkout().await else {
            panic!("first request dials")
        };
        let first = slot.fill(mux(3));
        let mut streams = vec![first];
        for _ in 0..2 {
            match pool.checkout().await {
                Ok(Acquired::Reused(p)) => {
                    assert!(p.is_shared());
                    streams.push(p)
                }
                _ => panic!("a stream on the open connection"),
            }
        }
        let s = pool.snapshot();
        assert_eq!((s.open, s.shared, s.streams), (1, 1, 3));
        // Full: the fourth request gets a slot for a second connection.
        let Ok(Acquired::Dial(slot)) = pool.checkout().await else {
            panic!("second connection only when the first is full")
        };
        streams.push(slot.fill(mux(3)));
        assert_eq!(pool.snapshot().open, 2);
        drop(streams);
        let s = pool.snapshot();
        assert_eq!((s.open, s.shared, s.streams), (2, 2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_waits_for_the_connection_being_opened() {
        let pool = Pool::new(mcfg(4));
        let Ok(Acquired::Dial(slot)) = pool.checkout().await else {
            panic!()
        };
        let mut waiters = Vec::new();
        for _ in 0..5 {
            let p = pool.clone();
            waiters.push(tokio::spawn(async move {
                match p.checkout().await {
                    Ok(Acquired::Reused(s)) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        drop(s);
                        true
                    }
                    _ => false,
                }
            }));
        }
        tokio::task::yield_now().await;
        assert_eq!(
            pool.snapshot().waiting,
            5,
            "nobody dials a second connection"
        );
        assert_eq!(pool.snapshot().open, 1);
        let first = slot.fill(mux(10));
        for w in waiters {
            assert!(
                w.await.unwrap(),
                "each waiter got a stream on the new connection"
            );
        }
        drop(first);
        assert_eq!(pool.snapshot().open, 1);
    }

    #[tokio::test]
    async fn a_freed_stream_goes_to_a_waiter_and_a_dead_connection_frees_its_place() {
        let pool = Pool::new(mcfg(1));
        let Ok(Acquired::Dial(slot)) = pool.checkout().await else {
            panic!()
        };
        let a = slot.fill(mux(1));
        let p2 = pool.clone();
        let waiter = tokio::spawn(async move {
            p2.checkout().await.map(|a| match a {
                Acquired::Reused(p) => p.is_shared(),
                Acquired::Dial(_) => false,
            })
        });
        tokio::task::yield_now().await;
        assert_eq!(pool.snapshot().waiting, 1);
        let alive = a.alive.clone();
        drop(a);
        assert!(
            waiter.await.unwrap().unwrap(),
            "the stream went to the waiter"
        );
        // Dead and carrying nothing: removed at the next checkout, and the
        // place becomes a slot.
        alive.store(false, Ordering::Relaxed);
        assert!(matches!(pool.checkout().await, Ok(Acquired::Dial(_))));
    }

    #[tokio::test]
    async fn a_discarded_stream_drains_its_connection() {
        let pool = Pool::new(mcfg(2));
        let Ok(Acquired::Dial(slot)) = pool.checkout().await else {
            panic!()
        };
        let a = slot.fill(mux(10));
        let Ok(Acquired::Reused(b)) = pool.checkout().await else {
            panic!()
        };
        b.discard(); // e.g. refused by a server going away
        assert!(pool.shared_connections()[0].draining);
        // New requests go to a new connection; the old one closes when its
        // last stream ends.
        let Ok(Acquired::Dial(slot)) = pool.checkout().await else {
            panic!("draining connection takes no new stream")
        };
        let c = slot.fill(mux(10));
        drop(a);
        let s = pool.snapshot();
        assert_eq!((s.open, s.shared), (1, 1));
        drop(c);
    }

    /// Many tasks on several threads; the cap is checked at every moment a
    /// connection exists.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn cap_holds_under_contention() {
        let mut c = cfg(4, 10_000);
        c.queue_timeout = Duration::from_secs(30);
        let pool = Pool::new(c);
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..2000 {
            let (pool, live, peak) = (pool.clone(), live.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                let p = match pool.checkout().await.unwrap() {
                    Acquired::Reused(p) => p,
                    Acquired::Dial(s) => {
                        let n = live.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(n, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        s.fill(Fake::new())
                    }
                };
                tokio::task::yield_now().await;
                if i % 97 == 0 {
                    // Some connections break in use.
                    p.alive.store(false, Ordering::Relaxed);
                    live.fetch_sub(1, Ordering::SeqCst);
                }
                drop(p);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            peak.load(Ordering::SeqCst) <= 4,
            "peak {}",
            peak.load(Ordering::SeqCst)
        );
        assert!(pool.snapshot().open <= 4);
    }
}
