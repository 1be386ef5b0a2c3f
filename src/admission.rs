//! admission: edgepool's own capacity limits — connections per worker address, CONNECT
//! tunnels, requests in flight — and the retry budget. Each limit hands out a [`Ticket`] that
//! gives its place back when dropped; over a limit the caller answers 503 with `Retry-After`
//! at once, before reading a body, instead of queueing without bound.
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
/// client can never lock the others out. One lock guards the per-address table; the global
/// counters are atomics.
pub struct Admission {
    max_per_worker: usize,
    per_worker: Mutex<HashMap<IpAddr, PerAddr>>,
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

/// What one worker address holds.
#[derive(Default)]
struct PerAddr {
    connections: usize,
    requests: usize,
    tunnels: usize,
    bytes: u64,
}

impl PerAddr {
    fn is_empty(&self) -> bool {
        self.connections == 0 && self.requests == 0 && self.tunnels == 0 && self.bytes == 0
    }
}

/// A place taken under one limit; dropping it gives the place back.
pub struct Ticket {
    adm: Arc<Admission>,
    kind: Kind,
}

enum Kind {
    Worker(IpAddr),
    Tunnel(IpAddr),
    Request(IpAddr),
    /// Buffered bytes (grows with [`Ticket::grow`]).
    Bytes(IpAddr, u64),
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
        match self.kind {
            Kind::Worker(ip) | Kind::Tunnel(ip) | Kind::Request(ip) | Kind::Bytes(ip, _) => ip,
        }
    }

    /// For a byte budget ticket: `n` more bytes, if the budget and the address's share allow.
    pub fn grow(&mut self, n: u64) -> Result<(), Refused> {
        let Kind::Bytes(ip, ref mut held) = self.kind else {
            return Ok(());
        };
        self.adm.reserve_bytes(ip, n)?;
        *held += n;
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let (ip, what) = match self.kind {
            Kind::Worker(ip) => (ip, 0),
            Kind::Tunnel(ip) => {
                self.adm.tunnels.fetch_sub(1, Ordering::Relaxed);
                (ip, 1)
            }
            Kind::Request(ip) => {
                self.adm.in_flight.fetch_sub(1, Ordering::Relaxed);
                (ip, 2)
            }
            // Nothing held (a request without a body): nothing to give back.
            Kind::Bytes(_, 0) => return,
            Kind::Bytes(ip, n) => {
                self.adm.buffered.fetch_sub(n, Ordering::Relaxed);
                (ip, 3)
            }
        };
        let mut map = self.adm.per_worker.lock();
        if let Some(a) = map.get_mut(&ip) {
            match (what, &self.kind) {
                (0, _) => a.connections -= 1,
                (1, _) => a.tunnels -= 1,
                (2, _) => a.requests -= 1,
                (_, Kind::Bytes(_, n)) => a.bytes -= n,
                _ => {}
            }
            if a.is_empty() {
                map.remove(&ip);
            }
        }
    }
}

/// Takes a place under `max` in `counter`, or `None` when full.
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
        let a = map.entry(ip).or_default();
        if a.connections >= self.max_per_worker {
            return None;
        }
        a.connections += 1;
        Some(Ticket {
            adm: self.clone(),
            kind: Kind::Worker(ip),
        })
    }

    /// A CONNECT tunnel for `ip`, if fewer than `limits.max_tunnels` are open and `ip` holds
    /// less than its share of them.
    pub fn tunnel(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        self.take_place(
            ip,
            &self.tunnels,
            self.max_tunnels,
            self.addr_tunnels,
            |a| &mut a.tunnels,
        )?;
        Ok(Ticket {
            adm: self.clone(),
            kind: Kind::Tunnel(ip),
        })
    }

    /// A request in flight for `ip`, if fewer than `limits.max_in_flight` are and `ip` holds
    /// less than its share of them.
    pub fn request(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        self.take_place(
            ip,
            &self.in_flight,
            self.max_in_flight,
            self.addr_in_flight,
            |a| &mut a.requests,
        )?;
        Ok(Ticket {
            adm: self.clone(),
            kind: Kind::Request(ip),
        })
    }

    /// One place under `max` in `global` and under `share` of it for `ip` (the address's
    /// counter picked by `held`). The limit itself is checked first: when both are reached,
    /// "full" is the truer answer.
    fn take_place(
        &self,
        ip: IpAddr,
        global: &AtomicUsize,
        max: usize,
        share: usize,
        held: fn(&mut PerAddr) -> &mut usize,
    ) -> Result<(), Refused> {
        let mut map = self.per_worker.lock();
        if !take(global, max) {
            return Err(Refused::Full);
        }
        let n = held(map.entry(ip).or_default());
        if *n >= share {
            global.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Share);
        }
        *n += 1;
        Ok(())
    }

    /// A byte budget for a body `ip` is about to buffer: `n` bytes now, more with
    /// [`Ticket::grow`].
    pub fn buffer(self: &Arc<Self>, ip: IpAddr, n: u64) -> Result<Ticket, Refused> {
        self.reserve_bytes(ip, n)?;
        Ok(Ticket {
            adm: self.clone(),
            kind: Kind::Bytes(ip, n),
        })
    }

    fn reserve_bytes(&self, ip: IpAddr, n: u64) -> Result<(), Refused> {
        if n == 0 {
            // Within any budget and share, and changes neither: most requests have no body,
            // and take no lock for it.
            return Ok(());
        }
        let mut map = self.per_worker.lock();
        let max = self.max_buffered;
        let before = self
            .buffered
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |b| {
                (b + n <= max).then_some(b + n)
            })
            .map_err(|_| Refused::Full)?;
        let a = map.entry(ip).or_default();
        if a.bytes + n > self.addr_buffered {
            self.buffered.fetch_sub(n, Ordering::Relaxed);
            if a.is_empty() {
                map.remove(&ip);
            }
            return Err(Refused::Share);
        }
        a.bytes += n;
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
                .filter(|a| a.connections > 0)
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

    #[test]
    fn tickets_are_bounded_and_given_back() {
        let adm = Admission::new(&limits(2, 1, 3));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = adm.worker_connection(a).unwrap();
        let _t2 = adm.worker_connection(a).unwrap();
        assert!(
            adm.worker_connection(a).is_none(),
            "third from the same address"
        );
        assert!(
            adm.worker_connection(b).is_some(),
            "another worker is not affected"
        );
        drop(t1);
        assert!(adm.worker_connection(a).is_some());

        let tun = adm.tunnel(a).unwrap();
        assert!(adm.tunnel(b).is_err());
        drop(tun);
        assert!(adm.tunnel(b).is_ok());

        let reqs: Vec<_> = (0..3)
            .map(|i| adm.request(if i == 0 { a } else { b }).unwrap())
            .collect();
        assert_eq!(adm.request(a).err(), Some(Refused::Full));
        drop(reqs);
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
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mine: Vec<_> = (0..5).map(|_| adm.request(a).unwrap()).collect();
        assert_eq!(
            adm.request(a).err(),
            Some(Refused::Share),
            "a holds its half"
        );
        let theirs: Vec<_> = (0..5).map(|_| adm.request(b).unwrap()).collect();
        assert_eq!(
            adm.request(b).err(),
            Some(Refused::Full),
            "both: full is the answer"
        );
        drop((mine, theirs));
        let t: Vec<_> = (0..2).map(|_| adm.tunnel(a).unwrap()).collect();
        assert_eq!(adm.tunnel(a).err(), Some(Refused::Share));
        assert!(adm.tunnel(b).is_ok());
        drop(t);
        let mut body = adm.buffer(a, 800).unwrap();
        assert_eq!(
            body.grow(300).err(),
            Some(Refused::Share),
            "1100 > a's 1000"
        );
        body.grow(200).unwrap();
        let other = adm.buffer(b, 1000).unwrap();
        assert_eq!(adm.buffered(), 2000);
        assert_eq!(
            adm.buffer(b, 1).err(),
            Some(Refused::Full),
            "the budget is used up"
        );
        drop(body);
        assert_eq!(
            adm.buffer(b, 1).err(),
            Some(Refused::Share),
            "b holds its share"
        );
        drop(other);
        assert_eq!(adm.buffered(), 0);
        assert_eq!(adm.take_buffered_peak(), 2000);
        assert_eq!(adm.take_buffered_peak(), 0);
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
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let empty = adm.buffer(a, 0).unwrap();
        assert!(
            adm.per_worker.lock().is_empty(),
            "no entry for nothing held"
        );
        drop(empty);
        let mut body = adm.buffer(a, 0).unwrap();
        body.grow(400).unwrap();
        assert_eq!(adm.buffered(), 400);
        assert_eq!(body.grow(200).err(), Some(Refused::Share), "600 > a's 500");
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
