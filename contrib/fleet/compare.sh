#!/usr/bin/env bash
# What fragmentation costs, in numbers: the reuse lab's workload through one edgepool node,
# through N nodes behind HAProxy with consistent hashing on the target, and through N nodes
# behind HAProxy round-robin; then a node killed mid-run; then how many targets move when a
# node is added (issue 15; docs/SCALE.md has the figures).
#
#   contrib/fleet/compare.sh [N]        # N nodes (default 3); the lab's --quick workload
#   FULL=1 contrib/fleet/compare.sh 4   # the full workload (16 workers x 300 requests)
#
# Environment (all optional):
#   EDGEPOOL_BIN=target/release/edgepool   the edgepool binary (nodes and the lab)
#   FULL=0          1: the scenario's full request count instead of --quick
#   SCENARIO=mixed  any lab scenario without exits (edgepool lab --list)
#   FACTORS=""      extra consistent-hashing runs with these hash-balance-factor values,
#                   e.g. "0 125 150" (the shipped config's value always runs)
#   KILL=1          0: skip the node-kill run
#   REMAP=1         0: skip the remap measurement
#   REMAP_K=10000   authorities hashed for the remap measurement
#   OUT_DIR=<dir>   keep every lab JSON, probe JSON, remap file and fleet log there
#
# What runs, all on loopback and all stopped by pid at the end:
#   - contrib/fleet/run-local.sh (HAProxy + nodes) for every configuration;
#   - `edgepool lab --mode external --gateway <HAProxy>`: the lab's origins and workers, R
#     counted at the origins. The lab makes a new throw-away CA for its HTTPS origins on every
#     run and cannot hand it to an external gateway, so the nodes run with
#     upstream.insecure_skip_verify = ["localhost"] (the lab's HTTPS targets are
#     localhost:PORT) — test targets only;
#   - the kill run: the lab plus contrib/fleet/probe.py (idempotent requests three ways,
#     checked byte for byte, one client retry) while node2 gets SIGKILL mid-run;
#   - the remap run: N+1 nodes, node N+1 in maintenance, then put in service; remap.py sends
#     one request per authority (REMAP_K of them) and reads X-Edgepool-Node. The nodes refuse
#     those loopback targets (400 target_forbidden) without dialing anything.
# Every step has a time limit; the whole script takes ~3 minutes (FULL=1: ~10 minutes).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
N=${1:-3}
FULL=${FULL:-0}
SCENARIO=${SCENARIO:-mixed}
FACTORS=${FACTORS:-}
KILL=${KILL:-1}
REMAP=${REMAP:-1}
REMAP_K=${REMAP_K:-10000}
export EDGEPOOL_BIN=${EDGEPOOL_BIN:-$ROOT/target/release/edgepool}

die() { echo "compare.sh: error: $*" >&2; exit 1; }
note() { echo "compare.sh: $*" >&2; }

if ! [[ $N =~ ^[0-9]+$ ]] || ((N < 2 || N > 50)); then die "N must be 2..50 (got '$N')"; fi
if ! [[ $REMAP_K =~ ^[0-9]+$ ]] || ((REMAP_K < 1 || REMAP_K > 65536)); then die "REMAP_K must be 1..65536"; fi
[[ -x $EDGEPOOL_BIN ]] || die "$EDGEPOOL_BIN not found: build it (cargo build --release) or set EDGEPOOL_BIN"
for t in python3 curl openssl; do command -v "$t" >/dev/null || die "$t is needed"; done
"$EDGEPOOL_BIN" lab --list >/dev/null 2>&1 || die "$EDGEPOOL_BIN has no lab (built with --no-default-features?)"

if [[ $FULL == 1 ]]; then
    QUICK=() LAB_LIMIT=900 KILL_AFTER=${KILL_AFTER:-25} PROBE_SECS=50 WINDOW=5
else
    QUICK=(--quick) LAB_LIMIT=240 KILL_AFTER=${KILL_AFTER:-4} PROBE_SECS=10 WINDOW=2
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/edgepool-compare.XXXXXX")
FLEET_PID="" BG_PIDS=()
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM HUP
    for p in "${BG_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    fleet_down
    if [[ -n ${OUT_DIR:-} ]]; then
        mkdir -p "$OUT_DIR" && cp -r "$TMP"/. "$OUT_DIR"/ && note "results kept in $OUT_DIR"
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# Node config for lab runs: the settings shipped for nodes behind HAProxy, plus what the lab
# needs (see the header).
LAB_TOML=$TMP/lab-node.toml
{
    cat "$ROOT/contrib/haproxy/edgepool-node.toml"
    printf '\n[upstream]\ninsecure_skip_verify = ["localhost"]\n\n[trace]\nsample_rate = 0.0\n'
} >"$LAB_TOML"
LAB_ARGS=(--config "$LAB_TOML" --allow-target 127.0.0.0/8 --allow-target ::1/128 --allow-connect-port 1-65535)

# fleet_up NAME N [VAR=value...] -- SERVE_ARGS...: run-local.sh in the background; sets PROXY,
# CA, FDIR, SOCK.
fleet_up() {
    local name=$1 n=$2 envs=() i
    shift 2
    while [[ $# -gt 0 && $1 != -- ]]; do envs+=("$1"); shift; done
    [[ ${1:-} == -- ]] && shift
    mkdir -p "$TMP/$name"
    env "${envs[@]}" FLEET_DIR="$TMP/$name/fleet" "$HERE/run-local.sh" "$n" -- "$@" \
        >"$TMP/$name/fleet.out" 2>"$TMP/$name/fleet.err" &
    FLEET_PID=$!
    for ((i = 0; i < 600; i++)); do
        if grep -qs '^CA=' "$TMP/$name/fleet.out"; then break; fi
        if ! kill -0 "$FLEET_PID" 2>/dev/null; then
            cat "$TMP/$name/fleet.err" >&2
            die "run-local.sh $n failed ($name)"
        fi
        sleep 0.1
    done
    grep -qs '^CA=' "$TMP/$name/fleet.out" || die "run-local.sh $n not ready within 60 s ($name)"
    PROXY=$(sed -n 's/^PROXY=//p' "$TMP/$name/fleet.out")
    CA=$(sed -n 's/^CA=//p' "$TMP/$name/fleet.out")
    FDIR=$(sed -n 's/^FLEET_DIR=//p' "$TMP/$name/fleet.out")
    SOCK=$(sed -n 's/^HAPROXY_SOCK=//p' "$TMP/$name/fleet.out")
}
fleet_down() {
    local i
    [[ -n $FLEET_PID ]] || return 0
    kill -TERM "$FLEET_PID" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do kill -0 "$FLEET_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$FLEET_PID" 2>/dev/null; then
        note "run-local.sh (pid $FLEET_PID) still running 30 s after SIGTERM; SIGKILL"
        kill -KILL "$FLEET_PID" 2>/dev/null || true
    fi
    wait "$FLEET_PID" 2>/dev/null || true
    FLEET_PID=""
}
lab() { # name
    timeout "$LAB_LIMIT" "$EDGEPOOL_BIN" lab --scenario "$SCENARIO" "${QUICK[@]}" --mode external \
        --gateway "${PROXY#http://}" --ca "$CA" --json "$TMP/$1/lab.json" >"$TMP/$1/lab.txt" 2>&1 ||
        { cat "$TMP/$1/lab.txt" >&2; die "the lab failed ($1)"; }
}
ROWS=()
run_mode() { # name label n [VAR=value...]
    local name=$1 label=$2 n=$3
    shift 3
    note "lab through $label"
    fleet_up "$name" "$n" "$@" -- "${LAB_ARGS[@]}"
    lab "$name"
    fleet_down
    ROWS+=("$name|$label|$n")
}

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
default_factor=$(sed -n 's/^ *hash-balance-factor \([0-9]*\).*/\1/p' "$ROOT/contrib/haproxy/haproxy.cfg" | head -n 1)
run_mode single "1 node (HAProxy)" 1
run_mode consistent "consistent (factor $default_factor)" "$N"
for f in $FACTORS; do
    [[ $f == "$default_factor" ]] && continue
    run_mode "consistent-f$f" "consistent (factor $f)" "$N" HASH_BALANCE_FACTOR="$f"
done
run_mode roundrobin "round-robin" "$N" BALANCE=roundrobin

# ---- a node killed mid-run --------------------------------------------------------------------
if [[ $KILL == 1 ]]; then
    note "lab through consistent x$N, node2 SIGKILLed after ${KILL_AFTER}s, probe alongside"
    fleet_up kill "$N" -- "${LAB_ARGS[@]}"
    timeout $((LAB_LIMIT + 30)) python3 "$HERE/watch.py" "$FDIR/nodes.tsv" "$LAB_LIMIT" "$TMP/kill/watch.json" \
        --window "$WINDOW" --mark-file "$TMP/kill/killed" --stop-file "$TMP/kill/done" >"$TMP/kill/watch.txt" 2>&1 &
    watch_pid=$!
    BG_PIDS+=("$watch_pid")
    lab kill &
    lab_pid=$!
    BG_PIDS+=("$lab_pid")
    timeout $((PROBE_SECS + 60)) python3 "$HERE/probe.py" "$PROXY" "$CA" "$PROBE_SECS" "$TMP/kill/probe.json" \
        >"$TMP/kill/probe.txt" 2>&1 &
    probe_pid=$!
    BG_PIDS+=("$probe_pid")
    sleep "$KILL_AFTER"
    victim=$(awk '$1 == "node2" { print $4 }' "$FDIR/nodes.tsv")
    [[ -n $victim ]] || die "no pid for node2 in $FDIR/nodes.tsv"
    kill -KILL "$victim"
    touch "$TMP/kill/killed"
    note "node2 (pid $victim) killed at $(date -u +%H:%M:%S)"
    wait "$lab_pid" || die "the lab failed during the kill run"
    wait "$probe_pid" || die "the probe failed: $(cat "$TMP/kill/probe.txt")"
    touch "$TMP/kill/done"
    wait "$watch_pid" || die "watch.py failed: $(cat "$TMP/kill/watch.txt")"
    BG_PIDS=()
    # HAProxy's own L7 retries (redispatched to another node) during the run.
    awk '$1 ~ /^<[0-9]>/ { split($11, a, "/"); if (a[5] != "0") n++ } END { print n + 0 }' \
        "$FDIR/haproxy.log" >"$TMP/kill/haproxy_retries.txt"
    python3 "$HERE/hactl.py" "$SOCK" states edgepool_nodes >"$TMP/kill/states.txt"
    fleet_down
    ROWS+=("kill|consistent, node2 killed at ${KILL_AFTER}s|$N")
fi

# ---- the table --------------------------------------------------------------------------------
python3 - "$TMP" "${ROWS[@]}" <<'EOF'
import json, os, sys
tmp, rows = sys.argv[1], [r.split("|") for r in sys.argv[2:]]
single = None
print()
print("conns: connections the lab's origins accepted; R = 1 - conns / requests, at the origins; ref R: the lab's")
print("greedy reference pool on the same timeline; handshk s: TCP+TLS handshake time those connections cost.")
print(f"{'mode':40} {'nodes':>5} {'requests':>8} {'errors':>6} {'conns':>6} {'R':>7} {'ref R':>7} {'R/single':>8} {'handshk s':>9} {'p50 ms':>7} {'p99 ms':>7}")
for name, label, n in rows:
    m = json.load(open(os.path.join(tmp, name, "lab.json")))["modes"][0]
    r = m["reuse_rate"]
    if name == "single":
        single = r
    ratio = f"{r / single:.4f}" if single else "-"
    lat = m.get("latency_ms", {})
    print(f"{label:40} {n:>5} {m['requests']:>8} {m['errors']:>6} {m['origin_connections']:>6} "
          f"{r:>7.4f} {m['reference_reuse_rate']:>7.4f} {ratio:>8} {m['handshake_seconds_paid']:>9.2f} "
          f"{lat.get('p50', 0):>7.1f} {lat.get('p99', 0):>7.1f}")
kill = os.path.join(tmp, "kill")
if os.path.isdir(kill):
    p = json.load(open(os.path.join(kill, "probe.json")))
    print()
    print(f"kill run: probe during the run ({p['seconds']:g} s, {p['threads']} threads; a failed request is retried once by the probe):")
    for way, s in p["ways"].items():
        print(f"  {way:9} sent {s['sent']:6}  failed at the first try {s['failed_first']:4}  lost after one retry {s['lost']:3}")
    print(f"  HAProxy's own retries (redispatched to another node): {open(os.path.join(kill, 'haproxy_retries.txt')).read().strip()}")
    print("  HAProxy's view at the end: " + "; ".join(l.strip() for l in open(os.path.join(kill, "states.txt"))))
    for e in p["errors"][:3]:
        print(f"  e.g. {e}")
    print("  the fleet's R over the run (sum of the nodes' /status, edgepool's count; lab and probe traffic):")
    sys.stdout.write(open(os.path.join(kill, "watch.txt")).read())
EOF

# ---- remap: adding a node ---------------------------------------------------------------------
if [[ $REMAP == 1 ]]; then
    M=$((N + 1))
    note "remap: $REMAP_K authorities over $N then $M nodes"
    fleet_up remap "$M"
    H=(python3 "$HERE/hactl.py" "$SOCK")
    "${H[@]}" set-state edgepool_nodes "node$M" maint
    before=$(timeout 300 python3 "$HERE/remap.py" "$PROXY" "$REMAP_K" "$TMP/remap/n$N.txt" --threads 1)
    "${H[@]}" set-state edgepool_nodes "node$M" ready
    "${H[@]}" wait-up edgepool_nodes "$M" 30
    after=$(timeout 300 python3 "$HERE/remap.py" "$PROXY" "$REMAP_K" "$TMP/remap/n$M.txt" --threads 1)
    added=$(python3 "$HERE/remap.py" --compare "$TMP/remap/n$N.txt" "$TMP/remap/n$M.txt")
    # The same authorities sent 16 at a time: bounded load (hash-balance-factor) diverts
    # requests from a busy node to the next one on the ring.
    timeout 300 python3 "$HERE/remap.py" "$PROXY" "$REMAP_K" "$TMP/remap/n$M-c16.txt" --threads 16 >/dev/null
    diverted=$(python3 "$HERE/remap.py" --compare "$TMP/remap/n$M.txt" "$TMP/remap/n$M-c16.txt")
    "${H[@]}" set-state edgepool_nodes node1 maint
    removed_map=$(timeout 300 python3 "$HERE/remap.py" "$PROXY" "$REMAP_K" "$TMP/remap/n$M-minus1.txt" --threads 1)
    removed=$(python3 "$HERE/remap.py" --compare "$TMP/remap/n$M.txt" "$TMP/remap/n$M-minus1.txt")
    fleet_down
    echo
    echo "remap ($REMAP_K authorities, one request each, one at a time):"
    echo "  $N nodes: $before"
    echo "  $M nodes: $after"
    read -r moved total frac flows <<<"$added"
    echo "  adding node$M moved $moved of $total = $frac (ideal 1/$M = $(python3 -c "print(f'{1/$M:.4f}')")): $flows"
    read -r moved total frac flows <<<"$removed"
    echo "  then node1 out of service: $removed_map; moved $moved of $total = $frac, all from node1: $flows"
    read -r moved total frac _ <<<"$diverted"
    echo "  16 requests at a time instead of 1 (bounded load at factor $default_factor): $moved of $total = $frac routed off their ring node"
fi
echo
echo "started $started, finished $(date -u +%Y-%m-%dT%H:%M:%SZ); $(nproc) CPU; $("$EDGEPOOL_BIN" --version 2>/dev/null || echo edgepool); $(haproxy -v 2>/dev/null | head -n 1 || true)"
