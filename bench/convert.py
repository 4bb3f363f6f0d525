"""Conversion figures: `nitroconv convert-local` against `docker pull` + `create` + `export`, and peak RSS at 1 GiB.

In one run, on a Debian python image of 355 MB in the loopback registry (_image.py):
  - convert-local with a cold cache (a fresh NITROCONV_STATE_DIR), then again with that warm cache (the
    conversion cache answers), and again with --no-reuse (warm blob cache, the whole conversion redone);
  - the same image through the Docker engine (pull, create, export streamed and discarded) after the
    engine was emptied of it, with the ratio conversion / Docker (target: at most 0.25);
  - the floor: the input layers fetched, sha256'd, gunzipped and sha256'd in one thread (`read_floor`), with
    the ratio conversion / floor (target: at most 2);
  - convert-local of a ~1 GiB variant: wall time and the child's peak RSS (target: below 300 MiB).
Each conversion is a child process; its wall time and `ru_maxrss` come from wait4(). The conversion
runs first, so whatever the page cache holds of the registry's blobs favours Docker, not us.
Figures, not tests: the exit status is 0 whether or not a target is met.

    .venv/bin/python bench/convert.py [--repeat N] [--skip-1g] [--json FILE] [--profile FILE] [--shared-engine]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import _image  # noqa: E402

MIB = 1 << 20
RATIO_TARGET = 0.25
RSS_TARGET_MIB = 150
# Cold conversion against the cost of reading its input once (`read_floor`).
FLOOR_TARGET = 2.0
OUTPUT_REPOSITORY = "bench/python-enclave"


def _log(message: str) -> None:
    print(f"[bench/convert] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ChildRun:
    seconds: float
    max_rss_mib: float
    status: int
    stderr_tail: str
    # user + system CPU of the child and its threads: the work done, much less sensitive than the wall
    # time to what else the machine runs.
    cpu_seconds: float = 0.0


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
class FloorRun:
    """One pass over the input layers as the converter gets them: see `read_floor`."""

    seconds: float
    cpu_seconds: float  # of the thread that did it (the registry's own CPU is not in it)
    compressed_bytes: int
    tar_bytes: int


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
    # The blob cache warm but the conversion cache bypassed (--no-reuse): the converter's own work.
    rebuild: list[ChildRun] = field(default_factory=list)
    docker: list[DockerRun] = field(default_factory=list)
    floor: list[FloorRun] = field(default_factory=list)
    big: ChildRun | None = None
    profile: list[tuple[str, float]] = field(default_factory=list)
    py_spy: list[tuple[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _state_root() -> Path:
    return Path(os.environ.get("NITROCONV_STATE_DIR") or REPO / ".state")


def _mem_size_mib(content_bytes: int) -> int:
    """A --mem-size the converter accepts: 4x an EIF that is roughly the content plus kernel and headers."""
    need = 4 * (content_bytes + 64 * MIB) // MIB
    return -(-need // 512) * 512


def run_convert(registry: str, image: _image.BenchImage, state_dir: Path, profile: Path | None = None,
                extra: tuple[str, ...] = (), py_spy: Path | None = None) -> ChildRun:
    """One `nitroconv convert-local` as a child with `state_dir` as its state (and so its blob cache).

    The output goes to a repository named after `state_dir`: a cold run uploads its layer like a first
    conversion into a user's repository would, and the warm rerun finds it there, like a resubmission.
    With `profile`, the child runs under cProfile and writes its stats there (slower; not a timing); with
    `py_spy`, under `py-spy record` (all threads, raw collapsed stacks), a sampling profile.
    """
    blobs = os.environ.get("NITROCONV_BLOBS_DIR") or str(_state_root() / "blobs")
    runtime = os.environ.get("NITROCONV_RUNTIME_DIR") or str(_state_root() / "runtime")
    env = {**os.environ, "NITROCONV_STATE_DIR": str(state_dir), "NITROCONV_BLOBS_DIR": blobs,
           "NITROCONV_RUNTIME_DIR": runtime}
    scratch = state_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    argv = [str(Path(sys.executable).parent / "nitroconv"), "convert-local",
            "--input", f"{registry}/{image.repository}:{image.tag}",
            "--output", f"{registry}/{OUTPUT_REPOSITORY}-{state_dir.name}:{image.repository.rsplit('/', 1)[1]}",
            "--insecure-registry", registry, "--cpu-count", "2",
            "--mem-size", str(_mem_size_mib(image.content_bytes)), "--scratch", str(scratch), *extra]
    if profile is not None:
        argv = [sys.executable, "-m", "cProfile", "-o", str(profile), *argv]
    if py_spy is not None:
        argv = [str(Path(sys.executable).parent / "py-spy"), "record", "--output", str(py_spy), "--format", "raw",
                "--rate", "200", "--threads", "--nonblocking", "--", *argv]
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
    return ChildRun(seconds, usage.ru_maxrss / 1024, proc.returncode, tail, usage.ru_utime + usage.ru_stime)


class _Hashing:
    """The HTTP response body as a file for the gzip reader, sha256'd as it is read (the blob digest)."""

    def __init__(self, raw: object) -> None:
        import hashlib

        self._raw, self.sha, self.count = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._raw.read(size, decode_content=False)  # type: ignore[attr-defined]
        self.sha.update(data)
        self.count += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        memoryview(buffer)[:len(data)] = data
        return len(data)


def read_floor(registry: str, image: _image.BenchImage) -> FloorRun:
    """What reading the input costs at the least: for each layer in order, one GET of its blob from the registry,
    its bytes sha256'd (the blob digest) and gunzipped by ISA-L (`isal.igzip`, the converter's decompressor),
    the tar sha256'd (the DiffID), both digests checked; 1 MiB reads, in one thread, nothing written anywhere.
    The converter does all of this too (and the rest of the conversion besides)."""
    import hashlib

    import requests
    from isal import igzip

    start, cpu = time.perf_counter(), time.thread_time()
    compressed = tar = 0
    with requests.Session() as session:
        for layer in image.layers:
            url = f"http://{registry}/v2/{image.repository}/blobs/{layer.digest}"
            with session.get(url, stream=True, timeout=60) as resp:
                resp.raise_for_status()
                body = _Hashing(resp.raw)
                diff = hashlib.sha256()
                with igzip.GzipFile(fileobj=body, mode="rb") as gz:
                    while data := gz.read(MIB):
                        diff.update(data)
                        tar += len(data)
                while body.read(MIB):  # anything after the gzip member is part of the blob digest too
                    pass
            if f"sha256:{body.sha.hexdigest()}" != layer.digest or f"sha256:{diff.hexdigest()}" != layer.diff_id:
                raise RuntimeError(f"layer {layer.digest} read back with other digests")
            compressed += body.count
    return FloorRun(time.perf_counter() - start, time.thread_time() - cpu, compressed, tar)


@contextmanager
def private_engine(root: Path) -> Iterator[str]:
    """A dockerd of our own, flagged like deploy/services.sh's (vfs, no networking), with its own data root.

    It starts empty, and no other job on the machine can restart it or share layers with it mid-run;
    its data root is removed afterwards. Yields its DOCKER_HOST.
    """
    import docker

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    host = f"unix://{root}/docker.sock"
    argv = [shutil.which("dockerd") or "dockerd", "--storage-driver=vfs", "--iptables=false", "--ip6tables=false",
            "--bridge=none", f"--data-root={root}/data", f"--exec-root={root}/exec",
            f"--pidfile={root}/dockerd.pid", f"--host={host}"]
    with (root / "dockerd.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                docker.DockerClient(base_url=host, timeout=5).ping()
                break
            except docker.errors.DockerException:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dockerd did not start; see {root}/dockerd.log") from None
                time.sleep(0.5)
        yield host
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root / "data", ignore_errors=True)
        shutil.rmtree(root / "exec", ignore_errors=True)


class DockerBench:
    """The engine side, through the docker SDK (the project's interface to an engine)."""

    def __init__(self, host: str | None) -> None:
        import docker

        self.client = (docker.DockerClient(base_url=host, timeout=1800) if host is not None
                       else docker.from_env(timeout=1800))
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


# The pipeline's top-level steps, as (label, file suffix, function) for the profile breakdown.
_STEPS = (
    ("pull: fetch + verify + apply layers", "worker/pipeline/pull.py", "pull"),
    ("build: ramdisks + EIF + PCRs (+ the layer)", "worker/pipeline/build.py", "build_eif"),
    ("measure: the EIF's layout as written", "common/enclave/", "check_written"),
    ("output layer read back (a signed EIF)", "worker/pipeline/outputimage.py", "write_layer"),
    ("push: upload", "worker/pipeline/push.py", "push"),
)


def profile_breakdown(path: Path) -> list[tuple[str, float]]:
    """Cumulative seconds per pipeline step (and the whole convert) from a cProfile dump."""
    import pstats

    raw: dict[tuple[str, int, str], tuple[object, object, float, float, object]] = \
        getattr(pstats.Stats(str(path)), "stats")  # noqa: B009 - not in typeshed's stub
    wanted = (*_STEPS, ("whole conversion", "worker/pipeline/convert.py", "convert"))
    found: list[tuple[str, float]] = []
    for label, suffix, func in wanted:
        seconds = sum(v[3] for (file, _, name), v in raw.items() if name == func and file.endswith(suffix))
        found.append((label, seconds))
    return found


def py_spy_top(path: Path, count: int = 15) -> list[tuple[str, float]]:
    """Seconds per thread and the functions with the most own samples, from `py-spy record --format raw`."""
    import collections

    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        threads[frames[0].partition(": ")[2] or frames[0]] += int(n)
        own[frames[-1]] += int(n)
    rate = 200.0
    return ([(f"thread {name}", n / rate) for name, n in threads.most_common(8)]
            + [(name, n / rate) for name, n in own.most_common(count)])


@contextmanager
def _state_dir(parent: Path) -> Iterator[Path]:
    path = parent / f"run-{secrets.token_hex(4)}"  # also names the output repository: lowercase hex
    path.mkdir(mode=0o700)
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
    state = _state_root()
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

    with ExitStack() as stack:
        host = None if args.shared_engine else stack.enter_context(private_engine(cache / "dockerd"))
        _measure(args, figures, DockerBench(host), image, big, cache)
    for run in [*figures.cold, *figures.warm, *figures.rebuild, *([figures.big] if figures.big else [])]:
        if run.status != 0:
            figures.notes.append(f"a conversion failed (status {run.status}): {run.stderr_tail}")
    return figures


def _measure(args: argparse.Namespace, figures: Figures, engine: DockerBench, image: _image.BenchImage,
             big: _image.BenchImage | None, cache: Path) -> None:
    registry = args.registry
    figures.machine = {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "engine": engine.describe + (" shared" if args.shared_engine else " private"),
                       "registry": registry, "load_before": os.getloadavg()[0]}
    ref = f"{registry}/{image.repository}:{image.tag}"
    runs = cache / "runs"
    runs.mkdir(exist_ok=True)
    for i in range(args.repeat):
        with _state_dir(runs) as run_state:
            _log(f"round {i + 1}/{args.repeat}: convert-local, cold cache")
            figures.cold.append(run_convert(registry, image, run_state))
            _log(f"round {i + 1}/{args.repeat}: the floor: fetch + sha256 + gunzip + sha256 of the input layers")
            figures.floor.append(read_floor(registry, image))
            _log(f"round {i + 1}/{args.repeat}: docker pull + create + export")
            leftovers = engine.evict(ref, image.diff_ids)
            if leftovers:
                figures.notes.append(f"engine images still holding layers of the image: {leftovers}; "
                                     "Docker's pull was partly cached")
            figures.docker.append(engine.run(ref))
            engine.evict(ref, image.diff_ids)
            _log(f"round {i + 1}/{args.repeat}: convert-local, warm cache")
            figures.warm.append(run_convert(registry, image, run_state))
            _log(f"round {i + 1}/{args.repeat}: convert-local, warm blob cache, --no-reuse")
            figures.rebuild.append(run_convert(registry, image, run_state, extra=("--no-reuse",)))
    if big is not None:
        with _state_dir(runs) as run_state:
            _log("convert-local of the 1 GiB image, cold cache")
            figures.big = run_convert(registry, big, run_state)
    if args.profile is not None:
        with _state_dir(runs) as run_state:
            _log(f"convert-local under cProfile, cold cache -> {args.profile}")
            run = run_convert(registry, image, run_state, profile=args.profile)
            if run.status == 0:
                figures.profile = profile_breakdown(args.profile)
    if args.py_spy is not None:
        with _state_dir(runs) as run_state:
            _log(f"convert-local under py-spy, cold cache -> {args.py_spy}")
            run = run_convert(registry, image, run_state, py_spy=args.py_spy)
            if run.status == 0:
                figures.py_spy = py_spy_top(args.py_spy)
    figures.machine["load_after"] = os.getloadavg()[0]


def _verdict(met: bool, runs: list[ChildRun]) -> str:
    if any(r.status != 0 for r in runs):
        return "n/a (the conversion failed)"
    return "MET" if met else "MISSED"


def report(figures: Figures) -> str:
    img, m = figures.image, figures.machine
    assert img is not None
    cold = _median([r.seconds for r in figures.cold])
    warm = _median([r.seconds for r in figures.warm])
    rebuild = _median([r.seconds for r in figures.rebuild])
    docker = _median([r.seconds for r in figures.docker])
    ratio = cold / docker if docker else float("nan")
    floor = _median([f.seconds for f in figures.floor])
    floor_ratio = cold / floor if floor else float("nan")
    n = len(figures.cold)
    lines = [
        f"conversion vs Docker — {m['cpus']} CPUs, Python {m['python']}, {m['engine']}, registry {m['registry']}"
        f" (load {m['load_before']:.1f} → {m['load_after']:.1f}; medians of {n} run{'s' if n > 1 else ''})",
        f"  image {img.reference}: {img.content_bytes / 1e6:.0f} MB unpacked, {img.entries} entries, "
        f"{img.compressed_bytes / 1e6:.0f} MB compressed in {img.layers} layers",
        "",
        f"  {'':44} {'wall s':>8} {'peak RSS MiB':>13} {'CPU s':>7}",
        f"  {'nitroconv convert-local, cold cache':44} {cold:8.1f} "
        f"{_median([r.max_rss_mib for r in figures.cold]):13.0f} {_median([r.cpu_seconds for r in figures.cold]):7.1f}",
        f"  {'nitroconv convert-local, warm cache':44} {warm:8.1f} "
        f"{_median([r.max_rss_mib for r in figures.warm]):13.0f} {_median([r.cpu_seconds for r in figures.warm]):7.1f}",
        f"  {'    warm blob cache, --no-reuse':44} {rebuild:8.1f} "
        f"{_median([r.max_rss_mib for r in figures.rebuild]):13.0f} "
        f"{_median([r.cpu_seconds for r in figures.rebuild]):7.1f}",
        f"  {'docker pull + create + export':44} {docker:8.1f} {'-':>13}",
        f"  {'    pull / create / export':44} "
        f"{_median([d.pull for d in figures.docker]):.1f} / {_median([d.create for d in figures.docker]):.1f} / "
        f"{_median([d.export for d in figures.docker]):.1f}",
        f"  {'ratio cold conversion / docker':44} {ratio:8.2f}   target <= {RATIO_TARGET}: "
        f"{_verdict(ratio <= RATIO_TARGET, figures.cold)}",
        f"  {'floor: read the input once':44} {floor:8.1f} {'-':>13} "
        f"{_median([f.cpu_seconds for f in figures.floor]):7.1f}",
        f"  {'    GET + sha256 + gunzip + sha256, 1 thread':44} "
        f"{_median([f.compressed_bytes for f in figures.floor]) / 1e6:.0f} MB -> "
        f"{_median([f.tar_bytes for f in figures.floor]) / 1e6:.0f} MB",
        f"  {'ratio cold conversion / floor':44} {floor_ratio:8.2f}   target <= {FLOOR_TARGET}: "
        f"{_verdict(floor_ratio <= FLOOR_TARGET, figures.cold)}",
    ]
    if figures.big is not None and figures.image_1g is not None:
        label = f"1 GiB image ({figures.image_1g.content_bytes / 2**30:.2f} GiB), cold cache"
        lines += [
            f"  {label:44} "
            f"{figures.big.seconds:8.1f} {figures.big.max_rss_mib:13.0f} {figures.big.cpu_seconds:7.1f}"
            f"   target < {RSS_TARGET_MIB} MiB: "
            f"{_verdict(figures.big.max_rss_mib < RSS_TARGET_MIB, [figures.big])}",
        ]
    else:
        lines.append("  1 GiB image: skipped (--skip-1g)")
    if figures.profile:
        lines += ["", "  where a cold conversion's time goes (cProfile, cumulative; profiling inflates Python-heavy parts)"]
        lines += [f"    {label:42} {seconds:8.1f}" for label, seconds in figures.profile]
    if figures.py_spy:
        lines += ["", "  where a cold conversion's time goes (py-spy, seconds of samples: per thread, then per function)"]
        lines += [f"    {label[:70]:70} {seconds:6.2f}" for label, seconds in figures.py_spy]
    lines += [f"  note: {note}" for note in figures.notes]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=os.environ.get("NITROCONV_REGISTRY_ADDR", "127.0.0.1:5000"))
    parser.add_argument("--repeat", type=int, default=3, help="rounds of cold/docker/warm; medians are shown")
    parser.add_argument("--skip-1g", action="store_true", help="skip the 1 GiB RSS figure")
    parser.add_argument("--shared-engine", action="store_true",
                        help="time the engine of DOCKER_HOST (emptied of the image) instead of a private dockerd")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="after the figures, convert once more under cProfile, dump to FILE, print a breakdown")
    parser.add_argument("--py-spy", type=Path, metavar="FILE",
                        help="after the figures, convert once more under py-spy (pip install .[bench]), "
                             "raw stacks to FILE, print the top threads and functions")
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
