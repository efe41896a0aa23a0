//! Turns a [`RawConfig`] into a checked [`Config`]: typed values, defaults,
//! and cross-references. Every problem names the key it is about.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::HeaderValue;

use super::raw::{Field, RawConfig, RawListener, RawUpstream, RawUpstreamTls};
use crate::allow::AllowList;
use crate::tls::client::{SystemRoots, TlsClient, TlsSettings};

/// One thing wrong with a config, tied to the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the key, e.g. `upstream[0].max_connections`.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// A validated configuration; every default is filled in here.
#[derive(Debug, Clone)]
pub struct Config {
    pub admin: Option<AdminConfig>,
    /// How long in-flight requests may finish after SIGTERM.
    pub drain_timeout: Duration,
    /// Runtime worker threads; 0: one per core. Read at start only.
    pub threads: usize,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: Vec<UpstreamConfig>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub bind: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Http,
    /// An HTTP proxy for apps with `HTTP_PROXY`: absolute-form requests
    /// over per-origin pools, `CONNECT` as raw tunnels.
    Forward,
    /// Any TCP: one upstream connection per client connection.
    Tcp,
    /// Any TCP: one HTTP/2 CONNECT stream per client connection, on a few
    /// connections to a peer (`[serve]`, or any h2 CONNECT proxy).
    Tunnel,
    /// `[serve]`: the far end of `tunnel`.
    Serve,
    /// Connections the kernel redirected here (nftables `redirect`): each
    /// goes where it was going (`SO_ORIGINAL_DST`), HTTP/1 over pools.
    Intercept,
}

/// `intercept = { … }` on a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptConfig {
    /// Whose connections: these uids …
    pub uids: Vec<u32>,
    /// … and these cgroup v2 paths.
    pub cgroups: Vec<String>,
    /// Which destinations; anything else that reaches the listener is
    /// refused (a stale rule), never dialed.
    pub destinations: AllowList,
    /// Ports where the server speaks first: no HTTP detection.
    pub opaque_ports: Vec<u16>,
    /// How long the first bytes may take before a connection is taken as
    /// opaque.
    pub detect_timeout: Duration,
}

/// `[serve]`: TLS, HTTP/2 CONNECT streams in, allowed targets dialed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    pub tls: crate::tls::server::TlsServer,
    pub allow: AllowList,
    /// Tunnel client connections past their handshake.
    pub max_connections: usize,
    /// Connections still in their TLS handshake, counted apart from
    /// `max_connections`: unauthenticated peers cannot fill those.
    pub max_handshakes: usize,
    pub max_streams_per_connection: u32,
    /// A stream with no byte either way for this long is closed, and so is
    /// a connection with no open stream.
    pub idle_timeout: Duration,
    /// The TLS handshake and the client's HTTP/2 preface must both arrive
    /// within this.
    pub handshake_timeout: Duration,
    /// A stream's relay after one side's FIN (see
    /// [`RelayKeys::half_close_timeout`]).
    pub half_close_timeout: Duration,
    pub connect_timeout: Duration,
    pub failure_backoff: Duration,
    pub source_addresses: Vec<IpAddr>,
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
}

/// What a `tcp` listener does to its client when the upstream cannot be
/// dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConnectError {
    /// A FIN: the client reads EOF.
    Close,
    /// An RST: the client's next read or write fails at once.
    Reset,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::Forward => "forward",
            Mode::Tcp => "tcp",
            Mode::Tunnel => "tunnel",
            Mode::Serve => "serve",
            Mode::Intercept => "intercept",
        }
    }
}

/// What a forward listener may reach and how its origins are pooled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    pub allow: AllowList,
    /// `http://` requests to these go over TLS (port 80 becomes 443).
    pub originate_tls: AllowList,
    /// Origins with pools at once; beyond, the least recently used idle
    /// one is dropped.
    pub max_origins: usize,
    /// Add `Via: 1.1 loopmux` to requests and responses.
    pub via: bool,
    /// The template every origin's pool settings come from
    /// (`[forward_defaults]`); its name and endpoints are unused.
    pub origin: UpstreamConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub max_clients: usize,
    /// The mode and only its keys.
    pub mode: ModeConfig,
}

/// A listener's mode with the keys that apply to it: what a mode does not
/// use, it does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModeConfig {
    Http {
        /// Index into [`Config::upstreams`].
        upstream: usize,
        http: HttpKeys,
    },
    Forward {
        forward: Box<ForwardConfig>,
        http: HttpKeys,
        /// For the raw relays of `CONNECT`.
        half_close_timeout: Duration,
    },
    Tcp(RelayKeys),
    Tunnel {
        relay: RelayKeys,
        /// The CONNECT authority (`host:port`).
        target: http::uri::Authority,
    },
    /// The `[serve]` section's listener.
    Serve(Box<ServeConfig>),
    Intercept {
        intercept: Box<InterceptConfig>,
        /// Interception carries HTTP/1 over per-destination pools as
        /// forward mode does, with the destinations as allow list.
        forward: Box<ForwardConfig>,
        http: HttpKeys,
        /// For the opaque relays.
        half_close_timeout: Duration,
    },
}

/// The client side of an HTTP/1 listener (`http`, `forward`, `intercept`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpKeys {
    pub client_keepalive: bool,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    /// One log line per request (target `loopmux::access`).
    pub access_log: bool,
    /// Request bodies up to this size are read whole before an upstream
    /// connection is taken (0: never).
    pub request_buffer_bytes: usize,
    /// The client must move request body bytes, and take response bytes,
    /// at least this often.
    pub body_timeout: Duration,
}

/// A raw relay listener's keys (`tcp`, `tunnel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayKeys {
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// A connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// Once one side has sent its FIN, the other direction may be silent
    /// this long.
    pub half_close_timeout: Duration,
    /// What the client gets when no upstream can be dialed.
    pub on_connect_error: OnConnectError,
}

impl ModeConfig {
    pub fn kind(&self) -> Mode {
        match self {
            ModeConfig::Http { .. } => Mode::Http,
            ModeConfig::Forward { .. } => Mode::Forward,
            ModeConfig::Tcp(_) => Mode::Tcp,
            ModeConfig::Tunnel { .. } => Mode::Tunnel,
            ModeConfig::Serve(_) => Mode::Serve,
            ModeConfig::Intercept { .. } => Mode::Intercept,
        }
    }

    /// The `[[upstream]]` the listener sends to (`http`, `tcp`, `tunnel`).
    pub fn upstream(&self) -> Option<usize> {
        match self {
            ModeConfig::Http { upstream, .. } => Some(*upstream),
            ModeConfig::Tcp(r) | ModeConfig::Tunnel { relay: r, .. } => Some(r.upstream),
            _ => None,
        }
    }

    /// The HTTP/1 client side's keys, where there is one.
    pub fn http(&self) -> Option<&HttpKeys> {
        match self {
            ModeConfig::Http { http, .. }
            | ModeConfig::Forward { http, .. }
            | ModeConfig::Intercept { http, .. } => Some(http),
            _ => None,
        }
    }

    /// The per-origin routing (`forward`, `intercept`).
    pub fn forward(&self) -> Option<&ForwardConfig> {
        match self {
            ModeConfig::Forward { forward, .. } | ModeConfig::Intercept { forward, .. } => {
                Some(forward)
            }
            _ => None,
        }
    }

    pub fn intercept(&self) -> Option<&InterceptConfig> {
        match self {
            ModeConfig::Intercept { intercept, .. } => Some(intercept),
            _ => None,
        }
    }

    /// Raw relays' `half_close_timeout` (every mode but `http`).
    pub fn half_close_timeout(&self) -> Option<Duration> {
        match self {
            ModeConfig::Http { .. } => None,
            ModeConfig::Forward {
                half_close_timeout, ..
            }
            | ModeConfig::Intercept {
                half_close_timeout, ..
            } => Some(*half_close_timeout),
            ModeConfig::Tcp(r) | ModeConfig::Tunnel { relay: r, .. } => Some(r.half_close_timeout),
            ModeConfig::Serve(s) => Some(s.half_close_timeout),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    /// Prior knowledge (plaintext), or ALPN `h2` only (TLS).
    Http2,
    /// TLS only: ALPN decides per connection, h2 preferred.
    Auto,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Auto => "auto",
        }
    }
}

/// Where an endpoint lives: a literal address, or a name re-resolved every
/// `dns_refresh`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddr {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointAddr::Ip(a) => write!(f, "{a}"),
            EndpointAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostHeader {
    /// Forward the client's `Host` unchanged.
    Keep,
    /// Replace `Host` with this value.
    Fixed(HeaderValue),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub name: String,
    pub endpoints: Vec<EndpointAddr>,
    pub protocol: Protocol,
    pub max_connections: usize,
    pub max_pending: usize,
    pub queue_timeout: Duration,
    pub connect_timeout: Duration,
    /// From the request fully sent to the response head.
    pub request_timeout: Duration,
    /// The upstream must move response body bytes, and take request body
    /// bytes, at least this often.
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    pub host_header: HostHeader,
    /// Empty: let the kernel choose the source address.
    pub source_addresses: Vec<IpAddr>,
    pub dns_refresh: Duration,
    pub failure_backoff: Duration,
    /// TLS toward the endpoints, with its client config built.
    pub tls: Option<TlsClient>,
    /// A lower stream limit per HTTP/2 connection than the server's.
    pub max_streams_per_connection: Option<usize>,
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    /// HTTP/2 PING every this long; no answer within `keepalive_timeout`
    /// closes the connection.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

/// Defaults, in one place so the README's reference can be checked against them.
pub mod defaults {
    use std::time::Duration;
    pub const MAX_CONNECTIONS: usize = 8;
    pub const MAX_PENDING: usize = 1024;
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const MAX_LIFETIME: Duration = Duration::from_secs(600);
    pub const DNS_REFRESH: Duration = Duration::from_secs(30);
    pub const FAILURE_BACKOFF: Duration = Duration::from_secs(5);
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const MAX_CLIENTS: usize = 10_000;
    pub const MAX_HEADER_BYTES: usize = 16 * 1024;
    /// A host's apps call tens of services, not thousands; past this an
    /// app is crawling, and idle origins make room.
    pub const MAX_ORIGINS: usize = 256;
    /// `tcp` listeners: what Envoy's tcp_proxy uses. Apps that keep a
    /// database connection idle for minutes are not cut; a peer that
    /// vanished without a FIN is, eventually (keepalive finds most first).
    pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    /// HAProxy's `timeout client-fin` idea: after one side's FIN, a peer
    /// that never passes the half-close on (tinyproxy behind nghttpx)
    /// holds the relay this long, not `idle_timeout`.
    pub const HALF_CLOSE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    /// Runtime worker threads (0: one per core). One: measured with
    /// benches/compare.sh on a 2-core host (one run, 3 rounds), one thread
    /// used 52.9 CPU ms per 1,000 requests against 64.4 for one per core,
    /// and served 16,046 req/s against 15,259; a sidecar also leaves the
    /// other cores to the apps it serves.
    pub const THREADS: usize = 1;
    /// Covers the JSON and form bodies of typical API calls, so a slow
    /// uploader of one holds no upstream connection; worst case
    /// `max_clients` × this in memory, and only for bytes clients send.
    pub const REQUEST_BUFFER_BYTES: usize = 64 * 1024;
    /// A real slow link moves bytes every few seconds even through TCP
    /// retransmits; a peer silent for 30 s is stalled, not slow.
    pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
    /// One stream may fill the link: 4 MiB in flight covers 1 Gbit/s at
    /// 32 ms round trip (istio's ztunnel uses the same).
    pub const STREAM_WINDOW_BYTES: usize = 4 * 1024 * 1024;
    /// Several streams at full speed, and a bound on what one connection
    /// can make loopmux buffer for slow clients.
    pub const CONNECTION_WINDOW_BYTES: usize = 16 * 1024 * 1024;
    /// A pooled connection is idle most of its life; a PING every 30 s
    /// finds one that died without a FIN long before `idle_timeout`.
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
}

/// Upper bounds: past these a value is a typo, and some would break the
/// runtime (a semaphore holds at most `usize::MAX >> 3` permits).
mod limits {
    pub const MAX_CLIENTS: usize = 1_000_000;
    pub const MAX_CONNECTIONS: usize = 100_000;
    pub const MAX_PENDING: usize = 1_000_000;
    pub const MAX_HEADER_BYTES: usize = 1024 * 1024;
    pub const REQUEST_BUFFER_BYTES: usize = 16 * 1024 * 1024;
    pub const STREAMS: usize = 1_000_000;
    pub const MAX_ORIGINS: usize = 100_000;
    /// RFC 9113 §6.9.1: a window is at most 2^31 - 1.
    pub const WINDOW_BYTES: usize = (1 << 31) - 1;
}

struct Checker {
    problems: Vec<Problem>,
    system_roots: SystemRoots,
}

impl Checker {
    fn fail(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            reason: reason.into(),
        });
    }

    /// The value if it has the right type; a wrong type is a problem.
    fn get<'a, T>(&mut self, key: impl Into<String>, f: &'a Field<T>) -> Option<&'a T> {
        match f {
            Field::Missing => None,
            Field::Given(v) => Some(v),
            Field::Wrong { expected, found } => {
                self.fail(key, format!("expected {expected}, found {found}"));
                None
            }
        }
    }

    fn flag(&mut self, key: String, f: &Field<bool>, default: bool) -> bool {
        self.get(key, f).copied().unwrap_or(default)
    }

    fn duration(&mut self, key: String, f: &Field<String>, default: Duration) -> Duration {
        let Some(raw) = self.get(key.clone(), f) else {
            return default;
        };
        match humantime::parse_duration(raw.trim()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.fail(key, "must be greater than zero");
                default
            }
            Err(e) => {
                self.fail(
                    key,
                    format!(
                        "`{raw}` is not a duration ({e}); write e.g. \"250ms\", \"5s\", \"10m\""
                    ),
                );
                default
            }
        }
    }

    fn count(
        &mut self,
        key: String,
        f: &Field<usize>,
        default: usize,
        range: std::ops::RangeInclusive<usize>,
    ) -> usize {
        match self.get(key.clone(), f).copied() {
            None => default,
            Some(n) if range.contains(&n) => n,
            Some(n) => {
                self.fail(
                    key,
                    format!(
                        "{n} is out of range; allowed: {} to {}",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    fn socket_addr(&mut self, key: String, raw: &str) -> Option<SocketAddr> {
        match raw.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.fail(
                    key,
                    format!("`{raw}` is not a socket address; write \"127.0.0.1:8080\" or \"[::1]:8080\""),
                );
                None
            }
        }
    }

    /// An allow list (forward, serve, intercept): each bad rule named by
    /// its index. With `required`, an empty list is that problem.
    fn rules(
        &mut self,
        key: String,
        f: &Field<Vec<String>>,
        required: Option<&str>,
    ) -> Option<AllowList> {
        let empty = Vec::new();
        let raw = self.get(key.clone(), f).unwrap_or(&empty);
        match AllowList::parse(raw) {
            Ok(l) if l.is_empty() && required.is_some() => {
                if !matches!(f, Field::Wrong { .. }) {
                    self.fail(key, required.unwrap_or_default());
                }
                None
            }
            Ok(l) => Some(l),
            Err(errors) => {
                for (j, reason) in errors {
                    self.fail(format!("{key}[{j}]"), reason);
                }
                None
            }
        }
    }

    fn ips(&mut self, key: &str, f: &Field<Vec<String>>) -> Vec<IpAddr> {
        let empty = Vec::new();
        let raw = self.get(key, f).unwrap_or(&empty);
        let mut out = Vec::with_capacity(raw.len());
        for (i, s) in raw.iter().enumerate() {
            match s.trim().parse::<IpAddr>() {
                Ok(ip) if out.contains(&ip) => {
                    self.fail(format!("{key}[{i}]"), format!("`{ip}` is listed twice"))
                }
                Ok(ip) => out.push(ip),
                Err(_) => self.fail(format!("{key}[{i}]"), format!("`{s}` is not an IP address")),
            }
        }
        out
    }
}

/// Parses `host:port`, `ip:port` or `[v6]:port`.
pub fn parse_endpoint(raw: &str) -> Result<EndpointAddr, String> {
    let raw = raw.trim();
    if let Ok(a) = raw.parse::<SocketAddr>() {
        if a.port() == 0 {
            return Err(format!("port 0 in `{raw}` cannot be dialed"));
        }
        return Ok(EndpointAddr::Ip(a));
    }
    let (host, port) = raw
        .rsplit_once(':')
        .ok_or_else(|| format!("`{raw}` has no port; write host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{port}` in `{raw}` is not a port number"))?;
    if port == 0 {
        return Err(format!("port 0 in `{raw}` cannot be dialed"));
    }
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid_host {
        return Err(format!(
            "`{host}` in `{raw}` is neither an IP address nor a DNS name"
        ));
    }
    Ok(EndpointAddr::Name {
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// Checks `raw` and returns the typed config, or every problem found.
///
/// # Errors
/// One [`Problem`] per bad key, in file order.
pub fn validate(raw: RawConfig) -> Result<Config, Vec<Problem>> {
    let mut c = Checker {
        problems: Vec::new(),
        system_roots: SystemRoots::default(),
    };

    let admin = raw.admin.as_ref().and_then(|a| {
        let bind = c
            .get("admin.bind", &a.bind)
            .map_or("127.0.0.1:9901", String::as_str);
        let bind = c.socket_addr("admin.bind".into(), bind)?;
        if !bind.ip().is_loopback() && !c.flag("admin.allow_remote".into(), &a.allow_remote, false)
        {
            c.fail(
                "admin.bind",
                format!(
                    "{bind} is not a loopback address; set admin.allow_remote = true to expose it"
                ),
            );
        }
        Some(AdminConfig { bind })
    });

    let drain_timeout = match &raw.process {
        Some(p) => c.duration(
            "process.drain_timeout".into(),
            &p.drain_timeout,
            defaults::DRAIN_TIMEOUT,
        ),
        None => defaults::DRAIN_TIMEOUT,
    };
    let threads = match &raw.process {
        Some(p) => c.count(
            "process.threads".into(),
            &p.threads,
            defaults::THREADS,
            0..=1024,
        ),
        None => defaults::THREADS,
    };
    let egress_sources = c.ips("egress.source_addresses", &raw.egress.source_addresses);

    let mut upstreams = Vec::with_capacity(raw.upstreams.len());
    let mut names = HashSet::new();
    for (i, u) in raw.upstreams.iter().enumerate() {
        if let Some(up) = upstream(&mut c, Table::Upstream(i), u, &egress_sources) {
            if !names.insert(up.name.clone()) {
                c.fail(
                    format!("upstream[{i}].name"),
                    format!("`{}` is used by another upstream", up.name),
                );
            }
            upstreams.push(up);
        }
    }

    // Always checked when written, even with no forward listener yet: a
    // mistake there should not wait for the listener that uses it.
    let forward_template = upstream(
        &mut c,
        Table::ForwardDefaults,
        raw.forward_defaults
            .as_ref()
            .unwrap_or(&RawUpstream::default()),
        &egress_sources,
    );

    if raw.listeners.is_empty() && raw.serve.is_none() {
        // Nothing would be served: for `run` a dead process that looks
        // alive, for a reload the removal of every listener.
        c.fail(
            "listener",
            "at least one [[listener]] (or a [serve] section) is required (a config without listeners serves nothing)",
        );
    }
    let mut listeners = Vec::with_capacity(raw.listeners.len());
    let mut lnames = HashSet::new();
    let mut binds = HashSet::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        if let Some(lc) = listener(&mut c, i, l, &upstreams, forward_template.as_ref()) {
            if !lnames.insert(lc.name.clone()) {
                c.fail(
                    format!("listener[{i}].name"),
                    format!("`{}` is used by another listener", lc.name),
                );
            }
            // Port 0 (tests, demo) is a fresh port each time: never a clash.
            if lc.bind.port() != 0 && !binds.insert(lc.bind) {
                c.fail(
                    format!("listener[{i}].bind"),
                    format!("{} is bound by another listener", lc.bind),
                );
            }
            listeners.push(lc);
        }
    }
    if let Some(raw_serve) = &raw.serve {
        if let Some(lc) = serve(&mut c, raw_serve, &egress_sources) {
            if lnames.contains(&lc.name) {
                c.fail(
                    "serve",
                    "a [[listener]] is named `serve`, the name the [serve] section's listener has in logs and metrics",
                );
            }
            if lc.bind.port() != 0 && !binds.insert(lc.bind) {
                c.fail("serve.bind", format!("{} is bound by a listener", lc.bind));
            }
            listeners.push(lc);
        }
    }
    if let Some(a) = &admin {
        if a.bind.port() != 0 && binds.contains(&a.bind) {
            c.fail(
                "admin.bind",
                format!("{} is also a listener's bind", a.bind),
            );
        }
    }

    if c.problems.is_empty() {
        Ok(Config {
            admin,
            drain_timeout,
            threads,
            listeners,
            upstreams,
        })
    } else {
        Err(c.problems)
    }
}

fn required<'a>(c: &mut Checker, key: String, f: &'a Field<String>) -> Option<&'a str> {
    if let Field::Wrong { .. } = f {
        c.get(key, f);
        return None;
    }
    match c.get(key.clone(), f).map(|s| s.trim()) {
        Some(s) if !s.is_empty() => Some(s),
        _ => {
            c.fail(key, "is required");
            None
        }
    }
}

/// Which table an upstream's keys come from.
#[derive(Clone, Copy)]
enum Table {
    /// `[[upstream]]` number i.
    Upstream(usize),
    /// `[forward_defaults]`: no name, endpoints or Host of its own.
    ForwardDefaults,
}

impl Table {
    fn key(self, field: &str) -> String {
        match self {
            Table::Upstream(i) => format!("upstream[{i}].{field}"),
            Table::ForwardDefaults => format!("forward_defaults.{field}"),
        }
    }
}

fn upstream(
    c: &mut Checker,
    table: Table,
    u: &RawUpstream,
    egress: &[IpAddr],
) -> Option<UpstreamConfig> {
    let k = |field: &str| table.key(field);
    let template = matches!(table, Table::ForwardDefaults);
    let name = if template {
        for (field, given) in [
            ("name", u.name != Field::Missing),
            ("endpoints", u.endpoints != Field::Missing),
            ("host_header", u.host_header != Field::Missing),
        ] {
            if given {
                c.fail(
                    k(field),
                    "is not used here: a forward listener takes each request's origin (and Host) from the request",
                );
            }
        }
        "forward".to_string()
    } else {
        required(c, k("name"), &u.name)?.to_string()
    };

    let no_endpoints = Vec::new();
    let raw_endpoints = if template {
        &no_endpoints
    } else {
        c.get(k("endpoints"), &u.endpoints).unwrap_or(&no_endpoints)
    };
    if raw_endpoints.is_empty() && !template {
        c.fail(k("endpoints"), "needs at least one host:port");
    }
    let mut endpoints = Vec::with_capacity(raw_endpoints.len());
    for (j, e) in raw_endpoints.iter().enumerate() {
        match parse_endpoint(e) {
            Ok(ep) if endpoints.contains(&ep) => c.fail(
                format!("{}[{j}]", k("endpoints")),
                format!("`{ep}` is listed twice"),
            ),
            Ok(ep) => endpoints.push(ep),
            Err(reason) => c.fail(format!("{}[{j}]", k("endpoints")), reason),
        }
    }

    let protocol = match c.get(k("protocol"), &u.protocol).map(|p| p.trim()) {
        None | Some("http1") => Protocol::Http1,
        Some("http2") => Protocol::Http2,
        Some("auto") => Protocol::Auto,
        Some(p) => {
            c.fail(
                k("protocol"),
                format!("`{p}` is not one of http1, http2, auto"),
            );
            Protocol::Http1
        }
    };
    let tls = u
        .tls
        .as_ref()
        .and_then(|t| upstream_tls(c, table, t, protocol));
    if protocol == Protocol::Auto && u.tls.is_none() && !template {
        c.fail(
            k("protocol"),
            "`auto` chooses by ALPN, which needs TLS: add tls = { … } or choose http1 or http2",
        );
    }

    let host_header = match (!template)
        .then(|| c.get(k("host_header"), &u.host_header))
        .flatten()
        .map(String::as_str)
    {
        None | Some("keep") => HostHeader::Keep,
        Some(v) => match HeaderValue::from_str(v.trim()) {
            Ok(hv) if !v.trim().is_empty() => HostHeader::Fixed(hv),
            _ => {
                c.fail(
                    k("host_header"),
                    format!("`{v}` is not a valid Host header value"),
                );
                HostHeader::Keep
            }
        },
    };

    let source_addresses = match &u.source_addresses {
        Field::Missing => egress.to_vec(),
        given => c.ips(&k("source_addresses"), given),
    };

    Some(UpstreamConfig {
        name,
        endpoints,
        protocol,
        max_connections: c.count(
            k("max_connections"),
            &u.max_connections,
            defaults::MAX_CONNECTIONS,
            1..=limits::MAX_CONNECTIONS,
        ),
        max_pending: c.count(
            k("max_pending"),
            &u.max_pending,
            defaults::MAX_PENDING,
            0..=limits::MAX_PENDING,
        ),
        queue_timeout: c.duration(
            k("queue_timeout"),
            &u.queue_timeout,
            defaults::QUEUE_TIMEOUT,
        ),
        connect_timeout: c.duration(
            k("connect_timeout"),
            &u.connect_timeout,
            defaults::CONNECT_TIMEOUT,
        ),
        request_timeout: c.duration(
            k("request_timeout"),
            &u.request_timeout,
            defaults::REQUEST_TIMEOUT,
        ),
        body_timeout: c.duration(k("body_timeout"), &u.body_timeout, defaults::BODY_TIMEOUT),
        idle_timeout: c.duration(k("idle_timeout"), &u.idle_timeout, defaults::IDLE_TIMEOUT),
        max_lifetime: c.duration(k("max_lifetime"), &u.max_lifetime, defaults::MAX_LIFETIME),
        host_header,
        source_addresses,
        dns_refresh: c.duration(k("dns_refresh"), &u.dns_refresh, defaults::DNS_REFRESH),
        failure_backoff: c.duration(
            k("failure_backoff"),
            &u.failure_backoff,
            defaults::FAILURE_BACKOFF,
        ),
        tls,
        max_streams_per_connection: match &u.max_streams_per_connection {
            Field::Missing => None,
            f => Some(c.count(
                k("max_streams_per_connection"),
                f,
                limits::STREAMS,
                1..=limits::STREAMS,
            )),
        },
        stream_window_bytes: c.count(
            k("stream_window_bytes"),
            &u.stream_window_bytes,
            defaults::STREAM_WINDOW_BYTES,
            65_535..=limits::WINDOW_BYTES,
        ) as u32,
        connection_window_bytes: c.count(
            k("connection_window_bytes"),
            &u.connection_window_bytes,
            defaults::CONNECTION_WINDOW_BYTES,
            65_535..=limits::WINDOW_BYTES,
        ) as u32,
        keepalive_interval: c.duration(
            k("keepalive_interval"),
            &u.keepalive_interval,
            defaults::KEEPALIVE_INTERVAL,
        ),
        keepalive_timeout: c.duration(
            k("keepalive_timeout"),
            &u.keepalive_timeout,
            defaults::KEEPALIVE_TIMEOUT,
        ),
    })
}

/// `upstream[i].tls`: every file is read and parsed now, so that `check`
/// names the key of an unreadable or mismatched one.
fn upstream_tls(
    c: &mut Checker,
    table: Table,
    t: &RawUpstreamTls,
    protocol: Protocol,
) -> Option<TlsClient> {
    let k = |field: &str| table.key(&format!("tls.{field}"));
    if matches!(table, Table::ForwardDefaults) && t.server_name != Field::Missing {
        c.fail(
            k("server_name"),
            "is not used here: each origin's name is its TLS server name",
        );
    }
    let path = |c: &mut Checker, field: &str, f: &Field<String>| {
        c.get(k(field), f)
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from)
    };
    let settings = TlsSettings {
        server_name: c
            .get(k("server_name"), &t.server_name)
            .map(|s| s.trim().to_string()),
        ca_file: path(c, "ca_file", &t.ca_file),
        client_cert: path(c, "client_cert", &t.client_cert),
        client_key: path(c, "client_key", &t.client_key),
        insecure_skip_verify: c.flag(k("insecure_skip_verify"), &t.insecure_skip_verify, false),
    };
    if settings.insecure_skip_verify && settings.ca_file.is_some() {
        c.fail(
            k("insecure_skip_verify"),
            "contradicts ca_file: either verify against the CA or do not verify",
        );
    }
    let alpn: &[&[u8]] = match protocol {
        Protocol::Http1 => &[b"http/1.1"],
        Protocol::Http2 => &[b"h2"],
        Protocol::Auto => &[b"h2", b"http/1.1"],
    };
    match crate::tls::client::build(&settings, alpn, &c.system_roots) {
        Ok(t) => Some(t),
        Err(problems) => {
            for p in problems {
                c.fail(k(p.field), p.reason);
            }
            None
        }
    }
}

fn listener(
    c: &mut Checker,
    i: usize,
    l: &RawListener,
    upstreams: &[UpstreamConfig],
    forward_template: Option<&UpstreamConfig>,
) -> Option<ListenerConfig> {
    let k = |field: &str| format!("listener[{i}].{field}");
    let name = required(c, k("name"), &l.name)?.to_string();
    let bind = required(c, k("bind"), &l.bind).and_then(|b| c.socket_addr(k("bind"), b));
    let allow_remote = c.flag(k("allow_remote"), &l.allow_remote, false);
    if let Some(b) = bind {
        if !b.ip().is_loopback() && !allow_remote {
            c.fail(
                k("bind"),
                format!("{b} is not a loopback address; set allow_remote = true on this listener to accept remote clients"),
            );
        }
    }
    let mode = match c.get(k("mode"), &l.mode).map(|m| m.trim()) {
        None | Some("http") => Some(Mode::Http),
        Some("forward") => Some(Mode::Forward),
        Some("tcp") => Some(Mode::Tcp),
        Some("tunnel") => Some(Mode::Tunnel),
        Some("intercept") => Some(Mode::Intercept),
        Some(m) => {
            c.fail(
                k("mode"),
                format!("`{m}` is not one of http, forward, tcp, tunnel"),
            );
            None
        }
    };
    let target = if mode == Some(Mode::Tunnel) {
        required(c, k("target"), &l.target).and_then(|t| match parse_endpoint(t) {
            Ok(ep) => match http::uri::Authority::try_from(ep.to_string()) {
                Ok(a) => Some(a),
                Err(_) => {
                    c.fail(
                        k("target"),
                        format!("`{t}` is not a valid CONNECT authority"),
                    );
                    None
                }
            },
            Err(reason) => {
                c.fail(k("target"), reason);
                None
            }
        })
    } else {
        if l.target != Field::Missing {
            c.fail(k("target"), "only applies to mode = \"tunnel\"");
        }
        None
    };
    let half_close_timeout = if matches!(
        mode,
        Some(Mode::Tcp | Mode::Tunnel | Mode::Forward | Mode::Intercept)
    ) {
        c.duration(
            k("half_close_timeout"),
            &l.half_close_timeout,
            defaults::HALF_CLOSE_TIMEOUT,
        )
    } else {
        if l.half_close_timeout != Field::Missing {
            c.fail(
                k("half_close_timeout"),
                "only applies to raw relays: mode = \"tcp\", \"tunnel\", \"forward\" (CONNECT) or \"intercept\"",
            );
        }
        defaults::HALF_CLOSE_TIMEOUT
    };
    let intercept = match mode {
        Some(Mode::Intercept) => intercept(c, i, l.intercept.as_ref()).map(Box::new),
        _ => {
            if l.intercept.is_some() {
                c.fail(k("intercept"), "only applies to mode = \"intercept\"");
            }
            None
        }
    };
    let forward = match mode {
        Some(Mode::Forward) => forward(c, i, l, forward_template).map(Box::new),
        // Interception carries HTTP/1 over per-destination pools as forward
        // mode does: the same routing, with the destinations as allow list.
        Some(Mode::Intercept) => intercept.as_ref().and_then(|ic| {
            Some(Box::new(ForwardConfig {
                allow: ic.destinations.clone(),
                originate_tls: AllowList::default(),
                max_origins: defaults::MAX_ORIGINS,
                via: false,
                origin: forward_template?.clone(),
            }))
        }),
        _ => {
            for (field, given) in [
                ("allow", l.allow != Field::Missing),
                ("max_origins", l.max_origins != Field::Missing),
                ("originate_tls", l.originate_tls != Field::Missing),
                ("via", l.via != Field::Missing),
            ] {
                if given {
                    c.fail(k(field), "only applies to mode = \"forward\"");
                }
            }
            None
        }
    };
    if matches!(mode, Some(Mode::Tcp | Mode::Tunnel)) {
        // HTTP-only keys on a raw listener: a mistake worth naming.
        for (field, given) in [
            ("client_keepalive", l.client_keepalive != Field::Missing),
            ("header_timeout", l.header_timeout != Field::Missing),
            ("max_header_bytes", l.max_header_bytes != Field::Missing),
            ("access_log", l.access_log != Field::Missing),
            (
                "request_buffer_bytes",
                l.request_buffer_bytes != Field::Missing,
            ),
            ("body_timeout", l.body_timeout != Field::Missing),
        ] {
            if given {
                c.fail(
                    k(field),
                    "only applies to HTTP listeners (mode = \"http\" or \"forward\")",
                );
            }
        }
    } else {
        for (field, given) in [
            ("idle_timeout", l.idle_timeout != Field::Missing),
            ("on_connect_error", l.on_connect_error != Field::Missing),
        ] {
            if given {
                c.fail(k(field), "only applies to mode = \"tcp\" or \"tunnel\"");
            }
        }
    }
    let upstream = match (mode, c.get(k("upstream"), &l.upstream).map(|u| u.trim())) {
        (Some(Mode::Forward | Mode::Intercept), None) => None,
        (Some(Mode::Intercept), Some(_)) => {
            c.fail(
                k("upstream"),
                "does not apply to mode = \"intercept\": each connection goes where it was going",
            );
            None
        }
        (Some(Mode::Forward), Some(_)) => {
            c.fail(
                k("upstream"),
                "does not apply to mode = \"forward\": each request names its origin; pool settings come from [forward_defaults]",
            );
            None
        }
        (m, None | Some("")) => {
            c.fail(
                k("upstream"),
                format!(
                    "is required for mode = \"{}\"",
                    m.unwrap_or(Mode::Http).as_str()
                ),
            );
            None
        }
        (m, Some(u)) => match upstreams.iter().position(|up| up.name == u) {
            Some(idx) if m == Some(Mode::Tunnel) => {
                let up = &upstreams[idx];
                if up.protocol != Protocol::Http2 {
                    c.fail(
                        k("upstream"),
                        format!("upstream `{u}` has protocol = \"{}\": a tunnel listener needs protocol = \"http2\" (one CONNECT stream per client connection)", up.protocol.as_str()),
                    );
                }
                Some(idx)
            }
            Some(idx) if m == Some(Mode::Tcp) => {
                let up = &upstreams[idx];
                if up.tls.is_some() || up.protocol != Protocol::Http1 {
                    c.fail(
                        k("upstream"),
                        format!("upstream `{u}` has tls or protocol = \"{}\": a tcp listener carries raw bytes over plain TCP", up.protocol.as_str()),
                    );
                }
                Some(idx)
            }
            Some(idx) => Some(idx),
            None => {
                c.fail(k("upstream"), format!("no [[upstream]] is named `{u}`"));
                None
            }
        },
    };
    let mode = mode?;
    if matches!(mode, Mode::Http | Mode::Tcp | Mode::Tunnel) && upstream.is_none() {
        return None;
    }
    let idle_timeout = c.duration(
        k("idle_timeout"),
        &l.idle_timeout,
        defaults::TCP_IDLE_TIMEOUT,
    );
    let on_connect_error = match c
        .get(k("on_connect_error"), &l.on_connect_error)
        .map(|v| v.trim())
    {
        None | Some("close") => OnConnectError::Close,
        Some("reset") => OnConnectError::Reset,
        Some(v) => {
            c.fail(
                k("on_connect_error"),
                format!("`{v}` is not one of close, reset"),
            );
            OnConnectError::Close
        }
    };
    if matches!(mode, Mode::Forward | Mode::Intercept) && forward.is_none() {
        return None;
    }
    if mode == Mode::Intercept && intercept.is_none() {
        return None;
    }
    let header_timeout = c.duration(
        k("header_timeout"),
        &l.header_timeout,
        defaults::HEADER_TIMEOUT,
    );
    let max_clients = c.count(
        k("max_clients"),
        &l.max_clients,
        defaults::MAX_CLIENTS,
        1..=limits::MAX_CLIENTS,
    );
    let max_header_bytes = c.count(
        k("max_header_bytes"),
        &l.max_header_bytes,
        defaults::MAX_HEADER_BYTES,
        1024..=limits::MAX_HEADER_BYTES,
    );
    let request_buffer_bytes = c.count(
        k("request_buffer_bytes"),
        &l.request_buffer_bytes,
        defaults::REQUEST_BUFFER_BYTES,
        0..=limits::REQUEST_BUFFER_BYTES,
    );
    let body_timeout = c.duration(k("body_timeout"), &l.body_timeout, defaults::BODY_TIMEOUT);
    // Interception frees the app's ports only when loopmux closes first
    // (the app's TIME_WAIT keeps the original 4-tuple otherwise).
    let client_keepalive = c.flag(
        k("client_keepalive"),
        &l.client_keepalive,
        mode != Mode::Intercept,
    );
    if mode == Mode::Intercept && client_keepalive {
        c.fail(
            k("client_keepalive"),
            "must be false for mode = \"intercept\": loopmux closes first, so the app's port is free at once",
        );
    }
    let access_log = c.flag(k("access_log"), &l.access_log, false);
    let http = HttpKeys {
        client_keepalive,
        header_timeout,
        max_header_bytes,
        access_log,
        request_buffer_bytes,
        body_timeout,
    };
    let relay = |upstream| RelayKeys {
        upstream,
        idle_timeout,
        half_close_timeout,
        on_connect_error,
    };
    // Each arm's parts were checked above: a missing one has been
    // reported, and the listener is left out.
    let mode = match mode {
        Mode::Http => ModeConfig::Http {
            upstream: upstream?,
            http,
        },
        Mode::Forward => ModeConfig::Forward {
            forward: forward?,
            http,
            half_close_timeout,
        },
        Mode::Tcp => ModeConfig::Tcp(relay(upstream?)),
        Mode::Tunnel => ModeConfig::Tunnel {
            relay: relay(upstream?),
            target: target?,
        },
        Mode::Intercept => ModeConfig::Intercept {
            intercept: intercept?,
            forward: forward?,
            http,
            half_close_timeout,
        },
        // `[serve]` is not a `[[listener]]` mode (see `serve`).
        Mode::Serve => return None,
    };
    Some(ListenerConfig {
        name,
        bind: bind?,
        max_clients,
        mode,
    })
}

/// `listener[i].intercept`.
fn intercept(
    c: &mut Checker,
    i: usize,
    t: Option<&super::raw::RawIntercept>,
) -> Option<InterceptConfig> {
    let k = |field: &str| format!("listener[{i}].intercept.{field}");
    let Some(t) = t else {
        c.fail(
            format!("listener[{i}].intercept"),
            "is required for mode = \"intercept\": intercept = { uids = [...], destinations = [...] }",
        );
        return None;
    };
    let empty_n = Vec::new();
    let empty_s = Vec::new();
    let mut uids = Vec::new();
    for (j, u) in c
        .get(k("uids"), &t.uids)
        .unwrap_or(&empty_n)
        .iter()
        .enumerate()
    {
        match u32::try_from(*u) {
            Ok(u) => uids.push(u),
            Err(_) => c.fail(format!("{}[{j}]", k("uids")), format!("{u} is not a uid")),
        }
    }
    let cgroups: Vec<String> = c
        .get(k("cgroups"), &t.cgroups)
        .unwrap_or(&empty_s)
        .iter()
        .map(|g| g.trim().trim_matches('/').to_string())
        .collect();
    if uids.is_empty() && cgroups.is_empty() {
        c.fail(
            k("uids"),
            "uids or cgroups must name whose connections are intercepted",
        );
    }
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    if uids.contains(&own) {
        c.fail(
            k("uids"),
            format!("includes {own}, loopmux's own uid: its upstream connections would be intercepted too (a loop)"),
        );
    }
    if let Ok(mine) = std::fs::read_to_string("/proc/self/cgroup") {
        let mine = mine
            .trim()
            .rsplit("::")
            .next()
            .unwrap_or("")
            .trim_matches('/')
            .to_string();
        if !mine.is_empty()
            && cgroups
                .iter()
                .any(|g| mine == *g || mine.starts_with(&format!("{g}/")))
        {
            c.fail(
                k("cgroups"),
                format!("includes loopmux's own cgroup ({mine}): its upstream connections would be intercepted too (a loop)"),
            );
        }
    }
    let destinations = match c.rules(
        k("destinations"),
        &t.destinations,
        Some("is required: the destinations (IP, CIDR or name, with :port or :*) whose connections are intercepted"),
    ) {
        None => None,
        Some(l) => match l.kernel_matches() {
            Err(rule) => {
                c.fail(
                    k("destinations"),
                    format!("`{rule}`: the kernel matches addresses, ranges and names (resolved) with ports; not deny rules, wildcards or `*`"),
                );
                None
            }
            Ok(m)
                if m.iter().any(|m| {
                    matches!(
                        m,
                        crate::allow::KernelMatch::Net {
                            base: IpAddr::V6(_),
                            ..
                        }
                    )
                }) =>
            {
                c.fail(
                    k("destinations"),
                    "IPv6 destinations are not intercepted in this version",
                );
                None
            }
            Ok(_) => Some(l),
        },
    };
    let mut opaque_ports = Vec::new();
    for (j, p) in c
        .get(k("opaque_ports"), &t.opaque_ports)
        .unwrap_or(&empty_n)
        .iter()
        .enumerate()
    {
        match u16::try_from(*p) {
            Ok(p) if p != 0 => opaque_ports.push(p),
            _ => c.fail(
                format!("{}[{j}]", k("opaque_ports")),
                format!("{p} is not a port"),
            ),
        }
    }
    let detect_timeout = c.duration(
        k("detect_timeout"),
        &t.detect_timeout,
        Duration::from_millis(300),
    );
    Some(InterceptConfig {
        uids,
        cgroups,
        destinations: destinations?,
        opaque_ports,
        detect_timeout,
    })
}

/// A forward listener's own keys, on top of the `[forward_defaults]`
/// template.
fn forward(
    c: &mut Checker,
    i: usize,
    l: &RawListener,
    template: Option<&UpstreamConfig>,
) -> Option<ForwardConfig> {
    let k = |field: &str| format!("listener[{i}].{field}");
    let allow = c.rules(
        k("allow"),
        &l.allow,
        Some("is required for mode = \"forward\" and must list at least one destination (host:port, *.domain:port, CIDR:port; \"*:*\" allows everything)"),
    );
    let originate_tls = c.rules(k("originate_tls"), &l.originate_tls, None);
    let max_origins = c.count(
        k("max_origins"),
        &l.max_origins,
        defaults::MAX_ORIGINS,
        1..=limits::MAX_ORIGINS,
    );
    let via = c.flag(k("via"), &l.via, false);
    let mut origin = template?.clone();
    if origin.tls.is_none() && originate_tls.as_ref().is_some_and(|t| !t.is_empty()) {
        // TLS toward origins without a [forward_defaults.tls]: the system
        // roots, each origin's name as the server name.
        let alpn: &[&[u8]] = match origin.protocol {
            Protocol::Http1 => &[b"http/1.1"],
            Protocol::Http2 => &[b"h2"],
            Protocol::Auto => &[b"h2", b"http/1.1"],
        };
        match crate::tls::client::build(&TlsSettings::default(), alpn, &c.system_roots) {
            Ok(t) => origin.tls = Some(t),
            Err(problems) => {
                for p in problems {
                    c.fail(
                        k("originate_tls"),
                        format!(
                            "TLS toward origins cannot be set up: {}: {}",
                            p.field, p.reason
                        ),
                    );
                }
            }
        }
    }
    let allow = allow?;
    Some(ForwardConfig {
        allow,
        originate_tls: originate_tls?,
        max_origins,
        via,
        origin,
    })
}

/// Defaults of `[serve]`.
mod serve_defaults {
    use std::time::Duration;
    pub const MAX_CONNECTIONS: usize = 1024;
    /// As many as `MAX_CONNECTIONS`: every client reconnecting at once
    /// after a restart still gets its handshake.
    pub const MAX_HANDSHAKES: usize = 1024;
    pub const MAX_STREAMS: usize = 1000;
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
}

/// `[serve]`, as the listener that serves it (named `serve`).
fn serve(c: &mut Checker, s: &super::raw::RawServe, egress: &[IpAddr]) -> Option<ListenerConfig> {
    let k = |field: &str| format!("serve.{field}");
    let bind = required(c, k("bind"), &s.bind).and_then(|b| c.socket_addr(k("bind"), b));
    let allow_remote = c.flag(k("allow_remote"), &s.allow_remote, false);
    if let Some(b) = bind {
        if !b.ip().is_loopback() && !allow_remote {
            c.fail(
                k("bind"),
                format!("{b} is not a loopback address; set serve.allow_remote = true to accept tunnel clients from other hosts"),
            );
        }
    }
    let allow_unauthenticated = c.flag(k("allow_unauthenticated"), &s.allow_unauthenticated, false);
    let path = |c: &mut Checker, field: &str, f: &Field<String>| {
        c.get(k(field), f)
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from)
    };
    let tls = match &s.tls {
        None => {
            c.fail(
                k("tls"),
                "is required: tls = { cert = \"…\", key = \"…\", client_ca = \"…\" }",
            );
            None
        }
        Some(t) => {
            let cert = path(c, "tls.cert", &t.cert);
            let key = path(c, "tls.key", &t.key);
            let client_ca = path(c, "tls.client_ca", &t.client_ca);
            if cert.is_none() {
                c.fail(k("tls.cert"), "is required");
            }
            if key.is_none() {
                c.fail(k("tls.key"), "is required");
            }
            if client_ca.is_none() && !allow_unauthenticated {
                c.fail(
                    k("tls.client_ca"),
                    "is required: tunnel clients must present a certificate from this CA (mTLS), unless serve.allow_unauthenticated = true",
                );
            }
            if client_ca.is_some() && allow_unauthenticated {
                c.fail(
                    k("allow_unauthenticated"),
                    "contradicts tls.client_ca: either require client certificates or do not",
                );
            }
            match (cert, key) {
                (Some(cert), Some(key)) => {
                    match crate::tls::server::build(&cert, &key, client_ca.as_deref()) {
                        Ok(t) => Some(t),
                        Err(problems) => {
                            for p in problems {
                                c.fail(k(&format!("tls.{}", p.field)), p.reason);
                            }
                            None
                        }
                    }
                }
                _ => None,
            }
        }
    };
    let allow = c.rules(
        k("allow"),
        &s.allow,
        Some("is required and must list at least one target (host:port, *.domain:port, CIDR:port)"),
    );
    let max_connections = c.count(
        k("max_connections"),
        &s.max_connections,
        serve_defaults::MAX_CONNECTIONS,
        1..=limits::MAX_CLIENTS,
    );
    let max_handshakes = c.count(
        k("max_handshakes"),
        &s.max_handshakes,
        serve_defaults::MAX_HANDSHAKES,
        1..=limits::MAX_CLIENTS,
    );
    let max_streams = c.count(
        k("max_streams_per_connection"),
        &s.max_streams_per_connection,
        serve_defaults::MAX_STREAMS,
        1..=limits::STREAMS,
    ) as u32;
    let source_addresses = match &s.source_addresses {
        Field::Missing => egress.to_vec(),
        given => c.ips(&k("source_addresses"), given),
    };
    let cfg = ServeConfig {
        tls: tls?,
        allow: allow?,
        max_connections,
        max_handshakes,
        max_streams_per_connection: max_streams,
        idle_timeout: c.duration(
            k("idle_timeout"),
            &s.idle_timeout,
            serve_defaults::IDLE_TIMEOUT,
        ),
        handshake_timeout: c.duration(
            k("handshake_timeout"),
            &s.handshake_timeout,
            serve_defaults::HANDSHAKE_TIMEOUT,
        ),
        half_close_timeout: c.duration(
            k("half_close_timeout"),
            &s.half_close_timeout,
            defaults::HALF_CLOSE_TIMEOUT,
        ),
        connect_timeout: c.duration(
            k("connect_timeout"),
            &s.connect_timeout,
            defaults::CONNECT_TIMEOUT,
        ),
        failure_backoff: c.duration(
            k("failure_backoff"),
            &s.failure_backoff,
            defaults::FAILURE_BACKOFF,
        ),
        source_addresses,
        stream_window_bytes: c.count(
            k("stream_window_bytes"),
            &s.stream_window_bytes,
            defaults::STREAM_WINDOW_BYTES,
            65_535..=limits::WINDOW_BYTES,
        ) as u32,
        connection_window_bytes: c.count(
            k("connection_window_bytes"),
            &s.connection_window_bytes,
            defaults::CONNECTION_WINDOW_BYTES,
            65_535..=limits::WINDOW_BYTES,
        ) as u32,
    };
    Some(ListenerConfig {
        name: "serve".into(),
        bind: bind?,
        // Every socket the serve role holds: the role itself splits them
        // into handshakes and connections past theirs.
        max_clients: max_connections + max_handshakes,
        mode: ModeConfig::Serve(Box::new(cfg)),
    })
}
