//! Shared test helpers: start loopmux and origins in-process on port 0,
//! raw and real clients. Everything talks to loopback only.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use loopmux::app::App;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use loopmux::demo::origin::Origin;

pub mod netns;
pub mod pki;
pub mod raw_upstream;

/// Starts loopmux from TOML; every `bind` should be `127.0.0.1:0`.
pub async fn start(toml: &str) -> (App, SocketAddr) {
    let cfg = loopmux::config::load_str(toml, HashMap::new()).expect("test config is valid");
    let bound = loopmux::app::bind_all(&cfg).expect("bind");
    let app = App::start(cfg, bound).await.expect("start");
    let addr = app.local_addrs()[0];
    (app, addr)
}

pub async fn origin() -> Origin {
    Origin::start("127.0.0.1:0".parse().unwrap()).await.unwrap()
}

/// One listener `t` in front of one upstream `u` at `origin`, plus `extra`
/// lines appended to the `[[upstream]]` table.
pub fn one_upstream(origin: SocketAddr, listener_extra: &str, upstream_extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nupstream = \"u\"\n{listener_extra}\n\n[[upstream]]\nname = \"u\"\nendpoints = [\"{origin}\"]\n{upstream_extra}\n"
    )
}

/// As [`one_upstream`], plus an admin endpoint on a free port (for
/// `/metrics`).
pub fn one_upstream_with_admin(
    origin: SocketAddr,
    listener_extra: &str,
    upstream_extra: &str,
) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n{}",
        one_upstream(origin, listener_extra, upstream_extra)
    )
}

/// Sends raw bytes, reads until EOF (or `wait`), returns what came back.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs curl (a real third-party client) and returns (exit code, stdout, stderr).
pub async fn curl(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "20"])
        .args(args)
        .output()
        .await
        .expect("curl is installed (.ci/run installs it)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An address that refuses connections and that no other socket can take
/// while the returned guard lives: bound, never listening. (A listener that
/// was bound and dropped frees its port for the next `bind(:0)`, maybe our
/// own listener's.)
pub fn refusing_addr() -> (socket2::Socket, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let a = s.local_addr().unwrap().as_socket().unwrap();
    (s, a)
}

/// Sends raw bytes and reads until loopmux closes the connection; fails the
/// test if it does not within 5 s. The client never closes its side, so an
/// EOF here means loopmux closed first.
pub async fn closed_by_loopmux(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(read.is_ok(), "loopmux did not close the connection: {out}");
    out
}

/// Runs `loopmux check --config path` (the built binary) and fails the test,
/// with loopmux's reasons, unless it exits 0.
pub fn assert_check_passes(path: &std::path::Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopmux"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP server that reads everything until the client's FIN, then sends
/// it all back and closes: a relay must carry both directions exactly and
/// pass the half-close on while the other way keeps flowing.
pub async fn echo_after_eof() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if s.read_to_end(&mut all).await.is_ok() {
                    let _ = s.write_all(&all).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A port nothing listens on now (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects and reads until the end of stream, within `wait` (panics
/// after). A reset can come before the client has seen its connect finish
/// (a loaded machine): the connect then reports it, and it is returned as
/// the read's error would be.
pub async fn connect_and_read_to_end(addr: SocketAddr, wait: Duration) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = Vec::new();
    tokio::time::timeout(wait, s.read_to_end(&mut out))
        .await
        .expect("the client connection was left open")
        .map(|_| out)
}
