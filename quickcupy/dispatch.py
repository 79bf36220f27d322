"""``kernel="auto"``: which gemm kernel runs a call of M rows on this GPU, from a measured table.

The choice depends mostly on M: a 4-bit GEMM kernel's time grows like M * N * K over its math rate,
while the dequant path pays N * K of dequantization once and then runs at cuBLAS' rate. The size
of the weight moves the crossovers a little (on the H100 the dequant path wins from M = 384 for a
4096 x 4096 weight but only from M = 2048 for 8192 x 8192), so a table holds rules per measured
weight shape and a call takes those of the shape nearest in N * K (log scale).

A table is JSON data: ``{"schema": 1, "device": name, "rules": [{"max_m": 16, "kernel":
"quick_decode"}, ..., {"max_m": null, "kernel": "dequant"}], "shapes": [{"K": 4096, "N": 4096,
"rules": [...]}, ...], "dtypes": {"bfloat16": {"rules": [...], "shapes": [...]}}}``; rules in
increasing ``max_m``, the last without a bound; "rules" (the best over all shapes) serves a shape
when the table has no "shapes". The top-level rules are float16's; a dtype whose crossovers differ
has its own section under "dtypes" (a dtype without one uses float16's). "command", "note",
"group_size" and "per_m" say how the table was made and are not read. :func:`check_table`
validates all of it (:data:`SCHEMA`, kernel names, bounds, shapes, dtypes).

Which table serves a GPU (:func:`table_for`; ``python -m quickcupy info`` prints it), first found:

1. the user's table of this GPU model, ``<user dir>/<gpu>.json`` (:func:`user_tuning_dir`:
   ``$QUICKCUPY_TUNING_DIR``, else ``$XDG_CONFIG_HOME/quickcupy/tuning``, else
   ``~/.config/quickcupy/tuning``; ``%LOCALAPPDATA%\\quickcupy\\tuning`` on Windows), written by
   ``python -m quickcupy tune``;
2. the table of this GPU model shipped in ``quickcupy/tuning/<gpu>.json`` (read-only data; ``tune``
   never writes there);
3. the architecture defaults, ``quickcupy/tuning/arch-*.json``: the one whose "targets" list the
   device's compute capability (``"arch": "sm_90", "targets": ["sm_90"]``), for GPUs without a
   measured table (e.g. an H200 gets Hopper's rules, made from the H100's measurements);
4. :data:`DEFAULT_RULES`.

A table that cannot be read or fails validation gives one :class:`TableWarning` naming the file and
the problem, and the next one serves; a GEMM call never fails for it. The environment variable
``QUICKCUPY_AUTO_TABLE`` forces a source (to measure one table on a GPU that has another):
``arch`` skips 1 and 2 (the architecture defaults, else DEFAULT_RULES), and a path to a table file
serves that file before 1 (whatever GPU it names). Both environment variables and the user's file
are read at a process's first ``auto`` call of a shape (tables and choices are cached): set them
before, or call :func:`clear_caches` after changing them.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from pathlib import Path

from . import kernels, registry
from .dtypes import NAMES

SCHEMA = 1                     # the "schema" of a table this module reads (and tune writes)
TUNING_DIR = Path(__file__).resolve().parent / "tuning"   # shipped tables: read-only data
TUNING_DIR_ENV = "QUICKCUPY_TUNING_DIR"
FORCE_ENV = "QUICKCUPY_AUTO_TABLE"
# Without any table: QUICK's kernel while the GEMM is memory-bound, cuBLAS on dequantized weights
# beyond; the same rules as quickcupy/tuning/arch-sm80.json (where they come from is said there),
# kernels that every architecture and activation dtype runs.
DEFAULT_RULES = ({"max_m": 128, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"})
LAYOUT = "quick"               # every kernel auto chooses from reads this layout
# Keys a table (and a dtype's section) may hold; informational ones are not read.
TABLE_KEYS = {"schema", "device", "arch", "targets", "command", "note", "rules", "shapes", "dtypes",
              "group_size", "per_m"}
SECTION_KEYS = {"command", "note", "rules", "shapes", "group_size", "per_m"}


class TableWarning(UserWarning):
    """A kernel="auto" table that could not be used (the next one in the order serves)."""


def device_slug(name: str) -> str:
    """File name of a GPU model's table: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def user_tuning_dir() -> Path:
    """Where ``tune`` writes and ``auto`` first looks for tables (see the module docstring)."""
    if os.environ.get(TUNING_DIR_ENV):
        return Path(os.environ[TUNING_DIR_ENV]).expanduser()
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or os.environ.get("APPDATA") or "~/AppData/Local"
    else:
        base = os.environ.get("XDG_CONFIG_HOME", "")
        base = base if os.path.isabs(base) else "~/.config"     # the XDG spec ignores a relative path
    return Path(base).expanduser() / "quickcupy" / "tuning"


# ------------------------------------------------------------------------------------ validation
def check_rules(rules, where: str = "rules") -> tuple:
    """Validated rules (see the module docstring); ValueError naming ``where`` otherwise."""
    if not isinstance(rules, (list, tuple)) or not rules:
        raise ValueError(f"{where} must be a non-empty list of {{max_m, kernel}}")
    last = 0
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or set(rule) != {"max_m", "kernel"}:
            raise ValueError(f"{where}[{i}]: {rule!r} must be an object of exactly max_m and kernel")
        kernel, max_m = rule["kernel"], rule["max_m"]
        v = registry.VARIANTS.get(kernel) if isinstance(kernel, str) else None
        if v is None or v.path == "auto" or v.layout != LAYOUT:
            raise ValueError(f"{where}[{i}]: kernel={kernel!r} is not a {LAYOUT}-layout kernel")
        final = i == len(rules) - 1
        if final != (max_m is None) or (max_m is not None and (type(max_m) is not int or max_m <= last)):
            raise ValueError(f"{where}[{i}]: max_m={max_m!r} must increase (positive integers), "
                             f"and only the last rule is unbounded (null)")
        design = v.design
        if design.max_m is not None and (max_m is None or max_m > design.max_m):
            raise ValueError(f"{where}[{i}]: kernel={kernel!r} serves M <= {design.max_m}, the rule max_m={max_m}")
        last = max_m or last
    return tuple(dict(r) for r in rules)


def _section(data, where: str, keys=SECTION_KEYS) -> dict:
    """{"rules", "shapes"} of one dtype's part of a table, validated; shapes as (K, N, rules)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(data) - keys)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}")
    shapes = data.get("shapes", [])
    if not isinstance(shapes, list):
        raise ValueError(f"{where}: shapes must be a list of {{K, N, rules}}")
    out = []
    for i, e in enumerate(shapes):
        if not isinstance(e, dict) or set(e) != {"K", "N", "rules"}:
            raise ValueError(f"{where} shapes[{i}] must be an object of exactly K, N and rules")
        if any(type(e[d]) is not int or e[d] <= 0 for d in ("K", "N")):
            raise ValueError(f"{where} shapes[{i}]: K={e['K']!r} and N={e['N']!r} must be positive integers")
        if any((K, N) == (e["K"], e["N"]) for K, N, _ in out):
            raise ValueError(f"{where} shapes[{i}]: K={e['K']} N={e['N']} appears twice")
        out.append((e["K"], e["N"], check_rules(e["rules"], f"{where} shape {e['K']}x{e['N']} rules")))
    return {"rules": check_rules(data.get("rules"), f"{where} rules"), "shapes": tuple(out)}


def check_table(data, where: str) -> dict:
    """A table file's content, validated: {"device", "arch", "targets", "rules", "shapes", "dtypes"}
    ("device" None for architecture defaults, "arch" None for a GPU model's table); ValueError
    naming ``where`` and the rule broken otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a table must be a JSON object")
    if data.get("schema") != SCHEMA or type(data.get("schema")) is not int:
        raise ValueError(f"{where}: schema={data.get('schema')!r}, this quickcupy reads schema {SCHEMA}")
    device, arch, targets = data.get("device"), data.get("arch"), data.get("targets", [])
    if (device is None) == (arch is None):
        raise ValueError(f"{where}: a table names either its GPU (device) or its architecture (arch)")
    if not isinstance(device if arch is None else arch, str):
        raise ValueError(f"{where}: device/arch must be a string")
    if arch is None and "targets" in data:
        raise ValueError(f"{where}: targets belong to architecture defaults (arch), not to a GPU's table")
    if arch is not None and (not isinstance(targets, list) or not targets
                             or not all(isinstance(t, str) and re.fullmatch(r"sm_\d+", t) for t in targets)):
        raise ValueError(f"{where}: targets={targets!r} must list the compute capabilities it serves (\"sm_90\")")
    dtypes = data.get("dtypes", {})
    if not isinstance(dtypes, dict):
        raise ValueError(f"{where}: dtypes must map a dtype name to its section")
    others = tuple(d for d in NAMES if d != "float16")   # float16's rules are the top-level ones
    unknown = sorted(set(dtypes) - set(others))
    if unknown:
        raise ValueError(f"{where}: dtypes {unknown} are not among {others}")
    return {"device": device, "arch": arch, "targets": tuple(targets),
            **_section(data, where, TABLE_KEYS),
            "dtypes": {name: _section(d, f"{where} dtype {name}") for name, d in dtypes.items()}}


def load_table(path) -> dict:
    """:func:`check_table` of the file at ``path``; ValueError saying why it cannot be used."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read ({exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    return check_table(data, str(path))


# ------------------------------------------------------------------------------------ resolution
def describe(table: dict) -> str:
    """Which table this is, for people: "user table PATH", "architecture defaults sm_90 (PATH)"..."""
    return {"user": f"user table {table.get('path')}", "package": f"shipped table {table.get('path')}",
            "env": f"{FORCE_ENV} table {table.get('path')}",
            "arch": f"architecture defaults {table.get('arch')} ({table.get('path')})",
            "generic": "generic defaults (quickcupy.dispatch.DEFAULT_RULES)"}[table["source"]]


def table_for(device_name: str, arch: str | None = None) -> dict:
    """The table that serves GPU model ``device_name`` of compute capability ``arch`` ("sm_90"; None:
    unknown), by the order of the module docstring: {"device", "arch", "rules", "shapes", "dtypes",
    "source", "path"}; "source" is "env", "user", "package", "arch" or "generic", "path" the file
    read (None for generic); "dtypes" maps a dtype name to its own {"rules", "shapes"}."""
    return _resolve(device_name, arch, os.environ.get(FORCE_ENV, ""), str(user_tuning_dir()))


@functools.lru_cache(maxsize=None)
def _resolve(device_name: str, arch: str | None, forced: str, user_dir: str) -> dict:
    slug = device_slug(device_name)
    candidates = []            # (source, path, the GPU model the table must name, or None)
    if forced and forced != "arch":
        candidates.append(("env", Path(forced).expanduser(), None))
    if forced != "arch":
        candidates += [("user", Path(user_dir) / f"{slug}.json", device_name),
                       ("package", TUNING_DIR / f"{slug}.json", device_name)]
    if arch is not None:       # the architecture defaults whose targets list arch
        candidates += [("arch", path, None) for path in sorted(TUNING_DIR.glob("arch-*.json"))]
    problems, table = [], None
    for source, path, device in candidates:
        if source in ("user", "package") and not path.is_file():
            continue                                  # no table of this GPU there: not a problem
        try:
            t = load_table(path)
            if device is not None and (t["device"] is None or device_slug(t["device"]) != slug):
                raise ValueError(f"{path}: holds the table of {t['device'] or t['arch']!r}, not {device_name!r}")
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if source == "arch" and arch not in t["targets"]:
            continue
        table = {**t, "device": device_name, "arch": t["arch"] or arch, "source": source, "path": str(path)}
        break
    if table is None:
        table = {"device": device_name, "arch": arch, "rules": DEFAULT_RULES, "shapes": (), "dtypes": {},
                 "source": "generic", "path": None}
    for problem in problems:
        warnings.warn(f"quickcupy kernel='auto' ignores a table: {problem}; using the {describe(table)}",
                      TableWarning, stacklevel=4)
    return table


def clear_caches():
    """Forget the tables read and the choices made (after changing a table or the environment)."""
    _resolve.cache_clear()
    kernel_for.cache_clear()


# ------------------------------------------------------------------------------------ choosing
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
    ``dtype`` on CUDA device ``device_id``; a kernel the device cannot run (a table made on another
    GPU) or without instances for ``dtype`` (Design.dtypes) falls back to :data:`DEFAULT_RULES`,
    whose kernels run every activation dtype. ``capturable``: the call is being captured in a CUDA
    graph, where the cuBLAS path cannot run; the table's kernel for the largest M below its dequant
    crossover (that serves M) runs instead."""
    table = table_for(_device_name(device_id), kernels.device_arch(device_id))
    rules = rules_for(section_for(table, dtype), N, K)
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
