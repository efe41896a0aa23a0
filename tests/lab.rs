//! The exhaustion lab (DESIGN §7): two network namespaces joined by a veth
//! pair, the client side with a 1,000-port ephemeral range. Direct short
//! connections run out of ports; the same load through loopmux does not.
//!
//! Needs root and iproute2. Without them it says it skipped and why, unless
//! `LOOPMUX_LAB_REQUIRED=1` (set by .ci/run), where it fails instead.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use loopmux::demo::load::{self, Closer, LoadSpec};
use loopmux::diagnose::{count_toward, read_sockets, TIME_WAIT};
use support::netns::{in_netns, nft_tables, runtime, KillOnDrop};

const CLIENT_IPS: [&str; 2] = ["198.18.0.11", "198.18.0.12"];
const SERVER_IP: &str = "198.18.0.2";
const PORT_RANGE: &str = "40000 40999";
const MAX_CONNECTIONS: usize = 4;
const THROUGH_REQUESTS: usize = 20_000;
/// nghttpx (TLS + HTTP/2) in the server namespace, in front of an origin on
/// the server's loopback.
const H2_PORT: u16 = 9443;
const H2_MAX_CONNECTIONS: usize = 2;

fn ip(args: &[&str]) -> Result<(), String> {
    let mut all = vec!["ip"];
    all.extend_from_slice(args);
    support::netns::run(&all)
}

/// The two namespaces; removed on drop, also when an assertion failed.
struct Lab {
    cli: String,
    srv: String,
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and with
        // it the other end.
        let _ = ip(&["netns", "del", &self.cli]);
        let _ = ip(&["netns", "del", &self.srv]);
    }
}

impl Lab {
    fn build() -> Result<Lab, String> {
        let id = std::process::id();
        let lab = Lab {
            cli: format!("lmx-cli-{id}"),
            srv: format!("lmx-srv-{id}"),
        };
        let (vc, vs) = (format!("lmxc{id}"), format!("lmxs{id}"));
        ip(&["netns", "add", &lab.cli])?;
        ip(&["netns", "add", &lab.srv])?;
        ip(&[
            "link", "add", &vc, "netns", &lab.cli, "type", "veth", "peer", "name", &vs, "netns",
            &lab.srv,
        ])?;
        for ns in [&lab.cli, &lab.srv] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        for a in CLIENT_IPS.iter().chain(TCP_SOURCE_IPS.iter()) {
            ip(&[
                "-n",
                &lab.cli,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                &vc,
            ])?;
        }
        ip(&[
            "-n",
            &lab.srv,
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            &vs,
        ])?;
        ip(&["-n", &lab.cli, "link", "set", &vc, "up"])?;
        ip(&["-n", &lab.srv, "link", "set", &vs, "up"])?;
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.cli, "sysctl", "-q", "-w"])
            .arg(format!("net.ipv4.ip_local_port_range={PORT_RANGE}"))
            .output()
            .map_err(|e| format!("sysctl: {e}"))?;
        if !out.status.success() {
            return Err(format!("sysctl: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(lab)
    }
}

struct Figures {
    direct: load::LoadReport,
    through: load::LoadReport,
    failover: load::LoadReport,
    h2: load::LoadReport,
    h2_connects: u64,
    h2_time_wait: usize,
    upstream_accepted: u64,
    upstream_peak: usize,
    time_wait_toward_upstream: usize,
    source0_eaddrnotavail: u64,
}

#[test]
fn exhaustion_lab() {
    if !support::netns::may_run("exhaustion_lab", &[("ip", "iproute2")]) {
        return;
    }
    let lab = match Lab::build() {
        Ok(l) => l,
        Err(e) => panic!("cannot build the lab's namespaces: {e}"),
    };

    // Server namespace: two origins, one for direct load, one behind loopmux,
    // so the direct phase's TIME_WAIT does not blur the loopmux count.
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel();
    // The serve role (far end of the tunnel phase) in the server namespace,
    // with mTLS from a CA made here.
    let tunnel_pki = support::pki::Dir::new();
    let tunnel_ca = support::pki::Ca::new("lab tunnel CA");
    let serve_leaf = tunnel_ca.server(&["localhost"], false);
    let tunnel_client = tunnel_ca.client("lab tunnel client");
    let serve_toml = format!(
        "[serve]\nbind = \"{SERVER_IP}:{SERVE_PORT}\"\nallow_remote = true\nallow = [\"127.0.0.1:{TUNNEL_ECHO_PORT}\"]\n\
         tls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\" }}\n",
        tunnel_pki.write("serve.pem", &serve_leaf.cert_pem),
        tunnel_pki.write("serve.key", &serve_leaf.key_pem),
        tunnel_pki.write("ca.pem", &tunnel_ca.pem),
    );
    let tunnel_client_tls = format!(
        "tls = {{ ca_file = \"{}\", server_name = \"localhost\", client_cert = \"{}\", client_key = \"{}\" }}",
        tunnel_pki.write("ca.pem", &tunnel_ca.pem),
        tunnel_pki.write("client.pem", &tunnel_client.cert_pem),
        tunnel_pki.write("client.key", &tunnel_client.key_pem),
    );
    let server = in_netns(&lab.srv, move || {
        let rt = runtime();
        rt.block_on(async move {
            let ip: IpAddr = SERVER_IP.parse().unwrap();
            let direct = loopmux::demo::origin::Origin::start(SocketAddr::new(ip, 9000))
                .await
                .unwrap();
            let behind = loopmux::demo::origin::Origin::start(SocketAddr::new(ip, 9001))
                .await
                .unwrap();
            for port in [TCP_PORT_FOUR, TCP_PORT_ONE, ICPT_OPAQUE_PORT] {
                tokio::spawn(pong_server(SocketAddr::new(ip, port)));
            }
            let icpt_origin =
                loopmux::demo::origin::Origin::start(SocketAddr::new(ip, ICPT_HTTP_PORT))
                    .await
                    .unwrap();
            let _icpt_direct =
                loopmux::demo::origin::Origin::start(SocketAddr::new(ip, ICPT_DIRECT_PORT))
                    .await
                    .unwrap();
            let icpt_stats = icpt_origin.stats.clone();
            tokio::spawn(pong_server(SocketAddr::new(
                "127.0.0.1".parse().unwrap(),
                TUNNEL_ECHO_PORT,
            )));
            let (serve_app, _) = support::start(&serve_toml).await;
            let forward_origin =
                loopmux::demo::origin::Origin::start(SocketAddr::new(ip, FORWARD_PORT))
                    .await
                    .unwrap();
            let _h2_backend =
                loopmux::demo::origin::Origin::start("127.0.0.1:9002".parse().unwrap())
                    .await
                    .unwrap();
            ready_tx
                .send((
                    direct.addr,
                    behind.addr,
                    behind.stats.clone(),
                    forward_origin.stats.clone(),
                    icpt_stats.clone(),
                ))
                .unwrap();
            // Wait for the test to finish without blocking the runtime.
            let _ =
                tokio::task::spawn_blocking(move || stop_rx.recv_timeout(Duration::from_secs(600)))
                    .await;
            serve_app.stop(Duration::from_secs(2)).await;
        });
    });
    let (direct_addr, behind_addr, behind_stats, forward_stats, icpt_stats) = ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("origins started");

    // nghttpx in the server namespace, with a certificate for `localhost`
    // from a CA made here.
    let pki_dir = support::pki::Dir::new();
    let ca = support::pki::Ca::new("lab CA");
    let leaf = ca.server(&["localhost"], false);
    let ca_file = pki_dir.write("ca.pem", &ca.pem);
    let _nghttpx = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &lab.srv, "nghttpx", "--conf=/dev/null"])
            .arg(format!("--frontend={SERVER_IP},{H2_PORT}"))
            .args([
                "--backend=127.0.0.1,9002;;proto=http/1.1",
                "--workers=1",
                "--no-ocsp",
                "--errorlog-file=/dev/stderr",
            ])
            .arg(pki_dir.write("server.key", &leaf.key_pem))
            .arg(pki_dir.write("server.pem", &leaf.cert_pem))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("nghttpx is installed (.ci/run installs nghttp2-proxy)"),
    );
    let h2_addr: SocketAddr = format!("{SERVER_IP}:{H2_PORT}").parse().unwrap();

    let cli = lab.cli.clone();
    let forward_stats_cli = forward_stats.clone();
    let icpt_stats_cli = icpt_stats.clone();
    let result = in_netns(&cli, move || {
        let rt = runtime();
        rt.block_on(async move {
            // 1. Direct: the client closes first; ports run out.
            let mut spec = LoadSpec::new(direct_addr, 3_000, 16, Closer::Client);
            spec.source = Some(CLIENT_IPS[0].parse().unwrap());
            spec.deadline = Duration::from_secs(60);
            let direct = load::run(spec).await;
            // diagnose, on the real TIME_WAIT the direct phase left here.
            let report = loopmux::diagnose::diagnose(&loopmux::diagnose::ProcSource::live()).unwrap();

            // 2. Through loopmux: loopmux closes first on loopback, reuses
            //    at most MAX_CONNECTIONS upstream connections.
            let toml = format!(
                "[egress]\nsource_addresses = [\"{}\", \"{}\"]\n\n\
                 [[listener]]\nname = \"lab\"\nbind = \"127.0.0.1:0\"\nupstream = \"behind\"\nclient_keepalive = false\n\n\
                 [[listener]]\nname = \"exhausted\"\nbind = \"127.0.0.1:1\"\nupstream = \"direct\"\nclient_keepalive = false\n\n\
                 [[upstream]]\nname = \"behind\"\nendpoints = [\"{behind_addr}\"]\nmax_connections = {MAX_CONNECTIONS}\n\n\
                 [[upstream]]\nname = \"direct\"\nendpoints = [\"{direct_addr}\"]\nmax_connections = {MAX_CONNECTIONS}\n\n\
                 [[listener]]\nname = \"h2\"\nbind = \"127.0.0.3:0\"\nupstream = \"h2\"\nclient_keepalive = false\n\n\
                 [[upstream]]\nname = \"h2\"\nendpoints = [\"{h2_addr}\"]\nprotocol = \"http2\"\nmax_connections = {H2_MAX_CONNECTIONS}\n\
                 tls = {{ ca_file = \"{ca_file}\", server_name = \"localhost\" }}\n",
                CLIENT_IPS[0], CLIENT_IPS[1]
            );
            // Port 1 is a placeholder that must differ from the first bind.
            let toml = toml.replace("127.0.0.1:1\"", "127.0.0.2:0\"");
            let (app, _) = support::start(&toml).await;
            let (lab_addr, exhausted_addr) = (app.local_addrs()[0], app.local_addrs()[1]);
            let through = load::run(LoadSpec::new(lab_addr, THROUGH_REQUESTS, 16, Closer::Server)).await;

            // 3. Failover: toward the origin whose ports the direct phase
            //    used up from the first source, loopmux moves to the second.
            let failover = load::run(LoadSpec::new(exhausted_addr, 200, 4, Closer::Server)).await;
            let source0_eaddrnotavail = app.upstreams()[1].dialer.sources()[0]
                .addr_not_avail
                .load(std::sync::atomic::Ordering::Relaxed);

            // 4. HTTPS + HTTP/2 upstream (nghttpx): the same short client
            //    connections over at most H2_MAX_CONNECTIONS TLS connections.
            let h2_listener = app.local_addrs()[2];
            for _ in 0..200 {
                if tokio::net::TcpStream::connect(h2_addr).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let h2 = load::run(LoadSpec::new(h2_listener, THROUGH_REQUESTS, 16, Closer::Server)).await;
            let h2_connects = app.upstreams()[2].endpoints()[0]
                .connects
                .load(std::sync::atomic::Ordering::Relaxed);

            let sockets = read_sockets().unwrap();
            let time_wait_toward_upstream = count_toward(&sockets, behind_addr, TIME_WAIT);
            let h2_time_wait = count_toward(&sockets, h2_addr, TIME_WAIT);
            app.stop(Duration::from_secs(5)).await;

            // 5. Forward mode: the load a client with http_proxy sends.
            let forward = forward_phase(direct_addr, forward_stats_cli).await;

            // 6. tcp mode: raw connections, the client closes first.
            let tcp = tcp_phase().await;

            // 7. tunnel mode: the same raw connections as CONNECT streams
            //    to the serve role in the server namespace.
            let tunnel = tunnel_phase(&tunnel_client_tls).await;

            // 8. Interception: an unmodified legacy client (bash, as uid
            //    65534) pointed at the origin's real address.
            let intercept = intercept_phase(icpt_stats_cli).await;
            (direct, through, failover, time_wait_toward_upstream, source0_eaddrnotavail, report, h2, h2_connects, h2_time_wait, forward, tcp, tunnel, intercept)
        })
    })
    .join();
    let _ = stop_tx.send(());
    let _ = server.join();
    let (
        direct,
        through,
        failover,
        time_wait_toward_upstream,
        source0_eaddrnotavail,
        report,
        h2,
        h2_connects,
        h2_time_wait,
        forward,
        tcp,
        tunnel,
        intercept,
    ) = result.expect("client side of the lab panicked");
    println!(
        "diagnose in the client namespace after the direct phase:\n{}",
        report.render(5)
    );
    let worst = &report.destinations[0];
    assert_eq!(worst.remote, direct_addr, "{}", report.render(5));
    assert_eq!(worst.local_ip.to_string(), CLIENT_IPS[0]);
    assert_eq!(worst.verdict, loopmux::diagnose::Verdict::Exhausted);
    assert_eq!(report.usable_ports, 1000);
    assert!(worst.time_wait >= 990, "{}", report.render(5));
    let f = Figures {
        direct,
        through,
        failover,
        h2,
        h2_connects,
        h2_time_wait,
        upstream_accepted: behind_stats
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        upstream_peak: behind_stats
            .peak_active
            .load(std::sync::atomic::Ordering::Relaxed),
        time_wait_toward_upstream,
        source0_eaddrnotavail,
    };
    drop(lab);

    println!("exhaustion lab (client port range {PORT_RANGE}, max_connections {MAX_CONNECTIONS}):");
    println!("| phase | requests ok | errors | req/s | p99 |");
    println!("|---|---|---|---|---|");
    for (name, r) in [
        ("direct", &f.direct),
        ("through loopmux", &f.through),
        ("failover", &f.failover),
        ("HTTPS + h2 (nghttpx)", &f.h2),
        ("forward proxy (http_proxy)", &forward.load),
    ] {
        println!(
            "| {name} | {} | {} {:?} | {:.0} | {:?} |",
            r.ok,
            r.error_count(),
            r.errors,
            r.rate(),
            r.percentile(0.99)
        );
    }
    println!(
        "upstream accepted {} connections (peak {} open); TIME_WAIT toward upstream in client ns: {}; source {} EADDRNOTAVAIL: {}",
        f.upstream_accepted, f.upstream_peak, f.time_wait_toward_upstream, CLIENT_IPS[0], f.source0_eaddrnotavail
    );

    assert!(
        f.direct.errors_matching("EADDRNOTAVAIL") > 0,
        "direct connections should exhaust the 1,000-port range: {:?}",
        f.direct.errors
    );
    assert!(
        f.direct.ok <= 1_100,
        "direct succeeded {} times in a 1,000-port range",
        f.direct.ok
    );
    assert_eq!(
        f.through.ok, THROUGH_REQUESTS,
        "through loopmux: {:?}",
        f.through.errors
    );
    assert_eq!(f.through.error_count(), 0);
    assert!(
        f.upstream_accepted as usize <= MAX_CONNECTIONS,
        "upstream accepted {}",
        f.upstream_accepted
    );
    assert!(f.time_wait_toward_upstream <= MAX_CONNECTIONS);
    assert_eq!(f.failover.ok, 200, "failover: {:?}", f.failover.errors);
    println!(
        "HTTPS + h2 upstream: {} TLS connections dialed (max_connections {H2_MAX_CONNECTIONS}); TIME_WAIT toward it in client ns: {}",
        f.h2_connects, f.h2_time_wait
    );
    assert_eq!(f.h2.ok, THROUGH_REQUESTS, "h2: {:?}", f.h2.errors);
    assert_eq!(f.h2.error_count(), 0);
    assert!(
        f.h2_connects as usize <= H2_MAX_CONNECTIONS && f.h2_connects >= 1,
        "h2 connections dialed: {}",
        f.h2_connects
    );
    assert_eq!(f.h2_time_wait, 0, "no TIME_WAIT toward the h2 upstream");
    assert!(
        f.source0_eaddrnotavail >= 1,
        "the exhausted source should have reported EADDRNOTAVAIL"
    );
    let fwd_accepted = forward.accepted;
    let fwd_peak = forward_stats
        .peak_active
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "forward proxy: origin accepted {fwd_accepted} connections (peak {fwd_peak} open, max_connections {MAX_CONNECTIONS}); TIME_WAIT toward it in client ns: {}; curl with http_proxy: {}/{} ok; denied origin: {}; CONNECT tunnel echoed {} bytes exactly: {}",
        forward.time_wait, forward.curl_ok, FORWARD_CURLS, forward.denied_status, forward.tunnel_bytes, forward.tunnel_exact
    );
    assert_eq!(
        forward.load.ok, THROUGH_REQUESTS,
        "forward: {:?}",
        forward.load.errors
    );
    assert_eq!(forward.load.error_count(), 0);
    assert!(
        (1..=MAX_CONNECTIONS as u64).contains(&fwd_accepted),
        "forward origin accepted {fwd_accepted}"
    );
    assert_eq!(
        forward.time_wait, 0,
        "no TIME_WAIT toward the forward origin"
    );
    assert_eq!(forward.curl_ok, FORWARD_CURLS, "curl with http_proxy");
    assert_eq!(forward.denied_status, 403);
    assert!(forward.tunnel_exact, "CONNECT tunnel bytes");

    println!(
        "tcp mode ({TCP_CONNECTIONS} raw connections, client closes first, 1,000-port range):"
    );
    println!("| sources | ok | errors | EADDRNOTAVAIL at loopmux's dialer | TIME_WAIT toward the server (client ns) |");
    println!("|---|---|---|---|---|");
    for (n, r) in [(TCP_SOURCE_IPS.len(), &tcp.four), (1, &tcp.one)] {
        println!(
            "| {n} | {} | {} | {} | {} |",
            r.ok, r.errors, r.eaddrnotavail, r.time_wait
        );
    }
    assert_eq!(tcp.four.ok, TCP_CONNECTIONS, "four sources: {:?}", tcp.four);
    assert_eq!(tcp.four.errors, 0);
    assert_eq!(tcp.four.eaddrnotavail, 0);
    assert!(
        tcp.one.errors > 0 && tcp.one.eaddrnotavail > 0,
        "one source must run out of ports: {:?}",
        tcp.one
    );
    assert!(tcp.one.ok <= 1_100, "one source: {:?}", tcp.one);

    println!(
        "tunnel mode ({TUNNEL_CONNECTIONS} raw connections as CONNECT streams, client closes first): {} ok, {} errors, {:.0} connections/s; {} TLS connections dialed across the veth (max_connections {TUNNEL_MAX_CONNECTIONS}); TIME_WAIT toward the serve role in the client ns: {}",
        tunnel.ok, tunnel.errors, tunnel.rate, tunnel.connects, tunnel.time_wait
    );
    assert_eq!(
        tunnel.ok, TUNNEL_CONNECTIONS,
        "tunnel: {} errors",
        tunnel.errors
    );
    assert_eq!(tunnel.errors, 0);
    assert!(
        (1..=TUNNEL_MAX_CONNECTIONS as u64).contains(&tunnel.connects),
        "tunnel connections: {}",
        tunnel.connects
    );
    assert_eq!(tunnel.time_wait, 0);

    println!("interception (bash as uid {ICPT_UID}, a new connection per request, pointed at the origin's real address):");
    println!("| case | ok | errors | TIME_WAIT toward the destination (client ns) |");
    println!("|---|---|---|---|");
    for (name, r) in [
        ("HTTP, direct (no loopmux)", &intercept.direct),
        ("HTTP, intercepted", &intercept.http),
        (
            "opaque, client closes first, intercepted",
            &intercept.opaque,
        ),
    ] {
        println!("| {name} | {} | {} | {} |", r.ok, r.errors, r.time_wait);
    }
    println!(
        "interception: origin accepted {} connections (max_connections {MAX_CONNECTIONS}); table left after a clean stop: {}",
        intercept.origin_accepted, intercept.table_left
    );
    assert!(
        intercept.direct.errors > 0 && intercept.direct.ok <= 1_100,
        "direct: {:?}",
        intercept.direct
    );
    assert_eq!(
        intercept.http.ok, ICPT_REQUESTS,
        "intercepted: {:?}",
        intercept.http
    );
    assert_eq!(intercept.http.errors, 0);
    assert!(
        (1..=MAX_CONNECTIONS as u64).contains(&intercept.origin_accepted),
        "origin accepted {}",
        intercept.origin_accepted
    );
    assert_eq!(
        intercept.http.time_wait, 0,
        "TIME_WAIT toward the intercepted origin"
    );
    // Opaque, the client closing first: the relay carries the exchanges
    // (at least until the ports run out, about 500), and interception
    // cannot free the app's ports: its TIME_WAIT stays under the original
    // 4-tuple, near the whole 1,000-port range. How many of the 3,000 get
    // through varied between runs of the same code (about 500, or all),
    // for a reason not yet found, so the count itself is reported only.
    assert!(
        intercept.opaque.ok >= 400,
        "opaque: the relay carried too few: {:?}",
        intercept.opaque
    );
    assert!(
        intercept.opaque.time_wait >= 500,
        "opaque, client closes first: the app's TIME_WAIT should stay: {:?}",
        intercept.opaque
    );
    assert!(
        !intercept.table_left,
        "a clean stop left the nftables table"
    );
}

const ICPT_UID: &str = "65534";
const ICPT_HTTP_PORT: u16 = 9200;
const ICPT_OPAQUE_PORT: u16 = 9201;
const ICPT_DIRECT_PORT: u16 = 9202;
const ICPT_REQUESTS: usize = 10_000;

#[derive(Debug, Default)]
struct IcptRun {
    ok: usize,
    errors: usize,
    time_wait: usize,
}

struct IcptFigures {
    direct: IcptRun,
    http: IcptRun,
    opaque: IcptRun,
    origin_accepted: u64,
    table_left: bool,
}

/// A legacy client in bash, run as the intercepted uid: `n` times, a new
/// connection to `to`, one request, the answer read, then its own close.
/// HTTP: reads the head and the 3-byte body (`ok\\n`, Content-Length);
/// opaque: `ping`, `pong`.
async fn bash_client(to: SocketAddr, n: usize, http: bool) -> (usize, usize) {
    let exchange = if http {
        "printf 'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' >&3; IFS= read -r -t 5 status <&3 || status=;          while IFS= read -r -t 5 h <&3 && [ \"$h\" != $'\\r' ]; do :; done; read -r -t 5 -N 3 body <&3;          [[ $status == 'HTTP/1.1 200'* && $body == $'ok\\n' ]]"
    } else {
        "printf 'ping\\n' >&3; read -r -t 5 -N 5 r <&3; [ \"$r\" = $'pong\\n' ]"
    };
    let script = format!(
        "ok=0; err=0; for i in $(seq 1 {n}); do            if exec 3<>/dev/tcp/{}/{} 2>/dev/null; then              if {exchange}; then ok=$((ok+1)); else err=$((err+1)); fi; exec 3<&-;            else err=$((err+1)); fi;          done; echo $ok $err",
        to.ip(),
        to.port()
    );
    let out = tokio::process::Command::new("setpriv")
        .args([
            "--reuid",
            ICPT_UID,
            "--regid",
            ICPT_UID,
            "--clear-groups",
            "/bin/bash",
            "-c",
            &script,
        ])
        .output()
        .await
        .expect("setpriv and bash (util-linux, bash)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse::<usize>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(n))
}

async fn intercept_phase(
    origin_stats: std::sync::Arc<loopmux::demo::origin::OriginStats>,
) -> IcptFigures {
    let ip: IpAddr = SERVER_IP.parse().unwrap();
    let http_dst = SocketAddr::new(ip, ICPT_HTTP_PORT);
    let opaque_dst = SocketAddr::new(ip, ICPT_OPAQUE_PORT);
    let direct_dst = SocketAddr::new(ip, ICPT_DIRECT_PORT);
    // Without loopmux: the client closes first and runs out of ports.
    let (ok, errors) = bash_client(direct_dst, 3_000, true).await;
    let direct = IcptRun {
        ok,
        errors,
        time_wait: count_toward(&read_sockets().unwrap(), direct_dst, TIME_WAIT),
    };
    let toml = format!(
        "[[listener]]\nname = \"legacy\"\nbind = \"127.0.0.1:15001\"\nmode = \"intercept\"\n\
         intercept = {{ uids = [{ICPT_UID}], destinations = [\"{http_dst}\", \"{opaque_dst}\"] }}\n\n\
         [forward_defaults]\nmax_connections = {MAX_CONNECTIONS}\n"
    );
    let (app, _) = support::start(&toml).await;
    let (ok, errors) = bash_client(http_dst, ICPT_REQUESTS, true).await;
    let http = IcptRun {
        ok,
        errors,
        time_wait: count_toward(&read_sockets().unwrap(), http_dst, TIME_WAIT),
    };
    let (ok, errors) = bash_client(opaque_dst, 3_000, false).await;
    let opaque = IcptRun {
        ok,
        errors,
        time_wait: count_toward(&read_sockets().unwrap(), opaque_dst, TIME_WAIT),
    };
    let origin_accepted = origin_stats
        .accepted
        .load(std::sync::atomic::Ordering::Relaxed);
    app.stop(Duration::from_secs(5)).await;
    IcptFigures {
        direct,
        http,
        opaque,
        origin_accepted,
        table_left: nft_tables().contains("inet loopmux"),
    }
}

const SERVE_PORT: u16 = 9444;
/// The echo behind the serve role, on the server namespace's loopback.
const TUNNEL_ECHO_PORT: u16 = 9102;
const TUNNEL_CONNECTIONS: usize = 20_000;
const TUNNEL_MAX_CONNECTIONS: usize = 2;

struct TunnelFigures {
    ok: usize,
    errors: usize,
    rate: f64,
    connects: u64,
    time_wait: usize,
}

async fn tunnel_phase(client_tls: &str) -> TunnelFigures {
    let peer: SocketAddr = format!("{SERVER_IP}:{SERVE_PORT}").parse().unwrap();
    let toml = format!(
        "[egress]\nsource_addresses = [\"{}\"]\n\n\
         [[listener]]\nname = \"tunnel\"\nbind = \"127.0.0.7:0\"\nmode = \"tunnel\"\nupstream = \"far\"\ntarget = \"127.0.0.1:{TUNNEL_ECHO_PORT}\"\n\n\
         [[upstream]]\nname = \"far\"\nendpoints = [\"{peer}\"]\nprotocol = \"http2\"\nmax_connections = {TUNNEL_MAX_CONNECTIONS}\n{client_tls}\n",
        CLIENT_IPS[1]
    );
    // The serve role was listening before the server side said ready: no
    // probe (a probe's own TIME_WAIT would blur the count).
    let (app, listener) = support::start(&toml).await;
    let started = std::time::Instant::now();
    let (ok, errors) = raw_load(listener, TUNNEL_CONNECTIONS).await;
    let rate = ok as f64 / started.elapsed().as_secs_f64();
    let connects = app.upstreams()[0]
        .endpoints()
        .iter()
        .map(|e| e.connects.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let time_wait = count_toward(&read_sockets().unwrap(), peer, TIME_WAIT);
    app.stop(Duration::from_secs(5)).await;
    TunnelFigures {
        ok,
        errors,
        rate,
        connects,
        time_wait,
    }
}

/// Client addresses only the tcp phase uses (its TIME_WAIT must not mix
/// with the other phases').
const TCP_SOURCE_IPS: [&str; 4] = ["198.18.0.21", "198.18.0.22", "198.18.0.23", "198.18.0.24"];
const TCP_PORT_FOUR: u16 = 9100;
const TCP_PORT_ONE: u16 = 9101;
const TCP_CONNECTIONS: usize = 3_500;

/// A raw request/response server: reads a line, answers `pong`, then waits
/// for the client to close (a client that closes first).
async fn pong_server(addr: SocketAddr) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    while let Ok((s, _)) = l.accept().await {
        tokio::spawn(async move {
            let mut s = tokio::io::BufReader::new(s);
            let mut line = String::new();
            if s.read_line(&mut line).await.is_err() {
                return;
            }
            if s.get_mut().write_all(b"pong\n").await.is_err() {
                return;
            }
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest)).await;
        });
    }
}

#[derive(Debug, Default)]
struct TcpRun {
    ok: usize,
    errors: usize,
    eaddrnotavail: u64,
    time_wait: usize,
}

struct TcpFigures {
    four: TcpRun,
    one: TcpRun,
}

/// `n` raw connections to `to`, 8 at a time: `ping`, read `pong`, close
/// first. Each leaves from its own 127.1.x.y so the client's own TIME_WAIT
/// on loopback (the narrowed range applies there too) is no limit.
async fn raw_load(to: SocketAddr, n: usize) -> (usize, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let (mut ok, mut err) = (0, 0);
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return (ok, err);
                }
                let src = std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 1);
                let one = async {
                    // NO_PORT: a port taken by bind() would block that port
                    // for every connect() in the namespace (the bind bucket
                    // is per port), halving what loopmux's dialer can use.
                    let sock = socket2::Socket::new(
                        socket2::Domain::IPV4,
                        socket2::Type::STREAM.nonblocking(),
                        None,
                    )
                    .ok()?;
                    loopmux::sockopt::set_bind_address_no_port(&sock).ok()?;
                    sock.bind(&SocketAddr::new(src.into(), 0).into()).ok()?;
                    let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
                    let mut s = sock.connect(to).await.ok()?;
                    s.write_all(b"ping\n").await.ok()?;
                    let mut buf = [0u8; 5];
                    s.read_exact(&mut buf).await.ok()?;
                    (&buf == b"pong\n").then_some(())
                };
                match tokio::time::timeout(Duration::from_secs(10), one).await {
                    Ok(Some(())) => ok += 1,
                    _ => err += 1,
                }
            }
        }));
    }
    let (mut ok, mut err) = (0, 0);
    for w in workers {
        let (o, e) = w.await.unwrap();
        ok += o;
        err += e;
    }
    (ok, err)
}

async fn tcp_phase() -> TcpFigures {
    let four: SocketAddr = format!("{SERVER_IP}:{TCP_PORT_FOUR}").parse().unwrap();
    let one: SocketAddr = format!("{SERVER_IP}:{TCP_PORT_ONE}").parse().unwrap();
    let sources = TCP_SOURCE_IPS.map(|a| format!("\"{a}\"")).join(", ");
    let toml = format!(
        "[[listener]]\nname = \"four\"\nbind = \"127.0.0.5:0\"\nmode = \"tcp\"\nupstream = \"four\"\n\n\
         [[listener]]\nname = \"one\"\nbind = \"127.0.0.6:0\"\nmode = \"tcp\"\nupstream = \"one\"\n\n\
         [[upstream]]\nname = \"four\"\nendpoints = [\"{four}\"]\nsource_addresses = [{sources}]\n\n\
         [[upstream]]\nname = \"one\"\nendpoints = [\"{one}\"]\nsource_addresses = [\"{}\"]\n",
        TCP_SOURCE_IPS[0]
    );
    let (app, _) = support::start(&toml).await;
    let addrs = app.local_addrs();
    let mut out = TcpFigures {
        four: TcpRun::default(),
        one: TcpRun::default(),
    };
    for (i, (run, target)) in [(&mut out.four, four), (&mut out.one, one)]
        .into_iter()
        .enumerate()
    {
        let (ok, errors) = raw_load(addrs[i], TCP_CONNECTIONS).await;
        run.ok = ok;
        run.errors = errors;
        run.eaddrnotavail = app.upstreams()[i]
            .dialer
            .sources()
            .iter()
            .map(|s| s.addr_not_avail.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        run.time_wait = count_toward(&read_sockets().unwrap(), target, TIME_WAIT);
    }
    app.stop(Duration::from_secs(5)).await;
    out
}

const FORWARD_PORT: u16 = 9003;
const FORWARD_CURLS: usize = 50;

struct ForwardFigures {
    load: load::LoadReport,
    /// Connections the origin accepted for the pooled requests (before
    /// the CONNECT, which has one of its own).
    accepted: u64,
    time_wait: usize,
    curl_ok: usize,
    denied_status: u16,
    tunnel_bytes: usize,
    tunnel_exact: bool,
}

/// A forward listener in the client namespace: the lab's load sends what a
/// client with `http_proxy` sends (absolute-form to the proxy, one new
/// connection per request), real curl runs with `http_proxy` in its
/// environment, a denied origin gets 403, and CONNECT carries bytes.
async fn forward_phase(
    denied: SocketAddr,
    stats: std::sync::Arc<loopmux::demo::origin::OriginStats>,
) -> ForwardFigures {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin: SocketAddr = format!("{SERVER_IP}:{FORWARD_PORT}").parse().unwrap();
    let toml = format!(
        "[egress]\nsource_addresses = [\"{}\", \"{}\"]\n\n\
         [[listener]]\nname = \"fwd\"\nbind = \"127.0.0.4:0\"\nmode = \"forward\"\nclient_keepalive = false\n\
         allow = [\"{origin}\"]\n\n\
         [forward_defaults]\nmax_connections = {MAX_CONNECTIONS}\n",
        CLIENT_IPS[0], CLIENT_IPS[1]
    );
    let (app, proxy) = support::start(&toml).await;
    let http_proxy = format!("http://{proxy}");
    let mut spec = LoadSpec::new(proxy, THROUGH_REQUESTS, 16, Closer::Server);
    spec.path = format!("http://{origin}/");
    let report = load::run(spec).await;

    let mut curl_ok = 0;
    for i in 0..FORWARD_CURLS {
        let out = tokio::process::Command::new("curl")
            .args(["--silent", "--max-time", "10"])
            .arg(format!("http://{origin}/bytes/{}", 10 + i))
            .env("http_proxy", &http_proxy)
            .env_remove("no_proxy")
            .env_remove("NO_PROXY")
            .output()
            .await
            .expect("curl is installed");
        if out.status.success() && out.stdout.len() == 10 + i {
            curl_ok += 1;
        }
    }
    let denied_out = tokio::process::Command::new("curl")
        .args([
            "--silent",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{denied}/"))
        .env("http_proxy", &http_proxy)
        .output()
        .await
        .expect("curl is installed");
    let denied_status = String::from_utf8_lossy(&denied_out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);

    let accepted = stats.accepted.load(std::sync::atomic::Ordering::Relaxed);

    // CONNECT, then an HTTP exchange inside the tunnel: the echo comes back.
    let body: String = (0..100_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).await.is_err() {
            break;
        }
        head.push(b[0]);
    }
    let mut tunnel_exact = head.starts_with(b"HTTP/1.1 200");
    s.write_all(
        format!(
            "POST /echo HTTP/1.1\r\nHost: {origin}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await;
    let back = String::from_utf8_lossy(&back);
    tunnel_exact &= back.starts_with("HTTP/1.1 200") && back.ends_with(&body);

    let sockets = read_sockets().unwrap();
    let time_wait = count_toward(&sockets, origin, TIME_WAIT);
    app.stop(Duration::from_secs(5)).await;
    ForwardFigures {
        load: report,
        accepted,
        time_wait,
        curl_ok,
        denied_status,
        tunnel_bytes: body.len(),
        tunnel_exact,
    }
}
