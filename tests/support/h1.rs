//! Hand-rolled HTTP/1.x origin server, for exact control over connection
//! handling (keep-alive, `Connection: close`, idle FIN/RST, stray bytes).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};

use super::origin::{HasTcp, OriginConfig, Recorded, Shared};
use super::routes::{self, Action, Incoming, Planned};

/// Largest accepted request head (request line + headers).
const MAX_HEAD: usize = 64 * 1024;
/// Largest accepted request body.
const MAX_BODY: usize = 64 << 20;
/// Longest line accepted in a chunked body (size line or trailer).
const MAX_LINE: usize = 8 * 1024;
/// Time allowed to receive a whole request once its first byte arrived.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a graceful close (TLS close_notify + FIN).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Size of the pieces generated bodies are written in.
const WRITE_CHUNK: usize = 64 * 1024;
/// What `stray_bytes_idle_after` writes on an idle connection.
pub(crate) const JUNK: &[u8] = b"HTTP/1.1 200 OK\r\n\r\nJUNK";

struct Request {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
    http10: bool,
}

enum ReadError {
    /// Peer went away or an I/O error happened: just drop the connection.
    Io,
    /// Malformed request: answer with this status, then close.
    Bad(u16, &'static str),
}

enum Idle {
    /// Bytes of the next request are buffered.
    Data,
    /// The peer closed (or the socket failed).
    Gone,
    /// `idle_timeout` fired: close with FIN.
    Fin,
    /// `rst_idle_after` fired: close with RST.
    Rst,
}

#[derive(Clone, Copy)]
enum Timer {
    Stray,
    Rst,
    Fin,
}

/// Serves HTTP/1.x requests on `io` until either side closes.
pub(crate) async fn serve<S>(mut io: S, conn_id: u64, peer: SocketAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + HasTcp,
{
    let cfg = &shared.cfg;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut index = 0u64;
    loop {
        match idle(&mut io, &mut buf, cfg).await {
            Idle::Data => {}
            Idle::Gone => return,
            Idle::Fin => return close(io).await,
            Idle::Rst => return reset(io),
        }
        let req = match timeout(REQUEST_TIMEOUT, read_request(&mut io, &mut buf)).await {
            Err(_) | Ok(Err(ReadError::Io)) => return,
            Ok(Err(ReadError::Bad(status, msg))) => {
                let _ = write_error(&mut io, status, msg, conn_id, index + 1, peer).await;
                return close(io).await;
            }
            Ok(Ok(req)) => req,
        };
        index += 1;
        let in_flight = shared.in_flight();
        shared.record(Recorded {
            conn_id,
            index_on_conn: index,
            method: req.method.clone(),
            path: req.target.clone(),
            headers: req.headers.clone(),
            body: req.body.clone(),
            version: req.version.clone(),
            peer,
        });
        let action = routes::route(&Incoming {
            method: &req.method,
            target: &req.target,
            headers: &req.headers,
            body: &req.body,
            version: &req.version,
            conn_id,
            index_on_conn: index,
            peer,
        });
        let planned = match action {
            Action::Reset => return reset(io),
            Action::Respond(planned) => planned,
        };
        let delay = cfg.response_delay.unwrap_or_default() + planned.delay.unwrap_or_default();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let close_after = planned.close
            || !req.keep_alive
            || cfg.max_requests_per_conn.is_some_and(|n| index >= n);
        let written = write_response(
            &mut io,
            &req,
            &planned,
            (conn_id, index, peer),
            close_after,
            cfg,
        )
        .await;
        drop(in_flight);
        if written.is_err() {
            return;
        }
        if close_after {
            return close(io).await;
        }
    }
}

/// Waits, while no bytes of a next request are buffered, for data, peer
/// close, or one of the idle timers (measured from the call, i.e. from the
/// end of the previous response or from accept).
async fn idle<S>(io: &mut S, buf: &mut BytesMut, cfg: &OriginConfig) -> Idle
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !buf.is_empty() {
        return Idle::Data;
    }
    let start = Instant::now();
    let mut junk_sent = false;
    loop {
        let mut timers = Vec::with_capacity(3);
        if !junk_sent {
            timers.push((cfg.stray_bytes_idle_after, Timer::Stray));
        }
        timers.push((cfg.rst_idle_after, Timer::Rst));
        timers.push((cfg.idle_timeout, Timer::Fin));
        let next = timers
            .into_iter()
            .filter_map(|(after, timer)| after.map(|d| (start + d, timer)))
            .min_by_key(|(at, _)| *at);
        buf.reserve(8 * 1024);
        let fired = match next {
            None => {
                return match io.read_buf(buf).await {
                    Ok(0) | Err(_) => Idle::Gone,
                    Ok(_) => Idle::Data,
                }
            }
            Some((at, timer)) => tokio::select! {
                res = io.read_buf(buf) => {
                    return match res {
                        Ok(0) | Err(_) => Idle::Gone,
                        Ok(_) => Idle::Data,
                    }
                }
                _ = sleep_until(at) => timer,
            },
        };
        match fired {
            Timer::Stray => {
                junk_sent = true;
                if io.write_all(JUNK).await.is_err() || io.flush().await.is_err() {
                    return Idle::Gone;
                }
            }
            Timer::Rst => return Idle::Rst,
            Timer::Fin => return Idle::Fin,
        }
    }
}

/// Reads more bytes into `buf`; EOF or an error is `ReadError::Io`.
async fn fill<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> Result<(), ReadError> {
    buf.reserve(8 * 1024);
    match io.read_buf(buf).await {
        Ok(0) | Err(_) => Err(ReadError::Io),
        Ok(_) => Ok(()),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one CRLF-terminated line (returned without the CRLF).
async fn read_line<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> Result<String, ReadError> {
    loop {
        if let Some(end) = find(buf, b"\r\n") {
            let line = buf.split_to(end + 2);
            return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
        }
        if buf.len() > MAX_LINE {
            return Err(ReadError::Bad(400, "line too long"));
        }
        fill(io, buf).await?;
    }
}

/// Ensures at least `n` bytes are buffered.
async fn want<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    n: usize,
) -> Result<(), ReadError> {
    while buf.len() < n {
        fill(io, buf).await?;
    }
    Ok(())
}

async fn read_request<S>(io: &mut S, buf: &mut BytesMut) -> Result<Request, ReadError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Request head, up to the blank line. Stray CRLFs before the request
    // line are ignored (RFC 9112 section 2.2).
    let head = loop {
        while buf.starts_with(b"\r\n") {
            buf.advance(2);
        }
        if let Some(end) = find(buf, b"\r\n\r\n") {
            if end + 4 > MAX_HEAD {
                return Err(ReadError::Bad(431, "request head too large"));
            }
            break buf.split_to(end + 4);
        }
        if buf.len() > MAX_HEAD {
            return Err(ReadError::Bad(431, "request head too large"));
        }
        fill(io, buf).await?;
    };
    let head = String::from_utf8_lossy(&head[..head.len() - 4]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Bad(400, "malformed request line"));
    };
    if method.is_empty() || target.is_empty() {
        return Err(ReadError::Bad(400, "malformed request line"));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(ReadError::Bad(505, "unsupported HTTP version")),
    };
    let mut headers = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(ReadError::Bad(400, "obsolete line folding"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Bad(400, "malformed header line"));
        };
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(ReadError::Bad(400, "malformed header name"));
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let values = |name: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let connection_tokens: Vec<String> = values("connection")
        .iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let keep_alive = if http10 {
        connection_tokens.iter().any(|t| t == "keep-alive")
    } else {
        !connection_tokens.iter().any(|t| t == "close")
    };

    // Body framing.
    let transfer_encoding = values("transfer-encoding").join(",");
    let chunked = if transfer_encoding.is_empty() {
        false
    } else if transfer_encoding
        .rsplit(',')
        .next()
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
    {
        true
    } else {
        return Err(ReadError::Bad(400, "unsupported transfer-encoding"));
    };
    let content_length = if chunked {
        None
    } else {
        let lengths = values("content-length");
        let mut parsed = None;
        for value in lengths.iter().flat_map(|v| v.split(',')) {
            let n: usize = value
                .trim()
                .parse()
                .map_err(|_| ReadError::Bad(400, "invalid content-length"))?;
            if parsed.is_some_and(|p| p != n) {
                return Err(ReadError::Bad(400, "conflicting content-length"));
            }
            parsed = Some(n);
        }
        parsed
    };
    if content_length.is_some_and(|n| n > MAX_BODY) {
        return Err(ReadError::Bad(413, "request body too large"));
    }
    let expects_body = chunked || content_length.is_some_and(|n| n > 0);
    let expect_continue = values("expect")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_body && expect_continue && !http10 && buf.is_empty() {
        io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| ReadError::Io)?;
        io.flush().await.map_err(|_| ReadError::Io)?;
    }

    let mut body = Vec::new();
    if chunked {
        loop {
            let line = read_line(io, buf).await?;
            let size_str = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_str, 16)
                .map_err(|_| ReadError::Bad(400, "invalid chunk size"))?;
            if size == 0 {
                // Trailer section, ignored, up to the blank line.
                while !read_line(io, buf).await?.is_empty() {}
                break;
            }
            if body.len().saturating_add(size) > MAX_BODY {
                return Err(ReadError::Bad(413, "request body too large"));
            }
            want(io, buf, size + 2).await?;
            body.extend_from_slice(&buf[..size]);
            if &buf[size..size + 2] != b"\r\n" {
                return Err(ReadError::Bad(400, "chunk not terminated by CRLF"));
            }
            buf.advance(size + 2);
        }
    } else if let Some(n) = content_length {
        want(io, buf, n).await?;
        body.extend_from_slice(&buf[..n]);
        buf.advance(n);
    }

    Ok(Request {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers,
        body,
        keep_alive,
        http10,
    })
}

fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
}

async fn write_response<S>(
    io: &mut S,
    req: &Request,
    planned: &Planned,
    (conn_id, index, peer): (u64, u64, SocketAddr),
    close: bool,
    cfg: &OriginConfig,
) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let has_body = routes::status_has_body(planned.status);
    let send_body = has_body && req.method != "HEAD";
    let chunked = has_body && planned.chunked && !req.http10;
    let len = planned.body.len();

    let mut head = String::with_capacity(256);
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\nServer: edgepool-test-origin\r\nx-origin-conn: {conn_id}\r\nx-origin-index: {index}\r\nx-origin-peer: {}\r\n",
        planned.status,
        reason(planned.status),
        peer.ip()
    );
    for (name, value) in &planned.headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    if chunked {
        head.push_str("Transfer-Encoding: chunked\r\n");
    } else if has_body {
        let _ = write!(head, "Content-Length: {len}\r\n");
    }
    if let Some(keep_alive) = &cfg.keep_alive_header {
        let _ = write!(head, "Keep-Alive: {keep_alive}\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    } else if req.http10 {
        head.push_str("Connection: keep-alive\r\n");
    }
    head.push_str("\r\n");

    let mut out = head.into_bytes();
    if !send_body {
        io.write_all(&out).await?;
        return io.flush().await;
    }
    if chunked {
        // Several chunks: about a quarter of the body each, at most 16 KiB.
        let piece = len.div_ceil(4).clamp(1, 16 * 1024);
        let mut offset = 0u64;
        while offset < len {
            let n = piece.min(len - offset) as usize;
            out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            out.extend_from_slice(&planned.body.piece(offset, n));
            out.extend_from_slice(b"\r\n");
            offset += n as u64;
            if out.len() >= WRITE_CHUNK {
                io.write_all(&out).await?;
                out.clear();
            }
        }
        out.extend_from_slice(b"0\r\n\r\n");
        io.write_all(&out).await?;
    } else {
        let mut offset = 0u64;
        while offset < len {
            let n = (WRITE_CHUNK as u64).min(len - offset) as usize;
            out.extend_from_slice(&planned.body.piece(offset, n));
            offset += n as u64;
            io.write_all(&out).await?;
            out.clear();
        }
        if !out.is_empty() {
            io.write_all(&out).await?;
        }
    }
    io.flush().await
}

async fn write_error<S>(
    io: &mut S,
    status: u16,
    msg: &str,
    conn_id: u64,
    index: u64,
    peer: SocketAddr,
) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let body = format!("{msg}\n");
    let head = format!(
        "HTTP/1.1 {status} {}\r\nServer: edgepool-test-origin\r\nx-origin-conn: {conn_id}\r\nx-origin-index: {index}\r\nx-origin-peer: {}\r\ncontent-type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(status),
        peer.ip(),
        body.len()
    );
    io.write_all(head.as_bytes()).await?;
    io.flush().await
}

/// Graceful close: TLS close_notify (if TLS), then FIN.
async fn close<S: AsyncWrite + Unpin>(mut io: S) {
    let _ = timeout(CLOSE_TIMEOUT, io.shutdown()).await;
}

/// Abortive close: SO_LINGER 0, then drop => the kernel sends a TCP RST.
fn reset<S: HasTcp>(io: S) {
    let _ = socket2::SockRef::from(io.tcp()).set_linger(Some(Duration::ZERO));
    drop(io);
}
