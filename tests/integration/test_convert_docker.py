"""Docker as the oracle: images built by `docker build`, converted, and compared with `docker export`.

One Dockerfile (built once per session) exercises ENTRYPOINT and CMD, ENV, WORKDIR, USER, whiteouts of a
file and of a directory, a directory deleted and recreated, a file that becomes a directory, a multi-stage
`COPY --from`, hard links within a layer and across layers, absolute, relative and dangling symlinks,
setuid/setgid/sticky modes, files owned by 1000:1000, a device node and a FIFO.

With the vfs driver the directory deleted and recreated comes out as `d/.wh.old`; overlay2 would write an
opaque `d/.wh..wh..opq`. The comparison holds either way; test_convert_repro and the layer tests cover
opaque whiteouts. The image is pushed to a local registry, removed from the engine and pulled back, so
`docker export` shows exactly what Docker makes of the registry's bytes, which are what the converter reads.
"""
from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from common.enclave.cpio import iter_cpio
from common.enclave.ramdisk import GENERATED_MTIME
from common.enclave.reader import iter_section_data, read_eif
from common.enclave.shim import DAEMONS, SHIM_PATH
from tests.fixtures.docker_engine import APP_GID, APP_UID
from tests.fixtures.images import PushSession
from tests.fixtures.registries import RunningRegistry
from worker.pipeline.convert import convert
from worker.pipeline.host import ConversionHost
from worker.pipeline.outputimage import LABEL_PREFIX
from worker.pipeline.spec import ConverterOptions, ConvertResult, ConvertSpec, Progress, Workspace

pytestmark = [pytest.mark.integration, pytest.mark.docker]

SESSION_LABEL = "nitroconv-test.session"

DOCKERFILE = """\
FROM {base} AS builder
ARG SESSION
LABEL {label}=$SESSION
RUN mkdir -p /out/bin && echo 'built in stage one' > /out/artifact && chmod 0640 /out/artifact \\
 && ln -s artifact /out/artifact-link && printf '#!/bin/sh\\necho tool\\n' > /out/bin/tool \\
 && chmod 0755 /out/bin/tool

FROM {base}
ARG SESSION
LABEL {label}=$SESSION
ENV GREETING="hello world" PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
RUN mkdir -p /data/sub /gone/deep /d \\
 && echo doomed > /data/doomed && echo keep > /data/keep && echo deep > /gone/deep/file \\
 && echo old > /d/old && echo base > /data/base-for-link && echo was-a-file > /data/retyped
RUN rm /data/doomed && rm -rf /gone && rm -rf /d && mkdir /d && touch /d/new \\
 && rm /data/retyped && mkdir /data/retyped && ln /data/base-for-link /data/cross-layer-link
RUN echo linked > /data/a && ln /data/a /data/b && ln /data/a /data/sub/c \\
 && ln -s /data/a /data/abs-sym && ln -s ../data/keep /etc/rel-sym && ln -s /nowhere /data/dangling \\
 && printf '#!/bin/sh\\nid\\n' > /usr/bin/suid-tool && chmod 4755 /usr/bin/suid-tool \\
 && cp /usr/bin/suid-tool /usr/bin/sgid-tool && chmod 2711 /usr/bin/sgid-tool \\
 && mkdir -m 1777 /data/sticky && mknod /data/null c 1 3 && mkfifo -m 0600 /data/fifo
RUN mkdir -p /home/app && echo mine > /home/app/own && chown -R {uid}:{gid} /home/app && chmod 0600 /home/app/own
COPY --from=builder /out /opt/out
COPY --chown={uid}:{gid} context.txt /home/app/context.txt
WORKDIR /srv/app
USER app
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo \\"$GREETING\\" from $(pwd)"]
"""

# What `docker create` adds to a container (its init layer) when the image lacks it. These are in
# `docker export` but not in the image, so they are allowed only on Docker's side of the comparison.
DOCKER_CREATED = {
    ".dockerenv": "marker file the engine puts in every container",
    "etc/hostname": "empty placeholder the engine bind-mounts over at start",
    "etc/hosts": "empty placeholder the engine bind-mounts over at start",
    "etc/resolv.conf": "empty placeholder the engine bind-mounts over at start",
    "etc/mtab": "symlink to /proc/mounts the engine adds when the image has none",
    "dev": "mount point the engine creates for the container's /dev",
    "dev/console": "placeholder for the console bind mount",
    "dev/pts": "mount point for the container's devpts",
    "dev/shm": "mount point for the container's shm",
    "proc": "mount point the engine creates for procfs",
    "sys": "mount point the engine creates for sysfs",
}
# The enclave's own name files, written by the converter from the network policy (worker/pipeline/etcfiles.py, tested
# there); Docker's side has empty placeholders it bind-mounts over at start. Compared on neither side.
NETWORK_ETC = {"etc/hostname", "etc/hosts", "etc/resolv.conf"}
# What the converter adds to `rootfs/` when the image lacks it: the mount points the enclave init needs,
# as nitro-cli's customer yaml creates them (EIF.md §5.1). Only on the converter's side.
CONVERTER_ADDED = {
    "dev": "init mounts devtmpfs here",
    "proc": "init mounts procfs here",
    "run": "init mounts a tmpfs here",
    "sys": "init mounts sysfs here",
    "tmp": "init mounts a tmpfs here",
    "var": "nitro-cli creates it for the init",
}
# The converter's own directory in `rootfs/`: the exec shim the enclave's /cmd starts (common/enclave/shim.py), the
# daemons it starts (attestd; netd with its netd.conf when ports are published; egressd unless the egress mode is
# `none`) and the measured network policy (common/enclave/network.py).
CONVERTER_OWN = {".nitroconv", ".nitroconv/shim", ".nitroconv/egressd", ".nitroconv/netd", ".nitroconv/netd.conf",
                 ".nitroconv/network.json", *(f".nitroconv/{name}" for name in DAEMONS)}
# Directory mtimes are compared, except where the engine writes into the directory at `docker create`
# (its init layer adds etc/hostname and the like, which bumps the mtime), and for the mount points both
# sides create when the image lacks them (each at its own time; see the comparison).
DIR_MTIME_TOUCHED_BY_DOCKER = {"etc"}


@dataclass(frozen=True)
class Entry:
    """One path of a root filesystem, in terms both `docker export` and the cpio can express."""

    kind: str
    perm: int  # permission bits with setuid, setgid and sticky
    uid: int
    gid: int
    mtime: int
    size: int | None = None  # regular file content, or symlink target length
    sha256: str | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None


GENERATED_DIR = Entry("dir", 0o755, 0, 0, GENERATED_MTIME)


@dataclass(frozen=True)
class Snapshot:
    entries: dict[str, Entry]
    hardlinks: frozenset[frozenset[str]]  # groups of paths that are one inode


_TAR_KINDS = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
              tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}
_MODE_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
               stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def snapshot_of_export(chunks: Iterable[bytes], spool: Path) -> Snapshot:
    """Read `docker export` output: a hard link is a LNKTYPE member naming its twin, which comes first."""
    with spool.open("wb") as out:
        for chunk in chunks:
            out.write(chunk)
    entries: dict[str, Entry] = {}
    twin_of: dict[str, str] = {}
    with tarfile.open(spool, "r:") as tar:
        for member in tar:
            name = _clean(member.name)
            if member.type == tarfile.LNKTYPE:
                first = _clean(member.linkname)
                twin_of[name] = twin_of.get(first, first)
                entries[name] = entries[first]
                continue
            kind = _TAR_KINDS[member.type]
            size = sha = target = rdev = None
            if kind == "file":
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                size, sha = len(data), hashlib.sha256(data).hexdigest()
            elif kind == "symlink":
                target, size = member.linkname, len(member.linkname.encode())
            elif kind in ("char", "block"):
                rdev = (member.devmajor, member.devminor)
            entries[name] = Entry(kind, member.mode & 0o7777, member.uid, member.gid, int(member.mtime), size, sha,
                                  target, rdev)
    groups: dict[str, set[str]] = {}
    for name, first in twin_of.items():
        groups.setdefault(first, {first}).add(name)
    return Snapshot(entries, frozenset(frozenset(g) for g in groups.values()))


def app_ramdisk(eif: Path) -> bytes:
    info = read_eif(eif)
    assert len(info.ramdisks) == 2, "an EIF of nitro-cli's layout has a bootstrap and an app ramdisk"
    return b"".join(iter_section_data(eif, info.ramdisks[1]))


def snapshot_of_app_ramdisk(archive: bytes) -> tuple[Snapshot, dict[str, bytes]]:
    """The `rootfs/` subtree of the app ramdisk, and the other top-level files (`cmd`, `env`).

    Hard links share an inode number; only the first carries the data (later ones have size 0).
    """
    members = list(iter_cpio(io.BytesIO(archive)))
    data_of_ino = {h.ino: d for h, d in members if stat.S_ISREG(h.mode) and h.filesize}
    names_of_ino: dict[int, set[str]] = {}
    entries: dict[str, Entry] = {}
    top: dict[str, bytes] = {}
    for header, data in members:
        name = header.name.decode("utf-8", "surrogateescape")
        if name != "rootfs" and not name.startswith("rootfs/"):
            top[name] = data
            continue
        path = name[len("rootfs/"):] if name != "rootfs" else ""
        kind = _MODE_KINDS[stat.S_IFMT(header.mode)]
        size = sha = target = rdev = None
        if kind == "file":
            content = data_of_ino.get(header.ino, b"")
            size, sha = len(content), hashlib.sha256(content).hexdigest()
            names_of_ino.setdefault(header.ino, set()).add(path)
        elif kind == "symlink":
            target, size = data.decode("utf-8", "surrogateescape"), len(data)
        elif kind in ("char", "block"):
            rdev = (header.rdevmajor, header.rdevminor)
        entries[path] = Entry(kind, header.mode & 0o7777, header.uid, header.gid, header.mtime, size, sha, target,
                              rdev)
    groups = frozenset(frozenset(names) for names in names_of_ino.values() if len(names) > 1)
    return Snapshot(entries, groups), top


def comparable(entry: Entry, *, with_mtime: bool) -> Entry:
    return entry if with_mtime else Entry(entry.kind, entry.perm, entry.uid, entry.gid, 0, entry.size, entry.sha256,
                                          entry.target, entry.rdev)


# --- the image, built, pushed, and pulled back ---------------------------------------------------------------


@dataclass(frozen=True)
class OracleImage:
    ref: str  # registry reference, name:tag
    digest: str  # the manifest digest the registry gave the push
    config: dict  # docker inspect .Config of the pulled image
    session: str


@dataclass(frozen=True)
class Converted:
    result: ConvertResult
    eif: Path


def _drain(stream: Iterable[dict]) -> list[dict]:
    lines = list(stream)
    errors = [line for line in lines if "error" in line or "errorDetail" in line]
    assert not errors, errors
    return lines


def registry_layers(registry: RunningRegistry, image: OracleImage) -> Iterator[bytes]:
    repo = image.ref.partition("/")[2].rpartition(":")[0]
    session = PushSession(registry)
    manifest = session.request("GET", f"/v2/{repo}/manifests/{image.digest}", repo, headers={"Accept": ", ".join([
        "application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.image.manifest.v1+json"])})
    assert manifest.status_code == 200
    for layer in manifest.json()["layers"]:
        blob = session.request("GET", f"/v2/{repo}/blobs/{layer['digest']}", repo)
        assert blob.status_code == 200
        yield blob.content


@pytest.fixture(scope="module")
def oracle_image(docker_engine: docker.DockerClient, docker_base_image: str, registry: RunningRegistry,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[OracleImage]:
    session = uuid.uuid4().hex[:12]
    context = tmp_path_factory.mktemp("oracle-context")
    (context / "Dockerfile").write_text(DOCKERFILE.format(base=docker_base_image, label=SESSION_LABEL,
                                                          uid=APP_UID, gid=APP_GID))
    (context / "context.txt").write_text("from the build context\n")
    repository, tag = f"{registry.host}/oracle/app", session
    ref = f"{repository}:{tag}"
    try:
        # network_mode host: make test's engine runs without a bridge; RUN needs no network anyway.
        docker_engine.images.build(path=str(context), tag=ref, buildargs={"SESSION": session}, network_mode="host",
                                   rm=True, forcerm=True, pull=False)
        pushed = _drain(docker_engine.images.push(repository, tag=tag, stream=True, decode=True))
        digest = next(line["aux"]["Digest"] for line in pushed if "Digest" in line.get("aux", {}))
        # From here on the engine knows the image only as the registry serves it.
        docker_engine.images.remove(ref, force=True)
        pulled = docker_engine.images.pull(repository, tag=tag)
        assert f"{repository}@{digest}" in pulled.attrs["RepoDigests"]
        yield OracleImage(ref, digest, pulled.attrs["Config"], session)
    finally:
        for image in docker_engine.images.list(filters={"label": f"{SESSION_LABEL}={session}"}):
            docker_engine.images.remove(image.id, force=True)


@pytest.fixture(scope="module")
def docker_snapshot(docker_engine: docker.DockerClient, oracle_image: OracleImage,
                    tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    container = docker_engine.containers.create(oracle_image.ref)
    try:
        return snapshot_of_export(container.export(), tmp_path_factory.mktemp("export") / "export.tar")
    finally:
        container.remove(force=True)


def _convert(source: str, output: str, registry: RunningRegistry, blobs: Path, work: Path,
             runtime: Path) -> Converted:
    spec = ConvertSpec(input_ref=source, output_ref=output, input_credentials=None, output_credentials=None,
                       options=ConverterOptions(), cpu_count=2, mem_size_mib=512)
    eif = work / "out.eif"
    host = ConversionHost(blobs_dir=blobs, runtime_dir=runtime, cache_dir=work / "cache",
                          insecure_registries=frozenset({registry.host}))
    result = convert(spec, host, Progress(), Workspace(work / "scratch", eif_out=eif))
    assert not (work / "scratch").exists(), "convert() must remove its scratch dir"
    return Converted(result, eif)


@pytest.fixture(scope="module")
def converted(oracle_image: OracleImage, registry: RunningRegistry, blobs_dir: Path, runtime_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Converted:
    output = f"{registry.host}/oracle/app-enclave:{oracle_image.session}"
    return _convert(oracle_image.ref, output, registry, blobs_dir, tmp_path_factory.mktemp("convert"), runtime_dir)


@pytest.fixture(scope="module")
def converted_snapshot(converted: Converted) -> tuple[Snapshot, dict[str, bytes]]:
    return snapshot_of_app_ramdisk(app_ramdisk(converted.eif))


# --- the comparison ------------------------------------------------------------------------------------------


def test_convert_docker_oracle_image_exercises_every_case(docker_snapshot: Snapshot) -> None:
    """The Dockerfile really produced what the comparison claims to cover (else equality would prove little)."""
    e = docker_snapshot.entries
    assert "data/doomed" not in e and "gone" not in e and "d/old" not in e
    assert e["d/new"].kind == "file" and e["data/retyped"].kind == "dir"
    assert e["opt/out/artifact"].perm == 0o640 and e["opt/out/artifact-link"].target == "artifact"
    assert e["usr/bin/suid-tool"].perm == 0o4755 and e["usr/bin/sgid-tool"].perm == 0o2711
    assert e["data/sticky"].perm == 0o1777
    assert (e["home/app/own"].uid, e["home/app/own"].gid) == (APP_UID, APP_GID)
    assert (e["home/app/context.txt"].uid, e["home/app/context.txt"].gid) == (APP_UID, APP_GID)
    assert e["data/abs-sym"].target == "/data/a" and e["etc/rel-sym"].target == "../data/keep"
    assert e["data/dangling"].target == "/nowhere"
    assert e["data/null"].kind == "char" and e["data/null"].rdev == (1, 3) and e["data/fifo"].kind == "fifo"
    assert e["srv/app"].kind == "dir"
    assert frozenset({"data/a", "data/b", "data/sub/c"}) in docker_snapshot.hardlinks
    # Docker's layer model does not keep a link to a lower layer's file: the new name is a copy.
    assert not any("data/cross-layer-link" in group for group in docker_snapshot.hardlinks)
    assert e["data/cross-layer-link"].sha256 == e["data/base-for-link"].sha256


def test_convert_docker_oracle_layers_carry_whiteouts(oracle_image: OracleImage, registry: RunningRegistry) -> None:
    """The deletions reach the converter as whiteouts in the pushed layers (not, say, as a squashed image)."""
    names = set()
    for layer in registry_layers(registry, oracle_image):
        with tarfile.open(fileobj=io.BytesIO(layer), mode="r:*") as tar:
            names.update(_clean(m.name) for m in tar)
    assert {"data/.wh.doomed", ".wh.gone"} <= names
    assert "d/.wh.old" in names or "d/.wh..wh..opq" in names


def test_convert_docker_rootfs_matches_docker_export(docker_snapshot: Snapshot, converted_snapshot) -> None:
    ours, _ = converted_snapshot
    theirs = docker_snapshot.entries
    # The root: `docker export` has no entry for it, and layers never describe it (no `./` is applied).
    mine = {path: entry for path, entry in ours.entries.items() if path != "" and path not in CONVERTER_OWN}
    assert not set(theirs) & CONVERTER_OWN
    assert all(mine[path].kind == "file" for path in NETWORK_ETC)
    mine = {path: entry for path, entry in mine.items() if path not in NETWORK_ETC}
    theirs = {path: entry for path, entry in theirs.items() if path not in NETWORK_ETC}

    only_docker = set(theirs) - set(mine)
    assert only_docker <= set(DOCKER_CREATED), f"missing from the EIF: {sorted(only_docker - set(DOCKER_CREATED))}"
    only_ours = set(mine) - set(theirs)
    assert only_ours <= set(CONVERTER_ADDED), f"not in the image: {sorted(only_ours - set(CONVERTER_ADDED))}"
    for path in only_ours:
        assert mine[path] == GENERATED_DIR, path

    mismatches = {}
    for path in sorted(set(mine) & set(theirs)):
        with_mtime = mine[path].kind != "dir" or path not in DIR_MTIME_TOUCHED_BY_DOCKER
        if path in DOCKER_CREATED and path in CONVERTER_ADDED and mine[path] == GENERATED_DIR:
            with_mtime = False  # absent from the image, made by both at their own time
        if comparable(mine[path], with_mtime=with_mtime) != comparable(theirs[path], with_mtime=with_mtime):
            mismatches[path] = (mine[path], theirs[path])
    assert not mismatches, "\n".join(f"{p}:\n  eif:    {a}\n  docker: {b}" for p, (a, b) in mismatches.items())
    # A sanity floor: the comparison covered the whole busybox tree, not a handful of paths.
    assert len(set(mine) & set(theirs)) > 250


def test_convert_docker_shim_and_daemons_are_the_runtime_build(converted_snapshot, runtime_dir: Path) -> None:
    ours, _ = converted_snapshot
    assert ours.entries[".nitroconv"] == GENERATED_DIR
    for name in ("shim", *DAEMONS):
        built = (runtime_dir / name).read_bytes()
        assert ours.entries[f".nitroconv/{name}"] == Entry("file", 0o755, 0, 0, GENERATED_MTIME, size=len(built),
                                                           sha256=hashlib.sha256(built).hexdigest())


def test_convert_docker_hardlink_groups_match(docker_snapshot: Snapshot, converted_snapshot) -> None:
    ours, _ = converted_snapshot
    assert ours.hardlinks == docker_snapshot.hardlinks
    assert frozenset({"data/a", "data/b", "data/sub/c"}) in ours.hardlinks


def test_convert_docker_cmd_and_env_match_docker_inspect(oracle_image: OracleImage, converted_snapshot) -> None:
    _, top = converted_snapshot
    assert set(top) == {"cmd", "env"}
    config = oracle_image.config
    argv = [*(config["Entrypoint"] or []), *(config["Cmd"] or [])]
    assert argv == ["/bin/sh", "-c", 'echo "$GREETING" from $(pwd)']
    # The init starts the shim, which applies the image's WORKDIR and USER and then execs ENTRYPOINT + CMD.
    shim = [SHIM_PATH, "--workdir", config["WorkingDir"], "--user", config["User"], "--"]
    assert (config["WorkingDir"], config["User"]) == ("/srv/app", "app")
    assert top["cmd"].decode().split("\n") == [*shim, *argv, ""]
    assert config["Env"][0] == "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    assert top["env"].decode().split("\n") == [*config["Env"], ""]
    assert "GREETING=hello world" in config["Env"]


def test_convert_docker_engine_pulls_output_image_with_same_eif(
    docker_engine: docker.DockerClient, oracle_image: OracleImage, converted: Converted, tmp_path: Path
) -> None:
    result = converted.result
    repository, _, tag = result.output_reference.partition("@")[0].rpartition(":")
    container = None
    image = docker_engine.images.pull(repository, tag=tag)
    try:
        assert f"{repository}@{result.output_digest}" in image.attrs["RepoDigests"]
        labels = image.labels
        m = result.measurements
        assert labels[LABEL_PREFIX + "pcr0"] == m.pcr0 and labels[LABEL_PREFIX + "pcr1"] == m.pcr1
        assert labels[LABEL_PREFIX + "pcr2"] == m.pcr2
        assert labels[LABEL_PREFIX + "input-digest"] == oracle_image.digest
        # The image has no program of its own to run here; create only needs some command.
        container = docker_engine.containers.create(image.id, command=["/enclave/none"])
        files = {}
        for name in ("app.eif", "measurements.json"):
            chunks, _ = container.get_archive(f"/enclave/{name}")
            with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
                files[name] = tar.extractfile(name).read()  # type: ignore[union-attr]
        assert files["app.eif"] == converted.eif.read_bytes()
        assert hashlib.sha256(files["app.eif"]).hexdigest() == result.eif_sha256
        assert json.loads(files["measurements.json"]) == m.to_nitro_cli()
        assert read_eif(io.BytesIO(files["app.eif"])).measurements == m
    finally:
        if container is not None:
            container.remove(force=True)
        docker_engine.images.remove(image.id, force=True)


def test_convert_docker_daemon_source_measures_like_the_registry(
    oracle_image: OracleImage, converted: Converted, registry: RunningRegistry, blobs_dir: Path, runtime_dir: Path,
    tmp_path: Path
) -> None:
    output = f"{registry.host}/oracle/app-enclave:{oracle_image.session}-daemon"
    from_engine = _convert(f"docker-daemon:{oracle_image.ref}", output, registry, blobs_dir, tmp_path, runtime_dir)
    assert from_engine.result.measurements == converted.result.measurements
    # Same app ramdisk byte for byte; only the metadata (which names the source) may differ.
    assert app_ramdisk(from_engine.eif) == app_ramdisk(converted.eif)
