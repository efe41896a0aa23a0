//! Hostile cases for the http mode (DESIGN invariants 3, 5, 7, 9): bad
//! framing, lost coding labels, Host abuse, slow and stalled peers. The
//! framing cases are a table: one misbehaving upstream script, one raw
//! request, one check. Add a case in three lines.

mod support;

use std::time::Duration;

use support::raw_upstream::{chunked, exchange, metric, write, RawUpstream, Seen, Step};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n";
const WAIT: Duration = Duration::from_secs(5);

struct Case {
    name: &'static str,
    /// What the upstream does after reading the request.
    upstream: Vec<Step>,
    request: Vec<u8>,
    /// Whether the upstream may see a connection at all.
    reaches_upstream: bool,
    check: fn(&Seen) -> Result<(), String>,
}

fn expect(cond: bool, what: &str, seen: &Seen) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(format!(
            "{what}; got status {} closed {} framed {} body {:?}\n{}",
            seen.status,
            seen.closed,
            seen.framed,
            String::from_utf8_lossy(&seen.body),
            seen.head
        ))
    }
}

fn ok_head(extra: &str) -> String {
    format!("HTTP/1.1 200 OK\r\n{extra}\r\n")
}

fn cases() -> Vec<Case> {
    let body48 = [b'x'; 48];
    let mut cl_te = ok_head("Content-Length: 2\r\nTransfer-Encoding: chunked\r\n").into_bytes();
    cl_te.extend(chunked(&body48));
    let mut cl100_te =
        ok_head("Content-Length: 100\r\nTransfer-Encoding: chunked\r\n").into_bytes();
    cl100_te.extend(chunked(b"ok"));
    let mut gzip_resp = ok_head("Transfer-Encoding: gzip, chunked\r\n").into_bytes();
    gzip_resp.extend(chunked(b"\x1f\x8b not really gzip"));
    let ok = || vec![write(ok_head("Content-Length: 2\r\n") + "ok")];
    let post_chunked = |body: &str| {
        format!("POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{body}")
            .into_bytes()
    };
    vec![
        Case {
            name: "CL beside TE: framed by the chunking, no CL to the client",
            upstream: vec![Step::Write(cl_te), Step::Hold],
            request: GET.to_vec(),
            reaches_upstream: true,
            check: |s| {
                expect(s.status == 200 && s.framed, "a complete 200", s)?;
                expect(s.body == [b'x'; 48], "all 48 bytes", s)?;
                expect(s.header("content-length").as_deref() != Some("2"), "no content-length: 2", s)
            },
        },
        Case {
            name: "CL 100 beside a 2-byte chunked body",
            upstream: vec![Step::Write(cl100_te), Step::Hold],
            request: GET.to_vec(),
            reaches_upstream: true,
            check: |s| expect(s.status == 200 && s.framed && s.body == b"ok", "exactly ok", s),
        },
        Case {
            name: "short body then close: the client connection is closed unframed",
            upstream: vec![write(ok_head("Content-Length: 100\r\n") + "ab")],
            request: GET.to_vec(),
            reaches_upstream: true,
            check: |s| expect(s.status == 200 && !s.framed && s.closed, "a cut, closed response", s),
        },
        Case {
            name: "body longer than its CL: exactly CL bytes",
            upstream: vec![write(ok_head("Content-Length: 5\r\n") + "12345abcde"), Step::Hold],
            request: GET.to_vec(),
            reaches_upstream: true,
            check: |s| expect(s.framed && s.body == b"12345", "exactly 5 bytes", s),
        },
        Case {
            name: "response coding gzip, chunked: 502 naming gzip",
            upstream: vec![Step::Write(gzip_resp), Step::Hold],
            request: GET.to_vec(),
            reaches_upstream: true,
            check: |s| {
                expect(s.status == 502, "502", s)?;
                expect(s.header("x-loopmux-error").as_deref() == Some("unsupported-coding"), "unsupported-coding", s)?;
                expect(String::from_utf8_lossy(&s.body).contains("gzip"), "names gzip", s)
            },
        },
        Case {
            name: "request coding gzip, chunked: 501 naming gzip",
            upstream: ok(),
            request: b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(),
            reaches_upstream: false,
            check: |s| {
                expect(s.status == 501, "501", s)?;
                expect(s.header("x-loopmux-error").as_deref() == Some("unsupported-coding"), "unsupported-coding", s)?;
                expect(String::from_utf8_lossy(&s.body).contains("gzip"), "names gzip", s)
            },
        },
        Case {
            name: "chunk size zz: 400",
            upstream: ok(),
            request: post_chunked("zz\r\nabc\r\n0\r\n\r\n"),
            reaches_upstream: false,
            check: bad_request,
        },
        Case {
            name: "overflowing chunk size: 400",
            upstream: ok(),
            request: post_chunked("fffffffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
            reaches_upstream: false,
            check: bad_request,
        },
        Case {
            name: "chunk without its CRLF: 400",
            upstream: ok(),
            request: post_chunked("3\r\nabcXY0\r\n\r\n"),
            reaches_upstream: false,
            check: bad_request,
        },
        Case {
            name: "two Host headers: 400",
            upstream: ok(),
            request: b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(),
            reaches_upstream: false,
            check: bad_request,
        },
        Case {
            name: "HTTP/1.1 without Host: 400",
            upstream: ok(),
            request: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            reaches_upstream: false,
            check: bad_request,
        },
        Case {
            name: "HTTP/1.0 without Host is served",
            upstream: ok(),
            request: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            reaches_upstream: true,
            check: |s| expect(s.status == 200 && s.body == b"ok", "200 ok", s),
        },
    ]
}

fn bad_request(s: &Seen) -> Result<(), String> {
    expect(s.status == 400, "400", s)?;
    expect(
        s.header("x-loopmux-error").as_deref() == Some("bad-request"),
        "x-loopmux-error: bad-request",
        s,
    )
}

#[tokio::test]
async fn framing_table() {
    let mut failures = Vec::new();
    for case in cases() {
        let up = RawUpstream::start(case.upstream).await;
        let (app, addr) = start(&one_upstream(up.addr, "", "")).await;
        let seen = exchange(addr, &case.request, WAIT).await;
        if let Err(e) = (case.check)(&seen) {
            failures.push(format!("{}: {e}", case.name));
        } else if !case.reaches_upstream && up.accepted() != 0 {
            failures.push(format!(
                "{}: the upstream saw {} connections",
                case.name,
                up.accepted()
            ));
        }
        app.stop(Duration::from_secs(1)).await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn absolute_form_target_sets_host() {
    let up = RawUpstream::start(vec![write(ok_head("Content-Length: 2\r\n") + "ok")]).await;
    let (app, addr) = start(&one_upstream(up.addr, "", "")).await;
    let seen = exchange(
        addr,
        b"GET http://good.example/x HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(seen.status, 200);
    let head = &up.heads()[0];
    assert!(head.starts_with("GET /x HTTP/1.1\r\n"), "{head}");
    assert_eq!(
        support::raw_upstream::header(head, "host").as_deref(),
        Some("good.example")
    );
    app.stop(Duration::from_secs(1)).await;
}

/// Ten malformed bodies cost no upstream connection and are counted as 4xx.
#[tokio::test]
async fn malformed_bodies_touch_no_upstream_connection_and_are_counted() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream_with_admin(o.addr, "", "")).await;
    let admin = app.admin_addr.unwrap();
    for i in 0..10 {
        let size = ["zz", "fffffffffffffffffffff", "3;\r\nabcXY"][i % 3];
        let req = format!(
            "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nabc\r\n0\r\n\r\n"
        );
        let seen = exchange(addr, req.as_bytes(), WAIT).await;
        bad_request(&seen).unwrap();
    }
    assert_eq!(
        o.stats.accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no upstream connection was opened"
    );
    let l = [("listener", "t"), ("class", "4xx")];
    assert_eq!(
        metric(admin, "loopmux_listener_responses_total", &l).await,
        10.0
    );
    app.stop(Duration::from_secs(1)).await;
}

/// A malformed chunk after more than the buffer: one upstream connection
/// at most, discarded; the client gets 400 or a closed connection.
#[tokio::test]
async fn malformed_chunk_after_the_buffer_is_not_a_502() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "request_buffer_bytes = 1024", "")).await;
    let mut req = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..10 {
        req.extend(b"400\r\n");
        req.extend([b'a'; 1024]);
        req.extend(b"\r\n");
    }
    req.extend(b"zz\r\n");
    let seen = exchange(addr, &req, WAIT).await;
    assert!(
        seen.status == 400 || (seen.status == 0 && seen.closed),
        "{seen:?}"
    );
    assert!(o.stats.accepted.load(std::sync::atomic::Ordering::SeqCst) <= 1);
    app.stop(Duration::from_secs(1)).await;
}

/// hyper's own answers to unparseable heads are counted (and were not).
#[tokio::test]
async fn hypers_own_400_and_431_are_counted() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream_with_admin(
        o.addr,
        "max_header_bytes = 8192",
        "",
    ))
    .await;
    let admin = app.admin_addr.unwrap();
    let seen = exchange(addr, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", WAIT).await;
    assert_eq!(seen.status, 400);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let seen = exchange(addr, big.as_bytes(), WAIT).await;
    assert_eq!(seen.status, 431);
    let l = [("listener", "t"), ("class", "4xx")];
    assert_eq!(
        metric(admin, "loopmux_listener_responses_total", &l).await,
        2.0
    );
    app.stop(Duration::from_secs(1)).await;
}

/// Sends a head, then `body` one byte every `every`.
async fn dribble(addr: std::net::SocketAddr, head: String, body: Vec<u8>, every: Duration) -> Seen {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    for b in body {
        tokio::time::sleep(every).await;
        if s.write_all(&[b]).await.is_err() {
            break;
        }
    }
    support::raw_upstream::read_response(&mut s, Duration::from_secs(10)).await
}

/// Four slow uploaders of small bodies hold no pooled connection: an
/// ordinary request is served while they dribble (it got 503 before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploaders_of_small_bodies_hold_no_connection() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(
        o.addr,
        "",
        "max_connections = 2\nqueue_timeout = \"1s\"",
    ))
    .await;
    let body: Vec<u8> = (0..10u8).map(|i| b'a' + i).collect();
    let uploads: Vec<_> = (0..4)
        .map(|_| {
            let head = format!(
                "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            tokio::spawn(dribble(
                addr,
                head,
                body.clone(),
                Duration::from_millis(300),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = exchange(addr, GET, WAIT).await;
    assert_eq!(seen.status, 200, "{seen:?}");
    for u in uploads {
        let seen = u.await.unwrap();
        assert_eq!((seen.status, &seen.body), (200, &body), "{seen:?}");
    }
    assert!(
        o.stats
            .peak_active
            .load(std::sync::atomic::Ordering::SeqCst)
            <= 2
    );
    app.stop(Duration::from_secs(1)).await;
}

async fn stalls(admin: std::net::SocketAddr, side: &str) -> f64 {
    metric(
        admin,
        "loopmux_body_stalls_total",
        &[("listener", "t"), ("side", side)],
    )
    .await
}

/// A client that stops mid-way through a large (streaming) body: the
/// upstream connection that carried it is closed, the client is answered
/// 408 or cut, and the stall is counted.
#[tokio::test]
async fn client_stall_in_a_streaming_body_frees_the_upstream_connection() {
    let up = RawUpstream::start(vec![Step::Hold]).await;
    let (app, addr) = start(&one_upstream_with_admin(
        up.addr,
        "body_timeout = \"500ms\"\nrequest_buffer_bytes = 1024",
        "",
    ))
    .await;
    let admin = app.admin_addr.unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&[b'a'; 10_000]).await.unwrap();
    let seen = support::raw_upstream::read_response(&mut s, WAIT).await;
    assert!(
        seen.closed || seen.status == 408,
        "answered 408 or closed: {seen:?}"
    );
    // The upstream connection (Hold) sees loopmux close it.
    assert_eq!(up.wait_closed_by_loopmux(1).await, 1);
    assert_eq!(stalls(admin, "client").await, 1.0);
    app.stop(Duration::from_secs(1)).await;
}

/// A client that stalls in a small (buffered) body gets 408 and costs no
/// upstream connection.
#[tokio::test]
async fn client_stall_in_a_small_body_is_408_without_upstream() {
    let up = RawUpstream::start(vec![Step::Hold]).await;
    let (app, addr) = start(&one_upstream_with_admin(
        up.addr,
        "body_timeout = \"500ms\"",
        "",
    ))
    .await;
    let admin = app.admin_addr.unwrap();
    let seen = exchange(
        addr,
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n0123456789",
        WAIT,
    )
    .await;
    assert_eq!(seen.status, 408, "{seen:?}");
    assert_eq!(
        seen.header("x-loopmux-error").as_deref(),
        Some("client-stall")
    );
    assert_eq!(up.accepted(), 0);
    assert_eq!(stalls(admin, "client").await, 1.0);
    app.stop(Duration::from_secs(1)).await;
}

/// An upstream that stalls after its head: the client gets what came and
/// then a closed connection; the upstream connection is closed by loopmux.
#[tokio::test]
async fn upstream_stall_after_the_head_cuts_the_client_and_frees_the_connection() {
    let up = RawUpstream::start(vec![
        write(ok_head("Content-Length: 1000\r\n") + "0123456789"),
        Step::Hold,
    ])
    .await;
    let (app, addr) = start(&one_upstream_with_admin(
        up.addr,
        "",
        "body_timeout = \"500ms\"",
    ))
    .await;
    let admin = app.admin_addr.unwrap();
    let seen = exchange(addr, GET, WAIT).await;
    assert_eq!(seen.status, 200);
    assert_eq!(seen.body, b"0123456789");
    assert!(seen.closed && !seen.framed, "{seen:?}");
    assert_eq!(
        up.wait_closed_by_loopmux(1).await,
        1,
        "loopmux closed the stalled connection"
    );
    assert_eq!(stalls(admin, "upstream").await, 1.0);
    app.stop(Duration::from_secs(1)).await;
}

/// A client that never reads its (large) response is cut after the
/// listener's body_timeout; the pooled connection does not stay in use.
#[tokio::test]
async fn client_that_stops_reading_is_cut_and_the_connection_freed() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream_with_admin(
        o.addr,
        "body_timeout = \"500ms\"",
        "max_connections = 1",
    ))
    .await;
    let admin = app.admin_addr.unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /bytes/50000000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1024];
    let _ = s.read(&mut first).await.unwrap();
    // Read nothing more: loopmux must give up on us.
    let mut stalled = false;
    for _ in 0..100 {
        if stalls(admin, "client").await == 1.0 {
            stalled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stalled, "the stalled client was counted");
    // The one pooled connection is free again: a normal request is served.
    let seen = exchange(addr, GET, WAIT).await;
    assert_eq!(seen.status, 200, "{seen:?}");
    app.stop(Duration::from_secs(1)).await;
}

/// request_timeout counts from the request fully sent: a 3.6 s upload
/// that keeps moving is not a 504 with request_timeout = 2s.
#[tokio::test]
async fn request_timeout_does_not_count_the_upload() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(
        o.addr,
        "request_buffer_bytes = 0",
        "request_timeout = \"2s\"",
    ))
    .await;
    let piece = vec![b'z'; 5 * 1024];
    let total = piece.len() * 40;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {total}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(90)).await;
        s.write_all(&piece).await.unwrap();
    }
    let seen = support::raw_upstream::read_response(&mut s, Duration::from_secs(10)).await;
    assert_eq!(seen.status, 200, "{}", seen.head);
    assert_eq!(seen.body.len(), total);
    assert!(seen.body.iter().all(|b| *b == b'z'));

    // A server slower than request_timeout after the body is still a 504.
    let seen = exchange(
        addr,
        b"GET /slow/4000 HTTP/1.1\r\nHost: t\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(seen.status, 504, "{seen:?}");
    app.stop(Duration::from_secs(1)).await;
}
