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
    namespace_at(tag, NS_IP)
}

/// A namespace of the test's own with `ip` on its loopback.
fn namespace_at(tag: &str, ip: &str) -> Ns {
    let ns = Ns::new(format!("lmx-{tag}-{}", std::process::id()));
    ns.exec(&["ip", "link", "set", "lo", "up"]).unwrap();
    ns.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"])
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
    let rules = status_rules(admin).await;
    assert!(
        rules
            .iter()
            .any(|r| r.contains(&format!("meta skuid {{ {UID} }}"))),
        "/status lists the rules: {rules:?}"
    );
    // Each destination its own redirect port (issue 17): the first the
    // listener's, the raw one a port of its own.
    let http_port = redirect_port(&rules, HTTP_PORT);
    let raw_port = redirect_port(&rules, RAW_PORT);
    assert_eq!(http_port, LISTENER_PORT, "{rules:?}");
    assert_ne!(raw_port, LISTENER_PORT, "{rules:?}");
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
    // The destination that stays keeps its redirect port (moved onto the
    // listener's, it would meet the dropped destination's TIME_WAIT) and
    // is still served.
    let rules = status_rules(admin).await;
    assert_eq!(redirect_port(&rules, RAW_PORT), raw_port, "{rules:?}");
    assert!(
        !rules
            .iter()
            .any(|r| r.contains(&format!("{NS_IP}:{HTTP_PORT}"))),
        "{rules:?}"
    );
    let out = as_uid("/bin/bash", &["-c", &sh]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pong\n", "{out:?}");
    app.stop(Duration::from_secs(2)).await;
    assert!(
        !nft_tables().contains("inet loopmux"),
        "a clean stop leaves no loopmux table"
    );
}

/// `/status`'s `intercept.rules`.
async fn status_rules(admin: SocketAddr) -> Vec<String> {
    let (_, status, _) = support::curl(&[&format!("http://{admin}/status")]).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    status["intercept"]["rules"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The port the rule for `NS_IP`'s or `MULTI_IP`'s `dst_port` redirects to.
fn redirect_port(rules: &[String], dst_port: u16) -> u16 {
    rules
        .iter()
        .find(|r| r.contains(&format!(":{dst_port}\"")))
        .and_then(|r| r.split("redirect to :").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no rule for port {dst_port} in /status: {rules:?}"))
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

/// Issue 17: one intercept listener, two destinations. The app (uid 65534,
/// ab: a new connection per request) first loads destination A, then B.
/// With one redirect port for both, conntrack had to give B's connections
/// other source ports (A's held the reply tuples), ports where loopmux
/// (which closes first) still kept TIME_WAIT from a connection with
/// another sequence number and timestamp offset: the SYN was answered
/// with an ACK, and the app reset and sent it again. B must connect as
/// cleanly (no SYN retransmission) and about as fast as when it is the
/// only destination.
const MULTI_IP: &str = "198.18.4.2";
const DST_A: u16 = 8302;
const DST_B: u16 = 8304;
const LOAD_REQUESTS: usize = 6_000;
const LOAD_CLIENTS: usize = 16;
/// Rounds of: B alone, then A and B beside each other.
const ROUNDS: usize = 3;
const PORT_RANGE: &str = "40000 41999";
/// B's rate with A beside it, against B alone.
const MIN_RATE_RATIO: f64 = 0.8;

const AB_TOOLS: [(&str, &str); 4] = [
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("setpriv", "util-linux"),
    ("ab", "apache2-utils"),
];

#[test]
fn a_second_destination_connects_as_cleanly_as_the_only_one() {
    let name = "a_second_destination_connects_as_cleanly_as_the_only_one";
    if !may_run(name, &AB_TOOLS) {
        return;
    }
    // Each case in a namespace of its own (no conntrack entry or TIME_WAIT
    // of one is in the way of the other), both running at once so that
    // their rounds interleave: other work on this machine then weighs on
    // both alike.
    let one = LoadCase::start("icp1", &[DST_B]);
    let two = LoadCase::start("icp2", &[DST_A, DST_B]);
    let (mut alone, mut a_runs, mut beside) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        alone.push(one.run(DST_B));
        a_runs.push(two.run(DST_A));
        beside.push(two.run(DST_B));
    }
    let rules = two.rules.clone();
    drop(one);
    drop(two);
    let rates = |runs: &[AbRun]| {
        runs.iter()
            .map(|r| format!("{:.0}", r.rate))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let retrans = |runs: &[AbRun]| runs.iter().map(|r| r.syn_retrans).sum::<u64>();
    let best = |runs: &[AbRun]| runs.iter().map(|r| r.rate).fold(0.0, f64::max);
    println!(
        "intercept, {ROUNDS} rounds of {LOAD_REQUESTS} requests at -c {LOAD_CLIENTS} (ab, uid {UID}): \
         B alone {} req/s, {} SYN retransmissions; \
         A beside B {} req/s, {} SYN retransmissions; \
         then B beside A {} req/s, {} SYN retransmissions (best {:.2}x B alone's best)",
        rates(&alone),
        retrans(&alone),
        rates(&a_runs),
        retrans(&a_runs),
        rates(&beside),
        retrans(&beside),
        best(&beside) / best(&alone),
    );
    for (case, runs) in [
        ("B alone", &alone),
        ("A beside B", &a_runs),
        ("B beside A", &beside),
    ] {
        for run in runs.iter() {
            assert!(
                run.complete == LOAD_REQUESTS && run.failed == 0,
                "{case}: {} of {LOAD_REQUESTS} complete, {} failed:\n{}",
                run.complete,
                run.failed,
                run.output
            );
        }
    }
    assert_eq!(
        retrans(&alone),
        0,
        "SYN retransmissions with a single destination: the namespace itself is not clean"
    );
    assert_eq!(
        retrans(&beside),
        0,
        "SYN retransmissions toward B after A, behind one intercept listener (issue 17)"
    );
    // Best of the rounds on each side: other work on the machine lowers a
    // round, it never raises one.
    assert!(
        best(&beside) >= MIN_RATE_RATIO * best(&alone),
        "B beside A: {} req/s, below {MIN_RATE_RATIO}x B alone ({} req/s)",
        rates(&beside),
        rates(&alone)
    );
    // /status shows each destination's redirect port: two different ones.
    let (a, b) = (redirect_port(&rules, DST_A), redirect_port(&rules, DST_B));
    assert_eq!(a, LISTENER_PORT, "{rules:?}");
    assert_ne!(b, LISTENER_PORT, "{rules:?}");
}

/// What one ab run saw.
#[derive(Debug, Default)]
struct AbRun {
    complete: usize,
    failed: usize,
    rate: f64,
    /// `TcpExtTCPSynRetrans` in the namespace, over the run.
    syn_retrans: u64,
    output: String,
}

/// Origins on A and B and one intercept listener for some of them, in a
/// namespace of their own, served by a thread there; ab runs on request.
/// Dropped, it stops loopmux, waits for the thread and removes the
/// namespace (also when the test failed).
struct LoadCase {
    ask: Option<tokio::sync::mpsc::Sender<u16>>,
    runs: std::sync::mpsc::Receiver<AbRun>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// `/status`'s `intercept.rules` once it started.
    rules: Vec<String>,
    _ns: Ns,
}

impl LoadCase {
    fn start(tag: &str, destinations: &[u16]) -> LoadCase {
        let ns = namespace_at(tag, MULTI_IP);
        // A 2,000-port range: A's connections pass over every port
        // several times, so each of B's source ports is one that A's
        // connections used (the worst case, not a matter of luck).
        ns.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.ip_local_port_range={PORT_RANGE}"),
        ])
        .unwrap();
        let (ask, mut asked) = tokio::sync::mpsc::channel::<u16>(1);
        let (ran, runs) = std::sync::mpsc::channel();
        let (ready, started) = std::sync::mpsc::channel();
        let listed: Vec<String> = destinations
            .iter()
            .map(|p| format!("\"{MULTI_IP}:{p}\""))
            .collect();
        let toml = format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"legacy\"\nbind = \"127.0.0.1:{LISTENER_PORT}\"\nmode = \"intercept\"\n\
             intercept = {{ uids = [{UID}], destinations = [{}] }}\n\n\
             [forward_defaults]\nmax_connections = 8\n",
            listed.join(", ")
        );
        let thread = in_netns(&ns.0, move || {
            runtime().block_on(async move {
                let ip: std::net::IpAddr = MULTI_IP.parse().unwrap();
                let _a = loopmux::demo::origin::Origin::start(SocketAddr::new(ip, DST_A))
                    .await
                    .unwrap();
                let _b = loopmux::demo::origin::Origin::start(SocketAddr::new(ip, DST_B))
                    .await
                    .unwrap();
                let (app, _) = support::start(&toml).await;
                let _ = ready.send(status_rules(app.admin_addr.unwrap()).await);
                while let Some(port) = asked.recv().await {
                    let run = ab_as_uid(SocketAddr::new(ip, port), LOAD_REQUESTS).await;
                    if ran.send(run).is_err() {
                        break;
                    }
                }
                app.stop(Duration::from_secs(2)).await;
            })
        });
        let mut case = LoadCase {
            ask: Some(ask),
            runs,
            thread: Some(thread),
            rules: Vec::new(),
            _ns: ns,
        };
        match started.recv_timeout(Duration::from_secs(30)) {
            Ok(rules) => case.rules = rules,
            Err(_) => case.failed(tag),
        }
        case
    }

    /// ab to `port` in this case's namespace.
    fn run(&self, port: u16) -> AbRun {
        let sent = self
            .ask
            .as_ref()
            .is_some_and(|a| a.blocking_send(port).is_ok());
        // ab's own limit is 120 s.
        match self.runs.recv_timeout(Duration::from_secs(180)) {
            Ok(run) if sent => run,
            _ => panic!("the load case's thread ended or hung (see its panic above)"),
        }
    }

    fn failed(&mut self, tag: &str) -> ! {
        self.ask = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        panic!("load case {tag} did not start (see its panic above)")
    }
}

impl Drop for LoadCase {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop: loopmux stops (and
        // removes its table), the origins and ab are gone before the
        // namespace is.
        self.ask = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `TcpExtTCPSynRetrans` of this thread's network namespace (`/proc/net`
/// would be the process's, not the namespace's).
fn syn_retrans() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .filter(|pair| pair.len() == 2 && pair[0].starts_with("TcpExt:"))
        .find_map(|pair| {
            pair[0]
                .split_whitespace()
                .zip(pair[1].split_whitespace())
                .find(|(k, _)| *k == "TCPSynRetrans")
                .and_then(|(_, v)| v.parse().ok())
        })
        .expect("TcpExt TCPSynRetrans in /proc/thread-self/net/netstat")
}

/// `ab` as the intercepted uid: `n` requests, each on a new connection,
/// bounded by a time limit too.
async fn ab_as_uid(to: SocketAddr, n: usize) -> AbRun {
    let before = syn_retrans();
    let url = format!("http://{to}/");
    let (n_arg, c_arg) = (n.to_string(), LOAD_CLIENTS.to_string());
    // `-t` before `-n`: ab stops at whichever limit comes first.
    let run = tokio::process::Command::new("setpriv")
        .args(["--reuid", UID, "--regid", UID, "--clear-groups", "ab"])
        .args([
            "-q", "-r", "-s", "10", "-t", "120", "-n", &n_arg, "-c", &c_arg, &url,
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(150), run)
        .await
        .expect("ab ran past its time limit")
        .expect("ab runs (apache2-utils)");
    let syn_retrans = syn_retrans() - before;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    AbRun {
        complete: field("Complete requests:") as usize,
        failed: field("Failed requests:") as usize,
        rate: field("Requests per second:"),
        syn_retrans,
        output: text,
    }
}
