//! SSRF end to end: the special-purpose address table through the real resolver and policy,
//! names a DNS server points at internal addresses, DNS rebinding (a local DNS server that
//! answers with an allowed address and then with loopback), mixed answers, and the CONNECT
//! port allow-list.
#![cfg(feature = "lab")]
mod gw;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgepool::lab::dns::{DnsQuery, LabDns, QType, Reply};
use gw::TestGateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A DNS server on loopback (the lab's scripted one) whose n-th A query gets
/// `script[min(n, len-1)]` (TTL 0); AAAA and other queries get an empty NOERROR answer.
async fn scripted_dns(script: Vec<Vec<Ipv4Addr>>) -> LabDns {
    LabDns::start(Arc::new(move |q: &DnsQuery| match q.qtype {
        QType::A => Reply::Addrs(
            script[(q.nth as usize).min(script.len() - 1)]
                .iter()
                .map(|ip| (*ip).into())
                .collect(),
            0,
        ),
        _ => Reply::NoData,
    }))
    .await
    .unwrap()
}

/// A tiny HTTP/1.1 origin on `ip:port` that answers every request `200 ok <ip>` and counts
/// the connections it accepted.
struct CountingOrigin {
    conns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingOrigin {
    fn serve(listener: TcpListener) -> CountingOrigin {
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        let task = tokio::spawn(async move {
            let me = listener.local_addr().unwrap().ip();
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        have.extend_from_slice(&buf[..n]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let body = format!("ok {me}");
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        CountingOrigin { conns, task }
    }

    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

impl Drop for CountingOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listeners on 127.0.0.2:P and 127.0.0.1:P (same port P).
async fn twin_listeners() -> (TcpListener, TcpListener) {
    for _ in 0..50 {
        let a = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = TcpListener::bind(("127.0.0.1", port)).await {
            return (a, b);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// One request on a fresh connection; returns the whole response as text.
async fn raw(proxy: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// One request on a fresh connection; returns the response head only (tunnels stay open).
async fn head_only(proxy: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn get(host: &str) -> String {
    format!("GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}

#[tokio::test]
async fn every_special_purpose_form_is_refused_before_any_connection() {
    // The policy as the proxy path applies it (resolver + checks), without dialing: several
    // of these are routable addresses this test must never send a packet to.
    let gw = TestGateway::start_with(&[], |c| c.targets.allow.clear()).await;
    let table = [
        ("127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.0.8", "IETF"),
        ("198.18.0.1", "benchmarking"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "unique local"),
        ("fc00::1", "unique local"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "IPv4-mapped"),
        ("::ffff:169.254.169.254", "IPv4-mapped"),
        ("::ffff:10.0.0.1", "IPv4-mapped"),
        ("64:ff9b::7f00:1", "NAT64"),
        ("64:ff9b::a9fe:a9fe", "NAT64"),
        ("64:ff9b::a00:1", "NAT64"),
        ("2002:7f00:1::1", "6to4"),
        ("2002:a9fe:a9fe::1", "6to4"),
        ("2002:c0a8:1::1", "6to4"),
        // Teredo embeds the client's IPv4 address inverted; all of 2001::/32 is refused.
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo"),
        ("::127.0.0.1", "IPv4-compatible"),
    ];
    for (ip, why) in table {
        let e = gw
            .gw
            .forwarder()
            .resolve_checked(ip, 80)
            .await
            .expect_err(ip);
        assert_eq!(e.token, "target_forbidden", "{ip}");
        assert!(
            e.detail.contains(why),
            "{ip}: the reason names the range ({why}): {}",
            e.detail
        );
    }
    // Public addresses pass the same check (they are not dialed here).
    for ip in ["93.184.216.34", "2606:4700::1111", "64:ff9b::808:808"] {
        assert!(
            gw.gw.forwarder().resolve_checked(ip, 80).await.is_ok(),
            "{ip}"
        );
    }
    // Through the proxy path, forms that embed loopback are refused with 400 before a dial.
    for host in [
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::1]",
        "[2001:0:4136:e378:8000:63bf:80ff:fffe]",
        "[::ffff:0:7f00:1]",
        "[64:ff9b:1::7f00:1]",
    ] {
        let head = raw(gw.proxy, &get(host)).await;
        assert!(
            head.starts_with("HTTP/1.1 400") && head.contains("x-edgepool-error: target_forbidden"),
            "{host}: {head}"
        );
        let connect = head_only(
            gw.proxy,
            &format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n"),
        )
        .await;
        assert!(
            connect.starts_with("HTTP/1.1 400") && connect.contains("target_forbidden"),
            "CONNECT {host}: {connect}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn names_pointing_at_internal_addresses_are_refused() {
    let dns = scripted_dns(vec![vec![Ipv4Addr::new(169, 254, 169, 254)]]).await;
    let gw = TestGateway::start_with(&[], |c| {
        c.targets.allow.clear();
        c.upstream.dns_servers = vec![dns.addr()];
        c.upstream.dns_min_ttl = Duration::ZERO;
    })
    .await;
    let e = gw
        .gw
        .forwarder()
        .resolve_checked("metadata.rebind.test", 80)
        .await
        .expect_err("metadata address refused");
    assert_eq!(e.token, "target_forbidden");
    assert!(e.detail.contains("169.254.169.254"), "{}", e.detail);
    assert!(
        dns.queries("metadata.rebind.test", QType::A) >= 1,
        "the name went through our DNS server"
    );
    gw.stop().await;
}

#[tokio::test]
async fn dns_rebinding_cannot_switch_a_checked_address() {
    // 127.0.0.2 stands for a public address (allowed); 127.0.0.1 for the internal one.
    let (public, internal) = twin_listeners().await;
    let port = public.local_addr().unwrap().port();
    let public = CountingOrigin::serve(public);
    let internal = CountingOrigin::serve(internal);
    let dns = scripted_dns(vec![
        vec![Ipv4Addr::new(127, 0, 0, 2)],
        vec![Ipv4Addr::new(127, 0, 0, 1)],
    ])
    .await;
    let gw = TestGateway::start_with(&[], |c| {
        c.targets.allow = vec!["127.0.0.2/32".parse().unwrap()];
        c.upstream.dns_servers = vec![dns.addr()];
        c.upstream.dns_min_ttl = Duration::ZERO;
    })
    .await;
    let host = format!("rebind.test:{port}");

    // First lookup: the allowed address. edgepool resolves once and connects to exactly the
    // address it checked; a second lookup at connect time would have landed on 127.0.0.1.
    let first = raw(gw.proxy, &get(&host)).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.ends_with("ok 127.0.0.2"), "{first}");
    assert_eq!(
        dns.queries("rebind.test", QType::A),
        1,
        "one lookup, checked and used"
    );

    // The answer changes to loopback (TTL 0). Requests meanwhile are answered from the cached
    // answer (checked, allowed: 127.0.0.2) while the refresh runs in the background; once the
    // refreshed answer is in the cache, it is checked again and the name is refused.
    let mut second = String::new();
    for _ in 0..100 {
        second = raw(gw.proxy, &get(&host)).await;
        if !second.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(second.ends_with("ok 127.0.0.2"), "{second}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(dns.queries("rebind.test", QType::A) >= 2, "refreshed");
    assert!(
        second.starts_with("HTTP/1.1 400") && second.contains("x-edgepool-error: target_forbidden"),
        "{second}"
    );
    assert!(
        second.contains("127.0.0.1"),
        "the error names the address: {second}"
    );
    assert_eq!(
        internal.conns(),
        0,
        "nothing ever reached the internal address"
    );
    assert_eq!(public.conns(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn an_answer_mixing_allowed_and_internal_addresses_is_refused_whole() {
    let (public, internal) = twin_listeners().await;
    let port = public.local_addr().unwrap().port();
    let public = CountingOrigin::serve(public);
    let internal = CountingOrigin::serve(internal);
    let dns = scripted_dns(vec![vec![
        Ipv4Addr::new(127, 0, 0, 2),
        Ipv4Addr::new(127, 0, 0, 1),
    ]])
    .await;
    let gw = TestGateway::start_with(&[], |c| {
        c.targets.allow = vec!["127.0.0.2/32".parse().unwrap()];
        c.upstream.dns_servers = vec![dns.addr()];
    })
    .await;
    let host = format!("mixed.test:{port}");
    let head = raw(gw.proxy, &get(&host)).await;
    assert!(
        head.starts_with("HTTP/1.1 400") && head.contains("target_forbidden"),
        "{head}"
    );
    let connect = head_only(
        gw.proxy,
        &format!("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 400"), "{connect}");
    assert_eq!(public.conns() + internal.conns(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn connect_is_limited_to_the_allowed_ports() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let origin = CountingOrigin::serve(listener);

    // Defaults: 443 and 80 only.
    let gw = TestGateway::start_with(&[], |c| {
        c.targets.connect_ports = edgepool::config::TargetsConfig::default().connect_ports;
    })
    .await;
    let to = |p: u16| format!("CONNECT 127.0.0.1:{p} HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\r\n");
    let refused = head_only(gw.proxy, &to(port)).await;
    assert!(
        refused.starts_with("HTTP/1.1 400")
            && refused.contains("x-edgepool-error: connect_port_forbidden")
            && refused.contains(&format!("port {port}")),
        "{refused}"
    );
    for p in [22, 25, 3306, 6379] {
        let r = head_only(gw.proxy, &to(p)).await;
        assert!(r.contains("connect_port_forbidden"), "port {p}: {r}");
    }
    assert_eq!(origin.conns(), 0, "no tunnel was opened");
    // Port 443 passes the port check and reaches the address policy (loopback is allowed in
    // this gateway, nothing listens on 443: the refusal must not be the port's).
    let r = head_only(gw.proxy, &to(443)).await;
    assert!(!r.contains("connect_port_forbidden"), "443 is allowed: {r}");
    gw.stop().await;

    // An operator-allowed range opens the tunnel.
    let gw = TestGateway::start_with(&[], |c| {
        c.targets.connect_ports = vec![format!("{}-{}", port, port).parse().unwrap()];
    })
    .await;
    let head = head_only(gw.proxy, &to(port)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    gw.stop().await;
}

#[test]
fn port_ranges_parse_and_bad_ones_name_the_key() {
    let c =
        edgepool::config::Config::from_toml_str("[targets]\nconnect_ports = [443, \"8000-8999\"]")
            .unwrap();
    assert!(c.targets.connect_port_allowed(443));
    assert!(c.targets.connect_port_allowed(8500));
    assert!(!c.targets.connect_port_allowed(80));
    for bad in ["[0]", "[\"9-1\"]", "[70000]", "[\"http\"]", "[]"] {
        let e =
            edgepool::config::Config::from_toml_str(&format!("[targets]\nconnect_ports = {bad}"))
                .unwrap_err();
        assert!(e.to_string().contains("connect_ports"), "{bad}: {e}");
    }
}
