#!/usr/bin/env bash
# Starts (or stops) the plain-HTTP local registry of the demo and the stack on $NITROCONV_REGISTRY_ADDR,
# storing under the state dir; idempotent, with a pid file so `stop` ends only what `start` began.
set -euo pipefail
state=${NITROCONV_STATE_DIR:-./.state}
addr=${NITROCONV_REGISTRY_ADDR:-127.0.0.1:5000}
pidfile="$state/pids/registry.pid"
mkdir -p "$state/pids" "$state/logs" "$state/registry"

running() { [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "${1:-start}" in
start)
  if running; then exit 0; fi
  if curl -fsS "http://$addr/v2/" >/dev/null 2>&1; then
    echo "registry: something already answers on $addr; using it" >&2; exit 0
  fi
  cat >"$state/registry/config.yml" <<YAML
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $(realpath "$state/registry")/data}
  delete: {enabled: true}
http: {addr: $addr}
YAML
  nohup docker-registry serve "$state/registry/config.yml" >"$state/logs/registry.log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 1 50); do curl -fsS "http://$addr/v2/" >/dev/null 2>&1 && exit 0; sleep 0.2; done
  echo "registry did not start on $addr; see $state/logs/registry.log" >&2; exit 1
  ;;
stop)
  if running; then kill "$(cat "$pidfile")"; fi
  rm -f "$pidfile"
  ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
