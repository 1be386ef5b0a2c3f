#!/usr/bin/env bash
# The DNS stage of a pool hit, p50 and mean per call (issue 11's bench: <= 5 us p50).
# Runs `cargo bench --bench dns_cache` and prints criterion's median and mean estimates.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo bench --bench dns_cache >target/dns_cache_bench.log 2>&1 || { cat target/dns_cache_bench.log; exit 1; }
printf '%-22s %12s %12s\n' case "p50 (ns)" "mean (ns)"
for d in target/criterion/dns_stage/*/new; do
    name=$(basename "$(dirname "$d")")
    python3 - "$d/estimates.json" "$name" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:<22} {e['median']['point_estimate']:>12.0f} {e['mean']['point_estimate']:>12.0f}")
PY
done
