//! Root-only test scaffolding: network namespaces of a test's own, a
//! thread that runs inside one, child processes killed by their pid, and
//! the skip-or-fail rule (as a normal user a root test says it skipped and
//! why; with LOOPMUX_LAB_REQUIRED=1, as in CI, it fails instead).

use std::process::Command;

/// Why a root test cannot run here: not root, or a tool missing
/// (`(program, Debian package)`, probed with `--version`).
pub fn why_not(tools: &[(&str, &str)]) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("it needs root for network namespaces".into());
    }
    for (tool, pkg) in tools {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("`{tool}` is not installed ({pkg})"));
        }
    }
    None
}

/// `true` when the test may go on; otherwise says SKIPPED, or panics when
/// the run requires it (CI).
pub fn may_run(test: &str, tools: &[(&str, &str)]) -> bool {
    let Some(why) = why_not(tools) else {
        return true;
    };
    if std::env::var("LOOPMUX_LAB_REQUIRED").as_deref() == Ok("1") {
        panic!("LOOPMUX_LAB_REQUIRED=1 but {test} cannot run: {why}");
    }
    eprintln!("SKIPPED {test}: {why}. Run as root (CI does).");
    false
}

/// Runs a program to its end.
///
/// # Errors
/// Its stderr, when it fails.
pub fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace, removed on drop (also after a failed assertion).
pub struct Ns(pub String);

impl Ns {
    pub fn new(name: String) -> Ns {
        run(&["ip", "netns", "add", &name]).unwrap();
        Ns(name)
    }

    /// Runs `args` inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["ip", "netns", "exec", self.0.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Runs `f` on a new thread inside namespace `ns`. Sockets created there,
/// and by threads and processes it starts, live in `ns`.
pub fn in_netns<R: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> std::thread::JoinHandle<R> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: a valid namespace fd; setns affects only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// A two-worker runtime, for a thread made by [`in_netns`].
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A child process, killed by its pid on drop.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `nft list tables` in the current namespace.
pub fn nft_tables() -> String {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
