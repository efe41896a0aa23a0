//! Replays the fuzz targets' seeds and every input the fuzzer ever crashed
//! on (fuzz/regressions/<target>/), on stable, through the same harness
//! code the fuzz targets run (`scripts/fuzz` runs the fuzzer itself).

use std::path::{Path, PathBuf};

#[path = "../fuzz/harness/allow.rs"]
mod allow_harness;
#[path = "../fuzz/harness/config.rs"]
mod config_harness;
#[path = "../fuzz/harness/proc_net_tcp.rs"]
mod proc_harness;
#[path = "../fuzz/harness/request.rs"]
mod request_harness;

/// Every file of the target's seeds and regressions (by listing the
/// directories, not by extension).
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            if e.path().is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    assert!(
        !out.is_empty(),
        "no inputs for {target}: the test would prove nothing"
    );
    out
}

fn replay(target: &str, run: fn(&[u8])) {
    for path in inputs(target) {
        eprintln!("{target}: {}", path.display());
        run(&std::fs::read(&path).unwrap());
    }
}

#[test]
fn config_inputs() {
    replay("config", config_harness::run);
}

#[test]
fn proc_net_tcp_inputs() {
    replay("proc_net_tcp", proc_harness::run);
}

#[test]
fn request_inputs() {
    replay("request", request_harness::run);
}

#[test]
fn allow_inputs() {
    replay("allow", allow_harness::run);
}

#[test]
fn forward_request_inputs() {
    replay("forward_request", request_harness::run_forward);
}
