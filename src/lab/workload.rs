//! The lab's seeded workload: for every worker, which target each request goes to and whether
//! a pause follows it. The same seed gives the same workload in every mode.
use std::time::Duration;

/// One request of a worker's plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Index into the flat target list.
    pub target: usize,
    /// Pause after the response.
    pub pause: Duration,
}

/// A small deterministic generator (splitmix64): no dependency, same sequence everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Cumulative Zipf weights over `n` targets: weight of rank k (1-based) is 1 / k^s.
pub fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect()
}

/// Every worker's plan: `workers` lists of `per_worker` steps.
pub fn plan(
    seed: u64,
    workers: usize,
    per_worker: usize,
    targets: usize,
    zipf_s: f64,
    paced_fraction: f64,
    pace: Duration,
) -> Vec<Vec<Step>> {
    let cdf = zipf_cdf(targets, zipf_s);
    (0..workers)
        .map(|w| {
            let mut rng = Rng::new(seed ^ (w as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
            (0..per_worker)
                .map(|_| {
                    let x = rng.unit();
                    let target = cdf.iter().position(|c| x < *c).unwrap_or(targets - 1);
                    let pause = if rng.unit() < paced_fraction {
                        pace
                    } else {
                        Duration::ZERO
                    };
                    Step { target, pause }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_plan_and_another_seed_another() {
        let a = plan(42, 4, 100, 10, 1.0, 0.2, Duration::from_millis(50));
        let b = plan(42, 4, 100, 10, 1.0, 0.2, Duration::from_millis(50));
        let c = plan(43, 4, 100, 10, 1.0, 0.2, Duration::from_millis(50));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a[0], a[1], "workers get different sequences");
    }

    #[test]
    fn popularity_follows_zipf_and_pacing_its_fraction() {
        let p = plan(1, 8, 5000, 5, 1.0, 0.25, Duration::from_millis(10));
        let mut counts = [0usize; 5];
        let mut paced = 0;
        for s in p.iter().flatten() {
            counts[s.target] += 1;
            paced += usize::from(!s.pause.is_zero());
        }
        let n = 8.0 * 5000.0;
        // Weights 1, 1/2, 1/3, 1/4, 1/5 over H5 = 2.2833.
        let expected = [0.438, 0.219, 0.146, 0.109, 0.088];
        for (c, e) in counts.iter().zip(expected) {
            assert!((*c as f64 / n - e).abs() < 0.01, "{counts:?}");
        }
        assert!((paced as f64 / n - 0.25).abs() < 0.01);
        let cdf = zipf_cdf(3, 0.0);
        assert!((cdf[0] - 1.0 / 3.0).abs() < 1e-9, "s = 0 is uniform");
        assert!((cdf[2] - 1.0).abs() < 1e-9);
    }
}
