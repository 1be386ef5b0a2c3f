#!/usr/bin/env bash
# Checks Cargo.lock against the RustSec advisory database with cargo-audit — the same check
# `.ci/run` makes, failing on any vulnerability, unsound or unmaintained advisory.
#
#   bench/audit.sh [ADVISORY_DB_DIR]
#
# The database: ADVISORY_DB_DIR, else $EDGEPOOL_ADVISORY_DB, else the snapshot beside the
# repository (../shared/advisory-db). cargo-audit: ../shared/bin/cargo-audit, else one on PATH.
# GitHub (where cargo-audit would fetch the database itself) is not reachable from our runners,
# so the database is never fetched.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DB="${1:-${EDGEPOOL_ADVISORY_DB:-}}"
if [ -z "$DB" ] && [ -d ../shared/advisory-db ]; then
    DB="../shared/advisory-db"
fi
if [ -x ../shared/bin/cargo-audit ]; then
    AUDIT="$(cd ../shared/bin && pwd)/cargo-audit"
elif command -v cargo-audit >/dev/null 2>&1; then
    AUDIT="$(command -v cargo-audit)"
else
    echo "bench/audit.sh: no cargo-audit (../shared/bin/cargo-audit or on PATH)" >&2
    exit 1
fi
if [ -z "$DB" ]; then
    echo "bench/audit.sh: no advisory database (argument, EDGEPOOL_ADVISORY_DB or ../shared/advisory-db)" >&2
    exit 1
fi
echo "advisory database: $DB"
exec "$AUDIT" audit --db "$DB" --no-fetch --deny unsound --deny unmaintained
