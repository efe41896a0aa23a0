//! Tunnel throughput (`cargo bench --bench tunnel`): bytes pushed into a
//! sink directly on loopback, and through loopmux's `tunnel` listener and
//! its serve role (HTTP/2 CONNECT over TLS with mTLS, both in this
//! process), one stream and 16 parallel ones. Prints a table; timing is
//! this bench's business, never a test's. Under `cargo test` it runs with
//! 16 MiB so it cannot rot.

#[path = "../tests/support/pki.rs"]
#[allow(dead_code)]
mod pki;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads until EOF, then answers with the byte count (8 bytes) and closes:
/// the sender's clock stops when every byte has arrived.
async fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    addr
}

/// Pushes `bytes` to `to` and waits for the sink's count.
async fn push(to: SocketAddr, bytes: u64) -> u64 {
    let mut s = TcpStream::connect(to).await.unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..k]).await.unwrap();
        left -= k as u64;
    }
    s.shutdown().await.unwrap();
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await.unwrap();
    u64::from_be_bytes(n)
}

/// GiB/s for `streams` parallel streams carrying `total` bytes to `to`.
async fn rate(to: SocketAddr, total: u64, streams: u64) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| tokio::spawn(push(to, total / streams)))
        .collect();
    let mut got = 0;
    for t in tasks {
        got += t.await.unwrap();
    }
    assert_eq!(got, total / streams * streams, "bytes lost");
    got as f64 / started.elapsed().as_secs_f64() / (1u64 << 30) as f64
}

async fn start(toml: &str) -> (loopmux::app::App, SocketAddr) {
    let cfg = loopmux::config::load_str(toml, Default::default()).unwrap();
    let bound = loopmux::app::bind_all(&cfg).unwrap();
    let app = loopmux::app::App::start(cfg, bound).await.unwrap();
    let addr = app.local_addrs()[0];
    (app, addr)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let total: u64 = if full { 1 << 30 } else { 16 << 20 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sink = sink().await;
        let dir = pki::Dir::new();
        let ca = pki::Ca::new("bench CA");
        let server = ca.server(&["localhost"], false);
        let client = ca.client("bench client");
        let ca_file = dir.write("ca.pem", &ca.pem);
        let (serve, far) = start(&format!(
            "[serve]\nbind = \"127.0.0.1:0\"\nallow = [\"{sink}\"]\n\
             tls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{ca_file}\" }}\n",
            dir.write("s.pem", &server.cert_pem),
            dir.write("s.key", &server.key_pem),
        ))
        .await;
        let (tunnel, near) = start(&format!(
            "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tunnel\"\nupstream = \"far\"\ntarget = \"{sink}\"\n\n\
             [[upstream]]\nname = \"far\"\nendpoints = [\"{far}\"]\nprotocol = \"http2\"\nmax_connections = 1\n\
             tls = {{ ca_file = \"{ca_file}\", server_name = \"localhost\", client_cert = \"{}\", client_key = \"{}\" }}\n",
            dir.write("c.pem", &client.cert_pem),
            dir.write("c.key", &client.key_pem),
        ))
        .await;
        // Warm up: the TLS connection, allocator, page cache.
        let _ = rate(near, 16 << 20, 1).await;
        let _ = rate(sink, 16 << 20, 1).await;

        println!(
            "tunnel throughput, {} MiB per row (loopback, one process; TLS 1.3 + HTTP/2, one connection):",
            total >> 20
        );
        println!("| streams | direct GiB/s | tunnel GiB/s | tunnel / direct |");
        println!("|---|---|---|---|");
        for streams in [1u64, 16] {
            // Interleaved, best of three each: the machine is shared.
            let (mut d, mut t) = (0f64, 0f64);
            for _ in 0..3 {
                d = d.max(rate(sink, total, streams).await);
                t = t.max(rate(near, total, streams).await);
            }
            println!("| {streams} | {d:.2} | {t:.2} | {:.2} |", t / d);
        }
        tunnel.stop(Duration::from_secs(2)).await;
        serve.stop(Duration::from_secs(2)).await;
    });
}
