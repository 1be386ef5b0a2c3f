//! exits: where requests leave from — exit pools (direct, HTTP CONNECT proxies, SOCKS5
//! proxies, a provider's rotating gateway), node health (a circuit breaker per node), sticky
//! worker sessions, sticky windows for session-less traffic, and the reuse-aware choice of a
//! node when a session or window starts.
//!
//! Data flow: the forwarder asks [`Exits::route`] for a [`Route`] (which node, which isolation
//! scope, why a connection would be new) and builds the pool key with the route's [`ExitKey`].
//! The dialer reads the node's [`ExitSpec`] from the key to open the connection through it and
//! tells the node's circuit what happened, once per dial, and the forwarder reports responses,
//! both through [`ExitNode::report`] — the node alone decides what an outcome does to its health.
//!
//! Isolation: [`ExitKey`] is part of the pool key, so a connection is only ever shared by
//! requests with the same node *and* the same session scope. Worker sessions get a scope of
//! their own (token + session id + a per-pin serial); provider sessions of a rotating gateway
//! are the scope for gateway pools. Session-less requests on an ordinary node share the node's
//! connections (scope `None`).
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::exitproto::ProxyAuth;
use crate::pool::NewReason;
use crate::worker::{Rotate, WorkerOptions};

/// A half-open probe that has not reported back for this long is presumed lost and another
/// request may probe (longer than a connect plus a TLS handshake at their default timeouts).
pub const PROBE_STALE: Duration = Duration::from_secs(30);

/// The session-scope serial of forced-rotation traffic within a session.
const FORCED_SERIAL: u64 = u64::MAX;

/// Name of the implicit pool (and node) that connects straight to targets.
pub const DIRECT: &str = "direct";

/// `host:port` with IPv6 hosts in brackets: an exit's or a target's label and a CONNECT
/// request-target.
pub fn authority(host: &str, port: u16) -> String {
    // Built by hand rather than with `format!`: this runs at least twice per proxied request
    // (the target label and the Host header), and the formatting machinery cost ~850
    // instructions a call against ~100 for two copies and a digit conversion.
    let v6 = host.contains(':');
    let mut digits = itoa::Buffer::new();
    let port = digits.format(port);
    // Exact, so that `Bytes::from` can take the buffer without a second allocation.
    let mut s = String::with_capacity(host.len() + port.len() + 1 + if v6 { 2 } else { 0 });
    if v6 {
        s.push('[');
    }
    s.push_str(host);
    if v6 {
        s.push(']');
    }
    s.push(':');
    s.push_str(port);
    s
}

/// Whether the authority of URL `s` spells a port (`host:3128`, `[::1]:1080`); `url::Url`
/// drops a port equal to the scheme's default, so the text itself is read.
fn has_explicit_port(s: &str) -> bool {
    let rest = s.split_once("://").map_or(s, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let port = match hostport.rsplit_once(']') {
        Some((_, after)) => after.strip_prefix(':'),
        None => hostport.rsplit_once(':').map(|(_, p)| p),
    };
    port.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// How a node reaches targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Straight to the target.
    Direct,
    /// An HTTP proxy: CONNECT for https targets, absolute-form requests for http targets.
    Http,
    /// A SOCKS5 proxy (the proxy resolves names, like `socks5h`).
    Socks5,
}

impl ExitKind {
    /// `direct` / `http` / `socks5`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitKind::Direct => "direct",
            ExitKind::Http => "http",
            ExitKind::Socks5 => "socks5",
        }
    }
}

/// A node as configured: `direct`, `http://[user:pass@]host:port` or
/// `socks5://[user:pass@]host:port` (`socks5h://` is accepted as a synonym).
#[derive(Clone, PartialEq, Eq)]
pub struct ExitSpec {
    /// Kind.
    pub kind: ExitKind,
    /// Proxy host (empty for direct).
    pub host: String,
    /// Proxy port (0 for direct).
    pub port: u16,
    /// Credentials for the proxy.
    pub auth: Option<ProxyAuth>,
}

impl std::fmt::Debug for ExitSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        write!(f, "{}://{}:{}", self.kind.as_str(), self.host, self.port)?;
        if self.auth.is_some() {
            write!(f, " (with credentials)")?;
        }
        Ok(())
    }
}

impl ExitSpec {
    /// Parses a node URL. Errors never echo the credentials.
    pub fn parse(s: &str) -> Result<ExitSpec, ExitSpecError> {
        let s = s.trim();
        if s.eq_ignore_ascii_case(DIRECT) {
            return Ok(ExitSpec {
                kind: ExitKind::Direct,
                host: String::new(),
                port: 0,
                auth: None,
            });
        }
        let url = url::Url::parse(s).map_err(ExitSpecError::NotAUrl)?;
        let kind = match url.scheme() {
            "http" => ExitKind::Http,
            "socks5" | "socks5h" => ExitKind::Socks5,
            "https" => return Err(ExitSpecError::Https),
            other => return Err(ExitSpecError::Scheme(other.to_string())),
        };
        let host = url
            .host_str()
            .ok_or(ExitSpecError::NoHost)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        // The port must be written: proxies listen anywhere (3128, 8080, 1080, provider ports),
        // and guessing 80 for http:// sends the credentials to whatever answers there.
        if !has_explicit_port(s) {
            return Err(ExitSpecError::NoPort(url.scheme().to_string()));
        }
        let port = url.port_or_known_default().unwrap_or(1080);
        if url.path() != "/" && !url.path().is_empty() || url.query().is_some() {
            return Err(ExitSpecError::PathOrQuery);
        }
        let decode = |v: &str| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ExitSpecError::Credentials)
        };
        let auth = if url.username().is_empty() && url.password().is_none() {
            None
        } else {
            Some(ProxyAuth {
                username: decode(url.username())?,
                password: decode(url.password().unwrap_or(""))?,
            })
        };
        Ok(ExitSpec {
            kind,
            host,
            port,
            auth,
        })
    }

    /// What names the node to the fleet's rendezvous hashing: kind, endpoint and user (never
    /// the password) — the same on every gateway whatever the pool's order or labels.
    pub fn identity(&self) -> String {
        let user = self.auth.as_ref().map_or("", |a| a.username.as_str());
        format!("{}://{}#{user}", self.kind.as_str(), self.endpoint())
    }

    /// `host:port` (IPv6 bracketed), or `direct`.
    pub fn endpoint(&self) -> String {
        match self.kind {
            ExitKind::Direct => DIRECT.to_string(),
            _ => authority(&self.host, self.port),
        }
    }
}

/// Circuit breaker state of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    /// Healthy: traffic flows.
    Closed,
    /// Failing: no traffic until the backoff ends.
    Open,
    /// Backoff over: one probe request may try the node.
    HalfOpen,
}

impl CircuitState {
    /// `closed` / `open` / `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
struct Circuit {
    state: CircuitState,
    /// Consecutive failures.
    failures: u32,
    /// Open until (when Open).
    until: Instant,
    /// The next open period.
    backoff: Duration,
    /// A half-open probe is in flight (since `probe_at`).
    probing: bool,
    /// When the probe was let through; a probe older than [`PROBE_STALE`] is presumed lost
    /// (its requester went away, or it never dialed) and another may go.
    probe_at: Instant,
    /// The last failure, for /status (never contains credentials).
    last_error: Option<String>,
    /// Times the circuit opened.
    opened: u64,
}

/// When a node's circuit opens and for how long.
#[derive(Clone, Copy, Debug)]
struct CircuitPolicy {
    failures: u32,
    open_min: Duration,
    open_max: Duration,
}

/// Per-node request accounting.
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// Requests sent through the node.
    pub requests: AtomicU64,
    /// Connections opened through the node (telemetry's one definition of a new connection).
    pub new_connections: AtomicU64,
    /// Requests with forced rotation (`rotate-request`).
    pub forced_requests: AtomicU64,
    /// Of which on new connections.
    pub forced_new: AtomicU64,
    /// Dial failures blamed on the node.
    pub failures: AtomicU64,
}

/// What happened on an exit node, as the dialer and the forwarder saw it
/// ([`ExitNode::report`]).
#[derive(Clone, Copy, Debug)]
pub enum NodeOutcome<'a> {
    /// A failure only the node can cause: unreachable, broke its protocol, rejected our
    /// credentials, or is edgepool itself. Counts toward opening its circuit.
    Fault(&'a str),
    /// The node answered in protocol: a tunnel came up, or it refused the target itself.
    /// Closes its circuit.
    Answered,
    /// A dial through the node ended without a verdict on it (our budget or local ports, a
    /// target name no request can carry, a slow target): a half-open probe slot is given back.
    NoVerdict,
    /// A request through the node got its response (on a new connection: the node is
    /// healthy; on a reused one only a half-open probe's success counts).
    Responded {
        /// The request rode a connection opened for it.
        new_connection: bool,
    },
}

/// One exit node.
pub struct ExitNode {
    /// Index in [`Exits::nodes`].
    pub index: usize,
    /// `pool/N` (the N-th node of the pool, 1-based; `direct` for the implicit direct node):
    /// the metric label and the `X-Edgepool-Exit` value. Contains no address and no
    /// credentials ([`ExitSpec::endpoint`] is the address, shown only in `/status`).
    pub label: Arc<str>,
    /// Pool name.
    pub pool: Arc<str>,
    /// How to reach it.
    pub spec: ExitSpec,
    /// For a provider's rotating gateway: the username template (`{user}`, `{session}`).
    pub session_template: Option<Arc<str>>,
    /// Max concurrent connections through the node (None: unlimited — direct).
    pub budget: Option<usize>,
    permits: Option<Arc<tokio::sync::Semaphore>>,
    circuit: Mutex<Circuit>,
    policy: CircuitPolicy,
    unhealthy: AtomicBool,
    /// Sessions and windows currently pinned to the node (load for fair spreading).
    pins: AtomicUsize,
    /// Open connections through the node.
    pub open: AtomicUsize,
    /// Accounting.
    pub counters: NodeCounters,
}

impl std::fmt::Debug for ExitNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

impl ExitNode {
    /// The budget semaphore (None for unlimited).
    pub fn permits(&self) -> Option<&Arc<tokio::sync::Semaphore>> {
        self.permits.as_ref()
    }

    /// The credentials to present for `session` (a provider session id when the pool is a
    /// rotating gateway).
    pub fn auth_for(&self, session: Option<&str>) -> Option<ProxyAuth> {
        let auth = self.spec.auth.as_ref()?;
        match (&self.session_template, session) {
            (Some(tpl), Some(s)) => Some(ProxyAuth {
                username: tpl
                    .replace("{user}", &auth.username)
                    .replace("{session}", s),
                password: auth.password.clone(),
            }),
            _ => Some(auth.clone()),
        }
    }

    /// Tells the node what happened on it. The one way into its health: callers report
    /// outcomes, the node's circuit decides what each means.
    #[inline]
    pub fn report(&self, outcome: NodeOutcome<'_>) {
        match outcome {
            NodeOutcome::Fault(why) => self.record_failure(why),
            NodeOutcome::Answered => self.mark_ok(),
            NodeOutcome::NoVerdict => self.release_probe(),
            NodeOutcome::Responded { new_connection } => self.note_success(new_connection),
        }
    }

    /// Whether the node may carry a request now; moves Open → HalfOpen when the backoff is
    /// over and lets exactly one probe through. (`unhealthy` is set while the node has
    /// failures or an open circuit; a healthy node costs one atomic load.)
    fn admit(&self, now: Instant) -> bool {
        if !self.unhealthy.load(Ordering::Acquire) {
            return true;
        }
        let mut c = self.circuit.lock();
        let free = !c.probing || now.saturating_duration_since(c.probe_at) >= PROBE_STALE;
        match c.state {
            CircuitState::Closed => true,
            CircuitState::Open if now >= c.until => {
                c.state = CircuitState::HalfOpen;
                c.probing = true;
                c.probe_at = now;
                true
            }
            CircuitState::Open => false,
            CircuitState::HalfOpen if free => {
                c.probing = true;
                c.probe_at = now;
                true
            }
            CircuitState::HalfOpen => false,
        }
    }

    /// One failure that is the node's fault (unreachable, broke the protocol, rejected our
    /// credentials), reported once per failed dial. Opens the circuit after
    /// `circuit_failures` consecutive failures, at once when half-open (the probe failed,
    /// backoff doubled up to `circuit_open_max`). A failure while open changes nothing but the
    /// counts.
    fn record_failure(&self, why: &str) {
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        if self.spec.kind == ExitKind::Direct {
            return; // direct's health is the targets', not a node's
        }
        let now = Instant::now();
        let mut c = self.circuit.lock();
        self.unhealthy.store(true, Ordering::Release);
        c.failures += 1;
        c.last_error = Some(why.to_string());
        let trip = c.state == CircuitState::HalfOpen || c.failures >= self.policy.failures;
        if trip && c.state != CircuitState::Open {
            c.backoff = if c.backoff.is_zero() {
                self.policy.open_min
            } else {
                (c.backoff * 2).min(self.policy.open_max)
            };
            c.state = CircuitState::Open;
            c.until = now + c.backoff;
            c.probing = false;
            c.opened += 1;
            tracing::warn!(exit = %self.label, backoff = ?c.backoff, error = %why, "exit circuit opened");
        }
    }

    /// A request through the node got its response: on a new connection the node is healthy
    /// (closes the circuit); on a reused one only a half-open probe's success counts (a warm
    /// connection working says nothing about new tunnels).
    fn note_success(&self, new_connection: bool) {
        if !self.unhealthy.load(Ordering::Acquire) {
            return;
        }
        if new_connection || self.circuit.lock().state == CircuitState::HalfOpen {
            self.mark_ok();
        }
    }

    /// The node answered properly (a tunnel came up, or it refused a target in protocol):
    /// closes the circuit and clears the failure count. Cheap when the node is healthy.
    fn mark_ok(&self) {
        if !self.unhealthy.load(Ordering::Acquire) {
            return;
        }
        let mut c = self.circuit.lock();
        if c.state != CircuitState::Closed {
            tracing::info!(exit = %self.label, "exit circuit closed");
        }
        c.state = CircuitState::Closed;
        c.failures = 0;
        c.backoff = Duration::ZERO;
        c.probing = false;
        self.unhealthy.store(false, Ordering::Release);
    }

    /// A dial through the node ended before reaching it for reasons of our own (budget,
    /// local ports): a half-open probe slot is given back, nothing else changes.
    fn release_probe(&self) {
        if self.unhealthy.load(Ordering::Acquire) {
            self.circuit.lock().probing = false;
        }
    }

    /// Whether [`admit`](Self::admit) would let a request through now (no state change).
    fn admissible(&self, now: Instant) -> bool {
        if !self.unhealthy.load(Ordering::Acquire) {
            return true;
        }
        let c = self.circuit.lock();
        match c.state {
            CircuitState::Closed => true,
            CircuitState::Open => now >= c.until,
            CircuitState::HalfOpen => {
                !c.probing || now.saturating_duration_since(c.probe_at) >= PROBE_STALE
            }
        }
    }

    /// When the node could next be tried (now if it can).
    fn retry_at(&self, now: Instant) -> Instant {
        let c = self.circuit.lock();
        match c.state {
            CircuitState::Open => c.until,
            _ => now,
        }
    }

    /// Current circuit state (Open turns HalfOpen in the view once the backoff is over).
    pub fn state(&self) -> CircuitState {
        let c = self.circuit.lock();
        match c.state {
            CircuitState::Open if Instant::now() >= c.until => CircuitState::HalfOpen,
            s => s,
        }
    }

    /// Snapshot for `/status`.
    pub fn health(&self) -> NodeHealth {
        let c = self.circuit.lock();
        let now = Instant::now();
        NodeHealth {
            state: match c.state {
                CircuitState::Open if now >= c.until => CircuitState::HalfOpen,
                s => s,
            },
            consecutive_failures: c.failures,
            opened_total: c.opened,
            retry_in: (c.state == CircuitState::Open)
                .then(|| c.until.saturating_duration_since(now)),
            last_error: c.last_error.clone(),
        }
    }
}

/// A node's health for status pages.
#[derive(Clone, Debug)]
pub struct NodeHealth {
    /// Circuit state.
    pub state: CircuitState,
    /// Consecutive failures.
    pub consecutive_failures: u32,
    /// Times the circuit opened.
    pub opened_total: u64,
    /// Time left before a probe is allowed (when open).
    pub retry_in: Option<Duration>,
    /// Last failure.
    pub last_error: Option<String>,
}

/// The exit part of a pool key: node and isolation scope. Equal keys may share connections.
#[derive(Clone)]
pub struct ExitKey {
    /// The node.
    pub node: Arc<ExitNode>,
    /// Isolation scope: a worker session (`token`, id, per-pin serial, hashed) or a provider
    /// session (rotating gateways). `None`: the node's shared, session-less connections.
    pub scope: Option<Arc<str>>,
}

impl ExitKey {
    /// The node's shared, session-less key.
    pub fn direct(node: Arc<ExitNode>) -> Self {
        ExitKey { node, scope: None }
    }
    /// Provider session id to present, if the node is a rotating gateway.
    pub fn provider_session(&self) -> Option<&str> {
        self.node
            .session_template
            .as_ref()
            .and(self.scope.as_deref())
    }
}

impl PartialEq for ExitKey {
    fn eq(&self, o: &Self) -> bool {
        self.node.index == o.node.index && self.scope == o.scope
    }
}
impl Eq for ExitKey {}
impl Hash for ExitKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.node.index.hash(h);
        self.scope.hash(h);
    }
}
impl PartialOrd for ExitKey {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for ExitKey {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.node.index, &self.scope).cmp(&(o.node.index, &o.scope))
    }
}
impl std::fmt::Debug for ExitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.scope {
            Some(s) => write!(f, "{}[{}]", self.node.label, s),
            None => f.write_str(&self.node.label),
        }
    }
}

/// Strict or flex sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionMode {
    /// A session whose exit dies is moved to another exit (`X-Edgepool-Session-Renewed: 1`).
    Flex,
    /// A session whose exit dies fails with 502 `session_exit_lost`.
    Strict,
}

/// How a worker session's exit is chosen when its pin starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionChoice {
    /// The healthy node with the fewest pins and open connections (ties at random): the best
    /// spread for one gateway, but another gateway would choose differently.
    #[default]
    LeastLoaded,
    /// Rendezvous (highest-random-weight) hashing of the session over the pool's healthy
    /// nodes, keyed by the fleet key (derived from the shared CA): every gateway that shares
    /// the CA and the pool's node list puts a session on the same exit, with no shared state.
    /// Lifetimes follow wall-clock periods (per-session phase), each period the next node of
    /// the session's order, so gateways agree on when and where a session moves too.
    Rendezvous,
}

/// Router settings.
#[derive(Clone, Debug)]
pub struct ExitSettings {
    /// Sticky window for session-less traffic per (target, pool).
    pub sticky_window: Duration,
    /// Default session lifetime.
    pub session_lifetime: Duration,
    /// A session unused this long is forgotten.
    pub session_idle: Duration,
    /// Lifetimes are scaled by a random factor in `[1 - jitter, 1 + jitter]`.
    pub jitter: f64,
    /// Strict or flex.
    pub session_mode: SessionMode,
    /// Consecutive failures that open a node's circuit.
    pub circuit_failures: u32,
    /// First open period.
    pub circuit_open_min: Duration,
    /// Longest open period (the backoff doubles up to it).
    pub circuit_open_max: Duration,
    /// Whether workers may pick the `direct` pool (leave from edgepool's own address).
    pub allow_direct: bool,
    /// How a session's exit is chosen.
    pub session_choice: SessionChoice,
    /// The key of rendezvous choices and of their isolation scopes: the same on every gateway
    /// of a fleet (derived from the shared CA). `None`: a fixed key (tests; a lone gateway).
    pub fleet_key: Option<[u8; 32]>,
}

/// A pool as configured.
#[derive(Clone, Debug)]
pub struct PoolSpec {
    /// Name.
    pub name: String,
    /// Nodes.
    pub nodes: Vec<ExitSpec>,
    /// Rotating-gateway username template.
    pub session_template: Option<String>,
    /// Per-node connection budget.
    pub max_connections_per_node: usize,
}

struct PoolEntry {
    name: Arc<str>,
    nodes: Vec<usize>,
    gateway: bool,
}

/// A pinned exit for a session or a window.
#[derive(Clone, Debug)]
struct Pin {
    node: usize,
    pool: usize,
    expires: Instant,
    last_used: Instant,
    idle: Duration,
    scope: Option<Arc<str>>,
}

#[derive(Default)]
struct RouterState {
    /// (worker token, session id) → pin.
    sessions: HashMap<(Arc<str>, Arc<str>), Pin>,
    /// (target, pool index) → pin.
    windows: HashMap<(Arc<str>, usize), Pin>,
    /// Last node used by forced rotation per (target, pool).
    last_forced: HashMap<(Arc<str>, usize), usize>,
    rng: u64,
    seq: u64,
}

impl RouterState {
    fn next_rand(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// What a request asks of the router.
pub struct RouteQuery<'a> {
    /// `host:port` of the target.
    pub target: &'a str,
    /// The worker's token (session scope; empty when anonymous).
    pub token: &'a str,
    /// The worker's options.
    pub options: &'a WorkerOptions,
    /// Nodes that failed for this request already.
    pub exclude: &'a [usize],
    /// Whether `key` holds an idle connection to the target (reuse-aware choice).
    pub warm: &'a dyn Fn(&ExitKey) -> bool,
}

/// The router's answer.
#[derive(Clone, Debug)]
pub struct Route {
    /// Node and scope: goes into the pool key.
    pub key: ExitKey,
    /// Why a cold key would need a connection (rotation, session change) instead of
    /// `cold_key`.
    pub cold_reason: Option<NewReason>,
    /// The session was moved to another exit (flex).
    pub renewed: bool,
    /// `rotate-request` traffic.
    pub forced: bool,
}

/// Why an exit node URL was refused. The text never echoes credentials (`url`'s parse errors
/// name no part of the input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExitSpecError {
    /// Not a URL at all.
    #[error("not a proxy URL ({0}); expected direct, http://[user:pass@]host:port or socks5://[user:pass@]host:port")]
    NotAUrl(url::ParseError),
    /// `https://`: TLS to the proxy.
    #[error("https:// proxies (TLS to the proxy) are not supported; use http:// or socks5://")]
    Https,
    /// Another scheme.
    #[error("unsupported proxy scheme {0}://; use http:// or socks5://")]
    Scheme(String),
    /// No host.
    #[error("the proxy URL has no host")]
    NoHost,
    /// No explicit port (the scheme is kept for the example).
    #[error("the proxy URL has no port; write it, e.g. {0}://host:3128")]
    NoPort(String),
    /// A path or a query.
    #[error("a proxy URL has no path or query")]
    PathOrQuery,
    /// User or password not valid percent-encoded UTF-8.
    #[error("the proxy credentials are not valid percent-encoded UTF-8")]
    Credentials,
}

/// Why the exit pools could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExitsError {
    /// A node URL of a pool was refused.
    #[error("pool {pool}: {source}")]
    Node {
        /// The pool.
        pool: String,
        /// Why.
        source: ExitSpecError,
    },
    /// A pool named `direct`.
    #[error("\"direct\" is the built-in pool; name yours differently")]
    DirectIsBuiltIn,
    /// One node twice in a pool.
    #[error("pool {pool:?} lists the node {endpoint} twice")]
    DuplicateNode {
        /// The pool.
        pool: String,
        /// The node's `host:port`.
        endpoint: String,
    },
    /// `exits.default_pool` names no pool.
    #[error("exits.default_pool {0:?} is not a configured pool")]
    UnknownDefaultPool(String),
}

/// Why no route.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The worker named a pool that does not exist.
    #[error("exit pool {0:?} does not exist (configured: {1})")]
    UnknownPool(String, String),
    /// The worker asked for `direct` while exits are configured and direct egress is off.
    #[error("direct egress (from edgepool's own address) is disabled while exit pools are configured; set exits.allow_direct = true to allow -pool-direct")]
    DirectNotAllowed,
    /// Every node of the pool is down or excluded.
    #[error("no healthy exit in pool {pool:?}: {why}")]
    NoHealthyExit {
        /// Pool.
        pool: String,
        /// Detail.
        why: String,
        /// When one could be tried again.
        retry_after: Duration,
    },
    /// A strict session's exit is gone.
    #[error("session {session:?} is strict and its exit {exit} is unavailable ({why})")]
    SessionExitLost {
        /// Session id.
        session: String,
        /// Exit label.
        exit: String,
        /// Detail.
        why: String,
    },
}

/// All exit nodes and the routing state.
pub struct Exits {
    nodes: Vec<Arc<ExitNode>>,
    pools: Vec<PoolEntry>,
    default_pool: usize,
    settings: ExitSettings,
    state: Mutex<RouterState>,
    hash_key: std::collections::hash_map::RandomState,
    /// Isolation scopes whose pin ended: their connections can never be used again.
    ended: Mutex<Vec<Arc<str>>>,
    /// HMAC-SHA256 under the fleet key: rendezvous scores and session scopes.
    fleet: ring::hmac::Key,
    /// A monotonic instant and the Unix time (seconds) it was: wall-clock session periods read
    /// through the runtime's clock (paused and advanced in tests).
    wall_anchor: (Instant, u64),
}

impl Exits {
    /// Builds the node table. `pools` in configuration order; `default_pool` names the pool
    /// for workers that name none (None: the first pool, or direct if there is none). The
    /// implicit `direct` pool always exists (node 0).
    pub fn new(
        pools: &[PoolSpec],
        default_pool: Option<&str>,
        settings: ExitSettings,
    ) -> Result<Exits, ExitsError> {
        let mut nodes = vec![Arc::new(Self::node(
            0,
            DIRECT,
            DIRECT.into(),
            ExitSpec::parse(DIRECT).expect("direct parses"),
            None,
            None,
            &settings,
        ))];
        let mut entries = Vec::new();
        entries.push(PoolEntry {
            name: DIRECT.into(),
            nodes: vec![0],
            gateway: false,
        });
        for p in pools {
            if p.name == DIRECT {
                return Err(ExitsError::DirectIsBuiltIn);
            }
            let mut idx: Vec<usize> = Vec::new();
            for (k, spec) in p.nodes.iter().enumerate() {
                let i = nodes.len();
                // `pool/N` (1-based): stable, and free of addresses and credentials, so it can
                // be a metric label and a response header.
                let label = format!("{}/{}", p.name, k + 1);
                if idx.iter().any(|j| nodes[*j].spec == *spec) {
                    return Err(ExitsError::DuplicateNode {
                        pool: p.name.clone(),
                        endpoint: spec.endpoint(),
                    });
                }
                let budget = (spec.kind != ExitKind::Direct).then_some(p.max_connections_per_node);
                nodes.push(Arc::new(Self::node(
                    i,
                    &p.name,
                    label,
                    spec.clone(),
                    p.session_template.as_deref().map(Arc::from),
                    budget,
                    &settings,
                )));
                idx.push(i);
            }
            entries.push(PoolEntry {
                name: p.name.as_str().into(),
                nodes: idx,
                gateway: p.session_template.is_some(),
            });
        }
        let default_pool = match default_pool {
            Some(name) => entries
                .iter()
                .position(|e| &*e.name == name)
                .ok_or_else(|| ExitsError::UnknownDefaultPool(name.to_string()))?,
            None => usize::from(entries.len() > 1),
        };
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed);
        Ok(Exits {
            nodes,
            pools: entries,
            default_pool,
            state: Mutex::new(RouterState {
                rng: seed,
                ..Default::default()
            }),
            hash_key: Default::default(),
            ended: Default::default(),
            fleet: ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                &settings.fleet_key.unwrap_or([0; 32]),
            ),
            wall_anchor: (
                Instant::now(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            ),
            settings,
        })
    }

    fn node(
        index: usize,
        pool: &str,
        label: String,
        spec: ExitSpec,
        session_template: Option<Arc<str>>,
        budget: Option<usize>,
        settings: &ExitSettings,
    ) -> ExitNode {
        ExitNode {
            policy: CircuitPolicy {
                failures: settings.circuit_failures,
                open_min: settings.circuit_open_min,
                open_max: settings.circuit_open_max,
            },
            index,
            label: label.into(),
            pool: pool.into(),
            spec,
            session_template,
            budget,
            permits: budget.map(|b| Arc::new(tokio::sync::Semaphore::new(b))),
            circuit: Mutex::new(Circuit {
                state: CircuitState::Closed,
                failures: 0,
                until: Instant::now(),
                backoff: Duration::ZERO,
                probing: false,
                probe_at: Instant::now(),
                last_error: None,
                opened: 0,
            }),
            unhealthy: AtomicBool::new(false),
            pins: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            counters: NodeCounters::default(),
        }
    }

    /// Every node (index 0 is `direct`).
    pub fn nodes(&self) -> &[Arc<ExitNode>] {
        &self.nodes
    }

    /// The direct node.
    pub fn direct(&self) -> &Arc<ExitNode> {
        &self.nodes[0]
    }

    /// Name of the default pool.
    pub fn default_pool(&self) -> &str {
        &self.pools[self.default_pool].name
    }

    /// Pool names, configuration order (`direct` first when implicit).
    pub fn pool_names(&self) -> Vec<String> {
        self.pools.iter().map(|p| p.name.to_string()).collect()
    }

    /// True when only the direct node exists (no exits configured).
    pub fn only_direct(&self) -> bool {
        self.nodes.len() == 1
    }

    fn pool_index(&self, name: Option<&str>) -> Result<usize, RouteError> {
        match name {
            None => Ok(self.default_pool),
            Some(DIRECT) if !self.settings.allow_direct && self.default_pool != 0 => {
                Err(RouteError::DirectNotAllowed)
            }
            Some(n) => self
                .pools
                .iter()
                .position(|p| &*p.name == n)
                .ok_or_else(|| {
                    RouteError::UnknownPool(n.to_string(), self.pool_names().join(", "))
                }),
        }
    }

    fn jittered(&self, st: &mut RouterState, d: Duration) -> Duration {
        let j = self.settings.jitter;
        if j <= 0.0 {
            return d;
        }
        let r = (st.next_rand() >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        d.mul_f64((1.0 - j + 2.0 * j * r).max(0.0))
    }

    /// Chooses a node of `pool` for a new session or window: healthy, not excluded, not
    /// `avoid` when another is possible; prefers nodes with an idle connection to the target
    /// (`warm`) and then the least loaded (pins, open connections against budget); ties
    /// broken at random.
    fn choose(
        &self,
        st: &mut RouterState,
        pool: usize,
        exclude: &[usize],
        avoid: Option<usize>,
        warm: Option<&[usize]>,
        now: Instant,
    ) -> Result<usize, RouteError> {
        let entry = &self.pools[pool];
        let mut eligible: Vec<usize> = entry
            .nodes
            .iter()
            .copied()
            .filter(|i| !exclude.contains(i))
            .filter(|i| self.nodes[*i].admissible(now))
            .collect();
        if eligible.is_empty() {
            let retry = entry
                .nodes
                .iter()
                .map(|i| self.nodes[*i].retry_at(now))
                .min()
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(1));
            let why = if entry.nodes.iter().all(|i| exclude.contains(i)) {
                "every node failed for this request".to_string()
            } else {
                "every node's circuit is open after repeated failures".to_string()
            };
            return Err(RouteError::NoHealthyExit {
                pool: entry.name.to_string(),
                why,
                retry_after: retry.max(Duration::from_secs(1)),
            });
        }
        if eligible.len() > 1 {
            if let Some(a) = avoid {
                eligible.retain(|i| *i != a);
            }
        }
        // Below budget first.
        let headroom: Vec<usize> = eligible
            .iter()
            .copied()
            .filter(|i| {
                let n = &self.nodes[*i];
                n.budget.is_none_or(|b| n.open.load(Ordering::Relaxed) < b)
            })
            .collect();
        if !headroom.is_empty() {
            eligible = headroom;
        }
        if let Some(warm) = warm {
            if !entry.gateway {
                let w: Vec<usize> = eligible
                    .iter()
                    .copied()
                    .filter(|i| warm.contains(i))
                    .collect();
                if !w.is_empty() {
                    eligible = w;
                }
            }
        }
        let load = |i: usize| {
            let n = &self.nodes[i];
            let pins = n.pins.load(Ordering::Relaxed) as u64;
            let open = n.open.load(Ordering::Relaxed) as u64;
            (pins, open)
        };
        let best = eligible.iter().map(|i| load(*i)).min().expect("non-empty");
        let tied: Vec<usize> = eligible.into_iter().filter(|i| load(*i) == best).collect();
        let pick = tied[(st.next_rand() % tied.len() as u64) as usize];
        Ok(pick)
    }

    /// The pool's next usable node after `last` in configuration order (forced rotation).
    fn next_in_turn(
        &self,
        pool: usize,
        last: Option<usize>,
        exclude: &[usize],
        now: Instant,
    ) -> Result<usize, RouteError> {
        let nodes = &self.pools[pool].nodes;
        let start = last
            .and_then(|l| nodes.iter().position(|n| *n == l))
            .map_or(0, |p| p + 1);
        let usable = |i: usize| !exclude.contains(&i) && self.nodes[i].admissible(now);
        let below_budget = |i: usize| {
            let n = &self.nodes[i];
            n.budget.is_none_or(|b| n.open.load(Ordering::Relaxed) < b)
        };
        let order = (0..nodes.len()).map(|k| nodes[(start + k) % nodes.len()]);
        if let Some(i) = order.clone().find(|i| usable(*i) && below_budget(*i)) {
            return Ok(i);
        }
        if let Some(i) = order.clone().find(|i| usable(*i)) {
            return Ok(i);
        }
        // Nothing usable: let `choose` explain why and when to retry.
        let mut st = RouterState::default();
        self.choose(&mut st, pool, exclude, None, None, now)
    }

    #[allow(clippy::too_many_arguments)]
    fn pin(
        &self,
        st: &mut RouterState,
        node: usize,
        pool: usize,
        life: Duration,
        idle: Duration,
        scope: Option<Arc<str>>,
        now: Instant,
    ) -> Pin {
        self.nodes[node].pins.fetch_add(1, Ordering::Relaxed);
        let life = self.jittered(st, life);
        Pin {
            node,
            pool,
            expires: now + life,
            last_used: now,
            idle,
            scope,
        }
    }

    fn unpin(&self, p: &Pin) {
        self.nodes[p.node].pins.fetch_sub(1, Ordering::Relaxed);
        self.scope_ended(p.scope.as_ref());
    }

    /// Notes that nothing will use `scope` again (its pin ended).
    fn scope_ended(&self, scope: Option<&Arc<str>>) {
        if let Some(s) = scope {
            let mut e = self.ended.lock();
            if e.len() < 100_000 {
                e.push(s.clone());
            }
        }
    }

    /// Takes the isolation scopes that ended since the last call (the gateway closes their
    /// idle connections).
    pub fn take_ended_scopes(&self) -> Vec<Arc<str>> {
        std::mem::take(&mut *self.ended.lock())
    }

    fn gateway_scope(&self, st: &mut RouterState, tag: &str) -> Arc<str> {
        st.seq += 1;
        let r = st.next_rand();
        format!("ep{tag}{:x}{:06x}", st.seq, r & 0xff_ffff).into()
    }

    /// Routes one request. See the module docs for the policy.
    pub fn route(&self, q: &RouteQuery<'_>) -> Result<Route, RouteError> {
        let now = Instant::now();
        let pool = self.pool_index(q.options.pool.as_deref())?;
        let gateway = self.pools[pool].gateway;
        // One node and nothing to remember (no session, no forced rotation, no provider
        // sessions): the route is that node — no router lock and no window on the hot path of
        // the default, direct-only setup. A node that cannot take the request falls through to
        // the general path, which says why.
        let only = &self.pools[pool].nodes;
        if only.len() == 1
            && !gateway
            && q.options.session.is_none()
            && q.options.rotate != Some(Rotate::Request)
        {
            let node = &self.nodes[only[0]];
            if !q.exclude.contains(&node.index) && node.admit(now) {
                return Ok(Route {
                    key: ExitKey::direct(node.clone()),
                    cold_reason: None,
                    renewed: false,
                    forced: false,
                });
            }
        }
        // Lock order: node circuits are locked under the router lock, never the other way
        // round, and the pool's lock is never taken under the router's (see the window path).
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if q.options.rotate == Some(Rotate::Request) {
            // A new exit for every request, round-robin over the pool's usable nodes per
            // target (every node in turn: most IP diversity, and each node's connection to
            // the target is warm again on the next lap); for a rotating gateway, a new
            // provider session.
            let fk = (Arc::<str>::from(q.target), pool);
            let last = st.last_forced.get(&fk).copied();
            let node = self.next_in_turn(pool, last, q.exclude, now)?;
            self.nodes[node].admit(now);
            st.last_forced.insert(fk, node);
            let scope = if gateway {
                Some(self.gateway_scope(st, "r"))
            } else {
                q.options
                    .session
                    .as_deref()
                    .map(|s| self.session_scope(q.token, s, FORCED_SERIAL))
            };
            return Ok(Route {
                key: ExitKey {
                    node: self.nodes[node].clone(),
                    scope,
                },
                cold_reason: Some(NewReason::ForcedRotation),
                renewed: false,
                forced: true,
            });
        }
        if let Some(id) = q.options.session.as_deref() {
            return self.route_session(st, q, pool, id, now);
        }
        // Session-less: the sticky window of (target, pool).
        let wk = (Arc::<str>::from(q.target), pool);
        if let Some(r) = self.window_hit(st, &wk, q.exclude, now) {
            return Ok(r);
        }
        // A new window: learn which nodes hold an idle connection to the target with the
        // router lock released — the router never calls into the pool under its own lock —
        // then take it again (another request may have opened the window meanwhile).
        drop(guard);
        let warm_nodes: Vec<usize> = if gateway {
            Vec::new()
        } else {
            self.pools[pool]
                .nodes
                .iter()
                .copied()
                .filter(|i| (q.warm)(&ExitKey::direct(self.nodes[*i].clone())))
                .collect()
        };
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if let Some(r) = self.window_hit(st, &wk, q.exclude, now) {
            return Ok(r);
        }
        let mut reason = None;
        let mut avoid = None;
        if let Some(p) = st.windows.get(&wk) {
            let usable = !q.exclude.contains(&p.node) && self.nodes[p.node].admissible(now);
            // The window ended (rotate to another node) or its node is down (move).
            reason = Some(if usable {
                NewReason::Rotation
            } else {
                NewReason::SessionChange
            });
            avoid = Some(p.node);
            let p = st.windows.remove(&wk).expect("present");
            self.unpin(&p);
        }
        let node = self.choose(st, pool, q.exclude, avoid, Some(&warm_nodes), now)?;
        self.nodes[node].admit(now);
        let scope = gateway.then(|| self.gateway_scope(st, "w"));
        let window = self.settings.sticky_window;
        let p = self.pin(st, node, pool, window, window, scope.clone(), now);
        st.windows.insert(wk, p);
        Ok(Route {
            key: ExitKey {
                node: self.nodes[node].clone(),
                scope,
            },
            cold_reason: reason,
            renewed: false,
            forced: false,
        })
    }

    /// The route of a live sticky window of `wk` whose node can take the request, if any.
    fn window_hit(
        &self,
        st: &mut RouterState,
        wk: &(Arc<str>, usize),
        exclude: &[usize],
        now: Instant,
    ) -> Option<Route> {
        let p = st.windows.get_mut(wk)?;
        let node = &self.nodes[p.node];
        if exclude.contains(&p.node) || !node.admissible(now) || now >= p.expires {
            return None;
        }
        p.last_used = now;
        node.admit(now);
        Some(Route {
            key: ExitKey {
                node: node.clone(),
                scope: p.scope.clone(),
            },
            cold_reason: None,
            renewed: false,
            forced: false,
        })
    }

    fn route_session(
        &self,
        st: &mut RouterState,
        q: &RouteQuery<'_>,
        pool: usize,
        id: &str,
        now: Instant,
    ) -> Result<Route, RouteError> {
        let sk: (Arc<str>, Arc<str>) = (q.token.into(), id.into());
        let life = q
            .options
            .session_minutes
            .map(|m| Duration::from_secs(u64::from(m) * 60))
            .unwrap_or(self.settings.session_lifetime);
        let mut reason = NewReason::NewSession;
        let mut renewed = false;
        let mut avoid = None;
        if let Some(p) = st.sessions.get_mut(&sk) {
            let node = &self.nodes[p.node];
            let alive = now < p.expires && now.saturating_duration_since(p.last_used) < p.idle;
            let same_pool = p.pool == pool;
            let node_ok = !q.exclude.contains(&p.node) && node.admissible(now);
            if alive && same_pool && node_ok {
                p.last_used = now;
                node.admit(now);
                return Ok(Route {
                    key: ExitKey {
                        node: node.clone(),
                        scope: p.scope.clone(),
                    },
                    cold_reason: None,
                    renewed: false,
                    forced: false,
                });
            }
            // A session that ended moves on: its next pin avoids the old exit (a new IP is
            // what "session_change" promises), like a window that rotates.
            avoid = Some(p.node);
            if alive && same_pool {
                if self.settings.session_mode == SessionMode::Strict {
                    return Err(RouteError::SessionExitLost {
                        session: id.to_string(),
                        exit: node.label.to_string(),
                        why: "its circuit is open or it failed for this request".into(),
                    });
                }
                renewed = true;
            }
            reason = NewReason::SessionChange;
            let p = st.sessions.remove(&sk).expect("present");
            self.unpin(&p);
        }
        let (node, scope, p) = if self.settings.session_choice == SessionChoice::Rendezvous {
            let (node, scope, ends) = self.rendezvous(pool, q, id, life, now)?;
            self.nodes[node].pins.fetch_add(1, Ordering::Relaxed);
            let p = Pin {
                node,
                pool,
                expires: ends,
                last_used: now,
                idle: self.settings.session_idle,
                scope: Some(scope.clone()),
            };
            (node, scope, p)
        } else {
            let node = self.choose(st, pool, q.exclude, avoid, None, now)?;
            st.seq += 1;
            let scope = self.session_scope(&sk.0, &sk.1, st.seq);
            let idle = self.settings.session_idle;
            let p = self.pin(st, node, pool, life, idle, Some(scope.clone()), now);
            (node, scope, p)
        };
        self.nodes[node].admit(now);
        st.sessions.insert(sk, p);
        Ok(Route {
            key: ExitKey {
                node: self.nodes[node].clone(),
                scope: Some(scope),
            },
            cold_reason: Some(reason),
            renewed,
            forced: false,
        })
    }

    /// The rendezvous choice for a session starting a pin at `now`: the exit, the scope of the
    /// pin, and when the pin ends. Nothing here depends on this gateway's history, only on the
    /// fleet key, the pool's nodes, the worker's token and session id, and the wall-clock
    /// period — so every gateway of a fleet gives the same answer:
    /// - the session ranks the pool's nodes by HMAC(fleet key, pool, token, id, node
    ///   identity), highest first (rendezvous hashing: each session its own order, uniform
    ///   over sessions, the same on every gateway whatever its config's order);
    /// - the period is `life` long, shifted by a per-session phase (sessions do not all move
    ///   at once), numbered from the Unix epoch; period p takes the node at position p mod n
    ///   of that order, so each period's exit differs from the last one's;
    /// - a node that is down or excluded is skipped, taking the next in the session's order:
    ///   a failed exit moves only its own sessions, each to the same place on every gateway.
    ///
    /// The scope (the pool key's isolation and a rotating gateway's provider session) is
    /// derived the same way, so a provider session is shared by the fleet too; it changes with
    /// the period and the node.
    fn rendezvous(
        &self,
        pool: usize,
        q: &RouteQuery<'_>,
        id: &str,
        life: Duration,
        now: Instant,
    ) -> Result<(usize, Arc<str>, Instant), RouteError> {
        let life_s = life.as_secs().max(1);
        let wall = self.wall_anchor.1 + now.saturating_duration_since(self.wall_anchor.0).as_secs();
        let pool_name = &*self.pools[pool].name;
        let phase = self.fleet_hash(&[
            b"phase",
            pool_name.as_bytes(),
            q.token.as_bytes(),
            id.as_bytes(),
        ]) % life_s;
        let shifted = wall + phase;
        let period = shifted / life_s;
        let ends = now + Duration::from_secs(life_s - shifted % life_s);
        // The session's own order of the pool's nodes (rendezvous scores, highest first): the
        // same on every gateway, whatever its config's order, and independent of the period.
        let mut ranked: Vec<usize> = self.pools[pool].nodes.clone();
        ranked.sort_by_cached_key(|i| {
            let score = self.fleet_hash(&[
                b"node",
                pool_name.as_bytes(),
                q.token.as_bytes(),
                id.as_bytes(),
                self.nodes[*i].spec.identity().as_bytes(),
            ]);
            std::cmp::Reverse(score)
        });
        // Period p starts at position p (mod the pool's size) of that order, so consecutive
        // periods start on different nodes; down or excluded nodes are skipped, in order.
        let usable = |i: &usize| !q.exclude.contains(i) && self.nodes[*i].admissible(now);
        let first = (period % ranked.len() as u64) as usize;
        let node = (0..ranked.len())
            .map(|k| ranked[(first + k) % ranked.len()])
            .find(|i| usable(i));
        let Some(node) = node else {
            // Nothing usable: `choose` says why and when to retry.
            let mut st = RouterState::default();
            return Err(self
                .choose(&mut st, pool, q.exclude, None, None, now)
                .err()
                .unwrap_or_else(|| RouteError::NoHealthyExit {
                    pool: pool_name.to_string(),
                    why: "no node is usable".into(),
                    retry_after: Duration::from_secs(1),
                }));
        };
        let tag = self.fleet_hash(&[
            b"scope",
            pool_name.as_bytes(),
            q.token.as_bytes(),
            id.as_bytes(),
            &period.to_be_bytes(),
            self.nodes[node].spec.identity().as_bytes(),
        ]);
        Ok((node, format!("f{tag:016x}").into(), ends))
    }

    /// The first 8 bytes of HMAC-SHA256(fleet key, parts), each part length-prefixed so no
    /// two different part lists hash alike.
    fn fleet_hash(&self, parts: &[&[u8]]) -> u64 {
        let mut ctx = ring::hmac::Context::with_key(&self.fleet);
        for p in parts {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        let tag = ctx.sign();
        let mut b = [0u8; 8];
        b.copy_from_slice(&tag.as_ref()[..8]);
        u64::from_be_bytes(b)
    }

    /// The isolation scope of a worker session: a keyed hash (per-process random key), so
    /// tokens and session ids never appear in pool keys, logs or provider usernames. `serial`
    /// is unique per pin (a session that ended and starts again under the same id never
    /// inherits the old one's connections or provider session); [`FORCED_SERIAL`] is the
    /// stable scope of a session's forced-rotation traffic.
    fn session_scope(&self, token: &str, id: &str, serial: u64) -> Arc<str> {
        use std::hash::BuildHasher;
        let mut h = self.hash_key.build_hasher();
        token.hash(&mut h);
        id.hash(&mut h);
        let a = h.finish();
        serial.hash(&mut h);
        let b = h.finish();
        format!("s{a:016x}{:08x}", b as u32).into()
    }

    /// Forgets expired sessions and windows (called periodically).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut st = self.state.lock();
        let mut gone = Vec::new();
        st.sessions.retain(|_, p| {
            let keep = now < p.expires && now.saturating_duration_since(p.last_used) < p.idle;
            if !keep {
                gone.push(p.clone());
            }
            keep
        });
        st.windows.retain(|_, p| {
            // Keep expired windows a while: the next request needs to know it rotates.
            let keep = now.saturating_duration_since(p.last_used)
                < p.idle.max(Duration::from_secs(60)) * 2;
            if !keep {
                gone.push(p.clone());
            }
            keep
        });
        if st.last_forced.len() > 100_000 {
            st.last_forced.clear();
        }
        drop(st);
        for p in &gone {
            self.unpin(p);
        }
    }

    /// Live sessions and windows.
    pub fn pinned(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.sessions.len(), st.windows.len())
    }

    /// Pins currently on `node`.
    pub fn pins_of(&self, node: &ExitNode) -> usize {
        node.pins.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ExitLabels {
    pool: String,
    exit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ExitReusedLabels {
    pool: String,
    exit: String,
    reused: String,
}

/// One exit node's counters (handles into the labelled families).
#[derive(Clone)]
pub struct ExitHandles {
    /// Handle into its family.
    pub requests_reused: Counter,
    /// Handle into its family.
    pub requests_new: Counter,
    /// Handle into its family.
    pub opened: Counter,
    /// Handle into its family.
    pub forced: Counter,
}

/// Per exit node: requests, connections opened, forced rotations, circuit state. Counters
/// go through per-node handles looked up once ([`ExitMetrics::set_nodes`]).
pub struct ExitMetrics {
    requests: Family<ExitReusedLabels, Counter>,
    opened: Family<ExitLabels, Counter>,
    forced: Family<ExitLabels, Counter>,
    state: Family<ExitLabels, Gauge>,
    /// Per-exit counter handles, looked up once per node (index = node index): the request
    /// path touches no label set for exits.
    handles: std::sync::OnceLock<Vec<ExitHandles>>,
}

impl ExitMetrics {
    /// Creates the families and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = ExitMetrics {
            requests: Family::default(),
            opened: Family::default(),
            forced: Family::default(),
            state: Family::default(),
            handles: std::sync::OnceLock::new(),
        };
        registry.register(
            "edgepool_exit_requests",
            "Upstream requests per exit node (pool/N) and pool, by whether they reused a warm connection",
            m.requests.clone(),
        );
        registry.register(
            "edgepool_exit_connections_opened",
            "New upstream connections per exit node",
            m.opened.clone(),
        );
        registry.register(
            "edgepool_exit_forced_rotation_requests",
            "Requests that asked for a new exit each time (rotate-request), per exit node",
            m.forced.clone(),
        );
        registry.register(
            "edgepool_exit_circuit_state",
            "Exit node circuit: 0 closed (healthy), 1 half-open (probing), 2 open (down)",
            m.state.clone(),
        );
        m
    }

    /// Looks up every node's handles once (their series exist from then on, at 0).
    pub fn set_nodes(&self, nodes: &[Arc<ExitNode>]) {
        if nodes.iter().enumerate().all(|(i, n)| n.index == i) {
            let _ = self
                .handles
                .set(nodes.iter().map(|n| self.make_handles(n)).collect());
        }
    }

    fn make_handles(&self, n: &ExitNode) -> ExitHandles {
        let (pool, exit) = (n.pool.to_string(), n.label.to_string());
        let requests = |reused: &str| {
            self.requests
                .get_or_create(&ExitReusedLabels {
                    pool: pool.clone(),
                    exit: exit.clone(),
                    reused: reused.into(),
                })
                .clone()
        };
        let labels = ExitLabels {
            pool: pool.clone(),
            exit: exit.clone(),
        };
        ExitHandles {
            requests_reused: requests("1"),
            requests_new: requests("0"),
            opened: self.opened.get_or_create(&labels).clone(),
            forced: self.forced.get_or_create(&labels).clone(),
        }
    }

    /// `f` with `node`'s counters: the registered handles, or (a node not registered, as in
    /// unit tests) handles looked up now.
    pub fn with<R>(&self, node: &ExitNode, f: impl FnOnce(&ExitHandles) -> R) -> R {
        match self.handles.get().and_then(|v| v.get(node.index)) {
            Some(h) => f(h),
            None => f(&self.make_handles(node)),
        }
    }

    /// Publishes the nodes' circuit states (0 closed, 1 half-open, 2 open).
    pub fn record_states(&self, exits: &Exits) {
        for n in exits.nodes() {
            let v = match n.state() {
                CircuitState::Closed => 0,
                CircuitState::HalfOpen => 1,
                CircuitState::Open => 2,
            };
            self.state
                .get_or_create(&ExitLabels {
                    pool: n.pool.to_string(),
                    exit: n.label.to_string(),
                })
                .set(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_brackets_ipv6_and_spells_every_port() {
        assert_eq!(authority("example.com", 443), "example.com:443");
        assert_eq!(authority("10.0.0.1", 0), "10.0.0.1:0");
        assert_eq!(authority("::1", 8080), "[::1]:8080");
        assert_eq!(authority("2001:db8::7", 65535), "[2001:db8::7]:65535");
        for port in [1, 9, 10, 99, 100, 999, 1000, 9999, 10000] {
            assert_eq!(authority("h", port), format!("h:{port}"));
        }
    }

    fn settings() -> ExitSettings {
        ExitSettings {
            sticky_window: Duration::from_secs(120),
            session_lifetime: Duration::from_secs(600),
            session_idle: Duration::from_secs(60),
            jitter: 0.0,
            session_mode: SessionMode::Flex,
            circuit_failures: 3,
            circuit_open_min: Duration::from_secs(2),
            circuit_open_max: Duration::from_secs(60),
            allow_direct: true,
            session_choice: SessionChoice::LeastLoaded,
            fleet_key: None,
        }
    }

    fn pool(name: &str, n: usize, template: Option<&str>) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            nodes: (0..n)
                .map(|i| ExitSpec::parse(&format!("http://u:p@10.0.0.{}:3128", i + 1)).unwrap())
                .collect(),
            session_template: template.map(str::to_string),
            max_connections_per_node: 100,
        }
    }

    fn exits(n: usize, s: ExitSettings) -> Exits {
        Exits::new(&[pool("dc", n, None)], None, s).unwrap()
    }

    fn cold(_: &ExitKey) -> bool {
        false
    }

    fn route(x: &Exits, target: &str, token: &str, o: &WorkerOptions) -> Result<Route, RouteError> {
        route_ex(x, target, token, o, &[])
    }

    fn route_ex(
        x: &Exits,
        target: &str,
        token: &str,
        o: &WorkerOptions,
        exclude: &[usize],
    ) -> Result<Route, RouteError> {
        x.route(&RouteQuery {
            target,
            token,
            options: o,
            exclude,
            warm: &cold,
        })
    }

    fn session(id: &str) -> WorkerOptions {
        WorkerOptions {
            session: Some(id.into()),
            ..Default::default()
        }
    }

    #[test]
    fn node_urls_parse_and_errors_never_echo_credentials() {
        let s = ExitSpec::parse("http://us%40er:p%3Ass@proxy.example:3128").unwrap();
        assert_eq!(s.kind, ExitKind::Http);
        assert_eq!((s.host.as_str(), s.port), ("proxy.example", 3128));
        let a = s.auth.as_ref().unwrap();
        assert_eq!(
            (a.username.as_str(), a.password.as_str()),
            ("us@er", "p:ss")
        );
        assert!(
            !format!("{s:?}").contains("p:ss"),
            "Debug hides credentials"
        );
        let s = ExitSpec::parse("socks5h://[::1]:1080").unwrap();
        assert_eq!(
            (s.kind, s.host.as_str(), s.auth.is_none()),
            (ExitKind::Socks5, "::1", true)
        );
        assert_eq!(s.endpoint(), "[::1]:1080");
        assert_eq!(ExitSpec::parse("DIRECT").unwrap().kind, ExitKind::Direct);
        assert_eq!(
            ExitSpec::parse("http://u:p@gw.example:80").unwrap().port,
            80
        );
        // No guessed ports: 80 for an http:// proxy would hand its credentials to a web server.
        for portless in [
            "http://gw.example",
            "http://u:secretpw@gw.example",
            "http://u:secretpw@gw.example/",
            "socks5://gw.example",
            "http://[::1]",
            "http://gw.example:",
        ] {
            let e = ExitSpec::parse(portless).unwrap_err();
            assert!(matches!(e, ExitSpecError::NoPort(_)), "{portless}: {e}");
            assert!(!e.to_string().contains("secretpw"), "{portless}: {e}");
        }
        assert_eq!(
            ExitSpec::parse("socks5://u:p@[::1]:1080/").unwrap().port,
            1080
        );
        for bad in [
            "https://u:secretpw@h:1",
            "ftp://u:secretpw@h:1",
            "http://u:secretpw@h:1/path",
            "not a url secretpw",
        ] {
            let e = ExitSpec::parse(bad).unwrap_err().to_string();
            assert!(!e.contains("secretpw"), "{bad}: {e}");
        }
    }

    #[test]
    fn labels_name_pool_and_endpoint_and_duplicates_are_refused() {
        let x = exits(2, settings());
        let labels: Vec<&str> = x.nodes().iter().map(|n| &*n.label).collect();
        assert_eq!(labels, ["direct", "dc/1", "dc/2"]);
        assert_eq!(
            x.default_pool(),
            "dc",
            "the first configured pool is the default"
        );
        let mut p = pool("dc", 1, None);
        p.nodes.push(p.nodes[0].clone());
        assert!(Exits::new(&[p], None, settings()).is_err());
        let none = Exits::new(&[], None, settings()).unwrap();
        assert_eq!(none.default_pool(), "direct");
        assert!(none.only_direct());
    }

    #[test]
    fn gateway_usernames_carry_the_provider_session() {
        let x = Exits::new(
            &[pool("resi", 1, Some("{user}-session-{session}"))],
            None,
            settings(),
        )
        .unwrap();
        let n = &x.nodes()[1];
        assert_eq!(n.auth_for(Some("abc")).unwrap().username, "u-session-abc");
        assert_eq!(n.auth_for(None).unwrap().username, "u");
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_keeps_its_exit_then_rotates_to_another() {
        let x = exits(4, settings());
        let o = WorkerOptions::default();
        let first = route(&x, "a:443", "", &o).unwrap();
        assert_eq!(first.cold_reason, None, "first contact is a plain cold key");
        assert!(
            first.key.scope.is_none(),
            "session-less traffic shares the node's connections"
        );
        for _ in 0..50 {
            let r = route(&x, "a:443", "", &o).unwrap();
            assert_eq!(r.key, first.key, "same exit for the whole window");
            assert_eq!(r.cold_reason, None);
        }
        tokio::time::advance(Duration::from_secs(121)).await;
        let next = route(&x, "a:443", "", &o).unwrap();
        assert_ne!(
            next.key.node.index, first.key.node.index,
            "rotated to another node"
        );
        assert_eq!(next.cold_reason, Some(NewReason::Rotation));
        assert_eq!(route(&x, "a:443", "", &o).unwrap().key, next.key);
    }

    #[tokio::test(start_paused = true)]
    async fn rotation_prefers_a_node_with_a_warm_connection() {
        let x = exits(8, settings());
        let o = WorkerOptions::default();
        let first = route(&x, "a:443", "", &o).unwrap();
        tokio::time::advance(Duration::from_secs(121)).await;
        let warm_node = if first.key.node.index == 5 { 6 } else { 5 };
        let warm = |k: &ExitKey| k.node.index == warm_node;
        let r = x
            .route(&RouteQuery {
                target: "a:443",
                token: "",
                options: &o,
                exclude: &[],
                warm: &warm,
            })
            .unwrap();
        assert_eq!(r.key.node.index, warm_node);
    }

    #[tokio::test(start_paused = true)]
    async fn new_windows_spread_evenly_over_the_nodes() {
        let x = exits(8, settings());
        let o = WorkerOptions::default();
        for t in 0..80 {
            route(&x, &format!("t{t}:443"), "", &o).unwrap();
        }
        for n in &x.nodes()[1..] {
            assert_eq!(x.pins_of(n), 10, "{}", n.label);
        }
    }

    /// A gateway of a fleet: rendezvous choice under `key`, the pool's nodes in `order`
    /// (indices into `pool("dc", 4, None)`'s nodes).
    fn fleet_gateway(key: u8, order: &[usize]) -> Exits {
        let all = pool("dc", 4, None);
        let p = PoolSpec {
            nodes: order.iter().map(|i| all.nodes[*i].clone()).collect(),
            ..all
        };
        let s = ExitSettings {
            session_choice: SessionChoice::Rendezvous,
            fleet_key: Some([key; 32]),
            ..settings()
        };
        Exits::new(&[p], None, s).unwrap()
    }

    /// The chosen exit's identity and the session's scope.
    fn placed(x: &Exits, token: &str, id: &str, exclude: &[usize]) -> (String, Arc<str>) {
        let r = route_ex(x, "t:443", token, &session(id), exclude).unwrap();
        (r.key.node.spec.identity(), r.key.scope.unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn rendezvous_sessions_agree_across_gateways_and_spread_over_the_pool() {
        let a = fleet_gateway(7, &[0, 1, 2, 3]);
        // Another gateway, its pool listed in another order: nodes are named by what they are.
        let b = fleet_gateway(7, &[3, 1, 0, 2]);
        let mut per_node: HashMap<String, usize> = HashMap::new();
        for i in 0..400 {
            let id = format!("s{i}");
            let on_a = placed(&a, "tok", &id, &[]);
            let on_b = placed(&b, "tok", &id, &[]);
            assert_eq!(
                on_a, on_b,
                "session {id}: same exit and scope on both gateways"
            );
            *per_node.entry(on_a.0).or_default() += 1;
            // Later requests of the session, on either gateway, stay put.
            assert_eq!(placed(&b, "tok", &id, &[]).0, on_b.0);
        }
        assert_eq!(per_node.len(), 4, "{per_node:?}");
        for (node, n) in &per_node {
            // 100 expected each; the assignment is a fixed function of the key, so this
            // bound is not a matter of luck: it holds or the hashing is skewed.
            assert!((70..=130).contains(n), "{node}: {n} of 400");
        }
        // Another fleet (another CA, so another key) places sessions independently.
        let c = fleet_gateway(8, &[0, 1, 2, 3]);
        let moved = (0..400)
            .filter(|i| {
                placed(&c, "tok", &format!("s{i}"), &[]).0
                    != placed(&a, "tok", &format!("s{i}"), &[]).0
            })
            .count();
        assert!(
            moved > 200,
            "{moved} of 400 placed differently under another key"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rendezvous_failover_moves_only_the_failed_exits_sessions_the_same_way_everywhere() {
        let before = fleet_gateway(7, &[0, 1, 2, 3]);
        let ids: Vec<String> = (0..200).map(|i| format!("s{i}")).collect();
        let home: Vec<String> = ids
            .iter()
            .map(|id| placed(&before, "tok", id, &[]).0)
            .collect();
        // Node index 2 (the pool's second node on gateway a: indices are per gateway, 0 is
        // direct) fails; gateway b lists the pool in another order, so its index differs.
        let failed = before.nodes()[2].spec.identity();
        let a = fleet_gateway(7, &[0, 1, 2, 3]);
        let b = fleet_gateway(7, &[3, 1, 0, 2]);
        let index_on = |x: &Exits| {
            x.nodes()
                .iter()
                .position(|n| n.spec.identity() == failed)
                .unwrap()
        };
        let (xa, xb) = ([index_on(&a)], [index_on(&b)]);
        let mut moved = 0;
        for (id, home) in ids.iter().zip(&home) {
            let on_a = placed(&a, "tok", id, &xa);
            let on_b = placed(&b, "tok", id, &xb);
            assert_eq!(
                on_a, on_b,
                "session {id}: the same failover target everywhere"
            );
            assert_ne!(on_a.0, failed);
            if *home == failed {
                moved += 1;
            } else {
                assert_eq!(
                    &on_a.0, home,
                    "session {id} was not on the failed exit: it stays"
                );
            }
        }
        assert!(
            (25..=75).contains(&moved),
            "{moved} of 200 sessions were on the failed node"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rendezvous_session_moves_at_its_period_end_to_another_exit() {
        let x = fleet_gateway(7, &[0, 1, 2, 3]);
        // Twenty sessions: their periods start at different wall-clock phases, so whatever
        // the real time at construction, some cross a boundary early and some late.
        let opts: Vec<WorkerOptions> = (0..20)
            .map(|i| WorkerOptions {
                session: Some(format!("short{i}")),
                session_minutes: Some(1),
                ..Default::default()
            })
            .collect();
        let first: Vec<Route> = opts
            .iter()
            .map(|o| route(&x, "a:443", "t", o).unwrap())
            .collect();
        let mut changes: Vec<Vec<Route>> = vec![Vec::new(); opts.len()];
        // Within one period (60 s) every session moves, once.
        for _ in 0..60 {
            tokio::time::advance(Duration::from_secs(1)).await;
            for (o, c) in opts.iter().zip(changes.iter_mut()) {
                let r = route(&x, "a:443", "t", o).unwrap();
                if r.cold_reason.is_some() {
                    c.push(r);
                }
            }
        }
        for (i, (f, c)) in first.iter().zip(&changes).enumerate() {
            assert_eq!(c.len(), 1, "session {i}: one move per period");
            assert_eq!(c[0].cold_reason, Some(NewReason::SessionChange));
            assert_ne!(
                c[0].key.node.index, f.key.node.index,
                "session {i}: a new period, a new exit"
            );
            assert_ne!(c[0].key.scope, f.key.scope);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_pin_an_exit_and_are_isolated_per_token_and_id() {
        let x = exits(4, settings());
        let a = route(&x, "a:443", "tok1", &session("s1")).unwrap();
        assert_eq!(a.cold_reason, Some(NewReason::NewSession));
        assert!(a.key.scope.is_some());
        for target in ["a:443", "b:443", "c:80"] {
            let r = route(&x, target, "tok1", &session("s1")).unwrap();
            assert_eq!(r.key, a.key, "a session keeps its exit across targets");
            assert_eq!(
                r.cold_reason, None,
                "only the session's first request starts it"
            );
        }
        let other_id = route(&x, "a:443", "tok1", &session("s2")).unwrap();
        let other_token = route(&x, "a:443", "tok2", &session("s1")).unwrap();
        assert_ne!(other_id.key.scope, a.key.scope);
        assert_ne!(
            other_token.key.scope, a.key.scope,
            "same id, other token: other session"
        );
        assert_ne!(other_id.key, a.key);
        assert_ne!(other_token.key, a.key);
        let secret = route(&x, "a:443", "token_xyz", &session("my_session")).unwrap();
        let scope = secret.key.scope.as_deref().unwrap();
        assert!(
            !scope.contains("token_xyz") && !scope.contains("my_session"),
            "{scope}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_or_expired_session_starts_over_as_a_session_change() {
        let x = exits(4, settings());
        let a = route(&x, "a:443", "t", &session("s")).unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        let b = route(&x, "a:443", "t", &session("s")).unwrap();
        assert_eq!(b.cold_reason, Some(NewReason::SessionChange));
        assert_ne!(
            b.key.scope, a.key.scope,
            "a new session never reuses the old one's connections"
        );
        let o = WorkerOptions {
            session: Some("short".into()),
            session_minutes: Some(1),
            ..Default::default()
        };
        let c = route(&x, "a:443", "t", &o).unwrap();
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(11)).await;
            assert_eq!(route(&x, "a:443", "t", &o).unwrap().key, c.key);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        let d = route(&x, "a:443", "t", &o).unwrap();
        assert_ne!(d.key.scope, c.key.scope, "sesstime-1 ends after a minute");
    }

    #[tokio::test(start_paused = true)]
    async fn flex_sessions_move_off_a_failed_exit_and_strict_ones_fail() {
        let x = exits(3, settings());
        let a = route(&x, "a:443", "t", &session("s")).unwrap();
        let moved = route_ex(&x, "a:443", "t", &session("s"), &[a.key.node.index]).unwrap();
        assert!(moved.renewed);
        assert_ne!(moved.key.node.index, a.key.node.index);
        assert_eq!(moved.cold_reason, Some(NewReason::SessionChange));
        let strict = exits(
            3,
            ExitSettings {
                session_mode: SessionMode::Strict,
                ..settings()
            },
        );
        let a = route(&strict, "a:443", "t", &session("s")).unwrap();
        let e = route_ex(&strict, "a:443", "t", &session("s"), &[a.key.node.index]).unwrap_err();
        assert!(matches!(e, RouteError::SessionExitLost { .. }), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn forced_rotation_changes_exit_every_request() {
        let x = exits(3, settings());
        let o = WorkerOptions {
            rotate: Some(Rotate::Request),
            ..Default::default()
        };
        let mut last = None;
        for _ in 0..20 {
            let r = route(&x, "a:443", "", &o).unwrap();
            assert!(r.forced);
            assert_eq!(r.cold_reason, Some(NewReason::ForcedRotation));
            assert_ne!(
                Some(r.key.node.index),
                last,
                "never the same exit twice in a row"
            );
            last = Some(r.key.node.index);
        }
        let g = Exits::new(
            &[pool("resi", 1, Some("{user}-s-{session}"))],
            None,
            settings(),
        )
        .unwrap();
        let a = route(&g, "a:443", "", &o).unwrap();
        let b = route(&g, "a:443", "", &o).unwrap();
        assert_ne!(
            a.key.scope, b.key.scope,
            "a gateway gets a new provider session per request"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_circuit_opens_after_failures_probes_once_and_closes_on_success() {
        let x = exits(2, settings());
        let n = x.nodes()[1].clone();
        for _ in 0..2 {
            n.record_failure("connect refused");
        }
        assert_eq!(n.state(), CircuitState::Closed, "below the threshold");
        n.record_failure("connect refused");
        assert_eq!(n.state(), CircuitState::Open);
        let o = WorkerOptions::default();
        for t in 0..10 {
            let r = route(&x, &format!("t{t}:443"), "", &o).unwrap();
            assert_eq!(r.key.node.index, 2, "an open node gets no traffic");
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(n.state(), CircuitState::HalfOpen);
        assert!(n.admit(Instant::now()), "one probe");
        assert!(!n.admit(Instant::now()), "only one probe at a time");
        n.record_failure("still down");
        assert_eq!(n.state(), CircuitState::Open);
        assert_eq!(
            n.health().retry_in,
            Some(Duration::from_secs(4)),
            "backoff doubled"
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(n.admit(Instant::now()));
        n.mark_ok();
        assert_eq!(n.state(), CircuitState::Closed);
        assert_eq!(n.health().consecutive_failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn no_healthy_exit_says_when_to_retry() {
        let x = exits(2, settings());
        for n in &x.nodes()[1..] {
            for _ in 0..3 {
                n.record_failure("down");
            }
        }
        match route(&x, "a:443", "", &WorkerOptions::default()) {
            Err(RouteError::NoHealthyExit { retry_after, .. }) => {
                assert_eq!(retry_after, Duration::from_secs(2))
            }
            other => panic!("{other:?}"),
        }
        let bad = WorkerOptions {
            pool: Some("nope".into()),
            ..Default::default()
        };
        assert!(matches!(
            route(&x, "a:443", "", &bad),
            Err(RouteError::UnknownPool(..))
        ));
        let direct = WorkerOptions {
            pool: Some("direct".into()),
            ..Default::default()
        };
        assert_eq!(
            &*route(&x, "a:443", "", &direct).unwrap().key.node.label,
            "direct"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_forgets_idle_sessions_and_releases_their_pins() {
        let x = exits(1, settings());
        let first = route(&x, "a:443", "t", &session("s")).unwrap();
        assert_eq!(x.pinned().0, 1);
        assert_eq!(x.pins_of(&x.nodes()[1]), 1);
        tokio::time::advance(Duration::from_secs(61)).await;
        x.sweep();
        assert_eq!(x.pinned().0, 0);
        assert_eq!(x.pins_of(&x.nodes()[1]), 0);
        // The id starts a new session: same node (the only one), never the old connections.
        let again = route(&x, "a:443", "t", &session("s")).unwrap();
        assert_eq!(again.key.node.index, first.key.node.index);
        assert_ne!(again.key.scope, first.key.scope);
    }
}
