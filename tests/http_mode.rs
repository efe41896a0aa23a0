//! `http` mode against a real origin and real clients (curl, raw sockets).

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;

#[tokio::test]
async fn forwards_and_strips_hop_by_hop_headers() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "")).await;
    let url = format!("http://{addr}/headers");
    let (code, out, err) = curl(&[
        &url,
        "-H",
        "Connection: keep-alive, X-Hop",
        "-H",
        "X-Hop: secret",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "Proxy-Authorization: Basic eA==",
        "-H",
        "TE: trailers",
        "-H",
        "X-End-To-End: kept",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let lower = out.to_ascii_lowercase();
    assert!(lower.starts_with("get /headers http/1.1"), "{out}");
    assert!(lower.contains("x-end-to-end: kept"), "{out}");
    assert!(lower.contains(&format!("host: {addr}")), "Host kept: {out}");
    for gone in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "te:",
        "connection",
    ] {
        assert!(!lower.contains(gone), "{gone} was forwarded: {out}");
    }
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn fixed_host_header_replaces_clients() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "host_header = \"api.internal\"")).await;
    let (_, out, _) = curl(&[&format!("http://{addr}/headers")]).await;
    assert!(
        out.to_ascii_lowercase().contains("host: api.internal"),
        "{out}"
    );
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn http10_without_host_gets_endpoint_host_and_is_closed_by_loopmux() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "")).await;
    let out = closed_by_loopmux(addr, b"GET /headers HTTP/1.0\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains(&format!("host: {}", o.addr)),
        "{out}"
    );
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn client_keepalive_false_answers_connection_close_and_closes_first() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "client_keepalive = false", "")).await;
    // A keep-alive request: loopmux must still say close, and close.
    let out = closed_by_loopmux(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    assert!(out.ends_with("ok\n"), "response complete before EOF: {out}");
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn client_connection_close_is_honoured_and_keepalive_is_default() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "")).await;
    let out = closed_by_loopmux(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("ok\n"),
        "{out}"
    );
    // Two requests on one connection: keep-alive works by default.
    let out = closed_by_loopmux(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn streams_bodies_both_ways_exactly() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "")).await;
    let dir = std::env::temp_dir().join(format!("loopmux-body-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("in.bin");
    // 3 MiB of non-repeating bytes, so a dropped or reordered chunk shows.
    let data: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    let url = format!("http://{addr}/echo");
    let at_file = format!("@{}", file.display());
    let out_file = dir.join("out.bin");
    let out_s = out_file.display().to_string();
    // Content-Length upload.
    let (code, _, err) = curl(&["--data-binary", &at_file, "-o", &out_s, &url]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        std::fs::read(&out_file).unwrap() == data,
        "content-length body changed in transit"
    );
    // Chunked upload.
    let (code, _, err) = curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &at_file,
        "-o",
        &out_s,
        &url,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        std::fs::read(&out_file).unwrap() == data,
        "chunked body changed in transit"
    );
    // Chunked download of a large streamed body.
    let (code, out, err) = curl(&[
        "-w",
        "%{size_download}",
        "-o",
        "/dev/null",
        &format!("http://{addr}/bytes/5000000"),
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "5000000"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn expect_100_continue_is_answered() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "")).await;
    let body = "x".repeat(100_000);
    let url = format!("http://{addr}/echo");
    // curl sends Expect: 100-continue itself for bodies over 1 MiB; force it.
    let (code, out, err) = curl(&[
        "-v",
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "10",
        "--data-binary",
        &body,
        &url,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("HTTP/1.1 100 Continue"),
        "no 100 Continue seen: {err}"
    );
    assert_eq!(out.len(), body.len());
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_requests_use_at_most_four_connections() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(
        o.addr,
        "client_keepalive = false",
        "max_connections = 4\nmax_pending = 4096\nqueue_timeout = \"60s\"",
    ))
    .await;
    let mut spec =
        loopmux::demo::load::LoadSpec::new(addr, 2_000, 2_000, loopmux::demo::load::Closer::Server);
    spec.path = "/slow/5".into();
    spec.timeout = Duration::from_secs(60);
    let r = loopmux::demo::load::run(spec).await;
    assert_eq!(r.ok, 2_000, "{:?}", r.errors);
    let accepted = o.stats.accepted.load(Ordering::Relaxed);
    assert!(accepted <= 4, "upstream saw {accepted} connections");
    assert!(o.stats.peak_active.load(Ordering::Relaxed) <= 4);
    for ep in app.upstreams()[0].endpoints().iter() {
        assert!(ep.pool.snapshot().open <= 4);
    }
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn connections_are_reused_not_reopened() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "max_connections = 2")).await;
    let r = loopmux::demo::load::run(loopmux::demo::load::LoadSpec::new(
        addr,
        300,
        2,
        loopmux::demo::load::Closer::Client,
    ))
    .await;
    assert_eq!(r.ok, 300, "{:?}", r.errors);
    assert!(o.stats.accepted.load(Ordering::Relaxed) <= 2);
    app.stop(Duration::from_secs(1)).await;
}

/// An HTTP/1 upstream connection goes back to the pool when its response
/// body has ended, whatever framed it (a length, chunks, or no body at
/// all), and is closed when the client left in the middle of one (it
/// cannot carry another request then). One upstream connection allowed,
/// a new client connection per request.
#[tokio::test]
async fn upstream_connection_is_reused_after_every_body_shape_and_closed_mid_body() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "max_connections = 1")).await;
    let shapes: [(&str, &[u8], &str); 5] = [
        ("length", b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "ok\n"),
        ("head", b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", ""),
        ("chunked", b"GET /bytes/300000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", ""),
        (
            "upload",
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
            "hello",
        ),
        ("again", b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "ok\n"),
    ];
    for round in 0..3 {
        for (name, req, body) in shapes {
            let out = closed_by_loopmux(addr, req).await;
            assert!(out.starts_with("HTTP/1.1 200"), "{name}: {out}");
            assert!(out.ends_with(body), "{name}: {out}");
            assert_eq!(
                o.stats.accepted.load(Ordering::Relaxed),
                1,
                "round {round}, {name}: the upstream connection was not reused"
            );
        }
    }
    // A client that reads a little of a long body and leaves.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        b"GET /bytes/50000000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
        .await
        .unwrap();
    assert!(n > 0);
    drop(s);
    let out = closed_by_loopmux(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(
        o.stats.accepted.load(Ordering::Relaxed),
        2,
        "the connection left mid-body must be closed, and a new one dialed"
    );
    app.stop(Duration::from_secs(1)).await;
}

/// An upstream that answers a streaming upload before reading it (an
/// early 200, 401 or 413 does that) leaves the connection busy until the
/// upload has been sent: it must stay out of the pool until hyper calls it
/// ready, so the next request takes another connection instead of waiting
/// behind a client that trickles its upload.
#[tokio::test]
async fn an_early_answer_to_a_streaming_upload_keeps_its_connection_out_of_the_pool() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            seen.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    };
                    let post = buf.starts_with(b"POST");
                    buf.drain(..end);
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if post {
                        // Answered; now only reads what comes, as long as it comes.
                        while matches!(s.read(&mut tmp).await, Ok(n) if n > 0) {}
                        return;
                    }
                }
            });
        }
    });
    let (app, addr) = start(&one_upstream(
        up,
        "request_buffer_bytes = 0",
        "max_connections = 4\nqueue_timeout = \"1s\"",
    ))
    .await;
    // A warm connection in the pool first.
    let out = closed_by_loopmux(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // The upload: answered at once, then trickled and never finished.
    let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
    a.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nfirst bytes")
        .await
        .unwrap();
    let mut head = [0u8; 64];
    let n = a.read(&mut head).await.unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head[..n])
    );
    a.write_all(b"more").await.unwrap();
    // The next request is answered (on another connection), not held
    // until the upload ends.
    let out = closed_by_loopmux(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(accepted.load(Ordering::Relaxed) <= 4);
    drop(a);
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn idempotent_request_is_retried_once_on_a_fresh_connection() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "max_connections = 1")).await;
    let url = format!("http://{addr}/flaky");
    let (_, out, _) = curl(&[&url]).await;
    assert_eq!(out, "flaky ok\n");
    // Second request lands on the reused connection, which the origin drops
    // after reading it; loopmux replays the GET on a new connection.
    let (code, out, err) = curl(&[&url]).await;
    assert_eq!((code, out.as_str()), (0, "flaky ok\n"), "{err}");
    assert_eq!(o.stats.accepted.load(Ordering::Relaxed), 2);
    assert_eq!(o.stats.flaky_seen.load(Ordering::Relaxed), 3);
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn non_idempotent_request_that_reached_upstream_is_not_replayed() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "max_connections = 1")).await;
    let url = format!("http://{addr}/flaky");
    let (_, out, _) = curl(&[&url]).await;
    assert_eq!(out, "flaky ok\n");
    let (code, out, _) = curl(&[
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        "--data",
        "order=1",
        &url,
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "502"));
    assert_eq!(
        o.stats.flaky_seen.load(Ordering::Relaxed),
        2,
        "the POST reached the origin exactly once"
    );
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn failing_endpoint_is_avoided() {
    let o = origin().await;
    let (_guard, dead) = refusing_addr();
    let toml = one_upstream(o.addr, "", "failure_backoff = \"60s\"").replace(
        &format!("endpoints = [\"{}\"]", o.addr),
        &format!("endpoints = [\"{dead}\", \"{}\"]", o.addr),
    );
    let (app, addr) = start(&toml).await;
    let r = loopmux::demo::load::run(loopmux::demo::load::LoadSpec::new(
        addr,
        50,
        4,
        loopmux::demo::load::Closer::Server,
    ))
    .await;
    assert_eq!(r.ok, 50, "{:?}", r.errors);
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn dns_name_endpoint_resolves() {
    let o = origin().await;
    let toml = one_upstream(o.addr, "", "dns_refresh = \"100ms\"").replace(
        &format!("\"{}\"", o.addr),
        &format!("\"localhost:{}\"", o.addr.port()),
    );
    let (app, addr) = start(&toml).await;
    let (code, out, err) = curl(&[&format!("http://{addr}/")]).await;
    assert_eq!((code, out.as_str()), (0, "ok\n"), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Refreshes keep the same endpoint (and its pool) for the same address.
    let eps = app.upstreams()[0].endpoints();
    assert!(
        eps.iter().any(|e| e.addr == o.addr),
        "{:?}",
        eps.iter().map(|e| e.addr).collect::<Vec<_>>()
    );
    let (code, _, _) = curl(&[&format!("http://{addr}/")]).await;
    assert_eq!(code, 0);
    assert_eq!(o.stats.accepted.load(Ordering::Relaxed), 1);
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn ipv6_listener_and_endpoint() {
    let Ok(o) = Origin::start("[::1]:0".parse().unwrap()).await else {
        eprintln!("skipped: no IPv6 loopback");
        return;
    };
    let toml =
        one_upstream(o.addr, "", "source_addresses = [\"::1\"]").replace("127.0.0.1:0", "[::1]:0");
    let (app, addr) = start(&toml).await;
    let (code, out, err) = curl(&[&format!("http://{addr}/")]).await;
    assert_eq!((code, out.as_str()), (0, "ok\n"), "{err}");
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn stop_drains_in_flight_requests() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "")).await;
    let url = format!("http://{addr}/slow/800");
    let slow = tokio::spawn(async move { curl(&["-w", " %{http_code}", &url]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        app.stop(Duration::from_secs(10)).await,
        "drain finished in time"
    );
    let (code, out, err) = slow.await.unwrap();
    assert_eq!((code, out.as_str()), (0, "slow ok\n 200"), "{err}");
    // And nothing accepts any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
