"""Per-kernel GPU time of one eager decode step of a 7B-shaped Llama stack (2 layers, quick
backend, 128 cached positions) at batch 1 and 256: where the non-GEMM time of issue 13 goes.
Each step runs inside an NVTX range, so ncu profiles it alone (warm-up steps outside it):

    ncu --clock-control none --nvtx --nvtx-include "decode_b1/" --nvtx-include "decode_b256/" \
        --metrics gpu__time_duration.sum --csv python results/h100/llama_nongemm_profile.py > profile.csv

Written for both the code before and after the fused decode step (it uses only the API they share:
LlamaModel(config, layers, "quick", 128) and model(x, cache)); llama_nongemm_profile.txt holds the
summary of the H100 run.
"""
import cupy
import numpy as np
from cupyx.profiler import time_range

from quickcupy.llama import LlamaConfig, LlamaModel, random_layers

config = LlamaConfig.preset("7b").replace(num_hidden_layers=2)
layer = random_layers(config.replace(num_hidden_layers=1), seed=0)[0].quantized(128)
model = LlamaModel(config, [layer, layer], "quick", 128)
rng = cupy.random.RandomState(0)
for batch in (1, 256):
    cache = model.new_cache(batch, 160)
    model(rng.standard_normal((batch, 128, config.hidden_size), dtype=np.float32).astype(np.float16), cache)
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
