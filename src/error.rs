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

/// Every error edgepool answers a worker with: the error contract. Each kind has one token
/// (`X-Edgepool-Error`, reason phrase, `edgepool_errors_total{error}`), one status, one RFC 9209
/// `Proxy-Status` type, the side that failed, and `Retry-After` where a retry helps. The
/// README's error table is checked against [`ErrorKind::ALL`] by a test, so they cannot drift.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// `target_forbidden`.
    TargetForbidden,
    /// `not_a_proxy_request`.
    NotAProxyRequest,
    /// `bad_connect_target`.
    BadConnectTarget,
    /// `bad_target`.
    BadTarget,
    /// `unsupported_scheme`.
    UnsupportedScheme,
    /// `invalid_request`.
    InvalidRequest,
    /// `fetch_bad_json`.
    FetchBadJson,
    /// `fetch_bad_url`.
    FetchBadUrl,
    /// `fetch_bad_method`.
    FetchBadMethod,
    /// `fetch_bad_body`.
    FetchBadBody,
    /// `method_not_allowed`.
    MethodNotAllowed,
    /// `nested_connect`.
    NestedConnect,
    /// `fetch_bad_header`.
    FetchBadHeader,
    /// `worker_body_failed`.
    WorkerBodyFailed,
    /// `fetch_body_unreadable`.
    FetchBodyUnreadable,
    /// `bad_session_header`.
    BadSessionHeader,
    /// `unknown_exit_pool`.
    UnknownExitPool,
    /// `direct_not_allowed`.
    DirectNotAllowed,
    /// `unsupported_upgrade`.
    UnsupportedUpgrade,
    /// `connect_port_forbidden`.
    ConnectPortForbidden,
    /// `bad_framing`.
    BadFraming,
    /// `bad_request_head`.
    BadRequestHead,
    /// `bad_host_header`.
    BadHostHeader,
    /// `proxy_auth_required`.
    ProxyAuthRequired,
    /// `proxy_auth_failed`.
    ProxyAuthFailed,
    /// `proxy_auth_malformed`.
    ProxyAuthMalformed,
    /// `bad_proxy_option`.
    BadProxyOption,
    /// `request_header_timeout`.
    RequestHeaderTimeout,
    /// `request_body_timeout`.
    RequestBodyTimeout,
    /// `request_body_too_large`.
    RequestBodyTooLarge,
    /// `fetch_too_large`.
    FetchTooLarge,
    /// `uri_too_long`.
    UriTooLong,
    /// `request_header_too_large`.
    RequestHeaderTooLarge,
    /// `overloaded`.
    Overloaded,
    /// `tunnel_limit`.
    TunnelLimit,
    /// `worker_connection_limit`.
    WorkerConnectionLimit,
    /// `memory_budget`.
    MemoryBudget,
    /// `worker_share_limit`.
    WorkerShareLimit,
    /// `loop_detected`.
    LoopDetected,
    /// `exit_connect_failed`.
    ExitConnectFailed,
    /// `exit_auth_failed`.
    ExitAuthFailed,
    /// `exit_refused`.
    ExitRefused,
    /// `session_exit_lost`.
    SessionExitLost,
    /// `no_healthy_exit`.
    NoHealthyExit,
    /// `exit_budget_exhausted`.
    ExitBudgetExhausted,
    /// `dns_failed`.
    DnsFailed,
    /// `upstream_connect_failed`.
    UpstreamConnectFailed,
    /// `upstream_connect_timeout`.
    UpstreamConnectTimeout,
    /// `upstream_tls_failed`.
    UpstreamTlsFailed,
    /// `upstream_response_timeout`.
    UpstreamResponseTimeout,
    /// `upstream_request_failed`.
    UpstreamRequestFailed,
    /// `upstream_failed_not_replayed`.
    UpstreamFailedNotReplayed,
    /// `upstream_bad_response`.
    UpstreamBadResponse,
    /// `pool_queue_timeout`.
    PoolQueueTimeout,
    /// `ephemeral_ports_exhausted`.
    EphemeralPortsExhausted,
    /// `shutting_down`.
    ShuttingDown,
    /// `internal_error`.
    InternalError,
}

impl ErrorKind {
    /// Every kind, in the README table's order.
    pub const ALL: &'static [ErrorKind] = &[
        ErrorKind::TargetForbidden,
        ErrorKind::NotAProxyRequest,
        ErrorKind::BadConnectTarget,
        ErrorKind::BadTarget,
        ErrorKind::UnsupportedScheme,
        ErrorKind::InvalidRequest,
        ErrorKind::FetchBadJson,
        ErrorKind::FetchBadUrl,
        ErrorKind::FetchBadMethod,
        ErrorKind::FetchBadBody,
        ErrorKind::MethodNotAllowed,
        ErrorKind::NestedConnect,
        ErrorKind::FetchBadHeader,
        ErrorKind::WorkerBodyFailed,
        ErrorKind::FetchBodyUnreadable,
        ErrorKind::BadSessionHeader,
        ErrorKind::UnknownExitPool,
        ErrorKind::DirectNotAllowed,
        ErrorKind::UnsupportedUpgrade,
        ErrorKind::ConnectPortForbidden,
        ErrorKind::BadFraming,
        ErrorKind::BadRequestHead,
        ErrorKind::BadHostHeader,
        ErrorKind::ProxyAuthRequired,
        ErrorKind::ProxyAuthFailed,
        ErrorKind::ProxyAuthMalformed,
        ErrorKind::BadProxyOption,
        ErrorKind::RequestHeaderTimeout,
        ErrorKind::RequestBodyTimeout,
        ErrorKind::RequestBodyTooLarge,
        ErrorKind::FetchTooLarge,
        ErrorKind::UriTooLong,
        ErrorKind::RequestHeaderTooLarge,
        ErrorKind::Overloaded,
        ErrorKind::TunnelLimit,
        ErrorKind::WorkerConnectionLimit,
        ErrorKind::MemoryBudget,
        ErrorKind::WorkerShareLimit,
        ErrorKind::LoopDetected,
        ErrorKind::ExitConnectFailed,
        ErrorKind::ExitAuthFailed,
        ErrorKind::ExitRefused,
        ErrorKind::SessionExitLost,
        ErrorKind::NoHealthyExit,
        ErrorKind::ExitBudgetExhausted,
        ErrorKind::DnsFailed,
        ErrorKind::UpstreamConnectFailed,
        ErrorKind::UpstreamConnectTimeout,
        ErrorKind::UpstreamTlsFailed,
        ErrorKind::UpstreamResponseTimeout,
        ErrorKind::UpstreamRequestFailed,
        ErrorKind::UpstreamFailedNotReplayed,
        ErrorKind::UpstreamBadResponse,
        ErrorKind::PoolQueueTimeout,
        ErrorKind::EphemeralPortsExhausted,
        ErrorKind::ShuttingDown,
        ErrorKind::InternalError,
    ];

    /// The token.
    pub fn token(self) -> &'static str {
        match self {
            ErrorKind::TargetForbidden => "target_forbidden",
            ErrorKind::NotAProxyRequest => "not_a_proxy_request",
            ErrorKind::BadConnectTarget => "bad_connect_target",
            ErrorKind::BadTarget => "bad_target",
            ErrorKind::UnsupportedScheme => "unsupported_scheme",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::FetchBadJson => "fetch_bad_json",
            ErrorKind::FetchBadUrl => "fetch_bad_url",
            ErrorKind::FetchBadMethod => "fetch_bad_method",
            ErrorKind::FetchBadBody => "fetch_bad_body",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::NestedConnect => "nested_connect",
            ErrorKind::FetchBadHeader => "fetch_bad_header",
            ErrorKind::WorkerBodyFailed => "worker_body_failed",
            ErrorKind::FetchBodyUnreadable => "fetch_body_unreadable",
            ErrorKind::BadSessionHeader => "bad_session_header",
            ErrorKind::UnknownExitPool => "unknown_exit_pool",
            ErrorKind::DirectNotAllowed => "direct_not_allowed",
            ErrorKind::UnsupportedUpgrade => "unsupported_upgrade",
            ErrorKind::ConnectPortForbidden => "connect_port_forbidden",
            ErrorKind::BadFraming => "bad_framing",
            ErrorKind::BadRequestHead => "bad_request_head",
            ErrorKind::BadHostHeader => "bad_host_header",
            ErrorKind::ProxyAuthRequired => "proxy_auth_required",
            ErrorKind::ProxyAuthFailed => "proxy_auth_failed",
            ErrorKind::ProxyAuthMalformed => "proxy_auth_malformed",
            ErrorKind::BadProxyOption => "bad_proxy_option",
            ErrorKind::RequestHeaderTimeout => "request_header_timeout",
            ErrorKind::RequestBodyTimeout => "request_body_timeout",
            ErrorKind::RequestBodyTooLarge => "request_body_too_large",
            ErrorKind::FetchTooLarge => "fetch_too_large",
            ErrorKind::UriTooLong => "uri_too_long",
            ErrorKind::RequestHeaderTooLarge => "request_header_too_large",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::TunnelLimit => "tunnel_limit",
            ErrorKind::WorkerConnectionLimit => "worker_connection_limit",
            ErrorKind::MemoryBudget => "memory_budget",
            ErrorKind::WorkerShareLimit => "worker_share_limit",
            ErrorKind::LoopDetected => "loop_detected",
            ErrorKind::ExitConnectFailed => "exit_connect_failed",
            ErrorKind::ExitAuthFailed => "exit_auth_failed",
            ErrorKind::ExitRefused => "exit_refused",
            ErrorKind::SessionExitLost => "session_exit_lost",
            ErrorKind::NoHealthyExit => "no_healthy_exit",
            ErrorKind::ExitBudgetExhausted => "exit_budget_exhausted",
            ErrorKind::DnsFailed => "dns_failed",
            ErrorKind::UpstreamConnectFailed => "upstream_connect_failed",
            ErrorKind::UpstreamConnectTimeout => "upstream_connect_timeout",
            ErrorKind::UpstreamTlsFailed => "upstream_tls_failed",
            ErrorKind::UpstreamResponseTimeout => "upstream_response_timeout",
            ErrorKind::UpstreamRequestFailed => "upstream_request_failed",
            ErrorKind::UpstreamFailedNotReplayed => "upstream_failed_not_replayed",
            ErrorKind::UpstreamBadResponse => "upstream_bad_response",
            ErrorKind::PoolQueueTimeout => "pool_queue_timeout",
            ErrorKind::EphemeralPortsExhausted => "ephemeral_ports_exhausted",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::InternalError => "internal_error",
        }
    }

    /// The status the worker gets.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::TargetForbidden => StatusCode::BAD_REQUEST,
            ErrorKind::NotAProxyRequest => StatusCode::BAD_REQUEST,
            ErrorKind::BadConnectTarget => StatusCode::BAD_REQUEST,
            ErrorKind::BadTarget => StatusCode::BAD_REQUEST,
            ErrorKind::UnsupportedScheme => StatusCode::BAD_REQUEST,
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::FetchBadJson => StatusCode::BAD_REQUEST,
            ErrorKind::FetchBadUrl => StatusCode::BAD_REQUEST,
            ErrorKind::FetchBadMethod => StatusCode::BAD_REQUEST,
            ErrorKind::FetchBadBody => StatusCode::BAD_REQUEST,
            ErrorKind::MethodNotAllowed => StatusCode::BAD_REQUEST,
            ErrorKind::NestedConnect => StatusCode::BAD_REQUEST,
            ErrorKind::FetchBadHeader => StatusCode::BAD_REQUEST,
            ErrorKind::WorkerBodyFailed => StatusCode::BAD_REQUEST,
            ErrorKind::FetchBodyUnreadable => StatusCode::BAD_REQUEST,
            ErrorKind::BadSessionHeader => StatusCode::BAD_REQUEST,
            ErrorKind::UnknownExitPool => StatusCode::BAD_REQUEST,
            ErrorKind::DirectNotAllowed => StatusCode::BAD_REQUEST,
            ErrorKind::UnsupportedUpgrade => StatusCode::BAD_REQUEST,
            ErrorKind::ConnectPortForbidden => StatusCode::BAD_REQUEST,
            ErrorKind::BadFraming => StatusCode::BAD_REQUEST,
            ErrorKind::BadRequestHead => StatusCode::BAD_REQUEST,
            ErrorKind::BadHostHeader => StatusCode::BAD_REQUEST,
            ErrorKind::ProxyAuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ErrorKind::ProxyAuthFailed => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ErrorKind::ProxyAuthMalformed => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ErrorKind::BadProxyOption => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ErrorKind::RequestHeaderTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::RequestBodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::FetchTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UriTooLong => StatusCode::URI_TOO_LONG,
            ErrorKind::RequestHeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::TunnelLimit => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::WorkerConnectionLimit => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::MemoryBudget => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::WorkerShareLimit => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::LoopDetected => StatusCode::LOOP_DETECTED,
            ErrorKind::ExitConnectFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::ExitAuthFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::ExitRefused => StatusCode::BAD_GATEWAY,
            ErrorKind::SessionExitLost => StatusCode::BAD_GATEWAY,
            ErrorKind::NoHealthyExit => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::ExitBudgetExhausted => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::DnsFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamConnectFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamConnectTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::UpstreamTlsFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::UpstreamRequestFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamFailedNotReplayed => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamBadResponse => StatusCode::BAD_GATEWAY,
            ErrorKind::PoolQueueTimeout => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::EphemeralPortsExhausted => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The RFC 9209 `Proxy-Status` error type.
    pub fn proxy_status(self) -> &'static str {
        match self {
            ErrorKind::TargetForbidden => "destination_ip_prohibited",
            ErrorKind::NotAProxyRequest => "http_request_error",
            ErrorKind::BadConnectTarget => "http_request_error",
            ErrorKind::BadTarget => "http_request_error",
            ErrorKind::UnsupportedScheme => "http_request_error",
            ErrorKind::InvalidRequest => "http_request_error",
            ErrorKind::FetchBadJson => "http_request_error",
            ErrorKind::FetchBadUrl => "http_request_error",
            ErrorKind::FetchBadMethod => "http_request_error",
            ErrorKind::FetchBadBody => "http_request_error",
            ErrorKind::MethodNotAllowed => "http_request_error",
            ErrorKind::NestedConnect => "http_request_error",
            ErrorKind::FetchBadHeader => "http_request_error",
            ErrorKind::WorkerBodyFailed => "http_request_error",
            ErrorKind::FetchBodyUnreadable => "http_request_error",
            ErrorKind::BadSessionHeader => "http_request_error",
            ErrorKind::UnknownExitPool => "http_request_error",
            ErrorKind::DirectNotAllowed => "http_request_error",
            ErrorKind::UnsupportedUpgrade => "http_request_error",
            ErrorKind::ConnectPortForbidden => "http_request_denied",
            ErrorKind::BadFraming => "http_request_error",
            ErrorKind::BadRequestHead => "http_request_error",
            ErrorKind::BadHostHeader => "http_request_error",
            ErrorKind::ProxyAuthRequired => "http_request_denied",
            ErrorKind::ProxyAuthFailed => "http_request_denied",
            ErrorKind::ProxyAuthMalformed => "http_request_denied",
            ErrorKind::BadProxyOption => "http_request_denied",
            ErrorKind::RequestHeaderTimeout => "http_request_error",
            ErrorKind::RequestBodyTimeout => "http_request_error",
            ErrorKind::RequestBodyTooLarge => "http_request_error",
            ErrorKind::FetchTooLarge => "http_request_error",
            ErrorKind::UriTooLong => "http_request_error",
            ErrorKind::RequestHeaderTooLarge => "http_request_error",
            ErrorKind::Overloaded => "connection_limit_reached",
            ErrorKind::TunnelLimit => "connection_limit_reached",
            ErrorKind::WorkerConnectionLimit => "connection_limit_reached",
            ErrorKind::MemoryBudget => "connection_limit_reached",
            ErrorKind::WorkerShareLimit => "connection_limit_reached",
            ErrorKind::LoopDetected => "proxy_loop_detected",
            ErrorKind::ExitConnectFailed => "proxy_next_hop_connection",
            ErrorKind::ExitAuthFailed => "proxy_next_hop_connection",
            ErrorKind::ExitRefused => "destination_unavailable",
            ErrorKind::SessionExitLost => "proxy_next_hop_connection",
            ErrorKind::NoHealthyExit => "proxy_next_hop_connection",
            ErrorKind::ExitBudgetExhausted => "proxy_next_hop_connection",
            ErrorKind::DnsFailed => "dns_error",
            ErrorKind::UpstreamConnectFailed => "connection_refused",
            ErrorKind::UpstreamConnectTimeout => "connection_timeout",
            ErrorKind::UpstreamTlsFailed => "tls_protocol_error",
            ErrorKind::UpstreamResponseTimeout => "http_response_timeout",
            ErrorKind::UpstreamRequestFailed => "connection_terminated",
            ErrorKind::UpstreamFailedNotReplayed => "connection_terminated",
            ErrorKind::UpstreamBadResponse => "http_protocol_error",
            ErrorKind::PoolQueueTimeout => "connection_limit_reached",
            ErrorKind::EphemeralPortsExhausted => "proxy_internal_error",
            ErrorKind::ShuttingDown => "proxy_internal_error",
            ErrorKind::InternalError => "proxy_internal_error",
        }
    }

    /// Who failed.
    pub fn side(self) -> Side {
        match self {
            ErrorKind::TargetForbidden => Side::Worker,
            ErrorKind::NotAProxyRequest => Side::Worker,
            ErrorKind::BadConnectTarget => Side::Worker,
            ErrorKind::BadTarget => Side::Worker,
            ErrorKind::UnsupportedScheme => Side::Worker,
            ErrorKind::InvalidRequest => Side::Worker,
            ErrorKind::FetchBadJson => Side::Worker,
            ErrorKind::FetchBadUrl => Side::Worker,
            ErrorKind::FetchBadMethod => Side::Worker,
            ErrorKind::FetchBadBody => Side::Worker,
            ErrorKind::MethodNotAllowed => Side::Worker,
            ErrorKind::NestedConnect => Side::Worker,
            ErrorKind::FetchBadHeader => Side::Worker,
            ErrorKind::WorkerBodyFailed => Side::Worker,
            ErrorKind::FetchBodyUnreadable => Side::Worker,
            ErrorKind::BadSessionHeader => Side::Worker,
            ErrorKind::UnknownExitPool => Side::Worker,
            ErrorKind::DirectNotAllowed => Side::Worker,
            ErrorKind::UnsupportedUpgrade => Side::Worker,
            ErrorKind::ConnectPortForbidden => Side::Worker,
            ErrorKind::BadFraming => Side::Worker,
            ErrorKind::BadRequestHead => Side::Worker,
            ErrorKind::BadHostHeader => Side::Worker,
            ErrorKind::ProxyAuthRequired => Side::Worker,
            ErrorKind::ProxyAuthFailed => Side::Worker,
            ErrorKind::ProxyAuthMalformed => Side::Worker,
            ErrorKind::BadProxyOption => Side::Worker,
            ErrorKind::RequestHeaderTimeout => Side::Worker,
            ErrorKind::RequestBodyTimeout => Side::Worker,
            ErrorKind::RequestBodyTooLarge => Side::Worker,
            ErrorKind::FetchTooLarge => Side::Worker,
            ErrorKind::UriTooLong => Side::Worker,
            ErrorKind::RequestHeaderTooLarge => Side::Worker,
            ErrorKind::Overloaded => Side::Worker,
            ErrorKind::TunnelLimit => Side::Worker,
            ErrorKind::WorkerConnectionLimit => Side::Worker,
            ErrorKind::MemoryBudget => Side::Worker,
            ErrorKind::WorkerShareLimit => Side::Worker,
            ErrorKind::LoopDetected => Side::Worker,
            ErrorKind::ExitConnectFailed => Side::Exit,
            ErrorKind::ExitAuthFailed => Side::Exit,
            ErrorKind::ExitRefused => Side::Exit,
            ErrorKind::SessionExitLost => Side::Exit,
            ErrorKind::NoHealthyExit => Side::Exit,
            ErrorKind::ExitBudgetExhausted => Side::Exit,
            ErrorKind::DnsFailed => Side::Target,
            ErrorKind::UpstreamConnectFailed => Side::Target,
            ErrorKind::UpstreamConnectTimeout => Side::Target,
            ErrorKind::UpstreamTlsFailed => Side::Target,
            ErrorKind::UpstreamResponseTimeout => Side::Target,
            ErrorKind::UpstreamRequestFailed => Side::Target,
            ErrorKind::UpstreamFailedNotReplayed => Side::Target,
            ErrorKind::UpstreamBadResponse => Side::Target,
            ErrorKind::PoolQueueTimeout => Side::Edgepool,
            ErrorKind::EphemeralPortsExhausted => Side::Edgepool,
            ErrorKind::ShuttingDown => Side::Edgepool,
            ErrorKind::InternalError => Side::Edgepool,
        }
    }

    /// `Retry-After` seconds, where waiting helps.
    pub fn retry_after(self) -> Option<u32> {
        match self {
            ErrorKind::Overloaded => Some(1),
            ErrorKind::TunnelLimit => Some(1),
            ErrorKind::WorkerConnectionLimit => Some(1),
            ErrorKind::MemoryBudget => Some(1),
            ErrorKind::WorkerShareLimit => Some(1),
            ErrorKind::NoHealthyExit => Some(1),
            ErrorKind::ExitBudgetExhausted => Some(1),
            ErrorKind::PoolQueueTimeout => Some(1),
            ErrorKind::EphemeralPortsExhausted => Some(2),
            ErrorKind::ShuttingDown => Some(1),
            _ => None,
        }
    }

    /// Whether this kind is always answered before anything was sent upstream (`request_sent:
    /// none` on every such error; other kinds set it where they know).
    pub fn never_sent(self) -> bool {
        matches!(
            self,
            ErrorKind::ConnectPortForbidden
                | ErrorKind::BadFraming
                | ErrorKind::BadRequestHead
                | ErrorKind::BadHostHeader
                | ErrorKind::ProxyAuthRequired
                | ErrorKind::ProxyAuthFailed
                | ErrorKind::ProxyAuthMalformed
                | ErrorKind::BadProxyOption
                | ErrorKind::RequestHeaderTimeout
                | ErrorKind::RequestBodyTimeout
                | ErrorKind::FetchTooLarge
                | ErrorKind::UriTooLong
                | ErrorKind::RequestHeaderTooLarge
                | ErrorKind::Overloaded
                | ErrorKind::TunnelLimit
                | ErrorKind::WorkerConnectionLimit
                | ErrorKind::MemoryBudget
                | ErrorKind::WorkerShareLimit
                | ErrorKind::LoopDetected
                | ErrorKind::ExitConnectFailed
                | ErrorKind::ExitAuthFailed
                | ErrorKind::ExitRefused
                | ErrorKind::SessionExitLost
                | ErrorKind::NoHealthyExit
                | ErrorKind::ExitBudgetExhausted
                | ErrorKind::DnsFailed
                | ErrorKind::PoolQueueTimeout
                | ErrorKind::EphemeralPortsExhausted
        )
    }
}

/// An error produced by edgepool (never a target's own response).
#[derive(Clone, Debug)]
pub struct EdgeError {
    /// What it is: the contract (token, status, Proxy-Status type, side).
    pub kind: ErrorKind,
    /// HTTP status for the worker (`kind.status()`).
    pub status: StatusCode,
    /// One token for `X-Edgepool-Error`, the reason phrase and the metric label
    /// (`kind.token()`).
    pub token: &'static str,
    /// RFC 9209 `Proxy-Status` error type (`kind.proxy_status()`).
    pub proxy_status: &'static str,
    /// Who failed (`kind.side()`).
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

impl From<ErrorKind> for StatusCode {
    fn from(k: ErrorKind) -> StatusCode {
        k.status()
    }
}

impl EdgeError {
    /// An error of `kind` explained by `detail`.
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        EdgeError {
            kind,
            status: kind.status(),
            token: kind.token(),
            proxy_status: kind.proxy_status(),
            side: kind.side(),
            detail: detail.into(),
            sent: kind.never_sent().then_some(Sent::None),
            retry_after: kind.retry_after(),
            proxy_authenticate: kind.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        }
    }
    /// 400 `connect_port_forbidden`: CONNECT to a port outside `targets.connect_ports`.
    pub fn connect_port_forbidden(port: u16) -> Self {
        Self::new(
            ErrorKind::ConnectPortForbidden,
            format!(
                "CONNECT to port {port} is not allowed; allowed ports are set by targets.connect_ports (default 443 and 80)"
            ),
        )
    }
    /// 413: the request body is over the limit.
    pub fn body_too_large(limit: u64) -> Self {
        Self::new(
            ErrorKind::RequestBodyTooLarge,
            format!("request body is larger than limits.max_request_body ({limit} bytes)"),
        )
    }
    /// 413 `fetch_too_large`: a `/v1/fetch` document over `limits.max_fetch_json`.
    pub fn fetch_too_large(limit: u64) -> Self {
        Self::new(
            ErrorKind::FetchTooLarge,
            format!("the JSON document is larger than limits.max_fetch_json ({limit} bytes)"),
        )
    }
    /// 502 `dns_failed`.
    pub fn dns_failed(host: &str, why: impl std::fmt::Display) -> Self {
        Self::new(
            ErrorKind::DnsFailed,
            format!("could not resolve {host}: {why}"),
        )
    }
    /// 502 `upstream_request_failed`: the upstream connection failed during the request.
    pub fn request_failed(detail: impl Into<String>, sent: Sent) -> Self {
        Self::new(ErrorKind::UpstreamRequestFailed, detail).with_sent(sent)
    }
    /// 502 `upstream_failed_not_replayed`: a non-idempotent request failed on a reused
    /// connection after it may have reached the target; edgepool does not replay it.
    pub fn not_replayed(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::UpstreamFailedNotReplayed, detail).with_sent(Sent::Maybe)
    }
    /// 503 `shutting_down`.
    pub fn shutting_down() -> Self {
        Self::new(ErrorKind::ShuttingDown, "edgepool is shutting down")
    }
    /// With `Retry-After` seconds (at least 1) instead of the kind's default.
    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs.max(1));
        self
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

/// `Proxy-Status` (RFC 9209) as a name: a `&str` key is parsed on every lookup.
const PROXY_STATUS: http::HeaderName = http::HeaderName::from_static("proxy-status");

/// Removes, from a response edgepool did not make, every `Proxy-Status` member that names
/// edgepool (RFC 9209: each intermediary writes its own member): a target or an upstream proxy
/// cannot make a worker believe edgepool refused or failed something. Other intermediaries'
/// members pass unchanged; a header left with no member is removed.
pub fn strip_foreign_proxy_status(headers: &mut HeaderMap) {
    if !headers.contains_key(PROXY_STATUS) {
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

    /// The README's error table and [`ErrorKind`] are one contract: every token in the table is
    /// a kind with that status, and every kind is in the table, once.
    #[test]
    fn the_readme_error_table_is_the_error_contract() {
        let readme = include_str!("../README.md");
        let section = readme
            .split("\n## Errors\n")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README has an Errors section");
        let mut table: std::collections::BTreeMap<&str, u16> = Default::default();
        for line in section.lines() {
            let Some(rest) = line.strip_prefix("| ") else {
                continue;
            };
            let mut cols = rest.split(" | ");
            let Some(Ok(status)) = cols.next().map(str::parse::<u16>) else {
                continue;
            };
            let tokens = cols.next().unwrap_or("");
            for t in tokens.split('`').skip(1).step_by(2) {
                if !t
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    continue; // a header name such as `Retry-After`
                }
                assert!(
                    table.insert(t, status).is_none(),
                    "README lists {t} twice in the error table"
                );
            }
        }
        for k in ErrorKind::ALL {
            assert_eq!(
                table.get(k.token()).copied(),
                Some(k.status().as_u16()),
                "README's error table must list {} with status {}",
                k.token(),
                k.status().as_u16()
            );
        }
        for (t, status) in &table {
            assert!(
                ErrorKind::ALL.iter().any(|k| k.token() == *t),
                "README lists {t} ({status}), which no ErrorKind has"
            );
        }
        assert_eq!(table.len(), ErrorKind::ALL.len());
        // Retry-After where the table says so.
        for k in ErrorKind::ALL {
            if k.retry_after().is_some() {
                assert_eq!(k.status(), StatusCode::SERVICE_UNAVAILABLE, "{k:?}");
            }
        }
    }

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
