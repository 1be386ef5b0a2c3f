//! The greedy reference (this module keeps its historical name, `oracle`): a greedy pool that
//! replays a run.
//!
//! It replays the run's request timeline (each request's start and end, target and exit) through
//! a pool that knows the future of nothing but obeys everything the servers and the rotation
//! policy impose:
//! - requests through different exits, or to different targets, never share a connection
//!   (a connection is bound to one exit's IP path);
//! - an HTTP/1.1 connection carries one request at a time; an HTTP/2 connection up to the
//!   server's `max_concurrent_streams` at once;
//! - a connection carries at most the server's `max_requests` (or `goaway_every`) requests;
//! - a connection idle for the server's `idle_timeout` is gone.
//!
//! Each request takes a connection that is usable at its start (the one that carried the most
//! requests first, which keeps the others free), or opens one. Then
//! `reference R = 1 − connections / requests`.
//!
//! This is a heuristic, **not** a lower bound on connections: the greedy choice is not optimal,
//! and a request's span ends when the worker has read the body, later than a real pool gets its
//! connection back. A pool can beat it (edgepool reached 100.2 % of it on `residential`), so it
//! is reported as a "greedy reference", never as optimal. Random resets (`rst_idle_fraction`)
//! are ignored, so it is optimistic where a scenario injects them.
use std::collections::HashMap;
use std::time::Duration;

/// One request as it happened.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    /// Target index.
    pub target: usize,
    /// Exit index (0 = direct).
    pub exit: usize,
    /// Start, since the run began.
    pub start: Duration,
    /// End (response fully read).
    pub end: Duration,
}

/// What a target's server allows a connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests carried at once (1 for HTTP/1.1).
    pub concurrency: u32,
    /// Requests per connection.
    pub max_requests: Option<u64>,
    /// Idle time after which the server closes.
    pub idle_timeout: Option<Duration>,
}

struct Conn {
    served: u64,
    /// End times of the requests it carried that may still be in flight.
    ends: Vec<Duration>,
    last_end: Duration,
}

/// Connections the greedy pool opens for `spans`, per target (same order as `limits`).
pub fn connections(spans: &[Span], limits: &[Limits]) -> Vec<u64> {
    let mut sorted: Vec<&Span> = spans.iter().collect();
    sorted.sort_by_key(|s| (s.start, s.end));
    let mut pools: HashMap<(usize, usize), Vec<Conn>> = HashMap::new();
    let mut per_target = vec![0u64; limits.len()];
    for s in sorted {
        let lim = limits[s.target];
        let conns = pools.entry((s.target, s.exit)).or_default();
        // The most used connection that is usable at the request's start.
        let mut pick: Option<usize> = None;
        let mut top = 0u64;
        for (i, c) in conns.iter_mut().enumerate() {
            c.ends.retain(|e| *e > s.start);
            let spent = lim.max_requests.is_some_and(|m| c.served >= m);
            let full = c.ends.len() as u32 >= lim.concurrency.max(1);
            let idled_out = c.ends.is_empty()
                && lim
                    .idle_timeout
                    .is_some_and(|idle| s.start.saturating_sub(c.last_end) >= idle);
            if spent || full || idled_out {
                continue;
            }
            if pick.is_none() || c.served > top {
                pick = Some(i);
                top = c.served;
            }
        }
        let c = match pick {
            Some(i) => &mut conns[i],
            None => {
                per_target[s.target] += 1;
                conns.push(Conn {
                    served: 0,
                    ends: Vec::new(),
                    last_end: s.start,
                });
                conns.last_mut().expect("just pushed")
            }
        };
        c.served += 1;
        c.ends.push(s.end);
        c.last_end = c.last_end.max(s.end);
    }
    per_target
}

/// R = 1 − connections / requests (1 with no requests).
pub fn reuse_rate(requests: u64, connections: u64) -> f64 {
    if requests == 0 {
        1.0
    } else {
        (1.0 - connections as f64 / requests as f64).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn span(target: usize, exit: usize, start: u64, end: u64) -> Span {
        Span {
            target,
            exit,
            start: ms(start),
            end: ms(end),
        }
    }
    const H1: Limits = Limits {
        concurrency: 1,
        max_requests: None,
        idle_timeout: None,
    };

    #[test]
    fn sequential_requests_share_one_connection_and_concurrent_ones_need_more() {
        let seq: Vec<Span> = (0..10).map(|i| span(0, 0, i * 10, i * 10 + 5)).collect();
        assert_eq!(connections(&seq, &[H1]), vec![1]);
        // Three at once, then three more after they end: three connections.
        let mut par: Vec<Span> = (0..3).map(|_| span(0, 0, 0, 10)).collect();
        par.extend((0..3).map(|_| span(0, 0, 20, 30)));
        assert_eq!(connections(&par, &[H1]), vec![3]);
        // HTTP/2 with 2 streams: ceil(3 / 2) = 2.
        let h2 = Limits {
            concurrency: 2,
            ..H1
        };
        assert_eq!(connections(&par, &[h2]), vec![2]);
    }

    #[test]
    fn server_limits_and_exits_force_connections() {
        let seq: Vec<Span> = (0..10).map(|i| span(0, 0, i * 10, i * 10 + 5)).collect();
        let capped = Limits {
            max_requests: Some(3),
            ..H1
        };
        assert_eq!(connections(&seq, &[capped]), vec![4], "ceil(10 / 3)");
        let idle = Limits {
            idle_timeout: Some(ms(100)),
            ..H1
        };
        let gaps = vec![span(0, 0, 0, 5), span(0, 0, 50, 55), span(0, 0, 300, 305)];
        assert_eq!(
            connections(&gaps, &[idle]),
            vec![2],
            "the 245 ms gap outlives the idle timeout"
        );
        // The same timeline through two exits alternately: one connection per exit.
        let rotating: Vec<Span> = (0..10)
            .map(|i| span(0, (i % 2) as usize, i * 10, i * 10 + 5))
            .collect();
        assert_eq!(connections(&rotating, &[H1]), vec![2]);
        // Targets are counted apart.
        let two = vec![span(0, 0, 0, 5), span(1, 0, 0, 5), span(1, 0, 10, 15)];
        assert_eq!(connections(&two, &[H1, H1]), vec![1, 1]);
        assert!((reuse_rate(10, 2) - 0.8).abs() < 1e-9);
        assert_eq!(reuse_rate(0, 0), 1.0);
    }
}
