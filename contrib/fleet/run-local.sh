#!/usr/bin/env bash
# A local edgepool fleet: HAProxy in front of N edgepool nodes, all on loopback (issue 15).
#
#   contrib/fleet/run-local.sh N [-- SERVE_ARGS...]
#
# Starts N nodes (`edgepool serve`, node k on 127.0.0.(10+k), its own proxy and admin ports,
# SERVE_ARGS passed to every node), then HAProxy with contrib/haproxy/haproxy.cfg rendered for
# them, waits until HAProxy sees every node UP, prints on stdout
#
#   FLEET_DIR=<dir>          configs, logs, nodes.tsv (name proxy admin pid data_dir)
#   HAPROXY_SOCK=<path>      HAProxy's runtime API (contrib/fleet/hactl.py talks to it)
#   PROXY=http://127.0.0.1:<port>   point workers here
#   CA=<path>/ca.pem         the one CA every node intercepts with: workers trust this file
#
# and runs until SIGTERM/SIGINT (or its end), then stops everything it started, by pid.
# Logs go to stderr and to files in FLEET_DIR.
#
# One CA for the fleet: node 1 starts first and creates the CA in its data dir; then
#   FLEET_CA=shared (default)  every node uses that same data dir. Safe: edgepool loads the CA
#                              from ca.pem/ca-key.pem (creation is exclusive, key first), and
#                              each instance keeps its own report store,
#                              reuse-<hostname>-<proxy port>.redb, so nodes sharing a data dir
#                              need distinct proxy ports (this script gives them that).
#   FLEET_CA=copy              each node gets its own data dir with ca.pem and ca-key.pem (0600)
#                              copied in: the way to distribute the CA to hosts without shared
#                              storage.
#
# Environment (all optional):
#   EDGEPOOL_BIN=target/release/edgepool   the edgepool binary (relative to the repository)
#   HAPROXY_BIN=haproxy                    HAProxy (PATH, then /usr/sbin)
#   BALANCE=consistent|roundrobin          consistent: hash on the target authority (the
#                                          shipped config); roundrobin: for contrast
#   HASH_BALANCE_FACTOR=200                bounded-load factor (hash-balance-factor; 0: off)
#   PROXY_PORT=0                           HAProxy's port on 127.0.0.1 (0: a free one)
#   FLEET_DIR=<dir>                        use (and keep) this directory; default: a temp dir,
#                                          removed at exit unless FLEET_KEEP=1
#   READY_TIMEOUT=30                       seconds to wait for the nodes and HAProxy
#
# SERVE_ARGS must not repeat --listen, --admin or --data-dir (the script sets them). Without a
# --config in SERVE_ARGS the nodes get contrib/haproxy/edgepool-node.toml (limits for nodes
# behind HAProxy); with your own config, carry those keys over.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TEMPLATE=$ROOT/contrib/haproxy/haproxy.cfg
NODE_TOML=$ROOT/contrib/haproxy/edgepool-node.toml
HACTL=$HERE/hactl.py

die() { echo "run-local.sh: error: $*" >&2; exit 1; }
note() { echo "run-local.sh: $*" >&2; }

usage() { sed -n '2,40p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 ]] || usage
[[ $1 == -h || $1 == --help ]] && usage
N=$1; shift
if ! [[ $N =~ ^[0-9]+$ ]] || ((N < 1 || N > 200)); then
    die "N must be a number of nodes, 1 to 200 (got '$N')"
fi
if [[ $# -gt 0 ]]; then
    [[ $1 == -- ]] || die "unexpected argument '$1': SERVE_ARGS go after --"
    shift
fi
SERVE_ARGS=("$@")
for a in "${SERVE_ARGS[@]}"; do
    case $a in
    --listen | --listen=* | --admin | --admin=* | --data-dir | --data-dir=*)
        die "SERVE_ARGS must not set $a: run-local.sh gives every node its own" ;;
    esac
done

EDGEPOOL_BIN=${EDGEPOOL_BIN:-$ROOT/target/release/edgepool}
BALANCE=${BALANCE:-consistent}
FLEET_CA=${FLEET_CA:-shared}
PROXY_PORT=${PROXY_PORT:-0}
READY_TIMEOUT=${READY_TIMEOUT:-30}
HASH_BALANCE_FACTOR=${HASH_BALANCE_FACTOR:-200}
case $BALANCE in consistent | roundrobin) ;; *) die "BALANCE=$BALANCE: consistent or roundrobin" ;; esac
case $FLEET_CA in shared | copy) ;; *) die "FLEET_CA=$FLEET_CA: shared or copy" ;; esac
if ! [[ $PROXY_PORT =~ ^[0-9]+$ ]] || ((PROXY_PORT > 65535)); then
    die "PROXY_PORT=$PROXY_PORT is not a port"
fi
[[ $READY_TIMEOUT =~ ^[0-9]+$ ]] || die "READY_TIMEOUT=$READY_TIMEOUT: whole seconds"
if ! [[ $HASH_BALANCE_FACTOR =~ ^[0-9]+$ ]] || ((HASH_BALANCE_FACTOR != 0 && HASH_BALANCE_FACTOR <= 100)); then
    die "HASH_BALANCE_FACTOR=$HASH_BALANCE_FACTOR: 0 (off) or a percentage above 100"
fi

find_bin() { # name -> path, or nothing
    local p
    if p=$(command -v "$1" 2>/dev/null); then echo "$p"; return; fi
    for p in "/usr/sbin/$1" "/usr/bin/$1" "/sbin/$1"; do
        if [[ -x $p ]]; then echo "$p"; return; fi
    done
}
HAPROXY_BIN=${HAPROXY_BIN:-$(find_bin haproxy)}
[[ -n $HAPROXY_BIN && -x $HAPROXY_BIN ]] ||
    die "haproxy not found: install it (Debian/Ubuntu: apt-get install -y haproxy; keep its packaged service stopped) or set HAPROXY_BIN"
[[ -x $EDGEPOOL_BIN ]] || die "$EDGEPOOL_BIN not found: build it (cargo build --release) or set EDGEPOOL_BIN"
command -v curl >/dev/null || die "curl is needed"
command -v python3 >/dev/null || die "python3 is needed (port picking, HAProxy runtime API)"
[[ -r $TEMPLATE ]] || die "$TEMPLATE not found"

# ---- state and cleanup ----------------------------------------------------------------------
KEEP=${FLEET_KEEP:-0}
if [[ -n ${FLEET_DIR:-} ]]; then
    mkdir -p "$FLEET_DIR"
    FLEET_DIR=$(cd "$FLEET_DIR" && pwd)
    KEEP=1
else
    FLEET_DIR=$(mktemp -d "${TMPDIR:-/tmp}/edgepool-fleet.XXXXXX")
fi
chmod 700 "$FLEET_DIR"
PIDS=() NAMES=()
HAPROXY_PID=""
cleanup() {
    local rc=$? i pid n
    trap - EXIT INT TERM HUP
    # HAProxy first (no new traffic), then the nodes (they finish in-flight work: 5 s).
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
    done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        for ((n = 0; n < 100; n++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            note "${NAMES[i]} (pid $pid) did not stop within 10 s of SIGTERM; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP == 1 ]]; then note "kept $FLEET_DIR"; else rm -rf "$FLEET_DIR"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---- addresses and ports --------------------------------------------------------------------
# Node k: 127.0.0.(10+k), a proxy port and an admin port; proxy ports are distinct across nodes
# (a shared data dir keys each node's report store by proxy port). Picked by binding port 0.
node_ip() { echo "127.0.0.$((10 + $1))"; }
IPS=()
for ((k = 1; k <= N; k++)); do IPS+=("$(node_ip "$k")"); done
read -r -a PORTS <<<"$(python3 - "$PROXY_PORT" "${IPS[@]}" <<'EOF'
import socket, sys
want_front, ips = int(sys.argv[1]), sys.argv[2:]
held, used = [], set()
def pick(ip):
    while True:
        s = socket.socket(); s.bind((ip, 0)); held.append(s)
        p = s.getsockname()[1]
        if p not in used:
            used.add(p); return p
out = [want_front or pick("127.0.0.1")]
used.add(out[0])
for ip in ips:
    out += [pick(ip), pick(ip)]
print(" ".join(map(str, out)))
EOF
)"
FRONT_PORT=${PORTS[0]}
PROXY_ADDRS=() ADMIN_ADDRS=()
for ((k = 1; k <= N; k++)); do
    PROXY_ADDRS+=("${IPS[k - 1]}:${PORTS[2 * k - 1]}")
    ADMIN_ADDRS+=("${IPS[k - 1]}:${PORTS[2 * k]}")
done

# ---- nodes ----------------------------------------------------------------------------------
has_config=0
for a in "${SERVE_ARGS[@]}"; do
    case $a in --config | --config=*) has_config=1 ;; esac
done
NODE_ARGS=()
if ((has_config == 0)); then NODE_ARGS+=(--config "$NODE_TOML"); fi

data_dir_of() { # k
    if [[ $FLEET_CA == shared ]]; then echo "$FLEET_DIR/data"; else echo "$FLEET_DIR/node$1/data"; fi
}
start_node() { # k
    local k=$1 dir=$FLEET_DIR/node$1
    mkdir -p "$dir"
    "$EDGEPOOL_BIN" serve "${NODE_ARGS[@]}" --listen "${PROXY_ADDRS[k - 1]}" \
        --admin "${ADMIN_ADDRS[k - 1]}" --data-dir "$(data_dir_of "$k")" "${SERVE_ARGS[@]}" \
        >"$dir/edgepool.log" 2>&1 &
    PIDS+=($!) NAMES+=("node$k")
    NODE_PIDS[k]=$!
}
wait_ready() { # k
    local k=$1 deadline=$((SECONDS + READY_TIMEOUT))
    until curl -sf -o /dev/null --max-time 2 "http://${ADMIN_ADDRS[k - 1]}/readyz"; do
        if ! kill -0 "${NODE_PIDS[k]}" 2>/dev/null; then
            tail -n 20 "$FLEET_DIR/node$k/edgepool.log" >&2 || true
            die "node$k exited during start (log above: $FLEET_DIR/node$k/edgepool.log)"
        fi
        ((SECONDS < deadline)) || die "node$k not ready on http://${ADMIN_ADDRS[k - 1]}/readyz within ${READY_TIMEOUT}s"
        sleep 0.1
    done
}
declare -a NODE_PIDS
note "starting $N node(s) ($FLEET_CA CA, $BALANCE) in $FLEET_DIR"
start_node 1
wait_ready 1
CA_FILE=$(data_dir_of 1)/ca.pem
[[ -s $CA_FILE ]] || die "node1 is ready but $CA_FILE is missing"
for ((k = 2; k <= N; k++)); do
    if [[ $FLEET_CA == copy ]]; then
        d=$(data_dir_of "$k")
        mkdir -p "$d" && chmod 700 "$d"
        cp "$(data_dir_of 1)/ca.pem" "$d/ca.pem"
        install -m 600 "$(data_dir_of 1)/ca-key.pem" "$d/ca-key.pem"
    fi
    start_node "$k"
done
for ((k = 2; k <= N; k++)); do wait_ready "$k"; done
# One CA: every node must serve the same certificate on /ca.pem.
for ((k = 1; k <= N; k++)); do
    curl -sf --max-time 5 "http://${ADMIN_ADDRS[k - 1]}/ca.pem" | cmp -s - "$CA_FILE" ||
        die "node$k's /ca.pem differs from $CA_FILE: the fleet would not share one CA"
done
: >"$FLEET_DIR/nodes.tsv"
for ((k = 1; k <= N; k++)); do
    printf 'node%s\t%s\t%s\t%s\t%s\n' "$k" "${PROXY_ADDRS[k - 1]}" "${ADMIN_ADDRS[k - 1]}" \
        "${NODE_PIDS[k]}" "$(data_dir_of "$k")" >>"$FLEET_DIR/nodes.tsv"
done

# ---- HAProxy --------------------------------------------------------------------------------
SOCK=$FLEET_DIR/haproxy.sock
CFG=$FLEET_DIR/haproxy.cfg
nofile=$(ulimit -Hn)
if [[ $nofile != unlimited ]]; then ulimit -n "$nofile" 2>/dev/null || true; fi
nofile=$(ulimit -n)
if [[ $nofile == unlimited ]]; then maxconn=20000; else maxconn=$(((nofile - 1000) / 2)); fi
((maxconn > 20000)) && maxconn=20000
((maxconn < 256)) && maxconn=256
if [[ $BALANCE == consistent ]]; then balance='balance hash var(txn.target)'; else balance='balance roundrobin'; fi
: >"$FLEET_DIR/servers.cfg"
: >"$FLEET_DIR/h2servers.cfg"
for ((k = 1; k <= N; k++)); do
    ip=${IPS[k - 1]} aport=${ADMIN_ADDRS[k - 1]##*:}
    echo "    server node$k ${PROXY_ADDRS[k - 1]} id $k addr $ip port $aport" >>"$FLEET_DIR/servers.cfg"
    echo "    server node$k ${PROXY_ADDRS[k - 1]} id $k proto h2 track edgepool_nodes/node$k" >>"$FLEET_DIR/h2servers.cfg"
done
awk -v bind="127.0.0.1:$FRONT_PORT" -v sock="$SOCK" -v maxconn="$maxconn" -v balance="$balance" \
    -v factor="$HASH_BALANCE_FACTOR" \
    -v servers="$FLEET_DIR/servers.cfg" -v h2servers="$FLEET_DIR/h2servers.cfg" '
    /# FLEET:bind/ { print "    bind " bind; next }
    /# FLEET:socket/ { print "    stats socket " sock " mode 600 level admin"; next }
    /# FLEET:maxconn/ { print "    maxconn " maxconn; next }
    /# FLEET:balance/ { print "    " balance; next }
    /# FLEET:factor/ { print "    hash-balance-factor " factor; next }
    /# FLEET:servers-begin/ { print; while ((getline l < servers) > 0) print l; skip = 1; next }
    /# FLEET:h2servers-begin/ { print; while ((getline l < h2servers) > 0) print l; skip = 1; next }
    /# FLEET:(h2)?servers-end/ { skip = 0; print; next }
    skip { next }
    { print }' "$TEMPLATE" >"$CFG"
for tag in bind socket maxconn balance factor servers-begin h2servers-begin; do
    grep -q "FLEET:$tag" "$TEMPLATE" || die "$TEMPLATE lost its 'FLEET:$tag' line; run-local.sh cannot render it"
done
"$HAPROXY_BIN" -c -q -f "$CFG" >"$FLEET_DIR/haproxy-check.log" 2>&1 ||
    { cat "$FLEET_DIR/haproxy-check.log" >&2; die "HAProxy refused $CFG"; }
"$HAPROXY_BIN" -db -f "$CFG" >"$FLEET_DIR/haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=("$HAPROXY_PID") NAMES+=(haproxy)
deadline=$((SECONDS + READY_TIMEOUT))
until [[ -S $SOCK ]]; do
    kill -0 "$HAPROXY_PID" 2>/dev/null || { tail -n 20 "$FLEET_DIR/haproxy.log" >&2; die "HAProxy exited during start"; }
    ((SECONDS < deadline)) || die "HAProxy's runtime socket $SOCK did not appear within ${READY_TIMEOUT}s"
    sleep 0.1
done
python3 "$HACTL" "$SOCK" wait-up edgepool_nodes "$N" "$READY_TIMEOUT" ||
    die "HAProxy does not see all $N nodes UP (log: $FLEET_DIR/haproxy.log)"

echo "$HAPROXY_PID" >"$FLEET_DIR/haproxy.pid"
note "ready: $N node(s) UP behind HAProxy on 127.0.0.1:$FRONT_PORT (logs in $FLEET_DIR)"
echo "FLEET_DIR=$FLEET_DIR"
echo "HAPROXY_SOCK=$SOCK"
echo "PROXY=http://127.0.0.1:$FRONT_PORT"
echo "CA=$CA_FILE"

# ---- run until told to stop -----------------------------------------------------------------
declare -A reported=()
while true; do
    kill -0 "$HAPROXY_PID" 2>/dev/null || { tail -n 20 "$FLEET_DIR/haproxy.log" >&2; die "HAProxy exited"; }
    for ((k = 1; k <= N; k++)); do
        if [[ -z ${reported[$k]:-} ]] && ! kill -0 "${NODE_PIDS[k]}" 2>/dev/null; then
            note "node$k (pid ${NODE_PIDS[k]}) has exited; HAProxy routes its targets to the others"
            reported[$k]=1
        fi
    done
    sleep 1 &
    wait $! || true
done
