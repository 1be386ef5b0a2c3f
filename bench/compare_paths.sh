#!/usr/bin/env bash
# The paths users run, side by side (issue 14 item 2): edgepool against the peers that do the
# same job, same load, same machine, same run, loopback only.
#
#   cargo build --release && cargo build --release --example connect_load
#   SUITE=paths bench/compare.sh                 # (the entry point; runs this file)
#   DURATION=5s SECTIONS="intercept newconn" SUITE=paths bench/compare.sh
#
# Sections (SECTIONS, all by default, in this order):
#   names      plain HTTP to a host NAME (http://origin.test:P/), resolved through each proxy's
#              real resolver path: a DNS server started here on loopback answers origin.test
#              with BIND, TTL DNS_TTL. wrk + bench/absolute.lua. Peers: edgepool (dns_servers),
#              squid (dns_nameservers), nginx as a forward proxy (resolver + proxy_pass
#              http://$http_host: it dials per request; nginx only pools through a fixed
#              upstream block, which cannot name a host resolved at run time).
#   intercept  HTTPS through CONNECT with the proxy terminating TLS with its own CA (what a
#              worker with an https:// URL and a proxy setting does): CONNECTIONS keep-alive
#              HTTP/1.1 connections, each CONNECT + TLS once, then requests back to back.
#              Load: examples/connect_load.rs (wrk and h2load cannot CONNECT). Peers: edgepool,
#              squid with ssl-bump (peek at step 1, bump), mitmproxy (mitmdump).
#   h2         the same with HTTP/2 between worker and proxy (ALPN h2 inside the tunnel):
#              H2_CONNECTIONS connections x H2_STREAMS requests in flight on each. Peers:
#              edgepool, mitmproxy; squid has no HTTP/2 towards clients. Baselines: h2load and
#              connect_load --h2 straight to the origin.
#   newconn    new worker TLS connections: NEWCONN_CONNECTIONS workers each opening a new
#              connection (TCP + CONNECT + TLS) for every request, without and with TLS session
#              resumption (tickets kept by the client and offered on the next connection).
#              Reports connections/s, the resumed fraction, proxy CPU per new connection and
#              new connections per proxy core-second.
#
# Environment (all optional):
#   DURATION=10s          length of every timed run
#   CONNECTIONS=32        names: wrk -c; intercept: connections
#   H2_CONNECTIONS=4      h2: connections ...
#   H2_STREAMS=8          ... and requests in flight on each (32 in all, like CONNECTIONS)
#   NEWCONN_CONNECTIONS=16  newconn: workers connecting at once
#   DNS_TTL=1             TTL (s) of the DNS answers for origin.test: short, so every proxy's
#                         DNS cache has to refresh during a run
#   PAUSE=2               seconds between runs
#   BIND=127.0.0.1        every listener and every request; must be in 127.0.0.0/8
#   EDGEPOOL_BIN=target/release/edgepool
#   CONNECT_LOAD_BIN=target/release/examples/connect_load
#   MITMDUMP=             mitmdump to use; default: on PATH, else a venv under
#                         ${XDG_CACHE_HOME:-~/.cache}/edgepool-bench/ (pip install mitmproxy)
#   PERF=1                perf record (software clock, 999 Hz) edgepool during each of its runs;
#                         prints its CPU by object and top symbols
#   PERF_CALLGRAPH=dwarf  with PERF=1: record call graphs too (perf --call-graph), and print
#                         inclusive shares
#   PERF_STAT=1           perf stat every proxy (its whole process tree) during its runs:
#                         syscalls, context switches and task-clock per request
#   KEEP_TMP=1            keep the temp dir (configs, certificates, logs)
#
# Every process is started here and stopped by pid on exit. Before any timing, each proxy must
# answer one request with the expected body (curl for plain HTTP, connect_load --check for
# CONNECT); any error or non-2xx in a run fails the script (exit 1) after the tables.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PROG=compare_paths.sh
BIND=${BIND:-127.0.0.1}
# shellcheck source=bench/compare_common.sh
source "$HERE/compare_common.sh"

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
H2_CONNECTIONS=${H2_CONNECTIONS:-4}
H2_STREAMS=${H2_STREAMS:-8}
NEWCONN_CONNECTIONS=${NEWCONN_CONNECTIONS:-16}
DNS_TTL=${DNS_TTL:-1}
PAUSE=${PAUSE:-2}
PERF=${PERF:-0}
KEEP_TMP=${KEEP_TMP:-0}
SECTIONS=${SECTIONS:-names intercept h2 newconn}
EDGEPOOL_BIN=${EDGEPOOL_BIN:-$ROOT/target/release/edgepool}
CONNECT_LOAD_BIN=${CONNECT_LOAD_BIN:-$ROOT/target/release/examples/connect_load}
LUA=$HERE/absolute.lua
ORIGIN_NAME=origin.test

# ---- arguments ------------------------------------------------------------------------------
is_loopback_v4 "$BIND" || die "BIND=$BIND is not a 127.0.0.0/8 address; this benchmark runs on loopback only"
for v in CONNECTIONS H2_CONNECTIONS H2_STREAMS NEWCONN_CONNECTIONS DNS_TTL PAUSE; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v=${!v}: want a whole number"
done
((CONNECTIONS >= 1 && H2_CONNECTIONS >= 1 && H2_STREAMS >= 1 && NEWCONN_CONNECTIONS >= 1)) ||
    die "connection counts must be at least 1"
[[ $DURATION =~ ^([0-9]+)s$ ]] || die "DURATION=$DURATION: whole seconds, e.g. 10s"
DUR_S=${BASH_REMATCH[1]}
((DUR_S >= 1 && DUR_S <= 600)) || die "DURATION=$DURATION: 1s to 600s"
for s in $SECTIONS; do
    case $s in names | intercept | h2 | newconn) ;; *) die "SECTIONS: unknown section '$s' (names intercept h2 newconn)" ;; esac
done
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

# ---- tools ----------------------------------------------------------------------------------
SQUID=$(find_bin squid)
CERTGEN=""
for p in /usr/lib/squid/security_file_certgen /usr/libexec/squid/security_file_certgen /usr/lib64/squid/security_file_certgen; do
    [[ -x $p ]] && { CERTGEN=$p; break; }
done
pkgs=()
# ssl-bump needs a squid built with OpenSSL (Debian: squid-openssl; plain `squid` is GnuTLS)
if [[ -z $SQUID || -z $CERTGEN ]] || ! "$SQUID" -v 2>/dev/null | grep -q -- '--with-openssl'; then pkgs+=(squid-openssl); fi
[[ -n $(find_bin nginx) ]] || pkgs+=(nginx)
[[ -n $(find_bin wrk) ]] || pkgs+=(wrk)
[[ -n $(find_bin h2load) ]] || pkgs+=(nghttp2-client)
[[ -n $(find_bin openssl) ]] || pkgs+=(openssl)
[[ -n $(find_bin curl) ]] || pkgs+=(curl)
command -v python3 >/dev/null || pkgs+=(python3 python3-venv)
if ((${#pkgs[@]})); then apt_install "${pkgs[@]}"; fi
SQUID=$(find_bin squid); NGINX=$(find_bin nginx); WRK=$(find_bin wrk); H2LOAD=$(find_bin h2load)
for p in /usr/lib/squid/security_file_certgen /usr/libexec/squid/security_file_certgen /usr/lib64/squid/security_file_certgen; do
    [[ -x $p ]] && { CERTGEN=$p; break; }
done
[[ -n $CERTGEN ]] || die "squid's security_file_certgen not found (Debian: apt-get install squid-openssl)"
"$SQUID" -v | grep -q -- '--with-openssl' || die "$SQUID is not built with OpenSSL (no ssl-bump); Debian: apt-get install squid-openssl"

MITMDUMP=${MITMDUMP:-$(command -v mitmdump 2>/dev/null || true)}
if [[ -z $MITMDUMP ]] && (want intercept || want h2 || want newconn); then
    venv=${XDG_CACHE_HOME:-$HOME/.cache}/edgepool-bench/mitmproxy-venv
    if [[ ! -x $venv/bin/mitmdump ]]; then
        note "installing mitmproxy into $venv (python3 -m venv; pip install mitmproxy)"
        python3 -m venv "$venv" >&2 || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
        "$venv/bin/pip" install -q mitmproxy >&2 || die "pip install mitmproxy failed"
    fi
    MITMDUMP=$venv/bin/mitmdump
fi
[[ -x $EDGEPOOL_BIN ]] || die "$EDGEPOOL_BIN not found: build it first (cargo build --release) or set EDGEPOOL_BIN"
[[ -x $CONNECT_LOAD_BIN ]] || die "$CONNECT_LOAD_BIN not found: build it first (cargo build --release --example connect_load) or set CONNECT_LOAD_BIN"
[[ -r $LUA ]] || die "$LUA not found"
PERF_STAT=${PERF_STAT:-0}
if [[ $PERF == 1 || $PERF_STAT == 1 ]]; then command -v perf >/dev/null || die "PERF=1 or PERF_STAT=1 but perf is not installed"; fi

# ---- temp dir, ports ------------------------------------------------------------------------
setup_tmp edgepool-paths
pick_port P_EDGE; pick_port P_ADMIN; pick_port P_SQUID; pick_port P_NGINX; pick_port P_MITM
pick_port P_ORIGIN; pick_port P_TLS
ORIGIN=$BIND:$P_ORIGIN      # plain HTTP origin
TLS_ADDR=$BIND:$P_TLS       # TLS origin (h2 and http/1.1) ...
TLS_TARGET=$ORIGIN_NAME:$P_TLS  # ... by the name workers CONNECT to
mkdir -p "$TMP/origin" "$TMP/nginx" "$TMP/squid" "$TMP/ep" "$TMP/mitm" "$TMP/pki"

# ---- DNS server -----------------------------------------------------------------------------
# A few lines of UDP: origin.test -> BIND (A, TTL DNS_TTL), no AAAA (NODATA), anything else
# NXDOMAIN; counts the queries it answers. squid only asks port 53, so as root the server gets
# port 53 on an address of its own in 127.0.0.0/8; without root it takes a free port and squid
# reads the name from a hosts file instead (said in the output).
cat >"$TMP/dns.py" <<'PY'
import socket, struct, sys
addr, port, ready, count, ttl = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
names = {}
for a in sys.argv[6:]:
    n, ip = a.split("=")
    names[n.lower().rstrip(".")] = socket.inet_aton(ip)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.bind((addr, port))
except OSError as e:
    print(f"bind {addr}:{port}: {e}", file=sys.stderr)
    sys.exit(3)
open(ready, "w").write("ok\n")
n = 0
while True:
    data, peer = s.recvfrom(4096)
    if len(data) < 12:
        continue
    tid, flags, qd = struct.unpack(">HHH", data[:6])
    i, labels = 12, []
    try:
        while data[i]:
            labels.append(data[i + 1 : i + 1 + data[i]].decode("ascii", "replace"))
            i += 1 + data[i]
        qtype, qclass = struct.unpack(">HH", data[i + 1 : i + 5])
    except (IndexError, struct.error):
        continue
    question = data[12 : i + 5]
    name = ".".join(labels).lower()
    rflags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080  # QR AA RD(copied) RA
    answers = b""
    an = 0
    if qd != 1:
        rflags |= 1  # FORMERR
    elif name in names:
        if qtype == 1 and qclass == 1:
            answers = struct.pack(">HHHIH", 0xC00C, 1, 1, ttl, 4) + names[name]
            an = 1
    else:
        rflags |= 3  # NXDOMAIN
    s.sendto(struct.pack(">HHHHHH", tid, rflags, 1 if qd == 1 else 0, an, 0, 0) + (question if qd == 1 else b"") + answers, peer)
    n += 1
    with open(count, "w") as f:
        f.write(f"{n}\n")
PY
echo 0 >"$TMP/dns.count"
start_dns() { # addr port -> 0 when it bound
    rm -f "$TMP/dns.ready"
    start dns "$TMP/dns.log" python3 "$TMP/dns.py" "$1" "$2" "$TMP/dns.ready" "$TMP/dns.count" "$DNS_TTL" "$ORIGIN_NAME=$BIND"
    local i pid
    pid=$(pid_of dns)
    for ((i = 0; i < 50; i++)); do
        [[ -e $TMP/dns.ready ]] && return 0
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; PIDS=("${PIDS[@]:0:${#PIDS[@]}-1}"); NAMES=("${NAMES[@]:0:${#NAMES[@]}-1}"); return 1; }
        sleep 0.1
    done
    die "the DNS server did not start (see $TMP/dns.log)"
}
SQUID_DNS=""
if [[ $(id -u) == 0 ]]; then
    for ((try = 0; try < 20; try++)); do
        DNS_ADDR=127.$((RANDOM % 200 + 20)).$((RANDOM % 250 + 1)).$((RANDOM % 250 + 1))
        DNS_PORT=53
        start_dns "$DNS_ADDR" 53 && break
        DNS_ADDR=""
    done
    [[ -n $DNS_ADDR ]] || die "no free loopback address for the DNS server on port 53"
    SQUID_DNS="dns_nameservers $DNS_ADDR"
    SQUID_DNS_NOTE="squid: dns_nameservers $DNS_ADDR (its internal DNS client, port 53)"
else
    DNS_ADDR=$BIND
    pick_port DNS_PORT
    start_dns "$DNS_ADDR" "$DNS_PORT" || die "the DNS server could not bind $DNS_ADDR:$DNS_PORT"
    printf '%s %s\n' "$BIND" "$ORIGIN_NAME" >"$TMP/squid/hosts"
    SQUID_DNS="hosts_file $TMP/squid/hosts"
    SQUID_DNS_NOTE="squid: hosts_file (not root: squid's DNS client only asks port 53)"
fi
dns_count() { cat "$TMP/dns.count" 2>/dev/null || echo 0; }

# ---- certificates ---------------------------------------------------------------------------
# origin: a throwaway CA and a leaf for origin.test and BIND (ECDSA P-256), trusted by every
# proxy towards the origin (none skips verification). squid's CA: ECDSA P-256 too (squid signs
# its generated leaves with the CA's key pair, so its key type is the leaves' key type; the same
# type as edgepool's leaves). mitmproxy makes its own CA on first start (RSA 2048, its default,
# also the key of all its leaves).
PKI=$TMP/pki
ossl() { openssl "$@" >>"$PKI/openssl.log" 2>&1 || { cat "$PKI/openssl.log" >&2; die "openssl $1 failed"; }; }
ossl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 2 \
    -subj "/CN=edgepool bench origin CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout "$PKI/origin-ca.key" -out "$PKI/origin-ca.pem"
ossl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$ORIGIN_NAME" \
    -keyout "$PKI/origin.key" -out "$PKI/origin.csr"
printf 'subjectAltName=DNS:%s,IP:%s\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "$ORIGIN_NAME" "$BIND" >"$PKI/origin.ext"
ossl x509 -req -in "$PKI/origin.csr" -CA "$PKI/origin-ca.pem" -CAkey "$PKI/origin-ca.key" -CAcreateserial \
    -days 2 -sha256 -extfile "$PKI/origin.ext" -out "$PKI/origin.pem"
ossl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 2 \
    -subj "/CN=edgepool bench squid CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout "$TMP/squid/ca.key" -out "$TMP/squid/ca.pem"
chmod 644 "$PKI"/*.pem "$PKI"/*.key

# ---- configs --------------------------------------------------------------------------------
{
    nginx_common "$TMP/origin"
    echo "http {"
    # no request limit per connection within a bounded run: at 100,000 (the plain suite's) an
    # HTTP/2 connection is closed with GOAWAY mid-run and h2load does not reconnect
    nginx_http_common "$TMP/origin" 100000000
    cat <<EOF
    server {
        listen $BIND:$P_ORIGIN;
        location / { default_type text/plain; return 200 "hello"; }
    }
    server {
        listen $BIND:$P_TLS ssl http2;
        ssl_certificate $PKI/origin.pem;
        ssl_certificate_key $PKI/origin.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:ORIGIN:10m;
        ssl_session_tickets on;
        location / { default_type text/plain; return 200 "hello"; }
    }
}
EOF
} >"$TMP/origin/nginx.conf"

# nginx as a forward proxy for names: resolver + proxy_pass with variables (a new upstream
# connection per request: without an upstream block nginx keeps none).
{
    nginx_common "$TMP/nginx"
    echo "http {"
    nginx_http_common "$TMP/nginx"
    cat <<EOF
    resolver $DNS_ADDR:$DNS_PORT ipv6=off;
    server {
        listen $BIND:$P_NGINX;
        location / {
            proxy_pass http://\$http_host\$request_uri;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
        }
    }
}
EOF
} >"$TMP/nginx/nginx.conf"

cat >"$TMP/edgepool.toml" <<EOF
[upstream]
dns_servers = ["$DNS_ADDR:$DNS_PORT"]
extra_ca_files = ["$PKI/origin-ca.pem"]

[targets]
allow = ["127.0.0.0/8"]
connect_ports = [443, 80, $P_TLS]
EOF

SQUID_USER_LINE=""
if [[ $(id -u) == 0 ]]; then
    if id proxy >/dev/null 2>&1; then
        SQUID_USER_LINE="cache_effective_user proxy"
    else
        chmod 777 "$TMP/squid"
    fi
fi
# security_file_certgen's database, made before squid starts (as squid's user)
"$CERTGEN" -c -s "$TMP/squid/ssl_db" -M 16MB >"$TMP/squid/certgen-init.log" 2>&1 ||
    { cat "$TMP/squid/certgen-init.log" >&2; die "security_file_certgen -c failed"; }
[[ -n $SQUID_USER_LINE ]] && chown -R proxy "$TMP/squid"
cat >"$TMP/squid/squid.conf" <<EOF
http_port $BIND:$P_SQUID ssl-bump generate-host-certificates=on dynamic_cert_mem_cache_size=16MB tls-cert=$TMP/squid/ca.pem tls-key=$TMP/squid/ca.key
sslcrtd_program $CERTGEN -s $TMP/squid/ssl_db -M 16MB
sslcrtd_children 4 startup=1 idle=1
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile=$PKI/origin-ca.pem
$SQUID_DNS
$SQUID_USER_LINE
$(squid_common_conf)
EOF
chmod 644 "$TMP/squid/squid.conf"

# ---- start everything -----------------------------------------------------------------------
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true

check_curl() { # label expect-body curl-args... : one request must give 200 and the body
    local label=$1 want=$2 code body; shift 2
    code=$(ccurl -s -o "$TMP/check.body" -w '%{http_code}' --max-time 5 "$@" 2>"$TMP/check.err") || code=000
    body=$(cat "$TMP/check.body" 2>/dev/null || true)
    [[ $code == 200 && $body == "$want" ]] || return 1
    echo "  check: $label: curl $* -> $code '$body'"
}
wait_curl() { # name label curl-args...  (retries while the process starts)
    local name=$1 label=$2 pid i; shift 2
    pid=$(pid_of "$name")
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || { tail -n 30 "$TMP/$name.log" >&2 || true; die "$name exited during start-up"; }
        check_curl "$label" hello "$@" && return 0
        sleep 0.2
    done
    echo "---- $name log ----" >&2; tail -n 30 "$TMP/$name.log" >&2 || true
    ccurl -sS -v --max-time 5 "$@" >&2 || true
    die "$name: curl $* did not give 200 'hello'"
}
check_load() { # label args... : connect_load --check must pass
    local label=$1 out; shift
    if ! out=$("$CONNECT_LOAD_BIN" --check "$@" 2>&1); then
        echo "$out" >&2
        die "$label: connect_load --check $* failed"
    fi
    echo "  check: $label: connect_load --check $* -> $(tr '\n' ' ' <<<"$out")"
    CHECK_OUT=$out
}

echo "starting the origin, the DNS server ($DNS_ADDR:$DNS_PORT), edgepool, squid (ssl-bump), nginx$(want intercept || want h2 || want newconn && echo ", mitmproxy") on $BIND (temp dir $TMP)"
start origin "$TMP/origin.log" "$NGINX" -p "$TMP/origin/" -e "$TMP/origin/error.log" -c "$TMP/origin/nginx.conf"
wait_curl origin "origin (plain)" "http://$ORIGIN/"
wait_curl origin "origin (TLS)" --cacert "$PKI/origin-ca.pem" --resolve "$TLS_TARGET:$BIND" "https://$TLS_TARGET/"
start edgepool "$TMP/edgepool.log" "$EDGEPOOL_BIN" serve --config "$TMP/edgepool.toml" --listen "$BIND:$P_EDGE" \
    --admin "$BIND:$P_ADMIN" --data-dir "$TMP/ep"
wait_curl edgepool "edgepool, name" -x "http://$BIND:$P_EDGE" "http://$ORIGIN_NAME:$P_ORIGIN/"
EP_CA=$TMP/ep/ca.pem
[[ -r $EP_CA ]] || die "edgepool's CA $EP_CA not found"
start squid "$TMP/squid.log" "$SQUID" -N -n "eppaths$$" -f "$TMP/squid/squid.conf"
wait_curl squid "squid, name" -x "http://$BIND:$P_SQUID" "http://$ORIGIN_NAME:$P_ORIGIN/"
start nginx "$TMP/nginx.log" "$NGINX" -p "$TMP/nginx/" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf"
wait_curl nginx "nginx forward, name" -x "http://$BIND:$P_NGINX" "http://$ORIGIN_NAME:$P_ORIGIN/"
if want intercept || want h2 || want newconn; then
    # mitmproxy resolves with the system's getaddrinfo (no DNS settings, no cache of its own):
    # it runs in a private mount namespace whose /etc/hosts names origin.test, the cheapest
    # lookup glibc has. The machine's /etc/hosts is not touched.
    printf '127.0.0.1 localhost\n%s %s\n' "$BIND" "$ORIGIN_NAME" >"$TMP/mitm/hosts"
    if [[ $(id -u) == 0 ]]; then NS=(unshare --mount --propagation private)
    else NS=(unshare --user --map-root-user --mount --propagation private); fi
    "${NS[@]}" true 2>/dev/null || die "${NS[*]} does not work here: mitmproxy needs a private /etc/hosts for $ORIGIN_NAME"
    start mitmproxy "$TMP/mitmproxy.log" "${NS[@]}" sh -c 'mount --bind "$1" /etc/hosts && shift && exec "$@"' sh \
        "$TMP/mitm/hosts" "$MITMDUMP" --listen-host "$BIND" -p "$P_MITM" -q \
        --set confdir="$TMP/mitm" --set ssl_verify_upstream_trusted_ca="$PKI/origin-ca.pem"
    for ((i = 0; i < 150; i++)); do [[ -s $TMP/mitm/mitmproxy-ca-cert.pem ]] && break; sleep 0.2; done
    MITM_CA=$TMP/mitm/mitmproxy-ca-cert.pem
    [[ -s $MITM_CA ]] || { tail -n 30 "$TMP/mitmproxy.log" >&2; die "mitmproxy made no CA in $TMP/mitm"; }
    wait_curl mitmproxy "mitmproxy, intercepted" -x "http://$BIND:$P_MITM" --cacert "$MITM_CA" "https://$TLS_TARGET/"
    wait_curl edgepool "edgepool, intercepted" -x "http://$BIND:$P_EDGE" --cacert "$EP_CA" "https://$TLS_TARGET/"
    wait_curl squid "squid ssl-bump, intercepted" -x "http://$BIND:$P_SQUID" --cacert "$TMP/squid/ca.pem" "https://$TLS_TARGET/"
fi

# connect_load arguments per peer: proxy and the CA the worker trusts
declare -A LOAD_ARGS=(
    [direct]="--target $TLS_TARGET --address $TLS_ADDR --ca $PKI/origin-ca.pem"
    [edgepool]="--proxy $BIND:$P_EDGE --target $TLS_TARGET --ca $EP_CA"
    [squid]="--proxy $BIND:$P_SQUID --target $TLS_TARGET --ca $TMP/squid/ca.pem"
    [mitmproxy]="--proxy $BIND:$P_MITM --target $TLS_TARGET --ca ${MITM_CA:-}"
)
declare -A RESUME_CHECK=()
if want intercept || want h2 || want newconn; then
    for peer in direct edgepool squid mitmproxy; do
        # shellcheck disable=SC2086
        check_load "$peer (HTTP/1.1)" ${LOAD_ARGS[$peer]}
        # shellcheck disable=SC2086
        check_load "$peer (HTTP/1.1, second connection offers the first one's ticket)" ${LOAD_ARGS[$peer]} --resume
        RESUME_CHECK[$peer]=$(sed -n 's/.*round=2 .*resumed=\([01]\).*/\1/p' <<<"$CHECK_OUT")
    done
    if want h2; then
        for peer in direct edgepool mitmproxy; do
            # shellcheck disable=SC2086
            check_load "$peer (HTTP/2)" ${LOAD_ARGS[$peer]} --h2
        done
    fi
fi

# ---- machine and versions -------------------------------------------------------------------
echo
echo "== machine"
print_machine
echo "== versions"
echo "edgepool:  $("$EDGEPOOL_BIN" --version 2>&1 | head -n1)"
echo "squid:     $("$SQUID" -v 2>&1 | head -n1) ($(dpkg-query -W -f='${Package} ${Version}' squid-openssl 2>/dev/null || echo "not a Debian package"))"
echo "nginx:     $("$NGINX" -v 2>&1 | head -n1)"
echo "mitmproxy: $("$MITMDUMP" --version 2>&1 | grep -E '^(Mitmproxy|Python|OpenSSL)' | tr '\n' ' ')"
echo "wrk:       $("$WRK" -v 2>&1 | head -n1)"
echo "h2load:    $("$H2LOAD" --version 2>&1 | head -n1)"
echo "openssl:   $(openssl version)"
echo "== set-up"
echo "names: origin.test -> $BIND (DNS TTL ${DNS_TTL}s) from the DNS server on $DNS_ADDR:$DNS_PORT;"
echo "  edgepool: upstream.dns_servers; $SQUID_DNS_NOTE; nginx: resolver $DNS_ADDR:$DNS_PORT"
echo "TLS origin: nginx, ECDSA P-256 certificate from a throwaway CA that every proxy trusts towards"
echo "  it; HTTP/2 and HTTP/1.1; session tickets on"
echo "squid: ssl_bump peek step1 + bump all, ECDSA P-256 CA, security_file_certgen helpers (their CPU counted)"
echo "mitmproxy: mitmdump -q, its own RSA 2048 CA, ssl_verify_upstream_trusted_ca = the origin CA;"
echo "  resolves $ORIGIN_NAME from /etc/hosts in a private mount namespace (glibc getaddrinfo)"
echo "CONNECT target: $TLS_TARGET (a name, as workers send it: squid does not match IP SANs)"
echo "session resumption on a reconnect (connect_load --check --resume, 2nd connection):" \
    "$(for p in direct edgepool squid mitmproxy; do printf '%s=%s ' "$p" "${RESUME_CHECK[$p]:-?}"; done)"
echo

# ---- CPU of a process tree ------------------------------------------------------------------
# utime+stime+cutime+cstime of pid and every live descendant (squid's certificate helpers).
tree_ticks() {
    local root=${1:-}
    [[ -n $root && -r /proc/$root/stat ]] || { echo 0; return; }
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | sed 's/^\([0-9]*\) (.*) /\1 /' | awk -v root="$root" '
        { pp[$1] = $3; t[$1] = $13 + $14 + $15 + $16 }
        END { s = 0; for (p in t) { q = p; n = 0; while (q != root && (q in pp) && q > 1 && n++ < 64) q = pp[q]; if (q == root) s += t[p] } print s }'
}

tree_pids() { # pid -> "pid,child,..." (pid and its live descendants)
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | sed 's/^\([0-9]*\) (.*) /\1 /' | awk -v root="$1" '
        { pp[$1] = $3 }
        END { s = ""; for (p in pp) { q = p; n = 0; while (q != root && (q in pp) && q > 1 && n++ < 64) q = pp[q]; if (q == root) s = s (s == "" ? "" : ",") p } print s }'
}

# ---- who else used the CPU ------------------------------------------------------------------
# A snapshot of every process: pid, ppid, CPU ticks (utime+stime), name. After a run,
# other_procs names the processes outside this script's tree that used the most CPU in it
# (other engineers' builds, say), so the "other load" column says who shared the machine.
proc_snapshot() { # file
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } |
        sed -n 's/^\([0-9]*\) (\(.*\)) [A-Za-z] \([0-9]*\) \(.*\)$/\1 \3 \4\t\2/p' |
        awk -F'\t' '{ split($1, a, " "); printf "%s %s %d\t%s\n", a[1], a[2], a[12] + a[13], $2 }' >"$1"
}
other_procs() { # before after -> "name 1.2 s, name 0.3 s" (top 3, at least 0.1 s)
    awk -F'\t' -v me="$$" -v hz="$HZ" '
        FNR == NR { split($1, a, " "); before[a[1]] = a[3]; next }
        { split($1, a, " "); pid = a[1]; pp[pid] = a[2]; t[pid] = a[3] - ((pid in before) ? before[pid] : 0); name[pid] = $2 }
        END {
            for (p in t) {
                q = p; n = 0
                while (q != me && (q in pp) && q > 1 && n++ < 64) q = pp[q]
                if (q != me && t[p] > 0) by[name[p]] += t[p]
            }
            out = ""; k = 0
            while (k < 3) {
                best = ""; for (c in by) if (best == "" || by[c] > by[best]) best = c
                if (best == "" || by[best] < hz / 10) break
                out = out (out == "" ? "" : ", ") sprintf("%s %.1f s", best, by[best] / hz); delete by[best]; k++
            }
            print out
        }' "$1" "$2"
}
softirq_ticks() { awk '/^cpu / { print $8 }' /proc/stat; }

# ---- runs -----------------------------------------------------------------------------------
# Every run stores, under KEY=section/row: requests, req/s, p50/p99 (µs), errors, handshakes,
# resumed, proxy CPU ticks, origin CPU ticks, DNS queries, other load (%).
declare -A REQ RPS P50 P99 ERR HS RES PT OT NQ OTHER OTHERWHO MEAN ERRDETAIL LABEL
FAILED=0
FIRST_RUN=1
run() { # key proxy-process-name-or-empty kind(wrk|load|h2load) cmd...
    local key=$1 proxy=$2 kind=$3; shift 3
    ((FIRST_RUN)) || sleep "$PAUSE"
    FIRST_RUN=0
    local ppid="" opid dpid perfpid="" rc=0 out wpid
    [[ -n $proxy ]] && ppid=$(pid_of "$proxy")
    opid=$(pid_of origin); dpid=$(pid_of dns)
    echo "-- $key: $*"
    if [[ $PERF == 1 && $proxy == edgepool ]]; then
        perf record -e cpu-clock -F 999 ${PERF_CALLGRAPH:+--call-graph "$PERF_CALLGRAPH"} -p "$ppid" -o "$TMP/perf.${key//\//-}.data" -- sleep $((DUR_S > 3 ? DUR_S - 2 : DUR_S)) \
            >"$TMP/perf.log" 2>&1 &
        perfpid=$!
        PIDS+=("$perfpid"); NAMES+=(perf)
    fi
    local p0 o0 d0 c0 s0 t0 st0 q0 si0 p1 o1 d1 c1 s1 t1 st1 q1 si1 who statpid=""
    if [[ $PERF_STAT == 1 && -n $ppid ]]; then
        perf stat -x, -e task-clock,context-switches,raw_syscalls:sys_enter -p "$(tree_pids "$ppid")" \
            -o "$TMP/perfstat.${key//\//-}" -- sleep "$DUR_S" >/dev/null 2>&1 &
        statpid=$!
        PIDS+=("$statpid"); NAMES+=(perf-stat)
    fi
    proc_snapshot "$TMP/procs.before"
    p0=$(tree_ticks "$ppid"); o0=$(pid_ticks "$opid"); d0=$(pid_ticks "$dpid"); q0=$(dns_count)
    si0=$(softirq_ticks); child_ticks c0; read -r s0 t0 st0 < <(sys_ticks)
    "$@" >"$TMP/run.out" 2>&1 &
    wpid=$!
    PIDS+=("$wpid"); NAMES+=("load-$key")
    wait "$wpid" || rc=$?
    child_ticks c1
    p1=$(tree_ticks "$ppid"); o1=$(pid_ticks "$opid"); d1=$(pid_ticks "$dpid"); q1=$(dns_count)
    read -r s1 t1 st1 < <(sys_ticks); si1=$(softirq_ticks)
    proc_snapshot "$TMP/procs.after"
    who=$(other_procs "$TMP/procs.before" "$TMP/procs.after")
    if [[ -n $perfpid ]]; then wait "$perfpid" 2>/dev/null || true; fi
    if [[ -n $statpid ]]; then wait "$statpid" 2>/dev/null || true; fi
    out=$(cat "$TMP/run.out")
    cp "$TMP/run.out" "$TMP/run.${key//\//-}.out"
    ((rc == 0)) || { echo "$out" | tail -n 20; die "load failed for $key (exit $rc)"; }
    local dp=$((p1 - p0)) dorg=$((o1 - o0)) dd=$((d1 - d0)) dc=$((c1 - c0)) ds=$((s1 - s0)) dt=$((t1 - t0))
    local dsteal=$((st1 - st0)) dother
    dother=$((ds - dp - dorg - dd - dc)); ((dother < 0)) && dother=0
    local -A f=()
    local kv line
    case $kind in
        wrk)
            line=$(grep '^EPBENCH ' <<<"$out") || { echo "$out"; die "no summary line from wrk for $key"; }
            for kv in ${line#EPBENCH }; do f[${kv%%=*}]=${kv#*=}; done
            local non2xx
            non2xx=$(sed -n 's/.*Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' <<<"$out"); non2xx=${non2xx:-0}
            f[errors]=$((f[err_connect] + f[err_read] + f[err_write] + f[err_status] + f[err_timeout]))
            ((non2xx > f[err_status])) && f[errors]=$((f[errors] + non2xx - f[err_status]))
            ERRDETAIL[$key]="non2xx=$non2xx connect=${f[err_connect]} read=${f[err_read]} write=${f[err_write]} timeout=${f[err_timeout]}"
            f[handshakes]=0; f[resumed]=0
            ;;
        load)
            line=$(grep '^EPLOAD ' <<<"$out") || { echo "$out"; die "no summary line from connect_load for $key"; }
            for kv in ${line#EPLOAD }; do f[${kv%%=*}]=${kv#*=}; done
            ERRDETAIL[$key]=$(grep -o 'err_[a-z]*=[0-9]*' <<<"$line" | tr '\n' ' ')
            ;;
        h2load)
            # "finished in 10.00s, 41234.50 req/s, ..."; "requests: N total, N started, N done,
            # N succeeded, N failed, N errored, N timeout"; "status codes: N 2xx, N 3xx, N 4xx,
            # N 5xx". With -D, the requests still in flight at the deadline are counted failed
            # and errored: up to connections x streams of them are the cut-off, not errors.
            local failed s3 s4 s5 inflight=$((H2_CONNECTIONS * H2_STREAMS))
            f[rps]=$(sed -n 's/^finished in [0-9.]*s, \([0-9.]*\) req\/s.*/\1/p' <<<"$out")
            f[requests]=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' <<<"$out")
            failed=$(sed -n 's/^requests: .* \([0-9]*\) failed.*/\1/p' <<<"$out")
            read -r s3 s4 s5 < <(sed -n 's/^status codes: [0-9]* 2xx, \([0-9]*\) 3xx, \([0-9]*\) 4xx, \([0-9]*\) 5xx.*/\1 \2 \3/p' <<<"$out")
            [[ -n ${f[rps]} && -n ${f[requests]} && -n $failed && -n ${s5:-} ]] || { echo "$out"; die "could not read h2load's summary for $key"; }
            f[errors]=$((s3 + s4 + s5))
            ((failed > inflight)) && f[errors]=$((f[errors] + failed))
            # "time for request:  min  max  mean  sd  +/- sd" -> mean (µs)
            MEAN[$key]=$(awk '/^time for request:/ { v = $6; if (v ~ /ms$/) { sub(/ms$/, "", v); v *= 1000 } else if (v ~ /us$/) sub(/us$/, "", v); else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1e6 }; print v }' <<<"$out")
            f[p50_us]=0; f[p99_us]=0; f[handshakes]=$H2_CONNECTIONS; f[resumed]=0
            ERRDETAIL[$key]="non2xx=$((s3 + s4 + s5)) failed=$failed (in flight at the deadline: up to $inflight)"
            ;;
    esac
    REQ[$key]=${f[requests]}; RPS[$key]=${f[rps]}; P50[$key]=${f[p50_us]}; P99[$key]=${f[p99_us]}
    ERR[$key]=${f[errors]}; HS[$key]=${f[handshakes]:-0}; RES[$key]=${f[resumed]:-0}
    PT[$key]=$dp; OT[$key]=$dorg; NQ[$key]=$((q1 - q0))
    OTHER[$key]=$(awk -v o="$dother" -v t="$dt" 'BEGIN { printf "%.0f %%", t ? 100 * o / t : 0 }')
    OTHERWHO[$key]=$who
    echo "   ${f[requests]} requests, $(fmt_int "${f[rps]}")/s, p50 $(fmt_lat "${f[p50_us]}"), p99 $(fmt_lat "${f[p99_us]}"), errors ${f[errors]}" \
        "(${ERRDETAIL[$key]}), handshakes ${f[handshakes]:-0} (resumed ${f[resumed]:-0}${f[tickets_offered]:+; TLS tickets received ${f[tickets_received]}, offered ${f[tickets_offered]}}), DNS queries ${NQ[$key]}"
    echo "   CPU during the run (s): ${proxy:-no proxy}${proxy:+ $(secs "$dp")}, origin $(secs "$dorg"), load generator $(secs "$dc")," \
        "other $(secs "$dother") (softirq $(secs $((si1 - si0))), steal $(secs "$dsteal")${who:+; busiest others: $who})," \
        "machine busy $(secs "$ds") of $(secs "$dt")"
    if [[ -n $statpid && -s $TMP/perfstat.${key//\//-} ]]; then
        # counts over DUR_S seconds, the run's length: per request (or new connection)
        awk -F, -v n="${f[requests]}" -v d="$DUR_S" -v e="${f[elapsed_s]:-${f[duration_s]:-$DUR_S}}" '
            $3 == "task-clock" { tc = $1 } $3 == "context-switches" { cs = $1 } $3 == "raw_syscalls:sys_enter" { sc = $1 }
            END { m = n * d / e; if (m > 0) printf "   perf stat: %.1f syscalls, %.2f context switches, %.1f µs task-clock per request\n", sc / m, cs / m, tc * 1000 / m }' \
            "$TMP/perfstat.${key//\//-}"
    fi
    if [[ -n $ppid ]] && ! kill -0 "$ppid" 2>/dev/null; then
        echo "!! $proxy exited during its run; its log:" >&2
        tail -n 20 "$TMP/$proxy.log" >&2 || true
        FAILED=1
    fi
    if ((f[errors] > 0 || f[requests] == 0)); then
        echo "!! $key: ${f[requests]} requests, errors: ${ERRDETAIL[$key]}" >&2
        grep '^connect_load: first' <<<"$out" | sed 's/^/   /' >&2 || true
        FAILED=1
    fi
}

load() { # key proxy-process peer extra-args...
    local key=$1 proxy=$2 peer=$3; shift 3
    # shellcheck disable=SC2086
    run "$key" "$proxy" load "$CONNECT_LOAD_BIN" ${LOAD_ARGS[$peer]} --duration "$DURATION" --timeout 10s "$@"
}

if want names; then
    echo "== names: wrk -t1 -c$CONNECTIONS -d$DURATION --latency, GET http://$ORIGIN_NAME:$P_ORIGIN/ in absolute form"
    LABEL[names/direct]="direct to origin by address (baseline)"
    run names/direct "" wrk env -u WRK_TARGET "$WRK" -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$LUA" "http://$ORIGIN/"
    for peer in edgepool squid nginx; do
        port=P_EDGE; [[ $peer == squid ]] && port=P_SQUID; [[ $peer == nginx ]] && port=P_NGINX
        run "names/$peer" "$peer" wrk env WRK_TARGET="$ORIGIN_NAME:$P_ORIGIN" "$WRK" -t1 -c"$CONNECTIONS" \
            -d"$DURATION" --latency -s "$LUA" "http://$BIND:${!port}/"
    done
fi
if want intercept; then
    echo "== intercept: connect_load --connections $CONNECTIONS --duration $DURATION (HTTP/1.1 keep-alive inside CONNECT + TLS)"
    LABEL[intercept/direct]="direct TLS to origin (baseline, no proxy)"
    for peer in direct edgepool squid mitmproxy; do
        proc=$peer; [[ $peer == direct ]] && proc=""
        load "intercept/$peer" "$proc" "$peer" --connections "$CONNECTIONS"
    done
fi
if want h2; then
    echo "== h2: HTTP/2 from the worker, $H2_CONNECTIONS connections x $H2_STREAMS streams"
    LABEL[h2/h2load]="h2load straight to origin (baseline)"
    run h2/h2load "" h2load "$H2LOAD" -c "$H2_CONNECTIONS" -m "$H2_STREAMS" -t 1 -D "$DUR_S" "https://$TLS_ADDR/"
    LABEL[h2/direct]="connect_load --h2 straight to origin (baseline)"
    for peer in direct edgepool mitmproxy; do
        proc=$peer; [[ $peer == direct ]] && proc=""
        load "h2/$peer" "$proc" "$peer" --h2 --connections "$H2_CONNECTIONS" --streams "$H2_STREAMS"
    done
fi
if want newconn; then
    echo "== newconn: $NEWCONN_CONNECTIONS workers, a new connection (TCP + CONNECT + TLS) per request"
    for mode in full resumed; do
        extra=(); [[ $mode == resumed ]] && extra=(--resume)
        LABEL[newconn-$mode/direct]="direct TLS to origin (baseline, no proxy)"
        for peer in direct edgepool squid mitmproxy; do
            proc=$peer; [[ $peer == direct ]] && proc=""
            load "newconn-$mode/$peer" "$proc" "$peer" --new-conn-per-request --connections "$NEWCONN_CONNECTIONS" "${extra[@]}"
        done
    done
fi
echo "load after the runs: $(cut -d' ' -f1-3 /proc/loadavg)"

# ---- tables ---------------------------------------------------------------------------------
label_of() { # key
    local key=$1 peer=${1#*/}
    if [[ -n ${LABEL[$key]:-} ]]; then echo "${LABEL[$key]}"; return; fi
    case $peer in
        edgepool) echo "edgepool" ;;
        squid) if [[ $key == names/* ]]; then echo "squid"; else echo "squid ssl-bump"; fi ;;
        nginx) echo "nginx forward (resolver, dials per request)" ;;
        mitmproxy) echo "mitmproxy" ;;
        *) echo "$peer" ;;
    esac
}
per_req() { # ticks count -> "N µs"
    awk -v t="$1" -v n="$2" -v hz="$HZ" 'BEGIN { if (n > 0) printf "%.0f µs", t / hz * 1e6 / n; else printf "—" }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else printf "—" }'; }
other_cell() { # key -> "41 % (rustc)": the share, and the busiest other process if any
    local who=${OTHERWHO[$1]:-}
    echo "${OTHER[$1]}${who:+ (${who%%,*})}"
}
fmt_p() { # µs or 0
    if [[ ${1:-0} == 0 ]]; then echo "—"; else fmt_lat "$1"; fi
}
table() { # section rows... ; rows are peers
    local sec=$1 key; shift
    echo
    echo "| proxy | req/s | p50 | p99 | errors | vs edgepool | proxy CPU per request | other load |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for peer in "$@"; do
        key=$sec/$peer
        [[ -n ${RPS[$key]:-} ]] || continue
        local cpu="—" p50
        [[ $peer == direct || $peer == h2load ]] || cpu=$(per_req "${PT[$key]}" "${REQ[$key]}")
        p50=$(fmt_p "${P50[$key]}")
        [[ -n ${MEAN[$key]:-} ]] && p50="mean $(fmt_lat "${MEAN[$key]}")"
        printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$(label_of "$key")" "$(fmt_int "${RPS[$key]}")" \
            "$p50" "$(fmt_p "${P99[$key]}")" "${ERR[$key]}" "$(ratio "${RPS[$key]}" "${RPS[$sec/edgepool]:-0}")" \
            "$cpu" "$(other_cell "$key")"
    done
}
edge_lead() { # section peers... : edgepool's req/s and CPU per request against each peer
    local sec=$1 peer e=$1/edgepool; shift
    [[ -n ${RPS[$e]:-} ]] || return 0
    for peer in "$@"; do
        [[ -n ${RPS[$sec/$peer]:-} ]] || continue
        echo "edgepool vs $(label_of "$sec/$peer"): $(ratio "${RPS[$e]}" "${RPS[$sec/$peer]}") the req/s," \
            "$(awk -v a="${PT[$sec/$peer]}" -v na="${REQ[$sec/$peer]}" -v b="${PT[$e]}" -v nb="${REQ[$e]}" \
                'BEGIN { if (na > 0 && nb > 0 && b > 0) printf "%.2f×", (a / na) / (b / nb); else printf "—" }') less proxy CPU per request"
    done
}

if want names; then
    echo
    echo "### names (http://$ORIGIN_NAME:$P_ORIGIN/, DNS TTL ${DNS_TTL}s)"
    table names direct edgepool squid nginx
    echo
    echo "DNS queries answered during each run: $(for p in edgepool squid nginx; do printf '%s %s; ' "$p" "${NQ[names/$p]:-—}"; done)"
    edge_lead names squid nginx
fi
if want intercept; then
    echo
    echo "### intercepted HTTPS (CONNECT + TLS with the proxy's CA, HTTP/1.1 keep-alive, $CONNECTIONS connections)"
    table intercept direct edgepool squid mitmproxy
    echo
    edge_lead intercept squid mitmproxy
fi
if want h2; then
    echo
    echo "### HTTP/2 workers ($H2_CONNECTIONS connections x $H2_STREAMS streams)"
    table h2 h2load direct edgepool mitmproxy
    echo "| squid ssl-bump | — | — | — | — | — | no HTTP/2 towards clients | — |"
    echo
    edge_lead h2 mitmproxy
fi
if want newconn; then
    for mode in full resumed; do
        sec=newconn-$mode
        echo
        if [[ $mode == full ]]; then
            echo "### new worker TLS connections, full handshakes ($NEWCONN_CONNECTIONS workers, one request per connection)"
        else
            echo "### new worker TLS connections, with session resumption (tickets offered on reconnect)"
        fi
        echo
        echo "| proxy | new conns/s | resumed | p50 | p99 | errors | vs edgepool | proxy CPU per new conn | new conns per proxy core-second | origin CPU per new conn | other load |"
        echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        for peer in direct edgepool squid mitmproxy; do
            key=$sec/$peer
            [[ -n ${RPS[$key]:-} ]] || continue
            cpu="—"; percore="—"
            if [[ $peer != direct ]]; then
                cpu=$(per_req "${PT[$key]}" "${HS[$key]}")
                percore=$(awk -v t="${PT[$key]}" -v n="${HS[$key]}" -v hz="$HZ" 'BEGIN { if (t > 0) { s = sprintf("%.0f", n / (t / hz)); o = ""; while (length(s) > 3) { o = "," substr(s, length(s) - 2) o; s = substr(s, 1, length(s) - 3) } print s o } else print "—" }')
            fi
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$(label_of "$key")" "$(fmt_int "${RPS[$key]}")" \
                "$(awk -v r="${RES[$key]}" -v n="${HS[$key]}" 'BEGIN { if (n > 0) printf "%.0f %%", 100 * r / n; else printf "—" }')" \
                "$(fmt_p "${P50[$key]}")" "$(fmt_p "${P99[$key]}")" "${ERR[$key]}" \
                "$(ratio "${RPS[$key]}" "${RPS[$sec/edgepool]:-0}")" "$cpu" "$percore" \
                "$(per_req "${OT[$key]}" "${HS[$key]}")" "$(other_cell "$key")"
        done
        echo
        edge_lead "$sec" squid mitmproxy
    done
fi
echo
echo "(req/s and new conns/s: completed requests / run time; p50/p99: per request, from the start of"
echo " its connection when it opens one; proxy CPU: the proxy's CPU time over the run, all threads and"
echo " child processes (squid's certificate helpers), / requests or new connections; other load: CPU"
echo " taken by anything but the load generator, origin, DNS server and proxy (the kernel's softirq"
echo " work for loopback traffic, other people's processes: the busiest named in brackets with its CPU"
echo " seconds), plus hypervisor steal, in % of the machine's $(nproc) CPUs)"

if [[ $PERF == 1 ]]; then
    for f in "$TMP"/perf.*.data; do
        [[ -s $f ]] || continue
        echo
        echo "== perf: edgepool during $(basename "$f" .data | sed 's/^perf\.//'): CPU by object, then the top symbols (self)"
        { perf report -i "$f" --no-children --sort dso --stdio 2>/dev/null || true; } | grep -E '^ +[0-9]' | head -n 8 || true
        { perf report -i "$f" --no-children --sort dso,sym --stdio -g none 2>/dev/null || true; } | grep -E '^ +[0-9]' | head -n 40 || true
        if [[ -n ${PERF_CALLGRAPH:-} ]]; then
            echo "-- inclusive (children)"
            { perf report -i "$f" --children --sort sym --stdio -g none 2>/dev/null || true; } | grep -E '^ +[0-9]' | head -n 60 || true
        fi
    done
fi

if ((FAILED)); then
    echo >&2
    for key in "${!ERR[@]}"; do ((ERR[$key] == 0)) || echo "FAILED: $key: ${ERRDETAIL[$key]}" >&2; done
    echo "see the logs: rerun with KEEP_TMP=1" >&2
    exit 1
fi
