//! Loopback origin servers for end-to-end tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::tls::TestCa;
use super::{h1, h2srv};

/// Time allowed for a TLS or HTTP/2 handshake before the connection is dropped.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Behaviour knobs for an [`Origin`]. `OriginConfig::default()` is a plain
/// HTTP/1.1 keep-alive server with no limits or delays.
#[derive(Clone, Debug, Default)]
pub struct OriginConfig {
    /// Serve TLS with a leaf signed by the origin's [`TestCa`], valid for
    /// `localhost`, `127.0.0.1` and `::1`.
    pub tls: bool,
    /// With `tls`: offer ALPN `h2` (preferred) and `http/1.1`; the protocol is
    /// chosen by the negotiated ALPN. Without `h2` only `http/1.1` is offered.
    /// Without `tls`: every connection is served as cleartext HTTP/2 with
    /// prior knowledge (h2c).
    pub h2: bool,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_concurrent_streams: Option<u32>,
    /// HTTP/1.1: the Nth response on a connection carries `Connection: close`
    /// and the server then closes the connection. HTTP/2: once the Nth stream
    /// has been accepted the server starts a graceful GOAWAY (streams the
    /// client opened before it saw the GOAWAY are still served).
    pub max_requests_per_conn: Option<u64>,
    /// Close (FIN; graceful GOAWAY for HTTP/2) a connection that has been idle
    /// this long. Idle = no request in progress; for HTTP/1.1 measured from
    /// the end of the last response (or from accept).
    pub idle_timeout: Option<Duration>,
    /// HTTP/1.1: add `Keep-Alive: <value>` to every response, e.g.
    /// `"timeout=5, max=100"`.
    pub keep_alive_header: Option<String>,
    /// HTTP/1.1: reset (SO_LINGER 0, then close => TCP RST) connections idle
    /// this long, instead of a FIN.
    pub rst_idle_after: Option<Duration>,
    /// HTTP/1.1: once per idle period, write the junk bytes
    /// `HTTP/1.1 200 OK\r\n\r\nJUNK` to a connection idle this long. The
    /// connection is otherwise left alone (a request sent on it afterwards is
    /// still served normally).
    pub stray_bytes_idle_after: Option<Duration>,
    /// Delay before every response head.
    pub response_delay: Option<Duration>,
}

/// One request as received by an [`Origin`].
#[derive(Clone, Debug)]
pub struct Recorded {
    /// 1-based id of the TCP connection, in accept order.
    pub conn_id: u64,
    /// 1-based index of the request on its connection (HTTP/2: in stream
    /// accept order).
    pub index_on_conn: u64,
    pub method: String,
    /// The request target as received: path plus query (`/slow?ms=5`), or
    /// the absolute URI if the request was sent in absolute form.
    pub path: String,
    /// Header fields in received order. HTTP/1.1 names keep their on-the-wire
    /// case; HTTP/2 names are lowercase and the request's `:authority`, if
    /// any, is recorded first as the pseudo-header `(":authority", value)`.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// `"HTTP/1.1"`, `"HTTP/1.0"` or `"HTTP/2"`.
    pub version: String,
    /// The TCP peer address of the connection the request arrived on, i.e.
    /// the source address the origin saw. Requests carried by a fake exit
    /// (see [`super::exits`]) come from that exit's `bind_ip`.
    pub peer: SocketAddr,
}

impl Recorded {
    /// The first value of header `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All values of header `name` (ASCII case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// State shared between the accept loop, connection tasks and the handle.
pub(crate) struct Shared {
    pub cfg: OriginConfig,
    accepted: AtomicU64,
    requests: AtomicU64,
    open: AtomicU64,
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    log: Mutex<Vec<Recorded>>,
}

impl Shared {
    /// Records a fully received request.
    pub fn record(&self, rec: Recorded) {
        // Log first so that `requests()` never runs ahead of `log()`.
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(rec);
        self.requests.fetch_add(1, Ordering::SeqCst);
    }

    /// Marks a request as being handled until the guard is dropped.
    pub fn in_flight(self: &Arc<Self>) -> InFlightGuard {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }
}

/// See [`Shared::in_flight`].
pub(crate) struct InFlightGuard(Arc<Shared>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Keeps `open_connections` accurate however a connection task ends
/// (returns, panics or is aborted).
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: &Arc<Shared>) -> OpenGuard {
        shared.open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(shared.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Gives the HTTP/1.1 server access to the underlying TCP socket (for RST).
pub(crate) trait HasTcp {
    fn tcp(&self) -> &TcpStream;
}

impl HasTcp for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl HasTcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// A running loopback origin server (HTTP/1.1 and/or HTTP/2, plain or TLS)
/// bound to `127.0.0.1:<ephemeral port>`.
///
/// Understood paths (both protocols; anything else is answered like `/echo`):
///
/// * `GET /bytes/N` – 200, `N` bytes where byte `i` is `(i % 251) as u8`
///   (see [`super::pattern_bytes`]), with `Content-Length`.
/// * `/echo` (any method) – 200, JSON `{"method","path","headers":{lowercase
///   name: value},"body","conn_id","index_on_conn","version"}`. Repeated
///   headers are joined with `", "`.
/// * `/status/NNN` – that status (200..=599), small text body.
/// * `/slow?ms=N` – waits `N` ms (at most 60 s), then echoes.
/// * `/rst` – HTTP/1.1: the socket is closed with a TCP RST right after the
///   request was read, no response. HTTP/2: the stream is reset with
///   `INTERNAL_ERROR`.
/// * `/close` – echoes; HTTP/1.1 with `Connection: close`, then closes;
///   HTTP/2 then sends GOAWAY.
/// * `/chunked/N` – HTTP/1.1: `N` pattern bytes, chunked transfer-encoding,
///   several chunks (HTTP/2: plain DATA frames; HTTP/1.0: Content-Length).
/// * `/page/N` – an HTML page (N ≤ 64 images) with its subresources
///   `/page/style.css`, `/page/app.js` and `/page/img/<i>.svg`, for browsers
///   (see `routes::page_route`).
///
/// Every response carries `x-origin-conn: <conn_id>`,
/// `x-origin-index: <index_on_conn>` and `x-origin-peer: <peer ip>` (the
/// source IP address of the connection, see [`Recorded::peer`]); the JSON
/// echo has the same IP address as `"peer"`.
///
/// The server stops on [`Origin::shutdown`] or when the `Origin` is dropped.
pub struct Origin {
    addr: SocketAddr,
    tls: bool,
    ca: TestCa,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("addr", &self.addr)
            .field("cfg", &self.shared.cfg)
            .finish_non_exhaustive()
    }
}

impl Origin {
    /// Binds `127.0.0.1:0` and starts serving. Uses a fresh [`TestCa`] (see
    /// [`Origin::ca`]).
    pub async fn start(cfg: OriginConfig) -> Origin {
        Self::start_with_ca(cfg, &TestCa::new()).await
    }

    /// Like [`Origin::start`], but the TLS leaf is signed by `ca`, so several
    /// origins can share one trust root.
    pub async fn start_with_ca(cfg: OriginConfig, ca: &TestCa) -> Origin {
        Self::start_at(cfg, ca, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind origin on 127.0.0.1:0")
    }

    /// Like [`Origin::start_with_ca`] on `addr` (e.g. `127.0.0.2` and the port of another
    /// origin, for a name with two addresses).
    pub async fn start_at(
        cfg: OriginConfig,
        ca: &TestCa,
        addr: SocketAddr,
    ) -> std::io::Result<Origin> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr().expect("origin local_addr");
        let acceptor = if cfg.tls {
            let alpn: &[&[u8]] = if cfg.h2 {
                &[b"h2", b"http/1.1"]
            } else {
                &[b"http/1.1"]
            };
            let config = ca.server_config(&["localhost", "127.0.0.1", "::1"], alpn);
            Some(TlsAcceptor::from(config))
        } else {
            None
        };
        let tls = cfg.tls;
        let shared = Arc::new(Shared {
            cfg,
            accepted: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            open: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, shared.clone(), acceptor, stop_rx));
        Ok(Origin {
            addr,
            tls,
            ca: ca.clone(),
            shared,
            stop,
            task: Some(task),
        })
    }

    /// The listening address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The CA that signed this origin's certificate (also available for
    /// plain-HTTP origins, where it is simply unused).
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The configuration this origin runs with.
    pub fn config(&self) -> &OriginConfig {
        &self.shared.cfg
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` with TLS.
    pub fn base_url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.port())
        } else {
            format!("http://127.0.0.1:{}", self.port())
        }
    }

    /// `base_url()` followed by `path` (which should start with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url(), path)
    }

    /// The authority part of `base_url()`: `127.0.0.1:PORT` or `localhost:PORT`.
    pub fn authority(&self) -> String {
        if self.tls {
            format!("localhost:{}", self.port())
        } else {
            format!("127.0.0.1:{}", self.port())
        }
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Requests fully received (head and body) so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Every request fully received so far, in order of receipt.
    pub fn log(&self) -> Vec<Recorded> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Connections currently open (accepted and not yet closed by either side).
    pub fn open_connections(&self) -> u64 {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Requests currently being handled (fully received, response not yet
    /// completely written).
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The largest number of requests that were being handled at the same
    /// time (see [`Origin::in_flight`]), across all connections.
    pub fn peak_in_flight(&self) -> u64 {
        self.shared.peak_in_flight.load(Ordering::SeqCst)
    }

    /// Polls (every 10 ms, up to `timeout`) until `cond(self)` holds; returns
    /// whether it did. Handy for counters that settle asynchronously, e.g.
    /// `origin.wait_until(Duration::from_secs(5), |o| o.open_connections() == 0)`.
    pub async fn wait_until(&self, timeout: Duration, cond: impl Fn(&Origin) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops accepting, closes the listener and every open connection
    /// (abruptly), and waits for all connection tasks to finish.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // Aborting drops the accept loop's JoinSet, which aborts every
            // connection task (and, transitively, every HTTP/2 stream task).
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    acceptor: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let mut next_conn_id = 0u64;
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((tcp, peer)) => {
                    shared.accepted.fetch_add(1, Ordering::SeqCst);
                    next_conn_id += 1;
                    let guard = OpenGuard::new(&shared);
                    conns.spawn(serve_conn(
                        tcp,
                        peer,
                        next_conn_id,
                        shared.clone(),
                        acceptor.clone(),
                        guard,
                    ));
                }
                // E.g. EMFILE: back off briefly instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    conns.shutdown().await;
}

async fn serve_conn(
    tcp: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    shared: Arc<Shared>,
    acceptor: Option<TlsAcceptor>,
    _guard: OpenGuard,
) {
    let _ = tcp.set_nodelay(true);
    match acceptor {
        None if shared.cfg.h2 => h2srv::serve(tcp, conn_id, peer, shared).await,
        None => h1::serve(tcp, conn_id, peer, shared).await,
        Some(acceptor) => {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                _ => return,
            };
            let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            if is_h2 {
                h2srv::serve(tls, conn_id, peer, shared).await
            } else {
                h1::serve(tls, conn_id, peer, shared).await
            }
        }
    }
}
