# Helpers shared by bench/compare.sh (plain HTTP) and bench/compare_paths.sh (names,
# interception, HTTP/2, new TLS connections). Sourced, not run. The sourcing script sets PROG
# (its name, for messages) and BIND before sourcing; it calls setup_tmp before start().

# ---- messages -------------------------------------------------------------------------------
die() { echo "${PROG:-compare}: error: $*" >&2; exit 1; }
note() { echo "${PROG:-compare}: $*" >&2; }

# ---- refuse anything that is not loopback -------------------------------------------------
is_loopback_v4() {
    [[ $1 =~ ^127\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || return 1
    local o
    for o in "${BASH_REMATCH[@]:1}"; do ((o <= 255)) || return 1; done
}

# ---- tools ----------------------------------------------------------------------------------
find_bin() { # name -> path or empty
    local p
    p=$(command -v "$1" 2>/dev/null) && { echo "$p"; return; }
    for p in /usr/sbin/$1 /usr/bin/$1 /sbin/$1; do [[ -x $p ]] && { echo "$p"; return; }; done
    true
}
# apt_install pkg... : installs Debian packages when root (or passwordless sudo), else dies
# with the command to run.
apt_install() {
    local SUDO=() pkg
    if [[ $(id -u) == 0 ]]; then SUDO=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo)
    else
        die "missing: $*. Install them (Debian/Ubuntu): sudo apt-get install -y $*, then run this again."
    fi
    command -v apt-get >/dev/null || die "missing: $* and no apt-get; install them with your package manager"
    note "installing $* (apt-get install -y)"
    for pkg in "$@"; do
        case $pkg in
            squid* | nginx*) note "note: the $pkg package's postinst may start a system service; this benchmark does not use it" ;;
        esac
    done
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" >&2 ||
        { "${SUDO[@]}" apt-get update >&2 && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" >&2; } ||
        die "apt-get install $* failed"
}

# curl without any proxy settings from the environment (NO_PROXY=127.0.0.1 would bypass -x)
ccurl() { env -u http_proxy -u HTTP_PROXY -u https_proxy -u HTTPS_PROXY -u all_proxy -u ALL_PROXY \
    -u no_proxy -u NO_PROXY curl "$@"; }

# ---- temp dir, process bookkeeping, cleanup -------------------------------------------------
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
    if [[ -n ${TMP:-} && -d $TMP ]]; then
        if [[ ${KEEP_TMP:-0} == 1 ]]; then note "kept $TMP"; else rm -rf "$TMP"; fi
    fi
    exit "$rc"
}
setup_tmp() { # prefix -> sets TMP, installs the traps
    TMP=$(mktemp -d "/tmp/$1.XXXXXX")
    chmod 755 "$TMP" # squid drops to user `proxy` when started as root
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
}

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

# ---- nginx config pieces --------------------------------------------------------------------
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
nginx_http_common() { # dir [keepalive_requests (default 100000)]
    cat <<EOF
    access_log off;
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy_temp;
    fastcgi_temp_path $1/fastcgi_temp;
    uwsgi_temp_path $1/uwsgi_temp;
    scgi_temp_path $1/scgi_temp;
    keepalive_requests ${2:-100000};
    keepalive_timeout 75s;
EOF
}

# ---- machine --------------------------------------------------------------------------------
print_machine() {
    echo "date:    $(date -u)"
    echo "nproc:   $(nproc)"
    echo "cpu:     $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "kernel:  $(uname -sr)"
    echo "mem:     $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min, before the runs)"
}

# ---- CPU accounting (clock ticks) -----------------------------------------------------------
# Per run: CPU time of the proxy and the origin (from /proc/PID/stat, all threads), of the load
# generator (this shell's reaped-children times) and of the whole machine (/proc/stat); "other"
# = the rest, i.e. what unrelated work on the machine took during the run (the noise indicator;
# it also holds the kernel's softirq work not charged to any process, a few % on an otherwise
# idle machine).
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)
pid_ticks() { [[ -n ${1:-} && -r /proc/$1/stat ]] || { echo 0; return; }; sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
# user and kernel ticks of a pid, all threads: "utime stime"
pid_ticks_split() { [[ -n ${1:-} && -r /proc/$1/stat ]] || { echo 0 0; return; }; sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12, $13 }'; }
# busy (user nice system irq softirq steal), total (+ idle iowait), steal
sys_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $9 }' /proc/stat; }
child_ticks() { # varname; `times` must run in this shell (a subshell has no reaped children)
    times >"$TMP/times"
    printf -v "$1" %s "$(tail -n1 "$TMP/times" | awk -v hz="$HZ" '{ t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] } printf "%.0f", t * hz }')"
}
secs() { awk -v t="$1" -v hz="$HZ" 'BEGIN { printf "%.1f", t / hz }'; }

# ---- formatting -----------------------------------------------------------------------------
fmt_lat() { awk -v u="$1" 'BEGIN { if (u < 1000) printf "%.0f µs", u; else printf "%.2f ms", u / 1000 }'; }
fmt_int() { awk -v r="$1" 'BEGIN { s = sprintf("%.0f", r); o = ""; while (length(s) > 3) { o = "," substr(s, length(s) - 2) o; s = substr(s, 1, length(s) - 3) } print s o }'; }

# The squid.conf lines every suite shares (after its own http_port/TLS lines): loopback clients
# only, no cache at all, persistent connections both ways, one worker, files in $TMP/squid.
squid_common_conf() {
    cat <<EOF
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
}
