"""Gather: small pieces joined to at least its size, large ones passed on as they are, order kept."""
from __future__ import annotations

import random

from common.util.gather import Gather


def test_small_pieces_are_joined_and_large_ones_pass_as_they_are() -> None:
    gather = Gather(100)
    assert gather.push(b"a" * 30) == []
    assert gather.push(b"b" * 30) == []
    assert gather.push(b"c" * 40) == [b"a" * 30 + b"b" * 30 + b"c" * 40]
    large = b"L" * 500
    assert gather.push(b"d" * 10) == []
    out = gather.push(large)
    assert out == [b"d" * 10, large] and out[1] is large  # not copied
    assert gather.rest() == []


def test_every_byte_comes_out_once_in_order() -> None:
    rng = random.Random(3)
    pieces = [rng.randbytes(rng.choice((rng.randrange(1, 50), rng.randrange(200, 400)))) for _ in range(500)]
    gather = Gather(256)
    out: list[bytes] = []
    for piece in pieces:
        out += gather.push(piece)
    out += gather.rest()
    assert b"".join(out) == b"".join(pieces)
    # A short piece comes out only at the end, or just before a large piece, which comes out as it went in.
    large = {id(p) for p in pieces if len(p) >= 256}
    for i, piece in enumerate(out[:-1]):
        assert len(piece) >= 256 or id(out[i + 1]) in large
    assert gather.rest() == []
