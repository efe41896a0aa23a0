//! The serve role (`[serve]`) as the far end of `tunnel`: mTLS, HTTP/2
//! CONNECT streams to allowed targets, END_STREAM as half-close, refusals
//! on one stream while the connection carries on. Two loopmux instances on
//! loopback: the tunnel client and the serve role.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::pki::{Ca, Dir};
use support::raw_upstream::metric;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

struct Pki {
    _dir: Dir,
    ca_file: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    let dir = Dir::new();
    let ca = Ca::new("serve test CA");
    let server = ca.server(&["localhost"], false);
    let client = ca.client("tunnel-client");
    Pki {
        ca_file: dir.write("ca.pem", &ca.pem),
        server_cert: dir.write("server.pem", &server.cert_pem),
        server_key: dir.write("server.key", &server.key_pem),
        client_cert: dir.write("client.pem", &client.cert_pem),
        client_key: dir.write("client.key", &client.key_pem),
        _dir: dir,
    }
}

/// The serve role allowing `allow`; returns the app, its address and its
/// admin address.
async fn serve_role(p: &Pki, allow: &str) -> (loopmux::app::App, SocketAddr, SocketAddr) {
    let toml = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[serve]\nbind = \"127.0.0.1:0\"\nallow = [{allow}]\n\
         tls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\" }}\n",
        p.server_cert, p.server_key, p.ca_file
    );
    let (app, addr) = start(&toml).await;
    let admin = app.admin_addr.unwrap();
    (app, addr, admin)
}

/// A tunnel listener to `target` through the serve role at `peer`.
async fn tunnel(
    p: &Pki,
    peer: SocketAddr,
    target: SocketAddr,
    client_cert: bool,
) -> (loopmux::app::App, SocketAddr) {
    let identity = if client_cert {
        format!(
            ", client_cert = \"{}\", client_key = \"{}\"",
            p.client_cert, p.client_key
        )
    } else {
        String::new()
    };
    let toml = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tunnel\"\nupstream = \"peer\"\ntarget = \"{target}\"\n\n\
         [[upstream]]\nname = \"peer\"\nendpoints = [\"{peer}\"]\nprotocol = \"http2\"\nmax_connections = 2\n\
         tls = {{ ca_file = \"{}\", server_name = \"localhost\"{identity} }}\n",
        p.ca_file
    );
    start(&toml).await
}

async fn exchange_half_closed(p: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(p).await?;
    s.write_all(data).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut back))
        .await
        .expect("an answer or a close within 10 s")?;
    Ok(back)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_carry_exact_bytes_and_half_close_over_few_connections() {
    let pki = pki();
    let echo = echo_after_eof().await;
    let (_serve, peer, serve_admin) = serve_role(&pki, &format!("\"{echo}\"")).await;
    let (client, p) = tunnel(&pki, peer, echo, true).await;

    // The echo answers only after our FIN: END_STREAM carried it.
    let data: Vec<u8> = (0..(4 << 20)).map(|i: u32| (i * 29 % 256) as u8).collect();
    let back = exchange_half_closed(p, &data).await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "tunnelled bytes differ");

    let mut tasks = Vec::new();
    for i in 0..100u32 {
        tasks.push(tokio::spawn(async move {
            let msg: Vec<u8> = (0..8_192u32).map(|j| ((i * 7 + j) % 253) as u8).collect();
            exchange_half_closed(p, &msg).await.unwrap() == msg
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "a concurrent stream came back different");
    }
    let connects: u64 = client.upstreams()[0]
        .endpoints()
        .iter()
        .map(|e| e.connects.load(Ordering::Relaxed))
        .sum();
    assert!((1..=2).contains(&connects), "TLS connections: {connects}");
    let target = echo.to_string();
    assert_eq!(
        metric(
            serve_admin,
            "loopmux_serve_streams_total",
            &[("target", &target)]
        )
        .await,
        101.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_leaves_the_connection_and_its_other_streams_alone() {
    let pki = pki();
    let echo = echo_after_eof().await;
    let (_guard, refusing) = refusing_addr();
    let denied: SocketAddr = "127.0.0.1:9".parse().unwrap();
    // The refusing address is allowed (so 502), port 9 is not (so 403).
    let (_serve, peer, serve_admin) =
        serve_role(&pki, &format!("\"{echo}\", \"{refusing}\"")).await;
    // Three tunnel listeners on one upstream with one connection: every
    // stream shares it.
    let listener = |name: &str, target: SocketAddr| {
        format!("[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nmode = \"tunnel\"\nupstream = \"peer\"\ntarget = \"{target}\"\n\n")
    };
    let toml = format!(
        "{}{}{}[[upstream]]\nname = \"peer\"\nendpoints = [\"{peer}\"]\nprotocol = \"http2\"\nmax_connections = 1\n\
         tls = {{ ca_file = \"{}\", server_name = \"localhost\", client_cert = \"{}\", client_key = \"{}\" }}\n",
        listener("ok", echo),
        listener("unreachable", refusing),
        listener("denied", denied),
        pki.ca_file,
        pki.client_cert,
        pki.client_key
    );
    let (client, _) = start(&toml).await;
    let addrs = client.local_addrs();
    // A long stream stays open while the others are refused.
    let mut long = TcpStream::connect(addrs[0]).await.unwrap();
    long.write_all(b"first half ").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (p, reason) in [(addrs[1], "unreachable"), (addrs[2], "denied")] {
        let back = exchange_half_closed(p, b"x").await.unwrap_or_default();
        assert!(back.is_empty(), "a refused stream carried bytes");
        assert_eq!(
            metric(
                serve_admin,
                "loopmux_serve_refused_total",
                &[("reason", reason)]
            )
            .await,
            1.0,
            "{reason}"
        );
    }
    long.write_all(b"second half").await.unwrap();
    long.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, long.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"first half second half");
    // And a new stream after the refusals, on the same connection.
    assert_eq!(
        exchange_half_closed(addrs[0], b"again").await.unwrap(),
        b"again"
    );
    let connects: u64 = client.upstreams()[0]
        .endpoints()
        .iter()
        .map(|e| e.connects.load(Ordering::Relaxed))
        .sum();
    assert_eq!(connects, 1, "the refusals cost the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let pki = pki();
    let echo = echo_after_eof().await;
    let (_serve, peer, serve_admin) = serve_role(&pki, &format!("\"{echo}\"")).await;
    let (client, p) = tunnel(&pki, peer, echo, false).await;
    let back = exchange_half_closed(p, b"hello").await.unwrap_or_default();
    assert!(back.is_empty(), "an unauthenticated client got through");
    assert!(metric(serve_admin, "loopmux_serve_handshake_failures_total", &[]).await >= 1.0);
    assert_eq!(
        metric(
            client.admin_addr.unwrap(),
            "loopmux_tcp_connect_failures_total",
            &[("listener", "t")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serve_drain_cuts_open_streams_at_the_deadline() {
    let pki = pki();
    let echo = echo_after_eof().await;
    let (serve, peer, _) = serve_role(&pki, &format!("\"{echo}\"")).await;
    let (_client, p) = tunnel(&pki, peer, echo, true).await;
    let mut s = TcpStream::connect(p).await.unwrap();
    s.write_all(b"never finished").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !serve.stop(Duration::from_millis(300)).await,
        "an open stream was not reported"
    );
    let mut rest = Vec::new();
    let r = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
    assert!(
        r.is_ok(),
        "the tunnel client was left hanging after the far end was cut"
    );
}

#[test]
fn serve_config_mistakes_are_named() {
    let pki = pki();
    let tls_full = format!(
        "tls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\" }}",
        pki.server_cert, pki.server_key, pki.ca_file
    );
    let tls_no_ca = format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}",
        pki.server_cert, pki.server_key
    );
    let ok = format!("[serve]\nbind = \"127.0.0.1:0\"\nallow = [\"a.b:1\"]\n{tls_full}\n");
    loopmux::config::load_str(&ok, Default::default()).expect("a serve-only config is valid");
    let unauth = format!("[serve]\nbind = \"127.0.0.1:0\"\nallow = [\"a.b:1\"]\nallow_unauthenticated = true\n{tls_no_ca}\n");
    loopmux::config::load_str(&unauth, Default::default()).expect("explicitly unauthenticated");
    let cases = [
        (
            format!("[serve]\nbind = \"127.0.0.1:0\"\nallow = [\"a.b:1\"]\n{tls_no_ca}\n"),
            "serve.tls.client_ca: is required",
        ),
        (
            "[serve]\nbind = \"127.0.0.1:0\"\nallow = [\"a.b:1\"]\n".to_string(),
            "serve.tls: is required",
        ),
        (
            format!("[serve]\nbind = \"127.0.0.1:0\"\nallow = []\n{tls_full}\n"),
            "serve.allow: is required",
        ),
        (
            format!("[serve]\nbind = \"0.0.0.0:8443\"\nallow = [\"a.b:1\"]\n{tls_full}\n"),
            "serve.allow_remote = true",
        ),
        (
            format!("[serve]\nbind = \"127.0.0.1:0\"\nallow = [\"a.b:1\"]\nallow_unauthenticated = true\n{tls_full}\n"),
            "serve.allow_unauthenticated: contradicts tls.client_ca",
        ),
        (
            format!("[serve]\nbind = \"127.0.0.1:0\"\nallow = [\"a.b:1\"]\ntls = {{ cert = \"/nonexistent.pem\", key = \"{}\", client_ca = \"{}\" }}\n", pki.server_key, pki.ca_file),
            "serve.tls.cert: cannot read /nonexistent.pem",
        ),
        (
            "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tunnel\"\nupstream = \"u\"\ntarget = \"a.b:1\"\n\n[[upstream]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n".to_string(),
            "needs protocol = \"http2\"",
        ),
        (
            "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tunnel\"\nupstream = \"u\"\n\n[[upstream]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\nprotocol = \"http2\"\n".to_string(),
            "listener[0].target: is required",
        ),
    ];
    for (toml, want) in cases {
        let e = loopmux::config::load_str(&toml, Default::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(want), "{want}: {e}");
    }
}

/// `0.0.0.0` is this host for the serve role too: with loopback denied and
/// everything else allowed, `CONNECT 0.0.0.0:<a loopback service>` is
/// refused and `CONNECT 0.0.0.0:<serve's own port>` as well (it was 200
/// where `127.0.0.1` got 403); the service never sees a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unspecified_targets_are_this_host() {
    let pki = pki();
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = service.local_addr().unwrap().port();
    let (_serve, peer, serve_admin) =
        serve_role(&pki, "\"!127.0.0.0/8:*\", \"![::1]:*\", \"*:*\"").await;
    for target in [
        format!("0.0.0.0:{port}"),
        format!("0.0.0.0:{}", peer.port()),
        format!("0.1.2.3:{port}"),
    ] {
        let (_client, p) = tunnel(&pki, peer, target.parse().unwrap(), true).await;
        let back = exchange_half_closed(p, b"x").await.unwrap_or_default();
        assert!(back.is_empty(), "{target}: a refused stream carried bytes");
    }
    assert_eq!(
        metric(
            serve_admin,
            "loopmux_serve_refused_total",
            &[("reason", "denied")]
        )
        .await,
        3.0
    );
    let reached = tokio::time::timeout(Duration::from_millis(300), service.accept())
        .await
        .is_ok();
    assert!(!reached, "a refused CONNECT reached the loopback service");
}
