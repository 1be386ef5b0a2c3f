//! splice: what ends a spliced byte stream — a blind CONNECT tunnel or an upgraded (WebSocket)
//! connection — besides either side closing it: an activity clock ([`ActivityIo`], [`idle_for`])
//! and the gateway's drain signal ([`Drain`]).
use std::sync::Arc;
use std::time::Duration;

/// The gateway's shutdown signal as connections see it: [`Drain::wait`] resolves once
/// shutdown starts (at once if it already has).
#[derive(Clone, Debug)]
pub struct Drain(tokio::sync::watch::Receiver<bool>);

impl Drain {
    /// A signal and the switch that raises it (`send_replace(true)`).
    pub fn channel() -> (tokio::sync::watch::Sender<bool>, Drain) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Drain(rx))
    }

    /// Resolves when shutdown starts.
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|d| *d).await;
    }
}

/// A stream that notes when bytes last moved through it, either way.
pub struct ActivityIo<T> {
    inner: T,
    last: Arc<parking_lot::Mutex<tokio::time::Instant>>,
}

impl<T> ActivityIo<T> {
    /// Wraps `inner`; the clock starts now.
    pub fn new(inner: T) -> Self {
        ActivityIo {
            inner,
            last: Arc::new(parking_lot::Mutex::new(tokio::time::Instant::now())),
        }
    }
    fn touch(&self) {
        *self.last.lock() = tokio::time::Instant::now();
    }
    /// When bytes last moved (shared; for [`idle_for`]).
    pub fn last(&self) -> Arc<parking_lot::Mutex<tokio::time::Instant>> {
        self.last.clone()
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves once nothing has moved for `limit` (by `last`).
pub async fn idle_for(last: &parking_lot::Mutex<tokio::time::Instant>, limit: Duration) {
    loop {
        let deadline = *last.lock() + limit;
        if deadline <= tokio::time::Instant::now() {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}
