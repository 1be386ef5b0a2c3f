//! The real binary honours the real `/etc/hosts`, not a configured override: `edgepool serve`
//! runs in a private mount namespace where a test-owned file is bind-mounted over `/etc/hosts`
//! (and over `/etc/resolv.conf`, naming a nameserver that refuses or drops every query), so the
//! machine's own files are never touched.
//!
//! - names listed there are final: answered from the file alone, no A and no AAAA query;
//! - a name that is not listed fails fast (within dns_timeout × dns_attempts) with
//!   `dns_failed` and a sentence naming the name and the resolver from `/etc/resolv.conf`;
//! - an in-place edit of the file is picked up without a restart;
//! - every name keeps one warm origin connection.
//!
//! Needs root (or CAP_SYS_ADMIN) and `unshare`; without them the tests print `SKIPPED` and
//! pass, except under `CI=true`, where they fail.
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{dns_answers as answers, metric, Origin, OriginConfig};

/// The hosts file the tests start with.
const LISTED: &str = "127.0.0.1 listed.test\n";

/// `upstream.dns_timeout` (1 s) × `upstream.dns_attempts` (2), the defaults, is how long a
/// failing lookup may take; this bound leaves slack for a loaded machine and still catches the
/// 5–15 s stalls of a resolver left to its own timeouts.
const DNS_FAILED_WITHIN: Duration = Duration::from_secs(4);

/// How long an edit of the hosts file may take to be picked up (it is polled every second).
const RELOAD_WITHIN: Duration = Duration::from_secs(5);

/// Bind-mounts `$EP_HOSTS` over `/etc/hosts` and `$EP_RESOLV` over `/etc/resolv.conf`, then
/// execs its arguments (paths travel in the environment and as arguments, never spliced in).
const PRIVATE_ETC: &str = r#"mount --bind "$EP_HOSTS" /etc/hosts && mount --bind "$EP_RESOLV" /etc/resolv.conf && exec "$@""#;

/// `unshare` running [`PRIVATE_ETC`] in a new private mount namespace; add the command to run.
/// Without `--fork`, `unshare` and `sh` exec: the child's pid ends up being the command's.
fn with_private_etc(hosts: &Path, resolv: &Path) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        PRIVATE_ETC,
        "sh",
    ])
    .env("EP_HOSTS", hosts)
    .env("EP_RESOLV", resolv);
    c
}

/// A test that cannot run here: fails under CI, otherwise says so loudly. Returns `false`.
fn skip(why: &str) -> bool {
    support::skip(why)
}

/// Whether `/etc/hosts` and `/etc/resolv.conf` can be replaced in a private mount namespace:
/// `unshare` exists and, run as the test runs edgepool, shows our files at those paths.
fn private_etc_available(hosts: &Path, resolv: &Path) -> bool {
    if !support::require_tool("unshare") || !support::require_tool("mount") {
        return false;
    }
    let mut expected = std::fs::read(hosts).unwrap();
    expected.extend(std::fs::read(resolv).unwrap());
    let why = match with_private_etc(hosts, resolv)
        .args(["cat", "/etc/hosts", "/etc/resolv.conf"])
        .output()
    {
        Ok(o) if o.status.success() && o.stdout == expected => return true,
        Ok(o) => format!(
            "{}; stderr: {}; stdout: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim(),
            String::from_utf8_lossy(&o.stdout).trim()
        ),
        Err(e) => e.to_string(),
    };
    skip(&format!(
        "cannot bind-mount over /etc/hosts in a private mount namespace \
         (needs root or CAP_SYS_ADMIN): {why}"
    ))
}

/// The nameserver `/etc/resolv.conf` names inside the namespace.
#[derive(Clone, Copy, Debug)]
enum Nameserver {
    /// Nothing listens on 127.0.0.77:53: queries meet an ICMP port unreachable.
    Refusing,
    /// The test listens on 127.0.0.78:53 and never answers.
    Dropping,
}

impl Nameserver {
    fn addr(self) -> SocketAddr {
        match self {
            Nameserver::Refusing => SocketAddr::from(([127, 0, 0, 77], 53)),
            Nameserver::Dropping => SocketAddr::from(([127, 0, 0, 78], 53)),
        }
    }
}

/// A UDP "nameserver" that records the question of every datagram and answers none.
struct DroppingNameserver {
    questions: Arc<Mutex<Vec<(String, &'static str)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DroppingNameserver {
    async fn bind(addr: SocketAddr) -> std::io::Result<DroppingNameserver> {
        let socket = tokio::net::UdpSocket::bind(addr).await?;
        let questions = Arc::new(Mutex::new(Vec::new()));
        let seen = questions.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, _)) = socket.recv_from(&mut buf).await {
                let q = question(&buf[..n]).unwrap_or_else(|| ("<unparsable>".into(), "?"));
                seen.lock().unwrap().push(q);
            }
        });
        Ok(DroppingNameserver { questions, task })
    }

    /// Every question received so far: (name, type).
    fn received(&self) -> Vec<(String, &'static str)> {
        self.questions.lock().unwrap().clone()
    }

    /// Datagrams asking about `name` (or `name.<search domain>`).
    fn about(&self, name: &str) -> Vec<(String, &'static str)> {
        let prefix = format!("{name}.");
        self.received()
            .into_iter()
            .filter(|(n, _)| n == name || n.starts_with(&prefix))
            .collect()
    }
}

impl Drop for DroppingNameserver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The first question of a DNS query: name (lower-case, no trailing dot) and type.
fn question(msg: &[u8]) -> Option<(String, &'static str)> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]);
    let qtype = match qtype {
        1 => "A",
        28 => "AAAA",
        _ => "other",
    };
    Some((labels.join("."), qtype))
}

/// `edgepool serve` in a private mount namespace, killed when dropped.
struct Edgepool {
    process: support::KillOnDrop,
    proxy: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Edgepool {
    #[allow(clippy::disallowed_methods)] // waits on a child process in wall time
    async fn start(hosts: &Path, resolv: &Path, dir: &Path) -> Edgepool {
        let (proxy, admin) = (support::free_addr(), support::free_addr());
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let log = dir.join("edgepool.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = with_private_etc(hosts, resolv)
            .arg(env!("CARGO_BIN_EXE_edgepool"))
            .args(["serve", "--listen", &proxy.to_string()])
            .args(["--admin", &admin.to_string()])
            .args(["--allow-target", "127.0.0.0/8"])
            .args(["--allow-connect-port", "1-65535"])
            .arg("--data-dir")
            .arg(&data)
            .env("NO_COLOR", "1")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut ep = Edgepool {
            process: support::KillOnDrop(child),
            proxy,
            admin,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        for addr in [proxy, admin] {
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                if let Some(status) = ep.process.0.try_wait().unwrap() {
                    panic!("edgepool exited ({status}) before listening:\n{}", ep.log());
                }
                assert!(
                    Instant::now() < deadline,
                    "edgepool did not listen on {addr}:\n{}",
                    ep.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        ep
    }

    fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// The end of what edgepool wrote so far (its log), for failure messages.
    fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut from = log.len().saturating_sub(4000);
        while !log.is_char_boundary(from) {
            from += 1;
        }
        log[from..].to_string()
    }

    async fn metrics(&self) -> String {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{}/metrics", self.admin))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A worker that keeps its connection to the proxy (plain-http requests in absolute form).
fn worker(proxy: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{proxy}")).unwrap())
        .build()
        .unwrap()
}

/// One GET: status, the `X-Edgepool-Error` token, the body, and how long it took.
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn fetch(client: &reqwest::Client, url: &str) -> (u16, String, String, Duration) {
    let t0 = Instant::now();
    let r = client
        .get(url)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let token = r
        .headers()
        .get("x-edgepool-error")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = r.text().await.unwrap();
    (status, token, body, t0.elapsed())
}

/// DNS queries edgepool sent for `family` (A or AAAA), whatever their outcome.
fn queries(text: &str, family: &str) -> f64 {
    let prefix = format!("edgepool_dns_queries_total{{family=\"{family}\",");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The `edgepool_dns_queries_total` samples that are not zero, for messages.
fn query_samples(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("edgepool_dns_queries_total{") && !l.ends_with(" 0"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_file_names_are_final_with_a_refusing_nameserver() {
    etc_hosts_is_honoured(Nameserver::Refusing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_file_names_are_final_with_a_dropping_nameserver() {
    etc_hosts_is_honoured(Nameserver::Dropping).await;
}

/// The whole story against one kind of dead nameserver.
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn etc_hosts_is_honoured(ns: Nameserver) {
    let machine_hosts = std::fs::read("/etc/hosts").ok();
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&hosts, LISTED).unwrap();
    std::fs::write(&resolv, format!("nameserver {}\n", ns.addr().ip())).unwrap();
    if !private_etc_available(&hosts, &resolv) {
        return;
    }
    let dropping = match ns {
        Nameserver::Refusing => None,
        Nameserver::Dropping => match DroppingNameserver::bind(ns.addr()).await {
            Ok(server) => Some(server),
            Err(e) => {
                skip(&format!(
                    "cannot bind the dropping nameserver on udp {} ({e})",
                    ns.addr()
                ));
                return;
            }
        },
    };
    let origin = Origin::start(OriginConfig::default()).await;
    let ep = Edgepool::start(&hosts, &resolv, dir.path()).await;
    let exe = std::fs::read_link(format!("/proc/{}/exe", ep.pid())).unwrap();
    assert!(
        exe.ends_with("edgepool"),
        "the child (the pid KillOnDrop kills) is edgepool itself: {exe:?}"
    );
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{}/root/etc/hosts", ep.pid())).unwrap(),
        LISTED,
        "edgepool sees the test's file at /etc/hosts"
    );
    let client = worker(ep.proxy);
    let listed = format!("http://listed.test:{}/", origin.port());
    let unlisted = format!("http://unlisted.test:{}/", origin.port());
    let mut served = 0;

    // 1. Listed: answered from /etc/hosts alone; no query for either family.
    const LISTED_REQUESTS: u64 = 5;
    for _ in 0..LISTED_REQUESTS {
        let (status, token, body, _) = fetch(&client, &listed).await;
        assert_eq!(status, 200, "listed.test: {token} {body}\n{}", ep.log());
        served += 1;
    }
    let m = ep.metrics().await;
    assert!(
        answers(&m, "hosts") >= LISTED_REQUESTS as f64,
        "every listed request was answered from the hosts file\n{m}"
    );
    assert_eq!(
        (queries(&m, "A"), queries(&m, "AAAA")),
        (0.0, 0.0),
        "no DNS query, either family: {:?}",
        query_samples(&m)
    );
    if let Some(server) = &dropping {
        assert_eq!(
            server.received(),
            vec![],
            "the nameserver got no datagram at all while only listed.test was asked for"
        );
    }

    // 2. Not listed: asked, fails fast with a sentence.
    let (status, token, body, took) = fetch(&client, &unlisted).await;
    eprintln!(
        "{ns:?}: unlisted.test -> {status} {token} in {took:?}: {}",
        body.trim()
    );
    assert_eq!(
        (status, token.as_str()),
        (502, "dns_failed"),
        "unlisted.test: {body}"
    );
    assert!(
        took < DNS_FAILED_WITHIN,
        "dns_failed took {took:?}; dns_timeout 1s x dns_attempts 2 bounds it at 2s"
    );
    let json: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
    let detail = json["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("could not resolve unlisted.test: "),
        "a sentence naming the name: {body}"
    );
    assert!(
        detail.contains(&ns.addr().to_string()),
        "names the nameserver of the namespace's /etc/resolv.conf: {body}"
    );
    for debug in [
        "Query {",
        "Name(",
        "query_type",
        "NoRecords",
        "Some(",
        "Err(",
    ] {
        assert!(!body.contains(debug), "Rust debug text in {body}");
    }
    let m = ep.metrics().await;
    eprintln!(
        "{ns:?}: queries after unlisted.test: {:?}",
        query_samples(&m)
    );
    assert!(
        queries(&m, "A") >= 1.0 && queries(&m, "AAAA") >= 1.0,
        "unlisted.test was asked for, both families: {:?}",
        query_samples(&m)
    );
    if let Some(server) = &dropping {
        let asked = server.about("unlisted.test");
        eprintln!("{ns:?}: datagrams about unlisted.test: {asked:?}");
        assert!(
            asked.iter().any(|(_, t)| *t == "A") && asked.iter().any(|(_, t)| *t == "AAAA"),
            "the nameserver saw the A and AAAA queries for unlisted.test: {:?}",
            server.received()
        );
    }

    // 3. Listed while running: an in-place edit (the bind mount pins the inode) is picked up.
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&hosts);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&hosts)
            .unwrap();
        f.write_all(format!("{LISTED}127.0.0.1 unlisted.test\n").as_bytes())
            .unwrap();
    }
    assert_eq!(inode(&hosts), before, "edited in place");
    let t0 = Instant::now();
    let mut last;
    loop {
        last = fetch(&client, &unlisted).await;
        if last.0 == 200 || t0.elapsed() > RELOAD_WITHIN {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last.0,
        200,
        "the edit was not picked up within {RELOAD_WITHIN:?}: {last:?}\n{}",
        ep.log()
    );
    served += 1;
    eprintln!("{ns:?}: the edit was picked up after {:?}", t0.elapsed());
    let m = ep.metrics().await;
    assert!(
        metric(&m, "edgepool_hosts_file_reloads_total") >= 1.0,
        "the reload is counted\n{m}"
    );

    // Both names are now final: more requests send no query.
    let (a, aaaa) = (queries(&m, "A"), queries(&m, "AAAA"));
    let datagrams = dropping.as_ref().map(|s| s.received().len());
    for url in [&listed, &unlisted, &listed, &unlisted] {
        let (status, token, body, _) = fetch(&client, url).await;
        assert_eq!(status, 200, "{url}: {token} {body}");
        served += 1;
    }
    let m = ep.metrics().await;
    assert_eq!(
        (queries(&m, "A"), queries(&m, "AAAA")),
        (a, aaaa),
        "no query once both names are listed: {:?}",
        query_samples(&m)
    );
    if let Some(server) = &dropping {
        assert_eq!(
            Some(server.received().len()),
            datagrams,
            "no datagram either"
        );
        assert_eq!(
            server.about("listed.test"),
            vec![],
            "listed.test was never asked for"
        );
    }

    // 4. One warm origin connection per name (a pool key is the name), every request on it.
    assert_eq!(
        origin.accepted(),
        2,
        "one connection for listed.test, one for unlisted.test"
    );
    assert_eq!(origin.requests(), served);

    drop(ep);
    assert_eq!(
        std::fs::read("/etc/hosts").ok(),
        machine_hosts,
        "the machine's /etc/hosts is untouched"
    );
}
