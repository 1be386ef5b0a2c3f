//! CA care end to end: the interception CA's private key never appears in anything edgepool
//! writes — logs at trace level, admin documents, metrics, the CA download, CLI output, error
//! messages — while the real binary intercepts HTTPS, fails handshakes, and refuses to start
//! with a readable key.
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Origin, OriginConfig};

fn edgepool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgepool"))
}

/// The pieces of the key file a leak would show: every base64 line of the PEM body.
fn key_fragments(key_pem: &str) -> Vec<String> {
    key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_string)
        .collect()
}

fn assert_no_key(what: &str, text: &str, fragments: &[String]) {
    assert!(
        !text.contains("PRIVATE KEY"),
        "{what} mentions a PRIVATE KEY block"
    );
    for f in fragments {
        assert!(
            !text.contains(f.as_str()),
            "{what} contains key material {f:?}"
        );
    }
}

#[allow(clippy::disallowed_methods)] // waits on a child process in wall time
async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "edgepool did not start on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // waits on a child process in wall time
async fn the_ca_key_never_appears_in_any_output() {
    let data = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let origin = Origin::start(OriginConfig {
        tls: true,
        ..Default::default()
    })
    .await;
    let (proxy, admin) = (support::free_addr(), support::free_addr());
    let out_path = logs.path().join("stdout");
    let err_path = logs.path().join("stderr");
    let child = edgepool()
        .args([
            "serve",
            "--listen",
            &proxy.to_string(),
            "--admin",
            &admin.to_string(),
        ])
        .args([
            "--allow-target",
            "127.0.0.0/8",
            "--allow-target",
            "::1/128",
            "--allow-connect-port",
            "1-65535",
        ])
        .arg("--data-dir")
        .arg(data.path())
        .arg("--upstream-ca")
        .arg(&origin.ca().cert_path)
        .env("RUST_LOG", "trace")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let mut serve = support::KillOnDrop(child);
    wait_listening(proxy).await;
    wait_listening(admin).await;

    let key_path = edgepool::ca::CertAuthority::key_path(data.path());
    let key_pem = std::fs::read_to_string(&key_path).unwrap();
    let fragments = key_fragments(&key_pem);
    assert!(fragments.len() >= 2, "the key file has a PEM body");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key is written 0600");

    // Intercepted HTTPS (a leaf is generated and served), twice.
    let ca_pem = std::fs::read(edgepool::ca::CertAuthority::cert_path(data.path())).unwrap();
    let worker = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://{proxy}")).unwrap())
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
        .build()
        .unwrap();
    for _ in 0..2 {
        let r = worker.get(origin.url("/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    // A worker that aborts the TLS handshake, and one that sends garbage instead of TLS.
    for junk in [&b"\x16\x03\x01\x00\x05hello"[..], b"GET / HTTP/1.1\r\n\r\n"] {
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        let a = origin.authority();
        write!(s, "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n").unwrap();
        s.write_all(junk).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    // A host the CA cannot sign for.
    let mut s = std::net::TcpStream::connect(proxy).unwrap();
    write!(
        s,
        "CONNECT bad_host!:443 HTTP/1.1\r\nHost: bad_host!:443\r\n\r\n"
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));

    // Everything the admin listener serves.
    let admin_client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut served = String::new();
    for path in [
        "/status",
        "/metrics",
        "/ca.pem",
        "/report",
        "/status/history",
        "/",
    ] {
        let r = admin_client
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .unwrap();
        served.push_str(&r.text().await.unwrap());
    }
    assert!(
        served.contains("BEGIN CERTIFICATE"),
        "/ca.pem serves the certificate"
    );
    assert_no_key("the admin listener", &served, &fragments);

    // Stop it (SIGTERM) and read everything it logged at trace level.
    let pid = serve.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while serve.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "edgepool stops on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let logged =
        std::fs::read_to_string(&out_path).unwrap() + &std::fs::read_to_string(&err_path).unwrap();
    assert!(
        logged.len() > 1000,
        "trace logging was on ({} bytes)",
        logged.len()
    );
    assert_no_key("the trace log", &logged, &fragments);

    // The CLI.
    for args in [&["ca", "export"][..], &["ca", "path"][..]] {
        let out = edgepool()
            .args(args)
            .arg("--data-dir")
            .arg(data.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_no_key(
            &format!("edgepool {args:?}"),
            &String::from_utf8_lossy(&out.stdout),
            &fragments,
        );
    }

    // A key others can read: refused, and the refusal does not quote it.
    refuses_readable_key(data.path(), &fragments);
}

fn refuses_readable_key(data: &Path, fragments: &[String]) {
    let key_path = edgepool::ca::CertAuthority::key_path(data);
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = edgepool()
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a group-readable key is refused");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("ca-key.pem") && text.contains("640"),
        "{text}"
    );
    assert_no_key("the refusal", &text, fragments);
}
