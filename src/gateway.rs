//! gateway: builds every part from a [`Config`] and runs the proxy and admin listeners until
//! shutdown. `serve` takes bound listeners and a shutdown future, so tests run the real
//! gateway in-process on port 0.
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::admin::{Admin, AdminParts};
use crate::ca::{CertAuthority, LeafCache};
use crate::config::Config;
use crate::dial::{DialConfig, Dialer};
use crate::dns::Resolver;
use crate::forward::{ForwardConfig, Forwarder};
use crate::guard::TargetPolicy;
use crate::ingress::{Ingress, IngressParts};
use crate::pool::Pool;
use crate::portguard::PortGuard;
use crate::report::ReportStore;
use crate::splice::Drain;
use crate::telemetry::Telemetry;
use crate::upgrade::Upgrades;

/// How long in-flight worker connections get to finish after shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Interval of the dashboard time series (`/status/history`) and of SLO re-evaluation.
pub use crate::admin::HISTORY_INTERVAL;

/// Stream limit assumed for an HTTP/2 server whose SETTINGS set none.
pub const DEFAULT_H2_MAX_STREAMS: usize = 100;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The CA could not be loaded or created.
    #[error("interception CA: {0}")]
    Ca(#[from] crate::ca::CaError),
    /// TLS client setup failed (e.g. an unreadable upstream CA file).
    #[error("{0}")]
    Tls(String),
    /// The exit pools are inconsistent.
    #[error("exits: {0}")]
    Exits(#[from] crate::exits::ExitsError),
    /// The reuse report store could not be opened.
    #[error("reuse report store: {0}")]
    Report(#[from] crate::report::ReportError),
}

/// The running gateway: the worker side ([`Ingress`]) and the operator side ([`Admin`]), each
/// handed only what it reads, plus what the background tasks and shutdown need.
pub struct Gateway {
    cfg: Arc<Config>,
    ingress: Arc<Ingress>,
    admin: Arc<Admin>,
    forwarder: Arc<Forwarder>,
    telemetry: Arc<Telemetry>,
    ports: PortGuard,
    shutting_down: Arc<AtomicBool>,
    /// Flips to true when shutdown starts: worker connections then close gracefully
    /// (HTTP/2 GOAWAY, HTTP/1 `Connection: close` after the response in flight).
    draining: tokio::sync::watch::Sender<bool>,
}

/// A burst of buffered request bodies at least this large is followed by handing freed memory
/// back to the OS once it has passed.
const RELEASE_AFTER_BURST: u64 = 32 << 20;

/// Likewise after the pool has closed at least this many upstream connections (each held tens
/// of KiB of buffers), three quarters of its high-water mark since the last release: a crawl's
/// wave of new targets otherwise leaves the process at its connection high-water mark for good.
const RELEASE_AFTER_CONNECTIONS: usize = 512;

/// Returns freed heap memory to the OS (glibc `malloc_trim`; a no-op elsewhere).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `edgepool_node_info{node, version} 1`: which gateway a scrape came from, by the name its
/// `/status` and report store use — a fleet's dashboards join on it (docs/SCALE.md).
fn register_node_info(registry: &mut prometheus_client::registry::Registry, node: &str) {
    use prometheus_client::metrics::{family::Family, gauge::Gauge};
    let info = Family::<Vec<(String, String)>, Gauge>::default();
    info.get_or_create(&vec![
        ("node".to_string(), node.to_string()),
        ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ])
    .set(1);
    registry.register(
        "edgepool_node_info",
        "This gateway: its node name (host-proxyport, as in /status) and version; always 1",
        info,
    );
}

/// This instance's name in a shared data dir: `<host name>-<proxy port>` (instances on one
/// host listen on different ports; hosts sharing storage have different names).
pub fn instance_name(proxy_port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let host = if host.is_empty() { "localhost" } else { &host };
    format!("{host}-{proxy_port}")
}

impl Gateway {
    /// Builds the gateway (loads or creates the CA in the data dir). Must run inside a tokio
    /// runtime (the pool starts its sweep task).
    pub fn new(cfg: Config) -> Result<Arc<Gateway>, StartError> {
        let data_dir = cfg.data_dir();
        let ca = Arc::new(CertAuthority::load_or_create(&data_dir)?);
        let node = instance_name(cfg.listen.proxy.port());
        let report = Arc::new(ReportStore::open_instance(&data_dir, &node)?);
        let ports = PortGuard::new();
        let alpn = if cfg.intercept.worker_http2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let leaves = LeafCache::new(
            ca.clone(),
            cfg.intercept.leaf_cache_size,
            cfg.intercept.leaf_validity,
            alpn,
        );
        for host in &cfg.upstream.insecure_skip_verify {
            tracing::warn!(host = %host, "certificate verification is OFF for this target (upstream.insecure_skip_verify)");
        }
        let own = crate::dial::OwnAddrs::default();
        let mut registry = prometheus_client::registry::Registry::default();
        register_node_info(&mut registry, &node);
        leaves.register_metrics(&mut registry);
        let resolver = Resolver::new(
            cfg.dns(),
            TargetPolicy::new(cfg.targets.allow.clone()),
            &mut registry,
        );
        let dialer = Dialer::new(DialConfig {
            connect_timeout: cfg.upstream.connect_timeout,
            tls_handshake_timeout: cfg.upstream.tls_handshake_timeout,
            http2: cfg.upstream.http2,
            extra_ca_files: cfg.upstream.extra_ca_files.clone(),
            default_max_streams: DEFAULT_H2_MAX_STREAMS,
            ports: Some(ports.clone()),
            resolver: Some(resolver.clone()),
            own: own.clone(),
        })
        .map_err(StartError::Tls)?;
        let upgrade_metrics = crate::upgrade::UpgradeMetrics::register(&mut registry);
        let telemetry = Arc::new(Telemetry::with_registry(
            registry,
            cfg.slo.clone(),
            cfg.trace.clone(),
        ));
        let pool = Pool::new(cfg.pool.to_pool_config(), dialer, telemetry.clone());
        let exits = Arc::new(crate::exits::Exits::new(
            &cfg.exits.pool_specs()?,
            cfg.exits.default_pool.as_deref(),
            crate::exits::ExitSettings {
                fleet_key: Some(ca.fleet_key()),
                ..cfg.exits.settings()
            },
        )?);
        telemetry.register_exits(exits.nodes());
        for n in exits.nodes().iter().skip(1) {
            tracing::info!(exit = %n.label, kind = n.spec.kind.as_str(), gateway = n.session_template.is_some(), "exit node");
        }
        let forwarder = Forwarder::new(
            pool,
            exits,
            resolver,
            TargetPolicy::new(cfg.targets.allow.clone()),
            telemetry.clone(),
            ForwardConfig {
                queue_timeout: cfg.pool.queue_timeout,
                response_header_timeout: cfg.upstream.response_header_timeout,
                response_body_idle_timeout: cfg.upstream.response_body_idle_timeout,
                drain_max_bytes: cfg.limits.drain_max_bytes,
                drain_timeout: cfg.limits.drain_timeout,
                insecure_hosts: cfg.upstream.insecure_skip_verify.clone(),
                retry_budget: cfg.limits.retry_budget,
            },
            own,
        );
        let cfg = Arc::new(cfg);
        let forwarder = Arc::new(forwarder);
        let (draining, drain) = Drain::channel();
        let shutting_down = Arc::new(AtomicBool::new(false));
        let upgrades = Arc::new(Upgrades::new(
            cfg.clone(),
            forwarder.clone(),
            telemetry.clone(),
            upgrade_metrics,
            drain.clone(),
        ));
        let ingress = Arc::new(Ingress::new(IngressParts {
            cfg: cfg.clone(),
            leaves,
            forwarder: forwarder.clone(),
            telemetry: telemetry.clone(),
            admission: crate::admission::Admission::new(&cfg.limits),
            upgrades,
            drain,
        }));
        let admin = Arc::new(Admin::new(AdminParts {
            cfg: cfg.clone(),
            ca,
            forwarder: forwarder.clone(),
            telemetry: telemetry.clone(),
            report,
            ports: ports.clone(),
            shutting_down: shutting_down.clone(),
            node,
        }));
        Ok(Arc::new(Gateway {
            cfg,
            ingress,
            admin,
            forwarder,
            telemetry,
            ports,
            shutting_down,
            draining,
        }))
    }

    /// The worker side (for serving a worker connection over any byte stream:
    /// [`crate::ingress::serve_worker_io`]).
    pub fn ingress(&self) -> &Arc<Ingress> {
        &self.ingress
    }

    /// The operator side (for [`crate::admin::status`]).
    pub fn admin(&self) -> &Arc<Admin> {
        &self.admin
    }

    /// Upgrade (WebSocket) counters.
    pub fn upgrades(&self) -> &crate::upgrade::UpgradeMetrics {
        self.ingress.upgrades()
    }

    /// Capacity limits (connections per worker, tunnels, requests in flight).
    pub fn admission(&self) -> &Arc<crate::admission::Admission> {
        self.ingress.admission()
    }

    /// Worker authentication.
    pub fn auth(&self) -> &crate::worker::WorkerAuth {
        self.ingress.auth()
    }
    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// The interception CA.
    pub fn ca(&self) -> &CertAuthority {
        self.admin.ca()
    }
    /// Leaf certificates for intercepted hosts.
    pub fn leaves(&self) -> &LeafCache {
        self.ingress.leaves()
    }
    /// The forwarder (and through it, the pool).
    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }
    /// Metrics and reuse accounting.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }
    /// The reuse-killers store.
    pub fn report(&self) -> &Arc<ReportStore> {
        self.admin.report()
    }
    /// The ephemeral-port budget.
    pub fn ports(&self) -> &PortGuard {
        &self.ports
    }
    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.admin.uptime()
    }
    /// True once shutdown started.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Writes what happened since the last flush into the report store.
    pub async fn flush_report(&self, prune: bool) {
        self.admin.flush_report(prune).await
    }

    /// Periodic work that lives as long as `serve`: the time series / SLO tick and the trace
    /// file writer.
    fn spawn_background(self: Arc<Self>) -> JoinSet<()> {
        let mut set = JoinSet::new();
        let gw = self.clone();
        set.spawn(async move {
            let mut tick = tokio::time::interval(HISTORY_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                gw.telemetry.tick();
                gw.forwarder.exits().sweep();
                // Connections of ended sessions/windows can never be used again: give their
                // sockets and exit budget back now instead of at the idle timeout.
                let ended = gw.forwarder.exits().take_ended_scopes();
                if !ended.is_empty() {
                    let ended: std::collections::HashSet<Arc<str>> = ended.into_iter().collect();
                    gw.forwarder.pool().close_idle_where(
                        |k| k.exit.scope.as_ref().is_some_and(|s| ended.contains(s)),
                        crate::pool::CloseReason::ScopeEnded,
                    );
                }
                gw.telemetry.record_exit_states(gw.forwarder.exits());
            }
        });
        // Memory after a burst of buffered bodies, or of upstream connections: hand it back to
        // the OS once the burst has passed (glibc keeps freed heap pages otherwise; RSS would
        // stay at the peak).
        let gw = self.clone();
        set.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut pending = 0u64;
            let mut conns_peak = 0usize;
            loop {
                tick.tick().await;
                let adm = gw.admission();
                pending = pending.max(adm.take_buffered_peak());
                let conns = gw.forwarder.pool().stats().total;
                conns_peak = conns_peak.max(conns);
                let bodies = pending >= RELEASE_AFTER_BURST && adm.buffered() < pending / 4;
                let connections =
                    conns_peak - conns >= RELEASE_AFTER_CONNECTIONS && conns <= conns_peak / 4;
                if bodies || connections {
                    pending = 0;
                    conns_peak = conns;
                    let _ = tokio::task::spawn_blocking(release_free_memory).await;
                }
            }
        });
        // Ephemeral-port budget: re-read the kernel's socket tables once a second.
        let gw = self.clone();
        set.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let ports = gw.ports.clone();
                let budget = tokio::task::spawn_blocking(move || {
                    ports.refresh();
                    ports.budget()
                })
                .await;
                if let Ok(b) = budget {
                    gw.telemetry.set_ports_used(b.used_ratio);
                }
            }
        });
        // Reuse-killers store: one bucket per minute; old buckets pruned hourly.
        let gw = self.clone();
        set.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            tick.tick().await;
            let mut n = 0u64;
            loop {
                tick.tick().await;
                n += 1;
                gw.flush_report(n % 60 == 0).await;
            }
        });
        if let Some(path) = self.cfg.trace.file.clone() {
            let mut rx = self.telemetry.subscribe_trace();
            set.spawn(async move {
                use tokio::io::AsyncWriteExt;
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .await;
                let mut file = match file {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::error!(path = %path.display(), "cannot open trace.file: {e}");
                        return;
                    }
                };
                loop {
                    match rx.recv().await {
                        Ok(line) => {
                            let mut b = line.as_bytes().to_vec();
                            b.push(b'\n');
                            if let Err(e) = file.write_all(&b).await {
                                tracing::error!(path = %path.display(), "writing trace.file: {e}");
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!("trace.file fell behind; {n} records dropped");
                        }
                        Err(_) => return,
                    }
                }
            });
        }
        set
    }

    /// Serves workers on `proxy` and operators on `admin` until `shutdown` completes; then
    /// stops accepting, lets in-flight connections finish for up to [`SHUTDOWN_GRACE`], and
    /// closes the pool.
    pub async fn serve(
        self: Arc<Self>,
        proxy: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) {
        let own: Vec<std::net::SocketAddr> = [proxy.local_addr(), admin.local_addr()]
            .into_iter()
            .flatten()
            .collect();
        self.forwarder.set_own_addrs(own);
        let mut conns = JoinSet::new();
        let mut admin_conns = JoinSet::new();
        let mut background = self.clone().spawn_background();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = proxy.accept() => match accepted {
                    Ok((stream, _)) => {
                        conns.spawn(crate::ingress::serve_worker(self.ingress.clone(), stream));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed on the proxy listener: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                accepted = admin.accept() => match accepted {
                    Ok((stream, peer)) if admin_conns.len() >= crate::admin::ADMIN_MAX_CONNECTIONS => {
                        tracing::warn!(%peer, "admin connection refused: {} already open", crate::admin::ADMIN_MAX_CONNECTIONS);
                        drop(stream);
                    }
                    Ok((stream, _)) => {
                        admin_conns.spawn(crate::admin::serve_admin(self.admin.clone(), stream));
                    }
                    Err(e) => {
                        tracing::warn!("accept failed on the admin listener: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                Some(_) = admin_conns.join_next(), if !admin_conns.is_empty() => {}
            }
        }
        self.shutting_down.store(true, Ordering::Relaxed);
        drop(proxy);
        drop(admin);
        // Worker connections finish what they carry and close (HTTP/2: GOAWAY).
        self.draining.send_replace(true);
        admin_conns.abort_all();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        conns.abort_all();
        background.abort_all();
        self.forwarder.pool().shutdown();
        // Keep the last partial minute: a restart must not lose the report's counts.
        self.flush_report(false).await;
    }
}
