//! Request routing shared by the HTTP/1.1 and HTTP/2 origin servers.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

/// Largest body `/bytes/N` and `/chunked/N` will produce (1 GiB).
pub(crate) const MAX_GENERATED: u64 = 1 << 30;
/// Longest `/slow?ms=N` delay honoured (60 s).
const MAX_SLOW_MS: u64 = 60_000;

/// `n` bytes of the deterministic pattern served by `GET /bytes/N`:
/// byte `i` is `(i % 251) as u8`.
pub fn pattern_bytes(n: usize) -> Vec<u8> {
    pattern_chunk(0, n)
}

/// `len` pattern bytes starting at absolute offset `offset`.
pub(crate) fn pattern_chunk(offset: u64, len: usize) -> Vec<u8> {
    let start = offset % 251;
    (0..len as u64).map(|i| ((start + i) % 251) as u8).collect()
}

/// A fully received request, as seen by the router.
pub(crate) struct Incoming<'a> {
    pub method: &'a str,
    /// Request target as received (origin-form path plus query, or
    /// absolute-form for requests sent in proxy form).
    pub target: &'a str,
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
    pub version: &'a str,
    pub conn_id: u64,
    pub index_on_conn: u64,
    /// TCP peer address of the connection.
    pub peer: SocketAddr,
}

/// Response body to produce.
pub(crate) enum Body {
    Full(Bytes),
    /// `N` bytes of the deterministic pattern.
    Pattern(u64),
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Full(b) => b.len() as u64,
            Body::Pattern(n) => *n,
        }
    }

    /// `len` bytes of the body starting at `offset`.
    pub fn piece(&self, offset: u64, len: usize) -> Vec<u8> {
        match self {
            Body::Full(bytes) => bytes[offset as usize..offset as usize + len].to_vec(),
            Body::Pattern(_) => pattern_chunk(offset, len),
        }
    }
}

/// What the server should do with a request.
pub(crate) enum Action {
    Respond(Planned),
    /// `/rst`: h1 closes the socket with RST, h2 resets the stream.
    Reset,
}

pub(crate) struct Planned {
    pub status: u16,
    /// End-to-end headers (lowercase names), excluding framing headers.
    pub headers: Vec<(&'static str, String)>,
    pub body: Body,
    /// `/close`: h1 `Connection: close`, h2 GOAWAY after the response.
    pub close: bool,
    /// `/chunked/N`: use chunked transfer-encoding (h1 only).
    pub chunked: bool,
    /// Extra delay from `/slow?ms=N`.
    pub delay: Option<Duration>,
}

impl Planned {
    fn new(status: u16, content_type: &str, body: Body) -> Planned {
        Planned {
            status,
            headers: vec![("content-type", content_type.to_string())],
            body,
            close: false,
            chunked: false,
            delay: None,
        }
    }

    fn text(status: u16, text: String) -> Planned {
        Planned::new(status, "text/plain", Body::Full(Bytes::from(text)))
    }
}

/// Whether a response with this status may carry a body.
pub(crate) fn status_has_body(status: u16) -> bool {
    !(status < 200 || status == 204 || status == 304)
}

/// Strips the scheme and authority of an absolute-form target and splits off
/// the query: `http://h/a/b?x=1` -> (`/a/b`, `Some("x=1")`).
fn split_target(target: &str) -> (&str, Option<&str>) {
    let mut path = target;
    if let Some(pos) = path.find("://") {
        let rest = &path[pos + 3..];
        path = match rest.find('/') {
            Some(slash) => &rest[slash..],
            None => "/",
        };
    }
    match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    }
}

fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

pub(crate) fn route(req: &Incoming<'_>) -> Action {
    let (path, query) = split_target(req.target);
    if let Some(n) = path.strip_prefix("/bytes/") {
        return match n.parse::<u64>() {
            Ok(n) if n <= MAX_GENERATED => Action::Respond(Planned::new(
                200,
                "application/octet-stream",
                Body::Pattern(n),
            )),
            _ => Action::Respond(Planned::text(400, format!("bad byte count {n:?}\n"))),
        };
    }
    if let Some(n) = path.strip_prefix("/chunked/") {
        return match n.parse::<u64>() {
            Ok(n) if n <= MAX_GENERATED => {
                let mut planned = Planned::new(200, "application/octet-stream", Body::Pattern(n));
                planned.chunked = true;
                Action::Respond(planned)
            }
            _ => Action::Respond(Planned::text(400, format!("bad byte count {n:?}\n"))),
        };
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return match code.parse::<u16>() {
            Ok(code) if (200..=599).contains(&code) => {
                let body = if status_has_body(code) {
                    Bytes::from(format!("status {code}\n"))
                } else {
                    Bytes::new()
                };
                Action::Respond(Planned::new(code, "text/plain", Body::Full(body)))
            }
            _ => Action::Respond(Planned::text(400, format!("bad status {code:?}\n"))),
        };
    }
    if let Some(page) = page_route(path) {
        return Action::Respond(page);
    }
    match path {
        "/rst" => Action::Reset,
        "/close" => {
            let mut planned = echo(req);
            planned.close = true;
            Action::Respond(planned)
        }
        "/slow" => {
            let ms = query_param(query, "ms")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                .min(MAX_SLOW_MS);
            let mut planned = echo(req);
            planned.delay = Some(Duration::from_millis(ms));
            Action::Respond(planned)
        }
        // `/echo` and everything else.
        _ => Action::Respond(echo(req)),
    }
}

/// `/page/<n>`: an HTML page with a stylesheet, a deferred script and `n` (at most 64) SVG
/// images, all on the same origin; `/page/style.css`, `/page/app.js`, `/page/img/<i>.svg`.
/// Once the page has loaded, the script `fetch`es `/echo?from=page-js` and writes what it saw
/// (styles applied, images decoded, the fetch's status and `x-edgepool-reused`) as JSON into
/// `<pre id="result">`, for a browser's `--dump-dom`. `None` for any other path.
fn page_route(path: &str) -> Option<Planned> {
    let rest = path.strip_prefix("/page/")?;
    let text = |ctype: &str, body: String| Planned::new(200, ctype, Body::Full(Bytes::from(body)));
    Some(match rest {
        "style.css" => text(
            "text/css",
            "#title { color: rgb(1, 2, 3); }\nimg { width: 8px; height: 8px; }\n".into(),
        ),
        "app.js" => text("text/javascript", PAGE_JS.into()),
        _ => {
            if let Some(i) = rest
                .strip_prefix("img/")
                .and_then(|f| f.strip_suffix(".svg"))
            {
                let i: u8 = i.parse().ok()?;
                let svg = format!(
                    "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"8\" height=\"8\">\
                     <rect width=\"8\" height=\"8\" fill=\"#{i:02x}a0a0\"/></svg>"
                );
                text("image/svg+xml", svg)
            } else {
                let n: u8 = rest.parse().ok().filter(|n| *n <= 64)?;
                let imgs: String = (0..n)
                    .map(|i| format!("<img src=\"/page/img/{i}.svg\" alt=\"{i}\">"))
                    .collect();
                text(
                    "text/html; charset=utf-8",
                    format!(
                        "<!doctype html><html><head><meta charset=\"utf-8\">\
                         <title>edgepool test page</title>\
                         <link rel=\"stylesheet\" href=\"/page/style.css\">\
                         <script src=\"/page/app.js\" defer></script></head>\
                         <body><h1 id=\"title\">edgepool</h1>{imgs}\
                         <pre id=\"result\">pending</pre></body></html>"
                    ),
                )
            }
        }
    })
}

const PAGE_JS: &str = r#"window.addEventListener("load", async () => {
  const out = document.getElementById("result");
  const result = {
    js: true,
    color: getComputedStyle(document.getElementById("title")).color,
    images: [...document.images].map((i) => ({
      src: i.getAttribute("src"),
      loaded: i.complete && i.naturalWidth > 0,
    })),
    // The protocol the browser spoke for the page and each subresource (to the proxy's
    // interception, when there is one).
    protocols: performance
      .getEntriesByType("navigation")
      .concat(performance.getEntriesByType("resource"))
      .map((e) => e.nextHopProtocol),
  };
  try {
    const r = await fetch("/echo?from=page-js");
    const echo = await r.json();
    result.fetch = {
      status: r.status,
      reused: r.headers.get("x-edgepool-reused"),
      path: echo.path,
    };
  } catch (e) {
    result.fetch = { error: String(e) };
  }
  out.textContent = JSON.stringify(result);
});
"#;

/// The JSON echo of a request.
fn echo(req: &Incoming<'_>) -> Planned {
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers {
        let name = name.to_ascii_lowercase();
        let merged = match headers.remove(&name) {
            Some(serde_json::Value::String(prev)) => format!("{prev}, {value}"),
            _ => value.clone(),
        };
        headers.insert(name, serde_json::Value::String(merged));
    }
    let json = serde_json::json!({
        "method": req.method,
        "path": req.target,
        "headers": headers,
        "body": String::from_utf8_lossy(req.body),
        "conn_id": req.conn_id,
        "index_on_conn": req.index_on_conn,
        "version": req.version,
        "peer": req.peer.ip().to_string(),
    });
    let body = serde_json::to_vec(&json).expect("serialize echo");
    Planned::new(200, "application/json", Body::Full(Bytes::from(body)))
}
