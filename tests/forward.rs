//! The forward-proxy mode with real clients: curl with `-x` and with
//! `http_proxy` / `https_proxy` in its environment, raw proxy requests for
//! the refusals, CONNECT to a rustls server, TLS originated for plain
//! `http://` requests, and Java's HttpURLConnection with
//! `-Dhttp.proxyHost`. Everything on loopback.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use loopmux::demo::origin::OriginOptions;
use support::pki::{self, Ca, Dir};
use support::raw_upstream::{exchange, metric};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

/// A forward listener with `listener_extra` keys and an admin endpoint;
/// returns the app, the proxy's address and the admin address.
async fn proxy(listener_extra: &str, tail: &str) -> (loopmux::app::App, SocketAddr, SocketAddr) {
    let toml = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"fwd\"\nbind = \"127.0.0.1:0\"\nmode = \"forward\"\n{listener_extra}\n{tail}\n"
    );
    let (app, addr) = start(&toml).await;
    let admin = app.admin_addr.unwrap();
    (app, addr, admin)
}

async fn tls_origin(ca: &Ca) -> Origin {
    Origin::start_with(
        "127.0.0.1:0".parse().unwrap(),
        OriginOptions {
            h2: false,
            max_streams: None,
            tls: Some(pki::server_config(&ca.server(&["localhost"], false), None)),
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_proxy_reuses_pooled_origin_connections() {
    let o = origin().await;
    let (_app, p, admin) = proxy(
        "allow = [\"127.0.0.0/8:*\"]\nvia = true",
        "[forward_defaults]\nmax_connections = 2",
    )
    .await;
    let proxy_url = format!("http://{p}");
    let url = format!("http://{}/headers", o.addr);

    // `-x`, with the proxy headers an app might send.
    let (code, out, err) = curl(&[
        "-x",
        &proxy_url,
        "-H",
        "Proxy-Authorization: Basic dXNlcjpwdw==",
        "-H",
        "Proxy-Connection: keep-alive",
        "-D",
        "-",
        &url,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let lower = out.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200"), "{out}");
    // The origin got origin-form, and no proxy headers.
    assert!(out.contains("GET /headers HTTP/1.1"), "{out}");
    assert!(!lower.contains("proxy-authorization"), "{out}");
    assert!(!lower.contains("proxy-connection"), "{out}");
    // `via = true`: both ways.
    assert!(lower.contains("via: 1.1 loopmux"), "{out}");
    assert_eq!(lower.matches("via: 1.1 loopmux").count(), 2, "{out}");

    // `http_proxy` in the environment, as apps are configured; one new
    // client connection per request (a new curl each time).
    for i in 0..20 {
        let out = tokio::process::Command::new("curl")
            .args([
                "--silent",
                "--show-error",
                "--max-time",
                "20",
                "--noproxy",
                "",
            ])
            .arg(format!("http://{}/bytes/{}", o.addr, 100 + i))
            .env("http_proxy", &proxy_url)
            .env_remove("no_proxy")
            .env_remove("NO_PROXY")
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(out.stdout.len(), 100 + i, "request {i}");
    }
    // 21 client connections, at most max_connections toward the origin.
    let accepted = o.stats.accepted.load(Ordering::Relaxed);
    assert!((1..=2).contains(&accepted), "origin accepted {accepted}");
    assert_eq!(
        metric(admin, "loopmux_forward_origins", &[("listener", "fwd")]).await,
        1.0
    );
}

/// Requests loopmux must refuse, each with its status, its
/// `x-loopmux-error` and words of its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_table() {
    let o = origin().await;
    let (_app, p, admin) = proxy(
        "allow = [\"localhost:*\", \"!127.0.0.0/8:9\", \"api.example.com:443\", \"127.0.0.1:*\", \"resolves-denied.localhost:*\", \"[::1]:*\"]",
        "",
    )
    .await;
    let own = p.port();
    struct Case {
        name: &'static str,
        request: String,
        status: u16,
        kind: &'static str,
        words: &'static [&'static str],
    }
    let get = |target: String| format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
    let cases = [
        Case {
            name: "origin-form",
            request: "GET /path HTTP/1.1\r\nHost: a\r\n\r\n".into(),
            status: 400,
            kind: "bad-request",
            words: &["absolute", "HTTP_PROXY"],
        },
        Case {
            name: "not on the list",
            request: get("http://evil.example/".into()),
            status: 403,
            kind: "denied",
            words: &["evil.example:80", "no allow rule matches"],
        },
        Case {
            name: "the nearest rule is named",
            request: get("http://api.example.com/".into()),
            status: 403,
            kind: "denied",
            words: &["api.example.com:443", "other ports"],
        },
        Case {
            name: "deny rule on an address",
            request: get("http://127.0.0.2:9/".into()),
            status: 403,
            kind: "denied",
            words: &["!127.0.0.0/8:9"],
        },
        Case {
            name: "a name resolving into a denied range",
            request: get("http://localhost:9/".into()),
            status: 403,
            kind: "denied",
            words: &["resolves to", "!127.0.0.0/8:9"],
        },
        Case {
            name: "an IP literal does not ride on a name rule",
            request: get(format!("http://127.0.0.3:{}/", o.addr.port())),
            status: 403,
            kind: "denied",
            words: &["never by a name rule"],
        },
        Case {
            name: "the proxy's own address",
            request: get(format!("http://127.0.0.1:{own}/")),
            status: 508,
            kind: "loop",
            words: &["would loop"],
        },
        Case {
            name: "a name resolving to the proxy",
            request: get(format!("http://localhost:{own}/")),
            status: 508,
            kind: "loop",
            words: &["would loop"],
        },
        Case {
            name: "CONNECT to the proxy",
            request: format!("CONNECT 127.0.0.1:{own} HTTP/1.1\r\nHost: x\r\n\r\n"),
            status: 508,
            kind: "loop",
            words: &["would loop"],
        },
        Case {
            name: "CONNECT not on the list",
            request: "CONNECT evil.example:443 HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            status: 403,
            kind: "denied",
            words: &["evil.example:443"],
        },
        Case {
            name: "CONNECT without a port",
            request: "CONNECT localhost HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            status: 400,
            kind: "bad-request",
            words: &["host:port"],
        },
        Case {
            name: "another scheme",
            request: get("ftp://localhost/".into()),
            status: 400,
            kind: "bad-request",
            words: &["ftp"],
        },
        Case {
            name: "user information",
            request: get("http://user:pw@localhost/".into()),
            status: 400,
            kind: "bad-request",
            words: &["user information"],
        },
        Case {
            name: "a numeric host in an odd form",
            request: get("http://2130706433/".into()),
            status: 400,
            kind: "bad-request",
            words: &["numeric"],
        },
        Case {
            name: "https:// without TLS toward origins",
            request: get("https://localhost/".into()),
            status: 501,
            kind: "tls-not-configured",
            words: &["CONNECT"],
        },
    ];
    for c in &cases {
        let seen = exchange(p, c.request.as_bytes(), WAIT).await;
        let body = String::from_utf8_lossy(&seen.body).into_owned();
        assert_eq!(seen.status, c.status, "{}: {}{body}", c.name, seen.head);
        assert_eq!(
            seen.header("x-loopmux-error").as_deref(),
            Some(c.kind),
            "{}: {}",
            c.name,
            seen.head
        );
        for w in c.words {
            assert!(body.contains(w), "{}: `{w}` not in {body}", c.name);
        }
    }
    // Nothing refused reached the origin.
    assert_eq!(o.stats.accepted.load(Ordering::Relaxed), 0);
    let denied = metric(
        admin,
        "loopmux_forward_refused_total",
        &[("listener", "fwd"), ("reason", "denied")],
    )
    .await;
    assert_eq!(denied, 6.0);
    let loops = metric(
        admin,
        "loopmux_forward_refused_total",
        &[("listener", "fwd"), ("reason", "loop")],
    )
    .await;
    assert_eq!(loops, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_origins_drops_the_least_recently_used_idle_origin_and_never_a_busy_one() {
    let a = origin().await;
    let b = origin().await;
    let (_app, p, _admin) = proxy("allow = [\"127.0.0.1:*\"]\nmax_origins = 1", "").await;
    // A slow request holds origin A.
    let slow_req = format!(
        "GET http://{}/slow/1500 HTTP/1.1\r\nHost: x\r\n\r\n",
        a.addr
    );
    let slow = tokio::spawn(async move { exchange(p, slow_req.as_bytes(), WAIT).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let full = exchange(
        p,
        format!("GET http://{}/bytes/3 HTTP/1.1\r\nHost: x\r\n\r\n", b.addr).as_bytes(),
        WAIT,
    )
    .await;
    assert_eq!(full.status, 503, "{}", full.head);
    assert_eq!(
        full.header("x-loopmux-error").as_deref(),
        Some("max-origins")
    );
    assert_eq!(slow.await.unwrap().status, 200);
    // A is idle now: B takes its place.
    let ok = exchange(
        p,
        format!("GET http://{}/bytes/3 HTTP/1.1\r\nHost: x\r\n\r\n", b.addr).as_bytes(),
        WAIT,
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.head);
    assert_eq!(ok.body, b"xxx");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_carries_exact_bytes_and_half_close() {
    let echo = echo_after_eof().await;
    let (_app, p, admin) = proxy("allow = [\"127.0.0.1:*\"]", "").await;
    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Read the 200 head byte by byte: nothing of the tunnel may be eaten.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(WAIT, s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // 1 MiB of every byte value, then our FIN; the echo comes back after.
    let data: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i * 7 % 251) as u8).collect();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "tunnelled bytes differ");
    // Counted once the tunnel is closed.
    let mut up = 0.0;
    for _ in 0..50 {
        up = metric(
            admin,
            "loopmux_forward_tunnel_bytes_total",
            &[("listener", "fwd"), ("direction", "upstream")],
        )
        .await;
        if up > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(up, data.len() as f64);
    assert_eq!(
        metric(
            admin,
            "loopmux_forward_tunnel_connections_total",
            &[("listener", "fwd")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_https_through_connect_and_a_refused_dial() {
    let ca = Ca::new("forward test CA");
    let dir = Dir::new();
    let ca_file = dir.write("ca.pem", &ca.pem);
    let o = tls_origin(&ca).await;
    let (_app, p, _admin) = proxy("allow = [\"localhost:*\", \"127.0.0.1:*\"]", "").await;
    let url = format!("https://localhost:{}/headers", o.addr.port());
    let (code, out, err) = curl(&["-x", &format!("http://{p}"), "--cacert", &ca_file, &url]).await;
    assert_eq!(code, 0, "{err}");
    // End-to-end TLS through the tunnel: curl and the origin chose h2
    // between themselves.
    assert!(out.starts_with("GET https://localhost:"), "{out}");
    assert!(out.contains("/headers HTTP/2.0"), "{out}");
    // `https_proxy` in the environment.
    let env_out = tokio::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "20",
            "--cacert",
            &ca_file,
        ])
        .arg(&url)
        .env("https_proxy", format!("http://{p}"))
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .output()
        .await
        .unwrap();
    assert!(env_out.status.success(), "{env_out:?}");
    // A CONNECT whose dial is refused: 502 that names the errno.
    let (_guard, refusing) = refusing_addr();
    let seen = exchange(
        p,
        format!("CONNECT {refusing} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        WAIT,
    )
    .await;
    assert_eq!(seen.status, 502, "{}", seen.head);
    let body = String::from_utf8_lossy(&seen.body);
    assert!(body.contains("ECONNREFUSED"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_requests_get_tls_originated_and_pooled() {
    let ca = Ca::new("forward test CA");
    let dir = Dir::new();
    let ca_file = dir.write("ca.pem", &ca.pem);
    let o = tls_origin(&ca).await;
    let port = o.addr.port();
    let (_app, p, admin) = proxy(
        "allow = [\"localhost:*\"]\noriginate_tls = [\"localhost:*\"]",
        &format!("[forward_defaults]\nmax_connections = 1\ntls = {{ ca_file = \"{ca_file}\" }}"),
    )
    .await;
    // Plain http:// from the app; TLS from loopmux (the origin speaks
    // only TLS, so a 200 proves it).
    for _ in 0..10 {
        let (code, out, err) = curl(&[
            "-x",
            &format!("http://{p}"),
            &format!("http://localhost:{port}/headers"),
        ])
        .await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("GET /headers"), "{out}");
    }
    // An https:// target in absolute form (some clients send these).
    let seen = exchange(
        p,
        format!("GET https://localhost:{port}/bytes/5 HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        WAIT,
    )
    .await;
    assert_eq!(seen.status, 200, "{}", seen.head);
    // 11 requests from 11 client connections: TLS handshakes only for the
    // pooled connections (one per address localhost resolves to that
    // answers, at most).
    let accepted = o.stats.accepted.load(Ordering::Relaxed);
    assert!((1..=2).contains(&accepted), "origin accepted {accepted}");
    let status: serde_json::Value = serde_json::from_str(&reqwest_status(admin).await).unwrap();
    let names: Vec<String> = status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        names.contains(&format!("https://localhost:{port}")),
        "{names:?}"
    );
}

async fn reqwest_status(admin: SocketAddr) -> String {
    let (code, out, err) = curl(&[&format!("http://{admin}/status")]).await;
    assert_eq!(code, 0, "{err}");
    out
}

/// Java's HttpURLConnection with `-Dhttp.proxyHost`/`-Dhttp.proxyPort`
/// (Debian's openjdk-17-jdk-headless), one new connection per request as
/// legacy apps do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_http_url_connection_through_the_proxy() {
    if std::process::Command::new("javac")
        .arg("-version")
        .output()
        .is_err()
    {
        if std::env::var_os("LOOPMUX_LAB_REQUIRED").is_some() {
            panic!("javac is missing: scripts/setup-test-deps installs openjdk-17-jdk-headless");
        }
        eprintln!("SKIPPED java_http_url_connection_through_the_proxy: no javac (install openjdk-17-jdk-headless)");
        return;
    }
    let o = origin().await;
    let (_app, p, _admin) = proxy(
        "allow = [\"127.0.0.1:*\"]\nvia = true",
        "[forward_defaults]\nmax_connections = 2",
    )
    .await;
    let dir = Dir::new();
    let src = dir.write(
        "ProxyClient.java",
        r#"
import java.io.InputStream;
import java.net.HttpURLConnection;
import java.net.URL;

public class ProxyClient {
    public static void main(String[] args) throws Exception {
        int n = Integer.parseInt(args[1]);
        int ok = 0;
        String via = null;
        for (int i = 0; i < n; i++) {
            HttpURLConnection c = (HttpURLConnection) new URL(args[0]).openConnection();
            c.setRequestProperty("Connection", "close");
            int status = c.getResponseCode();
            try (InputStream in = c.getInputStream()) { in.readAllBytes(); }
            via = c.getHeaderField("Via");
            c.disconnect();
            if (status == 200) ok++;
        }
        System.out.println("ok=" + ok + " via=" + via);
    }
}
"#,
    );
    let javac = std::process::Command::new("javac")
        .args(["-d", &dir.0.display().to_string(), &src])
        .output()
        .unwrap();
    assert!(javac.status.success(), "{javac:?}");
    let out = tokio::process::Command::new("java")
        .args([
            "-cp",
            &dir.0.display().to_string(),
            &format!("-Dhttp.proxyHost={}", p.ip()),
            &format!("-Dhttp.proxyPort={}", p.port()),
            // Java skips proxies for 127.* by default; this origin is there.
            "-Dhttp.nonProxyHosts=",
            "ProxyClient",
            &format!("http://{}/bytes/64", o.addr),
            "200",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("ok=200 via=1.1 loopmux"), "{stdout}");
    let accepted = o.stats.accepted.load(Ordering::Relaxed);
    assert!((1..=2).contains(&accepted), "origin accepted {accepted}");
}

/// Opens a CONNECT tunnel to `to` and returns the stream after the `200`.
async fn open_tunnel(proxy: SocketAddr, to: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(WAIT, s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_after_idle_timeout_and_a_busy_one_is_not() {
    let echo = echo_after_eof().await;
    let (_app, p, admin) = proxy(
        "allow = [\"127.0.0.1:*\"]",
        "[forward_defaults]\nidle_timeout = \"400ms\"",
    )
    .await;
    // Bytes every 100 ms for 1.2 s (three idle timeouts): it stays open.
    let mut busy = open_tunnel(p, echo).await;
    for _ in 0..12 {
        busy.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    busy.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, busy.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"xxxxxxxxxxxx");
    // Silent: loopmux closes it (the echo server would wait forever).
    let mut idle = open_tunnel(p, echo).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, idle.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle tunnel stayed open");
    assert_eq!(
        metric(
            admin,
            "loopmux_forward_tunnel_closed_by_loopmux_total",
            &[("listener", "fwd")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_waits_for_a_tunnel_then_cuts_it() {
    let echo = echo_after_eof().await;
    let (app, p, _admin) = proxy("allow = [\"127.0.0.1:*\"]", "").await;
    let mut t = open_tunnel(p, echo).await;
    // The tunnel is open and silent: the drain cannot finish cleanly.
    let clean = app.stop(Duration::from_millis(500)).await;
    assert!(!clean, "the drain should report the tunnel it had to cut");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, t.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the tunnel survived the drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_a_new_allow_list_and_a_change_of_mode() {
    let o = origin().await;
    let cfg = |mode_keys: &str| {
        loopmux::config::load_str(
            &format!(
                "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n{mode_keys}\n\n[[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\n",
                o.addr
            ),
            Default::default(),
        )
        .unwrap()
    };
    let first = cfg("mode = \"forward\"\nallow = [\"192.0.2.1:80\"]");
    let bound = loopmux::app::bind_all(&first).unwrap();
    let mut app = loopmux::app::App::start(first, bound).await.unwrap();
    let p = app.local_addrs()[0];
    let absolute = format!("GET http://{}/bytes/2 HTTP/1.1\r\nHost: x\r\n\r\n", o.addr);
    assert_eq!(exchange(p, absolute.as_bytes(), WAIT).await.status, 403);

    app.reload(cfg(&format!(
        "mode = \"forward\"\nallow = [\"{}\"]",
        o.addr
    )))
    .await
    .unwrap();
    assert_eq!(app.local_addrs()[0], p, "the socket is kept");
    assert_eq!(exchange(p, absolute.as_bytes(), WAIT).await.status, 200);

    // forward → http on the same socket: origin-form now goes to `u`.
    app.reload(cfg("upstream = \"u\"")).await.unwrap();
    assert_eq!(app.local_addrs()[0], p);
    let direct = exchange(p, b"GET /bytes/4 HTTP/1.1\r\nHost: x\r\n\r\n", WAIT).await;
    assert_eq!(direct.status, 200, "{}", direct.head);
    assert_eq!(direct.body, b"xxxx");
    app.stop(Duration::from_secs(2)).await;
}

/// A reload that changes `forward_defaults` (here `queue_timeout`, and then
/// the allow list) reconfigures each origin's pool in place: with
/// `max_connections = 1` and a slow request in flight across the reload,
/// the next request waits for that one connection instead of opening a
/// second (it opened one: the origins were dropped and rebuilt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_each_origin_under_max_connections() {
    let o = origin().await;
    let cfg = |queue: &str, allow: &str| {
        loopmux::config::load_str(
            &format!(
                "[[listener]]\nname = \"fwd\"\nbind = \"127.0.0.1:0\"\nmode = \"forward\"\nallow = [{allow}]\n\n\
                 [forward_defaults]\nmax_connections = 1\nqueue_timeout = \"{queue}\"\n"
            ),
            Default::default(),
        )
        .unwrap()
    };
    let allow = format!("\"{}\"", o.addr);
    let first = cfg("5s", &allow);
    let bound = loopmux::app::bind_all(&first).unwrap();
    let mut app = loopmux::app::App::start(first, bound).await.unwrap();
    let p = app.local_addrs()[0];
    let get = |path: &str| format!("GET http://{}{path} HTTP/1.1\r\nHost: x\r\n\r\n", o.addr);
    assert_eq!(
        exchange(p, get("/bytes/1").as_bytes(), WAIT).await.status,
        200
    );

    for (queue, allow) in [
        ("6s", allow.clone()),
        ("7s", format!("{allow}, \"192.0.2.1:80\"")),
    ] {
        let slow = get("/slow/1500");
        let in_flight = tokio::spawn(async move { exchange(p, slow.as_bytes(), WAIT).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.reload(cfg(queue, &allow)).await.unwrap();
        let next = exchange(p, get("/bytes/3").as_bytes(), WAIT).await;
        assert_eq!(next.status, 200, "after the reload: {}", next.head);
        assert_eq!(
            in_flight.await.unwrap().status,
            200,
            "the request in flight"
        );
        let peak = o.stats.peak_active.load(Ordering::Relaxed);
        assert_eq!(
            peak, 1,
            "queue_timeout {queue}: {peak} origin connections at once"
        );
    }
    assert_eq!(
        o.stats.accepted.load(Ordering::Relaxed),
        1,
        "the pool's connection was kept"
    );
    app.stop(Duration::from_secs(2)).await;
}

/// Per-source figures are each origin's own: two origins holding 2 and 3
/// connections from two source addresses show 2 and 3 in
/// `loopmux_source_connections_active` (summed over sources; each source's
/// figure as `ss` counts it), a CONNECT origin whose tunnel has closed
/// shows 0, and the `EADDRNOTAVAIL` of a source not on this host counts
/// only under the origin whose dial hit it. (Every origin showed the
/// listener's totals: 5, 5, and 5.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_metrics_are_per_origin() {
    let a = origin().await;
    let b = origin().await;
    let (_guard, c) = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    drop(s);
                }
            }),
            addr,
        )
    };
    let (_app, p, admin) = proxy(
        "allow = [\"127.0.0.1:*\"]",
        "[forward_defaults]\nsource_addresses = [\"198.18.0.77\", \"127.0.0.2\", \"127.0.0.3\"]\nfailure_backoff = \"10m\"",
    )
    .await;
    let slow = |o: SocketAddr, n: usize| async move {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let r = format!("GET http://{o}/slow/400 HTTP/1.1\r\nHost: x\r\n\r\n");
                tokio::spawn(async move { exchange(p, r.as_bytes(), WAIT).await.status })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
    };
    slow(a.addr, 2).await;
    slow(b.addr, 3).await;
    let mut tunnel = open_tunnel(p, c).await;
    let _ = tunnel.read(&mut [0u8; 1]).await;
    drop(tunnel);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let ss = |src: &str, dst: SocketAddr| {
        let out = std::process::Command::new("ss")
            .args([
                "-Htn",
                "state",
                "established",
                "src",
                src,
                "dst",
                &dst.to_string(),
            ])
            .output()
            .expect("ss (iproute2)");
        String::from_utf8_lossy(&out.stdout).lines().count() as f64
    };
    for (o, want) in [(a.addr, 2.0), (b.addr, 3.0), (c, 0.0)] {
        let upstream = format!("http://{o}");
        let mut total = 0.0;
        for src in ["127.0.0.2", "127.0.0.3"] {
            let m = metric(
                admin,
                "loopmux_source_connections_active",
                &[("upstream", &upstream), ("source", src)],
            )
            .await;
            assert_eq!(m, ss(src, o), "{upstream} from {src}: metric against ss");
            total += m;
        }
        assert_eq!(total, want, "{upstream}: open connections over its sources");
    }
    let unassigned = |o: SocketAddr| {
        let upstream = format!("http://{o}");
        async move {
            metric(
                admin,
                "loopmux_source_eaddrnotavail_total",
                &[("upstream", &upstream), ("source", "198.18.0.77")],
            )
            .await
        }
    };
    // The first dial of the listener tried 198.18.0.77 (not on this host)
    // and failed over; it then backs off for every origin.
    assert_eq!(unassigned(a.addr).await, 1.0);
    assert_eq!(unassigned(b.addr).await, 0.0);
    assert_eq!(unassigned(c).await, 0.0);
}

/// One client connection, requests to two origins (one over IPv6): each
/// goes to its own origin, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_on_one_connection_go_to_their_own_origins() {
    let a = origin().await;
    let Ok(b) = Origin::start("[::1]:0".parse().unwrap()).await else {
        eprintln!("SKIPPED the IPv6 half: ::1 cannot be bound here");
        return;
    };
    let (_app, p, _admin) = proxy("allow = [\"127.0.0.1:*\", \"[::1]:*\"]", "").await;
    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(
        format!(
            "GET http://{}/bytes/3 HTTP/1.1\r\nHost: x\r\n\r\nGET http://[::1]:{}/bytes/5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            a.addr,
            b.addr.port()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
    // In order: 3 bytes from the first origin, then 5 from the second.
    let first = out.find("\r\n3\r\nxxx\r\n").expect("first body");
    let second = out.find("\r\n5\r\nxxxxx\r\n").expect("second body");
    assert!(first < second, "{out}");
    assert_eq!(a.stats.requests.load(Ordering::Relaxed), 1);
    assert_eq!(b.stats.requests.load(Ordering::Relaxed), 1);
}

/// Peers that vanish in the middle of a tunnel: the other side is closed,
/// nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_ends_when_either_peer_vanishes() {
    // The origin resets after the first bytes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let resetting = l.local_addr().unwrap();
    let (saw_eof_tx, mut saw_eof) = tokio::sync::mpsc::channel::<()>(4);
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = l.accept().await {
            n += 1;
            if n == 1 {
                let mut b = [0u8; 4];
                let _ = s.read_exact(&mut b).await;
                // SO_LINGER 0: close sends RST.
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                drop(s);
            } else {
                // Waits for the client side to vanish.
                let tx = saw_eof_tx.clone();
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    // EOF or a reset: either way the side is closed.
                    let _ = s.read_to_end(&mut sink).await;
                    let _ = tx.send(()).await;
                });
            }
        }
    });
    let (_app, p, _admin) = proxy("allow = [\"127.0.0.1:*\"]", "").await;

    let mut t = open_tunnel(p, resetting).await;
    t.write_all(b"ping").await.unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, t.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the client was left hanging after the origin reset"
    );

    // The client resets: the origin's side is closed too.
    let t = open_tunnel(p, resetting).await;
    socket2::SockRef::from(&t)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(t);
    let seen = tokio::time::timeout(WAIT, saw_eof.recv()).await;
    assert!(
        matches!(seen, Ok(Some(()))),
        "the origin's side stayed open after the client vanished"
    );
}

/// `0.0.0.0/8` and `::` connect to this host: under the shipped
/// config/forward.toml's rules (loopback denied, everything else allowed)
/// every form of them is refused, a request to the proxy's own port through
/// them is a loop, and the services on loopback never see a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unspecified_addresses_are_this_host_for_the_allow_list_and_the_loop_guard() {
    let v4 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let v6 = TcpListener::bind("[::1]:0").await.ok();
    let (_app, p, admin) = proxy("allow = [\"!127.0.0.0/8:*\", \"![::1]:*\", \"*:*\"]", "").await;
    let port = v4.local_addr().unwrap().port();
    let own = p.port();
    let get = |target: String| format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
    let connect = |target: String| format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let mut cases = vec![
        (
            "0.0.0.0",
            get(format!("http://0.0.0.0:{port}/")),
            403,
            "denied",
        ),
        (
            "0.x.y.z",
            get(format!("http://0.1.2.3:{port}/")),
            403,
            "denied",
        ),
        (
            "mapped",
            get(format!("http://[::ffff:0.0.0.0]:{port}/")),
            403,
            "denied",
        ),
        (
            "CONNECT 0.0.0.0",
            connect(format!("0.0.0.0:{port}")),
            403,
            "denied",
        ),
        (
            "own port via 0.0.0.0",
            get(format!("http://0.0.0.0:{own}/")),
            508,
            "loop",
        ),
        (
            "CONNECT own port via 0.0.0.0",
            connect(format!("0.0.0.0:{own}")),
            508,
            "loop",
        ),
        (
            "own port via [::]",
            get(format!("http://[::]:{own}/")),
            508,
            "loop",
        ),
    ];
    if let Some(l) = &v6 {
        let p6 = l.local_addr().unwrap().port();
        cases.push(("[::]", get(format!("http://[::]:{p6}/")), 403, "denied"));
        cases.push(("CONNECT [::]", connect(format!("[::]:{p6}")), 403, "denied"));
    } else {
        eprintln!("SKIPPED the [::] service cases: ::1 cannot be bound here");
    }
    for (name, request, status, kind) in &cases {
        let seen = exchange(p, request.as_bytes(), WAIT).await;
        let body = String::from_utf8_lossy(&seen.body).into_owned();
        assert_eq!(seen.status, *status, "{name}: {}{body}", seen.head);
        assert_eq!(
            seen.header("x-loopmux-error").as_deref(),
            Some(*kind),
            "{name}"
        );
        if *kind == "denied" {
            assert!(body.contains("connects to this host"), "{name}: {body}");
            assert!(
                body.contains("!127.0.0.0/8:*") || body.contains("![::1]:*"),
                "{name}: {body}"
            );
        }
    }
    assert!(
        never(&v4).await,
        "a refused request reached the loopback service"
    );
    if let Some(l) = &v6 {
        assert!(
            never(l).await,
            "a refused request reached the [::1] service"
        );
    }
    let loops = metric(
        admin,
        "loopmux_forward_refused_total",
        &[("listener", "fwd"), ("reason", "loop")],
    )
    .await;
    assert_eq!(loops, 3.0);
}

/// Whether `l` sees no connection within 300 ms.
async fn never(l: &TcpListener) -> bool {
    tokio::time::timeout(Duration::from_millis(300), l.accept())
        .await
        .is_err()
}

/// A name that resolves to `0.0.0.0` (an /etc/hosts entry, in a network
/// namespace of the test's own: `ip netns exec` mounts
/// /etc/netns/NAME/hosts over /etc/hosts for the loopmux it starts) is
/// refused as the address itself is, for requests and CONNECT.
#[test]
fn a_name_resolving_to_this_host_is_refused() {
    use support::netns::{in_netns, may_run, runtime, KillOnDrop, Ns};
    if !may_run(
        "a_name_resolving_to_this_host_is_refused",
        &[("ip", "iproute2")],
    ) {
        return;
    }
    let ns = Ns::new(format!("lmx-fwd0-{}", std::process::id()));
    ns.exec(&["ip", "link", "set", "lo", "up"]).unwrap();
    let etc = format!("/etc/netns/{}", ns.0);
    std::fs::create_dir_all(&etc).unwrap();
    struct Rm(String);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _etc = Rm(etc.clone());
    std::fs::write(
        format!("{etc}/hosts"),
        "127.0.0.1 localhost\n0.0.0.0 zero.test\n:: zero6.test\n",
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("lmx-fwd0-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _dir = Rm(dir.display().to_string());
    let config = dir.join("loopmux.toml");
    let proxy_port = support::free_port();
    std::fs::write(
        &config,
        format!("[[listener]]\nname = \"fwd\"\nbind = \"127.0.0.1:{proxy_port}\"\nmode = \"forward\"\nallow = [\"!127.0.0.0/8:*\", \"![::1]:*\", \"*:*\"]\n"),
    )
    .unwrap();
    let ns_name = ns.0.clone();
    let result = in_netns(&ns.0, move || {
        runtime().block_on(async move {
            let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = service.local_addr().unwrap().port();
            let _lm = KillOnDrop(
                std::process::Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &ns_name,
                        env!("CARGO_BIN_EXE_loopmux"),
                        "run",
                        "--config",
                    ])
                    .arg(&config)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            let p: SocketAddr = format!("127.0.0.1:{proxy_port}").parse().unwrap();
            for _ in 0..200 {
                if TcpStream::connect(p).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let requests = [
                format!("GET http://zero.test:{port}/ HTTP/1.1\r\nHost: zero.test\r\n\r\n"),
                format!("CONNECT zero.test:{port} HTTP/1.1\r\nHost: zero.test\r\n\r\n"),
                format!("GET http://zero6.test:{port}/ HTTP/1.1\r\nHost: zero6.test\r\n\r\n"),
            ];
            let mut seen = Vec::new();
            for r in &requests {
                let s = exchange(p, r.as_bytes(), WAIT).await;
                seen.push((
                    s.status,
                    s.header("x-loopmux-error"),
                    String::from_utf8_lossy(&s.body).into_owned(),
                ));
            }
            let loop_seen = exchange(
                p,
                format!("GET http://zero.test:{proxy_port}/ HTTP/1.1\r\nHost: zero.test\r\n\r\n")
                    .as_bytes(),
                WAIT,
            )
            .await;
            let reached = tokio::time::timeout(Duration::from_millis(300), service.accept())
                .await
                .is_ok();
            (seen, loop_seen.status, reached)
        })
    })
    .join();
    drop(ns);
    let (seen, loop_status, reached) = result.expect("the namespace scenario panicked");
    for (i, (status, kind, body)) in seen.iter().enumerate() {
        assert_eq!(*status, 403, "request {i}: {body}");
        assert_eq!(kind.as_deref(), Some("denied"), "request {i}: {body}");
        assert!(
            body.contains("resolves to") && body.contains("connects to this host"),
            "request {i}: {body}"
        );
    }
    assert_eq!(
        loop_status, 508,
        "a name resolving to 0.0.0.0 on the proxy's own port"
    );
    assert!(!reached, "a refused request reached the loopback service");
}
