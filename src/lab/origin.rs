//! Lab origins: loopback HTTP servers with a behaviour profile, the reuse lab's measuring
//! instrument.
//!
//! Each [`LabOrigin`] binds `127.0.0.1:0` and serves HTTP/1.1 (plain or over TLS) or HTTP/2
//! (over TLS, chosen by ALPN) according to an [`OriginProfile`]: injected TCP / TLS / time-to-
//! first-byte delays, idle closes, a per-connection request limit (`Connection: close` on
//! HTTP/1.1, graceful GOAWAY on HTTP/2), load-balancer style GOAWAY recycling, and idle
//! connections reset (RST) for a seeded fraction of connections. It counts exactly what the lab
//! needs: connections accepted, requests answered, connections closed by its own policy (by
//! cause) and connections open now. [`LabOrigin::reset`] closes every connection and zeroes the
//! counters between lab modes.
//!
//! TLS origins use a [`LabCa`]: a throw-away CA made with rcgen at start, whose leaf covers
//! `localhost`, `127.0.0.1` and `::1`.
//!
//! Every response is `200 OK` with [`OriginProfile::body_bytes`] bytes of deterministic content
//! (byte `i` is `BODY_ALPHABET[i % 62]`, the ASCII digits, upper- then lower-case letters),
//! `content-length`, `content-type: application/octet-stream` and `x-lab-conn: <n>`, the
//! connection's accept index since start or the last reset (0-based), so a client can tell
//! which connection answered.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// How long after going idle a connection chosen by `rst_idle_fraction` is reset.
const RST_AFTER: Duration = Duration::from_millis(100);
/// How long [`LabOrigin::reset`] waits for connections to close gracefully before dropping them.
const RESET_GRACE: Duration = Duration::from_secs(2);
/// After a graceful close was started and no request is in flight, how long the peer gets to
/// finish the GOAWAY exchange before the connection is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Upper bound for a TLS handshake (after the injected delay).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an HTTP/2 stream that reached the limit waits for the GOAWAY to be queued.
const GOAWAY_ACK_WAIT: Duration = Duration::from_secs(1);
/// Size of the data frames a response body is handed to hyper in.
const BODY_CHUNK: usize = 16 * 1024;
/// The response body content, repeated: byte `i` is `BODY_ALPHABET[i % 62]`.
const BODY_ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Close causes in the order [`LabOrigin::closes`] reports them.
const CAUSES: [&str; 4] = ["idle", "max_requests", "goaway", "rst"];

/// How an origin behaves (one per lab target).
#[derive(Clone, Debug, PartialEq)]
pub struct OriginProfile {
    /// Serve TLS (with the LabCa's leaf for localhost/127.0.0.1).
    pub tls: bool,
    /// With tls: offer ALPN h2 and http/1.1 (HTTP/2 when the client picks it). Ignored without
    /// tls.
    pub h2: bool,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_concurrent_streams: u32,
    /// Close a connection idle this long (HTTP/1.1: FIN; HTTP/2: graceful GOAWAY then close).
    /// None: never.
    pub idle_timeout: Option<Duration>,
    /// HTTP/1.1: the Nth response carries `Connection: close` and the connection closes after
    /// it. HTTP/2: graceful GOAWAY once N streams were accepted. None: unlimited. (0 acts as 1.)
    pub max_requests: Option<u64>,
    /// HTTP/2: a graceful GOAWAY after every N streams (a load balancer recycling connections)
    /// — same mechanism as max_requests but named for h2 load balancers; if both set, the
    /// smaller wins (counted as "goaway" when it is goaway_every, ties included). HTTP/1.1:
    /// treated like max_requests (and counted as "max_requests"). (0 acts as 1.)
    pub goaway_every: Option<u64>,
    /// Fraction (0..=1) of connections that, when they next go idle after a response, are reset
    /// (RST: SO_LINGER 0 then close) 100 ms later instead of kept — decided per connection by a
    /// seeded RNG (deterministic for a seed and accept order; the order restarts at 0 on
    /// [`LabOrigin::reset`], so every lab mode sees the same sequence of decisions). A request
    /// arriving within the 100 ms postpones the reset to the next idle period.
    pub rst_idle_fraction: f64,
    /// Response body size in bytes (deterministic content; `content-length` set). Byte `i` is
    /// the `i % 62`th of `0-9A-Za-z`.
    pub body_bytes: usize,
    /// Injected after accept, before anything else: what a TCP connect costs on the internet.
    pub tcp_delay: Duration,
    /// Injected before the TLS handshake is answered (TLS targets only).
    pub tls_delay: Duration,
    /// Injected before every response head (server think time / time to first byte).
    pub ttfb_delay: Duration,
    /// Seed for rst_idle_fraction decisions.
    pub seed: u64,
}

impl Default for OriginProfile {
    fn default() -> Self {
        OriginProfile {
            tls: false,
            h2: false,
            max_concurrent_streams: 100,
            idle_timeout: None,
            max_requests: None,
            goaway_every: None,
            rst_idle_fraction: 0.0,
            body_bytes: 1024,
            tcp_delay: Duration::ZERO,
            tls_delay: Duration::ZERO,
            ttfb_delay: Duration::ZERO,
            seed: 1,
        }
    }
}

impl OriginProfile {
    /// The per-connection request limit and the close cause it is counted under, for the
    /// protocol a connection speaks.
    fn request_limit(&self, h2: bool) -> Option<(u64, &'static str)> {
        let goaway_cause = if h2 { "goaway" } else { "max_requests" };
        let limit = match (self.max_requests, self.goaway_every) {
            (None, None) => None,
            (Some(m), None) => Some((m, "max_requests")),
            (None, Some(g)) => Some((g, goaway_cause)),
            (Some(m), Some(g)) if g <= m => Some((g, goaway_cause)),
            (Some(m), Some(_)) => Some((m, "max_requests")),
        };
        limit.map(|(n, cause)| (n.max(1), cause))
    }

    /// Whether the connection with accept index `index` is reset when it next goes idle.
    fn rst_decision(&self, index: u64) -> bool {
        let fraction = self.rst_idle_fraction;
        if fraction.is_nan() || fraction <= 0.0 {
            return false;
        }
        if fraction >= 1.0 {
            return true;
        }
        // splitmix64: the index-th output of the stream seeded with `seed`.
        let mut z = self
            .seed
            .wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
        unit < fraction
    }
}

/// The domain of named lab targets (`<target>.lab.test`; `.test` is reserved by RFC 6761).
pub const LAB_DOMAIN: &str = "lab.test";

/// A throw-away CA for the lab (rcgen): one leaf for `localhost`, `127.0.0.1`, `::1` and
/// `*.lab.test`.
pub struct LabCa {
    /// The CA certificate, PEM.
    cert_pem: String,
    /// Server config offering ALPN h2 and http/1.1.
    config_h2: Arc<rustls::ServerConfig>,
    /// Server config offering ALPN http/1.1 only.
    config_h1: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for LabCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabCa").finish_non_exhaustive()
    }
}

impl LabCa {
    /// Creates a new CA (ECDSA P-256) and a leaf for `localhost`, `127.0.0.1` and `::1` signed
    /// by it, and builds the two server configs.
    pub fn new() -> Result<LabCa, String> {
        let ca_key = KeyPair::generate().map_err(|e| format!("lab CA key: {e}"))?;
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| format!("lab CA: {e}"))?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "edgepool lab CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(|e| format!("lab CA certificate: {e}"))?;

        let leaf_key = KeyPair::generate().map_err(|e| format!("lab leaf key: {e}"))?;
        let mut leaf_params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
            // Named targets (`edgepool lab --names dns|hosts`).
            format!("*.{LAB_DOMAIN}"),
        ])
        .map_err(|e| format!("lab leaf: {e}"))?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf_params.is_ca = IsCa::NoCa;
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &ca_cert, &ca_key)
            .map_err(|e| format!("lab leaf certificate: {e}"))?;

        let chain = vec![leaf_cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let build = |alpn: &[&[u8]]| -> Result<Arc<rustls::ServerConfig>, String> {
            let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("lab TLS config: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("lab TLS config: {e}"))?;
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        Ok(LabCa {
            cert_pem: ca_cert.pem(),
            config_h2: build(&[b"h2", b"http/1.1"])?,
            config_h1: build(&[b"http/1.1"])?,
        })
    }

    /// The CA certificate, PEM (workers and edgepool trust it).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A rustls server config with the leaf; ALPN ["h2","http/1.1"] when `h2`, else
    /// ["http/1.1"].
    pub fn server_config(&self, h2: bool) -> Arc<rustls::ServerConfig> {
        if h2 {
            self.config_h2.clone()
        } else {
            self.config_h1.clone()
        }
    }
}

/// Counters since start / the last reset, guarded by one lock so a reset is exact.
#[derive(Default)]
struct Counters {
    /// Bumped by every reset; connections and requests of an older epoch are not counted.
    epoch: u64,
    /// TCP connections accepted.
    accepted: u64,
    /// Requests answered.
    requests: u64,
    /// Policy closes, indexed like [`CAUSES`].
    closes: [u64; 4],
    /// Accept index of the next connection (the rst RNG's position).
    next_index: u64,
    /// A reset is closing connections: newly accepted ones are closed at once, uncounted.
    resetting: bool,
}

/// Commands to connection tasks (each field is a generation; a change is the command).
#[derive(Clone, Copy, Default)]
struct Control {
    /// Close gracefully (FIN / GOAWAY).
    close: u64,
    /// Drop the connection now.
    abort: u64,
}

/// State shared by the accept loop, the connection tasks and the [`LabOrigin`] handle.
struct Shared {
    profile: OriginProfile,
    /// The response body (all responses share it).
    body: Bytes,
    counters: Mutex<Counters>,
    /// Connections open now.
    open: AtomicU64,
    control: watch::Sender<Control>,
}

impl Shared {
    /// Applies `f` to the counters if `epoch` is still current.
    fn count(&self, epoch: u64, f: impl FnOnce(&mut Counters)) {
        let mut counters = self.counters.lock();
        if counters.epoch == epoch {
            f(&mut counters);
        }
    }

    /// Counts a policy close.
    fn count_close(&self, epoch: u64, cause: &'static str) {
        if let Some(i) = CAUSES.iter().position(|c| *c == cause) {
            self.count(epoch, |c| c.closes[i] += 1);
        }
    }
}

/// Decrements the open-connection count when a connection task ends (however it ends).
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a connection is doing, watched by its task to run the idle / rst timers.
#[derive(Clone, Copy)]
struct Activity {
    /// Requests between the service call and the end (or drop) of their response body.
    in_flight: u64,
    /// When in_flight last became 0 (or serving started).
    idle_since: Instant,
    /// Responses finished on this connection.
    responses: u64,
    /// The request limit was reached: the close cause it counts under.
    limit: Option<&'static str>,
    /// HTTP/2: the GOAWAY was queued (or the connection is gone).
    goaway_sent: bool,
    /// The connection task has ended.
    ended: bool,
}

/// One connection's state, shared by its task and its request handlers.
struct ConnCtx {
    /// Accept index since start / the last reset.
    index: u64,
    /// Counter epoch at accept.
    epoch: u64,
    activity: watch::Sender<Activity>,
    /// Requests (streams) accepted on this connection.
    streams: AtomicU64,
}

/// One request in flight: entered at the service call, left when the response body ends or
/// is dropped.
struct InFlight {
    ctx: Arc<ConnCtx>,
    responded: bool,
}

impl InFlight {
    fn enter(ctx: Arc<ConnCtx>) -> InFlight {
        ctx.activity.send_modify(|a| a.in_flight += 1);
        InFlight {
            ctx,
            responded: false,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let responded = self.responded;
        self.ctx.activity.send_modify(|a| {
            a.in_flight = a.in_flight.saturating_sub(1);
            if responded {
                a.responses += 1;
            }
            if a.in_flight == 0 {
                a.idle_since = Instant::now();
            }
        });
    }
}

/// A response body: the shared content in chunks; holds the request's [`InFlight`] until it
/// ends.
struct LabBody {
    data: Bytes,
    pos: usize,
    in_flight: Option<InFlight>,
}

impl Body for LabBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.pos >= this.data.len() {
            this.in_flight = None;
            return Poll::Ready(None);
        }
        let end = this.data.len().min(this.pos + BODY_CHUNK);
        let chunk = this.data.slice(this.pos..end);
        this.pos = end;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.data.len() - self.pos) as u64)
    }
}

/// A loopback origin server.
pub struct LabOrigin {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

impl std::fmt::Debug for LabOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabOrigin")
            .field("addr", &self.addr)
            .field("profile", &self.shared.profile)
            .finish_non_exhaustive()
    }
}

impl LabOrigin {
    /// Binds 127.0.0.1:0 and serves `profile` until dropped. `ca` is required when
    /// profile.tls.
    pub async fn start(profile: OriginProfile, ca: Option<&LabCa>) -> std::io::Result<LabOrigin> {
        let acceptor = if profile.tls {
            let ca = ca.ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a TLS lab origin needs a LabCa",
                )
            })?;
            Some(tokio_rustls::TlsAcceptor::from(
                ca.server_config(profile.h2),
            ))
        } else {
            None
        };
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let body = Bytes::from(
            (0..profile.body_bytes)
                .map(|i| BODY_ALPHABET[i % BODY_ALPHABET.len()])
                .collect::<Vec<u8>>(),
        );
        let (control, _) = watch::channel(Control::default());
        let shared = Arc::new(Shared {
            profile,
            body,
            counters: Mutex::new(Counters::default()),
            open: AtomicU64::new(0),
            control,
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone(), acceptor));
        Ok(LabOrigin {
            addr,
            shared,
            accept_task,
        })
    }

    /// The bound address (127.0.0.1 and the chosen port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The profile this origin serves.
    pub fn profile(&self) -> &OriginProfile {
        &self.shared.profile
    }

    /// `localhost:PORT` for TLS origins (the certificate name), `127.0.0.1:PORT` otherwise.
    pub fn authority(&self) -> String {
        if self.shared.profile.tls {
            format!("localhost:{}", self.addr.port())
        } else {
            format!("127.0.0.1:{}", self.addr.port())
        }
    }

    /// `https://localhost:PORT/` or `http://127.0.0.1:PORT/`.
    pub fn base_url(&self) -> String {
        let scheme = if self.shared.profile.tls {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/", self.authority())
    }

    /// TCP connections accepted since start / the last reset.
    pub fn accepted(&self) -> u64 {
        self.shared.counters.lock().accepted
    }

    /// Requests answered (response head sent) since start / the last reset. A request counts
    /// when its response head is handed to hyper, after the ttfb delay.
    pub fn requests(&self) -> u64 {
        self.shared.counters.lock().requests
    }

    /// Connections closed by the origin's own policy since the last reset, by cause: ("idle",
    /// n), ("max_requests", n), ("goaway", n), ("rst", n). Closes made by [`LabOrigin::reset`]
    /// and closes initiated by clients are not counted.
    pub fn closes(&self) -> Vec<(&'static str, u64)> {
        let counters = self.shared.counters.lock();
        CAUSES
            .iter()
            .zip(counters.closes.iter())
            .map(|(cause, n)| (*cause, *n))
            .collect()
    }

    /// Zeroes the counters (between lab modes). Closes every open connection first (FIN /
    /// GOAWAY) so a mode never inherits the previous mode's connections, and waits (≤ 2 s)
    /// until they are gone; connections still open then are dropped. Connections accepted
    /// while a reset runs are closed at once and not counted. The rst decision sequence
    /// restarts at accept index 0.
    ///
    /// Returns whether every connection closed gracefully within the grace period (false:
    /// some had to be dropped).
    pub async fn reset(&self) -> bool {
        /// Clears `resetting` even if the reset future is dropped half-way.
        struct Resetting<'a>(&'a Shared);
        impl Drop for Resetting<'_> {
            fn drop(&mut self) {
                self.0.counters.lock().resetting = false;
            }
        }

        let shared = &self.shared;
        let _resetting = {
            let mut counters = shared.counters.lock();
            counters.resetting = true;
            shared.control.send_modify(|c| c.close += 1);
            Resetting(shared)
        };
        let graceful = wait_closed(shared, RESET_GRACE).await;
        if !graceful {
            shared.control.send_modify(|c| c.abort += 1);
            wait_closed(shared, Duration::from_millis(500)).await;
        }
        let mut counters = shared.counters.lock();
        *counters = Counters {
            epoch: counters.epoch.wrapping_add(1),
            ..Counters::default()
        };
        graceful
    }

    /// Connections open now.
    pub fn open_connections(&self) -> u64 {
        self.shared.open.load(Ordering::SeqCst)
    }
}

impl Drop for LabOrigin {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.shared.control.send_modify(|c| c.abort += 1);
    }
}

/// Waits until no connection is open, at most `limit`; true when none is.
async fn wait_closed(shared: &Shared, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if shared.open.load(Ordering::SeqCst) == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(5)).await;
    }
}

/// Accepts connections and spawns one task per connection (before any delay). Connection
/// tasks live in a [`JoinSet`] owned here, so aborting this task ends them all.
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _peer)) => tcp,
                    Err(e) => {
                        tracing::debug!(error = %e, "lab origin: accept failed");
                        // Out of descriptors and the like: back off instead of spinning.
                        sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let registered = {
                    let mut counters = shared.counters.lock();
                    if counters.resetting {
                        None
                    } else {
                        counters.accepted += 1;
                        let index = counters.next_index;
                        counters.next_index += 1;
                        // Subscribed under the lock: a reset cannot slip in between.
                        Some((index, counters.epoch, shared.control.subscribe()))
                    }
                };
                let Some((index, epoch, control)) = registered else {
                    drop(tcp);
                    continue;
                };
                shared.open.fetch_add(1, Ordering::SeqCst);
                let guard = OpenGuard(shared.clone());
                let (activity, _) = watch::channel(Activity {
                    in_flight: 0,
                    idle_since: Instant::now(),
                    responses: 0,
                    limit: None,
                    goaway_sent: false,
                    ended: false,
                });
                let ctx = Arc::new(ConnCtx {
                    index,
                    epoch,
                    activity,
                    streams: AtomicU64::new(0),
                });
                tasks.spawn(conn_task(
                    guard,
                    shared.clone(),
                    ctx,
                    tcp,
                    acceptor.clone(),
                    control,
                ));
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// One connection from accept to close.
async fn conn_task(
    guard: OpenGuard,
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    tcp: TcpStream,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    control: watch::Receiver<Control>,
) {
    let start = *control.borrow();
    let mut abort_rx = control.clone();
    tokio::select! {
        _ = abort_rx.wait_for(|c| c.abort != start.abort) => {}
        _ = serve_conn(&shared, &ctx, tcp, acceptor, control) => {}
    }
    // Wake any stream still waiting for a GOAWAY: the connection is gone.
    ctx.activity.send_modify(|a| {
        a.goaway_sent = true;
        a.ended = true;
    });
    drop(guard);
}

/// How [`drive`] ended.
enum Outcome {
    /// The connection closed; the policy cause if the origin closed it on purpose.
    Closed(Option<&'static str>),
    /// The rst timer fired: reset the connection.
    Rst,
}

/// Which timer [`drive`] waits for.
#[derive(Clone, Copy)]
enum Timer {
    Idle,
    Rst,
    Force,
}

/// Delays, TLS, protocol choice, then serves the connection; counts its policy close.
async fn serve_conn(
    shared: &Arc<Shared>,
    ctx: &Arc<ConnCtx>,
    tcp: TcpStream,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    control: watch::Receiver<Control>,
) {
    let profile = &shared.profile;
    let rst_marked = profile.rst_decision(ctx.index);
    // A second descriptor for the socket, to set SO_LINGER 0 once hyper owns the stream.
    let rst_socket = if rst_marked {
        socket2::SockRef::from(&tcp).try_clone().ok()
    } else {
        None
    };

    let mut close_rx = control.clone();
    let setup = async {
        if !profile.tcp_delay.is_zero() {
            sleep(profile.tcp_delay).await;
        }
        match acceptor {
            None => Some(Io::Plain(tcp)),
            Some(acceptor) => {
                if !profile.tls_delay.is_zero() {
                    sleep(profile.tls_delay).await;
                }
                match timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                        Some(Io::Tls(Box::new(tls), h2))
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "lab origin: TLS handshake failed");
                        None
                    }
                    Err(_) => None,
                }
            }
        }
    };
    let io = tokio::select! {
        io = setup => io,
        // Any command (close or abort) ends a connection still in its delays.
        _ = close_rx.changed() => None,
    };
    let Some(io) = io else { return };

    ctx.activity.send_modify(|a| a.idle_since = Instant::now());
    let outcome = match io {
        Io::Plain(tcp) => serve_http1(shared, ctx, tcp, rst_marked, control).await,
        Io::Tls(tls, false) => serve_http1(shared, ctx, tls, rst_marked, control).await,
        Io::Tls(tls, true) => serve_http2(shared, ctx, tls, rst_marked, control).await,
    };
    // hyper's connection (and with it the first descriptor) is dropped by now.
    match outcome {
        Outcome::Closed(Some(cause)) => shared.count_close(ctx.epoch, cause),
        Outcome::Closed(None) => {}
        Outcome::Rst => {
            if let Some(socket) = rst_socket {
                if let Err(e) = socket.set_linger(Some(Duration::ZERO)) {
                    tracing::debug!(error = %e, "lab origin: SO_LINGER 0 failed");
                }
                drop(socket);
            }
            shared.count_close(ctx.epoch, "rst");
        }
    }
}

/// The connection after the handshakes.
enum Io {
    Plain(TcpStream),
    /// The TLS stream and whether ALPN chose h2.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, bool),
}

/// Serves HTTP/1.1 with keep-alive.
async fn serve_http1<I>(
    shared: &Arc<Shared>,
    ctx: &Arc<ConnCtx>,
    io: I,
    rst_marked: bool,
    control: watch::Receiver<Control>,
) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let shared = shared.clone();
        let ctx = ctx.clone();
        service_fn(move |req| handle(&shared, &ctx, false, req))
    };
    let mut builder = http1::Builder::new();
    builder.keep_alive(true).header_read_timeout(None);
    let conn = pin!(builder.serve_connection(TokioIo::new(io), service));
    drive(
        conn,
        |c| c.graceful_shutdown(),
        shared,
        ctx,
        false,
        rst_marked,
        control,
    )
    .await
}

/// Serves HTTP/2.
async fn serve_http2<I>(
    shared: &Arc<Shared>,
    ctx: &Arc<ConnCtx>,
    io: I,
    rst_marked: bool,
    control: watch::Receiver<Control>,
) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let shared = shared.clone();
        let ctx = ctx.clone();
        service_fn(move |req| handle(&shared, &ctx, true, req))
    };
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder.max_concurrent_streams(shared.profile.max_concurrent_streams);
    let conn = pin!(builder.serve_connection(TokioIo::new(io), service));
    drive(
        conn,
        |c| c.graceful_shutdown(),
        shared,
        ctx,
        true,
        rst_marked,
        control,
    )
    .await
}

/// Polls a hyper connection to its end while running the origin's policies: request limit
/// (HTTP/2 GOAWAY), idle close, idle reset and the reset-close command (any change of
/// `close_rx` since it was subscribed at accept).
async fn drive<C, F>(
    mut conn: Pin<&mut C>,
    shutdown: F,
    shared: &Shared,
    ctx: &ConnCtx,
    h2: bool,
    rst_marked: bool,
    mut close_rx: watch::Receiver<Control>,
) -> Outcome
where
    C: Future<Output = Result<(), hyper::Error>>,
    F: Fn(Pin<&mut C>),
{
    let profile = &shared.profile;
    let mut act_rx = ctx.activity.subscribe();
    // The cause of a close this loop started (idle, or the HTTP/2 limit).
    let mut initiated: Option<&'static str> = None;
    let mut shutdown_at: Option<Instant> = None;
    let mut closing_for_reset = close_rx.has_changed().unwrap_or(true);
    if closing_for_reset {
        shutdown(conn.as_mut());
        shutdown_at = Some(Instant::now());
    }
    loop {
        let act = *act_rx.borrow_and_update();
        if h2 && shutdown_at.is_none() {
            if let Some(cause) = act.limit {
                shutdown(conn.as_mut());
                shutdown_at = Some(Instant::now());
                initiated = Some(cause);
            }
        }
        if h2 && shutdown_at.is_some() && !act.goaway_sent {
            // Lets the stream that reached the limit answer now: the GOAWAY goes out first.
            ctx.activity.send_modify(|a| a.goaway_sent = true);
            continue;
        }

        let timer: Option<(Instant, Timer)> = if let Some(at) = shutdown_at {
            (act.in_flight == 0).then(|| (at.max(act.idle_since) + CLOSE_GRACE, Timer::Force))
        } else if act.in_flight == 0 && act.limit.is_none() {
            let idle = profile
                .idle_timeout
                .map(|t| (act.idle_since + t, Timer::Idle));
            let rst =
                (rst_marked && act.responses > 0).then(|| (act.idle_since + RST_AFTER, Timer::Rst));
            match (idle, rst) {
                (Some(i), Some(r)) => Some(if r.0 < i.0 { r } else { i }),
                (i, r) => i.or(r),
            }
        } else {
            None
        };
        let timer_fired = async {
            match timer {
                Some((at, kind)) => {
                    sleep_until(at).await;
                    kind
                }
                None => std::future::pending().await,
            }
        };

        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "lab origin: connection error");
                }
                if closing_for_reset {
                    return Outcome::Closed(None);
                }
                let limit = act_rx.borrow().limit;
                return Outcome::Closed(initiated.or(limit));
            }
            changed = act_rx.changed() => {
                if changed.is_err() {
                    // Cannot happen (ctx holds the sender); end rather than spin.
                    return Outcome::Closed(None);
                }
            }
            changed = close_rx.changed(), if !closing_for_reset => {
                closing_for_reset = true;
                if changed.is_ok() && shutdown_at.is_none() {
                    shutdown(conn.as_mut());
                    shutdown_at = Some(Instant::now());
                }
                if changed.is_err() {
                    return Outcome::Closed(None);
                }
            }
            kind = timer_fired => match kind {
                Timer::Idle => {
                    shutdown(conn.as_mut());
                    shutdown_at = Some(Instant::now());
                    initiated = Some("idle");
                }
                Timer::Rst => return Outcome::Rst,
                Timer::Force => {
                    return Outcome::Closed(if closing_for_reset { None } else { initiated });
                }
            },
        }
    }
}

/// The request handler. Runs its bookkeeping synchronously at the service call (in-flight,
/// the per-connection request limit), then drains the request body, waits the ttfb delay and
/// answers.
fn handle(
    shared: &Arc<Shared>,
    ctx: &Arc<ConnCtx>,
    h2: bool,
    req: Request<Incoming>,
) -> impl Future<Output = Result<Response<LabBody>, Infallible>> + Send + 'static {
    let mut in_flight = InFlight::enter(ctx.clone());
    let n = ctx.streams.fetch_add(1, Ordering::SeqCst) + 1;
    let mut close_after = false;
    let mut await_goaway = false;
    if let Some((limit, cause)) = shared.profile.request_limit(h2) {
        if n >= limit {
            ctx.activity.send_if_modified(|a| {
                let first = a.limit.is_none();
                if first {
                    a.limit = Some(cause);
                }
                first
            });
            close_after = !h2;
            await_goaway = h2;
        }
    }
    let shared = shared.clone();
    let ctx = ctx.clone();
    async move {
        if await_goaway {
            let mut rx = ctx.activity.subscribe();
            let _ = timeout(GOAWAY_ACK_WAIT, rx.wait_for(|a| a.goaway_sent)).await;
        }
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
        let ttfb = shared.profile.ttfb_delay;
        if !ttfb.is_zero() {
            sleep(ttfb).await;
        }
        let len = shared.body.len();
        in_flight.responded = true;
        let mut resp = Response::new(LabBody {
            data: shared.body.clone(),
            pos: 0,
            in_flight: Some(in_flight),
        });
        let headers = resp.headers_mut();
        headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert("x-lab-conn", HeaderValue::from(ctx.index));
        if close_after {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if !ctx.activity.borrow().ended {
            shared.count(ctx.epoch, |c| c.requests += 1);
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(ca: Option<&LabCa>) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .http2_adaptive_window(false);
        if let Some(ca) = ca {
            let cert = reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).expect("CA pem");
            builder = builder.add_root_certificate(cert);
        }
        builder.build().expect("client")
    }

    async fn get(client: &reqwest::Client, url: &str) -> reqwest::Response {
        client.get(url).send().await.expect("request")
    }

    async fn get_body(client: &reqwest::Client, url: &str) -> Bytes {
        get(client, url).await.bytes().await.expect("body")
    }

    fn close_count(origin: &LabOrigin, cause: &str) -> u64 {
        origin
            .closes()
            .into_iter()
            .find(|(c, _)| *c == cause)
            .map(|(_, n)| n)
            .expect("cause")
    }

    /// Waits (≤ 2 s) for `cond`.
    async fn eventually(cond: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            sleep(Duration::from_millis(5)).await;
        }
        cond()
    }

    #[tokio::test]
    async fn http1_keep_alive_reuses_one_connection() {
        let origin = LabOrigin::start(OriginProfile::default(), None)
            .await
            .expect("start");
        let c = client(None);
        for _ in 0..5 {
            let resp = get(&c, &origin.base_url()).await;
            assert_eq!(resp.version(), reqwest::Version::HTTP_11);
            resp.bytes().await.expect("body");
        }
        assert_eq!(origin.accepted(), 1);
        assert_eq!(origin.requests(), 5);
        assert_eq!(origin.open_connections(), 1);
        assert!(origin.closes().iter().all(|(_, n)| *n == 0));
    }

    #[tokio::test]
    async fn http1_max_requests_closes_after_nth_response() {
        let profile = OriginProfile {
            max_requests: Some(3),
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, None).await.expect("start");
        let c = client(None);
        for i in 0..7 {
            let resp = get(&c, &origin.base_url()).await;
            let close = resp
                .headers()
                .get(CONNECTION)
                .map(|v| v.as_bytes() == b"close")
                .unwrap_or(false);
            assert_eq!(close, i % 3 == 2, "response {i}");
            resp.bytes().await.expect("body");
        }
        assert_eq!(origin.accepted(), 3);
        assert_eq!(origin.requests(), 7);
        assert!(eventually(|| close_count(&origin, "max_requests") == 2).await);
        assert_eq!(origin.open_connections(), 1);
    }

    #[tokio::test]
    async fn goaway_every_on_http1_acts_like_max_requests() {
        let profile = OriginProfile {
            max_requests: Some(5),
            goaway_every: Some(2),
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, None).await.expect("start");
        let c = client(None);
        for _ in 0..4 {
            get_body(&c, &origin.base_url()).await;
        }
        assert_eq!(origin.accepted(), 2);
        assert!(eventually(|| close_count(&origin, "max_requests") == 2).await);
        assert_eq!(close_count(&origin, "goaway"), 0);
    }

    #[tokio::test]
    async fn http1_idle_timeout_closes_idle_connection() {
        let profile = OriginProfile {
            idle_timeout: Some(Duration::from_millis(200)),
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, None).await.expect("start");
        let c = client(None);
        get_body(&c, &origin.base_url()).await;
        // Wait for the close itself (≤ 2 s) instead of sleeping a fixed 2 × the timeout, which a
        // loaded runner could outlast before the origin's timer task ran.
        assert!(eventually(|| close_count(&origin, "idle") == 1).await);
        assert!(eventually(|| origin.open_connections() == 0).await);
        get_body(&c, &origin.base_url()).await;
        assert_eq!(origin.accepted(), 2);
        assert_eq!(origin.requests(), 2);
        assert_eq!(close_count(&origin, "idle"), 1);
    }

    #[tokio::test]
    async fn idle_timer_restarts_on_every_request() {
        // 5 gaps of 300 ms (1.5 s in all) under a 1 s idle timeout: the connection survives
        // only if every request restarts the timer. Each gap has 700 ms of slack for a loaded
        // runner.
        let profile = OriginProfile {
            idle_timeout: Some(Duration::from_millis(1000)),
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, None).await.expect("start");
        let c = client(None);
        for _ in 0..5 {
            get_body(&c, &origin.base_url()).await;
            sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(origin.accepted(), 1);
        assert_eq!(close_count(&origin, "idle"), 0);
    }

    #[tokio::test]
    async fn tls_h2_serves_concurrent_streams() {
        let ca = LabCa::new().expect("ca");
        let profile = OriginProfile {
            tls: true,
            h2: true,
            max_concurrent_streams: 2,
            ttfb_delay: Duration::from_millis(50),
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, Some(&ca)).await.expect("start");
        assert!(origin.base_url().starts_with("https://localhost:"));
        let c = client(Some(&ca));
        let url = origin.base_url();
        let mut joins = Vec::new();
        for _ in 0..4 {
            let c = c.clone();
            let url = url.clone();
            joins.push(tokio::spawn(async move {
                let resp = c.get(&url).send().await.expect("request");
                let version = resp.version();
                let body = resp.bytes().await.expect("body");
                (version, body.len())
            }));
        }
        for join in joins {
            let (version, len) = join.await.expect("join");
            assert_eq!(version, reqwest::Version::HTTP_2);
            assert_eq!(len, 1024);
        }
        assert_eq!(origin.requests(), 4);
        assert!(origin.accepted() >= 1);
    }

    #[tokio::test]
    async fn tls_without_h2_speaks_http1() {
        let ca = LabCa::new().expect("ca");
        let profile = OriginProfile {
            tls: true,
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, Some(&ca)).await.expect("start");
        let c = client(Some(&ca));
        for _ in 0..3 {
            let resp = get(&c, &origin.base_url()).await;
            assert_eq!(resp.version(), reqwest::Version::HTTP_11);
            resp.bytes().await.expect("body");
        }
        assert_eq!(origin.accepted(), 1);
        assert_eq!(origin.requests(), 3);
    }

    #[tokio::test]
    async fn tls_origin_needs_a_ca() {
        let profile = OriginProfile {
            tls: true,
            ..OriginProfile::default()
        };
        assert!(LabOrigin::start(profile, None).await.is_err());
    }

    #[tokio::test]
    async fn h2_goaway_every_recycles_connections() {
        let ca = LabCa::new().expect("ca");
        let profile = OriginProfile {
            tls: true,
            h2: true,
            goaway_every: Some(2),
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, Some(&ca)).await.expect("start");
        let c = client(Some(&ca));
        for _ in 0..6 {
            let resp = get(&c, &origin.base_url()).await;
            assert_eq!(resp.version(), reqwest::Version::HTTP_2);
            resp.bytes().await.expect("body");
        }
        assert!(origin.accepted() >= 3, "accepted {}", origin.accepted());
        assert_eq!(origin.requests(), 6);
        assert!(eventually(|| close_count(&origin, "goaway") >= 2).await);
        assert_eq!(close_count(&origin, "max_requests"), 0);
    }

    #[tokio::test]
    async fn h2_idle_timeout_sends_goaway() {
        let ca = LabCa::new().expect("ca");
        let profile = OriginProfile {
            tls: true,
            h2: true,
            idle_timeout: Some(Duration::from_millis(200)),
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, Some(&ca)).await.expect("start");
        let c = client(Some(&ca));
        get_body(&c, &origin.base_url()).await;
        assert!(eventually(|| close_count(&origin, "idle") == 1).await);
        assert!(eventually(|| origin.open_connections() == 0).await);
        let resp = get(&c, &origin.base_url()).await;
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        resp.bytes().await.expect("body");
        assert_eq!(origin.accepted(), 2);
    }

    #[tokio::test]
    #[allow(clippy::disallowed_methods)] // measures real wall time (the runtime is not paused)
    async fn injected_delays_are_paid_once_per_connection() {
        let ca = LabCa::new().expect("ca");
        // Lower bounds are exact (the delays are sleeps). The upper bound only has to tell
        // "paid the connection's 600 ms again" from "did not": the warm request's own work has
        // 570 ms of room, which a loaded 2-core runner does not eat.
        let profile = OriginProfile {
            tls: true,
            tcp_delay: Duration::from_millis(300),
            tls_delay: Duration::from_millis(300),
            ttfb_delay: Duration::from_millis(30),
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, Some(&ca)).await.expect("start");
        let c = client(Some(&ca));
        let t0 = std::time::Instant::now();
        get_body(&c, &origin.base_url()).await;
        let first = t0.elapsed();
        let t1 = std::time::Instant::now();
        get_body(&c, &origin.base_url()).await;
        let second = t1.elapsed();
        assert!(first >= Duration::from_millis(630), "first {first:?}");
        assert!(second >= Duration::from_millis(30), "second {second:?}");
        assert!(second < Duration::from_millis(600), "second {second:?}");
        assert_eq!(origin.accepted(), 1);
    }

    #[tokio::test]
    #[allow(clippy::disallowed_methods)] // measures real wall time (the runtime is not paused)
    async fn accept_loop_is_not_slowed_by_delays() {
        // 8 connections × 1 s: an accept loop that waited out each delay would take ≥ 8 s; a
        // concurrent one takes ~1 s. The 4 s bound leaves 3 s of scheduling slack.
        let profile = OriginProfile {
            tcp_delay: Duration::from_millis(1000),
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, None).await.expect("start");
        let url = origin.base_url();
        let t0 = std::time::Instant::now();
        let mut joins = Vec::new();
        for _ in 0..8 {
            let c = client(None);
            let url = url.clone();
            joins.push(tokio::spawn(async move {
                c.get(&url).send().await.expect("request");
            }));
        }
        for join in joins {
            join.await.expect("join");
        }
        assert!(
            t0.elapsed() < Duration::from_millis(4000),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(origin.accepted(), 8);
    }

    #[tokio::test]
    async fn rst_idle_fraction_one_resets_idle_connections() {
        let profile = OriginProfile {
            rst_idle_fraction: 1.0,
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, None).await.expect("start");
        let c = client(None);
        get_body(&c, &origin.base_url()).await;
        // RST_AFTER (100 ms) idle, then the reset: waited for (≤ 2 s), not slept for.
        assert!(eventually(|| close_count(&origin, "rst") == 1).await);
        assert!(eventually(|| origin.open_connections() == 0).await);
        get_body(&c, &origin.base_url()).await;
        assert_eq!(origin.accepted(), 2);
        assert_eq!(origin.requests(), 2);
    }

    #[tokio::test]
    async fn rst_sends_a_reset() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let profile = OriginProfile {
            rst_idle_fraction: 1.0,
            body_bytes: 3,
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, None).await.expect("start");
        let mut tcp = TcpStream::connect(origin.addr()).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.ends_with(b"012") {
            let n = tcp.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed early");
            got.extend_from_slice(&buf[..n]);
        }
        let err = timeout(Duration::from_secs(2), tcp.read(&mut buf))
            .await
            .expect("reset within 2 s")
            .expect_err("a reset, not a FIN");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn rst_decisions_are_seeded() {
        let profile = OriginProfile {
            rst_idle_fraction: 0.5,
            seed: 7,
            ..OriginProfile::default()
        };
        let a: Vec<bool> = (0..1000).map(|i| profile.rst_decision(i)).collect();
        let b: Vec<bool> = (0..1000).map(|i| profile.rst_decision(i)).collect();
        assert_eq!(a, b);
        let hits = a.iter().filter(|x| **x).count();
        assert!((400..600).contains(&hits), "{hits}");
        let other = OriginProfile { seed: 8, ..profile };
        let c: Vec<bool> = (0..1000).map(|i| other.rst_decision(i)).collect();
        assert_ne!(a, c);
        let never = OriginProfile::default();
        assert!((0..1000).all(|i| !never.rst_decision(i)));
    }

    #[tokio::test]
    async fn reset_closes_connections_and_zeroes_counters() {
        let profile = OriginProfile {
            max_requests: Some(2),
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, None).await.expect("start");
        let c = client(None);
        for _ in 0..3 {
            get_body(&c, &origin.base_url()).await;
        }
        assert_eq!(origin.open_connections(), 1);
        assert!(eventually(|| close_count(&origin, "max_requests") == 1).await);
        origin.reset().await;
        assert_eq!(origin.open_connections(), 0);
        assert_eq!(origin.accepted(), 0);
        assert_eq!(origin.requests(), 0);
        assert!(origin.closes().iter().all(|(_, n)| *n == 0));
        // The next mode starts on a fresh connection, with accept index 0 again.
        let resp = get(&c, &origin.base_url()).await;
        assert_eq!(
            resp.headers().get("x-lab-conn").map(|v| v.as_bytes()),
            Some(b"0".as_slice())
        );
        resp.bytes().await.expect("body");
        assert_eq!(origin.accepted(), 1);
        assert_eq!(origin.requests(), 1);
    }

    #[tokio::test]
    async fn reset_closes_h2_connections() {
        let ca = LabCa::new().expect("ca");
        let profile = OriginProfile {
            tls: true,
            h2: true,
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, Some(&ca)).await.expect("start");
        let c = client(Some(&ca));
        get_body(&c, &origin.base_url()).await;
        assert_eq!(origin.open_connections(), 1);
        assert!(
            origin.reset().await,
            "the h2 connection did not close gracefully (GOAWAY) within the reset's grace"
        );
        assert_eq!(origin.open_connections(), 0);
        assert_eq!(origin.accepted(), 0);
        get_body(&c, &origin.base_url()).await;
        assert_eq!(origin.accepted(), 1);
        assert_eq!(origin.requests(), 1);
    }

    #[tokio::test]
    async fn reset_drops_connections_stuck_in_a_delay() {
        let profile = OriginProfile {
            ttfb_delay: Duration::from_secs(30),
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, None).await.expect("start");
        let c = client(None);
        let url = origin.base_url();
        let pending = tokio::spawn(async move { c.get(&url).send().await.is_err() });
        assert!(eventually(|| origin.open_connections() == 1).await);
        sleep(Duration::from_millis(50)).await;
        assert!(
            !origin.reset().await,
            "a connection stuck in a 30 s delay cannot close gracefully: it had to be dropped"
        );
        assert_eq!(origin.open_connections(), 0);
        assert_eq!(origin.requests(), 0);
        assert!(pending.await.expect("join"));
    }

    #[tokio::test]
    async fn body_size_and_content_are_deterministic() {
        let profile = OriginProfile {
            body_bytes: 100_000,
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, None).await.expect("start");
        let c = client(None);
        let resp = get(&c, &origin.base_url()).await;
        assert_eq!(resp.content_length(), Some(100_000));
        let body = resp.bytes().await.expect("body");
        assert_eq!(body.len(), 100_000);
        assert!(body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == BODY_ALPHABET[i % 62]));
        assert_eq!(&body[..12], b"0123456789AB");

        let empty = LabOrigin::start(
            OriginProfile {
                body_bytes: 0,
                ..OriginProfile::default()
            },
            None,
        )
        .await
        .expect("start");
        let resp = get(&c, &empty.base_url()).await;
        assert_eq!(resp.content_length(), Some(0));
        assert!(resp.bytes().await.expect("body").is_empty());
        assert_eq!(empty.requests(), 1);
    }

    #[tokio::test]
    async fn client_disconnecting_mid_delay_is_harmless() {
        let ca = LabCa::new().expect("ca");
        let profile = OriginProfile {
            tls: true,
            tcp_delay: Duration::from_millis(100),
            ..OriginProfile::default()
        };
        let origin = LabOrigin::start(profile, Some(&ca)).await.expect("start");
        let tcp = TcpStream::connect(origin.addr()).await.expect("connect");
        assert!(eventually(|| origin.open_connections() == 1).await);
        drop(tcp);
        assert!(eventually(|| origin.open_connections() == 0).await);
        assert_eq!(origin.accepted(), 1);
        // Still serving.
        get_body(&client(Some(&ca)), &origin.base_url()).await;
        assert_eq!(origin.requests(), 1);
    }

    #[tokio::test]
    async fn drop_stops_everything() {
        let origin = LabOrigin::start(OriginProfile::default(), None)
            .await
            .expect("start");
        let addr = origin.addr();
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        assert!(eventually(|| origin.open_connections() == 1).await);
        drop(origin);
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 16];
        let n = timeout(Duration::from_secs(2), tcp.read(&mut buf))
            .await
            .expect("closed within 2 s")
            .unwrap_or(0);
        assert_eq!(n, 0);
        sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
