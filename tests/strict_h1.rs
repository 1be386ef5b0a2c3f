//! Strict HTTP/1 end to end: every worker request head is validated before hyper parses it,
//! ambiguous or malformed framing is refused with a status, an `X-Edgepool-Error` token and
//! `Connection: close`, and nothing of a refused request (or of a request smuggled inside it)
//! ever reaches the origin. Valid-but-unusual requests (controls) still go through, so the
//! suite can fail both ways.
//!
//! The upstream part treats origin responses as untrusted too: ambiguous framing from an
//! origin is a 502 and its connection is never reused; bytes an origin sends beyond a
//! response (in the same write, or later on an idle pooled connection) never reach another
//! worker.
//!
//! Every vector runs on a fresh TCP connection to the proxy listener, against its own recording
//! origin (so "the origin saw at most N requests" is exact even though vectors of a category
//! run concurrently). Run with `--nocapture` to see the per-category totals, and with
//! `STRICT_H1_VERBOSE=1` as well to see what every vector observed.
mod gw;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gw::TestGateway;
use support::{Origin, OriginConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// How long a vector's connection is read before it counts as "not closed by edgepool".
const READ_WINDOW: Duration = Duration::from_secs(5);
/// After the expected responses arrived, how long to keep reading for stray bytes.
const GRACE: Duration = Duration::from_millis(300);
/// Vectors of one category run at most this many at a time (2 shared cores).
const PARALLEL: usize = 6;

// ---------------------------------------------------------------------------------------------
// Vectors
// ---------------------------------------------------------------------------------------------
// count: 102 vectors in total (framing 20, head syntax 33, host 6, limits 19, chunked 12,
// controls 12), plus 7 upstream framing cases and 2 upstream stray-byte tests.

/// One thing the worker side does on its connection.
#[derive(Clone, Debug)]
enum Step {
    Send(Vec<u8>),
    Pause(Duration),
}

/// What edgepool must do with a vector.
#[derive(Clone, Debug)]
enum Expect {
    /// After the vector's `pre` valid pipelined requests are answered (200, in order): one
    /// response with `status`, `x-edgepool-error: token` and `connection: close`, then the
    /// connection closes, no earlier than `min_ms` after connecting. Nothing of it reaches the
    /// origin.
    Reject {
        status: u16,
        token: &'static str,
        min_ms: u64,
    },
    /// A violation inside a chunked body: 400 `bad_framing` or no response at all, and in both
    /// cases the connection ends. Nothing of the request reaches the origin.
    BadChunk,
    /// A stalled body: 408 `request_body_timeout` or no response, the connection ends no
    /// earlier than `min_ms`; nothing reaches the origin.
    BodyTimeout { min_ms: u64 },
    /// Closed without a single response byte, no earlier than `min_ms`.
    SilentClose { min_ms: u64 },
    /// Valid: exactly these requests (method, path, body) reach the origin, in order, each
    /// answered 200 to the worker. The connection may stay open.
    Forward(Vec<(&'static str, &'static str, Vec<u8>)>),
}

impl Expect {
    fn is_control(&self) -> bool {
        matches!(self, Expect::Forward(_))
    }
}

#[derive(Clone)]
struct Vector {
    name: &'static str,
    /// Valid `GET /first` requests pipelined in front of the violating one (part of `build`).
    pre: usize,
    /// The bytes (and pauses) the worker sends, given the origin's authority `127.0.0.1:PORT`.
    build: fn(&str) -> Vec<Step>,
    expect: Expect,
}

fn v(name: &'static str, build: fn(&str) -> Vec<Step>, expect: Expect) -> Vector {
    Vector {
        name,
        pre: 0,
        build,
        expect,
    }
}

/// A vector behind one valid pipelined `GET /first` that must still be answered first.
fn v_pre(name: &'static str, build: fn(&str) -> Vec<Step>, expect: Expect) -> Vector {
    Vector {
        name,
        pre: 1,
        build,
        expect,
    }
}

fn reject(status: u16, token: &'static str) -> Expect {
    Expect::Reject {
        status,
        token,
        min_ms: 0,
    }
}

fn framing() -> Expect {
    reject(400, "bad_framing")
}

fn head() -> Expect {
    reject(400, "bad_request_head")
}

fn host() -> Expect {
    reject(400, "bad_host_header")
}

fn forward(list: &[(&'static str, &'static str, &[u8])]) -> Expect {
    Expect::Forward(list.iter().map(|(m, p, b)| (*m, *p, b.to_vec())).collect())
}

/// The request that must never reach the origin.
fn smug(a: &str) -> String {
    format!("GET http://{a}/smuggled HTTP/1.1\r\nHost: {a}\r\n\r\n")
}

/// A valid pipelined request in front of a violating one.
fn first(a: &str) -> String {
    format!("GET http://{a}/first HTTP/1.1\r\nHost: {a}\r\n\r\n")
}

fn send(bytes: impl Into<Vec<u8>>) -> Vec<Step> {
    vec![Step::Send(bytes.into())]
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `POST http://A/v HTTP/1.1`, `Host: A`, `headers` (each line ending in CRLF), empty line, `body`.
fn post(a: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!("POST http://{a}/v HTTP/1.1\r\nHost: {a}\r\n{headers}\r\n").into_bytes();
    v.extend_from_slice(body);
    v
}

/// `hello` followed by the smuggled request: the body of most framing vectors.
fn hello_smug(a: &str) -> Vec<u8> {
    cat(&[b"hello", smug(a).as_bytes()])
}

/// A chunked body `5 hello` + last chunk, followed by the smuggled request.
fn chunked_hello_smug(a: &str) -> Vec<u8> {
    cat(&[b"5\r\nhello\r\n0\r\n\r\n", smug(a).as_bytes()])
}

/// A chunked body (raw, possibly broken) on a valid head, followed by the smuggled request.
fn chunked_post(a: &str, body: &[u8]) -> Vec<u8> {
    post(
        a,
        "Transfer-Encoding: chunked\r\n",
        &cat(&[body, smug(a).as_bytes()]),
    )
}

/// A GET head built from raw parts: `line` is the request line (without CRLF), `headers` the
/// raw header block (each line with its terminator) after `Host: A\r\n`; the smuggled request
/// is pipelined after it.
fn get_raw(a: &str, line: &[u8], headers: &[u8]) -> Vec<u8> {
    cat(&[
        line,
        b"\r\nHost: ",
        a.as_bytes(),
        b"\r\n",
        headers,
        b"\r\n",
        smug(a).as_bytes(),
    ])
}

/// `GET http://A/v HTTP/1.1` with `Host: A`, extra raw header lines, then the smuggled request.
fn get_with(a: &str, headers: &[u8]) -> Vec<u8> {
    get_raw(a, format!("GET http://{a}/v HTTP/1.1").as_bytes(), headers)
}

/// 400 `bad_framing`: Content-Length / Transfer-Encoding ambiguity.
// count: 20 vectors
fn framing_vectors() -> Vec<Vector> {
    vec![
        // CL.TE: a CL reader takes everything as body, a TE reader sees the smuggled request.
        v(
            "cl_then_te",
            |a| {
                let body = cat(&[b"0\r\n\r\n", smug(a).as_bytes()]);
                let h = format!(
                    "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                    body.len()
                );
                send(post(a, &h, &body))
            },
            framing(),
        ),
        // TE.CL: a CL reader reads 4 bytes ("3c\r\n"), then sees the smuggled request.
        v(
            "te_then_cl",
            |a| {
                let s = smug(a);
                let body = format!("{:x}\r\n{s}\r\n0\r\n\r\n", s.len());
                let h = "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n";
                send(post(a, h, body.as_bytes()))
            },
            framing(),
        ),
        v(
            "cl_zero_then_te",
            |a| {
                let h = "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n";
                send(post(a, h, &chunked_hello_smug(a)))
            },
            framing(),
        ),
        v(
            "cl_plus_sign",
            |a| send(post(a, "Content-Length: +5\r\n", &hello_smug(a))),
            framing(),
        ),
        v(
            "cl_negative",
            |a| send(post(a, "Content-Length: -1\r\n", &hello_smug(a))),
            framing(),
        ),
        v(
            "cl_two_numbers",
            |a| send(post(a, "Content-Length: 5 5\r\n", &hello_smug(a))),
            framing(),
        ),
        v(
            "cl_hex",
            |a| send(post(a, "Content-Length: 0x5\r\n", &hello_smug(a))),
            framing(),
        ),
        v(
            "cl_empty",
            |a| send(post(a, "Content-Length: \r\n", &hello_smug(a))),
            framing(),
        ),
        v(
            "cl_list_1_1",
            |a| send(post(a, "Content-Length: 1,1\r\n", &hello_smug(a))),
            framing(),
        ),
        v(
            "cl_25_digits",
            |a| {
                let h = "Content-Length: 0000000000000000000000005\r\n";
                send(post(a, h, &hello_smug(a)))
            },
            framing(),
        ),
        v(
            "cl_two_headers_differ",
            |a| {
                let h = "Content-Length: 5\r\nContent-Length: 6\r\n";
                send(post(a, h, &hello_smug(a)))
            },
            framing(),
        ),
        v(
            "te_gzip_chunked",
            |a| {
                let h = "Transfer-Encoding: gzip, chunked\r\n";
                send(post(a, h, &chunked_hello_smug(a)))
            },
            framing(),
        ),
        v(
            "te_chunked_chunked",
            |a| {
                let h = "Transfer-Encoding: chunked, chunked\r\n";
                send(post(a, h, &chunked_hello_smug(a)))
            },
            framing(),
        ),
        v(
            "te_xchunked",
            |a| {
                let h = "Transfer-Encoding: xchunked\r\n";
                send(post(a, h, &chunked_hello_smug(a)))
            },
            framing(),
        ),
        v(
            "te_chunked_param",
            |a| {
                let h = "Transfer-Encoding: chunked;q=1\r\n";
                send(post(a, h, &chunked_hello_smug(a)))
            },
            framing(),
        ),
        v(
            "te_identity",
            |a| {
                let h = "Transfer-Encoding: identity\r\n";
                send(post(a, h, &hello_smug(a)))
            },
            framing(),
        ),
        v(
            "te_split_over_two_lines",
            |a| {
                let h = "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n";
                send(post(a, h, &chunked_hello_smug(a)))
            },
            framing(),
        ),
        v(
            "te_in_http10",
            |a| {
                let mut r = format!(
                    "POST http://{a}/v HTTP/1.0\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                .into_bytes();
                r.extend_from_slice(&chunked_hello_smug(a));
                send(r)
            },
            framing(),
        ),
        v_pre(
            "pipelined_valid_then_cl_te",
            |a| {
                let body = cat(&[b"0\r\n\r\n", smug(a).as_bytes()]);
                let h = format!(
                    "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                    body.len()
                );
                send(cat(&[first(a).as_bytes(), &post(a, &h, &body)]))
            },
            framing(),
        ),
        v_pre(
            "pipelined_valid_then_cl_plus",
            |a| {
                let bad = post(a, "Content-Length: +5\r\n", &hello_smug(a));
                send(cat(&[first(a).as_bytes(), &bad]))
            },
            framing(),
        ),
    ]
}

/// 400 `bad_request_head`: request line and header syntax.
// count: 33 vectors
fn head_vectors() -> Vec<Vector> {
    vec![
        v(
            "rl_two_spaces",
            |a| {
                send(get_raw(
                    a,
                    format!("GET  http://{a}/v HTTP/1.1").as_bytes(),
                    b"",
                ))
            },
            head(),
        ),
        v(
            "rl_tab_separator",
            |a| {
                send(get_raw(
                    a,
                    format!("GET\thttp://{a}/v HTTP/1.1").as_bytes(),
                    b"",
                ))
            },
            head(),
        ),
        v(
            "rl_lowercase_version",
            |a| {
                send(get_raw(
                    a,
                    format!("GET http://{a}/v http/1.1").as_bytes(),
                    b"",
                ))
            },
            head(),
        ),
        v(
            "rl_http_1_2",
            |a| {
                send(get_raw(
                    a,
                    format!("GET http://{a}/v HTTP/1.2").as_bytes(),
                    b"",
                ))
            },
            head(),
        ),
        v(
            "rl_http_0_9",
            |a| {
                send(get_raw(
                    a,
                    format!("GET http://{a}/v HTTP/0.9").as_bytes(),
                    b"",
                ))
            },
            head(),
        ),
        v(
            "rl_no_version",
            |a| send(get_raw(a, format!("GET http://{a}/v").as_bytes(), b"")),
            head(),
        ),
        v(
            "obs_fold_space",
            |a| send(get_with(a, b"X-A: one\r\n two\r\n")),
            head(),
        ),
        v(
            "obs_fold_tab",
            |a| send(get_with(a, b"X-A: one\r\n\ttwo\r\n")),
            head(),
        ),
        v(
            "obs_fold_continuing_host",
            |a| {
                let r = format!("GET http://{a}/v HTTP/1.1\r\nHost: {a}\r\n evil.example\r\n\r\n");
                send(cat(&[r.as_bytes(), smug(a).as_bytes()]))
            },
            head(),
        ),
        v(
            "space_before_colon_host",
            |a| {
                let r = format!("GET http://{a}/v HTTP/1.1\r\nHost : {a}\r\n\r\n");
                send(cat(&[r.as_bytes(), smug(a).as_bytes()]))
            },
            head(),
        ),
        v(
            "space_before_colon_other",
            |a| send(get_with(a, b"X-Foo : bar\r\n")),
            head(),
        ),
        v(
            "tab_before_colon_content_length",
            |a| send(post(a, "Content-Length\t: 5\r\n", &hello_smug(a))),
            head(),
        ),
        v(
            "bare_lf_request_line",
            |a| {
                let r = format!("GET http://{a}/v HTTP/1.1\nHost: {a}\r\n\r\n");
                send(cat(&[r.as_bytes(), smug(a).as_bytes()]))
            },
            head(),
        ),
        v(
            "bare_lf_header_line",
            |a| send(get_with(a, b"X-A: 1\nX-B: 2\r\n")),
            head(),
        ),
        v(
            "bare_lf_final_line",
            |a| {
                let r = format!("GET http://{a}/v HTTP/1.1\r\nHost: {a}\r\n\n");
                send(cat(&[r.as_bytes(), smug(a).as_bytes()]))
            },
            head(),
        ),
        v(
            "bare_lf_everywhere",
            |a| {
                let r = format!("GET http://{a}/v HTTP/1.1\nHost: {a}\n\n");
                send(cat(&[r.as_bytes(), smug(a).as_bytes()]))
            },
            head(),
        ),
        v(
            "bare_cr_in_value",
            |a| send(get_with(a, b"X-A: a\rb\r\n")),
            head(),
        ),
        v(
            "bare_cr_line_end",
            |a| send(get_with(a, b"X-A: 1\rX-B: 2\r\n")),
            head(),
        ),
        v(
            "nul_in_value",
            |a| send(get_with(a, b"X-A: a\x00b\r\n")),
            head(),
        ),
        v(
            "ctl_0x01_in_value",
            |a| send(get_with(a, b"X-A: a\x01b\r\n")),
            head(),
        ),
        v(
            "del_in_value",
            |a| send(get_with(a, b"X-A: a\x7fb\r\n")),
            head(),
        ),
        v(
            "ctl_0x01_in_name",
            |a| send(get_with(a, b"X-A\x01B: 1\r\n")),
            head(),
        ),
        v(
            "nul_in_name",
            |a| send(get_with(a, b"X\x00A: 1\r\n")),
            head(),
        ),
        v(
            "nul_in_target",
            |a| {
                let line = cat(&[b"GET http://", a.as_bytes(), b"/v\x00x HTTP/1.1"]);
                send(get_raw(a, &line, b""))
            },
            head(),
        ),
        v(
            "ctl_0x01_in_target",
            |a| {
                let line = cat(&[b"GET http://", a.as_bytes(), b"/v\x01x HTTP/1.1"]);
                send(get_raw(a, &line, b""))
            },
            head(),
        ),
        v(
            "del_in_target",
            |a| {
                let line = cat(&[b"GET http://", a.as_bytes(), b"/v\x7fx HTTP/1.1"]);
                send(get_raw(a, &line, b""))
            },
            head(),
        ),
        v(
            "space_in_target",
            |a| {
                send(get_raw(
                    a,
                    format!("GET http://{a}/a b HTTP/1.1").as_bytes(),
                    b"",
                ))
            },
            head(),
        ),
        v(
            "non_ascii_in_target",
            |a| {
                let line = cat(&[b"GET http://", a.as_bytes(), b"/caf\xc3\xa9\xff HTTP/1.1"]);
                send(get_raw(a, &line, b""))
            },
            head(),
        ),
        v(
            "empty_header_name",
            |a| send(get_with(a, b": x\r\n")),
            head(),
        ),
        v(
            "space_in_header_name",
            |a| send(get_with(a, b"Foo Bar: x\r\n")),
            head(),
        ),
        v(
            "paren_in_header_name",
            |a| send(get_with(a, b"Foo(: x\r\n")),
            head(),
        ),
        v(
            "reserved_violation_header",
            |a| send(get_with(a, b"X-Edgepool-Violation: 1\r\n")),
            head(),
        ),
        v_pre(
            "pipelined_valid_then_bad_head",
            |a| {
                let bad = get_raw(a, format!("GET  http://{a}/v HTTP/1.1").as_bytes(), b"");
                send(cat(&[first(a).as_bytes(), &bad]))
            },
            head(),
        ),
    ]
}

/// 400 `bad_host_header`.
// count: 6 vectors
fn host_vectors() -> Vec<Vector> {
    vec![
        v(
            "http11_without_host",
            |a| {
                let r = format!("GET http://{a}/v HTTP/1.1\r\nAccept: */*\r\n\r\n");
                send(cat(&[r.as_bytes(), smug(a).as_bytes()]))
            },
            host(),
        ),
        v(
            "post_without_host",
            |a| {
                let r = format!("POST http://{a}/v HTTP/1.1\r\nContent-Length: 5\r\n\r\n");
                send(cat(&[r.as_bytes(), &hello_smug(a)]))
            },
            host(),
        ),
        v(
            "two_hosts_same_value",
            |a| send(get_with(a, format!("Host: {a}\r\n").as_bytes())),
            host(),
        ),
        v(
            "two_hosts_different_values",
            |a| send(get_with(a, b"Host: evil.example\r\n")),
            host(),
        ),
        v(
            "two_hosts_different_case",
            |a| send(get_with(a, format!("hOST: {a}\r\n").as_bytes())),
            host(),
        ),
        v_pre(
            "pipelined_valid_then_no_host",
            |a| {
                let r = format!("GET http://{a}/v HTTP/1.1\r\n\r\n");
                send(cat(&[
                    first(a).as_bytes(),
                    r.as_bytes(),
                    smug(a).as_bytes(),
                ]))
            },
            host(),
        ),
    ]
}

/// The limits the `limits` category's gateway runs with.
const LIM_HEADER_BYTES: usize = 4096;
const LIM_HEADERS: usize = 20;
const LIM_URI_BYTES: usize = 1024;
const LIM_TIMEOUT_MS: u64 = 500;
/// A timeout response must not come much before the timeout.
const LIM_MIN_MS: u64 = 400;

fn limits_gateway_tweak(cfg: &mut edgepool::config::Config) {
    cfg.limits.max_header_bytes = LIM_HEADER_BYTES;
    cfg.limits.max_headers = LIM_HEADERS;
    cfg.limits.max_uri_bytes = LIM_URI_BYTES;
    cfg.limits.header_read_timeout = Duration::from_millis(LIM_TIMEOUT_MS);
    cfg.limits.body_idle_timeout = Duration::from_millis(LIM_TIMEOUT_MS);
}

/// An absolute-form target for `path_prefix` padded with `x` to exactly `len` bytes.
fn target_of_len(a: &str, path_prefix: &str, len: usize) -> String {
    let mut t = format!("http://{a}{path_prefix}");
    assert!(t.len() <= len);
    t.push_str(&"x".repeat(len - t.len()));
    t
}

/// `n` extra header fields `X-Hk: v` (plus the Host header the caller adds).
fn extra_fields(n: usize) -> String {
    (0..n).map(|i| format!("X-H{i}: v\r\n")).collect()
}

/// 431, 414, 408 and the silent close, against a gateway with small limits
/// (max_header_bytes 4096, max_headers 20, max_uri_bytes 1024, both timeouts 500 ms).
// count: 19 vectors (13 violating + 6 controls)
fn limits_vectors() -> Vec<Vector> {
    vec![
        v(
            "one_header_over_head_limit",
            |a| {
                let h = format!("X-Big: {}\r\n", "b".repeat(6000));
                send(get_with(a, h.as_bytes()))
            },
            reject(431, "request_header_too_large"),
        ),
        v(
            "ten_headers_over_head_limit",
            |a| {
                let h: String = (0..10)
                    .map(|i| format!("X-Big{i}: {}\r\n", "b".repeat(600)))
                    .collect();
                send(get_with(a, h.as_bytes()))
            },
            reject(431, "request_header_too_large"),
        ),
        v(
            "thirty_header_fields",
            |a| send(get_with(a, extra_fields(30).as_bytes())),
            reject(431, "request_header_too_large"),
        ),
        v(
            "max_headers_plus_one_fields",
            // Host + 20 = 21 fields, one more than max_headers.
            |a| send(get_with(a, extra_fields(LIM_HEADERS).as_bytes())),
            reject(431, "request_header_too_large"),
        ),
        v(
            "uri_one_byte_too_long",
            |a| {
                let t = target_of_len(a, "/u/", LIM_URI_BYTES + 1);
                send(get_raw(a, format!("GET {t} HTTP/1.1").as_bytes(), b""))
            },
            reject(414, "uri_too_long"),
        ),
        v(
            "uri_far_too_long",
            |a| {
                let t = target_of_len(a, "/u/", 3000);
                send(get_raw(a, format!("GET {t} HTTP/1.1").as_bytes(), b""))
            },
            reject(414, "uri_too_long"),
        ),
        v(
            "head_stalls_after_host",
            |a| send(format!("GET http://{a}/v HTTP/1.1\r\nHost: {a}\r\n")),
            Expect::Reject {
                status: 408,
                token: "request_header_timeout",
                min_ms: LIM_MIN_MS,
            },
        ),
        v(
            "head_stalls_in_request_line",
            |a| send(format!("GET http://{a}/v HT")),
            Expect::Reject {
                status: 408,
                token: "request_header_timeout",
                min_ms: LIM_MIN_MS,
            },
        ),
        v(
            "head_trickles_a_byte_per_100ms",
            |a| {
                let r = format!("GET http://{a}/v HTTP/1.1\r\nHost: {a}\r\n\r\n");
                r.bytes()
                    .flat_map(|b| [Step::Send(vec![b]), Step::Pause(Duration::from_millis(100))])
                    .collect()
            },
            Expect::Reject {
                status: 408,
                token: "request_header_timeout",
                min_ms: LIM_MIN_MS,
            },
        ),
        v(
            "sends_nothing",
            |_| Vec::new(),
            Expect::SilentClose { min_ms: LIM_MIN_MS },
        ),
        v(
            "body_stalls_content_length",
            |a| send(post(a, "Content-Length: 10\r\n", b"hello")),
            Expect::BodyTimeout { min_ms: LIM_MIN_MS },
        ),
        v(
            "body_stalls_between_chunks",
            |a| send(post(a, "Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n")),
            Expect::BodyTimeout { min_ms: LIM_MIN_MS },
        ),
        v(
            "body_stalls_inside_chunk",
            |a| send(post(a, "Transfer-Encoding: chunked\r\n", b"5\r\nhel")),
            Expect::BodyTimeout { min_ms: LIM_MIN_MS },
        ),
        // Controls: just inside every limit.
        v(
            "ctl_max_headers_fields",
            // Host + 19 = 20 fields = max_headers.
            |a| {
                let r = format!(
                    "GET http://{a}/c/fields HTTP/1.1\r\nHost: {a}\r\n{}\r\n",
                    extra_fields(LIM_HEADERS - 1)
                );
                send(r)
            },
            forward(&[("GET", "/c/fields", b"")]),
        ),
        v(
            "ctl_uri_at_limit",
            |a| {
                let t = target_of_len(a, "/c/uri/", LIM_URI_BYTES);
                send(format!("GET {t} HTTP/1.1\r\nHost: {a}\r\n\r\n"))
            },
            // Path checked by prefix (see `path_matches`).
            forward(&[("GET", "/c/uri/*", b"")]),
        ),
        v(
            "ctl_head_of_3000_bytes",
            |a| {
                let h = format!("X-Big: {}\r\n", "b".repeat(2900));
                send(format!(
                    "GET http://{a}/c/big HTTP/1.1\r\nHost: {a}\r\n{h}\r\n"
                ))
            },
            forward(&[("GET", "/c/big", b"")]),
        ),
        v(
            "ctl_head_in_two_pieces_200ms_apart",
            |a| {
                vec![
                    Step::Send(format!("GET http://{a}/c/pieces HTTP/1.1\r\n").into_bytes()),
                    Step::Pause(Duration::from_millis(200)),
                    Step::Send(format!("Host: {a}\r\n\r\n").into_bytes()),
                ]
            },
            forward(&[("GET", "/c/pieces", b"")]),
        ),
        v(
            "ctl_body_trickles_with_200ms_gaps",
            // 1 s in total, but never 500 ms without a byte: body_idle_timeout is idle time.
            |a| {
                let mut steps = vec![Step::Send(
                    format!(
                        "POST http://{a}/c/trickle HTTP/1.1\r\nHost: {a}\r\nContent-Length: 5\r\n\r\n"
                    )
                    .into_bytes(),
                )];
                for b in b"hello" {
                    steps.push(Step::Pause(Duration::from_millis(200)));
                    steps.push(Step::Send(vec![*b]));
                }
                steps
            },
            forward(&[("POST", "/c/trickle", b"hello")]),
        ),
        v(
            "ctl_chunked_body_with_200ms_gaps",
            |a| {
                vec![
                    Step::Send(post_to(
                        a,
                        "/c/chunk-trickle",
                        "Transfer-Encoding: chunked\r\n",
                    )),
                    Step::Pause(Duration::from_millis(200)),
                    Step::Send(b"3\r\nabc\r\n".to_vec()),
                    Step::Pause(Duration::from_millis(200)),
                    Step::Send(b"2\r\nde\r\n".to_vec()),
                    Step::Pause(Duration::from_millis(200)),
                    Step::Send(b"0\r\n\r\n".to_vec()),
                ]
            },
            forward(&[("POST", "/c/chunk-trickle", b"abcde")]),
        ),
    ]
}

/// A POST head (no body) to `path` with `Host: A` and `headers`.
fn post_to(a: &str, path: &str, headers: &str) -> Vec<u8> {
    format!("POST http://{a}{path} HTTP/1.1\r\nHost: {a}\r\n{headers}\r\n").into_bytes()
}

/// Violations inside a chunked body: 400 `bad_framing` or a closed connection.
// count: 12 vectors
fn chunked_vectors() -> Vec<Vector> {
    vec![
        v(
            "size_not_hex",
            |a| send(chunked_post(a, b"zz\r\nhello\r\n0\r\n\r\n")),
            Expect::BadChunk,
        ),
        v(
            "size_0x_prefix",
            |a| send(chunked_post(a, b"0x5\r\nhello\r\n0\r\n\r\n")),
            Expect::BadChunk,
        ),
        v(
            "size_negative",
            |a| send(chunked_post(a, b"-5\r\nhello\r\n0\r\n\r\n")),
            Expect::BadChunk,
        ),
        v(
            "size_plus_sign",
            |a| send(chunked_post(a, b"+5\r\nhello\r\n0\r\n\r\n")),
            Expect::BadChunk,
        ),
        v(
            "size_17_hex_digits",
            |a| send(chunked_post(a, b"00000000000000005\r\nhello\r\n0\r\n\r\n")),
            Expect::BadChunk,
        ),
        v(
            "size_overflows_u64",
            |a| send(chunked_post(a, b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n")),
            Expect::BadChunk,
        ),
        v(
            "data_longer_than_size",
            |a| send(chunked_post(a, b"3\r\nhello\r\n0\r\n\r\n")),
            Expect::BadChunk,
        ),
        v(
            "data_not_followed_by_crlf",
            |a| send(chunked_post(a, b"5\r\nhelloXX0\r\n\r\n")),
            Expect::BadChunk,
        ),
        v(
            "bare_lf_after_size",
            |a| send(chunked_post(a, b"5\nhello\r\n0\r\n\r\n")),
            Expect::BadChunk,
        ),
        v(
            "bare_lf_after_data",
            |a| send(chunked_post(a, b"5\r\nhello\n0\r\n\r\n")),
            Expect::BadChunk,
        ),
        v(
            "trailer_line_without_colon",
            |a| send(chunked_post(a, b"5\r\nhello\r\n0\r\nnot a trailer\r\n\r\n")),
            Expect::BadChunk,
        ),
        v_pre(
            "pipelined_valid_then_bad_chunk",
            |a| {
                let bad = chunked_post(a, b"zz\r\nhello\r\n0\r\n\r\n");
                send(cat(&[first(a).as_bytes(), &bad]))
            },
            Expect::BadChunk,
        ),
    ]
}

/// Valid requests that must still reach the origin exactly once, with the right method, path
/// and body.
// count: 12 vectors
fn control_vectors() -> Vec<Vector> {
    vec![
        v(
            "plain_get",
            |a| {
                send(format!(
                    "GET http://{a}/c/plain HTTP/1.1\r\nHost: {a}\r\n\r\n"
                ))
            },
            forward(&[("GET", "/c/plain", b"")]),
        ),
        v(
            "post_content_length",
            |a| {
                let h = post_to(a, "/c/post", "Content-Length: 5\r\n");
                send(cat(&[&h, b"hello"]))
            },
            forward(&[("POST", "/c/post", b"hello")]),
        ),
        v(
            "chunked_post_with_extension_and_trailer",
            |a| {
                let h = post_to(a, "/c/chunked", "Transfer-Encoding: chunked\r\n");
                let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n";
                send(cat(&[&h, body]))
            },
            forward(&[("POST", "/c/chunked", b"hello world")]),
        ),
        v(
            "chunked_post_upper_case_hex",
            |a| {
                let h = post_to(a, "/c/chunked-hex", "Transfer-Encoding: chunked\r\n");
                send(cat(&[&h, b"A\r\n0123456789\r\n0\r\n\r\n"]))
            },
            forward(&[("POST", "/c/chunked-hex", b"0123456789")]),
        ),
        v(
            "two_identical_content_lengths",
            |a| {
                let h = post_to(a, "/c/dup-cl", "Content-Length: 5\r\nContent-Length: 5\r\n");
                send(cat(&[&h, b"hello"]))
            },
            forward(&[("POST", "/c/dup-cl", b"hello")]),
        ),
        v(
            "http10_get_without_host",
            |a| send(format!("GET http://{a}/c/http10 HTTP/1.0\r\n\r\n")),
            forward(&[("GET", "/c/http10", b"")]),
        ),
        v(
            "two_pipelined_gets_in_one_write",
            |a| {
                send(format!(
                    "GET http://{a}/c/pipe1 HTTP/1.1\r\nHost: {a}\r\n\r\n\
                     GET http://{a}/c/pipe2 HTTP/1.1\r\nHost: {a}\r\n\r\n"
                ))
            },
            forward(&[("GET", "/c/pipe1", b""), ("GET", "/c/pipe2", b"")]),
        ),
        v(
            "pipelined_post_then_get",
            |a| {
                let p = post_to(a, "/c/pipe-post", "Content-Length: 5\r\n");
                let g = format!("GET http://{a}/c/pipe-get HTTP/1.1\r\nHost: {a}\r\n\r\n");
                send(cat(&[&p, b"hello", g.as_bytes()]))
            },
            forward(&[
                ("POST", "/c/pipe-post", b"hello"),
                ("GET", "/c/pipe-get", b""),
            ]),
        ),
        v(
            "leading_empty_line",
            |a| {
                send(format!(
                    "\r\nGET http://{a}/c/lead HTTP/1.1\r\nHost: {a}\r\n\r\n"
                ))
            },
            forward(&[("GET", "/c/lead", b"")]),
        ),
        v(
            "obs_text_and_tab_in_value",
            |a| {
                let r = cat(&[
                    b"GET http://",
                    a.as_bytes(),
                    b"/c/obs HTTP/1.1\r\nHost: ",
                    a.as_bytes(),
                    b"\r\nX-Obs: caf\xe9\t\x80\xff end\r\n\r\n",
                ]);
                send(r)
            },
            forward(&[("GET", "/c/obs", b"")]),
        ),
        v(
            "cookie_of_16_kib",
            |a| {
                let c = "x".repeat(16 * 1024);
                send(format!(
                    "GET http://{a}/c/cookie HTTP/1.1\r\nHost: {a}\r\nCookie: a={c}\r\n\r\n"
                ))
            },
            forward(&[("GET", "/c/cookie", b"")]),
        ),
        v(
            "no_space_after_colon",
            |a| {
                send(format!(
                    "GET http://{a}/c/nospace HTTP/1.1\r\nHost:{a}\r\nX-A:1\r\n\r\n"
                ))
            },
            forward(&[("GET", "/c/nospace", b"")]),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The worker side: one raw connection per vector
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum End {
    /// The peer closed with FIN.
    Eof,
    /// The peer reset the connection.
    Reset,
    /// Still open at the end of the read window.
    Timeout,
    /// The expected number of responses arrived (controls); the connection may be open.
    Enough,
    Error(String),
}

impl End {
    fn closed(&self) -> bool {
        matches!(self, End::Eof | End::Reset)
    }
}

struct Outcome {
    raw: Vec<u8>,
    end: End,
    /// From connect to `end`.
    elapsed: Duration,
}

#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn token(&self) -> Option<&str> {
        self.header("x-edgepool-error")
    }

    fn connection_close(&self) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("close"))
    }

    fn short(&self) -> String {
        let mut s = self.status.to_string();
        if let Some(t) = self.token() {
            s.push(' ');
            s.push_str(t);
        }
        if self.connection_close() {
            s.push_str(" +close");
        }
        s
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses one complete response at the start of `b`; `eof` allows a close-delimited body.
fn parse_one(b: &[u8], eof: bool) -> Option<(Resp, usize)> {
    let end = find(b, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&b[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    if !status_line.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = status_line.get(9..12)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.to_string(), v.trim().to_string()))
        .collect();
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    let mut pos = end + 4;
    if status < 200 || status == 204 || status == 304 {
        return Some((resp, pos));
    }
    let chunked = resp
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let line_end = pos + find(&b[pos..], b"\r\n")?;
            let size_str = String::from_utf8_lossy(&b[pos..line_end]);
            let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
            pos = line_end + 2;
            if size == 0 {
                // Trailers up to the empty line.
                loop {
                    let le = pos + find(&b[pos..], b"\r\n")?;
                    let empty = le == pos;
                    pos = le + 2;
                    if empty {
                        return Some((resp, pos));
                    }
                }
            }
            if b.len() < pos + size + 2 {
                return None;
            }
            resp.body.extend_from_slice(&b[pos..pos + size]);
            pos += size + 2;
        }
    } else if let Some(cl) = resp.header("content-length") {
        let cl: usize = cl.parse().ok()?;
        if b.len() < pos + cl {
            return None;
        }
        resp.body = b[pos..pos + cl].to_vec();
        Some((resp, pos + cl))
    } else if eof {
        resp.body = b[pos..].to_vec();
        Some((resp, b.len()))
    } else {
        None
    }
}

/// Every complete final response in `raw` (1xx skipped) and the bytes they used.
fn parse_responses(raw: &[u8], eof: bool) -> (Vec<Resp>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        match parse_one(&raw[pos..], eof) {
            Some((r, n)) => {
                pos += n;
                if r.status >= 200 {
                    out.push(r);
                }
            }
            None => break,
        }
    }
    (out, pos)
}

/// Connects to `proxy`, performs `steps` while reading everything that comes back, until the
/// peer closes, `want` responses arrived (if given; then [`GRACE`] more to catch stray bytes)
/// or [`READ_WINDOW`] passed. The write side is
/// kept open the whole time (no FIN from the worker).
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn exchange(proxy: SocketAddr, steps: Vec<Step>, want: Option<usize>) -> Outcome {
    let tcp = TcpStream::connect(proxy)
        .await
        .expect("connect to the proxy");
    let _ = tcp.set_nodelay(true);
    let (mut rd, mut wr) = tcp.into_split();
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + READ_WINDOW;
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let writer = async move {
        for s in steps {
            match s {
                Step::Send(b) => {
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Step::Pause(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = done_rx.changed() => break,
                    }
                }
            }
        }
        // Hold the write half (dropping it would send FIN) until the reader is done.
        let _ = done_rx.wait_for(|d| *d).await;
        drop(wr);
    };
    let reader = async move {
        let mut raw = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut deadline = deadline;
        let mut enough = false;
        let end = loop {
            match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
                Err(_) if enough => break End::Enough,
                Err(_) => break End::Timeout,
                Ok(Ok(0)) => break End::Eof,
                Ok(Ok(n)) => {
                    raw.extend_from_slice(&buf[..n]);
                    if let Some(w) = want {
                        if !enough && parse_responses(&raw, false).0.len() >= w {
                            // Keep listening a little: anything more is stray bytes.
                            enough = true;
                            deadline = deadline.min(tokio::time::Instant::now() + GRACE);
                        }
                    }
                }
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    break End::Reset
                }
                Ok(Err(e)) => break End::Error(e.to_string()),
            }
        };
        let elapsed = start.elapsed();
        let _ = done_tx.send(true);
        Outcome { raw, end, elapsed }
    };
    let ((), outcome) = tokio::join!(writer, reader);
    outcome
}

fn preview(raw: &[u8]) -> String {
    let n = raw.len().min(160);
    format!("{:?}", String::from_utf8_lossy(&raw[..n]))
}

/// Whether a recorded origin path matches an expected one (`prefix*` matches by prefix).
fn path_matches(got: &str, want: &str) -> bool {
    match want.strip_suffix('*') {
        Some(prefix) => got.starts_with(prefix),
        None => got == want,
    }
}

struct VectorResult {
    name: &'static str,
    control: bool,
    /// `Ok(observed)` when edgepool did what the contract says; `Err(why)` otherwise.
    result: Result<String, String>,
}

/// Runs one vector on a fresh connection against its own origin and checks the contract.
async fn run_vector(proxy: SocketAddr, vector: Vector) -> VectorResult {
    let origin = Origin::start(OriginConfig::default()).await;
    let a = origin.authority();
    let before = origin.requests();
    let want = match &vector.expect {
        Expect::Forward(list) => Some(list.len()),
        _ => None,
    };
    let out = exchange(proxy, (vector.build)(&a), want).await;
    let eof = out.end.closed();
    let (resps, used) = parse_responses(&out.raw, eof);
    let leftover = out.raw.len() - used;
    // Give a request edgepool may have forwarded anyway a moment to be recorded.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let log = origin.log();
    let seen = origin.requests() - before;
    let observed = format!(
        "responses=[{}] leftover={}B end={:?} after {}ms; origin saw {} request(s) {:?}; first bytes {}",
        resps.iter().map(Resp::short).collect::<Vec<_>>().join(", "),
        leftover,
        out.end,
        out.elapsed.as_millis(),
        seen,
        log.iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>(),
        preview(&out.raw),
    );
    let mut problems: Vec<String> = Vec::new();
    if log.iter().any(|r| r.path.contains("smuggled")) {
        problems.push("SMUGGLED REQUEST REACHED THE ORIGIN".into());
    }
    let pre = vector.pre;
    let check_pre = |problems: &mut Vec<String>| {
        for (i, r) in resps.iter().take(pre).enumerate() {
            if r.status != 200 {
                problems.push(format!(
                    "pipelined valid request #{} answered {} (want 200 first)",
                    i + 1,
                    r.short()
                ));
            }
        }
        let firsts = log.iter().filter(|r| r.path == "/first").count();
        if firsts != pre {
            problems.push(format!(
                "origin saw /first {firsts} time(s), want {pre} (the valid pipelined request)"
            ));
        }
    };
    let check_nothing_forwarded = |problems: &mut Vec<String>| {
        if seen as usize != pre {
            problems.push(format!(
                "origin saw {seen} request(s), want {pre} (nothing of the violating request)"
            ));
        }
    };
    match &vector.expect {
        Expect::Reject {
            status,
            token,
            min_ms,
        } => {
            check_pre(&mut problems);
            check_nothing_forwarded(&mut problems);
            if resps.len() != pre + 1 {
                problems.push(format!(
                    "{} response(s), want {} (pipelined 200s, then the refusal)",
                    resps.len(),
                    pre + 1
                ));
            }
            match resps.get(pre) {
                Some(r) => {
                    if r.status != *status || r.token() != Some(token) {
                        problems.push(format!("refusal is {}, want {status} {token}", r.short()));
                    }
                    if !r.connection_close() {
                        problems.push("refusal lacks connection: close".into());
                    }
                }
                None => problems.push(format!("no {status} {token} response")),
            }
            if leftover != 0 {
                problems.push(format!("{leftover} unparsed byte(s) after the responses"));
            }
            if !out.end.closed() {
                problems.push(format!("connection not closed by edgepool ({:?})", out.end));
            }
            if out.elapsed < Duration::from_millis(*min_ms) {
                problems.push(format!(
                    "answered after {}ms, before the timeout ({}ms expected at least)",
                    out.elapsed.as_millis(),
                    min_ms
                ));
            }
        }
        Expect::BadChunk | Expect::BodyTimeout { .. } => {
            let (status, token, min_ms) = match &vector.expect {
                Expect::BodyTimeout { min_ms } => (408, "request_body_timeout", *min_ms),
                _ => (400, "bad_framing", 0),
            };
            check_pre(&mut problems);
            check_nothing_forwarded(&mut problems);
            if resps.len() > pre + 1 || resps.len() < pre {
                problems.push(format!(
                    "{} response(s), want {pre} (+ at most one refusal)",
                    resps.len()
                ));
            }
            if let Some(r) = resps.get(pre) {
                if r.status != status || r.token() != Some(token) {
                    problems.push(format!(
                        "got {}, want {status} {token} or no response",
                        r.short()
                    ));
                }
            }
            if leftover != 0 {
                problems.push(format!("{leftover} unparsed byte(s) after the responses"));
            }
            if !out.end.closed() {
                problems.push(format!("connection not closed by edgepool ({:?})", out.end));
            }
            if out.elapsed < Duration::from_millis(min_ms) {
                problems.push(format!(
                    "closed after {}ms, before the timeout ({min_ms}ms)",
                    out.elapsed.as_millis()
                ));
            }
        }
        Expect::SilentClose { min_ms } => {
            if !out.raw.is_empty() {
                problems.push(format!(
                    "{} byte(s) sent to a silent connection",
                    out.raw.len()
                ));
            }
            if !out.end.closed() {
                problems.push(format!("connection not closed by edgepool ({:?})", out.end));
            }
            if out.elapsed < Duration::from_millis(*min_ms) {
                problems.push(format!(
                    "closed after {}ms, before header_read_timeout",
                    out.elapsed.as_millis()
                ));
            }
            if seen != 0 {
                problems.push(format!("origin saw {seen} request(s)"));
            }
        }
        Expect::Forward(list) => {
            if resps.len() != list.len() {
                problems.push(format!("{} response(s), want {}", resps.len(), list.len()));
            }
            for r in &resps {
                if r.status != 200 {
                    problems.push(format!("answered {}, want 200", r.short()));
                }
            }
            if leftover != 0 {
                problems.push(format!("{leftover} unparsed byte(s) after the responses"));
            }
            if log.len() != list.len() {
                problems.push(format!(
                    "origin saw {} request(s), want exactly {}",
                    log.len(),
                    list.len()
                ));
            }
            for (i, (m, p, b)) in list.iter().enumerate() {
                match log.get(i) {
                    Some(rec) => {
                        if rec.method != *m || !path_matches(&rec.path, p) || rec.body != *b {
                            problems.push(format!(
                                "origin request #{} was {} {} body {:?}, want {m} {p} body {:?}",
                                i + 1,
                                rec.method,
                                rec.path,
                                String::from_utf8_lossy(&rec.body),
                                String::from_utf8_lossy(b)
                            ));
                        }
                    }
                    None => problems.push(format!("{m} {p} never reached the origin")),
                }
            }
        }
    }
    drop(origin);
    VectorResult {
        name: vector.name,
        control: vector.expect.is_control(),
        result: if problems.is_empty() {
            Ok(observed)
        } else {
            Err(format!(
                "{}\n      observed: {observed}",
                problems.join("; ")
            ))
        },
    }
}

/// Runs every vector of a category (a few at a time), prints the totals and panics once with
/// every failing vector.
async fn run_category(category: &str, gw: &TestGateway, vectors: Vec<Vector>) {
    let total = vectors.len();
    let sem = Arc::new(Semaphore::new(PARALLEL));
    let mut set = JoinSet::new();
    let proxy = gw.proxy;
    for (i, vector) in vectors.into_iter().enumerate() {
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            (i, run_vector(proxy, vector).await)
        });
    }
    let mut results = Vec::new();
    while let Some(r) = set.join_next().await {
        results.push(r.expect("vector task panicked"));
    }
    results.sort_by_key(|(i, _)| *i);
    let (mut violating, mut rejected, mut controls, mut forwarded) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for (_, r) in &results {
        if r.control {
            controls += 1;
        } else {
            violating += 1;
        }
        if std::env::var_os("STRICT_H1_VERBOSE").is_some() {
            let (ok, text) = match &r.result {
                Ok(o) => ("ok", o),
                Err(e) => ("FAIL", e),
            };
            eprintln!("[strict_h1]   {category}/{} {ok}: {text}", r.name);
        }
        match &r.result {
            Ok(_) if r.control => forwarded += 1,
            Ok(_) => rejected += 1,
            Err(why) => failures.push(format!("  - {}: {why}", r.name)),
        }
    }
    eprintln!(
        "[strict_h1] {category}: {total} vectors tried ({violating} violating, {controls} controls); \
         {rejected}/{violating} rejected as specified; {forwarded}/{controls} controls forwarded; \
         {} failed",
        failures.len()
    );
    if !failures.is_empty() {
        let names: Vec<&str> = results
            .iter()
            .filter(|(_, r)| r.result.is_err())
            .map(|(_, r)| r.name)
            .collect();
        panic!(
            "{category}: {} of {total} vectors failed: {}\n{}",
            failures.len(),
            names.join(", "),
            failures.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_ambiguity_is_refused_with_bad_framing() {
    let gw = TestGateway::start(&[]).await;
    run_category("framing", &gw, framing_vectors()).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_heads_are_refused_with_bad_request_head() {
    let gw = TestGateway::start(&[]).await;
    run_category("head syntax", &gw, head_vectors()).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_repeated_host_is_refused_with_bad_host_header() {
    let gw = TestGateway::start(&[]).await;
    run_category("host", &gw, host_vectors()).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_size_uri_and_timeouts_are_enforced() {
    let gw = TestGateway::start_with(&[], limits_gateway_tweak).await;
    run_category("limits", &gw, limits_vectors()).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_chunked_bodies_end_the_connection_and_reach_nothing() {
    let gw = TestGateway::start(&[]).await;
    run_category("chunked", &gw, chunked_vectors()).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_but_unusual_requests_still_work() {
    let gw = TestGateway::start(&[]).await;
    run_category("controls", &gw, control_vectors()).await;
    gw.stop().await;
}

#[test]
fn the_vector_table_is_large_enough() {
    let counts = [
        ("framing", framing_vectors().len()),
        ("head syntax", head_vectors().len()),
        ("host", host_vectors().len()),
        ("limits", limits_vectors().len()),
        ("chunked", chunked_vectors().len()),
        ("controls", control_vectors().len()),
    ];
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    eprintln!("[strict_h1] vector table: {counts:?}, {total} in total");
    assert!(total >= 45, "{total} vectors");
    let mut names: Vec<&str> = [
        framing_vectors(),
        head_vectors(),
        host_vectors(),
        limits_vectors(),
        chunked_vectors(),
        control_vectors(),
    ]
    .iter()
    .flatten()
    .map(|v| v.name)
    .collect();
    names.sort();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "vector names are unique");
}

// ---------------------------------------------------------------------------------------------
// Upstream: origin responses are untrusted too
// ---------------------------------------------------------------------------------------------

/// What a [`ScriptOrigin`] writes for one request.
struct Reply {
    /// Written at once, in one write.
    now: Vec<u8>,
    /// Written after a pause, on the same connection (it is then idle in edgepool's pool).
    later: Option<(Duration, Vec<u8>)>,
}

/// A raw TCP origin: reads request heads (and Content-Length bodies), writes scripted bytes per
/// path, keeps every connection open, counts accepted connections and records which connection
/// carried which path.
struct ScriptOrigin {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// (1-based connection id, request path), in order of arrival.
    seen: Arc<Mutex<Vec<(usize, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptOrigin {
    async fn start(script: fn(&str) -> Reply) -> ScriptOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (acc, log) = (accepted.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                let id = acc.fetch_add(1, Ordering::SeqCst) + 1;
                conns.spawn(serve_script(s, id, script, log.clone()));
            }
        });
        ScriptOrigin {
            addr,
            accepted,
            seen,
            task,
        }
    }

    fn authority(&self) -> String {
        self.addr.to_string()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<(usize, String)> {
        self.seen.lock().unwrap().clone()
    }

    /// Connection ids that carried `path`.
    fn conns_for(&self, path: &str) -> Vec<usize> {
        self.seen()
            .into_iter()
            .filter(|(_, p)| p == path)
            .map(|(c, _)| c)
            .collect()
    }
}

impl Drop for ScriptOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_script(
    mut s: TcpStream,
    id: usize,
    script: fn(&str) -> Reply,
    log: Arc<Mutex<Vec<(usize, String)>>>,
) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        let end = loop {
            if let Some(e) = find(&buf, b"\r\n\r\n") {
                break e + 4;
            }
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let cl = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < cl {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        buf.drain(..cl);
        let path = head.split(' ').nth(1).unwrap_or_default().to_string();
        log.lock().unwrap().push((id, path.clone()));
        let reply = script(&path);
        if s.write_all(&reply.now).await.is_err() {
            return;
        }
        if let Some((pause, bytes)) = reply.later {
            tokio::time::sleep(pause).await;
            if s.write_all(&bytes).await.is_err() {
                return;
            }
        }
    }
}

/// `HTTP/1.1 200 OK` with `Content-Length` and `body`.
fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The whole fake response an origin tries to slip to another worker.
const INJECTED: &str = "HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Injected: 1\r\n\r\nINJECTED";

/// One worker GET through the proxy on its own fresh connection: the complete responses, the
/// raw outcome, and any bytes after the complete responses (stray bytes, if a response parsed).
async fn worker_get(
    proxy: SocketAddr,
    authority: &str,
    path: &str,
) -> (Vec<Resp>, Outcome, Vec<u8>) {
    let req = format!("GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let out = exchange(proxy, send(req), Some(1)).await;
    let (resps, used) = parse_responses(&out.raw, out.end.closed());
    let rest = out.raw[used..].to_vec();
    (resps, out, rest)
}

fn describe(resps: &[Resp], out: &Outcome, rest: &[u8]) -> String {
    format!(
        "responses=[{}] bodies={:?} then {} more byte(s) {} end={:?} first bytes {}",
        resps.iter().map(Resp::short).collect::<Vec<_>>().join(", "),
        resps
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect::<Vec<_>>(),
        rest.len(),
        preview(rest),
        out.end,
        preview(&out.raw)
    )
}

/// How the worker side of an upstream framing case must look.
#[derive(Clone, Copy, Debug)]
enum UpstreamExpect {
    /// A 502 with edgepool's `upstream_bad_response` token.
    BadGateway,
    /// The head may already have been forwarded when the body turns out broken: a 502 with the
    /// token, or a response that visibly does not complete (the connection ends before the
    /// chunked body's last chunk). Never a clean, complete response.
    BadGatewayOrTruncated,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_upstream_framing_is_a_502_and_the_connection_is_not_reused() {
    // (name, response to /bad, expectation)
    type Case = (&'static str, fn(&str) -> Reply, UpstreamExpect);
    let cases: Vec<Case> = vec![
        (
            "cl_and_te",
            |p| Reply {
                now: if p == "/bad" {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()
                } else {
                    ok("good")
                },
                later: None,
            },
            UpstreamExpect::BadGateway,
        ),
        (
            "te_and_cl",
            |p| Reply {
                now: if p == "/bad" {
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()
                } else {
                    ok("good")
                },
                later: None,
            },
            UpstreamExpect::BadGateway,
        ),
        (
            "cl_plus_sign",
            |p| Reply {
                now: if p == "/bad" {
                    b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello".to_vec()
                } else {
                    ok("good")
                },
                later: None,
            },
            UpstreamExpect::BadGateway,
        ),
        (
            "cl_two_values",
            |p| Reply {
                now: if p == "/bad" {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
                        .to_vec()
                } else {
                    ok("good")
                },
                later: None,
            },
            UpstreamExpect::BadGateway,
        ),
        (
            // Not chunked as the final (only) coding: edgepool would have to guess the body's end.
            "te_gzip_chunked",
            |p| Reply {
                now: if p == "/bad" {
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()
                } else {
                    ok("good")
                },
                later: None,
            },
            UpstreamExpect::BadGateway,
        ),
        (
            // The head was valid and is already on its way to the worker when the body turns
            // out bad: edgepool cannot take it back, so the worker sees the response cut (the
            // connection closes without a complete response), never a complete wrong one.
            "bad_chunk_size",
            |p| Reply {
                now: if p == "/bad" {
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
                        .to_vec()
                } else {
                    ok("good")
                },
                later: None,
            },
            UpstreamExpect::BadGatewayOrTruncated,
        ),
        (
            "chunk_data_without_crlf",
            |p| Reply {
                now: if p == "/bad" {
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"
                        .to_vec()
                } else {
                    ok("good")
                },
                later: None,
            },
            UpstreamExpect::BadGatewayOrTruncated,
        ),
    ];
    let gw = TestGateway::start(&[]).await;
    let mut failures = Vec::new();
    for (name, script, expect) in cases {
        let origin = ScriptOrigin::start(script).await;
        let a = origin.authority();
        let (resps, out, rest) = worker_get(gw.proxy, &a, "/bad").await;
        let observed_bad = describe(&resps, &out, &rest);
        let mut problems = Vec::new();
        if !resps.is_empty() && !rest.is_empty() {
            problems.push(format!(
                "{} stray byte(s) after the response on the worker's connection",
                rest.len()
            ));
        }
        let first = resps.first();
        let is_502 =
            first.is_some_and(|r| r.status == 502 && r.token() == Some("upstream_bad_response"));
        match expect {
            UpstreamExpect::BadGateway => {
                if !is_502 {
                    problems.push(format!(
                        "worker got [{}], want 502 upstream_bad_response",
                        first
                            .map(Resp::short)
                            .unwrap_or_else(|| "no response".into())
                    ));
                }
            }
            UpstreamExpect::BadGatewayOrTruncated => {
                if !is_502 {
                    if let Some(r) = first {
                        problems.push(format!(
                            "worker got a complete response {} body {:?}, want 502 upstream_bad_response or a truncated response",
                            r.short(),
                            String::from_utf8_lossy(&r.body)
                        ));
                    } else if !out.end.closed() {
                        problems.push(format!(
                            "worker's response neither completed nor ended ({:?})",
                            out.end
                        ));
                    }
                }
            }
        }
        // Let the pool settle (a connection kept for reuse would be idle by now).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (resps2, out2, rest2) = worker_get(gw.proxy, &a, "/good").await;
        let observed_good = describe(&resps2, &out2, &rest2);
        if !resps2
            .first()
            .is_some_and(|r| r.status == 200 && r.body == b"good")
        {
            problems.push("the next request did not get the origin's 200 \"good\"".into());
        }
        let bad_conns = origin.conns_for("/bad");
        let good_conns = origin.conns_for("/good");
        if good_conns.iter().any(|c| bad_conns.contains(c)) {
            problems.push(format!(
                "the connection that carried the bad response was reused (/bad on {bad_conns:?}, /good on {good_conns:?})"
            ));
        }
        if good_conns.is_empty() {
            problems.push("/good never reached the origin".into());
        }
        let line = format!(
            "{name}: /bad -> {observed_bad}; /good -> {observed_good}; origin accepted {} connection(s), requests {:?}",
            origin.accepted(),
            origin.seen()
        );
        eprintln!("[strict_h1] upstream {line}");
        if !problems.is_empty() {
            failures.push(format!("  - {name}: {}\n      {line}", problems.join("; ")));
        }
    }
    gw.stop().await;
    assert!(
        failures.is_empty(),
        "upstream framing: {} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_a_complete_response_in_the_same_write_never_reach_another_worker() {
    let origin = ScriptOrigin::start(|p| Reply {
        now: match p {
            "/first" => [ok("hello"), INJECTED.as_bytes().to_vec()].concat(),
            "/second" => ok("second"),
            _ => ok("other"),
        },
        later: None,
    })
    .await;
    let gw = TestGateway::start(&[]).await;
    let a = origin.authority();
    let (r1, o1, x1) = worker_get(gw.proxy, &a, "/first").await;
    let d1 = describe(&r1, &o1, &x1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A second worker, on its own connection to edgepool.
    let (r2, o2, x2) = worker_get(gw.proxy, &a, "/second").await;
    let d2 = describe(&r2, &o2, &x2);
    let seen = origin.seen();
    let accepted = origin.accepted();
    eprintln!(
        "[strict_h1] upstream stray-in-same-write: worker1 {d1}; worker2 {d2}; origin accepted {accepted}, requests {seen:?}"
    );
    gw.stop().await;
    let mut problems = Vec::new();
    if !r1
        .first()
        .is_some_and(|r| r.status == 200 && r.body == b"hello")
    {
        problems.push(format!("worker 1 did not get its 5 bytes: {d1}"));
    }
    if !x1.is_empty() || !x2.is_empty() {
        problems.push(format!(
            "stray bytes after a complete response on a worker connection: worker 1 {}, worker 2 {}",
            preview(&x1),
            preview(&x2)
        ));
    }
    if String::from_utf8_lossy(&o1.raw).contains("INJECTED") {
        problems.push(format!("worker 1 received the injected bytes: {d1}"));
    }
    if String::from_utf8_lossy(&o2.raw).contains("INJECTED")
        || r2.iter().any(|r| r.header("x-injected").is_some())
    {
        problems.push(format!("worker 2 received the injected response: {d2}"));
    }
    if !r2
        .first()
        .is_some_and(|r| r.status == 200 && r.body == b"second")
    {
        problems.push(format!(
            "worker 2 did not get the origin's answer to /second: {d2}"
        ));
    }
    let first_conns = origin.conns_for("/first");
    let second_conns = origin.conns_for("/second");
    if second_conns.iter().any(|c| first_conns.contains(c)) {
        problems.push(format!(
            "the connection with stray bytes was reused (/first on {first_conns:?}, /second on {second_conns:?})"
        ));
    }
    if second_conns.is_empty() {
        problems.push("/second never reached the origin".into());
    }
    assert!(
        problems.is_empty(),
        "{}\n  origin accepted {accepted} connection(s), requests {seen:?}",
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_bytes_on_an_idle_pooled_connection_never_reach_the_next_request() {
    let origin = ScriptOrigin::start(|p| match p {
        "/first" => Reply {
            now: ok("ok"),
            later: Some((Duration::from_millis(100), INJECTED.as_bytes().to_vec())),
        },
        "/second" => Reply {
            now: ok("second"),
            later: None,
        },
        _ => Reply {
            now: ok("other"),
            later: None,
        },
    })
    .await;
    let gw = TestGateway::start(&[]).await;
    let a = origin.authority();
    let (r1, o1, x1) = worker_get(gw.proxy, &a, "/first").await;
    let d1 = describe(&r1, &o1, &x1);
    // The stray bytes arrive 100 ms after the response, while the connection sits idle.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (r2, o2, x2) = worker_get(gw.proxy, &a, "/second").await;
    let d2 = describe(&r2, &o2, &x2);
    let seen = origin.seen();
    let accepted = origin.accepted();
    eprintln!(
        "[strict_h1] upstream stray-on-idle: worker1 {d1}; worker2 {d2}; origin accepted {accepted}, requests {seen:?}"
    );
    gw.stop().await;
    let mut problems = Vec::new();
    if !r1
        .first()
        .is_some_and(|r| r.status == 200 && r.body == b"ok")
    {
        problems.push(format!("worker 1 did not get its answer: {d1}"));
    }
    if !x1.is_empty() || !x2.is_empty() {
        problems.push(format!(
            "stray bytes after a complete response on a worker connection: worker 1 {}, worker 2 {}",
            preview(&x1),
            preview(&x2)
        ));
    }
    if String::from_utf8_lossy(&o1.raw).contains("INJECTED") {
        problems.push(format!("worker 1 received the injected bytes: {d1}"));
    }
    if String::from_utf8_lossy(&o2.raw).contains("INJECTED")
        || r2.iter().any(|r| r.header("x-injected").is_some())
    {
        problems.push(format!(
            "the next request received the stray response: {d2}"
        ));
    }
    if !r2
        .first()
        .is_some_and(|r| r.status == 200 && r.body == b"second")
    {
        problems.push(format!(
            "the next request did not get the origin's answer to /second: {d2}"
        ));
    }
    let first_conns = origin.conns_for("/first");
    let second_conns = origin.conns_for("/second");
    if second_conns.iter().any(|c| first_conns.contains(c)) {
        problems.push(format!(
            "the connection with stray bytes was reused (/first on {first_conns:?}, /second on {second_conns:?})"
        ));
    }
    if second_conns.is_empty() {
        problems.push("/second never reached the origin".into());
    }
    assert!(
        problems.is_empty(),
        "{}\n  origin accepted {accepted} connection(s), requests {seen:?}",
        problems.join("\n")
    );
}
