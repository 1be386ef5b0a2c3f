//! upgrade: WebSockets through edgepool. A worker's `Upgrade: websocket` request — HTTP/1.1
//! (absolute-form, or inside a CONNECT tunnel, intercepted TLS or plaintext) or an HTTP/2
//! extended CONNECT (RFC 8441, `:protocol = websocket`) — gets a dedicated upstream connection
//! that never enters the pool: TCP through the worker's exit, TLS with ALPN `http/1.1` only for
//! `wss`, then an HTTP/1.1 upgrade request with `Connection: Upgrade` and `Upgrade: websocket`
//! restored (they are hop-by-hop and stripped everywhere else). The target's `101` is relayed
//! (as `200` to an HTTP/2 worker) and both directions are spliced until either side closes,
//! nothing moves for `limits.upgrade_idle_timeout`, the connection reaches
//! `limits.upgrade_max_lifetime`, or edgepool shuts down. Any other answer is relayed as an
//! ordinary response; the dedicated connection then closes.
//!
//! Only `websocket` is forwarded: any other upgrade (`h2c`, `TLS/1.0`, ...) is refused with
//! 400 `unsupported_upgrade`. Upgrade requests are counted apart (`edgepool_upgrades_total`,
//! `edgepool_upgraded_open`), never in reuse R: they cannot reuse a connection by design.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::Instrument;

use crate::body::{full_body, ProxyBody};
use crate::config::Config;
use crate::dial::Scheme;
use crate::error::{EdgeError, ErrorKind};
use crate::forward::Forwarder;
use crate::splice::Drain;
use crate::telemetry::Telemetry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    reason: String,
}

/// How an upgrade request ended (`edgepool_upgrades_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The target answered `101`: spliced.
    Upgraded,
    /// The target answered something else: relayed as a response.
    Declined,
    /// edgepool refused it (not a WebSocket, policy, limits) before reaching the target.
    Refused,
    /// The target could not be reached or did not answer.
    Failed,
}

impl Outcome {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Upgraded => "upgraded",
            Outcome::Declined => "declined",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// Why an upgraded connection ended (`edgepool_upgraded_closed_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// One side closed (or the copy failed).
    Closed,
    /// Nothing either way for `limits.upgrade_idle_timeout`.
    Idle,
    /// Open for `limits.upgrade_max_lifetime`.
    Lifetime,
    /// edgepool shut down.
    Shutdown,
}

impl End {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle_timeout",
            End::Lifetime => "max_lifetime",
            End::Shutdown => "shutdown",
        }
    }
}

/// The upgrade metrics: requests by outcome, open upgraded connections, ends by reason.
#[derive(Default)]
pub struct UpgradeMetrics {
    outcomes: Family<OutcomeLabels, Counter>,
    ends: Family<EndLabels, Counter>,
    open: Gauge,
    open_now: AtomicU64,
}

impl UpgradeMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = UpgradeMetrics::default();
        registry.register(
            "edgepool_upgrades",
            "Upgrade (WebSocket) requests, by outcome: upgraded (101, spliced), declined (the target answered otherwise), refused (by edgepool), failed (target unreachable); never counted in reuse R",
            m.outcomes.clone(),
        );
        registry.register(
            "edgepool_upgraded_open",
            "Upgraded (WebSocket) connections open now; each has a dedicated upstream connection, never pooled",
            m.open.clone(),
        );
        registry.register(
            "edgepool_upgraded_closed",
            "Upgraded connections that ended, by reason (closed, idle_timeout, max_lifetime, shutdown)",
            m.ends.clone(),
        );
        m
    }

    /// Counts one upgrade request.
    pub fn record(&self, o: Outcome) {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                outcome: o.as_str().into(),
            })
            .inc();
    }

    /// Upgrade requests with outcome `o` so far.
    pub fn count(&self, o: Outcome) -> u64 {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                outcome: o.as_str().into(),
            })
            .get()
    }

    /// Upgraded connections open now.
    pub fn open(&self) -> u64 {
        self.open_now.load(Ordering::Relaxed)
    }

    fn opened(&self) {
        self.open_now.fetch_add(1, Ordering::Relaxed);
        self.open.inc();
    }

    fn ended(&self, why: End) {
        self.open_now.fetch_sub(1, Ordering::Relaxed);
        self.open.dec();
        self.ends
            .get_or_create(&EndLabels {
                reason: why.as_str().into(),
            })
            .inc();
    }
}

/// Whether `name` is a token of a comma-separated header.
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// An HTTP/1.1 upgrade request: `Upgrade` named by `Connection` (RFC 9110 §7.8). The same rule
/// as [`crate::h1guard`]'s, which lets the bytes after such a head through unparsed.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && has_token(headers, header::CONNECTION, "upgrade")
}

/// Whether `req` asks for an upgrade: HTTP/1.1 `Connection: upgrade` + `Upgrade` (not on a
/// CONNECT), or an HTTP/2 extended CONNECT (`:protocol`).
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    if req.version() == Version::HTTP_2 {
        req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_some()
    } else {
        // A CONNECT is a tunnel whatever its headers say.
        req.method() != Method::CONNECT && wants_upgrade(req.headers())
    }
}

/// The protocol asked for (`Upgrade` value, or `:protocol`).
fn protocol_of<B>(req: &Request<B>) -> String {
    if let Some(p) = req.extensions().get::<hyper::ext::Protocol>() {
        return p.as_str().to_string();
    }
    req.headers()
        .get_all(header::UPGRADE)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A fresh `Sec-WebSocket-Key` (16 bytes, base64) for an HTTP/2 worker's request, which has
/// none (RFC 8441 §5). A handshake nonce, not a secret.
fn websocket_key() -> HeaderValue {
    use base64::Engine;
    use std::hash::{BuildHasher, Hasher};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 16];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(N.fetch_add(1, Ordering::Relaxed));
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    let s = base64::engine::general_purpose::STANDARD.encode(bytes);
    HeaderValue::from_str(&s).expect("base64 is a valid header value")
}

/// Where an upgrade request goes.
pub struct Target {
    /// `Http` for `ws://`, `Https` for `wss://`.
    pub scheme: Scheme,
    /// Host (normalized).
    pub host: String,
    /// Port.
    pub port: u16,
}

/// What forwarding an upgrade needs from the gateway: the dialer (through the forwarder),
/// accounting, the upgrade metrics, the limits and the drain signal.
pub struct Upgrades {
    cfg: Arc<Config>,
    forwarder: Arc<Forwarder>,
    telemetry: Arc<Telemetry>,
    metrics: UpgradeMetrics,
    drain: Drain,
}

impl Upgrades {
    /// The context; `metrics` registered by the caller ([`UpgradeMetrics::register`]).
    pub fn new(
        cfg: Arc<Config>,
        forwarder: Arc<Forwarder>,
        telemetry: Arc<Telemetry>,
        metrics: UpgradeMetrics,
        drain: Drain,
    ) -> Upgrades {
        Upgrades {
            cfg,
            forwarder,
            telemetry,
            metrics,
            drain,
        }
    }
    /// The configuration (limits).
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// The forwarder (its dialer opens the dedicated upstream connection).
    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }
    /// Accounting and traces.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }
    /// Upgrade counters and the open-upgrades gauge.
    pub fn upgrades(&self) -> &UpgradeMetrics {
        &self.metrics
    }
    /// Resolves when shutdown starts.
    pub async fn draining(&self) {
        self.drain.wait().await
    }
}

/// Forwards one upgrade request (see the module doc). `hold` is kept for as long as the
/// upgraded connection lives: its place under `limits.max_tunnels`, the worker connection's
/// place, its HTTP/2 connection's idle clock.
pub async fn forward(
    gw: Arc<Upgrades>,
    mut req: Request<Incoming>,
    target: Target,
    worker: crate::worker::Worker,
    hold: Box<dyn Send + Sync>,
) -> Response<ProxyBody> {
    let metrics = gw.upgrades();
    let h2_worker = req.version() == Version::HTTP_2;
    let refuse = |e: EdgeError| {
        metrics.record(Outcome::Refused);
        gw.telemetry().record_error(None, e.token);
        stop_response(e, h2_worker)
    };
    if let Err(e) = check_handshake(&req, h2_worker) {
        return refuse(e);
    }
    let Target { scheme, host, port } = target;
    let started = tokio::time::Instant::now();
    let target_label = crate::exits::authority(&host, port);
    let fwd = gw.forwarder();
    // The same target policy as any request: SSRF guard, edgepool's own listeners.
    let addr = match fwd.resolve_checked(&host, port).await {
        Ok((a, _)) => a,
        Err(e) => return refuse(e),
    };
    let worker_up = hyper::upgrade::on(&mut req);
    let (parts, _body) = req.into_parts();
    let failed = |e: EdgeError| {
        metrics.record(Outcome::Failed);
        gw.telemetry().record_error(Some(&target_label), e.token);
        trace(
            &gw,
            &target_label,
            "",
            e.status.as_u16(),
            Some(e.token),
            started,
        );
        stop_response(e, h2_worker)
    };
    let (mut send, slot, exit) =
        match open_upstream(fwd, scheme, &host, port, addr, &worker, &failed).await {
            Ok(o) => o,
            Err(resp) => return resp,
        };
    let up_req = match upgrade_request(parts.headers, &parts.uri, scheme, &host, port, h2_worker) {
        Ok(r) => r,
        Err(e) => return refuse(e),
    };
    let rht = fwd.config().response_header_timeout;
    let mut resp = match send_upgrade(&mut send, up_req, rht, &host, port).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    trace(
        &gw,
        &target_label,
        &exit,
        resp.status().as_u16(),
        None,
        started,
    );
    let up_upgrade = upgraded.then(|| hyper::upgrade::on(&mut resp));
    let (mut rparts, body) = resp.into_parts();
    relayed_head(&mut rparts, &exit);
    let Some(up_upgrade) = up_upgrade else {
        metrics.record(Outcome::Declined);
        return declined(rparts, body, h2_worker, &host, port, &failed);
    };
    metrics.record(Outcome::Upgraded);
    metrics.opened();
    switched_head(&mut rparts, h2_worker);
    spawn_splice(gw.clone(), worker_up, up_upgrade, hold, slot);
    Response::from_parts(rparts, full_body(Bytes::new()))
}

/// The answer to an upgrade request that stops before a splice: `e`'s response, and to an
/// HTTP/1 worker `Connection: close` (the framer let the bytes after the head through
/// unparsed, so the connection ends).
fn stop_response(e: EdgeError, h2_worker: bool) -> Response<ProxyBody> {
    let mut resp = e.to_response();
    if !h2_worker {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Checks the worker's handshake before anything is dialed: a WebSocket upgrade, and from an
/// HTTP/1 worker a `GET` without a body.
fn check_handshake(req: &Request<Incoming>, h2_worker: bool) -> Result<(), EdgeError> {
    let protocol = protocol_of(req);
    if !protocol.eq_ignore_ascii_case("websocket") {
        return Err(EdgeError::new(
            ErrorKind::UnsupportedUpgrade,
            format!("edgepool forwards WebSocket upgrades only, not Upgrade: {protocol}"),
        ));
    }
    if !h2_worker && req.method() != Method::GET {
        return Err(EdgeError::new(
            ErrorKind::UnsupportedUpgrade,
            format!(
                "a WebSocket handshake is a GET request, not {}",
                req.method()
            ),
        ));
    }
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if !h2_worker && has_body {
        return Err(EdgeError::new(
            ErrorKind::UnsupportedUpgrade,
            "a WebSocket handshake has no request body",
        ));
    }
    Ok(())
}

/// Opens the dedicated upstream connection: TCP through the worker's exit, TLS for `wss`,
/// an HTTP/1.1 handshake whose connection task holds the exit's budget slot. Returns the
/// sender, the slot (kept until the upgraded connection ends) and the exit's label; on a
/// failure, `failed`'s answer (called while what was opened is still held).
async fn open_upstream(
    fwd: &crate::forward::Forwarder,
    scheme: Scheme,
    host: &str,
    port: u16,
    addr: std::net::SocketAddr,
    worker: &crate::worker::Worker,
    failed: &impl Fn(EdgeError) -> Response<ProxyBody>,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        Arc<crate::dial::BudgetSlot>,
        Arc<str>,
    ),
    Response<ProxyBody>,
> {
    let (opened, exit) = match fwd.open_dedicated(host, port, addr, worker).await {
        Ok(o) => o,
        Err(e) => return Err(failed(e)),
    };
    let crate::dial::Opened {
        stream,
        slot,
        early,
        ..
    } = opened;
    if !early.is_empty() {
        return Err(failed(EdgeError::new(
            ErrorKind::UpstreamBadResponse,
            format!(
                "{host}:{port} sent {} bytes before the upgrade request",
                early.len()
            ),
        )));
    }
    let io: Box<dyn Io> = match scheme {
        Scheme::Http => Box::new(stream),
        Scheme::Https => {
            match fwd
                .pool()
                .connector()
                .tls_h1(stream, host, fwd.verifies(host))
                .await
            {
                Ok(s) => Box::new(s),
                Err(e) => return Err(failed(crate::forward::dial_error(&e))),
            }
        }
    };
    let (send, conn) = match hyper::client::conn::http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
    {
        Ok(x) => x,
        Err(e) => {
            return Err(failed(EdgeError::request_failed(
                format!("{host}:{port}: {e}"),
                crate::error::Sent::None,
            )))
        }
    };
    let slot = Arc::new(slot);
    let conn_slot = slot.clone();
    tokio::spawn(
        async move {
            let _slot = conn_slot; // the exit's budget, until the connection is gone or upgraded
            let _ = conn.with_upgrades().await;
        }
        .in_current_span(),
    );
    Ok((send, slot, exit))
}

/// The HTTP/1.1 upgrade request to the target: the worker's headers minus hop-by-hop and
/// X-Edgepool-*, `Host` for the target, the upgrade restored (with a `Sec-WebSocket-Key` for an
/// HTTP/2 worker's request, which has none), and the worker's path.
fn upgrade_request(
    mut headers: HeaderMap,
    uri: &http::Uri,
    scheme: Scheme,
    host: &str,
    port: u16,
    h2_worker: bool,
) -> Result<Request<Empty<Bytes>>, EdgeError> {
    // The worker's headers minus hop-by-hop and X-Edgepool-*, then the upgrade restored.
    crate::headers::clean_request_headers(&mut headers);
    headers.remove(header::HOST);
    let authority_host = if port == scheme.default_port() {
        bracket(host)
    } else {
        crate::exits::authority(host, port)
    };
    if let Ok(v) = HeaderValue::from_str(&authority_host) {
        headers.insert(header::HOST, v);
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if h2_worker {
        // RFC 8441 §5: no key on HTTP/2; HTTP/1.1 needs one (the answer is checked by the
        // target's Sec-WebSocket-Accept, which edgepool does not pass on to HTTP/2).
        headers.insert("sec-websocket-key", websocket_key());
    }
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut up_req = match Request::builder()
        .method(Method::GET)
        .uri(path)
        .version(Version::HTTP_11)
        .body(Empty::<Bytes>::new())
    {
        Ok(r) => r,
        Err(e) => {
            return Err(EdgeError::new(
                ErrorKind::InvalidRequest,
                format!("invalid upgrade request: {e}"),
            ))
        }
    };
    *up_req.headers_mut() = headers;
    Ok(up_req)
}

/// Sends the upgrade request and waits for the target's answer head, at most
/// `upstream.response_header_timeout` (`rht`).
async fn send_upgrade(
    send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    up_req: Request<Empty<Bytes>>,
    rht: Duration,
    host: &str,
    port: u16,
) -> Result<Response<Incoming>, EdgeError> {
    match tokio::time::timeout(rht, send.send_request(up_req)).await {
        Err(_) => {
            Err(EdgeError::new(ErrorKind::UpstreamResponseTimeout, format!(
                "{host}:{port} sent no answer to the upgrade request within upstream.response_header_timeout ({rht:?})"
            )))
        }
        Ok(Err(e)) => {
            Err(EdgeError::request_failed(
                format!("{host}:{port}: {e}"),
                crate::error::Sent::Maybe,
            ))
        }
        Ok(Ok(r)) => Ok(r),
    }
}

/// The target's answer head as the worker sees it: response hygiene, `X-Edgepool-Reused: 0`
/// (a dedicated connection), the exit, HTTP/1.1.
fn relayed_head(rparts: &mut http::response::Parts, exit: &str) {
    crate::headers::clean_response_headers(&mut rparts.headers);
    rparts.headers.insert(
        crate::headers::X_EDGEPOOL_REUSED,
        HeaderValue::from_static("0"),
    );
    if let Ok(v) = HeaderValue::from_str(exit) {
        rparts.headers.insert(crate::headers::X_EDGEPOOL_EXIT, v);
    }
    rparts.version = Version::HTTP_11;
}

/// Relays an answer other than `101` as an ordinary response (an HTTP/1 worker's connection
/// then ends); a 2xx to an HTTP/2 worker's extended CONNECT is `failed` instead.
fn declined(
    mut rparts: http::response::Parts,
    body: Incoming,
    h2_worker: bool,
    host: &str,
    port: u16,
    failed: &impl Fn(EdgeError) -> Response<ProxyBody>,
) -> Response<ProxyBody> {
    if h2_worker && rparts.status.is_success() {
        // A 2xx to an extended CONNECT would tell the worker the tunnel is open.
        return failed(EdgeError::new(
            ErrorKind::UpstreamBadResponse,
            format!(
                "{host}:{port} answered the WebSocket handshake with {} instead of 101",
                rparts.status
            ),
        ));
    }
    if !h2_worker {
        rparts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let body = body.map_err(crate::body::BoxError::from).boxed_unsync();
    Response::from_parts(rparts, body)
}

/// The head of a `101` as the worker sees it: `200` without `Sec-WebSocket-Accept` to an
/// HTTP/2 worker (RFC 8441), the upgrade restored for an HTTP/1 one.
fn switched_head(rparts: &mut http::response::Parts, h2_worker: bool) {
    if h2_worker {
        rparts.status = StatusCode::OK;
        rparts.headers.remove("sec-websocket-accept");
    } else {
        rparts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        rparts
            .headers
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
}

/// Splices the upgraded connection in a task of its own; `hold` and the exit's `slot` are
/// released when it ends, before the gauge says so.
fn spawn_splice(
    gw: Arc<Upgrades>,
    worker_up: hyper::upgrade::OnUpgrade,
    up_upgrade: hyper::upgrade::OnUpgrade,
    hold: Box<dyn Send + Sync>,
    slot: Arc<crate::dial::BudgetSlot>,
) {
    let limits = gw.config().limits.clone();
    tokio::spawn(
        async move {
            let held = (hold, slot);
            let why = splice(&gw, worker_up, up_upgrade, &limits).await;
            // Places back before the gauge says the connection is gone.
            drop(held);
            tracing::debug!(reason = why.as_str(), "upgraded connection ended");
            gw.upgrades().ended(why);
        }
        .in_current_span(),
    );
}

/// Copies both ways between the worker's and the target's upgraded streams until one side
/// closes or a clock ends it.
async fn splice(
    gw: &Upgrades,
    worker: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    limits: &crate::config::LimitsConfig,
) -> End {
    let started = tokio::time::Instant::now();
    let lifetime = tokio::time::sleep_until(started + limits.upgrade_max_lifetime);
    tokio::pin!(lifetime);
    let both = async { tokio::join!(worker, upstream) };
    let (w, u) = tokio::select! {
        r = both => r,
        _ = &mut lifetime => return End::Lifetime,
        _ = gw.draining() => return End::Shutdown,
    };
    let (Ok(w), Ok(u)) = (w, u) else {
        return End::Closed;
    };
    let mut w = crate::splice::ActivityIo::new(TokioIo::new(w));
    let last = w.last();
    let mut u = TokioIo::new(u);
    let r = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut w, &mut u) => End::Closed,
        _ = crate::splice::idle_for(&last, limits.upgrade_idle_timeout) => End::Idle,
        _ = &mut lifetime => End::Lifetime,
        _ = gw.draining() => End::Shutdown,
    };
    if r != End::Closed {
        use tokio::io::AsyncWriteExt;
        // Best effort: tell both sides (TCP FIN / HTTP/2 END_STREAM) rather than just vanish.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = w.shutdown().await;
            let _ = u.shutdown().await;
        })
        .await;
    }
    r
}

/// Traces one upgrade request (`kind: "upgrade"`, always: each has a connection of its own).
fn trace(
    gw: &Upgrades,
    target: &str,
    exit: &str,
    status: u16,
    error: Option<&'static str>,
    started: tokio::time::Instant,
) {
    if !gw.telemetry().should_trace(false, error.is_some()) {
        return;
    }
    gw.telemetry().trace(crate::telemetry::TraceRecord {
        kind: "upgrade",
        target: target.to_string(),
        exit: exit.to_string(),
        method: "GET".into(),
        status: Some(status),
        reused: Some(false),
        error,
        total_ms: Some(crate::telemetry::ms(started.elapsed())),
        pool: Some("dedicated connection (upgrade, never pooled)".into()),
        ..Default::default()
    });
}

/// A byte stream to the target (TCP, or TLS over it).
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests_need_upgrade_named_by_connection() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(!wants_upgrade(&h));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(wants_upgrade(&h));
        h.remove("upgrade");
        assert!(!wants_upgrade(&h));
    }

    #[test]
    fn an_http1_connect_is_a_tunnel_whatever_its_headers_and_an_h2_one_needs_protocol() {
        let req = |method: Method, version: Version| {
            let mut r = Request::builder()
                .method(method)
                .version(version)
                .uri("http://a.example/")
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(())
                .unwrap();
            if version == Version::HTTP_2 {
                r.headers_mut().clear();
            }
            r
        };
        assert!(is_upgrade_request(&req(Method::GET, Version::HTTP_11)));
        assert!(!is_upgrade_request(&req(Method::CONNECT, Version::HTTP_11)));
        let mut h2 = req(Method::CONNECT, Version::HTTP_2);
        assert!(!is_upgrade_request(&h2));
        h2.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert!(is_upgrade_request(&h2));
    }

    #[test]
    fn websocket_keys_are_16_bytes_and_differ() {
        use base64::Engine;
        let (a, b) = (websocket_key(), websocket_key());
        assert_ne!(a, b);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.as_bytes())
            .unwrap();
        assert_eq!(raw.len(), 16);
    }
}
