"""4-bit checkpoints of Llama models: a directory of config.json and safetensors files, read into
:class:`LayerWeights` whatever the format config.json's quantization_config names (AutoAWQ GEMM,
GPTQ, compressed-tensors pack-quantized: :mod:`quickcupy.formats`), and written as AutoAWQ GEMM."""
from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Mapping
from typing import NamedTuple

import ml_dtypes
import numpy as np

from .. import formats
from ..formats.scheme import FLOAT, Scheme, TensorSpec
from ..layouts import pack_awq
from ..quantize import QuantizedWeight, effective_group_size
from .model import NORMS, PROJECTIONS, HeadWeights, LayerWeights, LlamaConfig, projection_shapes

# Hugging Face names of the tensors around the stack; lm_head may also be 4-bit (.qweight etc.).
EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head"


class Checkpoint(NamedTuple):
    config: LlamaConfig
    layers: list        # of LayerWeights: QuantizedWeight projections, float16 norms, biases, perms
    quantization: Scheme   # config.json's quantization_config, checked: method, variant, group_size
    head: HeadWeights | None = None   # when the checkpoint has embed_tokens and norm


def _safetensors():
    try:
        from safetensors import safe_open
        from safetensors.numpy import save_file
    except ImportError as exc:
        raise ImportError("checkpoints need the 'safetensors' package: "
                          "pip install 'quickcupy[llama]'") from exc
    return safe_open, save_file


def _layer_prefix(i: int, name: str) -> str:
    return f"model.layers.{i}.{PROJECTIONS[name]}.{name}" if name in PROJECTIONS else f"model.layers.{i}.{name}"


def save_awq_checkpoint(path, config: LlamaConfig, layers: list, group_size: int | None = None,
                        shards: int = 1, head: HeadWeights | None = None) -> Path:
    """Writes ``layers`` as an AutoAWQ "GEMM" checkpoint: config.json + ``shards`` safetensors files
    (and model.safetensors.index.json when sharded). Float projections are quantized with
    ``group_size``; biases are written as ``{prefix}.bias`` float16; act-order perms are refused
    (AWQ has none). ``head`` (written to the last shard): embed_tokens and norm as float16, lm_head
    as float16, or packed when it is a QuantizedWeight, or left out when tied
    (None; config.json's tie_word_embeddings follows the head). Returns the directory."""
    _, save_file = _safetensors()
    path = Path(path)
    if len(layers) != config.num_hidden_layers:
        raise ValueError(f"got {len(layers)} layers but num_hidden_layers={config.num_hidden_layers}")
    if group_size is not None:
        effective_group_size(group_size, config.hidden_size)
    if head is not None:       # the head says whether the model is tied; config.json follows it
        config = config.replace(tie_word_embeddings=head.lm_head is None)
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
        if w.perms:
            raise ValueError(f"layer {i} has act-order perms ({', '.join(w.perms)}): an AWQ checkpoint "
                             f"stores none; write the weights with their input features in order")

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
            for name, bias in layers[i].biases.items():
                where = f"{_layer_prefix(i, name)}.bias"
                tensors[where] = _to_float16(where, np.asarray(bias))
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
                 **({} if head is None else {"vocab_size": int(np.shape(head.embed_tokens)[0])}),
                 "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": written_group_size,
                                         "zero_point": True, "version": "gemm"}}
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    return path


def _tensor_files(path: Path) -> dict:
    """Tensor name -> safetensors file, from the index if there is one, else from every file's header."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
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
    mapping :func:`quickcupy.formats.read_layer` reads a layer from. ``files``: name -> Path.
    ``headers``: name -> (safetensors dtype name, shape) from the files' headers alone (no tensor
    data read), for :func:`quickcupy.formats.check_tensors`."""

    def __init__(self, path):
        _safetensors()
        self.path = Path(path)
        self.files = _tensor_files(self.path)
        self._handles = {}
        self._file_headers = {}      # Path -> (JSON header, data start)
        self._headers = None

    def _header(self, f: Path):
        if f not in self._file_headers:
            self._file_headers[f] = _read_header(f)
        return self._file_headers[f]

    @property
    def headers(self) -> dict:
        if self._headers is None:
            self._headers = {}
            for name, f in self.files.items():
                info = self._header(f)[0].get(name)
                if info is not None:
                    self._headers[name] = (info["dtype"], tuple(info["shape"]))
        return self._headers

    def __getitem__(self, name: str) -> np.ndarray:
        f = self.files[name]
        if f not in self._handles:
            self._handles[f] = _open_tensors(f)
        try:
            return self._handles[f].get_tensor(name)
        except Exception as exc:     # bfloat16, which safetensors' NumPy API cannot hold, or a bad file
            try:
                return _read_bf16(f, name, *self._header(f))
            except Exception:
                raise ValueError(f"{name} in {f} cannot be read as NumPy ({exc})") from exc

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, name) -> bool:
        return name in self.files


def read_json(f: Path) -> dict:
    """A JSON object from ``f``; ValueError naming the file when it is not one."""
    try:
        value = json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{f} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{f} holds a JSON {type(value).__name__}, not an object")
    return value


def _read_header(f: Path):
    """(header, data start) of safetensors file ``f``: the JSON header, name -> {"dtype", "shape",
    "data_offsets"} (offsets from the data start), as the format is an 8-byte little-endian header
    length, the header, the data. ValueError naming the file when it is not one."""
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist")
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        try:
            header = json.loads(fh.read(n)) if n <= f.stat().st_size - 8 else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    ok = isinstance(header, dict) and all(
        isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
        and isinstance(v.get("data_offsets"), list) for k, v in header.items() if k != "__metadata__")
    if not ok:
        raise ValueError(f"{f} is not a readable safetensors file (its header is not the format's JSON)")
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_bf16(f: Path, name: str, header: dict, data: int) -> np.ndarray:
    """A BF16 tensor of safetensors file ``f`` (its header and data start: :func:`_read_header`) as
    ml_dtypes' bfloat16 (safetensors' NumPy API refuses the dtype)."""
    info = header[name]
    with open(f, "rb") as fh:
        start, end = info["data_offsets"]
        fh.seek(data + start)
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


def load_checkpoint(path, num_layers: int | None = None) -> Checkpoint:
    """Reads the first ``num_layers`` (default: all) decoder layers, and the head when there is one,
    of a 4-bit Llama checkpoint directory: config.json + safetensors files (sharded with
    model.safetensors.index.json or not) in the format its quantization_config names (AutoAWQ GEMM,
    GPTQ v1/v2 with act-order, compressed-tensors pack-quantized: :mod:`quickcupy.formats`).

    Before any weight is read, the quantization_config is checked against every layer's K, and
    every tensor the model needs against the safetensors headers (present, dtype, shape); then the
    layers are read one at a time. Projections are QuantizedWeight; ``{prefix}.bias`` tensors
    (Qwen2's q/k/v) become ``LayerWeights.biases`` (float32; all-zero ones are left out),
    act-order permutations ``LayerWeights.perms``. The head: embed_tokens and norm (float16);
    lm_head float16, 4-bit (read like the layers) or None when tied. The returned config has
    ``num_hidden_layers`` = the number of layers read. Raises FileNotFoundError / ValueError naming
    what is missing or unsupported.
    """
    _safetensors()                   # a clear ImportError before anything else
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory: it has no config.json")
    raw = read_json(path / "config.json")
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict):
        raise ValueError(f"{path / 'config.json'} has no quantization_config: not a 4-bit checkpoint "
                         f"({', '.join(formats.METHODS)})")
    try:
        config = LlamaConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path / 'config.json'}: {exc}") from None
    shapes = projection_shapes(config)
    scheme = formats.check_quantization_config(qc, sorted({K for _, K in shapes.values()}))
    n = config.num_hidden_layers if num_layers is None else num_layers
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= config.num_hidden_layers:
        raise ValueError(f"num_layers={num_layers!r} must lie in 1..{config.num_hidden_layers} "
                         f"(the checkpoint's num_hidden_layers)")
    config = config.replace(num_hidden_layers=n)

    store = TensorStore(path)
    headers = store.headers
    H = config.hidden_size
    # Everything the model needs, checked from the headers before any tensor is read.
    specs = {}
    for i in range(n):
        for name, (N, K) in shapes.items():
            prefix = _layer_prefix(i, name)
            specs.update(formats.layer_tensors(scheme, prefix, N, K))
            specs[f"{prefix}.bias"] = TensorSpec(FLOAT, (N,), "(out_features,)", required=False)
        for name in NORMS:
            specs[f"{_layer_prefix(i, name)}.weight"] = TensorSpec(FLOAT, (H,), "(hidden_size,)")
    # The head is read when both embed_tokens and norm are there (a checkpoint of layers only has none).
    lm_head = None
    if EMBED in headers and FINAL_NORM in headers:
        shape = headers[EMBED][1]
        if len(shape) != 2 or shape[1] != H:
            raise ValueError(f"{EMBED} has shape {shape}, the config needs (vocab_size, hidden_size={H})")
        V = shape[0]
        specs[EMBED] = TensorSpec(FLOAT, (V, H), "(vocab_size, hidden_size)")
        specs[FINAL_NORM] = TensorSpec(FLOAT, (H,), "(hidden_size,)")
        if config.tie_word_embeddings:
            pass             # lm_head is embed_tokens; a stored copy is ignored, as transformers does
        elif f"{LM_HEAD}.weight" in headers:
            lm_head = "float"
            specs[f"{LM_HEAD}.weight"] = TensorSpec(FLOAT, (V, H), "(vocab_size, hidden_size)")
        elif any(name.startswith(LM_HEAD + ".") for name in headers):
            lm_head = "quantized"
            specs.update(formats.layer_tensors(scheme, LM_HEAD, V, H))
        else:
            raise ValueError(f"{path} has {EMBED} but no {LM_HEAD}.weight and tie_word_embeddings is not true")
    formats.check_tensors(headers, specs, str(path))

    layers = [_read_layer(store, scheme, config, i) for i in range(n)]
    head = None
    if FINAL_NORM in specs:
        if lm_head == "quantized":
            lm_head, _ = formats.read_layer(scheme, store, LM_HEAD)
        elif lm_head == "float":
            lm_head = _to_float16(f"{LM_HEAD}.weight", store[f"{LM_HEAD}.weight"])
        head = HeadWeights(_to_float16(EMBED, store[EMBED]), _to_float16(FINAL_NORM, store[FINAL_NORM]), lm_head)
        try:
            head.check(config)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return Checkpoint(config, layers, scheme, head)


def _read_layer(store: TensorStore, scheme: Scheme, config: LlamaConfig, i: int) -> LayerWeights:
    """Decoder layer ``i``: its 7 projections through :func:`quickcupy.formats.read_layer`, their
    biases where the checkpoint has them, the two norms."""
    weights, biases, perms = {}, {}, {}
    for name in PROJECTIONS:
        prefix = _layer_prefix(i, name)
        weights[name], perm = formats.read_layer(scheme, store, prefix)
        if perm is not None:
            perms[name] = perm
        if f"{prefix}.bias" in store.headers:
            bias = store[f"{prefix}.bias"].astype(np.float32)     # exact from float16 and bfloat16
            if not np.isfinite(bias).all():
                raise ValueError(f"{prefix}.bias has NaN or inf values")
            if bias.any():          # AutoGPTQ writes a bias of zeros for every layer: no bias at all
                biases[name] = bias
    for name in NORMS:
        where = f"{_layer_prefix(i, name)}.weight"
        norm = _to_float16(where, store[where])
        if not np.isfinite(norm).all():
            raise ValueError(f"{where} has NaN or inf values")
        weights[name] = norm
    layer = LayerWeights(**weights, biases=biases, perms=perms)
    layer.check(config, where=f"model.layers.{i}")
    return layer


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
