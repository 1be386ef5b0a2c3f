#!/usr/bin/env bash
# The fleet's smoke test (CI): 2 edgepool nodes behind HAProxy (contrib/fleet/run-local.sh 2),
# real nginx origins on loopback, real curl. Checks:
#   a. absolute-form http:// through the proxy to 4 origins: 200, the right body, and each
#      target always on one node (X-Edgepool-Node, and the nodes' own /status rows)
#   b. https:// via CONNECT: 200, the right body, intercepted by edgepool (the leaf's issuer is
#      the fleet's one CA; both nodes serve the same /ca.pem), HTTP/2 inside the tunnel
#   c. worker tokens and sessions through HAProxy: the proxy username passes unchanged
#      (token-session-abc gets X-Edgepool-Session: abc; no or a wrong token gets edgepool's 407)
#   d. POST /v1/fetch routed by the target in its JSON body (the same node as (a))
#   e. cleartext HTTP/2 streams routed per stream by their :authority (Python h2)
#   f. both nodes' /readyz 200; a node drained through HAProxy's runtime API gives its targets
#      to the other node and gets them back; a node sent SIGTERM (graceful shutdown: its
#      listeners close, /readyz no longer answers 200) is taken out by HAProxy while requests
#      and CONNECTs keep succeeding on the other node
# Exits non-zero with a message naming the failed check. Bounded: 170 s for everything.
# Tools: haproxy, nginx, curl, openssl, python3 (+ h2). Without them it skips with a
# `SKIPPED:` line — except under CI=true, where a missing tool is a failure.
#
#   contrib/fleet/smoke.sh                          # EDGEPOOL_BIN=target/release/edgepool
#   EDGEPOOL_BIN=target/debug/edgepool contrib/fleet/smoke.sh
set -euo pipefail

if [[ -z ${EDGEPOOL_SMOKE_INNER:-} ]]; then
    EDGEPOOL_SMOKE_INNER=1 exec timeout --kill-after=60 170 bash "${BASH_SOURCE[0]}" "$@"
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export EDGEPOOL_BIN=${EDGEPOOL_BIN:-$ROOT/target/release/edgepool}
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "smoke: $*" >&2; }
TMP="" FLEET_PID="" NGINX_PID=""
fail() {
    echo "smoke: FAILED: $*" >&2
    if [[ -n $TMP && -d $TMP/fleet ]]; then
        local f
        for f in "$TMP"/fleet/haproxy.log "$TMP"/fleet/node*/edgepool.log "$TMP/run-local.err"; do
            [[ -s $f ]] || continue
            echo "--- last lines of $f" >&2
            tail -n 15 "$f" >&2
        done
    fi
    exit 1
}
skip_or_fail() {
    if [[ ${CI:-} == true ]]; then fail "$* (CI=true: a missing tool is a failure)"; fi
    echo "SKIPPED: contrib/fleet/smoke.sh: $*"
    exit 0
}

for t in haproxy nginx curl openssl python3; do
    command -v "$t" >/dev/null 2>&1 || skip_or_fail "$t is not installed (Debian: apt-get install -y haproxy nginx curl openssl python3)"
done
python3 -c 'import h2' 2>/dev/null || skip_or_fail "the Python h2 package is missing (pip install h2)"
[[ -x $EDGEPOOL_BIN ]] || fail "$EDGEPOOL_BIN not found: build it or set EDGEPOOL_BIN"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/edgepool-smoke.XXXXXX")
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM HUP
    if [[ -n $FLEET_PID ]]; then
        kill -TERM "$FLEET_PID" 2>/dev/null || true
        for ((i = 0; i < 300; i++)); do kill -0 "$FLEET_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$FLEET_PID" 2>/dev/null || true
        wait "$FLEET_PID" 2>/dev/null || true
    fi
    if [[ -n $NGINX_PID ]]; then
        kill -TERM "$NGINX_PID" 2>/dev/null || true
        wait "$NGINX_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---- origins: nginx, 4 plain HTTP servers and 1 TLS server, on 127.0.0.1 ---------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$TMP/origin-ca.key" -out "$TMP/origin-ca.pem" -subj "/CN=edgepool smoke origin CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign >/dev/null 2>&1 ||
    fail "openssl could not make the origin CA"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$TMP/origin.key" \
    -out "$TMP/origin.csr" -subj "/CN=localhost" >/dev/null 2>&1 || fail "openssl could not make a CSR"
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$TMP/leaf.ext"
openssl x509 -req -in "$TMP/origin.csr" -CA "$TMP/origin-ca.pem" -CAkey "$TMP/origin-ca.key" \
    -CAcreateserial -days 2 -extfile "$TMP/leaf.ext" -out "$TMP/origin.pem" >/dev/null 2>&1 ||
    fail "openssl could not sign the origin certificate"

read -r -a PORTS <<<"$(python3 -c '
import socket
held = [socket.socket() for _ in range(5)]
for s in held: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))')"
PLAIN=("${PORTS[@]:0:4}") TLS_PORT=${PORTS[4]}
mkdir -p "$TMP/nginx/tmp"
{
    cat <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $TMP/nginx/nginx.pid;
lock_file $TMP/nginx/nginx.lock;
error_log $TMP/nginx/error.log warn;
events { worker_connections 256; }
http {
    default_type text/plain;
    access_log off;
    client_body_temp_path $TMP/nginx/tmp/client_body;
    proxy_temp_path $TMP/nginx/tmp/proxy;
    fastcgi_temp_path $TMP/nginx/tmp/fastcgi;
    uwsgi_temp_path $TMP/nginx/tmp/uwsgi;
    scgi_temp_path $TMP/nginx/tmp/scgi;
    server {
        listen 127.0.0.1:$TLS_PORT ssl http2;
        server_name localhost;
        ssl_certificate $TMP/origin.pem;
        ssl_certificate_key $TMP/origin.key;
        location / { return 200 "tls-origin\n"; }
    }
EOF
    for i in 0 1 2 3; do
        printf '    server { listen 127.0.0.1:%s; location / { return 200 "origin-%s\\n"; } }\n' "${PLAIN[i]}" "$i"
    done
    echo "}"
} >"$TMP/nginx/nginx.conf"
nginx -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" >"$TMP/nginx/stdout.log" 2>&1 &
NGINX_PID=$!
for ((i = 0; i < 100; i++)); do
    curl -s -o /dev/null "http://127.0.0.1:${PLAIN[3]}/" && break
    kill -0 "$NGINX_PID" 2>/dev/null || fail "nginx exited: $(cat "$TMP/nginx/error.log" "$TMP/nginx/stdout.log")"
    sleep 0.1
done
curl -s -o /dev/null "http://127.0.0.1:${PLAIN[3]}/" || fail "nginx not listening after 10 s"

# ---- the fleet: 2 nodes behind HAProxy --------------------------------------------------------
TOKEN=smoketok
FLEET_DIR=$TMP/fleet "$HERE/run-local.sh" 2 -- --allow-target 127.0.0.0/8 --allow-target ::1/128 --upstream-ca "$TMP/origin-ca.pem" \
    --allow-connect-port "$TLS_PORT" --token "$TOKEN" >"$TMP/run-local.out" 2>"$TMP/run-local.err" &
FLEET_PID=$!
for ((i = 0; i < 600; i++)); do
    grep -qs '^CA=' "$TMP/run-local.out" && break
    kill -0 "$FLEET_PID" 2>/dev/null || fail "run-local.sh 2 exited: $(cat "$TMP/run-local.err")"
    sleep 0.1
done
grep -qs '^CA=' "$TMP/run-local.out" || fail "run-local.sh 2 not ready within 60 s"
PROXY=$(sed -n 's/^PROXY=//p' "$TMP/run-local.out")
CA=$(sed -n 's/^CA=//p' "$TMP/run-local.out")
SOCK=$(sed -n 's/^HAPROXY_SOCK=//p' "$TMP/run-local.out")
declare -A ADMIN PID
while IFS=$'\t' read -r name _ admin pid _; do ADMIN[$name]=$admin PID[$name]=$pid; done <"$TMP/fleet/nodes.tsv"
HACTL=(python3 "$HERE/hactl.py" "$SOCK")
say "fleet up: $PROXY, CA $CA, nodes ${!ADMIN[*]}"
AUTH="$TOKEN:x"

# get URL [curl args...] -> "<status> <node>" with the body in $TMP/body
get() {
    local url=$1
    shift
    curl -s --max-time 15 -x "$PROXY" -o "$TMP/body" -D "$TMP/headers" \
        -w '%{http_code} %header{x-edgepool-node}' "$@" "$url" || true
}

# ---- a. absolute-form http:// ------------------------------------------------------------------
declare -A NODE_OF
for i in 0 1 2 3; do
    p=${PLAIN[i]}
    for path in / /a/b "/c?d=e"; do
        read -r code node <<<"$(get "http://127.0.0.1:$p$path" -U "$AUTH")"
        [[ $code == 200 ]] || fail "(a) GET http://127.0.0.1:$p$path through $PROXY: status $code"
        [[ $(cat "$TMP/body") == "origin-$i" ]] || fail "(a) http://127.0.0.1:$p$path: wrong body '$(cat "$TMP/body")'"
        [[ -n $node ]] || fail "(a) http://127.0.0.1:$p$path: no X-Edgepool-Node header (is this HAProxy?)"
        if [[ -z ${NODE_OF[$p]:-} ]]; then NODE_OF[$p]=$node; fi
        [[ $node == "${NODE_OF[$p]}" ]] || fail "(a) target 127.0.0.1:$p served by ${NODE_OF[$p]} and then by $node"
    done
done
# Each node's own accounting agrees: a target's row is on its node only.
for i in 0 1 2 3; do
    p=${PLAIN[i]}
    for n in "${!ADMIN[@]}"; do
        reqs=$(curl -s --max-time 5 "http://${ADMIN[$n]}/status" | python3 -c '
import json, sys
rows = [t for t in json.load(sys.stdin)["targets"] if t["target"] == sys.argv[1]]
print(rows[0]["requests"] if rows else 0)' "127.0.0.1:$p")
        if [[ $n == "${NODE_OF[$p]}" ]]; then
            [[ $reqs == 3 ]] || fail "(a) $n's /status counts $reqs requests for 127.0.0.1:$p, expected 3"
        else
            [[ $reqs == 0 ]] || fail "(a) $n's /status counts $reqs requests for 127.0.0.1:$p, which HAProxy routes to ${NODE_OF[$p]}"
        fi
    done
done
say "ok (a) absolute-form: 4 targets x 3 requests, each target on one node: $(for p in "${PLAIN[@]}"; do printf '%s->%s ' "$p" "${NODE_OF[$p]}"; done)"

# ---- b. https:// via CONNECT, intercepted ------------------------------------------------------
ca_id=$(openssl x509 -in "$CA" -noout -subject | sed -n 's/.*edgepool interception CA \([0-9a-f]*\).*/\1/p')
[[ -n $ca_id ]] || fail "(b) $CA is not an edgepool CA: $(openssl x509 -in "$CA" -noout -subject)"
for n in "${!ADMIN[@]}"; do
    curl -s --max-time 5 "http://${ADMIN[$n]}/ca.pem" | cmp -s - "$CA" || fail "(b) $n's /ca.pem is not $CA: the fleet has more than one CA"
done
tls_node=""
for r in 1 2 3; do
    out=$(curl -sv --max-time 15 -x "$PROXY" -U "$AUTH" --cacert "$CA" -o "$TMP/body" -D "$TMP/headers" \
        -w 'RESULT %{http_code} %{http_version}\n' "https://localhost:$TLS_PORT/r$r" 2>&1) || true
    read -r _ code ver <<<"$(grep '^RESULT' <<<"$out")"
    [[ $code == 200 ]] || fail "(b) GET https://localhost:$TLS_PORT/r$r via CONNECT: status '$code'
$(grep -E '^[<>*] ' <<<"$out" | tail -n 20)"
    [[ $(cat "$TMP/body") == tls-origin ]] || fail "(b) https: wrong body '$(cat "$TMP/body")'"
    grep -q "issuer: CN=edgepool interception CA $ca_id" <<<"$out" ||
        fail "(b) the certificate the worker saw was not issued by the fleet CA ($ca_id): $(grep 'issuer:' <<<"$out")"
    [[ $ver == 2 ]] || fail "(b) expected HTTP/2 inside the tunnel (edgepool's ALPN), got HTTP/$ver"
    node=$(tr -d '\r' <"$TMP/headers" | sed -n 's/^x-edgepool-node: //Ip' | head -n 1)
    [[ -n $node ]] || fail "(b) the CONNECT response carried no X-Edgepool-Node"
    [[ -z $tls_node || $node == "$tls_node" ]] || fail "(b) CONNECT localhost:$TLS_PORT went to $tls_node, then to $node"
    tls_node=$node
done
say "ok (b) CONNECT localhost:$TLS_PORT: intercepted with the fleet CA ($ca_id), HTTP/2 inside, 3 tunnels on $tls_node"

# ---- c. tokens and sessions pass through HAProxy ----------------------------------------------
p=${PLAIN[0]}
read -r code node <<<"$(get "http://127.0.0.1:$p/s" -U "$TOKEN-session-abc:x")"
[[ $code == 200 ]] || fail "(c) a session request ($TOKEN-session-abc) got $code"
session=$(tr -d '\r' <"$TMP/headers" | sed -n 's/^x-edgepool-session: //Ip')
[[ $session == abc ]] || fail "(c) expected X-Edgepool-Session: abc, got '$session' (did HAProxy change Proxy-Authorization?)"
[[ $node == "${NODE_OF[$p]}" ]] || fail "(c) the session request went to $node, not the target's node ${NODE_OF[$p]}"
read -r code _ <<<"$(get "http://127.0.0.1:$p/s")"
[[ $code == 407 ]] || fail "(c) no proxy credentials: expected edgepool's 407, got $code"
grep -qi '^x-edgepool-error: proxy_auth_required' "$TMP/headers" || fail "(c) the 407 is not edgepool's proxy_auth_required"
read -r code _ <<<"$(get "http://127.0.0.1:$p/s" -U "wrongtok-session-abc:x")"
[[ $code == 407 ]] || fail "(c) a wrong token: expected 407, got $code"
out=$(curl -s --max-time 15 -x "$PROXY" -U "$TOKEN-session-abc:x" --cacert "$CA" -o /dev/null -w '%{http_code}' \
    "https://localhost:$TLS_PORT/s" 2>&1) || true
[[ $out == 200 ]] || fail "(c) CONNECT with a session username: got '$out'"
say "ok (c) token-session-abc passes through (X-Edgepool-Session: abc, http and CONNECT); no/wrong token: edgepool's 407"

# ---- d. /v1/fetch routed by its JSON body -----------------------------------------------------
basic=$(printf '%s' "$AUTH" | base64)
for i in 0 1 2 3; do
    p=${PLAIN[i]}
    res=$(curl -s --max-time 15 -o "$TMP/body" -D "$TMP/headers" -w '%{http_code} %header{x-edgepool-node}' \
        -H "Proxy-Authorization: Basic $basic" -H 'Content-Type: application/json' \
        -d "{\"url\":\"http://127.0.0.1:$p/fetched\",\"method\":\"GET\"}" "$PROXY/v1/fetch") || true
    read -r code node <<<"$res"
    [[ $code == 200 ]] || fail "(d) POST $PROXY/v1/fetch for 127.0.0.1:$p: status $code: $(cat "$TMP/body")"
    body=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["status"], d["body"].strip())' "$TMP/body")
    [[ $body == "200 origin-$i" ]] || fail "(d) fetch of 127.0.0.1:$p returned '$body'"
    [[ $node == "${NODE_OF[$p]}" ]] || fail "(d) the fetch for 127.0.0.1:$p went to $node; its CONNECT/http requests go to ${NODE_OF[$p]}"
done
say "ok (d) /v1/fetch: routed by the JSON body's url to the target's node"

# ---- e. cleartext HTTP/2 streams, each routed by its :authority --------------------------------
host=${PROXY#http://}
urls=()
for p in "${PLAIN[@]}"; do urls+=("http://127.0.0.1:$p/h2"); done
out=$(python3 "$HERE/h2c_probe.py" "${host%:*}" "${host##*:}" "Basic $basic" "${urls[@]}") ||
    fail "(e) h2c probe failed: $out"
for i in 0 1 2 3; do
    p=${PLAIN[i]}
    read -r _ code node len _ <<<"$(grep "^http://127.0.0.1:$p/h2 " <<<"$out")"
    [[ $code == 200 && $len == 9 ]] || fail "(e) h2c stream to 127.0.0.1:$p: status $code, $len bytes"
    [[ $node == "${NODE_OF[$p]}" ]] || fail "(e) h2c stream to 127.0.0.1:$p went to $node, not ${NODE_OF[$p]}"
done
say "ok (e) HTTP/2 (h2c) streams on one connection, each on its target's node"

# ---- f. health, drain, SIGTERM -----------------------------------------------------------------
for n in "${!ADMIN[@]}"; do
    code=$(curl -s -o /dev/null --max-time 5 -w '%{http_code}' "http://${ADMIN[$n]}/readyz") || true
    [[ $code == 200 ]] || fail "(f) $n /readyz: $code"
done
p=${PLAIN[1]} home=${NODE_OF[${PLAIN[1]}]}
other=node1
[[ $home == node1 ]] && other=node2
"${HACTL[@]}" set-state edgepool_nodes "$home" drain || fail "(f) could not drain $home"
read -r code node <<<"$(get "http://127.0.0.1:$p/drained" -U "$AUTH")"
[[ $code == 200 && $node == "$other" ]] || fail "(f) with $home draining, 127.0.0.1:$p should go to $other: got $code from $node"
"${HACTL[@]}" set-state edgepool_nodes "$home" ready || fail "(f) could not put $home back"
"${HACTL[@]}" wait-up edgepool_nodes 2 10 || fail "(f) $home not UP again after drain"
read -r code node <<<"$(get "http://127.0.0.1:$p/back" -U "$AUTH")"
[[ $code == 200 && $node == "$home" ]] || fail "(f) after the drain 127.0.0.1:$p should be back on $home: got $code from $node"
say "ok (f) both /readyz 200; $home drained (runtime API): its target went to $other, and came back"

kill -TERM "${PID[$home]}"
# edgepool sets /readyz to 503 when shutdown starts, but closes its admin listener in the same
# step (src/gateway.rs, Gateway::serve), so a checker sees the connection refused, not the 503;
# HAProxy takes the node out either way (failed checks, refused connections).
readyz=$(curl -s -o /dev/null --max-time 2 -w '%{http_code}' "http://${ADMIN[$home]}/readyz") || true
[[ $readyz == 000 ]] && readyz="connection refused"
ok=0 served_by_other=0
deadline=$((SECONDS + 8))
while ((SECONDS < deadline)); do
    read -r code node <<<"$(get "http://127.0.0.1:$p/during" -U "$AUTH")"
    [[ $code == 200 ]] || fail "(f) after SIGTERM to $home, a request for 127.0.0.1:$p got $code from '$node'"
    ok=$((ok + 1))
    [[ $node == "$other" ]] && served_by_other=$((served_by_other + 1))
    code=$(curl -s --max-time 15 -x "$PROXY" -U "$AUTH" --cacert "$CA" -o /dev/null -w '%{http_code}' \
        "https://localhost:$TLS_PORT/during") || true
    [[ $code == 200 ]] || fail "(f) after SIGTERM to $home, a CONNECT request got '$code'"
    sleep 0.2
done
state=$("${HACTL[@]}" states edgepool_nodes | awk -v n="$home" '$1 == n { print $2 }')
[[ $state == DOWN* || $state == MAINT* ]] || fail "(f) HAProxy still has $home as '$state' 8 s after its SIGTERM"
[[ $node == "$other" ]] || fail "(f) 8 s after SIGTERM to $home its target is still served by $node"
say "ok (f) SIGTERM to $home (its /readyz right after: ${readyz:-none}): $ok requests + $ok CONNECTs all 200, $served_by_other on $other; HAProxy: $home $state"
say "all checks passed"
