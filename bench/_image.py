"""The benchmark's input images, built once under the state dir without Docker and pushed with RegistryClient.

`python` is Debian bookworm minbase + python3 (debootstrap) as two gzip layers (the OS, then the Python
stdlib and a small app), about 330 MB unpacked. `python-1g` is the same two layers plus a third of
incompressible files generated from a fixed seed, about 1 GiB unpacked.

Why not `docker import` + `docker push`: that would load the image into the very engine whose pull we
time (it must start without the image's layers), import makes one layer with a fresh, time-dependent
digest on every run, and the converter's whole point is that images are made and read without Docker.
Here the layers are byte-identical on every rerun, so a rerun only HEADs the registry.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from common.registry.client import RegistryClient
from common.registry.digest import Digest
from common.registry.reference import parse_reference

# Bump when a recipe changes: cached layers of another version are rebuilt.
RECIPE_VERSION = 1
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# minbase + python3 alone is 245 MB; pip and a few common dependencies make it the ~330 MB Python app
# image the figure is about (a numpy/requests/yaml service), all from the Debian archive.
DEBOOTSTRAP_ARGS = ("--variant=minbase",
                    "--include=python3,python3-pip,python3-venv,python3-numpy,python3-requests,python3-yaml")
# The second layer: what a `COPY`/`RUN pip install` layer of a Python app would roughly hold.
APP_LAYER_PREFIXES = ("usr/lib/python3.11", "usr/lib/python3", "app")
# Left out of the layers, as image builders do: mount points' contents and debootstrap's own state.
EXCLUDED_CONTENT = ("dev", "proc", "sys")
FIXED_MTIME = 1_700_000_000
RANDOM_SEED = "nitroconv-bench-1g"
# 4 large files (a single-file-in-memory bug shows at once) and many small ones: 704 MiB in all.
RANDOM_FILES = (128 << 20,) * 4 + (1 << 20,) * 192

APP_MAIN = b'import sys\nprint("hello from", sys.version.split()[0])\n'
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CHUNK = 1 << 20

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Layer:
    path: Path
    digest: str  # of the gzip blob
    size: int  # gzip bytes
    diff_id: str  # of the uncompressed tar
    tar_bytes: int
    content_bytes: int  # regular-file bytes (hard links counted once) plus symlink targets
    entries: int


@dataclass(frozen=True)
class BenchImage:
    repository: str
    tag: str
    layers: tuple[Layer, ...]
    config: bytes
    manifest: bytes

    @property
    def content_bytes(self) -> int:
        return sum(layer.content_bytes for layer in self.layers)

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def entries(self) -> int:
        return sum(layer.entries for layer in self.layers)

    @property
    def diff_ids(self) -> tuple[str, ...]:
        return tuple(layer.diff_id for layer in self.layers)


def debian_mirror(sources: tuple[Path, ...] = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
                  ) -> str:
    """The Debian archive this machine's apt uses (deb822 `.sources` or one-line `.list`), else deb.debian.org."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files.extend(sorted(p for p in source.iterdir() if p.suffix in (".list", ".sources")))
        elif source.is_file():
            files.append(source)
    for path in files:
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, flags=re.M))
                if "deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split():
                    for uri in fields.get("URIs", "").split():
                        if uri.rstrip("/").endswith("/debian"):
                            return uri.rstrip("/")
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m and m.group(2) == SUITE and m.group(1).rstrip("/").endswith("/debian"):
                    return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


def ensure_rootfs(cache: Path, log: Log) -> Path:
    """The debootstrap'd rootfs under `cache`, made once (a few minutes of downloads) and reused."""
    rootfs, marker = cache / "rootfs", cache / "rootfs.args"
    recipe = " ".join((*DEBOOTSTRAP_ARGS, SUITE))
    if rootfs.is_dir() and marker.is_file() and marker.read_text() == recipe:
        return rootfs
    partial = cache / "rootfs.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror()
    log(f"debootstrap {recipe} from {mirror} (a few minutes, once; cached in {rootfs})")
    with (cache / "debootstrap.log").open("wb") as out:
        subprocess.run(["debootstrap", *DEBOOTSTRAP_ARGS, SUITE, str(partial), mirror],
                       stdout=out, stderr=subprocess.STDOUT, check=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    marker.unlink(missing_ok=True)
    partial.rename(rootfs)
    marker.write_text(recipe)
    return rootfs


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class _HashingSink:
    """A write-only file that hashes and counts what passes through to `out`."""

    def __init__(self, out: _Writable) -> None:
        self.out, self.sha, self.count = out, hashlib.sha256(), 0

    def write(self, data: bytes, /) -> int:
        self.sha.update(data)
        self.count += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def _write_gzip_layer(dest: Path, produce: Callable[[_HashingSink], None], level: int,
                      content_bytes: int, entries: int) -> Layer:
    """Stream a tar from `produce` through gzip (mtime 0, no name: reproducible) into `dest`, then record it."""
    tmp = dest.with_suffix(".part")
    try:
        with tmp.open("wb") as f:
            blob = _HashingSink(f)
            with gzip.GzipFile(fileobj=blob, mode="wb", compresslevel=level, mtime=0) as gz:
                tar = _HashingSink(gz)
                produce(tar)
        tmp.rename(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    layer = Layer(dest, f"sha256:{blob.sha.hexdigest()}", blob.count, f"sha256:{tar.sha.hexdigest()}", tar.count,
                  content_bytes, entries)
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(layer).items()}
    dest.with_suffix(".json").write_text(json.dumps({"recipe": RECIPE_VERSION, **meta}, indent=1))
    return layer


def _cached_layer(dest: Path) -> Layer | None:
    meta_path = dest.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if meta.pop("recipe", None) != RECIPE_VERSION or not dest.is_file() or dest.stat().st_size != meta["size"]:
        return None
    meta["path"] = dest
    return Layer(**meta)


def _walk(rootfs: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every path under `rootfs` (relative, sorted, parents first) with its lstat, skipping excluded contents."""
    def visit(rel: str) -> Iterator[tuple[str, os.stat_result]]:
        for name in sorted(os.listdir(rootfs / rel if rel else rootfs)):
            child = f"{rel}/{name}" if rel else name
            if child == "debootstrap":
                continue
            st = os.lstat(rootfs / child)
            yield child, st
            if stat.S_ISDIR(st.st_mode) and child not in EXCLUDED_CONTENT:
                yield from visit(child)
    yield from visit("")


def _in_app_layer(rel: str) -> bool:
    return any(rel == p or rel.startswith(p + "/") for p in APP_LAYER_PREFIXES)


def _rootfs_layer(rootfs: Path, dest: Path, paths: list[str], stats: list[os.stat_result], log: Log) -> Layer:
    """GNU tar of exactly `paths` (no recursion) in that order: hard links, devices and xattr-free metadata kept."""
    seen: set[tuple[int, int]] = set()
    content = 0
    for rel, st in zip(paths, stats, strict=True):
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            content += st.st_size
        elif stat.S_ISLNK(st.st_mode):
            content += len(os.readlink(rootfs / rel))
    listing = dest.with_suffix(".list")
    listing.write_bytes(b"".join(os.fsencode(p) + b"\0" for p in paths))
    log(f"  tar+gzip {len(paths)} entries, {content / 1e6:.0f} MB -> {dest.name}")

    def produce(sink: _HashingSink) -> None:
        proc = subprocess.Popen(
            ["tar", "--create", "--file=-", "--format=gnu", "--numeric-owner", f"--directory={rootfs}",
             "--no-recursion", "--null", "--verbatim-files-from", f"--files-from={listing}"],
            stdout=subprocess.PIPE)
        assert proc.stdout is not None
        while chunk := proc.stdout.read(_CHUNK):
            sink.write(chunk)
        if proc.wait() != 0:
            raise RuntimeError(f"tar of {rootfs} failed with status {proc.returncode}")

    try:
        return _write_gzip_layer(dest, produce, 6, content, len(paths))
    finally:
        listing.unlink(missing_ok=True)


def _image(repository: str, tag: str, layers: tuple[Layer, ...], history: list[str]) -> BenchImage:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2025-05-20T00:00:00Z",
        "config": {"Env": [PATH_ENV, "LANG=C.UTF-8"], "Cmd": ["python3", "/app/main.py"], "WorkingDir": "/app"},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": "2025-05-20T00:00:00Z", "created_by": h} for h in history],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": len(config_bytes), "digest": str(Digest.of(config_bytes))},
        "layers": [{"mediaType": DOCKER_LAYER_GZIP, "size": layer.size, "digest": layer.digest} for layer in layers],
    }
    return BenchImage(repository, tag, layers, config_bytes, json.dumps(manifest, indent=3).encode())


def python_image(cache: Path, log: Log) -> BenchImage:
    """Debian bookworm minbase + python3, ~330 MB unpacked, as an OS layer and an app layer."""
    base_path, app_path = cache / "python-base.tar.gz", cache / "python-app.tar.gz"
    base, app = _cached_layer(base_path), _cached_layer(app_path)
    if base is None or app is None:
        rootfs = ensure_rootfs(cache, log)
        (rootfs / "app").mkdir(exist_ok=True)
        (rootfs / "app/main.py").write_bytes(APP_MAIN)
        os.utime(rootfs / "app/main.py", (FIXED_MTIME, FIXED_MTIME))
        os.utime(rootfs / "app", (FIXED_MTIME, FIXED_MTIME))
        log("building the python image layers (once)")
        walked = list(_walk(rootfs))
        lower = [(p, st) for p, st in walked if not _in_app_layer(p)]
        upper = [(p, st) for p, st in walked if _in_app_layer(p)]
        # The app layer names its parent directories too, as a Dockerfile layer's tar does.
        parents = sorted({"/".join(p.split("/")[:i]) for p, _ in upper for i in range(1, p.count("/") + 1)}
                         - {p for p, _ in upper})
        upper = [(p, os.lstat(rootfs / p)) for p in parents] + upper
        base = _rootfs_layer(rootfs, base_path, [p for p, _ in lower], [s for _, s in lower], log)
        app = _rootfs_layer(rootfs, app_path, [p for p, _ in upper], [s for _, s in upper], log)
    return _image("bench/python", SUITE, (base, app), [
        f"debootstrap {' '.join(DEBOOTSTRAP_ARGS)} {SUITE} (minus {', '.join(APP_LAYER_PREFIXES)})",
        f"COPY {', '.join(APP_LAYER_PREFIXES)}",
    ])


class _RandomFile:
    """`size` bytes of a seeded PRNG stream: incompressible, yet the same on every run and machine."""

    def __init__(self, rng: random.Random, size: int) -> None:
        self._rng, self._left = rng, size

    def read(self, n: int = -1, /) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        self._left -= n
        return self._rng.randbytes(n)


def big_image(cache: Path, base: BenchImage, log: Log) -> BenchImage:
    """`base` plus a layer of seeded random files, ~1 GiB unpacked in all."""
    path = cache / "python-1g-data.tar.gz"
    data = _cached_layer(path)
    if data is None:
        log(f"building the 1 GiB image's random layer ({sum(RANDOM_FILES) >> 20} MiB, once)")
        rng = random.Random(RANDOM_SEED)

        def produce(sink: _HashingSink) -> None:
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.GNU_FORMAT,  # type: ignore[call-overload]
                              copybufsize=_CHUNK) as tar:
                tar.addfile(_tarinfo("data", tarfile.DIRTYPE, 0o755, 0))
                for i, size in enumerate(RANDOM_FILES):
                    tar.addfile(_tarinfo(f"data/blob-{i:03d}.bin", tarfile.REGTYPE, 0o644, size),
                                _RandomFile(rng, size))

        # Random bytes do not compress: at any level deflate falls back to stored blocks, so level 0 makes
        # the same kind of stream without minutes of futile match searching.
        data = _write_gzip_layer(path, produce, 0, sum(RANDOM_FILES), len(RANDOM_FILES) + 1)
    return _image("bench/python-1g", SUITE, (*base.layers, data), [
        "debootstrap (see bench/python)", "COPY app", f"COPY data ({len(RANDOM_FILES)} random files)",
    ])


def _tarinfo(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, FIXED_MTIME
    return info


def push(image: BenchImage, registry: str) -> str:
    """Push `image` to `registry` over plain HTTP (blobs it has are skipped); returns the manifest digest."""
    ref = parse_reference(f"{registry}/{image.repository}:{image.tag}")
    with RegistryClient.for_reference(ref, insecure=True) as client:
        for layer in image.layers:
            client.upload_blob(ref.repository, Digest.parse(layer.digest), layer.size, _opener(layer.path))
        client.upload_blob(ref.repository, Digest.of(image.config), len(image.config),
                           lambda: io.BytesIO(image.config))
        return str(client.put_manifest(ref.repository, image.tag, DOCKER_MANIFEST, image.manifest))


def _opener(path: Path) -> Callable[[], BinaryIO]:
    return lambda: path.open("rb")
