//! End-to-end against a real nginx origin (Debian's `nginx` package): edgepool must reach the
//! best connection reuse nginx allows, with zero worker-visible errors, both when nginx caps
//! requests per connection (`keepalive_requests`) and when it closes idle connections
//! (`keepalive_timeout`, which nginx does not announce: it sends no `Keep-Alive` header).
//!
//! Each test writes its own `nginx.conf` into a tempdir and runs nginx in the foreground as a
//! single process (`daemon off; master_process off;`) owned by the test, killed by pid on drop.
mod gw;
mod support;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gw::TestGateway;
use support::{pattern_bytes, TestCa};

/// nginx's per-connection request cap in these tests (`keepalive_requests`).
const KEEPALIVE_REQUESTS: u64 = 100;
/// nginx's idle timeout in these tests (`keepalive_timeout`), not announced to clients.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Size of the static file served at `/static/blob.bin`.
const BLOB_LEN: usize = 50_000;

/// nginx's `stub_status` counters.
#[derive(Debug, Clone, Copy, PartialEq)]
struct StubStatus {
    active: u64,
    accepts: u64,
    handled: u64,
    requests: u64,
}

/// A foreground nginx process serving from a tempdir, killed (by pid) when dropped.
struct Nginx {
    child: Child,
    /// Plain HTTP listener: only `/nginx_status` is used on it.
    http_port: u16,
    /// TLS listener with a leaf from the test's CA: the traffic under test.
    https_port: u16,
    /// `stub_status` right after startup: our readiness probes and that fetch itself.
    baseline: StubStatus,
    /// Number of `/nginx_status` fetches since `baseline`. Each opens one connection and
    /// sends one request, which nginx counts in `accepts` and `requests` like any other.
    status_queries: u64,
    dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // A single process (master_process off): killing its pid stops all of nginx.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// Starts nginx with a TLS server whose certificate (for `localhost` and `127.0.0.1`) is
    /// signed by `ca`. Returns `None` (after a loud SKIPPED line) if nginx is not installed
    /// and `CI` is not `true`.
    async fn start(ca: &TestCa) -> Option<Nginx> {
        if !support::require_tool("nginx") {
            return None;
        }
        let (cert, key) = ca.write_leaf_files("nginx", &["localhost", "127.0.0.1"]);
        // Ports are picked by binding :0 and releasing them; another process may grab one
        // in between, so retry on "Address already in use".
        let mut last_error = String::new();
        for _attempt in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("edgepool-nginx")
                .tempdir()
                .expect("nginx tempdir");
            let http_port = support::free_port();
            let mut https_port = support::free_port();
            while https_port == http_port {
                https_port = support::free_port();
            }
            write_site(dir.path(), http_port, https_port, &cert, &key);
            match Self::spawn(dir, http_port, https_port).await {
                Ok(nginx) => return Some(nginx),
                Err(e) if e.contains("Address already in use") => last_error = e,
                Err(e) => panic!("nginx did not start:\n{e}"),
            }
        }
        panic!("nginx did not start (ports kept being taken):\n{last_error}");
    }

    #[allow(clippy::disallowed_methods)] // waits on a child process in wall time
    async fn spawn(
        dir: tempfile::TempDir,
        http_port: u16,
        https_port: u16,
    ) -> Result<Nginx, String> {
        let p = dir.path();
        let out = std::fs::File::create(p.join("nginx.stdout")).unwrap();
        let err = std::fs::File::create(p.join("nginx.stderr")).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(p)
            .arg("-c")
            .arg(p.join("nginx.conf"))
            // The error log before the configuration is read (nginx ≥ 1.19.5).
            .arg("-e")
            .arg(p.join("error.log"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("could not run nginx: {e}"))?;
        let mut nginx = Nginx {
            child,
            http_port,
            https_port,
            baseline: StubStatus {
                active: 0,
                accepts: 0,
                handled: 0,
                requests: 0,
            },
            status_queries: 0,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                return Err(format!("nginx exited with {status}\n{}", nginx.logs()));
            }
            // nginx binds all its listeners before it serves any: one probe suffices.
            if TcpStream::connect(("127.0.0.1", http_port)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nginx is not listening after 10 s\n{}",
                    nginx.logs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The readiness probes were accepted connections too: count from here.
        nginx.baseline = nginx.stub_status().await;
        nginx.status_queries = 0;
        Ok(nginx)
    }

    /// `localhost:PORT` of the TLS server (the gateway's `/status` row key).
    fn authority(&self) -> String {
        format!("localhost:{}", self.https_port)
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.authority(), path)
    }

    /// stderr, stdout and the error log, for failure messages.
    fn logs(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "--- nginx stderr ---\n{}\n--- nginx stdout ---\n{}\n--- error.log ---\n{}",
            read("nginx.stderr"),
            read("nginx.stdout"),
            read("error.log")
        )
    }

    /// The access log: one `(connection serial, request number on it, status, uri)` per
    /// request, `/nginx_status` fetches excluded.
    fn access_log(&self) -> Vec<(u64, u64, u16, String)> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (
                    f[0].parse().unwrap(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                    f[3].to_string(),
                )
            })
            .filter(|(_, _, _, uri)| uri != "/nginx_status")
            .collect()
    }

    /// Fetches `/nginx_status` directly (not through edgepool) on a fresh connection.
    async fn stub_status(&mut self) -> StubStatus {
        self.status_queries += 1;
        let text = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://127.0.0.1:{}/nginx_status", self.http_port))
            .send()
            .await
            .expect("GET /nginx_status")
            .text()
            .await
            .unwrap();
        parse_stub_status(&text).unwrap_or_else(|| panic!("unexpected stub_status:\n{text}"))
    }

    /// Connections and requests nginx saw from edgepool: its counters minus the baseline
    /// and our own later `/nginx_status` fetches (each one connection and one request, the
    /// current one included).
    async fn served_by_proxy(&mut self) -> (u64, u64) {
        let s = self.stub_status().await;
        assert_eq!(s.accepts, s.handled, "nginx dropped no connection: {s:?}");
        (
            s.accepts - self.baseline.accepts - self.status_queries,
            s.requests - self.baseline.requests - self.status_queries,
        )
    }
}

/// Writes `nginx.conf`, the static file and the temp directories under `dir`.
fn write_site(dir: &Path, http_port: u16, https_port: u16, cert: &Path, key: &Path) {
    let static_dir = dir.join("www/static");
    std::fs::create_dir_all(&static_dir).unwrap();
    std::fs::write(static_dir.join("blob.bin"), pattern_bytes(BLOB_LEN)).unwrap();
    for t in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join("tmp").join(t)).unwrap();
    }
    let d = dir.display();
    let (cert, key) = (cert.display(), key.display());
    let keepalive_timeout = KEEPALIVE_TIMEOUT.as_secs();
    // No `user` directive: with master_process off nginx never switches user, it runs as
    // whoever started it (checked in `assert_runs_as_current_user`), so everything it reads
    // and writes lives in this tempdir. The temp paths are set here so nginx never needs
    // the packaged /var/lib/nginx.
    //
    // The TLS server does not enable `http2`, so edgepool talks HTTP/1.1 to it and
    // keepalive_requests is the per-connection cap. keepalive_timeout has one argument
    // only: nginx then sends no `Keep-Alive: timeout=` header, so edgepool cannot know it.
    let conf = format!(
        r#"
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
lock_file {d}/nginx.lock;
error_log {d}/error.log info;

events {{
    worker_connections 128;
}}

http {{
    default_type text/plain;
    log_format edgepool '$connection $connection_requests $status $request_uri';
    access_log {d}/access.log edgepool;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;

    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout {keepalive_timeout}s;

    server {{
        listen 127.0.0.1:{http_port};
        location = /nginx_status {{
            stub_status;
        }}
        location / {{
            return 200 "ok\n";
        }}
    }}

    server {{
        listen 127.0.0.1:{https_port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location = /nginx_status {{
            stub_status;
        }}
        location /static/ {{
            root {d}/www;
        }}
        location / {{
            return 200 "ok\n";
        }}
    }}
}}
"#
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
}

/// Parses
/// ```text
/// Active connections: 1
/// server accepts handled requests
///  5 5 405
/// Reading: 0 Writing: 1 Waiting: 0
/// ```
fn parse_stub_status(text: &str) -> Option<StubStatus> {
    let mut lines = text.lines();
    let active = lines
        .next()?
        .strip_prefix("Active connections:")?
        .trim()
        .parse()
        .ok()?;
    lines.next()?;
    let nums: Vec<u64> = lines
        .next()?
        .split_whitespace()
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    match nums[..] {
        [accepts, handled, requests] => Some(StubStatus {
            active,
            accepts,
            handled,
            requests,
        }),
        _ => None,
    }
}

/// nginx runs as the user running the tests (as root too: with master_process off the `user`
/// directive, which we do not set anyway, would be ignored and no worker switches user).
#[cfg(target_os = "linux")]
fn assert_runs_as_current_user(nginx: &Nginx) {
    let uids = |status: String| -> String {
        status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap_or_default()
            .to_string()
    };
    let ours = uids(std::fs::read_to_string("/proc/self/status").unwrap());
    let theirs = uids(
        std::fs::read_to_string(format!("/proc/{}/status", nginx.child.id())).unwrap_or_default(),
    );
    assert_eq!(theirs, ours, "nginx runs as the current user");
}

#[cfg(not(target_os = "linux"))]
fn assert_runs_as_current_user(_: &Nginx) {}

/// Sends a GET for `path` through edgepool and checks it is a clean 200 with the expected
/// body: no edgepool error, whatever the pool did underneath.
async fn get_ok(worker: &reqwest::Client, nginx: &Nginx, path: &str, i: usize) -> bool {
    let r = worker
        .get(nginx.url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("request {i} ({path}) failed in the worker: {e:?}"));
    let status = r.status();
    let error = r.headers().get("x-edgepool-error").cloned();
    let reused = r.headers().get("x-edgepool-reused").cloned();
    let body = r.bytes().await.expect("response body");
    assert_eq!(
        status,
        200,
        "request {i} ({path}): x-edgepool-error {error:?}, body {:?}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    assert!(error.is_none(), "request {i} ({path}): {error:?}");
    if path.starts_with("/static/") {
        assert_eq!(
            &body[..],
            &pattern_bytes(BLOB_LEN)[..],
            "request {i}: static file"
        );
    } else {
        assert_eq!(&body[..], b"ok\n", "request {i}");
    }
    reused.expect("x-edgepool-reused on every pooled response") == "1"
}

/// Distinct nginx connections in the access log, and the most requests any one served.
fn connections_in_log(log: &[(u64, u64, u16, String)]) -> (usize, u64) {
    let mut conns: Vec<u64> = log.iter().map(|(c, _, _, _)| *c).collect();
    conns.sort_unstable();
    conns.dedup();
    let max = log.iter().map(|(_, n, _, _)| *n).max().unwrap_or(0);
    (conns.len(), max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_400_sequential_https_gets_reach_the_best_possible_reuse() {
    let ca = TestCa::new();
    let Some(mut nginx) = Nginx::start(&ca).await else {
        return;
    };
    assert_runs_as_current_user(&nginx);
    let gw = TestGateway::start(std::slice::from_ref(&ca.cert_path)).await;
    let worker = gw.client();

    const N: u64 = 400;
    let mut reused = 0u64;
    for i in 0..N as usize {
        // Every 10th request fetches a 50 kB static file, the rest a 3-byte `return`.
        let path = if i % 10 == 9 { "/static/blob.bin" } else { "/" };
        if get_ok(&worker, &nginx, path, i).await {
            reused += 1;
        }
    }

    // nginx closes a connection after its 100th request (keepalive_requests 100), so no
    // pool can do better than ceil(400 / 100) = 4 connections:
    // R_best = 1 − ceil(N / keepalive_requests) / N = 1 − 4/400 = 0.99.
    let best_new = N.div_ceil(KEEPALIVE_REQUESTS);
    let r_best = 1.0 - best_new as f64 / N as f64;
    let row = gw.target_status(&nginx.authority()).await;
    eprintln!("edgepool /status row for nginx: {row:#}");
    assert_eq!(row["requests"], N, "{row:#}");
    assert_eq!(row["errors"], 0, "{row:#}");
    let r = row["reuse_rate"].as_f64().unwrap();
    assert!(r >= 0.99 * r_best, "R = {r} < 0.99 × R_best ({r_best})");
    // And in fact exactly the best: 4 new connections for 400 requests.
    assert_eq!(row["new_connections"], best_new, "{row:#}");
    assert_eq!(reused, N - best_new, "x-edgepool-reused: 1 on all but 4");
    // nginx's `Connection: close` on each connection's 100th response retired it.
    assert_eq!(row["new_by_reason"]["cold_key"], 1, "{row:#}");
    assert_eq!(
        row["new_by_reason"]["max_requests"],
        best_new - 1,
        "{row:#}"
    );

    // nginx's own count agrees with edgepool's.
    let (accepts, requests) = nginx.served_by_proxy().await;
    assert_eq!(
        accepts,
        best_new,
        "nginx stub_status accepts == edgepool new_connections\n{}",
        nginx.logs()
    );
    assert_eq!(requests, N, "nginx served every request exactly once");
    let log = nginx.access_log();
    assert_eq!(log.len() as u64, N);
    assert!(log.iter().all(|(_, _, status, _)| *status == 200));
    let (conns, max_per_conn) = connections_in_log(&log);
    assert_eq!(conns as u64, best_new, "access log: distinct connections");
    assert_eq!(
        max_per_conn, KEEPALIVE_REQUESTS,
        "connections were used up to nginx's cap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_idle_timeout_between_bursts_costs_one_connection_per_burst_and_no_errors() {
    let ca = TestCa::new();
    let Some(mut nginx) = Nginx::start(&ca).await else {
        return;
    };
    assert_runs_as_current_user(&nginx);
    let gw = TestGateway::start(std::slice::from_ref(&ca.cert_path)).await;
    let worker = gw.client();

    // 3 bursts of 10 requests, 6 s apart: each pause is longer than nginx's 5 s
    // keepalive_timeout, so nginx closes the idle connection in every pause (about 12 s of
    // pauses in total, keeping the test well under 30 s).
    const BURSTS: u64 = 3;
    const PER_BURST: u64 = 10;
    const PAUSE: Duration = Duration::from_secs(6);
    assert!(PAUSE > KEEPALIVE_TIMEOUT);
    let mut i = 0usize;
    let mut reused_per_burst = Vec::new();
    for burst in 0..BURSTS {
        if burst > 0 {
            tokio::time::sleep(PAUSE).await;
            // nginx closed the idle connection a second ago; edgepool has already let go of
            // it (seen the FIN, or retired it before the learned timeout), so no request
            // will be sent onto it.
            let row = gw.target_status(&nginx.authority()).await;
            assert_eq!(row["idle"], 0, "before burst {burst}: {row:#}");
        }
        let mut reused = Vec::new();
        for _ in 0..PER_BURST {
            reused.push(get_ok(&worker, &nginx, "/", i).await);
            i += 1;
        }
        reused_per_burst.push(reused);
    }

    // Best possible: the connection of one burst cannot survive the pause after it (nginx
    // closes it after 5 s idle), and one connection carries a whole burst (10 requests
    // < keepalive_requests 100), so
    //   best_new = BURSTS × ceil(PER_BURST / keepalive_requests) = 3 × 1 = 3,
    //   R_best   = 1 − best_new / (BURSTS × PER_BURST) = 1 − 3/30 = 0.9.
    // edgepool does not know nginx's timeout: it must notice the close of the idle
    // connection (or learn the timeout and retire the connection first) and dial afresh,
    // never send a request onto the closed connection. Tolerance: R ≥ 0.98 × R_best, and
    // in fact new_connections ≤ best_new + 0.
    let n = BURSTS * PER_BURST;
    let best_new = BURSTS * PER_BURST.div_ceil(KEEPALIVE_REQUESTS);
    let r_best = 1.0 - best_new as f64 / n as f64;
    let row = gw.target_status(&nginx.authority()).await;
    eprintln!("edgepool /status row for nginx: {row:#}");
    assert_eq!(row["requests"], n, "{row:#}");
    assert_eq!(row["errors"], 0, "{row:#}");
    let r = row["reuse_rate"].as_f64().unwrap();
    assert!(
        r >= 0.98 * r_best,
        "R = {r} < 0.98 × R_best ({r_best}): {row:#}"
    );
    assert!(
        row["new_connections"].as_u64().unwrap() <= best_new,
        "at most one new connection per burst: {row:#}"
    );
    assert_eq!(row["new_connections"], best_new, "{row:#}");
    // Why: the first dial, then one per pause, because nginx closed the idle connection
    // (server_closed_idle) or edgepool retired it just before nginx's learned timeout
    // (idle_expired). Which of the two depends on what edgepool has learned so far.
    let new = &row["new_by_reason"];
    assert_eq!(new["cold_key"], 1, "{row:#}");
    let after_idle =
        new["server_closed_idle"].as_u64().unwrap_or(0) + new["idle_expired"].as_u64().unwrap_or(0);
    assert_eq!(after_idle, BURSTS - 1, "{row:#}");
    for (b, reused) in reused_per_burst.iter().enumerate() {
        assert!(
            !reused[0] && reused[1..].iter().all(|r| *r),
            "burst {b}: a fresh connection, then reuse: {reused:?}"
        );
    }
    let (accepts, requests) = nginx.served_by_proxy().await;
    assert_eq!(
        accepts,
        best_new,
        "nginx stub_status accepts == edgepool new_connections\n{}",
        nginx.logs()
    );
    assert_eq!(requests, n, "nginx served every request exactly once");
    let (conns, _) = connections_in_log(&nginx.access_log());
    assert_eq!(conns as u64, best_new);
}

#[test]
fn stub_status_parses() {
    let s = parse_stub_status(
        "Active connections: 1 \nserver accepts handled requests\n 5 5 405 \nReading: 0 Writing: 1 Waiting: 0 \n",
    );
    assert_eq!(
        s,
        Some(StubStatus {
            active: 1,
            accepts: 5,
            handled: 5,
            requests: 405
        })
    );
}
