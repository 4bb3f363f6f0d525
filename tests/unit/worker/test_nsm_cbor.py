"""The init's NSM CBOR (worker/runtime/nsm_cbor.h), compiled with ASan/UBSan and fed requests and responses.

Responses are built here with an encoder of our own, checked against the byte layouts QEMU's virtio-nsm
and aws-nitro-enclaves-nsm-api produce (both key orders of DescribePCR's map occur in the wild).
"""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RUNTIME = HERE.parents[2] / "worker" / "runtime"
OK, MALFORMED, TOO_LONG, ERROR_REPLY = 0, -1, -2, -3


def head(major: int, arg: int) -> bytes:
    if arg < 24:
        return bytes([major << 5 | arg])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if arg < 1 << (8 * size):
            return bytes([major << 5 | info]) + arg.to_bytes(size, "big")
    raise ValueError(arg)


def text(s: str) -> bytes:
    return head(3, len(s)) + s.encode()


def bstr(b: bytes) -> bytes:
    return head(2, len(b)) + b


def cmap(*pairs: bytes) -> bytes:
    assert len(pairs) % 2 == 0
    return head(5, len(pairs) // 2) + b"".join(pairs)


TRUE, FALSE = b"\xf5", b"\xf4"
PCR = bytes(range(48))


def describe(*inner: bytes) -> bytes:
    return cmap(text("DescribePCR"), cmap(*inner))


class Harness:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"harness died on {line!r}"
        return answer.rstrip("\n")

    def describe(self, resp: bytes, cap: int = 64) -> tuple[str, ...]:
        return tuple(self.ask(f"describe {cap} {resp.hex()}").split(" "))

    def random(self, resp: bytes, cap: int = 1024) -> tuple[str, ...]:
        return tuple(self.ask(f"random {cap} {resp.hex()}").split(" "))

    def attest(self, resp: bytes) -> tuple[str, ...]:
        return tuple(self.ask(f"attest 0 {resp.hex()}").split(" "))


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (make setup installs gcc)")
    exe = tmp_path_factory.mktemp("nsm") / "harness"
    subprocess.run(
        [cc, "-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=all", f"-I{RUNTIME}", "-o", str(exe), str(HERE / "nsm_cbor_harness.c")],
        check=True,
    )
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield Harness(proc)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0, "the harness failed (a sanitizer report is on stderr)"


@pytest.mark.parametrize("index", [0, 1, 2, 8, 23, 24, 255, 256, 65535])
def test_describe_pcr_request_is_the_canonical_encoding(harness: Harness, index: int) -> None:
    assert harness.ask(f"req-describe {index}") == cmap(text("DescribePCR"), cmap(text("index"), head(0, index))).hex()


def test_describe_pcr_request_bytes_for_pcr0(harness: Harness) -> None:
    # {"DescribePCR": {"index": 0}}, byte for byte as serde_cbor writes the nsm-api's Request::DescribePCR.
    assert harness.ask("req-describe 0") == "a16b4465736372696265504352a165696e64657800"


def test_get_random_request_is_a_bare_string(harness: Harness) -> None:
    assert harness.ask("req-random") == bytes.fromhex("6947657452616e646f6d").hex()


@pytest.mark.parametrize(
    "resp",
    [
        describe(text("lock"), TRUE, text("data"), bstr(PCR)),  # aws-nitro-enclaves-nsm-api's field order
        describe(text("data"), bstr(PCR), text("lock"), TRUE),  # QEMU's virtio-nsm order
    ],
)
def test_describe_pcr_response_either_key_order(harness: Harness, resp: bytes) -> None:
    assert harness.describe(resp) == ("ok", "1", PCR.hex())


def test_describe_pcr_unlocked_and_empty_data(harness: Harness) -> None:
    assert harness.describe(describe(text("lock"), FALSE, text("data"), bstr(b"\0" * 48))) == ("ok", "0", "00" * 48)
    assert harness.describe(describe(text("lock"), FALSE, text("data"), bstr(b""))) == ("ok", "0", "")


def test_error_reply_carries_the_code_printable_and_bounded(harness: Harness) -> None:
    assert harness.describe(cmap(text("Error"), text("InvalidIndex"))) == ("err", str(ERROR_REPLY), "InvalidIndex")
    assert harness.random(cmap(text("Error"), text("InternalError"))) == ("err", str(ERROR_REPLY), "InternalError")
    # Truncated to the caller's buffer (15 characters and the NUL), control bytes replaced.
    got = harness.describe(cmap(text("Error"), text("Bad\x1b[2Jcode-that-is-much-too-long")))
    assert got == ("err", str(ERROR_REPLY), "Bad?[2Jcode-tha")


def test_data_longer_than_the_buffer(harness: Harness) -> None:
    resp = describe(text("lock"), TRUE, text("data"), bstr(PCR))
    assert harness.describe(resp, cap=47) == ("err", str(TOO_LONG), "")
    assert harness.describe(resp, cap=48)[0] == "ok"


@pytest.mark.parametrize(
    "resp",
    [
        b"",
        describe(text("lock"), TRUE, text("data"), bstr(PCR)) + b"\0",  # trailing byte
        describe(text("lock"), TRUE),  # data missing
        describe(text("lock"), TRUE, text("lock"), FALSE),  # duplicate key
        describe(text("lock"), TRUE, text("data"), bstr(PCR), text("x"), TRUE),  # extra key
        describe(text("lock"), head(0, 1), text("data"), bstr(PCR)),  # lock not a bool
        describe(text("lock"), TRUE, text("data"), text("not bytes")),
        cmap(text("GetRandom"), cmap(text("random"), bstr(PCR))),  # the wrong reply
        cmap(text("DescribePCR"), bstr(PCR)),  # inner value not a map
        cmap(text("DescribePCR"), cmap(), text("x"), cmap()),  # two top-level entries
        text("DescribePCR"),
        bytes([0xA1, 0x7F]) + b"DescribePCR\xff",  # indefinite-length key
        bytes([0xA1, 0x6B]) + b"DescribePCR" + bytes([0xA2, 0x64]) + b"data" + bytes([0x5B]) + b"\xff" * 8,  # 2^64 length
        bytes([0xA1, 0x6B]) + b"DescribePCR" + bytes([0xA2, 0x64]) + b"data" + bytes([0x5A, 0xFF, 0xFF, 0xFF, 0xF0]),
    ],
)
def test_malformed_describe_pcr_responses_are_refused(harness: Harness, resp: bytes) -> None:
    assert harness.describe(resp) == ("err", str(MALFORMED), "")


def test_every_truncation_is_refused_without_reading_past_the_end(harness: Harness) -> None:
    for resp in (describe(text("data"), bstr(PCR), text("lock"), TRUE), cmap(text("Error"), text("InvalidIndex"))):
        for cut in range(len(resp)):
            assert harness.describe(resp[:cut]) == ("err", str(MALFORMED), ""), cut


def test_get_random(harness: Harness) -> None:
    rnd = bytes(range(256))
    resp = cmap(text("GetRandom"), cmap(text("random"), bstr(rnd)))
    assert harness.random(resp) == ("ok", "-", rnd.hex())
    assert harness.random(resp, cap=255) == ("err", str(TOO_LONG), "")
    for cut in range(len(resp)):
        assert harness.random(resp[:cut]) == ("err", str(MALFORMED), ""), cut
    assert harness.random(cmap(text("GetRandom"), cmap(text("rand"), bstr(rnd))))[0] == "err"
    assert harness.random(resp + b"\0")[0] == "err"


NULL = b"\xf6"


def test_attestation_request_names_every_field_null_when_not_given(harness: Harness) -> None:
    # As aws-nitro-enclaves-nsm-api's client serialises Request::Attestation (serde: fields in declaration order).
    want = cmap(text("Attestation"), cmap(text("user_data"), NULL, text("nonce"), NULL, text("public_key"), NULL))
    assert harness.ask("req-attest - - -") == want.hex()


def test_attestation_request_carries_the_values_at_the_nsm_limits(harness: Harness) -> None:
    ud, nonce, pk = b"u" * 512, bytes(range(256)) * 2, b"\x04" * 1024
    want = cmap(text("Attestation"), cmap(text("user_data"), bstr(ud), text("nonce"), bstr(nonce),
                                          text("public_key"), bstr(pk)))
    assert len(want) < 0x1000  # the NSM driver's request limit
    assert harness.ask(f"req-attest {ud.hex()} {nonce.hex()} {pk.hex()}") == want.hex()
    assert harness.ask(f"req-attest - {nonce[:1].hex()} -") == cmap(
        text("Attestation"), cmap(text("user_data"), NULL, text("nonce"), bstr(nonce[:1]), text("public_key"),
                                  NULL)).hex()


def test_attestation_response_document_and_refusals(harness: Harness) -> None:
    doc = bytes.fromhex("84") + bstr(cmap(head(0, 1), head(1, 0))) + cmap() + bstr(b"payload") + bstr(bytes(64))
    resp = cmap(text("Attestation"), cmap(text("document"), bstr(doc)))
    assert harness.attest(resp) == ("ok", "-", doc.hex())
    for cut in range(len(resp)):
        assert harness.attest(resp[:cut]) == ("err", str(MALFORMED), ""), cut
    assert harness.attest(resp + b"\0") == ("err", str(MALFORMED), "")
    assert harness.attest(cmap(text("Attestation"), cmap(text("document"), bstr(b"")))) == ("err", str(MALFORMED), "")
    assert harness.attest(cmap(text("Attestation"), cmap(text("doc"), bstr(doc)))) == ("err", str(MALFORMED), "")
    assert harness.attest(cmap(text("Attestation"), cmap(text("document"), text("x")))) == ("err", str(MALFORMED), "")
    assert harness.attest(cmap(text("Error"), text("InvalidArgument"))) == ("err", str(ERROR_REPLY), "InvalidArgument")
