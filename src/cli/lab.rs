//! `edgepool lab`: which modes and target names the arguments ask for (and which
//! combinations are refused), running the lab and writing its reports.
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::lab::{DnsFault, LabOptions, Mode, Names};

/// Why `edgepool lab` refused its arguments or failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The scenario does not load (its own sentence).
    #[error("{0}")]
    Scenario(String),
    /// `--dns-fault` is not a known fault (its own sentence).
    #[error("{0}")]
    DnsFault(String),
    /// `--names` is not a known kind.
    #[error("--names {0}: unknown; use addresses, dns or hosts")]
    UnknownNames(String),
    /// `--dns-fault` without a DNS to misbehave.
    #[error("--dns-fault needs --names dns or --names hosts")]
    FaultNeedsNames,
    /// `--system-resolver` without `--names hosts`, or with a fault.
    #[error("--system-resolver needs --names hosts and no --dns-fault")]
    SystemResolverNeedsHosts,
    /// `--hosts-file` without `--names hosts`.
    #[error("--hosts-file needs --names hosts")]
    HostsFileNeedsHosts,
    /// `--gateway` off loopback.
    #[error("--gateway {0}: the lab runs on loopback only; give a 127.0.0.0/8 or ::1 address")]
    GatewayNotLoopback(SocketAddr),
    /// `--mode external` without `--gateway`.
    #[error("--mode external needs --gateway ADDR (and --ca FILE if it intercepts HTTPS)")]
    ExternalNeedsGateway,
    /// `--mode` is not a known mode.
    #[error("--mode {0}: unknown; use no-keepalive, per-worker, edgepool or external")]
    UnknownMode(String),
    /// The lab itself failed.
    #[error("lab: {0}")]
    Run(String),
    /// A report file cannot be written.
    #[error("{}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The async runtime cannot be started.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// How the lab names its targets (`--names`, `--dns-fault`, `--dns-ttl`, `--hosts-file`,
/// `--system-resolver`).
#[derive(Debug, Clone)]
pub struct NameArgs {
    /// `addresses`, `dns` or `hosts`.
    pub names: String,
    /// The lab DNS server's fault, as given.
    pub dns_fault: String,
    /// TTL of the lab DNS server's answers, seconds.
    pub dns_ttl: u32,
    /// A hosts file that already lists the targets.
    pub hosts_file: Option<PathBuf>,
    /// Ask the system's resolvers instead of the lab's DNS server.
    pub system_resolver: bool,
}

impl NameArgs {
    /// The naming asked for, refusing options that do not go together.
    pub fn names(&self) -> Result<Names, LabError> {
        let fault = DnsFault::parse(&self.dns_fault).map_err(LabError::DnsFault)?;
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
            other => return Err(LabError::UnknownNames(other.to_string())),
        };
        if names == Names::Addresses && fault != DnsFault::None {
            return Err(LabError::FaultNeedsNames);
        }
        if self.system_resolver && (self.names != "hosts" || fault != DnsFault::None) {
            return Err(LabError::SystemResolverNeedsHosts);
        }
        if self.hosts_file.is_some() && self.names != "hosts" {
            return Err(LabError::HostsFileNeedsHosts);
        }
        Ok(names)
    }
}

/// The modes to run, in order: `mode` as given, or by default no-keepalive, per-worker,
/// edgepool (and external when a `gateway` is given).
pub fn modes(
    mode: &[String],
    gateway: Option<SocketAddr>,
    ca: Option<PathBuf>,
) -> Result<Vec<Mode>, LabError> {
    if let Some(g) = gateway {
        if !g.ip().is_loopback() {
            return Err(LabError::GatewayNotLoopback(g));
        }
    }
    let default = ["no-keepalive", "per-worker", "edgepool", "external"];
    let names: Vec<&str> = if mode.is_empty() {
        default[..if gateway.is_some() { 4 } else { 3 }].to_vec()
    } else {
        mode.iter().map(String::as_str).collect()
    };
    names
        .into_iter()
        .map(|n| match n {
            "no-keepalive" => Ok(Mode::NoKeepalive),
            "per-worker" => Ok(Mode::PerWorker),
            "edgepool" => Ok(Mode::Edgepool),
            "external" => match gateway {
                Some(g) => Ok(Mode::External {
                    gateway: g,
                    ca: ca.clone(),
                }),
                None => Err(LabError::ExternalNeedsGateway),
            },
            other => Err(LabError::UnknownMode(other.to_string())),
        })
        .collect()
}

/// `edgepool lab`'s arguments.
#[derive(Debug, Clone)]
pub struct LabArgs {
    /// A built-in scenario name or a TOML file.
    pub scenario: String,
    /// Fewer requests per worker.
    pub quick: bool,
    /// Write the JSON report here.
    pub json: Option<PathBuf>,
    /// Write the HTML report here.
    pub html: Option<PathBuf>,
    /// `--mode`, as given (repeatable).
    pub mode: Vec<String>,
    /// The external mode's proxy.
    pub gateway: Option<SocketAddr>,
    /// The external mode's interception CA (PEM).
    pub ca: Option<PathBuf>,
    /// List the built-in scenarios instead of running.
    pub list: bool,
    /// Print the scenario's hosts-file lines instead of running.
    pub print_hosts: bool,
    /// How the targets are named.
    pub names: NameArgs,
}

/// The `--list` text: each built-in scenario and its description.
pub fn scenario_list() -> String {
    use crate::lab::scenario::{Scenario, BUILTIN};
    BUILTIN
        .iter()
        .map(|(name, text)| {
            let desc = Scenario::from_toml(text)
                .map(|s| s.description)
                .unwrap_or_default();
            format!("{name:<12} {desc}\n")
        })
        .collect()
}

/// `edgepool lab`: runs the scenario in each mode and prints the side-by-side table (and
/// writes the JSON and HTML reports when asked); failed requests are a warning, not a
/// failure.
pub fn run(args: LabArgs) -> Result<(), LabError> {
    if args.list {
        print!("{}", scenario_list());
        return Ok(());
    }
    let sc = crate::lab::scenario::Scenario::load(&args.scenario).map_err(LabError::Scenario)?;
    if args.print_hosts {
        print!("{}", crate::lab::hosts_lines(&sc));
        return Ok(());
    }
    let opts = LabOptions {
        quick: args.quick,
        names: args.names.names()?,
        modes: modes(&args.mode, args.gateway, args.ca)?,
        progress: true,
    };
    let runtime = super::runtime().map_err(LabError::Runtime)?;
    let report = runtime
        .block_on(crate::lab::run(&sc, &opts))
        .map_err(LabError::Run)?;
    print!("{}", crate::lab::render_table(&report));
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).map_err(|source| LabError::Write {
            path: path.clone(),
            source,
        })
    };
    if let Some(p) = &args.json {
        write(
            p,
            serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
        )?;
        println!("JSON report: {}", p.display());
    }
    if let Some(p) = &args.html {
        write(p, crate::lab::html::render(&report))?;
        println!("HTML report: {}", p.display());
    }
    let errors = failed_requests(&report);
    if errors > 0 {
        eprintln!("warning: {errors} requests failed during the lab (see the errors column)");
    }
    Ok(())
}

/// Requests that failed across all modes of a lab report.
pub fn failed_requests(report: &serde_json::Value) -> u64 {
    report["modes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["errors"].as_u64().unwrap_or(0))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(kind: &str, fault: &str) -> NameArgs {
        NameArgs {
            names: kind.into(),
            dns_fault: fault.into(),
            dns_ttl: 1,
            hosts_file: None,
            system_resolver: false,
        }
    }

    #[test]
    fn name_options_that_do_not_go_together_are_refused() {
        assert_eq!(
            names("addresses", "none").names().unwrap(),
            Names::Addresses
        );
        assert_eq!(
            names("dns", "drop").names().unwrap(),
            Names::Dns {
                ttl: 1,
                fault: DnsFault::parse("drop").unwrap()
            }
        );
        let e = names("addresses", "drop").names().unwrap_err();
        assert!(matches!(e, LabError::FaultNeedsNames), "{e:?}");
        assert_eq!(
            e.to_string(),
            "--dns-fault needs --names dns or --names hosts"
        );
        let e = names("mdns", "none").names().unwrap_err();
        assert_eq!(
            e.to_string(),
            "--names mdns: unknown; use addresses, dns or hosts"
        );
        assert!(matches!(
            names("dns", "sometimes").names(),
            Err(LabError::DnsFault(_))
        ));
        let e = NameArgs {
            system_resolver: true,
            ..names("dns", "none")
        }
        .names()
        .unwrap_err();
        assert!(matches!(e, LabError::SystemResolverNeedsHosts), "{e:?}");
        let e = NameArgs {
            hosts_file: Some("/etc/hosts".into()),
            ..names("dns", "none")
        }
        .names()
        .unwrap_err();
        assert!(matches!(e, LabError::HostsFileNeedsHosts), "{e:?}");
        assert!(NameArgs {
            hosts_file: Some("/etc/hosts".into()),
            system_resolver: true,
            ..names("hosts", "none")
        }
        .names()
        .is_ok());
    }

    #[test]
    fn modes_default_to_the_three_and_external_needs_a_loopback_gateway() {
        let three = [Mode::NoKeepalive, Mode::PerWorker, Mode::Edgepool];
        assert_eq!(modes(&[], None, None).unwrap(), three);
        let g: SocketAddr = "127.0.0.1:3128".parse().unwrap();
        let all = modes(&[], Some(g), Some("ca.pem".into())).unwrap();
        assert_eq!(all[..3], three);
        assert_eq!(
            all[3],
            Mode::External {
                gateway: g,
                ca: Some("ca.pem".into())
            }
        );
        let asked = ["edgepool".to_string(), "no-keepalive".into()];
        assert_eq!(
            modes(&asked, None, None).unwrap(),
            [Mode::Edgepool, Mode::NoKeepalive],
            "in the order given"
        );
        let e = modes(&["external".into()], None, None).unwrap_err();
        assert!(matches!(e, LabError::ExternalNeedsGateway), "{e:?}");
        let e = modes(&["turbo".into()], None, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--mode turbo: unknown; use no-keepalive, per-worker, edgepool or external"
        );
        let e = modes(&[], Some("10.0.0.1:3128".parse().unwrap()), None).unwrap_err();
        assert!(matches!(e, LabError::GatewayNotLoopback(_)), "{e:?}");
        assert!(e.to_string().contains("loopback only"), "{e}");
    }

    #[test]
    fn the_scenario_list_describes_every_builtin() {
        let list = scenario_list();
        assert_eq!(list.lines().count(), crate::lab::scenario::BUILTIN.len());
        for (name, _) in crate::lab::scenario::BUILTIN {
            let line = list
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .unwrap_or_else(|| panic!("{name} missing from\n{list}"));
            assert!(line.len() > 13, "{name} has no description: {line:?}");
        }
    }

    #[test]
    fn failed_requests_add_up_over_modes() {
        let report = serde_json::json!({"modes": [{"errors": 2}, {"errors": 0}, {"errors": 5}]});
        assert_eq!(failed_requests(&report), 7);
        assert_eq!(failed_requests(&serde_json::json!({})), 0);
    }
}
