"""Shared test helpers: the GPU marker's skip, fresh random data, relative error."""
import numpy as np
import pytest

from quickcupy.device import no_gpu_reason

_NO_GPU = no_gpu_reason()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason shown, where no CUDA device is usable."""
    if _NO_GPU is None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {_NO_GPU}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    import zlib
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def rel_error(y, ref) -> float:
    """||y - ref|| / ||ref|| in float64 (NaN anywhere gives NaN)."""
    y = np.asarray(y.get() if hasattr(y, "get") else y, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
