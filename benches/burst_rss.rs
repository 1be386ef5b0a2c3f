//! Memory under a burst of buffered request bodies (issue 12 item 5): the release binary, 200
//! concurrent 8 MiB POSTs from one address, the gateway's RSS before, at its peak and 3 s
//! after. The origin is a sink that discards bodies; client bodies share one buffer, so the
//! gateway process is the only one that holds the bytes.
//!
//! Run: `cargo bench --bench burst_rss`. Env: `BURST_N` (200), `BURST_MIB` (8),
//! `BURST_CONFIG` (a TOML file for the gateway, e.g. a larger budget or fairness off).
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A keep-alive HTTP/1.1 origin that reads and discards every body and answers 204.
async fn sink() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut have: Vec<u8> = Vec::new();
                loop {
                    // Head.
                    let end = loop {
                        if let Some(i) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => have.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&have[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    have.drain(..end);
                    // Body, discarded.
                    let mut left = len.saturating_sub(have.len());
                    have.drain(..len.min(have.len()));
                    while left > 0 {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                let used = n.min(left);
                                left -= used;
                                have.extend_from_slice(&buf[used..n]);
                            }
                        }
                    }
                    if s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[allow(clippy::disallowed_methods)] // benchmark timer: wall time
fn main() {
    let n: usize = std::env::var("BURST_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mib: usize = std::env::var("BURST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let origin = rt.block_on(sink());
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let admin = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgepool"));
    cmd.arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .args(["--allow-target", "127.0.0.0/8"])
        .args(["--allow-connect-port", "1-65535"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Ok(cfg) = std::env::var("BURST_CONFIG") {
        cmd.args(["--config", &cfg]);
    }
    let mut child = cmd.spawn().expect("the release binary");
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("gateway: {line}");
        }
    });
    let proxy = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(&proxy).unwrap())
        .pool_max_idle_per_host(n)
        .build()
        .unwrap();
    let url = format!("http://{origin}/sink");
    rt.block_on(async {
        // Ready, and warm: a few small requests.
        let t0 = Instant::now();
        loop {
            if let Ok(r) = client.post(&url).body("warm").send().await {
                if r.status() == 204 {
                    break;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "the gateway did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for _ in 0..20 {
            client.post(&url).body("warm").send().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_mib(pid);

        let body = Bytes::from(vec![b'x'; mib << 20]);
        let peak = std::sync::Arc::new(parking_lot::Mutex::new(before));
        let sampling = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    let r = rss_mib(pid);
                    {
                        let mut p = peak.lock();
                        if r > *p {
                            *p = r;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..n {
            let client = client.clone();
            let url = url.clone();
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                match client.post(&url).body(body).send().await {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        let token = r
                            .headers()
                            .get("x-edgepool-error")
                            .map(|v| v.to_str().unwrap_or("").to_string())
                            .unwrap_or_default();
                        (s, token)
                    }
                    Err(_) => (0, "transport".to_string()),
                }
            }));
        }
        let mut by: std::collections::BTreeMap<String, usize> = Default::default();
        for t in tasks {
            let (s, token) = t.await.unwrap();
            *by.entry(format!("{s} {token}").trim().to_string()).or_default() += 1;
        }
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        sampling.abort();
        let after = rss_mib(pid);
        let peak = *peak.lock();
        println!(
            "burst_rss: {n} x {mib} MiB POSTs in {:.1} s; gateway RSS before {before:.1} MiB, peak {peak:.1} MiB, 3 s after {after:.1} MiB (after - before = {:.1} MiB); answers {by:?}",
            took.as_secs_f64(),
            after - before
        );
    });
    let _ = child.kill();
    let _ = child.wait();
}
