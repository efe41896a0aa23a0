//! HTTP/2 upstreams: many client connections share a few h2 connections,
//! the server's stream limit decides when a second one opens, GOAWAY moves
//! new requests elsewhere, and HTTP/1 clients notice nothing.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use loopmux::demo::origin::OriginOptions;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn h2_origin(max_streams: Option<u32>) -> Origin {
    Origin::start_with(
        "127.0.0.1:0".parse().unwrap(),
        OriginOptions {
            h2: true,
            max_streams,
            tls: None,
        },
    )
    .await
    .unwrap()
}

/// POSTs `body` to `/echo` on a new connection (Connection: close) and
/// returns the response body.
async fn echo(addr: SocketAddr, body: &[u8]) -> Result<Vec<u8>, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(body).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no head")?;
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head);
    }
    let rest = &out[split + 4..];
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(rest));
    }
    Ok(rest.to_vec())
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_share_two_h2_connections_bodies_intact() {
    let o = h2_origin(Some(100)).await;
    let (app, addr) = start(&one_upstream(
        o.addr,
        "",
        "protocol = \"http2\"\nmax_connections = 2\nqueue_timeout = \"30s\"",
    ))
    .await;
    let mut tasks = Vec::new();
    for i in 0..1000usize {
        tasks.push(tokio::spawn(async move {
            // Every 10th body is larger than request_buffer_bytes: streamed.
            let len = if i % 10 == 0 { 100_000 + i } else { 1_000 + i };
            let body: Vec<u8> = (0..len).map(|k| (k * 31 + i) as u8).collect();
            let got = echo(addr, &body).await;
            (got == Ok(body.clone()), got.err())
        }));
    }
    let mut bad = Vec::new();
    for t in tasks {
        let (ok, err) = t.await.unwrap();
        if !ok {
            bad.push(err);
        }
    }
    assert!(
        bad.is_empty(),
        "{} failed, e.g. {:?}",
        bad.len(),
        bad.first()
    );
    assert!(
        o.stats.accepted.load(Ordering::Relaxed) <= 2,
        "origin saw {} connections",
        o.stats.accepted.load(Ordering::Relaxed)
    );
    assert_eq!(
        o.stats.h2_accepted.load(Ordering::Relaxed),
        o.stats.accepted.load(Ordering::Relaxed)
    );
    assert!(
        o.stats.peak_streams.load(Ordering::Relaxed) > 1,
        "requests were multiplexed"
    );
    let snap = app.upstreams()[0].endpoints()[0].pool.snapshot();
    assert!(snap.open <= 2 && snap.shared == snap.open, "{snap:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_opens_only_when_the_first_is_at_the_server_limit() {
    let o = h2_origin(Some(10)).await;
    let (app, addr) = start(&one_upstream_with_admin(
        o.addr,
        "",
        "protocol = \"http2\"\nmax_connections = 4",
    ))
    .await;
    // The first exchange brings the server's SETTINGS (limit 10).
    let (code, out, err) = curl(&[&format!("http://{addr}/")]).await;
    assert_eq!((code, out.as_str()), (0, "ok\n"), "{err}");
    let slow = |n: usize| {
        (0..n)
            .map(|_| tokio::spawn(curl_owned(format!("http://{addr}/slow/3000"))))
            .collect::<Vec<_>>()
    };
    let first = slow(10);
    let stats = o.stats.clone();
    wait_for("10 slow requests at the origin", || {
        stats.requests.load(Ordering::Relaxed) == 11
    })
    .await;
    assert_eq!(
        o.stats.accepted.load(Ordering::Relaxed),
        1,
        "10 streams fit on the first connection"
    );
    let views = app.upstreams()[0].endpoints()[0].pool.shared_connections();
    assert_eq!(views.len(), 1);
    assert_eq!((views[0].streams, views[0].limit), (10, 10), "{views:?}");

    let eleventh = slow(1);
    wait_for("the 11th request at the origin", || {
        stats.requests.load(Ordering::Relaxed) == 12
    })
    .await;
    assert_eq!(
        o.stats.accepted.load(Ordering::Relaxed),
        2,
        "the 11th stream opened a second connection"
    );
    // /status shows each connection's protocol and stream count.
    let admin = app.admin_addr.unwrap();
    let (_, status, _) = curl(&[&format!("http://{admin}/status")]).await;
    assert!(status.contains("\"protocol\":\"h2\""), "{status}");
    assert!(status.contains("\"streams\":10"), "{status}");
    for t in first.into_iter().chain(eleventh) {
        let (code, out, err) = t.await.unwrap();
        assert_eq!((code, out.as_str()), (0, "slow ok\n"), "{err}");
    }
    let (_, metrics, _) = curl(&[&format!("http://{admin}/metrics")]).await;
    assert!(
        metrics.contains("loopmux_upstream_h2_connections{"),
        "{metrics}"
    );
}

async fn curl_owned(url: String) -> (i32, String, String) {
    curl(&[&url]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_are_translated_to_h2() {
    let o = h2_origin(None).await;
    let (_app, addr) = start(&one_upstream(o.addr, "", "protocol = \"http2\"")).await;
    let (code, out, err) = curl(&[
        "-H",
        "Connection: keep-alive, x-hop",
        "-H",
        "x-hop: 1",
        "-H",
        "x-end: 2",
        &format!("http://{addr}/headers"),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let first = out.lines().next().unwrap();
    assert_eq!(
        first,
        format!("GET http://{addr}/headers HTTP/2.0"),
        "Host became :authority; {out}"
    );
    assert!(!out.contains("\nhost:"), "no Host header over h2: {out}");
    assert!(!out.contains("x-hop"), "hop-by-hop removed: {out}");
    assert!(out.contains("x-end: 2"), "{out}");
    // A large body streamed back both ways.
    let (code, out, err) = curl(&[
        &format!("http://{addr}/bytes/3000000"),
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "3000000"), "{err}");
}

/// An h2 server that says GOAWAY (gracefully) on each connection after
/// `per_conn` requests: every request must still succeed, new ones going
/// to a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_moves_new_requests_to_a_new_connection() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c2 = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            c2.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let served = Arc::new(tokio::sync::Notify::new());
                let count = Arc::new(AtomicUsize::new(0));
                let (sv, cv) = (served.clone(), count.clone());
                let svc = hyper::service::service_fn(move |_req| {
                    if cv.fetch_add(1, Ordering::Relaxed) + 1 == 5 {
                        sv.notify_one();
                    }
                    async {
                        Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"ok\n"),
                        )))
                    }
                });
                let conn =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = served.notified() => {}
                }
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            });
        }
    });
    let (app, addr) = start(&one_upstream(
        origin,
        "",
        "protocol = \"http2\"\nmax_connections = 2",
    ))
    .await;
    for i in 0..40 {
        let (code, out, err) = curl(&[&format!("http://{addr}/")]).await;
        assert_eq!((code, out.as_str()), (0, "ok\n"), "request {i}: {err}");
    }
    // Each connection serves 5, then GOAWAY. hyper's graceful shutdown is
    // two-phase (GOAWAY with the highest stream id, a PING round trip,
    // then the real last stream id), so on a loaded machine a request or
    // two more can land on a connection before the final GOAWAY: 8
    // connections for 40 requests is the unloaded figure, not a promise.
    assert!(
        conns.load(Ordering::Relaxed) >= 5,
        "GOAWAY moved new requests to new connections: {} connections for 40 requests",
        conns.load(Ordering::Relaxed)
    );
    let snap = app.upstreams()[0].endpoints()[0].pool.snapshot();
    assert!(snap.open <= 2, "{snap:?}");
}

/// `connect_timeout` covers the protocol handshake (README): an h2
/// server that accepts and never sends its SETTINGS gets 502 `connect`
/// within it, plain or after TLS with ALPN h2, not 504 after
/// `request_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_server_that_never_sends_settings_is_a_connect_timeout() {
    let ca = support::pki::Ca::new("loopmux test CA");
    let dir = support::pki::Dir::new();
    let ca_file = dir.write("ca.pem", &ca.pem);
    let tls_cfg = support::pki::server_config(&ca.server(&["localhost"], false), None);
    let cases = [
        (
            "h2c",
            raw_upstream::SilentPeer::start(None).await,
            String::new(),
        ),
        (
            "TLS, ALPN h2",
            raw_upstream::SilentPeer::start(Some(tls_cfg)).await,
            format!("tls = {{ ca_file = \"{ca_file}\", server_name = \"localhost\" }}"),
        ),
    ];
    for (name, peer, tls) in &cases {
        let (app, addr) = start(&one_upstream(
            peer.addr,
            "",
            &format!(
                "protocol = \"http2\"\nconnect_timeout = \"300ms\"\nrequest_timeout = \"10s\"\n{tls}"
            ),
        ))
        .await;
        let begun = std::time::Instant::now();
        let seen = raw_upstream::exchange(
            addr,
            b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
            Duration::from_secs(15),
        )
        .await;
        let waited = begun.elapsed();
        assert_eq!(seen.status, 502, "{name}: {}", seen.head);
        assert_eq!(
            seen.header("x-loopmux-error").as_deref(),
            Some("connect"),
            "{name}: {}",
            seen.head
        );
        let body = String::from_utf8_lossy(&seen.body);
        assert!(
            body.contains("SETTINGS") && body.contains("300ms"),
            "{name}: {body}"
        );
        // Far below request_timeout (10 s); generous for a loaded machine.
        assert!(
            waited < Duration::from_secs(5),
            "{name}: answered after {waited:?}"
        );
        assert_eq!(peer.accepted.load(Ordering::SeqCst), 1, "{name}");
        app.stop(Duration::from_secs(1)).await;
    }
}

/// DESIGN invariant 11 (a window that never opens): an h2 upstream whose
/// flow-control window stays 0 takes no byte of a streamed upload, and
/// after `body_timeout` the client gets 504 `upstream-stall`, not silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_window_that_never_opens_is_an_upstream_stall() {
    let peer = raw_upstream::ZeroWindowH2::start().await;
    let (_app, addr) = start(&one_upstream(
        peer.addr,
        "",
        "protocol = \"http2\"\nbody_timeout = \"1s\"\nrequest_timeout = \"10s\"\nconnect_timeout = \"2s\"",
    ))
    .await;
    // 1 MiB: over request_buffer_bytes (64 KiB), so it streams.
    let len = 1 << 20;
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let head = format!("POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\n\r\n");
        let _ = wr.write_all(head.as_bytes()).await;
        // Blocks once loopmux stops reading: the upload cannot move.
        let _ = wr.write_all(&vec![b'x'; len]).await;
        wr
    });
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(15), async {
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    writer.abort();
    let head = String::from_utf8_lossy(&out).into_owned();
    assert!(read.is_ok(), "no response within 15 s: {head:?}");
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert_eq!(
        raw_upstream::header(&head, "x-loopmux-error").as_deref(),
        Some("upstream-stall"),
        "{head}"
    );
    assert_eq!(
        peer.streams.load(Ordering::SeqCst),
        1,
        "the request reached the peer"
    );
}

/// The other side of the rule above: an upload whose client pauses
/// longer than the upstream's `body_timeout` is not the upstream's stall
/// (the listener's `body_timeout` times the client). The origin answers
/// once it has read the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_upload_over_h2_is_not_an_upstream_stall() {
    let o = h2_origin(None).await;
    let (_app, addr) = start(&one_upstream(
        o.addr,
        "",
        "protocol = \"http2\"\nbody_timeout = \"1s\"",
    ))
    .await;
    let body = vec![b'x'; 200_000];
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // Over request_buffer_bytes at once (so it streams), then two pauses
    // of 1.5 s, each longer than the upstream's body_timeout.
    for part in [&body[..100_000], &body[100_000..150_000], &body[150_000..]] {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if let Err(e) = s.write_all(part).await {
            let seen = raw_upstream::read_response(&mut s, Duration::from_secs(1)).await;
            panic!("the upload was cut ({e}): {}", seen.head);
        }
    }
    let seen = raw_upstream::read_response(&mut s, Duration::from_secs(10)).await;
    assert_eq!(seen.status, 200, "{}", seen.head);
    assert_eq!(seen.body, b"ok\n");
}
