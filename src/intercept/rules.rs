//! The kernel rules interception needs, owned by loopmux: one nftables
//! table (`inet loopmux`) installed at start, replaced on reload, removed
//! on a clean stop (`loopmux intercept --remove` after a crash). Uses
//! Debian's `nft` program: one transaction per change, the same syntax an
//! operator reads and types, no netlink code of our own.
//!
//! Failing open: the rules match only destinations held in sets whose
//! elements expire after [`ELEMENT_TTL`]; loopmux puts them back every
//! [`HEARTBEAT`]. If loopmux dies (SIGKILL, OOM), the elements expire and
//! the apps' connections go directly to their destinations again.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::ports::{shown, PortKey};
use crate::allow::KernelMatch;
use crate::config::InterceptConfig;

/// The table's name, for operators: `nft list table inet loopmux`.
pub const TABLE: &str = "loopmux";
/// How long a destination stays in the kernel's set without loopmux.
pub const ELEMENT_TTL: Duration = Duration::from_secs(6);
/// How often loopmux renews the sets.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// One intercept listener's part of the table.
#[derive(Debug, Clone)]
pub struct Intercepted {
    pub listener: String,
    pub uids: Vec<u32>,
    pub cgroups: Vec<String>,
    /// Where each destination rule's connections go: one set and one rule
    /// line per uid list and cgroup each.
    pub redirects: Vec<Redirect>,
}

/// Destination rules redirected to one port: a single rule, or the rules
/// past [`MAX_OWN_PORTS`](super::ports::MAX_OWN_PORTS).
#[derive(Debug, Clone)]
pub struct Redirect {
    pub port: u16,
    pub matches: Vec<KernelMatch>,
}

impl Intercepted {
    /// `ports` holds the listener's redirect ports and what each serves.
    ///
    /// # Errors
    /// A rule the kernel cannot match, or one without a port.
    pub fn new(
        listener: &str,
        cfg: &InterceptConfig,
        ports: &[(PortKey, u16)],
    ) -> Result<Self, String> {
        let keys = super::ports::keys(cfg)?;
        let matches = cfg
            .destinations
            .kernel_matches()
            .map_err(|r| format!("destination rule `{r}` cannot be matched by the kernel"))?;
        let mut redirects: Vec<Redirect> = Vec::new();
        for (key, m) in keys.iter().zip(matches) {
            let port = ports
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, p)| *p)
                .ok_or_else(|| format!("destination rule `{}` has no redirect port", shown(&m)))?;
            match redirects.iter_mut().find(|r| r.port == port) {
                Some(r) => r.matches.push(m),
                None => redirects.push(Redirect {
                    port,
                    matches: vec![m],
                }),
            }
        }
        Ok(Intercepted {
            listener: listener.to_string(),
            uids: cfg.uids.clone(),
            cgroups: cfg.cgroups.clone(),
            redirects,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot run `nft` (Debian's nftables package): {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the rules: {0}")]
    Nft(String),
}

/// Runs `nft -f -` with `script` as one transaction.
async fn nft(script: &str) -> Result<(), RulesError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(RulesError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(RulesError::Spawn)?;
    }
    let out = child.wait_with_output().await.map_err(RulesError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RulesError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

fn set_name(listener: usize, redirect: usize) -> String {
    format!("dst{listener}_{redirect}")
}

/// nft keeps at most 128 bytes of a comment.
const COMMENT_MAX: usize = 120;

/// The rule lines' comment: the listener and what goes to the port, so
/// that `nft list table` and `/status` show which destination has which.
fn comment(listener: &str, r: &Redirect) -> String {
    let what = match r.matches.as_slice() {
        [one] => shown(one),
        many => format!("{} destination rules", many.len()),
    };
    let mut c: String = format!("{listener} {what}")
        .chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect();
    if c.len() > COMMENT_MAX {
        let mut end = COMMENT_MAX;
        while !c.is_char_boundary(end) {
            end -= 1;
        }
        c.truncate(end);
    }
    c
}

/// The table with its chain and empty sets (replacing any earlier one).
pub fn table_script(listeners: &[Intercepted]) -> String {
    let mut s =
        format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    for (i, l) in listeners.iter().enumerate() {
        for j in 0..l.redirects.len() {
            let _ = writeln!(
                s,
                "  set {} {{ type ipv4_addr . inet_service; flags interval, timeout; }}",
                set_name(i, j)
            );
        }
    }
    s.push_str("  chain output {\n    type nat hook output priority -100; policy accept;\n");
    for (i, l) in listeners.iter().enumerate() {
        for (j, r) in l.redirects.iter().enumerate() {
            let set = set_name(i, j);
            let note = comment(&l.listener, r);
            if !l.uids.is_empty() {
                let uids: Vec<String> = l.uids.iter().map(u32::to_string).collect();
                let _ = writeln!(
                    s,
                    "    meta skuid {{ {} }} ip daddr . tcp dport @{set} redirect to :{} comment \"{note}\"",
                    uids.join(", "),
                    r.port,
                );
            }
            for g in &l.cgroups {
                let level = g.split('/').filter(|p| !p.is_empty()).count();
                let _ = writeln!(
                    s,
                    "    socket cgroupv2 level {level} \"{g}\" ip daddr . tcp dport @{set} redirect to :{} comment \"{note}\"",
                    r.port,
                );
            }
        }
    }
    s.push_str("  }\n}\n");
    s
}

/// Renews every set: its elements, each expiring after [`ELEMENT_TTL`].
/// `resolved` holds the current addresses of each name.
fn heartbeat_script(listeners: &[Intercepted], resolved: &[(String, Vec<IpAddr>)]) -> String {
    let ttl = ELEMENT_TTL.as_secs();
    let mut s = String::new();
    for (i, l) in listeners.iter().enumerate() {
        for (j, r) in l.redirects.iter().enumerate() {
            let set = set_name(i, j);
            let _ = writeln!(s, "flush set inet {TABLE} {set}");
            let mut elements = Vec::new();
            let mut add = |net: String, (lo, hi): (u16, u16)| {
                let ports = if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                };
                elements.push(format!("{net} . {ports} timeout {ttl}s"));
            };
            for m in &r.matches {
                match m {
                    KernelMatch::Net {
                        base: IpAddr::V4(b),
                        prefix,
                        ports,
                    } => add(format!("{b}/{prefix}"), *ports),
                    KernelMatch::Net { .. } => {}
                    KernelMatch::Name { name, ports } => {
                        for (_, addrs) in resolved.iter().filter(|(n, _)| n == name) {
                            for a in addrs.iter().filter(|a| a.is_ipv4()) {
                                add(format!("{a}/32"), *ports);
                            }
                        }
                    }
                }
            }
            if !elements.is_empty() {
                let _ = writeln!(
                    s,
                    "add element inet {TABLE} {set} {{ {} }}",
                    elements.join(", ")
                );
            }
        }
    }
    s
}

/// Removes loopmux's table (after a clean stop, or leftovers after a
/// crash). A missing table is not an error.
///
/// # Errors
/// When `nft` cannot run or refuses.
pub async fn remove() -> Result<(), RulesError> {
    nft(&format!(
        "table inet {TABLE} {{}}\ndelete table inet {TABLE}\n"
    ))
    .await
}

/// Keeps the table alive while loopmux runs.
pub struct Keeper {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// Whether the last renewal went through (a gauge and `/status`).
    pub current: Arc<AtomicBool>,
    /// What it installed, to put back if a successor cannot be installed.
    listeners: Vec<Intercepted>,
    dns_refresh: Duration,
}

impl Keeper {
    /// Installs the table for `listeners` and starts renewing it.
    ///
    /// # Errors
    /// When the table cannot be installed: interception must not start
    /// half-done.
    pub async fn start(
        listeners: Vec<Intercepted>,
        dns_refresh: Duration,
    ) -> Result<Keeper, RulesError> {
        let installed = listeners.clone();
        nft(&table_script(&listeners)).await?;
        let current = Arc::new(AtomicBool::new(false));
        let resolved = resolve(&listeners).await;
        nft(&heartbeat_script(&listeners, &resolved)).await?;
        current.store(true, Ordering::Relaxed);
        tracing::info!(table = %format!("inet {TABLE}"), listeners = listeners.len(), ttl = ?ELEMENT_TTL, "interception rules installed");
        let stop = CancellationToken::new();
        let task = tokio::spawn(renew(
            listeners,
            resolved,
            dns_refresh,
            stop.clone(),
            current.clone(),
        ));
        Ok(Keeper {
            stop,
            task,
            current,
            listeners: installed,
            dns_refresh,
        })
    }

    /// Replaces this keeper's table with one for `listeners`, in one nft
    /// transaction. If that fails, this keeper's own table is installed
    /// again (its set elements outlive the attempt, [`ELEMENT_TTL`]) and
    /// the error returned: interception goes on as before.
    ///
    /// # Errors
    /// The new table's, with the old one back in place.
    pub async fn replace(
        self,
        listeners: Vec<Intercepted>,
        dns_refresh: Duration,
    ) -> Result<Keeper, (RulesError, Option<Keeper>)> {
        let (old, old_refresh) = (self.listeners.clone(), self.dns_refresh);
        self.stop_renewing().await;
        match Keeper::start(listeners, dns_refresh).await {
            Ok(k) => Ok(k),
            Err(e) => match Keeper::start(old, old_refresh).await {
                Ok(back) => Err((e, Some(back))),
                Err(e2) => {
                    tracing::error!(error = %e2, "interception: the previous rules could not be put back either; they expire within {:?}", ELEMENT_TTL);
                    Err((e, None))
                }
            },
        }
    }

    /// Stops renewing (a successor replaces the table).
    pub async fn stop_renewing(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// Stops renewing and removes the table.
    pub async fn remove(self) {
        self.stop.cancel();
        let _ = self.task.await;
        match remove().await {
            Ok(()) => tracing::info!("interception rules removed"),
            Err(e) => {
                tracing::error!(error = %e, "interception rules could not be removed; they expire within {:?}", ELEMENT_TTL)
            }
        }
    }
}

async fn resolve(listeners: &[Intercepted]) -> Vec<(String, Vec<IpAddr>)> {
    let mut out: Vec<(String, Vec<IpAddr>)> = Vec::new();
    for m in listeners
        .iter()
        .flat_map(|l| &l.redirects)
        .flat_map(|r| &r.matches)
    {
        let KernelMatch::Name { name, .. } = m else {
            continue;
        };
        if out.iter().any(|(n, _)| n == name) {
            continue;
        }
        match tokio::net::lookup_host((name.as_str(), 0)).await {
            Ok(a) => out.push((name.clone(), a.map(|s| s.ip()).collect())),
            Err(e) => {
                tracing::warn!(destination = %name, error = %e, "interception: cannot resolve; its connections are not intercepted until it does");
                out.push((name.clone(), Vec::new()));
            }
        }
    }
    out
}

async fn renew(
    listeners: Vec<Intercepted>,
    mut resolved: Vec<(String, Vec<IpAddr>)>,
    dns_refresh: Duration,
    stop: CancellationToken,
    current: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_dns = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if last_dns.elapsed() >= dns_refresh {
            resolved = resolve(&listeners).await;
            last_dns = tokio::time::Instant::now();
        }
        match nft(&heartbeat_script(&listeners, &resolved)).await {
            Ok(()) => current.store(true, Ordering::Relaxed),
            Err(e) => {
                if current.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, "interception rules not renewed: they expire and the apps go direct (fail open)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(destinations: &[&str]) -> InterceptConfig {
        let list: Vec<String> = destinations.iter().map(|d| d.to_string()).collect();
        InterceptConfig {
            uids: vec![1000, 1001],
            cgroups: vec!["system.slice/legacy.service".into()],
            destinations: crate::allow::AllowList::parse(&list).unwrap(),
            opaque_ports: vec![],
            detect_timeout: Duration::from_millis(300),
        }
    }

    #[test]
    fn the_scripts_name_every_rule_and_element() {
        let cfg = config(&["198.18.0.0/15:9000", "api.example:*"]);
        let keys = super::super::ports::keys(&cfg).unwrap();
        let ports = [(keys[0].clone(), 15001), (keys[1].clone(), 40123)];
        let l = Intercepted::new("legacy", &cfg, &ports).unwrap();
        let t = table_script(std::slice::from_ref(&l));
        assert!(
            t.contains("meta skuid { 1000, 1001 } ip daddr . tcp dport @dst0_0 redirect to :15001 comment \"legacy 198.18.0.0/15:9000\""),
            "{t}"
        );
        assert!(
            t.contains("socket cgroupv2 level 2 \"system.slice/legacy.service\" ip daddr . tcp dport @dst0_1 redirect to :40123"),
            "{t}"
        );
        let h = heartbeat_script(
            &[l],
            &[("api.example".into(), vec!["198.18.9.9".parse().unwrap()])],
        );
        assert!(h.contains("flush set inet loopmux dst0_0"), "{h}");
        assert!(h.contains("flush set inet loopmux dst0_1"), "{h}");
        assert!(
            h.contains("add element inet loopmux dst0_0 { 198.18.0.0/15 . 9000 timeout 6s }"),
            "{h}"
        );
        assert!(
            h.contains("add element inet loopmux dst0_1 { 198.18.9.9/32 . 1-65535 timeout 6s }"),
            "{h}"
        );
    }

    /// Each exact destination its own set and port (issue 17); the rules
    /// past the limit share one, as all did before.
    #[test]
    fn each_destination_rule_has_its_own_port() {
        let list: Vec<String> = (0..super::super::ports::MAX_OWN_PORTS + 2)
            .map(|i| format!("198.18.4.{}:8302", i + 1))
            .collect();
        let refs: Vec<&str> = list.iter().map(String::as_str).collect();
        let cfg = config(&refs);
        let keys = super::super::ports::keys(&cfg).unwrap();
        let mut ports: Vec<(PortKey, u16)> = Vec::new();
        for k in &keys {
            if !ports.iter().any(|(p, _)| p == k) {
                let n = u16::try_from(ports.len()).unwrap();
                ports.push((k.clone(), 40000 + n));
            }
        }
        let l = Intercepted::new("legacy", &cfg, &ports).unwrap();
        assert_eq!(l.redirects.len(), super::super::ports::MAX_OWN_PORTS + 1);
        assert!(l.redirects[..super::super::ports::MAX_OWN_PORTS]
            .iter()
            .all(|r| r.matches.len() == 1));
        assert_eq!(l.redirects.last().unwrap().matches.len(), 2);
        let t = table_script(&[l]);
        assert!(
            t.contains("@dst0_1 redirect to :40001 comment \"legacy 198.18.4.2:8302\""),
            "{t}"
        );
        assert!(t.contains("comment \"legacy 2 destination rules\""), "{t}");
        // A rule without a port is an error, not a rule that redirects
        // nowhere.
        assert!(Intercepted::new("legacy", &cfg, &ports[..1]).is_err());
    }

    #[test]
    fn comments_stay_within_what_nft_keeps() {
        let r = Redirect {
            port: 1,
            matches: vec![KernelMatch::Name {
                name: "é".repeat(100),
                ports: (80, 80),
            }],
        };
        let c = comment("legacy", &r);
        assert!(c.len() <= COMMENT_MAX, "{}", c.len());
    }
}
