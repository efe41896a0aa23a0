//! An upstream that misbehaves on purpose, and a raw client that shows
//! exactly what loopmux sent back (framing included). Loopback only; every
//! wait is bounded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One step of what the upstream does after reading a request.
#[derive(Clone, Debug)]
pub enum Step {
    Write(Vec<u8>),
    Sleep(Duration),
    /// Keep the connection open until loopmux closes it (counted in
    /// `closed_by_loopmux`) or 20 s pass.
    Hold,
}

pub fn write(bytes: impl AsRef<[u8]>) -> Step {
    Step::Write(bytes.as_ref().to_vec())
}

/// A chunked body carrying `data` in one chunk.
pub fn chunked(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n0\r\n\r\n");
    v
}

pub struct RawUpstream {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    /// Request heads received, one per connection, as text.
    pub heads: Arc<Mutex<Vec<String>>>,
    pub closed_by_loopmux: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    /// Every connection: read one request head (and a `Content-Length`
    /// body), then play `script`, then close.
    pub async fn start(script: Vec<Step>) -> RawUpstream {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicUsize::new(0));
        let (a, h, c) = (accepted.clone(), heads.clone(), closed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                a.fetch_add(1, Ordering::SeqCst);
                let (script, h, c) = (script.clone(), h.clone(), c.clone());
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(30), serve_one(s, script, h, c))
                            .await;
                });
            }
        });
        RawUpstream {
            addr,
            accepted,
            heads,
            closed_by_loopmux: closed,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn closed_by_loopmux(&self) -> usize {
        self.closed_by_loopmux.load(Ordering::SeqCst)
    }

    /// Waits (at most 5 s) until loopmux has closed `n` connections, and
    /// returns how many it had.
    pub async fn wait_closed_by_loopmux(&self, n: usize) -> usize {
        for _ in 0..50 {
            if self.closed_by_loopmux() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.closed_by_loopmux()
    }

    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

async fn serve_one(
    mut s: TcpStream,
    script: Vec<Step>,
    heads: Arc<Mutex<Vec<String>>>,
    closed: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok());
    heads.lock().unwrap().push(head);
    if let Some(len) = len {
        let mut have = buf.len() - head_end;
        while have < len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    // loopmux gave up on this request mid-body.
                    closed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Ok(n) => have += n,
            }
        }
    }
    for step in script {
        match step {
            Step::Write(b) => {
                if s.write_all(&b).await.is_err() {
                    return;
                }
            }
            Step::Sleep(d) => tokio::time::sleep(d).await,
            Step::Hold => {
                let read = tokio::time::timeout(Duration::from_secs(20), async {
                    loop {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                })
                .await;
                if read.is_ok() {
                    closed.fetch_add(1, Ordering::SeqCst);
                }
                return;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The value of header `name` (case-insensitive) in a raw head.
pub fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// What a raw client saw.
#[derive(Debug)]
pub struct Seen {
    pub status: u16,
    pub head: String,
    /// The body decoded by the framing the client saw.
    pub body: Vec<u8>,
    /// The body's framing was complete (all promised bytes, or the final
    /// chunk).
    pub framed: bool,
    /// loopmux closed the connection (EOF or reset) within the wait.
    pub closed: bool,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        header(&self.head, name)
    }
}

/// Sends `request`, then reads for at most `wait` (until EOF) and parses
/// the first response.
pub async fn exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> Seen {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    read_response(&mut s, wait).await
}

pub async fn read_response(s: &mut TcpStream, wait: Duration) -> Seen {
    let mut out = Vec::new();
    let mut chunk = [0u8; 65536];
    let deadline = tokio::time::Instant::now() + wait;
    let mut closed = false;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => break,
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => {
                out.extend_from_slice(&chunk[..n]);
                if parse(&out).is_some_and(|p| p.framed) && !wait_for_close(&out) {
                    break;
                }
            }
        }
    }
    let mut seen = parse(&out).unwrap_or(Seen {
        status: 0,
        head: String::from_utf8_lossy(&out).into_owned(),
        body: Vec::new(),
        framed: false,
        closed: false,
    });
    seen.closed = closed;
    seen
}

/// A response that says `Connection: close` is read to the close.
fn wait_for_close(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw);
    header(&text, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
}

fn parse(raw: &[u8]) -> Option<Seen> {
    let end = find(raw, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let rest = &raw[end..];
    let (body, framed) = if header(&head, "transfer-encoding").is_some() {
        dechunk(rest)
    } else if let Some(n) = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        (rest[..rest.len().min(n)].to_vec(), rest.len() >= n)
    } else {
        (rest.to_vec(), status == 204 || status == 304)
    };
    Some(Seen {
        status,
        head,
        body,
        framed,
        closed: false,
    })
}

fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(eol) = find(rest, b"\r\n") else {
            return (body, false);
        };
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
        else {
            return (body, false);
        };
        rest = &rest[eol + 2..];
        if size == 0 {
            return (body, find(rest, b"\r\n").is_some());
        }
        if rest.len() < size + 2 {
            body.extend_from_slice(&rest[..rest.len().min(size)]);
            return (body, false);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// A metric's value from loopmux's `/metrics` (0 when absent).
pub async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text, _) = super::curl(&[&format!("http://{admin}/metrics")]).await;
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// A peer that accepts, reads whatever comes, and never writes a byte: a
/// TLS server stuck after the ClientHello, or an HTTP/2 server that never
/// sends its SETTINGS. With `tls`, it first finishes a real handshake
/// (ALPN as that config offers), then goes silent the same way.
pub struct SilentPeer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SilentPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SilentPeer {
    pub async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> SilentPeer {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                a.fetch_add(1, Ordering::SeqCst);
                let tls = tls.clone();
                tokio::spawn(tokio::time::timeout(Duration::from_secs(30), async move {
                    match tls {
                        None => drain(s).await,
                        Some(cfg) => {
                            if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(s).await {
                                drain(s).await;
                            }
                        }
                    }
                }));
            }
        });
        SilentPeer {
            addr,
            accepted,
            task,
        }
    }
}

async fn drain(mut s: impl tokio::io::AsyncRead + Unpin) {
    let mut chunk = [0u8; 4096];
    while let Ok(n) = s.read(&mut chunk).await {
        if n == 0 {
            return;
        }
    }
}

/// An HTTP/2 server (prior knowledge) whose flow-control window never
/// opens: its SETTINGS say INITIAL_WINDOW_SIZE = 0 and it never sends a
/// WINDOW_UPDATE, so a request body cannot move. It acknowledges SETTINGS
/// and PINGs, never answers a request, and counts the HEADERS it got.
pub struct ZeroWindowH2 {
    pub addr: SocketAddr,
    pub streams: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ZeroWindowH2 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const H2_HEADERS: u8 = 0x1;
const H2_SETTINGS: u8 = 0x4;
const H2_PING: u8 = 0x6;
const H2_ACK: u8 = 0x1;

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

impl ZeroWindowH2 {
    pub async fn start() -> ZeroWindowH2 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let streams = Arc::new(AtomicUsize::new(0));
        let st = streams.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let st = st.clone();
                tokio::spawn(tokio::time::timeout(
                    Duration::from_secs(30),
                    zero_window(s, st),
                ));
            }
        });
        ZeroWindowH2 {
            addr,
            streams,
            task,
        }
    }
}

async fn zero_window(mut s: TcpStream, streams: Arc<AtomicUsize>) {
    // SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 0, sent at once: a server may
    // send its preface before it has read the client's.
    let settings = h2_frame(H2_SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0]);
    if s.write_all(&settings).await.is_err() {
        return;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let mut preface = false;
    loop {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if !preface {
            if buf.len() < 24 {
                continue;
            }
            buf.drain(..24);
            preface = true;
        }
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            let reply = match kind {
                H2_SETTINGS if flags & H2_ACK == 0 => Some(h2_frame(H2_SETTINGS, H2_ACK, 0, &[])),
                H2_PING if flags & H2_ACK == 0 => Some(h2_frame(H2_PING, H2_ACK, 0, &payload)),
                H2_HEADERS => {
                    streams.fetch_add(1, Ordering::SeqCst);
                    None
                }
                // DATA cannot come (the window is 0); anything else is
                // ignored.
                _ => None,
            };
            if let Some(r) = reply {
                if s.write_all(&r).await.is_err() {
                    return;
                }
            }
        }
    }
}
