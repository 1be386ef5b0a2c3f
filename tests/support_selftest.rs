//! Self-tests for the shared integration-test support module: prove that the
//! loopback origins behave as documented before other tests rely on them.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{
    pattern_bytes, ConnectReply, FakeExit, FakeExitConfig, Origin, OriginConfig, RawEvent,
    RawHttp1, TestCa,
};

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

// ---------------------------------------------------------------------------
// Origin peer address and fake exits

fn proxied_client(ca: &TestCa, proxy: reqwest::Proxy) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(proxy)
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.reqwest_certificate())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn ip(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

/// Reads a response head byte by byte (nothing past the blank line); returns
/// what was read, possibly partial if the peer closed first.
async fn read_head_exactly(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(SETTLE, tcp.read(&mut byte))
            .await
            .expect("response head timed out")
        {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// `CONNECT target` on a new connection to `exit`: the stream, the status
/// (0 if none) and the answer head as read.
async fn http_connect(
    exit: SocketAddr,
    target: &str,
    extra: &[(&str, &str)],
) -> (TcpStream, u16, String) {
    let mut tcp = TcpStream::connect(exit).await.expect("connect to exit");
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    for (name, value) in extra {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let head = read_head_exactly(&mut tcp).await;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (tcp, status, head)
}

enum SocksTarget<'a> {
    V4(Ipv4Addr),
    Domain(&'a str),
    V6(Ipv6Addr),
}

/// A minimal SOCKS5 client: greeting (no-auth, or username/password when
/// `creds`), auth, CONNECT. Returns the tunnel and the bound address from
/// the success reply, or a description of the failure (`"method ff"`,
/// `"auth 1"`, `"reply 5"`, `"eof"`).
async fn socks5_connect(
    exit: SocketAddr,
    creds: Option<(&str, &str)>,
    target: SocksTarget<'_>,
    port: u16,
) -> Result<(TcpStream, SocketAddr), String> {
    let eof = |_| "eof".to_string();
    let mut tcp = TcpStream::connect(exit).await.map_err(|e| e.to_string())?;
    let method = if creds.is_some() { 2 } else { 0 };
    tcp.write_all(&[5, 1, method]).await.map_err(eof)?;
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).await.map_err(eof)?;
    if choice != [5, method] {
        return Err(format!("method {:x}", choice[1]));
    }
    if let Some((user, pass)) = creds {
        let mut auth = vec![1, user.len() as u8];
        auth.extend_from_slice(user.as_bytes());
        auth.push(pass.len() as u8);
        auth.extend_from_slice(pass.as_bytes());
        tcp.write_all(&auth).await.map_err(eof)?;
        let mut status = [0u8; 2];
        tcp.read_exact(&mut status).await.map_err(eof)?;
        if status != [1, 0] {
            return Err(format!("auth {}", status[1]));
        }
    }
    let mut req = vec![5, 1, 0];
    match target {
        SocksTarget::V4(a) => {
            req.push(1);
            req.extend_from_slice(&a.octets());
        }
        SocksTarget::Domain(name) => {
            req.push(3);
            req.push(name.len() as u8);
            req.extend_from_slice(name.as_bytes());
        }
        SocksTarget::V6(a) => {
            req.push(4);
            req.extend_from_slice(&a.octets());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    tcp.write_all(&req).await.map_err(eof)?;
    let mut reply = [0u8; 4];
    tcp.read_exact(&mut reply).await.map_err(eof)?;
    if reply[0] != 5 || reply[1] != 0 {
        return Err(format!("reply {}", reply[1]));
    }
    let bound_ip = match reply[3] {
        1 => {
            let mut a = [0u8; 4];
            tcp.read_exact(&mut a).await.map_err(eof)?;
            IpAddr::V4(a.into())
        }
        4 => {
            let mut a = [0u8; 16];
            tcp.read_exact(&mut a).await.map_err(eof)?;
            IpAddr::V6(a.into())
        }
        other => return Err(format!("atyp {other}")),
    };
    let mut bound_port = [0u8; 2];
    tcp.read_exact(&mut bound_port).await.map_err(eof)?;
    Ok((
        tcp,
        SocketAddr::new(bound_ip, u16::from_be_bytes(bound_port)),
    ))
}

#[tokio::test]
async fn origin_reports_peer_address() {
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for cfg in [
        OriginConfig::default(),
        OriginConfig {
            tls: true,
            h2: true,
            ..Default::default()
        },
    ] {
        let origin = Origin::start(cfg).await;
        let client = client_for(origin.ca());
        let resp = client.get(origin.url("/echo")).send().await.unwrap();
        assert_eq!(header(&resp, "x-origin-peer"), "127.0.0.1");
        let json: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(json["peer"], "127.0.0.1");
        let resp = client.get(origin.url("/status/404")).send().await.unwrap();
        assert_eq!(header(&resp, "x-origin-peer"), "127.0.0.1");
        let log = origin.log();
        assert_eq!(log.len(), 2);
        assert!(log.iter().all(|r| r.peer.ip() == localhost));
        assert_ne!(log[0].peer.port(), origin.port());
    }
    // Error responses of the HTTP/1.1 server carry it too.
    let origin = Origin::start(OriginConfig::default()).await;
    let mut conn = RawHttp1::connect(origin.addr()).await.unwrap();
    conn.send_raw(b"BROKEN\r\n\r\n").await.unwrap();
    let resp = conn.read_response(false).await.unwrap();
    assert_eq!(resp.status, 400);
    assert_eq!(resp.header("x-origin-peer"), Some("127.0.0.1"));
}

#[tokio::test]
async fn exit_http_tunnels_https_to_tls_origins() {
    let bind = Ipv4Addr::new(127, 0, 0, 11);
    let ca = TestCa::new();
    let h1 = Origin::start_with_ca(
        OriginConfig {
            tls: true,
            ..Default::default()
        },
        &ca,
    )
    .await;
    let h2 = Origin::start_with_ca(
        OriginConfig {
            tls: true,
            h2: true,
            ..Default::default()
        },
        &ca,
    )
    .await;
    let exit = FakeExit::start(FakeExitConfig::http(bind)).await;
    assert_eq!(exit.url(), format!("http://{}", exit.addr()));
    let client = proxied_client(&ca, reqwest::Proxy::all(exit.url()).unwrap());
    for _ in 0..2 {
        let resp = client.get(h1.url("/echo")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), reqwest::Version::HTTP_11);
        assert_eq!(header(&resp, "x-origin-peer"), "127.0.0.11");
        let json: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(json["peer"], "127.0.0.11");
    }
    let resp = client.get(h2.url("/bytes/100000")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(header(&resp, "x-origin-peer"), "127.0.0.11");
    assert_eq!(resp.bytes().await.unwrap(), pattern_bytes(100_000));

    assert!(h1.log().iter().all(|r| r.peer.ip() == ip(bind)));
    assert_eq!(h2.log()[0].peer.ip(), ip(bind));
    assert_eq!(h1.accepted(), 1);
    // One tunnel per origin, each on its own client connection.
    assert_eq!(exit.connections(), 2);
    assert_eq!(exit.tunnels(), 2);
    assert_eq!(exit.forwarded(), 0);
    assert_eq!(exit.targets(), [h1.authority(), h2.authority()]);
    assert!(exit.usernames().is_empty());
    let headers = exit.request_headers();
    assert_eq!(headers.len(), 2);
    assert!(headers[0]
        .iter()
        .any(|(n, v)| n == "host" && *v == h1.authority()));

    // A target that refuses: 502, no tunnel.
    let dead = support::free_port();
    let (_tcp, status, head) = http_connect(exit.addr(), &format!("127.0.0.1:{dead}"), &[]).await;
    assert_eq!(status, 502, "{head}");
    assert_eq!(exit.tunnels(), 2);
}

#[tokio::test]
async fn exit_http_absolute_form_two_origins_one_client_connection() {
    let bind = Ipv4Addr::new(127, 0, 0, 12);
    let a = Origin::start(OriginConfig::default()).await;
    let b = Origin::start(OriginConfig::default()).await;
    let exit = FakeExit::start(FakeExitConfig::http(bind)).await;
    let mut conn = RawHttp1::connect(exit.addr()).await.unwrap();

    let resp = conn
        .request(
            "GET",
            &a.url("/echo?q=1"),
            &[("Host", &a.authority()), ("Proxy-Connection", "keep-alive")],
            b"",
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert!(!resp.connection_close());
    assert_eq!(resp.header("x-origin-peer"), Some("127.0.0.12"));
    let json = resp.json();
    assert_eq!(json["path"], "/echo?q=1");
    assert_eq!(json["peer"], "127.0.0.12");
    assert!(json["headers"].get("proxy-connection").is_none());

    let resp = conn
        .request(
            "POST",
            &b.url("/echo"),
            &[("Host", &b.authority())],
            b"hello",
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["body"], "hello");
    assert_eq!(resp.header("x-origin-peer"), Some("127.0.0.12"));
    assert_eq!(exit.connections(), 1);
    assert_eq!(exit.forwarded(), 2);
    assert_eq!(exit.tunnels(), 0);
    assert_eq!(exit.targets(), [a.authority(), b.authority()]);

    // More on the same client connection: chunked response, chunked
    // request body, HEAD, Content-Length body, a missing Host header.
    let resp = conn.get(&a.url("/chunked/50000")).await.unwrap();
    assert!(resp.chunks > 1, "{} chunks", resp.chunks);
    assert_eq!(resp.body, pattern_bytes(50_000));
    let put = format!(
        "PUT {} HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n\
         3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n",
        b.url("/put"),
        b.authority()
    );
    conn.send_raw(put.as_bytes()).await.unwrap();
    let resp = conn.read_response(false).await.unwrap();
    assert_eq!(resp.json()["body"], "abcde");
    let resp = conn
        .request(
            "HEAD",
            &a.url("/bytes/10"),
            &[("Host", &a.authority())],
            b"",
        )
        .await
        .unwrap();
    assert_eq!(resp.header("content-length"), Some("10"));
    assert!(resp.body.is_empty());
    let resp = conn.get(&b.url("/bytes/300000")).await.unwrap();
    assert_eq!(resp.body, pattern_bytes(300_000));
    conn.send_raw(format!("GET {} HTTP/1.1\r\n\r\n", a.url("/echo")).as_bytes())
        .await
        .unwrap();
    let resp = conn.read_response(false).await.unwrap();
    assert_eq!(resp.json()["headers"]["host"], a.authority());
    let resp = conn.get(&a.url("/status/404")).await.unwrap();
    assert_eq!(resp.status, 404);

    assert_eq!(exit.connections(), 1);
    assert_eq!(exit.forwarded(), 8);
    // The exit keeps one upstream connection per target.
    assert_eq!(a.accepted(), 1);
    assert_eq!(b.accepted(), 1);
    assert!(a
        .log()
        .iter()
        .chain(b.log().iter())
        .all(|r| r.peer.ip() == ip(bind) && r.path.starts_with('/')));

    // An origin closing its side is handled: the next request reconnects.
    let resp = conn.get(&a.url("/close")).await.unwrap();
    assert_eq!(resp.status, 200);
    assert!(!resp.connection_close());
    let resp = conn.get(&a.url("/echo")).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(a.accepted(), 2);

    // Expect: 100-continue is answered by the exit.
    conn.send_raw(
        format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            b.url("/echo"),
            b.authority()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    match conn.wait_event(SETTLE).await {
        RawEvent::Data(d) => assert_eq!(d, b"HTTP/1.1 100 Continue\r\n\r\n"),
        other => panic!("{other:?}"),
    }
    conn.send_raw(b"xyz").await.unwrap();
    let resp = conn.read_response(false).await.unwrap();
    assert_eq!(resp.json()["body"], "xyz");
    assert!(resp.json()["headers"].get("expect").is_none());

    // `Connection: close` from the client closes the client connection.
    let resp = conn
        .request("GET", &a.url("/echo"), &[("Connection", "close")], b"")
        .await
        .unwrap();
    assert!(resp.connection_close());
    assert!(matches!(conn.wait_event(SETTLE).await, RawEvent::Eof));
    assert_eq!(exit.connections(), 1);

    // reqwest in absolute form (plain http through Proxy::http).
    let client = proxied_client(a.ca(), reqwest::Proxy::http(exit.url()).unwrap());
    let resp = client.get(b.url("/echo")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-origin-peer"), "127.0.0.12");
    assert_eq!(exit.connections(), 2);
}

#[tokio::test]
async fn exit_http_replaces_upstream_connections_the_origin_closed() {
    let exit = FakeExit::start(FakeExitConfig::http(Ipv4Addr::new(127, 0, 0, 17))).await;
    for cfg in [
        OriginConfig {
            idle_timeout: Some(Duration::from_millis(100)),
            ..Default::default()
        },
        OriginConfig {
            rst_idle_after: Some(Duration::from_millis(100)),
            ..Default::default()
        },
        OriginConfig {
            stray_bytes_idle_after: Some(Duration::from_millis(100)),
            ..Default::default()
        },
        OriginConfig {
            max_requests_per_conn: Some(1),
            ..Default::default()
        },
    ] {
        let origin = Origin::start(cfg.clone()).await;
        let mut conn = RawHttp1::connect(exit.addr()).await.unwrap();
        for _ in 0..3 {
            let resp = conn.get(&origin.url("/echo")).await.unwrap();
            assert_eq!(resp.status, 200, "{cfg:?}");
            assert!(!resp.connection_close(), "{cfg:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(origin.accepted(), 3, "{cfg:?}");
    }
    assert_eq!(exit.connections(), 4);
    assert_eq!(exit.forwarded(), 12);
}

/// Reads one request head (this test server sends no bodies).
async fn read_request_head(tcp: &mut TcpStream) -> String {
    read_head_exactly(tcp).await
}

#[tokio::test]
async fn exit_http_retries_once_when_a_reused_upstream_dies_under_a_request() {
    // A hand-made origin: its first connection answers one request and then
    // closes when the second one arrives, unanswered; later connections
    // answer everything with "fresh".
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut first, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), ip(Ipv4Addr::new(127, 0, 0, 18)));
        read_request_head(&mut first).await;
        first
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
            .await
            .unwrap();
        assert!(!read_request_head(&mut first).await.is_empty());
        drop(first);
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                while !read_request_head(&mut tcp).await.is_empty() {
                    let ok = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
                        .await;
                    if ok.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let exit = FakeExit::start(FakeExitConfig::http(Ipv4Addr::new(127, 0, 0, 18))).await;
    let mut conn = RawHttp1::connect(exit.addr()).await.unwrap();
    let url = format!("http://{origin}/");
    assert_eq!(conn.get(&url).await.unwrap().text(), "first");
    assert_eq!(conn.get(&url).await.unwrap().text(), "fresh");
    assert_eq!(conn.get(&url).await.unwrap().text(), "fresh");
    assert_eq!(exit.forwarded(), 3);
    assert_eq!(exit.connections(), 1);
    server.abort();
}

#[tokio::test]
async fn exit_http_credentials() {
    let bind = Ipv4Addr::new(127, 0, 0, 13);
    let origin = Origin::start(OriginConfig::default()).await;
    let exit = FakeExit::start(FakeExitConfig {
        credentials: Some(("alice".into(), "s3cret".into())),
        ..FakeExitConfig::http(bind)
    })
    .await;
    assert_eq!(exit.url(), format!("http://alice:s3cret@{}", exit.addr()));
    assert_eq!(
        exit.url_with("a b", "p@ss:/"),
        format!("http://a%20b:p%40ss%3A%2F@{}", exit.addr())
    );

    // Right credentials (from the URL and via basic_auth).
    let client = proxied_client(origin.ca(), reqwest::Proxy::http(exit.url()).unwrap());
    let resp = client.get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let json: serde_json::Value = resp.json().await.unwrap();
    assert!(json["headers"].get("proxy-authorization").is_none());
    assert_eq!(json["peer"], "127.0.0.13");
    let proxy = reqwest::Proxy::http(format!("http://{}", exit.addr()))
        .unwrap()
        .basic_auth("alice", "s3cret");
    let resp = proxied_client(origin.ca(), proxy)
        .get(origin.url("/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(origin
        .log()
        .iter()
        .all(|r| r.header("proxy-authorization").is_none()));

    // Wrong password and no credentials: 407 with a Basic challenge.
    for url in [
        exit.url_with("alice", "wrong"),
        format!("http://{}", exit.addr()),
    ] {
        let client = proxied_client(origin.ca(), reqwest::Proxy::http(url).unwrap());
        let resp = client.get(origin.url("/echo")).send().await.unwrap();
        assert_eq!(resp.status(), 407);
        assert_eq!(header(&resp, "proxy-authenticate"), "Basic realm=\"fake\"");
    }
    // CONNECT: the same.
    let target = origin.authority();
    let (mut tcp, status, head) = http_connect(
        exit.addr(),
        &target,
        &[("Proxy-Authorization", &basic("alice", "nope"))],
    )
    .await;
    assert_eq!(status, 407, "{head}");
    assert!(head.contains("Proxy-Authenticate: Basic realm=\"fake\""));
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    let (tcp, status, _) = http_connect(
        exit.addr(),
        &target,
        &[("Proxy-Authorization", &basic("alice", "s3cret"))],
    )
    .await;
    assert_eq!(status, 200);
    let mut tunnel = RawHttp1::new(tcp);
    let resp = tunnel.get("/echo").await.unwrap();
    assert_eq!(resp.header("x-origin-peer"), Some("127.0.0.13"));

    assert_eq!(
        exit.usernames(),
        ["alice", "alice", "alice", "alice", "alice"]
    );
    assert_eq!(exit.forwarded(), 2);
    assert_eq!(exit.tunnels(), 1);
    let auth: Vec<Option<String>> = exit
        .request_headers()
        .iter()
        .map(|h| {
            h.iter()
                .find(|(n, _)| n == "proxy-authorization")
                .map(|(_, v)| v.clone())
        })
        .collect();
    assert_eq!(
        auth,
        [
            Some(basic("alice", "s3cret")),
            Some(basic("alice", "s3cret")),
            Some(basic("alice", "wrong")),
            None,
            Some(basic("alice", "nope")),
            Some(basic("alice", "s3cret")),
        ]
    );
}

#[tokio::test]
async fn exit_username_prefix_models_a_rotating_gateway() {
    let origin = Origin::start(OriginConfig::default()).await;
    for kind_http in [true, false] {
        let base = if kind_http {
            FakeExitConfig::http(Ipv4Addr::new(127, 0, 0, 14))
        } else {
            FakeExitConfig::socks5(Ipv4Addr::new(127, 0, 0, 14))
        };
        let exit = FakeExit::start(FakeExitConfig {
            credentials: Some(("gw-user".into(), "pw".into())),
            username_prefix: Some("gw-user-session-".into()),
            ..base
        })
        .await;
        let attempts = [
            ("gw-user-session-abc", "pw", true),
            ("gw-user-session-def", "pw", true),
            ("gw-user", "pw", true),
            ("gw-user-session-abc", "bad", false),
            ("other-session-abc", "pw", false),
        ];
        for (user, pass, ok) in attempts {
            if kind_http {
                let client = proxied_client(
                    origin.ca(),
                    reqwest::Proxy::http(exit.url_with(user, pass)).unwrap(),
                );
                let resp = client.get(origin.url("/echo")).send().await.unwrap();
                assert_eq!(resp.status() == 200, ok, "{user}:{pass}");
            } else {
                let res = socks5_connect(
                    exit.addr(),
                    Some((user, pass)),
                    SocksTarget::V4(Ipv4Addr::LOCALHOST),
                    origin.port(),
                )
                .await;
                match res {
                    Ok(_) => assert!(ok, "{user}:{pass}"),
                    Err(e) => {
                        assert!(!ok, "{user}:{pass}: {e}");
                        assert_eq!(e, "auth 1");
                    }
                }
            }
        }
        assert_eq!(
            exit.usernames(),
            attempts.iter().map(|(u, _, _)| *u).collect::<Vec<_>>()
        );
        assert!(exit.url().starts_with(if kind_http {
            "http://gw-user:pw@"
        } else {
            "socks5://gw-user:pw@"
        }));
    }
}

#[tokio::test]
async fn exit_http_connect_replies() {
    let origin = Origin::start(OriginConfig::default()).await;
    let target = origin.authority();
    let bind = Ipv4Addr::new(127, 0, 0, 15);

    let exit = FakeExit::start(FakeExitConfig {
        reply: ConnectReply::Status(502),
        ..FakeExitConfig::http(bind)
    })
    .await;
    let (mut tcp, status, _) = http_connect(exit.addr(), &target, &[]).await;
    assert_eq!(status, 502);
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    // Absolute form is answered the same way.
    let mut conn = RawHttp1::connect(exit.addr()).await.unwrap();
    let resp = conn.get(&origin.url("/echo")).await.unwrap();
    assert_eq!(resp.status, 502);
    assert!(resp.connection_close());
    // reqwest through it: CONNECT fails.
    let client = proxied_client(origin.ca(), reqwest::Proxy::all(exit.url()).unwrap());
    assert!(client
        .get(format!("https://localhost:{}/", origin.port()))
        .send()
        .await
        .is_err());
    assert_eq!(exit.tunnels(), 0);
    assert_eq!(exit.forwarded(), 0);
    assert_eq!(exit.connections(), 3);
    assert_eq!(exit.targets().len(), 3);
    assert_eq!(origin.accepted(), 0);

    let exit = FakeExit::start(FakeExitConfig {
        reply: ConnectReply::Status(407),
        ..FakeExitConfig::http(bind)
    })
    .await;
    let (_tcp, status, head) = http_connect(exit.addr(), &target, &[]).await;
    assert_eq!(status, 407);
    assert!(head.contains("Proxy-Authenticate: Basic realm=\"fake\""));

    let exit = FakeExit::start(FakeExitConfig {
        reply: ConnectReply::Status(403),
        ..FakeExitConfig::http(bind)
    })
    .await;
    let (_tcp, status, _) = http_connect(exit.addr(), &target, &[]).await;
    assert_eq!(status, 403);

    let exit = FakeExit::start(FakeExitConfig {
        reply: ConnectReply::SocksCode(5),
        ..FakeExitConfig::http(bind)
    })
    .await;
    let (_tcp, status, _) = http_connect(exit.addr(), &target, &[]).await;
    assert_eq!(status, 502);

    let exit = FakeExit::start(FakeExitConfig {
        reply: ConnectReply::Garbage,
        ..FakeExitConfig::http(bind)
    })
    .await;
    let (mut tcp, _, head) = http_connect(exit.addr(), &target, &[]).await;
    assert_eq!(head, "garbage\r\n\r\n");
    assert_eq!(tcp.read(&mut [0u8; 16]).await.unwrap(), 0);

    let exit = FakeExit::start(FakeExitConfig {
        reply: ConnectReply::Close,
        ..FakeExitConfig::http(bind)
    })
    .await;
    let (_tcp, status, head) = http_connect(exit.addr(), &target, &[]).await;
    assert_eq!((status, head.as_str()), (0, ""));
    assert_eq!(exit.targets(), [target]);
    assert_eq!(exit.tunnels(), 0);
    assert_eq!(origin.accepted(), 0);
}

#[tokio::test]
async fn exit_http_bad_input_is_answered_or_closed() {
    let origin = Origin::start(OriginConfig::default()).await;
    let exit = FakeExit::start(FakeExitConfig::http(Ipv4Addr::new(127, 0, 0, 16))).await;
    for bad in [
        &b"NONSENSE\r\n\r\n"[..],
        b"GET /origin-form HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET ftp://x/ HTTP/1.1\r\n\r\n",
        b"CONNECT no-port HTTP/1.1\r\n\r\n",
        b"GET http://x/ HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"GET http://x/ HTTP/2.0\r\n\r\n",
    ] {
        let mut conn = RawHttp1::connect(exit.addr()).await.unwrap();
        conn.send_raw(bad).await.unwrap();
        let resp = conn.read_response(false).await.unwrap();
        assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(bad));
        assert!(matches!(conn.wait_event(SETTLE).await, RawEvent::Eof));
    }
    // Half a head, then close: no answer, no harm.
    let mut tcp = TcpStream::connect(exit.addr()).await.unwrap();
    tcp.write_all(b"GET http://x/ HT").await.unwrap();
    drop(tcp);
    // Still working.
    let mut conn = RawHttp1::connect(exit.addr()).await.unwrap();
    assert_eq!(conn.get(&origin.url("/echo")).await.unwrap().status, 200);
    assert_eq!(exit.connections(), 8);
    assert_eq!(exit.forwarded(), 1);
}

#[tokio::test]
async fn exit_socks5_with_and_without_auth() {
    let origin = Origin::start(OriginConfig::default()).await;
    let tls_origin = Origin::start(OriginConfig {
        tls: true,
        ..Default::default()
    })
    .await;

    // No auth: IPv4 and domain targets.
    let bind = Ipv4Addr::new(127, 0, 0, 21);
    let exit = FakeExit::start(FakeExitConfig::socks5(bind)).await;
    assert_eq!(exit.url(), format!("socks5://{}", exit.addr()));
    let (tcp, bound) = socks5_connect(
        exit.addr(),
        None,
        SocksTarget::V4(Ipv4Addr::LOCALHOST),
        origin.port(),
    )
    .await
    .unwrap();
    assert_eq!(bound.ip(), ip(bind));
    let mut conn = RawHttp1::new(tcp);
    for _ in 0..2 {
        let resp = conn.get("/echo").await.unwrap();
        assert_eq!(resp.header("x-origin-peer"), Some("127.0.0.21"));
    }
    let (tcp, _) = socks5_connect(
        exit.addr(),
        None,
        SocksTarget::Domain("localhost"),
        tls_origin.port(),
    )
    .await
    .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls_origin.ca().client_config(&[b"http/1.1"]))
        .connect(name, tcp)
        .await
        .unwrap();
    let resp = RawHttp1::new(tls).get("/echo").await.unwrap();
    assert_eq!(resp.json()["peer"], "127.0.0.21");
    assert_eq!(tls_origin.log()[0].peer.ip(), ip(bind));
    assert_eq!(exit.connections(), 2);
    assert_eq!(exit.tunnels(), 2);
    assert_eq!(exit.forwarded(), 0);
    assert_eq!(
        exit.targets(),
        [
            format!("127.0.0.1:{}", origin.port()),
            format!("localhost:{}", tls_origin.port())
        ]
    );
    assert!(exit.usernames().is_empty());
    // A client offering only username/password is refused.
    let err = socks5_connect(
        exit.addr(),
        Some(("u", "p")),
        SocksTarget::V4(Ipv4Addr::LOCALHOST),
        origin.port(),
    )
    .await;
    assert!(err.is_ok(), "no-auth exit accepts method 2 with any creds");

    // IPv6 target (when the host has ::1).
    if let Ok(v6) = tokio::net::TcpListener::bind("[::1]:0").await {
        let port = v6.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = v6.accept().await.unwrap();
            s.write_all(b"hi").await.unwrap();
        });
        let (mut tcp, _) = socks5_connect(
            exit.addr(),
            None,
            SocksTarget::V6(Ipv6Addr::LOCALHOST),
            port,
        )
        .await
        .unwrap();
        let mut got = [0u8; 2];
        tcp.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
        server.await.unwrap();
        assert_eq!(exit.targets().last().unwrap(), &format!("[::1]:{port}"));
    }
    // A refused target: reply 0x05.
    let dead = support::free_port();
    let err = socks5_connect(
        exit.addr(),
        None,
        SocksTarget::V4(Ipv4Addr::LOCALHOST),
        dead,
    )
    .await
    .unwrap_err();
    assert_eq!(err, "reply 5");

    // With auth.
    let bind = Ipv4Addr::new(127, 0, 0, 22);
    let exit = FakeExit::start(FakeExitConfig {
        credentials: Some(("bob".into(), "pa:ss".into())),
        ..FakeExitConfig::socks5(bind)
    })
    .await;
    assert_eq!(exit.url(), format!("socks5://bob:pa%3Ass@{}", exit.addr()));
    let (tcp, _) = socks5_connect(
        exit.addr(),
        Some(("bob", "pa:ss")),
        SocksTarget::Domain("127.0.0.1"),
        origin.port(),
    )
    .await
    .unwrap();
    let resp = RawHttp1::new(tcp).get("/echo").await.unwrap();
    assert_eq!(resp.header("x-origin-peer"), Some("127.0.0.22"));
    let err = socks5_connect(
        exit.addr(),
        Some(("bob", "wrong")),
        SocksTarget::V4(Ipv4Addr::LOCALHOST),
        origin.port(),
    )
    .await
    .unwrap_err();
    assert_eq!(err, "auth 1");
    // No-auth offered to an exit that requires auth: no acceptable method.
    let err = socks5_connect(
        exit.addr(),
        None,
        SocksTarget::V4(Ipv4Addr::LOCALHOST),
        origin.port(),
    )
    .await
    .unwrap_err();
    assert_eq!(err, "method ff");
    assert_eq!(exit.usernames(), ["bob", "bob"]);
    assert_eq!(exit.tunnels(), 1);
    assert_eq!(exit.connections(), 3);
    assert!(origin
        .log()
        .iter()
        .all(|r| [ip(Ipv4Addr::new(127, 0, 0, 21)), ip(bind)].contains(&r.peer.ip())));

    // Garbage from the client: closed, exit unharmed.
    let mut tcp = TcpStream::connect(exit.addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
}

#[tokio::test]
async fn exit_socks5_replies() {
    let origin = Origin::start(OriginConfig::default()).await;
    let bind = Ipv4Addr::new(127, 0, 0, 23);
    for (reply, want) in [
        (ConnectReply::SocksCode(5), "reply 5"),
        (ConnectReply::SocksCode(2), "reply 2"),
        (ConnectReply::Status(403), "reply 1"),
        (ConnectReply::Garbage, "reply 97"),
        (ConnectReply::Close, "eof"),
    ] {
        let exit = FakeExit::start(FakeExitConfig {
            reply: reply.clone(),
            ..FakeExitConfig::socks5(bind)
        })
        .await;
        let err = socks5_connect(
            exit.addr(),
            None,
            SocksTarget::V4(Ipv4Addr::LOCALHOST),
            origin.port(),
        )
        .await
        .unwrap_err();
        assert_eq!(err, want, "{reply:?}");
        assert_eq!(exit.tunnels(), 0);
        assert_eq!(exit.targets(), [origin.authority()]);
    }
    assert_eq!(origin.accepted(), 0);
}

#[tokio::test]
async fn exit_kill_cuts_everything_and_revive_restores() {
    kill_and_revive(Ipv4Addr::new(127, 0, 0, 24)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exit_kill_and_revive_on_a_multi_thread_runtime() {
    kill_and_revive(Ipv4Addr::new(127, 0, 0, 25)).await;
}

async fn kill_and_revive(bind: Ipv4Addr) {
    let origin = Origin::start(OriginConfig::default()).await;
    let exit = FakeExit::start(FakeExitConfig::http(bind)).await;
    let addr = exit.addr();

    // An open tunnel and an open absolute-form keep-alive connection.
    let (tcp, status, _) = http_connect(addr, &origin.authority(), &[]).await;
    assert_eq!(status, 200);
    let mut tunnel = RawHttp1::new(tcp);
    assert_eq!(tunnel.get("/echo").await.unwrap().status, 200);
    let mut plain = RawHttp1::connect(addr).await.unwrap();
    assert_eq!(plain.get(&origin.url("/echo")).await.unwrap().status, 200);
    assert_eq!(origin.open_connections(), 2);

    exit.kill();
    // New connects are refused at once.
    let err = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // Both client connections are cut...
    for conn in [&mut tunnel, &mut plain] {
        let event = conn.wait_event(SETTLE).await;
        assert!(
            matches!(event, RawEvent::Eof | RawEvent::Reset),
            "{event:?}"
        );
    }
    // ...and so are the exit's connections to the origin.
    assert!(
        origin
            .wait_until(SETTLE, |o| o.open_connections() == 0)
            .await
    );
    assert!(TcpStream::connect(addr).await.is_err());
    assert_eq!(exit.connections(), 2);

    // Revive: same port, same behaviour, counters carry on.
    assert!(exit.revive().await);
    assert_eq!(exit.addr(), addr);
    let client = proxied_client(origin.ca(), reqwest::Proxy::http(exit.url()).unwrap());
    let resp = client.get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-origin-peer"), bind.to_string());
    let (tcp, status, _) = http_connect(addr, &origin.authority(), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(RawHttp1::new(tcp).get("/echo").await.unwrap().status, 200);
    assert_eq!(exit.connections(), 4);
    assert_eq!(exit.tunnels(), 2);
    assert_eq!(exit.forwarded(), 2);
    assert!(exit.revive().await, "revive while running is a no-op");

    // Kill and revive twice more; SOCKS too.
    exit.kill();
    exit.kill();
    assert!(exit.revive().await);
    // (A fresh client: the old one's pooled connection died with the kill.)
    let client = proxied_client(origin.ca(), reqwest::Proxy::http(exit.url()).unwrap());
    assert_eq!(
        client
            .get(origin.url("/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let socks = FakeExit::start(FakeExitConfig::socks5(bind)).await;
    let (tcp, _) = socks5_connect(
        socks.addr(),
        None,
        SocksTarget::V4(Ipv4Addr::LOCALHOST),
        origin.port(),
    )
    .await
    .unwrap();
    let mut conn = RawHttp1::new(tcp);
    assert_eq!(conn.get("/echo").await.unwrap().status, 200);
    socks.kill();
    assert!(matches!(
        conn.wait_event(SETTLE).await,
        RawEvent::Eof | RawEvent::Reset
    ));
    assert!(TcpStream::connect(socks.addr()).await.is_err());
    assert!(socks.revive().await);
    assert!(socks5_connect(
        socks.addr(),
        None,
        SocksTarget::V4(Ipv4Addr::LOCALHOST),
        origin.port(),
    )
    .await
    .is_ok());

    // shutdown() and drop close the listener too.
    let socks_addr = socks.addr();
    socks.shutdown().await;
    assert!(TcpStream::connect(socks_addr).await.is_err());
    drop(exit);
    assert!(TcpStream::connect(addr).await.is_err());
}
