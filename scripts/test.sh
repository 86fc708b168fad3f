#!/usr/bin/env bash
# Checks formatting (cargo fmt) and lints (clippy, warnings are errors), then runs the whole
# test suite (what `make test` runs after set-up and build) and ends with one summary line
# over every test binary: "tests: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."

# Formatting and lints first: the tests run only on code that passes both. Clippy runs in the
# release profile so that it reuses the dependencies of the release build.
if ! cargo fmt --all --check; then
    echo >&2
    echo "scripts/test.sh: cargo fmt --all --check failed: run cargo fmt --all (the diff is above)" >&2
    exit 1
fi
if ! cargo clippy --release --workspace --all-targets -- -D warnings; then
    echo >&2
    echo "scripts/test.sh: cargo clippy --release --workspace --all-targets -- -D warnings failed (the warnings are above)" >&2
    exit 1
fi

log=$(mktemp)
cargo test --release --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
read -r passed failed < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { print p + 0, f + 0 }' "$log")
rm -f "$log"
echo
echo "tests: ${passed:-0} passed, ${failed:-0} failed"
exit "$rc"
