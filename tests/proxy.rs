//! End-to-end: real workers (reqwest) through the real gateway to real loopback origins.
mod gw;
mod support;

use std::time::Duration;

use gw::{get, TestGateway};
use support::{pattern_bytes, Origin, OriginConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `request` as written on a new connection to the proxy and returns everything it
/// answers until it closes (within 10 s).
async fn raw_exchange(proxy: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("the proxy answers and closes within 10 s")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

fn h1() -> OriginConfig {
    OriginConfig::default()
}

fn tls_h1() -> OriginConfig {
    OriginConfig {
        tls: true,
        ..Default::default()
    }
}

fn tls_h2(streams: u32) -> OriginConfig {
    OriginConfig {
        tls: true,
        h2: true,
        max_concurrent_streams: Some(streams),
        ..Default::default()
    }
}

#[tokio::test]
async fn plain_http_requests_reuse_one_upstream_connection() {
    let origin = Origin::start(h1()).await;
    let gw = TestGateway::start(&[]).await;
    let worker = gw.client();
    let mut reused = Vec::new();
    for _ in 0..20 {
        let r = worker.get(origin.url("/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        reused.push(
            r.headers()["x-edgepool-reused"]
                .to_str()
                .unwrap()
                .to_string(),
        );
        assert_eq!(r.headers()["x-edgepool-exit"], "direct");
        r.bytes().await.unwrap();
    }
    assert_eq!(reused[0], "0", "first request opens the connection");
    assert!(reused[1..].iter().all(|r| r == "1"), "{reused:?}");
    assert_eq!(
        origin.accepted(),
        1,
        "one upstream connection for 20 requests"
    );
    let row = gw.target_status(&origin.authority()).await;
    assert_eq!(row["requests"], 20);
    assert_eq!(row["new_connections"], 1);
    assert_eq!(row["reuse_rate"], 0.95);
    assert_eq!(row["new_by_reason"]["cold_key"], 1);
}

#[tokio::test]
async fn the_request_target_upstream_is_the_workers_path_and_query() {
    // Absolute-form targets as workers write them, and the origin-form target the origin must
    // see: an empty path is `/` (RFC 9112 §3.2.1), a bare query gets its `/`, a fragment is
    // never sent, the rest goes as written.
    let origin = Origin::start(h1()).await;
    let gw = TestGateway::start(&[]).await;
    let host = origin.authority();
    for (url, want) in [
        (format!("http://{host}"), "/"),
        (format!("http://{host}#frag"), "/"),
        (format!("http://{host}?a=1&b=%20"), "/?a=1&b=%20"),
        (format!("http://{host}/x/y?q=1"), "/x/y?q=1"),
        (format!("http://{host}/"), "/"),
        (format!("http://{host}/p#frag"), "/p"),
    ] {
        let request = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(gw.proxy, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{url}: {answer}");
        let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
        let echo: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(echo["path"], want, "{url}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn intercepted_https_reuses_connections_and_bodies_are_byte_identical() {
    let origin = Origin::start(tls_h1()).await;
    let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
    let worker = gw.client();
    for _ in 0..10 {
        let r = worker
            .get(origin.url("/bytes/100000"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body = r.bytes().await.unwrap();
        assert_eq!(&body[..], &pattern_bytes(100_000)[..]);
    }
    assert_eq!(origin.accepted(), 1);
    let log = origin.log();
    assert!(
        log.iter().all(|r| r.header("proxy-authorization").is_none()
            && r.header("x-edgepool-session").is_none()),
        "no proxy headers reach the target"
    );
}

#[tokio::test]
async fn http2_target_with_8_streams_and_32_concurrent_workers_gets_4_connections() {
    let origin = Origin::start(tls_h2(8)).await;
    let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let worker = gw.client();
        // Each request is held 4 s at the origin, so all 32 overlap as long as the last one
        // is sent within 4 s of the first (a few ms on loopback, even on a loaded runner);
        // the assertions below need that overlap, not any speed.
        let url = origin.url("/slow?ms=4000");
        tasks.push(tokio::spawn(async move {
            let r = worker.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        origin
            .log()
            .iter()
            .filter(|r| r.version == "HTTP/2")
            .count(),
        32
    );
    assert_eq!(
        origin.peak_in_flight(),
        32,
        "all 32 requests ran at once, so 4 connections of 8 streams are needed"
    );
    assert_eq!(origin.accepted(), 4, "4 connections, not 32");
    let row = gw.target_status(&origin.authority()).await;
    assert_eq!(row["protocol"], "h2");
    assert_eq!(row["new_by_reason"]["cold_key"], 1);
    assert_eq!(row["new_by_reason"]["h2_saturated"], 3);
}

#[tokio::test]
async fn server_request_limit_retires_connections_without_errors() {
    let origin = Origin::start(OriginConfig {
        max_requests_per_conn: Some(5),
        ..h1()
    })
    .await;
    let gw = TestGateway::start(&[]).await;
    let worker = gw.client();
    for _ in 0..20 {
        let r = worker.get(origin.url("/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200, "no worker-visible error");
        assert!(r.headers().get("x-edgepool-error").is_none());
    }
    assert_eq!(origin.accepted(), 4, "20 requests / 5 per connection");
    let row = gw.target_status(&origin.authority()).await;
    assert_eq!(row["new_by_reason"]["max_requests"], 3);
    assert_eq!(row["closed_by_reason"]["max_requests"], 4);
    assert_eq!(row["errors"], 0);
}

#[tokio::test]
async fn server_idle_close_is_seen_at_once_and_next_request_succeeds() {
    let origin = Origin::start(OriginConfig {
        idle_timeout: Some(Duration::from_millis(1500)),
        ..h1()
    })
    .await;
    let gw = TestGateway::start(&[]).await;
    let worker = gw.client();
    get(&worker, &origin.url("/echo")).await;
    assert!(
        origin
            .wait_until(Duration::from_secs(5), |o| o.open_connections() == 0)
            .await
    );
    // The gateway noticed the FIN while the connection sat idle, before any checkout.
    let seen = gw.wait_closed("server_closed_idle", 1).await;
    assert!(seen, "idle close counted without a checkout");
    let r = worker.get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-edgepool-reused"], "0");
    let row = gw.target_status(&origin.authority()).await;
    assert_eq!(row["new_by_reason"]["server_closed_idle"], 1);
}

#[tokio::test]
async fn keep_alive_timeout_header_retires_connection_before_the_server_does() {
    // The server announces 2 s but really closes only after 10 s: the retirement below must
    // come from the announced timeout, and the next request cannot race the server's own close
    // however slow the runner (8.7 s of slack after the 1.3 s sleep, instead of 0.7 s).
    let origin = Origin::start(OriginConfig {
        keep_alive_header: Some("timeout=2, max=100".into()),
        idle_timeout: Some(Duration::from_secs(10)),
        ..h1()
    })
    .await;
    let gw = TestGateway::start(&[]).await;
    let worker = gw.client();
    get(&worker, &origin.url("/echo")).await;
    // 2 s minus the 1 s margin: retired after ~1 s idle, while the server still holds it.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    gw.gw.forwarder().pool().sweep_now();
    let s = gw.status().await;
    assert_eq!(
        s["fleet"]["closed_by_reason"]["keepalive_timeout"], 1,
        "{s:#}"
    );
    let r = worker.get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-edgepool-reused"], "0");
    let row = gw.target_status(&origin.authority()).await;
    assert_eq!(row["new_by_reason"]["idle_expired"], 1);
}

#[tokio::test]
async fn reset_on_reused_connection_retries_get_once_but_never_replays_post() {
    let origin = Origin::start(h1()).await;
    let gw = TestGateway::start(&[]).await;
    let worker = gw.client();
    // Warm a connection, then hit a path whose request makes the server reset it.
    get(&worker, &origin.url("/echo")).await;
    let r = worker.get(origin.url("/rst")).send().await.unwrap();
    assert_eq!(
        r.status(),
        502,
        "the fresh connection is reset too; no second retry"
    );
    assert_eq!(r.headers()["x-edgepool-error"], "upstream_request_failed");
    let gets = origin.log().iter().filter(|x| x.path == "/rst").count();
    assert_eq!(
        gets, 2,
        "GET was retried exactly once on a fresh connection"
    );

    get(&worker, &origin.url("/echo")).await;
    let r = worker
        .post(origin.url("/rst"))
        .body("order=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        r.headers()["x-edgepool-error"],
        "upstream_failed_not_replayed"
    );
    assert_eq!(r.headers()["x-edgepool-request-sent"], "maybe");
    let posts = origin
        .log()
        .iter()
        .filter(|x| x.path == "/rst" && x.method == "POST")
        .count();
    assert_eq!(posts, 1, "a non-idempotent request is never replayed");
}

#[tokio::test]
async fn stray_bytes_on_idle_connection_discard_it() {
    let origin = Origin::start(OriginConfig {
        stray_bytes_idle_after: Some(Duration::from_millis(300)),
        ..h1()
    })
    .await;
    let gw = TestGateway::start(&[]).await;
    let worker = gw.client();
    get(&worker, &origin.url("/echo")).await;
    let seen = gw.wait_closed("stray_bytes", 1).await;
    assert!(
        seen,
        "stray bytes on an idle connection are counted and it is dropped"
    );
    let r = worker.get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(!body.contains("JUNK"), "no junk in another response");
}

#[tokio::test]
async fn private_targets_are_refused_by_default_with_an_edgepool_error() {
    let origin = Origin::start(h1()).await;
    let gw = TestGateway::start_with(&[], |c| c.targets.allow.clear()).await;
    let r = gw.client().get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-edgepool-error"], "target_forbidden");
    assert!(r.headers()["proxy-status"]
        .to_str()
        .unwrap()
        .contains("destination_ip_prohibited"));
    assert_eq!(origin.accepted(), 0, "nothing reached the target");
    // CONNECT is refused too, before any tunnel exists.
    let err = gw.client().get("https://127.0.0.1:9/").send().await;
    assert!(err.is_err(), "CONNECT to a loopback target fails");
}

#[tokio::test]
async fn fetch_api_returns_json_with_timings_and_reuse() {
    let origin = Origin::start(tls_h1()).await;
    let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut last = serde_json::Value::Null;
    for i in 0..2 {
        let doc: serde_json::Value = http
            .post(format!("http://{}/v1/fetch", gw.proxy))
            .json(&serde_json::json!({
                "url": origin.url("/echo?x=1"),
                "method": "POST",
                "headers": {"x-test": "yes"},
                "body": "hello",
                "timeout_ms": 5000
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(doc["status"], 200, "{doc:#}");
        assert_eq!(doc["reused"], i == 1);
        assert_eq!(doc["exit"], "direct");
        assert!(doc["timings"]["total_ms"].as_f64().unwrap() > 0.0);
        let echoed: serde_json::Value =
            serde_json::from_str(doc["body"].as_str().unwrap()).unwrap();
        assert_eq!(echoed["body"], "hello");
        assert_eq!(echoed["headers"]["x-test"], "yes");
        last = doc;
    }
    assert!(
        last["timings"]["tls_handshake_ms"].as_f64().unwrap() == 0.0,
        "reused: no handshake"
    );
    let bad = http
        .post(format!("http://{}/v1/fetch", gw.proxy))
        .body("{\"url\": 3}")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.headers()["x-edgepool-error"], "fetch_bad_json");
}

#[tokio::test]
async fn worker_leaving_mid_response_keeps_the_connection_reusable() {
    let origin = Origin::start(h1()).await;
    let gw = TestGateway::start(&[]).await;
    // A raw worker asks for 200 kB and hangs up after the head.
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        origin.url("/bytes/200000"),
        origin.authority()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(s);
    // Wait (≤ 5 s) for the drain to hand the connection back instead of a fixed 300 ms, which
    // a loaded runner could outlast mid-drain.
    let mut idle = false;
    for _ in 0..250 {
        if gw.status().await["fleet"]["idle"] == 1 {
            idle = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(idle, "the drained connection went back to the pool");
    let r = gw.client().get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-edgepool-reused"],
        "1",
        "drained and returned to the pool"
    );
    assert_eq!(origin.accepted(), 1);
}

#[tokio::test]
async fn untrusted_target_certificate_is_a_502_never_hidden_behind_our_ca() {
    let origin = Origin::start(tls_h1()).await;
    let gw = TestGateway::start(&[]).await; // origin's CA not trusted
    let r = gw.client().get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-edgepool-error"], "upstream_tls_failed");
    assert_eq!(origin.requests(), 0);
}

#[tokio::test]
async fn passthrough_hosts_get_a_blind_tunnel_with_the_targets_own_certificate() {
    let origin = Origin::start(tls_h1()).await;
    let gw =
        TestGateway::start_with(&[], |c| c.intercept.passthrough = vec!["localhost".into()]).await;
    // The worker trusts only the origin's CA: it works only if edgepool does not intercept.
    let worker = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(gw.proxy_url()).unwrap())
        .tls_built_in_root_certs(false)
        .add_root_certificate(origin.ca().reqwest_certificate())
        .build()
        .unwrap();
    let r = worker.get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-edgepool-reused").is_none(), "not pooled");
    assert!(gw.metrics().await.contains("edgepool_tunnels_total 1"));
}

#[tokio::test]
async fn admin_serves_metrics_status_health_and_the_ca() {
    let origin = Origin::start(h1()).await;
    let gw = TestGateway::start(&[]).await;
    gw.client().get(origin.url("/echo")).send().await.unwrap();
    let m = gw.metrics().await;
    assert!(
        m.contains("edgepool_requests_total{reused=\"0\",protocol=\"http/1.1\"} 1"),
        "{m}"
    );
    assert!(m.contains("edgepool_upstream_connections_opened_total{reason=\"cold_key\"} 1"));
    assert!(m.contains("edgepool_handshake_seconds_total"));
    assert_eq!(gw.admin_get("/healthz").await.status(), 200);
    assert_eq!(gw.admin_get("/readyz").await.status(), 200);
    let pem = gw.admin_get("/ca.pem").await.text().await.unwrap();
    assert_eq!(pem, std::fs::read_to_string(gw.ca_path()).unwrap());
    // The dashboard is one self-contained page: nothing loaded from anywhere else.
    let page = gw.admin_get("/").await.text().await.unwrap();
    assert!(page.contains("edgepool"));
    for bad in ["src=\"http", "href=\"http", "src='http", "@import"] {
        assert!(!page.contains(bad), "the dashboard must not load {bad}...");
    }
}

#[tokio::test]
async fn one_worker_connection_carries_requests_for_many_targets() {
    let a = Origin::start(h1()).await;
    let b = Origin::start(tls_h1()).await;
    let gw = TestGateway::start(&[b.ca().cert_path.clone()]).await;
    let worker = gw.client();
    for _ in 0..3 {
        assert_eq!(
            worker.get(a.url("/echo")).send().await.unwrap().status(),
            200
        );
        assert_eq!(
            worker.get(b.url("/echo")).send().await.unwrap().status(),
            200
        );
    }
    assert_eq!((a.accepted(), b.accepted()), (1, 1));
    assert_eq!((a.requests(), b.requests()), (3, 3));
}

#[tokio::test]
async fn http2_goaway_moves_traffic_to_a_new_connection_without_errors() {
    let origin = Origin::start(OriginConfig {
        max_requests_per_conn: Some(5),
        ..tls_h2(100)
    })
    .await;
    let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
    let worker = gw.client();
    for _ in 0..20 {
        let r = worker.get(origin.url("/echo")).send().await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "GOAWAY never reaches the worker as an error"
        );
        r.bytes().await.unwrap();
    }
    let row = gw.target_status(&origin.authority()).await;
    assert_eq!(row["protocol"], "h2");
    assert!(
        row["new_by_reason"]["goaway"].as_u64().unwrap_or(0) >= 3,
        "{row:#}"
    );
    assert_eq!(row["errors"], 0);
    assert_eq!(row["new_connections"].as_u64().unwrap(), origin.accepted());
}

#[tokio::test]
async fn reset_of_an_idle_connection_is_counted_and_the_next_request_is_clean() {
    let origin = Origin::start(OriginConfig {
        rst_idle_after: Some(Duration::from_millis(300)),
        ..h1()
    })
    .await;
    let gw = TestGateway::start(&[]).await;
    let worker = gw.client();
    get(&worker, &origin.url("/echo")).await;
    let seen = gw.wait_closed("reset_idle", 1).await;
    assert!(seen, "RST on an idle connection is seen without a checkout");
    let r = worker.get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-edgepool-reused"], "0");
}

#[tokio::test]
async fn worker_headers_pass_through_and_edgepool_headers_do_not() {
    let origin = Origin::start(h1()).await;
    let gw = TestGateway::start(&[]).await;
    let r = gw
        .client()
        .get(origin.url("/echo"))
        .header("x-edgepool-session", "abc")
        .header("x-custom", "kept")
        .header("user-agent", "scraper/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = origin.log().pop().unwrap();
    assert_eq!(rec.header("x-custom"), Some("kept"));
    assert_eq!(rec.header("user-agent"), Some("scraper/1.0"));
    assert!(rec.header("x-edgepool-session").is_none());
    assert!(rec.header("proxy-connection").is_none());
    assert_eq!(rec.header("host"), Some(origin.authority().as_str()));
}

#[tokio::test]
async fn post_bodies_arrive_exactly_once_and_oversized_bodies_get_413() {
    let origin = Origin::start(h1()).await;
    let gw = TestGateway::start_with(&[], |c| c.limits.max_request_body = 1024).await;
    let worker = gw.client();
    let r = worker
        .post(origin.url("/echo"))
        .body("a=1&b=2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = origin.log().pop().unwrap();
    assert_eq!(rec.body, b"a=1&b=2");
    let r = worker
        .post(origin.url("/echo"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["x-edgepool-error"], "request_body_too_large");
    assert_eq!(
        origin.requests(),
        1,
        "the oversized request never reached the target"
    );
}

#[tokio::test]
async fn connect_failure_on_one_address_moves_to_the_next_for_any_method() {
    // "localhost" is 127.0.0.1 then ::1. Listen on ::1 only: the IPv4 connect is refused, the
    // request goes to the IPv6 address, and later requests start there.
    // A [::1] port whose 127.0.0.1 twin nobody listens on; a taken twin only means another
    // port is tried (bounded), never a skip.
    let mut found = None;
    for _ in 0..50 {
        let listener = match tokio::net::TcpListener::bind("[::1]:0").await {
            Ok(l) => l,
            Err(e) => {
                support::skip(&format!(
                    "no IPv6 loopback on this machine ({e}); address failover untested"
                ));
                return;
            }
        };
        let port = listener.local_addr().unwrap().port();
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            found = Some((listener, port));
            break;
        }
    }
    let (listener, port) = found.expect("50 [::1] ports whose 127.0.0.1 twin was taken");
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") => {}
                        Ok(_) => continue,
                    }
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = "v6";
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let gw = TestGateway::start(&[]).await;
    let worker = gw.client();
    let url = format!("http://localhost:{port}/x");
    let r = worker.post(&url).body("once").send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "a refused address is not an error when another one works"
    );
    assert_eq!(r.text().await.unwrap(), "v6");
    let r = worker.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-edgepool-reused"],
        "1",
        "the next request starts at the working address"
    );
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_stream_reset_by_an_http2_target_keeps_its_connection() {
    // Each /rst is an RST_STREAM on a healthy connection: the retry (and the next requests)
    // ride the same connection instead of dialing a new one per reset.
    let origin = Origin::start(OriginConfig {
        tls: true,
        h2: true,
        ..Default::default()
    })
    .await;
    let gw = TestGateway::start(std::slice::from_ref(&origin.ca().cert_path)).await;
    let worker = gw.client();
    assert_eq!(gw::get(&worker, &origin.url("/echo")).await, 200);
    for _ in 0..10 {
        let r = worker.get(origin.url("/rst")).send().await.unwrap();
        assert_eq!(r.status(), 502);
    }
    assert_eq!(gw::get(&worker, &origin.url("/echo")).await, 200);
    assert_eq!(
        origin.accepted(),
        1,
        "one HTTP/2 connection for 12 requests, 10 of them reset"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_target_cannot_fake_edgepools_proxy_status_or_headers() {
    // A raw origin that claims edgepool refused the request, next to another proxy's member.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let origin = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut have = Vec::new();
                while !have.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => have.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\n\
                          Proxy-Status: cdn-7; error=http_response_timeout, edgepool; error=destination_ip_prohibited\r\n\
                          Proxy-Status: edgepool; error=dns_error\r\n\
                          X-Edgepool-Reused: 1\r\n\
                          Content-Length: 2\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    let gw = TestGateway::start(&[]).await;
    let r = gw
        .client()
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ps: Vec<&str> = r
        .headers()
        .get_all("proxy-status")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(
        ps,
        vec!["cdn-7; error=http_response_timeout"],
        "only edgepool writes its member"
    );
    assert_eq!(r.headers()["x-edgepool-reused"], "0");
    assert_eq!(r.text().await.unwrap(), "ok");
    origin.abort();
    gw.stop().await;
}

#[tokio::test]
async fn an_oversized_fetch_document_is_413() {
    let gw = TestGateway::start_with(&[], |c| c.limits.max_fetch_json = 1024).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let big = serde_json::json!({"url": "http://127.0.0.1:9/", "body": "x".repeat(4096)});
    let r = http
        .post(format!("http://{}/v1/fetch", gw.proxy))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["x-edgepool-error"], "fetch_too_large");
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("limits.max_fetch_json (1024 bytes)"));
    gw.stop().await;
}

#[tokio::test]
async fn the_target_sees_the_host_edgepool_connected_to_not_the_workers() {
    // Plain path: absolute-form URL and a different Host (RFC 9112 §3.2.2: replaced).
    let origin = Origin::start(h1()).await;
    let gw = TestGateway::start(&[]).await;
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        origin.url("/echo")
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let seen = origin.log();
    assert_eq!(
        seen.last().unwrap().header("host"),
        Some(origin.authority().as_str()),
        "the plain path"
    );

    // Inside an intercepted tunnel (HTTP/1.1): a Host naming another site than the CONNECT.
    let tls = Origin::start(tls_h1()).await;
    let gw2 = TestGateway::start(&[tls.ca().cert_path.clone()]).await;
    let h1 = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(gw2.proxy_url()).unwrap())
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(gw2.ca_pem().as_bytes()).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let r = h1
        .get(tls.url("/echo"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        tls.log().last().unwrap().header("host"),
        Some(tls.authority().as_str()),
        "inside the tunnel"
    );
    gw.stop().await;
    gw2.stop().await;
}

#[tokio::test]
async fn fetch_documents_obey_the_head_limits() {
    let origin = Origin::start(h1()).await;
    let gw = TestGateway::start(&[]).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let post = |doc: serde_json::Value| {
        http.post(format!("http://{}/v1/fetch", gw.proxy))
            .json(&doc)
            .send()
    };
    // A 1 MB header value (limit 64 KiB) and 5,000 fields (limit 100).
    let huge = serde_json::json!({
        "url": origin.url("/echo"),
        "headers": {"x-big": "a".repeat(1_000_000)},
    });
    let many: serde_json::Map<String, serde_json::Value> = (0..5000)
        .map(|i| (format!("x-h{i}"), serde_json::Value::from("v")))
        .collect();
    let many = serde_json::json!({"url": origin.url("/echo"), "headers": many});
    for (doc, what) in [(huge, "max_header_bytes"), (many, "max_headers")] {
        let r = post(doc).await.unwrap();
        assert_eq!(r.status(), 431, "{what}");
        assert_eq!(r.headers()["x-edgepool-error"], "request_header_too_large");
        assert!(r.text().await.unwrap().contains(what));
    }
    assert_eq!(origin.requests(), 0, "nothing reached the origin");
    // Within the limits it goes through.
    let ok = post(serde_json::json!({"url": origin.url("/echo"), "headers": {"x-a": "b"}}))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    gw.stop().await;
}

#[tokio::test]
async fn a_host_of_dots_only_is_no_host() {
    // Found by the fetch_json fuzz target: "https:./" parsed to the host ".", which
    // normalized to "" and was accepted.
    let gw = TestGateway::start(&[]).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = http
        .post(format!("http://{}/v1/fetch", gw.proxy))
        .body(r#"{"url":"https:./3:5555=5exlo1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-edgepool-error"], "fetch_bad_url");
    let got = raw_exchange(
        gw.proxy,
        b"GET http://./ HTTP/1.1\r\nHost: .\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    gw.stop().await;
}

/// A request with exactly `limits.max_headers` fields goes through and one more is refused
/// (431), at the default limit (hyper's own stack-sized parse, 100 fields, is then the only
/// one it uses) and above it (hyper's limit raised to ours).
#[tokio::test]
async fn requests_at_the_header_count_limit_pass_and_one_more_is_refused() {
    let origin = Origin::start(h1()).await;
    for limit in [edgepool::config::LimitsConfig::default().max_headers, 150] {
        let gw = TestGateway::start_with(&[], |c| c.limits.max_headers = limit).await;
        for (fields, want) in [(limit, "HTTP/1.1 200"), (limit + 1, "HTTP/1.1 431")] {
            // Host plus `fields - 1` others.
            let extra: String = (1..fields).map(|i| format!("X-H{i}: v\r\n")).collect();
            let head = format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\n{extra}Connection: close\r\n\r\n",
                origin.url("/echo"),
                origin.authority()
            );
            // `Connection` is one more field: count it in.
            let head = head.replacen(&format!("X-H{}: v\r\n", fields - 1), "", 1);
            let resp = raw_exchange(gw.proxy, head.as_bytes()).await;
            assert!(
                resp.starts_with(want),
                "limit {limit}, {fields} fields: want {want}, got {}",
                resp.lines().next().unwrap_or("")
            );
        }
        gw.stop().await;
    }
}
