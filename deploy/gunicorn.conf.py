"""Gunicorn settings for the API (`gunicorn -c deploy/gunicorn.conf.py 'api.app:create_app()'`)."""
from __future__ import annotations

import os
from pathlib import Path

_state = Path(os.environ.get("NITROCONV_STATE_DIR", ".state")).resolve()

bind = os.environ.get("NITROCONV_API_ADDR", "127.0.0.1:8080")
# One process per core (a submission is ~3 ms of Python CPU, so more processes than cores only add
# context switches: bench/api_load.py measured 3 or 4 processes on 2 cores as slower than 2), each with
# threads: `?wait=` holds a request while it polls, and requests wait on Postgres and Redis with the GIL
# released. 4 and 8 threads measured alike; 8 leaves room for held `?wait=` requests.
worker_class = "gthread"
workers = int(os.environ.get("NITROCONV_API_PROCESSES", str(max(2, (os.cpu_count() or 1)))))
threads = int(os.environ.get("NITROCONV_API_THREADS", "8"))
# The workers' heartbeat files on tmpfs: a slow disk (or an overlay filesystem) never stalls a worker.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
timeout = int(os.environ.get("NITROCONV_API_TIMEOUT", "660"))  # above the longest ?wait=
graceful_timeout = 30
keepalive = 5
backlog = 2048
pidfile = str(_state / "pids" / "api.pid")
# No gunicorn access log: the app writes one access line per request itself (route template, status,
# duration, request id; README "Logs"), and a second line per request cost 5% of the API's CPU.
errorlog = str(_state / "logs" / "api.log")
raw_env = [f"PROMETHEUS_MULTIPROC_DIR={_state / 'prometheus'}"]
(_state / "prometheus").mkdir(parents=True, exist_ok=True)


def child_exit(server: object, worker: object) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(getattr(worker, "pid", 0))  # type: ignore[no-untyped-call]


def post_fork(server: object, worker: object) -> None:
    # The app's own lines (JSON with request_id in production) go to their file: --daemon has no stderr.
    from common.logs import configure
    from common.settings import get_settings

    to_stderr = getattr(getattr(server, "cfg", None), "errorlog", None) == "-"  # a container: stdout/stderr
    stream = None if to_stderr else (_state / "logs" / "api-app.log").open("a", buffering=1)
    configure(get_settings().log_format, stream=stream)
