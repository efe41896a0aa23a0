//! `loopmux diagnose`: reads the kernel's socket tables
//! (`/proc/net/tcp{,6}`) and the sysctls that decide ephemeral-port
//! exhaustion, and reports the destinations under the most pressure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// TCP states as numbered in `include/net/tcp_states.h`.
pub const ESTABLISHED: u8 = 0x01;
pub const TIME_WAIT: u8 = 0x06;
pub const LISTEN: u8 = 0x0A;
/// `TCP_TIMEWAIT_LEN`: fixed at 60 s in the kernel.
pub const TIME_WAIT_SECS: u64 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
}

fn parse_addr(hex: &str) -> Option<SocketAddr> {
    let (ip, port) = hex.split_once(':')?;
    // Byte-indexed slicing below needs ASCII (fuzzing found the panic).
    if !ip.is_ascii() {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        // The kernel prints each 32-bit word in host (little-endian) order.
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_le_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for w in 0..4 {
                let word = u32::from_str_radix(&ip[w * 8..w * 8 + 8], 16).ok()?;
                b[w * 4..w * 4 + 4].copy_from_slice(&word.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses the text of `/proc/net/tcp` or `/proc/net/tcp6`; malformed lines
/// are skipped.
pub fn parse_table(text: &str) -> Vec<SockEntry> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _sl = f.next()?;
            let local = parse_addr(f.next()?)?;
            let remote = parse_addr(f.next()?)?;
            let state = u8::from_str_radix(f.next()?, 16).ok()?;
            Some(SockEntry {
                local,
                remote,
                state,
            })
        })
        .collect()
}

/// Reads both tables of the calling thread's network namespace.
pub fn read_sockets() -> std::io::Result<Vec<SockEntry>> {
    let mut all = parse_table(&std::fs::read_to_string("/proc/thread-self/net/tcp")?);
    if let Ok(t6) = std::fs::read_to_string("/proc/thread-self/net/tcp6") {
        all.extend(parse_table(&t6));
    }
    Ok(all)
}

/// Sockets in `state` whose remote end is `remote`.
pub fn count_toward(entries: &[SockEntry], remote: SocketAddr, state: u8) -> usize {
    entries
        .iter()
        .filter(|e| e.remote == remote && e.state == state)
        .count()
}

/// Where to read from: a real `/proc`, or a fixture tree with the same
/// layout (`net/tcp`, `sys/net/ipv4/...`).
#[derive(Debug, Clone)]
pub struct ProcSource {
    pub net_dir: PathBuf,
    pub sys_dir: PathBuf,
}

impl ProcSource {
    /// This thread's network namespace.
    pub fn live() -> Self {
        ProcSource {
            net_dir: "/proc/thread-self/net".into(),
            sys_dir: "/proc/sys".into(),
        }
    }

    /// A copy of `/proc` laid out under `dir` (`dir/net/tcp`, `dir/sys/...`).
    pub fn fixture(dir: &Path) -> Self {
        ProcSource {
            net_dir: dir.join("net"),
            sys_dir: dir.join("sys"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct DiagnoseError {
    pub path: String,
    pub source: std::io::Error,
}

/// The sysctls that decide how many connections a host can open.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Sysctls {
    pub ip_local_port_range: (u16, u16),
    /// Ranges from `ip_local_reserved_ports`.
    pub ip_local_reserved_ports: Vec<(u16, u16)>,
    pub tcp_tw_reuse: Option<u8>,
    pub tcp_timestamps: Option<u8>,
    pub tcp_fin_timeout: Option<u32>,
    pub tcp_max_tw_buckets: Option<u64>,
}

impl Sysctls {
    /// Ports `connect()` may choose from: the range less reserved ports.
    pub fn usable_ports(&self) -> u32 {
        let (lo, hi) = self.ip_local_port_range;
        let total = u32::from(hi.saturating_sub(lo)) + 1;
        let reserved: u32 = self
            .ip_local_reserved_ports
            .iter()
            .map(|&(a, b)| {
                let (a, b) = (a.max(lo), b.min(hi));
                if a <= b {
                    u32::from(b - a) + 1
                } else {
                    0
                }
            })
            .sum();
        total.saturating_sub(reserved)
    }

    fn in_range(&self, port: u16) -> bool {
        let (lo, hi) = self.ip_local_port_range;
        port >= lo
            && port <= hi
            && !self
                .ip_local_reserved_ports
                .iter()
                .any(|&(a, b)| port >= a && port <= b)
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ok,
    AtRisk,
    Exhausted,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::AtRisk => "at risk",
            Verdict::Exhausted => "exhausted",
        }
    }
}

/// Outgoing connections from one local IP to one `ip:port`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Destination {
    pub local_ip: IpAddr,
    pub remote: SocketAddr,
    pub time_wait: usize,
    pub established: usize,
    pub other: usize,
    /// Ephemeral ports held toward this destination, of the usable ones.
    pub share: f64,
    /// New connections/s this source can sustain toward it: usable / 60 s.
    pub sustainable_per_sec: f64,
    /// TIME_WAIT here is reused by the kernel (`tcp_tw_reuse`), so it does
    /// not count against the ports.
    pub time_wait_reusable: bool,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub sysctls: Sysctls,
    pub usable_ports: u32,
    pub sockets_total: usize,
    pub time_wait_total: usize,
    /// Worst first.
    pub destinations: Vec<Destination>,
    pub verdict: Verdict,
    /// A loopmux config for the worst non-loopback destinations at risk.
    pub suggested_config: Option<String>,
    /// For each destination at risk: what frees its ports, told apart by
    /// whether its protocol is likely HTTP (loopmux can close first) or
    /// not (the app closes first whatever is in between).
    pub advice: Vec<String>,
}

fn read(path: &Path) -> Result<String, DiagnoseError> {
    std::fs::read_to_string(path).map_err(|source| DiagnoseError {
        path: path.display().to_string(),
        source,
    })
}

fn ranges(text: &str) -> Vec<(u16, u16)> {
    text.trim()
        .split(',')
        .filter_map(|p| {
            let p = p.trim();
            if p.is_empty() {
                return None;
            }
            match p.split_once('-') {
                Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
                None => p.parse().ok().map(|v| (v, v)),
            }
        })
        .collect()
}

impl Sysctls {
    /// # Errors
    /// When `ip_local_port_range` cannot be read; the others are optional.
    pub fn read(src: &ProcSource) -> Result<Sysctls, DiagnoseError> {
        let ipv4 = src.sys_dir.join("net/ipv4");
        let range_text = read(&ipv4.join("ip_local_port_range"))?;
        Ok(Sysctls::parse(&range_text, |name| {
            std::fs::read_to_string(ipv4.join(name)).ok()
        }))
    }

    /// Pure: the port range's text and a reader for the optional files
    /// (by name under `net/ipv4`). Anything unparseable is a default.
    pub fn parse(range_text: &str, opt: impl Fn(&str) -> Option<String>) -> Sysctls {
        let mut it = range_text
            .split_whitespace()
            .filter_map(|v| v.parse::<u16>().ok());
        let ip_local_port_range = match (it.next(), it.next()) {
            (Some(a), Some(b)) => (a, b),
            _ => (32768, 60999),
        };
        let opt = |name: &str| opt(name).map(|s| s.trim().to_string());
        Sysctls {
            ip_local_port_range,
            ip_local_reserved_ports: opt("ip_local_reserved_ports")
                .map(|s| ranges(&s))
                .unwrap_or_default(),
            tcp_tw_reuse: opt("tcp_tw_reuse").and_then(|s| s.parse().ok()),
            tcp_timestamps: opt("tcp_timestamps").and_then(|s| s.parse().ok()),
            tcp_fin_timeout: opt("tcp_fin_timeout").and_then(|s| s.parse().ok()),
            tcp_max_tw_buckets: opt("tcp_max_tw_buckets").and_then(|s| s.parse().ok()),
        }
    }
}

/// Builds the report from sockets and sysctls. Pure: fixture tests call it.
pub fn analyze(sockets: &[SockEntry], sysctls: Sysctls) -> Report {
    let usable = sysctls.usable_ports().max(1);
    let mut groups: BTreeMap<(IpAddr, SocketAddr), (usize, usize, usize)> = BTreeMap::new();
    for s in sockets {
        // Outgoing connections only: the local port is an ephemeral one.
        if s.state == LISTEN || s.remote.port() == 0 || !sysctls.in_range(s.local.port()) {
            continue;
        }
        let g = groups.entry((s.local.ip(), s.remote)).or_default();
        match s.state {
            TIME_WAIT => g.0 += 1,
            ESTABLISHED => g.1 += 1,
            _ => g.2 += 1,
        }
    }
    let tw_reuse = sysctls.tcp_tw_reuse.unwrap_or(0);
    let timestamps = sysctls.tcp_timestamps.unwrap_or(1) != 0;
    let mut destinations: Vec<Destination> = groups
        .into_iter()
        .map(|((local_ip, remote), (tw, est, other))| {
            let time_wait_reusable =
                timestamps && (tw_reuse == 1 || (tw_reuse == 2 && remote.ip().is_loopback()));
            let held = est + other + if time_wait_reusable { 0 } else { tw };
            let share = held as f64 / f64::from(usable);
            let verdict = if share >= 0.95 {
                Verdict::Exhausted
            } else if share >= 0.5 {
                Verdict::AtRisk
            } else {
                Verdict::Ok
            };
            Destination {
                local_ip,
                remote,
                time_wait: tw,
                established: est,
                other,
                share,
                sustainable_per_sec: f64::from(usable) / TIME_WAIT_SECS as f64,
                time_wait_reusable,
                verdict,
            }
        })
        .collect();
    destinations.sort_by(|a, b| {
        b.share
            .partial_cmp(&a.share)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.time_wait.cmp(&a.time_wait))
            .then(a.remote.cmp(&b.remote))
    });
    let verdict = destinations
        .iter()
        .map(|d| d.verdict)
        .max()
        .unwrap_or(Verdict::Ok);
    let suggested_config = suggest(&destinations);
    let advice = advise(&destinations);
    Report {
        usable_ports: usable,
        sockets_total: sockets.len(),
        time_wait_total: sockets.iter().filter(|s| s.state == TIME_WAIT).count(),
        sysctls,
        destinations,
        verdict,
        advice,
        suggested_config,
    }
}

/// Ports where HTTP is usual. A guess from the port only: `diagnose`
/// cannot see the protocol, and says so.
const HTTP_PORTS: [u16; 8] = [80, 8000, 8008, 8080, 8081, 8088, 8888, 9000];

/// What frees the ports of each destination at risk. TIME_WAIT held here
/// means the apps here close first. For HTTP loopmux can close first for
/// them (http listener, forward, interception); for other protocols
/// interception cannot help, only loopback or `tcp_tw_reuse = 1` can.
fn advise(dests: &[Destination]) -> Vec<String> {
    dests
        .iter()
        .filter(|d| d.verdict != Verdict::Ok && !d.remote.ip().is_loopback() && d.time_wait > 0)
        .take(5)
        .map(|d| {
            let port = d.remote.port();
            if HTTP_PORTS.contains(&port) {
                format!(
                    "{}: the apps here close first (TIME_WAIT is on this side); port {port} is usually HTTP, where loopmux can close first instead: an http listener, HTTP_PROXY to a forward listener, or interception (mode = \"intercept\") frees these ports",
                    d.remote
                )
            } else {
                format!(
                    "{}: the apps here close first (TIME_WAIT is on this side); port {port} is not a usual HTTP port: if the protocol is not HTTP, interception cannot free these ports (the app still closes first); point the app at a loopback tcp listener (loopback TIME_WAIT is reused with tcp_tw_reuse = 2) or set net.ipv4.tcp_tw_reuse = 1",
                    d.remote
                )
            }
        })
        .collect()
}

/// Past this many destinations at risk, one `http` listener per
/// destination (and an app change for each) is a burden: one forward
/// proxy, set once with `http_proxy`, covers them all.
const FORWARD_SUGGESTION_AT: usize = 4;

/// The most destinations a suggested allow list names; the rest are left
/// to the operator (a comment says how many).
const FORWARD_SUGGESTION_MAX: usize = 64;

fn suggest(dests: &[Destination]) -> Option<String> {
    let mut remotes: Vec<SocketAddr> = Vec::new();
    for d in dests {
        if d.verdict != Verdict::Ok && !d.remote.ip().is_loopback() && !remotes.contains(&d.remote)
        {
            remotes.push(d.remote);
        }
    }
    if remotes.is_empty() {
        return None;
    }
    if remotes.len() >= FORWARD_SUGGESTION_AT {
        return Some(suggest_forward(&remotes));
    }
    let mut out =
        String::from("# Point the application at the listener instead of the remote address.\n");
    for (i, r) in remotes.iter().enumerate() {
        let name = format!("dest{}", i + 1);
        let _ = write!(
            out,
            "\n[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:{}\"\nmode = \"http\"\nupstream = \"{name}\"\nclient_keepalive = false\n\n[[upstream]]\nname = \"{name}\"\nendpoints = [\"{r}\"]\nmax_connections = 8\n",
            18080 + i
        );
    }
    Some(out)
}

/// One forward listener for many destinations: the apps get `http_proxy`
/// instead of a new address per destination.
fn suggest_forward(remotes: &[SocketAddr]) -> String {
    let mut out = format!(
        "# {} destinations are at risk: one forward proxy covers them all.\n\
         # Start the applications with http_proxy=http://127.0.0.1:3128\n\
         # (Java: -Dhttp.proxyHost=127.0.0.1 -Dhttp.proxyPort=3128 -Dhttp.nonProxyHosts=).\n\
         # Apps that call them by name: list the names (\"api.example.com:443\"),\n\
         # since a rule on an address does not allow a name.\n",
        remotes.len()
    );
    if remotes.len() > FORWARD_SUGGESTION_MAX {
        let _ = writeln!(
            out,
            "# The {} most loaded are listed; add the other {}.",
            FORWARD_SUGGESTION_MAX,
            remotes.len() - FORWARD_SUGGESTION_MAX
        );
    }
    let allow: Vec<String> = remotes
        .iter()
        .take(FORWARD_SUGGESTION_MAX)
        .map(|r| format!("\"{r}\""))
        .collect();
    let _ = write!(
        out,
        "\n[[listener]]\nname = \"egress\"\nbind = \"127.0.0.1:3128\"\nmode = \"forward\"\nclient_keepalive = false\nallow = [{}]\n\n[forward_defaults]\nmax_connections = 8\n",
        allow.join(", ")
    );
    out
}

/// Reads sockets and sysctls from `src` and analyzes them.
///
/// # Errors
/// When the socket table or the port range cannot be read.
pub fn diagnose(src: &ProcSource) -> Result<Report, DiagnoseError> {
    let tcp = src.net_dir.join("tcp");
    let mut sockets = parse_table(&read(&tcp)?);
    if let Ok(t6) = std::fs::read_to_string(src.net_dir.join("tcp6")) {
        sockets.extend(parse_table(&t6));
    }
    Ok(analyze(&sockets, Sysctls::read(src)?))
}

impl Report {
    /// The human-readable report; `top` destinations at most.
    pub fn render(&self, top: usize) -> String {
        let s = &self.sysctls;
        let mut o = String::new();
        let opt = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        let _ = writeln!(o, "loopmux diagnose: {}", self.verdict.as_str());
        let _ = writeln!(
            o,
            "ephemeral ports: {}-{} ({} usable); tcp_tw_reuse={} tcp_timestamps={} tcp_fin_timeout={} tcp_max_tw_buckets={}",
            s.ip_local_port_range.0,
            s.ip_local_port_range.1,
            self.usable_ports,
            opt(s.tcp_tw_reuse.map(|v| v.to_string())),
            opt(s.tcp_timestamps.map(|v| v.to_string())),
            opt(s.tcp_fin_timeout.map(|v| v.to_string())),
            opt(s.tcp_max_tw_buckets.map(|v| v.to_string())),
        );
        let _ = writeln!(
            o,
            "sockets: {} ({} in TIME_WAIT); each source IP sustains {:.0} new connections/s toward one ip:port",
            self.sockets_total,
            self.time_wait_total,
            f64::from(self.usable_ports) / TIME_WAIT_SECS as f64
        );
        if self.destinations.is_empty() {
            let _ = writeln!(o, "no outgoing connections from the ephemeral range");
        } else {
            let _ = writeln!(
                o,
                "\n{:<16} {:<28} {:>9} {:>11} {:>7} {:>10}  verdict",
                "local ip", "destination", "TIME_WAIT", "ESTABLISHED", "share", "max new/s"
            );
            for d in self.destinations.iter().take(top) {
                let _ = writeln!(
                    o,
                    "{:<16} {:<28} {:>9} {:>11} {:>6.1}% {:>10.0}  {}{}",
                    d.local_ip.to_string(),
                    d.remote.to_string(),
                    d.time_wait,
                    d.established,
                    d.share * 100.0,
                    d.sustainable_per_sec,
                    d.verdict.as_str(),
                    if d.time_wait_reusable {
                        " (TIME_WAIT reusable)"
                    } else {
                        ""
                    }
                );
            }
        }
        if !self.advice.is_empty() {
            let _ = writeln!(o, "\nWhat frees these ports:");
            for a in &self.advice {
                let _ = writeln!(o, "- {a}");
            }
        }
        if let Some(cfg) = &self.suggested_config {
            let _ = writeln!(o, "\nSuggested loopmux config:\n\n{cfg}");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_ascii_address_is_skipped_not_a_panic() {
        // 32 bytes, as an IPv6 address is, with a char across byte 8.
        let t6 = format!(
            "h\n 0: 000000000{}00:0050 {}:1F90 06\n",
            "\u{fffd}".repeat(7),
            "0".repeat(32)
        );
        assert!(parse_table(&t6).is_empty());
    }

    #[test]
    fn parses_v4_and_v6_lines() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0B0012C6:9C41 020012C6:2329 06 00000000:00000000 03:00000F9E 00000000     0        0 0 3 0000000000000000\n";
        let e = parse_table(v4);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].local, "198.18.0.11:40001".parse().unwrap());
        assert_eq!(e[0].remote, "198.18.0.2:9001".parse().unwrap());
        assert_eq!(
            count_toward(&e, "198.18.0.2:9001".parse().unwrap(), TIME_WAIT),
            1
        );
        let v6 = "  sl  local_address                         remote_address                        st\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:D431 01 0\n";
        let e = parse_table(v6);
        assert_eq!(e[0].local, "[::1]:8080".parse().unwrap());
        assert_eq!(e[0].state, ESTABLISHED);
    }

    #[test]
    fn fixture_report_has_exact_numbers() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proc-exhausted");
        let r = diagnose(&ProcSource::fixture(&dir)).unwrap();
        assert_eq!(r.usable_ports, 990);
        assert_eq!(r.sockets_total, 2 + 600 + 20 + 950 + 10 + 900 + 5 + 3);
        assert_eq!(r.time_wait_total, 600 + 950 + 900);
        assert_eq!(r.verdict, Verdict::Exhausted);
        let d: Vec<_> = r
            .destinations
            .iter()
            .map(|d| (d.remote.to_string(), d.time_wait, d.established, d.verdict))
            .collect();
        assert_eq!(
            d,
            [
                ("198.18.0.3:5432".to_string(), 950, 10, Verdict::Exhausted),
                ("198.18.0.2:443".to_string(), 600, 20, Verdict::AtRisk),
                ("127.0.0.1:8080".to_string(), 900, 5, Verdict::Ok),
                ("[::1]:9000".to_string(), 0, 3, Verdict::Ok),
            ]
        );
        assert!((r.destinations[0].share - 960.0 / 990.0).abs() < 1e-9);
        assert!((r.destinations[1].share - 620.0 / 990.0).abs() < 1e-9);
        assert!(
            r.destinations[2].time_wait_reusable,
            "tw_reuse=2 covers loopback"
        );
        assert!((r.destinations[0].sustainable_per_sec - 16.5).abs() < 1e-9);
        let cfg = r.suggested_config.as_deref().unwrap();
        assert!(
            cfg.contains("endpoints = [\"198.18.0.3:5432\"]")
                && cfg.contains("endpoints = [\"198.18.0.2:443\"]"),
            "{cfg}"
        );
        assert!(
            !cfg.contains("\"127.0.0.1:8080\""),
            "loopback destinations need no loopmux: {cfg}"
        );
        // The suggestion is a valid loopmux config.
        crate::config::load_str(cfg, Default::default()).unwrap();
        let text = r.render(10);
        assert!(
            text.contains("loopmux diagnose: exhausted") && text.contains("97.0%"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["verdict"], "exhausted");
        assert_eq!(json["destinations"][0]["time_wait"], 950);
    }

    #[test]
    fn pressure_on_many_destinations_suggests_one_forward_listener() {
        let sysctls = Sysctls::parse("40000 40999", |_| None);
        let mut sockets = Vec::new();
        // Five destinations, each with 700 of 1,000 ports in TIME_WAIT.
        for d in 0..5u16 {
            for p in 0..700u16 {
                sockets.push(SockEntry {
                    local: SocketAddr::new("198.18.0.11".parse().unwrap(), 40000 + p),
                    remote: SocketAddr::new("198.18.0.2".parse().unwrap(), 9000 + d),
                    state: TIME_WAIT,
                });
            }
        }
        let r = analyze(&sockets, sysctls.clone());
        let cfg = r.suggested_config.as_deref().unwrap();
        assert!(cfg.contains("mode = \"forward\""), "{cfg}");
        assert!(cfg.contains("http_proxy=http://127.0.0.1:3128"), "{cfg}");
        for d in 0..5 {
            assert!(
                cfg.contains(&format!("\"198.18.0.2:{}\"", 9000 + d)),
                "{cfg}"
            );
        }
        let c = crate::config::load_str(cfg, Default::default()).unwrap();
        assert_eq!(c.listeners[0].mode.kind(), crate::config::Mode::Forward);
        // Three or fewer: one http listener each, as before.
        sockets.retain(|s| s.remote.port() < 9003);
        let r = analyze(&sockets, sysctls);
        let cfg = r.suggested_config.as_deref().unwrap();
        assert!(!cfg.contains("forward"), "{cfg}");
        assert_eq!(cfg.matches("[[listener]]").count(), 3, "{cfg}");
    }

    #[test]
    fn advice_tells_http_from_other_protocols() {
        let sysctls = Sysctls::parse("40000 40999", |_| None);
        let mut sockets = Vec::new();
        for port in [8080u16, 5432] {
            for p in 0..700u16 {
                sockets.push(SockEntry {
                    local: SocketAddr::new("198.18.0.11".parse().unwrap(), 40000 + p),
                    remote: SocketAddr::new("198.18.0.2".parse().unwrap(), port),
                    state: TIME_WAIT,
                });
            }
        }
        let r = analyze(&sockets, sysctls);
        let http = r
            .advice
            .iter()
            .find(|a| a.starts_with("198.18.0.2:8080"))
            .unwrap();
        assert!(http.contains("interception"), "{http}");
        let pg = r
            .advice
            .iter()
            .find(|a| a.starts_with("198.18.0.2:5432"))
            .unwrap();
        assert!(pg.contains("interception cannot free"), "{pg}");
        assert!(pg.contains("tcp_tw_reuse = 1"), "{pg}");
        assert!(r.render(5).contains("What frees these ports:"));
    }
}
