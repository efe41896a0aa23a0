//! The `loopmux` command: parse, load config, hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc, chosen on measurement (`benches/idle_memory.rs`, callgrind):
/// against glibc's malloc it costs about 3,800 fewer instructions per
/// proxied request (tokio's cache-aligned task and I/O allocations are
/// slow `posix_memalign` calls in glibc) and gives freed memory back to
/// the kernel; mimalloc was as fast but kept every page it had touched.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its start. Freed pages go back to the
/// kernel after about a second, by a background thread, so memory comes
/// down after a burst of clients even when no new work arrives to trigger
/// the purge (jemalloc's default waits 10 s, and only on activity).
/// `MALLOC_CONF`-style overrides still apply through `_RJEM_MALLOC_CONF`.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Exit code for a config that cannot be used (sysexits EX_USAGE... EX_CONFIG is 78;
/// we follow the house rule: 64).
const EXIT_BAD_CONFIG: u8 = 64;
const EXIT_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(
    name = "loopmux",
    version,
    about = "Local egress proxy: many short client connections in, a few long-lived upstream connections out. Ends EADDRNOTAVAIL from ephemeral-port exhaustion."
)]
struct Cli {
    /// Log format: text for terminals, json for log shippers. Levels come
    /// from RUST_LOG (e.g. `info,loopmux::access=info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run until SIGTERM or SIGINT (in-flight requests drain first).
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file: exit 0, or 64 with each bad key and why.
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Self-contained before/after on loopback: direct vs through loopmux.
    Demo {
        /// Requests per phase, each on a new connection.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// loopmux's max_connections toward the demo origin.
        #[arg(long, default_value_t = 8)]
        max_connections: usize,
        /// No progress bar (for scripts).
        #[arg(long)]
        quiet: bool,
    },
    /// Interception's kernel rules: `--remove` deletes loopmux's nftables
    /// table (leftovers after a crash; the systemd drop-in runs it after stop).
    Intercept {
        #[arg(long)]
        remove: bool,
    },
    /// Report ephemeral-port exhaustion risk on this host, per destination.
    Diagnose {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Read a copy of /proc laid out under DIR (DIR/net/tcp, DIR/sys/net/ipv4/...).
        #[arg(long, value_name = "DIR")]
        proc: Option<PathBuf>,
        /// How many destinations to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's output is its table; its own loopmux's start line is noise.
    let default_level = if matches!(cli.cmd, Cmd::Demo { .. }) {
        "warn"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        // journald and log files want no colour codes.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    match cli.cmd {
        Cmd::Check { config } => match loopmux::config::load_file(&config) {
            Ok(c) => {
                for w in loopmux::config::unresolved_endpoints(&c) {
                    eprintln!("{}: warning: {w}", config.display());
                }
                println!(
                    "{}: ok ({} listeners, {} upstreams)",
                    config.display(),
                    c.listeners.len(),
                    c.upstreams.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: invalid config:\n{e}", config.display());
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Cmd::Run { config } => run(&config),
        Cmd::Intercept { remove } => {
            if !remove {
                eprintln!("nothing to do: loopmux intercept --remove deletes the `inet loopmux` nftables table");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match rt.block_on(loopmux::intercept::rules::remove()) {
                Ok(()) => {
                    println!("nftables table inet loopmux removed (or there was none)");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Cmd::Demo {
            requests,
            concurrency,
            max_connections,
            quiet,
        } => demo(loopmux::demo::DemoSpec {
            requests,
            concurrency: concurrency.max(1),
            max_connections: max_connections.max(1),
            progress: !quiet,
        }),
        Cmd::Diagnose { json, proc, top } => {
            let src = match proc {
                Some(dir) => loopmux::diagnose::ProcSource::fixture(&dir),
                None => loopmux::diagnose::ProcSource::live(),
            };
            match loopmux::diagnose::diagnose(&src) {
                Ok(mut report) => {
                    if json {
                        report.destinations.truncate(top);
                        match serde_json::to_string_pretty(&report) {
                            Ok(j) => println!("{j}"),
                            Err(e) => {
                                eprintln!("cannot encode the report: {e}");
                                return ExitCode::from(EXIT_FAILURE);
                            }
                        }
                    } else {
                        print!("{}", report.render(top));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    runtime_with(0)
}

/// `threads`: worker threads, 0 for one per core (`process.threads`).
fn runtime_with(threads: usize) -> Result<tokio::runtime::Runtime, ExitCode> {
    // One thread: the current-thread scheduler, on the main thread. It
    // skips the work-stealing machinery (atomics, a parked worker to wake),
    // about 1,850 fewer instructions per proxied request under callgrind.
    let mut b = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 0 {
            b.worker_threads(threads);
        }
        b
    };
    b.enable_all().build().map_err(|e| {
        eprintln!("cannot start the runtime: {e}");
        ExitCode::from(EXIT_FAILURE)
    })
}

fn demo(spec: loopmux::demo::DemoSpec) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    println!(
        "loopmux demo: {} requests per phase, {} concurrent, a new connection per request (client closes first); loopmux max_connections = {}",
        spec.requests, spec.concurrency, spec.max_connections
    );
    match rt.block_on(loopmux::demo::run(spec)) {
        Ok(results) => {
            println!("\n{}", loopmux::demo::render(&results));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let cfg = match loopmux::config::load_file(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: invalid config:\n{e}", path.display());
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let bound = match loopmux::app::bind_all(&cfg) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let rt = match runtime_with(cfg.threads) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let mut signals = match loopmux::shutdown::Signals::install() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot install signal handlers: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        let mut app = match loopmux::app::App::start(cfg, bound).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        loopmux::systemd::ready();
        loopmux::systemd::spawn_watchdog();
        loop {
            match signals.next().await {
                loopmux::shutdown::Request::Stop(sig) => {
                    tracing::info!(signal = sig, drain_timeout = %humantime::format_duration(app.config().drain_timeout), "stopping: draining in-flight requests");
                    break;
                }
                loopmux::shutdown::Request::Reload => {
                    loopmux::systemd::reloading();
                    tracing::info!(config = %path.display(), "SIGHUP: reloading");
                    match loopmux::config::load_file(path) {
                        Ok(cfg) => {
                            if cfg.threads != app.config().threads {
                                tracing::warn!(running = app.config().threads, configured = cfg.threads, "process.threads takes effect at the next start, not on reload");
                            }
                            if let Err(e) = app.reload(cfg).await {
                                tracing::error!(error = %e, "reload failed; the running config stays");
                            }
                        }
                        Err(e) => {
                            for line in e.to_string().lines() {
                                tracing::error!(config = %path.display(), problem = %line, "invalid config; the running config stays");
                            }
                        }
                    }
                    loopmux::systemd::ready();
                }
            }
        }
        loopmux::systemd::stopping();
        let drain = app.config().drain_timeout;
        let clean = app.stop(drain).await;
        tracing::info!(clean, "stopped");
        ExitCode::SUCCESS
    })
}
