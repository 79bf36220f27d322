"""Edited copies of a kernel source, each timed in a process of its own: what the probes share.

A variant is a source file of cuda/ with named text edits applied (each text found exactly once).
:func:`run` writes every variant into a temporary copy of cuda/ and runs a child command with
``$QUICKCUPY_CUDA_DIR`` pointing at it (the loader reads that folder and digests it once per
process, so each variant needs its own process); the child prints one JSON value as its last line.
The package's cuda/ is only read.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CUDA = Path(__file__).resolve().parents[1] / "cuda"


def replace_once(text: str, find: str, replace: str, what: str) -> str:
    """``text`` with ``find`` replaced; RuntimeError naming ``what`` unless it is there exactly once
    (the source changed under the edit)."""
    if text.count(find) != 1:
        raise RuntimeError(f"{what}: the source no longer has exactly one {find.strip()[:70]!r} "
                           f"(found {text.count(find)})")
    return text.replace(find, replace)


def edited(source: str, edits, what: str) -> str:
    """``source`` with ``edits`` ((find, replace) pairs) applied in order."""
    for find, replace in edits:
        source = replace_once(source, find, replace, what)
    return source


def run(command: list, filename: str, variants: dict, rounds: int = 1) -> dict:
    """{name: [the child's JSON, one per round]} for variants {name: (text of ``filename`` or None
    for the checkout's, extra arguments of the command)}, the whole list run ``rounds`` times in order."""
    results = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (text, extra) in variants.items():
            env = dict(os.environ)
            with tempfile.TemporaryDirectory() as tmp:
                if text is not None:
                    shutil.copytree(CUDA, Path(tmp) / "cuda")
                    (Path(tmp) / "cuda" / filename).write_text(text)
                    env["QUICKCUPY_CUDA_DIR"] = str(Path(tmp) / "cuda")
                done = subprocess.run(command + list(extra), env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name}: {done.stderr.strip()[-2000:]}")
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results
