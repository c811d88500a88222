#!/usr/bin/env bash
# Measure `gateway.quota_check: rls` against `authz` on this box, through
# real Envoy: closed loop, wrk with 32 connections for 10 s per run,
# alternating the two settings (2 runs each). Every request is allowed and
# counted against a quota it never reaches. The upstream is a second Envoy
# answering 200 itself. Prints one line per run and leaves nothing running.
#
#   bench/quota_check.sh            (needs wrk: apt-get install wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 2; }
cargo build --release -q
bin=target/release/clawgress
scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$PATH:$scripts_dir"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; sleep 1; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

up_port=$(port)
cat > "$work/upstream.yaml" <<YAML
static_resources:
  listeners:
  - address: {socket_address: {address: 127.0.0.1, port_value: $up_port}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: up
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                direct_response: {status: 200, body: {inline_string: "ok"}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
YAML
envoy -c "$work/upstream.yaml" --concurrency 1 --disable-hot-restart --log-level error --base-id 7 >/dev/null 2>&1 &
key=bench-key-0123456789
hash=$(printf %s "$key" | sha256sum | cut -d' ' -f1)
cat > "$work/proxy.lua" <<LUA
wrk.method = "GET"
wrk.path = "http://127.0.0.1:$up_port/"
wrk.headers["Proxy-Authorization"] = "Basic $(printf 'bench:%s' "$key" | base64 -w0)"
wrk.headers["Host"] = "127.0.0.1:$up_port"
LUA
run() {
  local mode=$1 n=$2 p a
  p=$(port); a=$(port)
  cat > "$work/$mode.yaml" <<YAML
gateway:
  proxy_listen: 127.0.0.1:$p
  admin_listen: 127.0.0.1:$a
  state_dir: $work/state-$mode-$n
  quota_check: $mode
agents:
  - {agent_id: bench, team_id: t, auth_type: api_key, api_key_sha256: "$hash"}
policies:
  - policy_id: allow-upstream
    priority: 1
    match: {destination: {hosts: ["127.0.0.1/32"], ports: [$up_port]}}
    action: allow
quotas:
  - {agent_id: bench, rps_limit: 1000000, rpm_limit: 60000000, mode: hard_stop}
YAML
  "$bin" up --config "$work/$mode.yaml" >"$work/$mode-$n.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$a/readyz" && break; sleep 0.2; done
  wrk -t2 -c32 -d3s -s "$work/proxy.lua" "http://127.0.0.1:$p" >/dev/null   # warm up
  local out
  out=$(wrk -t2 -c32 -d10s --latency -s "$work/proxy.lua" "http://127.0.0.1:$p")
  local rps p50 p99 non2xx
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $5}')
  echo "quota_check=$mode run=$n  req/s=$rps  p50=$p50  p99=$p99  non-2xx=${non2xx:-0}"
  kill -TERM $pid; wait $pid 2>/dev/null || true
}
for n in 1 2; do run rls $n; run authz $n; done
