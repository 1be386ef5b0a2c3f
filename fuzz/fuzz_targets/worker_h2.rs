//! Fuzzes the worker side of a real gateway with raw bytes: HTTP/2 frames (after the client
//! preface, when byte 0 is odd) or whatever a worker might send (byte 0 even: HTTP/1 or a
//! preface of its own). The gateway is built once; each input is one connection over an
//! in-memory stream, served by `edgepool::ingress::serve_worker_io` — the framer, hyper's
//! HTTP/1 and HTTP/2 servers, edgepool's routing, admission, clocks and error answers.
//! Targets are all forbidden and DNS is dead, so nothing leaves the process.
//! Invariants: nothing panics; a connection whose input has ended finishes within 7 s (no
//! state without a clock); its place under the connection limit comes back.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

struct World {
    rt: tokio::runtime::Runtime,
    gw: Arc<edgepool::gateway::Gateway>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        // Real time: a paused clock stopped a run on an input the same code serves in 6 ms
        // (virtual time raced ahead of real socket I/O in the long-lived runtime).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = std::env::temp_dir().join(format!("edgepool-fuzz-h2-{}", std::process::id()));
        let mut cfg = edgepool::config::Config {
            data_dir: Some(dir),
            ..Default::default()
        };
        cfg.targets.allow.clear();
        // Nothing may be dialled but loopback: every request leaves through one exit on a
        // closed loopback port (refused at once), and direct egress is off. (The first runs
        // let public IP literals be dialled directly; with no route they hung until
        // upstream.connect_timeout and tripped the clock invariant.)
        cfg.exits.pools.push(edgepool::config::ExitPoolConfig {
            name: "dead".into(),
            nodes: vec!["http://127.0.0.1:9".into()],
            session_template: None,
            max_connections_per_node: None,
        });
        cfg.exits.default_pool = Some("dead".into());
        cfg.exits.allow_direct = Some(false);
        cfg.upstream.connect_timeout = Duration::from_millis(200);
        cfg.upstream.dns_servers = vec!["127.0.0.1:9".parse().unwrap()];
        cfg.upstream.hosts_file = "".into();
        cfg.upstream.dns_timeout = Duration::from_millis(1);
        cfg.upstream.dns_attempts = 1;
        cfg.upstream.dns_family_grace = Duration::from_millis(1);
        cfg.limits.header_read_timeout = Duration::from_millis(200);
        cfg.limits.body_idle_timeout = Duration::from_millis(200);
        cfg.limits.worker_idle_timeout = Duration::from_millis(300);
        cfg.validate().unwrap();
        let gw = rt
            .block_on(async { edgepool::gateway::Gateway::new(cfg) })
            .unwrap();
        World { rt, gw }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let w = world();
    let gw = w.gw.clone();
    w.rt.block_on(async move {
        let place = gw
            .admission()
            .worker_connection("127.0.0.1".parse().unwrap())
            .expect("a connection place");
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serve = tokio::spawn(edgepool::ingress::serve_worker_io(
            gw.ingress().clone(),
            server,
            place,
        ));
        let feed = async {
            if mode & 1 == 1 {
                let _ = client.write_all(PREFACE).await;
            }
            let _ = client.write_all(rest).await;
            let _ = client.shutdown().await;
            let mut sink = vec![0u8; 16 * 1024];
            while let Ok(n) = client.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), feed).await;
        // The longest clock here is 300 ms (worker idle), plus the 1 s first-request margin
        // and the 5 s GOAWAY grace: 7 s bounds every connection.
        let done = tokio::time::timeout(Duration::from_secs(7), serve).await;
        assert!(done.is_ok(), "a connection outlived every clock");
        assert_eq!(
            gw.admission().usage().2,
            0,
            "a connection place was not given back"
        );
    });
});
