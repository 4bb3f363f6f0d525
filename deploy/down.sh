#!/usr/bin/env bash
# `make down`: stop exactly what `make up` started (by pid file), waiting for workers to finish shutting down.
set -uo pipefail
cd "$(dirname "$0")/.."
state=$(realpath -m "${NITROCONV_STATE_DIR:-$PWD/.state}")
export NITROCONV_STATE_DIR=$state

stop() {  # name
  local pidfile=$state/pids/$1.pid pid
  [[ -f $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    # Celery's warm shutdown re-queues unacked work; give it the soft-shutdown window.
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$pidfile"
}

stop flower
stop beat
for pidfile in "$state"/pids/worker*.pid; do
  [[ -e $pidfile ]] && stop "$(basename "$pidfile" .pid)"
done
stop api
deploy/registry.sh stop
echo "nitroconv is down"
