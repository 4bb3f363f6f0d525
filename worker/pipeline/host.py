"""What one worker host brings to every conversion, built once from `Settings` (the CLI overrides its flags)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from common.enclave.shim import DAEMONS
from common.enclave.signing import EifSigner, load_signer
from common.errors import InvalidBlobs, InvalidSigningMaterial
from common.image.layers import Limits
from common.registry.blobcache import DEFAULT_MAX_BYTES, BlobStore
from common.registry.hostpolicy import HostPolicy
from common.settings import Settings
from common.util.compression import Compression
from worker.pipeline.emulatorboot import BootCheckPlan

BLOB_FILES = ("bzImage", "cmdline", "init", "nsm.ko")
RUNTIME_FILES = ("shim", "run", *DAEMONS, "netd", "egressd", "egress")
# The kernel's initramfs unpacker drops names of PATH_MAX (4096 with the NUL) or more, and the app
# ramdisk prefixes every image path with "rootfs/".
DEFAULT_LIMITS = Limits(max_path_bytes=4096 - 1 - len("rootfs/"))


@dataclass(frozen=True)
class ConversionHost:
    """The enclave blobs and runtime binaries a host builds with, its blob cache, the registries it may reach,
    its signing identity and CA bundle, the limits on an input image, the output's base and compression, and
    the boot check. The same for every conversion the host runs; what differs per request is the `ConvertSpec`.
    """

    blobs_dir: Path  # bzImage, cmdline, init, nsm.ko (`make blobs`)
    runtime_dir: Path  # the exec shim and the launcher (`make runtime`)
    cache_dir: Path  # blobs/ (the blob cache) and conversions/ (the reuse cache's records)
    # Registries reachable over plain HTTP or on a private address (the rest: HTTPS on a public address).
    insecure_registries: frozenset[str] = frozenset()
    # PEM paths, both or neither: the EIF gets a signature section and PCR8.
    signing_key: Path | None = None
    signing_cert: Path | None = None
    # PEM bundle appended to an image's trust store when a request asks for add_ccm_ca_certificates.
    ca_bundle: Path | None = None
    limits: Limits = DEFAULT_LIMITS
    # The blob cache is trimmed, least recently used first, beyond this many bytes (0: never).
    cache_max_bytes: int = DEFAULT_MAX_BYTES
    # A registry reference the output is layered on (e.g. an image with nitro-cli); empty for none.
    output_base: str = ""
    output_compression: Compression = Compression.GZIP
    # Boot every EIF before anything is pushed; None: no boot check.
    boot_check: BootCheckPlan | None = None
    # Without a boot check, upload the output layer while it is compressed (worker.pipeline.streamupload).
    stream_push: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> ConversionHost:
        return cls(
            blobs_dir=settings.blobs_dir,
            runtime_dir=settings.runtime_dir,
            cache_dir=settings.state_dir / "cache",
            insecure_registries=settings.insecure_registries,
            signing_key=settings.signing_key,
            signing_cert=settings.signing_cert,
            ca_bundle=settings.ca_bundle,
            limits=replace(DEFAULT_LIMITS, max_total_bytes=settings.max_image_bytes),
            cache_max_bytes=settings.cache_max_bytes,
            output_base=settings.output_base_image,
            output_compression=settings.output_compression,
            boot_check=BootCheckPlan.from_settings(settings) if settings.boot_check else None,
        )

    @property
    def policy(self) -> HostPolicy:
        """Which registries may be reached, and how (the whole list: a token realm on another listed host too)."""
        return HostPolicy.allowing(self.insecure_registries)

    def blob_store(self) -> BlobStore:
        return BlobStore(self.cache_dir / "blobs", max_bytes=self.cache_max_bytes)

    def check_blobs(self) -> None:
        missing = [name for name in BLOB_FILES if not (self.blobs_dir / name).is_file()]
        if missing:
            raise InvalidBlobs(f"blobs dir {self.blobs_dir} lacks {', '.join(missing)} (run `make blobs`)",
                               details={"missing": missing})

    def shim(self) -> Path:
        shim = self.runtime_dir / "shim"
        if not shim.is_file():
            raise InvalidBlobs(f"runtime dir {self.runtime_dir} lacks the exec shim `shim` (run `make runtime`)",
                               details={"missing": ["shim"], "runtime_dir": str(self.runtime_dir)})
        return shim

    def launcher(self) -> bytes:
        """The output image's /enclave/run (worker/runtime/launcher.c), built by `make runtime`."""
        try:
            return (self.runtime_dir / "run").read_bytes()
        except FileNotFoundError:
            raise InvalidBlobs(f"runtime dir {self.runtime_dir} lacks the launcher `run` (run `make runtime`)",
                               details={"missing": ["run"], "runtime_dir": str(self.runtime_dir)}) from None

    def runtime_file(self, name: str) -> Path:
        path = self.runtime_dir / name
        if not path.is_file():
            raise InvalidBlobs(f"runtime dir {self.runtime_dir} lacks `{name}` (run `make runtime`)",
                               details={"missing": [name], "runtime_dir": str(self.runtime_dir)})
        return path

    def signer(self) -> EifSigner | None:
        """The signing identity, loaded and checked now: a certificate can expire while the host runs."""
        if self.signing_key is None and self.signing_cert is None:
            return None
        if self.signing_key is None or self.signing_cert is None:
            raise InvalidSigningMaterial("a signing key and a signing certificate must be given together")
        return load_signer(self.signing_key, self.signing_cert)
