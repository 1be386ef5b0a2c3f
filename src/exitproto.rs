//! exitproto: the client side of upstream (exit) proxy handshakes. Over a stream already
//! connected to an exit proxy, [`http_connect`] (HTTP `CONNECT`) or [`socks5_connect`]
//! (RFC 1928, with RFC 1929 username/password) turns it into a tunnel to `host:port`.
//!
//! Errors say whose fault a failure is: the credentials ([`HandshakeError::Auth`]), the
//! proxy's decision about the target ([`HandshakeError::Refused`]), a misbehaving node
//! ([`HandshakeError::Protocol`]) or the connection ([`HandshakeError::Io`]). No message
//! ever contains the credentials. Timeouts are the caller's job.
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr};

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Credentials for an exit proxy. `Debug` redacts both fields (provider usernames carry
/// account ids and targeting options).
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyAuth {
    /// Username.
    pub username: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for ProxyAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProxyAuth(<redacted>)")
    }
}

impl ProxyAuth {
    /// `Basic base64(user:pass)` as a `HeaderValue` marked sensitive (for absolute-form
    /// requests to an HTTP proxy, and the `CONNECT` request).
    pub fn basic_header(&self) -> http::HeaderValue {
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.username, self.password));
        let mut value = http::HeaderValue::try_from(format!("Basic {encoded}"))
            .expect("base64 output is always a valid header value");
        value.set_sensitive(true);
        value
    }
}

/// Why a proxy handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The proxy rejected our credentials: HTTP 407, SOCKS5 "no acceptable method" (0xFF) or
    /// an RFC 1929 authentication failure (also: credentials too long for SOCKS5).
    #[error("exit proxy rejected the credentials: {0}")]
    Auth(String),
    /// The proxy answered properly but will not reach the target: an HTTP `CONNECT` status
    /// other than 2xx/407 (`status` set, `reason` is the reason phrase, at most 100
    /// characters), or a SOCKS5 reply code 0x01..=0x08 (`status` is `None`, `reason` names
    /// the code).
    #[error("exit proxy refused the tunnel: {}", refused_text(*.status, .reason))]
    Refused {
        /// HTTP status of the `CONNECT` response; `None` for SOCKS5.
        status: Option<u16>,
        /// Reason phrase (HTTP) or reply code description (SOCKS5).
        reason: String,
    },
    /// The proxy spoke something that is not the protocol, cut the `CONNECT`
    /// response head, or closed before answering: a fault of the node.
    #[error("exit proxy protocol error: {0}")]
    Protocol(String),
    /// I/O error on the proxy connection (also `InvalidInput` for a target host that cannot
    /// be put in a request: control characters, spaces, over 255 bytes, ...).
    #[error("exit proxy I/O error: {0}")]
    Io(#[from] io::Error),
}

fn refused_text(status: Option<u16>, reason: &str) -> String {
    match (status, reason.is_empty()) {
        (Some(s), true) => format!("HTTP {s}"),
        (Some(s), false) => format!("HTTP {s} {reason}"),
        (None, _) => reason.to_owned(),
    }
}

/// Largest `CONNECT` response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Longest reason phrase kept in [`HandshakeError::Refused`].
const MAX_REASON: usize = 100;

/// A validated target host.
enum Target<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

fn parse_target(host: &str) -> Result<Target<'_>, HandshakeError> {
    let invalid = |why: &str| {
        HandshakeError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("target host {why}"),
        ))
    };
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| Target::Ip(IpAddr::V6(ip)))
            .map_err(|_| invalid("in brackets is not an IPv6 address"));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Target::Ip(ip));
    }
    if host.is_empty() {
        return Err(invalid("is empty"));
    }
    if host.len() > 255 {
        return Err(invalid("is longer than 255 bytes"));
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b))
    {
        return Err(invalid("contains a character not allowed in a host name"));
    }
    Ok(Target::Name(host))
}

/// `host:port` for the request line, IPv6 in brackets.
fn authority(target: &Target<'_>, port: u16) -> String {
    match target {
        Target::Ip(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Target::Ip(IpAddr::V4(ip)) => format!("{ip}:{port}"),
        Target::Name(name) => format!("{name}:{port}"),
    }
}

/// Maps an unexpected end of stream to a protocol error (the node hung up mid-handshake).
fn eof_is_protocol(e: io::Error, what: &str) -> HandshakeError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        HandshakeError::Protocol(format!("proxy closed the connection {what}"))
    } else {
        HandshakeError::Io(e)
    }
}

/// Keeps a proxy-supplied reason phrase printable and short.
fn clean_reason(reason: &str) -> String {
    reason
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_REASON)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// Sends `CONNECT host:port HTTP/1.1` (IPv6 host in brackets) with `Host:` and, with auth,
/// `Proxy-Authorization: Basic ...`; reads the response head (at most 16 KiB), skipping
/// interim 1xx responses, and requires a 2xx. Returns the bytes that arrived after the 2xx
/// head: the tunnel's first bytes (a server that speaks first, such as SSH or SMTP, may share
/// a segment with the proxy's answer); the caller must deliver them before reading the
/// stream. Never puts the credentials in an error message.
pub async fn http_connect<S>(
    stream: &mut S,
    host: &str,
    port: u16,
    auth: Option<&ProxyAuth>,
) -> Result<Vec<u8>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let target = parse_target(host)?;
    let authority = authority(&target, port);
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n").into_bytes();
    if let Some(auth) = auth {
        request.extend_from_slice(b"Proxy-Authorization: ");
        request.extend_from_slice(auth.basic_header().as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    stream.write_all(&request).await?;
    stream.flush().await?;

    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // Parse what we have; read more only while the head is incomplete.
        let parsed = {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => Some((
                    len,
                    response.code.unwrap_or(0),
                    clean_reason(response.reason.unwrap_or("")),
                )),
                Ok(httparse::Status::Partial) => None,
                Err(e) => {
                    return Err(HandshakeError::Protocol(format!(
                        "CONNECT response is not HTTP: {e}"
                    )))
                }
            }
        };
        let Some((len, status, reason)) = parsed else {
            if buf.len() >= MAX_HEAD {
                return Err(HandshakeError::Protocol(format!(
                    "CONNECT response head is larger than {} KiB",
                    MAX_HEAD / 1024
                )));
            }
            let mut chunk = [0u8; 4096];
            let want = chunk.len().min(MAX_HEAD - buf.len());
            let n = stream.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Err(HandshakeError::Protocol(if buf.is_empty() {
                    "proxy closed the connection without answering CONNECT".into()
                } else {
                    "proxy closed the connection in the middle of the CONNECT response".into()
                }));
            }
            buf.extend_from_slice(&chunk[..n]);
            continue;
        };
        match status {
            100 | 102..=199 => {
                // Interim response: drop it and read the final one.
                buf.drain(..len);
                continue;
            }
            200..=299 => {
                buf.drain(..len);
                return Ok(buf);
            }
            // Some proxies (tinyproxy 1.11) answer wrong credentials with 401, not 407.
            401 if auth.is_some() => {
                return Err(HandshakeError::Auth(
                    format!("HTTP 401 {reason} (credentials rejected)")
                        .trim_end()
                        .to_owned(),
                ))
            }
            407 => {
                return Err(HandshakeError::Auth(if auth.is_some() {
                    format!("HTTP 407 {reason}").trim_end().to_owned()
                } else {
                    "HTTP 407: the proxy requires credentials and none are configured".into()
                }))
            }
            _ => {
                return Err(HandshakeError::Refused {
                    status: Some(status),
                    reason,
                })
            }
        }
    }
}

/// SOCKS protocol version 5 (RFC 1928).
const SOCKS5_VER: u8 = 0x05;
/// SOCKS5 method: no authentication.
const SOCKS5_NO_AUTH: u8 = 0x00;
/// SOCKS5 method: username/password (RFC 1929).
const SOCKS5_USER_PASS: u8 = 0x02;
/// SOCKS5 method selection: none of the offered methods is acceptable.
const SOCKS5_NO_ACCEPTABLE: u8 = 0xFF;

/// RFC 1928 `CONNECT`: ATYP domain name for names (socks5h semantics: the proxy resolves),
/// IPv4/IPv6 for literals. Offers no-auth, or only username/password (RFC 1929) when `auth`
/// is given. Reads and discards the reply's bound address for every ATYP, so on success the
/// stream is positioned at the first tunnelled byte.
pub async fn socks5_connect<S>(
    stream: &mut S,
    host: &str,
    port: u16,
    auth: Option<&ProxyAuth>,
) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let target = parse_target(host)?;
    if let Some(auth) = auth {
        if auth.username.len() > 255 || auth.password.len() > 255 {
            return Err(HandshakeError::Auth(
                "SOCKS5 username and password must each be at most 255 bytes".into(),
            ));
        }
    }

    socks5_select_method(stream, auth).await?;
    if let Some(auth) = auth {
        socks5_authenticate(stream, auth).await?;
    }

    // CONNECT request.
    let req = socks5_connect_request(target, port);
    stream.write_all(&req).await?;
    stream.flush().await?;

    socks5_read_reply(stream).await
}

/// SOCKS5 method negotiation: offers no-auth, or username/password when `auth` is given, and
/// checks the proxy chose it.
async fn socks5_select_method<S>(
    stream: &mut S,
    auth: Option<&ProxyAuth>,
) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let method = if auth.is_some() {
        SOCKS5_USER_PASS
    } else {
        SOCKS5_NO_AUTH
    };
    stream.write_all(&[SOCKS5_VER, 1, method]).await?;
    stream.flush().await?;
    let mut choice = [0u8; 2];
    stream
        .read_exact(&mut choice)
        .await
        .map_err(|e| eof_is_protocol(e, "during SOCKS5 method selection"))?;
    if choice[0] != SOCKS5_VER {
        return Err(HandshakeError::Protocol(format!(
            "not a SOCKS5 server (version byte {:#04x})",
            choice[0]
        )));
    }
    match choice[1] {
        m if m == method => Ok(()),
        SOCKS5_NO_ACCEPTABLE => Err(HandshakeError::Auth(if auth.is_some() {
            "SOCKS5 proxy does not accept username/password authentication".into()
        } else {
            "SOCKS5 proxy requires authentication and no credentials are configured".into()
        })),
        m => Err(HandshakeError::Protocol(format!(
            "SOCKS5 proxy chose method {m:#04x}, which was not offered"
        ))),
    }
}

/// RFC 1929 username/password sub-negotiation (lengths already checked to fit a byte).
async fn socks5_authenticate<S>(stream: &mut S, auth: &ProxyAuth) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut msg = Vec::with_capacity(3 + auth.username.len() + auth.password.len());
    msg.push(0x01);
    msg.push(auth.username.len() as u8);
    msg.extend_from_slice(auth.username.as_bytes());
    msg.push(auth.password.len() as u8);
    msg.extend_from_slice(auth.password.as_bytes());
    stream.write_all(&msg).await?;
    stream.flush().await?;
    let mut reply = [0u8; 2];
    stream
        .read_exact(&mut reply)
        .await
        .map_err(|e| eof_is_protocol(e, "during SOCKS5 authentication"))?;
    // RFC 1929 says version 0x01; some servers answer 0x05. Accept both.
    if reply[0] != 0x01 && reply[0] != SOCKS5_VER {
        return Err(HandshakeError::Protocol(format!(
            "bad SOCKS5 authentication reply version {:#04x}",
            reply[0]
        )));
    }
    if reply[1] != 0x00 {
        return Err(HandshakeError::Auth(format!(
            "SOCKS5 username/password rejected (status {:#04x})",
            reply[1]
        )));
    }
    Ok(())
}

/// The SOCKS5 `CONNECT` request for `target:port`: ATYP IPv4/IPv6 for literals, domain name
/// otherwise.
fn socks5_connect_request(target: Target<'_>, port: u16) -> Vec<u8> {
    let mut req = vec![SOCKS5_VER, 0x01, 0x00];
    match target {
        Target::Ip(IpAddr::V4(ip)) => {
            req.push(0x01);
            req.extend_from_slice(&ip.octets());
        }
        Target::Ip(IpAddr::V6(ip)) => {
            req.push(0x04);
            req.extend_from_slice(&ip.octets());
        }
        Target::Name(name) => {
            req.push(0x03);
            // parse_target guarantees 1..=255 bytes.
            req.push(name.len() as u8);
            req.extend_from_slice(name.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    req
}

/// Reads the SOCKS5 `CONNECT` reply: a refusal by its reply code, or success with the bound
/// address and port read and discarded (the stream is then at the first tunnelled byte).
async fn socks5_read_reply<S>(stream: &mut S) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = [0u8; 4];
    stream
        .read_exact(&mut head)
        .await
        .map_err(|e| eof_is_protocol(e, "before the SOCKS5 CONNECT reply"))?;
    if head[0] != SOCKS5_VER {
        return Err(HandshakeError::Protocol(format!(
            "bad SOCKS5 reply version {:#04x}",
            head[0]
        )));
    }
    let rep = head[1];
    if rep != 0x00 {
        return Err(socks5_refusal(rep));
    }
    // Bound address and port: read and discard.
    let addr_len = match head[3] {
        0x01 => 4,
        0x04 => 16,
        0x03 => {
            let mut len = [0u8; 1];
            stream
                .read_exact(&mut len)
                .await
                .map_err(|e| eof_is_protocol(e, "in the SOCKS5 CONNECT reply"))?;
            usize::from(len[0])
        }
        other => {
            return Err(HandshakeError::Protocol(format!(
                "unknown SOCKS5 address type {other:#04x} in the CONNECT reply"
            )))
        }
    };
    let mut rest = [0u8; 255 + 2];
    stream
        .read_exact(&mut rest[..addr_len + 2])
        .await
        .map_err(|e| eof_is_protocol(e, "in the SOCKS5 CONNECT reply"))?;
    Ok(())
}

/// The error for a SOCKS5 reply code other than success: a refusal for the RFC 1928 codes
/// 0x01..=0x08, a protocol error for any other.
fn socks5_refusal(rep: u8) -> HandshakeError {
    let what = match rep {
        0x01 => "general SOCKS server failure",
        0x02 => "connection not allowed by ruleset",
        0x03 => "network unreachable",
        0x04 => "host unreachable",
        0x05 => "connection refused",
        0x06 => "TTL expired",
        0x07 => "command not supported",
        0x08 => "address type not supported",
        _ => {
            return HandshakeError::Protocol(format!("unknown SOCKS5 reply code {rep:#04x}"));
        }
    };
    HandshakeError::Refused {
        status: None,
        reason: format!("SOCKS5 reply {rep:#04x}: {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, DuplexStream};

    fn creds() -> ProxyAuth {
        ProxyAuth {
            username: "acct-1234-country-us".into(),
            password: "s3cr3t:pw".into(),
        }
    }

    /// Asserts an error's Display and Debug never show the credentials.
    fn assert_no_secrets(e: &HandshakeError) {
        let a = creds();
        let b64 = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", a.username, a.password));
        for shown in [e.to_string(), format!("{e:?}")] {
            for secret in [
                a.username.as_str(),
                a.password.as_str(),
                "acct-1234",
                b64.as_str(),
            ] {
                assert!(!shown.contains(secret), "{shown} contains {secret}");
            }
        }
    }

    /// Reads an HTTP request head from the server side.
    async fn read_head(s: &mut DuplexStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.unwrap() == 0 {
                break;
            }
            got.push(b[0]);
        }
        got
    }

    /// Runs `http_connect` against a server that answers `response` after reading the
    /// request head (then hangs up if `close`, else keeps the connection open); returns the
    /// result and the request bytes the server saw.
    async fn http_case(
        host: &str,
        port: u16,
        auth: Option<&ProxyAuth>,
        response: &'static [u8],
        close: bool,
    ) -> (Result<Vec<u8>, HandshakeError>, Vec<u8>) {
        let (mut client, mut server) = duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            let head = read_head(&mut server).await;
            server.write_all(response).await.unwrap();
            (head, (!close).then_some(server))
        });
        let res = http_connect(&mut client, host, port, auth).await;
        let (head, _server) = srv.await.unwrap();
        (res, head)
    }

    #[tokio::test]
    async fn connect_200_and_exact_request_bytes() {
        let (res, head) = http_case(
            "example.com",
            443,
            None,
            b"HTTP/1.1 200 Connection established\r\n\r\n",
            false,
        )
        .await;
        res.unwrap();
        assert_eq!(
            head,
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
        );

        let auth = ProxyAuth {
            username: "user".into(),
            password: "pa:ss".into(),
        };
        let (res, head) = http_case(
            "example.com",
            8443,
            Some(&auth),
            b"HTTP/1.0 200 OK\r\nProxy-Agent: test\r\n\r\n",
            false,
        )
        .await;
        res.unwrap();
        // base64("user:pa:ss") = dXNlcjpwYTpzcw==
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "CONNECT example.com:8443 HTTP/1.1\r\nHost: example.com:8443\r\n\
             Proxy-Authorization: Basic dXNlcjpwYTpzcw==\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn connect_ip_literals() {
        for (host, want) in [
            ("2001:db8::1", "[2001:db8::1]:443"),
            ("[2001:db8::1]", "[2001:db8::1]:443"),
            ("192.0.2.7", "192.0.2.7:443"),
        ] {
            let (res, head) = http_case(host, 443, None, b"HTTP/1.1 200 OK\r\n\r\n", false).await;
            res.unwrap();
            assert_eq!(
                String::from_utf8(head).unwrap(),
                format!("CONNECT {want} HTTP/1.1\r\nHost: {want}\r\n\r\n")
            );
        }
    }

    #[tokio::test]
    async fn connect_response_split_across_reads_and_interim_1xx() {
        let (mut client, mut server) = duplex(1024);
        let srv = tokio::spawn(async move {
            read_head(&mut server).await;
            for part in [
                &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2"[..],
                b"00 Connection estab",
                b"lished\r\nX: y\r\n",
                b"\r\n",
            ] {
                server.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            server
        });
        http_connect(&mut client, "a.example", 443, None)
            .await
            .unwrap();
        drop(srv.await.unwrap());
    }

    #[tokio::test]
    async fn bytes_after_the_connect_answer_are_the_tunnels_first_bytes() {
        let (res, _) = http_case(
            "mail.example",
            25,
            None,
            b"HTTP/1.1 200 Connection established\r\n\r\n220 mail ESMTP\r\n",
            false,
        )
        .await;
        assert_eq!(res.unwrap(), b"220 mail ESMTP\r\n");
    }

    #[tokio::test]
    async fn connect_401_with_credentials_is_auth() {
        let auth = ProxyAuth {
            username: "u".into(),
            password: "p".into(),
        };
        let (mut client, mut server) = tokio::io::duplex(4096);
        let srv = tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = server.read(&mut buf).await;
            server
                .write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic\r\n\r\n")
                .await
                .unwrap();
        });
        let e = http_connect(&mut client, "example.com", 443, Some(&auth))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, HandshakeError::Auth(m) if m.contains("401")),
            "{e}"
        );
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn connect_407_is_auth() {
        let a = creds();
        let (res, _) = http_case(
            "example.com",
            443,
            Some(&a),
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\
              Content-Length: 5\r\n\r\nnope!",
            true,
        )
        .await;
        let e = res.unwrap_err();
        assert!(
            matches!(&e, HandshakeError::Auth(m) if m.contains("407")),
            "{e:?}"
        );
        assert_no_secrets(&e);

        let (res, _) = http_case(
            "example.com",
            443,
            None,
            b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
            true,
        )
        .await;
        let e = res.unwrap_err();
        assert!(
            matches!(&e, HandshakeError::Auth(m) if m.contains("none are configured")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn connect_other_statuses_are_refused() {
        let a = creds();
        let cases: [(&'static [u8], u16, &str); 4] = [
            (b"HTTP/1.1 403 Forbidden\r\n\r\n", 403, "Forbidden"),
            (
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad",
                502,
                "Bad Gateway",
            ),
            (b"HTTP/1.1 503 \r\n\r\n", 503, ""),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                101,
                "Switching Protocols",
            ),
        ];
        for (response, status, reason) in cases {
            let (res, _) = http_case("example.com", 443, Some(&a), response, true).await;
            match res.unwrap_err() {
                e @ HandshakeError::Refused { .. } => {
                    assert_no_secrets(&e);
                    let HandshakeError::Refused {
                        status: s,
                        reason: r,
                    } = &e
                    else {
                        unreachable!()
                    };
                    assert_eq!(*s, Some(status));
                    assert_eq!(r, reason);
                    assert!(e.to_string().contains(&status.to_string()), "{e}");
                }
                other => panic!("{status}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn connect_reason_phrase_is_truncated() {
        let mut response = b"HTTP/1.1 403 ".to_vec();
        response.extend(std::iter::repeat_n(b'r', 500));
        response.extend_from_slice(b"\r\n\r\n");
        let response: &'static [u8] = Box::leak(response.into_boxed_slice());
        let (res, _) = http_case("example.com", 443, None, response, true).await;
        match res.unwrap_err() {
            HandshakeError::Refused { status, reason } => {
                assert_eq!(status, Some(403));
                assert_eq!(reason.len(), 100);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn connect_protocol_errors() {
        let a = creds();
        let cases: [(&'static [u8], bool, &str); 4] = [
            (b"SSH-2.0-OpenSSH_9.6\r\n", false, "not HTTP"),
            (b"\x05\x00", true, "not HTTP"),
            (b"", true, "without answering"),
            (
                b"HTTP/1.1 200 OK\r\nX-Partial: y",
                true,
                "middle of the CONNECT response",
            ),
        ];
        for (response, close, want) in cases {
            let (res, _) = http_case("example.com", 443, Some(&a), response, close).await;
            let e = res.unwrap_err();
            match &e {
                HandshakeError::Protocol(m) => assert!(m.contains(want), "{m}"),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(response)),
            }
            assert_no_secrets(&e);
        }
    }

    #[tokio::test]
    async fn connect_head_too_large() {
        let (mut client, mut server) = duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            read_head(&mut server).await;
            let _ = server.write_all(b"HTTP/1.1 200 OK\r\n").await;
            let filler = format!("X-Filler: {}\r\n", "f".repeat(1000));
            for _ in 0..20 {
                if server.write_all(filler.as_bytes()).await.is_err() {
                    break;
                }
            }
            server
        });
        let e = http_connect(&mut client, "example.com", 443, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, HandshakeError::Protocol(m) if m.contains("16 KiB")),
            "{e:?}"
        );
        drop(client);
        drop(srv.await.unwrap());
    }

    #[tokio::test]
    async fn bad_target_hosts_are_invalid_input() {
        for host in [
            "",
            "evil.com\r\nX-Injected: 1",
            "a b",
            "a/b",
            "user@host",
            "[not-v6]",
            &"a".repeat(256),
        ] {
            let (mut client, _server) = duplex(1024);
            let e = http_connect(&mut client, host, 443, None)
                .await
                .unwrap_err();
            assert!(
                matches!(&e, HandshakeError::Io(io) if io.kind() == io::ErrorKind::InvalidInput),
                "{host:?}: {e:?}"
            );
            let e = socks5_connect(&mut client, host, 443, None)
                .await
                .unwrap_err();
            assert!(
                matches!(&e, HandshakeError::Io(io) if io.kind() == io::ErrorKind::InvalidInput),
                "{host:?}: {e:?}"
            );
        }
    }

    #[test]
    fn proxy_auth_header_and_debug() {
        let a = ProxyAuth {
            username: "Aladdin".into(),
            password: "open sesame".into(),
        };
        let h = a.basic_header();
        assert_eq!(h.to_str().unwrap(), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert!(h.is_sensitive());
        assert_eq!(format!("{a:?}"), "ProxyAuth(<redacted>)");
    }

    /// What a scripted SOCKS5 server saw.
    #[derive(Debug, Default)]
    struct Seen {
        methods: Vec<u8>,
        auth: Option<(Vec<u8>, Vec<u8>)>,
        request: Vec<u8>,
    }

    /// A scripted SOCKS5 server: answers method selection with `method`, RFC 1929 with
    /// `auth_status`, and the CONNECT with `reply` (raw bytes, then hangs up if `close`).
    async fn socks_server(
        mut s: DuplexStream,
        method: u8,
        auth_status: u8,
        reply: &'static [u8],
        close: bool,
    ) -> (Seen, Option<DuplexStream>) {
        let mut seen = Seen::default();
        let mut hdr = [0u8; 2];
        s.read_exact(&mut hdr).await.unwrap();
        assert_eq!(hdr[0], 5);
        seen.methods = vec![0; usize::from(hdr[1])];
        s.read_exact(&mut seen.methods).await.unwrap();
        s.write_all(&[5, method]).await.unwrap();
        if method == 0xFF {
            return (seen, None);
        }
        if method == 2 {
            let mut v = [0u8; 2];
            s.read_exact(&mut v).await.unwrap();
            assert_eq!(v[0], 1);
            let mut user = vec![0; usize::from(v[1])];
            s.read_exact(&mut user).await.unwrap();
            let mut plen = [0u8; 1];
            s.read_exact(&mut plen).await.unwrap();
            let mut pass = vec![0; usize::from(plen[0])];
            s.read_exact(&mut pass).await.unwrap();
            seen.auth = Some((user, pass));
            s.write_all(&[1, auth_status]).await.unwrap();
            if auth_status != 0 {
                return (seen, None);
            }
        }
        let mut req = [0u8; 4];
        s.read_exact(&mut req).await.unwrap();
        seen.request.extend_from_slice(&req);
        let addr_len = match req[3] {
            1 => 4,
            4 => 16,
            3 => {
                let mut l = [0u8; 1];
                s.read_exact(&mut l).await.unwrap();
                seen.request.push(l[0]);
                usize::from(l[0])
            }
            other => panic!("atyp {other}"),
        };
        let mut rest = vec![0u8; addr_len + 2];
        s.read_exact(&mut rest).await.unwrap();
        seen.request.extend_from_slice(&rest);
        s.write_all(reply).await.unwrap();
        (seen, (!close).then_some(s))
    }

    const OK_V4: &[u8] = &[5, 0, 0, 1, 10, 0, 0, 1, 0x1F, 0x90];

    async fn socks_case(
        host: &str,
        port: u16,
        auth: Option<&ProxyAuth>,
        method: u8,
        auth_status: u8,
        reply: &'static [u8],
        close: bool,
    ) -> (
        Result<(), HandshakeError>,
        Seen,
        DuplexStream,
        Option<DuplexStream>,
    ) {
        let (mut client, server) = duplex(4096);
        let srv = tokio::spawn(socks_server(server, method, auth_status, reply, close));
        let res = socks5_connect(&mut client, host, port, auth).await;
        let (seen, server) = srv.await.unwrap();
        (res, seen, client, server)
    }

    #[tokio::test]
    async fn socks5_no_auth_domain_name() {
        let (res, seen, mut client, server) =
            socks_case("example.com", 443, None, 0, 0, OK_V4, false).await;
        res.unwrap();
        assert_eq!(seen.methods, vec![0]);
        assert_eq!(seen.auth, None);
        let mut want = vec![5, 1, 0, 3, 11];
        want.extend_from_slice(b"example.com");
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(seen.request, want);
        // The tunnel carries bytes both ways right after the reply.
        let mut server = server.unwrap();
        server.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        client.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
    }

    #[tokio::test]
    async fn socks5_user_pass_success() {
        let a = creds();
        let (res, seen, _client, _server) =
            socks_case("example.com", 80, Some(&a), 2, 0, OK_V4, false).await;
        res.unwrap();
        assert_eq!(seen.methods, vec![2]);
        assert_eq!(
            seen.auth,
            Some((
                a.username.clone().into_bytes(),
                a.password.clone().into_bytes()
            ))
        );
    }

    #[tokio::test]
    async fn socks5_literals_and_every_bound_address_type() {
        let replies: [&'static [u8]; 3] = [
            OK_V4,
            &[
                5, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 80,
            ],
            &[5, 0, 0, 3, 4, b'n', b'o', b'd', b'e', 0, 80],
        ];
        for reply in replies {
            // IPv6 literal target, bare and bracketed.
            for host in ["2001:db8::1", "[2001:db8::1]"] {
                let (res, seen, mut client, server) =
                    socks_case(host, 443, None, 0, 0, reply, false).await;
                res.unwrap();
                let mut want = vec![5, 1, 0, 4];
                want.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
                want.extend_from_slice(&443u16.to_be_bytes());
                assert_eq!(seen.request, want);
                // Nothing of the reply is left unread.
                let mut server = server.unwrap();
                server.write_all(b"!").await.unwrap();
                let mut b = [0u8; 1];
                client.read_exact(&mut b).await.unwrap();
                assert_eq!(&b, b"!");
            }
        }
        let (res, seen, _c, _s) = socks_case("192.0.2.9", 8080, None, 0, 0, OK_V4, false).await;
        res.unwrap();
        assert_eq!(seen.request, vec![5, 1, 0, 1, 192, 0, 2, 9, 0x1F, 0x90]);
    }

    #[tokio::test]
    async fn socks5_auth_failures() {
        let a = creds();
        let (res, _, _, _) = socks_case("example.com", 443, Some(&a), 2, 1, OK_V4, true).await;
        let e = res.unwrap_err();
        assert!(
            matches!(&e, HandshakeError::Auth(m) if m.contains("rejected")),
            "{e:?}"
        );
        assert_no_secrets(&e);

        let (res, seen, _, _) =
            socks_case("example.com", 443, Some(&a), 0xFF, 0, OK_V4, true).await;
        assert_eq!(seen.methods, vec![2]);
        let e = res.unwrap_err();
        assert!(matches!(&e, HandshakeError::Auth(_)), "{e:?}");
        assert_no_secrets(&e);

        let (res, _, _, _) = socks_case("example.com", 443, None, 0xFF, 0, OK_V4, true).await;
        let e = res.unwrap_err();
        assert!(
            matches!(&e, HandshakeError::Auth(m) if m.contains("no credentials")),
            "{e:?}"
        );

        let long = ProxyAuth {
            username: "u".repeat(256),
            password: "p".into(),
        };
        let (mut client, _server) = duplex(1024);
        let e = socks5_connect(&mut client, "example.com", 443, Some(&long))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, HandshakeError::Auth(m) if m.contains("255")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn socks5_reply_codes_are_refused() {
        let a = creds();
        for (code, what) in [
            (1u8, "general"),
            (2, "ruleset"),
            (3, "network unreachable"),
            (4, "host unreachable"),
            (5, "connection refused"),
            (6, "TTL"),
            (7, "command"),
            (8, "address type"),
        ] {
            let reply: &'static [u8] =
                Box::leak(vec![5, code, 0, 1, 0, 0, 0, 0, 0, 0].into_boxed_slice());
            let (res, _, _, _) = socks_case("example.com", 443, Some(&a), 2, 0, reply, true).await;
            let e = res.unwrap_err();
            match &e {
                HandshakeError::Refused { status, reason } => {
                    assert_eq!(*status, None);
                    assert!(reason.contains(what), "{reason}");
                }
                other => panic!("{code}: {other:?}"),
            }
            assert_no_secrets(&e);
        }
    }

    #[tokio::test]
    async fn socks5_protocol_errors() {
        let cases: [(&'static [u8], &str); 6] = [
            (
                &[5, 0, 0, 1, 1, 2],
                "closed the connection in the SOCKS5 CONNECT reply",
            ),
            (
                &[5, 0],
                "closed the connection before the SOCKS5 CONNECT reply",
            ),
            (&[], "closed the connection before the SOCKS5 CONNECT reply"),
            (&[4, 0, 0, 1, 0, 0, 0, 0, 0, 0], "reply version"),
            (&[5, 9, 0, 1, 0, 0, 0, 0, 0, 0], "unknown SOCKS5 reply code"),
            (
                &[5, 0, 0, 7, 0, 0, 0, 0, 0, 0],
                "unknown SOCKS5 address type",
            ),
        ];
        for (reply, want) in cases {
            let (res, _, _, _) = socks_case("example.com", 443, None, 0, 0, reply, true).await;
            match res.unwrap_err() {
                HandshakeError::Protocol(m) => assert!(m.contains(want), "{m}"),
                other => panic!("{reply:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn socks5_greeting_protocol_errors() {
        // Not SOCKS at all, an unoffered method, and a hang-up before answering.
        for (answer, want) in [
            (
                &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
                "not a SOCKS5 server",
            ),
            (&[5, 2][..], "not offered"),
            (
                &[][..],
                "closed the connection during SOCKS5 method selection",
            ),
        ] {
            let (mut client, mut server) = duplex(1024);
            let srv = tokio::spawn(async move {
                let mut greet = [0u8; 3];
                server.read_exact(&mut greet).await.unwrap();
                assert_eq!(greet, [5, 1, 0]);
                server.write_all(answer).await.unwrap();
            });
            let e = socks5_connect(&mut client, "example.com", 443, None)
                .await
                .unwrap_err();
            srv.await.unwrap();
            assert!(
                matches!(&e, HandshakeError::Protocol(m) if m.contains(want)),
                "{e:?}"
            );
        }
    }

    #[tokio::test]
    async fn works_over_a_real_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut b = [0u8; 1];
            while !buf.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).await.unwrap();
                buf.push(b[0]);
            }
            s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .unwrap();
            let mut echo = [0u8; 5];
            s.read_exact(&mut echo).await.unwrap();
            s.write_all(&echo).await.unwrap();
        });
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        http_connect(&mut stream, "example.com", 443, Some(&creds()))
            .await
            .unwrap();
        stream.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        srv.await.unwrap();
    }
}
