"""`make bench`: runs every benchmark module in bench/ (each `bench/NAME.py` with a `main()`), one child each.

Modules whose name starts with `_` are helpers, not benchmarks. Each benchmark runs in its own process,
so one's memory, threads or crash do not colour another's figures, and its `main()` parses an empty
command line (its defaults). Figures go to stdout as the modules print them.

    .venv/bin/python bench/run.py [NAME ...]     (default: all, in name order)
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import _machine  # bench/ is this script's directory, so first on sys.path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def benchmarks() -> list[str]:
    """Names of the benchmark modules present, in name order."""
    return sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_") and p.stem != "run")


def run_one(name: str) -> int:
    """In this (child) process: import bench/NAME.py and return its main()'s status."""
    sys.path[:0] = [str(REPO), str(BENCH)]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"bench/{name}.py cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    main = getattr(module, "main", None)
    if not callable(main):
        raise SystemExit(f"bench/{name}.py has no main()")
    sys.argv = [str(BENCH / f"{name}.py")]
    status = main()
    return status if isinstance(status, int) else 0


def _run_child(argv: list[str]) -> int:
    """Run a benchmark to its end. A Ctrl-C reaches it too (same process group); unlike subprocess.run, which
    would SIGKILL it a quarter second later, wait while it stops the services it started, then stop."""
    child = subprocess.Popen(argv, cwd=REPO)
    try:
        return child.wait()
    except KeyboardInterrupt:
        try:
            child.wait(timeout=120)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            child.kill()
            child.wait()
        print(f"interrupted; {Path(argv[-1]).name if argv else 'the benchmark'} exited {child.returncode}",
              file=sys.stderr)
        raise SystemExit(130) from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.one:
        return run_one(args.one)

    present = benchmarks()
    unknown = [n for n in args.names if n not in present]
    if unknown:
        parser.error(f"no benchmark {', '.join(unknown)}; present: {', '.join(present)}")
    print(_machine.measure(Path(os.environ.get("NITROCONV_STATE_DIR") or REPO / ".state")).line() + "\n", flush=True)
    failed: list[str] = []
    for name in args.names or present:
        print(f"== bench/{name}.py", flush=True)
        start = time.monotonic()
        status = _run_child([sys.executable, __file__, "--one", name])
        print(f"== bench/{name}.py: exit {status} after {time.monotonic() - start:.0f}s\n", flush=True)
        if status != 0:
            failed.append(name)
    if failed:
        print(f"benchmarks that did not finish cleanly: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
