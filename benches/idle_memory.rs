//! Memory per idle pooled TLS connection (Reuse-lab target: ≤ 64 KiB per idle connection,
//! measured with 10,000 idle connections).
//!
//! Run: `cargo bench --bench idle_memory` (needs `ulimit -n` ≥ connections + 1024 in the shell
//! that runs it; every process of the bench holds one side of every connection).
//! Env: `IDLE_MEMORY_CONNS` (default 10000), `IDLE_MEMORY_MODES` (default `h1,h1-keys,h2`).
//!
//! Method. The bench binary re-executes itself in three roles, so that the process being
//! measured holds only the client side of the connections:
//! - the parent generates a CA and a leaf certificate (`localhost`, `*.idle.test`) into a
//!   temporary directory, starts the origin child, runs one client child per mode and prints
//!   the summary;
//! - the origin child (`IDLE_MEMORY_ROLE=origin`) is a TLS server on 127.0.0.1 (ALPN `h2` and
//!   `http/1.1`, hyper) that answers `200 ok` and keeps every connection open;
//! - a client child (`IDLE_MEMORY_ROLE=client`) is what is measured: an edgepool [`Pool`]
//!   with the real [`Dialer`] (certificate verification on, against the bench CA), on the
//!   same tokio runtime as the gateway (multi-thread, default workers), the system allocator.
//!
//! In a client child: warm up with one connection through the pool (one request), close it;
//! measure the baseline; open N connections
//! (at most 256 dials at once), send one GET on each and hold the leases so that every
//! checkout needs a new connection; release them all (`Release::Keep`), wait until
//! `pool.stats().idle == N`, let things settle 2 s and measure again. Bytes per connection =
//! (after − before) / N, for two figures:
//! - RSS (`VmRSS` of `/proc/self/status`): what the process costs the machine, including
//!   allocator overhead and fragmentation, and the memory of up to 256 handshakes in flight
//!   that the allocator keeps after they finish (a conservative figure; kernel socket buffers
//!   are not in RSS);
//! - live heap: bytes allocated and not yet freed, counted by a wrapper around the system
//!   allocator (what edgepool, hyper/h2, rustls and tokio keep per connection). It can exceed
//!   the RSS growth: pages of a buffer that were never written are not resident.
//!
//! Modes: `h1`: HTTP/1.1 only (ALPN `http/1.1`), all N connections on one key (`localhost`,
//! `max_per_key` raised); `h1-keys`: HTTP/1.1, one connection per key on N keys
//! (`c<i>.idle.test`, the same address): adds the pool's per-key state; `h2`: ALPN `h2`, one
//! connection per key on N keys (an HTTP/2 connection is shared, so one key has one).
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgepool::dial::{DialConfig, Dialer, Scheme, UpstreamConn, UpstreamKey};
use edgepool::exits::{ExitKey, Exits};
use edgepool::pool::{
    CheckoutOpts, CloseReason, Hints, Lease, NoEvents, Pool, PoolConfig, Release,
};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};

/// Live heap bytes (allocated, not yet freed) of this process.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting live bytes.
struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const ROLE: &str = "IDLE_MEMORY_ROLE";
const DIR: &str = "IDLE_MEMORY_DIR";
const PORT: &str = "IDLE_MEMORY_PORT";
const MODE: &str = "IDLE_MEMORY_MODE";
const CONNS: &str = "IDLE_MEMORY_CONNS";
/// Dials in flight at once (the origin's accept backlog is 1024).
const CONCURRENCY: usize = 256;
/// The Reuse-lab target.
const TARGET: f64 = 64.0 * 1024.0;

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("origin") => origin_main(),
        Ok("client") => client_main(),
        _ => parent_main(),
    }
}

fn conns() -> usize {
    std::env::var(CONNS)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn proc_status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/self/status"))
}

/// Soft limit on open files, from `/proc/self/limits`.
fn nofile_limit() -> u64 {
    let s = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    s.lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Parent: certificates, children, summary.

struct Outcome {
    mode: String,
    conns: usize,
    rss_before: u64,
    rss_after: u64,
    heap_before: u64,
    heap_after: u64,
    heap_closed: u64,
    open_secs: f64,
}

impl Outcome {
    fn rss_per_conn(&self) -> f64 {
        (self.rss_after as f64 - self.rss_before as f64) / self.conns as f64
    }
    fn heap_per_conn(&self) -> f64 {
        (self.heap_after as f64 - self.heap_before as f64) / self.conns as f64
    }
}

fn parent_main() {
    let n = conns();
    let need = n as u64 + 1024;
    let limit = nofile_limit();
    if limit < need {
        eprintln!(
            "idle_memory: the open-file limit is {limit}; {n} connections need at least {need} \
             (each process holds one side of every connection). Run it as:\n  \
             ulimit -n 65536; cargo bench --bench idle_memory"
        );
        std::process::exit(2);
    }
    let modes = std::env::var("IDLE_MEMORY_MODES").unwrap_or_else(|_| "h1,h1-keys,h2".into());
    let dir = tempfile::tempdir().expect("temp dir");
    write_certs(dir.path());
    let exe = std::env::current_exe().expect("current exe");

    let mut origin = Command::new(&exe)
        .env(ROLE, "origin")
        .env(DIR, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the origin");
    let mut line = String::new();
    BufReader::new(origin.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("origin port");
    let port: u16 = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("origin said {line:?}"));
    println!("origin (child process {}) on 127.0.0.1:{port}", origin.id());

    let mut outcomes = Vec::new();
    for mode in modes.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        println!("--- mode {mode}: {n} connections");
        let mut child = Command::new(&exe)
            .env(ROLE, "client")
            .env(DIR, dir.path())
            .env(PORT, port.to_string())
            .env(MODE, mode)
            .env(CONNS, n.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a client");
        let mut result = None;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.expect("client output");
            if let Some(r) = line.strip_prefix("RESULT ") {
                result = Some(parse_result(mode, r));
            } else {
                println!("  {line}");
            }
        }
        let status = child.wait().expect("client exit");
        match result {
            Some(r) if status.success() => outcomes.push(r),
            _ => println!("  mode {mode} failed ({status})"),
        }
    }
    let _ = origin.kill();
    let _ = origin.wait();

    println!();
    println!(
        "Memory per idle pooled TLS connection, client process only (target ≤ {:.0} KiB of RSS):",
        TARGET / 1024.0
    );
    println!(
        "{:<9} {:>7} {:>11} {:>11} {:>13} {:>11} {:>13} {:>15} {:>8}",
        "mode",
        "conns",
        "RSS before",
        "RSS after",
        "RSS per conn",
        "heap after",
        "heap per conn",
        "heap after close",
        "verdict"
    );
    let mut all_pass = true;
    for o in &outcomes {
        let pass = o.rss_per_conn() <= TARGET;
        all_pass &= pass;
        println!(
            "{:<9} {:>7} {:>8.1} MiB {:>8.1} MiB {:>9.1} KiB {:>7.1} MiB {:>9.1} KiB {:>11.1} MiB {:>8}",
            o.mode,
            o.conns,
            mib(o.rss_before),
            mib(o.rss_after),
            o.rss_per_conn() / 1024.0,
            mib(o.heap_after),
            o.heap_per_conn() / 1024.0,
            mib(o.heap_closed),
            if pass { "PASS" } else { "FAIL" }
        );
        println!(
            "{:<9} (heap before {:.1} MiB; {} connections opened in {:.1} s)",
            "",
            mib(o.heap_before),
            o.conns,
            o.open_secs
        );
    }
    if outcomes.is_empty() {
        println!("no mode completed");
        std::process::exit(1);
    }
    println!(
        "overall: {}",
        if all_pass {
            "PASS (every mode ≤ 64 KiB RSS per idle connection)"
        } else {
            "FAIL"
        }
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn parse_result(mode: &str, s: &str) -> Outcome {
    let get = |k: &str| -> String {
        s.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_else(|| panic!("{k} missing in {s:?}"))
            .to_string()
    };
    let num = |k: &str| -> u64 { get(k).parse().expect("number") };
    Outcome {
        mode: mode.to_string(),
        conns: num("conns") as usize,
        rss_before: num("rss_before"),
        rss_after: num("rss_after"),
        heap_before: num("heap_before"),
        heap_after: num("heap_after"),
        heap_closed: num("heap_closed"),
        open_secs: get("open_secs").parse().expect("seconds"),
    }
}

fn write_certs(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "idle_memory bench CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf_params =
        CertificateParams::new(vec!["localhost".to_string(), "*.idle.test".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("leaf.pem"), leaf.pem() + &ca.pem()).unwrap();
    std::fs::write(dir.join("leaf.key"), leaf_key.serialize_pem()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Origin child: TLS (h2 or http/1.1 by ALPN), `200 ok`, connections kept open.

fn origin_main() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = PathBuf::from(std::env::var(DIR).expect("dir"));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("leaf.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("leaf.key")).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        println!("PORT {port}");
        std::io::stdout().flush().unwrap();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let io = hyper_util::rt::TokioIo::new(tls);
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, svc)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .header_read_timeout(None)
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Client child: the measured process.

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    H1OneKey,
    H1Keys,
    H2Keys,
}

struct Client {
    pool: Pool<Dialer>,
    exit: ExitKey,
    addr: SocketAddr,
    port: u16,
    mode: Mode,
}

impl Client {
    fn key(&self, host: String) -> UpstreamKey {
        UpstreamKey::new(
            Scheme::Https,
            Arc::from(host),
            self.port,
            self.addr,
            self.exit.clone(),
            true,
        )
    }

    /// The key of the `i`-th measured connection (`prefix` `c`), or warm-up one (`w`).
    fn key_for(&self, prefix: char, i: usize) -> UpstreamKey {
        match self.mode {
            Mode::H1OneKey => self.key("localhost".into()),
            Mode::H1Keys | Mode::H2Keys => self.key(format!("{prefix}{i}.idle.test")),
        }
    }

    /// Checks out a connection for `key` and sends one GET on it; returns the lease (busy).
    async fn open_one(&self, key: UpstreamKey) -> Lease<Dialer> {
        let opts = CheckoutOpts {
            deadline: tokio::time::Instant::now() + Duration::from_secs(60),
            fresh: false,
            cold_reason: None,
        };
        let mut lease = match self.pool.checkout(&key, opts).await {
            Ok(l) => l,
            Err(e) => panic!("checkout {}: {e:?}", key.host),
        };
        assert!(!lease.reused(), "every measured checkout must dial");
        lease.mark_sent();
        let authority = format!("{}:{}", key.host, key.port);
        match lease.conn() {
            UpstreamConn::H1 { send, .. } => {
                assert!(self.mode != Mode::H2Keys, "expected h2, got http/1.1");
                send.ready().await.expect("h1 ready");
                let req = http::Request::builder()
                    .uri("/")
                    .header(http::header::HOST, authority)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = send.send_request(req).await.expect("h1 response");
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.expect("h1 body");
            }
            UpstreamConn::H2 { send, .. } => {
                assert!(self.mode == Mode::H2Keys, "expected http/1.1, got h2");
                let mut send = send.clone().ready().await.expect("h2 ready");
                let req = http::Request::builder()
                    .uri(format!("https://{authority}/"))
                    .version(http::Version::HTTP_2)
                    .body(())
                    .unwrap();
                let (resp, _) = send.send_request(req, true).expect("h2 stream");
                let resp = resp.await.expect("h2 response");
                assert_eq!(resp.status(), 200);
                let mut body = resp.into_body();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.expect("h2 body");
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
            }
        }
        lease
    }

    /// Opens `n` connections (`CONCURRENCY` dials at once), one request each, and returns them
    /// to the pool idle. Returns how long opening took.
    #[allow(clippy::disallowed_methods)] // benchmark timer: wall time
    async fn open_idle(self: &Arc<Self>, prefix: char, n: usize) -> Duration {
        let t0 = Instant::now();
        let leases: Vec<Lease<Dialer>> = futures_util::stream::iter(0..n)
            .map(|i| {
                let me = self.clone();
                async move { me.open_one(me.key_for(prefix, i)).await }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let took = t0.elapsed();
        for l in leases {
            l.release(Release::Keep(Hints::default()));
        }
        self.wait_until(|s| s.idle == n && s.total == n, "all idle")
            .await;
        took
    }

    #[allow(clippy::disallowed_methods)] // benchmark timer: wall time
    async fn wait_until(&self, pred: impl Fn(&edgepool::pool::PoolStats) -> bool, what: &str) {
        let t0 = Instant::now();
        loop {
            let s = self.pool.stats();
            if pred(&s) {
                return;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                panic!("timed out waiting for {what}: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn close_all(&self) {
        self.pool.close_idle_where(|_| true, CloseReason::Evicted);
        self.wait_until(|s| s.total == 0, "all closed").await;
    }
}

fn client_main() {
    let n = conns();
    let dir = PathBuf::from(std::env::var(DIR).expect("dir"));
    let port: u16 = std::env::var(PORT).unwrap().parse().unwrap();
    let mode = match std::env::var(MODE).unwrap().as_str() {
        "h1" => Mode::H1OneKey,
        "h1-keys" => Mode::H1Keys,
        "h2" => Mode::H2Keys,
        m => panic!("unknown mode {m:?} (h1, h1-keys, h2)"),
    };
    // The gateway's runtime (src/main.rs): multi-thread, one worker per core.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dialer = Dialer::new(DialConfig {
            connect_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(30),
            http2: mode == Mode::H2Keys,
            extra_ca_files: vec![dir.join("ca.pem")],
            default_max_streams: 100,
            ports: None,
            resolver: None,
            own: Default::default(),
        })
        .expect("dialer");
        let exits = Exits::new(
            &[],
            None,
            edgepool::config::ExitsConfig::default().settings(),
        )
        .expect("exits");
        let exit = ExitKey::direct(exits.direct().clone());
        let limit = 2 * n + 2 * CONCURRENCY;
        let cfg = PoolConfig {
            max_per_key: limit,
            max_total: limit,
            max_idle_total: limit,
            idle_timeout: Duration::from_secs(600),
            ..Default::default()
        };
        let client = Arc::new(Client {
            pool: Pool::new(cfg, dialer, Arc::new(NoEvents)),
            exit,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            port,
            mode,
        });

        // Warm-up: one connection through the whole dial path (TLS config, session cache,
        // runtime, lazily built statics), then back to an empty pool. Only one: memory freed
        // by a bigger warm-up would stay in the allocator and be reused by the measured
        // connections, hiding part of their cost.
        client.open_idle('w', 1).await;
        client.close_all().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_before = proc_status_kib("VmRSS:") * 1024;
        let heap_before = LIVE.load(Ordering::Relaxed) as u64;
        println!(
            "baseline after warm-up: RSS {:.1} MiB, live heap {:.1} MiB",
            mib(rss_before),
            mib(heap_before)
        );

        let took = client.open_idle('c', n).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stats = client.pool.stats();
        assert_eq!(stats.idle, n, "{stats:?}");
        let rss_after = proc_status_kib("VmRSS:") * 1024;
        let heap_after = LIVE.load(Ordering::Relaxed) as u64;
        println!(
            "{n} idle connections ({} keys) after {:.1} s: RSS {:.1} MiB, live heap {:.1} MiB",
            stats.keys,
            took.as_secs_f64(),
            mib(rss_after),
            mib(heap_after)
        );
        println!(
            "per connection: RSS {:.1} KiB, live heap {:.1} KiB",
            (rss_after as f64 - rss_before as f64) / n as f64 / 1024.0,
            (heap_after as f64 - heap_before as f64) / n as f64 / 1024.0
        );

        client.close_all().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let heap_closed = LIVE.load(Ordering::Relaxed) as u64;
        println!(
            "after closing them: RSS {:.1} MiB, live heap {:.1} MiB",
            mib(proc_status_kib("VmRSS:") * 1024),
            mib(heap_closed)
        );
        println!(
            "RESULT conns={n} rss_before={rss_before} rss_after={rss_after} \
             heap_before={heap_before} heap_after={heap_after} heap_closed={heap_closed} \
             open_secs={:.2}",
            took.as_secs_f64()
        );
    });
}
