"""JSON and text log lines: the bound context, the allowed extras, and what is refused."""
from __future__ import annotations

import io
import json
import logging

import pytest

from common import logs


@pytest.fixture
def captured() -> logging.Logger:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield root
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_logs_json_line_carries_bound_context_and_extras(captured: logging.Logger):
    out = io.StringIO()
    logs.configure("json", stream=out)
    with logs.bound(build_id="b-1"):
        logging.getLogger("x").info("hello %s", "world", extra={"status": 202, "password": "nope"})
    logging.getLogger("x").warning("after")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "hello world" and first["build_id"] == "b-1" and first["status"] == 202
    assert first["level"] == "info" and first["logger"] == "x" and first["ts"].endswith("Z")
    assert "password" not in first  # only the declared extras are emitted
    assert "build_id" not in second  # unbound when the block ended


def test_logs_text_line_appends_context(captured: logging.Logger):
    out = io.StringIO()
    logs.configure("text", stream=out)
    with logs.bound(request_id="r-9"):
        logging.getLogger("y").error("boom")
    assert out.getvalue().rstrip().endswith("boom [request_id=r-9]")


def test_logs_bind_refuses_unknown_fields_and_formats():
    with pytest.raises(ValueError, match="not a log context field: password"):
        logs.bind(password="x")
    with pytest.raises(ValueError, match="log format"):
        logs.configure("xml")
