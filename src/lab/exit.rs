//! A lab exit: a minimal HTTP CONNECT proxy on loopback that counts the tunnels it opens
//! (every tunnel is a new TCP + TLS connection to a target through that exit).
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A CONNECT-only proxy on 127.0.0.1.
pub struct LabExit {
    addr: SocketAddr,
    tunnels: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LabExit {
    /// Listens on 127.0.0.1:0.
    pub async fn start() -> std::io::Result<LabExit> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let tunnels = Arc::new(AtomicU64::new(0));
        let t = tunnels.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let t = t.clone();
                tokio::spawn(async move {
                    let _ = serve(s, t).await;
                });
            }
        });
        Ok(LabExit {
            addr,
            tunnels,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Tunnels opened so far.
    pub fn tunnels(&self) -> u64 {
        self.tunnels.load(Ordering::Relaxed)
    }
}

impl Drop for LabExit {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut s: TcpStream, tunnels: Arc<AtomicU64>) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_len = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 16 * 1024 {
            return Ok(());
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let target = match req.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) if req.method == Some("CONNECT") => {
            req.path.unwrap_or_default().to_string()
        }
        _ => {
            s.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await?;
            return Ok(());
        }
    };
    let target = target.replace("localhost:", "127.0.0.1:");
    let mut up = match TcpStream::connect(&target).await {
        Ok(u) => u,
        Err(_) => {
            s.write_all(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
            return Ok(());
        }
    };
    let _ = up.set_nodelay(true);
    tunnels.fetch_add(1, Ordering::Relaxed);
    s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    if buf.len() > head_len {
        up.write_all(&buf[head_len..]).await?;
    }
    let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
    Ok(())
}
