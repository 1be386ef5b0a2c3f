//! The `edgepool` command: parses arguments and calls the library.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgepool::ca::CertAuthority;
use edgepool::config::Config;
use edgepool::gateway::Gateway;

#[derive(Parser)]
#[command(
    name = "edgepool",
    version,
    about = "Egress connection pool for web-scraping fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (embedded defaults when no --config is given).
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Worker-facing proxy address (overrides listen.proxy).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Admin address (overrides listen.admin).
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Data directory: CA and state (overrides data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Allow targets in this CIDR despite the private/loopback deny list (repeatable).
        #[arg(long = "allow-target", value_name = "CIDR", value_parser = edgepool::config::parse_cidr)]
        allow_target: Vec<ipnet::IpNet>,
        /// Allow CONNECT to this port or range, e.g. `8443` or `8000-8999` (repeatable; adds to
        /// targets.connect_ports, default 443 and 80).
        #[arg(long = "allow-connect-port", value_name = "PORT[-PORT]")]
        allow_connect_port: Vec<edgepool::config::PortRange>,
        /// Extra PEM roots trusted for target certificates (repeatable).
        #[arg(long = "upstream-ca", value_name = "FILE")]
        upstream_ca: Vec<PathBuf>,
        /// Add an exit node to a pool: POOL=URL with URL `http://user:pass@host:port`,
        /// `socks5://user:pass@host:port` or `direct` (repeatable; repeat a pool name to add
        /// nodes; the first pool named is the default unless the config names one).
        #[arg(long = "exit", value_name = "POOL=URL")]
        exit: Vec<String>,
        /// A worker token (repeatable): workers must send it as the first part of their proxy
        /// username (adds to auth.tokens).
        #[arg(long = "token", value_name = "TOKEN")]
        token: Vec<String>,
    },
    /// Validate a configuration file; exits non-zero naming the bad key.
    Check {
        /// TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// The interception CA certificate workers must trust.
    Ca {
        #[command(subcommand)]
        what: CaCommand,
    },
    /// Print the per-target reuse table from a running gateway.
    Status {
        /// Admin address of the gateway.
        #[arg(long, default_value = "127.0.0.1:9180")]
        admin: SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Refresh in place every 2 s until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Rank why new connections were needed (and why connections closed) over a window.
    Report {
        /// Admin address of the gateway.
        #[arg(long, default_value = "127.0.0.1:9180")]
        admin: SocketAddr,
        /// The window: 1h, 24h, 7d, ... (kept for 8 days).
        #[arg(long, default_value = "7d")]
        window: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the reuse lab: loopback origins, a worker fleet in several modes, a side-by-side
    /// report of reuse, latency, throughput and CPU.
    #[cfg(feature = "lab")]
    Lab {
        /// A built-in scenario (mixed, datacenter, waf, lb, residential) or a TOML file.
        #[arg(long, default_value = "mixed")]
        scenario: String,
        /// Fewer requests per worker (the scenario's quick_requests_per_worker).
        #[arg(long)]
        quick: bool,
        /// Write the report as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Write a self-contained HTML report (SVG charts) to this file.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        /// Modes to run, in order (repeatable): no-keepalive, per-worker, edgepool, external.
        /// Default: no-keepalive, per-worker, edgepool (and external with --gateway).
        #[arg(long = "mode", value_name = "MODE")]
        mode: Vec<String>,
        /// For the external mode: the proxy to measure (host:port on loopback).
        #[arg(long)]
        gateway: Option<SocketAddr>,
        /// For the external mode: the CA (PEM) it signs intercepted certificates with.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// List the built-in scenarios and exit.
        #[arg(long)]
        list: bool,
        #[command(flatten)]
        names: LabNameArgs,
    },
    /// Stream the per-request trace log from a running gateway.
    Trace {
        /// Admin address of the gateway.
        #[arg(long, default_value = "127.0.0.1:9180")]
        admin: SocketAddr,
        /// Only this target host (or host:port).
        #[arg(long)]
        target: Option<String>,
        /// JSON lines instead of the human format.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Print the path of the CA certificate (creating the CA if needed).
    Path {
        /// Data directory (default: the config's data_dir, else the XDG data dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Take data_dir from this configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the CA certificate (PEM), creating the CA if needed.
    Export {
        /// Data directory (default: the config's data_dir, else the XDG data dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Take data_dir from this configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The lab's report is the output; its in-process gateway only speaks up about problems.
    #[cfg(feature = "lab")]
    let quiet = matches!(cli.command, Command::Lab { .. });
    #[cfg(not(feature = "lab"))]
    let quiet = false;
    let default_filter = if quiet { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: log files and journald get plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    match cli.command {
        Command::Serve {
            config,
            listen,
            admin,
            data_dir,
            allow_target,
            allow_connect_port,
            upstream_ca,
            exit,
            token,
        } => {
            let mut cfg = match config {
                Some(p) => match Config::load(&p) {
                    Ok(c) => c,
                    Err(e) => return fail(&format!("{}: {e}", p.display())),
                },
                None => Config::default(),
            };
            if let Some(a) = listen {
                cfg.listen.proxy = a;
            }
            if let Some(a) = admin {
                cfg.listen.admin = a;
            }
            if let Some(d) = data_dir {
                cfg.data_dir = Some(d);
            }
            cfg.targets.allow.extend(allow_target);
            cfg.targets.connect_ports.extend(allow_connect_port);
            cfg.upstream.extra_ca_files.extend(upstream_ca);
            for e in &exit {
                if let Err(why) = cfg.exits.add_cli_exit(e) {
                    return fail(&format!("--exit: {why}"));
                }
            }
            cfg.auth.tokens.extend(token);
            if let Err(e) = cfg.validate() {
                return fail(&e.to_string());
            }
            serve(cfg)
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&format!("{}: {e}", config.display())),
        },
        Command::Ca { what } => {
            let (dir, config, export) = match what {
                CaCommand::Path { data_dir, config } => (data_dir, config, false),
                CaCommand::Export { data_dir, config } => (data_dir, config, true),
            };
            let (dir, from) = match (dir, config) {
                (Some(d), _) => (d, "--data-dir".to_string()),
                (None, Some(p)) => match Config::load(&p) {
                    Ok(c) => (c.data_dir(), format!("data_dir of {}", p.display())),
                    Err(e) => return fail(&format!("{}: {e}", p.display())),
                },
                (None, None) => (
                    Config::default_data_dir(),
                    "the default; --data-dir or --config to choose".to_string(),
                ),
            };
            // Never creates a CA: a second one nobody trusts would only mislead.
            eprintln!("edgepool: data dir {} ({from})", dir.display());
            match CertAuthority::load_existing(&dir) {
                Ok(ca) => {
                    if export {
                        print!("{}", ca.cert_pem());
                    } else {
                        println!("{}", CertAuthority::cert_path(&dir).display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        Command::Status { admin, json, watch } => {
            if !watch {
                return status(admin, json);
            }
            loop {
                if !json {
                    // Clear the screen and home the cursor, then redraw.
                    print!("\x1b[2J\x1b[H");
                }
                // A failed fetch (gateway restarting) is reported and retried, not fatal.
                let _ = status(admin, json);
                #[allow(clippy::disallowed_methods)] // status --watch: the main thread, no runtime
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
        }
        Command::Trace {
            admin,
            target,
            json,
        } => trace(admin, target, json),
        #[cfg(feature = "lab")]
        Command::Lab {
            scenario,
            quick,
            json,
            html,
            mode,
            gateway,
            ca,
            list,
            names,
        } => lab(scenario, quick, json, html, mode, gateway, ca, list, names),
        Command::Report {
            admin,
            window,
            json,
        } => report(admin, &window, json),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("edgepool: {msg}");
    ExitCode::FAILURE
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// How `edgepool lab` names its targets.
#[cfg(feature = "lab")]
#[derive(clap::Args, Debug)]
struct LabNameArgs {
    /// How workers name the targets: `addresses` (127.0.0.1:PORT), `dns` (<target>.lab.test,
    /// answered by the lab's DNS server through edgepool's resolver) or `hosts`
    /// (<target>.lab.test listed in a hosts file edgepool reads).
    #[arg(long, value_name = "KIND", default_value = "addresses")]
    names: String,
    /// How the lab's DNS server misbehaves with --names dns|hosts: none, drop (answers
    /// nothing), refuse (nothing listens), drop-aaaa, outage (answers 2 s, then nothing).
    #[arg(long, value_name = "FAULT", default_value = "none")]
    dns_fault: String,
    /// TTL of the lab DNS server's answers (--names dns), seconds.
    #[arg(long, value_name = "SECS", default_value_t = 1)]
    dns_ttl: u32,
    /// With --names hosts: a hosts file that already lists the targets (e.g. /etc/hosts in a
    /// private mount namespace; see --print-hosts). Default: the lab writes its own.
    #[arg(long, value_name = "FILE")]
    hosts_file: Option<PathBuf>,
    /// With --names hosts: edgepool asks the system's resolvers (/etc/resolv.conf) instead of
    /// the lab's DNS server (--dns-fault must be none).
    #[arg(long)]
    system_resolver: bool,
    /// Print the hosts-file lines naming the scenario's targets and exit.
    #[arg(long)]
    print_hosts: bool,
}

#[cfg(feature = "lab")]
impl LabNameArgs {
    fn names(&self) -> Result<edgepool::lab::Names, String> {
        use edgepool::lab::{DnsFault, Names};
        let fault = DnsFault::parse(&self.dns_fault)?;
        let names = match self.names.as_str() {
            "addresses" => Names::Addresses,
            "dns" => Names::Dns {
                ttl: self.dns_ttl,
                fault,
            },
            "hosts" => Names::Hosts {
                file: self.hosts_file.clone(),
                fault,
                system_resolver: self.system_resolver,
            },
            other => {
                return Err(format!(
                    "--names {other}: unknown; use addresses, dns or hosts"
                ))
            }
        };
        if names == Names::Addresses && fault != DnsFault::None {
            return Err("--dns-fault needs --names dns or --names hosts".into());
        }
        if self.system_resolver && (self.names != "hosts" || fault != DnsFault::None) {
            return Err("--system-resolver needs --names hosts and no --dns-fault".into());
        }
        if self.hosts_file.is_some() && self.names != "hosts" {
            return Err("--hosts-file needs --names hosts".into());
        }
        Ok(names)
    }
}

#[cfg(feature = "lab")]
#[allow(clippy::too_many_arguments)]
fn lab(
    scenario: String,
    quick: bool,
    json: Option<PathBuf>,
    html: Option<PathBuf>,
    mode: Vec<String>,
    gateway: Option<SocketAddr>,
    ca: Option<PathBuf>,
    list: bool,
    name_args: LabNameArgs,
) -> ExitCode {
    use edgepool::lab::{scenario::BUILTIN, LabOptions, Mode};
    if list {
        for (name, text) in BUILTIN {
            let desc = edgepool::lab::scenario::Scenario::from_toml(text)
                .map(|s| s.description)
                .unwrap_or_default();
            println!("{name:<12} {desc}");
        }
        return ExitCode::SUCCESS;
    }
    let sc = match edgepool::lab::scenario::Scenario::load(&scenario) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if name_args.print_hosts {
        print!("{}", edgepool::lab::hosts_lines(&sc));
        return ExitCode::SUCCESS;
    }
    let target_names = match name_args.names() {
        Ok(n) => n,
        Err(e) => return fail(&e),
    };
    if let Some(g) = gateway {
        if !g.ip().is_loopback() {
            return fail(&format!(
                "--gateway {g}: the lab runs on loopback only; give a 127.0.0.0/8 or ::1 address"
            ));
        }
    }
    let names = if mode.is_empty() {
        let mut m = vec![
            "no-keepalive".to_string(),
            "per-worker".into(),
            "edgepool".into(),
        ];
        if gateway.is_some() {
            m.push("external".into());
        }
        m
    } else {
        mode
    };
    let mut modes = Vec::new();
    for n in &names {
        modes.push(match n.as_str() {
            "no-keepalive" => Mode::NoKeepalive,
            "per-worker" => Mode::PerWorker,
            "edgepool" => Mode::Edgepool,
            "external" => match gateway {
                Some(g) => Mode::External {
                    gateway: g,
                    ca: ca.clone(),
                },
                None => return fail(
                    "--mode external needs --gateway ADDR (and --ca FILE if it intercepts HTTPS)",
                ),
            },
            other => {
                return fail(&format!(
                    "--mode {other}: unknown; use no-keepalive, per-worker, edgepool or external"
                ))
            }
        });
    }
    let opts = LabOptions {
        quick,
        modes,
        progress: true,
        names: target_names,
    };
    let report = match runtime().block_on(edgepool::lab::run(&sc, &opts)) {
        Ok(r) => r,
        Err(e) => return fail(&format!("lab: {e}")),
    };
    print!("{}", edgepool::lab::render_table(&report));
    if let Some(p) = json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(&p, text + "\n") {
            return fail(&format!("{}: {e}", p.display()));
        }
        println!("JSON report: {}", p.display());
    }
    if let Some(p) = html {
        if let Err(e) = std::fs::write(&p, edgepool::lab::html::render(&report)) {
            return fail(&format!("{}: {e}", p.display()));
        }
        println!("HTML report: {}", p.display());
    }
    let errors: u64 = report["modes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["errors"].as_u64().unwrap_or(0))
        .sum();
    if errors > 0 {
        eprintln!("warning: {errors} requests failed during the lab (see the errors column)");
    }
    ExitCode::SUCCESS
}

fn serve(cfg: Config) -> ExitCode {
    runtime().block_on(async move {
        let proxy = match tokio::net::TcpListener::bind(cfg.listen.proxy).await {
            Ok(l) => l,
            Err(e) => {
                return fail(&format!(
                    "cannot listen on {} (listen.proxy): {e}",
                    cfg.listen.proxy
                ))
            }
        };
        let admin = match tokio::net::TcpListener::bind(cfg.listen.admin).await {
            Ok(l) => l,
            Err(e) => {
                return fail(&format!(
                    "cannot listen on {} (listen.admin): {e}",
                    cfg.listen.admin
                ))
            }
        };
        let data_dir = cfg.data_dir();
        let gw = match Gateway::new(cfg) {
            Ok(g) => g,
            Err(e) => return fail(&e.to_string()),
        };
        let (Ok(proxy_addr), Ok(admin_addr)) = (proxy.local_addr(), admin.local_addr()) else {
            return fail("cannot read the listening addresses");
        };
        let ca = CertAuthority::cert_path(&data_dir);
        tracing::info!(
            proxy = %proxy_addr,
            admin = %admin_addr,
            ca = %ca.display(),
            "edgepool is serving; point workers at {} and trust {} (dashboard: {})",
            edgepool::cli::reachable_url(proxy_addr),
            ca.display(),
            edgepool::cli::reachable_url(admin_addr),
        );
        gw.serve(proxy, admin, shutdown_signal()).await;
        tracing::info!("edgepool stopped");
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// GETs `path` from the admin listener and hands each body chunk to `each`.
fn admin_get(admin: SocketAddr, path: &str, each: impl FnMut(&[u8]) -> bool) -> Result<(), String> {
    let token = std::env::var("EDGEPOOL_ADMIN_TOKEN").ok();
    runtime().block_on(edgepool::cli::admin_get(
        admin,
        path,
        token.as_deref(),
        each,
    ))
}

/// The whole body of an admin GET.
fn admin_body(admin: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    admin_get(admin, path, |d| {
        body.extend_from_slice(d);
        true
    })?;
    Ok(body)
}

fn status(admin: SocketAddr, json: bool) -> ExitCode {
    let body = match admin_body(admin, "/status") {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return ExitCode::SUCCESS;
    }
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return fail(&format!("unexpected /status answer: {e}")),
    };
    print!("{}", edgepool::cli::status_table(&v));
    ExitCode::SUCCESS
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    url::form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

fn report(admin: SocketAddr, window: &str, json: bool) -> ExitCode {
    if let Err(e) = edgepool::report::parse_window(window) {
        return fail(&e.to_string());
    }
    let body = match admin_body(admin, &format!("/report?window={}", encode(window))) {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return ExitCode::SUCCESS;
    }
    match serde_json::from_slice::<edgepool::report::Report>(&body) {
        Ok(r) => {
            print!("{}", r.render_table());
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("unexpected /report answer: {e}")),
    }
}

fn trace(admin: SocketAddr, target: Option<String>, json: bool) -> ExitCode {
    let path = match &target {
        Some(t) => format!("/trace?target={}", encode(t)),
        None => "/trace".to_string(),
    };
    let mut pending = Vec::new();
    let res = admin_get(admin, &path, |d| {
        pending.extend_from_slice(d);
        while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let text = if json {
                format!("{line}\n")
            } else {
                match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(v) => edgepool::cli::trace_text(&v),
                    Err(_) => continue,
                }
            };
            // A closed pipe (`edgepool trace | head`) ends the stream quietly.
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            if out
                .write_all(text.as_bytes())
                .and_then(|_| out.flush())
                .is_err()
            {
                return false;
            }
        }
        true
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}
