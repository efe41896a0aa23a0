//! Memory per idle client connection (`cargo bench --bench idle_memory`):
//! the loopmux binary with one http listener; 10,000 client connections
//! opened and left idle (no request yet), then closed. Prints loopmux's
//! resident memory (VmRSS) before, with them open, and after they closed.
//! Under `cargo test` it runs with 500 connections so it cannot rot, and
//! fails if an idle connection costs 8 KiB or more.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn raise_fd_limit(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: a valid rlimit; failure leaves the limit as it was.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = if full { 10_000 } else { 500 };
    raise_fd_limit(65_536);
    let origin = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("loopmux-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("idle.toml");
    let mut f = std::fs::File::create(&config).unwrap();
    write!(
        f,
        "[[listener]]\nname = \"idle\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"u\"\nheader_timeout = \"10m\"\nmax_clients = 100000\n\n\
         [[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\n",
        origin.local_addr().unwrap()
    )
    .unwrap();
    let lm = Proc(
        Command::new(
            std::env::var_os("LOOPMUX_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_loopmux").into()),
        )
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..200 {
        if TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = lm.0.id();
    let before = rss_kib(pid);
    let conns: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_secs(1));
    let open = rss_kib(pid);
    drop(conns);
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid);
    let per = (open.saturating_sub(before)) as f64 / n as f64;
    println!(
        "idle client connections: {n} (loopmux {}, one http listener)",
        env!("CARGO_PKG_VERSION")
    );
    println!("| loopmux RSS before | with them open | after they closed | added per connection |");
    println!("|---|---|---|---|");
    println!(
        "| {:.1} MiB | {:.1} MiB | {:.1} MiB | {per:.1} KiB |",
        before as f64 / 1024.0,
        open as f64 / 1024.0,
        after as f64 / 1024.0
    );
    drop(lm);
    let _ = std::fs::remove_dir_all(&dir);
    // Issue 11's budget is 40 MiB for 10,000 idle clients (4 KiB each);
    // 8 KiB leaves room for an allocator extent landing among few
    // connections, and still fails the 17 KiB that hyper's per-connection
    // buffers cost before a client's first byte was waited for apart.
    assert!(
        per < 8.0,
        "an idle client connection costs {per:.1} KiB of loopmux's memory (budget 4 KiB)"
    );
}
