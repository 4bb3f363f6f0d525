"""How a layer blob is compressed: one enum for the layers read (any of the three) and the layer written."""
from __future__ import annotations

import enum


class Compression(enum.StrEnum):
    GZIP = "gzip"
    ZSTD = "zstd"
    NONE = "none"
