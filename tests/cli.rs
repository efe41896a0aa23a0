//! The `loopmux` binary: --help, --version, check on every shipped config,
//! and run + SIGTERM.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_loopmux");

#[test]
fn help_and_version() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("run") && text.contains("check"), "{text}");
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("loopmux {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn every_shipped_config_passes_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        // extension(), not ends_with(".toml"): the latter compares whole
        // path components and matches nothing.
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            if text.contains("/etc/loopmux/") {
                // Configs with TLS files: the same names under a temporary
                // directory, with certificates made here.
                let dir = support::pki::Dir::new();
                let ca = support::pki::Ca::new("shipped config CA");
                let server = ca.server(&["localhost"], false);
                let client = ca.client("client");
                dir.write("ca.pem", &ca.pem);
                dir.write("serve.pem", &server.cert_pem);
                dir.write("serve.key", &server.key_pem);
                dir.write("client.pem", &client.cert_pem);
                dir.write("client.key", &client.key_pem);
                let copy = dir.0.join(path.file_name().unwrap());
                std::fs::write(
                    &copy,
                    text.replace("/etc/loopmux/", &format!("{}/", dir.0.display())),
                )
                .unwrap();
                support::assert_check_passes(&copy);
            } else {
                support::assert_check_passes(&path);
            }
            checked += 1;
        }
    }
    assert!(checked >= 1, "no config/*.toml was checked");
}

#[test]
fn check_rejects_a_typo_with_exit_64_and_the_key() {
    let dir = std::env::temp_dir().join(format!("loopmux-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    let good =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/loopmux.toml"))
            .unwrap();
    std::fs::write(
        &file,
        good.replace("max_connections = 8", "max_conections = 8"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_conections") && err.contains("upstream[0]"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A child process killed on drop, by its own pid.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Child {
    /// `loopmux [global args] run --config FILE`, stderr captured.
    fn run(global: &[&str], config: &Path, env: &[(&str, &str)]) -> Child {
        let mut cmd = Command::new(BIN);
        cmd.args(global).args(["run", "--config"]).arg(config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Child(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    /// SIGTERM, wait for the exit, and return how it exited and its log.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        signal(&self, libc::SIGTERM);
        let status = wait_exit(&mut self);
        let mut log = String::new();
        use std::io::Read;
        self.0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut log)
            .unwrap();
        (status, log)
    }
}

#[test]
fn run_serves_and_stops_cleanly_on_sigterm() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(support::origin());
    let dir = std::env::temp_dir().join(format!("loopmux-run-{}", std::process::id()));
    let (file, port) = write_config(&dir, origin.addr, "");
    let child = Child::run(&[], &file, &[]);
    wait_served(&rt, &format!("http://127.0.0.1:{port}/"));
    let (status, log) = child.stop();
    assert!(status.success(), "{status:?}");
    assert!(
        log.contains("listening") && log.contains("listener=t"),
        "{log}"
    );
    assert!(log.contains("SIGTERM"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn diagnose_reads_fixture_as_text_and_json() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proc-exhausted");
    let out = Command::new(BIN)
        .args(["diagnose", "--proc"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("loopmux diagnose: exhausted"), "{text}");
    assert!(
        text.contains("198.18.0.3:5432") && text.contains("Suggested loopmux config"),
        "{text}"
    );
    let out = Command::new(BIN)
        .args(["diagnose", "--json", "--top", "2", "--proc"])
        .arg(&dir)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["usable_ports"], 990);
    assert_eq!(v["destinations"].as_array().unwrap().len(), 2);
    assert_eq!(v["destinations"][1]["verdict"], "at_risk");
    let out = Command::new(BIN)
        .args(["diagnose", "--proc", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/net/tcp"));
}

#[test]
fn demo_prints_a_table_with_both_phases() {
    let out = Command::new(BIN)
        .args([
            "demo",
            "--requests",
            "300",
            "--concurrency",
            "4",
            "--max-connections",
            "2",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no {name} row: {text}"));
        line.split('|')
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect()
    };
    let direct = row("direct");
    let through = row("through loopmux");
    assert_eq!(direct[1], "300");
    assert_eq!(
        direct[7], "300",
        "each direct request is a new upstream connection: {text}"
    );
    assert_eq!(
        (through[2].as_str(), through[3].as_str()),
        ("300", "0"),
        "{text}"
    );
    let conns: usize = through[7].parse().unwrap();
    assert!(
        conns <= 2,
        "loopmux opened {conns} upstream connections: {text}"
    );
}

/// Writes a one-listener config for `origin` on a free port; returns (path, port).
fn write_config(
    dir: &Path,
    origin: std::net::SocketAddr,
    listener_extra: &str,
) -> (std::path::PathBuf, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let port = support::free_port();
    let file = dir.join("run.toml");
    std::fs::write(
        &file,
        format!(
            "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"u\"\n{listener_extra}\n\n[[upstream]]\nname = \"u\"\nendpoints = [\"{origin}\"]\n"
        ),
    )
    .unwrap();
    (file, port)
}

fn wait_served(rt: &tokio::runtime::Runtime, url: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        let (code, out, _) = rt.block_on(support::curl(&[url]));
        if code == 0 && out == "ok\n" {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("loopmux never served {url}");
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.0.id() as i32, sig) };
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "loopmux did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn json_logs_and_access_log() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(support::origin());
    let dir = std::env::temp_dir().join(format!("loopmux-json-{}", std::process::id()));
    let (file, port) = write_config(&dir, origin.addr, "access_log = true");
    let child = Child::run(&["--log-format", "json"], &file, &[("RUST_LOG", "info")]);
    wait_served(&rt, &format!("http://127.0.0.1:{port}/"));
    // A head hyper cannot parse: answered by hyper itself, logged as well.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let answer = rt.block_on(support::raw(
        addr,
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        Duration::from_secs(5),
    ));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let (status, log) = child.stop();
    assert!(status.success());
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access = lines
        .iter()
        .find(|v| v["target"] == "loopmux::access" && v["status"] == 200)
        .unwrap_or_else(|| panic!("no access line: {log}"));
    assert_eq!(access["listener"], "t");
    assert_eq!(access["upstream"], "u");
    assert_eq!(access["bytes"], 3);
    assert_eq!(access["complete"], true);
    assert_eq!(access["upstream_conn"], "new");
    assert!(
        lines.iter().any(|v| v["target"] == "loopmux::access"
            && v["status"] == 400
            && v["listener"] == "t"),
        "hyper's own 400 is in the access log: {log}"
    );
    assert!(lines.iter().any(|v| v["message"] == "listening"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn systemd_notify_ready_watchdog_reloading_stopping() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(support::origin());
    let dir = std::env::temp_dir().join(format!("loopmux-notify-{}", std::process::id()));
    let (file, port) = write_config(&dir, origin.addr, "");
    let sock_path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // systemd sets WATCHDOG_PID to the service's pid; `exec` keeps the
    // shell's pid for loopmux.
    let mut child = Child(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "WATCHDOG_PID=$$ exec {BIN} run --config {}",
                file.display()
            ))
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "200000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 512];
    let mut recv_until = |want: &str| {
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < Duration::from_secs(20), "no {want}");
            let n = sock.recv(&mut buf).expect("a notification");
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            if msg.lines().any(|l| l == want) {
                return;
            }
        }
    };
    recv_until("READY=1");
    wait_served(&rt, &format!("http://127.0.0.1:{port}/"));
    recv_until("WATCHDOG=1");
    signal(&child, libc::SIGHUP);
    recv_until("RELOADING=1");
    recv_until("READY=1");
    signal(&child, libc::SIGTERM);
    recv_until("STOPPING=1");
    assert!(wait_exit(&mut child).success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sighup_reloads_and_an_invalid_config_keeps_the_running_one() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(support::origin());
    let dir = std::env::temp_dir().join(format!("loopmux-hup-{}", std::process::id()));
    let (file, port) = write_config(&dir, origin.addr, "");
    let good = std::fs::read_to_string(&file).unwrap();
    let child = Child::run(&[], &file, &[]);
    wait_served(&rt, &format!("http://127.0.0.1:{port}/"));

    std::fs::write(
        &file,
        good.replace("upstream = \"u\"", "upstream = \"nope\""),
    )
    .unwrap();
    signal(&child, libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    wait_served(&rt, &format!("http://127.0.0.1:{port}/"));

    // An empty file would remove every listener: refused, nothing changes.
    std::fs::write(&file, "").unwrap();
    signal(&child, libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    wait_served(&rt, &format!("http://127.0.0.1:{port}/"));

    let port2 = support::free_port();
    std::fs::write(
        &file,
        format!("{good}\n[[listener]]\nname = \"second\"\nbind = \"127.0.0.1:{port2}\"\nupstream = \"u\"\n"),
    )
    .unwrap();
    signal(&child, libc::SIGHUP);
    wait_served(&rt, &format!("http://127.0.0.1:{port2}/"));
    wait_served(&rt, &format!("http://127.0.0.1:{port}/"));

    let (status, log) = child.stop();
    assert!(status.success());
    assert!(
        log.contains("listener[0].upstream: no [[upstream]] is named `nope`"),
        "{log}"
    );
    assert!(log.contains("the running config stays"), "{log}");
    assert!(
        log.contains("at least one [[listener]] (or a [serve] section) is required"),
        "{log}"
    );
    assert_eq!(
        log.matches("config reloaded").count(),
        1,
        "only the valid reload applied: {log}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigterm_drains_slow_requests_and_readyz_says_draining() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(support::origin());
    let dir = std::env::temp_dir().join(format!("loopmux-drain-{}", std::process::id()));
    let (file, port) = write_config(&dir, origin.addr, "");
    let admin_port = support::free_port();
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        format!("[admin]\nbind = \"127.0.0.1:{admin_port}\"\n\n{text}"),
    )
    .unwrap();
    let mut child = Child::run(&[], &file, &[]);
    wait_served(&rt, &format!("http://127.0.0.1:{port}/"));
    let slow: Vec<_> = (0..6)
        .map(|_| {
            let url = format!("http://127.0.0.1:{port}/slow/1500");
            rt.spawn(async move { support::curl(&["-w", " %{http_code}", &url]).await })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    signal(&child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    let (_, ready, _) = rt.block_on(support::curl(&[
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &format!("http://127.0.0.1:{admin_port}/readyz"),
    ]));
    assert_eq!(ready, "503", "readyz while draining");
    for s in slow {
        let (code, out, err) = rt.block_on(s).unwrap();
        assert_eq!((code, out.as_str()), (0, "slow ok\n 200"), "{err}");
    }
    assert!(wait_exit(&mut child).success());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `check` output for `text` (exit code, stderr).
fn check_text(name: &str, text: &str) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(format!("loopmux-strict-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:18080\"\nupstream = \"u\"\n\n[[upstream]]\nname = \"u\"\nendpoints = [\"127.0.0.1:9000\"]\n";

#[test]
fn check_is_strict_and_complete() {
    let cases: &[(&str, String, Option<i32>, &[&str])] = &[
        (
            "empty",
            String::new(),
            Some(64),
            &["listener: at least one [[listener]] (or a [serve] section) is required"],
        ),
        (
            "port0",
            GOOD.replace("127.0.0.1:9000", "127.0.0.1:0"),
            Some(64),
            &["upstream[0].endpoints[0]: port 0"],
        ),
        (
            "unknown",
            GOOD.replace("name = \"u\"\n", "name = \"u\"\nmax_conections = 4\n")
                .replace("name = \"t\"\n", "name = \"t\"\nbnd = \"x\"\n"),
            Some(64),
            &[
                "upstream[0].max_conections: unknown key",
                "listener[0].bnd: unknown key",
            ],
        ),
        (
            "types",
            GOOD.replace("name = \"u\"\n", "name = \"u\"\nmax_connections = \"8\"\n")
                .replace(
                    "name = \"t\"\n",
                    "name = \"t\"\nclient_keepalive = \"no\"\n",
                ),
            Some(64),
            &[
                "upstream[0].max_connections: expected",
                "listener[0].client_keepalive: expected",
            ],
        ),
        (
            "huge",
            GOOD.replace(
                "name = \"t\"\n",
                "name = \"t\"\nmax_clients = 9223372036854775807\n",
            ),
            Some(64),
            &["listener[0].max_clients"],
        ),
        (
            "unresolved",
            GOOD.replace("127.0.0.1:9000", "nonexistent.invalid:80"),
            Some(0),
            &["warning: upstream[0].endpoints[0]: `nonexistent.invalid:80`"],
        ),
    ];
    let mut failures = Vec::new();
    for (name, text, code, wants) in cases {
        let (got, err) = check_text(name, text);
        if got != *code || !wants.iter().all(|w| err.contains(w)) {
            failures.push(format!(
                "{name}: exit {got:?} (want {code:?}), stderr: {err}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A response cut short by the upstream is in the access log as cut, with
/// the reason, and the client sees a broken transfer (curl exit 18).
#[test]
fn access_log_says_when_a_response_was_cut() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(support::raw_upstream::RawUpstream::start(vec![
        support::raw_upstream::write("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nab"),
    ]));
    let dir = std::env::temp_dir().join(format!("loopmux-cut-{}", std::process::id()));
    let (file, port) = write_config(&dir, up.addr, "access_log = true");
    let child = Child::run(&["--log-format", "json"], &file, &[("RUST_LOG", "info")]);
    let url = format!("http://127.0.0.1:{port}/cut");
    let start = Instant::now();
    let code = loop {
        let (code, _, _) = rt.block_on(support::curl(&[&url]));
        if code != 7 || start.elapsed() > Duration::from_secs(20) {
            break code;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, 18, "curl saw a partial transfer");
    let (status, log) = child.stop();
    assert!(status.success());
    let cut = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "loopmux::access" && v["path"] == "/cut")
        .unwrap_or_else(|| panic!("no access line: {log}"));
    assert_eq!(cut["complete"], false, "{cut}");
    // hyper reports the early close as an incomplete body.
    assert_eq!(cut["cut"], "upstream-error", "{cut}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Without `--remove` the command says what it would do and exits 64; the
/// removal itself is tested as root in tests/intercept.rs.
#[test]
fn intercept_without_remove_says_what_it_does() {
    let out = Command::new(BIN).arg("intercept").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loopmux intercept --remove"),
        "{out:?}"
    );
}
