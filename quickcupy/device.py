"""What is this machine: CUDA device (through CuPy and nvidia-ml-py) and software versions."""
from __future__ import annotations

import platform
import sys

import numpy as np

from . import __version__
from ._cupy import import_cupy


def no_gpu_reason():
    """None when a CUDA device is usable, else a one-line reason."""
    try:
        cupy = import_cupy()
    except ImportError as exc:
        return str(exc)
    except Exception as exc:  # a broken CUDA install
        return f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        text = str(exc)
        if "InsufficientDriver" in text or "NoDevice" in text or "100" in text.split(":")[0]:
            return _driver_reason(cupy) or f"no CUDA device found ({text.splitlines()[0]})"
        return f"no CUDA device found ({type(exc).__name__}: {text.splitlines()[0]})"
    if n == 0:
        return "no CUDA device found (the NVIDIA driver sees no GPU)"
    return None


def _driver_reason(cupy):
    """Says which of "no driver" / "driver too old" holds, from the driver's own version (0 = none)."""
    try:
        driver = cupy.cuda.runtime.driverGetVersion()
    except Exception:
        driver = 0
    if driver == 0:
        return "no NVIDIA driver is installed (no libcuda), so no CUDA device can be used"
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    if driver < runtime:
        return (f"the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10} but CuPy was built "
                f"for CUDA {runtime // 1000}.{runtime % 1000 // 10}: update the driver or install the CuPy "
                f"wheel of your CUDA version")
    return "the NVIDIA driver sees no CUDA device"


def versions() -> dict:
    out = {"quickcupy": __version__, "python": sys.version.split()[0], "numpy": np.__version__,
           "platform": platform.platform()}
    try:
        cupy = import_cupy()
        out["cupy"] = cupy.__version__
        try:
            out["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        except Exception:
            pass
    except Exception:
        out["cupy"] = None
    return out


def device_info(index: int = 0) -> dict:
    """Name, compute capability, SMs, memory, L2, and from NVML driver, clocks, temperature, power limit.

    Returns {"available": False, "reason": ...} without a usable GPU.
    """
    reason = no_gpu_reason()
    if reason is not None:
        return {"available": False, "reason": reason}
    cupy = import_cupy()
    props = cupy.cuda.runtime.getDeviceProperties(index)
    info = {
        "available": True,
        "index": index,
        "name": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "compute_capability": f"{props['major']}.{props['minor']}",
        "sm_count": props["multiProcessorCount"],
        "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
        "l2_bytes": props["l2CacheSize"],
    }
    info.update(_nvml_info(index))
    return info


def _nvml_info(index: int) -> dict:
    try:
        import pynvml
    except ImportError:
        return {"nvml": "nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return {"nvml": f"NVML unavailable: {exc}"}
    out = {}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        fields = {
            "driver": lambda: pynvml.nvmlSystemGetDriverVersion(),
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "mem_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "power_limit_w": lambda: pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000.0,
        }
        for key, read in fields.items():
            try:
                value = read()
                out[key] = value.decode() if isinstance(value, bytes) else value
            except Exception:
                out[key] = None
    finally:
        pynvml.nvmlShutdown()
    return out
