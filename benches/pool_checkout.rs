//! Pool checkout + return cost with 10, 1,000 and 100,000 keys warm in the pool.
//! Run: `cargo bench --bench pool_checkout`. Each iteration checks out an idle connection of a
//! random warm key (a hit, the hot path) and returns it.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use edgepool::pool::{
    BoxFuture, CheckoutOpts, ConnWatch, Connected, Connector, Hints, NoEvents, Pool, PoolConfig,
    PoolConn, Release,
};

struct Conn(Arc<AtomicBool>);
impl PoolConn for Conn {
    fn share(&self) -> Option<Self> {
        None
    }
    fn is_open(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

struct Fake;
impl Connector for Fake {
    type Key = u64;
    type Conn = Conn;
    type Error = ();
    fn connect(
        &self,
        _key: &u64,
        _watch: ConnWatch<Self>,
    ) -> BoxFuture<Result<Connected<Conn>, ()>> {
        Box::pin(async {
            Ok(Connected {
                conn: Conn(Arc::new(AtomicBool::new(true))),
                multiplexed: false,
                max_streams: Some(1),
            })
        })
    }
    fn may_multiplex(&self, _key: &u64) -> bool {
        false
    }
}

fn opts() -> CheckoutOpts {
    CheckoutOpts {
        deadline: tokio::time::Instant::now() + Duration::from_secs(5),
        fresh: false,
        cold_reason: None,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("pool_checkout_return");
    for keys in [10u64, 1_000, 100_000] {
        let pool = rt.block_on(async {
            let cfg = PoolConfig {
                max_total: 200_000,
                max_idle_total: 200_000,
                idle_timeout: Duration::from_secs(3600),
                ..Default::default()
            };
            let pool = Pool::new(cfg, Fake, Arc::new(NoEvents));
            for k in 0..keys {
                let mut l = pool.checkout(&k, opts()).await.unwrap();
                l.mark_sent();
                l.release(Release::Keep(Hints::default()));
            }
            pool
        });
        // A cheap deterministic key sequence (xorshift) so every key is touched.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        group.bench_with_input(BenchmarkId::from_parameter(keys), &keys, |b, &keys| {
            b.iter(|| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let key = x % keys;
                rt.block_on(async {
                    let mut l = pool.checkout(&key, opts()).await.unwrap();
                    assert!(l.reused());
                    l.mark_sent();
                    l.release(Release::Keep(Hints::default()));
                });
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
