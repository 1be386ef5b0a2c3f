//! Interop: edgepool exits through real upstream proxies from Debian's packages.
//!
//! * tinyproxy and squid: HTTP proxies with basic auth (CONNECT for https targets,
//!   absolute-form forwarding for http targets);
//! * microsocks: a SOCKS5 proxy with username/password auth.
//!
//! Every test runs the proxy as a child process on a free loopback port (see
//! `tests/realproxy`), configures it as the only node of edgepool's first (default) exit pool
//! `real`, and sends worker traffic through edgepool to loopback origins. Targets are addressed
//! as `127.0.0.1:PORT` (the origins' certificates carry that IP address), so no proxy has to
//! pick between `localhost`'s IPv4 and IPv6 addresses.
//!
//! The `harness_*` tests check the proxies themselves, without edgepool: when they fail, the
//! proxy setup is broken, not edgepool.
mod gw;
mod realproxy;
mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use gw::TestGateway;
use realproxy::RealProxy;
use support::{pattern_bytes, Origin, OriginConfig, TestCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Credentials every real proxy in these tests requires.
const USER: &str = "edgeuser";
const PASS: &str = "Right-pa55-e1c9";
/// A wrong password, distinctive enough to grep responses for.
const WRONG_PASS: &str = "Wrong-pa55-7f3a";
/// Name of the exit pool under test.
const POOL: &str = "real";
/// Upper bound for any single request in these tests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// helpers

/// A gateway whose first (hence default) exit pool `real` has the single node `node_url`,
/// trusting `ca` for targets.
async fn gateway_via(node_url: String, ca: &TestCa) -> TestGateway {
    TestGateway::start_with(std::slice::from_ref(&ca.cert_path), move |cfg| {
        cfg.exits.pools.push(edgepool::config::ExitPoolConfig {
            name: POOL.into(),
            nodes: vec![node_url],
            session_template: None,
            max_connections_per_node: None,
        });
    })
    .await
}

/// `real/1`: the exit id (the pool's first node) in `x-edgepool-exit` and in `/status`;
/// `/status` also names the node's address as its `endpoint`.
fn exit_name(_proxy: &RealProxy) -> String {
    format!("{POOL}/1")
}

async fn tls_origin(ca: &TestCa) -> Origin {
    Origin::start_with_ca(
        OriginConfig {
            tls: true,
            ..Default::default()
        },
        ca,
    )
    .await
}

/// `https://127.0.0.1:PORT{path}` (the origin's certificate has the IP address).
fn https_url(origin: &Origin, path: &str) -> String {
    format!("https://127.0.0.1:{}{}", origin.port(), path)
}

/// A worker with worker option `session` (proxy username `tok-session-<session>`), trusting
/// only the gateway's CA.
fn session_client(gw: &TestGateway, session: &str) -> reqwest::Client {
    let proxy = reqwest::Proxy::all(gw.proxy_url())
        .unwrap()
        .basic_auth(&format!("tok-session-{session}"), "x");
    reqwest::Client::builder()
        .proxy(proxy)
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(gw.ca_pem().as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// A response, fully read.
struct Got {
    status: reqwest::StatusCode,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("<non-ascii>"))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body[..self.body.len().min(2000)]).into_owned()
    }

    /// Status, edgepool's headers and the start of the body, for assertion messages.
    fn describe(&self) -> String {
        format!(
            "status {}, x-edgepool-error {:?}, x-edgepool-exit {:?}, x-edgepool-reused {:?}, \
             body {:?}",
            self.status,
            self.header("x-edgepool-error"),
            self.header("x-edgepool-exit"),
            self.header("x-edgepool-reused"),
            self.text()
        )
    }
}

/// GET `url` through `worker` (bounded by [`REQUEST_TIMEOUT`]); transport errors panic with
/// the proxy's logs.
async fn get(worker: &reqwest::Client, url: &str, proxy: &RealProxy, what: &str) -> Got {
    let sent = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let r = worker.get(url).send().await?;
        let status = r.status();
        let headers = r.headers().clone();
        let body = r.bytes().await?;
        Ok::<_, reqwest::Error>(Got {
            status,
            headers,
            body,
        })
    })
    .await;
    match sent {
        Ok(Ok(got)) => got,
        Ok(Err(e)) => panic!(
            "{what}: GET {url} failed in the worker: {e:?}\n{}",
            proxy.logs()
        ),
        Err(_) => panic!(
            "{what}: GET {url} took more than {REQUEST_TIMEOUT:?}\n{}",
            proxy.logs()
        ),
    }
}

/// The `/status` `exits` entry named `exit`.
async fn exit_row(gw: &TestGateway, exit: &str) -> serde_json::Value {
    let s = gw.status().await;
    s["exits"]
        .as_array()
        .unwrap_or_else(|| panic!("/status has no \"exits\" array: {s:#}"))
        .iter()
        .find(|e| e["exit"] == exit)
        .cloned()
        .unwrap_or_else(|| panic!("no /status exits entry for {exit}: {s:#}"))
}

/// How many tunnels to `target` (`127.0.0.1:PORT`) the proxy's log shows it opened, for the
/// proxies that log a tunnel when it opens (tinyproxy, microsocks); `None` for squid, which
/// logs a tunnel only when it closes.
fn tunnels_logged(proxy: &RealProxy, target: &str) -> Option<usize> {
    let log = proxy.log();
    match proxy.kind {
        // `CONNECT ... Request (file descriptor 5): CONNECT 127.0.0.1:PORT HTTP/1.1`
        "tinyproxy" => Some(
            log.lines()
                .filter(|l| l.contains(&format!("): CONNECT {target} ")))
                .count(),
        ),
        // `client[5] 127.0.0.1: connected to 127.0.0.1:PORT`
        "microsocks" => Some(
            log.lines()
                .filter(|l| l.trim_end().ends_with(&format!("connected to {target}")))
                .count(),
        ),
        _ => None,
    }
}

/// Waits (up to 2 s) until the proxy's log shows `n` tunnels to `target`, for the proxies
/// that log them on open; returns what it last saw.
async fn wait_tunnels_logged(proxy: &RealProxy, target: &str, n: usize) -> Option<usize> {
    let mut seen = tunnels_logged(proxy, target);
    for _ in 0..100 {
        if seen.is_none_or(|s| s == n) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        seen = tunnels_logged(proxy, target);
    }
    seen
}

/// Lines of the proxy's log (tinyproxy's log, squid's access log) that show it forwarded an
/// absolute-form `GET http://{target}/...`.
fn forwarded_gets_logged(proxy: &RealProxy, target: &str) -> usize {
    let needle = format!("GET http://{target}/");
    proxy.log().lines().filter(|l| l.contains(&needle)).count()
}

// ---------------------------------------------------------------------------------------------
// scenarios (each runs for every proxy it applies to)

/// 50 sequential HTTPS GETs through edgepool → proxy → TLS origin travel one tunnel.
async fn fifty_sequential_https_gets_share_one_tunnel(proxy: RealProxy) {
    const N: usize = 50;
    let ca = TestCa::new();
    let origin = tls_origin(&ca).await;
    let gw = gateway_via(proxy.url(), &ca).await;
    let worker = gw.client();
    let exit = exit_name(&proxy);

    for i in 0..N {
        let len = 100 + i;
        let what = format!("{} request {i}", proxy.kind);
        let r = get(
            &worker,
            &https_url(&origin, &format!("/bytes/{len}")),
            &proxy,
            &what,
        )
        .await;
        assert_eq!(r.status, 200, "{what}: {}\n{}", r.describe(), proxy.logs());
        assert_eq!(
            r.header("x-edgepool-error"),
            None,
            "{what}: {}",
            r.describe()
        );
        assert_eq!(
            &r.body[..],
            &pattern_bytes(len)[..],
            "{what}: body of /bytes/{len}"
        );
        assert_eq!(
            r.header("x-edgepool-exit"),
            Some(exit.as_str()),
            "{what}: {}",
            r.describe()
        );
        let expected_reused = if i == 0 { "0" } else { "1" };
        assert_eq!(
            r.header("x-edgepool-reused"),
            Some(expected_reused),
            "{what}: {}",
            r.describe()
        );
    }

    // One TCP connection reached the origin (from the proxy): one tunnel, reused 50 times.
    assert_eq!(origin.requests(), N as u64);
    assert_eq!(
        origin.accepted(),
        1,
        "origin connections (one tunnel expected); log: {:?}",
        origin
            .log()
            .iter()
            .map(|r| (r.conn_id, r.index_on_conn))
            .collect::<Vec<_>>()
    );
    assert!(origin.log().iter().all(|r| r.conn_id == 1));
    // The proxy itself opened exactly one tunnel (where it logs tunnels as they open).
    let target = format!("127.0.0.1:{}", origin.port());
    if let Some(n) = wait_tunnels_logged(&proxy, &target, 1).await {
        assert_eq!(n, 1, "tunnels in the {} log\n{}", proxy.kind, proxy.logs());
    }

    let row = exit_row(&gw, &exit).await;
    eprintln!("edgepool /status exits entry for {exit}: {row:#}");
    assert_eq!(row["endpoint"], proxy.host_port());
    assert_eq!(row["pool"], POOL, "{row:#}");
    assert_eq!(row["kind"], proxy.exit_kind(), "{row:#}");
    assert_eq!(
        row["state"], "closed",
        "circuit breaker of a healthy node: {row:#}"
    );
    assert_eq!(row["requests"], N as u64, "{row:#}");
    assert_eq!(row["new_connections"], 1, "{row:#}");
}

/// Plain-http GETs to two origins travel as absolute-form requests through the HTTP proxy.
async fn plain_http_to_two_origins_goes_absolute_form(proxy: RealProxy, via_token: &str) {
    const PER_ORIGIN: usize = 5;
    let ca = TestCa::new();
    let origins = [
        Origin::start(OriginConfig::default()).await,
        Origin::start(OriginConfig::default()).await,
    ];
    let gw = gateway_via(proxy.url(), &ca).await;
    let worker = gw.client();
    let exit = exit_name(&proxy);

    for i in 0..2 * PER_ORIGIN {
        let origin = &origins[i % 2];
        let what = format!("{} request {i} (origin {})", proxy.kind, i % 2);
        let url = format!("http://127.0.0.1:{}/echo?i={i}", origin.port());
        let r = get(&worker, &url, &proxy, &what).await;
        assert_eq!(r.status, 200, "{what}: {}\n{}", r.describe(), proxy.logs());
        assert_eq!(
            r.header("x-edgepool-error"),
            None,
            "{what}: {}",
            r.describe()
        );
        assert_eq!(
            r.header("x-edgepool-exit"),
            Some(exit.as_str()),
            "{what}: {}",
            r.describe()
        );
        if i == 0 {
            eprintln!(
                "{}: response Via as the worker sees it: {:?}",
                proxy.kind,
                r.header("via")
            );
        }
        let echo: serde_json::Value = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("{what}: echo body is not JSON ({e}): {}", r.text()));
        assert_eq!(echo["method"], "GET", "{what}: {echo:#}");
        assert!(
            echo["path"]
                .as_str()
                .is_some_and(|p| p.ends_with(&format!("/echo?i={i}"))),
            "{what}: the origin served another request: {echo:#}"
        );
        // The proxy, not edgepool, talked to the origin: it added its Via.
        assert!(
            echo["headers"]["via"]
                .as_str()
                .is_some_and(|v| v.contains(via_token)),
            "{what}: the origin saw no Via from {}: {echo:#}",
            proxy.kind
        );
    }

    for (k, origin) in origins.iter().enumerate() {
        let log = origin.log();
        assert_eq!(log.len(), PER_ORIGIN, "origin {k} requests");
        for rec in &log {
            assert!(
                rec.header("via").is_some_and(|v| v.contains(via_token)),
                "origin {k}: request without {}'s Via: {rec:?}",
                proxy.kind
            );
            // Credentials for the exit are for the exit only.
            assert_eq!(
                rec.header("proxy-authorization"),
                None,
                "origin {k} received proxy credentials: {rec:?}"
            );
        }
        // And the proxy's own log shows it forwarded them (squid logs a request when it is
        // done, give it a moment).
        let target = format!("127.0.0.1:{}", origin.port());
        let mut logged = forwarded_gets_logged(&proxy, &target);
        for _ in 0..100 {
            if logged == PER_ORIGIN {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            logged = forwarded_gets_logged(&proxy, &target);
        }
        assert_eq!(
            logged,
            PER_ORIGIN,
            "absolute-form GETs to {target} in the {} log\n{}",
            proxy.kind,
            proxy.logs()
        );
    }

    let row = exit_row(&gw, &exit).await;
    eprintln!("edgepool /status exits entry for {exit}: {row:#}");
    assert_eq!(row["pool"], POOL, "{row:#}");
    assert_eq!(row["kind"], "http", "{row:#}");
    assert_eq!(row["state"], "closed", "{row:#}");
    // `requests` counts upstream attempts. tinyproxy answers absolute-form requests with
    // HTTP/1.1 and no `Connection: close`, then closes the connection: edgepool may pool it
    // and find it dead on the next request (retried, invisible to the worker, but counted).
    assert!(
        row["requests"]
            .as_u64()
            .is_some_and(|n| n >= 2 * PER_ORIGIN as u64),
        "{row:#}"
    );
}

/// A node URL with the wrong password: the exit rejects the credentials, the worker gets a
/// 502 `exit_auth_failed`, and no password appears anywhere the worker can see.
async fn wrong_password_is_exit_auth_failed(proxy: RealProxy) {
    let ca = TestCa::new();
    let origin = tls_origin(&ca).await;
    let gw = gateway_via(proxy.url_with(USER, WRONG_PASS), &ca).await;
    let worker = gw.client();
    let what = format!("{} with a wrong password", proxy.kind);

    let r = get(&worker, &https_url(&origin, "/bytes/10"), &proxy, &what).await;
    eprintln!("{what}: {}", r.describe());
    assert_eq!(r.status, 502, "{what}: {}\n{}", r.describe(), proxy.logs());
    assert_eq!(
        r.header("x-edgepool-error"),
        Some("exit_auth_failed"),
        "{what}: {}",
        r.describe()
    );
    assert_eq!(origin.accepted(), 0, "{what}: nothing reached the origin");

    let b64 = |s: String| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    let secrets = [
        WRONG_PASS.to_string(),
        PASS.to_string(),
        b64(format!("{USER}:{WRONG_PASS}")),
    ];
    let body = String::from_utf8_lossy(&r.body).into_owned();
    for secret in &secrets {
        assert!(
            !body.contains(secret.as_str()),
            "{what}: the 502 body contains a secret ({secret}): {body}"
        );
        for (name, value) in &r.headers {
            assert!(
                !String::from_utf8_lossy(value.as_bytes()).contains(secret.as_str()),
                "{what}: response header {name} contains a secret ({secret}): {value:?}"
            );
        }
    }
    // Nor does the admin /status (node names carry no credentials).
    let status = gw.admin_get("/status").await.text().await.unwrap();
    for secret in &secrets {
        assert!(
            !status.contains(secret.as_str()),
            "{what}: /status contains a secret ({secret}): {status}"
        );
    }
}

/// Two worker sessions alternating over HTTPS never share an upstream connection.
async fn two_sessions_never_share_a_connection(proxy: RealProxy) {
    const PER_SESSION: usize = 10;
    let ca = TestCa::new();
    let origin = tls_origin(&ca).await;
    let gw = gateway_via(proxy.url(), &ca).await;
    let exit = exit_name(&proxy);
    let sessions = ["a", "b"];
    let workers = sessions.map(|s| session_client(&gw, s));
    // Origin connection ids per session, from the `x-origin-conn` response header.
    let mut conns: [BTreeSet<u64>; 2] = Default::default();

    for i in 0..PER_SESSION {
        for (k, session) in sessions.iter().enumerate() {
            let what = format!("{} session {session} request {i}", proxy.kind);
            let url = https_url(&origin, &format!("/echo?session={session}&i={i}"));
            let r = get(&workers[k], &url, &proxy, &what).await;
            assert_eq!(r.status, 200, "{what}: {}\n{}", r.describe(), proxy.logs());
            assert_eq!(
                r.header("x-edgepool-error"),
                None,
                "{what}: {}",
                r.describe()
            );
            assert_eq!(
                r.header("x-edgepool-exit"),
                Some(exit.as_str()),
                "{what}: {}",
                r.describe()
            );
            let conn: u64 = r
                .header("x-origin-conn")
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("{what}: no x-origin-conn: {}", r.describe()));
            conns[k].insert(conn);
        }
    }

    eprintln!(
        "{}: origin connections of session a {:?}, of session b {:?}",
        proxy.kind, conns[0], conns[1]
    );
    assert!(
        conns[0].is_disjoint(&conns[1]),
        "{}: sessions a and b shared origin connections: a {:?}, b {:?}",
        proxy.kind,
        conns[0],
        conns[1]
    );
    // The origin's own log agrees with the headers.
    let log = origin.log();
    assert_eq!(log.len(), 2 * PER_SESSION);
    for (k, session) in sessions.iter().enumerate() {
        let from_log: BTreeSet<u64> = log
            .iter()
            .filter(|r| r.path.contains(&format!("session={session}&")))
            .map(|r| r.conn_id)
            .collect();
        assert_eq!(
            from_log, conns[k],
            "session {session}: origin log vs headers"
        );
    }
    // Sequential requests: each session keeps reusing its own tunnel.
    assert_eq!(conns[0].len(), 1, "session a: one tunnel, reused");
    assert_eq!(conns[1].len(), 1, "session b: one tunnel, reused");
    assert_eq!(origin.accepted(), 2);
}

// ---------------------------------------------------------------------------------------------
// tinyproxy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tinyproxy_50_sequential_https_gets_share_one_tunnel() {
    let Some(proxy) = RealProxy::tinyproxy(Some((USER, PASS))) else {
        return;
    };
    fifty_sequential_https_gets_share_one_tunnel(proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tinyproxy_plain_http_to_two_origins_goes_absolute_form() {
    let Some(proxy) = RealProxy::tinyproxy(Some((USER, PASS))) else {
        return;
    };
    plain_http_to_two_origins_goes_absolute_form(proxy, "tinyproxy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tinyproxy_wrong_password_is_exit_auth_failed() {
    let Some(proxy) = RealProxy::tinyproxy(Some((USER, PASS))) else {
        return;
    };
    wrong_password_is_exit_auth_failed(proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tinyproxy_two_sessions_never_share_a_connection() {
    let Some(proxy) = RealProxy::tinyproxy(Some((USER, PASS))) else {
        return;
    };
    two_sessions_never_share_a_connection(proxy).await;
}

// ---------------------------------------------------------------------------------------------
// squid

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squid_50_sequential_https_gets_share_one_tunnel() {
    let Some(proxy) = RealProxy::squid(Some((USER, PASS))) else {
        return;
    };
    fifty_sequential_https_gets_share_one_tunnel(proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squid_plain_http_to_two_origins_goes_absolute_form() {
    let Some(proxy) = RealProxy::squid(Some((USER, PASS))) else {
        return;
    };
    plain_http_to_two_origins_goes_absolute_form(proxy, "squid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squid_wrong_password_is_exit_auth_failed() {
    let Some(proxy) = RealProxy::squid(Some((USER, PASS))) else {
        return;
    };
    wrong_password_is_exit_auth_failed(proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squid_two_sessions_never_share_a_connection() {
    let Some(proxy) = RealProxy::squid(Some((USER, PASS))) else {
        return;
    };
    two_sessions_never_share_a_connection(proxy).await;
}

// ---------------------------------------------------------------------------------------------
// microsocks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsocks_50_sequential_https_gets_share_one_tunnel() {
    let Some(proxy) = RealProxy::microsocks(Some((USER, PASS))) else {
        return;
    };
    fifty_sequential_https_gets_share_one_tunnel(proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsocks_wrong_password_is_exit_auth_failed() {
    let Some(proxy) = RealProxy::microsocks(Some((USER, PASS))) else {
        return;
    };
    wrong_password_is_exit_auth_failed(proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsocks_two_sessions_never_share_a_connection() {
    let Some(proxy) = RealProxy::microsocks(Some((USER, PASS))) else {
        return;
    };
    two_sessions_never_share_a_connection(proxy).await;
}

// ---------------------------------------------------------------------------------------------
// harness self-checks: the proxies alone, no edgepool

/// A worker straight through an HTTP proxy (`proxy_url` with credentials), trusting `ca`.
fn direct_http_proxy_client(proxy_url: &str, ca: &TestCa) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy_url).unwrap())
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// The HTTP proxy does CONNECT (to a random high port) and absolute-form with the right
/// credentials and refuses wrong ones (tinyproxy: 401 on CONNECT, squid: 407).
async fn http_proxy_harness(proxy: RealProxy) {
    let ca = TestCa::new();
    let tls = tls_origin(&ca).await;
    let plain = Origin::start(OriginConfig::default()).await;

    let client = direct_http_proxy_client(&proxy.url(), &ca);
    for i in 0..3 {
        let r = get(&client, &https_url(&tls, "/bytes/64"), &proxy, "CONNECT").await;
        assert_eq!(
            r.status,
            200,
            "CONNECT {i}: {}\n{}",
            r.describe(),
            proxy.logs()
        );
        assert_eq!(&r.body[..], &pattern_bytes(64)[..]);
    }
    // (Not asserting one tunnel here: reqwest's pool may race a new connection against the
    // return of the idle one, and finish that connection in the background.)
    assert_eq!(tls.requests(), 3);

    let url = format!("http://127.0.0.1:{}/echo", plain.port());
    let r = get(&client, &url, &proxy, "absolute-form").await;
    assert_eq!(
        r.status,
        200,
        "absolute-form: {}\n{}",
        r.describe(),
        proxy.logs()
    );
    eprintln!(
        "{}: absolute-form response Via {:?}, origin saw {:?}",
        proxy.kind,
        r.header("via"),
        plain.log()[0].headers
    );

    let wrong = direct_http_proxy_client(&proxy.url_with(USER, WRONG_PASS), &ca);
    let e = tokio::time::timeout(
        REQUEST_TIMEOUT,
        wrong.get(https_url(&tls, "/bytes/64")).send(),
    )
    .await
    .expect("bounded")
    .expect_err("CONNECT with a wrong password must fail");
    eprintln!("{}: CONNECT with a wrong password: {e:?}", proxy.kind);
    let r = get(&wrong, &url, &proxy, "absolute-form, wrong password").await;
    assert!(
        r.status == 401 || r.status == 407,
        "{}: absolute-form with a wrong password: {}",
        proxy.kind,
        r.describe()
    );
    assert_eq!(tls.requests(), 3, "no tunnel with a wrong password");
    assert_eq!(plain.requests(), 1, "no forwarding with a wrong password");
}

/// Talks SOCKS5 (RFC 1928/1929) to `proxy` and asks for a tunnel to `target`; returns the
/// stream on success, or the step that failed and the status byte.
async fn socks5_connect(
    proxy: SocketAddr,
    user: &str,
    pass: &str,
    target: SocketAddr,
) -> Result<tokio::net::TcpStream, (&'static str, u8)> {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap();
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await.unwrap();
    if choice != [5, 2] {
        return Err(("method", choice[1]));
    }
    let mut auth = vec![1, user.len() as u8];
    auth.extend_from_slice(user.as_bytes());
    auth.push(pass.len() as u8);
    auth.extend_from_slice(pass.as_bytes());
    s.write_all(&auth).await.unwrap();
    let mut verdict = [0u8; 2];
    s.read_exact(&mut verdict).await.unwrap();
    if verdict[1] != 0 {
        return Err(("auth", verdict[1]));
    }
    let SocketAddr::V4(v4) = target else {
        panic!("IPv4 targets only")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    if reply[1] != 0 {
        return Err(("connect", reply[1]));
    }
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_tinyproxy_connects_forwards_and_checks_credentials() {
    let Some(proxy) = RealProxy::tinyproxy(Some((USER, PASS))) else {
        return;
    };
    http_proxy_harness(proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_squid_connects_forwards_and_checks_credentials() {
    let Some(proxy) = RealProxy::squid(Some((USER, PASS))) else {
        return;
    };
    http_proxy_harness(proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_microsocks_tunnels_and_checks_credentials() {
    let Some(proxy) = RealProxy::microsocks(Some((USER, PASS))) else {
        return;
    };
    let origin = Origin::start(OriginConfig::default()).await;
    let mut s = tokio::time::timeout(
        REQUEST_TIMEOUT,
        socks5_connect(proxy.addr, USER, PASS, origin.addr()),
    )
    .await
    .expect("bounded")
    .unwrap_or_else(|e| panic!("SOCKS5 with the right password: {e:?}\n{}", proxy.logs()));
    s.write_all(b"GET /bytes/5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(REQUEST_TIMEOUT, s.read_to_end(&mut response))
        .await
        .expect("bounded")
        .unwrap();
    assert!(
        response.starts_with(b"HTTP/1.1 200") && response.ends_with(&pattern_bytes(5)),
        "{:?}",
        String::from_utf8_lossy(&response)
    );
    assert_eq!(
        wait_tunnels_logged(&proxy, &origin.addr().to_string(), 1).await,
        Some(1),
        "{}",
        proxy.logs()
    );

    let refused = tokio::time::timeout(
        REQUEST_TIMEOUT,
        socks5_connect(proxy.addr, USER, WRONG_PASS, origin.addr()),
    )
    .await
    .expect("bounded");
    assert!(
        matches!(refused, Err(("auth", status)) if status != 0),
        "SOCKS5 with a wrong password: {:?}",
        refused.map(|_| ())
    );
    assert_eq!(origin.accepted(), 1);
}

/// Every started proxy is gone (its pid reaped) once dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_proxies_are_killed_on_drop() {
    let starts: [fn() -> Option<RealProxy>; 3] = [
        || RealProxy::tinyproxy(None),
        || RealProxy::squid(None),
        || RealProxy::microsocks(None),
    ];
    for start in starts {
        let Some(proxy) = start() else {
            continue;
        };
        let (kind, pid, addr) = (proxy.kind, proxy.pid(), proxy.addr);
        let dir: PathBuf = proxy.dir().to_path_buf();
        let shm_prefix = proxy.squid_service().map(|s| format!("{s}-"));
        drop(proxy);
        #[cfg(target_os = "linux")]
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{kind} (pid {pid}) still exists after drop"
        );
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "{kind}: something still listens on {addr}"
        );
        assert!(!dir.exists(), "{kind}: tempdir {dir:?} removed");
        if let (Some(prefix), Ok(shm)) = (shm_prefix, std::fs::read_dir("/dev/shm")) {
            let left: Vec<_> = shm
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect();
            assert!(
                left.is_empty(),
                "{kind}: shared memory left behind: {left:?}"
            );
        }
        let _ = pid;
    }
}
