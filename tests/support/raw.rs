//! A minimal raw HTTP/1.1 client over a byte stream, for tests that need to
//! see exactly what happens on one connection (response headers as sent,
//! whether the peer closed with FIN or RST, stray bytes, ...).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every single read a [`RawHttp1`] performs while reading a
/// response, so a misbehaving server fails a test instead of hanging it.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// A parsed HTTP/1.x response.
#[derive(Clone, Debug)]
pub struct RawResponse {
    /// `"HTTP/1.1"` or `"HTTP/1.0"`.
    pub version: String,
    pub status: u16,
    pub reason: String,
    /// Header fields as sent (names keep their case), in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked if it was chunked).
    pub body: Vec<u8>,
    /// Number of non-empty chunks if the body was chunked, else 0.
    pub chunks: usize,
}

impl RawResponse {
    /// The first value of header `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the `Connection` header contains the token `close`.
    pub fn connection_close(&self) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("close"))
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (panics if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("response body is JSON")
    }
}

/// What [`RawHttp1::wait_event`] observed.
#[derive(Debug)]
pub enum RawEvent {
    /// Bytes arrived (unsolicited, e.g. stray bytes on an idle connection).
    Data(Vec<u8>),
    /// The peer closed its side cleanly (FIN, or TLS close_notify).
    Eof,
    /// The peer reset the connection (RST).
    Reset,
    /// Nothing happened within the wait.
    Timeout,
    /// Some other I/O error.
    Error(io::Error),
}

/// A raw HTTP/1.1 client connection (plain TCP by default; any stream works
/// via [`RawHttp1::new`]).
pub struct RawHttp1<S = TcpStream> {
    io: S,
    buf: BytesMut,
}

impl RawHttp1<TcpStream> {
    /// Connects over plain TCP (with TCP_NODELAY).
    pub async fn connect(addr: SocketAddr) -> io::Result<RawHttp1<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(RawHttp1::new(tcp))
    }
}

impl RawHttp1<tokio_rustls::client::TlsStream<TcpStream>> {
    /// Connects over TLS to `addr`, verifying the server certificate for
    /// `server_name` (e.g. `"localhost"`) against `ca` only, offering ALPN
    /// `http/1.1`.
    pub async fn connect_tls(
        addr: SocketAddr,
        ca: &super::TestCa,
        server_name: &str,
    ) -> io::Result<RawHttp1<tokio_rustls::client::TlsStream<TcpStream>>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[b"http/1.1"]));
        let tls = connector.connect(name, tcp).await?;
        Ok(RawHttp1::new(tls))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawHttp1<S> {
    /// Wraps an already connected stream.
    pub fn new(io: S) -> RawHttp1<S> {
        RawHttp1 {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Writes `bytes` verbatim and flushes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Sends `METHOD target HTTP/1.1` with `Host: raw.test`, `headers`, a
    /// `Content-Length` when `body` is non-empty, and `body`; then reads the
    /// response (skipping any 1xx interim responses).
    pub async fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<RawResponse> {
        let mut req = format!("{method} {target} HTTP/1.1\r\n");
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
            req.push_str("Host: raw.test\r\n");
        }
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.send_raw(&bytes).await?;
        self.read_response(method.eq_ignore_ascii_case("HEAD"))
            .await
    }

    /// `GET target` with no extra headers.
    pub async fn get(&mut self, target: &str) -> io::Result<RawResponse> {
        self.request("GET", target, &[], b"").await
    }

    /// Reads one final response (1xx responses are skipped). Set
    /// `head_request` when the request was `HEAD` (no body follows).
    pub async fn read_response(&mut self, head_request: bool) -> io::Result<RawResponse> {
        loop {
            let response = self.read_one(head_request).await?;
            if !(100..200).contains(&response.status) {
                return Ok(response);
            }
        }
    }

    async fn fill(&mut self) -> io::Result<()> {
        self.buf.reserve(8 * 1024);
        match tokio::time::timeout(READ_TIMEOUT, self.io.read_buf(&mut self.buf)).await {
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out")),
            Ok(Ok(0)) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            )),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
        }
    }

    async fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(end + 2);
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            self.fill().await?;
        }
    }

    async fn want(&mut self, n: usize) -> io::Result<()> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(())
    }

    async fn read_one(&mut self, head_request: bool) -> io::Result<RawResponse> {
        let bad = |msg: &str| io::Error::new(io::ErrorKind::InvalidData, msg.to_string());
        let status_line = self.line().await?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_string();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
        let reason = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| bad(&format!("bad header line {line:?}")))?;
            headers.push((name.to_string(), value.trim().to_string()));
        }
        let mut response = RawResponse {
            version,
            status,
            reason,
            headers,
            body: Vec::new(),
            chunks: 0,
        };
        if head_request || status < 200 || status == 204 || status == 304 {
            return Ok(response);
        }
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if chunked {
            loop {
                let size_line = self.line().await?;
                let size_str = size_line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size_str, 16)
                    .map_err(|_| bad(&format!("bad chunk size {size_line:?}")))?;
                if size == 0 {
                    while !self.line().await?.is_empty() {}
                    break;
                }
                self.want(size + 2).await?;
                response.body.extend_from_slice(&self.buf[..size]);
                if &self.buf[size..size + 2] != b"\r\n" {
                    return Err(bad("chunk not terminated by CRLF"));
                }
                self.buf.advance(size + 2);
                response.chunks += 1;
            }
        } else if let Some(len) = response.header("content-length") {
            let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
            self.want(len).await?;
            response.body = self.buf.split_to(len).to_vec();
        } else {
            // Close-delimited body.
            loop {
                match self.fill().await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
            response.body = self.buf.split().to_vec();
        }
        Ok(response)
    }

    /// Waits up to `wait` for something to happen on the connection: bytes
    /// (already-buffered unread bytes are returned first), EOF, or a reset.
    pub async fn wait_event(&mut self, wait: Duration) -> RawEvent {
        if !self.buf.is_empty() {
            return RawEvent::Data(self.buf.split().to_vec());
        }
        self.buf.reserve(8 * 1024);
        match tokio::time::timeout(wait, self.io.read_buf(&mut self.buf)).await {
            Err(_) => RawEvent::Timeout,
            Ok(Ok(0)) => RawEvent::Eof,
            Ok(Ok(_)) => RawEvent::Data(self.buf.split().to_vec()),
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                RawEvent::Reset
            }
            Ok(Err(e)) => RawEvent::Error(e),
        }
    }
}
