//! Forward routing as the HTTP exchange's [`Router`]: the origin each
//! request names (or an intercepted connection's destination), and
//! `CONNECT` tunnels run as part of the client connection.

use http::Request;
use hyper::body::Incoming;

use super::{Forward, ForwardError};
use crate::allow::target::Target;
use crate::allow::{Host, OriginalDst};
use crate::http::route::{Opened, Refusal, RouteFuture, Routed, Router, Tunnels};
use crate::upstream::client::Side;
use crate::upstream::RawDialError;

impl ForwardError {
    /// No raw connection to `target` could be made.
    pub(super) fn of_dial(target: &Target, e: RawDialError) -> Self {
        match e {
            RawDialError::Dial(source) => ForwardError::Connect {
                target: target.to_string(),
                source,
            },
            RawDialError::NoEndpoint => ForwardError::Unresolved {
                target: target.to_string(),
                reason: "resolves to no address".into(),
            },
        }
    }
}

impl From<ForwardError> for Refusal {
    fn from(e: ForwardError) -> Self {
        let side = match e {
            ForwardError::Connect { .. } | ForwardError::Unresolved { .. } => Side::Upstream,
            ForwardError::OriginsFull { .. } => Side::Loopmux,
            _ => Side::Client,
        };
        Refusal {
            status: e.status(),
            kind: e.kind(),
            side,
            by: "forward proxy",
            reason: e.to_string(),
        }
    }
}

impl Router for Forward {
    fn route(&self, req: Request<Incoming>) -> RouteFuture<'_, Result<Routed, Refusal>> {
        Box::pin(async move {
            let route = if let Some(&OriginalDst(dst)) = req.extensions().get() {
                let target = Target {
                    host: Host::Ip(dst.ip()),
                    port: dst.port(),
                    tls: false,
                };
                (self.route_to(target).await?, req)
            } else {
                let (mut parts, body) = req.into_parts();
                (
                    self.route(&mut parts).await?,
                    Request::from_parts(parts, body),
                )
            };
            let (route, req) = route;
            Ok(Routed {
                upstream: route.upstream,
                req,
                hold: Box::new(route.guard),
                via: route.via,
            })
        })
    }

    fn tunnel<'a>(
        &'a self,
        mut req: Request<Incoming>,
        tunnels: &'a Tunnels,
    ) -> RouteFuture<'a, Result<String, Refusal>> {
        Box::pin(async move {
            let on_upgrade = hyper::upgrade::on(&mut req);
            let t = self.connect(req.uri(), on_upgrade).await?;
            let target = t.target.clone();
            let (cut, stats) = (tunnels.deadline(), self.stats.tunnels.clone());
            tunnels.spawn(async move { super::tunnel::run(t, cut, &stats).await });
            Ok(target)
        })
    }

    fn open(&self, dst: std::net::SocketAddr) -> RouteFuture<'_, Result<Opened, Refusal>> {
        Box::pin(async move {
            let target = Target {
                host: Host::Ip(crate::allow::canonical(dst.ip())),
                port: dst.port(),
                tls: false,
            };
            let route = self.route_to(target.clone()).await?;
            let conn = route
                .upstream
                .dial_raw()
                .await
                .map_err(|e| ForwardError::of_dial(&target, e))?;
            Ok(Opened {
                conn,
                hold: Box::new(route.guard),
                half_close: self.half_close(),
            })
        })
    }
}
