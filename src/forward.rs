//! forward: sends one worker request upstream over a pooled connection — resolve and check
//! the target, check out a connection, send, retry once when that is safe, and stream the
//! response back with the connection returned to the pool when the body ends.
//!
//! Retry rule (RFC 9110 §9.2.2): a request that fails on a *reused* connection before any
//! response byte arrived is retried once on a fresh connection if its method is idempotent
//! (or it carries `Idempotency-Key`), if no byte of it was written, or if an HTTP/2 server
//! refused the stream (REFUSED_STREAM / GOAWAY above the last stream id). Anything else is
//! never replayed: the worker gets a 502 saying whether the request may have been sent.
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use crate::body::{BoxError, ProxyBody};
use crate::dial::{DialError, Scheme, UpstreamConn, UpstreamKey};
use crate::dns::Resolver;
use crate::error::{EdgeError, ErrorKind, Sent};
use crate::exits::{authority, NodeOutcome};
use crate::guard::TargetPolicy;
use crate::headers::{clean_response_headers, parse_keep_alive};
use crate::pool::{
    CheckoutError, CheckoutOpts, CloseReason, Hints, Lease, NewReason, Pool, Release,
};
use crate::retry::{Attempt, Decision, Failure, SendFailure};
use crate::route::{Router, MAX_ADDR_FAILOVER, MAX_EXIT_FAILOVER};
use crate::telemetry::{ms, RequestRecord, Telemetry, TraceRecord};

/// The label of the direct exit (no upstream proxy).
pub const EXIT_DIRECT: &str = crate::exits::DIRECT;

/// Settings of the forwarder.
#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// How long a request waits for a connection.
    pub queue_timeout: Duration,
    /// How long to wait for the response head once the request is sent.
    pub response_header_timeout: Duration,
    /// Longest pause inside a response body before it is cut off (the target stalled).
    pub response_body_idle_timeout: Duration,
    /// When a worker leaves mid-response, read at most this many more bytes to keep the
    /// connection.
    pub drain_max_bytes: u64,
    /// ... for at most this long.
    pub drain_timeout: Duration,
    /// Hosts whose certificates are not verified (explicit opt-in).
    pub insecure_hosts: Vec<String>,
    /// Share of requests that may be retries (`limits.retry_budget`).
    pub retry_budget: f64,
}

/// A request ready to go upstream: hop-by-hop and `X-Edgepool-*` headers already removed,
/// body buffered (so a retry sends exactly the same bytes).
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Method.
    pub method: Method,
    /// Target scheme.
    pub scheme: Scheme,
    /// Target host (lower-case; IPv6 without brackets). Shared with the pool key, which
    /// clones it per request.
    pub host: Arc<str>,
    /// Target port.
    pub port: u16,
    /// Origin-form path and query (`/x?y`): cloning it shares its bytes.
    pub path: http::uri::PathAndQuery,
    /// Headers to send.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Who sent it and what they asked for (session, pool, rotation).
    pub worker: crate::worker::Worker,
}

impl Outgoing {
    /// `host:port` label.
    pub fn target(&self) -> String {
        authority(&self.host, self.port)
    }
    fn idempotent(&self) -> bool {
        matches!(
            self.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        ) || self.headers.contains_key("idempotency-key")
    }
}

/// What happened to a forwarded request, for the fetch API, headers and logs.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    /// Rode a warm connection.
    pub reused: bool,
    /// Why its connection was opened, if new.
    pub new_reason: Option<NewReason>,
    /// Exit label (`direct`, `pool/N`).
    pub exit: Arc<str>,
    /// The worker's session was moved to another exit (flex).
    pub session_renewed: bool,
    /// The worker's session id, if it named one (echoed in `X-Edgepool-Session`).
    pub session: Option<String>,
    /// `h2` / `http/1.1`.
    pub protocol: &'static str,
    /// Where the target's addresses came from (cache hit, stale, lookup, hosts file...).
    pub dns_source: Option<crate::dns::Source>,
    /// DNS resolution.
    pub dns: Duration,
    /// TCP connect of its connection (zero if reused).
    pub tcp_connect: Duration,
    /// Exit handshake (CONNECT / SOCKS5) of its connection (zero if reused or direct).
    pub exit_handshake: Duration,
    /// TLS handshake of its connection (zero if reused).
    pub tls_handshake: Duration,
    /// Waiting for a connection (includes dialing).
    pub queue: Duration,
    /// From sending the request to the response head.
    pub ttfb: Duration,
    /// Retried once on a fresh connection.
    pub retried: bool,
}

/// Records the exit and the address a request rides as fields `exit` and `addr` of its span
/// (`ingress` opens it at INFO), in one call, looking the span up only when INFO is enabled at
/// all. Called when the route is chosen and again whenever the exit or the address changes
/// (the `fmt` layer appends the new values).
fn record_route(exit: &str, addr: SocketAddr) {
    if !tracing::enabled!(tracing::Level::INFO) {
        return;
    }
    let span = tracing::Span::current();
    let Some(meta) = span.metadata() else { return };
    let fields = meta.fields();
    let (Some(e), Some(a)) = (fields.field("exit"), fields.field("addr")) else {
        return;
    };
    let exit = tracing::field::display(exit);
    let addr = tracing::field::display(AddrText(addr));
    span.record_all(&fields.value_set(&[
        (&e, Some(&exit as &dyn tracing::Value)),
        (&a, Some(&addr as &dyn tracing::Value)),
    ]));
}

/// A socket address written as `Display` writes it, IPv4 without the formatting machinery
/// (a span records the address on every request).
struct AddrText(SocketAddr);

impl std::fmt::Display for AddrText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let SocketAddr::V4(a) = self.0 else {
            return self.0.fmt(f);
        };
        let mut digits = itoa::Buffer::new();
        for (i, octet) in a.ip().octets().into_iter().enumerate() {
            f.write_str(digits.format(octet))?;
            f.write_str(if i < 3 { "." } else { ":" })?;
        }
        f.write_str(digits.format(a.port()))
    }
}

/// One request on its way through address failover, exit failover and the retry: where it
/// goes now and what it has tried.
struct Attempts<'a> {
    out: &'a Outgoing,
    target: &'a str,
    /// Whether the target's certificate is verified (part of the pool key).
    verify: bool,
    /// The checked addresses, failed ones last; `candidate` is the one in use.
    candidates: Vec<SocketAddr>,
    candidate: usize,
    /// Exit nodes that failed this request (by index).
    failed_exits: Vec<usize>,
    route: crate::exits::Route,
    key: UpstreamKey,
    meta: Meta,
    attempt: u32,
    /// The retry wants a fresh connection.
    fresh_retry: bool,
    retry_reason: Option<&'static str>,
}

impl Attempts<'_> {
    /// The address in use.
    fn addr(&self) -> SocketAddr {
        self.candidates[self.candidate]
    }

    /// The pool key through `exit` to the address in use.
    fn key_for(&self, exit: crate::exits::ExitKey) -> UpstreamKey {
        let out = self.out;
        Router::upstream_key(
            out.scheme,
            &out.host,
            out.port,
            self.verify,
            exit,
            self.addr(),
        )
    }

    /// The request as telemetry counts it (`handshake`: what its new connection paid).
    fn record(&self, handshake: Option<Duration>) -> RequestRecord<'_> {
        RequestRecord {
            target: self.target,
            reused: self.meta.reused,
            protocol: self.meta.protocol,
            handshake,
            retry_reason: self.retry_reason,
            new_reason: self.meta.new_reason,
            dns: if self.attempt == 0 {
                self.meta.dns
            } else {
                Duration::ZERO
            },
            queue: self.meta.queue,
            bytes_up: self.out.body.len() as u64,
            exit: &self.route.key.node,
            forced: self.route.forced,
            via_proxy: self.key.via_proxy(),
        }
    }
}

/// Sends requests upstream through the pool.
pub struct Forwarder {
    pool: Pool<crate::dial::Dialer>,
    /// Where requests go: addresses, exits, pool keys.
    router: Router,
    telemetry: Arc<Telemetry>,
    cfg: ForwardConfig,
    /// Retries of requests that may have reached the target draw on it.
    retry_budget: crate::admission::RetryBudget,
}

/// Why an HTTP/1 response's framing cannot be trusted, if it cannot: `Transfer-Encoding` with
/// `Content-Length` (RFC 9112 §6.3: a smuggling or splitting attempt), a transfer coding other
/// than `chunked` (edgepool re-frames bodies and would lose it), or `Transfer-Encoding` in an
/// HTTP/1.0 response.
fn ambiguous_response_framing(resp: &Response<hyper::body::Incoming>) -> Option<&'static str> {
    let h = resp.headers();
    let mut te = h.get_all(header::TRANSFER_ENCODING).iter();
    let first = te.next()?;
    if h.contains_key(header::CONTENT_LENGTH) {
        return Some("both Transfer-Encoding and Content-Length: the body's end is ambiguous");
    }
    if resp.version() == http::Version::HTTP_10 {
        return Some("Transfer-Encoding in an HTTP/1.0 response");
    }
    if te.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked") {
        return Some("a Transfer-Encoding other than exactly \"chunked\"");
    }
    None
}

impl Forwarder {
    /// A forwarder over `pool`.
    pub fn new(
        pool: Pool<crate::dial::Dialer>,
        exits: Arc<crate::exits::Exits>,
        resolver: Resolver,
        policy: TargetPolicy,
        telemetry: Arc<Telemetry>,
        cfg: ForwardConfig,
        own: crate::dial::OwnAddrs,
    ) -> Self {
        Forwarder {
            pool,
            router: Router::new(exits, resolver, policy, own),
            telemetry,
            retry_budget: crate::admission::RetryBudget::new(cfg.retry_budget),
            cfg,
        }
    }

    /// The retry budget (for its counters).
    pub fn retry_budget(&self) -> &crate::admission::RetryBudget {
        &self.retry_budget
    }

    /// Records edgepool's own listening addresses (once, when the listeners are bound):
    /// requests to them are refused as loops.
    pub fn set_own_addrs(&self, addrs: Vec<SocketAddr>) {
        self.router.set_own_addrs(addrs);
    }

    /// Where requests go.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The forwarder's settings.
    pub fn config(&self) -> &ForwardConfig {
        &self.cfg
    }

    /// Whether `host`'s certificate is verified (it is not in `upstream.insecure_hosts`).
    pub fn verifies(&self, host: &str) -> bool {
        !self
            .cfg
            .insecure_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
    }

    /// Opens a dedicated stream to `host:port` (`addr`, already checked) that never enters the
    /// pool — a blind tunnel's or an upgraded connection's — leaving through the worker's exit
    /// (routed like a request to `host:port`), with failover to another node when one fails
    /// before anything was sent. Returns the stream and the exit's label.
    pub async fn open_dedicated(
        &self,
        host: &str,
        port: u16,
        addr: SocketAddr,
        worker: &crate::worker::Worker,
    ) -> Result<(crate::dial::Opened, Arc<str>), EdgeError> {
        let target = authority(host, port);
        let mut failed: Vec<usize> = Vec::new();
        // A dedicated stream never comes from the pool: no node is warmer than another.
        let no_warm = |_: &crate::exits::ExitKey| false;
        loop {
            let route = self.router.route(&target, worker, &failed, &no_warm)?;
            match self
                .pool
                .connector()
                .open_stream(&route.key, host, port, addr)
                .await
            {
                Ok(opened) => return Ok((opened, route.key.node.label.clone())),
                Err(e) => {
                    // The dialer told the node's circuit; a node fault may go to another node.
                    if Router::node_fault(&e) {
                        failed.push(route.key.node.index);
                        if failed.len() < MAX_EXIT_FAILOVER {
                            continue;
                        }
                    }
                    return Err(dial_error(&e));
                }
            }
        }
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<crate::dial::Dialer> {
        &self.pool
    }

    /// The exits and their routing state.
    pub fn exits(&self) -> &Arc<crate::exits::Exits> {
        self.router.exits()
    }

    /// Routes again after the exits in `st.failed_exits` failed for this request (nothing was
    /// sent to the target): updates the route, the pool key and the response metadata.
    fn reroute(&self, st: &mut Attempts<'_>) -> Result<(), EdgeError> {
        let warm = |k: &crate::exits::ExitKey| self.pool.has_idle(&st.key_for(k.clone()));
        let next = self
            .router
            .route(st.target, &st.out.worker, &st.failed_exits, &warm)?;
        st.route = next;
        if st.route.cold_reason.is_none() && st.out.worker.options.session.is_none() {
            st.route.cold_reason = Some(NewReason::SessionChange);
        }
        st.meta.session_renewed |= st.route.renewed;
        st.meta.exit = st.route.key.node.label.clone();
        st.key = st.key_for(st.route.key.clone());
        record_route(&st.meta.exit, st.key.addr);
        Ok(())
    }

    /// Resolves `host` and checks every address against the target policy; returns the
    /// address to connect to (the checked one — never re-resolved).
    /// (The CONNECT path.) A CONNECT whose target waited for DNS, or found no usable
    /// answer, is traced (`kind: "dns"`), like the requests that waited.
    pub async fn resolve_checked(
        &self,
        host: &str,
        port: u16,
    ) -> Result<(SocketAddr, Duration), EdgeError> {
        let t0 = Instant::now();
        let res = self.router.candidates(host, port).await;
        let (source, error) = match &res {
            Ok(c) if !c.source.waited() => return res.map(|c| (c.addrs[0], c.took)),
            Ok(c) => (c.source.as_str(), None),
            Err(e) => ("failed", Some(e.token)),
        };
        if self.telemetry.should_trace(false, error.is_some()) {
            self.telemetry.trace(TraceRecord {
                kind: "dns",
                target: authority(host, port),
                method: "CONNECT".into(),
                dns_ms: Some(ms(t0.elapsed())),
                dns: Some(source),
                error,
                status: error.and(res.as_ref().err().map(|e| e.status.as_u16())),
                ..Default::default()
            });
        }
        res.map(|c| (c.addrs[0], c.took))
    }

    /// The resolver (for its cache figures).
    pub fn resolver(&self) -> &Resolver {
        self.router.resolver()
    }

    /// Forwards one request; the response body returns the connection to the pool when it
    /// ends. Records the request in telemetry.
    pub async fn forward(&self, out: Outgoing) -> Result<(Response<ProxyBody>, Meta), EdgeError> {
        let target = out.target();
        let started = Instant::now();
        let mut exit_tried: Option<Arc<str>> = None;
        let mut earlier_sent = Sent::None;
        let mut dns_stage = None;
        let res = self
            .forward_inner(
                &out,
                &target,
                started,
                &mut exit_tried,
                &mut earlier_sent,
                &mut dns_stage,
            )
            .await
            // A retry that fails before sending anything does not undo the first attempt:
            // the worker must hear that the request may have reached the target.
            .map_err(|e| e.sent_at_least(earlier_sent));
        if let Err(e) = &res {
            self.telemetry.record_error(Some(&target), e.token);
            if self.telemetry.should_trace(false, true) {
                self.telemetry.trace(TraceRecord {
                    kind: "request",
                    target: target.clone(),
                    exit: exit_tried.as_deref().unwrap_or("").to_string(),
                    method: out.method.to_string(),
                    status: Some(e.status.as_u16()),
                    error: Some(e.token),
                    dns_ms: dns_stage.map(|(d, _)| ms(d)),
                    dns: dns_stage.map(|(_, s)| s),
                    total_ms: Some(ms(started.elapsed())),
                    ..Default::default()
                });
            }
        }
        res
    }

    async fn forward_inner(
        &self,
        out: &Outgoing,
        target: &str,
        started: Instant,
        exit_tried: &mut Option<Arc<str>>,
        earlier_sent: &mut Sent,
        dns_stage: &mut Option<(Duration, &'static str)>,
    ) -> Result<(Response<ProxyBody>, Meta), EdgeError> {
        let mut st = self.begin(out, target, dns_stage).await?;
        loop {
            *exit_tried = Some(st.route.key.node.label.clone());
            let t_queue = Instant::now();
            let Some(mut lease) = self.checkout_attempt(&mut st, t_queue).await? else {
                continue;
            };
            st.meta.queue += t_queue.elapsed();
            let handshake = self.note_connection(&mut lease, &mut st.meta);
            let t_send = Instant::now();
            let sent = match lease.conn() {
                UpstreamConn::H1 { .. } => self.send_h1(&mut lease, out).await,
                UpstreamConn::H2 { .. } => self.send_h2(&mut lease, out).await,
            };
            match sent {
                // An HTTP proxy answers absolute-form requests itself when it rejects our
                // credentials: that 407 is the exit's failure, never the worker's business
                // (the worker would read it as edgepool asking for its token). Nothing reached
                // the target, so another node may take the request, whatever its method.
                Ok(Upstream::H1(r))
                    if st.key.via_proxy()
                        && r.status() == http::StatusCode::PROXY_AUTHENTICATION_REQUIRED =>
                {
                    drop(r);
                    lease.release(Release::Close(CloseReason::Error));
                    self.exit_refused_credentials(&mut st)?;
                }
                Ok(resp) => {
                    st.meta.ttfb = t_send.elapsed();
                    let resp = self.respond(&st, resp, lease, handshake, started);
                    return Ok((resp, st.meta));
                }
                Err(f) => self.after_send_failure(&mut st, f, lease, handshake, earlier_sent)?,
            }
        }
    }

    /// Resolves and checks the target's addresses, routes the request to an exit and builds
    /// its first pool key. `dns_stage` says how long DNS took, failed or not (for the trace).
    async fn begin<'a>(
        &self,
        out: &'a Outgoing,
        target: &'a str,
        dns_stage: &mut Option<(Duration, &'static str)>,
    ) -> Result<Attempts<'a>, EdgeError> {
        let t_dns = Instant::now();
        let c = match self.router.candidates(&out.host, out.port).await {
            Ok(c) => c,
            Err(e) => {
                // No usable answer (failed, forbidden, or edgepool itself): the trace says how
                // long the DNS stage took.
                *dns_stage = Some((t_dns.elapsed(), "failed"));
                return Err(e);
            }
        };
        *dns_stage = Some((c.took, c.source.as_str()));
        self.retry_budget.deposit();
        let verify = self.verifies(&out.host);
        let first = c.addrs[0];
        let key_for =
            |exit| Router::upstream_key(out.scheme, &out.host, out.port, verify, exit, first);
        let warm = |k: &crate::exits::ExitKey| self.pool.has_idle(&key_for(k.clone()));
        let route = self.router.route(target, &out.worker, &[], &warm)?;
        let key = key_for(route.key.clone());
        record_route(&route.key.node.label, key.addr);
        let meta = Meta {
            exit: route.key.node.label.clone(),
            session_renewed: route.renewed,
            session: out.worker.options.session.clone(),
            dns: c.took,
            dns_source: Some(c.source),
            ..Default::default()
        };
        Ok(Attempts {
            out,
            target,
            verify,
            candidates: c.addrs,
            candidate: 0,
            failed_exits: Vec::new(),
            route,
            key,
            meta,
            attempt: 0,
            fresh_retry: false,
            retry_reason: None,
        })
    }

    /// Checks out a connection for the current key. `Ok(None)`: a connect failed before
    /// anything was sent and the request moved to another address or exit — try again.
    async fn checkout_attempt(
        &self,
        st: &mut Attempts<'_>,
        t_queue: Instant,
    ) -> Result<Option<Lease<crate::dial::Dialer>>, EdgeError> {
        let opts = CheckoutOpts {
            deadline: t_queue + self.cfg.queue_timeout,
            fresh: st.attempt > 0 && st.fresh_retry,
            cold_reason: st.route.cold_reason,
        };
        let d = match self.pool.checkout(&st.key, opts).await {
            Ok(l) => return Ok(Some(l)),
            Err(CheckoutError::Dial(d)) => d,
            Err(e) => return Err(checkout_error(e, st.target, self.cfg.queue_timeout)),
        };
        let target = st.target;
        let connect_failed = matches!(
            &*d,
            DialError::Connect { .. } | DialError::ConnectTimeout { .. }
        );
        // Nothing was sent: another address of the target is safe for any method.
        if connect_failed && st.candidate < MAX_ADDR_FAILOVER.min(st.candidates.len() - 1) {
            self.router.mark_failed(st.key.addr.ip());
            st.candidate += 1;
            tracing::debug!(target = %target, failed = %st.key.addr, next = %st.addr(), "connect failed; trying the next address");
            st.key = st.key.with_addr(st.addr());
            record_route(&st.meta.exit, st.key.addr);
            return Ok(None);
        }
        // The exit node failed before anything was sent: another node is safe for any method
        // (a strict session fails instead).
        if Router::node_fault(&d) && st.failed_exits.len() + 1 < MAX_EXIT_FAILOVER {
            st.failed_exits.push(st.route.key.node.index);
            tracing::debug!(target = %target, exit = %st.route.key.node.label, error = %d, "exit failed; trying another");
            return match self.reroute(st) {
                Ok(()) => Ok(None),
                // Say what failed, not only that nothing is left.
                Err(e) if e.kind == ErrorKind::NoHealthyExit => Err(checkout_error(
                    CheckoutError::Dial(d),
                    target,
                    self.cfg.queue_timeout,
                )),
                Err(e) => Err(e),
            };
        }
        if connect_failed {
            self.router.mark_failed(st.key.addr.ip());
        }
        Err(checkout_error(
            CheckoutError::Dial(d),
            target,
            self.cfg.queue_timeout,
        ))
    }

    /// Notes the connection a lease holds in the response metadata (and a new one's
    /// handshakes in telemetry); returns the handshake time a new connection paid.
    fn note_connection(
        &self,
        lease: &mut Lease<crate::dial::Dialer>,
        meta: &mut Meta,
    ) -> Option<Duration> {
        meta.reused = lease.reused();
        meta.new_reason = lease.new_reason();
        let shared = lease.conn().shared();
        meta.protocol = shared.protocol;
        if meta.reused {
            return None;
        }
        let t = &shared.timings;
        meta.tcp_connect = t.tcp;
        meta.exit_handshake = t.exit;
        meta.tls_handshake = t.tls;
        self.telemetry.record_handshake(t.tcp, t.exit, t.tls);
        Some(t.tcp + t.exit + t.tls)
    }

    /// The exit answered a forwarded request with its own 407: its failure (nothing reached
    /// the target), so the request moves to another node; none left is `exit_auth_failed`.
    fn exit_refused_credentials(&self, st: &mut Attempts<'_>) -> Result<(), EdgeError> {
        let msg = format!(
            "exit {} rejected the proxy credentials (HTTP 407 to a forwarded request)",
            st.route.key.node.label
        );
        st.route.key.node.report(NodeOutcome::Fault(&msg));
        st.failed_exits.push(st.route.key.node.index);
        if st.failed_exits.len() >= MAX_EXIT_FAILOVER || self.reroute(st).is_err() {
            return Err(EdgeError::new(ErrorKind::ExitAuthFailed, msg));
        }
        Ok(())
    }

    /// Accounts for and traces a request that got its response head, and wraps the response
    /// so that its body returns the connection when it ends.
    fn respond(
        &self,
        st: &Attempts<'_>,
        resp: Upstream,
        lease: Lease<crate::dial::Dialer>,
        handshake: Option<Duration>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let meta = &st.meta;
        st.route.key.node.report(NodeOutcome::Responded {
            new_connection: !lease.reused(),
        });
        self.telemetry.record_request(&st.record(handshake));
        self.telemetry.record_ttfb(meta.ttfb);
        // Every request that waited for DNS is traced, like every new connection.
        let waited_dns = meta.dns_source.is_some_and(|s| s.waited());
        let trace = self
            .telemetry
            .should_trace(meta.reused && !waited_dns, false)
            .then(|| TraceRecord {
                kind: "request",
                target: st.target.to_string(),
                exit: meta.exit.to_string(),
                method: st.out.method.to_string(),
                reused: Some(meta.reused),
                new_reason: meta.new_reason.map(|r| r.as_str()),
                dns_ms: Some(ms(meta.dns)),
                dns: meta.dns_source.map(|s| s.as_str()),
                queue_ms: Some(ms(meta.queue)),
                tcp_connect_ms: (!meta.reused).then(|| ms(meta.tcp_connect)),
                tls_handshake_ms: (!meta.reused).then(|| ms(meta.tls_handshake)),
                ttfb_ms: Some(ms(meta.ttfb)),
                retried: meta.retried,
                pool: (!meta.reused).then(|| "connection added".to_string()),
                ..Default::default()
            });
        let done = Completion {
            telemetry: self.telemetry.clone(),
            started,
            bytes: 0,
            trace,
        };
        // A forced-rotation request through a rotating gateway had a provider session of its
        // own: nobody can use its connection again.
        let single_use = st.route.forced && st.route.key.node.session_template.is_some();
        self.finish_response(&st.out.method, resp, lease, meta, done, single_use)
    }

    /// A send attempt failed: gives the connection its fate, then either sets up the retry
    /// (`Ok`) or returns the worker's error. Accounts for the attempt as a request only if it
    /// is the last one and may have reached the target.
    fn after_send_failure(
        &self,
        st: &mut Attempts<'_>,
        f: SendFailure,
        lease: Lease<crate::dial::Dialer>,
        handshake: Option<Duration>,
        earlier_sent: &mut Sent,
    ) -> Result<(), EdgeError> {
        let reused = lease.reused();
        lease.release(f.release());
        if f.failure == Failure::Invalid {
            return Err(EdgeError::new(ErrorKind::InvalidRequest, f.message));
        }
        let mut decision = crate::retry::decide(
            &f,
            Attempt {
                number: st.attempt,
                reused,
                // Through a proxy exit, a brand-new connection can also die because the exit
                // died (the retry fails over if this one is gone).
                via_exit: st.route.key.node.spec.kind != crate::exits::ExitKind::Direct,
                idempotent: st.out.idempotent(),
            },
        );
        // Unprocessed streams move freely; any other retry draws on the budget, so a failing
        // target is not hit with amplified load.
        if let Decision::Retry { budgeted: true, .. } = decision {
            if !self.retry_budget.try_withdraw() {
                tracing::warn!(target = %st.target, "retry budget exhausted (limits.retry_budget): not retrying");
                decision = Decision::GiveUp;
            }
        }
        // A worker request counts once, however many attempts it took (README, "Reuse
        // accounting"): an attempt that is retried is not a request of its own (the retry is
        // counted in edgepool_retries_total, its new connection as after_error). A final
        // failed attempt counts only if it may have reached the target: the origin counts what
        // it received.
        if decision == Decision::GiveUp && f.sent != Sent::None && !f.unprocessed() {
            self.telemetry.record_request(&st.record(handshake));
        }
        let Decision::Retry { fresh, reason, .. } = decision else {
            return Err(send_error(
                f,
                st.out,
                reused,
                st.target,
                self.cfg.response_header_timeout,
            ));
        };
        *earlier_sent = earlier_sent.max_with(f.sent);
        tracing::debug!(target = %st.target, error = %f.message, "retrying once");
        st.meta.retried = true;
        st.fresh_retry = fresh;
        st.retry_reason = Some(reason);
        st.attempt += 1;
        Ok(())
    }

    async fn send_h1(
        &self,
        lease: &mut Lease<crate::dial::Dialer>,
        out: &Outgoing,
    ) -> Result<Upstream, SendFailure> {
        let shared = lease.conn().shared().clone();
        let (before_in, before_out) = (shared.bytes_in(), shared.bytes_out());
        let UpstreamConn::H1 { send, .. } = lease.conn() else {
            unreachable!("send_h1 is called for HTTP/1.1 connections")
        };
        // Bounded: a connection whose previous request is still being written (a server that
        // answered early and stopped reading) must not hold this request forever.
        let ready = match tokio::time::timeout(self.cfg.queue_timeout, send.ready()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "not ready for a new request within pool.queue_timeout ({:?})",
                self.cfg.queue_timeout
            )),
        };
        if let Err(e) = ready {
            return Err(SendFailure::new(
                Failure::NotUsable { goaway: false },
                Sent::None,
                format!("connection not usable: {e}"),
            ));
        }
        // Through an HTTP proxy, plain-http requests go in absolute form with the proxy's
        // credentials (the worker's own Proxy-Authorization was removed at ingress).
        let via = lease.key().via_proxy();
        let builder = Request::builder().method(out.method.clone());
        let builder = if via {
            builder.uri(format!(
                "http://{}{}",
                authority(&out.host, out.port),
                out.path
            ))
        } else {
            builder.uri(http::Uri::from(out.path.clone()))
        };
        let mut req = builder
            .version(Version::HTTP_11)
            .body(Full::new(out.body.clone()))
            .map_err(|e| {
                SendFailure::new(
                    Failure::Invalid,
                    Sent::None,
                    format!("invalid request: {e}"),
                )
            })?;
        *req.headers_mut() = out.headers.clone();
        if via {
            let exit = &lease.key().exit;
            if let Some(auth) = exit.node.auth_for(exit.provider_session()) {
                req.headers_mut()
                    .insert(header::PROXY_AUTHORIZATION, auth.basic_header());
            }
        }
        // Host is always the target edgepool connected to (RFC 9112 §3.2.2: a proxy replaces
        // the Host of an absolute-form request with the request target's authority). A
        // worker's differing Host — or, inside a tunnel, one naming another site than the
        // CONNECT — never reaches the target.
        let host = if out.port == out.scheme.default_port() {
            bracket(&out.host)
        } else {
            authority(&out.host, out.port)
        };
        // `from_maybe_shared` takes the string's buffer instead of copying it.
        match HeaderValue::from_maybe_shared(Bytes::from(host)) {
            Ok(v) => {
                req.headers_mut().insert(header::HOST, v);
            }
            Err(_) => {
                req.headers_mut().remove(header::HOST);
            }
        }
        lease.mark_sent();
        let UpstreamConn::H1 { send, .. } = lease.conn() else {
            unreachable!()
        };
        let fut = send.try_send_request(req);
        match tokio::time::timeout(self.cfg.response_header_timeout, fut).await {
            Err(_) => Err(SendFailure::new(
                Failure::Timeout {
                    response_started: shared.bytes_in() > before_in,
                    stream_only: false,
                },
                Sent::Complete,
                "no response head in time",
            )),
            // HEAD answers and 204/304 carry no body: their framing headers describe another one.
            Ok(Ok(resp)) => match (out.method != http::Method::HEAD
                && !matches!(resp.status().as_u16(), 204 | 304))
            .then(|| ambiguous_response_framing(&resp))
            .flatten()
            {
                // Never forwarded, and the connection is closed (its next bytes cannot be
                // trusted to start a response).
                Some(why) => Err(SendFailure::new(Failure::BadResponse, Sent::Complete, why)),
                None => Ok(Upstream::H1(resp)),
            },
            Ok(Err(mut e)) => {
                let never_sent = e.take_message().is_some() || shared.bytes_out() == before_out;
                let err = e.into_error();
                let response_started = shared.bytes_in() > before_in;
                Err(SendFailure::new(
                    Failure::Broken {
                        response_started,
                        bad_response: err.is_parse() && response_started,
                        never_sent,
                    },
                    if never_sent { Sent::None } else { Sent::Maybe },
                    err.to_string(),
                ))
            }
        }
    }

    async fn send_h2(
        &self,
        lease: &mut Lease<crate::dial::Dialer>,
        out: &Outgoing,
    ) -> Result<Upstream, SendFailure> {
        let UpstreamConn::H2 { send, .. } = lease.conn() else {
            unreachable!("send_h2 is called for HTTP/2 connections")
        };
        let send = send.clone();
        let mut send = send.ready().await.map_err(|e| {
            SendFailure::new(
                Failure::NotUsable {
                    goaway: e.is_go_away(),
                },
                Sent::None,
                format!("connection not usable: {e}"),
            )
        })?;
        let uri = format!("https://{}{}", authority(&out.host, out.port), out.path);
        let mut req = Request::builder()
            .method(out.method.clone())
            .uri(uri)
            .version(Version::HTTP_2)
            .body(())
            .map_err(|e| {
                SendFailure::new(
                    Failure::Invalid,
                    Sent::None,
                    format!("invalid request: {e}"),
                )
            })?;
        let mut headers = out.headers.clone();
        headers.remove(header::HOST);
        *req.headers_mut() = headers;
        let end = out.body.is_empty();
        let (resp_fut, mut stream) = send.send_request(req, end).map_err(|e| {
            SendFailure::new(
                Failure::NotUsable {
                    goaway: e.is_go_away(),
                },
                Sent::None,
                format!("could not open a stream: {e}"),
            )
        })?;
        lease.mark_sent();
        if !end {
            stream.send_data(out.body.clone(), true).map_err(|e| {
                SendFailure::new(
                    Failure::Broken {
                        response_started: false,
                        bad_response: false,
                        never_sent: false,
                    },
                    Sent::Maybe,
                    format!("sending the body failed: {e}"),
                )
            })?;
        }
        match tokio::time::timeout(self.cfg.response_header_timeout, resp_fut).await {
            // One slow stream; the shared connection is fine.
            Err(_) => Err(SendFailure::new(
                Failure::Timeout {
                    response_started: false,
                    stream_only: true,
                },
                Sent::Complete,
                "no response head in time",
            )),
            Ok(Ok(resp)) => Ok(Upstream::H2(resp, stream)),
            Ok(Err(e)) => {
                // Streams above a graceful GOAWAY's last stream id and refused streams were
                // not processed by the server: safe to send again, whatever the method.
                let refused = e.reason() == Some(h2::Reason::REFUSED_STREAM);
                let goaway =
                    e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR);
                let failure = if refused {
                    Failure::Refused
                } else if goaway {
                    Failure::GoAway
                } else if e.is_reset() && !e.is_go_away() {
                    Failure::StreamReset
                } else {
                    Failure::Broken {
                        response_started: false,
                        bad_response: false,
                        never_sent: false,
                    }
                };
                let sent = if refused || goaway {
                    Sent::None
                } else {
                    Sent::Maybe
                };
                Err(SendFailure::new(failure, sent, e.to_string()))
            }
        }
    }

    /// Turns the upstream response into the worker's: hop-by-hop headers out, edgepool's
    /// headers in, and a body that returns the connection when it ends.
    fn finish_response(
        &self,
        method: &Method,
        up: Upstream,
        lease: Lease<crate::dial::Dialer>,
        meta: &Meta,
        done: Completion,
        single_use: bool,
    ) -> Response<ProxyBody> {
        let (mut parts, body, plan) = match up {
            Upstream::H1(resp) => {
                let mut plan = h1_release_plan(resp.version(), resp.headers(), lease.index());
                if close_delimited(method, resp.status(), resp.headers()) {
                    // The body ends when the server closes: the connection cannot be reused.
                    plan = Release::Close(CloseReason::ServerClose);
                }
                let (parts, body) = resp.into_parts();
                (parts, BodyKind::H1(body), plan)
            }
            Upstream::H2(resp, stream) => {
                let (parts, body) = resp.into_parts();
                (
                    parts,
                    BodyKind::H2(body, Some(stream)),
                    Release::Keep(Hints::default()),
                )
            }
        };
        let plan = if single_use {
            Release::Close(CloseReason::ScopeEnded)
        } else {
            plan
        };
        clean_response_headers(&mut parts.headers);
        parts.version = Version::HTTP_11;
        // Names as constants: a `&str` name is copied into a new allocation at every insert.
        parts.headers.insert(
            crate::headers::X_EDGEPOOL_REUSED,
            HeaderValue::from_static(if meta.reused { "1" } else { "0" }),
        );
        if let Ok(v) = HeaderValue::from_str(&meta.exit) {
            parts.headers.insert(crate::headers::X_EDGEPOOL_EXIT, v);
        }
        if let Some(v) = meta
            .session
            .as_deref()
            .and_then(|s| HeaderValue::from_str(s).ok())
        {
            parts.headers.insert(crate::headers::X_EDGEPOOL_SESSION, v);
        }
        if meta.session_renewed {
            parts.headers.insert(
                crate::headers::X_EDGEPOOL_SESSION_RENEWED,
                HeaderValue::from_static("1"),
            );
        }
        let mut done = done;
        if let Some(t) = done.trace.as_mut() {
            t.status = Some(parts.status.as_u16());
        }
        let body = UpstreamBody {
            kind: body,
            lease: Some(lease),
            plan,
            drain_max: self.cfg.drain_max_bytes,
            drain_timeout: self.cfg.drain_timeout,
            done: Some(done),
            idle: None,
            idle_limit: self.cfg.response_body_idle_timeout,
        };
        Response::from_parts(parts, body.boxed_unsync())
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn checkout_error(e: CheckoutError<DialError>, target: &str, queue: Duration) -> EdgeError {
    match e {
        CheckoutError::Timeout => EdgeError::new(
            ErrorKind::PoolQueueTimeout,
            format!("no connection to {target} became free within pool.queue_timeout ({queue:?})"),
        ),
        CheckoutError::Closed => EdgeError::shutting_down(),
        CheckoutError::Dial(d) => dial_error(&d),
    }
}

/// The worker-facing error for a failed dial (nothing was sent).
pub fn dial_error(d: &DialError) -> EdgeError {
    let msg = d.to_string();
    match d {
        DialError::Connect { .. } => EdgeError::new(ErrorKind::UpstreamConnectFailed, msg),
        DialError::ConnectTimeout { .. } => EdgeError::new(ErrorKind::UpstreamConnectTimeout, msg),
        DialError::Tls { .. } => EdgeError::new(ErrorKind::UpstreamTlsFailed, msg),
        DialError::TlsTimeout { .. } => EdgeError::new(ErrorKind::UpstreamConnectTimeout, msg),
        DialError::Handshake { .. } => EdgeError::new(ErrorKind::UpstreamConnectFailed, msg),
        DialError::PortsExhausted(..) => EdgeError::new(ErrorKind::EphemeralPortsExhausted, msg),
        DialError::ExitConnect { .. } => EdgeError::new(ErrorKind::ExitConnectFailed, msg),
        DialError::ExitAuth { .. } => EdgeError::new(ErrorKind::ExitAuthFailed, msg),
        DialError::ExitRefused { .. } => EdgeError::new(ErrorKind::ExitRefused, msg),
        DialError::ExitTargetTimeout { .. } => {
            EdgeError::new(ErrorKind::UpstreamConnectTimeout, msg)
        }
        DialError::ExitBudget { .. } => {
            EdgeError::new(ErrorKind::ExitBudgetExhausted, msg).with_retry_after(1)
        }
        DialError::ExitIsEdgepool { .. } => EdgeError::new(ErrorKind::LoopDetected, msg),
    }
    .with_sent(Sent::None)
}

fn send_error(
    f: SendFailure,
    out: &Outgoing,
    reused: bool,
    target: &str,
    rht: Duration,
) -> EdgeError {
    if matches!(f.failure, Failure::Timeout { .. }) {
        return EdgeError::new(
            ErrorKind::UpstreamResponseTimeout,
            format!(
                "{target} sent no response head within upstream.response_header_timeout ({rht:?})"
            ),
        )
        .with_sent(f.sent);
    }
    if matches!(
        f.failure,
        Failure::BadResponse
            | Failure::Broken {
                bad_response: true,
                ..
            }
    ) {
        return EdgeError::new(
            ErrorKind::UpstreamBadResponse,
            format!("{target} sent an invalid response: {}", f.message),
        )
        .with_sent(f.sent);
    }
    if reused && f.sent != Sent::None && !out.idempotent() && !f.response_started() {
        return EdgeError::not_replayed(format!(
            "{} {target}: the reused connection failed ({}) after the request may have reached the target; \
             {} is not idempotent, so edgepool did not replay it",
            out.method, f.message, out.method
        ));
    }
    EdgeError::request_failed(format!("{target}: {}", f.message), f.sent)
}

enum Upstream {
    H1(Response<hyper::body::Incoming>),
    H2(Response<h2::RecvStream>, h2::SendStream<Bytes>),
}

/// What the response head says about the connection's future (HTTP/1.1).
fn h1_release_plan(version: Version, headers: &HeaderMap, index: u64) -> Release {
    // Connection options, compared in place (no copy of them per response).
    let has_option = |option: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(option))
    };
    let close = has_option("close") || (version == Version::HTTP_10 && !has_option("keep-alive"));
    if close {
        // On a connection's first response it means "no keep-alive here"; later it is almost
        // always the server's requests-per-connection limit.
        return Release::Close(if index > 1 {
            CloseReason::MaxRequests
        } else {
            CloseReason::ServerClose
        });
    }
    let hints = headers
        .get("keep-alive")
        .and_then(|v| v.to_str().ok())
        .map(parse_keep_alive)
        .unwrap_or_default();
    Release::Keep(hints)
}

/// True when an HTTP/1.x response body is delimited by the connection closing (no
/// Content-Length, not chunked, and a body is expected).
fn close_delimited(method: &Method, status: http::StatusCode, headers: &HeaderMap) -> bool {
    if method == Method::HEAD
        || status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
        || (method == Method::CONNECT && status.is_success())
    {
        return false;
    }
    let chunked = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("chunked"));
    !chunked && !headers.contains_key(header::CONTENT_LENGTH)
}

enum BodyKind {
    H1(hyper::body::Incoming),
    /// The send half is held (never read) so the request stream stays open until the
    /// response ends.
    H2(
        h2::RecvStream,
        #[allow(dead_code)] Option<h2::SendStream<Bytes>>,
    ),
    Done,
}

/// What to record when a response body ends: total time, bytes, and the trace record.
struct Completion {
    telemetry: Arc<Telemetry>,
    started: Instant,
    bytes: u64,
    trace: Option<TraceRecord>,
}

impl Completion {
    fn finish(self) {
        let total = self.started.elapsed();
        self.telemetry.record_done(total, self.bytes);
        if let Some(mut t) = self.trace {
            t.total_ms = Some(ms(total));
            t.bytes = Some(self.bytes);
            self.telemetry.trace(t);
        }
    }
}

/// A response body that holds its connection's lease and returns it when the body ends
/// (early, on the last data frame, so the worker's next request finds it idle). If the
/// worker goes away first, the rest is drained within bounds to keep the connection.
struct UpstreamBody {
    kind: BodyKind,
    lease: Option<Lease<crate::dial::Dialer>>,
    plan: Release,
    drain_max: u64,
    drain_timeout: Duration,
    done: Option<Completion>,
    /// Fires when the target has sent nothing for `idle_limit` while the body waited for it:
    /// the body is cut off with an error and the connection closed
    /// (`upstream.response_body_idle_timeout`). Armed the first time the body has to wait: a
    /// body that is already here when asked for (most small answers) costs no timer, no
    /// allocation and no clock read.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    idle_limit: Duration,
}

impl UpstreamBody {
    fn release(&mut self, how: Release) {
        if let Some(l) = self.lease.take() {
            l.release(how);
        }
        if let Some(d) = self.done.take() {
            d.finish();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let res = match this.poll_upstream(cx) {
            Poll::Ready(r) => {
                if let Some(idle) = this.idle.as_mut() {
                    idle.as_mut().reset(Instant::now() + this.idle_limit);
                }
                r
            }
            Poll::Pending => match std::future::Future::poll(
                this.idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(this.idle_limit)))
                    .as_mut(),
                cx,
            ) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    if matches!(this.kind, BodyKind::Done) {
                        return Poll::Ready(None);
                    }
                    Some(Err(BoxError::from(format!(
                        "the target sent no byte of the response body for {:?} (upstream.response_body_idle_timeout)",
                        this.idle_limit
                    ))))
                }
            },
        };
        this.finish_frame(res)
    }

    fn is_end_stream(&self) -> bool {
        self.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.hint()
    }
}

/// One frame (and whether it ends the body), the end, or an error.
type UpstreamFrame = Option<Result<(Frame<Bytes>, bool), BoxError>>;

impl UpstreamBody {
    /// The next frame from the target.
    fn poll_upstream(&mut self, cx: &mut Context<'_>) -> Poll<UpstreamFrame> {
        let this = self;
        Poll::Ready(match &mut this.kind {
            BodyKind::Done => return Poll::Ready(None),
            BodyKind::H1(b) => match Pin::new(&mut *b).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => None,
                Poll::Ready(Some(Ok(f))) => {
                    let ended = b.is_end_stream();
                    Some(Ok((f, ended)))
                }
                Poll::Ready(Some(Err(e))) => Some(Err(BoxError::from(e))),
            },
            BodyKind::H2(b, _) => match b.poll_data(cx) {
                Poll::Pending => {
                    // Data is done: trailers may follow.
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(data))) => {
                    let _ = b.flow_control().release_capacity(data.len());
                    let ended = b.is_end_stream();
                    Some(Ok((Frame::data(data), ended)))
                }
                Poll::Ready(Some(Err(e))) => Some(Err(BoxError::from(e))),
                Poll::Ready(None) => match b.poll_trailers(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(Some(t))) => Some(Ok((Frame::trailers(t), true))),
                    Poll::Ready(Ok(None)) => None,
                    Poll::Ready(Err(e)) => Some(Err(BoxError::from(e))),
                },
            },
        })
    }

    /// Accounts for a frame (or the end, or an error) and returns what the worker gets.
    fn finish_frame(&mut self, res: UpstreamFrame) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self;
        match res {
            None => {
                let plan = this.plan;
                this.release(plan);
                this.kind = BodyKind::Done;
                Poll::Ready(None)
            }
            Some(Ok((frame, ended))) => {
                if let (Some(d), Some(data)) = (this.done.as_mut(), frame.data_ref()) {
                    d.bytes += data.len() as u64;
                }
                if ended {
                    let plan = this.plan;
                    this.release(plan);
                    this.kind = BodyKind::Done;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.release(Release::Close(CloseReason::Error));
                this.kind = BodyKind::Done;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end(&self) -> bool {
        match &self.kind {
            BodyKind::Done => true,
            BodyKind::H1(b) => b.is_end_stream(),
            BodyKind::H2(b, _) => b.is_end_stream(),
        }
    }

    fn hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Done => SizeHint::with_exact(0),
            BodyKind::H1(b) => b.size_hint(),
            BodyKind::H2(..) => SizeHint::new(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d.finish();
        }
        let Some(lease) = self.lease.take() else {
            return;
        };
        let plan = self.plan;
        match std::mem::replace(&mut self.kind, BodyKind::Done) {
            BodyKind::Done => lease.release(plan),
            BodyKind::H1(body) if body.is_end_stream() => lease.release(plan),
            // The connection goes anyway: nothing to save by reading the rest.
            BodyKind::H1(_) if matches!(plan, Release::Close(_)) => lease.release(plan),
            // Dropping an HTTP/2 stream resets only that stream; the connection is fine.
            BodyKind::H2(..) => lease.release(plan),
            BodyKind::H1(body) => {
                let (max, limit) = (self.drain_max, self.drain_timeout);
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(drain(body, lease, plan, max, limit));
                    }
                    Err(_) => lease.release(Release::Close(CloseReason::Abandoned)),
                }
            }
        }
    }
}

/// Reads the rest of an abandoned HTTP/1.1 response so its connection can be reused.
async fn drain(
    mut body: hyper::body::Incoming,
    lease: Lease<crate::dial::Dialer>,
    plan: Release,
    max: u64,
    limit: Duration,
) {
    let read_all = async {
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        n += d.len() as u64;
                        if n > max {
                            return false;
                        }
                    }
                }
                Err(_) => return false,
            }
        }
        true
    };
    match tokio::time::timeout(limit, read_all).await {
        Ok(true) => lease.release(plan),
        _ => lease.release(Release::Close(CloseReason::Abandoned)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_close_means_limit_after_first_response_and_no_keepalive_on_first() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close"));
        assert_eq!(
            h1_release_plan(Version::HTTP_11, &h, 1),
            Release::Close(CloseReason::ServerClose)
        );
        assert_eq!(
            h1_release_plan(Version::HTTP_11, &h, 100),
            Release::Close(CloseReason::MaxRequests)
        );
        let empty = HeaderMap::new();
        assert_eq!(
            h1_release_plan(Version::HTTP_10, &empty, 1),
            Release::Close(CloseReason::ServerClose)
        );
        assert!(matches!(
            h1_release_plan(Version::HTTP_11, &empty, 1),
            Release::Keep(_)
        ));
        // Options in any case, among others, over several fields.
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("x-a, Keep-Alive"));
        assert!(matches!(
            h1_release_plan(Version::HTTP_10, &h, 1),
            Release::Keep(_)
        ));
        h.append("connection", HeaderValue::from_static(" CLOSE "));
        assert_eq!(
            h1_release_plan(Version::HTTP_11, &h, 2),
            Release::Close(CloseReason::MaxRequests)
        );
    }

    #[test]
    fn responses_without_length_or_chunking_are_close_delimited() {
        let none = HeaderMap::new();
        let mut cl = HeaderMap::new();
        cl.insert("content-length", HeaderValue::from_static("5"));
        let mut te = HeaderMap::new();
        te.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let ok = http::StatusCode::OK;
        assert!(close_delimited(&Method::GET, ok, &none));
        assert!(!close_delimited(&Method::GET, ok, &cl));
        assert!(!close_delimited(&Method::GET, ok, &te));
        assert!(!close_delimited(&Method::HEAD, ok, &none));
        assert!(!close_delimited(
            &Method::GET,
            http::StatusCode::NO_CONTENT,
            &none
        ));
        assert!(!close_delimited(
            &Method::GET,
            http::StatusCode::NOT_MODIFIED,
            &none
        ));
    }

    #[test]
    fn addr_text_writes_what_display_writes() {
        for a in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.0.1:80",
            "127.0.0.2:8443",
            "1.20.255.9:1000",
            "[::1]:443",
            "[2001:db8::7]:8080",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(AddrText(addr).to_string(), addr.to_string());
            assert_eq!(AddrText(addr).to_string(), a);
        }
    }
}
