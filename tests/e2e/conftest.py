"""Whole-system fixtures: a busybox image tree (the dev blobs and runtime fixtures are suite-wide,
tests/fixtures/devblobs.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.rootfs import make_busybox_rootfs


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One busybox image tree per session; copy it before changing it."""
    return make_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")
