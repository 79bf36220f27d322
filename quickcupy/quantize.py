"""Group-wise asymmetric 4-bit quantization, AutoAWQ's rule bit for bit.

For each output row n and group g of ``group_size`` input columns::

    scale = max(max(W) - min(W), 1e-5) / 15          (stored as float16)
    zero  = clamp(-round(min(W) / scale), 0, 15)
    code  = clamp(round(W / scale) + zero, 0, 15)
    W_hat = (code - zero) * scale

``round`` is round-half-to-even, as ``numpy.round`` and ``torch.round``. As in AutoAWQ, the zero
point is clamped to 0..15, so |W - W_hat| <= scale / 2 holds for groups whose range contains 0
(real weights); a group entirely above or below 0 clips.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dtypes import np_dtype

GROUP_MULTIPLE = 32      # the kernels walk K in 32-deep chunks: a group holds whole chunks
BITS = 4
MAX_CODE = (1 << BITS) - 1


def effective_group_size(group_size, in_features: int) -> int:
    """The one rule for group sizes: ``group_size`` is -1 (one group per row) or a positive
    multiple of 32 that divides ``in_features``. Returns the effective size G (``in_features`` for
    -1, the only place -1 becomes K); ValueError/TypeError naming the rule otherwise.

    A group equal to the whole row (G = K) is accepted as given, whatever K is (the layouts then
    check K)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    group_size, K = int(group_size), int(in_features)
    if group_size == -1 or group_size == K:
        return K
    if group_size <= 0 or group_size % GROUP_MULTIPLE:
        raise ValueError(f"group_size={group_size} is not supported: use -1 (one group per row) or a "
                         f"positive multiple of {GROUP_MULTIPLE} (32, 64, 96, 128, ...) that divides "
                         f"in_features")
    if K % group_size:
        raise ValueError(f"in_features={K} is not a multiple of group_size={group_size}")
    return group_size


@dataclass(frozen=True)
class QuantizedWeight:
    """One linear layer quantized to 4 bits, in the weight's own orientation.

    codes:  (N, K) uint8 in 0..15       N = out_features, K = in_features
    zeros:  (N, K // G) uint8 in 0..15
    scales: (N, K // G) float16
    group_size: G, the number of input columns sharing one scale and zero (K for "-1").
    """

    codes: np.ndarray
    zeros: np.ndarray
    scales: np.ndarray
    group_size: int

    def __post_init__(self):
        codes, zeros, scales = self.codes, self.zeros, self.scales
        for name, arr, dtype in (("codes", codes, np.uint8), ("zeros", zeros, np.uint8),
                                 ("scales", scales, np.float16)):
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
            if arr.dtype != dtype or arr.ndim != 2:
                raise TypeError(f"{name} must be a 2-D {np.dtype(dtype).name} array, "
                                f"got {arr.ndim}-D {arr.dtype}")
        N, K = codes.shape
        G = effective_group_size(self.group_size, K)
        object.__setattr__(self, "group_size", G)
        if zeros.shape != (N, K // G) or scales.shape != (N, K // G):
            raise ValueError(f"zeros {zeros.shape} and scales {scales.shape} must both be "
                             f"(out_features, in_features // group_size) = {(N, K // G)}")
        for name, arr in (("codes", codes), ("zeros", zeros)):
            if arr.size and arr.max() > MAX_CODE:
                raise ValueError(f"{name} must lie in 0..{MAX_CODE}, found {int(arr.max())}")
        bad = ~(np.isfinite(scales) & (scales > 0))
        if bad.any():
            n, g = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"scales must be finite and positive (AWQ's rule gives at least 1e-5 / 15); "
                             f"found {scales[n, g]} at out_feature {n}, group {g}")
        for arr in (codes, zeros, scales):
            arr.setflags(write=False)

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        return self.zeros.shape[1]

    def shard(self, dim: int, rank: int, world: int) -> "QuantizedWeight":
        """Tensor-parallel slice ``rank`` of ``world``: dim 0 splits out_features (column-parallel
        layers: q/k/v, gate/up), dim 1 splits in_features (row-parallel: o, down; the partial outputs
        are summed across ranks). Shards hold whole groups and whole 32-wide tiles, so each packs and
        runs like any layer; a per-row group (G = K) becomes a per-row group of the shard."""
        for name, value in (("dim", dim), ("rank", rank), ("world", world)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank={rank} must lie in 0..world-1 for world={world} >= 1")
        N, K, G = self.out_features, self.in_features, self.group_size
        n, k, new_g = self.shard_shape(N, K, G, dim, world)
        if dim == 0:
            rows = slice(rank * n, (rank + 1) * n)
            return QuantizedWeight(codes=self.codes[rows].copy(), zeros=self.zeros[rows].copy(),
                                   scales=self.scales[rows].copy(), group_size=G)
        groups = slice(0, 1) if G == K else slice(rank * k // G, (rank + 1) * k // G)
        cols = slice(rank * k, (rank + 1) * k)
        return QuantizedWeight(codes=self.codes[:, cols].copy(), zeros=self.zeros[:, groups].copy(),
                               scales=self.scales[:, groups].copy(), group_size=new_g)

    @staticmethod
    def shard_shape(out_features: int, in_features: int, group_size: int, dim: int, world: int) -> tuple:
        """(out_features, in_features, group_size) of each of :meth:`shard`'s ``world`` slices of a
        weight of that shape along ``dim``, without the weight (the one home of the rules);
        ValueError naming the rule when the slices would not hold whole tiles and whole groups."""
        if dim not in (0, 1):
            raise ValueError(f"dim={dim} must be 0 (out_features) or 1 (in_features)")
        N, K = int(out_features), int(in_features)
        G = effective_group_size(group_size, K)
        size = (N, K)[dim]
        part = size // world
        what = ("out_features", "in_features")[dim]
        if size % world or part % GROUP_MULTIPLE:
            raise ValueError(f"{what}={size} does not split into {world} shards that are multiples of "
                             f"{GROUP_MULTIPLE} (the kernels' tile)")
        if dim == 0:
            return part, K, G
        if G == K:                                        # one group per row: the shard's own row
            return N, part, part
        if part % G:
            raise ValueError(f"in_features={K} split {world} ways gives {part} columns, not a whole number "
                             f"of groups of group_size={G}")
        return N, part, G

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """(N, K) array of ``(code - zero) * scale`` in ``dtype``."""
        N, K = self.codes.shape
        G = self.group_size
        codes = self.codes.reshape(N, K // G, G).astype(np.float64)
        deq = (codes - self.zeros[..., None]) * self.scales.astype(np.float64)[..., None]
        return deq.reshape(N, K).astype(dtype)


def _round_float32_to_float16_precision(a: np.ndarray):
    """Rounds float32 values in place to the nearest float16 value (ties to even), for |a| in
    float16's normal range or small enough to round to the integer 0 either way. Bit arithmetic:
    numpy's float32 -> float16 cast is several times slower on large arrays."""
    bits = a.view(np.uint32)
    bits += np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))
    bits &= np.uint32(0xFFFFE000)


def quantize(weight: np.ndarray, group_size: int = 128) -> QuantizedWeight:
    """Quantizes a float weight of shape (out_features N, in_features K) with AutoAWQ's rule.

    weight: finite NumPy array, by dtype:

    - float16: the rule as AutoAWQ computes it on a float16 tensor (every step rounded to float16);
    - float32: the rule in float32;
    - bfloat16 (ml_dtypes' type, CuPy 14's): the same result as for ``weight.astype(np.float32)``,
      which holds every bfloat16 value exactly. AutoAWQ on a bfloat16 tensor would round each step
      to bfloat16's 8-bit significand instead; the float32 steps are closer to the rule.

    Other dtypes (float64, integers, complex) are refused: cast them first. group_size: -1 (one
    group per row) or a multiple of 32 dividing in_features (see :func:`effective_group_size`).
    """
    if not isinstance(weight, np.ndarray):
        raise TypeError(f"weight must be a numpy.ndarray (float16, bfloat16 or float32), got "
                        f"{type(weight).__name__}"
                        + ("; call .get() on a CuPy array first" if hasattr(weight, "get") else ""))
    if weight.dtype not in (np.float16, np.float32, np_dtype("bfloat16")):
        raise TypeError(f"weight must be float16, bfloat16 or float32, got {weight.dtype}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {weight.shape}")
    N, K = weight.shape
    if N == 0 or K == 0:
        raise ValueError(f"weight must not be empty, got shape {weight.shape}")
    G = effective_group_size(group_size, K)
    if not np.isfinite(weight).all():
        bad = np.argwhere(~np.isfinite(weight))[0]
        raise ValueError(f"weight has NaN or inf values (first at row {bad[0]}, column {bad[1]})")

    codes = np.empty((N, K), np.uint8)
    zeros = np.empty((N, K // G), np.uint8)
    scales = np.empty((N, K // G), np.float16)
    rows = max(1, (1 << 21) // K)          # blocks of ~2 M elements stay in cache and skip page faults
    for r0 in range(0, N, rows):
        sl = slice(r0, min(N, r0 + rows))
        codes[sl], zeros[sl], scales[sl] = _quantize_rows(weight[sl], G)
    return QuantizedWeight(codes=codes, zeros=zeros, scales=scales, group_size=G)


def _quantize_rows(weight: np.ndarray, G: int):
    """Quantizes rows (n, K) -> codes (n, K) uint8, zeros (n, K/G) uint8, scales (n, K/G) float16.

    Arithmetic as AutoAWQ does it on a torch tensor of the weight's dtype: for float16 every
    operation is computed in float32 and rounded to float16, exactly what numpy's float16 ufuncs do;
    float32 and bfloat16 (cast to float32 exactly, block by block) in float32.
    """
    n, K = weight.shape
    with np.errstate(over="ignore"):  # float16 overflow to inf is part of the rule (constant groups)
        return _quantize_rows_inner(weight, G)


def _quantize_rows_inner(weight: np.ndarray, G: int):
    n, K = weight.shape
    half = weight.dtype == np.float16
    rnd = (lambda a: a.astype(np.float16).astype(np.float32)) if half else (lambda a: a)
    w = weight.astype(np.float32).reshape(n, K // G, G)
    w_max = w.max(axis=2)
    w_min = w.min(axis=2)
    scales = rnd(rnd(np.maximum(rnd(w_max - w_min), rnd(np.float32(1e-5)))) / np.float32(MAX_CODE))
    if not np.isfinite(scales).all():
        raise ValueError("weight range overflows float16 in at least one group; scale the weight down")
    zeros = np.clip(-np.round(rnd(w_min / scales)), 0, MAX_CODE)
    codes = w / scales[..., None]
    if half:
        _round_float32_to_float16_precision(codes)
    np.round(codes, out=codes)
    codes += zeros[..., None]
    np.clip(codes, 0, MAX_CODE, out=codes)
    return codes.astype(np.uint8).reshape(n, K), zeros.astype(np.uint8), scales.astype(np.float16)
