//! A client connection's first bytes, read before hyper's connection
//! exists. hyper reserves its 8 KiB read buffer (and the rest of its
//! connection state) on its first read, so a client that connects and
//! stays silent would hold all of that for as long as it stays; until its
//! first byte it holds only this wait. The bytes read here are handed to
//! hyper first ([`Prefixed`], the net layer's): the same one read syscall hyper would have
//! made, no peek.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;

use crate::listener::Drain;
pub use crate::prefixed::Prefixed;

/// Room for a whole request head of a typical legacy client in one read;
/// a longer head is read on by hyper.
const FIRST_READ: usize = 4096;

/// What the client sent first, and how long it took.
pub struct First {
    pub bytes: Bytes,
    pub waited: Duration,
}

/// Waits for the client's first bytes. `None`: it closed or failed first,
/// sent nothing within `timeout`, or the listener's drain began; the
/// connection then closes.
pub async fn read(stream: &TcpStream, drain: &Drain, timeout: Duration) -> Option<First> {
    let start = tokio::time::Instant::now();
    let wait = async {
        loop {
            // tokio treats a new socket as ready, so an idle client costs
            // one read that would block, then a real wait.
            stream.readable().await.ok()?;
            let mut buf = BytesMut::with_capacity(FIRST_READ);
            match stream.try_read_buf(&mut buf) {
                Ok(0) => return None,
                Ok(_) => return Some(buf.freeze()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return None,
            }
        }
    };
    tokio::select! {
        biased;
        r = wait => r.map(|bytes| First { bytes, waited: start.elapsed() }),
        _ = drain.begun.cancelled() => None,
        _ = tokio::time::sleep(timeout) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_head_comes_first_then_the_stream_in_order() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut p = Prefixed::new(Bytes::from_static(b"GET / HT"), a);
        b.write_all(b"TP/1.1\r\n\r\n").await.unwrap();
        drop(b);
        // A small buffer: the head is handed out across reads too.
        let mut out = Vec::new();
        let mut buf = [0u8; 3];
        loop {
            let n = p.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
    }
}
