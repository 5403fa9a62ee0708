"""cotune.jsonsafe: strict JSON out, and what a count read from a peer's JSON may be."""

import json
import math

import pytest

from cotune.jsonsafe import finite_or_none, is_count, strict_json


def test_non_finite_numbers_become_null_at_any_depth():
    value = {"loss": math.nan, "xs": [1.0, math.inf, (2, -math.inf)], "n": 3, "s": "nan"}
    assert finite_or_none(value) == {"loss": None, "xs": [1.0, None, [2, None]], "n": 3, "s": "nan"}
    assert json.loads(strict_json(value)) == finite_or_none(value)


@pytest.mark.parametrize("value", [0, 1, 2**40])
def test_a_count_is_a_non_negative_int(value):
    assert is_count(value)


@pytest.mark.parametrize("value", [-1, True, False, 1.0, "3", None, [1]])
def test_anything_else_is_not_a_count(value):
    assert not is_count(value)
