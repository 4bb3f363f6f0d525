"""PCR measurements of an EIF (EIF.md §3): PCR0/1/2 over the sections as nitro-cli hashes them, PCR8 over the
signing certificate, and the JSON shapes nitro-cli prints them in."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.enclave.format import SectionType
from common.util.hashpipe import HashPipe

if TYPE_CHECKING:
    from common.enclave.prefix import MeasuredPrefix

# nitro-cli prints `format!("{:?}", Sha384::new())`. With sha2 0.9 (image-format <= 0.5, nitro-cli <= 1.4)
# that is "Sha384 { ... }", the string AWS documents for build-enclave and describe-eif; nitro-cli 1.5's
# sha2 0.10 would print "Sha512_48 { .. }" (EIF.md §6.3). We print the documented one, which is also
# what verifiers written against the AWS docs compare with.
HASH_ALGORITHM = "Sha384 { ... }"

_ZERO_PCR = b"\0" * 48


class PcrHasher:
    """A PCR as nitro-cli computes it: SHA-384 of the streamed content, extended once into a zeroed register."""

    def __init__(self) -> None:
        self._inner = hashlib.sha384()

    def update(self, data: bytes) -> None:
        self._inner.update(data)

    def copy(self) -> PcrHasher:
        twin = PcrHasher()
        twin._inner = self._inner.copy()
        return twin

    def hexdigest(self) -> str:
        """`SHA384(0^48 || SHA384(content))` as 96 lowercase hex digits."""
        return hashlib.sha384(_ZERO_PCR + self._inner.digest()).hexdigest()


def pcr_of(content: bytes) -> str:
    """The PCR value of one blob (what `nitro-cli pcr --input FILE` prints)."""
    hasher = PcrHasher()
    hasher.update(content)
    return hasher.hexdigest()


@dataclass(frozen=True)
class Measurements:
    """PCR0 (kernel, cmdline, all ramdisks), PCR1 (kernel, cmdline, ramdisk 0), PCR2 (ramdisks 1..), PCR8 (cert)."""

    pcr0: str
    pcr1: str
    pcr2: str
    pcr8: str | None = None

    def registers(self) -> dict[str, str]:
        """`{"HashAlgorithm": …, "PCR0": …, …}`: the map nitro-cli prints (sorted keys, PCR8 only when signed)."""
        regs = {"HashAlgorithm": HASH_ALGORITHM, "PCR0": self.pcr0, "PCR1": self.pcr1, "PCR2": self.pcr2}
        if self.pcr8 is not None:
            regs["PCR8"] = self.pcr8
        return regs

    def to_nitro_cli(self) -> dict[str, dict[str, str]]:
        """The JSON object `nitro-cli build-enclave` prints on stdout."""
        return {"Measurements": self.registers()}


class Measurer:
    """Feeds section data to the PCR hashers in one pass, in file order.

    PCR1's content (kernel, cmdline, ramdisk 0) is a prefix of PCR0's, because the writer and the
    strict reader both insist on nitro-cli's section order; so PCR1 is a snapshot of the PCR0 hasher
    taken when ramdisk 1 starts, and the bootstrap bytes are hashed once instead of twice.

    PCR0 and PCR2 each hash the app ramdisk, the bulk of the file, and SHA-384 has no instruction
    support here (SHA-256 has): each runs in a thread of its own (hashlib releases the GIL on large
    buffers), so the two hashes and the producer of the bytes share the cores. `close()` ends the
    threads on an error path; `finish()` ends them with the result.
    """

    def __init__(self, prefix: MeasuredPrefix | None = None) -> None:
        # From a prefix (kernel, cmdline and ramdisk 0 measured by an earlier EIF) the image hash goes on from
        # its state, and PCR1 is that state: the next section fed is ramdisk 1.
        self._image = HashPipe(prefix.state() if prefix else hashlib.sha384(), name="nitroconv-pcr0")
        self._app = HashPipe(hashlib.sha384(), name="nitroconv-pcr2")
        self._bootstrap: list[Any] = [prefix.state()] if prefix else []
        self._ramdisks = 1 if prefix else 0
        self._kind = SectionType.INVALID
        self._digests: tuple[str, str, str] | None = None
        self.pcr8: str | None = None

    def begin(self, kind: SectionType) -> None:
        if kind == SectionType.RAMDISK:
            if self._ramdisks == 1 and not self._bootstrap:
                self._image.call(lambda h: self._bootstrap.append(h.copy()))
            self._ramdisks += 1
        self._kind = kind

    def update(self, data: bytes) -> None:
        if self._digests is not None:
            return  # measured sections are over (the signature section is not measured)
        kind = self._kind
        if kind in (SectionType.KERNEL, SectionType.CMDLINE):
            self._image.update(data)
        elif kind == SectionType.RAMDISK:
            self._image.update(data)
            if self._ramdisks > 1:
                self._app.update(data)

    def bootstrap_state(self) -> Any | None:
        """The hash of kernel, cmdline and ramdisk 0 (PCR1's content) once `finish()` ran; None with one ramdisk."""
        return self._bootstrap[0] if self._bootstrap else None

    def finish(self) -> Measurements:
        if self._digests is None:
            image, app = self._image.finish(), self._app.finish()
            bootstrap = self._bootstrap[0] if self._bootstrap else image
            self._digests = (_extend(image), _extend(bootstrap), _extend(app))
        return Measurements(*self._digests, self.pcr8)

    def close(self) -> None:
        self._image.abort()
        self._app.abort()


def _extend(inner: Any) -> str:
    return hashlib.sha384(_ZERO_PCR + inner.digest()).hexdigest()
