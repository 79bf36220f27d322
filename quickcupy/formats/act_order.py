"""Act-order ("desc_act") checkpoints: from ``g_idx`` to one input permutation, applied once.

GPTQ quantizes the input columns in a data-dependent order and records, for each input feature k,
its group ``g_idx[k]``; every group still holds exactly G features. Sorting the features by group
(``perm = argsort(g_idx)``, stable) makes every group a contiguous run of G columns again, the only
layout the kernels know: ``W[:, perm]`` is an ordinary group-wise weight and
``x @ W.T == x[..., perm] @ W[:, perm].T``.
"""
from __future__ import annotations

import numpy as np


def perm_from_g_idx(g_idx, in_features: int, n_groups: int):
    """The permutation (K,) int64 that sorts input features by group, or None when ``g_idx`` is
    already the plain ``k // G`` (no act-order) or absent.

    g_idx: (K,) integer array, feature k's group; each of the ``n_groups`` groups must appear
    exactly K / n_groups times. ValueError/TypeError naming the rule otherwise.
    """
    if g_idx is None:
        return None
    if not isinstance(g_idx, np.ndarray):
        raise TypeError(f"g_idx must be a numpy.ndarray, got {type(g_idx).__name__}"
                        + ("; call .get() on a CuPy array first" if hasattr(g_idx, "get") else ""))
    if g_idx.dtype.kind not in "iu":
        raise TypeError(f"g_idx must be an integer array (int32 in checkpoints), got {g_idx.dtype}")
    K = int(in_features)
    if g_idx.shape != (K,):
        raise ValueError(f"g_idx must have shape (in_features,) = ({K},), got {g_idx.shape}")
    G = K // n_groups
    if g_idx.min() < 0 or g_idx.max() >= n_groups:
        raise ValueError(f"g_idx values must lie in 0..{n_groups - 1} (the groups of scales), "
                         f"found {int(g_idx.min())}..{int(g_idx.max())}")
    counts = np.bincount(g_idx, minlength=n_groups)
    if (counts != G).any():
        g = int(np.argmax(counts != G))
        raise ValueError(f"g_idx is not a per-group permutation: every group must hold group_size={G} "
                         f"input features, group {g} holds {int(counts[g])}")
    perm = np.argsort(g_idx, kind="stable")
    if (perm == np.arange(K)).all():
        return None
    return perm
