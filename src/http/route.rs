//! Where a request goes when a listener has no single upstream: the seam
//! forward routing plugs into (and interception, which routes as forward
//! does), so that the HTTP exchange names no mode.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{Request, StatusCode};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

use crate::listener::Drain;
use crate::upstream::client::Side;
use crate::upstream::Upstream;

/// A router's future. Boxed: routing state belongs to the router, and
/// inline it would grow every request's future, fixed routes' too.
pub type RouteFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Routes the requests of a listener without a fixed upstream.
pub trait Router: Send + Sync {
    /// The way for `req` (which may carry [`crate::allow::OriginalDst`]),
    /// or why it has none.
    fn route(&self, req: Request<Incoming>) -> RouteFuture<'_, Result<Routed, Refusal>>;

    /// `CONNECT`: checks and dials the target, and starts the tunnel with
    /// [`Tunnels::spawn`], to run once the client has its `200`. Gives the
    /// target as the access log names it.
    fn tunnel<'a>(
        &'a self,
        req: Request<Incoming>,
        tunnels: &'a Tunnels,
    ) -> RouteFuture<'a, Result<String, Refusal>>;

    /// A raw connection to `dst` (an intercepted connection that is not
    /// HTTP), dialed on the way a request to it would take.
    fn open(&self, dst: std::net::SocketAddr) -> RouteFuture<'_, Result<Opened, Refusal>>;
}

/// A raw connection a router dialed.
pub struct Opened {
    pub conn: crate::upstream::RawConn,
    /// As [`Routed::hold`], while the connection is open.
    pub hold: Box<dyn Send + Sync>,
    /// The listener's `half_close_timeout`.
    pub half_close: std::time::Duration,
}

/// One request's way out.
pub struct Routed {
    pub upstream: Arc<Upstream>,
    pub req: Request<Incoming>,
    /// What the router keeps alive while the request is sent (an origin in
    /// use is not evicted).
    pub hold: Box<dyn Send + Sync>,
    /// `Via` goes on the response too.
    pub via: bool,
}

/// A request the router will not send: what the client is told.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub status: StatusCode,
    /// The `x-loopmux-error` word.
    pub kind: &'static str,
    /// Whose fault, for logs.
    pub side: Side,
    /// Who refused, in the answer's text (`forward proxy`).
    pub by: &'static str,
    pub reason: String,
}

/// Where a connection's tunnels run: as part of the listener's drain,
/// and of the client connection, which stays open (and counted against
/// `max_clients`) until they end.
#[derive(Clone)]
pub struct Tunnels {
    drain: Arc<Drain>,
    connection: TaskTracker,
}

impl Tunnels {
    pub(crate) fn new(drain: Arc<Drain>) -> Self {
        Tunnels {
            drain,
            connection: TaskTracker::new(),
        }
    }

    /// Cancelled at the drain's deadline: a tunnel still open is cut.
    pub fn deadline(&self) -> tokio_util::sync::CancellationToken {
        self.drain.deadline.clone()
    }

    pub fn spawn(&self, tunnel: impl Future<Output = ()> + Send + 'static) {
        self.drain.spawn(self.connection.track_future(tunnel));
    }

    /// Waits for every tunnel this connection started.
    pub(crate) async fn wait(&self) {
        self.connection.close();
        self.connection.wait().await;
    }
}
