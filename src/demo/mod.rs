//! `loopmux demo`: a self-contained before/after on loopback. An in-process
//! origin; N short connections straight to it (client closes first, as a
//! legacy app does), then the same N through an in-process loopmux.

pub mod load;
pub mod origin;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::app::App;
use crate::diagnose::{count_toward, read_sockets, TIME_WAIT};
use load::{Closer, LoadReport, LoadSpec};
use origin::Origin;

#[derive(Debug, Clone)]
pub struct DemoSpec {
    pub requests: usize,
    pub concurrency: usize,
    pub max_connections: usize,
    pub progress: bool,
}

#[derive(Debug, Clone)]
pub struct PhaseResult {
    pub name: &'static str,
    pub report: LoadReport,
    pub upstream_accepted: u64,
    pub time_wait_toward_upstream: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the demo origin: {0}")]
    Origin(std::io::Error),
    #[error("cannot start loopmux: {0}")]
    Start(String),
}

async fn phase(
    name: &'static str,
    target: SocketAddr,
    closer: Closer,
    origin: &Origin,
    spec: &DemoSpec,
) -> PhaseResult {
    let before = origin.stats.accepted.load(Ordering::Relaxed);
    let mut ls = LoadSpec::new(target, spec.requests, spec.concurrency, closer);
    let done = Arc::new(AtomicUsize::new(0));
    ls.done = Some(done.clone());
    let bar = spec.progress.then(|| {
        let b = indicatif::ProgressBar::new(spec.requests as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>16} [{bar:40}] {pos}/{len} {per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_prefix(name);
        b
    });
    let ticker = bar.clone().map(|b| {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                b.set_position(done.load(Ordering::Relaxed) as u64);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let report = load::run(ls).await;
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(b) = bar {
        b.set_position(done.load(Ordering::Relaxed) as u64);
        b.finish();
    }
    let time_wait_toward_upstream = read_sockets()
        .map(|s| count_toward(&s, origin.addr, TIME_WAIT))
        .unwrap_or(0);
    PhaseResult {
        name,
        report,
        upstream_accepted: origin.stats.accepted.load(Ordering::Relaxed) - before,
        time_wait_toward_upstream,
    }
}

/// Runs both phases and returns their results.
///
/// # Errors
/// When the origin or loopmux cannot start on loopback.
pub async fn run(spec: DemoSpec) -> Result<Vec<PhaseResult>, DemoError> {
    // A second origin port per phase keeps the TIME_WAIT counts apart.
    let direct_origin = Origin::start("127.0.0.1:0".parse().expect("literal address"))
        .await
        .map_err(DemoError::Origin)?;
    let direct = phase(
        "direct",
        direct_origin.addr,
        Closer::Client,
        &direct_origin,
        &spec,
    )
    .await;

    let origin = Origin::start("127.0.0.1:0".parse().expect("literal address"))
        .await
        .map_err(DemoError::Origin)?;
    let toml = format!(
        "[[listener]]\nname = \"demo\"\nbind = \"127.0.0.1:0\"\nupstream = \"origin\"\nclient_keepalive = false\n\n\
         [[upstream]]\nname = \"origin\"\nendpoints = [\"{}\"]\nmax_connections = {}\nmax_pending = {}\n",
        origin.addr,
        spec.max_connections,
        spec.concurrency.max(1024)
    );
    let cfg = crate::config::load_str(&toml, Default::default())
        .map_err(|e| DemoError::Start(e.to_string()))?;
    let bound = crate::app::bind_all(&cfg).map_err(|e| DemoError::Start(e.to_string()))?;
    let app = App::start(cfg, bound)
        .await
        .map_err(|e| DemoError::Start(e.to_string()))?;
    let through = phase(
        "through loopmux",
        app.local_addrs()[0],
        Closer::Client,
        &origin,
        &spec,
    )
    .await;
    app.stop(Duration::from_secs(5)).await;
    Ok(vec![direct, through])
}

/// The results as a table.
pub fn render(results: &[PhaseResult]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| phase | requests | ok | errors | req/s | p50 | p99 | upstream connections | TIME_WAIT toward upstream |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let errors = if r.report.errors.is_empty() {
            "0".to_string()
        } else {
            r.report
                .errors
                .iter()
                .map(|(k, v)| format!("{v} × {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {:.0} | {:.2} ms | {:.2} ms | {} | {} |",
            r.name,
            r.report.ok + r.report.error_count() + r.report.not_started,
            r.report.ok,
            errors,
            r.report.rate(),
            r.report.percentile(0.5).as_secs_f64() * 1e3,
            r.report.percentile(0.99).as_secs_f64() * 1e3,
            r.upstream_accepted,
            r.time_wait_toward_upstream
        );
    }
    o
}
