"""Helpers shared by the notebooks: where the committed results are, whether a GPU (and ncu) is
here, loading a results file or saying why not, and small drawing helpers.

Run from notebooks/ in a checkout, this puts the checkout first on ``sys.path`` so that
``import quickcupy`` finds the sources next to it (no install needed).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if (REPO / "quickcupy" / "__init__.py").is_file() and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

RESULTS_ENV = "QUICKCUPY_RESULTS"


def results_dir() -> Path:
    """The folder of committed measurements: $QUICKCUPY_RESULTS, else <repo>/results/h100."""
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else REPO / "results" / "h100"


def shown(path) -> str:
    """``path`` relative to the checkout when it lies inside it (committed outputs name no machine's
    folders), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def load_results(name: str, what: str):
    """The parsed JSON file ``name`` of :func:`results_dir`, or None after printing one line that
    says which file is missing and which plot (``what``) is skipped."""
    path = results_dir() / name
    if not path.is_file():
        print(f"{path} not found: skipping {what} (set {RESULTS_ENV} to a folder holding {name})")
        return None
    with open(path) as f:
        return json.load(f)


def gpu_reason():
    """None when a CUDA device is usable, else a one-line reason (quickcupy.device.no_gpu_reason)."""
    from quickcupy.device import no_gpu_reason
    return no_gpu_reason()


def gpu_available() -> bool:
    return gpu_reason() is None


def ncu_available() -> bool:
    """A usable GPU and Nsight Compute's ``ncu`` (on PATH or where quickcupy.tools.ncu looks)."""
    if not gpu_available():
        return False
    from quickcupy.tools.ncu import NcuError, find_ncu
    try:
        find_ncu()
    except NcuError:
        return False
    return True


def device_name(report) -> str:
    """The GPU a results file was measured on, e.g. "NVIDIA H100 80GB HBM3"."""
    dev = (report or {}).get("device") or {}
    if dev.get("available") is False:
        return "the CPU (no GPU)"
    return dev.get("name") or "an unknown device"


# ------------------------------------------------------------------------------------- drawing
def heatmap(ax, values, title, cmap=None, label=None, annotate=False, fontsize=5, **kwargs):
    """A (rows, cols) integer map drawn with one colour per value, rows top to bottom, with a
    colour bar; ``annotate`` writes each value in its cell."""
    import matplotlib.pyplot as plt
    values = np.asarray(values)
    lo, hi = int(values.min()), int(values.max())
    if cmap is None:
        cmap = "tab10" if hi - lo < 10 else "turbo"
    cmap = plt.get_cmap(cmap, hi - lo + 1)
    im = ax.imshow(values, cmap=cmap, vmin=lo - 0.5, vmax=hi + 0.5, interpolation="nearest", **kwargs)
    ax.set_title(title, fontsize=10)
    if annotate:
        for (r, c), v in np.ndenumerate(values):
            ax.text(c, r, str(v), ha="center", va="center", fontsize=fontsize)
    bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03,
                             ticks=range(lo, hi + 1, max(1, (hi - lo + 1) // 8)))
    if label:
        bar.set_label(label)
    return im


def lanes_banks(ax, addresses, width, title):
    """Which banks each lane of ONE warp-wide shared-memory access touches (``width`` bytes per lane,
    byte ``addresses`` of lanes 0-31), coloured by the phase that serves the lane; an x marks a bank
    that two different words of one phase hit (a bank conflict: one more wavefront)."""
    from matplotlib.patches import Patch
    from quickcupy.analysis import banks
    addr = np.asarray(addresses, np.int64)
    lanes = np.arange(banks.WARP)
    phase = lanes // banks.lanes_per_phase(width)
    words = addr[:, None] // banks.BANK_BYTES + np.arange(max(1, width // banks.BANK_BYTES))
    image = np.full((banks.WARP, banks.BANKS), np.nan)
    for lane in lanes:
        image[lane, words[lane] % banks.BANKS] = phase[lane]
    n_phases = int(phase.max()) + 1
    colours = ax.imshow(image, cmap="tab10", vmin=-0.5, vmax=9.5, interpolation="nearest", aspect="auto")
    for ph in range(n_phases):               # distinct words per bank in this phase
        w = np.unique(words[phase == ph].ravel())
        crowded = np.bincount(w % banks.BANKS, minlength=banks.BANKS) > 1
        for lane in lanes[phase == ph]:
            for bank in np.unique(words[lane] % banks.BANKS):
                if crowded[bank]:
                    ax.text(bank, lane, "x", ha="center", va="center", fontsize=7)
        if ph:
            ax.axhline(lanes[phase == ph][0] - 0.5, color="black", linewidth=0.6)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("bank (4-byte words, address / 4 mod 32)")
    ax.set_ylabel("lane")
    handles = [Patch(color=colours.cmap(colours.norm(ph)), label=f"phase {ph}") for ph in range(n_phases)]
    ax.legend(handles=handles + [Patch(color="white", label="x = bank conflict")], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))


def per_shape(items, key=lambda p: (p["K"], p["N"], p["group_size"])):
    """{shape: [items]} in first-seen order (points of a bench sweep grouped by weight shape)."""
    out = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out


def panels(n, width=5.0, height=3.8, cols=3):
    """A figure with ``n`` axes in rows of at most ``cols``; unused axes are hidden."""
    import matplotlib.pyplot as plt
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def by_m(points, field):
    """(M values, ``field`` values) of bench points in increasing M; nulls become NaN."""
    points = sorted(points, key=lambda p: p["M"])
    return [p["M"] for p in points], [np.nan if p[field] is None else p[field] for p in points]


def m_axis(ax, points):
    """A log2 x axis of M with one tick per M of the points."""
    ms = sorted({p["M"] for p in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("M (rows of x: tokens)")
    ax.grid(True, which="both", alpha=0.3)
