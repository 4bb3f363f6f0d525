"""Holding a worker inside a step for as long as the test wants: a registry front rule that keeps matching requests
waiting until the test releases them, and the build most fault tests start from (its pull hangs on a blob)."""
from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

from common.settings import Settings
from tests.fixtures.hostile import HostileRegistry, Reply, Seen
from tests.fixtures.images import PushedImage, push_test_image

from .conftest import with_hosts


class Gate:
    """A front rule that holds matching requests until `open` is set; one still held after two minutes gets a 503
    (so a test that never opens the gate cannot leave a worker hanging forever)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.held = 0

    def __call__(self, seen: Seen, forward):  # noqa: ANN001, ANN204
        self.held += 1
        self.open.wait(120)
        return forward() if self.open.is_set() else Reply(503)


@dataclass(frozen=True)
class GatedPull:
    """A fresh test image whose first layer's download, through `front`, waits on `gate`."""

    settings: Settings  # trusts both the registry and the front
    image: PushedImage
    front: HostileRegistry
    gate: Gate

    @property
    def src(self) -> str:
        """The input reference that goes through the front (and so through the gate)."""
        return f"{self.front.host}/{self.image.repo}:1"


def gated_pull(registry, hostile_front, rel_settings: Settings, name: str, *,  # noqa: ANN001
               times: int | None = 1) -> GatedPull:
    """Push `rel/<name>-…:1` and gate its first layer's GET; `times` is how many requests are held (None: all)."""
    image = push_test_image(registry, f"rel/{name}-{uuid.uuid4().hex[:6]}", "1")
    front = hostile_front(registry.host)
    gate = Gate()
    front.on("GET", f"/blobs/{image.layers[0].digest}", gate, times=times)
    return GatedPull(with_hosts(rel_settings, registry.host, front.host), image, front, gate)
