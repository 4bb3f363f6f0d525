"""Conversion figures: `nitroconv convert-local` against `docker pull` + `create` + `export`, and peak RSS at 1 GiB.

In one run, on a ~330 MB Debian python image pushed to the loopback registry (see _image.py):
  - convert-local with a cold cache (a fresh NITROCONV_STATE_DIR), then again with that warm cache;
  - the same image through the Docker engine (pull, create, export streamed and discarded) after the
    engine was emptied of it, with the ratio conversion / Docker (target: below 0.5);
  - convert-local of a ~1 GiB variant: wall time and the child's peak RSS (target: below 300 MiB).
Each conversion is a child process; its wall time and `ru_maxrss` come from wait4(). The conversion
runs first, so whatever the page cache holds of the registry's blobs favours Docker, not us.
Figures, not tests: the exit status is 0 whether or not a target is met.

    .venv/bin/python bench/convert.py [--repeat N] [--skip-1g] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import _image  # noqa: E402

MIB = 1 << 20
RATIO_TARGET = 0.5
RSS_TARGET_MIB = 300
OUTPUT_REPOSITORY = "bench/python-enclave"


def _log(message: str) -> None:
    print(f"[bench/convert] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ChildRun:
    seconds: float
    max_rss_mib: float
    status: int
    stderr_tail: str


@dataclass(frozen=True)
class DockerRun:
    pull: float
    create: float
    export: float
    export_bytes: int

    @property
    def seconds(self) -> float:
        return self.pull + self.create + self.export


@dataclass(frozen=True)
class ImageFigures:
    reference: str
    digest: str
    layers: int
    content_bytes: int
    tar_bytes: int
    compressed_bytes: int
    entries: int


@dataclass
class Figures:
    machine: dict[str, object] = field(default_factory=dict)
    image: ImageFigures | None = None
    image_1g: ImageFigures | None = None
    cold: list[ChildRun] = field(default_factory=list)
    warm: list[ChildRun] = field(default_factory=list)
    docker: list[DockerRun] = field(default_factory=list)
    big: ChildRun | None = None
    notes: list[str] = field(default_factory=list)


def _mem_size_mib(content_bytes: int) -> int:
    """A --mem-size the converter accepts: 4x an EIF that is roughly the content plus kernel and headers."""
    need = 4 * (content_bytes + 64 * MIB) // MIB
    return -(-need // 512) * 512


def run_convert(registry: str, image: _image.BenchImage, state_dir: Path) -> ChildRun:
    """One `nitroconv convert-local` as a child with `state_dir` as its state (and so its blob cache)."""
    env = {**os.environ, "NITROCONV_STATE_DIR": str(state_dir),
           "NITROCONV_BLOBS_DIR": os.environ.get("NITROCONV_BLOBS_DIR", str(REPO / ".state/blobs"))}
    scratch = state_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    argv = [str(Path(sys.executable).parent / "nitroconv"), "convert-local",
            "--input", f"{registry}/{image.repository}:{image.tag}",
            "--output", f"{registry}/{OUTPUT_REPOSITORY}:{image.repository.rsplit('/', 1)[1]}",
            "--insecure-registry", registry, "--cpu-count", "2",
            "--mem-size", str(_mem_size_mib(image.content_bytes)), "--scratch", str(scratch)]
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over every child so far).
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip()[-2000:]
    # Linux reports ru_maxrss in KiB.
    return ChildRun(seconds, usage.ru_maxrss / 1024, proc.returncode, tail)


class DockerBench:
    """The engine side, through the docker SDK (the project's interface to an engine)."""

    def __init__(self) -> None:
        import docker

        self.client = docker.from_env(timeout=1800)
        info = self.client.info()
        self.describe = f"Docker {info.get('ServerVersion')} ({info.get('Driver')} storage)"

    def evict(self, ref: str, diff_ids: tuple[str, ...]) -> list[str]:
        """Remove the image and its containers; returns the engine images still holding any of its layers."""
        import docker.errors

        try:
            image = self.client.images.get(ref)
        except docker.errors.ImageNotFound:
            image = None
        if image is not None:
            for container in self.client.containers.list(all=True, filters={"ancestor": image.id}):
                container.remove(force=True)
            self.client.images.remove(image.id, force=True)
        wanted = set(diff_ids)
        return [",".join(img.tags) or img.short_id for img in self.client.images.list(all=True)
                if wanted & set(img.attrs.get("RootFS", {}).get("Layers") or ())]

    def run(self, ref: str) -> DockerRun:
        """Time pull, create and a full export (streamed, discarded) of `ref`; removes what it made."""
        repository, _, tag = ref.rpartition(":")
        start = time.perf_counter()
        image = self.client.images.pull(repository, tag=tag)
        pulled = time.perf_counter()
        container = self.client.containers.create(image.id)
        created = time.perf_counter()
        try:
            size = 0
            for chunk in container.export(chunk_size=MIB):
                size += len(chunk)
            exported = time.perf_counter()
        finally:
            container.remove(force=True)
        return DockerRun(pulled - start, created - pulled, exported - created, size)


@contextmanager
def _state_dir(parent: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="run-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _image_figures(image: _image.BenchImage, digest: str) -> ImageFigures:
    return ImageFigures(f"{image.repository}:{image.tag}", digest, len(image.layers), image.content_bytes,
                        sum(la.tar_bytes for la in image.layers), image.compressed_bytes, image.entries)


def measure(args: argparse.Namespace) -> Figures:
    figures = Figures()
    state = Path(os.environ.get("NITROCONV_STATE_DIR", REPO / ".state"))
    cache = state / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    registry = args.registry
    subprocess.run([str(REPO / "deploy/registry.sh"), "start"], check=True,
                   env={**os.environ, "NITROCONV_STATE_DIR": str(state), "NITROCONV_REGISTRY_ADDR": registry})

    image = _image.python_image(cache, _log)
    figures.image = _image_figures(image, _image.push(image, registry))
    big = None
    if not args.skip_1g:
        big = _image.big_image(cache, image, _log)
        figures.image_1g = _image_figures(big, _image.push(big, registry))

    engine = DockerBench()
    figures.machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "engine": engine.describe,
                       "registry": registry, "load_before": os.getloadavg()[0]}
    ref = f"{registry}/{image.repository}:{image.tag}"
    runs = cache / "runs"
    runs.mkdir(exist_ok=True)
    for i in range(args.repeat):
        with _state_dir(runs) as run_state:
            _log(f"round {i + 1}/{args.repeat}: convert-local, cold cache")
            figures.cold.append(run_convert(registry, image, run_state))
            _log(f"round {i + 1}/{args.repeat}: docker pull + create + export")
            leftovers = engine.evict(ref, image.diff_ids)
            if leftovers:
                figures.notes.append(f"engine images still holding layers of the image: {leftovers}; "
                                     "Docker's pull was partly cached")
            figures.docker.append(engine.run(ref))
            engine.evict(ref, image.diff_ids)
            _log(f"round {i + 1}/{args.repeat}: convert-local, warm cache")
            figures.warm.append(run_convert(registry, image, run_state))
    if big is not None:
        with _state_dir(runs) as run_state:
            _log("convert-local of the 1 GiB image, cold cache")
            figures.big = run_convert(registry, big, run_state)
    figures.machine["load_after"] = os.getloadavg()[0]
    for run in [*figures.cold, *figures.warm, *([figures.big] if figures.big else [])]:
        if run.status != 0:
            figures.notes.append(f"a conversion failed (status {run.status}): {run.stderr_tail}")
    return figures


def _verdict(met: bool, runs: list[ChildRun]) -> str:
    if any(r.status != 0 for r in runs):
        return "n/a (the conversion failed)"
    return "MET" if met else "MISSED"


def report(figures: Figures) -> str:
    img, m = figures.image, figures.machine
    assert img is not None
    cold = _median([r.seconds for r in figures.cold])
    warm = _median([r.seconds for r in figures.warm])
    docker = _median([r.seconds for r in figures.docker])
    ratio = cold / docker if docker else float("nan")
    n = len(figures.cold)
    lines = [
        f"conversion vs Docker — {m['cpus']} CPUs, Python {m['python']}, {m['engine']}, registry {m['registry']}"
        f" (load {m['load_before']:.1f} → {m['load_after']:.1f}; medians of {n} run{'s' if n > 1 else ''})",
        f"  image {img.reference}: {img.content_bytes / 1e6:.0f} MB unpacked, {img.entries} entries, "
        f"{img.compressed_bytes / 1e6:.0f} MB compressed in {img.layers} layers",
        "",
        f"  {'':44} {'wall s':>8} {'peak RSS MiB':>13}",
        f"  {'nitroconv convert-local, cold cache':44} {cold:8.1f} "
        f"{_median([r.max_rss_mib for r in figures.cold]):13.0f}",
        f"  {'nitroconv convert-local, warm cache':44} {warm:8.1f} "
        f"{_median([r.max_rss_mib for r in figures.warm]):13.0f}",
        f"  {'docker pull + create + export':44} {docker:8.1f} {'-':>13}",
        f"  {'    pull / create / export':44} "
        f"{_median([d.pull for d in figures.docker]):.1f} / {_median([d.create for d in figures.docker]):.1f} / "
        f"{_median([d.export for d in figures.docker]):.1f}",
        f"  {'ratio cold conversion / docker':44} {ratio:8.2f}   target < {RATIO_TARGET}: "
        f"{_verdict(ratio < RATIO_TARGET, figures.cold)}",
    ]
    if figures.big is not None and figures.image_1g is not None:
        label = f"1 GiB image ({figures.image_1g.content_bytes / 2**30:.2f} GiB), cold cache"
        lines += [
            f"  {label:44} "
            f"{figures.big.seconds:8.1f} {figures.big.max_rss_mib:13.0f}   target < {RSS_TARGET_MIB} MiB: "
            f"{_verdict(figures.big.max_rss_mib < RSS_TARGET_MIB, [figures.big])}",
        ]
    else:
        lines.append("  1 GiB image: skipped (--skip-1g)")
    lines += [f"  note: {note}" for note in figures.notes]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=os.environ.get("NITROCONV_REGISTRY_ADDR", "127.0.0.1:5000"))
    parser.add_argument("--repeat", type=int, default=1, help="rounds of cold/docker/warm; medians are shown")
    parser.add_argument("--skip-1g", action="store_true", help="skip the 1 GiB RSS figure")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    import docker.errors

    try:
        figures = measure(args)
    except docker.errors.DockerException as exc:
        print(f"bench/convert: no Docker engine ({exc}); start one with deploy/services.sh --docker",
              file=sys.stderr)
        return 2
    print(report(figures), flush=True)
    if args.json is not None:
        raw = asdict(figures)
        raw["docker"] = [{**asdict(d), "seconds": d.seconds} for d in figures.docker]
        args.json.write_text(json.dumps(raw, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
