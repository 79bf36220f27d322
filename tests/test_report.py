"""quickcupy.tools.common: strict JSON from NumPy values."""
import json
import math

import numpy as np

from quickcupy.tools.common import jsonable, write_json


def test_numpy_and_non_finite_values(tmp_path):
    value = {"a": np.float32(1.5), "b": np.arange(3), "c": (math.nan, np.inf, 2), 4: np.int64(7)}
    assert jsonable(value) == {"a": 1.5, "b": [0, 1, 2], "c": [None, None, 2], "4": 7}
    path = tmp_path / "r.json"
    write_json(path, value)
    assert json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))["c"][0] is None
