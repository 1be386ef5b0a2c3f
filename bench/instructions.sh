#!/usr/bin/env bash
# Instructions edgepool spends per proxied request (plain HTTP, pool hit), counted by valgrind's
# callgrind: repeatable whatever else the machine is doing, unlike seconds.
#
#   cargo build --release && bench/instructions.sh            # N1=1000 N2=11000
#   EDGEPOOL_BIN=path/to/other/edgepool bench/instructions.sh  # e.g. an older build, to compare
#
# What runs (on 127.0.0.1 only, all started here and stopped by pid):
#   origin    nginx, `return 200 "hello"`, keep-alive
#   edgepool  under `valgrind --tool=callgrind`, `serve --allow-target 127.0.0.0/8`, defaults
#   client    bench/keepalive_client.py: N absolute-form GETs over one keep-alive connection,
#             every answer checked (200, full body)
# Two runs, N1 and N2 requests; per request = (Ir(N2) - Ir(N1)) / (N2 - N1), so start-up and
# shutdown cancel. Printed twice: all instructions, and without edgepool's timer-driven port
# check (PortGuard::refresh_locked reads /proc/net/tcp on a clock; under valgrind's ~50x
# slowdown a run lasts long enough for it to weigh far more than in real time).
# Environment: N1, N2, EDGEPOOL_BIN, KEEP_TMP=1 (keep the callgrind files), BIND (127.x.y.z),
# FLOOR=1: count examples/hyper_floor instead (tokio + hyper only, to the one origin: the stack's
# own cost; cargo build --release --example hyper_floor; FLOOR_BIN to point elsewhere).
set -euo pipefail

N1=${N1:-1000}
N2=${N2:-11000}
BIND=${BIND:-127.0.0.1}
KEEP_TMP=${KEEP_TMP:-0}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
EDGEPOOL_BIN=${EDGEPOOL_BIN:-$ROOT/target/release/edgepool}
FLOOR=${FLOOR:-0}
FLOOR_BIN=${FLOOR_BIN:-$ROOT/target/release/examples/hyper_floor}
die() { echo "instructions.sh: error: $*" >&2; exit 1; }
if [[ $FLOOR == 1 ]]; then
    [[ -x $FLOOR_BIN ]] || die "FLOOR=1: $FLOOR_BIN not found (cargo build --release --example hyper_floor)"
    EDGEPOOL_BIN=$FLOOR_BIN
fi
[[ $BIND =~ ^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "BIND=$BIND is not in 127.0.0.0/8"
[[ $N1 =~ ^[0-9]+$ && $N2 =~ ^[0-9]+$ && $N2 -gt $N1 ]] || die "need integers N2 > N1 (got $N1, $N2)"
[[ -x $EDGEPOOL_BIN ]] || die "no edgepool binary at $EDGEPOOL_BIN (cargo build --release)"
for t in valgrind callgrind_annotate python3; do command -v $t >/dev/null || die "$t not found (apt-get install -y valgrind python3)"; done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $NGINX ]] || die "nginx not found (apt-get install -y nginx)"

TMP=$(mktemp -d /tmp/edgepool-instructions.XXXXXX)
PIDS=()
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ $KEEP_TMP == 1 ]]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('$BIND', 0)); print(s.getsockname()[1])"; }
P_ORIGIN=$(free_port); P_EDGE=$(free_port); P_ADMIN=$(free_port)

mkdir -p "$TMP/origin"
cat >"$TMP/origin/nginx.conf" <<C
daemon off; master_process off; worker_processes 1;
pid $TMP/origin/nginx.pid; error_log $TMP/origin/error.log warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 600s;
  client_body_temp_path $TMP/origin; proxy_temp_path $TMP/origin; fastcgi_temp_path $TMP/origin;
  uwsgi_temp_path $TMP/origin; scgi_temp_path $TMP/origin;
  server { listen $BIND:$P_ORIGIN; location / { default_type text/plain; return 200 "hello"; } } }
C
"$NGINX" -p "$TMP/origin/" -e "$TMP/origin/error.log" -c "$TMP/origin/nginx.conf" &
PIDS+=($!)

# one_run N OUT -> prints "total portguard" instructions
one_run() {
    local n=$1 out=$2 ep i
    rm -rf "$TMP/ep"; mkdir -p "$TMP/ep"
    if [[ $FLOOR == 1 ]]; then
        valgrind --tool=callgrind --callgrind-out-file="$out" "$EDGEPOOL_BIN" \
            --listen "$BIND:$P_EDGE" --upstream "$BIND:$P_ORIGIN" >"$TMP/edgepool.$n.log" 2>&1 &
    else
        valgrind --tool=callgrind --callgrind-out-file="$out" "$EDGEPOOL_BIN" serve \
            --listen "$BIND:$P_EDGE" --admin "$BIND:$P_ADMIN" --allow-target 127.0.0.0/8 \
            --data-dir "$TMP/ep" >"$TMP/edgepool.$n.log" 2>&1 &
    fi
    ep=$!
    PIDS+=("$ep")
    # Ready once its admin port answers /readyz (no request through the proxy: it would count).
    # The floor has no admin port: one request through it, in both runs, so it cancels out.
    for ((i = 0; i < 600; i++)); do
        kill -0 "$ep" 2>/dev/null || { tail -n 20 "$TMP/edgepool.$n.log" >&2; die "the proxy exited during start-up"; }
        if [[ $FLOOR == 1 ]]; then
            # Generous: under callgrind the first request is slow, and a curl that gave up
            # and retried would put a different number of requests in each run.
            curl -s -o /dev/null --max-time 60 -x "http://$BIND:$P_EDGE" "http://$BIND:$P_ORIGIN/" && break
        else
            curl -s -o /dev/null --max-time 2 "http://$BIND:$P_ADMIN/readyz" && break
        fi
        sleep 0.2
    done
    timeout 900 python3 "$HERE/keepalive_client.py" "$P_EDGE" "$BIND:$P_ORIGIN" "$n" "$BIND" >&2 ||
        die "the client failed (see $TMP/edgepool.$n.log with KEEP_TMP=1)"
    kill -INT "$ep"
    wait "$ep" || true
    local total guard
    total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
    guard=$(callgrind_annotate --inclusive=yes "$out" 2>/dev/null |
        awk '/PortGuard::refresh_locked \[/ && !seen { gsub(",", "", $1); print $1; seen = 1 }')
    echo "$total ${guard:-0}"
}

if [[ $FLOOR == 1 ]]; then echo "proxy: hyper floor ($EDGEPOOL_BIN)"
else echo "edgepool: $("$EDGEPOOL_BIN" --version 2>&1 | head -n1) ($EDGEPOOL_BIN)"; fi
echo "date: $(date -u)"
read -r t1 g1 < <(one_run "$N1" "$TMP/callgrind.$N1.out")
read -r t2 g2 < <(one_run "$N2" "$TMP/callgrind.$N2.out")
d=$((N2 - N1))
echo "runs: $N1 requests -> $t1 instructions ($g1 in the port check); $N2 -> $t2 ($g2)"
echo "instructions per request: $(((t2 - t1) / d)) (all); $((((t2 - g2) - (t1 - g1)) / d)) (without the timer-driven port check)"
