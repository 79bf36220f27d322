"""Writing the tools' results: one JSON convention for bench, ncu and llama."""
from __future__ import annotations

import json
import math

import numpy as np


def jsonable(value):
    """``value`` with NumPy scalars/arrays turned into Python ones and NaN/inf into None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path, value, indent: int = 1):
    """Writes ``jsonable(value)`` to ``path`` with a trailing newline."""
    with open(path, "w") as f:
        json.dump(jsonable(value), f, indent=indent)
        f.write("\n")
