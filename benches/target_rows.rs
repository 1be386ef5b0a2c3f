//! Accounting memory per target when a crawl touches many distinct targets (issue 14 item 3):
//! `Telemetry` records one request with a new connection for each of `TARGET_ROWS_N` distinct
//! names (default 1,000,000), once with the default `slo.max_targets` (2,000) and once unbounded,
//! and prints the process RSS growth per name, the rows kept, and how long `/metrics`'
//! encoding and the fleet totals take at the end.
//!
//! Run: `cargo bench --bench target_rows`. Env: `TARGET_ROWS_N`.
use std::time::{Duration, Instant};

use edgepool::config::{ExitsConfig, SloConfig};
use edgepool::exits::Exits;
use edgepool::pool::{NewReason, PoolStats};
use edgepool::telemetry::{RequestRecord, Telemetry};

fn rss_kib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

fn run(label: &str, max_targets: usize, n: usize, exits: &Exits) {
    let slo = SloConfig {
        max_targets,
        ..Default::default()
    };
    let before = rss_kib();
    let t = Telemetry::new(slo, Default::default());
    #[allow(clippy::disallowed_methods)] // a benchmark timer, no runtime
    let started = Instant::now();
    for i in 0..n {
        let target = format!("host-{i}.crawl.example:443");
        t.record_request(&RequestRecord {
            target: &target,
            reused: false,
            protocol: "http/1.1",
            handshake: Some(Duration::from_millis(40)),
            retry_reason: None,
            new_reason: Some(NewReason::ColdKey),
            dns: Duration::from_millis(1),
            queue: Duration::ZERO,
            bytes_up: 0,
            exit: exits.direct(),
            forced: false,
            via_proxy: false,
        });
    }
    let record = started.elapsed();
    let after = rss_kib();
    #[allow(clippy::disallowed_methods)] // a benchmark timer, no runtime
    let t0 = Instant::now();
    let text = t.encode(PoolStats::default());
    let encode = t0.elapsed();
    #[allow(clippy::disallowed_methods)] // a benchmark timer, no runtime
    let t0 = Instant::now();
    let totals = t.totals();
    let totals_took = t0.elapsed();
    assert_eq!(
        totals.requests, n as u64,
        "every request is in the fleet totals"
    );
    println!(
        "{label:<22} names {n:>9}  rows kept {:>9}  RSS +{:>9.1} MiB ({:>6.0} B/name)  record {:>6.0} ns/req  /metrics {:>7.1} KiB in {:>7.2} ms  totals in {:>7.2} ms",
        t.targets().len(),
        (after - before) / 1024.0,
        (after - before) * 1024.0 / n as f64,
        record.as_nanos() as f64 / n as f64,
        text.len() as f64 / 1024.0,
        encode.as_secs_f64() * 1e3,
        totals_took.as_secs_f64() * 1e3,
    );
}

fn main() {
    let n: usize = std::env::var("TARGET_ROWS_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let exits = Exits::new(&[], None, ExitsConfig::default().settings()).expect("direct exits");
    run(
        "bounded (default)",
        SloConfig::default().max_targets,
        n,
        &exits,
    );
    run("unbounded", usize::MAX, n, &exits);
}
