//! Pool checkout + return cost with 10, 1,000 and 100,000 keys warm in the pool.
//! Run: `cargo bench --bench pool_checkout`. Each iteration checks out an idle connection of a
//! random warm key (a hit, the hot path) and returns it.
//!
//! `POOL_CHECKOUT_CLOCK=thread-cpu` times the benchmark thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`) instead of wall time: on a machine shared with other work, the
//! time the thread spends descheduled is then not counted (caches shared with other processes
//! still are). The work measured is the same.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BenchmarkId, Criterion};
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

/// The calling thread's CPU time.
struct ThreadCpu;

fn thread_cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_THREAD_CPUTIME_ID");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

static WALL: WallTime = WallTime;

impl Measurement for ThreadCpu {
    type Intermediate = Duration;
    type Value = Duration;
    fn start(&self) -> Duration {
        thread_cpu_now()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu_now().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        WALL.formatter()
    }
}

fn bench<M: Measurement>(c: &mut Criterion<M>) {
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

fn main() {
    if std::env::var("POOL_CHECKOUT_CLOCK").as_deref() == Ok("thread-cpu") {
        let mut c = Criterion::default()
            .with_measurement(ThreadCpu)
            .configure_from_args();
        bench(&mut c);
        c.final_summary();
    } else {
        let mut c = Criterion::default().configure_from_args();
        bench(&mut c);
        c.final_summary();
    }
}
