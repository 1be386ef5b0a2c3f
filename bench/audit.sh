#!/usr/bin/env bash
# Checks Cargo.lock against the RustSec advisory database with cargo-audit.
#
#   bench/audit.sh [ADVISORY_DB_DIR]
#
# cargo-audit normally clones https://github.com/rustsec/advisory-db itself. Where GitHub is not
# reachable (our CI runners reach only the package registries), give it a local clone of the
# database: ADVISORY_DB_DIR, or $EDGEPOOL_ADVISORY_DB. Installs cargo-audit from crates.io if
# missing. Exits non-zero on any vulnerability; unmaintained/unsound warnings are printed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DB="${1:-${EDGEPOOL_ADVISORY_DB:-}}"
if ! command -v cargo-audit >/dev/null 2>&1; then
    cargo install cargo-audit --locked
fi
if [ -n "$DB" ]; then
    echo "advisory database: $DB ($(git -C "$DB" log -1 --format='%h, %cd' 2>/dev/null || echo 'not a git checkout'))"
    exec cargo audit --db "$DB" --no-fetch --deny unsound --deny unmaintained
fi
exec cargo audit --deny unsound --deny unmaintained
