//! Interception (first step): in a network namespace of its own, an
//! nftables `redirect` sends an unprivileged uid's connections to a
//! destination to loopmux's intercept listener; loopmux reads
//! `SO_ORIGINAL_DST` and carries each connection where it was going: HTTP
//! over a pool (loopmux closes first), anything else relayed, a destination
//! outside `destinations` refused. The clients are real programs (curl,
//! bash's /dev/tcp) run as uid 65534 with setpriv; loopmux (root) is not matched.
//!
//! Needs root, iproute2, nftables and setpriv; as a normal user it says it
//! skipped, unless LOOPMUX_LAB_REQUIRED=1 (CI), where it fails.

mod support;

use support::netns::{in_netns, may_run, nft_tables, runtime, KillOnDrop, Ns};

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

const NS_IP: &str = "198.18.5.2";
const HTTP_PORT: u16 = 9000;
const RAW_PORT: u16 = 9001;
const OUTSIDE_PORT: u16 = 9002;
const LISTENER_PORT: u16 = 15001;
const UID: &str = "65534";

const TOOLS: [(&str, &str); 3] = [
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("setpriv", "util-linux"),
];

/// A namespace of the test's own with NS_IP on its loopback.
fn namespace(tag: &str) -> Ns {
    let ns = Ns::new(format!("lmx-{tag}-{}", std::process::id()));
    ns.exec(&["ip", "link", "set", "lo", "up"]).unwrap();
    ns.exec(&["ip", "addr", "add", &format!("{NS_IP}/32"), "dev", "lo"])
        .unwrap();
    ns
}

#[test]
fn intercepted_connections_go_where_they_were_going() {
    if !may_run("intercepted_connections_go_where_they_were_going", &TOOLS) {
        return;
    }
    let ns = namespace("icpt");
    let exec = |args: &[&str]| ns.exec(args);
    // The uid's connections to NS_IP:9000-9002 go to the listener.
    // loopmux installs its own table (`inet loopmux`) for 9000 and 9001;
    // this one plays a stale rule: 9002 is redirected but not listed.
    exec(&["nft", "add", "table", "ip", "stale"]).unwrap();
    exec(&[
        "nft",
        "add",
        "chain",
        "ip",
        "stale",
        "out",
        "{ type nat hook output priority -90; }",
    ])
    .unwrap();
    let rule = format!(
        "add rule ip stale out meta skuid {UID} ip daddr {NS_IP} tcp dport {OUTSIDE_PORT} redirect to :{LISTENER_PORT}"
    );
    exec(&["nft", &rule]).unwrap();

    let result = in_netns(&ns.0, || runtime().block_on(scenario())).join();
    drop(ns);
    result.expect("the interception scenario panicked");
}

/// `program args…` as the intercepted uid (setpriv), to its end.
async fn as_uid(program: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new("setpriv")
        .args(["--reuid", UID, "--regid", UID, "--clear-groups", program])
        .args(args)
        .output()
        .await
        .unwrap()
}

async fn scenario() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ip: std::net::IpAddr = NS_IP.parse().unwrap();
    let origin = loopmux::demo::origin::Origin::start(SocketAddr::new(ip, HTTP_PORT))
        .await
        .unwrap();
    // A raw server: `ping` → `pong`.
    let raw = tokio::net::TcpListener::bind(SocketAddr::new(ip, RAW_PORT))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = raw.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 5];
                if s.read_exact(&mut b).await.is_ok() && &b == b"ping\n" {
                    let _ = s.write_all(b"pong\n").await;
                }
            });
        }
    });
    let outside = tokio::net::TcpListener::bind(SocketAddr::new(ip, OUTSIDE_PORT))
        .await
        .unwrap();
    let toml = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"legacy\"\nbind = \"127.0.0.1:{LISTENER_PORT}\"\nmode = \"intercept\"\n\
         intercept = {{ uids = [{UID}], destinations = [\"{NS_IP}:{HTTP_PORT}\", \"{NS_IP}:{RAW_PORT}\"] }}\n\n\
         [forward_defaults]\nmax_connections = 2\n"
    );
    let (mut app, _) = support::start(&toml).await;

    // HTTP: 30 curl runs as the uid, each a new connection to the origin's
    // real address; through loopmux, over at most 2 origin connections.
    for i in 0..30 {
        let url = format!("http://{NS_IP}:{HTTP_PORT}/bytes/{}", 10 + i);
        let out = as_uid("curl", &["--silent", "--max-time", "10", &url]).await;
        assert!(out.status.success(), "curl {i}: {out:?}");
        assert_eq!(out.stdout.len(), 10 + i, "curl {i}");
    }
    let accepted = origin.stats.accepted.load(Ordering::Relaxed);
    assert!(
        (1..=2).contains(&accepted),
        "origin accepted {accepted} connections"
    );

    // Not HTTP: relayed as it is (bash's /dev/tcp, a client that is
    // neither curl nor HTTP).
    let sh = format!("exec 3<>/dev/tcp/{NS_IP}/{RAW_PORT}; printf 'ping\\n' >&3; head -c 5 <&3");
    let out = as_uid("/bin/bash", &["-c", &sh]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pong\n", "{out:?}");

    // Redirected but not in `destinations` (a stale rule): refused, the
    // destination never sees a connection.
    let url = format!("http://{NS_IP}:{OUTSIDE_PORT}/");
    let out = as_uid("curl", &["--silent", "--max-time", "5", &url]).await;
    assert!(
        !out.status.success(),
        "a destination outside the list was served"
    );
    let reached = tokio::time::timeout(Duration::from_millis(300), outside.accept()).await;
    assert!(reached.is_err(), "the outside destination was dialed");
    let admin = app.admin_addr.unwrap();
    for (dst, kind, n) in [
        (format!("{NS_IP}:{HTTP_PORT}"), "http", 30.0),
        (format!("{NS_IP}:{RAW_PORT}"), "opaque", 1.0),
        (format!("{NS_IP}:{OUTSIDE_PORT}"), "refused", 1.0),
    ] {
        let got = support::raw_upstream::metric(
            admin,
            "loopmux_intercept_connections_total",
            &[
                ("listener", "legacy"),
                ("destination", &dst),
                ("kind", kind),
            ],
        )
        .await;
        assert_eq!(got, n, "{dst} {kind}");
    }
    assert_eq!(
        support::raw_upstream::metric(
            admin,
            "loopmux_intercept_rules_current",
            &[("table", "inet loopmux")]
        )
        .await,
        1.0
    );
    let (_, status, _) = support::curl(&[&format!("http://{admin}/status")]).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let rules = status["intercept"]["rules"].as_array().unwrap();
    assert!(
        rules.iter().any(|r| r
            .as_str()
            .unwrap()
            .contains(&format!("meta skuid {{ {UID} }}"))),
        "/status lists the rules: {status}"
    );
    assert!(
        nft_tables().contains("inet loopmux"),
        "loopmux's table while it runs"
    );
    // A reload that drops the HTTP destination: the table is replaced and
    // the app's next request goes directly to the origin.
    let before = origin.stats.accepted.load(Ordering::Relaxed);
    let reloaded = toml.replace(&format!("\"{NS_IP}:{HTTP_PORT}\", "), "");
    app.reload(loopmux::config::load_str(&reloaded, Default::default()).unwrap())
        .await
        .unwrap();
    let url = format!("http://{NS_IP}:{HTTP_PORT}/bytes/3");
    let out = as_uid("curl", &["--silent", "--max-time", "5", &url]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        origin.stats.accepted.load(Ordering::Relaxed),
        before + 1,
        "after the reload the request went directly (a new connection)"
    );
    app.stop(Duration::from_secs(2)).await;
    assert!(
        !nft_tables().contains("inet loopmux"),
        "a clean stop leaves no loopmux table"
    );
}

/// Fail open: after SIGKILL the kernel's set elements expire and the app
/// reaches its destination directly again; `loopmux intercept --remove`
/// clears the leftover table; a clean stop (SIGTERM) leaves none.
#[test]
fn after_sigkill_the_app_goes_direct_again() {
    if !may_run("after_sigkill_the_app_goes_direct_again", &TOOLS) {
        return;
    }
    let ns = namespace("icpk");
    let dir = std::env::temp_dir().join(format!("loopmux-icpk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("intercept.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"legacy\"\nbind = \"127.0.0.1:{LISTENER_PORT}\"\nmode = \"intercept\"\n\
             intercept = {{ uids = [{UID}], destinations = [\"{NS_IP}:{HTTP_PORT}\"] }}\n\n\
             [forward_defaults]\nmax_connections = 2\n"
        ),
    )
    .unwrap();
    let ns_name = ns.0.clone();
    let result = in_netns(&ns.0, move || {
        runtime().block_on(fail_open(ns_name, config))
    })
    .join();
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
    let fail_open = result.expect("the fail-open scenario panicked");
    println!("interception fail-open after SIGKILL: the app reached its destination directly after {fail_open:?}");
}

fn spawn_loopmux(ns: &str, config: &std::path::Path) -> KillOnDrop {
    KillOnDrop(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                env!("CARGO_BIN_EXE_loopmux"),
                "run",
                "--config",
            ])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn curl_as_uid(url: &str, max_time: &str) -> bool {
    as_uid(
        "curl",
        &["--silent", "--max-time", max_time, "-o", "/dev/null", url],
    )
    .await
    .status
    .success()
}

async fn fail_open(ns: String, config: std::path::PathBuf) -> Duration {
    let ip: std::net::IpAddr = NS_IP.parse().unwrap();
    let origin = loopmux::demo::origin::Origin::start(SocketAddr::new(ip, HTTP_PORT))
        .await
        .unwrap();
    let url = format!("http://{NS_IP}:{HTTP_PORT}/bytes/4");
    let mut lm = spawn_loopmux(&ns, &config);
    // Wait for its table (installed before it serves).
    for _ in 0..200 {
        if nft_tables().contains("inet loopmux") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        nft_tables().contains("inet loopmux"),
        "loopmux installed no table"
    );
    for i in 0..10 {
        assert!(curl_as_uid(&url, "5").await, "curl {i} through loopmux");
    }
    let through = origin.stats.accepted.load(Ordering::Relaxed);
    assert!(
        (1..=2).contains(&through),
        "intercepted: origin accepted {through}"
    );

    // SIGKILL: nothing of loopmux runs any more; the rule stays, its set
    // elements expire.
    let killed = std::time::Instant::now();
    let _ = lm.0.kill();
    let _ = lm.0.wait();
    let mut direct_after = None;
    while killed.elapsed() < Duration::from_secs(20) {
        if curl_as_uid(&url, "1").await {
            direct_after = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = direct_after.expect("the app never reached its destination after loopmux died");
    assert!(after <= Duration::from_secs(10), "fail-open took {after:?}");
    assert!(
        origin.stats.accepted.load(Ordering::Relaxed) > through,
        "the request after the kill went directly to the origin"
    );
    // The leftover table: removed by `loopmux intercept --remove`.
    assert!(nft_tables().contains("inet loopmux"));
    let out = Command::new(env!("CARGO_BIN_EXE_loopmux"))
        .args(["intercept", "--remove"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        !nft_tables().contains("inet loopmux"),
        "--remove left the table"
    );

    // A clean stop removes it by itself.
    let lm = spawn_loopmux(&ns, &config);
    for _ in 0..200 {
        if nft_tables().contains("inet loopmux") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // SAFETY: a pid of our own child.
    unsafe { libc::kill(lm.0.id() as i32, libc::SIGTERM) };
    let mut lm = lm;
    let _ = lm.0.wait();
    assert!(
        !nft_tables().contains("inet loopmux"),
        "a clean stop left the table"
    );
    after
}
