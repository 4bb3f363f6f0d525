"""The code-to-HTTP mapping: one table, inherited by subclasses."""
from __future__ import annotations

import pytest

from api.errors import http_status
from common import errors


@pytest.mark.parametrize("exc,status", [
    (errors.ValidationFailed("x"), 422), (errors.Unauthenticated("x"), 401), (errors.Forbidden("x"), 403),
    (errors.NotFound("x"), 404), (errors.InvalidTransition("x"), 409), (errors.IdempotencyKeyReused("x"), 409),
    (errors.DatabaseUnavailable("x"), 503), (errors.QueueUnavailable("x"), 503),
    (errors.NitroconvError("x"), 500), (errors.Unauthorized("registry said no"), 500),
])
def test_http_status_maps_error_classes(exc, status):
    assert http_status(exc) == status
