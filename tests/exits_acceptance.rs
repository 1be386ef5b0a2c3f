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
//! pair onto it), so `oracle R = 1 − distinct (target, exit) pairs / requests`, where the pairs
//! are counted at the origins (each exit connects from its own loopback address). Killing an
//! exit moves its targets to other exits: those new pairs are in the oracle too, because no
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
    exits[KILLED].kill();
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
    let oracle = 1.0 - pairs.len() as f64 / requests as f64;
    let status = gw.status().await;
    let fleet_r = status["fleet"]["reuse_rate"].as_f64().unwrap();
    eprintln!(
        "exits acceptance: {requests} requests in {elapsed:.1?} ({:.0} req/s), {accepted} connections at the origins, \
         R {r:.4}, oracle R {oracle:.4} ({} target×exit pairs), /status R {fleet_r:.4}, killed exit tunnels {}",
        requests as f64 / elapsed.as_secs_f64(),
        pairs.len(),
        exits[KILLED].tunnels(),
    );
    assert!(r >= 0.95, "R {r:.4} below 0.95");
    assert!(
        r >= oracle - 0.01,
        "R {r:.4} not within 1 point of the oracle {oracle:.4}"
    );
    assert!(
        (fleet_r - r).abs() <= 0.005,
        "/status R {fleet_r} vs origin R {r}"
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
    assert!(
        k["last_error"].as_str().unwrap_or("").contains("connect"),
        "{k:#}"
    );
    gw.stop().await;
}
