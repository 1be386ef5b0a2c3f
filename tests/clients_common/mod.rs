//! Helpers shared by the tests that run real clients as workers (`tests/clients.rs`,
//! `tests/clients_recipes.rs`): subprocesses with a scrubbed proxy/CA environment, the
//! `SKIPPED:`/CI-panic checks for Python modules, the per-request result rows the client
//! scripts print, and the reuse assertions on the origin and the gateway's `/status`.
//!
//! Use it from a test binary that also declares `mod gw; mod support;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use base64::Engine;
use tokio::process::Command;

use crate::gw::TestGateway;
use crate::support::{self, pattern_bytes, Origin, OriginConfig};

/// Upper bound for any one subprocess; it is killed (and the test fails) past it.
pub const SUBPROCESS_TIMEOUT: Duration = Duration::from_secs(90);

/// Environment variables that could route a client around edgepool (`NO_PROXY=localhost`)
/// or change which CA it trusts.
pub const SCRUBBED_ENV: &[&str] = &[
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
];

pub fn tls_h1() -> OriginConfig {
    OriginConfig {
        tls: true,
        ..Default::default()
    }
}

pub fn tls_h2() -> OriginConfig {
    OriginConfig {
        tls: true,
        h2: true,
        ..Default::default()
    }
}

/// A command with the proxy/CA environment scrubbed, no stdin, killed when dropped.
pub fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// Runs `cmd` to completion (stdout and stderr captured), panicking if it does not finish
/// within [`SUBPROCESS_TIMEOUT`] (the child is then killed by `kill_on_drop`).
pub async fn run(cmd: &mut Command) -> Output {
    let desc = describe(cmd);
    match tokio::time::timeout(SUBPROCESS_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("could not run {desc}: {e}"),
        Err(_) => panic!("{desc} did not finish within {SUBPROCESS_TIMEOUT:?}; killed"),
    }
}

/// The command line, shortened for panic messages.
pub fn describe(cmd: &Command) -> String {
    let mut desc = format!("{:?}", cmd.as_std());
    if desc.len() > 600 {
        let mut cut = 600;
        while !desc.is_char_boundary(cut) {
            cut -= 1;
        }
        desc.truncate(cut);
        desc.push_str(" …");
    }
    desc
}

/// Like [`run`], and panics (showing stdout and stderr) unless the exit status is 0.
pub async fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd).await;
    assert!(
        out.status.success(),
        "{} failed with {}\nstdout:\n{}\nstderr:\n{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether `python3 -c "import <module>"` succeeds. Quiet: for optional modules.
pub async fn python_module_importable(module: &str) -> bool {
    run(command("python3").args(["-c", &format!("import {module}")]))
        .await
        .status
        .success()
}

/// Like `support::require_tool`, for a Python module: `true` if `python3` can import
/// `module`. Otherwise prints a loud `SKIPPED:` line and returns `false` so the test can
/// return early — or, under `CI=true`, panics, so missing coverage cannot go unnoticed.
pub async fn python_module_available(module: &str) -> bool {
    let out = run(command("python3").args(["-c", &format!("import {module}")])).await;
    if out.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&out.stderr);
    let why = why.trim().lines().last().unwrap_or("");
    // Loud locally (and in EDGEPOOL_SKIP_LOG, which .ci/run checks); a failure under CI.
    support::skip(&format!(
        "python module `{module}` not importable by python3 ({why}); install it with \
         `python3 -m pip install {module}`"
    ))
}

/// `tests/python/<name>`.
pub fn python_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Runs a Python worker script with `spec` (handed over in a JSON file: request bodies can
/// be larger than the argument size limit) and parses its JSON summary.
pub async fn run_python_client(script: &str, spec: &serde_json::Value) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let out = run_ok(
        command("python3")
            .arg(python_script(script))
            .arg(&spec_path),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON summary ({e})\nstdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("{script}: {}", summary["client"]);
    summary
}

/// One planned request for the Python scripts.
pub fn plan_get(url: String) -> serde_json::Value {
    serde_json::json!({ "method": "GET", "url": url })
}

pub fn plan_post(url: String, body: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "method": "POST",
        "url": url,
        "body_b64": base64::engine::general_purpose::STANDARD.encode(body),
    })
}

/// What a GET in a client plan must return.
#[derive(Clone, Debug)]
pub enum Expect {
    /// `/bytes/N`: exactly the pattern bytes (compared by length and SHA-256).
    Bytes(usize),
    /// `/echo?i=N`: a JSON echo of a GET whose target is exactly this path.
    Echo(String),
}

/// `n` GETs alternating `/bytes/<1000+i>` and `/echo?i=<i>` on `origin`.
pub fn mixed_gets(origin: &Origin, n: usize) -> Vec<(String, Expect)> {
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                let len = 1000 + i;
                (origin.url(&format!("/bytes/{len}")), Expect::Bytes(len))
            } else {
                let path = format!("/echo?i={i}");
                (origin.url(&path), Expect::Echo(path))
            }
        })
        .collect()
}

/// Checks one result row of a Python script against `expect`.
pub fn check_result(row: &serde_json::Value, expect: &Expect, what: &str) {
    assert!(
        row.get("exception").is_none(),
        "{what}: the client raised {}",
        row["exception"]
    );
    assert_eq!(row["status"], 200, "{what}: {row:#}");
    assert!(
        row["error"].is_null(),
        "{what}: edgepool error {}",
        row["error"]
    );
    match expect {
        Expect::Bytes(len) => {
            assert_eq!(row["len"], *len as u64, "{what}: body length");
            assert_eq!(
                row["sha256"].as_str().unwrap(),
                sha256_hex(&pattern_bytes(*len)),
                "{what}: body bytes differ from the origin's pattern"
            );
        }
        Expect::Echo(path) => {
            let echo: serde_json::Value =
                serde_json::from_str(row["body_text"].as_str().expect("echo body is UTF-8"))
                    .unwrap_or_else(|e| panic!("{what}: echo body is not JSON: {e}: {row:#}"));
            assert_eq!(echo["method"], "GET", "{what}");
            assert_eq!(echo["path"], path.as_str(), "{what}");
            assert!(
                echo["headers"].get("proxy-authorization").is_none()
                    && echo["headers"].get("proxy-connection").is_none(),
                "{what}: proxy headers reached the origin: {echo:#}"
            );
        }
    }
}

/// The `x-edgepool-reused` values of `rows`, asserting the first request on a target opened
/// the connection and every later one reused it.
pub fn assert_first_new_then_reused(rows: &[&serde_json::Value], what: &str) {
    let reused: Vec<&str> = rows
        .iter()
        .map(|r| r["reused"].as_str().unwrap_or("<missing>"))
        .collect();
    assert_eq!(reused[0], "0", "{what}: first request opens the connection");
    assert!(
        reused[1..].iter().all(|r| *r == "1"),
        "{what}: later requests reuse it: {reused:?}"
    );
}

/// Asserts the gateway's `/status` row for `origin`: `requests` requests, one connection.
pub async fn assert_one_connection_row(gw: &TestGateway, origin: &Origin, requests: u64) {
    let row = gw.target_status(&origin.authority()).await;
    assert_eq!(row["requests"], requests, "{row:#}");
    assert_eq!(row["new_connections"], 1, "{row:#}");
    assert_eq!(row["errors"], 0, "{row:#}");
    let expected_r = 1.0 - 1.0 / requests as f64;
    let r = row["reuse_rate"].as_f64().unwrap();
    assert!(
        (r - expected_r).abs() < 1e-3,
        "R = {r}, expected {expected_r}"
    );
}

// ---------------------------------------------------------------------------------------
// SHA-256 (FIPS 180-4), to check the bodies' digests the Python clients report without a
// new dev-dependency.
// ---------------------------------------------------------------------------------------

pub fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}
