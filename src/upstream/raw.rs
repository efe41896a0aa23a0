//! The way out for raw bytes (`tcp`, forward `CONNECT`, intercepted opaque
//! connections, the serve role): resolve → veto → pick → dial, with the
//! failover rule the HTTP client's retry decision counts by too. An
//! [`Upstream`](super::Upstream) resolves and vetoes ahead of time (its DNS
//! refresh) and picks among its endpoints; the serve role resolves the
//! target each stream names and dials its addresses in the resolver's
//! order. Both go through [`failover`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::dialer::{DialError, Dialer, SourceLease};
use super::Vetoed;
use crate::allow::Host;

/// How many candidates (endpoints, resolved addresses) one connection
/// tries at most: an address that does not answer costs a client at most
/// this many `connect_timeout`s.
pub const MAX_DIALS: usize = 3;

/// How many other candidates a failed dial may go on to, out of
/// `candidates`. Every dial failure counts (refused, unreachable, timed
/// out, no source address of its family): nothing was sent yet, and each
/// is about that one address, so another may answer.
pub fn other_candidates(candidates: usize) -> usize {
    candidates.saturating_sub(1).min(MAX_DIALS - 1)
}

/// Dials the candidates `next` gives until one connects or
/// [`other_candidates`] of `count` are spent. `failed` records each
/// failure (an endpoint's errno counts and back-off) before the next
/// candidate is taken; `count` is read only after a first failure.
///
/// # Errors
/// The last failure, or `None` when `next` gave no candidate at all.
pub async fn failover<C, T, Fut>(
    count: impl FnOnce() -> usize,
    mut next: impl FnMut() -> Option<C>,
    mut dial: impl FnMut(&C) -> Fut,
    mut failed: impl FnMut(&C, &DialError),
) -> Result<(C, T), Option<DialError>>
where
    Fut: Future<Output = Result<T, DialError>>,
{
    let mut count = Some(count);
    let mut left = None;
    let mut last = None;
    while let Some(c) = next() {
        match dial(&c).await {
            Ok(t) => return Ok((c, t)),
            Err(e) => {
                failed(&c, &e);
                let left = left.get_or_insert_with(|| {
                    other_candidates(count.take().map_or(0, |count| count()))
                });
                if *left == 0 {
                    return Err(Some(e));
                }
                *left -= 1;
                last = Some(e);
            }
        }
    }
    Err(last)
}

/// A name the resolver did not turn into addresses.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot resolve `{name}`: {source}")]
    Failed {
        name: String,
        source: std::io::Error,
    },
    #[error("no answer from the resolver for `{name}` within connect_timeout")]
    Timeout { name: String },
}

/// `host:port`'s addresses, in the resolver's order; a name must resolve
/// within `within` (the serve role's `connect_timeout`).
///
/// # Errors
/// The resolver's failure, or its silence past `within`.
pub async fn resolve(
    host: &Host,
    port: u16,
    within: Duration,
) -> Result<Vec<SocketAddr>, ResolveError> {
    match host {
        Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, port)]),
        Host::Name(n) => {
            let lookup = tokio::net::lookup_host((n.as_str(), port));
            match tokio::time::timeout(within, lookup).await {
                Ok(Ok(found)) => Ok(found.collect()),
                Ok(Err(source)) => Err(ResolveError::Failed {
                    name: n.clone(),
                    source,
                }),
                Err(_) => Err(ResolveError::Timeout { name: n.clone() }),
            }
        }
    }
}

/// A dialed connection to a target, counted against its source until
/// dropped.
pub struct Leased {
    pub stream: TcpStream,
    pub local: SocketAddr,
    pub lease: Option<SourceLease>,
}

/// Why [`dial_target`] made no connection.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("resolves to {}, refused: {}", .0.addr, .0.why)]
    Vetoed(Vetoed),
    /// The last dial's failure; `None`: the name resolved to no address.
    #[error("{}", .0.as_ref().map_or_else(|| "resolves to no address".to_string(), |e| e.to_string()))]
    Unreachable(Option<DialError>),
}

/// Resolves `host:port`, refuses the lot if `veto` refuses any one
/// address (a resolver that mixes a denied address into an allowed name's
/// answers is an attack), then dials the addresses in order with
/// [`failover`].
///
/// # Errors
/// [`TargetError`]: which step failed, with its reason.
pub async fn dial_target(
    dialer: &Arc<Dialer>,
    host: &Host,
    port: u16,
    resolve_within: Duration,
    veto: impl Fn(SocketAddr) -> Option<Vetoed>,
) -> Result<Leased, TargetError> {
    let addrs = resolve(host, port, resolve_within).await?;
    if let Some(v) = addrs.iter().find_map(|a| veto(*a)) {
        return Err(TargetError::Vetoed(v));
    }
    let mut candidates = addrs.iter().copied();
    let dialed = failover(
        || addrs.len(),
        || candidates.next(),
        |a| dialer.dial(*a),
        |_, _| {},
    )
    .await;
    match dialed {
        Ok((_, d)) => Ok(Leased {
            lease: dialer.lease(d.source),
            stream: d.stream,
            local: d.local,
        }),
        Err(last) => Err(TargetError::Unreachable(last)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::dialer::DialErrorKind;

    fn refused(dest: SocketAddr) -> DialError {
        DialError {
            dest,
            from: None,
            kind: DialErrorKind::Io(std::io::Error::from_raw_os_error(libc::ECONNREFUSED)),
        }
    }

    fn timed_out(dest: SocketAddr) -> DialError {
        DialError {
            dest,
            from: None,
            kind: DialErrorKind::Timeout(Duration::from_secs(2)),
        }
    }

    fn no_family(dest: SocketAddr) -> DialError {
        DialError {
            dest,
            from: Some("198.18.0.11".parse().unwrap()),
            kind: DialErrorKind::NoSourceForFamily,
        }
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, 2], 9000 + i as u16))
    }

    /// Dial outcomes, in the order the candidates are tried.
    #[derive(Clone, Copy, Debug)]
    enum Outcome {
        Ok,
        Refused,
        TimedOut,
        NoFamily,
    }
    use Outcome::*;

    /// Runs [`failover`] over `candidates` candidates (of which `next`
    /// gives `given`: a set that shrinks in between), each dial answering
    /// with the next outcome; returns the candidates dialed, those
    /// recorded as failed, and the result (the candidate that connected,
    /// or the destination of the last failure).
    async fn run(
        candidates: usize,
        given: usize,
        outcomes: &[Outcome],
    ) -> (Vec<usize>, Vec<usize>, Result<usize, Option<SocketAddr>>) {
        let mut dialed = Vec::new();
        let mut failed = Vec::new();
        let mut next = 0..given;
        let r = failover(
            || candidates,
            || next.next(),
            |c: &usize| {
                dialed.push(*c);
                let outcome = outcomes[dialed.len() - 1];
                let dest = addr(*c);
                std::future::ready(match outcome {
                    Ok => Result::Ok(()),
                    Refused => Err(refused(dest)),
                    TimedOut => Err(timed_out(dest)),
                    NoFamily => Err(no_family(dest)),
                })
            },
            |c, e| {
                assert_eq!(e.dest, addr(*c), "a failure recorded against another");
                failed.push(*c);
            },
        )
        .await;
        let r = r.map(|(c, ())| c).map_err(|last| last.map(|e| e.dest));
        (dialed, failed, r)
    }

    /// Up to three candidates, the first that connects wins, every kind of
    /// dial failure goes on to the next, each failure is recorded against
    /// its own candidate, and the error is the last dial's.
    #[tokio::test]
    async fn dial_failover_table() {
        // (candidates, given by next, outcomes, dialed, failed, result)
        type Row<'a> = (
            usize,
            usize,
            &'a [Outcome],
            &'a [usize],
            &'a [usize],
            Result<usize, Option<SocketAddr>>,
        );
        let table: &[Row] = &[
            (0, 0, &[], &[], &[], Err(None)),
            (1, 1, &[Ok], &[0], &[], Result::Ok(0)),
            (1, 1, &[Refused], &[0], &[0], Err(Some(addr(0)))),
            (2, 2, &[Refused, Ok], &[0, 1], &[0], Result::Ok(1)),
            (
                2,
                2,
                &[TimedOut, Refused],
                &[0, 1],
                &[0, 1],
                Err(Some(addr(1))),
            ),
            (
                3,
                3,
                &[NoFamily, TimedOut, Ok],
                &[0, 1, 2],
                &[0, 1],
                Result::Ok(2),
            ),
            (
                5,
                5,
                &[Refused, Refused, Refused, Ok],
                &[0, 1, 2],
                &[0, 1, 2],
                Err(Some(addr(2))),
            ),
            (9, 9, &[Ok], &[0], &[], Result::Ok(0)),
            // The set shrank after it was counted: the last failure stands.
            (3, 1, &[Refused], &[0], &[0], Err(Some(addr(0)))),
        ];
        for (i, (n, given, outcomes, dialed, failed, result)) in table.iter().enumerate() {
            let got = run(*n, *given, outcomes).await;
            assert_eq!(
                (&got.0[..], &got.1[..], &got.2),
                (*dialed, *failed, result),
                "row {i}: {n} candidates, {outcomes:?}"
            );
        }
    }

    #[test]
    fn other_candidates_after_a_failed_dial() {
        for (n, other) in [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (100, 2)] {
            assert_eq!(other_candidates(n), other, "{n} candidates");
        }
    }

    /// The serve role's answers are built from these texts.
    #[tokio::test]
    async fn the_texts_of_the_serve_roles_answers() {
        let ip = Host::Ip("198.18.0.2".parse().unwrap());
        assert_eq!(
            resolve(&ip, 443, Duration::ZERO).await.unwrap(),
            vec![SocketAddr::from(([198, 18, 0, 2], 443))]
        );
        let t = ResolveError::Timeout {
            name: "redis.internal".into(),
        };
        assert_eq!(
            t.to_string(),
            "no answer from the resolver for `redis.internal` within connect_timeout"
        );
        assert_eq!(
            TargetError::Unreachable(None).to_string(),
            "resolves to no address"
        );
    }
}
