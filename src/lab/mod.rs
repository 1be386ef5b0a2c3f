//! lab: the reuse lab (`edgepool lab`) — loopback origins with behaviour profiles and injected
//! handshake delays, optional exits, a seeded worker fleet run in several modes on the same
//! workload, and a side-by-side report (terminal table, JSON, self-contained HTML).
//!
//! Modes:
//! - `no-keepalive`: every request on a new connection (`Connection: close`, no pool);
//! - `per-worker`: each worker keeps its own pool (2 idle connections per host, HTTP/1.1, like
//!   `requests.Session` or Go's default transport), and its own exits when there are any;
//! - `edgepool`: every worker goes through one in-process edgepool gateway (on its own runtime
//!   thread, so its CPU time is measured apart);
//! - `external`: through any other proxy (`--gateway ADDR --ca FILE`), measured the same way.
//!
//! R is measured at the origins (accepted connections vs requests answered), and compared with
//! the greedy reference ([`oracle`]): a greedy pool replaying the same timeline. It is a
//! heuristic, not a bound — a pool can need fewer connections (edgepool has reached 100.2 % of
//! it) — so "R / reference" compares, it does not measure a distance from the optimum.
pub mod dns;
pub mod exit;
pub mod html;
pub mod oracle;
pub mod origin;
pub mod scenario;
pub mod workload;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use self::exit::LabExit;
use self::oracle::{Limits, Span};
use self::origin::{LabCa, LabOrigin, OriginProfile};
use self::scenario::{Scenario, WorkerRotation};

/// How the worker fleet reaches the targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A new connection per request.
    NoKeepalive,
    /// Each worker keeps its own small pool.
    PerWorker,
    /// Through an in-process edgepool.
    Edgepool,
    /// Through another proxy.
    External {
        /// Its address.
        gateway: SocketAddr,
        /// The CA it signs intercepted certificates with (PEM), if it intercepts.
        ca: Option<PathBuf>,
    },
}

impl Mode {
    /// The report name.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::NoKeepalive => "no-keepalive",
            Mode::PerWorker => "per-worker",
            Mode::Edgepool => "edgepool",
            Mode::External { .. } => "external",
        }
    }
}

/// How workers name the targets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Names {
    /// By address: `127.0.0.1:PORT` (`localhost:PORT` for HTTPS, resolved as a literal).
    #[default]
    Addresses,
    /// As `<target>.lab.test:PORT`, answered by the lab's DNS server on loopback through
    /// edgepool's real resolver path (`upstream.dns_servers`), with answers of TTL `ttl`
    /// seconds and the server misbehaving as `fault` says.
    Dns {
        /// TTL of the answers, seconds.
        ttl: u32,
        /// How the DNS server misbehaves.
        fault: DnsFault,
    },
    /// As `<target>.lab.test:PORT`, listed in a hosts file that edgepool reads
    /// (`upstream.hosts_file`): `file`, which must already list every target (see
    /// [`hosts_lines`]) — e.g. `/etc/hosts` in a private mount namespace — or else a file the
    /// lab writes. Edgepool's DNS server misbehaves as `fault` says (hosts names must not
    /// notice).
    Hosts {
        /// A hosts file that lists the targets; `None`: the lab writes its own.
        file: Option<PathBuf>,
        /// How the DNS server misbehaves.
        fault: DnsFault,
        /// Ask the system's resolvers (`/etc/resolv.conf`) instead of the lab's DNS server.
        system_resolver: bool,
    },
}

/// How the lab's DNS server misbehaves (`--dns-fault`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DnsFault {
    /// Answers every query.
    #[default]
    None,
    /// Answers nothing (every query dropped).
    Drop,
    /// Nothing listens on its port: every query is refused at once (ICMP port unreachable).
    Refuse,
    /// Answers A, drops AAAA (the classic 5 s AAAA timeout).
    DropAaaa,
    /// Answers for `after` from its first query, then nothing (an outage mid-run).
    Outage {
        /// How long it answers.
        after: Duration,
    },
}

impl DnsFault {
    /// The `--dns-fault` spelling.
    pub fn name(&self) -> String {
        match self {
            DnsFault::None => "none".into(),
            DnsFault::Drop => "drop".into(),
            DnsFault::Refuse => "refuse".into(),
            DnsFault::DropAaaa => "drop-aaaa".into(),
            DnsFault::Outage { after } => format!("outage-after-{}s", after.as_secs()),
        }
    }

    /// Parses `none`, `drop`, `refuse`, `drop-aaaa` or `outage` (answers for 2 s, then
    /// nothing).
    pub fn parse(s: &str) -> Result<DnsFault, String> {
        Ok(match s {
            "none" => DnsFault::None,
            "drop" => DnsFault::Drop,
            "refuse" => DnsFault::Refuse,
            "drop-aaaa" => DnsFault::DropAaaa,
            "outage" => DnsFault::Outage {
                after: Duration::from_secs(2),
            },
            other => {
                return Err(format!(
                    "--dns-fault {other}: unknown; use none, drop, refuse, drop-aaaa or outage"
                ))
            }
        })
    }
}

/// The DNS label of a lab target (`static-1` → `static-1.lab.test`).
pub fn target_host(target_name: &str) -> String {
    let label: String = target_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("{}.{}", label.trim_matches('-'), origin::LAB_DOMAIN)
}

/// The hosts-file lines that name `sc`'s targets (`127.0.0.1 <target>.lab.test`), for
/// `--names hosts --hosts-file FILE`.
pub fn hosts_lines(sc: &Scenario) -> String {
    let mut out = String::new();
    for g in &sc.targets {
        for i in 1..=g.count {
            out.push_str(&format!(
                "127.0.0.1 {}\n",
                target_host(&format!("{}-{i}", g.name))
            ));
        }
    }
    out
}

/// How to run the lab.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// `quick_requests_per_worker` instead of `requests_per_worker`.
    pub quick: bool,
    /// Modes, in order.
    pub modes: Vec<Mode>,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
    /// How targets are named (addresses, or names through DNS or a hosts file).
    pub names: Names,
}

/// One target of the run.
struct Target {
    name: String,
    /// `<name>.lab.test` when targets are named (workers going direct map it to the origin).
    host: Option<String>,
    group: String,
    origin: LabOrigin,
    url: String,
    limits: Limits,
    handshake: Duration,
}

/// What one request did.
struct Sample {
    span: Span,
    ok: bool,
}

/// Runs the scenario in every mode and returns the report document (the `--json` schema).
pub async fn run(sc: &Scenario, opts: &LabOptions) -> Result<Value, String> {
    let per_worker = sc.per_worker(opts.quick);
    let ca = LabCa::new()?;
    let tmp = tempdir()?;
    let ca_file = tmp.join("lab-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).map_err(|e| format!("{}: {e}", ca_file.display()))?;
    // Origins, most popular first.
    let mut targets = Vec::new();
    for g in &sc.targets {
        for i in 1..=g.count {
            let profile = OriginProfile {
                tls: g.tls,
                h2: g.h2,
                max_concurrent_streams: g.max_concurrent_streams,
                idle_timeout: g.idle_timeout,
                max_requests: g.max_requests,
                goaway_every: g.goaway_every,
                rst_idle_fraction: g.rst_idle_fraction,
                body_bytes: g.body_bytes,
                tcp_delay: sc.delays.tcp_connect,
                tls_delay: if g.tls {
                    sc.delays.tls_handshake
                } else {
                    Duration::ZERO
                },
                ttfb_delay: sc.delays.ttfb,
                seed: sc.seed.wrapping_add(targets.len() as u64),
            };
            let origin = LabOrigin::start(profile, Some(&ca))
                .await
                .map_err(|e| format!("starting a lab origin: {e}"))?;
            let cap = match (g.max_requests, g.goaway_every) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let name = format!("{}-{i}", g.name);
            let host = (opts.names != Names::Addresses).then(|| target_host(&name));
            let url = match &host {
                None => format!("{}lab/{}", origin.base_url(), targets.len()),
                Some(h) => format!(
                    "{}://{h}:{}/lab/{}",
                    if g.tls { "https" } else { "http" },
                    origin.addr().port(),
                    targets.len()
                ),
            };
            targets.push(Target {
                name,
                host,
                group: g.name.clone(),
                url,
                limits: Limits {
                    concurrency: if g.h2 { g.max_concurrent_streams } else { 1 },
                    max_requests: cap,
                    idle_timeout: g.idle_timeout,
                },
                handshake: sc.delays.tcp_connect
                    + if g.tls {
                        sc.delays.tls_handshake
                    } else {
                        Duration::ZERO
                    },
                origin,
            });
        }
    }
    let names = LabNames::start(&opts.names, &targets, sc, &tmp).await?;
    let mut exits = Vec::new();
    if let Some(x) = &sc.exits {
        for _ in 0..x.count {
            exits.push(
                LabExit::start()
                    .await
                    .map_err(|e| format!("starting a lab exit: {e}"))?,
            );
        }
    }
    let plan = Arc::new(workload::plan(
        sc.seed,
        sc.workers,
        per_worker,
        targets.len(),
        sc.zipf_s,
        sc.paced_fraction,
        sc.pace,
    ));
    let targets = Arc::new(targets);
    let exit_urls: Arc<Vec<String>> = Arc::new(exits.iter().map(|e| e.url()).collect());
    let mut modes = Vec::new();
    for mode in &opts.modes {
        for t in targets.iter() {
            t.origin.reset().await;
        }
        let m = run_mode(
            sc, mode, &targets, &exit_urls, &plan, &ca, &ca_file, &tmp, opts, &names,
        )
        .await?;
        modes.push(m);
    }
    let names_report = names.report();
    drop(names);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(json!({
        "scenario": sc.name,
        "description": sc.description,
        "quick": opts.quick,
        "seed": sc.seed,
        "started": time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        "machine": machine(),
        "edgepool_version": env!("CARGO_PKG_VERSION"),
        "workers": sc.workers,
        "requests_per_worker": per_worker,
        "delays_ms": {
            "tcp_connect": sc.delays.tcp_connect.as_secs_f64() * 1e3,
            "tls_handshake": sc.delays.tls_handshake.as_secs_f64() * 1e3,
            "ttfb": sc.delays.ttfb.as_secs_f64() * 1e3,
        },
        "exits": exits.len(),
        "names": names_report,
        "targets": targets.iter().map(|t| {
            let p = t.origin.profile();
            json!({
                "name": t.name, "authority": t.origin.authority(), "profile": t.group,
                "tls": p.tls, "h2": p.h2, "max_requests": t.limits.max_requests,
                "idle_timeout_ms": p.idle_timeout.map(|d| d.as_millis() as u64),
            })
        }).collect::<Vec<_>>(),
        "reference": "greedy reference R = 1 − C / N, where N is the requests answered and C the connections a greedy pool opens when it replays the same request timeline: requests to different targets or through different exits never share a connection; an HTTP/1.1 connection carries one request at a time, an HTTP/2 connection up to the server's max_concurrent_streams; a connection carries at most the server's max_requests (or goaway_every) requests and is gone after the server's idle_timeout. Each request takes the most used connection that is usable when it starts, or opens one. This is a heuristic, not a lower bound on connections: a pool can do better (R / reference above 100 %). Random resets are ignored (the reference is optimistic where a scenario injects them).",
        "modes": modes,
    }))
}

/// The naming machinery of a run: the lab's DNS server and hosts file, when targets are named.
struct LabNames {
    names: Names,
    dns: Option<dns::LabDns>,
    /// What the gateway gets as `upstream.dns_servers` (a port nobody listens on for `refuse`).
    servers: Vec<SocketAddr>,
    hosts_file: Option<PathBuf>,
}

impl LabNames {
    async fn start(
        names: &Names,
        targets: &[Target],
        sc: &Scenario,
        tmp: &std::path::Path,
    ) -> Result<LabNames, String> {
        let (fault, ttl) = match names {
            Names::Addresses => {
                return Ok(LabNames {
                    names: names.clone(),
                    dns: None,
                    servers: Vec::new(),
                    hosts_file: None,
                })
            }
            Names::Dns { ttl, fault } => (*fault, *ttl),
            Names::Hosts { fault, .. } => (*fault, 60),
        };
        let system = matches!(
            names,
            Names::Hosts {
                system_resolver: true,
                ..
            }
        );
        let zone: std::collections::HashMap<String, Vec<std::net::IpAddr>> = targets
            .iter()
            .filter_map(|t| t.host.clone())
            .map(|h| (h, vec![std::net::IpAddr::from([127, 0, 0, 1])]))
            .collect();
        let answer = dns::LabDns::zone(zone, ttl);
        let handler: dns::Handler = match fault {
            DnsFault::None | DnsFault::Refuse => answer,
            DnsFault::Drop => dns::LabDns::silent(),
            DnsFault::DropAaaa => Arc::new(move |q: &dns::DnsQuery| match q.qtype {
                dns::QType::Aaaa => dns::Reply::Drop,
                _ => answer(q),
            }),
            #[allow(clippy::disallowed_methods)] // the lab DNS server's outage starts in wall time
            DnsFault::Outage { after } => {
                let first = std::sync::OnceLock::new();
                Arc::new(move |q: &dns::DnsQuery| {
                    if first.get_or_init(std::time::Instant::now).elapsed() > after {
                        dns::Reply::Drop
                    } else {
                        answer(q)
                    }
                })
            }
        };
        let (server, servers) = if system {
            (None, Vec::new())
        } else if fault == DnsFault::Refuse {
            // A UDP port that was free a moment ago and has nobody behind it.
            let dead = std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .map_err(|e| format!("lab DNS: {e}"))?;
            (None, vec![dead])
        } else {
            let server = dns::LabDns::start(handler)
                .await
                .map_err(|e| format!("starting the lab DNS server: {e}"))?;
            let addr = server.addr();
            (Some(server), vec![addr])
        };
        let hosts_file = match names {
            Names::Hosts { file: Some(f), .. } => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| format!("--hosts-file {}: {e}", f.display()))?;
                let listed = crate::dns::parse_hosts(&text);
                let missing: Vec<&str> = targets
                    .iter()
                    .filter_map(|t| t.host.as_deref())
                    .filter(|h| !listed.contains_key(*h))
                    .collect();
                if !missing.is_empty() {
                    return Err(format!(
                        "--hosts-file {} does not list {} of the targets (first: {}); add the lines `edgepool lab --scenario {} --print-hosts` prints",
                        f.display(),
                        missing.len(),
                        missing[0],
                        sc.name
                    ));
                }
                Some(f.clone())
            }
            Names::Hosts { file: None, .. } => {
                let f = tmp.join("hosts");
                std::fs::write(&f, hosts_lines(sc)).map_err(|e| format!("{}: {e}", f.display()))?;
                Some(f)
            }
            _ => None,
        };
        Ok(LabNames {
            names: names.clone(),
            dns: server,
            servers,
            hosts_file,
        })
    }

    /// Points the gateway at the lab's DNS server and hosts file.
    fn configure(&self, cfg: &mut crate::config::Config) {
        if self.names == Names::Addresses {
            return;
        }
        cfg.upstream.dns_servers = self.servers.clone();
        cfg.upstream.hosts_file = self.hosts_file.clone().unwrap_or_default();
    }

    fn report(&self) -> Value {
        let (kind, fault, ttl) = match &self.names {
            Names::Addresses => ("addresses", None, None),
            Names::Dns { ttl, fault } => ("dns", Some(fault.name()), Some(*ttl)),
            Names::Hosts {
                fault,
                system_resolver: true,
                ..
            } => (
                "hosts",
                Some(format!("system resolver ({})", fault.name())),
                None,
            ),
            Names::Hosts { fault, .. } => ("hosts", Some(fault.name()), None),
        };
        json!({
            "kind": kind,
            "dns_fault": fault,
            "dns_ttl_s": ttl,
            "hosts_file": self.hosts_file.as_ref().map(|p| p.display().to_string()),
            "dns_queries_received": self.dns.as_ref().map(|d| d.total_queries()),
        })
    }
}

/// A temporary directory (removed by the caller).
fn tempdir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "edgepool-lab-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| std::env::consts::OS.to_string());
    format!("{cpus} CPU, {} {kernel}", std::env::consts::OS)
}

/// A running in-process gateway on its own runtime (its threads are named `ep-gw`).
struct LabGateway {
    rt: Option<tokio::runtime::Runtime>,
    gw: Arc<crate::gateway::Gateway>,
    proxy: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl LabGateway {
    async fn start(cfg: crate::config::Config) -> Result<LabGateway, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_name("ep-gw")
            .enable_all()
            .build()
            .map_err(|e| format!("gateway runtime: {e}"))?;
        let proxy = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let admin = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let addr = proxy.local_addr().map_err(|e| e.to_string())?;
        proxy.set_nonblocking(true).map_err(|e| e.to_string())?;
        admin.set_nonblocking(true).map_err(|e| e.to_string())?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(async move {
            let started = async {
                let gw = crate::gateway::Gateway::new(cfg).map_err(|e| e.to_string())?;
                let p = tokio::net::TcpListener::from_std(proxy).map_err(|e| e.to_string())?;
                let a = tokio::net::TcpListener::from_std(admin).map_err(|e| e.to_string())?;
                Ok::<_, String>((gw, p, a))
            };
            match started.await {
                Ok((gw, p, a)) => {
                    let _ = ready_tx.send(Ok(gw.clone()));
                    gw.serve(p, a, async move {
                        let _ = stop_rx.await;
                    })
                    .await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
            let _ = done_tx.send(());
        });
        let gw = ready_rx
            .await
            .map_err(|_| "the gateway runtime stopped".to_string())??;
        Ok(LabGateway {
            rt: Some(rt),
            gw,
            proxy: addr,
            stop: Some(stop_tx),
            done: Some(done_rx),
        })
    }

    /// Stops the gateway (its graceful shutdown) and its runtime.
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), done).await;
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for LabGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// CPU seconds (user + system) of this process's threads whose name starts with `prefix`.
fn thread_cpu_seconds(prefix: &str) -> Option<f64> {
    let ticks = 100.0; // USER_HZ on Linux
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = entry.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // Fields after the ")" of the command: state is field 3; utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 12 {
            total += f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        }
    }
    Some(total as f64 / ticks)
}

#[allow(clippy::too_many_arguments)]
async fn run_mode(
    sc: &Scenario,
    mode: &Mode,
    targets: &Arc<Vec<Target>>,
    exit_urls: &Arc<Vec<String>>,
    plan: &Arc<Vec<Vec<workload::Step>>>,
    ca: &LabCa,
    ca_file: &std::path::Path,
    tmp: &std::path::Path,
    opts: &LabOptions,
    names: &LabNames,
) -> Result<Value, String> {
    let lab_root = reqwest::Certificate::from_pem(ca.cert_pem().as_bytes())
        .map_err(|e| format!("lab CA: {e}"))?;
    let mut gateway = None;
    // Per worker: one client per way out (one per exit when workers manage exits).
    let base = || {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(15))
    };
    // Workers going direct find named targets like a hosts file would tell them (a proxy
    // resolves them itself).
    let direct = || {
        let mut b = base();
        for t in targets.iter() {
            if let Some(h) = &t.host {
                b = b.resolve(h, t.origin.addr());
            }
        }
        b
    };
    let mut clients: Vec<Vec<reqwest::Client>> = Vec::new();
    let self_managed = !exit_urls.is_empty() && matches!(mode, Mode::NoKeepalive | Mode::PerWorker);
    for _ in 0..sc.workers {
        let mut mine = Vec::new();
        match mode {
            Mode::NoKeepalive | Mode::PerWorker => {
                let ways: Vec<Option<&String>> = if self_managed {
                    exit_urls.iter().map(Some).collect()
                } else {
                    vec![None]
                };
                for via in ways {
                    // HTTP/1.1 like requests.Session (and free of a client-side HTTP/2 bug
                    // that drops requests queued on a connection that got GOAWAY).
                    let mut b = direct().add_root_certificate(lab_root.clone()).http1_only();
                    b = if *mode == Mode::NoKeepalive {
                        b.pool_max_idle_per_host(0)
                    } else {
                        b.pool_max_idle_per_host(2)
                            .pool_idle_timeout(Duration::from_secs(90))
                    };
                    b = match via {
                        Some(u) => b.proxy(reqwest::Proxy::all(u).map_err(|e| e.to_string())?),
                        None => b.no_proxy(),
                    };
                    mine.push(b.build().map_err(|e| e.to_string())?);
                }
            }
            Mode::Edgepool => {
                if gateway.is_none() {
                    let mut cfg = crate::config::Config {
                        data_dir: Some(tmp.join("gateway")),
                        ..Default::default()
                    };
                    cfg.targets.allow = vec![
                        "127.0.0.0/8".parse().expect("valid CIDR"),
                        "::1/128".parse().expect("valid CIDR"),
                    ];
                    // Lab origins listen on ephemeral ports.
                    cfg.targets.connect_ports = vec![crate::config::PortRange { lo: 1, hi: 65535 }];
                    cfg.upstream.extra_ca_files = vec![ca_file.to_path_buf()];
                    cfg.trace.sample_rate = 0.0;
                    names.configure(&mut cfg);
                    // Lab targets miss the fleet SLO by design (that is what they model): no
                    // breach warnings in the middle of the report.
                    cfg.slo.reuse_target = 0.0;
                    if let Some(x) = &sc.exits {
                        cfg.exits.sticky_window = x.sticky_window;
                        cfg.exits.pools.push(crate::config::ExitPoolConfig {
                            name: "lab".into(),
                            nodes: exit_urls.to_vec(),
                            session_template: None,
                            max_connections_per_node: None,
                        });
                    }
                    cfg.validate().map_err(|e| e.to_string())?;
                    gateway = Some(LabGateway::start(cfg).await?);
                }
                let g = gateway.as_ref().expect("started above");
                let root = reqwest::Certificate::from_pem(g.gw.ca().cert_pem().as_bytes())
                    .map_err(|e| e.to_string())?;
                mine.push(
                    base()
                        .add_root_certificate(root)
                        .proxy(
                            reqwest::Proxy::all(format!("http://{}", g.proxy))
                                .map_err(|e| e.to_string())?,
                        )
                        .build()
                        .map_err(|e| e.to_string())?,
                );
            }
            Mode::External { gateway, ca } => {
                let mut b = base().add_root_certificate(lab_root.clone()).proxy(
                    reqwest::Proxy::all(format!("http://{gateway}")).map_err(|e| e.to_string())?,
                );
                if let Some(p) = ca {
                    let pem = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
                    b = b.add_root_certificate(
                        reqwest::Certificate::from_pem(&pem)
                            .map_err(|e| format!("{}: {e}", p.display()))?,
                    );
                }
                mine.push(b.build().map_err(|e| e.to_string())?);
            }
        }
        clients.push(mine);
    }
    let total = (sc.workers * plan.first().map_or(0, Vec::len)) as u64;
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>14} [{bar:40}] {pos}/{len} requests  {elapsed}  {msg}",
            )
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
        );
        b.set_prefix(mode.name());
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let cpu_before = gateway.as_ref().and_then(|_| thread_cpu_seconds("ep-gw"));
    let dns_before = gateway
        .as_ref()
        .map(|g: &LabGateway| g.gw.forwarder().resolver().stats());
    let before_reasons = gateway
        .as_ref()
        .map(|g| crate::admin::status(g.gw.admin(), 0).fleet.new_by_reason)
        .unwrap_or_default();
    // edgepool's own count of the same run (`/status` fleet), to set beside the origins'.
    let before_fleet = gateway.as_ref().map(|g| {
        let f = crate::admin::status(g.gw.admin(), 0).fleet;
        (f.requests, f.new_connections)
    });
    let started = Instant::now();
    let rotation = sc
        .exits
        .as_ref()
        .map(|x| (x.worker_rotation, x.sticky_window));
    let mut tasks = Vec::new();
    for (w, mine) in clients.into_iter().enumerate() {
        let plan = plan.clone();
        let targets = targets.clone();
        let bar = bar.clone();
        let seed = sc.seed;
        tasks.push(tokio::spawn(async move {
            let mut rng = workload::Rng::new(seed ^ 0x5EED ^ w as u64);
            let mut sticky: Option<(usize, Instant)> = None;
            let mut out = Vec::with_capacity(plan[w].len());
            for step in &plan[w] {
                // Which of the worker's own ways out (exits it manages itself).
                let way = if mine.len() > 1 {
                    match rotation {
                        Some((WorkerRotation::Sticky, window)) => match sticky {
                            Some((i, since)) if since.elapsed() < window => i,
                            _ => {
                                let i = (rng.next_u64() % mine.len() as u64) as usize;
                                sticky = Some((i, Instant::now()));
                                i
                            }
                        },
                        _ => (rng.next_u64() % mine.len() as u64) as usize,
                    }
                } else {
                    0
                };
                let t = &targets[step.target];
                let t0 = started.elapsed();
                let res = mine[way].get(&t.url).send().await;
                let (ok, exit) = match res {
                    Ok(r) => {
                        let exit = r
                            .headers()
                            .get("x-edgepool-exit")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.rsplit_once('/'))
                            .and_then(|(_, n)| n.parse::<usize>().ok())
                            .unwrap_or(0);
                        let status = r.status();
                        let want = t.origin.profile().body_bytes;
                        match r.bytes().await {
                            Ok(b) => (status == 200 && b.len() == want, exit),
                            Err(_) => (false, exit),
                        }
                    }
                    Err(_) => (false, 0),
                };
                let exit = if mine.len() > 1 { way + 1 } else { exit };
                out.push(Sample {
                    span: Span {
                        target: step.target,
                        exit,
                        start: t0,
                        end: started.elapsed(),
                    },
                    ok,
                });
                bar.inc(1);
                if !step.pause.is_zero() {
                    tokio::time::sleep(step.pause).await;
                }
            }
            out
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.map_err(|e| format!("a worker failed: {e}"))?);
    }
    let wall = started.elapsed();
    bar.finish_and_clear();
    let cpu = match (
        cpu_before,
        gateway.as_ref().and_then(|_| thread_cpu_seconds("ep-gw")),
    ) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let gateway_counts = match (before_fleet, gateway.as_ref()) {
        (Some((req0, new0)), Some(g)) => {
            let f = crate::admin::status(g.gw.admin(), 0).fleet;
            let (req, new) = (f.requests - req0, f.new_connections - new0);
            json!({"requests": req, "new_connections": new,
                   "reuse_rate": round4(oracle::reuse_rate(req, new))})
        }
        _ => Value::Null,
    };
    let reasons: BTreeMap<&'static str, u64> = gateway
        .as_ref()
        .map(|g| {
            crate::admin::status(g.gw.admin(), 0)
                .fleet
                .new_by_reason
                .into_iter()
                .map(|(k, v)| (k, v - before_reasons.get(k).copied().unwrap_or(0)))
                .filter(|(_, v)| *v > 0)
                .collect()
        })
        .unwrap_or_default();
    let dns = match (dns_before, gateway.as_ref()) {
        (Some(a), Some(g)) => {
            let b = g.gw.forwarder().resolver().stats();
            Some(json!({
                "hit": b.hit - a.hit, "stale": b.stale - a.stale, "miss": b.miss - a.miss,
                "joined": b.joined - a.joined, "failed": b.failed - a.failed,
                "hosts": b.hosts - a.hosts, "literal": b.literal - a.literal,
                "queries": b.queries - a.queries,
                "queries_failed": b.queries_failed - a.queries_failed,
                "refreshes_ok": b.refreshes_ok - a.refreshes_ok,
                "refreshes_failed": b.refreshes_failed - a.refreshes_failed,
            }))
        }
        _ => None,
    };
    // Give late closes (early-released responses) a moment to land in the origins' counters.
    tokio::time::sleep(Duration::from_millis(50)).await;
    if let Some(g) = gateway {
        g.stop().await;
    }
    let mut report = mode_report(mode, targets, &samples, wall, cpu, reasons);
    report["dns"] = dns.unwrap_or(Value::Null);
    report["gateway_status"] = gateway_counts;
    Ok(report)
}

fn mode_report(
    mode: &Mode,
    targets: &[Target],
    samples: &[Sample],
    wall: Duration,
    cpu: Option<f64>,
    reasons: BTreeMap<&'static str, u64>,
) -> Value {
    let requests = samples.len() as u64;
    let errors = samples.iter().filter(|s| !s.ok).count() as u64;
    let spans: Vec<Span> = samples.iter().filter(|s| s.ok).map(|s| s.span).collect();
    let limits: Vec<Limits> = targets.iter().map(|t| t.limits).collect();
    let reference_conns = oracle::connections(&spans, &limits);
    let mut per_target = Vec::new();
    let (mut conns, mut answered, mut reference_total, mut handshake) = (0u64, 0u64, 0u64, 0.0);
    for (i, t) in targets.iter().enumerate() {
        let (c, r) = (t.origin.accepted(), t.origin.requests());
        conns += c;
        answered += r;
        reference_total += reference_conns[i];
        handshake += c as f64 * t.handshake.as_secs_f64();
        let ok_requests = spans.iter().filter(|s| s.target == i).count() as u64;
        per_target.push(json!({
            "target": t.name,
            "requests": r,
            "connections": c,
            "reuse_rate": round4(oracle::reuse_rate(r, c)),
            "reference_reuse_rate": round4(oracle::reuse_rate(ok_requests, reference_conns[i])),
        }));
    }
    let mut lat: Vec<f64> = samples
        .iter()
        .map(|s| (s.span.end - s.span.start).as_secs_f64() * 1e3)
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
        round3(lat[i])
    };
    let mean = if lat.is_empty() {
        0.0
    } else {
        lat.iter().sum::<f64>() / lat.len() as f64
    };
    let step = (lat.len() / 200).max(1);
    let mut cdf: Vec<[f64; 2]> = lat
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0)
        .map(|(i, v)| [round3(*v), round4((i + 1) as f64 / lat.len() as f64)])
        .collect();
    if let Some(last) = lat.last() {
        cdf.push([round3(*last), 1.0]);
    }
    let ok = spans.len() as u64;
    json!({
        "mode": mode.name(),
        "requests": requests,
        "errors": errors,
        "wall_seconds": round3(wall.as_secs_f64()),
        "throughput_rps": round3(requests as f64 / wall.as_secs_f64().max(1e-9)),
        "origin_connections": conns,
        "origin_requests": answered,
        "reuse_rate": round4(oracle::reuse_rate(answered, conns)),
        "reference_reuse_rate": round4(oracle::reuse_rate(ok, reference_total)),
        "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                       "max": round3(lat.last().copied().unwrap_or(0.0)), "mean": round3(mean)},
        "requests_over_1s": lat.iter().filter(|ms| **ms > 1000.0).count(),
        "latency_cdf": cdf,
        "per_target": per_target,
        "new_by_reason": reasons,
        "gateway_cpu_seconds": cpu.map(round3),
        "handshake_seconds_paid": round3(handshake),
    })
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}
fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// The terminal table of a report.
pub fn render_table(r: &Value) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "edgepool lab · scenario {} ({}) · {} workers × {} requests · seed {}",
        r["scenario"].as_str().unwrap_or(""),
        if r["quick"] == true { "quick" } else { "full" },
        r["workers"].as_u64().unwrap_or(0),
        r["requests_per_worker"].as_u64().unwrap_or(0),
        r["seed"].as_u64().unwrap_or(0)
    );
    let _ = writeln!(
        s,
        "{:<13} {:>8} {:>6} {:>7} {:>8} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>10}",
        "mode",
        "requests",
        "errors",
        "conns",
        "R",
        "ref R",
        "R/ref",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "req/s",
        "gw CPU s",
        "handshk s"
    );
    for m in r["modes"].as_array().into_iter().flatten() {
        let rr = m["reuse_rate"].as_f64().unwrap_or(0.0);
        let or = m["reference_reuse_rate"].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            s,
            "{:<13} {:>8} {:>6} {:>7} {:>8.4} {:>9.4} {:>6.1}% {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8} {:>10.2}",
            m["mode"].as_str().unwrap_or(""),
            m["requests"].as_u64().unwrap_or(0),
            m["errors"].as_u64().unwrap_or(0),
            m["origin_connections"].as_u64().unwrap_or(0),
            rr,
            or,
            if or > 0.0 { rr / or * 100.0 } else { 0.0 },
            m["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
            m["latency_ms"]["p90"].as_f64().unwrap_or(0.0),
            m["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            m["throughput_rps"].as_f64().unwrap_or(0.0),
            m["gateway_cpu_seconds"]
                .as_f64()
                .map(|c| format!("{c:.2}"))
                .unwrap_or_else(|| "—".into()),
            m["handshake_seconds_paid"].as_f64().unwrap_or(0.0),
        );
    }
    for m in r["modes"].as_array().into_iter().flatten() {
        if let Some(reasons) = m["new_by_reason"].as_object().filter(|o| !o.is_empty()) {
            let list: Vec<String> = reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(
                s,
                "{} new connections by reason: {}",
                m["mode"].as_str().unwrap_or(""),
                list.join(", ")
            );
        }
        // edgepool's own count of the run beside the origins' (one definition of each figure).
        let g = &m["gateway_status"];
        if let Some(req) = g["requests"].as_u64() {
            let _ = writeln!(
                s,
                "{} as /status counted it: {} requests, {} new connections, R {:.4} \
                 (origins: {} requests, {} connections, R {:.4})",
                m["mode"].as_str().unwrap_or(""),
                req,
                g["new_connections"].as_u64().unwrap_or(0),
                g["reuse_rate"].as_f64().unwrap_or(0.0),
                m["origin_requests"].as_u64().unwrap_or(0),
                m["origin_connections"].as_u64().unwrap_or(0),
                m["reuse_rate"].as_f64().unwrap_or(0.0),
            );
        }
    }
    s
}
