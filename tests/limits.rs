//! Capacity limits and overload end to end: connections per worker address, requests in
//! flight (503 + Retry-After before the body is read), CONNECT tunnels, the HTTP/2 limits
//! edgepool announces, the HTTP/2 rapid-reset attack, and graceful shutdown.
mod gw;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gw::TestGateway;
use support::{Origin, OriginConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the end of a response head (or EOF / 10 s).
async fn read_head(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Whether the peer closes `s` within 5 s (reading and discarding what comes).
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn closes(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
    false
}

async fn get_on(s: &mut TcpStream, origin: &Origin, path: &str) -> String {
    let a = origin.authority();
    s.write_all(format!("GET http://{a}{path} HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_head(s).await
}

#[tokio::test]
async fn one_worker_address_cannot_take_every_connection() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start_with(&[], |c| c.limits.max_connections_per_worker = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        let head = get_on(&mut s, &origin, "/echo").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(s);
    }
    let mut fourth = TcpStream::connect(gw.proxy).await.unwrap();
    let head = read_head(&mut fourth).await;
    assert!(
        head.starts_with("HTTP/1.1 503")
            && head.contains("x-edgepool-error: worker_connection_limit")
            && head.contains("retry-after: 1"),
        "{head}"
    );
    assert!(
        closes(&mut fourth).await,
        "the refused connection is closed"
    );
    // The held connections still work, and closing one gives its place back.
    let head = get_on(&mut held[0], &origin, "/echo").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        let head = get_on(&mut s, &origin, "/echo").await;
        if head.starts_with("HTTP/1.1 200") {
            again = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        again.is_some(),
        "a place was given back when a connection closed"
    );
    gw.stop().await;
}

#[tokio::test]
async fn over_max_in_flight_a_request_gets_503_before_its_body_is_read() {
    let origin = Origin::start(OriginConfig::default()).await;
    // The global limit, from one address (fairness, tested in tests/fairness.rs, off).
    let gw = TestGateway::start_with(&[], |c| {
        c.limits.max_in_flight = 2;
        c.limits.max_worker_share = 1.0;
    })
    .await;
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        let a = origin.authority();
        s.write_all(
            format!("GET http://{a}/slow?ms=3000 HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        slow.push(s);
    }
    assert!(
        origin
            .wait_until(Duration::from_secs(5), |o| o.in_flight() == 2)
            .await,
        "two requests in flight at the origin"
    );
    // A POST announcing a megabyte it never sends: the answer cannot wait for the body.
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    let a = origin.authority();
    s.write_all(
        format!("POST http://{a}/echo HTTP/1.1\r\nHost: {a}\r\nContent-Length: 1000000\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with("HTTP/1.1 503")
            && head.contains("x-edgepool-error: overloaded")
            && head.contains("retry-after: 1"),
        "{head}"
    );
    let before = origin.requests();
    // The slow ones finish normally; then there is room again.
    for s in &mut slow {
        let head = read_head(s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    assert!(get_on(&mut s, &origin, "/echo")
        .await
        .starts_with("HTTP/1.1 200"));
    assert_eq!(
        origin.requests(),
        before + 1,
        "the refused POST never reached the origin"
    );
    gw.stop().await;
}

#[tokio::test]
async fn connect_tunnels_are_bounded() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start_with(&[], |c| c.limits.max_tunnels = 1).await;
    let connect = |a: String| format!("CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n");
    let mut first = TcpStream::connect(gw.proxy).await.unwrap();
    first
        .write_all(connect(origin.authority()).as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut first).await.starts_with("HTTP/1.1 200"));
    let mut second = TcpStream::connect(gw.proxy).await.unwrap();
    second
        .write_all(connect(origin.authority()).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut second).await;
    assert!(
        head.starts_with("HTTP/1.1 503") && head.contains("x-edgepool-error: tunnel_limit"),
        "{head}"
    );
    assert!(
        closes(&mut second).await,
        "a refused CONNECT closes the connection"
    );
    drop(first);
    let mut ok = false;
    for _ in 0..100 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        s.write_all(connect(origin.authority()).as_bytes())
            .await
            .unwrap();
        if read_head(&mut s).await.starts_with("HTTP/1.1 200") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the tunnel's place came back when it closed");
    gw.stop().await;
}

/// An HTTP/2 prior-knowledge client connection to the proxy listener.
async fn h2_client(
    proxy: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    (send, tokio::spawn(conn))
}

fn h2_get(url: &str) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
}

#[tokio::test]
async fn http2_limits_are_announced_as_configured() {
    let gw = TestGateway::start_with(&[], |c| c.limits.h2_max_streams = 17).await;
    let (send, conn) = h2_client(gw.proxy).await;
    let mut send = send.ready().await.unwrap();
    // SETTINGS arrive with the first exchange.
    let origin = Origin::start(OriginConfig::default()).await;
    let (resp, _) = send
        .send_request(h2_get(&origin.url("/echo")), true)
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    assert_eq!(send.current_max_send_streams(), 17);
    drop(send);
    let _ = conn.await;
    gw.stop().await;
}

/// Opens streams on one HTTP/2 connection and cancels each at once (or after `pace`), up to
/// 5000; returns how many went out before the connection died, and how it ended.
async fn reset_flood(
    proxy: SocketAddr,
    url: String,
    pace: Option<Duration>,
) -> (u32, Result<(), h2::Error>) {
    let (mut send, conn) = h2_client(proxy).await;
    let mut sent = 0u32;
    for _ in 0..5000 {
        send = match send.clone().ready().await {
            Ok(s) => s,
            Err(_) => break,
        };
        // Paced: a complete request (END_STREAM) that edgepool starts forwarding; burst: a
        // request whose body never comes.
        let Ok((_resp, mut stream)) = send.send_request(h2_get(&url), pace.is_some()) else {
            break;
        };
        if let Some(p) = pace {
            // Long enough for edgepool to accept the stream and start on it.
            tokio::time::sleep(p).await;
        }
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
        // Let the connection task put HEADERS + RST_STREAM on the wire.
        tokio::task::yield_now().await;
    }
    drop(send);
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the attacker's connection ends")
        .unwrap();
    (sent, ended)
}

/// How a raw HTTP/2 reset burst ended: pairs written before the connection died, and every
/// GOAWAY error code edgepool sent (read until EOF, so a GOAWAY that precedes the close is seen
/// even when the attacker's own writes already failed).
struct Burst {
    sent: u32,
    goaway_codes: Vec<u32>,
}

/// HEADERS (no END_STREAM: the body never comes) and RST_STREAM(CANCEL) back to back on one
/// raw HTTP/2 connection, up to 5000 pairs, while a reader collects the server's frames.
async fn raw_reset_burst(proxy: SocketAddr, authority: &str, path: &str) -> Burst {
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    // HPACK, no Huffman, no table: :method GET (static 2), :scheme http (static 6), :path and
    // :authority as literals with an indexed name (static 4 and 1), without indexing.
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, authority.len() as u8]);
    block.extend_from_slice(authority.as_bytes());

    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let reader = tokio::spawn(async move {
        let mut codes = Vec::new();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16384];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), rd.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                Ok(_) => break,
                Err(_) => panic!("the attacker's connection was still open after 10 s"),
            }
            while buf.len() >= 9 {
                let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
                if buf.len() < 9 + len {
                    break;
                }
                if buf[3] == 7 && len >= 8 {
                    codes.push(u32::from_be_bytes(buf[13..17].try_into().unwrap()));
                }
                buf.drain(..9 + len);
            }
        }
        codes
    });
    let mut sent = 0u32;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    if wr.write_all(&out).await.is_ok() {
        for i in 0..5000u32 {
            let id = 2 * i + 1;
            let mut pair = frame(1, 0x4, id, &block);
            pair.extend(frame(3, 0, id, &8u32.to_be_bytes())); // CANCEL
            if wr.write_all(&pair).await.is_err() {
                break;
            }
            sent += 1;
            tokio::task::yield_now().await;
        }
    }
    let goaway_codes = reader.await.unwrap();
    Burst { sent, goaway_codes }
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn rapid_reset_closes_the_attackers_connection_and_others_are_served() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start(&[]).await;
    let worker = gw.client();
    let url = origin.url("/echo");
    let mut before = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(gw::get(&worker, &url).await, 200);
        before.push(t.elapsed());
    }
    let slow = origin.url("/slow?ms=2000");
    let gw_proxy = gw.proxy;
    // Burst: HEADERS and RST_STREAM back to back, reset before edgepool accepted the stream.
    let burst = {
        let authority = origin.authority();
        tokio::spawn(async move { raw_reset_burst(gw_proxy, &authority, "/slow?ms=2000").await })
    };
    // Paced: each stream accepted and handed to a handler, then cancelled.
    let paced = tokio::spawn(reset_flood(
        gw.proxy,
        slow.clone(),
        Some(Duration::from_millis(3)),
    ));
    let mut during = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        assert_eq!(
            gw::get(&worker, &url).await,
            200,
            "an honest worker is served"
        );
        during.push(t.elapsed());
    }
    let burst = burst.await.unwrap();
    let (paced_sent, paced_end) = paced.await.unwrap();
    let rapid_resets = gw.gw.telemetry().error_count("rapid_reset");
    eprintln!(
        "rapid reset: burst cut after {} pairs (GOAWAY codes {:?}); paced cut after \
         {paced_sent} ({paced_end:?}); rapid_reset closes counted: {rapid_resets}",
        burst.sent, burst.goaway_codes
    );
    // The burst: h2's pending-accept reset limit (limits.h2_max_pending_resets, 20) answers
    // with GOAWAY ENHANCE_YOUR_CALM (0xb). Each HEADERS and its RST_STREAM go out in one write,
    // so the reset reaches the server with its stream; the limit (20) trips long before the
    // cancellation watch could (over 100). With the limit disabled, the watch cuts the burst
    // instead (measured: after 110 pairs, no GOAWAY) and this fails: it tests the limit.
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    assert!(
        burst.goaway_codes.contains(&ENHANCE_YOUR_CALM),
        "the burst connection was not sent GOAWAY ENHANCE_YOUR_CALM: GOAWAY codes {:?}, \
         {rapid_resets} rapid_reset closes, {} pairs sent",
        burst.goaway_codes,
        burst.sent
    );
    assert!(burst.sent < 5000, "the burst was cut off");
    // The paced flood: every stream is accepted, then cancelled, so only the watch can stop
    // it: after more than h2_max_cancelled_streams (100) cancellations — not before, an honest
    // connection may cancel a few — and well before twice that.
    assert!(
        (101..=200).contains(&paced_sent),
        "the paced flood must be cut just past h2_max_cancelled_streams (100): {paced_sent}"
    );
    paced_end.expect_err("the paced flood's connection was closed by edgepool");
    assert!(
        rapid_resets >= 1,
        "the paced flood's connection was closed as rapid reset"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        support::metric(&metrics, "edgepool_errors_total{error=\"rapid_reset\"}"),
        rapid_resets as f64,
        "the rapid-reset closes are in /metrics"
    );
    before.sort();
    during.sort();
    eprintln!(
        "honest worker p50 {:?} before, {:?} during the floods (max {:?})",
        before[before.len() / 2],
        during[during.len() / 2],
        during[during.len() - 1]
    );
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_sends_goaway() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start(&[]).await;
    let proxy = gw.proxy;
    // An HTTP/2 worker with a request in flight, and an HTTP/1.1 worker with one too.
    let (send, conn) = h2_client(proxy).await;
    let mut send = send.ready().await.unwrap();
    let (h2_resp, _) = send
        .send_request(h2_get(&origin.url("/slow?ms=1000")), true)
        .unwrap();
    let mut h1 = TcpStream::connect(proxy).await.unwrap();
    let a = origin.authority();
    h1.write_all(format!("GET http://{a}/slow?ms=1000 HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(
        origin
            .wait_until(Duration::from_secs(5), |o| o.in_flight() == 2)
            .await
    );
    let stopping = tokio::spawn(gw.stop());
    // Both in-flight requests complete.
    let resp = h2_resp
        .await
        .expect("the HTTP/2 request in flight completes");
    assert_eq!(resp.status(), 200);
    let head = read_head(&mut h1).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "HTTP/1.1 is told the connection closes: {head}"
    );
    // The HTTP/2 connection got GOAWAY: no new streams, then it ends cleanly.
    let refused = match send.ready().await {
        Err(_) => true,
        Ok(mut s) => match s.send_request(h2_get(&origin.url("/echo")), true) {
            Err(_) => true,
            Ok((r, _)) => r.await.is_err(),
        },
    };
    assert!(refused, "no new stream after GOAWAY");
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(ended.is_ok(), "the HTTP/2 connection ended");
    tokio::time::timeout(Duration::from_secs(15), stopping)
        .await
        .expect("shutdown completes")
        .unwrap();
    assert!(
        TcpStream::connect(proxy).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn a_refused_connect_closes_the_connection_and_a_tunnel_keeps_its_workers_place() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start_with(&[], |c| {
        c.auth.tokens = vec!["tok1234567890".into()];
        c.limits.max_connections_per_worker = 1;
    })
    .await;
    let a = origin.authority();
    // No credentials: 407, and nothing after it reaches an HTTP parser without the framer.
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(format!("CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with("HTTP/1.1 407") && head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(
        closes(&mut s).await,
        "the connection ends after a refused CONNECT"
    );
    drop(s);
    // An open tunnel still holds its worker's place.
    let auth = base64_basic("tok1234567890:x");
    let mut tunnel = None;
    for _ in 0..50 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        s.write_all(
            format!(
                "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        if read_head(&mut s).await.starts_with("HTTP/1.1 200") {
            tunnel = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _tunnel = tunnel.expect("a tunnel opens once the refused connection's place is back");
    let mut second = TcpStream::connect(gw.proxy).await.unwrap();
    let head = read_head(&mut second).await;
    assert!(
        head.starts_with("HTTP/1.1 503") && head.contains("worker_connection_limit"),
        "the tunnel still counts against the worker: {head}"
    );
    gw.stop().await;
}

fn base64_basic(creds: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(creds)
}
