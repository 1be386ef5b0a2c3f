//! `edgepool status --fleet ADDR[,ADDR...]`: one view of several gateways behind a balancer
//! (docs/SCALE.md). Each node's `/status` is fetched as it is; this module adds them up, as
//! pure functions of those documents, so it is tested in-process.
//!
//! Every fleet figure is a sum of the nodes' own figures, and rates are recomputed from the
//! sums (R = 1 − new connections / requests over the whole fleet), never averaged. What only a
//! fleet view can show: how many nodes served each target (`nodes`; with consistent hashing on
//! the target it is 1 — a target spread over several nodes pays a cold pool on each), and each
//! exit's circuit state on every node.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::format::{exit_state_text, listed_exits, pad_right as pad, rate_text, u};

/// One node's answer: its admin address and its `/status` document, or why it gave none.
pub type NodeStatus = (String, Result<Value, String>);

fn rate(requests: u64, new: u64) -> f64 {
    if requests == 0 {
        0.0
    } else {
        1.0 - new as f64 / requests as f64
    }
}

/// Adds the numbers of `from` into `into` (objects of counts such as `new_by_reason`).
fn add_counts(into: &mut Map<String, Value>, from: &Value) {
    for (k, v) in from.as_object().into_iter().flatten() {
        let sum = into.get(k).map_or(0, u) + u(v);
        into.insert(k.clone(), sum.into());
    }
}

/// Counters summed over the nodes for one row (fleet, a target, an exit).
#[derive(Default)]
struct Sums {
    requests: u64,
    new_connections: u64,
    forced: u64,
    errors: u64,
    active: u64,
    idle: u64,
    open: u64,
    pinned: u64,
    handshake_seconds: f64,
    handshake_saved_seconds: f64,
    new_by_reason: Map<String, Value>,
    closed_by_reason: Map<String, Value>,
    nodes: u64,
    states: BTreeMap<String, u64>,
}

impl Sums {
    fn add(&mut self, row: &Value) {
        self.requests += u(&row["requests"]);
        self.new_connections += u(&row["new_connections"]);
        self.forced += u(&row["forced_rotation_requests"]);
        self.errors += u(&row["errors"]) + u(&row["failures"]);
        self.active += u(&row["active"]);
        self.idle += u(&row["idle"]);
        self.open += u(&row["open_connections"]);
        self.pinned += u(&row["pinned"]);
        self.handshake_seconds += row["handshake_seconds"].as_f64().unwrap_or(0.0);
        self.handshake_saved_seconds += row["handshake_saved_seconds"].as_f64().unwrap_or(0.0);
        add_counts(&mut self.new_by_reason, &row["new_by_reason"]);
        add_counts(&mut self.closed_by_reason, &row["closed_by_reason"]);
        if u(&row["requests"]) > 0 {
            self.nodes += 1;
        }
        if let Some(state) = row["state"].as_str() {
            *self.states.entry(state.to_string()).or_default() += 1;
        }
    }

    fn json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("requests".into(), self.requests.into());
        m.insert("new_connections".into(), self.new_connections.into());
        m.insert(
            "reuse_rate".into(),
            rate(self.requests, self.new_connections).into(),
        );
        // Forced-rotation requests asked for a new connection each: R without them.
        let unforced_requests = self.requests.saturating_sub(self.forced);
        let unforced_new = self
            .new_connections
            .saturating_sub(self.forced.min(self.new_connections));
        m.insert(
            "reuse_rate_excluding_forced".into(),
            rate(unforced_requests, unforced_new).into(),
        );
        m.insert("forced_rotation_requests".into(), self.forced.into());
        m.insert("errors".into(), self.errors.into());
        m.insert("nodes".into(), self.nodes.into());
        m
    }
}

/// The fleet document: `nodes` (each node's totals, or its error), `fleet` (the sums), the
/// `targets` and `exits` merged by name (busiest first), and `split_targets` (targets served
/// by more than one node).
pub fn aggregate(nodes: &[NodeStatus]) -> Value {
    let mut fleet = Sums::default();
    let mut targets: BTreeMap<String, Sums> = BTreeMap::new();
    let mut exits: BTreeMap<String, (Value, Sums)> = BTreeMap::new();
    let mut node_rows = Vec::new();
    let mut objective = Value::Null;
    for (addr, answer) in nodes {
        let doc = match answer {
            Ok(doc) => doc,
            Err(e) => {
                node_rows.push(json!({"node": addr, "up": false, "error": e}));
                continue;
            }
        };
        if objective.is_null() {
            objective = doc["slo"].clone();
        }
        let f = &doc["fleet"];
        fleet.add(f);
        let (requests, new) = (u(&f["requests"]), u(&f["new_connections"]));
        node_rows.push(json!({
            "node": addr,
            "name": doc["node"],
            "up": true,
            "version": doc["version"],
            "uptime_seconds": doc["uptime_seconds"],
            "requests": requests,
            "new_connections": new,
            "reuse_rate": rate(requests, new),
            "errors": u(&f["errors"]),
            "targets": doc["targets"].as_array().map_or(0, Vec::len),
        }));
        for t in doc["targets"].as_array().into_iter().flatten() {
            let name = t["target"].as_str().unwrap_or("").to_string();
            targets.entry(name).or_default().add(t);
        }
        for e in doc["exits"].as_array().into_iter().flatten() {
            let name = e["exit"].as_str().unwrap_or("").to_string();
            let entry = exits.entry(name).or_insert_with(|| {
                (
                    json!({"pool": e["pool"], "kind": e["kind"], "endpoint": e["endpoint"]}),
                    Sums::default(),
                )
            });
            entry.1.add(e);
        }
    }
    let mut fleet_json = fleet.json();
    fleet_json.insert("active".into(), fleet.active.into());
    fleet_json.insert("idle".into(), fleet.idle.into());
    fleet_json.insert("handshake_seconds".into(), fleet.handshake_seconds.into());
    fleet_json.insert(
        "handshake_saved_seconds".into(),
        fleet.handshake_saved_seconds.into(),
    );
    fleet_json.insert("new_by_reason".into(), fleet.new_by_reason.clone().into());
    fleet_json.insert(
        "closed_by_reason".into(),
        fleet.closed_by_reason.clone().into(),
    );
    fleet_json.remove("nodes");
    fleet_json.insert(
        "nodes_up".into(),
        node_rows.iter().filter(|n| n["up"] == true).count().into(),
    );
    fleet_json.insert("nodes".into(), node_rows.len().into());
    let mut target_rows: Vec<Value> = targets
        .iter()
        .map(|(name, s)| {
            let mut m = s.json();
            m.insert("target".into(), name.clone().into());
            m.insert("active".into(), s.active.into());
            m.insert("new_by_reason".into(), s.new_by_reason.clone().into());
            Value::Object(m)
        })
        .collect();
    target_rows.sort_by_key(|t| std::cmp::Reverse(u(&t["requests"])));
    let split = target_rows.iter().filter(|t| u(&t["nodes"]) > 1).count();
    let mut exit_rows: Vec<Value> = exits
        .iter()
        .map(|(name, (info, s))| {
            let mut m = s.json();
            m.insert("exit".into(), name.clone().into());
            for k in ["pool", "kind", "endpoint"] {
                m.insert(k.into(), info[k].clone());
            }
            m.insert("open_connections".into(), s.open.into());
            m.insert("pinned".into(), s.pinned.into());
            m.insert(
                "states".into(),
                Value::Object(
                    s.states
                        .iter()
                        .map(|(k, v)| (k.clone(), (*v).into()))
                        .collect(),
                ),
            );
            Value::Object(m)
        })
        .collect();
    exit_rows.sort_by_key(|e| std::cmp::Reverse(u(&e["requests"])));
    json!({
        "slo": objective,
        "nodes": node_rows,
        "fleet": fleet_json,
        "split_targets": split,
        "targets": target_rows,
        "exits": exit_rows,
    })
}

/// The fleet table: one line per node, the fleet's R and reasons, the targets (busiest 50)
/// with the number of nodes that served each, and the exits with their state on every node.
pub fn fleet_table(v: &Value) -> String {
    let mut out = String::new();
    let fleet = &v["fleet"];
    let _ = writeln!(
        out,
        "edgepool fleet   {} of {} nodes up   objective R >= {}",
        fleet["nodes_up"], fleet["nodes"], v["slo"]["reuse_target"]
    );
    let _ = writeln!(
        out,
        "{} {:>9} {:>7} {:>8} {:>7} {:>8}",
        pad("node", 28),
        "requests",
        "new",
        "R",
        "errors",
        "targets"
    );
    for n in v["nodes"].as_array().into_iter().flatten() {
        if n["up"] == true {
            let requests = u(&n["requests"]);
            let _ = writeln!(
                out,
                "{} {:>9} {:>7} {:>8} {:>7} {:>8}",
                pad(n["node"].as_str().unwrap_or(""), 28),
                requests,
                u(&n["new_connections"]),
                rate_text(requests, n["reuse_rate"].as_f64().unwrap_or(0.0)),
                u(&n["errors"]),
                u(&n["targets"]),
            );
        } else {
            let _ = writeln!(
                out,
                "{} DOWN: {}",
                pad(n["node"].as_str().unwrap_or(""), 28),
                n["error"].as_str().unwrap_or("")
            );
        }
    }
    let requests = u(&fleet["requests"]);
    let _ = writeln!(
        out,
        "{} {:>9} {:>7} {:>8} {:>7}",
        pad("fleet", 28),
        requests,
        u(&fleet["new_connections"]),
        rate_text(requests, fleet["reuse_rate"].as_f64().unwrap_or(0.0)),
        u(&fleet["errors"]),
    );
    let mut reasons: Vec<(&String, u64)> = fleet["new_by_reason"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k, u(v)))
        .filter(|(_, n)| *n > 0)
        .collect();
    reasons.sort_by_key(|(k, n)| (std::cmp::Reverse(*n), (*k).clone()));
    if !reasons.is_empty() {
        let text: Vec<String> = reasons.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(out, "new connections by reason: {}", text.join(", "));
    }
    let split = u(&v["split_targets"]);
    let _ = writeln!(
        out,
        "targets served by more than one node: {split}{}",
        if split > 0 {
            " (each pays a cold pool on every node it reaches: check the balancer hashes on the target)"
        } else {
            ""
        }
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{} {:>9} {:>7} {:>8} {:>6}",
        pad("target", 36),
        "requests",
        "new",
        "R",
        "nodes"
    );
    for t in v["targets"].as_array().into_iter().flatten().take(50) {
        let requests = u(&t["requests"]);
        let _ = writeln!(
            out,
            "{} {:>9} {:>7} {:>8} {:>6}",
            pad(t["target"].as_str().unwrap_or(""), 36),
            requests,
            u(&t["new_connections"]),
            rate_text(requests, t["reuse_rate"].as_f64().unwrap_or(0.0)),
            u(&t["nodes"]),
        );
    }
    let exits = listed_exits(v);
    if !exits.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{} {:>9} {:>7} {:>8} {:>6} {:>7}  state on the nodes",
            pad("exit", 36),
            "requests",
            "new",
            "R",
            "open",
            "pinned"
        );
        for e in exits {
            let requests = u(&e["requests"]);
            let states: Vec<String> = e["states"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, n)| format!("{} on {}", exit_state_text(k), u(n)))
                .collect();
            let _ = writeln!(
                out,
                "{} {:>9} {:>7} {:>8} {:>6} {:>7}  {}",
                pad(e["exit"].as_str().unwrap_or(""), 36),
                requests,
                u(&e["new_connections"]),
                rate_text(requests, e["reuse_rate"].as_f64().unwrap_or(0.0)),
                u(&e["open_connections"]),
                u(&e["pinned"]),
                states.join(", "),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(requests: u64, new: u64, targets: &[(&str, u64, u64)], exit_state: &str) -> Value {
        json!({
            "version": "0.1.0",
            "uptime_seconds": 10,
            "slo": {"reuse_target": 0.92, "min_requests": 100},
            "fleet": {"requests": requests, "new_connections": new, "errors": 1,
                      "forced_rotation_requests": 0, "active": 2, "idle": 3,
                      "new_by_reason": {"cold_key": new}, "closed_by_reason": {}},
            "targets": targets.iter().map(|(t, r, n)| json!({
                "target": t, "requests": r, "new_connections": n, "errors": 0,
                "new_by_reason": {"cold_key": n}})).collect::<Vec<_>>(),
            "exits": [{"exit": "dc/1", "pool": "dc", "kind": "http", "endpoint": "p:3128",
                       "state": exit_state, "requests": requests, "new_connections": new,
                       "failures": 0, "open_connections": 4, "pinned": 1}],
        })
    }

    #[test]
    fn sums_nodes_recomputes_rates_and_counts_split_targets() {
        let v = aggregate(&[
            (
                "a:9180".into(),
                Ok(node(
                    1000,
                    10,
                    &[("x.test:443", 600, 5), ("y.test:443", 400, 5)],
                    "closed",
                )),
            ),
            (
                "b:9180".into(),
                Ok(node(
                    500,
                    40,
                    &[("z.test:443", 450, 4), ("y.test:443", 50, 36)],
                    "open",
                )),
            ),
            ("c:9180".into(), Err("connection refused".into())),
        ]);
        let f = &v["fleet"];
        assert_eq!((u(&f["requests"]), u(&f["new_connections"])), (1500, 50));
        // 1 - 50/1500, not the mean of the nodes' rates (0.99 and 0.92).
        assert!((f["reuse_rate"].as_f64().unwrap() - (1.0 - 50.0 / 1500.0)).abs() < 1e-12);
        assert_eq!((u(&f["nodes"]), u(&f["nodes_up"])), (3, 2));
        assert_eq!(u(&f["errors"]), 2);
        assert_eq!(u(&f["new_by_reason"]["cold_key"]), 50);
        assert_eq!(u(&v["split_targets"]), 1, "y.test is served by both nodes");
        let y = v["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["target"] == "y.test:443")
            .unwrap();
        assert_eq!(
            (u(&y["requests"]), u(&y["new_connections"]), u(&y["nodes"])),
            (450, 41, 2)
        );
        assert_eq!(v["targets"][0]["target"], "x.test:443", "busiest first");
        let e = &v["exits"][0];
        assert_eq!((u(&e["requests"]), u(&e["open_connections"])), (1500, 8));
        assert_eq!((u(&e["states"]["closed"]), u(&e["states"]["open"])), (1, 1));
        assert_eq!(v["nodes"][2]["up"], false);
        let table = fleet_table(&v);
        assert!(table.contains("2 of 3 nodes up"), "{table}");
        assert!(table.contains("DOWN: connection refused"), "{table}");
        assert!(table.contains("0.9667"), "fleet R: {table}");
        assert!(
            table.contains("targets served by more than one node: 1"),
            "{table}"
        );
        assert!(table.contains("healthy on 1, circuit open on 1"), "{table}");
    }

    #[test]
    fn no_answer_at_all_is_an_empty_fleet_not_a_rate() {
        let v = aggregate(&[("a:9180".into(), Err("timed out".into()))]);
        assert_eq!(u(&v["fleet"]["requests"]), 0);
        let table = fleet_table(&v);
        assert!(table.contains("0 of 1 nodes up"), "{table}");
        assert!(table.contains("fleet"), "{table}");
        assert!(table.contains('—'), "no rate without requests: {table}");
    }
}
