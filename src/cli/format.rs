//! What `edgepool status` and `edgepool trace` print, as pure functions of the admin
//! documents, so they are tested in-process.
//!
//! Every figure is the `/status` figure (README, "Reuse accounting": one definition per
//! figure); this module only formats. A target with no requests shows `—` for R (there is no
//! rate), a verdict is spelt the way a reader says it (`warming up`), and exit circuit states
//! read as health (`healthy`, `probing`, `circuit open`).
use std::fmt::Write as _;

use serde_json::Value;

/// The URL a worker uses to reach a listener bound to `addr`: a wildcard bind (`0.0.0.0`,
/// `[::]`) is reachable on this machine's addresses, shown as `<this host>`.
pub fn reachable_url(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("http://<this host>:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}

/// How an exit's circuit state (`closed`, `half_open`, `open` in `/status`) is shown.
pub fn exit_state_text(state: &str) -> &str {
    match state {
        "closed" => "healthy",
        "half_open" => "probing",
        "open" => "circuit open",
        other => other,
    }
}

/// How a verdict (`/status` `verdict`) is shown.
pub fn verdict_text(verdict: &str) -> &str {
    match verdict {
        "warming_up" => "warming up",
        other => other,
    }
}

/// R with four decimals, or `—` when there were no requests (no rate to show).
pub fn rate_text(requests: u64, rate: f64) -> String {
    if requests == 0 {
        "—".to_string()
    } else {
        format!("{rate:.4}")
    }
}

pub(super) fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Pads `text` to `width` characters (not bytes: `—` is one column).
pub(super) fn pad_right(text: &str, width: usize) -> String {
    let n = text.chars().count();
    format!("{text}{}", " ".repeat(width.saturating_sub(n)))
}

fn pad_left(text: &str, width: usize) -> String {
    let n = text.chars().count();
    format!("{}{text}", " ".repeat(width.saturating_sub(n)))
}

/// The exits a table lists: every exit node, and the direct exit once it carried requests.
pub(super) fn listed_exits(v: &Value) -> Vec<&Value> {
    v["exits"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] != "direct" || u(&e["requests"]) > 0)
        .collect()
}

/// The `edgepool status` table for one `/status` document.
pub fn status_table(v: &Value) -> String {
    let mut out = String::new();
    let min = u(&v["slo"]["min_requests"]);
    let _ = writeln!(
        out,
        "edgepool status   (objective R >= {}; judged from {} requests)",
        v["slo"]["reuse_target"], min
    );
    let _ = writeln!(
        out,
        "{} {:>9} {:>7} {:>7} {:>8} {} {:>7} {:>12} {:>9} {:>9} {:>8}",
        pad_right("target", 36),
        "requests",
        "new",
        "active",
        "R",
        pad_right("verdict", 11),
        "errors",
        "saved h/day",
        "evict/s",
        "protocol",
        "exit"
    );
    let row = |out: &mut String, t: &Value| {
        let requests = u(&t["requests"]);
        let _ = writeln!(
            out,
            "{} {:>9} {:>7} {:>7} {} {} {:>7} {:>12.2} {:>9.3} {:>9} {:>8}",
            pad_right(s(&t["target"]), 36),
            requests,
            u(&t["new_connections"]),
            u(&t["active"]),
            pad_left(&rate_text(requests, f(&t["reuse_rate"])), 8),
            pad_right(verdict_text(s(&t["verdict"])), 11),
            u(&t["errors"]),
            f(&t["tls_overhead_saved_hours_per_day"]),
            f(&t["evictions_per_second"]),
            if requests == 0 {
                "—"
            } else {
                s(&t["protocol"])
            },
            s(&t["top_exit"]),
        );
    };
    for t in v["targets"].as_array().into_iter().flatten() {
        row(&mut out, t);
    }
    let omitted = u(&v["targets_omitted"]);
    if omitted > 0 {
        let _ = writeln!(
            out,
            "({omitted} quieter targets not listed; the fleet row counts them)"
        );
    }
    row(&mut out, &v["fleet"]);
    let fleet = &v["fleet"];
    if u(&fleet["forced_rotation_requests"]) > 0 {
        let _ = writeln!(
            out,
            "forced rotation: {} requests asked for a new exit each time; R without them {:.4}",
            fleet["forced_rotation_requests"],
            f(&fleet["reuse_rate_excluding_forced"])
        );
    }
    let exits = listed_exits(v);
    if !exits.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{} {} {:>9} {:>7} {:>8} {:>8} {:>6} {:>7}  last error",
            pad_right("exit", 36),
            pad_right("state", 12),
            "requests",
            "new",
            "R",
            "R unforc",
            "open",
            "pinned"
        );
        for e in exits {
            let requests = u(&e["requests"]);
            let _ = writeln!(
                out,
                "{} {} {:>9} {:>7} {} {} {:>6} {:>7}  {}",
                pad_right(s(&e["exit"]), 36),
                pad_right(exit_state_text(s(&e["state"])), 12),
                requests,
                u(&e["new_connections"]),
                pad_left(&rate_text(requests, f(&e["reuse_rate"])), 8),
                pad_left(
                    &rate_text(requests, f(&e["reuse_rate_excluding_forced"])),
                    8
                ),
                u(&e["open_connections"]),
                u(&e["pinned"]),
                s(&e["last_error"]),
            );
        }
    }
    let p = &v["ports"];
    if p["known"].as_bool() == Some(true) {
        let _ = writeln!(
            out,
            "ephemeral ports: {:.1}% of {}-{} held ({} TIME_WAIT), busiest destination {:.1}%, {:.1} new connections/s",
            f(&p["used_ratio"]) * 100.0,
            p["range_low"],
            p["range_high"],
            p["time_wait"],
            f(&p["busiest_destination_ratio"]) * 100.0,
            f(&p["new_connections_per_second"]),
        );
    }
    out
}

/// One `/trace` record in the domain note's trace format (§04), one block per record.
pub fn trace_text(v: &Value) -> String {
    let f = |k: &str| v[k].as_f64();
    let ms = |x: Option<f64>| x.map(|x| format!("{x:.1}ms")).unwrap_or_else(|| "-".into());
    let mut out = String::new();
    if v["kind"] == "lagged" {
        return format!("// trace fell behind: {} records dropped\n\n", v["dropped"]);
    }
    if v["kind"] == "pool" {
        out.push_str(&format!(
            "// {} {}\npool.status: {}\n\n",
            v["ts"].as_str().unwrap_or(""),
            v["target"].as_str().unwrap_or(""),
            v["pool"].as_str().unwrap_or("")
        ));
        return out;
    }
    let reused = v["reused"].as_bool() == Some(true);
    out.push_str(&format!(
        "// {} {} {} -> {}{}\n",
        v["ts"].as_str().unwrap_or(""),
        v["method"].as_str().unwrap_or(""),
        v["target"].as_str().unwrap_or(""),
        v["status"],
        match v["new_reason"].as_str() {
            Some(r) => format!(" (new connection: {r})"),
            None => String::new(),
        }
    ));
    if let Some(e) = v["error"].as_str() {
        out.push_str(&format!("error: {e}\n"));
    }
    if reused {
        out.push_str("tcp.connect: 0ms (reused)\ntls.handshake: 0ms (reused)\n");
    } else if v.get("tcp_connect_ms").is_some() {
        out.push_str(&format!(
            "tcp.connect: {}\ntls.handshake: {}\n",
            ms(f("tcp_connect_ms")),
            ms(f("tls_handshake_ms"))
        ));
    }
    if f("ttfb_ms").is_some() {
        out.push_str(&format!("http.ttfb: {}\n", ms(f("ttfb_ms"))));
    }
    out.push_str(&format!("total_latency: {}\n", ms(f("total_ms"))));
    if let Some(p) = v["pool"].as_str() {
        out.push_str(&format!("pool.status: {p}\n"));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({
            "slo": {"reuse_target": 0.92, "min_requests": 100},
            "fleet": {"target": "*", "requests": 111, "new_connections": 3, "reuse_rate": 0.973,
                      "verdict": "optimal", "errors": 2, "protocol": "h2", "top_exit": "direct",
                      "active": 0, "tls_overhead_saved_hours_per_day": 0.5,
                      "evictions_per_second": 0.0, "forced_rotation_requests": 0},
            "targets": [
                {"target": "busy.example:443", "requests": 100, "new_connections": 1,
                 "reuse_rate": 0.99, "verdict": "optimal", "errors": 0, "protocol": "h2",
                 "top_exit": "direct"},
                {"target": "few.example:443", "requests": 11, "new_connections": 2,
                 "reuse_rate": 0.8182, "verdict": "warming_up", "errors": 0,
                 "protocol": "http/1.1", "top_exit": "direct"},
                {"target": "refused.example:443", "requests": 0, "new_connections": 0,
                 "reuse_rate": 1.0, "verdict": "idle", "errors": 2, "protocol": "http/1.1",
                 "top_exit": "direct"}
            ],
            "exits": [
                {"exit": "direct", "kind": "direct", "state": "closed", "requests": 111,
                 "new_connections": 3, "reuse_rate": 0.973, "reuse_rate_excluding_forced": 0.973},
                {"exit": "dc/0", "kind": "http", "state": "open", "requests": 0,
                 "new_connections": 0, "reuse_rate": 1.0, "reuse_rate_excluding_forced": 1.0,
                 "last_error": "connect refused"},
                {"exit": "dc/1", "kind": "http", "state": "half_open", "requests": 5,
                 "new_connections": 1, "reuse_rate": 0.8, "reuse_rate_excluding_forced": 0.8}
            ],
            "ports": {"known": false}
        })
    }

    fn line<'a>(table: &'a str, start: &str) -> &'a str {
        table
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?} in\n{table}"))
    }

    #[test]
    fn a_target_without_requests_has_no_rate() {
        let t = status_table(&doc());
        let refused = line(&t, "refused.example:443");
        assert!(refused.contains(" — "), "{refused}");
        assert!(!refused.contains("1.0000"), "{refused}");
        let busy = line(&t, "busy.example:443");
        assert!(busy.contains("0.9900"), "{busy}");
    }

    #[test]
    fn errors_have_a_column_and_the_fleet_row_carries_them() {
        let t = status_table(&doc());
        let header = line(&t, "target");
        assert!(header.contains("errors"), "{header}");
        let fleet: Vec<&str> = line(&t, "* ").split_whitespace().collect();
        // target requests new active R verdict errors ...
        assert_eq!(fleet[..7], ["*", "111", "3", "0", "0.9730", "optimal", "2"]);
        let refused: Vec<&str> = line(&t, "refused.example").split_whitespace().collect();
        assert_eq!(refused[6], "2", "{refused:?}");
    }

    #[test]
    fn verdicts_and_exit_states_read_as_words() {
        let t = status_table(&doc());
        assert!(line(&t, "few.example:443").contains("warming up"));
        assert!(line(&t, "dc/0").contains("circuit open"));
        assert!(line(&t, "dc/1").contains("probing"));
        assert!(line(&t, "direct ").contains("healthy"));
        assert!(!t.contains(" closed "), "{t}");
        assert!(line(&t, "dc/0").contains("connect refused"));
        // A quiet exit has no rate either.
        assert!(line(&t, "dc/0").contains(" — "), "{t}");
    }

    #[test]
    fn trace_records_read_as_the_domain_note_shows_them() {
        let new = trace_text(&json!({
            "kind": "request", "ts": "2026-12-04T06:00:00Z", "method": "GET",
            "target": "shop.example:443", "status": 200, "reused": false,
            "new_reason": "cold_key", "tcp_connect_ms": 1.25, "tls_handshake_ms": 8.0,
            "ttfb_ms": 20.0, "total_ms": 31.5
        }));
        assert_eq!(
            new,
            "// 2026-12-04T06:00:00Z GET shop.example:443 -> 200 (new connection: cold_key)\n\
             tcp.connect: 1.2ms\ntls.handshake: 8.0ms\nhttp.ttfb: 20.0ms\n\
             total_latency: 31.5ms\n\n"
        );
        let reused = trace_text(&json!({
            "kind": "request", "ts": "t", "method": "GET", "target": "a:80", "status": 502,
            "reused": true, "error": "upstream_reset", "total_ms": 3.0
        }));
        assert!(reused.contains("error: upstream_reset\n"), "{reused}");
        assert!(reused.contains("tcp.connect: 0ms (reused)"), "{reused}");
        let pool = trace_text(&json!({"kind": "pool", "ts": "t", "target": "a:80",
                                       "pool": "connection closed (goaway) after 3 requests"}));
        assert_eq!(
            pool,
            "// t a:80\npool.status: connection closed (goaway) after 3 requests\n\n"
        );
        assert!(trace_text(&json!({"kind": "lagged", "dropped": 7})).contains("7 records dropped"));
    }

    #[test]
    fn the_start_line_url_is_the_listener() {
        assert_eq!(
            reachable_url("127.0.0.1:8080".parse().unwrap()),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            reachable_url("[::1]:8080".parse().unwrap()),
            "http://[::1]:8080"
        );
        assert_eq!(
            reachable_url("0.0.0.0:3128".parse().unwrap()),
            "http://<this host>:3128"
        );
    }

    #[test]
    fn the_objective_line_names_the_minimum_sample() {
        let t = status_table(&doc());
        assert!(t
            .lines()
            .next()
            .unwrap()
            .contains("objective R >= 0.92; judged from 100 requests"));
    }
}
