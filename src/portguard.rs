//! portguard: the ephemeral-port budget — how many local ports new upstream connections may
//! still take, from the kernel's port range and the sockets holding ports (TIME_WAIT included);
//! warns at 70% and holds new dials at 90% instead of letting them fail with EADDRNOTAVAIL.
//!
//! Data sources (Linux only): `/proc/sys/net/ipv4/ip_local_port_range` for the range and
//! `/proc/net/tcp` + `/proc/net/tcp6` for the sockets (that census is skipped while the totals
//! of `/proc/net/sockstat(6)` stay below half the range, at most [`FULL_CENSUS_EVERY`]; see
//! [`PortGuard::refresh`]). Every socket whose local port lies inside
//! the range counts as holding a port, whatever its state, except listeners. On other systems,
//! or when `/proc` cannot be read, the budget is "unknown" (`known == false`) and the guard never
//! holds anything: it fails open.
//!
//! The count is a conservative approximation: Linux lets one local port serve connections to
//! different destinations, so the real limit is per (local address, destination) pair. When most
//! upstream connections go to few destinations (a proxy node, one big target) the two agree;
//! [`PortBudget::time_wait_top`] shows where the TIME_WAIT sockets point.
//!
//! Usage: one [`PortGuard`] (cheap to clone, shared state inside), [`PortGuard::refresh`] about
//! once a second, [`PortGuard::note_new_connection`] for every new upstream connection and
//! [`PortGuard::admit`] before every new dial.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Share of the port range in use at which a warning is logged (once per crossing).
pub const WARN_RATIO: f64 = 0.70;
/// Share of the port range in use at which new dials are held back by [`PortGuard::admit`].
pub const HOLD_RATIO: f64 = 0.90;

/// Once warned, the warning re-arms (with an info log) only when the ratio falls below this, so
/// a budget hovering around [`WARN_RATIO`] does not log a warning/info pair every second.
const REARM_RATIO: f64 = WARN_RATIO - 0.05;
/// How often [`PortGuard::admit`] re-checks while holding.
const RECHECK: Duration = Duration::from_millis(250);
/// How many destinations [`PortBudget::time_wait_top`] keeps.
const TOP_N: usize = 10;
/// `st` column values in `/proc/net/tcp` (see `include/net/tcp_states.h`).
const ST_TIME_WAIT: u8 = 0x06;
const ST_LISTEN: u8 = 0x0A;

const RANGE_PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const TCP_PATH: &str = "/proc/net/tcp";
const TCP6_PATH: &str = "/proc/net/tcp6";
const SOCKSTAT_PATH: &str = "/proc/net/sockstat";
const SOCKSTAT6_PATH: &str = "/proc/net/sockstat6";

/// Below this share of the range, counted from `/proc/net/sockstat`'s totals (every TCP socket
/// and every TIME_WAIT, a bound on the sockets holding ports in the range), a refresh skips the
/// full census: nothing can be near [`WARN_RATIO`].
const QUICK_RATIO: f64 = 0.5;
/// The full census runs at least this often anyway (for `time_wait_top` and exact counts).
const FULL_CENSUS_EVERY: Duration = Duration::from_secs(10);

/// A snapshot of the ephemeral-port budget.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PortBudget {
    /// Lowest local port of the kernel's ephemeral range (`ip_local_port_range`).
    pub range_low: u16,
    /// Highest local port of the kernel's ephemeral range (`ip_local_port_range`).
    pub range_high: u16,
    /// Number of ports in the range (`range_high - range_low + 1`); 0 when unknown.
    pub range_size: u32,
    /// Local sockets whose local port is inside the range (any state except LISTEN), IPv4+IPv6.
    pub in_use: u32,
    /// Of those, in TIME_WAIT.
    pub time_wait: u32,
    /// TIME_WAIT sockets per remote destination "ip:port", top 10 by count.
    pub time_wait_top: Vec<(String, u32)>,
    /// New connections per second measured by the guard between the last two refreshes.
    pub new_connections_per_second: f64,
    /// in_use / range_size; 0 when unknown.
    pub used_ratio: f64,
    /// Sockets to the busiest single destination / range_size. Linux reuses a local port for
    /// different destinations, so `connect()` fails only when *one* destination's share of the
    /// range is used up: dials are held on this ratio, not on `used_ratio`.
    pub busiest_destination_ratio: f64,
    /// false when /proc could not be read (non-Linux): then nothing is ever held.
    pub known: bool,
}

/// What one pass over `/proc/net/tcp(6)` found; [`PortGuard::parse_proc_net_tcp`] adds to it.
#[derive(Debug, Default)]
pub struct Census {
    /// Sockets with a local port inside the range, any state except LISTEN.
    pub in_use: u32,
    /// Of those, in TIME_WAIT.
    pub time_wait: u32,
    /// TIME_WAIT sockets per remote destination, rendered `1.2.3.4:443` / `[2001:db8::1]:443`.
    pub time_wait_by_dest: HashMap<String, u32>,
    /// Sockets (any state but LISTEN) to the busiest single destination.
    pub busiest_dest: u32,
}

/// [`PortGuard::admit`] waited its whole `max_wait` and the budget was still at or above
/// [`HOLD_RATIO`].
#[derive(Debug, thiserror::Error)]
#[error(
    "ephemeral ports nearly exhausted: {:.1}% of the local port range in use (hold threshold {:.0}%)",
    .used_ratio * 100.0,
    HOLD_RATIO * 100.0
)]
pub struct PortsExhausted {
    /// The used ratio at the moment of giving up.
    pub used_ratio: f64,
}

/// The ephemeral-port guard. Clones share one state.
#[derive(Clone)]
pub struct PortGuard {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None`: no data source at all (non-Linux); the budget stays unknown.
    source: Option<Source>,
    state: Mutex<State>,
    /// Serialises refreshes; [`PortGuard::admit`] only `try_lock`s it so held dials coalesce.
    refreshing: Mutex<()>,
    new_connections: AtomicU64,
}

struct Source {
    range: PathBuf,
    tcp: PathBuf,
    tcp6: PathBuf,
    /// `/proc/net/sockstat` and `sockstat6`: socket totals, a few lines whatever the load.
    sockstat: PathBuf,
    sockstat6: PathBuf,
}

#[derive(Default)]
struct State {
    budget: PortBudget,
    /// in_use as last measured from /proc (the budget shows the override instead, if any).
    measured_in_use: u32,
    /// Sockets to the busiest destination, as last measured.
    measured_busiest: u32,
    in_use_override: Option<u32>,
    /// The warning at WARN_RATIO has been logged and not re-armed yet.
    warned: bool,
    last_refresh: Option<Instant>,
    last_count: u64,
    /// When the last full census of `/proc/net/tcp(6)` succeeded.
    last_census: Option<Instant>,
    /// Full censuses taken (read by the tests).
    censuses: u64,
}

impl Default for PortGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for PortGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortGuard")
            .field("budget", &self.inner.state.lock().budget)
            .finish()
    }
}

impl PortGuard {
    /// Reads the port range and takes a first census; `known == false` if `/proc` is unreadable
    /// or the system is not Linux.
    pub fn new() -> Self {
        let source = cfg!(target_os = "linux").then(|| Source {
            range: RANGE_PATH.into(),
            tcp: TCP_PATH.into(),
            tcp6: TCP6_PATH.into(),
            sockstat: SOCKSTAT_PATH.into(),
            sockstat6: SOCKSTAT6_PATH.into(),
        });
        Self::with_source(source)
    }

    fn with_source(source: Option<Source>) -> Self {
        let guard = PortGuard {
            inner: Arc::new(Inner {
                source,
                state: Mutex::new(State::default()),
                refreshing: Mutex::new(()),
                new_connections: AtomicU64::new(0),
            }),
        };
        guard.refresh();
        guard
    }

    /// Re-reads /proc/net/tcp and /proc/net/tcp6 (parse the hex local/remote address:port and
    /// the st column; TIME_WAIT = 06, LISTEN = 0A); updates the budget; logs a warning
    /// (tracing::warn!) once when crossing WARN_RATIO upward and an info when going back below.
    ///
    /// The full census costs milliseconds of kernel and parse time per ten thousand sockets, and
    /// a busy gateway holds many (TIME_WAIT above all). So a refresh first reads the socket
    /// totals of `/proc/net/sockstat(6)`: when every TCP socket plus every TIME_WAIT is below
    /// [`QUICK_RATIO`] of the range, no destination can be near a limit, and the census is
    /// skipped (the counts are only lowered to that bound) unless the last one is older than
    /// [`FULL_CENSUS_EVERY`] or the warning is raised.
    ///
    /// Also re-reads the port range, so widening `ip_local_port_range` at runtime takes effect.
    /// Blocking file I/O (a few milliseconds with tens of thousands of sockets): call it from
    /// `spawn_blocking` or a dedicated task.
    pub fn refresh(&self) {
        let _serial = self.inner.refreshing.lock();
        self.refresh_locked();
    }

    /// The refresh itself; the caller holds `inner.refreshing`.
    fn refresh_locked(&self) {
        let now = Instant::now();
        let count = self.inner.new_connections.load(Ordering::Relaxed);
        let census_due = {
            let st = self.inner.state.lock();
            st.warned
                || st
                    .last_census
                    .is_none_or(|t| now.saturating_duration_since(t) >= FULL_CENSUS_EVERY)
        };
        let reading = self
            .inner
            .source
            .as_ref()
            .map(|src| read_source(src, census_due));

        let mut st = self.inner.state.lock();
        let elapsed = st.last_refresh.map(|t| now.saturating_duration_since(t));
        if let Some(elapsed) = elapsed.filter(|e| !e.is_zero()) {
            let delta = count.saturating_sub(st.last_count);
            st.budget.new_connections_per_second = delta as f64 / elapsed.as_secs_f64();
        }
        st.last_refresh = Some(now);
        st.last_count = count;

        let was_known = st.budget.known;
        match reading {
            None => st.budget.known = false,
            Some(Reading { range, census }) => {
                if let Some((low, high)) = range {
                    st.budget.range_low = low;
                    st.budget.range_high = high;
                    st.budget.range_size = u32::from(high) - u32::from(low) + 1;
                }
                match census {
                    Counted::Full(census) if st.budget.range_size > 0 => {
                        st.budget.known = true;
                        st.measured_in_use = census.in_use;
                        st.measured_busiest = census.busiest_dest;
                        st.budget.time_wait = census.time_wait;
                        st.budget.time_wait_top = top_destinations(&census.time_wait_by_dest);
                        st.last_census = Some(now);
                        st.censuses += 1;
                    }
                    // Far below any limit: the last census stands, lowered to the bound.
                    Counted::Bounded(bound) if st.budget.known && st.budget.range_size > 0 => {
                        st.measured_in_use = st.measured_in_use.min(bound);
                        st.measured_busiest = st.measured_busiest.min(bound);
                        st.budget.time_wait = st.budget.time_wait.min(bound);
                    }
                    _ => {
                        st.budget.known = false;
                        st.measured_in_use = 0;
                        st.measured_busiest = 0;
                        st.budget.time_wait = 0;
                        st.budget.time_wait_top.clear();
                        st.last_census = None;
                    }
                }
            }
        }
        if was_known && !st.budget.known {
            tracing::warn!(
                "portguard: /proc/net/tcp or ip_local_port_range unreadable; ephemeral-port budget unknown, new dials are not held"
            );
        } else if !was_known && st.budget.known && elapsed.is_some() {
            tracing::info!("portguard: ephemeral-port budget readable again");
        }
        apply(&mut st);
    }

    /// Pure parser for tests: the text of /proc/net/tcp(6) → (in_use, time_wait, per-destination
    /// TIME_WAIT map) for the given range.
    ///
    /// Adds to `into`, so IPv4 and IPv6 tables can be parsed into one census. Skips the header
    /// and any line it cannot make sense of. `ipv6` says which table the text comes from: the
    /// addresses are 8 hex digits (one 32-bit word) in `tcp`, 32 (four words) in `tcp6`, each
    /// word printed in host byte order (little-endian on x86/ARM). IPv4-mapped IPv6 destinations
    /// are rendered as IPv4 so that both tables count toward the same destination.
    pub fn parse_proc_net_tcp(text: &str, ipv6: bool, low: u16, high: u16, into: &mut Census) {
        // Count by the raw hex field first; render each distinct destination once at the end.
        let mut raw: HashMap<&str, u32> = HashMap::new();
        let mut per_dest: HashMap<&str, u32> = HashMap::new();
        for line in text.lines() {
            let mut fields = line.split_ascii_whitespace();
            // "sl" column: "0:", "1234:"; the header line has "sl".
            match fields.next() {
                Some(sl) if sl.ends_with(':') => {}
                _ => continue,
            }
            let (Some(local), Some(remote), Some(st)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let Some(port) = local.rsplit_once(':').and_then(|(_, p)| hex_u16(p)) else {
                continue;
            };
            if port < low || port > high {
                continue;
            }
            let Ok(state) = u8::from_str_radix(st, 16) else {
                continue;
            };
            if state == ST_LISTEN {
                continue;
            }
            into.in_use += 1;
            *per_dest.entry(remote).or_insert(0) += 1;
            if state == ST_TIME_WAIT {
                into.time_wait += 1;
                *raw.entry(remote).or_insert(0) += 1;
            }
        }
        into.busiest_dest = into
            .busiest_dest
            .max(per_dest.values().copied().max().unwrap_or(0));
        let mut key = String::with_capacity(48);
        for (remote, n) in raw {
            key.clear();
            if !render_endpoint(remote, ipv6, &mut key) {
                continue;
            }
            match into.time_wait_by_dest.get_mut(key.as_str()) {
                Some(total) => *total += n,
                None => {
                    into.time_wait_by_dest.insert(key.clone(), n);
                }
            }
        }
    }

    /// The current budget (as of the last refresh, with the test override applied).
    pub fn budget(&self) -> PortBudget {
        self.inner.state.lock().budget.clone()
    }

    /// Count a new upstream connection (for the rate).
    pub fn note_new_connection(&self) {
        self.inner.new_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits while the budget is at or above HOLD_RATIO, re-checking every 250 ms (call refresh
    /// inside), up to `max_wait`; returns Ok(waited) when below, Err(PortsExhausted{used_ratio})
    /// if still above after max_wait. Returns at once when !known.
    ///
    /// The first check uses the last refresh (no I/O on the fast path). While holding, the
    /// re-reads run on the blocking pool and are shared: with many dials held at once, at most
    /// one re-read happens per 250 ms.
    pub async fn admit(&self, max_wait: Duration) -> Result<Duration, PortsExhausted> {
        let start = Instant::now();
        if self.holding().is_none() {
            return Ok(Duration::ZERO);
        }
        loop {
            let waited = start.elapsed();
            if waited >= max_wait {
                return match self.holding() {
                    Some(used_ratio) => Err(PortsExhausted { used_ratio }),
                    None => Ok(waited),
                };
            }
            tokio::time::sleep(RECHECK.min(max_wait - waited)).await;
            self.refresh_if_stale().await;
            if self.holding().is_none() {
                return Ok(start.elapsed());
            }
        }
    }

    /// Test hook: override the measured in_use (so tests can force the hold path without
    /// exhausting real ports). `None` goes back to the measured value. Refreshes keep the
    /// override.
    pub fn set_in_use_for_test(&self, in_use: Option<u32>) {
        let mut st = self.inner.state.lock();
        st.in_use_override = in_use;
        apply(&mut st);
    }

    /// `Some(used_ratio)` when new dials must be held.
    fn holding(&self) -> Option<f64> {
        let st = self.inner.state.lock();
        let b = &st.budget;
        (b.known && b.busiest_destination_ratio >= HOLD_RATIO)
            .then_some(b.busiest_destination_ratio)
    }

    /// Refresh unless another caller is refreshing right now or did so within [`RECHECK`].
    async fn refresh_if_stale(&self) {
        let stale = {
            let st = self.inner.state.lock();
            st.last_refresh
                .is_none_or(|t| Instant::now().saturating_duration_since(t) >= RECHECK)
        };
        if !stale {
            return;
        }
        let this = self.clone();
        let done = tokio::task::spawn_blocking(move || {
            if let Some(_serial) = this.inner.refreshing.try_lock() {
                this.refresh_locked();
            }
        })
        .await;
        if let Err(e) = done {
            tracing::debug!("portguard: refresh task failed: {e}");
        }
    }
}

/// What one read of the sources gave: `range` is `None` if unreadable (keep the last one),
/// `census` is `None` if `/proc/net/tcp` is unreadable or the range is unknown.
struct Reading {
    range: Option<(u16, u16)>,
    census: Counted,
}

/// What a refresh learned about the sockets.
enum Counted {
    /// The full census of `/proc/net/tcp(6)`.
    Full(Census),
    /// Only an upper bound on the sockets holding ports (socket totals), below
    /// [`QUICK_RATIO`] of the range: the census was skipped.
    Bounded(u32),
    /// Nothing readable.
    Unknown,
}

fn read_source(src: &Source, census_due: bool) -> Reading {
    let range = std::fs::read_to_string(&src.range)
        .ok()
        .and_then(|t| parse_port_range(&t));
    let Some((low, high)) = range else {
        return Reading {
            range: None,
            census: Counted::Unknown,
        };
    };
    if !census_due {
        let size = u32::from(high) - u32::from(low) + 1;
        if let Some(bound) = read_socket_totals(src) {
            if f64::from(bound) < QUICK_RATIO * f64::from(size) {
                return Reading {
                    range,
                    census: Counted::Bounded(bound),
                };
            }
        }
    }
    let Ok(v4) = std::fs::read_to_string(&src.tcp) else {
        return Reading {
            range,
            census: Counted::Unknown,
        };
    };
    let mut census = Census::default();
    PortGuard::parse_proc_net_tcp(&v4, false, low, high, &mut census);
    drop(v4);
    // A kernel without IPv6 has no tcp6: that is zero IPv6 sockets, not an unknown budget.
    if let Ok(v6) = std::fs::read_to_string(&src.tcp6) {
        PortGuard::parse_proc_net_tcp(&v6, true, low, high, &mut census);
    }
    Reading {
        range,
        census: Counted::Full(census),
    }
}

/// Every TCP socket (IPv4 and IPv6, any state but TIME_WAIT) plus every TIME_WAIT, from
/// `/proc/net/sockstat` (`TCP: inuse N ... tw N`) and `sockstat6` (`TCP6: inuse N`, absent
/// without IPv6): at least the sockets holding ports in the range. `None` if unreadable.
fn read_socket_totals(src: &Source) -> Option<u32> {
    let v4 = std::fs::read_to_string(&src.sockstat).ok()?;
    let (inuse, tw) = parse_sockstat(&v4, "TCP:")?;
    let inuse6 = std::fs::read_to_string(&src.sockstat6)
        .ok()
        .and_then(|t| parse_sockstat(&t, "TCP6:"))
        .map_or(0, |(n, _)| n);
    Some(inuse.saturating_add(inuse6).saturating_add(tw.unwrap_or(0)))
}

/// `inuse` and `tw` of the line starting with `label` in a sockstat file.
fn parse_sockstat(text: &str, label: &str) -> Option<(u32, Option<u32>)> {
    let line = text.lines().find(|l| l.starts_with(label))?;
    let mut fields = line[label.len()..].split_ascii_whitespace();
    let (mut inuse, mut tw) = (None, None);
    while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
        match k {
            "inuse" => inuse = v.parse().ok(),
            "tw" => tw = v.parse().ok(),
            _ => {}
        }
    }
    Some((inuse?, tw))
}

/// `ip_local_port_range` content: two decimal ports separated by whitespace (a tab in practice).
fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_ascii_whitespace();
    let low: u16 = it.next()?.parse().ok()?;
    let high: u16 = it.next()?.parse().ok()?;
    (it.next().is_none() && low <= high).then_some((low, high))
}

/// Recompute what depends on in_use (override, ratio) and the warning state.
fn apply(st: &mut State) {
    let b = &mut st.budget;
    b.in_use = st.in_use_override.unwrap_or(st.measured_in_use);
    b.used_ratio = if b.known && b.range_size > 0 {
        f64::from(b.in_use) / f64::from(b.range_size)
    } else {
        0.0
    };
    // The test override simulates one destination using the ports.
    let busiest = st.in_use_override.unwrap_or(st.measured_busiest);
    b.busiest_destination_ratio = if b.known && b.range_size > 0 {
        f64::from(busiest) / f64::from(b.range_size)
    } else {
        0.0
    };
    if !st.warned && b.used_ratio >= WARN_RATIO {
        st.warned = true;
        tracing::warn!(
            in_use = b.in_use,
            range_size = b.range_size,
            time_wait = b.time_wait,
            new_connections_per_second = b.new_connections_per_second,
            "portguard: {:.1}% of the ephemeral port range {}-{} in use; new upstream dials are held at {:.0}% \
             (raise connection reuse or widen net.ipv4.ip_local_port_range)",
            b.used_ratio * 100.0,
            b.range_low,
            b.range_high,
            HOLD_RATIO * 100.0,
        );
    } else if st.warned && b.used_ratio < REARM_RATIO {
        st.warned = false;
        tracing::info!(
            in_use = b.in_use,
            range_size = b.range_size,
            "portguard: ephemeral port use back to {:.1}%",
            b.used_ratio * 100.0,
        );
    }
}

/// The [`TOP_N`] destinations by count, ties by name.
fn top_destinations(by_dest: &HashMap<String, u32>) -> Vec<(String, u32)> {
    let mut all: Vec<(&String, u32)> = by_dest.iter().map(|(k, &n)| (k, n)).collect();
    let by_rank = |a: &(&String, u32), b: &(&String, u32)| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0));
    if all.len() > TOP_N {
        all.select_nth_unstable_by(TOP_N - 1, by_rank);
        all.truncate(TOP_N);
    }
    all.sort_unstable_by(by_rank);
    all.into_iter().map(|(k, n)| (k.clone(), n)).collect()
}

fn hex_u16(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 4 {
        return None;
    }
    u16::from_str_radix(s, 16).ok()
}

/// One 32-bit word as printed by the kernel (`%08X` of the in-memory value, host byte order).
fn hex_word(s: &str) -> Option<[u8; 4]> {
    if s.len() != 8 {
        return None;
    }
    u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes)
}

/// Render a `/proc/net/tcp(6)` "ADDR:PORT" field as `1.2.3.4:443` / `[2001:db8::1]:443` into
/// `out`; false if malformed.
fn render_endpoint(field: &str, ipv6: bool, out: &mut String) -> bool {
    let Some((addr, port)) = field.split_once(':') else {
        return false;
    };
    let Some(port) = hex_u16(port) else {
        return false;
    };
    if !ipv6 {
        let Some(bytes) = hex_word(addr) else {
            return false;
        };
        return write!(out, "{}", SocketAddrV4::new(Ipv4Addr::from(bytes), port)).is_ok();
    }
    if addr.len() != 32 || !addr.is_ascii() {
        return false;
    }
    let mut bytes = [0u8; 16];
    for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
        let Some(word) = hex_word(&addr[i * 8..i * 8 + 8]) else {
            return false;
        };
        chunk.copy_from_slice(&word);
    }
    let ip = Ipv6Addr::from(bytes);
    let written = match ip.to_ipv4_mapped() {
        Some(v4) => write!(out, "{}", SocketAddrV4::new(v4, port)),
        None => write!(out, "{}", SocketAddrV6::new(ip, port, 0, 0)),
    };
    written.is_ok()
}

/// Registers the ephemeral-port budget gauge (`edgepool_ephemeral_ports_used_ratio`); the
/// gateway sets it from [`PortGuard::budget`] once a second.
pub fn register_used_gauge(
    registry: &mut prometheus_client::registry::Registry,
) -> prometheus_client::metrics::gauge::Gauge<f64, AtomicU64> {
    let ports_used = prometheus_client::metrics::gauge::Gauge::<f64, AtomicU64>::default();
    registry.register(
        "edgepool_ephemeral_ports_used_ratio",
        "Share of the local ephemeral port range held by sockets (TIME_WAIT included)",
        ports_used.clone(),
    );
    ports_used
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    // Little-endian encodings, as an x86/ARM kernel prints them:
    //   0100007F = 127.0.0.1, 0A00A8C0 = 192.168.0.10, 0101A8C0 = 192.168.1.1, 08080808 = 8.8.8.8
    //   01BB = 443, 0050 = 80, 8000 = 32768, 9C40 = 40000, EE47 = 60999, EE48 = 61000, 1F90 = 8080
    //   B80D0120 00000000 00000000 01000000 = 2001:db8::1
    //   00000000 00000000 FFFF0000 0101A8C0 = ::ffff:192.168.1.1
    const TCP4: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 647 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 1001 1 0000000000000000 20 4 30 10 -1
   2: 0A00A8C0:8000 0101A8C0:01BB 06 00000000:00000000 03:00000F9F 00000000     0        0 0 3 0000000000000000
   3: 0A00A8C0:8001 0101A8C0:01BB 06 00000000:00000000 03:00000F9F 00000000     0        0 0 3 0000000000000000
   4: 0A00A8C0:EE47 08080808:0050 06 00000000:00000000 03:00000F9F 00000000     0        0 0 3 0000000000000000
   5: 0A00A8C0:EE48 08080808:0050 06 00000000:00000000 03:00000F9F 00000000     0        0 0 3 0000000000000000
   6: 0A00A8C0:9C41 08080808:01BB 08 00000000:00000000 00:00000000 00000000  1000        0 1002 1 0000000000000000 20 4 30 10 -1
   7: 00000000:9C42 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 648 1 0000000000000000 100 0 0 10 0
   8: garbage line
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 700 1 0000000000000000 100 0 0 10 0
   1: B80D0120000000000000000002000000:9C40 B80D0120000000000000000001000000:01BB 06 00000000:00000000 03:00001000 00000000     0        0 0 3 0000000000000000
\t2: B80D0120000000000000000002000000:9C43    B80D0120000000000000000001000000:01BB 01 00000000:00000000 00:00000000 00000000  1000 0 701 1 0000000000000000 20 4 30 10 -1
   3: 0000000000000000FFFF00000A00A8C0:9C44 0000000000000000FFFF00000101A8C0:01BB 06 00000000:00000000 03:00001000 00000000     0        0 0 3 0000000000000000
   4: B80D0120000000000000000002000000:1F90 B80D0120000000000000000001000000:01BB 06 00000000:00000000 03:00001000 00000000     0        0 0 3 0000000000000000
";

    fn census(text: &str, ipv6: bool) -> Census {
        let mut c = Census::default();
        PortGuard::parse_proc_net_tcp(text, ipv6, 32768, 60999, &mut c);
        c
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_ipv4_fixture() {
        let c = census(TCP4, false);
        // In range, not LISTEN: lines 1, 2, 3, 4, 6 (5 is port 61000, 0 and 7 listen).
        assert_eq!(c.in_use, 5);
        assert_eq!(c.time_wait, 3);
        let mut by: Vec<_> = c.time_wait_by_dest.into_iter().collect();
        by.sort();
        assert_eq!(
            by,
            vec![
                ("192.168.1.1:443".to_string(), 2),
                ("8.8.8.8:80".to_string(), 1)
            ]
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_ipv6_fixture_and_adds_up() {
        let c = census(TCP6, true);
        // Lines 1, 2 (tab-indented, extra spaces), 3 in range; 0 listens, 4 is port 8080.
        assert_eq!(c.in_use, 3);
        assert_eq!(c.time_wait, 2);
        assert_eq!(c.time_wait_by_dest.get("[2001:db8::1]:443"), Some(&1));
        assert_eq!(c.time_wait_by_dest.get("192.168.1.1:443"), Some(&1));

        let mut both = census(TCP4, false);
        PortGuard::parse_proc_net_tcp(TCP6, true, 32768, 60999, &mut both);
        assert_eq!((both.in_use, both.time_wait), (8, 5));
        assert_eq!(both.time_wait_by_dest.get("192.168.1.1:443"), Some(&3));
        let top = top_destinations(&both.time_wait_by_dest);
        assert_eq!(
            top,
            vec![
                ("192.168.1.1:443".to_string(), 3),
                ("8.8.8.8:80".to_string(), 1),
                ("[2001:db8::1]:443".to_string(), 1),
            ]
        );
    }

    #[test]
    fn busiest_destination_is_what_limits_connect() {
        // The fixture's busiest destination is 192.168.1.1:443 with its 2 TIME_WAIT sockets.
        let c = census(TCP4, false);
        assert_eq!(c.busiest_dest, 2, "{c:?}");
        // Many destinations: total use is high, but no single destination is near the range.
        let mut lines = String::from("  sl  local_address rem_address   st\n");
        for i in 0..1000u32 {
            let remote = format!("{:08X}:01BB", 0x0100_0001u32 + i);
            lines.push_str(&format!(" {i}: 0100007F:{:04X} {remote} 06\n", 33000 + i));
        }
        let many = census(&lines, false);
        assert_eq!((many.in_use, many.busiest_dest), (1000, 1));
    }

    #[test]
    fn parser_ignores_header_and_garbage() {
        let c = census(
            "  sl  local_address rem_address   st\n\n  x\n 1: zz:zz 00:00 06\n",
            false,
        );
        assert_eq!((c.in_use, c.time_wait), (0, 0));
        // A wrong-width address still counts the socket, only the destination is skipped.
        let c = census(" 1: 0100007F:9C40 0100:01BB 06\n", false);
        assert_eq!(
            (c.in_use, c.time_wait, c.time_wait_by_dest.len()),
            (1, 1, 0)
        );
    }

    #[test]
    fn top_destinations_keeps_ten_by_count() {
        let map: HashMap<String, u32> = (0..25).map(|i| (format!("10.0.0.{i}:443"), i)).collect();
        let top = top_destinations(&map);
        assert_eq!(top.len(), 10);
        assert_eq!(top[0], ("10.0.0.24:443".to_string(), 24));
        assert_eq!(top[9], ("10.0.0.15:443".to_string(), 15));
    }

    #[test]
    fn parses_port_range() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("  1024   65535 "), Some((1024, 65535)));
        assert_eq!(parse_port_range("60999\t32768\n"), None);
        assert_eq!(parse_port_range("32768"), None);
        assert_eq!(parse_port_range("32768 70000"), None);
        assert_eq!(parse_port_range(""), None);
    }

    /// A guard reading fixture files from `dir`.
    fn fixture_guard(dir: &Path, range: &str, tcp: &str, tcp6: Option<&str>) -> PortGuard {
        write_fixture(dir, range, tcp, tcp6);
        PortGuard::with_source(Some(Source {
            range: dir.join("range"),
            tcp: dir.join("tcp"),
            tcp6: dir.join("tcp6"),
            sockstat: dir.join("sockstat"),
            sockstat6: dir.join("sockstat6"),
        }))
    }

    fn write_fixture(dir: &Path, range: &str, tcp: &str, tcp6: Option<&str>) {
        std::fs::write(dir.join("range"), range).unwrap();
        std::fs::write(dir.join("tcp"), tcp).unwrap();
        match tcp6 {
            Some(t) => std::fs::write(dir.join("tcp6"), t).unwrap(),
            None => {
                let _ = std::fs::remove_file(dir.join("tcp6"));
            }
        }
    }

    /// `n` established sockets on ports 32768.. toward 10.0.0.1:443, and `tw` of them in TIME_WAIT.
    fn synthetic_tcp(n: u32, tw: u32) -> String {
        let mut s = String::from(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n",
        );
        for i in 0..n {
            let port = 32768 + (i % 28232);
            let st = if i < tw { "06" } else { "01" };
            writeln!(
                s,
                "{i:4}: 0A00A8C0:{port:04X} 0100000A:01BB {st} 00000000:00000000 00:00000000 00000000  1000        0 {} 1 0000000000000000 20 4 30 10 -1",
                100_000 + i
            )
            .unwrap();
        }
        s
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn budget_and_used_ratio_from_fixture() {
        let dir = tempfile::tempdir().unwrap();
        // Range of 1000 ports; no tcp6 file (IPv6 disabled) is fine.
        let g = fixture_guard(dir.path(), "32768\t33767\n", &synthetic_tcp(250, 40), None);
        let b = g.budget();
        assert!(b.known);
        assert_eq!(
            (b.range_low, b.range_high, b.range_size),
            (32768, 33767, 1000)
        );
        assert_eq!((b.in_use, b.time_wait), (250, 40));
        assert_eq!(b.time_wait_top, vec![("10.0.0.1:443".to_string(), 40)]);
        assert!((b.used_ratio - 0.25).abs() < 1e-9);

        g.set_in_use_for_test(Some(500));
        assert!((g.budget().used_ratio - 0.5).abs() < 1e-9);
        g.set_in_use_for_test(None);
        assert_eq!(g.budget().in_use, 250);
    }

    #[test]
    fn unknown_when_unreadable() {
        let g = PortGuard::with_source(None);
        let b = g.budget();
        assert!(!b.known);
        assert_eq!((b.range_size, b.used_ratio), (0, 0.0));

        let dir = tempfile::tempdir().unwrap();
        let g = PortGuard::with_source(Some(Source {
            range: dir.path().join("missing"),
            tcp: dir.path().join("missing"),
            tcp6: dir.path().join("missing"),
            sockstat: dir.path().join("missing"),
            sockstat6: dir.path().join("missing"),
        }));
        assert!(!g.budget().known);
        g.set_in_use_for_test(Some(60_000));
        assert_eq!(g.budget().used_ratio, 0.0);
    }

    #[test]
    fn sockstat_lines_parse() {
        let v4 =
            "sockets: used 290\nTCP: inuse 10 orphan 0 tw 3 alloc 12 mem 1\nUDP: inuse 2 mem 0\n";
        assert_eq!(parse_sockstat(v4, "TCP:"), Some((10, Some(3))));
        assert_eq!(
            parse_sockstat("TCP6: inuse 7\nUDP6: inuse 1\n", "TCP6:"),
            Some((7, None))
        );
        assert_eq!(parse_sockstat("UDP: inuse 2\n", "TCP:"), None);
        assert_eq!(parse_sockstat("TCP: orphan 0 tw 3\n", "TCP:"), None);
    }

    /// Far below the limits by the socket totals, a refresh skips the census (its counts only
    /// lowered to the totals' bound); near them, or when the census is old, it takes one.
    #[cfg(target_endian = "little")]
    #[test]
    fn the_census_is_skipped_only_far_below_the_limits() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let sockstat = |inuse: u32, tw: u32| {
            std::fs::write(
                d.join("sockstat"),
                format!("sockets: used 9\nTCP: inuse {inuse} orphan 0 tw {tw} alloc 1 mem 0\n"),
            )
            .unwrap();
            std::fs::write(d.join("sockstat6"), "TCP6: inuse 5\nUDP6: inuse 0\n").unwrap();
        };
        sockstat(200, 50);
        let g = fixture_guard(d, "32768 33767", &synthetic_tcp(250, 40), None);
        let censuses = || g.inner.state.lock().censuses;
        assert_eq!(
            (censuses(), g.budget().in_use),
            (1, 250),
            "the first refresh counts"
        );
        // 400 sockets by the census file, but the totals say 255 of 1,000: skipped.
        write_fixture(d, "32768 33767", &synthetic_tcp(400, 40), None);
        g.refresh();
        assert_eq!((censuses(), g.budget().in_use), (1, 250));
        // Totals fall below the last count: the count follows them down.
        sockstat(100, 20);
        g.refresh();
        assert_eq!(
            (censuses(), g.budget().in_use, g.budget().time_wait),
            (1, 125, 40)
        );
        // Totals at half the range: counted again.
        sockstat(450, 50);
        g.refresh();
        assert_eq!((censuses(), g.budget().in_use), (2, 400));
        // Far below again, but the census is older than FULL_CENSUS_EVERY: counted.
        sockstat(10, 0);
        g.refresh();
        assert_eq!(censuses(), 2);
        g.inner.state.lock().last_census = Some(Instant::now() - FULL_CENSUS_EVERY);
        g.refresh();
        assert_eq!(censuses(), 3);
        // Unreadable totals: always counted.
        std::fs::remove_file(d.join("sockstat")).unwrap();
        g.refresh();
        assert_eq!(censuses(), 4);
    }

    #[test]
    fn goes_unknown_when_tcp_disappears_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let g = fixture_guard(dir.path(), "32768 33767", &synthetic_tcp(10, 0), None);
        assert!(g.budget().known);
        std::fs::remove_file(dir.path().join("tcp")).unwrap();
        g.refresh();
        assert!(!g.budget().known);
        assert_eq!(g.budget().range_size, 1000);
        write_fixture(dir.path(), "32768 33767", &synthetic_tcp(10, 0), None);
        g.refresh();
        assert!(g.budget().known);
        assert_eq!(g.budget().in_use, 10);
    }

    #[test]
    fn range_change_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let g = fixture_guard(dir.path(), "32768 33767", &synthetic_tcp(950, 0), None);
        assert!(g.budget().used_ratio >= HOLD_RATIO);
        // The operator widens the range: the hold lifts at the next refresh.
        write_fixture(dir.path(), "1024 65535", &synthetic_tcp(950, 0), None);
        g.refresh();
        let b = g.budget();
        assert_eq!(b.range_size, 64512);
        assert!(b.used_ratio < WARN_RATIO);
    }

    #[test]
    fn warns_once_and_rearms_below() {
        let dir = tempfile::tempdir().unwrap();
        let g = fixture_guard(dir.path(), "32768 33767", &synthetic_tcp(100, 0), None);
        let warned = || g.inner.state.lock().warned;
        assert!(!warned());
        g.set_in_use_for_test(Some(700));
        assert!(warned(), "crossing 70% upward warns");
        g.refresh();
        g.set_in_use_for_test(Some(800));
        assert!(warned(), "still above: no new warning, flag stays set");
        g.set_in_use_for_test(Some(680));
        assert!(warned(), "within the hysteresis band: not re-armed");
        g.set_in_use_for_test(None); // measured 100 = 10%
        assert!(!warned(), "back below re-arms (info logged)");
        // Driven by refresh alone: the file grows past 70%.
        write_fixture(dir.path(), "32768 33767", &synthetic_tcp(720, 0), None);
        g.refresh();
        assert!(warned());
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a sync test: real time must pass between refreshes
    fn rate_between_refreshes() {
        let dir = tempfile::tempdir().unwrap();
        let g = fixture_guard(dir.path(), "32768 33767", &synthetic_tcp(1, 0), None);
        for _ in 0..100 {
            g.note_new_connection();
        }
        std::thread::sleep(Duration::from_millis(100));
        g.refresh();
        let r = g.budget().new_connections_per_second;
        // 100 connections in ≥ 100 ms: at most 1000/s, and well above 0.
        assert!(r > 10.0 && r <= 1000.0, "rate {r}");
    }

    #[tokio::test(start_paused = true)]
    async fn admit_returns_at_once_when_below_or_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let g = fixture_guard(dir.path(), "32768 33767", &synthetic_tcp(100, 0), None);
        assert_eq!(
            g.admit(Duration::from_secs(5)).await.unwrap(),
            Duration::ZERO
        );
        g.set_in_use_for_test(Some(899));
        assert_eq!(
            g.admit(Duration::from_secs(5)).await.unwrap(),
            Duration::ZERO
        );

        let unknown = PortGuard::with_source(None);
        unknown.set_in_use_for_test(Some(u32::MAX));
        assert_eq!(
            unknown.admit(Duration::from_secs(5)).await.unwrap(),
            Duration::ZERO
        );
    }

    #[tokio::test(start_paused = true)]
    async fn admit_times_out_at_95_percent() {
        let dir = tempfile::tempdir().unwrap();
        // Measured use is 10%; only the override holds, so the refreshes inside admit must keep it.
        let g = fixture_guard(dir.path(), "32768 33767", &synthetic_tcp(100, 0), None);
        g.set_in_use_for_test(Some(950));
        let start = Instant::now();
        let err = g.admit(Duration::from_secs(2)).await.unwrap_err();
        assert!((err.used_ratio - 0.95).abs() < 1e-9);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert!(err.to_string().contains("95.0%"), "{err}");
        assert_eq!(g.budget().in_use, 950);
    }

    #[tokio::test(start_paused = true)]
    async fn admit_returns_when_override_drops_mid_wait() {
        let dir = tempfile::tempdir().unwrap();
        let g = fixture_guard(dir.path(), "32768 33767", &synthetic_tcp(100, 0), None);
        g.set_in_use_for_test(Some(950));
        let held = tokio::spawn({
            let g = g.clone();
            async move { g.admit(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(!held.is_finished());
        g.set_in_use_for_test(Some(500));
        let waited = held.await.unwrap().unwrap();
        assert!(
            waited >= Duration::from_millis(1100) && waited <= Duration::from_millis(1350),
            "waited {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn admit_lifts_when_sockets_drain() {
        let dir = tempfile::tempdir().unwrap();
        let g = fixture_guard(dir.path(), "32768 33767", &synthetic_tcp(960, 900), None);
        assert!(g.budget().used_ratio >= HOLD_RATIO);
        let held = tokio::spawn({
            let g = g.clone();
            async move { g.admit(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!held.is_finished());
        // TIME_WAIT expires: the refresh inside admit sees it.
        write_fixture(dir.path(), "32768 33767", &synthetic_tcp(60, 0), None);
        let waited = held.await.unwrap().unwrap();
        assert!(waited >= Duration::from_millis(600) && waited <= Duration::from_millis(1000));
        assert_eq!(g.budget().in_use, 60);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn real_system_smoke() {
        let g = PortGuard::new();
        let b = g.budget();
        assert!(b.known, "{b:?}");
        assert!(b.range_size > 0, "{b:?}");
        assert!(b.in_use <= 65535 * 4);
        println!("real budget: {b:?}");
    }

    /// Real sockets through the real kernel tables: the client side of closed loopback
    /// connections sits in TIME_WAIT toward the listener, rendered as `127.0.0.1:port`.
    #[cfg(target_os = "linux")]
    #[test]
    #[allow(clippy::disallowed_methods)] // a sync test: the kernel needs real time to list the sockets
    fn real_system_time_wait_is_seen() {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut pairs = Vec::new();
        for _ in 0..20 {
            let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let (server, _) = listener.accept().unwrap();
            pairs.push((client, server));
        }
        let g = PortGuard::new();
        let b = g.budget();
        assert!(b.in_use >= 20, "{b:?}");
        // Client closes first (active close → TIME_WAIT), then the server side.
        for (client, server) in pairs {
            drop(client);
            std::thread::sleep(Duration::from_millis(1));
            drop(server);
        }
        std::thread::sleep(Duration::from_millis(100));
        // A census now (a quiet machine's refresh would skip it within FULL_CENSUS_EVERY).
        g.inner.state.lock().last_census = None;
        g.refresh();
        let b = g.budget();
        let dest = format!("127.0.0.1:{port}");
        let n = b
            .time_wait_top
            .iter()
            .find(|(d, _)| *d == dest)
            .map(|x| x.1);
        assert!(n.unwrap_or(0) >= 20, "{dest} not in {b:?}");
        assert!(b.time_wait >= 20);
    }

    #[cfg(target_endian = "little")]
    #[test]
    #[allow(clippy::disallowed_methods)] // times a parse in wall time, no runtime involved
    fn parse_timing_50k_lines() {
        let mut text = synthetic_tcp(50_000, 20_000);
        // Spread the TIME_WAIT destinations over 250 addresses (10.0.0.1-250).
        text = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                l.replacen(
                    "0100000A:01BB",
                    &format!("{:02X}00000A:01BB", i % 250 + 1),
                    1,
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        let runs = 5;
        let start = std::time::Instant::now();
        let mut c = Census::default();
        for _ in 0..runs {
            c = Census::default();
            PortGuard::parse_proc_net_tcp(&text, false, 32768, 60999, &mut c);
        }
        let per = start.elapsed() / runs;
        assert_eq!((c.in_use, c.time_wait), (50_000, 20_000));
        assert_eq!(c.time_wait_by_dest.len(), 250);
        println!(
            "parse_proc_net_tcp: 50k lines ({} KiB), {} distinct TIME_WAIT destinations: {per:?} per parse",
            text.len() / 1024,
            c.time_wait_by_dest.len()
        );
    }
}
