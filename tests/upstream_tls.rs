//! TLS toward upstreams with certificates made by rcgen: each failure the
//! verifier can name reaches the client as a 502 that names it, and a
//! third-party TLS + HTTP/2 server (nghttpx) carries pooled traffic.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use loopmux::demo::origin::OriginOptions;
use support::pki::{self, Ca, Dir};
use support::*;

async fn tls_origin(cfg: std::sync::Arc<rustls::ServerConfig>) -> Origin {
    Origin::start_with(
        "127.0.0.1:0".parse().unwrap(),
        OriginOptions {
            h2: false,
            max_streams: None,
            tls: Some(cfg),
        },
    )
    .await
    .unwrap()
}

struct Case {
    name: &'static str,
    /// What the server presents (made from `ca`, or another CA).
    server: fn(&Ca) -> std::sync::Arc<rustls::ServerConfig>,
    /// Extra keys inside `tls = { … }` after `ca_file`.
    tls_extra: fn(&Dir, &Ca) -> String,
    /// `None`: 200 expected; `Some(words)`: a 502 `tls` whose body has
    /// every word.
    fails_with: Option<&'static [&'static str]>,
}

fn good(ca: &Ca) -> std::sync::Arc<rustls::ServerConfig> {
    pki::server_config(&ca.server(&["localhost"], false), None)
}

fn none(_: &Dir, _: &Ca) -> String {
    String::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_outcomes_table() {
    let cases = [
        Case {
            name: "trusted, auto picks h2",
            server: good,
            tls_extra: none,
            fails_with: None,
        },
        Case {
            name: "SNI/name mismatch",
            server: good,
            tls_extra: |_, _| ", server_name = \"wrong.example\"".into(),
            fails_with: Some(&["name-mismatch", "wrong.example", "upstream \"u\""]),
        },
        Case {
            name: "expired",
            server: |ca| pki::server_config(&ca.server(&["localhost"], true), None),
            tls_extra: none,
            fails_with: Some(&["expired"]),
        },
        Case {
            name: "wrong CA",
            server: |_| good(&Ca::new("someone else")),
            tls_extra: none,
            fails_with: Some(&["unknown-issuer", "localhost"]),
        },
        Case {
            name: "client certificate required and present",
            server: |ca| pki::server_config(&ca.server(&["localhost"], false), Some(ca)),
            tls_extra: |dir, ca| {
                let c = ca.client("loopmux");
                format!(
                    ", client_cert = \"{}\", client_key = \"{}\"",
                    dir.write("client.pem", &c.cert_pem),
                    dir.write("client.key", &c.key_pem)
                )
            },
            fails_with: None,
        },
        Case {
            name: "client certificate required and missing",
            server: |ca| pki::server_config(&ca.server(&["localhost"], false), Some(ca)),
            tls_extra: none,
            fails_with: Some(&["client-certificate-required"]),
        },
    ];
    let mut failures = Vec::new();
    for case in &cases {
        let ca = Ca::new("loopmux test CA");
        let dir = Dir::new();
        let ca_file = dir.write("ca.pem", &ca.pem);
        let o = tls_origin((case.server)(&ca)).await;
        let endpoint = format!("localhost:{}", o.addr.port());
        let toml = format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nupstream = \"u\"\n\n[[upstream]]\nname = \"u\"\nendpoints = [\"{endpoint}\"]\nprotocol = \"auto\"\ntls = {{ ca_file = \"{ca_file}\"{} }}\n",
            (case.tls_extra)(&dir, &ca)
        );
        let (app, addr) = start(&toml).await;
        let (code, out, err) = curl(&["-i", &format!("http://{addr}/")]).await;
        let status = out.lines().next().unwrap_or("").to_string();
        let ok = match case.fails_with {
            None => {
                code == 0
                    && status.contains(" 200")
                    && out.ends_with("ok\n")
                    && o.stats.h2_accepted.load(Ordering::Relaxed) == 1
            }
            Some(words) => {
                status.contains(" 502")
                    && out.contains("x-loopmux-error: tls")
                    && words.iter().all(|w| out.contains(w))
            }
        };
        if !ok {
            failures.push(format!("{}: curl {code} {err}\n{out}", case.name));
        }
        if let Some(words) = case.fails_with {
            // Counted by reason in the metrics.
            let admin = app.admin_addr.unwrap();
            let (_, m, _) = curl(&[&format!("http://{admin}/metrics")]).await;
            let want = format!("reason=\"{}\"", words[0]);
            let counted = m.lines().any(|l| {
                l.starts_with("loopmux_upstream_tls_handshake_failures_total") && l.contains(&want)
            });
            if !counted {
                failures.push(format!("{}: no failure metric with {want}", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}

#[test]
fn check_names_bad_tls_keys() {
    let dir = Dir::new();
    let ca = Ca::new("c");
    let leaf = ca.client("x");
    let cert = dir.write("c.pem", &leaf.cert_pem);
    let garbage = dir.write("g.pem", "not a pem\n");
    let cases: [(&str, &str); 5] = [
        (
            "tls = { ca_file = \"/nonexistent/ca.pem\" }",
            "upstream[0].tls.ca_file: cannot read /nonexistent/ca.pem",
        ),
        (
            &format!("tls = {{ ca_file = \"{garbage}\" }}"),
            "upstream[0].tls.ca_file:",
        ),
        (
            &format!("tls = {{ client_cert = \"{cert}\" }}"),
            "upstream[0].tls.client_key: is required with client_cert",
        ),
        (
            "protocol = \"auto\"",
            "upstream[0].protocol: `auto` chooses by ALPN, which needs TLS",
        ),
        (
            "tls = { server_name = \"not a name!\" }",
            "upstream[0].tls.server_name:",
        ),
    ];
    for (extra, want) in cases {
        let toml = format!(
            "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nupstream = \"u\"\n[[upstream]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n{extra}\n"
        );
        let err = loopmux::config::load_str(&toml, Default::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(want), "{extra}: wanted {want:?}, got {err:?}");
    }
}

/// Starts nghttpx (Debian's nghttp2-proxy) with TLS and h2 in front of
/// `backend`; killed (by its pid) on drop.
struct Nghttpx {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for Nghttpx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn nghttpx(backend: SocketAddr, cert: &str, key: &str) -> Nghttpx {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = std::process::Command::new("nghttpx")
        .args([
            "--conf=/dev/null",
            &format!("--frontend=127.0.0.1,{port}"),
            &format!(
                "--backend={},{};;proto=http/1.1",
                backend.ip(),
                backend.port()
            ),
            "--workers=1",
            "--no-ocsp",
            "--errorlog-file=/dev/stderr",
            key,
            cert,
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("nghttpx is installed (.ci/run installs nghttp2-proxy)");
    let n = Nghttpx { child, addr };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nghttpx did not listen on {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nghttpx_tls_h2_upstream_carries_pooled_requests() {
    let ca = Ca::new("loopmux test CA");
    let dir = Dir::new();
    let leaf = ca.server(&["localhost"], false);
    let cert = dir.write("server.pem", &leaf.cert_pem);
    let key = dir.write("server.key", &leaf.key_pem);
    let ca_file = dir.write("ca.pem", &ca.pem);
    let backend = origin().await;
    let proxy = nghttpx(backend.addr, &cert, &key).await;
    let toml = format!(
        "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nupstream = \"u\"\nclient_keepalive = false\n\n[[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\nprotocol = \"auto\"\nmax_connections = 2\ntls = {{ ca_file = \"{ca_file}\", server_name = \"localhost\" }}\n",
        proxy.addr
    );
    let (app, addr) = start(&toml).await;
    let spec =
        loopmux::demo::load::LoadSpec::new(addr, 500, 16, loopmux::demo::load::Closer::Server);
    let r = loopmux::demo::load::run(spec).await;
    assert_eq!(r.ok, 500, "errors: {:?}", r.errors);
    let ep = &app.upstreams()[0].endpoints()[0];
    let snap = ep.pool.snapshot();
    assert!(
        snap.shared >= 1 && snap.open <= 2,
        "h2 negotiated, cap held: {snap:?}"
    );
    assert!(
        ep.tls_handshakes.load(Ordering::Relaxed) <= 2,
        "handshakes stay off the hot path: {}",
        ep.tls_handshakes.load(Ordering::Relaxed)
    );
    // Bodies both ways through TLS + h2.
    let body: String = (0..200_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let file = dir.write("body.txt", &body);
    let (code, out, err) = curl(&[
        "--data-binary",
        &format!("@{file}"),
        &format!("http://{addr}/echo"),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out == body,
        "echo through nghttpx differs ({} bytes back)",
        out.len()
    );
}

/// Requests `/` through a loopmux in front of `endpoint` (TLS with the
/// test CA, server name `localhost`, `connect_timeout = "300ms"`) and
/// returns what is wrong with the answer: it must be a 502 with
/// `x-loopmux-error: tls`, the reason word, the server name and the
/// upstream in the body, well before `request_timeout`, and the failure
/// counted under that reason.
async fn tls_failure_problems(
    endpoint: SocketAddr,
    protocol: &str,
    ca_file: &str,
    reason: &str,
) -> Option<String> {
    let toml = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n{}",
        one_upstream(
            endpoint,
            "",
            &format!(
                "protocol = \"{protocol}\"\nconnect_timeout = \"300ms\"\nrequest_timeout = \"10s\"\ntls = {{ ca_file = \"{ca_file}\", server_name = \"localhost\" }}"
            ),
        )
    );
    let (app, addr) = start(&toml).await;
    let begun = std::time::Instant::now();
    let seen = support::raw_upstream::exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
        Duration::from_secs(15),
    )
    .await;
    let waited = begun.elapsed();
    let body = String::from_utf8_lossy(&seen.body).into_owned();
    let mut problems = Vec::new();
    if !(seen.status == 502
        && seen.header("x-loopmux-error").as_deref() == Some("tls")
        && body.contains(reason)
        && body.contains("localhost")
        && body.contains("upstream \"u\""))
    {
        problems.push(format!(
            "wanted a 502 tls naming {reason}:\n{}{body}",
            seen.head
        ));
    }
    // Far below request_timeout (10 s); generous for a loaded machine.
    if waited >= Duration::from_secs(5) {
        problems.push(format!("answered after {waited:?}"));
    }
    let counted = support::raw_upstream::metric(
        app.admin_addr.unwrap(),
        "loopmux_upstream_tls_handshake_failures_total",
        &[("reason", reason)],
    )
    .await;
    if counted < 1.0 {
        problems.push(format!("no failure metric with reason {reason}"));
    }
    app.stop(Duration::from_secs(1)).await;
    (!problems.is_empty()).then(|| problems.join("\n"))
}

/// A server that reads the ClientHello and never answers: the README's
/// TLS failure `timeout`, not a bare connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_never_finishes_is_the_tls_failure_timeout() {
    let ca = Ca::new("loopmux test CA");
    let dir = Dir::new();
    let ca_file = dir.write("ca.pem", &ca.pem);
    let silent = support::raw_upstream::SilentPeer::start(None).await;
    if let Some(p) = tls_failure_problems(silent.addr, "auto", &ca_file, "timeout").await {
        panic!("{p}");
    }
}

/// `protocol = "http2"` and a server whose ALPN does not offer h2: the
/// reason word `no-application-protocol`, whether the server says so
/// with an alert (it offers only http/1.1) or picks nothing (no ALPN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_without_alpn_h2_is_the_tls_failure_no_application_protocol() {
    let ca = Ca::new("loopmux test CA");
    let dir = Dir::new();
    let ca_file = dir.write("ca.pem", &ca.pem);
    let with_alpn = |alpn: &[&[u8]]| {
        let mut cfg = (*good(&ca)).clone();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        std::sync::Arc::new(cfg)
    };
    let mut failures = Vec::new();
    for (name, alpn) in [
        ("no ALPN", &[][..]),
        ("ALPN http/1.1 only", &[&b"http/1.1"[..]][..]),
    ] {
        let o = tls_origin(with_alpn(alpn)).await;
        if let Some(p) =
            tls_failure_problems(o.addr, "http2", &ca_file, "no-application-protocol").await
        {
            failures.push(format!("{name}: {p}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}
