//! The bottom of the connect stack: a TCP connection to the endpoint from
//! the upstream's source-address dialer, with the source counted against
//! its lease for as long as the connection lives.

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::net::TcpStream;

use super::{BoxConnecting, ConnectError, Link, Target};
use crate::upstream::dialer::Dialer;

/// Dials `Target::ep` through the dialer, which bounds the dial by
/// `connect_timeout` itself (raw dials use it without this stack).
#[derive(Clone)]
pub struct Dial(pub Arc<Dialer>);

impl tower::Service<Target> for Dial {
    type Response = Link<TcpStream>;
    type Error = ConnectError;
    type Future = BoxConnecting<Link<TcpStream>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, t: Target) -> Self::Future {
        let dialer = self.0.clone();
        Box::pin(async move {
            match dialer.dial(t.ep.addr).await {
                Ok(d) => Ok(Link {
                    io: d.stream,
                    local: d.local,
                    lease: dialer.lease(d.source),
                }),
                Err(e) => {
                    t.ep.record_connect_error(&e);
                    Err(e.into())
                }
            }
        })
    }
}
