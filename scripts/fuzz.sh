#!/usr/bin/env bash
# Fuzz the parsers an agent's request reaches before any policy: the host
# (authority) parser, the Proxy-Authorization parser, the path normaliser
# and the bearer-token (JWT) verifier (fuzz/fuzz_targets/). Each target runs
# SECONDS (default 60)
# with libFuzzer; a crash or a failed property exits non-zero and leaves the
# input in fuzz/artifacts/. Installs cargo-fuzz if missing. libFuzzer's
# instrumentation needs nightly flags: RUSTC_BOOTSTRAP=1 lets the one stable
# toolchain accept them.
#
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install --locked --quiet cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
cd fuzz
cargo fuzz build -O
for t in host proxy_authorization path jwt; do
  echo "fuzz.sh: $t for ${secs}s" >&2
  cargo fuzz run -O "$t" -- -max_total_time="$secs" 2>&1 | tee "/tmp/fuzz-$t.log" | grep -E "^Done|panicked|ERROR|SUMMARY" || true
  # libFuzzer exits non-zero on a crash; pipefail does not see it through
  # tee, so check its last word.
  grep -q "^Done" "/tmp/fuzz-$t.log" || { echo "fuzz.sh: $t failed" >&2; tail -30 "/tmp/fuzz-$t.log" >&2; exit 1; }
done
