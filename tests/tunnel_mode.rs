//! The `tunnel` mode against third-party peers: Debian's nghttpx as an
//! HTTP/2 proxy (`--http2-proxy`, TLS) that hands each CONNECT to
//! tinyproxy, an HTTP/1 CONNECT proxy, in front of a TCP echo server.
//! Every client connection is one CONNECT stream; a few TLS connections
//! carry them all. Loopback only; each process is killed by its pid.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::netns::KillOnDrop;
use support::pki::{Ca, Dir};
use support::raw_upstream::metric;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

async fn wait_listening(addr: SocketAddr) {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

/// tinyproxy (HTTP/1 CONNECT) behind nghttpx (HTTP/2 proxy with TLS):
/// returns the processes and nghttpx's address.
async fn chain(dir: &Dir, ca: &Ca) -> (KillOnDrop, KillOnDrop, SocketAddr) {
    let tiny_port = free_port();
    // No ConnectPort line: CONNECT to any port (the echo server's).
    let conf = dir.write(
        "tinyproxy.conf",
        &format!(
            "Port {tiny_port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 200\nAllow 127.0.0.1\nLogLevel Error\nDisableViaHeader Yes\n"
        ),
    );
    let tiny = KillOnDrop(
        Command::new("tinyproxy")
            .args(["-d", "-c", &conf])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy is installed (.ci/run installs it)"),
    );
    wait_listening(format!("127.0.0.1:{tiny_port}").parse().unwrap()).await;
    let leaf = ca.server(&["localhost"], false);
    let h2_port = free_port();
    let nghttpx = KillOnDrop(
        Command::new("nghttpx")
            .arg("--conf=/dev/null")
            .arg("--http2-proxy")
            .arg(format!("--frontend=127.0.0.1,{h2_port}"))
            .arg(format!("--backend=127.0.0.1,{tiny_port}"))
            .args(["--workers=1", "--no-ocsp", "--errorlog-file=/dev/null"])
            // Each CONNECT is one backend connection to tinyproxy; the
            // default (8) would queue the test's 64 concurrent streams.
            .arg("--backend-connections-per-host=128")
            .arg(dir.write("server.key", &leaf.key_pem))
            .arg(dir.write("server.pem", &leaf.cert_pem))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nghttpx is installed (.ci/run installs nghttp2-proxy)"),
    );
    let addr: SocketAddr = format!("127.0.0.1:{h2_port}").parse().unwrap();
    wait_listening(addr).await;
    (tiny, nghttpx, addr)
}

/// Echoes bytes as they come. The third-party chain is not asked to carry
/// a half-close: tinyproxy closes both ways on the first FIN.
async fn echo_streaming() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A tunnel listener `t` to `target` through the h2 proxy at `peer`
/// (TLS, `max_connections = 2`), with `listener_extra` lines.
fn tunnel_config(
    target: SocketAddr,
    peer: SocketAddr,
    ca_file: &str,
    listener_extra: &str,
) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tunnel\"\nupstream = \"peer\"\ntarget = \"{target}\"\n{listener_extra}\n\
         [[upstream]]\nname = \"peer\"\nendpoints = [\"{peer}\"]\nprotocol = \"http2\"\nmax_connections = 2\n\
         tls = {{ ca_file = \"{ca_file}\", server_name = \"localhost\" }}\n"
    )
}

/// Writes `data` and reads as many bytes back, concurrently.
async fn round_trip(p: SocketAddr, data: Vec<u8>) -> bool {
    let s = TcpStream::connect(p).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let n = data.len();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        (w, data)
    });
    let mut back = vec![0u8; n];
    tokio::time::timeout(WAIT, r.read_exact(&mut back))
        .await
        .expect("echo within 10 s")
        .unwrap();
    let (_w, data) = writer.await.unwrap();
    back == data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_through_nghttpx_and_tinyproxy() {
    let echo = echo_streaming().await;
    let dir = Dir::new();
    let ca = Ca::new("tunnel test CA");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let (_tiny, _nghttpx, peer) = chain(&dir, &ca).await;
    let (app, p) = start(&tunnel_config(echo, peer, &ca_file, "")).await;
    let admin = app.admin_addr.unwrap();

    // One large stream, exact both ways.
    let data: Vec<u8> = (0..(2 << 20)).map(|i: u32| (i * 31 % 256) as u8).collect();
    assert!(round_trip(p, data).await, "tunnelled bytes differ");

    // 64 client connections at once, 16 KB each: all over ≤ 2 TLS
    // connections.
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        tasks.push(tokio::spawn(async move {
            let msg: Vec<u8> = (0..16_384u32).map(|j| ((i + j) % 251) as u8).collect();
            round_trip(p, msg).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "a concurrent stream came back different");
    }
    let connects = app.upstreams()[0]
        .endpoints()
        .iter()
        .map(|e| e.connects.load(std::sync::atomic::Ordering::Relaxed))
        .sum::<u64>();
    assert!(
        (1..=2).contains(&connects),
        "TLS connections dialed: {connects}"
    );
    assert_eq!(
        metric(admin, "loopmux_tcp_connections_total", &[("listener", "t")]).await,
        65.0
    );
}

/// A CONNECT the peer refuses (tinyproxy cannot reach the target): the
/// client connection is closed, or reset with on_connect_error = "reset".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_closes_the_client() {
    let dir = Dir::new();
    let ca = Ca::new("tunnel test CA");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let (_tiny, _nghttpx, peer) = chain(&dir, &ca).await;
    let (_guard, refusing) = refusing_addr();
    for (action, reset) in [("close", false), ("reset", true)] {
        let toml = format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tunnel\"\nupstream = \"peer\"\ntarget = \"{refusing}\"\non_connect_error = \"{action}\"\n\n\
             [[upstream]]\nname = \"peer\"\nendpoints = [\"{peer}\"]\nprotocol = \"http2\"\n\
             tls = {{ ca_file = \"{ca_file}\", server_name = \"localhost\" }}\n"
        );
        let (app, p) = start(&toml).await;
        let r = connect_and_read_to_end(p, WAIT).await;
        if reset {
            assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
        } else {
            assert!(matches!(&r, Ok(out) if out.is_empty()), "{r:?}");
        }
        assert_eq!(
            metric(
                app.admin_addr.unwrap(),
                "loopmux_tcp_connect_failures_total",
                &[("listener", "t")]
            )
            .await,
            1.0
        );
    }
}

/// Short connections (ping, pong, close) through a far end that does not
/// pass a half-close on (nghttpx in front of tinyproxy): each stream stays
/// open after the client's FIN until `half_close_timeout`. At 1 s, 300
/// connections 16 at a time all get their answer and every stream is gone
/// soon after; at the fixed 60 s of before, most were reset (early EOF)
/// once streams piled up on the far end's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_timeout_frees_streams_behind_a_far_end_that_keeps_them() {
    let echo = echo_streaming().await;
    let dir = Dir::new();
    let ca = Ca::new("tunnel test CA");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let (_tiny, _nghttpx, peer) = chain(&dir, &ca).await;
    let (app, p) = start(&tunnel_config(
        echo,
        peer,
        &ca_file,
        "half_close_timeout = \"1s\"\n",
    ))
    .await;
    let admin = app.admin_addr.unwrap();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let ping = format!("ping {i:04}\n").into_bytes();
            round_trip(p, ping).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "a short connection's answer differed");
    }
    let mut open = f64::NAN;
    for _ in 0..40 {
        open = metric(
            admin,
            "loopmux_tcp_connections_active",
            &[("listener", "t")],
        )
        .await;
        if open == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(open, 0.0, "streams still open after the half-close timeout");
}
