//! admin: the operator listener — `/metrics` (Prometheus text), `/status` (JSON reuse
//! accounting per target), `/healthz`, `/readyz`, `/ca.pem` and a small `/` page.
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpStream;

use crate::forward::{full_body, ProxyBody};
use crate::gateway::Gateway;

/// Serves one admin connection.
pub async fn serve_admin(gw: Arc<Gateway>, stream: TcpStream) {
    let svc = service_fn(move |req: Request<Incoming>| {
        let gw = gw.clone();
        async move { Ok::<_, Infallible>(route(&gw, &req)) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
        tracing::debug!("admin connection ended: {e}");
    }
}

fn respond(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(full_body(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static(ctype));
    r
}

fn route(gw: &Gateway, req: &Request<Incoming>) -> Response<ProxyBody> {
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
            let body = serde_json::to_string_pretty(&status(gw)).expect("status serializes");
            respond(StatusCode::OK, "application/json", body + "\n")
        }
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
        "/" => respond(StatusCode::OK, "text/html; charset=utf-8", index_page(gw)),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /status, /metrics, /healthz, /readyz, /ca.pem\n",
        ),
    }
}

/// One row of `/status`.
#[derive(Debug, Serialize)]
pub struct TargetStatus {
    /// `host:port`.
    pub target: String,
    /// Requests that reached an upstream connection.
    pub requests: u64,
    /// Connections opened.
    pub new_connections: u64,
    /// R = 1 − new_connections / requests.
    pub reuse_rate: f64,
    /// Connections carrying a request now.
    pub active: usize,
    /// Idle connections now.
    pub idle: usize,
    /// `h2` / `http/1.1`.
    pub protocol: &'static str,
    /// Handshake seconds paid.
    pub handshake_seconds: f64,
    /// edgepool errors answered for this target.
    pub errors: u64,
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
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// Fleet totals.
    pub fleet: TargetStatus,
    /// Requests queued for a connection now.
    pub waiting: usize,
    /// Connections being dialed now.
    pub connecting: usize,
    /// Blind tunnels are not pooled and not in these counts.
    pub targets: Vec<TargetStatus>,
}

/// Builds the status document.
pub fn status(gw: &Gateway) -> Status {
    let pool = gw.forwarder().pool();
    let mut live: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for ks in pool.key_stats() {
        let e = live.entry(ks.key.target()).or_default();
        e.0 += ks.open - ks.idle;
        e.1 += ks.idle;
    }
    let counts = gw.telemetry().targets();
    let mut targets = Vec::new();
    for (t, c) in counts {
        let (active, idle) = live.get(&t).copied().unwrap_or_default();
        targets.push(TargetStatus {
            target: t,
            requests: c.requests,
            new_connections: c.new_connections,
            reuse_rate: round4(c.reuse_rate()),
            active,
            idle,
            protocol: c.protocol,
            handshake_seconds: round4(c.handshake_seconds),
            errors: c.errors,
            new_by_reason: c.new_by_reason,
            closed_by_reason: c.closed_by_reason,
        });
    }
    targets.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.target.cmp(&b.target)));
    let tot = gw.telemetry().totals();
    let stats = pool.stats();
    Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: gw.uptime().as_secs(),
        fleet: TargetStatus {
            target: "*".into(),
            requests: tot.requests,
            new_connections: tot.new_connections,
            reuse_rate: round4(tot.reuse_rate()),
            active: stats.total.saturating_sub(stats.idle + stats.connecting),
            idle: stats.idle,
            protocol: "",
            handshake_seconds: round4(tot.handshake_seconds),
            errors: tot.errors,
            new_by_reason: tot.new_by_reason,
            closed_by_reason: tot.closed_by_reason,
        },
        waiting: stats.waiting,
        connecting: stats.connecting,
        targets,
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

fn index_page(gw: &Gateway) -> String {
    let s = status(gw);
    let mut rows = String::new();
    for t in &s.targets {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&t.target),
            t.requests,
            t.new_connections,
            t.reuse_rate,
            t.active,
            t.idle,
            t.protocol
        ));
    }
    format!(
        "<!doctype html><meta charset=utf-8><title>edgepool</title>\
         <h1>edgepool {}</h1><p>fleet R = {:.4} over {} requests, {} new connections</p>\
         <table border=1><tr><th>target</th><th>requests</th><th>new</th><th>R</th><th>active</th><th>idle</th><th>protocol</th></tr>{}</table>\
         <p><a href=/status>/status</a> · <a href=/metrics>/metrics</a> · <a href=/ca.pem>/ca.pem</a></p>",
        s.version, s.fleet.reuse_rate, s.fleet.requests, s.fleet.new_connections, rows
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
