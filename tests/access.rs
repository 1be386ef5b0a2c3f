//! Access control end to end: the proxy path cannot reach edgepool itself, proxy chains that
//! loop are cut by the `Via` hop cap, and the admin listener takes a bearer token when one is
//! configured.
mod gw;
mod support;

use gw::TestGateway;
use support::{Origin, OriginConfig};

#[tokio::test]
async fn the_proxy_path_never_reaches_edgepools_own_listeners() {
    let gw = TestGateway::start(&[]).await;
    let worker = gw.client();
    for addr in [gw.proxy, gw.admin] {
        for host in [addr.to_string(), format!("localhost:{}", addr.port())] {
            let r = worker
                .get(format!("http://{host}/status"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 508, "{host}");
            assert_eq!(r.headers()["x-edgepool-error"], "loop_detected");
            let body = r.text().await.unwrap();
            assert!(
                !body.contains("\"fleet\""),
                "the admin document never leaks: {body}"
            );
        }
    }
    // Targets that merely share the loopback address are fine.
    let origin = Origin::start(OriginConfig::default()).await;
    assert_eq!(gw::get(&worker, &origin.url("/echo")).await, 200);
    gw.stop().await;
}

#[tokio::test]
async fn a_request_that_crossed_too_many_proxies_is_refused_as_a_loop() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start(&[]).await;
    let worker = gw.client();
    let via = (0..9)
        .map(|i| format!("1.1 proxy{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let r = worker
        .get(origin.url("/echo"))
        .header("via", via)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 508);
    assert_eq!(r.headers()["x-edgepool-error"], "loop_detected");
    assert_eq!(origin.requests(), 0);
    let r = worker
        .get(origin.url("/echo"))
        .header("via", "1.1 squid, 1.1 corp-proxy")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a short proxy chain is fine");
    gw.stop().await;
}

#[tokio::test]
async fn the_admin_listener_takes_a_bearer_token_when_configured() {
    let token = "s3cret-admin-token-0123";
    let gw = TestGateway::start_with(&[], |c| c.auth.admin_token = Some(token.into())).await;
    let r = gw.admin_get("/status").await;
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{}/status", gw.admin);
    let wrong = client
        .get(&url)
        .bearer_auth("s3cret-admin-token-0124")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let ok = client.get(&url).bearer_auth(token).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let body = ok.text().await.unwrap();
    assert!(body.contains("\"fleet\""));
    assert!(!body.contains(token), "the token is never echoed");
    gw.stop().await;
}
