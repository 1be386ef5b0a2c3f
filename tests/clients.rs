//! End-to-end with real, unmodified clients as workers: curl and Python (`requests`,
//! `httpx`) run as subprocesses against the in-process gateway and loopback origins.
//!
//! Every external tool is checked with `support::require_tool` (and Python modules with
//! [`python_module_available`]): missing ones skip loudly locally and fail under `CI=true`.
//! Subprocesses run through `tokio::process` (so the in-process gateway keeps serving while
//! the test waits), with a scrubbed proxy environment and a hard timeout.
mod clients_common;
mod gw;
mod support;

use std::path::Path;

use clients_common::*;
use gw::TestGateway;
use support::{pattern_bytes, Origin, OriginConfig};
use tokio::process::Command;

// ---------------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------------

/// `-w` format: one line per transfer. `%header{}` needs curl ≥ 7.84.
const CURL_WRITE_OUT: &str =
    "%{http_code} %{num_connects} %{http_version} reused=%header{x-edgepool-reused}\\n";

/// One transfer's `-w` line.
#[derive(Debug)]
struct CurlTransfer {
    code: u16,
    /// New connections curl itself opened for this transfer (to the proxy).
    num_connects: u32,
    http_version: String,
    reused: String,
}

fn parse_curl_write_out(stdout: &[u8]) -> Vec<CurlTransfer> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(
                f.len(),
                4,
                "unexpected curl -w line {line:?} (curl ≥ 7.84 is needed for %header{{}})"
            );
            CurlTransfer {
                code: f[0].parse().unwrap(),
                num_connects: f[1].parse().unwrap(),
                http_version: f[2].to_string(),
                reused: f[3].trim_start_matches("reused=").to_string(),
            }
        })
        .collect()
}

/// A curl through the gateway that ignores `~/.curlrc` (`-q`) and the environment's proxy
/// settings; each of `urls` is written to `<dir>/body<i>`.
fn curl(gw: &TestGateway, dir: &Path, urls: &[String]) -> Command {
    let mut cmd = command("curl");
    cmd.args(["-q", "-sS", "--max-time", "30", "--noproxy", ""])
        .args(["--proxy", &gw.proxy_url()])
        .args(["-w", CURL_WRITE_OUT]);
    for (i, url) in urls.iter().enumerate() {
        cmd.arg(url).arg("-o").arg(dir.join(format!("body{i}")));
    }
    cmd
}

fn body_file(dir: &Path, i: usize) -> Vec<u8> {
    std::fs::read(dir.join(format!("body{i}"))).expect("curl wrote the body file")
}

/// Asserts curl opened one connection (to the proxy) for all `transfers`, and the first
/// request opened the upstream connection while the later ones reused it.
fn assert_curl_one_connection(transfers: &[CurlTransfer], first_reused: &str) {
    assert!(transfers.iter().all(|t| t.code == 200), "{transfers:#?}");
    assert_eq!(
        transfers[0].num_connects, 1,
        "curl connects to the proxy once: {transfers:#?}"
    );
    assert!(
        transfers[1..].iter().all(|t| t.num_connects == 0),
        "curl reuses its proxy connection (or tunnel) for the later URLs: {transfers:#?}"
    );
    assert_eq!(transfers[0].reused, first_reused, "{transfers:#?}");
    assert!(
        transfers[1..].iter().all(|t| t.reused == "1"),
        "{transfers:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_plain_http_several_urls_share_one_upstream_connection() {
    if !support::require_tool("curl") {
        return;
    }
    let origin = Origin::start(OriginConfig::default()).await;
    let gw = TestGateway::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let urls: Vec<String> = (0..5)
        .map(|i| origin.url(&format!("/echo?i={i}")))
        .collect();

    let out = run_ok(&mut curl(&gw, dir.path(), &urls)).await;
    let transfers = parse_curl_write_out(&out.stdout);
    assert_eq!(transfers.len(), urls.len(), "{transfers:#?}");
    assert_curl_one_connection(&transfers, "0");
    assert!(transfers.iter().all(|t| t.http_version == "1.1"));
    for (i, _) in urls.iter().enumerate() {
        let echo: serde_json::Value = serde_json::from_slice(&body_file(dir.path(), i)).unwrap();
        assert_eq!(echo["method"], "GET");
        assert_eq!(echo["path"], format!("/echo?i={i}"), "origin-form upstream");
        assert_eq!(
            echo["conn_id"], 1,
            "every request on the same upstream connection"
        );
        assert_eq!(echo["index_on_conn"], i as u64 + 1);
        assert!(
            echo["headers"].get("proxy-connection").is_none(),
            "curl's Proxy-Connection header is not forwarded: {echo:#}"
        );
    }
    assert_eq!(origin.accepted(), 1, "one upstream connection for 5 URLs");
    assert_one_connection_row(&gw, &origin, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_https_interception_http1_reuses_one_upstream_connection() {
    if !support::require_tool("curl") {
        return;
    }
    let origin = Origin::start(tls_h1()).await;
    let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
    let dir = tempfile::tempdir().unwrap();
    let sizes = [100_000usize, 1, 65_536, 7];
    let urls: Vec<String> = sizes
        .iter()
        .map(|n| origin.url(&format!("/bytes/{n}")))
        .collect();

    let mut cmd = curl(&gw, dir.path(), &urls);
    cmd.arg("--http1.1").arg("--cacert").arg(gw.ca_path());
    let out = run_ok(&mut cmd).await;
    let transfers = parse_curl_write_out(&out.stdout);
    assert_eq!(transfers.len(), urls.len(), "{transfers:#?}");
    assert_curl_one_connection(&transfers, "0");
    assert!(
        transfers.iter().all(|t| t.http_version == "1.1"),
        "{transfers:#?}"
    );
    for (i, n) in sizes.iter().enumerate() {
        assert_eq!(
            body_file(dir.path(), i),
            pattern_bytes(*n),
            "body of /bytes/{n}"
        );
    }
    assert_eq!(origin.accepted(), 1, "one upstream connection for 4 URLs");

    // A second curl process (a new worker connection, a new CONNECT) lands on the same warm
    // upstream connection.
    let dir2 = tempfile::tempdir().unwrap();
    let mut cmd = curl(&gw, dir2.path(), &urls[..2]);
    cmd.arg("--http1.1").arg("--cacert").arg(gw.ca_path());
    let transfers = parse_curl_write_out(&run_ok(&mut cmd).await.stdout);
    assert_curl_one_connection(&transfers, "1");
    assert_eq!(body_file(dir2.path(), 0), pattern_bytes(sizes[0]));
    assert_eq!(
        origin.accepted(),
        1,
        "the pool outlives the worker connection"
    );
    assert!(origin.log().iter().all(|r| r.version == "HTTP/1.1"));
    assert_one_connection_row(&gw, &origin, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_https_interception_http2_and_http1_share_one_h2_upstream_connection() {
    if !support::require_tool("curl") {
        return;
    }
    let origin = Origin::start(tls_h2()).await;
    let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
    let urls: Vec<String> = (0..4)
        .map(|i| origin.url(&format!("/bytes/{}", 5000 + i)))
        .collect();

    // curl speaks HTTP/2 to edgepool inside the intercepted tunnel.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = curl(&gw, dir.path(), &urls);
    cmd.arg("--http2").arg("--cacert").arg(gw.ca_path());
    let transfers = parse_curl_write_out(&run_ok(&mut cmd).await.stdout);
    assert_eq!(transfers.len(), urls.len());
    assert_curl_one_connection(&transfers, "0");
    assert!(
        transfers.iter().all(|t| t.http_version == "2"),
        "curl negotiated h2 with edgepool's interception: {transfers:#?}"
    );
    for i in 0..urls.len() {
        assert_eq!(body_file(dir.path(), i), pattern_bytes(5000 + i));
    }

    // And HTTP/1.1 from another curl process: still the same HTTP/2 upstream connection.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = curl(&gw, dir.path(), &urls);
    cmd.arg("--http1.1").arg("--cacert").arg(gw.ca_path());
    let transfers = parse_curl_write_out(&run_ok(&mut cmd).await.stdout);
    assert_curl_one_connection(&transfers, "1");
    assert!(transfers.iter().all(|t| t.http_version == "1.1"));
    for i in 0..urls.len() {
        assert_eq!(body_file(dir.path(), i), pattern_bytes(5000 + i));
    }

    assert_eq!(
        origin.accepted(),
        1,
        "8 requests from 2 curl processes, 1 upstream connection"
    );
    let log = origin.log();
    assert_eq!(log.len(), 8);
    assert!(
        log.iter().all(|r| r.version == "HTTP/2"),
        "edgepool speaks h2 upstream"
    );
    let row = gw.target_status(&origin.authority()).await;
    assert_eq!(row["protocol"], "h2", "{row:#}");
    assert_one_connection_row(&gw, &origin, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_without_trusting_the_gateway_ca_fails_with_a_certificate_error() {
    if !support::require_tool("curl") {
        return;
    }
    let origin = Origin::start(tls_h1()).await;
    let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
    let dir = tempfile::tempdir().unwrap();
    let url = origin.url("/echo");

    // Trusting only the origin's own CA: the certificate curl sees is not the origin's.
    let mut cmd = curl(&gw, dir.path(), std::slice::from_ref(&url));
    cmd.arg("--cacert").arg(&origin.ca().cert_path);
    let out = run(&mut cmd).await;
    assert_eq!(
        out.status.code(),
        Some(60),
        "curl exit 60 = CURLE_PEER_FAILED_VERIFICATION; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        origin.requests(),
        0,
        "nothing is forwarded when the worker refuses the handshake"
    );

    // With the system trust store (no --cacert) it fails the same way.
    let out = run(&mut curl(&gw, dir.path(), std::slice::from_ref(&url))).await;
    assert_eq!(
        out.status.code(),
        Some(60),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The certificate curl was shown is issued by the gateway's interception CA.
    let mut cmd = curl(&gw, dir.path(), std::slice::from_ref(&url));
    cmd.args(["--insecure", "-v"]);
    let out = run_ok(&mut cmd).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let issuer = stderr
        .lines()
        .find(|l| l.contains("issuer:"))
        .unwrap_or_else(|| panic!("curl -v shows the issuer:\n{stderr}"));
    assert!(
        issuer.contains("edgepool interception CA"),
        "the leaf is signed by edgepool's CA: {issuer}"
    );
    assert_eq!(origin.requests(), 1);
}

// ---------------------------------------------------------------------------------------
// Python requests / httpx
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_session_reuses_connections_for_http_and_https() {
    if !support::require_tool("python3") || !python_module_available("requests").await {
        return;
    }
    let plain = Origin::start(OriginConfig::default()).await;
    let tls = Origin::start(tls_h1()).await;
    let gw = TestGateway::start(&[tls.ca().cert_path.clone()]).await;
    const N: usize = 12;
    let (p, t) = (mixed_gets(&plain, N), mixed_gets(&tls, N));
    // Interleaved: the session keeps its proxy connection and its tunnel alive side by side.
    let plan: Vec<(String, Expect)> = p.into_iter().zip(t).flat_map(|(a, b)| [a, b]).collect();
    let spec = serde_json::json!({
        "proxy": gw.proxy_url(),
        "ca": gw.ca_path(),
        "requests": plan.iter().map(|(u, _)| plan_get(u.clone())).collect::<Vec<_>>(),
    });
    let summary = run_python_client("requests_client.py", &spec).await;
    let results = summary["results"].as_array().unwrap();
    assert_eq!(results.len(), plan.len());
    for (i, ((url, expect), row)) in plan.iter().zip(results).enumerate() {
        check_result(row, expect, &format!("request {i} {url}"));
        assert_eq!(row["http_version"], "HTTP/1.1");
    }
    let plain_rows: Vec<&serde_json::Value> = results.iter().step_by(2).collect();
    let tls_rows: Vec<&serde_json::Value> = results.iter().skip(1).step_by(2).collect();
    assert_first_new_then_reused(&plain_rows, "http");
    assert_first_new_then_reused(&tls_rows, "https");
    assert_eq!(
        plain.accepted(),
        1,
        "one upstream connection for {N} http GETs"
    );
    assert_eq!(
        tls.accepted(),
        1,
        "one upstream connection for {N} https GETs"
    );
    assert_one_connection_row(&gw, &plain, N as u64).await;
    assert_one_connection_row(&gw, &tls, N as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_httpx_client_reuses_connections_for_http_and_https() {
    if !support::require_tool("python3") || !python_module_available("httpx").await {
        return;
    }
    let h2_available = python_module_importable("h2").await;
    if !h2_available {
        eprintln!("NOTE: python module `h2` not importable: httpx runs HTTP/1.1 only");
    }
    let plain = Origin::start(OriginConfig::default()).await;
    let tls = Origin::start(tls_h2()).await;
    let gw = TestGateway::start(&[tls.ca().cert_path.clone()]).await;
    const N: usize = 12;
    let (p, t) = (mixed_gets(&plain, N), mixed_gets(&tls, N));
    let plan: Vec<(String, Expect)> = p.into_iter().zip(t).flat_map(|(a, b)| [a, b]).collect();
    let spec = serde_json::json!({
        "proxy": gw.proxy_url(),
        "ca": gw.ca_path(),
        "http2": true,
        "requests": plan.iter().map(|(u, _)| plan_get(u.clone())).collect::<Vec<_>>(),
    });
    let summary = run_python_client("httpx_client.py", &spec).await;
    assert_eq!(summary["http2_enabled"], h2_available, "{summary:#}");
    let results = summary["results"].as_array().unwrap();
    assert_eq!(results.len(), plan.len());
    for (i, ((url, expect), row)) in plan.iter().zip(results).enumerate() {
        check_result(row, expect, &format!("request {i} {url}"));
    }
    let plain_rows: Vec<&serde_json::Value> = results.iter().step_by(2).collect();
    let tls_rows: Vec<&serde_json::Value> = results.iter().skip(1).step_by(2).collect();
    // Plain http:// goes to the proxy as HTTP/1.1 absolute-form; https:// is intercepted and
    // negotiates h2 with edgepool when httpx has HTTP/2 support.
    assert!(plain_rows.iter().all(|r| r["http_version"] == "HTTP/1.1"));
    let tls_version = if h2_available { "HTTP/2" } else { "HTTP/1.1" };
    assert!(
        tls_rows.iter().all(|r| r["http_version"] == tls_version),
        "https via edgepool is {tls_version}: {tls_rows:#?}"
    );
    assert_first_new_then_reused(&plain_rows, "http");
    assert_first_new_then_reused(&tls_rows, "https");
    assert_eq!(
        plain.accepted(),
        1,
        "one upstream connection for {N} http GETs"
    );
    assert_eq!(
        tls.accepted(),
        1,
        "one upstream connection for {N} https GETs"
    );
    assert!(tls.log().iter().all(|r| r.version == "HTTP/2"));
    assert_one_connection_row(&gw, &plain, N as u64).await;
    assert_one_connection_row(&gw, &tls, N as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_post_body_is_exact_and_a_post_is_never_sent_twice() {
    if !support::require_tool("python3") || !python_module_available("requests").await {
        return;
    }
    let plain = Origin::start(OriginConfig::default()).await;
    let tls = Origin::start(tls_h1()).await;
    let gw = TestGateway::start(&[tls.ca().cert_path.clone()]).await;

    let text_body = "order=42&note=caf\u{e9} \u{2713}\r\nline two\ttab \"quoted\" & more"
        .as_bytes()
        .to_vec();
    // Every byte value, twice, plus a 100 kB tail: not UTF-8, checked in the origin's log.
    let mut binary_body: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
    binary_body.extend(pattern_bytes(100_000));

    let plan = vec![
        plan_get(plain.url("/echo?warm=1")),
        plan_post(plain.url("/echo?post=text"), &text_body),
        plan_post(tls.url("/echo?post=text"), &text_body),
        plan_post(plain.url("/echo?post=binary"), &binary_body),
        plan_post(tls.url("/echo?post=binary"), &binary_body),
        // On a warm connection the origin resets the socket after reading this POST. It is
        // not idempotent, so edgepool must not replay it: the worker gets a 502.
        plan_post(plain.url("/rst"), b"charge=1"),
        plan_post(tls.url("/rst"), b"charge=1"),
    ];
    let spec = serde_json::json!({
        "proxy": gw.proxy_url(),
        "ca": gw.ca_path(),
        "requests": plan,
    });
    let summary = run_python_client("requests_client.py", &spec).await;
    let r = summary["results"].as_array().unwrap();
    assert_eq!(r.len(), plan.len(), "{summary:#}");
    for row in &r[..5] {
        assert!(row.get("exception").is_none(), "{row:#}");
        assert_eq!(row["status"], 200, "{row:#}");
    }
    for row in &r[1..3] {
        let echo: serde_json::Value =
            serde_json::from_str(row["body_text"].as_str().unwrap()).unwrap();
        assert_eq!(echo["method"], "POST");
        assert_eq!(
            echo["body"].as_str().unwrap().as_bytes(),
            &text_body[..],
            "the origin echoes the exact body"
        );
        assert_eq!(
            echo["headers"]["content-length"],
            text_body.len().to_string()
        );
    }
    for row in &r[5..7] {
        assert!(row.get("exception").is_none(), "{row:#}");
        assert_eq!(row["status"], 502, "{row:#}");
        assert_eq!(row["error"], "upstream_failed_not_replayed", "{row:#}");
    }

    for origin in [&plain, &tls] {
        let log = origin.log();
        let posts = |path: &str| -> Vec<&support::Recorded> {
            log.iter()
                .filter(|x| x.method == "POST" && x.path == path)
                .collect()
        };
        let text = posts("/echo?post=text");
        assert_eq!(
            text.len(),
            1,
            "{origin:?}: the POST reached the origin once"
        );
        assert_eq!(text[0].body, text_body);
        let binary = posts("/echo?post=binary");
        assert_eq!(binary.len(), 1, "{origin:?}");
        assert_eq!(binary[0].body, binary_body, "binary body byte-identical");
        let rst = posts("/rst");
        assert_eq!(
            rst.len(),
            1,
            "{origin:?}: a non-idempotent request is never replayed"
        );
        assert_eq!(rst[0].body, b"charge=1");
    }
}

#[test]
fn sha256_matches_known_vectors() {
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
}
