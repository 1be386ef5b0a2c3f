//! A Prometheus histogram whose `observe` takes no lock and shares no cache line between
//! threads.
//!
//! `prometheus_client`'s `Histogram` (0.22, and still 0.26) takes an exclusive lock for every
//! observation. edgepool observes four phases of every proxied request (dns, queue, ttfb,
//! total) into four process-wide histograms, from every runtime thread: four exclusive locks a
//! request, each on a cache line that the other threads write too. Plain shared atomics are no
//! better (measured: `cargo bench --bench histogram_contention`, docs/BENCHMARKS.md): the
//! line still moves between cores on every observation. So each histogram keeps one shard of
//! counts per CPU (rounded up to a power of two, at most 64), each on its own 128-byte lines;
//! a thread always writes the shard it was given on its first observation (round-robin), and
//! a scrape adds the shards up.
//!
//! It encodes exactly as `prometheus_client`'s histogram does (same buckets, `+Inf` bucket,
//! `_sum`, `_count`), through the same encoder, so `/metrics` does not change. The count is
//! the total of the bucket counts, so it always equals the `+Inf` bucket; `_sum` read during
//! an observation may not include it yet (a scrape is a snapshot, not a transaction). Two
//! values that never occur here (durations and counts) are treated differently:
//! `prometheus_client` counts NaN and `+inf` in `_count` but in no bucket; here `+inf` is in
//! the `+Inf` bucket and NaN in neither (both still go into `_sum`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Counters per 128-byte line (two 64-byte lines: adjacent-line prefetch pairs them).
const PER_LINE: usize = 16;

#[repr(align(128))]
#[derive(Debug, Default)]
struct Line([AtomicU64; PER_LINE]);

/// How many shards every histogram has: the CPUs, rounded up to a power of two, 1..=64.
fn shard_count() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .next_power_of_two()
            .min(64)
    })
}

/// This thread's shard (the same for every histogram), given out round-robin.
fn my_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    MINE.with(|m| *m) & (shard_count() - 1)
}

/// A histogram with fixed upper bounds (plus `+Inf`); cheap to clone (shares its counts).
#[derive(Clone, Debug)]
pub struct ShardedHistogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Upper bounds, ascending, then `f64::MAX` for `+Inf` (as `prometheus_client` writes it).
    bounds: Box<[f64]>,
    /// Lines per shard: room for one count per bound and the sum.
    stride: usize,
    /// Shard `s` is `lines[s * stride..][..stride]`: counts per bucket (not cumulative) at
    /// 0..bounds.len(), then the sum of its observations as `f64` bits.
    lines: Box<[Line]>,
}

impl Inner {
    fn slot(&self, shard: usize, i: usize) -> &AtomicU64 {
        &self.lines[shard * self.stride + i / PER_LINE].0[i % PER_LINE]
    }
}

impl ShardedHistogram {
    /// A histogram with these upper bounds (ascending; `+Inf` is added).
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let mut b: Vec<f64> = bounds.into_iter().collect();
        debug_assert!(b.windows(2).all(|w| w[0] < w[1]), "bounds must ascend");
        b.push(f64::MAX);
        let stride = (b.len() + 1).div_ceil(PER_LINE);
        let lines = (0..stride * shard_count())
            .map(|_| Line::default())
            .collect();
        ShardedHistogram {
            inner: Arc::new(Inner {
                bounds: b.into_boxed_slice(),
                stride,
                lines,
            }),
        }
    }

    /// Counts `v` in the first bucket whose upper bound is at least `v`.
    pub fn observe(&self, v: f64) {
        let inner = &*self.inner;
        let shard = my_shard();
        // NaN is below no bound: like prometheus_client, it is counted in no bucket but still
        // added to the sum (unlike it, it is not in the count either: count = +Inf bucket).
        if !v.is_nan() {
            // The last bound is f64::MAX; only +inf itself lands past it.
            let i = inner
                .bounds
                .partition_point(|&b| b < v)
                .min(inner.bounds.len() - 1);
            inner.slot(shard, i).fetch_add(1, Ordering::Relaxed);
        }
        // Another thread shares this shard only when there are more threads than shards.
        let _ = inner.slot(shard, inner.bounds.len()).fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |bits| Some((f64::from_bits(bits) + v).to_bits()),
        );
    }

    /// (sum, count, buckets as (upper bound, count in that bucket alone)), over all shards.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let inner = &*self.inner;
        let n = inner.bounds.len();
        let mut buckets: Vec<(f64, u64)> = inner.bounds.iter().map(|&b| (b, 0)).collect();
        let mut sum = 0.0;
        for shard in 0..shard_count() {
            for (i, bucket) in buckets.iter_mut().enumerate() {
                bucket.1 += inner.slot(shard, i).load(Ordering::Relaxed);
            }
            sum += f64::from_bits(inner.slot(shard, n).load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|&(_, c)| c).sum();
        (sum, count, buckets)
    }
}

impl TypedMetric for ShardedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<()>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
    use prometheus_client::registry::Registry;

    fn exposition(name: &str, metric: impl prometheus_client::registry::Metric) -> String {
        let mut r = Registry::default();
        r.register(name, "help", metric);
        let mut s = String::new();
        encode(&mut s, &r).unwrap();
        s
    }

    /// The same observations give the same `/metrics` text as prometheus_client's histogram,
    /// including values on a bound, below the first, above the last, zero and NaN.
    #[test]
    fn encodes_exactly_like_the_locking_histogram() {
        let ours = ShardedHistogram::new(exponential_buckets(0.0001, 2.0, 19));
        let theirs = Histogram::new(exponential_buckets(0.0001, 2.0, 19));
        let values = [
            0.0, 0.00005, 0.0001, 0.00011, 0.0002, 0.003, 0.5, 1.0, 13.1, 26.2144, 30.0, 1e9,
        ];
        for v in values {
            ours.observe(v);
            theirs.observe(v);
        }
        let a = exposition("edgepool_phase_seconds", ours.clone());
        let b = exposition("edgepool_phase_seconds", theirs);
        assert_eq!(a, b);
        assert!(a.contains("edgepool_phase_seconds_count 12"), "{a}");
        assert!(a.contains("le=\"0.0001\"} 3"), "{a}");
        assert!(a.contains("le=\"+Inf\"} 12"), "{a}");

        ours.observe(f64::NAN);
        let (sum, count, _) = ours.snapshot();
        assert!(sum.is_nan());
        assert_eq!(count, 12);
    }

    /// Observations from many threads at once are all counted, in the right buckets.
    #[test]
    fn concurrent_observations_are_all_counted() {
        let h = ShardedHistogram::new([1.0, 2.0, 3.0]);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        h.observe(((i + t) % 4) as f64 + 0.5);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 40_000);
        assert_eq!(
            buckets,
            vec![
                (1.0, 10_000),
                (2.0, 10_000),
                (3.0, 10_000),
                (f64::MAX, 10_000)
            ]
        );
        // 10,000 each of 0.5, 1.5, 2.5, 3.5: all exact in binary, so the sum is too.
        assert_eq!(sum, 80_000.0);
    }
}
