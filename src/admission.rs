//! admission: edgepool's own capacity limits — connections per worker address, CONNECT
//! tunnels, requests in flight — and the retry budget. Each limit hands out a [`Ticket`] that
//! gives its place back when dropped; over a limit the caller answers 503 with `Retry-After`
//! at once, before reading a body, instead of queueing without bound.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::config::{LimitsConfig, RETRY_BUDGET_MIN_PER_SEC};

/// Retry tokens are kept in thousandths.
const MILLI: u64 = 1000;
/// The most retries the budget can save up (a burst after a quiet spell).
const RETRY_BUDGET_CAP: u64 = 100 * MILLI;

/// The limits and their current use.
pub struct Admission {
    max_per_worker: usize,
    per_worker: Mutex<HashMap<IpAddr, usize>>,
    max_tunnels: usize,
    tunnels: AtomicUsize,
    max_in_flight: usize,
    in_flight: AtomicUsize,
}

/// A place taken under one limit; dropping it gives the place back.
pub struct Ticket {
    adm: Arc<Admission>,
    kind: Kind,
}

enum Kind {
    Worker(IpAddr),
    Tunnel,
    Request,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        match self.kind {
            Kind::Worker(ip) => {
                let mut map = self.adm.per_worker.lock();
                if let Some(n) = map.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        map.remove(&ip);
                    }
                }
            }
            Kind::Tunnel => {
                self.adm.tunnels.fetch_sub(1, Ordering::Relaxed);
            }
            Kind::Request => {
                self.adm.in_flight.fetch_sub(1, Ordering::Relaxed);
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

impl Admission {
    /// Limits from `[limits]`.
    pub fn new(cfg: &LimitsConfig) -> Arc<Self> {
        Arc::new(Admission {
            max_per_worker: cfg.max_connections_per_worker,
            per_worker: Mutex::new(HashMap::new()),
            max_tunnels: cfg.max_tunnels,
            tunnels: AtomicUsize::new(0),
            max_in_flight: cfg.max_in_flight,
            in_flight: AtomicUsize::new(0),
        })
    }

    /// A connection from `ip`, if it has fewer than `limits.max_connections_per_worker` open.
    pub fn worker_connection(self: &Arc<Self>, ip: IpAddr) -> Option<Ticket> {
        let mut map = self.per_worker.lock();
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_worker {
            return None;
        }
        *n += 1;
        Some(Ticket {
            adm: self.clone(),
            kind: Kind::Worker(ip),
        })
    }

    /// A CONNECT tunnel, if fewer than `limits.max_tunnels` are open.
    pub fn tunnel(self: &Arc<Self>) -> Option<Ticket> {
        take(&self.tunnels, self.max_tunnels).then(|| Ticket {
            adm: self.clone(),
            kind: Kind::Tunnel,
        })
    }

    /// A request in flight, if fewer than `limits.max_in_flight` are.
    pub fn request(self: &Arc<Self>) -> Option<Ticket> {
        take(&self.in_flight, self.max_in_flight).then(|| Ticket {
            adm: self.clone(),
            kind: Kind::Request,
        })
    }

    /// Open tunnels, requests in flight, worker addresses with open connections.
    pub fn usage(&self) -> (usize, usize, usize) {
        (
            self.tunnels.load(Ordering::Relaxed),
            self.in_flight.load(Ordering::Relaxed),
            self.per_worker.lock().len(),
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

        let tun = adm.tunnel().unwrap();
        assert!(adm.tunnel().is_none());
        drop(tun);
        assert!(adm.tunnel().is_some());

        let reqs: Vec<_> = (0..3).map(|_| adm.request().unwrap()).collect();
        assert!(adm.request().is_none());
        drop(reqs);
        assert_eq!(adm.usage().1, 0);
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
