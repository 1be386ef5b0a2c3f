//! `edgepool serve` (the command-line overrides applied to a configuration, the listeners,
//! the start line), `edgepool check`, and `edgepool ca path|export`.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::ca::CertAuthority;
use crate::config::{Config, PortRange};
use crate::gateway::Gateway;

use super::{reachable_url, CliError};

/// `edgepool serve`'s arguments: a configuration file (embedded defaults without one) and
/// what the command line overrides or adds. The field docs are `--help`'s text.
#[derive(Debug, Default, clap::Args)]
pub struct ServeOptions {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Worker-facing proxy address (overrides listen.proxy).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Admin address (overrides listen.admin).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Data directory: CA and state (overrides data_dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Allow targets in this CIDR despite the private/loopback deny list (repeatable).
    #[arg(long = "allow-target", value_name = "CIDR", value_parser = crate::config::parse_cidr)]
    pub allow_target: Vec<ipnet::IpNet>,
    /// Allow CONNECT to this port or range, e.g. `8443` or `8000-8999` (repeatable; adds to
    /// targets.connect_ports, default 443 and 80).
    #[arg(long = "allow-connect-port", value_name = "PORT[-PORT]")]
    pub allow_connect_port: Vec<PortRange>,
    /// Extra PEM roots trusted for target certificates (repeatable).
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,
    /// Add an exit node to a pool: POOL=URL with URL `http://user:pass@host:port`,
    /// `socks5://user:pass@host:port` or `direct` (repeatable; repeat a pool name to add
    /// nodes; the first pool named is the default unless the config names one).
    #[arg(long = "exit", value_name = "POOL=URL")]
    pub exit: Vec<String>,
    /// A worker token (repeatable): workers must send it as the first part of their proxy
    /// username (adds to auth.tokens).
    #[arg(long = "token", value_name = "TOKEN")]
    pub token: Vec<String>,
}

impl ServeOptions {
    /// The configuration to serve: the file (or the defaults) with the overrides applied,
    /// validated.
    pub fn config(self) -> Result<Config, CliError> {
        let mut cfg = match &self.config {
            Some(p) => load(p)?,
            None => Config::default(),
        };
        if let Some(a) = self.listen {
            cfg.listen.proxy = a;
        }
        if let Some(a) = self.admin {
            cfg.listen.admin = a;
        }
        if let Some(d) = self.data_dir {
            cfg.data_dir = Some(d);
        }
        cfg.targets.allow.extend(self.allow_target);
        cfg.targets.connect_ports.extend(self.allow_connect_port);
        cfg.upstream.extra_ca_files.extend(self.upstream_ca);
        for e in &self.exit {
            cfg.exits
                .add_cli_exit(e)
                .map_err(|reason| CliError::ExitArg { reason })?;
        }
        cfg.auth.tokens.extend(self.token);
        cfg.validate()?;
        Ok(cfg)
    }
}

fn load(path: &Path) -> Result<Config, CliError> {
    Config::load(path).map_err(|source| CliError::ConfigFile {
        path: path.to_owned(),
        source,
    })
}

/// `edgepool check`: loads and validates `config`, printing `<file>: ok`.
pub fn check(config: &Path) -> Result<(), CliError> {
    load(config)?;
    println!("{}: ok", config.display());
    Ok(())
}

/// The start line's message: the URLs workers and people use, and the CA to trust.
pub fn start_message(proxy: SocketAddr, admin: SocketAddr, ca: &Path) -> String {
    format!(
        "edgepool is serving; point workers at {} and trust {} (dashboard: {})",
        reachable_url(proxy),
        ca.display(),
        reachable_url(admin),
    )
}

/// `edgepool serve`: binds both listeners (errors name the config key), starts the gateway,
/// logs the start line and serves until SIGINT or SIGTERM.
pub fn serve(cfg: Config) -> Result<(), CliError> {
    let rt = super::runtime_with_threads(cfg.runtime.worker_threads).map_err(CliError::Runtime)?;
    rt.block_on(async move {
        let bind = |addr: SocketAddr, key: &'static str| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| CliError::Listen { addr, key, source })
        };
        let proxy = bind(cfg.listen.proxy, "listen.proxy").await?;
        let admin = bind(cfg.listen.admin, "listen.admin").await?;
        let data_dir = cfg.data_dir();
        let gw = Gateway::new(cfg)?;
        let proxy_addr = proxy.local_addr().map_err(CliError::LocalAddr)?;
        let admin_addr = admin.local_addr().map_err(CliError::LocalAddr)?;
        let ca = CertAuthority::cert_path(&data_dir);
        // Target `edgepool`, as when these lines were logged from the binary.
        tracing::info!(
            target: "edgepool",
            proxy = %proxy_addr,
            admin = %admin_addr,
            ca = %ca.display(),
            "{}",
            start_message(proxy_addr, admin_addr, &ca),
        );
        gw.serve(proxy, admin, shutdown_signal()).await;
        tracing::info!(target: "edgepool", "edgepool stopped");
        Ok(())
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

/// Which data dir `edgepool ca` reads, and why that one (said on stderr): `--data-dir`, else
/// the `data_dir` of `--config`, else the default.
pub fn ca_data_dir(
    data_dir: Option<PathBuf>,
    config: Option<&Path>,
) -> Result<(PathBuf, String), CliError> {
    Ok(match (data_dir, config) {
        (Some(d), _) => (d, "--data-dir".to_string()),
        (None, Some(p)) => (load(p)?.data_dir(), format!("data_dir of {}", p.display())),
        (None, None) => (
            Config::default_data_dir(),
            "the default; --data-dir or --config to choose".to_string(),
        ),
    })
}

/// `edgepool ca path` (`export` false) or `ca export`: the CA certificate's path or PEM.
/// Never creates a CA: a second one nobody trusts would only mislead.
pub fn ca(data_dir: Option<PathBuf>, config: Option<&Path>, export: bool) -> Result<(), CliError> {
    let (dir, from) = ca_data_dir(data_dir, config)?;
    eprintln!("edgepool: data dir {} ({from})", dir.display());
    let ca = CertAuthority::load_existing(&dir)?;
    if export {
        print!("{}", ca.cert_pem());
    } else {
        println!("{}", CertAuthority::cert_path(&dir).display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_on_top_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edgepool.toml");
        std::fs::write(
            &file,
            "[listen]\nproxy = \"127.0.0.1:7000\"\nadmin = \"127.0.0.1:7001\"\n",
        )
        .unwrap();
        let cfg = ServeOptions {
            config: Some(file.clone()),
            admin: Some("127.0.0.1:7002".parse().unwrap()),
            data_dir: Some(dir.path().join("data")),
            allow_target: vec!["10.1.0.0/16".parse().unwrap()],
            exit: vec!["dc=http://u:p@10.0.0.1:3128".into()],
            token: vec!["abc_123".into()],
            ..ServeOptions::default()
        }
        .config()
        .unwrap();
        assert_eq!(
            cfg.listen.proxy,
            "127.0.0.1:7000".parse().unwrap(),
            "from the file"
        );
        assert_eq!(
            cfg.listen.admin,
            "127.0.0.1:7002".parse().unwrap(),
            "overridden"
        );
        assert_eq!(cfg.data_dir(), dir.path().join("data"));
        assert!(cfg.targets.allow.contains(&"10.1.0.0/16".parse().unwrap()));
        assert!(cfg.exits.pools.iter().any(|p| p.name == "dc"));
        assert_eq!(cfg.auth.tokens, ["abc_123"]);
    }

    #[test]
    fn bad_arguments_are_typed_errors_naming_the_argument() {
        let e = ServeOptions {
            exit: vec!["dc=http://u:secretpw@10.0.0.1".into()],
            ..ServeOptions::default()
        }
        .config()
        .unwrap_err();
        assert!(matches!(e, CliError::ExitArg { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.starts_with("--exit: ") && text.contains("has no port"),
            "{text}"
        );
        assert!(!text.contains("secretpw"), "{text}");

        let e = ServeOptions {
            token: vec!["has-dash".into()],
            ..ServeOptions::default()
        }
        .config()
        .unwrap_err();
        assert!(matches!(e, CliError::Config(_)), "{e:?}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[pool]\nmax_idel_total = 3\n").unwrap();
        let e = ServeOptions {
            config: Some(file.clone()),
            ..ServeOptions::default()
        }
        .config()
        .unwrap_err();
        assert!(
            matches!(&e, CliError::ConfigFile { path, .. } if *path == file),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.starts_with(&format!("{}: ", file.display())), "{text}");
        assert!(text.contains("max_idel_total"), "{text}");
        assert!(matches!(check(&file), Err(CliError::ConfigFile { .. })));
    }

    #[test]
    fn the_start_message_names_the_real_urls_and_the_ca() {
        let m = start_message(
            "127.0.0.1:3128".parse().unwrap(),
            "0.0.0.0:9180".parse().unwrap(),
            Path::new("/data/ca.pem"),
        );
        assert_eq!(
            m,
            "edgepool is serving; point workers at http://127.0.0.1:3128 and trust \
             /data/ca.pem (dashboard: http://<this host>:9180)"
        );
    }

    #[test]
    fn the_ca_data_dir_says_where_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let given = dir.path().join("given");
        assert_eq!(
            ca_data_dir(Some(given.clone()), Some(Path::new("/nonexistent.toml"))).unwrap(),
            (given, "--data-dir".to_string()),
            "--data-dir wins without reading --config"
        );
        let file = dir.path().join("edgepool.toml");
        let from_file = dir.path().join("from-file");
        std::fs::write(
            &file,
            format!("data_dir = {:?}\n", from_file.display().to_string()),
        )
        .unwrap();
        assert_eq!(
            ca_data_dir(None, Some(&file)).unwrap(),
            (from_file, format!("data_dir of {}", file.display()))
        );
        let (default, why) = ca_data_dir(None, None).unwrap();
        assert_eq!(default, Config::default_data_dir());
        assert!(why.starts_with("the default"), "{why}");
    }

    #[test]
    fn ca_never_creates_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        for export in [false, true] {
            let e = ca(Some(dir.path().to_owned()), None, export).unwrap_err();
            assert!(matches!(e, CliError::Ca(_)), "{e:?}");
            assert!(e.to_string().contains("no CA in the data dir"), "{e}");
        }
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }
}
