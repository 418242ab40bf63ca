"""Command-line JSON is strict: NaN and infinities become null."""

from __future__ import annotations

import json
import math

import pytest

from psmsearch import jsonout


def test_non_finite_floats_become_null_at_any_depth() -> None:
    value = {"loss": math.nan, "curve": [1.0, math.inf, {"x": -math.inf}], "name": "nan", "n": 3}
    text = jsonout.dumps(value, sort_keys=True)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}")) == {
        "curve": [1.0, None, {"x": None}], "loss": None, "n": 3, "name": "nan"}
