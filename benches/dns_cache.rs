//! The DNS stage of a pool hit (issue 11: ≤ 5 µs p50): what a request for a name edgepool
//! already knows pays before checkout. Measured through the real resolver path — a name
//! answered once by the lab's DNS server on loopback, then served from the cache — and as the
//! forwarder runs it (resolve, target-policy and loop checks, candidate list). Also a name from
//! the hosts file and an IP literal, for comparison.
//!
//! Run: `cargo bench --bench dns_cache`. Criterion prints the mean; the median (p50) of each
//! is in `target/criterion/dns_stage/<name>/new/estimates.json` (`median.point_estimate`, ns),
//! which `bench/dns_p50.sh` prints as a table.
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use edgepool::config::Config;
use edgepool::dns::{Resolver, Source};
use edgepool::guard::TargetPolicy;
use edgepool::lab::dns::LabDns;

fn dns_stage(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 listed.bench.test\n").unwrap();
    let zone: HashMap<String, Vec<IpAddr>> = [(
        "warm.bench.test".to_string(),
        vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()],
    )]
    .into();
    // TTL 300 s: the cache stays fresh for the whole run (a refresh-ahead never blocks anyway).
    let dns = rt.block_on(LabDns::start(LabDns::zone(zone, 300))).unwrap();

    let mut cfg = Config::default();
    cfg.targets.allow = vec!["127.0.0.0/8".parse().unwrap()];
    cfg.upstream.dns_servers = vec![dns.addr()];
    cfg.upstream.hosts_file = hosts.clone();
    cfg.data_dir = Some(dir.path().join("data"));

    // The resolver alone.
    let resolver = Resolver::new(
        cfg.dns(),
        TargetPolicy::new(cfg.targets.allow.clone()),
        &mut prometheus_client::registry::Registry::default(),
    );
    let first = rt.block_on(resolver.resolve("warm.bench.test")).unwrap();
    assert_eq!(
        first.source,
        Source::Lookup,
        "the first request waits for the lookup"
    );
    let warm = rt.block_on(resolver.resolve("warm.bench.test")).unwrap();
    assert_eq!(warm.source, Source::Fresh, "then it is a cache hit");

    // The forwarder's DNS stage, in a real gateway.
    let gw = rt
        .block_on(async { edgepool::gateway::Gateway::new(cfg) })
        .unwrap();
    let fwd = gw.forwarder();
    rt.block_on(fwd.resolve_checked("warm.bench.test", 443))
        .unwrap();

    let mut g = c.benchmark_group("dns_stage");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("resolver_cache_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { resolver.resolve("warm.bench.test").await.unwrap() })
    });
    g.bench_function("forwarder_pool_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { fwd.resolve_checked("warm.bench.test", 443).await.unwrap() })
    });
    g.bench_function("hosts_file", |b| {
        b.to_async(&rt)
            .iter(|| async { fwd.resolve_checked("listed.bench.test", 443).await.unwrap() })
    });
    g.bench_function("ip_literal", |b| {
        b.to_async(&rt)
            .iter(|| async { fwd.resolve_checked("127.0.0.1", 443).await.unwrap() })
    });
    g.finish();
    assert_eq!(
        dns.queries("warm.bench.test", edgepool::lab::dns::QType::A),
        2,
        "one lookup per resolver (the bare one and the gateway's); every other call was a hit"
    );
}

criterion_group!(benches, dns_stage);
criterion_main!(benches);
