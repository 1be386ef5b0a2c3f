//! connect_load: a load generator for intercepting forward proxies (`SUITE=paths
//! bench/compare.sh`). wrk and h2load cannot CONNECT through a proxy; this does what a scraping
//! worker does with an `https://` URL and a proxy setting:
//!
//! 1. TCP to the proxy, `CONNECT host:port`, expect `200`;
//! 2. TLS inside the tunnel to `host`, verifying the certificate against `--ca` (the proxy's
//!    CA when it intercepts; the origin's own certificate when it is reached directly);
//! 3. requests over that connection: HTTP/1.1 keep-alive, or HTTP/2 (`--h2`, ALPN `h2`, several
//!    streams at once per connection), or one request per connection
//!    (`--new-conn-per-request`: every request pays TCP + CONNECT + TLS again, with or without
//!    TLS session resumption, `--resume`).
//!
//! Without `--proxy` it goes straight to `--target` (the baseline). Each response must be 2xx
//! with exactly `--expect-body`. The load is bounded by `--duration` and `--max-requests`, and
//! every request by `--timeout`. At the end it prints one line, parsed by the script:
//!
//! ```text
//! EPLOAD requests=N errors=N elapsed_s=S rps=R p50_us=.. p90_us=.. p99_us=.. max_us=..
//!        connections=N handshakes=N resumed=N err_connect=.. err_proxy=.. err_tls=.. ...
//! ```
//!
//! `--check` sends one request, prints what came back and exits non-zero unless it was right.
//!
//! ```text
//! cargo run --release --example connect_load -- --proxy 127.0.0.1:8080 \
//!     --target 127.0.0.1:8443 --ca ca.pem --connections 32 --duration 10s
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
use rustls::client::{Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, HandshakeKind, NamedGroup, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Loads longer than this are refused: this is a bench, not a soak.
const MAX_DURATION: Duration = Duration::from_secs(600);
/// Longest CONNECT response head accepted.
const MAX_CONNECT_HEAD: usize = 16 * 1024;
/// Pause after a failed connection before the next attempt, so a refusing proxy is not spun on.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

#[derive(Parser, Debug)]
#[command(
    about = "CONNECT + TLS load through an intercepting proxy (bench/compare.sh SUITE=paths)"
)]
struct Args {
    /// The proxy (ip:port). Without it, connections go straight to --target.
    #[arg(long)]
    proxy: Option<SocketAddr>,
    /// host:port the CONNECT names (and the TLS server name, unless --sni).
    #[arg(long)]
    target: String,
    /// Without --proxy: the address to dial for --target instead of resolving its host
    /// (like curl's --connect-to).
    #[arg(long, conflicts_with = "proxy")]
    address: Option<SocketAddr>,
    /// Name to verify the certificate for (default: --target's host; an IP is matched as an IP).
    #[arg(long)]
    sni: Option<String>,
    /// PEM file(s) with the certificates to trust (repeatable).
    #[arg(long, required = true)]
    ca: Vec<PathBuf>,
    /// Connections open at once (each one a worker).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// How long to send requests for.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many requests in all, whatever the duration.
    #[arg(long, default_value_t = 5_000_000)]
    max_requests: u64,
    /// Open a new connection (TCP + CONNECT + TLS) for every request.
    #[arg(long)]
    new_conn_per_request: bool,
    /// Keep TLS sessions (tickets) and offer them on new connections.
    #[arg(long)]
    resume: bool,
    /// HTTP/2 (ALPN h2 only) instead of HTTP/1.1.
    #[arg(long)]
    h2: bool,
    /// With --h2: requests in flight at once on each connection.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Path to request.
    #[arg(long, default_value = "/")]
    path: String,
    /// The body every response must have.
    #[arg(long, default_value = "hello")]
    expect_body: String,
    /// Runtime threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Longest a single request (with its connection, when new) may take.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Send one request, print what came back, exit 1 unless it is 2xx with --expect-body.
    #[arg(long)]
    check: bool,
}

/// Why a request failed; one counter each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fail {
    /// TCP connect to the proxy (or target).
    Connect,
    /// The proxy's answer to CONNECT was not 200, or malformed.
    Proxy,
    /// The TLS handshake inside the tunnel (certificate, protocol, ALPN).
    Tls,
    /// HTTP: the request could not be sent or its response read.
    Http,
    /// A response that was not 2xx.
    Status,
    /// A 2xx response with another body.
    Body,
    /// --timeout passed.
    Timeout,
}

const FAILS: [(Fail, &str); 7] = [
    (Fail::Connect, "err_connect"),
    (Fail::Proxy, "err_proxy"),
    (Fail::Tls, "err_tls"),
    (Fail::Http, "err_http"),
    (Fail::Status, "err_status"),
    (Fail::Body, "err_body"),
    (Fail::Timeout, "err_timeout"),
];

struct Error {
    kind: Fail,
    what: String,
}

fn fail(kind: Fail, what: impl std::fmt::Display) -> Error {
    Error {
        kind,
        what: what.to_string(),
    }
}

/// TLS 1.3 tickets in and out of the workers' session stores: with `resumed`, they tell a
/// client that had no ticket to offer from a server that refused the one offered.
#[derive(Debug, Default)]
struct TicketCounts {
    /// NewSessionTicket messages received (stored).
    received: AtomicU64,
    /// Tickets taken out to be offered in a ClientHello.
    offered: AtomicU64,
}

/// One worker's session store (rustls' own in-memory one), counting tickets.
#[derive(Debug)]
struct CountingStore {
    inner: ClientSessionMemoryCache,
    counts: Arc<TicketCounts>,
}

impl ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.inner.set_kx_hint(server_name, group)
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.inner.kx_hint(server_name)
    }
    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.inner.set_tls12_session(server_name, value)
    }
    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name)
    }
    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.counts.received.fetch_add(1, Ordering::Relaxed);
        self.inner.insert_tls13_ticket(server_name, value)
    }
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        let t = self.inner.take_tls13_ticket(server_name);
        if t.is_some() {
            self.counts.offered.fetch_add(1, Ordering::Relaxed);
        }
        t
    }
}

/// What every task shares.
struct Ctx {
    args: Args,
    /// Where TCP goes: the proxy, or the target itself.
    dial: SocketAddr,
    /// `host:port` as the CONNECT and the Host header name it.
    authority: String,
    server_name: ServerName<'static>,
    /// The TLS client settings; each worker gets its own session store (--resume).
    tls: Arc<ClientConfig>,
    tickets: Arc<TicketCounts>,
    /// Requests started, against --max-requests.
    started: AtomicU64,
    deadline: Instant,
    /// First error message of each kind, for the log.
    first_errors: parking_lot::Mutex<Vec<(Fail, String)>>,
}

impl Ctx {
    /// A worker's TLS connector. With --resume it has a session store of its own, like a
    /// worker process reconnecting: it offers a ticket from its own earlier connections.
    /// (One store shared by all connections would hold at most 8 tickets per name — rustls'
    /// bound — and run dry when more than 8 connections start at once.)
    fn connector(&self) -> TlsConnector {
        if !self.args.resume {
            return TlsConnector::from(self.tls.clone());
        }
        let mut cfg = (*self.tls).clone();
        cfg.resumption = Resumption::store(Arc::new(CountingStore {
            inner: ClientSessionMemoryCache::new(16),
            counts: self.tickets.clone(),
        }));
        TlsConnector::from(Arc::new(cfg))
    }

    /// Takes a request slot: false once the duration or the request budget is spent.
    fn admit(&self) -> bool {
        Instant::now() < self.deadline
            && self.started.fetch_add(1, Ordering::Relaxed) < self.args.max_requests
    }

    fn note(&self, e: &Error) {
        let mut firsts = self.first_errors.lock();
        if !firsts.iter().any(|(k, _)| *k == e.kind) {
            eprintln!("connect_load: first {:?} error: {}", e.kind, e.what);
            firsts.push((e.kind, e.what.clone()));
        }
    }
}

/// One task's counts.
#[derive(Default)]
struct Stats {
    /// Latency of each successful request, µs.
    latencies: Vec<u32>,
    errors: [u64; FAILS.len()],
    connections: u64,
    handshakes: u64,
    resumed: u64,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        self.latencies.extend(o.latencies);
        for (a, b) in self.errors.iter_mut().zip(o.errors) {
            *a += b;
        }
        self.connections += o.connections;
        self.handshakes += o.handshakes;
        self.resumed += o.resumed;
    }

    fn error(&mut self, ctx: &Ctx, e: Error) {
        ctx.note(&e);
        let i = FAILS.iter().position(|(k, _)| *k == e.kind).unwrap_or(0);
        self.errors[i] += 1;
    }

    fn ok(&mut self, started: Instant) {
        let us = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        self.latencies.push(us);
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = check_args(&args) {
        eprintln!("connect_load: {e}");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(run(args));
    std::process::exit(code);
}

fn check_args(a: &Args) -> Result<(), String> {
    if a.duration > MAX_DURATION || a.duration.is_zero() {
        return Err(format!(
            "--duration must be above 0 and at most {MAX_DURATION:?}"
        ));
    }
    if a.connections == 0 || a.connections > 10_000 {
        return Err("--connections must be 1 to 10000".into());
    }
    if a.streams == 0 || a.streams > 1000 {
        return Err("--streams must be 1 to 1000".into());
    }
    if a.streams > 1 && !a.h2 {
        return Err("--streams > 1 needs --h2".into());
    }
    if a.threads == 0 || a.threads > 64 {
        return Err("--threads must be 1 to 64".into());
    }
    if !a.path.starts_with('/') {
        return Err("--path must start with /".into());
    }
    Ok(())
}

async fn run(args: Args) -> i32 {
    let ctx = match setup(args).await {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("connect_load: {e}");
            return 2;
        }
    };
    if ctx.args.check {
        return check(&ctx).await;
    }
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(ctx.args.connections);
    for _ in 0..ctx.args.connections {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            if ctx.args.new_conn_per_request {
                per_request(&ctx).await
            } else if ctx.args.h2 {
                keep_alive_h2(&ctx).await
            } else {
                keep_alive_h1(&ctx).await
            }
        }));
    }
    let mut all = Stats::default();
    for t in tasks {
        match t.await {
            Ok(s) => all.merge(s),
            Err(e) => {
                eprintln!("connect_load: a load task panicked: {e}");
                return 2;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    report(&ctx, all, elapsed);
    0
}

async fn setup(args: Args) -> Result<Ctx, String> {
    let (host, port) = split_authority(&args.target)?;
    let dial = match args.proxy.or(args.address) {
        Some(p) => p,
        None => tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| format!("resolve {}: {e}", args.target))?
            .next()
            .ok_or_else(|| format!("{} has no address", args.target))?,
    };
    if !dial.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address: this is a loopback bench",
            dial.ip()
        ));
    }
    let name = args.sni.clone().unwrap_or_else(|| host.clone());
    let server_name =
        ServerName::try_from(name.clone()).map_err(|e| format!("server name {name}: {e}"))?;
    let mut roots = RootCertStore::empty();
    for path in &args.ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", path.display()));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = if args.h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    // Ctx::connector gives each worker its own session store with --resume.
    cfg.resumption = Resumption::disabled();
    let deadline = Instant::now() + args.duration;
    Ok(Ctx {
        dial,
        authority: format!("{}:{port}", bracket(&host)),
        server_name,
        tls: Arc::new(cfg),
        tickets: Arc::default(),
        started: AtomicU64::new(0),
        deadline,
        first_errors: parking_lot::Mutex::new(Vec::new()),
        args,
    })
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn split_authority(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("--target {s}: want host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("--target {s}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("--target {s}: no host"));
    }
    Ok((host.to_string(), port))
}

/// TCP (+ CONNECT) + TLS. Returns the stream and whether the handshake resumed a session.
async fn open(ctx: &Ctx, tls: &TlsConnector) -> Result<(TlsStream<TcpStream>, bool), Error> {
    let mut tcp = TcpStream::connect(ctx.dial)
        .await
        .map_err(|e| fail(Fail::Connect, format!("connect {}: {e}", ctx.dial)))?;
    tcp.set_nodelay(true)
        .map_err(|e| fail(Fail::Connect, format!("nodelay: {e}")))?;
    if ctx.args.proxy.is_some() {
        connect_through(&mut tcp, &ctx.authority).await?;
    }
    let tls = tls
        .connect(ctx.server_name.clone(), tcp)
        .await
        .map_err(|e| fail(Fail::Tls, format!("TLS with {}: {e}", ctx.authority)))?;
    let conn = tls.get_ref().1;
    if ctx.args.h2 && conn.alpn_protocol() != Some(b"h2") {
        return Err(fail(
            Fail::Tls,
            format!(
                "ALPN: wanted h2, got {:?}",
                conn.alpn_protocol().map(String::from_utf8_lossy)
            ),
        ));
    }
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    Ok((tls, resumed))
}

/// Sends `CONNECT authority` and reads the proxy's answer up to its blank line.
async fn connect_through(tcp: &mut TcpStream, authority: &str) -> Result<(), Error> {
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| fail(Fail::Proxy, format!("write CONNECT: {e}")))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    loop {
        let n = tcp
            .read(&mut buf)
            .await
            .map_err(|e| fail(Fail::Proxy, format!("read CONNECT answer: {e}")))?;
        if n == 0 {
            return Err(fail(Fail::Proxy, "proxy closed before answering CONNECT"));
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            if end + 4 != head.len() {
                return Err(fail(Fail::Proxy, "bytes after the CONNECT answer's head"));
            }
            break;
        }
        if head.len() > MAX_CONNECT_HEAD {
            return Err(fail(Fail::Proxy, "CONNECT answer head too long"));
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(fail(
            Fail::Proxy,
            format!("CONNECT {authority}: {}", line.trim_end()),
        ));
    }
    Ok(())
}

fn request(ctx: &Ctx) -> http::Request<Empty<Bytes>> {
    let b = if ctx.args.h2 {
        // HTTP/2 needs :scheme and :authority: an absolute URI.
        http::Request::get(format!("https://{}{}", ctx.authority, ctx.args.path))
    } else {
        http::Request::get(ctx.args.path.as_str()).header(http::header::HOST, &ctx.authority)
    };
    b.body(Empty::new()).expect("request")
}

/// Checks a response: 2xx and the expected body.
async fn take(ctx: &Ctx, resp: http::Response<hyper::body::Incoming>) -> Result<(), Error> {
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(Fail::Http, format!("read body: {e}")))?
        .to_bytes();
    if !status.is_success() {
        return Err(fail(
            Fail::Status,
            format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        ));
    }
    if body != ctx.args.expect_body.as_bytes() {
        return Err(fail(
            Fail::Body,
            format!(
                "body {:?}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        ));
    }
    Ok(())
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn send(&mut self, ctx: &Ctx) -> Result<(), Error> {
        let resp = match self {
            Sender::H1(s) => {
                s.ready()
                    .await
                    .map_err(|e| fail(Fail::Http, format!("connection: {e}")))?;
                s.send_request(request(ctx)).await
            }
            Sender::H2(s) => {
                s.ready()
                    .await
                    .map_err(|e| fail(Fail::Http, format!("connection: {e}")))?;
                s.send_request(request(ctx)).await
            }
        }
        .map_err(|e| fail(Fail::Http, format!("request: {e}")))?;
        take(ctx, resp).await
    }
}

/// Opens a connection and its HTTP client (h1 or h2); the connection's task is spawned.
async fn client(ctx: &Ctx, tls: &TlsConnector) -> Result<(Sender, bool), Error> {
    let (tls, resumed) = open(ctx, tls).await?;
    let io = TokioIo::new(tls);
    let sender = if ctx.args.h2 {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| fail(Fail::Http, format!("h2 handshake: {e}")))?;
        tokio::spawn(conn);
        Sender::H2(send)
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| fail(Fail::Http, format!("h1 handshake: {e}")))?;
        tokio::spawn(conn);
        Sender::H1(send)
    };
    Ok((sender, resumed))
}

async fn timed<T>(
    ctx: &Ctx,
    f: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(ctx.args.timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(fail(
            Fail::Timeout,
            format!("no answer within {:?}", ctx.args.timeout),
        )),
    }
}

/// One worker on one HTTP/1.1 keep-alive connection, reconnecting when it fails.
async fn keep_alive_h1(ctx: &Ctx) -> Stats {
    let tls = ctx.connector();
    let mut st = Stats::default();
    let mut conn: Option<Sender> = None;
    while ctx.admit() {
        let t0 = Instant::now();
        let r = timed(ctx, async {
            if conn.is_none() {
                let (s, resumed) = client(ctx, &tls).await?;
                st.connections += 1;
                st.handshakes += 1;
                st.resumed += u64::from(resumed);
                conn = Some(s);
            }
            conn.as_mut().expect("just set").send(ctx).await
        })
        .await;
        match r {
            Ok(()) => st.ok(t0),
            Err(e) => {
                conn = None;
                st.error(ctx, e);
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
    st
}

/// One HTTP/2 connection with --streams requests in flight on it, reconnecting when it fails.
async fn keep_alive_h2(ctx: &Ctx) -> Stats {
    let tls = ctx.connector();
    let mut st = Stats::default();
    while Instant::now() < ctx.deadline {
        let s = match timed(ctx, client(ctx, &tls)).await {
            Ok((s, resumed)) => {
                st.connections += 1;
                st.handshakes += 1;
                st.resumed += u64::from(resumed);
                s
            }
            Err(e) => {
                st.error(ctx, e);
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        let Sender::H2(send) = s else {
            unreachable!("h2 mode")
        };
        let streams = (0..ctx.args.streams).map(|_| {
            let mut s = Sender::H2(send.clone());
            async move {
                let mut st = Stats::default();
                while ctx.admit() {
                    let t0 = Instant::now();
                    match timed(ctx, s.send(ctx)).await {
                        Ok(()) => st.ok(t0),
                        Err(e) => {
                            st.error(ctx, e);
                            return (st, true);
                        }
                    }
                }
                (st, false)
            }
        });
        let mut broken = false;
        for (s, b) in futures_util::future::join_all(streams).await {
            st.merge(s);
            broken |= b;
        }
        if !broken {
            break;
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    st
}

/// One worker opening a new connection (TCP + CONNECT + TLS) for every request.
async fn per_request(ctx: &Ctx) -> Stats {
    let tls = ctx.connector();
    let mut st = Stats::default();
    while ctx.admit() {
        let t0 = Instant::now();
        let r = timed(ctx, async {
            let (mut s, resumed) = client(ctx, &tls).await?;
            st.connections += 1;
            st.handshakes += 1;
            st.resumed += u64::from(resumed);
            s.send(ctx).await
        })
        .await;
        match r {
            Ok(()) => st.ok(t0),
            Err(e) => {
                st.error(ctx, e);
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
    st
}

/// `--check`: one request on a fresh connection; with --resume, a second one that should
/// resume the first one's session.
async fn check(ctx: &Ctx) -> i32 {
    let rounds = if ctx.args.resume { 2 } else { 1 };
    let connector = ctx.connector();
    for round in 1..=rounds {
        let r = timed(ctx, async {
            let (tls, resumed) = open(ctx, &connector).await?;
            let alpn = tls
                .get_ref()
                .1
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_else(|| "-".into());
            let io = TokioIo::new(tls);
            let resp = if ctx.args.h2 {
                let (mut send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|e| fail(Fail::Http, format!("h2 handshake: {e}")))?;
                tokio::spawn(conn);
                send.send_request(request(ctx)).await
            } else {
                let (mut send, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| fail(Fail::Http, format!("h1 handshake: {e}")))?;
                tokio::spawn(conn);
                send.send_request(request(ctx)).await
            }
            .map_err(|e| fail(Fail::Http, format!("request: {e}")))?;
            let status = resp.status();
            take(ctx, resp).await?;
            Ok((status, alpn, resumed))
        })
        .await;
        match r {
            Ok((status, alpn, resumed)) => println!(
                "EPLOAD-CHECK round={round} status={} body={:?} alpn={alpn} resumed={}",
                status.as_u16(),
                ctx.args.expect_body,
                u8::from(resumed)
            ),
            Err(e) => {
                eprintln!("connect_load: check failed ({:?}): {}", e.kind, e.what);
                return 1;
            }
        }
    }
    0
}

fn report(ctx: &Ctx, mut st: Stats, elapsed: f64) {
    st.latencies.sort_unstable();
    let n = st.latencies.len();
    let pct = |p: f64| -> u32 {
        if n == 0 {
            0
        } else {
            st.latencies[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1]
        }
    };
    let errors: u64 = st.errors.iter().sum();
    let mut line = format!(
        "EPLOAD requests={n} errors={errors} elapsed_s={elapsed:.3} rps={:.1} p50_us={} p90_us={} p99_us={} max_us={} \
         connections={} handshakes={} resumed={} tickets_received={} tickets_offered={} h2={} streams={} \
         new_conn_per_request={} resume={}",
        n as f64 / elapsed.max(1e-9),
        pct(50.0),
        pct(90.0),
        pct(99.0),
        st.latencies.last().copied().unwrap_or(0),
        st.connections,
        st.handshakes,
        st.resumed,
        ctx.tickets.received.load(Ordering::Relaxed),
        ctx.tickets.offered.load(Ordering::Relaxed),
        u8::from(ctx.args.h2),
        ctx.args.streams,
        u8::from(ctx.args.new_conn_per_request),
        u8::from(ctx.args.resume),
    );
    for ((_, name), count) in FAILS.iter().zip(st.errors) {
        line.push_str(&format!(" {name}={count}"));
    }
    println!("{line}");
}
