//! End-to-end: the live dashboard (`GET /` on the admin listener) rendered by a real headless
//! browser (Debian's `chromium`) against a real gateway that carried real traffic to two
//! origins (plain HTTP/1.1 and TLS HTTP/2).
//!
//! Asserts on the DOM after the page's own JavaScript polled `/status` and `/status/history`,
//! then takes a screenshot to `target/dashboard.png` (kept as a CI artifact).
mod gw;
mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use gw::TestGateway;
use support::{Origin, OriginConfig};

const BROWSER: &str = "chromium";
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs headless chromium on `url` with `extra` flags; panics on timeout or failure.
async fn chromium(url: &str, extra: &[String]) -> Output {
    let profile = tempfile::tempdir().expect("tempdir for the chromium profile");
    let mut cmd = tokio::process::Command::new(BROWSER);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        // CI runners may export http_proxy; the admin listener is on loopback.
        "--no-proxy-server",
        // Containers often have a tiny /dev/shm.
        "--disable-dev-shm-usage",
        "--virtual-time-budget=6000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(url)
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = match tokio::time::timeout(BROWSER_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("cannot run {BROWSER}: {e}"),
        Err(_) => panic!("{BROWSER} did not finish within {BROWSER_TIMEOUT:?} ({extra:?} {url})"),
    };
    assert!(
        out.status.success(),
        "{BROWSER} {extra:?} {url} failed with {}; stderr:\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stderr), 4000)
    );
    out
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The start tag (from `<`) and the rest of the document of the first element carrying
/// `id="<id>"`.
fn element<'a>(dom: &'a str, id: &str) -> Option<(&'a str, &'a str)> {
    let at = dom.find(&format!(" id=\"{id}\""))?;
    let open = dom[..at].rfind('<')?;
    let end = start_tag_end(&dom[open..])? + open;
    Some((&dom[open..end], &dom[end..]))
}

/// Length of the start tag at the beginning of `s` (through its `>`), honouring quotes.
fn start_tag_end(s: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '>') => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// The value of attribute `name` in start tag `tag`.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let from = tag.find(&key)? + key.len();
    let len = tag[from..].find('"')?;
    Some(&tag[from..from + len])
}

/// Everything from element `id`'s start tag to the first `</closing>` after it.
fn section<'a>(dom: &'a str, id: &str, closing: &str) -> &'a str {
    let (tag, rest) =
        element(dom, id).unwrap_or_else(|| panic!("no element id=\"{id}\" in the DOM"));
    let start = dom.len() - rest.len() - tag.len();
    let close = format!("</{closing}>");
    let end = rest
        .find(&close)
        .unwrap_or_else(|| panic!("element id=\"{id}\" has no {close}"));
    &dom[start..dom.len() - rest.len() + end]
}

/// Start tags of `tag` elements inside `html`.
fn start_tags<'a>(html: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}");
    let mut tags = Vec::new();
    let mut from = 0;
    while let Some(i) = html[from..].find(&open) {
        let at = from + i;
        let after = html[at + open.len()..].chars().next();
        if matches!(after, Some(' ' | '>' | '/')) {
            if let Some(len) = start_tag_end(&html[at..]) {
                tags.push(&html[at..at + len]);
            }
        }
        from = at + open.len();
    }
    tags
}

/// Numbers in an SVG path's `d` (or a polyline's `points`).
fn coordinates(d: &str) -> usize {
    d.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .filter(|t| t.parse::<f64>().is_ok())
        .count()
}

fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png")
}

/// Polls `/status/history` until a point with requests exists (up to 12 s: one point per 5 s).
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn wait_for_history(gw: &TestGateway) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let r = gw.admin_get("/status/history").await;
        assert_ne!(
            r.status(),
            404,
            "admin GET /status/history answered 404: the history endpoint is not wired into \
             src/admin.rs yet, so the dashboard has nothing to draw"
        );
        assert_eq!(r.status(), 200, "GET /status/history");
        let h: serde_json::Value = r.json().await.expect("/status/history is JSON");
        let with_requests = h["points"]
            .as_array()
            .map(|p| p.iter().any(|p| p["requests"].as_u64().unwrap_or(0) > 0))
            .unwrap_or(false);
        if with_requests {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "no /status/history point with requests after 12 s: {h:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_live_status_in_headless_chromium() {
    if !support::require_tool(BROWSER) {
        return;
    }
    let plain = Origin::start(OriginConfig::default()).await;
    let h2 = Origin::start(OriginConfig {
        tls: true,
        h2: true,
        max_concurrent_streams: Some(100),
        ..Default::default()
    })
    .await;
    let gw = TestGateway::start(&[h2.ca().cert_path.clone()]).await;
    let page_url = format!("http://{}/", gw.admin);

    // The page itself: served by the admin listener, and the real dashboard, not a stub.
    let page = gw.admin_get("/").await;
    assert_eq!(page.status(), 200, "GET / on the admin listener");
    let ctype = page.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/html"), "content-type {ctype}");
    let html = page.text().await.unwrap();
    for id in ["chart-reuse", "chart-reasons", "targets", "fleet-reuse"] {
        assert!(
            html.contains(&format!("id=\"{id}\"")),
            "GET / is not the dashboard (no id=\"{id}\"): is src/dashboard.html wired in?"
        );
    }

    // ~50 requests: 25 sequential over HTTP/1.1, 25 over HTTP/2 in waves of 5.
    let worker = gw.client();
    for _ in 0..25 {
        let r = worker.get(plain.url("/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    for _ in 0..5 {
        let wave: Vec<_> = (0..5)
            .map(|_| {
                let worker = worker.clone();
                let url = h2.url("/echo");
                tokio::spawn(async move {
                    let r = worker.get(url).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    r.bytes().await.unwrap();
                })
            })
            .collect();
        for t in wave {
            t.await.unwrap();
        }
    }
    let status = gw.status().await;
    assert_eq!(status["fleet"]["requests"], 50, "{status:#}");
    let fleet_r = status["fleet"]["reuse_rate"].as_f64().unwrap();
    wait_for_history(&gw).await;

    // 1. The DOM after the page's own polling.
    let out = chromium(&page_url, &["--dump-dom".to_string()]).await;
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains("id=\"targets\""),
        "chromium printed no dashboard DOM; stdout:\n{}\nstderr:\n{}",
        tail(&dom, 2000),
        tail(&String::from_utf8_lossy(&out.stderr), 2000)
    );

    let banner = element(&dom, "conn-banner").expect("connection banner").0;
    assert!(
        banner.contains(" hidden"),
        "the connection-lost banner is showing, so polling /status failed: {}",
        section(&dom, "conn-banner", "p")
    );

    let table = section(&dom, "targets", "table");
    let rows: Vec<&str> = start_tags(table, "tr")
        .into_iter()
        .filter_map(|t| attr(t, "data-target"))
        .collect();
    for origin in [&plain, &h2] {
        let target = origin.authority();
        assert!(
            rows.contains(&target.as_str()),
            "no row data-target=\"{target}\" in the targets table; rows: {rows:?}"
        );
    }

    let (fleet_tag, rest) = element(&dom, "fleet-reuse").unwrap();
    let shown = rest[..rest.find('<').unwrap()].trim();
    let shown_r: f64 = shown
        .parse()
        .unwrap_or_else(|_| panic!("fleet reuse rate is not a number: {shown:?} ({fleet_tag})"));
    assert!(
        (0.0..=1.0).contains(&shown_r) && (shown_r - fleet_r).abs() <= 0.0005 + 1e-9,
        "fleet R shown {shown_r}, /status says {fleet_r}"
    );
    let data_value: f64 = attr(fleet_tag, "data-value").unwrap().parse().unwrap();
    assert!((data_value - fleet_r).abs() < 1e-9, "{fleet_tag}");

    let reuse_chart = section(&dom, "chart-reuse", "svg");
    let lines: Vec<&str> = start_tags(reuse_chart, "path")
        .into_iter()
        .filter_map(|t| attr(t, "d"))
        .chain(
            start_tags(reuse_chart, "polyline")
                .into_iter()
                .filter_map(|t| attr(t, "points")),
        )
        .filter(|d| coordinates(d) >= 4)
        .collect();
    assert!(
        !lines.is_empty(),
        "chart-reuse has no path/polyline with points: {}",
        tail(reuse_chart, 2000)
    );
    assert!(
        start_tags(reuse_chart, "path")
            .iter()
            .any(|t| attr(t, "data-series") == Some("reuse")
                && attr(t, "d").is_some_and(|d| coordinates(d) >= 4)),
        "chart-reuse has no R line (path data-series=\"reuse\")"
    );
    assert!(
        reuse_chart.contains("stroke-dasharray"),
        "chart-reuse has no dashed SLO line"
    );

    let reasons_chart = section(&dom, "chart-reasons", "svg");
    assert!(
        start_tags(reasons_chart, "rect")
            .iter()
            .any(|t| attr(t, "data-reason") == Some("cold_key")),
        "chart-reasons has no cold_key bar: {}",
        tail(reasons_chart, 2000)
    );
    let legend = section(&dom, "reasons-legend", "div");
    assert!(legend.contains("cold_key"), "legend: {legend}");

    let exits = section(&dom, "exits", "ul");
    assert!(
        exits.contains("direct") && exits.contains("healthy"),
        "exits: {exits}"
    );

    // Verdicts need a sample: 25 requests per target is below slo.min_requests (100), so no
    // target is judged (and none is shown as a breach).
    assert!(
        table.contains("badge v-warming_up") && table.contains(">warming up<"),
        "targets with 25 requests should read \"warming up\": {}",
        tail(table, 3000)
    );
    assert!(!table.contains("v-breach"), "{}", tail(table, 3000));
    // The "why new" column is readable in full: each reason and its count in one unbroken
    // span, and a cell that wraps instead of clipping with an ellipsis.
    assert!(
        table.contains("<span>cold_key "),
        "why-new cells hold whole reasons: {}",
        tail(table, 3000)
    );
    let why_rule = html
        .lines()
        .find(|l| l.trim_start().starts_with("td.why {"))
        .expect("a td.why rule in the dashboard's style");
    assert!(
        why_rule.contains("white-space: normal")
            && !why_rule.contains("ellipsis")
            && !why_rule.contains("overflow: hidden"),
        "the why-new column must wrap, not clip: {why_rule}"
    );

    // 2. A screenshot at dashboard size, kept under target/ for CI.
    let png = screenshot_path();
    std::fs::create_dir_all(png.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&png);
    chromium(
        &page_url,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1280,900".to_string(),
        ],
    )
    .await;
    let bytes =
        std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        png.display()
    );
    assert!(
        bytes.len() > 10_000,
        "screenshot {} is only {} bytes: a blank page?",
        png.display(),
        bytes.len()
    );
    eprintln!(
        "dashboard screenshot: {} ({} bytes)",
        png.display(),
        bytes.len()
    );

    gw.stop().await;
}
