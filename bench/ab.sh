#!/usr/bin/env bash
# Alternating A/B runs of edgepool builds on the plain-HTTP path (the load of bench/compare.sh:
# wrk, absolute-form GETs, one nginx origin), for changes too small to show in one run on a
# shared machine: every build runs once per round, in turn, so drifting background load falls
# on all of them alike. Prints one line per run: req/s and the build's CPU per request (user +
# kernel, from /proc/PID/stat), then the mean per build.
#
#   bench/ab.sh target/release/edgepool /tmp/edgepool-before          # A/B of two builds
#   ROUNDS=5 THREADS_LIST="1 2" bench/ab.sh target/release/edgepool    # 1 vs 2 worker threads
#   PERF_STAT=1 FLOOR=1 bench/ab.sh target/release/edgepool            # the kernel's view, vs the floor
#
# Environment (all optional):
#   ROUNDS=3          rounds (each runs every build once, for every THREADS_LIST value)
#   DURATION=4s       wrk -d per run
#   CONNECTIONS=32    wrk -c (one wrk thread)
#   THREADS_LIST=2    TOKIO_WORKER_THREADS values to run each build with
#   FLOOR=1           also run examples/hyper_floor (cargo build --release --example hyper_floor;
#                     FLOOR_BIN to point elsewhere): tokio + hyper only, to the same origin
#   PERF_STAT=1       also count, with `perf stat` on the proxy's pid, per request: context
#                     switches, syscalls, futex calls (thread wake-ups and contended locks,
#                     the allocator's arena locks among them), writev and recvfrom
#   BIND=127.0.0.1    loopback address everything listens on
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROG=ab.sh
BIND=${BIND:-127.0.0.1}
# shellcheck source=bench/compare_common.sh
source "$HERE/compare_common.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-4s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS_LIST=${THREADS_LIST:-2}
FLOOR=${FLOOR:-0}
PERF_STAT=${PERF_STAT:-0}
ROOT=$(cd "$HERE/.." && pwd)
FLOOR_BIN=${FLOOR_BIN:-$ROOT/target/release/examples/hyper_floor}
LUA=$HERE/absolute.lua

is_loopback_v4 "$BIND" || die "BIND=$BIND is not a 127.0.0.0/8 address; this benchmark runs on loopback only"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 ]] || die "ROUNDS=$ROUNDS: a whole number >= 1"
[[ $DURATION =~ ^([0-9]+)s$ ]] || die "DURATION=$DURATION: whole seconds, e.g. 4s"
SECS=${BASH_REMATCH[1]}
[[ $CONNECTIONS =~ ^[0-9]+$ && $CONNECTIONS -ge 1 ]] || die "CONNECTIONS=$CONNECTIONS: a whole number >= 1"
for t in $THREADS_LIST; do [[ $t =~ ^[0-9]+$ && $t -ge 1 ]] || die "THREADS_LIST: '$t' is not a thread count"; done
(($# >= 1)) || [[ $FLOOR == 1 ]] || die "name at least one edgepool binary (or FLOOR=1)"
BINS=()
for b in "$@"; do
    [[ -x $b ]] || die "$b is not an executable (build it: cargo build --release)"
    BINS+=("$(cd "$(dirname "$b")" && pwd)/$(basename "$b")")
done
[[ $FLOOR != 1 || -x $FLOOR_BIN ]] ||
    die "FLOOR=1: $FLOOR_BIN not found: cargo build --release --example hyper_floor, or set FLOOR_BIN"
[[ $FLOOR == 1 ]] && BINS+=(floor)
missing=()
for pkg in nginx wrk; do [[ -n $(find_bin $pkg) ]] || missing+=("$pkg"); done
if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
NGINX=$(find_bin nginx); WRK=$(find_bin wrk)
command -v curl >/dev/null || die "curl is needed (apt-get install curl)"
if [[ $PERF_STAT == 1 ]]; then
    command -v perf >/dev/null || die "PERF_STAT=1 needs perf (apt-get install linux-perf)"
fi
HZ=$(getconf CLK_TCK)

setup_tmp edgepool-ab
pick_port P_ORIGIN; pick_port P_PROXY; pick_port P_ADMIN
ORIGIN=$BIND:$P_ORIGIN
mkdir -p "$TMP/origin"
{
    nginx_common "$TMP/origin"
    echo "http {"
    nginx_http_common "$TMP/origin"
    cat <<EOF
    server {
        listen $ORIGIN;
        location / { default_type text/plain; return 200 "hello"; }
    }
}
EOF
} >"$TMP/origin/nginx.conf"
start origin "$TMP/origin.log" "$NGINX" -p "$TMP/origin/" -e "$TMP/origin/error.log" -c "$TMP/origin/nginx.conf"
for ((i = 0; i < 50; i++)); do
    [[ $(ccurl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$ORIGIN/" 2>/dev/null) == 200 ]] && break
    sleep 0.1
done

# one run: prints "label threads req/s ... CPU ..." (label: the build's position and file name,
# so two builds with the same file name stay apart)
run_one() { # index bin threads
    local idx=$1 bin=$2 th=$3 pid i code n u0 s0 u1 s1 label perf_pid=
    local cmd
    if [[ $bin == floor ]]; then
        label=$idx:floor
        cmd=("$FLOOR_BIN" --listen "$BIND:$P_PROXY" --upstream "$ORIGIN")
    else
        label=$idx:$(basename "$bin")
        cmd=("$bin" serve --listen "$BIND:$P_PROXY" --admin "$BIND:$P_ADMIN" --allow-target 127.0.0.0/8)
    fi
    TOKIO_WORKER_THREADS=$th "${cmd[@]}" >"$TMP/proxy.log" 2>&1 &
    pid=$!
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$TMP/proxy.log" >&2; die "$label exited during start-up"; }
        code=$(ccurl -s -o /dev/null -w '%{http_code}' --max-time 2 -x "http://$BIND:$P_PROXY" "http://$ORIGIN/" 2>/dev/null) || code=000
        [[ $code == 200 ]] && break
        sleep 0.1
    done
    [[ $code == 200 ]] || { kill "$pid"; die "$label: a request through it gave HTTP $code"; }
    read -r u0 s0 < <(pid_ticks_split "$pid")
    if [[ $PERF_STAT == 1 ]]; then
        perf stat -x, -o "$TMP/perf.csv" -p "$pid" \
            -e context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_futex,syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom \
            -- sleep "$SECS" >/dev/null 2>&1 &
        perf_pid=$!
    fi
    # A failed wrk must not end this function before the proxy is stopped: checked below.
    n=$(WRK_TARGET=$ORIGIN "$WRK" -t1 -c"$CONNECTIONS" -d"$DURATION" -s "$LUA" "http://$BIND:$P_PROXY/" |
        awk '/requests in/ { print $1 } /Non-2xx|Socket errors/ { bad = 1 } END { if (bad) print "errors" }') || n=""
    read -r u1 s1 < <(pid_ticks_split "$pid")
    [[ -n $perf_pid ]] && wait "$perf_pid" || true
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || die "$label: wrk reported errors or no requests ($n)"
    local extra=""
    if [[ $PERF_STAT == 1 ]]; then
        extra=$(awk -F, -v n="$n" '$1 ~ /^[0-9]+$/ { v[$3] = $1 / n }
            END { printf "  ctx-switches %.3f  syscalls %.2f  futex %.3f  writev %.2f  recvfrom %.2f",
                  v["context-switches"], v["raw_syscalls:sys_enter"], v["syscalls:sys_enter_futex"],
                  v["syscalls:sys_enter_writev"], v["syscalls:sys_enter_recvfrom"] }' "$TMP/perf.csv")
    fi
    awk -v l="$label" -v th="$th" -v n="$n" -v d="$SECS" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$HZ" -v x="$extra" \
        'BEGIN { printf "%-24s threads %s  %7.0f req/s  user %5.1f µs  kernel %5.1f µs  CPU %5.1f µs per request%s\n",
                 l, th, n / d, u / hz / n * 1e6, s / hz / n * 1e6, (u + s) / hz / n * 1e6, x }'
}

echo "origin nginx on $ORIGIN; wrk -t1 -c$CONNECTIONS -d$DURATION; $ROUNDS round(s); TOKIO_WORKER_THREADS in: $THREADS_LIST"
for ((r = 1; r <= ROUNDS; r++)); do
    for th in $THREADS_LIST; do
        for k in "${!BINS[@]}"; do
            run_one "$((k + 1))" "${BINS[k]}" "$th" | tee -a "$TMP/runs"
            sleep 1
        done
    done
done
echo "-- mean per build and thread count"
awk '{ k = $1 " threads " $3; n[k]++; rps[k] += $4; cpu[k] += $13 }
     END { for (k in n) printf "%-36s %7.0f req/s  CPU %5.1f µs per request  (%d runs)\n", k, rps[k] / n[k], cpu[k] / n[k], n[k] }' \
    "$TMP/runs" | sort
