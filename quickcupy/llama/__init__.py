"""A Llama decoder stack on quickcupy's 4-bit linears (:mod:`.model`) for the families of
:mod:`.families` (Llama 2/3.x, Mistral, Qwen2/2.5) and 4-bit checkpoints of it (:mod:`.checkpoint`:
AWQ, GPTQ, compressed-tensors), with its small ops as kernels (:mod:`.ops`) and whole-model
generation (:meth:`LlamaModel.generate`, CUDA-graph decode for the 4-bit backends)."""
from .families import FAMILIES, Family, RopeScaling
from .checkpoint import Checkpoint, TensorStore, load_checkpoint, save_awq_checkpoint
from .model import (BACKENDS, NORMS, PRESETS, PROJECTIONS, DecodeGraph, HeadWeights, KVCache, LayerWeights,
                    LlamaBlock, LlamaConfig, LlamaModel, apply_rope, attention, make_linear, projection_shapes,
                    random_head, random_layers, rms_norm, rope_tables, silu_mul)
