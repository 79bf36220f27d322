"""``kernel="auto"``: which gemm kernel runs a call of M rows on this GPU, from a measured table.

The choice depends mostly on M: a 4-bit GEMM kernel's time grows like M * N * K over its math rate,
while the dequant path pays N * K of dequantization once and then runs at cuBLAS' rate. The size
of the weight moves the crossovers a little (on the H100 the dequant path wins from M = 384 for a
4096 x 4096 weight but only from M = 2048 for 8192 x 8192), so a table holds rules per measured
weight shape and a call takes those of the shape nearest in N * K (log scale). A table is data,
one JSON file per GPU model in ``quickcupy/tuning/`` (made by ``python -m quickcupy tune`` and
committed): ``{"device": name, "rules": [{"max_m": 128, "kernel": "quick"}, ..., {"max_m": null,
"kernel": "dequant"}], "shapes": [{"K": 4096, "N": 4096, "rules": [...]}, ...], ...}``; rules in
increasing ``max_m``, the last without a bound; "rules" (the best over all shapes) serves a table
without "shapes". These top-level rules are float16's; another activation dtype whose crossovers
differ has its own ``"dtypes": {"bfloat16": {"rules": [...], "shapes": [...]}}`` section (a dtype
without one uses float16's). A GPU without a table gets :data:`DEFAULT_RULES` (said so by
:func:`table_for`).
"""
from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

from . import registry
from .dtypes import NAMES
from . import kernels

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
        v = registry.VARIANTS.get(kernel) if isinstance(kernel, str) else None
        if v is None or v.path == "auto" or v.layout != LAYOUT:
            raise ValueError(f"{where}[{i}]: kernel={kernel!r} is not a {LAYOUT}-layout kernel")
        design = v.design
        if design.max_m is not None and (max_m is None or max_m > design.max_m):
            raise ValueError(f"{where}[{i}]: kernel={kernel!r} serves M <= {design.max_m}, the rule max_m={max_m}")
        final = i == len(rules) - 1
        if final != (max_m is None) or (max_m is not None and (not isinstance(max_m, int) or max_m <= last)):
            raise ValueError(f"{where}[{i}]: max_m={max_m!r} must increase, and only the last rule is unbounded")
        last = max_m or last
    return tuple(dict(r) for r in rules)


def _section(data: dict, where: str) -> dict:
    """{"rules", "shapes"} of one dtype's part of a table file, validated."""
    shapes = tuple((int(e["K"]), int(e["N"]), check_rules(e["rules"], f"{where} shape {e['K']}x{e['N']}"))
                   for e in data.get("shapes", ()) if isinstance(e, dict))
    return {"rules": check_rules(data.get("rules"), where), "shapes": shapes}


@functools.lru_cache(maxsize=None)
def table_for(device_name: str) -> dict:
    """The table of a GPU model: {"device", "rules", "shapes", "dtypes", "source"} (source: the
    file, or "default"); "dtypes" maps a dtype name to its own {"rules", "shapes"}."""
    path = TUNING_DIR / f"{device_slug(device_name)}.json"
    if not path.is_file():
        return {"device": device_name, "rules": DEFAULT_RULES, "source": "default (no measured table)"}
    data = json.loads(path.read_text())
    dtypes = {name: _section(d, f"{path} dtype {name}") for name, d in data.get("dtypes", {}).items()}
    unknown = set(dtypes) - set(NAMES)
    if unknown:
        raise ValueError(f"{path}: dtypes {sorted(unknown)} are not among {NAMES}")
    return {"device": data.get("device", device_name), **_section(data, str(path)), "dtypes": dtypes,
            "source": str(path)}


def section_for(table: dict, dtype: str) -> dict:
    """The part of ``table`` that serves activations of ``dtype``: its own section, else float16's."""
    return table.get("dtypes", {}).get(dtype, table)


def rules_for(table: dict, N: int, K: int) -> tuple:
    """The rules of the table's measured shape nearest to N x K in log(N * K), or its "rules"."""
    if not table.get("shapes"):
        return table["rules"]
    return min(table["shapes"], key=lambda e: abs(math.log(e[0] * e[1]) - math.log(N * K)))[2]


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


@functools.lru_cache(maxsize=4096)
def kernel_for(M: int, N: int, K: int, device_id: int, dtype: str = "float16",
               capturable: bool = False) -> registry.Variant:
    """The registry record of the kernel ``kernel="auto"`` runs for x (M, K) @ W (K, N) of
    ``dtype`` on CUDA device ``device_id``; a kernel the device cannot run (a table copied to
    another GPU) or without instances for ``dtype`` (Design.dtypes) falls back to
    :data:`DEFAULT_RULES`, whose kernels run every activation dtype. ``capturable``: the call is
    being captured in a CUDA graph, where the cuBLAS path cannot run; the table's kernel for the
    largest M below its dequant crossover (that serves M) runs instead."""
    rules = rules_for(section_for(table_for(_device_name(device_id)), dtype), N, K)
    v = registry.VARIANTS[choose(M, rules)]
    if kernels.unsupported_reason(v, device_id) is not None or dtype not in v.design.dtypes:
        rules = DEFAULT_RULES
        v = registry.VARIANTS[choose(M, rules)]
    if capturable and v.path == "dequant":
        served = [registry.VARIANTS[r["kernel"]] for r in rules]
        served = [c for c in served if c.path == "gemm" and (c.design.max_m or M) >= M
                  and kernels.unsupported_reason(c, device_id) is None and dtype in c.design.dtypes]
        v = served[-1] if served else registry.VARIANTS["quick"]
    return v
