//! The request path: arbitrary bytes from a client into an in-process
//! loopmux listener in front of an in-process upstream. No panic anywhere
//! (a panic in any task aborts the process, so the fuzzer sees it), and
//! every exchange ends: loopmux answers and/or closes the connection after
//! the client has sent its bytes and half-closed.
//!
//! `run_forward` sends the bytes to a forward listener of the same loopmux
//! instead, with `ORIGIN` in the input replaced by the origin's address and
//! `SELF` by the listener's own (so seeds can name both).

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Harness {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    forward: SocketAddr,
    origin: SocketAddr,
    _keep: Mutex<(loopmux::demo::origin::Origin, loopmux::app::App)>,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        // tokio catches task panics; a fuzzer must not miss them.
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            prev(info);
            std::process::abort();
        }));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (origin, app, addr, forward) = rt.block_on(async {
            let origin = loopmux::demo::origin::Origin::start("127.0.0.1:0".parse().unwrap())
                .await
                .expect("origin");
            let toml = format!(
                "[[listener]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\nupstream = \"u\"\nheader_timeout = \"1s\"\nbody_timeout = \"1s\"\nrequest_buffer_bytes = 1024\naccess_log = true\n\n[[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\nmax_connections = 2\nqueue_timeout = \"1s\"\nrequest_timeout = \"2s\"\nbody_timeout = \"1s\"\n\n\
                 [[listener]]\nname = \"fwd\"\nbind = \"127.0.0.2:0\"\nmode = \"forward\"\nheader_timeout = \"1s\"\nbody_timeout = \"1s\"\nrequest_buffer_bytes = 1024\nmax_origins = 4\n\
                 allow = [\"127.0.0.0/8:*\", \"localhost:*\", \"!127.0.0.1:1-1024\"]\noriginate_tls = [\"localhost:1-1000\"]\n\n\
                 [forward_defaults]\nmax_connections = 2\nqueue_timeout = \"1s\"\nconnect_timeout = \"1s\"\nrequest_timeout = \"2s\"\nbody_timeout = \"1s\"\nidle_timeout = \"1s\"\n",
                origin.addr
            );
            let cfg = loopmux::config::load_str(&toml, Default::default()).expect("config");
            let bound = loopmux::app::bind_all(&cfg).expect("bind");
            let app = loopmux::app::App::start(cfg, bound).await.expect("start");
            let addr = app.local_addrs()[0];
            let forward = app.local_addrs()[1];
            (origin, app, addr, forward)
        });
        Harness {
            rt,
            addr,
            forward,
            origin: origin.addr,
            _keep: Mutex::new((origin, app)),
        }
    })
}

pub fn run(data: &[u8]) {
    let h = harness();
    exchange(h, h.addr, data);
}

pub fn run_forward(data: &[u8]) {
    let h = harness();
    let text = String::from_utf8_lossy(data)
        .replace("ORIGIN", &h.origin.to_string())
        .replace("SELF", &h.forward.to_string());
    exchange(h, h.forward, text.as_bytes());
}

fn exchange(h: &Harness, to: SocketAddr, data: &[u8]) {
    h.rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(to)
            .await
            .expect("loopmux accepts");
        // loopmux may answer and close before reading everything.
        let _ = s.write_all(data).await;
        let _ = s.shutdown().await;
        let mut buf = vec![0u8; 64 * 1024];
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    Ok(Ok(_)) => {}
                    Err(_) => return false,
                }
            }
        })
        .await;
        assert!(
            matches!(ended, Ok(true)),
            "exchange neither answered nor closed: {:?}",
            String::from_utf8_lossy(&data[..data.len().min(200)])
        );
    });
}
