"""Resolving NITROCONV_OUTPUT_BASE_IMAGE against a real registry: platform choice and layers that cannot be reused."""
from __future__ import annotations

import json

import pytest

from common.errors import NoMatchingPlatform, UnsupportedMediaType
from tests.fixtures.images import LayerBlob, make_layer, make_tar, push_test_image
from tests.fixtures.registries import RunningRegistry
from worker.pipeline.outputbase import base_reference, resolve_base

pytestmark = pytest.mark.integration


def test_output_base_empty_setting_means_no_base() -> None:
    assert base_reference("") is None and base_reference("  ") is None


def test_output_base_resolves_the_amd64_manifest_of_an_index(registry: RunningRegistry, repo_name: str) -> None:
    pushed = push_test_image(registry, repo_name, "v1", [make_tar({"usr/bin/nitro-cli": b"x"})], index=True)
    base = resolve_base(base_reference(pushed.ref), credentials=None,  # type: ignore[arg-type]
                        insecure_registries=frozenset({registry.host}))
    assert base.digest == pushed.manifest_digest  # the platform manifest, not the index
    assert [layer.digest for layer in base.layers] == [layer.digest for layer in pushed.layers]
    assert base.diff_ids == tuple(layer.diff_id for layer in pushed.layers)
    assert base.config == json.loads(pushed.config_bytes)


def test_output_base_of_another_platform_is_refused(registry: RunningRegistry, repo_name: str) -> None:
    pushed = push_test_image(registry, repo_name, "arm", index=True, architecture="arm64")
    with pytest.raises(NoMatchingPlatform):
        resolve_base(base_reference(pushed.ref), credentials=None,  # type: ignore[arg-type]
                     insecure_registries=frozenset({registry.host}))


def test_output_base_with_a_foreign_layer_is_refused(registry: RunningRegistry, repo_name: str) -> None:
    plain = make_layer(make_tar({"a": b"1"}))
    foreign = LayerBlob(plain.blob, "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", plain.diff_id)
    pushed = push_test_image(registry, repo_name, "foreign", [foreign])
    with pytest.raises(UnsupportedMediaType) as caught:
        resolve_base(base_reference(pushed.ref), credentials=None,  # type: ignore[arg-type]
                     insecure_registries=frozenset({registry.host}))
    assert caught.value.details["media_type"] == foreign.media_type
