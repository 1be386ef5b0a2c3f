//! HTTP/2 origin server built on the `h2` crate; every stream is served in
//! its own task.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, Instant};

use super::origin::{Recorded, Shared, HANDSHAKE_TIMEOUT};
use super::routes::{self, Action, Incoming};

/// Largest accepted request body.
const MAX_BODY: usize = 64 << 20;
/// Time allowed to receive a whole request body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// After a GOAWAY, how long in-flight streams may take before the connection
/// is dropped anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest DATA payload queued at once.
const WRITE_CHUNK: usize = 64 * 1024;

/// Serves HTTP/2 on `io` until the connection ends.
pub(crate) async fn serve<S>(io: S, conn_id: u64, peer: SocketAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &shared.cfg;
    let mut builder = h2::server::Builder::new();
    if let Some(max) = cfg.max_concurrent_streams {
        builder.max_concurrent_streams(max);
    }
    let mut conn = match timeout(HANDSHAKE_TIMEOUT, builder.handshake::<S, Bytes>(io)).await {
        Ok(Ok(conn)) => conn,
        _ => return,
    };
    // `/close` streams ask the connection task for a GOAWAY through this.
    let (close_tx, mut close_rx) = mpsc::unbounded_channel::<()>();
    let mut streams = JoinSet::new();
    let mut index = 0u64;
    let mut idle_since = Instant::now();
    // Set once a graceful shutdown started: the drain deadline.
    let mut going_away: Option<Instant> = None;
    loop {
        let idle_at = match (cfg.idle_timeout, going_away) {
            (Some(after), None) if streams.is_empty() => Some(idle_since + after),
            _ => None,
        };
        let mut start_goaway = false;
        tokio::select! {
            res = conn.accept() => match res {
                Some(Ok((req, respond))) => {
                    index += 1;
                    streams.spawn(serve_stream(
                        req,
                        respond,
                        (conn_id, index, peer),
                        shared.clone(),
                        close_tx.clone(),
                    ));
                    if cfg.max_requests_per_conn.is_some_and(|n| index >= n) {
                        start_goaway = true;
                    }
                }
                Some(Err(_)) | None => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle_since = Instant::now();
                }
            }
            Some(()) = close_rx.recv() => start_goaway = true,
            _ = sleep_until(idle_at.unwrap_or_else(Instant::now)), if idle_at.is_some() => {
                start_goaway = true;
            }
            _ = sleep_until(going_away.unwrap_or_else(Instant::now)), if going_away.is_some() => {
                break;
            }
        }
        if start_goaway && going_away.is_none() {
            conn.graceful_shutdown();
            going_away = Some(Instant::now() + DRAIN_TIMEOUT);
        }
    }
    // Dropping `conn` closes the socket; dropping `streams` aborts leftovers.
}

async fn serve_stream(
    req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    (conn_id, index, peer): (u64, u64, SocketAddr),
    shared: Arc<Shared>,
    close_tx: mpsc::UnboundedSender<()>,
) {
    let (parts, mut recv) = req.into_parts();
    let mut body = Vec::new();
    let read_body = async {
        while let Some(chunk) = recv.data().await {
            let Ok(chunk) = chunk else {
                return Err(Reason::CANCEL);
            };
            let _ = recv.flow_control().release_capacity(chunk.len());
            if body.len() + chunk.len() > MAX_BODY {
                return Err(Reason::REFUSED_STREAM);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match timeout(REQUEST_TIMEOUT, read_body).await {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => return respond.send_reset(reason),
        Err(_) => return respond.send_reset(Reason::CANCEL),
    }

    let method = parts.method.as_str();
    let target = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let mut headers = Vec::with_capacity(parts.headers.len() + 1);
    if let Some(authority) = parts.uri.authority() {
        headers.push((":authority".to_string(), authority.to_string()));
    }
    for (name, value) in parts.headers.iter() {
        headers.push((
            name.as_str().to_string(),
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        ));
    }
    let _in_flight = shared.in_flight();
    shared.record(Recorded {
        conn_id,
        index_on_conn: index,
        method: method.to_string(),
        path: target.to_string(),
        headers: headers.clone(),
        body: body.clone(),
        version: "HTTP/2".to_string(),
        peer,
    });
    let action = routes::route(&Incoming {
        method,
        target,
        headers: &headers,
        body: &body,
        version: "HTTP/2",
        conn_id,
        index_on_conn: index,
        peer,
    });
    let planned = match action {
        Action::Reset => return respond.send_reset(Reason::INTERNAL_ERROR),
        Action::Respond(planned) => planned,
    };
    let delay = shared.cfg.response_delay.unwrap_or_default() + planned.delay.unwrap_or_default();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let len = planned.body.len();
    let has_body = routes::status_has_body(planned.status);
    let send_body = has_body && method != "HEAD" && len > 0;
    let mut builder = http::Response::builder()
        .status(planned.status)
        .header("server", "edgepool-test-origin")
        .header("x-origin-conn", conn_id)
        .header("x-origin-index", index)
        .header("x-origin-peer", peer.ip().to_string());
    for (name, value) in &planned.headers {
        builder = builder.header(*name, value.as_str());
    }
    // `/chunked/N` has no HTTP/2 equivalent; it is sent without a length.
    if has_body && !planned.chunked {
        builder = builder.header("content-length", len);
    }
    let response = builder.body(()).expect("valid response head");
    let Ok(mut send) = respond.send_response(response, !send_body) else {
        return;
    };
    if send_body {
        // Several DATA frames for `/chunked/N`, as for HTTP/1.1.
        let max_piece = if planned.chunked {
            len.div_ceil(4).clamp(1, 16 * 1024) as usize
        } else {
            WRITE_CHUNK
        };
        let mut offset = 0u64;
        while offset < len {
            let want = (max_piece as u64).min(len - offset) as usize;
            send.reserve_capacity(want);
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                _ => return,
            };
            if granted == 0 {
                tokio::task::yield_now().await;
                continue;
            }
            let n = granted.min(want);
            let piece = planned.body.piece(offset, n);
            offset += n as u64;
            if send.send_data(Bytes::from(piece), offset == len).is_err() {
                return;
            }
        }
    }
    if planned.close {
        let _ = close_tx.send(());
    }
}
