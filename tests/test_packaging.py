"""README's commands are what CI runs; the CUDA sources ship inside the package."""
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    return re.findall(r"```\n(python -m pip install .*?)\n```", (ROOT / "README.md").read_text())


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("python -m quickcupy bench")
    assert commands[1].endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == commands[1], "the last line of .ci/run must be README's test command"


@pytest.mark.slow
def test_wheel_ships_cuda_sources(tmp_path):
    """A non-editable install must find the kernels (and carries no dev/ probe): build the wheel and look inside."""
    pytest.importorskip("setuptools")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"could not build a wheel here: {res.stderr.strip().splitlines()[-1:]}")
    wheel = next(tmp_path.glob("quickcupy-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    from quickcupy.registry import SOURCES
    for src in ("quant_common.cuh", "smem_maps.cuh", *SOURCES):
        assert f"quickcupy/cuda/{src}" in names, sorted(names)
    from quickcupy.dispatch import TUNING_DIR        # auto's tables, measured and architecture defaults
    assert {f"quickcupy/tuning/{p.name}" for p in TUNING_DIR.glob("*.json")} <= names, sorted(names)
    # The experiments of dev/ stay out of the wheel.
    probes = {p.name for p in (ROOT / "dev").glob("*.py")}
    assert probes and not [n for n in names if n.rsplit("/", 1)[-1] in probes], sorted(names)
