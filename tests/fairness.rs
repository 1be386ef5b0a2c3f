//! One worker address can never lock the others out (issue 12): it holds at most
//! `limits.max_worker_share` of the requests in flight, of the tunnels and of the buffered
//! bytes, and request bodies draw on a global buffer budget (`limits.max_buffered_bytes`,
//! 503 + `Retry-After` beyond it). The attacker connects from 127.0.0.2, the honest worker
//! from 127.0.0.1.
mod gw;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use gw::TestGateway;
use support::{Origin, OriginConfig};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection to `to` from 127.0.0.2.
async fn from_other_address(to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// An h2c client from 127.0.0.2 that opens `n` POSTs whose bodies never finish; returns
/// the statuses of those answered within a moment (the refused ones) and keeps the rest open.
async fn stalled_posts(
    gw: &TestGateway,
    url: &str,
    n: usize,
    chunk: usize,
) -> (Vec<u16>, h2::client::SendRequest<Bytes>) {
    let tcp = from_other_address(gw.proxy).await;
    let (h2, conn) = h2::client::Builder::new()
        .initial_window_size(4 << 20)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let mut pending = Vec::new();
    for _ in 0..n {
        let req = http::Request::post(url)
            .header("content-length", (chunk * 4).to_string())
            .body(())
            .unwrap();
        let (resp, mut body) = h2.send_request(req, false).unwrap();
        body.reserve_capacity(chunk);
        let _ = body.send_data(Bytes::from(vec![b'x'; chunk]), false);
        pending.push((resp, body));
        h2 = h2.ready().await.unwrap();
    }
    let mut refused = Vec::new();
    for (resp, body) in pending {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(300), resp).await {
            refused.push(r.status().as_u16());
        } else {
            // Keep the stalled body open for the rest of the test.
            std::mem::forget(body);
        }
    }
    (refused, h2)
}

#[tokio::test]
async fn an_address_holding_its_share_of_in_flight_does_not_block_another() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start_with(&[], |c| {
        c.limits.max_in_flight = 8;
        c.limits.max_worker_share = 0.5;
    })
    .await;
    let (refused, _keep) = stalled_posts(&gw, &origin.url("/echo"), 6, 100).await;
    assert_eq!(
        refused,
        vec![503, 503],
        "2 of 6 over the attacker's share of 4"
    );
    // The honest worker (127.0.0.1) is served while the attack holds its share.
    let honest = gw.client();
    for _ in 0..3 {
        assert_eq!(gw::get(&honest, &origin.url("/echo")).await, 200);
    }
    let r = honest.get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    gw.stop().await;
}

#[tokio::test]
async fn buffered_bodies_draw_on_a_global_budget_and_a_share_of_it() {
    let origin = Origin::start(OriginConfig::default()).await;
    // Budget 1 MiB; the attacker may hold half of it.
    let gw = TestGateway::start_with(&[], |c| {
        c.limits.max_request_body = 1 << 20;
        c.limits.max_buffered_bytes = 1 << 20;
        c.limits.max_worker_share = 0.5;
    })
    .await;
    // Two bodies declaring 400 KiB each: the first fits the attacker's 512 KiB share, the
    // second does not.
    let (refused, _keep) = stalled_posts(&gw, &origin.url("/echo"), 2, 100 << 10).await;
    assert_eq!(refused, vec![503]);
    // The honest worker's 400 KiB body fits what is left.
    let honest = gw.client();
    let r = honest
        .post(origin.url("/echo"))
        .body(vec![b'y'; 400 << 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // With fairness off, one address can fill the budget; then everyone gets 503
    // memory_budget, with Retry-After.
    let gw2 = TestGateway::start_with(&[], |c| {
        c.limits.max_request_body = 1 << 20;
        c.limits.max_buffered_bytes = 1 << 20;
        c.limits.max_worker_share = 1.0;
    })
    .await;
    let (refused, _keep2) = stalled_posts(&gw2, &origin.url("/echo"), 2, 120 << 10).await;
    assert!(refused.is_empty(), "{refused:?}");
    let r = gw2
        .client()
        .post(origin.url("/echo"))
        .body(vec![b'y'; 400 << 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-edgepool-error"], "memory_budget");
    assert!(r.headers().contains_key("retry-after"));
    gw.stop().await;
    gw2.stop().await;
}
