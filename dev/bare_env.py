"""Does quickcupy run on a machine with only the NVIDIA driver, given exactly what an extra installs?

On a GPU machine (as root, from the checkout):

    python dev/bare_env.py cuda13        # the [cuda13] extra: CuPy, NVRTC, headers, cuBLAS, cuRAND
    python dev/bare_env.py cuda13-no-cublas   # the same without cuBLAS/cuRAND (what the extra held before)

It makes a fresh virtual environment holding only those distributions (and what they require, read
from their metadata), symlinked from this machine's site-packages, then runs its Python with
``CUDA_PATH``/``CUDA_HOME`` unset, an empty ``LD_LIBRARY_PATH``, the checkout on ``PYTHONPATH``, and
every system CUDA toolkit folder (``/usr/local/cuda*``) hidden behind an empty tmpfs in a private
mount namespace (``unshare -m``), so nothing of a toolkit can be loaded. The child runs fp16 cuBLAS,
the quick and dequant GEMMs through ``bench`` and the Llama dense backend, and prints which
``libcublas*``/``libnvrtc*`` files the process loaded.
"""
from __future__ import annotations

import glob
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ["numpy", "nvidia-ml-py", "ml_dtypes"]                       # quickcupy's install_requires
ROUTES = {"cuda13": BASE + ["cupy-cuda13x", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cublas",
                            "nvidia-curand"],
          "cuda13-no-cublas": BASE + ["cupy-cuda13x", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime"]}
CHILD = r"""
import re, sys
import cupy, numpy as np
from quickcupy.__main__ import main
a = cupy.random.standard_normal((256, 512), dtype=cupy.float32).astype(cupy.float16)
print("cupy.matmul fp16:", float(abs((a @ a.T).astype(cupy.float32) - a.astype(cupy.float32) @ a.T.astype(cupy.float32)).max()))
rc = main(["bench", "--m", "1,256", "--shapes", "4096x4096", "--kernels", "fp16,quick,dequant,auto", "--repeats", "5", "--quiet"])
rc |= main(["llama", "--preset", "7b", "--layers", "1", "--batch", "1", "--prompt", "16", "--gen", "4",
            "--backends", "dense,quick", "--check-tokens", "2"])
libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if re.search(r"lib(cublas|nvrtc|cudart|curand)", l)})
print("loaded:", *libs, sep="\n  ")
sys.exit(rc)
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names) -> list:
    """The distributions ``names`` need, themselves included (no extras, no markers that fail)."""
    todo, seen = list(names), {}
    while todo:
        dist = md.distribution(todo.pop())
        key = _norm(dist.metadata["Name"])
        if key in seen:
            continue
        seen[key] = dist
        for req in dist.requires or ():
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0])
    return list(seen.values())


def site_of(dists, folder: Path):
    """Symlinks the files of ``dists`` into ``folder``: a top-level package of one distribution as a
    whole, but a folder several wheels share (NVIDIA's ``nvidia/``, whose CUDA 13 wheels all write
    into ``nvidia/cu13/lib``) file by file, so that only the listed distributions' files appear."""
    owners = {}
    for dist in dists:
        for f in dist.files or ():
            top = Path(str(f)).parts[0]
            if not str(f).startswith("..") and top != "__pycache__":
                owners.setdefault(top, set()).add(dist.metadata["Name"])
    for dist in dists:
        for f in dist.files or ():
            rel = Path(str(f))
            top = rel.parts[0]
            if str(f).startswith("..") or top == "__pycache__":
                continue
            shared = top == "nvidia" or len(owners[top]) > 1
            src, dst = Path(dist.locate_file(rel if shared else top)), folder / (rel if shared else top)
            if src.exists() and not dst.exists() and not dst.is_symlink():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(src)


def main() -> int:
    route = sys.argv[1] if len(sys.argv) > 1 else "cuda13"
    dists = closure(ROUTES[route])
    print(f"{route}: " + ", ".join(f"{d.metadata['Name']} {d.version}" for d in dists))
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        python = venv / "bin" / "python"
        site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        site_of(dists, site)
        env = {k: v for k, v in os.environ.items() if k not in ("CUDA_PATH", "CUDA_HOME", "PYTHONPATH", "VIRTUAL_ENV")}
        env.update(LD_LIBRARY_PATH="", PYTHONPATH=str(ROOT), PYTHONNOUSERSITE="1",
                   CUPY_CACHE_DIR=str(Path(tmp) / "kernel_cache"))
        toolkits = [p for p in glob.glob("/usr/local/cuda*") if os.path.isdir(p) and not os.path.islink(p)]
        hide = "".join(f"mount -t tmpfs tmpfs {p} && " for p in toolkits)
        script = Path(tmp) / "child.py"
        script.write_text(CHILD)
        if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0:
            print("hidden:", *toolkits or ["(no /usr/local/cuda* folder)"])
            cmd = ["unshare", "-m", "sh", "-c", f"{hide}exec {python} {script}"]
        else:                                 # no mount namespace here: the loaded libraries tell
            print("NOT hidden (unshare -m is not permitted here):", *toolkits)
            cmd = [str(python), str(script)]
        return subprocess.run(cmd, env=env, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main())
