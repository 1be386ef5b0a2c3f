//! Every log line of a request carries its worker connection's span (`worker{peer}`) and its
//! own (`request{method target exit addr}`), so an operator can tie a line to the request that
//! wrote it. The gateway runs in-process on this test's single thread, under a subscriber that
//! writes the real `fmt` format into a buffer.
mod gw;
mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use gw::TestGateway;
use support::{Origin, OriginConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The log text, shared with the subscriber's writer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    /// The one line containing `message` (panics with the whole log otherwise).
    fn line(&self, message: &str) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(message)).collect();
        assert_eq!(lines.len(), 1, "one line with {message:?} in:\n{text}");
        lines[0].to_string()
    }
}

#[tokio::test] // current-thread runtime: every task of the gateway sees the default subscriber
async fn log_lines_carry_the_worker_and_request_spans() {
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("edgepool=debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let origin = Origin::start(OriginConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    // Nothing listens on 127.0.0.2 at the origin's port: the first address refuses, the
    // request moves to the second — a debug line written inside `forward`.
    std::fs::write(&hosts, "127.0.0.2 two.test\n127.0.0.1 two.test\n").unwrap();
    let gw = TestGateway::start_with(&[], |c| c.upstream.hosts_file = hosts.clone()).await;
    let port = origin.port();

    let status = gw::get(&gw.client(), &format!("http://two.test:{port}/")).await;
    assert_eq!(status, 200);
    let line = log.line("connect failed; trying the next address");
    assert!(
        line.contains(&format!(
            "worker{{peer=127.0.0.1}}:request{{method=GET target=two.test:{port} exit=direct addr=127.0.0.2:{port}}}"
        )),
        "{line}"
    );

    // A CONNECT that is intercepted, then garbage where the ClientHello should be: the
    // handshake failure is logged by the tunnel's task, still under the CONNECT's spans.
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(
        format!("CONNECT two.test:{port} HTTP/1.1\r\nHost: two.test:{port}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    let line = log.line("worker TLS handshake failed");
    assert!(
        line.contains(&format!(
            "worker{{peer=127.0.0.1}}:request{{method=CONNECT target=two.test:{port}}}"
        )),
        "{line}"
    );

    // A request the framer refuses (both Content-Length and Transfer-Encoding: a smuggling
    // vector) is refused before any request exists; its line still names the connection.
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(
        format!(
            "POST http://two.test:{port}/ HTTP/1.1\r\nHost: two.test:{port}\r\n\
             Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.read_to_end(&mut answer),
    )
    .await;
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let line = log.line("worker request refused");
    assert!(line.contains("worker{peer=127.0.0.1}"), "{line}");
    gw.stop().await;
}
