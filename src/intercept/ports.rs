//! One redirect port per destination rule (issue 17). nftables `redirect`
//! is NAT: every destination redirected to one port shares that port's
//! reply tuples (`127.0.0.1:port ↔ app:sport`). Once one destination's
//! conntrack entries hold them, conntrack gives the next destination's
//! connections other source ports, at random, where loopmux (which closes
//! first) still keeps TIME_WAIT from a connection with an unrelated
//! sequence number and timestamp offset: the SYN is answered with an ACK,
//! the app resets and sends it again (10 ms later, or after the 1 s
//! timeout when that fails too). With a port of its own, an exact
//! destination's reply tuples are its own; a range or a name still shares
//! its port among its addresses.
//!
//! The first rule is redirected to the listener's configured port, the
//! others to ports the kernel chooses on the listener's address, bound
//! with it (at start, or before a reload changes anything). Across reloads
//! a rule keeps its port: a rule moved onto a port another destination
//! used would meet that destination's TIME_WAIT for a minute.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::allow::KernelMatch;
use crate::config::InterceptConfig;

/// Rules with a port of their own, per listener; the ones after them
/// share one more port (as every rule once shared one).
pub const MAX_OWN_PORTS: usize = 64;

/// What a redirect port serves, kept across reloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortKey {
    /// One destination rule, as the kernel matches it.
    Rule(KernelMatch),
    /// The rules after the first [`MAX_OWN_PORTS`].
    Rest,
}

/// One listening socket of an intercept listener and what it serves.
pub struct RedirectPort {
    pub key: PortKey,
    pub socket: Arc<TcpListener>,
    pub addr: SocketAddr,
}

/// Each destination rule's key, in config order.
///
/// # Errors
/// A rule the kernel cannot match (validation refuses those first).
pub fn keys(cfg: &InterceptConfig) -> Result<Vec<PortKey>, String> {
    let matches = cfg.destinations.kernel_matches().map_err(|r| {
        format!("destination rule `{r}` cannot be matched by the kernel (no deny rules, wildcards or `*` for interception)")
    })?;
    Ok(matches
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            if i < MAX_OWN_PORTS {
                PortKey::Rule(m)
            } else {
                PortKey::Rest
            }
        })
        .collect())
}

/// The keys no socket in `have` serves yet: each once, in config order.
pub fn missing(keys: &[PortKey], have: &[PortKey]) -> Vec<PortKey> {
    let mut out: Vec<PortKey> = Vec::new();
    for k in keys {
        if !have.contains(k) && !out.contains(k) {
            out.push(k.clone());
        }
    }
    out
}

/// Binds a socket for each key, on the listener's address (port 0: the
/// kernel's choice, so no configured port can be taken).
///
/// # Errors
/// The key and the errno of the first socket that cannot be bound or
/// registered; the ones bound before are closed.
pub fn bind(
    listener: SocketAddr,
    keys: Vec<PortKey>,
) -> Result<Vec<RedirectPort>, (PortKey, SocketAddr, std::io::Error)> {
    let at = SocketAddr::new(listener.ip(), 0);
    keys.into_iter()
        .map(|key| {
            let bound = crate::listener::bind_addr(at)
                .and_then(TcpListener::from_std)
                .and_then(|l| Ok((l.local_addr()?, l)));
            match bound {
                Ok((addr, l)) => Ok(RedirectPort {
                    key,
                    socket: Arc::new(l),
                    addr,
                }),
                Err(e) => Err((key, at, e)),
            }
        })
        .collect()
}

/// The redirect ports for `keys`: a socket of `have` for each key it
/// already serves, one of `fresh` for the others, in the order of the keys'
/// first rules. Sockets no key wants are dropped (closed).
pub fn assemble(
    keys: &[PortKey],
    have: Vec<RedirectPort>,
    fresh: Vec<RedirectPort>,
) -> Vec<RedirectPort> {
    assemble_by(keys, have, fresh, |p| &p.key)
}

/// [`assemble`] over anything with a key: also what a reload uses to know
/// the ports before it applies them.
pub fn assemble_by<T>(
    keys: &[PortKey],
    have: Vec<T>,
    fresh: Vec<T>,
    key: impl Fn(&T) -> &PortKey,
) -> Vec<T> {
    let mut pool: Vec<T> = have.into_iter().chain(fresh).collect();
    let mut out: Vec<T> = Vec::new();
    for k in keys {
        if out.iter().any(|p| key(p) == k) {
            continue;
        }
        if let Some(i) = pool.iter().position(|p| key(p) == k) {
            out.push(pool.swap_remove(i));
        }
    }
    out
}

/// A rule as an operator wrote it, near enough: `198.18.4.2:8304`,
/// `198.18.0.0/15:9000-9010`, `api.example:80`.
pub fn shown(m: &KernelMatch) -> String {
    let ports = |(lo, hi): (u16, u16)| {
        if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}-{hi}")
        }
    };
    match m {
        KernelMatch::Net {
            base,
            prefix,
            ports: p,
        } => {
            let full = if base.is_ipv4() { 32 } else { 128 };
            if *prefix == full {
                format!("{base}:{}", ports(*p))
            } else {
                format!("{base}/{prefix}:{}", ports(*p))
            }
        }
        KernelMatch::Name { name, ports: p } => format!("{name}:{}", ports(*p)),
    }
}

/// Whether a port serves a single exact destination (one address, one
/// port): only then are its reply tuples never shared.
pub fn is_exact(m: &KernelMatch) -> bool {
    match m {
        KernelMatch::Net {
            base,
            prefix,
            ports: (lo, hi),
        } => lo == hi && *prefix == if base.is_ipv4() { 32 } else { 128 },
        KernelMatch::Name { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(ip: &str, prefix: u8, lo: u16, hi: u16) -> KernelMatch {
        KernelMatch::Net {
            base: ip.parse().unwrap(),
            prefix,
            ports: (lo, hi),
        }
    }

    async fn sockets(keys: &[PortKey]) -> Vec<RedirectPort> {
        bind("127.0.0.1:0".parse().unwrap(), keys.to_vec())
            .map_err(|(_, _, e)| e)
            .unwrap()
    }

    #[test]
    fn rules_past_the_limit_share_one_key() {
        let list: Vec<String> = (0..MAX_OWN_PORTS + 3)
            .map(|i| format!("198.18.{}.{}:80", i / 200, i % 200 + 1))
            .collect();
        let cfg = InterceptConfig {
            uids: vec![1000],
            cgroups: vec![],
            destinations: crate::allow::AllowList::parse(&list).unwrap(),
            opaque_ports: vec![],
            detect_timeout: std::time::Duration::from_millis(300),
        };
        let k = keys(&cfg).unwrap();
        assert_eq!(k.len(), MAX_OWN_PORTS + 3);
        assert!(matches!(k[MAX_OWN_PORTS - 1], PortKey::Rule(_)));
        assert!(k[MAX_OWN_PORTS..].iter().all(|k| *k == PortKey::Rest));
        assert_eq!(missing(&k, &[]).len(), MAX_OWN_PORTS + 1);
    }

    #[tokio::test]
    async fn a_rule_keeps_its_port_across_a_reload() {
        let (a, b, c) = (
            PortKey::Rule(net("198.18.4.2", 32, 8302, 8302)),
            PortKey::Rule(net("198.18.4.2", 32, 8304, 8304)),
            PortKey::Rule(net("198.18.4.3", 32, 80, 80)),
        );
        let old = sockets(&[a.clone(), b.clone()]).await;
        let b_port = old[1].addr.port();
        // The reload drops A and adds C: B keeps its socket, only C needs
        // a new one, A's closes.
        let keys = [b.clone(), c.clone()];
        let have: Vec<PortKey> = old.iter().map(|p| p.key.clone()).collect();
        let want = missing(&keys, &have);
        assert_eq!(want, vec![c.clone()]);
        let now = assemble(&keys, old, sockets(&want).await);
        assert_eq!(now.len(), 2);
        assert_eq!((&now[0].key, now[0].addr.port()), (&b, b_port));
        assert_eq!(now[1].key, c);
        assert_ne!(now[1].addr.port(), b_port);
    }

    #[test]
    fn rules_are_shown_as_written_and_only_single_ones_are_exact() {
        let one = net("198.18.4.2", 32, 8304, 8304);
        let range = net("198.18.0.0", 15, 9000, 9010);
        let name = KernelMatch::Name {
            name: "api.example".into(),
            ports: (80, 80),
        };
        assert_eq!(shown(&one), "198.18.4.2:8304");
        assert_eq!(shown(&range), "198.18.0.0/15:9000-9010");
        assert_eq!(shown(&name), "api.example:80");
        assert!(is_exact(&one));
        assert!(!is_exact(&range));
        assert!(!is_exact(&net("198.18.4.2", 32, 1, 65535)));
        assert!(!is_exact(&name));
    }
}
