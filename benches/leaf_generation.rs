//! Minting an interception leaf certificate (ECDSA P-256 key, certificate signed by the CA,
//! wrapped in a rustls `ServerConfig`) through the public `LeafCache::server_config` path:
//! a miss (a host never seen: one leaf generated) and a hit (the cached config returned).
//!
//! Run: `cargo bench --bench leaf_generation`. Criterion prints the mean; the median of each
//! case is in `target/criterion/leaf_generation/<case>/new/estimates.json`.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use edgepool::ca::{CertAuthority, LeafCache};

const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

fn leaf_generation(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(CertAuthority::load_or_create(&dir.path().join("data")).unwrap());
    let alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Capacity 1,024: misses evict old hosts, so memory stays flat however many iterations run.
    let cache = LeafCache::new(ca, 1024, WEEK, alpn);
    rt.block_on(cache.server_config("warmup.example")).unwrap();

    let mut group = c.benchmark_group("leaf_generation");
    let next = AtomicU64::new(0);
    group.bench_function("miss", |b| {
        b.iter(|| {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let host = format!("host{i}.example");
            rt.block_on(cache.server_config(&host)).unwrap()
        })
    });
    // The misses above may have evicted any earlier host: put the hit's host in first.
    rt.block_on(cache.server_config("hit.example")).unwrap();
    let before = cache.generated();
    group.bench_function("hit", |b| {
        b.iter(|| rt.block_on(cache.server_config("hit.example")).unwrap())
    });
    // A hit must not mint anything; otherwise the "hit" figure would be another miss.
    assert_eq!(cache.generated(), before, "a cache hit generated a leaf");
    group.finish();
}

criterion_group!(benches, leaf_generation);
criterion_main!(benches);
