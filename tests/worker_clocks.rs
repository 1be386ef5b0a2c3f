//! Every state has a clock (issue 12 items 1–3, 10): HTTP/2 request bodies that
//! stall get 408, HTTP/2 connections that send only their preface or never end a HEADERS
//! block are closed at `header_read_timeout`, idle intercepted HTTP/2 tunnels are closed at
//! `worker_idle_timeout` and give their tunnel place back — while connections that keep
//! working, or wait for a slow answer, are left alone; a target that stalls mid-body is cut
//! off at `upstream.response_body_idle_timeout` and its connection closed.
//!
//! Limits are shortened (header read 1 s, body idle 1 s, worker idle 2 s) so each clock runs
//! in seconds; the bounds asserted leave several seconds of slack over them.
mod gw;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gw::TestGateway;
use rustls_pki_types::pem::PemObject;
use support::{Origin, OriginConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

async fn gateway(
    extra_ca: &[std::path::PathBuf],
    tweak: impl FnOnce(&mut edgepool::config::Config),
) -> TestGateway {
    TestGateway::start_with(extra_ca, |c| {
        c.limits.header_read_timeout = Duration::from_secs(1);
        c.limits.body_idle_timeout = Duration::from_secs(1);
        c.limits.worker_idle_timeout = Duration::from_secs(2);
        tweak(c);
    })
    .await
}

/// Reads until the peer closes (or `within` passes); returns how long that took, or `None`.
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((t0 + within).into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t0.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn an_http2_connection_that_sends_only_its_preface_is_closed() {
    let gw = gateway(&[], |_| {}).await;
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(SETTINGS).await.unwrap();
    let took = closed_within(&mut s, Duration::from_secs(15)).await;
    let took = took.expect("still open 15 s later (header_read_timeout is 1 s)");
    assert!(
        took >= Duration::from_millis(900),
        "closed before its clock: {took:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_headers_block_that_never_ends_is_closed() {
    let gw = gateway(&[], |_| {}).await;
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(SETTINGS).await.unwrap();
    // HEADERS on stream 1 without END_HEADERS (flags 0): `:method GET`, then silence.
    s.write_all(&[0, 0, 1, 1, 0, 0, 0, 0, 1, 0x82])
        .await
        .unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(15))
            .await
            .is_some(),
        "a HEADERS block without END_HEADERS held the connection"
    );
    gw.stop().await;
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn an_http2_request_body_that_stalls_gets_408() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = gateway(&[], |c| c.limits.max_in_flight = 1).await;
    let tcp = TcpStream::connect(gw.proxy).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(origin.url("/echo"))
        .header("content-length", "100")
        .body(())
        .unwrap();
    let (resp, mut body) = h2.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(b"0123456789"), false)
        .unwrap();
    // ... and nothing more.
    let t0 = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(15), resp)
        .await
        .expect("no answer 15 s later (body_idle_timeout is 1 s)")
        .unwrap();
    assert_eq!(resp.status(), 408);
    assert_eq!(resp.headers()["x-edgepool-error"], "request_body_timeout");
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert_eq!(origin.requests(), 0);
    // Its place under max_in_flight (1) is free again: another worker gets through.
    let other = gw.client();
    assert_eq!(gw::get(&other, &origin.url("/echo")).await, 200);
    gw.stop().await;
}

/// A TLS client trusting only the gateway's CA, offering ALPN h2.
fn h2_tls(gw: &TestGateway) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(gw.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// CONNECT `host` through the gateway; the stream after a 200.
async fn connect(gw: &TestGateway, host: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(format!("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if head.starts_with("HTTP/1.1 200") {
        Ok(s)
    } else {
        Err(head)
    }
}

async fn settle<S: AsyncWrite + Unpin>(s: &mut S) {
    s.write_all(PREFACE).await.unwrap();
    s.write_all(SETTINGS).await.unwrap();
    s.flush().await.unwrap();
}

#[tokio::test]
async fn an_idle_intercepted_http2_tunnel_is_closed_and_its_place_freed() {
    let origin = Origin::start(OriginConfig {
        tls: true,
        h2: true,
        ..Default::default()
    })
    .await;
    let gw = gateway(&[origin.ca().cert_path.clone()], |c| {
        c.limits.max_tunnels = 1
    })
    .await;
    let host = origin.authority();
    let tcp = connect(&gw, &host).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = h2_tls(&gw).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    settle(&mut tls).await;
    // The only tunnel place is taken meanwhile.
    let refused = connect(&gw, &host)
        .await
        .expect_err("a second tunnel over max_tunnels");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    // Preface and SETTINGS, then nothing: closed by the idle clock.
    assert!(
        closed_within(&mut tls, Duration::from_secs(15))
            .await
            .is_some(),
        "the idle tunnel stayed open"
    );
    // Its place is free again.
    let mut again = None;
    for _ in 0..50 {
        if let Ok(s) = connect(&gw, &host).await {
            again = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "the tunnel place never came back");
    gw.stop().await;
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn working_connections_and_slow_answers_are_left_alone() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = gateway(&[], |_| {}).await;
    let tcp = TcpStream::connect(gw.proxy).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    // A request every 500 ms for 4 s: twice the idle limit, never idle for it.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        let req = http::Request::get(origin.url("/echo")).body(()).unwrap();
        let (resp, _) = h2.send_request(req, true).unwrap();
        assert_eq!(resp.await.unwrap().status(), 200);
        h2 = h2.ready().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // An answer slower than the idle limit (3 s > 2 s): the request is open meanwhile.
    let req = http::Request::get(origin.url("/slow?ms=3000"))
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    assert!(
        !conn.is_finished(),
        "the connection was closed while working"
    );
    assert_eq!(origin.accepted(), 1);
    gw.stop().await;
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn a_target_that_stalls_mid_body_is_cut_off() {
    // A raw origin: a response head announcing 1,000 bytes, 10 of them, then silence; it
    // reports when edgepool closes the connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = s.read(&mut buf).await;
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            .await
            .unwrap();
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        let _ = closed_tx.send(());
    });
    let gw = gateway(&[], |c| {
        c.upstream.response_body_idle_timeout = Duration::from_secs(1)
    })
    .await;
    let r = gw
        .client()
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t0 = Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(15), r.bytes())
        .await
        .expect("the worker still waits 15 s later (response_body_idle_timeout is 1 s)");
    assert!(body.is_err(), "a cut-off body must not look complete");
    assert!(t0.elapsed() >= Duration::from_millis(900));
    tokio::time::timeout(Duration::from_secs(5), closed_rx)
        .await
        .expect("the stalled connection to the target was not closed")
        .unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn a_body_that_keeps_coming_is_not_cut_off_by_its_idle_clock() {
    // 10 bytes with the head, then 10 more every 300 ms, six times: 1.8 s in all, longer than
    // the 1.5 s idle limit, but no gap comes near it. The clock restarts with every frame.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = s.read(&mut buf).await;
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 70\r\n\r\n0123456789")
            .await
            .unwrap();
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.write_all(b"abcdefghij").await.unwrap();
        }
        let _ = s.read(&mut buf).await;
    });
    let gw = gateway(&[], |c| {
        c.upstream.response_body_idle_timeout = Duration::from_millis(1500)
    })
    .await;
    let r = gw
        .client()
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(15), r.bytes())
        .await
        .expect("the body never ended")
        .expect("a body whose gaps are all shorter than the idle limit is not cut off");
    assert_eq!(
        &body[..],
        &b"0123456789abcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabcdefghij"[..]
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_blind_tunnel_is_closed_and_its_place_freed() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = gateway(&[], |c| {
        c.intercept.enabled = false;
        c.limits.max_tunnels = 1;
    })
    .await;
    let host = origin.authority();
    let mut tunnel = connect(&gw, &host).await.unwrap();
    // A request through it works (bytes move), then silence.
    tunnel
        .write_all(format!("GET /echo HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tunnel.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let took = closed_within(&mut tunnel, Duration::from_secs(15))
        .await
        .expect("the idle blind tunnel stayed open (worker_idle_timeout is 2 s)");
    assert!(
        took >= Duration::from_millis(1500),
        "closed too early: {took:?}"
    );
    assert!(
        connect(&gw, &host).await.is_ok(),
        "the tunnel place came back"
    );
    gw.stop().await;
}

/// Reads one HTTP/1.1 response with a `Content-Length` body; returns its status line.
async fn read_h1_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed mid-head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    head.lines().next().unwrap().to_string()
}

/// The idle clock counts from the end of the connection's last answer, with the limit that
/// applies after a first request (`worker_idle_timeout`, here 1 s, shorter than the 4 s
/// before a first request): an HTTP/1.1 keep-alive connection that worked for a while closes
/// about 1 s after its last answer — not earlier (counted from its first request), and not at
/// the before-first-request limit.
#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn a_keep_alive_connection_closes_one_limit_after_its_last_answer() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = gateway(&[], |c| {
        c.limits.header_read_timeout = Duration::from_secs(3);
        c.limits.worker_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        origin.url("/echo"),
        origin.authority()
    );
    // Requests for 1.6 s, longer than the idle limit, 400 ms apart.
    for _ in 0..5 {
        s.write_all(req.as_bytes()).await.unwrap();
        assert_eq!(read_h1_response(&mut s).await, "HTTP/1.1 200 OK");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // The last answer ended ≈ 400 ms ago: the close is due ≈ 600 ms from now (3 s of slack
    // for a loaded machine still tells it from the 4 s before-first-request limit).
    let closed = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("the idle connection stayed open 5 s");
    assert!(
        closed >= Duration::from_millis(450) && closed <= Duration::from_millis(3_000),
        "closed {closed:?} after the check began; due ≈ 600 ms (1 s after the last answer)"
    );
    gw.stop().await;
}
