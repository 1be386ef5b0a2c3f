//! The admin-listener client and the commands that read from it: `status` (the table, or the
//! raw JSON, optionally redrawn every 2 s), `report` (the reuse-killers ranking over a window)
//! and `trace` (the per-request trace log, streamed). The bearer token, when the admin
//! listener needs one, comes from `EDGEPOOL_ADMIN_TOKEN`.
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use super::{runtime, CliError};

/// The environment variable holding the admin listener's bearer token.
pub const TOKEN_ENV: &str = "EDGEPOOL_ADMIN_TOKEN";

/// Why an admin GET failed. Each names what to do: an unreachable listener, a missing token,
/// and a proxy port given where the admin port belongs.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Nothing accepts connections at the address.
    #[error("cannot reach the admin listener at {admin}: {source}")]
    Connect {
        /// The address given.
        admin: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed (handshake, request or body).
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built (e.g. a path that is not a valid URI).
    #[error("{0}")]
    Request(#[from] http::Error),
    /// The admin listener wants a bearer token (`401`).
    #[error("{path}: the admin listener needs its bearer token: set EDGEPOOL_ADMIN_TOKEN")]
    Unauthorized {
        /// The path asked for.
        path: String,
    },
    /// The address is edgepool's proxy listener, not its admin listener.
    #[error(
        "{admin} is an edgepool proxy listener, not the admin listener; --admin \
         takes listen.admin (default 127.0.0.1:9180)"
    )]
    ProxyListener {
        /// The address given.
        admin: SocketAddr,
    },
    /// Any other non-success answer.
    #[error("{path}: the gateway answered {status}")]
    Status {
        /// The path asked for.
        path: String,
        /// The status received.
        status: http::StatusCode,
    },
}

/// GET `path` on the admin listener at `admin` (HTTP/1.1, bearer `token` if given), handing
/// each body chunk to `each` until it returns `false`.
pub async fn admin_get(
    admin: SocketAddr,
    path: &str,
    token: Option<&str>,
    mut each: impl FnMut(&[u8]) -> bool,
) -> Result<(), AdminError> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|source| AdminError::Connect { admin, source })?;
    let (mut send, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(stream))
    .await?;
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header("host", admin.to_string());
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {}", token.trim()));
    }
    let req = req.body(http_body_util::Empty::new())?;
    let resp = send.send_request(req).await?;
    if resp.status() == http::StatusCode::UNAUTHORIZED {
        return Err(AdminError::Unauthorized { path: path.into() });
    }
    if !resp.status().is_success() {
        // The proxy listener answers admin paths with its own error: a wrong port.
        if resp.headers().contains_key("x-edgepool-error") {
            return Err(AdminError::ProxyListener { admin });
        }
        return Err(AdminError::Status {
            path: path.into(),
            status: resp.status(),
        });
    }
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            if !each(d) {
                break;
            }
        }
    }
    Ok(())
}

/// [`admin_get`] on a runtime of its own, with the token from [`TOKEN_ENV`].
fn get_blocking(
    admin: SocketAddr,
    path: &str,
    each: impl FnMut(&[u8]) -> bool,
) -> Result<(), CliError> {
    let token = std::env::var(TOKEN_ENV).ok();
    let rt = runtime().map_err(CliError::Runtime)?;
    Ok(rt.block_on(admin_get(admin, path, token.as_deref(), each))?)
}

/// The whole body of an admin GET.
fn body_blocking(admin: SocketAddr, path: &str) -> Result<Vec<u8>, CliError> {
    let mut body = Vec::new();
    get_blocking(admin, path, |d| {
        body.extend_from_slice(d);
        true
    })?;
    Ok(body)
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    url::form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

/// `edgepool status`: the table (or with `json` the raw document); with `watch`, redrawn
/// every 2 s until interrupted, a failed fetch (gateway restarting) reported and retried.
pub fn status(admin: SocketAddr, json: bool, watch: bool) -> Result<(), CliError> {
    watching(watch, json, || status_once(admin, json))
}

/// `edgepool status --fleet`: every node's `/status` fetched at once (each within
/// [`FLEET_NODE_TIMEOUT`]; a node that does not answer is shown down, not waited for), then
/// the fleet table ([`super::fleet`]) or with `json` the fleet document.
pub fn fleet_status(nodes: &[SocketAddr], json: bool, watch: bool) -> Result<(), CliError> {
    watching(watch, json, || {
        let answers = fetch_fleet(nodes)?;
        let v = super::fleet::aggregate(&answers);
        if json {
            println!("{v}");
        } else {
            print!("{}", super::fleet::fleet_table(&v));
        }
        Ok(())
    })
}

/// How long `status --fleet` waits for one node's `/status`.
pub const FLEET_NODE_TIMEOUT: Duration = Duration::from_secs(5);

fn fetch_fleet(nodes: &[SocketAddr]) -> Result<Vec<super::fleet::NodeStatus>, CliError> {
    let token = std::env::var(TOKEN_ENV).ok();
    let rt = runtime().map_err(CliError::Runtime)?;
    Ok(rt.block_on(async {
        let fetches = nodes.iter().map(|addr| {
            let token = token.clone();
            async move {
                let mut body = Vec::new();
                let got = tokio::time::timeout(
                    FLEET_NODE_TIMEOUT,
                    admin_get(*addr, "/status", token.as_deref(), |d| {
                        body.extend_from_slice(d);
                        true
                    }),
                )
                .await;
                let doc = match got {
                    Err(_) => Err(format!("no answer within {FLEET_NODE_TIMEOUT:?}")),
                    Ok(Err(e)) => Err(e.to_string()),
                    Ok(Ok(())) => serde_json::from_slice::<Value>(&body)
                        .map_err(|e| format!("/status is not JSON: {e}")),
                };
                (addr.to_string(), doc)
            }
        });
        futures_util::future::join_all(fetches).await
    }))
}

/// Runs `once`, or with `watch` redraws it every 2 s until interrupted, a failure (a gateway
/// restarting) reported and retried.
fn watching(
    watch: bool,
    json: bool,
    mut once: impl FnMut() -> Result<(), CliError>,
) -> Result<(), CliError> {
    if !watch {
        return once();
    }
    loop {
        if !json {
            // Clear the screen and home the cursor, then redraw.
            print!("\x1b[2J\x1b[H");
        }
        if let Err(e) = once() {
            eprintln!("{}", super::failure_text(&e));
        }
        #[allow(clippy::disallowed_methods)] // status --watch: the main thread, no runtime
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn status_once(admin: SocketAddr, json: bool) -> Result<(), CliError> {
    let body = body_blocking(admin, "/status")?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let v: Value = serde_json::from_slice(&body).map_err(|source| CliError::Answer {
        path: "/status",
        source,
    })?;
    print!("{}", super::status_table(&v));
    Ok(())
}

/// The admin path of `edgepool report --window <window>`, refusing a window the store
/// cannot answer before anything is asked.
pub fn report_path(window: &str) -> Result<String, CliError> {
    crate::report::parse_window(window).map_err(CliError::Window)?;
    Ok(format!("/report?window={}", encode(window)))
}

/// `edgepool report`: the ranking table, or with `json` the raw document.
pub fn report(admin: SocketAddr, window: &str, json: bool) -> Result<(), CliError> {
    let path = report_path(window)?;
    let body = body_blocking(admin, &path)?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let r: crate::report::Report =
        serde_json::from_slice(&body).map_err(|source| CliError::Answer {
            path: "/report",
            source,
        })?;
    print!("{}", r.render_table());
    Ok(())
}

/// The admin path of `edgepool trace [--target T]`.
pub fn trace_path(target: Option<&str>) -> String {
    match target {
        Some(t) => format!("/trace?target={}", encode(t)),
        None => "/trace".to_string(),
    }
}

/// Turns the `/trace` stream (JSON lines, in chunks cut anywhere) into what `edgepool trace`
/// prints: each record as [`trace_text`](super::trace_text), or with `json` the line itself.
/// A line that is not JSON is skipped in the human format.
#[derive(Debug, Default)]
pub struct TraceLines {
    json: bool,
    pending: Vec<u8>,
}

impl TraceLines {
    /// A splitter printing JSON lines (`json`) or the human format.
    pub fn new(json: bool) -> Self {
        Self {
            json,
            pending: Vec::new(),
        }
    }

    /// Takes the next chunk; returns the text of every line it completes, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(chunk);
        let mut texts = Vec::new();
        while let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if self.json {
                texts.push(format!("{line}\n"));
            } else if let Ok(v) = serde_json::from_str::<Value>(&line) {
                texts.push(super::trace_text(&v));
            }
        }
        texts
    }
}

/// `edgepool trace`: streams the trace log to stdout until the gateway ends it; a closed
/// pipe (`edgepool trace | head`) ends the stream quietly.
pub fn trace(admin: SocketAddr, target: Option<&str>, json: bool) -> Result<(), CliError> {
    let mut lines = TraceLines::new(json);
    get_blocking(admin, &trace_path(target), |chunk| {
        let mut out = std::io::stdout().lock();
        lines.push(chunk).iter().all(|text| {
            out.write_all(text.as_bytes())
                .and_then(|_| out.flush())
                .is_ok()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server answering `response`; returns its address and the request.
    async fn answer_once(response: &'static str) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "request cut short");
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(response.as_bytes()).await.unwrap();
            String::from_utf8(req).unwrap()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn admin_get_streams_the_body_and_sends_the_token() {
        let (addr, req) = answer_once("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        let mut body = Vec::new();
        admin_get(addr, "/status", Some(" s3cret\n"), |d| {
            body.extend_from_slice(d);
            true
        })
        .await
        .unwrap();
        assert_eq!(body, b"hello");
        let req = req.await.unwrap().to_ascii_lowercase();
        assert!(req.starts_with("get /status http/1.1\r\n"), "{req}");
        assert!(req.contains("authorization: bearer s3cret\r\n"), "{req}");
    }

    #[tokio::test]
    async fn admin_get_errors_are_typed_and_say_what_to_do() {
        let (addr, _) = answer_once("HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n").await;
        let e = admin_get(addr, "/status", None, |_| true)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, AdminError::Unauthorized { path } if path == "/status"),
            "{e:?}"
        );
        assert!(e.to_string().contains("set EDGEPOOL_ADMIN_TOKEN"), "{e}");

        let (addr, _) = answer_once(
            "HTTP/1.1 400 Bad Request\r\nx-edgepool-error: bad_request\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let e = admin_get(addr, "/report", None, |_| true)
            .await
            .unwrap_err();
        assert!(
            matches!(e, AdminError::ProxyListener { admin } if admin == addr),
            "{e:?}"
        );
        assert!(e.to_string().contains("--admin takes listen.admin"), "{e}");

        let (addr, _) =
            answer_once("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
        let e = admin_get(addr, "/status", None, |_| true)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/status: the gateway answered 503 Service Unavailable"
        );

        // Nothing listening.
        let closed = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let e = admin_get(closed, "/status", None, |_| true)
            .await
            .unwrap_err();
        assert!(
            matches!(e, AdminError::Connect { admin, .. } if admin == closed),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("cannot reach the admin listener at {closed}: ")),
            "{e}"
        );
    }

    #[test]
    fn query_values_are_encoded_and_windows_checked_first() {
        assert_eq!(trace_path(None), "/trace");
        assert_eq!(
            trace_path(Some("a b.example:443&x=1")),
            "/trace?target=a+b.example%3A443%26x%3D1"
        );
        assert_eq!(report_path("24h").unwrap(), "/report?window=24h");
        let e = report_path("9d").unwrap_err();
        assert!(matches!(e, CliError::Window(_)), "{e:?}");
        assert!(e.to_string().contains("at most 8d"), "{e}");
    }

    #[test]
    fn trace_lines_survive_any_chunking() {
        let record = r#"{"kind":"lagged","dropped":3}"#;
        let stream = format!("{record}\nnot json\n{record}\n");
        for cut in 0..stream.len() {
            let mut human = TraceLines::new(false);
            let mut texts = human.push(&stream.as_bytes()[..cut]);
            texts.extend(human.push(&stream.as_bytes()[cut..]));
            let lagged = "// trace fell behind: 3 records dropped\n\n";
            assert_eq!(texts, [lagged, lagged], "cut at {cut}");

            let mut raw = TraceLines::new(true);
            let mut texts = raw.push(&stream.as_bytes()[..cut]);
            texts.extend(raw.push(&stream.as_bytes()[cut..]));
            assert_eq!(texts.concat(), stream, "cut at {cut}");
        }
        // An unfinished line waits for its newline.
        assert!(TraceLines::new(true).push(record.as_bytes()).is_empty());
    }
}
