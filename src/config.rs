//! config: the typed configuration, its embedded defaults, loading from TOML and validation
//! that names the bad key.
//!
//! The configuration is one TOML document with one table per subsystem (`[listen]`, `[pool]`,
//! `[upstream]`, `[intercept]`, `[limits]`, `[targets]`) plus the top-level `data_dir`. Every key
//! is optional: a missing key (or table, or the whole file) takes its embedded default, which is
//! a named `pub const` in this module (or in [`crate::pool`] for the pool limits). An unknown key
//! is an error (every struct is `deny_unknown_fields`), so a typo such as `max_idel_total` is
//! reported with its line, column and name instead of being silently ignored.
//!
//! Durations are humantime strings: `"500ms"`, `"90s"`, `"2m"`, `"1h 30m"`, `"7d"`. Sizes are
//! plain integers in bytes.
//!
//! [`Config::from_toml_str`] parses and then [`Config::validate`]s; validation reports the first
//! inconsistent value as [`ConfigError::Invalid`] with its dotted key (`"pool.max_idle_total"`)
//! and the reason. `config/example.toml` documents every key and equals [`Config::default`].
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::pool::{
    PoolConfig, DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEPALIVE_MARGIN, DEFAULT_MAX_IDLE_TOTAL,
    DEFAULT_MAX_PER_KEY, DEFAULT_MAX_TOTAL,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Default [`ListenConfig::proxy`]: `127.0.0.1:8080`. Loopback only, so a fresh install is not
/// an open proxy; the conventional HTTP proxy port.
pub const DEFAULT_LISTEN_PROXY: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
/// Default [`ListenConfig::admin`]: `127.0.0.1:9180`. Loopback only: the admin endpoint is for
/// operators on the same host, not for workers or the network.
pub const DEFAULT_LISTEN_ADMIN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9180));

/// Default [`PoolSection::learn_idle_timeout`]: `true`. Most servers close idle connections
/// silently after a fixed time; learning it avoids sending requests onto connections that are
/// about to be closed.
pub const DEFAULT_LEARN_IDLE_TIMEOUT: bool = true;
/// Default [`PoolSection::queue_timeout`]: 30 s. Long enough to ride out a burst at
/// `max_per_key`, short enough that a worker gets a clear error instead of hanging.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default [`UpstreamConfig::connect_timeout`]: 10 s. A TCP connect that takes longer than this
/// is almost always a dead or filtering host.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`UpstreamConfig::tls_handshake_timeout`]: 10 s, for the same reason as the connect
/// timeout.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`UpstreamConfig::response_header_timeout`]: 60 s. Generous, because slow dynamic
/// pages are common among scraping targets; bounded, so a stuck server frees its connection.
pub const DEFAULT_RESPONSE_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`UpstreamConfig::http2`]: `true`. One multiplexed HTTP/2 connection replaces many
/// HTTP/1.1 ones, which is the point of a pool.
pub const DEFAULT_UPSTREAM_HTTP2: bool = true;
/// Default [`UpstreamConfig::response_body_idle_timeout`]: 60 s without a byte of a response
/// body cuts it off (the worker sees the body fail) and closes the connection: a stalled
/// target cannot hold a request, and its place under the limits, forever.
pub const DEFAULT_RESPONSE_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`UpstreamConfig::dns_min_ttl`]: 1 s. Stops answers with TTL 0 from costing a DNS
/// query per connection.
pub const DEFAULT_DNS_MIN_TTL: Duration = Duration::from_secs(1);
/// Default [`UpstreamConfig::dns_max_ttl`]: 300 s. Bounds how long a moved target is dialed at
/// its old address.
pub const DEFAULT_DNS_MAX_TTL: Duration = Duration::from_secs(300);
/// Default [`UpstreamConfig::dns_stale_ttl`]: 1 h. How long past its TTL the last good answer
/// of a name keeps serving requests while refreshes fail or are under way (RFC 8767
/// serve-stale). Long enough to ride out a resolver outage of the usual length (minutes); short
/// enough that an address last confirmed hours ago is not dialled without asking again. RFC 8767
/// suggests 1–3 days for resolvers that serve many clients; set it higher to match.
pub const DEFAULT_DNS_STALE_TTL: Duration = Duration::from_secs(3600);
/// Default [`UpstreamConfig::dns_timeout`]: 1 s per attempt. Loopback and LAN resolvers answer
/// in milliseconds; a resolver that has not answered in a second is not going to.
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(1);
/// Default [`UpstreamConfig::dns_attempts`]: 2. With [`DEFAULT_DNS_TIMEOUT`] a lookup gives up
/// after at most 2 s (the classic resolver default, 5 s × 2 attempts, is what stalled requests).
pub const DEFAULT_DNS_ATTEMPTS: u32 = 2;
/// Default [`UpstreamConfig::dns_family_grace`]: 50 ms. Once one address family (A or AAAA)
/// has answered with addresses, the other gets at most this long before the answer is used
/// (RFC 8305 §3 "Resolution Delay", which recommends 50 ms).
pub const DEFAULT_DNS_FAMILY_GRACE: Duration = Duration::from_millis(50);
/// Default [`UpstreamConfig::dns_cache_size`]: 65,536 names. Least recently used names beyond
/// it are forgotten (counted in `edgepool_dns_evictions_total`).
pub const DEFAULT_DNS_CACHE_SIZE: usize = 65_536;
/// Default [`UpstreamConfig::hosts_file`]: `/etc/hosts`, as glibc's `files` source reads it.
pub const DEFAULT_HOSTS_FILE: &str = "/etc/hosts";

/// Default [`InterceptConfig::enabled`]: `true`. Pooling and reuse accounting need to see the
/// requests inside CONNECT, which only interception allows.
pub const DEFAULT_INTERCEPT_ENABLED: bool = true;
/// Default [`InterceptConfig::leaf_cache_size`]: 1000 host certificates. Covers a typical
/// fleet's working set of hosts; a miss costs one key signature.
pub const DEFAULT_LEAF_CACHE_SIZE: usize = 1000;
/// Default [`InterceptConfig::leaf_validity`]: 7 days. Short-lived leaves limit the damage of a
/// leaked one; cached leaves are regenerated before they expire.
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default [`InterceptConfig::worker_http2`]: `true`. Lets workers multiplex their own requests
/// over one intercepted connection.
pub const DEFAULT_WORKER_HTTP2: bool = true;

/// Default [`LimitsConfig::max_request_body`]: 8 MiB. Request bodies are buffered so that a
/// retry resends them exactly; scraping requests (forms, JSON queries) are far smaller.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 8 * MIB;
/// Default [`LimitsConfig::max_fetch_json`]: 12 MiB. Room for a base64-encoded body of
/// [`DEFAULT_MAX_REQUEST_BODY`] plus its headers in a `POST /v1/fetch` document.
pub const DEFAULT_MAX_FETCH_JSON: u64 = 12 * MIB;
/// Default [`LimitsConfig::drain_max_bytes`]: 256 KiB. Reading that much is cheaper than a new
/// TLS connection; beyond it, closing is cheaper.
pub const DEFAULT_DRAIN_MAX_BYTES: u64 = 256 * KIB;
/// Default [`LimitsConfig::drain_timeout`]: 2 s. About what a new connection costs on a slow
/// link; longer drains are not worth the connection.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Default [`LimitsConfig::max_header_bytes`]: 64 KiB for a request head (request line and
/// headers). Browsers send 1–8 KiB; big cookie jars fit; beyond it is an attack or a bug (431).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default [`LimitsConfig::max_headers`]: 100 header fields per request (431 beyond), hyper's
/// and nginx's order of magnitude.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Default [`LimitsConfig::max_uri_bytes`]: 16 KiB request target (414 beyond). Long query
/// strings are common in scraping; 16 KiB is above what major CDNs accept.
pub const DEFAULT_MAX_URI_BYTES: usize = 16 * 1024;
/// Default [`LimitsConfig::header_read_timeout`]: 30 s to send a whole request head, counted
/// from the connection's start or the head's first byte (408 past it). Stops slowloris.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`LimitsConfig::body_idle_timeout`]: 30 s without a byte of a request body (408).
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`LimitsConfig::worker_idle_timeout`]: 90 s. A worker connection (HTTP/1.1 or
/// HTTP/2, plain or inside an intercepted tunnel) with no request and no response under way
/// this long is closed (HTTP/2: GOAWAY first). Long enough for a pacing scraper; short enough
/// that idle connections cannot pile up against the connection and tunnel limits.
pub const DEFAULT_WORKER_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Default [`LimitsConfig::max_connections_per_worker`]: 1024 open connections from one worker
/// IP address. A scraper process rarely needs more than a few dozen; a runaway one must not
/// take every file descriptor.
pub const DEFAULT_MAX_CONNECTIONS_PER_WORKER: usize = 1024;
/// Default [`LimitsConfig::max_tunnels`]: 4096 CONNECT tunnels (intercepted or blind) open at
/// once.
pub const DEFAULT_MAX_TUNNELS: usize = 4096;
/// Default [`LimitsConfig::max_buffered_bytes`]: 1 GiB of request bodies buffered at once
/// (bodies are buffered whole so a retry sends the same bytes); beyond it 503 + `Retry-After`.
pub const DEFAULT_MAX_BUFFERED_BYTES: u64 = 1 << 30;
/// Default [`LimitsConfig::max_worker_share`]: 0.5. One worker address may hold at most half of
/// the requests in flight, of the tunnels and of the buffered bytes, so one client can never
/// lock the others out; a fleet behind one address still gets half of each limit.
pub const DEFAULT_MAX_WORKER_SHARE: f64 = 0.5;
/// Default [`LimitsConfig::max_in_flight`]: 8192 worker requests waiting for a response head
/// at once; past it, new requests get 503 with `Retry-After` before their body is read.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8192;
/// Default [`LimitsConfig::max_dns_in_flight`]: 256 DNS lookups at once; more wait.
pub const DEFAULT_MAX_DNS_IN_FLIGHT: usize = 256;
/// Default [`LimitsConfig::h2_max_streams`]: 256 concurrent streams per HTTP/2 worker
/// connection.
pub const DEFAULT_H2_MAX_STREAMS: u32 = 256;
/// Default [`LimitsConfig::h2_max_pending_resets`]: 20 streams reset by a worker before
/// edgepool accepted them (the rapid-reset attack, CVE-2023-44487, is cut off past it).
pub const DEFAULT_H2_MAX_PENDING_RESETS: usize = 20;
/// Default [`LimitsConfig::h2_max_cancelled_streams`]: 100 requests a worker connection may
/// cancel before their answers (when they are also more than half of its requests); past it
/// the connection is closed as an HTTP/2 rapid-reset attack.
pub const DEFAULT_H2_MAX_CANCELLED_STREAMS: usize = 100;
/// Default [`LimitsConfig::h2_max_local_error_resets`]: 256 streams edgepool had to reset for
/// a worker's protocol errors before the connection is closed with GOAWAY.
pub const DEFAULT_H2_MAX_LOCAL_ERROR_RESETS: usize = 256;
/// Default [`LimitsConfig::retry_budget`]: retries may add at most 20 % to the requests sent
/// upstream (plus [`RETRY_BUDGET_MIN_PER_SEC`] a second), so a failing target or exit is not
/// hit with amplified load.
pub const DEFAULT_RETRY_BUDGET: f64 = 0.2;
/// Retries always allowed per second, whatever the budget: a quiet gateway can still retry.
pub const RETRY_BUDGET_MIN_PER_SEC: u32 = 10;
/// Default [`LimitsConfig::upgrade_idle_timeout`]: 120 s without a byte either way ends an
/// upgraded (WebSocket) connection. WebSocket clients ping every 20–30 s; a live feed sends
/// far more often.
pub const DEFAULT_UPGRADE_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default [`LimitsConfig::upgrade_max_lifetime`]: an upgraded connection ends after 6 h
/// whatever it carries (clients reconnect), so none holds a tunnel place forever.
pub const DEFAULT_UPGRADE_MAX_LIFETIME: Duration = Duration::from_secs(6 * 3600);

/// Default [`TargetsConfig::connect_ports`]: 443 and 80. CONNECT is for TLS to web servers;
/// other ports (SMTP, SSH, databases) would make edgepool a general TCP relay.
pub const DEFAULT_CONNECT_PORTS: [u16; 2] = [443, 80];

/// Data directory used by [`Config::default_data_dir`] when the platform has no home directory
/// (e.g. a container running as a user without a passwd entry): `./edgepool-data`.
pub const FALLBACK_DATA_DIR: &str = "./edgepool-data";

/// The whole configuration. `Default` is the embedded defaults (what an empty file gives).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listening addresses. Default: proxy on `127.0.0.1:8080`, admin on `127.0.0.1:9180`.
    pub listen: ListenConfig,
    /// Where the CA and state live; None = the XDG data dir (Config::default_data_dir()).
    /// Default `None`, so a plain install keeps its CA across restarts without configuration.
    /// A relative path is relative to the process's working directory.
    pub data_dir: Option<PathBuf>,
    /// Connection pool limits and timeouts. Default: [`PoolSection::default`].
    pub pool: PoolSection,
    /// How targets are dialed. Default: [`UpstreamConfig::default`].
    pub upstream: UpstreamConfig,
    /// TLS interception of CONNECT. Default: [`InterceptConfig::default`] (enabled).
    pub intercept: InterceptConfig,
    /// Size limits. Default: [`LimitsConfig::default`].
    pub limits: LimitsConfig,
    /// Which target addresses may be dialed. Default: [`TargetsConfig::default`] (no exceptions
    /// to the private/loopback deny list).
    pub targets: TargetsConfig,
    /// Reuse-rate objective. Default: [`SloConfig::default`] (0.92 fleet-wide).
    pub slo: SloConfig,
    /// Per-request trace log. Default: [`TraceConfig::default`].
    pub trace: TraceConfig,
    /// Worker authentication. Default: [`AuthConfig::default`] (no tokens: anyone who reaches
    /// the listener may use it, which is why it listens on loopback by default).
    pub auth: AuthConfig,
    /// Upstream proxies (exits), sticky sessions and rotation. Default:
    /// [`ExitsConfig::default`] (no pools: every request goes direct).
    pub exits: ExitsConfig,
    /// The async runtime. Default: [`RuntimeConfig::default`] (a worker thread per CPU).
    pub runtime: RuntimeConfig,
}

/// Most worker threads `runtime.worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

/// `[runtime]`: the threads edgepool runs on.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads of the async runtime; 0 (the default) means one per CPU (or the
    /// `TOKIO_WORKER_THREADS` environment variable, if set). Set it to the cores edgepool
    /// should use when it shares the machine (scrapers on the same host, a container's CPU
    /// share): a request's tasks move between threads as their sockets wake them, so threads
    /// beyond the cores edgepool really gets only add switching (docs/BENCHMARKS.md compares 1
    /// and 2 threads). At most [`MAX_WORKER_THREADS`].
    pub worker_threads: usize,
}

impl RuntimeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "runtime.worker_threads",
                format!(
                    "{} is more than {MAX_WORKER_THREADS}; use 0 for one thread per CPU",
                    self.worker_threads
                ),
            ));
        }
        Ok(())
    }
}

/// `[auth]`: worker tokens.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Tokens workers put first in their proxy username (`<token>-session-abc`). When any is
    /// set, every proxy request needs `Proxy-Authorization` with one of them (else 407).
    /// Tokens are `[A-Za-z0-9_.~+/=]`, no `-` (it separates options). Default none. Required
    /// when `listen.proxy` is not a loopback address (edgepool refuses to be an open proxy).
    pub tokens: Vec<String>,
    /// Bearer token for the admin listener (`Authorization: Bearer <token>`; the CLI reads
    /// `EDGEPOOL_ADMIN_TOKEN`). Default none. Required when `listen.admin` is not loopback.
    pub admin_token: Option<String>,
}

impl AuthConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(t) = &self.admin_token {
            if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    "auth.admin_token",
                    "must be at least 16 characters, without spaces or control characters",
                ));
            }
        }
        for (i, t) in self.tokens.iter().enumerate() {
            crate::worker::validate_token(t)
                .map_err(|why| invalid(&format!("auth.tokens[{i}]"), why.to_string()))?;
        }
        Ok(())
    }
}

/// Default [`ExitsConfig::sticky_window`]: 2 min, the middle of the domain note's 1–3 minute
/// window: long enough to push hundreds of requests through one warm connection, short enough
/// for IP diversity.
pub const DEFAULT_STICKY_WINDOW: Duration = Duration::from_secs(120);
/// Default [`ExitsConfig::session_lifetime`]: 10 min (providers' usual sticky-session length).
pub const DEFAULT_SESSION_LIFETIME: Duration = Duration::from_secs(600);
/// Default [`ExitsConfig::session_idle`]: 60 s. A session nobody used for a minute is
/// forgotten (its id starts a new one).
pub const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(60);
/// Default [`ExitsConfig::jitter`]: 0.1. Lifetimes vary by ±10% so windows and sessions do not
/// all rotate at the same instant.
pub const DEFAULT_JITTER: f64 = 0.1;
/// Default [`ExitsConfig::max_connections_per_node`]: 256 concurrent connections through one
/// proxy node, across all targets (providers cap concurrency per port/IP).
pub const DEFAULT_MAX_CONNECTIONS_PER_NODE: usize = 256;
/// Default [`ExitsConfig::circuit_failures`]: 3 consecutive failures open a node's circuit.
pub const DEFAULT_CIRCUIT_FAILURES: u32 = 3;
/// Default [`ExitsConfig::circuit_open_min`]: 2 s before the first probe.
pub const DEFAULT_CIRCUIT_OPEN_MIN: Duration = Duration::from_secs(2);
/// Default [`ExitsConfig::circuit_open_max`]: 60 s, the longest backoff between probes.
pub const DEFAULT_CIRCUIT_OPEN_MAX: Duration = Duration::from_secs(60);

/// `[exits]`: upstream proxy pools and the rotation policy.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExitsConfig {
    /// Pool for workers that name none (`-pool-<name>`). Default none: the first pool in
    /// `[[exits.pools]]`, or `direct` when there is none.
    pub default_pool: Option<String>,
    /// Session-less traffic keeps one exit per (target, pool) this long, then rotates.
    /// Default [`DEFAULT_STICKY_WINDOW`].
    #[serde(with = "humantime_serde")]
    pub sticky_window: Duration,
    /// A worker session keeps its exit this long (`-sesstime-<min>` overrides).
    /// Default [`DEFAULT_SESSION_LIFETIME`].
    #[serde(with = "humantime_serde")]
    pub session_lifetime: Duration,
    /// A session unused this long ends. Default [`DEFAULT_SESSION_IDLE`].
    #[serde(with = "humantime_serde")]
    pub session_idle: Duration,
    /// Windows and lifetimes are scaled by a random factor in `[1 - jitter, 1 + jitter]`
    /// (0 to 0.5). Default [`DEFAULT_JITTER`].
    pub jitter: f64,
    /// `flex`: a session whose exit dies moves to another (`X-Edgepool-Session-Renewed: 1`);
    /// `strict`: it fails with 502 `session_exit_lost`. Default `flex`.
    pub session_mode: crate::exits::SessionMode,
    /// How a session's exit is chosen: `least_loaded` (one gateway's best spread) or
    /// `rendezvous` (every gateway sharing the CA and the pools picks the same exit for a
    /// session, with no shared state — for fleets behind a balancer; see docs/SCALE.md).
    /// Default `least_loaded`.
    pub session_choice: crate::exits::SessionChoice,
    /// Concurrent connections through one proxy node, all targets together (pools may
    /// override). Default [`DEFAULT_MAX_CONNECTIONS_PER_NODE`].
    pub max_connections_per_node: usize,
    /// Consecutive connect/handshake failures that open a node's circuit.
    /// Default [`DEFAULT_CIRCUIT_FAILURES`].
    pub circuit_failures: u32,
    /// First open period of a circuit; it doubles per failed probe.
    /// Default [`DEFAULT_CIRCUIT_OPEN_MIN`].
    #[serde(with = "humantime_serde")]
    pub circuit_open_min: Duration,
    /// Longest open period. Default [`DEFAULT_CIRCUIT_OPEN_MAX`].
    #[serde(with = "humantime_serde")]
    pub circuit_open_max: Duration,
    /// Whether workers may choose `-pool-direct` (leave from edgepool's own address) while
    /// exit pools are configured. Default none: only when no pool is configured (then direct
    /// is all there is) — a fleet that pays for exits rarely wants workers to bypass them.
    pub allow_direct: Option<bool>,
    /// The pools, in order (`[[exits.pools]]`). Default none.
    pub pools: Vec<ExitPoolConfig>,
}

impl Default for ExitsConfig {
    fn default() -> Self {
        ExitsConfig {
            default_pool: None,
            sticky_window: DEFAULT_STICKY_WINDOW,
            session_lifetime: DEFAULT_SESSION_LIFETIME,
            session_idle: DEFAULT_SESSION_IDLE,
            jitter: DEFAULT_JITTER,
            session_mode: crate::exits::SessionMode::Flex,
            session_choice: crate::exits::SessionChoice::LeastLoaded,
            max_connections_per_node: DEFAULT_MAX_CONNECTIONS_PER_NODE,
            circuit_failures: DEFAULT_CIRCUIT_FAILURES,
            circuit_open_min: DEFAULT_CIRCUIT_OPEN_MIN,
            circuit_open_max: DEFAULT_CIRCUIT_OPEN_MAX,
            allow_direct: None,
            pools: Vec::new(),
        }
    }
}

/// One `[[exits.pools]]` entry.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitPoolConfig {
    /// Name (`[A-Za-z0-9_]{1,64}`), used in `-pool-<name>`, metrics and `X-Edgepool-Exit`.
    pub name: String,
    /// Nodes: `direct`, `http://[user:pass@]host:port`, `socks5://[user:pass@]host:port`.
    pub nodes: Vec<String>,
    /// For a provider's rotating gateway: the proxy username per provider session, with
    /// `{user}` (the node URL's username) and `{session}` (an id edgepool makes per session
    /// or sticky window), e.g. `"{user}-session-{session}"`. Default none (a plain node list).
    #[serde(default)]
    pub session_template: Option<String>,
    /// Overrides `exits.max_connections_per_node` for this pool's nodes.
    #[serde(default)]
    pub max_connections_per_node: Option<usize>,
}

/// Why a `--exit POOL=URL` argument was refused (never echoing credentials).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliExitError {
    /// No `=`.
    #[error("expected POOL=URL, e.g. dc=http://user:pass@10.0.0.1:3128")]
    NoEquals,
    /// The part before `=` is no pool name (not echoed: it may hold a URL's userinfo).
    #[error("the part before '=' must be a pool name ([A-Za-z0-9_]{{1,64}}): POOL=URL, e.g. dc=http://user:pass@10.0.0.1:3128")]
    PoolName,
    /// The URL was refused.
    #[error(transparent)]
    Node(#[from] crate::exits::ExitsError),
}

impl ExitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("exits.sticky_window", self.sticky_window)?;
        positive("exits.session_lifetime", self.session_lifetime)?;
        positive("exits.session_idle", self.session_idle)?;
        positive("exits.circuit_open_min", self.circuit_open_min)?;
        if !(0.0..=0.5).contains(&self.jitter) {
            return Err(invalid("exits.jitter", "must be between 0 and 0.5"));
        }
        at_least_one(
            "exits.max_connections_per_node",
            self.max_connections_per_node as u64,
            "no connection could ever go through a node",
        )?;
        at_least_one(
            "exits.circuit_failures",
            u64::from(self.circuit_failures),
            "a circuit must allow at least one failure",
        )?;
        if self.circuit_open_max < self.circuit_open_min {
            return Err(invalid(
                "exits.circuit_open_max",
                "must be at least exits.circuit_open_min",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.pools.iter().enumerate() {
            let key = |k: &str| format!("exits.pools[{i}].{k}");
            crate::worker::validate_name(&p.name)
                .map_err(|why| invalid(&key("name"), why.to_string()))?;
            if p.name == crate::exits::DIRECT {
                return Err(invalid(
                    &key("name"),
                    "\"direct\" is the built-in pool (no proxy); name yours differently",
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(invalid(
                    &key("name"),
                    format!("pool {:?} is defined twice", p.name),
                ));
            }
            if p.nodes.is_empty() {
                return Err(invalid(&key("nodes"), "a pool needs at least one node"));
            }
            for (j, n) in p.nodes.iter().enumerate() {
                crate::exits::ExitSpec::parse(n).map_err(|why| {
                    invalid(&format!("exits.pools[{i}].nodes[{j}]"), why.to_string())
                })?;
            }
            if let Some(t) = &p.session_template {
                let without_user = p.nodes.iter().any(|n| {
                    crate::exits::ExitSpec::parse(n)
                        .is_ok_and(|s| s.kind != crate::exits::ExitKind::Direct && s.auth.is_none())
                });
                if without_user {
                    return Err(invalid(
                        &key("session_template"),
                        "a rotating gateway's nodes need user:pass in their URL: the template builds the username from it",
                    ));
                }
                if !t.contains("{session}") {
                    return Err(invalid(
                        &key("session_template"),
                        "must contain {session} (e.g. \"{user}-session-{session}\")",
                    ));
                }
            }
            if p.max_connections_per_node == Some(0) {
                return Err(invalid(
                    &key("max_connections_per_node"),
                    "must be at least 1: no connection could ever go through a node",
                ));
            }
        }
        if let Some(d) = &self.default_pool {
            if d == crate::exits::DIRECT && self.allow_direct == Some(false) {
                return Err(invalid(
                    "exits.default_pool",
                    "\"direct\" contradicts exits.allow_direct = false",
                ));
            }
            if d != crate::exits::DIRECT && !self.pools.iter().any(|p| &p.name == d) {
                return Err(invalid(
                    "exits.default_pool",
                    format!("{d:?} is not a configured pool (nor direct)"),
                ));
            }
        }
        Ok(())
    }

    /// Adds a node from the command line's `--exit POOL=URL`: to the pool of that name, or a
    /// new pool at the end. Errors never echo credentials.
    pub fn add_cli_exit(&mut self, arg: &str) -> Result<(), CliExitError> {
        let (pool, url) = arg.split_once('=').ok_or(CliExitError::NoEquals)?;
        let pool = pool.trim();
        // Never echo the part before '=': if POOL= was forgotten it holds a URL's userinfo.
        crate::worker::validate_name(pool).map_err(|_| CliExitError::PoolName)?;
        crate::exits::ExitSpec::parse(url).map_err(|source| crate::exits::ExitsError::Node {
            pool: pool.to_string(),
            source,
        })?;
        match self.pools.iter_mut().find(|p| p.name == pool) {
            Some(p) => p.nodes.push(url.trim().to_string()),
            None => self.pools.push(ExitPoolConfig {
                name: pool.to_string(),
                nodes: vec![url.trim().to_string()],
                session_template: None,
                max_connections_per_node: None,
            }),
        }
        Ok(())
    }

    /// The router settings.
    pub fn settings(&self) -> crate::exits::ExitSettings {
        crate::exits::ExitSettings {
            sticky_window: self.sticky_window,
            session_lifetime: self.session_lifetime,
            session_idle: self.session_idle,
            jitter: self.jitter,
            session_mode: self.session_mode,
            circuit_failures: self.circuit_failures,
            circuit_open_min: self.circuit_open_min,
            circuit_open_max: self.circuit_open_max,
            allow_direct: self.allow_direct.unwrap_or(self.pools.is_empty()),
            session_choice: self.session_choice,
            fleet_key: None,
        }
    }

    /// The pools, parsed (call after validation).
    pub fn pool_specs(&self) -> Result<Vec<crate::exits::PoolSpec>, crate::exits::ExitsError> {
        self.pools
            .iter()
            .map(|p| {
                Ok(crate::exits::PoolSpec {
                    name: p.name.clone(),
                    nodes: p
                        .nodes
                        .iter()
                        .map(|n| {
                            crate::exits::ExitSpec::parse(n).map_err(|source| {
                                crate::exits::ExitsError::Node {
                                    pool: p.name.clone(),
                                    source,
                                }
                            })
                        })
                        .collect::<Result<_, _>>()?,
                    session_template: p.session_template.clone(),
                    max_connections_per_node: p
                        .max_connections_per_node
                        .unwrap_or(self.max_connections_per_node),
                })
            })
            .collect()
    }
}

/// Default [`SloConfig::reuse_target`]: 0.92, the fleet SLO from the domain note
/// (R_fleet > 0.92).
pub const DEFAULT_REUSE_TARGET: f64 = 0.92;
/// Default [`SloConfig::min_requests`]: 100. Below that a target's R says more about its
/// first, unavoidable connection than about the pool (one cold connection costs 1/N of R: 9
/// points at 11 requests, 1 point at 100), so its verdict is `warming_up`, not a breach.
pub const DEFAULT_SLO_MIN_REQUESTS: u64 = 100;
/// Default [`SloConfig::max_targets`]: 2,000 target rows (about 1 MiB of `/status`); a broad
/// crawl touching millions of hosts keeps the most recently active ones.
pub const DEFAULT_SLO_MAX_TARGETS: usize = 2_000;
/// Default [`TraceConfig::sample_rate`]: 1% of reused requests; errors and requests on new
/// connections are always traced.
pub const DEFAULT_TRACE_SAMPLE_RATE: f64 = 0.01;

/// `[slo]`: the reuse-rate objective that `/status` verdicts and the breach gauge use.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SloConfig {
    /// R at or above this is `optimal`; within 5 points below, `monitor`; lower, `breach`.
    /// Default [`DEFAULT_REUSE_TARGET`].
    pub reuse_target: f64,
    /// Per-target overrides, keyed by `host:port` (e.g. residential targets that rotate by
    /// design). Default none.
    pub targets: std::collections::BTreeMap<String, f64>,
    /// Requests a target (or the fleet) needs before it is judged; fewer are `warming_up`.
    /// Default [`DEFAULT_SLO_MIN_REQUESTS`]; 0 judges from the first request.
    pub min_requests: u64,
    /// Targets with an accounting row of their own (in `/status`, verdicts and per-target
    /// figures). Beyond it the least recently active target's row is folded into the fleet
    /// totals (which stay exact) and counted in `edgepool_target_rows_folded_total`. Default
    /// [`DEFAULT_SLO_MAX_TARGETS`]; at least 1.
    pub max_targets: usize,
}

impl Default for SloConfig {
    fn default() -> Self {
        SloConfig {
            reuse_target: DEFAULT_REUSE_TARGET,
            targets: Default::default(),
            min_requests: DEFAULT_SLO_MIN_REQUESTS,
            max_targets: DEFAULT_SLO_MAX_TARGETS,
        }
    }
}

impl SloConfig {
    /// The objective for `target` (`host:port`).
    pub fn target_for(&self, target: &str) -> f64 {
        self.targets
            .get(target)
            .copied()
            .unwrap_or(self.reuse_target)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.reuse_target) {
            return Err(invalid("slo.reuse_target", "must be between 0 and 1"));
        }
        if self.max_targets == 0 {
            return Err(invalid(
                "slo.max_targets",
                "must be at least 1: every target's figures would be folded away at once",
            ));
        }
        for (t, v) in &self.targets {
            if !(0.0..=1.0).contains(v) {
                return Err(invalid(
                    "slo.targets",
                    format!("{t} = {v}: must be between 0 and 1"),
                ));
            }
            if !t.contains(':') {
                return Err(invalid(
                    "slo.targets",
                    format!("{t:?}: keys are host:port, e.g. \"api.example.com:443\""),
                ));
            }
        }
        Ok(())
    }
}

/// `[trace]`: one JSON record per upstream request, for `edgepool trace` and an optional file.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceConfig {
    /// Fraction of reused requests traced (0 to 1). Requests on new connections and errors are
    /// always traced. Default [`DEFAULT_TRACE_SAMPLE_RATE`].
    pub sample_rate: f64,
    /// Also append the records (JSON lines) to this file. Default none.
    pub file: Option<PathBuf>,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            sample_rate: DEFAULT_TRACE_SAMPLE_RATE,
            file: None,
        }
    }
}

impl TraceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_rate) {
            return Err(invalid("trace.sample_rate", "must be between 0 and 1"));
        }
        Ok(())
    }
}

/// `[listen]`: where edgepool accepts connections.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// The forward proxy (plain HTTP and CONNECT). Default [`DEFAULT_LISTEN_PROXY`]
    /// (`127.0.0.1:8080`): loopback, so edgepool is not an open proxy until you say so.
    /// Must be an IP address and port (`"0.0.0.0:8080"`, `"[::]:8080"`), not a host name.
    pub proxy: SocketAddr,
    /// The admin endpoint (operators: metrics and control). Default [`DEFAULT_LISTEN_ADMIN`]
    /// (`127.0.0.1:9180`): loopback, so only the local host reaches it.
    /// Must differ from `proxy` (port 0, "any free port", may appear in both).
    pub admin: SocketAddr,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            proxy: DEFAULT_LISTEN_PROXY,
            admin: DEFAULT_LISTEN_ADMIN,
        }
    }
}

/// `[pool]`: the upstream connection pool. Mirrors [`PoolConfig`] (see
/// [`PoolSection::to_pool_config`]) plus the request queue timeout.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolSection {
    /// Max connections (open + being dialed) per target. Default [`DEFAULT_MAX_PER_KEY`]: high
    /// enough for a fleet busy on one site over HTTP/1.1, while bounding the load on that site. Must be ≥ 1 and ≤ `max_total`.
    pub max_per_key: usize,
    /// Max connections (open + being dialed) in the whole pool. Default [`DEFAULT_MAX_TOTAL`]:
    /// well under common file-descriptor limits. Must be ≥ 1.
    pub max_total: usize,
    /// Max idle connections in the whole pool; past it the least recently used idle one is
    /// closed. Default [`DEFAULT_MAX_IDLE_TOTAL`]: half of `max_total`, leaving room for busy
    /// connections. Must be ≥ 1 and ≤ `max_total`.
    pub max_idle_total: usize,
    /// A connection idle this long is closed. Default [`DEFAULT_IDLE_TIMEOUT`] (90 s): longer
    /// than most servers keep idle connections, so the server's timeout usually decides. Must
    /// be longer than `keepalive_margin`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A connection is retired after this many requests. Default absent: no limit of ours
    /// (servers announce theirs with `Keep-Alive: max=`). Must be ≥ 1 when present.
    pub max_requests: Option<u64>,
    /// A connection is retired after this long, even if busy (it finishes what it carries).
    /// Default absent: connections live as long as they are useful. Must be > 0 when present.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
    /// Retire a connection this long before the server's announced or learned idle timeout, so
    /// a request never races the server's close. Default [`DEFAULT_KEEPALIVE_MARGIN`] (1 s):
    /// covers a round trip on slow links.
    #[serde(with = "humantime_serde")]
    pub keepalive_margin: Duration,
    /// Learn a server's idle timeout from idle closes and retire connections before it.
    /// Default [`DEFAULT_LEARN_IDLE_TIMEOUT`] (`true`).
    pub learn_idle_timeout: bool,
    /// How long a request waits for a connection (when the target is at `max_per_key` or the
    /// pool at `max_total`) before the worker gets an error. Default [`DEFAULT_QUEUE_TIMEOUT`]
    /// (30 s). Must be > 0.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
}

impl Default for PoolSection {
    fn default() -> Self {
        PoolSection {
            max_per_key: DEFAULT_MAX_PER_KEY,
            max_total: DEFAULT_MAX_TOTAL,
            max_idle_total: DEFAULT_MAX_IDLE_TOTAL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_requests: None,
            max_lifetime: None,
            keepalive_margin: DEFAULT_KEEPALIVE_MARGIN,
            learn_idle_timeout: DEFAULT_LEARN_IDLE_TIMEOUT,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
        }
    }
}

impl PoolSection {
    /// The pool's own configuration: every field mapped one to one, and
    /// [`PoolConfig::sweep_interval`] = min(`idle_timeout` / 4, the pool's default sweep
    /// interval of 500 ms), at least 1 ms, so short idle timeouts are still enforced promptly.
    /// `queue_timeout` is not part of [`PoolConfig`]: the proxy applies it around checkout.
    pub fn to_pool_config(&self) -> PoolConfig {
        let default_sweep = PoolConfig::default().sweep_interval;
        let sweep_interval = (self.idle_timeout / 4)
            .min(default_sweep)
            .max(Duration::from_millis(1));
        PoolConfig {
            max_per_key: self.max_per_key,
            max_total: self.max_total,
            max_idle_total: self.max_idle_total,
            idle_timeout: self.idle_timeout,
            max_requests: self.max_requests,
            max_lifetime: self.max_lifetime,
            keepalive_margin: self.keepalive_margin,
            sweep_interval,
            learn_idle_timeout: self.learn_idle_timeout,
            max_remembered_keys: crate::pool::DEFAULT_MAX_REMEMBERED_KEYS,
        }
    }
}

/// `[upstream]`: how edgepool dials targets.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// TCP connect timeout, per address tried. Default [`DEFAULT_CONNECT_TIMEOUT`] (10 s).
    /// Must be > 0.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS handshake timeout towards targets. Default [`DEFAULT_TLS_HANDSHAKE_TIMEOUT`] (10 s).
    /// Must be > 0.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// How long to wait for a response's headers once the request is sent. Default
    /// [`DEFAULT_RESPONSE_HEADER_TIMEOUT`] (60 s). Must be > 0.
    #[serde(with = "humantime_serde")]
    pub response_header_timeout: Duration,
    /// Longest pause inside a response body; past it the body is cut off (the worker sees it
    /// fail) and the connection closed. Default [`DEFAULT_RESPONSE_BODY_IDLE_TIMEOUT`] (60 s).
    /// Must be > 0.
    #[serde(with = "humantime_serde")]
    pub response_body_idle_timeout: Duration,
    /// Offer ALPN `h2` to targets. Default [`DEFAULT_UPSTREAM_HTTP2`] (`true`); turn off for
    /// targets whose HTTP/2 misbehaves.
    pub http2: bool,
    /// PEM files of extra root certificates trusted for targets, in addition to the webpki
    /// roots (e.g. a corporate or test CA). Default empty. Each file must exist; a relative path
    /// is relative to the process's working directory.
    pub extra_ca_files: Vec<PathBuf>,
    /// Target host names whose certificate is NOT verified (opt-in, logged). Default
    /// empty: verification is never skipped unless named here. Exact host names only (no
    /// wildcards, ports or schemes); matched case-insensitively, ignoring a trailing dot.
    pub insecure_skip_verify: Vec<String>,
    /// Floor on how long a DNS answer is cached. Default [`DEFAULT_DNS_MIN_TTL`] (1 s). Must be
    /// ≤ `dns_max_ttl`.
    #[serde(with = "humantime_serde")]
    pub dns_min_ttl: Duration,
    /// Cap on how long a DNS answer is cached. Default [`DEFAULT_DNS_MAX_TTL`] (300 s).
    #[serde(with = "humantime_serde")]
    pub dns_max_ttl: Duration,
    /// DNS servers (`"ip:port"`) to ask instead of the system's (`/etc/resolv.conf`), over UDP
    /// with TCP fallback. Default empty: the system configuration. The hosts file is read
    /// either way.
    pub dns_servers: Vec<SocketAddr>,
    /// How long past its TTL an answer keeps serving while it is being refreshed or the
    /// resolver fails (RFC 8767 serve-stale). Default [`DEFAULT_DNS_STALE_TTL`] (1 h). `0s`
    /// turns serve-stale off: a request for an expired name waits for its refresh.
    #[serde(with = "humantime_serde")]
    pub dns_stale_ttl: Duration,
    /// How long one DNS attempt waits for an answer. Default [`DEFAULT_DNS_TIMEOUT`] (1 s).
    /// Must be > 0 and at most 30 s.
    #[serde(with = "humantime_serde")]
    pub dns_timeout: Duration,
    /// Attempts per lookup; a lookup gives up after `dns_timeout` × `dns_attempts` at the most.
    /// Default [`DEFAULT_DNS_ATTEMPTS`] (2). From 1 to 5.
    pub dns_attempts: u32,
    /// How long the second address family may lag once the first answered with addresses
    /// (RFC 8305 §3). Default [`DEFAULT_DNS_FAMILY_GRACE`] (50 ms). At most `dns_timeout`.
    #[serde(with = "humantime_serde")]
    pub dns_family_grace: Duration,
    /// Names kept in the DNS cache (least recently used forgotten first). Default
    /// [`DEFAULT_DNS_CACHE_SIZE`] (65,536). Must be > 0.
    pub dns_cache_size: usize,
    /// The hosts file: names it lists are answered from it alone, both families, with no DNS
    /// query (glibc's `files dns` order); re-read within a second of changing. Default
    /// [`DEFAULT_HOSTS_FILE`]. A missing file counts as empty (and is read when it appears);
    /// `""` turns the hosts file off.
    pub hosts_file: PathBuf,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            response_header_timeout: DEFAULT_RESPONSE_HEADER_TIMEOUT,
            response_body_idle_timeout: DEFAULT_RESPONSE_BODY_IDLE_TIMEOUT,
            http2: DEFAULT_UPSTREAM_HTTP2,
            extra_ca_files: Vec::new(),
            insecure_skip_verify: Vec::new(),
            dns_min_ttl: DEFAULT_DNS_MIN_TTL,
            dns_max_ttl: DEFAULT_DNS_MAX_TTL,
            dns_servers: Vec::new(),
            dns_stale_ttl: DEFAULT_DNS_STALE_TTL,
            dns_timeout: DEFAULT_DNS_TIMEOUT,
            dns_attempts: DEFAULT_DNS_ATTEMPTS,
            dns_family_grace: DEFAULT_DNS_FAMILY_GRACE,
            dns_cache_size: DEFAULT_DNS_CACHE_SIZE,
            hosts_file: PathBuf::from(DEFAULT_HOSTS_FILE),
        }
    }
}

impl UpstreamConfig {
    /// Whether `host` (a host name or IP address, without port) is listed in
    /// [`insecure_skip_verify`](Self::insecure_skip_verify). Case-insensitive, ignores a
    /// trailing dot and IPv6 brackets.
    pub fn skips_verify(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.insecure_skip_verify
            .iter()
            .any(|name| normalize_host(name).eq_ignore_ascii_case(host))
    }
}

/// `[intercept]`: TLS interception of CONNECT requests with edgepool's own CA.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InterceptConfig {
    /// true: CONNECT is intercepted; false: every CONNECT is a blind tunnel. Default
    /// [`DEFAULT_INTERCEPT_ENABLED`] (`true`): pooling needs to see the requests. Workers must
    /// trust edgepool's CA certificate.
    pub enabled: bool,
    /// Host patterns getting a blind tunnel even when interception is enabled: `"example.com"`
    /// (exactly that host) or `"*.example.com"` (any subdomain, not the apex). Default empty.
    /// Use it for targets that pin certificates or must not be intercepted. No other wildcards,
    /// no ports, no schemes.
    pub passthrough: Vec<String>,
    /// How many per-host leaf certificates are kept (LRU). Default [`DEFAULT_LEAF_CACHE_SIZE`]
    /// (1000). Must be ≥ 1.
    pub leaf_cache_size: usize,
    /// Validity of generated leaf certificates (never beyond the CA's own). Default
    /// [`DEFAULT_LEAF_VALIDITY`] (7 days). Must be > 0.
    #[serde(with = "humantime_serde")]
    pub leaf_validity: Duration,
    /// true: offer h2 to workers inside intercepted TLS. Default [`DEFAULT_WORKER_HTTP2`]
    /// (`true`).
    pub worker_http2: bool,
}

impl Default for InterceptConfig {
    fn default() -> Self {
        InterceptConfig {
            enabled: DEFAULT_INTERCEPT_ENABLED,
            passthrough: Vec::new(),
            leaf_cache_size: DEFAULT_LEAF_CACHE_SIZE,
            leaf_validity: DEFAULT_LEAF_VALIDITY,
            worker_http2: DEFAULT_WORKER_HTTP2,
        }
    }
}

impl InterceptConfig {
    /// Whether `host` (from the CONNECT authority, without port) matches a
    /// [`passthrough`](Self::passthrough) pattern: case-insensitive, ignoring a trailing dot
    /// (and IPv6 brackets). `"*.example.com"` matches `a.example.com` and `a.b.example.com`, not
    /// `example.com`. Does not consult [`enabled`](Self::enabled).
    pub fn is_passthrough(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.passthrough
            .iter()
            .any(|pattern| pattern_matches(normalize_host(pattern), host))
    }
}

/// `[limits]`: size limits on what workers send and on draining abandoned responses.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Max worker request body, in bytes. Bodies are buffered (so retries are exact); larger
    /// ones get 413. Default [`DEFAULT_MAX_REQUEST_BODY`] (8 MiB). Must be ≥ 1.
    pub max_request_body: u64,
    /// Max size of a `POST /v1/fetch` JSON document, in bytes. Default
    /// [`DEFAULT_MAX_FETCH_JSON`] (12 MiB). Must be ≥ 1.
    pub max_fetch_json: u64,
    /// When a worker leaves mid-response, read at most this many more bytes to keep the
    /// connection. Default [`DEFAULT_DRAIN_MAX_BYTES`] (256 KiB); 0 closes such connections.
    pub drain_max_bytes: u64,
    /// ... and for at most this long. Default [`DEFAULT_DRAIN_TIMEOUT`] (2 s). Must be > 0.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Max bytes of an HTTP/1 request head (request line and headers), and of an HTTP/2 header
    /// list. Default [`DEFAULT_MAX_HEADER_BYTES`]; 431 beyond. At least 1024.
    pub max_header_bytes: usize,
    /// Max header fields in one request. Default [`DEFAULT_MAX_HEADERS`]; 431 beyond. At least 1.
    pub max_headers: usize,
    /// Max bytes of the request target (URL). Default [`DEFAULT_MAX_URI_BYTES`]; 414 beyond.
    /// At least 256 and below `max_header_bytes`.
    pub max_uri_bytes: usize,
    /// Time a worker has to send a whole request head, from the connection's start or the
    /// head's first byte. Default [`DEFAULT_HEADER_READ_TIMEOUT`]; 408 past it. Above 0s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest pause allowed inside a request body. Default [`DEFAULT_BODY_IDLE_TIMEOUT`]; 408
    /// past it. Above 0s.
    #[serde(with = "humantime_serde")]
    pub body_idle_timeout: Duration,
    /// A worker connection with no request or response under way this long is closed; before
    /// its first request, `header_read_timeout` applies instead (an HTTP/2 connection that
    /// sends only its preface, or never finishes a HEADERS block, is closed then). Default
    /// [`DEFAULT_WORKER_IDLE_TIMEOUT`]. Above 0s.
    #[serde(with = "humantime_serde")]
    pub worker_idle_timeout: Duration,
    /// Max open connections from one worker IP address; more are answered 503 and closed.
    /// Default [`DEFAULT_MAX_CONNECTIONS_PER_WORKER`]. At least 1.
    pub max_connections_per_worker: usize,
    /// Max CONNECT tunnels (intercepted or blind) open at once; more get 503. Default
    /// [`DEFAULT_MAX_TUNNELS`]. At least 1.
    pub max_tunnels: usize,
    /// Max worker requests waiting for a response head at once; more get 503 with
    /// `Retry-After` before their body is read. Default [`DEFAULT_MAX_IN_FLIGHT`]. At least 1.
    pub max_in_flight: usize,
    /// Bytes of request bodies (and `/v1/fetch` documents) buffered at once; more get 503 with
    /// `Retry-After`. Default [`DEFAULT_MAX_BUFFERED_BYTES`] (1 GiB). At least
    /// `max_request_body`.
    pub max_buffered_bytes: u64,
    /// The share (0 < s ≤ 1) of `max_in_flight`, `max_tunnels` and `max_buffered_bytes` one
    /// worker address may hold; beyond it that address gets 503 while others are served.
    /// Default [`DEFAULT_MAX_WORKER_SHARE`] (0.5); 1 turns fairness off.
    pub max_worker_share: f64,
    /// Max DNS lookups at once; more wait their turn. Default [`DEFAULT_MAX_DNS_IN_FLIGHT`].
    /// At least 1.
    pub max_dns_in_flight: usize,
    /// Max concurrent streams per HTTP/2 worker connection (announced in SETTINGS). Default
    /// [`DEFAULT_H2_MAX_STREAMS`]. At least 1.
    pub h2_max_streams: u32,
    /// Streams a worker may reset before edgepool accepted them; past it the connection is
    /// closed (HTTP/2 rapid reset). Default [`DEFAULT_H2_MAX_PENDING_RESETS`]. At least 1.
    pub h2_max_pending_resets: usize,
    /// Streams edgepool may reset for a worker's protocol errors before it closes the
    /// connection. Default [`DEFAULT_H2_MAX_LOCAL_ERROR_RESETS`]. At least 1.
    pub h2_max_local_error_resets: usize,
    /// Requests a worker connection may cancel before their answers (HTTP/2 stream resets)
    /// while they are more than half of its requests; past it the connection is closed (the
    /// rapid-reset attack: every cancelled stream still cost edgepool work). Default
    /// [`DEFAULT_H2_MAX_CANCELLED_STREAMS`]. At least 1.
    pub h2_max_cancelled_streams: usize,
    /// Share of upstream requests that may be retries (a retry needs budget; every request adds
    /// some), plus 10 retries a second always allowed. Default [`DEFAULT_RETRY_BUDGET`] (0.2);
    /// 0 allows only the per-second floor. Between 0 and 1.
    pub retry_budget: f64,
    /// An upgraded connection (WebSocket, spliced after `101`) with no byte either way this
    /// long is closed. Default [`DEFAULT_UPGRADE_IDLE_TIMEOUT`] (120 s). Above 0s.
    #[serde(with = "humantime_serde")]
    pub upgrade_idle_timeout: Duration,
    /// An upgraded connection is closed this long after its `101`, busy or not. Default
    /// [`DEFAULT_UPGRADE_MAX_LIFETIME`] (6 h). Above 0s.
    #[serde(with = "humantime_serde")]
    pub upgrade_max_lifetime: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            max_fetch_json: DEFAULT_MAX_FETCH_JSON,
            drain_max_bytes: DEFAULT_DRAIN_MAX_BYTES,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_uri_bytes: DEFAULT_MAX_URI_BYTES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            worker_idle_timeout: DEFAULT_WORKER_IDLE_TIMEOUT,
            max_connections_per_worker: DEFAULT_MAX_CONNECTIONS_PER_WORKER,
            max_tunnels: DEFAULT_MAX_TUNNELS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            max_worker_share: DEFAULT_MAX_WORKER_SHARE,
            max_dns_in_flight: DEFAULT_MAX_DNS_IN_FLIGHT,
            h2_max_streams: DEFAULT_H2_MAX_STREAMS,
            h2_max_pending_resets: DEFAULT_H2_MAX_PENDING_RESETS,
            h2_max_local_error_resets: DEFAULT_H2_MAX_LOCAL_ERROR_RESETS,
            h2_max_cancelled_streams: DEFAULT_H2_MAX_CANCELLED_STREAMS,
            retry_budget: DEFAULT_RETRY_BUDGET,
            upgrade_idle_timeout: DEFAULT_UPGRADE_IDLE_TIMEOUT,
            upgrade_max_lifetime: DEFAULT_UPGRADE_MAX_LIFETIME,
        }
    }
}

/// Why a CIDR was refused (the text says how to write it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    /// An address without `/len` (`bits`: the length for this one address).
    #[error("{text} has no prefix length; write {text}/{bits} for this one address")]
    NoPrefix {
        /// The input.
        text: String,
        /// 32 or 128.
        bits: u8,
    },
    /// Neither an address nor `address/len`.
    #[error("{0:?} is not a CIDR (address/prefix length, e.g. 10.20.0.0/16)")]
    NotCidr(String),
    /// The part before `/` is no address.
    #[error("{0:?} is not an IPv4 or IPv6 address")]
    BadAddress(String),
    /// The prefix length is not a number in range for the family.
    #[error("prefix length /{len} is wrong for an {family} address: 0 to {max}")]
    BadPrefix {
        /// What was written after `/`.
        len: String,
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// 32 or 128.
        max: u8,
    },
    /// Bits set after the prefix (a typo, usually).
    #[error("{text} has host bits set; write {network} (or /{max} for a single address)")]
    HostBits {
        /// The input.
        text: String,
        /// What was probably meant.
        network: IpNet,
        /// 32 or 128.
        max: u8,
    },
}

/// Parses a CIDR for `--allow-target` / `targets.allow`, saying what is wrong: a missing or
/// too long prefix length, a bad address, host bits set.
pub fn parse_cidr(s: &str) -> Result<IpNet, CidrError> {
    parse_cidr_inner(s, true)
}

fn parse_cidr_inner(s: &str, host_bits_checked: bool) -> Result<IpNet, CidrError> {
    let s = s.trim();
    let Some((addr, len)) = s.split_once('/') else {
        return Err(match s.parse::<std::net::IpAddr>() {
            Ok(ip) => CidrError::NoPrefix {
                text: s.to_string(),
                bits: if ip.is_ipv4() { 32 } else { 128 },
            },
            Err(_) => CidrError::NotCidr(s.to_string()),
        });
    };
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| CidrError::BadAddress(addr.to_string()))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bad_prefix = || CidrError::BadPrefix {
        len: len.to_string(),
        family: if ip.is_ipv4() { "IPv4" } else { "IPv6" },
        max,
    };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(bad_prefix)?;
    let net = IpNet::new(ip, len).map_err(|_| bad_prefix())?;
    if host_bits_checked && net.trunc() != net {
        return Err(CidrError::HostBits {
            text: s.to_string(),
            network: net.trunc(),
            max,
        });
    }
    Ok(net)
}

fn deserialize_cidrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter()
        // Host bits are checked by `validate`, which names the entry.
        .map(|s| {
            parse_cidr_inner(s, false)
                .map_err(|why| serde::de::Error::custom(format!("targets.allow: {why}")))
        })
        .collect()
}

/// `[targets]`: which target addresses may be dialed.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TargetsConfig {
    /// CIDRs allowed in spite of the private/loopback deny list, e.g. `"10.20.0.0/16"` or
    /// `"127.0.0.1/32"` for a single address. Default empty: a proxy reachable by workers must
    /// not become a way into the internal network. Host bits must be zero (`"10.0.0.0/8"`, not
    /// `"10.1.2.3/8"`), to catch typos.
    #[serde(deserialize_with = "deserialize_cidrs")]
    pub allow: Vec<IpNet>,
    /// Ports a CONNECT may open a tunnel to: numbers (`443`) or ranges (`"8000-8999"`). Default
    /// [`DEFAULT_CONNECT_PORTS`] (443 and 80); other ports get 400 `connect_port_forbidden`.
    /// Absolute-form `http://host:port/` requests are not limited (they are HTTP either way).
    pub connect_ports: Vec<PortRange>,
}

impl Default for TargetsConfig {
    fn default() -> Self {
        TargetsConfig {
            allow: Vec::new(),
            connect_ports: DEFAULT_CONNECT_PORTS
                .iter()
                .map(|p| PortRange::single(*p))
                .collect(),
        }
    }
}

impl TargetsConfig {
    /// Whether a CONNECT to `port` is allowed by [`connect_ports`](Self::connect_ports).
    pub fn connect_port_allowed(&self, port: u16) -> bool {
        self.connect_ports.iter().any(|r| r.contains(port))
    }
}

/// A port or an inclusive range of ports: `443` or `"8000-8999"` in TOML.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// First port in the range.
    pub lo: u16,
    /// Last port in the range (inclusive).
    pub hi: u16,
}

impl PortRange {
    /// Just `port`.
    pub fn single(port: u16) -> Self {
        PortRange { lo: port, hi: port }
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
}

/// Why a port or port range was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortRangeError {
    /// Not a number from 1 to 65535.
    #[error("{0:?} is not a port (1-65535)")]
    NotAPort(String),
    /// `hi-lo`.
    #[error("{0:?}: the range starts after it ends")]
    Reversed(String),
}

impl std::str::FromStr for PortRange {
    type Err = PortRangeError;
    fn from_str(s: &str) -> Result<Self, PortRangeError> {
        let port = |p: &str| -> Result<u16, PortRangeError> {
            match p.trim().parse::<u16>() {
                Ok(0) | Err(_) => Err(PortRangeError::NotAPort(p.to_string())),
                Ok(n) => Ok(n),
            }
        };
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if lo > hi {
            return Err(PortRangeError::Reversed(s.to_string()));
        }
        Ok(PortRange { lo, hi })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(i64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Num(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// The resolver's settings from `[upstream]` and `[limits]`.
    pub fn dns(&self) -> crate::dns::DnsConfig {
        let up = &self.upstream;
        crate::dns::DnsConfig {
            servers: up.dns_servers.clone(),
            min_ttl: up.dns_min_ttl,
            max_ttl: up.dns_max_ttl,
            stale_ttl: up.dns_stale_ttl,
            timeout: up.dns_timeout,
            attempts: up.dns_attempts.max(1),
            family_grace: up.dns_family_grace,
            cache_size: up.dns_cache_size.max(1),
            hosts_file: (!up.hosts_file.as_os_str().is_empty()).then(|| up.hosts_file.clone()),
            max_in_flight: self.limits.max_dns_in_flight.max(1),
        }
    }
}

impl Default for crate::dns::DnsConfig {
    fn default() -> Self {
        Config::default().dns()
    }
}

impl Config {
    /// Parses a TOML document and validates it. Missing keys take their defaults; an unknown
    /// key or a wrong type is [`ConfigError::Parse`] (the message names the key, line and
    /// column); an inconsistent value is [`ConfigError::Invalid`].
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse(e.to_string().trim_end().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `path` ([`ConfigError::Read`] names it) and then [`Config::from_toml_str`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml_str(&text)
    }

    /// Checks ranges and consistency; the first problem found is returned as
    /// [`ConfigError::Invalid`] with its dotted key. Checks that `upstream.extra_ca_files`
    /// exist (it does not parse them).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(dir) = &self.data_dir {
            if dir.as_os_str().is_empty() {
                return Err(invalid(
                    "data_dir",
                    "must not be empty; remove the key to use the default data directory",
                ));
            }
        }
        self.listen.validate()?;
        self.pool.validate()?;
        self.upstream.validate()?;
        self.intercept.validate()?;
        self.limits.validate()?;
        self.targets.validate()?;
        self.slo.validate()?;
        self.trace.validate()?;
        self.auth.validate()?;
        self.exits.validate()?;
        self.runtime.validate()?;
        if !self.listen.proxy.ip().is_loopback() && self.auth.tokens.is_empty() {
            return Err(invalid(
                "listen.proxy",
                format!(
                    "{} is reachable from other hosts, and without auth.tokens (or --token) \
                     edgepool would be an open proxy; set worker tokens or listen on loopback",
                    self.listen.proxy
                ),
            ));
        }
        if !self.listen.admin.ip().is_loopback() && self.auth.admin_token.is_none() {
            return Err(invalid(
                "listen.admin",
                format!(
                    "{} is reachable from other hosts; set auth.admin_token so the admin \
                     endpoints (status, trace, the CA) need a bearer token, or listen on loopback",
                    self.listen.admin
                ),
            ));
        }
        Ok(())
    }

    /// The platform data directory (`$XDG_DATA_HOME/edgepool`, usually
    /// `~/.local/share/edgepool`, on Linux); [`FALLBACK_DATA_DIR`] when there is no home
    /// directory.
    pub fn default_data_dir() -> PathBuf {
        directories::ProjectDirs::from("", "", "edgepool")
            .map(|dirs| dirs.data_dir().to_path_buf())
            .unwrap_or_else(|| PathBuf::from(FALLBACK_DATA_DIR))
    }

    /// The configured [`data_dir`](Self::data_dir), or [`Config::default_data_dir`].
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(Config::default_data_dir)
    }
}

impl ListenConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let (p, a) = (self.proxy, self.admin);
        // An unspecified address binds every address of its family; `[::]` is dual-stack on
        // most systems, so count it as covering IPv4 too.
        let covers = |wild: IpAddr, other: IpAddr| {
            wild.is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
        };
        let overlapping_ip = p.ip() == a.ip() || covers(p.ip(), a.ip()) || covers(a.ip(), p.ip());
        if p.port() != 0 && p.port() == a.port() && overlapping_ip {
            return Err(invalid(
                "listen.admin",
                format!(
                    "{a} conflicts with listen.proxy ({p}); the two listeners need different ports"
                ),
            ));
        }
        Ok(())
    }
}

impl PoolSection {
    fn validate(&self) -> Result<(), ConfigError> {
        at_least_one(
            "pool.max_per_key",
            self.max_per_key as u64,
            "no connection could ever be opened",
        )?;
        at_least_one(
            "pool.max_total",
            self.max_total as u64,
            "no connection could ever be opened",
        )?;
        at_least_one(
            "pool.max_idle_total",
            self.max_idle_total as u64,
            "no connection could ever be kept for reuse",
        )?;
        if self.max_per_key > self.max_total {
            return Err(invalid(
                "pool.max_per_key",
                format!(
                    "{} exceeds pool.max_total ({}); one target can never have more connections than the whole pool",
                    self.max_per_key, self.max_total
                ),
            ));
        }
        if self.max_idle_total > self.max_total {
            return Err(invalid(
                "pool.max_idle_total",
                format!(
                    "{} exceeds pool.max_total ({}); idle connections count towards the total",
                    self.max_idle_total, self.max_total
                ),
            ));
        }
        positive("pool.idle_timeout", self.idle_timeout)?;
        if self.idle_timeout <= self.keepalive_margin {
            return Err(invalid(
                "pool.idle_timeout",
                format!(
                    "{} must be longer than pool.keepalive_margin ({}); otherwise connections are retired as soon as they are idle",
                    fmt_duration(self.idle_timeout),
                    fmt_duration(self.keepalive_margin)
                ),
            ));
        }
        if self.max_requests == Some(0) {
            return Err(invalid(
                "pool.max_requests",
                "must be at least 1 (a connection must carry a request); remove the key for no limit",
            ));
        }
        if let Some(lifetime) = self.max_lifetime {
            positive("pool.max_lifetime", lifetime)?;
        }
        positive("pool.queue_timeout", self.queue_timeout)?;
        Ok(())
    }
}

impl UpstreamConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("upstream.connect_timeout", self.connect_timeout)?;
        positive("upstream.tls_handshake_timeout", self.tls_handshake_timeout)?;
        positive(
            "upstream.response_header_timeout",
            self.response_header_timeout,
        )?;
        positive(
            "upstream.response_body_idle_timeout",
            self.response_body_idle_timeout,
        )?;
        for (i, path) in self.extra_ca_files.iter().enumerate() {
            if !path.is_file() {
                let what = if path.exists() {
                    "is not a file"
                } else {
                    "does not exist"
                };
                return Err(invalid(
                    "upstream.extra_ca_files",
                    format!("entry {i} ({}) {what}", path.display()),
                ));
            }
        }
        for (i, name) in self.insecure_skip_verify.iter().enumerate() {
            if let Err(why) = check_host(name) {
                return Err(invalid(
                    "upstream.insecure_skip_verify",
                    format!("entry {i} ({name:?}): {why}; expected an exact host name"),
                ));
            }
        }
        if self.dns_min_ttl > self.dns_max_ttl {
            return Err(invalid(
                "upstream.dns_min_ttl",
                format!(
                    "{} exceeds upstream.dns_max_ttl ({}); the floor must not be above the cap",
                    fmt_duration(self.dns_min_ttl),
                    fmt_duration(self.dns_max_ttl)
                ),
            ));
        }
        if self.dns_max_ttl > Duration::from_secs(86_400) {
            return Err(invalid(
                "upstream.dns_max_ttl",
                format!(
                    "{} is more than 1 day; a moved target would be dialled at its old address that long",
                    fmt_duration(self.dns_max_ttl)
                ),
            ));
        }
        if self.dns_stale_ttl > Duration::from_secs(7 * 86_400) {
            return Err(invalid(
                "upstream.dns_stale_ttl",
                format!(
                    "{} is more than 7 days (RFC 8767 suggests 1 to 3 days at the most)",
                    fmt_duration(self.dns_stale_ttl)
                ),
            ));
        }
        positive("upstream.dns_timeout", self.dns_timeout)?;
        if self.dns_timeout > Duration::from_secs(30) {
            return Err(invalid(
                "upstream.dns_timeout",
                format!(
                    "{} is more than 30s; a lookup that slow stalls every new target behind it",
                    fmt_duration(self.dns_timeout)
                ),
            ));
        }
        if !(1..=5).contains(&self.dns_attempts) {
            return Err(invalid(
                "upstream.dns_attempts",
                format!(
                    "{} is out of range; expected 1 to 5 (a lookup gives up after dns_timeout x dns_attempts)",
                    self.dns_attempts
                ),
            ));
        }
        if self.dns_family_grace > self.dns_timeout {
            return Err(invalid(
                "upstream.dns_family_grace",
                format!(
                    "{} exceeds upstream.dns_timeout ({}); the grace for the second address family must be shorter than a whole attempt",
                    fmt_duration(self.dns_family_grace),
                    fmt_duration(self.dns_timeout)
                ),
            ));
        }
        if self.dns_cache_size == 0 {
            return Err(invalid(
                "upstream.dns_cache_size",
                "must be at least 1 (every lookup would wait for the resolver)",
            ));
        }
        if !self.hosts_file.as_os_str().is_empty() && self.hosts_file.is_dir() {
            return Err(invalid(
                "upstream.hosts_file",
                format!(
                    "{} is a directory; expected a hosts file (or \"\" to turn it off)",
                    self.hosts_file.display()
                ),
            ));
        }
        Ok(())
    }
}

impl InterceptConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (i, pattern) in self.passthrough.iter().enumerate() {
            if let Err(why) = check_pattern(pattern) {
                return Err(invalid(
                    "intercept.passthrough",
                    format!(
                        "entry {i} ({pattern:?}): {why}; expected \"host.name\" or \"*.host.name\""
                    ),
                ));
            }
        }
        at_least_one(
            "intercept.leaf_cache_size",
            self.leaf_cache_size as u64,
            "the certificate being served must fit in the cache",
        )?;
        positive("intercept.leaf_validity", self.leaf_validity)?;
        Ok(())
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        at_least_one(
            "limits.max_request_body",
            self.max_request_body,
            "0 would refuse every request with a body",
        )?;
        at_least_one(
            "limits.max_fetch_json",
            self.max_fetch_json,
            "0 would refuse every fetch document",
        )?;
        positive("limits.drain_timeout", self.drain_timeout)?;
        if self.max_header_bytes < 1024 {
            return Err(invalid(
                "limits.max_header_bytes",
                format!(
                    "{} is too small; at least 1024 (ordinary requests need ~1 KiB)",
                    self.max_header_bytes
                ),
            ));
        }
        at_least_one(
            "limits.max_headers",
            self.max_headers as u64,
            "every request has a Host header",
        )?;
        if self.max_uri_bytes < 256 || self.max_uri_bytes >= self.max_header_bytes {
            return Err(invalid(
                "limits.max_uri_bytes",
                format!(
                    "{} must be at least 256 and below limits.max_header_bytes ({})",
                    self.max_uri_bytes, self.max_header_bytes
                ),
            ));
        }
        positive("limits.header_read_timeout", self.header_read_timeout)?;
        positive("limits.body_idle_timeout", self.body_idle_timeout)?;
        positive("limits.worker_idle_timeout", self.worker_idle_timeout)?;
        let why = "0 would refuse everything";
        at_least_one(
            "limits.max_connections_per_worker",
            self.max_connections_per_worker as u64,
            why,
        )?;
        at_least_one("limits.max_tunnels", self.max_tunnels as u64, why)?;
        at_least_one("limits.max_in_flight", self.max_in_flight as u64, why)?;
        if self.max_buffered_bytes < self.max_request_body {
            return Err(invalid(
                "limits.max_buffered_bytes",
                format!(
                    "{} is below limits.max_request_body ({}); no body of the allowed size could be buffered",
                    self.max_buffered_bytes, self.max_request_body
                ),
            ));
        }
        if !(self.max_worker_share > 0.0 && self.max_worker_share <= 1.0) {
            return Err(invalid(
                "limits.max_worker_share",
                format!(
                    "{} is out of range; expected a share above 0 and at most 1 (1 turns fairness off)",
                    self.max_worker_share
                ),
            ));
        }
        at_least_one(
            "limits.max_dns_in_flight",
            self.max_dns_in_flight as u64,
            why,
        )?;
        at_least_one("limits.h2_max_streams", self.h2_max_streams as u64, why)?;
        at_least_one(
            "limits.h2_max_pending_resets",
            self.h2_max_pending_resets as u64,
            "0 would close connections on any cancelled request",
        )?;
        at_least_one(
            "limits.h2_max_local_error_resets",
            self.h2_max_local_error_resets as u64,
            "0 would close connections on the first bad stream",
        )?;
        if !(0.0..=1.0).contains(&self.retry_budget) {
            return Err(invalid(
                "limits.retry_budget",
                format!("{} must be between 0 and 1", self.retry_budget),
            ));
        }
        positive("limits.upgrade_idle_timeout", self.upgrade_idle_timeout)?;
        positive("limits.upgrade_max_lifetime", self.upgrade_max_lifetime)?;
        Ok(())
    }
}

impl TargetsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (i, net) in self.allow.iter().enumerate() {
            if net.addr() != net.network() {
                return Err(invalid(
                    "targets.allow",
                    format!(
                        "entry {i} ({net}) has host bits set; write {} (or /{} for a single address)",
                        net.trunc(),
                        net.max_prefix_len()
                    ),
                ));
            }
        }
        if self.connect_ports.is_empty() {
            return Err(invalid(
                "targets.connect_ports",
                "empty: every CONNECT would be refused; the default is [443, 80]",
            ));
        }
        Ok(())
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// File could not be read.
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax or type error; message from toml includes line/column and the key.
    #[error("{0}")]
    Parse(String),
    /// A value is out of range or inconsistent; `key` is the dotted path, e.g. "pool.max_idle_total".
    #[error("invalid configuration value for `{key}`: {reason}")]
    Invalid {
        /// Dotted path of the offending key.
        key: String,
        /// What is wrong and why.
        reason: String,
    },
}

impl ConfigError {
    /// The dotted key of an [`Invalid`](ConfigError::Invalid) value; `None` for read and parse
    /// errors (a parse error names its key in the message).
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } | ConfigError::Parse(_) => None,
        }
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn positive(key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(key, "must be longer than 0s"));
    }
    Ok(())
}

fn at_least_one(key: &str, value: u64, why: &str) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(key, format!("must be at least 1: {why}")));
    }
    Ok(())
}

fn fmt_duration(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// Strips IPv6 brackets and one trailing dot.
fn normalize_host(host: &str) -> &str {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.strip_suffix('.').unwrap_or(host)
}

/// Whether normalized `host` matches normalized `pattern` (see [`InterceptConfig::is_passthrough`]).
fn pattern_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            let (h, s) = (host.as_bytes(), suffix.as_bytes());
            // At least one character, then a dot, then the suffix.
            h.len() >= s.len() + 2
                && h[h.len() - s.len()..].eq_ignore_ascii_case(s)
                && h[h.len() - s.len() - 1] == b'.'
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// Checks a passthrough pattern: a host (see [`check_host`]) or `*.` + a host name.
fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern == "*" {
        return Err(
            "a lone \"*\" would match every host; set intercept.enabled = false instead".into(),
        );
    }
    match pattern.strip_prefix("*.") {
        Some(rest) => {
            check_host(rest)?;
            if normalize_host(rest).parse::<IpAddr>().is_ok() {
                return Err("a wildcard cannot apply to an IP address".into());
            }
            Ok(())
        }
        None => check_host(pattern),
    }
}

/// Checks an exact host: an IP address, or a DNS name of letters, digits, '-' and '_' labels
/// (optionally with one trailing dot). Says what is wrong otherwise.
fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("empty".into());
    }
    if host.contains("://") {
        return Err("a scheme is not allowed, write the bare host name".into());
    }
    if host.contains('/') {
        return Err("a path is not allowed".into());
    }
    if host.contains('*') {
        return Err("only a leading \"*.\" wildcard is allowed".into());
    }
    let bare = normalize_host(host);
    if bare.parse::<Ipv6Addr>().is_ok() {
        return Ok(());
    }
    if host.contains(':') {
        return Err("a port is not allowed (patterns apply to every port)".into());
    }
    if bare.len() > 253 {
        return Err("longer than 253 characters".into());
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err("empty label (\"..\" or a leading dot)".into());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!("character {c:?} is not allowed in a host name"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../config/example.toml");

    fn parse_err(text: &str) -> ConfigError {
        match Config::from_toml_str(text) {
            Ok(c) => panic!("expected an error for {text:?}, got {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn example_parses_validates_and_equals_defaults() {
        let config = Config::from_toml_str(EXAMPLE).expect("example.toml is valid");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn worker_threads_are_bounded_and_named_in_errors() {
        let c = Config::from_toml_str("[runtime]\nworker_threads = 1\n").unwrap();
        assert_eq!(c.runtime.worker_threads, 1);
        let e = parse_err("[runtime]\nworker_threads = 1025\n").to_string();
        assert!(e.contains("runtime.worker_threads"), "{e}");
        assert!(e.contains("1025 is more than 1024"), "{e}");
        let e = parse_err("[runtime]\nworker_threads = -1\n").to_string();
        assert!(e.contains("worker_threads"), "{e}");
    }

    #[test]
    fn empty_document_gives_defaults() {
        assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
        Config::default().validate().unwrap();
    }

    #[test]
    fn empty_tables_give_defaults() {
        let text = "[listen]\n[pool]\n[upstream]\n[intercept]\n[limits]\n[targets]\n";
        assert_eq!(Config::from_toml_str(text).unwrap(), Config::default());
    }

    #[test]
    fn defaults_match_documented_values() {
        let c = Config::default();
        assert_eq!(c.listen.proxy, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.listen.admin, "127.0.0.1:9180".parse().unwrap());
        assert_eq!(c.data_dir, None);
        assert_eq!(c.pool.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.pool.queue_timeout, Duration::from_secs(30));
        assert_eq!(c.pool.keepalive_margin, Duration::from_secs(1));
        assert!(c.pool.learn_idle_timeout);
        assert_eq!(c.pool.max_requests, None);
        assert_eq!(c.pool.max_lifetime, None);
        assert_eq!(c.upstream.dns_max_ttl, Duration::from_secs(300));
        assert_eq!(c.intercept.leaf_validity, Duration::from_secs(7 * 86400));
        assert_eq!(c.limits.max_request_body, 8 * 1024 * 1024);
        assert_eq!(c.limits.max_fetch_json, 12 * 1024 * 1024);
        assert_eq!(c.limits.drain_max_bytes, 256 * 1024);
        assert!(c.targets.allow.is_empty());
    }

    #[test]
    fn unknown_key_is_rejected_naming_it() {
        let e = parse_err("[pool]\nmax_idel_total = 3");
        assert!(matches!(e, ConfigError::Parse(_)), "{e:?}");
        assert!(e.to_string().contains("max_idel_total"), "{e}");
        assert_eq!(e.key(), None);

        for (text, name) in [
            ("pooll = 1", "pooll"),
            ("[poool]\nmax_total = 3", "poool"),
            ("[listen]\nproxi = \"127.0.0.1:1\"", "proxi"),
            ("[upstream]\nhttp3 = true", "http3"),
            ("[intercept]\npass_through = []", "pass_through"),
            ("[limits]\nmax_body = 1", "max_body"),
            ("[targets]\ndeny = []", "deny"),
        ] {
            let e = parse_err(text);
            assert!(e.to_string().contains(name), "{text:?}: {e}");
        }
    }

    #[test]
    fn type_errors_name_the_key_and_line() {
        let e = parse_err("[pool]\n\nmax_total = \"many\"");
        let msg = e.to_string();
        assert!(msg.contains("max_total") && msg.contains("line 3"), "{msg}");
        let e = parse_err("[pool]\nidle_timeout = \"5 parsecs\"");
        assert!(e.to_string().contains("idle_timeout"), "{e}");
        let e = parse_err("[pool]\nmax_total = -1");
        assert!(e.to_string().contains("max_total"), "{e}");
        let e = parse_err("[listen]\nproxy = \"localhost:8080\"");
        assert!(e.to_string().contains("proxy"), "{e}");
    }

    #[test]
    fn durations_parse_as_humantime() {
        let c = Config::from_toml_str(
            r#"
            [pool]
            idle_timeout = "2m"
            queue_timeout = "1h 30m"
            keepalive_margin = "250ms"
            max_lifetime = "7d"
            [upstream]
            connect_timeout = "90s"
            dns_min_ttl = "0s"
            [intercept]
            leaf_validity = "2days"
            "#,
        )
        .unwrap();
        assert_eq!(c.pool.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.pool.queue_timeout, Duration::from_secs(5400));
        assert_eq!(c.pool.keepalive_margin, Duration::from_millis(250));
        assert_eq!(c.pool.max_lifetime, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(90));
        assert_eq!(c.upstream.dns_min_ttl, Duration::ZERO);
        assert_eq!(c.intercept.leaf_validity, Duration::from_secs(2 * 86400));
    }

    #[test]
    fn every_value_parses() {
        let c = Config::from_toml_str(
            r#"
            data_dir = "/var/lib/edgepool"
            [listen]
            proxy = "0.0.0.0:3128"
            admin = "[::1]:9000"
            [auth]
            tokens = ["team_a"]
            [pool]
            max_per_key = 10
            max_total = 100
            max_idle_total = 50
            max_requests = 1000
            learn_idle_timeout = false
            [upstream]
            http2 = false
            insecure_skip_verify = ["self-signed.test", "10.0.0.5"]
            [intercept]
            enabled = false
            passthrough = ["bank.example", "*.bank.example"]
            leaf_cache_size = 5
            worker_http2 = false
            [limits]
            max_request_body = 1
            max_fetch_json = 2
            drain_max_bytes = 0
            drain_timeout = "1s"
            [targets]
            allow = ["127.0.0.0/8", "::1/128", "10.20.0.0/16"]
            "#,
        )
        .unwrap();
        assert_eq!(c.data_dir, Some(PathBuf::from("/var/lib/edgepool")));
        assert_eq!(c.data_dir(), PathBuf::from("/var/lib/edgepool"));
        assert_eq!(c.listen.proxy, "0.0.0.0:3128".parse().unwrap());
        assert_eq!(c.listen.admin, "[::1]:9000".parse().unwrap());
        assert_eq!(
            (c.pool.max_per_key, c.pool.max_total, c.pool.max_idle_total),
            (10, 100, 50)
        );
        assert_eq!(c.pool.max_requests, Some(1000));
        assert!(!c.pool.learn_idle_timeout);
        assert!(!c.upstream.http2);
        assert!(c.upstream.skips_verify("Self-Signed.test."));
        assert!(c.upstream.skips_verify("10.0.0.5"));
        assert!(!c.upstream.skips_verify("a.self-signed.test"));
        assert!(!c.intercept.enabled);
        assert_eq!(c.intercept.leaf_cache_size, 5);
        assert!(!c.intercept.worker_http2);
        assert_eq!(c.limits.drain_max_bytes, 0);
        assert_eq!(c.targets.allow.len(), 3);
        assert!(c.targets.allow[0].contains(&"127.1.2.3".parse::<IpAddr>().unwrap()));
    }

    #[test]
    fn each_validation_rule_names_its_key() {
        let cases: &[(&str, &str)] = &[
            ("data_dir = \"\"", "data_dir"),
            ("[listen]\nproxy = \"0.0.0.0:8080\"", "listen.proxy"),
            ("[listen]\nadmin = \"[::]:9180\"", "listen.admin"),
            ("[auth]\nadmin_token = \"short\"", "auth.admin_token"),
            ("[auth]\ntokens = [\"has-dash\"]", "auth.tokens[0]"),
            ("[exits]\njitter = 0.9", "exits.jitter"),
            (
                "[[exits.pools]]\nname = \"direct\"\nnodes = [\"direct\"]",
                "exits.pools[0].name",
            ),
            (
                "[[exits.pools]]\nname = \"dc\"\nnodes = [\"ftp://h:1\"]",
                "exits.pools[0].nodes[0]",
            ),
            (
                "[[exits.pools]]\nname = \"gw\"\nnodes = [\"http://h:1\"]\nsession_template = \"{user}-s-{session}\"",
                "exits.pools[0].session_template",
            ),
            (
                "[listen]\nproxy = \"127.0.0.1:7000\"\nadmin = \"127.0.0.1:7000\"",
                "listen.admin",
            ),
            (
                "[listen]\nproxy = \"0.0.0.0:7000\"\nadmin = \"127.0.0.1:7000\"",
                "listen.admin",
            ),
            (
                "[listen]\nproxy = \"[::1]:7000\"\nadmin = \"[::]:7000\"",
                "listen.admin",
            ),
            (
                "[listen]\nproxy = \"[::]:7000\"\nadmin = \"127.0.0.1:7000\"",
                "listen.admin",
            ),
            ("[pool]\nmax_per_key = 0", "pool.max_per_key"),
            ("[pool]\nmax_total = 0", "pool.max_total"),
            ("[pool]\nmax_idle_total = 0", "pool.max_idle_total"),
            (
                "[pool]\nmax_total = 10\nmax_per_key = 11\nmax_idle_total = 5",
                "pool.max_per_key",
            ),
            (
                "[pool]\nmax_total = 10\nmax_per_key = 10\nmax_idle_total = 11",
                "pool.max_idle_total",
            ),
            ("[pool]\nidle_timeout = \"0s\"", "pool.idle_timeout"),
            (
                "[pool]\nidle_timeout = \"1s\"\nkeepalive_margin = \"1s\"",
                "pool.idle_timeout",
            ),
            (
                "[pool]\nidle_timeout = \"5s\"\nkeepalive_margin = \"10s\"",
                "pool.idle_timeout",
            ),
            ("[pool]\nmax_requests = 0", "pool.max_requests"),
            ("[pool]\nmax_lifetime = \"0s\"", "pool.max_lifetime"),
            ("[pool]\nqueue_timeout = \"0s\"", "pool.queue_timeout"),
            (
                "[upstream]\nconnect_timeout = \"0s\"",
                "upstream.connect_timeout",
            ),
            (
                "[upstream]\ntls_handshake_timeout = \"0ms\"",
                "upstream.tls_handshake_timeout",
            ),
            (
                "[upstream]\nresponse_header_timeout = \"0s\"",
                "upstream.response_header_timeout",
            ),
            (
                "[upstream]\nextra_ca_files = [\"/nonexistent/edgepool-test-ca.pem\"]",
                "upstream.extra_ca_files",
            ),
            (
                "[upstream]\nextra_ca_files = [\"/\"]",
                "upstream.extra_ca_files",
            ),
            (
                "[upstream]\ninsecure_skip_verify = [\"*.example.com\"]",
                "upstream.insecure_skip_verify",
            ),
            (
                "[upstream]\ninsecure_skip_verify = [\"example.com:443\"]",
                "upstream.insecure_skip_verify",
            ),
            (
                "[upstream]\ndns_min_ttl = \"10m\"\ndns_max_ttl = \"5m\"",
                "upstream.dns_min_ttl",
            ),
            ("[upstream]\ndns_max_ttl = \"2d\"", "upstream.dns_max_ttl"),
            ("[upstream]\ndns_stale_ttl = \"30d\"", "upstream.dns_stale_ttl"),
            ("[upstream]\ndns_timeout = \"0s\"", "upstream.dns_timeout"),
            ("[upstream]\ndns_timeout = \"1m\"", "upstream.dns_timeout"),
            ("[upstream]\ndns_attempts = 0", "upstream.dns_attempts"),
            ("[upstream]\ndns_attempts = 9", "upstream.dns_attempts"),
            (
                "[upstream]\ndns_family_grace = \"2s\"",
                "upstream.dns_family_grace",
            ),
            ("[upstream]\ndns_cache_size = 0", "upstream.dns_cache_size"),
            ("[upstream]\nhosts_file = \"/\"", "upstream.hosts_file"),
            ("[intercept]\npassthrough = [\"\"]", "intercept.passthrough"),
            (
                "[intercept]\npassthrough = [\"*\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\npassthrough = [\"*.\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\npassthrough = [\"a.*.example.com\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\npassthrough = [\"*example.com\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\npassthrough = [\"**.example.com\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\npassthrough = [\"example.*\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\npassthrough = [\"example.com:443\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\npassthrough = [\"https://example.com\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\npassthrough = [\"example.com/path\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\npassthrough = [\"exa mple.com\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\npassthrough = [\"example..com\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\npassthrough = [\"-example.com\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\npassthrough = [\"*.10.0.0.1\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\npassthrough = [\"ok.example\", \"bad:1\"]",
                "intercept.passthrough",
            ),
            (
                "[intercept]\nleaf_cache_size = 0",
                "intercept.leaf_cache_size",
            ),
            (
                "[intercept]\nleaf_validity = \"0s\"",
                "intercept.leaf_validity",
            ),
            ("[limits]\nmax_request_body = 0", "limits.max_request_body"),
            ("[limits]\nmax_fetch_json = 0", "limits.max_fetch_json"),
            ("[limits]\ndrain_timeout = \"0s\"", "limits.drain_timeout"),
            ("[targets]\nallow = [\"10.1.2.3/8\"]", "targets.allow"),
        ];
        for (text, key) in cases {
            let e = parse_err(text);
            assert_eq!(e.key(), Some(*key), "{text:?}: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains(key),
                "{text:?}: message does not name the key: {msg}"
            );
        }
    }

    #[test]
    fn boundary_values_are_accepted() {
        for text in [
            "[pool]\nmax_per_key = 1\nmax_total = 1\nmax_idle_total = 1",
            "[pool]\nidle_timeout = \"1001ms\"\nkeepalive_margin = \"1s\"",
            "[pool]\nkeepalive_margin = \"0s\"",
            "[pool]\nmax_requests = 1",
            "[upstream]\ndns_min_ttl = \"0s\"\ndns_max_ttl = \"0s\"",
            "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"",
            "[listen]\nproxy = \"127.0.0.1:7000\"\nadmin = \"127.0.0.2:7000\"",
            "[listen]\nproxy = \"0.0.0.0:7000\"\nadmin = \"[::1]:7000\"\n[auth]\ntokens = [\"t\"]",
            "[listen]\nadmin = \"0.0.0.0:7001\"\n[auth]\nadmin_token = \"0123456789abcdef\"",
            "[limits]\ndrain_max_bytes = 0",
            "[intercept]\npassthrough = [\"com\", \"*.com\", \"Example.COM.\", \"10.0.0.1\", \"[::1]\", \"::1\", \"_svc.example\"]",
            "[upstream]\ninsecure_skip_verify = [\"10.0.0.1\", \"[::1]\", \"host.internal\"]",
            "[targets]\nallow = [\"10.1.2.3/32\", \"0.0.0.0/0\"]",
        ] {
            if let Err(e) = Config::from_toml_str(text) {
                panic!("{text:?} rejected: {e}");
            }
        }
    }

    #[test]
    fn extra_ca_files_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("corp-root.pem");
        std::fs::write(&pem, "not checked here").unwrap();
        let mut c = Config::default();
        c.upstream.extra_ca_files = vec![pem.clone()];
        c.validate().unwrap();
        c.upstream
            .extra_ca_files
            .push(dir.path().join("missing.pem"));
        let e = c.validate().unwrap_err();
        assert_eq!(e.key(), Some("upstream.extra_ca_files"));
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }

    #[test]
    fn load_reads_the_file_and_names_it_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edgepool.toml");
        std::fs::write(
            &path,
            "[pool]\nmax_total = 20\nmax_per_key = 2\nmax_idle_total = 10\n",
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!((c.pool.max_total, c.pool.max_per_key), (20, 2));

        let missing = dir.path().join("nope.toml");
        let e = Config::load(&missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("nope.toml"), "{e}");
        assert_eq!(e.key(), None);

        std::fs::write(&path, "[pool]\nmax_total = 0\n").unwrap();
        assert_eq!(
            Config::load(&path).unwrap_err().key(),
            Some("pool.max_total")
        );
    }

    #[test]
    fn passthrough_matching() {
        let ic = InterceptConfig {
            passthrough: vec![
                "exact.example".into(),
                "*.wild.example".into(),
                "Mixed.Example.".into(),
                "[::1]".into(),
            ],
            ..InterceptConfig::default()
        };
        // exact
        assert!(ic.is_passthrough("exact.example"));
        assert!(!ic.is_passthrough("sub.exact.example"));
        assert!(!ic.is_passthrough("notexact.example"));
        // wildcard: any subdomain, any depth, not the apex
        assert!(ic.is_passthrough("a.wild.example"));
        assert!(ic.is_passthrough("a.b.wild.example"));
        assert!(!ic.is_passthrough("wild.example"));
        assert!(!ic.is_passthrough("notwild.example"));
        assert!(!ic.is_passthrough(".wild.example"));
        // case-insensitive, both ways
        assert!(ic.is_passthrough("EXACT.Example"));
        assert!(ic.is_passthrough("A.WILD.EXAMPLE"));
        assert!(ic.is_passthrough("mixed.example"));
        // trailing dot on host or pattern
        assert!(ic.is_passthrough("exact.example."));
        assert!(ic.is_passthrough("a.wild.example."));
        assert!(!ic.is_passthrough("wild.example."));
        assert!(ic.is_passthrough("mixed.example."));
        // IPv6, with or without brackets
        assert!(ic.is_passthrough("::1"));
        assert!(ic.is_passthrough("[::1]"));
        // nothing else; non-ASCII does not panic
        assert!(!ic.is_passthrough("other.example"));
        assert!(!ic.is_passthrough(""));
        assert!(!ic.is_passthrough("é.wild.exampleé"));
        assert!(!InterceptConfig::default().is_passthrough("exact.example"));
    }

    #[test]
    fn to_pool_config_maps_every_field() {
        let section = PoolSection {
            max_per_key: 3,
            max_total: 30,
            max_idle_total: 20,
            idle_timeout: Duration::from_secs(1),
            max_requests: Some(7),
            max_lifetime: Some(Duration::from_secs(600)),
            keepalive_margin: Duration::from_millis(100),
            learn_idle_timeout: false,
            queue_timeout: Duration::from_secs(5),
        };
        let pc = section.to_pool_config();
        assert_eq!(pc.max_per_key, 3);
        assert_eq!(pc.max_total, 30);
        assert_eq!(pc.max_idle_total, 20);
        assert_eq!(pc.idle_timeout, Duration::from_secs(1));
        assert_eq!(pc.max_requests, Some(7));
        assert_eq!(pc.max_lifetime, Some(Duration::from_secs(600)));
        assert_eq!(pc.keepalive_margin, Duration::from_millis(100));
        assert!(!pc.learn_idle_timeout);
        // idle_timeout / 4 when that is below the pool's default sweep interval
        assert_eq!(pc.sweep_interval, Duration::from_millis(250));
        // floor of 1 ms
        let tiny = PoolSection {
            idle_timeout: Duration::from_micros(2),
            ..section
        };
        assert_eq!(
            tiny.to_pool_config().sweep_interval,
            Duration::from_millis(1)
        );
    }

    #[test]
    fn default_pool_section_equals_pool_defaults() {
        let ours = PoolSection::default().to_pool_config();
        let pool = PoolConfig::default();
        assert_eq!(ours.max_per_key, pool.max_per_key);
        assert_eq!(ours.max_total, pool.max_total);
        assert_eq!(ours.max_idle_total, pool.max_idle_total);
        assert_eq!(ours.idle_timeout, pool.idle_timeout);
        assert_eq!(ours.max_requests, pool.max_requests);
        assert_eq!(ours.max_lifetime, pool.max_lifetime);
        assert_eq!(ours.keepalive_margin, pool.keepalive_margin);
        assert_eq!(ours.sweep_interval, pool.sweep_interval);
        assert_eq!(ours.learn_idle_timeout, pool.learn_idle_timeout);
    }

    #[test]
    fn data_dir_defaults_to_platform_dir() {
        let c = Config::default();
        assert_eq!(c.data_dir(), Config::default_data_dir());
        assert!(
            Config::default_data_dir().ends_with("edgepool")
                || Config::default_data_dir() == Path::new(FALLBACK_DATA_DIR)
        );
    }

    #[test]
    fn error_display_and_key() {
        let e = invalid("pool.max_total", "must be at least 1");
        assert_eq!(
            e.to_string(),
            "invalid configuration value for `pool.max_total`: must be at least 1"
        );
        assert_eq!(e.key(), Some("pool.max_total"));
    }
}
