//! A million distinct target names through the real gateway (issue 14 item 3, "flat at a
//! million targets"): what edgepool keeps per name it has seen once, and what `/status` and
//! `/metrics` cost at the end.
//!
//! Run: `cargo bench --bench million_names`. Env: `MILLION_NAMES` (1,000,000),
//! `MILLION_WORKERS` (64 keep-alive worker connections), `MILLION_ORIGINS` (64 origin
//! addresses), `MILLION_SETTLE_SECS` (15: how long to wait, once every upstream connection has
//! closed, before the last reading), `MILLION_CONFIG` (extra TOML appended to the gateway's
//! configuration, e.g. `[slo]\nmax_targets = 500`), `MILLION_GATEWAY_BIN` (another edgepool
//! binary to measure, e.g. one built from an earlier commit, for a before/after). Diagnostics:
//! `MILLION_WRAP=heaptrack` runs the gateway under that command (the RSS readings are then the
//! wrapper's, not edgepool's).
//!
//! Three parties, the measured one alone in its process:
//! - **edgepool**: the release binary (`edgepool serve`), a separate process whose `VmRSS` is
//!   read from `/proc/PID/status`, so nothing this bench holds is counted as edgepool's. Its
//!   configuration: `upstream.dns_servers` = the scripted server below, no hosts file,
//!   `pool.idle_timeout = "2s"` (connections close soon after their one request),
//!   `--allow-target 127.0.0.0/8`.
//! - **a scripted DNS server** (UDP, 127.0.0.1, this process): `n<i>.million.test` has one A
//!   record, `127.0.0.<2 + i mod ORIGINS>` (TTL 60 s), no AAAA (NODATA); any other name is
//!   NXDOMAIN. It keeps no per-name state.
//! - **origins** (this process): one keep-alive HTTP/1.1 listener on each of
//!   `127.0.0.2 ..= 127.0.0.<1 + ORIGINS>`, same port, answering `200 ok`. Every name is a new
//!   pool key and so a new upstream connection; spreading them over 64 destination addresses
//!   keeps the TIME_WAIT sockets each destination leaves (60 s each, on edgepool's side, which
//!   closes them) far below the ephemeral-port range, so the port guard never holds a dial.
//! - **workers** (this process): `MILLION_WORKERS` keep-alive connections to the proxy, each
//!   sending `GET http://n<i>.million.test:PORT/` for the next unsent `i` until `N` are sent.
//!
//! Readings: edgepool's RSS after start-up and 200 warm-up requests to one name (`before`), at
//! 10 %, 50 % and 100 % of the names, once `/metrics` shows no upstream connection open
//! (idle sweep done), and `MILLION_SETTLE_SECS` later (`after`). Retained per name =
//! (after − before) / N. Then `/status` and `/metrics`: five timed GETs each on fresh
//! connections (size, median time). Bounded: every wait has a deadline, the run stops by
//! itself and kills only the gateway process it started.
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::proto::op::{Message, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::A;
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const ZONE: &str = ".million.test";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// The process's resident set, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The origin address of name `i`.
fn origin_ip(i: u64, origins: u64) -> Ipv4Addr {
    let n = 2 + i % origins;
    Ipv4Addr::new(127, 0, (n >> 8) as u8, n as u8)
}

/// The scripted DNS server: answers from the name alone, keeps nothing per name.
async fn dns_server(origins: u64) -> SocketAddr {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let Some(q) = query.queries.first() else {
                continue;
            };
            let mut m = Message::response(query.metadata.id, OpCode::Query);
            m.metadata.recursion_desired = query.metadata.recursion_desired;
            m.metadata.recursion_available = true;
            m.add_queries(query.queries.iter().cloned());
            let name = q.name().to_ascii().to_ascii_lowercase();
            let name = name.strip_suffix('.').unwrap_or(&name);
            let index = name
                .strip_suffix(ZONE)
                .and_then(|l| l.strip_prefix('n'))
                .and_then(|d| d.parse::<u64>().ok())
                .or_else(|| (name == "warm.million.test").then_some(0));
            match (index, q.query_type()) {
                (Some(i), RecordType::A) => {
                    let rdata = RData::A(A(origin_ip(i, origins)));
                    m.add_answer(Record::from_rdata(q.name().clone(), 60, rdata));
                }
                (Some(_), _) => {}
                (None, _) => m.metadata.response_code = ResponseCode::NXDomain,
            }
            if let Ok(bytes) = m.to_vec() {
                let _ = sock.send_to(&bytes, peer).await;
            }
        }
    });
    addr
}

/// Keep-alive HTTP/1.1 origins on 127.0.0.2 ..= 127.0.0.<1 + origins>, one port for all.
async fn origins(origins: u64) -> u16 {
    'port: for _ in 0..20 {
        let first = TcpListener::bind((origin_ip(0, origins), 0)).await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for i in 1..origins {
            match TcpListener::bind((origin_ip(i, origins), port)).await {
                Ok(l) => listeners.push(l),
                Err(_) => continue 'port,
            }
        }
        for l in listeners {
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    tokio::spawn(serve_origin(s));
                }
            });
        }
        return port;
    }
    panic!("no port free on all {origins} origin addresses");
}

async fn serve_origin(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 4096];
    let mut have = 0;
    loop {
        // Requests are GETs without a body: one head each.
        let end = loop {
            if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if have == buf.len() {
                return;
            }
            match s.read(&mut buf[have..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => have += n,
            }
        };
        buf.copy_within(end..have, 0);
        have -= end;
        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .is_err()
        {
            return;
        }
    }
}

/// One response read off a keep-alive connection: its status and `X-Edgepool-Error`.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u16, String)> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..end]).ok()?.to_ascii_lowercase();
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let len: usize = header("content-length:")?.parse().ok()?;
    let error = header("x-edgepool-error:").unwrap_or_default();
    let mut body = buf.len() - end;
    while body < len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body += n;
    }
    Some((status, error))
}

/// Outcome counts of the run.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: parking_lot::Mutex<std::collections::BTreeMap<String, u64>>,
}

async fn worker(
    proxy: SocketAddr,
    port: u16,
    next: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    total: usize,
    tally: Arc<Tally>,
) {
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(4096);
    let mut req = String::with_capacity(160);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            return;
        }
        use std::fmt::Write;
        req.clear();
        let _ = write!(
            req,
            "GET http://n{i}{ZONE}:{port}/ HTTP/1.1\r\nHost: n{i}{ZONE}:{port}\r\n\r\n"
        );
        let mut outcome = None;
        for _attempt in 0..3 {
            if conn.is_none() {
                match TcpStream::connect(proxy).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        conn = Some(s);
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let s = conn.as_mut().expect("connected above");
            if s.write_all(req.as_bytes()).await.is_err() {
                conn = None;
                continue;
            }
            match read_response(s, &mut buf).await {
                Some(r) => {
                    outcome = Some(r);
                    break;
                }
                None => conn = None,
            }
        }
        match outcome {
            Some((200, _)) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Some((status, error)) => {
                *tally
                    .failed
                    .lock()
                    .entry(format!("{status} {error}").trim().to_string())
                    .or_default() += 1;
            }
            None => *tally.failed.lock().entry("transport".into()).or_default() += 1,
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}

/// `GET path` on the admin port over a fresh connection: (body bytes, time to the last byte).
#[allow(clippy::disallowed_methods)] // bench timer: wall time of a real request
async fn admin_get(admin: SocketAddr, path: &str) -> Option<(usize, Duration)> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(admin).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.ok()?;
    let took = t0.elapsed();
    let end = all.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&all[..end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return None;
    }
    let body = &all[end..];
    // Chunked or not, report the decoded size.
    let size = if head.contains("transfer-encoding: chunked") {
        dechunk(body).len()
    } else {
        body.len()
    };
    Some((size, took))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let len = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
            .unwrap_or(0);
        if len == 0 || b.len() < eol + 2 + len {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + len]);
        b = &b[(eol + 2 + len + 2).min(b.len())..];
    }
}

async fn metrics_text(admin: SocketAddr) -> String {
    let Ok(mut s) = TcpStream::connect(admin).await else {
        return String::new();
    };
    let req = b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
    if s.write_all(req).await.is_err() {
        return String::new();
    }
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all).await;
    let Some(end) = all.windows(4).position(|w| w == b"\r\n\r\n") else {
        return String::new();
    };
    let head = String::from_utf8_lossy(&all[..end]).to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(&all[end + 4..])
    } else {
        all[end + 4..].to_vec()
    };
    String::from_utf8_lossy(&body).into_owned()
}

/// The sum of the samples of `metric` (all label sets) in a Prometheus text.
fn metric_sum(text: &str, metric: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// SIGTERM to the child's process group (a graceful stop, so a wrapper such as heaptrack
/// writes its data), SIGKILL after 30 s, then reaps the child.
#[allow(clippy::disallowed_methods)] // a bench's own wall-clock wait, outside any runtime
fn stop_group(child: &mut std::process::Child) {
    let pgid = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a negative pid signals the process group the bench created.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(_)) = child.try_wait() {
            // The group may hold more (a wrapper's helpers); they got the same signal.
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.wait();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[allow(clippy::disallowed_methods)] // benchmark timer: wall time of real sockets
fn main() {
    let n = env_usize("MILLION_NAMES", 1_000_000);
    let workers = env_usize("MILLION_WORKERS", 64).max(1);
    let origin_count = env_usize("MILLION_ORIGINS", 64).clamp(1, 250) as u64;
    let settle = Duration::from_secs(env_usize("MILLION_SETTLE_SECS", 15) as u64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (dns, port) =
        rt.block_on(async { (dns_server(origin_count).await, origins(origin_count).await) });
    let free_port = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (proxy_port, admin_port) = (free_port(), free_port());
    let proxy: SocketAddr = ([127, 0, 0, 1], proxy_port).into();
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("million.toml");
    let extra = std::env::var("MILLION_CONFIG").unwrap_or_default();
    std::fs::write(
        &cfg_path,
        format!(
            "[pool]\nidle_timeout = \"2s\"\n\n[upstream]\ndns_servers = [\"{dns}\"]\nhosts_file = \"\"\n\n{extra}\n"
        ),
    )
    .unwrap();
    let bin = std::env::var("MILLION_GATEWAY_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgepool").to_string());
    let mut cmd = match std::env::var("MILLION_WRAP") {
        Ok(w) => {
            let mut c = Command::new(w);
            c.arg(&bin);
            c
        }
        Err(_) => Command::new(&bin),
    };
    // Its own process group: at the end, the group — the gateway and whatever a wrapper
    // started — is stopped, and nothing else.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .arg("serve")
        .args(["--config", cfg_path.to_str().unwrap()])
        .args(["--listen", &proxy.to_string()])
        .args(["--admin", &admin.to_string()])
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .args(["--allow-target", "127.0.0.0/8"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the release binary");
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        // The first lines only: a million-name run must not flood the terminal.
        for (k, line) in BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .enumerate()
        {
            if k < 20 {
                eprintln!("gateway: {line}");
            }
        }
    });
    let report = rt.block_on(async move {
        // Ready: one request to the warm-up name answers 200.
        let t0 = Instant::now();
        let warm_req = format!("GET http://warm{ZONE}:{port}/ HTTP/1.1\r\nHost: warm{ZONE}:{port}\r\n\r\n");
        let mut buf = Vec::new();
        let mut s = loop {
            assert!(t0.elapsed() < Duration::from_secs(30), "the gateway did not start");
            if let Ok(mut s) = TcpStream::connect(proxy).await {
                if s.write_all(warm_req.as_bytes()).await.is_ok()
                    && matches!(read_response(&mut s, &mut buf).await, Some((200, _)))
                {
                    break s;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for _ in 0..200 {
            s.write_all(warm_req.as_bytes()).await.unwrap();
            assert_eq!(read_response(&mut s, &mut buf).await.map(|r| r.0), Some(200));
        }
        drop(s);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = rss_kib(pid);
        println!("million_names: {n} names, {workers} workers, {origin_count} origin addresses; edgepool pid {pid}");
        println!("  before: RSS {:.1} MiB", mib(before));

        let next = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let tally = Arc::new(Tally::default());
        let started = Instant::now();
        let tasks: Vec<_> = (0..workers)
            .map(|_| {
                tokio::spawn(worker(
                    proxy,
                    port,
                    next.clone(),
                    done.clone(),
                    n,
                    tally.clone(),
                ))
            })
            .collect();
        // Checkpoints and the peak, sampled every 100 ms.
        let mut checkpoints: Vec<(usize, u64, Duration)> = Vec::new();
        let marks = [n / 10, n / 2];
        let mut peak = before;
        let deadline = Duration::from_secs(3600);
        while done.load(Ordering::Relaxed) < n {
            assert!(started.elapsed() < deadline, "the run did not finish within an hour");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let d = done.load(Ordering::Relaxed);
            let rss = rss_kib(pid);
            peak = peak.max(rss);
            for m in marks {
                if d >= m && !checkpoints.iter().any(|c| c.0 == m) {
                    checkpoints.push((m, rss, started.elapsed()));
                    println!(
                        "  {:>3}% ({d} names, {:.0} s): RSS {:.1} MiB",
                        m * 100 / n.max(1),
                        started.elapsed().as_secs_f64(),
                        mib(rss)
                    );
                }
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let took = started.elapsed();
        let at_end = rss_kib(pid);
        peak = peak.max(at_end);
        println!(
            "  100% ({n} names, {:.0} s, {:.0} names/s): RSS {:.1} MiB",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64(),
            mib(at_end)
        );
        // Every upstream connection closed (the pool's idle sweep, 2 s idle timeout).
        let t_close = Instant::now();
        loop {
            let m = metrics_text(admin).await;
            let open = metric_sum(&m, "edgepool_upstream_connections");
            if open == Some(0.0) {
                break;
            }
            if t_close.elapsed() > Duration::from_secs(120) {
                println!("  (connections still open after 120 s: {open:?})");
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let closed = rss_kib(pid);
        println!(
            "  all upstream connections closed ({:.1} s later): RSS {:.1} MiB",
            t_close.elapsed().as_secs_f64(),
            mib(closed)
        );
        tokio::time::sleep(settle).await;
        let after = rss_kib(pid);
        println!("  {} s later (after): RSS {:.1} MiB", settle.as_secs(), mib(after));
        let mut status = (0, Vec::new());
        let mut metrics = (0, Vec::new());
        for _ in 0..5 {
            if let Some((size, t)) = admin_get(admin, "/status").await {
                status.0 = size;
                status.1.push(t);
            }
            if let Some((size, t)) = admin_get(admin, "/metrics").await {
                metrics.0 = size;
                metrics.1.push(t);
            }
        }
        let m = metrics_text(admin).await;
        // Edgepool's own view of its bounded tables, from the last scrape.
        let mut gauges: Vec<String> = m
            .lines()
            .filter(|l| {
                [
                    "edgepool_pool_keys",
                    "edgepool_dns_cache_names ",
                    "edgepool_dns_evictions_total ",
                    "edgepool_target_rows_folded_total ",
                    "edgepool_leaf_cache_hosts ",
                ]
                .iter()
                .any(|p| l.starts_with(p))
            })
            .map(str::to_string)
            .collect();
        for g in [
            "edgepool_upstream_connections_opened_total",
            "edgepool_upstream_connections_closed_total",
        ] {
            if let Some(v) = metric_sum(&m, g) {
                gauges.push(format!("{g} (all reasons) {v}"));
            }
        }
        let failed = tally.failed.lock().clone();
        (
            before,
            at_end,
            closed,
            after,
            peak,
            tally.ok.load(Ordering::Relaxed),
            failed,
            status,
            metrics,
            gauges,
        )
    });
    let (before, at_end, closed, after, peak, ok, failed, status, metrics, gauges) = report;
    stop_group(&mut child);
    let per_name = (after as f64 - before as f64) * 1024.0 / n as f64;
    println!("  answers: {ok} x 200, failures {failed:?}");
    println!(
        "  RSS: before {:.1} MiB, peak {:.1} MiB, at 100% {:.1} MiB, closed {:.1} MiB, after {:.1} MiB",
        mib(before),
        mib(peak),
        mib(at_end),
        mib(closed),
        mib(after)
    );
    println!(
        "  retained per name: {per_name:.0} B ((after - before) / {n}); at 100%: {:.0} B",
        (at_end as f64 - before as f64) * 1024.0 / n as f64
    );
    for (path, (bytes, times)) in [("/status", &status), ("/metrics", &metrics)] {
        if !times.is_empty() {
            println!(
                "  {path}: {bytes} B, median {:.1} ms of {}",
                median(times.clone()).as_secs_f64() * 1e3,
                times.len()
            );
        }
    }
    for g in gauges {
        println!("  {g}");
    }
}
