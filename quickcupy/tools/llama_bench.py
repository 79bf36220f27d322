"""``python -m quickcupy llama``: prefill and decode tokens/s of a Llama decoder stack on dense
(cuBLAS), AWQ and QUICK linears, in float16 or bfloat16 (``--dtype``), with the accuracy of each
against the float32 NumPy stack.

Two clocks. Wall: each forward launched from Python, one CuPy call per operation, as the runner
really runs. GPU: each forward queued behind a spin kernel (quickcupy.tools.timing), so the events
measure the GPU's work alone, what a runtime without per-launch overhead would see.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import device as _device
from .. import kernels
from ..llama import ops
from ..gemm import launch_plan
from ..llama.checkpoint import load_checkpoint
from ..llama.model import (BACKENDS, PRESETS, QUANTIZED_BACKENDS, KVCache, LlamaConfig, LlamaModel, QuantizedLinear,
                           projection_shapes, random_head, random_layers)
from ..llama.parallel import check_shardable
from ..quantize import effective_group_size, quantize
from ..reference import rel_error
from . import generate
from .common import (DTYPE_HELP, SHORT_DTYPES, Progress, UsageError, check_output_path, deprecated, parse_dtype,
                     parse_group_size, parse_int, parse_int_list, parse_names, table, write_json)
from .timing import gpu_seconds_behind_spin

@dataclass(frozen=True)
class Settings:
    """What one ``llama`` run does, parsed and checked once."""
    checkpoint: str | None
    preset: str
    layers: int | None         # None: all of the checkpoint's (or 4 for a preset)
    batches: tuple
    prompt: int
    gen: int
    backends: tuple
    group_size: int | None     # None: the checkpoint's, or 128 for random weights
    seed: int
    check_tokens: int
    json: str | None
    command: str
    prompt_text: str | None = None
    vocab: int | None = None
    dtype: str = "float16"     # activations on the GPU: "float16" or "bfloat16"
    lm_head: str = "dense"     # --vocab's LM head: "dense" (16-bit, cuBLAS) or "4bit" (the backend's GEMM)
    tp: int = 1                # tensor parallelism: GPUs (one process each) the whole model is split over


DEFAULT_PRESET_LAYERS = 4
LM_HEADS = ("dense", "4bit")
DEFAULT_TP_VOCAB = 32000       # --tp times the whole model, with this vocabulary unless --vocab says


def add_parser(subparsers):
    p = subparsers.add_parser(
        "llama", help="Llama decoder blocks: prefill/decode tokens/s of dense (cuBLAS), AWQ and QUICK in fp16 or bf16",
        description="Times a stack of Llama decoder blocks (prefill of batch x prompt tokens, then gen "
                    "tokens one at a time with a KV cache) per backend, and checks the output against "
                    "the float32 NumPy reference.")
    p.add_argument("--preset", default="7b", help=f"model dimensions: {', '.join(PRESETS)} (default 7b)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="4-bit checkpoint directory (config.json + *.safetensors; AWQ, GPTQ or "
                        "compressed-tensors) instead of random weights")
    p.add_argument("--layers", default=None,
                   help=f"decoder blocks to run (default {DEFAULT_PRESET_LAYERS}; all of a checkpoint's)")
    p.add_argument("--batch", default="1,16,64,256", help="comma-separated batch sizes (default 1,16,64,256)")
    p.add_argument("--prompt", default="128", help="prompt tokens per sequence (default 128)")
    p.add_argument("--gen", default="128", help="tokens decoded one at a time after the prompt (default 128)")
    p.add_argument("--backends", default="dense,awq,quick",
                   help=f"comma-separated, from {', '.join(BACKENDS)} (default dense,awq,quick; dense = cuBLAS "
                        f"on 16-bit weights in --dtype, fp16 = the same held to float16)")
    p.add_argument("--dtype", default="fp16",
                   help=DTYPE_HELP + ", also of the dense weights, on the GPU (default fp16); the NumPy "
                        "reference is float32")
    p.add_argument("--group-size", default=None,
                   help="-1 or a multiple of 32 for random weights (default 128; a checkpoint brings its own)")
    p.add_argument("--seed", default="0", help="seed of the random weights and inputs (default 0)")
    p.add_argument("--check-tokens", default="8",
                   help="tokens of the batch-1 prefill compared with the NumPy reference (default 8; 0 skips)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--vocab", default=None,
                   help="time the whole model instead (embedding, the blocks, final norm, a dense LM head of "
                        "this many tokens, greedy sampling; decode as one CUDA graph per step on the 4-bit "
                        "backends; random weights, one layer's copied to every layer)")
    p.add_argument("--lm-head", default="dense", choices=LM_HEADS,
                   help="with --vocab: the LM head dense (16-bit weights, cuBLAS; default) or 4bit (quantized "
                        "with --group-size, run by the 4-bit backends' GEMM)")
    p.add_argument("--prompt-text", metavar="TEXT",
                   help="with --checkpoint: what 'python -m quickcupy generate --prompt TEXT' does (deprecated "
                        "here), --gen tokens at most, on the first of --backends (NumPy without a GPU)")
    p.add_argument("--tp", default="1",
                   help=f"tensor parallelism: the whole model (as --vocab, default vocab {DEFAULT_TP_VOCAB}) split "
                        "over this many GPUs, one process each, joined by NCCL (pip install "
                        "'quickcupy[cuda13,nccl13]'); rank 0 prints the report (default 1: one GPU, no NCCL)")
    p.set_defaults(func=run)


def settings(args) -> Settings:
    """Checked settings from the parsed arguments; UsageError (one line) on a bad value."""
    if args.checkpoint is None and args.preset not in PRESETS:
        raise UsageError(f"--preset {args.preset!r} is not one of {', '.join(PRESETS)}")
    check_output_path("--json", args.json)
    group_size = None
    if args.group_size is not None:
        config = LlamaConfig.preset(args.preset) if args.checkpoint is None else None
        ks = (config.hidden_size, config.intermediate_size) if config else ()
        group_size = parse_group_size("--group-size", args.group_size, ks)
    dtype = parse_dtype(getattr(args, "dtype", "fp16"))
    backends = tuple(parse_names("--backends", args.backends, BACKENDS))
    if dtype != "float16" and "fp16" in backends:
        raise UsageError(f"--backends fp16 is float16 cuBLAS; with --dtype {SHORT_DTYPES[dtype]} use dense")
    vocab = None if getattr(args, "vocab", None) is None else parse_int("--vocab", args.vocab, 8)
    tp = parse_int("--tp", getattr(args, "tp", "1"), 1)
    if tp > 1:
        vocab = _check_tp(args, tp, backends, group_size, vocab)
    return Settings(
        checkpoint=args.checkpoint, preset=args.preset, dtype=dtype,
        layers=None if args.layers is None else parse_int("--layers", args.layers, 1),
        batches=tuple(parse_int_list("--batch", args.batch, 1)),
        prompt=parse_int("--prompt", args.prompt, 1), gen=parse_int("--gen", args.gen, 0),
        backends=backends, group_size=group_size,
        seed=parse_int("--seed", args.seed, 0), check_tokens=parse_int("--check-tokens", args.check_tokens, 0),
        json=args.json, command=getattr(args, "command_line", None) or "python -m quickcupy llama",
        prompt_text=getattr(args, "prompt_text", None), vocab=vocab, tp=tp,
        lm_head=getattr(args, "lm_head", "dense"))


def _check_tp(args, tp: int, backends, group_size, vocab) -> int:
    """--tp N > 1: what the split needs, from the preset's shapes (before any process starts).
    Returns the vocabulary."""
    if args.checkpoint:
        raise UsageError("--tp builds random weights (the whole model, as --vocab); it does not take --checkpoint")
    if getattr(args, "prompt_text", None) is not None:
        raise UsageError("--tp times the whole model; it does not take --prompt-text")
    vocab = DEFAULT_TP_VOCAB if vocab is None else vocab
    quantized = set(backends) & set(QUANTIZED_BACKENDS)
    try:
        check_shardable(LlamaConfig.preset(args.preset), tp, (128 if group_size is None else group_size)
                        if quantized else None, vocab)
    except ValueError as exc:
        raise UsageError(f"--tp {tp}: {exc}") from None
    return vocab


class Timer:
    """Seconds of a with-block: CUDA events around the GPU work, or perf_counter on the CPU."""

    def __init__(self, xp):
        self.gpu = xp is not np

    def __enter__(self):
        if self.gpu:
            import cupy
            self._events = (cupy.cuda.Event(), cupy.cuda.Event())
            self._events[0].record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.gpu:
            import cupy
            self._events[1].record()
            self._events[1].synchronize()
            self.seconds = cupy.cuda.get_elapsed_time(*self._events) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0


def estimate_gpu_bytes(config: LlamaConfig, backend: str, batch: int, prompt: int, gen: int,
                       group_size: int = 128) -> dict:
    """Rough GPU memory of one benchmark run: weights, KV cache, inputs and prefill temporaries."""
    H, I, d = config.hidden_size, config.intermediate_size, config.head_dim
    nh, nkv, L = config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers
    shapes = projection_shapes(config).values()
    if backend in QUANTIZED_BACKENDS:        # 4-bit codes + an fp16 scale and a 4-bit zero per group
        weights = L * sum(n * k // 2 + n * (k // effective_group_size(group_size, k)) * 5 // 2
                          for n, k in shapes)
    else:
        weights = L * sum(n * k for n, k in shapes) * 2
    tokens = batch * prompt
    activations = (tokens * ((nh + 2 * nkv) * d * 2 * 3 + H * 4 * 6 + 2 * I * 2 + I * 4 * 3)
                   + batch * nh * prompt * prompt * (2 + 4 + 4))   # scores: fp16, fp32, mask sum
    return {"weights": weights, "kv_cache": KVCache.nbytes(config, batch, prompt + gen, 2, L),
            "inputs": batch * (prompt + gen) * H * 2, "activations": activations}


def _random_hidden(xp, seed: int, shape, dtype):
    """Hidden states ~ N(0, 1), generated where they are used."""
    if xp is np:
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    return xp.random.RandomState(seed).standard_normal(shape, dtype=np.float32).astype(dtype)


def run(args) -> int:

    s = settings(args)
    if s.tp > 1:
        from . import llama_tp
        return llama_tp.run(s)
    if s.prompt_text is not None:
        return generate_text(s)
    if s.vocab is not None:
        return run_model(s)
    progress = Progress("llama", log_steps=False)
    reason = _device.no_gpu_reason()
    gpu = reason is None

    # --------------------------------------------------------------- model dimensions and weights
    if s.checkpoint:
        try:
            if (Path(s.checkpoint) / "config.json").is_file():
                progress.note(f"reading {s.checkpoint}")
            ckpt = load_checkpoint(s.checkpoint, num_layers=s.layers)
        except (OSError, ValueError, ImportError) as exc:
            raise UsageError(f"--checkpoint: {exc}") from None
        group_size = ckpt.quantization.group_size
        if s.group_size not in (None, group_size):
            raise UsageError(f"--group-size {s.group_size} disagrees with the checkpoint's "
                             f"group_size={group_size}")
        config, float_layers, quant_layers = ckpt.config, None, ckpt.layers
        source = f"{ckpt.quantization.method} ({ckpt.quantization.variant}) checkpoint {s.checkpoint}"
    else:
        preset = s.preset if gpu else "tiny"
        config = LlamaConfig.preset(preset).replace(num_hidden_layers=s.layers or DEFAULT_PRESET_LAYERS)
        group_size = 128 if s.group_size is None else s.group_size
        try:
            for name, (n, k) in projection_shapes(config).items():
                effective_group_size(group_size, k)
        except ValueError as exc:
            raise UsageError(f"--group-size: {exc}") from None
        float_layers, quant_layers = None, None
        source = f"random weights (seed {s.seed})"

    if gpu:
        backends = list(s.backends)
        _check_gpu_memory(config, backends, s, group_size)
    else:
        backends = ["numpy"]
        what = "the NumPy float32 path" + ("" if s.checkpoint or s.preset == "tiny"
                                           else f" with the tiny preset instead of {s.preset}")
        print(f"{reason}: running {what} on the CPU")

    if quant_layers is None:
        progress.note(f"random weights: {config.num_hidden_layers} layers of {_describe(config)}")
        float_layers = random_layers(config, seed=s.seed)
    if quant_layers is None and (not gpu or set(QUANTIZED_BACKENDS) & set(backends)):
        progress.note(f"quantizing (group size {group_size})")
        quant_layers = [w.quantized(group_size) for w in float_layers]

    # ----------------------------------------------------------------- NumPy float32 references
    accuracy = []
    refs = {}
    if s.check_tokens:
        x_check = _random_hidden(np, s.seed + 1, (1, s.check_tokens, config.hidden_size), np.float32)
        progress.note("NumPy float32 reference")
        refs["fp32"] = LlamaModel(config, float_layers or quant_layers, "numpy")(x_check)
        if float_layers is not None and quant_layers is not None:
            progress.note("NumPy reference with the dequantized 4-bit weights")
            refs["deq"] = LlamaModel(config, quant_layers, "numpy")(x_check)
        else:
            refs["deq"] = refs["fp32"]
        if quant_layers is not None:
            # The 4-bit weights' own error, in exact float32 arithmetic: what the kernels should match.
            accuracy.append({"backend": "numpy", "weights": f"int4 g{group_size}, dequantized",
                             "vs_fp32": rel_error(refs["deq"], refs["fp32"]) if float_layers else None,
                             "vs_same_weights": 0.0})

    # ------------------------------------------------------------------------ timing per backend
    results = []
    for backend in backends:
        progress.note(f"[{backend}] building {config.num_hidden_layers} blocks")
        layers = quant_layers if backend in QUANTIZED_BACKENDS else (float_layers or quant_layers)
        model = LlamaModel(config, layers, backend, group_size, dtype=s.dtype)
        if gpu and s.check_tokens:
            y = model(x_check)
            same = refs["deq"] if backend in QUANTIZED_BACKENDS else refs["fp32"]
            accuracy.append({"backend": backend,
                             "weights": f"int4 g{group_size}" if backend in QUANTIZED_BACKENDS else
                             (SHORT_DTYPES[s.dtype] if float_layers else f"{SHORT_DTYPES[s.dtype]}, dequantized int4"),
                             "vs_fp32": rel_error(y, refs["fp32"]),
                             "vs_same_weights": rel_error(y, same)})
        for batch in s.batches:
            results.append(_time_one(model, backend, batch, s, progress))
        del model
        if gpu:
            import cupy
            cupy.get_default_memory_pool().free_all_blocks()
    progress.close()

    # ---------------------------------------------------------------------------------- report
    report = {
        "command": s.command, "versions": _device.versions(), "device": _device.device_info() if gpu else
        {"available": False, "reason": reason}, "config": config.to_dict(), "source": source,
        "group_size": group_size, "prompt": s.prompt, "gen": s.gen, "dtype": s.dtype,
        "throughput": results, "accuracy": accuracy,
    }
    print(_format_report(report, backends))
    if s.json:
        write_json(s.json, report, indent=2)
    return 0


def generate_text(s: Settings) -> int:
    """--prompt-text: ``python -m quickcupy generate``'s run (:mod:`quickcupy.tools.generate`) on the
    first of --backends, --gen tokens at most."""
    if not s.checkpoint:
        raise UsageError("--prompt-text needs --checkpoint DIR (with tokenizer.json, embedding and LM head)")
    deprecated("llama", "--prompt-text TEXT", "python -m quickcupy generate --checkpoint DIR --prompt TEXT")
    return generate.print_generation(generate.Settings(
        checkpoint=s.checkpoint, prompt=s.prompt_text, max_new_tokens=max(s.gen, 1), backend=s.backends[0],
        dtype=s.dtype, layers=s.layers))


def _describe(config: LlamaConfig) -> str:
    return (f"hidden {config.hidden_size}, {config.num_attention_heads} heads / "
            f"{config.num_key_value_heads} KV heads, intermediate {config.intermediate_size}")


def _check_gpu_memory(config, backends, s, group_size):
    """Fails early, in one line, when the largest batch cannot fit in the free GPU memory."""
    import cupy
    free, _ = cupy.cuda.runtime.memGetInfo()
    free += cupy.get_default_memory_pool().free_bytes()
    batch = max(s.batches)
    for backend in backends:
        if backend == "numpy":
            continue
        need = estimate_gpu_bytes(config, backend, batch, s.prompt, s.gen, group_size)
        total = sum(need.values()) * 1.1 + (256 << 20)     # margin: cuBLAS workspace, fragmentation
        if total > free:
            parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in need.items())
            raise UsageError(f"{backend} at batch={batch}, prompt={s.prompt}, gen={s.gen} needs about "
                             f"{total / 2**30:.1f} GiB ({parts} GiB) but {free / 2**30:.1f} GiB of GPU memory "
                             f"is free; lower --batch, --prompt, --gen or --layers")


def _time_one(model: LlamaModel, backend: str, batch: int, s: Settings, progress) -> dict:
    """Prefill of batch x prompt tokens, then ``gen`` single-token decode steps, on a fresh cache.

    Two clocks. Wall: each forward launched from Python, one CuPy call per operation, as this runner
    really runs (at small batch a decode step costs more in launch overhead than on the GPU; CuPy
    refuses to capture cuBLAS calls in a CUDA graph). GPU: each forward queued behind a spin kernel
    (quickcupy.tools.timing), so the events measure the GPU's work alone, what a runtime without
    per-launch overhead (C++, CUDA graphs) would see; ``gpu_time_exact`` is False if the host ever
    fell behind the spin (the GPU time is then an upper bound).
    """
    xp, H = model.xp, model.config.hidden_size
    prompt, gen = s.prompt, s.gen
    cache = model.new_cache(batch, prompt + gen)
    x = _random_hidden(xp, s.seed + 2, (batch, prompt, H), model.dtype)
    # (gen, batch, 1, H): each step's input x_dec[t] is contiguous.
    x_dec = _random_hidden(xp, s.seed + 3, (gen, batch, 1, H), model.dtype)

    progress.note(f"[{backend}] batch {batch}: warm-up")
    model(x, cache)                      # compiles kernels, picks cuBLAS algorithms for these shapes
    for t in range(min(gen, 2)):
        model(x_dec[t], cache)
    cache.reset()

    progress.note(f"[{backend}] batch {batch}: prefill {batch} x {prompt} tokens")
    with Timer(xp) as prefill:
        model(x, cache)
    with Timer(xp) as decode:
        for t in range(gen):
            if t % 16 == 0:
                progress.step(f"[{backend}] batch {batch}: decode step {t + 1}/{gen}")
            model(x_dec[t], cache)
    out = {"backend": backend, "batch": batch,
           "prefill_s": prefill.seconds, "prefill_tokens_per_s": batch * prompt / prefill.seconds,
           "decode_s": decode.seconds,
           "decode_tokens_per_s": batch * gen / decode.seconds if gen else None}
    if xp is np:
        return out

    progress.note(f"[{backend}] batch {batch}: GPU time of prefill and decode")
    cache.reset()
    host = 2 * prefill.seconds           # generous first guess of the host's launch time
    exact = True
    prefill_gpu, host, ahead = gpu_seconds_behind_spin(lambda: model(x, cache), host)
    exact &= ahead
    decode_gpu = 0.0
    for t in range(gen):
        seconds, host, ahead = gpu_seconds_behind_spin(lambda: model(x_dec[t], cache), host)
        decode_gpu += seconds
        exact &= ahead
    out.update({"prefill_gpu_s": prefill_gpu, "prefill_gpu_tokens_per_s": batch * prompt / prefill_gpu,
                "decode_gpu_s": decode_gpu,
                "decode_gpu_tokens_per_s": batch * gen / decode_gpu if gen else None,
                "gpu_time_exact": bool(exact)})
    return out


def _format_report(r: dict, backends: list) -> str:
    c = LlamaConfig(**r["config"])
    dev = r["device"]
    lines = [
        f"command: {r['command']}",
        f"device:  {dev['name'] if dev.get('available') else 'CPU (' + dev['reason'] + ')'}; "
        f"quickcupy {r['versions']['quickcupy']}, cupy {r['versions'].get('cupy')}, numpy {r['versions']['numpy']}",
        f"model:   {c.num_hidden_layers} Llama blocks ({_describe(c)}), {r['source']}, group size {r['group_size']}, "
        f"{SHORT_DTYPES[r.get('dtype', 'float16')]} activations",
        f"run:     prefill batch x {r['prompt']} tokens, then {r['gen']} decode steps with the KV cache",
    ]
    by = {(t["backend"], t["batch"]): t for t in r["throughput"]}
    batches = sorted({t["batch"] for t in r["throughput"]})
    ratio = "awq" in backends and "quick" in backends
    metrics = [("prefill_tokens_per_s", "prefill tokens/s, wall clock"),
               ("decode_tokens_per_s", "decode tokens/s, wall clock (each step launched from Python: small "
                                       "batches measure CuPy's launch overhead more than the GEMMs)"),
               ("prefill_gpu_tokens_per_s", "prefill tokens/s, GPU time (launch overhead hidden behind a spin kernel)"),
               ("decode_gpu_tokens_per_s", "decode tokens/s, GPU time (launch overhead hidden behind a spin kernel)")]
    if any(t.get("gpu_time_exact") is False for t in r["throughput"]):
        lines.append("note: the host fell behind the spin kernel at least once; GPU times are upper bounds")
    for key, title in metrics:
        if all(t.get(key) is None for t in r["throughput"]):
            continue
        rows = []
        for batch in batches:
            values = [by[b, batch].get(key) for b in backends]
            row = [batch] + [_fmt_rate(v) for v in values]
            if ratio:
                q, a = by["quick", batch].get(key), by["awq", batch].get(key)
                row.append(f"{q / a:.2f}x" if q and a else "-")
            rows.append(row)
        lines += ["", title, table(["batch"] + backends + (["quick/awq"] if ratio else []), rows)]
    if r["accuracy"]:
        rows = [[a["backend"], a["weights"], _fmt_err(a["vs_fp32"]), _fmt_err(a["vs_same_weights"])]
                for a in r["accuracy"]]
        lines += ["", "relative error ||y - ref|| / ||ref|| of the stack output, batch 1 prefill; refs are the "
                      "float32 NumPy stack with float weights, and with this row's weights",
                  table(["backend", "weights", "vs float32 reference", "vs same weights in NumPy"], rows)]
    return "\n".join(lines)


def _fmt_rate(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _fmt_err(v) -> str:
    return "-" if v is None else f"{v:.2e}"


# ------------------------------------------------------------------------------- the whole model
def _copy_block(block):
    """A block with its own device copies of every weight (one layer's random weights reused for
    all layers, so building a 7B model takes seconds; each layer still streams its own bytes)."""
    import copy
    new = copy.copy(block)
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        linear = copy.copy(getattr(block, name))
        if hasattr(linear, "layer"):
            linear.layer = linear.layer.copy()
        else:
            linear.weight_t = linear.weight_t.copy()
        setattr(new, name, linear)
    new.input_norm, new.post_norm = block.input_norm.copy(), block.post_norm.copy()
    return new


class _NoGemm:
    """Stands in for a linear layer: returns a persistent zero buffer (no GEMM launch), so that a graph
    of the stack times everything but the GEMMs. Asked for ``silu_mul``, it launches ``ops.silu_mul``
    where the layer's own call would (its GEMM kernel has no such prologue for x: :func:`gemm.launch_plan`),
    so that launch stays in the non-GEMM time and a fused one in the GEMM's; and it records whether
    the layer's GEMM would take part in programmatic dependent launch, so the step without GEMMs is
    captured with the real step's launch attributes (DecodeGraph.pdl)."""

    def __init__(self, linear):
        self.linear, self.out_features, self._out = linear, linear.out_features, {}

    def __call__(self, x, silu_mul=False):
        import cupy
        layer = self.linear
        if isinstance(layer, QuantizedLinear):     # the launch the real call would make
            p = launch_plan(layer.layer, x.size // x.shape[-1], x.dtype, layer.kernel, silu_mul=silu_mul)
            kernels.record_gemm_pdl(kernels.takes_pdl(p))     # so the step keeps its launch attributes
            silu_mul = silu_mul and not (p is not None and p.prologue)
        if silu_mul:                               # the layer's GEMM would not run it: it stays here
            x = ops.silu_mul(x)
        shape = x.shape[:-1] + (self.out_features,)
        if shape not in self._out:
            self._out[shape] = cupy.zeros(shape, x.dtype)
        return self._out[shape]


def _without_gemms(model: LlamaModel) -> LlamaModel:
    import copy
    bare = copy.copy(model)
    bare._graphs, bare.blocks = {}, []
    for block in model.blocks:
        b = copy.copy(block)
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            setattr(b, name, _NoGemm(getattr(block, name)))
        bare.blocks.append(b)
    return bare


def _whole_model(config: LlamaConfig, layer, head, backend: str, group_size: int, dtype: str) -> LlamaModel:
    one = LlamaModel(config.replace(num_hidden_layers=1), [layer], backend, group_size, head=head, dtype=dtype)
    return _repeat_layer(one, config.num_hidden_layers)


def _repeat_layer(model: LlamaModel, layers: int) -> LlamaModel:
    """A one-layer model grown to ``layers`` blocks, each a copy of the first (:func:`_copy_block`)."""
    model.blocks += [_copy_block(model.blocks[0]) for _ in range(layers - 1)]
    model.config = model.config.replace(num_hidden_layers=layers)
    return model


def _time_generation(model: LlamaModel, backend: str, batch: int, s: Settings, progress) -> dict:
    """Prefill of batch x prompt token ids (logits of the last position), then ``gen`` greedy decode
    steps fed back on the GPU (CUDA graph replays on the 4-bit backends, eager dense), on both clocks:
    wall (perf_counter around the synchronized loop) and GPU (each call behind a spin kernel)."""
    import cupy
    graph = backend in QUANTIZED_BACKENDS
    rng = np.random.default_rng(s.seed + batch)
    ids = cupy.asarray(rng.integers(0, s.vocab, (batch, s.prompt)))
    cache = model.new_cache(batch, s.prompt + s.gen + 1)

    def generation():
        tok = ops.argmax_rows(model.prefill(ids, cache, graph))
        for _ in range(s.gen):
            tok = ops.argmax_rows(model.decode_step(tok, cache, graph))
        return tok

    progress.note(f"[{backend}] batch {batch}: warm-up (compiles, captures the decode graph)")
    cache.reset()
    generation()
    cupy.cuda.get_current_stream().synchronize()

    cache.reset()
    t0 = time.perf_counter()
    logits = model.prefill(ids, cache, graph)
    tok = ops.argmax_rows(logits)
    cupy.cuda.get_current_stream().synchronize()
    t1 = time.perf_counter()
    for _ in range(s.gen):
        tok = ops.argmax_rows(model.decode_step(tok, cache, graph))
    cupy.cuda.get_current_stream().synchronize()
    t2 = time.perf_counter()
    out = {"backend": backend, "batch": batch, "graph": graph, "prefill_s": t1 - t0,
           "prefill_tokens_per_s": batch * s.prompt / (t1 - t0), "decode_s": t2 - t1,
           "decode_tokens_per_s": batch * s.gen / (t2 - t1)}

    cache.reset()
    exact = True
    prefill_gpu, host, ahead = gpu_seconds_behind_spin(lambda: ops.argmax_rows(model.prefill(ids, cache, graph)),
                                                       2 * (t1 - t0))
    exact &= ahead
    decode_gpu = 0.0
    host = 2 * (t2 - t1) / max(s.gen, 1)
    for _ in range(s.gen):
        seconds, host, ahead = gpu_seconds_behind_spin(
            lambda: ops.argmax_rows(model.decode_step(tok, cache, graph), out=tok), host)
        decode_gpu += seconds
        exact &= ahead
    out.update({"prefill_gpu_s": prefill_gpu, "decode_gpu_s": decode_gpu,
                "decode_gpu_tokens_per_s": batch * s.gen / decode_gpu, "gpu_time_exact": bool(exact),
                "wall_over_gpu_decode": (t2 - t1) / decode_gpu})
    model._graphs.clear()          # each graph holds its cache: free this batch's before the next
    return out


def _non_gemm_us_per_layer(model: LlamaModel, s: Settings) -> dict:
    """GPU time of one captured batch-1 decode step of the stack with every GEMM removed, per layer
    (norms, rope + cache write, attention over prompt positions, silu * up; the embedding and the
    final norm once), beside the full step's."""
    import cupy
    n = model.config.num_hidden_layers
    result = {}
    for name, m in (("full", model), ("no_gemm", _without_gemms(model))):
        cache = m.new_cache(1, s.prompt + 8)
        cache.length = s.prompt                   # attend over prompt positions (values are finite zeros)
        cache.start_dev.fill(s.prompt)
        g = m.decode_graph(cache)
        times = []
        for _ in range(5):
            cache.start_dev.fill(s.prompt)
            seconds, _, _ = gpu_seconds_behind_spin(g.replay, 1e-4)
            times.append(seconds)
        cupy.cuda.get_current_stream().synchronize()
        result[f"{name}_step_us"] = 1e6 * float(np.median(times))
    result["non_gemm_us_per_layer"] = result["no_gemm_step_us"] / n
    result["gemm_us_per_layer"] = (result["full_step_us"] - result["no_gemm_step_us"]) / n
    return result


def random_model_weights(config: LlamaConfig, s: Settings) -> tuple:
    """(one layer of float weights, the head, group size) of --vocab's random model (and --tp's: the
    same on every rank, from the seed): the LM head fp16, or 4-bit with --lm-head 4bit."""
    group_size = 128 if s.group_size is None else s.group_size
    layer = random_layers(config.replace(num_hidden_layers=1), seed=s.seed)[0]
    head = random_head(config, s.vocab, seed=s.seed + 1)
    head.lm_head = head.lm_head.astype(np.float16)
    if s.lm_head == "4bit":
        head.lm_head = quantize(head.lm_head.astype(np.float32), group_size)
    return layer, head, group_size


def backend_weights(backends, layer, group_size: int, progress):
    """(backend, the layer's weights for it) for each backend of ``backends`` but numpy: ``layer``
    as it is, or quantized with ``group_size`` for the 4-bit backends (once, when first needed)."""
    quantized = None
    for backend in backends:
        if backend == "numpy":
            continue
        if backend in QUANTIZED_BACKENDS and quantized is None:
            progress.note(f"quantizing (group size {group_size})")
            quantized = layer.quantized(group_size)
        yield backend, quantized if backend in QUANTIZED_BACKENDS else layer


def run_model(s: Settings) -> int:
    """--vocab: the whole model's prefill and greedy decode per backend and batch (GPU only)."""
    reason = _device.no_gpu_reason()
    if reason is not None:
        raise UsageError(f"--vocab times the whole model on the GPU: {reason}")
    if s.checkpoint:
        raise UsageError("--vocab builds random weights; it does not take --checkpoint")
    progress = Progress("llama", log_steps=False)
    config = LlamaConfig.preset(s.preset).replace(num_hidden_layers=s.layers or LlamaConfig.preset(s.preset)
                                                  .num_hidden_layers)
    progress.note(f"random weights: one layer of {_describe(config)}, copied to {config.num_hidden_layers} layers; "
                  f"vocab {s.vocab}")
    layer, head, group_size = random_model_weights(config, s)
    results, overhead = [], {}
    for backend, weights in backend_weights(s.backends, layer, group_size, progress):
        progress.note(f"[{backend}] building {config.num_hidden_layers} blocks")
        model = _whole_model(config, weights, head, backend, group_size, s.dtype)
        for batch in s.batches:
            results.append(_time_generation(model, backend, batch, s, progress))
        if backend in QUANTIZED_BACKENDS:
            progress.note(f"[{backend}] non-GEMM time per layer")
            overhead[backend] = _non_gemm_us_per_layer(model, s)
        del model
        import cupy
        cupy.get_default_memory_pool().free_all_blocks()
    progress.close()
    report = {"command": s.command, "versions": _device.versions(), "device": _device.device_info(), "config": config.to_dict(),
              "vocab": s.vocab, "lm_head": s.lm_head, "group_size": group_size, "prompt": s.prompt, "gen": s.gen, "dtype": s.dtype,
              "source": f"random weights (seed {s.seed}), one layer's copied to every layer",
              "generation": results, "decode_step_batch1": overhead}
    print(_format_model_report(report))
    if s.json:
        write_json(s.json, report, indent=2)
    return 0


def _format_model_report(r: dict) -> str:
    c = LlamaConfig(**r["config"])
    lines = [f"command: {r['command']}",
             f"device:  {r['device']['name']}; quickcupy {r['versions']['quickcupy']}, cupy {r['versions'].get('cupy')}",
             f"model:   embedding + {c.num_hidden_layers} Llama blocks ({_describe(c)}) + final norm + "
             f"{'4-bit' if r.get('lm_head') == '4bit' else 'dense'} LM head (vocab {r['vocab']}), {r['source']}, group size {r['group_size']}, "
             f"{SHORT_DTYPES[r.get('dtype', 'float16')]} activations",
             f"run:     prefill batch x {r['prompt']} tokens, then {r['gen']} greedy decode steps (argmax on the GPU "
             f"fed back); awq/quick/auto decode steps replay one CUDA graph, dense/fp16 run eagerly (cuBLAS)", ""]
    rows = [[g["backend"], g["batch"], f"{1e3 * g['prefill_s']:.1f}", f"{1e3 * g['prefill_gpu_s']:.1f}",
             f"{g['decode_tokens_per_s']:,.0f}", f"{g['decode_gpu_tokens_per_s']:,.0f}",
             f"{g['wall_over_gpu_decode']:.2f}", "" if g["gpu_time_exact"] else "upper bound"]
            for g in r["generation"]]
    lines.append(table(["backend", "batch", "prefill ms wall", "prefill ms GPU", "decode tok/s wall",
                        "decode tok/s GPU", "wall/GPU", "GPU time"], rows))
    by = {(g["backend"], g["batch"]): g for g in r["generation"]}
    for batch in sorted({g["batch"] for g in r["generation"]}):
        if ("awq", batch) in by and ("quick", batch) in by:
            lines.append(f"batch {batch}: quick/awq decode speedup {by['quick', batch]['decode_gpu_tokens_per_s'] / by['awq', batch]['decode_gpu_tokens_per_s']:.2f}x GPU time, "
                         f"{by['quick', batch]['decode_tokens_per_s'] / by['awq', batch]['decode_tokens_per_s']:.2f}x wall")
    for backend, o in r["decode_step_batch1"].items():
        lines.append(f"[{backend}] batch-1 decode step (graph, GPU time, attention over {r['prompt']} positions): "
                     f"{o['full_step_us']:.0f} us; without GEMMs {o['no_gemm_step_us']:.0f} us = "
                     f"{o['non_gemm_us_per_layer']:.1f} us of non-GEMM work per layer; GEMMs {o['gemm_us_per_layer']:.1f} us per layer")
    return "\n".join(lines)
