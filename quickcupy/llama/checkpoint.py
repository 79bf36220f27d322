"""AutoAWQ "GEMM" checkpoints of Llama models: a directory of config.json and safetensors files
(see the format notes in quickcupy.layouts), read into and written from :class:`LayerWeights`."""
from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Mapping
from typing import NamedTuple

import ml_dtypes
import numpy as np

from ..layouts import pack_awq, unpack_awq
from ..quantize import effective_group_size
from ..quantize import QuantizedWeight
from .model import NORMS, PROJECTIONS, HeadWeights, LayerWeights, LlamaConfig

# Hugging Face names of the tensors around the stack; lm_head may also be 4-bit (.qweight etc.).
EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head"


class Checkpoint(NamedTuple):
    config: LlamaConfig
    layers: list        # of LayerWeights with QuantizedWeight projections and float16 norms
    group_size: int     # as config.json says (-1: one group per row)
    head: HeadWeights | None = None   # when the checkpoint has embed_tokens and norm


def _safetensors():
    try:
        from safetensors import safe_open
        from safetensors.numpy import save_file
    except ImportError as exc:
        raise ImportError("AutoAWQ checkpoints need the 'safetensors' package: "
                          "pip install 'quickcupy[llama]'") from exc
    return safe_open, save_file


def _layer_prefix(i: int, name: str) -> str:
    return f"model.layers.{i}.{PROJECTIONS[name]}.{name}" if name in PROJECTIONS else f"model.layers.{i}.{name}"


def tensor_names(i: int) -> list:
    """The checkpoint tensor names of layer ``i`` that the block reads."""
    return ([f"{_layer_prefix(i, p)}.{part}" for p in PROJECTIONS for part in ("qweight", "qzeros", "scales")]
            + [f"{_layer_prefix(i, n)}.weight" for n in NORMS])


def save_awq_checkpoint(path, config: LlamaConfig, layers: list, group_size: int | None = None,
                        shards: int = 1, head: HeadWeights | None = None) -> Path:
    """Writes ``layers`` as an AutoAWQ "GEMM" checkpoint: config.json + ``shards`` safetensors files
    (and model.safetensors.index.json when sharded). Float projections are quantized with
    ``group_size``. ``head`` (written to the last shard): embed_tokens and norm as float16, lm_head
    as float16, or packed when it is a QuantizedWeight, or left out when tied. Returns the directory."""
    _, save_file = _safetensors()
    path = Path(path)
    if len(layers) != config.num_hidden_layers:
        raise ValueError(f"got {len(layers)} layers but num_hidden_layers={config.num_hidden_layers}")
    if group_size is not None:
        effective_group_size(group_size, config.hidden_size)
    layers = [w.quantized(128 if group_size is None else group_size) for w in layers]
    qs = [q for w in layers for q in w.projections().values()]
    sizes = {q.group_size for q in qs}
    if len(sizes) == 1:
        written_group_size = sizes.pop()
    elif all(q.n_groups == 1 for q in qs):
        written_group_size = -1
    else:
        raise ValueError(f"all projections must share one group size, got {sorted(sizes)}")
    for i, w in enumerate(layers):
        w.check(config, where=f"layer {i}")

    path.mkdir(parents=True, exist_ok=True)
    shards = max(1, min(int(shards), len(layers)))
    files = (["model.safetensors"] if shards == 1 else
             [f"model-{s + 1:05d}-of-{shards:05d}.safetensors" for s in range(shards)])
    weight_map = {}
    for s, indices in enumerate(np.array_split(np.arange(len(layers)), shards)):
        tensors = {}
        for i in indices.tolist():
            for name, q in layers[i].projections().items():
                packed = pack_awq(q)
                for part in ("qweight", "qzeros", "scales"):
                    tensors[f"{_layer_prefix(i, name)}.{part}"] = np.ascontiguousarray(getattr(packed, part))
            for name in NORMS:
                tensors[f"{_layer_prefix(i, name)}.weight"] = np.asarray(getattr(layers[i], name), np.float16)
        if head is not None and s == shards - 1:
            head.check(config)
            tensors[EMBED] = np.asarray(head.embed_tokens, np.float16)
            tensors[FINAL_NORM] = np.asarray(head.norm, np.float16)
            if isinstance(head.lm_head, QuantizedWeight):
                packed = pack_awq(head.lm_head)
                for part in ("qweight", "qzeros", "scales"):
                    tensors[f"{LM_HEAD}.{part}"] = np.ascontiguousarray(getattr(packed, part))
            elif head.lm_head is not None:
                tensors[f"{LM_HEAD}.weight"] = np.asarray(head.lm_head, np.float16)
        save_file(tensors, str(path / files[s]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, files[s]))
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    # config.to_dict() holds model_type and the family's keys (rope_scaling, sliding_window, biases).
    hf_config = {"architectures": [config.family.architecture], "torch_dtype": "float16",
                 **config.to_dict(),
                 **({} if head is None else {"vocab_size": int(np.shape(head.embed_tokens)[0]),
                                             "tie_word_embeddings": head.lm_head is None}),
                 "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": written_group_size,
                                         "zero_point": True, "version": "gemm"}}
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    return path


def _check_quantization_config(qc):
    """Validates config.json's quantization_config; returns its group size (checked by the caller
    against the layers' in_features)."""
    if not isinstance(qc, dict):
        raise ValueError("config.json has no quantization_config: not an AutoAWQ checkpoint")
    if str(qc.get("quant_method", "")).lower() != "awq":
        raise ValueError(f"quantization_config.quant_method={qc.get('quant_method')!r} is not supported; "
                         f"only 'awq' checkpoints load")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ValueError(f"quantization_config.bits={bits!r} is not supported; only 4-bit checkpoints load")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"quantization_config.version={qc.get('version')!r} is not supported; "
                         f"only the 'gemm' packing loads")
    if qc.get("zero_point", True) is not True:
        raise ValueError("quantization_config.zero_point=false is not supported; AWQ's zero points are assumed")
    return qc.get("group_size", qc.get("q_group_size"))


def _tensor_files(path: Path) -> dict:
    """Tensor name -> safetensors file, from the index if there is one, else from every file's header."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index} has no \"weight_map\" object of tensor name -> file name")
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files")
    names = {}
    for f in files:
        with _open_tensors(f) as fh:
            names.update(dict.fromkeys(fh.keys(), f))
    return names


class TensorStore(Mapping):
    """The tensors of a checkpoint directory's safetensors files, read lazily by name: a mapping
    name -> NumPy array (bfloat16 as ml_dtypes' type), each file opened once and kept open. The
    mapping :func:`quickcupy.formats.read_layer` reads a layer from. ``files``: name -> Path."""

    def __init__(self, path):
        _safetensors()
        self.path = Path(path)
        self.files = _tensor_files(self.path)
        self._handles = {}

    def __getitem__(self, name: str) -> np.ndarray:
        f = self.files[name]
        if f not in self._handles:
            self._handles[f] = _open_tensors(f)
        try:
            return self._handles[f].get_tensor(name)
        except Exception as exc:     # bfloat16, which safetensors' NumPy API cannot hold, or a bad file
            try:
                return _read_bf16(f, name)
            except Exception:
                raise ValueError(f"{name} in {f} cannot be read as NumPy ({exc})") from exc

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, name) -> bool:
        return name in self.files


def _read_json(f: Path) -> dict:
    """A JSON object from ``f``; ValueError naming the file when it is not one."""
    try:
        value = json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{f} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{f} holds a JSON {type(value).__name__}, not an object")
    return value


def _read_bf16(f: Path, name: str) -> np.ndarray:
    """A BF16 tensor of safetensors file ``f`` as ml_dtypes' bfloat16 (safetensors' NumPy API
    refuses the dtype; the format is an 8-byte little-endian header length, a JSON header with
    dtype/shape/data_offsets, the data)."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(n))[name]
        start, end = info["data_offsets"]
        fh.seek(8 + n + start)
        raw = np.frombuffer(fh.read(end - start), np.uint16)
    if info.get("dtype") != "BF16":
        raise ValueError(f"{name} has dtype {info.get('dtype')}, which safetensors' NumPy API does not read")
    return raw.view(ml_dtypes.bfloat16).reshape(info["shape"])


def _to_float16(name: str, a: np.ndarray) -> np.ndarray:
    """A float tensor as float16, refusing values float16 cannot hold (named in the error)."""
    if a.dtype.name == "bfloat16":   # safetensors returns ml_dtypes' bfloat16 where it is installed
        a = a.astype(np.float32)
    if a.dtype.kind != "f":
        raise ValueError(f"{name} must be floating point, got {a.dtype}")
    if a.dtype != np.float16:
        big = np.abs(a[np.isfinite(a)])
        if big.size and big.max() > np.finfo(np.float16).max:
            raise ValueError(f"{name} has values up to {big.max():.3g}, beyond float16's range")
        a = a.astype(np.float16)
    return a


def _open_tensors(f: Path):
    """safe_open(f) for NumPy, with an unreadable file reported as a ValueError naming it."""
    safe_open, _ = _safetensors()
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist")
    try:
        return safe_open(str(f), framework="np")
    except Exception as exc:      # safetensors raises its own SafetensorError
        raise ValueError(f"{f} is not a readable safetensors file ({exc})") from exc


def load_awq_checkpoint(path, num_layers: int | None = None) -> Checkpoint:
    """Reads the first ``num_layers`` (default: all) decoder layers of an AutoAWQ GEMM checkpoint.

    The returned config has ``num_hidden_layers`` = the number of layers read.
    Raises FileNotFoundError / ValueError naming what is missing or unsupported.
    """
    _safetensors()                   # a clear ImportError before anything else
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory: it has no config.json")
    raw = _read_json(path / "config.json")
    group_size = _check_quantization_config(raw.get("quantization_config"))
    try:
        config = LlamaConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path / 'config.json'}: {exc}") from None
    for K in (config.hidden_size, config.intermediate_size):
        try:
            effective_group_size(group_size, K)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"quantization_config.group_size={group_size!r}: {exc}") from None
    n = config.num_hidden_layers if num_layers is None else num_layers
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= config.num_hidden_layers:
        raise ValueError(f"num_layers={num_layers!r} must lie in 1..{config.num_hidden_layers} "
                         f"(the checkpoint's num_hidden_layers)")
    config = config.replace(num_hidden_layers=n)

    store = TensorStore(path)
    files = store.files
    wanted = [name for i in range(n) for name in tensor_names(i)]
    # The head is read when both embed_tokens and norm are there (a checkpoint of layers only has none).
    has_head = EMBED in files and FINAL_NORM in files
    if has_head:
        wanted += [EMBED, FINAL_NORM] + [name for name in files if name.startswith(LM_HEAD + ".")]
    missing = [name for name in wanted if name not in files]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensor(s) the model needs, first: {', '.join(missing[:3])}")
    tensors = {name: store[name] for name in wanted}

    layers = []
    for i in range(n):
        weights = {}
        for name in PROJECTIONS:
            prefix = _layer_prefix(i, name)
            try:
                scales = _to_float16("scales", tensors[f"{prefix}.scales"])
                weights[name] = unpack_awq(tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"],
                                           scales, group_size=group_size)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{prefix}: {exc}") from exc
        for name in NORMS:
            where = f"{_layer_prefix(i, name)}.weight"
            norm = _to_float16(where, tensors[where])
            if not np.isfinite(norm).all():
                raise ValueError(f"{where} has NaN or inf values")
            weights[name] = norm
        layer = LayerWeights(**weights)
        layer.check(config, where=f"model.layers.{i}")
        layers.append(layer)
    head = None
    if has_head:
        if f"{LM_HEAD}.qweight" in tensors:
            try:
                lm_head = unpack_awq(tensors[f"{LM_HEAD}.qweight"], tensors[f"{LM_HEAD}.qzeros"],
                                     _to_float16(f"{LM_HEAD}.scales", tensors[f"{LM_HEAD}.scales"]),
                                     group_size=group_size)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{LM_HEAD}: {exc}") from exc
        elif f"{LM_HEAD}.weight" in tensors:
            lm_head = _to_float16(f"{LM_HEAD}.weight", tensors[f"{LM_HEAD}.weight"])
        elif raw.get("tie_word_embeddings", False):
            lm_head = None
        else:
            raise ValueError(f"{path} has {EMBED} but no {LM_HEAD}.weight and tie_word_embeddings is not true")
        head = HeadWeights(_to_float16(EMBED, tensors[EMBED]), _to_float16(FINAL_NORM, tensors[FINAL_NORM]), lm_head)
        try:
            head.check(config)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return Checkpoint(config, layers, group_size, head)


def load_tokenizer(path):
    """The checkpoint directory's tokenizer.json as a ``tokenizers.Tokenizer`` (the optional
    extra ``quickcupy[llama]``). FileNotFoundError / ImportError name what is missing."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError("--prompt-text needs the 'tokenizers' package: pip install 'quickcupy[llama]'") from exc
    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json")
    return Tokenizer.from_file(str(f))
