"""``kernel="auto"``: which gemm kernel runs a call of M rows on this GPU, from a measured table.

The choice depends on M alone: a 4-bit GEMM kernel's time grows like M * N * K over its math rate,
while the dequant path pays N * K bytes of dequantization once and then runs at cuBLAS' rate, so the
crossover M hardly depends on N and K (the tables confirm it over five shapes). A table is data,
one JSON file per GPU model in ``quickcupy/tuning/`` (made by ``python -m quickcupy tune`` and
committed): ``{"device": name, "rules": [{"max_m": 128, "kernel": "quick"}, ..., {"max_m": null,
"kernel": "dequant"}], ...}``, rules in increasing ``max_m``, the last without a bound. A GPU
without a table gets :data:`DEFAULT_RULES` (said so by :func:`table_for`).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from . import registry

TUNING_DIR = Path(__file__).resolve().parent / "tuning"
# Without a measured table: QUICK's kernel while the GEMM is memory-bound, cuBLAS on dequantized
# weights beyond (the crossover measured on an H100 lies between 256 and 384 rows). quick_decode is
# left out: its launch rule assumes an H100/A100-sized shared memory.
DEFAULT_RULES = ({"max_m": 256, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"})
LAYOUT = "quick"               # every kernel auto chooses from reads this layout


def device_slug(name: str) -> str:
    """File name of a GPU model's table: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def check_rules(rules, where: str = "rules") -> tuple:
    """Validated rules (see the module docstring); ValueError naming ``where`` otherwise."""
    if not isinstance(rules, (list, tuple)) or not rules:
        raise ValueError(f"{where} must be a non-empty list of {{max_m, kernel}}")
    last = 0
    for i, rule in enumerate(rules):
        kernel, max_m = rule.get("kernel"), rule.get("max_m")
        v = registry.VARIANTS.get(kernel)
        if v is None or v.path == "auto" or registry.design_of(kernel).layout != LAYOUT:
            raise ValueError(f"{where}[{i}]: kernel={kernel!r} is not a {LAYOUT}-layout kernel")
        design = registry.design_of(kernel)
        if design.max_m is not None and (max_m is None or max_m > design.max_m):
            raise ValueError(f"{where}[{i}]: kernel={kernel!r} serves M <= {design.max_m}, the rule max_m={max_m}")
        final = i == len(rules) - 1
        if final != (max_m is None) or (max_m is not None and (not isinstance(max_m, int) or max_m <= last)):
            raise ValueError(f"{where}[{i}]: max_m={max_m!r} must increase, and only the last rule is unbounded")
        last = max_m or last
    return tuple(dict(r) for r in rules)


@functools.lru_cache(maxsize=None)
def table_for(device_name: str) -> dict:
    """The table of a GPU model: {"device", "rules", "source"} (source: the file, or "default")."""
    path = TUNING_DIR / f"{device_slug(device_name)}.json"
    if not path.is_file():
        return {"device": device_name, "rules": DEFAULT_RULES, "source": "default (no measured table)"}
    data = json.loads(path.read_text())
    return {"device": data.get("device", device_name), "rules": check_rules(data["rules"], str(path)),
            "source": str(path)}


def choose(M: int, rules) -> str:
    """The kernel of the first rule whose max_m covers M."""
    for rule in rules:
        if rule["max_m"] is None or M <= rule["max_m"]:
            return rule["kernel"]
    raise AssertionError("check_rules guarantees an unbounded last rule")


@functools.lru_cache(maxsize=None)
def _device_name(device_id: int) -> str:
    import cupy
    name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
    return name.decode() if isinstance(name, bytes) else name


def kernel_for(M: int, device_id: int) -> str:
    """What ``kernel="auto"`` runs for M rows on CUDA device ``device_id``."""
    return choose(M, table_for(_device_name(device_id))["rules"])
