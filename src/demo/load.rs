//! A bounded load driver: N requests, each on a new TCP connection, C at a
//! time, the way a legacy app behaves. Used by the lab, tests and benches.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::sockopt::errno_text;

/// Who closes each connection first, and so who holds its TIME_WAIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closer {
    /// Keep-alive request; the client closes after the response (a legacy
    /// app). TIME_WAIT lands on the client.
    Client,
    /// `Connection: close`; the client reads to EOF.
    Server,
}

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub path: String,
    pub requests: usize,
    pub concurrency: usize,
    pub closer: Closer,
    /// Bind this source (with `IP_BIND_ADDRESS_NO_PORT`) instead of the
    /// kernel's choice.
    pub source: Option<IpAddr>,
    /// Stop issuing requests after this long, whatever is left.
    pub deadline: Duration,
    /// Per request.
    pub timeout: Duration,
    /// Incremented after each request, for progress display.
    pub done: Option<Arc<AtomicUsize>>,
}

impl LoadSpec {
    pub fn new(target: SocketAddr, requests: usize, concurrency: usize, closer: Closer) -> Self {
        LoadSpec {
            target,
            path: "/".into(),
            requests,
            concurrency,
            closer,
            source: None,
            deadline: Duration::from_secs(120),
            timeout: Duration::from_secs(10),
            done: None,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub ok: usize,
    /// Error kind (`connect: EADDRNOTAVAIL …`, `status 502`) → count.
    pub errors: BTreeMap<String, usize>,
    /// Requests never started because the deadline passed.
    pub not_started: usize,
    pub elapsed: Duration,
    /// Sorted latencies of successful requests.
    pub latencies: Vec<Duration>,
}

impl LoadReport {
    pub fn error_count(&self) -> usize {
        self.errors.values().sum()
    }

    pub fn errors_matching(&self, needle: &str) -> usize {
        self.errors
            .iter()
            .filter(|(k, _)| k.contains(needle))
            .map(|(_, v)| v)
            .sum()
    }

    pub fn rate(&self) -> f64 {
        (self.ok + self.error_count()) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i =
            ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        self.latencies[i]
    }
}

enum Outcome {
    Ok(Duration),
    Err(String),
}

/// Runs the load and reports. Never runs past `deadline` + one `timeout`.
pub async fn run(spec: LoadSpec) -> LoadReport {
    let spec = Arc::new(spec);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(spec.concurrency);
    for _ in 0..spec.concurrency.max(1) {
        let (spec, next) = (spec.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let request = request_bytes(&spec);
            while next.fetch_add(1, Ordering::Relaxed) < spec.requests {
                if started.elapsed() > spec.deadline {
                    break;
                }
                let t = Instant::now();
                let r = match tokio::time::timeout(spec.timeout, one(&spec, &request)).await {
                    Ok(Ok(())) => Outcome::Ok(t.elapsed()),
                    Ok(Err(e)) => Outcome::Err(e),
                    Err(_) => Outcome::Err("timeout".into()),
                };
                out.push(r);
                if let Some(d) = &spec.done {
                    d.fetch_add(1, Ordering::Relaxed);
                }
            }
            out
        }));
    }
    let mut report = LoadReport::default();
    for w in workers {
        for o in w.await.unwrap_or_default() {
            match o {
                Outcome::Ok(d) => {
                    report.ok += 1;
                    report.latencies.push(d);
                }
                Outcome::Err(e) => *report.errors.entry(e).or_default() += 1,
            }
        }
    }
    report.elapsed = started.elapsed();
    report.not_started = spec
        .requests
        .saturating_sub(report.ok + report.error_count());
    report.latencies.sort_unstable();
    report
}

fn request_bytes(spec: &LoadSpec) -> Vec<u8> {
    let conn = match spec.closer {
        Closer::Client => "",
        Closer::Server => "Connection: close\r\n",
    };
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n{conn}\r\n",
        spec.path, spec.target
    )
    .into_bytes()
}

async fn connect(spec: &LoadSpec) -> io::Result<TcpStream> {
    let Some(src) = spec.source else {
        return TcpStream::connect(spec.target).await;
    };
    let s = Socket::new(
        Domain::for_address(spec.target),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    crate::sockopt::set_bind_address_no_port(&s)?;
    s.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
    TcpSocket::from_std_stream(s.into())
        .connect(spec.target)
        .await
}

async fn one(spec: &LoadSpec, request: &[u8]) -> Result<(), String> {
    let mut s = connect(spec)
        .await
        .map_err(|e| format!("connect: {}", errno_text(&e)))?;
    s.write_all(request)
        .await
        .map_err(|e| format!("write: {}", errno_text(&e)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 8192];
    let (status, body_start, len) = loop {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {}", errno_text(&e)))?;
        if n == 0 {
            return Err("read: EOF before response head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])
                .map_err(|_| "read: head is not UTF-8".to_string())?;
            let status: u16 = head
                .get(9..12)
                .and_then(|s| s.parse().ok())
                .ok_or("read: no status code")?;
            let len = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            break (status, end + 4, len);
        }
    };
    let mut have = buf.len() - body_start;
    match (spec.closer, len) {
        (Closer::Client, Some(len)) => {
            while have < len {
                let n = s
                    .read(&mut chunk)
                    .await
                    .map_err(|e| format!("read: {}", errno_text(&e)))?;
                if n == 0 {
                    return Err("read: EOF inside body".into());
                }
                have += n;
            }
            // Close first, as the legacy app does.
        }
        _ => loop {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {}", errno_text(&e)))?;
            if n == 0 {
                break;
            }
        },
    }
    drop(s);
    if status == 200 {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
