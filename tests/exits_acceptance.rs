//! Acceptance load through exits: 8 HTTP CONNECT exits, 16 concurrent workers, 20 HTTPS (h2)
//! targets with Zipf-like popularity, the default sticky window; one exit is killed a third of
//! the way through.
//!
//! `cargo test --test exits_acceptance` runs 16 × 500 GETs (quick). The figure,
//! 16 × 4,000, runs with `EDGEPOOL_ACCEPT_FULL=1 cargo test --release --test exits_acceptance
//! -- --nocapture`.
//!
//! The best any pool can do under the rotation policy: every (target, exit) pair that carried
//! traffic needs at least one connection (HTTP/2 multiplexes every concurrent request of a
//! pair onto it), so `R at the minimum = 1 − distinct (target, exit) pairs / requests`, where the pairs
//! are counted at the origins (each exit connects from its own loopback address). Killing an
//! exit moves its targets to other exits: those new pairs are in the minimum too, because no
//! pool can keep using a dead exit.
mod gw;
mod support;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use edgepool::config::ExitPoolConfig;
use gw::TestGateway;
use support::exits::{FakeExit, FakeExitConfig};
use support::{Origin, OriginConfig, TestCa};

const WORKERS: usize = 16;
const TARGETS: usize = 20;
const EXITS: usize = 8;
const KILLED: usize = 3;

/// Target index for draw `x` in [0, 1): weight of target i is 1/(i+1).
fn zipf(x: f64) -> usize {
    let total: f64 = (1..=TARGETS).map(|i| 1.0 / i as f64).sum();
    let mut acc = 0.0;
    for i in 0..TARGETS {
        acc += 1.0 / (i + 1) as f64 / total;
        if x < acc {
            return i;
        }
    }
    TARGETS - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn eight_exits_sixteen_workers_twenty_targets_one_exit_killed() {
    let per_worker: usize = if std::env::var("EDGEPOOL_ACCEPT_FULL").is_ok() {
        4000
    } else {
        500
    };
    let ca = TestCa::new();
    let mut origins = Vec::new();
    for _ in 0..TARGETS {
        let cfg = OriginConfig {
            tls: true,
            h2: true,
            max_concurrent_streams: Some(100),
            ..Default::default()
        };
        origins.push(Origin::start_with_ca(cfg, &ca).await);
    }
    let mut exits = Vec::new();
    for i in 0..EXITS {
        let mut c = FakeExitConfig::http(Ipv4Addr::new(127, 0, 1, 10 + i as u8));
        c.credentials = Some((format!("u{i}"), format!("p{i}")));
        exits.push(Arc::new(FakeExit::start(c).await));
    }
    let pool = ExitPoolConfig {
        name: "dc".into(),
        nodes: exits.iter().map(|e| e.url()).collect(),
        session_template: None,
        max_connections_per_node: None,
    };
    let gw = TestGateway::start_with(std::slice::from_ref(&ca.cert_path), |c| {
        c.exits.pools.push(pool);
    })
    .await;
    let urls: Arc<Vec<String>> = Arc::new(origins.iter().map(|o| o.url("/bytes/512")).collect());
    let done = Arc::new(AtomicU64::new(0));
    let total = (WORKERS * per_worker) as u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let worker = gw.client();
        let urls = urls.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9e37_79b9_u64.wrapping_mul(w as u64 + 1);
            let mut failures = Vec::new();
            for _ in 0..per_worker {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let t = zipf((seed >> 11) as f64 / (1u64 << 53) as f64);
                match worker.get(&urls[t]).send().await {
                    Ok(r) => {
                        let status = r.status();
                        let err = r
                            .headers()
                            .get("x-edgepool-error")
                            .map(|v| v.to_str().unwrap().to_string());
                        let body = r.bytes().await;
                        match body {
                            Ok(b) if status == 200 && b.len() == 512 => {}
                            Ok(b) => failures.push(format!("{status} {err:?} {}", b.len())),
                            Err(e) => failures.push(format!("body: {e}")),
                        }
                    }
                    Err(e) => failures.push(format!("transport: {e}")),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    // Kill one exit a third of the way through.
    while done.load(Ordering::Relaxed) < total / 3 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let killed_ip = exits[KILLED].config().bind_ip;
    let from_killed = |origins: &[Origin]| -> usize {
        origins
            .iter()
            .map(|o| o.log().iter().filter(|r| r.peer.ip() == killed_ip).count())
            .sum()
    };
    exits[KILLED].kill();
    // The kill instant: what the killed exit had accepted and tunnelled, and how many requests
    // the origins had received through it.
    let killed_at_kill = (exits[KILLED].connections(), exits[KILLED].tunnels());
    let via_killed_at_kill = from_killed(&origins);
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    assert!(
        failures.is_empty(),
        "lost requests: {} e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // Reuse measured at the origins.
    let requests: u64 = origins.iter().map(|o| o.requests()).sum();
    let accepted: u64 = origins.iter().map(|o| o.accepted()).sum();
    let mut pairs = HashSet::new();
    for (i, o) in origins.iter().enumerate() {
        for rec in o.log() {
            pairs.insert((i, rec.peer.ip()));
        }
    }
    assert!(
        requests >= total,
        "the origins saw every request ({requests} < {total})"
    );
    let r = 1.0 - accepted as f64 / requests as f64;
    let at_minimum = 1.0 - pairs.len() as f64 / requests as f64;
    let status = gw.status().await;
    let fleet_r = status["fleet"]["reuse_rate"].as_f64().unwrap();
    eprintln!(
        "exits acceptance: {requests} requests in {elapsed:.1?} ({:.0} req/s), {accepted} connections at the origins, \
         R {r:.4}, R at the minimum {at_minimum:.4} ({} target×exit pairs), /status R {fleet_r:.4} ({} new connections), \
         killed exit tunnels {}, requests via the killed exit at the kill {via_killed_at_kill} / at the end {}",
        requests as f64 / elapsed.as_secs_f64(),
        pairs.len(),
        status["fleet"]["new_connections"],
        exits[KILLED].tunnels(),
        from_killed(&origins),
    );
    // Connections, counted at the origins. The minimum any pool needs is one per (target, exit)
    // pair that carried traffic (HTTP/2 multiplexes all of a pair's concurrent requests), so
    // fewer than `pairs` means the counting is broken, not that the pool is clever.
    // Margin: EXTRA_CONNECTIONS over that minimum. Measured (debug, 16 × 500, 2026-12-04):
    // 24/23, 23/23, 22/22 and 23/22 connections/pairs; release 16 × 4,000: 23/23 and 23/22
    // (2026-11-23), 23/23 twice (2026-12-04; docs/BENCHMARKS.md). The odd extra connection is
    // most likely the kill (retries of the cut requests racing into a new pair); it was not
    // traced further. 2026-12-04, the whole `cargo test` run loading both cores: 26/22 once
    // (three runs of this test alone right after: within 3). 5 leaves room for that and still
    // fails a pool that dials one connection per worker for a hot pair (16 workers) or
    // re-dials after idling. The old bound (R within 1 point of R at the minimum) allowed
    // pairs + 80 at 8,000 requests, 4.5 times the minimum.
    const EXTRA_CONNECTIONS: u64 = 5;
    let pairs_n = pairs.len() as u64;
    assert!(
        accepted >= pairs_n,
        "{accepted} connections at the origins for {pairs_n} (target, exit) pairs: impossible, \
         the origins' counts are broken"
    );
    assert!(
        accepted <= pairs_n + EXTRA_CONNECTIONS,
        "{accepted} connections for {pairs_n} (target, exit) pairs (minimum {pairs_n}, allowed \
         {})",
        pairs_n + EXTRA_CONNECTIONS
    );
    // /status must have counted the same traffic: non-zero, and the same connections.
    let status_requests = status["fleet"]["requests"].as_u64().unwrap();
    let status_new = status["fleet"]["new_connections"].as_u64().unwrap();
    assert!(
        status_requests >= total && status_new > 0,
        "/status counted {status_requests} requests and {status_new} connections"
    );
    assert!(
        status_new.abs_diff(accepted) <= EXTRA_CONNECTIONS,
        "/status counted {status_new} new connections, the origins accepted {accepted}"
    );
    assert!(
        (fleet_r - r).abs() <= 0.001,
        "/status R {fleet_r} vs origin R {r}"
    );

    // The killed exit carried nothing after the kill: it accepted no connection and opened no
    // tunnel, and the origins received at most one request per worker through it after the
    // kill instant (each worker has one request in flight; one that had crossed the exit
    // before the kill may reach the origin's log after it, then be retried elsewhere).
    assert_eq!(
        (exits[KILLED].connections(), exits[KILLED].tunnels()),
        killed_at_kill,
        "the killed exit accepted connections or opened tunnels after the kill"
    );
    let via_killed_end = from_killed(&origins);
    assert!(
        via_killed_at_kill > 0,
        "the killed exit carried nothing before the kill: the kill tested nothing"
    );
    assert!(
        via_killed_end - via_killed_at_kill <= WORKERS,
        "the origins received {} requests through the killed exit after the kill (at most {} \
         were in flight)",
        via_killed_end - via_killed_at_kill,
        WORKERS
    );

    // The killed exit carried traffic before it died and none after: its targets moved.
    let killed = format!("dc/{}", KILLED + 1);
    let row = |s: &serde_json::Value| {
        s["exits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["exit"] == killed.as_str())
            .cloned()
            .unwrap()
    };
    let k = row(&status);
    assert!(k["requests"].as_u64().unwrap() > 0, "{k:#}");
    let other_requests: u64 = status["exits"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["exit"] != killed.as_str())
        .map(|e| e["requests"].as_u64().unwrap())
        .sum();
    assert!(other_requests > k["requests"].as_u64().unwrap());
    // New sticky windows prefer the least-loaded exit — the dead one — until its circuit
    // opens; none of them fails, and /status then shows it open.
    let worker = gw.client();
    for i in 0..10 {
        let fresh = Origin::start_with_ca(
            OriginConfig {
                tls: true,
                ..Default::default()
            },
            &ca,
        )
        .await;
        let r = worker
            .get(fresh.url(&format!("/n{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_ne!(r.headers()["x-edgepool-exit"].to_str().unwrap(), killed);
        r.bytes().await.unwrap();
        if row(&gw.status().await)["state"] == "open" {
            break;
        }
    }
    let k = row(&gw.status().await);
    assert_eq!(k["state"], "open", "{k:#}");
    assert_eq!(
        (exits[KILLED].connections(), exits[KILLED].tunnels()),
        killed_at_kill,
        "the killed exit accepted connections or opened tunnels after the kill"
    );
    assert_eq!(
        from_killed(&origins),
        via_killed_end,
        "requests reached the origins through the killed exit after the run"
    );
    assert!(
        k["last_error"].as_str().unwrap_or("").contains("connect"),
        "{k:#}"
    );
    gw.stop().await;
}
