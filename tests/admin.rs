//! The admin endpoint: /metrics parsed with a Prometheus text parser,
//! /healthz, /readyz, /status.

mod support;

use std::time::Duration;

use support::*;

fn value(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test]
async fn metrics_health_ready_and_status() {
    let o = origin().await;
    let (_guard, dead) = refusing_addr();
    let toml = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n{}\n[[listener]]\nname = \"broken\"\nbind = \"127.0.0.2:0\"\nupstream = \"dead\"\n\n[[upstream]]\nname = \"dead\"\nendpoints = [\"{dead}\"]\nsource_addresses = [\"127.0.0.9\"]\n",
        one_upstream(o.addr, "", "max_connections = 2")
    );
    let (app, addr) = start(&toml).await;
    let admin = app.admin_addr.expect("admin bound");
    let broken = app.local_addrs()[1];
    let r = loopmux::demo::load::run(loopmux::demo::load::LoadSpec::new(
        addr,
        50,
        4,
        loopmux::demo::load::Closer::Server,
    ))
    .await;
    assert_eq!(r.ok, 50);
    let (_, out, err) = curl(&["-w", " %{http_code}", &format!("http://{broken}/")]).await;
    assert!(out.ends_with(" 502"), "{out} {err}");

    let (code, text, err) = curl(&[&format!("http://{admin}/metrics")]).await;
    assert_eq!(code, 0, "{err}");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text parses");
    let s = &scrape.samples;
    assert_eq!(
        value(
            s,
            "loopmux_listener_connections_accepted_total",
            &[("listener", "t")]
        ),
        Some(50.0),
        "{text}"
    );
    assert_eq!(
        value(
            s,
            "loopmux_listener_responses_total",
            &[("listener", "t"), ("class", "2xx")]
        ),
        Some(50.0)
    );
    assert_eq!(
        value(
            s,
            "loopmux_listener_responses_total",
            &[("listener", "broken"), ("class", "5xx")]
        ),
        Some(1.0)
    );
    let open = value(
        s,
        "loopmux_upstream_connections",
        &[("upstream", "u"), ("state", "open")],
    )
    .unwrap_or_else(|| panic!("{text}"));
    assert!((1.0..=2.0).contains(&open), "open {open}");
    let connects = value(s, "loopmux_upstream_connects_total", &[("upstream", "u")]).unwrap();
    assert!((1.0..=2.0).contains(&connects));
    assert_eq!(
        value(
            s,
            "loopmux_upstream_connect_errors_total",
            &[("upstream", "dead"), ("errno", "ECONNREFUSED")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            s,
            "loopmux_source_eaddrnotavail_total",
            &[("upstream", "dead"), ("source", "127.0.0.9")]
        ),
        Some(0.0)
    );
    assert!(
        text.contains("loopmux_request_duration_seconds_count{listener=\"t\"} 50\n"),
        "{text}"
    );

    let (_, out, _) = curl(&[&format!("http://{admin}/healthz")]).await;
    assert_eq!(out, "ok\n");
    let (_, out, _) = curl(&[
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &format!("http://{admin}/readyz"),
    ])
    .await;
    assert_eq!(out, "200");
    let (_, out, _) = curl(&[&format!("http://{admin}/status")]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(v["listeners"][0]["name"], "t");
    assert_eq!(
        v["upstreams"][0]["endpoints"][0]["addr"],
        o.addr.to_string()
    );
    assert_eq!(v["upstreams"][1]["sources"][0]["ip"], "127.0.0.9");
    let (_, out, _) = curl(&[
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &format!("http://{admin}/nope"),
    ])
    .await;
    assert_eq!(out, "404");
    app.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn admin_bind_must_be_loopback() {
    let err = loopmux::config::load_str("[admin]\nbind = \"0.0.0.0:9901\"\n", Default::default())
        .unwrap_err();
    assert!(err.to_string().contains("admin.bind"), "{err}");
    let listener = one_upstream("127.0.0.1:9".parse().unwrap(), "", "");
    loopmux::config::load_str(
        &format!("[admin]\nbind = \"0.0.0.0:9901\"\nallow_remote = true\n{listener}"),
        Default::default(),
    )
    .unwrap();
}
