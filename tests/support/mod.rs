//! Shared integration-test support: real loopback origin servers (HTTP/1.1 and
//! HTTP/2, plain or TLS) that end-to-end tests run edgepool against, fake
//! upstream proxies ("exits", HTTP and SOCKS5) that tag the traffic they
//! carry with their own loopback source address, a throw-away certificate
//! authority, and small environment helpers.
//!
//! Use it from an integration test with `mod support;`.
//!
//! Not every test binary uses every item, hence the blanket `dead_code`
//! allowance for this module tree.
#![allow(dead_code)]

pub mod exits;
mod h1;
mod h2srv;
pub mod origin;
pub mod raw;
mod routes;
pub mod tls;

use std::net::TcpListener;
use std::path::Path;

// Re-exports for test files; each test binary uses a different subset.
#[allow(unused_imports)]
pub use exits::{ConnectReply, ExitKind, FakeExit, FakeExitConfig};
#[allow(unused_imports)]
pub use origin::{Origin, OriginConfig, Recorded};
#[allow(unused_imports)]
pub use raw::{RawEvent, RawHttp1, RawResponse};
#[allow(unused_imports)]
pub use routes::pattern_bytes;
#[allow(unused_imports)]
pub use tls::{Leaf, TestCa};

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// Binds `127.0.0.1:0`, reads the port the kernel picked and drops the
/// listener. Another process may grab the port in between, so prefer binding
/// port 0 directly wherever the code under test allows it.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A child process (e.g. `edgepool serve`) that is killed and reaped when dropped, so a
/// failing test leaves nothing running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `127.0.0.1:<free_port()>`, for a child process's listen flags.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// True when running under CI (environment variable `CI` is exactly `"true"`).
pub fn ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// Whether the executable `name` is available on `PATH`.
///
/// Returns `true` if found. If not found, [`skip`]s: a loud `SKIPPED:` line
/// (and an `EDGEPOOL_SKIP_LOG` entry) and `false`, so the calling test can
/// return early. Under CI (`CI=true`) a missing tool is a hard failure
/// instead: this function panics with a clear message, so skipped coverage
/// cannot go unnoticed there.
///
/// ```ignore
/// if !support::require_tool("curl") { return; }
/// ```
pub fn require_tool(name: &str) -> bool {
    if find_on_path(name) {
        return true;
    }
    skip(&format!(
        "required tool `{name}` is not installed (not found on PATH); install {name} to run \
         this test"
    ))
}

/// A test (or part of one) that cannot run on this machine. Returns `false`, so the caller
/// can `return` early:
///
/// - under CI (`CI=true`) it panics instead: skipped coverage is a failure there;
/// - otherwise it prints a loud `SKIPPED: <why>` line to stderr (shown by `--nocapture`, or
///   for a failing test) and, when `EDGEPOOL_SKIP_LOG` names a file, appends the same line
///   to it, so a runner can see skips that cargo's output capture hides (`.ci/run` sets it
///   and fails if the file is not empty afterwards).
///
/// ```ignore
/// if !have_ipv6 { support::skip("no IPv6 loopback"); return; }
/// ```
pub fn skip(why: &str) -> bool {
    if ci() {
        panic!("{why}; CI=true, so this is a failure, not a skip");
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test thread>")
        .to_string();
    let line =
        format!("SKIPPED: {test}: {why}; this test did not run (under CI=true this is a failure).");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("EDGEPOOL_SKIP_LOG") {
        use std::io::Write as _;
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            panic!("EDGEPOOL_SKIP_LOG is set but {path:?} cannot be appended to: {e}");
        }
    }
    false
}

fn find_on_path(name: &str) -> bool {
    let candidate = Path::new(name);
    if candidate.components().count() > 1 {
        return is_executable(candidate);
    }
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| is_executable(&dir.join(name)))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(meta) => meta.is_file() && meta.permissions().mode() & 0o111 != 0,
        Err(_) => false,
    }
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file() || path.with_extension("exe").is_file()
}

/// The value of one sample in Prometheus text (`name{labels}`), 0 if absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// `edgepool_dns_answers_total{source="<source>"}` in Prometheus text.
pub fn dns_answers(text: &str, source: &str) -> f64 {
    metric(
        text,
        &format!("edgepool_dns_answers_total{{source=\"{source}\"}}"),
    )
}
