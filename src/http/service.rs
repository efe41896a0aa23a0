//! The service hyper serves for each client connection, built with tower:
//! the proxy's handler wrapped in layers for what applies to every request
//! (today: the listener's response metrics). No tower queue or concurrency
//! limit sits here: the pool's bounded queue is the only queue, and it is
//! what keeps the cap and the 503 rule.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::service::TowerToHyperService;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder};

use super::proxy::Proxy;
use super::RespBody;

/// Builds the per-connection service: `Record` around the proxy handler.
/// Unboxed all the way, so a request costs no allocation here.
pub fn build(
    proxy: Arc<Proxy>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<RespBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<RespBody>, Infallible>> + Send,
> + Send {
    let handler = {
        let proxy = proxy.clone();
        tower::service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req).await) }
        })
    };
    TowerToHyperService::new(
        ServiceBuilder::new()
            .layer(RecordLayer { proxy })
            .service(handler),
    )
}

/// Counts every response by status class and times it, in the listener's
/// metrics.
pub struct RecordLayer {
    proxy: Arc<Proxy>,
}

impl<S> Layer<S> for RecordLayer {
    type Service = Record<S>;
    fn layer(&self, inner: S) -> Record<S> {
        Record {
            inner,
            proxy: self.proxy.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Record<S> {
    inner: S,
    proxy: Arc<Proxy>,
}

impl<S> Service<Request<Incoming>> for Record<S>
where
    S: Service<Request<Incoming>, Response = Response<RespBody>>,
{
    type Response = Response<RespBody>;
    type Error = S::Error;
    type Future = Recorded<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        Recorded {
            inner: self.inner.call(req),
            started: Instant::now(),
            proxy: self.proxy.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct Recorded<F> {
        #[pin]
        inner: F,
        started: Instant,
        proxy: Arc<Proxy>,
    }
}

impl<F, E> Future for Recorded<F>
where
    F: Future<Output = Result<Response<RespBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let Ok(resp) = &out {
            this.proxy
                .record(resp.status().as_u16(), this.started.elapsed().as_secs_f64());
        }
        Poll::Ready(out)
    }
}
