//! Allow lists: which destinations a forward listener (and later the serve
//! role) may reach. One parser and one matcher, so every mode answers the
//! same question the same way.
//!
//! A rule is `[!]HOST:PORT`:
//! - HOST is a DNS name (`api.example.com`), a wildcard (`*.partner.net`:
//!   any name below `partner.net`, not `partner.net` itself), an IP address
//!   (`198.18.0.2`, `[::1]`), a CIDR range (`198.18.0.0/15`,
//!   `[fd00::/8]`), or `*` (any destination);
//! - PORT is a number, a range (`8000-8999`) or `*`;
//! - `!` makes it a deny rule.
//!
//! A destination is decided in this order:
//! 1. deny rules first: a deny rule on a name or wildcard matches the name
//!    asked for; a deny rule on an address or range matches an address
//!    asked for and every address a name resolves to (so a name cannot
//!    smuggle a request into a denied range);
//! 2. then the allow rules, first match wins: name and wildcard rules match
//!    names only, address and range rules match addresses only. A name rule
//!    is never satisfied by an IP literal, even one the name resolves to:
//!    allowing `api.example.com` does not allow its address.
//! 3. nothing matched: denied.
//!
//! `0.0.0.0/8` and `::` are this host: a `connect()` to them reaches a
//! local listener (127.0.0.1, `::1`, or the bound source address). Deny
//! rules on loopback cover them, and only an allow rule that names them by
//! address (a range inside `0.0.0.0/8`, or `[::]`) lets them through: `*`
//! and wide ranges such as `0.0.0.0/0` do not, whether the address is
//! asked for or a name resolves to it.

pub mod target;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest list `check` accepts: beyond this it is a generated file
/// gone wrong, and every request scans the list.
pub const MAX_RULES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    Name(String),
    /// The suffix with its leading dot: `.partner.net`.
    Below(String),
    Net {
        base: IpAddr,
        prefix: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ports {
    lo: u16,
    hi: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// As written (trimmed): what a 403 quotes.
    text: String,
    deny: bool,
    host: HostPattern,
    ports: Ports,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A destination as a client names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// Lower case, no trailing dot.
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
        }
    }
}

/// Why a destination may not be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// A deny rule matched the destination (or an address it resolves to);
    /// `this_host` when it matched an unspecified address as loopback.
    Rule {
        rule: String,
        addr: Option<IpAddr>,
        this_host: bool,
    },
    /// No allow rule matched; `near` is a rule for the same host on other
    /// ports, the likeliest intent.
    NoRule {
        near: Option<String>,
        ip_literal: bool,
    },
    /// An unspecified address (this host) that no rule names by address;
    /// `resolved` when a name resolved to it.
    ThisHost { addr: IpAddr, resolved: bool },
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Rule {
                rule,
                addr,
                this_host,
            } => {
                if let Some(a) = addr {
                    write!(f, "resolves to {a}, ")?;
                }
                write!(f, "denied by rule `{rule}`")?;
                if *this_host {
                    f.write_str(" (an unspecified address connects to this host)")?;
                }
                Ok(())
            }
            Denial::NoRule {
                near: Some(r),
                ip_literal: _,
            } => write!(f, "no allow rule matches; rule `{r}` allows this host on other ports only"),
            Denial::NoRule {
                near: None,
                ip_literal: true,
            } => f.write_str(
                "no allow rule matches (an IP address is allowed only by an address or range rule, never by a name rule)",
            ),
            Denial::NoRule { near: None, .. } => f.write_str("no allow rule matches"),
            Denial::ThisHost { addr, resolved } => {
                if *resolved {
                    write!(f, "resolves to {addr}, which ")?;
                } else {
                    write!(f, "{addr} ")?;
                }
                f.write_str("connects to this host (as loopback does); only a rule that names it by address allows it (`0.0.0.0:PORT`, `[::]:PORT`), never `*` or a wider range")
            }
        }
    }
}

/// An address as the rules see it: IPv4-mapped IPv6 (`::ffff:10.0.0.1`)
/// is the IPv4 address it carries, so it cannot slip past a v4 range.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Whether a connect to `ip` reaches this host whatever it looks like:
/// `0.0.0.0/8` and `::` (the kernel connects them to loopback, or to the
/// bound source address).
pub fn is_this_host(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => a.octets()[0] == 0,
        IpAddr::V6(a) => a.is_unspecified(),
    }
}

/// Whether `addr` is the listener at `local` (also when it listens on
/// every address): the loop guard of every mode that dials what a client
/// names. An unspecified address (`0.0.0.0/8`, `::`) on the listener's
/// port is this host's, so it counts as the listener whatever address the
/// listener is bound to.
pub fn is_self(addr: SocketAddr, local: SocketAddr) -> bool {
    let ip = canonical(addr.ip());
    addr.port() == local.port()
        && (ip == canonical(local.ip())
            || is_this_host(ip)
            || (local.ip().is_unspecified() && ip.is_loopback()))
}

/// Where an intercepted connection was going before the kernel redirected
/// it (`SO_ORIGINAL_DST`), carried with its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginalDst(pub SocketAddr);

/// The loopback address an unspecified one stands for, for deny rules.
fn loopback_of(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// Whether a range names this host's unspecified addresses by address: it
/// lies inside `0.0.0.0/8`, or is `::` itself.
fn names_this_host(base: IpAddr, prefix: u8) -> bool {
    match base {
        IpAddr::V4(b) => prefix >= 8 && b.octets()[0] == 0,
        IpAddr::V6(b) => prefix == 128 && b.is_unspecified(),
    }
}

fn in_net(ip: IpAddr, base: IpAddr, prefix: u8) -> bool {
    match (canonical(ip), base) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

impl Rule {
    fn port_ok(&self, port: u16) -> bool {
        (self.ports.lo..=self.ports.hi).contains(&port)
    }

    /// Whether the host part matches what the client asked for. An
    /// unspecified address is this host: a deny rule on loopback covers
    /// it, and an allow rule must name it by address.
    fn host_matches(&self, host: &Host) -> bool {
        match (&self.host, host) {
            (HostPattern::Any, Host::Ip(ip)) => self.deny || !is_this_host(*ip),
            (HostPattern::Any, _) => true,
            (HostPattern::Name(n), Host::Name(h)) => n == h,
            (HostPattern::Below(suffix), Host::Name(h)) => {
                h.len() > suffix.len() && h.ends_with(suffix.as_str())
            }
            (HostPattern::Net { base, prefix }, Host::Ip(ip)) => {
                self.net_matches(*ip, *base, *prefix)
            }
            _ => false,
        }
    }

    fn net_matches(&self, ip: IpAddr, base: IpAddr, prefix: u8) -> bool {
        if !is_this_host(ip) {
            return in_net(ip, base, prefix);
        }
        if self.deny {
            in_net(ip, base, prefix) || in_net(loopback_of(ip), base, prefix)
        } else {
            names_this_host(base, prefix) && in_net(ip, base, prefix)
        }
    }
}

/// A checked allow list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowList {
    rules: Vec<Rule>,
}

impl AllowList {
    /// Parses every rule; the errors carry the index of the rule.
    ///
    /// # Errors
    /// `(index, reason)` for each rule that is not valid.
    pub fn parse(raw: &[String]) -> Result<AllowList, Vec<(usize, String)>> {
        let mut rules = Vec::with_capacity(raw.len());
        let mut errors = Vec::new();
        if raw.len() > MAX_RULES {
            errors.push((MAX_RULES, format!("more than {MAX_RULES} rules")));
            return Err(errors);
        }
        for (i, r) in raw.iter().enumerate() {
            match parse_rule(r) {
                Ok(rule) if rules.contains(&rule) => {
                    errors.push((i, format!("`{}` is listed twice", rule.text)))
                }
                Ok(rule) => rules.push(rule),
                Err(e) => errors.push((i, e)),
            }
        }
        if errors.is_empty() {
            Ok(AllowList { rules })
        } else {
            Err(errors)
        }
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any deny rule is on addresses: only then must a name's
    /// resolved addresses be checked.
    pub fn denies_addresses(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.deny && matches!(r.host, HostPattern::Net { .. } | HostPattern::Any))
    }

    /// The decision for `host:port` as asked (before resolution).
    ///
    /// # Errors
    /// The [`Denial`], naming the rule.
    pub fn check(&self, host: &Host, port: u16) -> Result<(), Denial> {
        for r in self.rules.iter().filter(|r| r.deny) {
            if r.port_ok(port) && r.host_matches(host) {
                return Err(Denial::Rule {
                    rule: r.text.clone(),
                    addr: None,
                    this_host: matches!(host, Host::Ip(ip) if is_this_host(*ip)),
                });
            }
        }
        if self
            .rules
            .iter()
            .any(|r| !r.deny && r.port_ok(port) && r.host_matches(host))
        {
            return Ok(());
        }
        if let Host::Ip(ip) = host {
            if is_this_host(*ip) {
                return Err(Denial::ThisHost {
                    addr: canonical(*ip),
                    resolved: false,
                });
            }
        }
        Err(Denial::NoRule {
            near: self
                .rules
                .iter()
                .find(|r| !r.deny && !matches!(r.host, HostPattern::Any) && r.host_matches(host))
                .map(|r| r.text.clone()),
            ip_literal: matches!(host, Host::Ip(_)),
        })
    }

    /// The decision for one address a name resolved to: the deny rules on
    /// addresses apply (the name itself was allowed by [`check`]), and an
    /// unspecified address (this host) also needs an allow rule that names
    /// it by address.
    ///
    /// # Errors
    /// The deny rule that matched, with the address; or
    /// [`Denial::ThisHost`].
    ///
    /// [`check`]: Self::check
    pub fn check_resolved(&self, ip: IpAddr, port: u16) -> Result<(), Denial> {
        let ip = canonical(ip);
        for r in self.rules.iter().filter(|r| r.deny) {
            let hit = match r.host {
                HostPattern::Any => true,
                HostPattern::Net { base, prefix } => r.net_matches(ip, base, prefix),
                _ => false,
            };
            if hit && r.port_ok(port) {
                return Err(Denial::Rule {
                    rule: r.text.clone(),
                    addr: Some(ip),
                    this_host: is_this_host(ip),
                });
            }
        }
        if is_this_host(ip) {
            let named = self.rules.iter().any(|r| {
                !r.deny
                    && r.port_ok(port)
                    && matches!(r.host, HostPattern::Net { base, prefix } if r.net_matches(ip, base, prefix))
            });
            if !named {
                return Err(Denial::ThisHost {
                    addr: ip,
                    resolved: true,
                });
            }
        }
        Ok(())
    }
}

/// An allow rule as the kernel can match it (interception): an address
/// range or a name to resolve, and a port range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelMatch {
    Net {
        base: IpAddr,
        prefix: u8,
        ports: (u16, u16),
    },
    Name {
        name: String,
        ports: (u16, u16),
    },
}

impl AllowList {
    /// Every rule as the kernel can match it, or the first that it cannot
    /// (deny rules, wildcards, `*`), as written.
    ///
    /// # Errors
    /// The rule's text.
    pub fn kernel_matches(&self) -> Result<Vec<KernelMatch>, String> {
        self.rules
            .iter()
            .map(|r| {
                let ports = (r.ports.lo, r.ports.hi);
                match (&r.host, r.deny) {
                    (HostPattern::Net { base, prefix }, false) => Ok(KernelMatch::Net {
                        base: *base,
                        prefix: *prefix,
                        ports,
                    }),
                    (HostPattern::Name(n), false) => Ok(KernelMatch::Name {
                        name: n.clone(),
                        ports,
                    }),
                    _ => Err(r.text.clone()),
                }
            })
            .collect()
    }
}

/// Parses a host as a client names it in a request target or `CONNECT`:
/// an IP literal (IPv6 in brackets) or a DNS name.
///
/// # Errors
/// Why it is neither.
pub fn parse_host(raw: &str) -> Result<Host, &'static str> {
    if let Some(inner) = raw.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or("unclosed `[` in host")?;
        return inner
            .parse::<Ipv6Addr>()
            .map(|a| Host::Ip(canonical(IpAddr::V6(a))))
            .map_err(|_| "not an IPv6 address inside `[ ]`");
    }
    if let Ok(a) = raw.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(a)));
    }
    let name = raw.strip_suffix('.').unwrap_or(raw);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        return Err("not a valid host name");
    }
    // `2130706433`, `127.1`, `0x7f.1`: the resolver reads these as IPv4
    // addresses, which no name rule should stand for. A real top-level
    // label is never numeric.
    let last = name.rsplit('.').next().unwrap_or("");
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || (last.len() > 2 && last[..2].eq_ignore_ascii_case("0x"));
    if numeric {
        return Err("looks like a numeric IPv4 address in a non-standard form");
    }
    Ok(Host::Name(name.to_ascii_lowercase()))
}

fn parse_ports(p: &str) -> Result<Ports, String> {
    let p = p.trim();
    if p == "*" {
        return Ok(Ports { lo: 1, hi: 65535 });
    }
    let num = |s: &str| -> Result<u16, String> {
        match s.trim().parse::<u16>() {
            Ok(0) => Err("port 0 cannot be reached".into()),
            Ok(n) => Ok(n),
            Err(_) => Err(format!("`{s}` is not a port (1-65535, a range a-b, or *)")),
        }
    };
    match p.split_once('-') {
        Some((a, b)) => {
            let (lo, hi) = (num(a)?, num(b)?);
            if lo > hi {
                return Err(format!("port range `{p}` is empty"));
            }
            Ok(Ports { lo, hi })
        }
        None => {
            let n = num(p)?;
            Ok(Ports { lo: n, hi: n })
        }
    }
}

fn parse_net(host: &str) -> Result<Option<HostPattern>, String> {
    let (addr, prefix) = match host.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (host, None),
    };
    let Ok(base) = addr.parse::<IpAddr>() else {
        return if prefix.is_some() {
            Err(format!("`{addr}` in `{host}` is not an IP address"))
        } else {
            Ok(None)
        };
    };
    let base = canonical(base);
    let max = if base.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(format!("`/{p}` is not a prefix length (0-{max})")),
        },
    };
    Ok(Some(HostPattern::Net { base, prefix }))
}

fn parse_rule(raw: &str) -> Result<Rule, String> {
    let text = raw.trim();
    let (deny, body) = match text.strip_prefix('!') {
        Some(rest) => (true, rest.trim_start()),
        None => (false, text),
    };
    let (host, port) = if let Some(rest) = body.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{text}`: unclosed `[`"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| format!("`{text}` has no port; write [addr]:port or [addr]:*"))?;
        let host = match parse_net(inner)? {
            Some(h @ HostPattern::Net { base, .. }) if base.is_ipv6() => h,
            _ => {
                return Err(format!(
                    "`{inner}` inside [ ] is not an IPv6 address or range"
                ))
            }
        };
        (host, port)
    } else {
        let (h, port) = body
            .rsplit_once(':')
            .ok_or_else(|| format!("`{text}` has no port; write host:port or host:*"))?;
        if h.contains(':') {
            return Err(format!(
                "`{text}`: write IPv6 addresses in brackets, [fd00::/8]:*"
            ));
        }
        let host = if h == "*" {
            HostPattern::Any
        } else if let Some(p) = parse_net(h)? {
            p
        } else if let Some(suffix) = h.strip_prefix("*.") {
            match parse_host(suffix) {
                Ok(Host::Name(n)) => HostPattern::Below(format!(".{n}")),
                _ => return Err(format!("`{h}`: a wildcard is `*.` followed by a DNS name")),
            }
        } else {
            match parse_host(h) {
                Ok(Host::Name(n)) => HostPattern::Name(n),
                Ok(Host::Ip(_)) | Err(_) => {
                    return Err(format!(
                        "`{h}` is not a DNS name, `*.name`, an IP address, a CIDR range or `*`"
                    ))
                }
            }
        };
        (host, port)
    };
    let ports = parse_ports(port).map_err(|e| format!("`{text}`: {e}"))?;
    Ok(Rule {
        text: text.to_string(),
        deny,
        host,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(rules: &[&str]) -> AllowList {
        AllowList::parse(&rules.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn host(s: &str) -> Host {
        parse_host(s).unwrap()
    }

    #[test]
    fn names_wildcards_ranges_and_ports() {
        let l = list(&[
            "api.example.com:80",
            "*.partner.net:443",
            "198.18.0.0/15:*",
            "[fd00::/8]:8000-8999",
        ]);
        let table: &[(&str, u16, bool)] = &[
            ("api.example.com", 80, true),
            ("API.Example.COM.", 80, true),
            ("api.example.com", 81, false),
            ("www.example.com", 80, false),
            ("x.partner.net", 443, true),
            ("a.b.partner.net", 443, true),
            ("partner.net", 443, false),
            ("evilpartner.net", 443, false),
            ("x.partner.net", 80, false),
            ("198.18.0.2", 1, true),
            ("198.19.255.255", 65535, true),
            ("198.20.0.1", 80, false),
            ("[fd00::1]", 8080, true),
            ("[fd00::1]", 9000, false),
            ("[fe80::1]", 8080, false),
            ("[::ffff:198.18.0.2]", 80, true),
        ];
        for (h, port, ok) in table {
            assert_eq!(l.check(&host(h), *port).is_ok(), *ok, "{h}:{port}");
        }
    }

    #[test]
    fn a_name_rule_is_not_satisfied_by_an_ip_literal() {
        let l = list(&["localhost:80"]);
        let e = l.check(&host("127.0.0.1"), 80).unwrap_err();
        assert!(e.to_string().contains("never by a name rule"), "{e}");
    }

    #[test]
    fn deny_rules_come_first_and_cover_resolved_addresses() {
        let l = list(&["!127.0.0.0/8:*", "!secret.example.com:*", "*:*"]);
        assert!(l.check(&host("example.com"), 80).is_ok());
        let e = l.check(&host("127.0.0.1"), 80).unwrap_err();
        assert_eq!(e.to_string(), "denied by rule `!127.0.0.0/8:*`");
        assert!(l.check(&host("secret.example.com"), 443).is_err());
        assert!(l.denies_addresses());
        let e = l
            .check_resolved("127.0.0.53".parse().unwrap(), 80)
            .unwrap_err();
        assert!(e.to_string().contains("resolves to 127.0.0.53"), "{e}");
        // Mapped IPv6 is the IPv4 address it carries.
        assert!(l
            .check_resolved("::ffff:127.0.0.1".parse().unwrap(), 80)
            .is_err());
        assert!(l.check_resolved("10.0.0.1".parse().unwrap(), 80).is_ok());
    }

    /// `0.0.0.0/8` and `::` connect to this host: `*` and wide ranges do
    /// not allow them, loopback deny rules deny them, and only a rule that
    /// names them by address lets them through (asked for or resolved).
    #[test]
    fn unspecified_addresses_are_this_host() {
        let open = list(&["!127.0.0.0/8:*", "![::1]:*", "*:*"]);
        let wide = list(&["0.0.0.0/0:*", "[::/0]:*"]);
        let named = list(&["0.0.0.0:80", "[::]:80"]);
        let named_but_loopback_denied = list(&["!127.0.0.0/8:*", "0.0.0.0/8:*"]);
        let table: &[(&AllowList, &str, u16, bool)] = &[
            (&open, "0.0.0.0", 80, false),
            (&open, "0.1.2.3", 80, false),
            (&open, "[::]", 80, false),
            (&open, "[::ffff:0.0.0.0]", 80, false),
            (&open, "198.18.0.2", 80, true),
            (&wide, "0.0.0.0", 80, false),
            (&wide, "[::]", 80, false),
            (&wide, "198.18.0.2", 80, true),
            (&named, "0.0.0.0", 80, true),
            (&named, "[::]", 80, true),
            (&named, "0.0.0.0", 81, false),
            (&named_but_loopback_denied, "0.0.0.0", 80, false),
        ];
        for (l, h, port, ok) in table {
            assert_eq!(
                l.check(&host(h), *port).is_ok(),
                *ok,
                "{h}:{port} under {l:?}"
            );
            let ip = match host(h) {
                Host::Ip(ip) => ip,
                Host::Name(_) => unreachable!(),
            };
            assert_eq!(
                l.check_resolved(ip, *port).is_ok(),
                *ok,
                "resolved {h}:{port} under {l:?}"
            );
        }
        let e = open.check(&host("0.0.0.0"), 80).unwrap_err();
        assert!(e.to_string().contains("connects to this host"), "{e}");
        let e = list(&["*:*"]).check(&host("0.0.0.0"), 80).unwrap_err();
        assert!(matches!(e, Denial::ThisHost { .. }), "{e}");
        let e = wide.check_resolved("::".parse().unwrap(), 80).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("resolves to ::, which connects to this host"),
            "{e}"
        );
        assert!(is_this_host("0.255.0.1".parse().unwrap()));
        assert!(!is_this_host("127.0.0.1".parse().unwrap()));
        assert!(!is_this_host("::1".parse().unwrap()));
    }

    #[test]
    fn the_nearest_rule_is_named() {
        let l = list(&["api.example.com:443"]);
        let e = l.check(&host("api.example.com"), 80).unwrap_err();
        assert!(e.to_string().contains("`api.example.com:443`"), "{e}");
    }

    #[test]
    fn numeric_hosts_in_odd_forms_are_not_names() {
        for h in ["2130706433", "127.1", "0x7f.1", "1.2.3.4.5"] {
            assert!(parse_host(h).is_err(), "{h}");
        }
        assert!(parse_host("a..b").is_err());
        assert!(parse_host("[::1").is_err());
        assert_eq!(host("[::1]"), Host::Ip("::1".parse().unwrap()));
    }

    #[test]
    fn bad_rules_are_named() {
        let bad = [
            "api.example.com",
            "api.example.com:0",
            "api.example.com:http",
            "10.0.0.0/33:*",
            "fd00::1:80",
            "[10.0.0.1]:80",
            "*.:80",
            "a*.b:80",
            "host:9-1",
            "",
        ];
        for b in bad {
            let r = AllowList::parse(&[b.to_string()]);
            assert!(r.is_err(), "{b:?} should be refused");
        }
        let dup = AllowList::parse(&["a.b:1".into(), "a.b:1".into()]).unwrap_err();
        assert_eq!(dup[0].0, 1);
    }
}
