//! hyper_floor: the least a forward proxy built on tokio and hyper can do per request, as a
//! yardstick for `bench/compare.sh` (`FLOOR=1`). It is not edgepool and not a product.
//!
//! It does only what the nginx peer in that bench does: every worker request, whatever its
//! absolute-form target, goes in origin form to ONE fixed upstream, over a pool of HTTP/1.1
//! keep-alive connections (hyper's client connection, each driven by its own task, as in
//! edgepool). No routing, no DNS, no accounting, no hop-by-hop stripping, no framing checks, no
//! logging, no limits, no retries; a request whose upstream connection fails gets a bare 502.
//! Whatever edgepool costs above this row is edgepool's own work; what this row costs above
//! nginx is the tokio + hyper stack's.
//!
//! ```text
//! cargo build --release --example hyper_floor
//! target/release/examples/hyper_floor --listen 127.0.0.1:8081 --upstream 127.0.0.1:8080
//! ```
//!
//! Threads: tokio's multi-thread runtime, one worker per CPU unless `TOKIO_WORKER_THREADS` says
//! otherwise (edgepool's default). It runs until killed or interrupted (Ctrl-C).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};

type Idle = Arc<Mutex<Vec<SendRequest<Incoming>>>>;
type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;

/// The upstream response body; gives its connection back to the idle list once it has ended.
struct Returning {
    inner: Incoming,
    back: Option<(SendRequest<Incoming>, Idle)>,
}

impl Returning {
    fn give_back(&mut self) {
        if let Some((send, idle)) = self.back.take() {
            idle.lock().push(send);
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            // An error: the connection is not given back (dropping it closes it).
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn bad_gateway() -> Response<BoxBody> {
    let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

/// An idle connection that can take a request, or a new one.
async fn checkout(idle: &Idle, upstream: SocketAddr) -> Option<SendRequest<Incoming>> {
    loop {
        let Some(mut send) = idle.lock().pop() else {
            break;
        };
        if send.ready().await.is_ok() {
            return Some(send);
        }
    }
    let tcp = TcpStream::connect(upstream).await.ok()?;
    tcp.set_nodelay(true).ok()?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(send)
}

async fn proxy(
    mut req: Request<Incoming>,
    idle: Idle,
    upstream: SocketAddr,
) -> Result<Response<BoxBody>, Infallible> {
    // Origin form for the upstream, as nginx's proxy_pass sends it.
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *req.uri_mut() = match Uri::try_from(path) {
        Ok(u) => u,
        Err(_) => return Ok(bad_gateway()),
    };
    let Some(mut send) = checkout(&idle, upstream).await else {
        return Ok(bad_gateway());
    };
    match send.send_request(req).await {
        Ok(resp) => {
            let (parts, inner) = resp.into_parts();
            let mut body = Returning {
                inner,
                back: Some((send, idle)),
            };
            if body.is_end_stream() {
                body.give_back();
            }
            Ok(Response::from_parts(parts, body.boxed_unsync()))
        }
        Err(_) => Ok(bad_gateway()),
    }
}

fn usage() -> ! {
    eprintln!("usage: hyper_floor --listen ADDR:PORT --upstream ADDR:PORT");
    std::process::exit(2)
}

fn main() {
    let mut listen: Option<SocketAddr> = None;
    let mut upstream: Option<SocketAddr> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let slot = match a.as_str() {
            "--listen" => &mut listen,
            "--upstream" => &mut upstream,
            _ => usage(),
        };
        *slot = Some(
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage()),
        );
    }
    let (Some(listen), Some(upstream)) = (listen, upstream) else {
        usage()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await.expect("bind --listen");
        let idle: Idle = Arc::default();
        // Ctrl-C (SIGINT) ends it normally, so a profiler running it writes its output.
        let stop = tokio::signal::ctrl_c();
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = &mut stop => return,
            };
            let Ok((tcp, _)) = accepted else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let idle = idle.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| proxy(req, idle.clone(), upstream));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
}
