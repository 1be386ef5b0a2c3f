#!/usr/bin/env bash
# Throughput of edgepool vs squid vs nginx as plain-HTTP forward proxies, same load, loopback.
#
#   bench/compare.sh                                   # defaults below
#   DURATION=10s CONNECTIONS=32 THREADS=1 bench/compare.sh
#
# Environment (all optional):
#   DURATION=10s      wrk -d per run (baseline + 3 proxies)
#   CONNECTIONS=32    wrk -c
#   THREADS=1         wrk -t
#   PAUSE=2           seconds between runs
#   BIND=127.0.0.1    address every process listens on and every request goes to; must be
#                     in 127.0.0.0/8 (the script refuses anything else)
#   EDGEPOOL_BIN=target/release/edgepool   (build it first: cargo build --release)
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

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
PAUSE=${PAUSE:-2}
BIND=${BIND:-127.0.0.1}
PERF=${PERF:-0}
KEEP_TMP=${KEEP_TMP:-0}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
EDGEPOOL_BIN=${EDGEPOOL_BIN:-$ROOT/target/release/edgepool}
LUA=$HERE/absolute.lua

die() { echo "compare.sh: error: $*" >&2; exit 1; }
note() { echo "compare.sh: $*" >&2; }

# ---- refuse anything that is not loopback -------------------------------------------------
is_loopback_v4() {
    [[ $1 =~ ^127\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || return 1
    local o
    for o in "${BASH_REMATCH[@]:1}"; do ((o <= 255)) || return 1; done
}
is_loopback_v4 "$BIND" || die "BIND=$BIND is not a 127.0.0.0/8 address; this benchmark runs on loopback only"
[[ $CONNECTIONS =~ ^[0-9]+$ && $THREADS =~ ^[0-9]+$ && $CONNECTIONS -ge $THREADS && $THREADS -ge 1 ]] ||
    die "need integers CONNECTIONS >= THREADS >= 1 (got CONNECTIONS=$CONNECTIONS THREADS=$THREADS)"
[[ $DURATION =~ ^[0-9]+[smh]?$ ]] || die "DURATION=$DURATION: use e.g. 10s"
[[ $PAUSE =~ ^[0-9]+$ ]] || die "PAUSE=$PAUSE: whole seconds"

# ---- tools ----------------------------------------------------------------------------------
find_bin() { # name -> path or empty
    local p
    p=$(command -v "$1" 2>/dev/null) && { echo "$p"; return; }
    for p in /usr/sbin/$1 /usr/bin/$1 /sbin/$1; do [[ -x $p ]] && { echo "$p"; return; }; done
    true
}
missing=()
for pkg in squid nginx wrk; do [[ -n $(find_bin $pkg) ]] || missing+=("$pkg"); done
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]]; then SUDO=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo)
    else
        die "missing: ${missing[*]}. Install them (Debian/Ubuntu): sudo apt-get install -y ${missing[*]}
  (squid: /usr/sbin/squid, nginx: /usr/sbin/nginx, wrk: /usr/bin/wrk), then run this again."
    fi
    command -v apt-get >/dev/null || die "missing: ${missing[*]} and no apt-get; install them with your package manager"
    note "installing ${missing[*]} (apt-get install -y)"
    for pkg in "${missing[@]}"; do
        [[ $pkg == wrk ]] || note "note: the $pkg package's postinst may start a system $pkg service; this benchmark does not use it"
    done
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2 ||
        { "${SUDO[@]}" apt-get update >&2 && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2; } ||
        die "apt-get install ${missing[*]} failed"
fi
SQUID=$(find_bin squid); NGINX=$(find_bin nginx); WRK=$(find_bin wrk)
command -v curl >/dev/null || die "curl is needed (apt-get install curl)"
[[ -x $EDGEPOOL_BIN ]] || die "$EDGEPOOL_BIN not found: build it first (cargo build --release) or set EDGEPOOL_BIN"
[[ -r $LUA ]] || die "$LUA not found"
if [[ $PERF == 1 ]]; then command -v perf >/dev/null || die "PERF=1 but perf is not installed"; fi

# ---- temp dir, process bookkeeping, cleanup -------------------------------------------------
TMP=$(mktemp -d /tmp/edgepool-compare.XXXXXX)
chmod 755 "$TMP" # squid drops to user `proxy` when started as root
PIDS=() NAMES=()
cleanup() {
    local rc=$? i pid n
    trap - EXIT INT TERM HUP
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
    done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        for ((n = 0; n < 50; n++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            note "${NAMES[i]} (pid $pid) did not stop on TERM; killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP_TMP == 1 ]]; then note "kept $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

start() { # name logfile cmd...  (background; pid recorded for cleanup)
    local name=$1 log=$2; shift 2
    "$@" >"$log" 2>&1 &
    PIDS+=("$!"); NAMES+=("$name")
}
pid_of() { local i; for i in "${!NAMES[@]}"; do if [[ ${NAMES[i]} == "$1" ]]; then echo "${PIDS[i]}"; return 0; fi; done; return 0; }

# ---- free loopback ports --------------------------------------------------------------------
USED_PORTS=" "
port_busy() {
    if command -v ss >/dev/null; then [[ -n $(ss -Htan "sport = :$1" 2>/dev/null) ]]
    else (exec 3<>"/dev/tcp/$BIND/$1") 2>/dev/null; fi
}
pick_port() { # varname
    local p tries
    for ((tries = 0; tries < 500; tries++)); do
        p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        [[ $USED_PORTS == *" $p "* ]] && continue
        port_busy "$p" && continue
        USED_PORTS+="$p "
        printf -v "$1" %s "$p"
        return
    done
    die "no free port found"
}
pick_port P_EDGE; pick_port P_ADMIN; pick_port P_SQUID; pick_port P_NGINX; pick_port P_ORIGIN
ORIGIN=$BIND:$P_ORIGIN

# curl without any proxy settings from the environment (NO_PROXY=127.0.0.1 would bypass -x)
ccurl() { env -u http_proxy -u HTTP_PROXY -u https_proxy -u HTTPS_PROXY -u all_proxy -u ALL_PROXY \
    -u no_proxy -u NO_PROXY curl "$@"; }

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
nginx_common() { # dir
    cat <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_rlimit_nofile 8192;
events { worker_connections 4096; }
EOF
}
nginx_http_common() { # dir
    cat <<EOF
    access_log off;
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy_temp;
    fastcgi_temp_path $1/fastcgi_temp;
    uwsgi_temp_path $1/uwsgi_temp;
    scgi_temp_path $1/scgi_temp;
    keepalive_requests 100000;
    keepalive_timeout 75s;
EOF
}

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
acl bench_clients src 127.0.0.0/8
http_access allow bench_clients
http_access deny all
# no caching at all: nothing stored, no cache_dir (no disk cache)
cache deny all
server_persistent_connections on
client_persistent_connections on
pinger_enable off
workers 1
pid_filename $TMP/squid/squid.pid
cache_log $TMP/squid/cache.log
access_log none
cache_store_log none
netdb_filename none
coredump_dir $TMP/squid
logfile_rotate 0
shutdown_lifetime 1 seconds
visible_hostname edgepool-bench
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

# ---- machine and versions -------------------------------------------------------------------
echo
echo "== machine"
echo "date:    $(date -u)"
echo "nproc:   $(nproc)"
echo "cpu:     $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "kernel:  $(uname -sr)"
echo "mem:     $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min, before the runs)"
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

# ---- CPU accounting (clock ticks) -----------------------------------------------------------
# Per run: CPU time of the proxy and the origin (from /proc/PID/stat, all threads), of wrk (this
# shell's reaped-children times) and of the whole machine (/proc/stat); "other" = the rest, i.e.
# what unrelated work on the machine took during the run (the noise indicator; it also holds
# the kernel's softirq work not charged to any process, a few % on an otherwise idle machine).
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)
pid_ticks() { [[ -n ${1:-} && -r /proc/$1/stat ]] || { echo 0; return; }; sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
# busy (user nice system irq softirq steal), total (+ idle iowait), steal
sys_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $9 }' /proc/stat; }
child_ticks() { # varname; `times` must run in this shell (a subshell has no reaped children)
    times >"$TMP/times"
    printf -v "$1" %s "$(tail -n1 "$TMP/times" | awk -v hz="$HZ" '{ t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] } printf "%.0f", t * hz }')"
}
secs() { awk -v t="$1" -v hz="$HZ" 'BEGIN { printf "%.1f", t / hz }'; }

# ---- runs -----------------------------------------------------------------------------------
declare -A RPS P50 P99 ERR ERRDETAIL CPUREQ OTHER
ORDER=(direct edgepool squid nginx)
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
    local p0 o0 c0 s0 t0 st0 p1 o1 c1 s1 t1 st1
    p0=$(pid_ticks "$ppid"); o0=$(pid_ticks "$opid"); child_ticks c0; read -r s0 t0 st0 < <(sys_ticks)
    if [[ -n $port ]]; then export WRK_TARGET=$ORIGIN; else unset WRK_TARGET; fi
    "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$LUA" "$url" >"$TMP/wrk.$name.out" 2>&1 &
    wpid=$!
    PIDS+=("$wpid"); NAMES+=("wrk-$name")
    wait "$wpid" || rc=$?
    child_ticks c1
    p1=$(pid_ticks "$ppid"); o1=$(pid_ticks "$opid"); read -r s1 t1 st1 < <(sys_ticks)
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
    else CPUREQ[$name]="—"; fi
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
    esac
done
echo "load after the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "(proxy CPU per request: the proxy's CPU time, all threads, over its run / requests served;"
echo " other load: CPU taken by processes other than wrk, origin and proxy, plus hypervisor steal,"
echo " % of the machine's $(nproc) CPUs during the run: above a few % the run shared the machine)"

# ---- table ----------------------------------------------------------------------------------
fmt_lat() { awk -v u="$1" 'BEGIN { if (u < 1000) printf "%.0f µs", u; else printf "%.2f ms", u / 1000 }'; }
echo
echo "| proxy | req/s | p50 | p99 | errors | vs edgepool | proxy CPU per request | other load |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for name in "${ORDER[@]}"; do
    label=$name
    [[ $name == direct ]] && label="direct to origin (baseline)"
    [[ $name == nginx ]] && label="nginx (fixed upstream, keepalive 64)"
    [[ $name == squid ]] && label="squid $("$SQUID" -v 2>&1 | head -n1 | sed 's/.*Version //')"
    ratio=$(awk -v a="${RPS[$name]}" -v b="${RPS[edgepool]}" 'BEGIN { printf "%.2f×", a / b }')
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" \
        "$(awk -v r="${RPS[$name]}" 'BEGIN { s = sprintf("%.0f", r); o = ""; while (length(s) > 3) { o = "," substr(s, length(s) - 2) o; s = substr(s, 1, length(s) - 3) } print s o }')" \
        "$(fmt_lat "${P50[$name]}")" "$(fmt_lat "${P99[$name]}")" "${ERR[$name]}" "$ratio" \
        "${CPUREQ[$name]}" "${OTHER[$name]}"
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
