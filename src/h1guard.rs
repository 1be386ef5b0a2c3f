//! h1guard: strict HTTP/1 request framing on every worker connection, in front of hyper.
//!
//! A proxy that parses a request differently from the next hop is a request-smuggling hole.
//! edgepool re-frames every request it forwards, but it still refuses ambiguous input outright,
//! so a worker (or whatever feeds it) learns at once and nothing ambiguous is ever acted on.
//!
//! [`RequestFramer`] follows the request side of one connection byte by byte: it holds a request
//! head back until the whole head has arrived and passed [`check_head`], then lets it through
//! with the body that its framing announces (`Content-Length` bytes, or chunks it checks as they
//! pass), then the next head. A `CONNECT` head, a bodiless upgrade head (`Upgrade` named by
//! `Connection`: a WebSocket handshake; ingress closes the connection after any answer but
//! `101`) or the HTTP/2 preface switches it to pass-through.
//! [`GuardedIo`] wraps the worker's stream with a framer and the worker-side timeouts.
//!
//! What a violating head becomes: the bytes before it reach hyper as usual, the head itself
//! never does. In its place hyper reads a short internal request carrying
//! [`VIOLATION_MARKER`] (a header no worker can send: a worker head naming it is itself a
//! violation), which ingress answers with the violation's status and `X-Edgepool-Error` and
//! `Connection: close`. So the error is ordered after the answers to earlier pipelined
//! requests, and the connection ends. A violation inside a chunked body surfaces to hyper as a
//! read error: the request is not complete, so nothing of it is forwarded.
use crate::error::ErrorKind;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

// One clock with the rest of the runtime (tokio's), so the head and body clocks are testable
// under paused time and agree with the connection clocks in ingress.
use tokio::time::Instant;

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Header of the internal request that stands in for a violating head (see the module doc).
pub const VIOLATION_MARKER: &str = "x-edgepool-violation";

/// What hyper reads in place of a violating head.
const MARKER_REQUEST: &[u8] =
    b"GET /.edgepool/violation HTTP/1.1\r\nhost: edgepool.invalid\r\nx-edgepool-violation: 1\r\n\r\n";

/// Empty lines tolerated before a request line (RFC 9112 §2.2: robustness after a body).
const MAX_LEADING_EMPTY_LINES: usize = 4;
/// Bytes read from the worker at a time.
const READ_CHUNK: usize = 8 * 1024;
/// Longest chunk-size line (size, extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// Size limits on request heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Max bytes of a head (request line, header lines, final empty line); 431 beyond. Also
    /// bounds a chunked body's trailer section.
    pub max_head_bytes: usize,
    /// Max header fields; 431 beyond.
    pub max_headers: usize,
    /// Max bytes of the request target; 414 beyond.
    pub max_uri_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: crate::config::DEFAULT_MAX_HEADER_BYTES,
            max_headers: crate::config::DEFAULT_MAX_HEADERS,
            max_uri_bytes: crate::config::DEFAULT_MAX_URI_BYTES,
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// What the worker is told (its status is 400, 408, 414 or 431): `bad_framing`,
    /// `bad_request_head`, `bad_host_header`, `request_header_too_large`, `uri_too_long`,
    /// `request_header_timeout`, `request_body_timeout`.
    pub kind: ErrorKind,
    /// What was wrong, for the worker's developer.
    pub detail: String,
    /// Found in a head (answerable in order) rather than inside a body.
    pub in_head: bool,
}

fn head_err(kind: ErrorKind, detail: impl Into<String>) -> Violation {
    Violation {
        kind,
        detail: detail.into(),
        in_head: true,
    }
}

fn syntax(detail: impl Into<String>) -> Violation {
    head_err(ErrorKind::BadRequestHead, detail)
}

fn framing(detail: impl Into<String>) -> Violation {
    head_err(ErrorKind::BadFraming, detail)
}

fn body_err(detail: impl Into<String>) -> Violation {
    Violation {
        kind: ErrorKind::BadFraming,
        detail: detail.into(),
        in_head: false,
    }
}

/// How the bytes after a valid head are framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body: the next byte starts the next request.
    Empty,
    /// `Content-Length` bytes of body.
    Length(u64),
    /// A chunked body.
    Chunked,
    /// Not HTTP/1 from here on: a `CONNECT` tunnel, a bodiless upgrade request (`Upgrade`
    /// named by `Connection`) or HTTP/2 (prior-knowledge preface).
    Passthrough,
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A field-value byte: VCHAR, SP, HTAB or obs-text; no other control bytes.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn show(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(60)]);
    format!("{s:?}")
}

/// One header line `name: value`: returns (name, trimmed value). Shared by heads and trailers.
fn field_line(line: &[u8]) -> Result<(&[u8], &[u8]), String> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err("a header line starts with whitespace (obs-fold line folding)".into());
    }
    let Some(colon) = line.iter().position(|b| *b == b':') else {
        return Err(format!("header line without a colon: {}", show(line)));
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() {
        return Err("empty header name".into());
    }
    if let Some(b) = name.iter().find(|b| !is_tchar(**b)) {
        return Err(if *b == b' ' || *b == b'\t' {
            format!(
                "whitespace between the header name and the colon: {}",
                show(name)
            )
        } else {
            format!(
                "byte 0x{b:02x} is not allowed in a header name: {}",
                show(name)
            )
        });
    }
    if let Some(b) = value.iter().find(|b| !is_field_byte(**b)) {
        return Err(format!(
            "control byte 0x{b:02x} in the value of {}",
            show(name)
        ));
    }
    Ok((name, trim_ows(value)))
}

/// Checks one complete request head (request line, header lines, the final empty line, all
/// ending in CRLF — [`RequestFramer`] guarantees no bare CR or LF) and returns how the body is
/// framed.
pub fn check_head(head: &[u8], limits: &Limits) -> Result<Framing, Violation> {
    let body = head
        .strip_suffix(b"\r\n\r\n")
        .ok_or_else(|| syntax("the head does not end with an empty line"))?;
    let mut lines = body
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let RequestLine {
        method,
        target,
        version,
    } = check_request_line(request_line, limits)?;
    let http10 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        b"HTTP/2.0" if method == b"PRI" && target == b"*" && body == b"PRI * HTTP/2.0" => {
            return Ok(Framing::Passthrough); // the HTTP/2 connection preface
        }
        other => {
            return Err(syntax(format!(
                "unsupported HTTP version {} (HTTP/1.1 or HTTP/1.0)",
                show(other)
            )))
        }
    };
    let fields = HeadFields::read(lines, limits)?;
    fields.check(http10)?;
    Ok(fields.framing(method))
}

/// A request line's three parts.
struct RequestLine<'a> {
    method: &'a [u8],
    target: &'a [u8],
    version: &'a [u8],
}

/// Splits the request line into method, target and version and checks the first two (a
/// token; a target within `limits.max_uri_bytes` of visible ASCII). The version is the
/// caller's.
fn check_request_line<'a>(
    request_line: &'a [u8],
    limits: &Limits,
) -> Result<RequestLine<'a>, Violation> {
    let parts: Vec<&[u8]> = request_line.split(|b| *b == b' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(syntax(format!(
            "the request line must be METHOD SP TARGET SP VERSION with single spaces: {}",
            show(request_line)
        )));
    };
    if method.is_empty() || !method.iter().all(|b| is_tchar(*b)) {
        return Err(syntax(format!("bad method {}", show(method))));
    }
    if target.len() > limits.max_uri_bytes {
        return Err(head_err(
            ErrorKind::UriTooLong,
            format!(
                "the request target is {} bytes; limits.max_uri_bytes is {}",
                target.len(),
                limits.max_uri_bytes
            ),
        ));
    }
    if target.is_empty() {
        return Err(syntax("empty request target"));
    }
    if let Some(b) = target.iter().find(|b| !(0x21..0x7f).contains(*b)) {
        return Err(syntax(format!(
            "byte 0x{b:02x} in the request target (percent-encode it)"
        )));
    }
    Ok(RequestLine {
        method,
        target,
        version,
    })
}

/// What a head's header fields say about its host and framing.
struct HeadFields<'a> {
    /// `Host` fields seen.
    hosts: usize,
    /// The `Content-Length` (all such fields agree).
    content_length: Option<u64>,
    /// Each `Transfer-Encoding` field's value.
    transfer_encoding: Vec<&'a [u8]>,
    /// An `Upgrade` field is present. With `connection_upgrade`, an upgrade: after a 101 the
    /// bytes are not HTTP/1.
    upgrade: bool,
    /// `Connection` names `upgrade`.
    connection_upgrade: bool,
}

impl<'a> HeadFields<'a> {
    /// Reads the header lines: each a valid field line, at most `limits.max_headers`, a
    /// well-formed and consistent `Content-Length`, no [`VIOLATION_MARKER`].
    fn read(
        lines: impl Iterator<Item = &'a [u8]>,
        limits: &Limits,
    ) -> Result<HeadFields<'a>, Violation> {
        let mut fields = 0usize;
        let mut seen = HeadFields {
            hosts: 0,
            content_length: None,
            transfer_encoding: Vec::new(),
            upgrade: false,
            connection_upgrade: false,
        };
        for line in lines {
            fields += 1;
            if fields > limits.max_headers {
                return Err(head_err(
                    ErrorKind::RequestHeaderTooLarge,
                    format!(
                        "more than limits.max_headers ({}) header fields",
                        limits.max_headers
                    ),
                ));
            }
            let (name, value) = field_line(line).map_err(syntax)?;
            if name.eq_ignore_ascii_case(b"content-length") {
                if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
                    return Err(framing(format!("malformed Content-Length {}", show(value))));
                }
                let n: u64 = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| framing("malformed Content-Length"))?;
                if seen.content_length.is_some_and(|m| m != n) {
                    return Err(framing("two Content-Length headers with different values"));
                }
                seen.content_length = Some(n);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                seen.transfer_encoding.push(value);
            } else if name.eq_ignore_ascii_case(b"host") {
                seen.hosts += 1;
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                seen.upgrade = true;
            } else if name.eq_ignore_ascii_case(b"connection") {
                seen.connection_upgrade |= value
                    .split(|b| *b == b',')
                    .any(|t| trim_ows(t).eq_ignore_ascii_case(b"upgrade"));
            } else if name.eq_ignore_ascii_case(VIOLATION_MARKER.as_bytes()) {
                return Err(syntax(format!("{VIOLATION_MARKER} is reserved")));
            }
        }
        Ok(seen)
    }

    /// Checks the fields together: exactly one `Host` (none allowed in HTTP/1.0), and a
    /// `Transfer-Encoding` only as a lone `chunked` in HTTP/1.1 without `Content-Length`.
    fn check(&self, http10: bool) -> Result<(), Violation> {
        if self.hosts > 1 {
            return Err(head_err(
                ErrorKind::BadHostHeader,
                "more than one Host header",
            ));
        }
        if self.hosts == 0 && !http10 {
            return Err(head_err(
                ErrorKind::BadHostHeader,
                "an HTTP/1.1 request needs a Host header",
            ));
        }
        let transfer_encoding = &self.transfer_encoding;
        if !transfer_encoding.is_empty() {
            if http10 {
                return Err(framing("Transfer-Encoding in an HTTP/1.0 request"));
            }
            if self.content_length.is_some() {
                return Err(framing(
                    "both Content-Length and Transfer-Encoding: the body's end is ambiguous",
                ));
            }
            if transfer_encoding.len() > 1 || !transfer_encoding[0].eq_ignore_ascii_case(b"chunked")
            {
                return Err(framing(format!(
                    "Transfer-Encoding must be exactly \"chunked\", got {}",
                    transfer_encoding
                        .iter()
                        .map(|v| show(v))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        Ok(())
    }

    /// How the body after a checked head with `method` is framed.
    fn framing(&self, method: &[u8]) -> Framing {
        if method == b"CONNECT" {
            Framing::Passthrough
        } else if self.upgrade
            && self.connection_upgrade
            && self.transfer_encoding.is_empty()
            && self.content_length.unwrap_or(0) == 0
        {
            // A bodiless upgrade request (a WebSocket handshake): whatever follows it is the new
            // protocol's if the answer is 101. Ingress closes the connection after any other
            // answer, so no request after it is ever parsed without this framer.
            Framing::Passthrough
        } else if !self.transfer_encoding.is_empty() {
            Framing::Chunked
        } else {
            match self.content_length {
                Some(n) if n > 0 => Framing::Length(n),
                _ => Framing::Empty,
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SizePhase {
    Digits,
    Space,
    Ext,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Collecting a head in `buf`.
    Head,
    /// Bytes of a `Content-Length` body left.
    Body(u64),
    /// In a chunk-size line.
    ChunkSize {
        value: u64,
        digits: u8,
        phase: SizePhase,
        len: usize,
    },
    /// CR of the chunk-size line seen.
    ChunkSizeLf { value: u64 },
    /// Bytes of chunk data left.
    ChunkData(u64),
    /// Expecting the CR after chunk data.
    ChunkDataCr,
    /// Expecting the LF after chunk data.
    ChunkDataLf,
    /// Collecting trailer lines in `buf` (after the last chunk).
    Trailer,
    /// Not HTTP/1 any more.
    Passthrough,
    /// A violation was reported; nothing more passes.
    Failed,
}

/// Passes up to `left` body bytes of `input` to `out`: (bytes used, bytes still to come).
fn pass_bulk(left: u64, input: &[u8], out: &mut BytesMut) -> (usize, u64) {
    let n = left.min(input.len() as u64) as usize;
    out.extend_from_slice(&input[..n]);
    (n, left - n as u64)
}

/// Follows the request side of one HTTP/1 connection (see the module doc).
#[derive(Debug)]
pub struct RequestFramer {
    limits: Limits,
    state: State,
    /// The head (or trailer section) being collected, held back until complete.
    buf: Vec<u8>,
    /// Where the current line starts in `buf`.
    line_start: usize,
    /// Trailer fields seen so far.
    trailer_fields: usize,
    leading_empty: usize,
    heads: u64,
}

impl RequestFramer {
    /// A framer at the start of a connection.
    pub fn new(limits: Limits) -> Self {
        RequestFramer {
            limits,
            state: State::Head,
            buf: Vec::new(),
            line_start: 0,
            trailer_fields: 0,
            leading_empty: 0,
            heads: 0,
        }
    }

    /// Requests whose head passed so far.
    pub fn heads(&self) -> u64 {
        self.heads
    }

    /// Between requests or in a head: the header-read timeout applies.
    pub fn in_head(&self) -> bool {
        self.state == State::Head
    }

    /// Part of a head has arrived (and is held back).
    pub fn head_started(&self) -> bool {
        self.state == State::Head && !self.buf.is_empty()
    }

    /// Inside a request body (`Content-Length`, chunks or trailers).
    pub fn in_body(&self) -> bool {
        !matches!(self.state, State::Head | State::Passthrough | State::Failed)
    }

    /// Not HTTP/1 any more (CONNECT tunnel or HTTP/2).
    pub fn is_passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// Takes bytes that arrived from the worker and appends those that may reach the HTTP
    /// parser to `out`. On a violation, `out` holds everything before the violating request
    /// (head violations) or before the bad byte (body violations), and the framer passes
    /// nothing more.
    pub fn feed(&mut self, mut input: &[u8], out: &mut BytesMut) -> Result<(), Violation> {
        while !input.is_empty() {
            let used = match self.state {
                State::Failed => return Ok(()),
                State::Passthrough => {
                    out.extend_from_slice(input);
                    input.len()
                }
                State::Body(left) => {
                    let (n, rest) = pass_bulk(left, input, out);
                    self.state = if rest == 0 {
                        State::Head
                    } else {
                        State::Body(rest)
                    };
                    n
                }
                State::ChunkData(left) => {
                    let (n, rest) = pass_bulk(left, input, out);
                    self.state = if rest == 0 {
                        State::ChunkDataCr
                    } else {
                        State::ChunkData(rest)
                    };
                    n
                }
                State::Head | State::Trailer => match self.collect(input, out) {
                    Ok(n) => n,
                    Err(v) => {
                        self.state = State::Failed;
                        return Err(v);
                    }
                },
                _ => {
                    let b = input[0];
                    if let Err(v) = self.chunk_byte(b) {
                        self.state = State::Failed;
                        return Err(v);
                    }
                    out.extend_from_slice(&input[..1]);
                    1
                }
            };
            input = &input[used..];
        }
        Ok(())
    }

    /// One byte of chunk framing (size line or the CRLF after data).
    fn chunk_byte(&mut self, b: u8) -> Result<(), Violation> {
        self.state = match self.state {
            State::ChunkSize {
                value,
                digits,
                phase,
                len,
            } => {
                if len >= MAX_CHUNK_LINE {
                    return Err(body_err("chunk-size line too long"));
                }
                let len = len + 1;
                let hex = (b as char).to_digit(16);
                match (phase, b) {
                    (SizePhase::Digits, _) if hex.is_some() => {
                        if digits >= 16 {
                            return Err(body_err("chunk size has more than 16 hex digits"));
                        }
                        State::ChunkSize {
                            value: (value << 4) | u64::from(hex.unwrap_or(0)),
                            digits: digits + 1,
                            phase,
                            len,
                        }
                    }
                    (_, b'\r') if digits > 0 => State::ChunkSizeLf { value },
                    (SizePhase::Digits | SizePhase::Space, b' ' | b'\t') if digits > 0 => {
                        State::ChunkSize {
                            value,
                            digits,
                            phase: SizePhase::Space,
                            len,
                        }
                    }
                    (SizePhase::Digits | SizePhase::Space, b';') if digits > 0 => {
                        State::ChunkSize {
                            value,
                            digits,
                            phase: SizePhase::Ext,
                            len,
                        }
                    }
                    (SizePhase::Ext, _) if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 => {
                        State::ChunkSize {
                            value,
                            digits,
                            phase,
                            len,
                        }
                    }
                    _ => {
                        return Err(body_err(format!(
                            "byte 0x{b:02x} is not allowed in a chunk-size line"
                        )))
                    }
                }
            }
            State::ChunkSizeLf { value } => {
                if b != b'\n' {
                    return Err(body_err("chunk-size line not ended by CRLF"));
                }
                if value == 0 {
                    self.buf.clear();
                    self.line_start = 0;
                    self.trailer_fields = 0;
                    State::Trailer
                } else {
                    State::ChunkData(value)
                }
            }
            State::ChunkDataCr if b == b'\r' => State::ChunkDataLf,
            State::ChunkDataLf if b == b'\n' => State::ChunkSize {
                value: 0,
                digits: 0,
                phase: SizePhase::Digits,
                len: 0,
            },
            State::ChunkDataCr | State::ChunkDataLf => {
                return Err(body_err("chunk data not followed by CRLF"))
            }
            other => other,
        };
        Ok(())
    }

    /// Collects head (or trailer) bytes up to the end of the section; returns how many input
    /// bytes it used.
    fn collect(&mut self, input: &[u8], out: &mut BytesMut) -> Result<usize, Violation> {
        let trailer = self.state == State::Trailer;
        let err = |detail: String| {
            if trailer {
                body_err(format!("trailer section: {detail}"))
            } else {
                syntax(detail)
            }
        };
        let too_large = |line_start: usize| {
            if trailer {
                return body_err("trailer section larger than limits.max_header_bytes");
            }
            if line_start == 0 {
                head_err(
                    ErrorKind::UriTooLong,
                    format!(
                        "the request line is over {} bytes; limits.max_uri_bytes is {}",
                        self.limits.max_head_bytes, self.limits.max_uri_bytes
                    ),
                )
            } else {
                head_err(
                    ErrorKind::RequestHeaderTooLarge,
                    format!(
                        "the request head is over limits.max_header_bytes ({})",
                        self.limits.max_head_bytes
                    ),
                )
            }
        };
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            if b != b'\r' && b != b'\n' {
                // A run of ordinary bytes, up to the next CR or LF, copied at once (the
                // per-byte checks below only concern line endings).
                if self.buf.last() == Some(&b'\r') {
                    return Err(err("bare CR (not followed by LF)".into()));
                }
                let end = memchr::memchr2(b'\r', b'\n', &input[i..]).map_or(input.len(), |p| i + p);
                if self.buf.len() + (end - i) > self.limits.max_head_bytes {
                    return Err(too_large(self.line_start));
                }
                self.buf.extend_from_slice(&input[i..end]);
                i = end;
                continue;
            }
            let prev = self.buf.last().copied();
            if prev == Some(b'\r') && b != b'\n' {
                return Err(err("bare CR (not followed by LF)".into()));
            }
            if b == b'\n' && prev != Some(b'\r') {
                return Err(err("bare LF line ending (lines end in CRLF)".into()));
            }
            self.buf.push(b);
            i += 1;
            if self.buf.len() > self.limits.max_head_bytes {
                return Err(too_large(self.line_start));
            }
            if b != b'\n' {
                continue;
            }
            let line_len = self.buf.len() - self.line_start - 2;
            if line_len > 0 {
                if trailer {
                    let line = &self.buf[self.line_start..self.buf.len() - 2];
                    field_line(line).map_err(&err)?;
                    self.trailer_fields += 1;
                    if self.trailer_fields > self.limits.max_headers {
                        return Err(body_err("more trailer fields than limits.max_headers"));
                    }
                }
                self.line_start = self.buf.len();
                continue;
            }
            // An empty line.
            if self.line_start == 0 && !trailer {
                // Before the request line: tolerated a few times.
                self.leading_empty += 1;
                if self.leading_empty > MAX_LEADING_EMPTY_LINES {
                    return Err(syntax("too many empty lines before the request line"));
                }
                self.buf.clear();
                continue;
            }
            // The end of the section.
            if trailer {
                out.extend_from_slice(&self.buf);
                self.state = State::Head;
            } else {
                let framing = check_head(&self.buf, &self.limits)?;
                out.extend_from_slice(&self.buf);
                self.heads += 1;
                self.state = match framing {
                    Framing::Empty => State::Head,
                    Framing::Length(n) => State::Body(n),
                    Framing::Chunked => State::ChunkSize {
                        value: 0,
                        digits: 0,
                        phase: SizePhase::Digits,
                        len: 0,
                    },
                    Framing::Passthrough => State::Passthrough,
                };
            }
            self.buf.clear();
            self.line_start = 0;
            self.leading_empty = 0;
            return Ok(i);
        }
        Ok(input.len())
    }
}

/// Where a connection's violation waits for ingress to answer the marker request.
pub type ViolationSlot = Arc<Mutex<Option<Violation>>>;

/// Worker-side timeouts enforced by [`GuardedIo`].
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// A head must be complete this long after its first byte (or after the connection
    /// opened, for the first request).
    pub header_read: Duration,
    /// Longest pause inside a body.
    pub body_idle: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    /// Reading normally.
    Open,
    /// The marker request was handed over: nothing more is read (hyper answers and closes).
    Marked,
    /// A body violation: the next read fails with this kind.
    Fail(io::ErrorKind),
    /// End of input for hyper.
    Eof,
}

/// A worker stream seen through a [`RequestFramer`], with the header-read and body-idle
/// timeouts. Writes pass straight through.
pub struct GuardedIo<T> {
    inner: T,
    framer: RequestFramer,
    ready: BytesMut,
    after: After,
    timeouts: Timeouts,
    opened: Instant,
    head_started: Option<Instant>,
    last_body_byte: Instant,
    sleep: Pin<Box<tokio::time::Sleep>>,
    slot: ViolationSlot,
    fail_detail: String,
    /// The connection's span: the parent of the line a refusal logs (the framer runs outside
    /// any request).
    span: tracing::Span,
}

impl<T> GuardedIo<T> {
    /// Wraps `inner`; violations are left in `slot` for ingress and logged under `span`.
    pub fn new(
        inner: T,
        limits: Limits,
        timeouts: Timeouts,
        slot: ViolationSlot,
        span: tracing::Span,
    ) -> Self {
        let now = Instant::now();
        GuardedIo {
            inner,
            framer: RequestFramer::new(limits),
            ready: BytesMut::new(),
            after: After::Open,
            timeouts,
            opened: now,
            head_started: None,
            last_body_byte: now,
            sleep: Box::pin(tokio::time::sleep_until(now)),
            slot,
            fail_detail: String::new(),
            span,
        }
    }

    fn violate(&mut self, v: Violation) {
        tracing::debug!(
            parent: &self.span,
            token = v.kind.token(),
            "worker request refused: {}",
            v.detail
        );
        if v.in_head {
            self.ready.extend_from_slice(MARKER_REQUEST);
            self.after = After::Marked;
        } else {
            self.after = After::Fail(if v.kind.status() == http::StatusCode::REQUEST_TIMEOUT {
                io::ErrorKind::TimedOut
            } else {
                io::ErrorKind::InvalidData
            });
            self.fail_detail = v.detail.clone();
        }
        *self.slot.lock() = Some(v);
    }

    /// When the current wait turns into a timeout, if it can.
    fn deadline(&self) -> Option<Instant> {
        if self.framer.in_body() {
            Some(self.last_body_byte + self.timeouts.body_idle)
        } else if self.framer.in_head() && self.framer.heads() == 0 {
            // The first request: counted from the connection's start.
            Some(self.opened + self.timeouts.header_read)
        } else {
            self.head_started.map(|t| t + self.timeouts.header_read)
        }
    }

    fn timed_out(&mut self) {
        if self.framer.in_body() {
            self.violate(Violation {
                kind: ErrorKind::RequestBodyTimeout,
                detail: format!(
                    "no request body bytes for limits.body_idle_timeout ({:?})",
                    self.timeouts.body_idle
                ),
                in_head: false,
            });
        } else if self.head_started.is_some() {
            self.violate(head_err(
                ErrorKind::RequestHeaderTimeout,
                format!(
                    "the request head was not complete within limits.header_read_timeout ({:?})",
                    self.timeouts.header_read
                ),
            ));
        } else {
            // A connection that never sent a byte: nothing to answer.
            self.after = After::Eof;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = buf.remaining().min(this.ready.len());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            match this.after {
                After::Open => {}
                After::Marked => return Poll::Pending, // hyper answers the marker and closes
                After::Fail(kind) => {
                    return Poll::Ready(Err(io::Error::new(kind, this.fail_detail.clone())))
                }
                After::Eof => return Poll::Ready(Ok(())),
            }
            if this.framer.is_passthrough() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // On the stack, not per connection: idle worker connections cost no read buffer.
            // Left uninitialized: zeroing 8 KiB on every poll (most of them Pending) was the
            // largest single cost of a proxied request (memset, ~40k instructions each).
            let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let filled = rb.filled();
                    let n = filled.len();
                    if n == 0 {
                        return Poll::Ready(Ok(())); // the worker closed; a partial head is dropped
                    }
                    let now = Instant::now();
                    let was_body = this.framer.in_body();
                    let heads_before = this.framer.heads();
                    let result = this.framer.feed(filled, &mut this.ready);
                    if this.framer.heads() != heads_before {
                        // A head completed: a head started in the same read gets its own clock.
                        this.head_started = None;
                    }
                    if was_body || this.framer.in_body() {
                        this.last_body_byte = now;
                    }
                    if this.framer.head_started() {
                        this.head_started.get_or_insert(now);
                    } else {
                        this.head_started = None;
                    }
                    if let Err(v) = result {
                        this.violate(v);
                    }
                }
                Poll::Pending => {
                    let Some(deadline) = this.deadline() else {
                        return Poll::Pending;
                    };
                    if this.sleep.deadline() != deadline {
                        this.sleep.as_mut().reset(deadline);
                    }
                    if this.sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.timed_out();
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> (Vec<u8>, Result<(), Violation>) {
        let mut f = RequestFramer::new(Limits::default());
        let mut out = BytesMut::new();
        let r = f.feed(input, &mut out);
        (out.to_vec(), r)
    }

    /// Feeds one byte at a time: the result must not depend on how reads are split.
    fn run_bytewise(input: &[u8]) -> (Vec<u8>, Result<(), Violation>) {
        let mut f = RequestFramer::new(Limits::default());
        let mut out = BytesMut::new();
        for b in input {
            if let Err(v) = f.feed(std::slice::from_ref(b), &mut out) {
                return (out.to_vec(), Err(v));
            }
        }
        (out.to_vec(), Ok(()))
    }

    const GET: &[u8] = b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n";

    /// Heads are collected in runs between line endings: the result must be the same for
    /// every place a read can split the input, at the head-size limit too.
    #[test]
    fn every_two_way_split_gives_the_whole_input_result() {
        let limits = Limits {
            max_head_bytes: 64,
            ..Limits::default()
        };
        // 64 bytes exactly, and the same head one byte longer.
        let at_limit = b"GET http://a.example/xxxxxxxxxxxxx HTTP/1.1\r\nHost: a.example\r\n\r\n";
        let over = b"GET http://a.example/xxxxxxxxxxxxxx HTTP/1.1\r\nHost: a.example\r\n\r\n";
        let long_line = [b"GET http://a.example/".as_slice(), &[b'y'; 80]].concat();
        assert_eq!(at_limit.len(), 64);
        let cases: Vec<Vec<u8>> = vec![
            at_limit.to_vec(),
            over.to_vec(),
            long_line,
            [at_limit.as_slice(), at_limit.as_slice()].concat(),
            b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n".to_vec(),
            b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n".to_vec(),
            b"GET / HTTP/1.1\nHost: a\r\n\r\n".to_vec(),
            b"GET / HTTP/1.1\r\nHost: a\r\n\n".to_vec(),
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nT: 1\r\n\r\n".to_vec(),
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: 1\rx\r\n\r\n".to_vec(),
        ];
        let feed = |parts: &[&[u8]]| {
            let mut f = RequestFramer::new(limits);
            let mut out = BytesMut::new();
            for p in parts {
                if let Err(v) = f.feed(p, &mut out) {
                    return (out.to_vec(), Err(v));
                }
            }
            (out.to_vec(), Ok(()))
        };
        for input in &cases {
            let whole = feed(&[input]);
            for k in 0..=input.len() {
                assert_eq!(
                    feed(&[&input[..k], &input[k..]]),
                    whole,
                    "{:?} split at {k}",
                    String::from_utf8_lossy(input)
                );
            }
        }
        // The limit itself: 64 bytes pass, 65 are refused (431: past the request line).
        assert_eq!(feed(&[at_limit]).1, Ok(()));
        assert_eq!(
            feed(&[over]).1.unwrap_err().kind,
            ErrorKind::RequestHeaderTooLarge
        );
    }

    #[test]
    fn valid_requests_pass_whole_and_in_order() {
        let chunked = b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n";
        let cl = b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc";
        let mut all = Vec::new();
        all.extend_from_slice(b"\r\n");
        all.extend_from_slice(GET);
        all.extend_from_slice(chunked);
        all.extend_from_slice(cl);
        all.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
        for (out, r) in [run(&all), run_bytewise(&all)] {
            assert_eq!(r, Ok(()));
            assert_eq!(
                out,
                all[2..].to_vec(),
                "everything but the leading empty line"
            );
        }
    }

    #[test]
    fn a_head_is_held_back_until_complete() {
        let mut f = RequestFramer::new(Limits::default());
        let mut out = BytesMut::new();
        f.feed(&GET[..20], &mut out).unwrap();
        assert!(out.is_empty() && f.head_started());
        f.feed(&GET[20..], &mut out).unwrap();
        assert_eq!(&out[..], GET);
        assert!(!f.head_started() && f.in_head());
    }

    #[test]
    fn smuggling_shapes_are_refused_with_nothing_of_them_passed() {
        let cases: &[(&[u8], &str)] = &[
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", "bad_framing"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n", "bad_framing"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", "bad_framing"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\n", "bad_framing"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "bad_framing"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "bad_framing"),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "bad_framing"),
            (b"GET / HTTP/1.1\r\nHost: a\r\n X: folded\r\n\r\n", "bad_request_head"),
            (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "bad_request_head"),
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "bad_request_head"),
            (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", "bad_request_head"),
            (b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n", "bad_request_head"),
            (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "bad_request_head"),
            (b"GET / HTTP/1.1\r\nx-edgepool-violation: 1\r\nHost: a\r\n\r\n", "bad_request_head"),
            (b"GET / HTTP/1.1\r\n\r\n", "bad_host_header"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "bad_host_header"),
        ];
        for (bytes, token) in cases {
            let mut input = GET.to_vec();
            input.extend_from_slice(bytes);
            input.extend_from_slice(GET);
            for (out, r) in [run(&input), run_bytewise(&input)] {
                let v = r.expect_err(&String::from_utf8_lossy(bytes));
                assert_eq!(v.kind.token(), *token, "{}", String::from_utf8_lossy(bytes));
                assert!(v.in_head);
                assert_eq!(out, GET.to_vec(), "only the request before it passed");
            }
        }
    }

    #[test]
    fn bad_chunks_stop_the_body_where_they_start() {
        let head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        for body in [
            &b"5\r\nhelloXX"[..],
            b"g\r\n",
            b"-1\r\n",
            b"0x5\r\nhello\r\n",
            b"5\nhello\r\n",
            b"11111111111111111\r\n",
            b"0\r\nbad trailer\r\n\r\n",
            b"0\r\n folded: x\r\n\r\n",
        ] {
            let mut input = head.to_vec();
            input.extend_from_slice(body);
            let (out, r) = run(&input);
            let v = r.expect_err(&String::from_utf8_lossy(body));
            assert_eq!((v.kind.token(), v.in_head), ("bad_framing", false));
            assert!(out.starts_with(head));
        }
    }

    #[test]
    fn limits_give_431_and_414() {
        let limits = Limits {
            max_head_bytes: 2048,
            max_headers: 3,
            max_uri_bytes: 300,
        };
        let feed = |input: Vec<u8>| {
            let mut f = RequestFramer::new(limits);
            f.feed(&input, &mut BytesMut::new()).unwrap_err()
        };
        let long_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(400));
        assert_eq!(feed(long_uri.into_bytes()).kind.status().as_u16(), 414);
        let huge_line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(4000));
        assert_eq!(feed(huge_line.into_bytes()).kind.status().as_u16(), 414);
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "b".repeat(3000)
        );
        assert_eq!(feed(big.into_bytes()).kind.status().as_u16(), 431);
        let many = b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 1\r\nC: 1\r\n\r\n".to_vec();
        assert_eq!(feed(many).kind.status().as_u16(), 431);
    }

    #[test]
    fn connect_and_the_h2_preface_switch_to_passthrough() {
        let connect =
            b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n\x16\x03\x01garbage\n\r";
        let (out, r) = run(connect);
        assert_eq!((out, r), (connect.to_vec(), Ok(())));
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04";
        let (out, r) = run_bytewise(preface);
        assert_eq!((out, r), (preface.to_vec(), Ok(())));
    }

    #[test]
    fn a_bodiless_upgrade_switches_to_passthrough_and_one_with_a_body_does_not() {
        let ws = b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x85garbage\r\n";
        let (out, r) = run_bytewise(ws);
        assert_eq!((out, r), (ws.to_vec(), Ok(())));
        // Upgrade not named by Connection: an ordinary request, and what follows is a head.
        let (_, r) =
            run(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n\x81\x85garbage\r\n\r\n");
        assert!(r.is_err());
        // With a body: framed as usual.
        let (_, r) = run(b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\nabGARBAGE\r\n\r\n");
        assert!(r.is_err());
    }
}
