//! admission: edgepool's own capacity limits — connections per worker address, CONNECT
//! tunnels, requests in flight, buffered body bytes — and the retry budget. Each limit hands
//! out a place that is given back when dropped: a [`Ticket`] for what outlives a request
//! (connections, tunnels), a [`RequestPlace`] or [`BodyBudget`] borrowed for one request. Over
//! a limit the caller answers 503 with `Retry-After` at once, before reading a body, instead of
//! queueing without bound.
//!
//! The per-request path takes no lock: a worker connection holds its address's entry (a
//! [`WorkerAddr`]) and counts its requests and body bytes there with atomics. The address
//! table's lock is taken when a connection opens or closes, and when the last place an address
//! held is given back.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

use parking_lot::Mutex;

use crate::config::{LimitsConfig, RETRY_BUDGET_MIN_PER_SEC};

/// Retry tokens are kept in thousandths.
const MILLI: u64 = 1000;
/// The most retries the budget can save up (a burst after a quiet spell).
const RETRY_BUDGET_CAP: u64 = 100 * MILLI;

/// The limits and their current use.
///
/// Fairness: besides the global limits, one worker address may hold at most
/// `limits.max_worker_share` of each (requests in flight, tunnels, buffered bytes), so one
/// client can never lock the others out. The global counters are atomics; so are each
/// address's ([`Holder`]), which its connections reach without the table.
pub struct Admission {
    max_per_worker: usize,
    /// The addresses holding anything. An entry is removed, under this lock, once it holds
    /// nothing.
    per_worker: Mutex<HashMap<IpAddr, Arc<Holder>>>,
    max_tunnels: usize,
    tunnels: AtomicUsize,
    max_in_flight: usize,
    in_flight: AtomicUsize,
    max_buffered: u64,
    buffered: AtomicU64,
    /// The most buffered at once since the memory was last handed back to the OS.
    buffered_peak: AtomicU64,
    /// Per address: the share's ceilings.
    addr_in_flight: usize,
    addr_tunnels: usize,
    addr_buffered: u64,
}

/// What one worker address holds. `connections` changes only under the table's lock (a new
/// connection finds the entry there); the rest change through a connection's [`WorkerAddr`],
/// without it.
struct Holder {
    ip: IpAddr,
    connections: AtomicUsize,
    requests: AtomicUsize,
    tunnels: AtomicUsize,
    bytes: AtomicU64,
}

impl Holder {
    fn is_empty(&self) -> bool {
        self.connections.load(Ordering::SeqCst) == 0
            && self.requests.load(Ordering::SeqCst) == 0
            && self.tunnels.load(Ordering::SeqCst) == 0
            && self.bytes.load(Ordering::SeqCst) == 0
    }
}

/// A worker address as its connections hold it: requests, tunnels and body bytes are counted
/// against its share through it, without looking the address up.
#[derive(Clone)]
pub struct WorkerAddr(Arc<Holder>);

impl WorkerAddr {
    /// The address.
    pub fn ip(&self) -> IpAddr {
        self.0.ip
    }
}

/// A place that may outlive a request — a worker connection or a tunnel; dropping it gives
/// the place back.
pub struct Ticket {
    adm: Arc<Admission>,
    holder: Arc<Holder>,
    kind: Kind,
}

enum Kind {
    Worker,
    Tunnel,
}

/// A request's place under `limits.max_in_flight`, borrowed for the request (no reference
/// count touched); dropping it gives the place back.
pub struct RequestPlace<'a> {
    adm: &'a Admission,
    holder: &'a Arc<Holder>,
}

/// Bytes of a request body under `limits.max_buffered_bytes`, grown as the body arrives;
/// dropping it gives them back.
pub struct BodyBudget<'a> {
    adm: &'a Admission,
    holder: &'a Arc<Holder>,
    held: u64,
}

/// Why a place was refused: the global limit, or the address's share of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The limit itself is reached.
    Full,
    /// This address holds its `limits.max_worker_share` of it.
    Share,
}

impl Ticket {
    /// The worker address this place belongs to.
    pub fn ip(&self) -> IpAddr {
        self.holder.ip
    }

    /// The address's entry, for the places its requests take.
    pub fn addr(&self) -> WorkerAddr {
        WorkerAddr(self.holder.clone())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        match self.kind {
            Kind::Worker => {
                let mut map = self.adm.per_worker.lock();
                self.holder.connections.fetch_sub(1, Ordering::SeqCst);
                forget_if_empty(&mut map, &self.holder);
            }
            Kind::Tunnel => {
                self.adm.tunnels.fetch_sub(1, Ordering::Relaxed);
                self.holder.tunnels.fetch_sub(1, Ordering::SeqCst);
                self.adm.after_release(&self.holder);
            }
        }
    }
}

impl Drop for RequestPlace<'_> {
    fn drop(&mut self) {
        self.adm.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.holder.requests.fetch_sub(1, Ordering::SeqCst);
        self.adm.after_release(self.holder);
    }
}

impl BodyBudget<'_> {
    /// `n` more bytes, if the budget and the address's share allow.
    pub fn grow(&mut self, n: u64) -> Result<(), Refused> {
        self.adm.reserve_bytes(self.holder, n)?;
        self.held += n;
        Ok(())
    }
}

impl Drop for BodyBudget<'_> {
    fn drop(&mut self) {
        if self.held == 0 {
            return; // a request without a body held nothing
        }
        self.adm.buffered.fetch_sub(self.held, Ordering::Relaxed);
        self.holder.bytes.fetch_sub(self.held, Ordering::SeqCst);
        self.adm.after_release(self.holder);
    }
}

/// Removes `holder`'s entry if it is still the table's entry for its address and holds
/// nothing (the caller holds the table's lock).
fn forget_if_empty(map: &mut HashMap<IpAddr, Arc<Holder>>, holder: &Arc<Holder>) {
    if holder.is_empty() && map.get(&holder.ip).is_some_and(|h| Arc::ptr_eq(h, holder)) {
        map.remove(&holder.ip);
    }
}

/// Takes a place under `max` in `counter`, or `false` when full.
fn take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// `share` of `max`, at least 1.
fn share_of(max: u64, share: f64) -> u64 {
    ((max as f64 * share).floor() as u64).max(1)
}

impl Admission {
    /// Limits from `[limits]`.
    pub fn new(cfg: &LimitsConfig) -> Arc<Self> {
        let share = cfg.max_worker_share.clamp(0.0, 1.0);
        Arc::new(Admission {
            max_per_worker: cfg.max_connections_per_worker,
            per_worker: Mutex::new(HashMap::new()),
            max_tunnels: cfg.max_tunnels,
            tunnels: AtomicUsize::new(0),
            max_in_flight: cfg.max_in_flight,
            in_flight: AtomicUsize::new(0),
            max_buffered: cfg.max_buffered_bytes,
            buffered: AtomicU64::new(0),
            buffered_peak: AtomicU64::new(0),
            addr_in_flight: share_of(cfg.max_in_flight as u64, share) as usize,
            addr_tunnels: share_of(cfg.max_tunnels as u64, share) as usize,
            addr_buffered: share_of(cfg.max_buffered_bytes, share),
        })
    }

    /// A connection from `ip`, if it has fewer than `limits.max_connections_per_worker` open.
    pub fn worker_connection(self: &Arc<Self>, ip: IpAddr) -> Option<Ticket> {
        let mut map = self.per_worker.lock();
        let holder = map.entry(ip).or_insert_with(|| {
            Arc::new(Holder {
                ip,
                connections: AtomicUsize::new(0),
                requests: AtomicUsize::new(0),
                tunnels: AtomicUsize::new(0),
                bytes: AtomicU64::new(0),
            })
        });
        if holder.connections.load(Ordering::SeqCst) >= self.max_per_worker {
            let holder = holder.clone();
            forget_if_empty(&mut map, &holder); // refused its first: nothing to keep
            return None;
        }
        holder.connections.fetch_add(1, Ordering::SeqCst);
        Some(Ticket {
            adm: self.clone(),
            holder: holder.clone(),
            kind: Kind::Worker,
        })
    }

    /// A CONNECT tunnel for `addr`, if fewer than `limits.max_tunnels` are open and `addr`
    /// holds less than its share of them.
    pub fn tunnel(self: &Arc<Self>, addr: &WorkerAddr) -> Result<Ticket, Refused> {
        let h = &addr.0;
        self.take_place(
            &self.tunnels,
            self.max_tunnels,
            &h.tunnels,
            self.addr_tunnels,
        )?;
        Ok(Ticket {
            adm: self.clone(),
            holder: h.clone(),
            kind: Kind::Tunnel,
        })
    }

    /// A request in flight for `addr`, if fewer than `limits.max_in_flight` are and `addr`
    /// holds less than its share of them.
    pub fn request<'a>(&'a self, addr: &'a WorkerAddr) -> Result<RequestPlace<'a>, Refused> {
        let h = &addr.0;
        self.take_place(
            &self.in_flight,
            self.max_in_flight,
            &h.requests,
            self.addr_in_flight,
        )?;
        Ok(RequestPlace {
            adm: self,
            holder: h,
        })
    }

    /// One place under `share` in the address's `held` and under `max` in `global`. The
    /// address's share is taken first: a place taken for a moment and given back is then only
    /// ever seen by the same address, never by another address that would be refused "full"
    /// for it. When both are reached, "full" is the truer answer.
    fn take_place(
        &self,
        global: &AtomicUsize,
        max: usize,
        held: &AtomicUsize,
        share: usize,
    ) -> Result<(), Refused> {
        if !take(held, share) {
            return Err(if global.load(Ordering::Relaxed) >= max {
                Refused::Full
            } else {
                Refused::Share
            });
        }
        if !take(global, max) {
            held.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Full);
        }
        Ok(())
    }

    /// After a place of `holder`'s was given back: forgets the address once it holds nothing
    /// (no connection is left to find it through).
    fn after_release(&self, holder: &Arc<Holder>) {
        if holder.is_empty() {
            forget_if_empty(&mut self.per_worker.lock(), holder);
        }
    }

    /// A byte budget for a body `addr` is about to buffer: `n` bytes now, more with
    /// [`BodyBudget::grow`].
    pub fn buffer<'a>(&'a self, addr: &'a WorkerAddr, n: u64) -> Result<BodyBudget<'a>, Refused> {
        self.reserve_bytes(&addr.0, n)?;
        Ok(BodyBudget {
            adm: self,
            holder: &addr.0,
            held: n,
        })
    }

    fn reserve_bytes(&self, holder: &Arc<Holder>, n: u64) -> Result<(), Refused> {
        if n == 0 {
            // Within any budget and share, and changes neither: most requests have no body.
            return Ok(());
        }
        // The address's share first, as in `take_place`.
        let max = self.max_buffered;
        let share = self.addr_buffered;
        let mine = holder
            .bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                (b + n <= share).then_some(b + n)
            });
        if mine.is_err() {
            let full = self.buffered.load(Ordering::Relaxed) + n > max;
            return Err(if full { Refused::Full } else { Refused::Share });
        }
        let Ok(before) = self
            .buffered
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |b| {
                (b + n <= max).then_some(b + n)
            })
        else {
            holder.bytes.fetch_sub(n, Ordering::SeqCst);
            return Err(Refused::Full);
        };
        self.buffered_peak.fetch_max(before + n, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes of request bodies buffered now.
    pub fn buffered(&self) -> u64 {
        self.buffered.load(Ordering::Relaxed)
    }

    /// The most buffered at once since the last call (which resets it to what is buffered
    /// now): a burst that has passed, whose memory can go back to the OS.
    pub fn take_buffered_peak(&self) -> u64 {
        self.buffered_peak
            .swap(self.buffered.load(Ordering::Relaxed), Ordering::Relaxed)
    }

    /// Open tunnels, requests in flight, worker addresses with open connections.
    pub fn usage(&self) -> (usize, usize, usize) {
        (
            self.tunnels.load(Ordering::Relaxed),
            self.in_flight.load(Ordering::Relaxed),
            self.per_worker
                .lock()
                .values()
                .filter(|a| a.connections.load(Ordering::Relaxed) > 0)
                .count(),
        )
    }
}

/// Retries may add at most `ratio` to the requests sent (every request deposits `ratio` of a
/// retry, a retry withdraws one), plus [`RETRY_BUDGET_MIN_PER_SEC`] always allowed, so that a
/// failing target or exit is not hit with amplified load (the retry-storm problem).
pub struct RetryBudget {
    ratio_milli: u64,
    tokens: AtomicU64,
    floor: Mutex<Instant>,
    denied: AtomicU64,
}

impl RetryBudget {
    /// A budget letting retries be `ratio` (0..=1) of requests; starts with the per-second
    /// floor's worth.
    pub fn new(ratio: f64) -> Self {
        RetryBudget {
            ratio_milli: (ratio.clamp(0.0, 1.0) * MILLI as f64) as u64,
            tokens: AtomicU64::new(u64::from(RETRY_BUDGET_MIN_PER_SEC) * MILLI),
            floor: Mutex::new(Instant::now()),
            denied: AtomicU64::new(0),
        }
    }

    /// One request sent: deposits its share.
    pub fn deposit(&self) {
        if self.ratio_milli == 0 {
            return;
        }
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t < RETRY_BUDGET_CAP).then(|| (t + self.ratio_milli).min(RETRY_BUDGET_CAP))
            });
    }

    /// Whether one retry may go now (and withdraws it).
    pub fn try_withdraw(&self) -> bool {
        // The per-second floor, added lazily.
        {
            let mut last = self.floor.lock();
            let secs = last.elapsed().as_secs();
            if secs > 0 {
                let add = secs * u64::from(RETRY_BUDGET_MIN_PER_SEC) * MILLI;
                let _ = self
                    .tokens
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                        Some((t + add).min(RETRY_BUDGET_CAP))
                    });
                *last += std::time::Duration::from_secs(secs);
            }
        }
        let ok = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                t.checked_sub(MILLI)
            })
            .is_ok();
        if !ok {
            self.denied.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Retries refused so far.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_worker: usize, tunnels: usize, in_flight: usize) -> LimitsConfig {
        LimitsConfig {
            max_connections_per_worker: per_worker,
            max_tunnels: tunnels,
            max_in_flight: in_flight,
            max_worker_share: 1.0,
            ..Default::default()
        }
    }

    /// A connection from `ip` (held by the caller) and its address's entry.
    fn connect(adm: &Arc<Admission>, ip: &str) -> (Ticket, WorkerAddr) {
        let t = adm.worker_connection(ip.parse().unwrap()).unwrap();
        let addr = t.addr();
        (t, addr)
    }

    #[test]
    fn tickets_are_bounded_and_given_back() {
        let adm = Admission::new(&limits(2, 1, 3));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let t1 = adm.worker_connection(a).unwrap();
        let t2 = adm.worker_connection(a).unwrap();
        assert!(
            adm.worker_connection(a).is_none(),
            "third from the same address"
        );
        let (tb, b) = connect(&adm, "10.0.0.2");
        assert_eq!(adm.usage().2, 2, "two addresses with connections");
        drop(t1);
        let t3 = adm.worker_connection(a).expect("a place was given back");
        let a = t3.addr();

        let tun = adm.tunnel(&a).unwrap();
        assert!(adm.tunnel(&b).is_err());
        drop(tun);
        assert!(adm.tunnel(&b).is_ok());

        {
            let reqs: Vec<_> = [&a, &b, &b]
                .into_iter()
                .map(|w| adm.request(w).unwrap())
                .collect();
            assert_eq!(adm.request(&a).err(), Some(Refused::Full));
            assert_eq!(adm.usage().1, 3);
            drop(reqs);
        }
        assert_eq!(adm.usage().1, 0);
        drop((t2, t3, tb));
        assert!(
            adm.per_worker.lock().is_empty(),
            "no connection and nothing held: the addresses are forgotten"
        );
    }

    #[test]
    fn an_address_is_forgotten_only_when_its_last_place_goes() {
        let adm = Admission::new(&limits(4, 4, 4));
        let (conn, a) = connect(&adm, "10.0.0.1");
        let req = adm.request(&a).unwrap();
        let tunnel = adm.tunnel(&a).unwrap();
        drop(conn);
        assert_eq!(
            adm.per_worker.lock().len(),
            1,
            "a request and a tunnel still held"
        );
        assert_eq!(adm.usage().2, 0, "but no connection");
        drop(req);
        assert_eq!(adm.per_worker.lock().len(), 1, "the tunnel still held");
        drop(tunnel);
        assert!(adm.per_worker.lock().is_empty());
        // A new connection from the address starts a fresh entry with nothing held.
        let (_conn, a) = connect(&adm, "10.0.0.1");
        let all: Vec<_> = (0..4).map(|_| adm.request(&a).unwrap()).collect();
        assert_eq!(all.len(), 4);
        // An address refused its first connection leaves no entry behind.
        let none = Admission::new(&limits(0, 4, 4));
        assert!(none
            .worker_connection("10.0.0.9".parse().unwrap())
            .is_none());
        assert!(none.per_worker.lock().is_empty());
    }

    #[test]
    fn threads_taking_and_giving_back_places_leave_nothing_behind() {
        let adm = Admission::new(&LimitsConfig {
            max_connections_per_worker: 1000,
            max_in_flight: 64,
            max_tunnels: 64,
            max_buffered_bytes: 1 << 20,
            max_worker_share: 0.5,
            ..Default::default()
        });
        std::thread::scope(|s| {
            for t in 0..4 {
                let adm = adm.clone();
                s.spawn(move || {
                    let ip = format!("10.0.0.{}", t % 2);
                    for i in 0..2000 {
                        let (conn, a) = connect(&adm, &ip);
                        let req = adm.request(&a);
                        let mut body = adm.buffer(&a, (i % 3) as u64).ok();
                        if let Some(b) = body.as_mut() {
                            let _ = b.grow(100);
                        }
                        let tunnel = (i % 5 == 0).then(|| adm.tunnel(&a));
                        // Drop in varying orders: the connection first, last, or between.
                        match i % 3 {
                            0 => drop((conn, req, body, tunnel)),
                            1 => drop((req, body, tunnel, conn)),
                            _ => drop((body, conn, tunnel, req)),
                        }
                    }
                });
            }
        });
        assert_eq!(adm.usage(), (0, 0, 0));
        assert_eq!(adm.buffered(), 0);
        assert!(adm.per_worker.lock().is_empty(), "nothing left behind");
    }

    #[test]
    fn an_address_at_its_share_never_makes_another_look_full() {
        // A holds its whole share (50 of 100) and keeps asking; B holds 49 and asks too. The
        // limit is never really reached (99 at most), so B must never hear "full": a place A
        // takes for a moment before its share refuses it must not be visible to B.
        let adm = Admission::new(&LimitsConfig {
            max_in_flight: 100,
            max_worker_share: 0.5,
            ..Default::default()
        });
        let (_ca, a) = connect(&adm, "10.0.0.1");
        let (_cb, b) = connect(&adm, "10.0.0.2");
        let held_a: Vec<_> = (0..50).map(|_| adm.request(&a).unwrap()).collect();
        let held_b: Vec<_> = (0..49).map(|_| adm.request(&b).unwrap()).collect();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let mut refused = None;
        std::thread::scope(|s| {
            s.spawn(|| {
                // Bounded, and stopped as soon as B is done.
                for _ in 0..20_000_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // "full" when B holds the 100th place at that moment: both are reached.
                    assert!(adm.request(&a).is_err(), "A is over its share");
                }
            });
            for i in 0..200_000 {
                if let Err(why) = adm.request(&b) {
                    refused = Some((i, why));
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert_eq!(refused, None, "B (49 of its 50) was refused");
        drop((held_a, held_b));
        assert_eq!(adm.usage().1, 0);
    }

    #[test]
    fn one_address_holds_at_most_its_share() {
        let cfg = LimitsConfig {
            max_in_flight: 10,
            max_tunnels: 4,
            max_buffered_bytes: 2000,
            max_worker_share: 0.5,
            ..Default::default()
        };
        let adm = Admission::new(&cfg);
        let (ca, a) = connect(&adm, "10.0.0.1");
        let (cb, b) = connect(&adm, "10.0.0.2");
        let mine: Vec<_> = (0..5).map(|_| adm.request(&a).unwrap()).collect();
        assert_eq!(
            adm.request(&a).err(),
            Some(Refused::Share),
            "a holds its half"
        );
        let theirs: Vec<_> = (0..5).map(|_| adm.request(&b).unwrap()).collect();
        assert_eq!(
            adm.request(&b).err(),
            Some(Refused::Full),
            "both: full is the answer"
        );
        drop((mine, theirs));
        let t: Vec<_> = (0..2).map(|_| adm.tunnel(&a).unwrap()).collect();
        assert_eq!(adm.tunnel(&a).err(), Some(Refused::Share));
        assert!(adm.tunnel(&b).is_ok());
        drop(t);
        let mut body = adm.buffer(&a, 800).unwrap();
        assert_eq!(
            body.grow(300).err(),
            Some(Refused::Share),
            "1100 > a's 1000"
        );
        body.grow(200).unwrap();
        let other = adm.buffer(&b, 1000).unwrap();
        assert_eq!(adm.buffered(), 2000);
        assert_eq!(
            adm.buffer(&b, 1).err(),
            Some(Refused::Full),
            "the budget is used up"
        );
        drop(body);
        assert_eq!(
            adm.buffer(&b, 1).err(),
            Some(Refused::Share),
            "b holds its share"
        );
        drop(other);
        assert_eq!(adm.buffered(), 0);
        assert_eq!(adm.take_buffered_peak(), 2000);
        assert_eq!(adm.take_buffered_peak(), 0);
        drop((ca, cb));
        assert!(adm.per_worker.lock().is_empty(), "nothing left behind");
    }

    #[test]
    fn an_empty_body_holds_nothing_and_may_still_grow() {
        let cfg = LimitsConfig {
            max_buffered_bytes: 1000,
            max_worker_share: 0.5,
            ..Default::default()
        };
        let adm = Admission::new(&cfg);
        let (conn, a) = connect(&adm, "10.0.0.1");
        let empty = adm.buffer(&a, 0).unwrap();
        assert_eq!(a.0.bytes.load(Ordering::Relaxed), 0, "nothing held");
        drop(empty);
        let mut body = adm.buffer(&a, 0).unwrap();
        body.grow(400).unwrap();
        assert_eq!(adm.buffered(), 400);
        assert_eq!(body.grow(200).err(), Some(Refused::Share), "600 > a's 500");
        drop(conn);
        assert_eq!(
            adm.per_worker.lock().len(),
            1,
            "the body's bytes still held"
        );
        drop(body);
        assert_eq!(adm.buffered(), 0);
        assert!(
            adm.per_worker.lock().is_empty(),
            "the grown bytes are given back"
        );
    }

    #[test]
    fn an_idle_spell_does_not_lift_the_cap() {
        let budget = RetryBudget::new(0.2);
        *budget.floor.lock() -= std::time::Duration::from_secs(3600);
        let allowed = (0..100_000).filter(|_| budget.try_withdraw()).count();
        assert_eq!(allowed, (RETRY_BUDGET_CAP / MILLI) as usize);
    }

    #[test]
    fn the_retry_budget_caps_retries_at_its_share_of_requests() {
        let budget = RetryBudget::new(0.2);
        // The starting floor (10 retries), then nothing without requests.
        let free = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(free, RETRY_BUDGET_MIN_PER_SEC as usize);
        // 1000 requests earn 200 retries, no more (the saved-up cap is 100).
        for _ in 0..1000 {
            budget.deposit();
        }
        let earned = (0..1000).filter(|_| budget.try_withdraw()).count();
        assert_eq!(earned, 100, "capped at what can be saved up");
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!((0..1000).filter(|_| budget.try_withdraw()).count(), 20);
        assert!(budget.denied() > 0);
    }
}
