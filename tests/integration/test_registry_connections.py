"""Requests one client makes one after another share one connection to the registry.

Each new connection costs a TCP handshake and, with TLS, a TLS one; a chunked upload makes a request per chunk
(the streamed output layer made ~90 before it became one PATCH). Answers whose body nobody reads (the 202 to
each chunk, a HEAD's, a 201) used to close their connection, so every request after them opened a new one. The hostile front numbers the connections it
accepts and forwards to the real registry.
"""
from __future__ import annotations

import io
import json
import os

import pytest

from common.registry.digest import Digest
from tests.fixtures.images import OCI_MANIFEST, image_config, make_layer, make_tar, push_test_image
from tests.fixtures.registries import client_for

pytestmark = pytest.mark.integration


def _trail(front) -> list[tuple[int, str, str]]:
    return [(s.connection, s.method, s.path.split("?")[0]) for s in front.seen]


def test_uploads_and_a_manifest_go_over_one_connection(registry, hostile_front, repo_name):
    front = hostile_front(registry.host)
    layer = make_layer(make_tar({"app/data.bin": os.urandom(300_000)}))
    config = json.dumps(image_config([layer.diff_id])).encode()
    with client_for(registry, host=front.host) as client:
        # a chunked upload (a HEAD, the POST, a PATCH per chunk, the PUT), then a streamed one, as the layer goes
        assert client.upload_blob(repo_name, Digest.parse(layer.digest), len(layer.blob),
                                  lambda: io.BytesIO(layer.blob), chunk_size=65_536)
        upload = client.open_upload(repo_name)
        upload.stream(config[i:i + 100] for i in range(0, len(config), 100))
        upload.commit(Digest.of(config))
        assert client.blob_exists(repo_name, Digest.of(config))
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": str(Digest.of(config)),
                       "size": len(config)},
            "layers": [layer.descriptor()],
        }).encode()
        client.put_manifest(repo_name, "v1", OCI_MANIFEST, manifest)
    assert front.count("PATCH") >= 6
    assert front.connections() == 1, _trail(front)


def test_a_pull_goes_over_one_connection(registry, hostile_front, repo_name, tmp_path):
    image = push_test_image(registry, repo_name, "v1", [make_tar({"a": b"a" * 5000}), make_tar({"b": b"b" * 7000})])
    front = hostile_front(registry.host)
    with client_for(registry, host=front.host) as client:
        assert not client.blob_exists(repo_name, Digest.of(b"not pushed"))
        resolved = client.resolve(f"{front.host}/{repo_name}:v1")
        for layer in resolved.layers:
            client.fetch_blob(repo_name, layer, tmp_path / layer.digest.hex)
    assert [layer.digest for layer in resolved.layers] == [Digest.parse(b.digest) for b in image.layers]
    # the manifest, the config, both layers, and the HEAD that found nothing
    assert len(front.seen) == 5
    assert front.connections() == 1, _trail(front)
