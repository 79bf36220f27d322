"""Checkpoint writers for the tests: each format stated independently from its documentation
(integer arithmetic: word = sum of value * 16**position), not as inverses of quickcupy's readers,
and safetensors files written by hand (bfloat16 included, which safetensors' NumPy API lacks)."""
import json

import numpy as np

AWQ_NIBBLE = [0, 4, 1, 5, 2, 6, 3, 7]     # AutoAWQ: column c of 8 sits at nibble AWQ_NIBBLE[c]


def pack_words(values, axis):
    """Packs 8 consecutive 4-bit values along ``axis`` into int32 words, the first in the low bits."""
    v = np.moveaxis(np.asarray(values, np.int64), axis, -1)
    pad = -v.shape[-1] % 8
    v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), np.int64)], axis=-1)
    v = v.reshape(v.shape[:-1] + (-1, 8))
    words = (v * 16 ** np.arange(8, dtype=np.int64)).sum(-1)
    return np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis)


def write_awq(codes, zeros, scales):
    """An AutoAWQ GEMM layer from codes (N, K), zeros/scales (N, K/G): qweight (K, N/8) and qzeros
    (K/G, N/8), 8 consecutive output columns per word in AutoAWQ's nibble order; scales (K/G, N)."""
    def words(values):                              # (R, N) -> (R, N/8)
        v = np.asarray(values, np.int64).reshape(values.shape[0], -1, 8)
        return (v * 16 ** np.array(AWQ_NIBBLE, np.int64)).sum(-1).astype(np.uint32).view(np.int32)
    return dict(qweight=words(codes.T), qzeros=words(zeros.T), scales=np.ascontiguousarray(scales.T))


def write_gptq(codes, zeros, scales, g_idx, checkpoint_format="gptq"):
    """A GPTQ layer from codes (N, K) in 0..15, zeros/scales (N, K/G) and g_idx (K,):
    qweight (K/8, N) packed along K, qzeros (K/G, N/8) packed along N, scales (K/G, N) float16.
    The classic format subtracts 1 from every nibble of each packed qzeros word at once, as 32-bit
    arithmetic (a zero of 0 borrows from the nibble above), the way GPTQModel writes v1."""
    qzeros = pack_words(zeros.T, 1)
    if checkpoint_format == "gptq":
        qzeros = (qzeros.view(np.uint32) - np.uint32(0x11111111)).view(np.int32)   # wraps mod 2**32
    return dict(qweight=pack_words(codes.T, 0), qzeros=qzeros,
                scales=np.ascontiguousarray(scales.T), g_idx=g_idx.astype(np.int32))


def write_compressed_tensors(codes, zeros, scales, symmetric, g_idx=None):
    """A pack-quantized layer: signed values q = code - 8 stored as q + 8 along K (N, K/8); signed
    zero points z = zero - 8 stored as z + 8 along N (N/8, K/G), absent when symmetric."""
    N, K = codes.shape
    q_signed = codes.astype(np.int64) - 8
    out = dict(weight_packed=pack_words(q_signed + 8, 1), weight_scale=scales, weight_shape=np.array([N, K]))
    if not symmetric:
        out["weight_zero_point"] = pack_words(zeros.astype(np.int64) - 8 + 8, 0)
    if g_idx is not None:
        out["weight_g_idx"] = g_idx.astype(np.int32)
    return out


def dequantize(codes, zeros, scales, g_idx):
    """W[n, k] = (code - zero[group of k]) * scale[group of k] in float64, checkpoint column order."""
    return (codes - zeros[:, g_idx].astype(np.float64)) * scales[:, g_idx].astype(np.float64)


def write_layer(case, codes, zeros, scales, g_idx) -> dict:
    """One 4-bit layer's tensors in the format of ``case`` (a dict: method "awq", "gptq" or
    "compressed-tensors"; variant, GPTQ's checkpoint_format; act_order; symmetric) from codes (N, K),
    zeros (N, K/G), scales (N, K/G) in the checkpoint's scale dtype, g_idx (K,)."""
    if case["method"] == "awq":
        return write_awq(codes, zeros, scales)
    if case["method"] == "gptq":
        t = write_gptq(codes, zeros, scales.astype(np.float32).astype(np.float16), g_idx, case["variant"])
        t["scales"] = np.ascontiguousarray(scales.T)           # in the case's dtype
        return t
    return write_compressed_tensors(codes, zeros, scales, case.get("symmetric", False),
                                    g_idx if case.get("act_order") else None)


def quantization_config(case) -> dict:
    """config.json's quantization_config of ``case`` (see :func:`write_layer`; G: its group size,
    -1 for one group per row), the lm_head left unquantized in compressed-tensors' terms."""
    G = case["G"]
    if case["method"] == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True, "version": "gemm"}
    if case["method"] == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": bool(case.get("act_order")),
                "sym": False, "checkpoint_format": case["variant"]}
    return {**ct_config(G, case.get("symmetric", False)), "quantization_status": "compressed", "ignore": ["lm_head"]}


def ct_config(G, symmetric, **weights):
    """compressed-tensors' quantization_config of one W4A16 group (G = -1: the channel strategy)."""
    args = {"num_bits": 4, "type": "int", "symmetric": symmetric,
            "strategy": "channel" if G == -1 else "group", "group_size": None if G == -1 else G, **weights}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": args, "input_activations": None}}}


SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "int32": "I32", "int64": "I64"}


def write_safetensors(path, tensors: dict):
    """A safetensors file: 8-byte little-endian header length, JSON header (dtype, shape,
    data_offsets), the tensors' bytes in order."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        t = np.ascontiguousarray(t)
        data = t.tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype.name], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def write_sharded(directory, tensors: dict, shards: int = 2):
    """``tensors`` split into ``shards`` files in ``directory`` with model.safetensors.index.json."""
    names = list(tensors)
    weight_map = {}
    for s, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        f = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(directory / f, {names[i]: tensors[names[i]] for i in part})
        weight_map.update({names[i]: f for i in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
