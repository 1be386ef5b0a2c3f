//! edgepool: an egress connection pool for web-scraping fleets. Workers point their proxy
//! setting at it; it keeps upstream connections warm per target, sends every request over one
//! and accounts for reuse: R = 1 − new_connections / requests, and why each new connection
//! was needed.
//!
//! Modules, one job each (data flow: ingress → forward (→ dns) → pool → dial; telemetry
//! watches):
//! - [`config`]: typed configuration, embedded defaults, TOML loading and validation.
//! - [`gateway`]: builds the parts from a config, hands the worker side ([`ingress::Ingress`])
//!   and the operator side ([`admin::Admin`]) each a narrow context, and runs the listeners
//!   until shutdown. No module below it imports it.
//! - [`ingress`]: worker side — absolute-form HTTP, CONNECT (TLS interception or blind tunnel),
//!   `POST /v1/fetch`; routes per request.
//! - [`forward`]: one request upstream — resolve and check, checkout, send, safe retry, stream
//!   the response back and return the connection when the body ends.
//! - [`body`]: the worker-facing response body type; [`headers`]: hop-by-hop hygiene and the
//!   `Keep-Alive` hints.
//! - [`pool`]: the heart — warm connections per key, HTTP/1.1 exclusive, HTTP/2 shared up to
//!   the server's stream limit, expiry, waiters, and one reason per new connection. Depends on
//!   no other edgepool module.
//! - [`route`]: where a request goes — checked addresses (failed ones last), exit and scope,
//!   the pool key; `forward` asks it, and asks again when an address or exit fails.
//! - [`retry`]: what a failed send attempt was, and the pure rule that decides whether it is
//!   sent again (table-tested).
//! - [`dns`]: target names to addresses off the request path — hosts file (final, reloaded),
//!   a serve-stale, refresh-ahead cache with coalesced lookups, A and AAAA raced with a grace.
//! - [`dial`]: TCP, TLS, HTTP/1.1 / HTTP/2 handshakes, connection watching.
//! - [`guard`]: which target addresses may be reached (SSRF deny list + allow CIDRs).
//! - [`h1guard`]: strict HTTP/1 request framing in front of hyper on worker connections (no
//!   ambiguous framing, no smuggling), header-read and body-idle timeouts.
//! - [`admission`]: edgepool's own capacity limits (connections per worker, tunnels, requests
//!   in flight) and the retry budget.
//! - [`ca`]: the interception CA and the per-host leaf certificate cache.
//! - [`telemetry`]: reuse accounting per target, SLO verdicts, the dashboard time series,
//!   Prometheus metrics and the sampled trace log; [`histogram`]: the lock-free latency
//!   histogram those metrics observe into on every request.
//! - [`report`]: the reuse-killers report — per-minute reason counts in an embedded redb store.
//! - [`portguard`]: the ephemeral-port budget; holds new dials when ports run out.
//! - [`cli`]: the command line's library half: each subcommand's work (serve start-up, `ca`,
//!   the admin client behind `status`/`report`/`trace`, `status --fleet`'s sums over several
//!   gateways, the lab's arguments) and what it prints.
//! - [`admin`]: `/` (dashboard), `/status`, `/status/history`, `/report`, `/trace`, `/metrics`,
//!   `/healthz`, `/readyz`, `/ca.pem`.
//! - [`lab`]: the reuse lab (`edgepool lab`): origins with behaviour profiles, a worker fleet
//!   in several modes, the greedy reference (`lab::oracle`), and the side-by-side report
//!   (table, JSON, HTML).
//! - [`splice`]: what ends a spliced stream (blind tunnel, upgraded connection) besides a
//!   close: the activity clock and the gateway's drain signal.
//! - [`upgrade`]: WebSockets — `Upgrade: websocket` and HTTP/2 extended CONNECT forwarded
//!   over a dedicated (never pooled) upstream connection, spliced both ways after `101`, with
//!   their own idle and lifetime clocks.
//! - [`error`]: edgepool's own errors — `ErrorKind` is the contract (token, status,
//!   `Proxy-Status` type, side, `Retry-After`), checked against the README's error table.
//! - [`worker`]: worker authentication — token and options in the proxy username.
//! - [`exits`]: exit pools (direct, HTTP CONNECT / SOCKS5 proxies, rotating gateways), node
//!   health (circuit breaker), sticky sessions and windows, reuse-aware node choice, and the
//!   rendezvous choice that lets a fleet of gateways agree on a session's exit.
//! - [`exitproto`]: client side of exit-proxy handshakes (HTTP `CONNECT`, SOCKS5).
#![warn(missing_docs)]

pub mod admin;
pub mod admission;
pub mod body;
pub mod ca;
pub mod cli;
pub mod config;
pub mod dial;
pub mod dns;
pub mod error;
pub mod exitproto;
pub mod exits;
pub mod forward;
pub mod gateway;
pub mod guard;
pub mod h1guard;
pub mod headers;
pub mod histogram;
pub mod ingress;
#[cfg(feature = "lab")]
pub mod lab;
pub mod pool;
pub mod portguard;
pub mod report;
pub mod retry;
pub mod route;
pub mod splice;
pub mod telemetry;
pub mod upgrade;
pub mod worker;
