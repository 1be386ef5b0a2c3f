//! Real upstream proxies from Debian's packages, for the exits interop tests: tinyproxy and
//! squid (HTTP: CONNECT for https targets, absolute-form for http targets) and microsocks
//! (SOCKS5).
//!
//! Each one runs in the foreground as a child process owned by the test, on a free
//! `127.0.0.1` port, with its configuration and logs in a tempdir, and is killed by pid when
//! the [`RealProxy`] is dropped (like the nginx in `tests/nginx.rs`). None of them restricts
//! the target port or address: the test origins listen on random high ports on loopback.
//!
//! Packages: `tinyproxy-bin` (the binary without the Debian service), `squid`, `microsocks`.
//! A missing binary makes the constructor return `None` after a loud SKIPPED line, or panic
//! under `CI=true` (see [`crate::support::require_tool`]).
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support;

/// How long a proxy may take to accept TCP connections after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A real proxy process listening on `addr`, killed (by pid) when dropped.
pub struct RealProxy {
    /// `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    /// `"tinyproxy"`, `"squid"` or `"microsocks"`.
    pub kind: &'static str,
    /// The credentials the proxy requires, if any.
    pub auth: Option<(String, String)>,
    child: Child,
    dir: tempfile::TempDir,
    /// squid only: its service name (`-n`), the prefix of its `/dev/shm` segments.
    squid_service: Option<String>,
}

impl Drop for RealProxy {
    fn drop(&mut self) {
        // Each proxy is a single process (tinyproxy and microsocks use threads; squid runs
        // with -N and no workers), so killing its pid stops it. squid's helper (the auth
        // script) reads from squid and exits on EOF.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(service) = &self.squid_service {
            // A killed squid leaves its shared-memory segments behind; they are named after
            // the service name, which is unique to this instance.
            remove_shm_segments(service);
        }
    }
}

impl std::fmt::Debug for RealProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealProxy")
            .field("kind", &self.kind)
            .field("addr", &self.addr)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

/// What to write and run for one attempt at starting a proxy on `port`.
struct Launch {
    command: Command,
    /// A line in the proxy's log (or stderr) that means the listener is up, when it logs one.
    ready_marker: Option<&'static str>,
    /// Log files (relative to the tempdir) that [`RealProxy::logs`] shows, besides stdout/stderr.
    log_files: &'static [&'static str],
    squid_service: Option<String>,
}

impl RealProxy {
    /// tinyproxy (Debian `tinyproxy-bin`) as an HTTP proxy, with `BasicAuth user pass` when
    /// `auth` is given. No `ConnectPort` line (tinyproxy then allows CONNECT to every port),
    /// no filter, `Allow 127.0.0.1` only. Logs at level `Info` to `tinyproxy.log`.
    pub fn tinyproxy(auth: Option<(&str, &str)>) -> Option<RealProxy> {
        if !support::require_tool("tinyproxy") {
            return None;
        }
        if let Some((user, pass)) = auth {
            check_credential(user);
            check_credential(pass);
        }
        Some(start("tinyproxy", auth, |dir, port| {
            let d = dir.display();
            let mut conf = format!(
                "# edgepool interop test: foreground, loopback only, every CONNECT port allowed.\n\
                 Port {port}\n\
                 Listen 127.0.0.1\n\
                 Timeout 600\n\
                 LogFile \"{d}/tinyproxy.log\"\n\
                 LogLevel Info\n\
                 PidFile \"{d}/tinyproxy.pid\"\n\
                 MaxClients 100\n\
                 Allow 127.0.0.1\n\
                 ViaProxyName \"tinyproxy\"\n"
            );
            if let Some((user, pass)) = auth {
                conf.push_str(&format!("BasicAuth {user} {pass}\n"));
            }
            std::fs::write(dir.join("tinyproxy.conf"), conf).unwrap();
            let mut command = Command::new("tinyproxy");
            command.arg("-d").arg("-c").arg(dir.join("tinyproxy.conf"));
            Launch {
                command,
                ready_marker: Some("Starting main loop"),
                log_files: &["tinyproxy.log"],
                squid_service: None,
            }
        }))
    }

    /// squid (Debian `squid`) as an HTTP proxy, memory only, with basic auth checked by a
    /// small helper script when `auth` is given. `http_access` allows 127.0.0.1 (and requires
    /// the credentials); there is no `Safe_ports`/`SSL_ports` rule, so CONNECT reaches every
    /// port. Started as `squid -N -n <unique service>` so parallel instances do not share
    /// shared-memory segments. As root squid switches to its `cache_effective_user` (`proxy`),
    /// so the tempdir is world-writable then.
    pub fn squid(auth: Option<(&str, &str)>) -> Option<RealProxy> {
        if !support::require_tool("squid") {
            return None;
        }
        if let Some((user, pass)) = auth {
            check_credential(user);
            check_credential(pass);
        }
        Some(start("squid", auth, |dir, port| {
            let d = dir.display();
            let service = squid_service_name();
            let mut conf = format!(
                "# edgepool interop test: foreground, memory only, loopback only.\n\
                 http_port 127.0.0.1:{port}\n\
                 pid_filename {d}/squid.pid\n\
                 cache_log {d}/cache.log\n\
                 access_log stdio:{d}/access.log squid\n\
                 cache_store_log none\n\
                 cache deny all\n\
                 cache_mem 8 MB\n\
                 coredump_dir {d}\n\
                 visible_hostname edgepool-squid\n\
                 netdb_filename none\n\
                 pinger_enable off\n\
                 shutdown_lifetime 0 seconds\n\
                 acl lo src 127.0.0.1/32\n"
            );
            match auth {
                Some((user, pass)) => {
                    // Basic auth helper protocol: one "user password" line in, OK or ERR out.
                    let script = format!(
                        "#!/bin/sh\nwhile read -r u p; do\n  \
                         if [ \"$u\" = '{user}' ] && [ \"$p\" = '{pass}' ]; then echo OK; else echo ERR; fi\n\
                         done\n"
                    );
                    let helper = dir.join("auth.sh");
                    std::fs::write(&helper, script).unwrap();
                    set_mode(&helper, 0o755);
                    conf.push_str(&format!(
                        "auth_param basic program {}\n\
                         auth_param basic children 2 startup=1 idle=1\n\
                         auth_param basic realm edgepool-test\n\
                         acl authed proxy_auth REQUIRED\n\
                         http_access allow lo authed\n",
                        helper.display()
                    ));
                }
                None => conf.push_str("http_access allow lo\n"),
            }
            conf.push_str("http_access deny all\n");
            std::fs::write(dir.join("squid.conf"), conf).unwrap();
            let mut command = Command::new("squid");
            command
                .arg("-N")
                .arg("-n")
                .arg(&service)
                .arg("-f")
                .arg(dir.join("squid.conf"));
            Launch {
                command,
                ready_marker: Some("Accepting HTTP Socket connections"),
                log_files: &["cache.log", "access.log"],
                squid_service: Some(service),
            }
        }))
    }

    /// microsocks (Debian `microsocks`) as a SOCKS5 proxy on 127.0.0.1, requiring
    /// username/password authentication (RFC 1929) when `auth` is given (`-u user -P pass`).
    /// It logs one `client[fd] ip: connected to host:port` line per tunnel to stderr.
    pub fn microsocks(auth: Option<(&str, &str)>) -> Option<RealProxy> {
        if !support::require_tool("microsocks") {
            return None;
        }
        if let Some((user, pass)) = auth {
            check_credential(user);
            check_credential(pass);
        }
        Some(start("microsocks", auth, |_dir, port| {
            let mut command = Command::new("microsocks");
            command
                .arg("-i")
                .arg("127.0.0.1")
                .arg("-p")
                .arg(port.to_string());
            if let Some((user, pass)) = auth {
                command.arg("-u").arg(user).arg("-P").arg(pass);
            }
            Launch {
                command,
                ready_marker: None,
                log_files: &[],
                squid_service: None,
            }
        }))
    }

    /// `http` for tinyproxy and squid, `socks5` for microsocks.
    pub fn scheme(&self) -> &'static str {
        match self.kind {
            "microsocks" => "socks5",
            _ => "http",
        }
    }

    /// The edgepool exit kind this proxy is configured as: `"http"` or `"socks5"`.
    pub fn exit_kind(&self) -> &'static str {
        self.scheme()
    }

    /// `127.0.0.1:PORT`.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// The node URL for edgepool: `http://user:pass@127.0.0.1:PORT`,
    /// `socks5://user:pass@127.0.0.1:PORT`, or without credentials if the proxy has none.
    pub fn url(&self) -> String {
        match &self.auth {
            Some((user, pass)) => self.url_with(user, pass),
            None => format!("{}://{}", self.scheme(), self.addr),
        }
    }

    /// The node URL with other credentials (e.g. a wrong password).
    pub fn url_with(&self, user: &str, pass: &str) -> String {
        format!("{}://{user}:{pass}@{}", self.scheme(), self.addr)
    }

    /// The proxy's own log: tinyproxy's log file, squid's access log, microsocks' stderr.
    pub fn log(&self) -> String {
        let name = match self.kind {
            "tinyproxy" => "tinyproxy.log",
            "squid" => "access.log",
            _ => "stderr",
        };
        self.read(name)
    }

    /// Everything the proxy wrote (stderr, stdout, log files), for failure messages.
    pub fn logs(&self) -> String {
        let mut names = vec!["stderr", "stdout"];
        match self.kind {
            "tinyproxy" => names.push("tinyproxy.log"),
            "squid" => names.extend(["cache.log", "access.log"]),
            _ => {}
        }
        collect_logs(self.kind, self.dir.path(), &names)
    }

    /// The tempdir holding the configuration and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// squid only: the service name (`-n`) its shared-memory segments are named after.
    pub fn squid_service(&self) -> Option<&str> {
        self.squid_service.as_deref()
    }

    /// The pid of the proxy process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

/// Starts `kind` on a free port, retrying with another port (up to 5 times) when the port was
/// taken in between; panics with the proxy's output if it does not come up.
fn start(
    kind: &'static str,
    auth: Option<(&str, &str)>,
    mut prepare: impl FnMut(&Path, u16) -> Launch,
) -> RealProxy {
    let mut last_error = String::new();
    for _attempt in 0..5 {
        let dir = proxy_tempdir(kind);
        let port = support::free_port();
        let launch = prepare(dir.path(), port);
        match spawn(kind, auth, dir, port, launch) {
            Ok(proxy) => return proxy,
            Err(e) if port_taken(&e) => last_error = e,
            Err(e) => panic!("{kind} did not start:\n{e}"),
        }
    }
    panic!("{kind} did not start (ports kept being taken):\n{last_error}");
}

#[allow(clippy::disallowed_methods)] // waits on a child process in wall time
fn spawn(
    kind: &'static str,
    auth: Option<(&str, &str)>,
    dir: tempfile::TempDir,
    port: u16,
    mut launch: Launch,
) -> Result<RealProxy, String> {
    let p = dir.path();
    let out = std::fs::File::create(p.join("stdout")).unwrap();
    let err = std::fs::File::create(p.join("stderr")).unwrap();
    let child = launch
        .command
        .current_dir(p)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("could not run {kind}: {e}"))?;
    let mut proxy = RealProxy {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        kind,
        auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        child,
        dir,
        squid_service: launch.squid_service.take(),
    };
    let mut log_names = vec!["stderr", "stdout"];
    log_names.extend_from_slice(launch.log_files);
    let logs = |proxy: &RealProxy| collect_logs(kind, proxy.dir.path(), &log_names);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = proxy.child.try_wait() {
            return Err(format!("{kind} exited with {status}\n{}", logs(&proxy)));
        }
        let marker_seen = match launch.ready_marker {
            None => true,
            Some(marker) => logs(&proxy).contains(marker),
        };
        // The marker says *this* process is listening; the connect says the port is ours to
        // use (the probe connection is simply closed again).
        if marker_seen
            && TcpStream::connect_timeout(&proxy.addr, Duration::from_millis(500)).is_ok()
        {
            // A process that lost the port race may still be on its way out.
            std::thread::sleep(Duration::from_millis(20));
            if let Ok(Some(status)) = proxy.child.try_wait() {
                return Err(format!("{kind} exited with {status}\n{}", logs(&proxy)));
            }
            return Ok(proxy);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{kind} is not listening on {} after {} s\n{}",
                proxy.addr,
                READY_TIMEOUT.as_secs(),
                logs(&proxy)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a start failure looks like a lost race for the port.
fn port_taken(error: &str) -> bool {
    error.contains("Address already in use")
        // tinyproxy only says this when it cannot bind.
        || error.contains("Could not create listening sockets")
        // squid: "commBind: Cannot bind socket ... (98) Address already in use" (above) or
        || error.contains("Cannot open HTTP Port")
}

fn collect_logs(kind: &str, dir: &Path, names: &[&str]) -> String {
    let mut all = String::new();
    for name in names {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        all.push_str(&format!("--- {kind} {name} ---\n{text}\n"));
    }
    all
}

/// A tempdir for one proxy. squid started as root switches to the unprivileged `proxy` user,
/// which must be able to reach the directory (so it lives directly in `/tmp`), write its logs
/// there and run the auth helper.
fn proxy_tempdir(kind: &str) -> tempfile::TempDir {
    let prefix = format!("edgepool-{kind}");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    if kind == "squid" && running_as_root() {
        let dir = builder.tempdir_in("/tmp").expect("proxy tempdir in /tmp");
        set_mode(dir.path(), 0o777);
        return dir;
    }
    builder.tempdir().expect("proxy tempdir")
}

#[cfg(unix)]
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // A file we just created is owned by our effective uid.
    let probe = tempfile::NamedTempFile::new().expect("probe file");
    probe
        .as_file()
        .metadata()
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[cfg(not(unix))]
fn running_as_root() -> bool {
    false
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) {}

/// A squid service name (`-n`) unique to this process and instance: squid names its
/// shared-memory segments `/dev/shm/<service>-*.shm`, so two squids with the same name (the
/// default is `squid`) cannot run at the same time.
fn squid_service_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "edgepool{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

fn remove_shm_segments(service: &str) {
    let prefix = format!("{service}-");
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    let segments: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    for segment in segments {
        let _ = std::fs::remove_file(segment);
    }
}

/// Credentials go into config files, a shell script and URLs unescaped: keep them plain.
fn check_credential(s: &str) {
    assert!(
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
        "test proxy credentials must be [A-Za-z0-9._-]+, got {s:?}"
    );
}
