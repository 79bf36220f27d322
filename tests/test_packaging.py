"""README's commands are what CI runs; the CUDA sources ship inside the package."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


ROUTES = ("cuda13", "cuda12")      # README's first route is the one CI runs last


def _readme_commands():
    """The install lines of README's code blocks, in order."""
    commands, in_block = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block and line.startswith("python -m pip install"):
            commands.append(line)
    return commands


def test_readme_has_two_setup_commands_per_route_and_ci_runs_each_test_one():
    commands = _readme_commands()
    expected = [f'python -m pip install ".[{route}]" && python -m quickcupy bench' for route in ROUTES]
    tests = [f'python -m pip install ".[{route},test]" && python -m pytest -q' for route in ROUTES]
    assert sorted(commands) == sorted(expected + tests), commands
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    for command in tests:
        assert ci.count(command) == 1, f".ci/run must run README's {command!r} once, as a line of its own"
    readme_test = next(c for c in commands if c.endswith("python -m pytest -q"))
    assert readme_test == tests[0] and ci[-1] == readme_test, "the last line of .ci/run must be README's test command"
    assert "ruff check ." in ci


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
