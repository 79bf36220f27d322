"""Where does the non-GEMM time of a Llama decode step go, kernel by kernel?

One eager decode step of a 7B-shaped Llama stack (2 layers, quick backend, 128 cached positions) at
batch 1 and 256, each inside an NVTX range, so ncu profiles it alone (the warm-up steps stay outside);
from the checkout, on a GPU:

    ncu --clock-control none --nvtx --nvtx-include "decode_b1/" --nvtx-include "decode_b256/" \\
        --metrics gpu__time_duration.sum --csv python dev/llama_profile.py > profile.csv

It uses only ``LlamaModel(config, layers, "quick", 128)`` and ``model(x, cache)``, so the same file
profiles the code before and after a change of the decode step. results/h100/llama_nongemm_profile.txt
is the summary of the H100 run (made by the same code under the name
results/h100/llama_nongemm_profile.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout's quickcupy

BATCHES = (1, 256)
PROMPT, CACHE_LEN = 128, 160


def main() -> int:
    import cupy
    import numpy as np
    from cupyx.profiler import time_range

    from quickcupy.llama import LlamaConfig, LlamaModel, random_layers

    config = LlamaConfig.preset("7b").replace(num_hidden_layers=2)
    layer = random_layers(config.replace(num_hidden_layers=1), seed=0)[0].quantized(128)
    model = LlamaModel(config, [layer, layer], "quick", 128)
    rng = cupy.random.RandomState(0)
    for batch in BATCHES:
        cache = model.new_cache(batch, CACHE_LEN)
        model(rng.standard_normal((batch, PROMPT, config.hidden_size), dtype=np.float32).astype(np.float16), cache)
        x = rng.standard_normal((batch, 1, config.hidden_size), dtype=np.float32).astype(np.float16)
        for _ in range(2):                 # compiles, allocates
            model(x, cache)
        cupy.cuda.runtime.deviceSynchronize()
        with time_range(f"decode_b{batch}"):
            model(x, cache)
            cupy.cuda.runtime.deviceSynchronize()
        del cache
        cupy.get_default_memory_pool().free_all_blocks()
    print("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
