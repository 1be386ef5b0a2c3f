//! telemetry: folds every upstream request and pool event into reuse accounting — per-target
//! counts for `/status` and Prometheus metrics for `/metrics`.
//!
//! R = 1 − new_connections / requests, where a *new connection* is a dial that succeeded
//! (what a target sees as an accepted connection) and a *request* is a request that reached
//! an upstream connection. Every new connection carries exactly one [`NewReason`].
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::dial::UpstreamKey;
use crate::pool::{CloseReason, NewReason, PoolEvents, PoolStats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    reused: String,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// One finished upstream request, as the forwarder saw it.
#[derive(Clone, Debug)]
pub struct RequestRecord<'a> {
    /// `host:port`.
    pub target: &'a str,
    /// Rode a connection that had carried a request before.
    pub reused: bool,
    /// `h2` / `http/1.1`.
    pub protocol: &'static str,
    /// Handshake time paid for this request's new connection (TCP + TLS), if new.
    pub handshake: Option<Duration>,
    /// It was retried on a fresh connection after failing on a reused one.
    pub retried: bool,
}

/// Per-target counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TargetCounts {
    /// Requests that reached an upstream connection.
    pub requests: u64,
    /// Of those, on a reused connection.
    pub reused: u64,
    /// Connections opened (successful dials).
    pub new_connections: u64,
    /// Dials that failed.
    pub dial_failures: u64,
    /// Connections opened, by reason.
    pub new_by_reason: BTreeMap<&'static str, u64>,
    /// Connections closed, by reason.
    pub closed_by_reason: BTreeMap<&'static str, u64>,
    /// Handshake seconds paid (TCP + TLS of new connections).
    pub handshake_seconds: f64,
    /// Requests edgepool answered with its own error.
    pub errors: u64,
    /// Last protocol seen.
    pub protocol: &'static str,
}

impl TargetCounts {
    /// R = 1 − new_connections / requests (1.0 with no requests).
    pub fn reuse_rate(&self) -> f64 {
        if self.requests == 0 {
            1.0
        } else {
            (1.0 - self.new_connections as f64 / self.requests as f64).max(0.0)
        }
    }
}

/// Metrics and counters. One per gateway; passed down, never global.
pub struct Telemetry {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    opened: Family<ReasonLabels, Counter>,
    closed: Family<ReasonLabels, Counter>,
    dial_failures: Counter,
    handshake_seconds: Counter<f64, AtomicU64>,
    errors: Family<ErrorLabels, Counter>,
    retries: Counter,
    tunnels: Counter,
    connections: Family<StateLabels, Gauge>,
    waiting: Gauge,
    targets: Mutex<HashMap<String, TargetCounts>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "edgepool_requests",
            "Upstream requests, by whether they reused a warm connection",
            requests.clone(),
        );
        let opened = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "edgepool_upstream_connections_opened",
            "New upstream connections, by why they were needed",
            opened.clone(),
        );
        let closed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "edgepool_upstream_connections_closed",
            "Upstream connections that left the pool, by reason",
            closed.clone(),
        );
        let dial_failures = Counter::default();
        registry.register(
            "edgepool_upstream_dial_failures",
            "Upstream connection attempts that failed",
            dial_failures.clone(),
        );
        let handshake_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "edgepool_handshake_seconds",
            "TCP + TLS handshake time paid for new upstream connections",
            handshake_seconds.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "edgepool_errors",
            "Requests answered with an edgepool error, by X-Edgepool-Error token",
            errors.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "edgepool_retries",
            "Requests retried on a fresh connection after failing on a reused one",
            retries.clone(),
        );
        let tunnels = Counter::default();
        registry.register(
            "edgepool_tunnels",
            "Blind CONNECT tunnels (passthrough hosts), not pooled",
            tunnels.clone(),
        );
        let connections = Family::<StateLabels, Gauge>::default();
        registry.register(
            "edgepool_upstream_connections",
            "Upstream connections now, by state (active, idle, connecting)",
            connections.clone(),
        );
        let waiting = Gauge::default();
        registry.register(
            "edgepool_pool_waiting_requests",
            "Requests queued for a connection now",
            waiting.clone(),
        );
        for r in NewReason::ALL {
            let _ = opened.get_or_create(&ReasonLabels {
                reason: r.as_str().into(),
            });
        }
        Telemetry {
            registry,
            requests,
            opened,
            closed,
            dial_failures,
            handshake_seconds,
            errors,
            retries,
            tunnels,
            connections,
            waiting,
            targets: Mutex::new(HashMap::new()),
        }
    }

    /// Records one upstream request.
    pub fn record_request(&self, r: &RequestRecord<'_>) {
        self.requests
            .get_or_create(&RequestLabels {
                reused: if r.reused { "1" } else { "0" }.into(),
                protocol: r.protocol.into(),
            })
            .inc();
        if let Some(h) = r.handshake {
            self.handshake_seconds.inc_by(h.as_secs_f64());
        }
        if r.retried {
            self.retries.inc();
        }
        let mut t = self.targets.lock();
        let c = t.entry(r.target.to_string()).or_default();
        c.requests += 1;
        if r.reused {
            c.reused += 1;
        }
        c.protocol = r.protocol;
        if let Some(h) = r.handshake {
            c.handshake_seconds += h.as_secs_f64();
        }
    }

    /// Records an edgepool error answered to a worker.
    pub fn record_error(&self, target: Option<&str>, token: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels {
                error: token.into(),
            })
            .inc();
        if let Some(t) = target {
            self.targets.lock().entry(t.to_string()).or_default().errors += 1;
        }
    }

    /// Records a blind tunnel.
    pub fn record_tunnel(&self) {
        self.tunnels.inc();
    }

    /// Per-target counts, sorted by target.
    pub fn targets(&self) -> BTreeMap<String, TargetCounts> {
        self.targets
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Fleet totals.
    pub fn totals(&self) -> TargetCounts {
        let t = self.targets.lock();
        let mut sum = TargetCounts::default();
        for c in t.values() {
            sum.requests += c.requests;
            sum.reused += c.reused;
            sum.new_connections += c.new_connections;
            sum.dial_failures += c.dial_failures;
            sum.errors += c.errors;
            sum.handshake_seconds += c.handshake_seconds;
            for (k, v) in &c.new_by_reason {
                *sum.new_by_reason.entry(k).or_default() += v;
            }
            for (k, v) in &c.closed_by_reason {
                *sum.closed_by_reason.entry(k).or_default() += v;
            }
        }
        sum
    }

    /// Prometheus text exposition, with the pool gauges refreshed from `stats`.
    pub fn encode(&self, stats: PoolStats) -> String {
        let active = stats.total.saturating_sub(stats.idle + stats.connecting);
        for (state, v) in [
            ("active", active),
            ("idle", stats.idle),
            ("connecting", stats.connecting),
        ] {
            self.connections
                .get_or_create(&StateLabels {
                    state: state.into(),
                })
                .set(v as i64);
        }
        self.waiting.set(stats.waiting as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl PoolEvents<UpstreamKey> for Telemetry {
    fn connection_opened(&self, key: &UpstreamKey, reason: NewReason) {
        self.opened
            .get_or_create(&ReasonLabels {
                reason: reason.as_str().into(),
            })
            .inc();
        let mut t = self.targets.lock();
        let c = t.entry(key.target()).or_default();
        c.new_connections += 1;
        *c.new_by_reason.entry(reason.as_str()).or_default() += 1;
    }
    fn dial_failed(&self, key: &UpstreamKey) {
        self.dial_failures.inc();
        self.targets
            .lock()
            .entry(key.target())
            .or_default()
            .dial_failures += 1;
    }
    fn connection_closed(&self, key: &UpstreamKey, reason: CloseReason, _requests: u64) {
        self.closed
            .get_or_create(&ReasonLabels {
                reason: reason.as_str().into(),
            })
            .inc();
        let mut t = self.targets.lock();
        *t.entry(key.target())
            .or_default()
            .closed_by_reason
            .entry(reason.as_str())
            .or_default() += 1;
    }
}
