"""The prepared form of a statement: numbered parameters, each name once, and the driver's escapes undone."""
from __future__ import annotations

from api.prepared import PreparedForm


def test_prepared_form_numbers_each_parameter_once_in_order():
    form = PreparedForm.of("p", "SELECT a FROM t WHERE b = %(b)s AND c < %(quota)s LIMIT %(quota)s OFFSET %(a_1)s")
    assert form.prepare == "PREPARE p AS SELECT a FROM t WHERE b = $1 AND c < $2 LIMIT $2 OFFSET $3"
    assert form.execute == "EXECUTE p(%(b)s, %(quota)s, %(a_1)s)"


def test_prepared_form_unescapes_percent_signs_and_takes_no_parameters():
    form = PreparedForm.of("q", "SELECT 'x%%' LIKE name FROM t")
    assert form.prepare == "PREPARE q AS SELECT 'x%' LIKE name FROM t"
    assert form.execute == "EXECUTE q"
