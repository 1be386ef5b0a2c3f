//! The `edgepool` command: parses arguments and calls the library (`edgepool::cli`).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgepool::cli;

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
    Serve(cli::serve::ServeOptions),
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
        /// Several gateways' admin addresses (comma-separated): their /status added up, with
        /// how many nodes served each target and each exit's state on every node. Replaces
        /// --admin.
        #[arg(long, value_delimiter = ',', num_args = 1.., value_name = "ADDR[,ADDR...]")]
        fleet: Vec<SocketAddr>,
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
    cli::init_logging(quiet);
    match cli.command {
        Command::Serve(options) => cli::finish(options.config().and_then(cli::serve::serve)),
        Command::Check { config } => cli::finish(cli::serve::check(&config)),
        Command::Ca { what } => {
            let (data_dir, config, export) = match what {
                CaCommand::Path { data_dir, config } => (data_dir, config, false),
                CaCommand::Export { data_dir, config } => (data_dir, config, true),
            };
            cli::finish(cli::serve::ca(data_dir, config.as_deref(), export))
        }
        Command::Status {
            admin,
            json,
            watch,
            fleet,
        } => cli::finish(if fleet.is_empty() {
            cli::admin::status(admin, json, watch)
        } else {
            cli::admin::fleet_status(&fleet, json, watch)
        }),
        Command::Trace {
            admin,
            target,
            json,
        } => cli::finish(cli::admin::trace(admin, target.as_deref(), json)),
        Command::Report {
            admin,
            window,
            json,
        } => cli::finish(cli::admin::report(admin, &window, json)),
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
        } => cli::finish(cli::lab::run(cli::lab::LabArgs {
            scenario,
            quick,
            json,
            html,
            mode,
            gateway,
            ca,
            list,
            print_hosts: names.print_hosts,
            names: cli::lab::NameArgs {
                names: names.names,
                dns_fault: names.dns_fault,
                dns_ttl: names.dns_ttl,
                hosts_file: names.hosts_file,
                system_resolver: names.system_resolver,
            },
        })),
    }
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
