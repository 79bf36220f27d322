"""Shared test helpers: the GPU marker's skip, fresh random data, relative error."""
import numpy as np
import pytest

from quickcupy.device import no_gpu_reason
from quickcupy.reference import rel_error  # noqa: F401 (tests import it from here)

_NO_GPU = no_gpu_reason()


# The tests this run executes, after -k/-m deselection (the compile pool of test_kernels starts on
# exactly the builds they ask for).
SELECTED = pytest.StashKey[list]()


@pytest.hookimpl(trylast=True)        # after -k/-m have deselected
def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason shown, where no CUDA device is usable; the
    selected items are kept in ``config.stash[SELECTED]``."""
    config.stash[SELECTED] = list(items)
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


def attention_f64(q, keys, values, length, window=None):
    """float64 attention of one query per head over positions [max(0, length - window), length)
    (all of the first ``length`` without a window), NumPy: q (B, nh, d), keys (B, nkv, d, T),
    values (B, nkv, T, d) -> (B, 1, nh * d); query head h reads KV head h // (nh / nkv)."""
    B, nh, d = q.shape
    lo = 0 if window is None else max(0, length - window)
    group = nh // keys.shape[1]
    k = np.repeat(np.asarray(keys[..., lo:length], np.float64), group, axis=1)        # (B, nh, d, T)
    v = np.repeat(np.asarray(values[:, :, lo:length], np.float64), group, axis=1)     # (B, nh, T, d)
    s = np.einsum("bhd,bhdt->bht", np.asarray(q, np.float64), k) / np.sqrt(d)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.einsum("bht,bhtd->bhd", p / p.sum(axis=-1, keepdims=True), v).reshape(B, 1, nh * d)


def side_stream():
    """A new non-blocking CuPy stream, handed out once the current stream's work is done: a
    non-blocking stream does not wait for the legacy default stream, where a test's inputs were made."""
    import cupy
    cupy.cuda.get_current_stream().synchronize()
    return cupy.cuda.Stream(non_blocking=True)
