//! dial: opens upstream connections to checked addresses — TCP (`TCP_NODELAY`), rustls (webpki roots
//! plus extra CAs, session resumption, ALPN h2/http1.1) and the HTTP/1.1 or HTTP/2
//! handshake — timing every phase, and watches each connection for the pool.
//!
//! Every connection's bytes pass through [`WatchedIo`], which counts them, remembers how the
//! read side ended (EOF, reset) and, for HTTP/2, reads frame headers so the pool learns the
//! server's `SETTINGS_MAX_CONCURRENT_STREAMS` the moment it arrives and sees GOAWAY at once.
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::exitproto::HandshakeError;
use crate::exits::authority;
use crate::exits::{ExitKey, ExitKind, ExitNode, NodeOutcome};
use crate::pool::{BoxFuture, ConnWatch, Connected, Connector, EndCause, PoolConn};

/// `http` or `https` target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// `"http"` / `"https"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
    /// 80 / 443.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// Everything that makes two upstream connections interchangeable. Two requests may share a
/// connection only if every field is equal:
/// - `scheme`, `host`, `port`: the origin (host is also the TLS SNI and what the certificate
///   is verified against);
/// - `addr`: the resolved address actually connected to (a new DNS answer is a new key);
/// - `exit`: the egress node and isolation scope ([`ExitKey`]: a worker session or a
///   provider session never shares a connection with another);
/// - `verify`: whether the certificate was verified (an insecure connection never serves a
///   request that asked for verification).
///
/// The key's hash is computed once, by [`UpstreamKey::new`], with a keyed hash (SipHash under
/// a per-process random key, so target names from a crawl cannot be chosen to collide): a
/// request looks its key up several times (the warm check, checkout, return), and hashing the
/// fields each time cost about 700 instructions a lookup. Build keys with `new` (or
/// [`with_addr`](Self::with_addr)); never assign a field, the hash would go stale (debug
/// builds check).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UpstreamKey {
    /// Target scheme.
    pub scheme: Scheme,
    /// Target host, lower-case, without brackets for IPv6.
    pub host: Arc<str>,
    /// Target port.
    pub port: u16,
    /// The checked address connected to.
    pub addr: SocketAddr,
    /// Exit node and isolation scope.
    pub exit: ExitKey,
    /// Certificate verification on.
    pub verify: bool,
    /// The fields' keyed hash (last: the derived order and equality look at it only when
    /// every field is equal, when it is too).
    hash: u64,
}

impl std::hash::Hash for UpstreamKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        debug_assert_eq!(
            self.hash,
            Self::hash_fields(
                self.scheme,
                &self.host,
                self.port,
                self.addr,
                &self.exit,
                self.verify
            ),
            "an UpstreamKey field was assigned after construction"
        );
        h.write_u64(self.hash);
    }
}

impl UpstreamKey {
    /// A key; its hash is computed here, once.
    pub fn new(
        scheme: Scheme,
        host: Arc<str>,
        port: u16,
        addr: SocketAddr,
        exit: ExitKey,
        verify: bool,
    ) -> UpstreamKey {
        let hash = Self::hash_fields(scheme, &host, port, addr, &exit, verify);
        UpstreamKey {
            scheme,
            host,
            port,
            addr,
            exit,
            verify,
            hash,
        }
    }

    /// The same key with another address.
    pub fn with_addr(&self, addr: SocketAddr) -> UpstreamKey {
        UpstreamKey::new(
            self.scheme,
            self.host.clone(),
            self.port,
            addr,
            self.exit.clone(),
            self.verify,
        )
    }

    fn hash_fields(
        scheme: Scheme,
        host: &str,
        port: u16,
        addr: SocketAddr,
        exit: &ExitKey,
        verify: bool,
    ) -> u64 {
        use std::hash::BuildHasher;
        static KEYED: std::sync::LazyLock<std::hash::RandomState> =
            std::sync::LazyLock::new(std::hash::RandomState::new);
        KEYED.hash_one((scheme, host, port, addr, exit, verify))
    }

    /// `host:port` (IPv6 in brackets): the per-target label for status and metrics. For
    /// [`via_proxy`](Self::via_proxy) keys, `via <exit>`.
    pub fn target(&self) -> String {
        if self.via_proxy() {
            format!("via {}", self.exit.node.label)
        } else {
            authority(&self.host, self.port)
        }
    }

    /// A connection to an HTTP proxy that carries plain-http requests for any target in
    /// absolute form (`GET http://host/path`): one proxy connection serves many targets, so
    /// the key has no target (empty host, port 0).
    pub fn via_proxy(&self) -> bool {
        self.scheme == Scheme::Http && self.exit.node.spec.kind == ExitKind::Http
    }

    /// The key of the proxy connection that carries plain-http requests through `exit`.
    pub fn http_via(exit: ExitKey) -> UpstreamKey {
        UpstreamKey::new(
            Scheme::Http,
            Arc::from(""),
            0,
            SocketAddr::from(([0, 0, 0, 0], 0)),
            exit,
            true,
        )
    }
}

/// Why a dial failed. Each variant maps to one worker-facing error.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect failed (refused, unreachable, ...).
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: io::Error,
    },
    /// TCP connect did not finish in time.
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout {
        /// Address.
        addr: SocketAddr,
        /// The timeout.
        after: Duration,
    },
    /// TLS handshake failed (including certificate verification).
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        /// SNI host.
        host: String,
        /// Why: a bad server name, rustls' refusal, or the connection.
        source: TlsFailure,
    },
    /// TLS handshake did not finish in time.
    #[error("TLS handshake with {host} timed out after {after:?}")]
    TlsTimeout {
        /// SNI host.
        host: String,
        /// The timeout.
        after: Duration,
    },
    /// The local ephemeral ports stayed nearly exhausted for the whole wait.
    #[error("{0}; the dial was held for {1:?}")]
    PortsExhausted(crate::portguard::PortsExhausted, Duration),
    /// The TCP connect to an exit (upstream proxy) failed or timed out, or the exit broke
    /// its protocol (garbage, early close): the node's fault.
    #[error("exit {exit}: {source}")]
    ExitConnect {
        /// Exit label.
        exit: String,
        /// Why (never credentials).
        source: ExitFault,
    },
    /// The exit took our request to reach the target but did not answer in time: the target
    /// is slow or unreachable from the exit (not counted against the node).
    #[error("exit {exit} did not reach the target within {after:?}")]
    ExitTargetTimeout {
        /// Exit label.
        exit: String,
        /// The timeout.
        after: Duration,
    },
    /// The exit rejected our credentials (HTTP 407, SOCKS5 auth failure).
    #[error("exit {exit} rejected the proxy credentials: {source}")]
    ExitAuth {
        /// Exit label.
        exit: String,
        /// The handshake's failure ([`HandshakeError::Auth`]).
        source: HandshakeError,
    },
    /// The exit answered but would not reach the target (CONNECT 403/502/..., SOCKS5 reply
    /// error), or the target name cannot be put in a proxy request.
    #[error("exit {exit} refused to reach the target: {source}")]
    ExitRefused {
        /// Exit label.
        exit: String,
        /// The handshake's failure: [`HandshakeError::Refused`] (status / reply), or
        /// [`HandshakeError::Io`] of kind `InvalidInput` (a target name no request can carry).
        source: HandshakeError,
    },
    /// The exit's address is one of edgepool's own listeners: dialling it would loop.
    #[error("exit {exit} resolves to {addr}, edgepool's own listener; a request through it would loop (fix the exit's address in exits.pools)")]
    ExitIsEdgepool {
        /// Exit label.
        exit: String,
        /// The address.
        addr: SocketAddr,
    },
    /// No connection budget left on the exit for the whole wait.
    #[error("exit {exit} is at its connection budget ({budget}); waited {after:?}")]
    ExitBudget {
        /// Exit label.
        exit: String,
        /// The budget.
        budget: usize,
        /// How long we waited.
        after: Duration,
    },
    /// The HTTP/1.1 or HTTP/2 connection setup failed.
    #[error("HTTP handshake with {host} failed: {source}")]
    Handshake {
        /// Host.
        host: String,
        /// Why.
        source: HttpFailure,
    },
}

/// Why a TLS handshake failed ([`DialError::Tls`]). The text is the cause's own.
#[derive(Debug, thiserror::Error)]
pub enum TlsFailure {
    /// The host cannot be a TLS server name.
    #[error("invalid server name: {0}")]
    InvalidName(#[source] rustls::pki_types::InvalidDnsNameError),
    /// rustls ended the handshake: certificate verification, a TLS alert, a protocol error.
    #[error("{0}")]
    Rustls(#[source] rustls::Error),
    /// The connection failed during the handshake (reset, closed early).
    #[error("{0}")]
    Io(#[source] io::Error),
}

impl TlsFailure {
    /// Sorts an error from `tokio_rustls`' handshake: rustls' own errors arrive wrapped in an
    /// `io::Error` (kind `InvalidData`), and are taken out of it; the rest are the connection's.
    fn from_io(e: io::Error) -> Self {
        if !e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
            return TlsFailure::Io(e);
        }
        let kind = e.kind();
        match e
            .into_inner()
            .map(|inner| inner.downcast::<rustls::Error>())
        {
            Some(Ok(r)) => TlsFailure::Rustls(*r),
            // Not reached: the check above saw a rustls::Error inside.
            Some(Err(other)) => TlsFailure::Io(io::Error::new(kind, other)),
            None => TlsFailure::Io(io::Error::from(kind)),
        }
    }
}

/// Why an exit node failed ([`DialError::ExitConnect`]): its TCP connect or its handshake. The
/// node's circuit is told each of these.
#[derive(Debug, thiserror::Error)]
pub enum ExitFault {
    /// The proxy host's name gave no address (the cached resolver's answer).
    #[error("TCP connect failed: {0}")]
    Resolve(#[source] crate::dns::ResolveError),
    /// The proxy host's name resolved to no address at all.
    #[error("TCP connect failed: the proxy host has no address")]
    NoAddress,
    /// The TCP connect (or the system's name lookup) failed; the last address's error.
    #[error("TCP connect failed: {0}")]
    Connect(#[source] io::Error),
    /// The TCP connect did not finish within the connect timeout.
    #[error("TCP connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The proxy sent nothing within the connect timeout (`kind`: `http` / `socks5`).
    #[error("no answer to the {kind} handshake within {after:?}")]
    HandshakeTimeout {
        /// The exit's protocol.
        kind: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The proxy broke its protocol or the connection failed mid-handshake
    /// ([`HandshakeError::Protocol`] / [`HandshakeError::Io`]).
    #[error("{0}")]
    Handshake(#[source] HandshakeError),
}

/// Why the HTTP/1.1 or HTTP/2 setup failed ([`DialError::Handshake`]).
#[derive(Debug, thiserror::Error)]
pub enum HttpFailure {
    /// The target spoke (this many bytes) before any request: not an HTTP server.
    #[error("the target sent {0} bytes through the tunnel before any request")]
    EarlyBytes(usize),
    /// hyper's HTTP/1.1 handshake failed.
    #[error("{0}")]
    Http1(#[source] hyper::Error),
    /// h2's handshake failed.
    #[error("{0}")]
    Http2(#[source] h2::Error),
}

/// How long each phase of opening a connection took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DialTimings {
    /// TCP connect (to the target, or to the exit).
    pub tcp: Duration,
    /// Exit handshake (HTTP CONNECT / SOCKS5); zero when direct.
    pub exit: Duration,
    /// TLS handshake (zero for plain HTTP).
    pub tls: Duration,
}

const READ_NONE: u8 = 0;
const READ_EOF: u8 = 1;
const READ_RESET: u8 = 2;
const READ_ERROR: u8 = 3;

/// State shared between a connection's handles, its driver task and its [`WatchedIo`].
#[derive(Debug)]
pub struct ConnShared {
    alive: AtomicBool,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    read_end: AtomicU8,
    /// The server's stream limit from its SETTINGS (0 until they arrive).
    max_streams: AtomicUsize,
    /// How the connection was opened.
    pub timings: DialTimings,
    /// `h2` or `http/1.1`.
    pub protocol: &'static str,
    /// Holds the connection's place in its exit's budget until the connection is gone.
    _budget: Option<BudgetSlot>,
}

/// A stream opened through an exit (or directly).
pub struct Opened {
    /// The socket, positioned at the tunnel's start.
    pub stream: TcpStream,
    /// How long each phase took.
    pub timings: DialTimings,
    /// Its place in the exit's budget; keep it as long as the stream lives.
    pub slot: BudgetSlot,
    /// Bytes of the tunnel that arrived with the proxy's answer (a server that speaks first).
    pub early: Vec<u8>,
}

/// Records a node fault on its circuit and builds the error.
fn node_fault(node: &ExitNode, fault: ExitFault) -> DialError {
    node.report(NodeOutcome::Fault(&fault.to_string()));
    DialError::ExitConnect {
        exit: node.label.to_string(),
        source: fault,
    }
}

/// Why the TCP connect to an exit's proxy failed.
enum ProxyConnectError {
    /// The node's fault.
    Fault(ExitFault),
    /// The proxy host resolves to this address, one of edgepool's own listeners (not dialled).
    Loop(SocketAddr),
}

/// The DialError for an exit's failed handshake, telling the node's circuit whose fault it
/// was: credentials (a failure), the proxy's decision about the target (the node works), a
/// target name no request can carry (no verdict on the node), or the node's own fault.
fn handshake_failure(node: &ExitNode, e: HandshakeError) -> DialError {
    let exit = node.label.to_string();
    match e {
        HandshakeError::Auth(_) => {
            node.report(NodeOutcome::Fault(&e.to_string()));
            DialError::ExitAuth { exit, source: e }
        }
        // The node works; it will not reach this target (or the target name cannot be put
        // in a request).
        HandshakeError::Refused { .. } => {
            node.report(NodeOutcome::Answered);
            DialError::ExitRefused { exit, source: e }
        }
        HandshakeError::Io(ref io) if io.kind() == io::ErrorKind::InvalidInput => {
            node.report(NodeOutcome::NoVerdict);
            DialError::ExitRefused { exit, source: e }
        }
        HandshakeError::Protocol(_) | HandshakeError::Io(_) => {
            node_fault(node, ExitFault::Handshake(e))
        }
    }
}

/// TLS to `host` over `tcp` with `tls` (which decides ALPN and verification), within
/// `timeout`.
async fn tls_connect(
    tls: Arc<rustls::ClientConfig>,
    tcp: TcpStream,
    host: &str,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, DialError> {
    let name = ServerName::try_from(host.to_string()).map_err(|e| DialError::Tls {
        host: host.to_string(),
        source: TlsFailure::InvalidName(e),
    })?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Err(_) => Err(DialError::TlsTimeout {
            host: host.to_string(),
            after: timeout,
        }),
        Ok(Err(e)) => Err(DialError::Tls {
            host: host.to_string(),
            source: TlsFailure::from_io(e),
        }),
        Ok(Ok(s)) => Ok(s),
    }
}

/// Counts the bytes read through it (did the proxy say anything at all?).
struct ReadCounter<'a, S> {
    inner: &'a mut S,
    read: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadCounter<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.read += buf.filled().len() - before;
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadCounter<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// One connection's place in an exit node's budget; gives it back when dropped.
#[derive(Debug)]
pub struct BudgetSlot {
    node: Arc<ExitNode>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl BudgetSlot {
    fn new(node: Arc<ExitNode>, permit: Option<tokio::sync::OwnedSemaphorePermit>) -> Self {
        node.open.fetch_add(1, Ordering::Relaxed);
        BudgetSlot {
            node,
            _permit: permit,
        }
    }
}

impl Drop for BudgetSlot {
    fn drop(&mut self) {
        self.node.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnShared {
    fn new(timings: DialTimings, protocol: &'static str, budget: Option<BudgetSlot>) -> Self {
        ConnShared {
            alive: AtomicBool::new(true),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            read_end: AtomicU8::new(READ_NONE),
            max_streams: AtomicUsize::new(0),
            timings,
            protocol,
            _budget: budget,
        }
    }
    /// Bytes read from the server so far (after TLS).
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }
    /// Bytes written to the server so far (before TLS).
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }
    /// False once the connection's driver has finished.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
}

/// An upstream connection handle.
pub enum UpstreamConn {
    /// HTTP/1.1: exclusive.
    H1 {
        /// hyper's request sender.
        send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        /// Shared state.
        shared: Arc<ConnShared>,
    },
    /// HTTP/2: shared by streams.
    H2 {
        /// h2's request sender.
        send: h2::client::SendRequest<Bytes>,
        /// Shared state.
        shared: Arc<ConnShared>,
    },
}

impl UpstreamConn {
    /// Shared state of the connection.
    pub fn shared(&self) -> &Arc<ConnShared> {
        match self {
            UpstreamConn::H1 { shared, .. } | UpstreamConn::H2 { shared, .. } => shared,
        }
    }
}

impl PoolConn for UpstreamConn {
    fn share(&self) -> Option<Self> {
        match self {
            UpstreamConn::H1 { .. } => None,
            UpstreamConn::H2 { send, shared } => Some(UpstreamConn::H2 {
                send: send.clone(),
                shared: shared.clone(),
            }),
        }
    }
    fn is_open(&self) -> bool {
        match self {
            UpstreamConn::H1 { send, shared } => shared.is_alive() && !send.is_closed(),
            UpstreamConn::H2 { shared, .. } => shared.is_alive(),
        }
    }
}

/// Settings for dialing.
#[derive(Clone, Debug)]
pub struct DialConfig {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// TLS handshake timeout.
    pub tls_handshake_timeout: Duration,
    /// Offer h2 by ALPN.
    pub http2: bool,
    /// Extra PEM roots for targets.
    pub extra_ca_files: Vec<PathBuf>,
    /// Stream limit assumed when a server's SETTINGS set none.
    pub default_max_streams: usize,
    /// The ephemeral-port budget: new dials wait while it is nearly used up.
    pub ports: Option<crate::portguard::PortGuard>,
    /// Resolves exit proxies' host names (cached, bounded; see [`crate::dns`]). `None`: the
    /// system's `getaddrinfo` at every dial.
    pub resolver: Option<crate::dns::Resolver>,
    /// edgepool's own listening addresses (set once the listeners are bound): an exit that
    /// resolves to one of them is a loop, never dialled.
    pub own: OwnAddrs,
}

/// edgepool's own listening addresses, shared by the dialer and the forwarder; empty until the
/// listeners are bound.
#[derive(Clone, Debug, Default)]
pub struct OwnAddrs(Arc<std::sync::OnceLock<Vec<SocketAddr>>>);

impl OwnAddrs {
    /// Sets them (once; later calls are ignored).
    pub fn set(&self, addrs: Vec<SocketAddr>) {
        let _ = self.0.set(addrs);
    }

    /// Whether `addr` reaches one of edgepool's listeners (a wildcard listener is reached
    /// through loopback and the wildcard address).
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.0.get().is_some_and(|own| {
            own.iter().any(|l| {
                l.port() == addr.port()
                    && (l.ip() == addr.ip()
                        || (l.ip().is_unspecified()
                            && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
            })
        })
    }
}

/// The pool's [`Connector`]: dials [`UpstreamKey`]s.
pub struct Dialer {
    cfg: DialConfig,
    tls_verify: Arc<rustls::ClientConfig>,
    tls_insecure: Arc<rustls::ClientConfig>,
    /// The same two with ALPN `http/1.1` only: dedicated connections for upgrades.
    tls_h1_verify: Arc<rustls::ClientConfig>,
    tls_h1_insecure: Arc<rustls::ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Dialer {
    /// Builds the TLS client configurations. Fails if an extra CA file cannot be read.
    pub fn new(cfg: DialConfig) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for path in &cfg.extra_ca_files {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("upstream CA file {}: {e}", path.display()))?;
            let mut n = 0;
            for c in certs {
                let c = c.map_err(|e| format!("upstream CA file {}: {e}", path.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("upstream CA file {}: {e}", path.display()))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!(
                    "upstream CA file {}: no certificates in it",
                    path.display()
                ));
            }
        }
        let alpn: Vec<Vec<u8>> = if cfg.http2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let builder = || {
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
        };
        let mut verify = builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        verify.alpn_protocols = alpn.clone();
        verify.resumption = rustls::client::Resumption::in_memory_sessions(4096);
        let mut insecure = builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
            .with_no_client_auth();
        insecure.alpn_protocols = alpn;
        insecure.resumption = rustls::client::Resumption::in_memory_sessions(1024);
        let h1_only = |c: &rustls::ClientConfig| {
            let mut c = c.clone();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(c)
        };
        Ok(Dialer {
            tls_h1_verify: h1_only(&verify),
            tls_h1_insecure: h1_only(&insecure),
            cfg,
            tls_verify: Arc::new(verify),
            tls_insecure: Arc::new(insecure),
        })
    }

    /// Opens a TCP stream to `host:port` through `exit` (straight to `addr` when direct):
    /// connects, then performs the exit's handshake (HTTP CONNECT / SOCKS5). With
    /// `http_proxy_only`, stops after the TCP connect to an HTTP proxy (absolute-form use).
    /// Takes a place in the exit's budget first (waiting up to the connect timeout). Returns
    /// the tunnel's first bytes if the target spoke first and they came with the proxy's
    /// answer: deliver them before reading the stream. Failures that are the node's fault are
    /// reported to its circuit here, once per dial.
    pub async fn open_stream(
        &self,
        exit: &ExitKey,
        host: &str,
        port: u16,
        addr: SocketAddr,
    ) -> Result<Opened, DialError> {
        Self::open(&self.cfg, exit, host, port, addr, false).await
    }

    /// TLS to `host` over a stream from [`open_stream`](Self::open_stream), offering ALPN
    /// `http/1.1` only (an HTTP/1.1 upgrade cannot ride HTTP/2), within
    /// `upstream.tls_handshake_timeout`. `verify: false` only for `upstream.insecure_hosts`.
    pub async fn tls_h1(
        &self,
        tcp: TcpStream,
        host: &str,
        verify: bool,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, DialError> {
        let tls = if verify {
            self.tls_h1_verify.clone()
        } else {
            self.tls_h1_insecure.clone()
        };
        tls_connect(tls, tcp, host, self.cfg.tls_handshake_timeout).await
    }

    /// See [`open_stream`](Self::open_stream); `http_proxy_only` stops after the TCP connect
    /// to an HTTP proxy. Takes a place in the exit's budget, connects
    /// ([`connect_tcp`](Self::connect_tcp)), then performs the exit's handshake
    /// ([`exit_handshake`](Self::exit_handshake)).
    async fn open(
        cfg: &DialConfig,
        exit: &ExitKey,
        host: &str,
        port: u16,
        addr: SocketAddr,
        http_proxy_only: bool,
    ) -> Result<Opened, DialError> {
        let node = &exit.node;
        let slot = Self::budget_slot(cfg, node).await?;
        let (mut tcp, tcp_time) = Self::connect_tcp(cfg, node, addr).await?;
        let direct = node.spec.kind == ExitKind::Direct;
        let t1 = Instant::now();
        let mut early = Vec::new();
        if !direct && !http_proxy_only {
            early = Self::exit_handshake(cfg, exit, &mut tcp, host, port).await?;
        }
        let timings = DialTimings {
            tcp: tcp_time,
            exit: if direct || http_proxy_only {
                Duration::ZERO
            } else {
                t1.elapsed()
            },
            tls: Duration::ZERO,
        };
        Ok(Opened {
            stream: tcp,
            timings,
            slot,
            early,
        })
    }

    /// Takes a place in `node`'s connection budget, waiting up to the connect timeout for
    /// one when the node has a budget.
    async fn budget_slot(cfg: &DialConfig, node: &Arc<ExitNode>) -> Result<BudgetSlot, DialError> {
        let permit = match node.permits() {
            None => None,
            Some(sem) => {
                match tokio::time::timeout(cfg.connect_timeout, sem.clone().acquire_owned()).await {
                    Ok(Ok(p)) => Some(p),
                    _ => {
                        node.report(NodeOutcome::NoVerdict);
                        return Err(DialError::ExitBudget {
                            exit: node.label.to_string(),
                            budget: node.budget.unwrap_or(0),
                            after: cfg.connect_timeout,
                        });
                    }
                }
            }
        };
        Ok(BudgetSlot::new(node.clone(), permit))
    }

    /// The TCP connect, through the ephemeral-port guard (the dial is held, bounded, while
    /// the ports are nearly used up, rather than failing with `EADDRNOTAVAIL`): to `addr`
    /// when `node` is direct, else to the exit's proxy (its faults told to its circuit), within
    /// the connect timeout; then `TCP_NODELAY`. Returns the stream and how long the connect
    /// took.
    async fn connect_tcp(
        cfg: &DialConfig,
        node: &ExitNode,
        addr: SocketAddr,
    ) -> Result<(TcpStream, Duration), DialError> {
        if let Some(ports) = &cfg.ports {
            if let Err(e) = ports.admit(cfg.connect_timeout).await {
                node.report(NodeOutcome::NoVerdict);
                return Err(DialError::PortsExhausted(e, cfg.connect_timeout));
            }
        }
        let t0 = Instant::now();
        let after = cfg.connect_timeout;
        let tcp = if node.spec.kind == ExitKind::Direct {
            match tokio::time::timeout(after, TcpStream::connect(addr)).await {
                Err(_) => return Err(DialError::ConnectTimeout { addr, after }),
                Ok(Err(source)) => return Err(DialError::Connect { addr, source }),
                Ok(Ok(s)) => s,
            }
        } else {
            match tokio::time::timeout(after, connect_proxy(cfg, node)).await {
                Err(_) => return Err(node_fault(node, ExitFault::ConnectTimeout(after))),
                Ok(Err(ProxyConnectError::Loop(addr))) => {
                    let e = DialError::ExitIsEdgepool {
                        exit: node.label.to_string(),
                        addr,
                    };
                    tracing::error!("{e}");
                    // The node is unusable as configured: routing avoids it like a failing one.
                    node.report(NodeOutcome::Fault(&e.to_string()));
                    return Err(e);
                }
                Ok(Err(ProxyConnectError::Fault(f))) => return Err(node_fault(node, f)),
                Ok(Ok(s)) => s,
            }
        };
        let _ = tcp.set_nodelay(true);
        let tcp_time = t0.elapsed();
        if let Some(ports) = &cfg.ports {
            ports.note_new_connection();
        }
        Ok((tcp, tcp_time))
    }

    /// The exit's handshake over `tcp` (HTTP `CONNECT` / SOCKS5 to `host:port`) within the
    /// connect timeout, telling the node's circuit how it went. Returns the tunnel's bytes
    /// that came with the proxy's answer.
    async fn exit_handshake(
        cfg: &DialConfig,
        exit: &ExitKey,
        tcp: &mut TcpStream,
        host: &str,
        port: u16,
    ) -> Result<Vec<u8>, DialError> {
        let node = &exit.node;
        let auth = node.auth_for(exit.provider_session());
        let kind = node.spec.kind;
        let mut counted = ReadCounter {
            inner: tcp,
            read: 0,
        };
        let res = tokio::time::timeout(cfg.connect_timeout, async {
            match kind {
                ExitKind::Http => {
                    crate::exitproto::http_connect(&mut counted, host, port, auth.as_ref()).await
                }
                ExitKind::Socks5 => {
                    crate::exitproto::socks5_connect(&mut counted, host, port, auth.as_ref())
                        .await
                        .map(|()| Vec::new())
                }
                ExitKind::Direct => Ok(Vec::new()),
            }
        })
        .await;
        let heard_from_proxy = counted.read > 0;
        match res {
            // An HTTP proxy answers CONNECT once it has reached the target (or given up);
            // a SOCKS5 proxy that has answered the greeting is alive: a slow answer is the
            // target's, not the node's.
            Err(_) if kind == ExitKind::Http || heard_from_proxy => {
                node.report(NodeOutcome::NoVerdict);
                Err(DialError::ExitTargetTimeout {
                    exit: node.label.to_string(),
                    after: cfg.connect_timeout,
                })
            }
            Err(_) => Err(node_fault(
                node,
                ExitFault::HandshakeTimeout {
                    kind: kind.as_str(),
                    after: cfg.connect_timeout,
                },
            )),
            Ok(Err(e)) => Err(handshake_failure(node, e)),
            Ok(Ok(bytes)) => {
                node.report(NodeOutcome::Answered);
                Ok(bytes)
            }
        }
    }

    /// Opens a pooled connection for `key`: the stream ([`open`](Self::open)), TLS for https,
    /// then the HTTP handshake.
    async fn dial(
        cfg: DialConfig,
        tls: Arc<rustls::ClientConfig>,
        key: UpstreamKey,
        watch: ConnWatch<Dialer>,
    ) -> Result<Connected<UpstreamConn>, DialError> {
        let via = key.via_proxy();
        let Opened {
            stream: tcp,
            mut timings,
            slot,
            early,
        } = Self::open(&cfg, &key.exit, &key.host, key.port, key.addr, via).await?;
        let host = key.host.to_string();
        if !early.is_empty() {
            // A pooled connection's client always speaks first (TLS ClientHello, HTTP
            // request): a target that talks before being asked is not an HTTP server.
            return Err(DialError::Handshake {
                host,
                source: HttpFailure::EarlyBytes(early.len()),
            });
        }
        match key.scheme {
            Scheme::Http => {
                let shared = Arc::new(ConnShared::new(timings, "http/1.1", Some(slot)));
                let io = WatchedIo::new(tcp, shared.clone(), None);
                h1_handshake(io, shared, watch, host).await
            }
            Scheme::Https => {
                let t1 = Instant::now();
                let stream = tls_connect(tls, tcp, &host, cfg.tls_handshake_timeout).await?;
                timings.tls = t1.elapsed();
                let is_h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                if is_h2 {
                    let shared = Arc::new(ConnShared::new(timings, "h2", Some(slot)));
                    let tracker = FrameTracker::new(watch.clone(), cfg.default_max_streams);
                    let io = WatchedIo::new(stream, shared.clone(), Some(tracker));
                    h2_handshake(io, shared, watch, host).await
                } else {
                    let shared = Arc::new(ConnShared::new(timings, "http/1.1", Some(slot)));
                    let io = WatchedIo::new(stream, shared.clone(), None);
                    h1_handshake(io, shared, watch, host).await
                }
            }
        }
    }
}

/// Resolves the exit's proxy host (the cached resolver, else the system's `getaddrinfo`) and
/// connects to its addresses in turn; refuses, dialling none, when any of them is one of
/// edgepool's own listeners.
async fn connect_proxy(cfg: &DialConfig, node: &ExitNode) -> Result<TcpStream, ProxyConnectError> {
    let port = node.spec.port;
    let addrs: Vec<SocketAddr> = match &cfg.resolver {
        Some(r) => r
            .resolve_configured(&node.spec.host)
            .await
            .map_err(|e| ProxyConnectError::Fault(ExitFault::Resolve(e)))?
            .addrs
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect(),
        None => tokio::net::lookup_host((node.spec.host.as_str(), port))
            .await
            .map_err(|e| ProxyConnectError::Fault(ExitFault::Connect(e)))?
            .collect(),
    };
    if let Some(own) = addrs.iter().find(|a| cfg.own.contains(**a)) {
        return Err(ProxyConnectError::Loop(*own));
    }
    let mut last = None;
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(ProxyConnectError::Fault(
        last.map_or(ExitFault::NoAddress, ExitFault::Connect),
    ))
}

async fn h1_handshake<T>(
    io: WatchedIo<T>,
    shared: Arc<ConnShared>,
    watch: ConnWatch<Dialer>,
    host: String,
) -> Result<Connected<UpstreamConn>, DialError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Full<Bytes>>(TokioIo::new(io))
        .await
        .map_err(|e| DialError::Handshake {
            host,
            source: HttpFailure::Http1(e),
        })?;
    let s2 = shared.clone();
    tokio::spawn(async move {
        let res = conn.await;
        s2.alive.store(false, Ordering::Release);
        let read_end = s2.read_end.load(Ordering::Acquire);
        let cause = match res {
            _ if read_end == READ_RESET => EndCause::Reset,
            Ok(()) => EndCause::Fin,
            // A response with no request outstanding (the server spoke unasked). hyper 1.x
            // has this kind (`Kind::UnexpectedMessage`) but no accessor for it, so its Display
            // text is the only way to tell; every other case here is decided by type.
            Err(e) if e.to_string().contains("unexpected message") => EndCause::StrayBytes,
            Err(e) if e.is_parse() => EndCause::StrayBytes,
            Err(_) if read_end == READ_EOF => EndCause::Fin,
            Err(_) => EndCause::Error,
        };
        watch.closed(cause);
    });
    Ok(Connected {
        conn: UpstreamConn::H1 { send, shared },
        multiplexed: false,
        max_streams: Some(1),
    })
}

async fn h2_handshake<T>(
    io: WatchedIo<T>,
    shared: Arc<ConnShared>,
    watch: ConnWatch<Dialer>,
    host: String,
) -> Result<Connected<UpstreamConn>, DialError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_header_list_size(256 * 1024)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| DialError::Handshake {
            host,
            source: HttpFailure::Http2(e),
        })?;
    let s2 = shared.clone();
    tokio::spawn(async move {
        let res = conn.await;
        s2.alive.store(false, Ordering::Release);
        let read_end = s2.read_end.load(Ordering::Acquire);
        let cause = match res {
            _ if read_end == READ_RESET => EndCause::Reset,
            Ok(()) => EndCause::Fin,
            Err(e) if e.is_go_away() => EndCause::Goaway,
            Err(_) if read_end == READ_EOF => EndCause::Fin,
            Err(_) => EndCause::Error,
        };
        watch.closed(cause);
    });
    let known = shared.max_streams.load(Ordering::Acquire);
    Ok(Connected {
        conn: UpstreamConn::H2 { send, shared },
        multiplexed: true,
        max_streams: (known > 0).then_some(known),
    })
}

impl Connector for Dialer {
    type Key = UpstreamKey;
    type Conn = UpstreamConn;
    type Error = DialError;

    fn connect(
        &self,
        key: &UpstreamKey,
        watch: ConnWatch<Self>,
    ) -> BoxFuture<Result<Connected<UpstreamConn>, DialError>> {
        let tls = if key.verify {
            self.tls_verify.clone()
        } else {
            self.tls_insecure.clone()
        };
        Box::pin(Self::dial(self.cfg.clone(), tls, key.clone(), watch))
    }

    fn may_multiplex(&self, key: &UpstreamKey) -> bool {
        self.cfg.http2 && key.scheme == Scheme::Https
    }
}

/// Accepts any server certificate. Used only for hosts listed in
/// `upstream.insecure_skip_verify` (an explicit, logged opt-in).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Reads HTTP/2 frame headers off the incoming byte stream (after TLS) to see the server's
/// SETTINGS and GOAWAY as they arrive, before h2 hands them to anyone.
struct FrameTracker {
    watch: ConnWatch<Dialer>,
    default_max_streams: usize,
    header: [u8; 9],
    header_len: usize,
    remaining: usize,
    kind: u8,
    flags: u8,
    payload: Vec<u8>,
    settled: bool,
    current_max: usize,
}

const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

impl FrameTracker {
    fn new(watch: ConnWatch<Dialer>, default_max_streams: usize) -> Self {
        FrameTracker {
            watch,
            default_max_streams,
            header: [0; 9],
            header_len: 0,
            remaining: 0,
            kind: 0,
            flags: 0,
            payload: Vec::new(),
            settled: false,
            current_max: 0,
        }
    }

    fn feed(&mut self, mut buf: &[u8], shared: &ConnShared) {
        while !buf.is_empty() {
            if self.header_len < 9 {
                let n = (9 - self.header_len).min(buf.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[..n]);
                self.header_len += n;
                buf = &buf[n..];
                if self.header_len == 9 {
                    let h = &self.header;
                    self.remaining =
                        ((h[0] as usize) << 16) | ((h[1] as usize) << 8) | h[2] as usize;
                    self.kind = h[3];
                    self.flags = h[4];
                    self.payload.clear();
                    if self.remaining == 0 {
                        self.frame_done(shared);
                    }
                }
                continue;
            }
            let n = self.remaining.min(buf.len());
            if matches!(self.kind, FRAME_SETTINGS | FRAME_GOAWAY) && self.payload.len() < 4096 {
                let take = n.min(4096 - self.payload.len());
                self.payload.extend_from_slice(&buf[..take]);
            }
            self.remaining -= n;
            buf = &buf[n..];
            if self.remaining == 0 {
                self.frame_done(shared);
            }
        }
    }

    fn frame_done(&mut self, shared: &ConnShared) {
        self.header_len = 0;
        match self.kind {
            FRAME_SETTINGS if self.flags & 0x1 == 0 => {
                let mut max = None;
                for entry in self.payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([entry[0], entry[1]]);
                    if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                        let v = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
                        max = Some(v as usize);
                    }
                }
                let value = match (max, self.settled) {
                    (Some(v), _) => v.min(self.default_max_streams.max(1) * 16),
                    (None, false) => self.default_max_streams,
                    (None, true) => self.current_max,
                };
                if !self.settled || value != self.current_max {
                    self.settled = true;
                    self.current_max = value;
                    shared.max_streams.store(value, Ordering::Release);
                    self.watch.settled(value);
                }
            }
            FRAME_GOAWAY => self.watch.goaway(),
            _ => {}
        }
    }
}

/// The socket (or TLS stream) of an upstream connection, counting bytes and noting how the
/// read side ended; for HTTP/2 it also feeds a [`FrameTracker`].
pub struct WatchedIo<T> {
    inner: T,
    shared: Arc<ConnShared>,
    tracker: Option<FrameTracker>,
}

impl<T> WatchedIo<T> {
    fn new(inner: T, shared: Arc<ConnShared>, tracker: Option<FrameTracker>) -> Self {
        WatchedIo {
            inner,
            shared,
            tracker,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &res {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if new.is_empty() {
                    this.shared.read_end.store(READ_EOF, Ordering::Release);
                } else {
                    this.shared
                        .bytes_in
                        .fetch_add(new.len() as u64, Ordering::Relaxed);
                    if let Some(t) = this.tracker.as_mut() {
                        t.feed(new, &this.shared);
                    }
                }
            }
            Poll::Ready(Err(e)) => {
                let end = match e.kind() {
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => READ_RESET,
                    io::ErrorKind::UnexpectedEof => READ_EOF,
                    _ => READ_ERROR,
                };
                this.shared.read_end.store(end, Ordering::Release);
            }
            Poll::Pending => {}
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            self.shared
                .bytes_out
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        res
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &res {
            self.shared
                .bytes_out
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn tls_failures_keep_rustls_errors_typed_and_the_text_unchanged() {
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let text = wrapped.to_string();
        let f = TlsFailure::from_io(wrapped);
        assert!(
            matches!(
                &f,
                TlsFailure::Rustls(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                ))
            ),
            "{f:?}"
        );
        assert_eq!(f.to_string(), text);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        let text = reset.to_string();
        let f = TlsFailure::from_io(reset);
        assert!(matches!(&f, TlsFailure::Io(e) if e.kind() == io::ErrorKind::ConnectionReset));
        assert_eq!(f.to_string(), text);
        let e = DialError::Tls {
            host: "example.com".into(),
            source: f,
        };
        assert!(e
            .to_string()
            .starts_with("TLS handshake with example.com failed: "));
        assert!(e.source().is_some_and(|s| s.is::<TlsFailure>()));
    }

    #[test]
    fn exit_errors_carry_their_cause_as_a_source_with_the_same_text() {
        let e = DialError::ExitConnect {
            exit: "p/1".into(),
            source: ExitFault::ConnectTimeout(Duration::from_secs(10)),
        };
        assert_eq!(e.to_string(), "exit p/1: TCP connect timed out after 10s");
        let e = DialError::ExitConnect {
            exit: "p/1".into(),
            source: ExitFault::Handshake(HandshakeError::Protocol("garbage".into())),
        };
        assert_eq!(
            e.to_string(),
            "exit p/1: exit proxy protocol error: garbage"
        );
        let fault = e.source().and_then(|s| s.downcast_ref::<ExitFault>());
        let inner = fault
            .and_then(|f| f.source())
            .and_then(|s| s.downcast_ref());
        assert!(
            matches!(inner, Some(HandshakeError::Protocol(_))),
            "{fault:?}"
        );
        let e = DialError::ExitAuth {
            exit: "p/1".into(),
            source: HandshakeError::Auth("HTTP 407".into()),
        };
        assert_eq!(
            e.to_string(),
            "exit p/1 rejected the proxy credentials: exit proxy rejected the credentials: HTTP 407"
        );
        let e = DialError::Handshake {
            host: "h".into(),
            source: HttpFailure::EarlyBytes(5),
        };
        assert_eq!(
            e.to_string(),
            "HTTP handshake with h failed: the target sent 5 bytes through the tunnel before any request"
        );
    }
}
