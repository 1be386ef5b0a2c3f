//! telemetry: folds every upstream request and pool event into reuse accounting — per-target
//! counts and verdicts for `/status`, a time series for the dashboard, Prometheus metrics for
//! `/metrics`, and the sampled per-request trace log.
//!
//! R = 1 − new_connections / requests, where a *new connection* is a dial that succeeded
//! (what a target sees as an accepted connection) and a *request* is a request that reached
//! an upstream connection. Every new connection carries exactly one [`NewReason`].
//!
//! One definition, every surface: a new connection is counted once, when its dial succeeds
//! ([`PoolEvents::connection_opened`]) — for the target row, the fleet, its exit, its pool and
//! `edgepool_upstream_connections_opened` alike. The one exception is a connection to an HTTP
//! proxy exit that carries plain-http requests for any target: it has no target until a
//! request rides it, so all of those counters take it with its first request instead. The
//! fleet row is the sum of the target rows plus what has no row: errors answered before a
//! request was routed (CONNECT-time refusals) and closes of shared proxy connections.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;

use crate::histogram::ShardedHistogram;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::dial::UpstreamKey;
use crate::pool::{CloseReason, NewReason, PoolEvents, PoolStats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    reused: &'static str,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    target: String,
}

/// How many targets get their own label in per-target metrics; the rest are `other`.
pub const TOP_TARGETS: usize = 20;
/// Points kept in the dashboard time series.
pub const HISTORY_POINTS: usize = 720;

fn phase_histogram() -> ShardedHistogram {
    // 100 µs .. ~26 s.
    ShardedHistogram::new(exponential_buckets(0.0001, 2.0, 19))
}

fn per_conn_histogram() -> ShardedHistogram {
    ShardedHistogram::new([
        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
    ])
}

/// `optimal` at or above the SLO, `monitor` within 5 points below, `breach` lower; `idle`
/// with no requests yet, `warming_up` with fewer than `slo.min_requests`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// R ≥ target.
    Optimal,
    /// target − 0.05 ≤ R < target.
    Monitor,
    /// R < target − 0.05.
    Breach,
    /// No requests.
    Idle,
    /// Fewer requests than `slo.min_requests`: too few to judge.
    WarmingUp,
}

impl Verdict {
    /// The verdict for `r` over `requests` against `target`, judged from `min_requests` on.
    pub fn of(r: f64, requests: u64, target: f64, min_requests: u64) -> Verdict {
        if requests == 0 {
            Verdict::Idle
        } else if requests < min_requests {
            Verdict::WarmingUp
        } else if r >= target {
            Verdict::Optimal
        } else if r >= target - 0.05 {
            Verdict::Monitor
        } else {
            Verdict::Breach
        }
    }
}

/// One point of the dashboard time series: what happened during one interval.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HistoryPoint {
    /// Unix seconds at the end of the interval.
    pub t: u64,
    /// Requests in the interval.
    pub requests: u64,
    /// New connections in the interval.
    pub new_connections: u64,
    /// R over the interval (`null` with no requests).
    pub reuse_rate: Option<f64>,
    /// New connections by reason in the interval.
    pub new_by_reason: BTreeMap<&'static str, u64>,
}

/// One upstream request's trace record (a JSON line).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TraceRecord {
    /// RFC 3339 time.
    pub ts: String,
    /// `request` or a pool event (`connection closed`).
    pub kind: &'static str,
    /// `host:port`.
    pub target: String,
    /// Exit label.
    pub exit: String,
    /// Method.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// Response status (0 for an edgepool error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Rode a warm connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reused: Option<bool>,
    /// Why its connection was opened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_reason: Option<&'static str>,
    /// Phase timings in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_ms: Option<f64>,
    /// Where the target's addresses came from: `hit`, `stale`, `miss` (waited for a lookup),
    /// `joined` (waited for another request's lookup), `hosts`, `literal`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<&'static str>,
    /// Waiting for a connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<f64>,
    /// TCP connect of a new connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_connect_ms: Option<f64>,
    /// TLS handshake of a new connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_handshake_ms: Option<f64>,
    /// Time to the response head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttfb_ms: Option<f64>,
    /// Until the response body ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<f64>,
    /// Response body bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Retried once.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub retried: bool,
    /// edgepool error token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    /// Pool event: `connection added`, `connection closed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// Milliseconds with microsecond precision, for trace records.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
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
    /// It was retried once; why (`reused_connection_failed`, `refused_stream`, `goaway`).
    pub retry_reason: Option<&'static str>,
    /// Why its connection was opened, when it is the connection's first request.
    pub new_reason: Option<NewReason>,
    /// DNS resolution.
    pub dns: Duration,
    /// Waiting for a connection.
    pub queue: Duration,
    /// Request body bytes sent.
    pub bytes_up: u64,
    /// The exit node.
    pub exit: &'a crate::exits::ExitNode,
    /// `rotate-request` traffic.
    pub forced: bool,
    /// Rode an HTTP proxy connection shared by all plain-http targets (its new connections
    /// are counted per target here, not by the pool event).
    pub via_proxy: bool,
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
    /// New connections whose handshake was measured (the mean cost's denominator).
    pub handshakes: u64,
    /// Handshake seconds saved: each reused request × the target's mean handshake cost.
    pub handshake_saved_seconds: f64,
    /// Handshake seconds paid, by why the connection was opened.
    pub handshake_by_reason: BTreeMap<&'static str, f64>,
    /// Requests edgepool answered with its own error.
    pub errors: u64,
    /// Last protocol seen.
    pub protocol: &'static str,
    /// Requests with forced rotation (`rotate-request`).
    pub forced_requests: u64,
    /// Of those, on new connections.
    pub forced_new: u64,
    /// Requests per exit node (for the top exit).
    #[serde(skip)]
    pub by_exit: Vec<(Arc<str>, u64)>,
}

impl TargetCounts {
    /// Adds `c`'s counts (not its protocol) to these: fleet totals, folded rows.
    pub fn add(&mut self, c: &TargetCounts) {
        self.requests += c.requests;
        self.reused += c.reused;
        self.new_connections += c.new_connections;
        self.dial_failures += c.dial_failures;
        self.errors += c.errors;
        self.handshake_seconds += c.handshake_seconds;
        self.handshakes += c.handshakes;
        self.handshake_saved_seconds += c.handshake_saved_seconds;
        self.forced_requests += c.forced_requests;
        self.forced_new += c.forced_new;
        for (l, n) in &c.by_exit {
            match self.by_exit.iter_mut().find(|(x, _)| x == l) {
                Some((_, m)) => *m += n,
                None => self.by_exit.push((l.clone(), *n)),
            }
        }
        for (k, v) in &c.handshake_by_reason {
            *self.handshake_by_reason.entry(k).or_default() += v;
        }
        for (k, v) in &c.new_by_reason {
            *self.new_by_reason.entry(k).or_default() += v;
        }
        for (k, v) in &c.closed_by_reason {
            *self.closed_by_reason.entry(k).or_default() += v;
        }
    }

    /// R = 1 − new_connections / requests (1.0 with no requests).
    pub fn reuse_rate(&self) -> f64 {
        if self.requests == 0 {
            1.0
        } else {
            (1.0 - self.new_connections as f64 / self.requests as f64).max(0.0)
        }
    }

    /// R over the traffic that did not ask for forced rotation (`rotate-request`): the pool's
    /// own misses.
    pub fn reuse_rate_unforced(&self) -> f64 {
        let req = self.requests.saturating_sub(self.forced_requests);
        if req == 0 {
            1.0
        } else {
            let new = self.new_connections.saturating_sub(self.forced_new);
            (1.0 - new as f64 / req as f64).max(0.0)
        }
    }

    /// The exit node that carried most requests.
    pub fn top_exit(&self) -> Option<&str> {
        self.by_exit
            .iter()
            .max_by_key(|(_, n)| *n)
            .map(|(l, _)| &**l)
    }
}

/// The trace log: sampling and fan-out to `edgepool trace` clients (and the trace file).
struct TraceLog {
    tx: tokio::sync::broadcast::Sender<Arc<str>>,
    /// Trace every `every`-th reused request (0: none). Deterministic, no RNG.
    every: u64,
    seen: AtomicU64,
}

/// Reuse accounting: requests, connections opened (every reason's series from start, at 0)
/// and closed, failed dials, handshake time paid and saved.
struct ReuseMetrics {
    requests: Family<RequestLabels, Counter>,
    /// `requests`' series for (reused, HTTP/1.1 or h2), looked up once: a family lookup takes
    /// the family's lock, shared by every thread, and this is counted on every request.
    request_handles: [std::sync::OnceLock<Counter>; 4],
    opened: Family<ReasonLabels, Counter>,
    closed: Family<ReasonLabels, Counter>,
    dial_failures: Counter,
    handshake_seconds: Counter<f64, AtomicU64>,
    handshake_saved: Counter<f64, AtomicU64>,
}

impl ReuseMetrics {
    fn count_request(&self, reused: bool, protocol: &'static str) {
        let labels = || RequestLabels {
            reused: if reused { "1" } else { "0" },
            protocol,
        };
        let slot = match protocol {
            "http/1.1" => 0,
            "h2" => 2,
            _ => {
                self.requests.get_or_create(&labels()).inc();
                return;
            }
        } + usize::from(reused);
        self.request_handles[slot]
            .get_or_init(|| self.requests.get_or_create(&labels()).clone())
            .inc();
    }

    fn register(registry: &mut Registry) -> Self {
        let m = ReuseMetrics {
            requests: Family::default(),
            request_handles: Default::default(),
            opened: Family::default(),
            closed: Family::default(),
            dial_failures: Counter::default(),
            handshake_seconds: Counter::default(),
            handshake_saved: Counter::default(),
        };
        registry.register(
            "edgepool_requests",
            "Upstream requests, by whether they reused a warm connection",
            m.requests.clone(),
        );
        registry.register(
            "edgepool_upstream_connections_opened",
            "New upstream connections, by why they were needed",
            m.opened.clone(),
        );
        registry.register(
            "edgepool_upstream_connections_closed",
            "Upstream connections that left the pool, by reason",
            m.closed.clone(),
        );
        registry.register(
            "edgepool_upstream_dial_failures",
            "Upstream connection attempts that failed",
            m.dial_failures.clone(),
        );
        registry.register(
            "edgepool_handshake_seconds",
            "TCP + TLS handshake time paid for new upstream connections",
            m.handshake_seconds.clone(),
        );
        registry.register(
            "edgepool_handshake_saved_seconds",
            "Handshake time saved: reused requests x the mean handshake cost of their target",
            m.handshake_saved.clone(),
        );
        for r in NewReason::ALL {
            let _ = m.opened.get_or_create(&ReasonLabels { reason: r.as_str() });
        }
        m
    }

    fn opened(&self, reason: NewReason) {
        self.opened
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }
}

/// What became of requests besides their response: edgepool's own errors (by token), retries
/// (by reason), blind tunnels.
struct OutcomeMetrics {
    errors: Family<ErrorLabels, Counter>,
    retries: Family<ReasonLabels, Counter>,
    tunnels: Counter,
}

impl OutcomeMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = OutcomeMetrics {
            errors: Family::default(),
            retries: Family::default(),
            tunnels: Counter::default(),
        };
        registry.register(
            "edgepool_errors",
            "Requests answered with an edgepool error, by X-Edgepool-Error token",
            m.errors.clone(),
        );
        registry.register(
            "edgepool_retries",
            "Requests sent a second time, by why it was safe",
            m.retries.clone(),
        );
        registry.register(
            "edgepool_tunnels",
            "Blind CONNECT tunnels (passthrough hosts), not pooled",
            m.tunnels.clone(),
        );
        m
    }
}

/// The pool now (refreshed at each scrape): connections by state, queued requests, keys.
struct PoolGauges {
    connections: Family<StateLabels, Gauge>,
    waiting: Gauge,
    keys: Family<StateLabels, Gauge>,
    /// `PoolStats::forgotten` as a counter: advanced by the difference at each scrape.
    forgotten: Counter,
    forgotten_seen: AtomicU64,
}

impl PoolGauges {
    fn register(registry: &mut Registry) -> Self {
        let m = PoolGauges {
            connections: Family::default(),
            waiting: Gauge::default(),
            keys: Family::default(),
            forgotten: Counter::default(),
            forgotten_seen: AtomicU64::new(0),
        };
        registry.register(
            "edgepool_upstream_connections",
            "Upstream connections now, by state (active, idle, connecting)",
            m.connections.clone(),
        );
        registry.register(
            "edgepool_pool_waiting_requests",
            "Requests queued for a connection now",
            m.waiting.clone(),
        );
        registry.register(
            "edgepool_pool_keys",
            "Pool keys now: live (a connection, dial or waiter) and remembered (none, what they learned kept, bounded)",
            m.keys.clone(),
        );
        registry.register(
            "edgepool_pool_keys_forgotten",
            "Remembered pool keys forgotten to stay within the bound, least recently used first",
            m.forgotten.clone(),
        );
        m
    }

    fn set(&self, stats: &PoolStats) {
        let active = stats.total.saturating_sub(stats.idle + stats.connecting);
        for (state, v) in [
            ("active", active),
            ("idle", stats.idle),
            ("connecting", stats.connecting),
        ] {
            self.connections
                .get_or_create(&StateLabels { state })
                .set(v as i64);
        }
        self.waiting.set(stats.waiting as i64);
        for (state, v) in [("live", stats.keys), ("remembered", stats.remembered)] {
            self.keys
                .get_or_create(&StateLabels { state })
                .set(v as i64);
        }
        let seen = self
            .forgotten_seen
            .fetch_max(stats.forgotten, Ordering::Relaxed);
        if stats.forgotten > seen {
            self.forgotten.inc_by(stats.forgotten - seen);
        }
    }
}

/// A phase of a request, one `edgepool_phase_seconds` series each.
#[derive(Clone, Copy, Debug)]
enum Phase {
    Dns,
    Queue,
    TcpConnect,
    ExitHandshake,
    TlsHandshake,
    Ttfb,
    Total,
}

impl Phase {
    const COUNT: usize = 7;

    fn as_str(self) -> &'static str {
        match self {
            Phase::Dns => "dns",
            Phase::Queue => "queue",
            Phase::TcpConnect => "tcp_connect",
            Phase::ExitHandshake => "exit_handshake",
            Phase::TlsHandshake => "tls_handshake",
            Phase::Ttfb => "ttfb",
            Phase::Total => "total",
        }
    }
}

/// Which way body bytes went, one `edgepool_bytes` series each.
#[derive(Clone, Copy, Debug)]
enum Direction {
    Up,
    Down,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

/// Time and volume: per-phase latency, requests per connection, body bytes. A phase's or a
/// direction's handle is looked up once, at its first observation (a series still appears
/// only once it has a value).
struct PhaseMetrics {
    phases: Family<PhaseLabels, ShardedHistogram, fn() -> ShardedHistogram>,
    phase_handles: [std::sync::OnceLock<ShardedHistogram>; Phase::COUNT],
    per_connection: ShardedHistogram,
    bytes: Family<DirectionLabels, Counter>,
    byte_handles: [std::sync::OnceLock<Counter>; 2],
}

impl PhaseMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = PhaseMetrics {
            phases: Family::new_with_constructor(phase_histogram as fn() -> ShardedHistogram),
            phase_handles: Default::default(),
            per_connection: per_conn_histogram(),
            bytes: Family::default(),
            byte_handles: Default::default(),
        };
        registry.register(
            "edgepool_phase_seconds",
            "Time spent per phase: dns, queue, tcp_connect, tls_handshake, ttfb, total",
            m.phases.clone(),
        );
        registry.register(
            "edgepool_requests_per_connection",
            "Requests a connection carried before it closed",
            m.per_connection.clone(),
        );
        registry.register(
            "edgepool_bytes",
            "Body bytes forwarded: up (worker to target) and down",
            m.bytes.clone(),
        );
        m
    }

    fn observe(&self, phase: Phase, d: Duration) {
        self.phase_handles[phase as usize]
            .get_or_init(|| {
                let labels = PhaseLabels {
                    phase: phase.as_str(),
                };
                self.phases.get_or_create(&labels).clone()
            })
            .observe(d.as_secs_f64());
    }

    fn add_bytes(&self, direction: Direction, n: u64) {
        self.byte_handles[direction as usize]
            .get_or_init(|| {
                let labels = DirectionLabels {
                    direction: direction.as_str(),
                };
                self.bytes.get_or_create(&labels).clone()
            })
            .inc_by(n);
    }
}

/// Per-target reuse gauges, cleared and rebuilt at each scrape (top targets, `other`, `*`).
struct TargetGauges {
    reuse_ratio: Family<TargetLabels, Gauge<f64, AtomicU64>>,
    slo_breach: Family<TargetLabels, Gauge>,
}

impl TargetGauges {
    fn register(registry: &mut Registry) -> Self {
        let m = TargetGauges {
            reuse_ratio: Family::default(),
            slo_breach: Family::default(),
        };
        registry.register(
            "edgepool_reuse_ratio",
            "R = 1 - new_connections / requests since start, per target (top targets, rest other) and fleet (*)",
            m.reuse_ratio.clone(),
        );
        registry.register(
            "edgepool_slo_breach",
            "1 while a target's R is more than 5 points below its objective",
            m.slo_breach.clone(),
        );
        m
    }
}

impl TraceLog {
    fn new(cfg: &crate::config::TraceConfig) -> Self {
        let every = if cfg.sample_rate <= 0.0 {
            0
        } else {
            (1.0 / cfg.sample_rate).round().max(1.0) as u64
        };
        let (tx, _) = tokio::sync::broadcast::channel(4096);
        TraceLog {
            tx,
            every,
            seen: AtomicU64::new(0),
        }
    }
}

/// The per-target accounting rows, bounded by `slo.max_targets`: a new target beyond the bound
/// folds the least recently active row into `folded`, so fleet totals stay exact while memory
/// and `/status` stay flat however many targets a crawl touches.
struct TargetTable {
    rows: lru::LruCache<String, TargetCounts>,
    cap: usize,
    /// The sum of every folded row.
    folded: TargetCounts,
    /// Rows folded (`edgepool_target_rows_folded_total`).
    folds: Counter,
}

impl TargetTable {
    fn new(cap: usize, registry: &mut Registry) -> TargetTable {
        let folds = Counter::default();
        registry.register(
            "edgepool_target_rows_folded",
            "Per-target accounting rows folded into the fleet totals to stay within slo.max_targets (least recently active first)",
            folds.clone(),
        );
        TargetTable {
            rows: lru::LruCache::unbounded(),
            cap: cap.max(1),
            folded: TargetCounts::default(),
            folds,
        }
    }

    /// `target`'s row (made the most recently active), created if new — allocating its name
    /// only then — after folding the least recently active row if the table is full.
    fn row(&mut self, target: &str) -> &mut TargetCounts {
        if !self.rows.contains(target) {
            if self.rows.len() >= self.cap {
                if let Some((_, old)) = self.rows.pop_lru() {
                    self.folded.add(&old);
                    self.folds.inc();
                }
            }
            self.rows.put(target.to_string(), TargetCounts::default());
        }
        self.rows.get_mut(target).expect("present: inserted above")
    }
}

/// Metrics and counters. One per gateway; passed down, never global.
pub struct Telemetry {
    registry: Registry,
    reuse: ReuseMetrics,
    outcomes: OutcomeMetrics,
    pool: PoolGauges,
    phases: PhaseMetrics,
    target_gauges: TargetGauges,
    ports_used: Gauge<f64, AtomicU64>,
    exits: crate::exits::ExitMetrics,
    /// Serializes scrapes (per-target gauges are cleared and rebuilt on each).
    scrape: Mutex<()>,
    targets: Mutex<TargetTable>,
    /// Fleet figures with no target row: errors answered before routing, closes of shared
    /// plain-http proxy connections.
    unrouted: Mutex<TargetCounts>,
    history: Mutex<History>,
    slo: crate::config::SloConfig,
    trace: TraceLog,
}

/// The dashboard time series and the last verdict per target (for breach warnings).
#[derive(Default)]
struct History {
    points: VecDeque<HistoryPoint>,
    last: TargetCounts,
    verdicts: HashMap<String, Verdict>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new(Default::default(), Default::default())
    }
}

impl Telemetry {
    /// Registers every metric.
    pub fn new(slo: crate::config::SloConfig, trace: crate::config::TraceConfig) -> Self {
        Self::with_registry(Registry::default(), slo, trace)
    }

    /// Like [`new`](Self::new), adding its metrics to `registry`, which other modules have
    /// registered theirs in (the DNS cache's, for one); `/metrics` encodes them all. Each
    /// group registers its own families; the order here is `/metrics`' order.
    pub fn with_registry(
        mut registry: Registry,
        slo: crate::config::SloConfig,
        trace: crate::config::TraceConfig,
    ) -> Self {
        let targets = Mutex::new(TargetTable::new(slo.max_targets, &mut registry));
        Telemetry {
            reuse: ReuseMetrics::register(&mut registry),
            outcomes: OutcomeMetrics::register(&mut registry),
            pool: PoolGauges::register(&mut registry),
            phases: PhaseMetrics::register(&mut registry),
            target_gauges: TargetGauges::register(&mut registry),
            ports_used: crate::portguard::register_used_gauge(&mut registry),
            exits: crate::exits::ExitMetrics::register(&mut registry),
            registry,
            scrape: Mutex::new(()),
            targets,
            unrouted: Mutex::new(TargetCounts::default()),
            history: Mutex::new(History::default()),
            slo,
            trace: TraceLog::new(&trace),
        }
    }

    /// Looks up every exit node's counters once (call when the exits are built), so requests
    /// count through handles instead of label sets.
    pub fn register_exits(&self, nodes: &[Arc<crate::exits::ExitNode>]) {
        self.exits.set_nodes(nodes);
    }

    /// The reuse objective configuration.
    pub fn slo(&self) -> &crate::config::SloConfig {
        &self.slo
    }

    /// Records one upstream request (at its response head, or its failure).
    pub fn record_request(&self, r: &RequestRecord<'_>) {
        self.reuse.count_request(r.reused, r.protocol);
        self.phases.observe(Phase::Dns, r.dns);
        self.phases.observe(Phase::Queue, r.queue);
        if r.bytes_up > 0 {
            self.phases.add_bytes(Direction::Up, r.bytes_up);
        }
        if let Some(h) = r.handshake {
            self.reuse.handshake_seconds.inc_by(h.as_secs_f64());
        }
        if let Some(why) = r.retry_reason {
            self.outcomes
                .retries
                .get_or_create(&ReasonLabels { reason: why })
                .inc();
        }
        let exit = r.exit;
        self.exits.with(exit, |h| {
            if r.reused {
                h.requests_reused.inc();
            } else {
                h.requests_new.inc();
            }
            if r.via_proxy && !r.reused {
                h.opened.inc();
            }
            if r.forced {
                h.forced.inc();
            }
        });
        exit.counters.requests.fetch_add(1, Ordering::Relaxed);
        if r.via_proxy && !r.reused {
            // A shared proxy connection is counted with its first request (see the module doc).
            exit.counters
                .new_connections
                .fetch_add(1, Ordering::Relaxed);
            if let Some(why) = r.new_reason {
                self.reuse.opened(why);
            }
        }
        if r.forced {
            exit.counters
                .forced_requests
                .fetch_add(1, Ordering::Relaxed);
            if !r.reused {
                exit.counters.forced_new.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut t = self.targets.lock();
        let c = t.row(r.target);
        c.requests += 1;
        if r.forced {
            c.forced_requests += 1;
            if !r.reused {
                c.forced_new += 1;
            }
        }
        if r.via_proxy && !r.reused {
            c.new_connections += 1;
            if let Some(why) = r.new_reason {
                *c.new_by_reason.entry(why.as_str()).or_default() += 1;
            }
        }
        match c.by_exit.iter_mut().find(|(l, _)| **l == *exit.label) {
            Some((_, n)) => *n += 1,
            None => c.by_exit.push((exit.label.clone(), 1)),
        }
        if r.reused {
            c.reused += 1;
            if c.handshakes > 0 {
                let mean = c.handshake_seconds / c.handshakes as f64;
                c.handshake_saved_seconds += mean;
                self.reuse.handshake_saved.inc_by(mean);
            }
        }
        c.protocol = r.protocol;
        if let Some(h) = r.handshake {
            c.handshake_seconds += h.as_secs_f64();
            c.handshakes += 1;
            if let Some(why) = r.new_reason {
                *c.handshake_by_reason.entry(why.as_str()).or_default() += h.as_secs_f64();
            }
        }
    }

    /// Records the phases of a new connection (once, with its first request).
    pub fn record_handshake(&self, tcp: Duration, exit: Duration, tls: Duration) {
        self.phases.observe(Phase::TcpConnect, tcp);
        if !exit.is_zero() {
            self.phases.observe(Phase::ExitHandshake, exit);
        }
        if !tls.is_zero() {
            self.phases.observe(Phase::TlsHandshake, tls);
        }
    }

    /// Records a response head's arrival.
    pub fn record_ttfb(&self, ttfb: Duration) {
        self.phases.observe(Phase::Ttfb, ttfb);
    }

    /// Publishes exit nodes' circuit states (0 closed, 1 half-open, 2 open).
    pub fn record_exit_states(&self, exits: &crate::exits::Exits) {
        self.exits.record_states(exits);
    }

    /// Records the end of a response body.
    pub fn record_done(&self, total: Duration, bytes_down: u64) {
        self.phases.observe(Phase::Total, total);
        if bytes_down > 0 {
            self.phases.add_bytes(Direction::Down, bytes_down);
        }
    }

    /// Records an edgepool error answered to a worker.
    ///
    /// `target`: the routed target the error belongs to; `None` for errors answered before a
    /// request was routed (CONNECT-time refusals, bad requests): those count in the fleet row
    /// only, so probes of unknown names cannot grow the per-target table.
    pub fn record_error(&self, target: Option<&str>, token: &'static str) {
        self.outcomes
            .errors
            .get_or_create(&ErrorLabels { error: token })
            .inc();
        match target {
            Some(t) => self.targets.lock().row(t).errors += 1,
            None => self.unrouted.lock().errors += 1,
        }
    }

    /// How many errors with `token` were recorded (`edgepool_errors_total{error=token}`).
    pub fn error_count(&self, token: &'static str) -> u64 {
        self.outcomes
            .errors
            .get_or_create(&ErrorLabels { error: token })
            .get()
    }

    /// Records a blind tunnel.
    pub fn record_tunnel(&self) {
        self.outcomes.tunnels.inc();
    }

    /// Sets the ephemeral-port budget gauge.
    pub fn set_ports_used(&self, ratio: f64) {
        self.ports_used.set(ratio);
    }

    /// Whether a trace record for a request should be written: always for new connections
    /// and errors, else one in `1 / trace.sample_rate`.
    pub fn should_trace(&self, reused: bool, error: bool) -> bool {
        if self.trace.tx.receiver_count() == 0 {
            return false;
        }
        if !reused || error {
            return true;
        }
        let every = self.trace.every;
        every != 0 && self.trace.seen.fetch_add(1, Ordering::Relaxed) % every == 0
    }

    /// Writes a trace record to every trace subscriber.
    pub fn trace(&self, mut rec: TraceRecord) {
        if self.trace.tx.receiver_count() == 0 {
            return;
        }
        rec.ts = rfc3339_now();
        if let Ok(line) = serde_json::to_string(&rec) {
            let _ = self.trace.tx.send(Arc::from(line));
        }
    }

    /// A new subscription to the trace log (JSON lines).
    pub fn subscribe_trace(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.trace.tx.subscribe()
    }

    /// Per-target counts, sorted by target.
    pub fn targets(&self) -> BTreeMap<String, TargetCounts> {
        self.targets
            .lock()
            .rows
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Fleet totals.
    ///
    /// The sum of the target rows plus what has no row (see the module doc).
    pub fn totals(&self) -> TargetCounts {
        let unrouted = self.unrouted.lock().clone();
        let t = self.targets.lock();
        let mut sum = TargetCounts::default();
        let rows = t.rows.iter().map(|(_, c)| c);
        for c in rows.chain([&unrouted, &t.folded]) {
            sum.add(c);
        }
        sum
    }

    /// Closes one interval of the time series (the gateway calls this every few seconds) and
    /// re-evaluates SLO verdicts, warning when a target enters `breach`.
    pub fn tick(&self) {
        let totals = self.totals();
        let targets = self.targets();
        let mut h = self.history.lock();
        let mut by_reason = BTreeMap::new();
        for (k, v) in &totals.new_by_reason {
            let before = h.last.new_by_reason.get(k).copied().unwrap_or(0);
            if *v > before {
                by_reason.insert(*k, v - before);
            }
        }
        let requests = totals.requests.saturating_sub(h.last.requests);
        let new_connections = totals
            .new_connections
            .saturating_sub(h.last.new_connections);
        let reuse_rate =
            (requests > 0).then(|| (1.0 - new_connections as f64 / requests as f64).max(0.0));
        h.points.push_back(HistoryPoint {
            t: now_unix(),
            requests,
            new_connections,
            reuse_rate,
            new_by_reason: by_reason,
        });
        while h.points.len() > HISTORY_POINTS {
            h.points.pop_front();
        }
        h.last = totals;
        for (t, c) in &targets {
            let v = Verdict::of(
                c.reuse_rate(),
                c.requests,
                self.slo.target_for(t),
                self.slo.min_requests,
            );
            let prev = h.verdicts.insert(t.clone(), v);
            if v == Verdict::Breach && prev != Some(Verdict::Breach) {
                tracing::warn!(
                    target = %t,
                    reuse_rate = c.reuse_rate(),
                    objective = self.slo.target_for(t),
                    "reuse SLO breach"
                );
            } else if prev == Some(Verdict::Breach) && v != Verdict::Breach {
                tracing::info!(target = %t, reuse_rate = c.reuse_rate(), "reuse SLO recovered");
            }
        }
        // Only targets that still have a row keep a verdict: the rows are bounded
        // (`slo.max_targets`), so the verdicts are too.
        h.verdicts.retain(|t, _| targets.contains_key(t));
    }

    /// What happened since `last` (a previous [`Telemetry::totals`]), as one report bucket;
    /// `last` becomes the current totals.
    pub fn minute_counts(&self, last: &mut TargetCounts) -> crate::report::MinuteCounts {
        let now = self.totals();
        let mut m = crate::report::MinuteCounts {
            requests: now.requests.saturating_sub(last.requests),
            new_connections: now.new_connections.saturating_sub(last.new_connections),
            ..Default::default()
        };
        for (k, v) in &now.new_by_reason {
            let n = v.saturating_sub(last.new_by_reason.get(k).copied().unwrap_or(0));
            let secs = now.handshake_by_reason.get(k).copied().unwrap_or(0.0)
                - last.handshake_by_reason.get(k).copied().unwrap_or(0.0);
            if n > 0 || secs > 0.0 {
                m.new_by_reason.insert(k.to_string(), (n, secs.max(0.0)));
            }
        }
        for (k, v) in &now.closed_by_reason {
            let n = v.saturating_sub(last.closed_by_reason.get(k).copied().unwrap_or(0));
            if n > 0 {
                m.closed_by_reason.insert(k.to_string(), n);
            }
        }
        *last = now;
        m
    }

    /// The time series, oldest first.
    pub fn history(&self) -> Vec<HistoryPoint> {
        self.history.lock().points.iter().cloned().collect()
    }

    /// Prometheus text exposition, with the pool gauges refreshed from `stats`.
    pub fn encode(&self, stats: PoolStats) -> String {
        self.pool.set(&stats);
        // Per-target gauges: the busiest targets by name, the rest folded into `other`. Cleared
        // first so a target that left the top does not keep a frozen series (or a stuck
        // breach alert); the lock keeps two scrapes from interleaving clear and set.
        let _scrape = self.scrape.lock();
        self.target_gauges.reuse_ratio.clear();
        self.target_gauges.slo_breach.clear();
        let targets = self.targets();
        // Targets that only ever saw edgepool errors (refused, unresolvable) have no R.
        let mut ranked: Vec<(&String, &TargetCounts)> =
            targets.iter().filter(|(_, c)| c.requests > 0).collect();
        ranked.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(b.0)));
        let mut other = TargetCounts::default();
        for (i, (t, c)) in ranked.iter().enumerate() {
            if i < TOP_TARGETS {
                self.set_target_gauges(t, c);
            } else {
                other.requests += c.requests;
                other.new_connections += c.new_connections;
            }
        }
        if ranked.len() > TOP_TARGETS {
            self.set_target_gauges("other", &other);
        }
        let fleet = self.totals();
        self.set_target_gauges("*", &fleet);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    fn set_target_gauges(&self, target: &str, c: &TargetCounts) {
        let label = TargetLabels {
            target: target.to_string(),
        };
        self.target_gauges
            .reuse_ratio
            .get_or_create(&label)
            .set(c.reuse_rate());
        let v = Verdict::of(
            c.reuse_rate(),
            c.requests,
            self.slo.target_for(target),
            self.slo.min_requests,
        );
        self.target_gauges
            .slo_breach
            .get_or_create(&label)
            .set(i64::from(v == Verdict::Breach));
    }
}

impl PoolEvents<UpstreamKey> for Telemetry {
    fn connection_opened(&self, key: &UpstreamKey, reason: NewReason) {
        if key.via_proxy() {
            // Counted everywhere with the request that first rides it (the key has no target).
            return;
        }
        self.reuse.opened(reason);
        let node = &key.exit.node;
        self.exits.with(node, |h| h.opened.inc());
        node.counters
            .new_connections
            .fetch_add(1, Ordering::Relaxed);
        let mut t = self.targets.lock();
        let c = t.row(&key.target());
        c.new_connections += 1;
        *c.new_by_reason.entry(reason.as_str()).or_default() += 1;
    }
    fn dial_failed(&self, key: &UpstreamKey) {
        self.reuse.dial_failures.inc();
        if key.via_proxy() {
            return; // a proxy connection for every plain-http target: no target row
        }
        self.targets.lock().row(&key.target()).dial_failures += 1;
    }
    fn connection_closed(&self, key: &UpstreamKey, reason: CloseReason, requests: u64) {
        self.reuse
            .closed
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
        if requests > 0 {
            self.phases.per_connection.observe(requests as f64);
        }
        if key.via_proxy() {
            *self
                .unrouted
                .lock()
                .closed_by_reason
                .entry(reason.as_str())
                .or_default() += 1;
        } else {
            let mut t = self.targets.lock();
            *t.row(&key.target())
                .closed_by_reason
                .entry(reason.as_str())
                .or_default() += 1;
        }
        if self.trace.tx.receiver_count() > 0 {
            self.trace(TraceRecord {
                kind: "pool",
                target: key.target(),
                exit: key.exit.node.label.to_string(),
                pool: Some(format!(
                    "connection closed ({}) after {requests} requests",
                    reason.as_str()
                )),
                ..Default::default()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (reused, protocol) pair lands on its own series, through the cached handles for
    /// HTTP/1.1 and h2 and the family for anything else; the phase histograms count too.
    #[test]
    fn request_counts_reach_their_series() {
        let t = Telemetry::new(Default::default(), Default::default());
        let mut r = rec("a.example:443", true);
        for (protocol, reused, times) in [
            ("http/1.1", false, 1),
            ("http/1.1", true, 2),
            ("h2", false, 3),
            ("h2", true, 4),
            ("h3", true, 5),
        ] {
            r.protocol = protocol;
            r.reused = reused;
            for _ in 0..times {
                t.record_request(&r);
            }
        }
        let m = t.encode(PoolStats::default());
        for (protocol, reused, times) in [
            ("http/1.1", 0, 1),
            ("http/1.1", 1, 2),
            ("h2", 0, 3),
            ("h2", 1, 4),
            ("h3", 1, 5),
        ] {
            let line = format!(
                "edgepool_requests_total{{reused=\"{reused}\",protocol=\"{protocol}\"}} {times}\n"
            );
            assert!(m.contains(&line), "{line} in\n{m}");
        }
        assert!(
            m.contains("edgepool_phase_seconds_count{phase=\"dns\"} 15\n"),
            "{m}"
        );
        assert!(
            m.contains("edgepool_phase_seconds_bucket{le=\"0.0001\",phase=\"queue\"} 15\n"),
            "{m}"
        );
    }

    #[test]
    fn verdicts_follow_the_objective_with_a_five_point_monitor_band() {
        assert_eq!(Verdict::of(0.95, 10, 0.92, 10), Verdict::Optimal);
        assert_eq!(Verdict::of(0.92, 10, 0.92, 10), Verdict::Optimal);
        assert_eq!(Verdict::of(0.90, 10, 0.92, 10), Verdict::Monitor);
        assert_eq!(Verdict::of(0.86, 10, 0.92, 10), Verdict::Breach);
        assert_eq!(Verdict::of(1.0, 0, 0.92, 10), Verdict::Idle);
        // The case: 11 requests, one cold connection plus one more = R 0.818.
        assert_eq!(Verdict::of(0.818, 11, 0.92, 100), Verdict::WarmingUp);
        assert_eq!(Verdict::of(0.818, 99, 0.92, 100), Verdict::WarmingUp);
        assert_eq!(Verdict::of(0.818, 100, 0.92, 100), Verdict::Breach);
        assert_eq!(Verdict::of(0.818, 1, 0.92, 0), Verdict::Breach);
        assert_eq!(
            serde_json::to_string(&Verdict::WarmingUp).unwrap(),
            "\"warming_up\""
        );
    }

    static EXITS: std::sync::LazyLock<crate::exits::Exits> = std::sync::LazyLock::new(|| {
        crate::exits::Exits::new(&[], None, crate::config::ExitsConfig::default().settings())
            .unwrap()
    });

    /// A request record for `target`; a new connection's handshake costs 100 ms.
    fn rec(target: &str, reused: bool) -> RequestRecord<'_> {
        RequestRecord {
            exit: EXITS.direct(),
            forced: false,
            via_proxy: false,
            target,
            reused,
            protocol: "h2",
            handshake: (!reused).then(|| Duration::from_millis(100)),
            retry_reason: None,
            new_reason: (!reused).then_some(NewReason::ColdKey),
            dns: Duration::ZERO,
            queue: Duration::ZERO,
            bytes_up: 0,
        }
    }

    #[test]
    fn tick_records_interval_deltas_not_totals() {
        let t = Telemetry::default();
        let rec = |reused| rec("a:443", reused);
        t.record_request(&rec(false));
        for _ in 0..3 {
            t.record_request(&rec(true));
        }
        t.tick();
        for _ in 0..4 {
            t.record_request(&rec(true));
        }
        t.tick();
        let h = t.history();
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].requests, h[1].requests), (4, 4));
        assert_eq!(h[1].reuse_rate, Some(1.0));
        // 7 reused requests saved the mean handshake (100 ms) each.
        let saved = t.totals().handshake_saved_seconds;
        assert!((saved - 0.7).abs() < 1e-9, "{saved}");
    }

    #[test]
    fn per_target_gauges_are_bounded_to_the_top_targets_plus_other() {
        let t = Telemetry::default();
        for i in 0..(TOP_TARGETS + 5) {
            let name = format!("t{i}:443");
            t.record_request(&rec(&name, false));
        }
        let text = t.encode(PoolStats::default());
        let series = text
            .lines()
            .filter(|l| l.starts_with("edgepool_reuse_ratio{"))
            .count();
        assert_eq!(series, TOP_TARGETS + 2, "top targets + other + fleet");
        assert!(text.contains("edgepool_reuse_ratio{target=\"other\"}"));
        // A target that climbs into the top pushes another out: no frozen series remain.
        let late = format!("t{}:443", TOP_TARGETS + 4);
        for _ in 0..5 {
            t.record_request(&rec(&late, true));
        }
        let text = t.encode(PoolStats::default());
        let series = text
            .lines()
            .filter(|l| l.starts_with("edgepool_reuse_ratio{"))
            .count();
        assert_eq!(
            series,
            TOP_TARGETS + 2,
            "still bounded after the ranking changed"
        );
        assert!(text.contains(&format!("edgepool_reuse_ratio{{target=\"{late}\"}}")));
    }

    #[test]
    fn target_rows_are_bounded_and_folded_rows_stay_in_the_fleet_totals() {
        let slo = crate::config::SloConfig {
            max_targets: 2,
            ..Default::default()
        };
        let t = Telemetry::new(slo, Default::default());
        t.record_request(&rec("a:443", false));
        t.record_request(&rec("a:443", true));
        t.record_request(&rec("b:443", false));
        t.record_request(&rec("a:443", true)); // a is now the most recently active
        t.record_error(Some("c:443"), "dns_failed"); // a new row: b, the least recent, folds
        let rows = t.targets();
        assert_eq!(rows.keys().collect::<Vec<_>>(), ["a:443", "c:443"]);
        assert_eq!((rows["a:443"].requests, rows["c:443"].errors), (3, 1));
        let fleet = t.totals();
        assert_eq!(
            (fleet.requests, fleet.reused),
            (4, 2),
            "b's requests still counted"
        );
        assert_eq!(fleet.errors, 1);
        assert_eq!(fleet.by_exit.iter().map(|(_, n)| n).sum::<u64>(), 4);
        let text = t.encode(PoolStats::default());
        assert!(
            text.contains("edgepool_target_rows_folded_total 1\n"),
            "{text}"
        );
        // A folded target that comes back starts a new row (its old counts stay folded).
        t.record_request(&rec("b:443", true));
        assert_eq!(t.targets()["b:443"].requests, 1);
        assert_eq!(t.totals().requests, 5);
    }

    #[test]
    fn slo_verdicts_are_kept_only_for_targets_with_a_row() {
        let slo = crate::config::SloConfig {
            max_targets: 3,
            ..Default::default()
        };
        let t = Telemetry::new(slo, Default::default());
        for i in 0..50 {
            t.record_request(&rec(&format!("t{i}:443"), false));
            t.tick();
        }
        assert_eq!(
            t.history.lock().verdicts.len(),
            3,
            "one per row, not per name seen"
        );
    }

    #[test]
    fn pool_key_figures_are_exported() {
        let t = Telemetry::default();
        let stats = PoolStats {
            keys: 2,
            remembered: 5,
            forgotten: 7,
            ..Default::default()
        };
        let text = t.encode(stats);
        assert!(
            text.contains("edgepool_pool_keys{state=\"live\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("edgepool_pool_keys{state=\"remembered\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("edgepool_pool_keys_forgotten_total 7\n"),
            "{text}"
        );
        // A counter: a later scrape adds only what was forgotten since.
        let text = t.encode(PoolStats {
            forgotten: 9,
            ..stats
        });
        assert!(
            text.contains("edgepool_pool_keys_forgotten_total 9\n"),
            "{text}"
        );
    }
}
