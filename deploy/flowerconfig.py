"""Flower settings (`celery -A worker.celery_app flower --conf=deploy/flowerconfig.py`): auth on, fixed cookie secret."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_state = Path(os.environ.get("NITROCONV_STATE_DIR", ".state")).resolve()
_host, _, _port = os.environ.get("NITROCONV_FLOWER_ADDR", "127.0.0.1:5555").rpartition(":")

address = _host
port = int(_port)
# Flower's auth is off by default and it can revoke tasks and shut workers down: never run it open.
basic_auth = [os.environ["NITROCONV_FLOWER_BASIC_AUTH"]]
# A stable cookie secret (derived, not the key itself) so sessions survive restarts.
_secret = os.environ.get("NITROCONV_SECRET_KEY") or (_state / "secret_key").read_text().strip()
cookie_secret = hashlib.sha256(b"nitroconv flower cookie " + _secret.encode()).hexdigest()
persistent = False  # Postgres is the record; Flower's view is advisory
max_tasks = 10000
purge_offline_workers = 600
url_prefix = ""
