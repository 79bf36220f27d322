"""GPU time of the fused decode step's attention (decode_attention_rope: rope + cache write +
attention, one kernel) at Llama-2-7B shapes (32 heads, head_dim 128, 136 cached positions) per
batch, with K and V tiles in two shared-memory buffers and in one (quickcupy.attention.one_buffer
chooses by the grid); cupyx.profiler.benchmark, median of 50. llama_attention_variants.txt holds the
H100 run."""
import cupy
import numpy as np
from cupyx.profiler import benchmark

from quickcupy import attention
from quickcupy.llama import LlamaConfig, rope_tables

nh = nkv = 32
d, length, max_len = 128, 136, 160
cos, sin = (cupy.asarray(t) for t in rope_tables(LlamaConfig.preset("7b"), np.arange(256)))
chosen = attention.one_buffer
print(f"{'batch':>5} {'two buffers us':>15} {'one buffer us':>14} {'chosen':>11} {'KV GB/s (best)':>15}")
for B in (1, 16, 64, 256):
    rs = cupy.random.RandomState(B)
    qkv = rs.standard_normal((B, 1, nh + 2 * nkv, d), dtype=np.float32).astype(np.float16)
    keys = rs.standard_normal((B, nkv, d, max_len), dtype=np.float32).astype(np.float16)
    values = rs.standard_normal((B, nkv, max_len, d), dtype=np.float32).astype(np.float16)
    us = {}
    for one in (False, True):
        attention.one_buffer = lambda *args, one=one: one
        t = benchmark(attention.decode_attention_rope, (qkv, keys, values, cos, sin, nh, length), n_repeat=50,
                      n_warmup=5)
        us[one] = float(np.median(t.gpu_times)) * 1e6
    attention.one_buffer = chosen
    pick = chosen(B * nh, d, 1, 2, 0)
    gbs = 2 * B * nkv * length * d * 2 / (min(us.values()) * 1e-6) / 1e9
    print(f"{B:>5} {us[False]:>15.1f} {us[True]:>14.1f} {'one' if pick else 'two':>11} {gbs:>15.0f}")
