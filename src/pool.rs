//! pool: keeps upstream connections warm per key and hands them out, HTTP/1.1 exclusively and
//! HTTP/2 shared up to the server's stream limit, and says why every new connection was needed.
//!
//! The pool depends on no other edgepool module. It is generic over a [`Connector`], which says
//! what a key is, how to dial one and what a connection is, and reports through [`PoolEvents`].
//!
//! # Concurrency
//! All state lives behind one short `parking_lot::Mutex` ([`Inner::state`]); it is never held
//! across an `.await` and never held while calling the connector or dropping a [`Lease`].
//! A request that finds no usable connection becomes a *waiter* (a oneshot sender in the key's
//! FIFO queue) and, when the key needs more capacity, a dial starts in its own task. Whatever
//! becomes usable first — a released connection or a finished dial — goes to the oldest waiter;
//! the loser of that race stays in the pool (it is not thrown away). A dial is never cancelled
//! by its requester going away.
//!
//! # Reuse accounting
//! Every lease says whether it is the first request on its connection (`reused() == false`).
//! Every dial carries exactly one [`NewReason`], derived from the key's state when it started:
//! the key was never seen, all its connections were busy, or a connection of the key was lost
//! for a recorded [`CloseReason`] (which maps to a new-connection reason).
//!
//! # Time
//! The pool reads `tokio::time::Instant`, so tests pause and advance time. It keeps instants as
//! [`Stamp`]s: nanoseconds since the pool started.
//!
//! # Memory and cost per key
//! A crawl touches far more keys than it keeps connections to, so the pool's memory follows
//! its connections, not the keys it has seen:
//! - The key map (`State::keys`) holds a key only while it has a connection, a dial or a
//!   waiter. The path that empties a key retires it at once; its first connection lives
//!   inline in the map's slot (most keys hold one), so a checkout chases no pointer to it.
//!   The slot is kept small (152 bytes with a `u64` key and a pointer-sized connection handle:
//!   8-byte [`Stamp`]s for instants, `u32` counts, the waiter queue and a dial's early HTTP/2
//!   SETTINGS boxed, present only while a request waits or a dial's SETTINGS are pending), because at
//!   100,000 warm keys whether the map fits the CPU's last-level cache decides what a checkout
//!   costs.
//! - What an empty key learned (why it lost its last connection, HTTP/2 or not, a learned idle
//!   timeout) is kept in a bounded LRU ([`PoolConfig::max_remembered_keys`]), forgotten after
//!   ten quiet minutes or, past the bound, least recently used first — counted
//!   ([`PoolStats::forgotten`]).
//! - Idle connections are ordered for LRU eviction and expiry by an insertion-ordered queue
//!   with lazy deletion (`IdleQueue`): a checkout or return costs O(1) and touches one
//!   small table, where an ordered set cost a tree walk (several cache misses) each way.
use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use lru::LruCache;
use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A boxed future, as returned by [`Connector::connect`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Identifies one connection for its whole life (unique per pool).
pub type ConnId = u64;

/// One upstream connection as the pool sees it.
pub trait PoolConn: Send + 'static {
    /// Another handle onto the same connection, for protocols that carry concurrent requests
    /// (HTTP/2). `None` for exclusive connections (HTTP/1.1).
    fn share(&self) -> Option<Self>
    where
        Self: Sized;
    /// False once the connection can take no new request (closed by either side).
    fn is_open(&self) -> bool;
}

/// What a dial produced.
pub struct Connected<C> {
    /// The connection.
    pub conn: C,
    /// True when the connection carries concurrent requests (HTTP/2).
    pub multiplexed: bool,
    /// The server's concurrent stream limit, when already known. For a multiplexed connection
    /// whose first SETTINGS has not arrived, pass `None` and call [`ConnWatch::settled`] later;
    /// until then the connection carries at most the key's last known limit (1 on a new key).
    pub max_streams: Option<usize>,
}

/// Dials connections for keys. Implemented by `dial`; tests implement it with fakes.
pub trait Connector: Send + Sync + 'static {
    /// Everything that makes two connections interchangeable.
    type Key: Clone + Eq + Hash + Ord + Debug + Send + Sync + 'static;
    /// The connection handle.
    type Conn: PoolConn;
    /// Why a dial failed.
    type Error: Send + Sync + 'static;
    /// Opens a connection for `key`. `watch` lets the connection's driver report its end,
    /// its stream limit and a GOAWAY to the pool.
    fn connect(
        &self,
        key: &Self::Key,
        watch: ConnWatch<Self>,
    ) -> BoxFuture<Result<Connected<Self::Conn>, Self::Error>>
    where
        Self: Sized;
    /// Whether a connection for `key` may turn out multiplexed (TLS with ALPN h2 offered).
    /// While the first dial of such a key is under way, further requests wait for it instead
    /// of dialing: a burst of connections before the first SETTINGS is what we avoid.
    fn may_multiplex(&self, key: &Self::Key) -> bool;
}

/// Why a new connection was opened. Exactly one per connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NewReason {
    /// The key had no connection and lost none: first contact (or after a long quiet spell).
    ColdKey,
    /// HTTP/1.1: every connection of the key was busy.
    AllBusy,
    /// HTTP/2: every connection was at the server's stream limit.
    H2Saturated,
    /// A connection was retired for being idle too long (ours or the server's announced timeout).
    IdleExpired,
    /// The server closed (FIN, RST or stray bytes) a connection while it sat idle.
    ServerClosedIdle,
    /// A connection was found dead when it was checked out.
    StaleAtCheckout,
    /// The server sent GOAWAY.
    Goaway,
    /// A connection reached a request limit (ours, `Keep-Alive: max`, or the server's
    /// `Connection: close` after more than one request).
    MaxRequests,
    /// The server answered `Connection: close` on a connection's first response (no keep-alive).
    ServerClose,
    /// A connection reached its maximum lifetime.
    MaxLifetime,
    /// A connection was evicted to respect a pool-wide limit.
    Evicted,
    /// A request failed on a reused connection and is retried on a fresh one, or a connection
    /// broke with an error.
    AfterError,
    /// The sticky window of a (target, exit pool) ended and traffic rotated to another exit.
    Rotation,
    /// The worker asked for a new exit per request (`rotate-request`).
    ForcedRotation,
    /// A worker session started (sessions never share connections).
    NewSession,
    /// A session or window moved to another exit (its exit failed, its lifetime ended, or it
    /// changed pool).
    SessionChange,
}

impl NewReason {
    /// All reasons, in a stable order (for metrics and reports).
    pub const ALL: [NewReason; 16] = [
        NewReason::ColdKey,
        NewReason::AllBusy,
        NewReason::H2Saturated,
        NewReason::IdleExpired,
        NewReason::ServerClosedIdle,
        NewReason::StaleAtCheckout,
        NewReason::Goaway,
        NewReason::MaxRequests,
        NewReason::ServerClose,
        NewReason::MaxLifetime,
        NewReason::Evicted,
        NewReason::AfterError,
        NewReason::Rotation,
        NewReason::ForcedRotation,
        NewReason::NewSession,
        NewReason::SessionChange,
    ];
    /// The metric label / JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            NewReason::ColdKey => "cold_key",
            NewReason::AllBusy => "all_busy",
            NewReason::H2Saturated => "h2_saturated",
            NewReason::IdleExpired => "idle_expired",
            NewReason::ServerClosedIdle => "server_closed_idle",
            NewReason::StaleAtCheckout => "stale_at_checkout",
            NewReason::Goaway => "goaway",
            NewReason::MaxRequests => "max_requests",
            NewReason::ServerClose => "server_close",
            NewReason::MaxLifetime => "max_lifetime",
            NewReason::Evicted => "evicted",
            NewReason::AfterError => "after_error",
            NewReason::Rotation => "rotation",
            NewReason::ForcedRotation => "forced_rotation",
            NewReason::NewSession => "new_session",
            NewReason::SessionChange => "session_change",
        }
    }
}

/// Why a connection left the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CloseReason {
    /// Idle longer than the pool's idle timeout.
    IdleExpired,
    /// Retired a safety margin before the server's announced (`Keep-Alive: timeout=`) or
    /// observed idle timeout.
    KeepAliveTimeout,
    /// The server closed it (FIN) while idle.
    ServerClosedIdle,
    /// The server reset it (RST) while idle.
    ResetIdle,
    /// The server sent bytes nobody asked for while it was idle.
    StrayBytes,
    /// Found closed at checkout.
    StaleAtCheckout,
    /// The server sent GOAWAY.
    Goaway,
    /// A request limit was reached (ours, the server's `Keep-Alive: max=`, or `Connection:
    /// close` after the first response).
    MaxRequests,
    /// The server answered `Connection: close` on the first response.
    ServerClose,
    /// Reached its maximum lifetime.
    MaxLifetime,
    /// Evicted to respect a pool-wide limit.
    Evicted,
    /// Broke with an error during a request.
    Error,
    /// A worker went away mid-response and the rest could not be drained within bounds.
    Abandoned,
    /// The pool shut down.
    Shutdown,
    /// Its owner is gone: the worker session, sticky window or forced-rotation request whose
    /// isolation scope it belonged to ended, so nothing can use it again.
    ScopeEnded,
}

impl CloseReason {
    /// All reasons, in a stable order.
    pub const ALL: [CloseReason; 15] = [
        CloseReason::IdleExpired,
        CloseReason::KeepAliveTimeout,
        CloseReason::ServerClosedIdle,
        CloseReason::ResetIdle,
        CloseReason::StrayBytes,
        CloseReason::StaleAtCheckout,
        CloseReason::Goaway,
        CloseReason::MaxRequests,
        CloseReason::ServerClose,
        CloseReason::MaxLifetime,
        CloseReason::Evicted,
        CloseReason::Error,
        CloseReason::Abandoned,
        CloseReason::Shutdown,
        CloseReason::ScopeEnded,
    ];
    /// The metric label / JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::IdleExpired => "idle_expired",
            CloseReason::KeepAliveTimeout => "keepalive_timeout",
            CloseReason::ServerClosedIdle => "server_closed_idle",
            CloseReason::ResetIdle => "reset_idle",
            CloseReason::StrayBytes => "stray_bytes",
            CloseReason::StaleAtCheckout => "stale_at_checkout",
            CloseReason::Goaway => "goaway",
            CloseReason::MaxRequests => "max_requests",
            CloseReason::ServerClose => "server_close",
            CloseReason::MaxLifetime => "max_lifetime",
            CloseReason::Evicted => "evicted",
            CloseReason::Error => "error",
            CloseReason::Abandoned => "abandoned",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ScopeEnded => "scope_ended",
        }
    }
    /// The reason the *next* connection of the key will carry, because this one was lost.
    pub fn next_new_reason(self) -> NewReason {
        match self {
            CloseReason::IdleExpired | CloseReason::KeepAliveTimeout => NewReason::IdleExpired,
            CloseReason::ServerClosedIdle | CloseReason::ResetIdle | CloseReason::StrayBytes => {
                NewReason::ServerClosedIdle
            }
            CloseReason::StaleAtCheckout => NewReason::StaleAtCheckout,
            CloseReason::Goaway => NewReason::Goaway,
            CloseReason::MaxRequests => NewReason::MaxRequests,
            CloseReason::ServerClose => NewReason::ServerClose,
            CloseReason::MaxLifetime => NewReason::MaxLifetime,
            CloseReason::Evicted => NewReason::Evicted,
            CloseReason::Error | CloseReason::Abandoned => NewReason::AfterError,
            CloseReason::Shutdown | CloseReason::ScopeEnded => NewReason::ColdKey,
        }
    }
}

/// How a connection's driver saw it end (reported through [`ConnWatch::closed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndCause {
    /// Orderly close by the server (FIN / clean EOF).
    Fin,
    /// Connection reset.
    Reset,
    /// The server sent bytes that were not a response to anything.
    StrayBytes,
    /// A GOAWAY finished the connection.
    Goaway,
    /// Any other error.
    Error,
    /// We closed it (pool dropped the handle).
    Local,
}

/// What happens to a connection when a request on it is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// The connection can carry another request. The hints are the server's `Keep-Alive`
    /// parameters from this response, if it sent any.
    Keep(Hints),
    /// The connection must not be used again.
    Close(CloseReason),
}

/// What a server announced about how long it keeps a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// `Keep-Alive: timeout=N`: the server closes the connection after N seconds idle.
    pub idle_timeout: Option<Duration>,
    /// `Keep-Alive: max=M`: the server serves at most M more requests on it.
    pub remaining_requests: Option<u64>,
}

/// Limits and timeouts. Defaults are the documented constants below.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Max connections (open + being dialed) per key.
    pub max_per_key: usize,
    /// Max connections (open + being dialed) in the whole pool.
    pub max_total: usize,
    /// Max idle connections in the whole pool; past it the least recently used idle one goes.
    pub max_idle_total: usize,
    /// A connection idle this long is closed.
    pub idle_timeout: Duration,
    /// A connection is retired after this many requests (`None`: no limit of ours).
    pub max_requests: Option<u64>,
    /// A connection is retired after this long, even if busy (it finishes what it carries).
    pub max_lifetime: Option<Duration>,
    /// Retire this long before the server's announced or observed idle timeout.
    pub keepalive_margin: Duration,
    /// Background sweep period for idle expiry.
    pub sweep_interval: Duration,
    /// Learn a server's idle timeout from idle closes and retire connections before it.
    pub learn_idle_timeout: bool,
    /// Keys with no connection whose learned facts (why the last connection ended, protocol,
    /// idle timeout) are remembered; past it the least recently used are forgotten, counted in
    /// [`PoolStats::forgotten`].
    pub max_remembered_keys: usize,
}

/// Default [`PoolConfig::max_per_key`].
pub const DEFAULT_MAX_PER_KEY: usize = 256;
/// Default [`PoolConfig::max_total`].
pub const DEFAULT_MAX_TOTAL: usize = 8192;
/// Default [`PoolConfig::max_idle_total`].
pub const DEFAULT_MAX_IDLE_TOTAL: usize = 4096;
/// Default [`PoolConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Default [`PoolConfig::keepalive_margin`].
pub const DEFAULT_KEEPALIVE_MARGIN: Duration = Duration::from_millis(1000);
/// Default [`PoolConfig::max_remembered_keys`]: about 3 MiB at most with the gateway's keys
/// (an 88-byte key, 40 bytes of facts, LRU links and map slot: about 180 bytes each).
pub const DEFAULT_MAX_REMEMBERED_KEYS: usize = 16_384;

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_per_key: DEFAULT_MAX_PER_KEY,
            max_total: DEFAULT_MAX_TOTAL,
            max_idle_total: DEFAULT_MAX_IDLE_TOTAL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_requests: None,
            max_lifetime: None,
            keepalive_margin: DEFAULT_KEEPALIVE_MARGIN,
            sweep_interval: Duration::from_millis(500),
            learn_idle_timeout: true,
            max_remembered_keys: DEFAULT_MAX_REMEMBERED_KEYS,
        }
    }
}

/// Where the pool reports what happens to connections. Methods are called with no lock held.
pub trait PoolEvents<K>: Send + Sync + 'static {
    /// A dial started for `key`, for `reason`.
    fn dial_started(&self, _key: &K, _reason: NewReason) {}
    /// A dial succeeded: a new connection joined the pool.
    fn connection_opened(&self, _key: &K, _reason: NewReason) {}
    /// A dial failed.
    fn dial_failed(&self, _key: &K) {}
    /// A connection left the pool after carrying `requests` requests.
    fn connection_closed(&self, _key: &K, _reason: CloseReason, _requests: u64) {}
}

/// Removes a waiter from its key's queue when its checkout ends, however it ends.
struct WaiterGuard<'a, X: Connector> {
    inner: &'a Arc<Inner<X>>,
    key: &'a X::Key,
    id: u64,
}

impl<X: Connector> Drop for WaiterGuard<'_, X> {
    fn drop(&mut self) {
        let mut st = self.inner.state.lock();
        if let Some(ks) = st.keys.get_mut(self.key) {
            if let Some(w) = ks.waiting.as_mut() {
                w.waiters.retain(|w| w.id != self.id);
            }
            ks.tidy();
            if ks.is_empty() {
                self.inner.retire_if_empty(&mut st, self.key);
            }
        }
    }
}

/// A [`PoolEvents`] that ignores everything.
pub struct NoEvents;
impl<K> PoolEvents<K> for NoEvents {}

/// Options for one checkout.
#[derive(Clone, Copy, Debug)]
pub struct CheckoutOpts {
    /// Give up waiting for a connection at this instant.
    pub deadline: Instant,
    /// Demand a brand-new connection (a retry after a failure on a reused one).
    pub fresh: bool,
    /// Why a connection would be needed if the key has none (routing knows better than the
    /// pool: a rotation to another exit, a new worker session). `None`: `cold_key`.
    pub cold_reason: Option<NewReason>,
}

/// Why a checkout produced no connection.
#[derive(Debug)]
pub enum CheckoutError<E> {
    /// The dial made for this request (or the only dial the key had) failed.
    Dial(Arc<E>),
    /// No connection became available before the deadline.
    Timeout,
    /// The pool is shut down.
    Closed,
}

impl<E> Clone for CheckoutError<E> {
    fn clone(&self) -> Self {
        match self {
            CheckoutError::Dial(e) => CheckoutError::Dial(e.clone()),
            CheckoutError::Timeout => CheckoutError::Timeout,
            CheckoutError::Closed => CheckoutError::Closed,
        }
    }
}

/// Counts of the pool as a whole, for status pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections open or being dialed.
    pub total: usize,
    /// Connections being dialed.
    pub connecting: usize,
    /// Open connections carrying no request.
    pub idle: usize,
    /// Requests waiting for a connection.
    pub waiting: usize,
    /// Keys with a connection, a dial or a waiter.
    pub keys: usize,
    /// Keys with none, whose learned facts are remembered ([`PoolConfig::max_remembered_keys`]).
    pub remembered: usize,
    /// Remembered keys forgotten to stay within [`PoolConfig::max_remembered_keys`], since
    /// start (least recently used first; keys quiet for ten minutes are forgotten uncounted).
    pub forgotten: u64,
}

/// Per-key counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyStats<K> {
    /// The key.
    pub key: K,
    /// Open connections.
    pub open: usize,
    /// Open connections carrying no request.
    pub idle: usize,
    /// Being dialed.
    pub connecting: usize,
    /// Requests in flight.
    pub in_flight: usize,
    /// Waiters queued.
    pub waiting: usize,
    /// Whether the key's connections are multiplexed (HTTP/2), once known.
    pub multiplexed: Option<bool>,
}

type Grant<X> = Result<Lease<X>, CheckoutError<<X as Connector>::Error>>;

struct Waiter<X: Connector> {
    id: u64,
    fresh: bool,
    tx: oneshot::Sender<Grant<X>>,
}

/// One connection's bookkeeping.
struct Entry<C> {
    id: ConnId,
    /// The connection while it is in the pool. Exclusive connections are taken out by their
    /// lease; shared ones stay here and leases carry clones.
    conn: Option<C>,
    multiplexed: bool,
    /// Requests in flight on it.
    in_flight: u32,
    /// Concurrent request limit: 1 for HTTP/1.1, the server's SETTINGS for HTTP/2.
    max_streams: u32,
    /// For HTTP/2: whether the server's first SETTINGS has arrived.
    settled: bool,
    /// Requests granted on it so far.
    requests: u64,
    created: Stamp,
    /// When it last became idle (no request in flight).
    idle_since: Stamp,
    /// Its own idle limit from the server's `Keep-Alive: timeout=` (already minus the margin),
    /// in milliseconds (see [`KeyState`] on why the fields are this small).
    server_idle_ms: Option<u32>,
    /// How many more requests the server allows (`Keep-Alive: max=`, saturated at `u32::MAX`).
    remaining: Option<u32>,
    /// Takes no new requests (GOAWAY, lifetime); removed once its last request ends.
    draining: Option<CloseReason>,
    /// Its driver reported it ended while a request was on it.
    dead: Option<CloseReason>,
    /// Why it was opened (reported on its first lease).
    new_reason: NewReason,
    /// Its slot in the idle queue's generation table ([`IdleQueue`]), for its whole life.
    slot: u32,
    /// Whether its current idle period has a live mark in the idle queue.
    marked: bool,
}

impl<C: PoolConn> Entry<C> {
    fn is_idle(&self) -> bool {
        self.in_flight == 0
    }
    fn has_capacity(&self) -> bool {
        self.draining.is_none()
            && self.dead.is_none()
            && self.in_flight < self.max_streams
            && (self.multiplexed || self.conn.is_some())
            && self.remaining != Some(0)
    }
}

/// Every this many sweeps, one pass over all keys retires any empty one that was missed (a
/// safety net: every path that can empty a key retires it at once).
const RETIRE_PASS_EVERY_SWEEPS: u64 = 120;
/// A remembered key quiet for this long (or the idle timeout, if longer) is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// How long a learned idle timeout is trusted before it must be observed again.
const LEARNED_IDLE_TTL: Duration = Duration::from_secs(600);
/// Idle closes shorter than this are not taken as a server's idle timeout.
const MIN_LEARNABLE_IDLE: Duration = Duration::from_secs(1);

/// Learns a server's unannounced idle timeout (nginx's `keepalive_timeout` sends no header)
/// from idle closes. One observation is not enough — a restart or a one-off close would
/// otherwise shrink reuse for good — so two consecutive idle closes within 20% (or 250 ms) of
/// each other set it; it then holds for [`LEARNED_IDLE_TTL`] and must be seen again.
///
/// Durations are kept in milliseconds (`u32`, saturating at 49 days) and the instant as a
/// [`Stamp`], so that it takes 16 bytes of its key's map slot rather than 48 (see
/// [`KeyState`]).
#[derive(Clone, Copy, Debug, Default)]
struct IdleLearning {
    /// The previous idle close's idle time, in ms (0: none yet; a learnable one is ≥ 1 s).
    last_ms: u32,
    /// The learned limit (already minus the margin), in ms (0: none; a learned one is at least
    /// half a second).
    learned_ms: u32,
    /// When the limit was learned.
    learned_at: Stamp,
}

/// A pool instant: nanoseconds since the pool started ([`Inner::now`]). It takes 8 bytes where
/// a `tokio::time::Instant` takes 16, and the key map's slot carries four (see [`KeyState`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Stamp(u64);

impl Stamp {
    /// Time from `earlier` to `self` (zero if `earlier` is later).
    fn since(self, earlier: Stamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// `d` in whole milliseconds, saturating at `u32::MAX` (49 days).
fn to_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// A count in the pool's `u32` fields, saturating.
fn saturate_u32(n: impl TryInto<u32>) -> u32 {
    n.try_into().unwrap_or(u32::MAX)
}

fn from_ms(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms))
}

impl IdleLearning {
    fn observe(&mut self, idle_for: Duration, margin: Duration, now: Stamp) {
        if idle_for < MIN_LEARNABLE_IDLE {
            return;
        }
        if self.last_ms != 0 {
            let prev = from_ms(self.last_ms);
            let diff = prev.max(idle_for) - prev.min(idle_for);
            let tolerance = (prev.min(idle_for) / 5).max(Duration::from_millis(250));
            let limit = prev.min(idle_for).saturating_sub(margin);
            if diff <= tolerance && limit >= MIN_LEARNABLE_IDLE / 2 {
                self.learned_ms = to_ms(limit).max(1);
                self.learned_at = now;
            }
        }
        self.last_ms = to_ms(idle_for).max(1);
    }

    /// The learned limit, while it is fresh.
    fn current(&self, now: Stamp) -> Option<Duration> {
        (self.learned_ms != 0 && now.since(self.learned_at) < LEARNED_IDLE_TTL)
            .then(|| from_ms(self.learned_ms))
    }

    /// Whether anything was observed.
    fn is_blank(&self) -> bool {
        self.last_ms == 0 && self.learned_ms == 0
    }
}

/// One key's connections and waiters. Lives in [`State::keys`] only while the key has a
/// connection, a dial under way or a waiter; an empty key is retired at once
/// ([`Inner::retire_if_empty`]) and what it learned moves to [`State::remembered`].
///
/// It lives in the key map's own slot, and a warm checkout and its return read only that slot
/// (and the connection's liveness). So the slot is kept small: at 100,000 warm keys the map is
/// slots × 131,072 buckets, and whether that fits the CPU's last-level cache decides the cost
/// of a checkout (BENCHMARKS, pool checkout). Hence per-connection counts in `u32`, instants
/// as 8-byte [`Stamp`]s, idle limits in milliseconds, and what only a key with waiters needs
/// behind one pointer ([`Waiting`]).
struct KeyState<X: Connector> {
    /// Most keys hold one connection: it lives inline, in the key map's own slot, so a checkout
    /// chases no pointer to find it.
    conns: SmallVec<[Entry<X::Conn>; 1]>,
    connecting: usize,
    /// Requests waiting for a connection of the key, and SETTINGS of dials under way; `None`
    /// when there are none (the common warm case), so the slot does not carry empty queues and
    /// a return need not look behind the pointer.
    waiting: Option<Box<Waiting<X>>>,
    /// Learned from the first connection: whether the key's connections are multiplexed.
    multiplexed: Option<bool>,
    /// The last stream limit a server of this key announced.
    known_max_streams: Option<u32>,
    /// Why the key last lost a connection, consumed by the next dial.
    last_loss: Option<CloseReason>,
    /// The routing's reason for the next cold dial ([`CheckoutOpts::cold_reason`]).
    cold_reason: Option<NewReason>,
    /// The server's unannounced idle timeout, as observed from idle closes.
    idle_learning: IdleLearning,
    /// Last time anything happened on the key (for forgetting it once empty and quiet).
    touched: Stamp,
}

/// What a key holds while requests wait for it or a dial is being set up.
struct Waiting<X: Connector> {
    waiters: VecDeque<Waiter<X>>,
    /// SETTINGS that arrived while their connection's dial had not returned yet.
    early_settle: Vec<(ConnId, u32)>,
}

/// What an empty key keeps: the facts that make its next connection's reason and limits right
/// (`idle_expired` rather than `cold_key`, a learned idle timeout, HTTP/2 or not). Small, and
/// bounded in number by [`PoolConfig::max_remembered_keys`].
#[derive(Clone, Copy, Debug)]
struct Remembered {
    multiplexed: Option<bool>,
    known_max_streams: Option<u32>,
    last_loss: Option<CloseReason>,
    idle_learning: IdleLearning,
    touched: Stamp,
}

impl<X: Connector> KeyState<X> {
    fn new(now: Stamp) -> Self {
        KeyState {
            conns: SmallVec::new(),
            connecting: 0,
            waiting: None,
            multiplexed: None,
            known_max_streams: None,
            last_loss: None,
            cold_reason: None,
            idle_learning: IdleLearning::default(),
            touched: now,
        }
    }
    /// A key coming back: what it had learned, as it was when it went empty.
    fn revive(r: Remembered, now: Stamp) -> Self {
        KeyState {
            multiplexed: r.multiplexed,
            known_max_streams: r.known_max_streams,
            last_loss: r.last_loss,
            idle_learning: r.idle_learning,
            ..KeyState::new(now)
        }
    }
    /// Nothing in it: no connection, no dial, no waiter.
    fn is_empty(&self) -> bool {
        self.conns.is_empty() && self.connecting == 0 && self.waiter_count() == 0
    }
    fn waiter_count(&self) -> usize {
        self.waiting.as_ref().map_or(0, |w| w.waiters.len())
    }
    fn waiters(&self) -> impl Iterator<Item = &Waiter<X>> {
        self.waiting.iter().flat_map(|w| w.waiters.iter())
    }
    /// The key's waiting state, made if there is none.
    fn waiting_mut(&mut self) -> &mut Waiting<X> {
        self.waiting.get_or_insert_with(|| {
            Box::new(Waiting {
                waiters: VecDeque::new(),
                early_settle: Vec::new(),
            })
        })
    }
    /// Removes the waiter at `pos` of the queue.
    fn remove_waiter(&mut self, pos: usize) -> Option<Waiter<X>> {
        let w = self.waiting.as_mut()?.waiters.remove(pos);
        self.tidy();
        w
    }
    /// Drops the waiting state once nothing waits and no dial's SETTINGS are pending.
    fn tidy(&mut self) {
        if self
            .waiting
            .as_ref()
            .is_some_and(|w| w.waiters.is_empty() && w.early_settle.is_empty())
        {
            self.waiting = None;
        }
    }
    /// What is worth keeping once it is empty (`None`: nothing was learned).
    fn remembered(&self) -> Option<Remembered> {
        let learned = self.multiplexed.is_some()
            || self.last_loss.is_some()
            || !self.idle_learning.is_blank();
        learned.then_some(Remembered {
            multiplexed: self.multiplexed,
            known_max_streams: self.known_max_streams,
            last_loss: self.last_loss,
            idle_learning: self.idle_learning,
            touched: self.touched,
        })
    }
    fn in_flight(&self) -> usize {
        self.conns.iter().map(|e| e.in_flight as usize).sum()
    }
}

/// Idle connections of all keys in the order they became idle, for the pool-wide idle limit
/// (least recently used goes first) and the idle sweep (oldest first, O(expired)).
///
/// An insertion-ordered queue with lazy deletion, instead of an ordered set: a connection that
/// becomes idle pushes a *mark* (when, its slot, the slot's generation, its key) at the back,
/// which is O(1) and touches only the queue's hot end. A connection that stops being idle
/// (checked out, closed) does not search for its mark: it bumps its slot's generation in
/// `gens`, a dense `u32` table indexed by slot, which makes the mark stale. Stale marks are
/// dropped when they reach the front, and the whole queue is compacted once it holds more than
/// twice as many marks as idle connections (plus a constant), so it stays O(idle) in memory
/// and every operation is amortised O(1). Checking a mark is one read of `gens` — no hash
/// lookup.
///
/// Invariant: every connection with no request in flight has exactly one live mark
/// (`Entry::marked`), whose `since` is its `idle_since`; busy connections have none; `len`
/// counts the live marks. Marks are in the order they were pushed, under the pool lock; their
/// instants are read just before the lock is taken, so two threads' marks may be out of order
/// by that gap (microseconds): a connection then expires at most one sweep late.
struct IdleQueue<K> {
    marks: VecDeque<Mark<K>>,
    /// Per slot: the generation a live mark of it must carry.
    gens: Vec<u32>,
    /// Slots of connections that left the pool, for reuse (so `gens` is as long as the most
    /// connections ever held at once).
    free: Vec<u32>,
    /// Live marks (idle connections).
    len: usize,
}

struct Mark<K> {
    since: Stamp,
    slot: u32,
    gen: u32,
    key: K,
}

impl<K: Clone> IdleQueue<K> {
    fn new() -> Self {
        IdleQueue {
            marks: VecDeque::new(),
            gens: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    /// Idle connections.
    fn len(&self) -> usize {
        self.len
    }

    /// A slot for a new connection.
    fn new_slot(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            self.gens.push(0);
            u32::try_from(self.gens.len() - 1).expect("fewer than 2^32 connections at once")
        })
    }

    fn live(&self, m: &Mark<K>) -> bool {
        self.gens[m.slot as usize] == m.gen
    }

    /// `e` became idle (at `e.idle_since`).
    fn mark<C>(&mut self, e: &mut Entry<C>, key: &K) {
        let slot = e.slot as usize;
        if e.marked {
            // Not expected (a connection becomes idle once per idle period); keep one mark.
            self.gens[slot] = self.gens[slot].wrapping_add(1);
        } else {
            e.marked = true;
            self.len += 1;
        }
        self.marks.push_back(Mark {
            since: e.idle_since,
            slot: e.slot,
            gen: self.gens[slot],
            key: key.clone(),
        });
        if self.marks.len() > 2 * self.len + 64 {
            let gens = &self.gens;
            self.marks.retain(|m| gens[m.slot as usize] == m.gen);
        }
    }

    /// `e` is no longer idle (checked out, or leaving the pool).
    fn unmark<C>(&mut self, e: &mut Entry<C>) {
        if e.marked {
            let slot = e.slot as usize;
            self.gens[slot] = self.gens[slot].wrapping_add(1);
            e.marked = false;
            self.len -= 1;
        }
    }

    /// `e` left the pool: its mark (if any) goes stale and its slot is free again.
    fn remove<C>(&mut self, e: &mut Entry<C>) {
        self.unmark(e);
        let slot = e.slot as usize;
        // Bump again so a mark pushed before a reuse of the slot can never match.
        self.gens[slot] = self.gens[slot].wrapping_add(1);
        self.free.push(e.slot);
    }

    /// The oldest idle connection: (since, slot, key). Drops stale marks on the way.
    fn oldest(&mut self) -> Option<(Stamp, u32, &K)> {
        while let Some(m) = self.marks.front() {
            if self.live(m) {
                break;
            }
            self.marks.pop_front();
        }
        self.marks.front().map(|m| (m.since, m.slot, &m.key))
    }

    /// Removes the oldest mark (after [`oldest`](Self::oldest) returned it) and gives its key.
    /// The caller takes its connection out of the pool ([`remove`](Self::remove)).
    fn pop_oldest(&mut self) -> Option<K> {
        self.marks.pop_front().map(|m| m.key)
    }

    /// Gives memory back after a burst (called by the sweep): the queue keeps at most about
    /// four times the room its marks need.
    fn shrink(&mut self) {
        let want = self.marks.len().max(64);
        if self.marks.capacity() > 4 * want {
            self.marks.shrink_to(2 * want);
        }
    }

    /// Live marks, oldest first: (slot, key).
    fn iter(&self) -> impl Iterator<Item = (u32, &K)> + '_ {
        self.marks
            .iter()
            .filter(|m| self.live(m))
            .map(|m| (m.slot, &m.key))
    }
}

struct State<X: Connector> {
    /// Keys with a connection, a dial under way or a waiter (see [`KeyState`]).
    keys: HashMap<X::Key, KeyState<X>>,
    /// What empty keys learned, least recently used first out.
    remembered: LruCache<X::Key, Remembered>,
    /// Remembered keys dropped for the bound ([`PoolStats::forgotten`]).
    forgotten: u64,
    /// Open + connecting connections, all keys.
    total: usize,
    /// Idle connections, oldest first, for pool-wide LRU eviction and the idle sweep.
    idle: IdleQueue<X::Key>,
    /// Keys that wait for a dial the pool-wide limit blocked.
    blocked: VecDeque<X::Key>,
    /// Keys whose connections have their own, shorter idle limits (a server's `Keep-Alive:
    /// timeout=`, a learned idle timeout): the sweep prunes these keys fully; all others only
    /// need the pool-wide idle timeout, which the sweep applies from the oldest idle entry.
    hinted: std::collections::HashSet<X::Key>,
    /// Sweeps since start (a pass over every key runs every [`RETIRE_PASS_EVERY_SWEEPS`]).
    sweeps: u64,
    next_id: u64,
    closed: bool,
}

/// The shared core; [`Pool`] is a cheap handle to it.
struct Inner<X: Connector> {
    /// Every map of the pool. Held briefly; never across `.await`.
    state: Mutex<State<X>>,
    cfg: PoolConfig,
    connector: X,
    events: Arc<dyn PoolEvents<X::Key>>,
    /// When the pool started: its [`Stamp`]s count from here.
    epoch: Instant,
}

/// A connection that left the pool: key, reason, requests it carried, the handle to drop.
type Closed<X> = (
    <X as Connector>::Key,
    CloseReason,
    u64,
    Option<<X as Connector>::Conn>,
);

/// Side effects collected under the lock and run after it is released.
struct Effects<X: Connector> {
    dials: Vec<(X::Key, ConnId, Option<u64>, NewReason)>,
    closed: Vec<Closed<X>>,
    /// Leases whose receiver was gone; dropped after unlock (they carry no lock-taking drop
    /// because they were disarmed).
    dead_leases: Vec<Lease<X>>,
}

impl<X: Connector> Effects<X> {
    fn new() -> Self {
        Effects {
            dials: Vec::new(),
            closed: Vec::new(),
            dead_leases: Vec::new(),
        }
    }
}

/// The connection pool. Clone is cheap (an `Arc`).
pub struct Pool<X: Connector> {
    inner: Arc<Inner<X>>,
}

impl<X: Connector> Clone for Pool<X> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

/// A connection checked out for one request. Release it with [`Lease::release`]; a lease
/// dropped before [`Lease::mark_sent`] returns its connection unused, one dropped after goes
/// away as [`CloseReason::Abandoned`] (its state is unknown).
pub struct Lease<X: Connector> {
    conn: Option<X::Conn>,
    key: X::Key,
    id: ConnId,
    reused: bool,
    new_reason: Option<NewReason>,
    index: u64,
    pool: Weak<Inner<X>>,
    sent: bool,
    armed: bool,
    multiplexed: bool,
}

impl<X: Connector> Debug for Lease<X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("id", &self.id)
            .field("reused", &self.reused)
            .field("index", &self.index)
            .finish()
    }
}

/// Lets a connection's driver tell the pool what it sees. Holds only a `Weak` to the pool.
pub struct ConnWatch<X: Connector> {
    pool: Weak<Inner<X>>,
    key: X::Key,
    id: ConnId,
}

impl<X: Connector> Clone for ConnWatch<X> {
    fn clone(&self) -> Self {
        ConnWatch {
            pool: self.pool.clone(),
            key: self.key.clone(),
            id: self.id,
        }
    }
}

impl<X: Connector> ConnWatch<X> {
    /// The connection's id (also on its leases).
    pub fn id(&self) -> ConnId {
        self.id
    }
    /// The connection ended. An idle connection leaves the pool at once and its cause is
    /// counted (server closed idle / reset / stray bytes); a busy one leaves when its request
    /// ends.
    pub fn closed(&self, cause: EndCause) {
        if let Some(inner) = self.pool.upgrade() {
            inner.conn_ended(&self.key, self.id, cause);
        }
    }
    /// The server's SETTINGS arrived with this concurrent stream limit.
    pub fn settled(&self, max_streams: usize) {
        if let Some(inner) = self.pool.upgrade() {
            inner.conn_settled(&self.key, self.id, max_streams);
        }
    }
    /// The server sent GOAWAY: no new requests on this connection; in-flight ones finish.
    pub fn goaway(&self) {
        if let Some(inner) = self.pool.upgrade() {
            inner.conn_draining(&self.key, self.id, CloseReason::Goaway);
        }
    }
}

impl<X: Connector> Lease<X> {
    /// The connection.
    pub fn conn(&mut self) -> &mut X::Conn {
        self.conn
            .as_mut()
            .expect("lease holds its connection until released")
    }
    /// The key.
    pub fn key(&self) -> &X::Key {
        &self.key
    }
    /// The connection's id.
    pub fn id(&self) -> ConnId {
        self.id
    }
    /// False when this is the first request on a new connection.
    pub fn reused(&self) -> bool {
        self.reused
    }
    /// Why the connection was opened, on its first request.
    pub fn new_reason(&self) -> Option<NewReason> {
        self.new_reason
    }
    /// 1-based index of this request on its connection.
    pub fn index(&self) -> u64 {
        self.index
    }
    /// Marks that request bytes may have reached the connection: from now on, dropping the
    /// lease discards an exclusive connection (a shared one only loses the stream).
    pub fn mark_sent(&mut self) {
        self.sent = true;
    }
    /// Returns the connection to the pool, or closes it.
    pub fn release(mut self, how: Release) {
        self.finish(how, true);
    }
    fn finish(&mut self, how: Release, counted: bool) {
        if !self.armed {
            return;
        }
        self.armed = false;
        let conn = self.conn.take();
        if let Some(inner) = self.pool.upgrade() {
            inner.release(&self.key, self.id, conn, how, counted);
        }
    }
    fn disarm(&mut self) -> Option<X::Conn> {
        self.armed = false;
        self.conn.take()
    }
}

impl<X: Connector> Drop for Lease<X> {
    fn drop(&mut self) {
        // A shared (HTTP/2) connection loses only the stream, which h2 resets; an exclusive
        // one whose request may be half-sent has an unknown state and goes.
        if self.sent && !self.multiplexed {
            self.finish(Release::Close(CloseReason::Abandoned), true);
        } else {
            self.finish(Release::Keep(Hints::default()), false);
        }
    }
}

impl<X: Connector> Pool<X> {
    /// A new pool; starts its background sweep (which dies with the pool).
    pub fn new(cfg: PoolConfig, connector: X, events: Arc<dyn PoolEvents<X::Key>>) -> Self {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                keys: HashMap::new(),
                remembered: LruCache::unbounded(),
                forgotten: 0,
                total: 0,
                idle: IdleQueue::new(),
                blocked: VecDeque::new(),
                hinted: Default::default(),
                sweeps: 0,
                next_id: 1,
                closed: false,
            }),
            cfg,
            connector,
            events,
            epoch: Instant::now(),
        });
        let weak = Arc::downgrade(&inner);
        let period = inner.cfg.sweep_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                if !inner.sweep() {
                    break;
                }
            }
        });
        Pool { inner }
    }

    /// The connector.
    pub fn connector(&self) -> &X {
        &self.inner.connector
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.cfg
    }

    /// Checks out a connection for `key`: an idle (or, for HTTP/2, unsaturated) one if there
    /// is one, else waits in the key's queue while a dial runs or a connection comes back.
    pub async fn checkout(&self, key: &X::Key, opts: CheckoutOpts) -> Grant<X> {
        let inner = &self.inner;
        let now = inner.now();
        let mut fx = Effects::new();
        enum Step<G, R> {
            Got(G),
            Wait(R, u64),
        }
        let step = {
            let mut st = inner.state.lock();
            if st.closed {
                return Err(CheckoutError::Closed);
            }
            let st = &mut *st;
            if !st.keys.contains_key(key) {
                // A key with no state: revive what it learned before it went empty, if
                // anything (and hint the sweep if that includes an idle timeout).
                let ks = match st.remembered.pop(key) {
                    Some(r) => {
                        if r.idle_learning.current(now).is_some() {
                            st.hinted.insert(key.clone());
                        }
                        KeyState::revive(r, now)
                    }
                    None => KeyState::new(now),
                };
                st.keys.insert(key.clone(), ks);
            }
            let ks = st.keys.get_mut(key).expect("inserted above");
            ks.touched = now;
            inner.prune_key(key, ks, &mut st.idle, &mut st.total, now, &mut fx);
            if opts.cold_reason.is_some() && ks.conns.is_empty() && ks.connecting == 0 {
                ks.cold_reason = opts.cold_reason;
            }
            let found = if opts.fresh {
                None
            } else {
                inner.grant_from(key, ks, &mut st.idle)
            };
            match found {
                Some(lease) => Step::Got(Ok(lease)),
                None => {
                    let id = st.next_id;
                    st.next_id += 1;
                    let (tx, rx) = oneshot::channel();
                    let ks = st.keys.get_mut(key).expect("inserted above");
                    ks.waiting_mut().waiters.push_back(Waiter {
                        id,
                        fresh: opts.fresh,
                        tx,
                    });
                    if opts.fresh {
                        if !inner.start_dial(
                            st,
                            key,
                            Some(id),
                            Some(NewReason::AfterError),
                            &mut fx,
                        ) {
                            // Limits leave no room for a new connection: take any usable one.
                            if let Some(w) = st
                                .keys
                                .get_mut(key)
                                .and_then(|ks| ks.waiting.as_mut())
                                .and_then(|q| q.waiters.iter_mut().find(|w| w.id == id))
                            {
                                w.fresh = false;
                            }
                            inner.serve_waiters(st, key, &mut fx);
                        }
                    } else {
                        inner.dial_if_needed(st, key, Some(id), &mut fx);
                    }
                    Step::Wait(rx, id)
                }
            }
        };
        inner.run_effects(fx);
        let (rx, waiter_id) = match step {
            Step::Got(grant) => return grant,
            Step::Wait(rx, id) => (rx, id),
        };
        // If this future is dropped (the worker went away, a fetch timed out) or the deadline
        // passes, the guard takes the waiter out of the queue so it no longer asks for dials.
        let guard = WaiterGuard {
            inner,
            key,
            id: waiter_id,
        };
        // `let` so the receiver (and any grant that raced into it) drops here, unlocked.
        let res = tokio::time::timeout_at(opts.deadline, rx).await;
        drop(guard);
        match res {
            Ok(Ok(grant)) => grant,
            Ok(Err(_)) => Err(CheckoutError::Closed),
            Err(_) => Err(CheckoutError::Timeout),
        }
    }

    /// Pool-wide counts.
    pub fn stats(&self) -> PoolStats {
        let st = self.inner.state.lock();
        let mut s = PoolStats {
            total: st.total,
            idle: st.idle.len(),
            keys: st.keys.len(),
            remembered: st.remembered.len(),
            forgotten: st.forgotten,
            ..Default::default()
        };
        for ks in st.keys.values() {
            s.connecting += ks.connecting;
            s.waiting += ks.waiter_count();
        }
        s
    }

    /// Per-key counts for every key with a connection, a dial or a waiter.
    pub fn key_stats(&self) -> Vec<KeyStats<X::Key>> {
        let st = self.inner.state.lock();
        st.keys
            .iter()
            .map(|(k, ks)| KeyStats {
                key: k.clone(),
                open: ks.conns.len(),
                idle: ks.conns.iter().filter(|e| e.is_idle()).count(),
                connecting: ks.connecting,
                in_flight: ks.in_flight(),
                waiting: ks.waiter_count(),
                multiplexed: ks.multiplexed,
            })
            .collect()
    }

    /// Closes every idle connection whose key matches `pred` (e.g. keys whose isolation scope
    /// ended) and counts them as `reason`. Returns how many it closed. Costs one pass over the
    /// idle connections.
    pub fn close_idle_where(&self, pred: impl Fn(&X::Key) -> bool, reason: CloseReason) -> usize {
        let inner = &self.inner;
        let mut fx = Effects::new();
        let n = {
            let mut st = inner.state.lock();
            let st = &mut *st;
            let victims: Vec<(u32, X::Key)> = st
                .idle
                .iter()
                .filter(|(_, k)| pred(k))
                .map(|(slot, k)| (slot, k.clone()))
                .collect();
            let mut n = 0;
            for (slot, key) in victims {
                if let Some(ks) = st.keys.get_mut(&key) {
                    if let Some(pos) = ks.conns.iter().position(|e| e.slot == slot) {
                        let mut e = ks.conns.swap_remove(pos);
                        st.idle.remove(&mut e);
                        st.total -= 1;
                        fx.closed.push((key.clone(), reason, e.requests, e.conn));
                        n += 1;
                        inner.retire_if_empty(st, &key);
                    }
                }
            }
            if n > 0 && !st.blocked.is_empty() {
                inner.kick_blocked(st, &mut fx);
            }
            n
        };
        inner.run_effects(fx);
        n
    }

    /// Whether `key` has an open connection carrying no request (cheap: one lookup).
    pub fn has_idle(&self, key: &X::Key) -> bool {
        let st = self.inner.state.lock();
        st.keys.get(key).is_some_and(|ks| {
            ks.conns
                .iter()
                .any(|e| e.is_idle() && e.dead.is_none() && e.draining.is_none())
        })
    }

    /// Runs expiry now (the background sweep does this periodically).
    pub fn sweep_now(&self) {
        self.inner.sweep();
    }

    /// Closes every idle connection and refuses new checkouts; in-flight requests finish.
    pub fn shutdown(&self) {
        let mut fx = Effects::new();
        {
            let mut st = self.inner.state.lock();
            st.closed = true;
            let st = &mut *st;
            for (k, ks) in st.keys.iter_mut() {
                if let Some(waiting) = ks.waiting.take() {
                    for w in waiting.waiters {
                        let _ = w.tx.send(Err(CheckoutError::Closed));
                    }
                }
                let mut i = 0;
                while i < ks.conns.len() {
                    if ks.conns[i].is_idle() {
                        let mut e = ks.conns.swap_remove(i);
                        st.idle.remove(&mut e);
                        st.total -= 1;
                        fx.closed
                            .push((k.clone(), CloseReason::Shutdown, e.requests, e.conn));
                    } else {
                        ks.conns[i].draining = Some(CloseReason::Shutdown);
                        i += 1;
                    }
                }
            }
            // Nothing will come back for these: no need to remember them either.
            st.keys.retain(|_, ks| !ks.is_empty());
            st.remembered.clear();
        }
        self.inner.run_effects(fx);
    }
}

impl<X: Connector> Inner<X> {
    /// The pool's clock.
    fn now(&self) -> Stamp {
        let nanos = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos();
        Stamp(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Effective idle limit of an entry.
    fn idle_limit(&self, e: &Entry<X::Conn>, learned: Option<Duration>) -> (Duration, CloseReason) {
        let mut limit = (self.cfg.idle_timeout, CloseReason::IdleExpired);
        for d in [e.server_idle_ms.map(from_ms), learned]
            .into_iter()
            .flatten()
        {
            if d < limit.0 {
                limit = (d, CloseReason::KeepAliveTimeout);
            }
        }
        limit
    }

    /// Removes a key's expired or dead idle connections and drains old busy ones.
    fn prune_key(
        &self,
        key: &X::Key,
        ks: &mut KeyState<X>,
        idle: &mut IdleQueue<X::Key>,
        total: &mut usize,
        now: Stamp,
        fx: &mut Effects<X>,
    ) {
        let mut i = 0;
        while i < ks.conns.len() {
            let e = &mut ks.conns[i];
            let aged = self
                .cfg
                .max_lifetime
                .is_some_and(|l| now.since(e.created) >= l);
            if aged && e.draining.is_none() {
                e.draining = Some(CloseReason::MaxLifetime);
            }
            let reason = if e.is_idle() {
                let (limit, why) = self.idle_limit(e, ks.idle_learning.current(now));
                if let Some(r) = e.dead.or(e.draining) {
                    Some(r)
                } else if e.conn.as_ref().is_some_and(|c| !c.is_open()) {
                    Some(CloseReason::StaleAtCheckout)
                } else if now.since(e.idle_since) >= limit {
                    Some(why)
                } else if e.remaining == Some(0) {
                    Some(CloseReason::MaxRequests)
                } else {
                    None
                }
            } else {
                None
            };
            if let Some(r) = reason {
                let mut e = ks.conns.swap_remove(i);
                idle.remove(&mut e);
                *total -= 1;
                ks.last_loss = Some(r);
                fx.closed.push((key.clone(), r, e.requests, e.conn));
            } else {
                i += 1;
            }
        }
    }

    /// Picks a usable connection of the key and makes a lease for it.
    fn grant_from(
        self: &Arc<Self>,
        key: &X::Key,
        ks: &mut KeyState<X>,
        idle: &mut IdleQueue<X::Key>,
    ) -> Option<Lease<X>> {
        // Exclusive: most recently idle first. Shared: the busiest one with room, so load packs
        // onto few connections and spare ones can idle out.
        let mut best: Option<usize> = None;
        for (i, e) in ks.conns.iter().enumerate() {
            if !e.has_capacity() || e.conn.as_ref().is_some_and(|c| !c.is_open()) {
                continue;
            }
            best = match best {
                None => Some(i),
                Some(b) => {
                    let cur = &ks.conns[b];
                    let better = if e.multiplexed {
                        e.in_flight > cur.in_flight
                    } else {
                        e.idle_since > cur.idle_since
                    };
                    Some(if better { i } else { b })
                }
            };
        }
        let i = best?;
        Some(self.lease_on(key, &mut ks.conns[i], idle))
    }

    fn lease_on(
        self: &Arc<Self>,
        key: &X::Key,
        e: &mut Entry<X::Conn>,
        idle: &mut IdleQueue<X::Key>,
    ) -> Lease<X> {
        if e.in_flight == 0 {
            idle.unmark(e);
        }
        let conn = if e.multiplexed {
            e.conn.as_ref().and_then(|c| c.share())
        } else {
            e.conn.take()
        };
        e.in_flight += 1;
        e.requests += 1;
        if let Some(r) = e.remaining.as_mut() {
            *r = r.saturating_sub(1);
        }
        let reused = e.requests > 1;
        Lease {
            conn,
            key: key.clone(),
            id: e.id,
            reused,
            new_reason: if reused { None } else { Some(e.new_reason) },
            index: e.requests,
            pool: Arc::downgrade(self),
            sent: false,
            armed: true,
            multiplexed: e.multiplexed,
        }
    }

    /// Starts dials so that the key's waiters can be served, within limits.
    fn dial_if_needed(
        self: &Arc<Self>,
        st: &mut State<X>,
        key: &X::Key,
        owner: Option<u64>,
        fx: &mut Effects<X>,
    ) {
        let Some(ks) = st.keys.get(key) else { return };
        let waiting = ks
            .waiters()
            .filter(|w| !w.fresh && !w.tx.is_closed())
            .count();
        if waiting == 0 {
            return;
        }
        let may_mux = ks
            .multiplexed
            .unwrap_or_else(|| self.connector.may_multiplex(key));
        let needed = if may_mux {
            // Never dial while a connection of the key is still being set up: its SETTINGS
            // tell how much it carries.
            let unsettled = ks
                .conns
                .iter()
                .any(|e| e.multiplexed && !e.settled && e.dead.is_none() && e.draining.is_none());
            if ks.connecting > 0 && ks.multiplexed.is_none() || unsettled {
                0
            } else {
                let per_conn = ks.known_max_streams.unwrap_or(1).max(1) as usize;
                let coming = ks.connecting * per_conn;
                let spare: usize = ks
                    .conns
                    .iter()
                    .filter(|e| e.has_capacity())
                    .map(|e| (e.max_streams - e.in_flight) as usize)
                    .sum();
                let uncovered = waiting.saturating_sub(coming + spare);
                if ks.multiplexed.is_none() {
                    // First contact: one probe dial tells the protocol.
                    uncovered.min(1)
                } else {
                    uncovered.div_ceil(per_conn)
                }
            }
        } else {
            let spare = ks.conns.iter().filter(|e| e.has_capacity()).count();
            waiting.saturating_sub(ks.connecting + spare)
        };
        let mut owner = owner;
        for _ in 0..needed {
            if !self.start_dial(st, key, owner.take(), None, fx) {
                break;
            }
        }
    }

    /// Starts one dial if the limits allow (evicting an idle connection of another key when
    /// only the pool-wide limit stands in the way). Returns false when blocked.
    fn start_dial(
        self: &Arc<Self>,
        st: &mut State<X>,
        key: &X::Key,
        owner: Option<u64>,
        reason: Option<NewReason>,
        fx: &mut Effects<X>,
    ) -> bool {
        let per_key = {
            let ks = st.keys.get(key).expect("key state exists when dialing");
            ks.conns.len() + ks.connecting
        };
        if per_key >= self.cfg.max_per_key {
            return false;
        }
        if st.total >= self.cfg.max_total && !self.evict_one_idle(st, fx) {
            if !st.blocked.contains(key) {
                st.blocked.push_back(key.clone());
            }
            return false;
        }
        let id = st.next_id;
        st.next_id += 1;
        st.total += 1;
        let ks = st.keys.get_mut(key).expect("key state exists when dialing");
        // A connection the key lost is why it needs another, even when others exist (a
        // retired connection's replacement is not "all busy"); otherwise busy or cold.
        // Routing's reason is for this dial only; never let it linger for a later one.
        let cold_reason = ks.cold_reason.take();
        let reason = reason.unwrap_or_else(|| {
            let live = ks
                .conns
                .iter()
                .any(|e| e.dead.is_none() && e.draining.is_none());
            if let Some(loss) = ks.last_loss.take() {
                loss.next_new_reason()
            } else if live || ks.connecting > 0 {
                if ks.multiplexed == Some(true) {
                    NewReason::H2Saturated
                } else {
                    NewReason::AllBusy
                }
            } else {
                cold_reason.unwrap_or(NewReason::ColdKey)
            }
        });
        ks.connecting += 1;
        fx.dials.push((key.clone(), id, owner, reason));
        true
    }

    /// Evicts the pool's least recently used idle connection. False if there is none.
    fn evict_one_idle(&self, st: &mut State<X>, fx: &mut Effects<X>) -> bool {
        let Some((_, slot, _)) = st.idle.oldest() else {
            return false;
        };
        let key = st.idle.pop_oldest().expect("oldest() found it");
        self.take_idle(st, key, slot, CloseReason::Evicted, fx)
    }

    /// Takes the idle connection in `slot` of `key` out of the pool for `reason` (its mark was
    /// just popped), and retires the key if that emptied it. False if it was not there.
    fn take_idle(
        &self,
        st: &mut State<X>,
        key: X::Key,
        slot: u32,
        reason: CloseReason,
        fx: &mut Effects<X>,
    ) -> bool {
        let Some(ks) = st.keys.get_mut(&key) else {
            return false;
        };
        let Some(pos) = ks.conns.iter().position(|e| e.slot == slot) else {
            return false;
        };
        let mut e = ks.conns.swap_remove(pos);
        debug_assert!(e.marked, "a live mark is an idle connection's");
        st.idle.remove(&mut e);
        st.total -= 1;
        ks.last_loss = Some(reason);
        let empty = ks.is_empty();
        fx.closed.push((key.clone(), reason, e.requests, e.conn));
        if empty {
            self.retire_if_empty(st, &key);
        }
        true
    }

    /// Moves an empty key out of [`State::keys`]: what it learned goes to the bounded
    /// [`State::remembered`] (forgetting the least recently used key past the bound, counted),
    /// the rest is freed. Every path that can empty a key calls this, so the key map holds only
    /// keys with something in them: its size follows the connections, not the names ever seen.
    fn retire_if_empty(&self, st: &mut State<X>, key: &X::Key) {
        if !st.keys.get(key).is_some_and(KeyState::is_empty) {
            return;
        }
        let (key, ks) = st.keys.remove_entry(key).expect("present: checked above");
        st.hinted.remove(&key);
        let Some(r) = ks.remembered() else {
            return;
        };
        if self.cfg.max_remembered_keys == 0 {
            st.forgotten += 1;
            return;
        }
        if st.remembered.len() >= self.cfg.max_remembered_keys && !st.remembered.contains(&key) {
            st.remembered.pop_lru();
            st.forgotten += 1;
        }
        st.remembered.put(key, r);
    }

    /// Hands usable connections of the key to its waiters, oldest first.
    fn serve_waiters(self: &Arc<Self>, st: &mut State<X>, key: &X::Key, fx: &mut Effects<X>) {
        let State { keys, idle, .. } = st;
        let Some(ks) = keys.get_mut(key) else { return };
        self.serve_key_waiters(key, ks, idle, fx);
    }

    /// [`serve_waiters`](Self::serve_waiters) on a key state already at hand.
    fn serve_key_waiters(
        self: &Arc<Self>,
        key: &X::Key,
        ks: &mut KeyState<X>,
        idle: &mut IdleQueue<X::Key>,
        fx: &mut Effects<X>,
    ) {
        loop {
            let next = ks
                .waiters()
                .enumerate()
                .find(|(_, w)| !w.fresh)
                .map(|(pos, w)| (pos, w.tx.is_closed()));
            let Some((pos, gone)) = next else { break };
            if gone {
                ks.remove_waiter(pos);
                continue;
            }
            let Some(lease) = self.grant_from(key, ks, idle) else {
                break;
            };
            let w = ks.remove_waiter(pos).expect("position is valid");
            if let Err(Ok(mut lease)) = w.tx.send(Ok(lease)) {
                // The waiter left between our check and the send: undo the grant.
                let conn = lease.disarm();
                undo_grant(ks, idle, key, lease.id, conn, self.now());
                fx.dead_leases.push(lease);
            }
        }
    }

    /// A dial finished.
    fn dial_done(
        self: &Arc<Self>,
        key: &X::Key,
        id: ConnId,
        owner: Option<u64>,
        reason: NewReason,
        result: Result<Connected<X::Conn>, X::Error>,
    ) {
        let now = self.now();
        let mut fx = Effects::new();
        let mut failed = false;
        let mut opened = false;
        {
            let mut st = self.state.lock();
            let st = &mut *st;
            let closed = st.closed;
            let ks = st
                .keys
                .entry(key.clone())
                .or_insert_with(|| KeyState::new(now));
            ks.connecting -= 1;
            ks.touched = now;
            // SETTINGS this dial's connection sent before the dial returned (HTTP/2) are this
            // dial's alone: taken out whatever the outcome, so a failed dial's do not stay.
            let mut early = None;
            if let Some(q) = ks.waiting.as_mut() {
                if let Some(pos) = q.early_settle.iter().position(|(i, _)| *i == id) {
                    early = Some(q.early_settle.swap_remove(pos).1);
                }
                if ks.connecting == 0 {
                    q.early_settle.clear();
                }
            }
            ks.tidy();
            match result {
                Ok(c) if !closed => {
                    let announced = early.or(c.max_streams.map(saturate_u32));
                    opened = true;
                    ks.multiplexed = Some(c.multiplexed);
                    if let Some(m) = announced {
                        ks.known_max_streams = Some(m);
                    }
                    let max_streams = if c.multiplexed {
                        // 0 is legal: the server takes no new streams on it for now.
                        announced.or(ks.known_max_streams).unwrap_or(1)
                    } else {
                        1
                    };
                    let slot = st.idle.new_slot();
                    ks.conns.push(Entry {
                        id,
                        conn: Some(c.conn),
                        multiplexed: c.multiplexed,
                        in_flight: 0,
                        max_streams,
                        settled: !c.multiplexed || announced.is_some(),
                        requests: 0,
                        created: now,
                        idle_since: now,
                        server_idle_ms: None,
                        remaining: None,
                        draining: None,
                        dead: None,
                        new_reason: reason,
                        slot,
                        marked: false,
                    });
                    let idx = ks.conns.len() - 1;
                    // The requester that caused the dial gets it first, if still waiting.
                    if let Some(pos) = owner.and_then(|o| ks.waiters().position(|w| w.id == o)) {
                        let w = ks.remove_waiter(pos).expect("position is valid");
                        let lease = self.lease_on(key, &mut ks.conns[idx], &mut st.idle);
                        if let Err(Ok(mut lease)) = w.tx.send(Ok(lease)) {
                            let conn = lease.disarm();
                            undo_grant(ks, &mut st.idle, key, id, conn, now);
                            fx.dead_leases.push(lease);
                        }
                    }
                    self.serve_key_waiters(key, ks, &mut st.idle, &mut fx);
                    if let Some(e) = ks.conns.iter_mut().find(|e| e.id == id) {
                        if e.in_flight == 0 && !e.marked {
                            st.idle.mark(e, key);
                        }
                    }
                    self.enforce_idle_limit(st, &mut fx);
                    // A first dial may have taught us the key is HTTP/1.1: dial for the rest.
                    self.dial_if_needed(st, key, None, &mut fx);
                }
                Ok(c) => {
                    // Shut down meanwhile.
                    st.total -= 1;
                    fx.closed
                        .push((key.clone(), CloseReason::Shutdown, 0, Some(c.conn)));
                }
                Err(e) => {
                    failed = true;
                    st.total -= 1;
                    let err = Arc::new(e);
                    if let Some(pos) = owner.and_then(|o| ks.waiters().position(|w| w.id == o)) {
                        let w = ks.remove_waiter(pos).expect("position is valid");
                        let _ = w.tx.send(Err(CheckoutError::Dial(err.clone())));
                    }
                    let usable = ks
                        .conns
                        .iter()
                        .any(|e| e.dead.is_none() && e.draining.is_none());
                    if !usable && ks.connecting == 0 {
                        // Nothing else is coming for them: tell them now, not at their deadline.
                        if let Some(q) = ks.waiting.as_mut() {
                            for w in q.waiters.drain(..) {
                                let _ = w.tx.send(Err(CheckoutError::Dial(err.clone())));
                            }
                        }
                        ks.tidy();
                    }
                    self.kick_blocked(st, &mut fx);
                }
            }
            self.retire_if_empty(st, key);
        }
        if failed {
            self.events.dial_failed(key);
        }
        if opened {
            self.events.connection_opened(key, reason);
        }
        self.run_effects(fx);
    }

    /// Keeps the number of idle connections within `max_idle_total`.
    fn enforce_idle_limit(&self, st: &mut State<X>, fx: &mut Effects<X>) {
        while st.idle.len() > self.cfg.max_idle_total {
            if !self.evict_one_idle(st, fx) {
                break;
            }
        }
    }

    /// Gives keys blocked by the pool-wide limit a chance to dial.
    fn kick_blocked(self: &Arc<Self>, st: &mut State<X>, fx: &mut Effects<X>) {
        let n = st.blocked.len();
        for _ in 0..n {
            if st.total >= self.cfg.max_total && st.idle.len() == 0 {
                break;
            }
            let Some(k) = st.blocked.pop_front() else {
                break;
            };
            if st.keys.contains_key(&k) {
                self.dial_if_needed(st, &k, None, fx);
            }
        }
    }

    /// A lease came back.
    fn release(
        self: &Arc<Self>,
        key: &X::Key,
        id: ConnId,
        conn: Option<X::Conn>,
        how: Release,
        counted: bool,
    ) {
        let now = self.now();
        let mut fx = Effects::new();
        {
            let mut st = self.state.lock();
            let st = &mut *st;
            let Some(ks) = st.keys.get_mut(key) else {
                return;
            };
            ks.touched = now;
            let Some(pos) = ks.conns.iter().position(|e| e.id == id) else {
                // Already gone (its driver reported it dead, or the pool shut down).
                return;
            };
            let learned = ks.idle_learning.current(now);
            let e = &mut ks.conns[pos];
            e.in_flight -= 1;
            if !counted {
                e.requests -= 1;
                if let Some(r) = e.remaining.as_mut() {
                    *r = r.saturating_add(1);
                }
            }
            if !e.multiplexed {
                e.conn = conn;
            }
            let mut close = match how {
                Release::Close(r) => Some(r),
                Release::Keep(h) => {
                    if let Some(t) = h.idle_timeout {
                        e.server_idle_ms = Some(to_ms(t.saturating_sub(self.cfg.keepalive_margin)));
                        if !st.hinted.contains(key) {
                            st.hinted.insert(key.clone());
                        }
                    }
                    if let Some(m) = h.remaining_requests {
                        e.remaining = Some(saturate_u32(m));
                    }
                    None
                }
            };
            if close.is_none() {
                close = e.dead;
            }
            if close.is_none() && !e.multiplexed && e.conn.as_ref().is_none_or(|c| !c.is_open()) {
                close = Some(CloseReason::Error);
            }
            if close.is_none() && self.cfg.max_requests.is_some_and(|m| e.requests >= m) {
                close = Some(CloseReason::MaxRequests);
            }
            if close.is_none() && e.remaining == Some(0) {
                close = Some(CloseReason::MaxRequests);
            }
            if close.is_none() && e.in_flight == 0 {
                if let Some(r) = e.draining {
                    close = Some(r);
                }
                let (limit, _) = self.idle_limit(e, learned);
                if limit.is_zero() {
                    close = Some(CloseReason::KeepAliveTimeout);
                }
            }
            if let Some(r) = close {
                if e.multiplexed && e.in_flight > 0 {
                    // Other streams still run on it: stop new ones, close when they end.
                    if e.draining.is_none() {
                        e.draining = Some(r);
                    }
                } else {
                    let mut e = ks.conns.swap_remove(pos);
                    st.idle.remove(&mut e);
                    st.total -= 1;
                    ks.last_loss = Some(r);
                    fx.closed.push((key.clone(), r, e.requests, e.conn));
                }
                self.serve_waiters(st, key, &mut fx);
                self.dial_if_needed(st, key, None, &mut fx);
                self.kick_blocked(st, &mut fx);
                self.retire_if_empty(st, key);
            } else {
                if e.in_flight == 0 {
                    e.idle_since = now;
                }
                // The common case: back to idle, nobody waiting — one key lookup in all.
                if ks.waiting.is_some() {
                    self.serve_key_waiters(key, ks, &mut st.idle, &mut fx);
                }
                if let Some(e) = ks.conns.iter_mut().find(|e| e.id == id) {
                    if e.in_flight == 0 && !e.marked {
                        st.idle.mark(e, key);
                    }
                }
                if !st.blocked.is_empty() {
                    self.kick_blocked(st, &mut fx);
                }
                self.enforce_idle_limit(st, &mut fx);
            }
        }
        self.run_effects(fx);
    }

    fn conn_ended(self: &Arc<Self>, key: &X::Key, id: ConnId, cause: EndCause) {
        let now = self.now();
        let mut fx = Effects::new();
        {
            let mut st = self.state.lock();
            let st = &mut *st;
            let Some(ks) = st.keys.get_mut(key) else {
                return;
            };
            let Some(pos) = ks.conns.iter().position(|e| e.id == id) else {
                return;
            };
            let e = &mut ks.conns[pos];
            let reason = match cause {
                EndCause::Fin => CloseReason::ServerClosedIdle,
                EndCause::Reset => CloseReason::ResetIdle,
                EndCause::StrayBytes => CloseReason::StrayBytes,
                EndCause::Goaway => CloseReason::Goaway,
                EndCause::Error | EndCause::Local => CloseReason::Error,
            };
            let idle_for = now.since(e.idle_since);
            if e.is_idle() && (e.multiplexed || e.conn.is_some()) {
                let reason = e.draining.unwrap_or(reason);
                let mut e = ks.conns.swap_remove(pos);
                st.idle.remove(&mut e);
                st.total -= 1;
                ks.last_loss = Some(reason);
                if cause == EndCause::Fin
                    && self.cfg.learn_idle_timeout
                    && e.requests > 0
                    && idle_for < self.cfg.idle_timeout
                {
                    ks.idle_learning
                        .observe(idle_for, self.cfg.keepalive_margin, now);
                    if ks.idle_learning.current(now).is_some() && !st.hinted.contains(key) {
                        st.hinted.insert(key.clone());
                    }
                }
                fx.closed.push((key.clone(), reason, e.requests, e.conn));
                self.dial_if_needed(st, key, None, &mut fx);
                self.kick_blocked(st, &mut fx);
                self.retire_if_empty(st, key);
            } else {
                // A request is on it; the request sees the end and releases it. A GOAWAY
                // that came first explains the end better than the end itself.
                let r = match (e.draining, cause) {
                    (Some(d), _) => d,
                    (None, EndCause::Goaway) => CloseReason::Goaway,
                    _ => CloseReason::Error,
                };
                e.dead.get_or_insert(r);
            }
        }
        self.run_effects(fx);
    }

    fn conn_settled(self: &Arc<Self>, key: &X::Key, id: ConnId, max_streams: usize) {
        let mut fx = Effects::new();
        {
            let mut st = self.state.lock();
            let st = &mut *st;
            let Some(ks) = st.keys.get_mut(key) else {
                return;
            };
            // A limit of 0 (no new streams for now) holds for this connection only; planning
            // for the key's next connections assumes at least one stream.
            let max_streams = saturate_u32(max_streams);
            ks.known_max_streams = Some(max_streams.max(1));
            if let Some(e) = ks.conns.iter_mut().find(|e| e.id == id) {
                e.settled = true;
                e.max_streams = max_streams;
            } else if ks.connecting > 0 {
                ks.waiting_mut().early_settle.push((id, max_streams));
            }
            self.serve_waiters(st, key, &mut fx);
            self.dial_if_needed(st, key, None, &mut fx);
        }
        self.run_effects(fx);
    }

    fn conn_draining(self: &Arc<Self>, key: &X::Key, id: ConnId, why: CloseReason) {
        let mut fx = Effects::new();
        {
            let mut st = self.state.lock();
            let st = &mut *st;
            let Some(ks) = st.keys.get_mut(key) else {
                return;
            };
            let Some(pos) = ks.conns.iter().position(|e| e.id == id) else {
                return;
            };
            let e = &mut ks.conns[pos];
            e.draining.get_or_insert(why);
            if e.is_idle() && (e.multiplexed || e.conn.is_some()) {
                let mut e = ks.conns.swap_remove(pos);
                st.idle.remove(&mut e);
                st.total -= 1;
                ks.last_loss = Some(why);
                fx.closed.push((key.clone(), why, e.requests, e.conn));
            } else {
                ks.last_loss = Some(why);
            }
            self.dial_if_needed(st, key, None, &mut fx);
            self.retire_if_empty(st, key);
        }
        self.run_effects(fx);
    }

    /// Periodic expiry. Returns false once the pool is closed and empty.
    fn sweep(self: &Arc<Self>) -> bool {
        let now = self.now();
        let mut fx = Effects::new();
        let keep_going;
        {
            let mut st = self.state.lock();
            let st = &mut *st;
            // 1. Past the pool-wide idle timeout, oldest idle first: O(expired), not O(keys),
            //    so a pool with 100k warm keys does not stall checkouts every sweep.
            while let Some((since, slot, _)) = st.idle.oldest() {
                if now.since(since) < self.cfg.idle_timeout {
                    break;
                }
                let key = st.idle.pop_oldest().expect("oldest() found it");
                self.take_idle(st, key, slot, CloseReason::IdleExpired, &mut fx);
            }
            // 2. Keys with shorter per-connection limits, and every key when connections have
            //    a maximum lifetime: full prune.
            let State {
                keys,
                idle,
                total,
                hinted,
                sweeps,
                ..
            } = st;
            *sweeps += 1;
            let full = self.cfg.max_lifetime.is_some();
            let mut emptied = Vec::new();
            if full {
                for (k, ks) in keys.iter_mut() {
                    self.prune_key(k, ks, idle, total, now, &mut fx);
                    if ks.is_empty() {
                        emptied.push(k.clone());
                    }
                }
            }
            hinted.retain(|k| {
                let Some(ks) = keys.get_mut(k) else {
                    return false;
                };
                if !full {
                    self.prune_key(k, ks, idle, total, now, &mut fx);
                    if ks.is_empty() {
                        emptied.push(k.clone());
                    }
                }
                ks.idle_learning.current(now).is_some()
                    || ks.conns.iter().any(|e| e.server_idle_ms.is_some())
            });
            // 3. Retire keys the prunes emptied; and, about once a minute, any empty key a
            //    path failed to retire (a safety net: O(keys), but keys are only live ones).
            if *sweeps % RETIRE_PASS_EVERY_SWEEPS == 0 {
                emptied.extend(
                    keys.iter()
                        .filter(|(_, ks)| ks.is_empty())
                        .map(|(k, _)| k.clone()),
                );
            }
            for k in emptied {
                self.retire_if_empty(st, &k);
            }
            // 4. After a burst, give back the room the key map and the idle queue grew to
            //    (the map is rehashed only when it is at most a quarter full).
            st.idle.shrink();
            let live = st.keys.len().max(64);
            if st.keys.capacity() > 4 * live {
                st.keys.shrink_to(2 * live);
            }
            // 5. Forget remembered keys after a quiet spell, least recently retired first:
            //    O(forgotten).
            let forget_after = self.cfg.idle_timeout.max(FORGET_AFTER);
            while let Some((_, r)) = st.remembered.peek_lru() {
                if now.since(r.touched) < forget_after {
                    break;
                }
                st.remembered.pop_lru();
            }
            let blocked: Vec<X::Key> = st.blocked.iter().cloned().collect();
            for k in blocked {
                self.dial_if_needed(st, &k, None, &mut fx);
            }
            keep_going = !(st.closed && st.total == 0);
        }
        self.run_effects(fx);
        keep_going
    }

    /// Runs what was decided under the lock: close events and dials.
    fn run_effects(self: &Arc<Self>, fx: Effects<X>) {
        for (key, reason, requests, conn) in fx.closed {
            drop(conn);
            self.events.connection_closed(&key, reason, requests);
        }
        drop(fx.dead_leases);
        for (key, id, owner, reason) in fx.dials {
            self.events.dial_started(&key, reason);
            let watch = ConnWatch {
                pool: Arc::downgrade(self),
                key: key.clone(),
                id,
            };
            let fut = self.connector.connect(&key, watch);
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                let result = fut.await;
                match weak.upgrade() {
                    Some(inner) => inner.dial_done(&key, id, owner, reason, result),
                    None => drop(result),
                }
            });
        }
    }
}

/// Puts back a grant whose waiter left before receiving it.
fn undo_grant<X: Connector>(
    ks: &mut KeyState<X>,
    idle: &mut IdleQueue<X::Key>,
    key: &X::Key,
    id: ConnId,
    conn: Option<X::Conn>,
    now: Stamp,
) {
    if let Some(e) = ks.conns.iter_mut().find(|e| e.id == id) {
        e.in_flight -= 1;
        e.requests -= 1;
        if let Some(r) = e.remaining.as_mut() {
            *r = r.saturating_add(1);
        }
        if !e.multiplexed {
            e.conn = conn;
        }
        if e.in_flight == 0 {
            e.idle_since = now;
            idle.mark(e, key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[derive(Debug)]
    struct FakeConn {
        open: Arc<AtomicBool>,
        mux: bool,
    }
    impl PoolConn for FakeConn {
        fn share(&self) -> Option<Self> {
            self.mux.then(|| FakeConn {
                open: self.open.clone(),
                mux: true,
            })
        }
        fn is_open(&self) -> bool {
            self.open.load(Ordering::SeqCst)
        }
    }

    type Watched = (ConnWatch<Arc<Fake>>, Arc<AtomicBool>);

    /// The fake connector's dial failure.
    #[derive(Debug, PartialEq, thiserror::Error)]
    #[error("refused")]
    struct Refused;

    #[derive(Default)]
    struct Fake {
        dials: AtomicUsize,
        fail: AtomicBool,
        mux: bool,
        max_streams: Option<usize>,
        delay: Duration,
        watches: Mutex<Vec<Watched>>,
        claim_mux: bool,
        /// The server's SETTINGS (this stream limit) arrive before the dial returns.
        settle_early: Option<usize>,
    }
    impl Connector for Arc<Fake> {
        type Key = &'static str;
        type Conn = FakeConn;
        type Error = Refused;
        fn connect(
            &self,
            _key: &&'static str,
            watch: ConnWatch<Self>,
        ) -> BoxFuture<Result<Connected<FakeConn>, Refused>> {
            let me = self.clone();
            Box::pin(async move {
                me.dials.fetch_add(1, Ordering::SeqCst);
                if let Some(n) = me.settle_early {
                    watch.settled(n);
                }
                tokio::time::sleep(me.delay).await;
                if me.fail.load(Ordering::SeqCst) {
                    return Err(Refused);
                }
                let open = Arc::new(AtomicBool::new(true));
                me.watches.lock().push((watch, open.clone()));
                Ok(Connected {
                    conn: FakeConn { open, mux: me.mux },
                    multiplexed: me.mux,
                    max_streams: me.max_streams,
                })
            })
        }
        fn may_multiplex(&self, _key: &&'static str) -> bool {
            self.mux || self.claim_mux
        }
    }
    #[derive(Default)]
    struct Recorder {
        opened: Mutex<Vec<NewReason>>,
        closed: Mutex<Vec<CloseReason>>,
    }
    impl PoolEvents<&'static str> for Recorder {
        fn dial_started(&self, _: &&'static str, r: NewReason) {
            self.opened.lock().push(r);
        }
        fn connection_closed(&self, _: &&'static str, r: CloseReason, _: u64) {
            self.closed.lock().push(r);
        }
    }

    fn opts() -> CheckoutOpts {
        CheckoutOpts {
            deadline: Instant::now() + Duration::from_secs(5),
            fresh: false,
            cold_reason: None,
        }
    }

    fn setup(fake: Fake, cfg: PoolConfig) -> (Pool<Arc<Fake>>, Arc<Fake>, Arc<Recorder>) {
        let fake = Arc::new(fake);
        let rec = Arc::new(Recorder::default());
        (Pool::new(cfg, fake.clone(), rec.clone()), fake, rec)
    }

    async fn used(pool: &Pool<Arc<Fake>>, key: &'static str) -> Lease<Arc<Fake>> {
        let mut l = pool.checkout(&key, opts()).await.expect("checkout");
        l.mark_sent();
        l
    }

    fn keep() -> Release {
        Release::Keep(Hints::default())
    }

    #[tokio::test(start_paused = true)]
    async fn reuses_idle_connection_for_same_target() {
        let (pool, fake, rec) = setup(Fake::default(), PoolConfig::default());
        let l = used(&pool, "a").await;
        assert!(!l.reused());
        assert_eq!(l.new_reason(), Some(NewReason::ColdKey));
        l.release(keep());
        let l = used(&pool, "a").await;
        assert!(l.reused(), "second request rides the warm connection");
        assert_eq!(l.index(), 2);
        l.release(keep());
        assert_eq!(fake.dials.load(Ordering::SeqCst), 1);
        assert_eq!(*rec.opened.lock(), vec![NewReason::ColdKey]);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_http1_requests_each_get_a_connection_then_reuse_them() {
        let (pool, fake, rec) = setup(Fake::default(), PoolConfig::default());
        let a = used(&pool, "a").await;
        let b = used(&pool, "a").await;
        let c = used(&pool, "a").await;
        assert_eq!(fake.dials.load(Ordering::SeqCst), 3);
        assert_eq!(
            *rec.opened.lock(),
            vec![NewReason::ColdKey, NewReason::AllBusy, NewReason::AllBusy]
        );
        for l in [a, b, c] {
            l.release(keep());
        }
        for _ in 0..3 {
            let l = used(&pool, "a").await;
            assert!(l.reused());
            l.release(keep());
        }
        assert_eq!(fake.dials.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn most_recently_used_idle_connection_goes_first() {
        let (pool, _fake, _rec) = setup(Fake::default(), PoolConfig::default());
        let a = used(&pool, "a").await;
        let b = used(&pool, "a").await;
        let (ida, idb) = (a.id(), b.id());
        b.release(keep());
        tokio::time::advance(Duration::from_millis(10)).await;
        a.release(keep());
        let l = used(&pool, "a").await;
        assert_eq!(l.id(), ida, "a was returned last, so it is warmest");
        assert_ne!(ida, idb);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connection_expires_and_next_dial_says_why() {
        let (pool, fake, rec) = setup(Fake::default(), PoolConfig::default());
        used(&pool, "a").await.release(keep());
        tokio::time::advance(DEFAULT_IDLE_TIMEOUT + Duration::from_secs(1)).await;
        pool.sweep_now();
        assert_eq!(*rec.closed.lock(), vec![CloseReason::IdleExpired]);
        let l = used(&pool, "a").await;
        assert!(!l.reused());
        assert_eq!(l.new_reason(), Some(NewReason::IdleExpired));
        assert_eq!(fake.dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn server_keepalive_timeout_retires_connection_a_margin_early() {
        let (pool, _fake, rec) = setup(Fake::default(), PoolConfig::default());
        let hints = Hints {
            idle_timeout: Some(Duration::from_secs(5)),
            remaining_requests: None,
        };
        used(&pool, "a").await.release(Release::Keep(hints));
        tokio::time::advance(Duration::from_millis(3500)).await;
        let l = used(&pool, "a").await;
        assert!(
            l.reused(),
            "3.5 s idle is inside the server's 5 s minus 1 s margin"
        );
        l.release(Release::Keep(hints));
        tokio::time::advance(Duration::from_millis(4100)).await;
        let l = used(&pool, "a").await;
        assert!(
            !l.reused(),
            "4.1 s idle is past 5 s minus the margin: retired before the server closes"
        );
        assert_eq!(l.new_reason(), Some(NewReason::IdleExpired));
        assert_eq!(*rec.closed.lock(), vec![CloseReason::KeepAliveTimeout]);
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_max_and_own_max_requests_retire_connection() {
        let cfg = PoolConfig {
            max_requests: Some(3),
            ..Default::default()
        };
        let (pool, fake, rec) = setup(Fake::default(), cfg);
        for _ in 0..3 {
            used(&pool, "a").await.release(keep());
        }
        assert_eq!(*rec.closed.lock(), vec![CloseReason::MaxRequests]);
        let hints = Hints {
            idle_timeout: None,
            remaining_requests: Some(1),
        };
        used(&pool, "a").await.release(Release::Keep(hints));
        let l = used(&pool, "a").await;
        assert!(l.reused(), "server allowed one more");
        l.release(keep());
        let l = used(&pool, "a").await;
        assert!(!l.reused());
        assert_eq!(l.new_reason(), Some(NewReason::MaxRequests));
        assert_eq!(fake.dials.load(Ordering::SeqCst), 3);
    }

    /// Simulates the server closing the key's only idle connection (FIN) after `idle`.
    async fn server_closes_idle(pool: &Pool<Arc<Fake>>, fake: &Fake, idle: Duration) {
        tokio::time::advance(idle).await;
        let (watch, open) = fake.watches.lock().last().unwrap().clone();
        open.store(false, Ordering::SeqCst);
        pool.inner.conn_ended(&watch.key, watch.id, EndCause::Fin);
    }

    #[tokio::test(start_paused = true)]
    async fn server_close_of_idle_connection_is_seen_at_once_and_counted() {
        let (pool, fake, rec) = setup(Fake::default(), PoolConfig::default());
        used(&pool, "a").await.release(keep());
        server_closes_idle(&pool, &fake, Duration::from_secs(2)).await;
        assert_eq!(
            pool.stats().idle,
            0,
            "removed without waiting for a checkout"
        );
        assert_eq!(*rec.closed.lock(), vec![CloseReason::ServerClosedIdle]);
        let l = used(&pool, "a").await;
        assert_eq!(l.new_reason(), Some(NewReason::ServerClosedIdle));
        l.release(keep());
        // One observation is not a pattern: 1.1 s idle still reuses.
        tokio::time::advance(Duration::from_millis(1100)).await;
        let l = used(&pool, "a").await;
        assert!(
            l.reused(),
            "a single idle close does not shrink the idle limit"
        );
        l.release(keep());
    }

    #[tokio::test(start_paused = true)]
    async fn two_consistent_idle_closes_teach_the_pool_to_retire_before_the_server() {
        let (pool, fake, _rec) = setup(Fake::default(), PoolConfig::default());
        used(&pool, "a").await.release(keep());
        server_closes_idle(&pool, &fake, Duration::from_secs(5)).await;
        used(&pool, "a").await.release(keep());
        server_closes_idle(&pool, &fake, Duration::from_millis(5100)).await;
        // Learned: about 5 s minus the 1 s margin.
        let l = used(&pool, "a").await;
        l.release(keep());
        tokio::time::advance(Duration::from_millis(4100)).await;
        let l = used(&pool, "a").await;
        assert!(
            !l.reused(),
            "retired before the server's observed idle close"
        );
        assert_eq!(l.new_reason(), Some(NewReason::IdleExpired));
        l.release(keep());
        // The lesson expires: after LEARNED_IDLE_TTL the pool trusts its own limit again.
        tokio::time::advance(LEARNED_IDLE_TTL).await;
        let l = used(&pool, "a").await;
        l.release(keep());
        tokio::time::advance(Duration::from_millis(4100)).await;
        assert!(used(&pool, "a").await.reused());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_closes_shorter_than_the_margin_never_zero_the_idle_limit() {
        let cfg = PoolConfig {
            keepalive_margin: Duration::from_secs(2),
            ..Default::default()
        };
        let (pool, fake, _rec) = setup(Fake::default(), cfg);
        for _ in 0..2 {
            used(&pool, "a").await.release(keep());
            server_closes_idle(&pool, &fake, Duration::from_millis(1500)).await;
        }
        let l = used(&pool, "a").await;
        l.release(keep());
        let l = used(&pool, "a").await;
        assert!(l.reused(), "back-to-back requests still reuse");
    }

    #[tokio::test(start_paused = true)]
    async fn stale_connection_found_at_checkout_is_replaced() {
        let (pool, fake, rec) = setup(Fake::default(), PoolConfig::default());
        used(&pool, "a").await.release(keep());
        fake.watches.lock()[0].1.store(false, Ordering::SeqCst);
        let l = used(&pool, "a").await;
        assert!(!l.reused());
        assert_eq!(l.new_reason(), Some(NewReason::StaleAtCheckout));
        assert_eq!(*rec.closed.lock(), vec![CloseReason::StaleAtCheckout]);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_opens_one_connection_until_settings_then_only_what_streams_need() {
        let fake = Fake {
            mux: true,
            delay: Duration::from_millis(50),
            ..Default::default()
        };
        let (pool, fake, rec) = setup(fake, PoolConfig::default());
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move { used(&pool, "h2").await }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            fake.dials.load(Ordering::SeqCst),
            1,
            "no burst before SETTINGS"
        );
        let (watch, _) = fake.watches.lock()[0].clone();
        pool.inner.conn_settled(&watch.key, watch.id, 8);
        let mut leases = Vec::new();
        for t in tasks {
            leases.push(t.await.unwrap());
        }
        assert_eq!(
            fake.dials.load(Ordering::SeqCst),
            4,
            "32 streams / 8 per connection"
        );
        let opened = rec.opened.lock().clone();
        assert_eq!(opened[0], NewReason::ColdKey);
        assert!(opened[1..].iter().all(|r| *r == NewReason::H2Saturated));
        let new = leases.iter().filter(|l| !l.reused()).count();
        assert_eq!(new, 4, "one new request per connection, the rest reuse");
        for l in leases {
            l.release(keep());
        }
        // All 4 stay, now idle; the next request packs onto one of them.
        let l = used(&pool, "h2").await;
        assert!(l.reused());
    }

    #[tokio::test(start_paused = true)]
    async fn http2_limit_of_zero_streams_sends_requests_elsewhere() {
        let fake = Fake {
            mux: true,
            max_streams: Some(100),
            ..Default::default()
        };
        let (pool, fake, _rec) = setup(fake, PoolConfig::default());
        used(&pool, "h2").await.release(keep());
        let (watch, _) = fake.watches.lock()[0].clone();
        pool.inner.conn_settled(&watch.key, watch.id, 0);
        let l = used(&pool, "h2").await;
        assert_ne!(l.id(), watch.id, "no stream where the server allows none");
        assert_eq!(fake.dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn goaway_stops_new_streams_and_in_flight_ones_finish() {
        let fake = Fake {
            mux: true,
            max_streams: Some(100),
            ..Default::default()
        };
        let (pool, fake, rec) = setup(fake, PoolConfig::default());
        let a = used(&pool, "h2").await;
        let (watch, _) = fake.watches.lock()[0].clone();
        pool.inner
            .conn_draining(&watch.key, watch.id, CloseReason::Goaway);
        let b = used(&pool, "h2").await;
        assert_ne!(
            a.id(),
            b.id(),
            "no new stream on a connection that got GOAWAY"
        );
        assert_eq!(b.new_reason(), Some(NewReason::Goaway));
        a.release(keep());
        assert_eq!(*rec.closed.lock(), vec![CloseReason::Goaway]);
    }

    #[tokio::test(start_paused = true)]
    async fn connection_ending_after_goaway_is_counted_as_goaway_not_error() {
        let fake = Fake {
            mux: true,
            max_streams: Some(100),
            ..Default::default()
        };
        let (pool, fake, rec) = setup(fake, PoolConfig::default());
        let a = used(&pool, "h2").await;
        let (watch, _) = fake.watches.lock()[0].clone();
        pool.inner
            .conn_draining(&watch.key, watch.id, CloseReason::Goaway);
        pool.inner.conn_ended(&watch.key, watch.id, EndCause::Fin);
        a.release(keep());
        assert_eq!(*rec.closed.lock(), vec![CloseReason::Goaway]);
        let b = used(&pool, "h2").await;
        assert_eq!(b.new_reason(), Some(NewReason::Goaway));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_checkouts_leave_the_queue_and_cause_no_dials() {
        let fake = Fake {
            claim_mux: true,
            delay: Duration::from_millis(50),
            ..Default::default()
        };
        let (pool, fake, _rec) = setup(fake, PoolConfig::default());
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let p = pool.clone();
            tasks.push(tokio::spawn(async move { used(&p, "a").await }));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        for t in tasks.drain(4..) {
            t.abort();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(pool.stats().waiting, 4, "aborted checkouts left the queue");
        let leases: Vec<_> = futures_util::future::join_all(tasks).await;
        assert_eq!(leases.len(), 4);
        assert_eq!(
            fake.dials.load(Ordering::SeqCst),
            4,
            "one probe + 3, not 20"
        );
    }

    /// Whether any key still carries a waiting state (the boxed queue a warm checkout must not
    /// have to look behind).
    fn waiting_states(pool: &Pool<Arc<Fake>>) -> usize {
        let st = pool.inner.state.lock();
        st.keys.values().filter(|ks| ks.waiting.is_some()).count()
    }

    /// Served waiters (HTTP/1.1, three at once, one dial each) leave no waiting state; for a
    /// waiter that gives up, see `waiter_gives_up_at_its_deadline_when_key_is_at_its_limit`.
    #[tokio::test(start_paused = true)]
    async fn a_keys_waiting_state_goes_once_nothing_waits() {
        let (pool, _fake, _rec) = setup(Fake::default(), PoolConfig::default());
        let (a, b, c) = tokio::join!(used(&pool, "a"), used(&pool, "a"), used(&pool, "a"));
        assert_eq!(waiting_states(&pool), 0, "served: no queue left behind");
        for l in [a, b, c] {
            l.release(keep());
        }
        assert_eq!(pool.stats().idle, 3);
        assert_eq!(waiting_states(&pool), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dials_early_settings_are_applied_or_dropped_with_it() {
        // The SETTINGS (3 streams) arrive while the dial runs; the dial reports no limit.
        let fake = Fake {
            mux: true,
            settle_early: Some(3),
            delay: Duration::from_millis(20),
            ..Default::default()
        };
        let (pool, fake, _rec) = setup(fake, PoolConfig::default());
        let a = used(&pool, "h2").await;
        let b = used(&pool, "h2").await;
        let c = used(&pool, "h2").await;
        assert_eq!(
            fake.dials.load(Ordering::SeqCst),
            1,
            "three streams ride the one connection its early SETTINGS allow"
        );
        assert_eq!(waiting_states(&pool), 0, "applied: nothing left waiting");
        // The connection is full: a fourth request dials, whose SETTINGS come, then it fails
        // while the first connection stays usable.
        fake.fail.store(true, Ordering::SeqCst);
        let r = pool.checkout(&"h2", opts()).await;
        assert!(matches!(r, Err(CheckoutError::Dial(_))));
        assert_eq!(fake.dials.load(Ordering::SeqCst), 2);
        assert_eq!(
            waiting_states(&pool),
            0,
            "a failed dial's early SETTINGS do not keep the key's waiting state"
        );
        for l in [a, b, c] {
            l.release(keep());
        }
        assert_eq!(pool.stats().idle, 1);
    }

    /// A warm checkout among 100,000 keys costs what the key map's slots cost in cache
    /// ([`KeyState`]'s doc, BENCHMARKS): a field added to the slot should be a decision.
    #[test]
    fn a_key_map_slot_stays_small() {
        struct C(#[allow(dead_code)] Arc<AtomicBool>);
        impl PoolConn for C {
            fn share(&self) -> Option<Self> {
                None
            }
            fn is_open(&self) -> bool {
                true
            }
        }
        struct F;
        impl Connector for F {
            type Key = u64;
            type Conn = C;
            type Error = ();
            fn connect(&self, _: &u64, _: ConnWatch<Self>) -> BoxFuture<Result<Connected<C>, ()>> {
                Box::pin(async { Err(()) })
            }
            fn may_multiplex(&self, _: &u64) -> bool {
                false
            }
        }
        let entry = std::mem::size_of::<Entry<C>>();
        assert!(entry <= 80, "a connection's entry is {entry} bytes");
        let slot = std::mem::size_of::<(u64, KeyState<F>)>();
        assert!(slot <= 152, "a key map slot is {slot} bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn waiter_gives_up_at_its_deadline_when_key_is_at_its_limit() {
        let cfg = PoolConfig {
            max_per_key: 1,
            ..Default::default()
        };
        let (pool, _fake, _rec) = setup(Fake::default(), cfg);
        let held = used(&pool, "a").await;
        let o = CheckoutOpts {
            deadline: Instant::now() + Duration::from_secs(1),
            fresh: false,
            cold_reason: None,
        };
        let err = pool.checkout(&"a", o).await.unwrap_err();
        assert!(matches!(err, CheckoutError::Timeout));
        assert_eq!(pool.stats().waiting, 0, "the waiter left the queue");
        assert_eq!(waiting_states(&pool), 0, "timed out: no queue left behind");
        // A waiter that is there when the connection comes back gets it.
        let p2 = pool.clone();
        let t = tokio::spawn(async move { used(&p2, "a").await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        held.release(keep());
        let l = t.await.unwrap();
        assert!(l.reused());
    }

    #[tokio::test(start_paused = true)]
    async fn dial_failure_reaches_the_requester_and_waiters_at_once() {
        let fake = Fake {
            mux: true,
            delay: Duration::from_millis(20),
            ..Default::default()
        };
        fake.fail.store(true, Ordering::SeqCst);
        let (pool, _fake, _rec) = setup(fake, PoolConfig::default());
        let p2 = pool.clone();
        let t = tokio::spawn(async move { p2.checkout(&"h2", opts()).await });
        let r = pool.checkout(&"h2", opts()).await;
        assert!(matches!(r, Err(CheckoutError::Dial(ref e)) if **e == Refused));
        let r2 = t.await.unwrap();
        assert!(
            matches!(r2, Err(CheckoutError::Dial(_))),
            "waiter is not left hanging"
        );
        assert_eq!(pool.stats().total, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_checkout_dials_even_with_an_idle_connection() {
        let (pool, fake, rec) = setup(Fake::default(), PoolConfig::default());
        used(&pool, "a").await.release(keep());
        let o = CheckoutOpts {
            deadline: Instant::now() + Duration::from_secs(5),
            fresh: true,
            cold_reason: None,
        };
        let l = pool.checkout(&"a", o).await.unwrap();
        assert!(!l.reused());
        assert_eq!(l.new_reason(), Some(NewReason::AfterError));
        assert_eq!(fake.dials.load(Ordering::SeqCst), 2);
        assert_eq!(rec.opened.lock()[1], NewReason::AfterError);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_limit_evicts_least_recently_used_across_keys() {
        let cfg = PoolConfig {
            max_idle_total: 1,
            ..Default::default()
        };
        let (pool, _fake, rec) = setup(Fake::default(), cfg);
        used(&pool, "a").await.release(keep());
        tokio::time::advance(Duration::from_millis(5)).await;
        used(&pool, "b").await.release(keep());
        assert_eq!(*rec.closed.lock(), vec![CloseReason::Evicted]);
        assert_eq!(pool.stats().idle, 1);
        let l = used(&pool, "a").await;
        assert_eq!(l.new_reason(), Some(NewReason::Evicted));
    }

    #[tokio::test(start_paused = true)]
    async fn total_limit_evicts_an_idle_connection_of_another_key() {
        let cfg = PoolConfig {
            max_total: 1,
            ..Default::default()
        };
        let (pool, _fake, rec) = setup(Fake::default(), cfg);
        used(&pool, "a").await.release(keep());
        let l = used(&pool, "b").await;
        assert!(!l.reused());
        assert_eq!(*rec.closed.lock(), vec![CloseReason::Evicted]);
        assert_eq!(pool.stats().total, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn lease_dropped_unsent_returns_connection_and_sent_one_is_discarded() {
        let (pool, fake, rec) = setup(Fake::default(), PoolConfig::default());
        let l = pool.checkout(&"a", opts()).await.unwrap();
        drop(l);
        let l = used(&pool, "a").await;
        assert_eq!(
            fake.dials.load(Ordering::SeqCst),
            1,
            "unsent lease came back"
        );
        assert_eq!(l.index(), 1, "the unsent lease did not count as a request");
        drop(l);
        assert_eq!(*rec.closed.lock(), vec![CloseReason::Abandoned]);
        assert_eq!(pool.stats().total, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn max_lifetime_retires_even_busy_connection_after_its_request() {
        let cfg = PoolConfig {
            max_lifetime: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let (pool, _fake, rec) = setup(Fake::default(), cfg);
        let a = used(&pool, "a").await;
        tokio::time::advance(Duration::from_secs(61)).await;
        let b = used(&pool, "a").await;
        assert_ne!(a.id(), b.id());
        a.release(keep());
        assert_eq!(*rec.closed.lock(), vec![CloseReason::MaxLifetime]);
        b.release(keep());
    }

    #[tokio::test(start_paused = true)]
    async fn first_dial_of_an_h2_capable_key_that_turns_out_http1_dials_for_the_rest() {
        let fake = Fake {
            mux: false,
            claim_mux: true,
            delay: Duration::from_millis(30),
            ..Default::default()
        };
        let (pool, fake, _rec) = setup(fake, PoolConfig::default());
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let p = pool.clone();
            tasks.push(tokio::spawn(async move { used(&p, "a").await }));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            fake.dials.load(Ordering::SeqCst),
            1,
            "one probe while the protocol is unknown"
        );
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            fake.dials.load(Ordering::SeqCst),
            4,
            "HTTP/1.1 learned: one per request"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_key_leaves_the_key_map_and_comes_back_with_what_it_learned() {
        let (pool, _fake, _rec) = setup(Fake::default(), PoolConfig::default());
        used(&pool, "a").await.release(keep());
        assert_eq!((pool.stats().keys, pool.stats().remembered), (1, 0));
        tokio::time::advance(DEFAULT_IDLE_TIMEOUT + Duration::from_secs(1)).await;
        pool.sweep_now();
        let s = pool.stats();
        assert_eq!((s.keys, s.remembered, s.total), (0, 1, 0), "{s:?}");
        assert!(
            pool.key_stats().is_empty(),
            "per-key state went with the last connection"
        );
        // Back: the reason is the one it learned, and it is live again.
        let l = used(&pool, "a").await;
        assert_eq!(l.new_reason(), Some(NewReason::IdleExpired));
        assert_eq!((pool.stats().keys, pool.stats().remembered), (1, 0));
        l.release(keep());
    }

    #[tokio::test(start_paused = true)]
    async fn remembered_keys_are_bounded_and_the_forgotten_are_counted() {
        let cfg = PoolConfig {
            max_remembered_keys: 2,
            ..Default::default()
        };
        let (pool, _fake, _rec) = setup(Fake::default(), cfg);
        for key in ["a", "b", "c"] {
            let l = used(&pool, key).await;
            l.release(Release::Close(CloseReason::ServerClose));
        }
        let s = pool.stats();
        assert_eq!((s.keys, s.remembered, s.forgotten), (0, 2, 1), "{s:?}");
        // "a", the least recently used, was forgotten: cold again. "c" was not.
        assert_eq!(
            used(&pool, "a").await.new_reason(),
            Some(NewReason::ColdKey)
        );
        assert_eq!(
            used(&pool, "c").await.new_reason(),
            Some(NewReason::ServerClose)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn remembered_keys_are_forgotten_after_a_quiet_spell() {
        let (pool, _fake, _rec) = setup(Fake::default(), PoolConfig::default());
        used(&pool, "a")
            .await
            .release(Release::Close(CloseReason::ServerClose));
        assert_eq!(pool.stats().remembered, 1);
        tokio::time::advance(FORGET_AFTER + Duration::from_secs(1)).await;
        pool.sweep_now();
        let s = pool.stats();
        assert_eq!(
            (s.remembered, s.forgotten),
            (0, 0),
            "quiet keys go uncounted"
        );
        assert_eq!(
            used(&pool, "a").await.new_reason(),
            Some(NewReason::ColdKey)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_connection_becomes_the_most_recently_used_for_eviction() {
        let cfg = PoolConfig {
            max_idle_total: 2,
            ..Default::default()
        };
        let (pool, _fake, rec) = setup(Fake::default(), cfg);
        used(&pool, "a").await.release(keep());
        tokio::time::advance(Duration::from_millis(5)).await;
        used(&pool, "b").await.release(keep());
        tokio::time::advance(Duration::from_millis(5)).await;
        // "a" is used again: now "b" is the least recently used idle connection.
        let a = used(&pool, "a").await;
        assert!(a.reused());
        a.release(keep());
        tokio::time::advance(Duration::from_millis(5)).await;
        used(&pool, "c").await.release(keep());
        assert_eq!(*rec.closed.lock(), vec![CloseReason::Evicted]);
        assert!(pool.has_idle(&"a") && pool.has_idle(&"c") && !pool.has_idle(&"b"));
        assert_eq!(pool.stats().idle, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_queue_stays_small_and_exact_through_many_reuses() {
        let (pool, fake, rec) = setup(Fake::default(), PoolConfig::default());
        used(&pool, "quiet").await.release(keep());
        for _ in 0..1_000 {
            used(&pool, "busy").await.release(keep());
        }
        assert_eq!(fake.dials.load(Ordering::SeqCst), 2);
        {
            let st = pool.inner.state.lock();
            assert_eq!(st.idle.len(), 2);
            assert!(
                st.idle.marks.len() <= 2 * 2 + 64 + 1,
                "{}",
                st.idle.marks.len()
            );
            assert_eq!(st.idle.gens.len(), 2, "two connections, two slots");
        }
        // The oldest idle connection is still found first, past all the stale marks.
        tokio::time::advance(DEFAULT_IDLE_TIMEOUT - Duration::from_secs(5)).await;
        used(&pool, "busy").await.release(keep());
        tokio::time::advance(Duration::from_secs(6)).await;
        pool.sweep_now();
        assert_eq!(*rec.closed.lock(), vec![CloseReason::IdleExpired]);
        assert!(!pool.has_idle(&"quiet") && pool.has_idle(&"busy"));
        assert_eq!(pool.stats().idle, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_slots_are_reused_and_their_old_marks_stay_dead() {
        let (pool, _fake, rec) = setup(Fake::default(), PoolConfig::default());
        for round in 0..50 {
            let key = if round % 2 == 0 { "x" } else { "y" };
            used(&pool, key).await.release(keep());
            assert_eq!(pool.close_idle_where(|_| true, CloseReason::ScopeEnded), 1);
        }
        assert_eq!(rec.closed.lock().len(), 50);
        let st = pool.inner.state.lock();
        assert_eq!((st.idle.len(), st.total, st.keys.len()), (0, 0, 0));
        assert_eq!(
            st.idle.gens.len(),
            1,
            "one connection at a time: one slot, reused"
        );
        assert_eq!(st.idle.iter().count(), 0);
    }
}
