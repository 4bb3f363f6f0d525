#!/usr/bin/env bash
# `make up`: registry, database (created and migrated), bootstrap admin, API under gunicorn,
# NITROCONV_WORKERS Celery workers, celery beat and Flower, all in the background with pid files
# under the state dir; waits for /healthz. Idempotent: what already runs is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export NITROCONV_STATE_DIR=${NITROCONV_STATE_DIR:-$PWD/.state}
state=$(realpath -m "$NITROCONV_STATE_DIR")
export NITROCONV_STATE_DIR=$state
mkdir -p "$state/pids" "$state/logs"
venv=${VENV:-$PWD/.venv}
py=$venv/bin/python
api_addr=${NITROCONV_API_ADDR:-127.0.0.1:8080}
workers=${NITROCONV_WORKERS:-1}
# A queue per host class: `convert` (conversions, Nitro hosts) and `maintenance` (the sweeper).
worker_queues=${NITROCONV_WORKER_QUEUES:-convert,maintenance}

# Generated once, shared by every process (JWT and sealing keys derive from it).
if [[ -z "${NITROCONV_SECRET_KEY:-}" ]]; then
  "$py" -c 'from common.settings import load_or_create_secret as f; from pathlib import Path; import os; f(Path(os.environ["NITROCONV_STATE_DIR"]) / "secret_key")'
fi
if [[ -z "${NITROCONV_ADMIN_PASSWORD:-}" ]]; then
  pwfile=$state/admin_password
  [[ -s $pwfile ]] || (umask 077; "$py" -c 'import secrets; print(secrets.token_urlsafe(18))' >"$pwfile")
  export NITROCONV_ADMIN_PASSWORD=$(cat "$pwfile")
fi
if [[ -z "${NITROCONV_FLOWER_BASIC_AUTH:-}" ]]; then
  export NITROCONV_FLOWER_BASIC_AUTH="admin:$NITROCONV_ADMIN_PASSWORD"
fi

running() { [[ -f "$state/pids/$1.pid" ]] && kill -0 "$(cat "$state/pids/$1.pid")" 2>/dev/null; }

deploy/services.sh
deploy/registry.sh start
"$py" -m common.store.bootstrap

if ! running api; then
  "$venv/bin/gunicorn" -c deploy/gunicorn.conf.py --daemon 'api.app:create_app()'
fi
for i in $(seq 1 "$workers"); do
  name=worker$i
  running "$name" && continue
  nohup "$py" -m worker -Q "$worker_queues" -c 1 -n "$name@%h" \
    --without-gossip -l info >"$state/logs/$name.log" 2>&1 &
  echo $! >"$state/pids/$name.pid"
done
if ! running beat; then
  nohup "$py" -m celery -A worker.celery_app beat -s "$state/celerybeat-schedule" -l info \
    >"$state/logs/beat.log" 2>&1 &
  echo $! >"$state/pids/beat.pid"
fi
if ! running flower; then
  nohup "$py" -m celery -A worker.celery_app flower --conf=deploy/flowerconfig.py \
    >"$state/logs/flower.log" 2>&1 &
  echo $! >"$state/pids/flower.pid"
fi

for _ in $(seq 1 150); do
  if curl -fsS "http://$api_addr/healthz" >/dev/null 2>&1; then
    echo "nitroconv is up: API http://$api_addr (docs /v1/docs), Flower http://${NITROCONV_FLOWER_ADDR:-127.0.0.1:5555}"
    echo "admin: ${NITROCONV_ADMIN_EMAIL:-admin@nitroconv.local} (password in $state/admin_password unless set)"
    echo "boot check of converted EIFs under QEMU: ${NITROCONV_BOOT_CHECK:-on where the emulator is built (make setup)} (NITROCONV_BOOT_CHECK; workers started earlier keep theirs)"
    exit 0
  fi
  sleep 0.2
done
echo "the API did not become healthy; see $state/logs/api.log" >&2
exit 1
