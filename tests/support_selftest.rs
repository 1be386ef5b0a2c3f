//! Self-tests for the shared integration-test support module: prove that the
//! loopback origins behave as documented before other tests rely on them.

mod support;

use std::time::Duration;

use support::{pattern_bytes, Origin, OriginConfig, RawEvent, RawHttp1, TestCa};

/// Generous bound for counters that settle asynchronously.
const SETTLE: Duration = Duration::from_secs(5);

fn client_for(ca: &TestCa) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.reqwest_certificate())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn h1_keep_alive_reuses_one_connection_with_reqwest() {
    let origin = Origin::start(OriginConfig::default()).await;
    let client = client_for(origin.ca());
    for i in 1..=3 {
        let resp = client.get(origin.url("/echo")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), reqwest::Version::HTTP_11);
        assert_eq!(header(&resp, "x-origin-conn"), "1");
        assert_eq!(header(&resp, "x-origin-index"), i.to_string());
        let json: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(json["index_on_conn"], i);
        assert_eq!(json["conn_id"], 1);
    }
    assert_eq!(origin.accepted(), 1);
    assert_eq!(origin.requests(), 3);
    let log = origin.log();
    assert_eq!(log.len(), 3);
    assert!(log
        .iter()
        .all(|r| r.conn_id == 1 && r.version == "HTTP/1.1"));
    assert_eq!(
        log.iter().map(|r| r.index_on_conn).collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

#[tokio::test]
async fn h1_keep_alive_raw_and_keep_alive_header() {
    let origin = Origin::start(OriginConfig {
        keep_alive_header: Some("timeout=5, max=100".into()),
        ..Default::default()
    })
    .await;
    let mut conn = RawHttp1::connect(origin.addr()).await.unwrap();
    for i in 1..=3u64 {
        let resp = conn.get("/echo").await.unwrap();
        assert_eq!(resp.status, 200);
        assert!(!resp.connection_close());
        assert_eq!(resp.header("x-origin-index"), Some(i.to_string().as_str()));
        assert_eq!(resp.header("keep-alive"), Some("timeout=5, max=100"));
    }
    assert_eq!(origin.accepted(), 1);
    assert_eq!(origin.open_connections(), 1);
}

#[tokio::test]
async fn h1_max_requests_per_conn_closes_after_nth_response() {
    let origin = Origin::start(OriginConfig {
        max_requests_per_conn: Some(2),
        ..Default::default()
    })
    .await;
    let mut conn = RawHttp1::connect(origin.addr()).await.unwrap();
    let first = conn.get("/echo").await.unwrap();
    assert!(!first.connection_close());
    let second = conn.get("/echo").await.unwrap();
    assert!(second.connection_close(), "2nd response: {second:?}");
    assert_eq!(second.header("x-origin-index"), Some("2"));
    assert!(matches!(conn.wait_event(SETTLE).await, RawEvent::Eof));

    let mut conn = RawHttp1::connect(origin.addr()).await.unwrap();
    let third = conn.get("/echo").await.unwrap();
    assert_eq!(third.header("x-origin-conn"), Some("2"));
    assert_eq!(third.header("x-origin-index"), Some("1"));
    assert_eq!(origin.accepted(), 2);

    // reqwest sees the same: a new connection after every 2nd response.
    let client = client_for(origin.ca());
    for _ in 0..4 {
        client.get(origin.url("/echo")).send().await.unwrap();
    }
    assert_eq!(origin.accepted(), 4);
}

#[tokio::test]
async fn h1_idle_timeout_closes_idle_connection() {
    let origin = Origin::start(OriginConfig {
        idle_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let mut conn = RawHttp1::connect(origin.addr()).await.unwrap();
    conn.get("/echo").await.unwrap();
    assert_eq!(origin.open_connections(), 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        origin
            .wait_until(SETTLE, |o| o.open_connections() == 0)
            .await
    );
    assert!(matches!(conn.wait_event(SETTLE).await, RawEvent::Eof));
}

#[tokio::test]
async fn h1_rst_idle_resets_idle_connection() {
    let origin = Origin::start(OriginConfig {
        rst_idle_after: Some(Duration::from_millis(200)),
        ..Default::default()
    })
    .await;
    let mut conn = RawHttp1::connect(origin.addr()).await.unwrap();
    conn.get("/echo").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        origin
            .wait_until(SETTLE, |o| o.open_connections() == 0)
            .await
    );
    let event = conn.wait_event(SETTLE).await;
    assert!(matches!(event, RawEvent::Reset), "{event:?}");
}

#[tokio::test]
async fn h1_stray_bytes_on_idle_connection() {
    let origin = Origin::start(OriginConfig {
        stray_bytes_idle_after: Some(Duration::from_millis(200)),
        ..Default::default()
    })
    .await;
    let mut conn = RawHttp1::connect(origin.addr()).await.unwrap();
    conn.get("/echo").await.unwrap();
    let mut junk = Vec::new();
    while junk.len() < b"HTTP/1.1 200 OK\r\n\r\nJUNK".len() {
        match conn.wait_event(SETTLE).await {
            RawEvent::Data(bytes) => junk.extend(bytes),
            other => panic!("expected junk bytes, got {other:?}"),
        }
    }
    assert_eq!(junk, b"HTTP/1.1 200 OK\r\n\r\nJUNK");
    // The connection stays open.
    assert_eq!(origin.open_connections(), 1);
}

#[tokio::test]
async fn h1_rst_path_resets_without_response() {
    let origin = Origin::start(OriginConfig::default()).await;
    let mut conn = RawHttp1::connect(origin.addr()).await.unwrap();
    conn.send_raw(b"GET /rst HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let event = conn.wait_event(SETTLE).await;
    assert!(matches!(event, RawEvent::Reset), "{event:?}");
    assert_eq!(origin.requests(), 1);
    assert_eq!(origin.log()[0].path, "/rst");
}

#[tokio::test]
async fn tls_h1_rst_path_and_idle_rst() {
    let origin = Origin::start(OriginConfig {
        tls: true,
        h2: true, // the raw client offers only http/1.1
        rst_idle_after: Some(Duration::from_millis(200)),
        ..Default::default()
    })
    .await;
    let mut conn = RawHttp1::connect_tls(origin.addr(), origin.ca(), "localhost")
        .await
        .unwrap();
    let resp = conn.get("/echo").await.unwrap();
    assert_eq!(resp.header("x-origin-index"), Some("1"));
    conn.send_raw(b"GET /rst HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let event = conn.wait_event(SETTLE).await;
    assert!(matches!(event, RawEvent::Reset), "{event:?}");

    let mut conn = RawHttp1::connect_tls(origin.addr(), origin.ca(), "127.0.0.1")
        .await
        .unwrap();
    conn.get("/echo").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let event = conn.wait_event(SETTLE).await;
    assert!(matches!(event, RawEvent::Reset), "{event:?}");
    assert!(
        origin
            .wait_until(SETTLE, |o| o.open_connections() == 0)
            .await
    );
    assert_eq!(origin.accepted(), 2);
}

#[tokio::test]
async fn h1_close_path_and_client_close() {
    let origin = Origin::start(OriginConfig::default()).await;
    let mut conn = RawHttp1::connect(origin.addr()).await.unwrap();
    let resp = conn.get("/close").await.unwrap();
    assert_eq!(resp.status, 200);
    assert!(resp.connection_close());
    assert!(matches!(conn.wait_event(SETTLE).await, RawEvent::Eof));

    let mut conn = RawHttp1::connect(origin.addr()).await.unwrap();
    let resp = conn
        .request("GET", "/echo", &[("Connection", "close")], b"")
        .await
        .unwrap();
    assert!(resp.connection_close());
    assert!(matches!(conn.wait_event(SETTLE).await, RawEvent::Eof));
    assert!(
        origin
            .wait_until(SETTLE, |o| o.open_connections() == 0)
            .await
    );
}

#[tokio::test]
async fn h1_bodies_chunked_head_status_and_echo() {
    let origin = Origin::start(OriginConfig::default()).await;
    let mut conn = RawHttp1::connect(origin.addr()).await.unwrap();

    let resp = conn.get("/chunked/1000").await.unwrap();
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    assert!(resp.chunks > 1, "{} chunks", resp.chunks);
    assert_eq!(resp.body, pattern_bytes(1000));

    let resp = conn.get("/bytes/1000").await.unwrap();
    assert_eq!(resp.header("content-length"), Some("1000"));
    assert_eq!(resp.body, pattern_bytes(1000));

    let resp = conn.request("HEAD", "/bytes/10", &[], b"").await.unwrap();
    assert_eq!(resp.header("content-length"), Some("10"));
    assert!(resp.body.is_empty());

    let resp = conn.get("/status/418").await.unwrap();
    assert_eq!(resp.status, 418);
    let resp = conn.get("/status/204").await.unwrap();
    assert_eq!(resp.status, 204);
    assert!(resp.body.is_empty());

    let resp = conn
        .request("POST", "/echo?x=1", &[("X-Test", "a")], b"hello")
        .await
        .unwrap();
    let json = resp.json();
    assert_eq!(json["method"], "POST");
    assert_eq!(json["path"], "/echo?x=1");
    assert_eq!(json["body"], "hello");
    assert_eq!(json["headers"]["x-test"], "a");

    // Chunked request body.
    conn.send_raw(
        b"PUT /anything HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let resp = conn.read_response(false).await.unwrap();
    assert_eq!(resp.json()["body"], "abcde");

    let resp = conn.get("/slow?ms=20").await.unwrap();
    assert_eq!(resp.status, 200);

    // All on one connection; the log has them in order.
    assert_eq!(origin.accepted(), 1);
    let log = origin.log();
    assert_eq!(log.len(), 8);
    assert_eq!(
        log.iter().map(|r| r.index_on_conn).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert_eq!(log[5].method, "POST");
    assert_eq!(log[5].body, b"hello");
    assert_eq!(log[5].header("x-test"), Some("a"));
    assert_eq!(log[6].body, b"abcde");
}

#[tokio::test]
async fn bytes_endpoint_is_deterministic_via_reqwest() {
    let origin = Origin::start(OriginConfig::default()).await;
    let resp = client_for(origin.ca())
        .get(origin.url("/bytes/1000"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.content_length(), Some(1000));
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), 1000);
    assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
}

#[tokio::test]
async fn tls_http1_with_test_ca_root() {
    let origin = Origin::start(OriginConfig {
        tls: true,
        ..Default::default()
    })
    .await;
    assert!(origin.base_url().starts_with("https://localhost:"));
    let client = client_for(origin.ca());
    for i in 1..=2 {
        let resp = client.get(origin.url("/echo")).send().await.unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_11);
        assert_eq!(header(&resp, "x-origin-index"), i.to_string());
    }
    let resp = client
        .get(format!("https://127.0.0.1:{}/bytes/5000", origin.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap(), pattern_bytes(5000));

    // A client that does not trust the test CA fails the handshake.
    let untrusted = client_for(&TestCa::new());
    assert!(untrusted.get(origin.url("/echo")).send().await.is_err());
}

#[tokio::test]
async fn tls_origins_can_share_a_ca() {
    let ca = TestCa::new();
    assert!(ca.cert_path.exists());
    let cfg = OriginConfig {
        tls: true,
        h2: true,
        ..Default::default()
    };
    let a = Origin::start_with_ca(cfg.clone(), &ca).await;
    let b = Origin::start_with_ca(cfg, &ca).await;
    let client = client_for(&ca);
    for origin in [&a, &b] {
        assert_eq!(origin.ca().cert_pem, ca.cert_pem);
        let resp = client.get(origin.url("/echo")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
}

#[tokio::test]
async fn h2_negotiated_and_concurrent_requests_share_one_connection() {
    let origin = Origin::start(OriginConfig {
        tls: true,
        h2: true,
        max_concurrent_streams: Some(8),
        ..Default::default()
    })
    .await;
    let client = client_for(origin.ca());
    let resp = client.get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(header(&resp, "x-origin-index"), "1");
    let json: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(json["version"], "HTTP/2");

    let mut tasks = Vec::new();
    for i in 0..20 {
        let client = client.clone();
        let url = origin.url(&format!("/slow?ms=50&i={i}"));
        tasks.push(tokio::spawn(async move {
            let resp = client.get(url).send().await.unwrap();
            assert_eq!(resp.version(), reqwest::Version::HTTP_2);
            assert_eq!(resp.status(), 200);
            resp.bytes().await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(origin.accepted(), 1);
    assert_eq!(origin.requests(), 21);
    // SETTINGS_MAX_CONCURRENT_STREAMS was honoured, and requests did overlap.
    let peak = origin.peak_in_flight();
    assert!((2..=8).contains(&peak), "peak in flight {peak}");
    let log = origin.log();
    assert!(log.iter().all(|r| r.conn_id == 1 && r.version == "HTTP/2"));
    let mut indexes: Vec<u64> = log.iter().map(|r| r.index_on_conn).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, (1..=21).collect::<Vec<_>>());
    assert!(log[0].header(":authority").is_some());

    // Large body through HTTP/2 flow control.
    let body = client
        .get(origin.url("/bytes/300000"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body, pattern_bytes(300_000));
    let body = client
        .post(origin.url("/echo"))
        .body(vec![b'a'; 200_000])
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["body"].as_str().unwrap().len(), 200_000);
}

#[tokio::test]
async fn h2_rst_close_and_max_requests_per_conn() {
    let origin = Origin::start(OriginConfig {
        tls: true,
        h2: true,
        max_requests_per_conn: Some(2),
        ..Default::default()
    })
    .await;
    let client = client_for(origin.ca());
    for i in 1..=2 {
        let resp = client.get(origin.url("/echo")).send().await.unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(header(&resp, "x-origin-index"), i.to_string());
    }
    // GOAWAY after the 2nd stream: the server closes the connection.
    assert!(
        origin
            .wait_until(SETTLE, |o| o.open_connections() == 0)
            .await
    );
    let resp = client.get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(header(&resp, "x-origin-conn"), "2");
    assert_eq!(origin.accepted(), 2);

    // /rst resets the stream.
    let other = Origin::start(OriginConfig {
        tls: true,
        h2: true,
        ..Default::default()
    })
    .await;
    let client = client_for(other.ca());
    assert!(client.get(other.url("/rst")).send().await.is_err());
    assert_eq!(other.requests(), 1);

    // /close answers, then GOAWAY closes the connection.
    let resp = client.get(other.url("/close")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        other
            .wait_until(SETTLE, |o| o.open_connections() == 0)
            .await
    );
    let resp = client.get(other.url("/echo")).send().await.unwrap();
    assert_eq!(header(&resp, "x-origin-conn"), "2");
}

#[tokio::test]
async fn h2_idle_timeout_closes_connection() {
    let origin = Origin::start(OriginConfig {
        tls: true,
        h2: true,
        idle_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let client = client_for(origin.ca());
    let resp = client.get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(origin.open_connections(), 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        origin
            .wait_until(SETTLE, |o| o.open_connections() == 0)
            .await
    );
}

#[tokio::test]
async fn h2c_prior_knowledge_without_tls() {
    let origin = Origin::start(OriginConfig {
        h2: true,
        ..Default::default()
    })
    .await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = client.get(origin.url("/status/201")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 201);
}

#[tokio::test]
async fn shutdown_closes_listener_and_connections() {
    let origin = Origin::start(OriginConfig::default()).await;
    let addr = origin.addr();
    let mut conn = RawHttp1::connect(addr).await.unwrap();
    conn.get("/echo").await.unwrap();
    origin.shutdown().await;
    let event = conn.wait_event(SETTLE).await;
    assert!(
        matches!(event, RawEvent::Eof | RawEvent::Reset),
        "{event:?}"
    );
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn helpers() {
    assert_ne!(support::free_port(), 0);
    assert!(support::require_tool("sh"));
    if !support::ci() {
        assert!(!support::require_tool(
            "definitely-not-an-installed-tool-xyz"
        ));
    }
    let ca = TestCa::new();
    assert!(ca.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(std::fs::read_to_string(&ca.cert_path).unwrap(), ca.cert_pem);
    assert_eq!(ca.root_store().len(), 1);
    let (cert, key) = ca.write_leaf_files("nginx", &["localhost", "127.0.0.1"]);
    assert!(cert.exists() && key.exists());
}
