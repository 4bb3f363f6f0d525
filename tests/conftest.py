"""Suite-wide pytest setup: the shared fixture plugins (registries, token server, hostile peers, dev blobs and
runtime), and the Docker tests kept on one xdist worker."""
from __future__ import annotations

import pytest

from tests.fixtures.parallel import check_engine_grouped, group_engine_tests

pytest_plugins = [
    "tests.fixtures.registries",
    "tests.fixtures.hostile",
    "tests.fixtures.docker_engine",
    "tests.fixtures.devblobs",
    "tests.fixtures.debian_images",
]



# First: xdist's own hook reads the xdist_group marks to pin each group to one worker.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    group_engine_tests(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    check_engine_grouped(session.config, session.items)
