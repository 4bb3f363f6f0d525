"""Suite-wide pytest setup: the shared fixture plugins (registries, token server, hostile peers, dev blobs and
runtime)."""
from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.registries",
    "tests.fixtures.hostile",
    "tests.fixtures.docker_engine",
    "tests.fixtures.devblobs",
    "tests.fixtures.debian_images",
]

