//! An HTTP/1.1 upstream connection: dialed by the [`Dialer`], handshaken
//! with hyper's low-level client, driven by its own task.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::dialer::{DialError, Dialer};
use super::pool::{Pooled, Reusable, Slot};
use super::Endpoint;

pub use crate::http::body::ReqBody;
use crate::stall::StallIo;

pub struct H1Conn {
    pub send: SendRequest<ReqBody>,
    pub local: SocketAddr,
}

impl Reusable for H1Conn {
    fn is_usable(&self) -> bool {
        // The driver task ends (and closes the sender) when the peer closes
        // an idle connection or sends bytes nobody asked for.
        !self.send.is_closed()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("HTTP/1 handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

/// Dials `ep` into `slot`. The returned connection is checked out.
///
/// # Errors
/// The dial error (with destination, source and errno) or the handshake
/// error. The slot is released either way.
pub async fn open(
    ep: &Endpoint,
    dialer: &Arc<Dialer>,
    slot: Slot<H1Conn>,
    body_timeout: std::time::Duration,
) -> Result<Pooled<H1Conn>, ConnectError> {
    let dialed = match dialer.dial(ep.addr).await {
        Ok(d) => d,
        Err(e) => {
            ep.record_connect_error(&e);
            return Err(e.into());
        }
    };
    ep.connects
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let lease = dialer.lease(dialed.source);
    let local = dialed.local;
    let (send, conn) = hyper::client::conn::http1::Builder::new()
        // An upstream that stops taking our request bytes fails the write
        // after `body_timeout` instead of holding the connection forever.
        .handshake(TokioIo::new(StallIo::new(dialed.stream, body_timeout)))
        .await
        .map_err(|source| ConnectError::Handshake {
            addr: ep.addr,
            source,
        })?;
    let weak = ep.pool.downgrade();
    let id = slot.id();
    let addr = ep.addr;
    tokio::spawn(async move {
        let _lease = lease;
        if let Err(e) = conn.await {
            tracing::debug!(endpoint = %addr, local = %local, error = %e, "upstream connection ended with an error");
        }
        weak.evict(id);
    });
    Ok(slot.fill(H1Conn { send, local }))
}
