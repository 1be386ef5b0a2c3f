//! One definition per figure (README, "Reuse accounting"): on one mixed run — 16 concurrent
//! workers, plain and intercepted HTTPS (HTTP/1.1 and HTTP/2), names from a hosts file and IP
//! literals, origins that close connections, upstream failures and CONNECT-time refusals —
//! every surface reports the same requests, new connections, R and errors: `/status` (fleet,
//! target rows, exits, pools), `/metrics`, `/report`, the `edgepool status` CLI, and what the
//! origins themselves counted.
mod gw;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use gw::TestGateway;
use support::{Origin, OriginConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WORKERS: usize = 16;
const REQUESTS_PER_WORKER: usize = 50;

/// Sum of every sample of `name` (all label sets) in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if let Some(labelled) = rest.strip_prefix('{') {
                labelled.split_once("} ")?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn sum_rows(rows: &serde_json::Value, field: &str) -> u64 {
    rows.as_array().unwrap().iter().map(|r| u(&r[field])).sum()
}

/// A CONNECT the gateway must refuse before routing (a link-local, metadata-service address:
/// refused by the target policy, never dialled). Returns the response head.
async fn refused_connect(proxy: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"CONNECT 169.254.169.254:443 HTTP/1.1\r\nHost: 169.254.169.254:443\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = 0;
    while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf[got..]).await.unwrap();
        assert!(n > 0, "the gateway closed without answering the CONNECT");
        got += n;
    }
    String::from_utf8_lossy(&buf[..got]).to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_surface_reports_the_same_figures_and_r_matches_the_origins() {
    // Origins: each behaves differently, so every reason for a new connection shows up.
    let plain = Origin::start(OriginConfig::default()).await;
    let named = Origin::start(OriginConfig::default()).await;
    let closes = Origin::start(OriginConfig {
        max_requests_per_conn: Some(5),
        ..Default::default()
    })
    .await;
    let tls_h1 = Origin::start(OriginConfig {
        tls: true,
        idle_timeout: Some(Duration::from_millis(150)),
        ..Default::default()
    })
    .await;
    let tls_h2 = Origin::start(OriginConfig {
        tls: true,
        h2: true,
        ..Default::default()
    })
    .await;
    let origins = [&plain, &named, &closes, &tls_h1, &tls_h2];

    let hosts = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(hosts.path(), "127.0.0.1 shop.figures.test\n").unwrap();
    let cas = [tls_h1.ca().cert_path.clone(), tls_h2.ca().cert_path.clone()];
    let hosts_path = hosts.path().to_path_buf();
    let gw = TestGateway::start_with(&cas, move |cfg| {
        cfg.upstream.hosts_file = hosts_path;
    })
    .await;

    let urls: Vec<String> = vec![
        plain.url("/echo"),
        format!("http://shop.figures.test:{}/echo", named.port()),
        closes.url("/echo"),
        tls_h1.url("/echo"),
        tls_h2.url("/echo"),
    ];

    // 16 workers, each its own client (its own connections to edgepool), in parallel.
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let client = gw.client();
        let urls = urls.clone();
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 + 1);
            let mut ok = 0u64;
            for _ in 0..REQUESTS_PER_WORKER {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let url = &urls[(seed % urls.len() as u64) as usize];
                let r = client.get(url).send().await.unwrap();
                let status = r.status();
                r.bytes().await.unwrap();
                assert_eq!(status, 200, "{url}");
                ok += 1;
                tokio::time::sleep(Duration::from_millis(seed % 25)).await;
            }
            ok
        }));
    }
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap();
    }
    assert_eq!(answered, (WORKERS * REQUESTS_PER_WORKER) as u64);

    // Errors: three refusals at CONNECT time (no target row), two upstream failures (a
    // closed port: counted for that target).
    for _ in 0..3 {
        let head = refused_connect(gw.proxy).await;
        assert!(
            head.starts_with("http/1.1 400") && head.contains("x-edgepool-error: target_forbidden"),
            "{head}"
        );
    }
    let dead = format!("http://127.0.0.1:{}/", support::free_port());
    let worker = gw.client();
    for _ in 0..2 {
        let r = worker.get(&dead).send().await.unwrap();
        assert_eq!(r.status(), 502);
        r.bytes().await.unwrap();
    }

    // --- /status ---
    let s = gw.status().await;
    let fleet = &s["fleet"];
    let requests = u(&fleet["requests"]);
    let new = u(&fleet["new_connections"]);
    let errors = u(&fleet["errors"]);
    eprintln!(
        "fleet: {requests} requests, {new} new, R {}, {errors} errors",
        fleet["reuse_rate"]
    );
    assert_eq!(
        sum_rows(&s["targets"], "requests"),
        requests,
        "targets vs fleet"
    );
    assert_eq!(
        sum_rows(&s["targets"], "new_connections"),
        new,
        "targets vs fleet"
    );
    assert_eq!(
        sum_rows(&s["exits"], "requests"),
        requests,
        "exits vs fleet"
    );
    assert_eq!(
        sum_rows(&s["exits"], "new_connections"),
        new,
        "exits vs fleet"
    );
    assert_eq!(
        sum_rows(&s["pools"], "requests"),
        requests,
        "pools vs fleet"
    );
    assert_eq!(
        sum_rows(&s["pools"], "new_connections"),
        new,
        "pools vs fleet"
    );
    let by_reason: u64 = fleet["new_by_reason"]
        .as_object()
        .unwrap()
        .values()
        .map(u)
        .sum();
    assert_eq!(
        by_reason, new,
        "every new connection has exactly one reason"
    );
    assert_eq!(errors, 5, "3 CONNECT-time refusals + 2 upstream failures");
    assert_eq!(
        sum_rows(&s["targets"], "errors"),
        2,
        "only routed errors have a row"
    );
    // Each origin's own row: its requests and the connections it accepted.
    let rows: BTreeMap<String, &serde_json::Value> = s["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["target"].as_str().unwrap().to_string(), t))
        .collect();
    for (o, name) in origins.iter().zip([
        plain.authority(),
        format!("shop.figures.test:{}", named.port()),
        closes.authority(),
        tls_h1.authority(),
        tls_h2.authority(),
    ]) {
        let row = rows
            .get(&name)
            .unwrap_or_else(|| panic!("no row {name}: {s:#}"));
        assert_eq!(u(&row["requests"]), o.requests(), "{name}: requests");
        assert_eq!(
            u(&row["new_connections"]),
            o.accepted(),
            "{name}: new connections = connections the origin accepted"
        );
    }

    // --- the origins: R counted where the connections land ---
    let origin_requests: u64 = origins.iter().map(|o| o.requests()).sum();
    let origin_conns: u64 = origins.iter().map(|o| o.accepted()).sum();
    let origin_r = 1.0 - origin_conns as f64 / origin_requests as f64;
    let status_r = fleet["reuse_rate"].as_f64().unwrap();
    eprintln!("origins: {origin_requests} requests, {origin_conns} connections, R {origin_r:.4}");
    assert_eq!(requests, origin_requests);
    assert_eq!(new, origin_conns);
    assert!(
        (status_r - origin_r).abs() <= 0.005,
        "R /status {status_r} vs origins {origin_r:.4}"
    );
    // The run exercised reuse and more than one reason (else agreement proves little).
    assert!(new >= 6 && new < requests / 4, "{new} new for {requests}");
    assert!(
        fleet["new_by_reason"].as_object().unwrap().len() >= 2,
        "{fleet}"
    );

    // --- /metrics ---
    let m = gw.metrics().await;
    assert_eq!(metric_sum(&m, "edgepool_requests_total") as u64, requests);
    assert_eq!(
        metric_sum(&m, "edgepool_exit_requests_total") as u64,
        requests
    );
    assert_eq!(
        metric_sum(&m, "edgepool_upstream_connections_opened_total") as u64,
        new
    );
    assert_eq!(
        metric_sum(&m, "edgepool_exit_connections_opened_total") as u64,
        new
    );
    assert_eq!(metric_sum(&m, "edgepool_errors_total") as u64, errors);
    // Both TLS origins are `localhost`: one leaf made, every later CONNECT's lookup a hit.
    let leaf = |result: &str| {
        support::metric(
            &m,
            &format!("edgepool_leaf_cache_lookups_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!((leaf("miss"), leaf("expired")), (1.0, 0.0), "{m}");
    assert!(
        leaf("hit") >= 1.0,
        "two TLS origins, two CONNECTs at least: {m}"
    );
    assert_eq!(support::metric(&m, "edgepool_leaf_cache_hosts"), 1.0);
    let fleet_ratio = support::metric(&m, "edgepool_reuse_ratio{target=\"*\"}");
    assert!(
        (fleet_ratio - status_r).abs() < 1e-4,
        "{fleet_ratio} vs {status_r}"
    );

    // --- /report (the current minute is flushed into the answer) ---
    let report: serde_json::Value = gw
        .admin_get("/report?window=1h")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(u(&report["sample_requests"]), requests, "{report}");
    assert_eq!(u(&report["sample_new_connections"]), new, "{report}");
    let reasons: u64 = report["new_reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| u(&r["count"]))
        .sum();
    assert_eq!(reasons, new);

    // --- the CLI, as a user runs it ---
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgepool"))
        .args(["status", "--admin", &gw.admin.to_string()])
        .env_remove("EDGEPOOL_ADMIN_TOKEN")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fleet_line: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("* "))
        .unwrap_or_else(|| panic!("no fleet row in\n{table}"))
        .split_whitespace()
        .collect();
    // target requests new active R verdict errors ...
    assert_eq!(fleet_line[1], requests.to_string(), "{table}");
    assert_eq!(fleet_line[2], new.to_string(), "{table}");
    assert_eq!(fleet_line[4], format!("{status_r:.4}"), "{table}");
    assert_eq!(fleet_line[6], errors.to_string(), "{table}");

    gw.stop().await;
}
