//! Client recipes, proven: each test runs a real, current client (Python requests, httpx,
//! aiohttp, Scrapy, curl_cffi, Node undici, headless Chromium) through the in-process
//! gateway to a real HTTPS loopback origin (HTTP/1.1 and HTTP/2 variants), with exactly the
//! recipe `README.md` ("Pointing workers at it") documents, and asserts status, body and
//! reuse: the origin saw ONE TCP connection for all the requests, and the gateway's
//! `/status` row for the target counts them all with `new_connections = 1`.
//!
//! Every external tool or module is checked first (`support::require_tool`,
//! `python_module_available`): missing ones skip loudly locally and fail under `CI=true`.
//! The client scripts live in `tests/python/*_recipe.py` and `tests/node/`.
mod clients_common;
mod gw;
mod support;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clients_common::*;
use gw::TestGateway;
use support::{Origin, OriginConfig};
use tokio::process::Command;

/// GETs per recipe run.
const N: usize = 8;

/// The origin variants every recipe runs against.
fn origin_variants() -> [(&'static str, OriginConfig); 2] {
    [("h1", tls_h1()), ("h2", tls_h2())]
}

/// Runs `cmd` with a spec file (the last argument) holding `spec`, and parses the JSON summary
/// the script prints as the last line of stdout.
async fn run_recipe(mut cmd: Command, spec: &serde_json::Value) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    cmd.arg(&spec_path);
    let out = run_ok(&mut cmd).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let summary: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "{} printed no JSON summary ({e})\nstdout:\n{stdout}\nstderr:\n{stderr}",
            describe(&cmd)
        )
    });
    eprintln!("{} [{}]", summary["client"], summary["mode"]);
    summary
}

/// `python3 tests/python/<script>`.
fn python(script: &str) -> Command {
    let mut cmd = command("python3");
    // The scripts import tests/python/recipe_common.py: no __pycache__ in the source tree.
    cmd.env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(python_script(script));
    cmd
}

fn spec(gw: &TestGateway, mode: &str, plan: &[(String, Expect)]) -> serde_json::Value {
    serde_json::json!({
        "proxy": gw.proxy_url(),
        "ca": gw.ca_path(),
        "mode": mode,
        "timeout": 30,
        "urls": plan.iter().map(|(u, _)| u.clone()).collect::<Vec<_>>(),
    })
}

/// The result rows of a recipe run that must have succeeded: no deprecation warning from
/// the recipe, every GET 200 with the origin's exact body over `http_version`, and the
/// `x-edgepool-reused` values: the first GET opens the upstream connection when `cold`, every
/// other one (all of them when not `cold`) rides the pooled one.
fn check_recipe(
    summary: &serde_json::Value,
    plan: &[(String, Expect)],
    http_version: &str,
    cold: bool,
) {
    let what = format!("{} [{}]", summary["client"], summary["mode"]);
    assert_eq!(
        summary["deprecations"],
        serde_json::json!([]),
        "{what}: the recipe uses a deprecated API"
    );
    let rows = summary["results"].as_array().expect("results");
    assert_eq!(rows.len(), plan.len(), "{what}: {summary:#}");
    for (i, ((url, expect), row)) in plan.iter().zip(rows).enumerate() {
        check_result(row, expect, &format!("{what} request {i} {url}"));
        assert_eq!(row["http_version"], http_version, "{what} request {i}");
    }
    let reused: Vec<&str> = rows
        .iter()
        .map(|r| r["reused"].as_str().unwrap_or("<missing>"))
        .collect();
    let expected: Vec<&str> = (0..rows.len())
        .map(|i| if cold && i == 0 { "0" } else { "1" })
        .collect();
    assert_eq!(reused, expected, "{what}: x-edgepool-reused per request");
}

/// Asserts every row of a run failed with an exception mentioning one of `needles`.
fn check_all_failed(summary: &serde_json::Value, needles: &[&str]) {
    let what = format!("{} [{}]", summary["client"], summary["mode"]);
    let rows = summary["results"].as_array().expect("results");
    assert!(!rows.is_empty(), "{what}");
    for row in rows {
        let e = row["exception"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: expected a failure, got {row:#}"));
        assert!(
            needles.iter().any(|n| e.contains(n)),
            "{what}: expected a certificate error ({needles:?}), got {e}"
        );
    }
}

/// The end state every recipe test checks per origin: `requests` GETs reached the origin on
/// one TCP connection, over HTTP/2 when the origin offers it, and the gateway's row agrees.
async fn check_origin_reuse(gw: &TestGateway, origin: &Origin, label: &str, requests: u64) {
    assert_eq!(
        origin.requests(),
        requests,
        "{label}: every GET reached the origin once"
    );
    assert_eq!(
        origin.accepted(),
        1,
        "{label}: one upstream TCP connection for {requests} GETs"
    );
    let version = if label == "h2" { "HTTP/2" } else { "HTTP/1.1" };
    assert!(
        origin.log().iter().all(|r| r.version == version),
        "{label}: edgepool speaks {version} upstream"
    );
    assert_one_connection_row(gw, origin, requests).await;
}

async fn python_modules_available(modules: &[&str]) -> bool {
    if !support::require_tool("python3") {
        return false;
    }
    for m in modules {
        if !python_module_available(m).await {
            return false;
        }
    }
    true
}

// ---------------------------------------------------------------------------------------
// Python requests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_recipe_survives_a_set_requests_ca_bundle() {
    if !python_modules_available(&["requests"]).await {
        return;
    }
    for (label, cfg) in origin_variants() {
        let origin = Origin::start(cfg).await;
        let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
        let plan = mixed_gets(&origin, N);
        // Some other bundle, as on a worker whose image sets REQUESTS_CA_BUNDLE: here the
        // origin's own test CA, which does not hold edgepool's CA.
        let other_bundle: OsString = origin.ca().cert_path.clone().into();
        let recipe = |mode: &str| {
            let mut cmd = python("requests_recipe.py");
            cmd.env("REQUESTS_CA_BUNDLE", &other_bundle);
            (cmd, spec(&gw, mode, &plan))
        };

        // `Session.verify` alone loses: the environment's bundle overrides it.
        let (cmd, s) = recipe("session_verify");
        let naive = run_recipe(cmd, &s).await;
        check_all_failed(&naive, &["CERTIFICATE_VERIFY_FAILED"]);
        assert_eq!(origin.requests(), 0, "{label}: nothing was forwarded");

        // `trust_env = False` with explicit proxies and `Session.verify`.
        let (cmd, s) = recipe("trust_env_false");
        let summary = run_recipe(cmd, &s).await;
        check_recipe(&summary, &plan, "HTTP/1.1", true);

        // `verify=` per request wins over the environment.
        let (cmd, s) = recipe("per_request_verify");
        let summary = run_recipe(cmd, &s).await;
        check_recipe(&summary, &plan, "HTTP/1.1", false);

        check_origin_reuse(&gw, &origin, label, 2 * N as u64).await;
    }
}

// ---------------------------------------------------------------------------------------
// httpx
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpx_sync_and_async_http2_with_an_ssl_context() {
    if !python_modules_available(&["httpx", "h2"]).await {
        return;
    }
    for (label, cfg) in origin_variants() {
        let origin = Origin::start(cfg).await;
        let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
        let plan = mixed_gets(&origin, N);
        let sync = run_recipe(python("httpx_recipe.py"), &spec(&gw, "sync", &plan)).await;
        check_recipe(&sync, &plan, "HTTP/2", true);
        let asyn = run_recipe(python("httpx_recipe.py"), &spec(&gw, "async", &plan)).await;
        check_recipe(&asyn, &plan, "HTTP/2", false);
        check_origin_reuse(&gw, &origin, label, 2 * N as u64).await;
    }
}

// ---------------------------------------------------------------------------------------
// aiohttp
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiohttp_proxy_per_request_with_an_ssl_context() {
    if !python_modules_available(&["aiohttp"]).await {
        return;
    }
    for (label, cfg) in origin_variants() {
        let origin = Origin::start(cfg).await;
        let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
        let plan = mixed_gets(&origin, N);
        let s = spec(&gw, "default", &plan);
        let summary = run_recipe(python("aiohttp_recipe.py"), &s).await;
        check_recipe(&summary, &plan, "HTTP/1.1", true);
        check_origin_reuse(&gw, &origin, label, N as u64).await;
    }
}

// ---------------------------------------------------------------------------------------
// curl_cffi
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_cffi_impersonating_chrome_verifies_the_gateway_ca() {
    if !python_modules_available(&["curl_cffi"]).await {
        return;
    }
    for (label, cfg) in origin_variants() {
        let origin = Origin::start(cfg).await;
        let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
        let plan = mixed_gets(&origin, N);
        let s = spec(&gw, "chrome", &plan);
        let summary = run_recipe(python("curl_cffi_recipe.py"), &s).await;
        // Chrome's ClientHello offers h2, and edgepool's interception takes it.
        check_recipe(&summary, &plan, "HTTP/2", true);
        check_origin_reuse(&gw, &origin, label, N as u64).await;
    }
}

// ---------------------------------------------------------------------------------------
// Scrapy
// ---------------------------------------------------------------------------------------

/// Default settings (no verification), then `DOWNLOAD_VERIFY_CERTIFICATES = True` with the
/// CA in `SSL_CERT_FILE`, and a control run showing that verification really is on: without
/// the CA every request fails with a certificate error. Before the leaf-certificate fix
/// (no basicConstraints extension) every Scrapy request through edgepool failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapy_spider_with_default_settings_and_with_certificate_verification() {
    if !python_modules_available(&["scrapy"]).await {
        return;
    }
    for (label, cfg) in origin_variants() {
        let origin = Origin::start(cfg).await;
        let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
        let plan = mixed_gets(&origin, N);

        // Control: verification on, edgepool's CA not trusted.
        let s = spec(&gw, "verify", &plan);
        let control = run_recipe(python("scrapy_recipe.py"), &s).await;
        check_all_failed(&control, &["certificate verify failed"]);
        assert_eq!(origin.requests(), 0, "{label}: nothing was forwarded");

        let s = spec(&gw, "default", &plan);
        let summary = run_recipe(python("scrapy_recipe.py"), &s).await;
        check_recipe(&summary, &plan, "HTTP/1.1", true);

        let mut cmd = python("scrapy_recipe.py");
        cmd.env("SSL_CERT_FILE", gw.ca_path());
        let summary = run_recipe(cmd, &spec(&gw, "verify", &plan)).await;
        check_recipe(&summary, &plan, "HTTP/1.1", false);

        check_origin_reuse(&gw, &origin, label, 2 * N as u64).await;
    }
}

// ---------------------------------------------------------------------------------------
// Node undici
// ---------------------------------------------------------------------------------------

fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

/// `tests/node/node_modules` with the locked undici, installed with `npm ci` when missing.
/// Missing node/npm, or an install that fails: `SKIPPED:` locally, a panic under `CI=true`.
async fn node_modules_ready() -> bool {
    if !support::require_tool("node") || !support::require_tool("npm") {
        return false;
    }
    let dir = node_dir();
    if dir.join("node_modules/undici/package.json").is_file() {
        return true;
    }
    let mut cmd = command("npm");
    cmd.args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir);
    let out = run(&mut cmd).await;
    if out.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&out.stderr);
    if support::ci() {
        panic!("`npm ci` in tests/node failed and CI=true:\n{why}");
    }
    eprintln!(
        "SKIPPED: `npm ci` in tests/node failed, undici is not installed; this test did not \
         run (under CI=true this is a failure):\n{why}"
    );
    false
}

fn node_recipe() -> Command {
    let mut cmd = command("node");
    cmd.arg(node_dir().join("undici_recipe.mjs"));
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_undici_proxy_agent_with_request_tls_ca_or_node_extra_ca_certs() {
    if !node_modules_ready().await {
        return;
    }
    for (label, cfg) in origin_variants() {
        let origin = Origin::start(cfg).await;
        let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
        let plan = mixed_gets(&origin, N);

        // Control: neither requestTls.ca nor NODE_EXTRA_CA_CERTS, Node's bundled roots only.
        let s = spec(&gw, "node_extra_ca_certs", &plan);
        let control = run_recipe(node_recipe(), &s).await;
        // edgepool sends its CA along with the leaf, hence "self-signed certificate in chain".
        check_all_failed(&control, &["SELF_SIGNED_CERT_IN_CHAIN"]);
        assert_eq!(origin.requests(), 0, "{label}: nothing was forwarded");

        let summary = run_recipe(node_recipe(), &spec(&gw, "requestTls", &plan)).await;
        check_recipe(&summary, &plan, "HTTP/1.1", true);

        let mut cmd = node_recipe();
        cmd.env("NODE_EXTRA_CA_CERTS", gw.ca_path());
        let summary = run_recipe(cmd, &s).await;
        check_recipe(&summary, &plan, "HTTP/1.1", false);

        check_origin_reuse(&gw, &origin, label, 2 * N as u64).await;
    }
}

// ---------------------------------------------------------------------------------------
// Headless Chromium
// ---------------------------------------------------------------------------------------

const BROWSER: &str = "chromium";
/// Images on the test page (`/page/N` on the origin).
const PAGE_IMAGES: usize = 6;

/// A fresh `$HOME` whose NSS database (`$HOME/.pki/nssdb`, where Chromium on Linux looks for
/// user-added trust anchors) trusts `ca` for TLS servers, or nothing when `ca` is `None`.
async fn nss_home(ca: Option<&Path>) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let db = home.path().join(".pki/nssdb");
    std::fs::create_dir_all(&db).unwrap();
    let db = format!("sql:{}", db.display());
    run_ok(command("certutil").args(["-N", "-d", &db, "--empty-password"])).await;
    if let Some(ca) = ca {
        let mut cmd = command("certutil");
        cmd.args(["-A", "-d", &db, "-n", "edgepool CA", "-t", "C,,", "-i"])
            .arg(ca);
        run_ok(&mut cmd).await;
    }
    home
}

/// Headless Chromium with `HOME=home`, edgepool as its proxy (loopback included: Chromium
/// bypasses proxies for loopback unless told `<-loopback>`), `--dump-dom` of `url`.
async fn chromium_dump_dom(gw: &TestGateway, home: &Path, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = command(BROWSER);
    cmd.env("HOME", home)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--proxy-server={}", gw.proxy_url()))
        .arg("--proxy-bypass-list=<-loopback>")
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url);
    let out = run_ok(&mut cmd).await;
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The JSON the test page's script wrote into `<pre id="result">`, if it ran.
fn page_result(dom: &str) -> Option<serde_json::Value> {
    let start = dom.find("<pre id=\"result\">")? + "<pre id=\"result\">".len();
    let len = dom[start..].find("</pre>")?;
    let text = dom[start..start + len]
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    serde_json::from_str(&text).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_with_the_ca_in_nss_loads_a_page_and_subresources_over_pooled_connections() {
    if !support::require_tool(BROWSER) || !support::require_tool("certutil") {
        return;
    }
    for (label, cfg) in origin_variants() {
        let origin = Origin::start(cfg).await;
        let gw = TestGateway::start(&[origin.ca().cert_path.clone()]).await;
        let url = origin.url(&format!("/page/{PAGE_IMAGES}"));
        let mut expected_paths = vec![
            format!("/page/{PAGE_IMAGES}"),
            "/page/style.css".to_string(),
            "/page/app.js".to_string(),
            "/echo?from=page-js".to_string(),
        ];
        expected_paths.extend((0..PAGE_IMAGES).map(|i| format!("/page/img/{i}.svg")));
        expected_paths.sort();

        // Control: an NSS database without edgepool's CA. The page never loads.
        let untrusting = nss_home(None).await;
        let dom = chromium_dump_dom(&gw, untrusting.path(), &url).await;
        assert!(
            page_result(&dom).is_none() && !dom.contains("edgepool test page"),
            "{label}: without the CA in NSS the page must not load:\n{dom}"
        );
        assert_eq!(origin.requests(), 0, "{label}: nothing was forwarded");

        // The recipe, twice: two browser processes with the same NSS database.
        let home = nss_home(Some(&gw.ca_path())).await;
        let mut accepted_after_first = 0;
        for run in 0..2 {
            let before = origin.log().len();
            let dom = chromium_dump_dom(&gw, home.path(), &url).await;
            let what = format!("{label} browser run {run}");
            let result = page_result(&dom)
                .unwrap_or_else(|| panic!("{what}: the page's script did not run:\n{dom}"));
            assert_eq!(result["js"], true, "{what}: {result:#}");
            // Chromium speaks HTTP/2 to edgepool's interception for the page and every
            // subresource (the Resource Timing `nextHopProtocol`), whatever the origin speaks.
            let protocols = result["protocols"].as_array().unwrap();
            assert_eq!(protocols.len(), 3 + PAGE_IMAGES, "{what}: {result:#}");
            assert!(protocols.iter().all(|p| p == "h2"), "{what}: {result:#}");
            assert_eq!(
                result["color"], "rgb(1, 2, 3)",
                "{what}: the stylesheet applied: {result:#}"
            );
            let images = result["images"].as_array().unwrap();
            assert_eq!(images.len(), PAGE_IMAGES, "{what}: {result:#}");
            assert!(
                images.iter().all(|i| i["loaded"] == true),
                "{what}: every image decoded: {result:#}"
            );
            assert_eq!(result["fetch"]["status"], 200, "{what}: {result:#}");
            assert_eq!(result["fetch"]["path"], "/echo?from=page-js");
            if label == "h2" {
                // The script's fetch comes after the load event, on the one h2 upstream
                // connection that carried the page (read from the response header).
                assert_eq!(
                    result["fetch"]["reused"], "1",
                    "{what}: the page's fetch rode a pooled connection: {result:#}"
                );
            }

            // Everything the page needs reached the origin, once, through edgepool.
            // (Chromium may also ask for /favicon.ico, which the origin answers with an echo.)
            let mut paths: Vec<String> = origin.log()[before..]
                .iter()
                .map(|r| r.path.clone())
                .collect();
            paths.sort();
            let favicons = paths.iter().filter(|p| *p == "/favicon.ico").count();
            assert!(favicons <= 1, "{what}: {paths:?}");
            paths.retain(|p| p != "/favicon.ico");
            assert_eq!(paths, expected_paths, "{what}: requests the origin saw");
            let row = gw.target_status(&origin.authority()).await;
            assert_eq!(
                row["requests"],
                origin.requests(),
                "{what}: every origin request went through edgepool: {row:#}"
            );
            assert_eq!(row["errors"], 0, "{row:#}");
            assert_eq!(row["new_connections"], origin.accepted(), "{what}: {row:#}");
            if run == 0 {
                accepted_after_first = origin.accepted();
            } else {
                // The second browser's first request (the page, alone in flight) rides an
                // upstream connection the first browser's requests had opened.
                let page = &origin.log()[before];
                assert_eq!(page.path, format!("/page/{PAGE_IMAGES}"), "{what}");
                assert!(
                    page.conn_id <= accepted_after_first,
                    "{what}: the page went out on a new upstream connection ({}, {} before)",
                    page.conn_id,
                    accepted_after_first
                );
            }
        }
        let requests = origin.requests();
        assert!(requests as usize >= 2 * expected_paths.len());
        if label == "h2" {
            // edgepool multiplexes the page's parallel requests, of both browser processes,
            // onto one h2 upstream connection.
            check_origin_reuse(&gw, &origin, label, requests).await;
        } else {
            // Chromium loads subresources in parallel; over HTTP/1.1 upstream that takes
            // several connections (how many depends on timing), which are then reused.
            assert!(
                origin.accepted() < requests,
                "{label}: {} upstream connections for {requests} requests",
                origin.accepted()
            );
        }
    }
}
