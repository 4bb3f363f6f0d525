#!/usr/bin/env bash
# Starts what the tests and the demo need and are not started by the machine itself:
# Postgres and Redis when they are down, and a Docker engine (vfs driver, no iptables).
set -euo pipefail
state=${NITROCONV_STATE_DIR:-./.state}
mkdir -p "$state/logs" "$state/pids"

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi

if [[ "${1:-}" == "--docker" ]]; then
  if ! docker info >/dev/null 2>&1; then
    dockerd_bin=$(command -v dockerd)
    nohup "$dockerd_bin" --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none \
      >"$state/logs/dockerd.log" 2>&1 &
    echo $! >"$state/pids/dockerd.pid"
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start; see $state/logs/dockerd.log" >&2; exit 1; }
  fi
fi
