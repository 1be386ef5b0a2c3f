//! dns: target names to addresses, kept off the request path.
//!
//! A pool hit must not wait for DNS, and a resolver that is slow, refusing or dead must not
//! stall traffic to targets edgepool already knows. So names are answered from our own cache,
//! and the resolver is asked in the background:
//!
//! ```text
//! resolve(name) ── IP literal / localhost ─────────────────────────► answer
//!               ── listed in the hosts file (final, both families) ► answer
//!               ── cache: fresh ───────────────► answer (past 3/4 of the TTL: refresh in background)
//!                         expired < stale_ttl ─► last good answer, refresh in background (RFC 8767)
//!                         failed < 1 s ────────► the remembered failure
//!                         none / past stale ───► wait for the one lookup of the name (coalesced)
//! lookup (spawned) ── A ─┐ first family with addresses wins; the other gets `family_grace`
//!                  ── AAAA ┘ (RFC 8305 §3) and is merged when it arrives; each ≤ timeout × attempts
//! ```
//!
//! Safety: every answer is checked against the [`TargetPolicy`] when it enters the cache (an
//! answer holding one refused address is refused whole), and the forwarder checks each
//! address again where it is used. A refresh that turns forbidden replaces the answer: from
//! then on requests for the name are refused; warm connections to the earlier (allowed)
//! addresses get no more requests and close at their idle timeout.
//!
//! Stability: when an answer changes, addresses that were in the previous answer keep their
//! places in front (within a family, IPv4 first). A round-robin resolver that rotates its
//! answer therefore never moves the address edgepool connects to, and a warm connection to an
//! address still in the answer stays in use.
//!
//! Lock: one short `parking_lot` mutex over the cache map, never held across `.await`; lookups
//! run in spawned tasks (a worker that gives up does not cancel the lookup others wait for).
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::guard::TargetPolicy;

/// A refresh starts once an answer has lived this share of its TTL (refresh-ahead), so names
/// in use are renewed before they expire.
pub const REFRESH_AHEAD: f64 = 0.75;
/// A name that has no usable answer and whose lookup failed answers with that failure for
/// this long before the resolver is asked again (so a burst of requests for a dead name costs
/// one lookup, not one each).
pub const FAILURE_HOLD: Duration = Duration::from_secs(1);
/// After a failed background refresh, the next one waits this long (the last good answer keeps
/// serving meanwhile).
pub const REFRESH_RETRY: Duration = Duration::from_secs(5);
/// A background refresh that finds every lookup slot taken (`limits.max_dns_in_flight`) is
/// skipped and tried again after this long (the cached answer keeps serving).
pub const REFRESH_BUSY_RETRY: Duration = Duration::from_secs(1);
/// Caps applied whatever the configuration says (validation refuses more), so clock sums
/// cannot overflow.
const MAX_TTL_CAP: Duration = Duration::from_secs(86_400);
const MAX_STALE_CAP: Duration = Duration::from_secs(7 * 86_400);
/// How often the hosts file is checked for changes.
pub const HOSTS_POLL: Duration = Duration::from_secs(1);

/// Settings of the [`Resolver`] (from `[upstream]` and `[limits]`: `Config::dns`; the
/// default is the embedded configuration's).
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Servers to ask; empty: the system configuration (`/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
    /// Floor on an answer's TTL.
    pub min_ttl: Duration,
    /// Cap on an answer's TTL.
    pub max_ttl: Duration,
    /// How long past its TTL an answer keeps serving (RFC 8767).
    pub stale_ttl: Duration,
    /// One attempt's timeout.
    pub timeout: Duration,
    /// Attempts per lookup (≥ 1).
    pub attempts: u32,
    /// How long the second address family may lag the first (RFC 8305 §3).
    pub family_grace: Duration,
    /// Names kept in the cache.
    pub cache_size: usize,
    /// The hosts file, if any.
    pub hosts_file: Option<PathBuf>,
    /// Lookups at once; more wait their turn.
    pub max_in_flight: usize,
}

impl DnsConfig {
    /// The longest a lookup can take: `timeout` × `attempts`.
    pub fn lookup_limit(&self) -> Duration {
        self.timeout * self.attempts.max(1)
    }
}

/// Where an answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// The name was an IP address (or `localhost`).
    Literal,
    /// The hosts file.
    Hosts,
    /// The cache, within the TTL.
    Fresh,
    /// The cache, past the TTL but within `dns_stale_ttl` (a refresh is under way or failed).
    Stale,
    /// A lookup this request started and waited for.
    Lookup,
    /// A lookup another request had started (coalesced), waited for.
    Joined,
}

impl Source {
    /// Label for metrics and the trace.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Literal => "literal",
            Source::Hosts => "hosts",
            Source::Fresh => "hit",
            Source::Stale => "stale",
            Source::Lookup => "miss",
            Source::Joined => "joined",
        }
    }

    /// Whether the request waited for the resolver.
    pub fn waited(self) -> bool {
        matches!(self, Source::Lookup | Source::Joined)
    }
}

/// The addresses of a name, in the order to try them (IPv4 first; within a family, addresses
/// of the previous answer first).
#[derive(Clone, Debug)]
pub struct Resolved {
    /// Never empty.
    pub addrs: Arc<[IpAddr]>,
    /// Where they came from.
    pub source: Source,
}

/// Why a name gives no usable address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolveError {
    /// The answer holds an address the target policy refuses; the whole answer is refused.
    Forbidden {
        /// The refused address.
        ip: IpAddr,
        /// Why (e.g. "loopback").
        why: &'static str,
    },
    /// No address: a sentence naming the families, the resolver and the limit that was hit.
    Failed(Arc<str>),
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::Forbidden { ip, why } => write!(f, "resolves to {ip}, a {why} address"),
            ResolveError::Failed(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for ResolveError {}

type Outcome = Result<Resolved, ResolveError>;

/// Resolves target names: hosts file, then a serve-stale, refresh-ahead cache in front of
/// hickory. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("servers", &self.inner.servers)
            .field("cached_names", &self.cached_names())
            .finish_non_exhaustive()
    }
}

struct Inner {
    dns: hickory_resolver::TokioResolver,
    cfg: DnsConfig,
    policy: TargetPolicy,
    /// Who is asked, for error sentences ("127.0.0.1:53, 10.0.0.2:53").
    servers: String,
    /// Names → answers. The one lock of this module; never held across `.await`.
    cache: Mutex<LruCache<Box<str>, Entry>>,
    hosts: Option<HostsFile>,
    /// The hosts-file watcher has been started (on the first lookup: `new` may run outside a
    /// runtime).
    watching: AtomicBool,
    /// Bounds lookups at once (`limits.max_dns_in_flight`).
    in_flight: Semaphore,
    /// Ids of lookups and answer generations.
    next_id: std::sync::atomic::AtomicU64,
    metrics: DnsMetrics,
}

/// One name's state.
#[derive(Default)]
struct Entry {
    /// The last good answer (or a forbidden one), with its clocks.
    answer: Option<Answer>,
    /// The lookup under way for this name, if any: waiters subscribe, nobody starts another.
    lookup: Option<Pending>,
    /// A failed lookup, answered until the instant (only when there is no usable answer).
    failure: Option<(ResolveError, Instant)>,
    /// No background refresh before this (set after a refresh failed).
    retry_at: Option<Instant>,
    /// Set at every new answer (from [`Inner::next_id`]), so a late address family merges only
    /// into its own answer, even across an eviction.
    generation: u64,
}

/// A lookup under way: its id (only it may clear itself from the entry) and its outcome.
struct Pending {
    id: u64,
    rx: watch::Receiver<Option<Outcome>>,
}

struct Answer {
    addrs: Arc<[IpAddr]>,
    /// The first address the policy refuses, if any (then the whole answer is refused).
    forbidden: Option<(IpAddr, &'static str)>,
    refresh_at: Instant,
    expires: Instant,
    stale_until: Instant,
}

impl Answer {
    fn outcome(&self, source: Source) -> Outcome {
        match self.forbidden {
            Some((ip, why)) => Err(ResolveError::Forbidden { ip, why }),
            None => Ok(Resolved {
                addrs: self.addrs.clone(),
                source,
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    fn holds(self, ip: &IpAddr) -> bool {
        match self {
            IpFamily::V4 => ip.is_ipv4(),
            IpFamily::V6 => ip.is_ipv6(),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "A",
            IpFamily::V6 => "AAAA",
        }
    }
}

/// What one family's query gave.
#[derive(Clone, Debug)]
enum FamilyAnswer {
    Addrs { ips: Vec<IpAddr>, ttl: Duration },
    Empty { nxdomain: bool },
    Failed(FamilyFailure),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum FamilyFailure {
    Timeout,
    Refused,
    ServerFailure(String),
    Unreachable(String),
    Other(String),
    /// Never sent: every lookup slot stayed taken.
    Busy,
}

impl FamilyAnswer {
    fn has_addrs(&self) -> bool {
        matches!(self, FamilyAnswer::Addrs { .. })
    }
    fn label(&self) -> &'static str {
        match self {
            FamilyAnswer::Addrs { .. } => "ok",
            FamilyAnswer::Empty { nxdomain: true } => "nxdomain",
            FamilyAnswer::Empty { nxdomain: false } => "empty",
            FamilyAnswer::Failed(FamilyFailure::Timeout) => "timeout",
            FamilyAnswer::Failed(FamilyFailure::Refused) => "refused",
            FamilyAnswer::Failed(FamilyFailure::ServerFailure(_)) => "servfail",
            FamilyAnswer::Failed(FamilyFailure::Unreachable(_)) => "unreachable",
            FamilyAnswer::Failed(FamilyFailure::Other(_)) => "error",
            FamilyAnswer::Failed(FamilyFailure::Busy) => "busy",
        }
    }
}

impl Resolver {
    /// A resolver with `cfg`, checking answers against `policy`, its metrics registered in
    /// `registry`. Reads the hosts file once now; a background task re-reads it on change once
    /// the first lookup runs inside a Tokio runtime.
    pub fn new(mut cfg: DnsConfig, policy: TargetPolicy, registry: &mut Registry) -> Resolver {
        // What `Config::validate` enforces, again here for callers that build a DnsConfig by
        // hand: the clock arithmetic below relies on it.
        cfg.max_ttl = cfg.max_ttl.min(MAX_TTL_CAP);
        cfg.min_ttl = cfg.min_ttl.min(cfg.max_ttl);
        cfg.stale_ttl = cfg.stale_ttl.min(MAX_STALE_CAP);
        cfg.timeout = cfg
            .timeout
            .clamp(Duration::from_millis(1), Duration::from_secs(30));
        cfg.attempts = cfg.attempts.clamp(1, 5);
        cfg.family_grace = cfg.family_grace.min(cfg.timeout);
        let (dns, servers) = build_hickory(&cfg);
        let hosts = cfg.hosts_file.as_deref().map(HostsFile::open);
        let metrics = DnsMetrics::register(registry);
        let capacity = std::num::NonZeroUsize::new(cfg.cache_size.max(1)).expect("at least 1");
        Resolver {
            inner: Arc::new(Inner {
                dns,
                servers,
                cache: Mutex::new(LruCache::new(capacity)),
                hosts,
                watching: AtomicBool::new(false),
                in_flight: Semaphore::new(cfg.max_in_flight.max(1)),
                next_id: std::sync::atomic::AtomicU64::new(1),
                metrics,
                policy,
                cfg,
            }),
        }
    }

    /// The addresses of `host` (lower-case, IPv6 without brackets). Answers from the hosts file
    /// or the cache at once; waits only for a name never seen, or whose answer is past
    /// `stale_ttl` (or just failed). An answer holding an address the target policy refuses
    /// is [`ResolveError::Forbidden`].
    pub async fn resolve(&self, host: &str) -> Result<Resolved, ResolveError> {
        self.lookup(host, true).await
    }

    /// Like [`resolve`](Self::resolve) for names the operator configured (exit proxies), which
    /// may well be private addresses: the target policy does not apply. Same cache, same
    /// hosts file, same bounds — a dead resolver does not stall dials to a known exit either.
    pub async fn resolve_configured(&self, host: &str) -> Result<Resolved, ResolveError> {
        self.lookup(host, false).await
    }

    async fn lookup(&self, host: &str, checked: bool) -> Result<Resolved, ResolveError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.inner.metrics.answered(Source::Literal);
            return Ok(Resolved {
                addrs: Arc::from([ip]),
                source: Source::Literal,
            });
        }
        let name = normalize(host);
        let name: &str = &name;
        if name == "localhost" || name.ends_with(".localhost") {
            // RFC 6761 §6.3: always loopback, both families, never sent to DNS.
            self.inner.metrics.answered(Source::Literal);
            return Ok(Resolved {
                addrs: Arc::from([
                    IpAddr::from([127, 0, 0, 1]),
                    IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                ]),
                source: Source::Literal,
            });
        }
        let inner = &self.inner;
        if let Some(hosts) = &inner.hosts {
            inner.watch_hosts();
            if let Some(addrs) = hosts.get(name) {
                inner.metrics.answered(Source::Hosts);
                return Ok(Resolved {
                    addrs,
                    source: Source::Hosts,
                });
            }
        }
        let now = Instant::now();
        let (rx, source) = {
            let mut cache = inner.cache.lock();
            let entry = match cache.get_mut(name) {
                Some(e) => e,
                None => {
                    let evicted = cache.push(name.into(), Entry::default());
                    if evicted.is_some_and(|(k, _)| &*k != name) {
                        inner.metrics.evictions.inc();
                    }
                    inner.metrics.names.set(cache.len() as i64);
                    cache.get_mut(name).expect("just inserted")
                }
            };
            if let Some(a) = entry.answer.as_ref().filter(|a| now < a.stale_until) {
                let source = if now < a.expires {
                    Source::Fresh
                } else {
                    Source::Stale
                };
                let out = if checked {
                    a.outcome(source)
                } else {
                    Ok(Resolved {
                        addrs: a.addrs.clone(),
                        source,
                    })
                };
                if now >= a.refresh_at
                    && !running(&entry.lookup)
                    && entry.retry_at.is_none_or(|t| now >= t)
                {
                    entry.lookup = Some(inner.start_lookup(name, true));
                }
                inner.metrics.answered(source);
                return out;
            }
            if let Some((err, until)) = &entry.failure {
                if now < *until {
                    inner.metrics.answered_failure();
                    return Err(err.clone());
                }
            }
            match &entry.lookup {
                Some(p) if running(&entry.lookup) => (p.rx.clone(), Source::Joined),
                _ => {
                    let pending = inner.start_lookup(name, false);
                    let rx = pending.rx.clone();
                    entry.lookup = Some(pending);
                    (rx, Source::Lookup)
                }
            }
        };
        inner.metrics.answered(source);
        match wait(rx, source).await {
            // The policy is not this caller's business: the addresses, unchecked.
            Err(ResolveError::Forbidden { .. }) if !checked => {
                let mut cache = inner.cache.lock();
                match cache.get(name).and_then(|e| e.answer.as_ref()) {
                    Some(a) => Ok(Resolved {
                        addrs: a.addrs.clone(),
                        source,
                    }),
                    None => Err(ResolveError::Failed(Arc::from(
                        "the answer left the cache before it could be read",
                    ))),
                }
            }
            other => other,
        }
    }

    /// Names in the cache now.
    pub fn cached_names(&self) -> usize {
        self.inner.cache.lock().len()
    }

    /// Counters since start (the same figures `/metrics` shows).
    pub fn stats(&self) -> DnsStats {
        let m = &self.inner.metrics;
        let answers = |source: &str| m.answers(source);
        let mut queries = 0;
        let mut queries_failed = 0;
        for family in ["A", "AAAA"] {
            for outcome in [
                "ok",
                "empty",
                "nxdomain",
                "timeout",
                "refused",
                "servfail",
                "unreachable",
                "error",
            ] {
                let n = m
                    .queries
                    .get_or_create(&QueryLabels { family, outcome })
                    .get();
                queries += n;
                if !matches!(outcome, "ok" | "empty" | "nxdomain") {
                    queries_failed += n;
                }
            }
        }
        DnsStats {
            hit: answers("hit"),
            stale: answers("stale"),
            miss: answers("miss"),
            joined: answers("joined"),
            failed: answers("failed"),
            hosts: answers("hosts"),
            literal: answers("literal"),
            queries,
            queries_failed,
            refreshes_ok: m.refreshes_ok.get(),
            refreshes_failed: m.refreshes_failed.get(),
        }
    }
}

/// The resolver's counters since start (see `edgepool_dns_*` in `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DnsStats {
    /// Answered from the cache within the TTL.
    pub hit: u64,
    /// Answered from the cache past the TTL (serve-stale).
    pub stale: u64,
    /// Waited for a lookup they started.
    pub miss: u64,
    /// Waited for a lookup another request started.
    pub joined: u64,
    /// Answered with a remembered failure.
    pub failed: u64,
    /// Answered from the hosts file.
    pub hosts: u64,
    /// IP literals and `localhost`.
    pub literal: u64,
    /// DNS queries sent (A and AAAA counted apart).
    pub queries: u64,
    /// Of which timed out, were refused, failed or could not be sent.
    pub queries_failed: u64,
    /// Background refreshes that brought an answer.
    pub refreshes_ok: u64,
    /// Background refreshes that failed (the last good answer kept serving).
    pub refreshes_failed: u64,
}

/// Lower-case, without one trailing dot (`Example.COM.` and `example.com` are one name).
fn normalize(host: &str) -> std::borrow::Cow<'_, str> {
    let trimmed = host.strip_suffix('.').unwrap_or(host);
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(trimmed)
    }
}

/// Whether a lookup is under way (its task has not ended; a task that ended without
/// publishing — it cannot, short of a panic — does not block the name forever).
fn running(lookup: &Option<Pending>) -> bool {
    lookup.as_ref().is_some_and(|p| p.rx.has_changed().is_ok())
}

async fn wait(mut rx: watch::Receiver<Option<Outcome>>, source: Source) -> Outcome {
    let outcome = match rx.wait_for(Option::is_some).await {
        Ok(v) => v.clone().expect("waited for Some"),
        Err(_) => Err(ResolveError::Failed(Arc::from(
            "the lookup ended without an answer (edgepool is shutting down, or a bug: see the log)",
        ))),
    };
    outcome.map(|r| Resolved { source, ..r })
}

impl Inner {
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Spawns the lookup of `name` (a background `refresh`, or one requests wait for); the
    /// receiver sees its first outcome.
    fn start_lookup(self: &Arc<Self>, name: &str, refresh: bool) -> Pending {
        let (tx, rx) = watch::channel(None);
        let inner = self.clone();
        let name: Box<str> = name.into();
        let id = self.next_id();
        tokio::spawn(async move { inner.lookup(name, id, refresh, tx).await });
        Pending { id, rx }
    }

    /// Asks A and AAAA together. Publishes as soon as one family has addresses and the other
    /// has answered or had `family_grace`; merges the late family when it arrives. The whole
    /// lookup, a wait for a slot (`limits.max_dns_in_flight`) included, ends by
    /// `timeout` × `attempts`; a refresh that finds no free slot is skipped instead.
    async fn lookup(
        self: Arc<Self>,
        name: Box<str>,
        id: u64,
        refresh: bool,
        tx: watch::Sender<Option<Outcome>>,
    ) {
        let deadline = Instant::now() + self.cfg.lookup_limit();
        let turn = if refresh {
            self.in_flight.try_acquire().ok()
        } else {
            tokio::time::timeout_at(deadline, self.in_flight.acquire())
                .await
                .ok()
                .and_then(Result::ok)
        };
        let Some(turn) = turn else {
            if refresh {
                self.skip_refresh(&name, id);
            } else {
                let busy = FamilyAnswer::Failed(FamilyFailure::Busy);
                self.publish(&name, id, Some(&busy), Some(&busy), &tx);
            }
            return;
        };
        let mut a = Box::pin(self.ask(&name, IpFamily::V4, deadline));
        let mut b = Box::pin(self.ask(&name, IpFamily::V6, deadline));
        let (mut ra, mut rb) = (None, None);
        loop {
            tokio::select! {
                r = &mut a, if ra.is_none() => ra = Some(r),
                r = &mut b, if rb.is_none() => rb = Some(r),
            }
            if ra.is_some() && rb.is_some() {
                break;
            }
            let usable = ra.as_ref().is_some_and(FamilyAnswer::has_addrs)
                || rb.as_ref().is_some_and(FamilyAnswer::has_addrs);
            if usable {
                let grace = tokio::time::sleep(self.cfg.family_grace);
                tokio::select! {
                    r = &mut a, if ra.is_none() => ra = Some(r),
                    r = &mut b, if rb.is_none() => rb = Some(r),
                    _ = grace => {}
                }
                break;
            }
        }
        let generation = self.publish(&name, id, ra.as_ref(), rb.as_ref(), &tx);
        // The answer is out: the slot is free for others while a late family finishes.
        drop(turn);
        drop(tx);
        if ra.is_none() {
            let late = a.await;
            self.merge_late(&name, generation, IpFamily::V4, &late);
        }
        if rb.is_none() {
            let late = b.await;
            self.merge_late(&name, generation, IpFamily::V6, &late);
        }
    }

    /// A refresh found no free slot: clear it, so a later request tries again.
    fn skip_refresh(&self, name: &str, id: u64) {
        let mut cache = self.cache.lock();
        if let Some(entry) = cache.peek_mut(name) {
            if entry.lookup.as_ref().is_some_and(|p| p.id == id) {
                entry.lookup = None;
                entry.retry_at = Some(Instant::now() + REFRESH_BUSY_RETRY);
            }
        }
    }

    /// One family's query, ended at `deadline` whatever the resolver does.
    async fn ask(&self, name: &str, family: IpFamily, deadline: Instant) -> FamilyAnswer {
        let t0 = Instant::now();
        let res = match family {
            IpFamily::V4 => tokio::time::timeout_at(deadline, self.dns.ipv4_lookup(name)).await,
            IpFamily::V6 => tokio::time::timeout_at(deadline, self.dns.ipv6_lookup(name)).await,
        };
        let answer = match res {
            Err(_) => FamilyAnswer::Failed(FamilyFailure::Timeout),
            Ok(Err(e)) => classify(e),
            Ok(Ok(lookup)) => {
                let ips: Vec<IpAddr> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) if family == IpFamily::V4 => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) if family == IpFamily::V6 => Some(IpAddr::V6(a.0)),
                        _ => None,
                    })
                    .collect();
                if ips.is_empty() {
                    FamilyAnswer::Empty { nxdomain: false }
                } else {
                    #[allow(clippy::disallowed_methods)] // hickory's deadline is a std Instant
                    let ttl = lookup
                        .valid_until()
                        .saturating_duration_since(std::time::Instant::now());
                    FamilyAnswer::Addrs { ips, ttl }
                }
            }
        };
        self.metrics.queried(family, &answer, t0.elapsed());
        answer
    }

    /// Stores the outcome of a lookup and tells its waiters. Returns the answer's generation.
    fn publish(
        &self,
        name: &str,
        id: u64,
        a: Option<&FamilyAnswer>,
        aaaa: Option<&FamilyAnswer>,
        tx: &watch::Sender<Option<Outcome>>,
    ) -> u64 {
        let now = Instant::now();
        let mut ips = Vec::new();
        let mut ttl: Option<Duration> = None;
        for r in [a, aaaa].into_iter().flatten() {
            if let FamilyAnswer::Addrs { ips: found, ttl: t } = r {
                ips.extend_from_slice(found);
                ttl = Some(ttl.map_or(*t, |m| m.min(*t)));
            }
        }
        let mut cache = self.cache.lock();
        if cache.peek(name).is_none() {
            // Evicted while the lookup ran: the answer is still worth keeping.
            if cache.push(name.into(), Entry::default()).is_some() {
                self.metrics.evictions.inc();
            }
            self.metrics.names.set(cache.len() as i64);
        }
        let entry = cache.get_mut(name).expect("present");
        // Only this lookup's own handle: after an eviction another lookup may own the entry.
        if entry.lookup.as_ref().is_some_and(|p| p.id == id) {
            entry.lookup = None;
        }
        let refresh = entry.answer.is_some();
        let Some(ttl) = ttl else {
            let err = ResolveError::Failed(Arc::from(self.failure_sentence(a, aaaa)));
            if let Some(answer) = entry.answer.as_ref().filter(|x| now < x.stale_until) {
                // Serve-stale: the last good answer stays; try again later, in the background.
                entry.retry_at = Some(now + REFRESH_RETRY);
                self.metrics.refreshes_failed.inc();
                tracing::warn!(name, error = %err, "DNS refresh failed; serving the last good answer");
                let _ = tx.send(Some(answer.outcome(Source::Stale)));
            } else {
                entry.answer = None;
                entry.failure = Some((err.clone(), now + FAILURE_HOLD));
                tracing::debug!(name, error = %err, "DNS lookup failed");
                let _ = tx.send(Some(Err(err)));
            }
            return entry.generation;
        };
        let ttl = ttl.clamp(self.cfg.min_ttl, self.cfg.max_ttl);
        // A family that failed or has not answered yet keeps its previous addresses (serve-stale
        // per family): a refresh whose AAAA times out must not turn a dual-stack name into an
        // IPv4-only one, nor the reverse. An empty answer (NODATA, NXDOMAIN) does drop them.
        // Carried addresses never outlive their own answer's serve-stale window.
        let mut carried_until: Option<Instant> = None;
        if let Some(prev) = entry.answer.as_ref().filter(|p| now < p.stale_until) {
            for (family, r) in [(IpFamily::V4, a), (IpFamily::V6, aaaa)] {
                if matches!(r, None | Some(FamilyAnswer::Failed(_)))
                    && prev.addrs.iter().any(|ip| family.holds(ip))
                {
                    ips.extend(prev.addrs.iter().filter(|ip| family.holds(ip)));
                    carried_until = Some(prev.stale_until);
                }
            }
        }
        let addrs = order(ips, entry.answer.as_ref().map(|x| &x.addrs[..]));
        let forbidden = self.first_forbidden(&addrs);
        if let Some((ip, why)) = forbidden {
            tracing::info!(name, %ip, why, "DNS answer holds a refused address; the name is refused");
        }
        let answer = Answer {
            addrs: addrs.into(),
            forbidden,
            refresh_at: now + ttl.mul_f64(REFRESH_AHEAD),
            expires: now + ttl,
            stale_until: carried_until.map_or(now + ttl + self.cfg.stale_ttl, |c| {
                c.min(now + ttl + self.cfg.stale_ttl)
            }),
        };
        // (`new` caps max_ttl at 1 day and stale_ttl at 7 days: these sums cannot overflow.)
        let _ = tx.send(Some(answer.outcome(Source::Lookup)));
        entry.answer = Some(answer);
        entry.failure = None;
        entry.retry_at = None;
        entry.generation = self.next_id();
        if refresh {
            self.metrics.refreshes_ok.inc();
        }
        entry.generation
    }

    /// Applies the answer of a family that came after the answer was published: its addresses
    /// replace that family's (kept from the previous answer meanwhile); an empty answer removes
    /// them; a failure changes nothing.
    fn merge_late(&self, name: &str, generation: u64, family: IpFamily, late: &FamilyAnswer) {
        let (ips, ttl) = match late {
            FamilyAnswer::Addrs { ips, ttl } => (&ips[..], Some(*ttl)),
            FamilyAnswer::Empty { .. } => (&[][..], None),
            FamilyAnswer::Failed(_) => return,
        };
        let mut cache = self.cache.lock();
        let Some(entry) = cache.peek_mut(name) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        let Some(answer) = entry.answer.as_mut() else {
            return;
        };
        let mut all: Vec<IpAddr> = answer
            .addrs
            .iter()
            .copied()
            .filter(|ip| !family.holds(ip))
            .collect();
        if all.is_empty() && ips.is_empty() {
            return;
        }
        all.extend_from_slice(ips);
        let addrs = order(all, Some(&answer.addrs));
        answer.forbidden = self.first_forbidden(&addrs);
        answer.addrs = addrs.into();
        let Some(ttl) = ttl else {
            return;
        };
        let ttl = ttl.clamp(self.cfg.min_ttl, self.cfg.max_ttl);
        let now = Instant::now();
        if now + ttl < answer.expires {
            answer.refresh_at = now + ttl.mul_f64(REFRESH_AHEAD);
            answer.expires = now + ttl;
            answer.stale_until = now + ttl + self.cfg.stale_ttl;
        }
    }

    fn first_forbidden(&self, addrs: &[IpAddr]) -> Option<(IpAddr, &'static str)> {
        addrs
            .iter()
            .find_map(|ip| self.policy.check(*ip).err().map(|why| (*ip, why)))
    }

    /// Why neither family gave an address, as a sentence.
    fn failure_sentence(&self, a: Option<&FamilyAnswer>, aaaa: Option<&FamilyAnswer>) -> String {
        let servers = &self.servers;
        let describe = |r: Option<&FamilyAnswer>| -> String {
            match r {
                None | Some(FamilyAnswer::Failed(FamilyFailure::Timeout)) => format!(
                    "no answer within {} (upstream.dns_timeout {} x upstream.dns_attempts {})",
                    humantime::format_duration(self.cfg.lookup_limit()),
                    humantime::format_duration(self.cfg.timeout),
                    self.cfg.attempts
                ),
                Some(FamilyAnswer::Failed(FamilyFailure::Refused)) => {
                    "the server refused the query (REFUSED)".to_string()
                }
                Some(FamilyAnswer::Failed(FamilyFailure::ServerFailure(code))) => {
                    format!("the server answered {code}")
                }
                Some(FamilyAnswer::Failed(FamilyFailure::Unreachable(why))) => {
                    format!("the server could not be reached ({why})")
                }
                Some(FamilyAnswer::Failed(FamilyFailure::Other(why))) => why.clone(),
                Some(FamilyAnswer::Failed(FamilyFailure::Busy)) => format!(
                    "not asked: all {} lookup slots (limits.max_dns_in_flight) stayed busy for {}",
                    self.cfg.max_in_flight,
                    humantime::format_duration(self.cfg.lookup_limit())
                ),
                Some(FamilyAnswer::Empty { nxdomain: true }) => "no such name (NXDOMAIN)".into(),
                Some(FamilyAnswer::Empty { nxdomain: false })
                | Some(FamilyAnswer::Addrs { .. }) => "no records".into(),
            }
        };
        let empty = |r: Option<&FamilyAnswer>| matches!(r, Some(FamilyAnswer::Empty { .. }));
        let nx =
            |r: Option<&FamilyAnswer>| matches!(r, Some(FamilyAnswer::Empty { nxdomain: true }));
        if empty(a) && empty(aaaa) {
            return if nx(a) || nx(aaaa) {
                format!("the name does not exist (NXDOMAIN from {servers})")
            } else {
                format!("the name has no A or AAAA records (asked {servers})")
            };
        }
        let (da, d6) = (describe(a), describe(aaaa));
        if da == d6 {
            format!("A and AAAA: {da} (asked {servers})")
        } else {
            format!("A: {da}; AAAA: {d6} (asked {servers})")
        }
    }

    /// Starts the hosts-file watcher once, from inside the runtime. It holds a `Weak` and ends
    /// with the resolver.
    fn watch_hosts(self: &Arc<Self>) {
        // A plain load first: the swap (a write) happens once, not on every request.
        if self.watching.load(Ordering::Relaxed) || self.watching.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.watching.store(false, Ordering::Relaxed);
            return;
        };
        let weak: Weak<Inner> = Arc::downgrade(self);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(HOSTS_POLL).await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let reloaded = tokio::task::spawn_blocking(move || {
                    let changed = inner
                        .hosts
                        .as_ref()
                        .is_some_and(HostsFile::reload_if_changed);
                    (inner, changed)
                })
                .await;
                match reloaded {
                    Ok((inner, true)) => {
                        inner.metrics.hosts_reloads.inc();
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
    }
}

/// Dedupes `ips` and orders them: IPv4 first; within a family, addresses of `previous` first in
/// their previous order, then new ones in the order the resolver gave.
fn order(mut ips: Vec<IpAddr>, previous: Option<&[IpAddr]>) -> Vec<IpAddr> {
    let mut seen = std::collections::HashSet::with_capacity(ips.len());
    ips.retain(|ip| seen.insert(*ip));
    let place = |ip: &IpAddr| {
        previous
            .and_then(|p| p.iter().position(|x| x == ip))
            .unwrap_or(usize::MAX)
    };
    ips.sort_by_key(|ip| (!ip.is_ipv4(), place(ip)));
    ips
}

fn classify(e: NetError) -> FamilyAnswer {
    match e {
        NetError::Timeout => FamilyAnswer::Failed(FamilyFailure::Timeout),
        NetError::Dns(DnsError::NoRecordsFound(nr)) => FamilyAnswer::Empty {
            nxdomain: nr.response_code == ResponseCode::NXDomain,
        },
        NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)) => {
            FamilyAnswer::Failed(FamilyFailure::Refused)
        }
        NetError::Dns(DnsError::ResponseCode(code)) => {
            FamilyAnswer::Failed(FamilyFailure::ServerFailure(code.to_string()))
        }
        NetError::Io(io) => FamilyAnswer::Failed(FamilyFailure::Unreachable(io.to_string())),
        NetError::NoConnections => FamilyAnswer::Failed(FamilyFailure::Unreachable(
            "no DNS server is configured or none accepted the query".into(),
        )),
        other => FamilyAnswer::Failed(FamilyFailure::Other(other.to_string())),
    }
}

/// The hickory resolver edgepool asks, and a label naming its servers.
fn build_hickory(cfg: &DnsConfig) -> (hickory_resolver::TokioResolver, String) {
    use hickory_resolver::config::{
        ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig,
    };
    let (config, mut opts) = if cfg.servers.is_empty() {
        hickory_resolver::system_conf::read_system_conf().unwrap_or_else(|e| {
            tracing::warn!("no usable system DNS configuration ({e}); names outside the hosts file will not resolve");
            (
                ResolverConfig::from_name_servers(Vec::new()),
                Default::default(),
            )
        })
    } else {
        let name_servers = cfg
            .servers
            .iter()
            .map(|addr| {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
            })
            .collect();
        (
            ResolverConfig::from_name_servers(name_servers),
            Default::default(),
        )
    };
    let servers: Vec<String> = config
        .name_servers
        .iter()
        .map(|ns| {
            let port = ns.connections.first().map_or(53, |c| c.port);
            SocketAddr::new(ns.ip, port).to_string()
        })
        .collect();
    let servers = if servers.is_empty() {
        "no DNS server (none in /etc/resolv.conf or upstream.dns_servers)".to_string()
    } else {
        servers.join(", ")
    };
    // Our cache is the cache: hickory's would answer refreshes from itself. The hosts file is
    // ours too (hickory's is read once and falls through to DNS for a missing family).
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.timeout = cfg.timeout;
    opts.attempts = cfg.attempts.max(1) as usize;
    let dns = hickory_resolver::Resolver::builder_with_config(
        config,
        hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()
    .unwrap_or_else(|e| {
        tracing::warn!(
            "DNS resolver setup failed ({e}); names outside the hosts file will not resolve"
        );
        hickory_resolver::Resolver::builder_with_config(
            ResolverConfig::from_name_servers(Vec::new()),
            hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
        )
        .build()
        .expect("a resolver without servers builds")
    });
    (dns, servers)
}

/// Name → addresses, as the hosts file lists them.
pub type HostsTable = HashMap<Box<str>, Arc<[IpAddr]>>;

/// The hosts file: name → addresses, re-read when its size, mtime or inode changes.
struct HostsFile {
    path: PathBuf,
    table: RwLock<Arc<HostsTable>>,
    stamp: Mutex<Option<Stamp>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: m.len(),
        modified: m.modified().ok(),
        inode: m.ino(),
    })
}

impl HostsFile {
    fn open(path: &Path) -> HostsFile {
        let file = HostsFile {
            path: path.to_path_buf(),
            table: RwLock::new(Arc::new(HashMap::new())),
            stamp: Mutex::new(None),
        };
        file.reload_if_changed();
        file
    }

    fn get(&self, name: &str) -> Option<Arc<[IpAddr]>> {
        self.table.read().get(name).cloned()
    }

    /// Re-reads the file if it changed since the last read; whether it did. A file rewritten
    /// in place while being read (its stamp moved meanwhile) is read again, so a half-written
    /// file is not taken for the new one.
    fn reload_if_changed(&self) -> bool {
        let mut now = stamp(&self.path);
        let mut last = self.stamp.lock();
        if *last == now && now.is_some() {
            return false;
        }
        let mut text = self.read(now);
        for _ in 0..3 {
            let after = stamp(&self.path);
            if after == now {
                break;
            }
            now = after;
            text = self.read(now);
        }
        let Some(text) = text else {
            return false;
        };
        let table = parse_hosts(&text);
        tracing::info!(path = %self.path.display(), names = table.len(), "hosts file read");
        *self.table.write() = Arc::new(table);
        *last = now;
        true
    }

    /// The file's text (empty if it is gone), or `None` when it was never there and nothing
    /// needs to change.
    fn read(&self, now: Option<Stamp>) -> Option<String> {
        Some(match now {
            Some(_) => match std::fs::read(&self.path) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "hosts file unreadable ({e}); ignoring it");
                    String::new()
                }
            },
            None if self.table.read().is_empty() => return None,
            None => String::new(),
        })
    }
}

/// Parses hosts-file text (`address name [alias...]`, `#` comments) into name → addresses,
/// names lower-cased, each name's addresses in file order, IPv4 first.
pub fn parse_hosts(text: &str) -> HostsTable {
    let mut names: HashMap<Box<str>, Vec<IpAddr>> = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_ascii_whitespace();
        let Some(addr) = fields.next() else {
            continue;
        };
        // A zone index (fe80::1%eth0) cannot be dialled by name here; skip such lines.
        let Ok(ip) = addr.parse::<IpAddr>() else {
            continue;
        };
        for name in fields {
            let name = normalize(name).into_owned();
            let list = names.entry(name.into_boxed_str()).or_default();
            if !list.contains(&ip) {
                list.push(ip);
            }
        }
    }
    names
        .into_iter()
        .map(|(k, v)| (k, Arc::from(order(v, None))))
        .collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    family: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The resolver's metrics (registered by [`Resolver::new`]).
struct DnsMetrics {
    /// `edgepool_dns_answers_total` by [`Source`] (in `SOURCES` order), then `failed`: looked
    /// up once here, so an answer costs one atomic add.
    answers: [Counter; 7],
    queries: Family<QueryLabels, Counter>,
    query_seconds: Family<FamilyLabels, Histogram, fn() -> Histogram>,
    refreshes_ok: Counter,
    refreshes_failed: Counter,
    names: Gauge,
    evictions: Counter,
    hosts_reloads: Counter,
}

/// The `source` label values of `edgepool_dns_answers_total`, in [`DnsMetrics::answers`] order.
const SOURCES: [&str; 7] = [
    "literal", "hosts", "hit", "stale", "miss", "joined", "failed",
];

fn query_histogram() -> Histogram {
    // 100 µs .. ~6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl DnsMetrics {
    fn register(registry: &mut Registry) -> DnsMetrics {
        let answers = Family::<SourceLabels, Counter>::default();
        registry.register(
            "edgepool_dns_answers",
            "Target names answered, by source: hit (cache, fresh), stale (cache, past its TTL: served while refreshing or while the resolver fails), miss (waited for a lookup), joined (waited for another request's lookup), failed (a remembered failure), hosts, literal",
            answers.clone(),
        );
        let queries = Family::<QueryLabels, Counter>::default();
        registry.register(
            "edgepool_dns_queries",
            "DNS queries sent, by family (A, AAAA) and outcome (ok, empty, nxdomain, timeout, refused, servfail, unreachable, error)",
            queries.clone(),
        );
        let query_seconds =
            Family::<FamilyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                query_histogram as fn() -> Histogram,
            );
        registry.register(
            "edgepool_dns_query_seconds",
            "Time a DNS query took, by family (timeouts included)",
            query_seconds.clone(),
        );
        let refreshes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "edgepool_dns_refreshes",
            "Background refreshes of cached names, by outcome (ok, failed: the last good answer kept serving)",
            refreshes.clone(),
        );
        let names = Gauge::default();
        registry.register(
            "edgepool_dns_cache_names",
            "Names in the DNS cache now",
            names.clone(),
        );
        let evictions = Counter::default();
        registry.register(
            "edgepool_dns_evictions",
            "Names dropped from the DNS cache to stay within upstream.dns_cache_size",
            evictions.clone(),
        );
        let hosts_reloads = Counter::default();
        registry.register(
            "edgepool_hosts_file_reloads",
            "Times the hosts file was re-read after it changed",
            hosts_reloads.clone(),
        );
        let refreshes_ok = refreshes
            .get_or_create(&OutcomeLabels { outcome: "ok" })
            .clone();
        let refreshes_failed = refreshes
            .get_or_create(&OutcomeLabels { outcome: "failed" })
            .clone();
        let answers = SOURCES.map(|source| answers.get_or_create(&SourceLabels { source }).clone());
        DnsMetrics {
            refreshes_ok,
            refreshes_failed,
            answers,
            queries,
            query_seconds,
            names,
            evictions,
            hosts_reloads,
        }
    }

    fn answered(&self, source: Source) {
        let i = match source {
            Source::Literal => 0,
            Source::Hosts => 1,
            Source::Fresh => 2,
            Source::Stale => 3,
            Source::Lookup => 4,
            Source::Joined => 5,
        };
        self.answers[i].inc();
    }

    fn answered_failure(&self) {
        self.answers[6].inc();
    }

    fn answers(&self, source: &str) -> u64 {
        SOURCES
            .iter()
            .position(|s| *s == source)
            .map_or(0, |i| self.answers[i].get())
    }

    fn queried(&self, family: IpFamily, answer: &FamilyAnswer, took: Duration) {
        self.queries
            .get_or_create(&QueryLabels {
                family: family.as_str(),
                outcome: answer.label(),
            })
            .inc();
        self.query_seconds
            .get_or_create(&FamilyLabels {
                family: family.as_str(),
            })
            .observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn hosts_file_lines_become_names_both_families_ipv4_first() {
        let t = parse_hosts(
            "# comment\n\
             127.0.0.1 localhost\n\
             ::1 ip6-localhost ip6-loopback\n\
             2001:db8::7   Shop.Example.   # trailing comment\n\
             203.0.113.7 shop.example www.shop.example\n\
             203.0.113.7 shop.example\n\
             fe80::1%eth0 scoped.example\n\
             not-an-ip bogus.example\n\
             \t\n",
        );
        assert_eq!(
            &*t["shop.example"],
            &[ip("203.0.113.7"), ip("2001:db8::7")],
            "both families, IPv4 first, deduplicated, case and trailing dot ignored"
        );
        assert_eq!(&*t["www.shop.example"], &[ip("203.0.113.7")]);
        assert!(
            !t.contains_key("scoped.example"),
            "zone-scoped lines skipped"
        );
        assert!(!t.contains_key("bogus.example"));
        assert_eq!(t.len(), 5, "{t:?}");
    }

    #[test]
    fn a_reordered_answer_keeps_the_previous_order() {
        let prev = [ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3")];
        // A round-robin server rotated its answer and dropped .1, added .4 and an IPv6.
        let now = order(
            vec![
                ip("2001:db8::1"),
                ip("192.0.2.4"),
                ip("192.0.2.3"),
                ip("192.0.2.2"),
            ],
            Some(&prev),
        );
        assert_eq!(
            now,
            vec![
                ip("192.0.2.2"),
                ip("192.0.2.3"),
                ip("192.0.2.4"),
                ip("2001:db8::1")
            ]
        );
        // Without history: IPv4 first, resolver order kept, duplicates dropped.
        let fresh = order(
            vec![
                ip("2001:db8::1"),
                ip("192.0.2.9"),
                ip("192.0.2.8"),
                ip("192.0.2.9"),
            ],
            None,
        );
        assert_eq!(
            fresh,
            vec![ip("192.0.2.9"), ip("192.0.2.8"), ip("2001:db8::1")]
        );
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(normalize("Example.COM."), "example.com");
        assert_eq!(normalize("example.com"), "example.com");
        assert!(matches!(normalize("a.b"), std::borrow::Cow::Borrowed(_)));
    }
}
