//! Out of file descriptors: the real binary, started with a low descriptor limit, keeps
//! accepting what it can, backs off instead of spinning while `accept` fails with EMFILE, and
//! serves normally once descriptors are free again.
mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Origin, OriginConfig};

/// User + system CPU time of `pid`, in clock ticks (/proc/<pid>/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    // Fields after the command name start at field 3 (state).
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn get_via(proxy: SocketAddr, origin: &Origin) -> String {
    use std::io::Write;
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let a = origin.authority();
    write!(
        s,
        "GET http://{a}/echo HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // waits on a child process in wall time
async fn accept_backs_off_on_emfile_and_recovers() {
    let origin = Origin::start(OriginConfig::default()).await;
    let data = tempfile::tempdir().unwrap();
    let (proxy, admin) = (support::free_addr(), support::free_addr());
    let child = Command::new("bash")
        .arg("-c")
        .arg("ulimit -n 96 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_edgepool"))
        .args([
            "serve",
            "--listen",
            &proxy.to_string(),
            "--admin",
            &admin.to_string(),
        ])
        .args(["--allow-target", "127.0.0.0/8"])
        .arg("--data-dir")
        .arg(data.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut serve = support::KillOnDrop(child);
    let pid = serve.0.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(proxy).is_err() {
        assert!(Instant::now() < deadline, "edgepool did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(get_via(proxy, &origin).starts_with("HTTP/1.1 200"));

    // Hold more connections than the process has descriptors: accept starts failing.
    let held: Vec<TcpStream> = (0..150)
        .filter_map(|_| TcpStream::connect(proxy).ok())
        .collect();
    assert!(held.len() >= 100, "the kernel queued the connections");
    std::thread::sleep(Duration::from_millis(500));
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - t0;
    // A spinning accept loop burns ~200 ticks (2 s at 100 Hz); backing off 50 ms costs ~nothing.
    assert!(
        used < 50,
        "edgepool used {used} ticks of CPU in 2 s while out of descriptors"
    );

    // Descriptors come back: edgepool serves again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let r = get_via(proxy, &origin);
        if r.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "edgepool did not recover: {r:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = serve.0.kill();
    let mut log = String::new();
    serve
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("accept failed") && log.contains("Too many open files"),
        "the EMFILE was logged: {}",
        &log[..log.len().min(2000)]
    );
}
