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
