"""Builds the demo's sample image from Debian's busybox-static, without Docker, and pushes it to a registry.

Usage: sample_image.py HOST:PORT REPOSITORY:TAG   (plain HTTP: meant for the local demo registry)
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile

from common.registry.client import RegistryClient
from common.registry.digest import Digest
from common.registry.reference import parse_reference

HELLO = b"""#!/bin/sh
echo "hello from the enclave, $1"
echo "cwd=$(pwd) user=$(id -u) greeting=$GREETING"
"""


def _tar(entries: list[tuple[str, bytes | None, int, str | None]]) -> bytes:
    """(name, data or None for a dir, mode, symlink target) → a deterministic tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode, link in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, 1_700_000_000
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def base_layer() -> bytes:
    busybox = open("/bin/busybox", "rb").read()
    applets = subprocess.run(["/bin/busybox", "--list-full"], capture_output=True, text=True, check=True).stdout
    entries: list[tuple[str, bytes | None, int, str | None]] = [
        (d, None, 0o755, None) for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "tmp")
    ]
    entries.append(("bin/busybox", busybox, 0o755, None))
    for path in sorted(set(applets.split())):
        if path != "bin/busybox" and path.count("/") >= 1:
            entries.append((path, None, 0o777, "/bin/busybox"))
    entries.append(("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644, None))
    entries.append(("etc/group", b"root:x:0:\n", 0o644, None))
    return _tar(entries)


def app_layer() -> bytes:
    return _tar([("app", None, 0o755, None), ("app/hello.sh", HELLO, 0o755, None)])


def main(host: str, name: str) -> None:
    ref = parse_reference(f"{host}/{name}")
    layers = [base_layer(), app_layer()]
    blobs = [gzip.compress(t, mtime=0) for t in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/sh", "/app/hello.sh"],
            "Cmd": ["world"],
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hi"],
            "WorkingDir": "/app",
            "ExposedPorts": {"8080/tcp": {}},
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in layers]},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": str(Digest.of(config_bytes)), "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": str(Digest.of(b)), "size": len(b)} for b in blobs],
    }
    with RegistryClient.for_reference(ref, insecure=True) as client:
        for blob in [*blobs, config_bytes]:
            client.upload_blob(ref.repository, Digest.of(blob), len(blob), lambda b=blob: io.BytesIO(b))
        digest = client.put_manifest(ref.repository, ref.tag or "latest", manifest["mediaType"],
                                     json.dumps(manifest).encode())
    print(f"pushed {ref} ({digest})")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
