//! The reuse lab's smoke run: the `mixed` scenario with `--quick`, every built-in mode, on
//! loopback. Asserts what the lab exists to show: nothing errored, edgepool's R (measured at
//! the origins) beats no-keepalive's and per-worker's and is at least 0.98 × the greedy
//! reference's (docs/BENCHMARKS.md, the target), and the
//! report's numbers agree with each other.
#![cfg(feature = "lab")]
use edgepool::lab::{LabOptions, Mode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_quick_edgepool_beats_the_worker_side_pools() {
    let sc = edgepool::lab::scenario::Scenario::load("mixed").unwrap();
    let opts = LabOptions {
        quick: true,
        modes: vec![Mode::NoKeepalive, Mode::PerWorker, Mode::Edgepool],
        progress: false,
        names: Default::default(),
    };
    let report = edgepool::lab::run(&sc, &opts).await.unwrap();
    eprintln!("{}", edgepool::lab::render_table(&report));
    let modes = report["modes"].as_array().unwrap();
    let by = |name: &str| modes.iter().find(|m| m["mode"] == name).unwrap().clone();
    let expected = (sc.workers * sc.quick_requests_per_worker) as u64;
    for m in modes {
        assert_eq!(m["requests"], expected, "{m:#}");
        assert_eq!(m["errors"], 0, "{}: nothing may fail", m["mode"]);
        assert_eq!(
            m["origin_requests"], expected,
            "{}: the origins answered every request once",
            m["mode"]
        );
    }
    let r = |m: &serde_json::Value| m["reuse_rate"].as_f64().unwrap();
    let (nk, pw, ep) = (by("no-keepalive"), by("per-worker"), by("edgepool"));
    assert_eq!(r(&nk), 0.0, "no keep-alive: a connection per request");
    assert!(
        r(&ep) > r(&pw),
        "edgepool {} vs per-worker {}",
        r(&ep),
        r(&pw)
    );
    // The documented target (docs/BENCHMARKS.md): edgepool R ≥ 0.98 × the greedy reference R.
    // Measured 2026-12-04 (debug, 3 runs while a release build shared the cores): 100.0–100.2 %.
    let reference = ep["reference_reuse_rate"].as_f64().unwrap();
    assert!(
        r(&ep) >= 0.98 * reference,
        "edgepool R {} vs greedy reference {reference}",
        r(&ep)
    );
    assert!(ep["gateway_cpu_seconds"].as_f64().unwrap() > 0.0);
    assert!(nk["gateway_cpu_seconds"].is_null());
    assert!(
        ep["handshake_seconds_paid"].as_f64().unwrap()
            < nk["handshake_seconds_paid"].as_f64().unwrap()
    );
    let reasons = ep["new_by_reason"].as_object().unwrap();
    let total: u64 = reasons.values().map(|v| v.as_u64().unwrap()).sum();
    assert!(total > 0 && reasons.contains_key("cold_key"), "{reasons:?}");
    // What edgepool's /status counted over the run is what the origins counted.
    let g = &ep["gateway_status"];
    assert_eq!(g["requests"], ep["origin_requests"], "{g}");
    assert_eq!(g["new_connections"], ep["origin_connections"], "{g}");
    assert_eq!(
        g["new_connections"].as_u64(),
        Some(total),
        "{g} vs {reasons:?}"
    );
    let html = edgepool::lab::html::render(&report);
    assert!(html.contains("<svg") && html.contains("edgepool") && html.contains("no-keepalive"));
    std::fs::create_dir_all("target").unwrap();
    std::fs::write("target/lab-mixed-quick.html", html).unwrap();
}
