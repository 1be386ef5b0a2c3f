//! ingress: the worker-facing listener. Absolute-form `http://` requests, `CONNECT` with TLS
//! interception (or a blind tunnel for passthrough hosts) and `POST /v1/fetch`, all routed
//! per request — one worker connection may carry requests for many targets.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::admission::Admission;
use crate::admission::{BodyBudget, Refused, Ticket, WorkerAddr};
use crate::body::{full_body, ProxyBody};
use crate::ca::LeafCache;
use crate::config::Config;
use crate::dial::Scheme;
use crate::error::{EdgeError, ErrorKind};
use crate::forward::Forwarder;
use crate::forward::Outgoing;
use crate::headers::clean_request_headers;
use crate::splice::Drain;
use crate::telemetry::Telemetry;
use crate::upgrade::Upgrades;
use crate::worker::WorkerAuth;

/// How long a worker has to finish the TLS handshake inside an intercepted CONNECT.
const WORKER_TLS_TIMEOUT: Duration = Duration::from_secs(10);

/// What the worker side needs from the gateway: the configuration, worker authentication,
/// the leaf certificates, the forwarder, accounting, capacity limits, the upgrade path and the
/// drain signal. Built once by [`crate::gateway::Gateway`]; shared by every worker connection.
pub struct Ingress {
    cfg: Arc<Config>,
    auth: WorkerAuth,
    leaves: LeafCache,
    forwarder: Arc<Forwarder>,
    telemetry: Arc<Telemetry>,
    admission: Arc<Admission>,
    upgrades: Arc<Upgrades>,
    drain: Drain,
}

/// The parts an [`Ingress`] is built from.
pub struct IngressParts {
    /// The configuration.
    pub cfg: Arc<Config>,
    /// Leaf certificates for intercepted hosts.
    pub leaves: LeafCache,
    /// The forwarder (and through it, the pool).
    pub forwarder: Arc<Forwarder>,
    /// Accounting.
    pub telemetry: Arc<Telemetry>,
    /// Capacity limits.
    pub admission: Arc<Admission>,
    /// The upgrade (WebSocket) path.
    pub upgrades: Arc<Upgrades>,
    /// Raised when shutdown starts.
    pub drain: Drain,
}

impl Ingress {
    /// The worker side's context (worker tokens from `cfg.auth`).
    pub fn new(p: IngressParts) -> Ingress {
        Ingress {
            auth: WorkerAuth::new(&p.cfg.auth.tokens),
            cfg: p.cfg,
            leaves: p.leaves,
            forwarder: p.forwarder,
            telemetry: p.telemetry,
            admission: p.admission,
            upgrades: p.upgrades,
            drain: p.drain,
        }
    }

    /// Upgrade (WebSocket) counters.
    pub fn upgrades(&self) -> &crate::upgrade::UpgradeMetrics {
        self.upgrades.upgrades()
    }

    /// Capacity limits (connections per worker, tunnels, requests in flight).
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Resolves when shutdown starts (at once if it already has).
    pub async fn draining(&self) {
        self.drain.wait().await
    }

    /// Head and size limits for the strict HTTP/1 framer.
    pub fn h1_limits(&self) -> crate::h1guard::Limits {
        crate::h1guard::Limits {
            max_head_bytes: self.cfg.limits.max_header_bytes,
            max_headers: self.cfg.limits.max_headers,
            max_uri_bytes: self.cfg.limits.max_uri_bytes,
        }
    }

    /// Worker-side timeouts for the strict HTTP/1 framer.
    pub fn h1_timeouts(&self) -> crate::h1guard::Timeouts {
        crate::h1guard::Timeouts {
            header_read: self.cfg.limits.header_read_timeout,
            body_idle: self.cfg.limits.body_idle_timeout,
        }
    }

    /// The server side for worker connections (plain and intercepted): hyper's own limits set
    /// at or above the framer's, HTTP/2 limits explicit (streams, header list, resets).
    pub fn worker_builder(
        &self,
    ) -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
        let l = &self.cfg.limits;
        let mut b =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        // The framer enforces the real limits; hyper's must not be tighter. hyper parses a
        // head into header arrays of 100 slots on the stack; any explicit limit makes it
        // allocate and fill two arrays of that size on every parse (≈ 2,100 instructions a
        // request at 108), so it gets one only when ours is larger. The framer's marker
        // request has two fields.
        b.http1()
            .max_buf_size((l.max_header_bytes + 16 * 1024).max(64 * 1024));
        if l.max_headers > HYPER_STACK_HEADERS {
            b.http1().max_headers(l.max_headers);
        }
        b.http2()
            .max_concurrent_streams(l.h2_max_streams)
            .max_header_list_size(l.max_header_bytes.min(u32::MAX as usize) as u32)
            .max_pending_accept_reset_streams(l.h2_max_pending_resets)
            .max_local_error_reset_streams(l.h2_max_local_error_resets)
            // RFC 8441 extended CONNECT: WebSockets over HTTP/2 (see crate::upgrade).
            .enable_connect_protocol();
        b
    }

    /// Worker authentication.
    pub fn auth(&self) -> &WorkerAuth {
        &self.auth
    }
    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Leaf certificates for intercepted hosts.
    pub fn leaves(&self) -> &LeafCache {
        &self.leaves
    }
    /// The forwarder (and through it, the pool).
    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }
    /// Metrics and reuse accounting.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }
}

/// Serves one accepted worker connection until it closes: a place under
/// `limits.max_connections_per_worker` first, then strict HTTP/1 framing ([`crate::h1guard`])
/// in front of hyper; on shutdown the connection drains gracefully.
pub async fn serve_worker(gw: Arc<Ingress>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Some(place) = stream
        .peer_addr()
        .ok()
        .and_then(|peer| gw.admission().worker_connection(peer.ip()))
    else {
        refuse_connection(&gw, stream).await;
        return;
    };
    serve_worker_io(gw, stream, place).await;
}

/// Serves one worker connection over any byte stream (`place`: its place under
/// `limits.max_connections_per_worker`). Public for the fuzz target that feeds raw bytes
/// (HTTP/1 and HTTP/2 frames) into the worker side.
pub async fn serve_worker_io<S>(gw: Arc<Ingress>, stream: S, place: Ticket)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = place.ip();
    let conn_span = tracing::info_span!("worker", %peer);
    let (io, slot, watch) = guarded(&gw, stream, &conn_span);
    // The worker's place is held by the connection and, after a CONNECT, by its tunnel.
    let conn = Arc::new(WorkerConn {
        gw: gw.clone(),
        addr: place.addr(),
        slot,
        watch: watch.clone(),
    });
    let place = WorkerPlace(Arc::new(place));
    let place2 = place.clone();
    let conn_span2 = conn_span.clone();
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let c = conn.clone();
        let span = request_span(&conn_span2, &req);
        if req.method() == Method::CONNECT || crate::upgrade::is_upgrade_request(&req) {
            // Only a CONNECT or an upgrade can outlive the connection (as a tunnel, or a
            // spliced WebSocket): no per-request cost else.
            req.extensions_mut().insert(place2.clone());
            req.extensions_mut().insert(ConnHold(c.watch.clone()));
        }
        async move {
            let gw = &c.gw;
            if let Some(resp) = violation_response(gw, &req, &c.slot) {
                return Ok::<_, Infallible>(resp);
            }
            let connect = req.method() == Method::CONNECT;
            let h1_upgrade = h1_upgrade(&req);
            // Boxed once: the request's future is large (routing, retries, the response), and
            // hyper moves the service future into place; a box makes that move a pointer copy.
            let mut resp = answer(&c.watch, Box::pin(handle(gw, req, &c.addr))).await;
            if (connect && !resp.status().is_success())
                || (h1_upgrade && resp.status() != StatusCode::SWITCHING_PROTOCOLS)
            {
                // A refused CONNECT (for any reason: auth, loop, policy) ends the connection:
                // whatever the worker sends next was meant for a tunnel, not an HTTP parser.
                // So does an upgrade request answered with anything but 101: the framer let
                // what follows its head through unparsed.
                resp.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(resp)
        }
        .instrument(span)
    });
    let builder = gw.worker_builder();
    let http = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    drive(&gw, http, &watch, &conn_span).await;
    // The connection's place goes now, unless a tunnel or an upgraded connection holds it.
    drop(place);
}

/// A worker-side stream behind the strict framer (refusals logged under `span`), with the
/// slot its violations are left in and the connection's watch (idle clock, rapid reset).
fn guarded<S>(
    gw: &Ingress,
    stream: S,
    span: &tracing::Span,
) -> (
    crate::h1guard::GuardedIo<S>,
    crate::h1guard::ViolationSlot,
    Arc<ConnWatch>,
) {
    let slot = crate::h1guard::ViolationSlot::default();
    let io = crate::h1guard::GuardedIo::new(
        stream,
        gw.h1_limits(),
        gw.h1_timeouts(),
        slot.clone(),
        span.clone(),
    );
    (
        io,
        slot,
        ConnWatch::new(gw.config().limits.h2_max_cancelled_streams),
    )
}

/// What one worker connection's requests share: cloned once per request, a reference count
/// of the connection's own (the process-wide `Ingress` is not touched per request).
struct WorkerConn {
    gw: Arc<Ingress>,
    /// The worker address's entry in the admission table (requests and bodies counted there).
    addr: WorkerAddr,
    slot: crate::h1guard::ViolationSlot,
    watch: Arc<ConnWatch>,
}

/// The span of one worker request: its method and the target it names (empty for a request
/// inside an intercepted tunnel: the tunnel's span names the target); `forward` records the
/// exit and the address it rides. Every log line of the request carries it, under its worker
/// connection's span.
fn request_span<B>(conn: &tracing::Span, req: &Request<B>) -> tracing::Span {
    let target = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
    tracing::info_span!(
        parent: conn,
        "request",
        method = %req.method(),
        target = %target,
        exit = tracing::field::Empty,
        addr = tracing::field::Empty,
    )
}

/// An HTTP/1 upgrade request: [`crate::h1guard`] passes the bytes after its head unparsed, so
/// any answer but 101 must end the connection.
fn h1_upgrade<B>(req: &Request<B>) -> bool {
    req.version() < http::Version::HTTP_2 && crate::upgrade::is_upgrade_request(req)
}

/// A worker connection's place under `limits.max_connections_per_worker`, shared with the
/// tunnel a CONNECT upgrades it into (the TCP connection lives on there).
#[derive(Clone)]
struct WorkerPlace(#[allow(dead_code)] Arc<crate::admission::Ticket>);

/// The connection an upgrade request arrived on: an HTTP/2 WebSocket stream keeps it open
/// on its idle clock for as long as the stream is spliced.
#[derive(Clone)]
struct ConnHold(Arc<ConnWatch>);

/// An intercepted tunnel's place under `limits.max_tunnels`, shared with the upgraded
/// connections inside it (they are the tunnel, spliced).
#[derive(Clone)]
struct TunnelPlace(#[allow(dead_code)] Arc<crate::admission::Ticket>);

/// Per worker connection: requests started and requests the worker cancelled before their
/// answer (an HTTP/2 stream reset, which makes hyper drop the handler). A connection cancelling
/// more than `limits.h2_max_cancelled_streams` of them, and more than half of its requests,
/// is the HTTP/2 "rapid reset" attack (CVE-2023-44487): edgepool closes it.
///
/// It also keeps the connection's idle clock: how many requests are open (from the handler's
/// start to the end of the response body) and since when none is. [`drive`] closes a
/// connection idle longer than `limits.worker_idle_timeout` (`header_read_timeout` before its
/// first request), whatever the protocol.
struct ConnWatch {
    started: std::sync::atomic::AtomicU64,
    cancelled: std::sync::atomic::AtomicU64,
    limit: u64,
    tripped: tokio::sync::Notify,
    /// Requests whose answer has not ended (handler running or response body streaming).
    open: std::sync::atomic::AtomicU64,
    /// When `open` last fell to 0 (or the connection started).
    idle_since: parking_lot::Mutex<tokio::time::Instant>,
    /// The first request started (`started` left 0): the only change the idle clock is told
    /// about, since its limit changes then; it wakes on its own deadline otherwise, so a
    /// request costs no wake-up of the connection's task.
    first_started: tokio::sync::Notify,
}

impl ConnWatch {
    fn new(limit: usize) -> Arc<Self> {
        Arc::new(ConnWatch {
            started: Default::default(),
            cancelled: Default::default(),
            limit: limit as u64,
            tripped: tokio::sync::Notify::new(),
            open: Default::default(),
            idle_since: parking_lot::Mutex::new(tokio::time::Instant::now()),
            first_started: tokio::sync::Notify::new(),
        })
    }

    /// One more request open until the returned guard drops.
    fn open(self: &Arc<Self>) -> OpenRequest {
        self.open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        OpenRequest(self.clone())
    }

    /// Resolves once the connection has been idle (no open request) for its limit:
    /// `before_first` until a request opens, `between` after.
    ///
    /// The clock is not told when requests open and end (that would wake the connection's
    /// task twice per request): it sleeps until the earliest moment the connection could have
    /// been idle for its limit, then looks. Idle then since `idle_since`: sleep until
    /// `idle_since + limit` (a request that ended meanwhile moved `idle_since` later) or
    /// close; busy: look again one limit later — a request that ends within it leaves
    /// `idle_since + limit` after that look, so the close comes on time, never early.
    async fn idle(&self, before_first: Duration, between: Duration) {
        use std::sync::atomic::Ordering::Acquire;
        let first = self.first_started.notified();
        tokio::pin!(first);
        first.as_mut().enable();
        let sleep = tokio::time::sleep_until(*self.idle_since.lock() + before_first);
        tokio::pin!(sleep);
        loop {
            let started = self.started.load(Acquire) > 0;
            if started {
                sleep.as_mut().await;
            } else {
                tokio::select! {
                    _ = sleep.as_mut() => {}
                    _ = first.as_mut() => {
                        // The limit changes to `between`, which may be the shorter one.
                        sleep.as_mut().reset(tokio::time::Instant::now() + between);
                        continue;
                    }
                }
            }
            let limit = if self.started.load(Acquire) > 0 {
                between
            } else {
                before_first
            };
            let now = tokio::time::Instant::now();
            let next = if self.open.load(Acquire) == 0 {
                let due = *self.idle_since.lock() + limit;
                if due <= now {
                    return;
                }
                due
            } else {
                now + limit
            };
            sleep.as_mut().reset(next);
        }
    }
}

/// How many header fields hyper's HTTP/1 parser holds without an explicit limit
/// (`hyper::proto::h1::role::DEFAULT_MAX_HEADERS`, private; a test holds a request at
/// `limits.max_headers` to passing, at the default and above it).
const HYPER_STACK_HEADERS: usize = 100;

/// A request counted open on its connection's idle clock; dropped when its answer ends.
struct OpenRequest(Arc<ConnWatch>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        if self
            .0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            *self.0.idle_since.lock() = tokio::time::Instant::now();
        }
    }
}

impl ConnWatch {
    /// Starts watching one request.
    fn answering(self: &Arc<Self>) -> Answering {
        if self
            .started
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            == 0
        {
            self.first_started.notify_waiters();
        }
        Answering {
            watch: self.clone(),
            answered: false,
        }
    }
}

/// Dropped without being marked answered: the worker cancelled the request.
struct Answering {
    watch: Arc<ConnWatch>,
    answered: bool,
}

impl Drop for Answering {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        use std::sync::atomic::Ordering::Relaxed;
        let cancelled = self.watch.cancelled.fetch_add(1, Relaxed) + 1;
        if cancelled > self.watch.limit && cancelled * 2 > self.watch.started.load(Relaxed) {
            self.watch.tripped.notify_one();
        }
    }
}

/// Runs `handle` for one request under `watch`; the request stays open on the connection's
/// idle clock until its response body ends.
async fn answer<F: std::future::Future<Output = Response<ProxyBody>>>(
    watch: &Arc<ConnWatch>,
    handle: F,
) -> Response<ProxyBody> {
    let open = watch.open();
    let mut a = watch.answering();
    let resp = handle.await;
    // A body the worker broke off (an HTTP/2 reset mid-body) is a cancel too.
    a.answered = resp
        .headers()
        .get("x-edgepool-error")
        .is_none_or(|v| v != "worker_body_failed");
    resp.map(|inner| OpenBody { inner, _open: open }.boxed_unsync())
}

/// A response body that keeps its request open on the connection's idle clock until it ends
/// or is dropped; size and end-of-stream pass through (Content-Length framing is kept).
struct OpenBody {
    inner: ProxyBody,
    _open: OpenRequest,
}

impl http_body::Body for OpenBody {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails with `TimedOut` (→ 408 `request_body_timeout`) when no frame
    /// arrives for `idle`: HTTP/2 streams get the same body clock as HTTP/1 (whose framer
    /// enforces it on the bytes).
    struct IdleBody<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: tokio::time::Sleep,
        idle: Duration,
    }
}

impl<B> IdleBody<B> {
    fn new(inner: B, idle: Duration) -> Self {
        IdleBody {
            inner,
            sleep: tokio::time::sleep(idle),
            idle,
        }
    }
}

impl<B> http_body::Body for IdleBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<crate::body::BoxError>,
{
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + *this.idle;
                this.sleep.as_mut().reset(next);
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no byte of the request body for {:?} (limits.body_idle_timeout)",
                        this.idle
                    ),
                ))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How much longer than `header_read_timeout` a connection without any request may stay.
const FIRST_REQUEST_MARGIN: Duration = Duration::from_secs(1);

/// Why a body could not be buffered.
enum BodyError {
    /// Over its size limit.
    TooLarge,
    /// Over the buffer budget or the address's share of it.
    Budget(Refused),
    /// The body clock or the framer stopped it (408 / 400; the connection ends).
    Violation(EdgeError),
    /// The worker broke it off.
    Failed(String),
}

impl BodyError {
    /// The answer (TooLarge is the caller's: its status depends on the endpoint).
    fn respond(self, gw: &Ingress, kind: ErrorKind, what: &str) -> Response<ProxyBody> {
        match self {
            BodyError::TooLarge => error(gw, EdgeError::new(kind, what.to_string())),
            BodyError::Budget(why) => error(gw, buffer_full(gw, why)),
            BodyError::Violation(v) => {
                // The connection's framing (or clock) is gone: it ends after this answer.
                let mut resp = error(gw, v);
                resp.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                resp
            }
            BodyError::Failed(e) => error(gw, EdgeError::new(kind, format!("{what}: {e}"))),
        }
    }
}

/// Bytes reserved from the buffer budget at a time for a body of unknown length.
const BUDGET_STEP: u64 = 64 * 1024;

/// Reads a whole body (buffered, so a retry sends the same bytes) within `limit` bytes, the
/// body clock (`limits.body_idle_timeout`) and the buffer budget: the returned ticket holds
/// its bytes under `limits.max_buffered_bytes` and the address's share until dropped. A
/// declared length is reserved, and allocated, at once — one buffer, handed back whole.
async fn buffer_body<'a>(
    gw: &'a Ingress,
    body: Incoming,
    limit: u64,
    addr: &'a WorkerAddr,
    http1: bool,
) -> Result<(Bytes, BodyBudget<'a>), BodyError> {
    let body = IdleBody::new(body, gw.config().limits.body_idle_timeout);
    tokio::pin!(body);
    let res = read_body(gw, body.as_mut(), limit, addr).await;
    if http1 && matches!(res, Err(BodyError::TooLarge | BodyError::Budget(_))) {
        // Refused while the worker is still sending: read the rest (discarded) for a moment,
        // so the refusal reaches it instead of a reset of the connection.
        let drain = async {
            let mut seen = 0u64;
            while let Some(Ok(frame)) = body.as_mut().frame().await {
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if seen > limit {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_REFUSED_BODY, drain).await;
    }
    res
}

/// How long a refused HTTP/1 request body is read (and discarded) before the refusal is sent.
const DRAIN_REFUSED_BODY: Duration = Duration::from_secs(5);

async fn read_body<'a>(
    gw: &'a Ingress,
    mut body: std::pin::Pin<&mut IdleBody<Incoming>>,
    limit: u64,
    addr: &'a WorkerAddr,
) -> Result<(Bytes, BodyBudget<'a>), BodyError> {
    let hint = http_body::Body::size_hint(&*body);
    let declared = hint.exact();
    if declared.is_some_and(|n| n > limit) || hint.lower() > limit {
        return Err(BodyError::TooLarge);
    }
    let first = declared.unwrap_or(0);
    let mut ticket = gw
        .admission()
        .buffer(addr, first)
        .map_err(BodyError::Budget)?;
    let mut reserved = first;
    let mut buf = bytes::BytesMut::with_capacity(first as usize);
    while let Some(frame) = body.as_mut().frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                return Err(match body_violation(&*e) {
                    Some(v) => BodyError::Violation(v),
                    None => BodyError::Failed(e.to_string()),
                })
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not forwarded
        };
        let total = buf.len() as u64 + data.len() as u64;
        if total > limit {
            return Err(BodyError::TooLarge);
        }
        if total > reserved {
            let more = (total - reserved).max(BUDGET_STEP).min(limit - reserved);
            ticket.grow(more).map_err(BodyError::Budget)?;
            reserved += more;
        }
        buf.extend_from_slice(&data);
    }
    Ok((buf.freeze(), ticket))
}

/// After the idle clock closes a connection gracefully (HTTP/2 GOAWAY), how long it may take
/// to finish before it is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Runs a worker connection to its end; when shutdown starts, asks it to finish gracefully
/// (HTTP/2 GOAWAY; HTTP/1 closes after the response in flight) and keeps driving it.
///
/// The connection's own lines name `span` (`worker{peer}` or `tunnel{target}`) as their
/// parent; the connection is not run inside it, since entering a span on every poll of every
/// connection cost about 600 instructions a request. Each request's span has it as parent, so
/// a request's lines carry both.
async fn drive<C, E>(gw: &Ingress, conn: C, watch: &ConnWatch, span: &tracing::Span)
where
    C: std::future::Future<Output = Result<(), E>> + GracefulConn,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let limits = &gw.config().limits;
    let result = tokio::select! {
        r = conn.as_mut() => r,
        // Before the first request the clock runs 1 s past header_read_timeout, so that an
        // HTTP/1 worker gets the framer's 408 first; HTTP/2 has no such answer to wait for.
        _ = watch.idle(limits.header_read_timeout + FIRST_REQUEST_MARGIN, limits.worker_idle_timeout) => {
            // Nothing under way for the whole limit: a slowloris (an HTTP/2 preface and
            // nothing, a HEADERS block never ended), an idle tunnel, or a worker that left its
            // connection open. GOAWAY / close, then drop whatever does not finish.
            tracing::debug!(parent: span, "worker connection idle past its limit: closing");
            conn.as_mut().begin_graceful();
            match tokio::time::timeout(IDLE_CLOSE_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
        _ = watch.tripped.notified() => {
            gw.telemetry().record_error(None, "rapid_reset");
            tracing::warn!(
                parent: span,
                cancelled = watch.cancelled.load(std::sync::atomic::Ordering::Relaxed),
                started = watch.started.load(std::sync::atomic::Ordering::Relaxed),
                "a worker cancelled most of its requests before their answers (HTTP/2 rapid reset): connection closed (limits.h2_max_cancelled_streams)"
            );
            return;
        }
        _ = gw.draining() => {
            conn.as_mut().begin_graceful();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(parent: span, "worker connection ended: {e}");
    }
}

/// hyper-util's connection types, which can be asked to shut down gracefully.
trait GracefulConn {
    fn begin_graceful(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E> GracefulConn for hyper_util::server::conn::auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, ProxyBody>,
{
    fn begin_graceful(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E> GracefulConn for hyper_util::server::conn::auto::Connection<'_, I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, ProxyBody>,
{
    fn begin_graceful(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Over `limits.max_connections_per_worker`: a plain HTTP/1.1 503 and close.
async fn refuse_connection(gw: &Ingress, mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let e = EdgeError::new(ErrorKind::WorkerConnectionLimit,
        format!(
            "this worker address already has limits.max_connections_per_worker ({}) connections open",
            gw.config().limits.max_connections_per_worker
        ),
    );
    gw.telemetry().record_error(None, e.token);
    let body = format!("{}\n", e.detail);
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nx-edgepool-error: {}\r\nretry-after: 1\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
        e.token,
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// The answer to [`crate::h1guard`]'s stand-in for a refused request head, if `req` is one.
fn violation_response(
    gw: &Ingress,
    req: &Request<Incoming>,
    slot: &crate::h1guard::ViolationSlot,
) -> Option<Response<ProxyBody>> {
    if !req.headers().contains_key(crate::h1guard::VIOLATION_MARKER) {
        return None;
    }
    let v = slot
        .lock()
        .take()
        .unwrap_or_else(|| crate::h1guard::Violation {
            kind: ErrorKind::BadRequestHead,
            detail: "malformed request".into(),
            in_head: true,
        });
    let mut resp = error(gw, EdgeError::new(v.kind, v.detail));
    resp.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    Some(resp)
}

/// The 503 (with `Retry-After`) for a request over `limits.max_in_flight`: answered at once,
/// before the body is read or a connection waited for.
fn in_flight_full(gw: &Ingress, why: Refused) -> EdgeError {
    let l = &gw.config().limits;
    match why {
        Refused::Full => EdgeError::new(ErrorKind::Overloaded,
            format!(
                "edgepool has limits.max_in_flight ({}) requests in flight; retry shortly",
                l.max_in_flight
            ),
        ),
        Refused::Share => EdgeError::new(ErrorKind::WorkerShareLimit,
            format!(
                "this worker address has its share (limits.max_worker_share {}) of limits.max_in_flight ({}) in flight; retry shortly",
                l.max_worker_share, l.max_in_flight
            ),
        ),
    }
}

/// 503 for a body that does not fit the buffer budget (or the address's share of it).
fn buffer_full(gw: &Ingress, why: Refused) -> EdgeError {
    let l = &gw.config().limits;
    match why {
        Refused::Full => EdgeError::new(ErrorKind::MemoryBudget,
            format!(
                "edgepool buffers at most limits.max_buffered_bytes ({}) of request bodies at once; retry shortly",
                l.max_buffered_bytes
            ),
        ),
        Refused::Share => EdgeError::new(ErrorKind::WorkerShareLimit,
            format!(
                "this worker address buffers its share (limits.max_worker_share {}) of limits.max_buffered_bytes ({}); retry shortly",
                l.max_worker_share, l.max_buffered_bytes
            ),
        ),
    }
}

/// A body read that failed because [`crate::h1guard`] stopped it (bad chunk framing, or the
/// body stalled past `limits.body_idle_timeout`): the matching error.
fn body_violation(e: &(dyn std::error::Error + 'static)) -> Option<EdgeError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::TimedOut => Some(EdgeError::new(
                    ErrorKind::RequestBodyTimeout,
                    io.to_string(),
                )),
                std::io::ErrorKind::InvalidData => {
                    Some(EdgeError::new(ErrorKind::BadFraming, io.to_string()))
                }
                _ => None,
            };
        }
        cur = err.source();
    }
    None
}

/// Requests that already passed through more proxies than this (`Via` entries) are refused as
/// a probable loop between proxies.
pub const MAX_VIA_HOPS: usize = 8;

/// 508 `loop_detected` when the request's `Via` lists more than [`MAX_VIA_HOPS`] proxies.
fn via_loop(headers: &http::HeaderMap) -> Option<EdgeError> {
    let hops: usize = headers
        .get_all(http::header::VIA)
        .iter()
        .map(|v| v.as_bytes().split(|b| *b == b',').count())
        .sum();
    (hops > MAX_VIA_HOPS).then(|| {
        EdgeError::new(ErrorKind::LoopDetected, format!(
            "the request already passed through {hops} proxies (Via); more than {MAX_VIA_HOPS} is treated as a loop"
        ))
    })
}

async fn handle(
    gw: &Arc<Ingress>,
    req: Request<Incoming>,
    addr: &WorkerAddr,
) -> Response<ProxyBody> {
    if let Some(e) = via_loop(req.headers()) {
        return error(gw, e);
    }
    // Who is asking, and with which options (session, pool, rotation): from the proxy
    // username. Checked before anything else, for every kind of request.
    let worker = match gw
        .auth()
        .authenticate(req.headers().get(http::header::PROXY_AUTHORIZATION))
    {
        Ok(w) => w,
        Err(e) => return error(gw, EdgeError::new(e.kind(), e.to_string())),
    };
    // An HTTP/2 extended CONNECT (RFC 8441, a WebSocket) names a URL: forwarded like one.
    if req.method() == Method::CONNECT && !crate::upgrade::is_upgrade_request(&req) {
        // Options may also ride the CONNECT's own X-Edgepool-Session header (session,
        // mitm-off, pool for a blind tunnel).
        let worker = match request_worker(&worker, req.headers()) {
            Ok(w) => w,
            Err(e) => return error(gw, e),
        };
        // Boxed: the tunnel's future is large and rare; inline it would grow every plain
        // request's future (and the copies hyper makes of it) to its size.
        return Box::pin(handle_connect(gw.clone(), req, worker, addr.clone())).await;
    }
    // Overload: refuse at once, before reading a body or waiting for a connection.
    let _in_flight = match gw.admission().request(addr) {
        Ok(t) => t,
        Err(why) => return error(gw, in_flight_full(gw, why)),
    };
    let uri = req.uri();
    let scheme = uri.scheme_str().map(|s| match s {
        "http" => Ok(Scheme::Http),
        "https" => Ok(Scheme::Https),
        other => Err(other.to_string()),
    });
    // A host of dots only ("http://./") normalizes to nothing: no host at all.
    let host = uri.host().map(normalize_host).filter(|h| !h.is_empty());
    match scheme {
        Some(Err(other)) => error(
            gw,
            EdgeError::new(
                ErrorKind::UnsupportedScheme,
                format!("edgepool forwards http:// and https:// URLs, not {other}://"),
            ),
        ),
        Some(Ok(scheme)) => {
            let Some(host) = host else {
                return error(
                    gw,
                    EdgeError::new(ErrorKind::BadTarget, "the request URL has no host"),
                );
            };
            let port = uri.port_u16().unwrap_or(scheme.default_port());
            forward_worker_request(gw, req, scheme, host, port, &worker, addr).await
        }
        None if req.uri().path() == "/v1/fetch" => {
            if req.method() != Method::POST {
                return error(
                    gw,
                    EdgeError::new(
                        ErrorKind::MethodNotAllowed,
                        "use POST /v1/fetch with a JSON body",
                    ),
                );
            }
            Box::pin(fetch(gw, req, worker, addr)).await // boxed, as handle_connect
        }
        None => error(
            gw,
            EdgeError::new(
                ErrorKind::NotAProxyRequest,
                "edgepool is a forward proxy: send absolute-form requests (http://host/path), \
                 CONNECT host:port, or POST /v1/fetch",
            ),
        ),
    }
}

fn error(gw: &Ingress, e: EdgeError) -> Response<ProxyBody> {
    gw.telemetry().record_error(None, e.token);
    e.to_response()
}

/// The host as the one URL parser (WHATWG, the `url` crate) reads it: lower-case, IDNA, and
/// every IPv4 spelling (`2130706433`, `0x7f.1`, `017700000001`) turned into the address it
/// means, so the target policy checks what would really be dialed; brackets and a trailing dot
/// removed.
fn normalize_host(host: &str) -> Arc<str> {
    if already_canonical(host) {
        // Most targets: skips the WHATWG parser and the address formatting (about 4,600
        // instructions a request).
        return Arc::from(host);
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let canonical = if bare.contains(':') {
        None // an IPv6 literal: already canonical once parsed as an address
    } else {
        url::Host::parse(bare).ok().map(|h| h.to_string())
    };
    Arc::from(
        canonical
            .unwrap_or_else(|| bare.to_string())
            .trim_end_matches('.')
            .to_ascii_lowercase(),
    )
}

/// Whether `host` is already what [`normalize_host`]'s WHATWG parse would make of it: a
/// dotted-quad IPv4 address in its one canonical spelling (no leading zeros), or a lower-case
/// ASCII name (`a-z`, `0-9`, `-`, non-empty dot-separated labels, no `xn--` label to check)
/// whose last label does not make the host an IPv4 number (all digits, or `0x…`). Anything
/// else takes the full parse.
fn already_canonical(host: &str) -> bool {
    // One pass over the bytes (splitting into labels four times cost ~1,200 instructions a
    // request): every label checked as it ends.
    let b = host.as_bytes();
    let mut labels = 0usize;
    let mut all_octets = true; // every label so far is a canonical decimal octet
    let mut start = 0;
    for i in 0..=b.len() {
        if let Some(&c) = b.get(i) {
            if c != b'.' {
                if !matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'-') {
                    return false;
                }
                continue;
            }
        }
        let label = &b[start..i];
        if label.is_empty() || label.starts_with(b"xn--") {
            return false;
        }
        labels += 1;
        all_octets &= is_canonical_octet(label);
        if i < b.len() {
            start = i + 1;
        }
    }
    let last = &b[start..];
    if last.iter().all(u8::is_ascii_digit) {
        // Ends in a number: an IPv4 address, canonical only as four decimal octets.
        return labels == 4 && all_octets;
    }
    !last.starts_with(b"0x")
}

/// `0`..=`255` written without leading zeros.
fn is_canonical_octet(label: &[u8]) -> bool {
    match label {
        [b'0'] => true,
        [b'1'..=b'9', rest @ ..] if rest.len() <= 2 && rest.iter().all(u8::is_ascii_digit) => {
            label.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0')) <= 255
        }
        _ => false,
    }
}

/// The worker's options for one request: its connection's (proxy username) overlaid with the
/// request's `X-Edgepool-Session` header, if any.
fn request_worker(
    base: &crate::worker::Worker,
    headers: &HeaderMap,
) -> Result<crate::worker::Worker, EdgeError> {
    let mut w = base.clone();
    if let Some(v) = headers.get(crate::worker::SESSION_HEADER) {
        let o = crate::worker::parse_session_header(v.as_bytes())
            .map_err(|e| EdgeError::new(ErrorKind::BadSessionHeader, e.to_string()))?;
        w.options.overlay(&o);
    }
    Ok(w)
}

/// Buffers the worker's body (bounded), cleans headers and forwards.
async fn forward_worker_request(
    gw: &Arc<Ingress>,
    req: Request<Incoming>,
    scheme: Scheme,
    host: Arc<str>,
    port: u16,
    worker: &crate::worker::Worker,
    addr: &WorkerAddr,
) -> Response<ProxyBody> {
    let worker = match request_worker(worker, req.headers()) {
        Ok(w) => w,
        Err(e) => return error(gw, e),
    };
    if crate::upgrade::is_upgrade_request(&req) {
        // Boxed, as `handle_connect`: rare, and large inline.
        return Box::pin(forward_upgrade(
            gw.clone(),
            req,
            scheme,
            host.to_string(),
            port,
            worker,
            addr.clone(),
        ))
        .await;
    }
    let (parts, body) = req.into_parts();
    let limit = gw.config().limits.max_request_body;
    // Held until the request is done: the buffered body lives as long (a retry resends it).
    let http1 = parts.version < http::Version::HTTP_2;
    let (body, _budget) = match buffer_body(gw, body, limit, addr, http1).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return error(gw, EdgeError::body_too_large(limit)),
        Err(e) => {
            return e.respond(
                gw,
                ErrorKind::WorkerBodyFailed,
                "reading the request body failed",
            )
        }
    };
    let mut headers = parts.headers;
    clean_request_headers(&mut headers);
    // The body is already here: the target must not wait for a 100-continue.
    headers.remove(http::header::EXPECT);
    // The worker's path as hyper parsed it (a slice of its buffer: nothing copied). An empty
    // one (`http://h`, `http://h#f`) goes out as `/`, and a bare query (`http://h?q`) as `/?q`
    // (RFC 9112 §3.2.1: origin form starts with `/`). `as_str` shows an empty path as `/`.
    let path = match http::uri::Parts::from(parts.uri).path_and_query {
        Some(p) if p.as_str() != "/" && p.as_str().starts_with('/') => p,
        Some(p) if p.as_str().starts_with('?') => {
            match http::uri::PathAndQuery::try_from(format!("/{}", p.as_str())) {
                Ok(p) => p,
                Err(e) => {
                    return error(
                        gw,
                        EdgeError::new(ErrorKind::BadTarget, format!("the request URL: {e}")),
                    )
                }
            }
        }
        _ => http::uri::PathAndQuery::from_static("/"),
    };
    let out = Outgoing {
        method: parts.method,
        scheme,
        host,
        port,
        path,
        headers,
        body,
        worker,
    };
    match gw.forwarder().forward(out).await {
        Ok((resp, _meta)) => resp,
        Err(e) => e.to_response(),
    }
}

/// An upgrade request (WebSocket): a place under `limits.max_tunnels` first (an upgraded
/// connection is a tunnel; inside a CONNECT tunnel it shares that tunnel's place), then
/// [`crate::upgrade::forward`].
async fn forward_upgrade(
    gw: Arc<Ingress>,
    req: Request<Incoming>,
    scheme: Scheme,
    host: String,
    port: u16,
    worker: crate::worker::Worker,
    addr: WorkerAddr,
) -> Response<ProxyBody> {
    let place = match req.extensions().get::<TunnelPlace>() {
        Some(p) => p.clone(),
        None => match gw.admission().tunnel(&addr) {
            Ok(t) => TunnelPlace(Arc::new(t)),
            Err(why) => {
                gw.upgrades().record(crate::upgrade::Outcome::Refused);
                let mut resp = error(&gw, tunnel_full(&gw, why));
                if req.version() < http::Version::HTTP_2 {
                    resp.headers_mut()
                        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                }
                return resp;
            }
        },
    };
    // Held while the upgraded connection lives: the worker connection's place (an HTTP/1
    // connection ends as HTTP once upgraded) and, on HTTP/2, the connection's idle clock.
    let hold: Box<dyn Send + Sync> = Box::new((
        place,
        req.extensions().get::<WorkerPlace>().cloned(),
        req.extensions().get::<ConnHold>().map(|c| c.0.open()),
    ));
    let target = crate::upgrade::Target { scheme, host, port };
    crate::upgrade::forward(gw.upgrades.clone(), req, target, worker, hold).await
}

/// 503 for a tunnel (or upgraded connection) over `limits.max_tunnels` or the address's share.
fn tunnel_full(gw: &Ingress, why: Refused) -> EdgeError {
    let l = &gw.config().limits;
    match why {
        Refused::Full => EdgeError::new(ErrorKind::TunnelLimit,
            format!(
                "edgepool has limits.max_tunnels ({}) CONNECT tunnels open; retry shortly",
                l.max_tunnels
            ),
        ),
        Refused::Share => EdgeError::new(ErrorKind::WorkerShareLimit,
            format!(
                "this worker address holds its share (limits.max_worker_share {}) of limits.max_tunnels ({}); retry shortly",
                l.max_worker_share, l.max_tunnels
            ),
        ),
    }
}

async fn handle_connect(
    gw: Arc<Ingress>,
    req: Request<Incoming>,
    worker: crate::worker::Worker,
    worker_addr: WorkerAddr,
) -> Response<ProxyBody> {
    let (host, port) = match connect_target(&gw, &req) {
        Ok(t) => t,
        Err(e) => return error(&gw, e),
    };
    // Resolve and check now, so a forbidden or unknown target fails at CONNECT with a clear
    // status instead of inside TLS.
    let addr = match gw.forwarder().resolve_checked(&host, port).await {
        Ok((addr, _)) => addr,
        Err(e) => return error(&gw, e),
    };
    let worker_place = req.extensions().get::<WorkerPlace>().cloned();
    let tunnel_place = match gw.admission().tunnel(&worker_addr) {
        Ok(t) => t,
        Err(why) => return error(&gw, tunnel_full(&gw, why)),
    };
    let places = (tunnel_place, worker_place);
    let icfg = &gw.config().intercept;
    if !icfg.enabled || icfg.is_passthrough(&host) || worker.options.mitm_off {
        return tunnel(gw, req, &host, port, addr, &worker, places).await;
    }
    let server_cfg = match leaf_config(&gw, &host).await {
        Ok(c) => c,
        Err(e) => return error(&gw, e),
    };
    tokio::spawn(
        async move {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    let tunnel = Tunnel {
                        host,
                        port,
                        worker,
                        addr: worker_addr,
                        places,
                    };
                    intercept(gw, upgraded, server_cfg, tunnel).await
                }
                Err(e) => tracing::debug!("CONNECT upgrade failed: {e}"),
            }
        }
        .in_current_span(),
    );
    Response::new(full_body(Bytes::new()))
}

/// A CONNECT's `host:port`, checked: an explicit port the configuration allows, a host.
fn connect_target(gw: &Ingress, req: &Request<Incoming>) -> Result<(String, u16), EdgeError> {
    let Some(auth) = req.uri().authority() else {
        return Err(EdgeError::new(
            ErrorKind::BadConnectTarget,
            "CONNECT needs host:port",
        ));
    };
    let Some(port) = auth.port_u16() else {
        return Err(EdgeError::new(
            ErrorKind::BadConnectTarget,
            "CONNECT needs an explicit port (host:port)",
        ));
    };
    if !gw.config().targets.connect_port_allowed(port) {
        return Err(EdgeError::connect_port_forbidden(port));
    }
    let host = normalize_host(auth.host());
    if host.is_empty() {
        return Err(EdgeError::new(
            ErrorKind::BadConnectTarget,
            "the CONNECT target has no host",
        ));
    }
    Ok((host.to_string(), port))
}

/// The TLS server side for an intercepted `host`, with its leaf certificate.
async fn leaf_config(gw: &Ingress, host: &str) -> Result<Arc<rustls::ServerConfig>, EdgeError> {
    gw.leaves().server_config(host).await.map_err(|e| match e {
        e @ crate::ca::CaError::InvalidHost { .. } => {
            EdgeError::new(ErrorKind::BadConnectTarget, e.to_string())
        }
        e => EdgeError::new(
            ErrorKind::InternalError,
            format!("leaf certificate for {host}: {e}"),
        ),
    })
}

/// An accepted CONNECT that edgepool serves itself: its target, its worker and the places it
/// holds while it lives.
struct Tunnel {
    host: String,
    port: u16,
    worker: crate::worker::Worker,
    /// The worker address's admission entry (the tunnel's requests are counted there).
    addr: WorkerAddr,
    places: (crate::admission::Ticket, Option<WorkerPlace>),
}

/// Serves an intercepted CONNECT after its `200`: TLS (with the leaf) if the worker's first
/// byte opens a handshake, plain HTTP otherwise; requests inside go to the CONNECT's target.
async fn intercept(
    gw: Arc<Ingress>,
    upgraded: hyper::upgrade::Upgraded,
    server_cfg: Arc<rustls::ServerConfig>,
    t: Tunnel,
) {
    let host = &t.host;
    // One clock from the 200 to the end of the worker's TLS handshake: the wait for the first
    // byte (is it TLS?) is part of it.
    let deadline = tokio::time::Instant::now() + WORKER_TLS_TIMEOUT;
    let mut io = TokioIo::new(upgraded);
    let mut first = [0u8; 1];
    let n = {
        use tokio::io::AsyncReadExt;
        match tokio::time::timeout_at(deadline, io.read(&mut first)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::debug!(host = %host, "tunnel read failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(host = %host, "nothing sent inside the tunnel: closed");
                return;
            }
        }
    };
    if n == 0 {
        return;
    }
    let io = Rewind::new(Bytes::copy_from_slice(&first), io);
    if first[0] != TLS_HANDSHAKE_RECORD {
        // Plaintext inside the tunnel (ws://, http:// sent through CONNECT): HTTP/1 or h2c,
        // served as plain http to the CONNECT's target and pooled as such.
        serve_tunnel(gw, io, Scheme::Http, t).await;
        return;
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(io)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(host = %host, "worker TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(host = %host, "worker TLS handshake timed out");
            return;
        }
    };
    serve_tunnel(gw, tls, Scheme::Https, t).await;
}

/// The first byte of a TLS connection: a handshake record (ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Serves the requests inside an intercepted tunnel (decrypted TLS, or plaintext) until it
/// ends: every request goes to the CONNECT's `host:port` with `scheme`, through the pool.
/// The tunnel's places (tunnel, worker connection) are held until then.
async fn serve_tunnel<S>(gw: Arc<Ingress>, stream: S, scheme: Scheme, t: Tunnel)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Tunnel {
        host,
        port,
        worker,
        addr,
        places,
    } = t;
    // Held by the service (the worker's place) and by `TunnelConn` (the tunnel's) while the
    // tunnel lives; an upgrade inside the tunnel is the tunnel: it shares the tunnel's place.
    let (tunnel_place, worker_place) = places;
    let tunnel_place = TunnelPlace(Arc::new(tunnel_place));
    let conn_span =
        tracing::info_span!("tunnel", target = %crate::exits::authority(&host, port), ?scheme);
    let (io, slot, watch) = guarded(&gw, stream, &conn_span);
    let conn_span2 = conn_span.clone();
    // What the tunnel's requests share: one reference count per request.
    let tc = Arc::new(TunnelConn {
        _place: tunnel_place.clone(),
        gw: gw.clone(),
        host: Arc::from(host),
        worker,
        addr,
        slot,
        watch: watch.clone(),
    });
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let c = tc.clone();
        let span = request_span(&conn_span2, &req);
        if crate::upgrade::is_upgrade_request(&req) {
            if let Some(p) = &worker_place {
                req.extensions_mut().insert(p.clone());
            }
            req.extensions_mut().insert(ConnHold(c.watch.clone()));
            req.extensions_mut().insert(tunnel_place.clone());
        }
        async move {
            let gw = &c.gw;
            if let Some(resp) = violation_response(gw, &req, &c.slot) {
                return Ok::<_, Infallible>(resp);
            }
            let h1_upgrade = h1_upgrade(&req);
            if req.method() == Method::CONNECT && !crate::upgrade::is_upgrade_request(&req) {
                let mut resp = error(
                    gw,
                    EdgeError::new(
                        ErrorKind::NestedConnect,
                        "CONNECT inside an intercepted tunnel",
                    ),
                );
                resp.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                return Ok(resp);
            }
            // Every answer from here on, refusals included, passes the upgrade check below.
            let fwd = async {
                let _in_flight = match gw.admission().request(&c.addr) {
                    Ok(t) => t,
                    Err(why) => return error(gw, in_flight_full(gw, why)),
                };
                // Requests inside an intercepted tunnel (HTTP/1.1 and HTTP/2) never pass
                // `handle`: the hop cap applies here too.
                if let Some(e) = via_loop(req.headers()) {
                    return error(gw, e);
                }
                forward_worker_request(gw, req, scheme, c.host.clone(), port, &c.worker, &c.addr)
                    .await
            };
            // Boxed once, as in `serve_worker`: hyper moves the service future into place.
            let mut resp = answer(&c.watch, Box::pin(fwd)).await;
            if h1_upgrade && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                // The framer let what follows the upgrade head through unparsed (a refused
                // upgrade, whatever refused it, ends the connection).
                resp.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(resp)
        }
        .instrument(span)
    });
    let builder = gw.worker_builder();
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    drive(&gw, conn, &watch, &conn_span).await;
}

/// What an intercepted tunnel's requests share (as [`WorkerConn`] for a worker connection).
/// It holds the tunnel's place: a request still running after the tunnel's connection ended
/// keeps the tunnel's share, and the address's entry, taken.
struct TunnelConn {
    _place: TunnelPlace,
    gw: Arc<Ingress>,
    host: Arc<str>,
    worker: crate::worker::Worker,
    addr: WorkerAddr,
    slot: crate::h1guard::ViolationSlot,
    watch: Arc<ConnWatch>,
}

/// A stream with bytes already read from it put back in front.
struct Rewind<T> {
    head: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    fn new(head: Bytes, inner: T) -> Self {
        Rewind { head, inner }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.head.is_empty() {
            let n = buf.remaining().min(self.head.len());
            let head = self.head.split_to(n);
            buf.put_slice(&head);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A blind tunnel: bytes both ways, no pooling (counted apart). It still leaves through the
/// worker's exit (routed like a request to `host:port`), with the same failover on a dead
/// node.
async fn tunnel(
    gw: Arc<Ingress>,
    req: Request<Incoming>,
    host: &str,
    port: u16,
    addr: std::net::SocketAddr,
    worker: &crate::worker::Worker,
    place: (crate::admission::Ticket, Option<WorkerPlace>),
) -> Response<ProxyBody> {
    let (opened, exit) = match gw
        .forwarder()
        .open_dedicated(host, port, addr, worker)
        .await
    {
        Ok(o) => o,
        Err(e) => return error(&gw, e),
    };
    gw.telemetry().record_tunnel();
    tokio::spawn(async move {
        let _place = place; // tunnel and worker places held while the tunnel lives
        let crate::dial::Opened {
            stream: mut upstream,
            slot: _slot, // the exit's budget is held while the tunnel lives
            early,
            ..
        } = opened;
        match hyper::upgrade::on(req).await {
            Ok(up) => {
                let mut up = TokioIo::new(up);
                // A server that speaks first (SSH, SMTP) may have sent its banner with the
                // proxy's answer.
                if !early.is_empty() {
                    use tokio::io::AsyncWriteExt;
                    if up.write_all(&early).await.is_err() {
                        return;
                    }
                }
                // A blind tunnel has a clock too: nothing either way for
                // limits.worker_idle_timeout ends it (and gives its tunnel place back).
                let idle = gw.config().limits.worker_idle_timeout;
                let mut up = crate::splice::ActivityIo::new(up);
                let last = up.last();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut up, &mut upstream) => {}
                    _ = crate::splice::idle_for(&last, idle) => {
                        tracing::debug!("blind tunnel idle past limits.worker_idle_timeout: closed");
                    }
                }
            }
            Err(e) => tracing::debug!("CONNECT upgrade failed: {e}"),
        }
    }
    .in_current_span());
    let mut resp = Response::new(full_body(Bytes::new()));
    if let Ok(v) = HeaderValue::from_str(&exit) {
        resp.headers_mut()
            .insert(crate::headers::X_EDGEPOOL_EXIT, v);
    }
    resp
}

/// A `/v1/fetch` document as the endpoint reads it: the JSON, then the request it describes,
/// checked against `limits` (public for the fuzz target: untrusted input end to end).
pub fn parse_fetch_document(
    raw: &[u8],
    limits: &crate::config::LimitsConfig,
) -> Result<Outgoing, EdgeError> {
    parse_fetch(raw, limits, crate::worker::Worker::default()).map(|(_, out)| out)
}

fn parse_fetch(
    raw: &[u8],
    limits: &crate::config::LimitsConfig,
    worker: crate::worker::Worker,
) -> Result<(FetchRequest, Outgoing), EdgeError> {
    let doc: FetchRequest = serde_json::from_slice(raw).map_err(|e| {
        EdgeError::new(
            ErrorKind::FetchBadJson,
            format!("invalid fetch request: {e}"),
        )
    })?;
    let out = fetch_outgoing(&doc, limits, worker)?;
    Ok((doc, out))
}

/// `POST /v1/fetch` request document.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchRequest {
    url: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    headers: Option<FetchHeaders>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    body_base64: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// Headers as an object (`{"a": "b"}`) or a list of pairs (`[["a","b"]]`, repeats allowed).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FetchHeaders {
    Map(std::collections::BTreeMap<String, String>),
    List(Vec<(String, String)>),
}

async fn fetch(
    gw: &Arc<Ingress>,
    req: Request<Incoming>,
    worker: crate::worker::Worker,
    addr: &WorkerAddr,
) -> Response<ProxyBody> {
    let worker = match request_worker(&worker, req.headers()) {
        Ok(w) => w,
        Err(e) => return error(gw, e),
    };
    let limit = gw.config().limits.max_fetch_json;
    let http1 = req.version() < http::Version::HTTP_2;
    let (raw, _budget) = match buffer_body(gw, req.into_body(), limit, addr, http1).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return error(gw, EdgeError::fetch_too_large(limit)),
        Err(e) => {
            return e.respond(
                gw,
                ErrorKind::FetchBodyUnreadable,
                "the JSON document could not be read",
            )
        }
    };
    let (doc, out) = match parse_fetch(&raw, &gw.config().limits, worker) {
        Ok(v) => v,
        Err(e) => return error(gw, e),
    };
    let started = tokio::time::Instant::now();
    let work = async {
        let (resp, meta) = gw.forwarder().forward(out).await?;
        let (parts, body) = resp.into_parts();
        let body = collect_response(body, limit).await?;
        Ok::<_, EdgeError>((parts, body, meta))
    };
    let result = match doc.timeout_ms {
        Some(ms) => match tokio::time::timeout(Duration::from_millis(ms), work).await {
            Ok(r) => r,
            Err(_) => Err(EdgeError::new(
                ErrorKind::UpstreamResponseTimeout,
                format!("fetch did not finish within timeout_ms ({ms})"),
            )),
        },
        None => work.await,
    };
    let (parts, body, meta) = match result {
        Ok(x) => x,
        Err(e) => return e.to_response(),
    };
    let mut headers = serde_json::Map::new();
    for (k, v) in parts.headers.iter() {
        if k.as_str().starts_with("x-edgepool-") {
            continue;
        }
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match headers.get_mut(k.as_str()) {
            Some(serde_json::Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                headers.insert(k.as_str().to_string(), v.into());
            }
        }
    }
    let ms = |d: Duration| (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
    let mut doc = serde_json::json!({
        "status": parts.status.as_u16(),
        "headers": headers,
        "reused": meta.reused,
        "exit": &*meta.exit,
        "session_renewed": meta.session_renewed,
        "protocol": meta.protocol,
        "new_connection_reason": meta.new_reason.map(|r| r.as_str()),
        "timings": {
            "dns_ms": ms(meta.dns),
            "queue_ms": ms(meta.queue),
            "tcp_connect_ms": ms(meta.tcp_connect),
            "exit_handshake_ms": ms(meta.exit_handshake),
            "tls_handshake_ms": ms(meta.tls_handshake),
            "ttfb_ms": ms(meta.ttfb),
            "total_ms": ms(started.elapsed()),
        },
    });
    match std::str::from_utf8(&body) {
        Ok(s) => doc["body"] = s.into(),
        Err(_) => {
            doc["body_base64"] = base64::engine::general_purpose::STANDARD
                .encode(&body)
                .into()
        }
    }
    let mut resp = Response::new(full_body(doc.to_string()));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(
        crate::headers::X_EDGEPOOL_REUSED,
        HeaderValue::from_static(if meta.reused { "1" } else { "0" }),
    );
    *resp.status_mut() = StatusCode::OK;
    resp
}

fn fetch_outgoing(
    doc: &FetchRequest,
    limits: &crate::config::LimitsConfig,
    worker: crate::worker::Worker,
) -> Result<Outgoing, EdgeError> {
    let max_body = limits.max_request_body;
    let url = url::Url::parse(&doc.url)
        .map_err(|e| EdgeError::new(ErrorKind::FetchBadUrl, format!("url {:?}: {e}", doc.url)))?;
    let scheme = match url.scheme() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        s => {
            return Err(EdgeError::new(
                ErrorKind::UnsupportedScheme,
                format!("url scheme {s} is not http or https"),
            ))
        }
    };
    let host = url
        .host_str()
        .map(normalize_host)
        .filter(|h| !h.is_empty())
        .ok_or_else(|| EdgeError::new(ErrorKind::FetchBadUrl, "url has no host"))?;
    let port = url.port().unwrap_or(scheme.default_port());
    let mut path = url.path().to_string();
    if let Some(q) = url.query() {
        path.push('?');
        path.push_str(q);
    }
    let path = http::uri::PathAndQuery::from_maybe_shared(Bytes::from(path)).map_err(|e| {
        EdgeError::new(
            ErrorKind::FetchBadUrl,
            format!(
                "url {:?}: its path is not a valid request target: {e}",
                doc.url
            ),
        )
    })?;
    let method = match &doc.method {
        Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
            EdgeError::new(
                ErrorKind::FetchBadMethod,
                format!("method {m:?} is not valid"),
            )
        })?,
        None => Method::GET,
    };
    let mut headers = HeaderMap::new();
    let pairs: Vec<(String, String)> = match &doc.headers {
        None => Vec::new(),
        Some(FetchHeaders::Map(m)) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Some(FetchHeaders::List(l)) => l.clone(),
    };
    // The same head limits as a proxied request (431): the JSON carries a head all the same.
    let too_large = |what: String| EdgeError::new(ErrorKind::RequestHeaderTooLarge, what);
    if pairs.len() > limits.max_headers {
        return Err(too_large(format!(
            "{} header fields; limits.max_headers is {}",
            pairs.len(),
            limits.max_headers
        )));
    }
    // Counted as on the wire: "name: value\r\n" per field, plus the request line.
    let head_bytes: usize = doc.url.len()
        + 16
        + pairs
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>();
    if head_bytes > limits.max_header_bytes {
        return Err(too_large(format!(
            "the request head would be {head_bytes} bytes; limits.max_header_bytes is {}",
            limits.max_header_bytes
        )));
    }
    for (k, v) in pairs {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
            EdgeError::new(
                ErrorKind::FetchBadHeader,
                format!("header name {k:?} is not valid"),
            )
        })?;
        let value = HeaderValue::from_str(&v).map_err(|_| {
            EdgeError::new(
                ErrorKind::FetchBadHeader,
                format!("header {k} has an invalid value"),
            )
        })?;
        headers.append(name, value);
    }
    clean_request_headers(&mut headers);
    headers.remove(http::header::CONTENT_LENGTH);
    let body = match (&doc.body, &doc.body_base64) {
        (Some(_), Some(_)) => {
            return Err(EdgeError::new(
                ErrorKind::FetchBadBody,
                "give either body or body_base64, not both",
            ))
        }
        (Some(s), None) => Bytes::from(s.clone()),
        (None, Some(b)) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| {
                    EdgeError::new(ErrorKind::FetchBadBody, format!("body_base64: {e}"))
                })?,
        ),
        (None, None) => Bytes::new(),
    };
    if body.len() as u64 > max_body {
        return Err(EdgeError::body_too_large(max_body));
    }
    Ok(Outgoing {
        method,
        scheme,
        host,
        port,
        path,
        headers,
        body,
        worker,
    })
}

/// Reads a whole response body, at most `limit` bytes.
async fn collect_response(mut body: ProxyBody, limit: u64) -> Result<Bytes, EdgeError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            EdgeError::new(
                ErrorKind::UpstreamBadResponse,
                format!("reading the target's response failed: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if (buf.len() + data.len()) as u64 > limit {
                return Err(EdgeError::new(
                    ErrorKind::UpstreamBadResponse,
                    format!(
                    "the target's response is larger than limits.max_fetch_json ({limit} bytes)"
                ),
                ));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The full parse, without the fast path.
    fn parsed(host: &str) -> String {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        url::Host::parse(bare)
            .map(|h| h.to_string())
            .unwrap_or_else(|_| bare.to_string())
            .trim_end_matches('.')
            .to_ascii_lowercase()
    }

    #[test]
    fn fast_path_agrees_with_the_whatwg_parse() {
        let fast = [
            "example.com",
            "a-b.c0.test",
            "localhost",
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "10.20.30.40",
            "1.2.3.4.example",
        ];
        for h in fast {
            assert!(already_canonical(h), "{h} should take the fast path");
            assert_eq!(&*normalize_host(h), parsed(h), "{h}");
        }
        // Each of these means something else once parsed (or may): the full parse decides.
        let slow = [
            "Example.com",
            "example.com.",
            "2130706433",
            "0x7f.1",
            "017700000001",
            "127.000.0.1",
            "127.0.0.01",
            "256.1.1.1",
            "1.2.3",
            "1.2.3.4.5",
            "a.0x1f",
            "xn--nxasmq6b.test",
            "a..b",
            ".a",
            "",
            "[::1]",
            "b\u{fc}cher.test",
        ];
        for h in slow {
            assert!(!already_canonical(h), "{h} must take the full parse");
        }
        assert_eq!(&*normalize_host("0x7f.1"), "127.0.0.1");
        assert_eq!(&*normalize_host("127.000.0.1"), "127.0.0.1");
    }

    /// The label-by-label statement of [`already_canonical`]'s rule (its earlier, slower
    /// implementation): the one-pass version must agree with it on every string.
    fn already_canonical_by_labels(host: &str) -> bool {
        let b = host.as_bytes();
        if b.is_empty()
            || !b
                .iter()
                .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.'))
        {
            return false;
        }
        let labels = || host.split('.');
        if labels().any(|l| l.is_empty() || l.starts_with("xn--")) {
            return false;
        }
        let last = labels().next_back().unwrap_or("");
        if last.bytes().all(|c| c.is_ascii_digit()) {
            return labels().count() == 4
                && labels().all(|l| {
                    l.len() <= 3 && (l == "0" || !l.starts_with('0')) && l.parse::<u8>().is_ok()
                });
        }
        !last.starts_with("0x")
    }

    #[test]
    fn the_one_pass_check_agrees_with_the_label_rule_on_every_short_string() {
        // Every string of up to 6 characters over an alphabet that reaches each branch
        // (digits around 255, '0' and 'x' for leading zeros and hex, "xn--", an upper-case
        // letter, dots), plus longer dotted quads.
        let alphabet = ['0', '1', '2', '5', '6', '9', 'x', 'n', '-', '.', 'A'];
        let mut checked = 0;
        let mut s = String::new();
        fn walk(s: &mut String, depth: usize, alphabet: &[char], checked: &mut usize) {
            assert_eq!(
                already_canonical(s),
                already_canonical_by_labels(s),
                "{s:?}"
            );
            *checked += 1;
            if depth == 0 {
                return;
            }
            for &c in alphabet {
                s.push(c);
                walk(s, depth - 1, alphabet, checked);
                s.pop();
            }
        }
        walk(&mut s, 6, &alphabet, &mut checked);
        assert!(checked > 1_900_000, "{checked}");
        for h in [
            "1.22.255.0",
            "1.22.256.0",
            "192.168.100.200",
            "255.255.255.2555",
            "9.99.199.249",
            "1.2.3.04",
            "0.0.0.00",
            "a.xn--b",
            "xn--",
            "1.2.3.4.",
            "300.1.1.1",
        ] {
            assert_eq!(already_canonical(h), already_canonical_by_labels(h), "{h}");
        }
    }
}
