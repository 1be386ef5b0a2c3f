//! The `edgepool` binary: `check`, `ca path`, `ca export`, `serve` flags.
use std::process::Command;

fn edgepool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgepool"))
}

#[test]
fn check_accepts_the_example_and_names_a_bad_key() {
    let ok = edgepool()
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[pool]\nmax_idel_total = 3\n").unwrap();
    let out = edgepool()
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_idel_total"), "{err}");

    std::fs::write(&bad, "[pool]\nmax_per_key = 0\n").unwrap();
    let out = edgepool()
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pool.max_per_key"));
}

/// `RUST_LOG`: static lists, bare levels and span filters are taken without a word; one that
/// parses as neither is named on stderr and the default level is used.
#[test]
fn an_invalid_rust_log_is_named_and_valid_ones_pass_silently() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");
    let run = |filter: &str| {
        let out = edgepool()
            .args(["check", "--config", example])
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "RUST_LOG={filter}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run("edgepool=loud");
    assert!(
        err.contains("RUST_LOG=\"edgepool=loud\" is not a valid filter")
            && err.contains("logging at info"),
        "{err}"
    );
    for bad in ["edgepool[request{method=GET]=debug", "*=debug", ","] {
        let err = run(bad);
        assert!(
            err.contains("is not a valid filter"),
            "RUST_LOG={bad}: {err}"
        );
    }
    for ok in [
        "warn",
        "edgepool=debug,hyper=warn",
        "edgepool[request]=debug",
        "  ",
    ] {
        let err = run(ok);
        assert!(!err.contains("not a valid filter"), "RUST_LOG={ok}: {err}");
    }
}

#[test]
fn ca_path_and_export_read_the_ca_and_never_create_one() {
    let dir = tempfile::tempdir().unwrap();
    // No CA there: both fail, say which data dir they looked in, and create nothing.
    for what in ["path", "export"] {
        let out = edgepool()
            .args(["ca", what, "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "ca {what} with no CA: {err}");
        assert!(
            err.contains(&format!("data dir {} (--data-dir)", dir.path().display())),
            "{err}"
        );
        assert!(err.contains("no CA in the data dir"), "{err}");
        assert!(out.stdout.is_empty());
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "ca {what} wrote into the data dir"
        );
    }
    // The CA a gateway created on its first start.
    let ca = edgepool::ca::CertAuthority::load_or_create(dir.path()).unwrap();
    let out = edgepool()
        .args(["ca", "path", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(path, dir.path().join("ca.pem").display().to_string());
    let out = edgepool()
        .args(["ca", "export", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        ca.cert_pem(),
        "export prints the same CA"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn ca_path_without_a_data_dir_uses_the_default_and_says_so() {
    let home = tempfile::tempdir().unwrap();
    let out = edgepool()
        .args(["ca", "path"])
        .env("HOME", home.path())
        .env("XDG_DATA_HOME", home.path().join("xdg"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let default = home.path().join("xdg").join("edgepool");
    assert!(
        err.contains(&format!("data dir {} (the default", default.display())),
        "{err}"
    );
    assert!(!default.join("ca.pem").exists(), "a second CA was created");
}

#[test]
fn serve_reports_a_bad_flag_value_and_an_unusable_listen_address() {
    let out = edgepool()
        .args(["serve", "--allow-target", "not-a-cidr"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-target"));
    let dir = tempfile::tempdir().unwrap();
    let out = edgepool()
        .args([
            "serve",
            "--listen",
            "192.0.2.1:1",
            "--admin",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen.proxy"));
}

#[test]
fn ca_path_follows_the_config_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let cfg = dir.path().join("edgepool.toml");
    std::fs::write(
        &cfg,
        format!("data_dir = {:?}\n", data.display().to_string()),
    )
    .unwrap();
    edgepool::ca::CertAuthority::load_or_create(&data).unwrap();
    let out = edgepool()
        .args(["ca", "path", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        data.join("ca.pem").display().to_string()
    );
}

#[test]
fn flag_errors_say_what_is_wrong() {
    let run = |args: &[&str]| {
        let out = edgepool().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&["serve", "--allow-target", "127.0.0.0/33"]);
    assert!(
        e.contains("prefix length /33") && e.contains("0 to 32"),
        "{e}"
    );
    let e = run(&["serve", "--allow-target", "127.0.0.1"]);
    assert!(e.contains("127.0.0.1/32"), "{e}");
    // An exit without a port is not port 80: the credentials would go to a web server.
    let e = run(&["serve", "--exit", "dc=http://u:secretpw@proxy.example"]);
    assert!(e.contains("--exit") && e.contains("has no port"), "{e}");
    assert!(!e.contains("secretpw"), "{e}");
    // The report keeps 8 days.
    let e = run(&["report", "--window", "30d"]);
    assert!(e.contains("at most 8d"), "{e}");
}

/// A `serve` child on free loopback ports with its stderr captured (not a terminal).
struct Serving {
    child: std::process::Child,
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    stderr_lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn serve(data_dir: &std::path::Path) -> Serving {
    use std::io::BufRead;
    let (proxy, admin) = (free_addr(), free_addr());
    let mut child = edgepool()
        .args([
            "serve",
            "--listen",
            &proxy.to_string(),
            "--admin",
            &admin.to_string(),
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Serving {
        child,
        proxy,
        admin,
        stderr_lines: rx,
    }
}

impl Serving {
    /// The log line saying it serves (waits up to 30 s for it); panics with the log otherwise.
    fn serving_line(&self) -> String {
        let mut seen = Vec::new();
        loop {
            match self
                .stderr_lines
                .recv_timeout(std::time::Duration::from_secs(30))
            {
                Ok(l) if l.contains("edgepool is serving") => return l,
                Ok(l) => seen.push(l),
                Err(_) => panic!("no start line; stderr so far:\n{}", seen.join("\n")),
            }
        }
    }

    fn admin_get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.admin).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

#[test]
fn the_start_line_names_the_real_proxy_url_without_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let gw = serve(dir.path());
    let line = gw.serving_line();
    assert!(
        line.contains(&format!("point workers at http://{} ", gw.proxy)),
        "{line}"
    );
    assert!(
        line.contains(&format!("dashboard: http://{}", gw.admin)),
        "{line}"
    );
    assert!(!line.contains("<proxy>"), "{line}");
    assert!(
        !line.contains('\u{1b}'),
        "ANSI escapes in a log that is not a terminal: {line:?}"
    );
}

#[test]
fn two_instances_share_one_data_dir_and_one_ca() {
    // Started together on an empty data dir: both create-or-load the CA at the same moment.
    let dir = tempfile::tempdir().unwrap();
    let a = serve(dir.path());
    let b = serve(dir.path());
    a.serving_line();
    b.serving_line();
    let (ca_a, ca_b) = (a.admin_get("/ca.pem"), b.admin_get("/ca.pem"));
    let body = |r: &str| r.split_once("\r\n\r\n").unwrap().1.to_string();
    assert!(ca_a.starts_with("HTTP/1.1 200"), "{ca_a}");
    assert_eq!(body(&ca_a), body(&ca_b), "one CA for both instances");
    assert_eq!(
        body(&ca_a),
        std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
        "and it is the one on disk"
    );
    // Each keeps its own report store.
    let stores: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".redb"))
        .collect();
    assert_eq!(stores.len(), 2, "{stores:?}");
    for gw in [&a, &b] {
        assert!(
            stores
                .iter()
                .any(|n| n.ends_with(&format!("-{}.redb", gw.proxy.port()))),
            "{stores:?}"
        );
        assert!(gw
            .admin_get("/report?window=1h")
            .starts_with("HTTP/1.1 200"));
    }
}

#[test]
fn report_and_status_pointed_at_the_proxy_port_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let gw = serve(dir.path());
    gw.serving_line();
    for cmd in ["report", "status"] {
        let out = edgepool()
            .args([cmd, "--admin", &gw.proxy.to_string()])
            .env_remove("EDGEPOOL_ADMIN_TOKEN")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd}: {err}");
        assert!(
            err.contains("is an edgepool proxy listener, not the admin listener")
                && err.contains("listen.admin"),
            "{cmd}: {err}"
        );
    }
}
