//! error: edgepool's own errors — which side failed, the status and one-token
//! `X-Edgepool-Error` they map to, and the response a worker gets for them.
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use crate::body::{full_body, ProxyBody};

/// Which party a failure belongs to. It picks the status code and the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The worker sent something we cannot serve.
    Worker,
    /// The target site (DNS, connect, TLS, response) failed.
    Target,
    /// edgepool itself (overload, internal).
    Edgepool,
    /// An upstream proxy node (exit) failed or refused.
    Exit,
}

impl Side {
    /// Lower-case name for JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Worker => "worker",
            Side::Target => "target",
            Side::Edgepool => "edgepool",
            Side::Exit => "exit",
        }
    }
}

/// Whether the request may have reached the target, as far as edgepool knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// No byte of it was written upstream.
    None,
    /// Some or all of it was written; the target may have acted on it.
    Maybe,
    /// It was written completely.
    Complete,
}

impl Sent {
    /// The stronger of the two claims (none < maybe < complete).
    pub fn max_with(self, other: Sent) -> Sent {
        let rank = |s: Sent| match s {
            Sent::None => 0,
            Sent::Maybe => 1,
            Sent::Complete => 2,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }

    /// Lower-case name for JSON and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Sent::None => "none",
            Sent::Maybe => "maybe",
            Sent::Complete => "complete",
        }
    }
}

/// An error produced by edgepool (never a target's own response).
#[derive(Clone, Debug)]
pub struct EdgeError {
    /// HTTP status for the worker.
    pub status: StatusCode,
    /// One token for `X-Edgepool-Error`, the reason phrase and the metric label.
    pub token: &'static str,
    /// RFC 9209 `Proxy-Status` error type.
    pub proxy_status: &'static str,
    /// Who failed.
    pub side: Side,
    /// Human explanation (never contains credentials).
    pub detail: String,
    /// Whether the request may have reached the target.
    pub sent: Option<Sent>,
    /// `Retry-After` seconds, for 503s.
    pub retry_after: Option<u32>,
    /// Ask for proxy credentials (`Proxy-Authenticate`), for 407s.
    pub proxy_authenticate: bool,
}

impl EdgeError {
    fn new(
        status: StatusCode,
        token: &'static str,
        proxy_status: &'static str,
        side: Side,
        detail: impl Into<String>,
    ) -> Self {
        EdgeError {
            status,
            token,
            proxy_status,
            side,
            detail: detail.into(),
            sent: None,
            retry_after: None,
            proxy_authenticate: false,
        }
    }
    /// 407: the worker's proxy credentials are missing, wrong or carry a malformed option.
    pub fn proxy_auth(token: &'static str, detail: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            token,
            "http_request_denied",
            Side::Worker,
            detail,
        );
        e.proxy_authenticate = true;
        e.sent = Some(Sent::None);
        e
    }
    /// 502 from an exit (upstream proxy) failure: `exit_connect_failed` (unreachable, timed
    /// out, broke the protocol), `exit_auth_failed` (rejected our credentials),
    /// `exit_refused` (would not reach the target), `session_exit_lost` (a strict session's
    /// exit is gone). Nothing was sent to the target.
    pub fn exit_failed(token: &'static str, detail: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_GATEWAY,
            token,
            if token == "exit_refused" {
                "destination_unavailable"
            } else {
                "proxy_next_hop_connection"
            },
            Side::Exit,
            detail,
        );
        e.sent = Some(Sent::None);
        e
    }
    /// 503 + `Retry-After`: every exit of the pool is down (circuit open) or at its budget.
    pub fn no_healthy_exit(
        token: &'static str,
        detail: impl Into<String>,
        retry_after: u32,
    ) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            token,
            "proxy_next_hop_connection",
            Side::Exit,
            detail,
        );
        e.retry_after = Some(retry_after.max(1));
        e.sent = Some(Sent::None);
        e
    }
    /// 400: the worker's request is not something a proxy can forward.
    pub fn bad_request(token: &'static str, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            token,
            "http_request_error",
            Side::Worker,
            detail,
        )
    }
    /// 400 `target_forbidden`: the target resolves to an address policy refuses (loopback,
    /// private, metadata, ...). Deliberately not 403: scrapers read 403 as a target's block.
    pub fn target_forbidden(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "target_forbidden",
            "destination_ip_prohibited",
            Side::Worker,
            detail,
        )
    }
    /// 400 `connect_port_forbidden`: CONNECT to a port outside `targets.connect_ports`.
    pub fn connect_port_forbidden(port: u16) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "connect_port_forbidden",
            "http_request_denied",
            Side::Worker,
            format!(
                "CONNECT to port {port} is not allowed; allowed ports are set by targets.connect_ports (default 443 and 80)"
            ),
        );
        e.sent = Some(Sent::None);
        e
    }
    /// A worker request refused before anything was sent: bad framing (400), head too large
    /// (431), URI too long (414), too slow (408). The worker's connection is closed.
    pub fn request_rejected(
        status: StatusCode,
        token: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        let mut e = Self::new(status, token, "http_request_error", Side::Worker, detail);
        e.sent = Some(Sent::None);
        e
    }
    /// 503 + `Retry-After`: edgepool is at one of its own capacity limits (requests in flight,
    /// tunnels, connections per worker). Nothing was sent; the worker may retry after the pause.
    pub fn overloaded(token: &'static str, detail: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            token,
            "connection_limit_reached",
            Side::Worker,
            detail,
        );
        e.retry_after = Some(1);
        e.sent = Some(Sent::None);
        e
    }
    /// 508 `loop_detected`: the request would reach edgepool itself, or it already passed
    /// through too many proxies (`Via` hop cap).
    pub fn loop_detected(detail: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::LOOP_DETECTED,
            "loop_detected",
            "proxy_loop_detected",
            Side::Worker,
            detail,
        );
        e.sent = Some(Sent::None);
        e
    }
    /// 413: the request body is over the limit.
    pub fn body_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_body_too_large",
            "http_request_error",
            Side::Worker,
            format!("request body is larger than limits.max_request_body ({limit} bytes)"),
        )
    }
    /// 413 `fetch_too_large`: a `/v1/fetch` document over `limits.max_fetch_json`.
    pub fn fetch_too_large(limit: u64) -> Self {
        let mut e = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "fetch_too_large",
            "http_request_error",
            Side::Worker,
            format!("the JSON document is larger than limits.max_fetch_json ({limit} bytes)"),
        );
        e.sent = Some(Sent::None);
        e
    }
    /// 502 `dns_failed`.
    pub fn dns_failed(host: &str, why: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_GATEWAY,
            "dns_failed",
            "dns_error",
            Side::Target,
            format!("could not resolve {host}: {why}"),
        );
        e.sent = Some(Sent::None);
        e
    }
    /// 502 `upstream_connect_failed`.
    pub fn connect_failed(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_connect_failed",
            "connection_refused",
            Side::Target,
            detail,
        )
    }
    /// 504 `upstream_connect_timeout`.
    pub fn connect_timeout(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_connect_timeout",
            "connection_timeout",
            Side::Target,
            detail,
        )
    }
    /// 502 `upstream_tls_failed` (never retried; never hidden behind our CA).
    pub fn tls_failed(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_tls_failed",
            "tls_protocol_error",
            Side::Target,
            detail,
        )
    }
    /// 504 `upstream_response_timeout`.
    pub fn response_timeout(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_response_timeout",
            "http_response_timeout",
            Side::Target,
            detail,
        )
    }
    /// 502 `upstream_request_failed`: the upstream connection failed during the request.
    pub fn request_failed(detail: impl Into<String>, sent: Sent) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_request_failed",
            "connection_terminated",
            Side::Target,
            detail,
        );
        e.sent = Some(sent);
        e
    }
    /// 502 `upstream_failed_not_replayed`: a non-idempotent request failed on a reused
    /// connection after it may have reached the target; edgepool does not replay it.
    pub fn not_replayed(detail: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_failed_not_replayed",
            "connection_terminated",
            Side::Target,
            detail,
        );
        e.sent = Some(Sent::Maybe);
        e
    }
    /// 502 `upstream_bad_response`: the response could not be parsed.
    pub fn bad_response(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_bad_response",
            "http_protocol_error",
            Side::Target,
            detail,
        )
    }
    /// 503 `pool_queue_timeout`: no connection became free in time.
    pub fn queue_timeout(detail: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "pool_queue_timeout",
            "connection_limit_reached",
            Side::Edgepool,
            detail,
        );
        e.retry_after = Some(1);
        e.sent = Some(Sent::None);
        e
    }
    /// 503 `ephemeral_ports_exhausted`: the local port range stayed nearly full while the dial
    /// was held.
    pub fn ports_exhausted(detail: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ephemeral_ports_exhausted",
            "proxy_internal_error",
            Side::Edgepool,
            detail,
        );
        e.retry_after = Some(2);
        e.sent = Some(Sent::None);
        e
    }
    /// 503 `shutting_down`.
    pub fn shutting_down() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "proxy_internal_error",
            Side::Edgepool,
            "edgepool is shutting down",
        );
        e.retry_after = Some(1);
        e
    }
    /// 500 `internal_error`.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "proxy_internal_error",
            Side::Edgepool,
            detail,
        )
    }
    /// With the request-sent state set.
    pub fn with_sent(mut self, sent: Sent) -> Self {
        self.sent = Some(sent);
        self
    }

    /// Raises `request_sent` to at least `sent` (an earlier attempt of the same request may
    /// have reached the target even if the last one did not).
    pub fn sent_at_least(mut self, sent: Sent) -> Self {
        if sent != Sent::None {
            self.sent = Some(self.sent.unwrap_or(Sent::None).max_with(sent));
        }
        self
    }

    /// The JSON body.
    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "error": self.token,
            "side": self.side.as_str(),
            "detail": self.detail,
        });
        if let Some(s) = self.sent {
            v["request_sent"] = s.as_str().into();
        }
        v
    }

    /// The response a worker gets: status, `X-Edgepool-Error`, `Proxy-Status`, the token as
    /// reason phrase (HTTP/1.1) and a short JSON body.
    pub fn to_response(&self) -> Response<ProxyBody> {
        let body = Bytes::from(self.json().to_string() + "\n");
        let mut res = Response::new(full_body(body));
        *res.status_mut() = self.status;
        let h = res.headers_mut();
        h.insert("x-edgepool-error", HeaderValue::from_static(self.token));
        let detail = self.detail.replace(['"', '\\'], "'");
        let ps = format!(
            "edgepool; error={}; details=\"{}\"",
            self.proxy_status, detail
        );
        if let Ok(v) = HeaderValue::from_str(&ps) {
            h.insert("proxy-status", v);
        }
        h.insert("content-type", HeaderValue::from_static("application/json"));
        if let Some(s) = self.sent {
            h.insert(
                "x-edgepool-request-sent",
                HeaderValue::from_static(s.as_str()),
            );
        }
        if let Some(r) = self.retry_after {
            h.insert("retry-after", HeaderValue::from(r));
        }
        if self.proxy_authenticate {
            h.insert(
                "proxy-authenticate",
                HeaderValue::from_static("Basic realm=\"edgepool\""),
            );
        }
        res.extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(self.token.as_bytes()));
        res
    }
}

impl std::fmt::Display for EdgeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.token,
            self.status.as_u16(),
            self.detail
        )
    }
}

impl std::error::Error for EdgeError {}

/// Removes, from a response edgepool did not make, every `Proxy-Status` member that names
/// edgepool (RFC 9209: each intermediary writes its own member): a target or an upstream proxy
/// cannot make a worker believe edgepool refused or failed something. Other intermediaries'
/// members pass unchanged; a header left with no member is removed.
pub fn strip_foreign_proxy_status(headers: &mut HeaderMap) {
    if !headers.contains_key("proxy-status") {
        return;
    }
    let mut kept: Vec<HeaderValue> = Vec::new();
    for v in headers.get_all("proxy-status") {
        let Ok(text) = v.to_str() else {
            // Not even text: no member of it can be trusted to be someone else's.
            continue;
        };
        let members: Vec<&str> = split_list(text)
            .into_iter()
            .filter(|m| !names_edgepool(m))
            .collect();
        if members.len() == split_list(text).len() {
            kept.push(v.clone());
        } else if !members.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&members.join(", ")) {
                kept.push(v);
            }
        }
    }
    headers.remove("proxy-status");
    for v in kept {
        headers.append("proxy-status", v);
    }
}

/// The members of a structured-field list (RFC 8941 §3.1), split at commas outside quoted
/// strings, trimmed.
fn split_list(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(text[start..].trim());
    out.retain(|m| !m.is_empty());
    out
}

/// Whether a list member's item (before its parameters) is `edgepool`, as a token or a
/// string, in any case.
fn names_edgepool(member: &str) -> bool {
    let item = member.split(';').next().unwrap_or("").trim();
    let item = item.trim_matches('"');
    item.eq_ignore_ascii_case("edgepool")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_edgepool_proxy_status_member_is_removed_and_others_kept() {
        let mut h = HeaderMap::new();
        h.append(
            "proxy-status",
            HeaderValue::from_static(
                "cdn-7; error=http_response_timeout; details=\"a, b; c\", edgepool; error=destination_ip_prohibited",
            ),
        );
        h.append(
            "proxy-status",
            HeaderValue::from_static("\"EdgePool\"; error=dns_error"),
        );
        h.append("proxy-status", HeaderValue::from_static("squid"));
        strip_foreign_proxy_status(&mut h);
        let got: Vec<&str> = h
            .get_all("proxy-status")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            got,
            vec![
                "cdn-7; error=http_response_timeout; details=\"a, b; c\"",
                "squid"
            ]
        );
        let mut only = HeaderMap::new();
        only.insert(
            "proxy-status",
            HeaderValue::from_static("edgepool; error=x"),
        );
        strip_foreign_proxy_status(&mut only);
        assert!(!only.contains_key("proxy-status"));
    }
}
