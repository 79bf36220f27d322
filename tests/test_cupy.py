"""quickcupy._cupy and its uses (CPU): two CuPy wheels warn once with the fix, a missing CuPy names
the extra to install, where the package first needs CuPy."""
import importlib.metadata
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from quickcupy import _cupy, device

ROOT = Path(__file__).resolve().parents[1]


def _pretend_installed(monkeypatch, names):
    """importlib.metadata sees exactly the CuPy wheels ``names`` (other distributions as they are)."""
    real = importlib.metadata.distribution

    def distribution(name):
        if name in _cupy.WHEELS:
            if name not in names:
                raise importlib.metadata.PackageNotFoundError(name)
            return object()
        return real(name)
    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_two_wheels_warn_one_line_naming_the_fix(monkeypatch):
    _pretend_installed(monkeypatch, ("cupy-cuda12x", "cupy-cuda13x"))
    with pytest.warns(_cupy.CupyWheelsWarning) as record:
        _cupy.warn_if_two_wheels()
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message
    assert "pip uninstall -y cupy-cuda12x && pip install --force-reinstall --no-deps cupy-cuda13x" in message


@pytest.mark.parametrize("names", [(), ("cupy-cuda12x",), ("cupy-cuda13x",)])
def test_one_or_no_wheel_is_quiet(monkeypatch, names):
    _pretend_installed(monkeypatch, names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cupy.warn_if_two_wheels()
    assert _cupy.installed_wheels() == [n for n in _cupy.WHEELS if n in names]


def test_importing_the_package_warns_with_two_wheels():
    """A fresh interpreter whose metadata lists both wheels: `import quickcupy` warns, once."""
    code = ("import importlib.metadata as m\n"
            "real = m.distribution\n"
            "m.distribution = lambda n: object() if n in ('cupy-cuda12x', 'cupy-cuda13x') else real(n)\n"
            "import quickcupy, quickcupy.device\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("CupyWheelsWarning") == 1, res.stderr
    assert "pip uninstall -y cupy-cuda12x" in res.stderr


def test_missing_cupy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)       # `import cupy` fails as if not installed
    _pretend_installed(monkeypatch, ())
    with pytest.raises(ImportError, match=r'pip install "quickcupy\[cuda13\]".*"quickcupy\[cuda12\]"'):
        _cupy.import_cupy()
    reason = device.no_gpu_reason()
    assert reason.startswith("CuPy is not installed") and "quickcupy[cuda12]" in reason
    assert device.versions()["cupy"] is None


def test_wheel_without_its_files_names_the_reinstall(monkeypatch):
    """What uninstalling one of two CuPy wheels leaves: the other's metadata, no `cupy` package."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    _pretend_installed(monkeypatch, ("cupy-cuda12x",))
    with pytest.raises(ImportError, match="pip install --force-reinstall --no-deps cupy-cuda12x"):
        _cupy.import_cupy()


def test_a_broken_cupy_keeps_its_own_error(monkeypatch):
    def broken(name):
        raise ImportError("libcudart.so.13: cannot open shared object file", name="cupy_backends.cuda.api")
    monkeypatch.setattr(_cupy.importlib, "import_module", broken)
    with pytest.raises(ImportError, match="libcudart"):
        _cupy.import_cupy()
