//! The `tcp` mode: one upstream connection per client connection through
//! the dialer, bytes relayed exactly with half-close and backpressure,
//! connect failures closed or reset, idle connections closed, a drain that
//! gives raw connections its time and then cuts them. Loopback only.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::raw_upstream::metric;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

fn config(endpoints: &str, listener_extra: &str, upstream_extra: &str) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"u\"\n{listener_extra}\n\n[[upstream]]\nname = \"u\"\nendpoints = [{endpoints}]\n{upstream_extra}\n"
    )
}

async fn read_all(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    match tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await {
        Ok(r) => r.map(|_| out),
        Err(_) => panic!("no end of stream within {WAIT:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_are_relayed_exactly_with_half_close() {
    let echo = echo_after_eof().await;
    let (app, p) = start(&config(&format!("\"{echo}\""), "", "")).await;
    let admin = app.admin_addr.unwrap();
    let mut s = TcpStream::connect(p).await.unwrap();
    let data: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i * 13 % 256) as u8).collect();
    s.write_all(&data).await.unwrap();
    // Our FIN reaches the echo server through loopmux; only then does it
    // answer, on the direction that is still open.
    s.shutdown().await.unwrap();
    let back = read_all(&mut s).await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "relayed bytes differ");
    let mut up = 0.0;
    for _ in 0..50 {
        up = metric(
            admin,
            "loopmux_tcp_bytes_total",
            &[("listener", "t"), ("direction", "upstream")],
        )
        .await;
        if up > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(up, data.len() as f64);
    let down = metric(
        admin,
        "loopmux_tcp_bytes_total",
        &[("listener", "t"), ("direction", "client")],
    )
    .await;
    assert_eq!(down, data.len() as f64);
    assert_eq!(
        metric(admin, "loopmux_tcp_connections_total", &[("listener", "t")]).await,
        1.0
    );
}

/// The upstream writes 64 MiB as fast as it can; the client reads nothing
/// for a while. What loopmux holds is bounded by socket buffers and one
/// copy buffer: the upstream's writes stop long before 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_holds_the_upstream_back() {
    const TOTAL: u64 = 64 << 20;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = l.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let chunk = vec![7u8; 64 * 1024];
        while w.load(Ordering::Relaxed) < TOTAL {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
            w.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = s.shutdown().await;
    });
    let (_app, p) = start(&config(&format!("\"{up_addr}\""), "", "")).await;
    let mut s = TcpStream::connect(p).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = written.load(Ordering::Relaxed);
    assert!(
        held < 40 << 20,
        "the upstream wrote {held} bytes to a client that read none"
    );
    // Then everything arrives.
    let mut got = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, TOTAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_close_or_reset_the_client_and_failover_works() {
    let (_guard, refusing) = refusing_addr();
    // Close: the client reads a clean EOF.
    let (app, p) = start(&config(&format!("\"{refusing}\""), "", "")).await;
    assert_eq!(connect_and_read_to_end(p, WAIT).await.unwrap(), b"");
    assert_eq!(
        metric(
            app.admin_addr.unwrap(),
            "loopmux_tcp_connect_failures_total",
            &[("listener", "t")]
        )
        .await,
        1.0
    );
    // Reset: the client's read fails.
    let (_app2, p2) = start(&config(
        &format!("\"{refusing}\""),
        "on_connect_error = \"reset\"",
        "",
    ))
    .await;
    let e = connect_and_read_to_end(p2, WAIT).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    // Failover: a refusing endpoint, then a good one.
    let echo = echo_after_eof().await;
    let (_app3, p3) = start(&config(&format!("\"{refusing}\", \"{echo}\""), "", "")).await;
    for _ in 0..4 {
        let mut s = TcpStream::connect(p3).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_all(&mut s).await.unwrap(), b"hello");
    }
}

/// A client that speaks first (its bytes unread when the upstream cannot
/// be reached) reads a clean EOF under `on_connect_error = "close"`: a
/// close with unread bytes would be an RST. The endpoint's accept queue is
/// full, so loopmux's connect waits for `connect_timeout` and the client's
/// bytes are surely in by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_that_spoke_first_reads_eof_not_a_reset() {
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    full.listen(0).unwrap();
    let full_addr = full.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    for _ in 0..3 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(full_addr)).await
        {
            fill.push(s);
        }
    }
    let (app, p) = start(&config(
        &format!("\"{full_addr}\""),
        "",
        "connect_timeout = \"300ms\"",
    ))
    .await;
    for i in 0..3 {
        let mut s = TcpStream::connect(p).await.unwrap();
        s.write_all(b"EHLO client.example\r\n").await.unwrap();
        let got = read_all(&mut s).await;
        assert_eq!(got.map_err(|e| e.kind()), Ok(Vec::new()), "client {i}");
    }
    assert_eq!(
        metric(
            app.admin_addr.unwrap(),
            "loopmux_tcp_connect_failures_total",
            &[("listener", "t")]
        )
        .await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_leave_from_every_source_address() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = l.local_addr().unwrap();
    let peers = Arc::new(std::sync::Mutex::new(Vec::<SocketAddr>::new()));
    let seen = peers.clone();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            seen.lock().unwrap().push(peer);
            tokio::spawn(async move {
                let _ = s.write_all(b"hi").await;
            });
        }
    });
    let (_app, p) = start(&config(
        &format!("\"{up_addr}\""),
        "",
        "source_addresses = [\"127.0.0.2\", \"127.0.0.3\"]",
    ))
    .await;
    for _ in 0..6 {
        let mut s = TcpStream::connect(p).await.unwrap();
        assert_eq!(read_all(&mut s).await.unwrap(), b"hi");
    }
    let ips: std::collections::BTreeSet<String> = peers
        .lock()
        .unwrap()
        .iter()
        .map(|a| a.ip().to_string())
        .collect();
    assert_eq!(
        ips.into_iter().collect::<Vec<_>>(),
        ["127.0.0.2", "127.0.0.3"],
        "round-robin over the source addresses"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_the_drain_cuts_what_is_left() {
    let echo = echo_after_eof().await;
    let (app, p) = start(&config(
        &format!("\"{echo}\""),
        "idle_timeout = \"300ms\"",
        "",
    ))
    .await;
    let admin = app.admin_addr.unwrap();
    // Silent: closed after idle_timeout (the echo server would wait).
    let mut idle = TcpStream::connect(p).await.unwrap();
    assert_eq!(read_all(&mut idle).await.unwrap(), b"");
    assert_eq!(
        metric(
            admin,
            "loopmux_tcp_closed_by_loopmux_total",
            &[("listener", "t")]
        )
        .await,
        1.0
    );
    // Busy: a byte every 100 ms for 1 s outlives three idle timeouts.
    let mut busy = TcpStream::connect(p).await.unwrap();
    for _ in 0..10 {
        busy.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    busy.shutdown().await.unwrap();
    assert_eq!(read_all(&mut busy).await.unwrap(), b"xxxxxxxxxx");

    // A drain: an open, active connection gets the drain time, then is cut.
    let (app2, p2) = start(&config(&format!("\"{echo}\""), "", "")).await;
    let mut open = TcpStream::connect(p2).await.unwrap();
    open.write_all(b"partial").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let clean = app2.stop(Duration::from_millis(300)).await;
    assert!(
        !clean,
        "a relay still open at the deadline makes the drain unclean"
    );
    assert_eq!(read_all(&mut open).await.unwrap_or_default(), b"");
    drop(app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_nothing_open_is_clean_and_a_finished_relay_does_not_count() {
    let echo = echo_after_eof().await;
    let (app, p) = start(&config(&format!("\"{echo}\""), "", "")).await;
    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(b"done").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_all(&mut s).await.unwrap(), b"done");
    assert!(app.stop(Duration::from_secs(2)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_points_new_connections_at_the_new_upstream() {
    let a = echo_after_eof().await;
    let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_addr = b.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = b.accept().await {
            let _ = s.write_all(b"from b").await;
        }
    });
    let cfg = |ep: SocketAddr| {
        loopmux::config::load_str(&config(&format!("\"{ep}\""), "", ""), Default::default())
            .unwrap()
    };
    let first = cfg(a);
    let bound = loopmux::app::bind_all(&first).unwrap();
    let mut app = loopmux::app::App::start(first, bound).await.unwrap();
    let p = app.local_addrs()[0];
    // Open across the reload: stays on the old upstream.
    let mut old = TcpStream::connect(p).await.unwrap();
    old.write_all(b"old").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.reload(cfg(b_addr)).await.unwrap();
    old.shutdown().await.unwrap();
    assert_eq!(read_all(&mut old).await.unwrap(), b"old");
    let mut new = TcpStream::connect(p).await.unwrap();
    assert_eq!(read_all(&mut new).await.unwrap(), b"from b");
}

#[test]
fn tcp_config_mistakes_are_named() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "client_keepalive = false",
            "",
            "listener[0].client_keepalive: only applies to HTTP listeners",
        ),
        (
            "on_connect_error = \"drop\"",
            "",
            "listener[0].on_connect_error: `drop` is not one of close, reset",
        ),
        (
            "idle_timeout = \"0s\"",
            "",
            "listener[0].idle_timeout: must be greater than zero",
        ),
        (
            "",
            "protocol = \"http2\"",
            "a tcp listener carries raw bytes",
        ),
    ];
    for (l, u, want) in cases {
        let e = loopmux::config::load_str(&config("\"127.0.0.1:1\"", l, u), Default::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(want), "{want}: {e}");
    }
    let http_with_tcp_key = "[[listener]]\nname = \"h\"\nbind = \"127.0.0.1:0\"\nupstream = \"u\"\nidle_timeout = \"5s\"\n\n[[upstream]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n";
    let e = loopmux::config::load_str(http_with_tcp_key, Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("listener[0].idle_timeout: only applies to mode = \"tcp\""),
        "{e}"
    );
}
