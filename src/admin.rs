//! admin: the operator listener — `/metrics` (Prometheus text), `/status` (JSON reuse
//! accounting per target), `/healthz`, `/readyz`, `/ca.pem` and a small `/` page.
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::body::{full_body, ProxyBody};
use crate::ca::CertAuthority;
use crate::config::Config;
use crate::forward::Forwarder;
use crate::portguard::PortGuard;
use crate::report::ReportStore;
use crate::telemetry::Telemetry;
use crate::telemetry::{TargetCounts, Verdict};

/// Admin connections open at once; more are closed at accept. Dashboards, scrapers and the
/// CLI need a handful.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Interval of the dashboard time series (`/status/history`) and of SLO re-evaluation.
pub const HISTORY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// What the operator listener reads: the configuration, the CA, the forwarder (pool, exits,
/// resolver), accounting, the report store and the port budget, plus uptime and whether
/// shutdown started. Built once by [`crate::gateway::Gateway`].
pub struct Admin {
    cfg: Arc<Config>,
    ca: Arc<CertAuthority>,
    forwarder: Arc<Forwarder>,
    telemetry: Arc<Telemetry>,
    report: Arc<ReportStore>,
    /// Fleet totals at the last report flush (the next bucket is the difference).
    report_last: tokio::sync::Mutex<TargetCounts>,
    ports: PortGuard,
    started: tokio::time::Instant,
    shutting_down: Arc<AtomicBool>,
    node: String,
}

/// The parts an [`Admin`] is built from.
pub struct AdminParts {
    /// The configuration.
    pub cfg: Arc<Config>,
    /// The interception CA (`/ca.pem`).
    pub ca: Arc<CertAuthority>,
    /// The forwarder (pool, exits, resolver).
    pub forwarder: Arc<Forwarder>,
    /// Accounting.
    pub telemetry: Arc<Telemetry>,
    /// The reuse-killers store.
    pub report: Arc<ReportStore>,
    /// The ephemeral-port budget.
    pub ports: PortGuard,
    /// Set once shutdown starts (`/readyz` answers 503 from then on).
    pub shutting_down: Arc<AtomicBool>,
    /// This gateway's node name (`host-proxyport`), in `/status`.
    pub node: String,
}

impl Admin {
    /// The operator side's context; uptime counts from now.
    pub fn new(p: AdminParts) -> Admin {
        Admin {
            cfg: p.cfg,
            ca: p.ca,
            forwarder: p.forwarder,
            telemetry: p.telemetry,
            report: p.report,
            report_last: Default::default(),
            ports: p.ports,
            started: tokio::time::Instant::now(),
            shutting_down: p.shutting_down,
            node: p.node,
        }
    }
    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// The interception CA.
    pub fn ca(&self) -> &CertAuthority {
        &self.ca
    }
    /// The forwarder (and through it, the pool).
    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }
    /// Metrics and reuse accounting.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }
    /// The reuse-killers store.
    pub fn report(&self) -> &Arc<ReportStore> {
        &self.report
    }
    /// The ephemeral-port budget.
    pub fn ports(&self) -> &PortGuard {
        &self.ports
    }
    /// Time since start.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }
    /// True once shutdown started.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Writes what happened since the last flush into the report store (off the runtime
    /// threads).
    pub async fn flush_report(&self, prune: bool) {
        let mut last = self.report_last.lock().await;
        // Advance the baseline only once the bucket is stored: a failed write keeps its counts
        // for the next flush.
        let mut next = last.clone();
        let counts = self.telemetry.minute_counts(&mut next);
        let store = self.report.clone();
        let now_minute = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() / 60)
            .unwrap_or(0);
        let res = tokio::task::spawn_blocking(move || {
            store.record(now_minute, &counts)?;
            if prune {
                store.prune(now_minute, crate::report::RETENTION_MINUTES)?;
            }
            Ok::<_, crate::report::ReportError>(())
        })
        .await;
        match res {
            Ok(Ok(())) => *last = next,
            Ok(Err(e)) => tracing::warn!("reuse report store: {e}"),
            Err(e) => tracing::warn!("reuse report task: {e}"),
        }
    }
}

/// Serves one admin connection: HTTP/1.1 only (no client of the admin listener needs HTTP/2),
/// every head — the next one on an idle keep-alive connection too — within
/// `limits.header_read_timeout`, heads at most `limits.max_header_bytes`.
pub async fn serve_admin(gw: Arc<Admin>, stream: TcpStream) {
    let limits = gw.config().limits.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let gw = gw.clone();
        async move {
            if let Some(denied) = check_bearer(&gw, &req) {
                return Ok::<_, Infallible>(denied);
            }
            let resp = if req.uri().path() == "/report" {
                report(
                    &gw,
                    &query_param(&req, "window").unwrap_or_else(|| "7d".into()),
                )
                .await
            } else {
                route(&gw, &req)
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
        tracing::debug!("admin connection ended: {e}");
    }
}

/// With `auth.admin_token` set, every admin request needs `Authorization: Bearer <token>`
/// (compared in constant time); otherwise 401 with a `WWW-Authenticate: Bearer` challenge.
fn check_bearer(gw: &Admin, req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
    use subtle::ConstantTimeEq;
    let want = gw.config().auth.admin_token.as_ref()?;
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .unwrap_or("");
    if given.len() == want.len() && bool::from(given.as_bytes().ct_eq(want.as_bytes())) {
        return None;
    }
    let mut r = respond(
        StatusCode::UNAUTHORIZED,
        "text/plain",
        "the admin endpoints need Authorization: Bearer <auth.admin_token>\n",
    );
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"edgepool-admin\""),
    );
    Some(r)
}

fn respond(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(full_body(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static(ctype));
    r
}

fn json(value: &impl Serialize) -> Response<ProxyBody> {
    let body = serde_json::to_string_pretty(value).expect("admin documents serialize");
    respond(StatusCode::OK, "application/json", body + "\n")
}

/// The live dashboard: one self-contained page (inline CSS/JS/SVG, no CDN).
const DASHBOARD: &str = include_str!("dashboard.html");

/// A query parameter, percent-decoded.
fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(req.uri().query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn route(gw: &Admin, req: &Request<Incoming>) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "admin endpoints take GET\n",
        );
    }
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            gw.telemetry().encode(gw.forwarder().pool().stats()),
        ),
        "/status" => {
            let limit = match query_param(req, "targets").as_deref() {
                None => STATUS_TARGETS,
                Some("all") => usize::MAX,
                Some(n) => match n.parse() {
                    Ok(n) => n,
                    Err(_) => {
                        return respond(
                            StatusCode::BAD_REQUEST,
                            "text/plain",
                            "targets= takes a number of rows or \"all\"\n",
                        )
                    }
                },
            };
            json(&status(gw, limit))
        }
        "/status/history" => json(&serde_json::json!({
            "interval_seconds": HISTORY_INTERVAL.as_secs(),
            "points": gw.telemetry().history(),
        })),
        "/trace" => trace_stream(gw, query_param(req, "target")),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if gw.is_shutting_down() {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "shutting down\n",
                )
            } else {
                respond(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        "/ca.pem" => respond(
            StatusCode::OK,
            "application/x-pem-file",
            gw.ca().cert_pem().to_string(),
        ),
        "/" => respond(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /, /status, /status/history, /report, /metrics, /trace, /healthz, /readyz, /ca.pem\n",
        ),
    }
}

/// `GET /report?window=7d`: the reuse-killers report from the embedded store, with the
/// current partial minute included.
async fn report(gw: &Arc<Admin>, window: &str) -> Response<ProxyBody> {
    let window = match crate::report::parse_window(window) {
        Ok(w) => w,
        Err(e) => return respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
    };
    gw.flush_report(false).await;
    let store = gw.report().clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match tokio::task::spawn_blocking(move || store.query(window, now)).await {
        Ok(Ok(r)) => json(&r),
        Ok(Err(e)) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

/// Streams the trace log as JSON lines until the client goes away. `target` filters on the
/// host (with or without port).
fn trace_stream(gw: &Admin, target: Option<String>) -> Response<ProxyBody> {
    use http_body_util::BodyExt;
    let mut rx = gw.telemetry().subscribe_trace();
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        loop {
            // Stop as soon as the client goes away, even if no record passes the filter.
            let next = tokio::select! {
                r = rx.recv() => r,
                _ = tx.closed() => break,
            };
            let line = match next {
                Ok(l) => l,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    Arc::from(format!("{{\"kind\":\"lagged\",\"dropped\":{n}}}"))
                }
                Err(_) => break,
            };
            if let Some(t) = &target {
                let host = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v["target"].as_str().map(str::to_string))
                    .unwrap_or_default();
                if host != *t && host.rsplit_once(':').map(|(h, _)| h) != Some(t.as_str()) {
                    continue;
                }
            }
            let mut b = line.as_bytes().to_vec();
            b.push(b'\n');
            if tx.send(Bytes::from(b)).await.is_err() {
                break;
            }
        }
    });
    let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|b| {
            (
                Ok::<_, crate::body::BoxError>(http_body::Frame::data(b)),
                rx,
            )
        })
    });
    let body = http_body_util::StreamBody::new(stream).boxed_unsync();
    let mut r = Response::new(body);
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// One row of `/status`.
#[derive(Debug, Serialize)]
pub struct TargetStatus {
    /// `host:port` (`*` for the fleet).
    pub target: String,
    /// Requests that reached an upstream connection.
    pub requests: u64,
    /// Connections opened.
    pub new_connections: u64,
    /// R = 1 − new_connections / requests.
    pub reuse_rate: f64,
    /// R over the requests that did not ask for forced rotation (`rotate-request`): what
    /// the pool itself missed.
    pub reuse_rate_excluding_forced: f64,
    /// Requests that asked for a new exit each time (`rotate-request`).
    pub forced_rotation_requests: u64,
    /// Against the SLO: optimal, monitor, breach; idle (no requests), warming_up (fewer than
    /// `slo.min_requests`).
    pub verdict: Verdict,
    /// The objective this row is judged against.
    pub reuse_target: f64,
    /// Connections carrying a request now.
    pub active: usize,
    /// Idle connections now.
    pub idle: usize,
    /// `h2` / `http/1.1`.
    pub protocol: &'static str,
    /// Handshake seconds paid (O = new connections × measured TCP + TLS time).
    pub handshake_seconds: f64,
    /// Handshake seconds saved (reused requests × mean handshake cost).
    pub handshake_saved_seconds: f64,
    /// Saved handshake time extrapolated to a day from the time edgepool has run, in hours.
    pub tls_overhead_saved_hours_per_day: f64,
    /// Connections closed per second since start (any reason but shutdown).
    pub evictions_per_second: f64,
    /// edgepool errors answered for this target.
    pub errors: u64,
    /// The exit carrying most of its traffic (`direct` when none has yet).
    pub top_exit: String,
    /// New connections by reason.
    pub new_by_reason: BTreeMap<&'static str, u64>,
    /// Closed connections by reason.
    pub closed_by_reason: BTreeMap<&'static str, u64>,
}

/// The `/status` document.
#[derive(Debug, Serialize)]
pub struct Status {
    /// edgepool version.
    pub version: &'static str,
    /// This gateway's node name (`host-proxyport`; `edgepool status --fleet` shows it).
    pub node: String,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// The objective.
    pub slo: serde_json::Value,
    /// Fleet totals.
    pub fleet: TargetStatus,
    /// Requests queued for a connection now.
    pub waiting: usize,
    /// Connections being dialed now.
    pub connecting: usize,
    /// The ephemeral-port budget (local ports held by sockets, TIME_WAIT included).
    pub ports: crate::portguard::PortBudget,
    /// Per target, busiest first: the [`STATUS_TARGETS`] busiest by default, `?targets=N` for
    /// another number, `?targets=all` for every row held. Blind tunnels are not pooled and not
    /// in these counts.
    pub targets: Vec<TargetStatus>,
    /// Targets with a row of their own (at most `slo.max_targets`; older ones are folded into
    /// the fleet totals).
    pub targets_total: usize,
    /// Rows held but not listed here (`targets_total` minus the rows listed); the fleet row
    /// counts them all.
    pub targets_omitted: usize,
    /// Exit nodes (the implicit `direct` first) with their health and reuse.
    pub exits: Vec<ExitStatus>,
    /// Exit pools: reuse per pool.
    pub pools: Vec<PoolStatus>,
    /// The pool used when a worker names none.
    pub default_pool: String,
    /// Live worker sessions.
    pub sessions: usize,
    /// Live sticky windows (target × pool).
    pub windows: usize,
}

/// One exit node in `/status`.
#[derive(Debug, Serialize)]
pub struct ExitStatus {
    /// `pool/N` (`direct`): the `X-Edgepool-Exit` value and metric label.
    pub exit: String,
    /// The node's `host:port` (`direct`); credentials are never shown.
    pub endpoint: String,
    /// Pool.
    pub pool: String,
    /// `direct`, `http`, `socks5`.
    pub kind: &'static str,
    /// A provider's rotating gateway (username per session).
    pub rotating_gateway: bool,
    /// Circuit: `closed` (healthy), `half_open` (probing), `open` (down).
    pub state: &'static str,
    /// Consecutive failures.
    pub consecutive_failures: u32,
    /// Times the circuit opened.
    pub circuit_opened_total: u64,
    /// Seconds until a probe is allowed (open only).
    pub retry_in_seconds: Option<f64>,
    /// The last failure (never credentials).
    pub last_error: Option<String>,
    /// Requests through the node.
    pub requests: u64,
    /// Connections opened through the node (same definition as the fleet's).
    pub new_connections: u64,
    /// R through the node.
    pub reuse_rate: f64,
    /// R through the node without forced-rotation traffic.
    pub reuse_rate_excluding_forced: f64,
    /// Forced-rotation requests.
    pub forced_rotation_requests: u64,
    /// Dial failures blamed on the node.
    pub failures: u64,
    /// Open connections through it now.
    pub open_connections: usize,
    /// Its connection budget (null: unlimited).
    pub budget: Option<usize>,
    /// Sessions and windows pinned to it.
    pub pinned: usize,
}

/// One exit pool in `/status`.
#[derive(Debug, Serialize)]
pub struct PoolStatus {
    /// Name.
    pub pool: String,
    /// Nodes.
    pub nodes: usize,
    /// Nodes whose circuit is closed.
    pub healthy: usize,
    /// Requests.
    pub requests: u64,
    /// New connections.
    pub new_connections: u64,
    /// R.
    pub reuse_rate: f64,
    /// R without forced-rotation traffic.
    pub reuse_rate_excluding_forced: f64,
}

fn rate(requests: u64, new: u64) -> f64 {
    if requests == 0 {
        1.0
    } else {
        round4((1.0 - new as f64 / requests as f64).max(0.0))
    }
}

fn exit_rows(gw: &Admin) -> (Vec<ExitStatus>, Vec<PoolStatus>) {
    use std::sync::atomic::Ordering::Relaxed;
    let exits = gw.forwarder().exits();
    let mut rows = Vec::new();
    type PoolAcc = (String, usize, usize, u64, u64, u64, u64);
    let mut acc: Vec<PoolAcc> = Vec::new();
    for n in exits.nodes() {
        let c = &n.counters;
        let (req, new) = (c.requests.load(Relaxed), c.new_connections.load(Relaxed));
        let (freq, fnew) = (c.forced_requests.load(Relaxed), c.forced_new.load(Relaxed));
        let h = n.health();
        rows.push(ExitStatus {
            exit: n.label.to_string(),
            endpoint: n.spec.endpoint(),
            pool: n.pool.to_string(),
            kind: n.spec.kind.as_str(),
            rotating_gateway: n.session_template.is_some(),
            state: h.state.as_str(),
            consecutive_failures: h.consecutive_failures,
            circuit_opened_total: h.opened_total,
            retry_in_seconds: h.retry_in.map(|d| round4(d.as_secs_f64())),
            last_error: h.last_error,
            requests: req,
            new_connections: new,
            reuse_rate: rate(req, new),
            reuse_rate_excluding_forced: rate(req - freq.min(req), new - fnew.min(new)),
            forced_rotation_requests: freq,
            failures: c.failures.load(Relaxed),
            open_connections: n.open.load(Relaxed),
            budget: n.budget,
            pinned: exits.pins_of(n),
        });
        let healthy = usize::from(h.state == crate::exits::CircuitState::Closed);
        // (pool, nodes, healthy, requests, new, forced requests, forced new), config order.
        match acc.iter_mut().find(|a| a.0 == *n.pool) {
            Some(a) => {
                a.1 += 1;
                a.2 += healthy;
                a.3 += req;
                a.4 += new;
                a.5 += freq;
                a.6 += fnew;
            }
            None => acc.push((n.pool.to_string(), 1, healthy, req, new, freq, fnew)),
        }
    }
    let pools = acc
        .into_iter()
        .map(|(pool, nodes, healthy, req, new, freq, fnew)| PoolStatus {
            pool,
            nodes,
            healthy,
            requests: req,
            new_connections: new,
            reuse_rate: rate(req, new),
            reuse_rate_excluding_forced: rate(req - freq.min(req), new - fnew.min(new)),
        })
        .collect();
    (rows, pools)
}

fn row(
    target: String,
    c: &TargetCounts,
    (active, idle): (usize, usize),
    (objective, min_requests): (f64, u64),
    uptime: f64,
) -> TargetStatus {
    let r = c.reuse_rate();
    let closed: u64 = c
        .closed_by_reason
        .iter()
        .filter(|(k, _)| **k != "shutdown")
        .map(|(_, v)| v)
        .sum();
    let uptime = uptime.max(1.0);
    TargetStatus {
        target,
        requests: c.requests,
        new_connections: c.new_connections,
        reuse_rate: round4(r),
        reuse_rate_excluding_forced: round4(c.reuse_rate_unforced()),
        forced_rotation_requests: c.forced_requests,
        verdict: Verdict::of(r, c.requests, objective, min_requests),
        reuse_target: objective,
        active,
        idle,
        protocol: c.protocol,
        handshake_seconds: round4(c.handshake_seconds),
        handshake_saved_seconds: round4(c.handshake_saved_seconds),
        tls_overhead_saved_hours_per_day: round4(
            c.handshake_saved_seconds / uptime * 86_400.0 / 3_600.0,
        ),
        evictions_per_second: round4(closed as f64 / uptime),
        errors: c.errors,
        top_exit: c.top_exit().unwrap_or(crate::exits::DIRECT).to_string(),
        new_by_reason: c.new_by_reason.clone(),
        closed_by_reason: c.closed_by_reason.clone(),
    }
}

/// Rows `/status` lists unless asked for another number (`?targets=`): the busiest targets.
/// Keeps the document under about 1 MiB however many targets are held (`slo.max_targets`).
pub const STATUS_TARGETS: usize = 500;

/// Builds the status document, listing the `limit` busiest targets.
pub fn status(gw: &Admin, limit: usize) -> Status {
    let pool = gw.forwarder().pool();
    let mut live: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for ks in pool.key_stats() {
        let e = live.entry(ks.key.target()).or_default();
        e.0 += ks.open - ks.idle;
        e.1 += ks.idle;
    }
    let uptime = gw.uptime().as_secs_f64();
    let slo = gw.telemetry().slo();
    // Rank on the counts first, build rows for the listed ones only.
    let mut counts: Vec<(String, crate::telemetry::TargetCounts)> =
        gw.telemetry().targets().into_iter().collect();
    let targets_total = counts.len();
    counts.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(&b.0)));
    counts.truncate(limit);
    let targets: Vec<TargetStatus> = counts
        .into_iter()
        .map(|(t, c)| {
            let l = live.get(&t).copied().unwrap_or_default();
            let objective = slo.target_for(&t);
            row(t, &c, l, (objective, slo.min_requests), uptime)
        })
        .collect();
    let targets_omitted = targets_total - targets.len();
    let stats = pool.stats();
    let active = stats.total.saturating_sub(stats.idle + stats.connecting);
    let exit_rows = exit_rows(gw);
    let pinned = gw.forwarder().exits().pinned();
    Status {
        version: env!("CARGO_PKG_VERSION"),
        node: gw.node.clone(),
        uptime_seconds: gw.uptime().as_secs(),
        slo: serde_json::json!({
            "reuse_target": slo.reuse_target,
            "min_requests": slo.min_requests,
            "targets": slo.targets,
        }),
        fleet: row(
            "*".into(),
            &gw.telemetry().totals(),
            (active, stats.idle),
            (slo.reuse_target, slo.min_requests),
            uptime,
        ),
        waiting: stats.waiting,
        connecting: stats.connecting,
        ports: gw.ports().budget(),
        targets,
        targets_total,
        targets_omitted,
        exits: exit_rows.0,
        pools: exit_rows.1,
        default_pool: gw.forwarder().exits().default_pool().to_string(),
        sessions: pinned.0,
        windows: pinned.1,
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}
