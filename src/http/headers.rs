//! Header hygiene between client and upstream: hop-by-hop removal
//! (RFC 9110 §7.6.1) and `Host`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Fields that describe one connection, never forwarded. `Transfer-Encoding`
/// is framing: hyper re-frames each side itself. `Expect` is answered by
/// loopmux (hyper sends `100 Continue` when the body is first read).
const HOP_BY_HOP: [HeaderName; 9] = [
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
    // Most requests have no Connection header or only "close"/"keep-alive":
    // no allocation on that path.
    if headers.contains_key(header::CONNECTION) {
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
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
}

/// Removes `Expect` from a request going upstream (see [`HOP_BY_HOP`]).
pub fn strip_expect(headers: &mut HeaderMap) {
    headers.remove(header::EXPECT);
}

/// Sets `Host` for the upstream request: the fixed value if configured,
/// else the client's, else (HTTP/1.0 without `Host`) the fallback.
pub fn set_host(
    headers: &mut HeaderMap,
    fixed: Option<&HeaderValue>,
    fallback: impl FnOnce() -> Option<HeaderValue>,
) {
    if let Some(v) = fixed {
        headers.insert(header::HOST, v.clone());
    } else if !headers.contains_key(header::HOST) {
        if let Some(v) = fallback() {
            headers.insert(header::HOST, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
