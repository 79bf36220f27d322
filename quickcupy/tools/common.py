"""What every tool (bench, ncu, llama, tune, accuracy) does the same way: option parsing, output
paths, progress lines, text tables, JSON, the command line and the one-line usage error.

Every tool spells its shared options alike, parsed here: ``--m 1,16`` (M values, comma-separated),
``--shapes KxN,...`` (weight shapes, x is M x K) and ``--dtype`` (fp16, bf16, float16 or bfloat16,
normalised to the library's activation dtype names "float16" / "bfloat16")."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import datetime, timezone

import numpy as np

from .. import dtypes
from ..quantize import effective_group_size


class UsageError(ValueError):
    """A bad command-line value, found after parsing: the CLI prints it as one line, exit status 2."""


# ------------------------------------------------------------------------------------ options
def parse_int(flag: str, text, minimum: int | None = None) -> int:
    """``text`` as an int >= ``minimum``; UsageError naming ``flag`` otherwise."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise UsageError(f"{flag}={value} must be >= {minimum}")
    return value


def parse_float(flag: str, text, minimum: float | None = None) -> float:
    """``text`` as a finite float >= ``minimum``; UsageError naming ``flag`` otherwise."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise UsageError(f"{flag}={text} must be a finite number")
    if minimum is not None and value < minimum:
        raise UsageError(f"{flag}={value:g} must be >= {minimum:g}")
    return value


def parse_items(flag: str, text: str) -> list:
    """A comma-separated list without empty or repeated items."""
    items = [t.strip() for t in str(text).split(",")]
    if not str(text).strip() or any(not t for t in items):
        raise UsageError(f"{flag}: {text!r} must be a comma-separated list without empty items")
    if len(set(items)) != len(items):
        raise UsageError(f"{flag}: {text!r} repeats an item")
    return items


def parse_int_list(flag: str, text: str, minimum: int = 1) -> list:
    return [parse_int(flag, item, minimum) for item in parse_items(flag, text)]


def parse_ms(text, flag: str = "--m") -> list:
    """``"1,16,128"`` -> [1, 16, 128]; every M >= 1, none repeated."""
    return parse_int_list(flag, text, 1)


def parse_shapes(text, flag: str = "--shapes") -> list:
    """``"8192x8192,4096x12288"`` -> [(K, N), ...]; UsageError naming the bad item."""
    shapes = []
    for item in parse_items(flag, text):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise UsageError(f"{flag}: {item!r} is not KxN with two positive integers (e.g. 4096x12288)")
        K, N = (int(p) for p in parts)
        if K < 1 or N < 1:
            raise UsageError(f"{flag}: {item!r} has a zero dimension; K and N must be >= 1")
        shapes.append((K, N))
    return shapes


SHORT_DTYPES = dtypes.SHORT
DTYPE_HELP = "activation dtype: fp16 (= float16) or bf16 (= bfloat16)"


def parse_dtype(text, flag: str = "--dtype") -> str:
    """Any spelling of an activation dtype (quickcupy.dtypes: fp16, float16, half, bf16, bfloat16; any
    case) -> its canonical name "float16" or "bfloat16"."""
    try:
        return dtypes.name(str(text).strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not one of {', '.join(dtypes.SPELLINGS)}") from None


def deprecated(tool: str, old: str, new: str):
    """One line on stderr: an old option spelling of ``python -m quickcupy TOOL`` still works, and
    what to write instead."""
    print(f"python -m quickcupy {tool}: {old} is deprecated; use {new}", file=sys.stderr)


def parse_names(flag: str, text, available) -> list:
    """Names from a comma-separated ``text`` (None: all of ``available``), each one of ``available``."""
    if text is None:
        return list(available)
    names = parse_items(flag, text)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UsageError(f"{flag}: unknown {', '.join(map(repr, unknown))}; available: {', '.join(available)}")
    return names


def parse_group_size(flag: str, text, in_features=()) -> int:
    """A group size by the library's one rule (quickcupy.quantize.effective_group_size), checked
    against every in_features it will meet; returns it as given (-1 stays -1)."""
    value = parse_int(flag, text)
    for K in in_features or (value if value > 0 else 32,):
        try:
            effective_group_size(value, K)
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None
    return value


def check_output_path(flag: str, path):
    """Fails before any work when ``path`` cannot be written: its folder must exist and be writable
    and it must not be a folder itself. None passes (no output asked for)."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable")


# ------------------------------------------------------------------------------------ output
def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def num(value) -> str:
    """A number in 3-4 significant characters ("-" for None/NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ordered_unique(values) -> list:
    return list(dict.fromkeys(values))


def table(headers, rows) -> str:
    """Right-aligned columns; cells are str() of the values."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def format_rows(rows) -> str:
    """A table of dicts (columns: the union of their keys, in first-seen order); floats via num()."""
    if not rows:
        return "(no rows)"
    columns = ordered_unique(k for r in rows for k in r)

    def cell(v):
        if isinstance(v, (float, np.floating)):
            return num(float(v))
        return "-" if v is None else str(v)
    return table(columns, [[cell(r.get(c)) for c in columns] for r in rows])


class Progress:
    """Status lines on stderr: rewritten in place on a terminal, one line per step otherwise.

    ``note(text)`` stays on screen; ``step(text)`` counts towards ``total`` (shown as [i/total]) and
    on a non-terminal prints only when ``log_steps``; ``close()`` clears the line."""

    def __init__(self, name: str, total: int = 0, enabled: bool = True, stream=None, log_steps: bool = False):
        self.name, self.total, self.done, self.enabled = name, total, 0, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_steps = log_steps
        self.t0 = time.perf_counter()
        self._width = 0

    def note(self, text: str):
        """A message that stays (a phase, a skipped kernel); warnings show even when disabled."""
        if self.enabled or text.startswith("warning"):
            self._clear()
            print(f"{self.name}: {text}", file=self.stream, flush=True)

    def step(self, text: str):
        self.done += 1
        if not self.enabled:
            return
        count = f"{self.done}/{self.total} " if self.total else ""
        line = f"[{count}{time.perf_counter() - self.t0:.0f}s] {text}"
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self.stream.flush()
            self._width = len(line)
        elif self.log_steps:
            print(f"{self.name}: {line}", file=self.stream, flush=True)

    def close(self, summary: str | None = None):
        self._clear()
        if self.enabled and summary:
            print(f"{self.name}: {summary}", file=self.stream, flush=True)

    def _clear(self):
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
