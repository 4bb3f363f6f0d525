"""Log set-up shared by the API and the workers: JSON or text lines carrying the bound request/build context."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import TextIO

LOG_FORMATS = ("json", "text")
# The fields a log line may carry from its context; anything else is refused so a caller cannot bind a
# credential by accident (values are ids, never request bodies).
CONTEXT_FIELDS = frozenset({"request_id", "build_id", "task_id", "attempt"})
# Structured `extra=` fields a line may carry besides the context (the API's access line).
EXTRA_FIELDS = frozenset({"method", "route", "status", "duration_ms"})
_CONTEXT: ContextVar[Mapping[str, str]] = ContextVar("nitroconv_log_context", default=MappingProxyType({}))
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def bind(**fields: object) -> Token[Mapping[str, str]]:
    """Add `fields` to every log line of this context (thread or task) until `unbind`."""
    unknown = set(fields) - CONTEXT_FIELDS
    if unknown:
        raise ValueError(f"not a log context field: {', '.join(sorted(unknown))}")
    merged = {**_CONTEXT.get(), **{k: str(v) for k, v in fields.items() if v is not None}}
    return _CONTEXT.set(merged)


def unbind(token: Token[Mapping[str, str]]) -> None:
    _CONTEXT.reset(token)


@contextlib.contextmanager
def bound(**fields: object) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def context() -> Mapping[str, str]:
    return _CONTEXT.get()


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record (as attributes), for either formatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message, context fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if (key in CONTEXT_FIELDS or key in EXTRA_FIELDS) and key not in _STANDARD:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Celery's familiar line, plus the context fields as `key=value` at the end."""

    def __init__(self) -> None:
        super().__init__("[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{k}={getattr(record, k)}" for k in sorted(CONTEXT_FIELDS) if hasattr(record, k))
        return f"{text} [{extra}]" if extra else text


def configure(fmt: str, *, level: int | str = logging.INFO, stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one stream handler in `fmt` (json or text)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
