//! Cost of one latency observation when every runtime thread observes into the same
//! histogram at once, as edgepool's per-phase histograms are on every proxied request:
//! `prometheus_client`'s `Histogram` (an exclusive lock per observation) against
//! `edgepool::histogram::ShardedHistogram` (two atomic additions).
//!
//! ```text
//! cargo bench --bench histogram_contention            # HISTOGRAM_THREADS=1,2 HISTOGRAM_OBS=2000000
//! ```
//!
//! For each thread count, N threads each make HISTOGRAM_OBS observations (values spread over
//! the phase buckets) into one shared histogram; the figure is wall time / observations per
//! thread, the median of 5 rounds, so with 2 threads it is what each request pays while the
//! other thread does the same. Every round checks that no observation was lost.
use std::sync::Barrier;
use std::time::{Duration, Instant};

use edgepool::histogram::ShardedHistogram;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

trait Observe: Clone + Send + 'static {
    fn observe(&self, v: f64);
    fn count(&self) -> u64;
}

impl Observe for Histogram {
    fn observe(&self, v: f64) {
        Histogram::observe(self, v)
    }
    fn count(&self) -> u64 {
        use prometheus_client::encoding::text::encode;
        let mut r = prometheus_client::registry::Registry::default();
        r.register("h", "h", self.clone());
        let mut s = String::new();
        encode(&mut s, &r).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("h_count "))
            .and_then(|n| n.trim().parse().ok())
            .expect("h_count in the exposition")
    }
}

impl Observe for ShardedHistogram {
    fn observe(&self, v: f64) {
        ShardedHistogram::observe(self, v)
    }
    fn count(&self) -> u64 {
        self.snapshot().1
    }
}

#[allow(clippy::disallowed_methods)] // benchmark timer: wall time
fn round<H: Observe>(h: &H, threads: usize, n: u64) -> Duration {
    let barrier = std::sync::Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let h = h.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut x = 0x9E37_79B9u64 ^ t as u64;
                for _ in 0..n {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // 100 µs .. ~100 ms, the range warm requests' phases fall in.
                    h.observe(0.0001 * (1 + x % 1000) as f64);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for t in handles {
        t.join().unwrap();
    }
    start.elapsed()
}

fn measure<H: Observe>(name: &str, make: impl Fn() -> H, threads: usize, n: u64) {
    let mut per_obs: Vec<f64> = (0..5)
        .map(|_| {
            let h = make();
            let took = round(&h, threads, n);
            assert_eq!(h.count(), threads as u64 * n, "{name}: observations lost");
            took.as_nanos() as f64 / n as f64
        })
        .collect();
    per_obs.sort_by(f64::total_cmp);
    println!(
        "{name:<34} {threads} thread(s): {:>7.1} ns per observation (median of 5; min {:.1}, max {:.1})",
        per_obs[2], per_obs[0], per_obs[4]
    );
}

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: comma-separated integers"))
        })
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let threads = env_list("HISTOGRAM_THREADS", "1,2");
    let n = env_list("HISTOGRAM_OBS", "2000000")[0];
    println!(
        "cores: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for &t in &threads {
        let t = t as usize;
        measure(
            "prometheus_client Histogram (lock)",
            || Histogram::new(exponential_buckets(0.0001, 2.0, 19)),
            t,
            n,
        );
        measure(
            "ShardedHistogram",
            || ShardedHistogram::new(exponential_buckets(0.0001, 2.0, 19)),
            t,
            n,
        );
    }
}
