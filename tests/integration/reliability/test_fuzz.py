"""Schemathesis against the app's own `/v1/openapi.json`, as a manager with a valid token: no 5xx, and every
response matches the documented status codes, headers and schemas (issue 6). Bounded for `make test`."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from api.app import create_app

from .conftest import new_tenant

pytestmark = pytest.mark.integration
# Per operation; NITROCONV_FUZZ_EXAMPLES raises it for a longer run outside `make test`.
MAX_EXAMPLES = int(os.environ.get("NITROCONV_FUZZ_EXAMPLES", "12"))
# Rules JSON Schema cannot state (an image reference's grammar, input != output, a password only for a
# new user) make some schema-valid bodies a documented 422; that is the contract, not a defect.
EXCLUDED = [schemathesis.checks.positive_data_acceptance]


def _fuzz(operation: schemathesis.APIOperation, headers: dict[str, str]) -> None:
    # schemathesis' pytest plugin does not run under this pytest; drive Hypothesis directly instead.
    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers, excluded_checks=EXCLUDED)

    check()


def test_fuzz_every_operation_answers_within_its_contract(rel_settings):
    # The fuzzer submits many conversions quickly: quota and rate limit are tested elsewhere.
    s = replace(rel_settings, max_queued_per_account=1_000_000, rate_limit_per_minute=0, max_wait_seconds=1)
    app = create_app(s)
    tenant = new_tenant(s, app.test_client())
    schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    failures: dict[str, str] = {}
    for operation in operations:
        # A session per operation: POST /v1/sys/session/terminate ends the one it is called with.
        headers = {"Authorization": f"Bearer {tenant.token('MANAGER')}"}

        try:
            _fuzz(operation, headers)
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collect every operation's finding
            failures[operation.label] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
