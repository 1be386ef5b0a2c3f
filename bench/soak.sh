#!/usr/bin/env bash
# Soak test: the real edgepool binary under sustained mixed load with faults, watched for leaks.
#
#   bench/soak.sh            # 600 s (10 minutes) of load
#   bench/soak.sh 120        # 120 s
#   EDGEPOOL_SOAK_RPS=0 bench/soak.sh 300    # no rate cap (default cap: 1000 req/s)
#
# Runs tests/soak.rs (ignored by plain `cargo test`) in release mode:
#   EDGEPOOL_SOAK_SECS=$1 cargo test --release --test soak -- --ignored --nocapture
# It starts `edgepool serve` as a child process (ports 0, temporary data dir, loopback targets
# allowed), six loopback origins (four plain HTTP/1.1, one of them behind a relay the test stops
# and restarts; two TLS, HTTP/1.1 and HTTP/2, reached through intercepted CONNECT) and sixteen
# reqwest workers sending GETs and POSTs, each with a unique x-ledger-id. Faults rotate every
# 10 s: clean, /rst, /close, /slow past upstream.response_header_timeout (1 s), origin down.
# Every 5 s it samples the gateway's RSS, open file descriptors and pool size (admin /status).
# After a 5 s quiet period it fails if RSS grew by more than 20 % + 8 MiB from the warm-up
# sample (10 % into the run), if file descriptors outside the pool grew by more than 32, or if
# the ledger is not clean (lost, hung, cross-wired or duplicated requests). The summary table
# is printed to stderr; this script also keeps the whole output in target/soak-<secs>s.log.
#
# Memory: the test's origins keep every request they received (~1 KiB each) for the duplicate
# check, so a 600 s run at the default cap needs a few hundred MiB in the test process.
set -euo pipefail

SECS=${1:-600}
if ! [[ $SECS =~ ^[0-9]+$ ]] || [ "$SECS" -lt 10 ]; then
    echo "usage: $0 [SECONDS>=10]" >&2
    exit 2
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/.."
mkdir -p target
LOG="target/soak-${SECS}s.log"
echo "soak: ${SECS} s of load; output also in $LOG" >&2
EDGEPOOL_SOAK_SECS=$SECS cargo test --release --test soak -- --ignored --nocapture 2>&1 | tee "$LOG"
