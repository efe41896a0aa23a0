//! Where a forward-proxy request wants to go: the absolute-form target of
//! a plain request (RFC 9112 §3.2.2) or the authority-form of `CONNECT`
//! (§3.2.3).

use std::fmt;

use http::uri::Scheme;
use http::Uri;

use crate::allow::{parse_host, Host};

/// A destination named by a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: Host,
    pub port: u16,
    /// TLS toward the origin (an `https://` target, or `originate_tls`).
    pub tls: bool,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("this is a forward proxy: the request target must be absolute (GET http://host/path), as clients send it when HTTP_PROXY points here; for direct requests use a listener with mode = \"http\"")]
    OriginForm,
    #[error("scheme `{0}` is not proxied: send http:// targets, or HTTPS through CONNECT")]
    Scheme(String),
    #[error("the request target has no host")]
    NoHost,
    #[error("user information (user@host) in the request target is not forwarded")]
    Userinfo,
    #[error("CONNECT needs host:port as its target")]
    ConnectForm,
    #[error("host `{host}`: {reason}")]
    BadHost { host: String, reason: &'static str },
}

fn host_of(authority: &http::uri::Authority) -> Result<Host, TargetError> {
    if authority.as_str().contains('@') {
        return Err(TargetError::Userinfo);
    }
    let raw = authority.host();
    if raw.is_empty() {
        return Err(TargetError::NoHost);
    }
    parse_host(raw).map_err(|reason| TargetError::BadHost {
        host: raw.to_string(),
        reason,
    })
}

/// The target of a plain (non-CONNECT) request.
///
/// # Errors
/// Origin-form, a scheme other than http/https, or a host that is not one.
pub fn of_request(uri: &Uri) -> Result<Target, TargetError> {
    let Some(scheme) = uri.scheme() else {
        return Err(TargetError::OriginForm);
    };
    let tls = if *scheme == Scheme::HTTP {
        false
    } else if *scheme == Scheme::HTTPS {
        true
    } else {
        return Err(TargetError::Scheme(scheme.as_str().to_string()));
    };
    let authority = uri.authority().ok_or(TargetError::NoHost)?;
    let host = host_of(authority)?;
    let port = match authority.port_u16() {
        Some(0) => {
            return Err(TargetError::BadHost {
                host: authority.to_string(),
                reason: "port 0 cannot be reached",
            })
        }
        Some(p) => p,
        None if tls => 443,
        None => 80,
    };
    Ok(Target { host, port, tls })
}

/// The target of `CONNECT host:port`.
///
/// # Errors
/// Anything but a host and a non-zero port.
pub fn of_connect(uri: &Uri) -> Result<Target, TargetError> {
    if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(TargetError::ConnectForm);
    }
    let authority = uri.authority().ok_or(TargetError::ConnectForm)?;
    let host = host_of(authority)?;
    match authority.port_u16() {
        Some(0) | None => Err(TargetError::ConnectForm),
        Some(port) => Ok(Target {
            host,
            port,
            tls: false,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(t: &str) -> Result<Target, TargetError> {
        of_request(&t.parse::<Uri>().unwrap())
    }

    #[test]
    fn absolute_targets() {
        let t = req("http://API.example.com/x?y").unwrap();
        assert_eq!(t.to_string(), "api.example.com:80");
        assert!(!t.tls);
        let t = req("https://api.example.com:8443/").unwrap();
        assert_eq!((t.port, t.tls), (8443, true));
        assert_eq!(req("http://[::1]:8080/").unwrap().to_string(), "[::1]:8080");
        assert_eq!(
            req("http://127.0.0.1/").unwrap().host,
            Host::Ip("127.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn refused_targets() {
        assert_eq!(req("/path"), Err(TargetError::OriginForm));
        assert!(matches!(req("ftp://a.b/"), Err(TargetError::Scheme(_))));
        assert_eq!(req("http://u:p@a.b/"), Err(TargetError::Userinfo));
        assert!(matches!(
            req("http://2130706433/"),
            Err(TargetError::BadHost { .. })
        ));
        assert!(matches!(
            req("http://a.b:0/"),
            Err(TargetError::BadHost { .. })
        ));
    }

    #[test]
    fn connect_targets() {
        let c = |s: &str| of_connect(&s.parse::<Uri>().unwrap());
        assert_eq!(c("example.com:443").unwrap().to_string(), "example.com:443");
        assert_eq!(c("[::1]:22").unwrap().port, 22);
        assert_eq!(c("example.com"), Err(TargetError::ConnectForm));
        assert_eq!(c("http://example.com:443/"), Err(TargetError::ConnectForm));
    }
}
