//! Runs the real edgepool gateway in-process on port 0 for end-to-end tests.
#![allow(dead_code)]
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use edgepool::config::Config;
use edgepool::gateway::Gateway;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// One GET through `worker`, body read; panics on transport errors.
pub async fn get(worker: &reqwest::Client, url: &str) -> reqwest::StatusCode {
    let r = worker.get(url).send().await.unwrap();
    let status = r.status();
    r.bytes().await.unwrap();
    status
}

/// A gateway on loopback, allowed to reach loopback targets, trusting `extra_ca` for targets.
pub struct TestGateway {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub gw: Arc<Gateway>,
    pub data_dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestGateway {
    /// Starts with the embedded defaults plus loopback targets allowed.
    pub async fn start(extra_ca: &[PathBuf]) -> TestGateway {
        Self::start_with(extra_ca, |_| {}).await
    }

    /// Starts after `tweak` adjusts the configuration.
    pub async fn start_with(extra_ca: &[PathBuf], tweak: impl FnOnce(&mut Config)) -> TestGateway {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config {
            data_dir: Some(data_dir.path().to_path_buf()),
            ..Default::default()
        };
        cfg.targets.allow = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        // Test origins listen on ephemeral ports.
        cfg.targets.connect_ports = vec!["1-65535".parse().unwrap()];
        cfg.upstream.extra_ca_files = extra_ca.to_vec();
        tweak(&mut cfg);
        cfg.validate().expect("test config is valid");
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (proxy_addr, admin_addr) = (proxy.local_addr().unwrap(), admin.local_addr().unwrap());
        let gw = Gateway::new(cfg).expect("gateway starts");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gw.clone().serve(proxy, admin, async move {
            let _ = rx.await;
        }));
        TestGateway {
            proxy: proxy_addr,
            admin: admin_addr,
            gw,
            data_dir,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy)
    }

    /// Path of the gateway's CA certificate.
    pub fn ca_path(&self) -> PathBuf {
        edgepool::ca::CertAuthority::cert_path(self.data_dir.path())
    }

    pub fn ca_pem(&self) -> String {
        self.gw.ca().cert_pem().to_string()
    }

    /// A worker: reqwest through the gateway, trusting only the gateway's CA.
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(self.proxy_url()).unwrap())
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem().as_bytes()).unwrap())
            .build()
            .unwrap()
    }

    /// GET on the admin listener.
    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{}{}", self.admin, path))
            .send()
            .await
            .unwrap()
    }

    pub async fn status(&self) -> serde_json::Value {
        self.admin_get("/status").await.json().await.unwrap()
    }

    /// The `/status` row of one target (`host:port`).
    pub async fn target_status(&self, target: &str) -> serde_json::Value {
        let s = self.status().await;
        s["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["target"] == target)
            .cloned()
            .unwrap_or_else(|| panic!("no status row for {target} in {s:#}"))
    }

    /// Waits (up to 2 s) until `/status` counts `n` connections closed for `reason`.
    pub async fn wait_closed(&self, reason: &str, n: u64) -> bool {
        for _ in 0..100 {
            if self.status().await["fleet"]["closed_by_reason"][reason] == n {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        false
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.text().await.unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}
