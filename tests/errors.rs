//! DESIGN invariant 5: every failure reaches the client as a clear answer,
//! and no input makes loopmux stop serving.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn status_and_body(url: &str) -> (String, String) {
    let (code, out, err) = curl(&["-w", "\n%{http_code}", url]).await;
    assert_eq!(code, 0, "{err}");
    let (body, status) = out.rsplit_once('\n').unwrap();
    (status.to_string(), body.to_string())
}

#[tokio::test]
async fn connect_refused_is_502_naming_upstream_endpoint_source_and_errno() {
    let (_guard, dead) = refusing_addr();
    let (app, addr) = start(&one_upstream(
        dead,
        "",
        "source_addresses = [\"127.0.0.7\"]",
    ))
    .await;
    let (status, body) = status_and_body(&format!("http://{addr}/")).await;
    assert_eq!(status, "502");
    for part in [
        "upstream \"u\"",
        &dead.to_string(),
        "127.0.0.7",
        "ECONNREFUSED",
    ] {
        assert!(body.contains(part), "missing {part}: {body}");
    }
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn unassigned_source_is_502_with_eaddrnotavail() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(
        o.addr,
        "",
        "source_addresses = [\"198.18.0.1\"]",
    ))
    .await;
    let (status, body) = status_and_body(&format!("http://{addr}/")).await;
    assert_eq!(status, "502");
    assert!(
        body.contains("198.18.0.1") && body.contains("EADDRNOTAVAIL"),
        "{body}"
    );
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn connect_timeout_is_502_within_the_timeout() {
    // A listener whose accept queue is full: further SYNs go unanswered, so
    // connect() hangs until loopmux's connect_timeout.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let full: std::net::SocketAddr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(full),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let (app, addr) = start(&one_upstream(full, "", "connect_timeout = \"300ms\"")).await;
    let (status, body) = status_and_body(&format!("http://{addr}/")).await;
    assert_eq!(status, "502", "{body}");
    assert!(body.contains("timed out after 300ms"), "{body}");
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn request_timeout_is_504() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "request_timeout = \"200ms\"")).await;
    let (status, body) = status_and_body(&format!("http://{addr}/slow/3000")).await;
    assert_eq!(status, "504", "{body}");
    assert!(body.contains("within 200ms"), "{body}");
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn queue_full_and_queue_timeout_are_503_without_new_sockets() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(
        o.addr,
        "",
        "max_connections = 1\nmax_pending = 1\nqueue_timeout = \"300ms\"",
    ))
    .await;
    let slow = format!("http://{addr}/slow/1500");
    let busy = tokio::spawn(async move { curl(&["-o", "/dev/null", &slow]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting_url = format!("http://{addr}/");
    let waiting = tokio::spawn(async move { status_and_body(&waiting_url).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = status_and_body(&format!("http://{addr}/")).await;
    assert_eq!(status, "503", "{body}");
    assert!(body.contains("queue full"), "{body}");
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, "503", "{body}");
    assert!(
        body.contains("no connection became free within 300ms"),
        "{body}"
    );
    busy.await.unwrap();
    assert_eq!(
        o.stats.accepted.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn malformed_request_is_400_and_oversized_headers_are_431() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "max_header_bytes = 4096", "")).await;
    let out = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(8000)
    );
    let out = raw(addr, big.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn slow_client_is_cut_after_header_timeout() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "header_timeout = \"300ms\"", "")).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "loopmux kept a half-sent request open");
    app.stop(Duration::from_secs(1)).await;
}

/// A client that connects and says nothing holds no HTTP state (see
/// `benches/idle_memory.rs`), but is still closed at `header_timeout`;
/// one whose first byte comes late gets the rest of that time for its
/// head, not a fresh one. Paused time: the clock only moves when every
/// task waits, so the instants are exact.
#[tokio::test(start_paused = true)]
async fn header_timeout_runs_from_the_connection_not_the_first_byte() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "header_timeout = \"10s\"", "")).await;

    let t0 = tokio::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = Vec::new();
    silent.read_to_end(&mut out).await.unwrap();
    assert!(out.is_empty(), "{out:?}");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "silent client closed after {waited:?}"
    );

    let t0 = tokio::time::Instant::now();
    let mut late = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    late.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = late.read_to_end(&mut out).await;
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "a head begun at 6 s was cut after {waited:?}, not at the 10 s header_timeout"
    );

    // A whole request that comes late, within the time, is served, and
    // the connection then keeps the full header_timeout for its next
    // request (hyper's timer restarts per head; only the first is short).
    let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_secs(9)).await;
    ok.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = ok.read(&mut buf).await.unwrap();
    let out = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    ok.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = ok.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "second request after 3 s of keep-alive: {out}"
    );
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn connect_method_is_405() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "")).await;
    let out = raw(
        addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    app.stop(Duration::from_secs(1)).await;
}

/// The classic CL.TE smuggling shape: a front end trusting Content-Length
/// would forward the `GET /smuggled` as part of the body; one trusting
/// Transfer-Encoding would see it as a second request. loopmux frames by
/// Transfer-Encoding (RFC 9112 §6.3), drops Content-Length, forwards one
/// unambiguous request, and closes the client connection after it.
#[tokio::test]
async fn conflicting_framing_is_not_smuggled() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "")).await;
    let attack = b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let out = closed_by_loopmux(addr, attack).await;
    assert_eq!(
        out.matches("HTTP/1.1 ").count(),
        1,
        "exactly one response: {out}"
    );
    let lower = out.to_ascii_lowercase();
    assert!(
        !lower.contains("content-length: 4"),
        "conflicting length forwarded: {out}"
    );
    assert!(!lower.contains("smuggled"), "{out}");
    // Two different lengths, and TE in HTTP/1.0, are refused outright.
    let out = raw(
        addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let out = raw(
        addr,
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.1 400") || out.starts_with("HTTP/1.0 400"),
        "{out}"
    );
    assert_eq!(
        o.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn garbage_and_truncated_input_never_stop_the_service() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "header_timeout = \"500ms\"", "")).await;
    let mut inputs: Vec<Vec<u8>> = vec![
        b"\x00\x01\x02\x03\xff\xfe".to_vec(),
        b"GET".to_vec(),
        b"GET / HTTP/1.1\r\n".to_vec(),
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort".to_vec(),
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(),
        b"GET http://[::1 HTTP/1.1\r\n\r\n".to_vec(),
        b"\r\n\r\n\r\n\r\n".to_vec(),
        "GET /\u{e9} HTTP/1.1\r\nHost: \u{e9}\r\n\r\n"
            .as_bytes()
            .to_vec(),
    ];
    // Deterministic pseudo-random bytes: repeatable failures.
    let mut x: u32 = 0x2545_f491;
    for len in [1usize, 17, 300, 5000] {
        let mut v = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            v.push(x as u8);
        }
        inputs.push(v);
    }
    for input in &inputs {
        let _ = raw(addr, input, Duration::from_secs(2)).await;
    }
    let (code, out, err) = curl(&[&format!("http://{addr}/")]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "ok\n"),
        "still serving after garbage: {err}"
    );
    app.stop(Duration::from_secs(1)).await;
}
