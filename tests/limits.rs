//! DESIGN invariant 8: limits hold at every moment, reloads and drains
//! included.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use loopmux::demo::load::{Closer, LoadSpec};
use support::raw_upstream::metric;
use support::*;
use tokio::net::TcpStream;

fn config(toml: &str) -> loopmux::config::Config {
    loopmux::config::load_str(toml, HashMap::new()).unwrap()
}

async fn active(admin: SocketAddr) -> f64 {
    metric(
        admin,
        "loopmux_listener_connections_active",
        &[("listener", "t")],
    )
    .await
}

/// Opens `n` client connections that send nothing and stay open.
async fn idle_clients(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(TcpStream::connect(addr).await.unwrap());
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_holds_across_reloads() {
    let o = origin().await;
    // A long header timeout: the idle clients must stay connected.
    let toml = one_upstream_with_admin(o.addr, "max_clients = 50\nheader_timeout = \"60s\"", "");
    let (mut app, addr) = start(&toml).await;
    let admin = app.admin_addr.unwrap();
    let _clients = idle_clients(addr, 120).await;
    for _ in 0..3 {
        app.reload(config(&toml)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = active(admin).await;
    assert!(n <= 50.0, "{n} clients served with max_clients = 50");
    assert_eq!(n, 50.0, "the limit is used, not lost");

    // A lower limit takes effect as clients leave: none is admitted until
    // the count is under it.
    app.reload(config(
        &toml.replace("max_clients = 50", "max_clients = 10"),
    ))
    .await
    .unwrap();
    drop(_clients);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _more = idle_clients(addr, 30).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = active(admin).await;
    assert_eq!(n, 10.0, "the lowered limit holds");
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn at_the_client_limit_the_gauge_and_time_say_so() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream_with_admin(
        o.addr,
        "max_clients = 2\nheader_timeout = \"60s\"",
        "",
    ))
    .await;
    let admin = app.admin_addr.unwrap();
    let l = [("listener", "t")];
    assert_eq!(metric(admin, "loopmux_listener_at_limit", &l).await, 0.0);
    let clients = idle_clients(addr, 3).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(metric(admin, "loopmux_listener_at_limit", &l).await, 1.0);
    let secs = metric(admin, "loopmux_listener_at_limit_seconds_total", &l).await;
    assert!(secs > 0.0, "time at the limit is counted: {secs}");
    drop(clients);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(metric(admin, "loopmux_listener_at_limit", &l).await, 0.0);
    app.stop(Duration::from_secs(1)).await;
}

/// Six reloads under load that change max_connections between 8 and 4:
/// never more than 8 upstream connections at once (30 were seen before),
/// no failed request, and the pool's connections survive the reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_endpoint_cap_holds_through_reloads() {
    let o = origin().await;
    let toml = |max: usize| one_upstream(o.addr, "", &format!("max_connections = {max}"));
    let (mut app, addr) = start(&toml(8)).await;
    let mut spec = LoadSpec::new(addr, 6_000, 32, Closer::Client);
    spec.deadline = Duration::from_secs(60);
    let load = tokio::spawn(loopmux::demo::load::run(spec));
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        app.reload(config(&toml(if i % 2 == 0 { 4 } else { 8 })))
            .await
            .unwrap();
    }
    let r = load.await.unwrap();
    assert!(r.errors.is_empty() && r.ok == 6_000, "{:?}", r.errors);
    let peak = o.stats.peak_active.load(Ordering::SeqCst);
    assert!(
        peak <= 8,
        "peak {peak} upstream connections with a cap of 8"
    );

    // Now at 8 after the last reload: only a timeout changes, the pool and
    // its connections stay (no new dials).
    let accepted = o.stats.accepted.load(Ordering::SeqCst);
    app.reload(config(&one_upstream(
        o.addr,
        "",
        "max_connections = 8\nrequest_timeout = \"20s\"",
    )))
    .await
    .unwrap();
    let mut spec = LoadSpec::new(addr, 500, 8, Closer::Client);
    spec.deadline = Duration::from_secs(30);
    let r = loopmux::demo::load::run(spec).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        o.stats.accepted.load(Ordering::SeqCst),
        accepted,
        "a reload that changes no address keeps the connections"
    );
    app.stop(Duration::from_secs(1)).await;
}

/// After a reload to a lower cap the open count comes down to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_cap_is_reached_after_the_reload() {
    let o = origin().await;
    let toml = |max: usize| one_upstream(o.addr, "", &format!("max_connections = {max}"));
    let (mut app, addr) = start(&toml(8)).await;
    let mut spec = LoadSpec::new(addr, 2_000, 16, Closer::Client);
    spec.deadline = Duration::from_secs(30);
    assert!(loopmux::demo::load::run(spec).await.errors.is_empty());
    app.reload(config(&toml(2))).await.unwrap();
    let mut spec = LoadSpec::new(addr, 2_000, 16, Closer::Client);
    spec.deadline = Duration::from_secs(30);
    assert!(loopmux::demo::load::run(spec).await.errors.is_empty());
    let open: usize = app.upstreams()[0]
        .endpoints()
        .iter()
        .map(|e| e.pool.snapshot().open)
        .sum();
    assert!(open <= 2, "{open} open after lowering the cap to 2");
    assert!(o.stats.active.load(Ordering::SeqCst) <= 2);
    app.stop(Duration::from_secs(1)).await;
}

/// When the drain starts, the listening socket closes: a new client is
/// refused at once while the slow request in flight still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_connections_and_finishes_old_ones() {
    let o = origin().await;
    let (app, addr) = start(&one_upstream(o.addr, "", "")).await;
    let url = format!("http://{addr}/slow/1500");
    let slow = tokio::spawn(async move { curl(&["-w", " %{http_code}", &url]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = tokio::spawn(app.stop(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = TcpStream::connect(addr)
        .await
        .expect_err("refused while draining");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    let (code, out, _) = slow.await.unwrap();
    assert_eq!((code, out.as_str()), (0, "slow ok\n 200"));
    assert!(stop.await.unwrap(), "the drain finished cleanly");
}
