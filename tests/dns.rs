//! The warm path never waits for DNS: names go through a real DNS server on loopback that the
//! tests script (answers, delays, silence, refusals, TTL 0 and 1 s, rotating answers) and the
//! hosts file, into the real gateway in-process.
//!
//! - warm names keep serving through a resolver outage (serve-stale, refreshed in background);
//! - no request waits on a silent AAAA (A and AAAA raced, 50 ms grace);
//! - concurrent lookups of one name coalesce into one query per family;
//! - a rotating round-robin answer costs no connection; an address that leaves the answer is
//!   no longer used;
//! - hosts-file names are final (no query, either family) and edits are picked up;
//! - `dns_failed` says what happened in a sentence.
#![cfg(feature = "lab")]
mod gw;
mod support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgepool::lab::dns::{DnsQuery, LabDns, QType, Reply};
use gw::TestGateway;
use support::{dns_answers as answers, metric, Origin, OriginConfig, TestCa};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A worker that keeps its connection to the proxy (plain-http requests in absolute form).
fn worker(gw: &TestGateway) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(gw.proxy_url()).unwrap())
        .build()
        .unwrap()
}

/// One GET; status and the `X-Edgepool-Error` token and body (for errors).
async fn fetch(client: &reqwest::Client, url: &str) -> (u16, String, String) {
    let r = client
        .get(url)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let token = r
        .headers()
        .get("x-edgepool-error")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, token, r.text().await.unwrap())
}

/// A gateway asking `dns` only, with the hosts file off unless the tweak sets one.
async fn gateway(
    dns: SocketAddr,
    tweak: impl FnOnce(&mut edgepool::config::Config),
) -> TestGateway {
    TestGateway::start_with(&[], |c| {
        c.upstream.dns_servers = vec![dns];
        c.upstream.hosts_file = "".into();
        tweak(c);
    })
    .await
}

fn zone(names: &[(&str, &[&str])], ttl: u32) -> edgepool::lab::dns::Handler {
    let map: HashMap<String, Vec<IpAddr>> = names
        .iter()
        .map(|(n, ips)| (n.to_string(), ips.iter().map(|s| ip(s)).collect()))
        .collect();
    LabDns::zone(map, ttl)
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn warm_names_keep_serving_through_a_resolver_outage() {
    let origin = Origin::start(OriginConfig::default()).await;
    let dns = LabDns::start(zone(&[("shop.test", &["127.0.0.1"])], 1))
        .await
        .unwrap();
    let gw = gateway(dns.addr(), |_| {}).await;
    let client = worker(&gw);
    let url = format!("http://shop.test:{}/item", origin.port());

    // The first request waits for the one lookup; then the resolver goes dark.
    assert_eq!(fetch(&client, &url).await.0, 200);
    dns.set_handler(LabDns::silent());

    // Three TTLs of traffic through the outage: every request is answered from the cache
    // (fresh, then stale while refreshes time out in the background), none waits.
    // A request that waited for a refresh would take the resolver's 2 s (1 s x 2 attempts).
    let t0 = Instant::now();
    let mut n = 0;
    while t0.elapsed() < Duration::from_millis(3500) {
        let t = Instant::now();
        let (status, token, body) = fetch(&client, &url).await;
        assert_eq!(status, 200, "{token} {body}");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "request {n} waited for DNS: {:?}",
            t.elapsed()
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = gw.metrics().await;
    assert_eq!(
        answers(&m, "miss"),
        1.0,
        "only the first request waited\n{m}"
    );
    assert_eq!(answers(&m, "joined"), 0.0);
    assert_eq!(answers(&m, "hit") + answers(&m, "stale"), n as f64);
    assert!(answers(&m, "stale") >= 1.0, "served past the TTL\n{m}");
    assert!(
        metric(&m, "edgepool_dns_refreshes_total{outcome=\"failed\"}") >= 1.0,
        "refreshes were tried and failed\n{m}"
    );
    assert!(
        dns.queries("shop.test", QType::A) >= 2,
        "refreshed in the background"
    );
    assert_eq!(origin.accepted(), 1, "one warm connection carried it all");

    // The resolver comes back: a background refresh (retried every 5 s after a failure)
    // brings a fresh answer, and requests are cache hits again.
    dns.set_handler(zone(&[("shop.test", &["127.0.0.1"])], 1));
    let ok_before = metric(&m, "edgepool_dns_refreshes_total{outcome=\"ok\"}");
    let t0 = Instant::now();
    let mut m = m;
    while metric(&m, "edgepool_dns_refreshes_total{outcome=\"ok\"}") <= ok_before
        && t0.elapsed() < Duration::from_secs(10)
    {
        assert_eq!(fetch(&client, &url).await.0, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
        m = gw.metrics().await;
    }
    assert!(
        metric(&m, "edgepool_dns_refreshes_total{outcome=\"ok\"}") > ok_before,
        "no refresh succeeded after the resolver came back\n{m}"
    );
    let hits = answers(&m, "hit");
    assert_eq!(fetch(&client, &url).await.0, 200);
    let m = gw.metrics().await;
    assert_eq!(answers(&m, "hit"), hits + 1.0, "fresh again\n{m}");
    assert_eq!(
        answers(&m, "miss"),
        1.0,
        "and still only the first request ever waited"
    );
    gw.stop().await;
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn no_request_waits_for_a_silent_aaaa() {
    let origin = Origin::start(OriginConfig::default()).await;
    // A answers; AAAA is never answered (the classic resolver hiccup).
    let dns = LabDns::start(Arc::new(|q: &DnsQuery| match q.qtype {
        QType::A => Reply::Addrs(vec![ip("127.0.0.1")], 60),
        _ => Reply::Drop,
    }))
    .await
    .unwrap();
    let gw = gateway(dns.addr(), |c| {
        // A whole AAAA attempt would take 10 s.
        c.upstream.dns_timeout = Duration::from_secs(10);
        c.upstream.dns_attempts = 1;
    })
    .await;
    let client = worker(&gw);
    let t0 = Instant::now();
    let (status, token, _) =
        fetch(&client, &format!("http://v4only.test:{}/", origin.port())).await;
    let took = t0.elapsed();
    assert_eq!(status, 200, "{token}");
    assert!(
        took < Duration::from_secs(2),
        "the request waited for the AAAA timeout (10 s) or far more than the 50 ms grace: {took:?}"
    );
    assert_eq!(
        dns.queries("v4only.test", QType::Aaaa),
        1,
        "AAAA was asked, together with A"
    );
    assert_eq!(dns.queries("v4only.test", QType::A), 1);
    gw.stop().await;
}

#[tokio::test]
async fn an_ipv6_answer_is_used_when_a_is_refused() {
    let origin = match Origin::start_at(
        OriginConfig::default(),
        &TestCa::new(),
        "[::1]:0".parse().unwrap(),
    )
    .await
    {
        Ok(o) => o,
        Err(e) => {
            support::skip(&format!("no IPv6 loopback on this machine ({e})"));
            return;
        }
    };
    let dns = LabDns::start(Arc::new(|q: &DnsQuery| match q.qtype {
        QType::Aaaa => Reply::Addrs(vec![ip("::1")], 60),
        _ => Reply::Refused,
    }))
    .await
    .unwrap();
    let gw = gateway(dns.addr(), |_| {}).await;
    let (status, token, body) = fetch(
        &worker(&gw),
        &format!("http://v6only.test:{}/", origin.port()),
    )
    .await;
    assert_eq!(status, 200, "{token} {body}");
    assert_eq!(origin.accepted(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn concurrent_lookups_of_one_name_coalesce() {
    let origin = Origin::start(OriginConfig::default()).await;
    let dns = LabDns::start(Arc::new(|q: &DnsQuery| match q.qtype {
        // Long enough for all 20 workers to arrive while the lookup is out.
        QType::A => Reply::Delayed(
            Duration::from_millis(1500),
            Box::new(Reply::Addrs(vec![ip("127.0.0.1")], 60)),
        ),
        _ => Reply::NoData,
    }))
    .await
    .unwrap();
    // One attempt that outlasts the delay: a resend would be a second query.
    let gw = gateway(dns.addr(), |c| {
        c.upstream.dns_timeout = Duration::from_secs(5);
        c.upstream.dns_attempts = 1;
    })
    .await;
    let url = format!("http://burst.test:{}/", origin.port());
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = worker(&gw);
        let url = url.clone();
        tasks.push(tokio::spawn(async move { fetch(&client, &url).await.0 }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        dns.queries("burst.test", QType::A),
        1,
        "one A query for 20 requests"
    );
    assert_eq!(dns.queries("burst.test", QType::Aaaa), 1);
    let m = gw.metrics().await;
    assert_eq!(answers(&m, "miss"), 1.0, "{m}");
    assert_eq!(answers(&m, "joined"), 19.0, "{m}");
    gw.stop().await;
}

/// Two origins on 127.0.0.1:P and 127.0.0.2:P.
async fn twin_origins() -> (Origin, Origin) {
    let ca = TestCa::new();
    for _ in 0..50 {
        let a = Origin::start_with_ca(OriginConfig::default(), &ca).await;
        let other = SocketAddr::from(([127, 0, 0, 2], a.port()));
        if let Ok(b) = Origin::start_at(OriginConfig::default(), &ca, other).await {
            return (a, b);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

#[tokio::test]
async fn a_rotating_answer_costs_no_new_connection() {
    let (one, two) = twin_origins().await;
    // A round-robin server: TTL 0, the order rotates at every query.
    let dns = LabDns::start(Arc::new(|q: &DnsQuery| match q.qtype {
        QType::A if q.nth % 2 == 0 => Reply::Addrs(vec![ip("127.0.0.1"), ip("127.0.0.2")], 0),
        QType::A => Reply::Addrs(vec![ip("127.0.0.2"), ip("127.0.0.1")], 0),
        _ => Reply::NoData,
    }))
    .await
    .unwrap();
    let gw = gateway(dns.addr(), |c| c.upstream.dns_min_ttl = Duration::ZERO).await;
    let client = worker(&gw);
    let url = format!("http://rr.test:{}/", one.port());
    for _ in 0..30 {
        assert_eq!(fetch(&client, &url).await.0, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        dns.queries("rr.test", QType::A) >= 5,
        "the answer was refreshed and rotated ({} queries)",
        dns.queries("rr.test", QType::A)
    );
    assert_eq!(
        one.accepted() + two.accepted(),
        1,
        "rotations cost no connection (127.0.0.1: {}, 127.0.0.2: {})",
        one.accepted(),
        two.accepted()
    );
    gw.stop().await;
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn an_address_that_leaves_the_answer_is_no_longer_used() {
    let (one, two) = twin_origins().await;
    let dns = LabDns::start(Arc::new(|q: &DnsQuery| match q.qtype {
        QType::A if q.nth == 0 => Reply::Addrs(vec![ip("127.0.0.1")], 0),
        QType::A => Reply::Addrs(vec![ip("127.0.0.2")], 0),
        _ => Reply::NoData,
    }))
    .await
    .unwrap();
    let gw = gateway(dns.addr(), |c| c.upstream.dns_min_ttl = Duration::ZERO).await;
    let client = worker(&gw);
    let url = format!("http://moved.test:{}/", one.port());
    assert_eq!(fetch(&client, &url).await.0, 200);
    assert_eq!(one.accepted(), 1);
    // The next request is answered from the stale entry at once and starts the refresh; once
    // the new answer is in, requests go to the new address.
    let t0 = Instant::now();
    while two.requests() == 0 && t0.elapsed() < Duration::from_secs(5) {
        assert_eq!(fetch(&client, &url).await.0, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(two.requests() >= 1, "the new address was never used");
    let before = one.requests();
    for _ in 0..5 {
        assert_eq!(fetch(&client, &url).await.0, 200);
    }
    assert_eq!(
        one.requests(),
        before,
        "the old address got no more requests"
    );
    gw.stop().await;
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn hosts_file_names_are_final_and_edits_are_picked_up() {
    let origin = Origin::start(OriginConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 listed.test\n").unwrap();
    // The resolver answers nothing: every name it is asked about waits and fails.
    let dns = LabDns::start(LabDns::silent()).await.unwrap();
    let gw = gateway(dns.addr(), |c| {
        c.upstream.hosts_file = hosts.clone();
        c.upstream.dns_timeout = Duration::from_millis(200);
        c.upstream.dns_attempts = 1;
    })
    .await;
    let client = worker(&gw);

    // Listed (IPv4 only): answered from the file, no query for either family.
    for _ in 0..3 {
        let (status, token, _) =
            fetch(&client, &format!("http://listed.test:{}/", origin.port())).await;
        assert_eq!(status, 200, "{token}");
    }
    assert_eq!(dns.queries("listed.test", QType::A), 0);
    assert_eq!(
        dns.queries("listed.test", QType::Aaaa),
        0,
        "no AAAA query either"
    );

    // Not listed: asked, fails with a sentence.
    let (status, token, body) =
        fetch(&client, &format!("http://later.test:{}/", origin.port())).await;
    assert_eq!((status, token.as_str()), (502, "dns_failed"), "{body}");
    assert!(dns.queries("later.test", QType::A) >= 1);

    // Added to the file while running: picked up without a restart.
    std::fs::write(&hosts, "127.0.0.1 listed.test\n127.0.0.1 later.test\n").unwrap();
    let t0 = Instant::now();
    let mut last = (0, String::new(), String::new());
    while t0.elapsed() < Duration::from_secs(5) {
        last = fetch(&client, &format!("http://later.test:{}/", origin.port())).await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.0, 200, "the edit was not picked up: {last:?}");
    let m = gw.metrics().await;
    assert!(
        metric(&m, "edgepool_hosts_file_reloads_total") >= 1.0,
        "{m}"
    );
    assert!(answers(&m, "hosts") >= 4.0, "{m}");
    gw.stop().await;
}

#[tokio::test]
async fn dns_failures_are_sentences() {
    let dns = LabDns::start(Arc::new(|q: &DnsQuery| match q.name.as_str() {
        "gone.test" => Reply::NxDomain,
        "closed.test" => Reply::Refused,
        "broken.test" => Reply::ServFail,
        _ => Reply::Drop,
    }))
    .await
    .unwrap();
    let gw = gateway(dns.addr(), |c| {
        c.upstream.dns_timeout = Duration::from_millis(300);
        c.upstream.dns_attempts = 2;
    })
    .await;
    let client = worker(&gw);
    let server = dns.addr().to_string();
    let cases = [
        ("gone.test", "does not exist (NXDOMAIN from"),
        ("closed.test", "the server refused the query (REFUSED)"),
        ("broken.test", "the server answered"),
        (
            "silent.test",
            "no answer within 600ms (upstream.dns_timeout 300ms x upstream.dns_attempts 2)",
        ),
    ];
    for (name, says) in cases {
        let (status, token, body) = fetch(&client, &format!("http://{name}:8080/")).await;
        assert_eq!(
            (status, token.as_str()),
            (502, "dns_failed"),
            "{name}: {body}"
        );
        assert!(body.contains(name), "{name}: {body}");
        assert!(body.contains(says), "{name}: expected {says:?} in {body}");
        assert!(body.contains(&server), "{name}: names the resolver: {body}");
        for debug in ["Query {", "Name(", "query_type", "NoRecords"] {
            assert!(!body.contains(debug), "{name}: Rust debug text in {body}");
        }
    }
    gw.stop().await;
}

/// A resolver asking `dns` only: TTLs as given (floor 0), hosts file off, 300 ms per attempt.
fn bare_resolver(dns: &LabDns) -> edgepool::dns::Resolver {
    let mut cfg = edgepool::dns::DnsConfig {
        servers: vec![dns.addr()],
        min_ttl: Duration::ZERO,
        hosts_file: None,
        timeout: Duration::from_millis(300),
        attempts: 1,
        ..Default::default()
    };
    cfg.family_grace = Duration::from_millis(50);
    edgepool::dns::Resolver::new(
        cfg,
        edgepool::guard::TargetPolicy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]),
        &mut prometheus_client::registry::Registry::default(),
    )
}

/// Resolves `name` until `done` holds for its addresses (each call may start a background
/// refresh); at most 5 s.
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn resolve_until(
    r: &edgepool::dns::Resolver,
    name: &str,
    done: impl Fn(&[IpAddr]) -> bool,
) -> Vec<IpAddr> {
    let t0 = Instant::now();
    loop {
        let got = r.resolve(name).await.unwrap().addrs.to_vec();
        if done(&got) || t0.elapsed() > Duration::from_secs(5) {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_refresh_whose_aaaa_times_out_keeps_the_ipv6_addresses() {
    let dns = LabDns::start(zone(&[("dual.test", &["127.0.0.1", "::1"])], 0))
        .await
        .unwrap();
    let r = bare_resolver(&dns);
    let first = r.resolve("dual.test").await.unwrap();
    assert_eq!(&*first.addrs, &[ip("127.0.0.1"), ip("::1")]);

    // AAAA goes silent and A moves: the refresh brings the new A, keeps the old AAAA.
    dns.set_handler(Arc::new(|q: &DnsQuery| match q.qtype {
        QType::A => Reply::Addrs(vec![ip("127.0.0.3")], 0),
        _ => Reply::Drop,
    }));
    let got = resolve_until(&r, "dual.test", |a| a.contains(&ip("127.0.0.3"))).await;
    assert_eq!(
        got,
        vec![ip("127.0.0.3"), ip("::1")],
        "IPv6 kept while AAAA fails"
    );
    // Let the silent AAAA time out; the address stays.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let got = r.resolve("dual.test").await.unwrap();
    assert!(got.addrs.contains(&ip("::1")), "{:?}", got.addrs);

    // Now AAAA answers NODATA: the name has no IPv6 address any more, and it goes.
    dns.set_handler(Arc::new(|q: &DnsQuery| match q.qtype {
        QType::A => Reply::Addrs(vec![ip("127.0.0.3")], 0),
        _ => Reply::NoData,
    }));
    let got = resolve_until(&r, "dual.test", |a| !a.contains(&ip("::1"))).await;
    assert_eq!(
        got,
        vec![ip("127.0.0.3")],
        "an empty AAAA answer drops IPv6"
    );
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn a_refresh_that_turns_forbidden_refuses_the_name() {
    let dns = LabDns::start(zone(&[("turn.test", &["127.0.0.1"])], 0))
        .await
        .unwrap();
    let r = bare_resolver(&dns);
    assert!(r.resolve("turn.test").await.is_ok());
    dns.set_handler(zone(&[("turn.test", &["127.0.0.1", "10.0.0.9"])], 0));
    let t0 = Instant::now();
    let err = loop {
        match r.resolve("turn.test").await {
            Ok(ok) => assert_eq!(&*ok.addrs, &[ip("127.0.0.1")], "only the checked answer"),
            Err(e) => break e,
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        err,
        edgepool::dns::ResolveError::Forbidden {
            ip: ip("10.0.0.9"),
            why: "private (RFC 1918)"
        }
    );
}

#[tokio::test]
async fn every_request_that_waited_for_dns_is_traced() {
    let origin = Origin::start(OriginConfig::default()).await;
    let dns = LabDns::start(zone(&[("traced.test", &["127.0.0.1"])], 0))
        .await
        .unwrap();
    // No serve-stale and TTL 0: every request waits for a lookup, on a warm connection.
    let gw = gateway(dns.addr(), |c| {
        c.upstream.dns_min_ttl = Duration::ZERO;
        c.upstream.dns_stale_ttl = Duration::ZERO;
        c.trace.sample_rate = 0.0;
    })
    .await;
    let mut trace = gw.gw.telemetry().subscribe_trace();
    let client = worker(&gw);
    let url = format!("http://traced.test:{}/", origin.port());
    for _ in 0..3 {
        assert_eq!(fetch(&client, &url).await.0, 200);
    }
    let mut records = Vec::new();
    while let Ok(line) = trace.try_recv() {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["kind"] == "request" {
            records.push(v);
        }
    }
    assert_eq!(records.len(), 3, "{records:#?}");
    assert_eq!(records[0]["reused"], false);
    for r in &records[1..] {
        assert_eq!(r["reused"], true, "{r}");
    }
    for r in &records {
        assert_eq!(r["dns"], "miss", "{r}");
        assert!(r["dns_ms"].as_f64().is_some(), "{r}");
    }
    assert_eq!(origin.accepted(), 1);
    gw.stop().await;
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn a_failed_lookup_is_remembered_for_a_second() {
    let dns = LabDns::start(LabDns::silent()).await.unwrap();
    let gw = gateway(dns.addr(), |c| {
        c.upstream.dns_timeout = Duration::from_millis(200);
        c.upstream.dns_attempts = 1;
    })
    .await;
    let client = worker(&gw);
    assert_eq!(
        fetch(&client, "http://dead.test:8080/").await.1,
        "dns_failed"
    );
    let asked = dns.queries("dead.test", QType::A);
    // Straight after: the remembered failure, no new query, no wait.
    let t = Instant::now();
    assert_eq!(
        fetch(&client, "http://dead.test:8080/").await.1,
        "dns_failed"
    );
    assert!(
        t.elapsed() < Duration::from_millis(150),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(dns.queries("dead.test", QType::A), asked);
    assert_eq!(answers(&gw.metrics().await, "failed"), 1.0);
    // After the hold: asked again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        fetch(&client, "http://dead.test:8080/").await.1,
        "dns_failed"
    );
    assert!(dns.queries("dead.test", QType::A) > asked);
    gw.stop().await;
}

#[tokio::test]
async fn a_hosts_file_entry_pointing_at_a_forbidden_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "169.254.169.254 metadata.test\n10.1.2.3 intranet.test\n",
    )
    .unwrap();
    let dns = LabDns::start(LabDns::silent()).await.unwrap();
    let gw = gateway(dns.addr(), |c| {
        c.upstream.hosts_file = hosts.clone();
        c.targets.allow = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    let client = worker(&gw);
    for (name, ip) in [
        ("metadata.test", "169.254.169.254"),
        ("intranet.test", "10.1.2.3"),
    ] {
        let (status, token, body) = fetch(&client, &format!("http://{name}/")).await;
        assert_eq!(
            (status, token.as_str()),
            (400, "target_forbidden"),
            "{body}"
        );
        assert!(body.contains(ip), "{body}");
    }
    assert_eq!(dns.total_queries(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn a_refused_aaaa_on_refresh_keeps_the_ipv6_addresses() {
    let dns = LabDns::start(zone(&[("dual2.test", &["127.0.0.1", "::1"])], 0))
        .await
        .unwrap();
    let r = bare_resolver(&dns);
    assert_eq!(r.resolve("dual2.test").await.unwrap().addrs.len(), 2);
    dns.set_handler(Arc::new(|q: &DnsQuery| match q.qtype {
        QType::A => Reply::Addrs(vec![ip("127.0.0.4")], 0),
        _ => Reply::Refused,
    }));
    let got = resolve_until(&r, "dual2.test", |a| a.contains(&ip("127.0.0.4"))).await;
    assert_eq!(got, vec![ip("127.0.0.4"), ip("::1")]);
}

#[tokio::test]
async fn a_name_evicted_while_its_lookup_runs_still_resolves() {
    let dns = LabDns::start(Arc::new(|q: &DnsQuery| match (q.name.as_str(), q.qtype) {
        ("slow.test", QType::A) => Reply::Delayed(
            Duration::from_millis(200),
            Box::new(Reply::Addrs(vec![ip("127.0.0.1")], 60)),
        ),
        (_, QType::A) => Reply::Addrs(vec![ip("127.0.0.2")], 60),
        _ => Reply::NoData,
    }))
    .await
    .unwrap();
    let mut cfg = edgepool::dns::DnsConfig {
        servers: vec![dns.addr()],
        hosts_file: None,
        cache_size: 1,
        ..Default::default()
    };
    cfg.family_grace = Duration::from_millis(50);
    let r = edgepool::dns::Resolver::new(
        cfg,
        edgepool::guard::TargetPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
        &mut prometheus_client::registry::Registry::default(),
    );
    let slow = {
        let r = r.clone();
        tokio::spawn(async move { r.resolve("slow.test").await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Evicts slow.test's entry while its lookup is out; then slow.test again (a new entry).
    assert_eq!(
        &*r.resolve("quick.test").await.unwrap().addrs,
        &[ip("127.0.0.2")]
    );
    let again = r.resolve("slow.test").await.unwrap();
    assert_eq!(&*again.addrs, &[ip("127.0.0.1")]);
    assert_eq!(&*slow.await.unwrap().unwrap().addrs, &[ip("127.0.0.1")]);
    assert_eq!(r.cached_names(), 1);
}

#[tokio::test]
async fn exit_proxies_named_in_the_hosts_file_are_dialled_without_dns() {
    use support::{FakeExit, FakeExitConfig};
    let origin = Origin::start(OriginConfig::default()).await;
    let exit = FakeExit::start(FakeExitConfig::socks5(std::net::Ipv4Addr::LOCALHOST)).await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 exit.test\n").unwrap();
    // A dead resolver: the exit's name must come from edgepool's hosts file and cache, not
    // from getaddrinfo (which knows nothing of this file).
    let dns = LabDns::start(LabDns::silent()).await.unwrap();
    let gw = gateway(dns.addr(), |c| {
        c.upstream.hosts_file = hosts.clone();
        c.exits.pools.push(edgepool::config::ExitPoolConfig {
            name: "named".into(),
            nodes: vec![format!("socks5://exit.test:{}", exit.addr().port())],
            session_template: None,
            max_connections_per_node: None,
        });
        c.exits.default_pool = Some("named".into());
    })
    .await;
    let client = worker(&gw);
    for _ in 0..3 {
        let (status, token, body) = fetch(&client, &origin.url("/")).await;
        assert_eq!(status, 200, "{token} {body}");
    }
    assert_eq!(
        exit.tunnels(),
        1,
        "one tunnel through the named exit, reused"
    );
    assert_eq!(dns.total_queries(), 0);
    assert!(answers(&gw.metrics().await, "hosts") >= 1.0);
    gw.stop().await;
}
