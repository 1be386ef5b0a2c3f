//! Bounded soak test: the real `edgepool` binary under sustained mixed load with faults toggled
//! every 10 s, watched for leaks (RSS, file descriptors, pool size) and for ledger errors (lost,
//! hung, duplicated or cross-wired requests).
//!
//! Ignored by default. Run it with
//!
//! ```text
//! EDGEPOOL_SOAK_SECS=600 cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! or `bench/soak.sh [SECONDS]`. Environment:
//!
//! * `EDGEPOOL_SOAK_ATTACK` (default 1; 0 turns it off): for the second half of the run, an
//!   attacker on 127.0.0.2 runs beside the honest workers (127.0.0.1): slowloris heads, HTTP/2
//!   connections that send only their preface, HTTP/2 POST streams whose bodies stall, and
//!   bursts of 8 MiB POSTs. The honest workers must see no admission 503 (ledger), and their
//!   p99 latency on normal requests must stay within 2x of the quiet first half's (+10 ms).
//! * `EDGEPOOL_SOAK_SECS` (default 600): how long the load runs.
//! * `EDGEPOOL_SOAK_RPS` (default 1000, 0 = unthrottled): total request rate cap of the fleet.
//!   The origins keep every request they receive in memory (for the POST check), about 1 KiB
//!   each in this process, so the cap also bounds the test's own memory.
//!
//! Setup: `edgepool serve` as a child process (`--listen`/`--admin` on port 0, the addresses
//! read back from its log line), `--allow-target 127.0.0.0/8` (and `::1/128`, as `localhost`
//! may resolve to it), a temporary data dir, `--upstream-ca` for the TLS origins, and a config
//! file with `upstream.response_header_timeout = "1s"` and `pool.queue_timeout = "5s"`.
//! Targets are six loopback origins from `tests/support`: four plain HTTP/1.1 (the first one
//! behind a TCP relay that the test stops and restarts: the "origin down" fault) and two TLS
//! (HTTP/1.1 and HTTP/2) reached through intercepted CONNECT. Sixteen reqwest workers send
//! GETs (`/echo`, `/bytes/N`, `/status/503`) and POSTs (`/echo` with a small body), each with a
//! unique `x-ledger-id`.
//!
//! Phases rotate every 10 s: clean, rst (15 % of requests to `/rst`), close (25 % to
//! `/close`), slow (15 % to `/slow?ms=2000`, past the 1 s response-header timeout, and 10 % to
//! `/slow?ms=100`), down (the relayed origin stops: connection refused; 25 % of requests go to
//! it). Every 5 s the test samples the child's RSS (`/proc/<pid>/status` VmRSS), its open file
//! descriptors (`/proc/<pid>/fd`) and the pool from `GET /status` on the admin listener.
//!
//! At the end (after a 5 s quiet period) it asserts: the gateway is still running; RSS grew by
//! at most 4 MiB + 1.5 MiB per minute under honest load (from the first sample after warm-up,
//! 10 % of the run, to the last sample before the attacker starts), and the lowest sample
//! while the attacker ran stays within that allowance + 5 MiB (see the constants);
//! file descriptors outside the pool (all open descriptors minus the pool's established and
//! dialing connections, which may legitimately stay open until `pool.idle_timeout`) are at
//! most 32 above the warm-up sample; and the ledger is clean: every request got exactly one
//! outcome (a response, or an edgepool error with `x-edgepool-error`), none was lost (transport
//! error without a response) or hung (no answer within 20 s), no response belonged to another
//! request, no POST reached an origin twice and no POST that edgepool reported as
//! `x-edgepool-request-sent: none` reached one. A summary table goes to stderr.
mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{pattern_bytes, Origin, OriginConfig, TestCa};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

const WORKERS: usize = 16;
const PHASE: Duration = Duration::from_secs(10);
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_secs(5);
/// A worker request without an answer after this long is a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// `upstream.response_header_timeout` given to the gateway.
const RESPONSE_HEADER_TIMEOUT: &str = "1s";
/// `/slow` delay of the slow fault: past the response-header timeout.
const SLOW_FAULT_MS: u64 = 2000;
/// `/slow` delay that stays under the timeout.
const SLOW_OK_MS: u64 = 100;
/// Index of the plain origin behind the stoppable relay.
const FLAPPING: usize = 0;
/// RSS growth allowed under honest load, from the warm-up sample to the last sample before the
/// attacker starts (to the end, with `EDGEPOOL_SOAK_ATTACK=0`): `RSS_HONEST_BASE_KIB` plus
/// `RSS_HONEST_PER_MIN_KIB` per minute of that window. Measured (debug, 2026-12-04, ~1,000
/// req/s): 60 s runs, warm-up t=10 s to t=25 s: +1.6, +1.8, +2.6, +2.7, +2.8 MiB (bound 4.4);
/// a 300 s run, t=30 s to t=145 s: +5.5 MiB (bound 6.9), growing ever slower (+4.1 MiB in its
/// first minute, +1.4 in its second). What grows was not traced (caches and rings filling,
/// presumably); the bound is just above what was measured and fails a leak of more than about
/// 1.5 MiB per minute (≈ 25 bytes per request at 1,000 req/s) once the window is long, or a
/// 300-byte-per-request leak within a 60 s run. The old bound, +20 % + 8 MiB (≈ 17 MiB) from
/// warm-up to the end, let a 60 s run grow four times as much as it does.
const RSS_HONEST_BASE_KIB: u64 = 4 * 1024;
const RSS_HONEST_PER_MIN_KIB: f64 = 1.5 * 1024.0;
/// With the attacker running, RSS swings between ~50 and ~180 MiB (its 8 MiB POSTs, buffered,
/// and its stalled streams), and the end sample, 5 s after the load, still holds some of it
/// (a 300 s run ended at +36 MiB over warm-up, over the old bound, while its samples between
/// bursts came back to +2.6 MiB). A leak raises the floor, not the peaks: the lowest sample from
/// the attacker's start to the end may exceed warm-up by the honest allowance over that whole
/// window plus `RSS_ATTACK_FLOOR_KIB` for what the attack itself holds while it runs (its
/// stalled streams and slowloris connections). Measured floors: −5.6, +3.4, +4.4, +5.4,
/// +6.9 MiB (60 s runs, bound 10.4), +2.6 MiB (300 s run, bound 15.9).
const RSS_ATTACK_FLOOR_KIB: u64 = 5 * 1024;
const FD_SLACK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Clean,
    Rst,
    Close,
    Slow,
    Down,
}

const SCHEDULE: [Phase; 5] = [
    Phase::Clean,
    Phase::Rst,
    Phase::Close,
    Phase::Slow,
    Phase::Down,
];

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Clean => "clean",
            Phase::Rst => "rst",
            Phase::Close => "close",
            Phase::Slow => "slow",
            Phase::Down => "down",
        }
    }
}

/// What kind of request a worker sent (faults and the normal mix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Normal,
    Rst,
    Close,
    SlowTimeout,
    SlowOk,
    /// Any request to the relayed origin while it is stopped.
    Down,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Normal => "normal",
            Kind::Rst => "rst",
            Kind::Close => "close",
            Kind::SlowTimeout => "slow>timeout",
            Kind::SlowOk => "slow<timeout",
            Kind::Down => "origin-down",
        }
    }
}

/// What a 2xx answer must look like.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// The origin's JSON echo of this very request.
    Echo,
    /// `N` pattern bytes.
    Bytes(usize),
    /// The origin answers with this status.
    Status(u16),
    /// The origin never answers (`/rst`): any 2xx is someone else's response.
    Nothing,
}

struct Plan {
    target: usize,
    post: bool,
    path: String,
    kind: Kind,
    expect: Expect,
}

/// xorshift64*: the test needs cheap, reproducible randomness, not quality.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }
}

fn plan(rng: &mut Rng, phase: Phase, targets: usize) -> Plan {
    let mut target = rng.below(targets);
    if phase == Phase::Down && rng.percent(25) {
        target = FLAPPING;
    }
    let post = rng.percent(30);
    let roll = rng.below(100);
    let (mut kind, path, expect) = match phase {
        Phase::Rst if roll < 15 => (Kind::Rst, "/rst".to_string(), Expect::Nothing),
        Phase::Close if roll < 25 => (Kind::Close, "/close".to_string(), Expect::Echo),
        Phase::Slow if roll < 15 => (
            Kind::SlowTimeout,
            format!("/slow?ms={SLOW_FAULT_MS}"),
            Expect::Echo,
        ),
        Phase::Slow if roll < 25 => (Kind::SlowOk, format!("/slow?ms={SLOW_OK_MS}"), Expect::Echo),
        _ => {
            let r = rng.below(100);
            if r < 3 {
                (Kind::Normal, "/status/503".to_string(), Expect::Status(503))
            } else if !post && r < 40 {
                let n = [0usize, 100, 1024, 4096, 16_384, 65_536][rng.below(6)];
                (Kind::Normal, format!("/bytes/{n}"), Expect::Bytes(n))
            } else {
                (Kind::Normal, "/echo".to_string(), Expect::Echo)
            }
        }
    };
    if phase == Phase::Down && target == FLAPPING {
        kind = Kind::Down;
    }
    Plan {
        target,
        post,
        path,
        kind,
        expect,
    }
}

/// How one request ended.
enum Outcome {
    /// 2xx from the origin, checked against the request.
    Ok,
    /// A non-2xx status from the origin itself (no `x-edgepool-error`).
    OriginStatus(u16),
    /// An edgepool error: the `x-edgepool-error` token and `x-edgepool-request-sent`.
    Edge {
        token: String,
        sent: String,
        /// Method, URL and the error's `detail`, for the examples.
        what: String,
    },
    /// A 2xx whose body is not the answer to this request.
    Mismatch(String),
    /// The head arrived, the body broke off.
    BodyAborted(String),
    /// No response and no timeout: the worker got a transport error.
    Lost(String),
    /// No answer within [`REQUEST_TIMEOUT`].
    Hang,
}

fn check_body(expect: Expect, id: u64, post: bool, sent_body: &str, body: &[u8]) -> Outcome {
    match expect {
        Expect::Echo => {
            let v: serde_json::Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return Outcome::Mismatch(format!("id {id}: echo is not JSON: {e}")),
            };
            let got = v["headers"]["x-ledger-id"].as_str().unwrap_or("");
            let method = if post { "POST" } else { "GET" };
            if got != id.to_string() {
                return Outcome::Mismatch(format!("id {id}: echo carries x-ledger-id {got:?}"));
            }
            if v["method"] != method {
                return Outcome::Mismatch(format!("id {id}: echo method {}", v["method"]));
            }
            if post && v["body"] != sent_body {
                return Outcome::Mismatch(format!("id {id}: echo body differs"));
            }
            Outcome::Ok
        }
        Expect::Bytes(n) => {
            if body.len() != n || body != &pattern_bytes(n)[..] {
                return Outcome::Mismatch(format!(
                    "id {id}: /bytes/{n} answered {} bytes (or other bytes)",
                    body.len()
                ));
            }
            Outcome::Ok
        }
        Expect::Status(s) => Outcome::Mismatch(format!("id {id}: expected origin status {s}")),
        Expect::Nothing => Outcome::Mismatch(format!("id {id}: 2xx for a request never answered")),
    }
}

async fn send_one(client: &reqwest::Client, url: &str, p: &Plan, id: u64, body: &str) -> Outcome {
    let req = if p.post {
        client
            .post(url)
            .header("content-type", "text/plain")
            .body(body.to_string())
    } else {
        client.get(url)
    };
    let resp = match req.header("x-ledger-id", id.to_string()).send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Outcome::Hang,
        Err(e) => return Outcome::Lost(format!("id {id} {} {url}: {e:?}", p.kind.name())),
    };
    let status = resp.status().as_u16();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let edge = header("x-edgepool-error");
    let sent = header("x-edgepool-request-sent").unwrap_or_else(|| "-".into());
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) if e.is_timeout() => return Outcome::Hang,
        Err(e) => {
            return Outcome::BodyAborted(format!("id {id} {} {url} {status}: {e:?}", p.kind.name()))
        }
    };
    if let Some(token) = edge {
        let detail = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_string))
            .unwrap_or_default();
        let method = if p.post { "POST" } else { "GET" };
        let what = format!("id {id} {method} {url}: {status} {token} sent={sent}: {detail}");
        return Outcome::Edge { token, sent, what };
    }
    if (200..300).contains(&status) {
        return check_body(p.expect, id, p.post, body, &bytes);
    }
    match p.expect {
        Expect::Status(s) if s == status => Outcome::OriginStatus(status),
        _ => Outcome::Mismatch(format!(
            "id {id} {} {url}: origin status {status} without x-edgepool-error",
            p.kind.name()
        )),
    }
}

/// What happened to a POST, for the cross-check with the origins' logs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PostEnd {
    Ok,
    EdgeSentNone,
    Other,
}

#[derive(Default)]
struct Ledger {
    issued: u64,
    outcomes: u64,
    gets: u64,
    posts: u64,
    ok: u64,
    origin_status: u64,
    edge: BTreeMap<String, u64>,
    mismatched: u64,
    body_aborted: u64,
    lost: u64,
    hangs: u64,
    /// `/slow` past the timeout answered 2xx anyway.
    timeout_not_enforced: u64,
    /// (kind) -> outcome label -> count.
    by_kind: BTreeMap<Kind, BTreeMap<String, u64>>,
    /// (phase) -> [ok, origin non-2xx, edgepool error, other].
    by_phase: BTreeMap<Phase, [u64; 4]>,
    post_end: HashMap<u64, PostEnd>,
    examples: Vec<String>,
    /// Latency (µs) of normal requests answered OK, without and with the attacker running.
    lat_quiet: Vec<u64>,
    lat_attack: Vec<u64>,
}

impl Ledger {
    fn record(&mut self, phase: Phase, p: &Plan, id: u64, o: Outcome) {
        self.outcomes += 1;
        if p.post {
            self.posts += 1;
        } else {
            self.gets += 1;
        }
        let example = |e: String, ex: &mut Vec<String>| {
            if ex.len() < 20 {
                ex.push(e);
            }
        };
        let (label, col, post_end) = match o {
            Outcome::Ok => {
                self.ok += 1;
                if p.kind == Kind::SlowTimeout {
                    self.timeout_not_enforced += 1;
                }
                ("ok".to_string(), 0, PostEnd::Ok)
            }
            Outcome::OriginStatus(s) => {
                self.origin_status += 1;
                (format!("origin {s}"), 1, PostEnd::Other)
            }
            Outcome::Edge { token, sent, what } => {
                *self.edge.entry(token.clone()).or_default() += 1;
                // Errors on requests that were not aimed at a fault are worth reading.
                if p.kind == Kind::Normal {
                    example(
                        format!("{} phase, no fault aimed: {what}", phase.name()),
                        &mut self.examples,
                    );
                }
                let end = if sent == "none" {
                    PostEnd::EdgeSentNone
                } else {
                    PostEnd::Other
                };
                (token, 2, end)
            }
            Outcome::Mismatch(e) => {
                self.mismatched += 1;
                example(format!("mismatch: {e}"), &mut self.examples);
                ("MISMATCH".to_string(), 3, PostEnd::Other)
            }
            Outcome::BodyAborted(e) => {
                self.body_aborted += 1;
                example(format!("body aborted: {e}"), &mut self.examples);
                ("body-aborted".to_string(), 3, PostEnd::Other)
            }
            Outcome::Lost(e) => {
                self.lost += 1;
                example(format!("lost: {e}"), &mut self.examples);
                ("LOST".to_string(), 3, PostEnd::Other)
            }
            Outcome::Hang => {
                self.hangs += 1;
                example(
                    format!("hang: id {id} {} {}", p.kind.name(), p.path),
                    &mut self.examples,
                );
                ("HANG".to_string(), 3, PostEnd::Other)
            }
        };
        *self
            .by_kind
            .entry(p.kind)
            .or_default()
            .entry(label)
            .or_default() += 1;
        self.by_phase.entry(phase).or_default()[col] += 1;
        if p.post {
            self.post_end.insert(id, post_end);
        }
    }

    fn merge(&mut self, o: Ledger) {
        self.issued += o.issued;
        self.outcomes += o.outcomes;
        self.gets += o.gets;
        self.posts += o.posts;
        self.ok += o.ok;
        self.origin_status += o.origin_status;
        for (k, v) in o.edge {
            *self.edge.entry(k).or_default() += v;
        }
        self.mismatched += o.mismatched;
        self.body_aborted += o.body_aborted;
        self.lost += o.lost;
        self.hangs += o.hangs;
        self.timeout_not_enforced += o.timeout_not_enforced;
        for (k, m) in o.by_kind {
            let e = self.by_kind.entry(k).or_default();
            for (l, v) in m {
                *e.entry(l).or_default() += v;
            }
        }
        for (k, a) in o.by_phase {
            let e = self.by_phase.entry(k).or_default();
            for i in 0..4 {
                e[i] += a[i];
            }
        }
        self.post_end.extend(o.post_end);
        self.lat_quiet.extend(o.lat_quiet);
        self.lat_attack.extend(o.lat_attack);
        for e in o.examples {
            if self.examples.len() < 40 {
                self.examples.push(e);
            }
        }
    }
}

struct Ctx {
    bases: Vec<String>,
    started: Instant,
    deadline: Instant,
    next_id: AtomicU64,
    completed: AtomicU64,
    phase: AtomicUsize,
    /// The attacker is running (second half of the run).
    attack: std::sync::atomic::AtomicBool,
}

impl Ctx {
    fn phase(&self) -> Phase {
        SCHEDULE[self.phase.load(Ordering::SeqCst)]
    }
}

#[allow(clippy::disallowed_methods)] // a soak runs in wall time against a child process
async fn worker(
    w: usize,
    ctx: Arc<Ctx>,
    client: reqwest::Client,
    period: Option<Duration>,
) -> Ledger {
    let mut rng = Rng::new(0x50A4 + w as u64);
    let mut ledger = Ledger::default();
    let mut tick = period.map(|p| {
        let mut i = tokio::time::interval(p);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        i
    });
    while Instant::now() < ctx.deadline {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
            if Instant::now() >= ctx.deadline {
                break;
            }
        }
        let phase = ctx.phase();
        let p = plan(&mut rng, phase, ctx.bases.len());
        let id = ctx.next_id.fetch_add(1, Ordering::SeqCst);
        ledger.issued += 1;
        let body = if p.post {
            let len = 16 + rng.below(497);
            let mut b = format!("ledger={id};");
            while b.len() < len {
                b.push((b'a' + (b.len() % 26) as u8) as char);
            }
            b
        } else {
            String::new()
        };
        let url = format!("{}{}", ctx.bases[p.target], p.path);
        let attack = ctx.attack.load(Ordering::SeqCst);
        let t0 = Instant::now();
        let o = send_one(&client, &url, &p, id, &body).await;
        if p.kind == Kind::Normal && matches!(o, Outcome::Ok) {
            let us = t0.elapsed().as_micros() as u64;
            if attack {
                ledger.lat_attack.push(us);
            } else {
                ledger.lat_quiet.push(us);
            }
        }
        ledger.record(phase, &p, id, o);
        ctx.completed.fetch_add(1, Ordering::SeqCst);
    }
    ledger
}

/// Counts of what the attacker did.
#[derive(Default)]
struct AttackReport {
    slowloris: u64,
    h2_idle: u64,
    h2_stalled_streams: u64,
    big_posts: u64,
    big_refused: u64,
}

impl std::fmt::Display for AttackReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} slowloris connections, {} preface-only HTTP/2 connections, {} stalled HTTP/2 POST streams, {} 8 MiB POSTs ({} refused)",
            self.slowloris, self.h2_idle, self.h2_stalled_streams, self.big_posts, self.big_refused
        )
    }
}

/// A TCP connection to `to` from 127.0.0.2 (the attacker's address).
async fn attacker_conn(to: SocketAddr) -> Option<TcpStream> {
    let s = tokio::net::TcpSocket::new_v4().ok()?;
    s.bind("127.0.0.2:0".parse().unwrap()).ok()?;
    s.connect(to).await.ok()
}

/// 32 connections from the attacker's address that each send `hello` and then hold on, silent,
/// until the gateway closes them (then another is opened), until `until`. `opened` counts.
#[allow(clippy::disallowed_methods)] // a soak runs in wall time against a child process
fn hold(
    set: &mut JoinSet<()>,
    proxy: SocketAddr,
    until: Instant,
    hello: &'static [u8],
    opened: impl Fn() + Clone + Send + 'static,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..32 {
        let opened = opened.clone();
        set.spawn(async move {
            while Instant::now() < until {
                let Some(mut s) = attacker_conn(proxy).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                opened();
                let _ = s.write_all(hello).await;
                let mut b = [0u8; 512];
                while let Ok(Ok(n)) = tokio::time::timeout_at(until.into(), s.read(&mut b)).await {
                    if n == 0 {
                        break;
                    }
                }
            }
        });
    }
}

/// Runs the attacks until `until`, each kind as a bounded pool of connections reopened as the
/// gateway closes them.
#[allow(clippy::disallowed_methods)] // a soak runs in wall time against a child process
async fn attack(proxy: SocketAddr, target: &str, until: Instant) -> AttackReport {
    let report = Arc::new(std::sync::Mutex::new(AttackReport::default()));
    let mut set = JoinSet::new();
    // Slowloris (half a head), and HTTP/2 preface + SETTINGS alone: 32 of each at a time.
    hold(
        &mut set,
        proxy,
        until,
        b"GET http://x.test/ HTTP/1.1\r\nHost: x.t",
        {
            let report = report.clone();
            move || report.lock().unwrap().slowloris += 1
        },
    );
    hold(
        &mut set,
        proxy,
        until,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        {
            let report = report.clone();
            move || report.lock().unwrap().h2_idle += 1
        },
    );
    // HTTP/2 POST streams whose bodies stall: 2 connections x 128 streams, reopened.
    for _ in 0..2 {
        let report = report.clone();
        let url = format!("{target}echo");
        set.spawn(async move {
            while Instant::now() < until {
                let Some(tcp) = attacker_conn(proxy).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok((h2, conn)) = h2::client::handshake(tcp).await else {
                    continue;
                };
                let conn = tokio::spawn(conn);
                let mut bodies = Vec::new();
                if let Ok(mut h2) = h2.ready().await {
                    for _ in 0..128 {
                        let req = http::Request::post(url.as_str())
                            .header("content-length", "100")
                            .body(())
                            .unwrap();
                        let Ok((_resp, mut body)) = h2.send_request(req, false) else {
                            break;
                        };
                        let _ = body.send_data(bytes::Bytes::from_static(b"0123456789"), false);
                        bodies.push(body);
                        report.lock().unwrap().h2_stalled_streams += 1;
                        match h2.ready().await {
                            Ok(r) => h2 = r,
                            Err(_) => break,
                        }
                    }
                }
                let _ = tokio::time::timeout_at(until.into(), conn).await;
            }
        });
    }
    // Bursts of 8 MiB POSTs to a port nobody listens on (buffered, then refused or 502).
    {
        let report = report.clone();
        set.spawn(async move {
            let client = reqwest::Client::builder()
                .proxy(reqwest::Proxy::http(format!("http://{proxy}")).unwrap())
                .local_address(Some("127.0.0.2".parse().unwrap()))
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            let body = bytes::Bytes::from(vec![b'z'; 8 << 20]);
            while Instant::now() < until {
                let mut burst = JoinSet::new();
                for _ in 0..16 {
                    let client = client.clone();
                    let body = body.clone();
                    burst.spawn(async move {
                        client
                            .post("http://127.0.0.1:9/big")
                            .body(body)
                            .send()
                            .await
                            .map(|r| r.status().as_u16())
                    });
                }
                while let Some(r) = burst.join_next().await {
                    let mut rep = report.lock().unwrap();
                    rep.big_posts += 1;
                    if matches!(r, Ok(Ok(503))) {
                        rep.big_refused += 1;
                    }
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    }
    // Every attack ends by `until` (+ a moment for the last reads to notice).
    let _ = tokio::time::timeout_at((until + Duration::from_secs(25)).into(), async {
        while set.join_next().await.is_some() {}
    })
    .await;
    set.abort_all();
    let r = std::mem::take(&mut *report.lock().unwrap());
    r
}

/// A TCP relay in front of an origin on a fixed port, which can be stopped (listener closed,
/// relayed connections dropped: the origin looks down, new dials are refused) and restarted
/// on the same port.
struct Relay {
    addr: SocketAddr,
    backend: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    async fn start(backend: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Relay {
            addr,
            backend,
            task: Some(tokio::spawn(relay_loop(listener, backend))),
        }
    }

    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    #[allow(clippy::disallowed_methods)] // a soak runs in wall time against a child process
    async fn restart(&mut self) {
        assert!(self.task.is_none());
        let until = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < until => {
                    eprintln!("soak: rebinding {} failed ({e}); retrying", self.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot rebind the relay on {}: {e}", self.addr),
            }
        };
        self.task = Some(tokio::spawn(relay_loop(listener, self.backend)));
    }
}

async fn relay_loop(listener: TcpListener, backend: SocketAddr) {
    // Dropping this future (abort) drops the JoinSet, which aborts every relayed connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((inbound, _)) => {
                    conns.spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(backend).await else {
                            return;
                        };
                        let mut inbound = inbound;
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// The edgepool child process; killed (by pid) when dropped, also on panic.
struct Gateway {
    child: Child,
    pid: u32,
    proxy: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    ca_pem: String,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    #[allow(clippy::disallowed_methods)] // a soak runs in wall time against a child process
    fn start(origin_ca: &Path, connect_ports: &[u16]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let config = dir.path().join("edgepool.toml");
        let log = dir.path().join("edgepool.log");
        std::fs::write(
            &config,
            format!(
                "[upstream]\nresponse_header_timeout = \"{RESPONSE_HEADER_TIMEOUT}\"\n\n\
                 [pool]\nqueue_timeout = \"5s\"\n"
            ),
        )
        .unwrap();
        let bin = env!("CARGO_BIN_EXE_edgepool");
        // The interception CA workers must trust (created here, loaded by `serve`; `edgepool
        // ca path` never creates one).
        let ca_pem = edgepool::ca::CertAuthority::load_or_create(&data)
            .unwrap()
            .cert_pem()
            .to_string();

        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .args(["--allow-target", "127.0.0.0/8", "--allow-target", "::1/128"])
            .arg("--upstream-ca")
            .arg(origin_ca);
        for p in connect_ports {
            cmd.args(["--allow-connect-port", &p.to_string()]);
        }
        let child = cmd
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn edgepool serve");
        let pid = child.id();
        let mut gw = Gateway {
            child,
            pid,
            proxy: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            log,
            ca_pem,
            _dir: dir,
        };
        // `serve` logs the addresses it bound: "... edgepool is serving ... proxy=A admin=B".
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let text = strip_ansi(&std::fs::read_to_string(&gw.log).unwrap_or_default());
            if let Some(line) = text.lines().find(|l| l.contains("edgepool is serving")) {
                gw.proxy = field(line, "proxy=").expect("proxy= in the serving line");
                gw.admin = field(line, "admin=").expect("admin= in the serving line");
                break;
            }
            if let Ok(Some(st)) = gw.child.try_wait() {
                panic!("edgepool serve exited ({st}):\n{text}");
            }
            assert!(Instant::now() < until, "edgepool did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
        gw
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_tail(&self, n: usize) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn log_counts(&self) -> (usize, usize) {
        let Ok(f) = std::fs::File::open(&self.log) else {
            return (0, 0);
        };
        let (mut warn, mut error) = (0, 0);
        for l in std::io::BufReader::new(f).lines().map_while(Result::ok) {
            if l.contains(" WARN ") {
                warn += 1;
            } else if l.contains(" ERROR ") {
                error += 1;
            }
        }
        (warn, error)
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn field(line: &str, key: &str) -> Option<SocketAddr> {
    let at = line.find(key)? + key.len();
    line[at..].split_whitespace().next()?.parse().ok()
}

#[derive(Clone, Debug)]
struct Sample {
    t: f64,
    rss_kib: u64,
    fds: usize,
    /// Pool connections (established, active + idle), idle, being dialed, requests queued.
    pool: Option<(u64, u64, u64, u64)>,
    /// The `/status` per-target rows.
    targets: Option<serde_json::Value>,
    completed: u64,
}

impl Sample {
    /// File descriptors not held by pooled upstream connections (established or being
    /// dialed): listeners, worker connections, files. Pooled connections may legitimately
    /// stay open after the load (until `pool.idle_timeout`).
    fn fds_outside_pool(&self) -> i64 {
        self.fds as i64 - self.pool.map_or(0, |p| (p.0 + p.2) as i64)
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

type PoolCounts = (u64, u64, u64, u64);

async fn pool_status(
    admin: &reqwest::Client,
    addr: SocketAddr,
) -> Option<(PoolCounts, serde_json::Value)> {
    let v: serde_json::Value = admin
        .get(format!("http://{addr}/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    let (active, idle) = (n(&v["fleet"]["active"]), n(&v["fleet"]["idle"]));
    let counts = (active + idle, idle, n(&v["connecting"]), n(&v["waiting"]));
    Some((counts, v["targets"].clone()))
}

async fn sample(gw_pid: u32, admin: &reqwest::Client, addr: SocketAddr, ctx: &Ctx) -> Sample {
    let status = pool_status(admin, addr).await;
    Sample {
        t: ctx.started.elapsed().as_secs_f64(),
        rss_kib: rss_kib(gw_pid),
        fds: fd_count(gw_pid),
        pool: status.as_ref().map(|s| s.0),
        targets: status.map(|s| s.1),
        completed: ctx.completed.load(Ordering::SeqCst),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn pool_str(p: Option<PoolCounts>) -> String {
    match p {
        Some((open, idle, _, _)) => format!("{open}/{idle}"),
        None => "?".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak test: minutes of load; run with --ignored (bench/soak.sh)"]
async fn soak() {
    let secs: u64 = std::env::var("EDGEPOOL_SOAK_SECS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(600);
    let rps: u64 = std::env::var("EDGEPOOL_SOAK_RPS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1000);
    let run = Duration::from_secs(secs.max(10));
    // Bounded whatever happens: the load, the drain (one request timeout), the quiet period,
    // the checks, plus margin.
    let limit = run + REQUEST_TIMEOUT + QUIET + Duration::from_secs(120);
    tokio::time::timeout(limit, soak_run(run, rps))
        .await
        .unwrap_or_else(|_| panic!("soak test exceeded its {limit:?} bound"));
}

#[allow(clippy::disallowed_methods)] // a soak runs in wall time against a child process
async fn soak_run(run: Duration, rps: u64) {
    // Origins: four plain HTTP/1.1 (the first behind the stoppable relay), two TLS.
    let ca = TestCa::new();
    let mut origins = Vec::new();
    for _ in 0..4 {
        origins.push(Origin::start(OriginConfig::default()).await);
    }
    for h2 in [false, true] {
        let cfg = OriginConfig {
            tls: true,
            h2,
            ..Default::default()
        };
        origins.push(Origin::start_with_ca(cfg, &ca).await);
    }
    let mut relay = Relay::start(origins[FLAPPING].addr()).await;
    let mut bases: Vec<String> = origins.iter().map(|o| o.base_url()).collect();
    bases[FLAPPING] = format!("http://{}", relay.addr);
    // `host:port` (as `/status` names targets) -> what the target is.
    let kinds = [
        "plain h1, relayed",
        "plain h1",
        "plain h1",
        "plain h1",
        "tls h1",
        "tls h2",
    ];
    let labels: HashMap<String, &str> = bases
        .iter()
        .zip(kinds)
        .map(|(b, k)| (b.split("://").nth(1).unwrap_or(b).to_string(), k))
        .collect();
    let tls_ports: Vec<u16> = origins
        .iter()
        .filter(|o| o.config().tls)
        .map(|o| o.port())
        .collect();

    let mut gw = Gateway::start(&ca.cert_path, &tls_ports);
    let admin = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let ready_by = Instant::now() + Duration::from_secs(10);
    while pool_status(&admin, gw.admin).await.is_none() {
        assert!(Instant::now() < ready_by, "admin /status never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "soak: edgepool pid {} proxy {} admin {}; {} s of load, {} workers, cap {} req/s; targets {:?}",
        gw.pid,
        gw.proxy,
        gw.admin,
        run.as_secs(),
        WORKERS,
        if rps == 0 { "none".to_string() } else { rps.to_string() },
        bases
    );

    let started = Instant::now();
    let ctx = Arc::new(Ctx {
        bases,
        started,
        deadline: started + run,
        next_id: AtomicU64::new(1),
        completed: AtomicU64::new(0),
        phase: AtomicUsize::new(0),
        attack: std::sync::atomic::AtomicBool::new(false),
    });

    // Sampler.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let sampler = {
        let ctx = ctx.clone();
        let admin = admin.clone();
        let (pid, addr) = (gw.pid, gw.admin);
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let s = sample(pid, &admin, addr, &ctx).await;
                        eprintln!(
                            "soak: t={:>5.0}s phase={:<5} rss={:>6.1} MiB fds={:>4} pool open/idle={:>7} connecting={} waiting={} requests={}",
                            s.t, ctx.phase().name(), mib(s.rss_kib), s.fds, pool_str(s.pool),
                            s.pool.map_or(0, |p| p.2), s.pool.map_or(0, |p| p.3), s.completed
                        );
                        samples.push(s);
                    }
                    _ = stop_rx.changed() => break,
                }
            }
            samples
        })
    };

    // Workers.
    let period = (rps > 0).then(|| Duration::from_secs_f64(WORKERS as f64 / rps as f64));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let client = reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(format!("http://{}", gw.proxy)).unwrap())
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(gw.ca_pem.as_bytes()).unwrap())
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        workers.push(tokio::spawn(worker(w, ctx.clone(), client, period)));
    }

    // The attacker, for the second half of the run (from 127.0.0.2).
    let attack_on = std::env::var("EDGEPOOL_SOAK_ATTACK").map_or(true, |v| v.trim() != "0");
    let attacker = attack_on.then(|| {
        let ctx = ctx.clone();
        let proxy = gw.proxy;
        let target = ctx.bases[1].clone();
        tokio::spawn(async move {
            let half = ctx.started + (ctx.deadline - ctx.started) / 2;
            tokio::time::sleep_until(half.into()).await;
            ctx.attack.store(true, Ordering::SeqCst);
            attack(proxy, &target, ctx.deadline).await
        })
    });

    // Conductor: toggles the phases.
    let mut origin_stops = 0u64;
    let mut phase_secs: BTreeMap<Phase, f64> = BTreeMap::new();
    let mut k = 0usize;
    loop {
        let now = Instant::now();
        if now >= ctx.deadline {
            break;
        }
        let phase = SCHEDULE[k % SCHEDULE.len()];
        ctx.phase.store(k % SCHEDULE.len(), Ordering::SeqCst);
        if phase == Phase::Down {
            relay.stop().await;
            origin_stops += 1;
        }
        let end = (started + PHASE * (k as u32 + 1)).min(ctx.deadline);
        tokio::time::sleep_until(end.into()).await;
        *phase_secs.entry(phase).or_default() += end.saturating_duration_since(now).as_secs_f64();
        if phase == Phase::Down {
            relay.restart().await;
        }
        k += 1;
    }
    let load_secs = started.elapsed().as_secs_f64();
    ctx.phase.store(0, Ordering::SeqCst);

    let mut ledger = Ledger::default();
    for w in workers {
        ledger.merge(w.await.expect("worker task"));
    }
    let attack_report = match attacker {
        Some(a) => Some(a.await.expect("attacker task")),
        None => None,
    };
    let drain_secs = started.elapsed().as_secs_f64() - load_secs;

    // Quiet period, then the final sample.
    tokio::time::sleep(QUIET).await;
    let _ = stop_tx.send(true);
    let mut samples = sampler.await.unwrap();
    let last = sample(gw.pid, &admin, gw.admin, &ctx).await;
    // The sampler may have ticked a moment ago: the final sample replaces that one.
    if samples.last().is_some_and(|x| last.t - x.t < 1.0) {
        samples.pop();
    }
    samples.push(last.clone());
    let alive = gw.alive();
    let (warns, errors) = gw.log_counts();
    let log_tail = gw.log_tail(15);

    // Cross-check the POSTs with what the origins received.
    let issued_ids = ctx.next_id.load(Ordering::SeqCst);
    let mut arrivals: HashMap<u64, (u32, u32)> = HashMap::new(); // id -> (POSTs, GETs)
    let mut phantom = 0u64;
    let mut unlabelled = 0u64;
    let mut origin_requests = 0u64;
    for o in &origins {
        for r in o.log() {
            origin_requests += 1;
            let Some(id) = r.header("x-ledger-id").and_then(|v| v.parse::<u64>().ok()) else {
                unlabelled += 1;
                continue;
            };
            if id == 0 || id >= issued_ids {
                phantom += 1;
            }
            let e = arrivals.entry(id).or_default();
            if r.method == "POST" {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
    }
    let dup_posts = arrivals.values().filter(|a| a.0 > 1).count() as u64;
    let get_replays = arrivals.values().filter(|a| a.1 > 1).count() as u64;
    let mut sent_none_arrived = 0u64;
    let mut ok_not_arrived = 0u64;
    for (id, end) in &ledger.post_end {
        let n = arrivals.get(id).map_or(0, |a| a.0);
        match end {
            PostEnd::EdgeSentNone if n > 0 => sent_none_arrived += 1,
            PostEnd::Ok if n == 0 => ok_not_arrived += 1,
            _ => {}
        }
    }
    let unaccounted = ledger.issued - ledger.outcomes;

    // Leak checks: warm-up sample (first at or after 10 % of the run) against the end.
    let warm_at = run.as_secs_f64() * 0.10;
    let warm = samples
        .iter()
        .find(|s| s.t >= warm_at)
        .cloned()
        .unwrap_or_else(|| samples[0].clone());
    // The honest-load leak check: the last sample before the attacker starts (at half the run),
    // or the end when there is no attacker.
    let attack_at = run.as_secs_f64() / 2.0;
    let honest_end = if attack_on {
        samples
            .iter()
            .rfind(|s| s.t >= warm.t && s.t < attack_at - 1.0)
            .cloned()
            .unwrap_or_else(|| warm.clone())
    } else {
        samples.last().cloned().unwrap_or_else(|| warm.clone())
    };
    let allowance = |from: f64, to: f64| -> u64 {
        RSS_HONEST_BASE_KIB + (RSS_HONEST_PER_MIN_KIB * (to - from).max(0.0) / 60.0) as u64
    };
    let honest_limit = warm.rss_kib + allowance(warm.t, honest_end.t);
    // The floor of the attack half (the attacker's start to the end, the end included).
    let attack_floor = samples
        .iter()
        .filter(|s| attack_on && s.t >= attack_at)
        .min_by_key(|s| s.rss_kib)
        .cloned();
    let floor_limit = warm.rss_kib + allowance(warm.t, last.t) + RSS_ATTACK_FLOOR_KIB;
    let fd_limit = warm.fds_outside_pool() + FD_SLACK as i64;
    let peak_pool = samples
        .iter()
        .filter(|s| s.pool.is_some())
        .max_by_key(|s| s.pool.map_or(0, |p| p.0))
        .cloned();
    let peak_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let peak_fds = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    // Least-squares RSS slope over the samples from warm-up on (MiB per minute).
    let trend: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.t >= warm.t)
        .map(|s| (s.t, mib(s.rss_kib)))
        .collect();
    let rss_slope = {
        let n = trend.len() as f64;
        let (mt, mr) = (
            trend.iter().map(|p| p.0).sum::<f64>() / n,
            trend.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let var: f64 = trend.iter().map(|p| (p.0 - mt).powi(2)).sum();
        let cov: f64 = trend.iter().map(|p| (p.0 - mt) * (p.1 - mr)).sum();
        if var > 0.0 {
            cov / var * 60.0
        } else {
            0.0
        }
    };
    let own_rss = rss_kib(std::process::id());

    // Summary.
    let total = ledger.outcomes;
    let errors_total: u64 = ledger.edge.values().sum();
    let fault = |k: Kind| -> u64 { ledger.by_kind.get(&k).map_or(0, |m| m.values().sum()) };
    let mut s = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        s,
        "\n==================== edgepool soak summary ===================="
    );
    let _ = writeln!(
        s,
        "duration            {:.0} s load + {:.1} s drain + {} s quiet; {} workers; cap {}",
        load_secs,
        drain_secs,
        QUIET.as_secs(),
        WORKERS,
        if rps == 0 {
            "none".to_string()
        } else {
            format!("{rps} req/s")
        }
    );
    let _ = writeln!(
        s,
        "requests            {} ({:.0} req/s): GET {}, POST {}; origins received {}",
        total,
        total as f64 / load_secs,
        ledger.gets,
        ledger.posts,
        origin_requests
    );
    let _ = writeln!(
        s,
        "ok                  {} ({:.2} %); origin non-2xx (/status/503) {}",
        ledger.ok,
        100.0 * ledger.ok as f64 / total.max(1) as f64,
        ledger.origin_status
    );
    let _ = writeln!(s, "edgepool errors     {errors_total}");
    for (t, n) in &ledger.edge {
        let _ = writeln!(s, "  {t:<34} {n}");
    }
    let _ = writeln!(
        s,
        "faults injected     rst {} | close {} | slow>timeout {} | slow<timeout {} | origin-down {} requests ({} stops/restarts)",
        fault(Kind::Rst),
        fault(Kind::Close),
        fault(Kind::SlowTimeout),
        fault(Kind::SlowOk),
        fault(Kind::Down),
        origin_stops
    );
    let _ = writeln!(s, "outcomes by request kind");
    for (k, m) in &ledger.by_kind {
        let parts: Vec<String> = m.iter().map(|(l, n)| format!("{l} {n}")).collect();
        let _ = writeln!(s, "  {:<14} {}", k.name(), parts.join(", "));
    }
    let _ = writeln!(
        s,
        "outcomes by phase   (ok / origin non-2xx / edgepool error / other)"
    );
    for (p, a) in &ledger.by_phase {
        let _ = writeln!(
            s,
            "  {:<6} {:>5.0} s   {} / {} / {} / {}",
            p.name(),
            phase_secs.get(p).copied().unwrap_or(0.0),
            a[0],
            a[1],
            a[2],
            a[3]
        );
    }
    let _ = writeln!(
        s,
        "ledger              unaccounted {} | lost {} | hangs {} | mismatched {} | duplicate POSTs {} | POST sent=none but arrived {} | POST ok but not at origin {} | phantom {} | body aborted {}",
        unaccounted, ledger.lost, ledger.hangs, ledger.mismatched, dup_posts, sent_none_arrived, ok_not_arrived, phantom, ledger.body_aborted
    );
    let _ = writeln!(
        s,
        "                    GET ids seen twice+ at origins (allowed retries) {get_replays}; slow>timeout answered 2xx {}; unlabelled origin requests {unlabelled}",
        ledger.timeout_not_enforced
    );
    let _ = writeln!(
        s,
        "RSS MiB             start {:.1} (t={:.0}s)  honest-load end {:.1} (t={:.0}s, limit {:.1})  attack floor {} (limit {:.1})  end {:.1}  peak {:.1}  growth {:+.1} %",
        mib(warm.rss_kib),
        warm.t,
        mib(honest_end.rss_kib),
        honest_end.t,
        mib(honest_limit),
        attack_floor
            .as_ref()
            .map_or("-".to_string(), |f| format!("{:.1} (t={:.0}s)", mib(f.rss_kib), f.t)),
        mib(floor_limit),
        mib(last.rss_kib),
        mib(peak_rss),
        100.0 * (last.rss_kib as f64 / warm.rss_kib.max(1) as f64 - 1.0),
    );
    let _ = writeln!(
        s,
        "RSS trend           {rss_slope:+.2} MiB/min from warm-up to the end (least squares); test process RSS {:.0} MiB",
        mib(own_rss)
    );
    let _ = writeln!(
        s,
        "FDs                 start {}  end {}  peak {}; outside the pool: start {}  end {}  (limit {})",
        warm.fds,
        last.fds,
        peak_fds,
        warm.fds_outside_pool(),
        last.fds_outside_pool(),
        fd_limit
    );
    let _ = writeln!(
        s,
        "pool open/idle      start {}  end {}",
        pool_str(warm.pool),
        pool_str(last.pool)
    );
    let _ = writeln!(
        s,
        "gateway             {}; log: {warns} WARN, {errors} ERROR lines",
        if alive { "running at the end" } else { "DIED" }
    );
    let _ = writeln!(
        s,
        "samples             t(s)  rss(MiB)  fds  open/idle  requests"
    );
    for x in &samples {
        let _ = writeln!(
            s,
            "                    {:>5.0} {:>8.1} {:>5} {:>10} {:>9}",
            x.t,
            mib(x.rss_kib),
            x.fds,
            pool_str(x.pool),
            x.completed
        );
    }
    let mut per_target = |label: &str, x: &Sample| {
        let _ = writeln!(
            s,
            "pool by target at {label} (t={:.0}s): active/idle, new connections by reason",
            x.t
        );
        for t in x
            .targets
            .as_ref()
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let _ = writeln!(
                s,
                "  {:<24} {:<18} {:>4}/{:<4} {}",
                t["target"].as_str().unwrap_or("?"),
                labels
                    .get(t["target"].as_str().unwrap_or("?"))
                    .copied()
                    .unwrap_or(""),
                t["active"],
                t["idle"],
                t["new_by_reason"]
            );
        }
    };
    if let Some(p) = &peak_pool {
        per_target("the pool's peak", p);
    }
    per_target("the end", &last);
    if !ledger.examples.is_empty() {
        let _ = writeln!(s, "examples:");
        for e in &ledger.examples {
            let _ = writeln!(s, "  {e}");
        }
    }
    let _ = writeln!(
        s,
        "==============================================================="
    );
    eprintln!("{s}");
    if !alive || ledger.lost + ledger.hangs + ledger.mismatched > 0 || errors > 0 {
        eprintln!("edgepool log (last lines):\n{log_tail}");
    }

    // Honest workers beside the attacker: no admission refusal, latency within 2x.
    let p99 = |v: &mut Vec<u64>| -> f64 {
        v.sort_unstable();
        if v.is_empty() {
            return 0.0;
        }
        v[((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1] as f64 / 1000.0
    };
    let (q99, a99) = (p99(&mut ledger.lat_quiet), p99(&mut ledger.lat_attack));
    if let Some(a) = &attack_report {
        eprintln!(
            "soak attack (127.0.0.2, second half): {a}; honest normal requests p99 {q99:.1} ms quiet ({} requests) vs {a99:.1} ms under attack ({} requests)",
            ledger.lat_quiet.len(),
            ledger.lat_attack.len()
        );
    }
    let refused: u64 = [
        "overloaded",
        "worker_share_limit",
        "tunnel_limit",
        "memory_budget",
        "worker_connection_limit",
    ]
    .iter()
    .map(|t| ledger.edge.get(*t).copied().unwrap_or(0))
    .sum();
    assert_eq!(
        refused, 0,
        "honest workers were refused by admission limits"
    );
    if attack_report.is_some() {
        assert!(
            !ledger.lat_attack.is_empty() && !ledger.lat_quiet.is_empty(),
            "no normal request completed in one of the halves"
        );
        assert!(
            a99 <= 2.0 * q99 + 10.0,
            "honest p99 under attack {a99:.1} ms is more than 2x the quiet {q99:.1} ms (+10 ms)"
        );
    }
    assert!(alive, "edgepool exited during the soak");
    assert!(ledger.ok > 0, "no request succeeded");
    assert_eq!(unaccounted, 0, "requests without an outcome");
    assert_eq!(
        ledger.lost, 0,
        "lost requests (transport error, no response)"
    );
    assert_eq!(
        ledger.hangs, 0,
        "hung requests (no answer within {REQUEST_TIMEOUT:?})"
    );
    assert_eq!(
        ledger.mismatched, 0,
        "responses that answer another request"
    );
    assert_eq!(dup_posts, 0, "POSTs that reached an origin twice");
    assert_eq!(
        sent_none_arrived, 0,
        "POSTs reported request-sent=none that reached an origin"
    );
    assert_eq!(
        ok_not_arrived, 0,
        "POSTs answered 2xx that no origin received"
    );
    assert_eq!(phantom, 0, "origin requests with a ledger id nobody issued");
    assert!(
        honest_end.rss_kib <= honest_limit,
        "RSS grew under honest load from {:.1} MiB (t={:.0}s) to {:.1} MiB (t={:.0}s), over the \
         {:.1} MiB bound",
        mib(warm.rss_kib),
        warm.t,
        mib(honest_end.rss_kib),
        honest_end.t,
        mib(honest_limit),
    );
    if let Some(f) = &attack_floor {
        assert!(
            f.rss_kib <= floor_limit,
            "RSS never came back down while the attacker ran: its lowest sample, {:.1} MiB \
             (t={:.0}s), is over the {:.1} MiB bound (warm-up {:.1} MiB at t={:.0}s)",
            mib(f.rss_kib),
            f.t,
            mib(floor_limit),
            mib(warm.rss_kib),
            warm.t
        );
    }
    assert!(
        warm.pool.is_some() && last.pool.is_some(),
        "the admin /status did not answer for the warm-up or the final sample"
    );
    assert!(
        last.fds_outside_pool() <= fd_limit,
        "file descriptors outside the pool grew from {} (t={:.0}s; {} open in all) to {} \
         ({} open in all), over the bound {}",
        warm.fds_outside_pool(),
        warm.t,
        warm.fds,
        last.fds_outside_pool(),
        last.fds,
        fd_limit
    );
    drop(gw);
    relay.stop().await;
}
