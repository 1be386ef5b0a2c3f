//! Observability end-to-end: `/status` agrees with what origins saw, verdicts follow the SLO,
//! `/metrics` carries phase histograms and bounded labels, `/trace` streams records, and
//! `/status/history` fills.
mod gw;
mod support;

use std::time::Duration;

use gw::{get, TestGateway};
use support::{Origin, OriginConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reuse_rate_matches_what_the_origins_counted() {
    // A lab-like mix: a friendly HTTPS target, one that closes after 7 requests, one that
    // closes idle connections after 300 ms, and an HTTP/2 target.
    let a = Origin::start(OriginConfig {
        tls: true,
        ..Default::default()
    })
    .await;
    let b = Origin::start_with_ca(
        OriginConfig {
            tls: true,
            max_requests_per_conn: Some(7),
            ..Default::default()
        },
        a.ca(),
    )
    .await;
    let c = Origin::start(OriginConfig {
        idle_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let d = Origin::start_with_ca(
        OriginConfig {
            tls: true,
            h2: true,
            max_concurrent_streams: Some(4),
            ..Default::default()
        },
        a.ca(),
    )
    .await;
    let gw = TestGateway::start(std::slice::from_ref(&a.ca().cert_path)).await;
    let mut tasks = Vec::new();
    for w in 0..6 {
        let worker = gw.client();
        let urls: Vec<String> = [&a, &b, &c, &d].iter().map(|o| o.url("/echo")).collect();
        tasks.push(tokio::spawn(async move {
            for i in 0..60 {
                let url = &urls[(w + i) % urls.len()];
                let r = worker.get(url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
                if i % 20 == 19 {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for o in [&a, &b, &c, &d] {
        let row = gw.target_status(&o.authority()).await;
        let origin_r = 1.0 - o.accepted() as f64 / o.requests() as f64;
        let status_r = row["reuse_rate"].as_f64().unwrap();
        assert!(
            (origin_r - status_r).abs() <= 0.005,
            "{}: /status R {status_r} vs origin R {origin_r}",
            o.authority()
        );
        assert_eq!(row["requests"].as_u64().unwrap(), o.requests());
        assert_eq!(row["new_connections"].as_u64().unwrap(), o.accepted());
    }
    // The top reuse killer per target is the one scripted into it.
    let b_row = gw.target_status(&b.authority()).await;
    assert!(b_row["new_by_reason"]["max_requests"].as_u64().unwrap() > 0);
    let c_row = gw.target_status(&c.authority()).await;
    let c_reasons = &c_row["new_by_reason"];
    assert!(
        c_reasons["server_closed_idle"].as_u64().unwrap_or(0)
            + c_reasons["idle_expired"].as_u64().unwrap_or(0)
            > 0,
        "{c_row:#}"
    );
}

#[tokio::test]
async fn verdicts_follow_the_objective_and_breach_sets_the_gauge() {
    let good = Origin::start(OriginConfig::default()).await;
    let bad = Origin::start(OriginConfig {
        max_requests_per_conn: Some(1),
        ..Default::default()
    })
    .await;
    let lenient = bad.authority();
    let gw = TestGateway::start_with(&[], |c| {
        c.slo.targets.insert(lenient.clone(), 0.0);
        c.slo.min_requests = 20;
    })
    .await;
    let bad2 = Origin::start(OriginConfig {
        max_requests_per_conn: Some(2),
        ..Default::default()
    })
    .await;
    // Closes every connection too, but has fewer requests than slo.min_requests.
    let young = Origin::start(OriginConfig {
        max_requests_per_conn: Some(1),
        ..Default::default()
    })
    .await;
    let worker = gw.client();
    for i in 0..20 {
        for o in [&good, &bad, &bad2] {
            get(&worker, &o.url("/echo")).await;
        }
        if i < 19 {
            get(&worker, &young.url("/echo")).await;
        }
    }
    let s = gw.status().await;
    assert_eq!(s["slo"]["reuse_target"], 0.92);
    let verdict = |o: &Origin| {
        s["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["target"] == o.authority())
            .unwrap()["verdict"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(verdict(&good), "optimal", "R = 0.95");
    assert_eq!(verdict(&bad), "optimal", "R = 0 but its objective is 0");
    assert_eq!(verdict(&bad2), "breach", "R = 0.5 against 0.92");
    assert_eq!(
        verdict(&young),
        "warming_up",
        "R = 0 over 19 requests, below slo.min_requests 20: not judged"
    );
    assert_eq!(s["slo"]["min_requests"], 20);
    let m = gw.metrics().await;
    let young_line = format!("edgepool_slo_breach{{target=\"{}\"}} 0", young.authority());
    assert!(m.contains(&young_line), "{m}");
    let breach_line = format!("edgepool_slo_breach{{target=\"{}\"}} 1", bad2.authority());
    assert!(m.contains(&breach_line), "{m}");
    let ok_line = format!("edgepool_slo_breach{{target=\"{}\"}} 0", good.authority());
    assert!(m.contains(&ok_line));
}

#[tokio::test]
async fn metrics_carry_phase_histograms_bytes_and_saved_handshakes() {
    let o = Origin::start(OriginConfig {
        tls: true,
        ..Default::default()
    })
    .await;
    let gw = TestGateway::start(std::slice::from_ref(&o.ca().cert_path)).await;
    let worker = gw.client();
    for _ in 0..10 {
        let r = worker.get(o.url("/bytes/1000")).send().await.unwrap();
        r.bytes().await.unwrap();
    }
    worker
        .post(o.url("/echo"))
        .body("12345")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let m = gw.metrics().await;
    for phase in [
        "dns",
        "queue",
        "tcp_connect",
        "tls_handshake",
        "ttfb",
        "total",
    ] {
        let line = format!("edgepool_phase_seconds_count{{phase=\"{phase}\"}}");
        assert!(m.contains(&line), "missing {line}");
    }
    assert!(m.contains("edgepool_phase_seconds_count{phase=\"tls_handshake\"} 1"));
    assert!(
        m.contains("edgepool_phase_seconds_count{phase=\"total\"} 11"),
        "{m}"
    );
    assert!(m.contains("edgepool_bytes_total{direction=\"up\"} 5"));
    assert!(m.contains("edgepool_bytes_total{direction=\"down\"}"));
    let row = gw.target_status(&o.authority()).await;
    let paid = row["handshake_seconds"].as_f64().unwrap();
    let saved = row["handshake_saved_seconds"].as_f64().unwrap();
    assert!(paid > 0.0);
    // 10 reused requests, each saving the one measured handshake.
    assert!(
        (saved - 10.0 * paid).abs() < 0.001 + paid * 0.01,
        "paid {paid} saved {saved}"
    );
    assert!(m.contains("edgepool_handshake_saved_seconds_total"));
    assert!(row["tls_overhead_saved_hours_per_day"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_streams_new_connections_and_errors_with_phase_timings() {
    let o = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start_with(&[], |c| c.trace.sample_rate = 0.0).await;
    let admin = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut stream = admin
        .get(format!("http://{}/trace?target=127.0.0.1", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.headers()["content-type"], "application/x-ndjson");
    let worker = gw.client();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..5 {
        get(&worker, &o.url("/echo")).await;
    }
    // A refused target is an error record (always traced).
    let r = worker.get("http://127.0.0.1:1/").send().await.unwrap();
    assert_eq!(r.status(), 502);
    let mut lines = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut buf = String::new();
    while lines.len() < 2 && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), stream.chunk()).await {
            Ok(Ok(Some(c))) => {
                buf.push_str(&String::from_utf8_lossy(&c));
                while let Some(i) = buf.find('\n') {
                    lines.push(serde_json::from_str::<serde_json::Value>(&buf[..i]).unwrap());
                    buf.drain(..=i);
                }
            }
            _ => continue,
        }
    }
    assert_eq!(
        lines.len(),
        2,
        "sample_rate 0: only the new connection and the error: {lines:?}"
    );
    let first = &lines[0];
    assert_eq!(first["kind"], "request");
    assert_eq!(first["reused"], false);
    assert_eq!(first["new_reason"], "cold_key");
    assert_eq!(first["pool"], "connection added");
    assert_eq!(first["status"], 200);
    for k in ["tcp_connect_ms", "ttfb_ms", "total_ms", "dns_ms"] {
        assert!(first[k].as_f64().is_some(), "{k} in {first}");
    }
    assert_eq!(lines[1]["error"], "upstream_connect_failed");
}

#[tokio::test]
async fn history_fills_once_per_interval() {
    let o = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start(&[]).await;
    let worker = gw.client();
    for _ in 0..4 {
        get(&worker, &o.url("/echo")).await;
    }
    let mut points = Vec::new();
    for _ in 0..70 {
        let h: serde_json::Value = gw.admin_get("/status/history").await.json().await.unwrap();
        assert_eq!(h["interval_seconds"], 5);
        points = h["points"].as_array().unwrap().clone();
        if !points.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!points.is_empty(), "a point within one interval");
    assert_eq!(points[0]["requests"], 4);
    assert_eq!(points[0]["new_connections"], 1);
    assert_eq!(points[0]["reuse_rate"], 0.75);
    // An interval without requests has no R (null), not a perfect one.
}

#[tokio::test]
async fn status_lists_the_busiest_targets_and_counts_the_rest() {
    let origins = [
        Origin::start(OriginConfig::default()).await,
        Origin::start(OriginConfig::default()).await,
        Origin::start(OriginConfig::default()).await,
    ];
    let gw = TestGateway::start(&[]).await;
    let worker = gw.client();
    // 3, 2 and 1 requests: the ranking is by requests.
    for (i, o) in origins.iter().enumerate() {
        for _ in 0..(3 - i) {
            get(&worker, &o.url("/echo")).await;
        }
    }
    let all = gw.status().await;
    assert_eq!(all["targets"].as_array().unwrap().len(), 3);
    assert_eq!(
        (
            all["targets_total"].as_u64(),
            all["targets_omitted"].as_u64()
        ),
        (Some(3), Some(0))
    );
    let top: serde_json::Value = gw
        .admin_get("/status?targets=1")
        .await
        .json()
        .await
        .unwrap();
    let rows = top["targets"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["target"], origins[0].authority());
    assert_eq!(
        (
            top["targets_total"].as_u64(),
            top["targets_omitted"].as_u64()
        ),
        (Some(3), Some(2))
    );
    assert_eq!(
        top["fleet"]["requests"], 6,
        "the fleet row counts the omitted rows too"
    );
    let every: serde_json::Value = gw
        .admin_get("/status?targets=all")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(every["targets"].as_array().unwrap().len(), 3);
    assert_eq!(gw.admin_get("/status?targets=many").await.status(), 400);
}

async fn report(gw: &TestGateway, window: &str) -> serde_json::Value {
    gw.admin_get(&format!("/report?window={window}"))
        .await
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn reuse_killers_report_ranks_the_scripted_reason_first_and_survives_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_path_buf();
    // Scenario 1: a target that closes after 3 requests → max_requests dominates.
    let limited = Origin::start(OriginConfig {
        max_requests_per_conn: Some(3),
        ..Default::default()
    })
    .await;
    let d = dir.clone();
    let gw = TestGateway::start_with(&[], move |c| c.data_dir = Some(d)).await;
    let worker = gw.client();
    for _ in 0..30 {
        get(&worker, &limited.url("/echo")).await;
    }
    let r = report(&gw, "1h").await;
    assert_eq!(r["sample_requests"], 30);
    assert_eq!(r["new_reasons"][0]["reason"], "max_requests", "{r:#}");
    assert_eq!(r["new_reasons"][0]["rank"], 1);
    assert_eq!(r["close_reasons"][0]["reason"], "max_requests");
    gw.stop().await;

    // Restart on the same data dir: the counts are still there.
    let d = dir.clone();
    let gw = TestGateway::start_with(&[], move |c| c.data_dir = Some(d)).await;
    let r = report(&gw, "1h").await;
    assert_eq!(r["sample_requests"], 30, "counts survive a restart");

    // Scenario 2: a target that closes idle connections after 200 ms, with paced traffic.
    let idle = Origin::start(OriginConfig {
        idle_timeout: Some(std::time::Duration::from_millis(200)),
        ..Default::default()
    })
    .await;
    let worker = gw.client();
    for _ in 0..12 {
        get(&worker, &idle.url("/echo")).await;
        tokio::time::sleep(std::time::Duration::from_millis(350)).await;
    }
    let r = report(&gw, "1h").await;
    let top = r["new_reasons"][0]["reason"].as_str().unwrap().to_string();
    assert!(
        top == "server_closed_idle" || top == "idle_expired",
        "idle closes rank first: {r:#}"
    );
    let bad = gw.admin_get("/report?window=soon").await;
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn nearly_exhausted_ephemeral_ports_hold_the_dial_then_answer_503() {
    let o = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start_with(&[], |c| {
        c.upstream.connect_timeout = std::time::Duration::from_millis(600)
    })
    .await;
    if !gw.gw.ports().budget().known {
        support::skip("no /proc port data (ip_local_port_range, tcp sockets) on this OS");
        return;
    }
    let range = gw.gw.ports().budget().range_size;
    gw.gw.ports().set_in_use_for_test(Some(range / 100 * 95));
    let t = std::time::Instant::now();
    let r = gw.client().get(o.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-edgepool-error"], "ephemeral_ports_exhausted");
    assert!(r.headers().contains_key("retry-after"));
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(500),
        "the dial was held first"
    );
    assert_eq!(o.accepted(), 0);
    gw.gw.ports().set_in_use_for_test(None);
    let r = gw.client().get(o.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let s = gw.status().await;
    assert!(s["ports"]["range_size"].as_u64().unwrap() > 0);
    assert!(gw
        .metrics()
        .await
        .contains("edgepool_ephemeral_ports_used_ratio"));
}
