//! Fault ledger: scripted upstream faults, every worker request reconciled.
//!
//! Every request a worker sends carries a unique `x-ledger-id: <n>` header (edgepool forwards
//! unknown request headers). The origins record the ledger id of every request they read —
//! the recording [`support::Origin`] through its log, the hand-rolled raw HTTP/1.1 origin and
//! the scripted HTTP/2 origin of this file before they break the request. After each scenario
//! the ledger is reconciled:
//!
//! 1. every request has exactly one outcome: a complete response (status, full body of its
//!    Content-Length, echoing its own ledger id when 2xx), an edgepool error (status,
//!    `x-edgepool-error`, JSON body with `error` = the token and `request_sent` =
//!    none|maybe|complete), or — only where a response was already streaming — a visibly cut
//!    response (the worker's read fails before Content-Length bytes). Nothing hangs, nothing
//!    is silently dropped.
//! 2. no POST reached an origin twice; a GET at most twice, and the GETs that arrived twice are
//!    no more than the retries edgepool counted (`edgepool_retries_total`, the only retry
//!    marker: there is no per-response retry header).
//! 3. `request_sent: none` means the origin never saw that ledger id; a complete 2xx means it
//!    saw it at least once (and, for the scripted origins, answered it in full at least once).
//! 4. no body shorter than its Content-Length is ever delivered as a success.
//!
//! Every scenario prints `ledger <scenario>: sent=… ok=… errors=… (tokens) cut=… …`, and every
//! test prints the running grand total (`ledger TOTAL …`). Run with `--nocapture` to see them.
//! Violations are collected per test and reported together (naming scenario and ledger id).
mod gw;
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use edgepool::config::{Config, ExitPoolConfig};
use gw::TestGateway;
use support::exits::{ConnectReply, FakeExit, FakeExitConfig};
use support::{Origin, OriginConfig, TestCa};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

/// A request without an outcome after this long is a hang (a failure).
const HANG: Duration = Duration::from_secs(20);
/// Raw-socket workers: a read that sees nothing for this long, while the response is short of
/// its Content-Length, means the worker is left waiting on a silently short body.
const RAW_READ: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------------------------------------
// Ledger
// ---------------------------------------------------------------------------------------------

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::SeqCst)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum M {
    Get,
    Post,
}

impl M {
    fn as_str(self) -> &'static str {
        match self {
            M::Get => "GET",
            M::Post => "POST",
        }
    }
}

/// One ledger entry: what the worker sends.
#[derive(Clone, Debug)]
struct Req {
    id: u64,
    method: M,
    url: String,
}

impl Req {
    fn new(method: M, url: impl Into<String>) -> Req {
        Req {
            id: next_id(),
            method,
            url: url.into(),
        }
    }
}

/// Requests with alternating methods (GET first), all to `url`.
fn mixed(n: usize, url: &str) -> Vec<Req> {
    (0..n)
        .map(|i| Req::new(if i % 2 == 0 { M::Get } else { M::Post }, url))
        .collect()
}

fn post_body(id: u64) -> Vec<u8> {
    let mut b = format!("ledger-body id={id};").into_bytes();
    b.resize(200 + (id % 7) as usize * 50, b'b');
    b
}

/// What the worker observed for one request.
#[derive(Clone, Debug)]
enum Outcome {
    /// A response read to its end.
    Complete {
        status: u16,
        len: usize,
        content_length: Option<u64>,
        /// The ledger id the response says it answers (`x-ledger-echo` or the JSON echo).
        echo: Option<String>,
    },
    /// An edgepool error response.
    EdgeError {
        status: u16,
        token: String,
        json_error: Option<String>,
        sent: Option<String>,
        body: String,
    },
    /// The head arrived, then the body broke off visibly (read error / close).
    Cut {
        status: u16,
        got: usize,
        content_length: Option<u64>,
        why: String,
    },
    /// The worker got no response at all (connection error before a head).
    NoResponse(String),
    /// Nothing within the time limit.
    Hang(String),
}

/// One request as an origin read it.
#[derive(Clone, Debug)]
struct Arrival {
    ledger: Option<u64>,
    /// Whether the origin answered this arrival with a complete response (None: unknown).
    full_response: Option<bool>,
}

fn arrivals_of(origin: &Origin) -> Vec<Arrival> {
    origin
        .log()
        .iter()
        .map(|r| Arrival {
            ledger: r.header("x-ledger-id").and_then(|v| v.trim().parse().ok()),
            full_response: None,
        })
        .collect()
}

/// Reconciliation settings of one scenario.
struct Check<'a> {
    name: &'a str,
    results: &'a [(Req, Outcome)],
    arrivals: Vec<Arrival>,
    /// `edgepool_retries_total` delta over the scenario.
    retries: u64,
    faults: u64,
    /// Cut responses are legitimate here (a response was streaming when the fault hit).
    allow_cut: bool,
    /// Error tokens this scenario may produce (empty: any).
    tokens: &'a [&'a str],
    /// `request_sent: complete` means the origin must have read the request (direct targets
    /// whose origin reads every request in full before faulting).
    complete_implies_arrival: bool,
    /// Extra `key=value` fields for the summary line.
    extra: String,
}

#[derive(Default)]
struct Totals {
    scenarios: u64,
    faults: u64,
    sent: u64,
    reconciled: u64,
    violations: u64,
}

static TOTALS: Mutex<Totals> = Mutex::new(Totals {
    scenarios: 0,
    faults: 0,
    sent: 0,
    reconciled: 0,
    violations: 0,
});

fn print_totals(after: &str) {
    let t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    eprintln!(
        "ledger TOTAL after {after}: scenarios={} faults_injected={} requests_sent={} requests_reconciled={} violations={}",
        t.scenarios, t.faults, t.sent, t.reconciled, t.violations
    );
}

/// Reconciles one scenario; prints its summary line; returns the violations.
fn reconcile(c: Check<'_>) -> Vec<String> {
    let name = c.name;
    let mut v: Vec<String> = Vec::new();
    if c.faults == 0 {
        v.push(format!(
            "[{name}] no fault was injected: the scenario's outcomes prove nothing"
        ));
    }
    let mut arrivals: HashMap<u64, usize> = HashMap::new();
    let mut answered: HashSet<u64> = HashSet::new();
    let known: HashSet<u64> = c.results.iter().map(|(r, _)| r.id).collect();
    for a in &c.arrivals {
        match a.ledger {
            Some(id) => {
                *arrivals.entry(id).or_default() += 1;
                if a.full_response != Some(false) {
                    answered.insert(id);
                }
                if !known.contains(&id) {
                    v.push(format!(
                        "[{name}] the origin saw ledger id {id}, which no worker of this scenario sent"
                    ));
                }
            }
            None => v.push(format!(
                "[{name}] the origin saw a request without x-ledger-id (edgepool sent something of its own)"
            )),
        }
    }
    let (mut ok, mut errors, mut cut, mut lost) = (0u64, 0u64, 0u64, 0u64);
    let mut tokens: BTreeMap<String, u64> = BTreeMap::new();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let (mut dup_get, mut dup_post) = (0u64, 0u64);
    for (req, out) in c.results {
        let id = req.id;
        let m = req.method.as_str();
        let seen = arrivals.get(&id).copied().unwrap_or(0);
        match out {
            Outcome::Complete {
                status,
                len,
                content_length,
                echo,
            } => {
                ok += 1;
                *statuses.entry(*status).or_default() += 1;
                if let Some(cl) = content_length {
                    if *cl != *len as u64 {
                        v.push(format!(
                            "[{name}] ledger {id} ({m}): a {status} response delivered {len} body bytes of Content-Length {cl} as a success (silent short body)"
                        ));
                    }
                }
                if *status >= 400 && echo.is_none() {
                    // The origins of this file only answer 200s that echo the ledger id: any
                    // other error status came from edgepool (or an exit) and must say so.
                    v.push(format!(
                        "[{name}] ledger {id} ({m}): a {status} response without x-edgepool-error that no origin sent"
                    ));
                }
                if (200..300).contains(status) {
                    if seen == 0 {
                        v.push(format!(
                            "[{name}] ledger {id} ({m}): complete {status} response, but the origin never saw the request"
                        ));
                    } else if !answered.contains(&id) {
                        v.push(format!(
                            "[{name}] ledger {id} ({m}): complete {status} response, but the origin never answered it in full (it only broke it)"
                        ));
                    }
                    if echo.as_deref() != Some(id.to_string().as_str()) {
                        v.push(format!(
                            "[{name}] ledger {id} ({m}): the {status} response answers ledger id {echo:?}, not {id}"
                        ));
                    }
                }
            }
            Outcome::EdgeError {
                status,
                token,
                json_error,
                sent,
                body,
            } => {
                errors += 1;
                *tokens.entry(token.clone()).or_default() += 1;
                *statuses.entry(*status).or_default() += 1;
                if !c.tokens.is_empty() && !c.tokens.contains(&token.as_str()) {
                    v.push(format!(
                        "[{name}] ledger {id} ({m}): unexpected error {status} {token} (expected one of {:?}); body {body}",
                        c.tokens
                    ));
                }
                if json_error.as_deref() != Some(token.as_str()) {
                    v.push(format!(
                        "[{name}] ledger {id} ({m}): x-edgepool-error {token} but the JSON body's error is {json_error:?}; body {body}"
                    ));
                }
                match sent.as_deref() {
                    None => v.push(format!(
                        "[{name}] ledger {id} ({m}): edgepool error {status} {token} without request_sent in its JSON body: {body}"
                    )),
                    Some("none") => {
                        if seen > 0 {
                            v.push(format!(
                                "[{name}] ledger {id} ({m}): edgepool answered {status} {token} with request_sent=none, but the origin saw the request {seen} time(s)"
                            ));
                        }
                    }
                    Some("maybe") => {}
                    Some("complete") => {
                        if c.complete_implies_arrival && seen == 0 {
                            v.push(format!(
                                "[{name}] ledger {id} ({m}): {token} says request_sent=complete, but the origin never read the request"
                            ));
                        }
                    }
                    Some(other) => v.push(format!(
                        "[{name}] ledger {id} ({m}): request_sent={other:?} is not none|maybe|complete"
                    )),
                }
            }
            Outcome::Cut {
                status,
                got,
                content_length,
                why,
            } => {
                cut += 1;
                *statuses.entry(*status).or_default() += 1;
                if !c.allow_cut {
                    v.push(format!(
                        "[{name}] ledger {id} ({m}): the {status} response was cut after {got} of {content_length:?} bytes ({why}), in a scenario where no response was streaming"
                    ));
                }
            }
            Outcome::NoResponse(e) => {
                lost += 1;
                v.push(format!(
                    "[{name}] ledger {id} ({m}): dropped — the worker got no response at all ({e})"
                ));
            }
            Outcome::Hang(e) => {
                lost += 1;
                v.push(format!(
                    "[{name}] ledger {id} ({m}): HANG — no outcome within the limit ({e})"
                ));
            }
        }
        match req.method {
            M::Post if seen > 1 => {
                dup_post += 1;
                v.push(format!(
                    "[{name}] ledger {id} (POST): the origin received it {seen} times (a non-idempotent request was replayed)"
                ));
            }
            M::Get if seen > 2 => {
                dup_get += (seen - 1) as u64;
                v.push(format!(
                    "[{name}] ledger {id} (GET): the origin received it {seen} times (more than one retry)"
                ));
            }
            M::Get if seen == 2 => dup_get += 1,
            _ => {}
        }
    }
    if dup_get > c.retries {
        v.push(format!(
            "[{name}] {dup_get} GET(s) reached the origin twice, but edgepool counted only {} retries (edgepool_retries_total)",
            c.retries
        ));
    }
    let sent = c.results.len() as u64;
    let total_arrivals: usize = arrivals.values().sum();
    let tok: Vec<String> = tokens.iter().map(|(t, n)| format!("{t}={n}")).collect();
    let st: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}={n}")).collect();
    eprintln!(
        "ledger {name}: sent={sent} ok={ok} errors={errors} ({}) cut={cut} lost={lost} statuses=({}) origin_arrivals={total_arrivals} duplicates_get={dup_get} duplicates_post={dup_post} retries={} faults={}{}{} violations={}",
        tok.join(","),
        st.join(","),
        c.retries,
        c.faults,
        if c.extra.is_empty() { "" } else { " " },
        c.extra,
        v.len()
    );
    for line in &v {
        eprintln!("  VIOLATION {line}");
    }
    {
        let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        t.scenarios += 1;
        t.faults += c.faults;
        t.sent += sent;
        t.reconciled += sent;
        t.violations += v.len() as u64;
    }
    v
}

/// Every request of `name` must have ended as edgepool error `status` `token` — the documented
/// answer to the scenario's fault (docs/RELIABILITY.md), nothing else.
fn all_errors(name: &str, results: &[(Req, Outcome)], status: u16, token: &str) -> Vec<String> {
    let mut v = Vec::new();
    if results.is_empty() {
        v.push(format!("[{name}] no request was sent"));
    }
    for (req, out) in results {
        match out {
            Outcome::EdgeError {
                status: s,
                token: t,
                ..
            } if *s == status && t == token => {}
            other => v.push(format!(
                "[{name}] ledger {} ({}): expected {status} {token}, got {other:?}",
                req.id,
                req.method.as_str()
            )),
        }
    }
    v
}

/// Fails the test with every violation, after printing the running totals.
fn finish(test: &str, violations: Vec<String>) {
    print_totals(test);
    assert!(
        violations.is_empty(),
        "{test}: {} ledger violation(s):\n{}",
        violations.len(),
        violations.join("\n")
    );
}

/// `edgepool_retries_total` by reason.
async fn retries(gw: &TestGateway) -> BTreeMap<String, u64> {
    let m = gw.metrics().await;
    let mut out = BTreeMap::new();
    for line in m
        .lines()
        .filter(|l| l.starts_with("edgepool_retries_total"))
    {
        let reason = line
            .split("reason=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("")
            .to_string();
        let n = line
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        *out.entry(reason).or_default() += n;
    }
    out
}

fn retries_delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> (u64, String) {
    let mut total = 0;
    let mut parts = Vec::new();
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0);
        if d > 0 {
            total += d;
            parts.push(format!("{k}:{d}"));
        }
    }
    (total, parts.join("+"))
}

// ---------------------------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------------------------

fn header(h: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.to_string())
}

/// Sorts a finished response into an outcome.
fn classify(
    status: u16,
    token: Option<String>,
    content_length: Option<u64>,
    echo: Option<String>,
    body: &[u8],
) -> Outcome {
    if let Some(token) = token {
        let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let field = |k: &str| {
            json.as_ref()
                .and_then(|j| j.get(k))
                .and_then(|v| v.as_str())
                .map(|s| s.to_string())
        };
        return Outcome::EdgeError {
            status,
            token,
            json_error: field("error"),
            sent: field("request_sent"),
            body: String::from_utf8_lossy(body).trim_end().to_string(),
        };
    }
    let echo = echo.or_else(|| {
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|j| j["headers"]["x-ledger-id"].as_str().map(|s| s.to_string()))
    });
    Outcome::Complete {
        status,
        len: body.len(),
        content_length,
        echo,
    }
}

/// One request through a reqwest worker, body streamed to its end.
async fn exec(client: &reqwest::Client, r: &Req) -> Outcome {
    let fut = async {
        let b = match r.method {
            M::Get => client.get(&r.url),
            M::Post => client.post(&r.url).body(post_body(r.id)),
        };
        let mut resp = match b.header("x-ledger-id", r.id.to_string()).send().await {
            Ok(resp) => resp,
            Err(e) => return Outcome::NoResponse(format!("{e:?}")),
        };
        let status = resp.status().as_u16();
        let h = resp.headers().clone();
        let cl = header(&h, "content-length").and_then(|v| v.parse::<u64>().ok());
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => body.extend_from_slice(&c),
                Ok(None) => break,
                Err(e) => {
                    return Outcome::Cut {
                        status,
                        got: body.len(),
                        content_length: cl,
                        why: format!("{e:?}"),
                    }
                }
            }
        }
        classify(
            status,
            header(&h, "x-edgepool-error"),
            cl,
            header(&h, "x-ledger-echo"),
            &body,
        )
    };
    match tokio::time::timeout(HANG, fut).await {
        Ok(o) => o,
        Err(_) => Outcome::Hang(format!("reqwest worker, {HANG:?}")),
    }
}

/// Runs `reqs` through `client`, at most `parallel` at a time; results in ledger order.
async fn run(client: &reqwest::Client, reqs: Vec<Req>, parallel: usize) -> Vec<(Req, Outcome)> {
    let sem = Arc::new(Semaphore::new(parallel.max(1)));
    let mut set = JoinSet::new();
    for r in reqs {
        let client = client.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _p = sem.acquire_owned().await.unwrap();
            let o = exec(&client, &r).await;
            (r, o)
        });
    }
    let mut out = Vec::new();
    while let Some(res) = set.join_next().await {
        out.push(res.expect("worker task"));
    }
    out.sort_by_key(|(r, _)| r.id);
    out
}

/// One request through a raw TCP worker talking to the proxy listener: absolute-form for
/// `http://` URLs, `CONNECT` for `connect://host:port`. The response is read byte by byte
/// against its framing, so a short body is seen exactly.
async fn raw_exec(proxy: SocketAddr, r: &Req) -> Outcome {
    let fut = async {
        let mut s = match TcpStream::connect(proxy).await {
            Ok(s) => s,
            Err(e) => return Outcome::NoResponse(format!("connect to the proxy: {e}")),
        };
        let _ = s.set_nodelay(true);
        let (connect, head) = if let Some(target) = r.url.strip_prefix("connect://") {
            (
                true,
                format!(
                    "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nx-ledger-id: {}\r\n\r\n",
                    r.id
                ),
            )
        } else {
            let authority = r
                .url
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or("")
                .to_string();
            let body = match r.method {
                M::Get => Vec::new(),
                M::Post => post_body(r.id),
            };
            let mut head = format!(
                "{} {} HTTP/1.1\r\nHost: {authority}\r\nx-ledger-id: {}\r\n",
                r.method.as_str(),
                r.url,
                r.id
            );
            if !body.is_empty() {
                head.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
            head.push_str("\r\n");
            let mut h = head.into_bytes();
            h.extend_from_slice(&body);
            (false, String::from_utf8_lossy(&h).into_owned())
        };
        if let Err(e) = s.write_all(head.as_bytes()).await {
            return Outcome::NoResponse(format!("writing the request: {e}"));
        }
        read_raw_response(&mut s, connect).await
    };
    match tokio::time::timeout(HANG, fut).await {
        Ok(o) => o,
        Err(_) => Outcome::Hang(format!("raw worker, {HANG:?}")),
    }
}

async fn read_raw_response(s: &mut TcpStream, connect: bool) -> Outcome {
    let mut buf: Vec<u8> = Vec::new();
    let mut tmp = vec![0u8; 16 * 1024];
    let (status, headers, head_len) = loop {
        let parsed = {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut hs);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Vec<(String, String)> = resp
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).trim().to_string(),
                            )
                        })
                        .collect();
                    Some((resp.code.unwrap_or(0), headers, n))
                }
                Ok(httparse::Status::Partial) => None,
                Err(e) => {
                    return Outcome::NoResponse(format!(
                        "unparseable response head ({e}): {:?}",
                        String::from_utf8_lossy(&buf)
                    ))
                }
            }
        };
        if let Some(p) = parsed {
            break p;
        }
        match tokio::time::timeout(RAW_READ, s.read(&mut tmp)).await {
            Err(_) => return Outcome::Hang("no response head".into()),
            Ok(Ok(0)) => return Outcome::NoResponse("connection closed before a head".into()),
            Ok(Err(e)) => return Outcome::NoResponse(format!("before a head: {e}")),
            Ok(Ok(n)) => buf.extend_from_slice(&tmp[..n]),
        }
    };
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = buf[head_len..].to_vec();
    if connect && (200..300).contains(&status) {
        return Outcome::Complete {
            status,
            len: 0,
            content_length: None,
            echo: None,
        };
    }
    let cl = get("content-length").and_then(|v| v.parse::<u64>().ok());
    let chunked =
        get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    loop {
        if let Some(cl) = cl {
            if body.len() as u64 >= cl {
                body.truncate(cl as usize);
                break;
            }
        } else if chunked && body.ends_with(b"0\r\n\r\n") {
            break;
        }
        match tokio::time::timeout(RAW_READ, s.read(&mut tmp)).await {
            Err(_) => {
                return Outcome::Hang(format!(
                    "status {status}: {} body bytes of {cl:?}, then nothing for {RAW_READ:?} and the connection stayed open",
                    body.len()
                ))
            }
            Ok(Ok(0)) if cl.is_none() && !chunked => break,
            Ok(Ok(0)) => {
                return Outcome::Cut {
                    status,
                    got: body.len(),
                    content_length: cl,
                    why: "EOF before the end of the body".into(),
                }
            }
            Ok(Err(e)) => {
                return Outcome::Cut {
                    status,
                    got: body.len(),
                    content_length: cl,
                    why: format!("read error: {e}"),
                }
            }
            Ok(Ok(n)) => body.extend_from_slice(&tmp[..n]),
        }
    }
    classify(
        status,
        get("x-edgepool-error"),
        cl,
        get("x-ledger-echo"),
        &body,
    )
}

async fn run_raw(proxy: SocketAddr, reqs: Vec<Req>, parallel: usize) -> Vec<(Req, Outcome)> {
    let sem = Arc::new(Semaphore::new(parallel.max(1)));
    let mut set = JoinSet::new();
    for r in reqs {
        let sem = sem.clone();
        set.spawn(async move {
            let _p = sem.acquire_owned().await.unwrap();
            let o = raw_exec(proxy, &r).await;
            (r, o)
        });
    }
    let mut out = Vec::new();
    while let Some(res) = set.join_next().await {
        out.push(res.expect("raw worker task"));
    }
    out.sort_by_key(|(r, _)| r.id);
    out
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 origin with scripted faults
// ---------------------------------------------------------------------------------------------

/// What the raw origin does with one request it has read in full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    /// A complete 200 with Content-Length; the connection stays open.
    Ok,
    /// A complete 200, then (after the given milliseconds) SO_LINGER 0 + close: the idle
    /// keep-alive connection is reset.
    OkThenRst(u64),
    /// No answer: SO_LINGER 0 + close (RST).
    Rst,
    /// Stop listening (new connects are refused), then reset this connection.
    RstAndDie,
    /// The head (Content-Length `len`) and `part` body bytes, then RST.
    PartialRst { len: usize, part: usize },
    /// The head (Content-Length `len`) and `part` body bytes, then FIN.
    PartialFin { len: usize, part: usize },
    /// Read it and answer nothing; the connection is held open.
    Stall,
    /// `garbage\r\n\r\n`, then close.
    Junk,
}

/// A request as the raw origin saw it.
#[derive(Clone, Debug)]
struct Seen {
    ledger: Option<u64>,
    method: String,
    /// 1-based connection number.
    conn: u64,
    /// 1-based index of the request on its connection.
    idx: u64,
}

type Plan = Arc<dyn Fn(&Seen) -> Act + Send + Sync>;

struct RawState {
    plan: Plan,
    seen: Mutex<Vec<(Seen, Act)>>,
    faults: AtomicU64,
    accepted: AtomicU64,
    held: Mutex<Vec<TcpStream>>,
    listener: Mutex<Option<socket2::Socket>>,
    dead: AtomicBool,
}

struct RawOrigin {
    addr: SocketAddr,
    st: Arc<RawState>,
    task: JoinHandle<()>,
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawOrigin {
    async fn start(plan: impl Fn(&Seen) -> Act + Send + Sync + 'static) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dup = socket2::SockRef::from(&listener).try_clone().ok();
        let st = Arc::new(RawState {
            plan: Arc::new(plan),
            seen: Mutex::new(Vec::new()),
            faults: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            held: Mutex::new(Vec::new()),
            listener: Mutex::new(dup),
            dead: AtomicBool::new(false),
        });
        let st2 = st.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            let mut n = 0u64;
            loop {
                while conns.try_join_next().is_some() {}
                match listener.accept().await {
                    Ok((s, _)) => {
                        if st2.dead.load(Ordering::SeqCst) {
                            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                            continue;
                        }
                        n += 1;
                        st2.accepted.fetch_add(1, Ordering::SeqCst);
                        conns.spawn(raw_conn(s, n, st2.clone()));
                    }
                    Err(_) if st2.dead.load(Ordering::SeqCst) => {
                        // Keep the connection tasks running; accept no more.
                        std::future::pending::<()>().await;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        RawOrigin { addr, st, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.st
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|(s, act)| Arrival {
                ledger: s.ledger,
                full_response: Some(matches!(act, Act::Ok | Act::OkThenRst(_))),
            })
            .collect()
    }

    fn acts(&self) -> Vec<(Seen, Act)> {
        self.st.seen.lock().unwrap().clone()
    }

    fn faults(&self) -> u64 {
        self.st.faults.load(Ordering::SeqCst)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn ok_response(seen: &Seen) -> Vec<u8> {
    let ledger = seen
        .ledger
        .map(|l| l.to_string())
        .unwrap_or_else(|| "none".into());
    let mut body = format!(
        "ledger={ledger} method={} conn={} idx={}\n",
        seen.method, seen.conn, seen.idx
    );
    let pad = seen.ledger.unwrap_or(0) % 5 * 97;
    body.push_str(&"o".repeat(pad as usize));
    body.push('\n');
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-ledger-echo: {ledger}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

fn partial_head(seen: &Seen, len: usize, part: usize) -> Vec<u8> {
    let ledger = seen
        .ledger
        .map(|l| l.to_string())
        .unwrap_or_else(|| "none".into());
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {len}\r\nx-ledger-echo: {ledger}\r\n\r\n"
    )
    .into_bytes();
    out.extend(std::iter::repeat_n(b'p', part));
    out
}

fn rst(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

async fn raw_conn(mut s: TcpStream, conn: u64, st: Arc<RawState>) {
    let _ = s.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(8192);
    let mut idx = 0u64;
    loop {
        let head_end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            match tokio::time::timeout(Duration::from_secs(60), s.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        };
        let (method, ledger, cl) = {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut hs);
            match req.parse(&buf[..head_end]) {
                Ok(httparse::Status::Complete(_)) => {}
                _ => return,
            }
            let get = |n: &str| {
                req.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(n))
                    .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
            };
            (
                req.method.unwrap_or("").to_string(),
                get("x-ledger-id").and_then(|v| v.parse::<u64>().ok()),
                get("content-length")
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0),
            )
        };
        buf.advance(head_end);
        while buf.len() < cl {
            match tokio::time::timeout(Duration::from_secs(30), s.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
        buf.advance(cl);
        idx += 1;
        let seen = Seen {
            ledger,
            method,
            conn,
            idx,
        };
        let act = (st.plan)(&seen);
        // Recorded before the fault: the origin read this request, whatever happens next.
        st.seen.lock().unwrap().push((seen.clone(), act));
        if act != Act::Ok {
            st.faults.fetch_add(1, Ordering::SeqCst);
        }
        match act {
            Act::Ok => {
                if s.write_all(&ok_response(&seen)).await.is_err() {
                    return;
                }
            }
            Act::OkThenRst(ms) => {
                let _ = s.write_all(&ok_response(&seen)).await;
                tokio::time::sleep(Duration::from_millis(ms.max(1))).await;
                return rst(s);
            }
            Act::Rst => return rst(s),
            Act::RstAndDie => {
                st.dead.store(true, Ordering::SeqCst);
                if let Some(l) = st.listener.lock().unwrap().take() {
                    let _ = l.shutdown(std::net::Shutdown::Both);
                }
                return rst(s);
            }
            Act::PartialRst { len, part } => {
                let _ = s.write_all(&partial_head(&seen, len, part)).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
                return rst(s);
            }
            Act::PartialFin { len, part } => {
                let _ = s.write_all(&partial_head(&seen, len, part)).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
                let _ = s.shutdown().await;
                tokio::time::sleep(Duration::from_millis(30)).await;
                return;
            }
            Act::Stall => {
                st.held.lock().unwrap().push(s);
                return;
            }
            Act::Junk => {
                let _ = s.write_all(b"garbage\r\n\r\n").await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scripted HTTP/2 origin (TLS, ALPN h2 only): REFUSED_STREAM, and GOAWAY below in-flight streams
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum H2Fault {
    /// Connection 1 runs through a frame relay that, once `trigger` client streams were seen
    /// (or 500 ms after the first), injects `GOAWAY(last_stream_id = 2*keep-1, NO_ERROR)`.
    /// Streams above it are read but never processed or answered (as the GOAWAY promises);
    /// streams at or below it are answered once the GOAWAY went out.
    Goaway { keep: u32, trigger: usize },
    /// The first attempt of every even ledger id is refused with RST_STREAM(REFUSED_STREAM)
    /// before its body is read.
    RefuseEvenOnce,
}

#[derive(Default)]
struct H2Log {
    /// Processed (and answered) requests.
    arrivals: Vec<Arrival>,
    /// Streams read but declared unprocessed: (ledger id, why, connection, stream id).
    unprocessed: Vec<(Option<u64>, &'static str, u64, u32)>,
    refused_ids: HashSet<u64>,
}

struct H2State {
    fault: H2Fault,
    conns: AtomicU64,
    goaways: AtomicU64,
    log: Mutex<H2Log>,
}

struct H2Origin {
    addr: SocketAddr,
    ca: TestCa,
    st: Arc<H2State>,
    task: JoinHandle<()>,
}

impl Drop for H2Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct GoawayCtl {
    cutoff: u32,
    trigger: usize,
    inject: tokio::sync::Notify,
    injected: tokio::sync::watch::Sender<bool>,
}

impl H2Origin {
    async fn start(fault: H2Fault) -> H2Origin {
        let ca = TestCa::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(
            ca.server_config(&["localhost", "127.0.0.1"], &[b"h2"]),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = Arc::new(H2State {
            fault,
            conns: AtomicU64::new(0),
            goaways: AtomicU64::new(0),
            log: Mutex::new(H2Log::default()),
        });
        let st2 = st.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                while conns.try_join_next().is_some() {}
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let n = st2.conns.fetch_add(1, Ordering::SeqCst) + 1;
                let acceptor = acceptor.clone();
                let st = st2.clone();
                conns.spawn(async move {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    match st.fault {
                        H2Fault::Goaway { keep, trigger } if n == 1 => {
                            relay_goaway(tls, n, st, keep, trigger).await
                        }
                        _ => serve_h2(tls, n, st, None).await,
                    }
                });
            }
        });
        H2Origin { addr, ca, st, task }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{}", self.addr.port(), path)
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.st.log.lock().unwrap().arrivals.clone()
    }

    fn unprocessed(&self) -> Vec<(Option<u64>, &'static str, u64, u32)> {
        self.st.log.lock().unwrap().unprocessed.clone()
    }
}

async fn serve_h2<S>(io: S, conn: u64, st: Arc<H2State>, ga: Option<Arc<GoawayCtl>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(mut c) = h2::server::handshake(io).await else {
        return;
    };
    let mut streams = JoinSet::new();
    while let Some(res) = c.accept().await {
        let Ok((req, respond)) = res else { break };
        streams.spawn(h2_stream(req, respond, conn, st.clone(), ga.clone()));
        while streams.try_join_next().is_some() {}
    }
}

async fn h2_stream(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    conn: u64,
    st: Arc<H2State>,
    ga: Option<Arc<GoawayCtl>>,
) {
    let sid: u32 = respond.stream_id().into();
    let ledger: Option<u64> = req
        .headers()
        .get("x-ledger-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let method = req.method().to_string();
    if let Some(g) = &ga {
        if sid > g.cutoff {
            st.log
                .lock()
                .unwrap()
                .unprocessed
                .push((ledger, "goaway", conn, sid));
            // Above the GOAWAY's last stream id: never processed, never answered.
            let _hold = (req, respond);
            std::future::pending::<()>().await;
            return;
        }
        let mut rx = g.injected.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(3), rx.wait_for(|v| *v)).await;
    }
    if st.fault == H2Fault::RefuseEvenOnce {
        if let Some(l) = ledger.filter(|l| l % 2 == 0) {
            let first = st.log.lock().unwrap().refused_ids.insert(l);
            if first {
                st.log
                    .lock()
                    .unwrap()
                    .unprocessed
                    .push((ledger, "refused_stream", conn, sid));
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                return;
            }
        }
    }
    let (_parts, mut body) = req.into_parts();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(c) => {
                let _ = body.flow_control().release_capacity(c.len());
            }
            Err(_) => return,
        }
    }
    st.log.lock().unwrap().arrivals.push(Arrival {
        ledger,
        full_response: Some(true),
    });
    let l = ledger
        .map(|l| l.to_string())
        .unwrap_or_else(|| "none".into());
    let text = format!("ledger={l} method={method} conn={conn} stream={sid}\n");
    let resp = http::Response::builder()
        .status(200)
        .header("content-type", "text/plain")
        .header("content-length", text.len())
        .header("x-ledger-echo", l)
        .body(())
        .unwrap();
    let Ok(mut send) = respond.send_response(resp, false) else {
        return;
    };
    let _ = send.send_data(Bytes::from(text), true);
}

/// HTTP/2 frames of `buf` that are complete: (type, stream id, total length).
fn next_frame(buf: &[u8]) -> Option<(u8, u32, usize)> {
    if buf.len() < 9 {
        return None;
    }
    let len = ((buf[0] as usize) << 16) | ((buf[1] as usize) << 8) | buf[2] as usize;
    if buf.len() < 9 + len {
        return None;
    }
    let sid = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
    Some((buf[3], sid, 9 + len))
}

async fn relay_goaway(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    conn: u64,
    st: Arc<H2State>,
    keep: u32,
    trigger: usize,
) {
    let (tx, _rx) = tokio::sync::watch::channel(false);
    let ctl = Arc::new(GoawayCtl {
        cutoff: 2 * keep - 1,
        trigger,
        inject: tokio::sync::Notify::new(),
        injected: tx,
    });
    let (outer, inner) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(serve_h2(inner, conn, st.clone(), Some(ctl.clone())));
    let (mut tr, mut tw) = tokio::io::split(tls);
    let (mut dr, mut dw) = tokio::io::split(outer);
    let ctl_c = ctl.clone();
    // Client -> server: bytes pass unchanged; HEADERS frames opening new streams are counted.
    let c2s = async move {
        let mut parse = BytesMut::new();
        let mut preface = 24usize;
        let mut seen = 0usize;
        let mut max_sid = 0u32;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match tr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            parse.extend_from_slice(&buf[..n]);
            if preface > 0 {
                let k = preface.min(parse.len());
                parse.advance(k);
                preface -= k;
            }
            while let Some((ty, sid, total)) = next_frame(&parse) {
                if ty == 0x1 && sid > max_sid {
                    max_sid = sid;
                    seen += 1;
                    if seen == 1 {
                        let c = ctl_c.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            c.inject.notify_one();
                        });
                    }
                    if seen == ctl_c.trigger {
                        ctl_c.inject.notify_one();
                    }
                }
                parse.advance(total);
            }
            if dw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = dw.shutdown().await;
    };
    // Server -> client: whole frames only, so the GOAWAY lands on a frame boundary; after it,
    // frames of streams above the cutoff are dropped (the client closed them).
    let st2 = st.clone();
    let s2c = async move {
        let mut parse = BytesMut::new();
        let mut injected = false;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                r = dr.read(&mut buf) => {
                    let n = match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    parse.extend_from_slice(&buf[..n]);
                    let mut out = Vec::new();
                    while let Some((_ty, sid, total)) = next_frame(&parse) {
                        if !(injected && sid > ctl.cutoff) {
                            out.extend_from_slice(&parse[..total]);
                        }
                        parse.advance(total);
                    }
                    if tw.write_all(&out).await.is_err() || tw.flush().await.is_err() {
                        break;
                    }
                }
                _ = ctl.inject.notified(), if !injected => {
                    injected = true;
                    let mut f = vec![0, 0, 8, 0x7, 0, 0, 0, 0, 0];
                    f.extend_from_slice(&ctl.cutoff.to_be_bytes());
                    f.extend_from_slice(&0u32.to_be_bytes());
                    if tw.write_all(&f).await.is_err() || tw.flush().await.is_err() {
                        break;
                    }
                    st2.goaways.fetch_add(1, Ordering::SeqCst);
                    let _ = ctl.injected.send(true);
                }
            }
        }
        let _ = tw.shutdown().await;
    };
    tokio::join!(c2s, s2c);
    server.abort();
}

// ---------------------------------------------------------------------------------------------
// Scenarios: connect-level faults
// ---------------------------------------------------------------------------------------------

#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn ledger_connect_refused_timeout_and_dns() {
    let mut violations = Vec::new();

    // Refused connect: a port nothing listens on.
    {
        let dead = support::free_port();
        let gw = TestGateway::start(&[]).await;
        let before = retries(&gw).await;
        let reqs = mixed(20, &format!("http://127.0.0.1:{dead}/echo"));
        let results = run(&gw.client(), reqs, 5).await;
        let (r, why) = retries_delta(&before, &retries(&gw).await);
        violations.extend(all_errors(
            "connect_refused",
            &results,
            502,
            "upstream_connect_failed",
        ));
        violations.extend(reconcile(Check {
            name: "connect_refused",
            faults: results.len() as u64,
            results: &results,
            arrivals: Vec::new(),
            retries: r,
            allow_cut: false,
            tokens: &["upstream_connect_failed"],
            complete_implies_arrival: true,
            extra: format!("retry_reasons=({why})"),
        }));
        gw.stop().await;
    }

    // Connect timeout: a listener with backlog 0 that never accepts, its queue filled first,
    // so further SYNs are dropped by the kernel.
    {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        sock.listen(0).expect("listen");
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        let mut blackholed = false;
        for _ in 0..16 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(250)) {
                Ok(s) => fillers.push(s),
                Err(_) => {
                    blackholed = true;
                    break;
                }
            }
        }
        // On Linux a listener whose accept queue (backlog 0: one connection) is full drops
        // further SYNs, so this holds; elsewhere the scenario cannot be built on loopback and
        // says so (a failure under CI).
        if !blackholed {
            support::skip(&format!(
                "ledger connect_timeout: on this kernel a never-accepting listener with a full \
                 backlog still completes handshakes ({} fillers connected), so a connect timeout \
                 cannot be produced on loopback",
                fillers.len()
            ));
        } else {
            let gw = TestGateway::start_with(&[], |c| {
                c.upstream.connect_timeout = Duration::from_millis(300);
            })
            .await;
            let before = retries(&gw).await;
            let reqs = mixed(10, &format!("http://{addr}/echo"));
            let t0 = Instant::now();
            let results = run(&gw.client(), reqs, 5).await;
            let took = t0.elapsed();
            let (r, why) = retries_delta(&before, &retries(&gw).await);
            // docs/RELIABILITY.md: 10 × 504 `upstream_connect_timeout`, exactly.
            violations.extend(all_errors(
                "connect_timeout",
                &results,
                504,
                "upstream_connect_timeout",
            ));
            violations.extend(reconcile(Check {
                name: "connect_timeout",
                faults: results.len() as u64,
                results: &results,
                arrivals: Vec::new(),
                retries: r,
                allow_cut: false,
                tokens: &["upstream_connect_timeout"],
                complete_implies_arrival: true,
                extra: format!(
                    "fillers={} took_ms={} retry_reasons=({why})",
                    fillers.len(),
                    took.as_millis()
                ),
            }));
            gw.stop().await;
        }
        drop(fillers);
        drop(sock);
    }

    // DNS failure: names under `.invalid` (RFC 6761: never resolve; answered locally).
    {
        let gw = TestGateway::start(&[]).await;
        let before = retries(&gw).await;
        let reqs = mixed(10, "http://ledger-nowhere.invalid/echo");
        let mut results = run(&gw.client(), reqs, 5).await;
        // CONNECT to an unresolvable name is refused at CONNECT, with a body a raw worker reads.
        let raw = vec![
            Req::new(M::Get, "connect://ledger-nowhere.invalid:443"),
            Req::new(M::Get, "connect://ledger-other.invalid:443"),
        ];
        results.extend(run_raw(gw.proxy, raw, 2).await);
        let (r, why) = retries_delta(&before, &retries(&gw).await);
        violations.extend(reconcile(Check {
            name: "dns_failure",
            faults: results.len() as u64,
            results: &results,
            arrivals: Vec::new(),
            retries: r,
            allow_cut: false,
            tokens: &["dns_failed"],
            complete_implies_arrival: true,
            extra: format!("retry_reasons=({why})"),
        }));
        gw.stop().await;
    }
    finish("ledger_connect_refused_timeout_and_dns", violations);
}

#[tokio::test]
async fn ledger_untrusted_tls_certificate() {
    let mut violations = Vec::new();
    // The origin's CA is NOT given to the gateway.
    let origin = Origin::start(OriginConfig {
        tls: true,
        ..Default::default()
    })
    .await;
    let gw = TestGateway::start(&[]).await;
    let before = retries(&gw).await;
    let worker = gw.client();
    let mut results = Vec::new();
    let mut extra_handshakes = Vec::new();
    for req in mixed(10, &origin.url("/echo")) {
        let accepted_before = origin.accepted();
        let out = exec(&worker, &req).await;
        // Let a (wrong) second dial show up before counting.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let d = origin.accepted() - accepted_before;
        if d > 1 {
            extra_handshakes.push(format!("ledger {} saw {d} handshakes", req.id));
        }
        if let Outcome::Complete { status, .. } = &out {
            violations.push(format!(
                "[tls_untrusted] ledger {} ({}): the worker got a complete {status} (the untrusted origin's page behind edgepool's CA), not an error",
                req.id,
                req.method.as_str()
            ));
        }
        results.push((req, out));
    }
    for e in &extra_handshakes {
        violations.push(format!("[tls_untrusted] retried TLS failure: {e}"));
    }
    if origin.requests() != 0 {
        violations.push(format!(
            "[tls_untrusted] the untrusted origin received {} request(s)",
            origin.requests()
        ));
    }
    let (r, why) = retries_delta(&before, &retries(&gw).await);
    violations.extend(reconcile(Check {
        name: "tls_untrusted",
        faults: results.len() as u64,
        results: &results,
        arrivals: arrivals_of(&origin),
        retries: r,
        allow_cut: false,
        tokens: &["upstream_tls_failed"],
        complete_implies_arrival: true,
        extra: format!(
            "origin_handshakes={} origin_requests={} retry_reasons=({why})",
            origin.accepted(),
            origin.requests()
        ),
    }));
    gw.stop().await;
    finish("ledger_untrusted_tls_certificate", violations);
}

/// `upstream.tls_handshake_timeout`: a target that accepts TCP and never answers the
/// ClientHello. docs/RELIABILITY.md: 504 `upstream_connect_timeout` (a TLS handshake that
/// times out is reported like a connect that does), nothing reaches a target.
#[tokio::test]
async fn ledger_tls_handshake_timeout() {
    let mut violations = Vec::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let silent = {
        let (accepted, held) = (accepted.clone(), held.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                // Read nothing, answer nothing: the handshake stalls until edgepool gives up.
                held.lock().unwrap().push(s);
            }
        })
    };
    let gw = TestGateway::start_with(&[], |c| {
        c.upstream.tls_handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let before = retries(&gw).await;
    let reqs = mixed(6, &format!("https://localhost:{}/echo", addr.port()));
    let results = run(&gw.client(), reqs, 3).await;
    let (r, why) = retries_delta(&before, &retries(&gw).await);
    // The fault happened: edgepool's TCP connects were accepted (so the timeout is the TLS
    // handshake's, not the connect's).
    let conns = accepted.load(Ordering::SeqCst);
    if conns == 0 {
        violations.push(
            "[tls_handshake_timeout] no TCP connection reached the silent target: the fault \
             never happened"
                .to_string(),
        );
    }
    violations.extend(all_errors(
        "tls_handshake_timeout",
        &results,
        504,
        "upstream_connect_timeout",
    ));
    violations.extend(reconcile(Check {
        name: "tls_handshake_timeout",
        faults: conns,
        results: &results,
        arrivals: Vec::new(),
        retries: r,
        allow_cut: false,
        tokens: &["upstream_connect_timeout"],
        complete_implies_arrival: true,
        extra: format!("silent_target_conns={conns} retry_reasons=({why})"),
    }));
    gw.stop().await;
    silent.abort();
    finish("ledger_tls_handshake_timeout", violations);
}

// ---------------------------------------------------------------------------------------------
// Scenarios: resets
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ledger_resets_idle_after_request_and_origin_gone() {
    let mut violations = Vec::new();

    // RST of an idle keep-alive connection right after its first response: the next request
    // may be written onto a connection the origin already reset.
    {
        let origin = RawOrigin::start(|s| Act::OkThenRst(1 + s.ledger.unwrap_or(0) % 4 * 3)).await;
        let gw = TestGateway::start(&[]).await;
        let before = retries(&gw).await;
        let results = run(&gw.client(), mixed(40, &origin.url("/idle")), 1).await;
        let (r, why) = retries_delta(&before, &retries(&gw).await);
        // The fault happened: every request the origin read was answered, then its connection
        // reset (one reset per arrival), and edgepool had to open more than one connection.
        let resets = origin.faults();
        let conns = origin.st.accepted.load(Ordering::SeqCst);
        if resets == 0 || resets != origin.acts().len() as u64 || conns < 2 {
            violations.push(format!(
                "[rst_idle_reused] the fault did not happen as scripted: {resets} resets for {} \
                 arrivals on {conns} connections",
                origin.acts().len()
            ));
        }
        violations.extend(reconcile(Check {
            name: "rst_idle_reused",
            faults: origin.faults(),
            results: &results,
            arrivals: origin.arrivals(),
            retries: r,
            allow_cut: false,
            tokens: &["upstream_request_failed", "upstream_failed_not_replayed"],
            complete_implies_arrival: true,
            extra: format!(
                "origin_conns={} retry_reasons=({why})",
                origin.st.accepted.load(Ordering::SeqCst)
            ),
        }));
        gw.stop().await;
    }

    // RST after the request was read: every request on a reused connection (index >= 2), and
    // every third ledger id even on a fresh connection.
    {
        let origin = RawOrigin::start(|s| {
            if s.idx >= 2 || s.ledger.unwrap_or(0) % 3 == 0 {
                Act::Rst
            } else {
                Act::Ok
            }
        })
        .await;
        let gw = TestGateway::start(&[]).await;
        let before = retries(&gw).await;
        let results = run(&gw.client(), mixed(40, &origin.url("/rst-after")), 3).await;
        let (r, why) = retries_delta(&before, &retries(&gw).await);
        // The faults happened, both kinds: a reset on a reused connection and one on a fresh.
        let acts = origin.acts();
        let reused_rst = acts
            .iter()
            .filter(|(s, a)| *a == Act::Rst && s.idx >= 2)
            .count();
        let fresh_rst = acts
            .iter()
            .filter(|(s, a)| *a == Act::Rst && s.idx == 1)
            .count();
        if reused_rst == 0 || fresh_rst == 0 {
            violations.push(format!(
                "[rst_after_request] the faults did not happen: {reused_rst} resets on reused \
                 connections, {fresh_rst} on fresh ones"
            ));
        }
        // Sharper than the generic rules: a POST whose only arrival was reset must be an error.
        for (req, out) in &results {
            let acts: Vec<Act> = origin
                .acts()
                .iter()
                .filter(|(s, _)| s.ledger == Some(req.id))
                .map(|(_, a)| *a)
                .collect();
            if req.method == M::Post
                && acts == [Act::Rst]
                && !matches!(out, Outcome::EdgeError { .. })
            {
                violations.push(format!(
                    "[rst_after_request] ledger {} (POST): the origin reset it, yet the worker got {out:?}",
                    req.id
                ));
            }
        }
        violations.extend(reconcile(Check {
            name: "rst_after_request",
            faults: origin.faults(),
            results: &results,
            arrivals: origin.arrivals(),
            retries: r,
            allow_cut: false,
            tokens: &["upstream_request_failed", "upstream_failed_not_replayed"],
            complete_implies_arrival: true,
            extra: format!(
                "origin_conns={} retry_reasons=({why})",
                origin.st.accepted.load(Ordering::SeqCst)
            ),
        }));
        gw.stop().await;
    }

    // RST after the request was read on a reused connection, and the origin stops listening
    // at the same moment: a GET's retry cannot connect. The origin DID see the request.
    {
        let gw = TestGateway::start(&[]).await;
        let before = retries(&gw).await;
        let mut results = Vec::new();
        let mut arrivals = Vec::new();
        let mut faults = 0;
        for k in 0..6 {
            let origin =
                RawOrigin::start(|s| if s.idx >= 2 { Act::RstAndDie } else { Act::Ok }).await;
            let worker = gw.client();
            let warm = Req::new(M::Get, origin.url("/warm"));
            let out = exec(&worker, &warm).await;
            results.push((warm, out));
            let m = if k % 2 == 0 { M::Get } else { M::Post };
            let req = Req::new(m, origin.url("/then-gone"));
            let out = exec(&worker, &req).await;
            results.push((req, out));
            arrivals.extend(origin.arrivals());
            faults += origin.faults();
        }
        let (r, why) = retries_delta(&before, &retries(&gw).await);
        // Each of the 6 origins reset the second request and died.
        if faults != 6 {
            violations.push(format!(
                "[rst_then_origin_gone] {faults} of 6 origins reset-and-died: the fault did not \
                 happen as scripted"
            ));
        }
        violations.extend(reconcile(Check {
            name: "rst_then_origin_gone",
            faults,
            results: &results,
            arrivals,
            retries: r,
            allow_cut: false,
            tokens: &[
                "upstream_request_failed",
                "upstream_failed_not_replayed",
                "upstream_connect_failed",
            ],
            complete_implies_arrival: true,
            extra: format!("retry_reasons=({why})"),
        }));
        gw.stop().await;
    }
    finish(
        "ledger_resets_idle_after_request_and_origin_gone",
        violations,
    );
}

#[tokio::test]
async fn ledger_cut_mid_body() {
    let mut violations = Vec::new();
    // Every 4th ledger id: head + 300 of 5000 bytes, then RST; id % 4 == 2: same, then FIN.
    let plan = |s: &Seen| match s.ledger.unwrap_or(0) % 4 {
        0 => Act::PartialRst {
            len: 5000,
            part: 300,
        },
        2 => Act::PartialFin {
            len: 5000,
            part: 300,
        },
        _ => Act::Ok,
    };
    for (name, raw) in [("cut_mid_body", false), ("cut_mid_body_raw", true)] {
        let origin = RawOrigin::start(plan).await;
        let gw = TestGateway::start(&[]).await;
        let before = retries(&gw).await;
        let reqs = mixed(if raw { 12 } else { 24 }, &origin.url("/partial"));
        let results = if raw {
            run_raw(gw.proxy, reqs, 3).await
        } else {
            run(&gw.client(), reqs, 3).await
        };
        let (r, why) = retries_delta(&before, &retries(&gw).await);
        // Invariant 4, per ledger id: a response the origin broke off never reads as complete.
        let acts = origin.acts();
        let mut cut_ids = 0;
        for (req, out) in &results {
            let partial = acts.iter().any(|(s, a)| {
                s.ledger == Some(req.id)
                    && matches!(a, Act::PartialRst { .. } | Act::PartialFin { .. })
            });
            if partial {
                cut_ids += 1;
                if let Outcome::Complete { status, len, .. } = out {
                    violations.push(format!(
                        "[{name}] ledger {} ({}): the origin sent 300 of 5000 body bytes, but the worker read a complete {status} response of {len} bytes",
                        req.id,
                        req.method.as_str()
                    ));
                }
            }
        }
        // The faults happened, both kinds: bodies cut by RST and by FIN.
        let by_rst = acts
            .iter()
            .filter(|(_, a)| matches!(a, Act::PartialRst { .. }))
            .count();
        let by_fin = acts
            .iter()
            .filter(|(_, a)| matches!(a, Act::PartialFin { .. }))
            .count();
        if by_rst == 0 || by_fin == 0 || cut_ids == 0 {
            violations.push(format!(
                "[{name}] the faults did not happen: {by_rst} bodies cut by RST, {by_fin} by FIN, \
                 {cut_ids} requests affected"
            ));
        }
        violations.extend(reconcile(Check {
            name,
            faults: origin.faults(),
            results: &results,
            arrivals: origin.arrivals(),
            retries: r,
            allow_cut: true,
            tokens: &["upstream_request_failed"],
            complete_implies_arrival: true,
            extra: format!("broken_bodies={cut_ids} retry_reasons=({why})"),
        }));
        gw.stop().await;
    }
    finish("ledger_cut_mid_body", violations);
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // wall time of real sockets; this runtime is never paused
async fn ledger_stalled_and_junk_origins() {
    let mut violations = Vec::new();
    // Stalled origin: even ledger ids get no answer at all.
    {
        let origin = RawOrigin::start(|s| {
            if s.ledger.unwrap_or(1) % 2 == 0 {
                Act::Stall
            } else {
                Act::Ok
            }
        })
        .await;
        let gw = TestGateway::start_with(&[], |c| {
            c.upstream.response_header_timeout = Duration::from_millis(500);
        })
        .await;
        let before = retries(&gw).await;
        let t0 = Instant::now();
        let results = run(&gw.client(), mixed(20, &origin.url("/stall")), 5).await;
        let took = t0.elapsed();
        let (r, why) = retries_delta(&before, &retries(&gw).await);
        for (req, out) in &results {
            if req.id % 2 == 0 {
                let ok = matches!(out, Outcome::EdgeError { status: 504, token, .. } if token == "upstream_response_timeout");
                if !ok {
                    violations.push(format!(
                        "[stalled_origin] ledger {} ({}): stalled origin, expected 504 upstream_response_timeout, got {out:?}",
                        req.id,
                        req.method.as_str()
                    ));
                }
            }
        }
        violations.extend(reconcile(Check {
            name: "stalled_origin",
            faults: origin.faults(),
            results: &results,
            arrivals: origin.arrivals(),
            retries: r,
            allow_cut: false,
            tokens: &["upstream_response_timeout"],
            complete_implies_arrival: true,
            extra: format!("took_ms={} retry_reasons=({why})", took.as_millis()),
        }));
        gw.stop().await;
    }
    // Junk responses: every third ledger id is answered `garbage\r\n\r\n`.
    {
        let origin = RawOrigin::start(|s| {
            if s.ledger.unwrap_or(1) % 3 == 0 {
                Act::Junk
            } else {
                Act::Ok
            }
        })
        .await;
        let gw = TestGateway::start(&[]).await;
        let before = retries(&gw).await;
        let results = run(&gw.client(), mixed(24, &origin.url("/junk")), 4).await;
        let (r, why) = retries_delta(&before, &retries(&gw).await);
        for (req, out) in &results {
            if req.id % 3 == 0 {
                let ok = matches!(out, Outcome::EdgeError { status: 502, token, .. } if token == "upstream_bad_response");
                if !ok {
                    violations.push(format!(
                        "[junk_response] ledger {} ({}): junk answer, expected 502 upstream_bad_response, got {out:?}",
                        req.id,
                        req.method.as_str()
                    ));
                }
            }
        }
        violations.extend(reconcile(Check {
            name: "junk_response",
            faults: origin.faults(),
            results: &results,
            arrivals: origin.arrivals(),
            retries: r,
            allow_cut: false,
            tokens: &["upstream_bad_response"],
            complete_implies_arrival: true,
            extra: format!("retry_reasons=({why})"),
        }));
        gw.stop().await;
    }
    finish("ledger_stalled_and_junk_origins", violations);
}

// ---------------------------------------------------------------------------------------------
// Scenarios: HTTP/2
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ledger_http2_goaway_and_refused_stream() {
    let mut violations = Vec::new();
    for fault in [
        H2Fault::Goaway {
            keep: 2,
            trigger: 6,
        },
        H2Fault::RefuseEvenOnce,
    ] {
        let name = match fault {
            H2Fault::Goaway { .. } => "h2_goaway",
            H2Fault::RefuseEvenOnce => "h2_refused_stream",
        };
        let origin = H2Origin::start(fault).await;
        let gw = TestGateway::start(std::slice::from_ref(&origin.ca.cert_path)).await;
        let before = retries(&gw).await;
        let parallel = if name == "h2_goaway" { 30 } else { 6 };
        let results = run(&gw.client(), mixed(30, &origin.url("/h2")), parallel).await;
        let (r, why) = retries_delta(&before, &retries(&gw).await);
        let unprocessed = origin.unprocessed();
        let arrivals = origin.arrivals();
        // Unprocessed streams (above the GOAWAY, or refused) must be retried, whatever the
        // method, and processed exactly once.
        for (ledger, why_un, conn, sid) in &unprocessed {
            let Some(id) = ledger else { continue };
            let n = arrivals.iter().filter(|a| a.ledger == Some(*id)).count();
            let out = results.iter().find(|(q, _)| q.id == *id);
            let ok = matches!(out, Some((_, Outcome::Complete { status: 200, .. })));
            if n != 1 || !ok {
                violations.push(format!(
                    "[{name}] ledger {id} ({}): its stream {sid} on connection {conn} was {why_un} (not processed); expected one retry processed once and a 200, got {n} processing(s) and {:?}",
                    out.map(|(q, _)| q.method.as_str()).unwrap_or("?"),
                    out.map(|(_, o)| o)
                ));
            }
        }
        if unprocessed.is_empty() {
            violations.push(format!(
                "[{name}] no fault was injected (no stream above the GOAWAY / refused); the scenario proved nothing"
            ));
        }
        let posts_unprocessed = unprocessed
            .iter()
            .filter(|(l, ..)| {
                results
                    .iter()
                    .any(|(q, _)| Some(q.id) == *l && q.method == M::Post)
            })
            .count();
        violations.extend(reconcile(Check {
            name,
            faults: unprocessed.len() as u64,
            results: &results,
            arrivals,
            retries: r,
            allow_cut: false,
            // No error is acceptable: unprocessed streams are safe to send again.
            tokens: &["(none expected)"],
            complete_implies_arrival: true,
            extra: format!(
                "unprocessed_streams={} of_which_post={posts_unprocessed} goaways={} origin_conns={} retry_reasons=({why})",
                unprocessed.len(),
                origin.st.goaways.load(Ordering::SeqCst),
                origin.st.conns.load(Ordering::SeqCst)
            ),
        }));
        gw.stop().await;
    }
    finish("ledger_http2_goaway_and_refused_stream", violations);
}

// ---------------------------------------------------------------------------------------------
// Scenarios: exits
// ---------------------------------------------------------------------------------------------

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

fn exit_worker(gw: &TestGateway, username: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::all(gw.proxy_url())
                .unwrap()
                .basic_auth(username, "ignored"),
        )
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(gw.ca_pem().as_bytes()).unwrap())
        .build()
        .unwrap()
}

fn exit_pool(name: &str, exits: &[&FakeExit]) -> ExitPoolConfig {
    ExitPoolConfig {
        name: name.into(),
        nodes: exits.iter().map(|e| e.url()).collect(),
        session_template: None,
        max_connections_per_node: None,
    }
}

#[tokio::test]
async fn ledger_exits_that_refuse_or_break_the_handshake() {
    let mut violations = Vec::new();
    let tls_origin = Origin::start(OriginConfig {
        tls: true,
        ..Default::default()
    })
    .await;
    let plain_origin = Origin::start(OriginConfig::default()).await;
    struct Case {
        pool: &'static str,
        socks: bool,
        reply: ConnectReply,
        /// Expected tokens for https targets (CONNECT / SOCKS5 tunnel).
        https: &'static [&'static str],
        /// Expected tokens for plain http targets (absolute form through an HTTP exit, a tunnel
        /// through SOCKS5); None: the case is not run for plain http.
        plain: Option<&'static [&'static str]>,
    }
    let cases = [
        Case {
            pool: "h407",
            socks: false,
            reply: ConnectReply::Status(407),
            https: &["exit_auth_failed"],
            plain: Some(&["exit_auth_failed"]),
        },
        Case {
            pool: "h403",
            socks: false,
            reply: ConnectReply::Status(403),
            https: &["exit_refused"],
            plain: None,
        },
        Case {
            pool: "h502",
            socks: false,
            reply: ConnectReply::Status(502),
            https: &["exit_refused"],
            plain: None,
        },
        Case {
            pool: "hgarbage",
            socks: false,
            reply: ConnectReply::Garbage,
            https: &["exit_connect_failed"],
            plain: Some(&[
                "upstream_bad_response",
                "upstream_request_failed",
                "upstream_failed_not_replayed",
                "exit_connect_failed",
            ]),
        },
        Case {
            pool: "hclose",
            socks: false,
            reply: ConnectReply::Close,
            https: &["exit_connect_failed"],
            plain: Some(&[
                "upstream_request_failed",
                "upstream_failed_not_replayed",
                "exit_connect_failed",
            ]),
        },
        Case {
            pool: "s5refused",
            socks: true,
            reply: ConnectReply::SocksCode(0x05),
            https: &["exit_refused"],
            plain: Some(&["exit_refused"]),
        },
        Case {
            pool: "s5failure",
            socks: true,
            reply: ConnectReply::Status(403),
            https: &["exit_refused"],
            plain: Some(&["exit_refused"]),
        },
        Case {
            pool: "s5garbage",
            socks: true,
            reply: ConnectReply::Garbage,
            https: &["exit_connect_failed"],
            plain: Some(&["exit_connect_failed"]),
        },
    ];
    let mut exits = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let mut cfg = if c.socks {
            FakeExitConfig::socks5(ip(80 + i as u8))
        } else {
            FakeExitConfig::http(ip(80 + i as u8))
        };
        cfg.reply = c.reply.clone();
        exits.push(FakeExit::start(cfg).await);
    }
    let pools: Vec<ExitPoolConfig> = cases
        .iter()
        .zip(&exits)
        .map(|(c, e)| exit_pool(c.pool, &[e]))
        .collect();
    let gw = TestGateway::start_with(&[tls_origin.ca().cert_path.clone()], |c: &mut Config| {
        c.exits.pools = pools;
        // Keep every node's circuit closed, so each request meets the exit's own answer.
        c.exits.circuit_failures = 1000;
    })
    .await;
    for (c, exit) in cases.iter().zip(&exits) {
        let worker = exit_worker(&gw, &format!("t-pool-{}", c.pool));
        let mut variants: Vec<(String, Vec<Req>, &[&str], &Origin)> = vec![(
            format!("exit_{}_https", c.pool),
            mixed(6, &tls_origin.url("/echo")),
            c.https,
            &tls_origin,
        )];
        if let Some(plain) = c.plain {
            variants.push((
                format!("exit_{}_http", c.pool),
                mixed(4, &plain_origin.url("/echo")),
                plain,
                &plain_origin,
            ));
        }
        for (name, reqs, tokens, origin) in variants {
            let before = retries(&gw).await;
            let ids: HashSet<u64> = reqs.iter().map(|r| r.id).collect();
            let conns_before = exit.connections();
            let results = run(&worker, reqs, 2).await;
            let (r, why) = retries_delta(&before, &retries(&gw).await);
            let arrivals: Vec<Arrival> = arrivals_of(origin)
                .into_iter()
                .filter(|a| a.ledger.is_some_and(|l| ids.contains(&l)))
                .collect();
            if !arrivals.is_empty() {
                violations.push(format!(
                    "[{name}] the exit refused every request, yet the origin saw ledger ids {:?}",
                    arrivals.iter().map(|a| a.ledger).collect::<Vec<_>>()
                ));
            }
            violations.extend(reconcile(Check {
                name: &name,
                faults: exit.connections() - conns_before,
                results: &results,
                arrivals,
                retries: r,
                allow_cut: false,
                tokens,
                complete_implies_arrival: false,
                extra: format!("retry_reasons=({why})"),
            }));
        }
    }
    gw.stop().await;
    finish(
        "ledger_exits_that_refuse_or_break_the_handshake",
        violations,
    );
}

#[tokio::test]
async fn ledger_exit_dies_mid_tunnel() {
    let mut violations = Vec::new();
    let origin = Origin::start(OriginConfig {
        tls: true,
        ..Default::default()
    })
    .await;
    for (name, n_exits) in [
        ("exit_dies_mid_tunnel_solo", 1u8),
        ("exit_dies_mid_tunnel_duo", 2),
    ] {
        let mut exits = Vec::new();
        for k in 0..n_exits {
            let base = if n_exits == 1 { 91 } else { 95 };
            exits.push(FakeExit::start(FakeExitConfig::http(ip(base + k))).await);
        }
        let refs: Vec<&FakeExit> = exits.iter().collect();
        let p = exit_pool("dying", &refs);
        let gw = TestGateway::start_with(&[origin.ca().cert_path.clone()], |c: &mut Config| {
            c.exits.pools = vec![p];
            c.exits.circuit_failures = 1000;
        })
        .await;
        let worker = exit_worker(&gw, "t-pool-dying");
        let before = retries(&gw).await;
        let reqs = mixed(12, &origin.url("/slow?ms=2500"));
        let ids: HashSet<u64> = reqs.iter().map(|r| r.id).collect();
        let n = reqs.len();
        let w2 = worker.clone();
        let runner = tokio::spawn(async move { run(&w2, reqs, n).await });
        // Kill the first exit once every request reached the origin (all tunnels in use).
        let reached = origin
            .wait_until(Duration::from_secs(10), |o| {
                arrivals_of(o)
                    .iter()
                    .filter(|a| a.ledger.is_some_and(|l| ids.contains(&l)))
                    .count()
                    >= n
            })
            .await;
        // The victim: the exit that carries the most of them.
        let log = origin.log();
        let carried = |e: &FakeExit| -> Vec<u64> {
            let ip = e.config().bind_ip.to_string();
            log.iter()
                .filter(|r| r.peer.ip().to_string() == ip)
                .filter_map(|r| r.header("x-ledger-id").and_then(|v| v.parse().ok()))
                .filter(|l| ids.contains(l))
                .collect()
        };
        let victim = (0..exits.len())
            .max_by_key(|&k| carried(&exits[k]).len())
            .unwrap();
        let on_victim = carried(&exits[victim]);
        let tunnels_before_kill = exits[victim].tunnels();
        exits[victim].kill();
        // The fault happened: every request was at the origin (held 2.5 s) when the exit died,
        // and the victim carried some of them through open tunnels.
        if !reached || on_victim.is_empty() || tunnels_before_kill == 0 {
            violations.push(format!(
                "[{name}] the exit did not die mid-tunnel: all requests at the origin before the \
                 kill: {reached}; requests carried by the killed exit: {}; its tunnels: \
                 {tunnels_before_kill}",
                on_victim.len()
            ));
        }
        let results = runner.await.expect("runner");
        let (r, why) = retries_delta(&before, &retries(&gw).await);
        let arrivals: Vec<Arrival> = arrivals_of(&origin)
            .into_iter()
            .filter(|a| a.ledger.is_some_and(|l| ids.contains(&l)))
            .collect();
        violations.extend(reconcile(Check {
            name,
            faults: on_victim.len() as u64,
            results: &results,
            arrivals,
            retries: r,
            allow_cut: false,
            tokens: &[
                "upstream_request_failed",
                "upstream_failed_not_replayed",
                "exit_connect_failed",
                "no_healthy_exit",
            ],
            complete_implies_arrival: false,
            extra: format!(
                "all_reached_origin_before_kill={reached} cut_tunnels={} retry_reasons=({why})",
                on_victim.len()
            ),
        }));
        gw.stop().await;
    }
    finish("ledger_exit_dies_mid_tunnel", violations);
}
