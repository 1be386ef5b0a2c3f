//! Fuzzes the `/v1/fetch` document path (`edgepool::ingress::parse_fetch_document`): the JSON
//! a worker posts, then the request it describes, checked against the default limits.
//! Invariants: nothing panics; an accepted document yields a request within the limits —
//! a host, at most `max_headers` fields, a head within `max_header_bytes`, a body within
//! `max_request_body`, and no hop-by-hop, `Content-Length` or `X-Edgepool-*` header left for
//! the target.
#![no_main]

use edgepool::config::LimitsConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = LimitsConfig::default();
    let Ok(out) = edgepool::ingress::parse_fetch_document(data, &limits) else {
        return;
    };
    assert!(!out.host.is_empty(), "accepted without a host");
    assert!(out.headers.len() <= limits.max_headers);
    let head: usize = out
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    assert!(head <= limits.max_header_bytes);
    assert!(out.body.len() as u64 <= limits.max_request_body);
    for (k, _) in out.headers.iter() {
        let k = k.as_str();
        assert!(!k.starts_with("x-edgepool-"), "{k} reached the target");
        assert!(
            !matches!(
                k,
                "connection"
                    | "keep-alive"
                    | "proxy-connection"
                    | "proxy-authorization"
                    | "te"
                    | "transfer-encoding"
                    | "upgrade"
                    | "content-length"
            ),
            "{k} reached the target"
        );
    }
});
