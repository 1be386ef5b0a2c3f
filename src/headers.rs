//! headers: header hygiene at the proxy boundary — hop-by-hop removal (RFC 9110 §7.6.1) and
//! edgepool's own `X-Edgepool-*` headers off a worker's request, and the `Keep-Alive` response
//! hints the pool learns from.
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName};

use crate::pool::Hints;

/// Parses `Keep-Alive: timeout=5, max=100` (case-insensitive, any order, junk ignored).
pub fn parse_keep_alive(v: &str) -> Hints {
    let mut h = Hints::default();
    for part in v.split(',') {
        let mut kv = part.splitn(2, '=');
        let k = kv.next().unwrap_or("").trim().to_ascii_lowercase();
        let Some(val) = kv.next().map(|s| s.trim().trim_matches('"')) else {
            continue;
        };
        match k.as_str() {
            "timeout" => {
                if let Ok(n) = val.parse::<u64>() {
                    h.idle_timeout = Some(Duration::from_secs(n));
                }
            }
            "max" => {
                if let Ok(n) = val.parse::<u64>() {
                    h.remaining_requests = Some(n);
                }
            }
            _ => {}
        }
    }
    h
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named by `Connection`.
/// `Upgrade` goes too: only [`crate::upgrade`] puts it back, on a WebSocket handshake's own
/// dedicated connection (and in the `101` it relays).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        // The usual options (`keep-alive`, `close`) name no other header, or one removed
        // below anyway: only the rest are parsed into names (an allocation each).
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !t.is_empty()
                    && !t.eq_ignore_ascii_case("close")
                    && !HOP_BY_HOP
                        .iter()
                        .any(|h| t.eq_ignore_ascii_case(h.as_str()))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    // One pass over the few names present, then a removal for each hop-by-hop name found
    // (usually none, or `Connection` and `Keep-Alive` of a keep-alive response): cheaper
    // than a hashed removal for each of the nine.
    let mut found = [false; HOP_BY_HOP_COUNT];
    for k in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
            found[i] = true;
        }
    }
    for (n, _) in HOP_BY_HOP.iter().zip(found).filter(|(_, f)| *f) {
        headers.remove(n);
    }
}

/// `X-Edgepool-Reused` (response): `1` if the request rode a pooled connection.
pub const X_EDGEPOOL_REUSED: HeaderName = HeaderName::from_static("x-edgepool-reused");
/// `X-Edgepool-Exit` (response): the exit node's label.
pub const X_EDGEPOOL_EXIT: HeaderName = HeaderName::from_static("x-edgepool-exit");
/// `X-Edgepool-Session` (response): the worker session the request belonged to.
pub const X_EDGEPOOL_SESSION: HeaderName = HeaderName::from_static(crate::worker::SESSION_HEADER);
/// `X-Edgepool-Session-Renewed` (response): the session moved to another exit.
pub const X_EDGEPOOL_SESSION_RENEWED: HeaderName =
    HeaderName::from_static("x-edgepool-session-renewed");

/// The hop-by-hop headers of RFC 9110 §7.6.1, plus `Proxy-Connection` and `Upgrade`. A
/// `static`, not a `const`: a `const` array is built afresh, and dropped, wherever it is
/// used.
const HOP_BY_HOP_COUNT: usize = 9;
static HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
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

/// Removes hop-by-hop and every `X-Edgepool-*` header from a worker's request.
pub fn clean_request_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    strip_edgepool_headers(headers);
}

/// Removes hop-by-hop headers from a target's response, and what only edgepool may say:
/// every `X-Edgepool-*` header (a target cannot fake reuse, exit or session) and edgepool's
/// member of `Proxy-Status`.
pub fn clean_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    strip_edgepool_headers(headers);
    crate::error::strip_foreign_proxy_status(headers);
}

fn strip_edgepool_headers(headers: &mut HeaderMap) {
    let ours = |k: &HeaderName| k.as_str().starts_with("x-edgepool-");
    if !headers.keys().any(ours) {
        return;
    }
    let ours: Vec<HeaderName> = headers.keys().filter(|k| ours(k)).cloned().collect();
    for k in ours {
        headers.remove(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn keep_alive_header_gives_timeout_and_max() {
        assert_eq!(
            parse_keep_alive("timeout=5, max=100"),
            Hints {
                idle_timeout: Some(Duration::from_secs(5)),
                remaining_requests: Some(100)
            }
        );
        assert_eq!(
            parse_keep_alive("MAX=3,Timeout=\"7\""),
            Hints {
                idle_timeout: Some(Duration::from_secs(7)),
                remaining_requests: Some(3)
            }
        );
        assert_eq!(parse_keep_alive("garbage, timeout=x"), Hints::default());
    }

    #[test]
    fn hop_by_hop_and_edgepool_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic eA=="),
        );
        h.insert("x-edgepool-session", HeaderValue::from_static("s1"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        clean_request_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));

        // Options in any case, empty list members, hop-by-hop names among them, several
        // Connection fields; a response loses the same.
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("Close , X-A,, TE"));
        h.append("connection", HeaderValue::from_static("x-b"));
        for n in ["x-a", "x-b", "te", "upgrade", "trailer", "accept"] {
            h.insert(n, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["accept"]);
    }
}
