"""`python -m worker [celery worker options]`: the conversion worker, as `celery -A worker.celery_app worker` runs it.

The same `worker` command, options and exit status, without the `celery` command group around it: that group
imports every subcommand before it parses anything (`amqp`'s interactive shell pulls in prompt_toolkit, and the
installed plugins Flower with Tornado), ~23 MiB a worker's main process would carry, and share with its pool
child, for commands it never runs (bench/README.md, figure 3). `celery -A worker.celery_app worker …` still works;
the deploy files use this.
"""
from __future__ import annotations

import sys

from celery.bin.base import CLIContext
from celery.bin.worker import worker

from worker.celery_app import app


def main(argv: list[str] | None = None) -> int:
    # What the `celery` group would put in the context for `-A worker.celery_app`; the worker command needs no more.
    context = CLIContext(app=app, no_color=None, workdir=None)
    return worker.main(args=sys.argv[1:] if argv is None else argv, obj=context, prog_name="python -m worker")


if __name__ == "__main__":
    raise SystemExit(main())
