"""Suite-wide pytest setup: the shared fixture plugins (registries, token server, hostile peers)."""
from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.registries",
    "tests.fixtures.hostile",
    "tests.fixtures.docker_engine",
]

