"""The repository itself: no committed file holds a path of the machine it was made on, and the
documents speak of the code, not of how it was made."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A home, a scratch checkout or a mounted folder of some machine; /tmp only in the install logs,
# which record the commands that made their throwaway environments.
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(root|home|work|mnt|Users|tmp|opt)/[\w.-]")
ALLOWED = {
    "quickcupy/tools/ncu.py": {"opt"},              # where Nsight Compute installs itself
    "results/cpu/install_cuda12.log": {"tmp"},
    "results/cpu/install_cuda13.log": {"tmp"},
}


def _files():
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in names.splitlines():
        path = ROOT / name
        if path.is_file() and path.suffix not in (".png", ".ncu-rep"):
            yield name, path.read_text(errors="replace")


def test_no_committed_file_holds_a_machine_path():
    found = []
    for name, text in _files():
        for m in MACHINE_PATH.finditer(text):
            if m.group(1) not in ALLOWED.get(name, ()):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{name}:{line}: {text[m.start():m.start() + 60].splitlines()[0]}")
    assert not found, "absolute machine paths:\n" + "\n".join(found[:20])


# Words of how the code was made, spelled in two parts so that this file passes its own check.
HISTORY_WORDS = re.compile(r"\b(" + "ses" + "sions?|helper " + "agents?)\b", re.I)


def test_the_repository_speaks_of_the_code():
    found = [name for name, text in _files() if HISTORY_WORDS.search(text)]
    assert not found, found
