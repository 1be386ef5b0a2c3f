//! In-process fake upstream proxies ("exits"): an HTTP/1.1 forward proxy
//! (`CONNECT` tunnels and absolute-form forwarding) and a SOCKS5 proxy.
//!
//! Each exit binds its outbound sockets to its own loopback source address
//! ([`FakeExitConfig::bind_ip`], e.g. `127.0.0.11`; all of `127.0.0.0/8` is
//! local on Linux), so an [`super::Origin`] on `127.0.0.1` can tell which
//! exit carried a request: [`super::Recorded::peer`] and the response header
//! `x-origin-peer` hold that address.
//!
//! Everything an exit sees is counted and logged for assertions, and an exit
//! can be killed (listener closed, every connection cut) and revived on the
//! same port.
//!
//! Bad client input never panics an exit; the connection is just closed (for
//! HTTP after a `400 Bad Request` where one can still be sent).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

/// Largest accepted request / response head.
const MAX_HEAD: usize = 64 * 1024;
/// Longest line accepted in a chunked body (size line or trailer).
const MAX_LINE: usize = 8 * 1024;
/// Bound on an outbound connect to a target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection that is being closed after an error answer is
/// drained (so unread request bytes do not turn the close into an RST).
const LINGER: Duration = Duration::from_secs(2);
/// What [`ConnectReply::Garbage`] writes.
const GARBAGE: &[u8] = b"garbage\r\n\r\n";

/// The protocol a [`FakeExit`] speaks to its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    Http,
    Socks5,
}

/// How the exit answers a CONNECT (HTTP) or SOCKS5 connect request. An HTTP
/// exit answers absolute-form (plain `http://`) requests the same way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectReply {
    /// Connect to the target and tunnel (HTTP absolute-form: forward).
    Normal,
    /// HTTP: answer with this status (e.g. 407 with Proxy-Authenticate, 403,
    /// 502) and close. A SOCKS5 exit answers reply code 0x01 (general
    /// failure) instead.
    Status(u16),
    /// SOCKS5: answer with this reply code (e.g. 0x05 connection refused)
    /// and close. An HTTP exit answers `502 Bad Gateway` instead.
    SocksCode(u8),
    /// Answer with junk bytes (`garbage\r\n\r\n`) and close.
    Garbage,
    /// Close without answering.
    Close,
}

/// Behaviour of a [`FakeExit`].
#[derive(Clone, Debug)]
pub struct FakeExitConfig {
    pub kind: ExitKind,
    /// Required credentials (HTTP: `Proxy-Authorization: Basic`, answered
    /// with 407 + `Proxy-Authenticate: Basic realm="fake"` when wrong or
    /// missing; SOCKS5: RFC 1929 username/password, failure status 0x01).
    /// `None` = no auth.
    pub credentials: Option<(String, String)>,
    /// If set, a credential check passes for ANY username starting with this
    /// prefix and the right password (models a rotating gateway whose
    /// usernames carry `-session-<id>`). The exact configured username is
    /// accepted too.
    pub username_prefix: Option<String>,
    /// Source address of outbound connections to (IPv4) targets. IPv6
    /// targets are connected to without binding.
    pub bind_ip: Ipv4Addr,
    pub reply: ConnectReply,
}

impl FakeExitConfig {
    /// Http, no credentials, [`ConnectReply::Normal`], bound to `bind_ip`.
    pub fn http(bind_ip: Ipv4Addr) -> Self {
        FakeExitConfig {
            kind: ExitKind::Http,
            credentials: None,
            username_prefix: None,
            bind_ip,
            reply: ConnectReply::Normal,
        }
    }

    /// Socks5, no credentials, [`ConnectReply::Normal`], bound to `bind_ip`.
    pub fn socks5(bind_ip: Ipv4Addr) -> Self {
        FakeExitConfig {
            kind: ExitKind::Socks5,
            ..FakeExitConfig::http(bind_ip)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Log {
    usernames: Vec<String>,
    targets: Vec<String>,
    request_headers: Vec<Vec<(String, String)>>,
}

/// Every open socket of the exit (client and outbound), as duplicated file
/// descriptors, so that [`FakeExit::kill`] can cut them synchronously.
#[derive(Default)]
struct Sockets {
    next_id: u64,
    /// Set by `kill`, cleared by `revive`: sockets registered meanwhile are
    /// shut down at once.
    killed: bool,
    open: HashMap<u64, socket2::Socket>,
}

/// State shared between the handle, the accept loop and connection tasks.
/// Survives kill/revive, so counters and logs accumulate.
struct Inner {
    cfg: FakeExitConfig,
    connections: AtomicU64,
    tunnels: AtomicU64,
    forwarded: AtomicU64,
    log: Mutex<Log>,
    sockets: Mutex<Sockets>,
}

impl Inner {
    fn credentials_ok(&self, creds: Option<&(String, String)>) -> bool {
        let Some((want_user, want_pass)) = &self.cfg.credentials else {
            return true;
        };
        let Some((user, pass)) = creds else {
            return false;
        };
        pass == want_pass
            && (user == want_user
                || self
                    .cfg
                    .username_prefix
                    .as_deref()
                    .is_some_and(|prefix| user.starts_with(prefix)))
    }
}

/// A TCP stream registered in [`Inner::sockets`] for as long as it lives.
struct Tracked {
    stream: TcpStream,
    inner: Arc<Inner>,
    id: Option<u64>,
}

impl Tracked {
    fn new(stream: TcpStream, inner: &Arc<Inner>) -> Tracked {
        let mut sockets = lock(&inner.sockets);
        let sock = socket2::SockRef::from(&stream);
        let id = if sockets.killed {
            let _ = sock.shutdown(Shutdown::Both);
            None
        } else {
            match sock.try_clone() {
                Ok(dup) => {
                    sockets.next_id += 1;
                    let id = sockets.next_id;
                    sockets.open.insert(id, dup);
                    Some(id)
                }
                Err(_) => None,
            }
        };
        drop(sockets);
        Tracked {
            stream,
            inner: inner.clone(),
            id,
        }
    }

    /// Whether an idle outbound connection still looks usable: no EOF, no
    /// error and no unexpected bytes pending.
    fn idle_and_open(&self) -> bool {
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        match socket2::SockRef::from(&self.stream).peek(&mut probe) {
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            Ok(_) => false,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Runs before `stream` is closed: the duplicate goes first, so the
        // socket really closes when `stream` does.
        if let Some(id) = self.id {
            lock(&self.inner.sockets).open.remove(&id);
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[derive(Default)]
struct RunState {
    /// Duplicate of the listening socket (present while running).
    listener: Option<socket2::Socket>,
    /// The accept loop (owns the listener and every connection task).
    task: Option<JoinHandle<()>>,
}

/// A running fake exit listening on `127.0.0.1:<ephemeral port>`.
///
/// HTTP kind: an HTTP/1.1 forward proxy on keep-alive client connections.
/// `CONNECT host:port` connects to the target (from `bind_ip`), answers
/// `HTTP/1.1 200 Connection established` and tunnels. An absolute-form
/// `http://` request is forwarded in origin form (hop-by-hop headers,
/// `Proxy-Authorization` and `Proxy-Connection` stripped; `Host` added if
/// missing; `Expect: 100-continue` answered by the exit) over an outbound
/// keep-alive connection kept per target, and the response is relayed with
/// its framing (Content-Length, chunked, or until close); the client
/// connection then stays open for the next request. Errors reaching a target
/// are answered with `502` and the client connection is closed. Origin-form
/// requests get `400`.
///
/// SOCKS5 kind: RFC 1928 `CONNECT` with ATYP IPv4, domain or IPv6, method
/// no-auth or RFC 1929 username/password (required when credentials are
/// configured), success reply carrying the outbound socket's local address.
///
/// Host names: `localhost` is 127.0.0.1, IP literals are used as-is, other
/// names go through the system resolver.
///
/// Dropping the handle kills the exit.
pub struct FakeExit {
    addr: SocketAddr,
    inner: Arc<Inner>,
    state: Mutex<RunState>,
}

impl std::fmt::Debug for FakeExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeExit")
            .field("addr", &self.addr)
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl FakeExit {
    /// Listens on 127.0.0.1:0.
    pub async fn start(cfg: FakeExitConfig) -> FakeExit {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind fake exit on 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake exit local_addr");
        let inner = Arc::new(Inner {
            cfg,
            connections: AtomicU64::new(0),
            tunnels: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            log: Mutex::new(Log::default()),
            sockets: Mutex::new(Sockets::default()),
        });
        let exit = FakeExit {
            addr,
            inner,
            state: Mutex::new(RunState::default()),
        };
        exit.launch(listener);
        exit
    }

    fn launch(&self, listener: TcpListener) {
        let dup = socket2::SockRef::from(&listener).try_clone().ok();
        let task = tokio::spawn(accept_loop(listener, self.inner.clone()));
        let mut state = lock(&self.state);
        state.listener = dup;
        state.task = Some(task);
    }

    /// The listening address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The configuration this exit runs with.
    pub fn config(&self) -> &FakeExitConfig {
        &self.inner.cfg
    }

    /// `http://user:pass@127.0.0.1:PORT` / `socks5://...` (credentials
    /// percent-encoded), or without userinfo when there are no credentials.
    pub fn url(&self) -> String {
        match &self.inner.cfg.credentials {
            Some((user, pass)) => self.url_with(user, pass),
            None => format!("{}://{}", self.scheme(), self.addr),
        }
    }

    /// Like [`FakeExit::url`] but with the given credentials (to test wrong
    /// passwords).
    pub fn url_with(&self, user: &str, pass: &str) -> String {
        format!(
            "{}://{}:{}@{}",
            self.scheme(),
            percent_encode(user),
            percent_encode(pass),
            self.addr
        )
    }

    fn scheme(&self) -> &'static str {
        match self.inner.cfg.kind {
            ExitKind::Http => "http",
            ExitKind::Socks5 => "socks5",
        }
    }

    /// TCP connections accepted from clients.
    pub fn connections(&self) -> u64 {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Tunnels established (CONNECT 200 / SOCKS success).
    pub fn tunnels(&self) -> u64 {
        self.inner.tunnels.load(Ordering::SeqCst)
    }

    /// Absolute-form HTTP requests forwarded to their target (HTTP kind
    /// only; counted once the request head was written to the target).
    pub fn forwarded(&self) -> u64 {
        self.inner.forwarded.load(Ordering::SeqCst)
    }

    /// Usernames presented, in order: one per CONNECT / absolute-form
    /// request carrying a (decodable) `Proxy-Authorization: Basic`, one per
    /// SOCKS5 username/password negotiation. Requests without credentials
    /// add nothing.
    pub fn usernames(&self) -> Vec<String> {
        lock(&self.inner.log).usernames.clone()
    }

    /// `host:port` targets requested (CONNECT / SOCKS / absolute-form), in
    /// order, including requests that were then refused (bad credentials,
    /// non-`Normal` reply). IPv6 hosts are bracketed (`[::1]:443`).
    pub fn targets(&self) -> Vec<String> {
        lock(&self.inner.log).targets.clone()
    }

    /// Every header (name lower-case, value) of every CONNECT and
    /// absolute-form request received, in order — for checking which
    /// credentials reached the exit.
    pub fn request_headers(&self) -> Vec<Vec<(String, String)>> {
        lock(&self.inner.log).request_headers.clone()
    }

    /// Polls (every 10 ms, up to `timeout`) until `cond(self)` holds; returns
    /// whether it did.
    pub async fn wait_until(&self, timeout: Duration, cond: impl Fn(&FakeExit) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills the exit now: stops accepting (the listening socket is shut
    /// down, so new connects are refused) and cuts every open client
    /// connection and tunnel (both directions of every client and outbound
    /// socket are shut down at once, then their tasks are aborted).
    pub fn kill(&self) {
        let mut state = lock(&self.state);
        if let Some(listener) = state.listener.take() {
            // On Linux, shutting down a listening socket stops it listening
            // (pending and new connection attempts are reset) even though
            // the accept loop still holds the descriptor for a moment.
            let _ = listener.shutdown(Shutdown::Both);
        }
        {
            let mut sockets = lock(&self.inner.sockets);
            sockets.killed = true;
            for sock in sockets.open.values() {
                let _ = sock.shutdown(Shutdown::Both);
            }
        }
        if let Some(task) = &state.task {
            // Dropping the accept loop's JoinSet aborts every connection.
            task.abort();
        }
    }

    /// After [`FakeExit::kill`]: listen again on the same port with the same
    /// behaviour (counters and logs carry on). Returns false if the port
    /// could not be re-bound. A no-op returning true if the exit is running.
    pub async fn revive(&self) -> bool {
        let task = {
            let mut state = lock(&self.state);
            if state.listener.is_some() {
                return true;
            }
            state.task.take()
        };
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        lock(&self.inner.sockets).killed = false;
        for attempt in 0..50 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let bound = (|| {
                let socket = TcpSocket::new_v4()?;
                socket.set_reuseaddr(true)?;
                socket.bind(self.addr)?;
                socket.listen(1024)
            })();
            if let Ok(listener) = bound {
                self.launch(listener);
                return true;
            }
        }
        false
    }

    /// Kills the exit and waits until its accept loop has finished.
    pub async fn shutdown(self) {
        self.kill();
        let task = lock(&self.state).task.take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for FakeExit {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Unreserved characters stay, everything else is `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((tcp, _peer)) => {
                    inner.connections.fetch_add(1, Ordering::SeqCst);
                    let _ = tcp.set_nodelay(true);
                    let client = Tracked::new(tcp, &inner);
                    match inner.cfg.kind {
                        ExitKind::Http => conns.spawn(serve_http(client, inner.clone())),
                        ExitKind::Socks5 => conns.spawn(serve_socks(client, inner.clone())),
                    };
                }
                // E.g. EMFILE, or the listener was shut down by `kill`:
                // back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Shared helpers

/// Resolves a target host (`localhost` → 127.0.0.1, IP literals as-is,
/// anything else through the system resolver, IPv4 preferred).
async fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
}

/// Connects to `target`, from `bind_ip` for IPv4 targets.
async fn connect_out(bind_ip: Ipv4Addr, target: SocketAddr) -> io::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(bind_ip.into(), 0))?;
        socket
    } else {
        TcpSocket::new_v6()?
    };
    let stream = timeout(CONNECT_TIMEOUT, socket.connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// `host:port`, with IPv6 literals bracketed.
fn fmt_target(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `host:port` / `[v6]:port` (brackets removed from the host); the
/// port may be omitted when `default_port` is given.
fn split_host_port(authority: &str, default_port: Option<u16>) -> Option<(String, u16)> {
    // `port_part` is `:PORT` or empty.
    let (host, port_part) = if let Some(rest) = authority.strip_prefix('[') {
        rest.split_once(']')?
    } else {
        let colon = authority.rfind(':').unwrap_or(authority.len());
        authority.split_at(colon)
    };
    let port = match port_part.strip_prefix(':') {
        Some(p) => p.parse().ok()?,
        None if port_part.is_empty() => default_port?,
        None => return None,
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
        return None;
    }
    Some((host.to_string(), port))
}

/// Closes gracefully: FIN, then drains what the peer still sends for a
/// moment, so that unread bytes do not turn the close into an RST.
async fn linger_close<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    let _ = io.flush().await;
    let _ = io.shutdown().await;
    let mut sink = [0u8; 8192];
    let _ = timeout(LINGER, async {
        while let Ok(n) = io.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Writes `bytes` (if any), then [`linger_close`].
async fn answer_and_close<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) {
    if !bytes.is_empty() && io.write_all(bytes).await.is_err() {
        return;
    }
    linger_close(io).await;
}

// ---------------------------------------------------------------------------
// HTTP/1.x parsing and relaying

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

async fn fill<R: AsyncRead + Unpin>(io: &mut R, buf: &mut BytesMut) -> io::Result<usize> {
    buf.reserve(16 * 1024);
    io.read_buf(buf).await
}

/// Reads a message head up to the blank line; returns it without the final
/// CRLFCRLF. `Ok(None)`: clean EOF before any byte. Leading CRLFs are
/// skipped.
async fn read_head_text<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
) -> io::Result<Option<String>> {
    loop {
        while buf.starts_with(b"\r\n") {
            buf.advance(2);
        }
        if let Some(end) = find(buf, b"\r\n\r\n") {
            if end + 4 > MAX_HEAD {
                return Err(invalid("head too large"));
            }
            let head = buf.split_to(end + 4);
            return Ok(Some(String::from_utf8_lossy(&head[..end]).into_owned()));
        }
        if buf.len() > MAX_HEAD {
            return Err(invalid("head too large"));
        }
        let was_empty = buf.is_empty();
        if fill(io, buf).await? == 0 {
            return if was_empty {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "EOF inside a message head",
                ))
            };
        }
    }
}

/// Parses header lines (everything after the start line).
fn parse_header_lines<'a>(lines: impl Iterator<Item = &'a str>) -> Option<Vec<(String, String)>> {
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.is_empty() || name.contains(|c: char| c.is_whitespace()) {
            return None;
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    Some(headers)
}

struct RequestHead {
    method: String,
    target: String,
    version: String,
    /// Names as received.
    headers: Vec<(String, String)>,
}

fn parse_request_head(text: &str) -> Option<RequestHead> {
    let mut lines = text.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if method.is_empty() || target.is_empty() || !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return None;
    }
    Some(RequestHead {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers: parse_header_lines(lines)?,
    })
}

struct ResponseHead {
    /// The status line as received.
    status_line: String,
    version: String,
    status: u16,
    headers: Vec<(String, String)>,
}

fn parse_response_head(text: &str) -> Option<ResponseHead> {
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = parts.next()?.parse().ok()?;
    if !(100..=999).contains(&status) {
        return None;
    }
    Some(ResponseHead {
        status_line: status_line.to_string(),
        version: version.to_string(),
        status,
        headers: parse_header_lines(lines)?,
    })
}

fn header_values<'h>(headers: &'h [(String, String)], name: &str) -> Vec<&'h str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Lower-cased comma-separated tokens of the named headers.
fn tokens(headers: &[(String, String)], names: &[&str]) -> Vec<String> {
    names
        .iter()
        .flat_map(|name| header_values(headers, name))
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Hop-by-hop headers that are never passed on, plus those named in
/// `Connection`.
fn is_hop_by_hop(name: &str, connection_tokens: &[String]) -> bool {
    let lower = name.to_ascii_lowercase();
    matches!(
        lower.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "proxy-authorization"
    ) || connection_tokens.contains(&lower)
}

/// `(user, password)` from `Proxy-Authorization: Basic ...`.
fn basic_credentials(headers: &[(String, String)]) -> Option<(String, String)> {
    let value = header_values(headers, "proxy-authorization")
        .into_iter()
        .next()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8_lossy(&decoded).into_owned();
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Response delimited by the connection closing.
    UntilClose,
}

/// Request body framing; `None` if it is invalid.
fn request_framing(headers: &[(String, String)]) -> Option<Framing> {
    let te = tokens(headers, &["transfer-encoding"]);
    if !te.is_empty() {
        return (te.last().map(String::as_str) == Some("chunked")).then_some(Framing::Chunked);
    }
    match content_length(headers)? {
        Some(0) | None => Some(Framing::None),
        Some(n) => Some(Framing::Length(n)),
    }
}

fn response_framing(headers: &[(String, String)]) -> Option<Framing> {
    let te = tokens(headers, &["transfer-encoding"]);
    if !te.is_empty() {
        return Some(if te.last().map(String::as_str) == Some("chunked") {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    Some(match content_length(headers)? {
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// `Ok(None)`: no Content-Length; outer `None`: invalid or conflicting.
fn content_length(headers: &[(String, String)]) -> Option<Option<u64>> {
    let mut parsed = None;
    for value in header_values(headers, "content-length")
        .iter()
        .flat_map(|v| v.split(','))
    {
        let n: u64 = value.trim().parse().ok()?;
        if parsed.is_some_and(|p| p != n) {
            return None;
        }
        parsed = Some(n);
    }
    Some(parsed)
}

/// Copies exactly `n` bytes (buffered ones first) from `src` to `dst`.
async fn relay_exact<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    mut n: u64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if !buf.is_empty() && n > 0 {
            let take = (buf.len() as u64).min(n) as usize;
            dst.write_all(&buf[..take]).await?;
            buf.advance(take);
            n -= take as u64;
        }
        if n == 0 {
            return Ok(());
        }
        if fill(src, buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF inside a body",
            ));
        }
    }
}

/// Reads one line including its CRLF.
async fn read_line<R: AsyncRead + Unpin>(src: &mut R, buf: &mut BytesMut) -> io::Result<BytesMut> {
    loop {
        if let Some(end) = find(buf, b"\r\n") {
            return Ok(buf.split_to(end + 2));
        }
        if buf.len() > MAX_LINE {
            return Err(invalid("line too long"));
        }
        if fill(src, buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF inside a chunked body",
            ));
        }
    }
}

/// Relays a chunked body verbatim (chunk extensions and trailers included).
async fn relay_chunked<R, W>(src: &mut R, buf: &mut BytesMut, dst: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let line = read_line(src, buf).await?;
        dst.write_all(&line).await?;
        let text =
            std::str::from_utf8(&line[..line.len() - 2]).map_err(|_| invalid("chunk size"))?;
        let size_str = text.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size_str, 16).map_err(|_| invalid("chunk size"))?;
        if size == 0 {
            loop {
                let line = read_line(src, buf).await?;
                dst.write_all(&line).await?;
                if line.len() == 2 {
                    return Ok(());
                }
            }
        }
        let with_crlf = size.checked_add(2).ok_or_else(|| invalid("chunk size"))?;
        relay_exact(src, buf, dst, with_crlf).await?;
    }
}

async fn relay_until_close<R, W>(src: &mut R, buf: &mut BytesMut, dst: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if !buf.is_empty() {
            dst.write_all(buf).await?;
            buf.clear();
        }
        if fill(src, buf).await? == 0 {
            return Ok(());
        }
    }
}

async fn relay_body<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    framing: Framing,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match framing {
        Framing::None => Ok(()),
        Framing::Length(n) => relay_exact(src, buf, dst, n).await,
        Framing::Chunked => relay_chunked(src, buf, dst).await,
        Framing::UntilClose => relay_until_close(src, buf, dst).await,
    }
}

fn status_response(status: u16) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    if status == 407 {
        head.push_str("Proxy-Authenticate: Basic realm=\"fake\"\r\n");
    }
    head.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
    head.into_bytes()
}

// ---------------------------------------------------------------------------
// HTTP exit

/// An outbound keep-alive connection of the HTTP exit.
struct Upstream {
    io: Tracked,
    buf: BytesMut,
}

impl Upstream {
    fn reusable(&self) -> bool {
        self.buf.is_empty() && self.io.idle_and_open()
    }
}

/// What to do with the client connection after a forwarded exchange.
enum Next {
    KeepAlive,
    /// Close gracefully.
    Close,
    /// Drop at once (mid-message failure).
    Abort,
}

async fn serve_http(mut client: Tracked, inner: Arc<Inner>) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut upstreams: HashMap<String, Upstream> = HashMap::new();
    loop {
        let head = match read_head_text(&mut client, &mut buf).await {
            Ok(Some(text)) => match parse_request_head(&text) {
                Some(head) => head,
                None => return answer_and_close(&mut client, &status_response(400)).await,
            },
            Ok(None) => return,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return answer_and_close(&mut client, &status_response(400)).await
            }
            Err(_) => return,
        };
        let is_connect = head.method.eq_ignore_ascii_case("CONNECT");
        if !is_connect && !head.target.contains("://") {
            return answer_and_close(&mut client, &status_response(400)).await;
        }
        // (host, port, origin-form path)
        let parsed = if is_connect {
            split_host_port(&head.target, None).map(|(h, p)| (h, p, String::new()))
        } else {
            parse_absolute_http(&head.target)
        };
        let creds = basic_credentials(&head.headers);
        {
            let mut log = lock(&inner.log);
            log.request_headers.push(
                head.headers
                    .iter()
                    .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
                    .collect(),
            );
            if let Some((user, _)) = &creds {
                log.usernames.push(user.clone());
            }
            log.targets.push(match &parsed {
                Some((host, port, _)) => fmt_target(host, *port),
                None => head.target.clone(),
            });
        }
        if !inner.credentials_ok(creds.as_ref()) {
            return answer_and_close(&mut client, &status_response(407)).await;
        }
        match &inner.cfg.reply {
            ConnectReply::Normal => {}
            ConnectReply::Status(status) => {
                return answer_and_close(&mut client, &status_response(*status)).await
            }
            ConnectReply::SocksCode(_) => {
                return answer_and_close(&mut client, &status_response(502)).await
            }
            ConnectReply::Garbage => return answer_and_close(&mut client, GARBAGE).await,
            ConnectReply::Close => return linger_close(&mut client).await,
        }
        let Some((host, port, path)) = parsed else {
            return answer_and_close(&mut client, &status_response(400)).await;
        };
        if is_connect {
            return tunnel(client, buf, &host, port, &inner).await;
        }
        let next = forward(
            &mut client,
            &mut buf,
            &mut upstreams,
            &head,
            (&host, port, &path),
            &inner,
        )
        .await;
        match next {
            Next::KeepAlive => {}
            Next::Close => return linger_close(&mut client).await,
            Next::Abort => return,
        }
    }
}

/// `http://host[:port]/path?q` → (host, port, `/path?q`). Other schemes and
/// malformed targets give `None`.
fn parse_absolute_http(target: &str) -> Option<(String, u16, String)> {
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    // Userinfo in the target is not meant for the origin.
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = split_host_port(authority, Some(80))?;
    let path = path.split('#').next().unwrap_or_default();
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Some((host, port, path))
}

/// CONNECT: connect, answer 200, then copy both ways until both sides closed.
async fn tunnel(mut client: Tracked, buf: BytesMut, host: &str, port: u16, inner: &Arc<Inner>) {
    let outbound = match resolve(host, port).await {
        Ok(addr) => connect_out(inner.cfg.bind_ip, addr).await,
        Err(e) => Err(e),
    };
    let Ok(outbound) = outbound else {
        return answer_and_close(&mut client, &status_response(502)).await;
    };
    let mut upstream = Tracked::new(outbound, inner);
    inner.tunnels.fetch_add(1, Ordering::SeqCst);
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    // Bytes the client sent right behind the CONNECT head.
    if !buf.is_empty() && upstream.write_all(&buf).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

async fn connect_upstream(host: &str, port: u16, inner: &Arc<Inner>) -> io::Result<Upstream> {
    let addr = resolve(host, port).await?;
    let stream = connect_out(inner.cfg.bind_ip, addr).await?;
    Ok(Upstream {
        io: Tracked::new(stream, inner),
        buf: BytesMut::with_capacity(16 * 1024),
    })
}

/// Forwards one absolute-form request and relays its response.
async fn forward(
    client: &mut Tracked,
    cbuf: &mut BytesMut,
    upstreams: &mut HashMap<String, Upstream>,
    head: &RequestHead,
    (host, port, path): (&str, u16, &str),
    inner: &Arc<Inner>,
) -> Next {
    let http10 = head.version == "HTTP/1.0";
    let conn_tokens = tokens(&head.headers, &["connection", "proxy-connection"]);
    let client_keep_alive = if http10 {
        conn_tokens.iter().any(|t| t == "keep-alive")
    } else {
        !conn_tokens.iter().any(|t| t == "close")
    };
    let Some(framing) = request_framing(&head.headers) else {
        answer_and_close(client, &status_response(400)).await;
        return Next::Abort;
    };
    let has_body = framing != Framing::None;
    let expect_continue = header_values(&head.headers, "expect")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("100-continue"));

    let mut out = format!("{} {} {}\r\n", head.method, path, head.version);
    if header_values(&head.headers, "host").is_empty() {
        let authority = if port == 80 {
            fmt_target(host, port).trim_end_matches(":80").to_string()
        } else {
            fmt_target(host, port)
        };
        let _ = write!(out, "Host: {authority}\r\n");
    }
    for (name, value) in &head.headers {
        if is_hop_by_hop(name, &conn_tokens)
            || (expect_continue && name.eq_ignore_ascii_case("expect"))
        {
            continue;
        }
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.push_str("\r\n");

    let key = fmt_target(host, port);
    let (mut up, mut reused) = match upstreams.remove(&key) {
        Some(up) if up.reusable() => (up, true),
        _ => match connect_upstream(host, port, inner).await {
            Ok(up) => (up, false),
            Err(_) => {
                answer_and_close(client, &status_response(502)).await;
                return Next::Abort;
            }
        },
    };
    let mut counted = false;
    // Whether anything of the response was sent to the client yet.
    let mut client_dirty = false;
    let resp = loop {
        let wrote = up.io.write_all(out.as_bytes()).await.is_ok();
        if wrote && !counted {
            counted = true;
            inner.forwarded.fetch_add(1, Ordering::SeqCst);
        }
        if wrote && has_body {
            if expect_continue
                && !http10
                && client
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await
                    .is_err()
            {
                return Next::Abort;
            }
            if relay_body(client, cbuf, &mut up.io, framing).await.is_err() {
                return Next::Abort;
            }
        }
        let got = if wrote {
            read_final_head(&mut up, client, &mut client_dirty).await
        } else {
            Ok(None)
        };
        match got {
            Ok(Some(resp)) => break resp,
            // A reused connection the target had closed meanwhile: retry
            // once on a fresh one if nothing would be lost.
            Ok(None) | Err(_) if reused && !has_body && !client_dirty && up.buf.is_empty() => {
                match connect_upstream(host, port, inner).await {
                    Ok(fresh) => {
                        up = fresh;
                        reused = false;
                    }
                    Err(_) => {
                        answer_and_close(client, &status_response(502)).await;
                        return Next::Abort;
                    }
                }
            }
            _ if !client_dirty => {
                answer_and_close(client, &status_response(502)).await;
                return Next::Abort;
            }
            _ => return Next::Abort,
        }
    };

    let no_body =
        head.method.eq_ignore_ascii_case("HEAD") || matches!(resp.status, 101..=199 | 204 | 304);
    let Some(rframing) = (if no_body {
        Some(Framing::None)
    } else {
        response_framing(&resp.headers)
    }) else {
        return Next::Abort;
    };
    let resp_tokens = tokens(&resp.headers, &["connection"]);
    let upstream_keep_alive = rframing != Framing::UntilClose
        && !http10
        && resp.status != 101
        && if resp.version == "HTTP/1.0" {
            resp_tokens.iter().any(|t| t == "keep-alive")
        } else {
            !resp_tokens.iter().any(|t| t == "close")
        };
    let client_keep_alive =
        client_keep_alive && rframing != Framing::UntilClose && resp.status != 101;

    let mut out = format!("{}\r\n", resp.status_line);
    for (name, value) in &resp.headers {
        if !is_hop_by_hop(name, &resp_tokens) {
            let _ = write!(out, "{name}: {value}\r\n");
        }
    }
    if !client_keep_alive {
        out.push_str("Connection: close\r\n");
    } else if http10 {
        out.push_str("Connection: keep-alive\r\n");
    }
    out.push_str("\r\n");
    if client.write_all(out.as_bytes()).await.is_err() {
        return Next::Abort;
    }
    if relay_body(&mut up.io, &mut up.buf, client, rframing)
        .await
        .is_err()
    {
        return Next::Abort;
    }
    if client.flush().await.is_err() {
        return Next::Abort;
    }
    if upstream_keep_alive {
        upstreams.insert(key, up);
    }
    if client_keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// Reads response heads from the target, relaying interim (1xx except 101)
/// ones to the client, until a final one. `Ok(None)`: the target closed
/// before sending anything.
async fn read_final_head(
    up: &mut Upstream,
    client: &mut Tracked,
    client_dirty: &mut bool,
) -> io::Result<Option<ResponseHead>> {
    loop {
        let Some(text) = read_head_text(&mut up.io, &mut up.buf).await? else {
            return Ok(None);
        };
        let resp = parse_response_head(&text).ok_or_else(|| invalid("bad response head"))?;
        if (100..200).contains(&resp.status) && resp.status != 101 {
            *client_dirty = true;
            client.write_all(text.as_bytes()).await?;
            client.write_all(b"\r\n\r\n").await?;
            continue;
        }
        return Ok(Some(resp));
    }
}

// ---------------------------------------------------------------------------
// SOCKS5 exit

async fn serve_socks(mut client: Tracked, inner: Arc<Inner>) {
    if let Ok(Some(mut upstream)) = socks_handshake(&mut client, &inner).await {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

/// A failure reply (`BND.ADDR` 0.0.0.0:0).
fn socks_failure(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

fn socks_error_code(e: &io::Error) -> u8 {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => 0x05,
        io::ErrorKind::NetworkUnreachable => 0x03,
        io::ErrorKind::HostUnreachable
        | io::ErrorKind::AddrNotAvailable
        | io::ErrorKind::TimedOut
        | io::ErrorKind::NotFound => 0x04,
        _ => 0x01,
    }
}

/// Runs the SOCKS5 negotiation; `Ok(Some(..))` is an established tunnel
/// (success already sent). Failures have been answered (or the connection
/// is to be dropped).
async fn socks_handshake(client: &mut Tracked, inner: &Arc<Inner>) -> io::Result<Option<Tracked>> {
    let cfg = &inner.cfg;
    let mut greeting = [0u8; 2];
    client.read_exact(&mut greeting).await?;
    if greeting[0] != 5 {
        return Ok(None);
    }
    let mut methods = vec![0u8; greeting[1] as usize];
    client.read_exact(&mut methods).await?;
    let method = if cfg.credentials.is_some() {
        methods.contains(&2).then_some(2u8)
    } else if methods.contains(&0) {
        Some(0)
    } else if methods.contains(&2) {
        Some(2)
    } else {
        None
    };
    let Some(method) = method else {
        answer_and_close(client, &[5, 0xFF]).await;
        return Ok(None);
    };
    client.write_all(&[5, method]).await?;

    if method == 2 {
        let mut ver_len = [0u8; 2];
        client.read_exact(&mut ver_len).await?;
        if ver_len[0] != 1 {
            return Ok(None);
        }
        let mut user = vec![0u8; ver_len[1] as usize];
        client.read_exact(&mut user).await?;
        let mut plen = [0u8; 1];
        client.read_exact(&mut plen).await?;
        let mut pass = vec![0u8; plen[0] as usize];
        client.read_exact(&mut pass).await?;
        let user = String::from_utf8_lossy(&user).into_owned();
        let pass = String::from_utf8_lossy(&pass).into_owned();
        lock(&inner.log).usernames.push(user.clone());
        if !inner.credentials_ok(Some(&(user, pass))) {
            answer_and_close(client, &[1, 1]).await;
            return Ok(None);
        }
        client.write_all(&[1, 0]).await?;
    }

    let mut request = [0u8; 4];
    client.read_exact(&mut request).await?;
    if request[0] != 5 {
        return Ok(None);
    }
    let host = match request[3] {
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await?;
            Ipv4Addr::from(ip).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            client.read_exact(&mut name).await?;
            String::from_utf8_lossy(&name).into_owned()
        }
        4 => {
            let mut ip = [0u8; 16];
            client.read_exact(&mut ip).await?;
            Ipv6Addr::from(ip).to_string()
        }
        _ => {
            answer_and_close(client, &socks_failure(0x08)).await;
            return Ok(None);
        }
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port).await?;
    let port = u16::from_be_bytes(port);
    lock(&inner.log).targets.push(fmt_target(&host, port));
    if request[1] != 1 {
        answer_and_close(client, &socks_failure(0x07)).await;
        return Ok(None);
    }
    match &cfg.reply {
        ConnectReply::Normal => {}
        ConnectReply::Status(_) => {
            answer_and_close(client, &socks_failure(0x01)).await;
            return Ok(None);
        }
        ConnectReply::SocksCode(code) => {
            answer_and_close(client, &socks_failure(*code)).await;
            return Ok(None);
        }
        ConnectReply::Garbage => {
            answer_and_close(client, GARBAGE).await;
            return Ok(None);
        }
        ConnectReply::Close => {
            linger_close(client).await;
            return Ok(None);
        }
    }
    let outbound = match resolve(&host, port).await {
        Ok(addr) => connect_out(cfg.bind_ip, addr).await,
        Err(e) => Err(e),
    };
    let outbound = match outbound {
        Ok(stream) => stream,
        Err(e) => {
            answer_and_close(client, &socks_failure(socks_error_code(&e))).await;
            return Ok(None);
        }
    };
    let local = outbound.local_addr()?;
    let upstream = Tracked::new(outbound, inner);
    inner.tunnels.fetch_add(1, Ordering::SeqCst);
    let mut reply = vec![5, 0, 0];
    match local.ip() {
        IpAddr::V4(ip) => {
            reply.push(1);
            reply.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            reply.push(4);
            reply.extend_from_slice(&ip.octets());
        }
    }
    reply.extend_from_slice(&local.port().to_be_bytes());
    client.write_all(&reply).await?;
    Ok(Some(upstream))
}
