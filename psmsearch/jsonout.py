"""JSON that every parser accepts: Python writes NaN and Infinity, which JSON does not have."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float (at any depth) replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` with non-finite floats written as ``null`` (strict JSON, ``allow_nan=False``)."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)
