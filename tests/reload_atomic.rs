//! A reload is all-or-nothing (DESIGN invariant 8): here the last step
//! that can fail, installing the interception rules, fails after every
//! socket of the new config was bound. The running listeners, upstream
//! pools, config and rules stay exactly as they were.
//!
//! `nft` is a stand-in on PATH that records each script it is given and
//! refuses a script that holds the text in its marker file (its own test
//! binary: PATH is the process's). No root needed: nothing reaches the
//! kernel's tables.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(10);

struct Fake {
    dir: PathBuf,
}

impl Fake {
    fn new() -> Fake {
        let dir = std::env::temp_dir().join(format!("lmx-fake-nft-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = format!(
            "#!/bin/sh\nin=$(cat)\nprintf '%s\\n--- end of call\\n' \"$in\" >> '{d}/calls'\n\
             if [ -s '{d}/refuse' ] && printf '%s' \"$in\" | grep -qF -f '{d}/refuse'; then\n\
             echo 'Error: refused by the test' >&2; exit 1; fi\nexit 0\n",
            d = dir.display()
        );
        let nft = dir.join("nft");
        std::fs::write(&nft, script).unwrap();
        std::fs::set_permissions(&nft, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::var("PATH").unwrap_or_default();
        std::env::set_var("PATH", format!("{}:{path}", dir.display()));
        Fake { dir }
    }

    /// Refuses every script that holds `text` (`None`: refuses nothing).
    fn refuse(&self, text: Option<&str>) {
        let marker = self.dir.join("refuse");
        match text {
            Some(t) => std::fs::write(marker, t).unwrap(),
            None => {
                let _ = std::fs::remove_file(marker);
            }
        }
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.join("calls")).unwrap_or_default()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(origin: std::net::SocketAddr, extra: &str, max_connections: usize) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"u\"\n\n\
         [[listener]]\nname = \"legacy\"\nbind = \"127.0.0.1:0\"\nmode = \"intercept\"\n\
         intercept = {{ uids = [65534], destinations = [\"198.18.4.2:8302\"{extra}] }}\n\n\
         [[upstream]]\nname = \"u\"\nendpoints = [\"{origin}\"]\nmax_connections = {max_connections}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_rules_nft_refuses_changes_nothing() {
    let fake = Fake::new();
    let o = origin().await;
    let first = loopmux::config::load_str(&config(o.addr, "", 4), Default::default()).unwrap();
    let bound = loopmux::app::bind_all(&first).unwrap();
    let mut app = loopmux::app::App::start(first, bound).await.unwrap();
    let addrs = app.local_addrs();
    let generation = app.shared.generation();
    assert!(
        fake.calls().contains("198.18.4.2"),
        "no table at start: {}",
        fake.calls()
    );

    // A second destination (a new redirect port, bound) and a changed
    // upstream cap: every step before the rules succeeds, then nft refuses.
    fake.refuse(Some("8304"));
    let before_calls = fake.calls().len();
    let next = loopmux::config::load_str(
        &config(o.addr, ", \"198.18.4.2:8304\"", 1),
        Default::default(),
    )
    .unwrap();
    let e = app.reload(next).await.unwrap_err().to_string();
    assert!(e.contains("refused by the test"), "{e}");

    // Nothing changed: sockets, generation, config, pools, rules.
    assert_eq!(app.local_addrs(), addrs);
    assert_eq!(app.shared.generation(), generation);
    assert_eq!(app.config().listeners.len(), 2);
    let ic = app.config().listeners[1].mode.intercept().unwrap();
    assert_eq!(ic.destinations.len(), 1, "the config was swapped");
    let up = &app.upstreams()[0];
    assert_eq!(up.cfg.max_connections, 4, "the upstream was swapped");
    // The pools were not reconfigured in place either: two slow requests
    // at once still get two connections (the new cap would allow one).
    let slow = |p: std::net::SocketAddr| async move {
        support::raw_upstream::exchange(
            p,
            b"GET /slow/400 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            WAIT,
        )
        .await
        .status
    };
    let (a, b) = tokio::join!(slow(addrs[0]), slow(addrs[0]));
    assert_eq!((a, b), (200, 200));
    let peak = o
        .stats
        .peak_active
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(peak, 2, "the pool's cap changed under the failed reload");
    // The old table was put back (the refused attempt, then the old one).
    let since = &fake.calls()[before_calls..];
    assert!(
        since.contains("8304"),
        "the new table was not tried: {since}"
    );
    // The calls since: the refused new table, then the old one again,
    // which names only the first destination (a renewal of the old rules
    // may come before them).
    let calls: Vec<&str> = since
        .split("--- end of call")
        .filter(|c| !c.trim().is_empty())
        .collect();
    let refused = calls
        .iter()
        .position(|c| c.contains("8304"))
        .unwrap_or_else(|| panic!("the new table was not tried: {since}"));
    let put_back = calls
        .get(refused + 1)
        .unwrap_or_else(|| panic!("the old table was not put back: {since}"));
    assert!(
        put_back.contains("table inet loopmux {")
            && put_back.contains("8302")
            && !put_back.contains("8304"),
        "the call after the refused one is not the old table: {put_back}"
    );
    assert_eq!(
        app.shared.intercept_current(),
        Some(true),
        "the old rules are not being renewed"
    );
    // And the running listener still serves.
    let seen = support::raw_upstream::exchange(
        addrs[0],
        b"GET /bytes/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(seen.status, 200, "{}", seen.head);

    // Once nft takes it, the same reload goes through.
    fake.refuse(None);
    let next = loopmux::config::load_str(
        &config(o.addr, ", \"198.18.4.2:8304\"", 1),
        Default::default(),
    )
    .unwrap();
    app.reload(next).await.unwrap();
    assert_eq!(app.shared.generation(), generation + 1);
    assert_eq!(app.upstreams()[0].cfg.max_connections, 1);
    app.stop(Duration::from_secs(2)).await;
}
