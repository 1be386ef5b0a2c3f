//! route: everything that decides where a request goes — the target's addresses (resolved,
//! checked against the target policy and edgepool's own listeners, ordered with the ones that
//! recently failed a connect last), the exit and isolation scope ([`crate::exits`]), and the
//! upstream pool key that names the connection. [`crate::forward`] keeps checkout → send →
//! retry and asks this module where to go, and where to go next when an address or an exit
//! fails before anything was sent.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::dial::{DialError, OwnAddrs, Scheme, UpstreamKey};
use crate::dns::{ResolveError, Resolver, Source};
use crate::error::{EdgeError, ErrorKind, Sent};
use crate::exits::{ExitKey, ExitKind, Exits, Route, RouteError, RouteQuery};
use crate::guard::TargetPolicy;

/// How long an address that refused or timed out a connect is tried after the others.
pub const BAD_ADDR_TTL: Duration = Duration::from_secs(30);
/// At most this many further addresses are tried when connecting to one fails.
pub const MAX_ADDR_FAILOVER: usize = 2;
/// At most this many exit nodes are tried for one request when nodes fail to connect.
pub const MAX_EXIT_FAILOVER: usize = 3;

/// Where requests go: addresses, exits, pool keys.
pub struct Router {
    exits: Arc<Exits>,
    resolver: Resolver,
    policy: TargetPolicy,
    /// edgepool's own listening addresses: the proxy path must never reach them.
    own: OwnAddrs,
    /// Addresses whose TCP connect recently failed, and when (tried last for [`BAD_ADDR_TTL`]).
    bad_addrs: parking_lot::Mutex<std::collections::HashMap<IpAddr, Instant>>,
}

/// What a request to `host:port` resolved to: the addresses to try in order, how long it
/// took, and where the answer came from.
pub struct Candidates {
    /// In the order to try them (never empty).
    pub addrs: Vec<SocketAddr>,
    /// Time spent resolving.
    pub took: Duration,
    /// Where the answer came from (cache hit, stale, miss, hosts file, literal, ...).
    pub source: Source,
}

impl Router {
    /// A router over `exits`, resolving with `resolver` and checking with `policy`.
    pub fn new(exits: Arc<Exits>, resolver: Resolver, policy: TargetPolicy, own: OwnAddrs) -> Self {
        Router {
            exits,
            resolver,
            policy,
            own,
            bad_addrs: Default::default(),
        }
    }

    /// The exits and their routing state.
    pub fn exits(&self) -> &Arc<Exits> {
        &self.exits
    }

    /// The resolver (for its cache figures).
    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// Records edgepool's own listening addresses (once, when the listeners are bound):
    /// requests to them are refused as loops.
    pub fn set_own_addrs(&self, addrs: Vec<SocketAddr>) {
        self.own.set(addrs);
    }

    /// Which exit, in which isolation scope, for a request to `target` (`host:port`) from
    /// `worker`, not through the nodes in `exclude`. `warm(key)` says whether the pool holds an
    /// idle connection for a node (reuse-aware choice); the router asks it with its own lock
    /// released.
    pub fn route(
        &self,
        target: &str,
        worker: &crate::worker::Worker,
        exclude: &[usize],
        warm: &dyn Fn(&ExitKey) -> bool,
    ) -> Result<Route, EdgeError> {
        self.exits
            .route(&RouteQuery {
                target,
                token: &worker.token,
                options: &worker.options,
                exclude,
                warm,
            })
            .map_err(route_error)
    }

    /// Whether a dial error is the exit node's fault (the dialer has already told the node's
    /// circuit, once per dial): then another node may take the request.
    pub fn node_fault(e: &DialError) -> bool {
        matches!(
            e,
            DialError::ExitConnect { .. } | DialError::ExitAuth { .. }
        )
    }

    /// The pool key of a request to `host:port` over `scheme` through `exit`, connecting to
    /// `addr`. Plain http through an HTTP proxy rides the proxy's shared connection; through
    /// any proxy the exit resolves the name, so our address is only checked and does not split
    /// keys (round-robin DNS would cost connections).
    #[inline]
    pub fn upstream_key(
        scheme: Scheme,
        host: &Arc<str>,
        port: u16,
        verify: bool,
        exit: ExitKey,
        addr: SocketAddr,
    ) -> UpstreamKey {
        if scheme == Scheme::Http && exit.node.spec.kind == ExitKind::Http {
            return UpstreamKey::http_via(exit);
        }
        let addr = if exit.node.spec.kind == ExitKind::Direct {
            addr
        } else {
            SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port())
        };
        UpstreamKey::new(scheme, host.clone(), port, addr, exit, verify)
    }

    /// Every address of `host`, all checked against the target policy here, where they are
    /// used (the resolver checked them too when they entered its cache; one forbidden address
    /// refuses the target: a DNS answer mixing public and internal addresses is an attack), in
    /// the order to try them: the resolver's (IPv4 first — many scraping hosts have no working
    /// IPv6 route — and stable across answers), addresses that recently refused or timed out a
    /// connect last.
    pub async fn candidates(&self, host: &str, port: u16) -> Result<Candidates, EdgeError> {
        let t0 = Instant::now();
        let forbidden = |ip: IpAddr, why: &dyn std::fmt::Display| {
            EdgeError::new(
                ErrorKind::TargetForbidden,
                format!(
                    "{host} resolves to {ip}, a {why} address; edgepool refuses it unless it is \
                     allowed (--allow-target / targets.allow)"
                ),
            )
        };
        let resolved = self.resolver.resolve(host).await.map_err(|e| match e {
            ResolveError::Forbidden { ip, why } => forbidden(ip, &why),
            ResolveError::Failed(why) => EdgeError::dns_failed(host, why),
        })?;
        for ip in resolved.addrs.iter() {
            if self.own.contains(SocketAddr::new(*ip, port)) {
                return Err(EdgeError::new(
                    ErrorKind::LoopDetected,
                    format!(
                        "{host}:{port} is edgepool itself; a request through the proxy to its own \
                         listeners (proxy or admin) would loop or expose the admin endpoints"
                    ),
                ));
            }
            if let Err(why) = self.policy.check(*ip) {
                return Err(forbidden(*ip, &why));
            }
        }
        let mut addrs: Vec<SocketAddr> = resolved
            .addrs
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect();
        if addrs.len() > 1 {
            let now = Instant::now();
            let bad = self.bad_addrs.lock();
            if !bad.is_empty() {
                let recently_failed = |ip: &IpAddr| {
                    bad.get(ip)
                        .is_some_and(|at| now.saturating_duration_since(*at) < BAD_ADDR_TTL)
                };
                addrs.sort_by_key(|a| recently_failed(&a.ip()));
            }
        }
        Ok(Candidates {
            addrs,
            took: t0.elapsed(),
            source: resolved.source,
        })
    }

    /// Remembers that connecting to `ip` failed, so the next requests try another address.
    pub fn mark_failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut bad = self.bad_addrs.lock();
        if bad.len() >= 4096 {
            bad.retain(|_, at| now.saturating_duration_since(*at) < BAD_ADDR_TTL);
        }
        bad.insert(ip, now);
    }
}

/// The worker-facing error for a routing failure.
pub fn route_error(e: RouteError) -> EdgeError {
    let msg = e.to_string();
    match e {
        RouteError::UnknownPool(..) => EdgeError::new(ErrorKind::UnknownExitPool, msg),
        RouteError::DirectNotAllowed => EdgeError::new(ErrorKind::DirectNotAllowed, msg),
        RouteError::NoHealthyExit { retry_after, .. } => {
            EdgeError::new(ErrorKind::NoHealthyExit, msg)
                .with_retry_after(retry_after.as_secs_f64().ceil() as u32)
        }
        RouteError::SessionExitLost { .. } => EdgeError::new(ErrorKind::SessionExitLost, msg),
    }
    // Routing comes before any attempt (a failover's earlier attempts raise this).
    .with_sent(Sent::None)
}
