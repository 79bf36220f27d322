"""CuPy for the package, imported lazily (the CPU tools run without it) and checked once: a missing
CuPy names the extra that installs it, two CuPy wheels name the command that keeps one."""
from __future__ import annotations

import importlib
import importlib.metadata
import warnings

# The CuPy wheels of quickcupy's extras, newest CUDA first (the one a fix keeps). Every CuPy wheel
# installs the same `cupy` package, so with two the files of whichever came last win.
WHEELS = {"cupy-cuda13x": "cuda13", "cupy-cuda12x": "cuda12"}
INSTALL = ('install quickcupy with the extra of your CUDA major: pip install "quickcupy[cuda13]" '
           '(NVIDIA driver 580 or newer) or "quickcupy[cuda12]" (driver 525 or newer); '
           'from a checkout, pip install ".[cuda13]"')


class CupyWheelsWarning(UserWarning):
    """Both CuPy wheels are installed: which one's files `import cupy` runs is undefined."""


def installed_wheels() -> list:
    """The CuPy wheels of :data:`WHEELS` that this environment has, in WHEELS' order."""
    found = []
    for name in WHEELS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def two_wheels_message() -> str | None:
    """One line naming the fix when more than one CuPy wheel is installed, else None."""
    found = installed_wheels()
    if len(found) < 2:
        return None
    keep, drop = found[0], found[1:]
    # Uninstalling one wheel deletes the files the two share, so the kept one is reinstalled.
    return (f"{' and '.join(found)} are both installed and share the `cupy` package; keep the one of "
            f"your CUDA major: pip uninstall -y {' '.join(drop)} && pip install --force-reinstall "
            f"--no-deps {keep} (for CUDA 12 swap the two names)")


def warn_if_two_wheels():
    """Warns (:class:`CupyWheelsWarning`, one line) when both CuPy wheels are installed."""
    message = two_wheels_message()
    if message is not None:
        warnings.warn(message, CupyWheelsWarning, stacklevel=2)


def import_cupy():
    """The ``cupy`` module. Without CuPy: ImportError naming the extra to install; with a wheel
    installed whose files are gone (another CuPy wheel's uninstall removed them): the reinstall."""
    try:
        return importlib.import_module("cupy")
    except ImportError as exc:
        if exc.name != "cupy":          # CuPy is there but fails inside: its own message says why
            raise
        found = installed_wheels()
        if found:
            raise ImportError(f"{found[0]} is installed but has no `cupy` package (uninstalling another "
                              f"CuPy wheel deletes the files they share): pip install --force-reinstall "
                              f"--no-deps {found[0]}", name="cupy") from exc
        raise ImportError(f"CuPy is not installed: {INSTALL}", name="cupy") from exc
