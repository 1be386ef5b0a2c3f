#!/usr/bin/env bash
# Throughput of edgepool vs squid vs nginx as plain-HTTP forward proxies, same load, loopback.
#
#   bench/compare.sh                                   # defaults below
#   DURATION=10s CONNECTIONS=32 THREADS=1 bench/compare.sh
#   SUITE=paths bench/compare.sh   # names, intercepted HTTPS, HTTP/2, new TLS connections
#                                  # (bench/compare_paths.sh; its options are described there)
#   SUITE=all bench/compare.sh     # this suite, then the paths suite
#
# Environment (all optional):
#   SUITE=plain       plain (this file), paths (bench/compare_paths.sh) or all
#   DURATION=10s      wrk -d per run (baseline + 3 proxies)
#   CONNECTIONS=32    wrk -c
#   THREADS=1         wrk -t
#   PAUSE=2           seconds between runs
#   BIND=127.0.0.1    address every process listens on and every request goes to; must be
#                     in 127.0.0.0/8 (the script refuses anything else)
#   EDGEPOOL_BIN=target/release/edgepool   (build it first: cargo build --release)
#   FLOOR=1           also run examples/hyper_floor (FLOOR_BIN=target/release/examples/hyper_floor;
#                     build it: cargo build --release --example hyper_floor): tokio + hyper with
#                     nothing else, to the same fixed upstream as nginx; what edgepool costs above
#                     it is edgepool's own work, what it costs above nginx is the stack's
#   PERF=1            also sample edgepool with `perf record` during its run and print the
#                     hottest symbols (flat profile)
#   KEEP_TMP=1        keep the temp dir (configs, logs) instead of deleting it
#
# What runs (all started here, all stopped by pid on exit):
#   origin   nginx, `return 200 "hello\n"`, keepalive_requests 100000
#   edgepool edgepool serve --allow-target 127.0.0.0/8, embedded defaults otherwise
#   squid    squid -N, no cache (cache deny all, no cache_dir), server_persistent_connections on
#   nginx    nginx proxy_pass to a FIXED `upstream origin { keepalive 64; }` block: nginx only
#            pools upstream connections through an upstream block, so this is nginx at its best
#            (a real forward proxy, proxy_pass http://$http_host$request_uri, would dial per
#            request)
# Load: wrk sending absolute-form requests (bench/absolute.lua) to each proxy; a baseline run
# sends origin-form requests straight to the origin. Exits non-zero if any run saw an error or
# a non-2xx/3xx response.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
case ${SUITE:-plain} in
    plain) ;;
    paths) exec "$HERE/compare_paths.sh" ;;
    all) SUITE=plain "$HERE/compare.sh" && exec "$HERE/compare_paths.sh" ;;
    *) echo "compare.sh: error: SUITE=$SUITE: plain, paths or all" >&2; exit 1 ;;
esac
PROG=compare.sh
# shellcheck source=bench/compare_common.sh
source "$HERE/compare_common.sh"

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
PAUSE=${PAUSE:-2}
BIND=${BIND:-127.0.0.1}
PERF=${PERF:-0}
FLOOR=${FLOOR:-0}
KEEP_TMP=${KEEP_TMP:-0}

ROOT=$(cd "$HERE/.." && pwd)
EDGEPOOL_BIN=${EDGEPOOL_BIN:-$ROOT/target/release/edgepool}
LUA=$HERE/absolute.lua
FLOOR_BIN=${FLOOR_BIN:-$ROOT/target/release/examples/hyper_floor}

# ---- refuse anything that is not loopback -------------------------------------------------
is_loopback_v4 "$BIND" || die "BIND=$BIND is not a 127.0.0.0/8 address; this benchmark runs on loopback only"
[[ $CONNECTIONS =~ ^[0-9]+$ && $THREADS =~ ^[0-9]+$ && $CONNECTIONS -ge $THREADS && $THREADS -ge 1 ]] ||
    die "need integers CONNECTIONS >= THREADS >= 1 (got CONNECTIONS=$CONNECTIONS THREADS=$THREADS)"
[[ $DURATION =~ ^[0-9]+[smh]?$ ]] || die "DURATION=$DURATION: use e.g. 10s"
[[ $PAUSE =~ ^[0-9]+$ ]] || die "PAUSE=$PAUSE: whole seconds"

# ---- tools ----------------------------------------------------------------------------------
missing=()
for pkg in squid nginx wrk; do [[ -n $(find_bin $pkg) ]] || missing+=("$pkg"); done
if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
SQUID=$(find_bin squid); NGINX=$(find_bin nginx); WRK=$(find_bin wrk)
command -v curl >/dev/null || die "curl is needed (apt-get install curl)"
[[ -x $EDGEPOOL_BIN ]] || die "$EDGEPOOL_BIN not found: build it first (cargo build --release) or set EDGEPOOL_BIN"
[[ -r $LUA ]] || die "$LUA not found"
[[ $FLOOR != 1 || -x $FLOOR_BIN ]] ||
    die "FLOOR=1: $FLOOR_BIN not found: cargo build --release --example hyper_floor, or set FLOOR_BIN"
if [[ $PERF == 1 ]]; then command -v perf >/dev/null || die "PERF=1 but perf is not installed"; fi

# ---- temp dir, process bookkeeping, cleanup -------------------------------------------------
setup_tmp edgepool-compare

pick_port P_EDGE; pick_port P_ADMIN; pick_port P_SQUID; pick_port P_NGINX; pick_port P_ORIGIN
pick_port P_FLOOR
ORIGIN=$BIND:$P_ORIGIN

wait_ready() { # name url [proxy]  -> waits for 200 "hello"
    local name=$1 url=$2 proxy=${3:-} pid code body i
    pid=$(pid_of "$name")
    local args=(-s -o "$TMP/check.body" -w '%{http_code}' --max-time 2)
    [[ -n $proxy ]] && args+=(-x "http://$proxy")
    for ((i = 0; i < 150; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "---- $name log ----" >&2; tail -n 30 "$TMP/$name.log" >&2 || true
            die "$name exited during start-up"
        fi
        code=$(ccurl "${args[@]}" "$url" 2>/dev/null) || code=000
        [[ $code == 200 ]] && break
        sleep 0.2
    done
    body=$(cat "$TMP/check.body" 2>/dev/null || true)
    if [[ $code != 200 || $body != hello ]]; then
        echo "---- $name log ----" >&2; tail -n 30 "$TMP/$name.log" >&2 || true
        die "$name: curl ${proxy:+-x http://$proxy }$url gave HTTP $code, body '${body:0:80}' (want 200 'hello')"
    fi
    echo "  check: curl ${proxy:+-x http://$proxy }http://$ORIGIN/ -> $code '$body'"
}

# ---- configs --------------------------------------------------------------------------------
mkdir -p "$TMP/origin" "$TMP/nginx" "$TMP/squid" "$TMP/ep"
{
    nginx_common "$TMP/origin"
    echo "http {"
    nginx_http_common "$TMP/origin"
    cat <<EOF
    server {
        listen $BIND:$P_ORIGIN;
        location / { default_type text/plain; return 200 "hello"; }
    }
}
EOF
} >"$TMP/origin/nginx.conf"

{
    nginx_common "$TMP/nginx"
    echo "http {"
    nginx_http_common "$TMP/nginx"
    cat <<EOF
    upstream origin {
        server $BIND:$P_ORIGIN;
        keepalive 64;
        keepalive_requests 100000;
    }
    server {
        listen $BIND:$P_NGINX;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
        }
    }
}
EOF
} >"$TMP/nginx/nginx.conf"

SQUID_USER_LINE=""
if [[ $(id -u) == 0 ]]; then
    if id proxy >/dev/null 2>&1; then
        SQUID_USER_LINE="cache_effective_user proxy"
        chown -R proxy "$TMP/squid"
    else
        chmod 777 "$TMP/squid"
    fi
fi
cat >"$TMP/squid/squid.conf" <<EOF
http_port $BIND:$P_SQUID
$SQUID_USER_LINE
$(squid_common_conf)
EOF
chmod 644 "$TMP/squid/squid.conf"

# ---- start everything -----------------------------------------------------------------------
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true
echo "starting origin, edgepool, squid, nginx on $BIND (temp dir $TMP)"
start origin "$TMP/origin.log" "$NGINX" -p "$TMP/origin/" -e "$TMP/origin/error.log" -c "$TMP/origin/nginx.conf"
wait_ready origin "http://$ORIGIN/"
start edgepool "$TMP/edgepool.log" "$EDGEPOOL_BIN" serve --listen "$BIND:$P_EDGE" --admin "$BIND:$P_ADMIN" \
    --allow-target 127.0.0.0/8 --data-dir "$TMP/ep"
wait_ready edgepool "http://$ORIGIN/" "$BIND:$P_EDGE"
start squid "$TMP/squid.log" "$SQUID" -N -n "epbench$$" -f "$TMP/squid/squid.conf"
wait_ready squid "http://$ORIGIN/" "$BIND:$P_SQUID"
start nginx "$TMP/nginx.log" "$NGINX" -p "$TMP/nginx/" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf"
wait_ready nginx "http://$ORIGIN/" "$BIND:$P_NGINX"
if [[ $FLOOR == 1 ]]; then
    start floor "$TMP/floor.log" "$FLOOR_BIN" --listen "$BIND:$P_FLOOR" --upstream "$ORIGIN"
    wait_ready floor "http://$ORIGIN/" "$BIND:$P_FLOOR"
fi

# ---- machine and versions -------------------------------------------------------------------
echo
echo "== machine"
print_machine
echo "== versions"
echo "edgepool: $("$EDGEPOOL_BIN" --version 2>&1 | head -n1)"
echo "squid:    $("$SQUID" -v 2>&1 | head -n1)"
echo "nginx:    $("$NGINX" -v 2>&1 | head -n1)"
echo "wrk:      $("$WRK" -v 2>&1 | head -n1)"
echo "== load: wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, GET http://$ORIGIN/ (5-byte body)"
echo "nginx proxy: fixed 'upstream origin { server $ORIGIN; keepalive 64; }' + proxy_pass http://origin"
echo "  (nginx at its best: only an upstream block pools connections; edgepool and squid route by"
echo "  the request's own target)"
echo "edgepool: tokio runtime, up to $(nproc) worker threads; squid and each nginx: one process"
echo

# ---- runs -----------------------------------------------------------------------------------
declare -A RPS P50 P99 ERR ERRDETAIL CPUREQ SPLIT OTHER
ORDER=(direct edgepool squid nginx)
[[ $FLOOR == 1 ]] && ORDER+=(floor)
FAILED=0
run_wrk() { # name proxyport-or-empty
    local name=$1 port=$2 url out line perfpid=""
    if [[ -n $port ]]; then url="http://$BIND:$port/"; else url="http://$ORIGIN/"; fi
    echo "-- $name: wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency -s bench/absolute.lua $url${port:+  (WRK_TARGET=$ORIGIN)}"
    if [[ $PERF == 1 && $name == edgepool ]]; then
        local secs=${DURATION%s}; [[ $secs =~ ^[0-9]+$ ]] || secs=10
        perf record -F 999 -p "$(pid_of edgepool)" -o "$TMP/perf.data" -- sleep $((secs > 3 ? secs - 2 : secs)) \
            >"$TMP/perf.log" 2>&1 &
        perfpid=$!
        PIDS+=("$perfpid"); NAMES+=(perf)
    fi
    local ppid="" opid wpid rc=0
    [[ $name == direct ]] || ppid=$(pid_of "$name")
    opid=$(pid_of origin)
    local p0 o0 c0 s0 t0 st0 p1 o1 c1 s1 t1 st1 pu0 pk0 pu1 pk1
    read -r pu0 pk0 < <(pid_ticks_split "$ppid")
    p0=$(pid_ticks "$ppid"); o0=$(pid_ticks "$opid"); child_ticks c0; read -r s0 t0 st0 < <(sys_ticks)
    if [[ -n $port ]]; then export WRK_TARGET=$ORIGIN; else unset WRK_TARGET; fi
    "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$LUA" "$url" >"$TMP/wrk.$name.out" 2>&1 &
    wpid=$!
    PIDS+=("$wpid"); NAMES+=("wrk-$name")
    wait "$wpid" || rc=$?
    child_ticks c1
    p1=$(pid_ticks "$ppid"); o1=$(pid_ticks "$opid"); read -r s1 t1 st1 < <(sys_ticks)
    read -r pu1 pk1 < <(pid_ticks_split "$ppid")
    [[ -n $perfpid ]] && wait "$perfpid" 2>/dev/null || true
    unset WRK_TARGET
    out=$(cat "$TMP/wrk.$name.out")
    ((rc == 0)) || { echo "$out"; die "wrk failed for $name (exit $rc)"; }
    local dp=$((p1 - p0)) dorg=$((o1 - o0)) dc=$((c1 - c0)) ds=$((s1 - s0)) dt=$((t1 - t0))
    local dsteal=$((st1 - st0)) dother=$((ds - dp - dorg - dc)) dproc
    ((dother < 0)) && dother=0
    dproc=$((dother - dsteal)); ((dproc < 0)) && dproc=0
    echo "$out" | sed -n '/Latency Distribution/,/^ *99%/p;/requests in/p;/Socket errors/p;/Non-2xx/p' | sed 's/^/   /'
    line=$(grep '^EPBENCH ' <<<"$out") || { echo "$out"; die "no summary line from wrk for $name"; }
    local -A f=()
    local kv
    for kv in ${line#EPBENCH }; do f[${kv%%=*}]=${kv#*=}; done
    local non2xx
    non2xx=$(sed -n 's/.*Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' <<<"$out"); non2xx=${non2xx:-0}
    local errs=$((f[err_connect] + f[err_read] + f[err_write] + f[err_status] + f[err_timeout]))
    ((non2xx > f[err_status])) && errs=$((errs + non2xx - f[err_status]))
    RPS[$name]=${f[rps]}; P50[$name]=${f[p50_us]}; P99[$name]=${f[p99_us]}; ERR[$name]=$errs
    if [[ -n $ppid ]] && ((f[requests] > 0)); then
        CPUREQ[$name]=$(awk -v t="$dp" -v n="${f[requests]}" -v hz="$HZ" 'BEGIN { printf "%.0f µs", t / hz * 1e6 / n }')
        SPLIT[$name]=$(awk -v u="$((pu1 - pu0))" -v k="$((pk1 - pk0))" -v n="${f[requests]}" -v hz="$HZ" \
            'BEGIN { printf "%.1f + %.1f µs", u / hz * 1e6 / n, k / hz * 1e6 / n }')
    else CPUREQ[$name]="—"; SPLIT[$name]="—"; fi
    OTHER[$name]=$(awk -v o="$dother" -v t="$dt" 'BEGIN { printf "%.0f %%", t ? 100 * o / t : 0 }')
    echo "   CPU during the run (s): ${ppid:+$name $(secs $dp), }origin $(secs $dorg), wrk $(secs $dc)," \
        "other processes $(secs $dproc) + hypervisor steal $(secs $dsteal)," \
        "machine busy $(secs $ds) of $(secs $dt)"
    ERRDETAIL[$name]="non2xx=${f[err_status]} connect=${f[err_connect]} read=${f[err_read]} write=${f[err_write]} timeout=${f[err_timeout]}"
    if [[ -n $ppid ]] && ! kill -0 "$ppid" 2>/dev/null; then
        echo "!! $name exited during its run; its log:" >&2
        tail -n 20 "$TMP/$name.log" >&2 || true
        FAILED=1
    fi
    if ((errs > 0 || f[requests] == 0)); then
        echo "!! $name: ${f[requests]} requests, errors: ${ERRDETAIL[$name]}" >&2
        FAILED=1
    fi
}
first=1
for name in "${ORDER[@]}"; do
    ((first)) || sleep "$PAUSE"
    first=0
    case $name in
        direct) run_wrk direct "" ;;
        edgepool) run_wrk edgepool "$P_EDGE" ;;
        squid) run_wrk squid "$P_SQUID" ;;
        nginx) run_wrk nginx "$P_NGINX" ;;
        floor) run_wrk floor "$P_FLOOR" ;;
    esac
done
echo "load after the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "(proxy CPU per request: the proxy's CPU time, all threads, over its run / requests served;"
echo " user + kernel: the same split into user-space and kernel time (the kernel's share is the"
echo " sockets' work, about the same for any proxy making the same system calls);"
echo " other load: CPU taken by processes other than wrk, origin and proxy, plus hypervisor steal,"
echo " % of the machine's $(nproc) CPUs during the run: above a few % the run shared the machine)"

# ---- table ----------------------------------------------------------------------------------
echo
echo "| proxy | req/s | p50 | p99 | errors | vs edgepool | proxy CPU per request | user + kernel | other load |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for name in "${ORDER[@]}"; do
    label=$name
    [[ $name == direct ]] && label="direct to origin (baseline)"
    [[ $name == nginx ]] && label="nginx (fixed upstream, keepalive 64)"
    [[ $name == floor ]] && label="hyper floor (examples/hyper_floor: tokio + hyper only, fixed upstream)"
    [[ $name == squid ]] && label="squid $("$SQUID" -v 2>&1 | head -n1 | sed 's/.*Version //')"
    ratio=$(awk -v a="${RPS[$name]}" -v b="${RPS[edgepool]}" 'BEGIN { printf "%.2f×", a / b }')
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" \
        "$(fmt_int "${RPS[$name]}")" \
        "$(fmt_lat "${P50[$name]}")" "$(fmt_lat "${P99[$name]}")" "${ERR[$name]}" "$ratio" \
        "${CPUREQ[$name]}" "${SPLIT[$name]}" "${OTHER[$name]}"
done

if [[ $PERF == 1 && -s $TMP/perf.data ]]; then
    echo
    echo "== perf: edgepool, flat profile during its run (top symbols, % of edgepool's samples)"
    perf report -i "$TMP/perf.data" --no-children --sort dso,sym --stdio 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -n 40
fi

if ((FAILED)); then
    echo >&2
    for name in "${ORDER[@]}"; do ((ERR[$name] == 0)) || echo "FAILED: $name: ${ERRDETAIL[$name]}" >&2; done
    echo "see the logs: rerun with KEEP_TMP=1" >&2
    exit 1
fi
