//! Reload: new listeners bound, removed ones drain, changed upstreams get new
//! pools while in-flight requests finish, with zero failed requests.

mod support;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use loopmux::demo::load::{Closer, LoadSpec};
use support::*;

fn config(listeners: &[(&str, &str)], origin: std::net::SocketAddr) -> loopmux::config::Config {
    let mut toml = String::new();
    for (name, bind) in listeners {
        toml.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"{bind}\"\nupstream = \"u\"\n\n"
        ));
    }
    toml.push_str(&format!(
        "[[upstream]]\nname = \"u\"\nendpoints = [\"{origin}\"]\nmax_connections = 4\n"
    ));
    loopmux::config::load_str(&toml, HashMap::new()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_nothing() {
    let a = origin().await;
    let b = origin().await;
    let cfg = config(&[("main", "127.0.0.1:0"), ("old", "127.0.0.2:0")], a.addr);
    let bound = loopmux::app::bind_all(&cfg).unwrap();
    let mut app = loopmux::app::App::start(cfg, bound).await.unwrap();
    let (main, old) = (app.local_addrs()[0], app.local_addrs()[1]);

    let mut spec = LoadSpec::new(main, 3_000, 8, Closer::Client);
    spec.deadline = Duration::from_secs(60);
    let load = tokio::spawn(loopmux::demo::load::run(spec));
    // A slow request in flight on the old upstream across the reload.
    let slow_url = format!("http://{main}/slow/600");
    let slow = tokio::spawn(async move { curl(&["-w", " %{http_code}", &slow_url]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = a.stats.requests.load(Ordering::Relaxed);
    assert!(before > 0, "load started before the reload");

    let generation = app.shared.generation();
    app.reload(config(
        &[("main", "127.0.0.1:0"), ("new", "127.0.0.3:0")],
        b.addr,
    ))
    .await
    .unwrap();
    assert_eq!(app.shared.generation(), generation + 1);
    assert_eq!(
        app.local_addrs()[0],
        main,
        "an unchanged listener keeps its socket"
    );
    let new = app.local_addrs()[1];

    let r = load.await.unwrap();
    assert_eq!(r.ok, 3_000, "errors across the reload: {:?}", r.errors);
    let (code, out, err) = slow.await.unwrap();
    assert_eq!((code, out.as_str()), (0, "slow ok\n 200"), "{err}");
    assert!(
        b.stats.requests.load(Ordering::Relaxed) > 0,
        "the changed upstream gets the new requests"
    );
    assert!(b.stats.accepted.load(Ordering::Relaxed) <= 4);

    let (code, out, err) = curl(&[&format!("http://{new}/")]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "ok\n"),
        "new listener serves: {err}"
    );
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(old).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the removed listener stopped accepting");
    // The old upstream's idle connections were closed at the reload.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        a.stats.active.load(Ordering::Relaxed),
        0,
        "old pool connections closed"
    );
    assert!(app.stop(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn reload_that_cannot_bind_changes_nothing() {
    let a = origin().await;
    let cfg = config(&[("main", "127.0.0.1:0")], a.addr);
    let bound = loopmux::app::bind_all(&cfg).unwrap();
    let mut app = loopmux::app::App::start(cfg, bound).await.unwrap();
    let main = app.local_addrs()[0];
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let err = app
        .reload(config(&[("main", "127.0.0.1:0"), ("clash", &busy)], a.addr))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("listener[1].bind (clash)"),
        "{err}"
    );
    assert_eq!(app.local_addrs(), vec![main]);
    let (code, out, _) = curl(&[&format!("http://{main}/")]).await;
    assert_eq!((code, out.as_str()), (0, "ok\n"));
    app.stop(Duration::from_secs(1)).await;
}
