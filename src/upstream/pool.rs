//! A bounded pool of long-lived connections to one upstream endpoint.
//!
//! The hard rule (DESIGN invariant 1): open + opening connections never
//! exceed `max_connections`, counted once for the whole process. A caller
//! gets an idle connection (most recently used first), or a [`Slot`] that
//! allows exactly one dial, or waits in a bounded FIFO queue. Nothing else
//! can create a connection, so the cap cannot be bypassed.
//!
//! The pool is generic over the connection type so that it can carry HTTP/1
//! senders today and shared HTTP/2 handles later, and so that its logic can
//! be benchmarked without sockets.

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
    /// the peer, protocol error). Must be cheap and must not block.
    fn is_usable(&self) -> bool;
}

#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    pub max_connections: usize,
    pub max_pending: usize,
    pub queue_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
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

/// A point-in-time view, for `/status` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSnapshot {
    /// Open + opening.
    pub open: usize,
    pub idle: usize,
    pub waiting: usize,
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

/// Handed to a waiter: a connection, or the right to dial one.
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
    open: usize,
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

/// A checked-out connection. Dropping it returns it to the pool (or closes
/// it if it is no longer usable, too old, or the pool is retired).
pub struct Pooled<T: Reusable> {
    inner: Arc<Inner<T>>,
    entry: Option<Entry<T>>,
    reused: bool,
    discard: bool,
}

/// What [`Pool::checkout`] gives.
pub enum Acquired<T: Reusable> {
    /// An idle connection that carried requests before.
    Reused(Pooled<T>),
    /// Dial a new connection and [`Slot::fill`] it.
    Dial(Slot<T>),
}

impl<T: Reusable> State<T> {
    fn expired(&self, e: &Entry<T>, now: Instant) -> bool {
        now.duration_since(e.created) >= self.cfg.max_lifetime
    }

    fn is_stale(&self, idle: &Idle<T>, now: Instant) -> bool {
        now.duration_since(idle.since) >= self.cfg.idle_timeout
            || self.expired(&idle.entry, now)
            || !idle.entry.conn.is_usable()
    }
}

impl<T: Reusable> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock would be a bug in this module;
        // the state is still consistent counters, so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives a freed place (a slot) to the first live waiter, or forgets it.
    /// Called with the lock held; sending never runs user code. After a
    /// reload lowered the cap, places are forgotten until `open` is below it.
    fn release_slot(self: &Arc<Self>, st: &mut State<T>) {
        st.open -= 1;
        if st.open >= st.cfg.max_connections {
            return;
        }
        while let Some(tx) = st.waiters.pop_front() {
            st.open += 1;
            st.next_id += 1;
            let slot = Slot {
                inner: Some(self.clone()),
                id: st.next_id,
            };
            match tx.send(Grant::Slot(slot)) {
                Ok(()) => return,
                Err(Grant::Slot(mut s)) => {
                    // Waiter gave up; disarm so its drop does not re-enter.
                    s.inner = None;
                    st.open -= 1;
                }
                Err(Grant::Conn(_)) => unreachable!("sent a slot"),
            }
        }
    }

    /// Returns a usable connection: to the first live waiter, else to idle.
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
                    open: 0,
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
        }
    }

    /// An idle connection, a slot to dial, or a place in the queue.
    ///
    /// # Errors
    /// [`PoolError`] when the queue is full or the wait timed out; no socket
    /// is opened in either case. Cancel-safe: a grant that arrives after the
    /// caller gave up goes back to the pool when the receiver drops.
    pub async fn checkout(&self) -> Result<Acquired<T>, PoolError> {
        self.checkout_inner(false).await
    }

    /// Like [`checkout`](Self::checkout), but never hands out an idle
    /// connection that has been sitting in the pool: for the one retry after
    /// a reused connection turned out to be closed. At the cap, an idle
    /// connection is closed to make room.
    pub async fn checkout_fresh(&self) -> Result<Acquired<T>, PoolError> {
        self.checkout_inner(true).await
    }

    async fn checkout_inner(&self, fresh: bool) -> Result<Acquired<T>, PoolError> {
        let inner = &self.inner;
        let (rx, queue_timeout) = {
            let now = Instant::now();
            let mut st = inner.lock();
            let mut doomed = Vec::new();
            if !fresh {
                while let Some(idle) = st.idle.pop() {
                    if st.is_stale(&idle, now) {
                        doomed.push(idle);
                        continue;
                    }
                    drop(st);
                    drop(doomed);
                    return Ok(Acquired::Reused(Pooled {
                        inner: inner.clone(),
                        entry: Some(idle.entry),
                        reused: true,
                        discard: false,
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
            if st.open < st.cfg.max_connections {
                st.open += 1;
                st.next_id += 1;
                let id = st.next_id;
                // Places freed beyond ours go to waiters.
                while st.open < st.cfg.max_connections && !st.waiters.is_empty() {
                    st.open += 1;
                    inner.release_slot(&mut st);
                }
                drop(st);
                drop(doomed);
                return Ok(Acquired::Dial(Slot {
                    inner: Some(inner.clone()),
                    id,
                }));
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
            let queue_timeout = st.cfg.queue_timeout;
            drop(st);
            drop(doomed);
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
        let doomed: Vec<Idle<T>> = {
            let mut st = inner.lock();
            st.cfg = cfg;
            let mut doomed = Vec::new();
            while st.open > st.cfg.max_connections && !st.idle.is_empty() {
                doomed.push(st.idle.remove(0));
                st.open -= 1;
            }
            while st.open < st.cfg.max_connections && !st.waiters.is_empty() {
                st.open += 1;
                inner.release_slot(&mut st);
            }
            doomed
        };
        drop(doomed);
    }

    /// Closes idle connections past `idle_timeout` or `max_lifetime`, or
    /// closed by the peer. Returns how many were closed.
    pub fn reap(&self) -> usize {
        let now = Instant::now();
        let inner = &self.inner;
        let doomed: Vec<Idle<T>> = {
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
            for _ in 0..doomed.len() {
                inner.release_slot(&mut st);
            }
            doomed
        };
        doomed.len()
    }

    /// Stops keeping connections: idle ones close now, in-use ones close when
    /// returned (after any waiter is served). For endpoints that vanished
    /// from DNS.
    pub fn retire(&self) {
        let doomed: Vec<Idle<T>> = {
            let mut st = self.inner.lock();
            st.retired = true;
            let doomed: Vec<_> = st.idle.drain(..).collect();
            st.open -= doomed.len();
            doomed
        };
        drop(doomed);
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
    /// Drops connection `id` from the idle list if it is there: called by a
    /// connection's driver task when the connection ends, so a dead idle
    /// connection frees its place at once.
    pub fn evict(&self, id: u64) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        let doomed = {
            let mut st = inner.lock();
            let Some(pos) = st.idle.iter().position(|i| i.entry.id == id) else {
                return;
            };
            let doomed = st.idle.remove(pos);
            inner.release_slot(&mut st);
            doomed
        };
        drop(doomed);
    }
}

impl<T: Reusable> Slot<T> {
    /// The id the connection will have; give it to the driver task for
    /// [`WeakPool::evict`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Turns the slot into a checked-out connection.
    pub fn fill(mut self, conn: T) -> Pooled<T> {
        let inner = self.inner.take().expect("a slot is filled once");
        Pooled {
            inner,
            entry: Some(Entry {
                id: self.id,
                created: Instant::now(),
                conn,
            }),
            reused: false,
            discard: false,
        }
    }
}

impl<T: Reusable> Drop for Slot<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            let mut st = inner.lock();
            inner.release_slot(&mut st);
        }
    }
}

impl<T: Reusable> Pooled<T> {
    /// Whether this connection carried a request before this checkout. Only
    /// failures on reused connections are retried (the peer may have closed
    /// an idle connection; a fresh one failing means the upstream is down).
    pub fn is_reused(&self) -> bool {
        self.reused
    }

    pub fn id(&self) -> u64 {
        self.entry.as_ref().map_or(0, |e| e.id)
    }

    /// Close instead of returning to the pool.
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
        let usable = !self.discard && entry.conn.is_usable();
        let inner = &self.inner;
        let _closed = {
            let mut st = inner.lock();
            if usable && !st.expired(&entry, Instant::now()) {
                let back = inner.put_back(&mut st, entry);
                if back.is_some() {
                    inner.release_slot(&mut st);
                }
                back
            } else {
                inner.release_slot(&mut st);
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
                waiting: 0
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
                waiting: 0
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
