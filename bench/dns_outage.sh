#!/usr/bin/env bash
# Issue 11's acceptance: targets named in /etc/hosts, the system's nameserver dead, 16 workers x
# 250 requests through edgepool (lab scenario `warmpath`). Runs edgepool's lab in a private
# mount namespace where /etc/hosts lists the lab's targets and /etc/resolv.conf names a
# nameserver that
#   drop:   receives every query and never answers (a UDP sink on 127.0.0.78:53), or
#   refuse: does not exist (nothing on 127.0.0.77:53: ICMP port unreachable).
# The machine's own /etc/hosts and /etc/resolv.conf are never touched. Needs root (or
# CAP_SYS_ADMIN) for the mount namespace; loopback only.
#
#   bench/dns_outage.sh [drop|refuse|both] [extra lab args...]
# Prints the lab table and a one-line verdict per variant: errors, requests over 1 s, R / greedy reference.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
variants="${1:-both}"
shift || true
[ "$variants" = both ] && variants="drop refuse"
cargo build --release --quiet
BIN="$PWD/target/release/edgepool"
TMP="$(mktemp -d)"
SINK_PID=""
cleanup() {
    [ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

for variant in $variants; do
    case "$variant" in
        drop) ns=127.0.0.78 ;;
        refuse) ns=127.0.0.77 ;;
        *) echo "unknown variant $variant (drop, refuse or both)" >&2; exit 2 ;;
    esac
    { echo "127.0.0.1 localhost"; "$BIN" lab --scenario warmpath --print-hosts; } >"$TMP/hosts"
    printf 'nameserver %s\noptions timeout:5 attempts:2\n' "$ns" >"$TMP/resolv.conf"
    if [ "$variant" = drop ]; then
        # Receives and counts every query, answers none (bounded: dies with this script).
        python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.78", 53))
n = 0
while True:
    s.recvfrom(4096); n += 1
    open(sys.argv[1], "w").write(str(n))
' "$TMP/sink-count" &
        SINK_PID=$!
        sleep 0.3
    fi
    echo "=== nameserver $ns ($variant), targets in /etc/hosts ==="
    HOSTS="$TMP/hosts" RESOLV="$TMP/resolv.conf" BIN="$BIN" JSON="$TMP/$variant.json" \
        unshare --mount --propagation private sh -c '
            mount --bind "$HOSTS" /etc/hosts &&
            mount --bind "$RESOLV" /etc/resolv.conf &&
            exec "$BIN" lab --scenario warmpath --names hosts --hosts-file /etc/hosts \
                --system-resolver --mode edgepool --json "$JSON" "$@"' sh "$@"
    python3 - "$TMP/$variant.json" "$variant" "$TMP/sink-count" <<'PY'
import json, os, sys
r = json.load(open(sys.argv[1]))
m = [m for m in r["modes"] if m["mode"] == "edgepool"][0]
sink = open(sys.argv[3]).read() if os.path.exists(sys.argv[3]) else "0"
ratio = m["reuse_rate"] / m["reference_reuse_rate"]
print(f"{sys.argv[2]}: requests {m['requests']} errors {m['errors']} over_1s {m['requests_over_1s']} "
      f"p50 {m['latency_ms']['p50']} ms p99 {m['latency_ms']['p99']} ms max {m['latency_ms']['max']} ms "
      f"R {m['reuse_rate']} reference {m['reference_reuse_rate']} R/reference {ratio:.4f} "
      f"dns {m['dns']} queries_at_nameserver {sink}")
ok = m["errors"] == 0 and m["requests_over_1s"] == 0 and ratio >= 0.98
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
    if [ -n "$SINK_PID" ]; then kill "$SINK_PID" 2>/dev/null || true; SINK_PID=""; fi
    rm -f "$TMP/sink-count"
done
