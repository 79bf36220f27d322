"""``python -m quickcupy generate``: text from a 4-bit checkpoint directory on quickcupy's Llama runner.

The checkpoint's tokenizer.json (the optional ``tokenizers`` package) encodes ``--prompt``, with
config.json's ``bos_token_id`` put first when the encoding lacks it; the model
(:class:`quickcupy.llama.LlamaModel` on the checkpoint loader's weights) continues it, greedily or by
sampling, up to ``--max-new-tokens`` or the first end-of-sequence token (``eos_token_id`` of
config.json and generation_config.json, an id or a list). Printed: the prompt and its continuation
as one decoded text, then one line of prompt and generated tokens, prefill milliseconds and decode
tokens/s. Each clock stops after the GPU's work; a warm-up before them compiles the kernels and
captures the decode graph. Each token is read back as it comes, for the end-of-sequence check.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import device as _device
from ..llama import checkpoint as _checkpoint
from ..llama.model import LlamaModel
from .common import DTYPE_HELP, UsageError, parse_dtype, parse_float, parse_int

BACKENDS = ("auto", "quick", "awq", "dense", "numpy")


@dataclass(frozen=True)
class Settings:
    """What one ``generate`` run does, parsed and checked once."""
    checkpoint: str
    prompt: str
    max_new_tokens: int = 64
    backend: str = "auto"
    dtype: str = "float16"      # activations on the GPU: "float16" or "bfloat16"
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    layers: int | None = None   # the first decoder layers only (None: all)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "generate", help="continue a text prompt with a 4-bit checkpoint and its tokenizer.json, with timings",
        description="Encodes --prompt with the checkpoint's tokenizer.json, continues it on the Llama runner "
                    "(4-bit kernels on the GPU, the NumPy float32 path without one) up to --max-new-tokens or "
                    "the end-of-sequence token, and prints the text and one line of timings.")
    p.add_argument("--checkpoint", metavar="DIR", required=True,
                   help="checkpoint directory: config.json, *.safetensors with the embedding and LM head, "
                        "tokenizer.json")
    p.add_argument("--prompt", metavar="TEXT", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", metavar="N", default="64", help="tokens to generate at most (default 64)")
    p.add_argument("--backend", metavar="NAME", default="auto",
                   help=f"linear layers: {', '.join(BACKENDS)} (default auto: the fastest 4-bit kernel per "
                        f"call; dense = cuBLAS on the dequantized weights; numpy = float32 on the CPU, also "
                        f"what runs without a GPU)")
    p.add_argument("--dtype", default="fp16", help=DTYPE_HELP + " (default fp16)")
    p.add_argument("--temperature", metavar="T", default="0", help="0 (the default): greedy; above 0: sample softmax(logits / T)")
    p.add_argument("--top-k", metavar="K", default=None, help="sample among the k most likely tokens only (with --temperature)")
    p.add_argument("--seed", metavar="N", default="0", help="seed of the sampling (default 0)")
    p.set_defaults(func=run)


def settings(args) -> Settings:
    """Checked settings from the parsed arguments; UsageError (one line) on a bad value."""
    if args.backend not in BACKENDS:
        raise UsageError(f"--backend {args.backend!r} is not one of {', '.join(BACKENDS)}")
    return Settings(checkpoint=args.checkpoint, prompt=args.prompt,
                    max_new_tokens=parse_int("--max-new-tokens", args.max_new_tokens, 1),
                    backend=args.backend, dtype=parse_dtype(args.dtype),
                    temperature=parse_float("--temperature", args.temperature, 0),
                    top_k=None if args.top_k is None else parse_int("--top-k", args.top_k, 1),
                    seed=parse_int("--seed", args.seed, 0))


@dataclass
class Generation:
    """One prompt continued: its tokens, the decoded text and the two clocks."""
    text: str             # the prompt and its continuation, decoded together
    prompt_ids: list
    new_ids: list         # the tokens generated, up to (not including) the first end-of-sequence token
    stopped_at_eos: bool
    prefill_s: float      # prompt in, first token out
    decode_s: float       # every later token
    decode_steps: int     # tokens decoded after the first (what decode_s paid for)
    backend: str
    dtype: str

    def stats(self) -> str:
        rate = f"{self.decode_steps / self.decode_s:.1f} tokens/s" if self.decode_steps else "-"
        return (f"prompt {len(self.prompt_ids)} tokens, generated {len(self.new_ids)} tokens"
                f"{' (stopped at EOS)' if self.stopped_at_eos else ''}; prefill {1e3 * self.prefill_s:.1f} ms, "
                f"decode {rate} [{self.backend}, {self.dtype}]")


def _token_ids(value, where: str) -> list:
    """config.json's token id (an int, a list of ints, or null) as a list."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UsageError(f"--checkpoint: {where}={value!r} is not a token id (an int >= 0, or a list of them)")
    return values


def special_tokens(path) -> tuple:
    """(BOS id or None, frozenset of EOS ids) of checkpoint directory ``path``: bos_token_id of
    config.json, eos_token_id of config.json and generation_config.json."""
    bos, eos = None, set()
    for name in ("config.json", "generation_config.json"):
        f = Path(path) / name
        if not f.is_file():
            continue
        try:
            d = _checkpoint.read_json(f)
        except ValueError as exc:
            raise UsageError(f"--checkpoint: {exc}") from None
        if name == "config.json":
            bos = (_token_ids(d.get("bos_token_id"), f"{name} bos_token_id") or [None])[0]
        eos.update(_token_ids(d.get("eos_token_id"), f"{name} eos_token_id"))
    return bos, frozenset(eos)


def encode(tokenizer, text: str, bos: int | None) -> list:
    """The token ids of ``text``, starting with ``bos`` when given (the tokenizer's post-processor
    may already have put it there)."""
    ids = list(tokenizer.encode(text).ids)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    if not ids:
        raise UsageError("--prompt encodes to no tokens")
    return ids


def load(s: Settings):
    """(model, tokenizer) of the checkpoint, each problem a UsageError naming it; the NumPy
    float32 path, with a note on stderr, where there is no GPU."""
    path = Path(s.checkpoint)
    if not path.is_dir():
        raise UsageError(f"--checkpoint {s.checkpoint} is not a directory")
    try:
        tokenizer = _checkpoint.load_tokenizer(path)
    except ImportError:
        raise UsageError("the 'tokenizers' package, which reads tokenizer.json, is not installed: "
                         "pip install 'quickcupy[llama]'") from None
    except FileNotFoundError as exc:
        raise UsageError(f"--checkpoint: {exc}") from None
    except Exception as exc:        # tokenizers reports a malformed file as a bare Exception
        raise UsageError(f"--checkpoint: {path / 'tokenizer.json'} cannot be read ({exc})") from None
    try:
        ckpt = _checkpoint.load_checkpoint(path, num_layers=s.layers)
    except (OSError, ValueError, ImportError) as exc:
        raise UsageError(f"--checkpoint: {exc}") from None
    if ckpt.head is None:
        raise UsageError(f"--checkpoint: {path} has no model.embed_tokens.weight / model.norm.weight; "
                         f"generating text needs the embedding and the LM head")
    backend = s.backend
    reason = _device.no_gpu_reason()
    if backend != "numpy" and reason is not None:
        print(f"{reason}: running the NumPy float32 path on the CPU", file=sys.stderr)
        backend = "numpy"
    return LlamaModel(ckpt.config, ckpt.layers, backend, head=ckpt.head, dtype=s.dtype), tokenizer


def _sync(model: LlamaModel):
    if model.xp is not np:
        model.xp.cuda.get_current_stream().synchronize()


def continue_prompt(model: LlamaModel, prompt_ids: list, s: Settings, eos=frozenset()) -> Generation:
    """Generates after ``prompt_ids`` (one sequence) as ``s`` says, stopping at a token of ``eos``,
    and times the prefill (to the first token) and the decode steps after it."""
    if max(prompt_ids) >= model.vocab_size:
        raise UsageError(f"--prompt: the tokenizer gives token id {max(prompt_ids)}, beyond the model's "
                         f"vocabulary of {model.vocab_size}")
    ids = np.asarray([prompt_ids], np.int64)
    args = (ids, s.max_new_tokens, s.temperature, s.top_k, s.seed)
    if model.xp is not np:           # compile the kernels, capture the decode graph: outside the clocks
        warm = model.stream(*args)
        for _ in range(min(2, s.max_new_tokens)):
            next(warm)
        warm.close()
        _sync(model)
    t0 = time.perf_counter()
    steps = model.stream(*args)
    tok = next(steps)
    _sync(model)
    t1 = time.perf_counter()
    new, stopped, decoded = [], False, 0
    while tok is not None:
        value = int(tok[0])           # the token read back (on a GPU, a wait for its step)
        if value in eos:
            stopped = True
            break
        new.append(value)
        tok = next(steps, None)
        decoded += tok is not None
    _sync(model)
    t2 = time.perf_counter()
    dtype = "float32" if model.xp is np else str(model.dtype)
    return Generation(text="", prompt_ids=list(prompt_ids), new_ids=new, stopped_at_eos=stopped, prefill_s=t1 - t0,
                      decode_s=t2 - t1, decode_steps=decoded, backend=model.backend, dtype=dtype)


def generate_text(s: Settings) -> Generation:
    """The whole run: checkpoint and tokenizer loaded, the prompt encoded, continued and decoded."""
    model, tokenizer = load(s)
    bos, eos = special_tokens(s.checkpoint)
    g = continue_prompt(model, encode(tokenizer, s.prompt, bos), s, eos)
    g.text = tokenizer.decode(g.prompt_ids + g.new_ids)
    return g


def print_generation(s: Settings) -> int:
    g = generate_text(s)
    print(g.text)
    print(g.stats())
    return 0


def run(args) -> int:
    return print_generation(settings(args))
