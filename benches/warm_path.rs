//! Warm-path latency added by edgepool on loopback: the same client sends sequential requests
//! over a warm keep-alive connection, once directly to the origin and once through edgepool
//! (plain HTTP/1.1, and HTTPS intercepted by edgepool with a TLS origin), and we compare the
//! latency distributions. Run: `cargo bench --bench warm_path` (release profile).
//! Env: `WARM_PATH_SAMPLES` (default 20000).
#[path = "../tests/gw/mod.rs"]
mod gw;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{Origin, OriginConfig};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[allow(clippy::disallowed_methods)] // benchmark timer: wall time
async fn measure(client: &reqwest::Client, url: &str, n: usize) -> Vec<Duration> {
    for _ in 0..500 {
        client.get(url).send().await.unwrap().bytes().await.unwrap();
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        v.push(t.elapsed());
    }
    v.sort();
    v
}

fn report(name: &str, direct: &[Duration], proxied: &[Duration]) {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (d50, d99) = (percentile(direct, 0.5), percentile(direct, 0.99));
    let (p50, p99) = (percentile(proxied, 0.5), percentile(proxied, 0.99));
    println!(
        "{name:<28} direct p50 {:>7.1} µs p99 {:>7.1} µs | via edgepool p50 {:>7.1} µs p99 {:>7.1} µs | added p50 {:>7.1} µs p99 {:>7.1} µs",
        us(d50),
        us(d99),
        us(p50),
        us(p99),
        us(p50) - us(d50),
        us(p99) - us(d99)
    );
}

#[allow(clippy::disallowed_methods)] // main thread, after block_on: lets the gateway tasks end
fn main() {
    let n: usize = std::env::var("WARM_PATH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // Plain HTTP/1.1.
        let origin = Origin::start(OriginConfig::default()).await;
        let gwy = gw::TestGateway::start(&[]).await;
        let direct = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = origin.url("/bytes/512");
        let d = measure(&direct, &url, n).await;
        let p = measure(&gwy.client(), &url, n).await;
        report("http/1.1 plain, 512 B", &d, &p);

        // HTTPS: direct TLS to the origin vs TLS to edgepool (interception) + pooled TLS upstream.
        let tls_origin = Origin::start(OriginConfig {
            tls: true,
            ..Default::default()
        })
        .await;
        let gwy2 = gw::TestGateway::start(std::slice::from_ref(&tls_origin.ca().cert_path)).await;
        let direct = reqwest::Client::builder()
            .no_proxy()
            .http1_only()
            .tls_built_in_root_certs(false)
            .add_root_certificate(tls_origin.ca().reqwest_certificate())
            .build()
            .unwrap();
        let via = reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(gwy2.proxy_url()).unwrap())
            .http1_only()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(gwy2.ca_pem().as_bytes()).unwrap())
            .build()
            .unwrap();
        let url = tls_origin.url("/bytes/512");
        let d = measure(&direct, &url, n).await;
        let p = measure(&via, &url, n).await;
        report("https intercepted, 512 B", &d, &p);
        let s = gwy2.status().await;
        println!(
            "upstream connections opened for {} requests: {}",
            s["fleet"]["requests"], s["fleet"]["new_connections"]
        );
    });
    // The gateway tasks are torn down with the runtime.
    std::thread::sleep(Duration::from_millis(10));
}
