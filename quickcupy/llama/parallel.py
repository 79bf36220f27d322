"""Tensor parallelism for the Llama model (Megatron-LM's split): each of ``world`` ranks holds a
slice of every layer and computes with it; two all-reduces per layer and one all-gather per LM head
call join the slices. A rank's model is a plain :class:`LlamaModel` of its :class:`ShardConfig`.

Rank r of ``world`` holds::

    q/k/v      column-parallel by heads: query heads [r nh/w, (r+1) nh/w), KV heads [r nkv/w, (r+1) nkv/w)
               (query head h reads KV head h // (nh/nkv), which the same rank holds); biases split alike
    o          row-parallel: the in_features of its query heads; the partial outputs are all-reduced
    gate/up    column-parallel: intermediate [r I/w, (r+1) I/w)
    down       row-parallel: the same intermediate slice; all-reduced
    embedding  replicated;  norms: replicated
    LM head    column-parallel by vocabulary (rank order = vocabulary order), all-gathered into the
               full logits, so every rank samples the same tokens
    KV cache   its own KV heads

Rules (ValueError naming them): ``world`` divides num_key_value_heads (so num_attention_heads too),
intermediate_size and the vocabulary; a 4-bit layer splits into whole 32-wide tiles and, on
in_features, whole quantization groups (:meth:`QuantizedWeight.shard_shape`). Biases of o/down stay
with rank 0 (added once to the sum). Act-order permutations of column-parallel layers are kept
(they permute in_features, which every rank has whole); a row-parallel layer's would gather x
across ranks and is refused.

The blocks reduce through ``LlamaBlock.reduce`` (a communicator's ``all_reduce``, see
:mod:`quickcupy.distributed`): with NCCL the reduces of a decode step are captured in its
:class:`DecodeGraph` like any kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..quantize import QuantizedWeight
from .model import (NORMS, PROJECTIONS, QUANTIZED_BACKENDS, HeadWeights, LayerWeights, LlamaConfig, LlamaModel,
                    _device, _xp, make_linear, projection_shapes)

# Projection -> the axis of its (out_features, in_features) weight that tensor parallelism splits.
COLUMN, ROW = 0, 1
SPLIT = {"q_proj": COLUMN, "k_proj": COLUMN, "v_proj": COLUMN, "o_proj": ROW,
         "gate_proj": COLUMN, "up_proj": COLUMN, "down_proj": ROW}
assert set(SPLIT) == set(PROJECTIONS)


@dataclass(frozen=True)
class ShardConfig(LlamaConfig):
    """One rank's share of a model split over ``world`` ranks: num_attention_heads,
    num_key_value_heads and intermediate_size are the rank's; hidden_size (the residual stream,
    whole on every rank) and head_dim are the model's."""

    world: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // (self.num_attention_heads * self.world)


def _check_world(world):
    if isinstance(world, bool) or not isinstance(world, (int, np.integer)) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")


def shard_config(config: LlamaConfig, world: int) -> ShardConfig:
    """The config of each rank's model; ValueError when ``world`` does not divide the heads, the KV
    heads or the intermediate size."""
    _check_world(world)
    if isinstance(config, ShardConfig):
        raise ValueError(f"config is already a shard (world={config.world}); shard the full model's config")
    nh, nkv, I = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    for name, value in (("num_attention_heads", nh), ("num_key_value_heads", nkv)):
        if value % world:
            raise ValueError(f"{name}={value} is not a multiple of world={world}: tensor parallelism gives "
                             f"each rank whole heads (and each query head's KV head)")
    if I % world:
        raise ValueError(f"intermediate_size={I} is not a multiple of world={world}")
    fields = dict(config.to_dict(), num_attention_heads=nh // world, num_key_value_heads=nkv // world,
                  intermediate_size=I // world)
    return ShardConfig(**fields, world=int(world))


def check_shardable(config: LlamaConfig, world: int, group_size=None, vocab_size: int | None = None):
    """Every rule for splitting a model of ``config`` over ``world`` ranks, from shapes alone (a
    launcher checks before it starts the ranks): the heads and intermediate size (:func:`shard_config`),
    with ``group_size`` the 4-bit tiles and groups of every projection, and ``vocab_size`` a
    multiple of ``world``. Returns the shard config."""
    shard = shard_config(config, world)
    if group_size is not None:
        for name, (n, k) in projection_shapes(config).items():
            try:
                QuantizedWeight.shard_shape(n, k, group_size, SPLIT[name], world)
            except ValueError as exc:
                raise ValueError(f"{name} (4-bit, group_size={group_size}): {exc}") from None
    if vocab_size is not None and vocab_size % world:
        raise ValueError(f"the vocabulary ({vocab_size} tokens) is not a multiple of world={world}: the LM head "
                         f"splits it across ranks")
    return shard


def _split(a, axis: int, rank: int, world: int):
    """Slice ``rank`` of ``world`` of a float array (or a QuantizedWeight, by its rules) on ``axis``."""
    if isinstance(a, QuantizedWeight):
        return a.shard(axis, rank, world)
    a = np.asarray(a)
    part = a.shape[axis] // world
    index = [slice(None)] * a.ndim
    index[axis] = slice(rank * part, (rank + 1) * part)
    return a[tuple(index)].copy()


def shard_layer(weights: LayerWeights, config: LlamaConfig, rank: int, world: int) -> LayerWeights:
    """Rank ``rank``'s slice of one layer of ``config`` (as the module says); it checks against
    ``shard_config(config, world)``."""
    shard = shard_config(config, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} must lie in 0..world-1 for world={world}")
    weights.check(config)
    tensors, biases, perms = {}, {}, {}
    for name, axis in SPLIT.items():
        try:
            tensors[name] = _split(getattr(weights, name), axis, rank, world)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        bias = weights.biases.get(name)
        if bias is not None:
            if axis == COLUMN:
                biases[name] = _split(bias, 0, rank, world)
            elif rank == 0:                 # added once: to rank 0's partial, so once to the sum
                biases[name] = np.array(bias, copy=True)
        perm = weights.perms.get(name)
        if perm is not None:
            if axis == COLUMN:
                perms[name] = perm
            elif not np.array_equal(perm, np.arange(len(perm))):
                raise ValueError(f"{name} has an act-order permutation (perms[{name!r}]): a row-parallel layer "
                                 f"splits in_features across ranks, and the permutation would gather x from all "
                                 f"of them; tensor parallelism does not run act-order {name}")
    norms = {name: getattr(weights, name) for name in NORMS}
    out = LayerWeights(**tensors, **norms, biases=biases, perms=perms)
    out.check(shard, where=f"rank {rank} layer")
    return out


def shard_lm_head(head: HeadWeights, rank: int, world: int):
    """Rank ``rank``'s rows (vocabulary slice) of the LM head (of embed_tokens when tied)."""
    lm = head.embed_tokens if head.lm_head is None else head.lm_head
    vocab = lm.out_features if isinstance(lm, QuantizedWeight) else np.shape(lm)[0]
    if vocab % world:
        raise ValueError(f"the vocabulary ({vocab} tokens) is not a multiple of world={world}")
    try:
        return _split(lm, 0, rank, world)
    except ValueError as exc:
        raise ValueError(f"lm_head: {exc}") from None


class VocabParallelHead:
    """The LM head of one rank: its linear gives the logits of its vocabulary slice (..., V/world);
    an all-gather puts the slices side by side, (..., V), the same on every rank."""

    def __init__(self, linear, comm):
        self.linear, self.comm = linear, comm
        self.in_features, self.out_features = linear.in_features, linear.out_features * comm.world

    def __call__(self, x):
        part = self.linear(x)
        xp = _xp(part)
        gathered = self.comm.all_gather(xp.ascontiguousarray(part))          # (world, ..., V/world)
        return xp.moveaxis(gathered, 0, -2).reshape(*part.shape[:-1], self.out_features)


def rank_model(config: LlamaConfig, layers: list, comm, backend: str = "numpy", group_size: int = 128,
               head: HeadWeights | None = None, dtype="float16") -> LlamaModel:
    """The model of rank ``comm.rank`` of ``comm.world``: a :class:`LlamaModel` of the shard config
    on ``backend`` whose blocks all-reduce through ``comm`` (:mod:`quickcupy.distributed`).

    layers: the full model's :class:`LayerWeights` (every rank passes the same), float or 4-bit;
    float ones are quantized by each rank after the split (the same codes as splitting the
    quantized layer: rows quantize alone, and the groups of a row-parallel split are whole).
    head: the full :class:`HeadWeights`; the embedding is replicated, the LM head split by
    vocabulary (:class:`VocabParallelHead`), dense or 4-bit as :class:`LlamaModel` makes it.
    """
    world, rank = comm.world, comm.rank
    floats = any(not isinstance(a, QuantizedWeight) for w in layers for a in w.projections().values())
    # 4-bit weights bring their own group size, which QuantizedWeight.shard checks.
    check_shardable(config, world, group_size if backend in QUANTIZED_BACKENDS and floats else None,
                    None if head is None else np.shape(head.embed_tokens)[0])
    shard = shard_config(config, world)
    model = LlamaModel(shard, [shard_layer(w, config, rank, world) for w in layers], backend, group_size,
                       dtype=dtype)
    for block in model.blocks:
        block.reduce = comm.all_reduce
    if head is not None:
        head.check(config)
        lm = shard_lm_head(head, rank, world)
        # As LlamaModel places a head: the embedding and norm in the activations' dtype, a float LM
        # head dense (cuBLAS) on every GPU backend, a 4-bit one on the backend's GEMM.
        model.head, model.vocab_size = True, np.shape(head.embed_tokens)[0]
        model.embed = _device(model.xp, head.embed_tokens, model.dtype)
        model.final_norm = _device(model.xp, head.norm, model.dtype)
        model.lm_head = VocabParallelHead(make_linear(
            backend if isinstance(lm, QuantizedWeight) or backend == "numpy" else "dense", lm, group_size, dtype),
            comm)
    return model

