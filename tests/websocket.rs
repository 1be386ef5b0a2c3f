//! WebSockets and plaintext tunnels through edgepool, with real clients and a real server:
//! Python `websockets` on both sides (`tests/python/ws_echo_server.py`, `ws_client.py`), raw
//! HTTP/1.1 for the absolute-form handshake, the `h2` crate for RFC 8441 extended CONNECT, and
//! headless Chromium loading a page that opens a WebSocket.
//!
//! Needs `python3` with `websockets` (and `chromium` for the browser test): missing ones skip
//! loudly locally and fail under `CI=true`.
mod clients_common;
mod gw;
mod support;

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use bytes::Bytes;
use clients_common::{python_module_available, python_script, SCRUBBED_ENV, SUBPROCESS_TIMEOUT};
use gw::TestGateway;
use rustls_pki_types::pem::PemObject;
use support::{metric, KillOnDrop, Origin, OriginConfig, RawHttp1, TestCa};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Hang guard for one read in the raw clients.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// `python3` with `websockets` importable; otherwise a loud SKIPPED (a panic under CI=true).
async fn websockets_available() -> bool {
    support::require_tool("python3") && python_module_available("websockets").await
}

/// The Python echo origin: a child process, its port and its event log.
struct WsOrigin {
    _child: KillOnDrop,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl WsOrigin {
    /// Starts it (TLS when `tls` names a certificate and key) and waits for its port.
    async fn start(tls: Option<(PathBuf, PathBuf)>) -> WsOrigin {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let log = dir.path().join("events.log");
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(python_script("ws_echo_server.py"))
            .arg("--port-file")
            .arg(&port_file)
            .arg("--log")
            .arg(&log)
            .stdin(Stdio::null());
        if let Some((cert, key)) = tls {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let child = KillOnDrop(cmd.spawn().expect("start ws_echo_server.py"));
        let mut port = None;
        for _ in 0..600 {
            if let Ok(s) = std::fs::read_to_string(&port_file) {
                port = s.trim().parse().ok();
                if port.is_some() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        WsOrigin {
            _child: child,
            port: port.expect("ws_echo_server.py wrote its port"),
            log,
            _dir: dir,
        }
    }

    fn events(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Waits (bounded) until the log has a line equal to `line`.
    async fn wait_event(&self, line: &str) -> bool {
        for _ in 0..400 {
            if self.events().iter().any(|l| l == line) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }
}

/// Runs `ws_client.py` with `args`; returns its JSON line (panics with its output otherwise).
async fn ws_client(args: &[String]) -> serde_json::Value {
    let mut cmd = tokio::process::Command::new("python3");
    for v in SCRUBBED_ENV {
        cmd.env_remove(v);
    }
    cmd.arg(python_script("ws_client.py"))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out: Output = tokio::time::timeout(SUBPROCESS_TIMEOUT, cmd.output())
        .await
        .expect("ws_client.py finished")
        .expect("run ws_client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ws_client.py {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("ws_client.py printed no JSON ({e}): {stdout}"))
}

fn upgrades(m: &str, outcome: &str) -> f64 {
    metric(
        m,
        &format!("edgepool_upgrades_total{{outcome=\"{outcome}\"}}"),
    )
}

fn closed(m: &str, reason: &str) -> f64 {
    metric(
        m,
        &format!("edgepool_upgraded_closed_total{{reason=\"{reason}\"}}"),
    )
}

/// Waits (bounded) until no upgraded connection is open; returns the last metrics text.
async fn wait_no_upgrades_open(gw: &TestGateway) -> String {
    let mut m = String::new();
    for _ in 0..200 {
        m = gw.metrics().await;
        if metric(&m, "edgepool_upgraded_open") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    m
}

/// Reads one response head (up to the empty line), byte by byte: nothing after it is consumed.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = tokio::time::timeout(READ_TIMEOUT, s.read_u8())
            .await
            .expect("a response head in time")
            .expect("the response head");
        head.push(b);
        assert!(head.len() < 64 * 1024, "response head too long");
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn status(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// One client WebSocket frame (FIN set, masked as RFC 6455 requires of clients).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Parses one (unmasked, server) frame from the front of `buf`: (opcode, payload, its length).
fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, mut at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if buf[1] & 0x80 != 0 {
        at += 4; // a server never masks; tolerate it anyway
    }
    (buf.len() >= at + len).then(|| (opcode, buf[at..at + len].to_vec(), at + len))
}

/// Reads one server frame from `s` (bytes already in `buf` first).
async fn read_frame<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        if let Some((op, payload, used)) = parse_frame(buf) {
            buf.drain(..used);
            return (op, payload);
        }
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(READ_TIMEOUT, s.read(&mut chunk))
            .await
            .expect("a WebSocket frame in time")
            .expect("read a WebSocket frame");
        assert!(n > 0, "the connection closed before a whole frame");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// RFC 6455 §1.3's example key and its accept value.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Sends text and binary frames over an open WebSocket stream, checks the echoes, then does
/// the close handshake (1000).
async fn echo_and_close<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut buf = Vec::new();
    s.write_all(&client_frame(0x1, b"raw hello")).await.unwrap();
    assert_eq!(read_frame(s, &mut buf).await, (0x1, b"raw hello".to_vec()));
    let blob: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&client_frame(0x2, &blob)).await.unwrap();
    assert_eq!(read_frame(s, &mut buf).await, (0x2, blob));
    s.write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let (op, payload) = read_frame(s, &mut buf).await;
    assert_eq!((op, &payload[..2]), (0x8, &1000u16.to_be_bytes()[..]));
}

/// `ws://` the way `websockets` (and browsers) send it through a proxy: a CONNECT tunnel with
/// plaintext HTTP inside. edgepool sees no TLS record, serves the tunnel as plain http and
/// forwards the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_through_a_connect_tunnel_echoes_text_and_binary_and_closes_cleanly() {
    if !websockets_available().await {
        return;
    }
    let origin = WsOrigin::start(None).await;
    let gw = TestGateway::start(&[]).await;
    let out = ws_client(&[
        "--uri".into(),
        format!("ws://127.0.0.1:{}/echo", origin.port),
        "--proxy".into(),
        gw.proxy_url(),
    ])
    .await;
    assert_eq!(out["text"], "hello through edgepool", "{out}");
    assert_eq!(out["binary_ok"], true, "{out}");
    assert_eq!(
        out["close_code"], 1000,
        "the close handshake came back: {out}"
    );
    assert!(
        origin.wait_event("closed 1000").await,
        "{:?}",
        origin.events()
    );
    let ev = origin.events();
    assert!(ev.contains(&"open /echo".to_string()), "{ev:?}");
    assert!(
        ev.contains(&"text hello through edgepool".to_string()),
        "{ev:?}"
    );
    assert!(
        ev.iter()
            .any(|l| l.starts_with("binary 16384 0001020304050607")),
        "{ev:?}"
    );
    let m = wait_no_upgrades_open(&gw).await;
    assert_eq!(upgrades(&m, "upgraded"), 1.0, "{m}");
    assert_eq!(closed(&m, "closed"), 1.0, "{m}");
    assert_eq!(metric(&m, "edgepool_upgraded_open"), 0.0, "{m}");
    // Not in reuse R: no upstream request, no new pooled connection was counted.
    let s = gw.status().await;
    assert_eq!(s["fleet"]["requests"], 0, "{:#}", s["fleet"]);
    assert_eq!(s["fleet"]["new_connections"], 0, "{:#}", s["fleet"]);
    gw.stop().await;
}

/// `wss://`: intercepted (the client trusts edgepool's CA), the upgrade restored upstream over
/// a dedicated TLS connection to the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_is_intercepted_and_the_upgrade_reaches_the_origin() {
    if !websockets_available().await {
        return;
    }
    let ca = TestCa::new();
    let (cert, key) = ca.write_leaf_files("ws-origin", &["localhost", "127.0.0.1"]);
    let origin = WsOrigin::start(Some((cert, key))).await;
    let gw = TestGateway::start(std::slice::from_ref(&ca.cert_path)).await;
    let out = ws_client(&[
        "--uri".into(),
        format!("wss://localhost:{}/echo", origin.port),
        "--proxy".into(),
        gw.proxy_url(),
        "--cafile".into(),
        gw.ca_path().display().to_string(),
    ])
    .await;
    assert_eq!(out["text"], "hello through edgepool", "{out}");
    assert_eq!(out["binary_ok"], true, "{out}");
    assert_eq!(out["close_code"], 1000, "{out}");
    assert!(
        origin.wait_event("closed 1000").await,
        "{:?}",
        origin.events()
    );
    let m = wait_no_upgrades_open(&gw).await;
    assert_eq!(upgrades(&m, "upgraded"), 1.0, "{m}");
    gw.stop().await;
}

/// `GET ws-url` in absolute form (no CONNECT): 101 relayed with the origin's accept value,
/// frames both ways, close handshake. While it is open, and after, a plain GET to the same
/// origin gets a connection of its own: the upgraded connection is never pooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_upgrade_is_spliced_and_its_connection_never_pooled() {
    if !websockets_available().await {
        return;
    }
    let origin = WsOrigin::start(None).await;
    let gw = TestGateway::start(&[]).await;
    let authority = format!("127.0.0.1:{}", origin.port);
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(
        format!(
            "GET http://{authority}/echo HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status(&head), 101, "{head}");
    assert_eq!(
        header(&head, "sec-websocket-accept"),
        Some(WS_ACCEPT),
        "{head}"
    );
    assert!(
        header(&head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "{head}"
    );
    // A plain request while the WebSocket is open: its own (new) pooled connection.
    let client = gw.client();
    let r = client
        .get(format!("http://{authority}/plain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-edgepool-reused"], "0");
    assert_eq!(r.text().await.unwrap(), "plain ok\n");
    echo_and_close(&mut s).await;
    drop(s);
    assert!(
        origin.wait_event("closed 1000").await,
        "{:?}",
        origin.events()
    );
    let m = wait_no_upgrades_open(&gw).await;
    assert_eq!(upgrades(&m, "upgraded"), 1.0, "{m}");
    // After it ended: the pool still has only the plain request's connection; the upgraded
    // one was never handed back to it.
    let r = client
        .get(format!("http://{authority}/plain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let st = gw.status().await;
    assert_eq!(st["fleet"]["requests"], 2, "{:#}", st["fleet"]);
    let ev = origin.events();
    assert_eq!(
        ev.iter().filter(|l| l.as_str() == "http /plain").count(),
        2,
        "{ev:?}"
    );
    assert_eq!(
        ev.iter().filter(|l| l.starts_with("open ")).count(),
        1,
        "{ev:?}"
    );
    gw.stop().await;
}

/// Over an HTTP/2 connection to edgepool (`io`): waits for SETTINGS_ENABLE_CONNECT_PROTOCOL,
/// opens `uri` with an extended CONNECT (`:protocol = websocket`), checks the 200, then echoes
/// text and binary frames over the stream and does the close handshake.
async fn h2_websocket_session<T>(io: T, uri: &str, pause: Duration)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut client, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // SETTINGS_ENABLE_CONNECT_PROTOCOL arrives with the server's first SETTINGS.
    let mut enabled = false;
    for _ in 0..200 {
        client = client.ready().await.unwrap();
        if client.is_extended_connect_protocol_enabled() {
            enabled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        enabled,
        "edgepool announces SETTINGS_ENABLE_CONNECT_PROTOCOL"
    );
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(uri)
        .extension(h2::ext::Protocol::from_static("websocket"))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(READ_TIMEOUT, resp)
        .await
        .expect("an answer in time")
        .unwrap();
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert!(!resp.headers().contains_key("sec-websocket-accept"));
    let mut recv = resp.into_body();
    let mut buf = Vec::new();
    async fn frame(recv: &mut h2::RecvStream, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
        loop {
            if let Some((op, payload, used)) = parse_frame(buf) {
                buf.drain(..used);
                return (op, payload);
            }
            let data = tokio::time::timeout(READ_TIMEOUT, recv.data())
                .await
                .expect("data in time")
                .expect("the stream stays open")
                .unwrap();
            let _ = recv.flow_control().release_capacity(data.len());
            buf.extend_from_slice(&data);
        }
    }
    send.send_data(Bytes::from(client_frame(0x1, b"over h2")), false)
        .unwrap();
    assert_eq!(frame(&mut recv, &mut buf).await, (0x1, b"over h2".to_vec()));
    tokio::time::sleep(pause).await;
    let blob: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 256) as u8).collect();
    send.send_data(Bytes::from(client_frame(0x2, &blob)), false)
        .unwrap();
    assert_eq!(frame(&mut recv, &mut buf).await, (0x2, blob));
    send.send_data(
        Bytes::from(client_frame(0x8, &1000u16.to_be_bytes())),
        false,
    )
    .unwrap();
    let (op, payload) = frame(&mut recv, &mut buf).await;
    assert_eq!((op, &payload[..2]), (0x8, &1000u16.to_be_bytes()[..]));
    send.send_data(Bytes::new(), true).unwrap();
}

/// RFC 8441: an HTTP/2 worker's extended CONNECT (`:protocol = websocket`, here over h2c with
/// prior knowledge) becomes an HTTP/1.1 upgrade upstream; the stream then carries the
/// WebSocket frames both ways, and keeps its HTTP/2 connection open on the idle clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_extended_connect_is_translated_to_an_http1_upgrade() {
    if !websockets_available().await {
        return;
    }
    let origin = WsOrigin::start(None).await;
    // The open WebSocket stream keeps its connection from idling out: a quiet spell longer
    // than worker_idle_timeout plus the 5 s close grace does not end it.
    let gw = TestGateway::start_with(&[], |c| {
        c.limits.worker_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let tcp = TcpStream::connect(gw.proxy).await.unwrap();
    h2_websocket_session(
        tcp,
        &format!("http://127.0.0.1:{}/echo", origin.port),
        Duration::from_secs(7),
    )
    .await;
    assert!(
        origin.wait_event("text over h2").await,
        "{:?}",
        origin.events()
    );
    assert!(
        origin.wait_event("closed 1000").await,
        "{:?}",
        origin.events()
    );
    let m = wait_no_upgrades_open(&gw).await;
    assert_eq!(upgrades(&m, "upgraded"), 1.0, "{m}");
    assert_eq!(metric(&m, "edgepool_upgraded_open"), 0.0, "{m}");
    gw.stop().await;
}

/// The same inside an intercepted tunnel: CONNECT, TLS (ALPN h2) with edgepool's leaf, an
/// extended CONNECT for `https://` — upstream a `wss` handshake over TLS with ALPN http/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_extended_connect_inside_an_intercepted_tunnel_reaches_a_wss_origin() {
    if !websockets_available().await {
        return;
    }
    let ca = TestCa::new();
    let (cert, key) = ca.write_leaf_files("ws-origin", &["localhost", "127.0.0.1"]);
    let origin = WsOrigin::start(Some((cert, key))).await;
    let gw = TestGateway::start(std::slice::from_ref(&ca.cert_path)).await;
    let authority = format!("localhost:{}", origin.port);
    let mut tcp = TcpStream::connect(gw.proxy).await.unwrap();
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(status(&read_head(&mut tcp).await), 200);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(gw.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("TLS with edgepool's leaf");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    h2_websocket_session(tls, &format!("https://{authority}/echo"), Duration::ZERO).await;
    assert!(
        origin.wait_event("text over h2").await,
        "{:?}",
        origin.events()
    );
    assert!(
        origin.wait_event("closed 1000").await,
        "{:?}",
        origin.events()
    );
    let m = wait_no_upgrades_open(&gw).await;
    assert_eq!(upgrades(&m, "upgraded"), 1.0, "{m}");
    gw.stop().await;
}

/// An upgraded connection on which nothing moves is closed by `limits.upgrade_idle_timeout`,
/// and its place comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upgraded_connection_is_closed_by_its_idle_clock() {
    if !websockets_available().await {
        return;
    }
    let origin = WsOrigin::start(None).await;
    let gw = TestGateway::start_with(&[], |c| {
        c.limits.upgrade_idle_timeout = Duration::from_millis(800);
    })
    .await;
    let out = ws_client(&[
        "--uri".into(),
        format!("ws://127.0.0.1:{}/idle", origin.port),
        "--proxy".into(),
        gw.proxy_url(),
        "--mode".into(),
        "idle".into(),
    ])
    .await;
    assert_eq!(out["text"], "hello through edgepool", "{out}");
    assert_eq!(out["closed_by_peer"], true, "{out}");
    let m = wait_no_upgrades_open(&gw).await;
    assert_eq!(closed(&m, "idle_timeout"), 1.0, "{m}");
    assert_eq!(metric(&m, "edgepool_upgraded_open"), 0.0, "{m}");
    // The origin saw its side end too.
    for _ in 0..200 {
        if origin.events().iter().any(|l| l.starts_with("closed")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        origin.events().iter().any(|l| l.starts_with("closed")),
        "{:?}",
        origin.events()
    );
    gw.stop().await;
}

/// CONNECT + a TLS record -> CONNECT + plaintext: two tunnels whose insides are plain GETs to
/// the same origin share one pooled upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http_inside_connect_tunnels_is_pooled() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start(&[]).await;
    let authority = origin.authority();
    let mut reused = Vec::new();
    for i in 0..2 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        s.write_all(
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let head = read_head(&mut s).await;
        assert_eq!(status(&head), 200, "{head}");
        let mut raw = RawHttp1::new(s);
        let r = raw
            .request("GET", &format!("/t{i}"), &[("Host", &authority)], b"")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        reused.push(r.header("x-edgepool-reused").unwrap_or("").to_string());
        drop(raw);
    }
    assert_eq!(reused, ["0", "1"]);
    assert_eq!(
        origin.accepted(),
        1,
        "one upstream connection for both tunnels"
    );
    assert_eq!(origin.requests(), 2);
    gw.stop().await;
}

/// Only WebSocket upgrades are forwarded; others get 400 `unsupported_upgrade` and the
/// connection ends. The target policy applies to upgrades as to any request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_upgrades_and_forbidden_targets_are_refused() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start(&[]).await;
    let authority = origin.authority();
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(
        format!(
            "GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status(&head), 400, "{head}");
    assert_eq!(
        header(&head, "x-edgepool-error"),
        Some("unsupported_upgrade"),
        "{head}"
    );
    assert!(header(&head, "connection").is_some_and(|v| v.contains("close")));
    assert_eq!(origin.accepted(), 0);

    // A WebSocket handshake the target answers with an ordinary 200 (it does not speak
    // WebSocket): relayed as it is, and the worker connection ends after it.
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(
        format!(
            "GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status(&head), 200, "{head}");
    assert!(header(&head, "x-edgepool-error").is_none(), "{head}");
    assert!(header(&head, "connection").is_some_and(|v| v.contains("close")));
    assert_eq!(origin.accepted(), 1);
    let rec = &origin.log()[0];
    assert_eq!(
        rec.header("upgrade"),
        Some("websocket"),
        "the upgrade reached the origin"
    );

    // Refused before any upgrade logic (a proxy loop by Via): the connection ends too, since
    // what follows an upgrade head is never parsed as HTTP.
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(
        format!(
            "GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nVia: 1.1 a, 1.1 b, 1.1 c, 1.1 d, 1.1 e, 1.1 f, 1.1 g, 1.1 h, 1.1 i\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status(&head), 508, "{head}");
    assert!(
        header(&head, "connection").is_some_and(|v| v.contains("close")),
        "{head}"
    );
    let m = gw.metrics().await;
    assert_eq!(upgrades(&m, "declined"), 1.0, "{m}");
    assert_eq!(upgrades(&m, "refused"), 1.0, "{m}");
    gw.stop().await;

    // A gateway that may not reach loopback: the SSRF guard refuses the upgrade.
    let gw = TestGateway::start_with(&[], |c| c.targets.allow.clear()).await;
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(
        format!(
            "GET http://{authority}/echo HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status(&head), 400, "{head}");
    assert_eq!(
        header(&head, "x-edgepool-error"),
        Some("target_forbidden"),
        "{head}"
    );
    let m = gw.metrics().await;
    assert_eq!(upgrades(&m, "refused"), 1.0, "{m}");
    assert_eq!(origin.accepted(), 1);
    gw.stop().await;
}

/// Headless Chromium, proxied through edgepool (loopback included), loads a page from the
/// origin whose script opens a WebSocket and sends a message; the origin receives it and the
/// echo lands in the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_page_opens_a_websocket_through_edgepool() {
    if !websockets_available().await || !support::require_tool("chromium") {
        return;
    }
    let origin = WsOrigin::start(None).await;
    let gw = TestGateway::start(&[]).await;
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new("chromium");
    for v in SCRUBBED_ENV {
        cmd.env_remove(v);
    }
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=8000",
        "--dump-dom",
    ])
    .arg(format!("--proxy-server={}", gw.proxy_url()))
    // Chromium never proxies loopback unless told to.
    .arg("--proxy-bypass-list=<-loopback>")
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(format!("http://127.0.0.1:{}/page", origin.port))
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(SUBPROCESS_TIMEOUT, cmd.output())
        .await
        .expect("chromium finished")
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        origin.wait_event("text hello from chromium").await,
        "the origin never got the page's message; events {:?}\nDOM:\n{dom}\nstderr:\n{}",
        origin.events(),
        String::from_utf8_lossy(&out.stderr)
    );
    let m = gw.metrics().await;
    assert_eq!(upgrades(&m, "upgraded"), 1.0, "through edgepool: {m}");
    assert!(
        origin.events().contains(&"http /page".to_string()),
        "{:?}",
        origin.events()
    );
    assert!(
        dom.contains("echoed:hello from chromium"),
        "the echo reached the page: {dom}"
    );
    gw.stop().await;
}

/// The WebSocket handshake request for `authority`, origin-form when `absolute` is false.
fn ws_handshake(authority: &str, absolute: bool) -> String {
    let target = if absolute {
        format!("http://{authority}/echo")
    } else {
        "/echo".to_string()
    };
    format!(
        "GET {target} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// An upgraded connection is a tunnel under `limits.max_tunnels`: inside a CONNECT it shares
/// that tunnel's one place (so it works with `max_tunnels = 1`); while it is open no other
/// tunnel or upgrade gets one; when it ends the place comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_holds_one_tunnel_place() {
    if !websockets_available().await {
        return;
    }
    let origin = WsOrigin::start(None).await;
    let gw = TestGateway::start_with(&[], |c| {
        c.limits.max_tunnels = 1;
        c.limits.max_worker_share = 1.0;
    })
    .await;
    let authority = format!("127.0.0.1:{}", origin.port);
    let mut ws = TcpStream::connect(gw.proxy).await.unwrap();
    ws.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(status(&read_head(&mut ws).await), 200);
    ws.write_all(ws_handshake(&authority, false).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut ws).await;
    assert_eq!(status(&head), 101, "{head}");
    let mut buf = Vec::new();
    ws.write_all(&client_frame(0x1, b"first")).await.unwrap();
    assert_eq!(
        read_frame(&mut ws, &mut buf).await,
        (0x1, b"first".to_vec())
    );

    // While it is open: no second tunnel, no second upgrade.
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status(&head), 503, "{head}");
    assert_eq!(header(&head, "x-edgepool-error"), Some("tunnel_limit"));
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(ws_handshake(&authority, true).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status(&head), 503, "{head}");
    assert_eq!(header(&head, "x-edgepool-error"), Some("tunnel_limit"));

    // It still works, then ends; its place comes back.
    echo_and_close(&mut ws).await;
    drop(ws);
    let m = wait_no_upgrades_open(&gw).await;
    assert_eq!(metric(&m, "edgepool_upgraded_open"), 0.0, "{m}");
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(ws_handshake(&authority, true).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status(&head), 101, "{head}");
    echo_and_close(&mut s).await;
    let m = gw.metrics().await;
    assert_eq!(upgrades(&m, "upgraded"), 2.0, "{m}");
    gw.stop().await;
}

/// A busy upgraded connection still ends at `limits.upgrade_max_lifetime`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_upgraded_connection_ends_at_its_max_lifetime() {
    if !websockets_available().await {
        return;
    }
    let origin = WsOrigin::start(None).await;
    let gw = TestGateway::start_with(&[], |c| {
        c.limits.upgrade_max_lifetime = Duration::from_secs(1);
    })
    .await;
    let authority = format!("127.0.0.1:{}", origin.port);
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(ws_handshake(&authority, true).as_bytes())
        .await
        .unwrap();
    assert_eq!(status(&read_head(&mut s).await), 101);
    // Messages every 100 ms (never idle) until edgepool ends the connection.
    let mut buf = Vec::new();
    let mut echoed = 0;
    let mut ended = false;
    for _ in 0..600 {
        if s.write_all(&client_frame(0x1, b"tick")).await.is_err() {
            ended = true;
            break;
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(READ_TIMEOUT, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                ended = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no echo and no close within {READ_TIMEOUT:?}"),
        }
        while let Some((_, _, used)) = parse_frame(&buf) {
            buf.drain(..used);
            echoed += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ended, "the connection was never ended");
    assert!(echoed >= 3, "it was busy before it ended ({echoed} echoes)");
    let m = wait_no_upgrades_open(&gw).await;
    assert_eq!(closed(&m, "max_lifetime"), 1.0, "{m}");
    assert_eq!(closed(&m, "idle_timeout"), 0.0, "{m}");
    gw.stop().await;
}

/// The new limits are validated like the others: the error names the key.
#[test]
fn upgrade_limits_must_be_above_zero() {
    for key in ["upgrade_idle_timeout", "upgrade_max_lifetime"] {
        let toml = format!("[limits]\n{key} = \"0s\"\n");
        let err = edgepool::config::Config::from_toml_str(&toml).expect_err("0s is refused");
        assert!(err.to_string().contains(&format!("limits.{key}")), "{err}");
    }
    let c: edgepool::config::Config =
        edgepool::config::Config::from_toml_str("[limits]\nupgrade_idle_timeout = \"30s\"\n")
            .unwrap();
    assert_eq!(c.limits.upgrade_idle_timeout, Duration::from_secs(30));
    assert_eq!(c.limits.upgrade_max_lifetime, Duration::from_secs(6 * 3600));
}

/// Sniffing waits for the worker's first byte on the existing clock: a CONNECT that sends
/// nothing is closed (by the worker-TLS clock, as before sniffing) and its place comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_sends_nothing_is_still_closed() {
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start_with(&[], |c| {
        c.limits.max_tunnels = 1;
        c.limits.max_worker_share = 1.0;
    })
    .await;
    let authority = origin.authority();
    let connect = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(connect.as_bytes()).await.unwrap();
    assert_eq!(status(&read_head(&mut s).await), 200);
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(READ_TIMEOUT, s.read(&mut b))
        .await
        .expect("the silent tunnel is closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    let mut placed = false;
    for _ in 0..100 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        s.write_all(connect.as_bytes()).await.unwrap();
        if status(&read_head(&mut s).await) == 200 {
            placed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(placed, "the silent tunnel's place came back");
    assert_eq!(origin.accepted(), 0);
    gw.stop().await;
}

/// Shutdown ends upgraded connections (both sides see the end) instead of leaving them
/// spliced with no gateway behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_upgraded_connections() {
    if !websockets_available().await {
        return;
    }
    let origin = WsOrigin::start(None).await;
    let gw = TestGateway::start(&[]).await;
    let authority = format!("127.0.0.1:{}", origin.port);
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(ws_handshake(&authority, true).as_bytes())
        .await
        .unwrap();
    assert_eq!(status(&read_head(&mut s).await), 101);
    let mut buf = Vec::new();
    s.write_all(&client_frame(0x1, b"before")).await.unwrap();
    assert_eq!(
        read_frame(&mut s, &mut buf).await,
        (0x1, b"before".to_vec())
    );
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "edgepool_upgraded_open"), 1.0, "{m}");
    let gw_ref = gw.gw.clone();
    gw.stop().await;
    let mut chunk = [0u8; 64];
    let n = tokio::time::timeout(READ_TIMEOUT, s.read(&mut chunk))
        .await
        .expect("the worker side ends")
        .unwrap_or(0);
    assert_eq!(n, 0, "the worker's upgraded connection was closed");
    assert!(
        origin.wait_event("closed none").await,
        "the origin's side ended too: {:?}",
        origin.events()
    );
    for _ in 0..200 {
        if gw_ref.upgrades().open() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(gw_ref.upgrades().open(), 0);
}
