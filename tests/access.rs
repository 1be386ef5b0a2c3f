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

#[tokio::test]
async fn a_looping_upgrade_inside_a_tunnel_is_refused_and_its_connection_closed() {
    // Plain HTTP inside an intercepted CONNECT: an upgrade request whose Via chain is a loop.
    // The framer passes whatever follows an upgrade head unparsed, so the refusal must close
    // the connection (anything after it would reach hyper unchecked).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start(&[]).await;
    let host = origin.authority();
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(format!("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // The CONNECT's 200, up to its blank line.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    let via = (0..9)
        .map(|i| format!("1.1 proxy{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    s.write_all(
        format!(
            "GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Via: {via}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_end(&mut answer),
    )
    .await
    .expect("the connection is closed after the refusal")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 508"), "{answer}");
    assert!(
        answer.contains("x-edgepool-error: loop_detected"),
        "{answer}"
    );
    assert!(answer.contains("connection: close"), "{answer}");
    assert_eq!(origin.requests(), 0);
    gw.stop().await;
}

/// Sends one raw request to the proxy and returns the status line and headers.
async fn raw(proxy: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the proxy answers")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn odd_spellings_of_loopback_are_read_as_the_url_parser_reads_them_and_refused() {
    let origin = Origin::start(OriginConfig::default()).await;
    let p = origin.port();
    // No exceptions to the deny list: loopback is forbidden however it is written.
    let gw = TestGateway::start_with(&[], |c| c.targets.allow.clear()).await;
    let hosts = [
        format!("127.0.0.1:{p}"),
        format!("2130706433:{p}"),
        format!("0x7f.1:{p}"),
        format!("017700000001:{p}"),
        format!("0x7f000001:{p}"),
        format!("127.1:{p}"),
        format!("[::ffff:127.0.0.1]:{p}"),
        format!("[::ffff:7f00:1]:{p}"),
        format!("localhost:{p}"),
        format!("LOCALHOST.:{p}"),
        format!("a.example@127.0.0.1:{p}"),
    ];
    for h in &hosts {
        let head = raw(
            gw.proxy,
            &format!("GET http://{h}/echo HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(
            head.starts_with("HTTP/1.1 400") && head.contains("x-edgepool-error: target_forbidden"),
            "{h}: {head}"
        );
    }
    for h in ["2130706433:443", "0x7f.1:443", "[::ffff:127.0.0.1]:443"] {
        let head = raw(
            gw.proxy,
            &format!("CONNECT {h} HTTP/1.1\r\nHost: {h}\r\n\r\n"),
        )
        .await;
        assert!(
            head.starts_with("HTTP/1.1 400") && head.contains("target_forbidden"),
            "CONNECT {h}: {head}"
        );
    }
    assert_eq!(origin.requests(), 0, "nothing reached the loopback origin");
    gw.stop().await;
}

#[tokio::test]
async fn the_hop_cap_holds_inside_intercepted_tunnels_over_http1_and_http2() {
    let origin = Origin::start(OriginConfig {
        tls: true,
        ..Default::default()
    })
    .await;
    let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
    let via = (0..9)
        .map(|i| format!("1.1 proxy{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let h2 = gw.client();
    let h1 = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(gw.proxy_url()).unwrap())
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(gw.ca_pem().as_bytes()).unwrap())
        .http1_only()
        .build()
        .unwrap();
    for (client, version) in [
        (&h1, reqwest::Version::HTTP_11),
        (&h2, reqwest::Version::HTTP_2),
    ] {
        let r = client
            .get(origin.url("/echo"))
            .header("via", via.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), version, "intercepted over {version:?}");
        assert_eq!(r.status(), 508, "{version:?}");
        assert_eq!(r.headers()["x-edgepool-error"], "loop_detected");
        let ok = client
            .get(origin.url("/echo"))
            .header("via", "1.1 squid")
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200, "{version:?}: a short chain is fine");
    }
    assert_eq!(
        origin.requests(),
        2,
        "only the two short-chain requests got through"
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_exit_pointing_at_edgepool_itself_is_a_loop_never_dialled() {
    use edgepool::config::{Config, ExitPoolConfig};
    let origin = Origin::start(OriginConfig::default()).await;
    // The proxy listener first, so the exit can name it (by address and by name).
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = proxy.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config {
        data_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    cfg.targets.allow = vec!["127.0.0.0/8".parse().unwrap()];
    cfg.targets.connect_ports = vec!["1-65535".parse().unwrap()];
    for (name, node) in [
        ("selfip", format!("http://127.0.0.1:{port}")),
        ("selfname", format!("socks5://localhost:{port}")),
    ] {
        cfg.exits.pools.push(ExitPoolConfig {
            name: name.into(),
            nodes: vec![node],
            session_template: None,
            max_connections_per_node: None,
        });
    }
    cfg.validate().unwrap();
    let gw = edgepool::gateway::Gateway::new(cfg).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(gw.clone().serve(proxy, admin, async move {
        let _ = rx.await;
    }));
    let worker = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://127.0.0.1:{port}")).unwrap())
        .build()
        .unwrap();
    for pool in ["selfip", "selfname"] {
        let r = worker
            .get(origin.url("/echo"))
            .header("x-edgepool-session", format!("session-s1-pool-{pool}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 508, "{pool}");
        assert_eq!(r.headers()["x-edgepool-error"], "loop_detected", "{pool}");
        let body = r.text().await.unwrap();
        assert!(body.contains("edgepool's own listener"), "{pool}: {body}");
    }
    assert_eq!(origin.requests(), 0);
    let _ = tx.send(());
    let _ = task.await;
}

#[tokio::test]
async fn the_admin_listener_has_a_head_clock_and_a_connection_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::start_with(&[], |c| {
        c.limits.header_read_timeout = std::time::Duration::from_secs(1)
    })
    .await;
    /// Whether the peer closes `s` within `secs`.
    async fn closes(s: &mut tokio::net::TcpStream, secs: u64) -> bool {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(secs), s.read(&mut buf)).await
            {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
    // Slowloris: half a head, then nothing. Closed by the head clock.
    let mut slow = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    slow.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closes(&mut slow, 10).await,
        "a half head held the admin connection"
    );

    // Fill the cap with idle connections (they would each be closed by the clock too; a
    // longer clock would not change the count).
    let mut held = Vec::new();
    for _ in 0..edgepool::admin::ADMIN_MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(gw.admin).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut over = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    assert!(
        closes(&mut over, 1).await,
        "a connection over the cap was served"
    );
    // Once the idle ones are gone, the admin listener answers again.
    drop(held);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(gw.admin_get("/healthz").await.status(), 200);
    gw.stop().await;
}
