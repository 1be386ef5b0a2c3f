//! End-to-end: exits (upstream proxies), sticky sessions, rotation and worker tokens — real
//! workers (reqwest) through the real gateway and in-process fake exits (HTTP CONNECT /
//! absolute-form and SOCKS5) to real loopback origins. Each fake exit binds its outbound
//! sockets to its own loopback address, so the origin can tell which exit carried a request
//! (`x-origin-peer`).
mod gw;
mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use edgepool::config::{Config, ExitPoolConfig};
use gw::TestGateway;
use support::exits::{ConnectReply, FakeExit, FakeExitConfig};
use support::{Origin, OriginConfig};

fn tls() -> OriginConfig {
    OriginConfig {
        tls: true,
        ..Default::default()
    }
}

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

async fn http_exit(n: u8) -> FakeExit {
    let mut c = FakeExitConfig::http(ip(n));
    c.credentials = Some((format!("user{n}"), format!("pw-secret-{n}")));
    FakeExit::start(c).await
}

fn pool(name: &str, exits: &[&FakeExit]) -> ExitPoolConfig {
    ExitPoolConfig {
        name: name.into(),
        nodes: exits.iter().map(|e| e.url()).collect(),
        session_template: None,
        max_connections_per_node: None,
    }
}

/// The exit id of the `n`-th node (1-based) of `pool`.
fn label(pool: &str, n: usize) -> String {
    format!("{pool}/{n}")
}

/// A worker whose proxy username is `username` (options after the token).
fn worker(gw: &TestGateway, username: &str, extra_root: Option<&str>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::all(gw.proxy_url())
                .unwrap()
                .basic_auth(username, "ignored"),
        )
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(gw.ca_pem().as_bytes()).unwrap());
    if let Some(pem) = extra_root {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

struct Got {
    status: u16,
    exit: String,
    peer: String,
    conn: String,
    reused: String,
    error: String,
    renewed: bool,
    body: String,
}

async fn fetch(c: &reqwest::Client, url: &str) -> Got {
    let r = c.get(url).send().await.unwrap();
    let h = |n: &str| {
        r.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let (status, exit, peer, conn, reused, error) = (
        r.status().as_u16(),
        h("x-edgepool-exit"),
        h("x-origin-peer"),
        h("x-origin-conn"),
        h("x-edgepool-reused"),
        h("x-edgepool-error"),
    );
    let renewed = h("x-edgepool-session-renewed") == "1";
    let body = r.text().await.unwrap();
    Got {
        status,
        exit,
        peer,
        conn,
        reused,
        error,
        renewed,
        body,
    }
}

fn exit_row(status: &serde_json::Value, exit: &str) -> serde_json::Value {
    status["exits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["exit"] == exit)
        .cloned()
        .unwrap_or_else(|| panic!("no exit {exit} in {status:#}"))
}

#[tokio::test]
async fn https_through_an_http_exit_reuses_one_tunnel_and_keeps_credentials_apart() {
    let origin = Origin::start(tls()).await;
    let exit = http_exit(11).await;
    let p = pool("dc", &[&exit]);
    let gw = TestGateway::start_with(&[origin.ca().cert_path.clone()], |c: &mut Config| {
        c.exits.pools.push(p);
    })
    .await;
    let w = worker(&gw, "anyone", None);
    for i in 0..20 {
        let g = fetch(&w, &origin.url("/echo")).await;
        assert_eq!(g.status, 200, "{}", g.body);
        assert_eq!(g.exit, label("dc", 1));
        assert_eq!(g.peer, "127.0.0.11", "the exit carried it");
        assert_eq!(g.reused, if i == 0 { "0" } else { "1" });
    }
    assert_eq!(origin.accepted(), 1, "one tunnel, reused 20 times");
    assert_eq!(exit.tunnels(), 1);
    // The exit saw its own credentials on the CONNECT, never the worker's.
    let headers = exit.request_headers();
    let auth: Vec<&str> = headers[0]
        .iter()
        .filter(|(n, _)| n == "proxy-authorization")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(auth.len(), 1);
    assert_eq!(exit.usernames(), vec!["user11".to_string()]);
    // The target saw neither the exit's nor the worker's proxy credentials.
    for rec in origin.log() {
        assert!(rec.header("proxy-authorization").is_none());
        assert!(rec.header("x-edgepool-session").is_none());
    }
    let s = gw.status().await;
    let row = exit_row(&s, &label("dc", 1));
    assert_eq!(row["requests"], 20);
    assert_eq!(row["new_connections"], 1);
    assert_eq!(row["state"], "closed");
    assert_eq!(row["kind"], "http");
    assert!(
        !s.to_string().contains("pw-secret"),
        "no credentials in /status"
    );
    let t = gw.target_status(&origin.authority()).await;
    assert_eq!(t["top_exit"], label("dc", 1));
    let m = gw.metrics().await;
    assert!(
        m.contains(&format!(
            "edgepool_exit_requests_total{{pool=\"dc\",exit=\"{}\",reused=\"1\"}} 19",
            label("dc", 1)
        )),
        "{m}"
    );
    assert!(!m.contains("pw-secret"));
    gw.stop().await;
}

#[tokio::test]
async fn plain_http_rides_one_proxy_connection_to_many_targets_in_absolute_form() {
    let a = Origin::start(OriginConfig::default()).await;
    let b = Origin::start(OriginConfig::default()).await;
    let exit = http_exit(12).await;
    let p = pool("dc", &[&exit]);
    let gw = TestGateway::start_with(&[], |c| c.exits.pools.push(p)).await;
    let w = worker(&gw, "anyone", None);
    for i in 0..10 {
        let o = if i % 2 == 0 { &a } else { &b };
        let g = fetch(&w, &o.url("/echo")).await;
        assert_eq!(g.status, 200, "{}", g.body);
        assert_eq!(g.peer, "127.0.0.12");
        assert_eq!(g.reused, if i == 0 { "0" } else { "1" }, "request {i}");
    }
    assert_eq!(
        exit.connections(),
        1,
        "one proxy connection for both targets"
    );
    assert_eq!(exit.forwarded(), 10);
    assert_eq!(exit.tunnels(), 0, "absolute form, not CONNECT");
    // Every forwarded request carried the exit's credentials; the targets saw none.
    for h in exit.request_headers() {
        assert!(h.iter().any(|(n, _)| n == "proxy-authorization"));
    }
    for rec in a.log().into_iter().chain(b.log()) {
        assert!(rec.header("proxy-authorization").is_none());
    }
    // Reuse is accounted per target even though the connection is the exit's.
    let ta = gw.target_status(&a.authority()).await;
    let tb = gw.target_status(&b.authority()).await;
    assert_eq!(ta["requests"], 5);
    assert_eq!(tb["requests"], 5);
    assert_eq!(
        ta["new_connections"].as_u64().unwrap() + tb["new_connections"].as_u64().unwrap(),
        1
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_socks5_exit_with_credentials_carries_https() {
    let origin = Origin::start(tls()).await;
    let mut c = FakeExitConfig::socks5(ip(13));
    c.credentials = Some(("sock".into(), "sockpw".into()));
    let exit = FakeExit::start(c).await;
    let p = pool("socks", &[&exit]);
    let gw =
        TestGateway::start_with(&[origin.ca().cert_path.clone()], |c| c.exits.pools.push(p)).await;
    let w = worker(&gw, "anyone", None);
    for _ in 0..10 {
        let g = fetch(&w, &origin.url("/echo")).await;
        assert_eq!(g.status, 200, "{}", g.body);
        assert_eq!(g.peer, "127.0.0.13");
        assert_eq!(g.exit, label("socks", 1));
    }
    assert_eq!(exit.tunnels(), 1);
    assert_eq!(origin.accepted(), 1);
    assert_eq!(exit.targets()[0], format!("localhost:{}", origin.port()));
    gw.stop().await;
}

#[tokio::test]
async fn sessions_pin_an_exit_and_never_share_a_connection() {
    let origin = Origin::start(tls()).await;
    let e1 = http_exit(21).await;
    let e2 = http_exit(22).await;
    let p = pool("dc", &[&e1, &e2]);
    let gw = TestGateway::start_with(&[origin.ca().cert_path.clone()], |c| {
        c.exits.pools.push(p);
        c.auth.tokens = vec!["tok".into()];
    })
    .await;
    let sa = worker(&gw, "tok-session-a", None);
    let sb = worker(&gw, "tok-session-b", None);
    let (mut conns_a, mut conns_b) = (Vec::new(), Vec::new());
    let (mut exits_a, mut exits_b) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let a = fetch(&sa, &origin.url("/echo")).await;
        let b = fetch(&sb, &origin.url("/echo")).await;
        assert_eq!((a.status, b.status), (200, 200));
        conns_a.push(a.conn);
        conns_b.push(b.conn);
        exits_a.push(a.exit);
        exits_b.push(b.exit);
    }
    assert!(
        conns_a.iter().all(|c| !conns_b.contains(c)),
        "{conns_a:?} vs {conns_b:?}"
    );
    exits_a.dedup();
    exits_b.dedup();
    assert_eq!(exits_a.len(), 1, "session a keeps its exit");
    assert_eq!(exits_b.len(), 1, "session b keeps its exit");
    conns_a.dedup();
    assert_eq!(conns_a.len(), 1, "a session reuses its own connection");
    let t = gw.target_status(&origin.authority()).await;
    assert_eq!(t["new_by_reason"]["new_session"], 2);
    // X-Edgepool-Session on an intercepted request overrides the username's session.
    let r = sa
        .get(origin.url("/echo"))
        .header("x-edgepool-session", "b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-edgepool-exit"].to_str().unwrap(), exits_b[0]);
    assert!(conns_b.contains(&r.headers()["x-origin-conn"].to_str().unwrap().to_string()));
    r.bytes().await.unwrap();
    gw.stop().await;
}

/// Two gateways of one fleet (one data dir, so one CA and one fleet key), rendezvous session
/// choice, the pool listed in a different order on each: every session leaves through the
/// same exit whichever gateway a request reaches — the origin sees the same exit address —
/// and when that exit dies, both move the session to the same other exit.
#[tokio::test]
async fn fleet_gateways_sharing_a_ca_send_each_session_through_the_same_exit() {
    let origin = Origin::start(tls()).await;
    let exits = [
        http_exit(31).await,
        http_exit(32).await,
        http_exit(33).await,
        http_exit(34).await,
    ];
    let forward: Vec<&FakeExit> = exits.iter().collect();
    let backward: Vec<&FakeExit> = exits.iter().rev().collect();
    let extra = [origin.ca().cert_path.clone()];
    let gw1 = TestGateway::start_with(&extra, |c| {
        c.exits.pools.push(pool("dc", &forward));
        c.exits.session_choice = edgepool::exits::SessionChoice::Rendezvous;
        c.auth.tokens = vec!["tok".into()];
    })
    .await;
    let shared = gw1.data_dir.path().to_path_buf();
    let gw2 = TestGateway::start_with(&extra, |c| {
        c.data_dir = Some(shared);
        // Another node: another instance name, so its own report store in the shared dir.
        c.listen.proxy.set_port(18081);
        c.exits.pools.push(pool("dc", &backward));
        c.exits.session_choice = edgepool::exits::SessionChoice::Rendezvous;
        c.auth.tokens = vec!["tok".into()];
    })
    .await;
    assert_eq!(gw1.ca_pem(), gw2.ca_pem(), "one CA for the fleet");
    let mut homes = Vec::new();
    for i in 0..12 {
        let user = format!("tok-session-s{i}");
        let (w1, w2) = (worker(&gw1, &user, None), worker(&gw2, &user, None));
        let mut peers = Vec::new();
        for _ in 0..2 {
            for w in [&w1, &w2] {
                let got = fetch(w, &origin.url("/echo")).await;
                assert_eq!(got.status, 200, "{}", got.error);
                peers.push(got.peer);
            }
        }
        peers.dedup();
        assert_eq!(
            peers.len(),
            1,
            "session s{i}: one exit on both gateways: {peers:?}"
        );
        homes.push(peers.remove(0));
    }
    let mut distinct = homes.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() >= 2,
        "12 sessions over 4 exits used {distinct:?}"
    );
    // Session s0's exit dies: both gateways move it, to the same exit.
    let dead = exits
        .iter()
        .find(|e| homes[0].starts_with(&e.config().bind_ip.to_string()))
        .expect("s0's exit is one of ours");
    dead.kill();
    let user = "tok-session-s0";
    let (w1, w2) = (worker(&gw1, user, None), worker(&gw2, user, None));
    let (a, b) = (
        fetch(&w1, &origin.url("/echo")).await,
        fetch(&w2, &origin.url("/echo")).await,
    );
    assert_eq!(
        (a.status, b.status),
        (200, 200),
        "{} / {}",
        a.error,
        b.error
    );
    assert_eq!(a.peer, b.peer, "the same failover exit on both gateways");
    assert_ne!(a.peer, homes[0]);
    assert!(a.renewed && b.renewed, "the worker hears its session moved");
    gw2.stop().await;
    gw1.stop().await;
}

#[tokio::test]
async fn worker_tokens_and_options_are_checked_with_precise_errors() {
    let origin = Origin::start(OriginConfig::default()).await;
    let exit = http_exit(23).await;
    let p = pool("dc", &[&exit]);
    let gw = TestGateway::start_with(&[], |c| {
        c.exits.pools.push(p);
        c.auth.tokens = vec!["tok".into()];
    })
    .await;
    let anon = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(gw.proxy_url()).unwrap())
        .build()
        .unwrap();
    let r = anon.get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 407);
    assert_eq!(r.headers()["x-edgepool-error"], "proxy_auth_required");
    assert_eq!(
        r.headers()["proxy-authenticate"],
        "Basic realm=\"edgepool\""
    );
    let cases = [
        ("nottok", 407, "proxy_auth_failed", ""),
        ("tok-sesstime-0", 407, "bad_proxy_option", "sesstime"),
        ("tok-colour-blue", 407, "bad_proxy_option", "colour"),
        ("tok-pool-nope", 400, "unknown_exit_pool", "nope"),
    ];
    for (user, status, token, names) in cases {
        let g = fetch(&worker(&gw, user, None), &origin.url("/echo")).await;
        assert_eq!(g.status, status, "{user}: {}", g.body);
        assert_eq!(g.error, token, "{user}");
        assert!(g.body.contains(names), "{user}: {}", g.body);
        if token == "proxy_auth_failed" {
            assert!(!g.body.contains("nottok"), "never echo a token: {}", g.body);
        }
        if token == "unknown_exit_pool" {
            // Refused while routing: the worker learns nothing was sent (safe to fix and retry).
            let body: serde_json::Value = serde_json::from_str(&g.body).unwrap();
            assert_eq!(body["request_sent"], "none", "{}", g.body);
        }
    }
    let g = fetch(&worker(&gw, "tok-pool-direct", None), &origin.url("/echo")).await;
    assert_eq!(
        (g.status, g.error.as_str()),
        (400, "direct_not_allowed"),
        "exits configured: workers cannot bypass them by default"
    );
    let body: serde_json::Value = serde_json::from_str(&g.body).unwrap();
    assert_eq!(body["request_sent"], "none", "{}", g.body);
    gw.stop().await;
    let exit = http_exit(24).await;
    let p = pool("dc", &[&exit]);
    let gw = TestGateway::start_with(&[], |c| {
        c.exits.pools.push(p);
        c.exits.allow_direct = Some(true);
        c.auth.tokens = vec!["tok".into()];
    })
    .await;
    let g = fetch(&worker(&gw, "tok-pool-direct", None), &origin.url("/echo")).await;
    assert_eq!((g.status, g.exit.as_str()), (200, "direct"));
    assert_eq!(
        origin.requests(),
        1,
        "only the valid request reached the target"
    );
    gw.stop().await;
}

#[tokio::test]
async fn exit_failures_get_precise_errors_and_no_credentials_leak() {
    let origin = Origin::start(tls()).await;
    let good = http_exit(31).await;
    let refusing = {
        let mut c = FakeExitConfig::http(ip(32));
        c.reply = ConnectReply::Status(403);
        FakeExit::start(c).await
    };
    let garbage = {
        let mut c = FakeExitConfig::http(ip(33));
        c.reply = ConnectReply::Garbage;
        FakeExit::start(c).await
    };
    let pools = vec![
        ExitPoolConfig {
            name: "wrongpw".into(),
            nodes: vec![good.url_with("user31", "not-the-password")],
            session_template: None,
            max_connections_per_node: None,
        },
        pool("refusing", &[&refusing]),
        pool("garbage", &[&garbage]),
    ];
    let gw = TestGateway::start_with(&[origin.ca().cert_path.clone()], |c| {
        c.exits.pools = pools;
        c.exits.circuit_failures = 2;
    })
    .await;
    let w = |p: &str| worker(&gw, &format!("t-pool-{p}"), None);
    let g = fetch(&w("wrongpw"), &origin.url("/echo")).await;
    assert_eq!(
        (g.status, g.error.as_str()),
        (502, "exit_auth_failed"),
        "{}",
        g.body
    );
    assert!(!g.body.contains("not-the-password") && !g.body.contains("user31"));
    let g = fetch(&w("refusing"), &origin.url("/echo")).await;
    assert_eq!(
        (g.status, g.error.as_str()),
        (502, "exit_refused"),
        "{}",
        g.body
    );
    assert!(g.body.contains("403"), "{}", g.body);
    let g = fetch(&w("garbage"), &origin.url("/echo")).await;
    assert_eq!(
        (g.status, g.error.as_str()),
        (502, "exit_connect_failed"),
        "{}",
        g.body
    );
    // A refusal is the target's problem, not the node's: its circuit stays closed. Garbage is
    // the node's: after circuit_failures it opens and the pool answers 503 + Retry-After.
    let g = fetch(&w("garbage"), &origin.url("/echo")).await;
    assert_eq!(g.error, "exit_connect_failed");
    let r = w("garbage").get(origin.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-edgepool-error"], "no_healthy_exit");
    assert!(r.headers().contains_key("retry-after"));
    r.bytes().await.unwrap();
    let s = gw.status().await;
    assert_eq!(exit_row(&s, &label("garbage", 1))["state"], "open");
    assert_eq!(exit_row(&s, &label("refusing", 1))["state"], "closed");
    assert!(!s.to_string().contains("not-the-password"));
    assert_eq!(origin.requests(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn a_dead_exit_fails_over_its_circuit_opens_and_status_shows_it() {
    let origin = Origin::start(tls()).await;
    let e1 = http_exit(41).await;
    let e2 = http_exit(42).await;
    let p = pool("dc", &[&e1, &e2]);
    let gw = TestGateway::start_with(&[origin.ca().cert_path.clone()], |c| {
        c.exits.pools.push(p);
        c.exits.circuit_failures = 1;
    })
    .await;
    let w = worker(&gw, "t", None);
    let first = fetch(&w, &origin.url("/echo")).await;
    assert_eq!(first.status, 200);
    let (dead, alive, dead_label, alive_label) = if first.exit == label("dc", 1) {
        (&e1, &e2, label("dc", 1), label("dc", 2))
    } else {
        (&e2, &e1, label("dc", 2), label("dc", 1))
    };
    let _ = alive;
    dead.kill();
    for _ in 0..10 {
        let g = fetch(&w, &origin.url("/echo")).await;
        assert_eq!(g.status, 200, "GETs survive the dead exit: {}", g.body);
        assert_eq!(g.exit, alive_label.clone());
    }
    let s = gw.status().await;
    let d = exit_row(&s, &dead_label.clone());
    assert_eq!(d["state"], "open", "{d:#}");
    assert!(d["failures"].as_u64().unwrap() >= 1);
    assert!(
        d["last_error"].as_str().unwrap().contains("connect"),
        "{d:#}"
    );
    assert_eq!(exit_row(&s, &alive_label.clone())["state"], "closed");
    // After the backoff a probe finds the revived node and closes the circuit.
    assert!(dead.revive().await);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut closed = false;
    for t in 0..20 {
        let other = Origin::start(tls()).await;
        let _ = t;
        let _ = fetch(&worker(&gw, "t", None), &other.url("/x")).await;
        if exit_row(&gw.status().await, &dead_label.clone())["state"] == "closed" {
            closed = true;
            break;
        }
    }
    assert!(closed, "the probe closed the circuit");
    gw.stop().await;
}

#[tokio::test]
async fn flex_sessions_are_renewed_and_strict_sessions_fail() {
    let origin = Origin::start(tls()).await;
    for strict in [false, true] {
        let e1 = http_exit(51).await;
        let e2 = http_exit(52).await;
        let p = pool("dc", &[&e1, &e2]);
        let gw = TestGateway::start_with(&[origin.ca().cert_path.clone()], |c| {
            c.exits.pools.push(p);
            if strict {
                c.exits.session_mode = edgepool::exits::SessionMode::Strict;
            }
        })
        .await;
        let w = worker(&gw, "t-session-keep", None);
        let first = fetch(&w, &origin.url("/echo")).await;
        assert_eq!(first.status, 200);
        let (dead, alive_label) = if first.exit == label("dc", 1) {
            (&e1, label("dc", 2))
        } else {
            (&e2, label("dc", 1))
        };
        dead.kill();
        let g = fetch(&w, &origin.url("/echo")).await;
        if strict {
            assert_eq!(
                (g.status, g.error.as_str()),
                (502, "session_exit_lost"),
                "{}",
                g.body
            );
        } else {
            assert_eq!(g.status, 200, "{}", g.body);
            assert!(g.renewed, "X-Edgepool-Session-Renewed: 1");
            assert_eq!(g.exit, alive_label.clone());
            let again = fetch(&w, &origin.url("/echo")).await;
            assert_eq!(again.exit, alive_label.clone());
            assert!(!again.renewed, "renewed once, then sticky again");
        }
        gw.stop().await;
    }
}

#[tokio::test]
async fn rotate_request_is_counted_as_forced_rotation_apart_from_pool_misses() {
    let origin = Origin::start(tls()).await;
    let e1 = http_exit(61).await;
    let e2 = http_exit(62).await;
    let p = pool("dc", &[&e1, &e2]);
    let gw =
        TestGateway::start_with(&[origin.ca().cert_path.clone()], |c| c.exits.pools.push(p)).await;
    let sticky = worker(&gw, "t", None);
    let rotating = worker(&gw, "t-rotate-request", None);
    let mut last = String::new();
    for _ in 0..10 {
        assert_eq!(fetch(&sticky, &origin.url("/echo")).await.status, 200);
        let g = fetch(&rotating, &origin.url("/echo")).await;
        assert_eq!(g.status, 200);
        assert_ne!(g.exit, last, "a new exit every request");
        last = g.exit;
    }
    let t = gw.target_status(&origin.authority()).await;
    assert_eq!(t["requests"], 20);
    assert_eq!(t["forced_rotation_requests"], 10);
    // The sticky traffic opened one connection in 10 requests: R without forced = 0.9.
    assert_eq!(t["reuse_rate_excluding_forced"], 0.9, "{t:#}");
    assert!(
        t["new_by_reason"]["forced_rotation"].as_u64().unwrap() >= 1,
        "{t:#}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_rotating_gateway_gets_one_provider_session_per_worker_session() {
    let origin = Origin::start(tls()).await;
    let mut c = FakeExitConfig::http(ip(71));
    c.credentials = Some(("cust".into(), "gwpw".into()));
    c.username_prefix = Some("cust-session-".into());
    let exit = FakeExit::start(c).await;
    let p = ExitPoolConfig {
        name: "resi".into(),
        nodes: vec![exit.url()],
        session_template: Some("{user}-session-{session}".into()),
        max_connections_per_node: None,
    };
    let gw =
        TestGateway::start_with(&[origin.ca().cert_path.clone()], |c| c.exits.pools.push(p)).await;
    for s in ["a", "a", "b"] {
        let g = fetch(
            &worker(&gw, &format!("t-session-{s}"), None),
            &origin.url("/echo"),
        )
        .await;
        assert_eq!(g.status, 200, "{}", g.body);
    }
    let names = exit.usernames();
    assert_eq!(
        names.len(),
        2,
        "session a's connection was reused: {names:?}"
    );
    assert!(
        names.iter().all(|n| n.starts_with("cust-session-")),
        "{names:?}"
    );
    assert_ne!(
        names[0], names[1],
        "two worker sessions, two provider sessions"
    );
    assert!(names
        .iter()
        .all(|n| !n.contains("session-a") && !n.contains("session-b")));
    gw.stop().await;
}

#[tokio::test]
async fn mitm_off_tunnels_blindly_through_the_exit() {
    let origin = Origin::start(tls()).await;
    let exit = http_exit(81).await;
    let p = pool("dc", &[&exit]);
    let gw =
        TestGateway::start_with(&[origin.ca().cert_path.clone()], |c| c.exits.pools.push(p)).await;
    // Not intercepted: the worker must trust the origin's own certificate.
    let w = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::all(gw.proxy_url())
                .unwrap()
                .basic_auth("t-mitm-off", ""),
        )
        .tls_built_in_root_certs(false)
        .add_root_certificate(origin.ca().reqwest_certificate())
        .build()
        .unwrap();
    let g = fetch(&w, &origin.url("/echo")).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.peer, "127.0.0.81");
    assert_eq!(exit.tunnels(), 1);
    assert!(
        g.reused.is_empty(),
        "a blind tunnel carries no edgepool headers"
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_reuse_killers_report_ranks_forced_rotation_first_for_rotating_traffic() {
    let origin = Origin::start(tls()).await;
    let e1 = http_exit(91).await;
    let e2 = http_exit(92).await;
    let e3 = http_exit(93).await;
    let p = pool("dc", &[&e1, &e2, &e3]);
    let gw =
        TestGateway::start_with(&[origin.ca().cert_path.clone()], |c| c.exits.pools.push(p)).await;
    let rotating = worker(&gw, "t-rotate-request", None);
    let sticky = worker(&gw, "t", None);
    for _ in 0..30 {
        assert_eq!(fetch(&rotating, &origin.url("/echo")).await.status, 200);
        assert_eq!(fetch(&sticky, &origin.url("/echo")).await.status, 200);
    }
    let r: serde_json::Value = gw
        .admin_get("/report?window=1h")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["new_reasons"][0]["reason"], "forced_rotation", "{r:#}");
    assert_eq!(r["new_reasons"][0]["count"], 3, "{r:#}");
    // Forced rotation took every exit in turn, and each exit's connection was warm again on
    // the next lap: one tunnel per exit. The sticky traffic's window chose a warm exit.
    for e in [&e1, &e2, &e3] {
        assert_eq!(e.tunnels(), 1);
    }
    let t = gw.target_status(&origin.authority()).await;
    assert_eq!(t["forced_rotation_requests"], 30, "{t:#}");
    assert_eq!(t["reuse_rate_excluding_forced"], 1.0, "{t:#}");
    assert_eq!(t["reuse_rate"], 0.95, "{t:#}");
    gw.stop().await;
}

#[tokio::test]
async fn a_proxy_rejecting_credentials_on_plain_http_is_the_exits_failure_not_a_407() {
    let origin = Origin::start(OriginConfig::default()).await;
    let good = http_exit(95).await;
    let pools = vec![
        ExitPoolConfig {
            name: "bad".into(),
            nodes: vec![good.url_with("user95", "wrong")],
            session_template: None,
            max_connections_per_node: None,
        },
        ExitPoolConfig {
            name: "mixed".into(),
            nodes: vec![good.url_with("user95", "wrong"), good.url()],
            session_template: None,
            max_connections_per_node: None,
        },
    ];
    let gw = TestGateway::start_with(&[], |c| c.exits.pools = pools).await;
    let g = fetch(&worker(&gw, "t-pool-bad", None), &origin.url("/echo")).await;
    assert_eq!(
        (g.status, g.error.as_str()),
        (502, "exit_auth_failed"),
        "{}",
        g.body
    );
    assert!(!g.body.contains("wrong"));
    // With a good node in the pool, the request moves there, whatever node the window chose.
    for i in 0..6 {
        let g = fetch(
            &worker(&gw, "t-pool-mixed", None),
            &origin.url(&format!("/x{i}")),
        )
        .await;
        assert_eq!(g.status, 200, "{}", g.body);
        assert_eq!(g.exit, "mixed/2");
    }
    assert_eq!(
        origin.requests(),
        6,
        "nothing reached the target through the bad node"
    );
    gw.stop().await;
}

#[tokio::test]
async fn connections_of_ended_sessions_and_single_use_provider_sessions_are_closed() {
    let origin = Origin::start(tls()).await;
    let mut c = FakeExitConfig::http(ip(97));
    c.credentials = Some(("cust".into(), "gwpw".into()));
    c.username_prefix = Some("cust-session-".into());
    let exit = FakeExit::start(c).await;
    let p = ExitPoolConfig {
        name: "resi".into(),
        nodes: vec![exit.url()],
        session_template: Some("{user}-session-{session}".into()),
        max_connections_per_node: Some(4),
    };
    let gw = TestGateway::start_with(&[origin.ca().cert_path.clone()], |c| {
        c.exits.pools.push(p);
        c.exits.session_idle = Duration::from_secs(1);
    })
    .await;
    // Every rotate-request has its own provider session: its connection is closed after the
    // response, so 10 requests fit a budget of 4 connections.
    let rotating = worker(&gw, "t-rotate-request", None);
    for _ in 0..10 {
        assert_eq!(fetch(&rotating, &origin.url("/echo")).await.status, 200);
    }
    assert!(
        gw.wait_closed("scope_ended", 10).await,
        "{:#}",
        gw.status().await["fleet"]
    );
    // A session that went idle is forgotten at the next sweep (every 5 s) and its connection
    // closed then, not at the pool's idle timeout.
    let s = worker(&gw, "t-session-brief", None);
    assert_eq!(fetch(&s, &origin.url("/echo")).await.status, 200);
    let mut closed = false;
    for _ in 0..80 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if gw.status().await["fleet"]["closed_by_reason"]["scope_ended"] == 11 {
            closed = true;
            break;
        }
    }
    assert!(closed, "{:#}", gw.status().await["fleet"]);
    gw.stop().await;
}
